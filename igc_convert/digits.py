"""The project's embedded real-data model: a small ResNet trained on scikit-learn's handwritten digits.

It gives every part of the pipeline (conversion, calibration, fine-tuning, export) a real network with
real weights and a real accuracy to protect, trained on the CPU in seconds, with no download.

Example::

    model, acc = train_digits_model(epochs=6, seed=0)     # ~99% validation accuracy
    val = resolve_source("digits", image_size=12, channels=1, split="val")
    evaluate(model, val)

The CLI names the architecture as ``igc_convert.digits:digits_resnet``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .data import make_loader, resolve_source
from .errors import ConfigError, DataError
from .modes import eval_mode

log = logging.getLogger(__name__)

#: Input of the model: one channel, 8×8 digits upsampled to 12×12 (room for two 3×3 stages; 16×16
#: costs 1.8x the compute for no accuracy gain).
IMAGE_SIZE = 12
CHANNELS = 1


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN pairs and a shortcut (1×1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem 3×3 conv (1→w) → basic blocks at widths ``w`` then ``2w`` (stride 2) → pool → linear.

    >>> DigitsResNet()(torch.zeros(2, 1, 12, 12)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = CHANNELS) -> None:
        super().__init__()
        # timm's convention for a model's expected input, read by the CLI (no --image-size needed).
        self.pretrained_cfg = {"input_size": (in_channels, IMAGE_SIZE, IMAGE_SIZE), "num_classes": num_classes}
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_resnet(num_classes: int = 10) -> DigitsResNet:
    """Factory of the architecture (random weights), importable as ``igc_convert.digits:digits_resnet``."""
    return DigitsResNet(num_classes=num_classes)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block, restoring the caller's setting after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_digits_model(*, epochs: int = 6, seed: int = 0, image_size: int = IMAGE_SIZE, batch_size: int = 64,
                       lr: float = 3e-3, width: int = 32, threads: int | None = None,
                       progress: bool = False) -> tuple[DigitsResNet, float]:
    """Train :class:`DigitsResNet` on the digits train split; return it (eval mode) and its val accuracy.

    Deterministic for a given ``seed`` and thread count (CPU only). AdamW with a one-cycle schedule
    and random shifts; about 10 CPU-seconds for 6 epochs (99.2-99.7% on the val split for seeds 0-4,
    98.9% worst seen). The split is always the default one (``seed=0``), so every module's ``"digits"``
    val split stays held out; ``seed`` sets initialisation, data order and augmentation.

    Example::

        model, acc = train_digits_model(epochs=6, seed=0, threads=1)   # acc 0.9972
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be positive, got {epochs}")
    from tqdm.auto import tqdm

    # The default split (seed 0), whatever the training seed: every module's "digits" val split is then
    # truly held out from every digits model.
    train = resolve_source("digits", image_size=image_size, channels=CHANNELS, split="train")
    val = resolve_source("digits", image_size=image_size, channels=CHANNELS, split="val")
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsResNet(width=width)
        steps_per_epoch = len(train) // batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.2)
        model.train()
        for epoch in tqdm(range(epochs), desc="train digits", disable=not progress):
            loader = make_loader(train, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True,
                                 distributed=False)
            for x, y in loader:
                x = _shift(x, max_shift=max(1, image_size // 8))
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        acc = evaluate(model, val)
    log.info("digits model: %d epochs, validation accuracy %.2f%%", epochs, 100 * acc)
    return model.eval(), acc


def _shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` pixels (digits have empty borders)."""
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2)).tolist()
    return torch.stack([torch.roll(img, shifts=(dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on a labelled data set (items ``(image, label)``), in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    correct = total = 0
    with eval_mode(model):
        device = next(model.parameters()).device
        for x, y in make_loader(dataset, batch_size, shuffle=False, distributed=False):
            if (y < 0).any():
                raise DataError("accuracy needs labels; this data set has none")
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    if total == 0:
        raise DataError("cannot evaluate on an empty data set")
    return correct / total

"""Segmentation on real images: convert, distil per pixel, export with a dynamic size.

The task is made from scikit-learn's bundled handwritten digits (real scans, offline): each 8×8
digit is upscaled to ``--size``² and every pixel is labelled with the digit's class where there is
ink (value above 0.3 after scaling to [0, 1]) and with an 11th class, background, elsewhere. A small
fully convolutional network (an encoder at 1/4 resolution, bilinear upsampling, a full-resolution
skip path; it returns ``{"out": N × 11 × H × W}`` like torchvision's segmentation models) is trained
on a seeded 1,400 digits and scored on the other 397.

It is then converted at ``--ratio`` of its conv parameters with each init: (a) weight space, (b)
data-aware one-shot and (c) data-aware sequential, calibrated on 256 training digits. Each converted
model is scored on the held-out digits *before any fine-tuning*: pixel accuracy against the labels,
and per-pixel top-1 agreement and logit KL against the dense model (``measure_agreement``). The (c)
model is then distilled from the dense one per pixel (``finetune``, ``--ft-epochs``, on the training
digits without their labels) and scored again; finally it is exported with a dynamic height and
width (``export_onnx(..., dynamic_size=True)``) and onnxruntime is checked at a size the export never
saw.

Usage (results in the README, "Segmentation on digits")::

    python3 benchmarks/segmentation_digits.py --threads 2    # about 1.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import igc_convert as ic
from igc_convert.agreement import measure_agreement
from igc_convert.export import export_onnx
from igc_convert.finetune import FinetuneConfig, finetune

INK = 0.3
BACKGROUND = 10


def digit_masks(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised digits ``N × 1 × size × size`` and their per-pixel labels ``N × size × size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.where(x[:, 0] > INK, torch.as_tensor(digits.target)[:, None, None], torch.tensor(BACKGROUND))
    return (x - 0.3) / 0.4, labels


class FCN(nn.Module):
    """A small fully convolutional segmenter with torchvision's output convention."""

    def __init__(self, classes: int = 11, width: int = 32) -> None:
        super().__init__()

        def cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        w = width
        self.encoder = nn.Sequential(cbr(1, w), cbr(w, 2 * w, 2), cbr(2 * w, 2 * w), cbr(2 * w, 4 * w, 2),
                                     cbr(4 * w, 4 * w))
        self.up = nn.Sequential(nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False), cbr(4 * w, 2 * w))
        self.skip = cbr(1, w // 2)
        self.head = nn.Conv2d(2 * w + w // 2, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(torch.cat([self.up(self.encoder(x)), self.skip(x)], 1))}


def train_dense(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> FCN:
    torch.manual_seed(seed)
    model = FCN()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(x[batch])["out"], y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def pixel_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x)["out"].argmax(1) == y).double().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.25, help="conv-parameter ratio of the conversion (default 0.25)")
    p.add_argument("--size", type=int, default=24, help="image side (default 24)")
    p.add_argument("--epochs", type=int, default=12, help="epochs training the dense model (default 12)")
    p.add_argument("--ft-epochs", type=int, default=3, help="epochs of per-pixel distillation (default 3)")
    p.add_argument("--calib-images", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--augment", choices=("crop", "crop+flip"), help="augmentation while distilling (default none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, y = digit_masks(args.size)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    train, val = order[:1400], order[1400:]
    start = time.perf_counter()
    dense = train_dense(x[train], y[train], args.epochs, args.seed)
    print(f"dense FCN: pixel accuracy {pixel_accuracy(dense, x[val], y[val]):.4f} on {len(val)} held-out digits "
          f"(trained in {time.perf_counter() - start:.0f} s, {args.threads} threads)\n")
    calibration = [x[train[: args.calib_images]]]
    modes = {"(a) weight space": {}, "(b) data-aware": dict(calibration=calibration, sequential=False),
             "(c) data-aware, sequential": dict(calibration=calibration)}
    rows, sequential = [], None
    for name, kwargs in modes.items():
        start = time.perf_counter()
        result = ic.convert(dense, ic.ParamsRatio(args.ratio), example_inputs=x[:1], seed=args.seed,
                            progress=False, **kwargs)
        seconds = time.perf_counter() - start
        params = result.report.totals()["params_ratio"]
        rows.append((name, result.model, params, seconds, measure_agreement(dense, result.model, x[val])))
        sequential = result
    start = time.perf_counter()
    tuned = finetune(copy.deepcopy(sequential.model), x[train], teacher=dense, val_data=x[val],
                     config=FinetuneConfig(epochs=args.ft_epochs, lr=2e-3, seed=args.seed,
                                           augment=args.augment is not None, flip=args.augment == "crop+flip",
                                           progress=False))
    augmented = f", augmented ({args.augment})" if args.augment else ""
    rows.append((f"(c) + {args.ft_epochs} epochs distilled per pixel{augmented}", tuned.model, params,
                 time.perf_counter() - start, measure_agreement(dense, tuned.model, x[val])))

    print("| init | params | pixel accuracy | per-pixel agreement | per-pixel KL | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, model, params, seconds, agreement in rows:
        print(f"| {name} | {params:.3f} | {pixel_accuracy(model, x[val], y[val]):.4f} | "
              f"{agreement.top1:.4f} | {agreement.kl:.4f} | {seconds:.0f} s |")

    with tempfile.TemporaryDirectory() as folder:
        exported = export_onnx(tuned.model, Path(folder) / "seg.onnx", x[:1], dynamic_size=True)
        import onnxruntime as ort

        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        other = F.interpolate(x[val[:4]], size=(2 * args.size, 3 * args.size), mode="bilinear", align_corners=False)
        got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
        with torch.no_grad():
            ref = tuned.model(other)["out"].numpy()
        unseen = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"\nONNX ({exported.exporter}, dynamic height and width): parity {exported.rel_diff:.2g} at the sizes "
          f"checked, {unseen:.2g} at {2 * args.size}x{3 * args.size}, a size the export never saw")
    return 0


if __name__ == "__main__":
    sys.exit(main())

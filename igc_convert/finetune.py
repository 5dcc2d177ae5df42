"""Fine-tuning a converted model: distillation from the original, resumable, ``torchrun``-ready.

The student (the converted model) learns from

* the teacher's temperature-softened logits: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``;
* optionally, per converted block, the ORIGINAL conv's output on the block's own input: the teacher
  holds an ``nn.Conv2d`` at the block's qualified name, applied (no grad) to what the block receives,
  compared with the block's output as a relative squared error;
* optionally, cross-entropy on labels.

The init from the conversion is already good, so fine-tuning is gentle and guarded: the validation
split is evaluated before training and after every epoch, and the best state (the start included) is
what comes back — never something worse than the start. BatchNorm running statistics are frozen on
small data sets (their estimates from a few thousand images are worse than the pretrained ones).

Runs unchanged under ``torchrun --nproc_per_node N``: the process group is initialised from the
environment (nccl on GPU, gloo on CPU), the student is wrapped in ``DistributedDataParallel``, data is
sharded with ``DistributedSampler``, and only rank 0 writes checkpoints and shows progress.

Checkpoints (``torch.load(weights_only=True)``-safe) hold everything the trajectory depends on; the
data order is a pure function of ``(seed, epoch)``, so ``resume=True`` ends with exactly the weights an
uninterrupted run would have.

Example::

    result = finetune(converted, train_set, teacher=original, val_data=val_set,
                      config=FinetuneConfig(epochs=3, lr=5e-4, checkpoint_dir="ckpt"))
    result.model, result.best
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .agreement import class_logits, kl_and_top1, top1_same
from .blocks import conv_forward
from .data import (MASK_IGNORE, SourceDataset, WithoutLabels, collate, first_image, has_labels, make_loader,
                   resolve_source)
from .errors import CheckpointError, ConfigError, DataError, IGCError, ModelError, one_line
from .features import FeatureDistiller
from .files import atomic_write, check_creatable_folder, make_folder, remove_stale_temporaries
from .linear import linear_site
from .modes import as_input, eval_mode, require_module

log = logging.getLogger(__name__)

Tensor = torch.Tensor
CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "igc-convert-finetune-checkpoint"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("adamw", "sgd")
DISTIL = ("auto", "logits", "features")
#: The default learning rates (``FinetuneConfig.lr=None``) of logit and of feature distillation. A
#: data-aware start of a detector is close to its best layer outputs: at 5e-4 (and 1e-3) every epoch
#: was worse than the start and the start was kept; at 1e-4 the error fell
#: (benchmarks/detection_distil.py).
DEFAULT_LR = {"logits": 5e-4, "features": 1e-4}
GENTLE_LR = 1e-3       # below this (or with BatchNorm statistics frozen), a far start gets a hint
FAR_AGREEMENT = 0.9    # top-1 agreement with the teacher under which a start counts as far


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that shapes a fine-tuning run (validated once, on construction).

    Loss weights: ``kd_weight`` (distillation, needs a teacher), ``feature_weight`` (per-block
    matching against the teacher's original convs), ``ce_weight`` (cross-entropy, needs labels).
    ``distil`` is what distillation matches: ``"logits"`` (the class logits, KL at ``temperature``),
    ``"features"`` (every converted layer's output against the original layer's, each model on its
    own activations, :mod:`igc_convert.features`: for detectors and other models without class
    logits; the student then trains in eval mode, BatchNorm statistics kept) or ``"auto"`` (logits
    when the model's outputs are class logits, else features; an embedding is not class logits:
    :func:`embedding_reason`).
    ``lr=None`` is :data:`DEFAULT_LR` of the distillation: 5e-4 (logits), 1e-4 (features).
    ``freeze_bn=None`` freezes BatchNorm statistics when the training set has fewer than
    ``small_dataset`` images. ``checkpoint_every`` (steps, 0 = epoch ends only) applies when
    ``checkpoint_dir`` is set. ``warmup`` is the fraction of steps with a linear warm-up before the
    cosine decay to ``min_lr · lr``. ``amp`` mixed precision applies on CUDA only.

    ``augment`` draws a random resized crop (8–100% of the area, aspect 3:4–4:3, resized back) and,
    with ``flip``, a horizontal flip for each training image at each step, masks alike (nearest); the
    teacher labels the very image the student sees, so distillation stays consistent. Turn ``flip``
    off for data that is not mirror-symmetric (digits, text).

    ``temperature`` defaults to 1: a converted model is a much weaker student than its teacher, and
    softer targets (Hinton's T = 4) spend its few steps on the teacher's small logits. On a dev split
    carved from the digits training images (4 seeds each), T = 1 beat T = 4 at every budget tried:
    0.05 of the conv parameters 97.5 vs 96.5% (IGCV1) and 98.4 vs 97.2% (auto); 0.25: 99.5 vs 99.3%;
    0.1: equal (see docs/results/digits_e2e.md).

    >>> FinetuneConfig(epochs=2, lr=1e-3).epochs
    2
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup: float = 0.05
    min_lr: float = 0.0
    clip_grad_norm: float | None = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0
    feature_weight: float = 0.0
    ce_weight: float = 0.0
    distil: str = "auto"
    freeze_bn: bool | None = None
    small_dataset: int = 5000
    seed: int = 0
    augment: bool = False
    flip: bool = True
    amp: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    num_workers: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"fine-tune option {field}={getattr(self, field)!r}: {why}")

        for field in ("epochs", "batch_size", "small_dataset"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(field, "must be a positive integer")
        for field in ("checkpoint_every", "num_workers", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(field, "must be a non-negative integer")
        for field in ("lr", "temperature"):
            value = getattr(self, field)
            if not (field == "lr" and value is None) and not (math.isfinite(value) and value > 0):
                raise bad(field, "must be a positive number" + (" or None" if field == "lr" else ""))
        for field in ("weight_decay", "kd_weight", "feature_weight", "ce_weight"):
            if not (math.isfinite(getattr(self, field)) and getattr(self, field) >= 0):
                raise bad(field, "must be a non-negative number")
        for field in ("momentum", "warmup", "min_lr"):
            if not 0 <= getattr(self, field) <= 1:
                raise bad(field, "must be in [0, 1]")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0):
            raise bad("clip_grad_norm", "must be positive or None")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"choose from {OPTIMIZERS}")
        if self.distil not in DISTIL:
            raise bad("distil", f"choose from {DISTIL}")
        if self.kd_weight + self.feature_weight + self.ce_weight == 0:
            raise ConfigError("every loss weight is 0 (kd_weight, feature_weight, ce_weight): nothing to learn")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir (where the checkpoint to resume is)")
        if self.checkpoint_dir is not None:  # before minutes of training, not at the first save
            check_creatable_folder(self.checkpoint_dir, "checkpoint folder")

    def trajectory(self) -> dict[str, Any]:
        """The options the weights depend on: a resumed run must use the same ones."""
        skip = {"checkpoint_dir", "checkpoint_every", "resume", "progress", "num_workers", "device"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclass(frozen=True)
class Evaluation:
    """Validation figures after ``epoch`` epochs (0 = the start). ``metric`` names the one that ranks.

    ``accuracy`` (top-1 vs labels) and ``loss`` (cross-entropy) need labels; ``agreement`` (top-1 equal
    to the teacher's) and ``kl`` (KL from the teacher at T=1) need a teacher. ``feature_error`` (feature
    distillation: the mean over converted layers of ``‖ŷ − y‖² / ‖y‖²``, each model on its own
    activations) ranks lowest first.
    """

    epoch: int
    count: int
    metric: str
    accuracy: float | None = None
    agreement: float | None = None
    kl: float | None = None
    loss: float | None = None
    feature_error: float | None = None

    @property
    def value(self) -> float:
        return getattr(self, self.metric)

    def key(self) -> tuple[float, float]:
        """Ranking key (higher is better): the metric first, then the lower KL (or loss) to break ties."""
        if self.metric == "feature_error":
            return (-self.value, 0.0)
        tie = self.kl if self.kl is not None else self.loss
        return (self.value, -tie if tie is not None else 0.0)

    def summary(self) -> str:
        names = ("accuracy", "agreement", "kl", "loss", "feature_error")
        parts = [f"{name} {getattr(self, name):.4f}" for name in names if getattr(self, name) is not None]
        return ", ".join(parts)

    @classmethod
    def from_feature_sums(cls, sums: Tensor, epoch: int) -> Evaluation:
        """The feature error of ``_feature_sums``' totals (summed over processes where there are several)."""
        count = int(sums[0].item())
        return cls(epoch=epoch, count=count, metric="feature_error",
                   feature_error=sums[1].item() / count if count else None)

    @classmethod
    def from_sums(cls, sums: Tensor, epoch: int, metric: str, *, with_teacher: bool) -> Evaluation:
        """The figures of :func:`score_sums`' totals (summed over processes where there are several)."""
        count, labelled = sums[0].item(), sums[1].item()
        return cls(epoch=epoch, count=int(count), metric=metric,
                   accuracy=sums[2].item() / labelled if labelled else None,
                   agreement=sums[3].item() / count if with_teacher and count else None,
                   kl=sums[4].item() / count if with_teacher and count else None,
                   loss=sums[5].item() / labelled if labelled else None)


def score(model: nn.Module, data: Dataset, teacher: nn.Module | None = None, *, batch_size: int = 64,
          device: torch.device | str = "cpu", progress: str | None = None) -> Evaluation:
    """``model``'s figures on ``data``: top-1 accuracy and cross-entropy against its labels (pixel
    accuracy for class masks), top-1 agreement and KL against ``teacher`` (the original model). A
    model without class logits (a detector) gets its feature error against ``teacher`` instead: the
    mean over its converted layers of ``‖ŷ − y‖² / ‖y‖²``, each model on its own activations.

    Labels that cannot be the model's classes (a folder of 10 classes for a 1000-class model) are left
    out with a warning, as in :func:`finetune`. :class:`DataError` when there is nothing to score against.

    >>> from igc_convert.digits import digits_resnet
    >>> data = resolve_source("digits", image_size=12, channels=1, split="val", samples=8)
    >>> score(digits_resnet(), data).count
    8
    """
    require_module(model)
    if teacher is not None:
        require_module(teacher, "teacher")
    data = _as_dataset(data, "data")  # a list or tensor as finetune takes it: its labels are then seen
    if not has_labels(data) and teacher is None:
        raise DataError(f"{getattr(data, 'source', type(data).__name__)} has no labels and there is no original "
                        "model to compare with: nothing to score against")
    try:
        shape = _logit_shape(model, data)
    except ModelError:
        pairs = _feature_pairs(model, teacher) if teacher is not None else {}
        if not pairs:
            raise
        distiller = FeatureDistiller(model, teacher, pairs, first_image(data).unsqueeze(0))
        try:
            sums = _feature_sums(distiller, data, batch_size=batch_size, indices=None, device=device,
                                 num_workers=0, autocast=contextlib.nullcontext, progress=progress)
        finally:
            distiller.remove()
        return Evaluation.from_feature_sums(sums, 0)
    if has_labels(data) and not _labels_fit(shape, data, None, teach=False, ignored="no accuracy is given"):
        if teacher is None:
            raise DataError("the labels cannot be the model's classes and there is no original model to compare "
                            "with: nothing to score against")
        data = WithoutLabels(data)
    sums = score_sums(model, data, teacher, batch_size=batch_size, device=device, progress=progress)
    return Evaluation.from_sums(sums, 0, "accuracy" if has_labels(data) else "agreement",
                                with_teacher=teacher is not None)


@torch.no_grad()
def score_sums(model: nn.Module, data: Dataset, teacher: nn.Module | None = None, *, batch_size: int = 64,
               indices: Sequence[int] | None = None, device: torch.device | str = "cpu", num_workers: int = 0,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               progress: str | None = None) -> Tensor:
    """Totals of ``model``'s figures on ``data`` (its items at ``indices``, default all), in float64:
    ``[images, labelled images, correct, agreeing with the teacher, KL from the teacher, cross-entropy]``.

    Labels are classes or ``H×W`` masks (pixels scored, each image once with its share); without a
    teacher the agreement and KL stay 0. Both models run in eval mode, and every module gets its own
    train/eval flag back after. ``progress``: a tqdm bar of batches on stderr with this description.
    """
    sums = torch.zeros(6, dtype=torch.float64)
    loader = _scoring_loader(data, batch_size, indices, num_workers, progress)
    with eval_mode(model, *([teacher] if teacher is not None else [])):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast():
                s = _logits(model(as_input(x, model)), "student")
                t = _logits(teacher(as_input(x, teacher)), "teacher") if teacher is not None else None
            s = s.float()
            sums[0] += len(x)
            labelled, correct, ce = _label_scores(_at_label_size(s, y), y)
            sums[1] += labelled
            sums[2] += correct
            sums[5] += ce
            if t is not None:
                kl, same = kl_and_top1(t.float(), s)
                sums[3] += same
                sums[4] += kl
    return sums


def _scoring_loader(data: Dataset, batch_size: int, indices: Sequence[int] | None, num_workers: int,
                    progress: str | None) -> Iterable:
    """``data``'s items at ``indices`` (default all) in order, in batches; with ``progress``, under a
    tqdm bar of batches on stderr with that description."""
    # A generator of its own: the loader draws a seed from it even without workers, and must not draw
    # it from the global stream that training (and an exact resume) follows.
    loader = DataLoader(data, batch_size=batch_size, sampler=range(len(data)) if indices is None else indices,
                        num_workers=num_workers, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    if progress is None:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=progress, unit="batch", file=sys.stderr, leave=False)


@torch.no_grad()
def _feature_sums(distiller: FeatureDistiller, data: Dataset, *, batch_size: int, indices: Sequence[int] | None,
                  device: torch.device | str, num_workers: int,
                  autocast: Callable[[], contextlib.AbstractContextManager], progress: str | None = None) -> Tensor:
    """``[images, Σ images · feature error]`` of the distiller's student on ``data`` (eval mode, float64)."""
    sums = torch.zeros(2, dtype=torch.float64)
    loader = _scoring_loader(data, batch_size, indices, num_workers, progress)
    with eval_mode(distiller.student.model, distiller.teacher.model):
        for x, _ in loader:
            x = x.to(device)
            with autocast():
                error = distiller.loss(x)
            if error is not None:
                sums[0] += len(x)
                sums[1] += len(x) * float(error)
    return sums


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns: the student holding its best state, and how it got there.

    ``history`` has one :class:`Evaluation` per epoch, the start first (empty without validation
    data); ``best`` is the one whose state ``model`` holds (``None`` without validation data).
    ``lr`` is the peak learning rate used (``FinetuneConfig.lr``, or its default for the distillation).
    """

    model: nn.Module
    history: tuple[Evaluation, ...]
    best: Evaluation | None
    steps: int
    resumed_from_step: int | None = None
    lr: float | None = None

    @property
    def start(self) -> Evaluation | None:
        return self.history[0] if self.history else None


# ------------------------------------------------------------------------------------ entry point
def finetune(student: nn.Module, data: Any, *, teacher: nn.Module | None = None, val_data: Any = None,
             config: FinetuneConfig | None = None, on_step: Callable[[int], None] | None = None,
             **options: Any) -> FinetuneResult:
    """Fine-tune ``student`` (in place) on ``data``, distilling from ``teacher``; return the best state.

    ``data``/``val_data``: a data set from :func:`igc_convert.data.resolve_source` or any Python
    object it accepts (Dataset, DataLoader, tensor, iterable of tensors or ``(x, y)`` pairs).
    ``config`` (default ``FinetuneConfig()``) shapes the run; ``options`` are any of its fields,
    which override it (``epochs=3, lr=1e-3``). ``on_step(step)`` is called after every optimiser
    step (and its checkpoint), e.g. to stop early by raising. The caller's RNG states are restored on
    return.

    Example::

        result = finetune(student, train, teacher=teacher, val_data=val, epochs=1)
        assert result.best.value >= result.start.value   # never worse than the start
    """
    require_module(student, "student")
    if teacher is not None:
        require_module(teacher, "teacher")
    config = _with_options(FinetuneConfig() if config is None else config, options)
    train_set = _as_dataset(data, "data")
    val_set = _as_dataset(val_data, "val_data") if val_data is not None else None
    _check_sources(config, teacher, train_set, val_set)
    shape = _logit_shape_unless_features(config, student, teacher, train_set)
    features = shape is None
    if features:
        if config.ce_weight > 0:
            raise ConfigError("labels teach class logits, which this fine-tuning does not use (distil='features'): "
                              "fine-tune by distillation alone (ce_weight=0; on the CLI, without --labels)")
        if has_labels(train_set) or (val_set is not None and has_labels(val_set)):
            log.info("the data's labels are not used: feature distillation matches the teacher's layers")
        train_set, val_set = WithoutLabels(train_set), (WithoutLabels(val_set) if val_set is not None else None)
    elif not _labels_fit(shape, train_set, val_set, teach=config.ce_weight > 0):
        train_set, val_set = WithoutLabels(train_set), (WithoutLabels(val_set) if val_set is not None else None)
    pairs = _feature_pairs(student, teacher) if features or config.feature_weight > 0 else {}
    if features and not pairs:
        raise ModelError("feature distillation matches converted (IGC) blocks, and the student has none")
    if config.feature_weight > 0 and not pairs:
        log.warning("feature_weight > 0 but the student has no converted (IGC) blocks: no feature loss")
    blocks, distilled = (pairs if config.feature_weight > 0 else {}), (pairs if features else {})
    with _preserved_rng(), _distributed(config) as ctx:
        trainer = _Trainer(student, teacher, train_set, val_set, config, ctx, blocks, on_step, distilled)
        try:
            return trainer.run()
        finally:
            trainer.close()


def _with_options(config: FinetuneConfig, options: Mapping[str, Any]) -> FinetuneConfig:
    """``config`` with ``options`` (field name → value) in place of its own values, validated anew."""
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"finetune() got unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"it takes teacher, val_data, config, on_step and FinetuneConfig's fields: "
                          f"{', '.join(sorted(fields))}")
    return dataclasses.replace(config, **options) if options else config


def is_main_process() -> bool:
    """True on rank 0 of a distributed run (also before/after the process group exists) or when alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> Path:
    """Where a run with this ``checkpoint_dir`` keeps its (single, atomically replaced) checkpoint."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a fine-tuning checkpoint safely (``weights_only=True``); :class:`CheckpointError` if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {str(path)!r}") from None
    except Exception as err:  # truncated, tampered, or not a torch file: one clear error
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an igc-convert fine-tuning checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {ckpt.get('version')!r}; "
                              f"this igc-convert reads version {CHECKPOINT_VERSION}")
    return ckpt


# ------------------------------------------------------------------------------------- checks
def _as_dataset(data: Any, what: str) -> Dataset:
    if isinstance(data, (str, os.PathLike)):
        raise ConfigError(f"{what}={os.fspath(data)!r}: resolve named sources and folders first with "
                          "igc_convert.data.resolve_source(source, image_size=..., channels=...)")
    return resolve_source(data, channels=None)


def _check_sources(cfg: FinetuneConfig, teacher: nn.Module | None, train: Dataset, val: Dataset | None) -> None:
    labelled = has_labels(train)
    if teacher is None:
        if cfg.ce_weight == 0:
            raise ConfigError("without a teacher only labels can teach the student: set ce_weight > 0 "
                              "(and give labelled data)")
        if cfg.feature_weight > 0:
            raise ConfigError("feature_weight > 0 matches the teacher's convs: it needs a teacher")
    if cfg.ce_weight > 0 and not labelled:
        raise DataError(f"ce_weight={cfg.ce_weight} needs labels, but the training data "
                        f"({getattr(train, 'source', type(train).__name__)}) has none")
    if val is not None and not has_labels(val) and teacher is None:
        raise DataError("the validation data has no labels and there is no teacher to compare with")


def _labels_fit(shape: tuple[int, ...], train: Dataset, val: Dataset | None, *, teach: bool,
                ignored: str = "the teacher's agreement picks the best epoch") -> bool:
    """Whether the data's labels can be the classes of a model whose logits have ``shape``.

    A folder's labels number its sorted class sub-folders: they index a model's outputs only when the
    folder has exactly as many classes (ImageNet's synset folders for an ImageNet model). Else they
    cannot teach (:class:`DataError` when they are to, ``teach``) and must not pick the best epoch (top-1
    against them is 0 or chance whatever the student learns, so the start state would always be kept):
    they are hidden, with a warning, and the teacher's agreement picks.
    """
    labelled = [d for d in (train, val) if d is not None and has_labels(d)]
    per_pixel = len(shape) == 4
    wrong = [d for d in labelled if getattr(d, "per_pixel", False) != per_pixel]
    if wrong:  # one label per image cannot train or score per-pixel classes, nor a mask an image's class
        source = getattr(wrong[0], "source", "the data")
        message = (f"{source} has one label per image, but the model classifies each pixel ({shape[1]} classes)"
                   if per_pixel else f"{source} has class masks, but the model classifies whole images")
        if teach:
            raise DataError(f"{message}; fine-tune by distillation alone (ce_weight=0; on the CLI, without "
                            "--labels)")
        log.warning("%s; the labels are ignored: %s", message, ignored)
        return False
    if per_pixel:  # class masks: their values are checked against the classes batch by batch
        return True
    outputs = shape[1]
    for data in labelled:
        count = data.num_classes() if isinstance(data, SourceDataset) else None
        targets = data.targets() if isinstance(data, SourceDataset) else None
        top = int(targets.max()) + 1 if targets is not None and len(targets) else 0
        if (count is None or count == outputs) and top <= outputs:
            continue
        what = f"{count} classes" if count is not None else f"labels up to {top - 1}"
        message = (f"the labels of {getattr(data, 'source', 'the data')} index {what}, but the model has {outputs} "
                   "outputs: they cannot be its classes")
        if teach:
            raise DataError(f"{message}; give the model a head for these classes first, or fine-tune by "
                            "distillation alone (ce_weight=0; on the CLI, without --labels)")
        log.warning("%s; they are ignored: %s", message, ignored)
        return False
    return True


def _logit_shape(model: nn.Module, data: Dataset) -> tuple[int, ...]:
    """The shape of the model's logits for one item of ``data`` (a :class:`ModelError` before any training
    when its output has none)."""
    x = first_image(data).unsqueeze(0)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(as_input(x, model))
    except IGCError:
        raise
    except Exception as err:  # the model ran in conversion: the images are the likelier culprit
        source = getattr(data, "source", type(data).__name__)
        raise DataError(f"the model fails on the images of {source}, of shape {tuple(x.shape[1:])} (its input "
                        f"channels and size?): {type(err).__name__}: {one_line(err)}") from err
    return tuple(_logits(out, "student").shape)


def has_class_logits(model: nn.Module, data: Dataset) -> bool:
    """Whether ``model``'s output for an item of ``data`` holds class logits (not a detector's boxes)."""
    try:
        _logit_shape(model, data)
    except ModelError:
        return False
    return True


def _logits(out: Any, which: str) -> Tensor:
    """The class logits fine-tuning distils from a model output (:func:`~igc_convert.agreement.class_logits`)."""
    return class_logits(out, "fine-tuning", f"the {which}")


def _feature_pairs(student: nn.Module, teacher: nn.Module | None) -> dict[str, nn.Conv2d | nn.Linear]:
    """Map each converted block's qualified name to the teacher's original layer at the same name.

    A converted ``nn.Linear`` (``convert(..., linear=True)``) sits at ``<linear>.conv`` in the student,
    inside the wrapper that feeds it ``N × C × 1 × 1``; its original is the teacher's Linear at ``<linear>``.
    """
    pairs: dict[str, nn.Conv2d | nn.Linear] = {}
    teacher_modules = dict(teacher.named_modules()) if teacher is not None else {}
    for name, module in student.named_modules():
        # Detected by the class attribute, so this module needs no import of the blocks module.
        if not getattr(type(module), "is_igc_block", False):
            continue
        original = teacher_modules.get(name)
        if original is None and teacher is not None:  # a converted Linear: its site is <linear>.conv
            original = linear_site(teacher, name)
        if not isinstance(original, (nn.Conv2d, nn.Linear)):
            found = "nothing" if original is None else type(original).__name__
            raise ModelError(f"feature matching needs the original nn.Conv2d (or nn.Linear) in the teacher at "
                             f"this name; found {found}", layer=name)
        pairs[name] = original
    return pairs


def _logit_shape_unless_features(cfg: FinetuneConfig, student: nn.Module, teacher: nn.Module | None,
                                 train: Dataset) -> tuple[int, ...] | None:
    """The student's logit shape (:func:`_logit_shape`), or None when distillation matches the converted
    layers' outputs instead (``cfg.distil``; ``"auto"``: when the student's outputs are not class logits)."""
    if cfg.distil == "features":
        if teacher is None:
            raise ConfigError("distil='features' matches the teacher's layers: it needs a teacher")
        return None
    try:
        shape = _logit_shape(student, train)
    except ModelError as err:
        if cfg.distil == "logits" or teacher is None:
            raise
        log.info("%s; fine-tuning distils the converted layers' outputs instead (distil='features')", err)
        return None
    if cfg.distil == "auto" and teacher is not None and cfg.ce_weight == 0 and len(shape) == 2:
        why = embedding_reason(student, first_image(train).unsqueeze(0))
        if why:
            log.info("the student's output is an embedding, not class logits (%s): fine-tuning distils the "
                     "converted layers' outputs instead (distil='features'; distil='logits' overrides)", why)
            return None
    return shape


def embedding_reason(model: nn.Module, x: Tensor) -> str | None:
    """Why ``model``'s ``N × D`` output on ``x`` is an embedding rather than class logits, or None.

    Softmax distillation suits class logits only. An output counts as an embedding when the model says
    it has no classes (timm's ``num_classes == 0``), when the last module called is an ``nn.Identity``
    that hands it out (a classifier removed, ``model.fc = nn.Identity()``), or when every row has
    unit length (``F.normalize``). Anything else counts as logits: SqueezeNet's come out of a pooling
    layer, and a projection head's embedding out of a Linear, alike.

    >>> import torchvision
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> embedding_reason(net, torch.zeros(1, 3, 32, 32)) is None
    True
    >>> net.fc = nn.Identity()
    >>> embedding_reason(net, torch.zeros(1, 3, 32, 32))
    "the classifier 'fc' is nn.Identity"
    """
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and not isinstance(classes, bool) and classes == 0:
        return "num_classes is 0"
    names = {m: n for n, m in model.named_modules()}
    last: list[tuple[nn.Module, Any]] = []

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        last[:] = [(module, out)]  # only the latest leaf's output stays referenced

    handles = [m.register_forward_hook(record) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad(), eval_mode(model):
            out = _logits(model(as_input(x, model)), "student")
    finally:
        for h in handles:
            h.remove()
    if out.dim() != 2:
        return None
    if out.shape[1] > 1 and torch.allclose(out.double().norm(dim=1), torch.ones(len(out), dtype=torch.float64),
                                           rtol=0, atol=1e-4):
        return "its rows have unit length"
    if last:
        module, made = last[0]
        if (isinstance(module, nn.Identity) and torch.is_tensor(made)
                and made.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()):
            return f"the classifier '{names[module]}' is nn.Identity"
    return None


# ------------------------------------------------------------------------------------ distribution
@dataclass(frozen=True)
class _Context:
    world: int
    rank: int
    device: torch.device
    created_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def _distributed(cfg: FinetuneConfig) -> Iterator[_Context]:
    """Join the process group ``torchrun`` describes in the environment (and leave it at the end)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device is not None:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    try:
        yield _Context(world, rank, device, created)
        if created:
            # Every rank tears the group down together: rank 0 may still be writing its checkpoint,
            # and a gloo rank that destroyed its group first aborted now and then ("terminate called
            # without an active exception", SIGABRT; 2 of 30 torchrun test runs here). Not on
            # an error: a peer may be stuck in a collective, and the barrier would hang.
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------ RNG states
def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
        "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Seeding for the run must not leak: the caller's RNG states come back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------------ training
class _Trainer:
    """One fine-tuning run; split into steps so each fact (order, checkpoint, best state) has one home."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, train: Dataset, val: Dataset | None,
                 cfg: FinetuneConfig, ctx: _Context, blocks: dict[str, nn.Conv2d],
                 on_step: Callable[[int], None] | None, pairs: dict[str, nn.Module] | None = None) -> None:
        self.student, self.teacher, self.train_set, self.val_set = student, teacher, train, val
        self.cfg, self.ctx, self.blocks, self.on_step = cfg, ctx, blocks, on_step
        self.home = next((p.device for p in student.parameters()), torch.device("cpu"))
        self.teacher_home = next((p.device for p in teacher.parameters()), torch.device("cpu")) if teacher else None
        self.teacher_was_training = teacher.training if teacher is not None else False
        self.freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else len(train) < cfg.small_dataset
        self.metric = "accuracy" if val is not None and has_labels(val) else "agreement"
        self.distiller: FeatureDistiller | None = None
        if pairs:
            self.distiller = FeatureDistiller(student, teacher, pairs, first_image(train).unsqueeze(0).to(self.home))
            self.metric, self.freeze_bn = "feature_error", True
            if cfg.freeze_bn is False and ctx.main:
                log.warning("feature distillation runs the student in eval mode: BatchNorm statistics stay as "
                            "they are (freeze_bn=False is not followed)")
        self.lr = cfg.lr if cfg.lr is not None else DEFAULT_LR["features" if self.distiller else "logits"]
        # Mixed precision on CUDA only: bf16 where supported (no scaler needed), else fp16 + GradScaler.
        self.amp_dtype: torch.dtype | None = None
        if cfg.amp and ctx.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.ckpt_path = checkpoint_path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
        self.skipped = 0

    def close(self) -> None:
        """Take the feature distillation's hooks off both models."""
        if self.distiller is not None:
            self.distiller.remove()

    # -- small helpers ---------------------------------------------------------------------------
    def info(self, msg: str, *args: Any) -> None:
        if self.ctx.main:  # one voice in a distributed run
            log.info(msg, *args)

    def hint_if_far(self, start: Evaluation) -> None:
        """Warn when the start is far from the teacher but the settings are the gentle ones.

        The defaults (frozen BatchNorm on small data, a small learning rate) protect a good init; a heavily
        compressed one barely moves under them (digits at 0.05 of the conv parameters: 75.5% after 3
        epochs, 98.6% with lr 1e-2, batches of 16 and live BatchNorm statistics).
        """
        gentle = self.freeze_bn or self.lr < GENTLE_LR
        if self.ctx.main and gentle and start.agreement is not None and start.agreement < FAR_AGREEMENT:
            log.warning("the student starts far from the teacher (top-1 agreement %.1f%% on the validation data) "
                        "but fine-tunes gently (lr %g, BatchNorm statistics %s): for heavy compression on small data "
                        "try lr 1e-2, batch size 16 and live BatchNorm statistics (--lr 1e-2 --batch-size 16 "
                        "--bn live)", 100 * start.agreement, self.lr, "frozen" if self.freeze_bn else "updated")

    def train_mode(self) -> None:
        if self.distiller is not None:
            # A detector's training mode wants box targets, and the teacher's activations are matched
            # in eval mode: the student trains in eval mode (its parameters still learn).
            self.student.eval()
            return
        self.student.train()
        if self.freeze_bn:  # eval mode = use and keep the running statistics; affine params still learn
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def loader(self, epoch: int, skip: int = 0) -> DataLoader:
        shard = math.ceil(len(self.train_set) / self.ctx.world)
        return make_loader(self.train_set, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch,
                           skip_batches=skip, drop_last=shard >= self.cfg.batch_size,
                           distributed=self.ctx.world > 1, num_workers=self.cfg.num_workers)

    def run_fingerprint(self) -> dict[str, Any]:
        run = self.cfg.trajectory()
        run.update(world_size=self.ctx.world, train_size=len(self.train_set),
                   val_size=len(self.val_set) if self.val_set is not None else 0, freeze_bn=self.freeze_bn,
                   teacher=self.teacher is not None, feature_blocks=sorted(self.blocks))
        return run

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        cfg, ctx = self.cfg, self.ctx
        ckpt = self.read_checkpoint() if cfg.resume else None
        if ckpt is None and self.ckpt_path is not None and self.ckpt_path.exists() and ctx.main:
            log.warning("starting a new run: %s will be replaced (resume=True continues it instead)", self.ckpt_path)
        if self.ckpt_path is not None and ctx.main:
            for stale in remove_stale_temporaries(self.ckpt_path):  # a run killed mid-write left it
                log.warning("removed %s, a checkpoint write that never finished", stale)
        _seed_all(cfg.seed + ctx.rank)
        student = self.student.to(ctx.device)
        if self.teacher is not None:
            self.teacher.to(ctx.device).eval()
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        if self.distiller is not None:
            self.info("distilling the outputs of %d converted layers (%d calls per forward) from the teacher's; "
                      "the student trains in eval mode", len(set(self.distiller.student.labels)), self.distiller.calls)
        elif has_bn and cfg.freeze_bn is None:
            self.info("BatchNorm running statistics %s: %d training images %s %d (freeze_bn=%s to change)",
                      "frozen" if self.freeze_bn else "updated", len(self.train_set),
                      "<" if self.freeze_bn else ">=", cfg.small_dataset, not self.freeze_bn)
        elif has_bn:
            self.info("BatchNorm running statistics %s (freeze_bn=%s)", "frozen" if self.freeze_bn else "updated",
                      self.freeze_bn)
        steps_per_epoch = len(self.loader(0))
        if steps_per_epoch == 0:
            raise DataError("the training data gives no batch")
        total = cfg.epochs * steps_per_epoch
        opt = self.make_optimizer()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup, cfg.min_lr))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        history: list[Evaluation] = []
        best_state: dict[str, Tensor] | None = None
        best: Evaluation | None = None
        step, epoch, skip = 0, 0, 0
        if ckpt is not None:
            student.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            step, epoch, skip = ckpt["step"], ckpt["epoch"], ckpt["batch"]
            history = [Evaluation(**e) for e in ckpt["history"]]
            if ckpt["best"] is not None:
                best, best_state = Evaluation(**ckpt["best"]["evaluation"]), ckpt["best"]["state"]
            self.info("resuming from %s: epoch %d, step %d/%d", self.ckpt_path, epoch + 1, step, total)
        elif self.val_set is not None:
            best = self.evaluate(0)
            history.append(best)
            best_state = _cpu_state(student)
            self.info("start: %s", best.summary())
            self.hint_if_far(best)
        else:
            self.info("no validation data: the final weights are returned (give val_data to keep the best)")

        # Feature distillation runs the student up to its last converted layer, returning their outputs.
        model: nn.Module = student if self.distiller is None else self.distiller.student_outputs
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # (with feature distillation, the parameters after the last converted layer get no gradient)
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                            find_unused_parameters=self.distiller is not None)
        if ckpt is not None:  # last, so that nothing set up above draws from the restored streams
            _set_rng_state(ckpt["rng"][ctx.rank], ctx.device)  # one per rank (same world size: checked)

        hooks = _FeatureHooks(self.blocks, student) if self.blocks else None
        self.state = dict(opt=opt, sched=sched, scaler=scaler)
        resumed_from = step if ckpt is not None else None
        try:
            from tqdm.auto import tqdm

            for epoch in range(epoch, cfg.epochs):
                self.train_mode()
                bar = tqdm(self.loader(epoch, skip), total=steps_per_epoch, initial=skip, file=sys.stderr,
                           desc=f"fine-tune {epoch + 1}/{cfg.epochs}", disable=not (ctx.main and cfg.progress),
                           dynamic_ncols=True, leave=False)
                seen = hits = 0
                batch = skip
                for x, y in bar:
                    loss, n_hit = self.train_step(model, hooks, x, y)
                    seen, hits, step, batch = seen + len(x), hits + n_hit, step + 1, batch + 1
                    bar.set_postfix(dict(loss=f"{loss:.4f}") if self.distiller is not None else
                                    dict(loss=f"{loss:.4f}", acc=f"{hits / max(seen, 1):.3f}"), refresh=False)
                    if (self.ckpt_path is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                            and batch < steps_per_epoch):  # the epoch-end checkpoint follows anyway
                        self.save(student, step, epoch, batch, history, best, best_state)
                    if self.on_step is not None:
                        self.on_step(step)
                bar.close()
                skip = 0
                if self.val_set is not None:
                    current = self.evaluate(epoch + 1)
                    history.append(current)
                    improved = current.key() > best.key()
                    if improved:
                        best, best_state = current, _cpu_state(student)
                    self.info("epoch %d/%d: %s%s", epoch + 1, cfg.epochs, current.summary(),
                              " (best so far)" if improved else f" (best: epoch {best.epoch})")
                if self.ckpt_path is not None:
                    self.save(student, step, epoch + 1, 0, history, best, best_state)
        finally:
            if hooks is not None:
                hooks.remove()
        if best_state is not None:
            student.load_state_dict(best_state)
            if best.epoch == 0:
                self.info("kept the start state: no epoch beat it (%s %.4f)", self.metric, best.value)
            else:
                self.info("kept the state after epoch %d (%s %.4f; start %.4f)", best.epoch, self.metric,
                          best.value, history[0].value)
        student.eval().to(self.home)
        if self.teacher is not None:
            self.teacher.to(self.teacher_home).train(self.teacher_was_training)
        return FinetuneResult(student, tuple(history), best, step, resumed_from, self.lr)

    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ModelError("the student has no trainable parameters")
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.cfg.weight_decay)

    def train_step(self, model: nn.Module, hooks: "_FeatureHooks | None", x: Tensor, y: Tensor) -> tuple[float, float]:
        cfg, dev = self.cfg, self.ctx.device
        opt, sched, scaler = self.state["opt"], self.state["sched"], self.state["scaler"]
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if cfg.augment:
            x, y = augment_batch(x, y, flip=cfg.flip)
        logits = t_logits = distilled = None
        with self.autocast():
            if hooks is not None:
                hooks.recording = True
            if self.distiller is not None:
                distilled = self.distiller.loss(x, model)
            else:
                logits = _logits(model(as_input(x, self.student)), "student")
            if hooks is not None:
                hooks.recording = False
            if self.teacher is not None and logits is not None:
                with torch.no_grad():
                    t_logits = _logits(self.teacher(as_input(x, self.teacher)), "teacher")
        loss = torch.zeros((), device=dev)
        if distilled is not None:
            loss = loss + cfg.kd_weight * distilled.float()
        scored = None  # the logits as the labels score them (class masks: at their size)
        if logits is not None:
            logits = logits.float()
            scored = _at_label_size(logits, y)
            if t_logits is not None and cfg.kd_weight > 0:
                loss = loss + cfg.kd_weight * _kd_loss(logits, t_logits.float(), cfg.temperature)
        if hooks is not None:
            loss = loss + cfg.feature_weight * hooks.loss()
        labelled = y >= 0
        if scored is not None and cfg.ce_weight > 0 and labelled.any():
            # the mean over labelled images, or pixels of masks
            loss = loss + cfg.ce_weight * F.cross_entropy(scored, y, ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        if not loss.requires_grad:  # feature distillation matched no output of this batch (shapes differed)
            sched.step()
            return float(loss), 0.0
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # a no-op without fp16 scaling
        # The norm is computed after DDP's all-reduce, so every rank sees the same one and skips together.
        norm = nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip_grad_norm or math.inf)
        if scaler.is_enabled() or torch.isfinite(norm):
            scaler.step(opt)  # with fp16 scaling, the scaler itself skips non-finite steps
        else:
            self.skipped += 1
            if self.skipped == 1:
                log.warning("non-finite loss or gradients (lr=%g too high?): such steps are skipped; the best "
                            "validated state is kept", self.lr)
        scaler.update()
        sched.step()
        with torch.no_grad():
            if logits is None:  # feature distillation: no classes to count
                hit = 0.0
            elif y.dim() > 1 or labelled.all():
                hit = _label_scores(scored, y, loss=False)[1]
            else:  # agreement with the teacher; per-pixel logits count each image's share of pixels
                hit = top1_same(t_logits, logits) if t_logits is not None else 0.0
        return float(loss.detach()), hit

    def evaluate(self, epoch: int) -> Evaluation:
        """Validation figures of the student, each rank on its own slice, summed over ranks."""
        ctx = self.ctx
        options = dict(batch_size=self.cfg.batch_size, indices=list(range(ctx.rank, len(self.val_set), ctx.world)),
                       device=ctx.device, num_workers=self.cfg.num_workers, autocast=self.autocast)
        if self.distiller is not None:
            sums = _feature_sums(self.distiller, self.val_set, **options)
        else:
            sums = score_sums(self.student, self.val_set, self.teacher, **options)
        if ctx.world > 1:
            sums = sums.to(ctx.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        self.train_mode()
        if self.distiller is not None:
            return Evaluation.from_feature_sums(sums, epoch)
        return Evaluation.from_sums(sums, epoch, self.metric, with_teacher=self.teacher is not None)

    # -- checkpoints -----------------------------------------------------------------------------
    def read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume, checked against this model and run before anything is written."""
        path = self.ckpt_path
        if not path.exists():
            if self.ctx.main:
                log.info("resume: no checkpoint at %s yet, starting from the beginning", path)
            return None
        ckpt = load_checkpoint(path)
        own = self.student.state_dict()
        theirs = ckpt.get("model", {})
        missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        shapes = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
        if missing or extra or shapes:
            details = []
            if missing:
                details.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
            if extra:
                details.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
            if shapes:
                k = shapes[0]
                details.append(f"{k} has shape {tuple(theirs[k].shape)}, the model {tuple(own[k].shape)}")
            raise CheckpointError(f"checkpoint {str(path)!r} is of a different model: {'; '.join(details)}")
        run, theirs_run = self.run_fingerprint(), ckpt.get("run", {})
        diff = [f"{k}={theirs_run.get(k)!r} (now {v!r})" for k, v in run.items() if theirs_run.get(k) != v]
        if diff:
            raise CheckpointError(f"checkpoint {str(path)!r} belongs to a different run: {', '.join(diff)}; "
                                  "resume with the same options, or use another checkpoint_dir for a new run")
        return ckpt

    def save(self, student: nn.Module, step: int, epoch: int, batch: int, history: list[Evaluation],
             best: Evaluation | None, best_state: dict[str, Tensor] | None) -> None:
        """Write the checkpoint (rank 0; every rank contributes its RNG state)."""
        rng = _rng_state(self.ctx.device)
        if self.ctx.world > 1:
            states: list[Any] = [None] * self.ctx.world
            dist.all_gather_object(states, rng)
            rng_all = [_to_cpu(s) for s in states]
        else:
            rng_all = [_to_cpu(rng)]
        if not self.ctx.main:
            return
        opt, sched, scaler = self.state["opt"], self.state["sched"], self.state["scaler"]
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": _cpu_state(student), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch": batch, "rng": rng_all,
            "history": [dataclasses.asdict(e) for e in history],
            "best": None if best is None else {"evaluation": dataclasses.asdict(best), "state": best_state},
            "run": self.run_fingerprint(),
        }
        make_folder(self.ckpt_path.parent, "checkpoint folder")
        with atomic_write(self.ckpt_path, "wb") as f:
            torch.save(ckpt, f)
        log.debug("checkpoint saved: %s (step %d)", self.ckpt_path, step)


class _FeatureHooks:
    """Records each converted block's input and output during the student's training forward."""

    def __init__(self, pairs: dict[str, nn.Conv2d | nn.Linear], student: nn.Module) -> None:
        self.pairs, self.recording, self.seen = pairs, False, {}
        modules = dict(student.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in pairs]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.recording:
                self.seen[name] = (inputs[0], output)
        return hook

    def loss(self) -> Tensor:
        """Mean over blocks of ‖block(x) − conv(x)‖² / ‖conv(x)‖², ``conv`` the teacher's original."""
        terms = []
        for name, (x, out) in self.seen.items():
            layer = self.pairs[name]
            bias = None if layer.bias is None else layer.bias.float()
            with torch.no_grad():
                # The block's own input, detached: the target must not pull earlier layers around.
                if isinstance(layer, nn.Linear):  # the block sees the Linear's input as N × C × 1 × 1
                    target = F.conv2d(x.detach().float(), layer.weight.float()[:, :, None, None], bias)
                else:
                    target = conv_forward(x.detach().float(), layer.weight.float(), bias, layer)
            err = (out.float() - target).pow(2).mean()
            terms.append(err / target.pow(2).mean().clamp_min(1e-12))
        self.seen = {}
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


#: ``augment``: the crop's share of the image area, and the range of its aspect ratio (width / height).
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)


def augment_batch(x: Tensor, y: Tensor, *, flip: bool = True) -> tuple[Tensor, Tensor]:
    """Each image of ``x`` (``N×C×H×W``) cut to a random crop of :data:`CROP_AREA` of its area and
    :data:`CROP_ASPECT`, resized back (bilinear) and, with ``flip``, flipped left-right half of the
    time; class masks (``y`` of ``N×H×W``) get the same crop (nearest) and flip, class labels pass
    through. Draws from torch's CPU generator, so a seeded (or resumed) run repeats its crops."""
    n, _, h, w = x.shape
    images, masks = [], []
    for i in range(n):
        area = h * w * float(torch.empty(()).uniform_(*CROP_AREA))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]))))
        ch = max(1, min(h, round(math.sqrt(area / aspect))))
        cw = max(1, min(w, round(math.sqrt(area * aspect))))
        top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
        mirrored = bool(torch.rand(()) < 0.5) and flip  # drawn either way: the same crops with or without
        crop = F.interpolate(x[i : i + 1, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear",
                             align_corners=False)
        images.append(crop.flip(-1) if mirrored else crop)
        if y.dim() == 3:
            mask = F.interpolate(y[i : i + 1, None, top : top + ch, left : left + cw].float(), size=(h, w),
                                 mode="nearest-exact")[:, 0].long()
            masks.append(mask.flip(-1) if mirrored else mask)
    return torch.cat(images), torch.cat(masks) if masks else y


def _label_scores(logits: Tensor, y: Tensor, *, loss: bool = True) -> tuple[float, float, float]:
    """``(labelled images, correct, summed cross-entropy)`` of a batch against its labels (-1: none);
    the cross-entropy only with ``loss``.

    ``logits`` are :func:`_at_label_size`'s. One label per image is the case of one pixel: for class
    masks (``y`` is ``N×H×W``) each image with labelled pixels counts once, with its share of correct
    pixels and its mean cross-entropy over its labelled pixels.
    """
    lab = (y >= 0).reshape(len(y), -1)
    if not lab.any():  # hidden labels (-1 per image) of per-pixel logits too: nothing to score
        return 0.0, 0.0, 0.0
    pixels = lab.sum(1)
    has = pixels > 0
    correct = ((logits.argmax(1) == y).reshape(len(y), -1) & lab).sum(1)
    ce = 0.0
    if loss:
        per_pixel = F.cross_entropy(logits, y, ignore_index=-1, reduction="none").reshape(len(y), -1).sum(1)
        ce = float((per_pixel[has] / pixels[has]).sum())
    return float(has.sum()), float((correct[has] / pixels[has]).sum()), ce


def _at_label_size(logits: Tensor, y: Tensor) -> Tensor:
    """``logits`` as the labels ``y`` score them: as they are for class labels; for class masks checked
    (:func:`_checked_masks`) and, when they come at a stride of the input (SegFormer's at 1/4),
    upsampled bilinearly to the masks' height and width, as such models' own training losses do."""
    if y.dim() == 1:
        return logits
    _checked_masks(y, logits)
    if logits.shape[2:] == y.shape[1:]:
        return logits
    return F.interpolate(logits, size=tuple(y.shape[1:]), mode="bilinear", align_corners=False)


def _checked_masks(y: Tensor, logits: Tensor) -> None:
    """A :class:`DataError` unless ``y`` are class masks ``N×H×W`` for per-pixel logits ``N×C×h×w``."""
    if logits.dim() != 4 or y.dim() != 3 or len(y) != len(logits):
        raise DataError(f"class masks of shape {list(y.shape)} do not fit the model's logits of shape "
                        f"{list(logits.shape)}")
    top = int(y.max())
    if top >= logits.shape[1]:
        raise DataError(f"a class mask holds class {top}, but the model has {logits.shape[1]} classes "
                        f"({MASK_IGNORE} marks pixels to ignore)")


def _kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton distillation: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (T² keeps gradient scales stable),
    the mean over images, or over pixels for per-pixel logits."""
    t = temperature
    positions = student_logits.numel() // student_logits.shape[1]
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    log_target=True, reduction="sum") * (t * t) / positions


def _lr_lambda(total: int, warmup: float, min_lr: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup·total`` steps, then cosine decay to ``min_lr`` (fractions of lr)."""
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()}

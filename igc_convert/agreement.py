"""How closely a converted model follows the original on held-out images: the whole model's account,
next to the per-layer errors of :class:`igc_convert.report.Report`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import DataError, ModelError
from .modes import as_input, eval_mode, require_module
from .report import Agreement


#: Dict keys under which models return their class logits: torchvision's segmentation models
#: (``{"out": N × classes × H × W, "aux": ...}``) and Hugging Face's model outputs.
LOGIT_KEYS = ("out", "logits")


def named_logits(out: Any) -> torch.Tensor | None:
    """The class logits a model output declares: a tensor's own, a dict's ``out``/``logits`` entry, or
    the first entry of a tuple (Inception and GoogLeNet add auxiliary logits after it in training
    mode); None for anything else (a detection model's boxes)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        found = next((out[k] for k in LOGIT_KEYS if k in out), None)
        return found if isinstance(found, torch.Tensor) else None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def class_logits(out: Any, what: str, who: str = "the model") -> torch.Tensor:
    """:func:`named_logits` of a model output when they are class logits (``N × classes``, or
    ``N × classes × H × W`` per pixel); else a :class:`ModelError` saying that ``what`` needs them and
    what ``who`` returns instead."""
    logits = named_logits(out)
    if logits is None or logits.dim() not in (2, 4) or not logits.is_floating_point():
        leaves = [f"{type(t).__name__}{list(t.shape) if isinstance(t, torch.Tensor) else ''}" for t in tree_leaves(out)]
        raise ModelError(f"{what} needs class logits (N × classes, or N × classes × H × W per pixel), but {who} "
                         f"returns {type(out).__name__} of {', '.join(leaves[:4]) or 'nothing'}"
                         f"{', ...' if len(leaves) > 4 else ''} (a detector's boxes are not class logits)")
    return logits


def _outputs(model: nn.Module, x: torch.Tensor, which: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every floating-point tensor of the model's output, and its class logits when it declares them
    (``N × classes`` from any output, ``N × classes × H × W`` from a dict's ``out``/``logits``)."""
    try:
        out = model(as_input(x, model))
    except RuntimeError as err:  # e.g. images of the wrong size or channel count for this model
        raise ModelError(f"the {which} model failed on held-out images of shape {tuple(x.shape)}: "
                         f"{str(err).splitlines()[0]}") from err
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ModelError(f"the {which} model returned no floating-point tensor to compare")
    logits = named_logits(out) if len(leaves) == 1 or isinstance(out, Mapping) else None
    per_pixel = isinstance(out, Mapping) and logits is not None and logits.dim() == 4
    if logits is None or not (logits.dim() == 2 or per_pixel) or logits.shape[1] < 2:
        logits = None
    return leaves, logits


def kl_and_top1(logits: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """Over a batch of ``N × classes`` logits: ``Σ KL(softmax(logits) ‖ softmax(approx))`` (nats, float64)
    and how many rows have the same top-1 class. For per-pixel logits (``N × classes × H × W``,
    segmentation) each image counts its mean KL over pixels and its share of pixels of the same class.

    >>> kl_and_top1(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    (0.0, 1.0)
    """
    logp, logq = F.log_softmax(logits.double(), dim=1), F.log_softmax(approx.double(), dim=1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    return float(kl.reshape(len(kl), -1).mean(1).sum()), top1_same(logits, approx)


def top1_same(logits: torch.Tensor, approx: torch.Tensor) -> float:
    """How many rows of two batches of logits have the same top-1 class (for per-pixel logits, the
    sum over images of each one's share of such pixels): :func:`kl_and_top1`'s second figure alone."""
    same = (logits.argmax(1) == approx.argmax(1)).double()
    return float(same.reshape(len(same), -1).mean(1).sum())


def measure_agreement(original: nn.Module, converted: nn.Module, images: Any, *, batch_size: int = 32,
                      source: str = "", progress: bool = False) -> Agreement:
    """Compare ``converted`` with ``original`` on ``images`` (a tensor, an iterable of tensors or of
    ``(image, label)`` items, a Dataset or a DataLoader: whatever ``convert``'s ``calibration`` takes).

    The relative output error covers every floating-point tensor a model returns. For a classifier (one
    ``N × classes`` output) it also gives the mean logit KL divergence from the original and top-1
    agreement; for a segmentation model (a dict whose ``out`` is ``N × classes × H × W``, as torchvision's)
    the same per pixel. Both models run in eval mode, without gradients; every module's mode is restored.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    >>> _ = net(torch.zeros(1, 1, 6, 6))
    >>> a = measure_agreement(net, net, torch.randn(5, 1, 6, 6))
    >>> a.images, a.output_error, a.kl, a.top1
    (5, 0.0, 0.0, 1.0)
    """
    from tqdm.auto import tqdm

    from .convert import calibration_batches

    require_module(original, "original")
    require_module(converted, "converted")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        batches = calibration_batches(images, batch_size=batch_size)
    except DataError as err:
        raise DataError(f"held-out images: {err}") from err
    count, err2, ref2, kl, same, logits, per_pixel = 0, 0.0, 0.0, 0.0, 0.0, True, False
    with eval_mode(original, converted), torch.no_grad():
        for x in tqdm(batches, desc="checking", unit="batch", disable=not progress):
            (ys, y_logits), (yhats, yhat_logits) = _outputs(original, x, "original"), _outputs(converted, x, "converted")
            if [t.shape for t in ys] != [t.shape for t in yhats]:
                raise ModelError(f"the converted model's outputs have shapes {[tuple(t.shape) for t in yhats]}, "
                                 f"the original's {[tuple(t.shape) for t in ys]}")
            for y, yhat in zip(ys, yhats):
                err2 += float((yhat.double() - y.double()).pow(2).sum())
                ref2 += float(y.double().pow(2).sum())
            logits = logits and y_logits is not None
            if logits:
                per_pixel = y_logits.dim() == 4
                batch_kl, batch_same = kl_and_top1(y_logits, yhat_logits)
                kl += batch_kl
                same += batch_same
            count += len(x)
    # Outputs that are empty or zero on every image (a randomly initialised detector finds no boxes)
    # give no relative error to report: None, rather than a vacuous 0.
    error = math.sqrt(err2 / ref2) if ref2 > 0 else (None if err2 == 0 else math.inf)
    return Agreement(count, error, kl / count if logits else None, same / count if logits else None, source,
                     per_pixel=per_pixel and logits)

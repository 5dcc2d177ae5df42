"""How closely a converted model follows the original on held-out images: the whole model's account,
next to the per-layer errors of :class:`igc_convert.report.Report`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import DataError, ModelError
from .modes import as_input, eval_mode
from .report import Agreement


def _outputs(model: nn.Module, x: torch.Tensor, which: str) -> list[torch.Tensor]:
    try:
        out = model(as_input(x, model))
    except RuntimeError as err:  # e.g. images of the wrong size or channel count for this model
        raise ModelError(f"the {which} model failed on held-out images of shape {tuple(x.shape)}: "
                         f"{str(err).splitlines()[0]}") from err
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ModelError(f"the {which} model returned no floating-point tensor to compare")
    return leaves


def kl_and_top1(logits: torch.Tensor, approx: torch.Tensor) -> tuple[float, int]:
    """Over a batch of ``N × classes`` logits: ``Σ KL(softmax(logits) ‖ softmax(approx))`` (nats, float64)
    and how many rows have the same top-1 class.

    >>> kl_and_top1(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    (0.0, 1)
    """
    logp, logq = F.log_softmax(logits.double(), dim=1), F.log_softmax(approx.double(), dim=1)
    return float((logp.exp() * (logp - logq)).sum()), int((logp.argmax(1) == logq.argmax(1)).sum())


def measure_agreement(original: nn.Module, converted: nn.Module, images: Any, *, batch_size: int = 32,
                      source: str = "", progress: bool = False) -> Agreement:
    """Compare ``converted`` with ``original`` on ``images`` (a tensor, an iterable of tensors or of
    ``(image, label)`` items, a Dataset or a DataLoader: whatever ``convert``'s ``calibration`` takes).

    The relative output error covers every floating-point tensor a model returns. For a classifier (one
    ``N × classes`` output) it also gives the mean logit KL divergence from the original and top-1
    agreement. Both models run in eval mode, without gradients; every module's mode is restored.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    >>> _ = net(torch.zeros(1, 1, 6, 6))
    >>> a = measure_agreement(net, net, torch.randn(5, 1, 6, 6))
    >>> a.images, a.output_error, a.kl, a.top1
    (5, 0.0, 0.0, 1.0)
    """
    from tqdm.auto import tqdm

    from .convert import calibration_batches

    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        batches = calibration_batches(images, batch_size=batch_size)
    except DataError as err:
        raise DataError(f"held-out images: {err}") from err
    count, err2, ref2, kl, same, logits = 0, 0.0, 0.0, 0.0, 0, True
    with eval_mode(original, converted), torch.no_grad():
        for x in tqdm(batches, desc="checking", unit="batch", disable=not progress):
            ys, yhats = _outputs(original, x, "original"), _outputs(converted, x, "converted")
            if [t.shape for t in ys] != [t.shape for t in yhats]:
                raise ModelError(f"the converted model's outputs have shapes {[tuple(t.shape) for t in yhats]}, "
                                 f"the original's {[tuple(t.shape) for t in ys]}")
            for y, yhat in zip(ys, yhats):
                err2 += float((yhat.double() - y.double()).pow(2).sum())
                ref2 += float(y.double().pow(2).sum())
            logits = logits and len(ys) == 1 and ys[0].dim() == 2 and ys[0].shape[1] > 1
            if logits:
                batch_kl, batch_same = kl_and_top1(ys[0], yhats[0])
                kl += batch_kl
                same += batch_same
            count += len(x)
    error = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    return Agreement(count, error, kl / count if logits else None, same / count if logits else None, source)

"""Planning by the logits (``convert(..., plan_by="logits")``): each layer's shapes scored by what they
do to the model's output, not by the layer's own error.

The default plan minimises the sum of the layers' squared relative output errors, every layer alike.
Layers differ in how much of their error reaches the output, and by a lot: perturbing EfficientNet-Lite0's
stem changes its logit KL ~180× more than the same relative error in a mid-network expansion. Nor is the
response quadratic at the errors compression reaches, so a sensitivity measured at small errors and
scaled up plans badly (docs/results/fidelity.md). Instead, for every layer a few shapes along its
cost–error hull are fitted (data-aware, one-shot), each put in alone as the output change
``(Ŵ − W) ∗ x`` with its mean over the images taken out, as the bias correction does, and the KL
divergence of the model's logits from the original's is measured on a probe batch of calibration
images. The layer's other shapes get the KL interpolated from their error. The allocation then
minimises the summed KL (each layer's alone: the terms are assumed to add up). They do not once most
layers are heavily compressed and their errors compound, so :func:`plan_kls` compares the whole plan
with the plan by the layers' errors, every block in at once, and ``convert`` keeps the better one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .agreement import class_logits, kl_and_top1
from .blocks import BLOCKS, conv_forward, make_block
from .errors import IGCError
from .modes import as_input, eval_mode
from .plan import Candidate, LayerSpec, lower_hull

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: Calibration images the probes run on.
PROBE_IMAGES = 16
#: Calibration images the two whole plans (by the logits, by the layers' errors) are compared on.
CHECK_IMAGES = 64
#: Shapes fitted and measured per layer, spread along its hull; the rest are interpolated.
PROBE_POINTS = 6
PLAN_BY = ("error", "logits")


def logit_scored(model: nn.Module, convs: Sequence[nn.Module], specs: Sequence[LayerSpec],
                 per_layer: Sequence[Sequence[Candidate]], images: Tensor, metric: str, *, damping: float,
                 fit_iters: int, remove_mean: bool = True, progress: bool = True) -> list[list[Candidate]]:
    """``per_layer`` with every block candidate's ``error`` replaced by ``√KL``: the KL divergence of
    ``model``'s logits on ``images`` from its own when that layer alone takes that shape (measured for
    up to :data:`PROBE_POINTS` shapes on the layer's ``metric`` hull, interpolated in error for the
    others); the layer's own error is kept in ``fit_error``.

    ``convs[i]`` is the module of ``specs[i]`` inside ``model``; the model is not changed.
    """
    start, probed, scored = time.perf_counter(), 0, []
    with eval_mode(model):
        clean = _logits(model, images)
        bar = tqdm(list(zip(convs, specs, per_layer)), desc="probing", unit="layer", disable=not progress,
                   leave=False)
        for conv, spec, cands in bar:
            hull = [c for c in lower_hull(cands, metric) if c.kind != "dense"]
            points = [(c.error, _kl_with(model, [(conv, _delta(conv, spec, c, damping, fit_iters))], images, clean,
                                         remove_mean))
                      for c in _spread(hull, PROBE_POINTS)]
            probed += len(points)
            scored.append([c if c.kind == "dense" else
                           replace(c, error=math.sqrt(_interpolate(points, c.error)), fit_error=c.error)
                           for c in cands])
    log.info("planning by the logits: %d shapes of %d layers measured on %d images in %.0f s", probed,
             len(scored), len(images), time.perf_counter() - start)
    return scored


def by_fit_error(per_layer: Sequence[Sequence[Candidate]]) -> list[list[Candidate]]:
    """The candidates of :func:`logit_scored` with their own relative errors back in ``error``."""
    return [[c if c.fit_error is None else replace(c, error=c.fit_error) for c in cands] for cands in per_layer]


def plan_kls(model: nn.Module, convs: Sequence[nn.Module], specs: Sequence[LayerSpec],
             plans: Sequence[Sequence[Candidate]], images: Tensor, *, damping: float, fit_iters: int,
             remove_mean: bool = True) -> list[float]:
    """For each plan (one candidate per layer), the mean logit KL on ``images`` from ``model``'s own
    with every layer as the plan has it (one-shot fits, all in at once): how plans compare once their
    errors compound. A shape two plans share is fitted once."""
    fitted: dict[tuple[int, str, str], Tensor] = {}

    def delta(i: int, c: Candidate) -> Tensor:
        key = (i, c.kind, repr(sorted(c.shape.items())))
        if key not in fitted:
            fitted[key] = _delta(convs[i], specs[i], c, damping, fit_iters)
        return fitted[key]

    with eval_mode(model):
        clean = _logits(model, images)
        return [_kl_with(model, [(convs[i], delta(i, c)) for i, c in enumerate(plan) if c.kind != "dense"],
                         images, clean, remove_mean) for plan in plans]


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    """The model's class logits on ``images`` (with whatever hooks are on it)."""
    with torch.no_grad():
        return class_logits(model(as_input(images, model)), "planning by the logits")


def _spread(hull: list[Candidate], count: int) -> list[Candidate]:
    """Up to ``count`` of the hull's shapes, evenly spaced along it, the cheapest and dearest included."""
    if len(hull) <= count:
        return hull
    return [hull[round(i * (len(hull) - 1) / (count - 1))] for i in range(count)]


def _delta(conv: nn.Module, spec: LayerSpec, c: Candidate, damping: float, fit_iters: int) -> Tensor:
    """``Ŵ − W``: the dense kernel of ``c``'s block, fitted as the one-shot data-aware fit does, less the
    conv's own."""
    kwargs = {} if c.kind == "igcv1" else dict(max_iter=fit_iters)
    try:
        fit = BLOCKS[c.kind].fit(spec.weight, sigma=spec.sigma, row_weights=spec.row_weights, damping=damping,
                                 **c.shape, **kwargs)
        block = make_block(c.kind, conv, c.shape, fit=False, name=spec.name)
    except IGCError as err:
        raise err.in_layer(spec.name)
    block.load_factors(fit.factors, None)
    return block.dense_weight().detach().to(conv.weight.dtype) - conv.weight.detach()


def _kl_with(model: nn.Module, changes: Sequence[tuple[nn.Module, Tensor]], images: Tensor, clean: Tensor,
             remove_mean: bool) -> float:
    """Mean logit KL from ``clean`` with each ``(conv, delta)``'s conv output changed by ``delta ∗ x``
    (less its mean over images and positions when the conversion moves that into a bias)."""

    def changed_by(delta: Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            d = conv_forward(args[0], delta, None, module)  # the conv's own padding mode, too
            return out + (d - d.mean((0, 2, 3), keepdim=True) if remove_mean else d)
        return hook

    handles = [conv.register_forward_hook(changed_by(delta)) for conv, delta in changes]
    try:
        kl, _ = kl_and_top1(clean, _logits(model, images))
    finally:
        for h in handles:
            h.remove()
    return max(kl / len(images), 0.0)


def _interpolate(points: list[tuple[float, float]], error: float) -> float:
    """KL at ``error`` from the measured ``(error, KL)`` points and ``(0, 0)``: piecewise linear, made
    non-decreasing in the error (a noisy probe must not make a worse shape look better), extended
    beyond the largest measured error along the last segment."""
    pts = sorted([(0.0, 0.0), *points])
    xs, ys, top = [], [], 0.0
    for x, y in pts:
        top = max(top, y)
        if xs and x <= xs[-1]:
            ys[-1] = top
            continue
        xs.append(x)
        ys.append(top)
    if len(xs) == 1:
        return ys[0]
    if error >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (error - xs[-1])
    i = next(k for k in range(1, len(xs)) if error <= xs[k])
    t = (error - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])

"""Latency-aware planning: measured onnxruntime latencies for the planner, and the never-slower guard.

Fewer MACs do not make a faster model (ShuffleNetV2: memory access, fragmented small kernels,
shuffles), so a latency target plans on *measured* costs:

* :func:`attach_latencies` times each convertible conv and a few of its candidate blocks alone in
  onnxruntime (on-disk cache, :func:`igc_convert.bench.measure_module_latency`) and keeps only the
  candidates measured faster than the dense conv;
* :func:`enforce_not_slower` then checks the whole exported model against the original side by side
  and reverts the least rewarding layers to their dense conv until the converted model is not slower
  than ``ratio`` × the original.

Per-layer latencies do not add up to the whole model's (the exported graph fuses BatchNorm and
activations into convs, layers share caches, and a lone conv pays a session call), so the per-layer
figures only rank choices; the whole-model check is what makes the guarantee.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from . import bench
from .blocks import make_block
from .errors import ConfigError, IGCError
from .plan import Candidate, LayerSpec, lower_hull

if TYPE_CHECKING:  # convert imports this module lazily; avoid the cycle at import time
    from .convert import ConversionResult

log = logging.getLogger(__name__)

#: Reason recorded for a layer :func:`enforce_not_slower` put back to its dense conv.
REVERTED = "reverted: slower than dense in onnxruntime"

#: Relative band above the target in which one whole-model measurement is not trusted on its own.
#: Two identical resnet18 graphs timed against each other (20 alternating runs, 2 threads, load ~5 on
#: 2 cores) gave B/A ratios from 0.90 to 1.14; with 40 runs from 0.95 to 1.06. Inside the band the
#: ratio is measured again with twice the runs before anything is reverted.
DEFAULT_NOISE_MARGIN = 0.05


# ------------------------------------------------------------------------------------------ planner
def attach_latencies(specs: Sequence[LayerSpec], per_layer: Sequence[Sequence[Candidate]], convs: Sequence[nn.Conv2d],
                     fixed_sites: Sequence[Any], *, batch_size: int, threads: int = 2, runs: int = 15,
                     cache_dir: str | None = None, progress: bool = True, max_measured: int = 6,
                     calls: Sequence[int] | None = None, seed: int = 0,
                     ) -> tuple[list[list[Candidate]], list[float]]:
    """Measured onnxruntime latency on every kept candidate; and the latency of the convs that stay dense.

    For each layer the dense conv and at most ``max_measured`` candidates — the lower convex hull of
    (params, error), thinned to points spread evenly over its params range — are timed alone at input
    ``(batch_size, C_in, *spec.input_hw)`` with random weights (weights do not change the time).
    Returned per layer: the dense candidate (always) and the measured candidates that were faster
    than it, each with ``latency`` set (seconds × ``calls`` of that layer). The second value is the
    latency of each of ``fixed_sites`` (objects with ``.module`` and ``.input_hw``; 0 for a conv
    never called). Measurements are cached on disk per module structure, input shape, machine and
    thread count, so planning the same model again measures nothing.

    Per-layer latencies do not sum to the whole model's latency (fusions, caches, per-call overhead),
    but they rank the choices of one layer against the others correctly enough to plan with;
    :func:`enforce_not_slower` checks the whole model.

    Example::

        >>> per_layer, fixed = attach_latencies(specs, per_layer, convs, [], batch_size=1)
        >>> all(c.latency < per_layer[0][0].latency for c in per_layer[0][1:])
        True
    """
    if not (len(specs) == len(per_layer) == len(convs)):
        raise ConfigError(f"specs, candidates and convs must have one entry per layer, got "
                          f"{len(specs)}, {len(per_layer)} and {len(convs)}")
    if calls is not None and len(calls) != len(specs):
        raise ConfigError(f"calls must have one entry per layer, got {len(calls)} for {len(specs)} layers")
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if int(max_measured) < 1:
        raise ConfigError(f"max_measured must be >= 1, got {max_measured}")
    picks = [_to_measure(cands, max_measured) for cands in per_layer]
    total = sum(1 + len(p) for p in picks) + sum(getattr(s, "input_hw", None) is not None for s in fixed_sites)
    bar = tqdm(total=total, desc="latency", unit="module", disable=not progress, leave=False)
    timing = dict(threads=threads, runs=runs, cache_dir=cache_dir)
    out: list[list[Candidate]] = []
    with bar:
        for i, (spec, cands, conv, pick) in enumerate(zip(specs, per_layer, convs, picks)):
            if spec.input_hw is None:
                raise ConfigError("a latency target needs the layer's input size (give example inputs)",
                                  layer=spec.name)
            bar.set_postfix_str(spec.name)
            n = 1 if calls is None else int(calls[i])
            shape = (int(batch_size), spec.c_in, *spec.input_hw)
            dense = next(c for c in cands if c.kind == "dense")
            probe = _timing_conv(conv, seed)
            try:
                t_dense = bench.measure_module_latency(probe, shape, **timing) * n
            except IGCError as err:
                raise err.in_layer(spec.name)
            bar.update(1)
            kept = [replace(dense, latency=t_dense)]
            slower = 0
            for c in pick:
                try:
                    with torch.random.fork_rng(devices=[]):  # block init must not move the caller's RNG
                        torch.manual_seed(seed)
                        block = make_block(c.kind, probe, c.shape, fit=False, name=spec.name)
                    t = bench.measure_module_latency(block, shape, **timing) * n
                except IGCError as err:
                    log.warning("%s: could not time %s %s (%s); candidate dropped", spec.name, c.kind, c.shape, err)
                    bar.update(1)
                    continue
                bar.update(1)
                if t < t_dense:
                    kept.append(replace(c, latency=t))
                else:
                    slower += 1
            log.debug("%s: dense %.3f ms, %d of %d measured candidates faster", spec.name, t_dense * 1e3,
                      len(kept) - 1, len(pick))
            if slower == len(pick) and pick:
                log.info("%s: no measured block is faster than the dense conv (batch %d)", spec.name, batch_size)
            out.append(kept)
        fixed: list[float] = []
        for site in fixed_sites:
            hw = getattr(site, "input_hw", None)
            if hw is None:  # never called on the example input: costs nothing
                fixed.append(0.0)
                continue
            module = site.module
            bar.set_postfix_str(getattr(site, "name", ""))
            shape = (int(batch_size), module.in_channels, *hw)
            fixed.append(bench.measure_module_latency(_timing_conv(module, seed), shape, **timing)
                         * int(getattr(site, "calls", 1) or 1))
            bar.update(1)
    return out, fixed


def _to_measure(cands: Sequence[Candidate], k: int) -> list[Candidate]:
    """The non-dense candidates on the (params, error) lower hull, at most ``k`` spread over params."""
    hull = [c for c in lower_hull(cands, "params") if c.kind != "dense"]
    if len(hull) <= k:
        return hull
    if k == 1:
        return [hull[len(hull) // 2]]
    lo, hi = hull[0].params, hull[-1].params
    chosen: list[int] = []
    for j in range(k):
        target = lo + (hi - lo) * j / (k - 1)
        # nearest hull point not taken yet (hull is sorted by params)
        best = min((i for i in range(len(hull)) if i not in chosen), key=lambda i: abs(hull[i].params - target))
        chosen.append(best)
    return [hull[i] for i in sorted(chosen)]


def _timing_conv(conv: nn.Conv2d, seed: int) -> nn.Conv2d:
    """A float32 CPU ``nn.Conv2d`` of ``conv``'s structure with random weights: what gets timed.

    A copy (not the layer itself) so that double, GPU, meta or custom-forward layers all time the same
    way and the caller's RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)


# ------------------------------------------------------------------------------------------ guard
def enforce_not_slower(original: nn.Module, result: "ConversionResult", example_inputs: torch.Tensor, *,
                       ratio: float, threads: int = 2, runs: int = 20, warmup: int = 3,
                       batch_sizes: Sequence[int] | None = None, margin: float = DEFAULT_NOISE_MARGIN,
                       exporter: str = "auto", cache_dir: str | None = None, seed: int = 0) -> "ConversionResult":
    """Revert converted layers to their dense conv until the converted model is within ``ratio`` × the original.

    Both models are exported to ONNX (as :func:`igc_convert.export.export_onnx` would) and timed side
    by side in onnxruntime (alternating runs, medians) at each of ``batch_sizes`` (default: the
    example's). While the worst ratio converted/original exceeds ``ratio``, layers are put back to a
    copy of their original conv — plan entry dropped, report record marked ``"dense"`` with reason
    :data:`REVERTED` — and the model is measured again:

    * slower than the original (ratio above 1): every layer whose block measured alone is not faster
      than its dense conv, or if there is none, the one with the worst block/dense latency ratio;
    * faster than the original but above a target below 1: only layers whose block is not faster
      than dense alone (reverting a faster block would slow the model further); if there is none the
      target is reported as missed and nothing more is reverted.

    Noise: a ratio within ``margin`` above a threshold (the target, or 1) is measured again with
    twice the runs and only that decides. Nothing measured above ``ratio`` is accepted while a
    revert can help, so noise can only cost compression, never make the result slower.

    ``result`` is updated in place (its model too) and returned. ``original`` must still hold the
    dense convs (pass a copy when converting in place). Downstream layers fitted sequentially after a
    reverted one keep their fits; their recorded output errors were measured before the revert.

    Example::

        >>> result = convert(model, LatencyRatio(1.0), example_inputs=x)
        >>> result = enforce_not_slower(model, result, x, ratio=1.0)
        >>> [r.name for r in result.records if r.reason == REVERTED]
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ConfigError(f"latency ratio must be a positive number, got {ratio!r}")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ConfigError(f"noise margin must be in [0, 1), got {margin!r}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        raise ConfigError("example inputs must be an N×C×H×W tensor, got "
                          f"{tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__}")
    sizes = (len(example_inputs),) if batch_sizes is None else tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(sizes)}")
    x = example_inputs.detach().float().cpu()
    rng = np.random.default_rng(seed)
    inputs = {b: rng.standard_normal((b, *x.shape[1:])).astype(np.float32) for b in sizes}
    timing = dict(threads=threads, runs=runs, warmup=warmup)

    for entry in result.plan:
        try:
            dense = original.get_submodule(entry["name"])
        except AttributeError as err:
            raise ConfigError(f"the original model has no layer {entry['name']!r}") from err
        if not isinstance(dense, nn.Conv2d):
            raise ConfigError(f"layer {entry['name']!r} of the original model is not a dense Conv2d (pass an "
                              "unconverted copy of the model as original)")
    # a batch of 2 to export with: torch.export specialises a dynamic dim whose example size is 1
    probe = torch.cat([x[:1], x[:1]])
    reference = _onnx(original, probe, exporter)
    while True:
        candidate = _onnx(result.model, probe, exporter)
        ratios = {b: _ratio(reference, candidate, inputs[b], **timing) for b in sizes}
        for b, r in ratios.items():
            # inside a noise band above a decision threshold (the target; being slower than the
            # original at all): measure longer, and let that measurement decide
            if any(t < r <= t * (1 + margin) for t in {ratio, 1.0}):
                ratios[b] = _ratio(reference, candidate, inputs[b], **{**timing, "runs": 2 * runs})
                log.debug("batch %d: %.3f within the noise band, re-measured: %.3f", b, r, ratios[b])
        worst = max(sizes, key=lambda b: ratios[b])
        summary = ", ".join(f"batch {b}: {ratios[b]:.3f}" for b in sizes)
        if ratios[worst] <= ratio:
            log.info("converted/original latency %s (target <= %g): kept %d converted layers", summary, ratio,
                     len(result.plan))
            return result
        if not result.plan:
            log.warning("converted/original latency %s above %g with every layer dense: measurement noise "
                        "(the two models are now identical)", summary, ratio)
            return result
        layer_ratios = _layer_ratios(original, result, x, worst, threads=threads, runs=runs, cache_dir=cache_dir,
                                     seed=seed)
        slower = [n for n, r in layer_ratios.items() if r >= 1]
        if ratios[worst] > 1:
            names = slower or [max(layer_ratios, key=layer_ratios.get)]
        elif slower:
            names = slower
        else:
            # Faster than the original but not by the asked ratio: putting back a dense conv that is
            # slower than its block would only slow the model down. (A latency plan budgets conv time
            # only; pooling, linear layers and the session's own overhead are not in its sums.)
            log.warning("converted/original latency %s: faster than the original but above the target %g; "
                        "every converted layer is faster than its dense conv, so none is reverted", summary, ratio)
            return result
        log.info("converted/original latency %s > %g: reverting %s (block/dense %s)", summary, ratio,
                 ", ".join(names), ", ".join(f"{layer_ratios[n]:.2f}" for n in names))
        for name in names:
            revert_layer(original, result, name)


def revert_layer(original: nn.Module, result: "ConversionResult", name: str, reason: str = REVERTED) -> None:
    """Put a copy of ``original``'s conv ``name`` back into ``result.model``; drop it from the plan; mark its record."""
    try:
        conv = original.get_submodule(name)
    except AttributeError as err:
        raise ConfigError(f"the original model has no layer {name!r}") from err
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"layer {name!r} of the original model is a {type(conv).__name__}, not the dense Conv2d "
                          "(pass an unconverted copy of the model as original)")
    new = copy.deepcopy(conv)
    current = result.model.get_submodule(name)
    param = next(current.parameters(), None)
    if param is not None:  # keep the converted model's device and dtype
        new = new.to(device=param.device, dtype=param.dtype)
    new.train(current.training)
    parent, _, attr = name.rpartition(".")
    setattr(result.model.get_submodule(parent) if parent else result.model, attr, new)
    result.plan[:] = [e for e in result.plan if e.get("name") != name]
    for rec in result.report.records:
        if rec.name == name:
            rec.block, rec.shape, rec.reason = "dense", {}, reason
            rec.params_after, rec.macs_after = rec.params_before, rec.macs_before
            rec.weight_error = rec.output_error = None


def _onnx(model: nn.Module, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    """The graph a user would deploy: dynamic batch, simplified (as ``export_onnx`` writes it)."""
    from .export import to_onnx_model

    model = copy.deepcopy(model).float().cpu()
    proto, _ = to_onnx_model(model, x, dynamic_batch=True, exporter=exporter, reference=False)
    return proto


def _ratio(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray, *, threads: int, runs: int, warmup: int) -> float:
    """Median latency of ``b`` / median latency of ``a``, timed in alternation on ``x``."""
    ta, tb = bench.median_latencies([a, b], x, threads=threads, runs=runs, warmup=warmup)
    return tb / ta if ta > 0 else math.inf


def _layer_ratios(original: nn.Module, result: "ConversionResult", x: torch.Tensor, batch: int, *, threads: int,
                  runs: int, cache_dir: str | None, seed: int) -> dict[str, float]:
    """Block latency / dense latency of every converted layer, at its input size for ``batch``.

    Uses the planner's on-disk cache (same module structure and input shape), so layers the planner
    already timed cost nothing.
    """
    names = [e["name"] for e in result.plan]
    sizes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:  # a pre-hook's return value would replace the input
            sizes.setdefault(name, tuple(args[0].shape[1:]))
        return record

    handles = [result.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = result.model.training
    param = next(result.model.parameters(), None)
    try:
        result.model.eval()
        with torch.no_grad():
            result.model(x[:1].to(device=param.device if param is not None else "cpu",
                                  dtype=param.dtype if param is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
        result.model.train(was_training)
    out: dict[str, float] = {}
    for n in names:
        if n not in sizes:  # not called: cannot be what makes the model slower
            continue
        shape = (batch, *sizes[n])
        block = copy.deepcopy(result.model.get_submodule(n)).float().cpu()
        kw = dict(threads=threads, runs=runs, cache_dir=cache_dir)
        t_block = bench.measure_module_latency(block, shape, **kw)
        t_dense = bench.measure_module_latency(_timing_conv(original.get_submodule(n), seed), shape, **kw)
        out[n] = t_block / t_dense if t_dense > 0 else math.inf
    if not out:
        # nothing converted was called on the example: revert in plan order rather than loop forever
        out = {n: 1.0 for n in names}
    return out

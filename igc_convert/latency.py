"""Latency-aware planning: measured onnxruntime latencies for the planner, and the never-slower guard.

Fewer MACs do not make a faster model (ShuffleNetV2: memory access, fragmented small kernels,
shuffles), so a latency target plans on *measured* costs:

* :func:`attach_latencies` times each convertible conv and a few of its candidate blocks in
  onnxruntime, side by side (:func:`layer_latencies`, sharing the on-disk cache of
  :func:`igc_convert.bench.measure_module_latency`), and keeps only the candidates measured faster
  than the dense conv;
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
import os
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from . import bench
from .blocks import BLOCKS
from .errors import ConfigError, IGCError
from .linear import LinearAsConv, dense_conv
from .modes import eval_mode, require_module
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
                     cache_dir: str | os.PathLike | None = None, progress: bool = True, max_measured: int = 6,
                     calls: Sequence[int] | None = None, seed: int = 0,
                     ) -> tuple[list[list[Candidate]], list[float]]:
    """Measured onnxruntime latency on every kept candidate; and the latency of the convs that stay dense.

    For each layer the dense conv and at most ``max_measured`` candidates — the lower convex hull of
    (params, error) of the shapes on onnxruntime's fast path, thinned to points spread evenly over
    log(params), and the smallest shape of all when it is smaller (:func:`_to_measure`) — are timed
    side by side (:func:`layer_latencies`: alternating runs, so load on a shared machine hits them
    alike) at input ``(batch_size, C_in, *spec.input_hw)``, with random weights (weights do not change the time).
    Returned per layer: the dense candidate (always) and the measured candidates that were faster
    than it, each with ``latency`` set (seconds × ``calls`` of that layer). The second value is the
    latency of each of ``fixed_sites`` (objects with ``.module`` and ``.input_hw``; 0 for a conv
    never called). Measurements are cached on disk per module structure, input shape, machine and
    thread count, so planning the same model again measures nothing.

    Per-layer latencies do not sum to the whole model's latency (BatchNorm and activations fuse into
    convs, layers share caches, a lone conv pays a session call), but they rank the choices of one
    layer against the others well enough to plan with; :func:`enforce_not_slower` checks the whole model.

    Example::

        per_layer, fixed = attach_latencies(specs, per_layer, convs, [], batch_size=1)
        all(c.latency < per_layer[0][0].latency for c in per_layer[0][1:])   # True
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
    timing = dict(threads=threads, runs=runs, cache_dir=cache_dir, seed=seed)
    out: list[list[Candidate]] = []
    bar = tqdm(total=len(specs) + len(fixed_sites), desc="latency", unit="layer", disable=not progress, leave=False)
    with bar:
        for i, (spec, cands, conv) in enumerate(zip(specs, per_layer, convs)):
            if spec.input_hw is None:
                raise ConfigError("a latency target needs the layer's input size (give example inputs)",
                                  layer=spec.name)
            bar.set_postfix_str(spec.name)
            dense = next(c for c in cands if c.kind == "dense")
            probe = _timing_conv(conv)
            picks, blocks = [], []
            for c in _to_measure(cands, max_measured):
                try:
                    blocks.append(_timing_block(c.kind, probe, c.shape))
                    picks.append(c)
                except IGCError as err:
                    log.warning("%s: cannot build %s %s (%s); candidate dropped", spec.name, c.kind, c.shape, err)
            shape = (int(batch_size), spec.c_in, *spec.input_hw)
            try:
                t_dense, *t_blocks = layer_latencies([probe, *blocks], shape, **timing)
            except IGCError as err:
                raise err.in_layer(spec.name)
            n = 1 if calls is None else int(calls[i])
            kept = [replace(dense, latency=t_dense * n)]
            kept += [replace(c, latency=t * n) for c, t in zip(picks, t_blocks) if t < t_dense]
            log.debug("%s: dense %.3f ms, %d of %d measured candidates faster", spec.name, t_dense * 1e3,
                      len(kept) - 1, len(picks))
            if picks and len(kept) == 1:
                log.info("%s: no measured block is faster than the dense conv (batch %d)", spec.name, batch_size)
            out.append(kept)
            bar.update(1)
        fixed: list[float] = []
        for site in fixed_sites:
            hw = getattr(site, "input_hw", None)
            if hw is None:  # never called on the example input: costs nothing
                fixed.append(0.0)
            else:
                bar.set_postfix_str(getattr(site, "name", ""))
                shape = (int(batch_size), site.module.in_channels, *hw)
                (t,) = layer_latencies([_timing_conv(site.module)], shape, **timing)
                fixed.append(t * int(getattr(site, "calls", 1) or 1))
            bar.update(1)
    return out, fixed


def plan_latency_ratio(original: nn.Module, plan: Sequence[dict[str, Any]], example_inputs: torch.Tensor, *,
                       reference: onnx.ModelProto | None = None, threads: int = 2, runs: int = 15,
                       seed: int = 0) -> float:
    """Measured whole-model latency of ``original`` with ``plan`` applied, over the original's (one run, alternating).

    The blocks are built but not fitted (random weights time the same), so a plan can be checked
    before any fitting is spent on it. ``reference``: the original already exported for timing
    (``bench._module_proto`` at this input shape), so that checking several plans exports it once.
    """
    from .convert import apply_plan

    shape = tuple(int(s) for s in example_inputs.shape)
    if reference is None:
        reference = bench._module_proto(original, shape, seed)
    candidate = bench._module_proto(apply_plan(copy.deepcopy(original), plan).eval(), shape, seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    t_original, t_plan = bench.median_latencies([reference, candidate], x, threads=threads, runs=runs, warmup=3)
    return t_plan / t_original


def rest_of_model_latency(model: nn.Module, example_inputs: torch.Tensor, conv_total: float, *, threads: int = 2,
                          runs: int = 15, cache_dir: str | os.PathLike | None = None) -> float:
    """Seconds the whole ``model`` spends outside its convs: its onnxruntime latency minus ``conv_total``.

    ``conv_total`` is the sum of its convs' :func:`layer_latencies` (net of the per-call cost). The
    rest — BatchNorm not folded away, activations, adds, pooling, the classifier, the one per-call
    cost a deployed model does pay — is the same before and after a conversion, so a latency target
    on the whole model must count it on both sides of the ratio. Never negative.
    """
    whole = bench.measure_module_latency(model, tuple(example_inputs.shape), threads=threads, runs=runs,
                                         cache_dir=cache_dir)
    return max(whole - conv_total, 0.0)


def layer_latencies(modules: Sequence[nn.Module], input_shape: Sequence[int], *, threads: int = 2, runs: int = 15,
                    warmup: int = 3, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> list[float]:
    """Median onnxruntime latency (seconds) of each module on ``input_shape``, net of the per-run cost.

    The modules are run in alternation (m0, m1, …, m0, m1, …) so that load on a shared machine hits
    all of them alike and their ratios hold, together with an empty graph (one ``Identity``) on the
    same input: every isolated run pays onnxruntime's own per-call cost, which a layer inside a whole
    model does not, and which would make small blocks look closer to their dense conv than they are.
    Each result is the module's median minus the empty graph's (at least 5% of the median is kept).
    Results live in the on-disk cache file of :func:`igc_convert.bench.measure_module_latency`, under
    keys of their own (module structure, input shape, machine, threads, ``net``); when every module is
    in it nothing is measured, otherwise all are measured again together. Modules on the meta device
    (structure only) get random weights when timed.

    Example::

        dense, block = layer_latencies([conv, IGCV1.from_conv(conv, rank=8)], (1, 64, 56, 56))
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (batch, channels, ...) with positive sizes, got {list(shape)}")
    if not modules:
        return []
    cache = bench._cache_file(cache_dir)
    machine = bench.machine_fingerprint(threads)
    keys = [f"{bench.module_signature(m, shape)}|{machine}|net" for m in modules]
    entries = bench._cache_read(cache)
    if all(k in entries for k in keys):
        return [float(entries[k]["seconds"]) for k in keys]
    protos = [bench._module_proto(_materialised(m, seed), shape, seed) for m in modules]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    *gross, empty = bench.median_latencies([*protos, _empty_proto(shape)], x, threads=threads, runs=runs,
                                           warmup=warmup)
    times = [max(t - empty, 0.05 * t) for t in gross]
    when = datetime.now(timezone.utc).isoformat()
    for m, key, t, g in zip(modules, keys, times, gross):
        bench._cache_put(cache, key, {"seconds": t, "gross_seconds": g, "empty_seconds": empty, "runs": runs,
                                      "module": type(m).__name__, "input_shape": list(shape), "when": when})
    return times


def _empty_proto(shape: tuple[int, ...]) -> onnx.ModelProto:
    """A graph that only hands its input back (one ``Identity``): what a call costs with no work in it."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _to_measure(cands: Sequence[Candidate], k: int) -> list[Candidate]:
    """The non-dense candidates to time: at most ``k`` on the (params, error) lower hull, spread over log(params).

    Only shapes on onnxruntime's fast path (:attr:`Candidate.fast`) are measured when the layer has
    any: the error-best hull of all shapes is mostly made of shapes with a few channels per group
    (ranks 2-7), which run so far below the dense conv's speed per MAC inside a model that a plan
    built on them cut ResNet-50 to 0.105 of its MACs to reach 0.33 of its latency (with fast shapes:
    0.22 of its MACs at 0.28). The smallest shape of all is measured too when no fast one is as small.
    """
    blocks = [c for c in cands if c.kind != "dense"]
    if not blocks:
        return []
    fast = [c for c in cands if c.fast]  # the dense candidate is fast: it bounds the hull from above
    pool = fast if any(c.kind != "dense" for c in fast) else cands
    hull = [c for c in lower_hull(pool, "params") if c.kind != "dense"]
    # The smallest shape of all as well, when it is smaller than every fast one: tight targets on
    # narrow layers stay reachable (measured, so the allocation sees what it really costs).
    smallest = min(blocks, key=lambda c: (c.params, c.error))
    return _spread(hull, k) + ([smallest] if smallest.params < hull[0].params else [])


def _spread(hull: Sequence[Candidate], k: int) -> list[Candidate]:
    """At most ``k`` points of ``hull`` (sorted by params), evenly spread over log(params), both ends in."""
    if len(hull) <= k:
        return list(hull)
    if k == 1:
        return [hull[len(hull) // 2]]
    # Evenly spread over log(params): latency targets worth converting for sit in the lower part of
    # the range, where one step of an even spread in params would halve or double a layer's cost.
    logs = [math.log(max(c.params, 1)) for c in hull]
    chosen: list[int] = []
    for j in range(k):
        target = logs[0] + (logs[-1] - logs[0]) * j / (k - 1)
        # nearest hull point not taken yet (hull is sorted by params)
        best = min((i for i in range(len(hull)) if i not in chosen), key=lambda i: abs(logs[i] - target))
        chosen.append(best)
    return [hull[i] for i in sorted(chosen)]


def _timing_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A float32 ``nn.Conv2d`` of ``conv``'s structure on the meta device: what gets timed.

    Structure only (no weights to initialise, the caller's RNG untouched) so that double, GPU, meta
    or custom-forward layers all time the same way; :func:`layer_latencies` fills it when it times it.
    """
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")


def _timing_block(kind: str, probe: nn.Conv2d, shape: dict[str, Any]) -> nn.Module:
    """The block of ``kind``/``shape`` replacing ``probe``, on the meta device (structure only)."""
    if kind not in BLOCKS:
        raise ConfigError(f"unknown block kind {kind!r}; choose from {sorted(BLOCKS)}")
    return BLOCKS[kind](probe.in_channels, probe.out_channels, probe.kernel_size, probe.stride, probe.padding,
                        probe.dilation, probe.bias is not None, probe.padding_mode, device="meta", **shape)


def _materialised(module: nn.Module, seed: int) -> nn.Module:
    """``module`` itself, or for a meta-device one a float32 CPU copy with small random weights."""
    tensors = [*module.parameters(), *module.buffers()]
    if not any(t.is_meta for t in tensors):
        return module
    out = copy.deepcopy(module).to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (*out.parameters(), *out.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.05, generator=g)  # to_empty leaves garbage: NaN/denormals would skew timing
    return out


# ------------------------------------------------------------------------------------------ guard
def enforce_not_slower(original: nn.Module, result: "ConversionResult", example_inputs: torch.Tensor, *,
                       ratio: float, threads: int = 2, runs: int = 20, warmup: int = 3,
                       batch_sizes: Sequence[int] | None = None, margin: float = DEFAULT_NOISE_MARGIN,
                       exporter: str = "auto", cache_dir: str | os.PathLike | None = None,
                       seed: int = 0) -> "ConversionResult":
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

        result = convert(model, LatencyRatio(1.0), example_inputs=x)
        result = enforce_not_slower(model, result, x, ratio=1.0)
        [r.name for r in result.records if r.reason == REVERTED]
    """
    require_module(original, "original")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ConfigError(f"latency ratio must be a positive number, got {ratio!r}")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ConfigError(f"noise margin must be in [0, 1), got {margin!r}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 4:
        got = (tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor)
               else type(example_inputs).__name__)
        raise ConfigError(f"example inputs must be an N×C×H×W tensor, got {got}")
    sizes = (len(example_inputs),) if batch_sizes is None else tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(sizes)}")
    if not result.plan:  # nothing converted: the two models are the same
        return result
    x = example_inputs.detach().float().cpu()
    rng = np.random.default_rng(seed)
    inputs = {b: rng.standard_normal((b, *x.shape[1:])).astype(np.float32) for b in sizes}
    timing = dict(threads=threads, runs=runs, warmup=warmup)

    for entry in result.plan:
        try:
            dense = dense_conv(original, entry["name"])
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
    """Put a copy of ``original``'s conv ``name`` back into ``result.model``; drop it from the plan; mark its record.

    A Linear converted as a 1×1 conv (``<linear>.conv``) goes back to a plain ``nn.Linear``. A data-aware
    fit may have moved the mean of its error into the running mean of the BatchNorm that follows the
    layer: that BatchNorm gets the original's running mean back, unless it has changed otherwise since
    (fine-tuned, say), which is logged and left alone."""
    try:
        conv = dense_conv(original, name)
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
    if parent and isinstance(result.model.get_submodule(parent), LinearAsConv):  # a Linear converted as a conv
        result.model.set_submodule(parent, result.model.get_submodule(parent).to_linear())
    result.plan[:] = [e for e in result.plan if e.get("name") != name]
    for rec in result.report.records:
        if rec.name == name:
            rec.block, rec.shape, rec.reason = "dense", {}, reason
            rec.params_after, rec.macs_after = rec.params_before, rec.macs_before
            rec.weight_error = rec.output_error = None
            # the dense copy has the original bias; a BatchNorm that took the shift gets its mean back
            if rec.shifted_into == "bias" or (
                    rec.shifted_into and _restore_running_mean(original, result.model, rec.shifted_into, name)):
                rec.shifted_into = ""


def _restore_running_mean(original: nn.Module, model: nn.Module, bn_name: str, layer: str) -> bool:
    """Give ``model``'s BatchNorm ``bn_name`` the running mean it has in ``original``, unless anything
    else of it changed since conversion (fine-tuned, say): then log and leave it. Whether it did."""
    src, dst = original.get_submodule(bn_name), model.get_submodule(bn_name)
    for a, b in ((src.running_var, dst.running_var), (src.weight, dst.weight), (src.bias, dst.bias)):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a.detach().cpu(), b.detach().cpu())):
            log.warning("%s: the BatchNorm %s has changed since conversion; its running mean is left as it is",
                        layer, bn_name)
            return False
    with torch.no_grad():
        dst.running_mean.copy_(src.running_mean)
    return True


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
                  runs: int, cache_dir: str | os.PathLike | None, seed: int) -> dict[str, float]:
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
    param = next(result.model.parameters(), None)
    try:
        with eval_mode(result.model), torch.no_grad():
            result.model(x[:1].to(device=param.device if param is not None else "cpu",
                                  dtype=param.dtype if param is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, float] = {}
    for n in names:
        if n not in sizes:  # not called: cannot be what makes the model slower
            continue
        block = copy.deepcopy(result.model.get_submodule(n)).float().cpu()
        t_dense, t_block = layer_latencies([_timing_conv(dense_conv(original, n)), block], (batch, *sizes[n]),
                                           threads=threads, runs=runs, cache_dir=cache_dir, seed=seed)
        out[n] = t_block / t_dense if t_dense > 0 else math.inf
    if not out:
        # nothing converted was called on the example: revert in plan order rather than loop forever
        out = {n: 1.0 for n in names}
    return out

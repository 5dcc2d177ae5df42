"""The conversion pass: find the dense convs a model really calls, plan, fit, swap, and report.

``convert`` works on a deep copy unless ``inplace=True`` (then a conversion that fails or is
interrupted gives the caller's model back as it was):

1. **analyse** — ``torch.fx.symbolic_trace`` gives the convs actually called, in execution order, how
   often each is called (a shared conv is converted once and stays shared) and the BatchNorm that
   directly follows each one. Models FX cannot trace fall back to every ``Conv2d`` by qualified name
   (module order); the result says which path was used and why.
2. **calibrate** (optional) — second moments of every conv's input patches on calibration images.
3. **plan** — candidate shapes per layer and a global budget allocated across layers (:mod:`.plan`).
4. **fit and swap** — in execution order; in sequential mode each layer is fitted to reproduce the
   original layer's outputs from the inputs it really receives in the partly converted model.

The converted model keeps its class, attribute names and forward: only the conv submodules are
replaced by blocks with the same in/out channels, stride, padding, dilation and bias, so nothing
else in the network changes and the model saves and loads as ``origin + plan + state dict``.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import factorize as fz
from . import probe, stdconv
from .blocks import BLOCKS, IGCBlock, check_convertible, conv_macs, conv_output_hw, make_block
from .calibrate import BatchNormLeafTracer
from .data import split_item
from .errors import ConfigError, DataError, IGCError, ModelError, UnsupportedLayerError, call_model
from .linear import LinearAsConv, linear_site, unwrap_dense, wrap_linears
from .modes import as_input, require_module
from .plan import (TARGET_METRIC, LatencyRatio, LayerSpec, MacsRatio, MaxError, ParamsRatio, Target,
                   allocate, allocate_fast_first, candidates, uniform)
from .plan import channel_multiple as resolve_channel_multiple
from .report import LayerRecord, Report

log = logging.getLogger(__name__)

BLOCK_CHOICES = ("igcv1", "igcv2", "igcv3", "auto")

#: A layer whose input statistics ``Σ`` (``n × n`` float64, ``n = C_in·kh·kw``) would take more than this
#: is fitted in weight space: its data-aware fit holds several such matrices (``Σ``, the sequential
#: fit's paired ``Σ̃``, ``C``, ``Σ`` and a Cholesky factor) and factorises them, and VGG's 25088-wide
#: classifier (with ``linear=True``) would need 4.7 GiB for each. 1 GiB is ``n`` up to 11585; every
#: conv of the torchvision models is far below (ResNet-50's widest patch: 4608, 162 MiB).
MAX_LAYER_STATS_BYTES = 1 << 30


@dataclass
class ConvSite:
    """A conv found in the model."""

    name: str
    module: nn.Conv2d
    calls: int = 1
    batchnorm: str | None = None
    input_hw: tuple[int, int] | None = None


@dataclass
class ConversionResult:
    """The converted model, the plan that rebuilds its structure, and the per-layer report."""

    model: nn.Module
    plan: list[dict[str, Any]]
    report: Report
    #: Why no conv was converted, when none was (empty otherwise).
    unconverted: str = ""

    @property
    def records(self) -> list[LayerRecord]:
        return self.report.records


# ------------------------------------------------------------------------------------------ analyse
def find_convs(model: nn.Module) -> tuple[list[ConvSite], str, str]:
    """Convs of ``model`` in execution order, with the path used (``"fx"`` or ``"by-name"``) and why."""
    inside_blocks = tuple(name + "." for name, _ in existing_blocks(model))
    try:
        gm = torch.fx.GraphModule(model, BatchNormLeafTracer().trace(model))
    except Exception as err:  # FX raises many types (TraceError, TypeError, AssertionError, ...)
        reason = f"torch.fx could not trace it ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        sites = [ConvSite(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and not n.startswith(inside_blocks)]
        return sites, "by-name", reason
    sites: dict[str, ConvSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.Conv2d) or node.target.startswith(inside_blocks):
            continue  # the convs inside an IGC block are its sparse factors, not dense convs
        site = sites.get(node.target)
        if site is None:
            site = sites[node.target] = ConvSite(node.target, model.get_submodule(node.target), calls=0)
        site.calls += 1
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                gm.get_submodule(users[0].target), nn.BatchNorm2d):
            site.batchnorm = users[0].target if site.calls == 1 else None
    return list(sites.values()), "fx", ""


def existing_blocks(model: nn.Module) -> list[tuple[str, IGCBlock]]:
    """The IGC blocks already in ``model`` (converted earlier), outermost only, with their names."""
    found: list[tuple[str, IGCBlock]] = []
    for name, module in model.named_modules():  # parents come before their children
        if getattr(module, "is_igc_block", False) and not (found and name.startswith(found[-1][0] + ".")):
            found.append((name, module))
    return found


def _record_input_sizes(model: nn.Module, sites: Sequence[ConvSite], example: torch.Tensor) -> None:
    """Run one forward to learn every conv's input size (and call count on the by-name path)."""
    seen: dict[str, list[tuple[int, int]]] = {s.name: [] for s in sites}
    handles = []
    for s in sites:
        handles.append(s.module.register_forward_pre_hook(
            lambda m, args, name=s.name: seen[name].append(tuple(args[0].shape[-2:]))))
    try:
        call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    for s in sites:
        if seen[s.name]:
            s.input_hw = seen[s.name][0]
            s.calls = max(s.calls, len(seen[s.name])) if s.calls else len(seen[s.name])


# ------------------------------------------------------------------------------------- calibration
def calibration_batches(calibration: Any, *, batch_size: int = 32, limit: int | None = None) -> list[torch.Tensor]:
    """Normalise calibration data to a list of float image batches ``N×C×H×W``.

    Accepts a tensor, a sequence/iterable of tensors, ``(images, labels)`` pairs or dicts
    (``{"pixel_values": images, ...}``, :func:`igc_convert.data.split_item`), a DataLoader, or a
    map-style Dataset of images / ``(image, label)`` pairs / dicts. ``limit`` caps the number of images.
    """
    if isinstance(calibration, torch.Tensor):
        items: Iterable[Any] = calibration.split(batch_size)
    elif isinstance(calibration, torch.utils.data.Dataset) and hasattr(calibration, "__len__"):
        items = torch.utils.data.DataLoader(calibration, batch_size=batch_size, shuffle=False)
    else:
        items = calibration
    try:
        iterator = iter(items)
    except TypeError as err:
        raise DataError(f"calibration data of type {type(calibration).__name__} is not iterable") from err
    out: list[torch.Tensor] = []
    count = 0
    for i, item in enumerate(iterator):
        x = item[0] if isinstance(item, (tuple, list)) else split_item(item, "calibration data", i)[0]
        if not isinstance(x, torch.Tensor):
            raise DataError(f"calibration items must be tensors, got {type(x).__name__}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or not x.is_floating_point():
            raise DataError(f"calibration batches must be float N×C×H×W tensors, got shape {tuple(x.shape)} "
                            f"and dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise DataError("calibration images contain NaN or Inf")
        if limit is not None and count + len(x) > limit:
            x = x[: limit - count]
        out.append(x)
        count += len(x)
        if limit is not None and count >= limit:
            break
    if not out or count == 0:
        raise DataError("calibration data is empty")
    return out


# ------------------------------------------------------------------------------------------ helpers
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_plan(model: nn.Module, plan: Sequence[dict[str, Any]], *, fit: bool = False) -> nn.Module:
    """Swap the convs named in ``plan`` for blocks of the recorded shapes, in place.

    Structure only by default (used to rebuild a saved converted model before loading its weights);
    ``fit=True`` also fits each block to the conv it replaces (weight space). An entry ``<linear>.conv``
    whose parent is an ``nn.Linear`` (a Linear converted with ``linear=True``) first wraps that Linear
    in a :class:`~igc_convert.linear.LinearAsConv`.
    """
    require_module(model)
    swaps = []  # build every block first: a bad entry must not leave the plan half-applied
    for entry in plan:
        try:
            name, kind, shape = entry["name"], entry["block"], entry["shape"]
        except (KeyError, TypeError) as err:
            raise ConfigError(f"malformed plan entry {entry!r}") from err
        linear = linear_site(model, name)
        wrapper = LinearAsConv.from_linear(linear) if linear is not None else None
        try:
            conv = wrapper.conv if wrapper is not None else model.get_submodule(name)
        except AttributeError as err:
            raise ConfigError(f"plan names layer {name!r}, which the model does not have") from err
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"plan names layer {name!r}, which is a {type(conv).__name__}, not a Conv2d")
        if stdconv.is_standardised(conv):  # a fit approximates the weight its forward computes
            conv = stdconv.as_plain_conv(conv) or conv
        swaps.append((name, wrapper, make_block(kind, conv, shape, fit=fit, name=name)))
    for name, wrapper, block in swaps:
        if wrapper is not None:  # a Linear converted as a 1×1 conv: wrap it first, then swap its conv
            wrapper.conv = block
            _set_submodule(model, name.rpartition(".")[0], wrapper)
        else:
            _set_submodule(model, name, block)
    return model


def _describe(target: Target, multiple: int | None = None) -> str:
    """The target as the report names it; for a speed target, with the channel multiple it was planned
    for (the plan suits CPUs whose onnxruntime NCHWc block divides it)."""
    if isinstance(target, ParamsRatio):
        return f"params <= {target.ratio:g}x"
    if isinstance(target, (MacsRatio, LatencyRatio)):
        what = "MACs" if isinstance(target, MacsRatio) else "latency"
        groups = f", groups of multiples of {multiple} channels" if multiple else ""
        return f"{what} <= {target.ratio:g}x{groups}"
    return f"layer error <= {target.error:g}"


def _quadratic(weight: torch.Tensor, sigma: torch.Tensor) -> float:
    m = weight.reshape(weight.shape[0], -1).to(torch.float64)
    return float(((m @ sigma) * m).sum())


# ------------------------------------------------------------------------------------------ convert
@contextlib.contextmanager
def _undone_on_failure(model: nn.Module, edited: Sequence[torch.Tensor]):
    """Give ``model`` its modules, ``edited`` tensors' values and train/eval flags back if the block raises.

    An in-place conversion swaps submodules as it goes, moves fitted layers' mean errors into the
    running means of BatchNorms and may re-fit Linears; interrupted (an error, Ctrl-C), it would leave
    the caller a part-converted model. Only module references, flags and the edited tensors are kept:
    no copy of the convs, which are swapped out, never written.
    """
    tree = [(m, dict(m._modules), m.training) for m in model.modules()]
    saved = [(t, t.detach().clone()) for t in edited]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        for m, children, training in tree:
            m._modules.clear()
            m._modules.update(children)
            m.training = training
        raise


def _transactional(fn):
    """``convert`` with ``inplace=True`` leaves the caller's model as it was when it fails."""

    @functools.wraps(fn)
    def wrapper(model, target, **kwargs):
        if not kwargs.get("inplace") or not isinstance(model, nn.Module):
            return fn(model, target, **kwargs)
        # What conversion writes into rather than swaps: buffers (a BatchNorm's running mean takes a
        # fit's mean error) and, with ``refit_linears``, the Linears' weights and biases.
        edited = list(model.buffers())
        if kwargs.get("refit_linears"):
            edited += [p for m in model.modules() if type(m) is nn.Linear for p in m.parameters(recurse=False)]
        with _undone_on_failure(model, edited):
            return fn(model, target, **kwargs)

    return wrapper


@_transactional
def convert(model: nn.Module, target: Target, *, block: str = "igcv1", example_inputs: torch.Tensor | None = None,
            calibration: Any = None, calibration_samples: int | None = 256, exclude: Sequence[str] = (),
            include: Sequence[str] | None = None, inplace: bool = False, sequential: bool = True,
            damping: float = fz.DEFAULT_DAMPING, max_groups: int = 4, fit_iters: int = 100,
            plan_iters: int = 15, max_positions: int = 64, progress: bool = True, seed: int = 0,
            allocation: str = "budget", bias_correction: bool = True, linear: bool = False,
            channel_multiple: int | None = None, refit_linears: bool = False, residual_correction: bool = True,
            plan_by: str = "error", model_name: str = "") -> ConversionResult:
    """Convert the dense ``Conv2d`` layers of ``model`` into IGC blocks meeting ``target``.

    ``calibration`` (images: tensor, iterable, DataLoader or Dataset) makes the fit data-aware;
    ``sequential`` then fits each layer against the inputs it really gets after upstream layers were
    converted. A model converted earlier can be converted further (progressive conversion): its IGC
    blocks are kept as they are, the target applies to the dense convs left, and the result's plan
    lists the earlier blocks too, so it saves and reloads whole. ``exclude``/``include`` are glob
    patterns over qualified layer names. ``allocation`` ``"budget"`` spreads a ratio target across
    layers by error per unit of cost; ``"uniform"`` (the baseline it is measured against) gives every
    layer the same ratio. ``bias_correction`` (data-aware
    modes) moves the mean of each fitted layer's output error into its bias, or into the running mean
    of the BatchNorm that follows it, and such a layer is fitted on the covariance of its inputs
    rather than their second moment, weights and bias together
    (:meth:`igc_convert.calibrate.InputMoments.covariance`,
    :meth:`igc_convert.calibrate.PairedStats.centred_moments`). ``residual_correction`` (sequential mode, traceable models) fits
    a layer whose output (through its BatchNorm) is added to a shortcut so that the *sum* matches the
    original's: the layer also makes up for what the converted shortcut branch misses
    (:class:`igc_convert.calibrate.SequentialStats`). ``refit_linears`` (sequential mode) then re-fits every dense
    ``nn.Linear`` left in the model, a classifier head say, by least squares to map the features the
    converted layers now give it onto its original outputs (:func:`igc_convert.calibrate.linear_refit`,
    ridge chosen on held-out calibration images): the head is where the drift left by every converted
    layer can be taken out in closed form. It is for models used as converted: on the digits model it
    lifts zero-shot accuracy a lot (0.05 of the conv parameters: 35% to 91%), but distillation from
    that start with the aggressive ``tuned`` setting ended lower than from the original head.
    ``linear=True`` also converts every ``nn.Linear`` that gets a 2-D
    input on the example, as a 1×1 conv named ``<linear>.conv`` (:mod:`igc_convert.linear`): it
    then counts in the target's params/MACs like a conv. A layer whose input statistics would take
    more than :data:`MAX_LAYER_STATS_BYTES` (e.g. VGG's 25088-wide classifier) is fitted in weight
    space, with a warning. ``channel_multiple`` is the multiple that block shapes prefer for the
    channels of each group (:func:`igc_convert.plan.channel_multiple`; default: onnxruntime's NCHWc
    block on this CPU, 16 with AVX-512, 8 with AVX2; at least 16 for a latency target); give the
    deployment CPU's when it differs.
    ``plan_by="logits"`` (with ``calibration``) allocates the target by what each layer's shapes do to
    the model's logits on calibration images rather than by the layers' own errors (:mod:`igc_convert.probe`:
    a forward pass of 16 images per probed shape, up to 6 per layer).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        >>> result = convert(net, ParamsRatio(0.5), progress=False)
        >>> result.report.totals()["params_ratio"] <= 0.5
        True
    """
    if isinstance(model, torch.export.ExportedProgram) or isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"cannot convert a compiled {type(model).__name__} (its convs are no longer nn.Conv2d "
                         "modules to replace); convert the nn.Module it was made from, then export or script "
                         "the result")
    require_module(model)
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, nn.Module) and type(model).__name__ == "OptimizedModule":
        # torch.compile's wrapper: calibration through it recompiles for every hook (minutes, for the
        # same statistics), and its graph is stale once layers are swapped. Convert what it wraps.
        log.warning("converting the module inside torch.compile's wrapper; the result is not compiled: "
                       "call torch.compile on it again")
        model = compiled
    if not isinstance(target, (ParamsRatio, MacsRatio, MaxError, LatencyRatio)):
        raise ConfigError(f"target must be ParamsRatio, MacsRatio, MaxError or LatencyRatio, got {target!r}")
    if block not in BLOCK_CHOICES:
        raise ConfigError(f"unknown block kind {block!r}; choose from {', '.join(BLOCK_CHOICES)}")
    kinds = list(BLOCKS) if block == "auto" else [block]
    if isinstance(exclude, str):
        exclude = (exclude,)
    if isinstance(include, str):
        include = (include,)

    _check_options(calibration_samples=calibration_samples, damping=damping, max_groups=max_groups,
                   fit_iters=fit_iters, plan_iters=plan_iters, max_positions=max_positions)
    if plan_by not in probe.PLAN_BY:
        raise ConfigError(f"plan_by must be one of {', '.join(probe.PLAN_BY)}, got {plan_by!r}")
    if plan_by == "logits":
        if calibration is None:
            raise ConfigError("planning by the logits measures them on calibration images: give calibration")
        if isinstance(target, MaxError) or allocation == "uniform":
            raise ConfigError("planning by the logits allocates a params, MACs or latency budget; a max-error "
                              "target and uniform allocation do not use it")
    multiple = resolve_channel_multiple(channel_multiple, latency=isinstance(target, LatencyRatio))
    original = model
    for name, p in original.named_parameters():
        if p.is_meta:
            raise ModelError(f"parameter {name!r} is on the meta device (not materialised); load real weights first")
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelError(f"parameter {name!r} contains NaN or Inf")
    # timm's weight-standardised convs (BiT, NFNets) are converted as the plain convs they compute.
    original, standardised = stdconv.with_plain_convs(original, inplace)
    sites, path, path_reason = find_convs(original)
    # Blocks of an earlier conversion stay as they are; the plan keeps them so the result saves whole.
    kept = [dict(name=name, block=b.kind, shape=b.shape()) for name, b in existing_blocks(original)]
    if not sites:
        raise ModelError("every conv of the model is already an IGC block" if kept
                         else "the model has no Conv2d layers to convert" + _functional_convs(original))
    if kept:
        log.info("%d layers converted earlier are kept as they are; the target applies to the %d dense convs",
                 len(kept), len(sites))
    batches = None
    if calibration is not None:
        batches = calibration_batches(calibration, limit=calibration_samples)
    example = example_inputs if example_inputs is not None else (batches[0][:1] if batches else None)
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            raise DataError(f"example inputs must be an N×C×H×W tensor, got "
                            f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
        example = as_input(example, original)  # float32 images for a double, half or bfloat16 model
    # whether convert may change ``original`` itself (the caller's model, or its own copy)
    owned = inplace or bool(standardised)
    if linear:
        working, wrapped = _with_linears_as_convs(original, example, owned)
        if wrapped:
            original, owned = working, True
            sites, path, path_reason = find_convs(original)
    if example is not None:
        try:
            _record_input_sizes(original, sites, example)
        except ModelError as err:
            if example_inputs is not None:
                raise
            # the example is the first calibration image: name the data, which is the likelier culprit
            raise DataError(f"calibration images of shape {tuple(batches[0].shape[1:])} do not fit the model "
                            f"(its input channels and size?): {err}") from err
    guard_reference = copy.deepcopy(original) if owned and isinstance(target, LatencyRatio) else original
    if isinstance(target, (MacsRatio, LatencyRatio)) and example is None:
        raise ConfigError(f"a {TARGET_METRIC[type(target)]} target needs example inputs (or calibration images) "
                          "to know the input size")

    # eligibility
    eligible: list[ConvSite] = []
    reasons: dict[str, str] = {}
    for s in sites:
        try:
            check_convertible(s.module, s.name)
        except UnsupportedLayerError as err:
            reasons[s.name] = str(err).split(": ", 1)[-1]
            continue
        if include is not None and not _matches(s.name, include):
            reasons[s.name] = "not in --include"
        elif exclude and _matches(s.name, exclude):
            reasons[s.name] = "excluded"
        elif example is not None and s.input_hw is None:
            reasons[s.name] = "not called in forward"
        else:
            eligible.append(s)

    if include is not None and not any(_matches(s.name, include) for s in sites):
        raise ConfigError(f"include patterns {list(include)} match no conv; convs are named like {sites[0].name!r}")
    if exclude and not eligible and "excluded" in reasons.values():
        raise ConfigError(f"exclude patterns {list(exclude)} leave no conv to convert")

    # statistics
    sigmas: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}  # layers fitted on their input covariance: E[p], for the shift
    mean_energy: dict[str, float] = {}  # ... of those without a BatchNorm: ‖W E[p]‖², part of their output
    row_weights: dict[str, torch.Tensor] = {}
    # Where a bias or BatchNorm can take the mean of a fit's error, weights and bias are fitted together:
    # the rank goes to how the inputs vary. A BatchNorm removes the output's mean, so the error counts
    # against the output's variation; without one, against the whole output.
    shift_into = {s.name: _shift_target(original, s) if bias_correction else "" for s in eligible}
    mean_removed = {s.name for s in eligible if _batchnorm_with_mean(original, s) is not None}
    too_wide = _too_wide_for_statistics(eligible) if batches is not None else set()
    if batches is not None and eligible:
        from . import calibrate

        moments = calibrate.collect_input_moments(original, [s.name for s in eligible if s.name not in too_wide],
                                                  batches, max_positions=max_positions, seed=seed, progress=progress)
        for s in eligible:
            m = moments.pop(s.name, None)
            if m is None:
                continue
            if shift_into[s.name]:
                sigmas[s.name], means[s.name] = m.covariance(), m.mean
                if s.name not in mean_removed:
                    mean_energy[s.name] = float((s.module.weight.detach().to(torch.float64).reshape(
                        s.module.out_channels, -1) @ m.mean).pow(2).sum())
            else:
                sigmas[s.name] = m.sigma
        del moments
        bn_map = {s.name: s.batchnorm for s in eligible if s.batchnorm}
        row_weights = calibrate.bn_row_weights(original, bn_map) if bn_map else {}

    # plan
    log.info("block shapes prefer multiples of %d channels per group (onnxruntime's NCHWc fast path; %s)", multiple,
             "given" if channel_multiple is not None else "the default for this CPU and target")
    specs = [LayerSpec(s.name, s.module.weight.detach().to(torch.float64), s.module.bias is not None,
                       s.module.stride, s.module.padding, s.module.dilation, s.input_hw,
                       sigmas.get(s.name), row_weights.get(s.name), mean_energy.get(s.name, 0.0)) for s in eligible]
    per_layer = []
    for spec in tqdm(specs, desc="planning", unit="layer", disable=not progress or len(specs) < 2, leave=False):
        try:
            per_layer.append(candidates(spec, kinds, max_groups=max_groups, fit_iters=plan_iters, damping=damping,
                                        multiple=multiple))
        except IGCError as err:
            raise err.in_layer(spec.name)
    metric = TARGET_METRIC.get(type(target), "params")
    planned_by = plan_by
    if plan_by == "logits":
        check_images = torch.cat(calibration_batches(batches, limit=probe.CHECK_IMAGES))
        probing = dict(damping=damping, fit_iters=plan_iters, remove_mean=bias_correction)
        convs = [s.module for s in eligible]
        per_layer = probe.logit_scored(original, convs, specs, per_layer,
                                       check_images[:probe.PROBE_IMAGES], "params" if metric == "latency" else metric,
                                       progress=progress, **probing)
    fixed_sites = [s for s in sites if s.name in reasons]
    if metric == "latency":
        from . import latency

        per_layer, fixed_costs = latency.attach_latencies(
            specs, per_layer, [s.module for s in eligible], fixed_sites, batch_size=len(example),
            progress=progress)
        conv_total = sum(fixed_costs) + sum(next(c for c in cands if c.kind == "dense").latency for cands in per_layer)
        # The target is the whole model's latency: what its convs do not take stays, on both sides.
        rest = latency.rest_of_model_latency(guard_reference, example, conv_total)
        fixed, dense_total = sum(fixed_costs) + rest, conv_total + rest
    else:
        fixed = dense_total = 0.0
        for s in sites:
            p = s.module.weight.numel() + (s.module.bias.numel() if s.module.bias is not None else 0)
            cost = p if metric == "params" else _site_macs(s)
            dense_total += cost
            if s.name in reasons:
                fixed += cost
    if allocation not in ("budget", "uniform"):
        raise ConfigError(f"allocation must be 'budget' or 'uniform', got {allocation!r}")
    if allocation == "uniform" and per_layer and not isinstance(target, MaxError):
        chosen = uniform(per_layer, target.ratio, metric)
    else:
        # MAC and latency targets are speed targets: shapes off the fast path only when they must.
        # A latency plan is searched over budgets (_measured_latency_plan), which needs plans that only
        # get faster as the budget shrinks: the hull walk's, without the fill.
        pick = allocate_fast_first if metric in ("macs", "latency") else allocate
        chosen = pick(per_layer, target, fixed_cost=fixed, dense_total=dense_total, fill=metric != "latency")
        if plan_by == "logits":
            # The probes changed one layer at a time; with every layer converted the errors compound.
            # The plan by the layers' own errors is kept when, all blocks in, it measures better.
            restored = probe.by_fit_error(per_layer)
            by_error = pick(restored, target, fixed_cost=fixed, dense_total=dense_total, fill=metric != "latency")
            kl_logits, kl_error = probe.plan_kls(original, convs, specs, (chosen, by_error), check_images, **probing)
            log.info("planning by the logits: its plan gives a logit KL of %.4g on %d calibration images, the "
                     "plan by the layers' errors %.4g", kl_logits, len(check_images), kl_error)
            if kl_error < kl_logits:
                planned_by = "error"
                chosen = [cands[rest.index(r)] for cands, rest, r in zip(per_layer, restored, by_error)]
        if metric == "latency":
            chosen = _measured_latency_plan(guard_reference, example, eligible, per_layer, chosen, target, fixed,
                                            dense_total)

    # fit and swap, in execution order
    converted = original if owned else copy.deepcopy(original)
    reference = copy.deepcopy(original) if owned and sequential and batches is not None else original
    plan: list[dict[str, Any]] = []
    records: dict[str, LayerRecord] = {}
    todo = [(s, spec, c) for s, spec, c in zip(eligible, specs, chosen) if c.kind != "dense"]
    for s, cands, c in zip(eligible, per_layer, chosen):
        if c.kind == "dense":
            blocks = [x for x in cands if x.kind != "dense"]
            if not blocks:
                reasons[s.name] = "no block is cheaper than the dense conv"
            elif isinstance(target, MaxError):
                reasons[s.name] = f"lowest block error {min(x.error for x in blocks):.3g} > {target.error:g}"
            else:
                reasons[s.name] = "kept dense by the planner"
    resumable = None
    if batches is not None and sequential:
        from . import calibrate

        # Sequential fits use paired statistics instead: free the one-shot Σ of those layers (float64
        # n × n each, most of the memory the statistics take).
        todo = [(s, spec if s.calls != 1 else replace(spec, sigma=None), c) for s, spec, c in todo]
        del specs
        sigmas.clear()
        # Both models' forwards resumed layer after layer (when traceable and the activations fit).
        paired_layers = [s.name for s, _, _ in todo if s.calls == 1 and s.name not in too_wide]
        resumable = calibrate.SequentialStats.create(reference, converted, paired_layers, batches,
                                                     max_positions=max_positions, seed=seed,
                                                     residual=residual_correction) if paired_layers else None
    bar = tqdm(todo, desc="fitting", unit="layer", disable=not progress)
    for s, spec, c in bar:
        bar.set_postfix_str(s.name)
        w = spec.weight
        sigma_fit, target_w, paired = spec.sigma, w, None
        if batches is not None and sequential and s.calls == 1 and s.name not in too_wide:
            paired = (resumable(s.name) if resumable is not None else
                      calibrate.collect_paired_stats(reference, converted, s.name, batches,
                                                     max_positions=max_positions, seed=seed, progress=False))
            if shift_into[s.name]:
                paired = paired.centred_moments()  # the shift below takes the mean: fit how inputs vary
            shrink = calibrate.merge_weight(w, paired, spec.row_weights, damping=damping)
            if paired.merge_cross is not None:
                log.debug("%s: residual correction weight %.2f (2-fold cross-validation)", s.name, shrink)
            target_w, sigma_fit = calibrate.sequential_target(w, paired, damping=damping, merge_weight=shrink)
        kwargs = {} if c.kind == "igcv1" else dict(max_iter=fit_iters)
        try:
            fit = BLOCKS[c.kind].fit(target_w, sigma=sigma_fit, row_weights=spec.row_weights, damping=damping,
                                     **c.shape, **kwargs)
        except IGCError as err:
            raise err.in_layer(s.name)
        conv = converted.get_submodule(s.name)
        new = make_block(c.kind, conv, c.shape, fit=False, name=s.name)
        new.load_factors(fit.factors, None if conv.bias is None else conv.bias.detach())
        _set_submodule(converted, s.name, new)
        approx = new.dense_weight().detach().to(torch.float64)
        rec = _record(s, new, c.kind, c.shape)
        rec.weight_error = fz.relative_error(w, approx)
        if paired is not None:
            ref = _quadratic(w, paired.sigma_original)
            wm, am = w.reshape(w.shape[0], -1), approx.reshape(w.shape[0], -1)
            cross = float(((wm @ paired.cross) * am).sum())
            err2 = ref - 2 * cross + _quadratic(approx, paired.sigma_actual)
            if paired.merge_cross is not None:  # the error at the residual sum: E‖W p + e − Ŵ p̃‖²
                err2 += (2 * float((wm * paired.merge_original).sum()) + paired.merge_energy
                         - 2 * float((am * paired.merge_cross).sum()))
            if paired.centred and s.name not in mean_removed:
                # Centred moments give the error after the shift. With no BatchNorm to remove it, the
                # layer's mean output reaches the next layer: the error is relative to all of it.
                ref += float((wm @ paired.mean_original.to(wm)).pow(2).sum())
            rec.output_error = math.sqrt(max(err2, 0.0) / ref) if ref > 0 else 0.0
        elif spec.sigma is not None:
            # Under the covariance (``means``) this is the error once the shift below is in place.
            ref = _quadratic(w, spec.sigma) + spec.mean_energy
            rec.output_error = math.sqrt(max(_quadratic(w - approx, spec.sigma), 0.0) / ref) if ref > 0 else 0.0
            if s.name in means:
                _absorb_shift(converted, new, shift_into[s.name], (w - approx).reshape(w.shape[0], -1) @ means[s.name])
                rec.shifted_into = shift_into[s.name]
        if paired is not None and shift_into[s.name]:
            shift = calibrate.output_shift(w, approx, paired)
            if shift is not None:
                _absorb_shift(converted, new, shift_into[s.name], shift)
                rec.shifted_into = shift_into[s.name]
            if shift is not None and rec.output_error is not None and not paired.centred:
                rec.output_error = math.sqrt(max(err2 - float(shift.pow(2).sum()), 0.0) / ref)
        records[s.name] = rec
        plan.append(dict(name=s.name, block=c.kind, shape=c.shape))
    refitted = (_refit_linears(reference, converted, batches, progress)
                if batches is not None and sequential and refit_linears and plan else [])
    for s in sites:
        if s.name not in records:
            records[s.name] = _record(s, None, "dense", {}, reasons.get(s.name, "kept dense"))
    mode = "weight" if batches is None else ("data-aware, sequential" if sequential else "data-aware")
    if plan_by == "logits":
        mode += (", planned by the logits" if planned_by == "logits"
                 else ", planned by the layers' errors (the logits' plan measured worse)")
    if refitted:
        mode += f" (re-fitted: {', '.join(refitted)})"
    report = Report([records[s.name] for s in sites], path, path_reason, _describe(target, multiple), mode,
                    model_name)
    log.info("converted %d of %d convs (%s)", len(plan), len(sites), report.target)
    result = ConversionResult(converted, plan, report,
                              "" if plan else _why_unconverted(target, eligible, per_layer, sites, reasons))
    if isinstance(target, LatencyRatio) and plan:
        # The per-layer plan adds up latencies measured alone; the whole model is what must not be
        # slower: measure it against the original and put layers back until it is within the target.
        from . import latency

        result = latency.enforce_not_slower(guard_reference, result, example, ratio=target.ratio)
    if linear:
        unwrap_dense(result.model)  # Linears left dense become plain nn.Linear again: the plan rebuilds the rest
    stdconv.restore(result.model, standardised)
    if isinstance(target, LatencyRatio) and not result.plan and not result.unconverted:
        # the whole-model check put every layer back
        result.unconverted = (f"every converted layer was put back: with them the model measured slower than "
                              f"{target.ratio:g} × the original on this machine")
    if result.unconverted:
        log.warning("no conv was converted: %s", result.unconverted)
    result.plan[:0] = kept
    return result


def _why_unconverted(target: Target, eligible: Sequence[ConvSite], per_layer: Sequence[Sequence[Any]],
                     sites: Sequence[ConvSite], reasons: Mapping[str, str]) -> str:
    """Why a plan converts no conv, in the words of a ``target`` the user can change."""
    blocks = [(x.error, s.name) for s, cands in zip(eligible, per_layer) for x in cands if x.kind != "dense"]
    if not eligible:
        counts = Counter(reasons[s.name] for s in sites)
        return "no conv can be converted: " + "; ".join(f"{why} ({n}×)" if n > 1 else why for why, n in counts.items())
    if not blocks:
        return "no block shape is cheaper than its dense conv"
    if isinstance(target, MaxError):
        error, name = min(blocks)
        return (f"no block reaches a layer error <= {target.error:g}: the lowest any layer's blocks reach is "
                f"{error:.3g} (at {name}); raise the max error")
    if isinstance(target, LatencyRatio):
        return "no block measured in onnxruntime on this machine fits the latency target"
    if target.ratio >= 1:
        return f"a {'MACs' if isinstance(target, MacsRatio) else 'params'} ratio of {target.ratio:g} keeps every conv dense"
    return "the planner kept every conv dense"


def _functional_convs(model: nn.Module) -> str:
    """Why a model with no ``nn.Conv2d`` may still convolve: a graph that calls the conv ops on weights it
    holds as plain tensors (``torch.export``'s ``ExportedProgram.module()``)."""
    if isinstance(model, torch.fx.GraphModule):
        calls = [n for n in model.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
        if calls:
            return (f" (its graph calls {calls[0].target} on weight tensors, as torch.export's modules do; "
                    "convert the nn.Module it was exported from)")
    return ""


def _refit_linears(reference: nn.Module, converted: nn.Module, batches: Sequence[torch.Tensor],
                   progress: bool) -> list[str]:
    """Re-fit every dense ``nn.Linear`` of ``converted`` (in definition order) to its original outputs.

    Each gets the least-squares weights and bias, ridge towards its own weights with the ridge chosen
    on held-out calibration images, that map the rows it gets in ``converted`` onto what it gave in
    ``reference`` (:func:`calibrate.linear_refit`); where no ridge predicts held-out images better,
    it keeps its weights and only its bias takes the mean error. Linears whose statistics would exceed
    :data:`MAX_LAYER_STATS_BYTES`, or that get anything but ``N×C`` input (token sequences), are left
    as they are. Returns the names re-fitted.
    """
    from . import calibrate

    names = [n for n, m in converted.named_modules() if type(m) is nn.Linear]
    done = []
    for name in tqdm(names, desc="re-fitting linears", unit="layer", disable=not progress or len(names) < 2,
                     leave=False):
        layer = converted.get_submodule(name)
        if 4 * calibrate.stats_bytes(layer) > MAX_LAYER_STATS_BYTES:  # Σ̃, Σ, C per fold, and their moments
            log.info("%s: %d inputs, too wide to re-fit from statistics; left as it is", name, layer.in_features)
            continue
        folds = calibrate.collect_linear_pairs(reference, converted, name, batches)
        if folds is None or len(folds) < 2:
            continue
        original = reference.get_submodule(name)
        weight, bias, before, after, delta = calibrate.linear_refit(original.weight, original.bias, folds)
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight))
            if bias is not None:
                layer.bias.copy_(bias.to(layer.bias))
        if delta is None:
            log.info("%s: a re-fit did not predict held-out calibration images better (relative output error "
                     "%.3f); weights kept%s", name, before, ", bias corrected" if bias is not None else "")
            continue
        log.info("%s re-fitted to the converted layers' features (ridge %g, chosen on held-out calibration "
                 "images): relative output error there %.3f -> %.3f", name, delta, before, after)
        done.append(name)
    return done


def _with_linears_as_convs(model: nn.Module, example: torch.Tensor | None, inplace: bool
                           ) -> tuple[nn.Module, list[str]]:
    """``model`` (itself when ``inplace``, else a copy) with its 2-D-input Linears wrapped as 1×1 convs,
    and the names of those Linears."""
    if example is None:
        raise ConfigError("linear=True needs example inputs (or calibration images): the forward on them shows "
                          "which Linear layers get 2-D inputs")
    working = model if inplace else copy.deepcopy(model)
    wrapped = wrap_linears(working, example)
    if wrapped:
        log.info("converting %d Linear layer(s) as 1x1 convs: %s", len(wrapped), ", ".join(wrapped))
    else:
        log.info("linear=True: no Linear layer gets a 2-D input; none is converted")
    return working, wrapped


def _too_wide_for_statistics(sites: Sequence[ConvSite]) -> set[str]:
    """Names of layers whose input statistics ``Σ`` alone would exceed :data:`MAX_LAYER_STATS_BYTES`."""
    from .calibrate import stats_bytes

    out = set()
    for s in sites:
        size = stats_bytes(s.module)
        if size > MAX_LAYER_STATS_BYTES:
            n = math.isqrt(size // 8)
            log.warning("%s: its input statistics would take %.1f GiB (%d x %d float64), more than %.1f GiB; "
                        "it is fitted in weight space", s.name, size / 2**30, n, n, MAX_LAYER_STATS_BYTES / 2**30)
            out.add(s.name)
    return out


def _measured_latency_plan(original: nn.Module, example: torch.Tensor, eligible: Sequence[ConvSite],
                           per_layer: Sequence[Sequence[Any]], chosen: list, target: LatencyRatio, fixed: float,
                           dense_total: float, rounds: int = 4) -> list:
    """Check a latency plan on the whole model before fitting it; re-plan until it lands near the target.

    Per-layer timings taken alone do not add up to the whole model (onnxruntime fuses and schedules a
    whole graph differently), so the plan's structure is built (unfitted) and timed against the
    original. The latency budget given to the allocation is then scaled by ``aim / measured`` (``aim``
    a little under the target) and the plan made again, in both directions: a plan that measures
    above the target is tightened, and one that measures well under it (below ``target·(1 − margin)``,
    the timing noise band) is loosened, since it gives away accuracy for speed nobody asked for. Once
    a plan has been measured on each side, the next budget stays between the two. At most ``rounds``
    measurements; the fitted plan is the slowest one measured within the target (the last, tightened
    one when none was).
    """
    from . import bench, latency

    margin = latency.DEFAULT_NOISE_MARGIN
    within, close = target.ratio * (1 + margin / 2), target.ratio * (1 - margin)
    aim = target.ratio * (1 - margin / 4)
    internal = target.ratio
    fits: float | None = None     # the largest budget whose plan measured within the target
    too_slow: float | None = None  # the smallest budget whose plan measured above it
    best: tuple[float, list] | None = None
    reference = None  # the original, exported for timing once for every round
    for _ in range(rounds):
        plan = [dict(name=s.name, block=c.kind, shape=c.shape) for s, c in zip(eligible, chosen) if c.kind != "dense"]
        limit = within  # a measurement may read up to half the noise band over the target
        if plan:
            if reference is None:
                reference = bench._module_proto(original, tuple(example.shape), 0)
            measured = latency.plan_latency_ratio(original, plan, example, reference=reference)
            log.info("latency plan at %.3f of the budget measures %.3f x the original (target %.3f)",
                     internal, measured, target.ratio)
        elif best is None:  # the first plan converts nothing: nothing to time
            break
        else:  # loosened until nothing is converted: the original itself, exactly 1.0, nothing to time
            measured, limit = 1.0, target.ratio
        if measured <= limit:
            if best is None or measured > best[0]:
                best = (measured, chosen)
            fits = internal if fits is None else max(fits, internal)
            if measured >= close:
                break
        else:
            too_slow = internal if too_slow is None else min(too_slow, internal)
        nxt = min(internal * aim / max(measured, 1e-9), 1.0)
        if fits is not None and too_slow is not None and not fits < nxt < too_slow:
            nxt = math.sqrt(fits * too_slow)  # between a budget that fits and one that does not
        if nxt == internal:
            break
        internal = nxt
        try:
            replanned = allocate_fast_first(per_layer, LatencyRatio(internal), fixed_cost=fixed,
                                            dense_total=dense_total, fill=False)
        except ConfigError:  # nothing cheaper exists: the final guard reports the miss
            break
        if replanned == chosen:  # the budget moved less than one candidate step: nothing new to time
            break
        chosen = replanned
    return best[1] if best is not None else chosen


def _batchnorm_with_mean(model: nn.Module, site: ConvSite) -> nn.Module | None:
    """The BatchNorm that takes ``site``'s output alone, if it keeps a running mean (else None)."""
    bn = model.get_submodule(site.batchnorm) if site.batchnorm else None
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
        return bn
    return None


def _shift_target(model: nn.Module, site: ConvSite) -> str:
    """What can take a constant added to ``site``'s output: ``"bias"`` (its own), the name of the
    BatchNorm after it (its running mean), or ``""``."""
    if site.module.bias is not None:
        return "bias"
    return site.batchnorm if _batchnorm_with_mean(model, site) is not None else ""


def _absorb_shift(model: nn.Module, block: IGCBlock, into: str, shift: torch.Tensor) -> None:
    """Add ``shift`` to the block's output: to its bias, or out of the BatchNorm ``into``'s running mean
    (``into`` from :func:`_shift_target`)."""
    with torch.no_grad():
        if into == "bias":
            block.bias.add_(shift.to(block.bias))
        else:
            bn = model.get_submodule(into)
            bn.running_mean.sub_(shift.to(bn.running_mean))


def _check_options(*, calibration_samples, damping, **counts: int) -> None:
    if calibration_samples is not None and (isinstance(calibration_samples, bool) or
                                            not isinstance(calibration_samples, int) or calibration_samples < 1):
        raise ConfigError(f"calibration_samples must be a positive integer or None, got {calibration_samples!r}")
    if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}")
    for name, value in counts.items():
        low = 1 if name in ("max_groups", "max_positions") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _site_macs(site: ConvSite) -> float:
    if site.input_hw is None:
        raise ConfigError(f"cannot count MACs of {site.name!r}: it was not called on the example input")
    m = site.module
    out_hw = conv_output_hw(site.input_hw, m.kernel_size, m.stride, m.padding, m.dilation)
    return conv_macs(m.in_channels, m.out_channels, m.kernel_size, m.groups, out_hw) * site.calls


def _record(site: ConvSite, block: IGCBlock | None, kind: str, shape: dict, reason: str = "") -> LayerRecord:
    m = site.module
    params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    macs = None
    if site.input_hw is not None:
        macs = _site_macs(site)
    rec = LayerRecord(site.name, tuple(m.kernel_size), m.in_channels, m.out_channels, tuple(m.stride), kind,
                      dict(shape), reason, params, params, macs, macs, calls=site.calls)
    if block is not None:
        rec.params_after = block.num_params()
        rec.macs_after = block.macs(site.input_hw) * site.calls if site.input_hw is not None else None
    return rec

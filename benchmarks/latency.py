"""Does a conversion make torchvision models faster in onnxruntime, and does the latency plan never slow them?

For each model (random weights, 224×224 input) and each conversion variant, prints the conv-MAC
ratio (``result.report.totals()``) and the onnxruntime latency ratio converted/original. Every
variant of a model is exported with :func:`igc_convert.export.export_onnx` (dynamic batch, as a user
would deploy it) and all of them are timed **in one alternating run together with the original**
(original, v1, v2, …, original, v1, v2, …; the machinery of :func:`igc_convert.bench.bench_onnx`,
with N models instead of two, so the original is timed once for all variants), medians per model.

Variants:

* ``params-0.25``  — ``convert(model, ParamsRatio(0.25))``: the naive swap, MAC-blind;
* ``macs-0.26``    — ``convert(model, MacsRatio(0.26))``;
* ``latency-1.0``  — ``convert(model, LatencyRatio(1.0))`` (which ends with ``enforce_not_slower``):
  the least-error plan within 1.0× is to convert nothing, so this row is also an A/A check of the
  timing noise (an identical graph timed against the original);
* ``latency-0.5``  — ``convert(model, LatencyRatio(0.5))`` (the same guard, at 0.5);
* ``latency-0.33`` — ``convert(model, LatencyRatio(0.33))``: the issue's ResNet-50 goal as a target;
* ``params-0.25+guard`` — ``params-0.25`` then ``enforce_not_slower(ratio=1.0)``: the guard alone
  on a MAC-blind plan;
* ``macs-0.26@8`` / ``@16`` / ``@32``, ``latency-0.33@8`` (only when asked for) — the variant
  planned for groups of a multiple of 8, 16 or 32 channels instead of the default (this CPU's
  NCHWc block; at least 16 for latency targets) (``convert(channel_multiple=...)``).

With ``--linear`` every variant is also converted with ``linear=True`` (its ``nn.Linear`` layers on
2-D inputs become IGC blocks too), as ``<variant>+linear``, timed in the same run; the MAC column
and the params column count conv *and* linear layers of the whole model, for every row (so a row
whose Linears stay dense has them in both numerator and denominator).

Latency plans and guards are made at the batch size of the example input (1); the table also
shows batch 32, where nothing was planned or guarded.

onnxruntime's worker threads spin within each run, as in a session with default options (and stop
at its end: :func:`igc_convert.bench.bench_onnx`); the planner and the guard measure the same way.
``--spinning off`` times with threads that never spin instead, ``both`` times every batch size
both ways, side by side (columns ``bN no-spin``). Goals (the issue): latency ratio within
1.25× of the MAC ratio; no ``latency-1.0`` model slower than its original.

The machine is shared: the load average is printed before and after; only ratios measured side by
side are meaningful, and two identical graphs timed this way differ by several percent.

Usage::

    python3 benchmarks/latency.py --models resnet18 vgg11_bn --batch-sizes 1 32 --runs 20
    python3 benchmarks/latency.py --quick     # resnet18 at 112x112, batch 1, 3 variants, few runs
    python3 benchmarks/latency.py --models vgg11_bn --variants params-0.25 --linear   # with and without Linears
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

import igc_convert
from igc_convert import bench, export, latency
from igc_convert.plan import LatencyRatio, MacsRatio, ParamsRatio

log = logging.getLogger(__name__)

MODELS = ("resnet18", "resnet50", "vgg11_bn")
THREADS = 2
GOAL = 1.25  # latency ratio / MAC ratio


@dataclass(frozen=True)
class Variant:
    name: str
    target: Any
    guard: float | None = None  # enforce_not_slower(ratio=guard) after convert
    channel_multiple: int | None = None  # convert()'s; None: this CPU's onnxruntime NCHWc block
    default: bool = True  # run without --variants


VARIANTS = (
    Variant("params-0.25", ParamsRatio(0.25)),
    Variant("macs-0.26", MacsRatio(0.26)),
    Variant("latency-1.0", LatencyRatio(1.0)),   # convert() ends with enforce_not_slower for these
    Variant("latency-0.75", LatencyRatio(0.75), default=False),  # for compact models that 0.5 cannot reach
    Variant("latency-0.5", LatencyRatio(0.5)),
    Variant("latency-0.33", LatencyRatio(0.33)),
    Variant("params-0.25+guard", ParamsRatio(0.25), guard=1.0),
    # Not run by default: plans made for another channel multiple (8 = AVX2's NCHWc block, 16 = AVX-512's).
    Variant("macs-0.26@8", MacsRatio(0.26), channel_multiple=8),
    Variant("macs-0.26@16", MacsRatio(0.26), channel_multiple=16),
    Variant("macs-0.26@32", MacsRatio(0.26), channel_multiple=32),
    Variant("latency-0.33@8", LatencyRatio(0.33), channel_multiple=8),
)
DEFAULT_VARIANTS = tuple(v.name for v in VARIANTS if v.default and v.channel_multiple is None)


@dataclass
class Row:
    model: str
    variant: str
    converted: str = "-"
    macs_ratio: float | None = None
    params_ratio: float | None = None
    reverted: int = 0
    convert_s: float = 0.0
    latency: dict[tuple[int, bool], float] = field(default_factory=dict)  # (batch, spinning) -> converted / original
    error: str = ""


def build(name: str, seed: int) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).eval()


def conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every ``Conv2d`` (blocks' inner convs included) and ``nn.Linear`` per image of ``x``."""
    total = 0

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total += out.numel() // len(x) * per_output

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def conv_linear_params(model: nn.Module) -> int:
    """Parameters of every ``Conv2d`` (blocks' inner convs included) and ``nn.Linear``."""
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               for p in m.parameters(recurse=False))


def _no_spin(spinning: bool) -> str:
    return "" if spinning else " no-spin"


def column(batch: int, spinning: bool) -> str:
    return f"b{batch}{_no_spin(spinning)}"


def run_model(name: str, variants: Sequence[Variant], *, size: int, batch_sizes: Sequence[int], runs: int,
              big_runs: int, guard_runs: int, workdir: Path, seed: int, linear: bool = False,
              spinning: Sequence[bool] = (True,)) -> tuple[list[Row], dict[tuple[int, bool], float]]:
    """Convert ``name`` every way in ``variants`` (each also with ``linear=True`` when ``linear``), export all,
    time all side by side, at each batch size with each ``spinning`` setting. Returns the rows and the
    original's own median milliseconds per (batch size, spinning)."""
    model = build(name, seed)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if linear:  # conv + linear layers of the whole model, the same count for every row
        original_macs, original_params = conv_linear_macs(model, x), conv_linear_params(model)
    rows, paths = [], []
    for v, with_linear in [(v, lin) for v in variants for lin in ((False, True) if linear else (False,))]:
        row = Row(name, v.name + ("+linear" if with_linear else ""))
        rows.append(row)
        start = time.perf_counter()
        try:
            result = igc_convert.convert(model, v.target, example_inputs=x, progress=False, model_name=name,
                                         linear=with_linear, channel_multiple=v.channel_multiple)
            if v.guard is not None:
                result = latency.enforce_not_slower(model, result, x, ratio=v.guard, runs=guard_runs,
                                                    threads=THREADS)
        except igc_convert.IGCError as err:
            row.error = str(err)
            log.warning("%s %s: %s", name, v.name, err)
            continue
        row.convert_s = time.perf_counter() - start
        t = result.report.totals()
        row.converted = f"{t['converted']}/{t['convs']}"
        row.macs_ratio, row.params_ratio = t["macs_ratio"], t["params_ratio"]
        if linear:
            row.macs_ratio = conv_linear_macs(result.model, x) / original_macs
            row.params_ratio = conv_linear_params(result.model) / original_params
        row.reverted = sum(r.reason == latency.REVERTED for r in result.records)
        path = workdir / f"{name}-{v.name}.onnx"
        export.export_onnx(result.model, path, x)
        paths.append((row, path))
        log.info("%s %s: %s converted, MACs x%.3f, %.0f s", name, row.variant, row.converted, row.macs_ratio or 1,
                 row.convert_s)
        del result
    original = workdir / f"{name}-original.onnx"
    export.export_onnx(model, original, x)
    protos = [onnx.load(str(original))] + [onnx.load(str(p)) for _, p in paths]
    rng = np.random.default_rng(seed)
    original_ms: dict[tuple[int, bool], float] = {}
    for b in batch_sizes:
        xb = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        n = runs if b <= 8 else big_runs
        for spin in spinning:
            log.info("%s: timing %d models at batch %d, %d alternating runs, %s", name, len(protos), b, n,
                     bench.threads_setting(spin))
            times = bench.median_latencies(protos, xb, threads=THREADS, runs=n, warmup=2 if b > 8 else 3,
                                           spinning=spin)
            for (row, _), t in zip(paths, times[1:]):
                row.latency[b, spin] = t / times[0]
            original_ms[b, spin] = times[0] * 1e3
            log.info("%s %s: original %.1f ms", name, column(b, spin), original_ms[b, spin])
    for p in [original, *(p for _, p in paths)]:
        p.unlink(missing_ok=True)
    return rows, original_ms


def table(rows: Sequence[Row], columns: Sequence[tuple[int, bool]], macs: str = "MACs", params: str = "params") -> str:
    head = ["model", "variant", "converted", macs, params, *(f"lat {column(*c)}" for c in columns),
            *(f"lat/MAC {column(*c)}" for c in columns), "reverted", "convert s"]
    cells = [head]
    for r in rows:
        if r.error:
            cells.append([r.model, r.variant, f"failed: {r.error}"] + [""] * (len(head) - 3))
            continue
        lat = [f"{r.latency[c]:.3f}" if c in r.latency else "-" for c in columns]
        per = [f"{r.latency[c] / r.macs_ratio:.2f}" if c in r.latency and r.macs_ratio else "-" for c in columns]
        cells.append([r.model, r.variant, r.converted, _f(r.macs_ratio), _f(r.params_ratio), *lat, *per,
                      str(r.reverted), f"{r.convert_s:.0f}"])
    widths = [max(len(row[i]) for row in cells if len(row) > i) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                   help=f"torchvision classification models (default: {' '.join(MODELS)})")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=[v.name for v in VARIANTS])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--runs", type=int, default=20, help="alternating runs at batch <= 8 (default 20)")
    p.add_argument("--big-runs", type=int, default=6, help="alternating runs at batch > 8 (default 6)")
    p.add_argument("--guard-runs", type=int, default=20, help="runs of each whole-model check of the guard")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--linear", action="store_true",
                   help="also run every variant with nn.Linear layers converted (VARIANT+linear); the MAC and params "
                        "columns then count conv and linear layers in every row")
    p.add_argument("--spinning", choices=("on", "off", "both"), default="on",
                   help="onnxruntime's worker threads: spinning within each run (on, the default, as in a session "
                        "with default options), never spinning (off), or both, side by side")
    p.add_argument("--quick", action="store_true",
                   help="resnet18 at 112x112, batch 1, params/latency-1.0/latency-0.5, 5 runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("igc_convert.export", "igc_convert.convert"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quick:
        args.models, args.size, args.batch_sizes, args.runs, args.guard_runs = ["resnet18"], 112, [1], 5, 5
        args.variants = ["params-0.25", "latency-1.0", "latency-0.5"]
    import torchvision

    known = set(torchvision.models.list_models(module=torchvision.models))
    unknown = [m for m in args.models if m not in known]
    if unknown:
        p.error(f"not torchvision classification models: {', '.join(unknown)}")
    variants = [v for v in VARIANTS if v.name in args.variants]
    torch.set_num_threads(THREADS)
    import onnxruntime as ort

    spins = {"on": (True,), "off": (False,), "both": (True, False)}[args.spinning]
    columns = [(b, spin) for b in args.batch_sizes for spin in spins]
    load0 = os.getloadavg()
    start = time.perf_counter()
    rows: list[Row] = []
    originals: dict[str, dict[tuple[int, bool], float]] = {}
    with tempfile.TemporaryDirectory(prefix="igc-latency-") as tmp:
        for name in args.models:
            model_rows, originals[name] = run_model(
                name, variants, size=args.size, batch_sizes=args.batch_sizes, runs=args.runs, big_runs=args.big_runs,
                guard_runs=args.guard_runs, workdir=Path(tmp), seed=args.seed, linear=args.linear,
                spinning=spins)
            rows += model_rows
    load1 = os.getloadavg()
    print(f"onnxruntime {ort.__version__} CPUExecutionProvider, {THREADS} intra-op threads, 1 inter-op thread, "
          f"{bench.threads_setting(args.spinning != 'off')}; "
          f"torch {torch.__version__}; {bench.cpu_description()}")
    print(f"input {args.size}x{args.size}, random weights (seed {args.seed}); latency plans and guards at batch 1; "
          f"medians of {args.runs} alternating runs at batch <= 8, {args.big_runs} above"
          f"{'' if args.spinning == 'on' else f' (no-spin: {bench.threads_setting(False)})'}; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after; {time.perf_counter() - start:.0f} s in all")
    what = "conv+linear MACs" if args.linear else "conv MACs"
    print(f"lat bN = converted/original onnxruntime latency at batch N; lat/MAC = that over the {what} ratio "
          f"(goal <= {GOAL}); reverted = layers the guard put back to dense"
          + ("; MACs and params count conv and linear layers in every row" if args.linear else ""))
    print()
    print(table(rows, columns, macs="conv+fc MACs" if args.linear else "MACs",
                params="conv+fc params" if args.linear else "params"))
    # The originals' own times tell a quiet spell of a shared machine from a busy one, which moves the
    # ratios too (the smaller model is the more memory-bound).
    print()
    print("originals, median ms: " + "; ".join(
        f"{name} " + ", ".join(f"{ms:.1f} at batch {b}{_no_spin(spin)}" for (b, spin), ms in per.items())
        for name, per in originals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

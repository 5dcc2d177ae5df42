"""Where does the converted model's time go? onnxruntime's own per-kernel profile, by op type.

For each model: convert it (``MacsRatio``, ``ParamsRatio`` or ``LatencyRatio`` as asked), export the
original and the converted model, run both in alternation with onnxruntime's profiler on (CPUExecutionProvider,
2 threads) and sum the kernel times per op type. The table separates what conversion can change (the
``Conv`` kernels) from what it cannot (a classifier's ``Gemm``, pooling) and from the per-node cost
between kernels (wall time minus the kernels' sum; the profiler's own cost is in it, and a median
wall against mean kernel times can make it negative). This is a diagnostic, not a speed figure: kernel
times under the profiler moved by ±30% between runs here (caches: in alternation each model evicts
the other's weights; run back to back, ResNet-50's converted convs read x0.32 of the original's, in
alternation x0.46). Read the split between op types; take speed ratios from benchmarks/latency.py.

Usage::

    python3 benchmarks/op_profile.py --models resnet18 resnet50 vgg11_bn --macs-ratio 0.26
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch

import igc_convert
from igc_convert import bench, export
from igc_convert.plan import LatencyRatio, MacsRatio, ParamsRatio

CONV_OPS = ("Conv", "FusedConv")


def profile(protos: Sequence, x: np.ndarray, *, threads: int, runs: int, workdir: str
            ) -> list[tuple[dict[str, float], float]]:
    """Per model: (milliseconds per run by op type, median wall milliseconds per run).

    The models run in alternation (A B, B A, …; :func:`igc_convert.bench.time_alternating`), each in its
    own profiling session, so a slow spell of the shared machine hits them alike.
    """
    sessions, feeds = [], []
    for k, proto in enumerate(protos):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(workdir, f"ort{k}")
        session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sessions.append(session)
        feeds.append({session.get_inputs()[0].name: x})
    fns = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)]
    walls = bench.time_alternating(fns, runs=runs, warmup=3)
    out = []
    for session, wall in zip(sessions, walls):
        path = session.end_profiling()
        with open(path) as f:
            events = json.load(f)
        os.unlink(path)
        # Only the timed runs: the last ``runs`` model_run windows (the first 3 were warm-up).
        starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")[-runs:]
        lo = starts[0] if starts else 0
        by_op: dict[str, float] = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= lo:
                by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
        out.append((dict(by_op), statistics.median(wall) * 1e3))
    return out


def target_of(args: argparse.Namespace):
    if args.params_ratio is not None:
        return ParamsRatio(args.params_ratio)
    if args.latency_ratio is not None:
        return LatencyRatio(args.latency_ratio)
    return MacsRatio(args.macs_ratio)


def run_model(name: str, args: argparse.Namespace, workdir: str) -> str:
    import torchvision

    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    result = igc_convert.convert(model, target_of(args), example_inputs=x, progress=False, model_name=name)
    macs = result.report.totals()["macs_ratio"]
    xb = np.random.default_rng(args.seed).standard_normal((args.batch_size, 3, args.size, args.size)).astype(np.float32)
    (a, a_wall), (b, b_wall) = profile([export.to_onnx_model(m, x)[0] for m in (model, result.model)], xb,
                                       threads=args.threads, runs=args.runs, workdir=workdir)
    ops = sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0.0) + b.get(k, 0.0)))
    conv_a = sum(a.get(k, 0.0) for k in CONV_OPS)
    conv_b = sum(b.get(k, 0.0) for k in CONV_OPS)
    lines = [f"### {name}: {target_of(args)}, conv MACs x{macs:.3f}, batch {args.batch_size}, {args.threads} threads",
             "", "| op type | original ms | converted ms |", "|---|---:|---:|"]
    for k in ops:
        lines.append(f"| {k} | {a.get(k, 0.0):.2f} | {b.get(k, 0.0):.2f} |")
    ka, kb = sum(a.values()), sum(b.values())
    lines += [f"| all kernels | {ka:.2f} | {kb:.2f} |",
              f"| between kernels (wall − kernels) | {a_wall - ka:.2f} | {b_wall - kb:.2f} |",
              f"| wall (median, profiler on) | {a_wall:.2f} | {b_wall:.2f} |", "",
              f"conv kernels x{conv_b / conv_a:.3f} (per MAC x{conv_b / conv_a / macs:.2f}); all kernels "
              f"x{kb / ka:.3f}; wall x{b_wall / a_wall:.3f}", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50"])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--macs-ratio", type=float, default=0.26)
    group.add_argument("--params-ratio", type=float)
    group.add_argument("--latency-ratio", type=float)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            try:
                print(run_model(name, args, workdir), flush=True)
            except igc_convert.IGCError as err:
                print(f"error: {name}: {err}", file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

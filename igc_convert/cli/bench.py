"""``igc-convert bench``: onnxruntime latency of two ONNX files, side by side."""

from __future__ import annotations

import argparse
import json


HELP = "compare the onnxruntime latency of two ONNX models (alternating runs, medians, ratio B/A)"
EXAMPLE = "igc-convert bench resnet18.onnx resnet18-igc.onnx --batch-size 1 32 --threads 2 --runs 20"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A.onnx", help="reference model (e.g. the original)")
    parser.add_argument("b", metavar="B.onnx", help="model to compare (e.g. the converted one)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32], metavar="B",
                        help="batch sizes to time (default 1 32; a model with a fixed batch uses its own)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and batch size (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                        help="height and width, for models whose spatial size is dynamic")
    parser.add_argument("--no-spinning", dest="spinning", action="store_false",
                        help="onnxruntime's worker threads never spin (as sessions that share their cores are often "
                             "set up); by default they spin within a run, as in a session with default options")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")


def run(args: argparse.Namespace) -> int:
    from ..bench import bench_onnx
    from ..files import atomic_write, check_writable

    from .export import check_size

    size = check_size(args.input_size, "--input-size")
    if args.json:
        check_writable(args.json)
    result = bench_onnx(args.a, args.b, batch_sizes=args.batch_size, threads=args.threads, runs=args.runs,
                        warmup=args.warmup, input_size=None if size is None else (size * 2 if len(size) == 1 else size),
                        spinning=args.spinning)
    print(result.table())
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0

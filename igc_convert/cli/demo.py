"""``igc-convert demo``: the whole pipeline on the embedded digits model, offline."""

from __future__ import annotations

import argparse

HELP = "run the whole story offline: train a digits CNN, convert, distil, export, benchmark, plot"
EXAMPLE = "igc-convert demo --out igc-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="igc-demo", help="folder for the files it writes (default igc-demo)")
    parser.add_argument("--params-ratio", type=float, default=0.25, help="conv parameter budget (default 0.25)")
    parser.add_argument("--train-epochs", type=int, default=6, help="epochs to train the dense model (default 6)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs of distillation (default 3)")
    parser.add_argument("--calib-samples", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument("--bench-runs", type=int, default=30, help="onnxruntime runs per model and batch size")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, calibration sampling and distillation (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, params_ratio=args.params_ratio, train_epochs=args.train_epochs,
                        finetune_epochs=args.finetune_epochs, calib_samples=args.calib_samples,
                        bench_runs=args.bench_runs, threads=args.threads, seed=args.seed))
    return 0

"""Export a converted model and its original to ONNX, check both in onnxruntime, and time them side by side.

Takes a file written by ``convert_torchvision.py`` (or ``igc-convert convert``); the original model is
rebuilt from the file's origin. Each export is checked against PyTorch in onnxruntime (the parity
lines), then the two ONNX files run alternately (A, B, B, A, ...) with the same input and threads,
which makes the latency ratio B/A trustworthy even on a busy machine.

Run::

    python examples/export_and_bench.py resnet18-igc.safetensors --input-size 224 --out-dir onnx/ \\
        --batch-size 1 32 --threads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from igc_convert.bench import bench_onnx
from igc_convert.export import export_onnx
from igc_convert.models import build_model_from_origin
from igc_convert.serialize import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converted", help="converted model file (.safetensors)")
    parser.add_argument("--input-size", type=int, default=224, help="image height and width (default 224)")
    parser.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--out-dir", default="onnx", help="folder for original.onnx and converted.onnx")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32], help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and batch size")
    args = parser.parse_args(argv)

    converted = load(args.converted)
    original = build_model_from_origin(converted.origin)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Two images: the batch dimension stays dynamic, and parity is also checked at another batch size.
    x = torch.randn(2, args.channels, args.input_size, args.input_size, generator=torch.Generator().manual_seed(0))
    paths = [out / "original.onnx", out / "converted.onnx"]
    for model, path in zip((original, converted.model), paths):
        print(export_onnx(model, path, x).summary(), end="\n\n")

    result = bench_onnx(paths[0], paths[1], batch_sizes=args.batch_size, threads=args.threads, runs=args.runs)
    print(result.table())
    for row in result.rows:
        print(f"batch {row.batch_size}: the converted model takes x{row.ratio:.2f} the original's time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

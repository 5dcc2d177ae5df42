"""``igc-convert evaluate``: score converted model files on images, against their labels and against
the original model each file was converted from. Exported ONNX files run in onnxruntime; those that
``igc-convert export`` wrote carry their origin and are compared with their original too, others are
scored against the labels only."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .export import DEFAULT_IMAGE_SIZE, check_size, input_hw, rebuild_original

log = logging.getLogger(__name__)

HELP = ("score converted models on images: top-1 accuracy where the images have labels, top-1 agreement "
        "and KL against the original model")
EXAMPLE = "igc-convert evaluate resnet18-igc.safetensors resnet18-igc-ft.safetensors --data val/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="CONVERTED",
                        help="model files written by igc-convert convert or finetune, or .onnx files (run in "
                             "onnxruntime; compared with the original when igc-convert export wrote them, else "
                             "scored against labels only)")
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="images: 'digits', 'sample-images', 'photos', 'imagenet-samples', or a folder (class "
                             "sub-folders, or images/ and masks/, give labels)")
    parser.add_argument("--split", choices=("all", "train", "val"), default="all",
                        help="all of --data, or the seeded 80/20 split's part (the val part is what convert "
                             "--check-samples and finetune hold out with the same --seed; default all)")
    parser.add_argument("--samples", type=int, metavar="N",
                        help="images: the number of crops for 'sample-images' and 'photos' (default 64), a "
                             "seeded subset of other sources (default: all)")
    parser.add_argument("--original", choices=("auto", "none"), default="auto",
                        help="auto: also score the original model, rebuilt from each file's origin, and compare "
                             "every file with it; none: labels only")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                        help="image height and width for named and folder sources (one value for square images; "
                             "default: the model's declared input size, else 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the crops (default 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    from ..data import check_source, has_labels, resolve_source
    from ..files import atomic_write, check_writable
    from ..bench import OnnxModule
    from ..finetune import has_class_logits, score

    check_size(args.image_size, "--image-size")
    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if args.json:
        check_writable(args.json)
    check_source(args.data)  # before any model is loaded or rebuilt
    files = [_open(path) for path in args.models]  # every file checked before any scoring
    channels, size = _input(files[0], args.image_size)
    data = resolve_source(args.data, split=args.split, samples=args.samples, image_size=size, channels=channels,
                          seed=args.seed)
    log.info("%d images of %s (%s)%s", len(data), args.data, args.split,
             ", labelled" if has_labels(data) else ", no labels")

    rows: list[dict[str, Any]] = []
    originals: dict[str, Any] = {}  # origin (as JSON) -> the original model, scored once
    for path, converted in zip(args.models, files):
        teacher = None
        onnx_file = isinstance(converted, OnnxModule)
        # An exported file carries its origin when igc-convert export wrote it; other ONNX files do not.
        if args.original == "auto" and converted.origin is not None:
            key = json.dumps(converted.origin, sort_keys=True)
            if key not in originals:
                originals[key] = rebuild_original(converted.origin, f"the original model of {path!r}",
                                                  "use --original none to score against labels only")
                # the accuracy the converted files are to be read against (a detector has none)
                if has_labels(data) and has_class_logits(originals[key], data):
                    figures = score(originals[key], data, batch_size=args.batch_size, progress="original")
                    rows.append(_row(f"original ({converted.origin.get('name', '?')})", 1.0, figures))
            teacher = originals[key]
        elif args.original == "auto" and onnx_file:
            log.info("%s carries no origin (not written by igc-convert export): scored against labels only", path)
        model = converted if onnx_file else converted.model
        figures = score(model, data, teacher, batch_size=args.batch_size, progress=path)
        rows.append(_row(path, converted.params_ratio, figures))
    print(_table(rows, len(data), args.data))
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(dict(data=args.data, split=args.split, images=len(data), rows=rows), f, indent=1)
    return 0


def _open(path: str) -> Any:
    """A converted model file, or an ONNX file as an :class:`~igc_convert.bench.OnnxModule`."""
    from ..bench import OnnxModule
    from ..serialize import load

    return OnnxModule(path) if Path(path).suffix.lower() == ".onnx" else load(path)


def _input(first: Any, size: list[int] | None) -> tuple[int, tuple[int, int]]:
    """``(channels, (height, width))`` of the images: an ONNX graph's fixed input, else as for export."""
    from ..bench import OnnxModule

    if not isinstance(first, OnnxModule):
        return input_hw(first.model, size)
    channels, *spatial = first.dims[1:]
    if channels is None or len(spatial) != 2:
        raise ConfigError(f"{first.path}: input {first.dims} is not batch × channels × height × width")
    if size:
        wanted = [size[0], size[-1]]
        if any(d is not None and d != w for d, w in zip(spatial, wanted)):
            raise ConfigError(f"{first.path} takes {spatial[0]}×{spatial[1]} images, not {wanted[0]}×{wanted[1]}")
        return channels, (wanted[0], wanted[1])
    if any(d is None for d in spatial):
        return channels, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    return channels, (spatial[0], spatial[1])


def _row(name: str, params_ratio: float | None, figures: Any) -> dict[str, Any]:
    return dict(model=name, params_ratio=params_ratio,
                accuracy=figures.accuracy if figures is not None else None,
                agreement=figures.agreement if figures is not None else None,
                kl=figures.kl if figures is not None else None,
                feature_error=figures.feature_error if figures is not None else None)


def _table(rows: list[dict[str, Any]], images: int, source: str) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else format("-", f">{fmt.split('.')[0]}")

    width = max(len("model"), *(len(r["model"]) for r in rows))
    # models without class logits (detectors): their converted layers' outputs against the original's
    features = any(r["feature_error"] is not None for r in rows)
    lines = [f"{images} images of {source}",
             f"{'model':<{width}}  {'params':>7}  {'top-1 acc':>9}  {'agreement':>9}  {'KL':>8}"
             + (f"  {'feature error':>13}" if features else "")]
    for r in rows:
        lines.append(f"{r['model']:<{width}}  {cell(r['params_ratio'], '7.3f')}  {cell(r['accuracy'], '9.4f')}  "
                     f"{cell(r['agreement'], '9.4f')}  {cell(r['kl'], '8.4f')}"
                     + (f"  {cell(r['feature_error'], '13.4f')}" if features else ""))
    return "\n".join(lines)

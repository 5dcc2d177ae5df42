"""``igc-convert export``: a converted model file → ONNX, checked against onnxruntime."""

from __future__ import annotations

import argparse
import json
import logging

import torch
from torch import nn

from ..errors import ConfigError, IGCError, ModelError

HELP = "export a converted model (and optionally its original) to ONNX, with onnxruntime parity"
EXAMPLE = "igc-convert export resnet18-igc.safetensors -o resnet18-igc.onnx --original resnet18.onnx --input-size 224"

log = logging.getLogger(__name__)

#: Input height/width of a model that does not declare its own (``pretrained_cfg``).
DEFAULT_IMAGE_SIZE = 224


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("converted", metavar="CONVERTED", help="converted model file (from igc-convert convert)")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                        help="input height and width (one value for square inputs; default: the size the model "
                             "declares, timm's pretrained_cfg, else 224)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the example input (default 1)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=True,
                       help="symbolic batch dimension (default)")
    batch.add_argument("--static-batch", dest="dynamic_batch", action="store_false",
                       help="fix the batch dimension to --batch-size")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="symbolic input height and width as well, for fully convolutional models "
                             "(segmentation, detection backbones, image-to-image); parity is also checked "
                             "at a larger size")
    parser.add_argument("--original", metavar="PATH",
                        help="also export the original (unconverted) model here, the same way, for comparison")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset the file must have (default: the exporter's); --exporter auto takes "
                             "TorchScript where the dynamo exporter cannot convert its graph to it")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="largest accepted onnxruntime-vs-PyTorch error relative to the output scale")
    parser.add_argument("--channels", type=int, default=None,
                        help="input channels (default: those of the model's first conv)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="torch.onnx exporter (auto: dynamo, falling back to TorchScript)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random example input")


def input_channels(model: nn.Module) -> int:
    """Input channels of ``model``: those of its first module that declares ``in_channels`` (the stem conv)."""
    for module in model.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int) and channels > 0:
            return channels
    raise ConfigError("cannot tell the model's input channels (no conv found); pass --channels")


def _declared_input(model: nn.Module) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` the model declares (timm's ``pretrained_cfg`` convention, also
    used by the digits model), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    declared = cfg.get("input_size") if isinstance(cfg, dict) else None
    if declared is not None and len(declared) == 3:
        c, h, w = (int(v) for v in declared)
        return c, h, w
    return None


def check_size(size: list[int] | None, flag: str) -> list[int] | None:
    """``size`` as given on the command line: None, or one or two positive integers (else a ConfigError)."""
    if size is not None and (len(size) not in (1, 2) or min(size) < 1):
        raise ConfigError(f"{flag} takes one or two positive integers (a side, or height and width), got {size}")
    return size


def input_hw(model: nn.Module, size: list[int] | None) -> tuple[int, tuple[int, int]]:
    """``(channels, (height, width))`` of one example input: ``size`` (one side, or height and
    width) when given, else the model's declared input, non-square ones included, else 224²."""
    declared = _declared_input(model)
    channels = declared[0] if declared is not None else input_channels(model)
    if size:
        return channels, (size[0], size[-1])
    if declared is not None:
        return channels, declared[1:]
    return channels, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)


def rebuild_original(origin: dict, what: str, instead: str) -> nn.Module:
    """The original model of a converted file, rebuilt from its ``origin``; any failure (the origin may
    name user code) is one :class:`ModelError`: cannot rebuild ``what``, and what to do ``instead``."""
    from ..models import build_model_from_origin

    try:
        return build_model_from_origin(origin)
    except Exception as err:
        message = str(err) if isinstance(err, IGCError) else f"{type(err).__name__}: {err}"
        raise ModelError(f"cannot rebuild {what}: {message}; {instead}") from err


def _original(origin: dict) -> nn.Module:
    """The original model of a converted file; for timing, a fresh random init of its architecture when
    its random weights cannot be rebuilt (a file that recorded no seed)."""
    from ..models import build_model_from_origin

    try:
        return build_model_from_origin(origin)
    except ModelError as err:
        if origin.get("weights") is not None:
            raise
        log.warning("%s; exporting a fresh random init of the same architecture instead: the same latency, "
                    "other outputs", err)
        return build_model_from_origin(origin, architecture_only=True)


def run(args: argparse.Namespace) -> int:
    from ..export import ORIGIN_KEY, PARAMS_RATIO_KEY, export_onnx
    from ..files import check_writable
    from ..serialize import load

    size = check_size(args.input_size, "--input-size")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Fail on an unwritable destination before minutes of export.
    check_writable(args.output)
    if args.original:
        check_writable(args.original)
    converted = load(args.converted)
    declared_channels, (h, w) = input_hw(converted.model, size)
    channels = args.channels or declared_channels
    x = torch.randn(args.batch_size, channels, h, w, generator=torch.Generator().manual_seed(args.seed))
    options = dict(dynamic_batch=args.dynamic_batch, opset=args.opset, rtol=args.rtol, exporter=args.exporter,
                   dynamic_size=args.dynamic_size)
    # The origin goes into the file, so that `evaluate` can compare it with its original.
    metadata = {ORIGIN_KEY: json.dumps(converted.origin, sort_keys=True)}
    if converted.params_ratio is not None:
        metadata[PARAMS_RATIO_KEY] = repr(float(converted.params_ratio))
    results = [("converted", export_onnx(converted.model, args.output, x, metadata=metadata, **options))]
    if args.original:
        original = _original(converted.origin)
        results.append(("original", export_onnx(original, args.original, x, **options)))
    for name, result in results:
        print(f"{name}: {result.summary()}\n")
    if len(results) == 2:
        (_, conv), (_, orig) = results
        print(f"nodes: original {sum(orig.op_counts.values())}, converted {sum(conv.op_counts.values())}; "
              f"compare latency with: igc-convert bench {orig.path} {conv.path}")
    return 0

"""``igc-convert convert``: a model name (+ weights) and a target → a converted model file and its report."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from ..errors import ConfigError, DataError, ModelError
from ..report import Agreement

HELP = "convert the dense convolutions of a model into IGC blocks and save it with its per-layer report"
EXAMPLE = ("igc-convert convert resnet18 --weights DEFAULT -o resnet18-igc.safetensors --params-ratio 0.25 "
           "--calib sample-images --report report.json")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="torchvision model name (resnet50; also segmentation and detection: deeplabv3_resnet50, "
                             "fasterrcnn_resnet50_fpn), timm:NAME, efficientnet_lite0, or module.path:factory")
    parser.add_argument("-o", "--output", required=True, help="converted model file to write (.safetensors)")
    parser.add_argument("--weights", default="none",
                        help="PATH to a state dict (.pt/.pth/.safetensors; also a checkpoint's 'state_dict' or 'model' "
                             "entry, and a network nested under a prefix such as Lightning's 'model.'), "
                             "DEFAULT (pretrained, may need internet) "
                             "or none (random init; default)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size passed to the model builder")
    parser.add_argument("--block", choices=("igcv1", "igcv2", "igcv3", "auto"), default="igcv1",
                        help="block kind; auto picks per layer (default igcv1)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--params-ratio", type=float, metavar="R",
                        help="total conv parameters <= R x the original's (default 0.5)")
    target.add_argument("--macs-ratio", type=float, metavar="R", help="total conv MACs <= R x the original's")
    target.add_argument("--max-error", type=float, metavar="E", help="every converted layer's relative error <= E")
    target.add_argument("--latency-ratio", type=float, metavar="R",
                        help="onnxruntime latency <= R x the original's, measured here per layer, then for the "
                             "whole model (never slower than the original)")
    parser.add_argument("--calib", metavar="SOURCE",
                        help="calibration images for a data-aware fit: digits, sample-images, photos (18 photos; needs "
                             "scikit-image), imagenet-samples (20 ImageNet images; needs foolbox), or an image folder")
    parser.add_argument("--calib-samples", type=int, default=256, metavar="N", help="calibration images (default 256)")
    parser.add_argument("--check-samples", type=int, default=64, metavar="N",
                        help="with --calib: compare the converted model with the original on N images of the "
                             "source's validation split, which calibration never reads (other crops of the same "
                             "photos for sample-images), and keep the result in the report (default 64; 0: skip)")
    parser.add_argument("--one-shot", action="store_true",
                        help="data-aware fit from the original model's statistics only (faster, less accurate "
                             "than the default sequential fit)")
    parser.add_argument("--plan-by", choices=("error", "logits"), default="error",
                        help="error: spread the target over the layers by their own output errors (default); "
                             "logits: by the KL each layer's shapes cause in the model's output on 16 calibration "
                             "images (with --calib; a forward pass per measured shape, up to 6 per layer). Logits "
                             "suits mild compression, where few layers change (EfficientNet-Lite0 at 0.9-0.5); "
                             "with most layers heavily compressed their errors compound and it did worse (digits "
                             "at 0.05): compare the two with --check-samples")
    parser.add_argument("--no-bias-correction", action="store_true",
                        help="fit each layer to the second moment of its inputs and keep its bias as fitted "
                             "(default: a layer followed by a BatchNorm is fitted to how its inputs vary, and the "
                             "mean of its output error moves into the bias or the next BatchNorm)")
    parser.add_argument("--no-residual-correction", action="store_true",
                        help="fit a residual branch's last conv to its own original output only (default: it also "
                             "makes up for what the converted shortcut misses, so the sum matches)")
    parser.add_argument("--refit-linears", action="store_true",
                        help="sequential mode: also re-fit the dense Linear layers (a classifier head) by least "
                             "squares to the converted layers' features, the ridge chosen on held-out calibration "
                             "images; for models used without fine-tuning")
    parser.add_argument("--linear", action="store_true",
                        help="also convert the Linear layers that take 2-D input (e.g. a classifier), as 1x1 convs "
                             "named LAYER.conv; they then count in the params/MACs ratios")
    parser.add_argument("--channel-multiple", type=int, default=None, metavar="N",
                        help="channels per group that block shapes prefer multiples of (default: onnxruntime's "
                             "NCHWc block on this CPU, 16 with AVX-512, 8 with AVX2, and at least 16 for --latency-ratio; "
                             "give the deployment CPU's)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="layer names to keep dense")
    parser.add_argument("--include", nargs="+", default=None, metavar="GLOB", help="only convert these layers")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                        help="input height and width (one value for square inputs; default: the size the model "
                             "declares, timm's pretrained_cfg, else 224); calibration images get this size")
    parser.add_argument("--report", metavar="JSON", help="also write the per-layer report as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also write a plot of error vs compression per layer")
    parser.add_argument("--seed", type=int, default=0, help="seed for random init and calibration sampling")


def _target(args: argparse.Namespace):
    from ..plan import LatencyRatio, MacsRatio, MaxError, ParamsRatio

    if args.macs_ratio is not None:
        return MacsRatio(args.macs_ratio)
    if args.max_error is not None:
        return MaxError(args.max_error)
    if args.latency_ratio is not None:
        return LatencyRatio(args.latency_ratio)
    return ParamsRatio(0.5 if args.params_ratio is None else args.params_ratio)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert
    from ..files import check_writable
    from ..models import build_model
    from ..serialize import save
    from .export import check_size, input_hw

    target = _target(args)  # validates the ratio before any work
    check_size(args.input_size, "--input-size")
    if args.calib_samples < 1:
        raise ConfigError(f"--calib-samples must be positive, got {args.calib_samples}")
    if args.check_samples < 0:
        raise ConfigError(f"--check-samples must be 0 or more, got {args.check_samples}")
    for path in (args.output, args.report, args.plot):
        if path:
            check_writable(path)
    if args.calib:
        from ..data import check_source

        check_source(args.calib)  # a mistyped source fails before the model is built (a download, maybe)
    torch.manual_seed(args.seed)
    weights = None if str(args.weights).lower() == "none" else args.weights
    model, origin = build_model(args.model, weights, num_classes=args.num_classes, seed=args.seed)
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        raise ModelError(f"{args.model} has no Conv2d layers to convert")
    channels, (height, width) = input_hw(model, args.input_size)
    example = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(args.seed))
    calibration = None
    if args.calib:
        from ..data import resolve_source

        calibration = resolve_source(args.calib, image_size=(height, width), channels=channels, split="train",
                                     samples=args.calib_samples, seed=args.seed)
    result = convert(model, target, block=args.block, example_inputs=example, calibration=calibration,
                     calibration_samples=args.calib_samples, exclude=args.exclude, include=args.include,
                     sequential=not args.one_shot, bias_correction=not args.no_bias_correction,
                     residual_correction=not args.no_residual_correction,
                     refit_linears=args.refit_linears, seed=args.seed, plan_by=args.plan_by,
                     linear=args.linear, channel_multiple=args.channel_multiple, model_name=args.model)
    if result.unconverted:  # the file would be the original model: say why instead of writing it
        raise ConfigError(f"no conv was converted, nothing written: {result.unconverted}")
    if args.calib and args.check_samples:
        result.report.agreement = _check(model, result.model, args, (height, width), channels)
    save(args.output, result.model, origin=origin, plan=result.plan, report=result.report.to_dict())
    print(result.report.table())
    if args.report:
        result.report.save_json(args.report)
    if args.plot:
        result.report.plot(args.plot)
    t = result.report.totals()
    kind = "conv and linear layers" if args.linear else "convs"
    print(f"\nwrote {args.output}: {t['converted']}/{t['convs']} {kind} converted, params x{t['params_ratio']:.3f}"
          + (f", MACs x{t['macs_ratio']:.3f}" if t["macs_ratio"] is not None else ""), file=sys.stderr)
    return 0


def _check(original: torch.nn.Module, converted: torch.nn.Module, args: argparse.Namespace,
           size: tuple[int, int], channels: int) -> Agreement | None:
    """The converted model's agreement with the original on ``--check-samples`` images of ``--calib``'s
    validation split; None (with a warning) when the source is too small to have one."""
    from ..agreement import measure_agreement
    from ..data import resolve_source

    try:
        held_out = resolve_source(args.calib, image_size=size, channels=channels, split="val",
                                  samples=args.check_samples, seed=args.seed)
    except DataError as err:
        log.warning("no agreement check: %s", err)
        return None
    try:
        return measure_agreement(original, converted, held_out, source=f"{args.calib}, validation split",
                                 progress=True)
    except ModelError as err:  # outputs that cannot be compared (a detector's boxes vary in number)
        log.warning("no agreement check: %s", err)
        return None

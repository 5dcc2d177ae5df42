"""``igc-convert finetune``: distil a converted model from its original; resumable; torchrun-ready.

Under ``torchrun --nproc_per_node N igc-convert finetune ...`` (or ``python -m torch.distributed.run
... -m igc_convert finetune ...``) every process runs this command; only rank 0 writes the output.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..data import DEFAULT_CROPS
from ..errors import ConfigError
from ..finetune import DEFAULT_LR, DISTIL, OPTIMIZERS, FinetuneConfig, FinetuneResult
from .export import DEFAULT_IMAGE_SIZE, check_size, input_hw, rebuild_original

HELP = "fine-tune a converted model by distillation from the original (resumable, runs under torchrun)"
EXAMPLE = ("igc-convert finetune resnet18-igc.safetensors -o resnet18-igc-ft.safetensors --data train/ "
           "--val-data val/ --epochs 3 --checkpoint-dir ckpt --resume")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneConfig  # defaults live in one place: the config
    parser.add_argument("converted", metavar="CONVERTED", help="converted model file (from igc-convert convert)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="fine-tuned model file to write")
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="training images: 'digits', 'sample-images', 'photos', 'imagenet-samples', or a folder "
                             "(class sub-folders give labels)")
    parser.add_argument("--val-data", metavar="SOURCE",
                        help="validation images (default: a seeded 20%% of --data, held out from training); with "
                             "labels (a class folder, digits, imagenet-samples) the best epoch is the most accurate")
    parser.add_argument("--samples", type=int, metavar="N",
                        help="training images: the number of crops for 'sample-images' and 'photos' (default "
                             f"{DEFAULT_CROPS}), a seeded subset of other sources (default: all)")
    parser.add_argument("--val-samples", type=int, metavar="N",
                        help=f"validation images, the same way (default: {DEFAULT_CROPS} crops for 'sample-images' "
                             "and 'photos', else the whole held-out split or --val-data)")
    parser.add_argument("--teacher", choices=("auto", "none"), default="auto",
                        help="auto: distil from the original model rebuilt from the file's origin; "
                             "none: learn from labels only (needs --labels)")
    parser.add_argument("--labels", action="store_true",
                        help="the data must have labels, and they must be the model's classes (a folder: one "
                             "sub-folder per output, in sorted order; for a segmentation model, images/ and "
                             "masks/ of class indices); adds cross-entropy on them to the loss. "
                             "Without it, labels that are not the model's classes are ignored")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    parser.add_argument("--lr", type=float, default=d.lr,
                        help=f"peak learning rate (default {DEFAULT_LR['logits']:g} for logit distillation, "
                             f"{DEFAULT_LR['features']:g} for feature distillation)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"images per step and process (default {d.batch_size})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                        help=f"AdamW or SGD with momentum (default {d.optimizer})")
    parser.add_argument("--bn", choices=("auto", "frozen", "live"), default="auto",
                        help=f"BatchNorm running statistics: frozen, updated (live), or auto: frozen below "
                             f"{d.small_dataset} training images (default auto; heavy compression on small data "
                             "does better live, with --lr 1e-2 --batch-size 16)")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help=f"distillation temperature (default {d.temperature})")
    parser.add_argument("--distil", choices=DISTIL, default=d.distil,
                        help="what the teacher teaches: the class logits, or every converted layer's output "
                             "(features: for detectors, embedding models and others without class logits; the "
                             "student trains in eval mode); auto: logits when the model's outputs are class logits, "
                             "not boxes nor an embedding (num_classes 0, a classifier replaced by nn.Identity, "
                             f"unit-length rows) (default {d.distil})")
    parser.add_argument("--feature-weight", type=float, default=d.feature_weight,
                        help="weight of matching each converted block to its original conv "
                             f"(default {d.feature_weight}: off)")
    parser.add_argument("--augment", nargs="?", const="crop+flip", choices=("crop", "crop+flip"), default=None,
                        help="random resized crops (8-100%% of the area) and, unless 'crop', left-right flips of "
                             "the training images at every step (class masks alike); against over-fitting small "
                             "data. Use 'crop' for data that is not mirror-symmetric (digits, text)")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                        help="image height and width for named and folder sources (one value for square "
                             f"images; default: the model's declared input size, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="write a checkpoint here (each epoch and "
                        "every --checkpoint-every steps)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                        help="also checkpoint every STEPS optimiser steps (default: epoch ends only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --checkpoint-dir (exactly as if never interrupted)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of data order, split and init (default 0)")
    parser.add_argument("--workers", type=int, default=d.num_workers, metavar="N",
                        help="data-loading worker processes per training process (default 0: load in-process)")


def run(args: argparse.Namespace) -> int:
    from ..data import check_source, resolve_source
    from ..files import check_writable
    from ..finetune import finetune, is_main_process
    from ..serialize import load, save

    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume continues the run kept in --checkpoint-dir: give --checkpoint-dir")
    if args.teacher == "none" and not args.labels:
        raise ConfigError("--teacher none learns from labels only: add --labels (with labelled --data)")
    check_size(args.image_size, "--image-size")
    for flag, value in (("--samples", args.samples), ("--val-samples", args.val_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    check_writable(args.output)  # before minutes of training
    for source in (args.data, args.val_data):
        if source:
            check_source(source)  # before the teacher is rebuilt (a download, maybe)
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                            temperature=args.temperature, feature_weight=args.feature_weight, distil=args.distil,
                            freeze_bn={"auto": None, "frozen": True, "live": False}[args.bn],
                            kd_weight=1.0 if args.teacher == "auto" else 0.0,
                            ce_weight=1.0 if args.labels else 0.0, seed=args.seed,
                            augment=args.augment is not None, flip=args.augment == "crop+flip",
                            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                            resume=args.resume, num_workers=args.workers)

    converted = load(args.converted)
    teacher = None
    if args.teacher == "auto":
        teacher = rebuild_original(converted.origin, f"the teacher (the original model) of {args.converted!r}",
                                   "use --teacher none --labels to fine-tune on labels only")

    channels, size = input_hw(converted.model, args.image_size)
    options = dict(image_size=size, channels=channels, seed=args.seed)
    if args.val_data:
        train = resolve_source(args.data, split="all", labels=args.labels, samples=args.samples, **options)
        val = resolve_source(args.val_data, split="all", samples=args.val_samples, **options)
    else:
        train = resolve_source(args.data, split="train", labels=args.labels, samples=args.samples, **options)
        val = resolve_source(args.data, split="val", samples=args.val_samples, **options)
        if is_main_process():
            log.info("validation: %d images of %s held out (seed %d); %d to train on", len(val), args.data,
                     args.seed, len(train))

    result = finetune(converted.model, train, teacher=teacher, val_data=val, config=config)
    if is_main_process():
        report = dict(converted.report or {})
        report["finetune"] = summary(result, config, args)
        save(args.output, result.model, origin=converted.origin, plan=converted.plan, report=report)
        print(describe(result))
    return 0


def summary(result: FinetuneResult, config: FinetuneConfig, args: argparse.Namespace) -> dict[str, Any]:
    """JSON-able record of the fine-tuning, kept in the output file's report."""
    import dataclasses

    return {
        "data": args.data, "val_data": args.val_data or f"{args.data} (held-out split)",
        "teacher": args.teacher, "labels": args.labels, "steps": result.steps,
        "config": {**config.trajectory(), "lr": result.lr},  # the learning rate used, default or given
        "best_epoch": result.best.epoch if result.best else None,
        "history": [dataclasses.asdict(e) for e in result.history],
    }


def describe(result: FinetuneResult) -> str:
    """One line for stdout: where the validation metric started and where the kept state is."""
    if result.best is None:
        return f"fine-tuned for {result.steps} steps (no validation data)"
    start, best = result.start, result.best
    return (f"{best.metric}: start {start.value:.4f} -> kept {best.value:.4f} (epoch {best.epoch} of "
            f"{len(result.history) - 1}, {result.steps} steps)")

"""A torchvision detector: convert, then fine-tune by feature distillation (no class logits, no boxes needed).

A detector's outputs are boxes after its own selection, so fine-tuning cannot distil logits: it
matches every converted layer's output against the original layer's, each model on its own
activations (``finetune(..., config=FinetuneConfig(distil="features"))``, :mod:`igc_convert.features`),
and both forwards stop after the last converted layer (the RPN head's conv here).

No detection weights can be downloaded here, so the model is a random init whose BatchNorm
statistics are estimated on photo crops first (without that, its activations shrink by orders of
magnitude through the backbone, and no fit or fine-tuning means anything). It is converted at
``--ratio`` of its conv parameters (data-aware, sequential, calibrated on ``--calib-samples`` crops of
the photos' training split; ``--calib-samples 0``: a weight-space fit), then fine-tuned on
``--train-samples`` crops of the same split. The table gives the feature error (mean over converted layers of ‖ŷ − y‖² / ‖y‖², on crops of the
held-out photos) after conversion and after each epoch. With real weights (``--weights DEFAULT``,
where torchvision can download them) the BatchNorm step is skipped.

Usage (results in the README, "Detectors")::

    python3 benchmarks/detection_distil.py --threads 2                      # 2.5 minutes on 2 cores
    python3 benchmarks/detection_distil.py --threads 2 --calib-samples 0    # from a weight-space fit
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import igc_convert as ic
from igc_convert.data import resolve_source
from igc_convert.finetune import FinetuneConfig, finetune


def estimate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (the model's other layers in eval mode)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    with torch.no_grad():
        for x in images.split(batch_size):
            model(x)
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--weights", default=None, help="torchvision weights (default: a random init)")
    parser.add_argument("--ratio", type=float, default=0.5, help="conv parameters kept (default 0.5)")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--calib-samples", type=int, default=64, help="crops to calibrate on; 0: a weight-space fit")
    parser.add_argument("--train-samples", type=int, default=128)
    parser.add_argument("--val-samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=args.weights, weights_backbone=None).eval()
    options = dict(image_size=(args.size, args.size), channels=3)
    train = resolve_source("photos", split="train", samples=args.train_samples, **options)
    val = resolve_source("photos", split="val", samples=args.val_samples, **options)
    images = torch.stack([train[i][0] for i in range(len(train))])
    if args.weights is None:
        estimate_batchnorm(model, images)

    start = time.perf_counter()
    calibration = images[:args.calib_samples] if args.calib_samples else None
    result = ic.convert(model, ic.ParamsRatio(args.ratio), calibration=calibration, example_inputs=images[:1])
    convert_s = time.perf_counter() - start
    totals = result.report.totals()
    start = time.perf_counter()
    tuned = finetune(result.model, train, teacher=model, val_data=val,
                     config=FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                           distil="features"))
    finetune_s = time.perf_counter() - start

    init = "random init, BatchNorm statistics from photo crops" if args.weights is None else args.weights
    print(f"{args.model}, {init}; {args.size}x{args.size} crops of the photos; {args.threads} threads")
    print(f"converted {sum(1 for r in result.records if r.block != 'dense')}/{len(result.records)} convs: params "
          f"x{totals['params_ratio']:.3f}, MACs x{totals['macs_ratio']:.3f} ({convert_s:.0f} s, "
          + (f"data-aware, sequential, {args.calib_samples} crops)" if args.calib_samples else "weight-space fit)"))
    print(f"fine-tuned by feature distillation: {args.epochs} epochs of {len(train)} crops, lr {args.lr:g}, "
          f"batch {args.batch_size} ({finetune_s:.0f} s)\n")
    print(f"{'state':<22} feature error on {len(val)} held-out crops")
    print("-" * 58)
    for e in tuned.history:
        name = "converted" if e.epoch == 0 else f"after epoch {e.epoch}"
        kept = "  (kept)" if e.epoch == tuned.best.epoch else ""
        print(f"{name:<22} {e.feature_error:.4f}{kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

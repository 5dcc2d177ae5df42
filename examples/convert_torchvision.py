"""Convert a torchvision model's dense convolutions into IGC blocks and check it against the original.

Shows the core of igc-convert: build a model with its weights, convert it to a parameter budget with a
data-aware fit on calibration images, read the per-layer report, measure how closely the converted
model follows the original on held-out images, and save it (a file that reloads without the original
weights).

Run::

    python examples/convert_torchvision.py --model resnet18 --weights DEFAULT --params-ratio 0.25 \\
        --calib sample-images -o resnet18-igc.safetensors

``--weights DEFAULT`` downloads the pretrained weights (internet needed once); offline, pass a state
dict file (``.pth``/``.safetensors``) or ``none`` (random init). ``--calib`` takes ``sample-images``
(crops of scikit-learn's two photos), ``digits`` or a folder of your own images.
"""

from __future__ import annotations

import argparse

import torch

import igc_convert as ic
from igc_convert.agreement import measure_agreement
from igc_convert.data import resolve_source
from igc_convert.models import build_model
from igc_convert.serialize import save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name (or timm:NAME, module:factory)")
    parser.add_argument("--weights", default="DEFAULT", help="DEFAULT, a state dict file, or none")
    parser.add_argument("--params-ratio", type=float, default=0.25, help="conv parameters kept (default 0.25)")
    parser.add_argument("--calib", default="sample-images", help="sample-images, digits, or an image folder")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--check-samples", type=int, default=16, help="held-out images for the check (default 16)")
    parser.add_argument("--input-size", type=int, default=224, help="image height and width (default 224)")
    parser.add_argument("-o", "--output", default="converted.safetensors", help="file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)  # random init (--weights none) and calibration sampling
    original, origin = build_model(args.model, args.weights)
    # Calibration and check images come from disjoint splits: the check measures generalisation.
    source = dict(image_size=args.input_size, seed=args.seed)
    calib = resolve_source(args.calib, split="train", samples=args.calib_samples, **source)
    check = resolve_source(args.calib, split="val", samples=args.check_samples, **source)

    result = ic.convert(original, ic.ParamsRatio(args.params_ratio), calibration=calib, seed=args.seed,
                        model_name=args.model)
    print(result.report.table())

    # the whole model against the original on images the fit never saw; kept in the saved report
    result.report.agreement = measure_agreement(original, result.model, check, source=f"{args.calib}, val split")
    totals = result.report.totals()
    print(f"\nconv params x{totals['params_ratio']:.3f}, conv MACs x{totals['macs_ratio']:.3f}")
    print(result.report.agreement.text())
    save(args.output, result.model, origin=origin, plan=result.plan, report=result.report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

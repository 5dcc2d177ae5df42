"""Fine-tune a converted model on a folder of your own images, by distillation from the original.

``--data`` is a folder of images, flat (distillation needs no labels) or with one sub-folder per class
(ImageFolder layout). Sub-folders are labels: sorted, they must be the model's class indices (as in
ImageNet's layout, or the folder the model was trained on); validation accuracy then ranks the epochs,
and ``--labels`` adds cross-entropy. A seeded 20% is held out; the state kept is the best on it (never
worse than the start: the accuracy, or the top-1 agreement with the original when unlabelled).
The model to fine-tune is either converted here (``--model``, ``--weights``) or read from a file
written by ``convert_torchvision.py`` (``--converted``; its original is rebuilt as the teacher).

Run::

    python examples/finetune_imagefolder.py --data path/to/images --model resnet18 --weights DEFAULT \\
        --epochs 3 -o resnet18-igc-tuned.safetensors
    python examples/finetune_imagefolder.py --data path/to/images --converted resnet18-igc.safetensors
"""

from __future__ import annotations

import argparse

import torch

import igc_convert as ic
from igc_convert.data import resolve_source
from igc_convert.finetune import FinetuneConfig, finetune
from igc_convert.models import build_model, build_model_from_origin
from igc_convert.serialize import load, save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of images (class sub-folders or flat)")
    parser.add_argument("--converted", help="converted model file to fine-tune (instead of converting here)")
    parser.add_argument("--model", default="resnet18", help="model to convert when --converted is not given")
    parser.add_argument("--weights", default="DEFAULT", help="its weights: DEFAULT, a state dict file, or none")
    parser.add_argument("--params-ratio", type=float, default=0.25, help="conv parameters kept (default 0.25)")
    parser.add_argument("--image-size", type=int, default=224, help="image height and width (default 224)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 (grey) or 3 (RGB; default)")
    parser.add_argument("--labels", action="store_true", help="also learn from the class sub-folders (cross-entropy)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("-o", "--output", default="tuned.safetensors", help="file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = dict(image_size=args.image_size, channels=args.channels, seed=args.seed)
    train = resolve_source(args.data, split="train", labels=args.labels, **data)
    val = resolve_source(args.data, split="val", **data)  # disjoint from train, same seed
    if args.converted:
        converted = load(args.converted)
        student, origin, plan = converted.model, converted.origin, converted.plan
        teacher = build_model_from_origin(origin)
    else:
        torch.manual_seed(args.seed)
        teacher, origin = build_model(args.model, args.weights, seed=args.seed)  # seeds a random init
        result = ic.convert(teacher, ic.ParamsRatio(args.params_ratio), calibration=train, seed=args.seed,
                            model_name=args.model)
        student, plan = result.model, result.plan
        print(result.report.table())

    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            ce_weight=1.0 if args.labels else 0.0)
    tuned = finetune(student, train, teacher=teacher, val_data=val, config=config)
    print(f"\n{len(train)} training images, {len(val)} held out; validation ({tuned.best.metric} ranks):")
    for evaluation in tuned.history:
        print(f"  epoch {evaluation.epoch}: {evaluation.summary()}"
              + ("  <- kept" if evaluation == tuned.best else ""))
    save(args.output, tuned.model, origin=origin, plan=plan)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

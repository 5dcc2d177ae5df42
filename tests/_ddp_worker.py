"""Worker of test_finetune's torchrun test: a tiny distillation on CPU processes (gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT [features]``.
With ``features`` the student's second conv is an IGC block and it is distilled on that layer's
outputs (``distil="features"``): DDP then runs a forward cut short, and the head gets no gradient.
Each rank saves ``OUT/rank{RANK}.pt`` with its final weights and the paths it wrote through
``atomic_write`` (spied on), so the test can check identical weights and rank-0-only checkpoints.
"""

import importlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

ft = importlib.import_module("igc_convert.finetune")  # the package binds the function to "finetune"
from igc_convert.data import resolve_source


def tiny(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(width, 10))


def main(out: Path, distil: str = "auto") -> None:
    writes: list[str] = []
    real = ft.atomic_write

    def spy(path, mode="wb"):
        writes.append(str(path))
        return real(path, mode)

    ft.atomic_write = spy
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same teacher and student on every rank (DDP would broadcast rank 0's anyway)
    teacher, student = tiny(), tiny()
    if distil == "features":
        from igc_convert.blocks import IGCV1

        student[3] = IGCV1.from_conv(teacher[3], primary_groups=2, secondary_groups=2, rank=2)
    train = resolve_source("digits", image_size=8, channels=1, split="train", samples=192)
    val = resolve_source("digits", image_size=8, channels=1, split="val", samples=64)
    # freeze_bn=False: BatchNorm buffers change too, and DDP must keep them equal across ranks.
    config = ft.FinetuneConfig(epochs=2, batch_size=16, lr=3e-3, freeze_bn=False, checkpoint_dir=out / "ckpt",
                               checkpoint_every=2, progress=False, distil=distil)
    result = ft.finetune(student, train, teacher=teacher, val_data=val, config=config)
    rank = int(os.environ["RANK"])
    torch.save({"state": result.model.state_dict(), "writes": writes, "steps": result.steps,
                "world": int(os.environ["WORLD_SIZE"]), "history": [e.value for e in result.history]},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])

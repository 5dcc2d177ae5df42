"""Smoke test of benchmarks/detection_distil.py: a torchvision detector converted and fine-tuned by
feature distillation, with tiny settings; and its BatchNorm estimate."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

from conftest import load_script


@pytest.fixture(scope="module")
def det():
    yield load_script("benchmarks/detection_distil.py", "detection_distil_benchmark")
    sys.modules.pop("detection_distil_benchmark", None)


def test_batchnorm_statistics_are_those_of_the_images(det):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(20, 3, 6, 6) * 3 + 1
    det.estimate_batchnorm(model, x, batch_size=5)
    with torch.no_grad():
        y = model[0](x)
    torch.testing.assert_close(model[1].running_mean, y.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not model.training and not model[1].training


def test_main_prints_the_feature_error_before_and_after_each_epoch(det, capsys):
    assert det.main(["--calib-samples", "0", "--train-samples", "8", "--val-samples", "4", "--epochs", "1",
                     "--batch-size", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fasterrcnn_mobilenet_v3_large_320_fpn, random init" in out and "weight-space fit" in out
    rows = re.findall(r"^(converted|after epoch \d+) +([\d.]+)(  \(kept\))?$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["converted", "after epoch 1"]
    errors = [float(r[1]) for r in rows]
    kept = [e for e, r in zip(errors, rows) if r[2]]
    assert len(kept) == 1 and kept[0] == min(errors) and 0 < errors[0] < 1

"""Smoke test of benchmarks/segmentation_digits.py: its main() with tiny settings, and its labels."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from conftest import load_script


@pytest.fixture(scope="module")
def seg():
    yield load_script("benchmarks/segmentation_digits.py", "segmentation_digits_benchmark")
    sys.modules.pop("segmentation_digits_benchmark", None)


def test_digit_masks_label_ink_with_the_digit_and_the_rest_as_background(seg):
    x, y = seg.digit_masks(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797, 16, 16)
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target)
    for i in (0, 5, 100):
        values = set(y[i].unique().tolist())
        assert values == {int(target[i]), seg.BACKGROUND}


def test_main_prints_every_init_and_the_dynamic_size_export(seg, capsys):
    assert seg.main(["--size", "16", "--epochs", "1", "--ft-epochs", "1", "--calib-images", "32",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\(.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out, re.MULTILINE)
    assert [r[0][:3] for r in rows] == ["(a)", "(b)", "(c)", "(c)"]
    for _, params, accuracy, agreement, kl in rows:
        assert float(params) <= 0.25 and 0 < float(accuracy) <= 1 and 0 < float(agreement) <= 1 and float(kl) >= 0
    unseen = re.search(r"parity ([\d.e+-]+) at the sizes checked, ([\d.e+-]+) at 32x48", out)
    assert unseen and float(unseen.group(1)) < 1e-4 and float(unseen.group(2)) < 1e-4

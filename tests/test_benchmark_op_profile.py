"""Smoke test of benchmarks/op_profile.py: per-op kernel times of original and converted ResNet-18."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def op_profile():
    yield load_script("benchmarks/op_profile.py", "op_profile_benchmark")
    sys.modules.pop("op_profile_benchmark", None)


def test_main_profiles_both_models(op_profile, capsys):
    # 10 runs, not 2: with 2 the kernel-time ratio of this 32² model read 0.38-1.53 over six runs (noise)
    rc = op_profile.main(["--models", "resnet18", "--size", "32", "--runs", "10", "--macs-ratio", "0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (Conv|all kernels) \| ([0-9.]+) \| [0-9.]+ \|$", out, re.M))
    assert float(rows["Conv"]) > 0 and float(rows["all kernels"]) >= float(rows["Conv"])
    ratio = float(re.search(r"conv kernels x([0-9.]+)", out).group(1))
    assert 0 < ratio < 1.5

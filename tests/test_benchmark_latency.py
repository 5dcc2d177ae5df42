"""Smoke test of benchmarks/latency.py: conversions exported and timed side by side with the original."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def latency_benchmark():
    yield load_script("benchmarks/latency.py", "latency_benchmark")
    sys.modules.pop("latency_benchmark", None)


def test_main_prints_the_ratios_and_the_originals_own_times(latency_benchmark, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the per-layer timing cache stays in the test's folder
    rc = latency_benchmark.main(["--models", "resnet18", "--size", "64", "--batch-sizes", "1", "--runs", "3",
                                 "--guard-runs", "3", "--variants", "params-0.25", "latency-1.0", "--spinning", "both"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"lat b1\s+lat b1 no-spin\s+lat/MAC b1\s+lat/MAC b1 no-spin", out), out  # both ways, side by side
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^resnet18\s+(\S+)\s+(\d+)/20\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)",
        out, re.M)}
    assert set(rows) == {"params-0.25", "latency-1.0"}, out
    converted, macs, params, lat, lat_off, per_mac, per_mac_off = rows["params-0.25"]
    assert int(converted) > 0 and float(params) <= 0.25 + 1e-9
    assert float(per_mac) == pytest.approx(float(lat) / float(macs), abs=0.01)
    assert float(per_mac_off) == pytest.approx(float(lat_off) / float(macs), abs=0.01)
    assert rows["latency-1.0"][:3] == ("0", "1.000", "1.000")  # the least-error plan within 1.0x converts nothing
    original = re.search(r"^originals, median ms: resnet18 ([0-9.]+) at batch 1, ([0-9.]+) at batch 1 no-spin$",
                         out, re.M)
    assert original and float(original.group(1)) > 0 and float(original.group(2)) > 0
    assert (tmp_path / "igc-convert" / "latency.json").is_file()


def test_models_must_be_torchvision_classifiers(latency_benchmark, capsys):
    with pytest.raises(SystemExit) as info:
        latency_benchmark.main(["--models", "resnet18", "resnet9000"])
    assert info.value.code == 2 and "resnet9000" in capsys.readouterr().err

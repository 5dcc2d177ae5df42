"""Smoke test of benchmarks/fit_quality.py: its main() on a tiny CNN, its shape choice and its totals."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from conftest import load_script


@pytest.fixture(scope="module")
def fq():
    yield load_script("benchmarks/fit_quality.py", "fit_quality_benchmark")
    sys.modules.pop("fit_quality_benchmark", None)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),               # stem: 3 input channels do not split into groups
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: never converted
        nn.Conv2d(16, 32, 1),
    )


def test_main_on_tiny_model(fq, tmp_path, capsys):
    out_json = tmp_path / "fit.json"
    rc = fq.main(["--model", "tiny", "--threads", "1", "--max-iter", "5", "--budgets", "0.5", "0.25", "--json", str(out_json)],
                 builders={"tiny": tiny_cnn})
    assert rc == 0
    text = capsys.readouterr().out
    assert "**Totals**" in text and "| 0.25 | igcv3g2 |" in text
    report = json.loads(out_json.read_text())["tiny"]
    assert [l["name"] for l in report["layers"]] == ["0", "2", "4"]  # the depthwise conv "3" is skipped
    model = tiny_cnn()
    for layer in report["layers"]:
        w = model.get_submodule(layer["name"]).weight.detach().double()
        for key, fit in layer["fits"].items():
            budget, kind = key.split("/")
            if fit["error"] is None:
                continue
            assert 0 <= fit["error"] <= 1 + 1e-9, (key, fit)
            assert 0 < fit["params"] <= float(budget) * w.numel(), (key, fit)
        # the SVD column is the Eckart–Young error at the chosen rank
        rank = int(layer["fits"]["0.5/svd"]["shape"].split("r")[1])
        s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        expected = math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))
        assert layer["fits"]["0.5/svd"]["error"] == pytest.approx(expected, rel=1e-6)
    stem = report["layers"][0]["fits"]
    assert stem["0.5/igcv1"]["error"] is None and stem["0.5/igcv3g2"]["error"] is None
    assert stem["0.5/svd"]["error"] is not None
    # more budget, less error (closed-form kinds: exact optimum at each rank)
    for layer in report["layers"][1:]:
        for kind in ("svd", "igcv1"):
            assert layer["fits"][f"0.5/{kind}"]["error"] < layer["fits"][f"0.25/{kind}"]["error"]


def test_bad_budget_is_a_user_error(fq, capsys):
    assert fq.main(["--model", "tiny", "--budgets", "1.5"], builders={"tiny": tiny_cnn}) == 2
    assert "budgets must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["svd", "igcv1", "igcv2", "igcv3", "igcv3g2"])
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (96, 48, 1, 1), (16, 3, 3, 3)], ids=["3x3", "1x1", "stem"])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_candidates_fit_the_budget_and_are_largest(fq, kind, shape, budget):
    limit = budget * math.prod(shape)
    for c in fq.candidates(kind, shape, budget):
        assert 0 < c.params <= limit
        if c.block == "igcv1":  # one more rank would not fit (or the rank is already full)
            s = dict(c.shape)
            L, M = s["primary_groups"], s["secondary_groups"]
            full = min(shape[0] // M, shape[1] // L * shape[2] * shape[3])
            if s["rank"] < full:
                s["rank"] += 1
                assert fq.block_weight_params("igcv1", shape, s) > limit
        if c.block == "igcv3":
            s = dict(c.shape)
            g = s["expand_groups"] * s["reduce_groups"]
            s["mid_channels"] += g
            assert fq.block_weight_params("igcv3", shape, s) > limit


def test_totals_are_the_model_relative_error(fq):
    kr = fq.KindResult
    layers = [fq.LayerResult("a", (2, 2, 1, 1), 4, 4.0, {(0.5, "svd"): kr(error=0.5, params=2),
                                                          (0.5, "igcv1"): kr(error=None)}),
              fq.LayerResult("b", (2, 2, 1, 1), 4, 1.0, {(0.5, "svd"): kr(error=1.0, params=2),
                                                          (0.5, "igcv1"): kr(error=0.2, params=2)})]
    t = fq.totals(layers, 0.5, ["svd", "igcv1"])
    assert t["svd"]["error"] == pytest.approx(math.sqrt((0.25 * 4 + 1 * 1) / 5))
    assert t["svd"]["error_common"] == pytest.approx(1.0)  # only layer b is common
    assert t["igcv1"]["layers"] == 1 and t["igcv1"]["error"] == pytest.approx(0.2)


def test_time_igcv1_all_swaps_every_dense_conv(fq):
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8)
    info = fq.time_igcv1_all(model)
    assert info["convs"] == 3
    assert info["seconds"] >= 0 and info["model_mb"] > 0
    igc = [n for n, m in model.named_modules() if getattr(m, "is_igc_block", False)]
    assert igc == ["0", "2", "4"]  # every dense conv swapped (the stem by a low-rank pair)
    assert isinstance(model[3], nn.Conv2d) and model[3].groups == 16  # depthwise kept
    assert 0 < info["block_params"] < sum(p.numel() for p in tiny_cnn().parameters())
    assert model(x).shape == (2, 32, 8, 8)

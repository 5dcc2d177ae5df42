"""Smoke test of benchmarks/fidelity.py: its main() on a tiny CNN and digits, and its metrics and baselines."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import load_script


@pytest.fixture(scope="module")
def fd():
    yield load_script("benchmarks/fidelity.py", "fidelity_benchmark")
    sys.modules.pop("fidelity_benchmark", None)


class TinyCNN(nn.Module):
    """Stem, a 3×3 conv, a depthwise conv (never converted) and a 1×1 conv, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained_cfg = {"input_size": (1, 12, 12)}
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
            nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def with_conv_scaled(factor: float) -> nn.Module:
    """:func:`tiny_cnn` with its 3×3 conv's kernel scaled: a model that differs from it a little."""
    model = tiny_cnn()
    with torch.no_grad():
        model.features[3].weight.mul_(factor)
    return model


def image_folder(root: Path, count: int = 40) -> Path:
    """A flat folder of smooth random grayscale PNGs: a data source resolve_source accepts, no download."""
    from PIL import Image

    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        img = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=gen), size=(16, 16), mode="bilinear")
        Image.fromarray((img[0, 0] * 255).byte().numpy(), mode="L").save(root / f"{i:03d}.png")
    return root


def test_main_on_tiny_model(fd, tmp_path, capsys):
    out = tmp_path / "fid.json"
    images = image_folder(tmp_path / "images")
    rc = fd.main(["--model", "tiny", "--calib", str(images), "--budgets", "0.6", "--calib-images", "24",
                  "--eval-images", "16", "--batch-size", "8", "--json", str(out)], builders={"tiny": tiny_cnn})
    assert rc == 0
    text = capsys.readouterr().out
    assert "| 0.6 | sequential |" in text and "### goals" in text
    results = json.loads(out.read_text())["results"]
    methods = {r["method"] for r in results}
    expected = set(fd.DEFAULT_METHODS) - (set() if fd.have_tensorly() else {"tucker2"})
    assert methods == expected
    for r in results:
        assert r["params_ratio"] <= 0.6 + 1e-9, r["method"]
        assert set(r["isolated"]) == {"features.0", "features.3", "features.8"}  # the depthwise conv is skipped
        assert r["kl"] >= 0 and 0 <= r["top1"] <= 1
        assert all(v >= 0 and math.isfinite(v) for v in [*r["isolated"].values(), *r["drift"].values()])
        # the first converted layer sees the original's input in both models: drift == isolated there
        first = "features.0"
        assert r["drift"][first] == pytest.approx(r["isolated"][first], rel=1e-4, abs=1e-6)
        assert (r["in_sample"] is not None) == (r["method"] in fd.DATA_METHODS)
        assert r["calib_kl"] >= 0 and 0 <= r["calib_top1"] <= 1
    # the weight-space fit of (b)'s plan: the same layers and sizes, a different (worse in sample) fit
    by = {r["method"]: r for r in results}
    same, data = by["weight-same-plan"], by["data"]
    assert same["converted"] == data["converted"] and same["params_ratio"] == pytest.approx(data["params_ratio"])
    assert {k for k, v in same["isolated"].items() if v > 0} == {k for k, v in data["isolated"].items() if v > 0}
    assert "the same plan fitted in weight space" in text


def test_same_plan_method_alone_builds_the_plan_it_needs(fd):
    """``--methods weight-same-plan`` without ``data``: (b) is converted for its plan, not scored."""
    model = tiny_cnn()
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    settings = fd.Settings(budgets=(0.6,), methods=("weight-same-plan",), calib_images=24, eval_images=16,
                           batch_size=8)
    results = fd.run_benchmark(model, [fd.DataSplit("random", x[:24], x[24:])], settings)
    assert [r.method for r in results] == ["weight-same-plan"]
    assert results[0].converted >= 1 and results[0].params_ratio <= 0.6 + 1e-9 and not results[0].note


def test_evaluate_identity_and_known_error(fd):
    model = tiny_cnn()
    layers = fd.convertible_layers(model)
    assert layers == ["features.0", "features.3", "features.8"]
    scaled = tiny_cnn()
    with torch.no_grad():
        scaled.features[8].weight.mul_(1.1)
        scaled.features[8].bias.mul_(1.1)
    x = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    scores = fd.evaluate(model, {"same": tiny_cnn(), "scaled": scaled}, layers, x, batch_size=4)
    same = scores["same"]
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1
    assert max(same["isolated"].values()) == 0 and max(same["drift"].values()) == 0
    # a kernel scaled by 1.1 has relative output error exactly 0.1 in that layer, 0 before it
    assert scores["scaled"]["isolated"]["features.8"] == pytest.approx(0.1, rel=1e-5)
    assert scores["scaled"]["isolated_bn"]["features.8"] == pytest.approx(0.1, rel=1e-5)
    assert scores["scaled"]["drift"]["features.3"] == 0
    assert scores["scaled"]["kl"] > 0


def test_evaluate_counts_a_bias_moved_into_the_batchnorm(fd):
    """A layer whose error mean went into the next BatchNorm's running mean (the converter's bias
    correction) is scored on what the BatchNorm sees; *at BN* is relative to the centred output."""
    model = tiny_cnn()
    layers = fd.convertible_layers(model)
    with torch.no_grad():
        model.features[1].running_mean.normal_(generator=torch.Generator().manual_seed(2))
    shifted = tiny_cnn()
    with torch.no_grad():
        shifted.features[1].running_mean.copy_(model.features[1].running_mean)
        conv = shifted.features[0]
        biased = nn.Conv2d(1, 16, 3, padding=1, bias=True)
        biased.weight.copy_(conv.weight)
        biased.bias.fill_(0.5)
        shifted.features[0] = biased
        shifted.features[1].running_mean.add_(0.5)  # the BatchNorm takes the bias back out
    x = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    offsets = fd.bn_mean_offsets(model, shifted, fd.batchnorms_after(model, layers))
    assert offsets["features.0"].flatten().tolist() == [-0.5] * 16
    scores = fd.evaluate(model, {"shifted": shifted}, layers, x, batch_size=4)["shifted"]
    assert scores["isolated"]["features.0"] == pytest.approx(0, abs=1e-6)
    assert scores["drift"]["features.0"] == pytest.approx(0, abs=1e-6)
    assert scores["kl"] == pytest.approx(0, abs=1e-9)
    # at the BatchNorm: a 1.1-scaled kernel's error against the output minus the running mean
    scaled = tiny_cnn()
    scaled.features[1].running_mean.copy_(model.features[1].running_mean)
    with torch.no_grad():
        scaled.features[0].weight.mul_(1.1)
        y = model.features[0](x)
    got = fd.evaluate(model, {"scaled": scaled}, layers, x, batch_size=4)["scaled"]
    centred = y - model.features[1].running_mean.view(1, -1, 1, 1)
    w = fd.bn_scales(model, layers)["features.0"].view(1, -1, 1, 1)
    want = float((w * 0.1 * y).norm() / (w * centred).norm())
    assert got["isolated_at_bn"]["features.0"] == pytest.approx(want, rel=1e-5)
    assert got["isolated"]["features.0"] == pytest.approx(0.1, rel=1e-5)


def test_bn_scales_find_the_following_batchnorm(fd):
    model = tiny_cnn()
    with torch.no_grad():
        model.features[1].weight.fill_(-2.0)
        model.features[1].running_var.fill_(4.0 - model.features[1].eps)
    scales = fd.bn_scales(model, fd.convertible_layers(model))
    assert set(scales) == {"features.0", "features.3"}  # features.8 feeds a ReLU, not a BatchNorm
    torch.testing.assert_close(scales["features.0"], torch.ones(16, dtype=torch.float64))  # |-2| / sqrt(4)


def test_uniform_ratio_lands_on_budget(fd):
    model = tiny_cnn()
    layers = fd.convertible_layers(model)
    total = fd.conv_params(model)
    fixed = total - sum(p.numel() for n in layers for p in model.get_submodule(n).parameters())
    ratio = fd.uniform_ratio(model, layers, 0.5)
    assert ratio >= (0.5 * total - fixed) / (total - fixed) - 1e-12  # never below the plain per-layer ratio
    with pytest.raises(fd.ConfigError, match="not reachable"):
        fd.uniform_ratio(model, layers, fixed / total / 2)


@pytest.mark.skipif(importlib.util.find_spec("tensorly") is None, reason="tensorly not installed")
def test_tucker2_layer_matches_the_decomposition_and_fits_the_budget(fd):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=True)
    energy = fd.TuckerEnergy(conv)
    ranks = energy.ranks(0.5 * energy.dense)
    assert ranks is not None and energy.params(*ranks) <= 0.5 * energy.dense
    layer = fd.tucker2_layer(conv, *ranks)
    assert sum(p.numel() for p in layer.parameters()) == energy.params(*ranks)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    assert y.shape == ref.shape
    assert 0 < float((y - ref).norm() / ref.norm()) < 1
    full = fd.tucker2_layer(conv, 24, 16)  # full ranks reproduce the conv
    with torch.no_grad():
        torch.testing.assert_close(full(x), ref, rtol=1e-4, atol=1e-4)
    model = tiny_cnn()
    layers = fd.convertible_layers(model)
    out, done = fd.tucker2_convert(model, layers, 0.6)
    assert done >= 1 and fd.conv_params(out) <= 0.6 * fd.conv_params(model)


def test_photo_crops_come_from_one_photo(fd):
    china = fd.photo_crops(0, 3, 32, 3, seed=0)
    flower = fd.photo_crops(1, 3, 32, 3, seed=0)
    assert china.shape == flower.shape == (3, 3, 32, 32)
    assert not torch.allclose(china.mean((0, 2, 3)), flower.mean((0, 2, 3)), atol=0.05)


def test_scene_halves_share_no_pixel(fd):
    pytest.importorskip("skimage")
    from igc_convert.data import all_photos

    first, second = fd.scene_halves(0), fd.scene_halves(1)
    for (name, photo), (_, a), (_, b) in zip(all_photos(), first, second):
        dim = 2 if photo.shape[2] >= photo.shape[1] else 1  # cut across the long side
        assert torch.equal(torch.cat([a, b], dim), photo), name
        assert min(a.shape[dim], b.shape[dim]) >= photo.shape[dim] // 2
    calib = fd.scene_half_crops(0, 6, 16, 3, seed=0)
    held_out = fd.scene_half_crops(1, 6, 16, 3, seed=0)
    assert calib.shape == held_out.shape == (6, 3, 16, 16) and not torch.allclose(calib, held_out)
    # same-halves: scene-halves' evaluation crops, calibrated on other crops of those very halves
    settings = fd.Settings(calib_images=6, eval_images=6)
    (halves,), (same,) = (fd.make_splits(d, None, None, False, settings, 16, 3) for d in ("scene-halves", "same-halves"))
    assert torch.equal(same.eval, halves.eval) and torch.equal(same.eval, held_out)
    assert not any(torch.equal(c, e) for c in same.calib for e in same.eval)
    assert not any(torch.equal(c, e) for c in same.calib for e in halves.calib)


def test_bad_budget_is_a_user_error(fd, capsys):
    assert fd.main(["--model", "tiny", "--budgets", "1.5"], builders={"tiny": tiny_cnn}) == 2
    assert "budgets must be in (0, 1)" in capsys.readouterr().err


def test_block_option_reaches_our_methods_only(fd, monkeypatch):
    """``--block`` sets the block kind of (a), (b) and (c); the SVD baselines stay IGCV1 with one group."""
    seen = []
    real = fd.convert

    def spy(model, target, **kwargs):
        seen.append((kwargs.get("block", "igcv1"), kwargs.get("max_groups")))
        return real(model, target, **kwargs)

    monkeypatch.setattr(fd, "convert", spy)
    model = tiny_cnn()
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    settings = fd.Settings(budgets=(0.6,), methods=("weight", "data", "svd-budget"), calib_images=24,
                           eval_images=16, batch_size=8, block="igcv3")
    fd.run_benchmark(model, [fd.DataSplit("random", x[:24], x[24:])], settings)
    assert sorted(seen, key=str) == sorted([("igcv3", None), ("igcv3", None), ("igcv1", 1)], key=str)


def test_calibration_kl_pass_matches_evaluate(fd):
    """The KL-only pass (used on the calibration images) gives what the full evaluation gives."""
    model, scaled = tiny_cnn(), with_conv_scaled(1.3)
    x = torch.randn(10, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    full = fd.evaluate(model, {"scaled": scaled}, fd.convertible_layers(model), x, batch_size=4)["scaled"]
    a = fd.measure_agreement(model, scaled, x, batch_size=3)
    kl, top1 = a.kl, a.top1
    # batches of 3 and of 4 round differently in float32 (run alone, with other thread counts, this
    # KL of ~7e-7 differed in the 6th digit): equal to float32's precision, not to float64's
    assert kl > 0 and kl == pytest.approx(full["kl"], rel=1e-4) and top1 == pytest.approx(full["top1"])


def test_imagenet_folds_evaluate_on_the_images_they_do_not_calibrate_on(fd):
    pytest.importorskip("foolbox")
    from igc_convert.data import resolve_source

    data = resolve_source("imagenet-samples", image_size=24, channels=3, labels=True)
    splits = fd.imagenet_splits(True, 6, 24, 3, seed=0)
    assert len(splits) == 2
    held = []
    for fold, split in enumerate(splits):
        kept = [i for i in range(20) if i % 2 != fold]
        held += kept
        assert split.calib.shape == (6, 3, 24, 24) and split.eval.shape == (20, 3, 24, 24)
        originals = torch.stack([data[i][0] for i in kept])
        assert torch.equal(split.eval[:10], originals) and torch.equal(split.eval[10:], originals.flip(-1))
        assert split.eval_labels.tolist() == 2 * [int(data.targets()[i]) for i in kept]
        # crops of the calibration images: none is an evaluation image
        assert not any(torch.allclose(c, e) for c in split.calib for e in split.eval)
    assert sorted(held) == list(range(20))


def test_labelled_evaluation_images_add_a_top1_accuracy(fd):
    model, scaled = tiny_cnn(), with_conv_scaled(1.3)
    x = torch.randn(12, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        right = model(x).argmax(1)
    labels = right.clone()
    labels[:3] = (labels[:3] + 1) % 10  # the original gets 9 of 12
    scores = fd.evaluate(model, {"same": tiny_cnn(), "scaled": scaled}, fd.convertible_layers(model), x,
                         batch_size=5, labels=labels)
    assert scores["same"]["accuracy"] == pytest.approx(9 / 12)
    with torch.no_grad():
        expected = (scaled(x).argmax(1) == labels).float().mean().item()
    assert scores["scaled"]["accuracy"] == pytest.approx(expected)
    assert fd.top1_accuracy(model, x, labels, batch_size=5) == pytest.approx(9 / 12)
    assert fd.evaluate(model, {"same": tiny_cnn()}, fd.convertible_layers(model), x)["same"]["accuracy"] is None

    settings = fd.Settings(budgets=(0.6,), methods=("weight", "data"), calib_images=12, eval_images=12, batch_size=8)
    splits = [fd.DataSplit("labelled", torch.randn(12, 1, 12, 12), x, labels)]
    results = fd.run_benchmark(model, splits, settings)
    assert splits[0].original_accuracy == pytest.approx(9 / 12)
    assert all(0 <= r.accuracy <= 1 for r in results)
    table = fd.format_tables(results, splits)
    assert "the original's top-1 accuracy 75.0%" in table and "| top-1 accuracy |" in table
    row = next(line for line in table.splitlines() if line.startswith("| 0.6 | data |"))
    header = next(line for line in table.splitlines() if line.startswith("| budget |"))
    assert row.count("|") == header.count("|")
    unlabelled = fd.format_tables(results, [fd.DataSplit("labelled", x, x)])
    assert "top-1 accuracy" not in unlabelled


def test_oracle_split_calibrates_on_the_evaluation_images(fd, tmp_path, capsys):
    """``--oracle`` adds each split calibrated on its own evaluation images: its calibration-image KL is
    its held-out KL, and the weight-space model (no images read) scores the same in both."""
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    split = fd.DataSplit("random", x[:24], x[24:])
    oracle = fd.oracle_split(split)
    assert oracle.calib is split.eval and oracle.eval is split.eval and "oracle" in oracle.label

    out = tmp_path / "fid.json"
    rc = fd.main(["--model", "tiny", "--calib", str(image_folder(tmp_path / "images")), "--budgets", "0.6",
                  "--calib-images", "24", "--eval-images", "16", "--batch-size", "8", "--methods", "weight", "data",
                  "--oracle", "--json", str(out)], builders={"tiny": tiny_cnn})
    assert rc == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    splits = list(dict.fromkeys(r["split"] for r in results))
    assert len(splits) == 2 and splits[1] == splits[0] + ", oracle: calibrated on the evaluation images"
    by = {(r["split"], r["method"]): r for r in results}
    data, best = by[splits[0], "data"], by[splits[1], "data"]
    assert best["calib_kl"] == pytest.approx(best["kl"], rel=1e-6) and data["calib_kl"] != pytest.approx(data["kl"])
    # the weight-space fit reads no image: the same model, scored on the same images, in both splits
    assert by[splits[1], "weight"]["isolated"] == by[splits[0], "weight"]["isolated"]
    assert f"{splits[1]} @ 0.6: data/weight isolated error" in text


def test_rank_headroom_bounds_what_whitening_can_gain(fd):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(12, 10, generator=gen, dtype=torch.float64)
    # isotropic inputs: the whitened problem is the weight-space one
    for ratio, plain in fd.rank_headroom(w, 3.0 * torch.eye(10, dtype=torch.float64), [2, 4, 8]):
        assert ratio == pytest.approx(1.0, abs=1e-9) and 0 < plain < 1
    # inputs in a 3-dimensional subspace: a rank-3 fit reproduces every output exactly, the SVD does not
    basis = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    (ratio, plain), = fd.rank_headroom(w, basis @ basis.T, [3])
    assert ratio < 1e-6 and plain > 0.05
    # any inputs: the whitened optimum is never worse than the SVD (Eckart–Young), and plain error by hand
    a = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    sigma = a @ a.T / 10
    (ratio, plain), = fd.rank_headroom(w, sigma, [5])
    u, s, vh = torch.linalg.svd(w)
    miss = w - (u[:, :5] * s[:5]) @ vh[:5]
    assert 0 < ratio < 1
    assert plain == pytest.approx(math.sqrt(float(torch.trace(miss @ sigma @ miss.T) / torch.trace(w @ sigma @ w.T))))
    with pytest.raises(fd.ConfigError):
        fd.rank_headroom(w, sigma[:5, :5], [2])


def test_headroom_mode_prints_a_row_per_layer(fd, tmp_path, capsys):
    out = tmp_path / "headroom.json"
    rc = fd.main(["--model", "tiny", "--calib", str(image_folder(tmp_path / "images")), "--eval-images", "16",
                  "--calib-images", "8", "--headroom", "--json", str(out)], builders={"tiny": tiny_cnn})
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["headroom"]
    assert [r["layer"] for r in rows] == ["features.0", "features.3", "features.8"]
    for r in rows:
        assert len(r["fits"]) == len(fd.HEADROOM_FRACTIONS) and all(0 <= ratio <= 1 + 1e-9 for ratio, _ in r["fits"])
        assert 0 < r["isotropy"] <= 1 and f"| {r['layer']} | {r['n']} | {r['c_out']} |" in text

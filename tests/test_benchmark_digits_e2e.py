"""Smoke test of benchmarks/digits_e2e.py: main() with tiny settings, its data splits, its settings."""

from __future__ import annotations

import functools
import json
import sys

import pytest

from igc_convert import digits
from igc_convert.data import resolve_source
from igc_convert.digits import CHANNELS, IMAGE_SIZE
from igc_convert.errors import ConfigError

from conftest import load_script


@pytest.fixture(scope="module")
def e2e():
    yield load_script("benchmarks/digits_e2e.py", "digits_e2e_benchmark")
    sys.modules.pop("digits_e2e_benchmark", None)


def test_main_with_tiny_settings(e2e, tmp_path, capsys, monkeypatch):
    # A narrower dense model (16 channels, not 32) keeps the whole chain under 20 CPU-seconds.
    monkeypatch.setattr(e2e, "train_digits_model", functools.partial(digits.train_digits_model, width=16))
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    rc = e2e.main(["--threads", "1", "--train-epochs", "2", "--calib-samples", "64", "--budgets", "0.25",
                   "--extra-budget", "0", "--budget", "0.25", "--also-budgets", "--configs", "default",
                   "--epochs", "1", "--train-samples", "200", "--ft-seeds", "2", "--json", str(out_json),
                   "--markdown", str(out_md)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "right after conversion" in text and "after fine-tuning" in text and "Time per stage" in text
    assert "load average" in text
    report = json.loads(out_json.read_text())
    assert report["val_images"] == len(resolve_source("digits", image_size=IMAGE_SIZE, channels=CHANNELS, split="val"))
    assert report["dense_accuracy"] > 0.5
    assert [z["mode"] for z in report["zero_shot"]] == list(e2e.MODES)
    for z in report["zero_shot"]:
        assert 0 < z["params_ratio"] <= 0.25 + 1e-9, z
        assert 0 <= z["accuracy"] <= 1
    runs = report["finetune"]
    assert [(r["init"], r["setting"]) for r in runs] == [(i, s) for i in e2e.FT_MODES for s in e2e.SETTINGS]
    for r in runs:
        assert len(r["per_epoch"]) == 1, r
        if r["setting"] == "distil 10%":
            assert r["kept_epoch"] in (0, 1)  # chosen on the held-back training images
        else:
            # full-data runs return their last state, and measuring each epoch did not change it
            assert r["kept_epoch"] is None
            assert r["accuracy"] == pytest.approx(r["per_epoch"][-1])
    # the distil-only run again with the next fine-tuning seed, from the same init
    spread = report["seed_spread"]
    assert [(x["block"], x["init"], x["seeds"]) for x in spread] == \
        [("igcv1", i, [0, 1]) for i in e2e.FT_MODES] + [("auto", "sequential", [0, 1])]
    for x in spread[:-1]:  # the fine-tuned block kind: seed 0 is the fine-tuning table's own run
        first = next(r for r in runs if r["init"] == x["init"] and r["setting"] == "distil")
        assert x["accuracies"][0] == first["accuracy"] and len(x["accuracies"]) == 2
    assert len(spread[-1]["accuracies"]) == 2  # the extra block kind runs every seed itself
    assert "per fine-tuning seed" in text
    names = {s["name"] for s in report["stages"]}
    assert names >= {"train dense", "total", "fine-tune 0.25 igcv1 weight default distil seed 1",
                     "convert auto 0.25 sequential", "fine-tune 0.25 auto sequential default distil seed 0"}
    assert out_md.read_text().count("| budget |") == 3


def test_data_splits_never_touch_validation(e2e):
    data = e2e.load_data(calib_samples=512, subset_fraction=0.1, seed=0)
    train_split, val_split = set(data.train.indices), set(data.val.indices)  # indices into all 1797 digits
    assert not train_split & val_split
    calib, small = set(data.calibration.indices), set(data.subset.indices)  # positions in the train split
    assert len(calib) == 512 and len(small) == round(0.1 * len(data.train))
    assert len(small) + len(data.selection) == len(data.train)
    # seed 0: the very images of resolve_source("digits", split="train", samples=512)
    assert data.calibration.indices == resolve_source("digits", image_size=IMAGE_SIZE, channels=CHANNELS,
                                                      split="train", samples=512).indices
    other = e2e.load_data(calib_samples=512, subset_fraction=0.1, seed=1)
    assert set(other.train.indices) == train_split  # another seed moves the samples, never the split
    assert set(other.calibration.indices) != calib


def test_dense_seeds_run_the_goal_row_on_other_dense_models(e2e, tmp_path, capsys, monkeypatch):
    """--dense-seeds 2: the extra row's sequential conversion again on the dense model of seed 1."""
    monkeypatch.setattr(e2e, "train_digits_model", functools.partial(digits.train_digits_model, width=16))
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    rc = e2e.main(["--threads", "1", "--train-epochs", "1", "--calib-samples", "32", "--budgets", "0.25",
                   "--extra-block", "igcv3", "--extra-budget", "0.25", "--dense-seeds", "2", "--budget", "0.25",
                   "--also-budgets", "--configs", "default", "--epochs", "1", "--train-samples", "100",
                   "--ft-seeds", "1", "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    assert "on the dense models of 2 seeds" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    rows = report["dense_seeds"]
    assert [r["seed"] for r in rows] == [0, 1]
    goal = next(z for z in report["zero_shot"] if (z["block"], z["mode"]) == ("igcv3", "sequential"))
    # seed 0 is the zero-shot table's own row, not a second conversion
    assert (rows[0]["accuracy"], rows[0]["params_ratio"]) == (goal["accuracy"], goal["params_ratio"])
    assert rows[0]["dense_accuracy"] == report["dense_accuracy"]
    assert any(s["name"].startswith("dense model seed 1") for s in report["stages"])  # trained and converted
    assert all(0 < r["params_ratio"] <= 0.25 + 1e-9 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert "within 1 point for" in out_md.read_text()


@pytest.mark.parametrize("argv", [["--budget", "1.5"], ["--subset-fraction", "1"], ["--epochs", "0"],
                                  ["--ft-seeds", "0"], ["--quick", "--dense-seeds", "2"], ["--dense-seeds", "0"]],
                         ids=["budget-over-1", "subset-everything", "no-epochs", "no-seeds", "dense-seeds-no-row",
                              "no-dense-seeds"])
def test_bad_settings_exit_2(e2e, argv, capsys):
    assert e2e.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_finetune_settings(e2e):
    default, live, tuned = (e2e.finetune_config(n, epochs=3, seed=0) for n in e2e.CONFIGS)
    from igc_convert.finetune import DEFAULT_LR

    assert default.freeze_bn is None and default.lr is None and DEFAULT_LR["logits"] == 5e-4  # the shipped defaults
    assert live.freeze_bn is False and tuned.freeze_bn is False and tuned.batch_size < default.batch_size
    assert e2e.finetune_config("default", epochs=3, seed=0, ce_weight=1.0).ce_weight == 1.0
    with pytest.raises(ConfigError, match="unknown fine-tuning setting"):
        e2e.finetune_config("fast", epochs=3, seed=0)

"""The torchvision zoo: every classification model converts (lossless and at half the conv params).

The per-model check lives in ``benchmarks/zoo.py`` (``zoo_row``); the default run checks one model
per family (``SUBSET``), the whole zoo runs under ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igc_convert.convert import apply_plan, find_convs

from conftest import load_script


def _load_zoo():
    return load_script("benchmarks/zoo.py", "zoo_benchmark")


zoo = _load_zoo()
# Too large for a 2-core, 23 GB machine in one test (the script records them as skipped with the reason).
TOO_LARGE = {"regnet_y_128gf": "645 M params", "vit_h_14": "633 M params"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _check(name: str) -> dict:
    row = zoo.zoo_row(name)
    assert row["status"] == "ok", row.get("reason")
    assert not zoo.problems(row), zoo.problems(row)
    # every conv that can be converted was swapped in the lossless check (depthwise/grouped ones stay)
    assert 0 < row["lossless_convs"] <= row["convs"]
    assert row["converted"] <= row["lossless_convs"]
    return row


@pytest.mark.parametrize("name", zoo.SUBSET)
def test_subset_model_converts(name):
    row = _check(name)
    assert row["path"] == "fx", row["path_reason"]  # every model of the subset is traceable
    assert row["target"] == 0.5  # and reaches half its conv params


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.zoo_models())
def test_zoo_model_converts(name):
    if name in TOO_LARGE:
        pytest.skip(f"too large for this test machine: {TOO_LARGE[name]}")
    _check(name)


def test_subset_covers_distinct_families():
    assert len(zoo.SUBSET) == len({n.split("_")[0].rstrip("0123456789") for n in zoo.SUBSET})
    assert set(zoo.SUBSET) <= set(zoo.zoo_models())


# --------------------------------------------------------------------------------- the lossless plan
def test_lossless_plan_skips_grouped_convs_and_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.Conv2d(16, 4, 1, bias=False), nn.Conv2d(4, 32, (1, 3), stride=2, padding=(0, 1)))
    sites, path, _ = find_convs(net)
    plan = zoo.lossless_plan(sites)
    assert path == "fx"
    assert [(e["name"], e["shape"]["rank"]) for e in plan] == [("0", 16), ("3", 4), ("4", 12)]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = net(x)
        actual = apply_plan(net, plan, fit=True)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,size", [("inception_v3", 75), ("vit_b_16", 32), ("vit_h_14", 28), ("resnet18", 64)])
def test_setup_gives_the_smallest_input(name, size):
    assert zoo.model_setup(name).input_size == size


# ------------------------------------------------------------------------------------ table and main
def _ok_row(**kw):
    row = dict(model="m", input=64, note="", status="ok", reason="", path="fx", path_reason="", convs=10,
               params=1000, lossless_convs=8, output_scale=3.0, output_finite=True, lossless_error=1e-6,
               target=0.5, unreachable=[], converted=5, params_ratio=0.49, model_params_ratio=0.7,
               output_shape=[2, 1000], converted_shape=[2, 1000], converted_finite=True, convert_path="fx",
               seconds=12.3)
    row.update(kw)
    return row


@pytest.mark.parametrize("change,message", [
    (dict(lossless_error=2e-4), "lossless outputs differ"),
    (dict(converted_shape=[2, 10]), "output shape changed"),
    (dict(params_ratio=0.51), "exceeds the target"),
    (dict(converted=0), "no conv converted"),
    (dict(output_scale=0.0), "degenerate"),
    (dict(converted_finite=False), "NaN or Inf"),
    (dict(convert_path="by-name"), "by-name path"),
], ids=["lossless", "shape", "ratio", "none", "degenerate", "nan", "path"])
def test_problems_flag_each_failure(change, message):
    assert zoo.problems(_ok_row()) == []
    found = zoo.problems(_ok_row(**change))
    assert len(found) == 1 and message in found[0]


def test_markdown_table_rows_and_summary():
    rows = [_ok_row(model="good"), _ok_row(model="bad", lossless_error=1.0),
            _ok_row(model="fallback", target=0.75, unreachable=["0.5: params ratio 0.5 is not reachable"],
                    path="by-name", convert_path="by-name", path_reason="torch.fx could not trace it"),
            dict(model="slow", status="skipped", reason="skipped for time: over --timeout 120 s", seconds=120.4)]
    text = zoo.markdown_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| model | input | convs converted/total |")
    assert lines[2] == "| good | 64 | 5/10 | 0.5 | 0.490 | 0.700 | 8/10 | 1.0e-06 | fx | 12 | ok |"
    assert "**FAIL**: lossless outputs differ" in lines[3]
    assert "by-name (torch.fx could not trace it)" in lines[4] and "0.5 unreachable" in lines[4]
    assert lines[5].startswith("| slow |") and "skipped for time" in lines[5]
    assert lines[-1] == "2 of 4 models convert; 1 FAIL (bad); 1 skipped (slow)."


def test_main_records_a_timeout_as_skipped(tmp_path, capsys):
    out = tmp_path / "zoo.md"
    # the worker cannot even import torch in 0.2 s: recorded as skipped, not failed
    assert zoo.main(["--models", "squeezenet1_1", "--timeout", "0.2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "--timeout 0.2" in text and "| squeezenet1_1 |" in text and "skipped for time" in text
    assert "0 of 1 models convert; 1 skipped (squeezenet1_1)." in capsys.readouterr().out


def test_main_refuses_too_large_models_without_building_them(capsys):
    assert zoo.main(["--models", "vgg11", "--max-params", "1e6"]) == 0
    assert "133 M params > --max-params 1 M" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--models", "resnet_nope"], "unknown model(s) resnet_nope"),
    (["--models", "resnet18", "--ratio", "1.5"], "--ratio must be in (0, 1]"),
    (["--models", "resnet18", "--timeout", "0"], "--timeout must be positive"),
], ids=["unknown-model", "ratio", "timeout"])
def test_main_usage_errors(argv, message, capsys):
    assert zoo.main(argv) == 2
    assert message in capsys.readouterr().err

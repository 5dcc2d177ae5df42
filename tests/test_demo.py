"""The demo runs end to end on a tiny setting and writes its figure and files."""

import pytest

from igc_convert.cli import main
from igc_convert.data import resolve_source
from igc_convert.demo import DemoConfig, run_demo
from igc_convert.digits import CHANNELS, IMAGE_SIZE, evaluate
from igc_convert.errors import ConfigError
from igc_convert.models import build_model_from_origin
from igc_convert.serialize import load


def test_demo_tiny(tmp_path, capsys):
    summary = run_demo(DemoConfig(out=tmp_path, train_epochs=1, finetune_epochs=1, calib_samples=32, bench_runs=3,
                                  batch_sizes=(1,), progress=False))
    out = capsys.readouterr().out
    assert "TOTAL" in out and "accuracy (held-out digits)" in out
    for name in ("converted.safetensors", "original.onnx", "converted.onnx", "summary.png", "original.safetensors"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "x0.2" in summary.rows["conv params"]
    # The converted file's origin names the trained original, so `finetune --teacher auto` distils from it.
    original = build_model_from_origin(load(tmp_path / "converted.safetensors").origin)
    val = resolve_source("digits", image_size=IMAGE_SIZE, channels=CHANNELS, split="val")
    assert f"dense {100 * evaluate(original, val):.1f}%" in summary.rows["accuracy (held-out digits)"]
    assert oct((tmp_path / "summary.png").stat().st_mode & 0o777) != "0o600"
    ratios = [float(part.split(": x")[1]) for part in summary.rows["onnxruntime latency"].split(" (")[0].split(", ")]
    if all(abs(r - 1) > 0.005 for r in ratios):  # printed to two decimals: x1.00 may be either side
        assert ("note" in summary.rows) == (max(ratios) > 1)  # a slower converted model is explained


def test_demo_cli_rejects_bad_ratio(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--params-ratio", "0"]) == 2
    assert "params ratio" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        DemoConfig(threads=0)


def test_demo_cli_reports_an_output_folder_it_cannot_make_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["demo", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot create the output folder" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["file"]

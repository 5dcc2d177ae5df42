"""CLI surface: help with examples on every subcommand, version, python -m, README reference in sync."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from igc_convert import __version__
from igc_convert.cli import SUBCOMMANDS, main, reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_help_shows_an_example(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"igc-convert {name}" in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "igc_convert", "report", "/nonexistent/file.safetensors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nonexistent" in lines[0]


def test_readme_cli_reference_is_generated_from_the_parser():
    text = README.read_text()
    section = re.search(r"<!-- CLI-REFERENCE:START -->\n(.*?)<!-- CLI-REFERENCE:END -->", text, re.S)
    assert section, "README lacks the CLI reference markers"
    assert section.group(1) == reference_markdown(), \
        "README's CLI reference is stale: run `python -m igc_convert.cli.reference README.md`"


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["convert"])
    assert info.value.code == 2


def test_a_torchvision_segmentation_model_through_every_command(tmp_path, capsys):
    """LR-ASPP (MobileNetV3) by name, random init: converted on non-square calibration crops with a
    per-pixel agreement check, distilled per pixel, exported with a dynamic height and width."""
    import json

    import numpy as np
    import onnxruntime as ort

    conv, tuned, onnx_path = tmp_path / "c.safetensors", tmp_path / "t.safetensors", tmp_path / "m.onnx"
    assert main(["convert", "lraspp_mobilenet_v3_large", "-o", str(conv), "--params-ratio", "0.6",
                 "--calib", "sample-images", "--calib-samples", "8", "--check-samples", "4",
                 "--input-size", "64", "96", "--report", str(tmp_path / "r.json")]) == 0
    agreement = json.loads((tmp_path / "r.json").read_text())["agreement"]
    assert agreement["per_pixel"] and 0 < agreement["top1"] <= 1
    assert "per-pixel top-1 agreement" in capsys.readouterr().out
    assert main(["finetune", str(conv), "-o", str(tuned), "--data", "sample-images", "--epochs", "1",
                 "--samples", "8", "--val-samples", "4", "--batch-size", "4", "--image-size", "64", "96"]) == 0
    assert "agreement" in capsys.readouterr().out
    assert main(["export", str(tuned), "-o", str(onnx_path), "--dynamic-size", "--input-size", "64", "96",
                 "--exporter", "torchscript"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 80, 48), dtype=np.float32)})[0]
    assert out.shape == (1, 21, 80, 48)


@pytest.mark.parametrize("argv", [
    ["convert", "no_such_model", "--params-ratio", "0.5", "--calib", "no/such/folder", "-o", "{tmp}/out.safetensors"],
    ["finetune", "{tmp}/missing.safetensors", "-o", "{tmp}/out.safetensors", "--data", "no/such/folder"],
    ["finetune", "{tmp}/missing.safetensors", "-o", "{tmp}/out.safetensors", "--data", "digits",
     "--val-data", "no/such/folder"],
    ["evaluate", "{tmp}/missing.safetensors", "--data", "no/such/folder"],
], ids=["convert", "finetune", "finetune-val", "evaluate"])
def test_a_mistyped_data_source_fails_before_any_model_is_built_or_read(argv, tmp_path, capsys):
    # The model (a name that builds nothing, a file that does not exist) would fail too: the source's
    # error comes first, so a typo in it never waits for a model to be built, downloaded or loaded.
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unknown data source 'no/such/folder'" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_checkpoint_folder_fails_before_the_model_is_read(tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    code = main(["finetune", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "out.safetensors"),
                 "--data", "digits", "--checkpoint-dir", str(tmp_path / "file" / "ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot create the checkpoint folder" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_an_output_folder_that_takes_no_new_file_fails_before_any_work(command, tmp_path, refuse_new_files, capsys):
    # Permission bits do not stop root (nor tell of a read-only or pseudo file system): the check
    # makes a file there for real. The model (a name that builds nothing, a missing file) would fail too.
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_new_files(ro, OSError(30, "Read-only file system"))
    argv = {"convert": ["convert", "no_such_model", "--params-ratio", "0.5", "-o", str(ro / "out.safetensors")],
            "export": ["export", str(tmp_path / "missing.safetensors"), "-o", str(ro / "out.onnx")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not take new files (Read-only file system)" in err[0]
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("target, why", [
    (["--max-error", "1e-9"], r"no block reaches a layer error <= 1e-09: the lowest any layer's blocks reach is "
                              r"[\d.]+ \(at layer[\w.]+\); raise the max error"),
    (["--params-ratio", "1"], r"a params ratio of 1 keeps every conv dense"),
], ids=["max-error", "ratio-one"])
def test_a_target_that_converts_nothing_writes_nothing_and_says_why(target, why, tmp_path, capsys):
    # The file would be the original model under a new name: the run fails (exit 2), the user's file stays.
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the user's file")
    code = main(["convert", "resnet18", "--input-size", "32", "-o", str(out), *target])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.fullmatch("igc-convert convert: error: no conv was converted, nothing written: " + why, err[-1]), err[-1]
    assert out.read_bytes() == b"the user's file" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]

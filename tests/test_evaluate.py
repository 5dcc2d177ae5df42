"""``igc-convert evaluate`` and ``finetune.score``: a converted file's accuracy against labels and its
agreement with the original model, checked against figures computed here by hand."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from igc_convert.cli import main
from igc_convert.data import resolve_source
from igc_convert.errors import DataError
from igc_convert.finetune import score
from igc_convert.serialize import load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(converted_files):
    """The original digits ResNet and two conversions of it (0.3 and 0.6 of the conv parameters)."""
    from igc_convert.models import build_model_from_origin

    _, paths = converted_files
    return build_model_from_origin(load(paths["a"]).origin), [paths["a"], paths["b"]]


def _by_hand(model, original, data):
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        s, t = model(x), original(x)
    kl = torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
    return dict(accuracy=(s.argmax(1) == y).float().mean().item(),
                agreement=(s.argmax(1) == t.argmax(1)).float().mean().item(), kl=kl.item(),
                original=(t.argmax(1) == y).float().mean().item())


def test_cli_scores_every_file_against_the_labels_and_the_original(files, tmp_path, capsys):
    original, paths = files
    out = tmp_path / "scores.json"
    argv = ["evaluate", *map(str, paths), "--data", "digits", "--split", "val", "--samples", "40",
            "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "40 images of digits"
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["original (igc_convert.digits:digits_resnet)", *map(str, paths)]
    data = resolve_source("digits", image_size=12, channels=1, split="val", samples=40)
    for row, path in zip(rows[1:], paths):
        expected = _by_hand(load(path).model, original, data)
        assert row["accuracy"] == pytest.approx(expected["accuracy"])
        assert row["agreement"] == pytest.approx(expected["agreement"])
        assert row["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-6) and row["kl"] > 0
        assert row["params_ratio"] == pytest.approx(load(path).report["totals"]["params_ratio"])
        assert path.name in text
    assert rows[0]["accuracy"] == pytest.approx(expected["original"]) and rows[0]["agreement"] is None


def test_cli_without_the_original_scores_labels_only(files, tmp_path, capsys):
    _, paths = files
    assert main(["evaluate", str(paths[0]), "--data", "digits", "--samples", "20", "--original", "none",
                 "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["agreement"] is None and 0 <= rows[0]["accuracy"] <= 1
    capsys.readouterr()
    # unlabelled images and no original: nothing to score against, one line, nothing written
    assert main(["evaluate", str(paths[0]), "--data", "sample-images", "--samples", "4", "--original", "none",
                 "--json", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to score against" in err[0]
    assert not (tmp_path / "none.json").exists()


def test_cli_says_when_the_original_cannot_be_rebuilt(files, tmp_path, capsys):
    _, paths = files
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(paths[0].read_bytes())
    converted = load(moved)
    from igc_convert.serialize import save

    origin = dict(converted.origin, weights=str(tmp_path / "gone.pt"))
    save(moved, converted.model, origin=origin, plan=converted.plan, report=converted.report)
    assert main(["evaluate", str(moved), "--data", "digits", "--samples", "8"]) == 2
    err = capsys.readouterr().err
    assert "cannot rebuild the original model" in err and "--original none" in err
    assert main(["evaluate", str(moved), "--data", "digits", "--samples", "8", "--original", "none"]) == 0


def test_cli_refuses_a_file_that_is_not_a_converted_model(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a model")
    assert main(["evaluate", str(bad), "--data", "digits"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_labels_that_are_not_the_models_classes_are_left_out(files, tmp_path, caplog):
    """A folder of 3 classes cannot be the 10 digits: agreement only, with a warning."""
    original, paths = files
    gen = torch.Generator().manual_seed(0)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(3):
            pixels = (torch.rand(12, 12, generator=gen) * 255).byte().numpy()
            Image.fromarray(pixels, mode="L").save(tmp_path / f"class{c}" / f"{i}.png")
    data = resolve_source(str(tmp_path), image_size=12, channels=1)
    figures = score(load(paths[0]).model, data, original, batch_size=4)
    assert figures.accuracy is None and figures.count == 9 and 0 <= figures.agreement <= 1
    assert "cannot be its classes" in caplog.text and "no accuracy is given" in caplog.text
    with pytest.raises(DataError, match="nothing to score against"):
        score(load(paths[0]).model, data)


def test_class_masks_are_scored_per_pixel():
    """A per-pixel classifier on images with H×W class masks: each image counts its share of right pixels."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)).eval()
    x = torch.randn(5, 1, 6, 6)
    masks = torch.randint(0, 3, (5, 6, 6))
    masks[0, :2] = 255  # unlabelled pixels (255, as in Pascal VOC) do not count

    class Masks(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return x[i], masks[i]

    data = resolve_source(Masks())
    figures = score(net, data, batch_size=2)
    with torch.no_grad():
        right = net(x).argmax(1) == masks
    valid = masks != 255
    expected = torch.stack([right[i][valid[i]].float().mean() for i in range(5)]).mean().item()
    assert figures.accuracy == pytest.approx(expected) and figures.agreement is None
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1)).eval()
    with_teacher = score(net, data, teacher)
    assert with_teacher.accuracy == pytest.approx(expected) and 0 <= with_teacher.agreement <= 1


@pytest.mark.parametrize("dynamic_batch", [True, False], ids=["dynamic-batch", "batch-1"])
def test_cli_scores_an_exported_onnx_file_as_its_model(files, tmp_path, capsys, dynamic_batch):
    """An ONNX export run in onnxruntime gets the accuracy its PyTorch model gets; a fixed batch of 1
    is run image by image, and its fixed input size sets the images' size."""
    from igc_convert.export import export_onnx

    _, paths = files
    onnx_path = tmp_path / "m.onnx"
    export_onnx(load(paths[0]).model, onnx_path, torch.zeros(1, 1, 12, 12), dynamic_batch=dynamic_batch)
    out = tmp_path / "s.json"
    assert main(["evaluate", str(onnx_path), str(paths[0]), "--data", "digits", "--split", "val", "--samples", "37",
                 "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    onnx_row, torch_row = rows[str(onnx_path)], rows[str(paths[0])]
    assert onnx_row["accuracy"] == torch_row["accuracy"] and onnx_row["agreement"] is None
    assert torch_row["agreement"] is not None  # the .safetensors file is still compared with its original
    capsys.readouterr()
    assert main(["evaluate", str(onnx_path), "--data", "digits", "--image-size", "16"]) == 2
    assert "takes 12×12 images, not 16×16" in capsys.readouterr().err


def test_cli_compares_a_file_that_export_wrote_with_its_original(files, tmp_path):
    """``igc-convert export`` writes the converted model's origin and params ratio into the ONNX file:
    evaluate rebuilds the original from it and reads the file's agreement and KL as its model's."""
    import onnxruntime as ort

    _, paths = files
    onnx_path = tmp_path / "a.onnx"
    assert main(["export", str(paths[0]), "-o", str(onnx_path), "--input-size", "12"]) == 0
    props = ort.InferenceSession(str(onnx_path)).get_modelmeta().custom_metadata_map
    assert json.loads(props["igc_convert.origin"]) == load(paths[0]).origin
    out = tmp_path / "s.json"
    assert main(["evaluate", str(onnx_path), str(paths[0]), "--data", "digits", "--split", "val", "--samples", "37",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["original (igc_convert.digits:digits_resnet)", str(onnx_path), str(paths[0])]
    onnx_row, torch_row = rows[1], rows[2]
    assert onnx_row["params_ratio"] == torch_row["params_ratio"] == load(paths[0]).report["totals"]["params_ratio"]
    assert onnx_row["accuracy"] == torch_row["accuracy"] and onnx_row["agreement"] == torch_row["agreement"]
    assert onnx_row["kl"] == pytest.approx(torch_row["kl"], rel=1e-3, abs=1e-6)


def test_onnx_metadata_that_is_not_an_origin_is_left_out_with_a_warning(files, tmp_path, caplog):
    from igc_convert.errors import ConfigError
    from igc_convert.export import ORIGIN_KEY, export_onnx

    _, paths = files
    model, path, x = load(paths[0]).model, tmp_path / "m.onnx", torch.zeros(1, 1, 12, 12)
    with pytest.raises(ConfigError, match="must be strings"):
        export_onnx(model, path, x, metadata={ORIGIN_KEY: {"name": "resnet18"}})
    assert not path.exists()
    export_onnx(model, path, x, metadata={ORIGIN_KEY: "[1, 2]", "mine": "kept"})
    out = tmp_path / "s.json"
    assert main(["evaluate", str(path), "--data", "digits", "--samples", "20", "--json", str(out)]) == 0
    assert "is not a JSON object" in caplog.text
    (row,) = json.loads(out.read_text())["rows"]
    assert row["accuracy"] is not None and row["agreement"] is None


def test_cli_refuses_a_file_named_onnx_that_is_not_one(tmp_path, capsys):
    bad = tmp_path / "fake.onnx"
    bad.write_bytes(b"\x00not onnx")
    assert main(["evaluate", str(bad), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an ONNX model" in err[0]


def test_scoring_runs_in_eval_mode_and_gives_every_module_its_mode_back():
    """Dropout off while scoring (the same figures twice), and a model training with a frozen
    BatchNorm comes back exactly so."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.9),
                              torch.nn.Flatten(), torch.nn.LazyLinear(10))
    net(torch.zeros(2, 1, 12, 12))
    net.train()
    net[1].eval()  # frozen BatchNorm
    data = resolve_source("digits", image_size=12, channels=1, split="val", samples=16)
    first, second = score(net, data, batch_size=5), score(net, data, batch_size=5)
    assert first.accuracy == second.accuracy and first.loss == pytest.approx(second.loss)
    assert [m.training for m in net] == [True, False, True, True, True]

"""Serialize: save → load gives the same outputs, writes are atomic, bad or tampered files are refused."""

import dataclasses
import json
import os
import pickle
import urllib.error

import pytest
import safetensors
import safetensors.torch
import torch
import torch.hub

from igc_convert import serialize
from igc_convert.errors import FileFormatError, ModelError
from igc_convert.models import build_model
from igc_convert.serialize import FORMAT, Converted, load, read_metadata, save

from conftest import importable_module

NETS = "igc_serialize_test_nets"
NETS_SOURCE = '''
import torch
from torch import nn


def small_cnn(num_classes=5):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class Tied(nn.Module):
    """Tied weights, a non-contiguous buffer, a strided view and two views of one storage."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("transposed", torch.ones(4, 3).t())
        self.register_buffer("strided", torch.ones(8)[::2])
        base = torch.ones(2, 4)
        self.register_buffer("row0", base[0])
        self.register_buffer("row1", base[1])

    def forward(self, x):
        h = self.conv(x).mean((2, 3)) * self.strided + self.row0 - self.row1
        return self.b(self.a(h)) + self.transposed.sum(0).mean()


def tied():
    return Tied()
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    with importable_module(tmp_path_factory, NETS, NETS_SOURCE):
        yield NETS


@pytest.fixture
def small(nets):
    """A small CNN with random (seeded) weights and trained-looking BatchNorm statistics."""
    torch.manual_seed(0)
    model, origin = build_model(f"{nets}:small_cnn")
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model, origin


@pytest.fixture(scope="module")
def converted_small(nets):
    """The small CNN converted by the real pass (one conv becomes an IGC block)."""
    from igc_convert import ParamsRatio, convert

    torch.manual_seed(0)
    model, origin = build_model(f"{nets}:small_cnn")
    result = convert(model, ParamsRatio(0.5), progress=False)
    assert result.plan, "the conversion converted nothing: the test would prove nothing"
    return result, origin


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _raw_metadata(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _rewrite(path, *, tensors=None, **metadata):
    """Rewrite a saved file with some tensors and/or metadata entries replaced (None removes)."""
    raw = _raw_metadata(path)
    for key, value in metadata.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    tensors = safetensors.torch.load_file(str(path)) if tensors is None else tensors
    safetensors.torch.save_file(tensors, str(path), metadata=raw)
    return path


# ------------------------------------------------------------------------------------------ round trips
def test_round_trip_plain_model_gives_identical_outputs(small, tmp_path):
    model, origin = small
    report = {"totals": {"params_ratio": 1.0}, "note": "none converted"}
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[], report=report)
    got = load(path)
    assert isinstance(got, Converted) and got.path == path
    assert (got.origin, got.plan, got.report) == (origin, [], report)
    assert not got.model.training
    torch.testing.assert_close(got.model(X), model.eval()(X), rtol=0, atol=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.plan = [{}]


def test_saved_file_has_the_permissions_a_plain_write_would_give(small, tmp_path):
    """safetensors writes its file itself, 0600: the atomic path gives it the umask's permissions back."""
    model, origin = small
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[])
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_round_trip_converted_model_rebuilds_its_blocks(converted_small, tmp_path):
    from igc_convert.blocks import IGCBlock

    result, origin = converted_small
    path = save(tmp_path / "c.safetensors", result.model, origin=origin, plan=result.plan, report=result.report)
    got = load(path)
    assert got.plan == json.loads(json.dumps(result.plan))
    assert got.report == json.loads(json.dumps(result.report.to_dict()))
    for entry in result.plan:
        assert isinstance(got.model.get_submodule(entry["name"]), IGCBlock)
    torch.testing.assert_close(got.model(X), result.model.eval()(X), rtol=0, atol=0)


def test_tied_noncontiguous_and_shared_storage_tensors_round_trip(nets, tmp_path):
    torch.manual_seed(0)
    model, origin = build_model(f"{nets}:tied")
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.copy_(torch.randn(buffer.shape))
    assert not model.transposed.is_contiguous() and model.row0.untyped_storage().data_ptr() == \
        model.row1.untyped_storage().data_ptr()
    path = save(tmp_path / "tied.safetensors", model, origin=origin, plan=[])
    got = load(path).model
    assert got.b.weight is got.a.weight  # the tie survives: both keys load into the one parameter
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(got.get_buffer(name), buffer, rtol=0, atol=0)
    torch.testing.assert_close(got(X), model(X), rtol=0, atol=0)


def test_load_needs_neither_download_nor_the_original_weights_file(small, tmp_path, monkeypatch):
    model, origin = small
    weights = tmp_path / "orig.pth"
    torch.save(model.state_dict(), weights)
    model, origin = build_model(origin["name"], weights)
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[])
    weights.unlink()
    torch.testing.assert_close(load(path).model(X), model(X), rtol=0, atol=0)

    # A DEFAULT-weights origin must not try the network either.
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    torch.manual_seed(0)
    r18, _ = build_model("resnet18")
    path = save(tmp_path / "r18.safetensors", r18, plan=[],
                origin={"kind": "torchvision", "name": "resnet18", "weights": "DEFAULT", "kwargs": {}})
    got = load(path, map_location=torch.device("cpu"))
    assert got.report is None
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(got.model(x), r18(x), rtol=0, atol=0)


def test_read_metadata_reads_the_header_only(small, tmp_path, monkeypatch):
    model, origin = small
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[], report={"k": [1, 2]})
    monkeypatch.setattr(serialize, "build_model_from_origin", lambda *a, **k: pytest.fail("built a model"))
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["origin"] == origin and meta["plan"] == []
    assert meta["report"] == {"k": [1, 2]}
    assert meta["torch_version"] == torch.__version__ and meta["igc_convert_version"]


# ------------------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("error, expected", [
    (OSError(28, "No space left on device"), FileFormatError),
    (KeyboardInterrupt(), KeyboardInterrupt),
], ids=["disk-full", "ctrl-c"])
def test_write_failing_midway_leaves_old_file_and_no_temp_files(small, tmp_path, monkeypatch, error, expected):
    model, origin = small
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[])
    before = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{partial")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(expected):
        save(path, model, origin=origin, plan=[])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("where, message", [
    ("missing-folder", "does not exist"),
    ("is-a-folder", "it is a folder"),
], ids=["missing-folder", "is-a-folder"])
def test_unwritable_destination_fails_before_any_work(small, tmp_path, where, message):
    model, origin = small
    path = tmp_path / "nope" / "m.safetensors" if where == "missing-folder" else tmp_path
    with pytest.raises(FileFormatError, match=message):
        save(path, model, origin=origin, plan=[])


def test_unserialisable_metadata_leaves_existing_file_untouched(small, tmp_path):
    model, origin = small
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[])
    before = path.read_bytes()
    with pytest.raises(FileFormatError, match="report is not JSON-serialisable"):
        save(path, model, origin=origin, plan=[], report={"tensor": torch.zeros(1)})
    with pytest.raises(FileFormatError, match="plan must be a list"):
        save(path, model, origin=origin, plan="layer1")
    with pytest.raises(ModelError, match="cannot save a OrderedDict: expected a torch.nn.Module"):
        save(path, model.state_dict(), origin=origin, plan=[])
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------ bad files
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates a file, proving code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _make_bad(kind, path, tmp_path):
    """Turn the good file at ``path`` into a bad one of ``kind``; return the path to load."""
    data = path.read_bytes()
    if kind == "missing":
        return tmp_path / "nope.safetensors"
    if kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x89PNG not a model at all" * 40)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-header":
        path.write_bytes(data[:40])
    elif kind == "pickle-payload":
        with open(path, "wb") as f:
            pickle.dump({"x": _Payload(tmp_path / "pwned")}, f)
    elif kind == "plain-safetensors":
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    elif kind == "wrong-format-tag":
        _rewrite(path, format="igc-convert/99")
    elif kind == "no-format-tag":
        _rewrite(path, format=None)
    elif kind == "bad-json-origin":
        _rewrite(path, origin='{"kind": "factory", "name": ')
    elif kind == "origin-not-object":
        _rewrite(path, origin='["resnet18"]')
    elif kind == "origin-without-kind":
        _rewrite(path, origin='{"name": "x"}')
    elif kind == "plan-not-list":
        _rewrite(path, plan='{"name": "3"}')
    elif kind == "plan-names-missing-layer":
        _rewrite(path, plan=json.dumps([{"name": "99", "block": "igcv1", "shape": {}}]))
    elif kind == "missing-tensor":
        tensors = safetensors.torch.load_file(str(path))
        del tensors["3.weight"]
        _rewrite(path, tensors=tensors)
    elif kind == "wrong-shape-tensor":
        tensors = safetensors.torch.load_file(str(path))
        tensors["8.weight"] = torch.zeros(7, 32)
        _rewrite(path, tensors=tensors)
    elif kind == "other-architecture":
        _rewrite(path, origin=json.dumps({"kind": "torchvision", "name": "resnet18", "weights": None,
                                          "kwargs": {"num_classes": 5}}))
    elif kind == "nan-tensor":
        tensors = safetensors.torch.load_file(str(path))
        tensors["0.weight"][0, 0, 0, 0] = float("nan")
        _rewrite(path, tensors=tensors)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("zero-bytes", r"is empty \(0 bytes\)"),
    ("garbage", "is not a safetensors file"),
    ("truncated", "damaged safetensors file"),
    ("truncated-header", "is not a safetensors file"),
    ("pickle-payload", "is not a safetensors file"),
    ("plain-safetensors", "is not an igc-convert model file: its header has no metadata"),
    ("wrong-format-tag", "format tag 'igc-convert/99'"),
    ("no-format-tag", "no igc-convert format tag"),
    ("bad-json-origin", "'origin' metadata is not valid JSON"),
    ("origin-not-object", "'origin' metadata is a list, not a dict"),
    ("origin-without-kind", "origin has no 'kind' string"),
    ("plan-not-list", "'plan' metadata is a dict, not a list"),
    ("plan-names-missing-layer", "plan does not fit.*'99'"),
    ("missing-tensor", r"tensors do not fit .*missing: 3.weight$"),
    ("wrong-shape-tensor", r"shape mismatch: 8.weight \(5x32 in model, 7x32 in file\)"),
    ("other-architecture", "tensors do not fit the rebuilt resnet18.*missing: conv1.weight"),
    ("nan-tensor", "tensor '0.weight' holds NaN/Inf"),
])
def test_bad_or_tampered_file_is_a_file_format_error_naming_it(small, tmp_path, kind, message):
    model, origin = small
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[])
    bad = _make_bad(kind, path, tmp_path)
    with pytest.raises(FileFormatError, match=message) as info:
        load(bad)
    assert str(bad) in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_origin_that_cannot_be_rebuilt_is_a_model_error_naming_the_file(small, tmp_path):
    model, origin = small
    path = save(tmp_path / "m.safetensors", model, origin=origin, plan=[])
    _rewrite(path, origin=json.dumps({**origin, "name": "gone_module_xyz:small_cnn"}))
    with pytest.raises(ModelError, match="cannot rebuild the original architecture.*gone_module_xyz") as info:
        load(path)
    assert str(path) in str(info.value)

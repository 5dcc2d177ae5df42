"""ONNX export: onnxruntime parity, lean graphs (shuffle = one Reshape→Transpose→Reshape or folded
away), dynamic batch, atomic writes, clear errors. Exports are slow (seconds each with the dynamo
exporter), so each model is exported once per module and several tests read the result."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from igc_convert.errors import ConfigError, ExportError, FileFormatError
from igc_convert.export import (ExportResult, export_onnx, export_pair, fold_channel_permutations, op_counts,
                                simplify)
from igc_convert.shuffle import ChannelShuffle, shuffle_permutation

LEAN_FORBIDDEN = {"Identity", "Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Constant", "Expand",
                  "CastLike", "BatchNormalization"}


def _bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm with non-trivial statistics, so that folding it wrongly would show."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def _ort(path_or_proto, x: torch.Tensor) -> np.ndarray:
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _assert_parity(path, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = _ort(path, x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _shuffle_chains(model: onnx.ModelProto) -> list[list[str]]:
    """Op types of every Reshape→Transpose→Reshape run in the graph (consumer order)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    chains = []
    for n in model.graph.node:
        if n.op_type == "Transpose":
            before = producer.get(n.input[0])
            after = [m for m in model.graph.node if n.output[0] in m.input]
            chains.append([before.op_type if before else None, "Transpose", *(m.op_type for m in after)])
    return chains


# --------------------------------------------------------------------------- a grouped, shuffled model
@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4), ChannelShuffle(4, 8),
                          nn.Conv2d(32, 16, 1, groups=2), _bn(16), nn.ReLU())
    model.train()  # export must use eval mode and put this back
    state = copy.deepcopy(model.state_dict())
    path = tmp_path_factory.mktemp("grouped") / "grouped.onnx"
    result = export_onnx(model, path, torch.randn(2, 16, 8, 8))
    return model, state, result


def test_grouped_parity_and_result(grouped):
    model, _, result = grouped
    assert isinstance(result, ExportResult) and result.path.is_file()
    assert result.exporter == "dynamo"
    assert result.rel_diff <= 1e-4 and result.max_abs_diff >= 0
    assert result.batch_sizes_checked == (2, 3)  # the example batch and another one
    assert result.opset == onnx.load(str(result.path)).opset_import[0].version
    _assert_parity(result.path, copy.deepcopy(model), torch.randn(4, 16, 8, 8))


def test_grouped_graph_is_lean(grouped):
    _, _, result = grouped
    assert result.op_counts == {"Conv": 2, "Reshape": 2, "Transpose": 1, "Relu": 1}
    assert not LEAN_FORBIDDEN & set(result.op_counts)
    assert sum(result.op_counts_before.values()) > sum(result.op_counts.values())
    proto = onnx.load(str(result.path))
    assert _shuffle_chains(proto) == [["Reshape", "Transpose", "Reshape"]]
    inits = {t.name for t in proto.graph.initializer}
    assert all(n.input[1] in inits for n in proto.graph.node if n.op_type == "Reshape")  # constant shapes


def test_grouped_shuffle_is_the_index_permutation(grouped):
    """The exported Reshape→Transpose→Reshape, run alone, is ``x[:, shuffle_permutation(...)]``."""
    _, _, result = grouped
    proto = onnx.load(str(result.path))
    nodes = [n for n in proto.graph.node if n.op_type in ("Reshape", "Transpose")]
    shape_names = {n.input[1] for n in nodes if n.op_type == "Reshape"}
    shapes = [t for t in proto.graph.initializer if t.name in shape_names]
    graph = helper.make_graph(
        nodes, "shuffle", [helper.make_tensor_value_info(nodes[0].input[0], TensorProto.FLOAT, ["n", 32, 8, 8])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], shapes)
    alone = helper.make_model(graph, opset_imports=proto.opset_import)
    x = torch.randn(3, 32, 8, 8)
    np.testing.assert_array_equal(_ort(alone, x), x[:, shuffle_permutation(32, 4, 8)].numpy())


def test_model_left_as_it_was(grouped):
    model, state, _ = grouped
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_in_another_dtype_exports_as_float32(tmp_path, dtype, caplog):
    """onnxruntime's CPU kernels are float32: a double, half or bfloat16 model is exported as a float32
    copy (bfloat16 was a bare TypeError, double had no Conv kernel, half missed parity), the caller's
    model untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _bn(16), nn.ReLU(), nn.Conv2d(16, 8, 1)).to(dtype)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING", logger="igc_convert.export"):
        result = export_onnx(model, tmp_path / "m.onnx", x.to(dtype))
    assert "float32 copy" in caplog.text and result.rel_diff <= 1e-4
    _assert_parity(tmp_path / "m.onnx", copy.deepcopy(model).float(), x)
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in model.state_dict().items())


class _Branchy(nn.Module):
    """A forward that branches on a tensor's value: torch.export cannot trace it, TorchScript freezes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.mean() > 0:
            y = y * 2
        return y.mean((2, 3))


def test_a_frozen_branch_is_reported_and_torch_exports_graph_dump_is_not(tmp_path, caplog, capfd):
    """The fallback's trace follows the example's branch; the user is told where, in one line. The
    partial graph that torch.export print()s on failure (60 lines) stays out of the user's stderr."""
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="igc_convert.export"):
        result = export_onnx(_Branchy(), tmp_path / "b.onnx", torch.randn(1, 3, 8, 8))
    assert result.exporter == "torchscript"
    assert "may not generalise to other inputs" in caplog.text and "test_export.py" in caplog.text
    assert "def forward" not in capfd.readouterr().err


# --------------------------------------------------------------------------- folding shuffles away
@pytest.fixture(scope="module")
def folding(tmp_path_factory):
    torch.manual_seed(1)
    model = nn.Sequential(
        # A: shuffle → BN → ReLU → dense conv: moves through BN/ReLU, folds into the dense conv's inputs.
        nn.Conv2d(8, 16, 3, padding=1, groups=2), ChannelShuffle(2, 8), _bn(16), nn.ReLU(), nn.Conv2d(16, 16, 1),
        # B: dense conv → ReLU → shuffle → grouped conv: folds back into the dense conv's outputs.
        nn.ReLU(), ChannelShuffle(4, 4), nn.Conv2d(16, 16, 1, groups=4),
        # C: grouped → shuffle → BN → grouped: cannot fold; moves past the BN, which then fuses.
        ChannelShuffle(4, 4), _bn(16), nn.ReLU(), nn.Conv2d(16, 16, 1, groups=2),
        # D: shuffle → depthwise → max-pool → dense conv: folds through per-channel ops.
        ChannelShuffle(2, 8), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.MaxPool2d(2), nn.Conv2d(16, 4, 1),
    )
    path = tmp_path_factory.mktemp("folding") / "folding.onnx"
    return model, export_onnx(model, path, torch.randn(2, 8, 8, 8))


def test_folded_shuffles_keep_parity(folding):
    model, result = folding
    assert result.rel_diff <= 1e-4
    _assert_parity(result.path, model, torch.randn(5, 8, 8, 8))


def test_shuffles_folded_where_a_neighbour_allows(folding):
    _, result = folding
    assert (result.folded_permutations, result.moved_permutations) == (3, 1)
    assert result.op_counts_before["Transpose"] == 4
    # Only C's shuffle is left, still one Reshape→Transpose→Reshape; every BatchNorm fused.
    assert result.op_counts.get("Transpose") == 1 and result.op_counts.get("Reshape") == 2
    assert _shuffle_chains(onnx.load(str(result.path))) == [["Reshape", "Transpose", "Reshape"]]
    assert result.op_counts["Conv"] == 6
    assert not LEAN_FORBIDDEN & set(result.op_counts)


# --------------------------------------------------------------------------- the pass on hand-made graphs
def _graph(nodes, inits, channels=8, out_channels=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_channels or channels, 4, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _shuffle_nodes(src, dst, a=2, b=4, channels=8):
    return [helper.make_node("Reshape", [src, "s1"], [f"{dst}_r"]),
            helper.make_node("Transpose", [f"{dst}_r"], [f"{dst}_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{dst}_t", "s2"], [dst])], {
        "s1": np.array([-1, a, b, channels // (a * b) * 16], np.int64), "s2": np.array([-1, channels, 4, 4], np.int64)}


def _case(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    shuffle, consts = _shuffle_nodes("x", "p")
    conv = lambda src: helper.make_node("Conv", [src, "w"], ["y"])  # noqa: E731
    if name == "shuffle-then-dense-conv":
        return _graph([*shuffle, conv("p")], {**consts, "w": w}), 1
    if name == "5d-shufflenet-style-then-dense-conv":  # view(N, g, C/g, H, W).transpose(1, 2).view(N, C, H, W)
        return _graph([helper.make_node("Reshape", ["x", "s5"], ["r"]),
                       helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
                       helper.make_node("Reshape", ["t", "s2"], ["p"]), conv("p")],
                      {"s5": np.array([-1, 2, 4, 4, 4], np.int64), "s2": consts["s2"], "w": w}), 1
    if name == "spatial-transpose-untouched":  # shape-preserving, but not a channel permutation
        return _graph([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
                       helper.make_node("Reshape", ["t", "s2"], ["r"]), conv("r")],
                      {"s2": consts["s2"], "w": w}), 0
    if name == "two-consumers-untouched":
        return _graph([*shuffle, helper.make_node("Conv", ["p", "w"], ["c"]),
                       helper.make_node("Add", ["c", "p"], ["y"])], {**consts, "w": w}), 0
    if name == "residual-add-untouched":  # Add of two tensors is not per-channel-constant
        return _graph([*shuffle, helper.make_node("Add", ["p", "x"], ["a"]), conv("a")], {**consts, "w": w}), 0
    if name == "mul-by-channel-constant-then-conv":
        scale = rng.standard_normal((8, 1, 1)).astype(np.float32)
        return _graph([*shuffle, helper.make_node("Mul", ["p", "k"], ["m"]), conv("m")],
                      {**consts, "k": scale, "w": w}), 1
    raise KeyError(name)


@pytest.mark.parametrize("name", ["shuffle-then-dense-conv", "5d-shufflenet-style-then-dense-conv",
                                  "spatial-transpose-untouched", "two-consumers-untouched",
                                  "residual-add-untouched", "mul-by-channel-constant-then-conv"])
def test_fold_pass_on_hand_made_graphs(name):
    proto, expected = _case(name)
    x = torch.randn(3, 8, 4, 4)
    before = _ort(proto, x)
    model = ir.from_proto(proto)
    folded_count, _ = fold_channel_permutations(model)
    assert folded_count == expected
    after_proto = ir.to_proto(model)
    onnx.checker.check_model(after_proto)
    np.testing.assert_allclose(_ort(after_proto, x), before, rtol=1e-5, atol=1e-5)
    if expected:
        assert "Transpose" not in op_counts(after_proto)


def test_simplify_removes_identity_and_counts():
    proto, _ = _case("shuffle-then-dense-conv")
    proto.graph.node.insert(0, helper.make_node("Identity", ["x"], ["xi"]))
    proto.graph.node[1].input[0] = "xi"
    stats = simplify(ir.from_proto(proto))
    assert stats.before["Identity"] == 1 and stats.before["Transpose"] == 1
    assert stats.after == {"Conv": 1} and stats.folded_permutations == 1


# --------------------------------------------------------------------------- resnet18
@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    return model, export_onnx(model, path, torch.randn(1, 3, 64, 64))


def test_resnet18_parity_and_lean_graph(resnet):
    model, result = resnet
    assert result.rel_diff <= 1e-4
    assert result.batch_sizes_checked == (1, 2)
    assert result.op_counts["Conv"] == 20 and result.op_counts["Add"] == 8
    assert not LEAN_FORBIDDEN & set(result.op_counts)
    _assert_parity(result.path, model, torch.randn(3, 3, 64, 64))


# --------------------------------------------------------------------------- failures
class Drifting(nn.Module):
    """Returns ``x * calls``: a Python counter the tracer bakes in, so ONNX disagrees with PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


class Histc(nn.Module):
    def forward(self, x):
        return x + torch.histc(x, bins=4).sum()


def _existing(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    return target


def test_parity_failure_leaves_existing_file(tmp_path):
    target = _existing(tmp_path)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(Drifting(), target, torch.randn(2, 3, 8, 8))
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_unsupported_op_is_named(tmp_path):
    target = _existing(tmp_path)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Histc())
    with pytest.raises(ExportError, match=r"histc.*module 1 \(Histc\)"):
        export_onnx(model, target, torch.randn(2, 3, 8, 8))
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_input_too_small(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5))
    with pytest.raises(ConfigError, match="too small"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 6, 6))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, error", [
    (dict(rtol=0.0), ConfigError),
    (dict(exporter="tflite"), ConfigError),
], ids=["zero-rtol", "unknown-exporter"])
def test_bad_options(tmp_path, kwargs, error):
    with pytest.raises(error):
        export_onnx(nn.Conv2d(3, 4, 1), tmp_path / "m.onnx", torch.randn(1, 3, 4, 4), **kwargs)


def test_unwritable_destination(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        export_onnx(nn.Conv2d(3, 4, 1), tmp_path / "missing" / "m.onnx", torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------------- TorchScript path, pairs, CLI
def test_torchscript_static_export_is_lean_too(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4), ChannelShuffle(4, 8),
                          nn.Conv2d(32, 16, 1, groups=2), _bn(16), nn.ReLU())
    result = export_onnx(model, tmp_path / "ts.onnx", torch.randn(2, 16, 8, 8), exporter="torchscript",
                         dynamic_batch=False)
    assert result.exporter == "torchscript" and result.batch_sizes_checked == (2,)
    assert result.op_counts == {"Conv": 2, "Reshape": 2, "Transpose": 1, "Relu": 1}
    assert result.rel_diff <= 1e-4


def test_export_pair(tmp_path):
    torch.manual_seed(3)
    original = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    converted = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), ChannelShuffle(2, 8),
                              nn.Conv2d(16, 8, 1, groups=2), nn.ReLU())
    a, b = export_pair(original, converted, tmp_path, torch.randn(1, 8, 6, 6), exporter="torchscript")
    assert (a.path.name, b.path.name) == ("original.onnx", "converted.onnx")
    assert a.op_counts["Conv"] == 1 and b.op_counts["Conv"] == 2
    assert a.rel_diff <= 1e-4 and b.rel_diff <= 1e-4


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn
    from igc_convert.shuffle import ChannelShuffle

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1, groups=2), ChannelShuffle(2, 8),
                             nn.Conv2d(16, 8, 1, groups=2))
""")


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded-random-init", "unrecorded-random-init"])
def test_cli_export_with_original(tmp_path, monkeypatch, capsys, caplog, seeded):
    """The original is rebuilt from the file's origin; random weights that the origin did not record
    (no seed) give a fresh init of the same architecture, with a warning."""
    from igc_convert import serialize
    from igc_convert.cli import export as cli
    from igc_convert.models import build_model, build_model_from_origin

    (tmp_path / "igc_test_export_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    if seeded:
        model, origin = build_model("igc_test_export_factory:make", seed=3)
    else:
        origin = {"kind": "factory", "name": "igc_test_export_factory:make", "weights": None, "kwargs": {}}
        model = build_model_from_origin(origin, architecture_only=True)
    serialize.save(tmp_path / "conv.safetensors", model, origin=origin, plan=[])
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "conv.safetensors"), "-o", str(tmp_path / "conv.onnx"),
                              "--original", str(tmp_path / "orig.onnx"), "--input-size", "12", "10",
                              "--static-batch", "--batch-size", "2", "--exporter", "torchscript"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "converted:" in out and "original:" in out and "parity vs PyTorch" in out
    assert "Transpose" in out and "simplified" in out
    for name in ("conv.onnx", "orig.onnx"):
        dims = [d.dim_value for d in onnx.load(str(tmp_path / name)).graph.input[0].type.tensor_type.shape.dim]
        assert dims == [2, 3, 12, 10]
    assert ("fresh random init of the same architecture" in caplog.text) is not seeded


def test_cli_input_channels():
    from igc_convert.cli.export import input_channels

    assert input_channels(nn.Sequential(nn.ReLU(), nn.Conv2d(5, 2, 1))) == 5
    with pytest.raises(ConfigError, match="--channels"):
        input_channels(nn.Sequential(nn.ReLU()))


def test_cli_export_uses_the_input_size_the_model_declares(tmp_path):
    """Without --input-size the digits model (it declares 1×12×12, timm's convention) exports at 12×12,
    not 224×224; --input-size still overrides it."""
    from igc_convert.cli import main

    converted = tmp_path / "m.safetensors"
    assert main(["convert", "igc_convert.digits:digits_resnet", "-o", str(converted), "--params-ratio", "0.3"]) == 0

    def spatial(path):
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value for d in dims[1:]]

    assert main(["export", str(converted), "-o", str(tmp_path / "a.onnx")]) == 0
    assert spatial(tmp_path / "a.onnx") == [1, 12, 12]
    assert main(["export", str(converted), "-o", str(tmp_path / "b.onnx"), "--input-size", "16", "20"]) == 0
    assert spatial(tmp_path / "b.onnx") == [1, 16, 20]
    assert main(["export", str(converted), "-o", str(tmp_path / "c.onnx"), "--dynamic-size"]) == 0
    dims = onnx.load(str(tmp_path / "c.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


WIDE_MODEL = '''
import torch
from torch import nn


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, 10, 18)}   # non-square, timm's convention
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def build(num_classes=None):
    return Wide()
'''


def test_cli_export_keeps_a_declared_non_square_input(tmp_path, monkeypatch):
    """A model declaring (3, 10, 18) exports at 10×18 (it was 18×18), and converts on a 10×18 example."""
    from igc_convert.cli import main

    (tmp_path / "wide_model.py").write_text(WIDE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    converted = tmp_path / "m.safetensors"
    assert main(["convert", "wide_model:build", "--weights", "none", "-o", str(converted), "--params-ratio", "0.3",
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    layer = next(r for r in report["layers"] if r["name"] == "body.2")
    assert layer["macs_before"] == 32 * 32 * 9 * 10 * 18  # counted at the declared 10×18
    assert main(["export", str(converted), "-o", str(tmp_path / "a.onnx")]) == 0
    dims = onnx.load(str(tmp_path / "a.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 10, 18]


# --------------------------------------------------------------------------- dynamic height and width
class _ImageToImage(nn.Module):
    """A converted-style image-to-image net: a downsampling IGC block, a reflect-padded one, an upsampling
    path and a skip connection that needs even sides."""

    def __init__(self) -> None:
        super().__init__()
        from igc_convert.blocks import IGCV1, IGCV3

        torch.manual_seed(0)
        self.down = IGCV1(3, 16, 3, 2, 1, primary_groups=1, secondary_groups=2, rank=4)
        self.mid = IGCV3(16, 16, 3, 1, 1, padding_mode="reflect", expand_groups=2, reduce_groups=2, mid_channels=32)
        self.bn, self.up = _bn(16), nn.ConvTranspose2d(16, 3, 2, 2)

    def forward(self, x):
        return self.up(torch.relu(self.bn(self.mid(self.down(x))))) + x


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dynamic_size_export_runs_at_other_sizes(tmp_path, exporter):
    """Segmentation and image-to-image models are deployed at many image sizes: with dynamic_size the
    graph's height and width are symbolic ("height", "width") and onnxruntime matches PyTorch at sizes
    the export never saw; parity was checked at the example's size and a second one."""
    model = _ImageToImage().eval()
    result = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 20, 24), exporter=exporter, dynamic_size=True)
    assert result.dynamic_size and result.sizes_checked == ((20, 24), (20, 24), (24, 32))
    if exporter == "dynamo":  # IGCV3's shuffle is one Gather: no run-time shape arithmetic, no Transpose
        assert result.op_counts.get("Gather") == 1 and not {"Shape", "Concat", "Transpose"} & set(result.op_counts)
    assert "size 20x24 and 24x32" in result.summary()
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    for shape in ((2, 3, 36, 18), (1, 3, 64, 64)):
        _assert_parity(result.path, model, torch.randn(*shape))


def test_a_model_that_needs_its_input_size_is_refused_a_dynamic_size(tmp_path):
    """A classifier that flattens its feature map into a Linear only runs at its own size: the export
    says so in one line, and writes nothing."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(ConfigError, match=r"\[1, 3, 16, 16\].*may not allow a dynamic input size"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), dynamic_size=True)

    class FixedUpsample(nn.Module):  # runs at any size in PyTorch; the TorchScript trace freezes the size
        def forward(self, x):
            return nn.functional.interpolate(x, size=(int(x.shape[2]) * 2, 8))

    with pytest.raises(ExportError, match=r"output shape .* from onnxruntime.*may not allow a dynamic input size"):
        export_onnx(FixedUpsample(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), dynamic_size=True,
                    exporter="torchscript")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="N×C×H×W"):
        export_onnx(nn.Conv1d(3, 4, 1), tmp_path / "m.onnx", torch.randn(1, 3, 8), dynamic_size=True)


def test_second_size_keeps_power_of_two_divisibility():
    from igc_convert.export import second_size

    assert second_size((224, 224)) == (256, 256) and second_size((20, 15)) == (24, 16)
    assert second_size((512, 96)) == (544, 128)


def test_a_simplified_graph_that_fails_the_checker_falls_back_to_the_exported_one(tmp_path, monkeypatch, caplog):
    """onnxscript's optimizer left a dangling reference in torchvision's detection graphs ("Nodes in a
    graph must be topologically sorted"), and export stopped there. The graph as exported is checked,
    kept with a warning, and must still pass parity."""
    import logging

    from igc_convert import export

    real = export.simplify

    def breaking(model):
        stats = real(model)
        first = next(iter(model.graph))
        model.graph.remove(first, safe=False)  # its outputs are still read: an invalid graph
        return stats

    monkeypatch.setattr(export, "simplify", breaking)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with caplog.at_level(logging.WARNING):
        result = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert "writing the graph as exported, unsimplified" in caplog.text
    assert result.rel_diff < 1e-4 and result.op_counts == result.op_counts_before
    _assert_parity(result.path, model, torch.randn(2, 3, 8, 8))


def test_a_shuffle_as_gather_is_the_same_permutation_and_is_put_back():
    from igc_convert.shuffle import as_gather

    model = nn.Sequential(ChannelShuffle(4, 8), nn.Identity(), ChannelShuffle(2, 2))
    x = torch.randn(2, 64, 3, 5)
    with as_gather(model):
        assert all(m.gather for m in model if isinstance(m, ChannelShuffle))
        gathered = model(x)
    assert torch.equal(gathered, model(x)) and not model[0].gather and not model[2].gather
    with pytest.raises(RuntimeError, match="inside"), as_gather(model):
        raise RuntimeError("inside")
    assert not model[0].gather


def test_empty_outputs_are_exported_with_a_warning_that_parity_compared_nothing(tmp_path, caplog):
    """A model whose outputs are empty on the example (a random-init detector keeps no box) passes a
    parity check that compared nothing: the export says so."""
    class NoBoxes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x).flatten(1)
            return y[:, y.shape[1]:]

    with caplog.at_level(logging.WARNING, logger="igc_convert.export"):
        export_onnx(NoBoxes().eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert "the parity check compared no value" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="igc_convert.export"):
        export_onnx(nn.Conv2d(3, 4, 3).eval(), tmp_path / "c.onnx", torch.randn(1, 3, 8, 8))
    assert "compared no value" not in caplog.text


def test_the_opset_asked_for_is_the_opset_written_or_an_error(tmp_path):
    # The dynamo exporter writes opset 18+ and converts down only where onnx's version converter can
    # (not this model's BatchNorms): it used to hand back its own opset 18 for 13, silently.
    from igc_convert.digits import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet().eval()
    x = torch.randn(1, 1, 12, 12)
    res = export_onnx(model, tmp_path / "m13.onnx", x, opset=13)
    assert res.opset == 13 and res.exporter == "torchscript"
    assert [o.version for o in onnx.load(str(tmp_path / "m13.onnx")).opset_import if o.domain in ("", "ai.onnx")] == [13]
    with pytest.raises(ExportError, match="opset 18, not the opset 13 asked for"):
        export_onnx(model, tmp_path / "dynamo13.onnx", x, opset=13, exporter="dynamo")
    assert not (tmp_path / "dynamo13.onnx").exists()
    assert export_onnx(model, tmp_path / "m20.onnx", x, opset=20).opset == 20

"""Linear layers converted as 1×1 convs (``convert(..., linear=True)``, ``--linear``)."""

import json
import logging
import sys

import pytest
import torch
from torch import nn

import igc_convert as ic
from igc_convert import latency
from igc_convert.blocks import IGCBlock
from igc_convert.cli import main
from igc_convert.convert import apply_plan
from igc_convert.errors import ConfigError
from igc_convert.export import export_onnx
from igc_convert.linear import LinearAsConv, dense_conv, unwrap_dense, wrap_linears
from igc_convert.models import build_model
from igc_convert.serialize import load, save

from conftest import importable_module

pytestmark = pytest.mark.usefixtures("one_thread")

NETS = "igc_linear_test_nets"
NETS_SOURCE = '''
from torch import nn


def tiny(num_classes=10):
    """A conv stack, then a classifier of two Linear layers (64 -> 32 -> num_classes)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
'''

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    with importable_module(tmp_path_factory, NETS, NETS_SOURCE):
        yield NETS


@pytest.fixture
def tiny(nets):
    torch.manual_seed(0)
    model, origin = build_model(f"{nets}:tiny")
    return model.eval(), origin


class Tokens(nn.Module):
    """A Linear on 3-d tokens (N × HW × C), then one on the pooled 2-d features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(self.mix(tokens).mean(1))


def _sites(result):
    return {r.name: r for r in result.records}


# ------------------------------------------------------------------------------------------ the wrapper
@pytest.mark.parametrize("bias", [True, False])
def test_wrapper_computes_the_linear_and_traces(bias):
    fc = nn.Linear(24, 7, bias=bias)
    x = torch.randn(5, 24)
    wrapper = LinearAsConv.from_linear(fc)
    torch.testing.assert_close(wrapper(x), fc(x))
    torch.testing.assert_close(torch.fx.symbolic_trace(wrapper)(x), fc(x))
    back = wrapper.to_linear()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back(x), fc(x))


def test_wrap_and_unwrap_in_place(tiny):
    model, _ = tiny
    before = model(X)
    assert wrap_linears(model, X[:1]) == ["7", "9"]
    assert isinstance(model[7], LinearAsConv) and isinstance(model[9], LinearAsConv)
    torch.testing.assert_close(model(X), before)
    assert unwrap_dense(model) == ["7", "9"]
    assert type(model[7]) is nn.Linear and type(model[9]) is nn.Linear
    torch.testing.assert_close(model(X), before)


def test_linear_on_3d_input_stays(caplog):
    model = Tokens().eval()
    with caplog.at_level(logging.INFO, logger="igc_convert.linear"):
        result = ic.convert(model, ic.ParamsRatio(0.6), example_inputs=X[:1], linear=True, progress=False)
    assert "mix" in caplog.text and "3-d input" in caplog.text
    names = set(_sites(result))
    assert "head.conv" in names and not any(n.startswith("mix") for n in names)
    assert type(result.model.mix) is nn.Linear


# ------------------------------------------------------------------------------------------ convert
def test_linear_false_leaves_linears_alone(tiny):
    model, _ = tiny
    result = ic.convert(model, ic.ParamsRatio(0.3), example_inputs=X[:1], progress=False)
    assert set(_sites(result)) == {"0", "3"}
    assert type(result.model[7]) is nn.Linear and type(result.model[9]) is nn.Linear
    assert type(model[7]) is nn.Linear  # and the caller's model as it was


def test_lossless_budget_reproduces_the_model(tiny):
    """Rank-4 Linears are fitted exactly by rank-4 blocks: the converted classifier computes what it did."""
    model, _ = tiny
    with torch.no_grad():
        for fc in (model[7], model[9]):
            fc.weight.copy_(torch.randn(fc.out_features, 4) @ torch.randn(4, fc.in_features))
    result = ic.convert(model, ic.MaxError(1e-5), example_inputs=X[:1], exclude=["0", "3"], linear=True,
                        progress=False)
    assert [e["name"] for e in result.plan] == ["7.conv", "9.conv"]
    assert all(r.params_after < r.params_before for r in result.records if r.converted)
    assert all(isinstance(result.model[i].conv, IGCBlock) for i in (7, 9))
    torch.testing.assert_close(result.model(X), model(X), rtol=1e-4, atol=1e-5)
    assert type(model[7]) is nn.Linear  # convert worked on a copy


def test_real_budget_converts_linear_sites_data_aware(tiny):
    model, _ = tiny
    result = ic.convert(model, ic.ParamsRatio(0.3), calibration=X, exclude=["9.conv"], linear=True, progress=False)
    sites = _sites(result)
    assert set(sites) == {"0", "3", "7.conv", "9.conv"}
    assert sites["7.conv"].converted and sites["7.conv"].output_error is not None
    assert sites["9.conv"].reason == "excluded"
    assert result.report.totals()["params_ratio"] <= 0.3
    assert isinstance(result.model[7].conv, IGCBlock)
    assert type(result.model[9]) is nn.Linear  # left dense: a plain Linear again
    assert result.model(X).shape == (16, 10)


def test_linear_needs_example_inputs(tiny):
    with pytest.raises(ConfigError, match="example inputs"):
        ic.convert(tiny[0], ic.ParamsRatio(0.5), linear=True, progress=False)


def test_too_wide_layer_falls_back_to_weight_space(tiny, monkeypatch, caplog):
    model, _ = tiny
    # 7.conv (64 inputs) and 3 (144) are over
    monkeypatch.setattr(sys.modules["igc_convert.convert"], "MAX_LAYER_STATS_BYTES", 40 * 40 * 8)
    with caplog.at_level(logging.WARNING, logger="igc_convert.convert"):
        result = ic.convert(model, ic.ParamsRatio(0.3), calibration=X, linear=True, progress=False)
    assert "7.conv: its input statistics would take" in caplog.text and "weight space" in caplog.text
    sites = _sites(result)
    assert sites["7.conv"].converted and sites["7.conv"].output_error is None
    assert all(sites[n].output_error is not None for n in ("0", "9.conv") if sites[n].converted)
    assert torch.isfinite(result.model(X)).all()


# ------------------------------------------------------------------------------------------ rebuild, export
def test_save_load_round_trip(tiny, tmp_path):
    model, origin = tiny
    result = ic.convert(model, ic.ParamsRatio(0.4), example_inputs=X[:1], exclude=["9.conv"], linear=True,
                        progress=False)
    assert "7.conv" in [e["name"] for e in result.plan]
    path = save(tmp_path / "m.safetensors", result.model, origin=origin, plan=result.plan, report=result.report)
    loaded = load(path)
    assert isinstance(loaded.model[7], LinearAsConv) and type(loaded.model[9]) is nn.Linear
    torch.testing.assert_close(loaded.model(X), result.model.eval()(X), rtol=0, atol=0)


def test_apply_plan_refuses_a_conv_name_without_a_linear(tiny):
    with pytest.raises(ConfigError, match="8.conv"):
        apply_plan(tiny[0], [dict(name="8.conv", block="igcv1",
                                  shape=dict(primary_groups=1, secondary_groups=1, rank=2))])


def test_export_parity(tiny, tmp_path):
    model, _ = tiny
    result = ic.convert(model, ic.ParamsRatio(0.3), example_inputs=X[:1], linear=True, progress=False)
    assert any(e["name"].endswith(".conv") for e in result.plan)
    exported = export_onnx(result.model, tmp_path / "m.onnx", X[:2])
    assert exported.rel_diff <= 1e-4


def test_revert_puts_the_linear_back(tiny):
    model, _ = tiny
    result = ic.convert(model, ic.ParamsRatio(0.3), example_inputs=X[:1], linear=True, progress=False)
    assert "7.conv" in [e["name"] for e in result.plan]
    assert isinstance(dense_conv(model, "7.conv"), nn.Conv2d)
    latency.revert_layer(model, result, "7.conv")
    assert type(result.model[7]) is nn.Linear and "7.conv" not in [e["name"] for e in result.plan]
    torch.testing.assert_close(result.model[7].weight, model[7].weight)


def test_cli_convert_linear(nets, tmp_path, capsys):
    out, rep = tmp_path / "m.safetensors", tmp_path / "r.json"
    assert main(["convert", f"{nets}:tiny", "-o", str(out), "--params-ratio", "0.3", "--input-size", "8",
                 "--linear", "--report", str(rep)]) == 0
    records = {r["name"]: r for r in json.loads(rep.read_text())["layers"]}
    assert {"7.conv", "9.conv"} <= set(records) and records["7.conv"]["block"] == "igcv1"
    assert "7.conv" in capsys.readouterr().out
    assert load(out).model(X).shape == (16, 10)

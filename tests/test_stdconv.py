"""timm's weight-standardised convs (BiT ResNets, NFNets) are converted as the plain convs they compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import igc_convert as ic
from igc_convert.convert import apply_plan
from igc_convert.stdconv import as_plain_conv, is_standardised

layers = pytest.importorskip("timm.layers")


@pytest.mark.parametrize("make", [
    lambda: layers.StdConv2d(8, 16, 3, padding=1),
    lambda: layers.StdConv2d(8, 16, 1, stride=2, bias=True),
    lambda: layers.ScaledStdConv2d(8, 16, 3, padding=1, gain_init=0.7),
    lambda: layers.ScaledStdConv2d(8, 16, (1, 3), padding=(0, 2), dilation=2, bias=False),
    lambda: layers.StdConv2dSame(8, 16, 3, stride=1),
], ids=["std", "std-1x1-stride2", "scaled", "scaled-dilated", "same-static"])
def test_a_standardised_conv_is_the_plain_conv_of_its_standardised_weight(make):
    torch.manual_seed(0)
    conv = make()
    if hasattr(conv, "gain"):
        with torch.no_grad():
            conv.gain.uniform_(0.5, 2)
    assert is_standardised(conv)
    x = torch.randn(2, 8, 11, 11)
    torch.testing.assert_close(as_plain_conv(conv)(x), conv(x))


def test_dynamic_padding_is_left_alone():
    assert not is_standardised(layers.StdConv2dSame(8, 16, 3, stride=2))  # TF "SAME": depends on the input size
    assert not is_standardised(nn.Conv2d(8, 16, 3))


class BiTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = layers.StdConv2d(3, 32, 3, padding=1)
        self.a = layers.StdConv2d(32, 64, 3, padding=1)
        self.b = layers.ScaledStdConv2d(64, 64, 3, padding=1, gain_init=1.3)
        self.c = layers.ScaledStdConv2d(64, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.relu(self.c(x)).mean((2, 3)))


def test_a_model_of_standardised_convs_converts_and_reloads():
    """Before: every conv had a custom forward, nothing was convertible ("not reachable")."""
    torch.manual_seed(0)
    model = BiTLike().eval()
    x = torch.randn(32, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ic.convert(model, ic.ParamsRatio(0.6), calibration=x, include=["a", "b"], progress=False)
    assert {e["name"] for e in result.plan} == {"a", "b"}
    assert result.report.totals()["params_ratio"] <= 0.6
    # The layers left dense are the original modules again; the caller's model is untouched.
    assert type(result.model.stem) is layers.StdConv2d and type(result.model.c) is layers.ScaledStdConv2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.a) is layers.StdConv2d
    # It is the conversion of the plain-conv twin: same plan, same outputs.
    twin = copy.deepcopy(model)
    for name in ("stem", "a", "b", "c"):
        twin.set_submodule(name, as_plain_conv(twin.get_submodule(name)))
    torch.testing.assert_close(twin(x), ref)
    plain = ic.convert(twin, ic.ParamsRatio(0.6), calibration=x, include=["a", "b"], progress=False)
    assert plain.plan == result.plan
    torch.testing.assert_close(result.model(x), plain.model(x))
    # Origin + plan + state dict rebuild it exactly (what save/load do).
    torch.manual_seed(1)
    rebuilt = apply_plan(BiTLike().eval(), result.plan)
    rebuilt.load_state_dict(result.model.state_dict())
    torch.testing.assert_close(rebuilt(x), result.model(x))


def test_inplace_conversion_puts_the_dense_layers_back_in_the_callers_model():
    torch.manual_seed(0)
    model = BiTLike().eval()
    stem = model.stem
    result = ic.convert(model, ic.ParamsRatio(0.6), example_inputs=torch.randn(2, 3, 12, 12), include=["b"],
                        inplace=True, progress=False)
    assert result.model is model and model.stem is stem and isinstance(model.b, ic.IGCBlock)

"""Blocks: forward equals the dense-equivalent conv, shapes match, counts match formulas and hooks."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from igc_convert.blocks import IGCV1, IGCV2, IGCV3, conv_macs, dense_conv_forward, make_block
from igc_convert.errors import ConfigError, IGCError, UnsupportedLayerError


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_config(draw):
    kh, kw = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2, 3]))
    return dict(
        in_channels=draw(st.sampled_from([4, 6, 8, 12])),
        out_channels=draw(st.sampled_from([4, 8, 12])),
        kernel_size=(kh, kw),
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 1))),
        dilation=(draw(st.integers(1, 2)), 1),
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
    )


@st.composite
def block_case(draw):
    cfg = draw(conv_config())
    cin, cout, S = cfg["in_channels"], cfg["out_channels"], math.prod(cfg["kernel_size"])
    kind = draw(st.sampled_from(["igcv1", "igcv2", "igcv3"]))
    if kind == "igcv1":
        L, M = draw(st.sampled_from(_divisors(cin))), draw(st.sampled_from(_divisors(cout)))
        shape = dict(primary_groups=L, secondary_groups=M,
                     rank=draw(st.integers(1, min(cout // M, cin // L * S))))
    elif kind == "igcv2":
        k1, k2 = draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([1, 2, 4]))
        c_mid = k1 * k2
        L = draw(st.sampled_from([d for d in _divisors(cin) if c_mid % d == 0]))
        # the last stage has c_mid/k2 = k1 groups: make out_channels divisible by it
        cfg["out_channels"] = k1 * draw(st.integers(1, 3))
        shape = dict(primary_groups=L, factors=[k1, k2])
    else:
        G1, G2 = draw(st.sampled_from(_divisors(cin))), draw(st.sampled_from(_divisors(cout)))
        shape = dict(expand_groups=G1, reduce_groups=G2, mid_channels=G1 * G2 * draw(st.integers(1, 3)))
    return kind, cfg, shape


@settings(max_examples=60, deadline=None)
@given(block_case(), st.integers(0, 2**31 - 1))
def test_forward_equals_dense_equivalent(case, seed):
    kind, cfg, shape = case
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg)
    block = make_block(kind, conv, shape, fit=False)
    for p in block.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, cfg["in_channels"], 9, 8)
    out = block(x)
    assert out.shape == conv(x).shape
    torch.testing.assert_close(out, dense_conv_forward(block, x), rtol=1e-4, atol=1e-4)
    # the block rebuilt from its own shape is the same structure
    rebuilt = type(block)(**block.conv_args(), **block.shape())
    rebuilt.load_state_dict(block.state_dict())
    torch.testing.assert_close(rebuilt(x), out)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("L,M", [(1, 1), (2, 4), (4, 2)], ids=lambda v: str(v))
def test_igcv1_full_rank_reproduces_dense_conv(L, M, mode):
    """Also for convs that reflect, replicate or wrap the border (image restoration, style transfer
    and GAN generators use them): the block's k×k conv pads the same way."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True, padding_mode=mode).double()
    r = min(16 // M, 8 // L * 9)
    block = IGCV1.from_conv(conv, primary_groups=L, secondary_groups=M, rank=r)
    x = torch.randn(3, 8, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(block(x), conv(x))


def _hook_counts(module, x):
    """Count params and MACs of the convs that actually run, with forward hooks."""
    macs = []

    def hook(m, inp, out):
        macs.append(out.shape[1] * out.shape[2] * out.shape[3] * (m.in_channels // m.groups) * math.prod(m.kernel_size))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    module(x)
    for h in handles:
        h.remove()
    return sum(macs)


@pytest.mark.parametrize("kind,shape,params_formula", [
    ("igcv1", dict(primary_groups=4, secondary_groups=2, rank=3),
     lambda ci, co, S: 3 * (2 * ci * S + 4 * co) + co),
    ("igcv2", dict(primary_groups=2, factors=[4, 4]),
     lambda ci, co, S: 16 * (ci // 2) * S + 16 * 4 + co * 4 + co),
    ("igcv3", dict(expand_groups=2, reduce_groups=4, mid_channels=24),
     lambda ci, co, S: 24 * ci // 2 + 24 * S + co * 24 // 4 + co),
], ids=["igcv1", "igcv2", "igcv3"])
def test_params_and_macs_match_formulas_and_hooks(kind, shape, params_formula):
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    block = make_block(kind, conv, shape, fit=False)
    assert block.num_params() == params_formula(16, 32, 9)
    x = torch.randn(1, 16, 14, 14)
    assert block.macs((14, 14)) == _hook_counts(block, x)
    assert conv_macs(16, 32, 3, 1, (7, 7)) == _hook_counts(conv, x)


def test_repr_names_the_shape():
    block = IGCV1(16, 32, 3, padding=1, primary_groups=2, secondary_groups=4, rank=2)
    text = repr(block)
    assert "primary_groups=2" in text and "secondary_groups=4" in text and "rank=2" in text
    assert "ChannelShuffle(2x4)" in text


BAD = [
    ("in not divisible", lambda: IGCV1(10, 8, 3, primary_groups=4, secondary_groups=1, rank=1), "in_channels=10"),
    ("out not divisible", lambda: IGCV1(8, 10, 3, primary_groups=1, secondary_groups=4, rank=1), "out_channels=10"),
    ("rank zero", lambda: IGCV1(8, 8, 3, rank=0), "rank"),
    ("rank too large", lambda: IGCV1(8, 8, 3, rank=9), "rank"),
    ("igcv2 chain too short", lambda: IGCV2(8, 8, 3, factors=[8]), "at least 2"),
    ("igcv2 out", lambda: IGCV2(8, 6, 3, factors=[4, 2]), "out_channels=6"),
    ("igcv3 mid", lambda: IGCV3(8, 8, 3, expand_groups=2, reduce_groups=2, mid_channels=6), "mid_channels=6"),
    ("grouped conv", lambda: IGCV1.from_conv(nn.Conv2d(8, 8, 3, groups=2), name="features.3"), "groups=2"),
    ("unknown padding mode", lambda: IGCV1(8, 8, 3, padding=1, padding_mode="mirror"), "padding_mode"),
    ("nan weights", lambda: IGCV1.from_conv(_nan_conv(), name="layer1.conv"), "NaN"),
    ("unknown kind", lambda: make_block("igcv9", nn.Conv2d(8, 8, 3), {}), "igcv9"),
    ("bad shape names layer", lambda: IGCV1.from_conv(nn.Conv2d(8, 8, 3), name="block.conv", rank=100), "block.conv"),
]


def _nan_conv():
    conv = nn.Conv2d(8, 8, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    return conv


@pytest.mark.parametrize("make,expected", [(m, e) for _, m, e in BAD], ids=[b[0] for b in BAD])
def test_bad_configurations_raise_project_errors(make, expected):
    with pytest.raises(IGCError, match=expected) as info:
        make()
    assert isinstance(info.value, (ConfigError, UnsupportedLayerError))


def test_refusal_names_the_layer():
    with pytest.raises(UnsupportedLayerError) as info:
        IGCV3.from_conv(nn.Conv2d(8, 8, 3, groups=8), name="features.1.conv")
    assert info.value.layer == "features.1.conv" and "features.1.conv" in str(info.value)

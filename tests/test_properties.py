"""Properties over random conv configurations and random small networks (hypothesis), and numerical robustness.

* every block, of any valid shape, on any conv configuration (channels, non-square kernels, stride,
  dilation, int/'same'/'valid' padding, bias) gives the conv's output shape and equals its own dense
  equivalent kernel;
* a lossless plan (full-rank IGCV1, any groups) never changes a network's outputs;
* ``convert`` on a random network keeps its output shape, meets its target, leaves the caller's model
  alone, or refuses with ConfigError — never anything else;
* ONNX export parity holds on random converted networks;
* weight scales from 1e-20 to 1e20, near-singular calibration data and fp16/bf16 models give finite
  weights and the errors of scale 1 / float32.

The example counts below are what CI runs (derandomized: the same examples every run).
``IGC_FUZZ=N`` multiplies them by N and draws fresh random examples (a fuzzing session).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import igc_convert as ic
from igc_convert import factorize as fz
from igc_convert.blocks import BLOCKS, dense_conv_forward
from igc_convert.convert import apply_plan
from igc_convert.errors import ConfigError, DataError
from igc_convert.plan import LayerSpec, igcv2_shapes, igcv3_shapes

FUZZ = int(os.environ.get("IGC_FUZZ", "0") or 0)

#: Hypothesis examples per property in a default run (see docs/reliability.md).
EXAMPLES = {"blocks": 60, "lossless_conv": 40, "lossless_net": 25, "convert": 20, "export": 4}


def examples(name: str) -> settings:
    return settings(max_examples=EXAMPLES[name] * max(FUZZ, 1), deadline=None, derandomize=not FUZZ,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ strategies
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_configs(draw, c_in: int | None = None, max_channels: int = 24, unsupported: bool = False):
    """``(nn.Conv2d kwargs, minimal input (h, w))`` of a random valid conv."""
    c_in = c_in if c_in is not None else draw(st.integers(1, max_channels))
    c_out = draw(st.integers(1, max_channels))
    kh, kw = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["int", "int", "same", "valid"]))
    if mode == "same" and stride != (1, 1):  # PyTorch: padding='same' needs stride 1
        mode = "int"
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2))) if mode == "int" else mode
    kwargs = dict(in_channels=c_in, out_channels=c_out, kernel_size=(kh, kw), stride=stride, padding=padding,
                  dilation=dilation, bias=draw(st.booleans()))
    if unsupported and draw(st.integers(0, 5)) == 0:  # now and then a layer convert must keep dense
        common = [g for g in _divisors(c_in) if g > 1 and c_out % g == 0]
        if common:
            kwargs["groups"] = draw(st.sampled_from(common))
    if mode != "valid" and draw(st.integers(0, 3)) == 0:  # the border reflected, replicated or wrapped
        kwargs["padding_mode"] = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    span = tuple(dilation[i] * ((kh, kw)[i] - 1) for i in range(2))
    # per side, the largest pad: the declared one, or the larger half of 'same''s total
    pad = (0, 0) if mode == "valid" else padding if mode == "int" else tuple(s - s // 2 for s in span)
    need = tuple(max(1, span[i] + 1 - 2 * pad[i] if mode != "same" else 1,
                     # reflect takes pad < size, circular pad <= size
                     pad[i] + 1 if kwargs.get("padding_mode") == "reflect" else
                     pad[i] if kwargs.get("padding_mode") == "circular" else 1) for i in range(2))
    return kwargs, need


def _seeded_conv(kwargs: dict, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kwargs)
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_()  # a visible bias: a dropped or doubled one must show
    return conv.eval()


def _output_hw(hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "same":
        return hw
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    return tuple((hw[i] + 2 * pad[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
                 for i in range(2))


@st.composite
def networks(draw, max_layers: int = 3, unsupported: bool = True):
    """``(model, input)``: 1..max_layers random convs chained, each followed by ReLU, BN+ReLU or nothing."""
    c = draw(st.integers(1, 6))
    h, w = draw(st.integers(5, 14)), draw(st.integers(5, 14))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    hw = (h, w)
    for _ in range(draw(st.integers(1, max_layers))):
        kwargs, need = draw(conv_configs(c_in=c, max_channels=16, unsupported=unsupported))
        assume(hw[0] >= need[0] and hw[1] >= need[1])
        conv = _seeded_conv(kwargs, draw(st.integers(0, 2**16)))
        hw = _output_hw(hw, conv)
        assume(min(hw) >= 1)
        layers.append(conv)
        after = draw(st.sampled_from(["relu", "bn", "none"]))
        if after == "bn":
            bn = nn.BatchNorm2d(conv.out_channels)
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
            layers += [bn, nn.ReLU()]
        elif after == "relu":
            layers.append(nn.ReLU())
        c = conv.out_channels
    x = torch.randn(2, layers[0].in_channels, h, w, generator=torch.Generator().manual_seed(seed))
    return nn.Sequential(*layers).eval(), x


def _full_rank_plan(model: nn.Module, draw) -> list[dict]:
    """Full-rank IGCV1 (lossless) with random groups for every conv a block can replace."""
    plan = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            L = draw(st.sampled_from(_divisors(m.in_channels)))
            M = draw(st.sampled_from(_divisors(m.out_channels)))
            rank = min(m.out_channels // M, m.in_channels // L * m.kernel_size[0] * m.kernel_size[1])
            plan.append(dict(name=name, block="igcv1", shape=dict(primary_groups=L, secondary_groups=M, rank=rank)))
    return plan


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal up to float32 round-off relative to the output's scale (outputs near 0 included)."""
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ blocks
@examples("blocks")
@given(config=conv_configs(), data=st.data())
def test_every_block_keeps_the_conv_output_shape_and_equals_its_dense_kernel(config, data):
    kwargs, need = config
    conv = _seeded_conv(kwargs, data.draw(st.integers(0, 2**16), label="seed"))
    hw = (need[0] + data.draw(st.integers(0, 4), label="dh"), need[1] + data.draw(st.integers(0, 4), label="dw"))
    x = torch.randn(2, conv.in_channels, *hw)
    spec = LayerSpec("conv", conv.weight.detach().double(), conv.bias is not None, conv.stride, conv.padding,
                     conv.dilation, hw)
    shapes = {"igcv2": igcv2_shapes(spec), "igcv3": igcv3_shapes(spec)}
    kind = data.draw(st.sampled_from(["igcv1"] + [k for k, v in shapes.items() if v]), label="kind")
    if kind == "igcv1":
        L = data.draw(st.sampled_from(_divisors(conv.in_channels)), label="L")
        M = data.draw(st.sampled_from(_divisors(conv.out_channels)), label="M")
        rmax = min(conv.out_channels // M, conv.in_channels // L * conv.kernel_size[0] * conv.kernel_size[1])
        shape = dict(primary_groups=L, secondary_groups=M, rank=data.draw(st.integers(1, rmax), label="rank"))
    else:
        shape = data.draw(st.sampled_from(shapes[kind]), label="shape")
    # IGCV1 is fitted (closed form); IGCV2/3 keep their random init: the identities hold for any weights.
    block = BLOCKS[kind].from_conv(conv, fit=kind == "igcv1", **shape)
    with torch.no_grad():
        y, ref = block(x), conv(x)
        assert y.shape == ref.shape
        assert block.output_hw(hw) == tuple(ref.shape[-2:])
        _close(y, dense_conv_forward(block, x))
        if kind == "igcv1" and shape["rank"] == rmax:
            _close(y, ref)  # full rank is exact for any groups


@examples("lossless_conv")
@given(config=conv_configs(max_channels=16), data=st.data())
def test_full_rank_igcv1_plan_reproduces_any_conv(config, data):
    kwargs, need = config
    net = nn.Sequential(_seeded_conv(kwargs, data.draw(st.integers(0, 2**16), label="seed")))
    x = torch.randn(3, net[0].in_channels, need[0] + 2, need[1] + 1)
    before = _state(net)
    lossless = apply_plan(copy.deepcopy(net), _full_rank_plan(net, data.draw), fit=True)
    with torch.no_grad():
        _close(lossless(x), net(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@examples("lossless_net")
@given(net_x=networks(), data=st.data())
def test_full_rank_igcv1_plan_reproduces_any_network(net_x, data):
    net, x = net_x
    plan = _full_rank_plan(net, data.draw)
    lossless = apply_plan(copy.deepcopy(net), plan, fit=True)
    assert sum(isinstance(m, ic.IGCBlock) for m in lossless.modules()) == len(plan)
    with torch.no_grad():
        _close(lossless(x), net(x))


# ------------------------------------------------------------------------------------------ convert
@st.composite
def targets(draw):
    kind = draw(st.sampled_from(["params", "params", "macs", "error"]))
    if kind == "error":
        return ic.MaxError(draw(st.floats(0.05, 0.95)))
    ratio = draw(st.floats(0.15, 1.0))
    return ic.ParamsRatio(ratio) if kind == "params" else ic.MacsRatio(ratio)


@examples("convert")
@given(net_x=networks(), target=targets(), block=st.sampled_from(["igcv1", "igcv1", "igcv2", "igcv3"]),
       calibrate=st.booleans())
def test_convert_keeps_shapes_meets_its_target_or_refuses_cleanly(net_x, target, block, calibrate):
    net, x = net_x
    before = _state(net)
    try:
        result = ic.convert(net, target, block=block, example_inputs=x[:1], calibration=x if calibrate else None,
                            progress=False, plan_iters=3, fit_iters=10, max_positions=16)
    except ConfigError as err:
        assert "not reachable" in str(err), err  # the one refusal a valid network and target may get
        result = None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "the caller's model changed"
    assume(result is not None)
    with torch.no_grad():
        y, ref = result.model(x), net(x)
    assert y.shape == ref.shape and bool(torch.isfinite(y).all())
    totals = result.report.totals()
    if isinstance(target, ic.ParamsRatio):
        assert totals["params_ratio"] <= target.ratio + 1e-9
    elif isinstance(target, ic.MacsRatio):
        assert totals["macs_ratio"] <= target.ratio + 1e-9
    for entry in result.plan:
        assert isinstance(result.model.get_submodule(entry["name"]), ic.IGCBlock)
    # The plan rebuilds the structure: the converted state dict loads into it strictly.
    rebuilt = apply_plan(copy.deepcopy(net), result.plan)
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)


@examples("export")
@given(net_x=networks(max_layers=2, unsupported=False), ratio=st.floats(0.2, 0.9))
def test_export_parity_holds_on_random_converted_networks(net_x, ratio):
    from igc_convert.export import export_onnx

    net, x = net_x
    try:
        model = ic.convert(net, ic.ParamsRatio(ratio), example_inputs=x[:1], progress=False).model
    except ConfigError:
        model = net  # nothing convertible: the original network must export as well
    with tempfile.TemporaryDirectory() as folder:
        result = export_onnx(model, Path(folder) / "m.onnx", x)  # raises ExportError beyond rtol 1e-4
        assert result.rel_diff <= 1e-4 and result.path.stat().st_size > 0


# ------------------------------------------------------------------------------------------ numerics
SCALES = [1e-20, 1e-10, 1e10, 1e20]
X = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def _homogeneous() -> nn.Sequential:
    """No bias, no BatchNorm: scaling a conv's weight scales everything after it, nothing else."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, bias=False)).eval()


def _run(model: nn.Module, **kwargs) -> tuple[ic.ConversionResult, float, list[float | None]]:
    result = ic.convert(model, ic.ParamsRatio(0.4), example_inputs=X[:1], progress=False, **kwargs)
    assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters()), "non-finite converted weights"
    with torch.no_grad():
        y, ref = result.model(X).double(), model(X).double()
    assert bool(torch.isfinite(y).all())
    # Dense layers have neither figure: -1 keeps the lists comparable.
    errors = [r.output_error if r.output_error is not None else r.weight_error if r.weight_error is not None
              else -1.0 for r in result.records]
    return result, float((y - ref).norm() / ref.norm()), errors


def _scaled(layer: int, scale: float) -> nn.Sequential:
    model = _homogeneous()
    with torch.no_grad():
        model[layer].weight.mul_(scale)
    return model


MODES = {"weight-space": {}, "data-aware": dict(calibration=X, sequential=False),
         "sequential": dict(calibration=X)}


@pytest.mark.parametrize("mode", MODES, ids=MODES)
@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:g}" for s in SCALES])
def test_activation_scale_changes_nothing(scale, mode):
    """The first conv's weights scaled: every later activation is scaled by the same factor; float32
    moments of 1e20-sized activations used to overflow (DataError) and 1e-20-sized ones to vanish."""
    base, base_err, base_layers = _run(_homogeneous(), **MODES[mode])
    result, err, layers = _run(_scaled(0, scale), **MODES[mode])
    assert result.plan == base.plan
    assert err == pytest.approx(base_err, rel=1e-3)
    assert layers == pytest.approx(base_layers, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("mode", MODES, ids=MODES)
@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:g}" for s in SCALES])
def test_kernel_scale_changes_nothing_for_closed_form_fits(scale, mode):
    """The last conv's kernel scaled (its outputs up to 1e20 x): closed-form fits (L = M = 1) are exact
    functions of the normalised problem."""
    base, base_err, base_layers = _run(_homogeneous(), max_groups=1, **MODES[mode])
    result, err, layers = _run(_scaled(4, scale), max_groups=1, **MODES[mode])
    assert result.plan == base.plan
    assert err == pytest.approx(base_err, rel=1e-3)
    assert layers == pytest.approx(base_layers, rel=1e-3, abs=1e-9)


def test_refined_fit_does_not_depend_on_the_kernel_scale():
    torch.manual_seed(0)
    w = torch.randn(32, 32, 3, 3, dtype=torch.float64)
    a = torch.randn(400, 288, dtype=torch.float64)
    sigma = a.T @ a / 400 + 0.5  # correlated inputs: the cross-partition refinement has work to do
    base = fz.fit_igcv1(w, 2, 2, 4, sigma=sigma).error
    errors = [fz.fit_igcv1(w * s, 2, 2, 4, sigma=sigma).error for s in (1e-10, 1e10)]
    assert errors == pytest.approx([base, base], rel=1e-6)


def test_float32_overflow_in_the_forward_is_a_clear_data_error():
    model = _scaled(0, 1e36)  # activations overflow float32 in the forward itself: nothing to fit
    with pytest.raises(DataError, match="not finite"):
        ic.convert(model, ic.ParamsRatio(0.4), example_inputs=X[:1], calibration=X * 1e5, progress=False)


NEAR_SINGULAR = {
    "all-zero": torch.zeros(8, 3, 10, 10),
    "constant": torch.ones(8, 3, 10, 10),
    "one-image": X[:1],
    "rank-one": X[:1] * torch.linspace(-1, 1, 8).view(8, 1, 1, 1),
    "one-channel-only": torch.cat([X[:8, :1], torch.zeros(8, 2, 10, 10)], 1),
    "tiny": X[:8] * 1e-30,
}


@pytest.mark.parametrize("calibration", NEAR_SINGULAR.values(), ids=NEAR_SINGULAR.keys())
@pytest.mark.parametrize("sequential", [False, True], ids=["one-shot", "sequential"])
def test_near_singular_calibration_gives_finite_bounded_fits(calibration, sequential):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    result, err, layers = _run(model, calibration=calibration, sequential=sequential)
    assert result.plan and math.isfinite(err)
    assert all(e == -1.0 or (math.isfinite(e) and 0 <= e <= 1.5) for e in layers), layers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("calibrate", [False, True], ids=["weight-space", "data-aware"])
def test_half_precision_models_convert_in_float64_and_keep_their_dtype(dtype, calibrate):
    """convert() fits in float64 and casts the factors back: the block has the model's dtype and the
    converted model's error is the float32 conversion's, up to half-precision round-off."""
    def model(d):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(32, 10)).eval().to(d)

    kwargs = dict(progress=False, calibration=X.to(dtype) if calibrate else None)
    half, full = model(dtype), model(torch.float32)
    result = ic.convert(half, ic.ParamsRatio(0.4), example_inputs=X[:1].to(dtype), **kwargs)
    reference = ic.convert(full, ic.ParamsRatio(0.4), example_inputs=X[:1],
                           **{**kwargs, "calibration": X if calibrate else None})
    assert result.plan == reference.plan
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    with torch.no_grad():
        y, y0 = result.model(X.to(dtype)).double(), half(X.to(dtype)).double()
        r, r0 = reference.model(X).double(), full(X).double()
    assert bool(torch.isfinite(y).all())
    assert float((y - y0).norm() / y0.norm()) == pytest.approx(float((r - r0).norm() / r0.norm()), abs=0.03)


def test_plan_and_conv_output_hw_agree_with_pytorch():
    """The output-size arithmetic the planner and the blocks use (MACs) matches PyTorch on odd cases."""
    from igc_convert.blocks import conv_output_hw

    for kwargs in (dict(kernel_size=(5, 2), stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
                   dict(kernel_size=(2, 3), padding="same", dilation=(2, 1)), dict(kernel_size=3, padding="valid")):
        conv = nn.Conv2d(2, 2, **kwargs)
        y = conv(torch.zeros(1, 2, 9, 7))
        assert conv_output_hw((9, 7), conv.kernel_size, conv.stride, conv.padding, conv.dilation) == y.shape[-2:]
        assert F.conv2d(torch.zeros(1, 2, 9, 7), conv.weight, None, conv.stride, conv.padding,
                        conv.dilation).shape == y.shape

"""Calibration statistics: hooks reproduce brute-force im2col moments; paired stats and the sequential target."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import igc_convert as ic
from igc_convert import calibrate as cal
from igc_convert import factorize as fz
from igc_convert.errors import ConfigError, DataError

CONVS = {
    "k3-p1": dict(kernel_size=3, padding=1),
    "k3x1-s2-p(1,0)": dict(kernel_size=(3, 1), stride=2, padding=(1, 0)),
    "k1x5-dil(1,2)-p(0,3)": dict(kernel_size=(1, 5), dilation=(1, 2), padding=(0, 3)),
    "k3-s(2,1)-dil(2,1)-p2": dict(kernel_size=3, stride=(2, 1), dilation=(2, 1), padding=2),
    "same-k3-dil2": dict(kernel_size=3, dilation=2, padding="same"),
    "same-even-k(2,4)-dil(1,2)": dict(kernel_size=(2, 4), dilation=(1, 2), padding="same"),
    "valid-k2": dict(kernel_size=2, padding="valid"),
    "reflect-k3-p1": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular-k(3,2)-p1": dict(kernel_size=(3, 2), padding=1, padding_mode="circular"),
}


def _brute_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """All im2col patches (rows), by F.unfold after the padding nn.Conv2d itself applies."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.double(), conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, n, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _brute_sigma(conv, inputs):
    p = torch.cat([_brute_patches(conv, x) for x in inputs])
    return p.T @ p / p.shape[0]


def _net(conv_kwargs, c_in=2, c_mid=20):
    # c_mid >= C_in·kh·kw: the first conv's W has full column rank, so W Σ Wᵀ determines Σ.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c_in, c_mid, **conv_kwargs), nn.ReLU(), nn.Conv2d(c_mid, 3, 3, padding=1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kwargs", CONVS.values(), ids=CONVS.keys())
def test_hook_moments_equal_brute_force_unfold(kwargs):
    """Σ, the mean and the covariance of every layer's patches, against ``F.unfold`` on all positions."""
    net = _net(kwargs)
    batches = [torch.randn(2, 2, 11, 9) + 0.5, torch.randn(3, 2, 11, 9)]
    moments = cal.collect_input_moments(net, ["0", "2"], batches, max_positions=10_000, progress=False)
    stats = cal.collect_input_stats(net, ["0", "2"], batches, max_positions=10_000, progress=False)
    with torch.no_grad():
        mids = [net[1](net[0](x)) for x in batches]
    for name, inputs in (("0", batches), ("2", mids)):
        p = torch.cat([_brute_patches(net.get_submodule(name), x) for x in inputs])
        m = moments[name]
        expected = p.T @ p / p.shape[0]
        assert m.sigma.dtype == m.mean.dtype == torch.float64 and m.count == p.shape[0]
        torch.testing.assert_close(m.sigma, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert torch.equal(stats[name], m.sigma)
        torch.testing.assert_close(m.mean, p.mean(0), rtol=1e-5, atol=1e-6)
        centred = p - p.mean(0)
        cov = centred.T @ centred / p.shape[0]
        torch.testing.assert_close(m.covariance(), cov, rtol=1e-4, atol=1e-5 * float(cov.abs().max()))
        assert torch.equal(m.covariance(), m.covariance().T)


def test_centred_paired_moments_are_the_moments_of_centred_rows():
    """Every second moment of :class:`PairedStats`, the residual terms and the folds' included."""
    torch.manual_seed(0)
    n, c, rows = 5, 3, 400
    p, pt, e = torch.randn(rows, n, dtype=torch.float64) + 1, torch.randn(rows, n, dtype=torch.float64) - 2, \
        torch.randn(rows, c, dtype=torch.float64) + 0.5

    def stats(sl):
        a, b, d = p[sl], pt[sl], e[sl]
        k = len(a)
        return cal.PairedStats(b.T @ b / k, a.T @ b / k, a.T @ a / k, k, b.mean(0), a.mean(0), d.T @ b / k,
                               d.mean(0), d.T @ a / k, float(d.pow(2).sum() / k))

    whole = stats(slice(None))
    whole = cal.PairedStats(**{**whole.__dict__, "folds": (stats(slice(0, 200)), stats(slice(200, None)))})
    got = whole.centred_moments()
    a, b, d = p - p.mean(0), pt - pt.mean(0), e - e.mean(0)
    torch.testing.assert_close(got.sigma_actual, b.T @ b / rows)
    torch.testing.assert_close(got.cross, a.T @ b / rows)
    torch.testing.assert_close(got.sigma_original, a.T @ a / rows)
    torch.testing.assert_close(got.merge_cross, d.T @ b / rows)
    torch.testing.assert_close(got.merge_original, d.T @ a / rows)
    assert got.merge_energy == pytest.approx(float(d.pow(2).sum() / rows))
    torch.testing.assert_close(got.mean_actual, whole.mean_actual)  # the shift still needs the means
    half = pt[:200] - pt[:200].mean(0)
    torch.testing.assert_close(got.folds[0].sigma_actual, half.T @ half / 200)
    assert got.centred and all(f.centred for f in got.folds) and got.centred_moments() is got
    no_means = cal.PairedStats(whole.sigma_actual, whole.cross, whole.sigma_original, rows)
    assert no_means.centred_moments() is no_means  # nothing to centre with


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kwargs", CONVS.values(), ids=CONVS.keys())
def test_sigma_predicts_conv_output_moments(kwargs):
    """Independent of any padding rule: E[(y−b)(y−b)ᵀ] over all output positions equals W Σ Wᵀ."""
    net = _net(kwargs).double()
    conv = net[0]
    batches = [torch.randn(4, 2, 10, 12, dtype=torch.float64)]
    sigma = cal.collect_input_stats(net, ["0"], batches, max_positions=10_000, progress=False)["0"]
    with torch.no_grad():
        y = (conv(batches[0]) - conv.bias[:, None, None]).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    torch.testing.assert_close(w @ sigma @ w.T, y.T @ y / y.shape[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("block", [7, None], ids=["blocks-of-7", "real-1080-long-patches"])
def test_blocked_gram_for_long_patches(block, monkeypatch):
    """Long patches sum only the upper block triangle of pᵀp; the mirrored result must be the full one."""
    if block is not None:
        monkeypatch.setattr(cal, "_GRAM_BLOCK", block)  # 2·7 < 18 = patch length: blocks of 7, 7, 4
        conv, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(3, 2, 6, 5)
    else:
        conv, x = nn.Conv2d(120, 2, 3), torch.randn(2, 120, 5, 5)  # n = 1080 > 2·_GRAM_BLOCK (256)
    net = nn.Sequential(conv)
    sigma = cal.collect_input_stats(net, ["0"], [x], max_positions=1000, progress=False)["0"]
    expected = _brute_sigma(conv, [x])
    torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    st = cal.collect_paired_stats(net, net, "0", [x], max_positions=1000, progress=False)
    for m in (st.sigma_actual, st.sigma_original, st.cross):
        torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_subsampled_sigma_is_close_and_seeded():
    net = _net(CONVS["k3-p1"], c_in=3, c_mid=8)
    torch.manual_seed(1)
    batches = [torch.randn(64, 3, 16, 16) + 1.0 for _ in range(3)]
    full = cal.collect_input_stats(net, ["0", "2"], batches, max_positions=10_000, progress=False)
    sub = cal.collect_input_stats(net, ["0", "2"], batches, max_positions=24, seed=3, progress=False)
    again = cal.collect_input_stats(net, ["2", "0"], batches, max_positions=24, seed=3, progress=False)
    other = cal.collect_input_stats(net, ["0", "2"], batches, max_positions=24, seed=4, progress=False)
    for name in ("0", "2"):
        rel = float((sub[name] - full[name]).norm() / full[name].norm())
        assert 0 < rel < 0.05, (name, rel)
        assert torch.equal(sub[name], again[name])  # seeded per layer: order of layers does not matter
        assert not torch.equal(sub[name], other[name])


@pytest.mark.parametrize("exponent", [70, -70], ids=["2^70", "2^-70"])
def test_statistics_do_not_depend_on_the_scale_of_the_activations(exponent):
    # Products of activations near 1e21 (or 1e-21) overflow (underflow) float32; the matmuls run on
    # rows scaled by a power of two and the float64 sums take the scale back, exactly.
    net = _net(CONVS["k3-p1"], c_in=3, c_mid=8)
    torch.manual_seed(2)
    batches = [torch.randn(4, 3, 6, 6) + 0.5 for _ in range(2)]
    big = [x * 2.0 ** exponent for x in batches]
    ref = cal.collect_input_moments(net, ["0"], batches, progress=False)["0"]
    got = cal.collect_input_moments(net, ["0"], big, progress=False)["0"]
    torch.testing.assert_close(got.sigma * 2.0 ** (-2 * exponent), ref.sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.mean * 2.0 ** -exponent, ref.mean, rtol=1e-6, atol=0)
    paired = cal.collect_paired_stats(net, net, "0", big, progress=False)
    for m in (paired.sigma_actual, paired.cross, paired.sigma_original):
        torch.testing.assert_close(m * 2.0 ** (-2 * exponent), ref.sigma, rtol=1e-6, atol=0)


def test_a_large_batch_runs_in_several_forwards_with_the_same_statistics(monkeypatch):
    net = _net(CONVS["k3-p1"], c_in=3, c_mid=8)
    torch.manual_seed(3)
    batches = [torch.randn(10, 3, 6, 6), torch.randn(3, 3, 6, 6)]
    sizes = []
    net.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    whole = cal.collect_input_moments(net, ["0", "2"], batches, max_positions=36, progress=False)
    monkeypatch.setattr(cal, "_FORWARD_ELEMENTS", 4 * 3 * 6 * 6)  # four images per forward
    sizes.clear()
    parts = cal.collect_input_moments(net, ["0", "2"], batches, max_positions=36, progress=False)
    assert sizes == [1, 4, 4, 2, 3]  # the layout probe (one image), then batch 0 in three parts, batch 1
    for name in ("0", "2"):
        torch.testing.assert_close(parts[name].sigma, whole[name].sigma, rtol=1e-5, atol=1e-6)  # float32 products
        torch.testing.assert_close(parts[name].sigma, _brute_sigma(net[int(name)], [b if name == "0" else
                                   net[1](net[0](b)) for b in batches]), rtol=1e-5, atol=1e-7)
        assert parts[name].count == whole[name].count == 13 * 36


def test_memory_budget_groups_give_the_same_result(caplog):
    net = _net(CONVS["k3-p1"], c_in=3, c_mid=8)
    batches = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    one = cal.collect_input_stats(net, ["0", "2"], batches, max_positions=20, progress=False)
    budget = 72 * 72 * 8  # layer "2" (72×72) alone fills it: two passes
    with caplog.at_level(logging.INFO, logger="igc_convert.calibrate"):
        two = cal.collect_input_stats(net, ["0", "2"], batches, max_positions=20, memory_budget=budget,
                                      progress=False)
    assert "2 passes" in caplog.text
    calls = []

    def fresh():
        calls.append(1)
        return iter(batches)

    three = cal.collect_input_stats(net, ["0", "2"], fresh, max_positions=20, memory_budget=budget, progress=False)
    assert len(calls) == 2
    for name in ("0", "2"):
        assert torch.equal(one[name], two[name]) and torch.equal(one[name], three[name])
    with pytest.raises(DataError, match="one-shot iterator"):
        cal.collect_input_stats(net, ["0", "2"], iter(batches), memory_budget=budget, progress=False)
    # A one-shot iterator is fine when one pass suffices.
    gen = cal.collect_input_stats(net, ["0", "2"], (x for x in batches), max_positions=20, progress=False)
    assert torch.equal(gen["2"], one["2"])


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_shared_conv_accumulates_every_call():
    torch.manual_seed(0)
    net = _Shared()
    x = torch.randn(2, 3, 7, 7)
    sigma = cal.collect_input_stats(net, ["conv"], [x], max_positions=1000, progress=False)["conv"]
    with torch.no_grad():
        second = torch.relu(net.conv(x))
    expected = _brute_sigma(net.conv, [x, second])
    torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(sigma, _brute_sigma(net.conv, [x]), rtol=1e-2)


class _FlatView(nn.Module):
    """Reshapes with ``.view``, which rejects channels-last strides."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        y = self.conv0(x)
        return self.conv1(y.view(len(y), -1).view(y.shape))


@pytest.mark.parametrize("make,channels_last", [(lambda: _net(CONVS["k3-p1"], c_in=3), True), (_FlatView, False)],
                         ids=["plain", "view"])
def test_models_run_channels_last_when_they_accept_it_and_as_given_otherwise(make, channels_last):
    torch.manual_seed(0)
    net = make()
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    first = net.get_submodule(names[0])
    batches = [torch.randn(2, 3, 7, 7), torch.randn(3, 3, 7, 7)]
    layouts = []
    spy = first.register_forward_pre_hook(
        lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        stats = cal.collect_input_stats(net, names, batches, max_positions=10_000, progress=False)
        paired = cal.collect_paired_stats(net, copy.deepcopy(net), names[0], batches, max_positions=10_000,
                                          progress=False)
    finally:
        spy.remove()
    assert layouts[-1] is channels_last
    expected = _brute_sigma(first, batches)
    for sigma in (stats[names[0]], paired.sigma_original, paired.sigma_actual):
        torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


class _Foldable(nn.Module):
    """``b0`` only ever normalises ``c0``: it folds. ``shared`` normalises two convs: it must not."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c1, self.c2, self.shared = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        y = torch.relu(self.b0(self.c0(x)))
        return self.c3(torch.relu(self.shared(self.c1(y)) + self.shared(self.c2(y))))


def test_batchnorms_that_only_follow_one_conv_are_folded_for_the_statistics_pass():
    torch.manual_seed(0)
    net = _Foldable().eval()
    for bn in (net.b0, net.shared):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    before = copy.deepcopy(net.state_dict())
    calls = {"b0": 0, "shared": 0}
    for name in calls:
        getattr(net, name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    x = [torch.randn(2, 3, 7, 7), torch.randn(3, 3, 7, 7)]
    stats = cal.collect_input_stats(net, ["c1", "c2", "c3"], x, max_positions=10_000, progress=False)
    assert calls["b0"] == 0 and calls["shared"] >= 2 * len(x)  # b0 ran inside c0; shared ran as itself
    with torch.no_grad():  # the original model's own activations, unfolded
        ys = [torch.relu(net.b0(net.c0(xi))) for xi in x]
        zs = [torch.relu(net.shared(net.c1(y)) + net.shared(net.c2(y))) for y in ys]
    for name, inputs in (("c1", ys), ("c2", ys), ("c3", zs)):
        expected = _brute_sigma(getattr(net, name), inputs)
        torch.testing.assert_close(stats[name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert isinstance(net.b0, nn.BatchNorm2d) and isinstance(net.c0, nn.Conv2d) and net.training is False
    for key, value in net.state_dict().items():  # the user's model is left as it was
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------------------ paired
def test_paired_identical_models_give_equal_moments_and_target_is_w():
    net = _net(CONVS["k3-p1"], c_in=3, c_mid=8)
    batches = [torch.randn(5, 3, 9, 9) for _ in range(2)]
    st = cal.collect_paired_stats(net, copy.deepcopy(net), "2", batches, max_positions=30, progress=False)
    assert st.count == 2 * 5 * 30
    torch.testing.assert_close(st.cross, st.sigma_actual, rtol=1e-12, atol=0)
    torch.testing.assert_close(st.sigma_original, st.sigma_actual, rtol=1e-12, atol=0)
    # Same seed, same positions as the one-model collector.
    ref = cal.collect_input_stats(net, ["2"], batches, max_positions=30, progress=False)["2"]
    torch.testing.assert_close(st.sigma_original, ref, rtol=1e-12, atol=1e-14)
    w = net[2].weight
    target, sigma = cal.sequential_target(w, st, damping=1e-10)
    assert target.shape == w.shape and sigma is not None
    torch.testing.assert_close(target, w.double(), rtol=0, atol=1e-6)
    same = cal.collect_paired_stats(net, net, "2", batches, max_positions=30, progress=False)  # one object
    torch.testing.assert_close(same.cross, st.cross, rtol=1e-12, atol=0)


def test_sequential_target_inverts_an_exact_linear_relation():
    """Converted input = B·x (1×1 channel mix) ⇒ p̃ = (B ⊗ I) p, and W' p̃ must reproduce W p."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    mix = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        mix.weight.copy_((torch.eye(3) + 0.4 * torch.randn(3, 3))[:, :, None, None])
    original = nn.Sequential(nn.Identity(), conv)
    converted = nn.Sequential(mix, copy.deepcopy(conv))
    batches = [torch.randn(4, 3, 8, 8)]
    st = cal.collect_paired_stats(original, converted, "1", batches, max_positions=64, progress=False)
    a = torch.kron(mix.weight[:, :, 0, 0].double(), torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(st.cross, st.sigma_original @ a.T, rtol=1e-5, atol=1e-6)
    target, _ = cal.sequential_target(conv.weight, st, damping=1e-10)
    x = batches[0].double()
    with torch.no_grad():
        want = F.conv2d(x, conv.weight.double(), padding=1)
        got = F.conv2d(F.conv2d(x, mix.weight.double()), target, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The fits then take (W', Σ̃): a full-rank IGCV1 fit reproduces W' and hence the original output.
    fit = fz.fit_igcv1(target, 1, 1, 6, sigma=st.sigma_actual)
    assert fit.error < 1e-6


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("the forward should have stopped at the captured layer")


def test_paired_stops_forward_and_accepts_any_module_at_the_name():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), _Boom())
    converted = copy.deepcopy(original)
    with torch.no_grad():
        converted[0].weight.mul_(1.5)
    converted[2] = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 3))  # e.g. a block: input is what counts
    st = cal.collect_paired_stats(original, converted, "2", [torch.randn(2, 3, 8, 8)], progress=False)
    assert st.sigma_actual.shape == (36, 36)
    assert not torch.allclose(st.sigma_actual, st.sigma_original)
    assert torch.isfinite(st.cross).all()


@pytest.mark.parametrize("case", ["constant-image", "one-position", "zero-input"])
def test_rank_deficient_stats_are_finite(case):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    x = {"constant-image": torch.ones(1, 3, 6, 6), "one-position": torch.randn(1, 3, 6, 6),
         "zero-input": torch.zeros(1, 3, 6, 6)}[case]
    k = 1 if case == "one-position" else 64
    st = cal.collect_paired_stats(net, net, "0", [x], max_positions=k, progress=False)
    assert torch.linalg.matrix_rank(st.sigma_actual) < 27
    target, sigma = cal.sequential_target(net[0].weight, st)
    assert torch.isfinite(target).all() and torch.isfinite(sigma).all()
    if case == "zero-input":  # no signal at all: keep the original kernel
        torch.testing.assert_close(target, net[0].weight.double())
    fit = fz.fit_igcv1(target, 1, 1, 2, sigma=sigma)
    assert all(torch.isfinite(f).all() for f in fit.factors) and fit.error == fit.error
    sigma1 = cal.collect_input_stats(net, ["0"], [x], max_positions=k, progress=False)["0"]
    assert torch.isfinite(sigma1).all()


def test_sequential_target_rejects_mismatched_stats():
    s = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"expected \(18, 18\)"):
        cal.sequential_target(torch.randn(2, 2, 3, 3), cal.PairedStats(s, s, s, 10))


# ------------------------------------------------------------------------------------------ errors
BAD_BATCHES = {
    "empty": ([], "empty"),
    "non-tensor": (["image.png"], "str"),
    "rank-3": ([torch.randn(3, 8, 8)], r"\(3, 8, 8\).*batch dimension"),
    "int-dtype": ([torch.ones(1, 3, 8, 8, dtype=torch.int64)], "int64"),
    "wrong-channels": ([torch.randn(2, 5, 8, 8)], r"\(2, 5, 8, 8\)"),
    "nan": ([torch.full((1, 3, 8, 8), float("nan"))], "NaN"),
    "too-small": ([torch.randn(1, 3, 2, 2)], r"\(1, 3, 2, 2\)"),
    "single-tensor": (torch.randn(2, 3, 8, 8), "single tensor"),
}


def _three_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))


def _state(net):
    return [m.training for m in net.modules()], sum(len(m._forward_pre_hooks) + len(m._forward_hooks)
                                                    for m in net.modules())


@pytest.mark.parametrize("batches,match", BAD_BATCHES.values(), ids=BAD_BATCHES.keys())
def test_bad_batches_raise_data_error_and_leave_the_model_as_it_was(batches, match):
    net = _three_layer()
    net.train()
    net[1].eval()  # mixed modes must come back exactly
    before = _state(net)
    with pytest.raises(DataError, match=match):
        cal.collect_input_stats(net, ["0", "3"], batches, progress=False)
    assert _state(net) == before
    with pytest.raises(DataError, match=match):
        cal.collect_paired_stats(net, copy.deepcopy(net), "3", batches, progress=False)
    assert _state(net) == before


def test_forward_error_outside_hooked_layers_is_data_error_with_shape():
    net = _three_layer()
    before = _state(net)
    with pytest.raises(DataError, match=r"shape \(2, 5, 8, 8\)") as info:
        cal.collect_input_stats(net, ["3"], [torch.randn(2, 5, 8, 8)], progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _state(net) == before


@pytest.mark.parametrize("layer,match", [("nope", "nope"), ("1", "BatchNorm2d"), ("0.weight", "0.weight")],
                         ids=["missing", "not-a-conv", "a-parameter"])
def test_bad_layer_names_raise_config_error(layer, match):
    net = _three_layer()
    with pytest.raises(ConfigError, match=match):
        cal.collect_input_stats(net, ["0", layer], [torch.randn(1, 3, 8, 8)], progress=False)
    with pytest.raises(ConfigError, match=match):
        cal.collect_paired_stats(net, net, layer, [torch.randn(1, 3, 8, 8)], progress=False)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.used(x)


def test_unused_conv_and_bad_options_raise_config_error():
    net = _Unused()
    with pytest.raises(ConfigError, match="spare.*never ran"):
        cal.collect_input_stats(net, ["spare"], [torch.randn(1, 3, 8, 8)], progress=False)
    with pytest.raises(ConfigError, match="max_positions"):
        cal.collect_input_stats(net, ["used"], [torch.randn(1, 3, 8, 8)], max_positions=0, progress=False)
    assert _state(net)[1] == 0


def test_success_restores_modes_and_removes_hooks_and_accepts_label_pairs():
    net = _three_layer().train()
    before = _state(net)
    x = torch.randn(2, 3, 8, 8)
    stats = cal.collect_input_stats(net, ["0", "3"], [(x, torch.tensor([0, 1]))], progress=False)
    assert _state(net) == before
    assert set(stats) == {"0", "3"}
    # eval mode was used: BatchNorm running statistics did not move
    assert torch.equal(net[1].running_mean, torch.zeros(4))
    # A DataLoader is re-iterable: fine for several passes, and its (images, labels) pairs are accepted.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.tensor([0, 1])), batch_size=1)
    two_pass = cal.collect_input_stats(net, ["0", "3"], loader, memory_budget=27 * 27 * 8, progress=False)
    torch.testing.assert_close(two_pass["0"], stats["0"], rtol=1e-5, atol=1e-7)  # batch size 1 vs 2: rounding


# ------------------------------------------------------------------------------------------ BatchNorm
class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)                 # followed by relu: no BN
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # output also used by the residual
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # shared, same BN at both calls
        self.conv5, self.bn5a, self.bn5b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        y = self.conv3(x)
        x = self.bn3(y) + y
        x = self.bn4(self.conv4(self.bn4(self.conv4(x))))
        return self.bn5b(self.conv5(self.bn5a(self.conv5(x))))


def test_find_following_batchnorm():
    gm = torch.fx.symbolic_trace(_BNNet())
    assert cal.find_following_batchnorm(gm) == {"conv1": "bn1", "conv4": "bn4"}
    with pytest.raises(ConfigError, match="GraphModule"):
        cal.find_following_batchnorm(_BNNet())


def test_bn_row_weights():
    net = _BNNet()
    torch.manual_seed(0)
    with torch.no_grad():
        net.bn1.weight.copy_(torch.randn(4))
        net.bn1.running_var.copy_(torch.rand(4) + 0.1)
    got = cal.bn_row_weights(net, {"conv1": "bn1"})
    want = net.bn1.weight.double().abs() / torch.sqrt(net.bn1.running_var.double() + net.bn1.eps)
    assert got["conv1"].dtype == torch.float64
    torch.testing.assert_close(got["conv1"], want.detach())
    with pytest.raises(ConfigError, match="ReLU|not a BatchNorm2d"):
        cal.bn_row_weights(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), {"0": "1"})
    with pytest.raises(ConfigError, match="3 features"):
        cal.bn_row_weights(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(3)), {"0": "1"})
    no_stats = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    assert cal.bn_row_weights(no_stats, {"0": "1"}) == {}


def test_sequential_target_identity_holds_for_any_approximation():
    """E‖W p − Ŵ p̃‖² − ‖(W' − Ŵ) R̃‖² is the same constant for every Ŵ (the fit's objective is exact)."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    converted = copy.deepcopy(original)
    with torch.no_grad():
        converted[0].weight.add_(0.3 * torch.randn_like(converted[0].weight))
    x = torch.randn(6, 2, 8, 8)
    st = cal.collect_paired_stats(original, converted, "2", [x], max_positions=10_000, progress=False)
    with torch.no_grad():
        p = _brute_patches(original[2], original[1](original[0](x)))
        pt = _brute_patches(original[2], converted[1](converted[0](x)))
    w = original[2].weight.detach().double().reshape(3, -1)
    target, sigma = cal.sequential_target(original[2].weight, st, damping=1e-10)
    r = torch.linalg.cholesky(sigma + 1e-10 * sigma.diagonal().mean() * torch.eye(36, dtype=torch.float64))
    consts, scale = [], 0.0
    for _ in range(3):
        approx = torch.randn(3, 36, dtype=torch.float64)
        direct = float(((p @ w.T - pt @ approx.T) ** 2).sum(1).mean())
        whitened = float((((target.reshape(3, -1) - approx) @ r) ** 2).sum())
        consts.append(direct - whitened)
        scale = max(scale, direct)
    # float32 products in the statistics: agreement to ~1e-6 of the terms' size
    assert max(consts) - min(consts) < 1e-5 * scale, (consts, scale)
    assert consts[0] >= -1e-9  # the constant is the irreducible error: never negative


# ------------------------------------------------------------------------------------------ resumable
class _Residual(nn.Module):
    """Two branches, a residual add and in-place ops: the values a resumed forward must keep."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        x = x.mul_(2.0)  # a model may change its input in place
        y = torch.relu_(self.bn(self.stem(x)))
        z = self.a(y)
        z += self.b(y)
        return self.head(torch.relu(z))


def _perturbed(conv: nn.Conv2d, seed: int) -> nn.Conv2d:
    new = copy.deepcopy(conv)
    with torch.no_grad():
        new.weight.add_(0.3 * torch.randn(new.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return new


def test_resumed_statistics_equal_rerunning_the_forward_per_layer():
    """Layers swapped in the converted model between requests are what the later layers see."""
    torch.manual_seed(0)
    net = _Residual().eval()
    net.bn.running_mean.uniform_(-1, 1)
    layers = ["stem", "a", "b", "head"]
    batches = [torch.randn(3, 3, 9, 9), torch.randn(2, 3, 9, 9)]
    inputs = [x.clone() for x in batches]
    converted = copy.deepcopy(net)
    resumed = cal.SequentialStats.create(net, converted, layers, batches, max_positions=20, seed=3)
    assert resumed is not None
    for i, name in enumerate(layers):
        got = resumed(name)
        want = cal.collect_paired_stats(net, converted, name, [x.clone() for x in batches], max_positions=20,
                                        seed=3, progress=False)
        assert got.count == want.count
        for key in ("sigma_actual", "cross", "sigma_original", "mean_actual", "mean_original"):
            torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-10, atol=1e-12)
        if i == 0:
            torch.testing.assert_close(got.cross, got.sigma_original, rtol=1e-12, atol=0)
        setattr(converted, name, _perturbed(getattr(net, name), i))  # "fit" it: later layers see a change
    assert not torch.allclose(got.sigma_actual, got.sigma_original, rtol=1e-3)
    assert all(torch.equal(x, y) for x, y in zip(batches, inputs))  # the caller's batches untouched
    with pytest.raises(ConfigError, match="can still give"):
        resumed("a")


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent: not traceable


def test_resumed_statistics_keep_large_batches_in_parts_with_the_same_result(monkeypatch):
    torch.manual_seed(1)
    net = _Residual().eval()
    layers = ["stem", "a", "b", "head"]
    batches = [torch.randn(9, 3, 9, 9), torch.randn(4, 3, 9, 9)]
    converted = copy.deepcopy(net)
    converted.a = _perturbed(net.a, 5)
    sizes = []
    converted.bn.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))

    def stats():
        sizes.clear()
        resumed = cal.SequentialStats.create(net, converted, layers, batches, max_positions=100, seed=3)
        return [resumed(name) for name in layers]

    want = stats()
    assert sizes == [9, 4]
    monkeypatch.setattr(cal, "_FORWARD_ELEMENTS", 4 * 3 * 9 * 9)  # four images a part
    got = stats()
    assert sizes == [4, 4, 1, 4]
    for g, w in zip(got, want):
        assert g.count == w.count
        for key in ("sigma_actual", "cross", "sigma_original", "mean_actual", "mean_original"):
            torch.testing.assert_close(getattr(g, key), getattr(w, key), rtol=1e-5, atol=1e-6)


def test_resumable_statistics_decline_what_they_cannot_do(caplog):
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 8, 8)]
    with caplog.at_level(logging.INFO, logger="igc_convert.calibrate"):
        assert cal.SequentialStats.create(_Branchy(), _Branchy(), ["conv"], batches) is None
        assert "cannot trace" in caplog.text
        net = _Residual()
        assert cal.SequentialStats.create(net, copy.deepcopy(net), ["a"], batches, memory_budget=100) is None
        assert "GiB" in caplog.text
        assert cal._available_memory(torch.device("cpu")) > 0  # the default budget: half of it
        shared = _Shared()
        assert cal.SequentialStats.create(shared, copy.deepcopy(shared), ["conv"], batches) is None
    with pytest.raises(ConfigError, match="order"):
        cal.SequentialStats.create(net, copy.deepcopy(net), ["head", "a"], batches)
    resumed = cal.SequentialStats.create(net, copy.deepcopy(net), ["b", "head"], batches)
    resumed("head")
    with pytest.raises(ConfigError, match="order"):
        resumed("b")


# ------------------------------------------------------------------------------------- linear re-fit
def _heads(drift: nn.Module, n=12, k=5, seed=0):
    """On N×16×1×1 images. original: features → Linear (named "2"); converted: the same Linear behind
    ``drift``, a feature layer that differs from the original's."""
    torch.manual_seed(seed)
    feat, head = nn.Linear(16, n), nn.Linear(n, k)
    original = nn.Sequential(nn.Flatten(), feat, head).eval()
    converted = nn.Sequential(nn.Flatten(), drift, copy.deepcopy(head)).eval()
    return original, converted


def _images(n, seed=0):
    return torch.randn(n, 16, 1, 1, generator=torch.Generator().manual_seed(seed))


def test_linear_refit_is_the_least_squares_map_from_drifted_rows_to_original_outputs():
    torch.manual_seed(1)
    drift = nn.Linear(16, 12).double()  # other features: the original outputs are not a function of these rows
    original, converted = _heads(drift)
    original, converted, x = original.double(), converted.double(), _images(300).double()  # float64 statistics
    folds = cal.collect_linear_pairs(original, converted, "2", [x[:100], x[100:]])
    assert [f.count for f in folds] == [150, 150]
    w, b, before, after, delta = cal.linear_refit(original[2].weight, original[2].bias, folds, grid=(1e-12,))
    assert delta == 1e-12 and 0 < after < before
    with torch.no_grad():
        p_t, target = drift(x.flatten(1)).double(), original(x).double()
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([p_t, ones], 1), target).solution  # [Ŵᵀ; b̂ᵀ]
    torch.testing.assert_close(w, sol[:-1].T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b, sol[-1], rtol=1e-8, atol=1e-8)


def test_linear_refit_changes_nothing_without_drift():
    original, _ = _heads(nn.Identity())
    folds = cal.collect_linear_pairs(original, original, "2", [_images(50)])
    w, b, before, after, delta = cal.linear_refit(original[2].weight, original[2].bias, folds)
    torch.testing.assert_close(w, original[2].weight.double())
    torch.testing.assert_close(b, original[2].bias.double())
    assert before == pytest.approx(0, abs=1e-6) and after == pytest.approx(0, abs=1e-6) and delta is None


class _Mask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


def test_linear_refit_keeps_the_original_weights_where_the_rows_never_go():
    """Rows confined to the first 4 of 12 dims: the ridge pulls towards W, so Ŵ v = W v off that span."""
    mask = torch.zeros(12)
    mask[:4] = 1
    original, converted = _heads(nn.Sequential(nn.Linear(16, 12), _Mask(mask)))
    folds = cal.collect_linear_pairs(original, converted, "2", [_images(200)])
    w, _, before, after, delta = cal.linear_refit(original[2].weight, None, folds)
    torch.testing.assert_close(w[:, 4:], original[2].weight.double()[:, 4:], rtol=1e-9, atol=1e-9)
    assert delta is not None and after < before


def test_linear_refit_keeps_the_weights_and_corrects_the_bias_when_no_ridge_wins():
    """No candidate ridge (an empty grid): W is kept and the bias takes the mean output error."""
    torch.manual_seed(5)  # not _heads' seed: other features than the original's
    original, converted = _heads(nn.Linear(16, 12))
    folds = cal.collect_linear_pairs(original, converted, "2", [_images(40)])
    w, b, before, after, delta = cal.linear_refit(original[2].weight, original[2].bias, folds, grid=())
    assert delta is None and after == before > 0
    w64 = original[2].weight.double()
    torch.testing.assert_close(w, w64)
    st = cal.merge_stats(folds)
    torch.testing.assert_close(b, original[2].bias.double() + w64 @ (st.mean_original - st.mean_actual))
    # the same data with the default ridges: a fit predicts held-out rows better, so it is taken
    assert cal.linear_refit(original[2].weight, original[2].bias, folds)[4] is not None


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):  # N×C×H×W -> N×(H·W)×C tokens
        return self.proj(x.flatten(2).transpose(1, 2))


def test_linear_pairs_are_none_for_token_sequences_and_need_linears():
    net = _Tokens().eval()
    assert cal.collect_linear_pairs(net, net, "proj", [torch.randn(2, 4, 3, 3)]) is None
    other = nn.Module()
    other.proj = nn.Conv2d(4, 4, 1)
    with pytest.raises(ConfigError, match="nn.Linear"):
        cal.collect_linear_pairs(net, other, "proj", [torch.randn(2, 4, 3, 3)])
    with pytest.raises(ConfigError, match="folds"):
        cal.collect_linear_pairs(net, net, "proj", [torch.randn(2, 4, 3, 3)], folds=0)


# ------------------------------------------------------------------------------ residual correction
class _Skip(nn.Module):
    """stem → t;  out = bn(conv(t)) + t  (or conv(t) + t without the BatchNorm)."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(8, 6, 1)  # more inputs than outputs: t spans all 6 dimensions
        self.conv = nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6) if bn else None

    def forward(self, x):
        t = self.stem(x)
        u = self.conv(t)
        return (self.bn(u) if self.bn is not None else u) + t


def _skip_pair(bn: bool):
    """The model and a 'converted' copy whose stem output is mixed by M: t̃ = M t."""
    torch.manual_seed(0)
    net = _Skip(bn).double().eval()
    if bn:
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            net.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0, -1.2, 0.9]))
    mix = nn.Conv2d(6, 6, 1, bias=False).double()
    with torch.no_grad():
        mix.weight.copy_((torch.eye(6) + 0.3 * torch.randn(6, 6)).reshape(6, 6, 1, 1))
    converted = copy.deepcopy(net)
    converted.stem = nn.Sequential(converted.stem, mix)
    return net, converted, mix.weight.reshape(6, 6)


@pytest.mark.parametrize("bn", [True, False])
def test_residual_correction_makes_the_sum_match_the_original(bn):
    """With t̃ = M t on both the conv's input and the shortcut, the exact target is
    W M⁻¹ + diag(1/a)(M⁻¹ − I): fitted to it, the converted block's sum equals the original's."""
    net, converted, m = _skip_pair(bn)
    batches = [torch.randn(4, 8, 5, 5, dtype=torch.float64) for _ in range(2)]
    a = (net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)).detach() if bn else torch.ones(6)
    w = net.conv.weight.detach().reshape(6, 6)
    inv = torch.linalg.inv(m.detach())
    stats = cal.SequentialStats.create(net, converted, ["conv"], batches, max_positions=25)("conv")
    target, _ = cal.sequential_target(net.conv.weight, stats, damping=1e-12)
    want = w @ inv + torch.diag(1 / a.double()) @ (inv - torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(target.reshape(6, 6), want, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        assert (converted(batches[0]) - net(batches[0])).abs().max() > 1e-2  # the mixed stem is off...
        converted.conv.weight.copy_(target)
        shift = cal.output_shift(net.conv.weight, target, stats)
        torch.testing.assert_close(shift, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-8)
        x = torch.randn(3, 8, 7, 7, dtype=torch.float64)  # ... the sum is right, on images never seen
        torch.testing.assert_close(converted(x), net(x), rtol=1e-6, atol=1e-8)

    assert len(stats.folds) == 2 and cal.merge_weight(net.conv.weight, stats) == pytest.approx(1.0, abs=1e-6)
    off = cal.SequentialStats.create(net, converted, ["conv"], batches, max_positions=25, residual=False)("conv")
    assert off.merge_cross is None and off.merge_mean is None
    target_off, _ = cal.sequential_target(net.conv.weight, off, damping=1e-12)
    torch.testing.assert_close(target_off.reshape(6, 6), w @ inv, rtol=1e-6, atol=1e-8)  # its own output only


class _Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) + self.gate(x.mean((2, 3), keepdim=True))  # a (N, 4, 1, 1) addend


class _InPlaceShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        t = self.stem(x)
        u = self.conv(t)
        return u + torch.relu_(t)  # the shortcut writes into t: running it ahead would change the forward


class _Shared2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.other = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        u = self.conv(x)
        return u + self.other(x), u  # the conv's output goes elsewhere too


@pytest.mark.parametrize("make", [_Broadcast, _InPlaceShortcut, _Shared2])
def test_residual_correction_is_skipped_where_it_does_not_apply(make):
    """A broadcast addend, a shortcut that changes a value in place, a conv output used twice: the layer
    gets the plain sequential statistics, and the forward is not disturbed."""
    torch.manual_seed(0)
    net = make().eval()
    batches = [torch.randn(2, 3, 6, 6)]
    got = cal.SequentialStats.create(net, copy.deepcopy(net), ["conv"], batches, max_positions=36)("conv")
    want = cal.collect_paired_stats(net, net, "conv", batches, max_positions=36, progress=False)
    assert got.merge_cross is None
    torch.testing.assert_close(got.sigma_actual, want.sigma_actual)


def test_a_zero_initialised_residual_branch_gets_no_correction():
    """γ = 0 everywhere after the conv (``zero_init_residual`` in torchvision, ``zero_init_last`` in
    timm): the conv adds nothing to the sum, so there is nothing to correct, and the statistics stay
    finite (they were 1/0 = inf, and sequential conversion of such models failed)."""
    net, converted, _ = _skip_pair(bn=True)
    with torch.no_grad():
        net.bn.weight.zero_()
        converted.bn.weight.zero_()
    batches = [torch.randn(4, 8, 5, 5, dtype=torch.float64) for _ in range(2)]
    got = cal.SequentialStats.create(net, converted, ["conv"], batches, max_positions=25)("conv")
    plain = cal.SequentialStats.create(net, converted, ["conv"], batches, max_positions=25, residual=False)("conv")
    assert got.merge_cross is None and got.folds == ()
    torch.testing.assert_close(got.sigma_actual, plain.sigma_actual)


def test_sequential_conversion_of_a_zero_init_residual_resnet():
    """torchvision's ResNet with ``zero_init_residual=True``: every block's last BatchNorm has γ = 0."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).eval()
    calib = torch.randn(8, 3, 32, 32)
    result = ic.convert(net, ic.ParamsRatio(0.95), calibration=calib, include=["layer1.*", "layer2.*"], progress=False)
    assert result.report.totals()["converted"] > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, want = result.model(x), net(x)
    assert torch.isfinite(out).all()
    assert (out - want).norm() < 0.5 * want.norm()


def test_residual_statistics_see_the_shortcut_as_converted_so_far():
    """The other addend runs ahead in both models: a shortcut conv after the layer is taken as it is now."""
    torch.manual_seed(0)
    net = _Residual().eval()  # z = a(y); z += b(y): for "a" the other addend b(y) comes later in the graph
    batches = [torch.randn(3, 3, 9, 9)]
    converted = copy.deepcopy(net)
    converted.b = _perturbed(net.b, 5)
    stats = cal.SequentialStats.create(net, converted, ["a", "b"], batches, max_positions=81)("a")
    with torch.no_grad():
        y = torch.relu(net.bn(net.stem(batches[0].clone() * 2)))
        e = (net.b(y) - converted.b(y)).permute(0, 2, 3, 1).reshape(-1, 8).double()
        p = F.unfold(F.pad(y, (1, 1, 1, 1)), 3).transpose(1, 2).reshape(-1, 72).double()
    # Both sides accumulate in float64 what float32 convs computed, in whatever order this CPU's
    # kernels take: float32 round-off, not float64's.
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.merge_mean, e.mean(0), **tol)
    torch.testing.assert_close(stats.merge_cross, e.T @ p / len(p), **tol)
    torch.testing.assert_close(stats.merge_energy, float(e.pow(2).sum(1).mean()), **tol)


def _merges(model: nn.Module) -> list[str]:
    gm = torch.fx.GraphModule(model, cal.BatchNormLeafTracer().trace(model))
    nodes, modules = list(gm.graph.nodes), dict(model.named_modules())
    order = {n: i for i, n in enumerate(nodes)}
    return [str(n.target) for i, n in enumerate(nodes)
            if n.op == "call_module" and isinstance(modules[str(n.target)], nn.Conv2d)
            and cal._find_merge(nodes, i, modules, order) is not None]


def test_residual_additions_are_found_in_torchvision_and_timm_blocks():
    """Every residual block's last conv (and each downsampling shortcut conv) of the model zoos we
    target: torchvision's ResNets and MobileNetV2, timm's EfficientNet-Lite0 (BatchNormAct2d)."""
    torchvision = pytest.importorskip("torchvision")
    found = _merges(torchvision.models.resnet18())
    assert len(found) == 11 and "layer1.0.conv2" in found and "layer2.0.downsample.0" in found
    assert "layer1.0.conv1" not in found
    found = _merges(torchvision.models.mobilenet_v2())
    assert len(found) == 10 and "features.3.conv.2" in found
    timm = pytest.importorskip("timm")
    found = _merges(timm.create_model("efficientnet_lite0"))
    assert len(found) == 9 and all(name.endswith("conv_pwl") for name in found)
    from timm.layers import BatchNormAct2d

    assert cal._affine_batchnorm(BatchNormAct2d(4, apply_act=False))
    assert not cal._affine_batchnorm(BatchNormAct2d(4))  # its ReLU is not affine: no correction through it


class _Unrelated(nn.Module):
    """The shortcut reads input channels the branch never sees: its miss cannot be predicted from them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 48, 1)
        self.conv = nn.Conv2d(48, 8, 1)
        self.short = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x[:, :4]))) + self.short(x[:, 4:])


def test_merge_weight_drops_a_residual_term_that_only_fits_noise():
    """48 inputs, 64 patches per fold: the regression of the shortcut's miss on them is pure overfit,
    and cross-validation shrinks it away; the statistics of both folds add up to the whole."""
    torch.manual_seed(0)
    net = _Unrelated().double().eval()
    converted = copy.deepcopy(net)
    converted.short = _perturbed(net.short, 1)
    batches = [torch.randn(4, 8, 4, 4, dtype=torch.float64) for _ in range(2)]
    stats = cal.SequentialStats.create(net, converted, ["conv"], batches, max_positions=16)("conv")
    assert stats.merge_cross is not None and len(stats.folds) == 2
    assert cal.merge_weight(net.conv.weight, stats) < 0.3
    for key in ("sigma_actual", "cross", "merge_cross", "merge_original"):
        whole = sum(getattr(f, key) * f.count for f in stats.folds) / stats.count
        torch.testing.assert_close(getattr(stats, key), whole)
    one = cal.SequentialStats.create(net, converted, ["conv"], batches[:1], max_positions=16)("conv")
    assert one.folds == () and cal.merge_weight(net.conv.weight, one) == 1.0  # one batch: nothing to check with
    plain = cal.SequentialStats.create(net, converted, ["conv"], batches, max_positions=16, residual=False)("conv")
    assert cal.merge_weight(net.conv.weight, plain) == 0.0


def test_moment_arithmetic_makes_the_same_bits_with_fewer_temporaries():
    """The n×n moments of a 3×3 conv are 4608 wide: centring, symmetrising and merging them in place
    must give exactly what the plain formulas give, and keep exact symmetry."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 27, dtype=torch.float64, generator=g) + 0.7
    sym = x.T @ x / 300
    sym = 0.5 * (sym + sym.T)
    mu, nu = x.mean(0), torch.rand(27, dtype=torch.float64, generator=g)
    assert torch.equal(cal._minus_outer(sym, mu, nu), sym - torch.outer(mu, nu))
    centred = cal._minus_outer(sym, mu, mu)
    assert torch.equal(centred, centred.T)
    assert cal._symmetric(sym) is sym
    skew = sym.clone()
    skew[0, 1] += 1.0
    assert torch.equal(cal._symmetric(skew), 0.5 * (skew + skew.T))
    moments = cal.InputMoments(sym, mu, 300)
    assert torch.equal(moments.covariance(), sym - torch.outer(mu, mu))
    parts = [cal.PairedStats(sym * k, sym + k, sym - k, c, mu * k, mu + k) for k, c in ((1, 3), (2, 5), (3, 4))]
    merged = cal.merge_stats(parts)
    for field in ("sigma_actual", "cross", "sigma_original", "mean_actual", "mean_original"):
        want = sum(getattr(p, field) * (p.count / 12) for p in parts)
        assert torch.equal(getattr(merged, field), want), field
    assert merged.count == 12 and merged.merge_cross is None

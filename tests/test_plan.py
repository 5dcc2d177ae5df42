"""The budget allocation: the greedy walk down each layer's lower hull, then the fill of what it leaves."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings, strategies as st

import igc_convert
from igc_convert.errors import ConfigError
from igc_convert.plan import Candidate, allocate, lower_hull


def _layer(points) -> list[Candidate]:
    """Dense at cost 100, plus one IGCV1 candidate per (cost, error)."""
    return [Candidate("dense", {}, 100, macs=100, error=0.0)] + [
        Candidate("igcv1", {"rank": i}, cost, macs=cost, error=err) for i, (cost, err) in enumerate(points)]


def test_the_fill_takes_a_shape_off_the_hull_that_fits_what_the_walk_left():
    """One layer: (10, 0.9) and dense are the hull; (30, 0.8) is not convex (0.64 lies above the segment's
    0.81·(1 − 20/90) = 0.63), so the walk stops at 10 of a budget of 35. The fill takes (30, 0.8)."""
    per_layer = [_layer([(10, 0.9), (30, 0.8)])]
    assert [c.params for c in lower_hull(per_layer[0], "params")] == [10, 100]
    chosen = allocate(per_layer, igc_convert.ParamsRatio(0.35))
    assert [(c.params, c.error) for c in chosen] == [(30, 0.8)]
    walk = allocate(per_layer, igc_convert.ParamsRatio(0.35), fill=False)  # what latency searches plan with
    assert [(c.params, c.error) for c in walk] == [(10, 0.9)]


def test_the_fill_upgrades_the_layer_that_gains_most():
    """Both layers' next hull step (dense, +90) is out of reach; of the off-hull upgrades that fit the 30
    left, layer 1's lowers the squared error most (0.81 → 0.5625 against 0.81 → 0.64)."""
    per_layer = [_layer([(10, 0.9), (30, 0.8)]), _layer([(10, 0.9), (40, 0.75)])]
    assert all(len(lower_hull(cands, "params")) == 2 for cands in per_layer)
    chosen = allocate(per_layer, igc_convert.ParamsRatio(0.25))  # 50 of 200: 20 spent, 30 left
    assert [c.params for c in chosen] == [10, 40]


@st.composite
def _plans(draw):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        costs = sorted(draw(st.lists(st.integers(1, 99), min_size=1, max_size=6, unique=True)))
        errors = sorted(draw(st.lists(st.floats(0.01, 1.0), min_size=len(costs), max_size=len(costs))),
                        reverse=True)
        layers.append(_layer(zip(costs, errors)))
    return layers, draw(st.floats(0.05, 0.99))


@settings(max_examples=150, deadline=None)
@given(_plans())
# The smallest shapes cost 100 and the budget is 1/3 · 300, which rounds to 99.99999999999999:
# allocate accepts a budget's float rounding (a relative 1e-12), and so must the test.
@example(([_layer([(1, 1.0)]), _layer([(1, 1.0)]), _layer([(98, 1.0)])], 1 / 3))
def test_the_allocation_fits_its_budget_and_no_single_upgrade_that_fits_is_left(case):
    """Whatever the candidates: the plan spends at most the budget, and no layer can move to another of
    its shapes within the budget left and lower the summed squared error (the fill's guarantee; the hull
    walk alone leaves such moves)."""
    per_layer, ratio = case
    budget = ratio * 100 * len(per_layer)
    smallest = sum(min(c.params for c in cands) for cands in per_layer)
    if smallest > budget * (1 + 1e-12):
        with pytest.raises(ConfigError, match="not reachable"):
            allocate(per_layer, igc_convert.ParamsRatio(ratio))
        return
    chosen = allocate(per_layer, igc_convert.ParamsRatio(ratio))
    spent = sum(c.params for c in chosen)
    assert spent <= budget * (1 + 1e-9)
    for cur, cands in zip(chosen, per_layer):
        assert cur in cands
        assert not [c for c in cands if c.error < cur.error and spent - cur.params + c.params <= budget]


@pytest.mark.parametrize("groups, mid", [(1, 12), (2, 16)])
def test_an_igcv3_block_on_a_1x1_kernel_is_an_igcv1_block(groups, mid):
    """Why ``auto`` scores no IGCV3 shape on a 1×1 layer: IGCV1 with ``L = M = g`` and rank
    ``C_int/g²`` fits any such block's kernel exactly, with ``C_int`` fewer parameters."""
    import torch

    from igc_convert.blocks import IGCV1, IGCV3
    from igc_convert.plan import LayerSpec, candidates

    torch.manual_seed(0)
    v3 = IGCV3(32, 24, 1, expand_groups=groups, reduce_groups=groups, mid_channels=mid, bias=False,
               dtype=torch.float64)
    with torch.no_grad():
        for p in v3.parameters():
            p.normal_()
    kernel = v3.dense_weight().detach().double()
    v1 = IGCV1.from_conv(torch.nn.Conv2d(32, 24, 1, bias=False).double(), primary_groups=groups,
                         secondary_groups=groups, rank=mid // groups**2)
    fit = IGCV1.fit(kernel, primary_groups=groups, secondary_groups=groups, rank=mid // groups**2)
    v1.load_factors(fit.factors, None)
    torch.testing.assert_close(v1.dense_weight().detach(), kernel, rtol=1e-9, atol=1e-9)
    assert v1.num_params() == v3.num_params() - mid

    spec = LayerSpec("conv", kernel, False, (1, 1), (0, 0), (1, 1))
    assert {c.kind for c in candidates(spec, ["igcv1", "igcv3"])} == {"dense", "igcv1"}
    assert "igcv3" in {c.kind for c in candidates(spec, ["igcv3"])}  # asked for alone, it is scored
    spec3 = LayerSpec("conv", torch.randn(24, 32, 3, 3, dtype=torch.float64), False, (1, 1), (1, 1), (1, 1))
    assert "igcv3" in {c.kind for c in candidates(spec3, ["igcv1", "igcv3"])}

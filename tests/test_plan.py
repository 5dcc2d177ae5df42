"""The budget allocation: the greedy walk down each layer's lower hull, then the fill of what it leaves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

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
def test_the_allocation_fits_its_budget_and_no_single_upgrade_that_fits_is_left(case):
    """Whatever the candidates: the plan spends at most the budget, and no layer can move to another of
    its shapes within the budget left and lower the summed squared error (the fill's guarantee; the hull
    walk alone leaves such moves)."""
    per_layer, ratio = case
    budget = ratio * 100 * len(per_layer)
    smallest = sum(min(c.params for c in cands) for cands in per_layer)
    if smallest > budget:
        with pytest.raises(ConfigError, match="not reachable"):
            allocate(per_layer, igc_convert.ParamsRatio(ratio))
        return
    chosen = allocate(per_layer, igc_convert.ParamsRatio(ratio))
    spent = sum(c.params for c in chosen)
    assert spent <= budget * (1 + 1e-9)
    for cur, cands in zip(chosen, per_layer):
        assert cur in cands
        assert not [c for c in cands if c.error < cur.error and spent - cur.params + c.params <= budget]

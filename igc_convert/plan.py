"""Choosing block shapes: candidates per layer, and a global budget allocated across layers.

Each convertible conv gets a list of :class:`Candidate` shapes — always including staying dense —
with their parameter count, MACs and (estimated) relative error. A global target is met by a greedy
walk down the lower convex hulls of every layer's (cost, error²) curve, steepest error reduction per
unit of cost first: the classic Lagrangian allocation, which gives cheap-to-approximate layers less
budget and sensitive ones more, instead of one ratio for every layer. Params and MAC targets then
spend what the walk left on shapes off the hulls (:func:`_fill`).

The IGCV1 error curve over all ranks comes from one SVD per (L, M) (Eckart–Young), so IGCV1 plans
cost seconds. IGCV2/IGCV3 have no closed form: their candidates are scored by short fits.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from . import factorize as fz
from .blocks import IGCV1, conv_output_hw
from .errors import ConfigError
from .shuffle import ChannelShuffle

log = logging.getLogger(__name__)

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class ParamsRatio:
    """Total conv parameters at most ``ratio`` × the original's."""

    ratio: float

    def __post_init__(self):
        _check_ratio(self.ratio, "params ratio")


@dataclass(frozen=True)
class MacsRatio:
    """Total conv MACs at most ``ratio`` × the original's (needs an input size)."""

    ratio: float

    def __post_init__(self):
        _check_ratio(self.ratio, "MACs ratio")


@dataclass(frozen=True)
class MaxError:
    """Every converted layer's relative error at most ``error``; each layer takes its cheapest such shape."""

    error: float

    def __post_init__(self):
        if not (isinstance(self.error, (int, float)) and math.isfinite(self.error) and 0 < self.error < 1):
            raise ConfigError(f"max error must be in (0, 1), got {self.error!r}")


@dataclass(frozen=True)
class LatencyRatio:
    """Whole-model latency (measured in onnxruntime on this machine) at most ``ratio`` × the original's.

    The plan adds up per-layer conv timings (each net of onnxruntime's per-call cost) and the time the
    model spends outside its convs, which no conversion changes.

    Only blocks measured faster than their dense conv are candidates, and :func:`convert` ends by timing
    the whole converted model against the original, reverting layers until it is within ``ratio``: the
    result is never slower than the original under the measured setting. The plan is the least-error
    one within the target, so ``ratio = 1`` changes nothing; ask for the speed-up you want (e.g. 0.5).
    """

    ratio: float

    def __post_init__(self):
        _check_ratio(self.ratio, "latency ratio")


Target = ParamsRatio | MacsRatio | MaxError | LatencyRatio

#: The cost each budget target counts.
TARGET_METRIC = {ParamsRatio: "params", MacsRatio: "macs", LatencyRatio: "latency"}


def _check_ratio(ratio: float, what: str) -> None:
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise ConfigError(f"{what} must be in (0, 1], got {ratio!r}")


# --------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One way to realise a layer: ``kind`` is ``"dense"`` or a block kind; ``error`` is relative."""

    kind: str
    shape: dict[str, Any] = field(default_factory=dict)
    params: int = 0
    macs: int | None = None
    error: float = 0.0
    latency: float | None = None  # seconds, measured in onnxruntime (latency targets only)
    #: On onnxruntime's NCHWc fast path: every group of the block's convs holds a multiple of the
    #: planned channel multiple (:func:`channel_multiple`), and the block has no channel shuffle
    #: (:func:`has_shuffle`; :func:`on_fast_path`). Speed targets plan with such shapes first
    #: (:func:`allocate_fast_first`).
    fast: bool = True
    #: The layer's own relative error, kept here when ``error`` holds another score the plan is made on
    #: (planning by the logits, :mod:`igc_convert.probe`).
    fit_error: float | None = None

    def cost(self, metric: str) -> float:
        value = getattr(self, metric)
        if value is None:
            raise ConfigError(f"a {metric} target needs {'an input size' if metric == 'macs' else 'measured latencies'}")
        return float(value)


@dataclass(frozen=True)
class LayerSpec:
    """What the planner needs to know about one conv."""

    name: str
    weight: Tensor
    has_bias: bool
    stride: tuple[int, int]
    padding: Any
    dilation: tuple[int, int]
    input_hw: tuple[int, int] | None = None
    sigma: Tensor | None = None
    row_weights: Tensor | None = None
    #: ``‖W μ‖²`` when ``sigma`` is the input covariance of a layer whose mean output reaches the next
    #: layer (a bias takes the fit's shift, no BatchNorm removes the mean): candidate errors are then
    #: relative to the whole output ``tr(W Σ Wᵀ) + ‖W μ‖²``.
    mean_energy: float = 0.0

    @property
    def c_out(self) -> int:
        return self.weight.shape[0]

    @property
    def c_in(self) -> int:
        return self.weight.shape[1]

    @property
    def taps(self) -> int:
        return self.weight.shape[2] * self.weight.shape[3]

    @property
    def output_hw(self) -> tuple[int, int] | None:
        if self.input_hw is None:
            return None
        return conv_output_hw(self.input_hw, tuple(self.weight.shape[2:]), self.stride, self.padding, self.dilation)

    def dense(self) -> Candidate:
        return Candidate("dense", {}, self.weight.numel() + self.c_out * self.has_bias, self._macs(self.weight.numel()), 0.0)

    def _macs(self, per_position: int) -> int | None:
        hw = self.output_hw
        return None if hw is None else per_position * hw[0] * hw[1]


#: The channel multiple planned for when onnxruntime cannot tell (AVX2's NCHWc block).
DEFAULT_CHANNEL_MULTIPLE = 8
#: Latency targets plan groups of at least this many channels by default, even where the NCHWc block
#: is 8 (AVX2). On a 2-core AVX2 AMD EPYC, at ``LatencyRatio(0.33)``, plans for 16 kept more of the
#: MACs at the same measured latency than plans for 8 (two alternating runs, then the plans remade
#: once more): ResNet-50 0.272 / 0.249 / 0.291 of the MACs against 0.268 / 0.223 / 0.251 (summed
#: squared weight error 28.9 against 31.2 in the last), ResNet-18 0.251 / 0.237 against 0.214 / 0.226
#: (error 11.26 against 11.24; ResNet-18's first figure is from the second run only).
#: Timed alone, a block of 8-channel groups looks as fast per MAC as one of 16; inside the model it
#: is slower (more, smaller kernels), and the whole-model check then takes MACs away.
LATENCY_CHANNEL_MULTIPLE = 16


def channel_multiple(value: int | None = None, *, latency: bool = False) -> int:
    """The channels-per-group multiple that marks an IGCV1 shape ``fast``: ``value``, else this CPU's NCHWc block.

    onnxruntime runs a grouped conv in its fast blocked layout only when every group's channels are
    a multiple of its NCHWc block (:func:`igc_convert.bench.nchwc_block_size`: 8 with AVX2, 16 with
    AVX-512). MAC targets plan with fast shapes first (:func:`allocate_fast_first`), so planning for
    the wrong block costs dearly: on an AVX-512 machine, ResNet-50 at 0.26 of the MACs measured 0.542
    of the dense latency at batch 1 planned for 8 and 0.374 planned for 16 (one alternating run). The shapes enumerated do
    not depend on it (params and error targets plan the same on every CPU). Give ``value`` to plan
    for a deployment CPU other than this one. With ``latency`` (a latency target) the default is at
    least :data:`LATENCY_CHANNEL_MULTIPLE`.
    """
    if value is None:
        from .bench import nchwc_block_size

        block = nchwc_block_size() or DEFAULT_CHANNEL_MULTIPLE
        return max(block, LATENCY_CHANNEL_MULTIPLE) if latency else block
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ConfigError(f"channel_multiple must be a power of two >= 1, got {value!r}")
    return value


#: IGCV1 ranks go in steps that keep channel counts multiples of 8 only where that still leaves this
#: many ranks per (L, M); below it every rank is offered. With the earlier rule (every rank only up to
#: rank 32) the digits model's 64-channel layers had 8 ranks per shape, and IGCV1 at 0.1 of the conv
#: parameters kept 91.1 / 77.7 / 75.5 / 93.6% zero-shot (dense-model seeds 0-3) against 96.9 / 92.5 /
#: 80.2 / 93.9% with every rank. Large layers (rank up to 128 and more) keep their fast-path steps.
MIN_RANK_LEVELS = 16


def _rank_step(multiple: int, L: int, M: int) -> int:
    """Smallest rank step keeping an IGCV1 block's ``L·r`` and ``M·r`` multiples of ``multiple``."""
    return math.lcm(multiple // math.gcd(multiple, L), multiple // math.gcd(multiple, M))


def _fast_groups(channels: int, max_groups: int, multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> list[int]:
    """1, and the group counts leaving ≥ ``multiple`` channels per group, in multiples of it."""
    out = [1]
    g = 2
    while g <= max_groups:
        per = channels // g
        if channels % g == 0 and per >= multiple and per % multiple == 0:
            out.append(g)
        g *= 2
    return out


def igcv1_candidates(layer: LayerSpec, *, max_groups: int = 4, damping: float = fz.DEFAULT_DAMPING,
                     multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> list[Candidate]:
    """All IGCV1 shapes cheaper than the dense conv, each scored by its closed-form error."""
    dense = layer.dense()
    out = []
    base = min(multiple, DEFAULT_CHANNEL_MULTIPLE)  # the shape family: the same on every CPU
    Ls = _fast_groups(layer.c_in, max_groups, base)
    products = fz.PartitionProducts(layer.weight, layer.row_weights, Ls) if Ls else None
    for L in Ls:
        Ms = _fast_groups(layer.c_out, max_groups, base)
        curves = fz.igcv1_singular_values(layer.weight, L, Ms, layer.sigma, layer.row_weights, damping, products)
        for M in Ms:
            per_rank = M * layer.c_in * layer.taps + L * layer.c_out
            rmax = min(layer.c_out // M, layer.c_in // L * layer.taps)
            if rmax < 1:
                continue
            energy = curves[M].pow(2)
            total = float(energy.sum()) or 1.0
            # tail[r] = discarded energy at rank r (sum over all tiles of s_k², k >= r)
            tail = energy.sum(dim=(0, 1)).flip(0).cumsum(0).flip(0)
            # Ranks in multiples of a step keep M·r and L·r multiples of `base` (onnxruntime's NCHWc
            # fast path on AVX2), unless that leaves fewer than MIN_RANK_LEVELS ranks to choose from: a
            # coarse grid on a small layer costs accuracy (see MIN_RANK_LEVELS). A shape is `fast` when
            # every group also holds a multiple of `multiple`, this CPU's block, and it has no shuffle
            # (L > 1 and M > 1 have one: has_shuffle); speed targets plan with fast shapes first, so
            # the finer ranks and the interleaved shapes mostly serve params and error targets.
            fast_step = _rank_step(multiple, L, M)
            groups_fast = ((L == 1 or (layer.c_in // L) % multiple == 0)
                           and (M == 1 or (layer.c_out // M) % multiple == 0)
                           and not has_shuffle(IGCV1(layer.c_in, layer.c_out, tuple(layer.weight.shape[2:]),
                                                     primary_groups=L, secondary_groups=M, device="meta")))
            step = _rank_step(base, L, M)
            step = step if rmax >= MIN_RANK_LEVELS * step else 1
            for r in range(step, rmax + 1, step):
                params = r * per_rank + layer.c_out * layer.has_bias
                if params >= dense.params:
                    break
                err2 = float(tail[r]) / total if r < len(tail) else 0.0
                out.append(Candidate("igcv1", dict(primary_groups=L, secondary_groups=M, rank=r), params,
                                     layer._macs(r * per_rank), math.sqrt(max(err2, 0.0)),
                                     fast=groups_fast and r % fast_step == 0))
    return out


def igcv2_shapes(layer: LayerSpec, *, max_groups: int = 4) -> list[dict[str, Any]]:
    shapes = []
    for c_mid in {layer.c_in // 4, layer.c_in // 2, layer.c_in, 2 * layer.c_in}:
        if c_mid < 4:
            continue
        k1 = 2 ** round(math.log2(math.sqrt(c_mid)))
        while k1 > 1 and (c_mid % k1 or layer.c_out % k1):
            k1 //= 2
        if k1 < 2 or c_mid // k1 < 2:
            continue
        for L in _fast_groups(layer.c_in, max_groups):
            if c_mid % L == 0:
                shapes.append(dict(primary_groups=L, factors=[k1, c_mid // k1]))
    return shapes


#: Parameter ratios of the IGCV3 shapes the planner scores. Steps of about 1.4x: with the earlier
#: (0.05, 0.1, 0.2, 0.35, 0.5, 0.7) the allocation left 7% of a 0.1 budget unspent on the digits
#: model (0.093), and its zero-shot accuracy read 97.2% instead of 98.9% (0.098). The grid reaches
#: below 0.05 so that a budget of 0.05 can keep IGCV3 on every layer: starting at 0.05, the planner had
#: to take IGCV1 rank-1 shapes somewhere, and `auto` at 0.05 kept 69% zero-shot on average over eight
#: dense digits models instead of 90% (distillation from it, dev split, 16 seeds: 98.78% vs 99.24%).
IGCV3_RATIOS = (0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.275, 0.35, 0.5, 0.7)


def igcv3_shapes(layer: LayerSpec, ratios: Sequence[float] = IGCV3_RATIOS) -> list[dict[str, Any]]:
    shapes = []
    dense = layer.weight.numel()
    for g in (1, 2):
        if layer.c_in % g or layer.c_out % g:
            continue
        per_mid = layer.c_in // g + layer.taps + layer.c_out // g
        seen = set()
        for ratio in ratios:
            unit = g * g * (8 if ratio * dense / per_mid >= 16 * g * g else 1)
            c_int = max(unit, int(round(ratio * dense / per_mid / unit)) * unit)
            if c_int not in seen:
                seen.add(c_int)
                shapes.append(dict(expand_groups=g, reduce_groups=g, mid_channels=c_int))
    return shapes


def has_shuffle(block: nn.Module) -> bool:
    """Whether ``block`` has a channel shuffle between its convs (onnxruntime runs it outside NCHWc).

    onnxruntime cannot keep a shuffle in its NCHWc layout: it reorders the activation back to NCHW,
    transposes it and reorders it again, three copies between two convs. At equal MACs shuffle-free
    shapes ran faster: ResNet-50 at ``MacsRatio(0.26)`` measured 0.317-0.321 of the original's
    latency planned without shuffles, 0.329-0.333 with its 9 shuffled layers (ResNet-18: 0.307
    against 0.323), for +0.05% of summed squared weight error. So speed targets take shuffled shapes
    only when they must (:attr:`Candidate.fast`); size and error targets do not look at it.
    """
    return any(isinstance(m, ChannelShuffle) for m in block.modules())


def on_fast_path(block: nn.Module, multiple: int) -> bool:
    """Whether onnxruntime can run ``block`` in its NCHWc layout with a block of ``multiple`` channels.

    No shuffle (:func:`has_shuffle`), every tensor between its convs holds a multiple of ``multiple``
    channels, and so does every group of a grouped conv (a depthwise conv's groups are single channels,
    which NCHWc handles). The block's own input and output are the original conv's, so they do not count.
    The closed-form IGCV1 candidates apply the same rule arithmetically (:func:`igcv1_candidates`).
    """
    if has_shuffle(block):
        return False
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        if i < len(convs) - 1 and conv.out_channels % multiple:
            return False
        g = conv.groups
        if 1 < g < conv.in_channels and ((conv.in_channels // g) % multiple or (conv.out_channels // g) % multiple):
            return False
    return True


def fitted_candidates(layer: LayerSpec, kind: str, shapes: Sequence[dict[str, Any]], *, max_iter: int = 15,
                      damping: float = fz.DEFAULT_DAMPING, multiple: int = DEFAULT_CHANNEL_MULTIPLE
                      ) -> list[Candidate]:
    """Score IGCV2/IGCV3 shapes by a short fit (these blocks have no closed-form error); ``fast`` as
    :func:`on_fast_path` decides for a block of ``multiple`` channels."""
    from .blocks import BLOCKS

    cls = BLOCKS[kind]
    dense = layer.dense()
    kept = []
    for shape in shapes:
        block = cls(layer.c_in, layer.c_out, tuple(layer.weight.shape[2:]), layer.stride, layer.padding,
                    layer.dilation, layer.has_bias, device="meta", **shape)
        params = block.num_params()
        if params < dense.params:
            kept.append((shape, block, params))
    errors = cls.score_shapes(layer.weight, [shape for shape, _, _ in kept], sigma=layer.sigma,
                              row_weights=layer.row_weights, damping=damping, max_iter=max_iter)
    return [Candidate(kind, dict(shape), params, block.macs(layer.input_hw) if layer.input_hw is not None else None,
                      error, fast=on_fast_path(block, multiple))
            for (shape, block, params), error in zip(kept, errors)]


def candidates(layer: LayerSpec, kinds: Sequence[str], *, max_groups: int = 4, fit_iters: int = 15,
               damping: float = fz.DEFAULT_DAMPING, multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> list[Candidate]:
    """Every candidate of the given block kinds for ``layer``, plus staying dense.

    With IGCV1 among the kinds, a 1×1 layer gets no IGCV3 candidates: on a 1×1 kernel an IGCV3 block
    (``g`` groups, ``C_int`` mid channels) computes what the IGCV1 block with ``L = M = g`` and rank
    ``C_int/g²`` computes (its depthwise conv is a per-channel scale that the 1×1 convs absorb), with
    ``C_int`` more parameters and MACs; IGCV1 scores it in closed form, where IGCV3 takes a short
    iterative fit.
    """
    out = [layer.dense()]
    for kind in kinds:
        if kind == "igcv1":
            out += igcv1_candidates(layer, max_groups=max_groups, damping=damping, multiple=multiple)
        elif kind == "igcv2":
            out += fitted_candidates(layer, kind, igcv2_shapes(layer, max_groups=max_groups), max_iter=fit_iters,
                                     damping=damping, multiple=multiple)
        elif kind == "igcv3":
            if layer.taps == 1 and "igcv1" in kinds:
                continue
            out += fitted_candidates(layer, kind, igcv3_shapes(layer), max_iter=fit_iters, damping=damping,
                                     multiple=multiple)
        else:
            raise ConfigError(f"unknown block kind {kind!r}")
    if layer.mean_energy > 0 and layer.sigma is not None:
        w = layer.weight.reshape(layer.c_out, -1).to(layer.sigma)
        varying = float(((w @ layer.sigma) * w).sum())
        scale = math.sqrt(varying / (varying + layer.mean_energy))
        out = [replace(c, error=c.error * scale) for c in out]
    return out


# ------------------------------------------------------------------------------------------ allocate
def lower_hull(cands: Sequence[Candidate], metric: str) -> list[Candidate]:
    """Pareto front of (cost, error²), then its lower convex hull, ordered by increasing cost."""
    pts = sorted(cands, key=lambda c: (c.cost(metric), c.error))
    front: list[Candidate] = []
    for c in pts:
        if not front or c.error < front[-1].error - 1e-15:
            front.append(c)
    hull: list[Candidate] = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies above the segment a -> c (not convex)
            cross = ((b.cost(metric) - a.cost(metric)) * (c.error**2 - a.error**2)
                     - (b.error**2 - a.error**2) * (c.cost(metric) - a.cost(metric)))
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _dense_total(per_layer: Sequence[Sequence[Candidate]], metric: str, fixed_cost: float) -> float:
    """The original model's total cost: ``fixed_cost`` plus every layer's dense candidate."""
    return fixed_cost + sum(next(c for c in cands if c.kind == "dense").cost(metric) for cands in per_layer)


def allocate(per_layer: Sequence[Sequence[Candidate]], target: Target, *, fixed_cost: float = 0.0,
             dense_total: float | None = None, fill: bool = True) -> list[Candidate]:
    """Pick one candidate per layer to meet ``target`` with the least total squared relative error.

    ``fixed_cost`` is the cost of convs that stay dense whatever happens (not convertible);
    ``dense_total`` the original model's total (defaults to fixed + every layer's dense cost).
    ``fill=False`` keeps the hull walk's plan, without :func:`_fill`: a smaller budget then stops
    the same walk earlier, so plans only get cheaper as the budget shrinks (a filled plan need not).
    """
    if isinstance(target, MaxError):
        chosen = []
        for cands in per_layer:
            ok = [c for c in cands if c.error <= target.error]
            chosen.append(min(ok, key=lambda c: (c.params, c.error)))
        return chosen
    metric = TARGET_METRIC[type(target)]
    if dense_total is None:
        dense_total = _dense_total(per_layer, metric, fixed_cost)
    budget = target.ratio * dense_total
    hulls = [lower_hull(c, metric) for c in per_layer]
    pos = [0] * len(hulls)
    spent = fixed_cost + sum(h[0].cost(metric) for h in hulls)
    if spent > budget * (1 + 1e-12):
        raise ConfigError(f"{metric} ratio {target.ratio:g} is not reachable: the smallest shapes give "
                          f"{spent / dense_total:.3f} (convs that cannot be converted keep their size)")
    if target.ratio >= 1:
        return [next(c for c in cands if c.kind == "dense") for cands in per_layer]

    def step(i: int):
        h, p = hulls[i], pos[i]
        if p + 1 >= len(h):
            return None
        dc = h[p + 1].cost(metric) - h[p].cost(metric)
        de = h[p].error**2 - h[p + 1].error**2
        return (-de / max(dc, 1e-12), i)

    heap = [s for s in (step(i) for i in range(len(hulls))) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        h, p = hulls[i], pos[i]
        dc = h[p + 1].cost(metric) - h[p].cost(metric)
        if spent + dc > budget * (1 + 1e-12):
            # this upgrade does not fit; a smaller later one of another layer still may
            continue
        spent += dc
        pos[i] += 1
        nxt = step(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    chosen = [h[p] for h, p in zip(hulls, pos)]
    return _fill(chosen, per_layer, metric, spent, budget) if fill else chosen


def _fill(chosen: list[Candidate], per_layer: Sequence[Sequence[Candidate]], metric: str, spent: float,
          budget: float) -> list[Candidate]:
    """Spend what the hull walk left: upgrade one layer at a time to the shape, hull or not, that
    lowers the summed squared error most within the budget left.

    The walk stops when no next *hull* step fits, and a coarse shape grid can leave several percent of
    the budget there; shapes between two hull vertices were dropped for not being convex, yet one of
    them may fit what is left.
    """
    chosen = list(chosen)
    while True:
        moves = [(cur.error**2 - c.error**2, i, c) for i, (cands, cur) in enumerate(zip(per_layer, chosen))
                 for c in cands if spent + c.cost(metric) - cur.cost(metric) <= budget * (1 + 1e-12)]
        gain, i, c = max(moves, key=lambda m: m[0], default=(0.0, -1, None))
        if not gain > 0:
            return chosen
        spent += c.cost(metric) - chosen[i].cost(metric)
        chosen[i] = c


def allocate_fast_first(per_layer: Sequence[Sequence[Candidate]], target: Target, *, fixed_cost: float = 0.0,
                        dense_total: float | None = None, fill: bool = True) -> list[Candidate]:
    """:func:`allocate` over the candidates on onnxruntime's fast path; slow shapes only in the layers that need them.

    For MAC and latency targets, which are speed targets: a block whose channels per group are not
    multiples of onnxruntime's NCHWc block (:func:`channel_multiple`) runs far slower per MAC (a grouped
    conv with 2 outputs per group ran at 4.8 GMAC/s where the dense convs of the same ResNet-50 ran at
    43–64), so such shapes are taken only when the budget cannot be met without them. Timed alone, such
    a block even looks better than it is: it skips the NCHWc reorders a lone dense conv pays, which it
    adds inside a model whose other convs run in NCHWc.

    When the fast shapes cannot reach the target, layers get all their shapes one at a time, those whose
    smallest shape of all saves the most over their smallest fast one first, until the allocation
    meets the target and spends at least :data:`FAST_FIRST_FILL` of its budget (with a coarse grid of fast
    shapes, opening just enough layers to fit can leave much of the budget unspent); every other layer
    keeps to fast shapes. Opening every layer instead, ResNet-50 at ``MacsRatio(0.1)`` took slow shapes
    wherever they fit best and ran at 0.262-0.266 of the original's latency; opening the 4 layers that
    needed it, 0.189-0.190 (+5.7% summed squared weight error).
    """
    fast = [[c for c in cands if c.fast] for cands in per_layer]
    try:
        return allocate(fast, target, fixed_cost=fixed_cost, dense_total=dense_total, fill=fill)
    except ConfigError:  # a budget target the fast shapes cannot reach (MaxError never raises: dense is fast)
        pass
    metric = TARGET_METRIC[type(target)]
    if dense_total is None:
        dense_total = _dense_total(per_layer, metric, fixed_cost)
    budget = target.ratio * dense_total
    smallest_fast = [min(c.cost(metric) for c in cands) for cands in fast]
    smallest = [min(c.cost(metric) for c in cands) for cands in per_layer]
    order = sorted((i for i in range(len(fast)) if smallest[i] < smallest_fast[i]),
                   key=lambda i: smallest[i] - smallest_fast[i])
    pools, floor, chosen = list(fast), fixed_cost + sum(smallest_fast), None
    for opened, i in enumerate(order, 1):
        pools[i] = per_layer[i]
        floor += smallest[i] - smallest_fast[i]
        if floor > budget * (1 + 1e-12):
            continue
        chosen = allocate(pools, target, fixed_cost=fixed_cost, dense_total=dense_total, fill=fill)
        spent = fixed_cost + sum(c.cost(metric) for c in chosen)
        if spent >= FAST_FIRST_FILL * budget:
            break
    if chosen is None:  # not reachable even with every shape: allocate says so
        return allocate(per_layer, target, fixed_cost=fixed_cost, dense_total=dense_total, fill=fill)
    log.info("the target needs block shapes off onnxruntime's fast path in %d of %d layers", opened, len(pools))
    return chosen


#: :func:`allocate_fast_first` opens more layers to slow shapes while its plan spends less than this
#: share of the budget.
FAST_FIRST_FILL = 0.95


def uniform(per_layer: Sequence[Sequence[Candidate]], ratio: float, metric: str = "params") -> list[Candidate]:
    """Baseline: every layer at (at most) the same ratio of its own cost, best error under it."""
    out = []
    for cands in per_layer:
        dense = next(c for c in cands if c.kind == "dense")
        ok = [c for c in cands if c.cost(metric) <= ratio * dense.cost(metric)]
        out.append(min(ok, key=lambda c: c.error) if ok else min(cands, key=lambda c: c.cost(metric)))
    return out

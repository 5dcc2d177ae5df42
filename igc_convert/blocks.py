"""Interleaved Group Convolution blocks: width-matched, drop-in replacements of a dense ``Conv2d``.

Each block has the constructor signature of ``nn.Conv2d`` plus its own shape arguments, a
``from_conv(conv, ...)`` that copies every hyper-parameter of a conv (or refuses) and fits the block
to its kernel, and exposes its dense equivalent kernel, parameter count and MACs. All three are
linear: a product of structured sparse factors (grouped convs and channel shuffles), so the dense
equivalent is exact and ``F.conv2d(x, block.dense_weight(), ...) == block(x)``.

Shapes (``S = kh·kw``)::

    IGCV1  x ─ Conv k×k, L groups, C_in→L·M·r ─ shuffle(L, M) ─ Conv 1×1, M groups, →C_out ─
    IGCV2  x ─ Conv k×k, L groups, C_in→C_mid ─ Conv 1×1 (groups of K_1) ─ shuffle ─ … ─ Conv 1×1
           (groups of K_n), →C_out ─            with C_mid = K_1·…·K_n (one path per channel pair)
    IGCV3  x ─ Conv 1×1, G1 groups, C_in→C_int ─ depthwise k×k ─ shuffle(G1, G2) ─ Conv 1×1, G2 groups ─

IGCV3's paper puts a shuffle on each side of the depthwise conv; a depthwise conv commutes with any
channel permutation, so the two compose into the one shuffle used here (fewer nodes, same function).

Every block has exactly one spatial (k×k) conv and it carries the dense conv's padding and
``padding_mode``: the 1×1 convs before it act on each pixel alone, so reflecting, replicating or
wrapping the border before or after them gives the same result (and zero padding commutes with
IGCV3's bias-free expand).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import factorize as fz
from .errors import ConfigError, UnsupportedLayerError
from .shuffle import ChannelShuffle

Tensor = torch.Tensor
_pair = torch.nn.modules.utils._pair


def _ints(**values: Any) -> list[int]:
    """Shape arguments as ints; 2.7 or True is a mistake, not something to truncate."""
    out = []
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        out.append(v)
    return out


def check_convertible(conv: nn.Module, name: str | None = None) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``conv`` is a plain dense ``Conv2d`` we can replace."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        raise UnsupportedLayerError(f"{type(conv).__name__} is not a plain nn.Conv2d (custom forward)", layer=name)
    if conv.groups != 1:
        raise UnsupportedLayerError(f"grouped conv (groups={conv.groups}) is already sparse; only groups=1 convs "
                                    "are converted", layer=name)
    if not torch.isfinite(conv.weight).all() or (conv.bias is not None and not torch.isfinite(conv.bias).all()):
        raise UnsupportedLayerError("weights contain NaN or Inf", layer=name)
    if conv.weight.is_meta:
        raise UnsupportedLayerError("weights are on the meta device (not materialised)", layer=name)


class IGCBlock(nn.Module):
    """Base class of the IGC blocks: the ``nn.Conv2d`` hyper-parameters and the shared API."""

    #: Marks converted layers for code that must not import this module (e.g. feature matching).
    is_igc_block: ClassVar[bool] = True
    kind: ClassVar[str] = ""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, padding_mode: str = "zeros") -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(f"channels must be positive, got in={in_channels}, out={out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.has_bias, self.padding_mode = bool(bias), padding_mode

    # --- the shared API -----------------------------------------------------------------------
    def shape(self) -> dict[str, Any]:
        """JSON-able shape arguments; ``type(self)(**conv_args, **block.shape())`` rebuilds the block."""
        raise NotImplementedError

    def factors(self) -> tuple[Tensor, ...]:
        """The block's conv weights in forward order (what ``factorize`` fits)."""
        raise NotImplementedError

    def _dense(self, factors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def fit(weight: Tensor, **kwargs) -> fz.Fit:
        raise NotImplementedError

    @classmethod
    def score_shapes(cls, weight: Tensor, shapes: Sequence[dict[str, Any]], **kwargs) -> list[float]:
        """The relative error of a :meth:`fit` of each of ``shapes``: what the planner ranks them by.
        A kind may share work between the shapes."""
        return [cls.fit(weight, **shape, **kwargs).error for shape in shapes]

    def dense_weight(self) -> Tensor:
        """The dense kernel ``C_out × C_in × kh × kw`` this block computes (exactly)."""
        return self._dense(self.factors())

    @property
    def bias(self) -> Tensor | None:
        return self._last_conv().bias

    def _last_conv(self) -> nn.Conv2d:
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)][-1]

    def conv_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, bias=self.has_bias, padding_mode=self.padding_mode)

    def num_params(self) -> int:
        """Number of parameters (weights and bias)."""
        return sum(p.numel() for p in self.parameters())

    def output_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        return conv_output_hw(input_hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def macs(self, input_hw: tuple[int, int]) -> int:
        """Multiply-accumulates for one image of spatial size ``input_hw`` (sum over the block's convs)."""
        total, hw = 0, tuple(input_hw)
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):
            out_hw = conv_output_hw(hw, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
            total += conv_macs(conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups, out_hw)
            hw = out_hw
        return total

    def load_factors(self, factors: Sequence[Tensor], bias: Tensor | None = None) -> None:
        """Copy fitted factors (and the conv's bias) into the block's weights."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for conv, f in zip(convs, factors, strict=True):
                conv.weight.copy_(f.reshape(conv.weight.shape))
            if bias is not None:
                convs[-1].bias.copy_(bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, name: str | None = None, fit: bool = True,
                  sigma: Tensor | None = None, row_weights: Tensor | None = None, **shape: Any) -> "IGCBlock":
        """Build a block with ``conv``'s hyper-parameters and fit it to ``conv``'s kernel.

        ``sigma`` (second moment of the conv's im2col input patches) and ``row_weights`` make the fit
        data-aware (see :mod:`igc_convert.factorize`). ``fit=False`` builds the structure only.

        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> block = IGCV1.from_conv(conv, primary_groups=2, secondary_groups=2, rank=4)
        >>> block(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
        """
        check_convertible(conv, name)
        try:
            block = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.bias is not None, conv.padding_mode, **shape,
                        device=conv.weight.device, dtype=conv.weight.dtype)
            if fit:
                result = cls.fit(conv.weight.detach(), sigma=sigma, row_weights=row_weights, **shape)
                block.load_factors(result.factors, None if conv.bias is None else conv.bias.detach())
                block.fit_error = result.error
        except ConfigError as err:
            raise err.in_layer(name) if name else err
        return block

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.shape().items())
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{mode}, dilation={self.dilation}, bias={self.has_bias}, {args}")


class IGCV1(IGCBlock):
    """Primary grouped k×k conv (``L`` groups) → shuffle → secondary grouped 1×1 conv (``M`` groups).

    Every (secondary group, primary partition) pair is linked by ``rank`` channels, so the dense
    equivalent is an ``M × L`` grid of rank-``r`` tiles. ``L = M = 1`` is a plain low-rank pair;
    ``rank = min(C_out/M, C_in/L·S)`` reproduces any dense conv exactly.
    """

    kind = "igcv1"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 primary_groups: int = 1, secondary_groups: int = 1, rank: int = 1, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        L, M, r = _ints(primary_groups=primary_groups, secondary_groups=secondary_groups, rank=rank)
        fz._check_divisible(in_channels, L, "in_channels", "primary_groups")
        fz._check_divisible(out_channels, M, "out_channels", "secondary_groups")
        rmax = min(out_channels // M, in_channels // L * math.prod(self.kernel_size))
        if not 1 <= r <= rmax:
            raise ConfigError(f"IGCV1 rank must be in 1..{rmax} for in={in_channels}, out={out_channels}, "
                              f"kernel={self.kernel_size}, L={L}, M={M}; got rank={r}")
        self.primary_groups, self.secondary_groups, self.rank = L, M, r
        kw = dict(device=device, dtype=dtype)
        self.primary = nn.Conv2d(in_channels, L * M * r, self.kernel_size, self.stride, self.padding,
                                 self.dilation, groups=L, bias=False, padding_mode=padding_mode, **kw)
        self.shuffle = ChannelShuffle(L, M) if L > 1 and M > 1 else nn.Identity()
        self.secondary = nn.Conv2d(L * M * r, out_channels, 1, groups=M, bias=bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.secondary(self.shuffle(self.primary(x)))

    def shape(self) -> dict[str, Any]:
        return dict(primary_groups=self.primary_groups, secondary_groups=self.secondary_groups, rank=self.rank)

    def factors(self) -> tuple[Tensor, ...]:
        return self.primary.weight, self.secondary.weight

    def _dense(self, factors: Sequence[Tensor]) -> Tensor:
        return fz.igcv1_weight(*factors, self.primary_groups, self.secondary_groups)

    @staticmethod
    def fit(weight: Tensor, *, primary_groups: int = 1, secondary_groups: int = 1, rank: int = 1,
            **kwargs) -> fz.Fit:
        return fz.fit_igcv1(weight, primary_groups, secondary_groups, rank, **kwargs)


class IGCV2(IGCBlock):
    """Primary grouped k×k conv (``L`` groups, ``C_mid`` outputs) → chain of grouped 1×1 convs.

    ``factors = (K_1, …, K_n)``, ``n ≥ 2``, ``C_mid = K_1·…·K_n``: stage ``t`` has groups of ``K_t``
    channels and mixes one digit of the mixed-radix channel index; the shuffle before each later
    stage brings the next digit innermost. Each mid channel reaches each output by exactly one path
    (the complementary condition), so the chain is dense with ``C_mid·ΣK_t``-ish parameters.
    """

    kind = "igcv2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 primary_groups: int = 1, factors: Sequence[int] = (2, 2), device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        L, ks = _ints(primary_groups=primary_groups)[0], tuple(_ints(**{f'factors[{i}]': k for i, k in enumerate(factors)}))
        fz._validate_igcv2(in_channels, out_channels, L, ks, math.prod(self.kernel_size))
        self.primary_groups, self.group_sizes = L, ks
        c_mid = math.prod(ks)
        kw = dict(device=device, dtype=dtype)
        self.primary = nn.Conv2d(in_channels, c_mid, self.kernel_size, self.stride, self.padding,
                                 self.dilation, groups=L, bias=False, padding_mode=padding_mode, **kw)
        stages = []
        for t, k in enumerate(ks):
            last = t == len(ks) - 1
            conv = nn.Conv2d(c_mid, out_channels if last else c_mid, 1, groups=c_mid // k,
                             bias=bias and last, **kw)
            shuffle = ChannelShuffle(k, c_mid // k) if t > 0 and 1 < k < c_mid else nn.Identity()
            stages.append(nn.Sequential(shuffle, conv))
        self.chain = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.chain(self.primary(x))

    def shape(self) -> dict[str, Any]:
        return dict(primary_groups=self.primary_groups, factors=list(self.group_sizes))

    def factors(self) -> tuple[Tensor, ...]:
        return (self.primary.weight, *(stage[1].weight for stage in self.chain))

    def _dense(self, factors: Sequence[Tensor]) -> Tensor:
        return fz.igcv2_weight(factors[0], factors[1:], self.primary_groups, self.group_sizes)

    @staticmethod
    def fit(weight: Tensor, *, primary_groups: int = 1, factors: Sequence[int] = (2, 2), **kwargs) -> fz.Fit:
        return fz.fit_igcv2(weight, primary_groups, factors, **kwargs)


class IGCV3(IGCBlock):
    """Grouped 1×1 expand (``G1``) → depthwise k×k (stride, padding, dilation) → shuffle → grouped
    1×1 reduce (``G2``); ``mid_channels`` = ``C_int``. With ``G1 = G2 = 1`` its dense equivalent is a
    rank-``C_int`` CP decomposition of the kernel.
    """

    kind = "igcv3"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 expand_groups: int = 1, reduce_groups: int = 1, mid_channels: int = 1, device=None,
                 dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode)
        G1, G2, c_int = _ints(expand_groups=expand_groups, reduce_groups=reduce_groups, mid_channels=mid_channels)
        fz._validate_igcv3(in_channels, out_channels, G1, G2, c_int)
        self.expand_groups, self.reduce_groups, self.mid_channels = G1, G2, c_int
        kw = dict(device=device, dtype=dtype)
        self.expand = nn.Conv2d(in_channels, c_int, 1, groups=G1, bias=False, **kw)
        # Padding commutes with the bias-free 1×1 expand (any mode), so padding here is exact.
        self.depthwise = nn.Conv2d(c_int, c_int, self.kernel_size, self.stride, self.padding, self.dilation,
                                   groups=c_int, bias=False, padding_mode=padding_mode, **kw)
        self.shuffle = ChannelShuffle(G1, G2) if G1 > 1 and G2 > 1 else nn.Identity()
        self.reduce = nn.Conv2d(c_int, out_channels, 1, groups=G2, bias=bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(self.shuffle(self.depthwise(self.expand(x))))

    def shape(self) -> dict[str, Any]:
        return dict(expand_groups=self.expand_groups, reduce_groups=self.reduce_groups,
                    mid_channels=self.mid_channels)

    def factors(self) -> tuple[Tensor, ...]:
        return self.expand.weight, self.depthwise.weight, self.reduce.weight

    def _dense(self, factors: Sequence[Tensor]) -> Tensor:
        return fz.igcv3_weight(*factors, self.expand_groups, self.reduce_groups)

    @staticmethod
    def fit(weight: Tensor, *, expand_groups: int = 1, reduce_groups: int = 1, mid_channels: int = 1,
            **kwargs) -> fz.Fit:
        return fz.fit_igcv3(weight, expand_groups, reduce_groups, mid_channels, **kwargs)

    @classmethod
    def score_shapes(cls, weight: Tensor, shapes: Sequence[dict[str, Any]], **kwargs) -> list[float]:
        """Shapes of one grouping share their objective, whitening and start
        (:func:`~igc_convert.factorize.fit_igcv3_widths`)."""
        errors: dict[int, float] = {}
        groupings: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            groupings.setdefault((shape.get("expand_groups", 1), shape.get("reduce_groups", 1)), []).append(i)
        for (G1, G2), idx in groupings.items():
            widths = [shapes[i].get("mid_channels", 1) for i in idx]
            fits = fz.fit_igcv3_widths(weight, G1, G2, widths, **kwargs)
            errors.update((i, fit.error) for i, fit in zip(idx, fits))
        return [errors[i] for i in range(len(shapes))]


#: ``nn.Conv2d``'s padding modes; a block carries its conv's.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

#: Block kind -> class. Copy before extending (``dict(BLOCKS)``); users may register their own kinds.
BLOCKS: dict[str, type[IGCBlock]] = {cls.kind: cls for cls in (IGCV1, IGCV2, IGCV3)}


def make_block(kind: str, conv: nn.Conv2d, shape: dict[str, Any], *, fit: bool = True,
               name: str | None = None, **fit_kwargs: Any) -> IGCBlock:
    """Factory: the block of ``kind`` with ``shape`` replacing ``conv`` (fitted unless ``fit=False``)."""
    if kind not in BLOCKS:
        raise ConfigError(f"unknown block kind {kind!r}; choose from {sorted(BLOCKS)}", layer=name)
    try:
        return BLOCKS[kind].from_conv(conv, name=name, fit=fit, **fit_kwargs, **shape)
    except TypeError as err:  # a shape argument this block does not take
        raise ConfigError(f"bad {kind} shape {shape!r}: {err}", layer=name) from err


# --------------------------------------------------------------------------------- conv arithmetic
def conv_output_hw(input_hw: tuple[int, int], kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output spatial size of a conv (``padding`` may be ``'same'``/``'valid'``)."""
    k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
    if padding == "same":
        return tuple(input_hw)
    p = (0, 0) if padding == "valid" else _pair(padding)
    return tuple((input_hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def conv_macs(in_channels: int, out_channels: int, kernel_size, groups: int, output_hw: tuple[int, int]) -> int:
    """MACs of one conv: each output element costs ``C_in/groups · kh · kw`` multiply-adds."""
    return out_channels * (in_channels // groups) * math.prod(_pair(kernel_size)) * math.prod(output_hw)


def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, like: nn.Module) -> Tensor:
    """``F.conv2d`` of ``weight`` with the stride, padding, padding mode, dilation and groups of ``like``
    (a ``Conv2d`` or a block; what ``nn.Conv2d`` computes, without needing one)."""
    stride, padding, dilation = like.stride, like.padding, like.dilation
    groups = getattr(like, "groups", 1)
    if like.padding_mode == "zeros":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(F.pad(x, pad_amounts(weight.shape[2:], padding, dilation), mode=like.padding_mode),
                    weight, bias, stride, 0, dilation, groups)


def pad_amounts(kernel_size, padding, dilation) -> list[int]:
    """``F.pad``'s ``[left, right, top, bottom]`` for a conv's padding (``'same'``: as ``nn.Conv2d`` splits
    it, the odd pixel of an even total last)."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        out = []
        for k, d in zip(reversed(tuple(kernel_size)), reversed(_pair(dilation))):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


def dense_conv_forward(block: IGCBlock, x: Tensor) -> Tensor:
    """Reference forward: ``F.conv2d`` with the block's dense-equivalent kernel (used in tests)."""
    return conv_forward(x, block.dense_weight(), block.bias, block)

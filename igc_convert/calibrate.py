"""Calibration statistics: second moments of each conv's im2col input patches.

A ``Conv2d`` is the matrix ``W`` (``C_out × C_in·kh·kw``) applied to every im2col patch ``p`` of its
input, the patch ordered ``(c_in, ky, kx)`` exactly as ``F.unfold`` orders it (and as
:mod:`igc_convert.factorize` reads the kernel's columns). Without its bias the conv is linear, so the
expected output error of an approximation ``Ŵ`` needs only ``Σ = E[p pᵀ]`` (not centred)::

    E‖(W − Ŵ) p‖² = ‖(W − Ŵ) R‖²_F,      R Rᵀ = Σ

When something after the layer can take a constant per output channel (its bias, or the running mean
of the BatchNorm that follows), the fit uses the covariance ``Σ − μμᵀ`` instead and the mean of the
error, ``(W − Ŵ) μ``, goes there (:meth:`InputMoments.covariance`).

* :func:`collect_input_moments` — ``Σ`` and the mean ``E[p]`` for many layers in one pass over the
  calibration batches (forward pre-hooks; per image a seeded random subset of output positions; float32 matmuls into
  float64 accumulators; no activation is kept). Layers whose ``Σ`` do not fit ``memory_budget``
  together are split into groups, one pass per group.
* :func:`collect_paired_stats` and :func:`sequential_target` — the sequential (error-feedback) fit:
  the layer must map the inputs ``p̃`` it receives in the partly converted model onto the original
  layer's outputs ``W p`` on the original inputs. With ``Σ̃ = E[p̃ p̃ᵀ]`` and ``C = E[p p̃ᵀ]``
  (same images, same positions), ``W' = W C Σ̃⁻¹`` turns that into the ordinary whitened fit of
  ``W'`` under ``Σ̃``.
* :func:`bn_row_weights` and :func:`find_following_batchnorm` — the following BatchNorm's scale
  ``|γ|/σ`` per output channel, the row weights of the fit.

Positions are drawn from one ``torch.Generator`` per layer, seeded from ``seed`` and the layer's name:
the statistics of a layer do not depend on which other layers are collected with it, nor on how
the layers are grouped into passes.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import logging
import math
import operator
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .blocks import pad_amounts
from .errors import ConfigError, DataError, IGCError, ModelError
from .factorize import DEFAULT_DAMPING, finite, whitener
from .modes import eval_mode, placement

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

#: Where calibration batches come from. A list/tuple or any re-iterable (e.g. a ``DataLoader``) is
#: iterated once per pass; a callable is called once per pass and must return a fresh iterable; a
#: one-shot iterator (a generator) is accepted only when one pass suffices. Items are tensors
#: ``N × C × H × W`` (floating point), or ``(images, labels, ...)`` tuples whose first item is one.
BatchSource = Union[Sequence[Tensor], Iterable[Tensor], Callable[[], Iterable[Tensor]]]

#: Gram matrices of patches longer than twice this are summed block by block, upper blocks only.
#: 1024 rows of n-long patches per call, 2 threads (Zen 3): 256 takes n = 1024 from 0.21 to 0.14 s
#: and n = 576 from 0.063 to 0.049 s against 512, and is within 3% of it at n = 2048–4608.
_GRAM_BLOCK = 256

#: Patches gathered per matmul in :func:`collect_input_moments` are bounded to this many elements
#: (16 MiB of float32), whatever the batch size. glibc serves blocks of up to 32 MiB from its heap
#: and reuses them; a larger block is a fresh mapping whose pages the kernel faults in and zeroes
#: on every call (with 64 MiB chunks, a fifth of ResNet-50's statistics pass was system time).
_CHUNK_ELEMENTS = 1 << 22

#: The statistics pass runs each calibration batch through the model this many input elements at a
#: time (sixteen 224² RGB images). A CNN's first activations are 5–20 times its input: at 32 such
#: images each is a fresh mapping for the kernel to fault in (see above), and at a handful oneDNN's
#: convolutions run less efficiently. ResNet-50's statistics pass, 256 images, 2 threads, medians of
#: three alternated runs: 35.6 s at 32 images per forward, 34.9 s at 6, 33.2 s at 16. Every pass
#: (:func:`_iterate`) takes batches in parts of this size; the sequential statistics keep their
#: activations so (the whole sequential conversion: 159.5 s at 32 images, 153.4 s at 16, 152.2 s at 8;
#: one run each).
_FORWARD_ELEMENTS = 16 * 3 * 224 * 224

_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


# ------------------------------------------------------------------------------------ patch geometry
@dataclass(frozen=True)
class _Geometry:
    """How a conv cuts its input into im2col patches (padding already resolved to numbers)."""

    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom
    pad_mode: str                    # F.pad mode

    @classmethod
    def of(cls, conv: nn.Conv2d | nn.Linear) -> "_Geometry":
        if isinstance(conv, nn.Linear):  # its input rows are the patches of a 1×1 conv
            return cls(conv.in_features, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), "constant")
        pad = tuple(pad_amounts(conv.kernel_size, conv.padding, conv.dilation))
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return cls(conv.in_channels, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), pad, mode)

    @property
    def size(self) -> int:
        """Length of one patch, ``C_in·kh·kw``."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        hp, wp = h + self.pad[2] + self.pad[3], w + self.pad[0] + self.pad[1]
        return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1

    def pad_input(self, x: Tensor) -> Tensor:
        if not any(self.pad):
            return x
        return F.pad(x, self.pad, mode=self.pad_mode)

    def gather(self, xp: Tensor, img: Tensor, oy: Tensor, ox: Tensor) -> Tensor:
        """Patches of the padded input ``xp`` at output positions ``(img, oy, ox)``: ``S × n``, ordered
        ``(ky, kx, c)`` (a channels-last gather; :meth:`to_unfold_order` maps moments to unfold's order)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        dev = xp.device
        rows = oy.to(dev)[:, None] * sh + torch.arange(kh, device=dev) * dh  # (S, kh)
        cols = ox.to(dev)[:, None] * sw + torch.arange(kw, device=dev) * dw  # (S, kw)
        p = xp.permute(0, 2, 3, 1)[img.to(dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return p.reshape(p.shape[0], -1)

    def vector_to_unfold_order(self, v: Tensor) -> Tensor:
        """A gathered ``(ky, kx, c)`` patch vector in unfold's ``(c, ky, kx)`` order; for a matrix, each row."""
        (kh, kw), c = self.kernel_size, self.in_channels
        lead = v.shape[:-1]
        return v.reshape(*lead, kh, kw, c).movedim(-1, -3).reshape(*lead, self.size)

    def to_unfold_order(self, m: Tensor) -> Tensor:
        """``n × n`` moment of gathered ``(ky, kx, c)`` patches → the same in unfold's ``(c, ky, kx)`` order."""
        (kh, kw), c = self.kernel_size, self.in_channels
        # An axis permutation of both sides: one contiguous copy (always a copy: callers modify it in
        # place), much faster than m[π][:, π].
        m = m.reshape(kh, kw, c, kh, kw, c).permute(2, 0, 1, 5, 3, 4)
        return m.clone(memory_format=torch.contiguous_format).reshape(self.size, self.size)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    # crc32, not hash(): Python's string hash changes from one process to the next.
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))


def _sample_positions(n_img: int, hw: tuple[int, int], k: int, gen: torch.Generator
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``(img, oy, ox)`` of at most ``k`` distinct output positions per image (all when fewer)."""
    h, w = hw
    total = h * w
    if total <= k:
        img = torch.arange(n_img).repeat_interleave(total)
        pos = torch.arange(total).repeat(n_img)
    else:
        pos = torch.rand(n_img, total, generator=gen).topk(k, dim=1).indices.reshape(-1)
        img = torch.arange(n_img).repeat_interleave(k)
    return img, pos // w, pos % w


def _hook_input(layer: str, geom: _Geometry, args: tuple, kwargs: dict) -> Tensor:
    x = args[0] if args else kwargs.get("input")
    if not torch.is_tensor(x) or x.dim() not in (3, 4):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise DataError(f"expected a 4-d input N×C×H×W, got {shape}", layer=layer)
    if x.dim() == 3:  # Conv2d accepts unbatched C×H×W input
        x = x[None]
    if x.shape[1] != geom.in_channels:
        raise DataError(f"expects {geom.in_channels} input channels, got an input of shape {tuple(x.shape)}",
                        layer=layer)
    oh, ow = geom.output_hw(x.shape[2], x.shape[3])
    if oh < 1 or ow < 1:
        raise DataError(f"input of shape {tuple(x.shape)} is smaller than the kernel {geom.kernel_size} "
                        f"(dilation {geom.dilation}, padding {geom.pad})", layer=layer)
    return x


class _Gram:
    """Running sum of ``pᵀ p`` (float64) over row blocks of patches ``p``.

    For long patches only the upper block triangle is computed (``Σ`` is symmetric): ~55% of the
    flops of the full product for 4608-long patches, where this matmul is most of the cost.
    """

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.block = n if n <= 2 * _GRAM_BLOCK else _GRAM_BLOCK
        self.acc = torch.zeros(n, n, dtype=torch.float64, device=device)

    def add(self, p: Tensor, scale: float = 1.0) -> None:
        """Add ``scale² · pᵀ p``: ``p`` as :func:`_unit_scale` returns it (unscaled rows may overflow)."""
        # add_ widens the float32 product inside the kernel: no float64 temporaries.
        if self.block >= self.n:
            self.acc.add_(p.T @ p, alpha=scale * scale)
            return
        for i in range(0, self.n, self.block):
            j = i + self.block
            self.acc[i:j, i:].add_(p[:, i:j].T @ p[:, i:], alpha=scale * scale)

    def total(self) -> Tensor:
        """The full sum, exactly symmetric (finished in place, block by block to stay in cache)."""
        a, b = self.acc, self.block
        for i in range(0, self.n, b):
            d = a[i:i + b, i:i + b]
            d.copy_((d + d.T).mul_(0.5))  # float32 products are only nearly symmetric
            for j in range(i + b, self.n, b):
                a[j:j + b, i:i + b] = a[i:i + b, j:j + b].T
        return a


def _unit_scale(p: Tensor, inplace: bool = False) -> tuple[Tensor, float]:
    """``(p / s, s)`` with ``s`` the power of two nearest below ``max|p|`` (1 when there is none).

    Products of float32 activations overflow from about 1e19 and underflow below 1e-19, far inside
    the range of the activations themselves: the matmuls run on ``p / s`` (exact: a power of two)
    and the float64 accumulators take the ``s²`` back, so the statistics do not depend on the scale.
    ``inplace`` divides ``p`` itself (a freshly gathered chunk): no copy of it is made.
    """
    if not p.numel():
        return p, 1.0
    low, high = torch.aminmax(p)  # no |p| temporary as large as p
    top = max(-float(low), float(high))
    if not (top > 0 and math.isfinite(top)):
        return p, 1.0
    s = 2.0 ** math.floor(math.log2(top))
    if s == 1.0:
        return p, 1.0
    return (p.mul_(1 / s) if inplace else p * (1 / s)), s


def _finish(geom: _Geometry, acc: Tensor, count: int) -> Tensor:
    """Accumulated sum → mean, in unfold order, on the CPU."""
    return geom.to_unfold_order(acc.cpu()).div_(count)


def _minus_outer(m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``m − a bᵀ`` (float64), making one ``n × n`` tensor where ``m - torch.outer(a, b)`` makes two: the
    same bits (``−x + m`` is ``m − x``), so exactly symmetric when ``m`` is and ``a`` is ``b``."""
    return torch.outer(a.to(torch.float64), b.to(torch.float64)).neg_().add_(m)


def _symmetric(m: Tensor) -> Tensor:
    """``m`` itself when exactly symmetric (as collected), else ``(m + mᵀ) / 2``: a comparison instead of
    two ``n × n`` temporaries for the 4608-wide moments of a 3×3 conv."""
    return m if torch.equal(m, m.mT) else 0.5 * (m + m.mT)


def _matmul_dtype(x: Tensor) -> torch.dtype:
    # float32 matmuls are the speed we want; a float64 model keeps its precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ model plumbing
class _StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward is not computed."""


def _conv(model: nn.Module, name: str, what: str = "layer") -> nn.Conv2d:
    module = _module(model, name, what)
    if not isinstance(module, nn.Conv2d):
        raise ConfigError(f"{what} {name!r} is a {type(module).__name__}, not an nn.Conv2d", layer=name or None)
    return module


def _module(model: nn.Module, name: str, what: str = "layer") -> nn.Module:
    if not isinstance(name, str):
        raise ConfigError(f"{what} names must be strings (qualified module names), got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"no {what} named {name!r} in the model (expected a qualified module name such as "
                          f"'layer1.0.conv1')") from None


class BatchNormLeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every BatchNorm subclass as one call.

    torch.fx traces into modules defined outside ``torch.nn``, so timm's ``BatchNormAct2d`` (a
    ``BatchNorm2d`` that applies its activation too) would become functional calls and the conv
    before it would not be seen to feed a BatchNorm: no per-channel weights for the fit and no bias
    correction for EfficientNets and the other timm models. Its normalisation comes first, so what
    those use (γ, running mean and variance) means the same as in a plain BatchNorm.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                isinstance(sub, nn.Conv2d) for sub in m.modules()):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _batchnorms_folded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm that only ever normalises one conv's
    output folded into that conv; ``model`` itself when there is none or torch.fx cannot trace it.

    Statistics are of conv *inputs*, which folding leaves as they are (up to rounding), and the
    BatchNorms' passes over the activations are ~15% of ResNet-50's calibration forward on CPU.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # FX raises many types
        return model
    modules = dict(gm.named_modules())
    fed_by: dict[str, set[str | None]] = collections.defaultdict(set)   # BatchNorm → what each call normalises
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), _BATCHNORMS):
            src = node.args[0] if node.args else None
            fed_by[str(node.target)].add(str(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module"
                                         else None)
    pairs = {conv: bn for conv, bn in find_following_batchnorm(gm).items()
             if fed_by[bn] == {conv} and modules[bn].running_mean is not None and modules[bn].running_var is not None}
    if not pairs:
        return model
    try:
        folded = copy.deepcopy(model)
        for conv, bn in pairs.items():
            folded.set_submodule(conv, torch.nn.utils.fusion.fuse_conv_bn_eval(folded.get_submodule(conv),
                                                                               folded.get_submodule(bn)))
            folded.set_submodule(bn, nn.Identity())
    except Exception:  # e.g. a parametrised conv: run the model as it is
        return model
    return folded


def _channels_last_works(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model`` runs on a channels-last copy of one image of ``x`` (call before any hook).

    On CPU, oneDNN's convolutions are ~25% faster in channels-last layout, and the patch gather reads
    channels-last anyway. A model that reshapes with ``.view`` can reject that layout; it then runs
    as given. Layout does not change what a model computes, only the rounding.
    """
    if x.dim() != 4:
        return False
    try:
        model(x[:1].clone(memory_format=torch.channels_last))
    except Exception:
        return False
    return True


def _images_per_forward(x: Tensor) -> int:
    """How many images of the batch ``x`` one forward of the statistics pass takes (see :data:`_FORWARD_ELEMENTS`)."""
    return max(1, _FORWARD_ELEMENTS // max(1, x[0].numel()))


def _forward(model: nn.Module, x: Tensor, channels_last: bool = False) -> bool:
    """Run ``model(x)``; True when a hook stopped it early. Foreign errors become :class:`DataError`."""
    try:  # on a copy: a model that modifies its input in place must not change the caller's batches
        model(x.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format))
    except _StopForward:
        return True
    except IGCError:
        raise
    except Exception as exc:  # the model rejected the batch: say which shape it was given
        raise DataError(f"the model failed on a calibration batch of shape {tuple(x.shape)} ({x.dtype}): "
                        f"{type(exc).__name__}: {exc}") from exc
    return False


# ------------------------------------------------------------------------------------ batches
def _passes_possible(batches: BatchSource, passes: int) -> None:
    if torch.is_tensor(batches):
        raise DataError(f"batches is a single tensor of shape {tuple(batches.shape)}; pass a list of batches, "
                        "e.g. [x]")
    if passes > 1 and isinstance(batches, collections.abc.Iterator):
        raise DataError(f"batches is a one-shot iterator ({type(batches).__name__}) but {passes} passes are "
                        "needed (see memory_budget); pass a list, a DataLoader, or a callable returning a "
                        "fresh iterator")


def _iterate(batches: BatchSource, dtype: torch.dtype, device: torch.device, progress: bool,
             desc: str) -> Iterator[Tensor]:
    """Validated batches on ``device`` in ``dtype``, with a progress bar; DataError on an empty source.

    A batch larger than :data:`_FORWARD_ELEMENTS` comes in parts (every pass runs the model on what
    this yields)."""
    source = batches() if callable(batches) and not isinstance(batches, collections.abc.Iterable) else batches
    if torch.is_tensor(source) or not isinstance(source, collections.abc.Iterable):
        raise DataError(f"batches must be an iterable of tensors (or a callable returning one), "
                        f"got {type(source).__name__}")
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None
    count = 0
    for index, item in enumerate(tqdm(source, total=total, desc=desc, unit="batch", disable=not progress,
                                      leave=False)):
        x = _check_batch(item, index, dtype, device)
        yield from x.split(_images_per_forward(x))
        count += 1
    if count == 0:
        raise DataError("no calibration batches: the batch source is empty")


def _check_batch(item: Any, index: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = item
    if isinstance(x, (tuple, list)) and x and torch.is_tensor(x[0]):
        x = x[0]  # (images, labels) as a DataLoader yields them
    if not torch.is_tensor(x):
        raise DataError(f"calibration batch {index} is a {type(x).__name__}, expected a tensor N×C×H×W")
    if x.dim() != 4:
        hint = " (add a batch dimension: x[None])" if x.dim() == 3 else ""
        raise DataError(f"calibration batch {index} has shape {tuple(x.shape)}, expected 4 dims N×C×H×W{hint}")
    if not x.is_floating_point():
        raise DataError(f"calibration batch {index} has dtype {x.dtype}, expected floating point "
                        "(e.g. images.float() / 255)")
    if x.shape[0] == 0:
        raise DataError(f"calibration batch {index} has shape {tuple(x.shape)}: no images")
    if not finite(x):
        raise DataError(f"calibration batch {index} (shape {tuple(x.shape)}) contains NaN or Inf")
    return x.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ one-model stats
class _LayerStats:
    """Hook state of one layer: its accumulator of ``Σ`` (gathered order), patch count, generator."""

    def __init__(self, name: str, conv: nn.Conv2d, max_positions: int, seed: int) -> None:
        self.name = name
        self.geom = _Geometry.of(conv)
        self.k = max_positions
        self.gen = _layer_generator(seed, name)
        self.gram: _Gram | None = None
        self.sum: Tensor | None = None
        self.count = 0

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _hook_input(self.name, self.geom, args, kwargs)
        img, oy, ox = _sample_positions(x.shape[0], self.geom.output_hw(x.shape[2], x.shape[3]), self.k, self.gen)
        xp = self.geom.pad_input(x)
        n = self.geom.size
        if self.gram is None:
            self.gram = _Gram(n, x.device)
            self.sum = torch.zeros(n, dtype=torch.float64, device=x.device)
        dtype = _matmul_dtype(x)
        step = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, len(img), step):
            sl = slice(start, start + step)
            p, s = _unit_scale(self.geom.gather(xp, img[sl], oy[sl], ox[sl]).to(dtype), inplace=True)
            self.gram.add(p, s)
            self.sum.add_(p.sum(0), alpha=s)  # a float32 (pairwise) sum per chunk: 13× faster than in float64
        self.count += len(img)

    def result(self) -> InputMoments:
        if self.count == 0 or self.gram is None:
            raise ConfigError("never ran during the model's forward pass (is it used by forward()?)",
                              layer=self.name)
        sigma = _finish(self.geom, self.gram.total(), self.count)
        mean = self.geom.vector_to_unfold_order(self.sum.cpu()).div_(self.count)
        if not (finite(sigma) and finite(mean)):
            raise DataError("input statistics are not finite (activations overflowed; check the input scale)",
                            layer=self.name)
        return InputMoments(sigma, mean, self.count)


@dataclass(frozen=True)
class InputMoments:
    """First and second moments of one layer's im2col input patches (float64, CPU, unfold order).

    ``sigma = E[p pᵀ]`` (not centred), ``mean = E[p]``, over ``count`` sampled patches.
    """

    sigma: Tensor
    mean: Tensor
    count: int

    def covariance(self) -> Tensor:
        """``E[(p − μ)(p − μ)ᵀ] = Σ − μ μᵀ``: the statistics of a fit whose bias takes the mean.

        With ``δ = (W − Ŵ) μ`` added to the layer's output, ``E‖W p − Ŵ p − δ‖² = ‖(W − Ŵ) R_c‖²``,
        ``R_c R_cᵀ`` this matrix: the rank of the fit goes to how the inputs *vary*, not to their mean
        (large and positive after a ReLU), which the bias reproduces exactly.
        """
        # One n×n allocation: with Σ exactly symmetric (as collected) so is Σ − μμᵀ, μ_i·μ_j being μ_j·μ_i.
        return _symmetric(_minus_outer(self.sigma, self.mean, self.mean))


def stats_bytes(conv: nn.Conv2d | nn.Linear) -> int:
    """Bytes of one float64 ``n × n`` input-statistics matrix of ``conv`` (``n = C_in/groups · kh · kw``,
    ``in_features`` for a Linear)."""
    return _Geometry.of(conv).size ** 2 * 8


def _groups(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """First-fit decreasing: few passes, each holding accumulators of at most ``budget`` bytes."""
    bins: list[tuple[int, list[str]]] = []
    for name in sorted(names, key=lambda n: -sizes[n]):
        for i, (used, members) in enumerate(bins):
            if used + sizes[name] <= budget:
                bins[i] = (used + sizes[name], members + [name])
                break
        else:
            if sizes[name] > budget:
                logger.warning("layer %s needs %.1f MiB of statistics, more than memory_budget (%.1f MiB); "
                               "it gets a pass of its own", name, sizes[name] / 2**20, budget / 2**20)
            bins.append((sizes[name], [name]))
    order = {n: i for i, n in enumerate(names)}
    return sorted((sorted(m, key=order.__getitem__) for _, m in bins), key=lambda g: order[g[0]])


def collect_input_stats(model: nn.Module, layers: Sequence[str], batches: BatchSource, *,
                        max_positions: int = 64, memory_budget: int = 1 << 31, seed: int = 0,
                        progress: bool = True, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """``Σ = E[p pᵀ]`` over the im2col input patches of every named ``Conv2d``, float64 on the CPU.

    :func:`collect_input_moments` without the means; same arguments.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> stats = collect_input_stats(net, ["0", "2"], [torch.randn(2, 3, 8, 8)], progress=False)
    >>> {name: tuple(s.shape) for name, s in stats.items()}
    {'0': (27, 27), '2': (72, 72)}
    """
    moments = collect_input_moments(model, layers, batches, max_positions=max_positions,
                                    memory_budget=memory_budget, seed=seed, progress=progress, device=device)
    return {name: m.sigma for name, m in moments.items()}


def collect_input_moments(model: nn.Module, layers: Sequence[str], batches: BatchSource, *,
                          max_positions: int = 64, memory_budget: int = 1 << 31, seed: int = 0,
                          progress: bool = True, device: torch.device | str | None = None
                          ) -> dict[str, InputMoments]:
    """:class:`InputMoments` (``E[p pᵀ]`` and ``E[p]``) of the im2col input patches of every named ``Conv2d``.

    ``batches`` (see :data:`BatchSource`) is iterated once per pass; one pass suffices unless the
    ``n² · 8`` bytes of all accumulators exceed ``memory_budget``, in which case layers are grouped
    and a list, ``DataLoader`` or callable is needed. Per image and per call at most
    ``max_positions`` output positions are sampled (all when fewer); a conv called several times per
    forward accumulates over every call. Batches are cast to the model's dtype and sent to ``device``
    (default: the model's); the model is not moved. The model runs in eval mode under
    ``torch.no_grad()``; every module's mode is restored and every hook removed afterwards.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> m = collect_input_moments(net, ["2"], [torch.randn(2, 3, 8, 8)], progress=False)["2"]
    >>> tuple(m.sigma.shape), tuple(m.mean.shape), bool((m.mean >= 0).all())   # after a ReLU
    ((72, 72), (72,), True)
    """
    if int(max_positions) < 1:
        raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
    if not int(memory_budget) > 0:
        raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    if isinstance(layers, str):
        layers = [layers]
    names = list(dict.fromkeys(layers))  # de-duplicated, in the caller's order
    convs = {name: _conv(model, name) for name in names}
    if not names:
        return {}
    sizes = {name: stats_bytes(conv) for name, conv in convs.items()}
    groups = _groups(names, sizes, int(memory_budget))
    _passes_possible(batches, len(groups))
    if len(groups) > 1:
        logger.info("statistics of %d layers need %.1f MiB, over memory_budget (%.1f MiB): %d passes over the "
                    "calibration data", len(names), sum(sizes.values()) / 2**20, memory_budget / 2**20, len(groups))
    dev, dtype = placement(model, device)
    out: dict[str, InputMoments] = {}
    channels_last = None
    with torch.no_grad(), eval_mode(model):
        run = _batchnorms_folded(model)
        convs = {name: _conv(run, name) for name in names}
        for g, group in enumerate(groups):
            stats = [_LayerStats(name, convs[name], int(max_positions), seed) for name in group]
            handles = []
            try:
                desc = "calibration" if len(groups) == 1 else f"calibration pass {g + 1}/{len(groups)}"
                for x in _iterate(batches, dtype, dev, progress, desc):
                    if not handles:  # first batch: probe the layout before any hook can count it
                        if channels_last is None:
                            channels_last = _channels_last_works(run, x)
                        handles = [convs[s.name].register_forward_pre_hook(s.hook, with_kwargs=True)
                                   for s in stats]
                    _forward(run, x, channels_last)
            finally:
                for h in handles:
                    h.remove()
            for s in stats:
                out[s.name] = s.result()
    return {name: out[name] for name in names}


# ------------------------------------------------------------------------------------ paired stats
@dataclass(frozen=True)
class PairedStats:
    """Statistics of one layer's inputs in two models at the same images and positions (float64).

    ``sigma_actual = E[p̃ p̃ᵀ]`` (the partly converted model's patches), ``cross = E[p p̃ᵀ]``
    (original × converted), ``sigma_original = E[p pᵀ]``; ``count`` patches were averaged.
    ``mean_actual = E[p̃]`` and ``mean_original = E[p]`` (unfold order) give the bias correction
    :func:`output_shift`; ``None`` where they were not collected.

    ``merge_cross = E[e p̃ᵀ]`` (``C_out × n``) and ``merge_mean = E[e]``: where the layer's output
    reaches a residual addition (through its BatchNorm, if any), ``e`` is what the *other* addend of
    the partly converted model misses, ``(s − s̃) / a`` in the layer's output units (``a`` the
    BatchNorm's per-channel scale), at the same positions. The sequential fit then aims at ``W p + e``,
    so that the sum matches the original's (:func:`sequential_target`). ``merge_original = E[e pᵀ]``
    and ``merge_energy = E‖e‖²`` complete the error at the sum. ``None`` elsewhere. ``folds``: the same
    statistics of two halves of the batches (alternate batches), for :func:`merge_weight`; empty when
    there is no residual term or a single batch. ``centred``: the second moments are covariances
    (:meth:`centred_moments`); the means stay as collected.
    """

    sigma_actual: Tensor
    cross: Tensor
    sigma_original: Tensor
    count: int
    mean_actual: Tensor | None = None
    mean_original: Tensor | None = None
    merge_cross: Tensor | None = None
    merge_mean: Tensor | None = None
    merge_original: Tensor | None = None
    merge_energy: float | None = None
    folds: tuple["PairedStats", ...] = ()
    centred: bool = False

    def centred_moments(self) -> "PairedStats":
        """The same statistics with every second moment centred (``E[(a − E a)(b − E b)ᵀ]``), folds too.

        For a layer whose output shift :func:`output_shift` will absorb: the sequential fit of
        ``W p + e ≈ Ŵ p̃ + b`` then chooses ``Ŵ`` and ``b`` together, so that the fit's rank goes to
        how the inputs vary rather than to their mean, and every error computed from these
        statistics is the error after the shift. Unchanged when the means were not collected.
        """
        if self.centred or self.mean_actual is None or self.mean_original is None:
            return self
        f64 = torch.float64
        mu_a, mu_o = self.mean_actual.to(f64), self.mean_original.to(f64)
        merge: dict[str, Any] = {}
        if self.merge_cross is not None and self.merge_mean is not None:
            mu_e = self.merge_mean.to(f64)
            merge = dict(merge_cross=_minus_outer(self.merge_cross, mu_e, mu_a),
                         merge_original=(None if self.merge_original is None
                                         else _minus_outer(self.merge_original, mu_e, mu_o)),
                         merge_energy=(None if self.merge_energy is None
                                       else self.merge_energy - float(mu_e.pow(2).sum())))
        return replace(self, sigma_actual=_minus_outer(self.sigma_actual, mu_a, mu_a),
                       cross=_minus_outer(self.cross, mu_o, mu_a),
                       sigma_original=_minus_outer(self.sigma_original, mu_o, mu_o),
                       folds=tuple(f.centred_moments() for f in self.folds), centred=True, **merge)


class _Capture:
    """Pre-hook that gathers one layer's sampled patches, then stops the forward."""

    def __init__(self, layer: str, geom: _Geometry, positions: tuple | None, gen: torch.Generator, k: int,
                 expect_shape: torch.Size | None) -> None:
        self.layer, self.geom, self.positions, self.gen, self.k = layer, geom, positions, gen, k
        self.expect_shape = expect_shape
        self.patches: Tensor | None = None
        self.shape: torch.Size | None = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.patches is not None:  # a forward that swallowed the stop: keep the first call's patches
            raise _StopForward
        x = _hook_input(self.layer, self.geom, args, kwargs)
        if self.expect_shape is not None and x.shape != self.expect_shape:
            raise ModelError(f"the converted model feeds this layer an input of shape {tuple(x.shape)}, the "
                             f"original one of shape {tuple(self.expect_shape)}", layer=self.layer)
        if self.positions is None:
            hw = self.geom.output_hw(x.shape[2], x.shape[3])
            self.positions = _sample_positions(x.shape[0], hw, self.k, self.gen)
        self.shape = x.shape
        self.patches = self.geom.gather(self.geom.pad_input(x), *self.positions).to(_matmul_dtype(x))
        raise _StopForward


def _run_to(model: nn.Module, module: nn.Module, x: Tensor, hook: Callable, channels_last: bool = False) -> None:
    """Run ``model(x)`` with ``hook`` as a pre-hook of ``module`` (a capture that stops the forward)."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward(model, x, channels_last)
    finally:
        handle.remove()


def _capture(model: nn.Module, module: nn.Module, x: Tensor, capture: _Capture, channels_last: bool) -> Tensor:
    _run_to(model, module, x, capture.hook, channels_last)
    if capture.patches is None:
        raise ConfigError("never ran during the model's forward pass (is it used by forward()?)",
                          layer=capture.layer)
    return capture.patches


def collect_paired_stats(original: nn.Module, converted: nn.Module, layer: str, batches: BatchSource, *,
                         max_positions: int = 64, seed: int = 0, progress: bool = True,
                         device: torch.device | str | None = None) -> PairedStats:
    """Joint input statistics of ``layer`` in ``original`` and in the partly ``converted`` model.

    ``layer`` names a ``Conv2d`` of ``original``; in ``converted`` the module of the same name (still
    that dense conv, or anything taking the same input) is hooked for its input. Both models see the
    same batches and the patches are taken at the same sampled positions, so ``cross`` pairs each
    original patch with its converted counterpart. Each forward stops as soon as the layer's input
    has been captured (a shared conv contributes its first call only). ``batches`` is iterated once.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> st = collect_paired_stats(net, net, "2", [torch.randn(2, 3, 10, 10)], progress=False)
    >>> bool(torch.equal(st.cross, st.sigma_actual)), st.count
    (True, 72)
    """
    if int(max_positions) < 1:
        raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
    conv = _conv(original, layer)
    target = _module(converted, layer, "layer of the converted model")
    geom = _Geometry.of(conv)
    _passes_possible(batches, 1)
    gen = _layer_generator(seed, layer)
    dev, dtype = placement(original, device)
    sums = _PairedSums(layer, geom, dev)
    converted_dtype = placement(converted, dev)[1]
    with torch.no_grad(), eval_mode(original, converted):
        layouts = None
        for x in _iterate(batches, dtype, dev, progress, f"paired statistics {layer}"):
            if layouts is None:
                layouts = _channels_last_works(original, x), _channels_last_works(converted, x.to(converted_dtype))
            orig = _Capture(layer, geom, None, gen, int(max_positions), None)
            p = _capture(original, conv, x, orig, layouts[0])
            same = _Capture(layer, geom, orig.positions, gen, int(max_positions), orig.shape)
            sums.add(p, _capture(converted, target, x.to(converted_dtype), same, layouts[1]))
    return sums.result()


class _PairedSums:
    """Running sums of one layer's paired patches: ``Σ̃``, ``Σ``, ``C`` (float64) and both means."""

    def __init__(self, layer: str, geom: _Geometry, device: torch.device) -> None:
        n = geom.size
        self.layer, self.geom = layer, geom
        self.actual, self.original = _Gram(n, device), _Gram(n, device)
        self.cross = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.sum_actual = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_original = torch.zeros(n, dtype=torch.float64, device=device)
        self.merge_cross: Tensor | None = None
        self.merge_original: Tensor | None = None
        self.merge_sum: Tensor | None = None
        self.merge_energy = 0.0
        self.count = 0

    def _add_merge(self, e: Tensor, ps: Tensor, so: float, pts: Tensor, st: float) -> None:
        """The other addend's miss ``e`` (``S × C_out``) at the positions of the patches, scaled as
        :func:`_unit_scale` returns them (``ps · so`` and ``pts · st``)."""
        e = e.to(device=pts.device, dtype=pts.dtype)
        if self.merge_cross is None:
            self.merge_cross = torch.zeros(e.shape[1], pts.shape[1], dtype=torch.float64, device=pts.device)
            self.merge_original = torch.zeros_like(self.merge_cross)
            self.merge_sum = torch.zeros(e.shape[1], dtype=torch.float64, device=pts.device)
        es, s = _unit_scale(e)
        self.merge_cross.add_(es.T @ pts, alpha=s * st)
        self.merge_original.add_(es.T @ ps, alpha=s * so)
        self.merge_sum += e.sum(0, dtype=torch.float64)
        self.merge_energy += float(e.to(torch.float64).pow(2).sum())

    def drop_merge(self) -> None:
        self.merge_cross = self.merge_original = self.merge_sum = None

    def add(self, p: Tensor, pt: Tensor, miss: Tensor | None = None) -> None:
        """Original patches ``p`` and the converted model's ``pt`` at the same images and positions, and
        the other addend's ``miss`` there where the layer feeds a residual addition."""
        pt = pt.to(device=p.device, dtype=p.dtype)
        (ps, s), (pts, st) = _unit_scale(p), _unit_scale(pt)
        self.actual.add(pts, st)
        self.original.add(ps, s)
        self.cross.add_(ps.T @ pts, alpha=s * st)
        self.sum_actual += pt.sum(0, dtype=torch.float64)
        self.sum_original += p.sum(0, dtype=torch.float64)
        self.count += p.shape[0]
        if miss is not None:
            self._add_merge(miss, ps, s, pts, st)

    def result(self) -> PairedStats:
        geom, count, out = self.geom, self.count, {}
        for key, a in (("actual", self.actual.total()), ("cross", self.cross), ("original", self.original.total())):
            m = _finish(geom, a, count)
            if not finite(m):
                raise DataError("paired input statistics are not finite (activations overflowed)", layer=self.layer)
            out[key] = m
        means = [geom.vector_to_unfold_order(v.cpu()) / count for v in (self.sum_actual, self.sum_original)]
        if not all(finite(v) for v in means):
            raise DataError("paired input means are not finite (activations overflowed)", layer=self.layer)
        merge: tuple = ()
        if self.merge_cross is not None:
            merge = (geom.vector_to_unfold_order(self.merge_cross.cpu()) / count, self.merge_sum.cpu() / count,
                     geom.vector_to_unfold_order(self.merge_original.cpu()) / count, self.merge_energy / count)
            if not all(finite(torch.as_tensor(m)) for m in merge):
                raise DataError("residual statistics are not finite (activations overflowed)", layer=self.layer)
        return PairedStats(out["actual"], out["cross"], out["original"], count, *means, *merge)


class _Runner(torch.fx.Interpreter):
    """Runs a traced graph node by node on the modules and attributes ``root`` has *now*.

    The graph is the original model's; run on the partly converted model, a swapped-in block is
    called where its conv was (same qualified name).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, root: nn.Module) -> None:
        super().__init__(graph_module, garbage_collect_values=True)
        self.root = root

    def fetch_attr(self, target: str) -> Any:
        obj = self.root
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return obj

    def advance(self, env: dict, nodes: Sequence[torch.fx.Node]) -> None:
        """Run ``nodes`` (in graph order) on the values in ``env``; free those no longer used."""
        self.env = env
        for node in nodes:
            env[node] = self.run_node(node)
            for dead in self.user_to_last_uses.get(node, ()):
                del env[dead]


def _advance(runner: _Runner, env: dict, nodes: Sequence[torch.fx.Node], layer: str) -> None:
    """:meth:`_Runner.advance`, a failure of the model itself reported as a ``DataError`` on ``layer``."""
    try:
        runner.advance(env, nodes)
    except IGCError:
        raise
    except Exception as exc:
        raise DataError(f"the model failed on a calibration batch: {type(exc).__name__}: {exc}", layer=layer) from exc


def _available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (a CUDA device's free memory, else the host's MemAvailable; 8 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def _storage_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct tensor storages among ``values`` (views and in-place results count once)."""
    seen: dict[int, int] = {}
    for v in values:
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if torch.is_tensor(t):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


_ADDITIONS = (operator.add, operator.iadd, torch.add)
_IN_PLACE_OPERATORS = frozenset(getattr(operator, f"i{op}") for op in (
    "add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift"))


@dataclass(frozen=True)
class _Merge:
    """Where a layer's output, through its BatchNorm if any, is added to another branch."""

    inverse_scale: Tensor                 # 1 / a per output channel (0 where |a| < 1e-3 max |a|), float64
    other: torch.fx.Node                  # the other addend
    nodes: tuple[torch.fx.Node, ...]      # nodes after the layer that the other addend needs, in order


def _affine_batchnorm(module: nn.Module | None) -> bool:
    """A BatchNorm that is only its per-channel affine map in eval mode: ``nn.BatchNorm2d`` itself, or
    timm's ``BatchNormAct2d`` whose activation and dropout are ``nn.Identity`` (other subclasses may
    add anything to their forward)."""
    if type(module) in _BATCHNORMS:
        return True
    return (isinstance(module, _BATCHNORMS) and type(module).__name__ == "BatchNormAct2d"
            and isinstance(getattr(module, "act", None), nn.Identity)
            and isinstance(getattr(module, "drop", None), nn.Identity))


def _find_merge(nodes: Sequence[torch.fx.Node], index: int, modules: Mapping[str, nn.Module],
                order: Mapping[torch.fx.Node, int]) -> _Merge | None:
    """The residual addition ``nodes[index]`` (a conv) feeds, if its output goes nowhere else.

    The path is conv → (BatchNorm2d with running statistics) → add, each the only user of the one
    before (``nn.Identity`` modules on the way are passed over); ``a = γ / sqrt(var + eps)`` of that
    BatchNorm (1 without one) converts the other addend's miss into the conv's output units.
    Channels whose ``|a|`` is under 1e-3 of the largest get no correction: the fit clamps its row
    weights there (:mod:`igc_convert.factorize`), so it would over-weight their huge ``e / a``. A
    BatchNorm whose ``γ`` is zero everywhere (a zero-initialised residual branch) gets none at all.
    """
    chain = nodes[index]
    conv = modules[str(chain.target)]
    scale = torch.ones(conv.out_channels, dtype=torch.float64)
    seen_bn = False
    while True:
        users = list(chain.users)
        if len(users) != 1:
            return None
        user = users[0]
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, nn.Identity):  # e.g. a drop-path that is off
            chain = user
        elif _affine_batchnorm(module) and not seen_bn:
            if user.args[:1] != (chain,) or module.running_var is None or module.num_features != conv.out_channels:
                return None
            scale = 1 / torch.sqrt(module.running_var.detach().to(torch.float64).cpu() + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.detach().to(torch.float64).cpu()
            chain, seen_bn = user, True
        else:
            break
    add = user
    if not ((add.op == "call_function" and add.target in _ADDITIONS)
            or (add.op == "call_method" and add.target in ("add", "add_"))):
        return None
    others = [a for a in add.args if a is not chain]
    if add.kwargs or len(add.args) != 2 or len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return None
    needed, stack = set(), [others[0]]
    while stack:  # what the other addend needs that is computed after the conv
        n = stack.pop()
        if order[n] > index and n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    if not torch.isfinite(scale).all() or any(_mutates_input(n, modules) and n.args and n.args[0] not in needed
                                               for n in needed):
        return None  # running ahead would change a value the resumed forward still needs
    if not float(scale.abs().max()) > 0:
        return None  # γ = 0 everywhere (zero-init residual): the conv adds nothing to the sum to correct with
    big = scale.abs() >= 1e-3 * float(scale.abs().max())
    inverse = torch.where(big, 1 / torch.where(big, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return _Merge(inverse, others[0], tuple(sorted(needed, key=order.__getitem__)))


def _mutates_input(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` may write into its first argument (``relu_``, ``x += y``, ``ReLU(inplace=True)``)."""
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (name.endswith("_") and not name.endswith("__")
                                           or node.target in _IN_PLACE_OPERATORS)


class SequentialStats:
    """Paired statistics (:func:`collect_paired_stats`) of layers fitted one after another, each forward
    resumed where the previous layer's stopped.

    :func:`collect_paired_stats` runs both models from the input up to the layer, for every layer:
    about one full forward of each model per converted layer (17 minutes of ResNet-50's conversion
    with 256 images). Here the original model's ``torch.fx`` graph is run on both models a segment at
    a time: per calibration batch, the values live at the current point of the graph are kept (for
    each model), and asking for the next layer only runs the nodes up to it. Both models are run
    once in all. The converted model's blocks are called where their convs were, so a layer fitted and
    swapped in before the next request is what the later layers see. Positions and generators are
    those of :func:`collect_paired_stats`: the statistics are the same.

    Where a layer's output is added to another branch (a residual block's last conv), the other
    addend is computed in both models too, and what the converted one misses is collected as
    ``merge_cross`` / ``merge_mean`` (:class:`PairedStats`): the fit then makes up for the shortcut's
    error as well as its own, so the *sum* matches the original's (``residual=False`` turns this off).

    Layers must be asked for in graph order, each a ``Conv2d`` called once. :meth:`create` returns
    None (and logs why) when the model cannot be traced, or when the kept values would exceed
    ``memory_budget`` bytes (estimated on the first batch; default: half the memory available on the
    device); callers then use :func:`collect_paired_stats`.
    """

    def __init__(self, original: nn.Module, converted: nn.Module, graph_module: torch.fx.GraphModule,
                 batches: Sequence[Tensor], *, max_positions: int, seed: int, residual: bool = True) -> None:
        self.original, self.converted = original, converted
        self.nodes = list(graph_module.graph.nodes)
        self.index = {str(n.target): i for i, n in enumerate(self.nodes) if n.op == "call_module"}
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(original.named_modules()) if residual else {}
        self.residual = residual
        self.runners = (_Runner(graph_module, original), _Runner(graph_module, converted))
        self.k, self.seed = int(max_positions), seed
        self.device = batches[0].device
        placeholder = self.nodes[0]
        # Each model its own copy of the input: a model may modify its input in place.
        self.envs = ([{placeholder: x.clone()} for x in batches], [{placeholder: x.clone()} for x in batches])
        self.position = 1
        self.done: set[str] = set()
        self.last: str | None = None   # after its statistics nothing more is asked: the values can go

    @classmethod
    def create(cls, original: nn.Module, converted: nn.Module, layers: Sequence[str], batches: Sequence[Tensor], *,
               max_positions: int = 64, seed: int = 0, memory_budget: int | None = None,
               device: torch.device | str | None = None, residual: bool = True) -> "SequentialStats | None":
        """The resumable statistics for ``layers`` (in graph order), or None where they do not apply."""
        if int(max_positions) < 1:
            raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
        try:
            gm = torch.fx.GraphModule(original, BatchNormLeafTracer().trace(original))
        except Exception as err:  # FX raises many types
            logger.info("sequential statistics rerun the forward per layer: torch.fx cannot trace the model (%s)",
                        type(err).__name__)
            return None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        calls = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        order = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
        if len(placeholders) != 1 or any(calls[name] != 1 for name in layers):
            logger.info("sequential statistics rerun the forward per layer: the traced graph has %d inputs, or a "
                        "layer is called other than once", len(placeholders))
            return None
        if [order[name] for name in layers] != sorted(order[name] for name in layers):
            raise ConfigError("layers must be listed in the order the model runs them")
        dev, dtype = placement(original, device)
        xs = list(_iterate(batches, dtype, dev, False, ""))
        with torch.no_grad(), eval_mode(original, converted):
            channels_last = _channels_last_works(original, xs[0])
            if channels_last:
                xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            # The values one batch keeps, at their largest between the first and the last layer.
            nodes, runner = list(gm.graph.nodes), _Runner(gm, original)
            env, peak = {nodes[0]: xs[0].clone()}, 0
            for i in range(1, (order[layers[-1]] + 1) if layers else 1):
                runner.advance(env, nodes[i:i + 1])
                if i >= order[layers[0]]:
                    peak = max(peak, _storage_bytes(env.values()))
            del env
        need = 2 * peak * sum(len(x) for x in xs) // max(len(xs[0]), 1)
        if memory_budget is None:
            memory_budget = _available_memory(dev) // 2
        if need > memory_budget:
            logger.warning("sequential statistics rerun the forward per layer: keeping both models' activations "
                        "would take %.1f GiB (budget %.1f GiB)", need / 2**30, memory_budget / 2**30)
            return None
        self = cls(original, converted, gm, xs, max_positions=max_positions, seed=seed, residual=residual)
        self.last = layers[-1] if layers else None
        return self

    def __call__(self, layer: str, progress: bool = False) -> PairedStats:
        """Paired statistics of ``layer``: runs both models on from the previous layer up to this one."""
        if layer in self.done or layer not in self.index:
            raise ConfigError(f"{layer!r} is not a layer this sequence can still give statistics for", layer=layer)
        stop = self.index[layer]
        if stop < self.position:
            raise ConfigError("layers must be asked for in the order the model runs them", layer=layer)
        conv = _conv(self.original, layer)
        geom = _Geometry.of(conv)
        gen = _layer_generator(self.seed, layer)
        node = self.nodes[stop]
        merge = _find_merge(self.nodes, stop, self.modules, self.order) if self.residual else None
        # With a residual term, alternate batches go to two folds (merged after): merge_weight needs them.
        folds = [_PairedSums(layer, geom, self.device) for _ in range(2 if merge is not None else 1)]
        with torch.no_grad(), eval_mode(self.original, self.converted):
            for i, (env_o, env_c) in enumerate(tqdm(list(zip(*self.envs)), desc=f"paired statistics {layer}",
                                                    unit="batch", disable=not progress, leave=False)):
                sums = folds[i % len(folds)]
                for runner, env in zip(self.runners, (env_o, env_c)):
                    _advance(runner, env, self.nodes[self.position:stop], layer)
                x = _hook_input(layer, geom, *self.runners[0].fetch_args_kwargs_from_env(node))
                xt = _hook_input(layer, geom, *self.runners[1].fetch_args_kwargs_from_env(node))
                if xt.shape != x.shape:
                    raise ModelError(f"the converted model feeds this layer an input of shape {tuple(xt.shape)}, "
                                     f"the original one of shape {tuple(x.shape)}", layer=layer)
                hw = geom.output_hw(x.shape[2], x.shape[3])
                positions = _sample_positions(x.shape[0], hw, self.k, gen)
                dtype = _matmul_dtype(x)
                p = geom.gather(geom.pad_input(x), *positions).to(dtype)
                pt = geom.gather(geom.pad_input(xt), *positions).to(dtype)
                miss = None
                if merge is not None:
                    miss = self._merge_miss(merge, env_o, env_c, positions, (conv.out_channels, *hw), layer)
                    if miss is None:
                        merge = None  # the addition broadcasts: no correction for this layer
                        for f in folds:
                            f.drop_merge()
                sums.add(p, pt, None if miss is None else miss.to(dtype))
        self.position = stop
        self.done.add(layer)
        if layer == self.last:
            self.envs = ([], [])
        parts = [f.result() for f in folds if f.count]
        if len(parts) == 1:
            return parts[0]
        return replace(merge_stats(parts), folds=tuple(parts) if parts[0].merge_cross is not None else ())

    def _merge_miss(self, merge: _Merge, env_o: dict, env_c: dict, positions: tuple, shape: tuple[int, int, int],
                    layer: str) -> Tensor | None:
        """``(s − s̃) / a`` at ``positions`` (``S × C_out``), or None when the addend is not conv-output shaped."""
        values = []
        for runner, env in zip(self.runners, (env_o, env_c)):
            local = dict(env)  # run ahead on a copy: the resumed forward must not see these values
            _advance(runner, local, merge.nodes, layer)
            values.append(local[merge.other])
        s, st = values
        img, oy, ox = positions
        if not (isinstance(s, Tensor) and isinstance(st, Tensor)) or s.dim() != 4 or tuple(s.shape[1:]) != shape \
                or st.shape != s.shape:
            logger.info("%s: its residual addition broadcasts; no shortcut correction", layer)
            return None
        dev = s.device
        img, oy, ox = img.to(dev), oy.to(dev), ox.to(dev)
        diff = (s[img, :, oy, ox] - st.to(s.dtype)[img, :, oy, ox]).to(torch.float64)
        return diff * merge.inverse_scale.to(dev)


def sequential_target(weight: Tensor, stats: PairedStats, damping: float = DEFAULT_DAMPING,
                      merge_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Dense kernel ``W'`` to fit, under ``Σ̃``, so the layer maps its actual inputs onto the original outputs.

    ``W' = W C (Σ̃ + δ·m·I)⁻¹`` with ``m = tr Σ̃ / n`` and ``δ = damping``, so that::

        E‖W p − Ŵ p̃‖² + δ·m·‖Ŵ‖² = const + ‖(W' − Ŵ) R̃‖²_F,    R̃ R̃ᵀ = Σ̃ + δ·m·I

    i.e. ``factorize.fit_*(W', sigma=Σ̃, damping=damping)`` minimises the ridge-regularised output
    error against the original layer. The damping (and its escalation when the Cholesky factorisation
    fails) is :func:`igc_convert.factorize.whitener`'s, so it must be the same value passed to the fit.
    Returns ``(W', Σ̃)``, float64, ``W'`` shaped like ``weight``. Without any signal (``Σ̃ = 0``) the
    original kernel is returned: the fit then falls back to the weight-space fit. Where the layer
    feeds a residual addition, ``W C`` becomes ``W C + λ E[e p̃ᵀ]`` (:class:`PairedStats`), ``λ =
    merge_weight`` (:func:`merge_weight` chooses it).

    >>> w = torch.randn(4, 2, 3, 3)
    >>> s = torch.eye(18, dtype=torch.float64)
    >>> target, _ = sequential_target(w, PairedStats(s, s, s, 100), damping=1e-9)
    >>> torch.allclose(target, w.double())
    True
    """
    t0, d, sa = _sequential_parts(weight, stats, damping)
    target = t0 if d is None else t0 + float(merge_weight) * d
    return target.reshape(weight.shape).contiguous(), sa


def _sequential_parts(weight: Tensor, stats: PairedStats, damping: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(T₀, D, Σ̃)``: :func:`sequential_target` is ``T₀ + λ D`` (``C_out × n``, float64), ``D`` the
    residual term ``E[e p̃ᵀ] (Σ̃ + δ·m·I)⁻¹`` (None without one, or without any signal). Both come from
    one Cholesky factor and one solve."""
    w = weight.detach().to(torch.float64)
    if w.dim() < 2:
        raise ConfigError(f"weight must be a conv kernel C_out × C_in × kh × kw, got shape {tuple(w.shape)}")
    wm = w.reshape(w.shape[0], -1)
    c, n = wm.shape
    for field in ("sigma_actual", "cross"):
        t = getattr(stats, field)
        if tuple(t.shape) != (n, n):
            raise ConfigError(f"stats.{field} has shape {tuple(t.shape)}, expected ({n}, {n}) for a kernel of "
                              f"shape {tuple(w.shape)}")
    merge = stats.merge_cross
    if merge is not None and tuple(merge.shape) != (c, n):
        raise ConfigError(f"stats.merge_cross has shape {tuple(merge.shape)}, expected ({c}, {n})")
    sa = _symmetric(stats.sigma_actual.detach().to(torch.float64).cpu())
    cross = stats.cross.detach().to(torch.float64).cpu()
    if not (torch.isfinite(sa).all() and torch.isfinite(cross).all()):
        raise ConfigError("paired statistics contain NaN or Inf")
    scale = float(sa.diagonal().mean())
    if not scale > 0:
        return wm, None, sa
    # whitener(Σ̃) is chol(Σ̃/m + δ'I) (δ' = δ, escalated if needed): (Σ̃ + δ'mI)⁻¹ = (R Rᵀ)⁻¹ / m.
    r = whitener(sa, n, damping)
    rows = wm @ cross
    if merge is not None:
        rows = torch.cat([rows, merge.detach().to(torch.float64).cpu()])
    solved = torch.cholesky_solve((rows / scale).T.contiguous(), r).T
    if not torch.isfinite(solved).all():  # cannot happen with a valid factor; never hand NaN to a fit
        return wm, None, sa
    return solved[:c], (solved[c:] if merge is not None else None), sa


def output_shift(weight: Tensor, approx: Tensor, stats: PairedStats) -> Tensor | None:
    """``δ = W E[p] − Ŵ E[p̃]``: the mean of what the fitted layer misses, per output channel (float64).

    Adding ``δ`` to the layer's bias (or subtracting it from the following BatchNorm's running mean)
    is the least-squares bias given ``Ŵ``: it lowers ``E‖W p − Ŵ p̃ − b‖²`` by exactly ``‖δ‖²``.
    ``None`` when the means were not collected.

    >>> w = torch.ones(2, 1, 1, 1)
    >>> st = PairedStats(*(torch.eye(1, dtype=torch.float64),) * 3, 10, torch.tensor([1.0]), torch.tensor([3.0]))
    >>> output_shift(w, 0.5 * w, st).tolist()   # 1·3 − 0.5·1
    [2.5, 2.5]
    """
    if stats.mean_actual is None or stats.mean_original is None:
        return None
    wm = weight.detach().to(torch.float64).reshape(weight.shape[0], -1).cpu()
    am = approx.detach().to(torch.float64).reshape(approx.shape[0], -1).cpu()
    n = wm.shape[1]
    if am.shape != wm.shape or stats.mean_actual.numel() != n or stats.mean_original.numel() != n:
        raise ConfigError(f"output_shift: kernels {tuple(weight.shape)} / {tuple(approx.shape)} do not match "
                          f"means of length {stats.mean_original.numel()}")
    shift = wm @ stats.mean_original.to(torch.float64) - am @ stats.mean_actual.to(torch.float64)
    if stats.merge_mean is not None:
        shift = shift + stats.merge_mean.to(torch.float64).cpu()
    return shift


def merge_weight(weight: Tensor, stats: PairedStats, row_weights: Tensor | None = None,
                 damping: float = DEFAULT_DAMPING) -> float:
    """How much of the residual term to fit: ``λ ∈ [0, 1]`` chosen by 2-fold cross-validation.

    The residual term ``E[e p̃ᵀ] Σ̃⁻¹`` regresses what the shortcut misses on the layer's own inputs.
    Where that relation is real it is a large gain (the digits ResNets), but where the inputs are wide
    and the images few it fits noise. The dense target ``T(λ) = T₀ + λD`` is linear in ``λ``, so the
    ``λ`` whose target, made from one half of the batches (``stats.folds``), best predicts the other
    half's sum ``W p + e`` (row-weighted by the following BatchNorm's scale, like the fit) is the
    minimum of a quadratic, clipped to ``[0, 1]``. Both directions are summed. 0 without a residual
    term; 1 when there is only one batch (no fold to check with).
    """
    if stats.merge_cross is None:
        return 0.0
    if len(stats.folds) != 2:
        return 1.0
    w = weight.detach().to(torch.float64).cpu()
    c = w.shape[0]
    wm = w.reshape(c, -1)
    r2 = (torch.ones(c, dtype=torch.float64) if row_weights is None
          else row_weights.detach().to(torch.float64).cpu().abs().flatten() ** 2)
    num = den = 0.0
    for a, b in (stats.folds, stats.folds[::-1]):
        t0, d, _ = _sequential_parts(w, a, damping)
        if d is None:
            continue
        aim = wm @ b.cross.to(torch.float64) + b.merge_cross.to(torch.float64)  # E_B[(W p + e) p̃ᵀ]
        ds = d @ b.sigma_actual.to(torch.float64)
        num += float((r2[:, None] * (d * aim - ds * t0)).sum())
        den += float((r2[:, None] * (ds * d)).sum())
    if not (den > 0 and math.isfinite(num)):
        return 1.0 if den == 0 else 0.0
    return min(max(num / den, 0.0), 1.0)


# ------------------------------------------------------------------------------------ linear layers
class _RowCapture:
    """Pre-hook that takes one ``nn.Linear``'s input (2-D only), then stops the forward."""

    def __init__(self) -> None:
        self.rows: Tensor | None = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        self.rows = x if torch.is_tensor(x) and x.dim() == 2 else None
        raise _StopForward


def collect_linear_pairs(original: nn.Module, converted: nn.Module, layer: str, batches: BatchSource, *,
                         folds: int = 2, device: torch.device | str | None = None) -> list[PairedStats] | None:
    """:class:`PairedStats` of the rows an ``nn.Linear`` gets in ``original`` and in ``converted``.

    The Linear's input rows play the part of a 1×1 conv's patches (every row is one image). Row ``i``
    of the calibration data goes to fold ``i mod folds``: one statistics object per fold, so that a
    fit made on some folds can be checked on another (:func:`linear_refit`). ``None`` when the layer
    is not called on a calibration batch or gets anything but an ``N×C`` input (a token sequence,
    say): its rows are then not one sample per image.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> a, b = collect_linear_pairs(net, net, "1", [torch.randn(5, 3, 2, 2)])
    >>> a.count, b.count, bool(torch.equal(a.cross, a.sigma_original))
    (3, 2, True)
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ConfigError(f"folds must be a positive integer, got {folds!r}")
    modules = _module(original, layer), _module(converted, layer, "layer of the converted model")
    if not all(isinstance(m, nn.Linear) for m in modules):
        raise ConfigError("is not an nn.Linear in both models", layer=layer)
    geom = _Geometry.of(modules[0])
    _passes_possible(batches, 1)
    dev, dtype = placement(original, device)
    converted_dtype = placement(converted, dev)[1]
    sums = [_PairedSums(layer, geom, dev) for _ in range(folds)]
    seen = 0
    with torch.no_grad(), eval_mode(original, converted):
        for x in _iterate(batches, dtype, dev, False, ""):
            rows = []
            for model, module, xx in ((original, modules[0], x), (converted, modules[1], x.to(converted_dtype))):
                capture = _RowCapture()
                _run_to(model, module, xx, capture.hook)
                if capture.rows is None:
                    return None
                rows.append(capture.rows)
            if rows[0].shape != rows[1].shape:
                raise ModelError(f"the converted model feeds this layer an input of shape {tuple(rows[1].shape)}, "
                                 f"the original one of shape {tuple(rows[0].shape)}", layer=layer)
            p, pt = (r.to(_matmul_dtype(rows[0])) for r in rows)
            fold = (torch.arange(len(p), device=p.device) + seen) % folds
            for k, acc in enumerate(sums):
                if bool((fold == k).any()):
                    acc.add(p[fold == k], pt[fold == k])
            seen += len(p)
    return [acc.result() for acc in sums if acc.count]


def merge_stats(parts: Sequence[PairedStats]) -> PairedStats:
    """The statistics of all the rows of ``parts`` (count-weighted means of theirs)."""
    total = sum(p.count for p in parts)

    def mean(field: str) -> Tensor | None:
        values = [getattr(p, field) for p in parts]
        if any(v is None for v in values):
            return None
        out = values[0].to(torch.float64) * (parts[0].count / total)
        for v, p in zip(values[1:], parts[1:]):  # in place: one tensor per field, not two per part
            out.add_(v.to(torch.float64) * (p.count / total))
        return out

    energy = (None if any(p.merge_energy is None for p in parts)
              else sum(p.merge_energy * (p.count / total) for p in parts))
    return PairedStats(mean("sigma_actual"), mean("cross"), mean("sigma_original"), total,
                       mean("mean_actual"), mean("mean_original"), mean("merge_cross"), mean("merge_mean"),
                       mean("merge_original"), energy)


#: Ridge strengths (relative to the mean variance of the rows) that :func:`linear_refit` chooses from.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class _LinearMoments:
    """Float64 moments of one set of paired rows, centred or not: what every ridge fit and check needs."""

    def __init__(self, st: PairedStats, centred: bool) -> None:
        n = st.sigma_actual.shape[0]
        zero = torch.zeros(n, dtype=torch.float64)
        self.mu_o = st.mean_original.to(torch.float64).cpu() if centred else zero
        self.mu_a = st.mean_actual.to(torch.float64).cpu() if centred else zero
        st = st.centred_moments() if centred else st
        self.sa = _symmetric(st.sigma_actual.to(torch.float64).cpu())
        self.cross = st.cross.to(torch.float64).cpu()
        self.so = st.sigma_original.to(torch.float64).cpu()
        if not all(finite(t) for t in (self.sa, self.cross, self.so, self.mu_o, self.mu_a)):
            raise ConfigError("paired statistics contain NaN or Inf")

    def fit(self, w: Tensor, delta: float) -> Tensor | None:
        """``Ŵ = (W C + λ W)(Σ̃ + λ I)⁻¹``, ``λ = δ·tr Σ̃ / n``; None when there is no signal."""
        scale = float(self.sa.diagonal().mean())
        if not scale > 0:
            return None
        lam = delta * scale
        r, info = torch.linalg.cholesky_ex(self.sa + lam * torch.eye(len(self.sa), dtype=torch.float64))
        if int(info) != 0:
            return None
        return torch.cholesky_solve((w @ self.cross + lam * w).T.contiguous(), r).T

    def error2(self, w: Tensor, new: Tensor) -> float:
        """``E‖W(p − μ) − Ŵ(p̃ − μ̃)‖²`` on these rows: the output error left once the bias takes the mean."""
        return float((w @ self.so * w).sum() - 2 * (w @ self.cross * new).sum() + (new @ self.sa * new).sum())

    def energy(self, w: Tensor) -> float:
        return float((w @ self.so * w).sum())


def linear_refit(weight: Tensor, bias: Tensor | None, folds: Sequence[PairedStats], *,
                 grid: Sequence[float] = RIDGE_GRID) -> tuple[Tensor, Tensor | None, float, float, float | None]:
    """Least-squares ``(Ŵ, b̂)`` of a dense layer that maps the rows it now gets onto its original outputs.

    Minimises ``E‖W p + b − Ŵ p̃ − b̂‖² + λ‖Ŵ − W‖²``: the ridge pulls towards the original weights,
    not towards zero, so directions the calibration rows never excite keep them (``Ŵ = W`` exactly
    when ``p̃ = p``). ``Ŵ = (W C + λ W)(Σ̃ + λ I)⁻¹`` on centred moments and
    ``b̂ = b + W E[p] − Ŵ E[p̃]`` (without a bias, uncentred moments and no intercept).

    ``λ = δ·tr Σ̃ / n`` with ``δ`` from ``grid`` chosen by cross-validation over ``folds`` (each
    fold's rows predicted by a fit on the others; :func:`collect_linear_pairs`), against keeping
    ``W`` as it is: with few calibration images and a wide layer an unchecked fit would interpolate
    them. Returns float64 ``Ŵ, b̂``, the relative output error on the held-out folds before and after
    (of the centred outputs when there is a bias: the bias takes the mean error in either case), and
    the ``δ`` chosen (None: ``W`` kept, its bias corrected; with a single fold, which nothing can
    check, the layer is returned as it is).

    >>> w, s = torch.randn(3, 4), torch.eye(4, dtype=torch.float64)
    >>> new, _, before, after, delta = linear_refit(w, None, [PairedStats(s, s, s, 50)] * 2)
    >>> torch.allclose(new, w.double()), before < 1e-12
    (True, True)
    """
    w = weight.detach().to(torch.float64).cpu()
    old_bias = None if bias is None else bias.detach().to(torch.float64).cpu()
    centred = bias is not None and all(f.mean_actual is not None and f.mean_original is not None for f in folds)
    if any(tuple(f.sigma_actual.shape) != (w.shape[1],) * 2 for f in folds):
        raise ConfigError(f"statistics of shape {tuple(folds[0].sigma_actual.shape)} do not match a weight of "
                          f"shape {tuple(w.shape)}")
    if len(folds) < 2:
        return w, old_bias, 0.0, 0.0, None
    parts = [_LinearMoments(f, centred) for f in folds]
    rests = [_LinearMoments(merge_stats([g for j, g in enumerate(folds) if j != k]), centred)
             for k in range(len(folds))]
    energy = sum(p.energy(w) for p in parts)
    kept = sum(p.error2(w, w) for p in parts)
    best, best_error = None, kept
    # A fit must beat the kept W by more than round-off: without drift both errors are ~0, and which
    # is smaller is noise.
    margin = 1e-12 * energy
    for delta in grid:
        fits = [rest.fit(w, delta) for rest in rests]
        if any(f is None for f in fits):
            continue
        e = sum(part.error2(w, f) for part, f in zip(parts, fits))
        if e < best_error - margin:
            best, best_error = delta, e

    def relative(e2: float) -> float:
        return math.sqrt(max(e2, 0.0) / energy) if energy > 0 else 0.0

    whole = _LinearMoments(merge_stats(folds), centred)
    new = whole.fit(w, best) if best is not None else None
    if new is None:  # W kept: the bias still takes the mean of the error, as after every conv
        best, best_error, new = None, kept, w
    new_bias = None if old_bias is None else old_bias + w @ whole.mu_o - new @ whole.mu_a
    return new, new_bias, relative(kept), relative(best_error), best


# ------------------------------------------------------------------------------------ BatchNorm weights
def bn_row_weights(model: nn.Module, conv_to_bn: Mapping[str, str]) -> dict[str, Tensor]:
    """Per-output-channel scale ``|γ| / sqrt(running_var + eps)`` (float64) of the BatchNorm after each conv.

    A BatchNorm without running statistics has no fixed scale and is skipped (logged).

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> bn_row_weights(net, {"0": "1"})["0"].round(decimals=3).tolist()  # fresh BN: γ = 1, var = 1
    [1.0, 1.0, 1.0, 1.0]
    """
    out: dict[str, Tensor] = {}
    for conv_name, bn_name in conv_to_bn.items():
        conv = _conv(model, conv_name)
        bn = _module(model, bn_name, "BatchNorm")
        if not isinstance(bn, _BATCHNORMS):
            raise ConfigError(f"{bn_name!r} is a {type(bn).__name__}, not a BatchNorm2d", layer=conv_name)
        if bn.num_features != conv.out_channels:
            raise ConfigError(f"BatchNorm {bn_name!r} has {bn.num_features} features but the conv has "
                              f"{conv.out_channels} output channels", layer=conv_name)
        if bn.running_var is None:
            logger.warning("%s: BatchNorm %s keeps no running statistics; no row weights", conv_name, bn_name)
            continue
        var = bn.running_var.detach().to(torch.float64).cpu()
        gamma = (bn.weight.detach().to(torch.float64).cpu().abs() if bn.weight is not None
                 else torch.ones_like(var))
        scale = gamma / torch.sqrt(var + bn.eps)
        if not torch.isfinite(scale).all():
            raise ConfigError(f"BatchNorm {bn_name!r} has NaN/Inf or negative running variances", layer=conv_name)
        out[conv_name] = scale
    return out


def find_following_batchnorm(graph_module: torch.fx.GraphModule) -> dict[str, str]:
    """``{conv name: BatchNorm name}`` for every ``Conv2d`` whose only user is a ``BatchNorm2d`` module.

    A conv called at several places qualifies only when every call feeds the same BatchNorm.

    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    >>> find_following_batchnorm(gm)
    {'0': '1'}
    """
    if not isinstance(graph_module, torch.fx.GraphModule):
        raise ConfigError(f"expected a torch.fx.GraphModule, got {type(graph_module).__name__}")
    modules = dict(graph_module.named_modules())
    following: dict[str, set[str | None]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        bn = None
        if len(users) == 1:
            user = users[0]
            if (user.op == "call_module" and isinstance(modules.get(user.target), _BATCHNORMS)
                    and user.args and user.args[0] is node):
                bn = str(user.target)
        following.setdefault(str(node.target), set()).add(bn)
    return {conv: next(iter(bns)) for conv, bns in following.items() if len(bns) == 1 and None not in bns}

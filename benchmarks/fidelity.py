"""Fidelity of converted models on held-out images: weight-space vs data-aware vs sequential fits,
against truncated-SVD and Tucker-2 baselines at equal total conv parameters.

For each total conv-parameter budget ``b`` (a fraction of ALL conv parameters, depthwise included:
layers that cannot be converted keep their size and count against the budget) the model is converted
by every method, and each converted model is compared with the original on evaluation images that
were not used for calibration:

* ``weight``         (a) ``convert(model, ParamsRatio(b), example_inputs=x)``: weight-space fit;
* ``data``           (b) ``convert(..., calibration=calib, sequential=False)``: whitened one-shot fit;
* ``sequential``     (c) ``convert(..., calibration=calib, sequential=True)``: each layer fitted to the
  inputs it really receives in the partly converted model;
* ``weight-same-plan`` the weight-space fit of (b)'s plan (the same layers, blocks and shapes, via
  ``apply_plan(..., fit=True)``): against (b) it measures the fit alone, the plan being equal;
* ``svd-uniform``    (d) plain truncated SVD (IGCV1 with ``L = M = 1``, ``max_groups=1``), weight space,
  the same ratio for every layer (``allocation="uniform"``), as peer low-rank tools do;
* ``svd-budget``     the same truncated SVD with our budget allocation across layers (weight space):
  with ``svd-uniform`` it separates the gain of the allocation from that of the IGC structure;
* ``tucker2``        Tucker-2 (tensorly's ``partial_tucker`` on the output/input modes, HOOI, weight
  space) as ``1×1 → k×k core → 1×1`` convs, uniform per layer; only when tensorly is installed;
* ``svd-sequential`` (optional, ``--methods``) truncated SVD fitted sequentially on the calibration
  data: separates the gain of the data from that of the IGC structure;
* ``sequential+head`` (optional, ``--methods``) (c) with the dense Linear layers re-fitted to the
  converted features (``convert(..., refit_linears=True)``).
* ``data-logits``, ``sequential-logits`` (optional, ``--methods``) (b) and (c) planned by the logits
  (``convert(..., plan_by="logits")``): each layer's shapes scored by the logit KL they cause.

Uniform methods give every convertible layer the ratio ``b' = (b·total − fixed) / convertible`` so
that the whole model lands on ``b`` (the achieved ratio is printed for every method).

Metrics, over the evaluation images, for every convertible conv (kept-dense layers count too):

* **isolated** relative output error ``‖block(x) − conv(x)‖ / ‖conv(x)‖`` with ``x`` the ORIGINAL
  model's input to that layer (the fit's own error, out of sample; 0 for a layer kept dense). Where
  the converter moved the following BatchNorm's running mean (bias correction), ``block(x)`` counts
  that move, so the error is that of what the BatchNorm sees. *BN-w*: each output channel weighted by
  the BatchNorm's scale ``|γ|/σ``; *at BN*: the same weights against the centred reference
  ``conv(x) − running mean``, i.e. the relative error of the BatchNorm's normalised output (which
  no longer holds the layer's mean);
* **drift** ``‖y_conv − y_orig‖ / ‖y_orig‖`` with each model fed its own activations (the end-to-end
  error accumulated up to that layer's output);
* logit ``KL(original ‖ converted)`` (nats, mean per image) and top-1 agreement with the original;
  the same on (up to ``--eval-images`` of) the calibration images themselves (*KL on calib*): against
  the held-out KL it shows how much of a fit does not carry over to images it was not fitted on.

Data (no download): random crops of scikit-learn's two sample photos. By default the calibration crops
come from one photo (china.jpg) and the evaluation crops from the other (flower.jpg); ``--both-directions``
also runs the reverse. ``--data crops`` uses the ``sample-images`` train/val crop splits (crops of both
photos, different crops) and ``--calib SOURCE [--eval SOURCE]`` any source ``resolve_source`` accepts
(train split for calibration, val split for evaluation). Two more use the 18 photos of the
``photos`` source (scikit-image installed): ``--data scenes`` calibrates on crops of 14–15 of them
and evaluates on the others (unseen scenes), ``--data scene-halves`` calibrates on one half of every
photo and evaluates on the other halves (the same scenes, as the calibration and test images of one
data set share a distribution, but no shared pixel); ``--data same-halves`` scores the same evaluation
crops as ``scene-halves`` but calibrates on other crops of the evaluated halves (one distribution,
overlapping pixels). Two evaluate on the 20 labelled ImageNet validation
images of the ``imagenet-samples`` source (foolbox installed) and their mirror images, and add each
model's top-1 **accuracy** against the true labels: ``--data imagenet`` calibrates on crops of the 18
photos (no ImageNet image), ``--data imagenet-folds`` on crops of 10 of the ImageNet images and
evaluates on the other 10 (twice, the halves swapped).

``--oracle`` adds, for every split, the same evaluation calibrated on its evaluation images themselves:
an in-sample bound on what any calibration set could give the data-aware fits (their plans included).

``--headroom`` instead prints, per convertible layer, how much any data-aware low-rank fit could gain
over the weight-space truncated SVD at equal rank, under the evaluation images' own statistics
(:func:`rank_headroom`).

``--resnet50-speed`` instead times the data-aware conversion of torchvision's ResNet-50 (random
weights) with N calibration crops at 224² (each mode in a fresh process: its peak RSS is its own).

Example::

    python3 benchmarks/fidelity.py --budgets 0.9 0.75 0.5 --json fidelity.json
    python3 benchmarks/fidelity.py --resnet50-speed --speed-images 256
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from igc_convert.agreement import kl_and_top1, measure_agreement
from igc_convert.blocks import check_convertible
from igc_convert.convert import BLOCK_CHOICES, apply_plan, convert, find_convs
from igc_convert.errors import ConfigError, DataError, IGCError, ModelError, UnsupportedLayerError
from igc_convert.files import atomic_write
from igc_convert.plan import ParamsRatio

log = logging.getLogger("fidelity")

Tensor = torch.Tensor

PHOTOS = ("china.jpg", "flower.jpg")  # the order of sklearn.datasets.load_sample_images
DATA_CHOICES = ("photos", "crops", "scenes", "scene-halves", "same-halves", "imagenet", "imagenet-folds")
DEFAULT_METHODS = ("weight", "data", "weight-same-plan", "sequential", "svd-uniform", "svd-budget", "tucker2")
ALL_METHODS = DEFAULT_METHODS + ("sequential+head", "svd-sequential", "data-logits", "sequential-logits")
#: Methods that read the calibration images (converted once per calibration set).
DATA_METHODS = ("data", "sequential", "sequential+head", "svd-sequential", "data-logits", "sequential-logits")
#: Methods that depend on a calibration set through (b)'s plan, without reading the images.
PLAN_METHODS = ("weight-same-plan",)
#: The peers (c) must beat on logit KL.
BASELINES = ("weight", "weight-same-plan", "svd-uniform", "svd-budget", "tucker2")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does."""

    budgets: tuple[float, ...] = (0.9, 0.75, 0.5)
    methods: tuple[str, ...] = DEFAULT_METHODS
    calib_images: int = 64
    eval_images: int = 64
    max_positions: int = 64
    batch_size: int = 16
    seed: int = 0
    damping: float | None = None  # None: convert()'s default
    block: str = "igcv1"  # the block kind of (a), (b) and (c): convert()'s ``block``

    def __post_init__(self) -> None:
        for b in self.budgets:
            if not 0 < b < 1:
                raise ConfigError(f"budgets must be in (0, 1), got {b}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        for name in ("calib_images", "eval_images", "max_positions", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class DataSplit:
    """Calibration and evaluation images of one direction (e.g. china → flower)."""

    label: str
    calib: Tensor
    eval: Tensor
    eval_labels: Tensor | None = None  # true classes of the evaluation images, when known
    original_accuracy: float | None = None  # the original model's top-1 on them (set by run_benchmark)


def _mean(values: Any) -> float:
    """Mean of ``values``; 0 for none (a method that converted nothing has no error)."""
    vals = list(values)
    return sum(vals) / max(len(vals), 1)


@dataclass
class MethodResult:
    """One converted model, scored on one evaluation set."""

    method: str
    budget: float
    split: str
    params_ratio: float
    converted: int
    convertible: int
    seconds: float
    cpu_seconds: float
    in_sample: float | None = None
    isolated: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    isolated_bn: dict[str, float] = field(default_factory=dict)
    drift_bn: dict[str, float] = field(default_factory=dict)
    isolated_at_bn: dict[str, float] = field(default_factory=dict)
    kl: float = 0.0
    top1: float = 1.0
    calib_kl: float | None = None
    calib_top1: float | None = None
    accuracy: float | None = None  # top-1 against the evaluation images' true labels, where they have them
    note: str = ""

    @property
    def isolated_mean(self) -> float:
        return _mean(self.isolated.values())

    @property
    def drift_mean(self) -> float:
        return _mean(self.drift.values())

    @property
    def isolated_bn_mean(self) -> float:
        return _mean(self.isolated_bn.values())

    @property
    def drift_bn_mean(self) -> float:
        return _mean(self.drift_bn.values())

    @property
    def isolated_at_bn_mean(self) -> float:
        return _mean(self.isolated_at_bn.values())

    @property
    def isolated_converted_mean(self) -> float | None:
        vals = [v for v in self.isolated.values() if v > 0]
        return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------------------------------ data
def _images(ds: Any) -> Tensor:
    """Every image of a data set of ``(image, label)`` items, stacked."""
    return torch.stack([ds[i][0] for i in range(len(ds))])


def photo_crops(photo: int, count: int, image_size: int, channels: int, seed: int) -> Tensor:
    """``count`` seeded random crops (ImageNet-normalised) of one sample photo (0 china, 1 flower)."""
    from igc_convert.data import PhotoCrops

    gen = torch.Generator().manual_seed(seed * 7919 + 101 * (photo + 1))
    crops = PhotoCrops(4 * count + 8, image_size, channels, gen)  # about half the boxes fall on each photo
    crops.boxes = [b for b in crops.boxes if b[0] == photo][:count]
    if len(crops.boxes) < count:  # astronomically unlikely with 4x over-drawing; never silently fewer
        raise DataError(f"drew only {len(crops.boxes)} crops of {PHOTOS[photo]}, wanted {count}")
    return _images(crops)


def scene_halves(half: int) -> list[tuple[str, Tensor]]:
    """Half ``half`` (0 or 1, cut across the long side) of every photo of the ``"photos"`` source."""
    from igc_convert.data import all_photos

    halves = []
    for name, photo in all_photos():
        dim = 2 if photo.shape[2] >= photo.shape[1] else 1
        cut = photo.shape[dim] // 2
        part = photo.narrow(dim, 0, cut) if half == 0 else photo.narrow(dim, cut, photo.shape[dim] - cut)
        halves.append((f"{name}[{half}]", part))
    return halves


def scene_half_crops(half: int, count: int, image_size: int, channels: int, seed: int) -> Tensor:
    """``count`` seeded crops of :func:`scene_halves` ``(half)``, ImageNet-normalised.

    Calibration takes one half of each photo and evaluation the other: the same scenes (as calibration
    and test images of one data set share a distribution) but never a shared pixel.
    """
    from igc_convert.data import PhotoCrops

    gen = torch.Generator().manual_seed(seed * 7919 + 31 * (half + 1))
    crops = PhotoCrops(count, image_size, channels, gen, scene_halves(half), "photo halves")
    return _images(crops)


def imagenet_splits(folds: bool, n_calib: int, image_size: int, channels: int, seed: int) -> list[DataSplit]:
    """Evaluation on the 20 labelled ImageNet images of ``imagenet-samples`` and their mirror images.

    ``folds=False``: calibration on ``n_calib`` crops of the 18 photos of ``"photos"`` (no ImageNet
    image). ``folds=True``: two splits, each calibrated on crops of every other ImageNet image (the
    originals, before the evaluation's resize and centre crop) and evaluated on the rest.
    """
    import numpy as np
    from PIL import Image

    from igc_convert.data import PhotoCrops, _chw, resolve_source

    data = resolve_source("imagenet-samples", image_size=image_size, channels=channels, labels=True)
    images, labels = _images(data), data.targets()
    mirrored = (torch.cat([images, images.flip(-1)]), torch.cat([labels, labels]))
    if not folds:
        calib = source_images("photos", "all", n_calib, image_size, channels, seed)
        return [DataSplit("photos: 18 photos -> 20 ImageNet validation images and their mirror images",
                          calib, *mirrored)]
    splits = []
    for fold in (0, 1):
        held = [i for i in range(len(data)) if i % 2 != fold]
        photos = []
        for i in range(len(data)):
            if i % 2 == fold:
                with Image.open(data.files[i]) as img:
                    photos.append((data.files[i].name, _chw(np.asarray(img.convert("RGB")))))
        gen = torch.Generator().manual_seed(seed * 7919 + 53 * (fold + 1))
        calib = _images(PhotoCrops(n_calib, image_size, channels, gen, photos, "imagenet-samples"))
        ev = images[held]
        splits.append(DataSplit(f"ImageNet: crops of 10 images -> the other 10 and their mirror images "
                                f"(fold {fold})", calib, torch.cat([ev, ev.flip(-1)]),
                                torch.cat([labels[held], labels[held]])))
    return splits


def source_images(source: str, split: str, count: int, image_size: int, channels: int, seed: int) -> Tensor:
    """Up to ``count`` images of ``split`` of any source :func:`igc_convert.data.resolve_source` accepts."""
    from igc_convert.data import resolve_source

    ds = resolve_source(source, image_size=image_size, channels=channels, split=split, samples=count, seed=seed)
    return _images(ds)


def make_splits(data: str, calib: str | None, eval_source: str | None, both: bool, settings: Settings,
                image_size: int, channels: int) -> list[DataSplit]:
    """The (calibration, evaluation) image sets the run compares on."""
    n_c, n_e, seed = settings.calib_images, settings.eval_images, settings.seed
    if calib is not None:
        ev = eval_source or calib
        return [DataSplit(f"{calib}[train] -> {ev}[val]",
                          source_images(calib, "train", n_c, image_size, channels, seed),
                          source_images(ev, "val", n_e, image_size, channels, seed))]
    if data == "crops":
        return [DataSplit("sample-images train crops -> val crops",
                          source_images("sample-images", "train", n_c, image_size, channels, seed),
                          source_images("sample-images", "val", n_e, image_size, channels, seed))]
    if data == "scenes":  # the photos source's own split: whole photos held out
        return [DataSplit("photos[train] -> photos[val] (other photos)",
                          source_images("photos", "train", n_c, image_size, channels, seed),
                          source_images("photos", "val", n_e, image_size, channels, seed))]
    if data == "scene-halves":
        return [DataSplit("photos: one half of each of 18 photos -> the other half",
                          scene_half_crops(0, n_c, image_size, channels, seed),
                          scene_half_crops(1, n_e, image_size, channels, seed))]
    if data == "same-halves":  # scene-halves' evaluation images, calibrated on other crops of the same halves
        return [DataSplit("photos: other crops of the evaluated halves",
                          scene_half_crops(1, n_c, image_size, channels, seed + 1),
                          scene_half_crops(1, n_e, image_size, channels, seed))]
    if data in ("imagenet", "imagenet-folds"):
        return imagenet_splits(data == "imagenet-folds", n_c, image_size, channels, seed)
    if data != "photos":
        raise ConfigError(f"--data must be one of {', '.join(DATA_CHOICES)}, got {data!r}")
    pairs = [(0, 1), (1, 0)] if both else [(0, 1)]
    return [DataSplit(f"{PHOTOS[a]} -> {PHOTOS[b]}", photo_crops(a, n_c, image_size, channels, seed),
                      photo_crops(b, n_e, image_size, channels, seed + 1)) for a, b in pairs]


def oracle_split(split: DataSplit) -> DataSplit:
    """``split`` calibrated on its own evaluation images: an in-sample bound on what calibration can give.

    No calibration set can fit the evaluated images better than those images themselves (up to the
    fit's damping and the positions it samples): where this split's data-aware error is not half the
    weight-space one, no calibration data would make it so for that plan and block family.
    """
    return DataSplit(f"{split.label}, oracle: calibrated on the evaluation images", split.eval, split.eval,
                     split.eval_labels)


# ------------------------------------------------------------------------------------------ model facts
def convertible_layers(model: nn.Module) -> list[str]:
    """Qualified names of the convs the pass may convert (plain ``groups=1`` convs), execution order."""
    sites, _, _ = find_convs(model)
    out = []
    for s in sites:
        try:
            check_convertible(s.module, s.name)
        except UnsupportedLayerError:
            continue
        out.append(s.name)
    return out


def conv_params(model: nn.Module) -> int:
    """Parameters of every ``Conv2d`` (blocks and Tucker factors are made of ``Conv2d``)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))


def _fixed_and_total(model: nn.Module, layers: Sequence[str]) -> tuple[int, int]:
    total = conv_params(model)
    convertible = sum(p.numel() for name in layers for p in model.get_submodule(name).parameters())
    return total - convertible, total


def largest_ratio(params_at: Callable[[float], int], limit: float, lo: float) -> float:
    """Largest per-layer ratio in ``[lo, 1]`` whose total ``params_at(ratio)`` stays within ``limit``.

    ``params_at`` is non-decreasing (a larger per-layer ratio never picks a smaller shape); per-layer
    shapes are discrete, so the plain ratio ``lo`` lands under the budget and bisection closes the gap.
    """
    if params_at(lo) > limit:
        return lo
    hi = 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if params_at(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def uniform_ratio(model: nn.Module, layers: Sequence[str], budget: float) -> float:
    """Per-layer ratio for ``convert(..., max_groups=1, allocation="uniform")`` landing the model on ``budget``.

    Starts from ``b' = (b·total − fixed) / convertible`` (every convertible layer at the same ratio)
    and raises it while the uniform truncated-SVD choice of every layer still fits the total budget.
    """
    from igc_convert.plan import LayerSpec, candidates, uniform

    fixed, total = _fixed_and_total(model, layers)
    start = (budget * total - fixed) / (total - fixed)
    if not 0 < start <= 1:
        raise ConfigError(f"budget {budget:g} is not reachable: the convs that cannot be converted already hold "
                          f"{fixed / total:.3f} of the conv parameters")
    per_layer = []
    for name in layers:
        conv = model.get_submodule(name)
        spec = LayerSpec(name, conv.weight.detach().double(), conv.bias is not None, conv.stride, conv.padding,
                         conv.dilation)
        per_layer.append(candidates(spec, ["igcv1"], max_groups=1))
    return largest_ratio(lambda r: fixed + sum(c.params for c in uniform(per_layer, r)), budget * total, start)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


# ------------------------------------------------------------------------------------------ Tucker-2
class TuckerEnergy:
    """Mode-0/mode-1 spectra of one kernel: picks Tucker-2 ranks for any parameter limit without refitting.

    The discarded energy of the two mode unfoldings bounds the Tucker-2 error (HOSVD), so the rank pair
    minimising it within the limit is a principled, fit-free choice.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        w = conv.weight.detach().double()
        self.c_out, self.c_in, kh, kw = w.shape
        self.s, self.bias = kh * kw, int(conv.bias is not None) * self.c_out
        self.dense = conv.weight.numel() + self.bias

        def tail(m: Tensor) -> Tensor:  # tail[r] = energy beyond rank r
            e = torch.linalg.svdvals(m).pow(2)
            return torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])

        self.tail_out = tail(w.reshape(self.c_out, -1))
        self.tail_in = tail(w.transpose(0, 1).reshape(self.c_in, -1))

    def params(self, r_out: int, r_in: int) -> int:
        return self.c_in * r_in + r_out * r_in * self.s + self.c_out * r_out + self.bias

    def ranks(self, limit: float) -> tuple[int, int] | None:
        """``(R_out, R_in)`` within ``limit`` parameters keeping the most energy; None when nothing fits."""
        r_in = torch.arange(1, self.c_in + 1)
        room = limit - self.c_in * r_in - self.bias
        r_out = torch.clamp(torch.div(room, r_in * self.s + self.c_out, rounding_mode="floor"), max=self.c_out).long()
        # A core rank above the other side's rank times the taps cannot be used (HOOI caps it): no waste.
        r_out = torch.minimum(r_out, r_in * self.s)
        ok = (r_out >= 1) & (r_in <= r_out * self.s)
        if not bool(ok.any()):
            return None
        lost = self.tail_out[r_out.clamp(0, len(self.tail_out) - 1)] + self.tail_in[r_in.clamp(max=len(self.tail_in) - 1)]
        lost[~ok] = float("inf")
        i = int(lost.argmin())
        return int(r_out[i]), int(r_in[i])

    def cost(self, ratio: float) -> int:
        """Parameters this layer takes at ``ratio`` (dense when no Tucker-2 shape fits)."""
        ranks = self.ranks(ratio * self.dense)
        return self.dense if ranks is None else self.params(*ranks)


def tucker2_layer(conv: nn.Conv2d, r_out: int, r_in: int) -> nn.Sequential:
    """``1×1 (C_in→R_in) → k×k core (R_in→R_out, the conv's stride/padding/dilation) → 1×1 (→C_out)``."""
    import numpy as np
    from tensorly.decomposition import partial_tucker

    w = conv.weight.detach().double().cpu().numpy()
    (core, (u_out, u_in)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=50,
                                              tol=1e-7)
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)
    dtype = conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_in.T)).to(dtype)[:, :, None, None])
        middle.weight.copy_(torch.from_numpy(np.ascontiguousarray(core)).to(dtype))
        last.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_out)).to(dtype)[:, :, None, None])
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, middle, last)


def tucker2_convert(model: nn.Module, layers: Sequence[str], budget: float) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every listed conv Tucker-2 factorised, all at one per-layer ratio chosen
    so that the model's total conv parameters land on ``budget`` (and the number of layers factorised)."""
    fixed, total = _fixed_and_total(model, layers)
    start = (budget * total - fixed) / (total - fixed)
    if not 0 < start <= 1:
        raise ConfigError(f"budget {budget:g} is not reachable: the convs that cannot be converted already hold "
                          f"{fixed / total:.3f} of the conv parameters")
    energy = {name: TuckerEnergy(model.get_submodule(name)) for name in layers}
    ratio = largest_ratio(lambda r: fixed + sum(e.cost(r) for e in energy.values()), budget * total, start)
    out = copy.deepcopy(model)
    done = 0
    for name in layers:
        ranks = energy[name].ranks(ratio * energy[name].dense)
        if ranks is None or energy[name].params(*ranks) >= energy[name].dense:
            continue
        _set_submodule(out, name, tucker2_layer(out.get_submodule(name), *ranks))
        done += 1
    return out.eval(), done


def have_tensorly() -> bool:
    try:
        import tensorly  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ methods
def build(method: str, model: nn.Module, layers: Sequence[str], budget: float, calib: Tensor | None,
          settings: Settings, plan: Sequence[dict[str, Any]] | None = None
          ) -> tuple[nn.Module, int, float | None, list[dict[str, Any]] | None]:
    """The converted model of one method at one budget, how many layers it converted, (data-aware
    methods) the mean over the convertible layers of the pass's own output error on the calibration
    images (in sample; kept-dense layers count 0), and the conversion's plan. ``plan`` is (b)'s, which
    ``weight-same-plan`` fits in weight space."""
    common: dict[str, Any] = dict(max_positions=settings.max_positions, seed=settings.seed, progress=False)
    if settings.damping is not None:
        common["damping"] = settings.damping
    example = calib[:1] if calib is not None else None
    if method == "tucker2":
        return (*tucker2_convert(model, layers, budget), None, None)
    if method == "weight-same-plan":
        if plan is None:
            raise ConfigError("weight-same-plan needs the data-aware method's plan")
        return apply_plan(copy.deepcopy(model), plan, fit=True).eval(), len(plan), None, list(plan)
    ours = dict(common, block=settings.block)
    if method == "weight":
        result = convert(model, ParamsRatio(budget), example_inputs=example, **ours)
    elif method == "data":
        result = convert(model, ParamsRatio(budget), calibration=calib, sequential=False, **ours)
    elif method == "sequential":
        result = convert(model, ParamsRatio(budget), calibration=calib, sequential=True, **ours)
    elif method in ("data-logits", "sequential-logits"):
        result = convert(model, ParamsRatio(budget), calibration=calib, sequential=method.startswith("seq"),
                         plan_by="logits", **ours)
    elif method == "sequential+head":  # (c) with the classifier re-fitted to the converted features
        result = convert(model, ParamsRatio(budget), calibration=calib, sequential=True, refit_linears=True,
                         **ours)
    elif method == "svd-uniform":
        result = convert(model, ParamsRatio(uniform_ratio(model, layers, budget)), example_inputs=example,
                         max_groups=1, allocation="uniform", **common)
    elif method == "svd-budget":
        result = convert(model, ParamsRatio(budget), example_inputs=example, max_groups=1, **common)
    elif method == "svd-sequential":
        result = convert(model, ParamsRatio(budget), calibration=calib, sequential=True, max_groups=1, **common)
    else:
        raise ConfigError(f"unknown method {method!r}")
    errors = [r.output_error or 0.0 for r in result.records if r.name in layers]
    in_sample = sum(errors) / len(layers) if method in DATA_METHODS else None
    return result.model.eval(), result.report.totals()["converted"], in_sample, result.plan


# ------------------------------------------------------------------------------------------ metrics
class _Sums:
    """Running ``Σ‖ŷ − y‖²`` and ``Σ‖y‖²`` per layer: plain (0), with per-channel weights (1), and with
    those weights against the centred reference ``y − c`` (2, the same error as 1)."""

    PLAIN, WEIGHTED, AT_BN = 0, 1, 2

    def __init__(self) -> None:
        self.err: dict[str, list[float]] = {}  # plain, weighted
        self.ref: dict[str, list[float]] = {}  # plain, weighted, weighted and centred

    def add(self, name: str, approx: Tensor, ref: Tensor, weight: Tensor | None, centre: Tensor | None = None
            ) -> None:
        per_channel = lambda t: t.pow(2).sum(dim=(0, 2, 3))  # noqa: E731
        diff, norm = per_channel(approx.double() - ref.double()), per_channel(ref.double())
        centred = norm if centre is None else per_channel(ref.double() - centre.double().view(1, -1, 1, 1))
        w2 = weight.pow(2) if weight is not None else torch.ones_like(norm)
        e, r = self.err.setdefault(name, [0.0] * 2), self.ref.setdefault(name, [0.0] * 3)
        e[0] += float(diff.sum())
        e[1] += float((w2 * diff).sum())
        r[0] += float(norm.sum())
        r[1] += float((w2 * norm).sum())
        r[2] += float((w2 * centred).sum())

    def relative(self, kind: int) -> dict[str, float]:
        e = min(kind, self.WEIGHTED)
        return {k: math.sqrt(self.err[k][e] / self.ref[k][kind]) if self.ref[k][kind] > 0 else 0.0
                for k in self.err}


def batchnorms_after(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """The BatchNorm that directly consumes each layer's output (if any), by the converter's own graph
    analysis (timm's ``BatchNormAct2d`` included)."""
    wanted = set(layers)
    return {s.name: s.batchnorm for s in find_convs(model)[0] if s.batchnorm and s.name in wanted}


def bn_scales(model: nn.Module, layers: Sequence[str]) -> dict[str, Tensor]:
    """``|γ|/sqrt(var + eps)`` of the BatchNorm that directly consumes each layer's output (if any):
    the converter's row weights, so the BN-weighted error is the one the data-aware fits minimise."""
    from igc_convert.calibrate import bn_row_weights

    return bn_row_weights(model, batchnorms_after(model, layers))


def bn_mean_offsets(original: nn.Module, converted: nn.Module, batchnorms: Mapping[str, str]) -> dict[str, Tensor]:
    """Per layer whose following BatchNorm (``batchnorms``: :func:`batchnorms_after`) had its running mean
    moved by the converter (its bias correction), the move as an output offset ``μ_orig − μ_conv``
    (``1 × C × 1 × 1``): the isolated error is that of what the BatchNorm sees, ``block(x) + offset``
    against ``conv(x)``."""
    out = {}
    for name, bn in batchnorms.items():
        before, after = original.get_submodule(bn).running_mean, converted.get_submodule(bn).running_mean
        if before is not None and after is not None and not torch.equal(before, after):
            out[name] = (before - after).view(1, -1, 1, 1)
    return out


def _unchanged(module: nn.Module, reference: nn.Module) -> bool:
    """A conv kept dense by the converter: its isolated error is exactly 0 (no need to run it)."""
    return (type(module) is type(reference) and isinstance(module, nn.Conv2d)
            and torch.equal(module.weight, reference.weight)
            and (module.bias is None) == (reference.bias is None)
            and (module.bias is None or torch.equal(module.bias, reference.bias)))


def evaluate(original: nn.Module, converted: Mapping[str, nn.Module], layers: Sequence[str], images: Tensor,
             batch_size: int = 16, labels: Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Isolated and drift errors per layer, logit KL and top-1 agreement of each converted model, and
    its top-1 accuracy when the images' ``labels`` are given.

    One pass over ``images``: per batch the original runs once with hooks that keep each layer's
    input and output, then every converted model runs with hooks that keep its layer outputs
    (drift), and each of its changed layers is applied to the original's input (isolated). Errors
    come plain (conv output) and ``_bn`` weighted by the following BatchNorm's scale (what the next
    layer sees, and what the data-aware fit minimises).
    """
    from igc_convert.calibrate import bn_row_weights

    bns = batchnorms_after(original, layers)
    scales = bn_row_weights(original, bns)
    offsets = {k: bn_mean_offsets(original, m, bns) for k, m in converted.items()}
    centres = {n: original.get_submodule(b).running_mean for n, b in bns.items()
               if original.get_submodule(b).running_mean is not None}
    orig_in: dict[str, Tensor] = {}
    orig_out: dict[str, Tensor] = {}
    conv_out: dict[str, Tensor] = {}

    def keep(store_in: dict | None, store_out: dict, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if store_in is not None:
                store_in[name] = args[0].detach()
            store_out[name] = output.detach()
        return hook

    drift = {k: _Sums() for k in converted}
    isolated = {k: _Sums() for k in converted}
    kl_sum = {k: 0.0 for k in converted}
    agree = {k: 0 for k in converted}
    correct = {k: 0 for k in converted}
    unchanged = {k: {n for n in layers if _unchanged(m.get_submodule(n), original.get_submodule(n))}
                 for k, m in converted.items()}
    handles = [original.get_submodule(n).register_forward_hook(keep(orig_in, orig_out, n)) for n in layers]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size]
                logits = original(x).double()
                for key, model in converted.items():
                    hs = [model.get_submodule(n).register_forward_hook(keep(None, conv_out, n)) for n in layers]
                    try:
                        y = model(x).double()
                    finally:
                        for h in hs:
                            h.remove()
                    for n in layers:
                        shift = offsets[key].get(n, 0.0)
                        drift[key].add(n, conv_out[n] + shift, orig_out[n], scales.get(n))
                        same = n in unchanged[key]
                        approx = orig_out[n] if same else model.get_submodule(n)(orig_in[n]) + shift
                        isolated[key].add(n, approx, orig_out[n], scales.get(n), centres.get(n))
                    conv_out.clear()
                    kl, same_top1 = kl_and_top1(logits, y)
                    kl_sum[key] += kl
                    agree[key] += same_top1
                    if labels is not None:
                        correct[key] += int((y.argmax(1) == labels[start:start + batch_size]).sum())
                orig_in.clear()
                orig_out.clear()
    finally:
        for h in handles:
            h.remove()
    n = len(images)
    return {k: dict(isolated=isolated[k].relative(_Sums.PLAIN), isolated_bn=isolated[k].relative(_Sums.WEIGHTED),
                    isolated_at_bn=isolated[k].relative(_Sums.AT_BN),
                    drift=drift[k].relative(_Sums.PLAIN), drift_bn=drift[k].relative(_Sums.WEIGHTED), kl=kl_sum[k] / n,
                    top1=agree[k] / n, accuracy=None if labels is None else correct[k] / n) for k in converted}


def top1_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 16) -> float:
    """Share of ``images`` whose top-1 class is their label."""
    with torch.no_grad():
        hits = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                   for i in range(0, len(images), batch_size))
    return hits / len(images)


# ------------------------------------------------------------------------------------------ the run
def run_benchmark(model: nn.Module, splits: Sequence[DataSplit], settings: Settings) -> list[MethodResult]:
    """Every method at every budget, scored on every split's evaluation images."""
    from tqdm.auto import tqdm

    model = model.eval()
    layers = convertible_layers(model)
    if not layers:
        raise ModelError("the model has no convertible conv")
    total = conv_params(model)
    methods = [m for m in settings.methods if m != "tucker2" or have_tensorly()]
    if "tucker2" in settings.methods and "tucker2" not in methods:
        log.warning("tensorly is not installed: the tucker2 baseline is skipped (pip install tensorly)")
    results: list[MethodResult] = []
    per_split = DATA_METHODS + PLAN_METHODS
    # (b) first where a same-plan method needs its plan (built, not scored, unless asked for)
    order = (["data"] if "data" not in methods and any(m in PLAN_METHODS for m in methods) else []) + \
        sorted(methods, key=lambda m: m in PLAN_METHODS)
    jobs = [(b, m, s) for b in settings.budgets for m in order
            for s in (splits if m in per_split else splits[:1])]
    bar = tqdm(jobs, desc="converting", unit="model", file=sys.stderr)
    built: dict[tuple[float, str, str], tuple[nn.Module, int, float, float, str]] = {}
    plans: dict[tuple[float, str], list[dict[str, Any]] | None] = {}
    for budget, method, split in bar:
        bar.set_postfix_str(f"{method} @ {budget:g} ({split.label})")
        t0, c0 = time.perf_counter(), time.process_time()
        note = ""
        try:
            converted, count, in_sample, plan = build(method, model, layers, budget, split.calib, settings,
                                                      plan=plans.get((budget, split.label)))
        except ConfigError as err:  # e.g. an unreachable budget: reported, not fatal
            log.warning("%s at %g: %s", method, budget, err)
            converted, count, in_sample, plan, note = None, 0, None, None, str(err)
        if method == "data":
            plans[budget, split.label] = plan
        built[budget, method, split.label] = (converted, count, time.perf_counter() - t0,
                                              time.process_time() - c0, note, in_sample)
    for budget in settings.budgets:
        for split in splits:
            models = {}
            for method in methods:
                key = (budget, method, split.label if method in per_split else splits[0].label)
                converted, count, secs, cpu, note, in_sample = built[key]
                res = MethodResult(method, budget, split.label, float("nan"), count, len(layers), secs, cpu,
                                   in_sample, note=note)
                if converted is not None:
                    res.params_ratio = conv_params(converted) / total
                    models[method] = converted
                results.append(res)
            log.info("evaluating %d models at budget %g on %s", len(models), budget, split.label)
            scores = evaluate(model, models, layers, split.eval, settings.batch_size, split.eval_labels)
            if split.eval_labels is not None and split.original_accuracy is None:  # the same at every budget
                split.original_accuracy = top1_accuracy(model, split.eval, split.eval_labels, settings.batch_size)
            in_sample_logits = {k: measure_agreement(model, m, split.calib[:settings.eval_images],
                                                     batch_size=settings.batch_size) for k, m in models.items()}
            for res in results[-len(methods):]:
                if res.method in scores:
                    s = scores[res.method]
                    res.isolated, res.drift, res.kl, res.top1 = s["isolated"], s["drift"], s["kl"], s["top1"]
                    res.accuracy = s["accuracy"]
                    res.isolated_bn, res.drift_bn, res.isolated_at_bn = s["isolated_bn"], s["drift_bn"], s["isolated_at_bn"]
                    res.calib_kl, res.calib_top1 = in_sample_logits[res.method].kl, in_sample_logits[res.method].top1
    return results


# ------------------------------------------------------------------------------------------ output
def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_tables(results: Sequence[MethodResult], splits: Sequence[DataSplit]) -> str:
    """Markdown: one table per (split, budget), then the goal checks. Splits with labelled evaluation
    images get a top-1 accuracy column (the original's in the heading)."""
    lines = []
    for split in splits:
        labelled = split.eval_labels is not None
        known = f"; the original's top-1 accuracy {100 * split.original_accuracy:.1f}%" \
            if split.original_accuracy is not None else ""
        lines += [f"### calibration {split.label} ({len(split.calib)} calibration / {len(split.eval)} "
                  f"evaluation images{known})", ""]
        lines.append("| budget | method | params ratio | converted | isolated err | isolated err, converted only | "
                     "isolated err BN-w | isolated err at BN | in-sample err (pass) | drift err | drift err BN-w | logit KL | top-1 agree | "
                     + ("top-1 accuracy | " if labelled else "") + "KL on calib (top-1) | convert s (CPU s) |")
        lines.append("|---:|---|" + "---:|" * (13 + labelled))
        for r in results:
            if r.split != split.label:
                continue
            if r.note:
                lines.append(f"| {r.budget:g} | {r.method} | - | - | {r.note} |" + " |" * (10 + labelled))
                continue
            accuracy = f"{_f(None if r.accuracy is None else 100 * r.accuracy, 1)}% | " if labelled else ""
            lines.append(f"| {r.budget:g} | {r.method} | {r.params_ratio:.3f} | {r.converted}/{r.convertible} | "
                         f"{_f(r.isolated_mean)} | {_f(r.isolated_converted_mean)} | {_f(r.isolated_bn_mean)} | "
                         f"{_f(r.isolated_at_bn_mean)} | "
                         f"{_f(r.in_sample)} | "
                         f"{_f(r.drift_mean)} | {_f(r.drift_bn_mean)} | "
                         f"{r.kl:.4f} | {100 * r.top1:.1f}% | {accuracy}"
                         f"{_f(r.calib_kl, 4)} ({_f(None if r.calib_top1 is None else 100 * r.calib_top1, 1)}%) | "
                         f"{r.seconds:.0f} ({r.cpu_seconds:.0f}) |")
        lines.append("")
    lines += ["### goals", ""]
    for check in goal_checks(results):
        lines.append(f"- {check}")
    lines.append("")
    return "\n".join(lines)


def goal_checks(results: Sequence[MethodResult]) -> list[str]:
    """The issue's two goals, per (split, budget): data/weight isolated error ratio, and (c)'s KL rank."""
    out = []
    by = {(r.split, r.budget, r.method): r for r in results if not r.note}
    for split, budget in dict.fromkeys((r.split, r.budget) for r in results):
        w, d, c, same = (by.get((split, budget, m)) for m in ("weight", "data", "sequential", "weight-same-plan"))
        parts = []
        if w and d and w.isolated_mean > 0:
            ratio = d.isolated_mean / w.isolated_mean
            parts.append(f"data/weight isolated error {ratio:.2f} ({'halved' if ratio <= 0.5 else 'NOT halved'}), "
                         f"BN-weighted {d.isolated_bn_mean / max(w.isolated_bn_mean, 1e-30):.2f}, "
                         f"at the BatchNorm {d.isolated_at_bn_mean / max(w.isolated_at_bn_mean, 1e-30):.2f}, "
                         f"drift {d.drift_mean / max(w.drift_mean, 1e-30):.2f}")
        if same and d and same.isolated_mean > 0:
            ratio = d.isolated_mean / same.isolated_mean
            parts.append(f"the same plan fitted in weight space: data/weight isolated error {ratio:.2f} "
                         f"({'halved' if ratio <= 0.5 else 'NOT halved'}), "
                         f"at the BatchNorm {d.isolated_at_bn_mean / max(same.isolated_at_bn_mean, 1e-30):.2f}")
        if c:
            peers = [by[split, budget, m] for m in BASELINES if (split, budget, m) in by]
            worst = [p.method for p in peers if p.kl <= c.kl]
            parts.append(f"sequential KL {c.kl:.4f} " + ("< every baseline" if not worst
                                                          else f"NOT below {', '.join(worst)}"))
        out.append(f"{split} @ {budget:g}: " + "; ".join(parts))
    return out


def to_json(results: Sequence[MethodResult]) -> list[dict[str, Any]]:
    return [dict(method=r.method, budget=r.budget, split=r.split, params_ratio=r.params_ratio, converted=r.converted,
                 convertible=r.convertible, seconds=r.seconds, cpu_seconds=r.cpu_seconds, note=r.note,
                 in_sample=r.in_sample,
                 isolated_mean=r.isolated_mean, drift_mean=r.drift_mean, isolated_bn_mean=r.isolated_bn_mean,
                 isolated_at_bn_mean=r.isolated_at_bn_mean, isolated_at_bn=r.isolated_at_bn,
                 drift_bn_mean=r.drift_bn_mean, kl=r.kl, top1=r.top1, accuracy=r.accuracy, calib_kl=r.calib_kl,
                 calib_top1=r.calib_top1,
                 isolated=r.isolated, drift=r.drift,
                 isolated_bn=r.isolated_bn, drift_bn=r.drift_bn) for r in results]


# ------------------------------------------------------------------------------------------ ResNet-50 speed
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _speed_child(mode: str, images: int, seed: int) -> dict[str, Any]:
    """Data-aware conversion of ResNet-50 (random weights) at ParamsRatio(0.5); time and memory."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50().eval()
    calib = source_images("sample-images", "all", images, 224, 3, seed)
    rss_before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    result = convert(model, ParamsRatio(0.5), calibration=calib, calibration_samples=images,
                     sequential=(mode == "sequential"), seed=seed, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(mode=mode, images=images, seconds=seconds, cpu_seconds=cpu, rss_before_mb=rss_before,
                peak_rss_mb=peak, converted=result.report.totals()["converted"], threads=torch.get_num_threads(),
                params_ratio=result.report.totals()["params_ratio"])


def resnet50_speed(modes: Sequence[str], sizes: Sequence[int], threads: int, seed: int) -> list[dict[str, Any]]:
    """One fresh process per (mode, images): wall/CPU seconds and peak RSS of each."""
    out = []
    for mode in modes:
        for n in sizes:
            cmd = [sys.executable, os.path.abspath(__file__), "--speed-child", mode, str(n), "--threads",
                   str(threads), "--seed", str(seed)]
            log.info("ResNet-50 %s conversion with %d images", mode, n)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ModelError(f"speed run failed ({' '.join(cmd)}): {proc.stderr.strip()[-800:]}")
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            log.info("%s", info)
            out.append(info)
    return out


def format_speed(rows: Sequence[dict[str, Any]], target_images: int) -> str:
    lines = ["### ResNet-50 (random weights) data-aware conversion, ParamsRatio(0.5), 224² crops", "",
             "| mode | images | wall s | CPU s | peak RSS MB | RSS before convert MB | threads |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['images']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['threads']} |")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["images"], r["seconds"], r["cpu_seconds"]) for r in rows if r["mode"] == mode)
        if len(pts) >= 2 and pts[-1][0] != target_images and pts[-1][0] > pts[0][0]:
            (n0, w0, c0), (n1, w1, c1) = pts[0], pts[-1]
            slope_w, slope_c = (w1 - w0) / (n1 - n0), (c1 - c0) / (n1 - n0)
            lines.append("")
            lines.append(f"{mode}: linear extrapolation to {target_images} images: "
                         f"{w0 + slope_w * (target_images - n0):.0f} s wall, "
                         f"{c0 + slope_c * (target_images - n0):.0f} s CPU")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ headroom
#: Ranks, as fractions of ``min(C_out, n)``, at which :func:`headroom_rows` compares the fits.
HEADROOM_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)


def rank_headroom(weight: Tensor, sigma: Tensor, ranks: Sequence[int]) -> list[tuple[float, float]]:
    """Per rank ``r`` of ``ranks``: ``(best / weight-space, weight-space)`` relative output errors of
    rank-``r`` factors of the ``C_out × n`` matrix ``weight`` under the input second moment ``sigma``.

    *weight-space* is the truncated SVD of ``weight`` itself, *best* the truncated SVD of ``weight``
    whitened by ``sigma`` (Eckart–Young: no rank-``r`` matrix has a lower error under ``sigma``).
    With ``sigma`` taken on the very images scored, the first number bounds what any data-aware
    low-rank fit of that rank can gain over the weight-space one: 1 where the inputs are isotropic, 0
    where they span at most ``r`` directions. Errors are relative to ``‖weight · sigma^½‖``.
    """
    return _headroom(weight, sigma, ranks)[0]


def _headroom(weight: Tensor, sigma: Tensor, ranks: Sequence[int]) -> tuple[list[tuple[float, float]], Tensor]:
    """:func:`rank_headroom`, and the eigenvalues of ``sigma`` (clipped at 0) its whitening took."""
    w, sig = weight.detach().to(torch.float64), sigma.detach().to(torch.float64)
    if w.dim() != 2 or tuple(sig.shape) != (w.shape[1], w.shape[1]) or not all(r >= 1 for r in ranks):
        raise ConfigError(f"rank_headroom needs a C_out × n matrix, an n × n moment and ranks >= 1, got "
                          f"{tuple(w.shape)}, {tuple(sig.shape)}, {list(ranks)}")
    values, vectors = torch.linalg.eigh((sig + sig.T) / 2)
    values = values.clamp_min(0)
    root = vectors * values.sqrt()  # root rootᵀ = sigma, without a Cholesky (sigma may be singular)
    whitened = torch.linalg.svdvals(w @ root)
    total = float(whitened.pow(2).sum())
    if not total > 0:
        return [(1.0, 0.0) for _ in ranks], values
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    out = []
    for r in ranks:
        plain = float((((w - (u[:, :r] * s[:r]) @ vh[:r]) @ root) ** 2).sum())
        best = float(whitened[r:].pow(2).sum())
        out.append(((math.sqrt(best / plain) if plain > 0 else 1.0), math.sqrt(plain / total)))
    return out, values


def headroom_rows(model: nn.Module, layers: Sequence[str], images: Tensor, *, max_positions: int = 64,
                  batch_size: int = 16, fractions: Sequence[float] = HEADROOM_FRACTIONS) -> list[dict[str, Any]]:
    """Per layer, :func:`rank_headroom` at each rank fraction under the statistics of ``images``.

    As the data-aware fits see them: the input covariance (the mean's share goes to the bias
    correction), and output rows weighted by the following BatchNorm's scale. A layer's kernel is
    flattened to ``C_out × C_in·kh·kw``.
    """
    from igc_convert.calibrate import collect_input_moments

    moments = collect_input_moments(model, layers, images.split(batch_size), max_positions=max_positions,
                                    progress=False)
    scales = bn_scales(model, layers)
    rows = []
    for name in layers:
        w = model.get_submodule(name).weight.detach().to(torch.float64)
        w = w.reshape(w.shape[0], -1)
        if name in scales:
            w = scales[name].reshape(-1, 1) * w
        ranks = [max(1, round(f * min(w.shape))) for f in fractions]
        fits, values = _headroom(w, moments[name].covariance(), ranks)
        spread = float(values.sum() ** 2 / values.pow(2).sum()) / len(values) if values.sum() > 0 else 0.0
        rows.append(dict(layer=name, n=w.shape[1], c_out=w.shape[0], isotropy=spread, ranks=ranks, fits=fits))
    return rows


def format_headroom(rows: Sequence[dict[str, Any]], label: str, fractions: Sequence[float] = HEADROOM_FRACTIONS) -> str:
    head = " | ".join(f"rank {f:g}·min(C_out, n)" for f in fractions)
    lines = [f"### Headroom of data-aware low-rank fits, under the statistics of {label}", "",
             "best whitened rank-r error ÷ weight-space truncated SVD's (in brackets: the latter's relative "
             "error), centred inputs, BatchNorm-weighted rows; *isotropy*: participation ratio of the input "
             "covariance's eigenvalues ÷ n (1: all directions alike)", "",
             f"| layer | n | C_out | isotropy | {head} |", "|---|---:|---:|---:|" + "---:|" * len(fractions)]
    for r in rows:
        cells = " | ".join(f"{ratio:.2f} ({plain:.2f})" for ratio, plain in r["fits"])
        lines.append(f"| {r['layer']} | {r['n']} | {r['c_out']} | {r['isotropy']:.3f} | {cells} |")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def _digits_model(epochs: int) -> nn.Module:
    from igc_convert.digits import train_digits_model

    model, acc = train_digits_model(epochs=epochs, seed=0)
    log.info("digits model trained (%d epochs): val accuracy %.3f", epochs, acc)
    return model


def input_shape(model: nn.Module, image_size: int | None) -> tuple[int, int]:
    """``(image_size, channels)`` from the flag, else the model's timm-style ``pretrained_cfg``, else 224/3."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, _ = cfg.get("input_size", (3, 224, 224))
    return (image_size or h), c


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0",
                   help="model spec for igc_convert.models.build_model, or 'digits' (trained here)")
    p.add_argument("--weights", default="DEFAULT", help="weights for --model (DEFAULT, none, or a file)")
    p.add_argument("--digits-epochs", type=int, default=6, help="training epochs of --model digits")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75, 0.5],
                   help="total conv-parameter ratios")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    p.add_argument("--data", default="photos", choices=DATA_CHOICES,
                   help="photos: calibrate on china.jpg crops, evaluate on flower.jpg crops; "
                        "crops: sample-images train/val crop splits; scenes: crops of 14-15 of the 18 photos of "
                        "the 'photos' source, evaluate on the other 3-4; scene-halves: one half of each of the 18 "
                        "photos, evaluate on the other halves; same-halves: scene-halves' evaluation crops, calibrated on "
                        "other crops of the same halves (the last three need scikit-image)")
    p.add_argument("--both-directions", action="store_true", help="with --data photos, also flower -> china")
    p.add_argument("--oracle", action="store_true",
                   help="also calibrate on each split's evaluation images themselves: the most any calibration "
                        "data could give, in sample")
    p.add_argument("--calib", default=None, help="any resolve_source data source (train split calibrates)")
    p.add_argument("--eval", dest="eval_source", default=None,
                   help="evaluation source (val split; default: --calib's)")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's pretrained_cfg, else 224")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--max-positions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--damping", type=float, default=None, help="convert()'s damping (default: its own)")
    p.add_argument("--block", default="igcv1", choices=BLOCK_CHOICES,
                   help="block kind of the weight, data, weight-same-plan and sequential methods (the SVD "
                        "baselines are IGCV1 with one group)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads (1: on a loaded 2-core machine LAPACK calls with 2 threads "
                        "ran up to 80x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number (per layer too) here")
    p.add_argument("--headroom", action="store_true",
                   help="instead: per convertible layer, the best data-aware low-rank fit against the weight-space "
                        "SVD at equal rank, under the first split's evaluation images' own statistics")
    p.add_argument("--resnet50-speed", action="store_true",
                   help="instead: time data-aware conversion of ResNet-50 (random weights)")
    p.add_argument("--speed-modes", nargs="+", default=["one-shot", "sequential"], choices=("one-shot", "sequential"))
    p.add_argument("--speed-images", type=int, nargs="+", default=[256],
                   help="calibration image counts (two or more: linear extrapolation to --speed-target)")
    p.add_argument("--speed-target", type=int, default=256)
    p.add_argument("--speed-child", nargs=2, metavar=("MODE", "IMAGES"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, builders: Mapping[str, Callable[[], nn.Module]] | None = None) -> int:
    """Run the benchmark; ``builders`` maps extra ``--model`` names to model factories (tests)."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    limits = _blas_limits(args.threads)
    try:
        if args.speed_child:
            print(json.dumps(_speed_child(args.speed_child[0], int(args.speed_child[1]), args.seed)))
            return 0
        command = "python3 benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if args.resnet50_speed:
            rows = resnet50_speed(args.speed_modes, args.speed_images, args.threads, args.seed)
            print(f"Command: {command}\n")
            print(format_speed(rows, args.speed_target))
            if args.json:
                with atomic_write(args.json, "w") as f:
                    json.dump(dict(resnet50_speed=rows), f, indent=1)
            return 0
        settings = Settings(tuple(args.budgets), tuple(dict.fromkeys(args.methods)), args.calib_images,
                            args.eval_images, args.max_positions, args.batch_size, args.seed, args.damping,
                            args.block)
        if builders and args.model in builders:
            model = builders[args.model]()
        elif args.model == "digits":
            model = _digits_model(args.digits_epochs)
        else:
            from igc_convert.models import build_model

            weights = None if args.weights in (None, "none") else args.weights
            if args.model != "efficientnet_lite0" and args.weights == "DEFAULT":
                log.warning("DEFAULT weights of %s may need a download", args.model)
            model, _ = build_model(args.model, weights)
        model.eval()
        image_size, channels = input_shape(model, args.image_size)
        splits = make_splits(args.data, args.calib, args.eval_source, args.both_directions, settings, image_size,
                             channels)
        if args.oracle:
            splits += [oracle_split(s) for s in splits]
        if args.headroom:
            rows = headroom_rows(model, convertible_layers(model), splits[0].eval, max_positions=args.max_positions,
                                 batch_size=args.batch_size)
            print(f"Command: {command}\n")
            print(format_headroom(rows, f"{splits[0].label}: its {len(splits[0].eval)} evaluation images"))
            if args.json:
                with atomic_write(args.json, "w") as f:
                    json.dump(dict(command=command, headroom=rows), f, indent=1)
            return 0
        t0 = time.perf_counter()
        results = run_benchmark(model, splits, settings)
        print(f"Command: {command}\n")
        print(f"Code: {_revision()}\n")
        layers = convertible_layers(model)
        print(f"Model {args.model}: {conv_params(model):,} conv params, {len(layers)} convertible convs "
              f"({100 * (1 - sum(p.numel() for n in layers for p in model.get_submodule(n).parameters()) / conv_params(model)):.1f}% "
              f"of the conv params cannot be converted); images {image_size}², max_positions "
              f"{settings.max_positions}, {args.threads} threads; total {time.perf_counter() - t0:.0f} s wall.\n")
        print(format_tables(results, splits), flush=True)
        if args.json:
            with atomic_write(args.json, "w") as f:
                json.dump(dict(command=command, results=to_json(results)), f, indent=1)
    except IGCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)  # callers (tests) keep their own settings
        if limits is not None:
            limits.restore_original_limits()
    return 0


def _revision() -> str:
    """``git describe --always --dirty`` of the checkout (numbers depend on the code they ran with)."""
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def _blas_limits(threads: int) -> Any:
    """Limit numpy's BLAS (tensorly runs on numpy) to ``threads`` too; None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    sys.exit(main())

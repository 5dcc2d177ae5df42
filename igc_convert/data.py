"""Data sources for calibration and fine-tuning: one entry point, :func:`resolve_source`.

Every source becomes a map-style :class:`SourceDataset` of ``(image float32 C×H×W, label int)`` items,
``label = -1`` when the source has no labels. ``image_size`` is one side (square images) or
``(height, width)``. Sources:

``"digits"``
    scikit-learn's bundled handwritten digits (1797 real 8×8 images, 10 classes), scaled to [0, 1],
    resized (bilinear) to ``image_size``, replicated to ``channels``, normalised with fixed statistics.
``"sample-images"``
    scikit-learn's two bundled photos, cut into ``samples`` seeded random crops (default 64, of the
    output's aspect ratio) resized to ``image_size`` and normalised with the ImageNet statistics. Unlabelled. Train and val crops
    differ but come from the same two photos.
``"photos"``
    the same kind of crops from 18 real photos that packages ship: scikit-learn's two, matplotlib's
    ``grace_hopper.jpg`` and scikit-image's 15 (install ``igc-convert[photos]``): people, animals,
    objects, textures, astronomy, microscopy. Train and val take **disjoint photos** (a seeded 80/20
    split of the photos, stratified colour/grey), so val crops are truly unseen scenes.
``"imagenet-samples"``
    20 real ImageNet validation images with their class indices (0–999), the ones foolbox ships
    (install ``igc-convert[imagenet-samples]``), preprocessed as a folder's images are: a check of an
    ImageNet classifier's top-1 accuracy on the images it was made for. Splits are unstratified (the
    classes are almost all different).
a folder path
    class sub-folders (ImageFolder layout) give labels; a flat folder of images is unlabelled;
    ``images/`` and ``masks/`` sub-folders (or Pascal VOC's ``JPEGImages/`` and ``SegmentationClass/``)
    give per-pixel class masks, matched by file stem (:class:`SegmentationFolder`).
    Turned upright by their EXIF orientation (camera photos), then ImageNet preprocessing: resize the
    short side to ``1.14·image_size``, centre crop, normalise (a non-square size: scaled to cover
    1.14× it both ways, then the centre crop).
Python objects
    a ``Dataset``, a ``DataLoader`` (its data set is used), a tensor ``N×C×H×W``, or any iterable of
    tensors (single images or batches), ``(x, y)`` pairs or dicts (``{"pixel_values": x, "labels": y}``,
    as Hugging Face ``datasets`` gives them; :func:`split_item`). They are used as they are (no resizing).
    In a map-style ``Dataset`` a label may be an ``H×W`` integer class mask of the image's size.

``split="train"``/``"val"`` picks a deterministic, seeded 80/20 split (stratified when labelled), so
train and val never overlap; ``"all"`` keeps everything. :func:`make_loader` batches a data set with an
order that is a pure function of ``(seed, epoch)`` (needed for exact resume) and shards it over the
processes when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from .errors import ConfigError, DataError

Tensor = torch.Tensor

#: Mean and standard deviation of the digits pixels after scaling to [0, 1] (computed on all 1797).
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: File extensions read as images in folders (the same list torchvision's ImageFolder uses).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "all")
VAL_FRACTION = 0.2
DEFAULT_CROPS = 64


# ------------------------------------------------------------------------------------ data sets
class SourceDataset(Dataset):
    """Base of every data set :func:`resolve_source` returns.

    ``source`` names where the data came from (used in error messages); ``labelled`` says whether
    items carry real labels. ``targets()`` gives every label without loading images (or ``None`` when
    that would cost a full pass), which the stratified split uses.
    """

    source: str = "?"
    labelled: bool = False
    #: Labels are ``H×W`` class masks (segmentation), not one class per image.
    per_pixel: bool = False
    #: Whether train/val splits keep each class's share (not for one or two images per class).
    stratified: bool = True

    def targets(self) -> Tensor | None:
        return None

    def num_classes(self) -> int | None:
        """How many classes the labels index when the source defines a closed set (a folder's
        sub-folders, the ten digits), else ``None``: a labelled tensor may hold a few classes only."""
        return None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError


class TensorImages(SourceDataset):
    """Images held in memory as one ``N×C×H×W`` float tensor, with optional labels."""

    def __init__(self, images: Tensor, labels: Tensor | None, source: str) -> None:
        self.images, self.source = images, source
        self.labelled = labels is not None
        self.labels = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)

    def targets(self) -> Tensor | None:
        return self.labels if self.labelled else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class DigitsImages(SourceDataset):
    """scikit-learn's digits, resized on access (a 224×224 copy of all of them would take 1 GB)."""

    source = "digits"
    labelled = True

    def __init__(self, size: int | tuple[int, int], channels: int) -> None:
        from sklearn.datasets import load_digits  # heavy import: only when the source is used

        digits = load_digits()
        # 0..16 ink levels -> [0, 1] -> fixed normalisation (fixed, so train and val use the same one).
        base = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        self.base = (base - DIGITS_MEAN) / DIGITS_STD
        self.labels = torch.as_tensor(digits.target, dtype=torch.long)
        self.size, self.channels = _size_hw(size), channels

    def targets(self) -> Tensor:
        return self.labels

    def num_classes(self) -> int:
        return 10

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.base[index : index + 1]
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x[0].expand(self.channels, -1, -1).contiguous(), int(self.labels[index])


#: scikit-image's bundled photographs (``skimage.data`` loaders; grey ones are replicated to RGB).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock")


def _chw(image: Any) -> Tensor:
    """A uint8 ``H×W×3`` or grey ``H×W`` array as a ``3×H×W`` float tensor in [0, 1] (grey replicated)."""
    x = torch.tensor(image).float().div_(255.0)  # a copy: the arrays packages hand out may be read-only
    return x.permute(2, 0, 1).contiguous() if x.ndim == 3 else x.expand(3, -1, -1).contiguous()


def sample_photos() -> list[tuple[str, Tensor]]:
    """scikit-learn's two sample photos as ``(name, 3×H×W float in [0, 1])``."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [(Path(f).name, _chw(img)) for f, img in zip(bunch.filenames, bunch.images)]


#: The data sources known by name (anything else is a folder's path).
NAMED_SOURCES = ("digits", "sample-images", "photos", "imagenet-samples")
_NEEDS_SKIMAGE = "data source 'photos' needs scikit-image: pip install 'igc-convert[photos]'"
_NEEDS_FOOLBOX = ("data source 'imagenet-samples' reads the ImageNet images foolbox ships: "
                  "pip install 'igc-convert[imagenet-samples]'")


def all_photos() -> list[tuple[str, Tensor]]:
    """Every real photo the installed packages ship (:func:`sample_photos`, matplotlib's, scikit-image's)."""
    try:
        import skimage.data
    except ImportError as e:
        raise DataError(_NEEDS_SKIMAGE) from e
    import matplotlib.cbook
    import numpy as np
    from PIL import Image

    photos = sample_photos()
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        photos.append(("grace_hopper.jpg", _chw(np.asarray(img.convert("RGB")))))
    for name in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        photos.append((name, _chw(img[0] if name == "stereo_motorcycle" else img)))  # (left, right, disparity)
    return photos


def _photo_split(photos: list[tuple[str, Tensor]], split: str, seed: int) -> list[tuple[str, Tensor]]:
    """Whole photos per split (seeded 80/20, stratified colour/grey): val crops come from unseen scenes."""
    if split == "all":
        return photos
    grey = torch.tensor([bool((p[0] == p[1]).all() and (p[1] == p[2]).all()) for _, p in photos])
    train, val = split_indices(len(photos), grey.long(), seed)
    return [photos[i] for i in (train if split == "train" else val)]


#: ImageNet's number of classes: the labels of ``"imagenet-samples"`` index them.
IMAGENET_CLASSES = 1000


def imagenet_samples(size: int | tuple[int, int], channels: int) -> FolderImages:
    """foolbox's 20 bundled ImageNet validation images (``data/imagenet_<index>_<class>.jpg``) with
    their classes, found without importing foolbox (its import pulls in its whole framework)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("foolbox")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for d in folders for f in (Path(d) / "data").glob("imagenet_*_*.jpg")
                   if re.fullmatch(r"imagenet_\d+_\d+\.jpg", f.name))
    if not files:
        raise DataError(_NEEDS_FOOLBOX)
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    if max(labels) >= IMAGENET_CLASSES:
        raise DataError(f"data source 'imagenet-samples': {files[labels.index(max(labels))].name} names "
                        f"class {max(labels)}, but ImageNet has {IMAGENET_CLASSES}")
    images = FolderImages(files, labels, [str(c) for c in range(IMAGENET_CLASSES)], size, channels,
                          "imagenet-samples")
    images.stratified = False
    return images


class PhotoCrops(SourceDataset):
    """Seeded random crops of photos (default: scikit-learn's two) of the output's aspect ratio,
    resized to ``size`` (height, width), ImageNet-normalised."""

    source = "sample-images"

    def __init__(self, count: int, size: int | tuple[int, int], channels: int, generator: torch.Generator,
                 photos: Sequence[tuple[str, Tensor]] | None = None, source: str | None = None) -> None:
        named = list(photos) if photos is not None else sample_photos()
        if not named:
            raise DataError(f"data source {source or self.source!r} has no photos to crop")
        self.source = source or self.source
        self.names = [name for name, _ in named]
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.photos = [(p - mean) / std for _, p in named]
        size = _size_hw(size)
        self.size, self.channels = size, channels
        # Crops between 20% and 100% of the largest box of the output's aspect ratio that fits the photo
        # (for square outputs, of the photo's short side): a mix of close-ups and wide views.
        aspect = size[1] / size[0]
        self.boxes = []
        for _ in range(count):
            which = int(torch.randint(len(self.photos), (1,), generator=generator))
            h, w = self.photos[which].shape[1:]
            box_h, box_w = (h, h * aspect) if w >= h * aspect else (w / aspect, w)
            scale = 0.2 + 0.8 * float(torch.rand((), generator=generator))
            crop_h, crop_w = max(1, int(box_h * scale)), max(1, int(box_w * scale))
            top = int(torch.randint(h - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(w - crop_w + 1, (1,), generator=generator))
            self.boxes.append((which, top, left, crop_h, crop_w))

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        which, top, left, crop_h, crop_w = self.boxes[index]
        crop = self.photos[which][None, :, top : top + crop_h, left : left + crop_w]
        x = F.interpolate(crop, size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return _match_channels(x, self.channels), -1


class FolderImages(SourceDataset):
    """Image files of a folder (ImageFolder layout or flat), decoded and preprocessed on access."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None, classes: Sequence[str],
                 size: int | tuple[int, int], channels: int, source: str) -> None:
        self.files, self.classes, self.source = list(files), list(classes), source
        self.labelled = labels is not None
        self.labels = torch.as_tensor(labels if labels is not None else [-1] * len(self.files), dtype=torch.long)
        self.size, self.channels = _size_hw(size), channels

    def targets(self) -> Tensor | None:
        return self.labels if self.labelled else None

    def num_classes(self) -> int | None:
        return len(self.classes) if self.labelled else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return _read_image(self.files[index], self.size, self.channels), int(self.labels[index])


class SegmentationFolder(SourceDataset):
    """Images with per-pixel class masks (``images/`` + ``masks/`` of a folder, matched by file stem).

    Each item is ``(image, mask)``: the mask an ``H×W`` long tensor of class indices, cropped and
    resized (nearest) exactly as the image; 255, the usual "ignore" value (Pascal VOC's borders),
    becomes -1, which no loss or score counts.
    """

    labelled = True
    per_pixel = True

    def __init__(self, pairs: Sequence[tuple[Path, Path]], size: int | tuple[int, int], channels: int,
                 source: str) -> None:
        self.pairs, self.source = list(pairs), source
        self.size, self.channels = _size_hw(size), channels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        import numpy as np

        image, mask = self.pairs[index]
        x = _read_image(image, self.size, self.channels)
        found = _cover_and_crop(_open_image(mask, _class_indices), self.size, nearest=True)
        return x, _check_mask(np.asarray(found, dtype=np.int64), x, str(mask), index)


#: The mask value that marks pixels no loss or score counts (Pascal VOC's object borders).
MASK_IGNORE = 255


def _class_indices(img: Any) -> Any:
    """A mask image whose pixel values are class indices: 8-bit grey or palette as it is, 16-bit as
    32-bit integers (never scaled, unlike photos); a colour mask is refused."""
    if img.mode in ("L", "P"):
        return img.copy()
    if img.mode in WIDE_MODES and img.mode != "F":
        return img.convert("I")
    raise DataError(f"a mask in {img.mode} mode: masks hold one class index per pixel (8-bit grey, palette or "
                    "16-bit), not colours")


def _open_image(path: Path, convert: Any) -> Any:
    """A decoded image file, turned upright by its EXIF orientation (as viewers show camera photos) and
    passed through ``convert``; any decoding failure is a :class:`DataError` naming the file."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            upright = ImageOps.exif_transpose(img)
            try:
                return convert(upright)
            except DataError as err:
                raise DataError(f"{str(path)!r}: {err}") from None
    # PIL raises all three on corrupt files, DecompressionBombError on images over MAX_IMAGE_PIXELS
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from None


def _cover_and_crop(img: Any, size: tuple[int, int], *, nearest: bool = False) -> Any:
    """Standard ImageNet evaluation geometry: short side to 1.14x, centre crop. For a non-square output,
    the image is scaled to cover 1.14x the output in both directions. ``nearest`` for class masks."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    how = dict(interpolation=InterpolationMode.NEAREST) if nearest else dict(antialias=True)
    h, w = size
    if h == w:
        img = TF.resize(img, round(h * 256 / 224), **how)
    else:
        scale = max(h * 256 / 224 / img.height, w * 256 / 224 / img.width)
        img = TF.resize(img, [max(h, round(img.height * scale)), max(w, round(img.width * scale))], **how)
    return TF.center_crop(img, [h, w])


def _read_image(path: Path, size: tuple[int, int], channels: int) -> Tensor:
    """An image file, preprocessed: upright, :func:`_cover_and_crop`, scaled to [0, 1], normalised."""
    import torchvision.transforms.functional as TF

    img = _open_image(path, lambda img: _eight_bit(img).convert("L" if channels == 1 else "RGB"))
    x = TF.to_tensor(_cover_and_crop(img, size))
    mean, std = IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]
    if channels == 1:  # grey images: the ImageNet statistics of the green channel (luma-like)
        mean, std = IMAGENET_MEAN[1:2], IMAGENET_STD[1:2]
    return TF.normalize(x, mean, std)


#: Pillow modes of more than 8 bits per pixel: 16-bit (PNG, TIFF), 32-bit integer and float grey images.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _eight_bit(img: Any) -> Any:
    """``img`` scaled to 8 bits when it has more; Pillow's ``convert("RGB")`` clips them instead.

    A 16-bit image (and Pillow's 32-bit ``"I"`` mode, which older Pillows give 16-bit PNGs) is taken
    as 0-65535; a float image as 0-1 when it stays within that, else as 0-255. Clipping made a 16-bit
    scan all white and a 0-1 float image all black.
    """
    if img.mode not in WIDE_MODES:
        return img
    import numpy as np
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    scale = (255.0 if a.size and a.max() <= 1.0 else 1.0) if img.mode == "F" else 255.0 / 65535.0
    return Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8))  # 2-D uint8: mode "L"


class WrappedDataset(SourceDataset):
    """A user's map-style data set whose items are images or ``(image, label)`` pairs; a label may be
    an ``H×W`` integer class mask of the image's size (``per_pixel``; 255 is read as -1, ignored)."""

    def __init__(self, dataset: Dataset, source: str, labelled: bool, channels: int | None,
                 per_pixel: bool = False) -> None:
        self.dataset, self.source, self.labelled, self.channels = dataset, source, labelled, channels
        self.per_pixel = per_pixel

    def targets(self) -> Tensor | None:
        t = getattr(self.dataset, "targets", None)
        if self.labelled and not self.per_pixel and t is not None and len(t) == len(self):
            return torch.as_tensor(t, dtype=torch.long)
        return None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = split_item(self.dataset[index], self.source, index)
        x = _check_image(x, self.source, self.channels, what=f"item {index}")
        if self.labelled != (y is not None):
            raise DataError(f"{self.source}: item {index} {'has no' if self.labelled else 'has a'} label, "
                            f"unlike item 0")
        if y is None:
            return x, -1
        return x, _check_mask(y, x, self.source, index) if self.per_pixel else _check_label(y, self.source, index)


class SubsetImages(SourceDataset):
    """Some items of a :class:`SourceDataset` (a split or a sample), keeping its attributes."""

    def __init__(self, base: SourceDataset, indices: Sequence[int], what: str) -> None:
        self.base, self.indices = base, list(indices)
        self.source, self.labelled, self.per_pixel = f"{base.source} [{what}]", base.labelled, base.per_pixel

    def targets(self) -> Tensor | None:
        t = self.base.targets()
        return None if t is None else t[torch.as_tensor(self.indices, dtype=torch.long)]

    def num_classes(self) -> int | None:
        return self.base.num_classes()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.base[self.indices[index]]


class WithoutLabels(SourceDataset):
    """The images of a data set, its labels hidden (every item's label is -1)."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.source = base, getattr(base, "source", type(base).__name__)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return split_item(self.base[index], self.source, index)[0], -1


# ----------------------------------------------------------------------------------- entry point
def resolve_source(source: Any, *, image_size: int | tuple[int, int] = 224, channels: int | None = None,
                   split: str = "all", samples: int | None = None, labels: bool = False,
                   seed: int = 0) -> SourceDataset:
    """Turn a data source (name, folder, or Python object) into a data set of ``(image, label)`` items.

    ``image_size`` (one side, or ``(height, width)``) and ``channels`` shape the images of named and
    folder sources (``channels=None``: the source's own, 1 for digits, 3 for photos); Python objects
    are not resized, and their channels are checked when ``channels`` is given. ``labels=True`` requires
    labels (:class:`DataError` otherwise). ``samples`` caps the number of items (a seeded random
    subset; for ``"sample-images"`` and ``"photos"`` it is the number of crops).

    >>> train = resolve_source("digits", image_size=16, channels=1, split="train")
    >>> x, y = train[0]; x.shape, len(train)
    (torch.Size([1, 16, 16]), 1438)
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    size = _size_hw(image_size)
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise ConfigError(f"channels must be a positive integer or None, got {channels!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"samples must be a positive integer or None, got {samples!r}")

    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if name == "digits":
            dataset: SourceDataset = DigitsImages(size, channels or 1)
        elif name in ("sample-images", "photos"):
            # sample-images: every split crops both photos (its own seed stream, so the crops differ);
            # photos: each split has its own photos.
            photos = sample_photos() if name == "sample-images" else _photo_split(all_photos(), split, seed)
            gen = torch.Generator().manual_seed(_mix_seed(seed, SPLITS.index(split)))
            crops = PhotoCrops(samples or DEFAULT_CROPS, size, channels or 3, gen, photos, name)
            return _require_labels(crops, labels)
        elif name == "imagenet-samples":
            dataset = imagenet_samples(size, channels or 3)
        elif Path(name).exists():
            dataset = _folder(Path(name), size, channels or 3)
        else:
            raise _unknown_source(name)
    else:
        dataset = _from_object(source, channels)

    if len(dataset) == 0:
        raise DataError(f"data source {dataset.source!r} is empty")
    _require_labels(dataset, labels)
    if split != "all":
        train, val = split_indices(len(dataset), dataset.targets() if dataset.stratified else None, seed)
        dataset = SubsetImages(dataset, train if split == "train" else val, split)
        if len(dataset) == 0:
            raise DataError(f"data source {dataset.source!r} is too small to split ({len(dataset)} items)")
    if samples is not None and samples < len(dataset):
        gen = torch.Generator().manual_seed(_mix_seed(seed, 7))
        keep = torch.randperm(len(dataset), generator=gen)[:samples].sort().values.tolist()
        dataset = SubsetImages(dataset, keep, f"{samples} samples")
    return dataset


def check_source(source: Any) -> None:
    """Refuse, before any model is built or loaded, a data source that :func:`resolve_source` would
    refuse by its name alone: an unknown name or a path that does not exist, or a named source whose
    package is not installed (:class:`DataError`, the same message). A folder's images, and every
    Python object, are checked when the source is resolved.

    >>> check_source("digits")
    >>> check_source("no/such/folder")
    Traceback (most recent call last):
    ...
    igc_convert.errors.DataError: unknown data source 'no/such/folder': not 'digits', 'sample-images', 'photos', 'imagenet-samples' or an existing folder
    """
    import importlib.util

    if not isinstance(source, (str, os.PathLike)):
        return
    name = os.fspath(source)
    if name == "photos" and importlib.util.find_spec("skimage") is None:
        raise DataError(_NEEDS_SKIMAGE)
    if name == "imagenet-samples" and importlib.util.find_spec("foolbox") is None:
        raise DataError(_NEEDS_FOOLBOX)
    if name not in NAMED_SOURCES and not Path(name).exists():
        raise _unknown_source(name)


def _unknown_source(name: str) -> DataError:
    names = ", ".join(repr(n) for n in NAMED_SOURCES[:-1])
    return DataError(f"unknown data source {name!r}: not {names}, {NAMED_SOURCES[-1]!r} or an existing folder")


def _size_hw(image_size: Any) -> tuple[int, int]:
    """``(height, width)`` of ``image_size``: one positive int (square) or a pair of them."""
    sides = list(image_size) if isinstance(image_size, (tuple, list)) else [image_size]
    if len(sides) not in (1, 2) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise ConfigError(f"image_size must be a positive integer or (height, width), got {image_size!r}")
    return sides[0], sides[-1]


def split_indices(n: int, targets: Tensor | None, seed: int,
                  val_fraction: float = VAL_FRACTION) -> tuple[list[int], list[int]]:
    """Deterministic disjoint ``(train, val)`` index lists; stratified by class when ``targets`` exist.

    >>> train, val = split_indices(10, None, seed=0); len(train), len(val)
    (8, 2)
    """
    gen = torch.Generator().manual_seed(_mix_seed(seed, 1))
    groups = [torch.arange(n)] if targets is None else [
        torch.nonzero(targets == c).flatten() for c in torch.unique(targets)]
    train: list[int] = []
    val: list[int] = []
    for idx in groups:
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def has_labels(dataset: Dataset) -> bool:
    """Whether a data set's items carry real labels (``label >= 0``)."""
    if isinstance(dataset, SourceDataset):
        return dataset.labelled
    return len(dataset) > 0 and split_item(dataset[0], "dataset", 0)[1] is not None


def first_image(dataset: Dataset) -> Tensor:
    """The image of a data set's first item (``C×H×W``), whether items are images or ``(image, label)``."""
    return split_item(dataset[0], getattr(dataset, "source", type(dataset).__name__), 0)[0]


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                skip_batches: int = 0, drop_last: bool = False, distributed: bool | None = None,
                num_workers: int = 0) -> DataLoader:
    """Batches of ``dataset`` in an order that depends only on ``(seed, epoch)``.

    With ``distributed`` (default: whenever ``torch.distributed`` is initialised) each process gets
    its own shard through a :class:`DistributedSampler`. ``skip_batches`` drops the first batches of
    the epoch without loading them (mid-epoch resume).

    >>> loader = make_loader(resolve_source("digits", image_size=8, channels=1), 64, shuffle=True, seed=0)
    >>> next(iter(loader))[0].shape
    torch.Size([64, 1, 8, 8])
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    import torch.distributed as dist

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    # The same sampler with one replica when not distributed: one code path, one order definition.
    # The sampler seeds its shuffle with seed + epoch: spread the seeds so (seed, epoch) pairs never collide.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=_mix_seed(seed, 0), drop_last=False)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    if drop_last:
        indices = indices[: len(indices) // batch_size * batch_size]
    indices = indices[skip_batches * batch_size :]
    # A private generator: DataLoader draws a base seed from it on every iteration; drawing from the
    # global RNG instead would make the training trajectory depend on where an epoch was resumed.
    gen = torch.Generator().manual_seed(_mix_seed(seed, epoch))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, generator=gen,
                      collate_fn=collate)


# ------------------------------------------------------------------------------------- helpers
def _mix_seed(seed: int, stream: int) -> int:
    """Independent seeds for independent random streams derived from one user seed."""
    return (int(seed) * 1_000_003 + int(stream) * 7919) % (2**63)


def collate(items: list[tuple[Tensor, int | Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack ``(image, label)`` items into ``(N×C×H×W images, N labels)`` (``N×H×W`` for class masks)."""
    xs, ys = zip(*items)
    if isinstance(ys[0], Tensor):
        return torch.stack(xs), torch.stack(ys)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _match_channels(x: Tensor, channels: int) -> Tensor:
    if channels == x.shape[0]:
        return x
    if channels == 1:
        return x.mean(0, keepdim=True)
    return x.mean(0, keepdim=True).expand(channels, -1, -1).contiguous()


def _require_labels(dataset: SourceDataset, labels: bool) -> SourceDataset:
    if labels and not dataset.labelled:
        raise DataError(f"labels were requested but data source {dataset.source!r} has none "
                        "(use a folder with one sub-folder per class, or (image, label) pairs)")
    return dataset


def _folder(root: Path, size: tuple[int, int], channels: int) -> FolderImages | SegmentationFolder:
    if not root.is_dir():
        raise DataError(f"data source {str(root)!r} is a file, not a folder of images")
    if channels not in (1, 3):
        raise ConfigError(f"folders of images give 1 or 3 channels, not {channels}")
    pairs = _segmentation_pairs(root)
    if pairs is not None:
        _check_image_files([f for pair in pairs for f in pair])
        return SegmentationFolder(pairs, size, channels, str(root))
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if p.is_file() and _is_image_name(p)]
    class_dirs = [p for p in entries if p.is_dir()]
    by_class = {d.name: sorted(f for f in d.rglob("*") if f.is_file() and _is_image_name(f)
                               and not any(part.startswith(".") for part in f.relative_to(d).parts))
                for d in class_dirs}
    by_class = {k: v for k, v in by_class.items() if v}
    if by_class and loose:
        raise DataError(f"folder {str(root)!r} mixes loose images ({loose[0].name}, ...) with class "
                        f"sub-folders ({', '.join(sorted(by_class))}); use one layout")
    if by_class:
        classes = sorted(by_class)
        files = [f for c in classes for f in by_class[c]]
        targets = [i for i, c in enumerate(classes) for _ in by_class[c]]
    else:
        classes, files, targets = [], loose, None
    if not files:
        raise DataError(f"folder {str(root)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    _check_image_files(files)
    return FolderImages(files, targets, classes, size, channels, str(root))


#: Sub-folder names of a segmentation data set: its images, and its class masks (same file stems).
SEGMENTATION_IMAGES = ("images", "JPEGImages")
SEGMENTATION_MASKS = ("masks", "labels", "annotations", "SegmentationClass")


def _segmentation_pairs(root: Path) -> list[tuple[Path, Path]] | None:
    """``(image, mask)`` files of a segmentation folder (``images/`` and ``masks/``, or Pascal VOC's
    ``JPEGImages/`` and ``SegmentationClass/``, ...), matched by file stem; None for other layouts."""
    images = next((root / n for n in SEGMENTATION_IMAGES if (root / n).is_dir()), None)
    masks = next((root / n for n in SEGMENTATION_MASKS if (root / n).is_dir()), None)
    if images is None or masks is None:
        return None
    by_stem = {p.stem: p for p in sorted(masks.iterdir()) if p.is_file() and _is_image_name(p)}
    files = [p for p in sorted(images.iterdir()) if p.is_file() and _is_image_name(p) and not p.name.startswith(".")]
    if not files:
        raise DataError(f"folder {str(images)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    missing = [p.name for p in files if p.stem not in by_stem]
    if missing:
        raise DataError(f"{len(missing)} image(s) of {str(images)!r} have no mask of the same name in "
                        f"{str(masks)!r}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return [(p, by_stem[p.stem]) for p in files]


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _check_image_files(files: Sequence[Path]) -> None:
    """Fail early on files that are not images: ``Image.open`` reads only the header (fast)."""
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    # The bar shows up only on big folders (ImageNet: about a minute), never on small ones.
    for path in tqdm(files, desc="checking images", unit="file", delay=2, leave=False):
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - the header parse is the check
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {str(path)!r}: {err}") from None


def _from_object(obj: Any, channels: int | None) -> SourceDataset:
    name = type(obj).__name__
    if isinstance(obj, SourceDataset):
        return obj
    if isinstance(obj, DataLoader):
        # Our own loader sets batch size, order and sharding; the user's data set is what we need.
        return _from_object(obj.dataset, channels)
    if isinstance(obj, Tensor):
        images = _check_batch(obj, f"tensor of shape {tuple(obj.shape)}", channels)
        return TensorImages(images, None, f"tensor {tuple(obj.shape)}")
    if isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__"):
        if len(obj) == 0:
            raise DataError(f"data set {name} is empty")
        x, y = split_item(obj[0], name, 0)
        x = _check_image(x, name, channels, what="item 0")
        per_pixel = _is_mask(y)
        if per_pixel:
            _check_mask(y, x, name, 0)
        elif y is not None:
            _check_label(y, name, 0)
        return WrappedDataset(obj, name, y is not None, channels, per_pixel)
    if isinstance(obj, (Mapping, bytes)) or not isinstance(obj, Iterable):
        raise DataError(f"cannot use a {name} as data: give 'digits', 'sample-images', a folder, a Dataset, "
                        "a DataLoader, an N×C×H×W tensor, or an iterable of tensors / (x, y) pairs / dicts")
    return _materialise(obj, name, channels)


def _materialise(iterable: Iterable, name: str, channels: int | None) -> TensorImages:
    """Collect an iterable of images/batches (optionally with labels) into memory."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    labelled: bool | None = None
    for i, item in enumerate(iterable):
        x, y = split_item(item, name, i)
        if labelled is None:
            labelled = y is not None
        elif labelled != (y is not None):
            raise DataError(f"{name}: item {i} {'has no' if labelled else 'has a'} label, unlike item 0")
        if not isinstance(x, Tensor):
            raise DataError(f"{name}: item {i} is a {type(x).__name__}, not a tensor")
        batch = _check_batch(x if x.dim() == 4 else x.unsqueeze(0) if x.dim() == 3 else x,
                             f"{name} item {i} of shape {tuple(x.shape)}", channels)
        xs.append(batch)
        if _is_mask(y) or (isinstance(y, Tensor) and y.dim() == 3 and y.shape[-2:] == x.shape[-2:]):
            raise DataError(f"{name}: item {i} has a class mask; masks are read from a map-style Dataset "
                            "(or a folder of images/ and masks/), not from an iterable")
        if y is not None:
            y = torch.as_tensor(y).reshape(-1)
            if len(y) != len(batch):
                raise DataError(f"{name}: item {i} has {len(batch)} images but {len(y)} labels")
            ys.append(y)
    if not xs:
        raise DataError(f"data source {name} is empty")
    sizes = {tuple(b.shape[1:]) for b in xs}
    if len(sizes) > 1:
        raise DataError(f"{name}: images of different shapes {sorted(sizes)}; resize them to one size")
    labels = None
    if labelled:
        labels = torch.cat(ys)
        if labels.is_floating_point() or (labels < 0).any():
            raise DataError(f"{name}: labels must be non-negative integers, got {labels[:5].tolist()}...")
        labels = labels.long()
    return TensorImages(torch.cat(xs), labels, name)


#: Keys under which a dict item (Hugging Face ``datasets``, many training loops) holds its images / labels.
IMAGE_KEYS = ("pixel_values", "image", "images", "img", "input", "inputs", "x")
LABEL_KEYS = ("labels", "label", "target", "targets", "y")


def split_item(item: Any, source: str, index: int) -> tuple[Any, Any]:
    """``x``, ``(x, y)`` (also ``[x, y]``, or ``(x,)``) or a dict -> ``(x, y or None)``.

    A dict gives its images under the first of :data:`IMAGE_KEYS` it has (``{"pixel_values": x,
    "labels": y}``) and its labels under the first of :data:`LABEL_KEYS`.
    """
    if isinstance(item, Mapping):
        key = next((k for k in IMAGE_KEYS if k in item), None)
        if key is None:
            raise DataError(f"{source}: item {index} is a dict with keys {sorted(map(str, item))[:8]}; its images "
                            f"must be under one of {', '.join(IMAGE_KEYS)}")
        label = next((k for k in LABEL_KEYS if k in item), None)
        return item[key], item[label] if label is not None else None
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return item[0], None
        if len(item) == 2:
            return item[0], item[1]
        raise DataError(f"{source}: item {index} has {len(item)} parts; expected an image or (image, label)")
    return item, None


def _check_image(x: Any, source: str, channels: int | None, *, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise DataError(f"{source}: {what} is a {type(x).__name__}, not a tensor (C×H×W float)")
    if x.dim() != 3:
        raise DataError(f"{source}: {what} has shape {tuple(x.shape)}; expected one image C×H×W")
    if not x.is_floating_point():
        raise DataError(f"{source}: {what} has dtype {x.dtype}; expected float images (normalised)")
    if channels is not None and x.shape[0] != channels:
        raise DataError(f"{source}: {what} has shape {tuple(x.shape)}: {x.shape[0]} channels, the model "
                        f"takes {channels}")
    return x.float()


def _check_batch(x: Tensor, what: str, channels: int | None) -> Tensor:
    if x.dim() != 4:
        raise DataError(f"{what}: expected images N×C×H×W (or one image C×H×W), got rank {x.dim()}")
    if not x.is_floating_point():
        raise DataError(f"{what}: dtype {x.dtype}; expected float images (normalised)")
    if channels is not None and x.shape[1] != channels:
        raise DataError(f"{what}: {x.shape[1]} channels, the model takes {channels}")
    if x.shape[0] == 0:
        raise DataError(f"{what}: no images")
    if not torch.isfinite(x).all():
        raise DataError(f"{what}: contains NaN or Inf")
    return x.detach().float().cpu()


def _is_mask(y: Any) -> bool:
    """Whether a label is a class mask: an integer tensor or array of two dimensions (``H×W``)."""
    return getattr(y, "ndim", None) == 2 and not torch.as_tensor(y).is_floating_point()


def _check_mask(y: Any, x: Tensor, source: str, index: int) -> Tensor:
    """A class mask as an ``H×W`` long tensor of the image's size, 255 (ignore) as -1."""
    mask = torch.as_tensor(y)  # may share the caller's memory: masked_fill below returns a new tensor
    if mask.dim() != 2 or mask.is_floating_point() or tuple(mask.shape) != tuple(x.shape[-2:]):
        raise DataError(f"{source}: item {index}'s class mask must be an H×W integer tensor of the image's size "
                        f"{tuple(x.shape[-2:])}, got {tuple(mask.shape)} {mask.dtype}")
    mask = mask.long()
    if (mask < 0).any():
        raise DataError(f"{source}: item {index}'s class mask holds negative values")
    return mask.masked_fill(mask == MASK_IGNORE, -1)


def _check_label(y: Any, source: str, index: int) -> int:
    if isinstance(y, Tensor):
        if y.numel() != 1 or y.is_floating_point():
            raise DataError(f"{source}: label of item {index} must be one integer, got {y!r}")
        y = y.item()
    try:
        value = None if isinstance(y, bool) else operator.index(y)  # int or numpy integer, not bool
    except TypeError:
        value = None
    if value is None or value < 0:
        raise DataError(f"{source}: label of item {index} must be a non-negative integer, got {y!r}")
    return value

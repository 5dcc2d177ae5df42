"""Data sources: digits split, photo crops, folders, Python objects, loaders; every bad input a DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from igc_convert.data import (DIGITS_MEAN, DIGITS_STD, has_labels, make_loader, resolve_source,
                              split_indices)
from igc_convert.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------ digits
def test_digits_split_is_disjoint_stratified_and_complete():
    train = resolve_source("digits", image_size=8, channels=1, split="train")
    val = resolve_source("digits", image_size=8, channels=1, split="val")
    everything = resolve_source("digits", image_size=8, channels=1)
    assert (len(train), len(val), len(everything)) == (1438, 359, 1797)
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(1797))
    # Stratified: every class is ~20% validation.
    counts = torch.bincount(val.targets(), minlength=10).float() / torch.bincount(everything.targets()).float()
    assert ((counts - 0.2).abs() < 0.02).all(), counts


def test_digits_split_is_a_function_of_the_seed():
    a = resolve_source("digits", split="val", seed=0, image_size=8, channels=1)
    b = resolve_source("digits", split="val", seed=0, image_size=8, channels=1)
    c = resolve_source("digits", split="val", seed=1, image_size=8, channels=1)
    assert a.indices == b.indices != c.indices


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 1), (32, 3)], ids=["native", "16px", "32px-rgb"])
def test_digits_images_are_resized_normalised_and_replicated(size, channels):
    data = resolve_source("digits", image_size=size, channels=channels)
    x, y = data[5]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert 0 <= y <= 9 and data.labelled
    if channels == 3:
        torch.testing.assert_close(x[0], x[2])
    if size == 8:  # the fixed normalisation is the data's own statistics at native size
        all_x = torch.stack([data[i][0] for i in range(len(data))])
        assert abs(all_x.mean().item()) < 1e-3 and abs(all_x.std().item() - 1) < 1e-3
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images[5], dtype=torch.float32) / 16
    if size == 8:
        torch.testing.assert_close(x[0] * DIGITS_STD + DIGITS_MEAN, raw)


def test_samples_takes_a_seeded_subset_of_the_split():
    val = resolve_source("digits", image_size=8, channels=1, split="val")
    some = resolve_source("digits", image_size=8, channels=1, split="val", samples=50)
    assert len(some) == 50
    assert set(val.indices[i] for i in some.indices) <= set(val.indices)


# ------------------------------------------------------------------------------------ sample images
def test_sample_images_are_seeded_crops():
    a = resolve_source("sample-images", image_size=32, samples=10, seed=3)
    b = resolve_source("sample-images", image_size=32, samples=10, seed=3)
    c = resolve_source("sample-images", image_size=32, samples=10, seed=3, split="val")
    assert len(a) == 10 and not a.labelled and a[0][1] == -1
    assert a[0][0].shape == (3, 32, 32)
    assert a.boxes == b.boxes and a.boxes != c.boxes
    assert len({box for box in a.boxes}) == 10  # different crops
    x = torch.stack([a[i][0] for i in range(10)])
    assert -3 < x.mean() < 3 and x.std() > 0.3  # ImageNet-normalised photos, not constant


def test_photos_split_holds_out_whole_photos_of_both_kinds():
    pytest.importorskip("skimage")
    train = resolve_source("photos", image_size=24, samples=300, split="train")
    val = resolve_source("photos", image_size=24, samples=12, split="val")
    everything = resolve_source("photos", image_size=24, samples=8)
    assert len(everything.names) == 18 and {"china.jpg", "grace_hopper.jpg", "astronaut"} <= set(everything.names)
    assert not set(train.names) & set(val.names) and len(train.names) + len(val.names) == 18
    assert len(train) == 300 and len(val) == 12 and train[0][0].shape == (3, 24, 24) and train[0][1] == -1

    def grey(ds):
        return {n for n, p in zip(ds.names, ds.photos) if torch.allclose(p[0] * 0.229 + 0.485, p[1] * 0.224 + 0.456, atol=1e-5)}

    # Stratified by colour: both splits hold colour and grey photos (the val split is not all grey).
    assert grey(val) and set(val.names) - grey(val) and grey(train) and set(train.names) - grey(train)
    assert {box[0] for box in train.boxes} == set(range(len(train.names)))  # crops spread over the photos
    assert resolve_source("photos", image_size=24, samples=12, split="val", seed=1).names != val.names


def test_photos_without_scikit_image_is_a_data_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "skimage", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(DataError, match=r"igc-convert\[photos\]"):
        resolve_source("photos")


def test_imagenet_samples_are_labelled_imagenet_validation_images():
    pytest.importorskip("foolbox")
    everything = resolve_source("imagenet-samples", labels=True)
    train = resolve_source("imagenet-samples", split="train")
    val = resolve_source("imagenet-samples", split="val")
    assert (len(everything), len(train), len(val)) == (20, 16, 4)  # unstratified: 19 classes in 20 images
    assert not set(train.indices) & set(val.indices)
    assert everything.num_classes() == 1000 and everything.labelled
    labels = everything.targets()
    assert len(set(labels.tolist())) == 19 and labels.min() >= 0 and labels.max() < 1000
    x, y = everything[0]
    assert x.shape == (3, 224, 224) and y == labels[0]
    assert abs(x.mean().item()) < 1.5 and 0.3 < x.std().item() < 2  # ImageNet-normalised photo
    grey = resolve_source("imagenet-samples", image_size=(96, 128), channels=1)
    assert grey[0][0].shape == (1, 96, 128)


def test_imagenet_samples_without_foolbox_is_a_data_error(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "foolbox" else find_spec(name, *a))
    with pytest.raises(DataError, match=r"igc-convert\[imagenet-samples\]"):
        resolve_source("imagenet-samples")


def test_labels_requested_on_unlabelled_sources_is_a_data_error():
    with pytest.raises(DataError, match="sample-images.*none"):
        resolve_source("sample-images", labels=True)
    with pytest.raises(DataError, match="none"):
        resolve_source(torch.randn(4, 3, 8, 8), labels=True)


# ------------------------------------------------------------------------------------ folders
def _png(path: Path, color: int, size=(40, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "L" else (color, 255 - color, color // 2)).save(path)


def test_folder_with_class_subfolders_gives_labels(tmp_path):
    for cls, color in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", color)
    _png(tmp_path / "dog" / "grey.png", 90, mode="L")  # grey images are converted to RGB
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    data = resolve_source(tmp_path, image_size=16)
    assert data.labelled and data.classes == ["cat", "dog"]
    assert len(data) == 7 and data.targets().tolist() == [0, 0, 0, 1, 1, 1, 1]
    x, y = data[4]
    assert x.shape == (3, 16, 16) and y == 1
    assert resolve_source(tmp_path, image_size=16, channels=1)[0][0].shape == (1, 16, 16)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.jpg", 30 * i)
    data = resolve_source(tmp_path, image_size=20)
    assert not data.labelled and len(data) == 4 and data[0][1] == -1
    assert data[0][0].shape == (3, 20, 20)
    with pytest.raises(DataError, match="labels were requested"):
        resolve_source(tmp_path, labels=True)


@pytest.mark.parametrize("case", ["empty", "only-text", "garbage-png", "mixed-layout"])
def test_bad_folders_are_data_errors_naming_the_path(tmp_path, case):
    if case == "only-text":
        (tmp_path / "readme.txt").write_text("hello")
    elif case == "garbage-png":
        _png(tmp_path / "good.png", 5)
        (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    elif case == "mixed-layout":
        _png(tmp_path / "loose.png", 5)
        _png(tmp_path / "cls" / "a.png", 5)
    with pytest.raises(DataError) as err:
        resolve_source(tmp_path)
    assert str(tmp_path) in str(err.value)
    if case == "garbage-png":
        assert "bad.png" in str(err.value)


def test_truncated_image_fails_when_read_naming_the_file(tmp_path):
    _png(tmp_path / "ok.png", 5)
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])  # a valid header, half the data
    data = resolve_source(tmp_path, image_size=8)
    with pytest.raises(DataError, match="cut.png"):
        [data[i] for i in range(len(data))]


def test_missing_path_and_unknown_name_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data source"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown data source"):
        resolve_source("imagenet")


def test_check_source_refuses_by_name_what_resolve_source_would(tmp_path, monkeypatch):
    import importlib.util

    from igc_convert.data import check_source

    for bad in (tmp_path / "nope", "imagenet"):
        with pytest.raises(DataError, match="unknown data source") as early:
            check_source(bad)
        with pytest.raises(DataError) as late:
            resolve_source(bad)
        assert str(early.value) == str(late.value)
    for good in ("digits", "sample-images", "photos", "imagenet-samples", tmp_path, torch.zeros(2, 3, 8, 8)):
        check_source(good)  # an empty folder and a Python object are left to resolve_source
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("skimage", "foolbox") else real(name, *a))
    with pytest.raises(DataError, match=r"needs scikit-image: pip install 'igc-convert\[photos\]'"):
        check_source("photos")
    with pytest.raises(DataError, match=r"pip install 'igc-convert\[imagenet-samples\]'"):
        check_source("imagenet-samples")


# ------------------------------------------------------------------------------------ Python objects
def test_tensor_source_is_wrapped_unlabelled():
    x = torch.randn(6, 3, 10, 12)
    data = resolve_source(x)
    assert len(data) == 6 and not data.labelled
    torch.testing.assert_close(data[2][0], x[2])


@pytest.mark.parametrize("bad, pattern", [
    (torch.randn(3, 8, 8), "rank 3"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), "uint8"),
    (torch.randn(2, 1, 8, 8), "1 channels"),
    (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
    (torch.randn(0, 3, 4, 4), "no images"),
], ids=["rank", "dtype", "channels", "nan", "empty"])
def test_bad_tensors_are_data_errors_naming_the_shape(bad, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        resolve_source(bad, channels=3)
    assert str(tuple(bad.shape)) in str(err.value)


def test_iterable_of_labelled_batches_and_of_single_images():
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])), (torch.randn(2, 3, 8, 8), torch.tensor([4, 5]))]
    data = resolve_source(iter(batches))
    assert data.labelled and len(data) == 6 and data[5][1] == 5
    singles = resolve_source([torch.randn(3, 8, 8) for _ in range(5)])
    assert not singles.labelled and len(singles) == 5


@pytest.mark.parametrize("bad, pattern", [
    ([(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])), torch.randn(2, 3, 8, 8)], "has no label"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 9, 9)], "different shapes"),
    ([(torch.randn(2, 3, 8, 8), torch.tensor([0, 1, 2]))], "2 images but 3 labels"),
    ([(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 1.0]))], "non-negative integers"),
    ([np.zeros((3, 8, 8))], "not a tensor"),
    ([], "empty"),
    ({"a": 1}, "cannot use a dict"),
], ids=["mixed-labels", "mixed-sizes", "label-count", "float-labels", "numpy", "empty", "dict"])
def test_bad_iterables_are_data_errors(bad, pattern):
    with pytest.raises(DataError, match=pattern):
        resolve_source(bad)


def test_dataset_and_dataloader_are_wrapped():
    ds = TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10))
    data = resolve_source(ds)
    assert data.labelled and len(data) == 10 and data[3][1] == 3
    via_loader = resolve_source(DataLoader(ds, batch_size=4))
    assert via_loader.dataset is ds
    assert has_labels(data) and not has_labels(resolve_source(torch.randn(2, 3, 8, 8)))
    train, val = (resolve_source(ds, split=s) for s in ("train", "val"))
    assert len(train) + len(val) == 10 and not set(train.indices) & set(val.indices)


class _DictItems(torch.utils.data.Dataset):
    """Items as Hugging Face ``datasets`` gives them with a torch transform."""

    def __init__(self, keys=("pixel_values", "labels")):
        self.x, self.y, self.keys = torch.randn(6, 3, 8, 8), torch.arange(6), keys

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return dict(zip(self.keys, (self.x[i], self.y[i])))


def test_dict_items_give_their_images_and_labels():
    ds = _DictItems()
    data = resolve_source(DataLoader(ds, batch_size=4))
    assert data.labelled and len(data) == 6
    torch.testing.assert_close(data[2][0], ds.x[2])
    assert data[2][1] == 2
    batches = resolve_source([{"image": ds.x[:3]}, {"image": ds.x[3:]}])  # an iterable of dict batches
    assert len(batches) == 6 and not batches.labelled
    with pytest.raises(DataError, match=r"keys \['feat', 'labels'\].*pixel_values"):
        resolve_source(_DictItems(keys=("feat", "labels")))


def test_dataset_with_bad_items_is_a_data_error():
    with pytest.raises(DataError, match="shape"):
        resolve_source(TensorDataset(torch.randn(4, 8, 8)))  # items are 2-D
    with pytest.raises(DataError, match="channels"):
        resolve_source(TensorDataset(torch.randn(4, 1, 8, 8)), channels=3)
    with pytest.raises(DataError, match="label"):
        resolve_source(TensorDataset(torch.randn(4, 3, 8, 8), -torch.ones(4, dtype=torch.long)))


@pytest.mark.parametrize("kwargs", [dict(split="test"), dict(image_size=0), dict(image_size=(32, 0)),
                                    dict(image_size=(8, 8, 8)), dict(image_size=8.0), dict(channels=0),
                                    dict(samples=0)],
                         ids=["split", "size", "height-width", "three-sides", "float", "channels", "samples"])
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        resolve_source("digits", **kwargs)


# ------------------------------------------------------------------------------------ loaders
def _order(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loader_order_is_a_function_of_seed_and_epoch():
    labelled = resolve_source([(torch.randn(40, 1, 2, 2), torch.arange(40))])  # label = index: order readable
    orders = {(s, e): _order(make_loader(labelled, 8, shuffle=True, seed=s, epoch=e)) for s in (0, 1) for e in (0, 1)}
    assert _order(make_loader(labelled, 8, shuffle=True, seed=0, epoch=0)) == orders[0, 0]
    assert len({tuple(o) for o in orders.values()}) == 4
    assert sorted(orders[0, 0]) == list(range(40))
    tail = _order(make_loader(labelled, 8, shuffle=True, seed=0, epoch=1, skip_batches=2))
    assert tail == orders[0, 1][16:]
    assert _order(make_loader(labelled, 8, shuffle=False)) == list(range(40))
    assert len(make_loader(labelled, 16, shuffle=True, drop_last=True)) == 2


@pytest.mark.parametrize("n, targets", [(10, None), (97, torch.arange(97) % 5), (3, torch.tensor([0, 1, 2]))],
                         ids=["unlabelled", "five-classes", "singletons"])
def test_split_indices_partition(n, targets):
    train, val = split_indices(n, targets, seed=0)
    assert sorted(train + val) == list(range(n)) and not set(train) & set(val)


@pytest.mark.parametrize("channels", [3, 1])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, channels):
    """A 16-bit PNG (medical, scientific scans) came out all white and a 0-1 float TIFF all black:
    Pillow's convert() clips such modes to 8 bits. Both now read as the 8-bit image they hold."""
    grey = (np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a_8bit.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "b_16bit.png")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "c_float.tiff")
    data = resolve_source(tmp_path, image_size=32, channels=channels)
    assert [f.name for f in data.files] == ["a_8bit.png", "b_16bit.png", "c_float.tiff"]
    assert Image.open(tmp_path / "b_16bit.png").mode.startswith("I")
    torch.testing.assert_close(data[1][0], data[0][0])
    torch.testing.assert_close(data[2][0], data[0][0])


def test_an_image_over_pillows_pixel_limit_is_a_data_error(tmp_path, monkeypatch):
    """Pillow refuses images over 2 x MAX_IMAGE_PIXELS (decompression bombs) with its own exception type,
    which escaped as a traceback; it is a DataError naming the file (here with the limit lowered)."""
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="big.png.*exceeds limit"):
        resolve_source(tmp_path, image_size=32)


def test_camera_orientation_is_applied(tmp_path):
    """Phone and camera JPEGs store the sensor's pixels and say in EXIF how to turn them. Calibration
    and fine-tuning read such photos sideways; they are now turned as every image viewer shows them."""
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:16] = 255  # top half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    x, _ = resolve_source(tmp_path, image_size=32)[0]
    left, right = x[..., :12].mean(), x[..., -12:].mean()
    top, bottom = x[..., :12, :].mean(), x[..., -12:, :].mean()
    assert right - left > 3 and abs(top - bottom) < 0.5  # turned: the white half is on the right


def test_every_named_and_folder_source_gives_non_square_images(tmp_path):
    """A model trained on non-square inputs (text lines, pose crops) calibrates and fine-tunes on images of
    its own (height, width): digits are resized, photos cropped at that aspect ratio, folder images scaled
    to cover it and centre-cropped, with nothing squeezed."""
    for name in ("digits", "sample-images"):
        x, _ = resolve_source(name, image_size=(12, 40), samples=4)[0]
        assert x.shape[-2:] == (12, 40)
    crops = resolve_source("sample-images", image_size=(12, 40), samples=16)
    for which, top, left, h, w in crops.boxes:  # the crops keep the output's aspect: no squeezing
        photo_h, photo_w = crops.photos[which].shape[1:]
        assert abs(w / h - 40 / 12) < 0.05 and top + h <= photo_h and left + w <= photo_w
    # A folder image whose left half is dark and right half bright: a 2:1 crop of a square image
    # keeps its middle rows at full width, so the halves stay where they are.
    square = np.zeros((60, 60, 3), np.uint8)
    square[:, 30:] = 255
    Image.fromarray(square).save(tmp_path / "halves.png")
    for size in ((16, 32), (32, 16)):
        x, _ = resolve_source(tmp_path, image_size=size)[0]
        assert x.shape == (3, *size)
        w = size[1]
        assert x[..., : w // 2 - 2].max() < -1 and x[..., w // 2 + 2 :].min() > 1
    torch.testing.assert_close(resolve_source(tmp_path, image_size=(24, 24))[0][0],
                               resolve_source(tmp_path, image_size=24)[0][0])


def _segmentation_folder(root: Path, count: int = 6, size: tuple[int, int] = (40, 60)) -> Path:
    """images/ + masks/: a bright rectangle on a dark image, class 1 in its mask, 255 (ignore) on its
    edge, 0 elsewhere; palette PNG masks, as Pascal VOC's."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        h, w = size
        image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        image[top : top + h // 2, left : left + w // 2] = 220
        mask[top : top + h // 2, left : left + w // 2] = 1
        mask[top, left : left + w // 2] = 255
        Image.fromarray(image).save(root / "images" / f"scene{i}.jpg", quality=95)
        palette = Image.fromarray(mask, mode="L").convert("P")
        palette.save(root / "masks" / f"scene{i}.png")
    return root


def test_a_folder_of_images_and_masks_gives_per_pixel_labels(tmp_path):
    """images/ and masks/ were read as an ImageFolder of two classes, "images" and "masks". They are a
    segmentation data set: each item is an image and its class mask, cropped and resized alike (nearest
    for the mask), 255 read as -1 (ignored); a non-square size and the train/val split work as for any
    folder."""
    root = _segmentation_folder(tmp_path / "seg")
    data = resolve_source(root, image_size=(16, 24))
    assert len(data) == 6 and data.labelled and data.per_pixel and has_labels(data)
    x, y = data[0]
    assert x.shape == (3, 16, 24) and y.shape == (16, 24) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {-1, 0, 1} and (y == 1).any() and (y == 0).any()
    bright = x.mean(0) > 0.5  # the rectangle, where the mask says class 1
    assert (bright[y == 1]).float().mean() > 0.95 and (bright[y == 0]).float().mean() < 0.05
    train, val = resolve_source(root, image_size=16, split="train"), resolve_source(root, image_size=16, split="val")
    assert len(train) + len(val) == 6 and train.per_pixel and val.per_pixel
    images, masks = make_loader(train, 4, shuffle=False).__iter__().__next__()
    assert images.shape == (4, 3, 16, 16) and masks.shape == (4, 16, 16)


def test_a_segmentation_folder_with_a_missing_or_colour_mask_is_refused(tmp_path):
    root = _segmentation_folder(tmp_path / "seg")
    (root / "masks" / "scene3.png").unlink()
    with pytest.raises(DataError, match="1 image.* have no mask of the same name.*scene3.jpg"):
        resolve_source(root)
    Image.new("RGB", (60, 40), (255, 0, 0)).save(root / "masks" / "scene3.png")
    with pytest.raises(DataError, match="scene3.png.*RGB mode.*not colours"):
        resolve_source(root, image_size=16)[3]


def test_a_dataset_of_images_and_class_masks_gives_per_pixel_labels():
    """Hugging Face segmentation data sets give {"pixel_values": image, "labels": H×W mask}: such a mask
    was refused as "label must be one integer". It is a per-pixel label (255 ignored); a mask of
    another size, or masks in a plain iterable, get a clear error."""
    class Masks(torch.utils.data.Dataset):
        def __init__(self, size=(8, 10)):
            self.size = size

        def __len__(self):
            return 5

        def __getitem__(self, i):
            mask = torch.zeros(self.size, dtype=torch.uint8)
            mask[: i + 1] = 1
            mask[-1] = 255
            return {"pixel_values": torch.randn(3, 8, 10), "labels": mask}

    data = resolve_source(Masks(), labels=True)
    assert data.labelled and data.per_pixel and data.targets() is None
    x, y = data[2]
    assert y.shape == (8, 10) and y.dtype == torch.long and (y[:3] == 1).all() and (y[-1] == -1).all()
    with pytest.raises(DataError, match=r"class mask must be an H×W integer tensor of the image's size \(8, 10\)"):
        resolve_source(Masks(size=(4, 5)))
    with pytest.raises(DataError, match="masks are read from a map-style Dataset"):
        resolve_source([Masks()[i] for i in range(2)])

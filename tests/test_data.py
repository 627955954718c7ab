"""Datasets: idx parsing, Fashion-MNIST layout, photo crops, ImageFolder, CIFAR-10, factory."""

import gzip
import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require
from ldetok import data
from ldetok.data import (
    CIFAR10,
    FashionMNIST,
    ImageFolderDataset,
    PhotoCrops,
    build_dataset,
    bundled_photos,
    center_crop_adm,
    read_idx,
)


# ------------------------------------------------------------------ helpers
def write_idx(path, arr):
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def write_fmnist(folder, n=6, gz=True, seed=0):
    """A tiny Fashion-MNIST lookalike: both splits, random images, labels 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return folder


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """Hide the system Fashion-MNIST so that only what a test writes is found."""
    monkeypatch.setattr(data, "FASHION_SYSTEM_GLOBS", [str(tmp_path / "nowhere" / "*fashion*")])


# ------------------------------------------------------------------ idx files
@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_roundtrip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, (3, 5, 7))
    write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 7)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated_and_bad_magic(tmp_path):
    write_idx(tmp_path / "full", np.zeros((4, 28, 28)))
    raw = (tmp_path / "full").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="cut.*truncated"):
        read_idx(tmp_path / "cut")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-30])  # gzip stream cut short
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x03" + raw[4:])
    with pytest.raises(ValueError, match="bad.*not an idx file"):
        read_idx(tmp_path / "bad")


# ------------------------------------------------------------------ Fashion-MNIST
@pytest.mark.parametrize("layout,gz", [("flat", True), ("flat", False), ("torchvision", False)])
def test_fashion_mnist_local_root(tmp_path, no_system_fmnist, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    write_fmnist(folder, n=6, gz=gz)
    ds = FashionMNIST(root=tmp_path, split="test")
    assert len(ds) == 6 and ds.num_classes == 10 and len(ds.classes) == 10
    assert ds.images_uint8.shape == (6, 28, 28) and ds.images_uint8.dtype == np.uint8
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and y == 3
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_fashion_mnist_padding_channels_sizes(tmp_path, no_system_fmnist):
    write_fmnist(tmp_path, n=4)
    ds = FashionMNIST(root=tmp_path)
    xb, yb = ds.tensor_batch([0, 2])
    expect = torch.from_numpy(ds.images_uint8[[0, 2]]).float() / 127.5 - 1
    # The 28x28 original sits in the middle; the 2-pixel border is black (-1).
    torch.testing.assert_close(xb[:, 0, 2:30, 2:30], expect)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (xb[:, 0][:, border] == -1).all()
    assert yb.tolist() == [0, 2] and yb.dtype == torch.int64
    torch.testing.assert_close(ds[2][0], xb[1])  # single items and batches agree

    rgb = FashionMNIST(root=tmp_path, channels=3)[0][0]
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert FashionMNIST(root=tmp_path, image_size=28)[0][0].shape == (1, 28, 28)
    big = FashionMNIST(root=tmp_path, image_size=64, channels=3)[0][0]
    assert big.shape == (3, 64, 64) and big.min() >= -1 and big.max() <= 1
    assert (big[:, :2] == -1).all()  # the padded border survives the resize


def test_fashion_mnist_missing_and_bad_args(tmp_path, no_system_fmnist):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        FashionMNIST(root=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.ensure_default_data()
    assert data.default_data_available()["fashion_mnist"] is None
    write_fmnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(root=tmp_path, split="val")
    with pytest.raises(ValueError, match="channels"):
        FashionMNIST(root=tmp_path, channels=2)


def test_real_fashion_mnist():
    require(data.find_fashion_mnist(None, "train") is not None,
            f"Fashion-MNIST in {data.FASHION_SYSTEM_GLOBS} (`make test` installs the Debian package "
            "dataset-fashion-mnist; or apt-get install dataset-fashion-mnist)")
    assert data.ensure_default_data().is_dir()
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test", channels=3)
    assert train.images_uint8.shape == (60000, 28, 28) and len(test) == 10000
    assert np.bincount(train.labels).tolist() == [6000] * 10
    x, y = test.tensor_batch(np.arange(0, 10000, 1000))
    assert x.shape == (10, 3, 32, 32) and x.min() == -1 and x.max() <= 1 and y.max() < 10


# ------------------------------------------------------------------ photo crops
def test_bundled_photos():
    photos = bundled_photos()
    assert len(photos) == 11 and {"astronaut", "china", "grace_hopper", "stereo_motorcycle"} <= set(photos)
    for name, img in photos.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name


def test_photo_crops_deterministic_per_seed():
    a, b = PhotoCrops(num_crops=64, seed=3), PhotoCrops(num_crops=64, seed=3)
    c = PhotoCrops(num_crops=64, seed=4)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.boxes, c.boxes)
    assert torch.equal(a.tensor_batch(range(64))[0], b.tensor_batch(range(64))[0])
    assert a.num_classes == len(a.photo_names) == 11 and a.labels.min() >= 0 and a.labels.max() < 11


@pytest.mark.parametrize("size", [32, 64, 256])
@pytest.mark.parametrize("split", ["train", "val"])
def test_photo_crops_sizes(size, split):
    ds = PhotoCrops(split=split, image_size=size, num_crops=24, seed=1)
    x, y = ds.tensor_batch(np.arange(24))
    assert x.shape == (24, 3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05  # real pixels, not a constant
    assert torch.equal(ds[5][0], x[5]) and ds[5][1] == int(y[5])
    side = ds.boxes[:, 2] - ds.boxes[:, 0]
    assert (side == ds.boxes[:, 3] - ds.boxes[:, 1]).all() and (side > 0).all()  # square boxes


def test_photo_crops_train_val_disjoint():
    train = PhotoCrops("train", num_crops=3000, seed=0)
    val = PhotoCrops("val", num_crops=1000, seed=0)
    photos = list(bundled_photos().values())
    for k, img in enumerate(photos):
        t, v = train.boxes[train.labels == k], val.boxes[val.labels == k]
        assert len(t) and len(v)
        for boxes in (t, v):  # inside the photo
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= img.shape[1]).all() and (boxes[:, 3] <= img.shape[0]).all()
        # Half-open boxes [x0, x1) x [y0, y1) intersect iff they overlap on both axes.
        ox = (t[:, None, 0] < v[None, :, 2]) & (v[None, :, 0] < t[:, None, 2])
        oy = (t[:, None, 1] < v[None, :, 3]) & (v[None, :, 1] < t[:, None, 3])
        assert not (ox & oy).any(), f"train/val crops overlap in photo {k}"


def test_photo_crops_bad_args():
    with pytest.raises(ValueError, match="split"):
        PhotoCrops(split="test")
    with pytest.raises(ValueError, match="min_scale"):
        PhotoCrops(min_scale=0.6, max_scale=0.5)


# ------------------------------------------------------------------ ImageFolder
def save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


@pytest.fixture
def image_folder(tmp_path):
    """3 classes: PNG, grayscale, truncated PNG | JPEG, RGBA | garbage, nested 16-bit PNG."""
    root = tmp_path / "imgs"
    ramp = np.tile(np.linspace(0, 255, 60).astype(np.uint8)[None, :, None], (40, 1, 3))
    save(root / "a" / "0_rgb.png", ramp)  # left dark, right bright: flips are visible
    save(root / "a" / "1_gray.png", np.full((50, 30), 200, np.uint8))
    save(root / "a" / "2_trunc.png", ramp)
    raw = (root / "a" / "2_trunc.png").read_bytes()
    (root / "a" / "2_trunc.png").write_bytes(raw[: len(raw) // 2])
    save(root / "b" / "0_photo.jpg", np.full((50, 70, 3), (255, 0, 0), np.uint8), quality=95)
    save(root / "b" / "1_rgba.png", np.zeros((32, 32, 4), np.uint8))  # fully transparent
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "c").mkdir()
    (root / "c" / "1_garbage.jpg").write_bytes(os.urandom(300))
    save(root / "c" / "sub" / "0_16bit.png", np.full((36, 36), 65535, np.uint16))
    return root


def test_image_folder_items_and_conversions(image_folder):
    ds = ImageFolderDataset(image_folder, image_size=16, train=False)
    assert ds.classes == ["a", "b", "c"] and ds.num_classes == 3 and len(ds) == 7
    assert ds.targets == [0, 0, 0, 1, 1, 2, 2]
    x, y = ds[1]  # grayscale -> RGB
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    torch.testing.assert_close(x, torch.full_like(x, 200 / 127.5 - 1))
    x, _ = ds[3]  # JPEG, red
    assert x[0].mean() > 0.95 and x[1].mean() < -0.9
    x, _ = ds[4]  # transparent RGBA composites over white
    assert (x == 1).all()
    x, y = ds[6]  # 16-bit grey at full scale is white, not clipped garbage
    assert y == 2 and (x == 1).all()
    assert ds.skipped == 0


def test_image_folder_skips_corrupt_once(image_folder, caplog):
    ds = ImageFolderDataset(image_folder, image_size=16, train=False)
    reported = []
    data.report_skips_to(ds, reported.append)
    with caplog.at_level(logging.WARNING, logger="ldetok.data"):
        for _ in range(2):
            x, y = ds[2]  # truncated PNG -> the next readable image of class a, wrapping: a/0_rgb.png
            assert y == 0 and torch.equal(x, ds[0][0])
            x, y = ds[5]  # garbage -> c/sub/0_16bit.png, its class's other image
            assert y == 2 and torch.equal(x, ds[6][0])
            assert [ds[i][1] for i in range(len(ds))] == ds.targets
        again = ImageFolderDataset(image_folder, image_size=16, train=False)  # another object: no new warning
        assert again[2][1] == 0 and again.skipped == 1
    assert ds.skipped == 2 and {p.name for p in ds.bad_paths} == {"2_trunc.png", "1_garbage.jpg"}
    for name in ("2_trunc.png", "1_garbage.jpg"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1
        assert sum(name in line for line in reported) == 1
    summary = data.skip_summary(ds)
    assert summary.startswith(f"{image_folder}: 2 unreadable image(s) skipped") and "2_trunc.png" in summary
    assert data.skip_summary(again).startswith(f"{image_folder}: 1 unreadable")
    assert data.skip_summary(ImageFolderDataset(image_folder, image_size=16)) is None


def test_image_folder_bad_files_keep_every_label(tmp_path):
    """A zero-byte .jpg and a text file named .png in class_a: every item's label is the class folder of
    its own path, and every image served for class_a is one of class_a's readable images."""
    root = tmp_path / "folder"
    for k in range(3):
        save(root / "class_a" / f"{k}_good.png", np.full((20, 20, 3), 10 + 20 * k, np.uint8))
        save(root / "class_b" / f"{k}_good.png", np.full((20, 20, 3), 200 + 10 * k, np.uint8))
    (root / "class_a" / "0_empty.jpg").write_bytes(b"")
    (root / "class_a" / "1_text.png").write_text("this is not an image")
    (root / "class_b" / "9_empty.jpg").write_bytes(b"")  # the last file: its substitute wraps around
    ds = ImageFolderDataset(root, image_size=8, train=False)
    values = {"class_a": {10, 30, 50}, "class_b": {200, 210, 220}}
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert y == label == ds.classes.index(path.parent.name)
        level = round((float(x.mean()) + 1) * 127.5)
        assert level in values[path.parent.name], (path, level)
    assert ds.skipped == 3
    assert {p.name for p in ds.bad_paths} == {"0_empty.jpg", "1_text.png", "9_empty.jpg"}


def test_image_folder_unreadable_class_or_folder(tmp_path):
    root = tmp_path / "bad"
    save(root / "a" / "ok.png", np.zeros((10, 10, 3), np.uint8))
    (root / "b").mkdir()
    (root / "b" / "x.png").write_text("text")
    (root / "b" / "y.jpg").write_bytes(b"")
    ds = ImageFolderDataset(root, image_size=8)
    with pytest.raises(ValueError, match=r"none of the 2 images of class 'b' \(.*bad/b\) could be read"):
        ds[1]
    (root / "a" / "ok.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 3 images under .*bad could be read"):
        ImageFolderDataset(root, image_size=8)[0]


def test_image_folder_split_hint(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no 'test' split.*eval_split=train"):
        build_dataset("imagefolder", "test", 16, root=image_folder)
    with pytest.raises(FileNotFoundError, match=r"--split=train"):
        data.check_dataset_splits("imagefolder", image_folder, ("train", "val"), "--split")
    for split in ("train", "val"):
        save(tmp_path / "inet" / split / "n01" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="its splits are train, val: set eval_split to one of them"):
        data.check_dataset_splits("imagenet", tmp_path / "inet", ("test",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.check_dataset_splits("imagefolder", tmp_path / "nowhere", ("train",))
    data.check_dataset_splits("imagenet", tmp_path / "inet", ("train", "val"))
    data.check_dataset_splits("fashion_mnist", None, ("test",))  # other datasets: checked when built


def test_image_folder_flip_only_in_train(image_folder):
    torch.manual_seed(0)
    evals = ImageFolderDataset(image_folder, image_size=16, train=False)
    ref = evals[0][0]
    assert all(torch.equal(evals[0][0], ref) for _ in range(8))
    assert ref[0, 0, 0] < ref[0, 0, -1]  # dark left, bright right
    train = ImageFolderDataset(image_folder, image_size=16, train=True)
    draws = [train[0][0] for _ in range(16)]
    flipped = [torch.equal(d, ref.flip(-1)) for d in draws]
    assert all(f or torch.equal(d, ref) for f, d in zip(flipped, draws))
    assert any(flipped) and not all(flipped)


def test_center_crop_adm():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # only the middle third is white
    out = center_crop_adm(Image.fromarray(img), 100)
    assert out.shape == (100, 100, 3) and (out == 255).all()
    for size, shape in [(64, (300, 200)), (32, (47, 1000)), (256, (64, 80))]:  # halving, thin, upscale
        assert center_crop_adm(Image.new("RGB", shape), size).shape == (size, size, 3)


def test_list_file(image_folder, tmp_path):
    good = tmp_path / "train.txt"
    good.write_text("# relpath label\na/0_rgb.png 4\n\nb/0_photo.jpg 1\n")
    ds = ImageFolderDataset(image_folder, image_size=16, train=False, list_file=good)
    assert len(ds) == 2 and ds.targets == [4, 1] and ds.num_classes == 5 and ds[0][1] == 4
    bad = tmp_path / "bad.txt"
    bad.write_text("a/0_rgb.png 0\nb/0_photo.jpg one\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        ImageFolderDataset(image_folder, list_file=bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ImageFolderDataset(image_folder, list_file=tmp_path / "missing.txt")


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "val")):
        ImageFolderDataset(tmp_path / "empty", split="val")


# ------------------------------------------------------------------ CIFAR-10
def write_cifar(folder, per_batch=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
                 b"labels": [(i + j) % 10 for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{k}".encode() for k in range(10)]}))


def test_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    train = CIFAR10(tmp_path, "train")
    assert len(train) == 10 and train.images_uint8.shape == (10, 3, 32, 32) and train.classes[3] == "c3"
    assert train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]  # batches in order 1..5
    x, y = train[4]
    assert x.shape == (3, 32, 32) and y == 2
    torch.testing.assert_close(x, torch.from_numpy(train.images_uint8[4]).float() / 127.5 - 1)
    test = CIFAR10(tmp_path / "cifar-10-batches-py", "test", image_size=16)  # the batches folder itself
    assert len(test) == 2 and test[1][0].shape == (3, 16, 16) and test.labels.tolist() == [5, 6]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "cifar-10-batches-py")):
        CIFAR10(tmp_path / "none")


# ------------------------------------------------------------------ factory
def test_build_dataset(tmp_path, image_folder, no_system_fmnist):
    write_fmnist(tmp_path / "fm")
    assert build_dataset("fmnist", root=tmp_path / "fm", channels=1)[0][0].shape == (1, 32, 32)
    assert build_dataset("fashion_mnist", "test", 64, 3, root=tmp_path / "fm")[0][0].shape == (3, 64, 64)
    photos = build_dataset("photos", "val", image_size=32, num_crops=8)
    assert photos.split == "val" and len(photos) == 8
    folder = build_dataset("imagenet", "train", 16, root=image_folder)
    assert folder.train and folder.num_classes == 3
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset("imagefolder", "val", 16, root=image_folder)
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    assert len(build_dataset("cifar10", "test", root=tmp_path / "cifar")) == 2
    with pytest.raises(ValueError, match="fashion_mnist.*photos|photos.*fashion_mnist"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="channels"):
        build_dataset("photos", channels=1)
    assert data.default_data_available()["photos"]

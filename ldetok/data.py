"""Datasets: Fashion-MNIST, bundled photo crops, ImageFolder/ImageNet and a local CIFAR-10.

Every dataset yields ``(image, label)``: ``image`` a float32 tensor (C, H, W) in [-1, 1], ``label``
an int. Nothing is downloaded unless asked (``download=True``); a missing source raises an error
saying where we looked and how to provide it. The in-memory datasets also offer
``tensor_batch(indices) -> (images, labels)``, which converts a whole batch in one go (much faster
than a DataLoader over single items on a CPU).
"""

from __future__ import annotations

import bisect
import functools
import glob
import gzip
import logging
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "CIFAR10", "DATASETS", "FashionMNIST", "ImageFolderDataset", "PhotoCrops", "build_dataset",
    "bundled_photos", "center_crop_adm", "check_dataset_splits", "default_data_available", "ensure_default_data",
    "find_fashion_mnist", "from_uint8", "load_rgb", "read_idx", "report_skips_to", "skip_summary", "to_uint8",
]

log = logging.getLogger("ldetok.data")
PathLike = str | os.PathLike


# ------------------------------------------------------------------ shared helpers
def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_size(image_size):
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size={image_size!r} must be an int >= 8")


# ------------------------------------------------------------------ the pixel convention
# Images are float tensors in [-1, 1]; these two functions are the only conversions to and from 8 bits.
def from_uint8(pixels) -> torch.Tensor:
    """uint8 pixels (a tensor or an array, any layout) -> float32 in [-1, 1]: ``u / 127.5 - 1``."""
    u = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else torch.as_tensor(pixels)
    return u.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor, value_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """Images in ``value_range`` -> uint8, same shape and device: clamped, scaled to [0, 255] and rounded
    half to even (``round((x + 1) * 127.5)`` for [-1, 1]; rounded, never truncated, so
    ``to_uint8(from_uint8(u)) == u``)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = x.detach().float()
    return ((x.clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class _InMemory(Dataset):
    """Base for datasets whose labels live in ``self.labels`` (int64 array) and whose pixels come
    from ``_uint8_batch(idx) -> (B, C, h, w) uint8``; ``_finish`` turns [-1, 1] floats into the
    final size. Single items go through the batch path so both always agree."""

    def __len__(self):
        return len(self.labels)

    def tensor_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, S, S) float32 in [-1, 1] and labels (B,) int64 for a list/array/tensor/slice."""
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self._finish(from_uint8(self._uint8_batch(idx))), torch.from_numpy(self.labels[idx])

    def __getitem__(self, index):
        x, y = self.tensor_batch([index])
        return x[0], int(y[0])

    def _finish(self, x):
        return _resize(x, self.image_size)


# ------------------------------------------------------------------ Fashion-MNIST
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where Debian's `dataset-fashion-mnist` (and look-alike packages or conda) put the idx files.
FASHION_SYSTEM_GLOBS = [
    "/usr/share/datasets/fashion-mnist", "/usr/share/datasets/*fashion*", "/usr/share/*fashion*mnist*",
    "/usr/local/share/datasets/*fashion*", os.path.join(sys.prefix, "share", "datasets", "*fashion*"),
]
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: PathLike) -> np.ndarray:
    """Parse an idx file of unsigned bytes (optionally gzipped) into a uint8 array."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip -> OSError, gzip cut short -> EOFError
        raise ValueError(f"cannot read idx file {path}: {e}") from e
    # Magic: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {path} is truncated: {len(raw)} bytes, header alone needs {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = header + int(np.prod(dims))
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "longer than its header says"
        raise ValueError(f"idx file {path} is {what}: shape {dims} needs {need} bytes, file has {len(raw)}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        names = [folder / f"{_IDX_PREFIX[split]}-{kind}{ext}" for ext in ("", ".gz")]
        hit = next((p for p in names if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _fashion_dirs(root) -> list[Path]:
    dirs = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root is not None else []
    for pattern in FASHION_SYSTEM_GLOBS:
        dirs += sorted(Path(p) for p in glob.glob(pattern))
    return dirs


def find_fashion_mnist(root: PathLike | None = None, split: str = "train") -> tuple[Path, Path] | None:
    """(images, labels) idx paths for ``split``: ``root`` first, then the system install; or None."""
    return next((pair for d in _fashion_dirs(root) if (pair := _idx_pair(d, split))), None)


def _fashion_missing(root, split) -> str:
    looked = ([str(root), f"{root}/FashionMNIST/raw"] if root is not None else []) + FASHION_SYSTEM_GLOBS
    return (f"Fashion-MNIST ({split} split: {_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] and "
            f"{_IDX_PREFIX[split]}-labels-idx1-ubyte[.gz]) not found; looked in {looked}. Provide it with "
            "`apt-get install dataset-fashion-mnist`, or pass root=<folder holding the idx files, or "
            "torchvision's root with FashionMNIST/raw/>, or download=True (needs internet).")


class FashionMNIST(_InMemory):
    """Fashion-MNIST from local idx files. ``images_uint8`` is (N, 28, 28), ``labels`` (N,) int64.

    Size policy: 32 (default) zero-pads 28 -> 32 with black (-1), exact and cheap; 28 returns the raw
    images; any other size pads to 32 first, then resizes (bilinear, antialias), so the object fills
    the same fraction of the frame at every size.
    """

    num_classes = 10
    classes = FASHION_CLASSES

    def __init__(self, root: PathLike | None = None, split: str = "train", image_size: int = 32,
                 channels: int = 1, download: bool = False):
        _check_choice("split", split, _IDX_PREFIX)
        _check_choice("channels", channels, (1, 3))
        _check_size(image_size)
        files = find_fashion_mnist(root, split)
        if files is None and download:
            import torchvision  # only here: the downloader is the one network path in this module

            root = Path(root if root is not None else "data")
            torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
            files = _idx_pair(root / "FashionMNIST" / "raw", split)
        if files is None:
            raise FileNotFoundError(_fashion_missing(root, split))
        self.files, self.split = files, split
        self.image_size, self.channels = image_size, channels
        self.images_uint8 = read_idx(files[0])
        self.labels = read_idx(files[1]).astype(np.int64)
        shapes_ok = self.images_uint8.ndim == 3 and self.labels.ndim == 1
        if not shapes_ok or len(self.images_uint8) != len(self.labels) or self.labels.max(initial=0) > 9:
            raise ValueError(f"{files[0]} {self.images_uint8.shape} and {files[1]} {self.labels.shape} "
                             "are not matching (N, H, W) images and (N,) labels in 0..9")

    def _uint8_batch(self, idx):
        return self.images_uint8[idx][:, None]

    def _finish(self, x):
        if self.image_size != x.shape[-1]:
            pad = (32 - x.shape[-1]) // 2
            x = _resize(F.pad(x, (pad, pad, pad, pad), value=-1.0), self.image_size)
        return x.repeat(1, 3, 1, 1) if self.channels == 3 else x


# ------------------------------------------------------------------ bundled photo crops
_SKIMAGE_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "retina", "stereo_motorcycle"]


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple:
    import skimage.data
    from matplotlib.cbook import get_sample_data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in _SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        photos.append((name, img[0] if name == "stereo_motorcycle" else img))  # (left, right, disparity)
    sample = load_sample_images()
    photos += [(Path(f).stem, img) for f, img in zip(sample.filenames, sample.images)]
    with Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photos.append(("grace_hopper", np.asarray(im.convert("RGB"))))
    for name, img in photos:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"bundled photo {name!r} is {img.dtype} {img.shape}, expected uint8 HxWx3")
        img.setflags(write=False)  # shared cache: nobody may edit it in place
    return tuple(photos)


def bundled_photos() -> dict[str, np.ndarray]:
    """The 11 colour photos shipped inside scikit-image, scikit-learn and matplotlib (read-only uint8 HxWx3)."""
    return dict(_load_photos())


def _pyramid(region: np.ndarray, image_size: int) -> list:
    """Halvings of a region (BOX), so any crop is resized from at most 2x its output size: fast and alias-free."""
    levels = [Image.fromarray(np.ascontiguousarray(region))]
    while min(levels[-1].size) >= 2 * image_size:
        levels.append(levels[-1].reduce(2))
    return levels


def _draw_boxes(rng, n, region_hw, photo_short, image_size, min_scale, max_scale) -> np.ndarray:
    rh, rw = region_hw
    rshort = min(rh, rw)
    # Sides are log-uniform in [min_scale, max_scale] x the photo's short side, but never below the
    # output size (no upsampling) unless the region itself is smaller than the crop.
    lo = min(max(min_scale * photo_short, image_size), rshort)
    hi = min(max(max_scale * photo_short, lo), rshort)
    side = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).round().astype(np.int64).clip(1, rshort)
    x0 = (rng.random(n) * (rw - side + 1)).astype(np.int64)
    y0 = (rng.random(n) * (rh - side + 1)).astype(np.int64)
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


class PhotoCrops(_InMemory):
    """Seeded multi-scale square crops of the bundled photos; label = photo index (drawn uniformly).

    Each photo is split once: the right ``val_fraction`` of its width is the val region, the rest the
    train region, and each split only ever sees its own region's pixels, so no val pixel is ever in
    a train crop. Crop boxes (``boxes``: x0, y0, x1, y1 in photo pixels) are drawn at construction;
    pixels are rendered on access from a per-region pyramid (50k 32 px crops in a few seconds).
    Any ``image_size`` works; a crop is upsampled only where the region is smaller than the crop
    (e.g. 256 px val crops of the small photos), since the region cannot hold a larger box.
    """

    def __init__(self, split: str = "train", image_size: int = 32, num_crops: int = 50_000, seed: int = 0,
                 min_scale: float = 0.05, max_scale: float = 0.5, val_fraction: float = 0.2):
        _check_choice("split", split, ("train", "val"))
        _check_size(image_size)
        if not (isinstance(num_crops, int) and num_crops >= 1):
            raise ValueError(f"num_crops={num_crops!r} must be an int >= 1")
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got min_scale={min_scale}, max_scale={max_scale}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
        photos = bundled_photos()
        self.split, self.image_size, self.seed = split, image_size, seed
        self.photo_names = self.classes = list(photos)
        self.num_classes = len(photos)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        self.labels = rng.integers(0, self.num_classes, num_crops).astype(np.int64)
        self.boxes = np.zeros((num_crops, 4), np.int64)
        self._pyramids, self._x_offsets = [], []
        for k, img in enumerate(photos.values()):
            cut = round(img.shape[1] * (1 - val_fraction))
            region, x_off = (img[:, :cut], 0) if split == "train" else (img[:, cut:], cut)
            self._pyramids.append(_pyramid(region, image_size))
            self._x_offsets.append(x_off)
            idx = np.flatnonzero(self.labels == k)
            boxes = _draw_boxes(rng, len(idx), region.shape[:2], min(img.shape[:2]), image_size,
                                min_scale, max_scale)
            self.boxes[idx] = boxes + np.array([x_off, 0, x_off, 0])

    def crop_uint8(self, index: int) -> np.ndarray:
        """Crop ``index`` as uint8 (image_size, image_size, 3)."""
        k = int(self.labels[index])
        x0, y0, x1, y1 = (int(v) for v in self.boxes[index])
        x0, x1 = x0 - self._x_offsets[k], x1 - self._x_offsets[k]
        levels = self._pyramids[k]
        # Pick the level where the box is 1x-2x the output size; PIL's box= takes level coordinates.
        level = min(max(int(np.log2((x1 - x0) / self.image_size)), 0), len(levels) - 1)
        f = 2.0 ** level
        im = levels[level].resize((self.image_size,) * 2, Image.BICUBIC, box=(x0 / f, y0 / f, x1 / f, y1 / f))
        return np.asarray(im)

    def _uint8_batch(self, idx):
        return np.stack([self.crop_uint8(i) for i in idx]).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------ ImageFolder / ImageNet
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# What PIL raises on unreadable, truncated or hostile files.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def load_rgb(path: PathLike) -> Image.Image:
    """Open any image as 8-bit RGB: 16/32-bit grey is rescaled (not clipped), alpha goes over white."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            full = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            return Image.fromarray(np.clip(a * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return im.convert("RGB")


def center_crop_adm(im: Image.Image, size: int) -> np.ndarray:
    """ADM preprocessing: BOX-halve while the short side >= 2*size, BICUBIC so short side == size, centre crop."""
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(max(size, round(s * scale)) for s in im.size), Image.BICUBIC)
    a = np.asarray(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def _scan_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(folder / name, followlinks=True)):  # sorted: stable ids
            samples += [(Path(dirpath) / f, label) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return classes, samples


def _read_list_file(list_file: Path, folder: Path) -> list[tuple[Path, int]]:
    samples = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(None, 1)  # the path may contain spaces, the label never does
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{list_file}:{lineno}: expected 'relative/path label' (label an int >= 0), "
                                 f"got {line.rstrip()!r}")
            samples.append((folder / parts[0].strip(), int(parts[1])))
    return samples


# Unreadable files already warned about in this process: one warning per file, however many dataset
# objects (train and eval sets, one per run of a sweep) meet it.
_WARNED: set = set()


class ImageFolderDataset(Dataset):
    """``<root>[/<split>]/<class>/<image>`` (classes sorted -> ids, sub-folders included) or a list
    file of ``relpath label`` lines (the official ImageNet ``train.txt``), paths relative to
    ``<root>[/<split>]``; blank lines and ``#`` comments are ignored.

    Items are ADM centre crops in [-1, 1], RGB. With ``train=True`` a horizontal flip (p=0.5) draws
    from torch's global RNG, which DataLoader seeds per worker, so flips are reproducible under
    ``torch.manual_seed``, and differ across workers.

    An unreadable file (empty, truncated, not an image) is replaced by the next readable image of the
    SAME class (its label stays right), counted in ``skipped``, listed in ``bad_paths`` and warned about
    once per process on the ``ldetok.data`` logger and through ``report`` (a callable taking the line,
    e.g. a run's log; ``report_skips_to``); ``skip_summary`` is the end-of-run line. A class, or a
    folder, with no readable image at all is a ``ValueError`` naming it. With DataLoader workers each
    worker keeps its own count (their per-file lines still reach ``report``).
    """

    def __init__(self, root: PathLike, split: str | None = None, image_size: int = 256, train: bool = True,
                 list_file: PathLike | None = None):
        _check_size(image_size)
        self.folder = Path(root) if split is None else Path(root) / split
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {self.folder} does not exist "
                                    "(expected <root>/<class>/<image>, or <root>/<split>/<class>/<image>)")
        if list_file is not None:
            self.list_file = Path(list_file)
            if not self.list_file.is_file():
                raise FileNotFoundError(f"list file {self.list_file} does not exist")
            self.samples = _read_list_file(self.list_file, self.folder)
            self.classes = [str(i) for i in range(1 + max((y for _, y in self.samples), default=-1))]
        else:
            self.classes, self.samples = _scan_folder(self.folder)
        if not self.samples:
            raise FileNotFoundError(f"no images found in {self.folder} (extensions {', '.join(IMG_EXTENSIONS)})")
        self.num_classes = len(self.classes)
        self.targets = [y for _, y in self.samples]
        self.image_size, self.train = image_size, train
        self.skipped, self.bad_paths = 0, set()
        self.report = None  # an extra destination for the skip warnings (a run's log)
        self._by_class: dict | None = None  # label -> sorted sample indices, built at the first skip

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        path, label = self.samples[index]
        arr = self._read(path)
        if arr is None:
            arr = self._same_class_substitute(index, label)
        x = from_uint8(arr.transpose(2, 0, 1)[None])[0]
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label

    def __getstate__(self):  # a run log's writer does not travel to spawned DataLoader workers
        return {**self.__dict__, "report": None}

    def _read(self, path: Path) -> np.ndarray | None:
        """The ADM crop of ``path``, or None for an unreadable file (recorded and warned about once)."""
        if path in self.bad_paths:
            return None
        try:
            return center_crop_adm(load_rgb(path), self.image_size)
        except _UNREADABLE as e:
            self.bad_paths.add(path)
            self.skipped += 1
            if path not in _WARNED:
                _WARNED.add(path)
                msg = (f"skipping unreadable image {path} ({type(e).__name__}: {e}); replaced by another image of "
                       f"its class; {self.skipped} skipped so far in {self.folder}")
                log.warning(msg)
                if self.report is not None:
                    self.report(msg)
            return None

    def _class_indices(self, label: int) -> list:
        if self._by_class is None:
            by: dict = {}
            for i, (_, y) in enumerate(self.samples):
                by.setdefault(y, []).append(i)
            self._by_class = by
        return self._by_class[label]

    def _same_class_substitute(self, index: int, label: int) -> np.ndarray:
        """The next readable image after ``index`` among those of class ``label`` (wrapping around)."""
        members = self._class_indices(label)
        k = bisect.bisect_left(members, index)
        for j in range(1, len(members) + 1):
            arr = self._read(self.samples[members[(k + j) % len(members)]][0])
            if arr is not None:
                return arr
        raise ValueError(self._unreadable_message(label, len(members)))

    def _unreadable_message(self, label: int, count: int) -> str:
        fix = "replace or remove the damaged files (zero-byte, truncated or non-image files named like images)"
        if all(self._read(p) is None for p, y in self.samples if y != label):
            return f"none of the {len(self.samples)} images under {self.folder} could be read: {fix}"
        where = (f"label {label} of {self.list_file}" if hasattr(self, "list_file")
                 else f"class {self.classes[label]!r} ({self.folder / self.classes[label]})")
        return (f"none of the {count} images of {where} could be read, so that class has no image to train on: "
                f"{fix}, or remove the class")


def report_skips_to(dataset, report) -> None:
    """Send ``dataset``'s skip warnings (unreadable images) to ``report`` too (e.g. a run's log line);
    datasets that never skip are left alone."""
    if isinstance(dataset, ImageFolderDataset):
        dataset.report = report


def skip_summary(dataset) -> str | None:
    """One line counting the unreadable images ``dataset`` skipped in this process (None when none)."""
    if not isinstance(dataset, ImageFolderDataset) or not dataset.skipped:
        return None
    shown = ", ".join(str(p) for p in sorted(dataset.bad_paths)[:5])
    more = f" and {len(dataset.bad_paths) - 5} more" if len(dataset.bad_paths) > 5 else ""
    return (f"{dataset.folder}: {dataset.skipped} unreadable image(s) skipped, each replaced by a readable image "
            f"of its own class: {shown}{more}")


# ------------------------------------------------------------------ CIFAR-10 (local only)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _unpickle(path: Path) -> dict:
    # CIFAR's own format is a pickle; only ever read from a folder the user points us at.
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


class CIFAR10(_InMemory):
    """CIFAR-10 from the python batches in ``<root>/cifar-10-batches-py`` (or ``root`` itself).

    ``images_uint8`` is (N, 3, 32, 32); other sizes are resized (bilinear, antialias). Never downloads.
    """

    num_classes = 10

    def __init__(self, root: PathLike, split: str = "train", image_size: int = 32):
        _check_choice("split", split, ("train", "test"))
        _check_size(image_size)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        folder = Path(root) / "cifar-10-batches-py"
        if not folder.is_dir() and any((Path(root) / n).is_file() for n in names):
            folder = Path(root)  # root is the batches folder itself
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 {split} batches {missing} not found in {folder}: extract "
                                    "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
                                    "so that folder holds data_batch_1..5 and test_batch")
        images, labels = [], []
        for name in names:
            d = _unpickle(folder / name)
            try:
                images.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(d["labels"], np.int64))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{folder / name} is not a CIFAR-10 batch ({e!r})") from e
        self.images_uint8, self.labels = np.concatenate(images), np.concatenate(labels)
        meta = folder / "batches.meta"
        self.classes = ([n.decode() if isinstance(n, bytes) else n for n in _unpickle(meta)["label_names"]]
                        if meta.is_file() else CIFAR10_CLASSES)
        self.folder, self.split, self.image_size = folder, split, image_size

    def _uint8_batch(self, idx):
        return self.images_uint8[idx]


# ------------------------------------------------------------------ factory and availability
DATASETS = {"fashion_mnist": "fashion_mnist", "fmnist": "fashion_mnist", "photos": "photos",
            "imagefolder": "imagefolder", "imagenet": "imagefolder", "cifar10": "cifar10"}


def build_dataset(name: str, split: str = "train", image_size: int = 32, channels: int = 3,
                  root: PathLike | None = None, **kw) -> Dataset:
    """Build a dataset by name (see ``DATASETS``); extra keywords go to its constructor."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choices: {sorted(DATASETS)}")
    kind = DATASETS[name]
    if kind == "fashion_mnist":
        return FashionMNIST(root, split, image_size, channels, **kw)
    if channels != 3:
        raise ValueError(f"dataset {name!r} is RGB: channels must be 3, got {channels}")
    if kind == "photos":
        return PhotoCrops("val" if split == "test" else split, image_size, **kw)
    if root is None:
        raise ValueError(f"dataset {name!r} reads a local folder: pass root=")
    if kind == "cifar10":
        return CIFAR10(root, split, image_size, **kw)
    check_dataset_splits(name, root, (split,))
    # <root>/<split>/ when it exists (ImageNet layout); a plain class folder serves as the train split.
    sub = split if (Path(root) / split).is_dir() or split != "train" else None
    kw.setdefault("train", split == "train")
    return ImageFolderDataset(root, sub, image_size, **kw)


def check_dataset_splits(name: str, root: PathLike | None, splits, field: str = "eval_split") -> None:
    """Refuse, before anything is read, an image folder that lacks a split: ``<root>`` must exist, and a
    split other than train needs ``<root>/<split>/`` (a plain class folder is the train split only, so the
    message suggests ``<field>=train``). Other datasets are checked when they are built."""
    if DATASETS.get(name) != "imagefolder" or root is None:
        return
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} (dataset {name!r}, data_root) does not exist")
    for split in splits:
        if split != "train" and not (root / split).is_dir():
            subs = sorted(d.name for d in root.iterdir() if d.is_dir())
            shown = ", ".join(subs[:4]) + (", ..." if len(subs) > 4 else "")
            hint = (f"it holds one split (class folders {shown}): evaluate on it with {field}=train, or add "
                    f"{root / split}/<class>/<image>" if not (root / "train").is_dir()
                    else f"its splits are {', '.join(subs)}: set {field} to one of them")
            raise FileNotFoundError(f"image folder {root} has no {split!r} split ({root / split} does not exist); {hint}")


def default_data_available() -> dict[str, str | None]:
    """Which offline sources exist: name -> where it was found, or None."""
    found = [find_fashion_mnist(None, s) for s in ("train", "test")]
    fmnist = str(found[0][0].parent) if all(found) else None
    try:
        photos = f"{len(bundled_photos())} photos from scikit-image, scikit-learn, matplotlib"
    except (ImportError, OSError, ValueError):
        photos = None
    return {"fashion_mnist": fmnist, "photos": photos}


def ensure_default_data() -> Path:
    """The Fashion-MNIST folder, or a FileNotFoundError telling how to install it."""
    for split in ("train", "test"):
        if find_fashion_mnist(None, split) is None:
            raise FileNotFoundError(_fashion_missing(None, split))
    return find_fashion_mnist(None, "train")[0].parent


def _main(argv=None) -> int:
    """``python -m ldetok.data --check``: exit 0 when the default data (Fashion-MNIST) is present."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ldetok.data")
    ap.add_argument("--check", action="store_true", help="check the default data and report what exists")
    ap.parse_args(argv)
    avail = default_data_available()
    for k, v in avail.items():
        print(f"{k:14s} {v if v else 'missing'}")
    return 0 if avail.get("fashion_mnist") else 1


if __name__ == "__main__":
    sys.exit(_main())

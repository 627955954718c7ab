"""What a generated set is measured against: one ``Reference`` per evaluation, named in every result.

``Reference.parse(spec)`` accepts

- ``DATASET:SPLIT`` (the whole split) or ``DATASET:SPLIT:N`` (N images spread evenly over the split:
  index ``floor(i * len / N)``, so a class-sorted folder gives every class its share; never the
  first N), no random flips. ImageFolder datasets need ``root=``;
- the path of an ``.npz``: ADM / torch-fidelity statistics (``mu``, ``sigma``, optionally our
  ``features``) used as they are, and/or an ADM reference batch (``arr_0``: (N, H, W, 3) uint8
  images) whose features are computed and cached. With both, the Inception space uses the file's
  statistics (as ADM's evaluator does) and other spaces use the images; ``prefer="images"`` makes
  every space use the images. A torch-fidelity ``.pt`` of ``mu``/``sigma`` works too;
- ``released:adm_in256_stats`` (the official l-DeTok evaluation's statistics) or
  ``released:adm_in256_ref_batch`` (ADM's reference batch), found or downloaded by ``ldetok.weights``;
- a folder of images (any nesting, sorted by path, ADM centre crop to the samples' resolution);
- the older forms ``(dataset, split, resolution, count[, root])`` and the dict with those keys (the
  FIRST ``count`` images, as before; ``selection="even"`` in the dict spreads them).

Features computed from images are cached by ``reference_stats`` under a key holding the source
(dataset and root, or a file's size and content fingerprint, or a folder's file list), the
selection, the resolution and the extractor, so a second use costs one file read. ``label`` is the
human name of a reference, ``record()`` its full description for a results file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import (DATASETS, IMG_EXTENSIONS, build_dataset, center_crop_adm, from_uint8, load_rgb)
from ..runs import to_jsonable
from ..weights import RELEASED_PREFIX, entry, resolve
from .fid import _slug, load_reference_stats, reference_stats

__all__ = ["BadReferenceError", "Reference", "even_indices", "file_fingerprint", "is_dataset_spec"]

log = logging.getLogger("ldetok.eval")
_MIB = 1 << 20
_DATASET_SPEC = re.compile(r"^([A-Za-z0-9_]+):([A-Za-z0-9_.-]+)(?::(\d+))?$")
_RESOLUTION = {"adm_in256_stats": 256, "adm_in256_ref_batch": 256}  # what the released files were made at
_UNREADABLE_NPZ = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError)


class BadReferenceError(ValueError):
    """A reference that cannot be used: a damaged or wrong-format file, an unknown spec."""


class Unavailable(Exception):
    """A feature space this reference cannot serve (the message says why)."""


# ---- helpers --------------------------------------------------------------------------------------
def even_indices(length: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(length)``: ``floor(i * length / n)`` for ``i < n``."""
    if not 1 <= n <= length:
        raise ValueError(f"cannot spread {n} images over {length}")
    return [(i * length) // n for i in range(n)]


def is_dataset_spec(spec) -> bool:
    """Whether ``spec`` is a ``DATASET:SPLIT[:N]`` string (and no existing path)."""
    if not isinstance(spec, str):
        return False
    m = _DATASET_SPEC.match(spec.strip())
    return bool(m and m.group(1) in DATASETS and not Path(spec).expanduser().exists())


def file_fingerprint(path) -> dict:
    """``{"size", "sha256_ends"}``: the size and the SHA-256 of (size, first MiB, last MiB), which tells
    files apart without reading gigabytes."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            h.update(f.read(_MIB))
    return {"size": size, "sha256_ends": h.hexdigest()}


def _npy_header(f) -> tuple[tuple, np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, dtype, fortran


def _npz_members(path: Path) -> dict[str, tuple]:
    """{key: (shape, dtype)} of an ``.npz`` from its headers only; one clear error when it is no npz."""
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for name in zf.namelist():
                if name.endswith(".npy"):
                    with zf.open(name) as f:
                        shape, dtype, _ = _npy_header(f)
                    out[name[:-4]] = (shape, dtype)
            return out
    except _UNREADABLE_NPZ as e:
        raise BadReferenceError(f"reference file {path} is not a readable .npz ({type(e).__name__}: {e}); expected "
                                "ADM / torch-fidelity statistics ('mu' (D,), 'sigma' (D, D)) or an ADM reference "
                                "batch ('arr_0' (N, H, W, 3) uint8)") from e


def _npz_image_batches(path: Path, key: str, indices, batch_size: int):
    """(B, 3, H, W) float batches in [-1, 1] of ``key``'s images at sorted ``indices``, read in slices
    straight from the archive (the whole batch never sits in memory)."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, dtype, _ = _npy_header(f)
        item = int(np.prod(shape[1:])) * dtype.itemsize
        pos, idx = 0, list(indices)
        for i in range(0, len(idx), batch_size):
            rows = []
            for j in idx[i:i + batch_size]:
                if j > pos:
                    f.seek((j - pos) * item, os.SEEK_CUR)  # a zip member seeks forward by reading
                rows.append(np.frombuffer(f.read(item), dtype).reshape(shape[1:]))
                pos = j + 1
            yield from_uint8(np.stack(rows).transpose(0, 3, 1, 2))


class _FolderImages(torch.utils.data.Dataset):
    """Image files as ADM centre crops in [-1, 1]; an unreadable file comes back flagged, not raised."""

    def __init__(self, paths, resolution: int):
        self.paths, self.resolution = paths, int(resolution)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            arr = center_crop_adm(load_rgb(self.paths[i]), self.resolution)
        except Exception as e:  # noqa: BLE001 - skipped and counted, as the datasets do
            log.warning("reference: skipping unreadable image %s (%s: %s)", self.paths[i], type(e).__name__, e)
            return torch.zeros(3, self.resolution, self.resolution), False
        return from_uint8(arr.transpose(2, 0, 1)), True


def _loader_batches(ds, indices, batch_size: int, num_workers: int):
    sub = torch.utils.data.Subset(ds, list(indices))
    for item in torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        x, flag = item[0], item[1]
        if isinstance(ds, _FolderImages):
            x = x[flag.bool()]
        if len(x):
            yield x


def _root_tag(root) -> str:
    return hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:10]


def _folder_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


# ---- the reference --------------------------------------------------------------------------------
class Reference:
    """A set of real images (or their statistics) that generated samples are measured against.

    Build it with ``Reference.parse``. ``kind``: "dataset", "file" (an .npz/.pt) or "folder".
    ``stats(space, extractor, dim)`` gives ``(mu, sigma, features or None)`` in that feature space.
    """

    def __init__(self, kind: str, spec, *, dataset=None, split=None, root=None, path=None, resolution=None,
                 count=None, selection="all", prefer="stats", released=None, cache_dir=None, batch_size: int = 500,
                 num_workers: Optional[int] = None):
        if prefer not in ("stats", "images"):
            raise ValueError(f"prefer must be 'stats' or 'images', got {prefer!r}")
        if count is not None and int(count) < 2:
            raise ValueError(f"reference count must be >= 2, got {count}")
        self.kind, self.spec = kind, spec
        self.dataset, self.split, self.root = dataset, split, root
        self.path = None if path is None else Path(path)
        self.resolution = None if resolution is None else int(resolution)
        self.count = None if count is None else int(count)
        self.selection, self.prefer, self.released = selection, prefer, released
        self.cache_dir, self.batch_size, self.num_workers = cache_dir, int(batch_size), num_workers
        self.keys, self.has_stats, self.has_images, self.images_n, self.fingerprint = {}, False, False, None, None
        if kind == "file":
            self._inspect_file()
        elif kind == "folder":
            self._scan_folder()

    # ---- construction
    @classmethod
    def parse(cls, spec, resolution: Optional[int] = None, count: Optional[int] = None, cache_dir=None,
              root=None, prefer: str = "stats", batch_size: int = 500,
              num_workers: Optional[int] = None) -> "Reference":
        """A ``Reference`` from any accepted form (see the module's description). ``resolution``: the
        images' size where the spec does not fix it (taken from the samples when None); ``count``: N for a
        dataset split or folder whose spec names none (else the whole set); ``root``: the data folder of an
        ImageFolder / CIFAR dataset; ``prefer``: "stats" or "images" for an .npz holding both."""
        kw = dict(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers)
        if isinstance(spec, Reference):
            if cache_dir is None or spec.cache_dir is not None:
                return spec
            out = object.__new__(Reference)
            out.__dict__.update(spec.__dict__, cache_dir=cache_dir)
            return out
        if isinstance(spec, Mapping):
            keys = ("dataset", "split", "resolution", "count", "root")
            return cls("dataset", dict(spec), **{k: spec.get(k) for k in keys}, selection=spec.get("selection", "first"),
                       **kw)
        if isinstance(spec, (tuple, list)):
            if len(spec) not in (4, 5):
                raise ValueError("reference must be (dataset, split, resolution, count[, root]), a dict with those "
                                 f"keys, DATASET:SPLIT[:N], released:NAME, an .npz or a folder; got {spec!r}")
            return cls("dataset", list(spec), dataset=spec[0], split=spec[1], resolution=spec[2], count=spec[3],
                       root=spec[4] if len(spec) == 5 else None, selection="first", **kw)
        if not isinstance(spec, (str, os.PathLike)):
            raise TypeError(f"unsupported reference {spec!r}")
        text = str(spec).strip()
        if text.startswith(RELEASED_PREFIX):
            e = entry(text)
            if e.kind != "reference":
                raise BadReferenceError(f"{text} is a weight file, not a reference")
            return cls("file", text, path=resolve(e), resolution=_RESOLUTION.get(e.name, resolution), count=count,
                       prefer=prefer, released=text, **kw)
        p = Path(text).expanduser()
        if p.is_dir():
            return cls("folder", text, path=p, resolution=resolution, count=count,
                       selection="even" if count else "all", **kw)
        if p.is_file():
            return cls("file", text, path=p, resolution=resolution, count=count, prefer=prefer, **kw)
        m = _DATASET_SPEC.match(text)
        if m and m.group(1) in DATASETS:
            n = int(m.group(3)) if m.group(3) else count
            return cls("dataset", text, dataset=m.group(1), split=m.group(2), root=root, resolution=resolution,
                       count=n, selection="even" if n else "all", **kw)
        if p.suffix in (".npz", ".pt") or os.sep in text:
            raise FileNotFoundError(f"reference file or folder not found: {p}")
        raise BadReferenceError(f"reference {text!r} is none of: DATASET:SPLIT[:N] (datasets {sorted(DATASETS)}), "
                                "released:adm_in256_stats / released:adm_in256_ref_batch, an .npz file, a folder")

    def _inspect_file(self):
        if self.path.suffix == ".pt":
            self._file_stats()  # a torch-fidelity cache: checked now, before any sampling
            self.has_stats, self.keys, self.fingerprint = True, {"mu": None, "sigma": None}, file_fingerprint(self.path)
            return
        members = _npz_members(self.path)
        self.keys = {k: {"shape": list(shape), "dtype": str(dtype)} for k, (shape, dtype) in members.items()}
        self.fingerprint = file_fingerprint(self.path)
        found = f"found keys {sorted(members) or 'none'}"
        if "mu" in members or "sigma" in members:
            (mu, _), (sig, _) = members.get("mu", ((), None)), members.get("sigma", ((), None))
            if len(mu) != 1 or tuple(sig) != (mu[0], mu[0]):
                raise BadReferenceError(f"reference file {self.path}: 'mu' {tuple(mu) or 'missing'} and 'sigma' "
                                        f"{tuple(sig) or 'missing'} do not form (D,), (D, D) ({found})")
            self.has_stats = True
        if "arr_0" in members:
            shape, dtype = members["arr_0"]
            if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or shape[0] < 2:
                raise BadReferenceError(f"reference file {self.path}: 'arr_0' is {tuple(shape)} {dtype}, an ADM "
                                        "reference batch holds (N >= 2, H, W, 3) uint8 images")
            self.has_images, self.images_n = True, int(shape[0])
            h, w = int(shape[1]), int(shape[2])
            if h != w:
                raise BadReferenceError(f"reference file {self.path}: images are {h}x{w}, square ones are expected")
            if self.resolution is not None and self.resolution != h:
                raise BadReferenceError(f"reference file {self.path} holds {h} px images, {self.resolution} px asked")
            self.resolution = h
            if self.count is not None and self.count > self.images_n:
                raise BadReferenceError(f"reference file {self.path} holds {self.images_n} images, {self.count} asked")
            self.selection = "even" if self.count and self.count < self.images_n else "all"
        if not (self.has_stats or self.has_images):
            raise BadReferenceError(f"reference file {self.path} is neither FID statistics nor an image batch: {found}; "
                                    "needs 'mu' (D,) and 'sigma' (D, D), or 'arr_0' (N, H, W, 3) uint8")

    def _scan_folder(self):
        files = _folder_files(self.path)
        if not files:
            raise FileNotFoundError(f"reference folder {self.path} holds no images ({', '.join(IMG_EXTENSIONS)})")
        if self.count is not None and self.count > len(files):
            raise ValueError(f"reference folder {self.path} holds {len(files)} images, {self.count} asked")
        listing = "\n".join(f"{p.relative_to(self.path).as_posix()}\t{p.stat().st_size}" for p in files)
        self.files, self.images_n = files, len(files)
        self.fingerprint = {"files": len(files), "list_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    # ---- description
    @property
    def label(self) -> str:
        """A short human name: what, where, how many."""
        res = "?" if self.resolution is None else self.resolution
        if self.kind == "dataset":
            how = {"first": f"n={self.count}", "even": f"n={self.count} spread evenly"}.get(self.selection, "whole split")
            return f"{self.dataset}/{self.split}@{res} ({how})"
        name = self.released or str(self.path)
        n = self.count or self.images_n
        if self.kind == "folder":
            return f"{name} (image folder, {n} images{' spread evenly' if self.selection == 'even' else ''} @{res})"
        if self.has_stats and self.has_images:
            what = (f"ADM reference batch: features of its {n} images" if self.prefer == "images" else
                    f"ADM reference batch: Inception mu/sigma from the file, its {n} images for other feature spaces")
        elif self.has_images:
            what = f"{n} images (arr_0), features computed from them"
        else:
            what = "statistics file: mu/sigma" + (" and features" if "features" in self.keys else "")
        return f"{name} ({what})"

    def record(self) -> dict:
        """Everything that identifies this reference, JSON-able, for a results file."""
        rec = {"kind": self.kind, "spec": to_jsonable(self.spec) if isinstance(self.spec, (list, dict)) else str(self.spec),
               "label": self.label, "resolution": self.resolution, "count": self.count, "selection": self.selection}
        if self.kind == "dataset":
            rec.update(dataset=self.dataset, split=self.split, root=None if self.root is None else str(self.root),
                       flips=False)
            if self.selection == "even":
                rec["indices"] = "floor(i * len(split) / count), i < count"
            return rec
        rec.update(path=str(self.path), **self.fingerprint)
        if self.kind == "folder":
            rec.update(images=self.images_n, crop="ADM centre crop", order="sorted relative paths")
        else:
            rec.update(keys=self.keys, images=self.images_n, prefer=self.prefer if self.has_images else "stats",
                       released=self.released)
        return rec

    def check_resolution(self, res) -> None:
        """Refuse samples at another resolution; a reference whose images get cropped takes the samples'."""
        if self.resolution is None:
            if self.kind in ("dataset", "folder") and isinstance(res, int):
                self.resolution = res
            return
        if res != self.resolution:
            raise ValueError(f"samples are {res} px but the reference {self.label} is at {self.resolution} px: "
                             f"build the reference at the samples' resolution")

    # ---- statistics
    def source(self, space: str) -> Optional[str]:
        """Where ``space``'s statistics come from: "stats" (the file's mu/sigma), "images", or None.
        A file's statistics serve the Inception space, or a custom space when the file has no images
        (the caller vouches for it; the dimension is checked); never the classifier's."""
        if self.kind != "file":
            return "images"
        if self.has_images and (self.prefer == "images" or not self.has_stats or space != "inception"):
            return "images"
        return "stats" if self.has_stats and space != "classifier" else None

    def stats(self, space: str, extractor, dim: Optional[int] = None):
        """``(mu, sigma, real features or None)`` in ``extractor``'s space ("inception", "classifier" or a
        custom name; see ``source``): features computed and cached where they come from images. ``dim``:
        the samples' feature dimension, checked against the statistics."""
        src = self.source(space)
        if src is None:
            raise Unavailable(f"the statistics file {self.path} holds no {space} statistics; the {space} space "
                              "needs a reference with images (DATASET:SPLIT[:N], a folder, an .npz with arr_0)")
        if src == "stats":
            mu, sigma = self._file_stats()
            feats = self._file_array("features") if "features" in self.keys else None
        else:
            if self.resolution is None:
                raise ValueError(f"reference {self.label}: its resolution is unknown (pass resolution=)")
            key, split, count, selection = self._cache_key()
            mu, sigma, feats = reference_stats(key, split, self.resolution, count, self._images, self.cache_dir,
                                               extractor, selection=selection, record={"reference": self.record()})
            if self.count is None and self.kind == "dataset":
                self.count = len(feats)
        if dim is not None and mu.shape[0] != dim:
            raise ValueError(f"reference {self.label} has {mu.shape[0]}-d statistics, the {space} features are "
                             f"{dim}-d ({extractor.description})")
        return mu, sigma, feats

    def _cache_key(self) -> tuple[str, str, Optional[int], Optional[str]]:
        """(source key, split, count, selection) for ``reference_stats``."""
        if self.kind == "dataset":
            key = self.dataset if self.root is None else f"{self.dataset}-root{_root_tag(self.root)}"
            sel = {"first": None, "even": "even"}.get(self.selection)
            return key, self.split, (self.count if self.selection != "all" else None), sel
        sel = f"even{self.count}" if self.selection == "even" else None
        if self.kind == "folder":
            return f"folder-{_slug(self.path.name)}-{self.fingerprint['list_sha256'][:12]}", "files", None, sel
        return f"npz-{_slug(self.path.stem)}-{self.fingerprint['sha256_ends'][:12]}", "arr_0", None, sel

    def _file_stats(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            return load_reference_stats(self.path)
        except (KeyError, *_UNREADABLE_NPZ) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise BadReferenceError(f"reference file {self.path}: cannot read its statistics ({msg})") from e

    def _file_array(self, key: str) -> np.ndarray:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return z[key]
        except _UNREADABLE_NPZ as e:
            raise BadReferenceError(f"reference file {self.path}: cannot read '{key}' ({type(e).__name__}: {e})") from e

    def _workers(self, n: int) -> int:
        if self.num_workers is not None:
            return int(self.num_workers)
        return min(8, os.cpu_count() or 1) if n > 1000 else 0

    def _images(self):
        """The selected images as float batches in [-1, 1], in a fixed order."""
        if self.kind == "file":
            idx = even_indices(self.images_n, self.count) if self.selection == "even" else range(self.images_n)
            try:
                yield from _npz_image_batches(self.path, "arr_0", idx, self.batch_size)
            except _UNREADABLE_NPZ as e:
                raise BadReferenceError(f"reference file {self.path}: cannot read its images 'arr_0' "
                                        f"({type(e).__name__}: {e})") from e
            return
        if self.kind == "folder":
            files = self.files if self.selection != "even" else [self.files[i] for i in
                                                                 even_indices(len(self.files), self.count)]
            yield from _loader_batches(_FolderImages(files, self.resolution), range(len(files)), self.batch_size,
                                       self._workers(len(files)))
            return
        ds = self._build()
        idx = self._select(len(ds))
        if hasattr(ds, "tensor_batch"):
            for i in range(0, len(idx), self.batch_size):
                yield ds.tensor_batch(idx[i:i + self.batch_size])[0]
        else:
            yield from _loader_batches(ds, idx, self.batch_size, self._workers(len(idx)))

    def _build(self):
        kind = DATASETS.get(self.dataset)
        if kind is None:
            raise ValueError(f"reference {self.label}: unknown dataset {self.dataset!r}; choices {sorted(DATASETS)}")
        kw = {"train": False} if kind == "imagefolder" else {}  # no random flips in a reference
        return build_dataset(self.dataset, split=self.split, image_size=self.resolution,
                             channels=1 if kind == "fashion_mnist" else 3, root=self.root, **kw)

    def _select(self, length: int) -> list[int]:
        if self.selection == "all":
            return list(range(length))
        if self.count is None or self.count > length:
            raise ValueError(f"reference {self.label}: the dataset has only {length} images")
        return list(range(self.count)) if self.selection == "first" else even_indices(length, self.count)

"""Latent cache: encode a dataset once per tokenizer checkpoint, then train generators without the
tokenizer.

A cache folder holds ``moments.npy`` (N, 2C, h, w) float32 posterior ``[mean, logvar]`` as a memory
map, optionally ``moments_flip.npy`` of the horizontally flipped images (MAR's ``main_cache``),
``labels.npy`` and ``meta.json`` (tokenizer fingerprint, its per-channel statistics, dataset, split,
image size). Generator training samples ``z ~ N(mean, exp(logvar))`` from the moments and normalises it
with the statistics stored with the tokenizer, exactly as online tokenization with
``tokenize(x, sample=True)`` does, so both paths feed the generator the same distribution.

Building is sharded and resumable. Under a process group (torchrun) every rank calls
``build_latent_cache``: rank 0 creates the arrays at their final size in ``<cache>.tmp/``, the ranks
encode fixed-size shards (shard ``s`` = items ``[s*S, (s+1)*S)``, taken round-robin) straight into them,
and each finished shard leaves an empty marker in ``<cache>.tmp/done/`` once its bytes are flushed. A
killed build resumes with the missing shards only (with any number of ranks). Rank 0 writes the header
(``meta.json``, marked complete, with the statistics) last and renames the folder into place. The
arrays are shared files, so with several nodes the cache folder must be on a filesystem they all see.

A complete cache is reused only after checking it: the tokenizer fingerprint, a readable header, and every
array's header shape and file size against the header. A damaged cache (a truncated ``moments.npy``, a
garbled ``meta.json``) is said to be damaged and rebuilt; ``LatentCache`` refuses one with a
``DamagedFileError`` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import build_dataset
from .engine.common import autocast_ctx
from .engine.distributed import barrier, broadcast_object, get_rank, get_world_size
from .engine.stats import fetch_batch
from .runs import (WEIGHTS, DamagedFileError, RunLayout, atomic_write_json, file_digest, load_tokenizer,
                   run_train_config, tokenizer_dir)
from .tokenizers.base import DiagonalGaussian

__all__ = ["tokenizer_fingerprint", "build_latent_cache", "LatentCache", "LatentStatsMismatch", "DEFAULT_SHARD_SIZE"]

DEFAULT_SHARD_SIZE = 4096  # items per shard: the unit of work of a rank and of a resumed build
_PLAN = "build.json"  # in the temp folder: what is being built (a resumed build must match it)
_DONE = "done"  # in the temp folder: one empty file per finished shard, named by its number


class LatentStatsMismatch(ValueError):
    """Latents normalised with statistics other than the tokenizer's own."""


def tokenizer_fingerprint(tok_dir) -> str:
    """sha256 of the exported tokenizer weights (``model.safetensors``), the identity of a cache.
    ``tok_dir``: a tokenizer run or an exported tokenizer folder."""
    return file_digest(tokenizer_dir(tok_dir) / WEIGHTS)[:16]


@dataclass(frozen=True)
class _Job:
    """What a build encodes (the same on every rank)."""

    tok_run: Path
    dataset: str
    split: str
    flip: bool
    limit: Optional[int]
    image_size: int
    channels: int
    data_root: Optional[str]
    out: Path
    explicit_dir: bool

    @property
    def tmp(self) -> Path:
        return self.out.with_name(self.out.name + ".tmp")

    def images(self):
        return build_dataset(self.dataset, split=self.split, image_size=self.image_size, channels=self.channels,
                             root=self.data_root)


@torch.no_grad()
def build_latent_cache(tok_run, dataset_name: Optional[str] = None, split: str = "train", flip: bool = False,
                       out_dir=None, batch_size: int = 256, device="cpu", data_root=None, limit: Optional[int] = None,
                       verbose: bool = True, shard_size: Optional[int] = None,
                       num_workers: int = 0) -> "LatentCache":
    """Encode ``split`` of the tokenizer run's dataset (or ``dataset_name``) once; reuse a complete cache
    built from the same tokenizer weights, resume an interrupted one. Under a process group every rank
    must call it (each encodes its share on its ``device``); every rank gets the finished cache.
    Images are read through a DataLoader with ``num_workers`` workers; bf16 autocast on CUDA only.
    ``shard_size`` (``DEFAULT_SHARD_SIZE`` when None) is kept from an interrupted build that is resumed."""
    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    device = torch.device(device)
    tok = load_tokenizer(tok_run).to(device).eval()
    if not tok.has_stats:
        raise LatentStatsMismatch(f"{tok_run}: the tokenizer has no latent statistics; a finished tokenizer run "
                                  "exports them (or call collect_latent_stats)")
    cfg = run_train_config(tok_run)
    dataset_name = dataset_name or cfg.data.dataset
    out = Path(out_dir) if out_dir else RunLayout(tok_run).latent_cache(dataset_name, split, flip)
    job = _Job(Path(tok_run), dataset_name, split, flip, limit, cfg.model.image_size, cfg.model.in_channels,
               data_root if data_root is not None else cfg.data.data_root, out, out_dir is not None)
    main = get_rank() == 0
    talk = verbose and main
    images = {}  # rank 0's dataset, built while planning

    def plan_on_rank0():
        plan, images["ds"] = _plan(tok, job, shard_size, talk)
        return plan

    # one builder at a time across separate processes (several runs may start on the same tokenizer):
    # the others wait, then find the finished cache. Rank 0 holds the lock for its whole group.
    with _exclusive(out) if main else contextlib.nullcontext():
        plan = _on_rank0(plan_on_rank0)
        if plan is not None:
            ds = images["ds"] if main else job.images()
            if len(ds) < plan["count"]:
                raise ValueError(f"rank {get_rank()}: {job.dataset}/{split} has {len(ds)} items, rank 0 saw "
                                 f"{plan['count']}: every rank must read the same dataset")
            _encode_shards(tok, ds, job.tmp, plan, batch_size, num_workers, device, talk)
            barrier()
            _on_rank0(lambda: _finish(tok, job, plan, getattr(ds, "num_classes", None), talk))
    return LatentCache(out)


@contextlib.contextmanager
def _exclusive(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


_RAISED_AS = {"LatentStatsMismatch": LatentStatsMismatch, "FileNotFoundError": FileNotFoundError,
              "ValueError": ValueError}


def _on_rank0(fn: Callable):
    """``fn()`` on rank 0, its (picklable) result on every rank. An error on rank 0 is raised on every
    rank, so that no rank waits for a result that never comes; the broadcast also synchronises."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, here and on the other ranks
            error = e
    box = broadcast_object((result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    if box[1] is not None:
        raise _RAISED_AS.get(box[1][0], RuntimeError)(f"rank 0 failed: {box[1][1]}")
    return box[0]


# ---------------------------------------------------------------------------------------------
# Rank 0: decide, prepare, finish
# ---------------------------------------------------------------------------------------------
def _reusable(job: _Job, fp: str, verbose: bool) -> bool:
    """True for a complete, undamaged cache of these weights; refuses an explicitly named cache of another
    tokenizer. A damaged one is reported (it is then rebuilt)."""
    meta_path = job.out / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = _read_meta(job.out)
    except DamagedFileError as e:
        if verbose:
            print(f"latent cache damaged, rebuilding it: {e}", flush=True)
        return False
    if meta.get("complete") and meta.get("tokenizer_fingerprint") == fp and meta.get("limit") == job.limit:
        problem = _damage(job.out, meta)
        if problem is not None:
            if verbose:
                print(f"latent cache damaged, rebuilding it: {problem}", flush=True)
            return False
        if verbose:
            print(f"latent cache up to date: {job.out} ({meta['count']} items)")
        return True
    if meta.get("complete") and meta.get("tokenizer_fingerprint") != fp and job.explicit_dir:
        # an explicitly named cache of another tokenizer is never overwritten silently (the default
        # location lives inside the tokenizer run, where a new fingerprint means the run moved on)
        raise LatentStatsMismatch(
            f"{job.out} holds latents of another tokenizer ({meta.get('tokenizer')}, fingerprint "
            f"{meta.get('tokenizer_fingerprint')}; this one is {fp}): they are not normalised with this "
            "tokenizer's statistics. Remove the folder or choose another cache_dir.")
    return False


def _plan(tok, job: _Job, shard_size: int, verbose: bool):
    """(None, None) for a reusable cache; else the build plan (shared with every rank) and the dataset."""
    fp = tokenizer_fingerprint(job.tok_run)
    if _reusable(job, fp, verbose):
        return None, None
    ds = job.images()
    n = len(ds) if job.limit is None else min(job.limit, len(ds))
    key = {"tokenizer_fingerprint": fp, "dataset": job.dataset, "split": job.split, "data_root": job.data_root,
           "image_size": job.image_size, "count": n, "limit": job.limit, "flip": job.flip,
           "latent_shape": list(tok.latent_shape(job.image_size))}
    shard_size, done = _open_temp(job.tmp, key, shard_size)
    num_shards = math.ceil(n / shard_size)
    missing = [s for s in range(num_shards) if s not in done]
    if verbose:
        resumed = f", resuming: {num_shards - len(missing)} done" if done else ""
        print(f"encoding {job.dataset}/{job.split} into {job.out}: {n} items in {num_shards} shards of "
              f"{shard_size} over {get_world_size()} rank(s){resumed}", flush=True)
    return dict(key, shard_size=shard_size, num_shards=num_shards, missing=missing), ds


def _array_names(flip: bool) -> list:
    return ["moments.npy", "moments_flip.npy", "labels.npy"] if flip else ["moments.npy", "labels.npy"]


_META_KEYS = ("complete", "tokenizer", "tokenizer_fingerprint", "latent_mean", "latent_std", "count", "latent_shape",
              "flip", "num_classes")
_REBUILD = "run the command again to rebuild it (a damaged default cache is rebuilt), or remove the folder"


def _read_meta(cache: Path) -> dict:
    """``meta.json`` of a cache folder; a garbled one, or one without the header's keys, is a ``DamagedFileError``."""
    path = cache / "meta.json"
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DamagedFileError(f"{path} is damaged (not valid JSON: {e}); {_REBUILD}") from None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path} is damaged (not a JSON object); {_REBUILD}")
    if meta.get("complete"):
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise DamagedFileError(f"{path} is damaged (missing {', '.join(missing)}); {_REBUILD}")
    return meta


def _npy_layout(path: Path):
    """(shape, dtype, data offset) from a .npy header; ValueError for a file that is not one."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return tuple(shape), dtype, f.tell()


def _damage(cache: Path, meta: dict) -> Optional[str]:
    """What is wrong with a complete cache's arrays (None when nothing): each must exist, have a readable
    header with the shape the header of the cache promises, and the file size that shape needs."""
    c, h, w = meta["latent_shape"]
    n = int(meta["count"])
    for name in _array_names(bool(meta.get("flip"))):
        path = cache / name
        want = (n,) if name == "labels.npy" else (n, 2 * c, h, w)
        try:
            shape, dtype, offset = _npy_layout(path)
        except FileNotFoundError:
            return f"{path} is missing"
        except (OSError, ValueError) as e:
            return f"{path} has no valid .npy header ({e})"
        if shape != want:
            return f"{path} holds an array of shape {shape}, expected {want}"
        need = offset + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        size = path.stat().st_size
        if size != need:
            return f"{path} is {size} bytes, expected {need} (truncated or altered)"
    return None


def _open_temp(tmp: Path, key: dict, shard_size: int):
    """(shard size, finished shards) of the interrupted build in ``tmp`` when it built the same thing
    (its shard size is kept: its markers count in it); else a fresh temp folder with empty arrays."""
    try:
        old = json.loads((tmp / _PLAN).read_text())
    except (OSError, ValueError):
        old = None
    if (old is not None and old.get("key") == key and (tmp / _DONE).is_dir()
            and all((tmp / a).is_file() for a in _array_names(key["flip"]))):
        return int(old["shard_size"]), _done_shards(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / _DONE).mkdir(parents=True)
    n, (c, h, w) = key["count"], key["latent_shape"]
    for name in _array_names(key["flip"]):
        shape, dtype = ((n,), np.int64) if name == "labels.npy" else ((n, 2 * c, h, w), np.float32)
        arr = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)  # sparse until written
        del arr
    atomic_write_json({"key": key, "shard_size": shard_size}, tmp / _PLAN)
    return shard_size, set()


def _done_shards(tmp: Path) -> set:
    return {int(p.name) for p in (tmp / _DONE).iterdir() if p.name.isdigit()}


def _finish(tok, job: _Job, plan: dict, num_classes: Optional[int], verbose: bool) -> None:
    """Check that every shard is done, write the header (complete, with the statistics), rename into place."""
    tmp = job.tmp
    missing = sorted(set(range(plan["num_shards"])) - _done_shards(tmp))
    if missing:
        raise RuntimeError(f"{tmp}: shards {missing[:10]} were not recorded as done (of {plan['num_shards']}); "
                           "with several nodes the cache folder must be on a filesystem every rank shares")
    labels = np.load(tmp / "labels.npy")
    meta = {"complete": True, "tokenizer": str(job.tok_run.resolve()), "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
            "latent_mean": tok.latent_mean.tolist(), "latent_std": tok.latent_std.tolist(),
            "dataset": job.dataset, "split": job.split, "count": plan["count"], "limit": job.limit,
            "image_size": job.image_size, "latent_shape": plan["latent_shape"], "flip": job.flip,
            "num_classes": int(num_classes if num_classes is not None else int(labels.max()) + 1)}
    shutil.rmtree(tmp / _DONE)
    (tmp / _PLAN).unlink()
    atomic_write_json(meta, tmp / "meta.json")
    shutil.rmtree(job.out, ignore_errors=True)
    tmp.rename(job.out)
    if verbose:
        c, h, w = plan["latent_shape"]
        print(f"latent cache written: {job.out} ({plan['count']} items, latents {c}x{h}x{w})", flush=True)


# ---------------------------------------------------------------------------------------------
# Every rank: encode its shards
# ---------------------------------------------------------------------------------------------
class _ShardBatches(Dataset):
    """Item ``k``: (shard, first index, images, labels) of this rank's ``k``-th batch; plain reads (workers)."""

    def __init__(self, ds, spans):
        self.ds, self.spans = ds, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, k):
        shard, start, stop = self.spans[k]
        x, y = fetch_batch(self.ds, list(range(start, stop)))
        return shard, start, x, y


def _shard_bounds(shard: int, plan: dict):
    size = plan["shard_size"]
    return shard * size, min(plan["count"], (shard + 1) * size)


def _shard_views(tmp: Path, names, lo: int, hi: int) -> list:
    """Writable memory maps of rows ``[lo, hi)`` of the .npy files ``names`` (flushing one flushes
    only its shard)."""
    views = []
    for name in names:
        shape, dtype, offset = _npy_layout(tmp / name)
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        views.append(np.memmap(tmp / name, dtype=dtype, mode="r+", offset=offset + lo * row,
                               shape=(hi - lo, *shape[1:])))
    return views


def _encode_shards(tok, ds, tmp: Path, plan: dict, batch_size: int, num_workers: int, device: torch.device,
                   verbose: bool) -> None:
    """Encode this rank's share of the missing shards into the shared arrays, marking each when flushed."""
    if not (tmp / _PLAN).is_file():
        raise FileNotFoundError(f"rank {get_rank()}: {tmp / _PLAN} not found; with several nodes the cache "
                                "folder must be on a filesystem every rank shares")
    mine = plan["missing"][get_rank()::get_world_size()]
    spans = []
    for s in mine:
        lo, hi = _shard_bounds(s, plan)
        spans += [(s, i, min(hi, i + batch_size)) for i in range(lo, hi, batch_size)]
    loader = DataLoader(_ShardBatches(ds, spans), batch_size=None, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    names, views, finished = _array_names(plan["flip"]), None, 0
    for shard, start, x, y in loader:
        lo, hi = _shard_bounds(shard, plan)
        if views is None:
            views = _shard_views(tmp, names, lo, hi)
        x = x.to(device, non_blocking=True)
        with autocast_ctx(device, "auto"):  # bf16 on CUDA; fp32 on a CPU (unchanged results)
            moments = [tok.encode_moments(x)]
            if plan["flip"]:
                moments.append(tok.encode_moments(torch.flip(x, dims=[3])))
        rows = slice(start - lo, start - lo + len(x))
        for view, m in zip(views, moments):
            view[rows] = m.float().cpu().numpy()
        views[-1][rows] = y.numpy()
        if start + len(x) == hi:  # the shard's last batch: flush, then record it
            for view in views:
                view.flush()
            views = None
            (tmp / _DONE / f"{shard:06d}").touch()
            finished += 1
            if verbose and (finished % 10 == 0 or finished == len(mine)):
                print(f"encoded {finished}/{len(mine)} shards on rank 0", flush=True)


class LatentCache(torch.utils.data.Dataset):
    """A built cache: moments as memory maps, normalised latent samples on demand."""

    def __init__(self, directory):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.dir}: not a latent cache (no meta.json); build it with build_latent_cache")
        self.meta = _read_meta(self.dir)
        if not self.meta.get("complete"):
            raise ValueError(f"{self.dir}: the cache is incomplete (an interrupted build); build it again")
        problem = _damage(self.dir, self.meta)
        if problem is not None:
            raise DamagedFileError(f"latent cache {self.dir} is damaged: {problem}; {_REBUILD}")
        self.moments = np.load(self.dir / "moments.npy", mmap_mode="r")
        self.moments_flip = np.load(self.dir / "moments_flip.npy", mmap_mode="r") if self.meta.get("flip") else None
        self.labels = torch.from_numpy(np.load(self.dir / "labels.npy"))
        self.mean = torch.tensor(self.meta["latent_mean"], dtype=torch.float32)
        self.std = torch.tensor(self.meta["latent_std"], dtype=torch.float32)
        self.num_classes = int(self.meta["num_classes"])
        self.latent_shape = tuple(self.meta["latent_shape"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.moments[i])), int(self.labels[i])

    def check_tokenizer(self, tok, tok_run=None) -> None:
        """Refuse latents that were not normalised with this tokenizer's statistics."""
        if not tok.has_stats:
            raise LatentStatsMismatch("the tokenizer has no latent statistics")
        same = torch.equal(tok.latent_mean.cpu(), self.mean) and torch.equal(tok.latent_std.cpu(), self.std)
        if tok_run is not None and tokenizer_fingerprint(tok_run) != self.meta["tokenizer_fingerprint"]:
            same = False
        if not same:
            raise LatentStatsMismatch(
                f"{self.dir} was built from another tokenizer ({self.meta['tokenizer']}, fingerprint "
                f"{self.meta['tokenizer_fingerprint']}): its latents are not normalised with this tokenizer's statistics")

    def read(self, indices):
        """The stored moments (and flipped moments, or None) and labels for ``indices``: plain reads, no
        randomness, so DataLoader workers can do them."""
        idx = np.asarray(indices)
        order = torch.from_numpy(np.argsort(np.argsort(idx)))  # memmap reads are fastest sorted; restore the order
        mom = torch.from_numpy(np.ascontiguousarray(self.moments[np.sort(idx)]))[order]
        mom_f = None
        if self.moments_flip is not None:
            mom_f = torch.from_numpy(np.ascontiguousarray(self.moments_flip[np.sort(idx)]))[order]
        return mom, mom_f, self.labels[torch.from_numpy(idx)]

    def sample(self, read, generator: Optional[torch.Generator] = None, device="cpu"):
        """Normalised latent samples (B, C, h, w) and labels from ``read``'s output; with a flip cache, each
        item takes the flipped moments with probability 1/2. Draws from ``generator``: flips, then samples."""
        mom, mom_f, labels = read
        if mom_f is not None:
            dev = generator.device if generator is not None else "cpu"  # a CUDA generator draws on CUDA
            flip = (torch.rand(len(mom), generator=generator, device=dev) < 0.5).cpu()
            if flip.any():
                mom = torch.where(flip.view(-1, 1, 1, 1), mom_f, mom)
        mom = mom.to(device)
        z = DiagonalGaussian(mom, dim=1).sample(generator)
        z = (z - self.mean.to(device).view(1, -1, 1, 1)) / self.std.to(device).view(1, -1, 1, 1)
        return z, labels.to(device)

    def batch(self, indices, generator: Optional[torch.Generator] = None, device="cpu"):
        """``sample(read(indices))``."""
        return self.sample(self.read(indices), generator, device)

"""Latent cache: encode a dataset once per tokenizer checkpoint, then train generators without the
tokenizer.

A cache folder holds ``moments.npy`` (N, 2C, h, w) float32 posterior ``[mean, logvar]`` as a memory
map, optionally ``moments_flip.npy`` of the horizontally flipped images (MAR's ``main_cache``),
``labels.npy`` and ``meta.json`` (tokenizer fingerprint, its per-channel statistics, dataset, split,
image size). Generator training samples ``z ~ N(mean, exp(logvar))`` from the moments and normalises it
with the statistics stored with the tokenizer, exactly as online tokenization with
``tokenize(x, sample=True)`` does, so both paths feed the generator the same distribution.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import build_dataset
from .engine.stats import fetch_batch
from .runs import WEIGHTS, RunLayout, atomic_write_json, load_tokenizer, run_train_config, tokenizer_dir
from .tokenizers.base import DiagonalGaussian

__all__ = ["tokenizer_fingerprint", "build_latent_cache", "LatentCache", "LatentStatsMismatch"]


class LatentStatsMismatch(ValueError):
    """Latents normalised with statistics other than the tokenizer's own."""


def tokenizer_fingerprint(tok_dir) -> str:
    """sha256 of the exported tokenizer weights (``model.safetensors``), the identity of a cache.
    ``tok_dir``: a tokenizer run or an exported tokenizer folder."""
    h = hashlib.sha256()
    with open(tokenizer_dir(tok_dir) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def build_latent_cache(tok_run, dataset_name: Optional[str] = None, split: str = "train", flip: bool = False,
                       out_dir=None, batch_size: int = 256, device="cpu", data_root=None, limit: Optional[int] = None,
                       verbose: bool = True) -> "LatentCache":
    """Encode ``split`` of the tokenizer run's dataset (or ``dataset_name``) once; reuse a complete cache
    built from the same tokenizer weights."""
    tok = load_tokenizer(tok_run).to(device).eval()
    if not tok.has_stats:
        raise LatentStatsMismatch(f"{tok_run}: the tokenizer has no latent statistics; a finished tokenizer run "
                                  "exports them (or call collect_latent_stats)")
    cfg = run_train_config(tok_run)
    dataset_name = dataset_name or cfg.data.dataset
    out = Path(out_dir) if out_dir else RunLayout(tok_run).latent_cache(dataset_name, split, flip)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (several runs may start on the same tokenizer at once): the others wait,
    # then find the finished cache
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(tok, tok_run, cfg, dataset_name, split, flip, out, out_dir is not None, batch_size,
                             device, data_root, limit, verbose)


def _build_locked(tok, tok_run, cfg, dataset_name, split, flip, out, explicit_dir, batch_size, device, data_root,
                  limit, verbose):
    fp = tokenizer_fingerprint(tok_run)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete") and meta.get("tokenizer_fingerprint") == fp and meta.get("limit") == limit:
            if verbose:
                print(f"latent cache up to date: {out} ({meta['count']} items)")
            return LatentCache(out)
        if meta.get("complete") and meta.get("tokenizer_fingerprint") != fp and explicit_dir:
            # an explicitly named cache of another tokenizer is never overwritten silently (the default
            # location lives inside the tokenizer run, where a new fingerprint means the run moved on)
            raise LatentStatsMismatch(
                f"{out} holds latents of another tokenizer ({meta.get('tokenizer')}, fingerprint "
                f"{meta.get('tokenizer_fingerprint')}; this one is {fp}): they are not normalised with this "
                "tokenizer's statistics. Remove the folder or choose another cache_dir.")
    ds = build_dataset(dataset_name, split=split, image_size=cfg.model.image_size, channels=cfg.model.in_channels,
                       root=data_root if data_root is not None else cfg.data.data_root)
    n = len(ds) if limit is None else min(limit, len(ds))
    c, h, w = tok.latent_shape(cfg.model.image_size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mom = np.lib.format.open_memmap(tmp / "moments.npy", mode="w+", dtype=np.float32, shape=(n, 2 * c, h, w))
    mom_f = (np.lib.format.open_memmap(tmp / "moments_flip.npy", mode="w+", dtype=np.float32, shape=(n, 2 * c, h, w))
             if flip else None)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(0, n, batch_size):
        idx = list(range(i, min(n, i + batch_size)))
        x, y = fetch_batch(ds, idx)
        x = x.to(device)
        mom[i:i + len(idx)] = tok.encode_moments(x).float().cpu().numpy()
        if mom_f is not None:
            mom_f[i:i + len(idx)] = tok.encode_moments(torch.flip(x, dims=[3])).float().cpu().numpy()
        labels[i:i + len(idx)] = y.numpy()
        if verbose and (i // batch_size) % 20 == 0:
            print(f"encoding {dataset_name}/{split}: {i + len(idx)}/{n}", flush=True)
    mom.flush()
    del mom
    if mom_f is not None:
        mom_f.flush()
        del mom_f
    np.save(tmp / "labels.npy", labels)
    meta = {"complete": True, "tokenizer": str(Path(tok_run).resolve()), "tokenizer_fingerprint": fp,
            "latent_mean": tok.latent_mean.tolist(), "latent_std": tok.latent_std.tolist(),
            "dataset": dataset_name, "split": split, "count": n, "limit": limit, "image_size": cfg.model.image_size,
            "latent_shape": [c, h, w], "flip": flip, "num_classes": int(getattr(ds, "num_classes", int(labels.max()) + 1))}
    atomic_write_json(meta, tmp / "meta.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if verbose:
        print(f"latent cache written: {out} ({n} items, latents {c}x{h}x{w})")
    return LatentCache(out)


class LatentCache(torch.utils.data.Dataset):
    """A built cache: moments as memory maps, normalised latent samples on demand."""

    def __init__(self, directory):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.dir}: not a latent cache (no meta.json); build it with build_latent_cache")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise ValueError(f"{self.dir}: the cache is incomplete (an interrupted build); build it again")
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
            flip = torch.rand(len(mom), generator=generator) < 0.5
            if flip.any():
                mom = torch.where(flip.view(-1, 1, 1, 1), mom_f, mom)
        mom = mom.to(device)
        z = DiagonalGaussian(mom, dim=1).sample(generator)
        z = (z - self.mean.to(device).view(1, -1, 1, 1)) / self.std.to(device).view(1, -1, 1, 1)
        return z, labels.to(device)

    def batch(self, indices, generator: Optional[torch.Generator] = None, device="cpu"):
        """``sample(read(indices))``."""
        return self.sample(self.read(indices), generator, device)

"""A small Fashion-MNIST CNN classifier: a second, cheap feature space for generation metrics on a CPU.

Inception features (``InceptionFeatures``) are the standard for gFID but cost ~20-50 images/s on a
CPU and were trained on ImageNet photos, not 32 px clothing silhouettes. This CNN (5 conv+BN+ReLU
layers 16-16-32-32-64, three 2x2 max-pools, FC 1024->128->10) trains in about two minutes on one core
(2 epochs: 91.1% test accuracy in ~130 s) and gives:

- ``features``: the 128-d penultimate activations (after ReLU), for FD-clf / KID-clf / P/R-clf;
- ``logits``: for class consistency (the classifier's accuracy on samples against their
  conditioning labels).

Numbers in this space are NOT comparable to Inception FID; every result names the space through
``ClassifierFeatures.description`` (e.g. "fmnist-cnn penultimate 128 (test acc 90.9%)").

A trained classifier is cached under ``$LDETOK_CACHE/classifiers`` (else
``~/.cache/ldetok/classifiers``): safetensors weights plus a JSON record (dataset, seed, epochs,
subset, test accuracy), reused when present. The extractor's ``cache_key`` includes a digest of
the weights, so reference statistics cached with one classifier are never reused with another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import build_dataset, from_uint8, to_uint8
from ..runs import atomic_write_bytes
from .fid import _batches, one_thread

__all__ = ["ClassifierFeatures", "FashionCNN", "classifier_cache_dir", "train_classifier"]

IMAGE_SIZE = 32  # the classifier's input size; other sizes are resized to it
_SHORT = {"fashion_mnist": "fmnist", "fmnist": "fmnist"}


# ---- model --------------------------------------------------------------------------------------
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionCNN(nn.Module):
    """32x32 -> [16, 16] pool [32, 32] pool [64] pool -> flatten 4x4x64 -> FC 128 (features) -> FC classes.
    (Flattening rather than global average pooling: 91.1% vs 88.8% after 2 epochs, same cost.)"""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.body = nn.Sequential(
            _block(in_channels, 16), _block(16, 16), nn.MaxPool2d(2),
            _block(16, 32), _block(32, 32), nn.MaxPool2d(2),
            _block(32, 64), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(64 * (IMAGE_SIZE // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))


def _prepare(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Images (B, 1|3, H, W) in [-1, 1] (float) or uint8 -> the classifier's input: quantised to uint8
    by rounding (as for Inception, so an image and its PNG give the same features), gray or RGB as the
    model expects, resized to 32 px."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.is_floating_point():
        x = to_uint8(x)  # as the 8-bit PNG holds them
    elif x.dtype != torch.uint8:
        raise TypeError(f"expected float images in [-1, 1] or uint8, got dtype {x.dtype}")
    x = from_uint8(x)
    if x.shape[1] != in_channels:
        x = x.mean(1, keepdim=True) if in_channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


# ---- training and the on-disk cache --------------------------------------------------------------
def classifier_cache_dir() -> Path:
    """``$LDETOK_CACHE/classifiers``, else ``~/.cache/ldetok/classifiers``."""
    root = os.environ.get("LDETOK_CACHE")
    return Path(root) / "classifiers" if root else Path.home() / ".cache" / "ldetok" / "classifiers"


def _stem(dataset, epochs, seed, limit, test_limit, batch_size) -> str:
    s = f"{_SHORT.get(dataset, dataset)}-cnn_e{epochs}_s{seed}_b{batch_size}"
    s += f"_n{limit}" if limit else ""
    return s + (f"_t{test_limit}" if test_limit else "")


def _dataset(name: str, split: str, root):
    channels = 1 if _SHORT.get(name) == "fmnist" else 3
    ds = build_dataset(name, split=split, image_size=IMAGE_SIZE, channels=channels, root=root)
    if not hasattr(ds, "tensor_batch"):
        raise ValueError(f"train_classifier needs an in-memory dataset with tensor_batch "
                         f"(fashion_mnist, photos, cifar10); {name!r} is not one")
    return ds, channels


@torch.no_grad()
def _accuracy(model: nn.Module, ds, n: int, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, n, batch_size):
        x, y = ds.tensor_batch(range(i, min(n, i + batch_size)))
        correct += int((model(_prepare(x, model.in_channels)).argmax(1) == y).sum())
    return correct / n


def _digest(state: dict) -> str:
    from safetensors.torch import save

    return hashlib.sha1(save({k: v.contiguous() for k, v in state.items()})).hexdigest()


def train_classifier(dataset: str = "fashion_mnist", epochs: int = 2, seed: int = 0, cache_dir=None,
                     limit: int | None = None, test_limit: int | None = None, batch_size: int = 128,
                     lr: float = 2e-3, root=None, device="cpu", verbose: bool = False):
    """``(model, test_accuracy)``: the CNN trained with Adam (lr 2e-3, cosine to 0 per step) and random
    horizontal flips on the first ``limit`` training images (all by default), evaluated on the first
    ``test_limit`` test images (all by default), on one CPU thread (below). Loaded from the cache when a classifier with the same
    settings is there; ``model.meta`` holds the JSON record (``meta["cached"]`` says which happened).
    One thread whatever the caller's setting: CPU kernels sum in another order with another thread count,
    which gave other weights and so other distances (a classifier trained in a 2-thread process and one
    trained at ``OMP_NUM_THREADS=1`` differed); it costs ~2 min instead of ~1 on a 2-core machine."""
    from safetensors.torch import load_file, save

    if epochs < 1 or (limit is not None and limit < 1) or (test_limit is not None and test_limit < 1):
        raise ValueError(f"need epochs >= 1 and limit/test_limit >= 1 or None, got {epochs}, {limit}, {test_limit}")
    device = torch.device(device)
    folder = Path(cache_dir) if cache_dir is not None else classifier_cache_dir()
    stem = _stem(dataset, epochs, seed, limit, test_limit, batch_size)
    wpath, jpath = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if wpath.is_file() and jpath.is_file():
        meta = json.loads(jpath.read_text())
        model = FashionCNN(meta["in_channels"], meta["num_classes"])
        model.load_state_dict(load_file(str(wpath)), strict=True)
        model.meta = {**meta, "cached": True, "path": str(wpath)}
        return model.to(device).eval(), float(meta["test_accuracy"])

    train, channels = _dataset(dataset, "train", root)
    test, _ = _dataset(dataset, "test", root)
    n = min(limit or len(train), len(train))
    n_test = min(test_limit or len(test), len(test))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = FashionCNN(channels, int(train.num_classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    t0 = time.time()
    model.train()
    with one_thread():  # the same weights from every caller (see the docstring)
        _train_epochs(model, opt, sched, train, channels, n, batch_size, epochs, g, device, t0, verbose)
    train_s = time.time() - t0
    model.cpu()
    acc = _accuracy(model, test, n_test)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = save(state)
    meta = {"arch": "conv 16-16-pool-32-32-pool-64-pool, fc 1024-128-relu, fc 128-classes", "dataset": dataset,
            "image_size": IMAGE_SIZE, "in_channels": channels, "num_classes": int(train.num_classes),
            "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "schedule": "cosine per step",
            "augment": "hflip p=0.5", "train_images": n, "limit": limit, "test_images": n_test,
            "test_limit": test_limit, "test_accuracy": acc, "train_seconds": round(train_s, 1),
            "sha1": hashlib.sha1(data).hexdigest(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_bytes(data, wpath)  # weights first, then the record that makes them a cache hit
    atomic_write_bytes(json.dumps(meta, indent=2).encode(), jpath)
    if verbose:
        print(f"classifier: test accuracy {acc:.4f} on {n_test} images, {train_s:.0f} s; cached at {wpath}")
    model.meta = {**meta, "cached": False, "path": str(wpath)}
    return model.to(device).eval(), acc


def _train_epochs(model, opt, sched, train, channels: int, n: int, batch_size: int, epochs: int, g, device,
                  t0: float, verbose: bool) -> None:
    steps_per_epoch = math.ceil(n / batch_size)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x, y = train.tensor_batch(idx)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(_prepare(x, channels).to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.3f} ({time.time() - t0:.0f} s)")


# ---- the feature extractor ------------------------------------------------------------------------
class ClassifierFeatures:
    """The CNN's 128-d penultimate features, with the extractor protocol of ``InceptionFeatures``
    (``features()``, ``description``, ``cache_key``) plus ``logits()`` and ``extract()`` (both in one
    pass). Pass a trained ``model`` (from ``train_classifier``), or the ``train_classifier`` keywords:
    the classifier is then loaded from the cache (or trained) on first use, not at construction."""

    space = "classifier"

    def __init__(self, model: FashionCNN | None = None, device="cpu", batch_size: int = 500, **train_kwargs):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._train_kwargs = {"dataset": "fashion_mnist", **train_kwargs}
        self._model = model

    @property
    def model(self) -> FashionCNN:
        if self._model is None:
            self._model, _ = train_classifier(**self._train_kwargs)
        if not hasattr(self._model, "meta"):  # a model built elsewhere: describe what we can
            self._model.meta = {"dataset": self._train_kwargs["dataset"], "test_accuracy": None,
                                "sha1": _digest(self._model.state_dict())}
        return self._model.to(self.device).eval()

    @property
    def meta(self) -> dict:
        return self.model.meta

    @property
    def name(self) -> str:
        return f"{_SHORT.get(self.meta['dataset'], self.meta['dataset'])}-cnn"

    @property
    def description(self) -> str:
        acc = self.meta.get("test_accuracy")
        return f"{self.name} penultimate 128 (test acc {acc * 100:.1f}%)" if acc is not None else \
            f"{self.name} penultimate 128"

    @property
    def cache_key(self) -> str:
        m = self.meta
        return f"{self.name}-pen128-e{m.get('epochs', 'x')}-s{m.get('seed', 'x')}-{m['sha1'][:10]}"

    @torch.no_grad()
    def extract(self, images) -> dict:
        """``{"features": (N, 128), "logits": (N, num_classes)}`` float32 numpy."""
        model = self.model
        feats, logits = [], []
        for b in _batches(images, self.batch_size):
            f = model.penultimate(_prepare(b, model.in_channels).to(self.device))
            feats.append(f.float().cpu().numpy())
            logits.append(model.head(f).float().cpu().numpy())
        if not feats:
            return {"features": np.zeros((0, 128), np.float32), "logits": np.zeros((0, model.num_classes), np.float32)}
        return {"features": np.concatenate(feats), "logits": np.concatenate(logits)}

    def features(self, images) -> np.ndarray:
        return self.extract(images)["features"]

    def logits(self, images) -> np.ndarray:
        return self.extract(images)["logits"]

    def accuracy(self, images, labels) -> float:
        """Fraction of images the classifier assigns to ``labels`` (class consistency for samples)."""
        pred = self.logits(images).argmax(1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(pred):
            raise ValueError(f"{len(pred)} images but {len(labels)} labels")
        return float((pred == labels).mean())

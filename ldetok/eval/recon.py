"""Reconstruction metrics: PSNR, SSIM, LPIPS (when given) and rFID, each stored with its protocol.

Differences from the official l-DeTok ``evaluate_tokenizer`` (worth knowing when comparing numbers):
- exactly the first ``n`` images of the dataset, each once (the official PSNR averages over a
  DistributedSampler that pads with duplicates);
- float32 on a CPU; on CUDA the tokenizer runs under bf16 autocast (``precision="auto"``; "fp32" turns it
  off) and its outputs are cast to float32 before any metric; uint8 by rounding for Inception (the
  official code truncates bf16 outputs);
- SSIM and optional LPIPS in addition to PSNR/rFID; rFID against the same ``n`` real images (cached).

References: Wang et al. 2004 (SSIM); Zhang et al. 2018 (LPIPS); Heusel et al. 2017 (FID).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..corruption import apply_noise, image_noise
from ..engine.common import autocast_ctx, effective_precision
from ..engine.distributed import broadcast_object, gather_objects, get_rank, get_world_size
from .fid import (
    InceptionFeatures,
    MetricResult,
    _batches,
    fid_from_stats,
    lookup_reference_stats,
    stats_from_features,
    store_reference_stats,
)

__all__ = ["evaluate_reconstruction", "image_noise", "psnr", "psnr_under_noise", "reconstruct_noised", "ssim"]


# ---- per-image metrics --------------------------------------------------------------------------
def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) image batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def _hi_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.device.type == "mps" else x.double()  # float64 where the device has it


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> tuple[float, torch.Tensor]:
    """PSNR per image, ``10 log10(data_range² / MSE)``, and its mean. The default range 2 is images in
    [-1, 1], the same as 10 log10(1 / MSE) on [0, 1]. Identical images give ``inf``."""
    _check_pair(x, y)
    mse = (_hi_precision(x) - _hi_precision(y)).pow(2).flatten(1).mean(1)
    per = 10.0 * torch.log10(data_range**2 / mse)
    return float(per.mean()), per.float().cpu()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(k**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> tuple[float, torch.Tensor]:
    """SSIM per image (Wang et al. 2004) and its mean, on images mapped from ``value_range`` to [0, 1].

    Gaussian window 11 / sigma 1.5, population (co)variances, C1 = (0.01)², C2 = (0.03)², valid
    positions only, SSIM map averaged over channels and positions: equal to
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0)`` (tested to 1e-4).
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}")
    lo, hi = value_range
    x = (_hi_precision(x) - lo) / (hi - lo)
    y = (_hi_precision(y) - lo) / (hi - lo)
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma).to(x)
    # filter the five moments in one depthwise pass (separable: rows, then columns)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    n = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    mx, my, exx, eyy, exy = stack.split(c, dim=1)
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    c1, c2 = k1**2, k2**2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per = smap.flatten(1).mean(1)
    return float(per.mean()), per.float().cpu()


# ---- reconstructions of noised latents ----------------------------------------------------------
@torch.no_grad()
def reconstruct_noised(tokenizer, x: torch.Tensor, level: float, gamma: float, noise_type: str, seed: int,
                       indices, precision: str = "auto") -> torch.Tensor:
    """``decode(apply_noise(encode(x), level, gamma, noise_type, ε)).clamp(-1, 1)`` in float32, ε from
    ``image_noise(seed, indices)`` (``indices``: the images' indices in the evaluation set). The raw
    latents (posterior mean) are noised: the tokenizer's own training corruption at that level. Encoder
    and decoder run under ``autocast_ctx(x.device, precision)``; the latents are noised in float32."""
    if len(indices) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(indices)} indices")
    with autocast_ctx(x.device, precision):
        z = tokenizer.encode(x).float()
    eps = image_noise(z.shape[1:], seed, indices).to(z)
    z = apply_noise(z, float(level), float(gamma), noise_type, noise=eps)
    with autocast_ctx(x.device, precision):
        rec = tokenizer.decode(z)
    return rec.float().clamp(-1.0, 1.0)


@torch.no_grad()
def psnr_under_noise(tokenizer, x: torch.Tensor, levels, gamma: float = 3.0, noise_type: str = "interpolative",
                     seed: int = 0, indices=None, batch_size: int = 200, device=None, precision: str = "auto") -> dict:
    """Per-image PSNR and SSIM of ``x`` (images in [-1, 1]) against ``reconstruct_noised`` at each noise
    level: ``{level: {"psnr": (N,), "ssim": (N,)}}`` (float32, CPU). ``indices`` are the images' indices in
    the evaluation set (default ``0 .. N-1``); each image's ε is seeded by (``seed``, its index), so the
    values do not depend on ``batch_size``, on the other images of a batch, or on the rank evaluating it.
    ``device``: where to decode (default the tokenizer's); ``precision`` as ``reconstruct_noised``."""
    indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(x):
        raise ValueError(f"{len(x)} images but {len(indices)} indices")
    if device is None:
        p = next(iter([*tokenizer.parameters(), *tokenizer.buffers()]), None)
        device = p.device if p is not None else x.device
    dev = torch.device(device)
    was_training = tokenizer.training
    tokenizer.eval()
    out = {}
    try:
        for t in levels:
            per = {"psnr": [], "ssim": []}
            for lo in range(0, len(x), batch_size):
                xb = x[lo:lo + batch_size].to(dev).float()
                rec = reconstruct_noised(tokenizer, xb, t, gamma, noise_type, seed, indices[lo:lo + batch_size],
                                         precision)
                per["psnr"].append(psnr(rec, xb)[1])
                per["ssim"].append(ssim(rec, xb)[1])
            out[float(t)] = {k: torch.cat(v) for k, v in per.items()}
    finally:
        tokenizer.train(was_training)
    return out


# ---- the evaluation -----------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    return get_rank(), get_world_size()


def _map_style(obj):
    """The map-style dataset behind ``obj`` (a dataset, or a DataLoader over one), else None."""
    ds = getattr(obj, "dataset", obj) if isinstance(obj, torch.utils.data.DataLoader) else obj
    if isinstance(ds, (torch.utils.data.IterableDataset, list, tuple)):  # lists hold batches
        return None
    return ds if hasattr(ds, "__getitem__") and hasattr(ds, "__len__") else None


def _first_image(item) -> torch.Tensor:
    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, dict):
        item = item["image"]
    return torch.as_tensor(item)


def _resolution(x: torch.Tensor):
    h, w = int(x.shape[-2]), int(x.shape[-1])
    return h if h == w else f"{h}x{w}"


def _parse_reference(reference: str) -> tuple[str, str]:
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"reference must be a non-empty 'dataset/split' key, got {reference!r}")
    dataset, _, split = reference.partition("/")
    return dataset, split or "default"


def evaluate_reconstruction(
    tokenizer,
    loader_or_dataset,
    n: int,
    device,
    reference: str,
    batch_size: int = 32,
    compute_rfid: bool = True,
    lpips_fn: Callable | None = None,
    noise_level: float | None = None,
    gamma: float = 3.0,
    noise_type: str = "interpolative",
    noise_seed: int = 0,
    extractor=None,
    cache_dir=None,
    protocol_extra: dict | None = None,
    num_workers: int = 0,
    precision: str = "auto",
) -> dict:
    """PSNR / SSIM / LPIPS / rFID of ``tokenizer`` on the first ``n`` images, as ``MetricResult``s.

    - Reconstruction: ``tokenizer.reconstruct(x)`` (posterior mean, clamped); with ``noise_level`` t,
      ``reconstruct_noised`` (the raw latents noised by ``apply_noise(z, t, gamma, noise_type)``, each
      image's ε seeded by (``noise_seed``, its index), as ``psnr_under_noise`` draws it).
    - ``loader_or_dataset``: a map-style dataset or a DataLoader over one (read in dataset order, the
      loader's sampler is ignored, so "first n" is well defined), or any iterable of batches, a
      list of batches included (single process only). Items: tensors or (image, label) tuples,
      images in [-1, 1], 1 or 3 channels (1-channel images are replicated to RGB for Inception/LPIPS).
    - ``reference``: ``"dataset/split"``; the real images' Inception statistics are cached under
      (dataset, split, resolution, n, extractor) and reused by later calls.
    - ``lpips_fn(x, y)`` -> per-image distances for images in [-1, 1]; without it LPIPS is reported
      unavailable with the reason.
    - ``protocol_extra`` (e.g. ``{"ema": True}``) is added to every metric's protocol.
    - ``precision``: "auto" (bf16 autocast for the tokenizer on CUDA, float32 elsewhere), "bf16" or "fp32";
      recorded in every metric's protocol.
    - Under ``torch.distributed`` each rank takes indices ``rank::world``; everything is gathered and
      every rank gets the same results (rank 0 writes the cache).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (FID needs a covariance), got {n}")
    device = torch.device(device)
    rank, world = _dist_info()
    dataset_key, split = _parse_reference(reference)
    ds, indices, source = _shard(loader_or_dataset, n, batch_size, num_workers, rank, world)
    if compute_rfid and extractor is None:
        extractor = InceptionFeatures(device, batch_size)

    def check_cache(res):  # the same answer on every rank: rank 0 decides
        if not compute_rfid:
            return False
        return broadcast_object(lookup_reference_stats(dataset_key, split, res, n, extractor, cache_dir) is None)

    resolution = need_real = None
    if ds is not None:  # know the resolution before the loop, so no rank can skip the broadcast
        resolution = _resolution(_first_image(ds[0]))
        need_real = check_cache(resolution)
    noise = None if noise_level is None else (noise_level, gamma, noise_type, noise_seed)
    per, seen, resolution, need_real = _reconstruct_all(
        tokenizer, source, indices, batch_size, device, noise, lpips_fn, extractor if compute_rfid else None,
        resolution, need_real, check_cache, precision)
    if seen < len(indices):
        raise ValueError(f"the data ran out after {seen} images on rank {rank}; expected {len(indices)}")

    local = {k: (torch.cat(v).numpy() if v else None) for k, v in per.items()}
    local["index"] = np.asarray(indices[:seen])
    merged = _gather(local)

    results = None
    if rank == 0:
        noise = None if noise_level is None else (f"{noise_type} t={noise_level:g} gamma={gamma:g} (raw latents, "
                                                  f"per-image noise seed {noise_seed})")
        results = _summarise(merged, n, resolution, dataset_key, split, reference, compute_rfid, need_real, lpips_fn,
                             noise, extractor, cache_dir,
                             {"precision": effective_precision(device, precision), **(protocol_extra or {})})
    return broadcast_object(results)


def _reconstruct_all(tokenizer, source, indices, batch_size, device, noise, lpips_fn, extractor, resolution,
                     need_real, check_cache, precision: str = "auto"):
    """The per-image metrics of every batch of ``source`` (clean, or noised as ``noise`` =
    (level, gamma, type, seed) says); ``resolution`` and ``need_real`` are found on the first batch
    when not known yet. Returns (per-image lists, images seen, resolution, need_real)."""
    was_training = tokenizer.training
    tokenizer.eval()
    per = {"psnr": [], "ssim": [], "lpips": [], "rec": [], "real": []}
    seen = 0
    try:
        with torch.no_grad():
            for x in _batches(source, batch_size):
                x = x[: len(indices) - seen].to(device).float()
                if x.shape[0] == 0:
                    break
                if resolution is None:  # an iterable source (single process)
                    resolution = _resolution(x)
                    need_real = check_cache(resolution)
                if noise is None:
                    with autocast_ctx(device, precision):
                        rec = tokenizer.reconstruct(x)
                else:
                    rec = reconstruct_noised(tokenizer, x, *noise[:3], noise[3], indices[seen:seen + x.shape[0]],
                                             precision)
                _batch_metrics(per, rec.float(), x, lpips_fn, extractor, need_real)
                seen += x.shape[0]
                if seen >= len(indices):
                    break
    finally:
        tokenizer.train(was_training)
    return per, seen, resolution, bool(need_real)


def _shard(loader_or_dataset, n: int, batch_size: int, num_workers: int, rank: int, world: int):
    """(map-style dataset or None, this rank's image indices, its batches): indices ``rank::world`` of
    the first ``n`` of a dataset, or the first ``n`` images of an iterable (single process only)."""
    ds = _map_style(loader_or_dataset)
    if ds is None:
        if world > 1:
            raise ValueError("distributed evaluation needs a map-style dataset (or a DataLoader over one), "
                             "so each rank can take its own shard; got an iterable")
        return None, list(range(n)), loader_or_dataset
    if len(ds) < n:
        raise ValueError(f"asked for n={n} images, the dataset has only {len(ds)}")
    indices = list(range(rank, n, world))
    source = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    return ds, indices, source


def _batch_metrics(per: dict, rec: torch.Tensor, x: torch.Tensor, lpips_fn, extractor, need_real: bool) -> None:
    """Append one batch's per-image PSNR, SSIM, LPIPS (with ``lpips_fn``) and features (with ``extractor``;
    the real images' too when ``need_real``) to ``per``."""
    per["psnr"].append(psnr(rec, x)[1])
    per["ssim"].append(ssim(rec, x)[1])
    if lpips_fn is not None:
        rgb = lambda t: t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
        per["lpips"].append(torch.as_tensor(lpips_fn(rgb(rec), rgb(x))).flatten().float().cpu())
    if extractor is not None:
        per["rec"].append(torch.from_numpy(extractor.features(rec)))
        if need_real:
            per["real"].append(torch.from_numpy(extractor.features(x)))


def _gather(local: dict) -> dict:
    """All ranks' arrays concatenated in image-index order (identity in a single process)."""
    parts = gather_objects(local)
    order = np.argsort(np.concatenate([p["index"] for p in parts]), kind="stable")
    out = {}
    for k in local:
        vals = [p[k] for p in parts if p[k] is not None]
        out[k] = np.concatenate(vals)[order] if vals else None
    return out


def _summarise(
    m,
    n,
    resolution,
    dataset_key,
    split,
    reference,
    compute_rfid,
    need_real,
    lpips_fn,
    corruption,
    extractor,
    cache_dir,
    extra,
) -> dict:
    base = {"n": n, "resolution": resolution}
    if corruption is not None:
        base["corruption"] = corruption
    base.update(extra)
    res = {
        "psnr": MetricResult(
            "PSNR", float(np.mean(m["psnr"])), {**base, "range": "[0,1] float, per-image mean"}
        ),
        "ssim": MetricResult(
            "SSIM", float(np.mean(m["ssim"])), {**base, "window": "gaussian 11 / 1.5, on [0,1]"}
        ),
    }
    if lpips_fn is not None:
        name = getattr(lpips_fn, "__name__", None) or type(lpips_fn).__name__
        res["lpips"] = MetricResult("LPIPS", float(np.mean(m["lpips"])), {**base, "net": name})
    else:
        res["lpips"] = MetricResult(
            "LPIPS",
            None,
            {
                **base,
                "unavailable": "no lpips_fn given (LPIPS needs "
                "VGG/AlexNet backbone weights, which are not available offline)",
            },
        )
    if compute_rfid:
        if need_real:
            mu_r, sig_r, _ = store_reference_stats(
                dataset_key, split, resolution, n, m["real"], extractor, cache_dir
            )
        else:
            mu_r, sig_r, _ = lookup_reference_stats(dataset_key, split, resolution, n, extractor, cache_dir)
        mu, sig = stats_from_features(m["rec"])
        proto = {
            "n": n,
            "ref": f"{dataset_key}/{split}@{resolution} (n={n})",
            "features": extractor.description,
            **{k: v for k, v in base.items() if k != "n"},
        }
        res["rfid"] = MetricResult("rFID", fid_from_stats(mu, sig, mu_r, sig_r), proto)
    else:
        res["rfid"] = MetricResult("rFID", None, {**base, "unavailable": "compute_rfid=False"})
    return res

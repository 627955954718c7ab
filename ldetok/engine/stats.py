"""Per-channel latent statistics of a tokenizer over a dataset.

Generators train on ``(z - mean_c) / std_c``. Following the official ``collect_tokenizer_stats``, the
statistics are those of the posterior *means* (no masking, no noise, no flip), per latent channel,
over the whole dataset (the official protocol: the whole ImageNet train split) or, when asked, a
class-stratified sample of it (``stratified_indices``); each rank takes its shard and the sums are
all-reduced.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .distributed import all_reduce_sum, get_rank, get_world_size

__all__ = ["collect_latent_stats", "fetch_batch", "stratified_indices", "stats_source"]


def stratified_indices(total: int, n: Optional[int]) -> list:
    """``n`` indices spread evenly over ``range(total)`` (all of them when ``n`` is None or >= total). On a
    class-sorted folder (ImageNet's train split) every class is then represented in proportion, where
    the first ``n`` images would cover only the first few classes."""
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"need at least one image for the statistics, got n={n}")
    return sorted({int(i) for i in np.linspace(0, total - 1, int(n)).round()})


def stats_source(total: int, n: Optional[int]) -> str:
    """How ``collect_latent_stats`` chose its images, for the run's records."""
    if n is None or n >= total:
        return f"whole training split ({total} images), posterior means, no flips"
    return f"class-stratified sample of {n} of {total} training images (evenly spaced), posterior means, no flips"


def fetch_batch(dataset, indices):
    """Images and labels for ``indices``; uses a dataset's vectorised ``tensor_batch`` when it has one."""
    fast = getattr(dataset, "tensor_batch", None)
    if fast is not None:
        return fast(indices)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def collect_latent_stats(tokenizer, dataset, n: Optional[int] = None, batch_size: int = 256, device="cpu",
                         set_on_tokenizer: bool = True):
    """Per-channel (mean, std) of posterior means over ``n`` images spread evenly over ``dataset``
    (``stratified_indices``; all of them when None). ``dataset`` must not flip or crop at random.

    Accumulates in float64; returns CPU float32 tensors of shape (C,), and installs them on the
    tokenizer unless ``set_on_tokenizer=False``.
    """
    chosen = stratified_indices(len(dataset), n)
    rank, world = get_rank(), get_world_size()
    was_training = tokenizer.training
    tokenizer.eval()
    c = tokenizer.latent_channels
    s1 = torch.zeros(c, dtype=torch.float64, device=device)
    s2 = torch.zeros(c, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = chosen[rank::world]
    for i in range(0, len(mine), batch_size):
        x, _ = fetch_batch(dataset, mine[i:i + batch_size])
        z = tokenizer.encode(x.to(device)).double()  # (B, C, h, w)
        s1 += z.sum(dim=(0, 2, 3))
        s2 += z.pow(2).sum(dim=(0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    s1, s2, count = all_reduce_sum(s1), all_reduce_sum(s2), all_reduce_sum(count)
    mean = s1 / count
    var = (s2 / count - mean.pow(2)).clamp_min(1e-12)
    mean, std = mean.float().cpu(), var.sqrt().float().cpu()
    if set_on_tokenizer:
        tokenizer.set_latent_stats(mean, std)
    tokenizer.train(was_training)
    return mean, std

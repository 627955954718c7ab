"""Per-channel latent statistics of a tokenizer over a dataset.

Generators train on ``(z - mean_c) / std_c``. Following the official ``collect_tokenizer_stats``, the
statistics are those of the posterior *means* (no masking, no noise, no flip), per latent channel,
over the first ``n`` images of the dataset; each rank takes its shard and the sums are all-reduced.
"""

from __future__ import annotations

from typing import Optional

import torch

from .distributed import all_reduce_sum, get_rank, get_world_size

__all__ = ["collect_latent_stats", "fetch_batch"]


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
    """Per-channel (mean, std) of posterior means over the first ``n`` images (all when None).

    Accumulates in float64; returns CPU float32 tensors of shape (C,), and installs them on the
    tokenizer unless ``set_on_tokenizer=False``.
    """
    n = len(dataset) if n is None else min(int(n), len(dataset))
    rank, world = get_rank(), get_world_size()
    was_training = tokenizer.training
    tokenizer.eval()
    c = tokenizer.latent_channels
    s1 = torch.zeros(c, dtype=torch.float64, device=device)
    s2 = torch.zeros(c, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = list(range(rank, n, world))
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

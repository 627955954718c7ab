"""Pixel reconstruction loss and the KL term.

As in the official l-DeTok ``ReconstructionLoss``: the pixel loss compares images mapped from [-1, 1]
to [0, 1] (so an L2 value here is 1/4 of the L2 on [-1, 1] images), mean-reduced over every element.
The KL term is the posterior's per-image KL (summed over latent dims) averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PIXEL_LOSSES", "kl_loss", "pixel_loss", "to_unit"]

PIXEL_LOSSES = ("l2", "l1", "l2+l1")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (no clamping: training losses see the raw decoder output)."""
    return (x + 1.0) * 0.5


def pixel_loss(target: torch.Tensor, recon: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean pixel loss between ``target`` and ``recon`` (both in [-1, 1]), computed on [0, 1] images.

    ``kind``: "l2" (MSE, the paper's default), "l1", or "l2+l1" (the average of the two, as the
    official code).
    """
    if kind not in PIXEL_LOSSES:
        raise ValueError(f"pixel loss must be one of {PIXEL_LOSSES}, got {kind!r}")
    if target.shape != recon.shape:
        raise ValueError(f"target and recon shapes differ: {tuple(target.shape)} vs {tuple(recon.shape)}")
    t, r = to_unit(target.float()), to_unit(recon.float())
    if kind == "l2":
        return F.mse_loss(r, t)
    if kind == "l1":
        return F.l1_loss(r, t)
    return 0.5 * (F.mse_loss(r, t) + F.l1_loss(r, t))


def kl_loss(posterior) -> torch.Tensor:
    """Batch mean of ``posterior.kl()`` (a ``DiagonalGaussian``: KL summed per image). Unweighted."""
    kl = posterior.kl()
    return kl.float().mean()

"""Figures: image grids and the corruption panels (the official demo's two sweeps).

Images are tensors in [-1, 1] (or uint8); grids are laid out by torchvision's make_grid and rounded to
8 bits by ``data.to_uint8``. None of these functions holds training or model logic.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from . import corruption as C
from .data import to_uint8

__all__ = ["to_numpy_image", "image_grid", "save_image", "save_grid", "corruption_sweeps", "plot_corruption_sweeps"]


def to_numpy_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) float in [0, 1] (gray replicated), for matplotlib."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def image_grid(images, nrow: int = 8, padding: int = 2, value_range: tuple = (-1.0, 1.0),
               pad_value: int = 255) -> np.ndarray:
    """Images -> one uint8 (H, W, 3) grid: ``min(nrow, N)`` per row, ``padding`` px of ``pad_value``
    (white) around and between them (``torchvision.utils.make_grid``), also around a single image.

    ``images``: (N, C, H, W) or (C, H, W) with C in 1 (gray, replicated), 3 or 4 (alpha dropped), float
    in ``value_range`` (rounded to 8 bits by ``data.to_uint8``) or already uint8; a uint8 numpy (H, W[, C])
    array is taken as a finished grid.
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        arr = images if images.ndim == 3 else images[..., None]
        return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3]
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4) or x.shape[0] == 0:
        raise ValueError(f"images must be (N, C, H, W) or (C, H, W) with N >= 1 and C in 1/3/4, got {tuple(x.shape)}")
    u = x if x.dtype == torch.uint8 else to_uint8(x, value_range)
    u = u[:, :3] if u.shape[1] == 4 else u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u
    if len(u) == 1:  # make_grid returns a single image unpadded
        grid = F.pad(u[0], (padding,) * 4, value=pad_value)
    else:
        grid = make_grid(u, nrow=nrow, padding=padding, pad_value=pad_value)
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_image(pixels: np.ndarray, path) -> Path:
    """Write a uint8 (H, W[, 3]) array as a PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> Path:
    """A PNG grid of (B, C, H, W) images in [-1, 1] (``image_grid``), rounded (not truncated) to 8 bits."""
    return save_image(image_grid(images, nrow=nrow), path)


@torch.no_grad()
def corruption_sweeps(tokenizer, x: torch.Tensor, levels: Sequence[float], ratios: Sequence[float],
                      gamma: float = 3.0, noise_type: str = "interpolative", seed: int = 18):
    """Decode ``x``'s latents corrupted at each noise level (one ε per image, shared by the levels and
    drawn as ``ldetok.corruption.image_noise`` draws it for image ``i`` of ``x``) and at each mask ratio
    (masking in the encoder, mask tokens in the decoder, through the denoising pass). ``gamma`` and
    ``noise_type`` are the tokenizer run's own (``ldetok.eval.tokenizer.run_corruption``).

    Returns ``{"noise": (len(levels), B, C, H, W), "mask": (len(ratios), B, C, H, W)}`` in [-1, 1].
    """
    tokenizer.eval()
    z = tokenizer.encode(x)
    eps = C.image_noise(z.shape[1:], seed, range(x.shape[0])).to(z)
    noise = torch.stack([tokenizer.decode(C.apply_noise(z, t, gamma, noise_type, noise=eps)).clamp(-1, 1)
                         for t in levels])
    masks = []
    for r in ratios:
        if r <= 0 or tokenizer.num_tokens is None:
            masks.append(tokenizer.decode(z).clamp(-1, 1))
        else:
            g = torch.Generator().manual_seed(seed)
            out = C.denoising_forward(tokenizer, x, C.CorruptionConfig.off(), g, draw=C.CorruptionDraw(float(r)),
                                      sample=False)
            masks.append(out.recon.clamp(-1, 1))
    return {"noise": noise, "mask": torch.stack(masks)}


def plot_corruption_sweeps(tokenizers: Dict[str, object], x: torch.Tensor, path,
                           levels: Sequence[float] = tuple(np.round(np.arange(0, 1.0, 0.1), 1)),
                           ratios: Sequence[float] = tuple(np.round(np.arange(0, 1.0, 0.1), 1)),
                           gamma: float = 3.0, noise_type: str = "interpolative", seed: int = 18,
                           title: Optional[str] = None) -> Path:
    """One figure: for each tokenizer, a row block of noise sweep and mask sweep of each image."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    names = list(tokenizers)
    n_img = x.shape[0]
    cols = 1 + len(levels)
    rows = len(names) * n_img * 2
    fig = Figure(figsize=(cols * 0.95, rows * 1.0 + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ti, name in enumerate(names):
        sw = corruption_sweeps(tokenizers[name], x, levels, ratios, gamma, noise_type, seed)
        for i in range(n_img):
            for kind_i, (kind, vals, lab) in enumerate((("noise", levels, "t"), ("mask", ratios, "m"))):
                r = (ti * n_img + i) * 2 + kind_i
                axes[r, 0].imshow(to_numpy_image(x[i]))
                axes[r, 0].set_ylabel(f"{textwrap.fill(name, 16)}\n{kind}", fontsize=6)  # long names wrap in the row
                if r == 0:
                    axes[r, 0].set_title("input", fontsize=7)
                for j, v in enumerate(vals[: cols - 1]):
                    axes[r, j + 1].imshow(to_numpy_image(sw[kind][j, i]))
                    axes[r, j + 1].set_title(f"{lab}={v:g}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"latents corrupted then decoded ({noise_type} noise, gamma={gamma:g}; MAE masking)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

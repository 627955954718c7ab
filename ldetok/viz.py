"""Figures: image grids and the corruption panels (the official demo's two sweeps).

Every function takes tensors in [-1, 1] and writes a PNG; none holds training or model logic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from . import corruption as C
from .eval.recon import image_noise

__all__ = ["to_numpy_image", "save_grid", "corruption_sweeps", "plot_corruption_sweeps"]


def to_numpy_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) float in [0, 1] (gray replicated)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> Path:
    """A PNG grid of (B, C, H, W) images in [-1, 1], rounded (not truncated) to 8 bits."""
    from PIL import Image

    b, c, h, w = images.shape
    ncol = min(nrow, b)
    rows = (b + ncol - 1) // ncol
    canvas = np.ones((rows * (h + 2) + 2, ncol * (w + 2) + 2, 3), dtype=np.float32)
    for i in range(b):
        r, q = divmod(i, ncol)
        canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = to_numpy_image(images[i])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(canvas * 255).astype(np.uint8)).save(path)
    return path


@torch.no_grad()
def corruption_sweeps(tokenizer, x: torch.Tensor, levels: Sequence[float], ratios: Sequence[float],
                      gamma: float = 3.0, noise_type: str = "interpolative", seed: int = 18):
    """Decode ``x``'s latents corrupted at each noise level (one ε per image, shared by the levels and
    drawn as ``ldetok.eval.image_noise`` draws it for image ``i`` of ``x``) and at each mask ratio
    (masking in the encoder, mask tokens in the decoder, through the denoising pass). ``gamma`` and
    ``noise_type`` are the tokenizer run's own (``ldetok.eval.tokenizer.run_corruption``).

    Returns ``{"noise": (len(levels), B, C, H, W), "mask": (len(ratios), B, C, H, W)}`` in [-1, 1].
    """
    tokenizer.eval()
    z = tokenizer.encode(x)
    eps = image_noise(z.shape[1:], seed, range(x.shape[0])).to(z)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tokenizers)
    n_img = x.shape[0]
    cols = 1 + len(levels)
    rows = len(names) * n_img * 2
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.95, rows * 1.0 + 0.6), squeeze=False)
    for ti, name in enumerate(names):
        sw = corruption_sweeps(tokenizers[name], x, levels, ratios, gamma, noise_type, seed)
        for i in range(n_img):
            for kind_i, (kind, vals, lab) in enumerate((("noise", levels, "t"), ("mask", ratios, "m"))):
                r = (ti * n_img + i) * 2 + kind_i
                axes[r, 0].imshow(to_numpy_image(x[i]))
                axes[r, 0].set_ylabel(f"{name}\n{kind}", fontsize=6)
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
    plt.close(fig)
    return path

"""The one interface every generator implements, and the small blocks they share.

A generator models *normalised* tokenizer latents ``(B, C, h, w)`` (``tokenizer.tokenize`` /
a latent cache), class-conditionally or not:

- ``loss(latents, labels) -> scalar``: the training objective; labels (B,) long in [0, num_classes),
  or None for unconditional use. Labels are dropped to the null class with probability
  ``class_dropout`` (0.1) in training mode, which is what classifier-free guidance needs.
- ``sample(n, labels=None, guidance_scale=1.0, steps=None, temperature=1.0, generator=None) -> latents``:
  the classifier-free guidance scale follows each family's schedule (linear ramp for MAR and the AR
  models, constant on all channels for DiT/SiT, an interval for LightningDiT);
  ``guidance_scale == 1`` is exactly the conditional model.
- ``config_dict()`` and ``kind`` rebuild the model (``build_generator(kind, **config)``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Generator", "TimestepEmbedder", "LabelEmbedder", "modulate", "patchify", "sincos_pos_embed_2d",
           "randn", "unpatchify", "xavier_linears"]


class Generator(nn.Module):
    kind: str = "generator"

    def __init__(self, latent_shape: Tuple[int, int, int], num_classes: int = 10, class_dropout: float = 0.1):
        super().__init__()
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.num_classes = int(num_classes)
        self.class_dropout = float(class_dropout)

    @property
    def null_class(self) -> int:
        """The index of the 'no class' embedding (unconditional and the CFG branch)."""
        return self.num_classes

    def prepare_labels(self, labels: Optional[torch.Tensor], batch: int, device, generator=None) -> torch.Tensor:
        """Labels for training: None -> all null; otherwise dropped to null with prob class_dropout."""
        if labels is None or self.num_classes == 0:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        if self.training and self.class_dropout > 0:
            dev = generator.device if generator is not None else device
            drop = torch.rand(batch, generator=generator, device=dev).to(device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return labels

    def sample_labels(self, n: int, labels, device) -> torch.Tensor:
        if labels is None:
            if self.num_classes == 0:
                return torch.full((n,), self.null_class, dtype=torch.long, device=device)
            return torch.arange(n, device=device) % self.num_classes  # class-balanced
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        return labels

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(latents.shape)}")

    def loss(self, latents: torch.Tensor, labels: Optional[torch.Tensor] = None, generator=None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, labels=None, guidance_scale: float = 1.0, steps: Optional[int] = None, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def config_dict(self) -> dict:
        raise NotImplementedError

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# ---------------------------------------------------------------------------------------------
# Shared blocks
# ---------------------------------------------------------------------------------------------
def xavier_linears(module: nn.Module) -> None:
    """DiT/MAR's base init: Xavier-uniform weights and zero biases for every Linear in ``module``."""

    def init(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    module.apply(init)


def randn(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device`` (a CPU generator
    drives CUDA tensors too: device-agnostic seeding)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def patchify(x: torch.Tensor, p: int, channel_major: bool = False) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/p * w/p, p*p*C), tokens in raster order. Within a token the values are
    ordered (row-in-patch, col-in-patch, channel) (DiT's final-layer layout), or with ``channel_major``
    (channel, row-in-patch, col-in-patch) (MAR's layout; the official weights expect each its own)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5) if channel_major else x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int, channel_major: bool = False) -> torch.Tensor:
    """Inverse of ``patchify`` (same ``channel_major``): (B, h/p * w/p, p*p*C) -> (B, C, h, w)."""
    b = tokens.shape[0]
    if channel_major:
        x = tokens.reshape(b, h // p, w // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    else:
        x = tokens.reshape(b, h // p, w // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h, w)


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation; shift/scale (B, D) broadcast over the token dim of x (B, L, D) or x (B, D)."""
    if x.ndim == 3:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar time (DDPM step in [0, 1000) or flow t in [0, 1]) -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row for the null class (index num_classes)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (grid_h * grid_w, dim), half the channels per axis (MAE/DiT)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([one_axis(dim // 2, xs.flatten()), one_axis(dim // 2, ys.flatten())], dim=1)
    return emb.float()

"""The l-DeTok tokenizer: a ViT encoder and ViT decoder trained on corrupted latents.

Architecture as released (official ``models/detok.py``), so the released weights load with strict keys:
- encoder: conv patch embed -> + learned abs. position embedding -> MAE random masking (masked tokens
  never enter the encoder) -> RMSNorm -> pre-norm blocks (RMSNorm, attention with 2D RoPE on q and k,
  SwiGLU) -> RMSNorm -> linear head to 2C (posterior mean and log-variance);
- decoder: linear C -> width, learned mask token scattered back into masked positions, + learned abs.
  position embedding -> RMSNorm -> blocks with RoPE -> RMSNorm -> 1x1 conv to p*p*3 per token,
  rearranged to the image -> 3x3 conv. No tanh: outputs live in [-1, 1] image space.
- corruption (training only) is not held here: ``ldetok.corruption.denoising_forward`` draws it and
  calls ``posterior_visible`` / ``decode_visible`` with the kept-token indices.

The 2D RoPE reproduces the released layout, which is not textbook RoPE: head_dim/4 log-spaced
frequencies from 7 to 7e-4 (times 2π) over coordinates normalised to [0, 1], laid out as two copies
[f, f] per axis (rows in the first half of the head, columns in the second), while the rotation pairs
*adjacent* elements (2i, 2i+1). The two members of a pair therefore turn by different angles, so it is
not a norm-preserving rotation; the released weights were trained with it, so we keep it exactly.

Reference: Yang et al., "Latent Denoising Makes Good Tokenizers" (ICLR 2026); MAE (He et al. 2022).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..layers import Block, RMSNorm, run_blocks
from .base import DiagonalGaussian, Tokenizer

__all__ = ["DeTokConfig", "DeTok", "SIZES", "detok_rope_table"]

# width, depth, heads. The first five are the official SIZE_DICT; "tiny" and "micro" train on a CPU.
SIZES = {
    "micro": (128, 2, 2),
    "tiny": (192, 4, 3),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xl": (1152, 28, 16),
    "huge": (1280, 32, 16),
}


@dataclass
class DeTokConfig:
    image_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    latent_channels: int = 16
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0

    def validate(self) -> "DeTokConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for w, h in ((self.enc_width, self.enc_heads), (self.dec_width, self.dec_heads)):
            if w % h or (w // h) % 4:
                raise ValueError(f"width {w} / heads {h} must give a head dim divisible by 4 (2D RoPE)")
        return self


def detok_rope_table(head_dim: int, grid_h: int, grid_w: int, max_freq: float = 7.0, min_freq: float = 7e-4):
    """(cos, sin), each (grid_h * grid_w, head_dim), in the released l-DeTok layout (module docstring)."""
    n = head_dim // 4
    freqs = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, n)
    freqs = torch.cat([freqs, freqs]) * 2 * torch.pi  # (head_dim / 2,)
    rows = torch.linspace(0, 1, grid_h).repeat_interleave(grid_w)  # row-major token order
    cols = torch.linspace(0, 1, grid_w).repeat(grid_h)
    angle = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    return angle.cos(), angle.sin()


class _TokensToGrid(nn.Module):
    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def forward(self, x):  # (B, L, W) -> (B, W, g, g)
        b, _, w = x.shape
        return x.transpose(1, 2).reshape(b, w, self.grid, self.grid)


class _PatchesToImage(nn.Module):
    """(B, p*p*c, g, g) with channel index (p1*p + p2)*c + ch  ->  (B, c, g*p, g*p)."""

    def __init__(self, patch: int, channels: int):
        super().__init__()
        self.p, self.c = patch, channels

    def forward(self, x):
        b, _, h, w = x.shape
        x = x.view(b, self.p, self.p, self.c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, self.c, h * self.p, w * self.p)


class _ViT(nn.Module):
    """Shared trunk: learned position embedding, RMSNorm in/out, blocks, one RoPE table."""

    def __init__(self, seq_len: int, grid: int, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(1, seq_len, width))
        self.ln_pre = RMSNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.ln_post = RMSNorm(width)
        cos, sin = detok_rope_table(width // heads, grid, grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False  # recompute each block in backward (``run.grad_checkpointing``)

    def rope(self, ids: Optional[torch.Tensor]):
        """RoPE rows for all tokens, or gathered at ``ids`` (B, K) for the visible ones; shaped (B|1, 1, K, D)."""
        if ids is None:
            return self.rope_cos[None, None], self.rope_sin[None, None]
        return self.rope_cos[ids].unsqueeze(1), self.rope_sin[ids].unsqueeze(1)

    def run(self, x, rope, attn_mask=None):
        x = run_blocks(self.transformer, self.ln_pre(x), self.grad_checkpointing, rope=rope, attn_mask=attn_mask)
        return self.ln_post(x)


class Encoder(_ViT):
    def __init__(self, cfg: DeTokConfig):
        grid = cfg.image_size // cfg.patch_size
        super().__init__(grid * grid, grid, cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio)
        self.patch_embed = nn.Sequential(nn.Conv2d(cfg.in_channels, cfg.enc_width, cfg.patch_size, cfg.patch_size))
        self.latent_head = nn.Linear(cfg.enc_width, 2 * cfg.latent_channels)

    def embed(self, x):
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.positional_embedding

    def forward(self, x, ids_keep=None, valid=None):
        """Moments (B, K, 2C) of the tokens at ``ids_keep`` (all tokens when None).

        ``valid`` (B, K) bool hides padding tokens from attention (per-sample mask ratios).
        """
        tokens = self.embed(x)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        attn_mask = None if valid is None else valid[:, None, None, :]
        return self.latent_head(self.run(tokens, self.rope(ids_keep), attn_mask))


class Decoder(_ViT):
    def __init__(self, cfg: DeTokConfig):
        grid = cfg.image_size // cfg.patch_size
        super().__init__(grid * grid, grid, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio)
        w = cfg.dec_width
        self.mask_token = nn.Parameter(w**-0.5 * torch.randn(1, 1, w))
        self.decoder_embed = nn.Linear(cfg.latent_channels, w)
        out_c = cfg.in_channels
        self.ffn = nn.Sequential(
            _TokensToGrid(grid),
            nn.Conv2d(w, cfg.patch_size * cfg.patch_size * out_c, 1),
            _PatchesToImage(cfg.patch_size, out_c),
        )
        self.conv_out = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.seq_len = grid * grid

    def forward(self, z, ids_keep=None, valid=None):
        """z (B, K, C) latents of the tokens at ``ids_keep`` (all when None) -> image.

        Positions not kept (and kept-but-invalid ones, per-sample masking) get the mask token.
        """
        h = self.decoder_embed(z)
        b, k, w = h.shape
        if valid is not None:
            h = torch.where(valid.unsqueeze(-1), h, self.mask_token.to(h.dtype))
        if ids_keep is not None and k < self.seq_len:
            full = self.mask_token.to(h.dtype).expand(b, self.seq_len, w).clone()
            h = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, w), h)
        elif ids_keep is not None:  # a full permutation: put tokens back in order
            h = torch.empty_like(h).scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, w), h)
        h = self.run(h + self.positional_embedding, self.rope(None))
        return self.conv_out(self.ffn(h))


class DeTok(Tokenizer):
    """l-DeTok's ViT tokenizer (see module docstring); trained without corruption it is a plain ViT AE."""

    kind = "detok"

    def __init__(self, cfg: Optional[DeTokConfig] = None, **overrides):
        super().__init__()
        cfg = DeTokConfig(**{**asdict(cfg or DeTokConfig()), **overrides}).validate()
        self.cfg = cfg
        self.latent_channels = cfg.latent_channels
        self.stride = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.num_tokens = self.grid * self.grid
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.apply(self._init_weights)
        self._init_stats(cfg.latent_channels)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # truncated normal (std 0.02) for linear/conv weights, zero bias (official); the position
        # embeddings and mask token keep their randn * width^-0.5 init.
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    # ---- layout helpers ---------------------------------------------------------------------
    def to_nchw(self, t: torch.Tensor) -> torch.Tensor:
        b, _, c = t.shape
        return t.transpose(1, 2).reshape(b, c, self.grid, self.grid)

    def to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels or z.shape[2:] != (self.grid, self.grid):
            raise ValueError(
                f"expected latents of shape (B, {self.latent_channels}, {self.grid}, {self.grid}), got {tuple(z.shape)}"
            )
        return z.flatten(2).transpose(1, 2)

    # ---- Tokenizer interface ----------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Uncorrupted posterior moments, NCHW (B, 2C, g, g)."""
        return self.to_nchw(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.to_tokens(z))

    # ---- the denoising pass's view: tokens (B, K, C), K = the kept tokens ------------------------
    def posterior_visible(self, x: torch.Tensor, keep=None) -> DiagonalGaussian:
        """Posterior over the tokens at ``keep.ids_keep`` (all tokens when None), (B, K, C) along dim -1."""
        ids, valid = (None, None) if keep is None else (keep.ids_keep, keep.valid)
        return DiagonalGaussian(self.encoder(x, ids, valid), dim=-1)

    def decode_visible(self, z: torch.Tensor, keep=None) -> torch.Tensor:
        """Visible latent tokens (B, K, C) -> image; masked positions get the mask token."""
        return self.decoder(z, None, None) if keep is None else self.decoder(z, keep.ids_keep, keep.valid)

    def visible_to_nchw(self, z: torch.Tensor, keep=None) -> torch.Tensor:
        """Visible tokens scattered into the latent grid (zeros where masked), NCHW."""
        if keep is not None:
            full = torch.zeros(z.shape[0], self.num_tokens, z.shape[-1], device=z.device, dtype=z.dtype)
            z = full.scatter(1, keep.ids_keep.unsqueeze(-1).expand(-1, -1, z.shape[-1]), z)
        return self.to_nchw(z)

    def nchw_to_visible(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_tokens(z)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"image {c.image_size}, patch {c.patch_size}, latent {c.latent_channels}ch"


def size_config(enc: str, dec: str) -> dict:
    (ew, ed, eh), (dw, dd, dh) = SIZES[enc], SIZES[dec]
    return dict(enc_width=ew, enc_depth=ed, enc_heads=eh, dec_width=dw, dec_depth=dd, dec_heads=dh)


def split_size_name(code: str) -> Tuple[str, str]:
    """'SB' -> ('small', 'base'); 'XLXL' -> ('xl', 'xl'); 'MT' -> ('micro', 'tiny')."""
    letters = {"M": "micro", "T": "tiny", "S": "small", "B": "base", "L": "large", "XL": "xl", "H": "huge"}
    for i in range(1, len(code)):
        a, b = code[:i], code[i:]
        if a in letters and b in letters:
            return letters[a], letters[b]
    raise KeyError(code)

"""ARDiff: a decoder-only causal transformer with a per-token diffusion loss (RandomAR / RasterAR).

Tokens are generated one at a time in raster order or in a random permutation per sample. Each input
token carries the positional embedding of its own position plus a *target* positional embedding of
the token to be predicted next (RandAR-style), so a random order is still well defined. Blocks are
AdaLN-modulated per token by (class embedding + a learned per-step embedding); a final AdaLN layer
gives the condition ``z`` for the same DiffLoss head MAR uses, applied to every token.

Sampling takes L sequential steps. With ``use_kv_cache=True`` (default) each step feeds only the
newest token and reuses cached keys/values; the samples equal the uncached path under the same
generator (the official code has a cache but samples without it).

Parameter names follow l-DeTok's ``models/ardiff.py`` (``class_emb``, ``fake_latent``, ``bos_token``,
``x_embedder``, ``pos_embed``, ``target_pos_embed``, ``timesteps_embeddings``, ``ln_pre``,
``transformer.blocks.N...``, ``final_layer``, ``diffloss.net...``).

References: Yang et al., l-DeTok (ICLR 2026), github.com/Jiawei-Yang/DeTok; Pang et al., "RandAR"
(CVPR 2025); Li et al., MAR (NeurIPS 2024) for the diffusion loss.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .base import Generator, modulate, patchify, unpatchify
from .diffloss import DiffLoss
from .mar import Attention, Mlp, random_orders

__all__ = ["ARDiff", "ARDiff_models", "KVCache", "AdaLNBlock", "SIZE_DICT"]

SIZE_DICT = {
    "tiny": dict(width=128, depth=2, num_heads=4),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
    "xl": dict(width=1152, depth=28, num_heads=16),
    "huge": dict(width=1280, depth=32, num_heads=16),
}


# ---------------------------------------------------------------------------------------------
# KV cache: preallocated per layer, so a step costs O(prefix) reads and no O(prefix) copies
# ---------------------------------------------------------------------------------------------
class _LayerCache:
    def __init__(self, max_len: int):
        self.max_len, self.len, self.k, self.v = max_len, 0, None, None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        b, h, n, d = k.shape
        if self.k is None:
            self.k = k.new_empty(b, h, self.max_len, d)
            self.v = v.new_empty(b, h, self.max_len, d)
        if self.len + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.len} + {n} > {self.max_len}")
        self.k[:, :, self.len:self.len + n] = k
        self.v[:, :, self.len:self.len + n] = v
        self.len += n
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


class KVCache:
    """One ``_LayerCache`` per transformer block."""

    def __init__(self, depth: int, max_len: int):
        self.layers: List[_LayerCache] = [_LayerCache(max_len) for _ in range(depth)]

    @property
    def length(self) -> int:
        return self.layers[0].len


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
class AdaLNBlock(nn.Module):
    """Causal pre-norm block with per-token AdaLN shift/scale/gate for attention and MLP (6 chunks)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cache: Optional[_LayerCache] = None) -> torch.Tensor:
        # cond (B, N, D): one condition per token, so modulate element-wise (no broadcasting over N)
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(cond).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, causal=True, cache=cache)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class FinalLayer(nn.Module):
    """LayerNorm without affine, modulated by the class condition; no projection (z goes to DiffLoss)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)  # cond (B, D)
        return modulate(self.norm(x), shift, scale)


class _Transformer(nn.Module):
    def __init__(self, width: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([AdaLNBlock(width, num_heads, mlp_ratio) for _ in range(depth)])


# ---------------------------------------------------------------------------------------------
# ARDiff
# ---------------------------------------------------------------------------------------------
class ARDiff(Generator):
    """Causal AR transformer + DiffLoss over latent tokens; ``order`` "raster" or "random".

    Input sequence for one sample with order o (a permutation of the L positions):
    ``[BOS, x_{o0}, ..., x_{o(L-2)}]``; input j gets ``pos_embed[0]`` (BOS) or ``pos_embed[1 + o_{j-1}]``,
    plus ``target_pos_embed[o_j]``; output j conditions DiffLoss for token ``x_{oj}``.
    """

    kind = "ardiff"

    def __init__(
        self,
        latent_shape: Sequence[int] = (16, 16, 16),
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        patch_size: int = 1,
        order: str = "raster",
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = "100",
        noise_schedule: str = "cosine",
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
        use_kv_cache: bool = True,
    ):
        super().__init__(latent_shape, num_classes, class_dropout)
        if order not in ("raster", "random"):
            raise ValueError(f"order must be 'raster' or 'random', got {order!r}")
        c, h, w = self.latent_shape
        p = int(patch_size)
        if p < 1 or h % p or w % p:
            raise ValueError(f"patch_size {patch_size} must divide the latent grid {h}x{w}")
        self._cfg = dict(
            latent_shape=list(self.latent_shape), num_classes=self.num_classes, class_dropout=self.class_dropout,
            patch_size=p, order=order, width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            diffloss_d=diffloss_d, diffloss_w=diffloss_w, num_sampling_steps=str(num_sampling_steps),
            noise_schedule=noise_schedule, diffusion_batch_mul=diffusion_batch_mul,
            grad_checkpointing=grad_checkpointing, use_kv_cache=use_kv_cache,
        )
        self.order = order
        self.patch_size, self.seq_h, self.seq_w = p, h // p, w // p
        self.seq_len = self.seq_h * self.seq_w  # L tokens; the transformer sees BOS + L - 1 in training
        self.token_embed_dim = c * p * p
        self.grad_checkpointing = bool(grad_checkpointing)
        self.use_kv_cache = bool(use_kv_cache)
        L = self.seq_len

        self.class_emb = nn.Embedding(max(self.num_classes, 1), width)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        self.bos_token = nn.Parameter(torch.zeros(1, 1, width))
        self.x_embedder = nn.Linear(self.token_embed_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, width))  # [BOS, positions 0..L-1]
        self.target_pos_embed = nn.Parameter(torch.zeros(1, L, width))  # position of the next token
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, L + 1, width))  # per-step condition
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = _Transformer(width, depth, num_heads, mlp_ratio)
        self.final_layer = FinalLayer(width)
        self._init_weights()
        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim, z_channels=width, depth=diffloss_d, width=diffloss_w,
            num_sampling_steps=str(num_sampling_steps), schedule=noise_schedule,
            batch_mul=diffusion_batch_mul, grad_checkpointing=grad_checkpointing,
        )

    def _init_weights(self):
        for prm in (self.pos_embed, self.bos_token, self.target_pos_embed, self.timesteps_embeddings,
                    self.class_emb.weight, self.fake_latent):
            nn.init.normal_(prm, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.transformer.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)

    def config_dict(self) -> dict:
        return dict(self._cfg)

    # -- pieces ---------------------------------------------------------------------------------
    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        null = labels == self.null_class
        emb = self.class_emb(labels.clamp(0, self.class_emb.num_embeddings - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype).expand_as(emb), emb)

    def make_orders(self, bsz: int, generator=None, device=None) -> torch.Tensor:
        device = self.device if device is None else device
        if self.order == "raster":
            return torch.arange(self.seq_len, device=device).expand(bsz, -1)
        return random_orders(bsz, self.seq_len, generator, device)

    def embed_inputs(self, xs: torch.Tensor, orders: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Input embeddings for sequence positions [start, stop) (0 = BOS).

        xs (B, >= stop-1, Ct): tokens already in generation order; orders (B, L).
        """
        b, d = orders.shape[0], self.pos_embed.shape[-1]
        parts = []
        if start == 0:
            parts.append(self.bos_token.expand(b, 1, d) + self.pos_embed[:, :1])
        lo = max(start, 1)
        if stop > lo:  # tokens x_{o(j-1)} for j in [lo, stop)
            pos = self.pos_embed[0, 1:][orders[:, lo - 1:stop - 1]]  # (B, n, D)
            parts.append(self.x_embedder(xs[:, lo - 1:stop - 1]) + pos)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        x = x + self.target_pos_embed[0][orders[:, start:stop]]
        return self.ln_pre(x)

    def run_transformer(self, x, cls, start: int, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x (B, n, D) inputs at positions [start, start+n); cls (B, D) -> conditions z (B, n, D)."""
        n = x.shape[1]
        cond = cls[:, None, :] + self.timesteps_embeddings[:, start:start + n]
        for i, blk in enumerate(self.transformer.blocks):
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(blk, x, cond, use_reentrant=False)
            else:
                x = blk(x, cond, None if cache is None else cache.layers[i])
        return self.final_layer(x, cls)

    # -- training -------------------------------------------------------------------------------
    def loss(self, latents: torch.Tensor, labels: Optional[torch.Tensor] = None, generator=None) -> torch.Tensor:
        self._check_latents(latents)
        b, dev = latents.shape[0], latents.device
        labels = self.prepare_labels(labels, b, dev, generator)
        tokens = patchify(latents, self.patch_size, channel_major=True)
        orders = self.make_orders(b, generator, dev)
        xs = torch.gather(tokens, 1, orders[..., None].expand(-1, -1, tokens.shape[-1]))  # generation order
        cls = self.class_embedding(labels)
        z = self.run_transformer(self.embed_inputs(xs, orders, 0, self.seq_len), cls, 0)
        return self.diffloss(xs.reshape(-1, xs.shape[-1]), z.reshape(-1, z.shape[-1]), None, generator=generator)

    def forward(self, latents, labels=None, generator=None):
        return self.loss(latents, labels, generator)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels=None, guidance_scale: float = 1.0, steps: Optional[int] = None,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None, cfg_schedule: str = "linear",
               use_kv_cache: Optional[bool] = None) -> torch.Tensor:
        """n latents (n, C, h, w), one token per step (L steps; ``steps`` must be None or L).

        CFG doubles the batch with the null class (same order for both halves); the linear
        schedule uses ``1 + (guidance_scale - 1) * step / L`` at step ``step`` (0-based), as the official code.
        """
        L = self.seq_len
        if steps is not None and int(steps) != L:
            raise ValueError(f"ARDiff samples one token per step: steps must be None or {L}, got {steps} "
                             f"(the diffusion head's steps are set by num_sampling_steps)")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        use_cache = self.use_kv_cache if use_kv_cache is None else bool(use_kv_cache)
        dev = self.device
        labels = self.sample_labels(n, labels, dev)
        guided = guidance_scale != 1.0
        cls = self.class_embedding(labels)
        orders = self.make_orders(n, generator, dev)
        if guided:
            cls = torch.cat([cls, self.class_embedding(torch.full_like(labels, self.null_class))])
            orders = torch.cat([orders, orders])
        xs = torch.zeros(cls.shape[0], L, self.token_embed_dim, device=dev, dtype=cls.dtype)
        cache = KVCache(len(self.transformer.blocks), L) if use_cache else None
        for step in range(L):
            if use_cache:  # feed only input position `step`
                z = self.run_transformer(self.embed_inputs(xs, orders, step, step + 1), cls, step, cache)[:, -1]
            else:  # recompute the whole prefix [0, step]
                z = self.run_transformer(self.embed_inputs(xs, orders, 0, step + 1), cls, 0)[:, -1]
            scale = 1.0 + (guidance_scale - 1.0) * step / L if cfg_schedule == "linear" else float(guidance_scale)
            new = self.diffloss.sample(z, temperature=temperature, guidance_scale=scale if guided else 1.0,
                                       generator=generator)
            xs[:, step] = new.to(xs.dtype)  # with CFG both halves receive the (equal) guided sample
        xs, orders = xs[:n], orders[:n]
        tokens = torch.empty_like(xs).scatter_(1, orders[..., None].expand_as(xs), xs)  # back to raster
        c, h, w = self.latent_shape
        return unpatchify(tokens, self.patch_size, c, h, w, channel_major=True)


# ---------------------------------------------------------------------------------------------
# Size registry: randomar_* / rasterar_* (l-DeTok's ARDiff SIZE_DICT) plus a CPU tiny size
# ---------------------------------------------------------------------------------------------
_OFFICIAL = dict(latent_shape=(16, 16, 16), num_classes=1000, patch_size=1, diffloss_d=3, diffloss_w=1024)
# CPU size; its DiffLoss uses the linear noise schedule (see mar.MAR_SIZES for why not cosine)
_TINY = dict(latent_shape=(16, 4, 4), num_classes=10, diffloss_d=2, diffloss_w=128, num_sampling_steps="20",
             noise_schedule="linear")


def _builder(size: str, order: str):
    def build(**overrides) -> ARDiff:
        kw = dict(_TINY if size == "tiny" else _OFFICIAL, **SIZE_DICT[size], order=order)
        kw.update(overrides)
        return ARDiff(**kw)

    build.__name__ = f"{order}ar_{size}"
    build.__doc__ = f"ARDiff-{size} ({SIZE_DICT[size]}), {order} order."
    return build


ARDiff_models = {f"{order}ar_{size}": _builder(size, order) for order in ("random", "raster") for size in SIZE_DICT}
globals().update(ARDiff_models)
__all__ += list(ARDiff_models)

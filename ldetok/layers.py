"""Shared transformer blocks: RMSNorm, SwiGLU, attention with an optional rotary table, pre-norm block.

Parameter names follow the official l-DeTok layout (``qkv``, ``proj``, ``w12``, ``w3``, ``norm1``,
``norm2``) so released checkpoints load with strict key matching.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["RMSNorm", "SwiGLU", "Attention", "Block", "rotate_pairs", "apply_rope", "run_blocks"]


def RMSNorm(dim: int, eps: float = 1e-6) -> nn.RMSNorm:
    """torch's RMSNorm (fused on recent versions); eps 1e-6 as in l-DeTok and LightningDiT."""
    return nn.RMSNorm(dim, eps=eps)


class SwiGLU(nn.Module):
    """SwiGLU MLP with one fused input projection ``w12`` (gate and value) and output ``w3``."""

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotation partner of adjacent pairs."""
    x2 = x.unflatten(-1, (-1, 2))
    return torch.stack((-x2[..., 1], x2[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_pairs(x) * sin``; x (..., L, D), cos/sin (small tables) broadcastable to it.

    Computed as ``x * cos + swap_pairs(x) * (sin * [-1, +1, ...])``: the sign goes on the small table,
    so the big tensor sees one copy (the pair swap) instead of a negation and a stack.
    """
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device).repeat(sin.shape[-1] // 2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * (sin * sign)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, SDPA, and optional rotary tables."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:  # q and k rotated in one pass: (2, B, H, N, D)
            cos, sin = rope
            q, k = apply_rope(qkv[:2], cos, sin).unbind(0)
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm -> attention, RMSNorm -> SwiGLU (hidden int(2/3 * 4 * d))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 / 3 * dim * mlp_ratio))

    def forward(self, x, rope=None, attn_mask=None):
        x = x + self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x: torch.Tensor, grad_checkpointing: bool = False, **kwargs) -> torch.Tensor:
    """``x`` through ``blocks`` in order (each called as ``blk(x, **kwargs)``). With ``grad_checkpointing``
    (and autograd recording) each block's activations are recomputed in backward instead of stored: the
    same gradients for ~1/3 more compute. The blocks draw no randomness, so no RNG state is stashed."""
    recompute = grad_checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False, preserve_rng_state=False, **kwargs) if recompute else blk(x, **kwargs)
    return x

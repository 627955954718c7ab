"""DiT: a diffusion transformer with adaLN-Zero blocks over patchified latents, plus the backbone SiT
and LightningDiT share.

References: Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023,
facebookresearch/DiT); the l-DeTok re-implementation (Jiawei-Yang/DeTok ``models/dit.py``);
l-DeTok paper section 4 (DiT column of the
tokenizer comparison: learn-sigma, linear beta schedule, 250 ancestral steps).

- Backbone (``AdaLNZeroTransformer``): latents (B, C, h, w) -> p x p patches -> tokens + 2D sin-cos
  positions -> blocks conditioned on c = t_emb + y_emb through 6-way adaLN-Zero modulation ->
  final adaLN layer -> p*p*out_channels per token -> unpatchify.
  One block class serves all three families: LayerNorm/GELU (DiT, SiT) or RMSNorm/SwiGLU/RoPE
  (LightningDiT). Parameter names follow DiT (``x_embedder.proj``, ``t_embedder.mlp``,
  ``y_embedder.embedding_table``, ``blocks.N.attn.qkv``, ``blocks.N.adaLN_modulation.1``,
  ``final_layer.linear``, ``pos_embed``).
- ``DiT``: epsilon prediction with learned sigma (2C output channels), 1000-step DDPM with the linear
  beta schedule, IDDPM hybrid loss (MSE + VLB), t uniform over [0, 1000). Sampling is ancestral,
  respaced to ``steps`` (100 by default: the official code's ``--num_sampling_steps`` default; the
  paper's text says 250, pass ``steps=250`` for that).
- CFG (all three families): when ``guidance_scale > 1`` the conditional and null-class branches run
  as one doubled batch and combine as ``uncond + guidance_scale * (cond - uncond)`` on every latent
  channel (the l-DeTok default) or only on the first 3 channels (``cfg_channels="first3"``, DiT's legacy
  mode). ``guidance_scale == 1`` is the plain conditional model (no doubled batch); below 1 is refused.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..layers import Attention, RMSNorm, SwiGLU, apply_rope
from .base import (Generator, LabelEmbedder, TimestepEmbedder, modulate, patchify, randn, sincos_pos_embed_2d,
                   unpatchify, xavier_linears)
from .diffusion import create_diffusion

__all__ = [
    "AdaLNZeroTransformer",
    "AdaLNBlock",
    "FinalLayer",
    "DiT",
    "DiT_models",
    "size_models",
    "SIZES",
    "cfg_combine",
]

# width, depth, heads. base/large/xl/huge are the official SIZE_DICT; tiny trains on a CPU.
SIZES: Dict[str, Tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xl": (1152, 28, 16),
    "huge": (1280, 32, 16),
}
# CPU sizes default to the latents of the CPU tokenizers (32 px, patch 8 -> 4x4 grid of 16 channels)
# and 10 classes; official sizes to ImageNet-256 l-DeTok latents (16x16x16) and 1000 classes.
CPU_DEFAULTS = {"latent_shape": (16, 4, 4), "num_classes": 10}
OFFICIAL_DEFAULTS = {"latent_shape": (16, 16, 16), "num_classes": 1000}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` on the first ``channels`` channels; the rest (learned sigma,
    or the unguided channels of DiT's legacy mode) are taken from the conditional branch."""
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def check_guidance_scale(guidance_scale: float) -> float:
    guidance_scale = float(guidance_scale)
    if not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = conditional model, > 1 = classifier-free guidance), "
                         f"got {guidance_scale}")
    return guidance_scale


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as DiT (timm's Mlp with approximate GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class QKNormAttention(Attention):
    """``layers.Attention`` with a per-head norm on q and k (before RoPE, as LightningDiT)."""

    def __init__(self, dim: int, num_heads: int, norm: Callable[[int], nn.Module], qkv_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.q_norm = norm(self.head_dim)
        self.k_norm = norm(self.head_dim)

    def forward(self, x, rope=None, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _norm_factory(norm: str, affine: bool) -> Callable[[int], nn.Module]:
    if norm == "layernorm":
        return lambda d: nn.LayerNorm(d, elementwise_affine=affine, eps=1e-6)
    if norm == "rmsnorm":
        return lambda d: RMSNorm(d)  # learnable scale, as LightningDiT
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")


class AdaLNBlock(nn.Module):
    """adaLN-Zero block: x + g1 * attn(mod(norm(x))), then x + g2 * mlp(mod(norm(x))).

    The six shift/scale/gate vectors come from SiLU(c) -> Linear, zero-initialised, so at init the
    gates are 0 and the block is the identity (the "Zero" in adaLN-Zero).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm: str = "layernorm",
                 mlp: str = "gelu", qk_norm: bool = False):
        super().__init__()
        make_norm = _norm_factory(norm, affine=False)
        self.norm1 = make_norm(dim)
        if qk_norm:  # SiT/timm use an affine LayerNorm per head, LightningDiT an RMSNorm
            self.attn = QKNormAttention(dim, num_heads, _norm_factory(norm, affine=True), qkv_bias=True)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = make_norm(dim)
        if mlp == "gelu":
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        elif mlp == "swiglu":  # 2/3 of the GELU hidden width keeps the parameter count (LightningDiT)
            self.mlp = SwiGLU(dim, int(2 / 3 * dim * mlp_ratio))
        else:
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """norm -> adaLN (shift, scale) -> Linear to p*p*out; linear and modulation zero-initialised."""

    def __init__(self, dim: int, out_dim: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = _norm_factory(norm, affine=False)(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """A p x p stride-p convolution (timm's PatchEmbed, key ``x_embedder.proj``)."""

    def __init__(self, in_ch: int, dim: int, p: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Backbone shared by DiT, SiT and LightningDiT
# ---------------------------------------------------------------------------------------------
class AdaLNZeroTransformer(Generator):
    """The DiT trunk as a ``Generator`` base: subclasses choose the output width, the block flavour and
    the objective. ``predict(x, t, y)`` is the network; ``forward`` is the training loss."""

    out_mult: int = 1  # output channels = out_mult * C (2 for learned sigma)
    block_norm: str = "layernorm"
    block_mlp: str = "gelu"
    learnable_pos: bool = False

    def __init__(self, latent_shape=(16, 16, 16), num_classes: int = 1000, class_dropout: float = 0.1,
                 patch_size: int = 1, hidden_size: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, grad_checkpointing: bool = False):
        super().__init__(latent_shape, num_classes, class_dropout)
        c, h, w = self.latent_shape
        p = int(patch_size)
        if p < 1 or h % p or w % p:
            raise ValueError(f"patch_size must be a positive divisor of the latent size {h}x{w}, got {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.patch_size, self.hidden_size, self.depth, self.num_heads = p, int(hidden_size), int(depth), int(num_heads)
        self.mlp_ratio, self.qk_norm, self.grad_checkpointing = float(mlp_ratio), bool(qk_norm), bool(grad_checkpointing)
        self.in_channels, self.out_channels = c, self.out_mult * c
        self.grid = (h // p, w // p)

        d = self.hidden_size
        self.x_embedder = PatchEmbed(c, d, p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(self.num_classes, d)
        # DiT keeps the fixed table as a frozen parameter (so it is in the state dict and the count).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], d), requires_grad=self.learnable_pos)
        self.blocks = nn.ModuleList(
            AdaLNBlock(d, num_heads, mlp_ratio, norm=self.block_norm, mlp=self.block_mlp, qk_norm=qk_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(d, p * p * self.out_channels, norm=self.block_norm)
        self.initialize_weights()

    # -- init (DiT's recipe) --------------------------------------------------------------------
    def initialize_weights(self):
        xavier_linears(self)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, *self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [blk.adaLN_modulation[-1] for blk in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                      self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- network ----------------------------------------------------------------------------------
    def rope(self):
        """Rotary tables (cos, sin) for the attention, or None (DiT/SiT use absolute positions only)."""
        return None

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Tokens (B, L, D) and the conditioning vector c (B, D)."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        tokens = self.x_embedder(x) + self.pos_embed
        return tokens, self.t_embedder(t) + self.y_embedder(y)

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        rope = self.rope()
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, c, rope, use_reentrant=False)
            else:
                tokens = blk(tokens, c, rope)
        return tokens

    def predict(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The network: latents x (B, C, h, w), time t (B,), labels y (B,) -> (B, out_channels, h, w)."""
        tokens, c = self.embed(x, t, y)
        out = self.final_layer(self.run_blocks(tokens, c), c)
        return unpatchify(out, self.patch_size, self.out_channels, *self.latent_shape[1:])

    def patchify(self, x):
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens, channels: Optional[int] = None):
        return unpatchify(tokens, self.patch_size, channels or self.out_channels, *self.latent_shape[1:])

    # -- guidance -----------------------------------------------------------------------------------
    def guided_fn(self, guidance_scale: float, channels: Optional[int] = None, interval_start: Optional[float] = None):
        """model_fn(x, t, y) for the samplers. ``guidance_scale == 1`` returns ``predict`` itself; ``> 1`` runs
        cond and null branches as one doubled batch and guides the first ``channels`` channels
        (default: all latent channels). With ``interval_start`` (flow time, t=0 noise) guidance only
        applies where t >= interval_start; below it the conditional prediction is used alone."""
        guidance_scale = check_guidance_scale(guidance_scale)
        if guidance_scale == 1.0:
            return self.predict
        k = self.in_channels if channels is None else int(channels)

        def fn(x, t, y):
            t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
            if interval_start is not None:
                on = t >= interval_start
                if not bool(on.any()):
                    return self.predict(x, t, y)
            null = torch.full_like(y, self.null_class)
            cond, uncond = self.predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            out = cfg_combine(cond, uncond, guidance_scale, k)
            if interval_start is not None and not bool(on.all()):
                out = torch.where(on.view(-1, *([1] * (out.ndim - 1))), out, cond)
            return out

        return fn

    def forward(self, latents, labels=None, generator=None):
        return self.loss(latents, labels, generator=generator)

    def config_dict(self) -> dict:
        return dict(latent_shape=list(self.latent_shape), num_classes=self.num_classes,
                    class_dropout=self.class_dropout, patch_size=self.patch_size, hidden_size=self.hidden_size,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                    grad_checkpointing=self.grad_checkpointing)


def build_size(cls, size: str, overrides: dict):
    """``cls`` at a named size: CPU defaults for "tiny", ImageNet-256 l-DeTok defaults otherwise."""
    width, depth, heads = SIZES[size]
    base = CPU_DEFAULTS if size == "tiny" else OFFICIAL_DEFAULTS
    return cls(**{**base, "hidden_size": width, "depth": depth, "num_heads": heads, **overrides})


def size_models(prefix: str, cls, sizes: Sequence[str]) -> Dict[str, Callable[..., "AdaLNZeroTransformer"]]:
    """``{prefix_size: builder(**overrides)}`` for each named size of ``SIZES``."""
    def builder(size):
        def build(**overrides):
            return build_size(cls, size, overrides)

        build.__name__ = build.__qualname__ = f"{prefix}_{size}"
        build.__doc__ = f"{cls.__name__} at size {size} (width, depth, heads = {SIZES[size]})."
        return build

    return {f"{prefix}_{size}": builder(size) for size in sizes}


# ---------------------------------------------------------------------------------------------
# DiT: DDPM, epsilon + learned sigma
# ---------------------------------------------------------------------------------------------
class DiT(AdaLNZeroTransformer):
    kind = "dit"
    out_mult = 2  # epsilon and the learned-range variance interpolation

    def __init__(self, *args, noise_schedule: str = "linear", cfg_channels: str = "all", **kwargs):
        super().__init__(*args, **kwargs)
        if cfg_channels not in ("all", "first3"):
            raise ValueError(f"cfg_channels must be 'all' or 'first3', got {cfg_channels!r}")
        self.noise_schedule, self.cfg_channels = noise_schedule, cfg_channels
        # the official builder passes no schedule, so DiT trains on DDPM's linear betas
        self.diffusion = create_diffusion(timestep_respacing=None, schedule=noise_schedule, learn_sigma=True)
        self._respaced = {}

    def loss_terms(self, latents, labels=None, generator=None) -> dict:
        """Per-sample hybrid-loss terms ``dict(loss, mse, vb)`` at t ~ U{0..999}."""
        self._check_latents(latents)
        b, dev = latents.shape[0], latents.device
        y = self.prepare_labels(labels, b, dev, generator)
        gdev = generator.device if generator is not None else dev
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=generator, device=gdev).to(dev)
        noise = randn(latents.shape, generator, dev, latents.dtype)
        return self.diffusion.training_losses(self.predict, latents, t, model_kwargs=dict(y=y), noise=noise)

    def loss(self, latents, labels=None, generator=None):
        return self.loss_terms(latents, labels, generator)["loss"].mean()

    forward = loss

    def sampling_diffusion(self, steps: int):
        steps = int(steps)
        if steps not in self._respaced:
            self._respaced[steps] = create_diffusion(timestep_respacing=steps, schedule=self.noise_schedule,
                                                     learn_sigma=True)
        return self._respaced[steps]

    def run_sampler(self, model_fn, n: int, y: torch.Tensor, steps: int = 100, temperature: float = 1.0,
                    generator=None) -> torch.Tensor:
        """Ancestral sampling of ``n`` latents with ``model_fn(x, t, y)`` (the draw order is fixed: initial
        noise first, then the per-step noise inside the loop)."""
        dev = self.device
        shape = (n, *self.latent_shape)
        noise = randn(shape, generator, dev)
        return self.sampling_diffusion(steps).p_sample_loop(
            model_fn, shape, noise=noise, model_kwargs=dict(y=y), temperature=temperature, generator=generator,
            clip_denoised=False, device=dev)

    @torch.no_grad()
    def sample(self, n: int, labels=None, guidance_scale: float = 1.0, steps: Optional[int] = None,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               cfg_channels: Optional[str] = None) -> torch.Tensor:
        """Ancestral DDPM sampling respaced to ``steps`` (default 100); CFG on all channels when
        guidance_scale > 1
        (``cfg_channels="first3"``: DiT's legacy mode)."""
        mode = cfg_channels or self.cfg_channels
        if mode not in ("all", "first3"):
            raise ValueError(f"cfg_channels must be 'all' or 'first3', got {mode!r}")
        y = self.sample_labels(n, labels, self.device)
        fn = self.guided_fn(guidance_scale, channels=self.in_channels if mode == "all" else min(3, self.in_channels))
        return self.run_sampler(fn, n, y, steps=100 if steps is None else steps, temperature=temperature,
                                generator=generator)

    def config_dict(self) -> dict:
        return dict(super().config_dict(), noise_schedule=self.noise_schedule, cfg_channels=self.cfg_channels)


# ---------------------------------------------------------------------------------------------
# Sizes (patch 1 on 16x16x16 latents as the l-DeTok recipes; learned sigma -> 32 output channels)
# ---------------------------------------------------------------------------------------------
# dit_xl (1152/28/16) has 675,129,632 parameters, the published DiT-XL/2 count (p*p*C in and out coincide).
DiT_models = size_models("dit", DiT, ("tiny", "base", "large", "xl", "huge"))

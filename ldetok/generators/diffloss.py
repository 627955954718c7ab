"""Diffusion loss: a small AdaLN MLP that models p(token | z) with DDPM (MAR's DiffLoss).

A per-token denoiser conditioned on the vector ``z`` that an autoregressive / masked transformer
produces for that token: trained with the IDDPM hybrid loss on 1000 cosine steps, sampled by ancestral
DDPM respaced to ``num_sampling_steps``. Module names follow LTH14/mar ``models/diffloss.py`` so that
official MAR / l-DeTok checkpoints load with strict keys (``net.time_embed.mlp.0.weight``,
``net.cond_embed.weight``, ``net.input_proj.weight``, ``net.res_blocks.{i}.in_ln.weight``,
``net.res_blocks.{i}.mlp.{0,2}.weight``, ``net.res_blocks.{i}.adaLN_modulation.1.weight``,
``net.final_layer.linear.weight``, ``net.final_layer.adaLN_modulation.1.weight``; the diffusions hold
no parameters or buffers).

Conventions: tokens are (N, C) rows, channels on dim 1; ``t`` is the DDPM step in [0, 1000).
CFG (MAR): ``z`` stacks [cond; uncond] (2N rows); eps = uncond + guidance_scale (cond - uncond); the variance
comes from the conditional half; both halves share the noise, so the two output halves are equal.

References: Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (MAR);
LTH14/mar ``models/diffloss.py``; Peebles & Xie 2023 (DiT adaLN-zero).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .base import TimestepEmbedder, modulate, randn, xavier_linears
from .diffusion import create_diffusion

__all__ = ["DiffLoss", "SimpleMLPAdaLN", "ResBlock", "FinalLayer"]


# ---------------------------------------------------------------------------------------------
# The denoiser MLP
# ---------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """LayerNorm -> adaLN modulate -> MLP (SiLU) -> gated residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm -> adaLN modulate -> linear to the output channels."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser: ``forward(x (N, in), t (N,), c (N, z)) -> (N, out)``."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        xavier_linears(self)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # adaLN-zero: every block starts as the identity and the output starts at 0 (MAR/DiT)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


# ---------------------------------------------------------------------------------------------
# DiffLoss
# ---------------------------------------------------------------------------------------------
class DiffLoss(nn.Module):
    """Per-token diffusion loss and sampler (MAR).

    ``forward(target (N, C), z (N, Zc), mask (N,) or None) -> scalar``; ``sample(z) -> (N, C)``.
    ``batch_mul`` is MAR's ``diffusion_batch_mul``: each token is trained on that many (t, noise) draws
    per step (the l-DeTok recipes use 4), which is cheap because the MLP is small next to the transformer.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int = 3, width: int = 1024,
                 num_sampling_steps: Union[int, str] = "100", schedule: str = "cosine", batch_mul: int = 1,
                 grad_checkpointing: bool = False):
        super().__init__()
        if batch_mul < 1:
            raise ValueError(f"batch_mul must be >= 1, got {batch_mul}")
        self.in_channels = target_channels
        self.z_channels = z_channels
        self.batch_mul = int(batch_mul)
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                                  grad_checkpointing=grad_checkpointing)
        # plain objects, not modules: the state dict holds only net.* (strict MAR checkpoint loading)
        self.train_diffusion = create_diffusion(None, schedule=schedule, learn_sigma=True)
        self.gen_diffusion = create_diffusion(str(num_sampling_steps), schedule=schedule, learn_sigma=True)

    def _check(self, target: Optional[torch.Tensor], z: torch.Tensor):
        if z.ndim != 2 or z.shape[1] != self.z_channels:
            raise ValueError(f"z must have shape (N, {self.z_channels}), got {tuple(z.shape)}")
        if target is not None and (target.ndim != 2 or target.shape != (z.shape[0], self.in_channels)):
            raise ValueError(f"target must have shape ({z.shape[0]}, {self.in_channels}), got {tuple(target.shape)}")

    def row_losses(self, target: torch.Tensor, z: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Hybrid loss per row of the batch repeated ``batch_mul`` times: (N * batch_mul,).

        Rows are tiled (``target.repeat(batch_mul, 1)``), as MAR does; t ~ U{0..999} per row.
        """
        self._check(target, z)
        target = target.repeat(self.batch_mul, 1)
        z = z.repeat(self.batch_mul, 1)
        n, dev = target.shape[0], target.device
        gen_dev = generator.device if generator is not None else dev
        t = torch.randint(0, self.train_diffusion.num_timesteps, (n,), generator=generator, device=gen_dev).to(dev)
        noise = randn(target.shape, generator, dev, target.dtype)
        return self.train_diffusion.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"]

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean hybrid loss; with ``mask`` (N,), sum(loss * mask) / sum(mask) (MAR: masked tokens only)."""
        loss = self.row_losses(target, z, generator)
        if mask is None:
            return loss.mean()
        if mask.shape != (z.shape[0],):
            raise ValueError(f"mask must have shape ({z.shape[0]},), got {tuple(mask.shape)}")
        mask = mask.to(loss.dtype).repeat(self.batch_mul)
        return (loss * mask).sum() / mask.sum().clamp(min=1e-12)

    def _cfg_model(self, z: torch.Tensor, guidance_scale: float):
        """A model on the N conditional rows: runs [x; x] with z = [cond; uncond] and mixes eps."""
        c = self.in_channels

        def model_fn(x, t, **_):
            out = self.net(torch.cat([x, x]), torch.cat([t, t]), z)
            cond, uncond = out.chunk(2, dim=0)
            eps = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
            return torch.cat([eps, cond[:, c:]], dim=1)

        return model_fn

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, guidance_scale: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Tokens (N, C) from ``z`` (N, Zc) by ancestral DDPM over ``num_sampling_steps``.

        With ``guidance_scale != 1``, z is [cond; uncond] (2N rows) and the output is (2N, C) with equal halves;
        callers keep the first half. ``temperature`` scales the per-step noise.
        """
        self._check(None, z)
        if guidance_scale == 1.0:
            shape = (z.shape[0], self.in_channels)
            return self.gen_diffusion.p_sample_loop(self.net, shape, model_kwargs=dict(c=z), temperature=temperature,
                                                    generator=generator, device=z.device)
        if z.shape[0] % 2:
            raise ValueError(f"with guidance_scale != 1, z must stack [cond; uncond] (an even row count), got {z.shape[0]} rows")
        # why: sampling the N conditional rows once (instead of 2N rows with duplicated noise, as MAR
        # does) gives the same result for half the diffusion work and makes both halves identical
        shape = (z.shape[0] // 2, self.in_channels)
        x = self.gen_diffusion.p_sample_loop(self._cfg_model(z, float(guidance_scale)), shape,
                                             temperature=temperature, generator=generator, device=z.device)
        return torch.cat([x, x], dim=0)

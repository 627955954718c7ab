"""LightningDiT: the DiT backbone modernised (RMSNorm, SwiGLU, 2D RoPE), trained as a flow model.

References: Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
Diffusion Models" (CVPR 2025, hustvl/LightningDiT); EVA-02's ``VisionRotaryEmbeddingFast``
(baaivision/EVA) for the rotary layout; the l-DeTok re-implementation (Jiawei-Yang/DeTok
``models/lightningdit.py``); l-DeTok paper section 4
(LightningDiT column: RMSNorm, RoPE, cosine loss, logit-normal t, Euler 250 steps, shift 0.3, CFG
interval from t = 0.10).

- Network: ``AdaLNZeroTransformer`` (dit.py) with RMSNorm (learnable scale, eps 1e-6), SwiGLU
  (hidden int(2/3 * 4 * D)), optional per-head RMSNorm on q/k (off by default), 2D RoPE on q and k,
  and an absolute position embedding that is *learnable*, initialised to 2D sin-cos.
- RoPE layout (EVA "fast" variant): per head, the first half of the channels rotates with the row
  index and the second half with the column index; inside each half, adjacent channel pairs (2i, 2i+1)
  share the frequency 10000^(-2i / (head_dim/2)), positions are the integer grid indices. This is the
  textbook axial 2D RoPE with interleaved pairs, so it uses ``layers.apply_rope`` directly.
- Objective: ``Transport`` with logit-normal t (mean 0, std 1): velocity MSE, as the official l-DeTok
  code path behind the paper's LightningDiT column trains (it computes the cosine term but returns only
  the MSE). ``use_cosine_loss=True`` (``model_args={"use_cosine_loss": true}``) adds (1 - cosine
  similarity) as LightningDiT's own training does: a deliberate departure from the paper's code path.
- Sampling: Euler ODE over ``steps`` (default 100: the official code's ``--num_sampling_steps``
  default; the paper's text says 250, pass ``steps=250`` for that) on a time grid shifted by
  ``time_shift(t, 0.3)`` (denser near the noise end), noise scaled by ``temperature``. CFG interval: a
  constant scale on all channels where t >= 0.10; for t < 0.10 (the noise end, t = 0 is noise) the
  conditional prediction is used alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import randn
from .dit import AdaLNZeroTransformer, size_models
from .flow import Transport, ode_sample

__all__ = [
    "LightningDiT", "LightningDiT_models", "rope_2d_tables",
]


def rope_2d_tables(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (grid_h * grid_w, head_dim) for raster-ordered tokens (EVA layout, see top)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half/2,)
    freqs = freqs.repeat_interleave(2)  # adjacent pairs share a frequency
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None] * freqs  # (gh, half)
    cols = torch.arange(grid_w, dtype=torch.float64)[:, None] * freqs  # (gw, half)
    ang = torch.cat([rows[:, None, :].expand(grid_h, grid_w, half), cols[None, :, :].expand(grid_h, grid_w, half)],
                    dim=-1).reshape(grid_h * grid_w, head_dim)
    return ang.cos().float(), ang.sin().float()


class LightningDiT(AdaLNZeroTransformer):
    kind = "lightningdit"
    out_mult = 1
    block_norm = "rmsnorm"
    block_mlp = "swiglu"
    learnable_pos = True

    def __init__(self, *args, use_rope: bool = True, use_cosine_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_rope, self.use_cosine_loss = bool(use_rope), bool(use_cosine_loss)
        cos, sin = rope_2d_tables(self.hidden_size // self.num_heads, *self.grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.transport = Transport(t_dist="logit_normal", logit_mean=0.0, logit_std=1.0,
                                   use_cosine_loss=self.use_cosine_loss)

    def rope(self):
        if not self.use_rope:
            return None
        return self.rope_cos[None, None], self.rope_sin[None, None]  # broadcast over (B, H)

    def loss_terms(self, latents, labels=None, generator=None) -> dict:
        """Per-sample terms ``dict(loss, mse, cos)``: loss = mse, or mse + cos with ``use_cosine_loss``
        (t ~ logit-normal(0, 1)); ``cos`` is reported either way."""
        self._check_latents(latents)
        b, dev = latents.shape[0], latents.device
        y = self.prepare_labels(labels, b, dev, generator)
        noise = randn(latents.shape, generator, dev, latents.dtype)
        return self.transport.training_loss(self.predict, latents, model_kwargs=dict(y=y), noise=noise,
                                            generator=generator)

    def loss(self, latents, labels=None, generator=None):
        return self.loss_terms(latents, labels, generator)["loss"].mean()

    forward = loss

    def run_sampler(self, model_fn, n: int, y: torch.Tensor, steps: int = 100, temperature: float = 1.0,
                    generator=None, shift: Optional[float] = 0.3, method: str = "euler") -> torch.Tensor:
        """Fixed-step ODE from scaled noise (t=0) to data (t=1) on the shifted grid; one draw (the noise)."""
        x0 = randn((n, *self.latent_shape), generator, self.device) * float(temperature)
        return ode_sample(model_fn, x0, steps=steps, method=method, shift=shift, model_kwargs=dict(y=y))

    @torch.no_grad()
    def sample(self, n: int, labels=None, guidance_scale: float = 1.0, steps: Optional[int] = None, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, shift: Optional[float] = 0.3,
               cfg_interval_start: float = 0.10, method: str = "euler") -> torch.Tensor:
        """Euler (default, ``steps`` default 100) with time shift 0.3; CFG on all channels where
        t >= ``cfg_interval_start`` (0 disables the interval)."""
        y = self.sample_labels(n, labels, self.device)
        fn = self.guided_fn(guidance_scale, interval_start=cfg_interval_start if cfg_interval_start > 0 else None)
        return self.run_sampler(fn, n, y, steps=100 if steps is None else steps, temperature=temperature,
                                generator=generator, shift=shift, method=method)

    def config_dict(self) -> dict:
        return dict(super().config_dict(), use_rope=self.use_rope, use_cosine_loss=self.use_cosine_loss)


# ---------------------------------------------------------------------------------------------
# Sizes (DiT's widths; SwiGLU at 2/3 width keeps the MLP parameter count close to GELU's)
# ---------------------------------------------------------------------------------------------
LightningDiT_models = size_models("lightningdit", LightningDiT, ("tiny", "base", "large", "xl", "huge"))

"""SiT: the DiT backbone trained as a flow (velocity) model on the linear interpolant.

References: Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
Interpolant Transformers" (ECCV 2024, willisma/SiT); the l-DeTok re-implementation
(Jiawei-Yang/DeTok ``models/sit.py``); l-DeTok paper
section 4 (SiT column: linear flow, dopri5 ODE, nominally 250 steps).

- Network: ``AdaLNZeroTransformer`` from dit.py (adaLN-Zero blocks, fixed 2D sin-cos positions,
  optional per-head qk LayerNorm) with p*p*C outputs: the velocity, no sigma.
- Objective: ``Transport`` with t ~ U[0, 1], x_t = t * x1 + (1 - t) * noise (t = 1 is data), target
  x1 - noise, plain MSE. t in [0, 1] is fed to the timestep embedder as is (as SiT does).
- Sampling: ODE from noise (t = 0) to data (t = 1); ``dopri5`` (atol 1e-6, rtol 1e-3) by default, as
  the paper's evaluation (``steps`` is then only the nominal grid), ``euler``/``heun`` with ``steps``
  fixed steps, or ``sampler="sde"``. ``temperature`` scales the initial noise. CFG: constant scale on
  all channels of the velocity, only when guidance_scale > 1.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import randn
from .dit import AdaLNZeroTransformer, size_models
from .flow import Transport, ode_sample, sde_sample

__all__ = ["SiT", "SiT_models"]

SAMPLERS = ("ode", "sde")
ODE_METHODS = ("dopri5", "euler", "heun")


class SiT(AdaLNZeroTransformer):
    kind = "sit"
    out_mult = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.transport = Transport(t_dist="uniform", use_cosine_loss=False)

    def loss_terms(self, latents, labels=None, generator=None) -> dict:
        """Per-sample flow-matching terms from ``Transport.training_loss`` (t ~ U[0, 1])."""
        self._check_latents(latents)
        b, dev = latents.shape[0], latents.device
        y = self.prepare_labels(labels, b, dev, generator)
        noise = randn(latents.shape, generator, dev, latents.dtype)
        return self.transport.training_loss(self.predict, latents, model_kwargs=dict(y=y), noise=noise,
                                            generator=generator)

    def loss(self, latents, labels=None, generator=None):
        return self.loss_terms(latents, labels, generator)["loss"].mean()

    forward = loss

    def run_sampler(self, model_fn, n: int, y: torch.Tensor, steps: int = 250, temperature: float = 1.0,
                    generator=None, sampler: str = "ode", method: str = "dopri5", atol: float = 1e-6,
                    rtol: float = 1e-3) -> torch.Tensor:
        """Integrate ``model_fn`` from scaled noise (t=0) to data (t=1); the first draw is the noise."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        x0 = randn((n, *self.latent_shape), generator, self.device) * float(temperature)
        kw = dict(y=y)
        if sampler == "sde":
            return sde_sample(model_fn, x0, steps=steps, generator=generator, model_kwargs=kw)
        if method not in ODE_METHODS:
            raise ValueError(f"method must be one of {ODE_METHODS}, got {method!r}")
        return ode_sample(model_fn, x0, steps=steps, method=method, model_kwargs=kw, atol=atol, rtol=rtol)

    @torch.no_grad()
    def sample(self, n: int, labels=None, guidance_scale: float = 1.0, steps: Optional[int] = None, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, sampler: str = "ode", method: str = "dopri5",
               atol: float = 1e-6, rtol: float = 1e-3) -> torch.Tensor:
        """ODE (dopri5 by default; euler/heun with ``steps``, default 250) or SDE sampling; CFG on all
        channels when guidance_scale > 1."""
        y = self.sample_labels(n, labels, self.device)
        fn = self.guided_fn(guidance_scale)
        return self.run_sampler(fn, n, y, steps=250 if steps is None else steps, temperature=temperature,
                                generator=generator, sampler=sampler, method=method, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Sizes (the official SIZE_DICT; "small" is 512 wide with 8 layers)
# ---------------------------------------------------------------------------------------------
SiT_models = size_models("sit", SiT, ("tiny", "small", "base", "large", "xl"))

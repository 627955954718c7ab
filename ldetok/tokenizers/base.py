"""The one interface every tokenizer implements, and the diagonal-Gaussian posterior.

Latents are always exchanged as NCHW tensors ``(B, C, h, w)``, whatever the tokenizer's internal
layout (the ViT tokenizer works on ``(B, L, C)`` token sequences). Images are ``(B, 3 or 1, H, W)`` in
[-1, 1].

- ``encode(x, sample=False)``: raw latents (posterior mean, or a posterior sample); never corrupted.
- ``decode(z)``: raw latents -> images in [-1, 1] (not clamped: training losses see the raw output).
- ``tokenize`` / ``detokenize``: the same, with per-channel latent statistics applied, which is what
  generators consume: ``(z - mean_c) / std_c``. ``detokenize`` clamps to [-1, 1].
- ``latent_shape(image_size)``: ``(C, h, w)``.
- for the denoising pass (``ldetok.corruption.denoising_forward``, which holds every corruption step):
  ``num_tokens`` (None when the tokenizer cannot mask), ``posterior_visible(x, keep)``,
  ``decode_visible(z, keep)`` and ``visible_to_nchw(z, keep)`` in the tokenizer's working latent layout,
  with ``keep`` the kept-token indices (``ldetok.corruption.TokenMask``) or None.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["DiagonalGaussian", "Tokenizer"]


class DiagonalGaussian:
    """A diagonal Gaussian posterior from concatenated ``[mean, logvar]`` along ``dim``.

    The log-variance is clamped to [-30, 20], as in LDM and the official l-DeTok. ``kl()`` is the KL to
    N(0, I), summed over every non-batch dim (the official reduction; the loss averages it over the
    batch).
    """

    def __init__(self, moments: torch.Tensor, dim: int = 1):
        moments = moments.float()
        self.moments = moments
        self.dim = dim
        self.mean, logvar = torch.chunk(moments, 2, dim=dim)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=dev).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


class Tokenizer(nn.Module):
    """Base class: holds the per-channel latent statistics and the normalisation around them.

    Subclasses implement ``encode_moments`` (images -> NCHW ``[mean, logvar]``) and ``decode``, and set
    ``latent_channels`` and ``stride``; a tokenizer that can mask tokens sets ``num_tokens`` and
    overrides the three ``*_visible`` methods. No tokenizer holds corruption code.
    The statistics are persistent buffers, so they travel with our own checkpoints; ``has_stats``
    says whether they were ever set (generators refuse latents normalised without them).
    """

    latent_channels: int
    stride: int
    num_tokens: Optional[int] = None  # tokens an encoder can mask; None: no masking

    def _init_stats(self, channels: int) -> None:
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))
        self.register_buffer("stats_set", torch.zeros((), dtype=torch.bool))

    STATS_KEYS = ("latent_mean", "latent_std", "stats_set")

    # ---- subclasses -------------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        if image_size % self.stride:
            raise ValueError(f"image size {image_size} is not divisible by the tokenizer stride {self.stride}")
        g = image_size // self.stride
        return (self.latent_channels, g, g)

    # ---- the denoising pass's view (working layout; overridden by tokenizers that mask) ---------
    def posterior_visible(self, x: torch.Tensor, keep=None) -> "DiagonalGaussian":
        if keep is not None:
            raise ValueError(f"{type(self).__name__} does not support masking")
        return self.posterior(x)

    def decode_visible(self, z: torch.Tensor, keep=None) -> torch.Tensor:
        return self.decode(z)

    def visible_to_nchw(self, z: torch.Tensor, keep=None) -> torch.Tensor:
        return z

    def nchw_to_visible(self, z: torch.Tensor) -> torch.Tensor:
        """Clean NCHW latents in the working layout (all tokens visible)."""
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clean reconstruction (posterior mean), not clamped. Training goes through the denoising pass."""
        return self.decode(self.encode(x))

    # ---- shared -----------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x), dim=1)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None):
        """Clean latents (no masking, no noise, whatever the mode): the posterior mean or a sample."""
        post = self.posterior(x)
        return post.sample(generator) if sample else post.mean

    @property
    def has_stats(self) -> bool:
        return bool(self.stats_set)

    def set_latent_stats(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        c = self.latent_channels
        if mean.numel() == 1:
            mean, std = mean.expand(c).clone(), std.expand(c).clone()
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(f"latent stats must have {c} channels, got mean {tuple(mean.shape)}, std {tuple(std.shape)}")
        if not torch.all(std > 0):
            raise ValueError("latent std must be positive in every channel")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.stats_set.fill_(True)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        m = self.latent_mean.view(1, -1, 1, 1).to(z)
        s = self.latent_std.view(1, -1, 1, 1).to(z)
        return (z - m) / s

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        m = self.latent_mean.view(1, -1, 1, 1).to(z)
        s = self.latent_std.view(1, -1, 1, 1).to(z)
        return z * s + m

    def tokenize(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None):
        """Normalised latents for generators, NCHW."""
        return self.normalize(self.encode(x, sample=sample, generator=generator))

    def detokenize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (clamped)."""
        return self.decode(self.denormalize(z)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Clean reconstruction through the posterior mean, clamped to [-1, 1]."""
        return self.decode(self.encode(x)).clamp(-1.0, 1.0)

    def freeze_all_but_decoder(self) -> None:
        """Decoder fine-tuning: only parameters under ``decoder`` stay trainable."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("decoder."))

    def encoder_state(self) -> dict:
        """What fixes the latent space: every parameter decoder fine-tuning freezes
        (``freeze_all_but_decoder``) and the latent statistics, by name. Two tokenizers whose encoder
        states are equal map an image to the same normalised latents."""
        trainable = {n: p.requires_grad for n, p in self.named_parameters()}
        self.freeze_all_but_decoder()
        out = {n: p.detach() for n, p in self.named_parameters() if not p.requires_grad}
        for n, p in self.named_parameters():
            p.requires_grad_(trainable[n])
        out.update({k: getattr(self, k) for k in self.STATS_KEYS})
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""Latent corruption: the core of l-DeTok.

Pure functions, each taking an optional ``torch.Generator`` so that every draw is reproducible.

- noise levels: ``t ~ U(0, 1)`` (official) or ``logit(t) ~ N(mean, std)`` (the paper's τ ablation,
  best at mean 0.8, std 1);
- interpolative noise ``z' = (1 - t) z + t γ ε`` (official default) and additive noise ``z' = z + t γ ε``;
- mask ratios ``max(0, U(low, M))`` drawn once per batch (official) or once per sample;
- MAE random masking that keeps ``ceil(L (1 - ratio))`` tokens;
- ``CorruptionConfig``: every corruption setting of a tokenizer run in one place, stored once in the
  run folder and read back by everything that evaluates or shows a tokenizer;
- ``denoising_forward``: the one training pass that serves every tokenizer (draw the corruption, encode
  the visible tokens, sample the posterior, noise the latents, decode). Tokenizers hold architecture
  only: ``posterior_visible`` / ``decode_visible`` with the kept-token indices for masking.

A new noise type is one function registered in ``NOISE``: the configs, the command line, the demo and
the notebooks offer every name in it.

Reference: Yang et al., "Latent Denoising Makes Good Tokenizers" (ICLR 2026), Sec. 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    "sample_noise_level",
    "interpolative_noise",
    "additive_noise",
    "apply_noise",
    "image_noise",
    "sample_mask_ratio",
    "random_masking",
    "kept_indices",
    "NOISE",
    "NOISE_DISTS",
    "MASK_MODES",
    "CorruptionConfig",
    "CorruptionDraw",
    "TokenMask",
    "DenoisingOutput",
    "draw_corruption",
    "mask_tokens",
    "denoising_forward",
    "DenoisingPass",
]

NOISE_DISTS = ("uniform", "logit_normal")
MASK_MODES = ("batch", "sample")


def _gen_device(generator: Optional[torch.Generator], fallback) -> torch.device:
    return generator.device if generator is not None else torch.device(fallback or "cpu")


def _rand(shape: Sequence[int], generator: Optional[torch.Generator], device=None) -> torch.Tensor:
    """``torch.rand`` on the generator's device, then moved: a CPU generator drives CUDA tensors too."""
    out = torch.rand(tuple(shape), generator=generator, device=_gen_device(generator, device))
    return out.to(device) if device is not None else out


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device=None, dtype=None) -> torch.Tensor:
    out = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device))
    return out.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else out


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------
def sample_noise_level(
    n: int,
    dist: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Noise levels ``t`` in [0, 1], shape ``(n,)``.

    ``uniform``: t ~ U(0, 1), what the released code uses. ``logit_normal``: t = sigmoid(u),
    u ~ N(mean, std²); the paper's τ ablation found logit(τ) ~ N(0.8, 1) best for MAR-B.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if dist == "uniform":
        return _rand((n,), generator, device)
    if dist == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit_normal needs std > 0, got {std}")
        return torch.sigmoid(_randn((n,), generator, device) * std + mean)
    raise ValueError(f"unknown noise-level distribution {dist!r}; expected one of {NOISE_DISTS}")


def _broadcast_t(t: Union[float, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """A per-sample level (B,) or a scalar, shaped to broadcast over every non-batch dim of ``z``."""
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != z.shape[0]:
        raise ValueError(f"noise level must be a scalar or shape ({z.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (z.ndim - 1)))


def interpolative_noise(
    z: torch.Tensor,
    t: Union[float, torch.Tensor],
    gamma: float,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(1 - t) z + t γ ε``, ε ~ N(0, I); ``t`` is a scalar or one level per sample.

    At t = 1 the signal is gone and the result is pure N(0, γ²) noise: this is why the paper prefers
    it to additive noise, where the signal can still dominate at large t. ``noise`` (the ε) may be
    passed in to share one draw across several settings (the sweep figures do).
    """
    eps = noise if noise is not None else _randn(z.shape, generator, z.device, z.dtype)
    tb = _broadcast_t(t, z)
    return (1 - tb) * z + tb * gamma * eps


def additive_noise(
    z: torch.Tensor,
    t: Union[float, torch.Tensor],
    gamma: float,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``z + t γ ε``, ε ~ N(0, I) (the paper's additive ablation, ``--use_additive_noise``)."""
    eps = noise if noise is not None else _randn(z.shape, generator, z.device, z.dtype)
    return z + _broadcast_t(t, z) * gamma * eps


# name -> f(z, t, gamma, generator, noise). Register a new noise type here: everything else reads this table.
NOISE: Dict[str, Callable[..., torch.Tensor]] = {
    "interpolative": interpolative_noise,
    "additive": additive_noise,
}


def apply_noise(z, t, gamma, kind: str = "interpolative", generator=None, noise=None) -> torch.Tensor:
    """Noise ``z`` at level ``t`` with the registered noise type ``kind``."""
    if kind not in NOISE:
        raise ValueError(f"unknown noise type {kind!r}; expected one of {tuple(NOISE)}")
    return NOISE[kind](z, t, gamma, generator, noise)


def image_noise(shape, seed: int, indices) -> torch.Tensor:
    """One ε of ``shape`` per image, drawn from a generator seeded by (``seed``, image index): image
    ``i`` of an evaluation set gets the same ε whatever batch it is in and whichever rank renders it."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i)))
                        for i in indices])


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------
def sample_mask_ratio(
    max_ratio: float,
    low: float = -0.1,
    generator: Optional[torch.Generator] = None,
    n: Optional[int] = None,
    device=None,
) -> Union[float, torch.Tensor]:
    """``max(0, U(low, max_ratio))``.

    With ``n=None`` one ratio is drawn for the whole batch (the official behaviour: ``random.uniform``
    once per forward call) and a float is returned. With ``n`` given, one ratio per sample, shape (n,).
    The negative ``low`` gives ratio 0 with probability -low / (max_ratio - low) (12.5% at the
    defaults), which narrows the gap between training and inference.
    """
    if not 0.0 <= max_ratio < 1.0:
        raise ValueError(f"max mask ratio must be in [0, 1), got {max_ratio}")
    if low > max_ratio:
        raise ValueError(f"low ({low}) must not exceed max_ratio ({max_ratio})")
    if n is None:
        u = float(_rand((1,), generator)[0])
        return max(0.0, low + (max_ratio - low) * u)
    u = _rand((n,), generator, device)
    return (low + (max_ratio - low) * u).clamp_min(0.0)


def random_masking(
    tokens: torch.Tensor,
    ratio: Union[float, torch.Tensor],
    generator: Optional[torch.Generator] = None,
):
    """MAE-style random masking of ``tokens`` (B, L, C).

    Returns ``(kept, mask, ids_restore)``:
    - ``kept`` (B, K, C): the first K tokens of a random per-sample shuffle, K = ceil(L (1 - ratio));
    - ``mask`` (B, L): 1 for masked, 0 for visible, in the original token order;
    - ``ids_restore`` (B, L): the inverse permutation; ``cat([kept, fill]).gather(1, ids_restore)``
      puts every token back in place.

    ``ratio`` may be one float for the batch or a (B,) tensor of per-sample ratios. In the per-sample
    case K is the largest keep count in the batch (so the batch stays rectangular); a sample whose own
    count is smaller has its extra kept tokens marked masked in ``mask``: callers hide them with an
    attention mask in the encoder and replace them by the mask token in the decoder
    (see ``kept_indices``).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    bsz, seq_len, chans = tokens.shape
    device = tokens.device
    if isinstance(ratio, torch.Tensor) and ratio.ndim > 0:
        if ratio.shape != (bsz,):
            raise ValueError(f"per-sample ratios must have shape ({bsz},), got {tuple(ratio.shape)}")
        # round away float32 representation error (0.9f -> 0.8999999762) before the ceil, so a
        # per-sample ratio keeps the same count as the same python-float ratio in per-batch mode
        raw = torch.round(seq_len * (1 - ratio.double().cpu()), decimals=6)
        keep = torch.ceil(raw).long().clamp(1, seq_len).to(device)
    else:
        r = float(ratio)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {r}")
        keep = torch.full((bsz,), max(1, math.ceil(seq_len * (1 - r))), dtype=torch.long, device=device)
    n_keep = int(keep.max())

    noise = _rand((bsz, seq_len), generator, device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, chans))

    # rank < keep_i  <=> visible; built in shuffled order, then un-shuffled.
    ranks = torch.arange(seq_len, device=device).unsqueeze(0)
    mask_shuffled = (ranks >= keep.unsqueeze(1)).to(tokens.dtype)
    mask = torch.gather(mask_shuffled, 1, ids_restore)
    return kept, mask, ids_restore


def kept_indices(ids_restore: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Original positions (B, n_keep) of the tokens ``random_masking`` kept."""
    return torch.argsort(ids_restore, dim=1)[:, :n_keep]


# ---------------------------------------------------------------------------------------------
# The corruption settings of a run
# ---------------------------------------------------------------------------------------------
@dataclass
class CorruptionConfig:
    """Every corruption setting of a tokenizer run (the paper's recipe by default).

    ``gamma = 0`` turns the noise off and ``max_mask_ratio = 0`` the masking; both off is a plain
    autoencoder (``CorruptionConfig.off()``, also what decoder fine-tuning trains with).
    """

    noise_type: str = "interpolative"  # a name in NOISE
    gamma: float = 3.0  # noise strength γ
    noise_dist: str = "uniform"  # the τ distribution: "uniform" (official) or "logit_normal"
    noise_mean: float = 0.0  # logit-normal location (the paper's τ ablation: best at 0.8)
    noise_std: float = 1.0  # logit-normal scale
    max_mask_ratio: float = 0.7  # M: ratio ~ max(0, U(mask_low, M))
    mask_low: float = -0.1  # a constant ratio M when mask_low = M (the paper's constant-vs-random ablation)
    mask_mode: str = "batch"  # "batch" (official: one ratio per forward) or "sample" (one per image)

    def errors(self) -> List[str]:
        """Every problem with these settings (empty when they are valid)."""
        errs = []
        if self.noise_type not in NOISE:
            errs.append(f"noise_type must be one of {tuple(NOISE)}, got {self.noise_type!r}")
        if self.noise_dist not in NOISE_DISTS:
            errs.append(f"noise_dist must be one of {NOISE_DISTS}, got {self.noise_dist!r}")
        if self.noise_dist == "logit_normal" and self.noise_std <= 0:
            errs.append(f"noise_std must be > 0 for logit_normal, got {self.noise_std}")
        if self.mask_mode not in MASK_MODES:
            errs.append(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if not 0.0 <= self.max_mask_ratio < 1.0:
            errs.append(f"max_mask_ratio must be in [0, 1), got {self.max_mask_ratio}")
        if self.mask_low > self.max_mask_ratio:
            errs.append(f"mask_low ({self.mask_low}) must not exceed max_mask_ratio ({self.max_mask_ratio})")
        if self.gamma < 0:
            errs.append(f"gamma must be >= 0, got {self.gamma}")
        return errs

    def validate(self) -> "CorruptionConfig":
        errs = self.errors()
        if errs:
            raise ValueError("invalid corruption config:\n  " + "\n  ".join(errs))
        return self

    @classmethod
    def off(cls) -> "CorruptionConfig":
        """No noise, no masking: plain reconstruction."""
        return cls(gamma=0.0, max_mask_ratio=0.0)

    @property
    def noise_on(self) -> bool:
        return self.gamma > 0

    @property
    def masking_on(self) -> bool:
        return self.max_mask_ratio > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "CorruptionConfig":
        """From a saved dict; unknown keys are refused, missing ones take the defaults."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown corruption settings: {', '.join(bad)}; valid: {', '.join(sorted(names))}")
        return cls(**d).validate()

    def with_(self, **changes) -> "CorruptionConfig":
        return replace(self, **changes).validate()

    def describe(self) -> str:
        noise = f"γ={self.gamma:g} {self.noise_type}, t~{self.noise_dist}" if self.noise_on else "no noise"
        mask = f"mask ≤ {self.max_mask_ratio:g} ({self.mask_mode})" if self.masking_on else "no masking"
        return f"{noise}; {mask}"


@dataclass
class CorruptionDraw:
    """One batch's random corruption: the mask ratio (0.0 = none; a float or a (B,) tensor) and the
    noise level per sample ((B,) tensor, or None = no noise)."""

    mask_ratio: Union[float, torch.Tensor] = 0.0
    noise_level: Optional[torch.Tensor] = None


def draw_corruption(cfg: CorruptionConfig, batch: int, generator: Optional[torch.Generator] = None,
                    device=None) -> CorruptionDraw:
    """Draw the mask ratio, then the noise levels, in the training order (the order is part of exact resume)."""
    ratio: Union[float, torch.Tensor] = 0.0
    if cfg.masking_on:
        if cfg.mask_mode == "batch":
            ratio = sample_mask_ratio(cfg.max_mask_ratio, cfg.mask_low, generator)
        else:
            ratio = sample_mask_ratio(cfg.max_mask_ratio, cfg.mask_low, generator, n=batch, device=device)
            if bool((ratio == 0).all()):
                ratio = 0.0
    t = None
    if cfg.noise_on:
        t = sample_noise_level(batch, cfg.noise_dist, cfg.noise_mean, cfg.noise_std, generator, device)
    return CorruptionDraw(ratio, t)


# ---------------------------------------------------------------------------------------------
# The denoising forward pass (every tokenizer)
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenMask:
    """Which tokens the encoder sees: ``ids_keep`` (B, K) original positions; ``valid`` (B, K) bool or None
    (per-sample ratios: kept-but-invalid padding positions); ``mask`` (B, L), 1 = masked."""

    ids_keep: torch.Tensor
    valid: Optional[torch.Tensor]
    mask: torch.Tensor


def mask_tokens(batch: int, seq_len: int, ratio, generator: Optional[torch.Generator] = None, device=None) -> TokenMask:
    """Draw the MAE shuffle for ``ratio`` (a float or a (B,) tensor) over ``seq_len`` tokens."""
    dummy = torch.zeros(batch, seq_len, 1, device=device)
    kept, mask, ids_restore = random_masking(dummy, ratio, generator)
    ids_keep = kept_indices(ids_restore, kept.shape[1])
    valid = None
    if isinstance(ratio, torch.Tensor) and ratio.ndim > 0:
        valid = torch.gather(mask, 1, ids_keep) < 0.5
        if bool(valid.all()):
            valid = None
    return TokenMask(ids_keep, valid, mask)


@dataclass
class DenoisingOutput:
    """What the denoising pass returns to the losses and the figures."""

    recon: torch.Tensor  # (B, C_img, H, W), raw decoder output (not clamped)
    posterior: object  # the tokenizer's DiagonalGaussian over the visible latents
    latents: torch.Tensor  # the (possibly corrupted) latents the decoder saw, NCHW, zeros where masked
    mask: Optional[torch.Tensor] = None  # (B, L) 1 = masked token, or None
    noise_level: Optional[torch.Tensor] = None  # (B,) t per sample, or None
    mask_ratio: Optional[torch.Tensor] = None  # (B,) ratio used, or None


def denoising_forward(tok, x: torch.Tensor, cfg: Optional[CorruptionConfig] = None,
                      generator: Optional[torch.Generator] = None, *, draw: Optional[CorruptionDraw] = None,
                      sample: bool = True, noise: Optional[torch.Tensor] = None) -> DenoisingOutput:
    """Encode the visible tokens, sample the posterior, noise the latents, decode: the l-DeTok training pass.

    ``draw`` fixes the mask ratio and noise level (figures, the demo); otherwise they are drawn from
    ``cfg``. ``sample=False`` uses the posterior mean. ``noise`` fixes ε (in the tokenizer's working
    latent layout). ``tok`` provides ``num_tokens`` (None: no masking), ``posterior_visible``,
    ``decode_visible`` and ``visible_to_nchw``.
    """
    cfg = cfg or CorruptionConfig.off()
    b = x.shape[0]
    if draw is None:
        draw = draw_corruption(cfg, b, generator, x.device)
    ratio = draw.mask_ratio
    keep, ratio_t = None, None
    wants_mask = isinstance(ratio, torch.Tensor) or ratio > 0
    if tok.num_tokens is None and (wants_mask or cfg.masking_on):
        raise ValueError(f"{type(tok).__name__} does not support masking: set max_mask_ratio=0")
    if wants_mask:
        keep = mask_tokens(b, tok.num_tokens, ratio, generator, x.device)
        ratio_t = torch.as_tensor(ratio, dtype=torch.float32).expand(b).to(x.device)
    post = tok.posterior_visible(x, keep)
    z = post.sample(generator) if sample else post.mean
    t = None
    if draw.noise_level is not None and cfg.gamma > 0:
        t = torch.as_tensor(draw.noise_level, dtype=z.dtype, device=z.device).expand(b)
        z = apply_noise(z, t, cfg.gamma, cfg.noise_type, generator, noise)
    recon = tok.decode_visible(z, keep)
    return DenoisingOutput(recon, post, tok.visible_to_nchw(z, keep), None if keep is None else keep.mask, t, ratio_t)


class DenoisingPass(nn.Module):
    """``denoising_forward`` as a module around a tokenizer, so that DDP wraps the corrupted pass."""

    def __init__(self, tokenizer: nn.Module, cfg: CorruptionConfig):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> DenoisingOutput:
        return denoising_forward(self.tokenizer, x, self.cfg, generator)

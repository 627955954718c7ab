"""Latent corruption: the core of l-DeTok.

Pure functions, each taking an optional ``torch.Generator`` so that every draw is reproducible.

- noise levels: ``t ~ U(0, 1)`` (official) or ``logit(t) ~ N(mean, std)`` (the paper's τ ablation,
  best at mean 0.8, std 1);
- interpolative noise ``z' = (1 - t) z + t γ ε`` (official default) and additive noise ``z' = z + t γ ε``;
- mask ratios ``max(0, U(low, M))`` drawn once per batch (official) or once per sample;
- MAE random masking that keeps ``ceil(L (1 - ratio))`` tokens.

Reference: Yang et al., "Latent Denoising Makes Good Tokenizers" (ICLR 2026), Sec. 3.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "sample_noise_level",
    "interpolative_noise",
    "additive_noise",
    "apply_noise",
    "sample_mask_ratio",
    "random_masking",
    "kept_indices",
    "NOISE_TYPES",
    "NOISE_DISTS",
]

NOISE_TYPES = ("interpolative", "additive")
NOISE_DISTS = ("uniform", "logit_normal")


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


def apply_noise(z, t, gamma, kind: str = "interpolative", generator=None, noise=None) -> torch.Tensor:
    """Dispatch on ``kind`` ("interpolative" or "additive")."""
    if kind == "interpolative":
        return interpolative_noise(z, t, gamma, generator, noise)
    if kind == "additive":
        return additive_noise(z, t, gamma, generator, noise)
    raise ValueError(f"unknown noise type {kind!r}; expected one of {NOISE_TYPES}")


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

"""Tokenizers: l-DeTok (ViT) and the convolutional KL-VAE baseline, one interface for both.

- ``build(name, **overrides)``: a registry name (``detok_SS`` ... ``detok_XLXL`` as released, the CPU
  sizes ``detok_MM``, ``detok_MT``, ``detok_TT``, the conv VAEs ``marvae`` and ``convvae_tiny``) plus
  any architecture field (image_size, patch_size, latent_channels, ...); ``build_sized`` takes the one
  set of size fields every kind understands (what a training config's ``model`` holds). Corruption is
  not a tokenizer field: see ``ldetok.corruption``.
- saving and loading our own tokenizers (safetensors weights + a JSON config) is the run folder's
  job: ``ldetok.runs.save_tokenizer`` / ``ldetok.runs.load_tokenizer``.
- ``load_official_detok(path, model="detok_BB", ema=True)`` / ``load_official_marvae(path)``: the
  released checkpoints, strict keys, ``weights_only=True``; ``path`` may be ``released:detok_BB``,
  ``released:detok_BB_decoder_tuned``, ``released:vitok_BB`` or ``released:marvae`` (found in the
  standard caches, downloaded where a network exists: ``ldetok.weights``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import torch

from ..weights import is_spec, resolve
from .base import DiagonalGaussian, Tokenizer
from .convvae import CONVVAE_CONFIGS, ConvVAE, build_convvae, load_official_marvae
from .detok import SIZES, DeTok, DeTokConfig, size_config, split_size_name

__all__ = [
    "Tokenizer",
    "DiagonalGaussian",
    "DeTok",
    "DeTokConfig",
    "SIZES",
    "REGISTRY",
    "available",
    "build",
    "build_sized",
    "can_mask",
    "build_from_config",
    "load_official_detok",
    "load_official_marvae",
    "OfficialCheckpointError",
]

# The official names (DeTok_models) and the CPU sizes. Official sizes default to the released
# ImageNet-256 setting; the CPU sizes default to 32 px images with patch 8 (16 tokens), the size the
# 2-core pilot found trainable in minutes.
_OFFICIAL_CODES = ["SS", "SB", "SL", "BS", "BB", "BL", "LS", "LB", "LL", "XLXL"]
_CPU_CODES = ["MM", "MT", "TT"]


def _detok_factory(code: str) -> Callable[..., DeTok]:
    enc, dec = split_size_name(code)
    defaults = size_config(enc, dec)
    if code in _CPU_CODES:
        defaults.update(image_size=32, patch_size=8)

    def make(**overrides) -> DeTok:
        return DeTok(**{**defaults, **overrides})

    make.__name__ = f"detok_{code}"
    return make


REGISTRY: Dict[str, Callable[..., Tokenizer]] = {f"detok_{c}": _detok_factory(c) for c in _OFFICIAL_CODES + _CPU_CODES}


def _convvae_names():
    return list(CONVVAE_CONFIGS)


def available() -> list:
    return sorted(REGISTRY) + sorted(_convvae_names())


def build(name: str, **overrides) -> Tokenizer:
    """Build a registry tokenizer; ``overrides`` are config fields (unknown ones are an error)."""
    if name in REGISTRY:
        return REGISTRY[name](**overrides)
    if name in _convvae_names():
        return build_convvae(name, **overrides)
    raise KeyError(f"unknown tokenizer {name!r}; available: {', '.join(available())}")


def can_mask(name: str) -> bool:
    """Whether a registry tokenizer can mask tokens (the ViT tokenizers; the conv VAE has no tokens)."""
    return name in REGISTRY


def build_sized(name: str, image_size: int, patch_size: int, in_channels: int, latent_channels: int) -> Tokenizer:
    """A registry tokenizer at the given size, for every kind (the conv VAE's stride is fixed by its
    registry entry, so ``patch_size`` applies to the ViT tokenizers only)."""
    if name in _convvae_names():
        return build(name, in_channels=in_channels, out_channels=in_channels, resolution=image_size,
                     z_channels=latent_channels, embed_dim=latent_channels)
    return build(name, image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                 latent_channels=latent_channels)


# Corruption settings that exports written before corruption had its own config kept in the model config.
LEGACY_CORRUPTION_KEYS = ("gamma", "noise_type", "noise_dist", "noise_mean", "noise_std", "max_mask_ratio",
                          "mask_low", "mask_mode")


def build_from_config(kind: str, config: dict) -> Tokenizer:
    """Rebuild from ``(tok.kind, tok.config_dict())`` (legacy corruption keys are ignored)."""
    config = {k: v for k, v in config.items() if k not in LEGACY_CORRUPTION_KEYS}
    if kind == "detok":
        return DeTok(DeTokConfig(**config))
    if kind == "convvae":
        return ConvVAE(**config)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'detok' or 'convvae')")


# ---------------------------------------------------------------------------------------------
# Released checkpoints
# ---------------------------------------------------------------------------------------------
class OfficialCheckpointError(RuntimeError):
    """A released checkpoint's keys or shapes do not match the architecture."""


def _match_strict(tok: Tokenizer, state: dict, path, ignore_prefixes=()) -> dict:
    """Check that ``state`` holds exactly our keys (minus our stats buffers) with matching shapes."""
    ours = {k: v for k, v in tok.state_dict().items() if k not in Tokenizer.STATS_KEYS}
    dropped = sorted(k for k in state if any(k.startswith(p) for p in ignore_prefixes))
    theirs = {k: v for k, v in state.items() if k not in dropped}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = sorted(k for k in set(ours) & set(theirs) if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if missing or unexpected or shapes:
        lines = [f"{path}: the checkpoint does not match the architecture"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            more = " ..." if len(unexpected) > 12 else ""
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:12])}{more}")
        for k in shapes[:12]:
            lines.append(f"  shape of {k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(ours[k].shape)}")
        raise OfficialCheckpointError("\n".join(lines))
    full = dict(theirs)
    for k in Tokenizer.STATS_KEYS:
        full[k] = tok.state_dict()[k]
    tok.load_state_dict(full, strict=True)
    return {"dropped": dropped}


def load_official_detok(path, model: str = "detok_BB", ema: bool = True, map_location="cpu", **overrides) -> DeTok:
    """Load a released l-DeTok file (``detok-BB-gamm3.0-m0.7.pth``, its ``-decoder_tuned`` twin, or
    ``vitok-BB.pth``; a path, or ``released:detok_BB`` / ``released:detok_BB_decoder_tuned`` /
    ``released:vitok_BB``, resolved by ``ldetok.weights``): a dict with ``model`` and ``model_ema``
    (parameters only). Strict key matching, ``weights_only=True``. The released files carry no latent statistics: set them with
    ``tok.set_latent_stats(mean, std)`` (or collect them) before using ``tokenize``.
    Note: the decoder-tuned file's EMA encoder is the raw pre-training encoder (the official EMA copies
    frozen parameters), which is what the released generators were paired with.
    """
    p = resolve(path) if is_spec(path) else Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: no such file. The released l-DeTok weights (detok-BB-gamm3.0-m0.7.pth, "
            f"detok-BB-gamm3.0-m0.7-decoder_tuned.pth, vitok-BB.pth) come from the authors' Hugging Face "
            f"repository jjiaweiyang/l-DeTok: pass released:detok_BB, released:detok_BB_decoder_tuned or "
            f"released:vitok_BB (downloaded where a network exists; `ldetok weights download NAME`), or a path."
        )
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report the file, keep the cause
        raise OfficialCheckpointError(f"{p}: could not be read as a torch checkpoint ({e})") from e
    key = "model_ema" if ema else "model"
    if isinstance(ckpt, dict) and key in ckpt:
        state = ckpt[key]
    elif isinstance(ckpt, dict) and not ema and "state_dict" in ckpt:
        state = ckpt["state_dict"]
    else:
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise OfficialCheckpointError(f"{p}: expected a dict with {key!r}; found {have}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    # The official class holds its corruption settings (gamma 3 / mask 0.75 by default); here they belong
    # to the training config (ldetok.corruption.CorruptionConfig), so the file gives architecture only.
    tok = build(model, **overrides)
    _match_strict(tok, state, p)
    return tok.eval()


"""Generators on tokenizer latents: MAR, RandomAR, RasterAR, DiT, SiT, LightningDiT.

``build_generator(name, latent_shape=..., num_classes=..., **overrides)`` with a registry name
(``available()``: ``mar_tiny`` ... ``mar_huge``, ``randomar_*``/``rasterar_*``, ``dit_*``, ``sit_*``,
``lightningdit_*``); ``build_from_config(kind, config)`` rebuilds a saved model;
``load_official_mar(path, model="mar_base")`` loads the released MAR checkpoints.
Shared machinery: ``diffusion`` (DDPM), ``flow`` (transport, ODE/SDE samplers), ``diffloss`` (MAR's
per-token diffusion head).
"""

from __future__ import annotations

from typing import Callable, Dict

from .ardiff import ARDiff, ARDiff_models
from .base import Generator
from .dit import DiT, DiT_models
from .lightningdit import LightningDiT, LightningDiT_models
from .mar import MAR, MAR_models, load_official_mar
from .sit import SiT, SiT_models

__all__ = ["Generator", "MAR", "ARDiff", "DiT", "SiT", "LightningDiT", "REGISTRY", "FAMILIES", "family_of", "available",
           "build_generator", "build_from_config", "load_official_mar"]

REGISTRY: Dict[str, Callable[..., Generator]] = {
    **MAR_models, **ARDiff_models, **DiT_models, **SiT_models, **LightningDiT_models,
}
# family name (as the CLI's model=...) -> the tiny CPU size
FAMILIES = {"mar": "mar_tiny", "randomar": "randomar_tiny", "rasterar": "rasterar_tiny", "dit": "dit_tiny",
            "sit": "sit_tiny", "lightningdit": "lightningdit_tiny"}
_KINDS = {"mar": MAR, "ardiff": ARDiff, "dit": DiT, "sit": SiT, "lightningdit": LightningDiT}


def family_of(name: str) -> str:
    """The family of a generator registry or family name: ``mar_base`` -> ``mar``, ``sit`` -> ``sit``."""
    return name if name in FAMILIES else name.rsplit("_", 1)[0]


def available() -> list:
    return sorted(REGISTRY)


def build_generator(name: str, **overrides) -> Generator:
    """A registry name (or a family name, meaning its tiny size) plus constructor overrides."""
    name = FAMILIES.get(name, name)
    if name not in REGISTRY:
        raise KeyError(f"unknown generator {name!r}; available: {', '.join(available())} "
                       f"(or a family: {', '.join(FAMILIES)})")
    return REGISTRY[name](**overrides)


def build_from_config(kind: str, config: dict) -> Generator:
    if kind not in _KINDS:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {', '.join(_KINDS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return _KINDS[kind](**kwargs)

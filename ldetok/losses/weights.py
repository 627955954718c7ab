"""The perceptual nets' weight files, through the project's one resolver (``ldetok.weights``).

VGG16 and ConvNeXt-S come from torch hub (downloaded into ``$TORCH_HOME/hub/checkpoints`` where a network
exists, refused within seconds offline); the LPIPS heads and EfficientNet-Lite0 ship in pip packages.
"""

from __future__ import annotations

from pathlib import Path

from ..weights import MissingWeightsError, hub_checkpoint_dir, resolve

__all__ = ["MissingWeightsError", "find_weights", "hub_checkpoint_dir"]


def find_weights(name: str, path=None) -> Path:
    """The file named ``name`` in ``ldetok.weights.TABLE`` if it is already here; never downloads."""
    return resolve(name, path, allow_download=False)

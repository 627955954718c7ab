"""Finding pretrained weight files without ever downloading them.

The paper's perceptual losses need torchvision's ImageNet VGG16 and ConvNeXt-S files. On an offline
machine they are absent, and a hidden download would hang or fail late. So every lookup goes through
``find_weights``: an environment variable first, then torchvision's own cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, default
``~/.cache/torch/hub/checkpoints``), and otherwise a ``MissingWeightsError`` that names the file,
both places looked in, and how to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["MissingWeightsError", "find_weights", "hub_checkpoint_dir"]


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file that a loss or metric needs is not on this machine."""


def hub_checkpoint_dir() -> Path:
    """Where torchvision caches its downloads: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(filename: str, env_var: str, what: str, how_to: str) -> Path:
    """Path of ``filename``: from ``$env_var`` if set, else from the torch hub checkpoint folder.

    ``what`` describes the weights ("VGG16 ImageNet weights"); ``how_to`` is a sentence on how to
    obtain the file. Raises ``MissingWeightsError`` (never downloads).
    """
    env_val = os.environ.get(env_var, "").strip()
    hub_path = hub_checkpoint_dir() / filename
    if env_val:
        p = Path(env_val).expanduser()
        if p.is_dir():  # a folder holding the file is accepted too
            p = p / filename
        if p.is_file():
            return p
        env_note = f"${env_var} = '{env_val}' (no such file)"
    else:
        env_note = f"${env_var} (not set)"
    if hub_path.is_file():
        return hub_path
    raise MissingWeightsError(
        f"{what} not found: the file '{filename}' is missing. Looked in (1) {env_note} and "
        f"(2) the torch hub cache '{hub_path}' ($TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to "
        f"~/.cache/torch). Nothing is downloaded automatically. To provide it: {how_to} Then copy "
        f"'{filename}' into '{hub_path.parent}' or set {env_var}=/path/to/{filename}."
    )

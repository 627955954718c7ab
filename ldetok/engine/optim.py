"""AdamW with the official weight-decay split, batch-scaled learning rate and step-based schedules.

The official code adjusts the lr every iteration from a fractional epoch; a step-based schedule
with warm-up/total expressed in steps traces the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ldetok.engine.distributed import unwrap_model

__all__ = [
    "NO_DECAY_KEYWORDS",
    "SCHEDULES",
    "build_adamw",
    "lr_at",
    "param_groups",
    "scaled_lr",
    "set_lr",
]

# Substrings exempt from decay in the official code. "token" and "embed" also catch mask/cls tokens,
# position embeddings and the patch-embedding conv; "diffloss" exempts MAR's whole diffusion MLP.
NO_DECAY_KEYWORDS: tuple[str, ...] = (
    "ln",
    "bias",
    "embedding",
    "norm",
    "gamma",
    "embed",
    "token",
    "diffloss",
)
SCHEDULES = ("cosine", "constant", "linear")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_keywords: Sequence[str] = NO_DECAY_KEYWORDS,
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Split trainable parameters into decay / no-decay groups.

    No decay for tensors with ndim < 2 or whose name contains any keyword (plain substring match,
    as officially: note "ln" also matches e.g. "kln"). Frozen parameters are left out.
    Returns (groups, names): `groups` is [decay, no_decay] ready for an optimiser (both always
    present, so the optimiser state layout does not depend on the model); `names` maps
    "decay"/"no_decay" to parameter names for logging.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in no_decay_keywords):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return groups, {"decay": decay_names, "no_decay": no_decay_names}


def build_adamw(
    model_or_groups: nn.Module | Iterable[dict[str, Any]] | Iterable[torch.Tensor],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over a model (split with `param_groups`) or ready-made groups/params.

    fused=None turns the fused kernel on when every parameter lives on CUDA (it is the fastest
    path there); on CPU the default foreach implementation is used.
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}.")
    if isinstance(model_or_groups, nn.Module):
        groups: list[Any] = param_groups(model_or_groups, weight_decay)[0]
    else:
        groups = list(model_or_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not params:
        raise ValueError("build_adamw got no trainable parameters (is everything frozen?).")
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule used by the official code: lr = blr * global_batch / 256."""
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}.")
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}.")
    return base_lr * global_batch / 256


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr: float = 0.0,
) -> float:
    """Learning rate at optimiser step `step` (0-based).

    Linear warm-up from 0 at step 0 to base_lr at `warmup_steps`; then
      cosine:   min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * t)),
      linear:   base_lr - (base_lr - min_lr) * t,
      constant: base_lr (min_lr unused, as officially),
    with t = (step - warmup) / (total - warmup) clamped to [0, 1] (steps past the end stay at the end).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown lr schedule {schedule!r}; expected one of {SCHEDULES}.")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps}).")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if base_lr < 0 or min_lr < 0:
        raise ValueError(f"base_lr and min_lr must be >= 0, got base_lr={base_lr}, min_lr={min_lr}.")
    if schedule != "constant" and min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed base_lr ({base_lr}) for a {schedule} schedule.")

    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    span = total_steps - warmup_steps
    t = 1.0 if span == 0 else min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    return base_lr - (base_lr - min_lr) * t


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (times its optional `lr_scale`, e.g. for layer-wise decay)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

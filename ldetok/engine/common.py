"""Pieces both trainers share: precision, EMA warm-up, resume checks, per-rank RNG streams."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..config import config_diff
from .checkpoint import capture_rng_state, restore_rng_state
from .distributed import DistInfo, gather_objects

__all__ = ["autocast_ctx", "ema_decay_at", "check_resume_config", "gather_rng_states", "restore_rng_states",
           "RESUME_FREE_KEYS", "load_resume_state"]

# Config fields (by leaf name) that may change between a run and its resumption (length, bookkeeping,
# placement, sampling for logs).
RESUME_FREE_KEYS = {"max_steps", "epochs", "log_every", "image_every", "sample_every", "ckpt_every", "keep_ckpts",
                    "milestone_every", "tensorboard", "wandb_project", "num_workers", "device", "dist_timeout_min",
                    "sample_guidance_scale", "sample_steps", "sample_temperature"}


def autocast_ctx(device: torch.device, precision: str):
    """bf16 autocast on CUDA ("auto"), or when asked for explicitly; fp32 otherwise (bf16 on these CPUs
    is ~20x slower)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The configured decay, or min(decay, (1+n)/(10+n)) with warm-up (the official EMA has none; a
    few-thousand-step CPU run would otherwise still carry most of its initialisation)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def check_resume_config(saved: dict, current: dict, path) -> None:
    diff = {k: v for k, v in config_diff(saved, current).items() if k.rsplit(".", 1)[-1] not in RESUME_FREE_KEYS}
    if diff:
        raise ValueError(f"{path} was trained with a different config; differing keys: "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                         + ". Use another --out folder to start a new run.")


def gather_rng_states(gen: torch.Generator) -> list:
    """Every rank's RNG streams (python, numpy, torch, CUDA, and ``gen``); a collective call."""
    return gather_objects({"rng": capture_rng_state(), "gen": gen.get_state()})


def restore_rng_states(rngs: list, dist: DistInfo, gen: torch.Generator, log: Callable[[str], None]) -> None:
    if len(rngs) != dist.world_size:
        log(f"world size changed ({len(rngs)} -> {dist.world_size}): RNG streams are re-derived, so the "
            "continuation is not bit-identical")
    mine = rngs[dist.rank % len(rngs)]
    restore_rng_state(mine["rng"])
    gen.set_state(mine["gen"].cpu())


def load_resume_state(ckpts, cfg, dist: DistInfo, gen: torch.Generator, log: Callable[[str], None], device):
    """The newest readable checkpoint's state (None when there is none), after checking that it was
    trained with the same config and restoring this rank's RNG streams; the caller loads its modules."""
    from dataclasses import asdict

    state, path = ckpts.auto_resume(map_location=device)
    for bad in ckpts.skipped:
        log(f"skipped unreadable checkpoint {bad}")
    if state is None:
        return None
    check_resume_config(state["config"], asdict(cfg), path)
    restore_rng_states(state["rngs"], dist, gen, log)
    log(f"resumed from step {int(state['step'])} ({path})")
    return state

"""Pieces both trainers share: precision (bf16 autocast, TF32), torch.compile and gradient checkpointing
switches, EMA warm-up, resume checks, per-rank RNG streams."""

from __future__ import annotations

import contextlib
import os
import sys
import types
from dataclasses import asdict
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from ..config import config_diff, flatten
from .checkpoint import capture_rng_state, restore_rng_state
from .distributed import DistInfo, gather_objects, resolve_device

__all__ = ["autocast_ctx", "effective_precision", "configure_tf32", "compile_forward", "eager_forward", "compiled_frames",
           "enable_grad_checkpointing", "ema_decay_at", "check_resume_config", "gather_rng_states", "restore_rng_states",
           "RESUME_FREE_KEYS", "load_resume_state", "check_device", "usable_cpus", "configure_threads"]

# Config fields (by leaf name) that may change between a run and its resumption (length, bookkeeping,
# placement, sampling for logs).
RESUME_FREE_KEYS = {"max_steps", "epochs", "log_every", "image_every", "sample_every", "ckpt_every", "keep_ckpts",
                    "milestone_every", "tensorboard", "wandb_project", "num_workers", "device", "dist_timeout_min",
                    "max_nonfinite_steps",
                    "sample_guidance_scale", "sample_steps", "sample_temperature",
                    # execution strategies: a resumed run may switch them (compile changes rounding only)
                    "compile", "grad_checkpointing"}


def check_device(device) -> torch.device:
    """``resolve_device``, with an absent accelerator as a ``ValueError`` naming it (a command refuses it
    in one line before any work, instead of a traceback)."""
    try:
        return resolve_device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(str(e)) from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(environ=None) -> str:
    """Set torch's intra-op thread count for this machine and return the line that says so: the value of
    ``OMP_NUM_THREADS`` when it is a positive integer, else the usable CPUs shared among the processes of
    this node (``LOCAL_WORLD_SIZE`` under torchrun). More threads than CPUs (or another job on the same
    cores) slows a step down many times over: ``OMP_NUM_THREADS=1`` is the setting for a shared machine."""
    environ = os.environ if environ is None else environ
    cpus = usable_cpus()
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        n, why = int(omp), f"OMP_NUM_THREADS={omp}"
    else:
        local = environ.get("LOCAL_WORLD_SIZE", "1")
        procs = int(local) if local.isdigit() and int(local) >= 1 else 1
        n = max(1, cpus // procs)
        why = ("OMP_NUM_THREADS unset" if not omp else f"OMP_NUM_THREADS={omp!r} ignored: not a positive integer")
        if procs > 1:
            why += f", {procs} processes on this node"
    torch.set_num_threads(n)
    return f"threads: {n} ({cpus} CPUs; {why})"


def effective_precision(device, precision: str) -> str:
    """"bf16" on CUDA for "auto", or when asked for explicitly; "fp32" otherwise (bf16 on these CPUs is
    ~20x slower)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda") else "fp32"


def autocast_ctx(device, precision: str):
    """bf16 autocast where ``effective_precision`` says so; no autocast (float32) otherwise."""
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_tf32(device, enabled: bool) -> bool:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (process-wide; set once where a trainer or
    command resolves its device). Nothing is touched on other devices, so CPU results do not change.
    Returns whether TF32 is now on. (The legacy flags: reading them after the newer ``fp32_precision``
    setters raises in recent torch, and ``set_float32_matmul_precision`` would also change CPU matmuls.)"""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return bool(enabled)


# Inductor options for the compiled passes. ``size_asserts`` off: with a symbolic token count (the masked
# encoder), torch 2.14's inductor checks the inputs of the CPU attention backward kernel against strides
# specialised to the first shape it saw and fails on the next mask ratio, although the kernel takes any
# strides; compiled outputs and gradients were checked against eager over several token counts
# (tests/test_throughput.py).
COMPILE_OPTIONS = {"size_asserts": False}


def compile_forward(module: nn.Module, dynamic: Optional[bool] = None) -> nn.Module:
    """Replace ``module.forward`` by a ``torch.compile``d one, in place (the state dict, DDP, EMA and
    ``deepcopy`` see the same module: the compiled function is re-bound to a copy). ``dynamic=None``:
    automatic dynamic shapes, so a changing size (the encoder's kept-token count) costs one recompile,
    after which that dimension is symbolic. ``eager_forward`` undoes it."""
    fn = torch.compile(type(module).forward, dynamic=dynamic, options=dict(COMPILE_OPTIONS))
    module.forward = types.MethodType(fn, module)
    return module


def eager_forward(module: nn.Module) -> nn.Module:
    """Undo ``compile_forward`` (the class's eager forward again)."""
    module.__dict__.pop("forward", None)
    return module


def compiled_frames() -> int:
    """Frames torch.compile has compiled in this process so far (first compiles and recompiles). Read from
    dynamo's counters when dynamo is loaded (``torch.compile`` loads it); importing it costs ~1 s, and a
    process that never compiled has compiled nothing."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["frames"]["ok"])


def enable_grad_checkpointing(model: nn.Module) -> List[str]:
    """Turn on gradient checkpointing in every submodule that supports it (a ``grad_checkpointing``
    attribute: the ViT trunks of l-DeTok, the DiT family, MAR and its diffusion head, the AR models);
    returns their names. A model without any is refused, naming it."""
    names = [name or type(model).__name__ for name, m in model.named_modules()
             if isinstance(getattr(m, "grad_checkpointing", None), bool)]
    if not names:
        raise ValueError(f"grad_checkpointing=true: {type(model).__name__} has no gradient checkpointing "
                         "(supported: detok tokenizers and the transformer generators)")
    for _, m in model.named_modules():
        if isinstance(getattr(m, "grad_checkpointing", None), bool):
            m.grad_checkpointing = True
    return names


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The configured decay, or min(decay, (1+n)/(10+n)) with warm-up (the official EMA has none; a
    few-thousand-step CPU run would otherwise still carry most of its initialisation)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def check_resume_config(saved: dict, current: dict, path, defaults: Optional[dict] = None) -> None:
    """Refuse to resume when a field outside ``RESUME_FREE_KEYS`` changed. Fields a checkpoint predates
    count as their ``defaults`` (the config class's), so adding a config field keeps old runs resumable."""
    if defaults is not None:
        saved = {**flatten(defaults), **flatten(saved)}
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
    if dist.is_main:  # what a process killed mid-save left (the writing rank's files)
        ckpts.remove_stale_temps()
    state, path = ckpts.auto_resume(map_location=device)
    for bad in ckpts.skipped:
        log(f"skipped checkpoint {bad}: {ckpts.skip_reasons.get(bad, 'unreadable')}")
    if state is None:
        return None
    check_resume_config(state["config"], asdict(cfg), path, defaults=asdict(type(cfg)()))
    restore_rng_states(state["rngs"], dist, gen, log)
    log(f"resumed from step {int(state['step'])} ({path})")
    return state

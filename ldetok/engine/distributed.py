"""Device selection and torchrun-style distributed helpers.

A single process (no torchrun env vars, or WORLD_SIZE=1) never creates a process group, so every
collective below is a cheap no-op there. Under torchrun: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT_MIN",
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "gather_objects",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "resolve_device",
    "unwrap_model",
]


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (or a torch.device) into a usable device.

    "auto" picks CUDA when present, else CPU. Asking for an absent accelerator is an error, not a
    silent fallback: a run that was meant for a GPU should not quietly take 50x longer.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}: {device!r}")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(
            f"Unknown device {device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "Use device='cpu' or 'auto'."
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise RuntimeError(f"device={device!r} was requested but only {n} CUDA device(s) are visible.")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RuntimeError(f"device={device!r} was requested but MPS is not available.")
    elif dev.type != "cpu":
        raise ValueError(f"Unsupported device {device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return dev


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    distributed: bool


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"Environment variable {name}={raw!r} is not an integer.") from e


# Collectives wait this long for the slowest rank before the group aborts. PyTorch's own default (10
# minutes for NCCL) is shorter than stages where some ranks legitimately wait for others (rank 0 writing
# a latent cache's header, evaluation on rank 0, a slow shared filesystem).
DEFAULT_TIMEOUT_MIN = 240.0


def init_distributed(device: str | torch.device = "auto", timeout_min: float | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and set up the process group if needed.

    ``timeout_min``: how long a collective waits before the group aborts (``DEFAULT_TIMEOUT_MIN`` when
    None); it applies when this call creates the group.
    """
    timeout_min = DEFAULT_TIMEOUT_MIN if timeout_min is None else timeout_min
    if not (isinstance(timeout_min, (int, float)) and timeout_min > 0):
        raise ValueError(f"timeout_min must be a number of minutes > 0, got {timeout_min!r}")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)

    if world_size <= 1:
        # Why no group at all: a 1-process gloo/NCCL group only adds start-up cost and a free-port race.
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True, distributed=False)

    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}).")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun "
                "or export MASTER_ADDR and MASTER_PORT."
            )

    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible on this node."
            )
        if dev.index is not None and dev.index != local_rank:
            warnings.warn(
                f"device={device!r} ignored under torchrun: each process uses cuda:LOCAL_RANK "
                f"(cuda:{local_rank}).",
                stacklevel=2,
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise RuntimeError(
            f"Distributed training on {dev.type!r} is not supported; use CUDA (NCCL) or CPU (gloo)."
        )

    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            # Binding the group to the device lets NCCL set up eagerly and silences barrier warnings.
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size,
            timeout=timedelta(minutes=timeout_min), **kwargs
        )
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=dev,
        is_main=rank == 0,
        distributed=True,
    )


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call always)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


# --------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo wants CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: torch.Tensor | float, mean: bool) -> torch.Tensor | float:
    is_tensor = isinstance(value, torch.Tensor)
    if not is_distributed():
        if is_tensor:
            return value.detach().clone() if not mean or value.is_floating_point() else value.detach().float()
        return float(value)
    t = value.detach() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    if mean and not t.is_floating_point():
        t = t.float()
    orig_device = t.device
    # clone: never reduce in place into the caller's tensor.
    t = t.to(_comm_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if mean:
        t /= dist.get_world_size()
    if is_tensor:
        return t.to(orig_device)
    return float(t.item())


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean across ranks. Returns a new tensor for tensor input (input untouched), a float otherwise."""
    return _all_reduce(value, mean=True)


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor | float:
    """Sum across ranks. Returns a new tensor for tensor input (input untouched), a float otherwise."""
    return _all_reduce(value, mean=False)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to all ranks; returns it everywhere."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' objects as a list indexed by rank (e.g. per-rank RNG states for a checkpoint)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers so parameter names are stable."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model

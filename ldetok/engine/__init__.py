"""Training engine building blocks: devices/distributed, EMA, optimiser and lr schedule,
checkpoints (atomic, resumable), a resumable sampler, and run logging."""

from ldetok.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_save,
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from ldetok.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    gather_objects,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    resolve_device,
    unwrap_model,
)
from ldetok.engine.ema import EMA
from ldetok.engine.logging import Progress, RunLogger, image_grid, read_metrics, to_jsonable
from ldetok.engine.optim import NO_DECAY_KEYWORDS, build_adamw, lr_at, param_groups, scaled_lr, set_lr
from ldetok.engine.sampler import ResumableSampler

__all__ = [
    "EMA",
    "NO_DECAY_KEYWORDS",
    "CheckpointError",
    "CheckpointManager",
    "DistInfo",
    "Progress",
    "ResumableSampler",
    "RunLogger",
    "all_reduce_mean",
    "all_reduce_sum",
    "atomic_save",
    "atomic_write_text",
    "barrier",
    "broadcast_object",
    "build_adamw",
    "capture_rng_state",
    "cleanup",
    "gather_objects",
    "get_rank",
    "get_world_size",
    "image_grid",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "load_checkpoint",
    "lr_at",
    "param_groups",
    "read_metrics",
    "resolve_device",
    "restore_rng_state",
    "scaled_lr",
    "set_lr",
    "to_jsonable",
    "unwrap_model",
]

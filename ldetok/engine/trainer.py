"""The one training skeleton both trainers share: run folder, resume, logging, EMA, checkpoints, the loop,
and the data stream.

A subclass provides four things: ``build`` (data and model, returning the size of the training stream),
``fetch`` (micro-batch data for dataset indices: runs in DataLoader workers, so it draws no randomness),
``micro_step`` (one micro-batch's forward and loss) and ``finish`` (the export). Optional hooks:
``extra_state`` / ``load_extra_state`` (more modules in the checkpoint), ``after_step`` (e.g. the
discriminator's update), ``periodic`` (image grids), ``describe`` (the first log line), ``wrap_ddp``.

Data: micro-batch number ``k`` of this rank is a pure function of ``k`` (``ResumableSampler``), fetched
through a real ``torch.utils.data.DataLoader`` that honours ``run.num_workers`` (pinned memory and
persistent workers on CUDA). Every random draw of training (corruption, posterior samples, flips of
cached latents) comes from one per-rank generator in the training process, and random image flips in a
dataset are seeded per micro-batch, so a resumed run continues bit for bit whatever the worker count.

Exact resume: a checkpoint holds the model, EMA, optimizer(s), extra modules, the step, every RNG state
(python, numpy, torch, CUDA, and the training generator); the data position follows from the step.
Running again with a larger ``max_steps`` extends a finished run (the lr schedule is recomputed).

Faults: the run folder is locked for the trainer's lifetime (``runs.RunFolderLock``, taken by rank 0; a
second process on the folder is refused at once, naming the holder). Checkpoints are verified before they
are trusted (``checkpoint.CheckpointManager``). A step whose loss or gradient norm is not finite is skipped
(no optimizer or EMA update, no discriminator step; its batch and step number are used up, so the data
stream and a resume stay aligned), counted and logged; no checkpoint is written while such a streak lasts,
and ``run.max_nonfinite_steps`` consecutive ones stop the run with ``NonFiniteTrainingError``, saving
nothing. Under DDP the decision is the same on every rank: the gradient norm is taken after DDP's
all-reduce (the same on every rank), and the per-rank loss flags are summed across ranks before deciding.

Throughput (``cfg.run``): TF32 on CUDA unless ``tf32=false``; AdamW's fused kernel when every parameter
is on CUDA; ``grad_checkpointing`` recomputes transformer blocks in backward; ``compile`` compiles the
forward of ``compile_targets()`` (a tokenizer's encoder and decoder, a generator's whole training forward)
with automatic dynamic shapes, and the log's last lines say how many frames were compiled and how many of
them were recompiles (after the first step). Eager stays the default; none of these changes a CPU run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..runs import RunFolderBusy, RunFolderLock, RunLayout
from ..tokenizers import Tokenizer
from .checkpoint import CheckpointManager
from .common import (autocast_ctx, compile_forward, compiled_frames, configure_tf32, eager_forward, ema_decay_at,
                     enable_grad_checkpointing, gather_rng_states, load_resume_state)
from .distributed import (DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed,
                          is_distributed, unwrap_model)
from .ema import EMA
from .logging import Progress, RunLogger
from .optim import build_adamw, lr_at, param_groups, scaled_lr, set_lr
from .sampler import ResumableSampler

__all__ = ["Trainer", "StepBatches", "run_trainer", "NonFiniteTrainingError"]


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient norm; the run stopped."""


class StepBatches(Dataset):
    """Item ``k`` = the data of micro-batch ``k`` of one rank's stream: ``fetch(sampler's indices)``.

    Torch's global RNG is forked and seeded from (seed, k) around each fetch, so a dataset's random
    augmentation (an ImageFolder's flips) is the same in the training process and in any worker.
    """

    def __init__(self, fetch, sampler: ResumableSampler, seed: int):
        self.fetch, self.sampler, self.seed = fetch, sampler, seed

    def __len__(self) -> int:  # not used for iteration: the loader's sampler names the steps
        return 2**62

    def __getitem__(self, k: int):
        bpe = self.sampler.batches_per_epoch
        idx = self.sampler.batch(k // bpe, k % bpe)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + k) % (2**63))
            return self.fetch(idx)


class Trainer:
    """The loop and its bookkeeping; see the module docstring for what a subclass adds."""

    desc = "train"

    def __init__(self, cfg, run_dir, dist: Optional[DistInfo] = None):
        self.cfg = cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.dist = dist or init_distributed(cfg.run.device, timeout_min=cfg.run.dist_timeout_min)
        self.lock = self._lock_run_folder()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _lock_run_folder(self) -> RunFolderLock:
        """Rank 0 takes the folder's lock; every rank learns whether it did (and raises the same error)."""
        lock, error = RunFolderLock(self.run_dir), None
        if self.dist.is_main:
            try:
                lock.acquire()
            except RunFolderBusy as e:
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise RunFolderBusy(error)
        return lock

    def close(self) -> None:
        """Release the run folder (and the logger's files); idempotent. ``fit`` calls it when it ends."""
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        self.lock.release()

    def _setup(self) -> None:
        cfg, d = self.cfg, self.dist
        self.device = d.device
        configure_tf32(self.device, cfg.run.tf32)
        torch.manual_seed(cfg.run.seed + d.rank)
        self.logger = RunLogger(self.run_dir, is_main=d.is_main, tensorboard=cfg.run.tensorboard,
                                wandb_project=cfg.run.wandb_project)
        n_data = self.build()
        self._schedule(n_data)
        self.model = self.build_model()
        if cfg.run.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.compiled: List[nn.Module] = [compile_forward(m) for m in self.compile_targets()] if cfg.run.compile else []
        o = cfg.optim
        self.ema = EMA(self.model, o.ema_decay)
        self.opt = build_adamw(param_groups(self.model, o.weight_decay)[0], self.lr, o.weight_decay,
                               betas=(o.beta1, o.beta2))
        self.extra_optimizers: List[torch.optim.Optimizer] = self.build_extra_optimizers()
        self.ddp = self.wrap_ddp() if d.distributed else self.model
        # the training RNG: one stream per rank, saved in checkpoints
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.run.seed * 1000 + d.rank)
        self.step = 0
        self.nonfinite_total, self.nonfinite_streak = 0, 0  # skipped steps: in all, and in a row now
        self.ckpts = CheckpointManager(RunLayout(self.run_dir).checkpoints, cfg.run.keep_ckpts, cfg.run.milestone_every)

    # ---- subclass hooks -----------------------------------------------------------------------
    def build(self) -> int:  # pragma: no cover - abstract
        """Data (and anything the model needs); returns the number of items in the training stream."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def fetch(self, indices: List[int]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def micro_step(self, batch) -> Tuple[torch.Tensor, Dict[str, float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def build_extra_optimizers(self) -> List[torch.optim.Optimizer]:
        return []

    def compile_targets(self) -> List[nn.Module]:
        """The modules whose forward ``compile=true`` compiles: a tokenizer's encoder and decoder (the
        denoising pass around them draws the corruption, which stays eager), else the model (a generator's
        forward is its training loss)."""
        m = self.model
        if isinstance(m, Tokenizer) and isinstance(getattr(m, "encoder", None), nn.Module) \
                and isinstance(getattr(m, "decoder", None), nn.Module):
            return [m.encoder, m.decoder]
        return [m]

    def wrap_ddp(self) -> nn.Module:
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def after_step(self, logs: Dict[str, float]) -> None:
        pass

    def periodic(self) -> None:
        pass

    def describe(self) -> str:
        return f"training for {self.max_steps} steps, batch {self.cfg.optim.batch_size}, device {self.device}"

    # ---- schedule -----------------------------------------------------------------------------
    def _schedule(self, n_data: int) -> None:
        o, d = self.cfg.optim, self.dist
        if o.batch_size % (d.world_size * o.grad_accum):
            raise ValueError(f"batch_size {o.batch_size} must be divisible by world_size x grad_accum "
                             f"({d.world_size} x {o.grad_accum})")
        self.micro_batch = o.batch_size // (d.world_size * o.grad_accum)
        self.sampler = ResumableSampler(n_data, self.micro_batch, seed=self.cfg.run.seed, rank=d.rank,
                                        world_size=d.world_size)
        self.steps_per_epoch = max(1, n_data // o.batch_size)
        self.max_steps = math.ceil(o.epochs * self.steps_per_epoch) if o.epochs is not None else o.max_steps
        self.warmup_steps = int(o.warmup_frac * self.max_steps)
        self.lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, o.batch_size)

    # ---- data ---------------------------------------------------------------------------------
    def batches(self, start: int) -> Iterator[Any]:
        """Micro-batches ``start, start + 1, ...`` up to the end of the run, through a DataLoader."""
        end = self.max_steps * self.cfg.optim.grad_accum
        workers = self.cfg.run.num_workers
        cuda = self.device.type == "cuda"
        # its own generator: creating the iterator would otherwise draw worker seeds from the global RNG
        loader = DataLoader(StepBatches(self.fetch, self.sampler, self.cfg.run.seed), batch_size=None,
                            sampler=range(start, end), num_workers=workers, pin_memory=cuda,
                            persistent_workers=cuda and workers > 0, generator=torch.Generator())
        return iter(loader)

    # ---- checkpoints --------------------------------------------------------------------------
    def resume(self) -> bool:
        log = self.logger.log_line
        if self.lock.took_over is not None:
            log(f"took over the lock of {self.run_dir} from PID {self.lock.took_over[0]} "
                f"(host {self.lock.took_over[1]}), which no longer runs")
        state = load_resume_state(self.ckpts, self.cfg, self.dist, self.rng, log, self.device)
        for note in self.ckpts.notes:
            log(note)
        if state is None:
            if self.ckpts.skipped:
                log("no checkpoint could be used: the run starts again from step 0")
            return False
        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.load_extra_state(state)
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_steps", 0))
        return True

    def _weights_finite(self) -> bool:
        """Whether every floating-point weight of the model and its EMA is finite (one device sync)."""
        tensors = [t for t in (*unwrap_model(self.model).state_dict().values(), *self.ema.state_dict().values())
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    def save(self) -> None:
        if self.nonfinite_streak:  # the same on every rank: no rank enters the collective below
            self.logger.log_line(f"no checkpoint at step {self.step}: the last {self.nonfinite_streak} step(s) "
                                 "were non-finite")
            return
        rngs = gather_rng_states(self.rng)  # collective: every rank takes part
        if self.dist.is_main:
            self.ckpts.save(self.step, {"step": self.step, "model": unwrap_model(self.model).state_dict(),
                                        "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                                        **self.extra_state(), "config": asdict(self.cfg), "rngs": rngs,
                                        "nonfinite_steps": self.nonfinite_total},
                            finite=self._weights_finite())
        barrier()

    # ---- one optimizer step -------------------------------------------------------------------
    def train_step(self, data: Iterator[Any]) -> dict:
        o = self.cfg.optim
        lr = lr_at(self.step, self.max_steps, self.lr, self.warmup_steps, o.schedule, o.min_lr)
        for opt in (self.opt, *self.extra_optimizers):
            set_lr(opt, lr)
        self.opt.zero_grad(set_to_none=True)
        logs: Dict[str, float] = {}
        losses = []
        for micro in range(o.grad_accum):
            batch = next(data)
            sync = micro == o.grad_accum - 1 or not self.dist.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss, micro_logs = self.micro_step(batch)
                (loss / o.grad_accum).backward()
            losses.append(loss.detach())
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + v / o.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
        finite = self._all_finite(losses, gnorm)
        if finite:
            self.opt.step()
            self.ema.update(self.model, decay=ema_decay_at(self.step, o.ema_decay, o.ema_warmup))
            self.after_step(logs)
        self.step += 1
        logs.update(lr=lr, grad_norm=float(gnorm))
        if finite:
            self.nonfinite_streak = 0
        else:
            self._skip_step(logs)
        return logs

    def _all_finite(self, losses: List[torch.Tensor], gnorm: torch.Tensor) -> bool:
        """Whether this step's losses (every micro-batch, every rank) and gradient norm are finite. The
        norm is of the all-reduced gradients, the same on every rank; each rank's loss flag is summed across
        ranks, so every rank takes the same decision."""
        bad = (~torch.isfinite(torch.stack([x.float().reshape(()) for x in losses]))).any() | ~torch.isfinite(gnorm)
        if self.dist.distributed:
            bad = all_reduce_sum(bad.float()) > 0
        return not bool(bad)

    def _skip_step(self, logs: Dict[str, float]) -> None:
        """Count and log the step just skipped; stop the run after too many in a row."""
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        limit = self.cfg.run.max_nonfinite_steps
        logs["nonfinite_steps"] = self.nonfinite_total
        self.logger.log_line(f"step {self.step}: non-finite loss or gradient norm (loss {logs.get('loss')}, grad norm "
                             f"{logs['grad_norm']}): update skipped ({self.nonfinite_streak} in a row, "
                             f"{self.nonfinite_total} in all; the run stops at {limit} in a row)")
        if self.nonfinite_streak >= limit:
            last = self.ckpts.latest()
            msg = (f"{self.run_dir}: {self.nonfinite_streak} consecutive steps (up to step {self.step}) had a "
                   f"non-finite loss or gradient norm; the run stopped without saving (last checkpoint: "
                   f"{last if last is not None else 'none'}). Lower the learning rate, check the data, or "
                   f"raise max_nonfinite_steps (now {limit})")
            self.logger.log_line(msg)
            raise NonFiniteTrainingError(msg)

    def autocast(self):
        return autocast_ctx(self.device, self.cfg.run.precision)

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_steps`` and export (``finish``); the run folder is released however it ends."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        if not self.resume() and self.dist.is_main:
            self.logger.save_config(cfg)
            self.logger.log_line(self.describe())
        if self.step >= self.max_steps:
            self.logger.log_line(f"run already at step {self.step} >= max_steps {self.max_steps}: nothing to train")
        progress = Progress(self.max_steps, initial=self.step, desc=self.desc, is_main=self.dist.is_main,
                            print_every=cfg.run.log_every, log_fn=self.logger.log_line)
        data = self.batches(self.step * cfg.optim.grad_accum)
        t_last, last_logged, smooth = time.time(), self.step, None
        first_frames = None
        while self.step < self.max_steps:
            logs = self.train_step(data)
            if self.compiled and first_frames is None:
                first_frames = compiled_frames()
            if math.isfinite(logs["loss"]):  # a skipped step's loss would poison the average for good
                smooth = logs["loss"] if smooth is None else 0.98 * smooth + 0.02 * logs["loss"]
            logs["loss_smooth"] = smooth
            progress.update(1, cfg.optim.batch_size, loss=f"{smooth:.4f}" if smooth is not None else "nan")
            if self.step % cfg.run.log_every == 0 or self.step == self.max_steps:
                now = time.time()
                logs.update(img_per_s=progress.images_per_sec,
                            sec_per_step=(now - t_last) / max(1, self.step - last_logged))
                t_last, last_logged = now, self.step
                self.logger.log(self.step, logs)
            self.periodic()
            if self.step % cfg.run.ckpt_every == 0 or self.step == self.max_steps:
                self.save()
        progress.close()
        self.final_loss_smooth = smooth
        if self.compiled:
            self.log_compiles(first_frames)
        for m in self.compiled:  # the export and evaluation run the plain modules
            eager_forward(m)
        return self.finish()

    def log_compiles(self, first_frames: Optional[int]) -> None:
        total = compiled_frames()
        recompiles = total - first_frames if first_frames is not None else 0
        self.logger.log_line(f"torch.compile: {total} frames compiled in this process, {recompiles} of them "
                             f"after the first step (recompiles: new token counts, eval/train switches)")
        self.compile_stats = {"frames": total, "recompiles": recompiles}


def run_trainer(trainer_cls, cfg, run_dir) -> dict:
    """Train (or resume, or extend) a run in ``run_dir``; a caller's process group (e.g. ``reproduce``
    under torchrun) outlives the run, one made here is closed."""
    owns_group = not is_distributed()
    try:
        trainer = trainer_cls(cfg, run_dir)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        if owns_group:
            cleanup()

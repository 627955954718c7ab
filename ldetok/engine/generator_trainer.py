"""Generator training on tokenizer latents, through the same engine pieces as the tokenizer trainer.

Latents come from a latent cache (encode once, sample from the posterior moments each step) or from
online tokenization (``tokenize(x, sample=True)`` each step), both normalised with the tokenizer's own
per-channel statistics; a run refuses a cache built from another tokenizer. EMA (0.9999 in the paper's
recipe), ``torchrun`` DDP, exact resume (model, EMA, optimizer, step, per-rank RNG streams), logging.
At the end the EMA generator is exported to ``run_dir/generator/`` with a sample grid.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import GeneratorTrainConfig
from ..latents import LatentCache, build_latent_cache
from ..runs import RunLayout, load_tokenizer, run_train_config, save_generator
from .checkpoint import CheckpointManager
from .common import autocast_ctx, ema_decay_at, gather_rng_states, load_resume_state
from .distributed import DistInfo, barrier, cleanup, init_distributed, is_distributed, unwrap_model
from .ema import EMA
from .logging import Progress, RunLogger
from .optim import build_adamw, lr_at, param_groups, set_lr
from .sampler import ResumableSampler
from .stats import fetch_batch

__all__ = ["GeneratorTrainer", "train_generator"]


class GeneratorTrainer:
    def __init__(self, cfg: GeneratorTrainConfig, run_dir, dist: Optional[DistInfo] = None):
        from ..data import build_dataset
        from ..generators import build_generator

        self.cfg = cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.dist = d = dist or init_distributed(cfg.device)
        self.device = d.device
        torch.manual_seed(cfg.seed + d.rank)
        self.logger = RunLogger(self.run_dir, is_main=d.is_main, tensorboard=cfg.tensorboard,
                                wandb_project=cfg.wandb_project)

        # ---- latents --------------------------------------------------------------------------
        tok_run = Path(cfg.tokenizer)
        self.tokenizer = load_tokenizer(tok_run).to(self.device).eval().requires_grad_(False)
        if not self.tokenizer.has_stats:
            raise ValueError(f"{tok_run}: the tokenizer has no latent statistics (train it to the end first)")
        tcfg = run_train_config(tok_run)
        self.latent_shape = self.tokenizer.latent_shape(tcfg["image_size"])
        if cfg.latents == "cache":
            if d.is_main:
                build_latent_cache(tok_run, split="train", flip=cfg.flip, out_dir=cfg.cache_dir, device=self.device,
                                   verbose=True)
            barrier()
            self.cache = LatentCache(cfg.cache_dir or RunLayout(tok_run).latent_cache(tcfg["dataset"], "train", cfg.flip))
            self.cache.check_tokenizer(self.tokenizer, tok_run)
            n_data, num_classes = len(self.cache), self.cache.num_classes
        else:
            self.cache = None
            self.images = build_dataset(tcfg["dataset"], split="train", image_size=tcfg["image_size"],
                                        channels=tcfg["in_channels"], root=tcfg.get("data_root"))
            n_data, num_classes = len(self.images), int(getattr(self.images, "num_classes", 0))
        self.num_classes = 0 if cfg.unconditional else num_classes

        # ---- schedule ---------------------------------------------------------------------------
        if cfg.batch_size % (d.world_size * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size x grad_accum")
        self.micro_batch = cfg.batch_size // (d.world_size * cfg.grad_accum)
        self.sampler = ResumableSampler(n_data, self.micro_batch, seed=cfg.seed, rank=d.rank, world_size=d.world_size)
        steps_per_epoch = max(1, n_data // cfg.batch_size)
        self.max_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs is not None else cfg.max_steps
        self.warmup_steps = int(cfg.warmup_frac * self.max_steps)

        # ---- model ------------------------------------------------------------------------------
        extra = json.loads(cfg.model_args) if cfg.model_args else {}
        self.model = build_generator(cfg.model, latent_shape=self.latent_shape, num_classes=self.num_classes,
                                     class_dropout=cfg.class_dropout, **extra).to(self.device).train()
        self.ema = EMA(self.model, cfg.ema_decay)
        self.opt = build_adamw(param_groups(self.model, cfg.weight_decay)[0], cfg.lr, cfg.weight_decay,
                               betas=(cfg.beta1, cfg.beta2))
        self.ddp = self.model
        if d.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.local_rank] if self.device.type == "cuda" else None)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + d.rank)
        self.step = 0
        self.ckpts = CheckpointManager(RunLayout(self.run_dir).checkpoints, cfg.keep_ckpts, cfg.milestone_every)
        self.tok_run = tok_run

    # ---- data -------------------------------------------------------------------------------
    def batch(self, k: int):
        bpe = self.sampler.batches_per_epoch
        idx = self.sampler.batch(k // bpe, k % bpe)
        if self.cache is not None:
            return self.cache.batch(idx, generator=self.gen, device=self.device)
        x, y = fetch_batch(self.images, idx)
        x = x.to(self.device)
        if self.cfg.flip:
            flip = (torch.rand(len(idx), generator=self.gen, device=self.gen.device) < 0.5).to(self.device)
            x = torch.where(flip.view(-1, 1, 1, 1), torch.flip(x, dims=[3]), x)
        with torch.no_grad(), autocast_ctx(self.device, self.cfg.precision):
            z = self.tokenizer.tokenize(x, sample=True, generator=self.gen).float()
        return z, y.to(self.device)

    # ---- checkpoints --------------------------------------------------------------------------
    def resume(self) -> bool:
        state = load_resume_state(self.ckpts, self.cfg, self.dist, self.gen, self.logger.log_line, self.device)
        if state is None:
            return False
        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        return True

    def save(self) -> None:
        rngs = gather_rng_states(self.gen)
        if self.dist.is_main:
            self.ckpts.save(self.step, {"step": self.step, "model": unwrap_model(self.model).state_dict(),
                                        "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                                        "config": asdict(self.cfg), "rngs": rngs})
        barrier()

    # ---- training ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, self.max_steps, cfg.lr, self.warmup_steps, cfg.schedule, cfg.min_lr)
        set_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            z, y = self.batch(self.step * cfg.grad_accum + micro)
            labels = None if self.num_classes == 0 else y
            sync = micro == cfg.grad_accum - 1 or not self.dist.distributed
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                with autocast_ctx(self.device, cfg.precision):
                    loss = self.ddp(z, labels, generator=self.gen)
                (loss.float() / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.ema.update(self.model, decay=ema_decay_at(self.step, cfg.ema_decay, cfg.ema_warmup))
        self.step += 1
        return {"loss": total, "lr": lr, "grad_norm": float(gnorm)}

    @torch.no_grad()
    def sample_grid(self, name: str, n_per_class: int = 8) -> Optional[Path]:
        """A grid of EMA samples, one row per class (up to 10 classes), decoded by the tokenizer."""
        if not self.dist.is_main:
            return None
        from ..viz import save_grid

        gen = self.ema.module(self.model)
        classes = list(range(min(10, self.num_classes))) if self.num_classes else [None]
        g = torch.Generator(device=self.device).manual_seed(1234)
        imgs = []
        for c in classes:
            labels = None if c is None else torch.full((n_per_class,), c, dtype=torch.long, device=self.device)
            z = gen.sample(n_per_class, labels=labels, cfg=self.cfg.sample_cfg, steps=self.cfg.sample_steps,
                           temperature=self.cfg.sample_temperature, generator=g)
            imgs.append(self.tokenizer.detokenize(z))
        path = RunLayout(self.run_dir).image(name)
        save_grid(torch.cat(imgs), path, nrow=n_per_class)
        return path

    def fit(self) -> dict:
        cfg = self.cfg
        if not self.resume() and self.dist.is_main:
            self.logger.save_config(cfg)
            self.logger.log_line(
                f"training {cfg.model} ({self.model.num_params() / 1e6:.2f}M params) on latents "
                f"{self.latent_shape} from {self.tok_run} ({cfg.latents}), {self.max_steps} steps, batch "
                f"{cfg.batch_size}, lr {cfg.lr:.2e} ({cfg.schedule}), device {self.device}")
        progress = Progress(self.max_steps, initial=self.step, desc=cfg.model, is_main=self.dist.is_main,
                            print_every=cfg.log_every, log_fn=self.logger.log_line)
        ema_loss = None
        while self.step < self.max_steps:
            t0 = time.time()
            logs = self.train_step()
            ema_loss = logs["loss"] if ema_loss is None else 0.98 * ema_loss + 0.02 * logs["loss"]
            logs["loss_smooth"] = ema_loss
            progress.update(1, cfg.batch_size, loss=f"{ema_loss:.4f}")
            if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                logs.update(img_per_s=progress.images_per_sec, sec_per_step=time.time() - t0)
                self.logger.log(self.step, logs)
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid(f"samples_{self.step:09d}")
            if self.step % cfg.ckpt_every == 0 or self.step == self.max_steps:
                self.save()
        progress.close()
        summary = {"step": self.step, "final_loss_smooth": ema_loss}
        if self.dist.is_main:
            gen = self.ema.module(self.model)
            save_generator(gen, RunLayout(self.run_dir).generator,
                           {"name": cfg.model, "tokenizer": str(self.tok_run.resolve()), "step": self.step,
                            "ema": True, "latent_shape": list(self.latent_shape), "num_classes": self.num_classes,
                            "final_loss_smooth": ema_loss, "train_config": asdict(cfg)})
            grid = self.sample_grid("samples_final")
            self.logger.log_line(f"exported the EMA generator to {RunLayout(self.run_dir).generator}; samples: {grid}")
        barrier()
        self.logger.close()
        return summary


def train_generator(cfg: GeneratorTrainConfig, run_dir) -> dict:
    owns_group = not is_distributed()  # a caller's process group (e.g. ldetok reproduce) outlives the run
    trainer = GeneratorTrainer(cfg, run_dir)
    try:
        return trainer.fit()
    finally:
        if owns_group:
            cleanup()

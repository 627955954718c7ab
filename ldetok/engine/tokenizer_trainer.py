"""Tokenizer training: the paper's recipe on a GPU cluster and its tiny version on a laptop, one loop.

Step order (official): zero grads, set lr for both optimizers, forward + tokenizer loss, backward,
clip, step, EMA update; then, once the GAN is on, the discriminator's hinge loss on detached
reconstructions and its own step. bf16 autocast on CUDA only. ``torchrun`` for several processes
(NCCL on CUDA, gloo on CPU); the discriminator's gradients are all-reduced by hand (it is small, and
this keeps its state-dict free of DDP prefixes).

Exact resume: a checkpoint holds the model, EMA, both optimizers, the discriminator, the step, every
RNG state (python, numpy, torch, CUDA, and the corruption generator) and the data position, so a
resumed run continues bit for bit where it stopped. Running again with a larger ``max_steps`` extends
a finished run (the lr schedule is recomputed for the new length).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist_
import torch.nn as nn

from ..config import TokenizerTrainConfig
from ..data import build_dataset
from ..losses import LossConfig, TokenizerLoss
from ..runs import RunLayout, load_tokenizer, save_tokenizer
from ..tokenizers import Tokenizer, build, load_official_detok
from .checkpoint import CheckpointManager
from .common import autocast_ctx, ema_decay_at, gather_rng_states, load_resume_state
from .distributed import DistInfo, barrier, cleanup, init_distributed, is_distributed, unwrap_model
from .ema import EMA
from .logging import Progress, RunLogger, image_grid
from .optim import build_adamw, lr_at, param_groups, scaled_lr, set_lr
from .sampler import ResumableSampler
from .stats import collect_latent_stats, fetch_batch

__all__ = ["train_tokenizer", "TokenizerTrainer"]


def _load_init(path: str, cfg: TokenizerTrainConfig) -> Tokenizer:
    """The tokenizer a decoder fine-tuning starts from: a run / exported tokenizer, or a released .pth."""
    p = Path(path)
    if p.suffix in (".pth", ".pt"):
        return load_official_detok(p, model=cfg.model, **cfg.model_overrides())
    return load_tokenizer(p)


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerTrainConfig, run_dir, dist: Optional[DistInfo] = None):
        self.cfg = cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.dist = dist or init_distributed(cfg.device)
        self.device = self.dist.device
        d = self.dist
        torch.manual_seed(cfg.seed + d.rank)

        # ---- data --------------------------------------------------------------------------
        self.train_set = build_dataset(cfg.dataset, split="train", image_size=cfg.image_size,
                                       channels=cfg.in_channels, root=cfg.data_root)
        self.eval_set = build_dataset(cfg.dataset, split=cfg.eval_split, image_size=cfg.image_size,
                                      channels=cfg.in_channels, root=cfg.data_root)
        if cfg.batch_size % (d.world_size * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size x grad_accum "
                             f"({d.world_size} x {cfg.grad_accum})")
        self.micro_batch = cfg.batch_size // (d.world_size * cfg.grad_accum)
        self.sampler = ResumableSampler(len(self.train_set), self.micro_batch, seed=cfg.seed,
                                        rank=d.rank, world_size=d.world_size)
        steps_per_epoch = max(1, len(self.train_set) // cfg.batch_size)
        self.steps_per_epoch = steps_per_epoch
        self.max_steps = (math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs is not None else cfg.max_steps)
        self.warmup_steps = int(cfg.warmup_frac * self.max_steps)
        self.disc_start = (self.max_steps + 1 if cfg.disc_start_epoch is None
                           else int(round(cfg.disc_start_epoch * steps_per_epoch)))
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, cfg.batch_size)

        # ---- model, loss, EMA, optimizers -----------------------------------------------------
        if cfg.stage == "decoder_ft":
            tok = _load_init(cfg.init_from, cfg)
            tok.cfg.gamma, tok.cfg.max_mask_ratio = 0.0, 0.0  # plain reconstruction
            tok.freeze_all_but_decoder()
        else:
            tok = build(cfg.model, **cfg.model_overrides())
        self.model = tok.to(self.device).train()
        self.loss = TokenizerLoss(LossConfig(
            pixel_loss=cfg.pixel_loss, kl_weight=cfg.kl_weight, perceptual=cfg.perceptual,
            perceptual_weight=cfg.perceptual_weight, disc_weight=cfg.disc_weight if cfg.disc_start_epoch is not None else 0.0,
            disc_start=max(0, self.disc_start), adaptive_disc_weight=cfg.adaptive_disc_weight,
            lecam_weight=cfg.lecam_weight, image_channels=cfg.in_channels)).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        groups, _ = param_groups(self.model, cfg.weight_decay)
        self.opt = build_adamw(groups, self.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        self.disc_opt = build_adamw(param_groups(self.loss.discriminator, cfg.weight_decay)[0], self.lr,
                                    cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        self.ddp = self.model
        if d.distributed:
            # With masking on, a step that draws ratio 0 leaves the mask token unused (and each rank
            # draws its own ratio, as the official per-GPU draw), so DDP must look for unused params.
            masking = getattr(getattr(self.model, "cfg", None), "max_mask_ratio", 0.0) > 0
            if not masking:  # without masking the mask token never gets a gradient: DDP must not wait for it
                for name, p in self.model.named_parameters():
                    if name.endswith("mask_token"):
                        p.requires_grad_(False)
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=masking)
        # the corruption RNG: one stream per rank, saved in checkpoints
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + d.rank)
        self.step = 0
        self.ckpts = CheckpointManager(RunLayout(self.run_dir).checkpoints, cfg.keep_ckpts, cfg.milestone_every)
        self.logger = RunLogger(self.run_dir, is_main=d.is_main, tensorboard=cfg.tensorboard,
                                wandb_project=cfg.wandb_project)
        x_vis, _ = fetch_batch(self.eval_set, list(range(min(16, len(self.eval_set)))))
        self.x_vis = x_vis.to(self.device)

    # ---- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "model": unwrap_model(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "discriminator": self.loss.state_dict(),
            "disc_optimizer": self.disc_opt.state_dict(),
            "config": asdict(self.cfg),
        }

    def resume(self) -> bool:
        state = load_resume_state(self.ckpts, self.cfg, self.dist, self.gen, self.logger.log_line, self.device)
        if state is None:
            return False
        unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["discriminator"])
        self.disc_opt.load_state_dict(state["disc_optimizer"])
        self.step = int(state["step"])
        return True

    def save(self) -> None:
        rngs = gather_rng_states(self.gen)  # collective: every rank takes part
        if self.dist.is_main:
            self.ckpts.save(self.step, {**self.state(), "rngs": rngs})
        barrier()

    # ---- one optimizer step -----------------------------------------------------------------
    def batch(self, k: int):
        """Micro-batch number ``k`` of this rank's stream (a pure function of k: resumable)."""
        bpe = self.sampler.batches_per_epoch
        idx = self.sampler.batch(k // bpe, k % bpe)
        x, _ = fetch_batch(self.train_set, idx)
        return x.to(self.device, non_blocking=True)

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, self.max_steps, self.lr, self.warmup_steps, cfg.schedule, cfg.min_lr)
        set_lr(self.opt, lr)
        set_lr(self.disc_opt, lr)
        self.opt.zero_grad(set_to_none=True)
        logs_acc: dict = {}
        xs, recons = [], []
        last_layer = unwrap_model(self.model).decoder.conv_out.weight if hasattr(unwrap_model(self.model), "decoder") else None
        for micro in range(cfg.grad_accum):
            x = self.batch(self.step * cfg.grad_accum + micro)
            sync = micro == cfg.grad_accum - 1 or not self.dist.distributed
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with autocast_ctx(self.device, cfg.precision):
                    out = self.ddp(x, generator=self.gen)
                loss, logs = self.loss.generator_loss(x, out.recon, out.posterior, self.step, last_layer)
                (loss / cfg.grad_accum).backward()
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / cfg.grad_accum
            xs.append(x)
            recons.append(out.recon.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.ema.update(self.model, decay=ema_decay_at(self.step, cfg.ema_decay, cfg.ema_warmup))
        if self.loss.disc_active(self.step):
            self.disc_opt.zero_grad(set_to_none=True)
            for x, r in zip(xs, recons):
                d_loss, d_logs = self.loss.discriminator_loss(x, r, self.step)
                (d_loss / cfg.grad_accum).backward()
                for k, v in d_logs.items():
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / cfg.grad_accum
            if self.dist.distributed:
                for p in self.loss.discriminator.parameters():
                    if p.grad is not None:
                        dist_.all_reduce(p.grad)
                        p.grad /= self.dist.world_size
            self.disc_opt.step()
        self.step += 1
        logs_acc.update(lr=lr, grad_norm=float(gnorm))
        return logs_acc

    # ---- loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self) -> None:
        if not self.dist.is_main:
            return
        with self.ema.apply_to(self.model):
            self.model.eval()
            rec = self.model.reconstruct(self.x_vis)
            self.model.train()
        self.logger.log_images(self.step, "reconstruction", image_grid(torch.cat([self.x_vis, rec]), nrow=len(self.x_vis)))

    def fit(self) -> dict:
        cfg = self.cfg
        resumed = self.resume()
        if not resumed and self.dist.is_main:
            self.logger.save_config(self.cfg)
            self.logger.log_line(
                f"training {cfg.model} ({unwrap_model(self.model).num_params() / 1e6:.2f}M params) on {cfg.dataset} "
                f"for {self.max_steps} steps, batch {cfg.batch_size} ({self.dist.world_size} proc x {self.micro_batch}"
                f" x accum {cfg.grad_accum}), lr {self.lr:.2e}, device {self.device}")
        if self.step >= self.max_steps:
            self.logger.log_line(f"run already at step {self.step} >= max_steps {self.max_steps}: nothing to train")
        progress = Progress(self.max_steps, initial=self.step, desc="tokenizer", is_main=self.dist.is_main,
                            print_every=cfg.log_every, log_fn=self.logger.log_line)
        t_last = time.time()
        while self.step < self.max_steps:
            logs = self.train_step()
            progress.update(1, cfg.batch_size, loss=f"{logs['loss']:.4f}")
            if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                now = time.time()
                logs["img_per_s"] = progress.images_per_sec
                logs["sec_per_step"] = (now - t_last) / cfg.log_every
                t_last = now
                self.logger.log(self.step, logs)
            if cfg.image_every and self.step % cfg.image_every == 0:
                self.log_images()
            if self.step % cfg.ckpt_every == 0 or self.step == self.max_steps:
                self.save()
        progress.close()
        return self.finish()

    def finish(self) -> dict:
        """EMA tokenizer + latent statistics -> ``run_dir/tokenizer`` (what generators and eval load)."""
        tok = self.ema.module(self.model).to(self.device).eval()
        mean, std = collect_latent_stats(tok, self.train_set, self.cfg.stats_images, device=self.device)
        summary = {"step": self.step, "latent_mean": mean.tolist(), "latent_std": std.tolist()}
        if self.dist.is_main:
            save_tokenizer(tok, RunLayout(self.run_dir).tokenizer,
                           extra={"step": self.step, "ema": True, "stats_images": self.cfg.stats_images,
                                  "train_config": asdict(self.cfg)})
            self.log_images()
            self.logger.log_line(f"exported the EMA tokenizer with latent statistics to {RunLayout(self.run_dir).tokenizer}")
        barrier()
        self.logger.close()
        return summary


def train_tokenizer(cfg: TokenizerTrainConfig, run_dir) -> dict:
    """Train (or resume, or extend) a tokenizer run in ``run_dir``; returns a summary."""
    owns_group = not is_distributed()  # a caller's process group (e.g. ldetok reproduce) outlives the run
    trainer = TokenizerTrainer(cfg, run_dir)
    try:
        return trainer.fit()
    finally:
        if owns_group:
            cleanup()

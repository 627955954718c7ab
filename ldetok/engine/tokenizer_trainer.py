"""Tokenizer training: the paper's recipe on a GPU cluster and its tiny version on a laptop, one loop
(``ldetok.engine.trainer``).

Step order (official): zero grads, set lr for both optimizers, the denoising forward pass
(``ldetok.corruption.denoising_forward``: corruption drawn from the run's ``corruption`` config, off for
decoder fine-tuning) + tokenizer loss, backward, clip, step, EMA update; then, once the GAN is on, the
discriminator's hinge loss on detached reconstructions and its own step. bf16 autocast on CUDA only.
The discriminator's gradients are all-reduced by hand under torchrun (it is small, and this keeps its
state-dict free of DDP prefixes).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist_
import torch.nn as nn

from ..config import TokenizerTrainConfig
from ..corruption import DenoisingPass
from ..data import build_dataset, report_skips_to, skip_summary
from ..losses import LossConfig, TokenizerLoss
from ..runs import RunLayout, load_tokenizer, run_corruption, save_tokenizer
from ..tokenizers import Tokenizer, build_sized, load_official_detok
from .distributed import barrier, unwrap_model
from .logging import image_grid
from .optim import build_adamw, param_groups
from .stats import collect_latent_stats, fetch_batch, stats_source
from .trainer import Trainer, run_trainer

__all__ = ["train_tokenizer", "TokenizerTrainer"]


def _load_init(path: str, cfg: TokenizerTrainConfig) -> Tokenizer:
    """The tokenizer a decoder fine-tuning starts from: a run / exported tokenizer, or a released .pth."""
    p = Path(path)
    m = cfg.model
    if p.suffix in (".pth", ".pt"):
        return load_official_detok(p, model=m.name, image_size=m.image_size, patch_size=m.patch_size,
                                   in_channels=m.in_channels, latent_channels=m.latent_channels)
    return load_tokenizer(p)


class TokenizerTrainer(Trainer):
    desc = "tokenizer"

    def build(self) -> int:
        cfg = self.cfg
        kw = dict(image_size=cfg.model.image_size, channels=cfg.model.in_channels, root=cfg.data.data_root)
        self.train_set = build_dataset(cfg.data.dataset, split="train", **kw)
        self.eval_set = build_dataset(cfg.data.dataset, split=cfg.data.eval_split, **kw)
        for ds in (self.train_set, self.eval_set):  # unreadable images are named in the run's log too
            report_skips_to(ds, self.logger.log_line)
        self.corruption = cfg.train_corruption()
        # what the exported tokenizer's latents were trained with: the run's own settings, or for a decoder
        # fine-tuning those of the run whose encoder it freezes (a released .pth carries none: the config's)
        self.encoder_corruption = cfg.corruption
        if cfg.stage == "decoder_ft" and Path(cfg.init_from).suffix not in (".pth", ".pt"):
            self.encoder_corruption = run_corruption(cfg.init_from)
        return len(self.train_set)

    def build_model(self) -> nn.Module:
        cfg, m = self.cfg, self.cfg.model
        if cfg.stage == "decoder_ft":
            tok = _load_init(cfg.init_from, cfg)
            tok.freeze_all_but_decoder()
        else:
            tok = build_sized(m.name, m.image_size, m.patch_size, m.in_channels, m.latent_channels)
        tok = tok.to(self.device).train()
        self.disc_start = (self.max_steps + 1 if cfg.losses.disc_start_epoch is None
                           else int(round(cfg.losses.disc_start_epoch * self.steps_per_epoch)))
        lc = cfg.losses
        self.loss = TokenizerLoss(LossConfig(
            pixel_loss=lc.pixel_loss, kl_weight=lc.kl_weight, perceptual=lc.perceptual,
            perceptual_weight=lc.perceptual_weight, disc_weight=lc.disc_weight if lc.disc_start_epoch is not None else 0.0,
            disc_start=max(0, self.disc_start), adaptive_disc_weight=lc.adaptive_disc_weight,
            lecam_weight=lc.lecam_weight, image_channels=m.in_channels)).to(self.device)
        x_vis, _ = fetch_batch(self.eval_set, list(range(min(16, len(self.eval_set)))))
        self.x_vis = x_vis.to(self.device)
        self.pass_ = DenoisingPass(tok, self.corruption)
        return tok

    def build_extra_optimizers(self) -> List[torch.optim.Optimizer]:
        o = self.cfg.optim
        self.disc_opt = build_adamw(param_groups(self.loss.discriminator, o.weight_decay)[0], self.lr,
                                    o.weight_decay, betas=(o.beta1, o.beta2))
        return [self.disc_opt]

    def wrap_ddp(self) -> nn.Module:
        # With masking on, a step that draws ratio 0 leaves the mask token unused (and each rank draws its
        # own ratio, as the official per-GPU draw), so DDP must look for unused parameters; without masking
        # the mask token never gets a gradient, so DDP must not wait for it.
        masking = self.corruption.masking_on
        if not masking:
            for name, p in self.model.named_parameters():
                if name.endswith("mask_token"):
                    p.requires_grad_(False)
        return nn.parallel.DistributedDataParallel(
            self.pass_, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None,
            find_unused_parameters=masking)

    def describe(self) -> str:
        cfg = self.cfg
        return (f"training {cfg.model.name} ({unwrap_model(self.model).num_params() / 1e6:.2f}M params) on "
                f"{cfg.data.dataset} for {self.max_steps} steps, batch {cfg.optim.batch_size} "
                f"({self.dist.world_size} proc x {self.micro_batch} x accum {cfg.optim.grad_accum}), lr {self.lr:.2e}, "
                f"corruption: {self.corruption.describe()}, device {self.device}")

    # ---- checkpoints ------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"discriminator": self.loss.state_dict(), "disc_optimizer": self.disc_opt.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.loss.load_state_dict(state["discriminator"])
        self.disc_opt.load_state_dict(state["disc_optimizer"])

    # ---- one step -----------------------------------------------------------------------------
    def fetch(self, indices):
        return fetch_batch(self.train_set, indices)[0]

    def micro_step(self, x):
        x = x.to(self.device, non_blocking=True)
        fwd = self.ddp if self.dist.distributed else self.pass_  # DDP wraps the denoising pass
        last_layer = self.model.decoder.conv_out.weight if hasattr(self.model, "decoder") else None
        with self.autocast():
            out = fwd(x, generator=self.rng)
        loss, logs = self.loss.generator_loss(x, out.recon, out.posterior, self.step, last_layer)
        self._pairs.append((x, out.recon.detach()))
        return loss, logs

    def train_step(self, data) -> dict:
        self._pairs = []
        return super().train_step(data)

    def after_step(self, logs: dict) -> None:
        """The discriminator's update, on this step's detached reconstructions, once the GAN is on."""
        if not self.loss.disc_active(self.step):
            return
        accum = self.cfg.optim.grad_accum
        self.disc_opt.zero_grad(set_to_none=True)
        for x, r in self._pairs:
            d_loss, d_logs = self.loss.discriminator_loss(x, r, self.step)
            (d_loss / accum).backward()
            for k, v in d_logs.items():
                logs[k] = logs.get(k, 0.0) + v / accum
        if self.dist.distributed:
            for p in self.loss.discriminator.parameters():
                if p.grad is not None:
                    dist_.all_reduce(p.grad)
                    p.grad /= self.dist.world_size
        self.disc_opt.step()

    # ---- images and export ------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self) -> None:
        if not self.dist.is_main:
            return
        with self.ema.apply_to(self.model):
            self.model.eval()
            rec = self.model.reconstruct(self.x_vis)
            self.model.train()
        self.logger.log_images(self.step, "reconstruction", image_grid(torch.cat([self.x_vis, rec]), nrow=len(self.x_vis)))

    def periodic(self) -> None:
        if self.cfg.image_every and self.step % self.cfg.image_every == 0:
            self.log_images()

    def finish(self) -> dict:
        """EMA tokenizer + latent statistics -> ``run_dir/tokenizer`` (what generators and eval load)."""
        tok = self.ema.module(self.model).to(self.device).eval()
        stats_set = self.train_set
        if getattr(stats_set, "train", False):  # an ImageFolder flips at random in training: not for statistics
            stats_set = copy.copy(stats_set)
            stats_set.train = False
        mean, std = collect_latent_stats(tok, stats_set, self.cfg.stats_images, device=self.device)
        summary = {"step": self.step, "latent_mean": mean.tolist(), "latent_std": std.tolist()}
        if self.dist.is_main:
            save_tokenizer(tok, RunLayout(self.run_dir).tokenizer,
                           extra={"step": self.step, "ema": True, "stats_images": self.cfg.stats_images,
                                  "stats_source": stats_source(len(stats_set), self.cfg.stats_images),
                                  "train_config": asdict(self.cfg), "corruption": self.encoder_corruption.to_dict()})
            self.log_images()
            self.logger.log_line(f"exported the EMA tokenizer with latent statistics to {RunLayout(self.run_dir).tokenizer}")
            for line in filter(None, map(skip_summary, (self.train_set, self.eval_set))):
                self.logger.log_line(line)
        barrier()
        self.logger.close()
        return summary


def train_tokenizer(cfg: TokenizerTrainConfig, run_dir) -> dict:
    """Train (or resume, or extend) a tokenizer run in ``run_dir``; returns a summary."""
    return run_trainer(TokenizerTrainer, cfg, run_dir)

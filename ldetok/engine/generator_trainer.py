"""Generator training on tokenizer latents, on the shared training skeleton (``ldetok.engine.trainer``).

Latents come from a latent cache (encode once, sample from the posterior moments each step) or from
online tokenization (``tokenize(x, sample=True)`` each step), both normalised with the tokenizer's own
per-channel statistics; a run refuses a cache built from another tokenizer. EMA (0.9999 in the paper's
recipe), ``torchrun`` DDP, exact resume (model, EMA, optimizer, step, per-rank RNG streams), logging.
At the end the EMA generator is exported to ``run_dir/generator/`` with a sample grid.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import GeneratorTrainConfig
from ..data import build_dataset, report_skips_to, skip_summary
from ..generators import build_generator
from ..latents import build_latent_cache
from ..runs import RunLayout, load_tokenizer, run_train_config, save_generator
from ..viz import save_grid
from .distributed import barrier
from .stats import fetch_batch
from .trainer import Trainer, run_trainer

__all__ = ["GeneratorTrainer", "train_generator"]


class GeneratorTrainer(Trainer):
    def build(self) -> int:
        cfg, d = self.cfg, self.dist
        self.desc = cfg.model
        tok_run = self.tok_run = Path(cfg.tokenizer)
        self.tokenizer = load_tokenizer(tok_run).to(self.device).eval().requires_grad_(False)
        if not self.tokenizer.has_stats:
            raise ValueError(f"{tok_run}: the tokenizer has no latent statistics (train it to the end first)")
        tcfg = run_train_config(tok_run)
        self.latent_shape = self.tokenizer.latent_shape(tcfg.model.image_size)
        if cfg.latents == "cache":
            # every rank encodes its share of the shards (rank 0 alone would take hours on ImageNet)
            self.cache = build_latent_cache(tok_run, split="train", flip=cfg.flip, out_dir=cfg.cache_dir,
                                            device=self.device, num_workers=cfg.run.num_workers, verbose=d.is_main)
            self.cache.check_tokenizer(self.tokenizer, tok_run)
            n_data, num_classes = len(self.cache), self.cache.num_classes
        else:
            self.cache = None
            self.images = build_dataset(tcfg.data.dataset, split="train", image_size=tcfg.model.image_size,
                                        channels=tcfg.model.in_channels, root=tcfg.data.data_root)
            report_skips_to(self.images, self.logger.log_line)
            n_data, num_classes = len(self.images), int(getattr(self.images, "num_classes", 0))
        self.num_classes = 0 if cfg.unconditional else num_classes
        return n_data

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        extra = json.loads(cfg.model_args) if cfg.model_args else {}
        return build_generator(cfg.model, latent_shape=self.latent_shape, num_classes=self.num_classes,
                               class_dropout=cfg.class_dropout, **extra).to(self.device).train()

    def describe(self) -> str:
        cfg = self.cfg
        return (f"training {cfg.model} ({self.model.num_params() / 1e6:.2f}M params) on latents "
                f"{self.latent_shape} from {self.tok_run} ({cfg.latents}), {self.max_steps} steps, batch "
                f"{cfg.optim.batch_size}, lr {self.lr:.2e} ({cfg.optim.schedule}), device {self.device}")

    # ---- data -------------------------------------------------------------------------------
    def fetch(self, indices):
        """Cached posterior moments, or images, with labels (no randomness: this runs in workers)."""
        if self.cache is not None:
            return self.cache.read(indices)
        return fetch_batch(self.images, indices)

    def latents(self, batch):
        """Normalised latents and labels on the device; the random draws use the training generator."""
        if self.cache is not None:
            return self.cache.sample(batch, generator=self.rng, device=self.device)
        x, y = batch
        x = x.to(self.device)
        if self.cfg.flip:
            flip = (torch.rand(len(x), generator=self.rng, device=self.rng.device) < 0.5).to(self.device)
            x = torch.where(flip.view(-1, 1, 1, 1), torch.flip(x, dims=[3]), x)
        with torch.no_grad(), self.autocast():
            z = self.tokenizer.tokenize(x, sample=True, generator=self.rng).float()
        return z, y.to(self.device)

    def micro_step(self, batch):
        z, y = self.latents(batch)
        labels = None if self.num_classes == 0 else y
        with self.autocast():
            loss = self.ddp(z, labels, generator=self.rng)
        loss = loss.float()
        return loss, {"loss": float(loss.detach())}

    # ---- samples and export -------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, name: str, n_per_class: int = 8) -> Optional[Path]:
        """A grid of EMA samples, one row per class (up to 10 classes), decoded by the tokenizer."""
        if not self.dist.is_main:
            return None
        cfg = self.cfg
        gen = self.ema.module(self.model)
        classes = list(range(min(10, self.num_classes))) if self.num_classes else [None]
        g = torch.Generator(device=self.device).manual_seed(1234)
        imgs = []
        for c in classes:
            labels = None if c is None else torch.full((n_per_class,), c, dtype=torch.long, device=self.device)
            z = gen.sample(n_per_class, labels=labels, guidance_scale=cfg.sample_guidance_scale,
                           steps=cfg.sample_steps, temperature=cfg.sample_temperature, generator=g)
            imgs.append(self.tokenizer.detokenize(z))
        path = RunLayout(self.run_dir).image(name)
        save_grid(torch.cat(imgs), path, nrow=n_per_class)
        return path

    def periodic(self) -> None:
        if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
            self.sample_grid(f"samples_{self.step:09d}")

    def finish(self) -> dict:
        cfg, ema_loss = self.cfg, self.final_loss_smooth
        summary = {"step": self.step, "final_loss_smooth": ema_loss}
        if self.dist.is_main:
            gen = self.ema.module(self.model)
            save_generator(gen, RunLayout(self.run_dir).generator,
                           {"name": cfg.model, "tokenizer": str(self.tok_run.resolve()), "step": self.step,
                            "ema": True, "latent_shape": list(self.latent_shape), "num_classes": self.num_classes,
                            "final_loss_smooth": ema_loss, "train_config": asdict(cfg)})
            grid = self.sample_grid("samples_final")
            self.logger.log_line(f"exported the EMA generator to {RunLayout(self.run_dir).generator}; samples: {grid}")
            if self.cache is None and (line := skip_summary(self.images)):
                self.logger.log_line(line)
        barrier()
        self.logger.close()
        return summary


def train_generator(cfg: GeneratorTrainConfig, run_dir) -> dict:
    """Train (or resume, or extend) a generator run in ``run_dir``; returns a summary."""
    return run_trainer(GeneratorTrainer, cfg, run_dir)

"""Sampling from a generator run: class-balanced batches, decoded by the run's tokenizer, written as
PNG (rounded to 8 bits from float32, not truncated) plus a grid and the protocol. On CUDA the generator
and the decoder run under bf16 autocast (``precision="auto"``; ``"fp32"`` turns it off), with TF32 on;
on a CPU everything stays float32."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import data
from .engine.common import autocast_ctx, configure_tf32, effective_precision
from .engine.distributed import resolve_device
from .runs import load_generator_run
from .viz import save_grid

__all__ = ["generate_images", "sample_run", "to_uint8"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded (gray replicated)."""
    x = data.to_uint8(x).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def generate_images(gen, tok, n: int, guidance_scale: float = 1.0, steps: Optional[int] = None, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 100, labels: Optional[Sequence[int]] = None,
                    precision: str = "auto"):
    """n images in [-1, 1] (float32) and their labels, sampled at classifier-free ``guidance_scale``;
    class-balanced (label i % num_classes) unless given. ``precision``: "auto" (bf16 autocast on CUDA,
    float32 elsewhere), "bf16" or "fp32".

    ``tok`` may be a list of tokenizers sharing one latent space (a tokenizer and its decoder-tuned
    copy): the same sampled latents are then decoded by each, and the images come back as a list."""
    decoders = list(tok) if isinstance(tok, (list, tuple)) else [tok]
    device = next(gen.parameters()).device
    if labels is None:
        labels = (torch.arange(n) % gen.num_classes).tolist() if gen.num_classes else [None] * n
    labels = list(labels) * (n // max(1, len(labels)) + 1)
    g = torch.Generator(device=device).manual_seed(seed)
    out, out_labels = [[] for _ in decoders], []
    for i in range(0, n, batch_size):
        lab = labels[i:min(n, i + batch_size)]
        y = None if lab[0] is None else torch.tensor(lab, device=device)
        with autocast_ctx(device, precision):
            z = gen.sample(len(lab), labels=y, guidance_scale=guidance_scale, steps=steps, temperature=temperature,
                           generator=g)
            for acc, d in zip(out, decoders):
                acc.append(d.detokenize(z.float()).float().cpu())
        out_labels += lab
    images = [torch.cat(acc) for acc in out]
    return (images if isinstance(tok, (list, tuple)) else images[0]), out_labels


def sample_run(run_dir, n: int = 64, guidance_scale: float = 1.0, steps: Optional[int] = None, temperature: float = 1.0,
               out=None, seed: int = 0, batch_size: int = 100, device: str = "auto",
               labels: Optional[Sequence[int]] = None, precision: str = "auto", tf32: bool = True) -> Path:
    from PIL import Image

    dev = resolve_device(device)
    configure_tf32(dev, tf32)
    gen, tok, meta = load_generator_run(run_dir, dev)
    images, labs = generate_images(gen, tok, n, guidance_scale, steps, temperature, seed, batch_size, labels, precision)
    out = Path(out or Path(run_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(to_uint8(images), labs)):
        Image.fromarray(img).save(out / f"{i:05d}_class{lab if lab is not None else 'none'}.png")
    per_row = min(10, max(1, gen.num_classes)) if labels is None and gen.num_classes else 8
    save_grid(images[: min(n, 100)], out / "grid.png", nrow=per_row)
    protocol = {"run": str(run_dir), "model": meta.get("name"), "n": n, "cfg": guidance_scale, "steps": steps,
                "temperature": temperature, "seed": seed,
                "precision": effective_precision(dev, precision), "ema": meta.get("ema", True),
                "tokenizer": meta.get("tokenizer"), "class_balanced": labels is None}
    (out / "protocol.json").write_text(json.dumps(protocol, indent=2))
    print(f"wrote {n} samples and grid.png to {out}")
    return out

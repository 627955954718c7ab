"""Generator throughput per family: train img/s (loss + backward + AdamW) and sampling img/s.

    python bench/generator_step.py                         # the six tiny CPU sizes on 16x4x4 latents
    python bench/generator_step.py --models sit_base,mar_base --latent 16,16,16 --device cuda --batch 64

Random latents stand in for real ones (the cost does not depend on their values). Sampling uses each
family's default sampler at --sample-steps where the family takes steps (DiT/SiT/LightningDiT; SiT
with Euler here so the step count is fixed), MAR with its num_iter, the AR models one token per step
with the KV cache; cfg > 1 doubles the batch as in real use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ldetok.engine.common import configure_tf32  # noqa: E402
from ldetok.engine.optim import build_adamw, param_groups  # noqa: E402
from ldetok.generators import build_generator  # noqa: E402

TINY = "mar_tiny,randomar_tiny,rasterar_tiny,dit_tiny,sit_tiny,lightningdit_tiny"


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(name, a, dev):
    shape = tuple(int(v) for v in a.latent.split(","))
    torch.manual_seed(0)
    g = build_generator(name, latent_shape=shape, num_classes=10).to(dev).train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    opt = build_adamw(param_groups(g, 0.0)[0], 1e-4, 0.0)
    z = torch.randn(a.batch, *shape, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    times = []
    for i in range(a.warmup + a.steps):
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = g.loss(z, y)
        loss.float().backward()
        opt.step()
        sync(dev)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    train_ms = statistics.median(times) * 1000
    g.eval()
    kw = {}
    if g.kind in ("dit", "lightningdit"):
        kw["steps"] = a.sample_steps
    elif g.kind == "sit":
        kw.update(steps=a.sample_steps, method="euler")
    gen = torch.Generator(device=dev).manual_seed(0)
    sync(dev)
    t0 = time.perf_counter()
    with amp:
        g.sample(a.sample_n, labels=torch.arange(a.sample_n, device=dev) % 10, guidance_scale=a.cfg, generator=gen, **kw)
    sync(dev)
    sample_s = time.perf_counter() - t0
    return {"model": name, "params_M": round(g.num_params() / 1e6, 3), "latent": list(shape), "batch": a.batch,
            "train_ms_per_step": round(train_ms, 1), "train_img_per_s": round(a.batch / train_ms * 1000, 1),
            "sample_n": a.sample_n, "sample_cfg": a.cfg, "sample_steps": kw.get("steps", "family default"),
            "sample_img_per_s": round(a.sample_n / sample_s, 2), "device": str(dev), "threads": torch.get_num_threads(),
            "peak_mem_MiB": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=TINY)
    ap.add_argument("--latent", default="16,4,4")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-n", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls (TF32 is on by default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    configure_tf32(dev, not a.no_tf32)
    rows = [bench(m, a, dev) for m in a.models.split(",")]
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()

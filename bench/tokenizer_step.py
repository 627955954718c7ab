"""Tokenizer train-step throughput and peak memory.

    python bench/tokenizer_step.py --model detok_MM --image-size 32 --patch 8 --batch 128 --steps 30
    python bench/tokenizer_step.py --preset cpu-fmnist
    python bench/tokenizer_step.py --model detok_BB --image-size 256 --patch 16 --batch 32 --device cuda

One step = forward with the configured corruption (γ, M), pixel MSE + 1e-6 KL (the perceptual and GAN
terms are left out so the tokenizer itself is measured), backward, grad clip, AdamW (0.9, 0.95).
bf16 autocast on CUDA only. Reports median ms/step over the timed steps (after warm-up), img/s, and peak
memory (CUDA: max allocated; CPU: max RSS of the process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ldetok.corruption import CorruptionConfig, denoising_forward  # noqa: E402
from ldetok.engine.optim import build_adamw, param_groups  # noqa: E402
from ldetok.tokenizers import build  # noqa: E402


def build_ours(a, dev):
    tok = build(a.model, image_size=a.image_size, patch_size=a.patch).to(dev).train()
    corruption = CorruptionConfig(gamma=a.gamma, max_mask_ratio=a.mask)
    g = torch.Generator(device=dev).manual_seed(0)

    def fwd(x):
        out = denoising_forward(tok, x, corruption, g)
        return out.recon, out.posterior.kl()

    return tok, fwd


def build_official(a, dev):
    """The official DeTok at the same size (its SIZE_DICT gets our size entry; nothing else changes)."""
    from ldetok.tokenizers.detok import SIZES, split_size_name

    sys.path.insert(0, a.official_path)
    from models import detok as official  # noqa: E402  (the official repository's module)

    enc, dec = split_size_name(a.model.split("_", 1)[1])
    for name in (enc, dec):
        w, d, h = SIZES[name]
        official.SIZE_DICT.setdefault(name, {"width": w, "layers": d, "heads": h})
    tok = official.DeTok(img_size=a.image_size, patch_size=a.patch, vit_enc_model_size=enc, vit_dec_model_size=dec,
                         token_channels=16, mask_ratio=a.mask, gamma=a.gamma).to(dev).train()

    def fwd(x):
        recon, post = tok(x)
        return recon, post.kl()

    return tok, fwd


def time_steps(tok, fwd, a, dev, steps):
    opt = build_adamw(param_groups(tok, 1e-4)[0], 1e-4, 1e-4)
    x = torch.rand(a.batch, 3, a.image_size, a.image_size, device=dev) * 2 - 1
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    times = []
    for i in range(a.warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            recon, kl = fwd(x)
        loss = ((recon.float() - x) / 2).pow(2).mean() + 1e-6 * kl.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 3.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="take model/size/batch/corruption from a tokenizer preset")
    ap.add_argument("--model", default="detok_MM")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--gamma", type=float, default=3.0)
    ap.add_argument("--mask", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--official-path", default=None,
                    help="a checkout of the official l-DeTok repository: time its DeTok at the same config, "
                         "interleaved with ours (alternating rounds, medians), and report the ratio")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --official-path")
    a = ap.parse_args(argv)
    if a.preset:
        from ldetok.config import resolve_tokenizer_config

        c = resolve_tokenizer_config(a.preset)
        a.model, a.image_size, a.patch, a.batch, a.gamma, a.mask = (
            c.model.name, c.model.image_size, c.model.patch_size, c.optim.batch_size, c.corruption.gamma,
            c.corruption.max_mask_ratio)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    tok, fwd = build_ours(a, dev)
    if a.compile:
        tok = torch.compile(tok)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    official = build_official(a, dev) if a.official_path else None
    times, times_off = [], []
    for _ in range(a.rounds if official else 1):  # alternate so both see the same machine load
        times += time_steps(tok, fwd, a, dev, a.steps)
        if official:
            times_off += time_steps(*official, a, dev, a.steps)
    ms = statistics.median(times) * 1000
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res = {"model": a.model, "params_M": round(tok.num_params() / 1e6, 3), "image": a.image_size, "patch": a.patch,
           "batch": a.batch, "gamma": a.gamma, "mask": a.mask, "device": str(dev),
           "threads": torch.get_num_threads(), "ms_per_step": round(ms, 1),
           "img_per_s": round(a.batch / (ms / 1000), 1), "peak_mem_MiB": round(peak, 1),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "compile": a.compile}
    if official:
        ms_off = statistics.median(times_off) * 1000
        res.update(official_ms_per_step=round(ms_off, 1), official_img_per_s=round(a.batch / (ms_off / 1000), 1),
                   speedup_vs_official=round(ms_off / ms, 3), rounds=a.rounds)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:14s} {v}")
    return res


if __name__ == "__main__":
    main()

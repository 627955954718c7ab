"""Tokenizer train-step throughput and peak memory.

    python bench/tokenizer_step.py --model detok_MM --image-size 32 --patch 8 --batch 128 --steps 30
    python bench/tokenizer_step.py --preset cpu-fmnist
    python bench/tokenizer_step.py --model detok_BB --image-size 256 --patch 16 --batch 32 --device cuda
    python bench/tokenizer_step.py --preset cpu-fmnist --threads 1 --compare-compile --rounds 3

--compile compiles the tokenizer's encoder and decoder as ``run.compile=true`` does (automatic dynamic
shapes: the kept-token count changes with the mask ratio); --compare-compile times an eager and a
compiled copy of the same model in alternating rounds of one run and reports both. --mfu counts the
FLOPs of a step (torch.utils.flop_counter, averaged over a few mask draws) and divides the achieved
FLOP/s by the device's peak (--peak-tflops, or known bf16 dense peaks by GPU name).

One step = forward with the configured corruption (γ, M), pixel MSE + 1e-6 KL (the perceptual and GAN
terms are left out so the tokenizer itself is measured), backward, grad clip, AdamW (0.9, 0.95).
bf16 autocast on CUDA only. Reports median ms/step over the timed steps (after warm-up), img/s, and peak
memory (CUDA: max allocated per variant; CPU: max RSS of the process).
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
from ldetok.engine.common import compile_forward, compiled_frames, configure_tf32  # noqa: E402
from ldetok.engine.optim import build_adamw, param_groups  # noqa: E402
from ldetok.tokenizers import build  # noqa: E402

# bf16 dense tensor-core peaks (TFLOP/s) by device name, for MFU
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "4090": 165.2}


def peak_tflops(a, dev):
    if a.peak_tflops:
        return a.peak_tflops
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_ours(a, dev, compiled=False):
    torch.manual_seed(0)
    tok = build(a.model, image_size=a.image_size, patch_size=a.patch).to(dev).train()
    if compiled:
        compile_forward(tok.encoder)
        compile_forward(tok.decoder)
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


def one_step(tok, fwd, opt, x, dev):
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    opt.zero_grad(set_to_none=True)
    with amp:
        recon, kl = fwd(x)
    loss = ((recon.float() - x) / 2).pow(2).mean() + 1e-6 * kl.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tok.parameters(), 3.0)
    opt.step()


def time_steps(tok, fwd, a, dev, steps, warmup=None):
    """Seconds per step of ``steps`` timed steps after ``warmup`` untimed ones, and the peak memory (MiB,
    CUDA) of the call."""
    if not hasattr(tok, "_bench_opt"):  # one optimizer per model across rounds
        tok._bench_opt = build_adamw(param_groups(tok, 1e-4)[0], 1e-4, 1e-4)
    x = torch.rand(a.batch, 3, a.image_size, a.image_size, device=dev) * 2 - 1
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    warmup = a.warmup if warmup is None else warmup
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        one_step(tok, fwd, tok._bench_opt, x, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return times, peak


def step_flops(tok, fwd, a, dev, draws=4):
    """FLOPs of one train step (forward + backward), averaged over ``draws`` mask-ratio draws (eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    opt = build_adamw(param_groups(tok, 1e-4)[0], 0.0, 0.0)  # lr 0: the model does not move
    x = torch.rand(a.batch, 3, a.image_size, a.image_size, device=dev) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        for _ in range(draws):
            one_step(tok, fwd, opt, x, dev)
    return counter.get_total_flops() / draws


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
    ap.add_argument("--compile", action="store_true", help="compile encoder and decoder (as run.compile=true)")
    ap.add_argument("--compare-compile", action="store_true",
                    help="time an eager and a compiled copy in alternating rounds and report both")
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls (TF32 is on by default)")
    ap.add_argument("--mfu", action="store_true", help="count FLOPs per step and report MFU where the peak is known")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: by GPU name)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per variant")
    ap.add_argument("--official-path", default=None,
                    help="a checkout of the official l-DeTok repository: time its DeTok at the same config, "
                         "interleaved with ours (alternating rounds, medians), and report the ratio")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --official-path / --compare-compile")
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
    configure_tf32(dev, not a.no_tf32)
    variants = {}  # name -> (tok, fwd)
    if not a.compile or a.compare_compile:
        variants["eager"] = build_ours(a, dev)
    if a.compile or a.compare_compile:
        variants["compiled"] = build_ours(a, dev, compiled=True)
    if a.official_path:
        variants["official"] = build_official(a, dev)
    frames0 = compiled_frames() if "compiled" in variants else 0
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    first_frames = None
    for r in range(a.rounds if len(variants) > 1 else 1):  # alternate so all see the same machine load
        for k, (tok, fwd) in variants.items():
            # the compiled copy's first round also warms up its recompiles (a few mask draws)
            warm = a.warmup + (3 if k == "compiled" and r == 0 else 0)
            t, peak = time_steps(tok, fwd, a, dev, a.steps, warm)
            times[k] += t
            peaks[k] = max(peaks[k], peak or 0.0)
            if k == "compiled" and first_frames is None:
                first_frames = compiled_frames()
    flops = step_flops(*variants[next(iter(variants))], a, dev) if a.mfu else None
    peak_tf = peak_tflops(a, dev)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    rows = []
    for k, (tok, _) in variants.items():
        ms = statistics.median(times[k]) * 1000
        mem = peaks[k] if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {"variant": k if k == "official" else f"ours-{k}", "model": a.model,
               "params_M": round(sum(p.numel() for p in tok.parameters()) / 1e6, 3), "image": a.image_size,
               "patch": a.patch, "batch": a.batch, "gamma": a.gamma, "mask": a.mask, "device": str(dev),
               "device_name": dev_name,
               "threads": torch.get_num_threads(), "tf32": dev.type == "cuda" and not a.no_tf32,
               "ms_per_step": round(ms, 2), "img_per_s": round(a.batch / (ms / 1000), 1), "peak_mem_MiB": round(mem, 1),
               "timed_steps": len(times[k]), "torch": torch.__version__, "compile": k == "compiled"}
        if flops is not None:
            row["gflop_per_step"] = round(flops / 1e9, 2)
            row["mfu"] = round(flops / (ms / 1000) / (peak_tf * 1e12), 4) if peak_tf else None
            row["peak_tflops"] = peak_tf
        if k == "compiled":
            row.update(compiled_frames=compiled_frames() - frames0, recompiles_after_warmup=compiled_frames() - first_frames)
        rows.append(row)
    base = rows[0]["ms_per_step"]
    for row in rows[1:]:
        row["speedup_vs_first"] = round(base / row["ms_per_step"], 3)
    for row in rows:
        if a.json:
            print(json.dumps(row))
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    return rows


if __name__ == "__main__":
    main()

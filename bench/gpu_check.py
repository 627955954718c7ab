"""The throughput table of ``bench/gpu_check.sh``: one process runs ``tokenizer_step`` (eager and compiled
in alternating rounds, MFU, the official implementation when given) and ``generator_step`` (MAR-B, SiT-B:
train img/s and sampling img/s), then writes ``gpu_check.jsonl`` (every row) and ``gpu_check.md`` (the
table) to ``--out`` and prints the table.

    python bench/gpu_check.py --out runs/gpu_check                 # one CUDA GPU, ~5 minutes on an H200
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check       # the same path on a CPU, tiny sizes

Sizes on the GPU: detok_BB at 256 px (patch 16, 256 tokens, γ=3, mask ≤ 0.7), batch 64, bf16 autocast,
TF32, fused AdamW; MAR-B and SiT-B on 16x16x16 latents, batch 64; sampling 32 images at cfg 1.5
(SiT: 50 Euler steps; MAR: its 64 iterations). The dry run uses detok_MM at 32 px, mar_tiny and
sit_tiny on 16x4x4 latents, a couple of steps each: it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import generator_step  # noqa: E402
import tokenizer_step  # noqa: E402

GPU = dict(tok=["--model", "detok_BB", "--image-size", "256", "--patch", "16", "--batch", "64", "--steps", "20",
                "--warmup", "5", "--rounds", "2"],
           gen=["--models", "mar_base,sit_base", "--latent", "16,16,16", "--batch", "64", "--steps", "10",
                "--warmup", "3", "--sample-n", "32", "--sample-steps", "50"])
DRY = dict(tok=["--model", "detok_MM", "--image-size", "32", "--patch", "8", "--batch", "4", "--steps", "2",
                "--warmup", "1", "--rounds", "1", "--threads", "1"],
           gen=["--models", "mar_tiny,sit_tiny", "--latent", "16,4,4", "--batch", "4", "--steps", "2", "--warmup", "1",
                "--sample-n", "2", "--sample-steps", "2", "--threads", "1"])


def _fmt(v, spec=""):
    return "n/a" if v is None else format(v, spec)


def table(tok_rows, gen_rows) -> str:
    lines = ["| tokenizer train step | device | batch | ms/step | img/s | peak MiB | GFLOP/step | MFU | compiled frames "
             "(recompiles after warm-up) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in tok_rows:
        comp = (f"{r['compiled_frames']} ({r['recompiles_after_warmup']})" if r.get("compile") else "-")
        lines.append(f"| {r['model']} {r['image']}px {r['variant']}{' (compile)' if r.get('compile') else ''} | "
                     f"{r['device_name']} | {r['batch']} | {r['ms_per_step']} | {r['img_per_s']} | {r['peak_mem_MiB']} | "
                     f"{_fmt(r.get('gflop_per_step'))} | {_fmt(r.get('mfu'), '.1%')} | {comp} |")
    lines += ["", "| generator | latent | batch | train ms/step | train img/s | sample img/s | sample steps | peak MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in gen_rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['latent']))} | {r['batch']} | {r['train_ms_per_step']} | "
                     f"{r['train_img_per_s']} | {r['sample_img_per_s']} | {r['sample_steps']} | {_fmt(r.get('peak_mem_MiB'))} |")
    return "\n".join(lines)


def _write(out: Path, tok_rows, gen_rows, dry_run: bool, t0: float, done: str) -> None:
    """gpu_check.jsonl (every row) and gpu_check.md (the table), rewritten after each stage."""
    with open(out / "gpu_check.jsonl", "w") as f:
        for r in tok_rows + gen_rows:
            f.write(json.dumps(r) + "\n")
    note = (f"\n\n{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
            f"{'DRY RUN on CPU (sizes are tiny; the numbers mean nothing)' if dry_run else 'CUDA'}; "
            f"stages done: {done}; {time.time() - t0:.0f} s\n")
    (out / "gpu_check.md").write_text(table(tok_rows, gen_rows) + note)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script in about a minute")
    ap.add_argument("--official-path", default=None, help="also time the official DeTok (DIR/models/detok.py)")
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--skip-compile", action="store_true",
                    help="leave out the compiled tokenizer step (its compile took over 75 s on an H200)")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
    sizes = DRY if a.dry_run else GPU
    device = ["--device", "cpu" if a.dry_run else "cuda"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok_args = sizes["tok"] + device + ["--mfu", "--json"]
    if a.official_path:
        tok_args += ["--official-path", a.official_path]
    # Stages in order of value, each written as soon as it ends, so that a run stopped by its time limit
    # still leaves what it measured: eager tokenizer, generators, then the (slow to compile) compiled step.
    tok_rows = tokenizer_step.main(tok_args)
    _write(out, tok_rows, [], a.dry_run, t0, "tokenizer eager")
    gen_rows = generator_step.main(sizes["gen"] + device)
    _write(out, tok_rows, gen_rows, a.dry_run, t0, "tokenizer eager, generators")
    if not a.skip_compile:
        tok_rows = tokenizer_step.main(sizes["tok"] + device + ["--compare-compile", "--mfu", "--json"])
        _write(out, tok_rows, gen_rows, a.dry_run, t0, "tokenizer eager vs compiled, generators")
    print((out / "gpu_check.md").read_text())
    return tok_rows, gen_rows


if __name__ == "__main__":
    main()

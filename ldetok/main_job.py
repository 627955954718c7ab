"""The main job behind ``make run``: train an l-DeTok tokenizer and a plain autoencoder (γ=0, M=0) on
Fashion-MNIST with the CPU preset, evaluate both (clean reconstruction and reconstruction of latents
corrupted at t = 0.3/0.5/0.7), write the figures to ``figures/`` and print the comparison table.

Each stage resumes: running it again reuses finished runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

__all__ = ["run_main_job", "MAIN_VARIANTS"]

MAIN_VARIANTS = {"l-DeTok (γ=3, M=0.7)": "cpu-fmnist", "AE (γ=0, M=0)": "cpu-fmnist-ae"}
NOISE_LEVELS = (0.3, 0.5, 0.7)


def _fmt_table(rows, headers) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run_main_job(out, steps: Optional[int] = None, n_eval: int = 500, n_fid: int = 250,
                 figures_dir="figures") -> dict:
    from .config import resolve_tokenizer_config
    from .data import build_dataset
    from .engine.tokenizer_trainer import train_tokenizer
    from .eval.tokenizer import evaluate_tokenizer_run
    from .tokenizers import load_tokenizer
    from .viz import plot_corruption_sweeps, save_grid

    out = Path(out)
    figures = Path(figures_dir)
    t0 = time.time()
    runs, results = {}, {}
    for i, (label, preset) in enumerate(MAIN_VARIANTS.items()):
        overrides = {"max_steps": steps} if steps else {}
        cfg = resolve_tokenizer_config(preset, overrides)
        run = out / preset
        runs[label] = run
        print(f"[{time.time() - t0:6.0f}s] stage {i + 1}/{len(MAIN_VARIANTS)}: train {label} "
              f"({preset}, {cfg.max_steps} steps) -> {run}", flush=True)
        train_tokenizer(cfg, run)
    for label, run in runs.items():
        print(f"[{time.time() - t0:6.0f}s] evaluate {label} (n={n_eval}; rFID on the first {n_fid})", flush=True)
        ev = evaluate_tokenizer_run(run, n=n_eval, noise_levels=NOISE_LEVELS, rfid=False, verbose=False)
        fid = evaluate_tokenizer_run(run, n=n_fid, rfid=True, verbose=False)
        results[label] = {"recon": ev, "rfid": fid["clean"]["rfid"]}

    # ---- figures ------------------------------------------------------------------------------
    toks = {label: load_tokenizer(run).eval() for label, run in runs.items()}
    test = build_dataset("fashion_mnist", split="test", image_size=32, channels=3)
    x, _ = test.tensor_batch(list(range(0, 1000, 100)))
    with torch.no_grad():
        grid = torch.cat([x] + [t.reconstruct(x) for t in toks.values()])
    save_grid(grid, figures / "fmnist_reconstructions.png", nrow=len(x))
    plot_corruption_sweeps(toks, x[:2], figures / "fmnist_corruption_sweep.png",
                           title="Fashion-MNIST: latents corrupted (interpolative, γ=3) or masked, then decoded")

    # ---- table --------------------------------------------------------------------------------
    headers = ["tokenizer", "steps", f"PSNR clean (n={n_eval})", "SSIM clean", f"rFID (n={n_fid})"] + \
              [f"PSNR t={t}" for t in NOISE_LEVELS]
    rows = []
    for label, r in results.items():
        ev = r["recon"]
        step = json.loads((runs[label] / "tokenizer" / "tokenizer.json").read_text())["step"]
        psnr = lambda key: ev[key]["psnr"]["value"]  # noqa: E731
        rows.append([label, step, f"{psnr('clean'):.2f}", f"{ev['clean']['ssim']['value']:.3f}",
                     f"{r['rfid']['value']:.1f}"] + [f"{psnr(f't={t:g}'):.2f}" for t in NOISE_LEVELS])
    table = _fmt_table(rows, headers)
    note = ("PSNR/SSIM on the first images of the Fashion-MNIST test split (32 px, [0,1]); t: interpolative "
            "noise (1-t)z + t·3·ε on the raw latents before decoding; rFID: Inception pool3 features "
            "(offline FID-Inception) of reconstructions vs the same real images; EMA weights.")
    summary = out / "summary.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(f"{table}\n\n{note}\n")
    (out / "summary.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=2, default=str))
    print(f"\n[{time.time() - t0:6.0f}s] done. Figures: {figures / 'fmnist_reconstructions.png'}, "
          f"{figures / 'fmnist_corruption_sweep.png'}\n")
    print(table)
    print("\n" + note)
    return results

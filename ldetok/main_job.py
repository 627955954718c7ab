"""The main job behind ``make run``: ``ldetok reproduce --preset cpu-main`` (a plain autoencoder,
γ=0/M=0, against l-DeTok at the setting the study confirmed on held-out seeds at this scale, additive
noise γ=0.5 without masking, on Fashion-MNIST: both tokenizers, each decoder fine-tuned with the encoder
frozen, a SiT on each one's latents whose samples both decoders render, reconstruction and generation
metrics in a Fashion-MNIST classifier's space and, for the tuned decoders, in Inception space), then the
figures (reconstructions, corruption sweeps, samples) and the headline table. ``--preset cpu-quick`` runs
the same job with the paper's γ=3/M=0.7.

Every stage resumes: running it again reuses finished runs. The tokenizers are also linked under their
tokenizer presets' names, ``OUT/cpu-fmnist-ae`` (AE), ``OUT/cpu-fmnist`` (the paper's l-DeTok) and
``OUT/cpu-fmnist-VARIANT`` (any other setting, e.g. ``cpu-fmnist-g0.5_m0_add``), where the notebooks and
the demo look for them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .data import build_dataset
from .config import resolve_reproduce_config
from .reproduce import headline_table, reproduce, tokenizer_tags, variant_label
from .runs import load_tokenizer, run_corruption, run_train_config
from .side_by_side import parallel_jobs, run_side_by_side
from .viz import plot_corruption_sweeps, save_grid

__all__ = ["run_main_job", "headline_table", "link_name", "MAIN_PRESET"]

MAIN_PRESET = "cpu-main"  # `make run`
LINKS = {"detok": "cpu-fmnist", "ae": "cpu-fmnist-ae"}  # the tokenizer presets the notebooks ask for


def link_name(variant: str) -> str:
    """The name a variant's tokenizer is linked under in the main job's folder: its tokenizer preset's."""
    return LINKS.get(variant, f"cpu-fmnist-{variant}")


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative); an existing real folder of that name is left alone, and said so."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        print(f"note: {link} exists and is not a link made by this job; left as it is")
        return
    link.symlink_to(os.path.relpath(target, link.parent))


def run_main_job(out, preset: Optional[str] = None, figures_dir="figures", device: str = "auto",
                 jobs: Optional[int] = None) -> List[dict]:
    """The reproduction of ``preset`` (default ``MAIN_PRESET``; each variant's pipeline in its own process
    when ``jobs`` > 1, see ``side_by_side``), then the figures and the table."""
    out, figures, preset = Path(out), Path(figures_dir), preset or MAIN_PRESET
    t0 = time.time()
    P = resolve_reproduce_config(preset)
    jobs = parallel_jobs(jobs, len(P.variants), device)
    if jobs > 1:
        run_side_by_side(["--preset", preset, "--out", str(out), "--device", device, "--figures",
                          str(out / "logs" / "figures")], P.variants, out, P.features, jobs, device)
    rows = reproduce(preset, out, device=device, figures_dir=figures)  # with jobs > 1: every stage found done

    # ---- figures from the largest budget's tokenizers and samples (first seed) ----------------
    tok_steps, gen_steps = P.budgets[-1]
    seed = P.seeds[0]
    # per variant (the corrupted ones first, then the autoencoder): its tokenizer, and the one the table
    # compares (its decoder-tuned copy when there is one)
    shown_variants = sorted(P.variants, key=lambda v: v == "ae")
    tags = {v: tokenizer_tags(v, seed, tok_steps, P.decoder_ft_steps) for v in shown_variants}
    runs = {v: out / "tokenizers" / t[0][0] for v, t in tags.items()}
    for v, run in runs.items():
        _link(run, out / link_name(v))
    # the sweeps show the trained tokenizers: the corruption they were trained under is the point there
    ft = f"_ft{P.decoder_ft_steps}" if P.decoder_ft_steps else ""
    label = (lambda v: f"{variant_label(v)}, decoder fine-tuned") if ft else variant_label
    shown = {label(v): load_tokenizer(out / "tokenizers" / t[-1][0]).eval() for v, t in tags.items()}
    toks = {variant_label(v): load_tokenizer(run).eval() for v, run in runs.items()}
    tcfg = run_train_config(next(iter(runs.values())))
    test = build_dataset(tcfg.data.dataset, split=tcfg.data.eval_split, image_size=tcfg.model.image_size,
                         channels=tcfg.model.in_channels, root=tcfg.data.data_root)
    x, _ = test.tensor_batch([i * min(1000, len(test)) // 10 for i in range(10)])  # test images 0, 100, ..., 900
    with torch.no_grad():
        grid = torch.cat([x] + [t.reconstruct(x) for t in shown.values()])
    save_grid(grid, figures / "fmnist_reconstructions.png", nrow=len(x))
    corr = run_corruption(next(iter(runs.values())))  # the first corrupted tokenizer's noise
    plot_corruption_sweeps(toks, x[:2], figures / "fmnist_corruption_sweep.png", gamma=corr.gamma,
                           noise_type=corr.noise_type,
                           title=f"Fashion-MNIST: latents corrupted ({corr.noise_type}, γ={corr.gamma:g}) or "
                                 "masked, then decoded")
    _samples_figure({label(v): out / "samples" / f"{P.generators[0]}_{v}_s{seed}_t{tok_steps}_g{gen_steps}{ft}.png"
                     for v in runs}, figures / "fmnist_samples.png",
                    f"{P.generators[0]} samples (cfg {P.guidance_scale}, EMA; one class per column)")

    table = headline_table(rows)
    compared, note = _compared(P, preset), _table_note(rows, out)
    (out / "summary.md").write_text(f"{table}\n\n{compared}\n\n{note}\n")
    print(f"\n[{(time.time() - t0) / 60:.1f} min] main job done. Figures: {figures / 'fmnist_reconstructions.png'}, "
          f"{figures / 'fmnist_corruption_sweep.png'}, {figures / 'fmnist_samples.png'}\n")
    print(compared + "\n")
    print(table)
    print("\n" + note)
    return rows


# why a main-job preset compares what it compares, printed under its table
WHY = {
    "cpu-main": "l-DeTok's setting is the one the study confirmed at this scale: additive noise γ=0.5 without "
                "masking beat the autoencoder in FD-clf(samples, real) on held-out seeds 2-4, while the paper's "
                "γ=3/M=0.7 and every interpolative setting of the γ × M map lost to it (README, 'Where latent "
                "denoising pays off'; figures/study/). The paper's setting: ldetok main --preset cpu-quick.",
    "cpu-quick": "l-DeTok at the paper's γ=3/M=0.7; at this scale the study found a milder setting that beats "
                 "the autoencoder (ldetok main, preset cpu-main).",
}


def _compared(P, preset: str) -> str:
    """What the table compares, in words."""
    text = (f"Compared: {' against '.join(variant_label(v) for v in P.variants)}: the same tokenizer size and "
            f"steps, one {'/'.join(P.generators)} per tokenizer, seed{'s' if len(P.seeds) > 1 else ''} "
            f"{','.join(map(str, P.seeds))}.")
    if preset in WHY:
        text += " " + WHY[preset]
    if P.decoder_ft_steps:
        text += (f" Each decoder is also fine-tuned for {P.decoder_ft_steps} steps on clean latents (encoder "
                 "frozen, as the released l-DeTok tokenizer is): the rows 'decoder fine-tuned' render the same "
                 "sampled latents with the tuned decoder; they are the fair comparison.")
        if P.untuned_features is not None:
            text += f" The untuned rows are measured in the {', '.join(P.untuned_features)} space only (–: not measured)."
    return text


def _table_note(rows: List[dict], out: Path) -> str:
    def first(key, default="?"):
        return next((r[key] for r in rows if r.get(key) is not None), default)

    note = (f"PSNR: clean reconstructions of the first {first('n_recon', first('n'))} test images; PSNR t=0.5: raw "
            "latents corrupted by 0.5·z + 1.5·ε before decoding; rFID/gFID/KID/FD(samples, recon): FID-Inception "
            f"features of the first {first('n[inception]')} images of each set (KID as raw MMD²); ")
    if any("n[classifier]" in r for r in rows):
        note += (f"FD-clf: the same distances in a Fashion-MNIST classifier's 128-d feature space on "
                 f"{first('n[classifier]')} images; ")
    return note + f"gen loss: the generator's smoothed final training loss. Full table: {out / 'results.md'}"


def _samples_figure(grids: Dict[str, Path], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch
    from PIL import Image

    fig = Figure(figsize=(4.2 * len(grids), 4.0))
    axes = fig.subplots(1, len(grids), squeeze=False)
    for ax, (label, p) in zip(axes[0], grids.items()):
        ax.imshow(Image.open(p))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)

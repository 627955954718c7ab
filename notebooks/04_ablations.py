# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Ablations: γ, maximum mask ratio, noise type, τ distribution
#
# Two modes.
#
# * **Point** (`SWEEP_DIR = None`): train one tokenizer with the given `gamma`, `max_mask_ratio`,
#   `noise_type` and `noise_dist`, and write `RUN_DIR/metrics.json` (PSNR of clean latents, PSNR of latents
#   corrupted at t = 0.3 / 0.5 / 0.7 and masked at 0.5, latent statistics). A sweep runs this mode once per
#   grid point:
#
#   ```bash
#   ldetok sweep notebooks/04_ablations.ipynb --grid gamma=0,1,3 max_mask_ratio=0,0.7 --out runs/sweep --param STEPS=300
#   ```
#   (or `python -m ldetok.sweep ...`; one point per GPU when several are visible, `--parallel N` on a CPU).
# * **Aggregate** (`SWEEP_DIR` set): read every point's `metrics.json` into a table and plot them.

# %% tags=["parameters"]
PRESET = "cpu-fmnist"
DEVICE = "auto"
NPROC = 1
SEED = 0
STEPS = 300
BATCH_SIZE = 128
STATS_IMAGES = 2000
gamma = 3.0
max_mask_ratio = 0.7
noise_type = "interpolative"  # or "additive"
noise_dist = "uniform"  # or "logit_normal"
noise_mean = 0.8  # logit-normal location (used with noise_dist="logit_normal")
noise_std = 1.0
EVAL_GAMMA = 3.0  # the corruption every point is measured under (the same for all, so they compare)
N_EVAL = 256
SWEEP_DIR = None  # set: aggregate mode
RUN_DIR = None  # default runs/notebooks/04_ablations
FIGURES_DIR = "figures"

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from ldetok import notebook as nb

run = nb.run_dir(RUN_DIR, "04_ablations")
MODE = "aggregate" if SWEEP_DIR is not None else "point"
print("mode:", MODE, "| run folder:", run)

# %% [markdown]
# ## Point: train one tokenizer and measure it

# %%
if MODE == "point":
    from ldetok.runs import load_tokenizer

    overrides = dict(max_steps=STEPS, seed=SEED, device=DEVICE, batch_size=BATCH_SIZE, stats_images=STATS_IMAGES,
                     gamma=float(gamma), max_mask_ratio=float(max_mask_ratio), noise_type=noise_type,
                     noise_dist=noise_dist, noise_mean=float(noise_mean), noise_std=float(noise_std),
                     log_every=max(1, min(25, STEPS // 10)), image_every=0, tensorboard=False)
    summary = nb.train_in_process_or_torchrun("tokenizer", PRESET, overrides, run / "tokenizer_run", NPROC)
    tok = load_tokenizer(run / "tokenizer_run").eval()
    from ldetok.runs import run_train_config

    cfg = run_train_config(run / "tokenizer_run")
    x, _ = nb.images(cfg.data.dataset, N_EVAL, cfg.data.eval_split, cfg.model.image_size, cfg.model.in_channels)
    sweep = nb.psnr_sweep(tok, x, [0.0, 0.3, 0.5, 0.7], [0.5], EVAL_GAMMA, "interpolative", SEED)
    stats = nb.latent_summary(tok, x)
    c = cfg.corruption  # what the run was trained with, read back from its folder
    metrics = {"gamma": c.gamma, "max_mask_ratio": c.max_mask_ratio, "noise_type": c.noise_type,
               "noise_dist": c.noise_dist, "steps": summary["step"], "final_loss": nb.tail_mean(run / "tokenizer_run"),
               "psnr_clean": sweep["psnr_noise"][0], "psnr_mask0.5": sweep["psnr_mask"][0],
               "latent_std": stats["std"], "latent_abs_mean": stats["abs_mean"], "latent_min": stats["min"],
               "latent_max": stats["max"]}
    metrics.update({f"psnr_t{t:g}": p for t, p in zip(sweep["levels"][1:], sweep["psnr_noise"][1:])})
    print(nb.log_metrics(metrics, run))
    display(pd.Series(metrics))

# %% [markdown]
# ## Aggregate: every point of a sweep

# %%
if MODE == "aggregate":
    from ldetok.sweep import read_sweep

    rows = read_sweep(nb.resolve(SWEEP_DIR))
    if not rows:
        raise FileNotFoundError(f"{SWEEP_DIR}: no point folder with a metrics.json (run `ldetok sweep` first)")
    table = pd.DataFrame(rows).set_index("point")
    cols = [c for c in ("gamma", "max_mask_ratio", "noise_type", "noise_dist", "psnr_clean", "psnr_t0.3", "psnr_t0.5",
                        "psnr_t0.7", "psnr_mask0.5", "latent_std") if c in table]
    display(table[cols])
    fig = nb.plot_sweep(rows, "gamma", ["psnr_clean", "psnr_t0.5", "psnr_mask0.5"],
                        group_by=["max_mask_ratio", "noise_type", "noise_dist"])
    nb.save_fig(fig, "nb04_sweep_psnr_vs_gamma", FIGURES_DIR)
    plt.show()
    best = table["psnr_t0.5"].idxmax()
    print(nb.log_metrics({"n_points": len(rows), "best_point_t0.5": best,
                          "best_psnr_t0.5": float(table.loc[best, "psnr_t0.5"]),
                          "points": {r["point"]: {k: r.get(k) for k in ("psnr_clean", "psnr_t0.5", "latent_std")}
                                     for r in rows}}, run))

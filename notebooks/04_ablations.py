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
#     display_name: Python (ldetok)
#     language: python
#     name: ldetok
# ---

# %% [markdown]
# # 04 · Ablations: explore the results of sweeps and `reproduce` runs; train one sweep point
#
# **Explore** (the default): the result tables, with widgets to choose the metric, the x-axis parameter,
# the grouping and a filter; each point is the mean over the runs that share it (seeds) with their
# standard deviation as an error bar, and every axis says which way is better. With no training at all
# it opens the study CSVs committed in `figures/` (`ldetok reproduce` results); it also opens
#
# * `runs/main` once `make run` has written its `results.csv` (found by itself);
# * any `ldetok reproduce --out DIR` folder or results CSV, and any `ldetok sweep` folder: list them in
#   `SOURCES` (or give one sweep folder as `SWEEP_DIR`).
#
# In a live kernel (JupyterLab: `make lab`) the widget panel appears under "Explore"; a headless run
# (papermill, `make notebooks`) draws the same default views to files instead.
#
# **Point**: train one tokenizer with the given `gamma`, `max_mask_ratio`, `noise_type`, `noise_dist`
# (any of them set, or `MODE = "point"`) and write `RUN_DIR/metrics.json`: PSNR of clean latents, of
# latents corrupted at t = 0.3 / 0.5 / 0.7 and masked at 0.5, latent statistics. A sweep runs this mode
# once per grid point, then this notebook explores it:
#
# ```bash
# ldetok sweep notebooks/04_ablations.ipynb --grid gamma=0,1,3 max_mask_ratio=0,0.7 --out runs/sweep --param STEPS=300
# ```
# (one point per GPU when several are visible, `--parallel N` on a CPU; a grid over other parameters
# only, e.g. `SEED`, adds `MODE=point` to `--param`).

# %% tags=["parameters"]
MODE = None  # "explore", "point"; None: "point" when gamma / max_mask_ratio / noise_type / noise_dist is set
SOURCES = []  # sweep folders, reproduce folders, results CSVs to explore besides figures/*.csv and runs/main
SWEEP_DIR = None  # one sweep folder to explore (added to SOURCES)
INTERACTIVE = None  # widget panel; None: on in a live kernel, off under papermill
PRESET = "cpu-fmnist"
DEVICE = "auto"
NPROC = 1
SEED = 0
STEPS = 300
BATCH_SIZE = 128
STATS_IMAGES = 2000
gamma = None  # point mode: the training corruption (None: the preset's)
max_mask_ratio = None
noise_type = None  # "interpolative" or "additive"
noise_dist = None  # "uniform" or "logit_normal"
noise_mean = None  # logit-normal location (with noise_dist="logit_normal")
noise_std = None
EVAL_GAMMA = 3.0  # the corruption every point is measured under (the same for all, so they compare)
N_EVAL = 256
RUN_DIR = None  # default runs/notebooks/04_ablations
FIGURES_DIR = None  # None: RUN_DIR/figures; `make notebooks` passes figures

# %%
# %matplotlib inline
import pandas as pd
from IPython.display import display

from ldetok import explore as E
from ldetok import notebook as nb

run = nb.run_dir(RUN_DIR, "04_ablations")
corruption = dict(gamma=gamma, max_mask_ratio=max_mask_ratio, noise_type=noise_type, noise_dist=noise_dist,
                  noise_mean=noise_mean, noise_std=noise_std)
MODE = MODE or ("point" if any(v is not None for v in corruption.values()) else "explore")
INTERACTIVE = nb.interactive_default() if INTERACTIVE is None else INTERACTIVE
figures = nb.figures_dir(FIGURES_DIR, run)
print("mode:", MODE, "| run folder:", run, "| figures:", figures, "| widgets:", INTERACTIVE)

# %% [markdown]
# ## Point: train one tokenizer and measure it

# %%
if MODE == "point":
    from ldetok.runs import load_tokenizer, run_train_config

    overrides = dict(max_steps=STEPS, seed=SEED, device=DEVICE, batch_size=BATCH_SIZE, stats_images=STATS_IMAGES,
                     log_every=max(1, min(25, STEPS // 10)), image_every=0, tensorboard=False)
    overrides.update({k: v for k, v in corruption.items() if v is not None})
    summary = nb.train_in_process_or_torchrun("tokenizer", PRESET, overrides, run / "tokenizer_run", NPROC)
    tok = load_tokenizer(run / "tokenizer_run").eval()
    cfg = run_train_config(run / "tokenizer_run")
    x, _ = nb.images(cfg.data.dataset, N_EVAL, cfg.data.eval_split, cfg.model.image_size, cfg.model.in_channels)
    sweep = nb.psnr_sweep(tok, x, [0.0, 0.3, 0.5, 0.7], [0.5], EVAL_GAMMA, "interpolative", SEED)
    stats = nb.latent_summary(tok, x)
    c = cfg.corruption  # what the run was trained with, read back from its folder
    metrics = {"gamma": c.gamma, "max_mask_ratio": c.max_mask_ratio, "noise_type": c.noise_type,
               "noise_dist": c.noise_dist, "seed": SEED, "steps": summary["step"],
               "final_loss": nb.tail_mean(run / "tokenizer_run"), "psnr_clean": sweep["psnr_noise"][0],
               "psnr_mask0.5": sweep["psnr_mask"][0], "latent_std": stats["std"], "latent_abs_mean": stats["abs_mean"],
               "latent_min": stats["min"], "latent_max": stats["max"]}
    metrics.update({f"psnr_t{t:g}": p for t, p in zip(sweep["levels"][1:], sweep["psnr_noise"][1:])})
    print(nb.log_metrics(metrics, run))
    display(pd.Series(metrics))

# %% [markdown]
# ## The result tables
# Each table: its parameters (what the runs were given) and its metrics (what was measured).

# %%
if MODE == "explore":
    sources = E.default_sources(nb.project_root(), list(SOURCES) + ([SWEEP_DIR] if SWEEP_DIR is not None else []))
    tables = {name: E.load_results(path) for name, path in sources.items()}
    for name, rows in tables.items():
        print(f"{name}: {len(rows)} rows from {sources[name]}")
        print("  parameters that vary:", ", ".join(E.varying(rows, E.parameters(rows))) or "none")
        print("  metrics:", ", ".join(E.metrics(rows)))
    display(pd.DataFrame(next(iter(tables.values()))))

# %% [markdown]
# ## Default views
# For each table: the key metrics against its main parameter, one line per variant; mean ± std over seeds.

# %%
if MODE == "explore":
    written = {}
    for name, rows in tables.items():
        fig = E.views_figure(rows, E.default_views(rows), title=f"{name} ({sources[name].name})")
        written[name] = nb.save_fig(fig, f"nb04_{name}", figures)
        nb.show_figure(fig)

# %% [markdown]
# ## Explore
# Choose the results table, the metric (its label says whether higher or lower is better), the x-axis
# parameter, the grouping (one line per value) and a filter (keep one value of one parameter); the view
# is redrawn on every change. Parameters that vary but are neither the x axis nor the grouping are named
# in the title: they were averaged over, narrow them with the filter.

# %%
if MODE == "explore" and INTERACTIVE:
    display(E.explorer(sources))
elif MODE == "explore":
    print("headless run: the widget panel is drawn only in a live kernel (the default views above are its starting points)")

# %%
if MODE == "explore":
    print(nb.log_metrics({"sources": {name: {"path": str(sources[name]), "rows": len(rows),
                                             "figure": str(written[name])} for name, rows in tables.items()},
                          "views": {name: [list(v) for v in E.default_views(rows)] for name, rows in tables.items()}},
                         run))

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
# # 05 · Latent robustness and how easy the latents are to denoise
#
# For several tokenizers: reconstruction quality as the latents are corrupted (interpolative noise at
# t = 0 … 0.9, masking at 0 … 0.9), the statistics of their latents (per-channel mean / std, range), and
# the training loss a small fixed denoiser (a tiny flow model from `ldetok.generators`, the same seed,
# steps and batches for every tokenizer) reaches on each tokenizer's normalised latents: the paper's
# claim is that l-DeTok latents are easier for a generator to model.
#
# `TOKENIZER_RUNS` maps presets to runs; `"auto"` takes the run `make run` wrote (`runs/main`), and a
# missing one is trained here for `STEPS` steps.

# %% tags=["parameters"]
PRESET = "cpu-fmnist"  # preset of quick tokenizers trained for missing runs ("-ae" runs use PRESET-ae)
STATS_IMAGES = 2000  # latent-statistics images of a quick tokenizer
DEVICE = "auto"
NPROC = 1
SEED = 0
STEPS = 300  # steps of a quick tokenizer, only when a run is missing
TOKENIZER_RUNS = {"cpu-fmnist": "auto", "cpu-fmnist-ae": "auto"}  # preset -> run; "auto": the one `make run` wrote
N_EVAL = 256
EVAL_GAMMA = 3.0  # the noise scale every tokenizer is measured under (shared, so the curves compare)
DENOISER = "sit"  # a generator family or registry name
DENOISER_STEPS = 300
DENOISER_BATCH = 128
RUN_DIR = None  # default runs/notebooks/05_latent_robustness
FIGURES_DIR = None  # None: RUN_DIR/figures; `make notebooks` passes figures

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd

from ldetok import notebook as nb
from ldetok.runs import load_tokenizer, run_train_config

run = nb.run_dir(RUN_DIR, "05_latent_robustness")
figures = nb.figures_dir(FIGURES_DIR, run)
levels = [round(0.1 * i, 1) for i in range(10)]
runs = {name: nb.ensure_tokenizer(nb.tokenizer_run(p, name), nb.preset_for(name, PRESET), STEPS, run / "quick" / name,
                                  NPROC, seed=SEED, stats_images=STATS_IMAGES)
        for name, p in TOKENIZER_RUNS.items()}
toks = {name: load_tokenizer(p).eval() for name, p in runs.items()}
cfgs = {name: run_train_config(p) for name, p in runs.items()}
print({name: (c.data.dataset, c.corruption.describe()) for name, c in cfgs.items()})

# %% [markdown]
# ## Reconstruction against noise level and mask ratio

# %%
curves, stats = {}, {}
for name, tok in toks.items():
    c = cfgs[name]
    x, _ = nb.images(c.data.dataset, N_EVAL, c.data.eval_split, c.model.image_size, c.model.in_channels)
    curves[name] = nb.psnr_sweep(tok, x, levels, levels, EVAL_GAMMA, "interpolative", SEED)
    stats[name] = nb.latent_summary(tok, x)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, c in curves.items():
    axes[0].plot(c["levels"], c["psnr_noise"], "o-", ms=3, label=name)
    axes[1].plot(c["ratios"], c["psnr_mask"], "o-", ms=3, label=name)
axes[0].set(xlabel=f"t (interpolative, gamma={EVAL_GAMMA:g})", ylabel="PSNR (dB)", title="latent noise")
axes[1].set(xlabel="mask ratio", ylabel="PSNR (dB)", title="masking")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
nb.save_fig(fig, "nb05_robustness_curves", figures)
plt.show()

# %% [markdown]
# ## Latent statistics (posterior means of clean images)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for name, s in stats.items():
    axes[0].plot(s["channel_mean"], "o-", ms=3, label=name)
    axes[1].plot(s["channel_std"], "o-", ms=3, label=name)
axes[0].set(xlabel="channel", title="per-channel mean")
axes[1].set(xlabel="channel", title="per-channel std")
axes[0].legend(fontsize=7)
fig.tight_layout()
nb.save_fig(fig, "nb05_latent_stats", figures)
plt.show()
pd.DataFrame({name: {k: v for k, v in s.items() if not isinstance(v, list)} for name, s in stats.items()}).T

# %% [markdown]
# ## How hard are the latents to denoise?
# The same tiny denoiser, seed, steps and batch size on each tokenizer's normalised latents (encoded
# online); the number is the mean training loss over the last 20 % of the logged steps.

# %%
denoise = {}
for name, p in runs.items():
    out = run / "denoise" / name
    nb.train_in_process_or_torchrun("generator", "cpu-fmnist", dict(
        tokenizer=str(p), model=DENOISER, max_steps=DENOISER_STEPS, batch_size=DENOISER_BATCH, seed=SEED,
        device=DEVICE, latents="online", sample_steps=4, log_every=max(1, DENOISER_STEPS // 20),
        ckpt_every=max(1, DENOISER_STEPS), tensorboard=False), out, NPROC)
    denoise[name] = {"curve": nb.loss_curves(out, ("loss",))["loss"], "final": nb.tail_mean(out, "loss")}
fig, ax = plt.subplots(figsize=(5, 3))
for name, d in denoise.items():
    ax.plot(*d["curve"], label=f"{name}: {d['final']:.3f}")
ax.set(xlabel="step", ylabel="denoising loss", title=f"{DENOISER} on normalised latents")
ax.legend(fontsize=7)
nb.save_fig(fig, "nb05_denoiser_loss", figures)
plt.show()

# %%
metrics = {name: {"psnr_clean": curves[name]["psnr_noise"][0],
                  "psnr_t0.5": curves[name]["psnr_noise"][levels.index(0.5)],
                  "psnr_mask0.5": curves[name]["psnr_mask"][levels.index(0.5)],
                  "latent_std": stats[name]["std"], "latent_min": stats[name]["min"], "latent_max": stats[name]["max"],
                  "denoise_loss": denoise[name]["final"], "gamma": cfgs[name].corruption.gamma,
                  "max_mask_ratio": cfgs[name].corruption.max_mask_ratio} for name in runs}
print(nb.log_metrics({"tokenizers": metrics, "denoiser": DENOISER, "denoiser_steps": DENOISER_STEPS}, run))
pd.DataFrame(metrics).T

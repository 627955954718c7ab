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
# # 02 · Training a tokenizer
#
# Train a tokenizer from a preset (`ldetok presets` lists them; `cpu-fmnist` is l-DeTok γ=3, M=0.7 on
# Fashion-MNIST, `cpu-fmnist-ae` its plain-autoencoder twin), then look at its loss curves, its
# reconstructions and its PSNR / SSIM / rFID, clean and from corrupted latents. With `NPROC > 1` the
# training runs under `torchrun`; running the notebook again resumes or extends the same run.

# %% tags=["parameters"]
PRESET = "cpu-fmnist"
DEVICE = "auto"
NPROC = 1
SEED = 0
STEPS = 300
BATCH_SIZE = 128
STATS_IMAGES = 2000  # images for the per-channel latent statistics
LOG_EVERY = 25
N_EVAL = 500  # evaluation images
NOISE_LEVELS = [0.3, 0.5, 0.7]  # interpolative noise levels of the corrupted-latent evaluation
RFID = True  # rFID needs the (offline) Inception network: slow on a CPU
N_SHOW = 8
RUN_DIR = None  # default runs/notebooks/02_tokenizer_training
FIGURES_DIR = None  # None: RUN_DIR/figures; `make notebooks` passes figures

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Image, display

from ldetok import notebook as nb
from ldetok.eval.tokenizer import evaluate_tokenizer_run
from ldetok.runs import load_tokenizer, run_train_config
from ldetok.viz import save_grid

run = nb.run_dir(RUN_DIR, "02_tokenizer_training")
figures = nb.figures_dir(FIGURES_DIR, run)
tok_run = run / "tokenizer_run"
print("run folder:", run)

# %% [markdown]
# ## Train

# %%
overrides = dict(max_steps=STEPS, seed=SEED, device=DEVICE, batch_size=BATCH_SIZE, stats_images=STATS_IMAGES,
                 log_every=LOG_EVERY, image_every=0, tensorboard=False)
summary = nb.train_in_process_or_torchrun("tokenizer", PRESET, overrides, tok_run, NPROC)
cfg = run_train_config(tok_run)
print(cfg.model.name, cfg.data.dataset, "| corruption:", cfg.corruption.describe(), "| step", summary["step"])

# %% [markdown]
# ## Loss curves (from `metrics.jsonl`)

# %%
curves = nb.loss_curves(tok_run, ("loss", "pixel", "kl", "lr", "grad_norm"))
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for k in ("loss", "pixel"):
    if k in curves:
        axes[0].plot(*curves[k], label=k)
axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="reconstruction loss")
axes[0].legend()
for ax, k in zip(axes[1:], ("kl", "lr")):
    if k in curves:
        ax.plot(*curves[k])
    ax.set(xlabel="step", title=k)
fig.tight_layout()
nb.save_fig(fig, "nb02_loss_curves", figures)
plt.show()

# %% [markdown]
# ## Reconstructions (EMA tokenizer): inputs, then reconstructions

# %%
tok = load_tokenizer(tok_run).eval()
x, _ = nb.images(cfg.data.dataset, N_SHOW, cfg.data.eval_split, cfg.model.image_size, cfg.model.in_channels)
with torch.no_grad():
    rec = tok.decode(tok.encode(x)).clamp(-1, 1)
path = save_grid(torch.cat([x, rec]), nb.figure_path("nb02_reconstructions", figures), nrow=N_SHOW)
display(Image(filename=str(path)))

# %% [markdown]
# ## PSNR / SSIM / LPIPS / rFID, each with its protocol

# %%
ev = evaluate_tokenizer_run(tok_run, n=N_EVAL, noise_levels=NOISE_LEVELS, rfid=RFID, device=DEVICE, seed=SEED)
table = pd.DataFrame({setting: {r["name"]: r["value"] for r in res.values()} for setting, res in ev.items()}).T
table

# %%
metrics = {"steps": summary["step"], "final_loss": curves["loss"][1][-1], "n_eval": N_EVAL,
           "psnr_clean": ev["clean"]["psnr"]["value"], "ssim_clean": ev["clean"]["ssim"]["value"],
           "rfid_clean": ev["clean"].get("rfid", {}).get("value")}
metrics.update({f"psnr_t{t:g}": ev[f"t={t:g}"]["psnr"]["value"] for t in NOISE_LEVELS})
print(nb.log_metrics(metrics, run))
metrics

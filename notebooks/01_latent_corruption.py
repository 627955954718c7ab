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
# # 01 · Latent corruption: what the decoder of an l-DeTok tokenizer has learnt to undo
#
# l-DeTok trains its decoder on latents corrupted by **interpolative noise** `z' = (1-t)·z + t·γ·ε`
# (t ~ τ-distribution, γ = 3) and by **MAE-style masking** (ratio `max(0, U(-0.1, M))`). Here the latents of
# real photos (the bundled photo crops) and of Fashion-MNIST are corrupted over t = 0 … 0.9 and mask
# ratio 0 … 0.9 and decoded, by an l-DeTok tokenizer and by a plain autoencoder (γ = 0, M = 0) side by side;
# additive noise `z + t·γ·ε` is shown for comparison.
#
# Tokenizers: the released `detok_BB` / `vitok-BB` weights when `DETOK_PATH` / `VITOK_PATH` are given
# (256 px); else, with the run parameters left at `"auto"`, the Fashion-MNIST pair that `make run` trains
# (`runs/main/cpu-fmnist{,-ae}`, links to its `runs/main/tokenizers/…` runs) and the photo pair that
# `ldetok demo --prepare` trains (`runs/demo/cpu-photos{,-ae}`); a missing one is trained here for `STEPS`
# steps (into the run folder).
#
# In a live kernel (`make lab`) the last section is a slider panel: noise level, mask ratio, noise type
# and image, redrawn on every move. Figures go to the run folder (`RUN_DIR/figures`); only
# `make notebooks` writes the repository's `figures/`.

# %% tags=["parameters"]
PRESET = "cpu-fmnist"  # the preset of quick tokenizers trained when a run is missing (photos use cpu-photos)
DEVICE = "auto"
NPROC = 1
SEED = 0
STEPS = 300  # steps of a quick tokenizer, only when a run below is missing
DETOK_PATH = None  # released detok-BB-gamm3.0-m0.7.pth (optional)
VITOK_PATH = None  # released vitok-BB.pth (optional)
FMNIST_DETOK_RUN = "auto"  # "auto": the run `make run` wrote (runs/main); a path; None: train a quick one
FMNIST_AE_RUN = "auto"
PHOTOS_DETOK_RUN = "auto"  # "auto": the run `ldetok demo --prepare` wrote (runs/demo)
PHOTOS_AE_RUN = "auto"
STATS_IMAGES = 2000  # latent-statistics images of a quick tokenizer
N_IMAGES = 2  # images per sweep figure
N_PSNR = 64  # images for the PSNR curves
N_TAU = 20000  # samples for the tau histograms
GAMMA = None  # noise scale of the corruption shown; None: the l-DeTok run's own (3 for the released detok_BB)
INTERACTIVE = None  # slider panel; None: on in a live kernel, off under papermill
RUN_DIR = None  # default runs/notebooks/01_latent_corruption
FIGURES_DIR = None  # None: RUN_DIR/figures; `make notebooks` passes figures

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch

from ldetok import corruption as C
from ldetok import notebook as nb
from ldetok.runs import load_tokenizer
from ldetok.tokenizers import load_official_detok
from ldetok.viz import plot_corruption_sweeps, to_numpy_image

torch.manual_seed(SEED)
run = nb.run_dir(RUN_DIR, "01_latent_corruption")
dev = nb.device(DEVICE)
levels = [round(0.1 * i, 1) for i in range(10)]
INTERACTIVE = nb.interactive_default() if INTERACTIVE is None else INTERACTIVE
figures = nb.figures_dir(FIGURES_DIR, run)
print("run folder:", run, "| figures:", figures, "| device:", dev, "| sliders:", INTERACTIVE)

# %% [markdown]
# ## The noise-level (τ) distributions
# The released code draws t ~ U(0, 1); the paper's τ ablation found logit(t) ~ N(0.8, 1) best for MAR-B.
# The mask ratio is `max(0, U(-0.1, 0.7))`: about 12.5 % of batches are not masked at all.

# %%
g = torch.Generator().manual_seed(SEED)
taus = {"uniform": C.sample_noise_level(N_TAU, "uniform", generator=g),
        "logit-normal (0.8, 1)": C.sample_noise_level(N_TAU, "logit_normal", mean=0.8, std=1.0, generator=g)}
ratios_drawn = C.sample_mask_ratio(0.7, generator=g, n=N_TAU)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name, t in taus.items():
    axes[0].hist(t.numpy(), bins=50, range=(0, 1), density=True, alpha=0.6, label=name)
axes[0].set(xlabel="t", ylabel="density", title="noise level t")
axes[0].legend()
axes[1].hist(ratios_drawn.numpy(), bins=50, range=(0, 1), density=True, color="tab:green")
axes[1].set(xlabel="mask ratio", title="mask ratio max(0, U(-0.1, 0.7))")
nb.save_fig(fig, "nb01_tau_distributions", figures)
plt.show()

# %% [markdown]
# ## The tokenizers

# %%
if DETOK_PATH is not None:
    image_size = 256
    pairs = {"photos": {"l-DeTok (detok_BB)": load_official_detok(DETOK_PATH, model="detok_BB")},
             "fashion_mnist": {}}
    if VITOK_PATH is not None:
        pairs["photos"]["AE (vitok-BB)"] = load_official_detok(VITOK_PATH, model="detok_BB")
    pairs["fashion_mnist"] = pairs["photos"]
    trained_with = C.CorruptionConfig()  # the released detok-BB-gamm3.0-m0.7 recipe
else:
    image_size = 32
    wanted = {"fashion_mnist": {"l-DeTok": (FMNIST_DETOK_RUN, PRESET), "AE": (FMNIST_AE_RUN, PRESET + "-ae")},
              "photos": {"l-DeTok": (PHOTOS_DETOK_RUN, "cpu-photos"), "AE": (PHOTOS_AE_RUN, "cpu-photos-ae")}}
    pairs = {ds: {name: nb.ensure_tokenizer(nb.tokenizer_run(spec, preset), preset, STEPS, run / "quick" / preset, NPROC,
                                            seed=SEED, stats_images=STATS_IMAGES)
                  for name, (spec, preset) in toks.items()}
             for ds, toks in wanted.items()}
    print({ds: {name: str(p) for name, p in toks.items()} for ds, toks in pairs.items()})
    trained_with = nb.run_corruption(pairs["fashion_mnist"]["l-DeTok"])
    pairs = {ds: {name: load_tokenizer(p) for name, p in toks.items()} for ds, toks in pairs.items()}
GAMMA = trained_with.gamma if GAMMA is None else GAMMA
print("corruption shown: gamma =", GAMMA, "| the l-DeTok run was trained with:", trained_with.describe())
pairs = {ds: {name: tok.to(dev).eval() for name, tok in toks.items()} for ds, toks in pairs.items()}
data = {ds: nb.images(ds, max(N_IMAGES, N_PSNR), "test", image_size)[0].to(dev) for ds in pairs}
for ds, toks in pairs.items():
    print(ds, {name: f"{sum(p.numel() for p in t.parameters()) / 1e6:.2f}M params" for name, t in toks.items()})

# %% [markdown]
# ## Corrupted latents, decoded
# Each block: one tokenizer; rows alternate the noise sweep (one shared ε) and the mask sweep.

# %%
from IPython.display import Image, display  # noqa: E402

for ds, toks in pairs.items():
    for kind in C.NOISE:
        path = plot_corruption_sweeps(toks, data[ds][:N_IMAGES],
                                      nb.figure_path(f"nb01_{ds}_{kind}_sweep", figures), levels=levels,
                                      ratios=levels, gamma=GAMMA, noise_type=kind, seed=SEED + 18,
                                      title=f"{ds}: {kind} noise (gamma={GAMMA:g}) and masking, decoded")
        print(path)
        display(Image(filename=str(path)))

# %% [markdown]
# ## Reconstruction PSNR against the corruption
# The l-DeTok decoder should degrade gracefully; the autoencoder's decoder has never seen corrupted latents.

# %%
curves = {(ds, name, kind): nb.psnr_sweep(tok, data[ds][:N_PSNR], levels, levels if kind == "interpolative" else (),
                                          GAMMA, kind, SEED + 18)
          for ds, toks in pairs.items() for name, tok in toks.items() for kind in ("interpolative", "additive")}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for (ds, name, kind), c in curves.items():
    style = "-" if name.startswith("l-DeTok") else "--"
    axes[0 if kind == "interpolative" else 1].plot(c["levels"], c["psnr_noise"], style, marker="o", ms=3,
                                                   label=f"{ds} · {name}")
    if kind == "interpolative":
        axes[2].plot(c["ratios"], c["psnr_mask"], style, marker="o", ms=3, label=f"{ds} · {name}")
for ax, title, xl in zip(axes, ("interpolative noise", "additive noise", "masking"), ("t", "t", "mask ratio")):
    ax.set(title=title, xlabel=xl, ylabel="PSNR (dB)")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.tight_layout()
nb.save_fig(fig, "nb01_psnr_vs_corruption", figures)
plt.show()

# %% [markdown]
# ## Interactive: the corruption under sliders
# In a live kernel: choose the dataset, the noise level t, the mask ratio, the noise type and the image;
# each move decodes the corrupted latents of every tokenizer again (1–2 s on a CPU). A headless run
# (papermill) skips the panel.

# %%
from matplotlib.figure import Figure  # noqa: E402


def corruption_panel(dataset, t, mask_ratio, noise_type, index):
    """The input, then each tokenizer's decode of its noised and of its masked latents."""
    x = data[dataset][index:index + 1]
    n = 1 + 2 * len(pairs[dataset])
    fig = Figure(figsize=(2.2 * n, 2.5))
    axes = fig.subplots(1, n)
    axes[0].imshow(to_numpy_image(x[0]))
    axes[0].set_title("input", fontsize=8)
    i = 1
    for name, tok in pairs[dataset].items():
        sw = nb.corrupt_and_decode(tok, x, t, mask_ratio, GAMMA, noise_type, SEED)
        for key, what in (("noise", f"{noise_type} t={t:.2f}"), ("mask", f"mask {mask_ratio:.0%}")):
            axes[i].imshow(to_numpy_image(sw[key][0]))
            axes[i].set_title(f"{name}\n{what}", fontsize=8)
            i += 1
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


if INTERACTIVE:
    import ipywidgets as W

    display(nb.panel(corruption_panel, dict(
        dataset=W.Dropdown(options=list(pairs), description="dataset"),
        t=W.FloatSlider(0.5, min=0, max=1, step=0.05, description="noise t"),
        mask_ratio=W.FloatSlider(0.5, min=0, max=0.95, step=0.05, description="mask ratio"),
        noise_type=W.Dropdown(options=list(C.NOISE), description="noise type"),
        index=W.IntSlider(0, min=0, max=max(0, N_IMAGES - 1), description="image"))))
else:
    print("headless run: the slider panel is drawn only in a live kernel (INTERACTIVE = True forces it)")

# %%
summary = {f"psnr_{ds}_{name.split(' ')[0]}_{kind}_t{t:g}": c["psnr_noise"][c["levels"].index(t)]
           for (ds, name, kind), c in curves.items() for t in (0.0, 0.5)}
summary.update({f"psnr_{ds}_{name.split(' ')[0]}_mask0.5": c["psnr_mask"][c["ratios"].index(0.5)]
                for (ds, name, kind), c in curves.items() if kind == "interpolative"})
summary.update(image_size=image_size, released_weights=DETOK_PATH is not None,
               tau_logit_normal_mean=float(taus["logit-normal (0.8, 1)"].mean()),
               tau_uniform_mean=float(taus["uniform"].mean()), mask_ratio_zero_frac=float((ratios_drawn == 0).float().mean()))
print(nb.log_metrics(summary, run))
summary

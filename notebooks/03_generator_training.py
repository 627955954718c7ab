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
# # 03 · Training a generator on a tokenizer's latents
#
# Pick a tokenizer run (`TOKENIZER_RUN`: by default the l-DeTok run `make run` trains; a quick one is
# trained here when missing) and one of the six generator
# families (`MODEL`: `mar`, `randomar`, `rasterar`, `dit`, `sit`, `lightningdit`, or any registry size),
# train it on the tokenizer's normalised latents, look at its samples, then measure gFID / KID against the
# training images, after choosing the classifier-free guidance scale with a small cfg sweep.

# %% tags=["parameters"]
PRESET = "cpu-fmnist"  # generator preset
TOKENIZER_PRESET = "cpu-fmnist"  # used only when TOKENIZER_RUN is missing
TOKENIZER_RUN = "auto"  # "auto": the run `make run` wrote (runs/main/cpu-fmnist); a path; None: train one
TOKENIZER_STEPS = 300
MODEL = "sit"
STATS_IMAGES = 2000  # latent-statistics images of a quick tokenizer
DEVICE = "auto"
NPROC = 1
SEED = 0
STEPS = 300
BATCH_SIZE = 128
LATENTS = "cache"  # "cache" (encode the dataset once) or "online"
SAMPLE_STEPS = None  # sampler steps (None: the family's default)
N_EVAL = 500  # samples for gFID / KID
N_SEARCH = 200  # samples per cfg in the sweep
CFGS = [1.0, 1.5, 2.0, 3.0]
FEATURES = ["inception", "classifier"]  # feature spaces of the final evaluation ("classifier" trains a small CNN once)
SWEEP_FEATURES = "inception"
RUN_DIR = None  # default runs/notebooks/03_generator_training
FIGURES_DIR = None  # None: RUN_DIR/figures; `make notebooks` passes figures

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display

from ldetok import notebook as nb
from ldetok.eval.generation import evaluate_generator_run

run = nb.run_dir(RUN_DIR, "03_generator_training")
figures = nb.figures_dir(FIGURES_DIR, run)
tok_run = nb.ensure_tokenizer(nb.tokenizer_run(TOKENIZER_RUN, TOKENIZER_PRESET),
                              nb.preset_for(TOKENIZER_RUN, TOKENIZER_PRESET), TOKENIZER_STEPS, run / "tokenizer_run", NPROC,
                              seed=SEED, stats_images=STATS_IMAGES)
gen_run = run / f"generator_{MODEL}"
print("tokenizer:", tok_run, "| generator run:", gen_run)

# %% [markdown]
# ## Train

# %%
overrides = dict(tokenizer=str(tok_run), model=MODEL, max_steps=STEPS, batch_size=BATCH_SIZE, seed=SEED, device=DEVICE,
                 latents=LATENTS, sample_steps=SAMPLE_STEPS, log_every=max(1, min(25, STEPS // 10)),
                 ckpt_every=max(STEPS, 1), tensorboard=False)
summary = nb.train_in_process_or_torchrun("generator", PRESET, overrides, gen_run, NPROC)
curves = nb.loss_curves(gen_run, ("loss", "loss_smooth"))
fig, ax = plt.subplots(figsize=(5, 3))
for k, (s, v) in curves.items():
    ax.plot(s, v, label=k)
ax.set(xlabel="step", ylabel="loss", title=f"{MODEL} on {tok_run.name} latents")
ax.legend()
nb.save_fig(fig, f"nb03_{MODEL}_loss", figures)
plt.show()

# %% [markdown]
# ## Samples (EMA generator, one row per class)

# %%
grid = nb.copy_figure(gen_run / "images" / "samples_final.png", f"nb03_{MODEL}_samples", figures)
display(Image(filename=str(grid)))

# %% [markdown]
# ## cfg sweep, then gFID / KID at the best cfg

# %%
ev = evaluate_generator_run(gen_run, n=N_EVAL, guidance_scales=CFGS, n_search=N_SEARCH, extractors=FEATURES,
                            sweep_extractor=SWEEP_FEATURES, steps=SAMPLE_STEPS, seed=SEED, device=DEVICE)
sweep = ev["sweep"]
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(sweep["cfgs"], [sweep["table"][f"{c:g}"]["value"] for c in sweep["cfgs"]], "o-")
ax.axvline(sweep["best_cfg"], ls=":", c="gray")
ax.set(xlabel="cfg", ylabel=f"{sweep['metric'].upper()} ({SWEEP_FEATURES}, n={sweep['n_search']})",
       title=f"{MODEL}: guidance sweep")
nb.save_fig(fig, f"nb03_{MODEL}_cfg_sweep", figures)
plt.show()
pd.DataFrame({k: {"value": r["value"], "n": r["protocol"].get("n"), "features": r["protocol"].get("features")}
              for k, r in ev["metrics"].items()}).T

# %%
m = ev["metrics"]
metrics = {"model": MODEL, "steps": summary["step"], "final_loss": curves["loss"][1][-1], "best_cfg": ev["cfg"],
           "n_eval": N_EVAL, "gfid": m.get("fid", {}).get("value"), "kid": m.get("kid", {}).get("value"),
           "sweep_fid": {c: r["value"] for c, r in sweep["table"].items()}}
metrics.update({k: r["value"] for k, r in m.items() if isinstance(r.get("value"), (int, float))})
print(nb.log_metrics(metrics, run))
metrics

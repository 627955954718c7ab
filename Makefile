# The two set-up commands of the README, each working on a fresh machine from nothing:
#   make run    - create .venv, install, make sure the default data is there, run the main job
#                 (ldetok main = ldetok reproduce --preset cpu-main + figures + the table)
#   make test   - create .venv, install .[all], install the Debian packages the tests need (Fashion-MNIST,
#                 Chromium and its driver) when missing, run the test suite
# Other targets: install, data, prereqs, notebooks, lab, clean.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN_DIR ?= runs/main

export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
# Matplotlib: the headless targets (run, test, notebooks) set MPLBACKEND=Agg for themselves only;
# `make lab` starts its kernels with the inline backend (a global Agg would hide every inline figure).
# Weight files live in the user's standard caches (torch hub: $TORCH_HOME, default ~/.cache/torch;
# Hugging Face: $HF_HOME, default ~/.cache/huggingface): `make run`, `make lab` and the CLI use them.
# Only the tests use a project-local torch cache (below; tests/conftest.py and .ci/run set the same).

.PHONY: run test install data prereqs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the project's dependencies change. --no-compile: Python compiles each module when it is
# first imported instead of pip compiling every file of every package (154 s -> 70 s here).
# The `ldetok` Jupyter kernel (the notebooks name it) is registered inside the venv, pointing at its Python.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --no-compile -e '.[all]'
	$(BIN)/python -m ipykernel install --sys-prefix --name ldetok --display-name "Python (ldetok)" >/dev/null
	touch $@

install: $(VENV)/.installed

# ---- system prerequisites: Debian packages, installed when missing ----------------------------
#   data     Fashion-MNIST, Debian's dataset-fashion-mnist (MIT): make run, make test, make notebooks
#   browser  chromium and chromium-driver: the demo's headless browser test (make test only)
# The bundled photos ship inside scikit-image, scikit-learn and matplotlib (pip).
have_data    = $(BIN)/python -m ldetok.data --check
have_browser = command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser; } >/dev/null
debs_data    = dataset-fashion-mnist
debs_browser = chromium chromium-driver
# $(call apt_prereqs,data browser): check each; when some are missing, apt-get update + install their
# packages (sudo only when not root), check again and fail naming whatever is still missing.
apt_prereqs = need=""; \
	$(foreach p,$1,$(have_$p) || need="$$need $(debs_$p)";) \
	[ -z "$$need" ] || { \
	  echo "installing Debian packages:$$need"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
	  $(foreach p,$1,$(have_$p) >/dev/null || { echo "still missing after apt-get: $(debs_$p)" >&2; exit 1; };) \
	}

data: install  # what make run and make notebooks need
	@$(call apt_prereqs,data)

prereqs: install  # everything make test needs
	@$(call apt_prereqs,data browser)

run: export MPLBACKEND ?= Agg
run: data
	$(BIN)/ldetok main --out $(RUN_DIR)

test: export TORCH_HOME ?= $(CURDIR)/.cache/torch
test: export MPLBACKEND ?= Agg
test: prereqs
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache

# ---- notebooks -----------------------------------------------------------------------------
# `make notebooks`: the five notebooks executed headlessly (papermill, CPU preset, NB_STEPS steps) into
# runs/notebooks/<name>/executed.ipynb; their figures go to figures/ (FIGURES_DIR=figures: nb01_*.png ...
# nb05_*.png; a notebook run by hand writes RUN_DIR/figures instead). Headless runs use the kernel
# `python3`, the Python running papermill (the venv's), whatever kernels the user has registered.
# `make lab`: JupyterLab on 127.0.0.1 with the venv's kernels first (JUPYTER_PATH), among them `ldetok`,
# the one the notebooks name, and the inline matplotlib backend.
NB_STEPS ?= 300
NB_OUT   ?= runs/notebooks
PAPERMILL = OMP_NUM_THREADS=1 $(BIN)/python -m papermill --cwd $(CURDIR) --no-progress-bar --log-output -k python3 \
  -p FIGURES_DIR figures
.PHONY: notebooks lab

notebooks: export MPLBACKEND ?= Agg
notebooks: data
	mkdir -p $(addprefix $(NB_OUT)/,01_latent_corruption 02_tokenizer_training 03_generator_training 04_ablations 05_latent_robustness)
	$(PAPERMILL) notebooks/01_latent_corruption.ipynb $(NB_OUT)/01_latent_corruption/executed.ipynb \
	  -p STEPS $(NB_STEPS) -p RUN_DIR $(NB_OUT)/01_latent_corruption
	$(PAPERMILL) notebooks/02_tokenizer_training.ipynb $(NB_OUT)/02_tokenizer_training/executed.ipynb \
	  -p PRESET cpu-fmnist -p STEPS $(NB_STEPS) -p N_EVAL 200 -p RUN_DIR $(NB_OUT)/02_tokenizer_training
	$(PAPERMILL) notebooks/03_generator_training.ipynb $(NB_OUT)/03_generator_training/executed.ipynb \
	  -p TOKENIZER_RUN $(NB_OUT)/02_tokenizer_training/tokenizer_run -p MODEL sit -p STEPS $(NB_STEPS) \
	  -p N_EVAL 200 -p N_SEARCH 100 -p RUN_DIR $(NB_OUT)/03_generator_training
	OMP_NUM_THREADS=1 $(BIN)/python -m ldetok.sweep notebooks/04_ablations.ipynb --grid gamma=0,3 max_mask_ratio=0,0.7 \
	  --out $(NB_OUT)/04_ablations/sweep --param STEPS=$(NB_STEPS) --kernel python3
	$(PAPERMILL) notebooks/04_ablations.ipynb $(NB_OUT)/04_ablations/executed.ipynb \
	  -p SWEEP_DIR $(NB_OUT)/04_ablations/sweep -p RUN_DIR $(NB_OUT)/04_ablations
	$(PAPERMILL) notebooks/05_latent_robustness.ipynb $(NB_OUT)/05_latent_robustness/executed.ipynb \
	  -p STEPS $(NB_STEPS) -p DENOISER_STEPS $(NB_STEPS) -p RUN_DIR $(NB_OUT)/05_latent_robustness

lab: install
	$(BIN)/python -m ipykernel install --sys-prefix --name ldetok --display-name "Python (ldetok)" >/dev/null
	JUPYTER_PATH=$(CURDIR)/$(VENV)/share/jupyter MPLBACKEND=module://matplotlib_inline.backend_inline \
	  $(BIN)/jupyter lab --ip 127.0.0.1 --allow-root --no-browser --ServerApp.root_dir=$(CURDIR)

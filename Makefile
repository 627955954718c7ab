# The two set-up commands of the README, each working on a fresh machine from nothing:
#   make run    - create .venv, install, make sure the default data is there, run the main job
#   make test   - create .venv, install .[all], run the test suite
# Other targets: install, data, notebooks, lab, clean.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN_DIR ?= runs/main

export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export TORCH_HOME ?= $(CURDIR)/.cache/torch
export MPLBACKEND ?= Agg

.PHONY: run test install data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (MIT); the bundled photos ship
# inside scikit-image, scikit-learn and matplotlib.
data: install
	@$(BIN)/python -m ldetok.data --check || { \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  $(BIN)/python -m ldetok.data --check; }

run: data
	$(BIN)/ldetok main --out $(RUN_DIR)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache

"""Test-wide environment: offline, no analytics, a project-local TORCH_HOME, few threads; and
``require``, the one gate for a test's prerequisites (data, browser, optional packages)."""

import importlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TORCH_HOME", str(ROOT / ".cache" / "torch"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("LDETOK_CACHE", str(ROOT / ".cache" / "ldetok"))  # reference stats, classifiers

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tiny test tensors gain nothing from two, and a loaded machine makes two threads
# (per process) dramatically slower through oversubscription.
torch.set_num_threads(1)

# Under CI every prerequisite is installed (`make test` installs them), so a missing one is a broken
# set-up: the test fails, naming it, instead of skipping. Only CUDA tests skip there.
CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(condition, what: str) -> None:
    """Go on when ``condition`` holds; else skip (locally) or fail (under ``CI=true``), naming ``what``:
    the missing prerequisite and how to install it. Usable in tests, fixtures and at module level (where a
    CI failure is a collection error that stops the run: prefer a fixture)."""
    __tracebackhide__ = True  # report the test's line, not this one
    if condition:
        return
    if CI:
        pytest.fail(f"missing prerequisite: {what} (CI is set: the test must run, not skip)", pytrace=False)
    pytest.skip(f"missing prerequisite: {what}", allow_module_level=True)


def require_module(name: str, how: str):
    """The imported module ``name``, or ``require``'s skip / CI failure naming it and ``how`` to install it."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"Python package {name!r} ({how}; import failed: {e})")


@pytest.fixture
def gen():
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tok_run(tmp_path_factory):
    """A tiny finished l-DeTok run on Fashion-MNIST (3 steps): exported tokenizer with latent statistics."""
    from ldetok.config import resolve_tokenizer_config
    from ldetok.engine.tokenizer_trainer import train_tokenizer

    run = tmp_path_factory.mktemp("tok")
    cfg = resolve_tokenizer_config("cpu-fmnist", dict(max_steps=3, batch_size=16, stats_images=64, log_every=1,
                                                      image_every=0, tensorboard=False))
    train_tokenizer(cfg, run)
    return run


def step_losses(run_dir, key: str = "loss") -> dict:
    """step -> logged ``key``, the last record of each step (a resumed run logs some steps twice)."""
    from ldetok.engine.logging import read_metrics

    out = {}
    for rec in read_metrics(run_dir):
        if key in rec:
            out[rec["step"]] = rec[key]
    return out

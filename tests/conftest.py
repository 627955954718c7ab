"""Test-wide environment: offline, no analytics, a project-local TORCH_HOME, few threads."""

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

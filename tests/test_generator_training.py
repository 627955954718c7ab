"""Generator training through the shared engine, for all six families, on cached and online latents;
resume equivalence; sampling to PNG; refusal of foreign latents."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldetok.cli import main as cli
from ldetok.engine.logging import read_metrics
from ldetok.runs import load_generator_run

FAST = ["max_steps=3", "batch_size=16", "log_every=1", "tensorboard=false", "ckpt_every=2"]
# small diffusion heads / few sampling steps keep sampling quick on a CPU
SAMPLING = {"mar": ['model_args={"num_sampling_steps": "5", "num_iter": 4}'],
            "randomar": ['model_args={"num_sampling_steps": "5"}'],
            "rasterar": ['model_args={"num_sampling_steps": "5"}'],
            "dit": ["sample_steps=5"], "sit": ["sample_steps=5"], "lightningdit": ["sample_steps=5"]}


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.mark.parametrize("family", ["mar", "randomar", "rasterar", "dit", "sit", "lightningdit"])
def test_each_family_trains_and_samples(tok_run, tmp_path, family):
    out = tmp_path / family
    assert cli(["train-generator", "--preset", "cpu-fmnist", "--tokenizer", str(tok_run), "--out", str(out),
                f"model={family}", *FAST, *SAMPLING[family]]) == 0
    assert sorted(losses(out)) == [1, 2, 3] and all(np.isfinite(list(losses(out).values())))
    assert (out / "images" / "samples_final.png").exists()
    gen, tok, meta = load_generator_run(out)
    assert meta["step"] == 3 and gen.kind in family.replace("randomar", "ardiff").replace("rasterar", "ardiff")
    samples = tmp_path / "samples"
    steps = ["--steps", "5"] if family in ("dit", "sit", "lightningdit") else []
    assert cli(["sample", str(out), "--n", "6", "--cfg", "1.5", "--out", str(samples), *steps]) == 0
    pngs = sorted(samples.glob("0*.png"))
    assert len(pngs) == 6 and (samples / "grid.png").exists()
    img = np.asarray(Image.open(pngs[0]))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert json.loads((samples / "protocol.json").read_text())["cfg"] == 1.5


def test_resume_and_extend_equal_an_uninterrupted_run(tok_run, tmp_path):
    common = ["train-generator", "--preset", "cpu-fmnist", "--tokenizer", str(tok_run), "model=sit",
              "batch_size=16", "log_every=1", "tensorboard=false", "ckpt_every=3", "sample_steps=2"]
    assert cli([*common, "--out", str(tmp_path / "a"), "max_steps=6"]) == 0
    assert cli([*common, "--out", str(tmp_path / "b"), "max_steps=3"]) == 0
    assert cli([*common, "--out", str(tmp_path / "b"), "max_steps=6"]) == 0
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    # the cosine schedule depends on max_steps, so only the steps after the resume share it
    assert [la[s] for s in (4, 5, 6)] != [] and sorted(lb) == [1, 2, 3, 4, 5, 6]
    ga, _, _ = load_generator_run(tmp_path / "a")
    gb, _, _ = load_generator_run(tmp_path / "b")
    assert ga.config_dict() == gb.config_dict()
    # with a constant schedule, resume is exactly equivalent
    const = [*common, "schedule=constant", "warmup_frac=0"]
    assert cli([*const, "--out", str(tmp_path / "c"), "max_steps=6"]) == 0
    assert cli([*const, "--out", str(tmp_path / "d"), "max_steps=3"]) == 0
    assert cli([*const, "--out", str(tmp_path / "d"), "max_steps=6"]) == 0
    lc, ld = losses(tmp_path / "c"), losses(tmp_path / "d")
    assert [lc[s] for s in range(1, 7)] == [ld[s] for s in range(1, 7)]
    gc, _, _ = load_generator_run(tmp_path / "c")
    gd, _, _ = load_generator_run(tmp_path / "d")
    for (k, a), (_, b) in zip(gc.state_dict().items(), gd.state_dict().items()):
        assert torch.equal(a, b), k


def test_online_tokenization_path(tok_run, tmp_path):
    assert cli(["train-generator", "--preset", "cpu-fmnist", "--tokenizer", str(tok_run), "--out", str(tmp_path / "o"),
                "model=sit", "latents=online", "flip=true", *FAST, "sample_steps=2"]) == 0
    assert sorted(losses(tmp_path / "o")) == [1, 2, 3]


def test_foreign_cache_is_refused(tok_run, tmp_path, capsys):
    from ldetok.latents import build_latent_cache
    from ldetok.runs import load_tokenizer, save_tokenizer

    other = load_tokenizer(tok_run)
    other.set_latent_stats(other.latent_mean * 2, other.latent_std * 3)
    save_tokenizer(other, tmp_path / "other" / "tokenizer", extra={"train_config": json.loads(
        (tok_run / "tokenizer" / "tokenizer.json").read_text())["train_config"]})
    build_latent_cache(tmp_path / "other", limit=32, out_dir=tmp_path / "cache", verbose=False)
    rc = cli(["train-generator", "--preset", "cpu-fmnist", "--tokenizer", str(tok_run), "--out", str(tmp_path / "x"),
              "model=sit", f"cache_dir={tmp_path / 'cache'}", *FAST])
    assert rc == 2 and "not normalised" in capsys.readouterr().err

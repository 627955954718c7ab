"""Every value is checked before work: each bad value, flag or run folder is refused by the CLI in one
line naming it, within seconds, before any image is read or any latent cache is built, never with a
traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ldetok import cli, data, latents
from ldetok.config import generator_arg_names, model_args_errors
from ldetok.engine import common, generator_trainer, tokenizer_trainer
from ldetok.eval import tokenizer as eval_tokenizer
from ldetok.runs import save_generator


@pytest.fixture
def no_work(monkeypatch):
    """Reading any image or idx file, building a dataset or a latent cache, or training fails the test."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the values were checked")

    for mod, name in ((data, "read_idx"), (data, "load_rgb"), (data, "bundled_photos"),
                      (latents, "build_latent_cache"), (generator_trainer, "build_latent_cache"),
                      (generator_trainer, "build_dataset"), (tokenizer_trainer, "build_dataset"),
                      (eval_tokenizer, "build_dataset"), (generator_trainer, "train_generator"),
                      (tokenizer_trainer, "train_tokenizer")):
        monkeypatch.setattr(mod, name, forbidden)


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, tok_run):
    """A finished (untrained) generator run on the tiny tokenizer run: 10 classes."""
    from ldetok.generators import build_generator

    torch.manual_seed(0)
    gen = build_generator("dit_tiny", depth=1)
    run = tmp_path_factory.mktemp("gen")
    save_generator(gen, run / "generator", {"name": "dit_tiny", "tokenizer": str(tok_run), "num_classes": 10})
    return run


def refused(capsys, argv, *expected):
    """Run the CLI; it must exit 2 within seconds with one error line containing every ``expected``."""
    t0 = time.perf_counter()
    rc = cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert elapsed < 5, (argv, elapsed)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"ldetok {argv[0]}: error:")]
    assert lines, err
    for text in expected:
        assert text in err, (argv, text, err)
    return err


# ------------------------------------------------------------------ config values
@pytest.mark.parametrize("override, message", [
    ("model=nosuchmodel", "model 'nosuchmodel' is no generator; available: dit_base"),
    ('model_args={"depthh":4}', "unknown model argument depthh for sit_tiny; known: depth, grad_checkpointing"),
    ('model_args={"num_classes":4}', "num_classes is set by the trainer"),
    ("model_args=[4]", "model_args must be a JSON object"),
    ("ckpt_every=0", "ckpt_every must be >= 1, got 0"),
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("keep_ckpts=0", "keep_ckpts must be >= 1"),
    ("sample_every=-1", "sample_every must be >= 0"),
    ("milestone_every=-5", "milestone_every must be >= 0"),
    ("sample_steps=0", "sample_steps must be >= 1"),
    ("max_steps=0", "max_steps must be >= 1"),
    ("batch_size=0", "batch_size and grad_accum must be >= 1"),
    ("lr=0", "lr must be > 0"),
    ("class_dropout=1.5", "class_dropout must be in [0, 1)"),
])
def test_generator_values_refused_before_the_cache(capsys, no_work, tok_run, tmp_path, override, message):
    refused(capsys, ["train-generator", "--tokenizer", str(tok_run), "--out", str(tmp_path / "g"), override], message)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("override, message", [
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("ckpt_every=0", "ckpt_every must be >= 1, got 0"),
    ("image_every=-1", "image_every must be >= 0"),
    ("stats_images=0", "stats_images >= 2"),
    ("grad_accum=0", "batch_size and grad_accum must be >= 1"),
    ("patch_size=0", "patch_size and latent_channels >= 1"),
    ("in_channels=2", "in_channels must be 1 or 3"),
    ("grad_clip=-1", "grad_clip must be >= 0"),
])
def test_tokenizer_values_refused(capsys, no_work, tmp_path, override, message):
    refused(capsys, ["train-tokenizer", "--preset", "cpu-fmnist", "--out", str(tmp_path / "t"), override], message)


def test_model_args_known_from_the_signatures():
    assert {"depth", "hidden_size", "num_heads", "patch_size"} <= set(generator_arg_names("sit"))
    assert "diffloss_d" in generator_arg_names("mar_base") and "order" in generator_arg_names("randomar_tiny")
    assert "noise_schedule" in generator_arg_names("dit_tiny")
    assert generator_arg_names("nosuchmodel") is None
    assert model_args_errors("mar_tiny", '{"diffloss_d": 3, "num_iter": 8}') == []
    assert model_args_errors("sit_tiny", "{bad json") == [
        'model_args must be a JSON object, e.g. {"depth": 4}, got \'{bad json\'']


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(capsys, no_work, tmp_path, tok_run):
    refused(capsys, ["train-tokenizer", "--out", str(tmp_path / "t"), "device=cuda"], "CUDA is not available")
    refused(capsys, ["eval-tokenizer", str(tok_run), "--device", "cuda"], "CUDA is not available")


def test_imagefolder_without_test_split(capsys, no_work, tmp_path):
    folder = tmp_path / "photos"
    for c in ("cats", "dogs"):
        (folder / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / c / "x.png")
    refused(capsys, ["train-tokenizer", "--out", str(tmp_path / "t"), "dataset=imagefolder", f"data_root={folder}"],
            "has no 'test' split", "eval_split=train")


# ------------------------------------------------------------------ flags
def test_eval_tokenizer_flags(capsys, no_work, tok_run):
    refused(capsys, ["eval-tokenizer", str(tok_run), "--noise", "7"], "--noise '7'", "[0.0, 1.0]")
    refused(capsys, ["eval-tokenizer", str(tok_run), "--noise", "0.3,-0.1"], "--noise", "got -0.1")
    refused(capsys, ["eval-tokenizer", str(tok_run), "--noise", "0.5,abc"], "--noise '0.5,abc'", "numbers")
    refused(capsys, ["eval-tokenizer", str(tok_run), "--n", "0"], "--n must be >= 1")


def test_sample_flags(capsys, no_work, monkeypatch, gen_run, tmp_path):
    from ldetok import sampling

    monkeypatch.setattr(sampling, "load_generator_run", lambda *a, **k: pytest.fail("loaded the generator"))
    out = str(tmp_path / "s")
    refused(capsys, ["sample", str(gen_run), "--out", out, "--n", "-3"], "--n must be >= 1, got -3")
    refused(capsys, ["sample", str(gen_run), "--out", out, "--n", "0"], "--n must be >= 1, got 0")
    refused(capsys, ["sample", str(gen_run), "--out", out, "--labels", "99"], "has 10 classes", "0 .. 9", "99")
    refused(capsys, ["sample", str(gen_run), "--out", out, "--labels", "1,-2"], "--labels", "got -2")
    refused(capsys, ["sample", str(gen_run), "--out", out, "--labels", "x"], "--labels 'x'", "integers")
    refused(capsys, ["sample", str(gen_run), "--out", out, "--seed", "-1"], "--seed must be >= 0")
    refused(capsys, ["sample", str(tmp_path / "none"), "--out", out], "no such file or folder")


def test_reproduce_and_eval_generator_flags(capsys, monkeypatch, tmp_path, gen_run):
    from ldetok import reproduce
    from ldetok.eval import generation

    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: pytest.fail("reproduce started"))
    monkeypatch.setattr(generation, "evaluate_generator_run", lambda *a, **k: pytest.fail("evaluation started"))
    refused(capsys, ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "r"), "--seeds", "x"], "--seeds 'x'")
    refused(capsys, ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "r"), "--cfg-search", "1,b"],
            "--cfg-search '1,b'")
    refused(capsys, ["eval-generator", str(gen_run), "--cfg-sweep", "1.5,z"], "--cfg-sweep '1.5,z'")
    refused(capsys, ["eval-generator", str(gen_run), "--n", "0"], "--n must be >= 1")


# ------------------------------------------------------------------ the --tokenizer run's state
def test_tokenizer_run_states_each_named(capsys, no_work, tok_run, gen_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tok_run, unfinished, ignore=shutil.ignore_patterns("tokenizer"))
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "no such file or folder",
        tmp_path / "empty": "an empty folder",
        unfinished: "an unfinished tokenizer run (checkpoints up to step 3",
        gen_run: "a finished generator run; expected a finished tokenizer run",
    }
    messages = set()
    for path, text in cases.items():
        err = refused(capsys, ["train-generator", "--tokenizer", str(path), "--out", str(tmp_path / "g")], str(path), text)
        messages.add(err.replace(str(path), "PATH"))
        refused(capsys, ["eval-tokenizer", str(path)], text)
        refused(capsys, ["cache", str(path)], text)
    assert len(messages) == len(cases)  # four different messages


def test_cache_flags(capsys, no_work, tok_run):
    refused(capsys, ["cache", str(tok_run), "--limit", "0"], "--limit must be >= 1")
    refused(capsys, ["cache", str(tok_run), "--batch-size", "0"], "--batch-size must be >= 1")


# ------------------------------------------------------------------ threads, and the real command line
def test_thread_count_respects_omp(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert common.configure_threads({"OMP_NUM_THREADS": "1"}) == \
            f"threads: 1 ({common.usable_cpus()} CPUs; OMP_NUM_THREADS=1)"
        assert torch.get_num_threads() == 1
        cpus = common.usable_cpus()
        line = common.configure_threads({})
        assert line == f"threads: {cpus} ({cpus} CPUs; OMP_NUM_THREADS unset)" and torch.get_num_threads() == cpus
        line = common.configure_threads({"LOCAL_WORLD_SIZE": str(2 * cpus), "OMP_NUM_THREADS": "x"})
        assert line.startswith("threads: 1 ") and "'x' ignored" in line and f"{2 * cpus} processes" in line
    finally:
        torch.set_num_threads(before)


def test_command_line_one_line_no_traceback(tmp_path, tok_run):
    """The installed entry point: the thread line first, then one error line, exit 2, in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ldetok.cli", "train-generator", "--tokenizer", str(tok_run),
                        "--out", str(tmp_path / "g"), 'model_args={"depthh":4}'],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown model argument depthh for sit_tiny" in p.stderr
    assert time.perf_counter() - t0 < 60  # interpreter and torch start-up included
    p = subprocess.run([sys.executable, "-m", "ldetok.cli", "eval-tokenizer", str(tok_run), "--noise", "0.5,abc"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--noise '0.5,abc'" in p.stderr
    assert p.stdout.splitlines()[0] == f"ldetok eval-tokenizer: threads: 1 ({common.usable_cpus()} CPUs; OMP_NUM_THREADS=1)"
    assert json.loads((tok_run / "config.json").read_text())  # the run is untouched

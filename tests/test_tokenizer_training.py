"""Tokenizer training end to end through the command line: exact resume after 5 random SIGKILLs, extending a
finished run, two-process (gloo) training, decoder fine-tuning."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import step_losses
from ldetok.corruption import CorruptionConfig
from ldetok.engine.logging import read_metrics
from ldetok.runs import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMON = ["batch_size=16", "log_every=1", "ckpt_every=5", "stats_images=64", "image_every=0",
          "tensorboard=false", "warmup_frac=0.1"]


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ldetok.cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600, **kw)


losses = step_losses


def _records(out: Path) -> list:
    return [r for r in read_metrics(out) if "loss" in r] if (out / "metrics.jsonl").exists() else []


def _run_until_killed(args, out: Path, new_steps: int, rng: random.Random, mid_save: bool) -> str:
    """Start the run and SIGKILL it once it has logged ``new_steps`` more steps, after a random pause or,
    with ``mid_save``, the moment a checkpoint temp file appears after that; returns its output."""
    n0 = len(_records(out))
    proc = subprocess.Popen([sys.executable, "-m", "ldetok.cli", *args, "--out", str(out)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, reached = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if reached is None:
            if len(_records(out)) - n0 >= new_steps:
                reached = len(_records(out))
                if not mid_save:
                    time.sleep(rng.uniform(0.0, 0.2))
                    break
            time.sleep(0.02)
        elif any((out / "checkpoints").glob(".ckpt_*.tmp")) or len(_records(out)) >= reached + 6:
            break
        else:
            time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    return proc.communicate()[0]


@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted_run(tmp_path):
    """Killed 5 times at random points (one of them while a checkpoint is written) and resumed each time,
    the run ends bit-identical to an uninterrupted one: every logged loss, the export's weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["train-tokenizer", "--preset", "cpu-fmnist", "max_steps=60", *COMMON]
    r = cli(*args, "--out", str(a))
    assert r.returncode == 0, r.stderr
    la = losses(a)
    assert sorted(la) == list(range(1, 61))

    rng = random.Random(1)
    for i in range(5):
        out = _run_until_killed(args, b, rng.randint(2, 14), rng, mid_save=i == 2)
        if i:  # each restart resumed from a checkpoint (the newest one that verified) or started over
            assert "resumed from step" in out or "training detok" in out, out[-2000:]
    assert (b / ".lock").exists()  # left by the last killed process: the next one takes it over

    r = cli(*args, "--out", str(b))
    assert r.returncode == 0, r.stderr
    assert "took over the lock" in r.stdout
    lb = losses(b)
    assert sorted(lb) == list(range(1, 61))
    # every record of every attempt (steps done again after a kill included) equals the uninterrupted run's
    recs = [rec for rec in read_metrics(b) if "loss" in rec]
    assert len(recs) >= 60 and all(rec["loss"] == la[rec["step"]] for rec in recs)
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    for (k, va), (_, vb) in zip(ta.state_dict().items(), tb.state_dict().items()):
        assert torch.equal(va, vb), k
    assert not list((b / "checkpoints").glob(".*.tmp")) and not (b / ".lock").exists()

    # running again with a larger max_steps extends the finished run
    r = cli("train-tokenizer", "--preset", "cpu-fmnist", "max_steps=64", *COMMON, "--out", str(a))
    assert r.returncode == 0, r.stderr
    assert "resumed from step 60" in r.stdout + r.stderr
    assert max(losses(a)) == 64
    assert json.loads((a / "tokenizer" / "tokenizer.json").read_text())["step"] == 64


@pytest.mark.slow
def test_changed_config_is_refused_on_resume(tmp_path):
    args = ["train-tokenizer", "--preset", "cpu-fmnist", "max_steps=5", *COMMON, "--out", str(tmp_path / "r")]
    assert cli(*args).returncode == 0
    r = cli(*args, "gamma=1.0")
    assert r.returncode == 2 and "gamma" in r.stderr


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ldetok.cli", "train-tokenizer",
           "--preset", "cpu-fmnist", "max_steps=8", *COMMON, "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = losses(out)
    assert sorted(rec) == list(range(1, 9)) and all(v == v for v in rec.values())
    tok = load_tokenizer(out)
    assert tok.has_stats and tok.latent_shape(32) == (16, 4, 4)
    ck = torch.load(sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True)
    assert len(ck["rngs"]) == 2  # both ranks' RNG streams are saved


@pytest.mark.slow
def test_decoder_finetuning_freezes_encoder(tmp_path):
    base = tmp_path / "base"
    assert cli("train-tokenizer", "--preset", "cpu-fmnist", "max_steps=4", *COMMON, "--out", str(base)).returncode == 0
    ft = tmp_path / "ft"
    r = cli("train-tokenizer", "--preset", "cpu-fmnist", "stage=decoder_ft", f"init_from={base}", "max_steps=4",
            *COMMON, "--out", str(ft))
    assert r.returncode == 0, r.stderr
    t0, t1 = load_tokenizer(base), load_tokenizer(ft)
    enc0 = {k: v for k, v in t0.state_dict().items() if k.startswith("encoder.")}
    enc1 = {k: v for k, v in t1.state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert any(not torch.equal(a, b) for (k, a), (_, b) in zip(t0.state_dict().items(), t1.state_dict().items())
               if k.startswith("decoder."))
    # it trained with corruption off, although its config keeps the recipe the encoder was trained with
    assert "corruption: no noise; no masking" in r.stdout
    from ldetok.config import resolve_tokenizer_config
    from ldetok.engine.tokenizer_trainer import TokenizerTrainer

    cfg = resolve_tokenizer_config("cpu-fmnist", dict(stage="decoder_ft", init_from=str(base), max_steps=4,
                                                      batch_size=16, stats_images=64, tensorboard=False))
    assert cfg.corruption == CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    trainer = TokenizerTrainer(cfg, tmp_path / "probe")
    try:
        assert trainer.corruption == CorruptionConfig.off() and trainer.pass_.cfg == CorruptionConfig.off()
        x = trainer.x_vis[:4]
        with torch.no_grad():
            out = trainer.pass_(x, generator=torch.Generator().manual_seed(0))
            clean = trainer.model.posterior(x).mean
        assert out.mask is None and out.noise_level is None
        # the frozen encoder sees every token: the pass's posterior is the clean one
        assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if n.startswith("encoder."))
        assert torch.equal(out.posterior.mean, trainer.model.nchw_to_visible(clean))
    finally:
        trainer.logger.close()

"""Nothing lost under faults: checkpoints verified before they are trusted, the non-finite step guard, one
process per run folder, damaged run artefacts named (and a damaged latent cache rebuilt)."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import step_losses
from ldetok.cli import main
from ldetok.config import resolve_tokenizer_config
from ldetok.engine.checkpoint import CheckpointManager
from ldetok.engine.tokenizer_trainer import TokenizerTrainer, train_tokenizer
from ldetok.engine.trainer import NonFiniteTrainingError
from ldetok.generators import build_generator
from ldetok.latents import LatentCache, build_latent_cache
from ldetok.runs import (DamagedFileError, RunFolderBusy, RunFolderLock, RunLayout, load_generator_run,
                         load_tokenizer, run_kind, RunKind, save_generator)

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(batch_size=16, log_every=1, ckpt_every=3, stats_images=64, image_every=0, tensorboard=False,
            warmup_frac=0.0, schedule="constant")


def _cfg(**over):
    return resolve_tokenizer_config("cpu-fmnist", dict(FAST, **over))


def _garble_middle(path: Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of a file with random bytes (its size stays the same)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _log(run: Path) -> str:
    return RunLayout(run).log.read_text()


# ---------------------------------------------------------------------------------------------
# Checkpoints verified before they are trusted
# ---------------------------------------------------------------------------------------------
def test_garbage_in_the_newest_checkpoint_is_skipped_and_the_run_finishes_finite(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    train_tokenizer(_cfg(max_steps=9), ref)
    train_tokenizer(_cfg(max_steps=6), run)
    bad = RunLayout(run).checkpoints / "ckpt_000000006.pt"
    _garble_middle(bad)  # torch.load would not notice: it lands in a tensor's bytes
    assert torch.load(bad, weights_only=True)["step"] == 6
    with pytest.warns(UserWarning, match="ckpt_000000006.pt"):
        train_tokenizer(_cfg(max_steps=9), run)
    log = _log(run)
    assert f"skipped checkpoint {bad}" in log and "sha256 differs" in log
    assert "resumed from step 3" in log
    got, want = step_losses(run), step_losses(ref)
    assert sorted(got) == list(range(1, 10)) and all(math.isfinite(v) for v in got.values())
    assert all(got[s] == want[s] for s in want)  # resumed from step 3 exactly: the same trajectory
    wa, wb = load_file(str(ref / "tokenizer" / "model.safetensors")), load_file(str(run / "tokenizer" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_unlisted_and_unverified_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=5)
    for step in (1, 2):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step))})
    # a file the manifest does not list (a process killed between the file and its record) is not trusted
    torch.save({"step": 3, "w": torch.zeros(3)}, mgr.path_for(3))
    with pytest.warns(UserWarning, match="ckpt_000000003.pt: not listed"):
        state, path = mgr.auto_resume()
    assert path == mgr.path_for(2) and state["step"] == 2 and mgr.skipped == [mgr.path_for(3)]
    # a folder from before manifests: its checkpoints load unverified, and say so
    (mgr.dir / "manifest.json").unlink()
    state, path = mgr.auto_resume()
    assert path == mgr.path_for(3) and "loaded unverified" in mgr.notes[0]
    # its first manifest keeps the old files (unverified) so that they remain a way back
    mgr.save(4, {"step": 4, "w": torch.zeros(3)})
    files = mgr.read_manifest()
    assert files["ckpt_000000001.pt"]["sha256"] is None and files["ckpt_000000004.pt"]["sha256"]
    # a truncated file is caught by its recorded size before torch.load sees it
    data = mgr.path_for(4).read_bytes()
    mgr.path_for(4).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="truncated"):
        state, path = mgr.auto_resume()
    assert path == mgr.path_for(3)


def test_pruning_keeps_the_newest_good_checkpoint(tmp_path):
    """keep=2 with NaN-poisoned newer checkpoints: the last finite one survives, and resuming uses it."""
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    for step, finite in ((1, True), (2, True), (3, False), (4, False), (5, False)):
        mgr.save(step, {"step": step, "w": torch.full((2,), float(step) if finite else float("nan"))}, finite=finite)
    assert [p.name for p in mgr.list()] == ["ckpt_000000002.pt", "ckpt_000000004.pt", "ckpt_000000005.pt"]
    with pytest.warns(UserWarning, match="not finite"):
        state, path = mgr.auto_resume()
    assert path == mgr.path_for(2) and state["step"] == 2


# ---------------------------------------------------------------------------------------------
# The non-finite guard
# ---------------------------------------------------------------------------------------------
def _inject_nan(monkeypatch, at_steps, seen=None):
    """Make the loss of the given steps NaN (after the real forward, so every random draw is unchanged)."""
    orig = TokenizerTrainer.micro_step

    def micro_step(self, x):
        if seen is not None:
            seen[self.step] = ({k: v.clone() for k, v in self.model.state_dict().items()},
                               {k: v.clone() for k, v in self.ema.state_dict().items() if torch.is_tensor(v)})
        loss, logs = orig(self, x)
        if self.step in at_steps:
            loss = loss * float("nan")
            logs = dict(logs, loss=float("nan"))
        return loss, logs

    monkeypatch.setattr(TokenizerTrainer, "micro_step", micro_step)


def test_a_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    seen = {}
    _inject_nan(monkeypatch, {2}, seen)
    run = tmp_path / "run"
    train_tokenizer(_cfg(max_steps=5), run)
    # the step after the NaN starts from exactly the weights (and EMA) the NaN step started from
    for before, after in zip(seen[2], seen[3]):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(seen[1][0][k], seen[2][0][k]) for k in seen[1][0])  # a finite step does update
    recs = [json.loads(line.replace("NaN", "null")) for line in RunLayout(run).metrics.read_text().splitlines()]
    assert [r["step"] for r in recs if "nonfinite_steps" in r] == [3] and recs[2]["nonfinite_steps"] == 1
    assert all(math.isfinite(r["loss_smooth"]) for r in recs)  # the smoothed loss is not poisoned
    assert "step 3: non-finite loss or gradient norm" in _log(run) and "1 in a row, 1 in all" in _log(run)
    assert load_tokenizer(run).has_stats
    # no checkpoint while the streak lasted (step 3); the next one counts the skipped step
    ck = RunLayout(run).checkpoints
    assert not (ck / "ckpt_000000003.pt").exists() and "no checkpoint at step 3" in _log(run)
    assert torch.load(ck / "ckpt_000000005.pt", weights_only=True)["nonfinite_steps"] == 1


def test_consecutive_nan_losses_stop_the_run_saving_nothing(tmp_path, monkeypatch, capsys):
    _inject_nan(monkeypatch, set(range(100)))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps"):
        train_tokenizer(_cfg(max_steps=10, ckpt_every=1, max_nonfinite_steps=3), run)
    assert not list(RunLayout(run).checkpoints.glob("ckpt_*")) and not RunLayout(run).tokenizer.exists()
    assert not RunLayout(run).lock.exists()  # released
    # the command line says it in one line
    rc = main(["train-tokenizer", "--preset", "cpu-fmnist", "--out", str(tmp_path / "cli"), "max_steps=10",
               "ckpt_every=1", "max_nonfinite_steps=2", "batch_size=16", "stats_images=64", "image_every=0",
               "tensorboard=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "2 consecutive steps" in err[0] and "max_nonfinite_steps" in err[0]


# ---------------------------------------------------------------------------------------------
# One process per run folder
# ---------------------------------------------------------------------------------------------
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def test_a_second_process_on_a_locked_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunFolderLock(run):
        r = subprocess.run([sys.executable, "-m", "ldetok.cli", "train-tokenizer", "--preset", "cpu-fmnist",
                            "--out", str(run), "max_steps=2"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2, r.stderr
        assert f"run folder {run} is in use by PID {os.getpid()} (host {socket.gethostname()})" in r.stderr
        assert not RunLayout(run).config.exists()  # refused before anything was written
        with pytest.raises(RunFolderBusy, match=f"PID {os.getpid()}"):  # in this process too
            TokenizerTrainer(_cfg(max_steps=2), run)
    # a lock held by another live process
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ldetok.runs import RunFolderLock; "
                               f"RunFolderLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"in use by PID {holder.pid} "):
            RunFolderLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    # ... which the kernel releases when it dies: the next process takes the lock over
    lock = RunFolderLock(run).acquire()
    assert lock.took_over == (holder.pid, socket.gethostname())
    lock.release()
    assert not RunLayout(run).lock.exists() and run_kind(run) == RunKind.EMPTY


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    RunLayout(run).lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert run_kind(run) == RunKind.EMPTY  # a left-over lock does not make a folder something else
    trainer = TokenizerTrainer(_cfg(max_steps=2), run)
    try:
        assert trainer.lock.took_over == (dead.pid, socket.gethostname())
        assert json.loads(RunLayout(run).lock.read_text())["pid"] == os.getpid()
        trainer.fit()
    finally:
        trainer.close()
    assert f"from PID {dead.pid}" in _log(run) and not RunLayout(run).lock.exists()


# ---------------------------------------------------------------------------------------------
# Damaged files are named
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def export(tok_run, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(tok_run / "tokenizer", d)
    return d


def _drop_digest(d: Path, meta_name: str = "tokenizer.json") -> None:
    meta = json.loads((d / meta_name).read_text())
    meta.pop("weights_sha256")
    (d / meta_name).write_text(json.dumps(meta))


def test_damaged_tokenizer_exports_are_named(export, capsys):
    weights, meta = export / "model.safetensors", export / "tokenizer.json"
    good = weights.read_bytes()
    # garbage in the middle of the weights: only the recorded digest sees it
    _garble_middle(weights)
    with pytest.raises(DamagedFileError, match=f"{weights} is damaged.*sha256"):
        load_tokenizer(export)
    # truncated weights (an export without a digest, as written before digests): safetensors' error, named
    _drop_digest(export)
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(DamagedFileError, match=f"{weights} is damaged \\(unreadable"):
        load_tokenizer(export)
    # statistics missing from the weights
    state = {k: v for k, v in load_file_bytes(good).items() if k not in ("latent_mean", "latent_std")}
    save_file(state, str(weights))
    with pytest.raises(DamagedFileError, match="missing: latent_mean, latent_std"):
        load_tokenizer(export)
    # garbage in tokenizer.json
    meta.write_bytes(b"\x00garbage{")
    with pytest.raises(DamagedFileError, match=f"{meta} is damaged \\(not valid JSON"):
        load_tokenizer(export)
    # the command line prints one line naming the file
    assert main(["cache", str(export), "--out", str(export.parent / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(meta) in err[0] and "restore" in err[0]


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_a_damaged_export_inside_a_run_says_how_to_export_it_again(tok_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tok_run, run)
    (run / "tokenizer" / "tokenizer.json").write_text("{")
    with pytest.raises(DamagedFileError, match=r"export it again by running the same `ldetok train-tokenizer"):
        load_tokenizer(run)


def test_damaged_generator_exports_are_named(tok_run, tmp_path, capsys):
    gen = build_generator("sit_tiny", latent_shape=(16, 4, 4), num_classes=10)
    d = save_generator(gen, tmp_path / "gen", {"name": "sit_tiny", "tokenizer": str(tok_run)})
    g, _, _ = load_generator_run(d)
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), gen.state_dict().values()))
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=f"{weights} is damaged"):
        load_generator_run(d)
    assert main(["sample", str(d), "--n", "2", "--out", str(tmp_path / "samples")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0]


def test_a_truncated_latent_cache_is_detected_and_rebuilt(tok_run, tmp_path, capsys):
    out = tmp_path / "cache"
    cache = build_latent_cache(tok_run, out_dir=out, limit=40, batch_size=16, shard_size=16)
    want = np.array(cache.moments)
    del cache
    moments = out / "moments.npy"
    moments.write_bytes(moments.read_bytes()[:-1000])
    with pytest.raises(DamagedFileError, match=f"{moments} is .* bytes, expected"):
        LatentCache(out)
    capsys.readouterr()
    cache = build_latent_cache(tok_run, out_dir=out, limit=40, batch_size=16, shard_size=16)
    said = capsys.readouterr().out
    assert "up to date" not in said and f"latent cache damaged, rebuilding it: {moments}" in said
    assert np.array_equal(np.array(cache.moments), want)
    del cache
    # a header without its statistics
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("latent_std")
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DamagedFileError, match="meta.json is damaged \\(missing latent_std\\)"):
        LatentCache(out)
    capsys.readouterr()
    build_latent_cache(tok_run, out_dir=out, limit=40, batch_size=16, shard_size=16)
    assert "rebuilding" in capsys.readouterr().out and LatentCache(out).std.numel() == 16

"""The sharded latent cache: 1 and 2 gloo processes build the same bytes, a killed build resumes with
only its missing shards and ends identical to an uninterrupted one, and the generator trainer under
torchrun builds its cache with every rank and trains from it."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ldetok.latents as L
from conftest import step_losses
from ldetok.latents import LatentCache, build_latent_cache
from ldetok.runs import load_tokenizer, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
N, SHARD, BATCH = 300, 32, 16  # 10 shards, the last one partial (12 items)
ARRAYS = ("moments.npy", "moments_flip.npy", "labels.npy")
SHARDED = dict(limit=N, flip=True, shard_size=SHARD, batch_size=BATCH, verbose=False)


def _env():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _torchrun(args, nproc=2, timeout=600):
    """``torchrun --standalone --nproc_per_node nproc ARGS`` (its own free port); fails with the output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _same_cache(a: Path, b: Path, arrays=ARRAYS):
    for name in arrays:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = json.loads((a / "meta.json").read_text()), json.loads((b / "meta.json").read_text())
    assert ma == mb  # statistics, count, fingerprint, shapes


@pytest.fixture(scope="module")
def reference(tok_run, tmp_path_factory):
    """An uninterrupted single-process build."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    build_latent_cache(tok_run, out_dir=out, **SHARDED)
    return out


@pytest.mark.slow
def test_one_and_two_processes_build_identical_bytes(tok_run, reference, tmp_path):
    out = tmp_path / "two"
    _torchrun(["-m", "ldetok.cli", "cache", str(tok_run), "--flip", "--limit", str(N), "--shard-size", str(SHARD),
               "--batch-size", str(BATCH), "--num-workers", "1", "--device", "cpu", "--out", str(out)])
    _same_cache(reference, out)
    assert not (tmp_path / "two.tmp").exists()
    cache = LatentCache(out)
    assert len(cache) == N and cache.moments_flip.shape == cache.moments.shape
    assert cache.meta["complete"] and cache.labels.min() >= 0
    cache.check_tokenizer(load_tokenizer(tok_run), tok_run)


SLOW_BUILD = """
import sys, time
import ldetok.latents as L
fetch = L.fetch_batch
def slow(ds, idx):  # slow enough to be killed mid-way
    time.sleep(0.25)
    return fetch(ds, idx)
L.fetch_batch = slow
L.build_latent_cache(sys.argv[1], out_dir=sys.argv[2], limit={N}, flip=True, shard_size={SHARD}, batch_size={BATCH},
                     verbose=False)
""".format(N=N, SHARD=SHARD, BATCH=BATCH)


def test_killed_build_resumes_with_missing_shards_only(tok_run, reference, tmp_path, monkeypatch):
    out, done_dir = tmp_path / "c", tmp_path / "c.tmp" / "done"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(tok_run), str(out)], cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 300
        while not (done_dir.is_dir() and len(list(done_dir.iterdir())) >= 3):
            assert proc.poll() is None, "the slow build ended before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = {int(p.name) for p in done_dir.iterdir()}
    assert 3 <= len(done) < 10 and not (out / "meta.json").exists()
    # the resumed build reads (and encodes) exactly the shards without a marker
    read = []
    fetch = L.fetch_batch
    monkeypatch.setattr(L, "fetch_batch", lambda ds, idx: (read.extend(idx), fetch(ds, idx))[1])
    build_latent_cache(tok_run, out_dir=out, **SHARDED)
    missing = [i for s in range(10) if s not in done for i in range(s * SHARD, min(N, (s + 1) * SHARD))]
    assert sorted(read) == read == missing
    _same_cache(reference, out)
    assert not (tmp_path / "c.tmp").exists()
    # a complete cache is reused: nothing is read again
    read.clear()
    build_latent_cache(tok_run, out_dir=out, **SHARDED)
    assert read == []


def test_stale_temp_of_another_build_is_discarded(tok_run, reference, tmp_path):
    """Markers of a build with other settings (here: another item count) never count for this one."""
    out = tmp_path / "c"
    tmp = tmp_path / "c.tmp"
    build_latent_cache(tok_run, out_dir=tmp_path / "small", **dict(SHARDED, limit=64))
    (tmp_path / "small").rename(tmp)
    (tmp / "meta.json").unlink()
    (tmp / "done").mkdir()
    for s in range(10):
        (tmp / "done" / f"{s:06d}").touch()
    (tmp / "build.json").write_text(json.dumps({"key": {"count": 64}, "shard_size": SHARD}))
    build_latent_cache(tok_run, out_dir=out, **SHARDED)
    _same_cache(reference, out)


def _fake_cifar(folder: Path, per_batch: int = 40) -> None:
    """CIFAR-10 python batches of random images (5 x per_batch train items)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


TRAIN_UNDER_TORCHRUN = """
import sys
import ldetok.latents as L
from ldetok.cli import main
L.DEFAULT_SHARD_SIZE = 24  # several shards from 200 items, so both ranks encode
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_generator_trainer_under_torchrun_builds_the_cache_with_every_rank(tok_run, tmp_path):
    # the same tokenizer, its run pointing at a small CIFAR-10 folder
    data = tmp_path / "cifar"
    _fake_cifar(data)
    train_config = json.loads((tok_run / "tokenizer" / "tokenizer.json").read_text())["train_config"]
    train_config["data"].update(dataset="cifar10", data_root=str(data))
    tok = tmp_path / "tok"
    save_tokenizer(load_tokenizer(tok_run), tok / "tokenizer", extra={"train_config": train_config})
    script = tmp_path / "train.py"
    script.write_text(TRAIN_UNDER_TORCHRUN)
    gen = tmp_path / "gen"
    out = _torchrun([str(script), "train-generator", "--preset", "cpu-fmnist", "--tokenizer", str(tok), "--out", str(gen),
               "model=sit", "max_steps=3", "batch_size=16", "log_every=1", "tensorboard=false", "ckpt_every=3",
               "sample_steps=2", "sample_every=0"])
    # 9 shards over 2 ranks: rank 0 encoded 5, rank 1 the other 4
    assert "9 shards of 24 over 2 rank(s)" in out and "encoded 5/5 shards on rank 0" in out
    losses = step_losses(gen)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    cache = tok / "latents" / "cifar10_train"
    assert len(LatentCache(cache)) == 200
    # the bytes a single process writes with the same shards
    build_latent_cache(tok, out_dir=tmp_path / "single", shard_size=24)
    _same_cache(cache, tmp_path / "single", arrays=("moments.npy", "labels.npy"))


GROUP_TIMEOUT = """
import sys, time
from ldetok.engine.distributed import barrier, init_distributed
info = init_distributed("cpu", timeout_min=0.05)  # 3 s
if info.rank == 1:
    time.sleep(8)  # never joins the barrier in time
    sys.exit(0)
t = time.monotonic()
try:
    barrier()
except RuntimeError:
    print(f"timed out after {time.monotonic() - t:.1f} s", flush=True)
"""


@pytest.mark.slow
def test_process_group_timeout_is_configurable(tmp_path):
    from ldetok.config import RunConfig
    from ldetok.engine.distributed import init_distributed

    with pytest.raises(ValueError, match="timeout_min"):
        init_distributed("cpu", timeout_min=0)
    errs = []
    RunConfig(dist_timeout_min=0).validate(errs)
    assert any("dist_timeout_min" in e for e in errs)
    script = tmp_path / "timeout.py"
    script.write_text(GROUP_TIMEOUT)
    out = _torchrun([str(script)], timeout=120)
    seconds = float(out.split("timed out after ")[1].split()[0])
    assert 2 < seconds < 7.5  # the group's own timeout, not PyTorch's default

"""Engine building blocks: EMA, optimiser/lr, checkpoints, RNG, sampler, logging, distributed."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldetok.engine import (
    EMA,
    CheckpointError,
    CheckpointManager,
    DistInfo,
    Progress,
    ResumableSampler,
    RunLogger,
    all_reduce_mean,
    all_reduce_sum,
    atomic_save,
    barrier,
    broadcast_object,
    build_adamw,
    capture_rng_state,
    cleanup,
    gather_objects,
    init_distributed,
    load_checkpoint,
    lr_at,
    param_groups,
    read_metrics,
    resolve_device,
    restore_rng_state,
    scaled_lr,
    set_lr,
)
from ldetok.engine import checkpoint as ckpt_mod

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- EMA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.register_buffer("stats", torch.zeros(2), persistent=False)  # not tracked


def _perturb(model: nn.Module, k: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * (k + 1) * (i + 1))
        model.bn.running_mean.add_(1.0 + k)
        model.bn.num_batches_tracked.add_(1)


def test_ema_matches_hand_computation():
    torch.manual_seed(0)
    model = Tiny()
    decay = 0.9
    ema = EMA(model, decay=decay)
    assert "stats" not in ema.state_dict()  # non-persistent buffers are not tracked
    hand = {k: v.clone() for k, v in ema.state_dict().items()}
    for k in range(3):
        _perturb(model, k)
        ema.update(model)
        live = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, prev in hand.items():
            src = live[name].detach()
            averaged = src.is_floating_point() and (name != "frozen")
            hand[name] = decay * prev + (1 - decay) * src if averaged else src.clone()
    sd = ema.state_dict()
    for name, v in hand.items():
        torch.testing.assert_close(sd[name], v, rtol=1e-6, atol=1e-6, msg=name)
    # frozen params and int buffers are copies of the live values
    assert torch.equal(sd["frozen"], model.frozen)
    assert sd["bn.num_batches_tracked"].item() == 3
    assert sd["bn.num_batches_tracked"].dtype == torch.long
    assert not torch.allclose(sd["lin.weight"], model.lin.weight)  # genuinely averaged
    assert ema.num_updates == 3


def test_ema_apply_to_swaps_and_restores_and_module_copy():
    torch.manual_seed(0)
    model = Tiny()
    ema = EMA(model, decay=0.5)
    _perturb(model, 0)
    ema.update(model)
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with ema.apply_to(model) as m:
        assert m is model
        torch.testing.assert_close(model.lin.weight, ema.shadow["lin.weight"])
        torch.testing.assert_close(model.bn.running_mean, ema.shadow["bn.running_mean"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    copy_ = ema.module(model)
    assert copy_ is not model and not copy_.training
    assert not any(p.requires_grad for p in copy_.parameters())
    torch.testing.assert_close(copy_.lin.weight, ema.shadow["lin.weight"])
    assert torch.equal(model.lin.weight, live["lin.weight"])  # original untouched


def test_ema_state_dict_roundtrip_weights_only(tmp_path):
    model = Tiny()
    ema = EMA(model, decay=0.9)
    _perturb(model, 1)
    ema.update(model)
    atomic_save({"ema": ema.state_dict()}, tmp_path / "e.pt")
    ema2 = EMA(Tiny(), decay=0.9)
    ema2.load_state_dict(load_checkpoint(tmp_path / "e.pt")["ema"])
    for k, v in ema.state_dict().items():
        assert torch.equal(ema2.state_dict()[k], v)
    with pytest.raises(KeyError, match="missing"):
        ema2.load_state_dict({"lin.weight": torch.zeros(2, 3)})
    # official model_ema dicts carry params only: strict=False accepts them
    missing, unexpected = ema2.load_state_dict({"lin.weight": torch.zeros(2, 3)}, strict=False)
    assert "bn.running_mean" in missing and not unexpected
    with pytest.raises(ValueError, match="shape"):
        ema2.load_state_dict({"lin.weight": torch.zeros(3, 3)}, strict=False)


def test_ema_unwraps_wrappers():
    class Wrapper(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    model = Tiny()
    ema = EMA(Wrapper(model), decay=0.0)
    assert "lin.weight" in ema.state_dict()
    _perturb(model, 0)
    ema.update(Wrapper(model))
    torch.testing.assert_close(ema.shadow["lin.weight"], model.lin.weight)


# --------------------------------------------------------------------------- optimiser / lr


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.attn_qkv = nn.Linear(8, 24, bias=False)
        self.scale = nn.Parameter(torch.ones(8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_official_rule():
    groups, names = param_groups(Net(), weight_decay=0.05)
    assert set(names["decay"]) == {"proj.weight", "attn_qkv.weight"}
    assert set(names["no_decay"]) == {
        "pos_embed",
        "mask_token",
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "scale",
    }
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 2 and len(groups[1]["params"]) == 6
    opt = build_adamw(Net(), lr=1e-3, weight_decay=0.05)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert not opt.defaults.get("fused")  # CPU params: no fused kernel
    set_lr(opt, 3e-4)
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


def test_scaled_lr_and_lr_at_closed_form():
    assert scaled_lr(1e-4, 1024) == pytest.approx(4e-4)
    base, mn, total, warm = 4e-4, 1e-6, 1000, 250
    assert lr_at(0, total, base, warm, min_lr=mn) == 0.0
    assert lr_at(125, total, base, warm, min_lr=mn) == pytest.approx(base / 2)
    assert lr_at(warm, total, base, warm, min_lr=mn) == pytest.approx(base)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, total, base, warm, min_lr=mn) == pytest.approx(mn + (base - mn) * 0.5)
    s = 400
    expected = mn + (base - mn) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    assert lr_at(s, total, base, warm, min_lr=mn) == pytest.approx(expected)
    assert lr_at(total, total, base, warm, min_lr=mn) == pytest.approx(mn)
    assert lr_at(total + 10, total, base, warm, min_lr=mn) == pytest.approx(mn)
    assert lr_at(600, total, base, warm, "constant", min_lr=mn) == base
    assert lr_at(mid, total, base, warm, "linear", min_lr=0.0) == pytest.approx(base / 2)
    assert lr_at(0, 10, 1e-3) == pytest.approx(1e-3)  # no warm-up starts at base_lr
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 10, 1e-3, warmup_steps=11)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1e-3, schedule="step")
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, 10, 1e-3, min_lr=1.0)


# --------------------------------------------------------------------------- checkpoints


def test_atomic_save_no_temp_and_crash_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "c.pt"
    atomic_save({"x": torch.arange(3)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]

    def boom(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))


def test_load_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_manager_keep_n_and_milestones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2, milestone_every=300)
    for step in range(100, 1001, 100):
        mgr.save(step, {"step": step})
    assert [int(p.stem.split("_")[1]) for p in mgr.list()] == [300, 600, 900, 1000]
    assert mgr.latest().name == "ckpt_000001000.pt"
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 1000, "file": "ckpt_000001000.pt"}
    assert not list(tmp_path.glob("*.tmp")) and not any(p.is_symlink() for p in tmp_path.iterdir())
    # newest by step number, not mtime
    os.utime(tmp_path / "ckpt_000000300.pt", (2e9, 2e9))
    assert mgr.latest().name == "ckpt_000001000.pt"
    plain = CheckpointManager(tmp_path / "plain", keep=1)
    for step in (5, 10, 20):
        plain.save(step, {"step": step})
    assert [p.name for p in plain.list()] == ["ckpt_000000020.pt"]
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep=0)


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    """A process killed while writing a checkpoint, the manifest or the latest.json pointer leaves its temp
    file; the next save removes every such leftover (and nothing else)."""
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, {"step": 1})
    left = [tmp_path / ".ckpt_000000002.pt.ab12.tmp", tmp_path / ".manifest.json.cd34.tmp",
            tmp_path / ".latest.json.ef56.tmp"]
    for p in left:
        p.write_text("partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    mgr.save(2, {"step": 2})
    assert not any(p.exists() for p in left) and (tmp_path / "notes.tmp").exists()
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2


def test_auto_resume_skips_corrupt_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    assert mgr.auto_resume() == (None, None)
    mgr.save(10, {"step": 10, "w": torch.ones(2)})
    mgr.save(20, {"step": 20, "w": torch.ones(2) * 2})
    mgr.path_for(30).write_bytes(b"\x00garbage" * 10)
    with pytest.warns(UserWarning, match="ckpt_000000030.pt"):
        state, path = mgr.auto_resume()
    assert path.name == "ckpt_000000020.pt" and state["step"] == 20
    assert mgr.skipped == [mgr.path_for(30)]
    # keep=1 after resuming below a bad file: the fresh save must survive pruning
    mgr1 = CheckpointManager(tmp_path, keep=1)
    mgr1.save(25, {"step": 25})
    assert mgr1.path_for(25).exists()


def test_rng_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    np.random.standard_normal()
    state = capture_rng_state()
    atomic_save({"rng": state}, tmp_path / "rng.pt")
    ref = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(4).tolist(),
        np.random.standard_normal(),
        torch.rand(4).tolist(),
        torch.randn(2).tolist(),
    )
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(4).tolist(),
        np.random.standard_normal(),
        torch.rand(4).tolist(),
        torch.randn(2).tolist(),
    )
    assert again == ref


# --------------------------------------------------------------------------- sampler


def test_sampler_batches_are_a_pure_function_of_the_step():
    kw = {"dataset_len": 23, "batch_size": 4, "seed": 7}
    ref_s = ResumableSampler(**kw)
    assert ref_s.batches_per_epoch == 5 == len(ref_s)
    reference = [ref_s.batch(k // 5, k % 5) for k in range(20)]  # spans several epochs
    fresh = ResumableSampler(**kw)  # a resumed run: a new sampler, asked from step 7 on
    assert [fresh.batch(k // 5, k % 5) for k in range(7, 20)] == reference[7:]
    assert reference[0] != reference[5]  # epochs are reshuffled
    epoch0 = [i for b in reference[:5] for i in b]
    assert len(set(epoch0)) == 20 and all(0 <= i < 23 for i in epoch0)
    assert ResumableSampler(**{**kw, "seed": 8}).batch(0, 0) != reference[0]
    with pytest.raises(IndexError):
        ref_s.batch(0, 5)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_partition_epoch(drop_last):
    n, world = 50, 3
    samplers = [
        ResumableSampler(n, 4, seed=1, rank=r, world_size=world, drop_last=drop_last) for r in range(world)
    ]
    nb = samplers[0].batches_per_epoch
    assert all(s.batches_per_epoch == nb for s in samplers)
    per_rank = [[j for i in range(nb) for j in s.batch(0, i)] for s in samplers]
    if drop_last:
        # 50 // 3 = 16 per rank, 4 full batches each, no index shared between ranks
        flat = [i for r in per_rank for i in r]
        assert len(flat) == len(set(flat)) == 48
    else:
        # padded to 51 and short final batches allowed: every index appears, one duplicated
        assert all(len(r) == 17 for r in per_rank)
        flat = [i for r in per_rank for i in r]
        assert set(flat) == set(range(n)) and len(flat) == 51
    # interleaving the shards (rank j % world holds position j) rebuilds the epoch's permutation,
    # truncated (drop_last) or wrapped around (padding) as DistributedSampler does
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    per_rank_len = samplers[0].samples_per_rank
    interleaved = [
        samplers[j % world].indices_for_epoch(0)[j // world].item() for j in range(per_rank_len * world)
    ]
    assert interleaved == (perm + perm)[: per_rank_len * world]


# --------------------------------------------------------------------------- logging


def test_run_logger_outputs_and_read_metrics(tmp_path, capsys):
    from dataclasses import dataclass, field

    @dataclass
    class Cfg:
        lr: float = 1e-4
        name: str = "tiny"
        betas: tuple = (0.9, 0.95)
        out: Path = Path("runs/x")
        extra: dict = field(default_factory=lambda: {"b": 1, "a": torch.float32})

    run = tmp_path / "run"
    with RunLogger(run, config=Cfg()) as log:
        log.log(1, {"loss": torch.tensor(0.5)}, psnr=20.0, tag="warmup")
        log.log(2, loss=np.float32(0.25))
        png = log.log_images(2, "recon/val", torch.rand(5, 3, 8, 8) * 2 - 1, nrow=3)
        log.log_images(3, "grid", torch.rand(1, 16, 16) * 2 - 1)
        log.log_line("hello log")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == 1e-4 and cfg["betas"] == [0.9, 0.95] and cfg["out"] == "runs/x"
    assert cfg["extra"] == {"a": "torch.float32", "b": 1}
    assert (run / "config.json").read_text().index('"betas"') < (run / "config.json").read_text().index(
        '"lr"'
    )
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["loss"] == 0.5 and recs[0]["psnr"] == 20.0 and recs[0]["tag"] == "warmup"
    assert recs[1]["loss"] == 0.25 and all("time" in r for r in recs)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    from PIL import Image

    assert png == run / "images" / "recon_val_000000002.png"
    assert Image.open(png).size == (3 * 10 + 2, 2 * 10 + 2)
    assert (run / "images" / "grid_000000003.png").exists()
    assert "hello log" in (run / "log.txt").read_text() and "hello log" in capsys.readouterr().out
    # a line cut short by a kill is skipped, not fatal
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with pytest.warns(UserWarning, match="unparsable"):
        assert len(read_metrics(run)) == 2


def test_run_logger_non_main_and_wandb_missing(tmp_path, monkeypatch):
    log = RunLogger(tmp_path / "r1", is_main=False, config={"a": 1})
    log.log(1, loss=1.0)
    log.log_line("x")
    assert log.log_images(1, "t", torch.zeros(1, 3, 4, 4)) is None
    log.close()
    assert not (tmp_path / "r1").exists()
    import ldetok.engine.logging as lg

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr(lg, "_WANDB_WARNED", False)
    with pytest.warns(UserWarning, match="wandb is not installed"):
        log = RunLogger(tmp_path / "r2", tensorboard=False, wandb_project="proj")
    log.log(1, loss=1.0)
    log.close()
    assert read_metrics(tmp_path / "r2")[0]["loss"] == 1.0


def test_progress_plain_lines():
    lines: list[str] = []
    p = Progress(total=10, initial=2, use_tqdm=False, print_every=4, log_fn=lines.append)
    for _ in range(8):
        p.update(1, n_images=16, loss=0.123456)
    p.close()
    assert len(lines) == 3  # steps 4, 8 and the final step 10
    assert lines[0].startswith("[train] step 4/10") and "loss=0.1235" in lines[0] and "img/s=" in lines[0]
    with Progress(total=3, use_tqdm=True) as bar:  # the tqdm path (forced, since pytest is no TTY)
        bar.update(2, n_images=8, loss=torch.tensor(0.5))
        assert bar._bar is not None and bar._bar.n == 2
    quiet: list[str] = []
    q = Progress(total=10, is_main=False, use_tqdm=True, print_every=1, log_fn=quiet.append)
    q.update(5, 10)
    assert quiet == [] and q._bar is None


# --------------------------------------------------------------------------- distributed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths():
    dev = resolve_device("cuda")
    model = Tiny().to(dev)
    ema = EMA(model, decay=0.9)
    _perturb(model, 0)
    ema.update(model)
    assert ema.shadow["lin.weight"].device.type == "cuda"
    opt = build_adamw(model, lr=1e-3, weight_decay=0.05)
    assert opt.defaults["fused"]
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    ref = torch.rand(3, device=dev)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3, device=dev), ref)


def test_distributed_single_process_noops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), True, False)
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 3.0])
    out = all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    assert all_reduce_sum(2.5) == 2.5 and isinstance(all_reduce_mean(3), float)
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert gather_objects(5) == [5]
    barrier()
    cleanup()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:1")


_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from ldetok.engine import (all_reduce_mean, all_reduce_sum, barrier, broadcast_object, cleanup,
                               gather_objects, init_distributed)
    info = init_distributed("cpu")
    r = info.rank
    t = torch.tensor([float(r), 2.0 * r])
    out = {
        "info": [info.rank, info.world_size, info.is_main, info.distributed, str(info.device)],
        "mean_f": all_reduce_mean(float(r)),
        "mean_t": all_reduce_mean(t).tolist(),
        "input_untouched": t.tolist() == [float(r), 2.0 * r],
        "sum_t": all_reduce_sum(torch.tensor([1, 2]) * (r + 1)).tolist(),
        "bcast": broadcast_object({"from": r, "cfg": [1, 2]} if r == 0 else None),
        "gather": gather_objects(r * 10),
        "backend": torch.distributed.get_backend(),
    }
    # EMA and param_groups see through DDP: names without the "module." prefix, values in sync
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ldetok.engine import EMA, build_adamw
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    ema = EMA(ddp, decay=0.5)
    opt = build_adamw(ddp, lr=0.1, weight_decay=0.0)
    ddp(torch.randn(3, 4) * (r + 1)).pow(2).mean().backward()
    opt.step()
    ema.update(ddp)
    out["ema_keys"] = sorted(ema.state_dict())
    out["ema_w"] = ema.state_dict()["0.weight"].sum().item()
    barrier()
    cleanup()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_collectives(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / f"out{rank}.json")],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    for r, o in enumerate(outs):
        assert o["info"] == [r, 2, r == 0, True, "cpu"] and o["backend"] == "gloo"
        assert o["mean_f"] == 0.5 and o["mean_t"] == [0.5, 1.0] and o["input_untouched"]
        assert o["sum_t"] == [3, 6]
        assert o["bcast"] == {"from": 0, "cfg": [1, 2]}
        assert o["gather"] == [0, 10]
        assert o["ema_keys"] == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert outs[0]["ema_w"] == pytest.approx(outs[1]["ema_w"])  # DDP kept ranks identical

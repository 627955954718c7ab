"""The run folder (``ldetok.runs``): layout, folder kinds, train config, save/load round trips, the atomic
writer; and the one [-1, 1] <-> uint8 conversion (``ldetok.data``) and image grids (``ldetok.viz``)."""

import json
import os

import numpy as np
import pytest
import torch

from ldetok import runs
from ldetok.data import from_uint8, to_uint8
from ldetok.generators import build_generator
from ldetok.runs import RunKind, RunLayout, run_kind
from ldetok.tokenizers import build
from ldetok.viz import image_grid, save_grid


def tiny_tok(**kw):
    torch.manual_seed(0)
    return build("detok_TT", image_size=16, patch_size=4, latent_channels=6, **kw)


# ---------------------------------------------------------------------------------------------
# layout and kinds
# ---------------------------------------------------------------------------------------------
def test_layout_paths(tmp_path):
    lay = RunLayout(tmp_path / "run")
    r = tmp_path / "run"
    assert (lay.config, lay.metrics, lay.log) == (r / "config.json", r / "metrics.jsonl", r / "log.txt")
    assert lay.checkpoints == r / "checkpoints" and lay.checkpoint_pointer == r / "checkpoints" / "latest.json"
    assert (lay.tokenizer, lay.generator) == (r / "tokenizer", r / "generator")
    assert lay.image("samples_final") == r / "images" / "samples_final.png"
    assert lay.samples == r / "samples" and lay.eval == r / "eval" and lay.tensorboard == r / "tb"
    assert lay.latent_cache("fashion_mnist", "train") == r / "latents" / "fashion_mnist_train"
    assert lay.latent_cache("fashion_mnist", "train", flip=True) == r / "latents" / "fashion_mnist_train_flip"
    assert not r.exists()  # a layout creates nothing


def test_folder_kinds(tmp_path):
    assert run_kind(tmp_path / "nope") == RunKind.MISSING
    (tmp_path / "f.txt").write_text("x")
    assert run_kind(tmp_path / "f.txt") == RunKind.FILE
    (tmp_path / "empty").mkdir()
    assert run_kind(tmp_path / "empty") == RunKind.EMPTY
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    assert run_kind(tmp_path / "other") == RunKind.OTHER

    tok_run = tmp_path / "tok"
    runs.save_train_config(tok_run, {"model": "detok_TT", "dataset": "fashion_mnist"})
    assert run_kind(tok_run) == RunKind.UNFINISHED_TOKENIZER_RUN
    runs.atomic_write_json({"step": 200, "file": "ckpt_000000200.pt"}, RunLayout(tok_run).checkpoint_pointer)
    assert "checkpoints up to step 200" in runs.describe(tok_run)
    with pytest.raises(runs.RunFolderError, match="unfinished tokenizer run .*step 200"):
        runs.load_tokenizer(tok_run)
    runs.save_tokenizer(tiny_tok(), RunLayout(tok_run).tokenizer)
    assert run_kind(tok_run) == RunKind.TOKENIZER_RUN
    assert run_kind(tok_run / "tokenizer") == RunKind.TOKENIZER_EXPORT

    gen_run = tmp_path / "gen"
    runs.save_train_config(gen_run, {"model": "dit_tiny", "tokenizer": str(tok_run)})
    assert run_kind(gen_run) == RunKind.UNFINISHED_GENERATOR_RUN
    with pytest.raises(runs.RunFolderError, match="unfinished generator run"):
        runs.load_generator_run(gen_run)
    with pytest.raises(runs.RunFolderError, match="a finished tokenizer run"):
        runs.load_generator_run(tok_run)  # the error says what the folder is
    runs.save_generator(build_generator("dit_tiny", depth=1), RunLayout(gen_run).generator, {"tokenizer": str(tok_run)})
    assert run_kind(gen_run) == RunKind.GENERATOR_RUN
    assert run_kind(gen_run / "generator") == RunKind.GENERATOR_EXPORT
    with pytest.raises(runs.RunFolderError, match="a finished generator run.*expected a finished tokenizer run"):
        runs.load_tokenizer(gen_run)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metrics.jsonl").write_text("")
    assert run_kind(tmp_path / "bare") == RunKind.UNFINISHED_RUN
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        runs.load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# train config and round trips
# ---------------------------------------------------------------------------------------------
def test_run_train_config_from_run_export_and_generator_run(tmp_path):
    from dataclasses import asdict

    from ldetok.config import GeneratorTrainConfig, resolve_generator_config, resolve_tokenizer_config

    cfg = resolve_tokenizer_config("cpu-fmnist", {"model": "detok_TT", "image_size": 16})
    run = tmp_path / "tok"
    runs.save_train_config(run, cfg)
    assert runs.run_train_config(run) == cfg  # unfinished: config.json, read back typed
    longer = resolve_tokenizer_config("cpu-fmnist", {"model": "detok_TT", "image_size": 16, "max_steps": 9})
    runs.save_tokenizer(tiny_tok(), RunLayout(run).tokenizer, extra={"train_config": asdict(longer)})
    assert runs.run_train_config(run).optim.max_steps == 9  # the export wins
    assert runs.run_train_config(run / "tokenizer").optim.max_steps == 9  # the exported folder alone
    # a flat config (saved before sub-configs) reads by leaf names
    flat = {"model": "detok_TT", "dataset": "fashion_mnist", "image_size": 16, "gamma": 1.0, "max_steps": 7}
    runs.save_tokenizer(tiny_tok(), RunLayout(run).tokenizer, extra={"train_config": flat})
    old = runs.run_train_config(run)
    assert (old.model.name, old.model.image_size, old.corruption.gamma, old.optim.max_steps) == ("detok_TT", 16, 1.0, 7)
    gen = tmp_path / "gen"
    gcfg = resolve_generator_config("cpu-fmnist", {"model": "dit_tiny", "tokenizer": str(run)})
    runs.save_train_config(gen, gcfg)
    assert runs.run_train_config(gen) == gcfg and isinstance(runs.run_train_config(gen), GeneratorTrainConfig)
    runs.save_generator(build_generator("dit_tiny", depth=1), RunLayout(gen).generator,
                        {"tokenizer": str(run), "train_config": asdict(gcfg) | {"optim": {"max_steps": 5}}})
    assert runs.run_train_config(gen).optim.max_steps == 5
    with pytest.raises(runs.RunFolderError, match="empty folder.*no train config"):
        (tmp_path / "empty").mkdir()
        runs.run_train_config(tmp_path / "empty")


def test_tokenizer_round_trip(tmp_path):
    tok = tiny_tok(mlp_ratio=2.0)
    tok.set_latent_stats(torch.arange(6.0), torch.full((6,), 2.0))
    d = runs.save_tokenizer(tok, tmp_path / "run" / "tokenizer", extra={"step": 7})
    meta = json.loads((d / "tokenizer.json").read_text())
    assert meta["kind"] == tok.kind and meta["has_stats"] and meta["step"] == 7
    assert runs.tokenizer_meta(tmp_path / "run") == meta
    for path in (tmp_path / "run", d):  # a run folder or the export itself
        back = runs.load_tokenizer(path)
        assert not back.training and back.cfg == tok.cfg
        for (k, a), (_, b) in zip(tok.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), k
    (d / "model.safetensors").unlink()
    with pytest.raises(runs.RunFolderError, match="model.safetensors is missing"):
        runs.load_tokenizer(d)


def test_generator_round_trip(tmp_path):
    tok_run = tmp_path / "tok"
    runs.save_tokenizer(tiny_tok(), RunLayout(tok_run).tokenizer)
    torch.manual_seed(1)
    gen = build_generator("dit_tiny", depth=1)
    runs.save_generator(gen, RunLayout(tmp_path / "gen").generator, {"name": "dit_tiny", "tokenizer": str(tok_run),
                                                                     "step": 3, "path": tmp_path})
    g, t, meta = runs.load_generator_run(tmp_path / "gen")
    assert meta["step"] == 3 and meta["path"] == str(tmp_path) and meta["kind"] == gen.kind
    assert not g.training and not t.training
    for (k, a), (_, b) in zip(gen.state_dict().items(), g.state_dict().items()):
        assert torch.equal(a, b), k
    assert runs.generator_meta(tmp_path / "gen") == meta


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_atomic_writers_write_and_leave_no_temp(tmp_path):
    runs.atomic_write_text("héllo", tmp_path / "a" / "t.txt")
    runs.atomic_write_bytes(b"\x00\x01", tmp_path / "b.bin")
    runs.atomic_write_json({"x": torch.tensor(2.5), "p": tmp_path, "t": (1, 2)}, tmp_path / "c.json")
    runs.atomic_save({"w": torch.arange(3)}, tmp_path / "d.pt")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 2.5, "p": str(tmp_path), "t": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.arange(3))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch, where):
    path = tmp_path / "config.json"
    runs.atomic_write_text("old", path)

    def write(f):
        f.write(b"half of the new")
        if where == "write":
            raise KeyboardInterrupt

    def boom(*a, **k):
        raise OSError(f"simulated {where} failure")

    if where == "fsync":
        monkeypatch.setattr(runs.os, "fsync", boom)
    elif where == "replace":
        monkeypatch.setattr(runs.os, "replace", boom)
    with pytest.raises((KeyboardInterrupt, OSError)):
        runs.atomic_write(path, write)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # no partial file, no temp file


# ---------------------------------------------------------------------------------------------
# [-1, 1] <-> uint8
# ---------------------------------------------------------------------------------------------
def _values():
    """Every 8-bit level, the exact half-way points between levels and their float neighbours, random
    values and out-of-range ones."""
    u = torch.arange(256, dtype=torch.float64)
    ties = ((u[:-1] + 0.5) / 127.5 - 1).float()
    near = [ties] + [torch.nextafter(ties, torch.full_like(ties, s)) for s in (2.0, -2.0)]
    g = torch.Generator().manual_seed(0)
    return torch.cat(near + [(u / 127.5 - 1).float(), torch.rand(200_000, generator=g) * 2 - 1,
                             torch.tensor([-3.0, -1.0, 1.0, 4.0])])


def test_to_uint8_equals_the_rounding_callers_used():
    x = _values()
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == x.shape
    # sampling.to_uint8, demo._to_uint8, eval.fid.to_uint8_rgb: round((x + 1) * 127.5), half to even
    assert torch.equal(u, ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    # the old viz.save_grid: np.rint(((x + 1) / 2) * 255) in float32
    old_viz = np.rint(((x.clamp(-1, 1) + 1) / 2).numpy() * 255).astype(np.uint8)
    assert np.array_equal(u.numpy(), old_viz)
    # the old engine image_grid rounded half up: (x + 1) / 2 * 255 + 0.5, truncated. It differs by one
    # level only at values half-way between two levels (to float32 precision).
    old_grid = (((x + 1) / 2).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    v = (x.double().clamp(-1, 1) + 1) * 127.5
    tie = (v - v.floor() - 0.5).abs() < 1e-4
    diff = torch.from_numpy(old_grid.astype(np.int16)) - u.to(torch.int16)
    assert diff[~tie].abs().max() == 0 and diff.abs().max() <= 1 and diff[tie].abs().max() == 1
    # [0, 1] inputs (the demo's latent pictures): round(x * 255)
    y = torch.rand(10_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(to_uint8(y, (0.0, 1.0)), (y * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match="value_range"):
        to_uint8(y, (1.0, 1.0))


def test_from_uint8_inverts_to_uint8():
    u = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(u)
    assert torch.equal(x, u.float().div(127.5).sub(1.0)) and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(from_uint8(u.numpy()), x)


# ---------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------
def _old_grid(images, nrow):
    """The hand-written grid the package used before: white background, 2 px padding."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    rows = (b + ncol - 1) // ncol
    canvas = np.ones((rows * (h + 2) + 2, ncol * (w + 2) + 2, 3), dtype=np.float32)
    for i in range(b):
        r, q = divmod(i, ncol)
        im = ((images[i].clamp(-1, 1) + 1) / 2).expand(3, -1, -1).permute(1, 2, 0).numpy()
        canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    return np.rint(canvas * 255).astype(np.uint8)


@pytest.mark.parametrize("n,c,nrow", [(1, 3, 8), (5, 1, 2), (6, 3, 3), (7, 4, 8)])
def test_image_grid_matches_the_old_grids(n, c, nrow, tmp_path):
    from PIL import Image

    x = torch.rand(n, c, 5, 4, generator=torch.Generator().manual_seed(n)) * 2.2 - 1.1
    grid = image_grid(x, nrow=nrow)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert np.array_equal(grid, _old_grid(x[:, :3], nrow))
    path = save_grid(x, tmp_path / "g" / "grid.png", nrow=nrow)
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    assert np.array_equal(image_grid(to_uint8(x), nrow=nrow), grid)  # uint8 images: no second rounding
    assert image_grid(grid) is not None and np.array_equal(image_grid(grid), grid)  # a finished grid
    with pytest.raises(ValueError, match="C in 1/3/4"):
        image_grid(torch.zeros(2, 2, 4, 4))

"""The five notebooks: hygiene of the committed files, and smoke runs through papermill.

Each notebook runs headlessly with tiny parameters (a few training steps, a handful of images, a tmp
RUN_DIR and a tmp figures folder); the test reads back the ``metrics.json`` it wrote and checks that
its figures exist. The ablation notebook runs through ``ldetok.sweep.run_sweep`` on a 2-point grid,
then once more in aggregate mode over that sweep.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_module

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_latent_corruption", "02_tokenizer_training", "03_generator_training", "04_ablations",
             "05_latent_robustness"]
NOTEBOOKS_EXTRA = "pip install -e '.[notebooks]'"


@pytest.fixture(scope="module")
def nb_formats():
    """nbformat and jupytext: skipped without them, failed under CI=true (``require``)."""
    return require_module("nbformat", NOTEBOOKS_EXTRA), require_module("jupytext", NOTEBOOKS_EXTRA)


# ---------------------------------------------------------------------------------------------
# hygiene (fast)
# ---------------------------------------------------------------------------------------------
def _code_sources(nb) -> list:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_in_sync(name, nb_formats):
    nbformat, jupytext = nb_formats
    ipynb, py = NB_DIR / f"{name}.ipynb", NB_DIR / f"{name}.py"
    assert ipynb.exists() and py.exists(), f"{name}: both the .ipynb and its py:percent pair must exist"
    nb = nbformat.read(ipynb, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{ipynb.name} cell {i} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{ipynb.name} cell {i} has an execution count"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), \
        f"{ipynb.name}: the first code cell must be tagged 'parameters'"
    # literals only in the parameters cell
    import ast

    for node in ast.parse(code[0].source).body:
        assert isinstance(node, ast.Assign), f"{ipynb.name}: the parameters cell holds assignments only"
        ast.literal_eval(node.value)
    paired = jupytext.read(py)
    assert _code_sources(paired) == _code_sources(nb), \
        f"{name}: .ipynb and .py differ; run `jupytext --sync notebooks/{name}.py`"
    formats = nb.metadata.get("jupytext", {}).get("formats", "")
    assert "py:percent" in formats, f"{ipynb.name}: not paired with a py:percent file"


def test_sweep_grid_helpers():
    from ldetok.sweep import grid_points, parse_grid, point_name

    grid = parse_grid(["gamma=0,1,3", "max_mask_ratio=0,0.7", "noise_type=interpolative,additive"])
    assert grid == {"gamma": [0, 1, 3], "max_mask_ratio": [0, 0.7], "noise_type": ["interpolative", "additive"]}
    pts = grid_points(grid)
    assert len(pts) == 12 and pts[0] == {"gamma": 0, "max_mask_ratio": 0, "noise_type": "interpolative"}
    assert point_name(pts[-1]) == "gamma=3_max_mask_ratio=0.7_noise_type=additive"
    with pytest.raises(ValueError):
        parse_grid(["gamma"])


def test_notebook_helpers(tmp_path):
    from ldetok import notebook as nb

    p = nb.log_metrics({"a": 1.0}, tmp_path)
    nb.log_metrics({"b": [1, 2]}, tmp_path)
    assert json.loads(p.read_text()) == {"a": 1.0, "b": [1, 2]}
    assert nb.preset_for("runs/main/cpu-fmnist-ae", "cpu-fmnist") == "cpu-fmnist-ae"
    assert nb.preset_for("runs/main/cpu-fmnist", "cpu-fmnist") == "cpu-fmnist"
    with pytest.raises(ValueError):
        nb.save_fig(None, "x", NB_DIR)
    with pytest.raises(ValueError):
        nb.train_in_process_or_torchrun("tokenizer", "cpu-fmnist", {"bogus_key": 1}, tmp_path, 2)


def test_interactive_default_live_kernel_or_headless(monkeypatch):
    from ldetok import notebook as nb

    for var in ("LDETOK_INTERACTIVE", "JPY_SESSION_NAME", "JPY_PARENT_PID"):
        monkeypatch.delenv(var, raising=False)
    assert nb.interactive_default() is False  # no front end named itself (papermill, nbclient, a script)
    monkeypatch.setenv("JPY_SESSION_NAME", "/some/notebooks/01_latent_corruption.ipynb")  # a Jupyter server's kernel
    assert nb.interactive_default() is True
    monkeypatch.setenv("JPY_PARENT_PID", str(os.getpid()))  # launched by papermill: headless whatever else is set
    monkeypatch.setattr(nb, "_parent_command", lambda pid: "python -m papermill in.ipynb out.ipynb")
    assert nb.interactive_default() is False
    monkeypatch.setenv("LDETOK_INTERACTIVE", "1")
    assert nb.interactive_default() is True
    assert nb.figures_dir(None, Path("/r")) == Path("/r/figures") and nb.figures_dir("figures", "/r") == ROOT / "figures"


def test_find_tokenizer_where_make_run_and_demo_prepare_write(tmp_path, monkeypatch, tok_run):
    import shutil

    from ldetok import notebook as nb

    main, demo = tmp_path / "main", tmp_path / "demo"
    monkeypatch.setattr(nb, "MAIN_DIR", str(main))
    monkeypatch.setattr(nb, "DEMO_DIR", str(demo))
    monkeypatch.setattr(nb, "MAKERS", {str(main): "make run", str(demo): "ldetok demo --prepare"})
    assert nb.find_tokenizer("cpu-fmnist") is None and nb.tokenizer_run("auto", "cpu-fmnist") is None
    # the main job's own folders (most steps first), before it links them
    for steps in (250, 1000):
        shutil.copytree(tok_run, main / "tokenizers" / f"detok_s0_t{steps}")
    assert nb.find_tokenizer("cpu-fmnist") == main / "tokenizers" / "detok_s0_t1000"
    assert nb.find_tokenizer("cpu-fmnist-ae") is None  # another variant's folder is not taken
    (main / "cpu-fmnist").symlink_to(main / "tokenizers" / "detok_s0_t250")  # its link wins
    assert nb.tokenizer_run("auto", "cpu-fmnist") == main / "cpu-fmnist"
    shutil.copytree(tok_run, demo / "cpu-photos")
    assert nb.find_tokenizer("cpu-photos") == demo / "cpu-photos"
    assert nb.tokenizer_run(None, "cpu-photos") is None and nb.tokenizer_run(str(tmp_path), "x") == tmp_path


def test_explore_reads_the_committed_csvs_and_aggregates_over_seeds(tmp_path):
    import csv

    from ldetok import explore as E

    sources = E.default_sources(ROOT)
    assert sources and all(p.suffix == ".csv" for p in sources.values())
    for name, path in sources.items():
        rows = E.load_results(path)
        assert "variant" in E.parameters(rows) and "psnr" in E.metrics(rows) and "n" not in E.metrics(rows)
        views = E.default_views(rows)
        assert views and all(m in E.metrics(rows) for m, _, _ in views)
        assert len(E.views_figure(rows, views).axes) >= len(views)
    # mean and spread over seeds, checked against the CSV by hand
    rows = [dict(variant=v, seed=float(s), gamma=g, psnr=p) for v, s, g, p in
            [("ae", 0, 0.0, 20.0), ("ae", 1, 0.0, 22.0), ("detok", 0, 3.0, 18.0), ("detok", 1, 3.0, 19.0),
             ("detok", 0, 1.0, 17.0)]]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    back = E.load_results(tmp_path)  # a reproduce folder: its results.csv
    assert back == rows
    agg = E.aggregate(back, "psnr", "gamma", "variant")
    assert agg["ae"] == [{"x": 0.0, "mean": 21.0, "std": 1.0, "n": 2}]
    assert [p["x"] for p in agg["detok"]] == [1.0, 3.0] and agg["detok"][1]["mean"] == 18.5
    assert E.aggregate(back, "psnr", "gamma", "variant")["detok"][0]["n"] == 1
    assert E.better("psnr_t0.5") == "higher" and E.better("fd_gen_real[inception]") == "lower"
    assert E.better("latent_std") is None
    assert "higher is better" in E.metric_label("psnr_t0.5") and "t=0.5" in E.metric_label("psnr_t0.5")
    assert "lower is better" in E.metric_label("fd_gen_recon[inception]")
    fig = E.view(back, "psnr", "gamma", "variant", where=("variant", "detok"))
    ax = fig.axes[0]
    assert "higher is better" in ax.get_title() and ax.get_xlabel().startswith("γ")
    assert ("variant", "ae") in [o for _, o in E.filter_options(back)]
    with pytest.raises(ValueError, match="not a column"):
        E.view(back, "no_such_metric", "gamma")
    with pytest.raises(FileNotFoundError):
        E.load_results(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# smoke runs (slow)
# ---------------------------------------------------------------------------------------------
TOK_SMOKE = dict(STEPS=3, BATCH_SIZE=16, STATS_IMAGES=64, N_EVAL=16)


@pytest.fixture(scope="module")
def kernel_env():
    require_module("papermill", NOTEBOOKS_EXTRA)
    os.environ["OMP_NUM_THREADS"] = "1"  # the kernels inherit it: a loaded 2-core machine
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    return os.environ


def _execute(name, params, out_dir: Path) -> Path:
    """Run the notebook headlessly (kernel ``python3``: this Python's, whatever kernels are registered) and
    check that every cell that shows a figure (``plt.show()``, ``nb.show_figure``) has a PNG output."""
    import nbformat
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(NB_DIR / f"{name}.ipynb"), str(out_dir / "executed.ipynb"), parameters=params,
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    executed = nbformat.read(out_dir / "executed.ipynb", as_version=4)
    shows = [c for c in executed.cells if c.cell_type == "code" and ("plt.show()" in c.source or "show_figure(" in c.source)]
    assert shows or name == "04_ablations", f"{name}: no plotting cell found"
    for c in shows:
        pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
        assert pngs, f"{name}: a plotting cell shows no image/png output:\n{c.source[:300]}"
    return out_dir / "executed.ipynb"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _metrics(run) -> dict:
    path = Path(run) / "metrics.json"
    assert path.exists(), f"{path} not written"
    return json.loads(path.read_text())


# ---- an independent recomputation of what the notebooks report (numpy + scikit-image, not ldetok.eval)
def _test_images(tok_run: Path, n: int) -> torch.Tensor:
    """The first ``n`` test images of the run's dataset, at its resolution and channels."""
    from ldetok.data import build_dataset
    from ldetok.eval.tokenizer import run_train_config

    cfg = run_train_config(tok_run)
    ds = build_dataset(cfg.data.dataset, "test", cfg.model.image_size, cfg.model.in_channels)
    return torch.stack([ds[i][0] for i in range(n)])


def _psnr_ssim(rec: torch.Tensor, x: torch.Tensor) -> tuple:
    """Per-image mean PSNR (dB) and SSIM (Gaussian window 11 / 1.5) of images in [-1, 1], on [0, 1]."""
    from skimage.metrics import structural_similarity

    a, b = (rec.double().numpy() + 1) / 2, (x.double().numpy() + 1) / 2
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    ssim = [structural_similarity(p, q, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0, channel_axis=0) for p, q in zip(a, b)]
    return float(np.mean(10 * np.log10(1 / mse))), float(np.mean(ssim))


@torch.no_grad()
def _decode_clean_and_noisy(tok_run: Path, x: torch.Tensor, t: float, gamma: float, seed: int) -> tuple:
    """Latents of ``x``; clean decodes; decodes of ``(1 - t) z + t gamma eps``, image i's eps drawn from a
    generator seeded by (``seed``, i) (the evaluation protocol's per-image noise)."""
    from ldetok.runs import load_tokenizer

    tok = load_tokenizer(tok_run).eval()
    z = tok.encode(x)
    eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                       for i in range(len(z))])
    noisy = tok.decode((1 - t) * z + t * gamma * eps).clamp(-1, 1)
    return z, tok.decode(z).clamp(-1, 1), noisy


@pytest.mark.slow
def test_01_latent_corruption(tmp_path, kernel_env):
    run, figs = tmp_path / "run", tmp_path / "figs"
    _execute("01_latent_corruption", dict(STEPS=3, STATS_IMAGES=64, FMNIST_DETOK_RUN=None, FMNIST_AE_RUN=None,
                                          PHOTOS_DETOK_RUN=None, PHOTOS_AE_RUN=None, N_IMAGES=1, N_PSNR=8,
                                          N_TAU=2000, RUN_DIR=str(run), FIGURES_DIR=str(figs)), run)
    m = _metrics(run)
    for ds in ("fashion_mnist", "photos"):
        for tok in ("l-DeTok", "AE"):
            clean, noisy = m[f"psnr_{ds}_{tok}_interpolative_t0"], m[f"psnr_{ds}_{tok}_interpolative_t0.5"]
            assert _finite(clean) and _finite(noisy) and 0 < noisy and clean < 60
    assert 0.55 < m["tau_logit_normal_mean"] < 0.75 and 0.45 < m["tau_uniform_mean"] < 0.55
    assert 0.05 < m["mask_ratio_zero_frac"] < 0.22  # P(U(-0.1, 0.7) < 0) = 1/8
    for f in ("nb01_tau_distributions", "nb01_fashion_mnist_interpolative_sweep", "nb01_photos_additive_sweep",
              "nb01_psnr_vs_corruption"):
        assert (figs / f"{f}.png").exists(), f
    assert not list(NB_DIR.glob("*.png"))
    executed = (run / "executed.ipynb").read_text()
    assert "headless run: the slider panel is drawn only in a live kernel" in executed  # papermill: INTERACTIVE off


@pytest.mark.slow
def test_02_tokenizer_training(tmp_path, kernel_env):
    run, figs = tmp_path / "run", tmp_path / "figs"
    _execute("02_tokenizer_training", dict(TOK_SMOKE, LOG_EVERY=1, NOISE_LEVELS=[0.5], RFID=False, N_SHOW=4,
                                           RUN_DIR=str(run), FIGURES_DIR=str(figs)), run)
    m = _metrics(run)
    assert m["steps"] == 3 and _finite(m["final_loss"]) and 0 < m["final_loss"] < 5
    assert 3 < m["psnr_clean"] < 60 and 3 < m["psnr_t0.5"] < 60
    assert m["rfid_clean"] is None  # RFID=False
    # the reported numbers are those of the trained run's first N_EVAL test images, recomputed here
    x = _test_images(run / "tokenizer_run", TOK_SMOKE["N_EVAL"])
    _, clean, noisy = _decode_clean_and_noisy(run / "tokenizer_run", x, 0.5, 3.0, seed=0)  # the notebook's SEED
    psnr, ssim = _psnr_ssim(clean, x)
    assert m["psnr_clean"] == pytest.approx(psnr, abs=1e-3) and m["ssim_clean"] == pytest.approx(ssim, abs=1e-4)
    assert m["psnr_t0.5"] == pytest.approx(_psnr_ssim(noisy, x)[0], abs=1e-3)
    assert abs(m["psnr_t0.5"] - m["psnr_clean"]) > 0.01  # so the two checks above cannot pass for each other
    for f in ("nb02_loss_curves", "nb02_reconstructions"):
        assert (figs / f"{f}.png").exists()


@pytest.mark.slow
def test_03_generator_training(tmp_path, kernel_env):
    run, figs = tmp_path / "run", tmp_path / "figs"
    _execute("03_generator_training", dict(TOKENIZER_RUN=None, TOKENIZER_STEPS=3, STATS_IMAGES=64, MODEL="sit", STEPS=3,
                                           BATCH_SIZE=16, LATENTS="online", SAMPLE_STEPS=2, N_EVAL=8, N_SEARCH=8,
                                           CFGS=[1.0, 2.0], FEATURES=["inception"], RUN_DIR=str(run),
                                           FIGURES_DIR=str(figs)), run)
    m = _metrics(run)
    assert m["steps"] == 3 and _finite(m["final_loss"]) and m["best_cfg"] in (1.0, 2.0)
    assert _finite(m["gfid"]) and m["gfid"] > 0
    assert set(m["sweep_fid"]) == {"1", "2"} and all(_finite(v) for v in m["sweep_fid"].values())
    for f in ("nb03_sit_loss", "nb03_sit_samples", "nb03_sit_cfg_sweep"):
        assert (figs / f"{f}.png").exists()


@pytest.mark.slow
def test_04_ablations_sweep_and_aggregate(tmp_path, kernel_env):
    from ldetok.sweep import read_sweep, run_sweep

    sweep_dir, figs = tmp_path / "sweep", tmp_path / "figs"
    # a grid over gamma: point mode without being asked
    summary = run_sweep(NB_DIR / "04_ablations.ipynb", {"gamma": [0.0, 3.0]}, sweep_dir,
                        extra_params=dict(TOK_SMOKE, FIGURES_DIR=str(figs)), kernel_name="python3")
    assert set(summary["points"]) == {"gamma=0.0", "gamma=3.0"}
    assert all(p["status"] == "ok" for p in summary["points"].values()), summary
    assert (sweep_dir / "gamma=3.0" / "executed.ipynb").exists() and (sweep_dir / "sweep.json").exists()
    rows = read_sweep(sweep_dir)
    assert sorted(r["gamma"] for r in rows) == [0.0, 3.0]
    for r in rows:
        assert r["steps"] == 3 and all(_finite(r[k]) for k in ("psnr_clean", "psnr_t0.5", "psnr_mask0.5", "latent_std"))
        assert r["psnr_t0.5"] < r["psnr_clean"] + 3 and r["latent_std"] > 0

    # explore mode: the sweep beside the committed study CSVs, no training; default views drawn to files
    agg = tmp_path / "agg"
    _execute("04_ablations", dict(SWEEP_DIR=str(sweep_dir), RUN_DIR=str(agg), FIGURES_DIR=str(figs)), agg)
    m = _metrics(agg)
    assert m["sources"]["sweep"]["rows"] == 2
    assert m["views"]["sweep"][0][1] == "gamma"  # the swept parameter is the x axis
    for name in ["sweep"] + [p.stem for p in (ROOT / "figures").glob("*.csv")]:
        assert (figs / f"nb04_{name}.png").exists(), name
    assert "headless run: the widget panel is drawn only in a live kernel" in (agg / "executed.ipynb").read_text()


@pytest.mark.slow
def test_sweep_records_a_failed_point(tmp_path, kernel_env):
    from ldetok.sweep import run_sweep

    # an unknown preset is refused before any training: the point fails, the sweep goes on
    summary = run_sweep(NB_DIR / "04_ablations.ipynb", {"PRESET": ["no-such-preset"]}, tmp_path / "sweep",
                        extra_params=dict(TOK_SMOKE, MODE="point", FIGURES_DIR=str(tmp_path / "figs")),
                        kernel_name="python3")
    rec = summary["points"]["PRESET=no-such-preset"]
    assert rec["status"] == "failed" and rec["returncode"] != 0 and rec["error_tail"]


@pytest.mark.slow
def test_05_latent_robustness(tmp_path, kernel_env):
    run, figs = tmp_path / "run", tmp_path / "figs"
    _execute("05_latent_robustness", dict(STEPS=3, STATS_IMAGES=64, N_EVAL=16, DENOISER_STEPS=3, DENOISER_BATCH=16,
                                          TOKENIZER_RUNS={"cpu-fmnist": str(tmp_path / "tok" / "cpu-fmnist"),
                                                          "cpu-fmnist-ae": str(tmp_path / "tok" / "cpu-fmnist-ae")},
                                          RUN_DIR=str(run), FIGURES_DIR=str(figs)), run)
    m = _metrics(run)
    toks = m["tokenizers"]
    assert set(toks) == {"cpu-fmnist", "cpu-fmnist-ae"}
    assert toks["cpu-fmnist"]["gamma"] == 3.0 and toks["cpu-fmnist-ae"]["gamma"] == 0.0
    for name, t in toks.items():
        assert all(_finite(t[k]) for k in ("psnr_clean", "psnr_t0.5", "psnr_mask0.5", "latent_std", "denoise_loss"))
        # latent statistics and PSNRs of the quick run it trained, recomputed on the first N_EVAL test images
        # (noise: the notebook's SEED and GAMMA)
        tok_run = run / "quick" / name
        x = _test_images(tok_run, 16)
        z, clean, noisy = _decode_clean_and_noisy(tok_run, x, 0.5, 3.0, seed=0)
        assert (t["latent_min"], t["latent_max"], t["latent_std"]) == pytest.approx(
            (z.min().item(), z.max().item(), z.std().item()), rel=1e-4)
        assert t["psnr_clean"] == pytest.approx(_psnr_ssim(clean, x)[0], abs=1e-3)
        assert t["psnr_t0.5"] == pytest.approx(_psnr_ssim(noisy, x)[0], abs=1e-3)
        # the denoiser's loss: the mean of the last 20 % of the logged losses (3 steps logged: the last one)
        recs = [json.loads(line) for line in (run / "denoise" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if "loss" in r and "step" in r]
        assert len(losses) == 3 and t["denoise_loss"] == pytest.approx(losses[-1], rel=1e-6) and losses[-1] > 0
    for f in ("nb05_robustness_curves", "nb05_latent_stats", "nb05_denoiser_loss"):
        assert (figs / f"{f}.png").exists()

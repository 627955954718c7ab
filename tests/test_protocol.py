"""The paper's evaluation protocol as the presets and the command line carry it: per-family sampling
settings that reach only their family, the one rule for epochs against max_steps, the decoder
fine-tuning recipe, latent statistics over the whole training split without flips, MAR-B's 100-epoch
head, a refused paper-100ep without a model, and `reproduce --dry-run` printing the official values."""

import json

import numpy as np
import pytest
import torch

import ldetok.reproduce as R
from ldetok.cli import main as cli
from ldetok.config import (OFFICIAL_SAMPLING, parse_family_settings, resolve_generator_config,
                           resolve_reproduce_config, resolve_tokenizer_config)
from ldetok.engine.stats import collect_latent_stats, stratified_indices
from ldetok.tokenizers import build


def test_per_family_settings_reach_only_their_family():
    P = resolve_reproduce_config("cpu-quick", {"generators": ("sit", "mar")})
    fams = {"mar": parse_family_settings(["num_iter_final=256", "cfg_list=3.0,3.5", "temperature=0.95",
                                          'model_args={"diffloss_d": 3}', "batch_size=64"])}
    Q = R._with_command_line(P, None, None, {}, fams, None)
    mar, sit = Q.sampling("mar"), Q.sampling("sit")
    assert (mar.final_steps, mar.search_steps, mar.guidance_scales, mar.temperature) == (256, 256, (3.0, 3.5), 0.95)
    assert sit == P.sampling("sit")  # untouched
    gm = R.generator_config(Q, "mar", "tok", 0, 10, Q.gen_overrides)
    gs = R.generator_config(Q, "sit", "tok", 0, 10, Q.gen_overrides)
    assert json.loads(gm.model_args) == {"diffloss_d": 3} and gm.optim.batch_size == 64 and gm.sample_steps == 256
    assert gs.model_args == "" and gs.optim.batch_size == P.gen_overrides.get("batch_size", 128)
    assert gs.sample_steps is None
    # --cfg-search and --gen sample_steps reach every family, and beat a preset's per-family values
    A = R._with_command_line(resolve_reproduce_config("gpu-imagenet-ablation"), (1.0, 2.0), 16,
                             {"sample_steps": 8}, None, None)
    for name in A.generators:
        sp = A.sampling(name)
        assert (sp.guidance_scales, sp.n_search, sp.search_steps, sp.final_steps) == ((1.0, 2.0), 16, 8, 8)
    with pytest.raises(ValueError, match="no such generator"):
        R._with_command_line(P, None, None, {}, {"dit": {"temperature": 1.0}}, None)
    with pytest.raises(ValueError, match="--gen-for"):
        parse_family_settings(["nosuchkey=1"])


def test_official_sampling_values_in_the_ablation_preset():
    A = resolve_reproduce_config("gpu-imagenet-ablation")
    mar, sit = A.sampling("mar_base"), A.sampling("sit_base")
    assert mar.guidance_scales == (3.0, 3.5, 3.7, 3.8, 3.9, 4.0, 4.1, 4.3, 4.5)
    assert (mar.n_search, mar.search_steps, mar.final_steps, mar.temperature) == (10000, 64, 256, 1.0)
    assert sit.guidance_scales == tuple(round(1.3 + 0.1 * i, 1) for i in range(8)) and sit.guidance_scale == 1.6
    assert (sit.n_search, sit.search_steps, sit.final_steps) == (10000, 250, 250)
    assert set(OFFICIAL_SAMPLING) == {"mar", "randomar", "rasterar", "dit", "sit", "lightningdit"}
    assert A.reference == "released:adm_in256_stats"
    g = R.generator_config(A, "mar_base", "tok", 0, 0, A.gen_overrides)
    assert json.loads(g.model_args) == {"diffloss_d": 3} and g.optim.epochs == 100


def test_dry_run_prints_every_protocol_value(capsys):
    assert cli(["reproduce", "--preset", "gpu-imagenet-ablation", "--out", "unused", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "released:adm_in256_stats" in out and "Inception Score:" in out
    assert "3,3.5,3.7,3.8,3.9,4,4.1,4.3,4.5" in out and "1.3,1.4,1.5,1.6,1.7,1.8,1.9,2" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "variant" not in ln]
    assert len(rows) == 8  # 4 variants x 2 families
    mar = [ln for ln in rows if "mar_base" in ln]
    assert all("| 10000" in ln and "| 64 " in ln and "| 256 " in ln and "diffloss_d" in ln for ln in mar)
    assert all("whole training split, no flips" in ln for ln in rows)


def test_budgets_and_decoder_ft_steps_beat_epochs():
    cfg = resolve_tokenizer_config("detok_SB-imagenet256-ablation", {"max_steps": 7})
    assert cfg.optim.epochs is None and cfg.optim.max_steps == 7  # the saved config says max_steps decides
    assert resolve_tokenizer_config("detok_SB-imagenet256-ablation").optim.epochs == 50
    both = resolve_tokenizer_config("detok_SB-imagenet256-ablation", {"max_steps": 7, "epochs": 2})
    assert both.optim.epochs == 2  # both given: epochs, as documented
    P = resolve_reproduce_config("gpu-imagenet-ablation")
    assert R.tokenizer_config(P, "ae", 0, 9, {}).optim.max_steps == 9
    assert R.generator_config(P, "sit_base", "tok", 0, 11, {}).optim.epochs is None
    ft = R.tokenizer_config(P, "noise", 0, 9, {}, parent="parent_run", ft_steps=5)
    assert (ft.stage, ft.optim.max_steps, ft.optim.epochs, ft.init_from) == ("decoder_ft", 5, None, "parent_run")
    # the decoder fine-tuning recipe, not the ablation's pre-training recipe
    assert (ft.optim.base_lr, ft.optim.warmup_frac, ft.losses.perceptual_weight) == (5e-5, 0.05, 0.1)
    cpu = R.tokenizer_config(resolve_reproduce_config("cpu-quick"), "ae", 0, 9, {}, parent="p", ft_steps=5)
    base = resolve_tokenizer_config("cpu-fmnist")
    assert cpu.optim.lr == base.optim.lr / 2 and cpu.optim.warmup_frac == 0.05


def test_paper_100ep_refuses_without_a_model_and_mar_base_gets_depth_3():
    with pytest.raises(ValueError, match="model=<generator> is required"):
        resolve_generator_config("paper-100ep", {"tokenizer": "x"})
    g = resolve_generator_config("paper-100ep", {"tokenizer": "x", "model": "mar_base"})
    assert json.loads(g.model_args) == {"diffloss_d": 3}
    own = resolve_generator_config("paper-100ep", {"tokenizer": "x", "model": "mar_base",
                                                   "model_args": '{"diffloss_d": 6, "num_iter": 32}'})
    assert json.loads(own.model_args) == {"diffloss_d": 6, "num_iter": 32}  # the run's own value wins
    assert resolve_generator_config("paper-100ep", {"tokenizer": "x", "model": "sit_base"}).model_args == ""
    assert cli(["train-generator", "--preset", "paper-100ep", "--tokenizer", "x", "--out", "unused"]) != 0


def _posterior_means(tok, x):
    with torch.no_grad():
        return tok.encode(x).double()


def test_whole_set_latent_statistics_equal_a_direct_computation():
    torch.manual_seed(0)
    tok = build("detok_MM", image_size=32, patch_size=8, in_channels=1, latent_channels=16).eval()
    x = torch.randn(37, 1, 32, 32, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(37, dtype=torch.long))
    mean, std = collect_latent_stats(tok, ds, None, batch_size=8, set_on_tokenizer=False)
    z = _posterior_means(tok, x)  # (N, C, h, w)
    want_mean = z.mean(dim=(0, 2, 3))
    want_std = z.permute(1, 0, 2, 3).reshape(16, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), want_std, rtol=1e-5, atol=1e-6)
    # a class-stratified sample: evenly spaced indices (every class of a class-sorted set), named as such
    idx = stratified_indices(1000, 10)
    assert idx == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    sorted_labels = np.repeat(np.arange(10), 100)  # a class-sorted folder
    assert set(sorted_labels[idx]) == set(range(10))
    sub_mean, _ = collect_latent_stats(tok, ds, 5, set_on_tokenizer=False)
    torch.testing.assert_close(sub_mean.double(), z[stratified_indices(37, 5)].mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)


def test_tokenizer_statistics_see_no_flips(tmp_path):
    """An ImageFolder's random flips stay out of the exported statistics: they equal the statistics of
    the unflipped images, whatever the RNG does."""
    from PIL import Image

    from ldetok.engine.tokenizer_trainer import train_tokenizer
    from ldetok.runs import load_tokenizer

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(6):
                arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
                arr[:, :16] = 0  # left half dark: a flip changes the latents
                Image.fromarray(arr).save(d / f"{i}.png")
    cfg = resolve_tokenizer_config("cpu-photos", dict(dataset="imagefolder", data_root=str(tmp_path / "data"),
                                                      eval_split="val", max_steps=1, batch_size=4, log_every=1,
                                                      image_every=0, tensorboard=False))
    train_tokenizer(cfg, tmp_path / "run")
    tok = load_tokenizer(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())
    assert "whole training split (12 images)" in meta["stats_source"]
    from ldetok.data import build_dataset

    ds = build_dataset("imagefolder", split="train", image_size=32, root=tmp_path / "data", train=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    z = _posterior_means(tok, x)
    torch.testing.assert_close(tok.latent_mean.double().flatten(), z.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_reproduce_records_its_reference_and_falls_back_loudly(tmp_path, monkeypatch, capsys):
    """A preset's reference that is missing (here: offline, and at 256 px for 32 px samples) falls back to
    the evaluation split with a warning; every result row names the reference it used. A reference asked
    for on the command line must exist: refused before any training."""
    from ldetok.config import REPRODUCE_PRESETS

    monkeypatch.setitem(REPRODUCE_PRESETS, "tiny", dict(REPRODUCE_PRESETS["tiny"], reference="released:adm_in256_stats"))
    monkeypatch.setenv("LDETOK_OFFLINE", "1")
    out = tmp_path / "r"
    args = ["reproduce", "--preset", "tiny", "--variants", "ae", "--budgets", "2:2", "--out", str(out),
            "--figures", str(tmp_path / "figs")]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "gFID FALLS BACK" in text and "released:adm_in256_stats" in text
    ev = json.loads((out / "eval" / "gen_sit_ae_s0_t2_g2.json").read_text())
    assert ev["reference"].startswith("the first 16 images of the evaluation split")
    assert "reference" in (out / "results.csv").read_text().splitlines()[0]
    assert cli(args + ["--reference", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "r2" / "tokenizers").exists()

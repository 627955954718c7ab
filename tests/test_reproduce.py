"""``ldetok reproduce`` end to end with the tiny preset: every stage runs, results are written, a second
call reuses every finished stage."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import ldetok.reproduce as R
from ldetok.config import REPRODUCE_PRESETS, resolve_reproduce_config
from ldetok.cli import main as cli


@pytest.mark.slow
def test_reproduce_tiny_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    out, figs = tmp_path / "repro", tmp_path / "figs"
    assert cli(["reproduce", "--preset", "tiny", "--out", str(out), "--figures", str(figs)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4  # 2 budgets x 2 variants x 1 generator x 1 seed
    assert {r["variant"] for r in rows} == {"ae", "detok"}
    for r in rows:
        for k in ("psnr", "fd_recon_real[inception]", "fd_gen_real[inception]", "fd_gen_recon[inception]",
                  "kid_gen_real[inception]", "generator_loss", "psnr_t0.3", "psnr_t0.5", "psnr_t0.7"):
            assert math.isfinite(float(r[k])), k
        assert int(r["n"]) == 16 and int(r["n[inception]"]) == 12  # Inception on the first n_inception only
    md = (out / "results.md").read_text()
    assert "noise + masking (l-DeTok)" in md and "fd_gen_recon" in md
    assert (figs / "reproduce_tiny_sit.png").exists() and (figs / "reproduce_tiny_sit_key.png").exists()
    assert len(list((out / "samples").glob("*.png"))) == 4
    weights = sorted((out / "generators").glob("*/generator/model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in weights]
    capsys.readouterr()

    def no_features(*a, **k):
        raise AssertionError("a finished reproduction must not extract features again")

    monkeypatch.setattr(R, "_extractors", no_features)
    # a second run finds every stage finished and retrains (and re-measures) nothing
    assert cli(["reproduce", "--preset", "tiny", "--out", str(out), "--figures", str(figs)]) == 0
    assert [p.stat().st_mtime_ns for p in weights] == mtimes
    again = capsys.readouterr().out
    assert "training detok_MM" not in again and "training sit" not in again
    # --collect: the finished rows, read back from eval/, the unfinished listed; nothing starts
    (out / "results.csv").unlink()
    assert cli(["reproduce", "--preset", "tiny", "--out", str(out), "--figures", str(figs), "--seeds", "0,1",
                "--collect"]) == 0
    said = capsys.readouterr().out
    assert "4 finished result rows; 4 not finished: sit_ae_s1_t2_g2" in said
    collected = list(csv.DictReader(open(out / "results.csv")))
    assert collected == rows


def test_parse_budgets():
    assert R.parse_budgets("500:750, 1000:1500") == [(500, 750), (1000, 1500)]
    for bad in ("500", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError):
            R.parse_budgets(bad)


def test_reproduce_rejects_unknown_variant_and_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        R.reproduce("tiny", tmp_path, variants=["ae", "bogus"])
    with pytest.raises(ValueError, match="unknown reproduce preset"):
        R.reproduce("nope", tmp_path)


def test_quantize_rounds_like_png():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.003, 0.0041, 1.0, 2.0])
    q = R._quantize(x)
    u8 = torch.round((x.clamp(-1, 1) + 1) * 127.5)
    assert torch.equal(q, u8 / 127.5 - 1)
    assert torch.equal(R._quantize(q), q)  # idempotent: already 8-bit values stay put


class _MomentFeatures:
    """A cheap stand-in extractor: per-image mean and std."""

    def features(self, images):
        x = torch.cat(list(images)) if not torch.is_tensor(images) else images
        return torch.stack([x.flatten(1).mean(1), x.flatten(1).std(1)], 1).numpy()


def test_psnr_under_noise_one_protocol(tok_run, tmp_path, monkeypatch):
    """PSNR at t=0.5 of one tokenizer run and seed is the same number from `ldetok eval-tokenizer`, from
    reproduce's reconstruction stage and from notebook 05's helper, whatever their batch sizes."""

    from ldetok import notebook as nb
    from ldetok.engine.distributed import init_distributed
    from ldetok.eval.tokenizer import evaluate_tokenizer_run
    from ldetok.runs import load_tokenizer, run_train_config

    n, seed = 10, 3
    ev = evaluate_tokenizer_run(tok_run, n=n, noise_levels=[0.5], rfid=False, batch_size=4, device="cpu", seed=seed,
                                verbose=False)
    from_eval = ev["t=0.5"]["psnr"]["value"]

    P = resolve_reproduce_config("tiny", dict(n_eval=n, noise_levels=(0.5,), features=("moments",)))
    monkeypatch.setattr(R, "_extractors", lambda names, device, warm=False: {k: _MomentFeatures() for k in names})
    run = R._Run(P, tmp_path, init_distributed("cpu"), {}, {}, 0, R._Progress([("recon", n)], verbose=False))
    rec, _, _ = R._recon_stage(run, tok_run, "tiny", 0, seed, {})
    assert json.loads((tmp_path / "eval" / "recon_tiny.json").read_text()) == rec

    cfg = run_train_config(tok_run)
    x, _ = nb.images(cfg.data.dataset, n, cfg.data.eval_split, cfg.model.image_size, cfg.model.in_channels)
    from_nb = nb.psnr_sweep(load_tokenizer(tok_run).eval(), x, [0.5], (), 3.0, "interpolative", seed)["psnr_noise"][0]

    assert math.isfinite(from_eval) and from_eval > 0
    assert rec["psnr_t0.5"] == pytest.approx(from_eval, rel=1e-6)
    assert from_nb == pytest.approx(from_eval, rel=1e-6)
    other = nb.psnr_sweep(load_tokenizer(tok_run).eval(), x, [0.5], (), 3.0, "interpolative", seed + 1)["psnr_noise"][0]
    assert other != pytest.approx(from_eval, rel=1e-6)  # the seed matters: the agreement is not trivial


def test_gather_joins_rank_shards_in_index_order(monkeypatch):
    a = {"f": ([0, 2, 4], np.array([[0.0], [2.0], [4.0]])), "g": ([0], np.array([10.0]))}
    b = {"f": ([1, 3], np.array([[1.0], [3.0]])), "g": ([], None)}  # rank 1 holds none of g's first n
    monkeypatch.setattr(R, "gather_objects", lambda obj: [a, b])
    out = R._gather(a)
    assert out["f"].ravel().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert out["g"].tolist() == [10.0]


@pytest.mark.slow
def test_reproduce_two_process_gloo(tmp_path):
    """Under torchrun (2 CPU processes, gloo) every rank trains and evaluates its share; the gathered
    sets have the full sizes and rank 0 writes the results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ldetok.cli",
           "reproduce", "--preset", "tiny", "--variants", "ae", "--budgets", "2:2", "--out", str(out),
           "--figures", str(tmp_path / "figs")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 and rows[0]["world_size"] == "2"
    assert int(rows[0]["n"]) == 16 and int(rows[0]["n[inception]"]) == 12
    assert math.isfinite(float(rows[0]["fd_gen_real[inception]"])) and math.isfinite(float(rows[0]["psnr_t0.5"]))
    assert r.stdout.count("] done:") == 1  # rank 0 reports, rank 1 is quiet


def test_reproduce_cli_refuses_bad_override(tmp_path, capsys):
    assert cli(["reproduce", "--preset", "tiny", "--out", str(tmp_path), "--tok", "no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err
    assert not (tmp_path / "tokenizers").exists()  # refused before any work started


@pytest.mark.slow
def test_main_job_tiny(tmp_path, capsys):
    """`ldetok main` (the job of `make run`) on the tiny preset: the reproduction, the links the notebooks
    and the demo use, the three figures, and the headline table printed at the end."""
    out, figs = tmp_path / "main", tmp_path / "figs"
    assert cli(["main", "--preset", "tiny", "--out", str(out), "--figures", str(figs), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    # the two variants ran side by side, each in its own process with its own log
    assert "[ae] [" in printed and "[detok] [" in printed and "stage 1/" in printed
    assert "training detok_MM" in (out / "logs" / "reproduce_detok.log").read_text()
    for name in ("fmnist_reconstructions.png", "fmnist_corruption_sweep.png", "fmnist_samples.png"):
        assert (figs / name).stat().st_size > 1000, name
    assert (out / "cpu-fmnist").is_symlink() and (out / "cpu-fmnist-ae").is_symlink()
    assert (out / "cpu-fmnist").resolve() == (out / "tokenizers" / "detok_s0_t3").resolve()
    assert (out / "cpu-fmnist-ae" / "tokenizer" / "tokenizer.json").exists()
    table = printed[printed.index("| tokenizer"):]
    assert "l-DeTok (γ=3, M=0.7)" in table and "AE (γ=0, M=0)" in table and "gFID" in table
    assert "Compared: AE (γ=0, M=0) against l-DeTok (γ=3, M=0.7)" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    detok = [r for r in rows if r["variant"] == "detok" and r["tok_steps"] == "3"][0]
    assert f"{float(detok['fd_gen_real[inception]']):.1f}" in table  # the table prints the measured number
    assert detok["features[inception]"] == "inception-v3-compat-pool3-2048"  # which weights measured it
    assert (out / "summary.md").read_text().startswith("| tokenizer")


def test_parallel_jobs(monkeypatch):
    from ldetok import side_by_side as sbs

    monkeypatch.setattr(sbs, "usable_cpus", lambda: 2)
    assert sbs.parallel_jobs(None, 2, "cpu") == 2 and sbs.parallel_jobs(None, 4, "cpu") == 2
    assert sbs.parallel_jobs(3, 2, "cpu") == 2 and sbs.parallel_jobs(1, 2, "cpu") == 1
    monkeypatch.setattr(sbs, "usable_cpus", lambda: 1)
    assert sbs.parallel_jobs(None, 2, "cpu") == 1
    monkeypatch.setattr(sbs, "usable_cpus", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: one pipeline, every rank in it
    assert sbs.parallel_jobs(None, 2, "cpu") == 1 and sbs.parallel_jobs(1, 2, "cpu") == 1
    with pytest.raises(ValueError, match="under torchrun"):
        sbs.parallel_jobs(2, 2, "cpu")
    with pytest.raises(ValueError, match="--jobs"):
        sbs.parallel_jobs(0, 2, "cpu")


def test_child_arguments_drop_the_parents_own_options():
    from ldetok.side_by_side import child_arguments

    argv = ["--preset", "tiny", "--jobs", "2", "--variants=ae,detok", "--seeds", "0,1", "--figures", "f", "--jobs=3"]
    assert child_arguments(argv) == ["--preset", "tiny", "--seeds", "0,1", "--figures", "f"]
    assert child_arguments(argv, ("--jobs", "--variants", "--figures")) == ["--preset", "tiny", "--seeds", "0,1"]


@pytest.mark.slow
def test_reproduce_jobs_runs_variants_side_by_side(tmp_path, capsys):
    """``reproduce --jobs 2``: each variant's pipelines (every seed) in its own process with its own log,
    the command line's other options passed on; the caller then tabulates every row, training nothing."""
    out, figs = tmp_path / "jobs", tmp_path / "figs"
    assert cli(["reproduce", "--preset", "tiny", "--budgets", "2:2", "--seeds", "0,1", "--out", str(out),
                "--figures", str(figs), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[ae] ldetok.cli reproduce --preset tiny --budgets 2:2 --seeds 0,1 --out" in printed
    assert "--figures " + str(out / "logs" / "figures") in printed and "at 1 thread(s)" in printed
    for v in ("ae", "detok"):
        log = (out / "logs" / f"reproduce_{v}.log").read_text()
        assert log.count("training detok_MM") == 2 and "seed 1" in log  # both seeds, in this variant's process
    after = printed[printed.index("[detok]"):]
    assert "training detok_MM" not in printed and "training sit" not in after  # the caller trained nothing
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("ae", "0"), ("ae", "1"), ("detok", "0"), ("detok", "1")]
    assert "seeds [0, 1]" in (out / "results.md").read_text()


def test_headline_table_averages_seeds():
    from ldetok.main_job import headline_table

    rows = [{"tok_steps": 1, "gen_steps": 2, "generator": "sit", "variant": "ae", "psnr": p, "generator_loss": 1.0,
             "fd_gen_real[inception]": None} for p in (20.0, 22.0)]
    t = headline_table(rows)
    assert "21.00 ± 1.00" in t and "1.000 ± 0.000" in t and "gFID" not in t and "AE (γ=0, M=0)" in t
    one = headline_table(rows[:1])
    assert "20.00" in one and "±" not in one


def test_progress_estimate_charges_each_kind_its_measured_rate(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(R.time, "time", lambda: clock[0])
    p = R._Progress([("tokenizer", 100), ("recon", 10), ("tokenizer", 200), ("recon", 10)])
    assert p.left() is None  # nothing timed yet: no estimate
    t = p.stage("tok a")
    clock[0] += 50.0  # 0.5 s per tokenizer step
    p.end(t)
    assert p.left() == pytest.approx(0.5 * (10 + 200 + 10))  # recon not timed yet: the overall rate
    t = p.stage("recon a")
    clock[0] += 20.0  # 2 s per image
    p.end(t)
    assert p.left() == pytest.approx(0.5 * 200 + 2.0 * 10)
    t = p.stage("tok b")
    p.end(t, skipped=True)  # a reused stage costs nothing and does not change the rates
    assert p.left() == pytest.approx(2.0 * 10)
    assert "stage 3/4" in capsys.readouterr().out


def _tiny_run(out, variant):
    """One tiny reproduction (one variant, budget 2:2) in ``out``; its folder and command line."""
    args = ["reproduce", "--preset", "tiny", "--variants", variant, "--budgets", "2:2", "--out", str(out),
            "--figures", str(out.parent / "figs")]
    assert cli(args) == 0
    return out, args


@pytest.mark.slow
def test_reproduce_with_decoder_finetuning_reuses_the_generator(tmp_path):
    """--decoder-ft after a finished run: the decoder-tuned tokenizer shares its parent's encoder and
    statistics (checked), so the parent's generator is reused, not retrained, and the same sampled latents
    are decoded by both decoders, reported side by side."""
    from ldetok.runs import load_tokenizer

    out, args = _tiny_run(tmp_path / "ft", "detok")
    gen_json = out / "generators" / "sit_detok_s0_t2_g2" / "generator" / "generator.json"
    before = (gen_json.stat().st_mtime_ns, gen_json.read_bytes())
    assert cli(args + ["--decoder-ft", "2"]) == 0
    assert (gen_json.stat().st_mtime_ns, gen_json.read_bytes()) == before  # not retrained
    assert sorted(p.name for p in (out / "generators").iterdir()) == ["sit_detok_s0_t2_g2"]
    base, ft = load_tokenizer(out / "tokenizers" / "detok_s0_t2"), load_tokenizer(out / "tokenizers" / "detok_s0_t2_ft2")
    assert R.shares_latents(out / "tokenizers" / "detok_s0_t2", out / "tokenizers" / "detok_s0_t2_ft2")
    dec = [k for k in base.state_dict() if k.startswith("decoder")]
    assert any(not torch.equal(base.state_dict()[k], ft.state_dict()[k]) for k in dec)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["decoder_ft_steps"] for r in rows] == ["0", "2"]
    assert rows[0]["generator_loss"] == rows[1]["generator_loss"] and rows[0]["cfg"] == rows[1]["cfg"]
    assert rows[0]["fd_gen_real[inception]"] != rows[1]["fd_gen_real[inception]"]  # another decoder renders them
    assert rows[0]["generator_tokenizer"] == rows[1]["generator_tokenizer"] == "detok_s0_t2"
    assert "decoder fine-tuned 2 steps" in (out / "results.md").read_text()
    assert (out / "samples" / "sit_detok_s0_t2_g2_ft2.png").is_file()


def test_a_generator_of_another_size_reuses_the_tokenizers(tmp_path, capsys):
    """A family override of ``model_args`` (the capacity presets' wider SiT) names the generator's folder,
    result files and rows after the arguments, so it shares ``--out`` with the default-size generator:
    the tokenizer is reused, both generators are kept and ``--collect`` finds each."""
    out, args = _tiny_run(tmp_path / "cap", "ae")
    tok = out / "tokenizers" / "ae_s0_t2" / "tokenizer" / "model.safetensors"
    before = (tok.stat().st_mtime_ns, tok.read_bytes())
    capsys.readouterr()
    wide = args + ["--gen-for", "sit", 'model_args={"hidden_size": 96, "depth": 2}']
    assert cli(wide) == 0
    said = capsys.readouterr().out
    assert (tok.stat().st_mtime_ns, tok.read_bytes()) == before and "training detok_MM" not in said
    assert sorted(p.name for p in (out / "generators").iterdir()) == ["sit-depth2-hidden_size96_ae_s0_t2_g2",
                                                                      "sit_ae_s0_t2_g2"]
    cfg = json.loads((out / "generators" / "sit-depth2-hidden_size96_ae_s0_t2_g2" / "config.json").read_text())
    assert json.loads(cfg["model_args"]) == {"hidden_size": 96, "depth": 2}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["generator"] for r in rows] == ["sit-depth2-hidden_size96"]
    assert (out / "eval" / "gen_sit-depth2-hidden_size96_ae_s0_t2_g2.json").is_file()
    assert (out / "eval" / "gen_sit_ae_s0_t2_g2.json").is_file()  # the default-size one's results are kept
    assert cli(wide + ["--collect"]) == 0 and "1 finished result rows; 0 not finished" in capsys.readouterr().out
    assert cli(args + ["--collect"]) == 0
    assert [r["generator"] for r in csv.DictReader(open(out / "results.csv"))] == ["sit"]


    # a finished stage is reused only for its own config: another --tok or --gen is refused, naming both
    for over, where, key in ((dict(tok_overrides={"perceptual": "effnet_lite0"}), "tokenizers/ae_s0_t2",
                              "losses.perceptual"),
                             (dict(gen_overrides={"lr": 0.0123}), "generators/sit_ae_s0_t2_g2", "optim.lr")):
        with pytest.raises(ValueError, match="different config") as err:
            R.reproduce("tiny", out, variants=["ae"], budgets=[(2, 2)], figures_dir=tmp_path / "figs", **over)
        assert where in str(err.value) and key in str(err.value)
    assert (tok.stat().st_mtime_ns, tok.read_bytes()) == before


class _CountingFeatures(_MomentFeatures):
    """Moment features that count the images they see (the 'slow' space of the test below)."""

    inception_score_available = False

    def __init__(self):
        self.seen = 0

    def features(self, images):
        f = super().features(images)
        self.seen += len(f)
        return f


@pytest.mark.slow
def test_untuned_decoders_measured_in_fewer_spaces(tmp_path, monkeypatch):
    """untuned_features: beside a decoder-tuned copy, the untuned decoder is measured only in the named
    spaces; the tuned one in every space. The slow space sees exactly the real, the tuned
    reconstructions and the tuned decoder's samples, n_inception each."""
    monkeypatch.setitem(REPRODUCE_PRESETS, "tiny", dict(REPRODUCE_PRESETS["tiny"], features=("classifier", "inception"),
                                                        untuned_features=("classifier",), decoder_ft_steps=2))
    slow = _CountingFeatures()
    monkeypatch.setattr(R, "_extractors", lambda names, device, warm=False:
                        {k: slow if k == "inception" else _MomentFeatures() for k in names})
    out = tmp_path / "ft"
    rows = R.reproduce("tiny", out, variants=["ae"], budgets=[(2, 2)], figures_dir=tmp_path / "figs")
    untuned, tuned = sorted(rows, key=lambda r: r["decoder_ft_steps"])
    assert (untuned["decoder_ft_steps"], tuned["decoder_ft_steps"]) == (0, 2)
    for k in ("fd_recon_real", "fd_gen_real", "kid_gen_real", "fd_gen_recon"):
        assert math.isfinite(untuned[f"{k}[classifier]"]) and math.isfinite(tuned[f"{k}[classifier]"])
        assert f"{k}[inception]" not in untuned and math.isfinite(tuned[f"{k}[inception]"])
    assert slow.seen == 3 * 12  # n_inception = 12 for real, tuned recon, tuned samples
    table = R.headline_table(rows)
    line = [ln for ln in table.splitlines() if ln.startswith("| AE") and "fine-tuned" not in ln][0]
    assert "–" in line and "n/a" not in line
    md = (out / "results.md").read_text()
    assert "untuned decoders: classifier only" in md


def test_a_tuned_decoder_renders_the_same_latents():
    """generate_images with [tokenizer, tuned copy] decodes one set of sampled latents with each: equal to
    sampling twice with the same seed, once per decoder."""
    from ldetok.generators import build_generator
    from ldetok.sampling import generate_images
    from ldetok.tokenizers import build

    torch.manual_seed(0)
    tok = build("detok_MM", image_size=32, patch_size=8, in_channels=1, latent_channels=16).eval()
    tuned = build("detok_MM", image_size=32, patch_size=8, in_channels=1, latent_channels=16).eval()
    tuned.load_state_dict(tok.state_dict())
    with torch.no_grad():
        for p in tuned.decoder.parameters():
            p.add_(0.01)
    gen = build_generator("sit_tiny", latent_shape=(16, 4, 4), num_classes=10).eval()
    both, labels = generate_images(gen, [tok, tuned], 6, steps=3, seed=5)
    one, _ = generate_images(gen, tok, 6, steps=3, seed=5)
    other, _ = generate_images(gen, tuned, 6, steps=3, seed=5)
    assert torch.equal(both[0], one) and torch.equal(both[1], other) and not torch.equal(one, other)
    assert labels == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
def test_reproduce_guidance_search(tmp_path):
    """--cfg-search: each guidance scale is scored by FD on n_search samples; the final evaluation uses the
    best."""
    out = tmp_path / "cfg"
    assert cli(["reproduce", "--preset", "tiny", "--variants", "ae", "--budgets", "2:2", "--cfg-search", "1,4",
                "--n-search", "8", "--out", str(out), "--figures", str(tmp_path / "figs")]) == 0
    ev = json.loads((out / "eval" / "gen_sit_ae_s0_t2_g2.json").read_text())
    search = json.loads(ev["cfg_search"])
    assert search["n"] == 8 and set(search["fd"]) == {"1", "4"}
    assert ev["cfg"] == float(min(search["fd"], key=search["fd"].get))


@pytest.mark.parametrize("name", list(REPRODUCE_PRESETS))
def test_every_preset_resolves_and_builds(name):
    """Each preset's tokenizer variants and generator families resolve to valid configs, and the models
    they describe can be constructed (on the meta device: no memory, no weights), so a GPU preset cannot
    fail on a config error hours into a run."""
    from ldetok.generators import build_generator
    from ldetok.tokenizers import build_sized

    P = resolve_reproduce_config(name)
    for v in P.variants:
        tcfg = R.tokenizer_config(P, v, 0, 0, P.tok_overrides)
        with torch.device("meta"):
            m = tcfg.model
            tok = build_sized(m.name, m.image_size, m.patch_size, m.in_channels, m.latent_channels)
        latent_shape = tok.latent_shape(tcfg.model.image_size)
        if P.decoder_ft_steps:
            R.tokenizer_config(P, v, 0, 0, P.tok_overrides, parent="x", ft_steps=1)
    assert all(R.variant_settings(v) for v in P.variants)
    for fam in P.generators:
        gcfg = R.generator_config(P, fam, "x", 0, 0, P.gen_overrides)
        extra = json.loads(gcfg.model_args) if gcfg.model_args else {}
        with torch.device("meta"):
            gen = build_generator(gcfg.model, latent_shape=latent_shape, num_classes=10, **extra)
        assert sum(p.numel() for p in gen.parameters()) > 0
    assert all(a >= 0 and b >= 0 for a, b in P.budgets) and P.n_eval > 0
    assert P.n_inception is None or 0 < P.n_inception <= P.n_eval


def test_presets_command_lists_reproduce_presets(capsys):
    assert cli(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REPRODUCE_PRESETS)


def test_reproduce_configs_are_checked_before_any_work():
    """One preset mechanism: the reproduce presets resolve like the training presets, and bad values are
    refused with every problem named, before any training starts."""
    from ldetok.config import config_diff

    quick = resolve_reproduce_config("cpu-quick")
    assert config_diff(quick, resolve_reproduce_config("cpu-quick", {"n_eval": 10}))  # overrides apply
    with pytest.raises(ValueError) as e:
        resolve_reproduce_config("cpu-quick", {"variants": ("ae", "nosuch"), "generators": ("sit", "xyz"),
                                               "tokenizer_preset": "nope", "noise_levels": (0.5, 7.0)})
    msg = str(e.value)
    assert all(s in msg for s in ("nosuch", "xyz", "nope", "noise_levels"))
    with pytest.raises(ValueError, match="unknown reproduce preset"):
        resolve_reproduce_config("missing")

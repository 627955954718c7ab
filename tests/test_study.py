"""ldetok.study: the γ × M map's cells, the ranking, the held-out rule and the command line, on
synthetic ``reproduce`` result CSVs."""

import csv

import numpy as np
import pytest

from ldetok import study
from ldetok.cli import main as cli

FIELDS = ["variant", "generator", "seed", "tok_steps", "gen_steps", "decoder_ft_steps", "fd_gen_real[classifier]",
          "fd_recon_real[classifier]", "fd_gen_recon[classifier]", "generator_loss"]


def _csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def _row(variant, seed, fd, ft=0, steps=(1000, 1500)):
    return {"variant": variant, "generator": "sit", "seed": seed, "tok_steps": steps[0], "gen_steps": steps[1],
            "decoder_ft_steps": ft, "fd_gen_real[classifier]": fd, "fd_recon_real[classifier]": fd / 2,
            "fd_gen_recon[classifier]": fd / 4, "generator_loss": 1.0 / (1 + seed)}


def test_map_cells_rank_and_budget_filter(tmp_path):
    rows = [_row("ae", 0, 60.0), _row("ae", 1, 64.0), _row("ae", 0, 50.0, ft=500), _row("ae", 1, 54.0, ft=500),
            _row("g0.5_m0.7", 0, 70.0, ft=500), _row("detok", 0, 120.0, ft=500), _row("g3_m0_add", 0, 90.0, ft=500),
            _row("ae", 0, 1.0, ft=500, steps=(2000, 3000))]
    src = _csv(tmp_path / "a" / "results.csv", rows)
    got = study.load_rows([src], budget=(1000, 1500))
    assert len(got) == 7 and {r["gamma"] for r in got} == {0.0, 0.5, 3.0}
    cells = study.map_cells(got, "fd_gen_real[classifier]", 500)
    assert cells[(0.0, 0.0)] == {"mean": 52.0, "std": 2.0, "n": 2}
    assert cells[(0.5, 0.7)]["mean"] == 70.0 and cells[(3.0, 0.7)]["mean"] == 120.0
    assert (3.0, 0.0) not in cells  # the additive variant is not on the interpolative map
    assert study.map_cells(got, "fd_gen_real[classifier]", 0) == {(0.0, 0.0): {"mean": 62.0, "std": 2.0, "n": 2}}
    rank = study.ranking(got)
    assert [(d["variant"], d["ft"]) for d in rank[:3]] == [("ae", 500), ("ae", 0), ("g0.5_m0.7", 500)]
    path = study.plot_map(got, tmp_path / "map.png")
    assert path.stat().st_size > 10_000


def test_the_same_run_twice_is_refused(tmp_path):
    a = _csv(tmp_path / "a.csv", [_row("ae", 0, 60.0)])
    b = _csv(tmp_path / "b.csv", [_row("ae", 0, 61.0)])
    with pytest.raises(ValueError, match="count each run once"):
        study.load_rows([a, b])


def test_distances_from_different_classifier_weights_are_refused(tmp_path, capsys):
    """A classifier retrained elsewhere gives other distances: rows that record different weights for one
    space are not compared (rows from before the weights were recorded are not counted); reproduce's
    results.md says so in bold."""
    from ldetok.reproduce import mixed_extractors

    def rows(key, seeds):
        return [{**_row("ae", s, 60.0), "features[classifier]": key} for s in seeds]

    fields = FIELDS + ["features[classifier]"]
    paths = {}
    for name, key, seeds in (("a", "fmnist-cnn-pen128-e2-s0-aaaa", (0,)), ("b", "fmnist-cnn-pen128-e2-s0-bbbb", (1,)),
                             ("c", "fmnist-cnn-pen128-e2-s0-aaaa", (2,)), ("old", "", (3,))):
        paths[name] = tmp_path / f"{name}.csv"
        with open(paths[name], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows(key, seeds))
    assert len(study.load_rows([paths["a"], paths["c"], paths["old"]])) == 3
    with pytest.raises(ValueError, match=r"classifier-space distances .*aaaa in .*a\.csv.*bbbb in .*b\.csv"):
        study.load_rows([paths["a"], paths["b"]])
    assert mixed_extractors(rows("k1", (0,)) + rows("", (1,))) == []
    warning = mixed_extractors(rows("k1", (0,)) + rows("k2", (1,)))
    assert len(warning) == 1 and "k1, k2" in warning[0] and "not comparable" in capsys.readouterr().out.lower()


def _heldout(cand, base):
    return [_row("mask", s, c, ft=500) for s, c in zip((2, 3, 4), cand)] + \
           [_row("ae", s, b, ft=500) for s, b in zip((2, 3, 4), base)]


@pytest.mark.parametrize("cand, base, verdict", [
    ((50.0, 51.0, 52.0), (60.0, 61.0, 62.0), "beats"),            # 10 apart, spreads 0.8
    ((70.0, 71.0, 72.0), (60.0, 61.0, 62.0), "loses"),
    ((50.0, 60.0, 70.0), (58.0, 59.0, 60.0), "no difference shown"),  # means 60 vs 59, candidate spread 8.2
    ((55.0, 56.0, 57.0), (50.0, 60.0, 70.0), "no difference shown"),  # 4 apart, but the baseline's spread is 8.2
])
def test_confirm_rule_needs_a_gap_larger_than_both_spreads(cand, base, verdict):
    rows = [{**r, "gamma": 0.0, "max_mask_ratio": 0.7 if r["variant"] == "mask" else 0.0, "noise_type": "interpolative",
             "ft": r["decoder_ft_steps"]} for r in _heldout(cand, base)]
    (res,) = study.confirm(rows, "mask", "ae")
    assert res["verdict"] == verdict
    assert res["candidate_mean"] == pytest.approx(np.mean(cand)) and res["baseline_std"] == pytest.approx(np.std(base))
    assert res["per_seed"][3] == (cand[1], base[1])


def test_confirm_refuses_different_seeds():
    rows = [{**r, "gamma": 0.0, "max_mask_ratio": 0.0, "noise_type": "interpolative", "ft": r["decoder_ft_steps"]}
            for r in _heldout((1.0, 2.0, 3.0), (1.0, 2.0, 3.0))[:-1]]
    with pytest.raises(ValueError, match="same seeds"):
        study.confirm(rows, "mask", "ae")


def test_study_command_writes_map_and_confirmation(tmp_path, capsys):
    src = _csv(tmp_path / "runs" / "results.csv", _heldout((50.0, 51.0, 52.0), (60.0, 61.0, 62.0)))
    out = tmp_path / "figs"
    assert cli(["study", "map", str(src), "--out", str(out)]) == 0
    assert (out / "map.png").is_file() and "| 1 | masking only (M=0.7)" in (out / "map.md").read_text()
    assert cli(["study", "confirm", str(src), "--candidate", "mask", "--out", str(out)]) == 0
    md = (out / "confirm.md").read_text()
    assert "| beats |" in md and "51 ± 0.816" in md
    per_seed = list(csv.DictReader(open(out / "confirm.csv")))
    assert len(per_seed) == 6 and {r["seed"] for r in per_seed} == {"2", "3", "4"}


def test_ablation_table_like_the_papers(tmp_path):
    """One row per setting in the paper's order, gFID per generator family and the rFID beside, mean ± std
    over seeds; the CSV keeps one row per variant, seed and generator."""
    rows = [{**_row(v, s, fd + 10 * s, ft=0), "generator": g}
            for v, fd in (("ae", 50.0), ("mask", 60.0), ("noise", 70.0), ("detok", 80.0))
            for g in ("sit", "mar") for s in (0, 1, 2)]
    for r in rows:
        r["fd_gen_real[classifier]"] += 1.0 if r["generator"] == "mar" else 0.0
    src = _csv(tmp_path / "runs" / "results.csv", rows)
    assert cli(["study", "ablation", str(src), "--out", str(tmp_path / "fig")]) == 0
    md = (tmp_path / "fig" / "ablation.md").read_text().splitlines()
    head = next(line for line in md if line.startswith("| setup"))
    assert head.split(" | ")[1:4] == ["rFID [classifier]", "sit gFID [classifier]", "mar gFID [classifier]"]
    body = [line for line in md if line.startswith("| ") and not line.startswith(("| setup", "|---"))]
    assert [line.split(" | ")[0] for line in body] == ["| Baseline (no corruption)", "| Masking only",
                                                       "| Latent noise only", "| Joint (noise + masking)"]
    std = f"{np.std([0.0, 10.0, 20.0]):.3g}"
    cells = body[0].split(" | ")
    assert cells[1] == f"30 ± {f'{np.std([0.0, 5.0, 10.0]):.3g}'}"  # rFID: fd/2 over seeds 0..2, once per seed
    assert cells[2] == f"60 ± {std}" and cells[3] == f"61 ± {std}" and cells[-2:] == ["3.31", "6.97 |"]
    assert head.split(" | ")[4:6] == ["sit FD(samples, recon) [classifier]", "mar FD(samples, recon) [classifier]"]
    assert cells[4] == f"15 ± {np.std([0.0, 2.5, 5.0]):.3g}"  # fd/4 of the SiT rows
    per_seed = list(csv.DictReader(open(tmp_path / "fig" / "ablation.csv")))
    assert len(per_seed) == 24 and per_seed[0]["variant"] == "ae" and per_seed[0]["generator"] == "mar"


def test_capacity_gap_per_generator_setting(tmp_path):
    rows = []
    for gen, steps, shrink in (("sit", 1500, 1.0), ("sit-hidden_size256", 1500, 0.5), ("sit", 3000, 0.8)):
        for s in (0, 1):
            rows += [{**_row("ae", s, 50.0 + s, ft=500, steps=(1000, steps)), "generator": gen},
                     {**_row("detok", s, 50.0 + s + 60.0 * shrink, ft=500, steps=(1000, steps)), "generator": gen},
                     {**_row("detok", s, 999.0, ft=0, steps=(1000, steps)), "generator": gen}]  # untuned: ignored
    src = _csv(tmp_path / "runs" / "results.csv", rows)
    table = study.capacity_table(study.load_rows([src]))
    got = [(e["generator"], e["gen_steps"], e["fd_gen_real[classifier]"]["gap"]) for e in table]
    assert got == [("sit", 1500, 60.0), ("sit-hidden_size256", 1500, 30.0), ("sit", 3000, 48.0)]
    assert table[0]["fd_gen_real[classifier]"]["ae"] == {"mean": 50.5, "std": 0.5, "n": 2}
    assert cli(["study", "capacity", str(src), "--out", str(tmp_path / "fig")]) == 0
    md = (tmp_path / "fig" / "capacity.md").read_text()
    assert "| sit-hidden_size256 | 1500 | 0,1 |" in md and "+30" in md
    assert len(list(csv.DictReader(open(tmp_path / "fig" / "capacity.csv")))) == 18
    # a seed that only one tokenizer has is left out of that setting: the comparison stays paired
    extra = _csv(tmp_path / "more" / "results.csv", [{**_row("ae", 5, 10.0, ft=500, steps=(1000, 1500)), "generator": "sit"}])
    table = study.capacity_table(study.load_rows([src, extra]))
    assert table[0]["seeds"] == [0, 1] and table[0]["fd_gen_real[classifier]"]["ae"]["mean"] == 50.5


def test_capacity_rows_read_the_reproduce_folder(tmp_path):
    """``study capacity OUT`` reads the capacity presets' finished stages and their baseline (the default
    SiT on the same tokenizers) from OUT's eval files, as ``reproduce --collect`` would; unfinished ones
    are left out."""
    import json

    ev = tmp_path / "map" / "eval"
    ev.mkdir(parents=True)
    for v, base in (("ae", 50.0), ("detok", 110.0)):
        for tag, ft in ((f"{v}_s0_t1000", 0), (f"{v}_s0_t1000_ft500", 500)):
            (ev / f"recon_{tag}.json").write_text(json.dumps({"psnr": 25.0, "fd_recon_real[classifier]": base / 3}))
            for gen, steps, fd in (("sit", 1500, base), ("sit-hidden_size256", 1500, base - 10), ("sit", 3000, base - 5)):
                if not (v == "detok" and steps == 3000):  # not finished yet
                    (ev / f"gen_{gen}_{tag}_g{steps}.json").write_text(json.dumps(
                        {"fd_gen_real[classifier]": fd - ft / 100, "fd_gen_recon[classifier]": 5.0, "generator_loss": 1.0}))
    rows = study.capacity_rows(tmp_path / "map")
    assert len(rows) == 10 and {r["ft"] for r in rows} == {0, 500}
    table = study.capacity_table(rows)
    assert [(e["generator"], e["gen_steps"], e["fd_gen_real[classifier]"]["gap"]) for e in table] == \
        [("sit", 1500, 60.0), ("sit-hidden_size256", 1500, 60.0)]  # the 3000-step setting lacks l-DeTok
    assert table[0]["fd_gen_real[classifier]"]["ae"]["mean"] == 45.0  # the tuned decoder's row


def test_compare_one_lever_across_folders(tmp_path, capsys):
    """study compare: each entry against the first on their shared seeds and decoders, from different
    folders even under the same variant name (a --tok perceptual=... run), labelled; one seed gives no verdict."""
    base = _csv(tmp_path / "map" / "results.csv",
                [_row("mask", s, fd, ft=ft) for s, fd in ((0, 60.0), (1, 62.0)) for ft in (0, 500)] +
                [_row("g0.5_m0_add", 0, 70.0, ft=500)])
    eff = _csv(tmp_path / "effnet" / "results.csv",
               [_row("mask", s, fd, ft=500) for s, fd in ((0, 40.0), (1, 41.0), (2, 39.0))])
    out = tmp_path / "figs"
    assert cli(["study", "compare", f"{base}:mask", f"{eff}:mask=masking + effnet", "--name", "effnet",
                "--out", str(out)]) == 0
    md = (out / "effnet.md").read_text()
    assert "| fine-tuned 500 | gFID: FD(samples, real)" in md and "| masking + effnet | 40.5 ± 0.5 | 61 ± 1 | -20.5 | beats |" in md
    assert "untuned" not in md  # the effnet folder has no untuned decoder rows: only the shared decoder
    per_seed = list(csv.DictReader(open(out / "effnet.csv")))
    assert sorted((r["variant"], r["seed"]) for r in per_seed) == [("masking + effnet", "0"), ("masking + effnet", "1"),
                                                                    ("masking only (M=0.7)", "0"), ("masking only (M=0.7)", "1")]
    res = study.study_compare([f"{base}:mask", f"{base}:g0.5_m0_add=additive"], out, "additive")
    assert {d["verdict"] for d in res} == {"one seed: no verdict"} and res[0]["seeds"] == [0]
    assert res[0]["candidate_mean"] == 70.0 and res[0]["baseline_mean"] == 60.0
    with pytest.raises(ValueError, match="SOURCE:VARIANT"):
        study.parse_compare_spec("runs/study/map")
    with pytest.raises(ValueError, match="unknown variant"):
        study.parse_compare_spec("runs/study/map:gamma3")
    with pytest.raises(ValueError, match="its own label"):
        study.study_compare([f"{base}:mask", f"{eff}:mask"], out)

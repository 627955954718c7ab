"""``ldetok reproduce`` end to end with the tiny preset: every stage runs, results are written, a second
call reuses every finished stage."""

import csv
import math

import pytest

from ldetok.cli import main as cli


@pytest.mark.slow
def test_reproduce_tiny_end_to_end_and_resume(tmp_path, capsys):
    out, figs = tmp_path / "repro", tmp_path / "figs"
    assert cli(["reproduce", "--preset", "tiny", "--out", str(out), "--figures", str(figs)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4  # 2 budgets x 2 variants x 1 generator x 1 seed
    assert {r["variant"] for r in rows} == {"ae", "detok"}
    for r in rows:
        for k in ("psnr", "fd_recon_real[inception]", "fd_gen_real[inception]", "fd_gen_recon[inception]",
                  "kid_gen_real[inception]", "generator_loss"):
            assert math.isfinite(float(r[k])), k
    md = (out / "results.md").read_text()
    assert "noise + masking (l-DeTok)" in md and "fd_gen_recon" in md
    assert (figs / "reproduce_tiny_sit.png").exists()
    assert len(list((out / "samples").glob("*.png"))) == 4
    weights = sorted((out / "generators").glob("*/generator/model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in weights]
    capsys.readouterr()
    # a second run finds every stage finished and retrains nothing
    assert cli(["reproduce", "--preset", "tiny", "--out", str(out), "--figures", str(figs)]) == 0
    assert [p.stat().st_mtime_ns for p in weights] == mtimes
    again = capsys.readouterr().out
    assert "training detok_MM" not in again and "training sit" not in again

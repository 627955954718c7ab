"""``ldetok reproduce`` end to end with the tiny preset: every stage runs, results are written, a second
call reuses every finished stage."""

import csv
import math

import pytest
import torch

import ldetok.reproduce as R
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
    assert (figs / "reproduce_tiny_sit.png").exists()
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


def test_corrupted_psnr_reference():
    """t=0 decodes the clean latents; t>0 equals decoding (1-t)z + 3tε with the seeded ε, computed by hand."""
    from ldetok.eval.recon import psnr
    from ldetok.tokenizers import build

    torch.manual_seed(0)
    tok = build("detok_TT", image_size=16, patch_size=4, in_channels=1, latent_channels=4).eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = R._corrupted_psnr(tok, x, (0.0, 0.5), seed=7, dev="cpu")
    assert out["psnr_t0"] == pytest.approx(psnr(x, R._quantize(tok.reconstruct(x)))[0], abs=1e-9)
    with torch.no_grad():
        z = tok.encode(x)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        ref = R._quantize(tok.decode(0.5 * z + 0.5 * 3.0 * eps).clamp(-1, 1))
    assert out["psnr_t0.5"] == pytest.approx(psnr(x, ref)[0], abs=1e-9)

"""Throughput settings, checked on a CPU: TF32 and fused AdamW leave CPU runs alone, gradient checkpointing
gives the same gradients, a compiled tokenizer pass equals the eager one over changing mask ratios (and
recompiles at most once per module for them), bf16 sampling/evaluation paths run for every generator
family, and the GPU check script's dry run works."""

import copy
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ldetok.config import RunConfig, resolve_tokenizer_config
from ldetok.corruption import CorruptionConfig, CorruptionDraw, denoising_forward
from ldetok.engine.common import (RESUME_FREE_KEYS, check_resume_config, compile_forward, compiled_frames,
                                  configure_tf32, eager_forward, effective_precision, enable_grad_checkpointing)
from ldetok.engine.optim import build_adamw
from ldetok.eval.recon import psnr_under_noise
from ldetok.generators import FAMILIES, build_generator
from ldetok.sampling import generate_images
from ldetok.tokenizers import build


def _tok(seed=0, **kw):
    torch.manual_seed(seed)
    return build("detok_MM", image_size=32, patch_size=8, in_channels=1, latent_channels=16, **kw).train()


def _x(n=4):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


# ---- defaults: eager, TF32 only on CUDA, fused AdamW only on CUDA ------------------------------------
def test_defaults_keep_cpu_runs_as_they_were():
    run = RunConfig()
    assert run.tf32 and not run.compile and not run.grad_checkpointing
    assert {"compile", "grad_checkpointing"} <= RESUME_FREE_KEYS and "tf32" not in RESUME_FREE_KEYS
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert configure_tf32(torch.device("cpu"), True) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    opt = build_adamw(torch.nn.Linear(3, 3), 1e-3, 0.0)
    assert not opt.defaults["fused"]  # CPU: the default (foreach) implementation
    assert effective_precision("cpu", "auto") == "fp32" and effective_precision("cpu", "bf16") == "bf16"


def test_tokenizer_config_takes_the_new_run_fields_by_leaf_name():
    cfg = resolve_tokenizer_config("cpu-fmnist", {"tf32": False, "compile": True, "grad_checkpointing": True})
    assert (cfg.run.tf32, cfg.run.compile, cfg.run.grad_checkpointing) == (False, True, True)


def test_checkpoints_written_before_the_new_fields_still_resume(tmp_path):
    cfg = resolve_tokenizer_config("cpu-fmnist")
    saved = asdict(cfg)
    for key in ("tf32", "compile", "grad_checkpointing"):
        del saved["run"][key]
    check_resume_config(saved, asdict(cfg), tmp_path, defaults=asdict(type(cfg)()))
    with pytest.raises(ValueError, match="tf32"):
        check_resume_config(saved, asdict(resolve_tokenizer_config("cpu-fmnist", {"tf32": False})), tmp_path,
                            defaults=asdict(type(cfg)()))


# ---- gradient checkpointing ---------------------------------------------------------------------
def _grads(tok, ratio):
    out = denoising_forward(tok, _x(), CorruptionConfig(gamma=3.0), torch.Generator().manual_seed(5),
                            draw=CorruptionDraw(ratio, torch.full((4,), 0.4)))
    loss = (out.recon - _x()).pow(2).mean() + 1e-3 * out.posterior.kl().mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in tok.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_gradient_checkpointing_gives_the_same_gradients(ratio):
    plain, ckpt = _tok(), _tok()
    names = enable_grad_checkpointing(ckpt)
    assert {"encoder", "decoder"} <= set(names) and ckpt.encoder.grad_checkpointing
    loss_a, ga = _grads(plain, ratio)
    loss_b, gb = _grads(ckpt, ratio)
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gradient_checkpointing_reaches_generators_and_refuses_models_without_it():
    assert enable_grad_checkpointing(build_generator("sit_tiny", latent_shape=(16, 4, 4), num_classes=10))
    with pytest.raises(ValueError, match="ConvVAE.*no gradient checkpointing"):
        enable_grad_checkpointing(build("convvae_tiny"))


# ---- torch.compile ------------------------------------------------------------------------------
# different kept-token counts (16 tokens: 8, 13, all (no masking), 5, 10), noise on
RATIOS = [0.5, 0.2, 0.0, 0.7, 0.4]


def _train_losses(tok, steps=RATIOS):
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(7)
    cfg = CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    losses, recons = [], []
    for i, r in enumerate(steps):
        opt.zero_grad()
        out = denoising_forward(tok, _x(), cfg, g, draw=CorruptionDraw(r, torch.full((4,), 0.1 * i)))
        loss = (out.recon - _x()).pow(2).mean() + 1e-3 * out.posterior.kl().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        recons.append(out.recon.detach())
    return losses, recons


@pytest.mark.slow
def test_compiled_tokenizer_pass_equals_eager_over_changing_mask_ratios():
    eager, compiled = _tok(), _tok()
    frames0 = compiled_frames()
    for m in (compiled.encoder, compiled.decoder):
        compile_forward(m)
    ref_losses, ref_recons = _train_losses(eager)
    losses, recons = _train_losses(compiled)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for a, b in zip(recons, ref_recons):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    # encoder: a first static graph, one recompile with a symbolic token count, one for "no masking";
    # decoder: kept-token scatter, full permutation, no masking (its input size never changes)
    assert compiled_frames() - frames0 <= 7
    frames = compiled_frames()
    _train_losses(compiled, [0.3, 0.6, 0.1])  # new token counts: no more compiles
    assert compiled_frames() == frames
    # the compiled forward follows its module into a deep copy (the EMA export), and can be undone
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        x = _x()
        torch.testing.assert_close(twin.encoder(x), eager_forward(copy.deepcopy(twin).encoder)(x), rtol=1e-4, atol=1e-5)
    eager_forward(compiled.encoder)
    assert "forward" not in compiled.encoder.__dict__


@pytest.mark.slow
def test_trainer_compiles_and_logs_the_recompiles(tmp_path):
    from ldetok.engine.tokenizer_trainer import train_tokenizer

    cfg = resolve_tokenizer_config("cpu-fmnist", dict(max_steps=4, batch_size=8, stats_images=16, log_every=1,
                                                      image_every=0, tensorboard=False, compile=True,
                                                      grad_checkpointing=True))
    train_tokenizer(cfg, tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert "torch.compile:" in log and "after the first step" in log
    from ldetok.runs import load_tokenizer

    tok = load_tokenizer(tmp_path)  # the export is a plain module
    assert "forward" not in tok.encoder.__dict__


# ---- bf16 sampling and evaluation paths (CUDA's; run here under CPU bf16 to catch dtype errors) ----
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_sampling_runs_for_every_family(family):
    tok = _tok().eval()
    torch.manual_seed(0)
    gen = build_generator(family, latent_shape=(16, 4, 4), num_classes=10).eval()
    steps = None if gen.kind == "ardiff" else 3  # the AR models take one step per token
    x, labels = generate_images(gen, tok, 4, guidance_scale=1.5, steps=steps, precision="bf16", batch_size=4)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()
    assert labels == [0, 1, 2, 3]


def test_bf16_evaluation_path_is_close_to_fp32():
    tok = _tok().eval()
    x = _x()
    fp32 = psnr_under_noise(tok, x, [0.0, 0.3], precision="fp32")
    bf16 = psnr_under_noise(tok, x, [0.0, 0.3], precision="bf16")
    auto = psnr_under_noise(tok, x, [0.0, 0.3])  # CPU: auto is fp32
    for t in fp32:
        assert torch.equal(auto[t]["psnr"], fp32[t]["psnr"])
        torch.testing.assert_close(bf16[t]["psnr"], fp32[t]["psnr"], rtol=0.02, atol=0.2)


# ---- the GPU check script -----------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    for row in ("detok_MM 32px ours-eager", "ours-compiled (compile)", "mar_tiny", "sit_tiny", "sample img/s",
                "DRY RUN"):
        assert row in table, row
    assert Path(tmp_path / "gpu_check.jsonl").read_text().count("\n") >= 4

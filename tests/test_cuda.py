"""The CUDA paths: bf16 training steps that lower the loss, fused AdamW, TF32, EMA, checkpoints and exact
resume with RNG states, a one-process NCCL torchrun, sampling for every generator family, the latent cache.

Skipped without a CUDA device (also under ``CI=true``: CUDA tests are the one kind allowed to skip).
``bench/gpu_check.sh`` runs this file first; it needs no dataset (a small synthetic image folder stands in
when Fashion-MNIST is absent).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, step_losses
from ldetok.config import resolve_tokenizer_config
from ldetok.corruption import CorruptionConfig, denoising_forward
from ldetok.data import default_data_available
from ldetok.engine.checkpoint import CheckpointManager
from ldetok.engine.common import autocast_ctx
from ldetok.engine.ema import EMA
from ldetok.engine.optim import build_adamw
from ldetok.engine.tokenizer_trainer import TokenizerTrainer, train_tokenizer
from ldetok.generators import FAMILIES, build_generator
from ldetok.latents import LatentCache, build_latent_cache
from ldetok.runs import RunLayout, load_tokenizer
from ldetok.sampling import generate_images
from ldetok.tokenizers import build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
FAST = dict(batch_size=16, log_every=1, image_every=0, stats_images=64, tensorboard=False, warmup_frac=0.0,
            schedule="constant", device="cuda")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Config overrides naming a dataset: Fashion-MNIST when installed, else a synthetic image folder."""
    if default_data_available()["fashion_mnist"]:
        return dict(dataset="fashion_mnist")
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("val", 32)):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n // 2):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) // (1 + c)
                Image.fromarray(img).save(d / f"{i}.png")
    return dict(dataset="imagefolder", data_root=str(root), eval_split="val")


def _cfg(data, **over):
    return resolve_tokenizer_config("cpu-fmnist", {**FAST, **data, **over})


@pytest.fixture(scope="module")
def cuda_run(data, tmp_path_factory):
    """A 6-step tokenizer run on CUDA, checkpoints at 3 and 6."""
    run = tmp_path_factory.mktemp("cuda_tok")
    train_tokenizer(_cfg(data, max_steps=6, ckpt_every=3), run)
    return run


def _falls(losses, frac=0.8):
    k = max(3, len(losses) // 5)
    return np.mean(losses[-k:]) < frac * np.mean(losses[:k])


# ---- training steps in bf16 --------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_tokenizer_steps_lower_the_loss(compiled):
    torch.manual_seed(0)
    tok = build("detok_MM", image_size=32, patch_size=8).to(DEV).train()
    if compiled:
        from ldetok.engine.common import compile_forward

        compile_forward(tok.encoder)
        compile_forward(tok.decoder)
    opt = build_adamw(tok, 1e-3, 0.0)
    assert opt.defaults["fused"]  # fused AdamW: every parameter on CUDA
    # smooth images (bilinear from 4x4): 16 tokens x 16 channels can hold them, so the loss can fall
    x = torch.rand(32, 3, 4, 4, device=DEV, generator=torch.Generator(DEV).manual_seed(1)) * 2 - 1
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    g = torch.Generator(DEV).manual_seed(0)
    cfg = CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(DEV, "auto"):
            out = denoising_forward(tok, x, cfg, g)
        assert out.recon.dtype == torch.bfloat16
        loss = (out.recon.float() - x).pow(2).mean() + 1e-6 * out.posterior.kl().float().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and _falls(losses), losses


@pytest.mark.parametrize("family", ["sit", "mar"])
def test_bf16_generator_steps_lower_the_loss(family):
    torch.manual_seed(0)
    gen = build_generator(family, latent_shape=(16, 4, 4), num_classes=10).to(DEV).train()
    opt = build_adamw(gen, 1e-3, 0.0)
    assert opt.defaults["fused"]
    z = torch.randn(64, 16, 4, 4, device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    y = torch.arange(64, device=DEV) % 10
    g = torch.Generator(DEV).manual_seed(0)
    losses = []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(DEV, "auto"):
            loss = gen(z, y, generator=g).float()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and _falls(losses, 0.95), losses


def test_ema_on_cuda():
    m = torch.nn.Linear(4, 4).to(DEV)
    ema = EMA(m, 0.9)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, decay=0.9)
    assert ema.shadow["weight"].device.type == "cuda"
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * before + 0.1 * m.weight.detach())


def test_trainer_sets_tf32_as_configured(data, tmp_path):
    TokenizerTrainer(_cfg(data, max_steps=1, tf32=False), tmp_path / "off")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    TokenizerTrainer(_cfg(data, max_steps=1), tmp_path / "on")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# ---- checkpoints and exact resume ------------------------------------------------------------------
def test_checkpoint_and_exact_resume_on_cuda(data, cuda_run, tmp_path):
    """3 steps, then resumed to 6 == 6 straight: every RNG stream (CUDA's and the training generator's)
    continues exactly; the losses agree to float tolerance (CUDA attention backward may use atomics)."""
    train_tokenizer(_cfg(data, max_steps=3, ckpt_every=3), tmp_path)
    train_tokenizer(_cfg(data, max_steps=6, ckpt_every=3), tmp_path)
    full, resumed = step_losses(cuda_run), step_losses(tmp_path)
    assert full.keys() == resumed.keys() == set(range(1, 7))
    for s in range(1, 7):
        assert resumed[s] == pytest.approx(full[s], rel=1e-3), s
    a = CheckpointManager(RunLayout(cuda_run).checkpoints).auto_resume()[0]
    b = CheckpointManager(RunLayout(tmp_path).checkpoints).auto_resume()[0]
    assert a["step"] == b["step"] == 6
    for ra, rb in zip(a["rngs"], b["rngs"]):
        assert torch.equal(ra["gen"], rb["gen"])  # the CUDA training generator
        assert len(ra["rng"]["cuda"]) == torch.cuda.device_count()
        assert all(torch.equal(x, y) for x, y in zip(ra["rng"]["cuda"], rb["rng"]["cuda"]))


# ---- NCCL under torchrun ---------------------------------------------------------------------------
NCCL_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from ldetok.config import resolve_tokenizer_config
    from ldetok.engine.distributed import gather_objects, is_distributed
    from ldetok.engine.tokenizer_trainer import train_tokenizer
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    assert dist.get_backend() == "nccl" and is_distributed()
    t = torch.ones(3, device="cuda")
    dist.all_reduce(t)
    assert gather_objects({"rank": dist.get_rank()}) == [{"rank": 0}]
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4).cuda(), device_ids=[0])
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    overrides = dict(max_steps=2, ckpt_every=2, batch_size=8, log_every=1, image_every=0, stats_images=16,
                     tensorboard=False, device="cuda", **eval(sys.argv[2]))
    train_tokenizer(resolve_tokenizer_config("cpu-fmnist", overrides), sys.argv[1])
    assert is_distributed()  # a caller's group outlives the run
    dist.destroy_process_group()
    print("NCCL OK")
""")


def test_one_process_nccl_torchrun(data, tmp_path):
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(script), str(tmp_path / "run"), repr(data)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "NCCL OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    assert (tmp_path / "run" / "tokenizer").is_dir()


# ---- sampling and the latent cache -------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sampling_each_family_on_cuda(family, cuda_run):
    tok = load_tokenizer(cuda_run).to(DEV).eval()
    torch.manual_seed(0)
    gen = build_generator(family, latent_shape=tok.latent_shape(32), num_classes=10).to(DEV).eval()
    steps = None if gen.kind == "ardiff" else 4  # the AR models take one step per token
    x, labels = generate_images(gen, tok, 6, guidance_scale=1.5, steps=steps, batch_size=3)  # bf16 on CUDA
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] == 6
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0 and labels == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("flip", [False, True])
def test_latent_cache_build_on_cuda(cuda_run, tmp_path, flip):
    """Built on CUDA, sampled with the trainer's CUDA generator (a flip cache draws its flips from it too)."""
    out = tmp_path / "cache"
    build_latent_cache(cuda_run, split="train", flip=flip, out_dir=out, device="cuda", limit=32, verbose=False)
    cache = LatentCache(out)
    assert len(cache) == 32 and json.loads((out / "meta.json").read_text())
    z, y = cache.sample(cache.read(list(range(8))), generator=torch.Generator(DEV).manual_seed(0), device=DEV)
    assert z.device.type == "cuda" and z.shape == (8, *load_tokenizer(cuda_run).latent_shape(32))
    assert torch.isfinite(z).all() and y.device.type == "cuda"

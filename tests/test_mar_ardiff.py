"""MAR and ARDiff (RandomAR / RasterAR): training signal, samplers, CFG, KV cache, sizes, official keys.

Tiny models on 16x4x4 latents (16 tokens of 16 channels), seeded; no wall-clock assertions.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldetok.generators.ardiff import ARDiff, ARDiff_models
from ldetok.generators.base import patchify, unpatchify
from ldetok.generators.mar import MAR, MAR_models, cosine_mask_schedule, load_official_mar, truncnorm_mask_ratio

SHAPE = (16, 4, 4)
L = 16
FAST = dict(num_sampling_steps="5")  # a short DiffLoss sampler keeps the sampling tests quick


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is as fast, and it does not collapse when other jobs share
    the cores (two OpenMP threads on a busy 2-core machine made steps 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n=32, seed=0):
    """Two classes of latents: +pattern / -pattern plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(SHAPE, generator=g)
    labels = torch.arange(n) % 2
    sign = (1 - 2 * labels).float()[:, None, None, None]
    return sign * pattern + 0.1 * torch.randn(n, *SHAPE, generator=g), labels


def _mar(**kw):
    torch.manual_seed(0)
    return mar_tiny_fast(**kw)


def mar_tiny_fast(**kw):
    return MAR_models["mar_tiny"](**{**FAST, **kw})


def _ardiff(order="random", **kw):
    torch.manual_seed(0)
    return ARDiff_models[f"{order}ar_tiny"](**{**FAST, **kw})


def _eval_loss(model, x, y, seed=123):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.loss(x, y, generator=torch.Generator().manual_seed(seed)).item()
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# Training signal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: _mar(), lambda: _ardiff("random"), lambda: _ardiff("raster")],
                         ids=["mar", "randomar", "rasterar"])
def test_loss_finite_and_decreases(build):
    model = build()
    assert model.diffloss.batch_mul == 4  # the l-DeTok recipe's diffusion_batch_mul
    x, y = _data()
    before = _eval_loss(model, x, y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(40):
        loss = model(x, y, generator=g)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(model, x, y)
    assert math.isfinite(before) and after < 0.8 * before, (before, after)


def test_bad_latent_shape_is_refused():
    with pytest.raises(ValueError, match="latents must have shape"):
        _mar().loss(torch.zeros(2, 16, 8, 8))
    with pytest.raises(ValueError, match="latents must have shape"):
        _ardiff().loss(torch.zeros(2, 8, 4, 4))


# ---------------------------------------------------------------------------------------------
# Sampling: shapes, determinism, CFG only when cfg != 1
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mar", "ardiff"])
def test_sample_shapes_and_determinism(kind):
    model = (_mar() if kind == "mar" else _ardiff()).eval()
    for labels in (None, torch.tensor([0, 1, 1])):
        a = model.sample(3, labels=labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
        assert a.shape == (3, *SHAPE) and torch.isfinite(a).all()
    a = model.sample(3, labels=1, generator=torch.Generator().manual_seed(5))
    b = model.sample(3, labels=1, generator=torch.Generator().manual_seed(5))
    c = model.sample(3, labels=1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _record_diffloss(model):
    """Wrap diffloss.sample to record (rows, guidance_scale) per call."""
    calls, orig = [], model.diffloss.sample

    def rec(z, temperature=1.0, guidance_scale=1.0, generator=None):
        calls.append((z.shape[0], guidance_scale))
        return orig(z, temperature=temperature, guidance_scale=guidance_scale, generator=generator)

    model.diffloss.sample = rec
    return calls


def _record_batch(module):
    sizes = []
    module.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    return sizes


@pytest.mark.parametrize("kind", ["mar", "ardiff"])
def test_cfg_one_takes_the_plain_conditional_path(kind):
    model = (_mar() if kind == "mar" else _ardiff()).eval()
    first = model.encoder_blocks[0] if kind == "mar" else model.transformer.blocks[0]
    calls, batch = _record_diffloss(model), _record_batch(first)
    labels = torch.tensor([0, 1])
    plain = model.sample(2, labels=labels, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert set(batch) == {2} and all(c == 1.0 for _, c in calls)  # never doubled, never guided
    assert sum(r for r, _ in calls) == 2 * L  # every token sampled once, no null-class rows
    again = model.sample(2, labels=labels, guidance_scale=1.0, cfg_schedule="constant",
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, again)  # the schedule is irrelevant when there is no guidance
    calls.clear(), batch.clear()
    model.sample(2, labels=labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(3))
    assert set(batch) == {4} and sum(r for r, _ in calls) == 2 * 2 * L  # [cond; uncond]


def test_mar_cosine_schedule_and_linear_cfg():
    for seq, steps in [(16, 8), (256, 64), (256, 256), (16, 16), (16, 1)]:
        sched = cosine_mask_schedule(seq, steps)
        remaining = [seq] + sched[:-1] + [0]
        revealed = [a - b for a, b in zip(remaining, remaining[1:])]
        assert len(revealed) == steps and sum(revealed) == seq and min(revealed) >= 1
        for s, m in enumerate(sched[:-1]):  # unclipped entries follow floor(L cos(pi/2 (s+1)/T))
            target = math.floor(seq * math.cos(math.pi / 2 * (s + 1) / steps))
            assert m == max(1, min(remaining[s] - 1, target))
    assert cosine_mask_schedule(16, 8) == [15, 14, 13, 11, 8, 6, 3, 1]

    model = _mar().eval()
    calls = _record_diffloss(model)
    n, scale, steps = 2, 4.0, 8
    model.sample(n, labels=torch.tensor([0, 1]), guidance_scale=scale, steps=steps,
                 generator=torch.Generator().manual_seed(0))
    sched = cosine_mask_schedule(L, steps)
    remaining = [L] + sched[:-1] + [0]
    assert [r for r, _ in calls] == [2 * n * (a - b) for a, b in zip(remaining, remaining[1:])]
    # MAR's linear ramp: 1 + (scale - 1) * (L - mask_len) / L with mask_len the masked count after the step
    assert [c for _, c in calls] == pytest.approx([1 + (scale - 1) * (L - m) / L for m in sched])


def test_ardiff_linear_cfg_ramp():
    model = _ardiff().eval()
    calls = _record_diffloss(model)
    model.sample(2, labels=torch.tensor([0, 1]), guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert [c for _, c in calls] == pytest.approx([1 + 2.0 * s / L for s in range(L)])
    with pytest.raises(ValueError, match="steps must be None or 16"):
        model.sample(2, steps=8)


# ---------------------------------------------------------------------------------------------
# MAR masking
# ---------------------------------------------------------------------------------------------
def test_mar_mask_ratio_truncated_normal():
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([truncnorm_mask_ratio(0.7, g) for _ in range(4000)], dtype=torch.float64)
    assert r.min() >= 0.7 and r.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 + 0.25 (phi(a) - phi(0)) / (Phi(0) - Phi(a)), a = -1.2
    a = torch.tensor(-1.2, dtype=torch.float64)
    phi = lambda v: torch.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1 + 0.25 * (phi(a) - phi(torch.tensor(0.0, dtype=torch.float64))) / (0.5 - torch.special.ndtr(a))
    assert abs(r.mean() - mean) < 0.005 and abs(float(mean) - 0.867) < 0.001
    assert (r > 0.95).float().mean() > 0.15  # P = 0.206: mass piles up near full masking (left-half Gaussian)

    # the loss sees ceil(L * ratio) >= ceil(0.7 L) masked tokens per sample, one ratio per batch
    model = _mar()
    rows = []
    model.diffloss.forward = lambda target, z, mask=None, generator=None: rows.append(target.shape[0]) or z.sum() * 0
    x, y = _data(8)
    for _ in range(20):
        model.loss(x, y, generator=g)
    assert all(r % 8 == 0 and math.ceil(0.7 * L) <= r // 8 <= L for r in rows) and len(set(rows)) > 1


# ---------------------------------------------------------------------------------------------
# ARDiff: KV cache, orders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["raster", "random"])
def test_ardiff_kv_cache_matches_uncached(order):
    model = _ardiff(order).eval()
    batch = _record_batch(model.transformer.blocks[0])
    tokens = []
    model.transformer.blocks[0].register_forward_hook(lambda m, inp, out: tokens.append(inp[0].shape[1]))
    for guidance_scale in (1.0, 2.5):
        kw = dict(labels=torch.tensor([0, 1, 1]), guidance_scale=guidance_scale, temperature=0.9)
        cached = model.sample(3, generator=torch.Generator().manual_seed(7), use_kv_cache=True, **kw)
        n_cached = sum(tokens)
        tokens.clear()
        plain = model.sample(3, generator=torch.Generator().manual_seed(7), use_kv_cache=False, **kw)
        n_plain = sum(tokens)
        tokens.clear()
        assert torch.allclose(cached, plain, atol=1e-5, rtol=0), (cached - plain).abs().max()
        # the cache feeds one position per step (L rows) instead of the whole prefix (L (L+1) / 2)
        assert n_cached == L and n_plain == L * (L + 1) // 2
    assert batch  # hooks ran


def test_raster_and_random_orders_differ():
    raster, rand = _ardiff("raster"), _ardiff("random")
    rand.load_state_dict(raster.state_dict())  # same weights, only the order differs
    assert torch.equal(raster.make_orders(3), torch.arange(L).expand(3, L))
    orders = rand.make_orders(3, torch.Generator().manual_seed(0))
    assert all(sorted(o.tolist()) == list(range(L)) for o in orders)
    assert not torch.equal(orders, raster.make_orders(3)) and not torch.equal(orders[0], orders[1])
    x, y = _data(4)
    assert _eval_loss(raster, x, y) != _eval_loss(rand, x, y)
    for m in (raster, rand):
        m.eval()
    a = raster.sample(2, labels=0, generator=torch.Generator().manual_seed(1))
    b = rand.sample(2, labels=0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# Config round trip, grad checkpointing, patch size
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mar", "ardiff"])
def test_config_roundtrip_and_grad_checkpointing(kind):
    kw = dict(class_dropout=0.0) if kind == "ardiff" else dict(class_dropout=0.0, attn_dropout=0.0, proj_dropout=0.0)
    model = _mar(**kw) if kind == "mar" else _ardiff(**kw)
    cls = MAR if kind == "mar" else ARDiff
    assert model.kind == kind
    twin = cls(**{**model.config_dict(), "grad_checkpointing": True})
    twin.load_state_dict(model.state_dict())
    assert twin.config_dict() == {**model.config_dict(), "grad_checkpointing": True}
    x, y = _data(4)
    losses = []
    for m in (model, twin):
        m.train()
        loss = m(x, y, generator=torch.Generator().manual_seed(0))
        loss.backward()
        losses.append((loss.detach(), m.z_proj.weight.grad if kind == "mar" else m.x_embedder.weight.grad))
    assert torch.allclose(losses[0][0], losses[1][0]) and torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


def test_patch_size_two():
    x = torch.randn(2, *SHAPE)
    assert torch.equal(unpatchify(patchify(x, 2, channel_major=True), 2, 16, 4, 4, channel_major=True), x)
    assert patchify(x, 2, channel_major=True).shape == (2, 4, 64)
    assert torch.equal(patchify(x, 2, channel_major=True)[0, 1, :4], x[0, 0, :2, 2:4].reshape(-1))  # (c, p, q)
    for model in (_mar(patch_size=2, buffer_size=2), _ardiff(patch_size=2)):
        assert model.seq_len == 4 and model.token_embed_dim == 64
        assert torch.isfinite(model.loss(x, torch.tensor([0, 1])))
        assert model.eval().sample(2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="patch_size"):
        _mar(patch_size=3)


# ---------------------------------------------------------------------------------------------
# Official sizes (meta device) and parameter counts derived independently
# ---------------------------------------------------------------------------------------------
def _block(w):  # LayerNorm x2, qkv, proj, fc1 (4w), fc2
    return 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w)


def _diffloss(c, zc, depth, width):
    time = 256 * width + width + width * width + width
    cond, inp = zc * width + width, c * width + width
    res = depth * (2 * width + 2 * (width * width + width) + 3 * width * width + 3 * width)
    final = width * 2 * c + 2 * c + 2 * width * width + 2 * width
    return time + cond + inp + res + final


def _mar_count(w, depth, dd, dw, c=16, seq=256, buf=64, classes=1000):
    enc = classes * w + w + (c * w + w) + 2 * w + (seq + buf) * w + depth * _block(w) + 2 * w
    dec = (w * w + w) + w + (seq + buf) * w + depth * _block(w) + 2 * w + seq * w
    return enc + dec + _diffloss(c, w, dd, dw)


def _ardiff_count(w, depth, c=16, seq=256, classes=1000, dd=3, dw=1024):
    emb = classes * w + w + w + (c * w + w) + (seq + 1) * w + seq * w + (seq + 1) * w + 2 * w
    blocks = depth * (_block(w) + 6 * w * w + 6 * w)
    return emb + blocks + (2 * w * w + 2 * w) + _diffloss(c, w, dd, dw)


def test_official_sizes_on_meta():
    with torch.device("meta"):
        counts = {name: MAR_models[name]().num_params() for name in ("mar_base", "mar_large", "mar_huge")}
        ablation = MAR_models["mar_base"](diffloss_d=3).num_params()
        ar = {name: ARDiff_models[name]().num_params() for name in ("randomar_base", "rasterar_large",
                                                                    "randomar_xl", "rasterar_huge")}
    assert counts["mar_base"] == _mar_count(768, 12, 6, 1024) == 207_924_768  # README: 208M
    assert counts["mar_large"] == _mar_count(1024, 16, 8, 1280) == 478_326_304  # README: 479M
    assert counts["mar_huge"] == _mar_count(1280, 20, 12, 1536)  # MAR paper: 943M
    assert abs(counts["mar_base"] / 1e6 - 208) < 0.5 and abs(counts["mar_large"] / 1e6 - 479) < 1
    assert abs(counts["mar_huge"] / 1e6 - 943) < 1
    assert ablation == _mar_count(768, 12, 3, 1024)
    assert ar["randomar_base"] == _ardiff_count(768, 12)
    assert ar["rasterar_large"] == _ardiff_count(1024, 24)
    assert ar["randomar_xl"] == _ardiff_count(1152, 28)
    assert ar["rasterar_huge"] == _ardiff_count(1280, 32)


# ---------------------------------------------------------------------------------------------
# Official checkpoint layout
# ---------------------------------------------------------------------------------------------
TINY = dict(latent_shape=SHAPE, num_classes=10, buffer_size=4, encoder_embed_dim=32, encoder_depth=2,
            encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
            diffloss_d=2, diffloss_w=24)


def _official_state(seed=0, w=32, depth=2, c=16, seq=L, buf=4, classes=10, dd=2, dw=24):
    """The key names and shapes of LTH14/mar's MAR (timm blocks) + DiffLoss, written out by hand."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"class_emb.weight": (classes, w), "fake_latent": (1, w), "z_proj.weight": (w, c), "z_proj.bias": (w,),
              "z_proj_ln.weight": (w,), "z_proj_ln.bias": (w,), "encoder_pos_embed_learned": (1, seq + buf, w),
              "encoder_norm.weight": (w,), "encoder_norm.bias": (w,), "decoder_embed.weight": (w, w),
              "decoder_embed.bias": (w,), "mask_token": (1, 1, w), "decoder_pos_embed_learned": (1, seq + buf, w),
              "decoder_norm.weight": (w,), "decoder_norm.bias": (w,), "diffusion_pos_embed_learned": (1, seq, w)}
    for part in ("encoder_blocks", "decoder_blocks"):
        for i in range(depth):
            p = f"{part}.{i}."
            shapes.update({p + "norm1.weight": (w,), p + "norm1.bias": (w,), p + "attn.qkv.weight": (3 * w, w),
                           p + "attn.qkv.bias": (3 * w,), p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
                           p + "norm2.weight": (w,), p + "norm2.bias": (w,), p + "mlp.fc1.weight": (4 * w, w),
                           p + "mlp.fc1.bias": (4 * w,), p + "mlp.fc2.weight": (w, 4 * w), p + "mlp.fc2.bias": (w,)})
    n = "diffloss.net."
    shapes.update({n + "time_embed.mlp.0.weight": (dw, 256), n + "time_embed.mlp.0.bias": (dw,),
                   n + "time_embed.mlp.2.weight": (dw, dw), n + "time_embed.mlp.2.bias": (dw,),
                   n + "cond_embed.weight": (dw, w), n + "cond_embed.bias": (dw,),
                   n + "input_proj.weight": (dw, c), n + "input_proj.bias": (dw,),
                   n + "final_layer.linear.weight": (2 * c, dw), n + "final_layer.linear.bias": (2 * c,),
                   n + "final_layer.adaLN_modulation.1.weight": (2 * dw, dw),
                   n + "final_layer.adaLN_modulation.1.bias": (2 * dw,)})
    for i in range(dd):
        p = f"{n}res_blocks.{i}."
        shapes.update({p + "in_ln.weight": (dw,), p + "in_ln.bias": (dw,), p + "mlp.0.weight": (dw, dw),
                       p + "mlp.0.bias": (dw,), p + "mlp.2.weight": (dw, dw), p + "mlp.2.bias": (dw,),
                       p + "adaLN_modulation.1.weight": (3 * dw, dw), p + "adaLN_modulation.1.bias": (3 * dw,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_load_official_mar_strict(tmp_path):
    raw, ema = _official_state(0), _official_state(1)
    path = tmp_path / "mar_tiny_official.pth"
    torch.save({"model": raw, "model_ema": ema, "epoch": 799}, path)
    model = load_official_mar(path, model="mar_base", **TINY)
    assert not model.training
    sd = model.state_dict()
    assert set(sd) == set(ema) and all(torch.equal(sd[k], ema[k]) for k in ema)
    model = load_official_mar(path, model="mar_base", ema=False, **TINY)
    assert torch.equal(model.state_dict()["encoder_blocks.1.attn.qkv.weight"], raw["encoder_blocks.1.attn.qkv.weight"])
    out = model.sample(2, labels=torch.tensor([3, 4]), guidance_scale=2.0, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, *SHAPE)

    # EMA stored as a list in parameter order (SimpleEMAModel's legacy format)
    names = [k for k, _ in model.named_parameters()]
    torch.save({"model": raw, "model_ema": [ema[k] for k in names]}, path)
    assert torch.equal(load_official_mar(path, model="mar_base", **TINY).fake_latent, ema["fake_latent"])

    bad = dict(ema)
    bad["encoder_blocks.0.attn.qkv_typo.weight"] = bad.pop("encoder_blocks.0.attn.qkv.weight")
    bad["decoder_pos_embed_learned"] = torch.zeros(1, 99, 32)
    torch.save({"model": raw, "model_ema": bad}, path)
    with pytest.raises(RuntimeError) as info:
        load_official_mar(path, model="mar_base", **TINY)
    msg = str(info.value)
    assert "encoder_blocks.0.attn.qkv_typo.weight" in msg and "encoder_blocks.0.attn.qkv.weight" in msg
    assert "decoder_pos_embed_learned" in msg and "(1, 99, 32)" in msg

    with pytest.raises(FileNotFoundError, match="jjiaweiyang/l-DeTok"):
        load_official_mar(tmp_path / "mar_base.pth")

"""DiT, SiT and LightningDiT: training signal, sampling, CFG semantics, adaLN-Zero init, sizes.

Tiny models on 16x4x4 latents with two classes, seeded; official sizes are built on the meta device
and their parameter counts checked against counts derived by hand here (not by the model code).
"""

from __future__ import annotations

import pytest
import torch

from ldetok.generators.base import patchify, unpatchify
from ldetok.generators.dit import DiT, DiT_models, cfg_combine
from ldetok.generators.flow import time_shift
from ldetok.generators.lightningdit import LightningDiT, LightningDiT_models, rope_2d_tables
from ldetok.generators.sit import SiT, SiT_models

LATENT = (16, 4, 4)
TINY = {"dit": DiT_models["dit_tiny"], "sit": SiT_models["sit_tiny"], "lightningdit": LightningDiT_models["lightningdit_tiny"]}
KINDS = list(TINY)
STEPS = {"dit": dict(steps=8), "sit": dict(steps=8, method="euler"), "lightningdit": dict(steps=8)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core box OpenMP's barrier
    waits make a 2-thread step up to ~100x slower than a 1-thread one; restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(kind: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return TINY[kind](**{"latent_shape": LATENT, "num_classes": 2, **kw})


def perturbed(kind: str, **kw):
    """A tiny model off its adaLN-Zero init (so labels, gates and outputs all matter), in eval mode."""
    m = tiny(kind, **kw)
    gen = g(123)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m.eval()


def toy_data(n: int = 32):
    """Two classes with opposite mean patterns plus a little noise."""
    gen = g(7)
    pattern = torch.randn(LATENT, generator=gen)
    labels = torch.arange(n) % 2
    x = torch.where(labels.view(-1, 1, 1, 1) == 0, pattern, -pattern) + 0.1 * torch.randn(n, *LATENT, generator=gen)
    return x, labels


# ---------------------------------------------------------------------------------------------
# Training signal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loss_finite_and_decreases(kind):
    m = tiny(kind)
    x, y = toy_data()
    xe, ye = x.repeat(4, 1, 1, 1), y.repeat(4)  # a fixed, larger evaluation draw

    def eval_loss():
        m.eval()
        with torch.no_grad():
            val = m.loss(xe, ye, generator=g(999)).item()
        m.train()
        return val

    before = eval_loss()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for step in range(40):
        loss = m(x, y, generator=g(step))  # forward is the loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_loss_seeded_and_label_dropout():
    m = tiny("sit")
    x, y = toy_data(8)
    assert torch.equal(m.loss(x, y, generator=g(1)), m.loss(x, y, generator=g(1)))
    assert not torch.equal(m.loss(x, y, generator=g(1)), m.loss(x, y, generator=g(2)))
    m.train()
    dropped = m.prepare_labels(torch.zeros(4000, dtype=torch.long), 4000, "cpu", generator=g(0))
    assert abs((dropped == m.null_class).float().mean().item() - 0.1) < 0.02


def test_lightningdit_loss_is_mse_by_default_and_cosine_is_an_option():
    """The default matches the official code path (MSE only); use_cosine_loss=True adds (1 - cos)."""
    default = perturbed("lightningdit")
    x, y = toy_data(8)
    d = default.loss_terms(x, y, generator=g(3))
    assert not default.use_cosine_loss and torch.equal(d["loss"], d["mse"]) and (d["cos"] > 0).all()
    m = perturbed("lightningdit", use_cosine_loss=True)
    plain = tiny("lightningdit", use_cosine_loss=False).eval()
    plain.load_state_dict(m.state_dict())
    terms = m.loss_terms(x, y, generator=g(3))
    assert torch.allclose(terms["loss"], terms["mse"] + terms["cos"])
    assert (terms["cos"] > 0).all()
    with_cos, mse_only = m.loss(x, y, generator=g(3)), plain.loss(x, y, generator=g(3))
    assert torch.allclose(mse_only, terms["mse"].mean())
    assert torch.allclose(with_cos - mse_only, terms["cos"].mean())
    # SiT keeps plain MSE
    s = perturbed("sit")
    st = s.loss_terms(x, y, generator=g(3))
    assert torch.equal(st["loss"], st["mse"])


@pytest.mark.parametrize("kind", ["dit", "lightningdit"])
def test_grad_checkpointing_matches(kind):
    a = perturbed(kind).train()
    b = perturbed(kind, grad_checkpointing=True).train()
    x, y = toy_data(4)
    la, lb = a.loss(x, y, generator=g(5)), b.loss(x, y, generator=g(5))
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


# ---------------------------------------------------------------------------------------------
# Sampling and CFG
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sample_shapes_and_determinism(kind):
    m = perturbed(kind)
    a = m.sample(4, labels=None, guidance_scale=1.0, generator=g(0), **STEPS[kind])
    b = m.sample(4, labels=torch.tensor([1, 0, 1, 1]), guidance_scale=2.0, generator=g(0), **STEPS[kind])
    c = m.sample(4, labels=1, guidance_scale=1.0, generator=g(0), **STEPS[kind])
    for s in (a, b, c):
        assert s.shape == (4, *LATENT) and torch.isfinite(s).all()
    assert torch.equal(a, m.sample(4, labels=None, guidance_scale=1.0, generator=g(0), **STEPS[kind]))
    with pytest.raises(ValueError):
        m.sample(4, guidance_scale=0.5, generator=g(0), **STEPS[kind])
    with pytest.raises(ValueError):
        m.sample(4, labels=torch.tensor([0, 1]), generator=g(0), **STEPS[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_one_is_conditional_sampler_and_cfg_above_one_differs(kind):
    m = perturbed(kind)
    labels = torch.tensor([0, 1, 1, 0])
    assert m.guided_fn(1.0) == m.predict  # no doubled batch at cfg == 1
    kw = dict(STEPS[kind])
    steps = kw.pop("steps")
    cond_only = m.run_sampler(m.predict, 4, labels, steps=steps, generator=g(4), **kw)
    at_one = m.sample(4, labels=labels, guidance_scale=1.0, steps=steps, generator=g(4), **kw)
    assert torch.equal(at_one, cond_only)
    guided = m.sample(4, labels=labels, guidance_scale=3.0, steps=steps, generator=g(4), **kw)
    assert (guided - at_one).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_guided_fn_combines_all_channels(kind):
    m = perturbed(kind)
    x, y = toy_data(4)
    t = torch.full((4,), 500) if kind == "dit" else torch.full((4,), 0.5)
    with torch.no_grad():
        cond = m.predict(x, t, y)
        uncond = m.predict(x, t, torch.full_like(y, m.null_class))
        out = m.guided_fn(2.5)(x, t, y)
    c = LATENT[0]
    assert out.shape == cond.shape
    assert torch.allclose(out[:, :c], uncond[:, :c] + 2.5 * (cond[:, :c] - uncond[:, :c]), atol=1e-5)
    assert torch.allclose(out[:, c:], cond[:, c:], atol=1e-5)  # DiT: learned sigma from the conditional branch


def test_dit_legacy_first3_channels():
    m = perturbed("dit")
    x, y = toy_data(4)
    t = torch.full((4,), 300)
    with torch.no_grad():
        cond = m.predict(x, t, y)
        uncond = m.predict(x, t, torch.full_like(y, m.null_class))
        out = m.guided_fn(4.0, channels=3)(x, t, y)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-5)
    first3 = m.sample(2, labels=0, guidance_scale=4.0, steps=4, generator=g(0), cfg_channels="first3")
    all_ch = m.sample(2, labels=0, guidance_scale=4.0, steps=4, generator=g(0))
    assert not torch.allclose(first3, all_ch)
    with pytest.raises(ValueError):
        m.sample(2, guidance_scale=2.0, steps=4, cfg_channels="first4")
    assert torch.allclose(cfg_combine(cond, uncond, 1.0, 16), cond, atol=1e-6)


def test_sit_samplers():
    m = perturbed("sit")
    calls = []
    predict = m.predict

    def counted(x, t, y):
        calls.append(x.shape[0])
        return predict(x, t, y)

    m.predict = counted
    try:
        default = m.sample(2, labels=0, generator=g(0))  # dopri5, atol 1e-6, rtol 1e-3
        nfe_default = len(calls)
        euler = m.sample(2, labels=0, generator=g(0), method="euler", steps=200)
        heun = m.sample(2, labels=0, generator=g(0), method="heun", steps=50)
        sde = m.sample(2, labels=0, generator=g(0), sampler="sde", steps=10)
    finally:
        del m.predict
    assert nfe_default >= 8  # adaptive dopri5: start-up evaluations + 6 per accepted/rejected step
    assert (default - euler).abs().max() < 0.05  # the same ODE, solved two ways
    assert (default - heun).abs().max() < 0.01
    assert sde.shape == default.shape and torch.isfinite(sde).all()
    with pytest.raises(ValueError):
        m.sample(2, sampler="ddim")


def test_lightningdit_cfg_interval_only_at_t_above_010():
    m = perturbed("lightningdit")
    n, steps = 3, 20
    seen = []
    predict = m.predict

    def recorder(x, t, y):
        seen.append((x.shape[0], t.clone()))
        return predict(x, t, y)

    m.predict = recorder
    try:
        out = m.sample(n, labels=1, guidance_scale=2.0, steps=steps, generator=g(0))
    finally:
        del m.predict
    assert out.shape == (n, *LATENT)
    grid = time_shift(torch.linspace(0, 1, steps + 1, dtype=torch.float64), 0.3)[:-1].float()
    assert len(seen) == steps
    guided_times, plain_times = [], []
    for (bs, t), t_grid in zip(seen, grid):
        assert torch.allclose(t, torch.full_like(t, float(t_grid)))  # Euler on the shifted grid
        (guided_times if bs == 2 * n else plain_times).append(float(t[0]))
        assert bs in (n, 2 * n)
    assert plain_times and guided_times
    assert max(plain_times) < 0.10 <= min(guided_times)  # conditional-only at the noise end (t = 0)
    assert len(plain_times) == int((grid < 0.10).sum())

    # per sample: a batch straddling the boundary uses the conditional prediction below it
    x, y = toy_data(2)
    t = torch.tensor([0.05, 0.5])
    with torch.no_grad():
        out = m.guided_fn(2.0, interval_start=0.10)(x, t, y)
        cond = m.predict(x, t, y)
        full = m.guided_fn(2.0)(x, t, y)
    assert torch.allclose(out[0], cond[0], atol=1e-5) and torch.allclose(out[1], full[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_adaln_zero_init_is_identity_and_zero_output(kind):
    m = tiny(kind).eval()
    x, y = toy_data(4)
    t = torch.tensor([0, 10, 500, 999]) if kind == "dit" else torch.tensor([0.0, 0.2, 0.6, 1.0])
    with torch.no_grad():
        tokens, c = m.embed(x, t, y)
        assert torch.equal(m.run_blocks(tokens, c), tokens)
        out = m.predict(x, t, y)
    assert out.shape == (4, LATENT[0] * (2 if kind == "dit" else 1), *LATENT[1:])
    assert torch.equal(out, torch.zeros_like(out))


def test_patchify_round_trip_and_patch_embed_layout():
    x = torch.randn(2, *LATENT, generator=g(0))
    tok = patchify(x, 2)
    assert tok.shape == (2, 4, 2 * 2 * 16)
    assert torch.equal(unpatchify(tok, 2, 16, 4, 4), x)
    assert torch.equal(tok[0, 1, :16], x[0, :, 0, 2])  # token (0, 1), first pixel: all channels
    m = perturbed("dit", patch_size=2)
    assert m.grid == (2, 2) and m.pos_embed.shape == (1, 4, m.hidden_size)
    assert torch.equal(m.unpatchify(m.patchify(x), channels=16), x)
    # the conv patch embedding is a Linear on the (c, p, q)-ordered patch
    w = m.x_embedder.proj.weight
    tok_cpq = x.reshape(2, 16, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, -1)
    with torch.no_grad():
        assert torch.allclose(m.x_embedder(x), tok_cpq @ w.reshape(w.shape[0], -1).T + m.x_embedder.proj.bias, atol=1e-5)
        out = m.predict(x, torch.full((2,), 10), torch.tensor([0, 1]))
    assert out.shape == (2, 32, 4, 4)
    assert m.sample(2, steps=3, generator=g(0)).shape == (2, *LATENT)
    with pytest.raises(ValueError):
        tiny("sit", patch_size=3)


def test_rope_layout_and_relative_property():
    cos, sin = rope_2d_tables(32, 4, 4)
    assert cos.shape == (16, 32)
    # adjacent pairs share an angle; first half follows the row, second half the column
    assert torch.equal(cos[:, 0::2], cos[:, 1::2])
    assert torch.allclose(cos[5, :16], cos[6, :16]) and not torch.allclose(cos[5, 16:], cos[6, 16:])
    assert torch.allclose(cos[5, 16:], cos[9, 16:]) and not torch.allclose(cos[5, :16], cos[9, :16])
    # q.k after RoPE depends only on the offset between positions
    from ldetok.layers import apply_rope

    q, k = torch.randn(32, generator=g(1)), torch.randn(32, generator=g(2))

    def dot(i, j):
        return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum()

    assert torch.allclose(dot(0, 5), dot(10, 15), atol=1e-5)  # both (+1 row, +1 col)
    m = tiny("lightningdit")
    assert m.pos_embed.requires_grad and not tiny("sit").pos_embed.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip_and_unconditional(kind):
    m = perturbed(kind, qk_norm=True)
    conf = m.config_dict()
    assert m.kind == kind and conf["qk_norm"] is True
    m2 = type(m)(**conf).eval()
    m2.load_state_dict(m.state_dict())
    x, y = toy_data(2)
    t = torch.full((2,), 0.3) if kind != "dit" else torch.full((2,), 300)
    with torch.no_grad():
        assert torch.equal(m.predict(x, t, y), m2.predict(x, t, y))
    u = tiny(kind, num_classes=0)
    assert torch.isfinite(u.loss(x, None, generator=g(0)))
    assert u.sample(2, generator=g(0), **STEPS[kind]).shape == (2, *LATENT)
    with pytest.raises(ValueError):
        m.loss(torch.randn(2, 16, 8, 8), y)


# ---------------------------------------------------------------------------------------------
# Official sizes: parameter counts derived by hand
# ---------------------------------------------------------------------------------------------
def hand_count(family: str, d: int, depth: int, heads: int, c: int = 16, hw: int = 16, p: int = 1,
               classes: int = 1000, qk_norm: bool = False) -> int:
    out = c * (2 if family == "dit" else 1)
    tokens = (hw // p) ** 2
    embed = c * p * p * d + d  # patch conv
    t_emb = 256 * d + d + d * d + d  # freq 256 -> d -> d
    y_emb = (classes + 1) * d  # + the null class
    pos = tokens * d  # frozen for DiT/SiT, learned for LightningDiT; counted either way
    attn = 3 * d * d + 3 * d + d * d + d
    ada = 6 * d * d + 6 * d
    if family == "lightningdit":
        hidden = int(2 / 3 * (4 * d))
        mlp = d * 2 * hidden + 2 * hidden + hidden * d + d
        norms = 2 * d  # RMSNorm scales
        qk = 2 * (d // heads) if qk_norm else 0  # RMSNorm(head_dim) on q and k
        final_norm = d
    else:
        mlp = d * 4 * d + 4 * d + 4 * d * d + d
        norms = 0  # LayerNorm without affine
        qk = 4 * (d // heads) if qk_norm else 0  # affine LayerNorm(head_dim) on q and k
        final_norm = 0
    block = attn + mlp + ada + norms + qk
    final = final_norm + d * p * p * out + p * p * out + 2 * d * d + 2 * d
    return embed + t_emb + y_emb + pos + depth * block + final


OFFICIAL = [
    ("dit", DiT_models, "base", 768, 12, 12), ("dit", DiT_models, "large", 1024, 24, 16),
    ("dit", DiT_models, "xl", 1152, 28, 16), ("dit", DiT_models, "huge", 1280, 32, 16),
    ("sit", SiT_models, "small", 512, 8, 8), ("sit", SiT_models, "base", 768, 12, 12),
    ("sit", SiT_models, "large", 1024, 24, 16), ("sit", SiT_models, "xl", 1152, 28, 16),
    ("lightningdit", LightningDiT_models, "base", 768, 12, 12),
    ("lightningdit", LightningDiT_models, "large", 1024, 24, 16),
    ("lightningdit", LightningDiT_models, "xl", 1152, 28, 16),
    ("lightningdit", LightningDiT_models, "huge", 1280, 32, 16),
]


@pytest.mark.parametrize("family,registry,size,d,depth,heads", OFFICIAL, ids=[f"{o[0]}_{o[2]}" for o in OFFICIAL])
def test_official_sizes_on_meta(family, registry, size, d, depth, heads):
    with torch.device("meta"):
        m = registry[f"{family}_{size}"]()
        q = registry[f"{family}_{size}"](qk_norm=True, patch_size=2)
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.latent_shape) == (d, depth, heads, 1, (16, 16, 16))
    assert m.num_params() == hand_count(family, d, depth, heads)
    assert q.num_params() == hand_count(family, d, depth, heads, p=2, qk_norm=True)


def test_dit_xl_matches_published_count():
    # DiT-XL/2 on 4-channel SD-VAE latents has 675,129,632 parameters (the "675M" of the DiT paper).
    # With 16-channel latents and patch 1 the patch (p*p*C = 16) and output (p*p*2C = 32) widths are
    # the same as DiT-XL/2's, and 16x16 tokens match 32x32/2, so the count is identical.
    with torch.device("meta"):
        assert DiT_models["dit_xl"]().num_params() == 675_129_632
        assert DiT_models["dit_xl"](latent_shape=(4, 32, 32), patch_size=2).num_params() == 675_129_632


def test_registry_and_kinds():
    assert set(DiT_models) == {"dit_tiny", "dit_base", "dit_large", "dit_xl", "dit_huge"}
    assert set(SiT_models) == {"sit_tiny", "sit_small", "sit_base", "sit_large", "sit_xl"}
    assert set(LightningDiT_models) == {f"lightningdit_{s}" for s in ("tiny", "base", "large", "xl", "huge")}
    assert (DiT.kind, SiT.kind, LightningDiT.kind) == ("dit", "sit", "lightningdit")
    m = DiT_models["dit_tiny"]()
    assert m.latent_shape == (16, 4, 4) and m.num_classes == 10 and (m.hidden_size, m.depth, m.num_heads) == (128, 4, 4)

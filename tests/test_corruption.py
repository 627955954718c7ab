"""Statistics and exactness of the latent corruption functions."""

import json
import math

import pytest
import torch

from ldetok import corruption as C


def test_interpolative_at_t1_is_pure_noise_with_std_gamma(gen):
    z = torch.full((64, 16, 8, 8), 5.0)
    out = C.interpolative_noise(z, torch.ones(64), gamma=3.0, generator=gen)
    assert abs(out.mean().item()) < 0.05
    assert out.std().item() == pytest.approx(3.0, rel=0.02)


def test_interpolative_at_t0_is_identity_and_formula_exact(gen):
    z = torch.randn(4, 10, 3, generator=gen)
    assert torch.equal(C.interpolative_noise(z, torch.zeros(4), 3.0, gen), z)
    eps = torch.randn(4, 10, 3, generator=gen)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    out = C.interpolative_noise(z, t, 2.5, noise=eps)
    ref = (1 - t.view(-1, 1, 1)) * z + t.view(-1, 1, 1) * 2.5 * eps
    assert torch.allclose(out, ref)


def test_additive_noise_formula_and_std(gen):
    z = torch.zeros(50, 32, 16)
    out = C.additive_noise(z, torch.full((50,), 0.5), 3.0, gen)
    assert out.std().item() == pytest.approx(1.5, rel=0.03)
    z = torch.randn(3, 5, generator=gen)
    eps = torch.randn(3, 5, generator=gen)
    t = torch.tensor([0.2, 0.5, 1.0])
    assert torch.allclose(C.additive_noise(z, t, 3.0, noise=eps), z + t[:, None] * 3.0 * eps)


def test_noise_is_per_sample(gen):
    z = torch.zeros(2, 100)
    out = C.interpolative_noise(z, torch.tensor([0.0, 1.0]), 1.0, gen)
    assert out[0].abs().max() == 0 and out[1].std() > 0.5


def test_noise_generator_reproducible():
    z = torch.randn(4, 8)
    a = C.interpolative_noise(z, 0.5, 3.0, torch.Generator().manual_seed(1))
    b = C.interpolative_noise(z, 0.5, 3.0, torch.Generator().manual_seed(1))
    c = C.interpolative_noise(z, 0.5, 3.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_level_distributions(gen):
    u = C.sample_noise_level(200_000, "uniform", generator=gen)
    assert u.shape == (200_000,) and 0 <= u.min() and u.max() <= 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    ln = C.sample_noise_level(200_000, "logit_normal", mean=0.8, std=1.0, generator=gen)
    logit = torch.log(ln / (1 - ln))
    assert logit.mean().item() == pytest.approx(0.8, abs=0.01)
    assert logit.std().item() == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="unknown noise-level distribution"):
        C.sample_noise_level(3, "beta")


def test_mask_ratio_distribution_per_batch_and_per_sample(gen):
    draws = torch.tensor([C.sample_mask_ratio(0.7, generator=gen) for _ in range(20_000)])
    # P(ratio == 0) = 0.1 / 0.8; nonzero part uniform on (0, 0.7]
    assert (draws == 0).float().mean().item() == pytest.approx(0.125, abs=0.01)
    nz = draws[draws > 0]
    assert nz.max() <= 0.7 and nz.mean().item() == pytest.approx(0.35, abs=0.01)
    per = C.sample_mask_ratio(0.7, generator=gen, n=50_000)
    assert per.shape == (50_000,)
    assert (per == 0).float().mean().item() == pytest.approx(0.125, abs=0.01)
    with pytest.raises(ValueError):
        C.sample_mask_ratio(1.0)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 0.9])
def test_random_masking_counts_and_restore(gen, ratio):
    x = torch.randn(5, 16, 4, generator=gen)
    kept, mask, ids_restore = C.random_masking(x, ratio, gen)
    k = math.ceil(16 * (1 - ratio))
    assert kept.shape == (5, k, 4)
    assert torch.all(mask.sum(1) == 16 - k)
    # restore indices invert the shuffle: put kept tokens back, fill the rest, compare with x
    fill = torch.zeros(5, 16 - k, 4)
    restored = torch.gather(torch.cat([kept, fill], 1), 1, ids_restore[..., None].expand(-1, -1, 4))
    visible = (mask == 0)[..., None]
    assert torch.equal(torch.where(visible, restored, 0), torch.where(visible, x, 0))
    ids_keep = C.kept_indices(ids_restore, k)
    assert torch.equal(torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 4)), kept)
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)


def test_random_masking_per_sample_ratios(gen):
    x = torch.randn(3, 20, 2, generator=gen)
    ratios = torch.tensor([0.0, 0.5, 0.9])
    kept, mask, ids_restore = C.random_masking(x, ratios, gen)
    assert kept.shape[1] == 20  # the largest keep count in the batch
    assert mask.sum(1).tolist() == [0, 10, 18]


def test_random_masking_rejects_bad_input():
    with pytest.raises(ValueError):
        C.random_masking(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError):
        C.random_masking(torch.zeros(2, 3, 1), 1.0)


# ---------------------------------------------------------------------------------------------
# CorruptionConfig
# ---------------------------------------------------------------------------------------------
def test_config_defaults_are_the_paper_recipe_and_off_is_off():
    cfg = C.CorruptionConfig().validate()
    assert (cfg.noise_type, cfg.gamma, cfg.noise_dist, cfg.max_mask_ratio, cfg.mask_low, cfg.mask_mode) == (
        "interpolative", 3.0, "uniform", 0.7, -0.1, "batch")
    assert cfg.noise_on and cfg.masking_on
    off = C.CorruptionConfig.off().validate()
    assert not off.noise_on and not off.masking_on
    assert off.describe() == "no noise; no masking"
    assert cfg.describe() == "γ=3 interpolative, t~uniform; mask ≤ 0.7 (batch)"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"gamma": -1.0}, "gamma"),
        ({"noise_type": "mult"}, "noise_type"),
        ({"noise_dist": "beta"}, "noise_dist"),
        ({"noise_dist": "logit_normal", "noise_std": 0.0}, "noise_std"),
        ({"mask_mode": "token"}, "mask_mode"),
        ({"max_mask_ratio": 1.0}, "max_mask_ratio"),
        ({"max_mask_ratio": 0.5, "mask_low": 0.6}, "mask_low"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        C.CorruptionConfig(**bad).validate()
    with pytest.raises(ValueError, match=match):
        C.CorruptionConfig.from_dict(bad)


def test_config_validation_lists_every_error():
    with pytest.raises(ValueError) as e:
        C.CorruptionConfig(gamma=-1.0, noise_type="mult", mask_mode="token").validate()
    assert all(k in str(e.value) for k in ("gamma", "noise_type", "mask_mode"))


def test_config_round_trip_and_unknown_keys():
    cfg = C.CorruptionConfig(noise_type="additive", gamma=1.5, noise_dist="logit_normal", noise_mean=0.8,
                             noise_std=0.5, max_mask_ratio=0.4, mask_low=0.0, mask_mode="sample")
    d = cfg.to_dict()
    assert d == {"noise_type": "additive", "gamma": 1.5, "noise_dist": "logit_normal", "noise_mean": 0.8,
                 "noise_std": 0.5, "max_mask_ratio": 0.4, "mask_low": 0.0, "mask_mode": "sample"}
    assert C.CorruptionConfig.from_dict(d) == cfg
    assert C.CorruptionConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert C.CorruptionConfig.from_dict({}) == C.CorruptionConfig()  # missing keys take the defaults
    assert C.CorruptionConfig.from_dict({"gamma": 0.0}) == C.CorruptionConfig(gamma=0.0)
    with pytest.raises(ValueError, match="unknown corruption settings: colour"):
        C.CorruptionConfig.from_dict({**d, "colour": 3})
    assert cfg.with_(gamma=0.0) == C.CorruptionConfig(**{**d, "gamma": 0.0})
    with pytest.raises(ValueError, match="gamma"):
        cfg.with_(gamma=-2.0)


# ---------------------------------------------------------------------------------------------
# Drawing the corruption
# ---------------------------------------------------------------------------------------------
def test_constant_mask_ratio_when_low_equals_max():
    cfg = C.CorruptionConfig(max_mask_ratio=0.6, mask_low=0.6)
    g = torch.Generator().manual_seed(0)
    assert {C.draw_corruption(cfg, 4, g).mask_ratio for _ in range(50)} == {0.6}
    per = C.draw_corruption(cfg.with_(mask_mode="sample"), 64, g).mask_ratio
    torch.testing.assert_close(per, torch.full((64,), 0.6))


def test_mask_ratio_per_batch_and_per_sample():
    batch = C.CorruptionConfig(max_mask_ratio=0.7)
    sample = batch.with_(mask_mode="sample")
    g = torch.Generator().manual_seed(1)
    b = C.draw_corruption(batch, 8, g)
    assert isinstance(b.mask_ratio, float) and 0.0 <= b.mask_ratio <= 0.7
    s = C.draw_corruption(sample, 8, g)
    assert isinstance(s.mask_ratio, torch.Tensor) and s.mask_ratio.shape == (8,)
    assert len(set(s.mask_ratio.tolist())) > 1 and ((s.mask_ratio >= 0) & (s.mask_ratio <= 0.7)).all()
    # per-sample draws are the same numbers sample_mask_ratio gives with n
    ref = C.sample_mask_ratio(0.7, -0.1, torch.Generator().manual_seed(2), n=8)
    torch.testing.assert_close(C.draw_corruption(sample, 8, torch.Generator().manual_seed(2)).mask_ratio, ref)
    # a per-sample draw that is zero everywhere becomes the float 0 (no masking at all)
    zero = C.CorruptionConfig(max_mask_ratio=0.1, mask_low=-100.0, mask_mode="sample")
    assert C.draw_corruption(zero, 2, torch.Generator().manual_seed(0)).mask_ratio == 0.0


@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("dist", ["uniform", "logit_normal"])
def test_draw_order_ratio_then_noise_level(mode, dist):
    cfg = C.CorruptionConfig(noise_dist=dist, noise_mean=0.8, max_mask_ratio=0.7, mask_mode=mode)
    d = C.draw_corruption(cfg, 5, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    ratio = C.sample_mask_ratio(0.7, -0.1, g, n=None if mode == "batch" else 5)
    t = C.sample_noise_level(5, dist, 0.8, 1.0, g)
    if mode == "batch":
        assert d.mask_ratio == ratio
    else:
        assert torch.equal(d.mask_ratio, ratio)
    assert torch.equal(d.noise_level, t)


def test_draws_skip_what_is_off():
    g = torch.Generator().manual_seed(4)
    d = C.draw_corruption(C.CorruptionConfig.off(), 3, g)
    assert d.mask_ratio == 0.0 and d.noise_level is None
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(4).get_state())  # nothing consumed
    # noise only: t is the first draw
    d = C.draw_corruption(C.CorruptionConfig(max_mask_ratio=0.0), 3, torch.Generator().manual_seed(4))
    assert d.mask_ratio == 0.0
    assert torch.equal(d.noise_level, torch.rand(3, generator=torch.Generator().manual_seed(4)))


def test_mask_tokens_matches_random_masking():
    g = torch.Generator().manual_seed(6)
    m = C.mask_tokens(3, 16, 0.5, g)
    _, mask, ids_restore = C.random_masking(torch.zeros(3, 16, 1), 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(m.mask, mask) and m.valid is None
    assert torch.equal(m.ids_keep, C.kept_indices(ids_restore, 8))
    per = C.mask_tokens(2, 16, torch.tensor([0.25, 0.75]), g)
    assert per.ids_keep.shape == (2, 12) and per.valid.sum(1).tolist() == [12, 4]
    assert torch.all(torch.gather(per.mask, 1, per.ids_keep)[per.valid] == 0)


# ---------------------------------------------------------------------------------------------
# The denoising pass
# ---------------------------------------------------------------------------------------------
def _tiny_detok():
    from ldetok.tokenizers import DeTok

    torch.manual_seed(0)
    return DeTok(image_size=16, patch_size=4, latent_channels=6, enc_width=32, enc_depth=1, enc_heads=2,
                 dec_width=32, dec_depth=1, dec_heads=2)


def test_off_is_the_clean_decode_of_a_posterior_sample():
    tok = _tiny_detok()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = C.denoising_forward(tok, x, C.CorruptionConfig.off(), torch.Generator().manual_seed(2))
    assert out.mask is None and out.noise_level is None and out.mask_ratio is None
    # a posterior sample drawn in the tokenizer's working layout (tokens, (B, L, C)), then clean decode
    post = tok.posterior(x)
    mean, std = tok.nchw_to_visible(post.mean), tok.nchw_to_visible(post.std)
    z = tok.visible_to_nchw(mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(out.latents, z)
    torch.testing.assert_close(out.recon, tok.decode(z), rtol=1e-4, atol=1e-5)
    # no config at all is the same as off
    again = C.denoising_forward(tok, x, None, torch.Generator().manual_seed(2))
    assert torch.equal(again.recon, out.recon)


def test_draw_overrides_the_config_and_noise_can_be_fixed():
    tok = _tiny_detok()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = C.CorruptionConfig(gamma=2.0)
    eps = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(3))  # working layout (B, L, C)
    t = torch.tensor([0.2, 0.9])
    out = C.denoising_forward(tok, x, cfg, draw=C.CorruptionDraw(0.0, t), sample=False, noise=eps)
    z = tok.nchw_to_visible(tok.encode(x))
    zt = (1 - t.view(-1, 1, 1)) * z + t.view(-1, 1, 1) * 2.0 * eps
    torch.testing.assert_close(out.latents, tok.visible_to_nchw(zt))
    torch.testing.assert_close(out.recon, tok.decode_visible(zt))
    # γ = 0 turns a drawn level off
    off = C.denoising_forward(tok, x, cfg.with_(gamma=0.0), draw=C.CorruptionDraw(0.0, t), sample=False)
    assert off.noise_level is None and torch.equal(off.recon, tok(x))


def test_denoising_pass_module_is_the_function():
    tok = _tiny_detok()
    cfg = C.CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    module = C.DenoisingPass(tok, cfg)
    assert module.tokenizer is tok and module.cfg is cfg
    assert [n for n, _ in module.named_parameters()] == [f"tokenizer.{n}" for n, _ in tok.named_parameters()]
    a = module(x, torch.Generator().manual_seed(5))
    b = C.denoising_forward(tok, x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a.recon, b.recon) and torch.equal(a.latents, b.latents)


def test_a_registered_noise_type_is_accepted_and_used(monkeypatch):
    """A new noise type is one entry in NOISE: the config accepts it and the denoising pass calls it."""
    calls = []

    def scaled(z, t, gamma, generator=None, noise=None):
        calls.append((tuple(z.shape), gamma))
        return z * (1 + t.view(-1, *[1] * (z.ndim - 1)) * gamma)

    monkeypatch.setitem(C.NOISE, "scaled", scaled)
    cfg = C.CorruptionConfig(noise_type="scaled", gamma=2.0, max_mask_ratio=0.0).validate()
    assert C.CorruptionConfig.from_dict(cfg.to_dict()) == cfg
    tok = _tiny_detok()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = C.denoising_forward(tok, x, cfg, draw=C.CorruptionDraw(0.0, torch.tensor([0.5, 0.25])), sample=False)
    assert calls == [((2, 16, 6), 2.0)]
    z = tok.encode(x)
    torch.testing.assert_close(out.latents, z * torch.tensor([2.0, 1.5]).view(-1, 1, 1, 1))
    # and an unregistered one is still refused, by name
    monkeypatch.delitem(C.NOISE, "scaled")
    with pytest.raises(ValueError, match="scaled"):
        cfg.validate()

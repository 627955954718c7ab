"""l-DeTok tokenizer: registry, shapes, the clean forward and the denoising pass through its token view,
official layout and a float64 reference computation of the released architecture, checkpoints."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ldetok import corruption as C
from ldetok import tokenizers as T
from ldetok.corruption import CorruptionConfig, CorruptionDraw, denoising_forward
from ldetok.runs import load_tokenizer, save_tokenizer
from ldetok.tokenizers import DeTok, build

TINY = dict(image_size=16, patch_size=4, latent_channels=6, enc_width=32, enc_depth=2, enc_heads=2,
            dec_width=32, dec_depth=2, dec_heads=2)


def tiny(**kw):
    torch.manual_seed(0)
    return DeTok(**{**TINY, **kw})


@pytest.mark.parametrize("name", ["detok_SS", "detok_SB", "detok_SL", "detok_BS", "detok_BB", "detok_BL",
                                  "detok_LS", "detok_LB", "detok_LL", "detok_XLXL"])
def test_official_sizes_build_on_meta(name):
    with torch.device("meta"):
        tok = build(name)
    assert tok.latent_shape(256) == (16, 16, 16)
    if name == "detok_BB":  # the released model: 171.7M parameters
        assert tok.num_params() == 171_712_628


def fixed(tok, x, ratio=0.0, t=None, generator=None, **cfg):
    """The denoising pass at a fixed draw, through the posterior mean (the figures' and demo's pass)."""
    draw = CorruptionDraw(ratio, None if t is None else torch.full((x.shape[0],), float(t)))
    return denoising_forward(tok, x, CorruptionConfig.off().with_(**cfg), generator, draw=draw, sample=False)


@pytest.mark.parametrize("name", ["detok_MM", "detok_MT", "detok_TT"])
def test_cpu_sizes_forward_backward(name):
    tok = build(name)
    x = torch.randn(3, 3, 32, 32)
    out = denoising_forward(tok, x, CorruptionConfig(), torch.Generator().manual_seed(0))
    assert out.recon.shape == x.shape
    assert out.latents.shape == (3, 16, 4, 4)
    (out.recon.square().mean() + out.posterior.kl().mean()).backward()
    grads = [p.grad for p in tok.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_any_size_patch_and_channels():
    tok = tiny(image_size=24, patch_size=6, in_channels=1, latent_channels=4)
    x = torch.randn(2, 1, 24, 24)
    assert tok.encode(x).shape == (2, 4, 4, 4) and tok.latent_shape(24) == (4, 4, 4)
    assert tok.decode(tok.encode(x)).shape == x.shape
    assert tok.num_tokens == 16
    with pytest.raises(ValueError):
        tok.latent_shape(25)
    with pytest.raises(ValueError):
        DeTok(**{**TINY, "image_size": 18})


def test_corruption_is_no_tokenizer_field():
    for key, value in (("gamma", 3.0), ("max_mask_ratio", 0.7), ("noise_type", "additive")):
        with pytest.raises(TypeError, match=key):
            tiny(**{key: value})


def test_forward_is_clean_and_deterministic_in_any_mode():
    tok = tiny().eval()
    x = torch.randn(4, 3, 16, 16)
    a, b = tok(x), tok(x)
    assert torch.equal(a, b)
    assert torch.equal(a, tok.decode(tok.encode(x)))
    # the denoising pass with nothing drawn (no mask, no noise, posterior mean) is the same reconstruction
    out = fixed(tok, x)
    assert out.mask is None and out.noise_level is None and out.mask_ratio is None
    assert torch.equal(out.recon, a)
    assert torch.equal(out.latents, tok.encode(x))
    # neither forward nor encode corrupts in training mode
    tok.train()
    assert torch.equal(tok(x), a)
    assert torch.equal(tok.encode(x), tok.posterior(x).mean)


def test_training_pass_is_seeded_and_corrupted():
    tok = tiny().train()
    cfg = CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    x = torch.randn(4, 3, 16, 16)
    o1 = denoising_forward(tok, x, cfg, torch.Generator().manual_seed(3))
    o2 = denoising_forward(tok, x, cfg, torch.Generator().manual_seed(3))
    o3 = denoising_forward(tok, x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(o1.recon, o2.recon) and not torch.equal(o1.recon, o3.recon)
    assert o1.noise_level.shape == (4,) and len(set(o1.noise_level.tolist())) == 4


def test_plain_autoencoder_variant_has_no_corruption():
    tok = tiny().train()
    x = torch.randn(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    out = denoising_forward(tok, x, CorruptionConfig.off(), g)
    assert out.mask is None and out.noise_level is None
    # only the posterior sampling (in token layout) differs from the clean pass
    post = T.DiagonalGaussian(tok.encoder(x), dim=-1)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(out.recon, tok.decoder(post.sample(g)), atol=1e-5)


def test_masked_forward_with_empty_mask_equals_unmasked():
    tok = tiny().eval()
    x = torch.randn(3, 3, 16, 16)
    ref = fixed(tok, x, 0.0).recon
    # a per-sample ratio of all zeros keeps every token (a full shuffle, no mask token)
    got = fixed(tok, x, torch.zeros(3), generator=torch.Generator().manual_seed(1))
    assert got.mask is not None and got.mask.sum() == 0
    assert torch.allclose(got.recon, ref, atol=1e-5)


def test_masking_drops_tokens_from_encoder_and_uses_mask_token():
    tok = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    out = fixed(tok, x, 0.5, generator=torch.Generator().manual_seed(0))
    assert out.mask.sum(1).tolist() == [8, 8]
    assert out.mask_ratio.tolist() == [0.5, 0.5]
    masked = out.mask.bool()
    lat = out.latents.flatten(2).transpose(1, 2)
    assert torch.all(lat[masked] == 0)
    # the visible tokens' latents are those of an encoder that only saw the visible tokens
    keep = C.mask_tokens(2, tok.num_tokens, 0.5, torch.Generator().manual_seed(0))
    z = tok.posterior_visible(x, keep).mean
    assert torch.equal(tok.visible_to_nchw(z, keep), out.latents)
    assert torch.equal(tok.decode_visible(z, keep), out.recon)


def test_per_sample_masking_matches_per_sample_batches():
    """Per-sample ratios with attention masking == running each sample alone at its own ratio."""
    tok = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    ratios = torch.tensor([0.25, 0.75])
    out = fixed(tok, x, ratios, generator=torch.Generator().manual_seed(5))
    # rebuild the same shuffle and run sample 1 alone with exactly its kept tokens
    keep = C.mask_tokens(2, tok.num_tokens, ratios, torch.Generator().manual_seed(5), x.device)
    assert torch.equal(keep.mask, out.mask) and keep.valid is not None
    n1 = int((keep.mask[1] == 0).sum())
    ids1 = keep.ids_keep[1:2, :n1]
    z = tok.encoder(x[1:2], ids1)[..., : tok.latent_channels]
    alone = tok.decoder(z, ids1)
    assert torch.allclose(out.recon[1:2], alone, atol=1e-5)


def test_noise_acts_on_the_visible_tokens():
    """Noise at a fixed t on masked tokens: (1 - t) z + t γ ε on the encoder's visible latents, with the
    mask shuffle drawn first, then ε, from one generator."""
    tok = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    out = fixed(tok, x, 0.5, 0.4, torch.Generator().manual_seed(2), gamma=3.0)
    g = torch.Generator().manual_seed(2)
    keep = C.mask_tokens(2, tok.num_tokens, 0.5, g)
    z = tok.posterior_visible(x, keep).mean
    eps = torch.randn(z.shape, generator=g)
    zt = 0.6 * z + 0.4 * 3.0 * eps
    torch.testing.assert_close(out.latents, tok.visible_to_nchw(zt, keep))
    torch.testing.assert_close(out.recon, tok.decode_visible(zt, keep))
    torch.testing.assert_close(out.noise_level, torch.full((2,), 0.4))


def test_normalisation_round_trip_and_stats():
    tok = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    assert not tok.has_stats
    z = tok.encode(x)
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    tok.set_latent_stats(mean, std)
    assert tok.has_stats
    zn = tok.tokenize(x)
    assert torch.allclose(zn.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-5)
    assert torch.allclose(tok.denormalize(zn), z, atol=1e-5)
    assert torch.allclose(tok.detokenize(zn), tok.decode(z).clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError):
        tok.set_latent_stats(torch.zeros(5), torch.ones(5))


def test_save_load_round_trip(tmp_path):
    tok = tiny(mlp_ratio=2.0, latent_channels=6)
    tok.set_latent_stats(torch.arange(6.0), torch.ones(6) * 2)
    save_tokenizer(tok, tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.cfg == tok.cfg and back.has_stats
    for (k, a), (_, b) in zip(tok.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(back.eval().tokenize(x), tok.eval().tokenize(x))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


def test_exports_with_legacy_corruption_keys_still_load(tmp_path):
    """Exports written when the model config held the corruption settings load (those keys are dropped)."""
    tok = tiny()
    d = save_tokenizer(tok, tmp_path / "old")
    meta = json.loads((d / "tokenizer.json").read_text())
    legacy = dict(gamma=1.5, noise_type="additive", noise_dist="logit_normal", noise_mean=0.8, noise_std=1.0,
                  max_mask_ratio=0.5, mask_low=-0.1, mask_mode="sample")
    assert set(legacy) == set(T.LEGACY_CORRUPTION_KEYS)
    meta["config"].update(legacy)
    (d / "tokenizer.json").write_text(json.dumps(meta))
    back = load_tokenizer(d)
    assert back.cfg == tok.cfg
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(back(x), tok.eval()(x))
    with pytest.raises(TypeError):  # any other unknown key is still refused
        T.build_from_config("detok", {**tok.config_dict(), "colour": 3})


def test_registry_errors():
    with pytest.raises(KeyError, match="available"):
        build("detok_ZZ")
    with pytest.raises(TypeError):
        build("detok_MM", not_a_field=1)


# ---------------------------------------------------------------------------------------------
# The released layout, written key by key, and a float64 reference of the released computation
# ---------------------------------------------------------------------------------------------
def official_state_dict(cfg, gen):
    """An official-layout DeTok state dict (key names as in the released files), random values."""
    W, D, Ce, p, c = cfg["enc_width"], cfg["enc_depth"], cfg["latent_channels"], cfg["patch_size"], 3
    L = (cfg["image_size"] // p) ** 2
    hid = int(2 / 3 * W * 4)
    sd = {}

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=gen) * s

    def blocks(prefix):
        for i in range(D):
            b = f"{prefix}.transformer.{i}."
            sd[b + "norm1.weight"] = 1 + r(W)
            sd[b + "norm2.weight"] = 1 + r(W)
            sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = r(3 * W, W, s=0.1), r(3 * W)
            sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r(W, W, s=0.1), r(W)
            sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"] = r(2 * hid, W, s=0.1), r(2 * hid)
            sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"] = r(W, hid, s=0.1), r(W)
        sd[f"{prefix}.ln_pre.weight"], sd[f"{prefix}.ln_post.weight"] = 1 + r(W), 1 + r(W)
        sd[f"{prefix}.positional_embedding"] = r(1, L, W, s=0.2)

    sd["encoder.patch_embed.0.weight"], sd["encoder.patch_embed.0.bias"] = r(W, c, p, p, s=0.1), r(W)
    blocks("encoder")
    sd["encoder.latent_head.weight"], sd["encoder.latent_head.bias"] = r(2 * Ce, W, s=0.1), r(2 * Ce)
    blocks("decoder")
    sd["decoder.mask_token"] = r(1, 1, W)
    sd["decoder.decoder_embed.weight"], sd["decoder.decoder_embed.bias"] = r(W, Ce, s=0.2), r(W)
    sd["decoder.ffn.1.weight"], sd["decoder.ffn.1.bias"] = r(p * p * c, W, 1, 1, s=0.1), r(p * p * c)
    sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"] = r(c, c, 3, 3, s=0.3), r(c)
    return sd


def ref_forward(sd, cfg, x):
    """The released computation written out directly in float64 (explicit heads, explicit pairwise
    rotation with the released frequency layout, explicit pixel placement)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    p, heads, D = cfg["patch_size"], cfg["enc_heads"], cfg["enc_depth"]
    g = cfg["image_size"] // p
    W = cfg["enc_width"]
    hd = W // heads

    # rotary angles: per axis, head_dim/4 log-spaced frequencies 7 -> 7e-4 repeated twice, times 2π
    n = hd // 4
    f = [7.0 * (1e4 ** (-k / (n - 1) if n > 1 else 0.0)) * 2 * math.pi for k in range(n)] * 2
    ang = torch.zeros(g * g, hd, dtype=torch.float64)
    for i in range(g):
        for j in range(g):
            yi, xj = (i / (g - 1)), (j / (g - 1))
            for d in range(hd // 2):
                ang[i * g + j, d] = yi * f[d]
                ang[i * g + j, hd // 2 + d] = xj * f[d]

    def rope(v):  # v (L, hd): pair (2m, 2m+1), each element with its own angle
        out = torch.empty_like(v)
        for m in range(hd // 2):
            a, b = v[:, 2 * m], v[:, 2 * m + 1]
            out[:, 2 * m] = a * torch.cos(ang[:, 2 * m]) - b * torch.sin(ang[:, 2 * m])
            out[:, 2 * m + 1] = b * torch.cos(ang[:, 2 * m + 1]) + a * torch.sin(ang[:, 2 * m + 1])
        return out

    def rms(h, w):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def trunk(h, pre):
        h = rms(h, sd[f"{pre}.ln_pre.weight"])
        for i in range(D):
            b = f"{pre}.transformer.{i}."
            y = rms(h, sd[b + "norm1.weight"])
            qkv = y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
            outs = []
            for hh in range(heads):
                q = rope(qkv[:, hh * hd:(hh + 1) * hd])
                k = rope(qkv[:, W + hh * hd:W + (hh + 1) * hd])
                v = qkv[:, 2 * W + hh * hd:2 * W + (hh + 1) * hd]
                att = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1)
                outs.append(att @ v)
            h = h + torch.cat(outs, -1) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
            y = rms(h, sd[b + "norm2.weight"])
            u = y @ sd[b + "mlp.w12.weight"].T + sd[b + "mlp.w12.bias"]
            gate, val = u.chunk(2, -1)
            h = h + (gate * torch.sigmoid(gate) * val) @ sd[b + "mlp.w3.weight"].T + sd[b + "mlp.w3.bias"]
        return rms(h, sd[f"{pre}.ln_post.weight"])

    means, images = [], []
    for img in x:
        toks = []
        for i in range(g):
            for j in range(g):
                patch = img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
                toks.append(sd["encoder.patch_embed.0.weight"].reshape(W, -1) @ patch + sd["encoder.patch_embed.0.bias"])
        h = torch.stack(toks) + sd["encoder.positional_embedding"][0]
        mom = trunk(h, "encoder") @ sd["encoder.latent_head.weight"].T + sd["encoder.latent_head.bias"]
        z = mom[:, : cfg["latent_channels"]]
        means.append(z)
        h = z @ sd["decoder.decoder_embed.weight"].T + sd["decoder.decoder_embed.bias"]
        h = trunk(h + sd["decoder.positional_embedding"][0], "decoder")
        pix = h @ sd["decoder.ffn.1.weight"][:, :, 0, 0].T + sd["decoder.ffn.1.bias"]  # (L, p*p*3)
        out = torch.zeros(3, g * p, g * p, dtype=torch.float64)
        for i in range(g):
            for j in range(g):
                for p1 in range(p):
                    for p2 in range(p):
                        for ch in range(3):
                            out[ch, i * p + p1, j * p + p2] = pix[i * g + j, (p1 * p + p2) * 3 + ch]
        images.append(F.conv2d(out[None], sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)[0])
    return torch.stack(means), torch.stack(images)


@pytest.mark.parametrize("ema", [True, False])
def test_official_layout_loads_strictly_and_matches_reference(tmp_path, ema):
    cfg = dict(TINY, latent_channels=4, enc_width=32, enc_heads=2, dec_width=32, dec_heads=2)
    gen = torch.Generator().manual_seed(0)
    sd = official_state_dict(cfg, gen)
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "detok-official.pth"
    torch.save({"model": sd if not ema else other, "model_ema": sd if ema else other, "epoch": 3}, path)
    tok = T.load_official_detok(path, model="detok_MM", ema=ema, **cfg)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    ref_mean, ref_img = ref_forward(sd, cfg, x)
    with torch.no_grad():
        z = tok.encode(x)
        img = tok.decode(z)
    tokens = z.flatten(2).transpose(1, 2)
    assert torch.allclose(tokens.double(), ref_mean, atol=2e-5, rtol=1e-4)
    assert torch.allclose(img.double(), ref_img, atol=2e-5, rtol=1e-4)


def test_official_loader_is_strict(tmp_path):
    cfg = dict(TINY, latent_channels=4)
    sd = official_state_dict(cfg, torch.Generator().manual_seed(0))
    bad = dict(sd)
    bad["encoder.extra.weight"] = torch.zeros(1)
    del bad["decoder.mask_token"]
    torch.save({"model": bad, "model_ema": bad}, tmp_path / "bad.pth")
    with pytest.raises(T.OfficialCheckpointError) as e:
        T.load_official_detok(tmp_path / "bad.pth", model="detok_MM", **cfg)
    assert "decoder.mask_token" in str(e.value) and "encoder.extra.weight" in str(e.value)
    torch.save({"weights": sd}, tmp_path / "nokey.pth")
    with pytest.raises(T.OfficialCheckpointError, match="model_ema"):
        T.load_official_detok(tmp_path / "nokey.pth", model="detok_MM", **cfg)
    with pytest.raises(FileNotFoundError, match="jjiaweiyang/l-DeTok"):
        T.load_official_detok(tmp_path / "missing.pth")

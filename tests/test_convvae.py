"""ConvVAE: shapes, the clean forward and the (noise-only) denoising pass, the MAR KL-16 layout, and strict
official loading."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from ldetok.corruption import CorruptionConfig, CorruptionDraw, DenoisingOutput, denoising_forward, draw_corruption
from ldetok.tokenizers.base import DiagonalGaussian
from ldetok.tokenizers.convvae import (
    CONVVAE_CONFIGS,
    MAR_SCALE_FACTOR,
    AttnBlock,
    ConvVAE,
    ResnetBlock,
    build_convvae,
    load_official_marvae,
)

STATS = {"latent_mean", "latent_std", "stats_set"}


def _tiny(**kw):
    torch.manual_seed(0)
    return build_convvae("convvae_tiny", **kw)


def _images(b=2, size=32, seed=1):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# An independent description of the LDM/MAR KL-VAE state dict, written from the recipe
# (key -> shape), not from the module: the loader and the layout tests compare against it.
# ---------------------------------------------------------------------------------------------
def _conv(d, name, cin, cout, k):
    d[f"{name}.weight"] = (cout, cin, k, k)
    d[f"{name}.bias"] = (cout,)


def _gn(d, name, c):
    d[f"{name}.weight"] = (c,)
    d[f"{name}.bias"] = (c,)


def _res(d, name, cin, cout):
    _gn(d, f"{name}.norm1", cin)
    _conv(d, f"{name}.conv1", cin, cout, 3)
    _gn(d, f"{name}.norm2", cout)
    _conv(d, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(d, f"{name}.nin_shortcut", cin, cout, 1)


def _attn(d, name, c):
    _gn(d, f"{name}.norm", c)
    for p in ("q", "k", "v", "proj_out"):
        _conv(d, f"{name}.{p}", c, c, 1)


def official_layout(ch=128, ch_mult=(1, 1, 2, 2, 4), nrb=2, attn_enc=(16,), attn_dec=(), res=256, z=16, e=16,
                    cin=3, cout=3):
    d = {}
    chans = [ch * m for m in ch_mult]
    n = len(ch_mult)
    _conv(d, "encoder.conv_in", cin, ch, 3)
    prev = ch
    for i in range(n):
        r = res >> i
        for j in range(nrb):
            _res(d, f"encoder.down.{i}.block.{j}", prev if j == 0 else chans[i], chans[i])
            if r in attn_enc:
                _attn(d, f"encoder.down.{i}.attn.{j}", chans[i])
        prev = chans[i]
        if i < n - 1:
            _conv(d, f"encoder.down.{i}.downsample.conv", chans[i], chans[i], 3)
    for b in ("block_1", "block_2"):
        _res(d, f"encoder.mid.{b}", chans[-1], chans[-1])
    _attn(d, "encoder.mid.attn_1", chans[-1])
    _gn(d, "encoder.norm_out", chans[-1])
    _conv(d, "encoder.conv_out", chans[-1], 2 * z, 3)
    _conv(d, "quant_conv", 2 * z, 2 * e, 1)
    _conv(d, "post_quant_conv", e, z, 1)
    _conv(d, "decoder.conv_in", z, chans[-1], 3)
    for b in ("block_1", "block_2"):
        _res(d, f"decoder.mid.{b}", chans[-1], chans[-1])
    _attn(d, "decoder.mid.attn_1", chans[-1])
    prev = chans[-1]
    for i in reversed(range(n)):  # bottom-up, as the decoder runs
        r = res >> i
        for j in range(nrb + 1):
            _res(d, f"decoder.up.{i}.block.{j}", prev if j == 0 else chans[i], chans[i])
            if r in attn_dec:
                _attn(d, f"decoder.up.{i}.attn.{j}", chans[i])
        prev = chans[i]
        if i > 0:
            _conv(d, f"decoder.up.{i}.upsample.conv", chans[i], chans[i], 3)
    _gn(d, "decoder.norm_out", chans[0])
    _conv(d, "decoder.conv_out", chans[0], cout, 3)
    return d


def _layout_for(name):
    c = CONVVAE_CONFIGS[name]
    return official_layout(c["ch"], c["ch_mult"], c["num_res_blocks"], c["attn_resolutions_enc"],
                           c["attn_resolutions_dec"], c["resolution"], c["z_channels"], c["embed_dim"],
                           c["in_channels"], c["out_channels"])


# ---------------------------------------------------------------------------------------------
# Shapes and the training pass
# ---------------------------------------------------------------------------------------------
NOISE_ONLY = CorruptionConfig(gamma=3.0, max_mask_ratio=0.0)


def test_tiny_forward_backward_shapes(gen):
    model = _tiny().train()
    assert model.num_tokens is None  # no tokens to mask
    x = _images(2)
    out = denoising_forward(model, x, NOISE_ONLY, gen)
    assert isinstance(out, DenoisingOutput)
    assert out.recon.shape == x.shape
    assert out.latents.shape == (2, 16, 4, 4)
    assert out.mask is None and out.mask_ratio is None
    assert isinstance(out.posterior, DiagonalGaussian)
    assert out.posterior.mean.shape == (2, 16, 4, 4)
    loss = F.mse_loss(out.recon, x) + 1e-6 * out.posterior.kl().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # gradient reaches the encoder through noise


def test_latent_shape_and_stride():
    model = _tiny()
    assert model.stride == 8 and model.latent_channels == 16
    assert model.latent_shape(32) == (16, 4, 4)
    assert model.latent_shape(64) == (16, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        model.latent_shape(36)
    with pytest.raises(ValueError, match="divisible"):
        model.encode_moments(torch.zeros(1, 3, 36, 36))
    f16 = build_convvae("convvae_tiny_f16")
    assert f16.stride == 16 and f16.latent_shape(32) == (16, 2, 2)
    assert f16(_images(1)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_is_clean_in_any_mode(mode):
    model = _tiny().train(mode == "train")
    x = _images(2)
    with torch.no_grad():
        a, b = model(x), model(x)
        z = model.encode(x)
        post = model.posterior(x)
        # the denoising pass with nothing drawn, through the posterior mean, is the same reconstruction
        out = denoising_forward(model, x, NOISE_ONLY, draw=CorruptionDraw(0.0, None), sample=False)
    assert out.noise_level is None and out.mask is None
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(z, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(a, model.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(out.latents, z, rtol=0, atol=0)
    torch.testing.assert_close(out.recon, a, rtol=0, atol=0)
    assert (model.reconstruct(x).abs() <= 1).all()


def test_training_noise_changes_latents_per_sample():
    x = _images(4)
    model = _tiny().train()
    with torch.no_grad():
        out = denoising_forward(model, x, NOISE_ONLY, torch.Generator().manual_seed(5))
        again = denoising_forward(model, x, NOISE_ONLY, torch.Generator().manual_seed(5))
        clean = denoising_forward(model, x, CorruptionConfig.off(), torch.Generator().manual_seed(5))
    t = out.noise_level
    assert t is not None and t.shape == (4,) and ((t >= 0) & (t <= 1)).all()
    assert len(set(t.tolist())) == 4  # one level per sample
    torch.testing.assert_close(out.latents, again.latents)  # seeded: reproducible
    torch.testing.assert_close(out.recon, again.recon)
    # gamma 0: posterior sample (the first draw), no noise, no t; gamma 3 with the same seed differs from it.
    assert clean.noise_level is None
    torch.testing.assert_close(clean.latents, clean.posterior.sample(torch.Generator().manual_seed(5)))
    assert not torch.allclose(out.latents, clean.latents)


def test_training_noise_matches_hand_computation():
    """The ConvVAE's training pass at t > 0, by hand from the same seed: t ~ U(0, 1) first, then the
    posterior sample z, then ε; the decoder sees (1 - t) z + t γ ε."""
    x = _images(3, seed=4)
    model = _tiny().train()
    with torch.no_grad():
        out = denoising_forward(model, x, NOISE_ONLY, torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        t = torch.rand(3, generator=g)
        post = model.posterior(x)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        eps = torch.randn(z.shape, generator=g)
        tb = t.view(-1, 1, 1, 1)
        zt = (1 - tb) * z + tb * 3.0 * eps
        recon = model.decode(zt)
    assert (t > 0.05).all()  # a real noise level for every sample, not the t = 0 corner
    torch.testing.assert_close(out.noise_level, t, rtol=0, atol=0)
    torch.testing.assert_close(out.posterior.mean, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(out.latents, zt)
    torch.testing.assert_close(out.recon, recon)
    assert not torch.allclose(out.recon, model.decode(z), atol=1e-3)  # the noise reached the decoder


@pytest.mark.parametrize("seed, draws_zero", [(0, False), (3, True)])
def test_masking_is_refused(seed, draws_zero):
    """The conv VAE has no tokens: a masking config is refused whatever ratio a step happens to draw
    (seed 3 draws ratio 0 for this config, which must not let the config through)."""
    model = _tiny().train()
    x = _images(2)
    cfg = CorruptionConfig(gamma=3.0, max_mask_ratio=0.5)
    ratio = draw_corruption(cfg, 2, torch.Generator().manual_seed(seed)).mask_ratio
    assert (ratio == 0) == draws_zero
    with pytest.raises(ValueError, match="masking"):
        denoising_forward(model, x, cfg, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.3, torch.tensor([0.0, 0.5])])
def test_fixed_mask_ratio_is_refused(ratio):
    model = _tiny()
    with pytest.raises(ValueError, match="masking"):
        denoising_forward(model, _images(2), NOISE_ONLY, draw=CorruptionDraw(ratio, None))


def test_noise_options_and_fixed_level():
    x = _images(2)
    model = _tiny().train()
    cfg = CorruptionConfig(gamma=2.0, noise_type="additive", noise_dist="logit_normal", noise_mean=0.8,
                           max_mask_ratio=0.0)
    draw = CorruptionDraw(0.0, torch.zeros(2))
    with torch.no_grad():
        out = denoising_forward(model, x, cfg, torch.Generator().manual_seed(0), draw=draw)
        ref = denoising_forward(model, x, cfg, torch.Generator().manual_seed(0), draw=draw)
        half = denoising_forward(model, x, cfg, torch.Generator().manual_seed(0),
                                 draw=CorruptionDraw(0.0, torch.full((2,), 0.5)))
    torch.testing.assert_close(out.noise_level, torch.zeros(2))
    torch.testing.assert_close(out.latents, ref.latents)
    # t = 0 additive noise leaves the posterior sample unchanged (a fixed draw draws no t)
    g = torch.Generator().manual_seed(0)
    z = out.posterior.sample(g)
    torch.testing.assert_close(out.latents, z)
    # t = 0.5 additive noise: z + t γ ε with ε the draw after the posterior sample
    torch.testing.assert_close(half.latents, z + 0.5 * 2.0 * torch.randn(z.shape, generator=g))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"norm_groups": 7}, "norm_groups"),
        ({"attn_resolutions_enc": (5,)}, "attn_resolutions_enc"),
        ({"ch_mult": ()}, "ch_mult"),
    ],
)
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        build_convvae("convvae_tiny", **bad)


def test_corruption_is_no_constructor_argument():
    for key in ("gamma", "noise_type", "max_mask_ratio"):
        with pytest.raises(TypeError, match=key):
            build_convvae("convvae_tiny", **{key: 1.0})


def test_unknown_name_and_override():
    with pytest.raises(ValueError, match="convvae_tiny"):
        build_convvae("nope")
    with pytest.raises(TypeError, match="colour"):
        build_convvae("convvae_tiny", colour=3)


# ---------------------------------------------------------------------------------------------
# The MAR KL-16 layout
# ---------------------------------------------------------------------------------------------
# Hand count for ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention at 16 (encoder) + both mids.
#   ResnetBlock(a,b) = 2a + (9ab + b) + 2b + (9b^2 + b) [+ ab + b if a != b]
#   AttnBlock(c) = 2c + 4(c^2 + c);  Down/Upsample(c) = 9c^2 + c
#   encoder = 28,265,760; decoder = 38,188,931; quant_conv + post_quant_conv = 1,056 + 272
#   total 66,456,019 (x 4 bytes = 253.5 MiB: MAR's download script expects a ~254 MB kl16.ckpt).
MARVAE_PARAMS = 66_456_019


def test_marvae_builds_on_meta_with_mar_param_count():
    with torch.device("meta"):
        model = build_convvae("marvae")
    assert model.stride == 16 and model.latent_shape(256) == (16, 16, 16)
    assert model.num_params() == MARVAE_PARAMS
    assert sum(p.numel() for p in model.encoder.parameters()) == 28_265_760
    assert sum(p.numel() for p in model.decoder.parameters()) == 38_188_931
    layout = official_layout()
    assert sum(math.prod(s) for s in layout.values()) == MARVAE_PARAMS


def test_marvae_key_names_and_shapes_match_official_layout():
    with torch.device("meta"):
        model = build_convvae("marvae")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in STATS}
    assert ours == official_layout()
    # spot checks written out by hand
    assert ours["encoder.down.0.block.0.norm1.weight"] == (128,)
    assert ours["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert ours["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)
    assert ours["encoder.mid.attn_1.proj_out.bias"] == (512,)
    assert ours["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert ours["quant_conv.weight"] == (32, 32, 1, 1)
    assert ours["post_quant_conv.weight"] == (16, 16, 1, 1)
    assert ours["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert ours["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert ours["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert ours["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert "encoder.down.4.downsample.conv.weight" not in ours
    assert "decoder.up.0.upsample.conv.weight" not in ours
    assert not any(".attn." in k for k in ours if k.startswith("decoder.up"))  # no decoder attention
    assert sum(k.startswith("encoder.down.4.attn.") and k.endswith("q.weight") for k in ours) == 2


@pytest.mark.parametrize("name", sorted(CONVVAE_CONFIGS))
def test_every_config_follows_the_layout(name):
    with torch.device("meta"):
        model = build_convvae(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in STATS}
    assert ours == _layout_for(name)


# ---------------------------------------------------------------------------------------------
# Official loading (tiny variant via overrides, so it stays fast)
# ---------------------------------------------------------------------------------------------
TINY = {k: v for k, v in CONVVAE_CONFIGS["convvae_tiny"].items()}


def _official_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in _layout_for("convvae_tiny").items()}


@pytest.mark.parametrize("container", ["model", "state_dict", "raw"])
def test_load_official_strict(tmp_path, container):
    sd = _official_sd()
    obj = sd if container == "raw" else {container: sd, "epoch": 3}
    path = tmp_path / "kl16.ckpt"
    torch.save(obj, path)
    model = load_official_marvae(path, **TINY)
    assert isinstance(model, ConvVAE) and not model.training
    for k, v in model.state_dict().items():
        if k not in STATS:
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    rep = model.official_load_report
    assert rep.container == container and rep.loaded == len(sd) and rep.dropped == []
    # MAR's latent scaling: tokenize = encode * 0.2325, no mean shift
    assert model.has_stats
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.tokenize(x), model.encode(x) * MAR_SCALE_FACTOR)
    assert model.latent_mean.device.type == "cpu" and model.encoder.conv_in.weight.dtype == torch.float32


def test_load_official_drops_and_reports_loss_keys(tmp_path, caplog):
    sd = _official_sd()
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {k: v.half() for k, v in sd.items()}}, path)
    with caplog.at_level(logging.INFO, logger="ldetok.tokenizers.convvae"):
        model = load_official_marvae(path, **TINY)
    rep = model.official_load_report
    assert rep.dropped == ["loss.discriminator.main.0.weight", "loss.logvar"]
    assert rep.loaded == len(sd) - 2
    assert "dropped 2" in caplog.text
    assert model.decoder.conv_out.weight.dtype == torch.float32  # half file -> fp32 model


def test_load_official_rejects_unexpected_missing_and_misshaped(tmp_path):
    path = tmp_path / "kl16.ckpt"
    sd = _official_sd()
    sd["encoder.extra_head.weight"] = torch.zeros(3)
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*encoder\.extra_head\.weight"):
        load_official_marvae(path, **TINY)

    sd = _official_sd()
    del sd["decoder.up.1.upsample.conv.bias"]
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"missing keys \(1\).*decoder\.up\.1\.upsample\.conv\.bias"):
        load_official_marvae(path, **TINY)

    sd = _official_sd()
    sd["quant_conv.weight"] = torch.zeros(8, 32, 1, 1)
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"shape mismatches.*quant_conv\.weight"):
        load_official_marvae(path, **TINY)


def test_load_official_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "kl16.ckpt"
    with pytest.raises(FileNotFoundError, match="kl16.ckpt") as e:
        load_official_marvae(missing)
    assert str(missing) in str(e.value) and "LTH14/mar" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Blocks against a naive re-computation (the LDM formulas written out with bmm)
# ---------------------------------------------------------------------------------------------
def test_resnet_block_matches_naive():
    torch.manual_seed(0)
    blk = ResnetBlock(16, 32, groups=8).eval()
    x = torch.randn(2, 16, 6, 6)
    h = F.group_norm(x, 8, blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    h = F.conv2d(h * torch.sigmoid(h), blk.conv1.weight, blk.conv1.bias, padding=1)
    h = F.group_norm(h, 8, blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    h = F.conv2d(h * torch.sigmoid(h), blk.conv2.weight, blk.conv2.bias, padding=1)
    ref = F.conv2d(x, blk.nin_shortcut.weight, blk.nin_shortcut.bias) + h
    torch.testing.assert_close(blk(x), ref)


def test_attn_block_matches_naive():
    torch.manual_seed(0)
    blk = AttnBlock(16, groups=8).eval()
    x = torch.randn(2, 16, 5, 5)
    n = F.group_norm(x, 8, blk.norm.weight, blk.norm.bias, eps=1e-6)
    q, k, v = (F.conv2d(n, m.weight, m.bias).reshape(2, 16, 25) for m in (blk.q, blk.k, blk.v))
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) / 4.0, dim=2)  # (b, i, j), scale c^-1/2
    o = torch.bmm(v, w.transpose(1, 2)).reshape(2, 16, 5, 5)
    ref = x + F.conv2d(o, blk.proj_out.weight, blk.proj_out.bias)
    torch.testing.assert_close(blk(x), ref)


def test_downsample_is_asymmetric():
    model = _tiny()
    ds = model.encoder.down[0].downsample
    x = torch.randn(1, 32, 8, 8)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), ds.conv.weight, ds.conv.bias, stride=2)
    torch.testing.assert_close(ds(x), ref)
    assert ds(x).shape == (1, 32, 4, 4)


# ---------------------------------------------------------------------------------------------
# Whole-network data flow against a functional re-implementation over the state dict
# ---------------------------------------------------------------------------------------------
def _f_res(sd, name, x, g):
    def gn_silu(h, n):
        h = F.group_norm(h, g, sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)
        return h * torch.sigmoid(h)

    h = F.conv2d(gn_silu(x, f"{name}.norm1"), sd[f"{name}.conv1.weight"], sd[f"{name}.conv1.bias"], padding=1)
    h = F.conv2d(gn_silu(h, f"{name}.norm2"), sd[f"{name}.conv2.weight"], sd[f"{name}.conv2.bias"], padding=1)
    if f"{name}.nin_shortcut.weight" in sd:
        x = F.conv2d(x, sd[f"{name}.nin_shortcut.weight"], sd[f"{name}.nin_shortcut.bias"])
    return x + h


def _f_attn(sd, name, x, g):
    b, c, hh, ww = x.shape
    n = F.group_norm(x, g, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-6)
    q, k, v = (F.conv2d(n, sd[f"{name}.{p}.weight"], sd[f"{name}.{p}.bias"]).reshape(b, c, -1) for p in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)
    o = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
    return x + F.conv2d(o, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"])


def _f_out(sd, name, h, g):
    h = F.group_norm(h, g, sd[f"{name}.norm_out.weight"], sd[f"{name}.norm_out.bias"], eps=1e-6)
    w, b = sd[f"{name}.conv_out.weight"], sd[f"{name}.conv_out.bias"]
    return F.conv2d(h * torch.sigmoid(h), w, b, padding=1)


def _f_mid(sd, name, h, g):
    h = _f_res(sd, f"{name}.mid.block_1", h, g)
    h = _f_attn(sd, f"{name}.mid.attn_1", h, g)
    return _f_res(sd, f"{name}.mid.block_2", h, g)


def _f_level(sd, prefix, h, g):
    j = 0
    while f"{prefix}.block.{j}.conv1.weight" in sd:
        h = _f_res(sd, f"{prefix}.block.{j}", h, g)
        if f"{prefix}.attn.{j}.q.weight" in sd:
            h = _f_attn(sd, f"{prefix}.attn.{j}", h, g)
        j += 1
    return h


def _f_encode(sd, x, n_levels, g):
    h = F.conv2d(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
    for i in range(n_levels):
        h = _f_level(sd, f"encoder.down.{i}", h, g)
        if i < n_levels - 1:
            pre = f"encoder.down.{i}.downsample.conv"
            w, b = sd[f"{pre}.weight"], sd[f"{pre}.bias"]
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), w, b, stride=2)
    h = _f_out(sd, "encoder", _f_mid(sd, "encoder", h, g), g)
    return F.conv2d(h, sd["quant_conv.weight"], sd["quant_conv.bias"])


def _f_decode(sd, z, n_levels, g):
    h = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    h = F.conv2d(h, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _f_mid(sd, "decoder", h, g)
    for i in reversed(range(n_levels)):
        h = _f_level(sd, f"decoder.up.{i}", h, g)
        if i > 0:
            w, b = sd[f"decoder.up.{i}.upsample.conv.weight"], sd[f"decoder.up.{i}.upsample.conv.bias"]
            h = F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    return _f_out(sd, "decoder", h, g)


@pytest.mark.parametrize("overrides", [{}, {"attn_resolutions_dec": (8,), "num_res_blocks": 2}])
def test_whole_network_matches_functional_reference(overrides):
    model = _tiny(**overrides).eval()
    sd = model.state_dict()
    x = _images(2)
    n = len(model.config["ch_mult"])
    with torch.no_grad():
        moments = model.encode_moments(x)
        torch.testing.assert_close(moments, _f_encode(sd, x, n, 8), rtol=1e-4, atol=1e-5)
        z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(model.decode(z), _f_decode(sd, z, n, 8), rtol=1e-4, atol=1e-5)
    if overrides:
        assert any(".attn." in k for k in sd if k.startswith("decoder.up.2."))


def test_load_official_refuses_pickled_objects(tmp_path):
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": _official_sd(), "args": _NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_official_marvae(path, **TINY)


class _NotATensor:
    pass


def test_loaded_parameters_are_trainable_leaves(tmp_path):
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": _official_sd()}, path)
    model = load_official_marvae(path, **TINY).train()
    params = dict(model.named_parameters())
    assert len(params) == len(_official_sd())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.is_leaf for p in params.values())
    denoising_forward(model, _images(1), NOISE_ONLY, torch.Generator().manual_seed(0)).recon.mean().backward()
    assert model.decoder.conv_out.weight.grad is not None

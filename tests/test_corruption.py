"""Statistics and exactness of the latent corruption functions."""

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

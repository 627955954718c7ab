"""Closed-form checks of the generator machinery: DDPM (diffusion.py), DiffLoss, flow matching (flow.py).

Gaussian data make the optimal denoiser / velocity known exactly, so samplers can be checked against
the target distribution (or, for the deterministic flow, the exact per-sample transport map).
"""

import math

import numpy as np
import pytest
import torch

from ldetok.generators.diffloss import DiffLoss, SimpleMLPAdaLN
from ldetok.generators.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    get_betas,
    space_timesteps,
)
from ldetok.generators.flow import Transport, ode_sample, sde_sample, time_shift


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation (badly so on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Schedules, forward process, posterior
# ---------------------------------------------------------------------------------------------
def test_linear_betas_endpoints():
    b = get_betas("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b100 = get_betas("linear", 100)  # ADM scales the endpoints by 1000 / T
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="schedule"):
        get_betas("quadratic")


def test_cosine_alphas_cumprod_matches_formula():
    T, s = 1000, 0.008
    d = GaussianDiffusion(get_betas("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(i + 1) / f(0) for i in range(T)])
    # the last beta is clipped to 0.999 (f(T) = 0), every other step follows the formula
    np.testing.assert_allclose(d.alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=1e-14)
    assert d.betas.max() == pytest.approx(0.999)


def test_q_sample_mean_and_std(gen):
    d = create_diffusion(schedule="linear")
    t_idx = 400
    x0 = torch.full((20000, 2), 0.7)
    t = torch.full((20000,), t_idx)
    xt = d.q_sample(x0, t, generator=gen)
    ab = d.alphas_cumprod[t_idx]
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.02)
    noise = torch.randn(5, 3, 2, generator=gen)
    x0 = torch.randn(5, 3, 2, generator=gen)
    t = torch.tensor([0, 10, 500, 998, 999])
    ab = torch.tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_posterior_matches_gaussian_conditioning(gen):
    """q(x_{t-1} | x_t, x_0) derived independently by conditioning the joint Gaussian of (x_{t-1}, x_t)."""
    d = create_diffusion(schedule="cosine")
    x0 = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    xt = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([1, 5, 100, 500, 900, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ab, ab_prev, alpha = d.alphas_cumprod[ti], d.alphas_cumprod[ti - 1], 1 - d.betas[ti]
        m1, v1 = math.sqrt(ab_prev) * x0[i], 1 - ab_prev  # x_{t-1} | x_0
        m2, v2 = math.sqrt(ab) * x0[i], 1 - ab  # x_t | x_0
        c12 = math.sqrt(alpha) * v1  # Cov(x_{t-1}, x_t | x_0)
        torch.testing.assert_close(mean[i], m1 + c12 / v2 * (xt[i] - m2))
        assert var[i, 0].item() == pytest.approx(v1 - c12 ** 2 / v2, rel=1e-9)
        assert log_var[i, 0].item() == pytest.approx(math.log(v1 - c12 ** 2 / v2), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Hybrid loss
# ---------------------------------------------------------------------------------------------
def _oracle(noise, v_value):
    return lambda x, t, **kw: torch.cat([noise, torch.full_like(noise, v_value)], dim=1)


def test_training_losses_oracle_and_analytic_kl(gen):
    d = create_diffusion(schedule="linear")
    x0 = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen)
    noise = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen)
    t = torch.tensor([1, 2, 50, 200, 400, 700, 998, 999])
    # true eps and v = -1 (variance = posterior variance): both terms vanish
    out = d.training_losses(_oracle(noise, -1.0), x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"} and out["loss"].shape == (8,)
    assert out["mse"].abs().max() < 1e-20
    assert out["vb"].abs().max() < 1e-9
    # v = +1 (variance = beta): the VB term is KL(N(mu, pv) || N(mu, beta)) in bits
    out = d.training_losses(_oracle(noise, 1.0), x0, t, noise=noise)
    pv, beta = d.posterior_variance[t.numpy()], d.betas[t.numpy()]
    kl_bits = 0.5 * (np.log(beta / pv) + pv / beta - 1) / math.log(2)
    np.testing.assert_allclose(out["vb"].numpy(), kl_bits, rtol=1e-8, atol=1e-15)
    assert (out["vb"] > 0).all()
    # without learn_sigma: loss = mse and vb = 0
    d2 = create_diffusion(learn_sigma=False)
    out = d2.training_losses(lambda x, t: noise + 0.1, x0, t, noise=noise)
    torch.testing.assert_close(out["loss"], out["mse"])
    torch.testing.assert_close(out["mse"], torch.full((8,), 0.01, dtype=torch.float64))
    assert (out["vb"] == 0).all()


def test_vb_gradient_reaches_only_the_variance_channels(gen):
    d = create_diffusion(schedule="cosine")
    x0, noise = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    eps = (noise + 0.3).requires_grad_()
    v = torch.zeros(4, 3, requires_grad=True)
    out = d.training_losses(lambda x, t: torch.cat([eps, v], 1), x0, torch.tensor([0, 3, 300, 900]), noise=noise)
    out["vb"].sum().backward(retain_graph=True)
    assert eps.grad is None or eps.grad.abs().max() == 0
    assert v.grad.abs().max() > 0
    v.grad = None
    out["mse"].sum().backward()
    assert eps.grad.abs().max() > 0 and (v.grad is None or v.grad.abs().max() == 0)


def test_model_output_shape_is_checked():
    d = create_diffusion()
    with pytest.raises(ValueError, match="eps and v"):
        d.training_losses(lambda x, t: x, torch.zeros(2, 3), torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------
def test_space_timesteps():
    keep = sorted(space_timesteps(1000, "100"))
    assert len(keep) == 100 and keep[0] == 0 and keep[-1] == 999
    assert set(np.diff(keep)) <= {10, 11}
    assert sorted(space_timesteps(1000, 100)) == keep
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))
    two = sorted(space_timesteps(100, "10,5"))  # two sections of 50 steps
    assert len(two) == 15 and two[:10] == [round(i * 49 / 9) for i in range(10)] and two[10] == 50
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_respaced_diffusion_keeps_marginals_and_maps_timesteps():
    base = create_diffusion(schedule="cosine")
    sp = create_diffusion("100", schedule="cosine")
    keep = sorted(space_timesteps(1000, "100"))
    assert sp.num_timesteps == 100
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-10)
    seen = []

    def spy(x, t):
        seen.append(int(t[0]))
        return torch.zeros(x.shape[0], 2 * x.shape[1])

    sp.p_sample_loop(spy, (2, 3), generator=torch.Generator().manual_seed(0))
    assert seen == keep[::-1]  # the model always sees original steps in [0, 1000)


# ---------------------------------------------------------------------------------------------
# Sampling with the Bayes-optimal denoiser of Gaussian data
# ---------------------------------------------------------------------------------------------
MU, SD = torch.tensor([1.0, -2.0]).view(1, 2, 1), 0.5


def _gaussian_ddpm_oracle(base: GaussianDiffusion, chain: GaussianDiffusion, exact_variance: bool):
    """eps* = E[eps | x_t] for x_0 ~ N(MU, SD^2); optionally v giving the exact reverse variance."""
    ab_orig = torch.tensor(base.alphas_cumprod, dtype=torch.float32)
    index_of = torch.full((base.num_timesteps,), -1, dtype=torch.long)
    index_of[torch.as_tensor(chain.timestep_map)] = torch.arange(chain.num_timesteps)

    def model(x, t):
        ab = ab_orig[t].view(-1, 1, 1)
        var_xt = ab * SD ** 2 + 1 - ab
        eps = (1 - ab).sqrt() / var_xt * (x - ab.sqrt() * MU)
        if not exact_variance:
            return eps
        k = index_of[t]
        table = lambda a: torch.tensor(a, dtype=torch.float32)[k].view(-1, 1, 1)  # noqa: E731
        var_x0 = SD ** 2 * (1 - ab) / var_xt  # Var(x_0 | x_t)
        true_var = table(chain.posterior_variance) + table(chain.posterior_mean_coef1) ** 2 * var_x0
        lo, hi = table(chain.posterior_log_variance_clipped), table(np.log(chain.betas))
        v = 2 * (torch.log(true_var) - lo) / (hi - lo) - 1
        return torch.cat([eps, v.expand_as(eps)], dim=1)

    return model


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_p_sample_loop_recovers_gaussian_data(learn_sigma):
    base = create_diffusion(schedule="linear")
    chain = create_diffusion("50", schedule="linear", learn_sigma=learn_sigma)
    model = _gaussian_ddpm_oracle(base, chain, exact_variance=learn_sigma)
    g = torch.Generator().manual_seed(1)
    x = chain.p_sample_loop(model, (3000, 2, 3), generator=g)
    assert x.shape == (3000, 2, 3)
    mean, std = x.mean(dim=(0, 2)), x.std(dim=(0, 2))
    torch.testing.assert_close(mean, MU.flatten(), atol=0.03, rtol=0)
    # the learned (exact) variance makes every reverse step exact; the fixed variances bracket it on a
    # 50-step chain: posterior variance ("small") under-disperses, beta ("large") over-disperses
    torch.testing.assert_close(std, torch.full((2,), SD), atol=0.02 if learn_sigma else 0.08, rtol=0)
    if not learn_sigma:
        large = create_diffusion("50", schedule="linear", learn_sigma=False, fixed_variance="large")
        x_large = large.p_sample_loop(model, (3000, 2, 3), generator=torch.Generator().manual_seed(1))
        assert (std < SD).all() and (x_large.std(dim=(0, 2)) > SD).all()
    cold = chain.p_sample_loop(model, (3000, 2, 3), generator=torch.Generator().manual_seed(1), temperature=0.5)
    assert (cold.std(dim=(0, 2)) < std - 0.05).all()
    torch.testing.assert_close(cold.mean(dim=(0, 2)), MU.flatten(), atol=0.03, rtol=0)


def test_p_sample_loop_is_seeded_and_takes_noise():
    chain = create_diffusion("10")
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1])  # noqa: E731
    a = chain.p_sample_loop(model, (4, 3), generator=torch.Generator().manual_seed(3))
    b = chain.p_sample_loop(model, (4, 3), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    other = chain.p_sample_loop(model, (4, 3), generator=torch.Generator().manual_seed(4))
    assert (other - a).abs().min() > 1e-4  # another seed: other draws in every entry
    # given x_T, the generator only feeds the per-step noise: with temperature 0 it no longer matters,
    # while x_T still does
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    c = chain.p_sample_loop(model, (4, 3), noise=noise, temperature=0.0, generator=torch.Generator().manual_seed(3))
    d = chain.p_sample_loop(model, (4, 3), noise=noise, temperature=0.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(c, d)
    e = chain.p_sample_loop(model, (4, 3), noise=noise + 1.0, temperature=0.0)
    assert (e - c).abs().min() > 1e-4
    warm = chain.p_sample_loop(model, (4, 3), noise=noise, generator=torch.Generator().manual_seed(3))
    assert (warm - c).abs().min() > 1e-4  # temperature 1: the per-step noise moves every entry


# ---------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------
def _gaussian_velocity(mu, s):
    """E[x1 - x0 | x_t = x] for x1 ~ N(mu, s^2), x0 ~ N(0, 1): linear in x."""

    def v(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        var = t ** 2 * s ** 2 + (1 - t) ** 2
        return mu + (t * s ** 2 - (1 - t)) / var * (x - t * mu)

    return v


def test_ode_samplers_transport_noise_to_gaussian_data(gen):
    mu, s = 1.5, 0.4
    v = _gaussian_velocity(mu, s)
    x0 = torch.randn(2000, 2, dtype=torch.float64, generator=gen)
    exact = mu + s * x0  # the flow of a Gaussian is affine: x_1 = mu + s x_0, sample by sample
    errors = {}
    for method, steps in [("euler", 10), ("heun", 10), ("euler", 500)]:
        x, nfe = ode_sample(v, x0, steps=steps, method=method, return_nfe=True)
        assert nfe == steps * (2 if method == "heun" else 1)
        errors[(method, steps)] = (x - exact).abs().max().item()
    assert errors[("heun", 10)] < errors[("euler", 10)] / 5  # second order beats first order
    assert errors[("euler", 500)] < 5e-3
    x, nfe = ode_sample(v, x0, method="dopri5", atol=1e-6, rtol=1e-3, return_nfe=True)
    # SiT's tolerances: a global error of the order of rtol in ~30 evaluations (5 steps of 6 + start)
    assert (x - exact).pow(2).mean().sqrt().item() < 3e-3 and nfe < 60, nfe
    x_tight, nfe_tight = ode_sample(v, x0, method="dopri5", atol=1e-10, rtol=1e-8, return_nfe=True)
    assert (x_tight - exact).abs().max().item() < 1e-7 and nfe < nfe_tight < 300, nfe_tight
    assert x.mean().item() == pytest.approx(mu, abs=0.03) and x.std().item() == pytest.approx(s, abs=0.02)
    # shifted grid (LightningDiT) still lands on the data; and a partial interval stops where asked
    xs = ode_sample(v, x0, steps=50, method="heun", shift=0.3)
    assert (xs - exact).abs().max().item() < 1e-3
    half = ode_sample(v, x0, steps=200, method="heun", t_end=0.5)
    torch.testing.assert_close(half, 0.5 * mu + math.sqrt(0.25 * s ** 2 + 0.25) * x0, atol=1e-5, rtol=0)


def test_time_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.3, 1.0, 3.0):
        ts = time_shift(t, shift)
        assert ts[0] == 0 and ts[-1] == pytest.approx(1.0) and (ts.diff() > 0).all()
    assert time_shift(0.5, 0.3) == pytest.approx(0.15 / 0.65)
    assert (time_shift(t, 0.3)[1:-1] < t[1:-1]).all()  # shift < 1 pushes the grid toward noise (t = 0)
    assert time_shift(t, None) is t
    with pytest.raises(ValueError):
        time_shift(t, 0.0)


def test_training_loss_exact_velocity_and_cosine(gen):
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x1 = c.expand(64, 3).clone()  # point mass at c: u = (c - x_t) / (1 - t)
    exact = lambda x, t: (c - x) / (1 - t).view(-1, 1)  # noqa: E731
    out = Transport().training_loss(exact, x1, generator=gen)
    assert set(out) == {"loss", "mse", "cos"} and out["mse"].shape == (64,)
    assert out["mse"].max() < 1e-12 and out["cos"].abs().max() < 1e-9
    # the cosine loss: 0 for the target velocity, positive otherwise, added only when asked
    x1 = torch.randn(16, 4, 3, 3, generator=gen)
    noise = torch.randn(16, 4, 3, 3, generator=gen)
    tr = Transport(use_cosine_loss=True)
    out = tr.training_loss(lambda x, t: x1 - noise, x1, noise=noise, generator=gen)
    assert out["cos"].abs().max() < 1e-6 and out["loss"].abs().max() < 1e-6
    out = tr.training_loss(lambda x, t: x, x1, noise=noise, generator=gen)
    assert (out["cos"] > 0).all()
    torch.testing.assert_close(out["loss"], out["mse"] + out["cos"])
    out = Transport().training_loss(lambda x, t: x, x1, noise=noise, generator=gen)
    torch.testing.assert_close(out["loss"], out["mse"])
    # t is passed to the model as given, x_t = t x1 + (1 - t) x0
    t = torch.tensor([0.0, 0.25, 1.0]).repeat(6)[:16]
    got = {}
    Transport().training_loss(lambda x, tt: got.setdefault("x", x) * 0, x1, noise=noise, t=t)
    torch.testing.assert_close(got["x"], t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * noise)


def test_t_distributions(gen):
    t = Transport(t_dist="uniform").sample_t(20000, gen)
    assert t.min() >= 0 and t.max() <= 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)
    t = Transport(t_dist="logit_normal", logit_mean=0.8, logit_std=1.0).sample_t(20000, gen)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.8, abs=0.03) and logit.std().item() == pytest.approx(1.0, abs=0.03)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.8)), abs=0.01)
    with pytest.raises(ValueError):
        Transport(t_dist="beta")


@pytest.mark.parametrize("form", ["sigma", "SBDM"])
def test_sde_sampler_reaches_gaussian_data(form):
    mu, s = -1.0, 0.6
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4000, 2, generator=g)
    x = sde_sample(_gaussian_velocity(mu, s), x0, steps=250, generator=g, diffusion_form=form)
    assert x.mean().item() == pytest.approx(mu, abs=0.05)
    assert x.std().item() == pytest.approx(s, abs=0.05)
    # the noise is seeded: same generator state, same samples; another seed, other samples
    a = sde_sample(_gaussian_velocity(mu, s), x0[:8], steps=20, generator=torch.Generator().manual_seed(5))
    b = sde_sample(_gaussian_velocity(mu, s), x0[:8], steps=20, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    c = sde_sample(_gaussian_velocity(mu, s), x0[:8], steps=20, generator=torch.Generator().manual_seed(6))
    assert (c - a).abs().min() > 1e-4


# ---------------------------------------------------------------------------------------------
# DiffLoss
# ---------------------------------------------------------------------------------------------
def _mar_keys(depth, width, c, zc):
    """Key names and shapes of LTH14/mar models/diffloss.py DiffLoss (state dict of DiffLoss)."""
    keys = {
        "net.time_embed.mlp.0.weight": (width, 256), "net.time_embed.mlp.0.bias": (width,),
        "net.time_embed.mlp.2.weight": (width, width), "net.time_embed.mlp.2.bias": (width,),
        "net.cond_embed.weight": (width, zc), "net.cond_embed.bias": (width,),
        "net.input_proj.weight": (width, c), "net.input_proj.bias": (width,),
        "net.final_layer.linear.weight": (2 * c, width), "net.final_layer.linear.bias": (2 * c,),
        "net.final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "net.final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    for i in range(depth):
        p = f"net.res_blocks.{i}."
        keys.update({p + "in_ln.weight": (width,), p + "in_ln.bias": (width,),
                     p + "mlp.0.weight": (width, width), p + "mlp.0.bias": (width,),
                     p + "mlp.2.weight": (width, width), p + "mlp.2.bias": (width,),
                     p + "adaLN_modulation.1.weight": (3 * width, width), p + "adaLN_modulation.1.bias": (3 * width,)})
    return keys


def test_diffloss_state_dict_matches_mar_layout():
    d = DiffLoss(16, 48, depth=3, width=32)
    sd = d.state_dict()
    keys = _mar_keys(3, 32, 16, 48)
    assert {k: tuple(v.shape) for k, v in sd.items()} == keys
    d.load_state_dict({k: torch.randn(s) for k, s in keys.items()}, strict=True)
    # adaLN-zero: a fresh net outputs exactly 0
    fresh = SimpleMLPAdaLN(4, 32, 8, 6, 2)
    assert fresh(torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.randn(3, 6)).abs().max() == 0


def test_diffloss_forward_batch_mul_and_mask(gen):
    d = DiffLoss(4, 6, depth=2, width=32, batch_mul=3)
    torch.nn.init.normal_(d.net.final_layer.linear.weight, std=0.1)  # a non-trivial output
    target, z = torch.randn(5, 4, generator=gen), torch.randn(5, 6, generator=gen)
    seen = {}
    h = d.net.register_forward_pre_hook(lambda m, args, kw: seen.update(x=args[0], c=kw["c"]), with_kwargs=True)
    loss = d(target, z, generator=torch.Generator().manual_seed(0))
    h.remove()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert seen["x"].shape == (15, 4)
    torch.testing.assert_close(seen["c"], z.repeat(3, 1))  # tiled, as MAR's diffusion_batch_mul
    rows = d.row_losses(target, z, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (15,)
    torch.testing.assert_close(loss, rows.mean())
    # the generator draws the timesteps and noise: another seed gives other row losses
    other = d.row_losses(target, z, generator=torch.Generator().manual_seed(1))
    assert (other - rows).abs().min() > 1e-6
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    masked = d(target, z, mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(masked, rows[mask.repeat(3).bool()].mean())
    # rows with mask 0 do not count at all, whatever their target
    junk = target.clone()
    junk[mask == 0] = 1e3
    torch.testing.assert_close(d(junk, z, mask, generator=torch.Generator().manual_seed(0)), masked)
    with pytest.raises(ValueError, match="target"):
        d(torch.randn(5, 3), z)


def test_diffloss_grad_checkpointing_matches(gen):
    a = DiffLoss(4, 6, depth=2, width=32)
    b = DiffLoss(4, 6, depth=2, width=32, grad_checkpointing=True)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b.load_state_dict(a.state_dict())
    target, z = torch.randn(8, 4, generator=gen), torch.randn(8, 6, generator=gen)
    la = a(target, z, generator=torch.Generator().manual_seed(1))
    lb = b(target, z, generator=torch.Generator().manual_seed(1))
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    with torch.no_grad():  # the equality is not that of a loss that ignores its draws
        assert (b(target, z, generator=torch.Generator().manual_seed(2)) - lb).abs() > 1e-6
    torch.testing.assert_close(a.net.input_proj.weight.grad, b.net.input_proj.weight.grad)


def test_diffloss_learns_a_conditional_toy_problem():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, generator=g)
    d = DiffLoss(2, 4, depth=2, width=32, batch_mul=2)
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)

    def batch():
        z = torch.randn(64, 4, generator=g)
        return torch.tanh(z @ w), z

    eval_t, eval_z = batch()
    evaluate = lambda: d(eval_t, eval_z, generator=torch.Generator().manual_seed(9)).item()  # noqa: E731
    before = evaluate()
    for _ in range(100):
        target, z = batch()
        loss = d(target, z, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.5 * before, (before, after)  # ~1.0 -> ~0.1


def test_diffloss_sample_and_cfg(gen):
    d = DiffLoss(3, 5, depth=2, width=32, num_sampling_steps="20")
    for p in d.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    z = torch.randn(6, 5, generator=gen)
    x = d.sample(z, generator=torch.Generator().manual_seed(4))
    assert x.shape == (6, 3) and torch.isfinite(x).all()
    # cfg == 1 is the plain ancestral loop of the sampling diffusion
    ref = d.gen_diffusion.p_sample_loop(d.net, (6, 3), model_kwargs=dict(c=z), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x, ref)
    assert (d.sample(z, generator=torch.Generator().manual_seed(5)) - x).abs().min() > 1e-4  # another seed
    # cfg != 1: [cond; uncond] in, equal halves out
    uncond = torch.randn(6, 5, generator=gen)
    y = d.sample(torch.cat([z, uncond]), guidance_scale=3.0, temperature=0.9, generator=torch.Generator().manual_seed(4))
    assert y.shape == (12, 3)
    torch.testing.assert_close(y[:6], y[6:])
    assert not torch.allclose(y[:6], d.sample(z, temperature=0.9, generator=torch.Generator().manual_seed(4)))
    # with cond == uncond guidance changes nothing: the same draws give the plain samples
    same = d.sample(torch.cat([z, z]), guidance_scale=3.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(same[:6], x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        d.sample(z[:5], guidance_scale=2.0)

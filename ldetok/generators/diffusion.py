"""Gaussian diffusion (DDPM) with epsilon prediction and a learned-range variance, plus respacing.

What DiT, MAR's DiffLoss and the l-DeTok generators train with:

- schedules: ADM's scaled linear betas and the Nichol & Dhariwal cosine schedule (float64 numpy);
- the model sees ``x_t`` (B, C, *spatial) and the *original* step ``t`` in [0, T) and returns
  ``2C`` channels along dim 1 when ``learn_sigma``: eps, then ``v`` in [-1, 1] that interpolates
  the log variance between the clipped posterior variance (v = -1) and beta_t (v = +1);
- the IDDPM hybrid loss: MSE on eps + the variational bound (bits/dim) computed on a detached mean,
  so the VB gradient only reaches the variance channels;
- ancestral sampling with a ``temperature`` on the per-step noise (MAR's DiffLoss convention);
- respacing: a diffusion over a subset of steps whose betas are recomputed from the kept
  alphas_cumprod, with indices mapped back to the original steps for the model.

References: Ho et al. 2020 (DDPM); Nichol & Dhariwal 2021 (IDDPM: cosine schedule, learned range,
hybrid loss, respacing); Dhariwal & Nichol 2021 (ADM); openai/improved-diffusion, facebookresearch/DiT
``diffusion/``, LTH14/mar ``diffusion/`` (temperature).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .base import randn

__all__ = [
    "get_betas",
    "space_timesteps",
    "create_diffusion",
    "GaussianDiffusion",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]

SCHEDULES = ("linear", "cosine")


# ---------------------------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------------------------
def get_betas(schedule: str = "linear", num_timesteps: int = 1000) -> np.ndarray:
    """Betas (T,) float64.

    ``linear``: ADM's scaled linear schedule, beta from 1e-4 * 1000/T to 0.02 * 1000/T, so that any T
    gives the same overall noise as DDPM's T = 1000. ``cosine``: alpha_bar(t) = cos^2((t/T + s)/(1 + s)
    * pi/2) with s = 0.008, betas = 1 - alpha_bar(i+1)/alpha_bar(i) clipped at 0.999 (the last step
    would otherwise be exactly 1).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps, dtype=np.float64)
        return np.array([min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in steps], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {SCHEDULES}")


def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> set:
    """The original steps to keep (ADM semantics).

    ``section_counts`` is an int, a comma list (``"10,15,20"``: split [0, T) into equal sections and
    take that many evenly strided steps in each, endpoints included) or ``"ddimN"`` (the integer
    stride that gives exactly N steps, as DDIM does). ``"100"`` with T = 1000 keeps 0, 10, 20, ..., 999.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",") if x.strip()]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return set(kept)


def create_diffusion(
    timestep_respacing: Union[None, int, str, Sequence[int]] = None,
    schedule: str = "linear",
    learn_sigma: bool = True,
    num_timesteps: int = 1000,
    fixed_variance: str = "small",
) -> "GaussianDiffusion":
    """A diffusion over ``num_timesteps`` steps, respaced when ``timestep_respacing`` is given.

    ``None``/``""`` keeps every step (DiT/MAR training); ``"100"`` is MAR/DiT's sampling default.
    The model always sees the original step in [0, num_timesteps).
    """
    betas = get_betas(schedule, num_timesteps)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, fixed_variance=fixed_variance)
    keep = sorted(space_timesteps(num_timesteps, timestep_respacing))
    alphas_cumprod = np.cumprod(1.0 - betas)
    # why: the respaced chain must have the same marginals q(x_t | x_0) at the kept steps, so its
    # betas come from ratios of consecutive kept alphas_cumprod, not from the original betas.
    prev = np.concatenate([[1.0], alphas_cumprod[keep[:-1]]])
    new_betas = 1.0 - alphas_cumprod[keep] / prev
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, timestep_map=keep, fixed_variance=fixed_variance)


# ---------------------------------------------------------------------------------------------
# Small math helpers
# ---------------------------------------------------------------------------------------------
def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of a Gaussian discretised into 256 bins over [-1, 1] (DDPM's decoder), elementwise.

    The ADM code uses a tanh approximation of the normal CDF; we use the exact CDF (``ndtr``), which
    changes the t = 0 term only in its last digits.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins absorb all the mass beyond [-1, 1]
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------------------------------------
# Gaussian diffusion
# ---------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """DDPM with epsilon prediction; learned-range variance when ``learn_sigma``.

    ``betas``: (T,) for this chain (already respaced when ``timestep_map`` is given).
    ``timestep_map``: for a respaced chain, the original step of each of its T steps; the model is
    called with ``timestep_map[t]``. ``fixed_variance`` ("small" = posterior variance, "large" = betas)
    is used only without ``learn_sigma``. Indices ``t`` passed to the methods are this chain's indices.
    """

    def __init__(self, betas, learn_sigma: bool = True, timestep_map: Optional[Iterable[int]] = None,
                 fixed_variance: str = "small"):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        if fixed_variance not in ("small", "large"):
            raise ValueError(f"fixed_variance must be 'small' or 'large', got {fixed_variance!r}")
        self.learn_sigma = bool(learn_sigma)
        self.fixed_variance = fixed_variance
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(list(timestep_map))
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map must have {self.num_timesteps} entries, got {self.timestep_map.shape}")

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # why: the posterior variance is 0 at t = 0, so its log is clipped to the t = 1 value
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        # FIXED_LARGE: betas, with the first entry replaced so the t = 0 decoder is not degenerate
        self.log_large_variance = np.log(np.append(pv1, betas[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._cache: Dict[tuple, torch.Tensor] = {}

    # -- indexing -------------------------------------------------------------------------------
    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Schedule entry ``name`` at indices t (B,), shaped (B, 1, ..., 1) to broadcast over x."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (name, x.device, dtype)
        table = self._cache.get(key)
        if table is None:  # why: one host->device copy per table, not one per step (and no float64 on MPS)
            table = torch.as_tensor(getattr(self, name), dtype=dtype, device=x.device)
            self._cache[key] = table
        return table[t.to(x.device).long()].reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """This chain's indices -> the original steps the model was trained on."""
        key = ("timestep_map", t.device, torch.long)
        table = self._cache.get(key)
        if table is None:
            table = torch.as_tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._cache[key] = table
        return table[t.long()]

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, xt) * x0 + self._extract("posterior_mean_coef2", t, xt) * xt
        var = self._extract("posterior_variance", t, xt).expand_as(xt)
        log_var = self._extract("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, var, log_var

    # -- reverse process ------------------------------------------------------------------------
    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - self._extract("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def _split_output(self, out: torch.Tensor, x: torch.Tensor):
        """Model output -> (eps, v or None), checking the channel count along dim 1."""
        c = x.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if out.shape != (x.shape[0], expected, *x.shape[2:]):
            raise ValueError(f"model output must have shape {(x.shape[0], expected, *x.shape[2:])} "
                             f"({'eps and v' if self.learn_sigma else 'eps'} along dim 1), got {tuple(out.shape)}")
        if self.learn_sigma:
            return out[:, :c], out[:, c:]
        return out, None

    def _log_variance(self, v: Optional[torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """LEARNED_RANGE: v in [-1, 1] interpolates log posterior variance (-1) and log beta (+1)."""
        if v is None:
            if self.fixed_variance == "small":
                return self._extract("posterior_log_variance_clipped", t, x).expand_as(x)
            return self._extract("log_large_variance", t, x).expand_as(x)
        min_log = self._extract("posterior_log_variance_clipped", t, x)
        max_log = torch.log(self._extract("betas", t, x))
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model_fn: Callable, x: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None, clip_denoised: bool = False,
                        model_output: Optional[torch.Tensor] = None) -> dict:
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, eps).

        ``model_output`` skips the model call (the hybrid loss re-uses a detached output).
        """
        if model_output is None:
            model_output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self._split_output(model_output, x)
        log_var = self._log_variance(v, x, t)
        pred_x0 = self.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t)
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var,
                "pred_xstart": pred_x0, "eps": eps}

    # -- training -------------------------------------------------------------------------------
    def _vb_bits(self, x0, xt, t, out: dict) -> torch.Tensor:
        """One VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: Callable, x0: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None, noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Hybrid loss per sample: dict(loss=(B,), mse=(B,), vb=(B,)).

        mse: eps MSE averaged over non-batch dims. vb (learn_sigma only, else zeros): the VLB term
        in bits/dim with the mean channels detached, times T/1000 (IDDPM's rescaling; 1 for T = 1000,
        the only case DiT/MAR train, so it matches their unscaled VB there).
        """
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self._split_output(out, xt)
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            # why: the VB term trains the variance only; the mean is trained by the simple MSE
            frozen = torch.cat([eps.detach(), v], dim=1)
            p = self.p_mean_variance(None, xt, t, model_output=frozen)
            vb = self._vb_bits(x0, xt, t, p) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling -------------------------------------------------------------------------------
    def p_sample(self, model_fn: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict] = None,
                 temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                 clip_denoised: bool = False, noise: Optional[torch.Tensor] = None) -> dict:
        """One ancestral step x_t -> x_{t-1}; ``temperature`` scales the added noise (MAR DiffLoss).

        No noise is added where t == 0. Returns dict(sample, pred_xstart).
        """
        out = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised=clip_denoised)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        if noise is None:
            noise = randn(x.shape, generator, x.device, x.dtype) if bool((t != 0).any()) else torch.zeros_like(x)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model_fn: Callable, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
                      model_kwargs: Optional[dict] = None, temperature: float = 1.0,
                      generator: Optional[torch.Generator] = None, clip_denoised: bool = False,
                      device=None) -> torch.Tensor:
        """Ancestral sampling from x_T = ``noise`` (or N(0, I) drawn with ``generator``) down to x_0.

        ``temperature`` scales each step's noise, not the initial x_T (as MAR does). Tensors live on
        ``noise.device``, else ``device``, else the generator's device, else CPU.
        """
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            x = noise
        else:
            device = torch.device(device) if device is not None else (generator.device if generator is not None
                                                                       else torch.device("cpu"))
            x = randn(shape, generator, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            x = self.p_sample(model_fn, x, t, model_kwargs, temperature=temperature, generator=generator,
                              clip_denoised=clip_denoised)["sample"]
        return x

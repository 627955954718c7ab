"""Flow matching with the linear interpolant (SiT / LightningDiT transport) and its samplers.

Convention (as in SiT and the official l-DeTok code): **t = 0 is noise, t = 1 is data**,
x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I), and the model predicts the velocity u = x1 - x0:
``model_fn(x_t, t, **kw) -> v`` with t a float tensor (B,) in [0, 1] and v shaped like x_t.

- ``Transport``: t ~ U(0, 1) (SiT) or logit-normal (LightningDiT), MSE on the velocity, optional
  cosine loss 1 - cos(v, u) along the channel dim, averaged over positions (LightningDiT's
  ``mean_flat(1 - cosine_similarity(v, u, dim=1))``; the official l-DeTok port computes it and drops it).
- ``time_shift``: LightningDiT's grid warp t -> s t / (1 + (s - 1) t); s < 1 packs steps near noise.
- ``ode_sample``: Euler, Heun (explicit trapezoid) or adaptive Dormand-Prince 5(4) (SiT default,
  atol 1e-6, rtol 1e-3), written here without torchdiffeq.
- ``sde_sample``: Euler-Maruyama for dx = [v + w(t) s(x, t)] dt + sqrt(2 w(t)) dW, whose marginals are
  those of the interpolant, with s(x, t) = (t v - x) / (1 - t) the score implied by the velocity.

References: Ma et al. 2024, "SiT" (willisma/SiT ``transport/``); Yao et al. 2025, "Reconstruction vs.
Generation" (LightningDiT, hustvl/LightningDiT ``transport/``); Lipman et al. 2023; Liu et al. 2023;
Dormand & Prince 1980; Hairer, Norsett & Wanner, "Solving ODEs I", II.4 (step size control).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["Transport", "time_shift", "ode_sample", "sde_sample", "T_DISTS", "ODE_METHODS"]

T_DISTS = ("uniform", "logit_normal")
ODE_METHODS = ("euler", "heun", "dopri5")


def _gen_device(generator: Optional[torch.Generator], fallback) -> torch.device:
    return generator.device if generator is not None else torch.device(fallback if fallback is not None else "cpu")


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """N(0, I) like x, drawn on the generator's device then moved."""
    return torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device), dtype=x.dtype).to(x.device)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over x."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
class Transport:
    """Linear-interpolant flow matching with velocity prediction.

    ``eps`` keeps training times in [eps, 1 - eps] (t = eps + (1 - 2 eps) u), so nothing derived from
    the model (a score, an SDE drift) is ever fit exactly at the endpoints; 0 reproduces SiT exactly.
    """

    def __init__(self, t_dist: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 eps: float = 1e-5, use_cosine_loss: bool = False):
        if t_dist not in T_DISTS:
            raise ValueError(f"unknown t distribution {t_dist!r}; expected one of {T_DISTS}")
        if t_dist == "logit_normal" and logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")
        self.t_dist, self.logit_mean, self.logit_std = t_dist, float(logit_mean), float(logit_std)
        self.eps, self.use_cosine_loss = float(eps), bool(use_cosine_loss)

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Training times (n,) in [eps, 1 - eps]; logit-normal: sigmoid(N(logit_mean, logit_std^2))."""
        dev = _gen_device(generator, device)
        if self.t_dist == "uniform":
            u = torch.rand((n,), generator=generator, device=dev)
        else:
            u = torch.sigmoid(torch.randn((n,), generator=generator, device=dev) * self.logit_std + self.logit_mean)
        t = self.eps + (1.0 - 2.0 * self.eps) * u
        return t.to(device) if device is not None else t

    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
        """x_t = t x1 + (1 - t) x0 and its velocity u = x1 - x0."""
        tb = _bcast(t, x1)
        return tb * x1 + (1 - tb) * x0, x1 - x0

    def training_loss(self, model_fn: Callable, x1: torch.Tensor, model_kwargs: Optional[dict] = None,
                      noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """dict(loss=(B,), mse=(B,), cos=(B,)); loss = mse (+ cos with ``use_cosine_loss``).

        ``cos`` is 1 - cosine similarity along dim 1 (channels), averaged over the remaining dims.
        """
        if noise is None:
            noise = _randn_like(x1, generator)
        if t is None:
            t = self.sample_t(x1.shape[0], generator, x1.device)
        t = t.to(device=x1.device, dtype=x1.dtype)
        xt, u = self.interpolate(noise, x1, t)
        v = model_fn(xt, t, **(model_kwargs or {}))
        if v.shape != x1.shape:
            raise ValueError(f"model output must have the input's shape {tuple(x1.shape)}, got {tuple(v.shape)}")
        mse = _mean_flat((v - u) ** 2)
        cos = _mean_flat(1.0 - F.cosine_similarity(v, u, dim=1)) if x1.ndim > 1 else torch.zeros_like(mse)
        loss = mse + cos if self.use_cosine_loss else mse
        return {"loss": loss, "mse": mse, "cos": cos}


# ---------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------
def time_shift(t: Union[float, torch.Tensor], shift: Optional[float]) -> Union[float, torch.Tensor]:
    """LightningDiT's timestep shift: t -> shift t / (1 + (shift - 1) t).

    Fixes 0 and 1 and is increasing for shift > 0. With shift < 1 (LightningDiT samples with 0.3) the
    grid is denser near t = 0, the noise end: 0.5 -> 0.15 / 0.65 = 0.23. ``None`` (and 1) is the
    identity; LightningDiT also treats shift <= 0 as "off", which we refuse instead.
    """
    if shift is None or shift == 1:
        return t
    if shift <= 0:
        raise ValueError(f"time shift must be > 0 (or None to disable), got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def _grid(steps: int, t_start: float, t_end: float, shift: Optional[float], device, dtype) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return time_shift(torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64), shift).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# ODE samplers
# ---------------------------------------------------------------------------------------------
class _Counted:
    """The velocity field as f(t_scalar, x), counting evaluations."""

    def __init__(self, model_fn: Callable, model_kwargs: Optional[dict]):
        self.model_fn, self.kwargs, self.nfe = model_fn, model_kwargs or {}, 0

    def __call__(self, t, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        return self.model_fn(x, tt, **self.kwargs)


def _fixed_grid(f: _Counted, x: torch.Tensor, grid: torch.Tensor, heun: bool) -> torch.Tensor:
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        dt = t1 - t0
        k1 = f(t0, x)
        if heun:  # explicit trapezoid: predictor Euler step, corrector averages the two slopes
            k2 = f(t1, x + dt * k1)
            x = x + 0.5 * dt * (k1 + k2)
        else:
            x = x + dt * k1
    return x


# Dormand-Prince 5(4) tableau: nodes C, stages A, 5th-order weights B5 (= the last stage row, so the
# method is FSAL: the last stage is the next step's first) and the 4th-order embedded weights B4.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))


def _rms(x: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(x.float() ** 2)))  # float32: MPS has no float64


def _initial_step(f: _Counted, t0: float, x0: torch.Tensor, k0: torch.Tensor, direction: float,
                  atol: float, rtol: float) -> float:
    """Hairer's starting step: h = 0.01 d0/d1, refined by a second derivative estimate (order 5)."""
    scale = atol + rtol * x0.abs()
    d0, d1 = _rms(x0 / scale), _rms(k0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    k1 = f(t0 + direction * h0, x0 + direction * h0 * k0)
    d2 = _rms((k1 - k0) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def _dopri5(f: _Counted, x: torch.Tensor, t0: float, t1: float, atol: float, rtol: float,
            safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 10.0,
            max_steps: int = 100_000) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) from t0 to t1, returning x(t1) (local extrapolation, FSAL).

    Error control as in Hairer II.4 / torchdiffeq: err = RMS(e / (atol + rtol max(|x|, |x_new|))) over
    every element of the batch; accept when err <= 1; the next step is h * clip(safety err^(-1/5)).
    """
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    if span == 0:
        return x
    t, k = t0, f(t0, x)
    h = min(_initial_step(f, t0, x, k, direction, atol, rtol), span)
    for _ in range(max_steps):
        if abs(t1 - t) <= 1e-12 * max(1.0, span):
            return x
        h = min(h, abs(t1 - t))
        dt = direction * h
        ks = [k]
        for i in range(1, 7):
            xi = x + dt * sum(a * kj for a, kj in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(f(t + _DP_C[i] * dt, xi))
        x_new = x + dt * sum(b * kj for b, kj in zip(_DP_B5, ks) if b != 0.0)
        err_vec = dt * sum(e * kj for e, kj in zip(_DP_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err = _rms(err_vec / scale)
        if err <= 1.0:  # accept
            t = t + dt if abs(t1 - (t + dt)) > 1e-12 * max(1.0, span) else t1
            x, k = x_new, ks[6]  # FSAL: f(t + dt, x_new) is the 7th stage
        factor = max_factor if err == 0 else min(max_factor, max(min_factor, safety * err ** (-1 / 5)))
        h = h * factor
    raise RuntimeError(f"dopri5 did not reach t = {t1} within {max_steps} steps (stopped at t = {t})")


@torch.no_grad()
def ode_sample(model_fn: Callable, x0: torch.Tensor, steps: int = 50, method: str = "euler",
               shift: Optional[float] = None, model_kwargs: Optional[dict] = None, atol: float = 1e-6,
               rtol: float = 1e-3, t_start: float = 0.0, t_end: float = 1.0, return_nfe: bool = False):
    """Integrate dx/dt = v(x, t) from ``x0`` at ``t_start`` (noise) to ``t_end`` (data).

    euler / heun: ``steps`` steps on linspace(t_start, t_end, steps + 1), warped by ``time_shift``
    (LightningDiT: euler, shift 0.3). dopri5: adaptive (``steps`` and ``shift`` unused; SiT only uses
    its step count for the output grid). Returns x at t_end, or (x, nfe) with ``return_nfe``.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {ODE_METHODS}")
    f = _Counted(model_fn, model_kwargs)
    if method == "dopri5":
        x = _dopri5(f, x0, float(t_start), float(t_end), atol, rtol)
    else:
        x = _fixed_grid(f, x0, _grid(steps, t_start, t_end, shift, "cpu", torch.float64), heun=method == "heun")
    return (x, f.nfe) if return_nfe else x


# ---------------------------------------------------------------------------------------------
# SDE sampler
# ---------------------------------------------------------------------------------------------
def _w_times_score(v: torch.Tensor, x: torch.Tensor, t: float, form: str, norm: float) -> torch.Tensor:
    """w(t) s(x, t) with s = (t v - x) / (1 - t), simplified so nothing divides by 1 - t.

    "sigma": w = norm (1 - t) (SiT's "sigma" and "linear" forms coincide on this path), so w s =
    norm (t v - x), finite on all of [0, 1]. "SBDM": w = norm (1 - t) / t (SiT's default, the
    diffusion that matches score-based models), so w s = norm (t v - x) / t, singular at t = 0.
    """
    if form == "sigma":
        return norm * (t * v - x)
    return norm * (t * v - x) / t


def _w(t: float, form: str, norm: float) -> float:
    return norm * (1 - t) if form == "sigma" else norm * (1 - t) / t


@torch.no_grad()
def sde_sample(model_fn: Callable, x0: torch.Tensor, steps: int = 250, diffusion_norm: float = 1.0,
               last_step: Optional[str] = "Mean", generator: Optional[torch.Generator] = None,
               model_kwargs: Optional[dict] = None, diffusion_form: str = "sigma",
               t_start: Optional[float] = None) -> torch.Tensor:
    """Euler-Maruyama from noise ``x0`` to data for dx = [v + w s] dt + sqrt(2 w) dW.

    The grid is linspace(t_start, 1, steps + 1). The first ``steps - 1`` steps are stochastic; the last
    is deterministic: "Mean" (the SDE drift without noise, SiT's default), "Euler" (the ODE drift v) or
    None (one more stochastic step). SiT's last step has a fixed size 0.04; ours is one grid step.
    ``diffusion_form``: "sigma" (default, w = norm (1 - t), t_start 0) or "SBDM" (w = norm (1 - t)/t,
    t_start defaults to 1e-3 because w blows up at t = 0).
    """
    if diffusion_form not in ("sigma", "SBDM"):
        raise ValueError(f"diffusion_form must be 'sigma' or 'SBDM', got {diffusion_form!r}")
    if last_step not in ("Mean", "Euler", None):
        raise ValueError(f"last_step must be 'Mean', 'Euler' or None, got {last_step!r}")
    if t_start is None:
        t_start = 0.0 if diffusion_form == "sigma" else 1e-3
    if diffusion_form == "SBDM" and t_start <= 0:
        raise ValueError("the SBDM diffusion is infinite at t = 0; use t_start > 0")
    grid = _grid(steps, t_start, 1.0, None, "cpu", torch.float64).tolist()
    kw = model_kwargs or {}
    x = x0
    for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t1 - t0
        tt = torch.full((x.shape[0],), t0, device=x.device, dtype=x.dtype)
        v = model_fn(x, tt, **kw)
        if i == steps - 1 and last_step == "Euler":
            x = x + v * dt
            continue
        x = x + (v + _w_times_score(v, x, t0, diffusion_form, diffusion_norm)) * dt
        if i < steps - 1 or last_step is None:
            x = x + math.sqrt(2 * _w(t0, diffusion_form, diffusion_norm) * dt) * _randn_like(x, generator)
    return x

"""Gaussian diffusion math on Jittor tensors: forward noising, posterior, and the model's p(x_{t-1}|x_t).

Every function takes the schedule first and a timestep ``t`` that indexes the schedule's arrays:

* a Python ``int`` when the whole batch shares it (samplers): coefficients are read as Python
  floats, no gather kernel;
* a Jittor integer Var of shape [B] when it is per sample (training): coefficients are gathered
  from a float32 copy of the array and shaped [B, 1, 1, 1].

Tensors are float32 [B, C, H, W]. The network output is eps [B, C, H, W] (fixed variance) or eps
and v stacked as [B, 2C, H, W] (learned-range variance, Nichol & Dhariwal 2021 eq. 15:
log Sigma = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2). Formulas and
names follow guided-diffusion's ``GaussianDiffusion`` with ``ModelMeanType.EPSILON``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import numpy as np

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt

from .schedule import Schedule

Timestep = Union[int, jt.Var]
# model_fn(x_t float32 [B, C, H, W], t int32 [B] training timesteps) -> [B, C or 2C, H, W]
ModelFn = Callable[[jt.Var, jt.Var], jt.Var]
Coefficient = Union[float, jt.Var]
FIXED_VARIANCES = ("large", "small")


def coefficient(schedule: Schedule, name: str, t: Timestep, ndim: int = 4) -> Coefficient:
    """``schedule.<name>[t]``: a Python float for an int ``t``, a float32 Var [B, 1, ..] for a Var."""
    return _gather(getattr(schedule, name), t, ndim, name)


def _gather(array: np.ndarray, t: Timestep, ndim: int, name: str) -> Coefficient:
    if isinstance(t, jt.Var):
        if t.ndim != 1:
            raise ValueError(f"per-sample timesteps must have shape [B], got {tuple(t.shape)}")
        table = jt.array(array.astype(np.float32)).stop_grad()
        return table[t.int32()].reshape([t.shape[0]] + [1] * (ndim - 1))
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"timestep must be an int or a Jittor int Var [B], got {type(t).__name__}")
    if not 0 <= t < array.shape[0]:
        raise ValueError(f"timestep {t} is outside [0, {array.shape[0]}) for {name}")
    return float(array[int(t)])


def exp(value: Coefficient) -> Coefficient:
    """exp of a coefficient (Python float or Var)."""
    return jt.exp(value) if isinstance(value, jt.Var) else math.exp(value)


def _check_same_shape(**tensors) -> None:
    shapes = {name: tuple(v.shape) for name, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"tensors must have the same shape, got {shapes}")


def q_sample(schedule: Schedule, x_start: jt.Var, t: Timestep, noise: jt.Var) -> jt.Var:
    """Sample q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4)."""
    _check_same_shape(x_start=x_start, noise=noise)
    return (coefficient(schedule, "sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + coefficient(schedule, "sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)


def q_posterior_mean_variance(schedule: Schedule, x_start: jt.Var, x_t: jt.Var, t: Timestep):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7).

    The mean is a tensor like ``x_t``; variance and log variance are coefficients (float or
    [B, 1, 1, 1]).
    """
    _check_same_shape(x_start=x_start, x_t=x_t)
    n = x_t.ndim
    mean = (coefficient(schedule, "posterior_mean_coef1", t, n) * x_start
            + coefficient(schedule, "posterior_mean_coef2", t, n) * x_t)
    return (mean, coefficient(schedule, "posterior_variance", t, n),
            coefficient(schedule, "posterior_log_variance_clipped", t, n))


def predict_xstart_from_eps(schedule: Schedule, x_t: jt.Var, t: Timestep, eps: jt.Var) -> jt.Var:
    """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
    _check_same_shape(x_t=x_t, eps=eps)
    return (coefficient(schedule, "sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - coefficient(schedule, "sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)


def predict_eps_from_xstart(schedule: Schedule, x_t: jt.Var, t: Timestep, pred_xstart: jt.Var) -> jt.Var:
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
    _check_same_shape(x_t=x_t, pred_xstart=pred_xstart)
    return ((coefficient(schedule, "sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_xstart)
            / coefficient(schedule, "sqrt_recipm1_alphas_cumprod", t, x_t.ndim))


def split_model_output(model_output: jt.Var, x_t: jt.Var) -> tuple[jt.Var, jt.Var | None]:
    """(eps, v) from a [B, 2C, ..] output, (eps, None) from a [B, C, ..] one."""
    channels = x_t.shape[1]
    if tuple(model_output.shape[2:]) != tuple(x_t.shape[2:]) or model_output.shape[0] != x_t.shape[0]:
        raise ValueError(f"model output {tuple(model_output.shape)} does not match x_t "
                         f"{tuple(x_t.shape)} in batch or spatial size")
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    if model_output.shape[1] == channels:
        return model_output, None
    raise ValueError(f"model output has {model_output.shape[1]} channels; expected {channels} (eps) "
                     f"or {2 * channels} (eps and learned variance) for x_t {tuple(x_t.shape)}")


class PMeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, variance); ``pred_xstart`` is the model's x_0 estimate."""

    mean: jt.Var
    variance: Coefficient
    log_variance: Coefficient
    pred_xstart: jt.Var


def p_mean_variance(schedule: Schedule, model_output: jt.Var, x_t: jt.Var, t: Timestep,
                    clip_denoised: bool = False, fixed_variance: str = "large") -> PMeanVariance:
    """The reverse step p(x_{t-1} | x_t) from the network output (guided-diffusion ``p_mean_variance``).

    Learned range ([B, 2C] output): log variance = frac log beta_t + (1 - frac) log beta~_t
    (clipped), frac = (v + 1) / 2; a tensor like x_t. Fixed variance ([B, C] output): "large" is
    beta_t with beta~_1 at t = 0, "small" is beta~_t (guided-diffusion FIXED_LARGE / FIXED_SMALL);
    a coefficient. The mean is the posterior mean at x_0 = pred_xstart (from eps).

    ``clip_denoised`` clamps pred_xstart to [-1, 1], which only makes sense in pixel space: SDM
    samples pixels with it on; IIDM samples VQ latents (not bounded by 1) with it off, the default.
    """
    if fixed_variance not in FIXED_VARIANCES:
        raise ValueError(f"fixed_variance must be one of {FIXED_VARIANCES}, got {fixed_variance!r}")
    eps, v = split_model_output(model_output, x_t)
    n = x_t.ndim
    if v is not None:
        min_log = coefficient(schedule, "posterior_log_variance_clipped", t, n)
        max_log = coefficient(schedule, "log_betas", t, n)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jt.exp(log_variance)
    elif fixed_variance == "large":
        large = np.append(schedule.posterior_variance[1], schedule.betas[1:])
        variance = _gather(large, t, n, "fixed large variance")
        log_variance = _gather(np.log(large), t, n, "fixed large log variance")
    else:
        variance = coefficient(schedule, "posterior_variance", t, n)
        log_variance = coefficient(schedule, "posterior_log_variance_clipped", t, n)
    pred_xstart = predict_xstart_from_eps(schedule, x_t, t, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_xstart)


def model_timesteps(schedule: Schedule, t: Timestep, batch: int) -> jt.Var:
    """The int32 [B] training timesteps the network is called with for schedule index ``t``
    (guided-diffusion's ``_WrappedModel`` map; its ``rescale_timesteps`` is off in SDM and IIDM)."""
    if isinstance(t, jt.Var):
        if not schedule.is_respaced:
            return t.int32()
        return jt.array(schedule.timestep_map.astype(np.int32))[t.int32()]
    return jt.full((batch,), int(schedule.timestep_map[int(t)]), dtype="int32")

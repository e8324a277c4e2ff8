"""The hybrid loss of Improved DDPM (Nichol & Dhariwal 2021, eq. 16), as guided-diffusion computes it.

    L_hybrid = L_simple + L_vb,   L_simple = E |eps - eps_theta(x_t, t)|^2

L_vb trains only the variance head: the KL (t > 0) or the discretised decoder NLL (t = 0) is
evaluated with the model's eps detached (guided-diffusion's ``frozen_out``), in bits per dimension.
SDM and IIDM train with ``LossType.MSE`` (``use_kl`` and ``rescale_learned_sigmas`` both False),
so L_vb is added unscaled; ``loss_type="rescaled_mse"`` multiplies it by T/1000 (LossType.RESCALED_MSE,
improved-diffusion's default), which changes nothing at T = 1000.
"""

from __future__ import annotations

import math

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt

from .diffusion import (ModelFn, exp, model_timesteps, p_mean_variance, q_posterior_mean_variance,
                        q_sample, split_model_output)
from .schedule import Schedule

LOSS_TYPES = ("mse", "rescaled_mse")


def mean_flat(x: jt.Var) -> jt.Var:
    """Mean over all dimensions but the batch: [B, ...] -> [B]."""
    return x.reshape((x.shape[0], -1)).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats; arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * exp(-logvar2))


def approx_standard_normal_cdf(x: jt.Var) -> jt.Var:
    """The tanh approximation of the standard normal CDF used by Ho et al. and guided-diffusion."""
    return 0.5 * (1.0 + jt.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def discretized_gaussian_log_likelihood(x: jt.Var, means: jt.Var, log_scales) -> jt.Var:
    """log P(x) of N(means, e^(2 log_scales)) integrated over the 8-bit bin of width 2/255 around x
    (the edge bins extend to -inf / +inf), in nats, elementwise like ``x``.

    It assumes data in [-1, 1] quantised to 256 levels; guided-diffusion applies it unchanged to
    the t = 0 term of latent models (SDM, IIDM), and so do we.
    """
    centered_x = x - means
    inv_stdv = exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jt.log(jt.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jt.log(jt.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jt.log(jt.maximum(cdf_plus - cdf_min, 1e-12))
    return jt.ternary(x < -0.999, log_cdf_plus,
                      jt.ternary(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: Schedule, model_output: jt.Var, x_start: jt.Var, x_t: jt.Var,
                 t: jt.Var) -> jt.Var:
    """One term of the variational bound per sample, in bits per dimension, [B].

    L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
    -log p(x_0 | x_1) at t = 0 (Ho et al. eq. 5), with p from ``p_mean_variance`` (no clipping).
    ``t`` is a per-sample int Var [B] of schedule indices.
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x_start, x_t, t)
    out = p_mean_variance(schedule, model_output, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out.mean, log_scales=0.5 * out.log_variance)
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return jt.ternary(t == 0, decoder_nll, kl)


def training_losses(schedule: Schedule, model_fn: ModelFn, x_start: jt.Var, t: jt.Var,
                    noise: jt.Var, loss_type: str = "mse") -> dict[str, jt.Var]:
    """Per-sample loss terms for latents ``x_start`` [B, C, H, W] at timesteps ``t`` (int Var [B]).

    ``model_fn(x_t, t)`` gets int32 training timesteps and returns eps [B, C, ..] or eps and v
    [B, 2C, ..]. Returns float32 [B] Vars: "mse" (mean over C, H, W of (noise - eps)^2), "vb"
    (only with a learned variance; gradients reach v only) and "loss" = mse (+ vb).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(t, jt.Var) or tuple(t.shape) != (x_start.shape[0],):
        raise ValueError(f"t must be an int Var of shape [{x_start.shape[0]}] (one timestep per "
                         f"sample), got {getattr(t, 'shape', type(t).__name__)}")
    t_values = t.numpy()
    if t_values.min() < 0 or t_values.max() >= schedule.num_timesteps:
        raise ValueError(f"timesteps {t_values.tolist()} are outside [0, {schedule.num_timesteps})")
    x_t = q_sample(schedule, x_start, t, noise)
    model_output = model_fn(x_t, model_timesteps(schedule, t, x_start.shape[0]))
    eps, v = split_model_output(model_output, x_t)
    terms = {"mse": mean_flat((noise - eps) ** 2)}
    if v is not None:
        # The variance is learned through the bound, but the bound must not move the mean.
        frozen_out = jt.concat([eps.detach(), v], dim=1)
        vb = vb_terms_bpd(schedule, frozen_out, x_start, x_t, t)
        if loss_type == "rescaled_mse":
            vb = vb * (schedule.num_timesteps / 1000.0)
        terms["vb"] = vb
        terms["loss"] = terms["mse"] + vb
    else:
        terms["loss"] = terms["mse"]
    return terms


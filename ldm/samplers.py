"""Samplers as free functions of (model_fn, schedule, x, timesteps), and the image-to-image start.

Conventions shared by every sampler:

* ``model_fn(x_t, t)``: x_t float32 [B, C, H, W], t int32 [B] *training* timesteps; returns eps
  [B, C, H, W] or eps and v [B, 2C, H, W]. Conditioning (mask, guidance) is bound into it
  beforehand (``ldm.guidance.classifier_free_guidance``).
* ``schedule``: the training schedule (not respaced).
* ``timesteps``: strictly decreasing training timesteps. ``x`` is taken to be at the level of
  ``timesteps[0]``; the step at ``timesteps[i]`` moves it to the level of ``timesteps[i+1]`` and the
  step at the last one to clean data (abar = 1), so the result is the final x_0 prediction. This is
  what guided-diffusion's loops over a respaced schedule do (``ldm.respace``): e.g. DDIM over
  "ddim50" visits 980, 960, ..., 0. One network call per visited timestep.
* Noise: a ``NoiseFn``, called with a shape and returning standard normal float32 noise of that
  shape. ``PerImageNoise`` draws each image's noise from its own seeded generator, so an image's
  result does not depend on its batch mates or the batch size; the default is Jittor's global RNG.
* The whole batch shares each timestep, so coefficients are Python floats; the loop syncs once per
  step so Jittor's lazy graph never spans steps, and runs without gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt

from .diffusion import ModelFn, exp, p_mean_variance, q_sample, split_model_output
from .respace import Stage, check_timesteps, respace
from .schedule import Schedule

NoiseFn = Callable[[Sequence[int]], jt.Var]


def global_noise(shape: Sequence[int]) -> jt.Var:
    """Standard normal float32 noise from Jittor's global RNG (``jt.set_global_seed``)."""
    return jt.randn(tuple(shape), dtype="float32")


class PerImageNoise:
    """Noise drawn image by image, each from its own ``numpy.random.Generator(PCG64(seed))``.

    Calling it with shape [B, C, H, W] draws C*H*W float32 standard normals from each of the B
    generators in turn. Image i's noise depends only on ``seeds[i]`` and how many draws it had
    before, never on the other images in the batch; use one object per image set for a whole
    multi-stage run and its draws continue across stages.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [np.random.default_rng(s) for s in self.seeds]

    def __call__(self, shape: Sequence[int]) -> jt.Var:
        shape = tuple(int(s) for s in shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"PerImageNoise holds {len(self.generators)} seeds but was asked for a "
                             f"batch of {shape[0]} (shape {shape})")
        return jt.array(np.stack([g.standard_normal(shape[1:], dtype=np.float32)
                                  for g in self.generators]))


def _training_schedule(schedule: Schedule, who: str) -> None:
    if schedule.is_respaced:
        raise ValueError(f"{who} takes the training schedule and training timesteps, not a "
                         "respaced schedule; pass the respaced timesteps as the timestep list")


def _call(model_fn, x: jt.Var, t: int) -> jt.Var:
    return model_fn(x, jt.full((x.shape[0],), int(t), dtype="int32"))


def _xstart(x: jt.Var, eps: jt.Var, alpha_bar: float, clip_denoised: bool) -> jt.Var:
    pred = math.sqrt(1.0 / alpha_bar) * x - math.sqrt(1.0 / alpha_bar - 1.0) * eps
    return pred.clamp(-1.0, 1.0) if clip_denoised else pred


def ddim_step(schedule: Schedule, model_output: jt.Var, x: jt.Var, t: int, t_next: int | None, *,
              eta: float = 0.0, noise: jt.Var | None = None, clip_denoised: bool = False) -> jt.Var:
    """One DDIM step (Song et al. 2021, eq. 12) from training timestep ``t`` to ``t_next``
    (``None``: to clean data, abar' = 1).

    With abar = abar[t], abar' = abar[t_next]: x0 = (x - sqrt(1-abar) eps) / sqrt(abar), eps
    re-derived from x0 (as guided-diffusion does, so ``clip_denoised`` acts on both),
    sigma = eta sqrt((1-abar')/(1-abar)) sqrt(1 - abar/abar'),
    x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma noise. ``noise`` is needed only
    when sigma > 0 (eta > 0 and t_next not None).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    eps_model, _ = split_model_output(model_output, x)
    alpha_bar = float(schedule.alphas_cumprod[t])
    alpha_bar_prev = 1.0 if t_next is None else float(schedule.alphas_cumprod[t_next])
    pred_xstart = _xstart(x, eps_model, alpha_bar, clip_denoised)
    eps = (math.sqrt(1.0 / alpha_bar) * x - pred_xstart) / math.sqrt(1.0 / alpha_bar - 1.0)
    sigma = (eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
             * math.sqrt(1.0 - alpha_bar / alpha_bar_prev))
    x_next = (math.sqrt(alpha_bar_prev) * pred_xstart
              + math.sqrt(1.0 - alpha_bar_prev - sigma ** 2) * eps)
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_next = x_next + sigma * noise
    return x_next


def ddim_sample(model_fn: ModelFn, schedule: Schedule, x: jt.Var, timesteps: Sequence[int], *,
                eta: float = 0.0, noise_fn: NoiseFn | None = None,
                clip_denoised: bool = False) -> jt.Var:
    """DDIM over ``timesteps``: ``ddim_step`` from each visited timestep to the next, and from the
    last to clean data; eta = 0 is deterministic (noise is drawn only when eta > 0)."""
    _training_schedule(schedule, "ddim_sample")
    ts = check_timesteps(schedule, timesteps)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    noise_fn = noise_fn or global_noise
    with jt.no_grad():
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else None
            noise = noise_fn(x.shape) if eta > 0 and t_next is not None else None
            x = ddim_step(schedule, _call(model_fn, x, t), x, t, t_next, eta=eta, noise=noise,
                          clip_denoised=clip_denoised)
            x.sync()
    return x


def ddpm_step(schedule: Schedule, model_output: jt.Var, x: jt.Var, index: int,
              noise: jt.Var | None, *, clip_denoised: bool = False,
              fixed_variance: str = "large") -> jt.Var:
    """One ancestral step (Ho et al. Alg. 2) at index ``index`` of ``schedule`` (training or
    respaced): x' = mean + exp(log_var / 2) noise, with the p_mean_variance of the model output
    (learned-range or fixed variance); no noise at index 0, as guided-diffusion's ``p_sample``."""
    out = p_mean_variance(schedule, model_output, x, index, clip_denoised=clip_denoised,
                          fixed_variance=fixed_variance)
    if index == 0:
        return out.mean
    if noise is None:
        raise ValueError(f"ddpm_step at index {index} needs noise")
    return out.mean + exp(0.5 * out.log_variance) * noise


def ddpm_sample(model_fn: ModelFn, schedule: Schedule, x: jt.Var, timesteps: Sequence[int], *,
                noise_fn: NoiseFn | None = None, clip_denoised: bool = False,
                fixed_variance: str = "large") -> jt.Var:
    """Ancestral sampling over ``timesteps`` with the model's (learned-range) variance.

    Over a subset of timesteps it uses the respaced process (guided-diffusion ``SpacedDiffusion``):
    betas, posterior and variance range of ``respace(schedule, timesteps)``, whose spaced index k
    is ``timesteps[-1-k]``; ``ddpm_step`` at each.
    """
    _training_schedule(schedule, "ddpm_sample")
    ts = check_timesteps(schedule, timesteps)
    if len(ts) < 2:
        raise ValueError("ddpm_sample needs at least 2 timesteps (the respaced process needs a "
                         "posterior variance at its second step)")
    spaced = respace(schedule, ts)
    noise_fn = noise_fn or global_noise
    with jt.no_grad():
        for i, t in enumerate(ts):
            k = len(ts) - 1 - i
            noise = noise_fn(x.shape) if k != 0 else None
            x = ddpm_step(spaced, _call(model_fn, x, t), x, k, noise, clip_denoised=clip_denoised,
                          fixed_variance=fixed_variance)
            x.sync()
    return x


def _vp_coefficients(schedule: Schedule, ts: Sequence[int]):
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t) of the
    visited timesteps, as Python floats (the VP form of the discrete schedule)."""
    ac = schedule.alphas_cumprod
    alpha = [math.sqrt(float(ac[t])) for t in ts]
    sigma = [math.sqrt(1.0 - float(ac[t])) for t in ts]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    return alpha, sigma, lam


def _data_prediction(model_fn, schedule: Schedule, x: jt.Var, t: int, clip_denoised: bool) -> jt.Var:
    eps, _ = split_model_output(_call(model_fn, x, t), x)
    return _xstart(x, eps, float(schedule.alphas_cumprod[t]), clip_denoised)


def dpm_solver_pp_2m(model_fn: ModelFn, schedule: Schedule, x: jt.Var, timesteps: Sequence[int], *,
                     clip_denoised: bool = False) -> jt.Var:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, second order, data prediction.

    VP form on the discrete schedule: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
    lambda_t = log(alpha_t / sigma_t). At visited t_i the network gives x0_i; the step to
    t_{i+1} is, with h = lambda_{t_{i+1}} - lambda_{t_i},

        x' = (sigma_{t_{i+1}} / sigma_{t_i}) x - alpha_{t_{i+1}} expm1(-h) D,
        D = x0_i                                           (first step: DDIM),
        D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_{i-1} / h   (later steps).

    The last step goes to clean data (sigma = 0, lambda = inf): x' = x0 of the last evaluation,
    first order, exactly like DDIM's last step and k-diffusion's step to sigma = 0 (so there is no
    separate "denoise to zero" call). ``len(timesteps)`` network calls in all; the time grid is
    the caller's (``ldm.respace.solver_timesteps``). Its step ratios r matter: a grid whose last
    step is much longer in lambda than the one before (``"time_uniform"`` down to t = 0) makes
    1/(2r) large and the last extrapolation inaccurate; ``"logSNR"`` keeps r = 1.
    """
    _training_schedule(schedule, "dpm_solver_pp_2m")
    ts = check_timesteps(schedule, timesteps)
    alpha, sigma, lam = _vp_coefficients(schedule, ts)
    x0_prev = None
    h_prev = None
    with jt.no_grad():
        for i, t in enumerate(ts):
            x0 = _data_prediction(model_fn, schedule, x, t, clip_denoised)
            if i + 1 == len(ts):
                x = x0
                x.sync()
                break
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                denoised = x0
            else:
                r = h_prev / h
                denoised = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * denoised
            jt.sync([x, x0])
            x0_prev, h_prev = x0, h
    return x


def dpm_solver_pp_3m(model_fn: ModelFn, schedule: Schedule, x: jt.Var, timesteps: Sequence[int], *,
                     clip_denoised: bool = False) -> jt.Var:
    """DPM-Solver++(3M): the multistep exponential integrator of Lu et al. 2022 with the data
    prediction expanded to second order in lambda (third order overall).

    The probability-flow ODE in data-prediction form is solved exactly over its linear part (the
    variation-of-constants formula of DPM-Solver++): with tau = lambda - lambda_{t_i} and
    h = lambda_{t_{i+1}} - lambda_{t_i},

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} int_0^h e^{tau - h} x0(tau) dtau.

    x0(tau) is replaced by the quadratic through the last three evaluations x0_i, x0_{i-1},
    x0_{i-2} at tau = 0, -h_{i-1}, -(h_{i-1} + h_{i-2}) (Newton form: divided differences
    f01 = (x0_i - x0_{i-1}) / h_{i-1}, f12 likewise, f012 = (f01 - f12) / (h_{i-1} + h_{i-2}),
    so x0(tau) = x0_i + (f01 + h_{i-1} f012) tau + f012 tau^2 + O(tau^3)). The weights are the
    exact integrals

        phi0 = int e^{tau-h} dtau = -expm1(-h),  phi1 = int e^{tau-h} tau dtau = h - phi0,
        int e^{tau-h} tau^2 dtau = 2 phi2,  phi2 = h^2 / 2 - phi1,

    giving x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (phi0 x0_i + phi1 (f01 + h_{i-1} f012)
    + 2 phi2 f012). The first step is DDIM and the second DPM-Solver++(2M) (too few evaluations
    for the quadratic); the step from the last visited timestep to clean data returns its x0,
    as in ``dpm_solver_pp_2m``. DPM-Solver's released multistep third-order update (and
    diffusers') weights the f012 term by half of 2 phi2, which leaves that method second order
    (measured in docs/benchmarks.md, "Sampler accuracy").
    """
    _training_schedule(schedule, "dpm_solver_pp_3m")
    ts = check_timesteps(schedule, timesteps)
    alpha, sigma, lam = _vp_coefficients(schedule, ts)
    history: list[jt.Var] = []
    with jt.no_grad():
        for i, t in enumerate(ts):
            x0 = _data_prediction(model_fn, schedule, x, t, clip_denoised)
            if i + 1 == len(ts):
                x = x0
                x.sync()
                break
            h = lam[i + 1] - lam[i]
            phi0 = -math.expm1(-h)
            phi1 = h - phi0
            step = phi0 * x0
            if i >= 1:
                h0 = lam[i] - lam[i - 1]
                f01 = (x0 - history[-1]) * (1.0 / h0)
                if i == 1:
                    # phi0 (x0_i + h/2 f01): DPM-Solver++(2M)'s D
                    step = step + (0.5 * h * phi0) * f01
                else:
                    h1 = lam[i - 1] - lam[i - 2]
                    f12 = (history[-1] - history[-2]) * (1.0 / h1)
                    f012 = (f01 - f12) * (1.0 / (h0 + h1))
                    phi2 = 0.5 * h * h - phi1
                    step = step + phi1 * f01 + (phi1 * h0 + 2.0 * phi2) * f012
            x = (sigma[i + 1] / sigma[i]) * x + alpha[i + 1] * step
            jt.sync([x, x0])
            history = (history + [x0])[-2:]
    return x


def _unipc_weights(ratios: Sequence[float], h: float) -> list[float]:
    """The weights of UniPC's divided differences (Zhao et al. 2023, data prediction, B(h) = e^{-h} - 1).

    With hh = -h and psi_1 = (e^hh - 1) / hh, psi_{q+1} = (psi_q - 1/q!) / hh, the weights w solve
    sum_k w_k r_k^{q-1} = q! hh psi_{q+1} / B(h) for q = 1..n (n = len(ratios)), the conditions
    that make the update exact for data predictions polynomial in lambda of degree n. A single
    difference takes w = 1/2 (the leading term of that solution, as the authors' code does).
    """
    n = len(ratios)
    if n == 0:
        return []
    if n == 1:
        return [0.5]
    hh = -h
    b_h = math.expm1(hh)
    rhs, hh_psi, factorial = [], math.expm1(hh) / hh - 1.0, 1.0
    for q in range(1, n + 1):
        rhs.append(hh_psi * factorial / b_h)
        factorial *= q + 1
        hh_psi = hh_psi / hh - 1.0 / factorial
    system = np.array([[r ** (q - 1) for r in ratios] for q in range(1, n + 1)], dtype=np.float64)
    return [float(w) for w in np.linalg.solve(system, np.array(rhs))]


def _unipc_update(x: jt.Var, x0s: Sequence[jt.Var], i: int, order: int, alpha, sigma, lam,
                  x0_next: jt.Var | None = None) -> jt.Var:
    """UniPC's step from visited index i to i+1: the predictor UniP-``order`` without ``x0_next``,
    the corrector UniC-``order`` with it (``x0_next``: the evaluation at the predicted point).
    ``x0s`` ends with the evaluations at i - order + 1 .. i."""
    h = lam[i + 1] - lam[i]
    x0 = x0s[-1]
    ratios, diffs = [], []
    for k in range(1, order):
        r = (lam[i - k] - lam[i]) / h
        ratios.append(r)
        diffs.append((x0s[-1 - k] - x0) * (1.0 / r))
    if x0_next is not None:
        ratios.append(1.0)
        diffs.append(x0_next - x0)
    b_h = math.expm1(-h)
    out = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * b_h) * x0
    for w, d in zip(_unipc_weights(ratios, h), diffs):
        out = out - (alpha[i + 1] * b_h * w) * d
    return out


def unipc(model_fn: ModelFn, schedule: Schedule, x: jt.Var, timesteps: Sequence[int], *,
          order: int = 2, clip_denoised: bool = False) -> jt.Var:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"): multistep, data
    prediction, B(h) = e^{-h} - 1 ("bh2"), predictor UniP-p and corrector UniC-p with p = ``order``.

    Notation of ``dpm_solver_pp_3m``. From visited t_i to t_{i+1} (h = lambda_{i+1} - lambda_i),
    with ratios r_k = (lambda_{i-k} - lambda_i) / h and differences D_k = (x0_{i-k} - x0_i) / r_k
    of the p - 1 earlier evaluations,

        predictor:  x~_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} B(h) (x0_i + sum_k a_k D_k)
        corrector:  x_{i+1}  = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} B(h) (x0_i + sum_k c_k D_k
                                                                             + c_p (x0_{i+1} - x0_i))

    where x0_{i+1} is the network's data prediction at x~_{i+1} (it is also the history entry for
    the later steps, so the corrector costs no network call) and a, c are ``_unipc_weights``. The
    corrector raises the order by one: UniPC-p is of order p + 1 (UniPC-2, the default, is third
    order). The first steps use the evaluations available (p grows 1, 2, ..); the step from the
    last visited timestep to clean data returns that evaluation's x0 (no correction is needed
    there, it would not change the result).
    """
    _training_schedule(schedule, "unipc")
    ts = check_timesteps(schedule, timesteps)
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    alpha, sigma, lam = _vp_coefficients(schedule, ts)
    x0s: list[jt.Var] = []
    x_from = None
    used = 1
    with jt.no_grad():
        for i, t in enumerate(ts):
            x0 = _data_prediction(model_fn, schedule, x, t, clip_denoised)
            if i + 1 == len(ts):
                x = x0
                x.sync()
                break
            if i > 0:
                x = _unipc_update(x_from, x0s, i - 1, used, alpha, sigma, lam, x0_next=x0)
            x0s = (x0s + [x0])[-order:]
            used = min(order, i + 1)
            x_from = x
            x = _unipc_update(x, x0s, i, used, alpha, sigma, lam)
            jt.sync([x, x_from, x0])
    return x


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpm_solver_pp_2m": dpm_solver_pp_2m,
            "dpm_solver_pp_3m": dpm_solver_pp_3m, "unipc": unipc}
# The deterministic ODE solvers: no noise, no eta.
ODE_SOLVERS = ("dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc")


def img2img_start(schedule: Schedule, x0: jt.Var, start_level: int, noise: jt.Var) -> jt.Var:
    """Noise a clean latent ``x0`` [B, C, H, W] to training timestep ``start_level`` (q_sample).

    ``noise`` is standard normal like ``x0`` (float32 Var or numpy array), e.g.
    ``PerImageNoise(seeds)(x0.shape)``.
    """
    _training_schedule(schedule, "img2img_start")
    if isinstance(noise, np.ndarray):
        noise = jt.array(noise.astype(np.float32))
    return q_sample(schedule, x0, int(start_level), noise)


def img2img(sampler: Callable, model_fn: ModelFn, schedule: Schedule, x0: jt.Var, stage: Stage,
            noise: jt.Var, **sampler_options) -> jt.Var:
    """One stage: ``img2img_start`` to ``stage.start_level``, then ``sampler`` over ``stage.timesteps``.

    ``sampler`` is one of ``SAMPLERS`` (``ddim_sample``, ``ddpm_sample``, ``dpm_solver_pp_2m``,
    ``dpm_solver_pp_3m``, ``unipc``); ``sampler_options`` its keyword options (eta, noise_fn,
    clip_denoised, order).
    """
    x = img2img_start(schedule, x0, stage.start_level, noise)
    return sampler(model_fn, schedule, x, stage.timesteps, **sampler_options)

"""An analytic oracle for the samplers: data whose noise prediction and probability-flow ODE are
known exactly, so a sampler's error is measured against the true solution, not another sampler.

Data: every element of x_0 is drawn independently from a mixture of Gaussians
sum_k w_k N(m_k, s_k^2) (one component: a Gaussian). In variance-exploding units
y = x_t / alpha_t, sigma = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022), y ~ sum_k w_k
N(m_k, s_k^2 + sigma^2), and with responsibilities p_k(y) proportional to
w_k N(y; m_k, s_k^2 + sigma^2):

    E[x_0 | y]  = sum_k p_k (m_k + s_k^2 (y - m_k) / (s_k^2 + sigma^2))
    eps(x_t, t) = (y - E[x_0 | y]) / sigma = sum_k p_k sigma (y - m_k) / (s_k^2 + sigma^2)

which is the exact eps-prediction of a perfectly trained network (the posterior mean of the
noise). The probability-flow ODE (Song et al. 2021) in these units is dy/dsigma = eps. For one
Gaussian it is solved in closed form: (y - m) / sqrt(s^2 + sigma^2) stays constant. For a
mixture it is integrated in float64 with classical RK4 in u = sqrt(sigma) (steps shrink toward
sigma = 0, where the components separate); ``tests/test_oracle.py`` checks the integrator against
the closed form and against itself at twice the steps.

Everything here is numpy float64; ``jittor_model_fn`` wraps ``eps`` as a sampler's model_fn.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RK4_STEPS = 400


class GaussianMixture:
    """Per-element data distribution sum_k w_k N(m_k, s_k^2) with its exact eps and ODE flow."""

    def __init__(self, weights: Sequence[float], means: Sequence[float], stds: Sequence[float]):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.means = np.asarray(means, dtype=np.float64)
        self.stds = np.asarray(stds, dtype=np.float64)
        if not (self.weights.shape == self.means.shape == self.stds.shape) or self.weights.ndim != 1:
            raise ValueError("weights, means and stds must be 1-D and of one length")
        if not (np.isclose(self.weights.sum(), 1.0) and (self.weights > 0).all() and (self.stds > 0).all()):
            raise ValueError("weights must be positive and sum to 1; stds must be positive")

    def __repr__(self) -> str:
        parts = [f"{w:g} N({m:g}, {s:g}^2)" for w, m, s in zip(self.weights, self.means, self.stds)]
        return " + ".join(parts)

    # ------------------------------------------------------------------ variance-exploding units
    def _responsibilities(self, y: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        var = self.stds ** 2 + sigma ** 2
        log_p = (np.log(self.weights) - 0.5 * np.log(var)
                 - 0.5 * (y[..., None] - self.means) ** 2 / var)
        p = np.exp(log_p - log_p.max(axis=-1, keepdims=True))
        return p / p.sum(axis=-1, keepdims=True), var

    def eps_ve(self, y: np.ndarray, sigma: float) -> np.ndarray:
        """eps at y = x_t / alpha_t and sigma = sqrt((1 - abar) / abar) (smooth down to sigma = 0)."""
        p, var = self._responsibilities(y, sigma)
        return (p * sigma * (y[..., None] - self.means) / var).sum(axis=-1)

    def log_density_ve(self, y: np.ndarray, sigma: float) -> np.ndarray:
        """log p(y) of the noised data in variance-exploding units."""
        var = self.stds ** 2 + sigma ** 2
        terms = (np.log(self.weights) - 0.5 * np.log(2 * np.pi * var)
                 - 0.5 * (y[..., None] - self.means) ** 2 / var)
        top = terms.max(axis=-1, keepdims=True)
        return (top + np.log(np.exp(terms - top).sum(axis=-1, keepdims=True)))[..., 0]

    # --------------------------------------------------------------------------- VP units
    def eps(self, x_t: np.ndarray, alpha_bar: float) -> np.ndarray:
        """The exact eps-prediction at x_t [any shape] noised to abar = ``alpha_bar``."""
        return self.eps_ve(np.asarray(x_t, np.float64) / math.sqrt(alpha_bar),
                           math.sqrt((1.0 - alpha_bar) / alpha_bar))

    def noised(self, alpha_bar: float, shape: Sequence[int], seed: int) -> np.ndarray:
        """x_t = sqrt(abar) x_0 + sqrt(1 - abar) z with x_0 from the data and z ~ N(0, I)."""
        rng = np.random.default_rng(seed)
        size = int(np.prod(shape))
        component = rng.choice(len(self.weights), size=size, p=self.weights)
        x0 = self.means[component] + self.stds[component] * rng.standard_normal(size)
        z = rng.standard_normal(size)
        return (math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * z).reshape(shape)

    def flow(self, x_t: np.ndarray, alpha_bar: float, alpha_bar_to: float = 1.0,
             rk4_steps: int = RK4_STEPS) -> np.ndarray:
        """The probability-flow ODE's solution from x_t at ``alpha_bar`` to ``alpha_bar_to`` (1:
        clean data), in VP units. Closed form for one component, RK4 otherwise."""
        sigma0 = math.sqrt((1.0 - alpha_bar) / alpha_bar)
        sigma1 = math.sqrt((1.0 - alpha_bar_to) / alpha_bar_to)
        y = np.asarray(x_t, np.float64) / math.sqrt(alpha_bar)
        if len(self.weights) == 1:
            m, s = self.means[0], self.stds[0]
            y = m + (y - m) * math.sqrt(s * s + sigma1 ** 2) / math.sqrt(s * s + sigma0 ** 2)
        else:
            y = self._rk4(y, sigma0, sigma1, rk4_steps)
        return math.sqrt(alpha_bar_to) * y

    def _rk4(self, y: np.ndarray, sigma0: float, sigma1: float, steps: int) -> np.ndarray:
        def f(y, u):  # dy/du with sigma = u^2
            return 2.0 * u * self.eps_ve(y, u * u)

        us = np.linspace(math.sqrt(sigma0), math.sqrt(sigma1), steps + 1)
        for u, u_next in zip(us[:-1], us[1:]):
            h = u_next - u
            k1 = f(y, u)
            k2 = f(y + 0.5 * h * k1, u + 0.5 * h)
            k3 = f(y + 0.5 * h * k2, u + 0.5 * h)
            k4 = f(y + h * k3, u_next)
            y = y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return y

    def x0_prediction(self, x_t: np.ndarray, alpha_bar: float) -> np.ndarray:
        """E[x_0 | x_t] = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        return (x_t - math.sqrt(1.0 - alpha_bar) * self.eps(x_t, alpha_bar)) / math.sqrt(alpha_bar)


# The two data sets of the measurements: a Gaussian, and two well separated narrow modes.
GAUSSIAN = GaussianMixture([1.0], [0.3], [0.5])
MIXTURE = GaussianMixture([0.4, 0.6], [-0.5, 0.6], [0.2, 0.3])
DATA = {"gaussian": GAUSSIAN, "mixture": MIXTURE}
# Points per measurement: a [4, 1, 16, 16] tensor (1024 independent elements).
SHAPE = (4, 1, 16, 16)


def jittor_model_fn(data: GaussianMixture, schedule):
    """A sampler's model_fn returning the exact eps of ``data`` as a float64 Jittor Var (run the
    samplers on float64 inputs so they compute in float64; Jittor keeps Python-float coefficients
    in float32, about 1e-7 relative)."""
    import jittor_env  # noqa: F401  (must precede any import of jittor)
    import jittor as jt

    def model_fn(x_t, t):
        step = int(t.numpy()[0])
        eps = data.eps(x_t.numpy().astype(np.float64), float(schedule.alphas_cumprod[step]))
        return jt.array(eps, dtype="float64")

    return model_fn


def round_error(data: GaussianMixture, schedule, sampler, start_level: int, timesteps: Sequence[int],
                seed: int = 0, shape: Sequence[int] = SHAPE, start: str = "data",
                **options) -> float:
    """Max |sampler result - exact ODE solution| over the points of one image-to-image round.

    The points are the data noised to ``start_level`` (``start="data"``) or standard normal noise
    taken to be at ``start_level`` (``start="noise"``: a round from pure noise); ``sampler`` (one of
    ``ldm.samplers.SAMPLERS``) then runs over ``timesteps`` from them, and the exact solution is
    the ODE flow from ``start_level`` to clean data.
    """
    import jittor_env  # noqa: F401
    import jittor as jt

    x, exact = points_and_solution(data, float(schedule.alphas_cumprod[start_level]), tuple(shape),
                                   seed, start)
    got = sampler(jittor_model_fn(data, schedule), schedule, jt.array(x, dtype="float64"),
                  list(timesteps), **options).numpy()
    return float(np.abs(got - exact).max())


_SOLUTIONS: dict = {}


def points_and_solution(data: GaussianMixture, alpha_bar: float, shape: tuple, seed: int,
                        start: str) -> tuple[np.ndarray, np.ndarray]:
    """A round's starting points and their exact solution, kept: every sampler measured on a round
    starts from the same points, and the mixture's RK4 solution is the costly part."""
    key = (id(data), alpha_bar, shape, seed, start)
    if key not in _SOLUTIONS:
        if start == "noise":
            x = np.random.default_rng(seed).standard_normal(shape)
        else:
            x = data.noised(alpha_bar, shape, seed)
        _SOLUTIONS[key] = (data, x, data.flow(x, alpha_bar))  # data kept so its id stays its own
    return _SOLUTIONS[key][1], _SOLUTIONS[key][2]


def rounds_errors(rounds, data: GaussianMixture, schedule, seed: int = 0,
                  shape: Sequence[int] = SHAPE) -> list[float]:
    """``round_error`` of each ``ldm.pipeline.Round`` (its sampler, stage and eta), every round
    measured on its own from fresh points: the oracle has no mask, guidance or colour transfer."""
    from ldm.samplers import SAMPLERS

    errors = []
    for rnd in rounds:
        options = {"eta": rnd.eta} if rnd.sampler == "ddim" else {}
        if rnd.sampler == "ddpm" or rnd.eta:
            raise ValueError(f"the oracle measures deterministic samplers, not {rnd.sampler!r} "
                             f"with eta {rnd.eta}")
        errors.append(round_error(data, schedule, SAMPLERS[rnd.sampler], rnd.stage.start_level,
                                  rnd.stage.timesteps, seed, shape,
                                  start="noise" if rnd.start == "noise" else "data", **options))
    return errors

"""The Gaussian noise schedule of a discrete-time diffusion model, as plain float64 arrays.

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),        t = 0 .. T-1
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I),          abar_t = prod_{s<=t} (1 - beta_s)
    q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t I)  (the posterior, eq. 6-7)

The arrays carry guided-diffusion's names so each line of the math can be matched to
``guided_diffusion/gaussian_diffusion.py``. Index ``t`` of every array is timestep ``t`` of this
schedule; for a respaced schedule (``ldm.respace.respace``) that index is a *spaced* index and
``timestep_map[t]`` is the training timestep the network must be called with.

The schedule holds no network and no Jittor state: it is math only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SCHEDULE_KINDS = ("linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    """How to build the training schedule.

    ``kind="linear"``: beta linear from ``beta_start * 1000/T`` to ``beta_end * 1000/T`` (Ho et al.'s
    1e-4 .. 0.02 at T=1000, stretched for other T exactly as guided-diffusion's
    ``get_named_beta_schedule("linear", T)``). ``kind="cosine"``: Nichol & Dhariwal 2021 (eq. 17),
    betas clipped at 0.999; the beta range is unused. SDM and IIDM: linear, T = 1000.
    """

    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s linear betas, scaled by 1000/T so the schedule keeps its shape for any T."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: abar(s) = cos((s + 0.008) / 1.008 * pi/2)^2 on s in [0, 1],
    beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


class Schedule:
    """All per-timestep coefficients of a Gaussian diffusion, derived from its betas (float64).

    Arrays (shape [T], float64): ``betas``, ``alphas_cumprod`` (abar_t), ``alphas_cumprod_prev``
    (abar_{t-1}, 1 at t=0), ``alphas_cumprod_next``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``log_one_minus_alphas_cumprod``,
    ``sqrt_recip_alphas_cumprod`` (1/sqrt(abar)), ``sqrt_recipm1_alphas_cumprod`` (sqrt(1/abar - 1)),
    ``posterior_variance`` (beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)),
    ``posterior_log_variance_clipped`` (log beta~_t with beta~_0 := beta~_1, since beta~_0 = 0),
    ``posterior_mean_coef1`` (beta_t sqrt(abar_{t-1}) / (1 - abar_t)) and
    ``posterior_mean_coef2`` ((1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)).

    ``timestep_map`` (int64 [T]) maps an index of these arrays to the training timestep the
    network is called with: the identity for a training schedule, a subset for a respaced one.
    """

    def __init__(self, betas: Sequence[float] | np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map has {self.timestep_map.shape[0]} entries for "
                             f"{self.num_timesteps} betas")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # beta~_0 = 0: the step into x_0 is deterministic given x_0. Its log is clipped to beta~_1.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus
        # The upper end of the learned-range variance (Nichol & Dhariwal eq. 15): log beta_t.
        self.log_betas = np.log(betas)

    @property
    def is_respaced(self) -> bool:
        return not np.array_equal(self.timestep_map, np.arange(self.num_timesteps))

    def __repr__(self) -> str:
        if self.is_respaced:
            return (f"Schedule(T={self.num_timesteps}, respaced: training timesteps "
                    f"{self.timestep_map[0]}..{self.timestep_map[-1]})")
        return f"Schedule(T={self.num_timesteps})"


def make_schedule(config: ScheduleConfig = ScheduleConfig()) -> Schedule:
    """The training schedule described by ``config``."""
    if config.kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {config.kind!r}; expected one of {SCHEDULE_KINDS}")
    if config.num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {config.num_timesteps}")
    if config.kind == "linear":
        if not 0 < config.beta_start <= config.beta_end:
            raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end, got "
                             f"{config.beta_start}, {config.beta_end}")
        return Schedule(linear_betas(config.num_timesteps, config.beta_start, config.beta_end))
    return Schedule(cosine_betas(config.num_timesteps))

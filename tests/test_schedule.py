"""Schedule arrays against closed forms, respacing against guided-diffusion's index rules, and
the IIDM recipe's stages. Numpy only."""

import math
from fractions import Fraction

import numpy as np
import pytest

from ldm.respace import (Stage, iidm_stage, respace, solver_stage, solver_timesteps,
                         space_timesteps, spaced_stage)
from ldm.schedule import Schedule, ScheduleConfig, cosine_betas, linear_betas, make_schedule

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # the linear schedule, from its definition


@pytest.fixture(scope="module")
def linear():
    return make_schedule(ScheduleConfig("linear", 1000, 1e-4, 0.02))


def test_linear_betas_endpoints_and_spacing(linear):
    b = linear.betas
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-17
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
    # guided-diffusion stretches the range by 1000/T for other T.
    b500 = linear_betas(500)
    assert abs(b500[0] - 2e-4) < 1e-18 and abs(b500[-1] - 0.04) < 1e-16


def test_cumulative_products(linear):
    for t in (0, 1, 2, 499, 999):
        expected = math.prod(1.0 - linear.betas[s] for s in range(t + 1))
        assert abs(linear.alphas_cumprod[t] - expected) < 1e-13
    assert linear.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(linear.alphas_cumprod_prev[1:], linear.alphas_cumprod[:-1])
    np.testing.assert_array_equal(linear.alphas_cumprod_next[:-1], linear.alphas_cumprod[1:])
    ab = linear.alphas_cumprod
    np.testing.assert_allclose(linear.sqrt_alphas_cumprod ** 2, ab, rtol=1e-14)
    np.testing.assert_allclose(linear.sqrt_one_minus_alphas_cumprod ** 2, 1 - ab, rtol=1e-12)
    np.testing.assert_allclose(np.exp(linear.log_one_minus_alphas_cumprod), 1 - ab, rtol=1e-12)
    np.testing.assert_allclose(linear.sqrt_recip_alphas_cumprod * linear.sqrt_alphas_cumprod, 1.0,
                               rtol=1e-14)
    np.testing.assert_allclose(linear.sqrt_recipm1_alphas_cumprod ** 2 * ab, 1 - ab, rtol=1e-12)


def test_posterior_is_gaussian_conditioning(linear):
    """q(x_{t-1} | x_t, x_0) by Bayes: prior N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}), likelihood
    x_t | x_{t-1} ~ N(sqrt(1 - b_t) x_{t-1}, b_t); product of Gaussians."""
    b, ab = linear.betas, linear.alphas_cumprod
    t = np.arange(1, 1000)
    prior_var = 1.0 - ab[t - 1]
    var = 1.0 / (1.0 / prior_var + (1.0 - b[t]) / b[t])
    np.testing.assert_allclose(linear.posterior_variance[t], var, rtol=1e-10)
    np.testing.assert_allclose(linear.posterior_mean_coef1[t], var * np.sqrt(ab[t - 1]) / prior_var,
                               rtol=1e-10)
    np.testing.assert_allclose(linear.posterior_mean_coef2[t], var * np.sqrt(1.0 - b[t]) / b[t],
                               rtol=1e-10)
    # t = 0: x_{-1} is x_0 itself.
    assert linear.posterior_variance[0] == 0.0
    assert abs(linear.posterior_mean_coef1[0] - 1.0) < 1e-12 and linear.posterior_mean_coef2[0] == 0.0
    assert linear.posterior_log_variance_clipped[0] == math.log(linear.posterior_variance[1])
    np.testing.assert_allclose(linear.posterior_log_variance_clipped[1:], np.log(var), rtol=1e-12)
    np.testing.assert_array_equal(linear.log_betas, np.log(b))


def test_cosine_schedule_formula():
    T = 1000
    f = [math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(T + 1)]
    expected = np.minimum([1 - f[i + 1] / f[i] for i in range(T)], 0.999)
    b = cosine_betas(T)
    np.testing.assert_allclose(b, expected, rtol=1e-12)
    assert b[-1] == 0.999  # abar(1) = cos(pi/2)^2 ~ 0: the last beta is clipped
    sched = make_schedule(ScheduleConfig(kind="cosine", num_timesteps=T))
    np.testing.assert_allclose(sched.alphas_cumprod[:-1], np.array(f[1:T]) / f[0], rtol=1e-9)


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        make_schedule(ScheduleConfig(kind="quadratic"))
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        make_schedule(ScheduleConfig(beta_start=0.02, beta_end=1e-4))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule(np.array([0.1, 1.5]))


def test_space_timesteps_ddim():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim500") == list(range(0, 1000, 2))
    assert space_timesteps(1000, "ddim100")[:3] == [0, 10, 20]
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim300")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(1000, "ddimx")
    with pytest.raises(ValueError, match="25,10"):
        space_timesteps(1000, "fast")


def test_space_timesteps_sections():
    # "100": one section of 1000 steps, stride 999/99 = 111/11; k*111/11 never ends in .5.
    assert space_timesteps(1000, "100") == [round(Fraction(999 * k, 99)) for k in range(100)]
    # "25,10": [0, 500) takes 25 (stride 499/24), [500, 1000) takes 10 (stride 499/9). At k = 12
    # the exact value is 249.5, but guided-diffusion accumulates the stride in floating point
    # (12 additions give 249.49999999999997), so it keeps 249, not round-half-even's 250.
    first = [0, 21, 42, 62, 83, 104, 125, 146, 166, 187, 208, 229, 249, 270, 291, 312, 333, 353,
             374, 395, 416, 437, 457, 478, 499]
    second = [500, 555, 611, 666, 722, 777, 833, 888, 944, 999]
    assert space_timesteps(1000, "25,10") == first + second
    assert space_timesteps(1000, [25, 10]) == first + second
    # Uneven split: 10 steps in 3 sections of 4, 3, 3.
    assert space_timesteps(10, "2,1,3") == [0, 3, 4, 7, 8, 9]
    with pytest.raises(ValueError, match="section of 500"):
        space_timesteps(1000, "501,10")


def test_respace_keeps_alphas_cumprod(linear):
    use = space_timesteps(1000, "ddim50")
    sp = respace(linear, use)
    assert sp.num_timesteps == 50 and sp.is_respaced and not linear.is_respaced
    np.testing.assert_array_equal(sp.timestep_map, use)
    np.testing.assert_allclose(sp.alphas_cumprod, linear.alphas_cumprod[use], rtol=1e-13)
    ab = linear.alphas_cumprod[use]
    np.testing.assert_allclose(sp.betas, 1.0 - ab / np.append(1.0, ab[:-1]), rtol=1e-12)
    # Respacing with every timestep gives the training schedule back.
    full = respace(linear, range(1000))
    np.testing.assert_allclose(full.betas, linear.betas, rtol=1e-9)
    with pytest.raises(ValueError, match="training schedule"):
        respace(sp, [0, 1])


def test_iidm_recipe_stages():
    """The IIDM recipe: rounds (ddim500, 300), (ddim500, 320), (ddim50, 20). The official code noises to
    spaced index start_t (timestep = stride * start_t) and denoises from spaced start_t - 1."""
    rounds = [iidm_stage("ddim500", 300), iidm_stage("ddim500", 320), iidm_stage("ddim50", 20)]
    assert [r.start_level for r in rounds] == [600, 640, 400]
    assert [r.timesteps[0] for r in rounds] == [598, 638, 380]
    assert rounds[0].timesteps == tuple(2 * k for k in range(299, -1, -1))
    assert rounds[1].timesteps == tuple(2 * k for k in range(319, -1, -1))
    assert rounds[2].timesteps == tuple(20 * k for k in range(19, -1, -1))
    assert [r.num_steps for r in rounds] == [300, 320, 20]
    natural = spaced_stage("ddim500", 300)
    assert natural.start_level == 600 and natural.timesteps == tuple(range(600, -1, -2))
    with pytest.raises(ValueError, match="start index 500"):
        iidm_stage("ddim500", 500)
    with pytest.raises(ValueError, match="start index 0"):
        iidm_stage("ddim50", 0)


def test_stage_validation():
    with pytest.raises(ValueError, match="strictly"):
        Stage(600, (598, 598, 0))
    with pytest.raises(ValueError, match="noisier"):
        Stage(600, (602, 0))
    with pytest.raises(ValueError, match="strictly"):
        Stage(600, ())


def _lambda_target_between_neighbours(linear, ts, targets):
    """Each timestep is within one timestep of its exact lambda target (rounding to integers)."""
    lam = 0.5 * np.log(linear.alphas_cumprod / (1 - linear.alphas_cumprod))
    for t, target in zip(ts, targets):
        lo, hi = max(t - 1, 0), min(t + 1, 999)
        assert lam[hi] - 1e-12 <= target <= lam[lo] + 1e-12


def test_solver_timesteps(linear):
    ts = solver_timesteps(linear, 600, 20, "time_uniform")
    assert ts == tuple(int(v) for v in np.round(np.linspace(600, 0, 20)))
    assert ts[0] == 600 and ts[-1] == 0 and len(ts) == 20
    assert solver_timesteps(linear, 999, 1000, "time_uniform") == tuple(range(999, -1, -1))
    # the default is uniform in lambda = 0.5 log(abar / (1 - abar)) down to t = 0
    ls = solver_timesteps(linear, 999, 25)
    assert ls == solver_timesteps(linear, 999, 25, "logSNR", 0)
    assert ls[0] == 999 and ls[-1] == 0 and len(ls) == 25
    lam = 0.5 * np.log(ABAR / (1 - ABAR))
    _lambda_target_between_neighbours(linear, ls, np.linspace(lam[999], lam[0], 25))
    assert solver_timesteps(linear, 400, 3, "trailing") == (400, 267, 133)
    with pytest.raises(ValueError, match="repeated"):
        solver_timesteps(linear, 999, 400, "logSNR")
    with pytest.raises(ValueError, match="num_steps"):
        solver_timesteps(linear, 10, 12)
    with pytest.raises(ValueError, match="unknown solver spacing"):
        solver_timesteps(linear, 10, 5, "karras")
    stage = solver_stage(linear, 400, 10)
    assert stage.start_level == 400 and stage.timesteps[0] == 400 and stage.timesteps[-1] == 0
    assert stage.timesteps == solver_timesteps(linear, 400, 10, "logSNR")


def test_solver_timesteps_end_level(linear):
    """A grid that stops at ``end_level``: its last visited timestep (trailing: one step above it),
    the same rule between the start and that end."""
    lam = 0.5 * np.log(ABAR / (1 - ABAR))
    ls = solver_timesteps(linear, 600, 12, "logSNR", end_level=4)
    assert ls[0] == 600 and ls[-1] == 4 and len(ls) == 12
    _lambda_target_between_neighbours(linear, ls, np.linspace(lam[600], lam[4], 12))
    assert solver_timesteps(linear, 400, 5, "time_uniform", end_level=8) == (400, 302, 204, 106, 8)
    assert solver_timesteps(linear, 400, 4, "trailing", end_level=8) == (400, 302, 204, 106)
    assert solver_timesteps(linear, 10, 7, "time_uniform", end_level=4) == (10, 9, 8, 7, 6, 5, 4)
    with pytest.raises(ValueError, match="num_steps"):
        solver_timesteps(linear, 10, 8, "time_uniform", end_level=4)
    with pytest.raises(ValueError, match="end_level"):
        solver_timesteps(linear, 10, 3, end_level=11)
    with pytest.raises(ValueError, match="end_level"):
        solver_timesteps(linear, 10, 3, end_level=-1)
    stage = solver_stage(linear, 640, 12, end_level=4)
    assert stage.start_level == 640 and stage.timesteps == solver_timesteps(linear, 640, 12, "logSNR", 4)

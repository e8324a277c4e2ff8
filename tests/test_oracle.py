"""The samplers against an analytic oracle (bench/oracle.py): data whose exact eps-prediction and
probability-flow ODE solution are known in closed form (a Gaussian) or by float64 RK4 (a mixture
of two narrow Gaussians), so each sampler and grid is measured against the true solution.

Checked here: the oracle itself (its eps is the score of its own noised density; its RK4 agrees
with the closed form and with itself at twice the steps); the convergence order of every sampler
(DDIM 1, DPM-Solver++(2M) 2, DPM-Solver++(3M) and UniPC-2 3); the grid that the old ``fast``
preset used against logSNR and trailing grids; where the presets' logSNR grids stop; and each
solver preset's rounds against the error of the official IIDM rounds on the same points. The
samplers run on float64 Jittor tensors of shape [4, 1, 16, 16].
"""

import math

import numpy as np
import pytest

from bench.oracle import GAUSSIAN, MIXTURE, GaussianMixture, jittor_model_fn, round_error, rounds_errors
from ldm.pipeline import fast_rounds, fastest_rounds, iidm_rounds
from ldm.respace import solver_timesteps
from ldm.samplers import ddim_sample, dpm_solver_pp_2m, dpm_solver_pp_3m, unipc
from ldm.schedule import ScheduleConfig, make_schedule

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # the linear schedule, from its definition


@pytest.fixture(scope="module")
def sched():
    return make_schedule(ScheduleConfig())


# ------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_eps_is_the_score_of_the_noised_density(data):
    """eps = -sigma d/dy log p_sigma(y) (y = x_t / alpha_t): the posterior mean of the noise,
    against central differences of the closed-form density of the noised data."""
    y = np.linspace(-3.0, 3.0, 61)
    for sigma in (0.05, 0.3, 1.0, 4.0):
        step = 1e-5
        score = (data.log_density_ve(y + step, sigma) - data.log_density_ve(y - step, sigma)) / (2 * step)
        np.testing.assert_allclose(data.eps_ve(y, sigma), -sigma * score, rtol=1e-6, atol=1e-8)
    abar = ABAR[500]
    np.testing.assert_allclose(data.eps(y, abar), data.eps_ve(y / math.sqrt(abar), math.sqrt((1 - abar) / abar)))


def test_rk4_flow_matches_closed_form_and_converges():
    x = GAUSSIAN.noised(ABAR[640], (1024,), seed=3)
    twin = GaussianMixture([0.5, 0.5], [0.3, 0.3], [0.5, 0.5])  # the same Gaussian, solved by RK4
    # the default steps from the rounds' levels to clean data; more steps from t = 999 (the order
    # measurement's reference)
    for start, end, steps in ((640, None, 400), (999, 199, 1000)):
        to = 1.0 if end is None else ABAR[end]
        np.testing.assert_allclose(twin.flow(x[:256], ABAR[start], to, rk4_steps=steps),
                                   GAUSSIAN.flow(x[:256], ABAR[start], to), rtol=0, atol=1e-8)
    x = MIXTURE.noised(ABAR[640], (256,), seed=3)
    coarse, fine = MIXTURE.flow(x, ABAR[640]), MIXTURE.flow(x, ABAR[640], rk4_steps=800)
    assert np.abs(coarse - fine).max() < 1e-8
    # the closed form: (y - m) / sqrt(s^2 + sigma^2) is constant along the flow
    y0 = x / math.sqrt(ABAR[640])
    sigma0 = math.sqrt((1 - ABAR[640]) / ABAR[640])
    np.testing.assert_allclose(GAUSSIAN.flow(x, ABAR[640]), 0.3 + (y0 - 0.3) * 0.5 / math.sqrt(0.25 + sigma0 ** 2))


# ------------------------------------------------------------------------- convergence orders
ORDER_START, ORDER_END, ORDER_STEPS = 999, 199, (20, 40, 80)


@pytest.fixture(scope="module")
def order_errors(jt, sched):
    """Max error at time-uniform grids from t = 999 to 199 (integer nodes, so the grid is a smooth
    map of a uniform one) on the mixture, against the x0 prediction at t = 199 of the exact ODE
    solution (the samplers' result is the x0 prediction at their last visited timestep)."""
    x = MIXTURE.noised(ABAR[ORDER_START], (4, 1, 16, 16), seed=1)
    exact = MIXTURE.flow(x, ABAR[ORDER_START], ABAR[ORDER_END], rk4_steps=1000)
    reference = MIXTURE.x0_prediction(exact, ABAR[ORDER_END])
    model = jittor_model_fn(MIXTURE, sched)
    samplers = {"ddim": ddim_sample, "dpm_solver_pp_2m": dpm_solver_pp_2m,
                "dpm_solver_pp_3m": dpm_solver_pp_3m,
                "unipc-1": lambda *a: unipc(*a, order=1), "unipc-2": unipc,
                "unipc-3": lambda *a: unipc(*a, order=3)}
    errors = {}
    for name, sampler in samplers.items():
        errors[name] = []
        for n in ORDER_STEPS:
            ts = [int(v) for v in np.linspace(ORDER_START, ORDER_END, n + 1)]
            got = sampler(model, sched, jt.array(x, dtype="float64"), ts).numpy()
            errors[name].append(float(np.abs(got - reference).max()))
    return errors


@pytest.mark.parametrize("name, low, high", [
    ("ddim", 0.9, 1.1), ("dpm_solver_pp_2m", 1.85, 2.15), ("unipc-1", 1.8, 2.2),
    ("dpm_solver_pp_3m", 2.7, 3.3), ("unipc-2", 2.7, 3.3), ("unipc-3", 3.5, 4.3)])
def test_convergence_order(order_errors, name, low, high):
    """The observed order between 40 and 80 steps: DDIM 1, DPM-Solver++(2M) 2, UniPC-p p + 1
    (UniC adds one), DPM-Solver++(3M) 3 (its first step is DDIM, whose O(h^2) error is small here
    because the data prediction barely changes at the high noise the grid starts from)."""
    errors = order_errors[name]
    assert errors[0] > errors[1] > errors[2] > 1e-6  # above the float32 rounding of coefficients
    order = math.log(errors[1] / errors[2]) / math.log(ORDER_STEPS[2] / ORDER_STEPS[1])
    assert low <= order <= high, (name, errors, order)


# ------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("level", [600, 640])
def test_grid_that_visits_zero_is_the_inaccurate_one(jt, sched, level):
    """DPM-Solver++(2M), 20 calls, Gaussian data: "time_uniform" down to t = 0 ends with a step
    far longer in lambda than the one before it, and its extrapolation there is wrong by ~0.2;
    a logSNR grid or a trailing one (stopping at level / 20) is accurate to ~0.01."""
    errors = {spacing: round_error(GAUSSIAN, sched, dpm_solver_pp_2m, level,
                                   solver_timesteps(sched, level, 20, spacing))
              for spacing in ("time_uniform", "logSNR", "trailing")}
    assert errors["time_uniform"] > 0.15
    assert errors["logSNR"] < 0.015 and errors["trailing"] < 0.02
    lam = 0.5 * np.log(ABAR / (1 - ABAR))
    ts = solver_timesteps(sched, level, 20, "time_uniform")
    assert (lam[ts[-1]] - lam[ts[-2]]) / (lam[ts[-2]] - lam[ts[-3]]) > 3


# ---------------------------------------------------------------------------------- presets
@pytest.fixture(scope="module")
def official(jt, sched):
    """The official IIDM rounds' errors (DDIM, with the start - 1 quirk) on the oracle's points."""
    return {name: rounds_errors(iidm_rounds(), data, sched)
            for name, data in (("gaussian", GAUSSIAN), ("mixture", MIXTURE))}


def test_official_rounds(official):
    """About 0.009 for rounds 0 and 1 (DDIM's first-order error over 300 and 320 steps; the start - 1
    quirk changes it by under 2%) and 0.07 for round 2 (20 steps of ddim50, from 380 for a start at
    400; from 400 it would be 0.08)."""
    for errors in official.values():
        assert 0.006 < errors[0] < 0.012 and 0.006 < errors[1] < 0.012 and 0.05 < errors[2] < 0.09


def test_grid_end(jt, sched, official):
    """DPM-Solver++(3M) over 12 logSNR steps from t = 600 and 640 on the mixture: down to t = 0 its
    error is 1.09 and 1.14 times the official round's; stopping at t = 4 (steps 15% shorter in
    lambda) and taking the x0 prediction there, 0.65 and 0.78 times. The jump from t = 4 alone
    (the exact flow to t = 4, then its x0 prediction) is 0.56 times it."""
    for index, level in enumerate((600, 640)):
        target = official["mixture"][index]
        to_zero = round_error(MIXTURE, sched, dpm_solver_pp_3m, level, solver_timesteps(sched, level, 12))
        to_four = round_error(MIXTURE, sched, dpm_solver_pp_3m, level, solver_timesteps(sched, level, 12, end_level=4))
        assert to_zero > 1.05 * target and to_four < 0.8 * target, (level, to_zero, to_four, target)
    x = MIXTURE.noised(ABAR[600], (4, 1, 16, 16), seed=0)
    jump = MIXTURE.x0_prediction(MIXTURE.flow(x, ABAR[600], ABAR[4]), ABAR[4]) - MIXTURE.flow(x, ABAR[600])
    assert 0.5 * official["mixture"][0] < np.abs(jump).max() < 0.6 * official["mixture"][0]


def test_fast_preset_against_the_official_rounds(jt, sched, official):
    """At 60 U-Net passes (1/21 of the official 1280), every round's error is within the official
    round's on both data sets (measured: 0.03 / 0.21 / 0.69 of it on the Gaussian, 0.65 / 0.78 /
    0.51 on the mixture)."""
    for name, data in (("gaussian", GAUSSIAN), ("mixture", MIXTURE)):
        errors = rounds_errors(fast_rounds(sched), data, sched)
        assert all(e <= t for e, t in zip(errors, official[name])), (name, errors, official[name])


def test_fastest_preset_error(jt, sched):
    """At 30 U-Net passes: the errors stated in ``fastest_rounds`` (docs/benchmarks.md)."""
    gaussian = rounds_errors(fastest_rounds(sched), GAUSSIAN, sched)
    mixture = rounds_errors(fastest_rounds(sched), MIXTURE, sched)
    assert max(gaussian) < 0.06 and max(mixture) < 0.095, (gaussian, mixture)

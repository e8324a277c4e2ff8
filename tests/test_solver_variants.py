"""bench/solver_variants.py, the float64 numpy integrators the ``fast`` preset was chosen against:
the variants ldm.samplers also carries agree with it on the oracle (so the bench measures the same
methods), the others converge at their orders, and its extra grids follow their formulas."""

import math

import numpy as np
import pytest

from bench.oracle import GAUSSIAN, MIXTURE, jittor_model_fn
from bench.solver_variants import VARIANTS, grid, integrate, linear_abar
from ldm.respace import solver_timesteps
from ldm.samplers import ddim_sample, dpm_solver_pp_2m, dpm_solver_pp_3m, unipc
from ldm.schedule import make_schedule

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # the linear schedule, from its definition


@pytest.fixture(scope="module")
def sched():
    return make_schedule()


@pytest.mark.parametrize("name, sampler", [
    ("DDIM", ddim_sample), ("DPM-Solver++(2M)", dpm_solver_pp_2m), ("DPM-Solver++(3M)", dpm_solver_pp_3m),
    ("UniPC-2", unipc), ("UniPC-3", lambda *a: unipc(*a, order=3))])
def test_shared_variants_match_ldm_samplers(jt, sched, name, sampler):
    """Same points, same grids (the fast preset's rounds 0 and 2), both data sets: the numpy
    integrator and the Jittor sampler agree to Jittor's float32 rounding of the coefficients."""
    options = {"order": 1} if name == "DDIM" else VARIANTS[name][0]
    for data in (GAUSSIAN, MIXTURE):
        for level, n in ((600, 12), (400, 6)):
            ts = solver_timesteps(sched, level, n, "logSNR", 4)
            x = data.noised(ABAR[level], (4, 1, 16, 16), seed=0)
            got = sampler(jittor_model_fn(data, sched), sched, jt.array(x, dtype="float64"), list(ts)).numpy()
            np.testing.assert_allclose(integrate(data, linear_abar(), x, ts, **options), got, rtol=0, atol=2e-6)


ORDER_STEPS = (20, 40, 80)


@pytest.fixture(scope="module")
def order_problem():
    """Points at t = 999 and the x0 prediction at t = 199 of their exact solution."""
    x = MIXTURE.noised(ABAR[999], (4, 1, 16, 16), seed=1)
    return x, MIXTURE.x0_prediction(MIXTURE.flow(x, ABAR[999], ABAR[199], rk4_steps=1000), ABAR[199])


@pytest.mark.parametrize("name, low, high", [
    ("UniPC-2, B(h) = h", 2.6, 3.3), ("UniPC-3, B(h) = h", 3.3, 4.3), ("UniPC-2, last corrector", 2.7, 3.3),
    ("UniPC-3, last corrector", 3.5, 4.3), ("3M, noise prediction", 2.6, 3.3),
    ("UniPC-2, noise prediction", 2.6, 3.3), ("3M, 2S first step", 2.6, 3.3),
    ("3M, 2S first step, midpoint kept", 2.6, 3.3)])
def test_variant_convergence_order(order_problem, name, low, high):
    """Observed order between 40 and 80 time-uniform steps from t = 999 to 199 on the mixture,
    against the x0 prediction at t = 199 of the exact solution (as tests/test_oracle.py does for
    ldm.samplers): UniPC-p is of order p + 1 with either B(h), with the last corrector too; the
    noise-prediction multistep methods keep their order."""
    abar = linear_abar()
    x, reference = order_problem
    errors = [float(np.abs(integrate(MIXTURE, abar, x, [int(v) for v in np.linspace(999, 199, n + 1)],
                                     **VARIANTS[name][0]) - reference).max()) for n in ORDER_STEPS]
    assert errors[0] > errors[1] > errors[2] > 1e-9
    order = math.log(errors[1] / errors[2]) / math.log(2)
    assert low <= order <= high, (name, errors, order)


def test_two_stage_first_step_is_locally_third_order():
    """One step from t = 300 at shrinking h (lambda): DPM-Solver++(2S)'s error falls as h^3, the
    DDIM step's as h^2 (the multistep orders above hardly see the first step)."""
    abar = linear_abar()
    lam = 0.5 * np.log(ABAR / (1 - ABAR))
    x = MIXTURE.noised(ABAR[300], (4, 1, 16, 16), seed=2)
    errors = {"2s": [], "ddim": []}
    for t_next in (220, 260):
        exact = MIXTURE.x0_prediction(MIXTURE.flow(x, ABAR[300], ABAR[t_next]), ABAR[t_next])
        errors["2s"].append(np.abs(integrate(MIXTURE, abar, x, [300, t_next], order=3, first_2s=True) - exact).max())
        errors["ddim"].append(np.abs(integrate(MIXTURE, abar, x, [300, t_next], order=1) - exact).max())
    h_ratio = math.log((lam[220] - lam[300]) / (lam[260] - lam[300]))
    assert 2.8 < math.log(errors["2s"][0] / errors["2s"][1]) / h_ratio < 3.8
    assert 1.8 < math.log(errors["ddim"][0] / errors["ddim"][1]) / h_ratio < 2.6
    with pytest.raises(ValueError, match="2S first step"):
        integrate(MIXTURE, abar, x, [300, 260], order=2, corrector=True, first_2s=True)


def test_extra_grids():
    """EDM's spacing is uniform in sigma^(1/rho) (Karras et al. 2022, eq. 5) up to the rounding to
    timesteps, and tends to logSNR (uniform in log sigma) as rho grows; a power law with k = 1 is
    the time-uniform grid."""
    abar = linear_abar()
    sigma = np.sqrt((1 - ABAR) / ABAR)
    ts = grid(abar, "edm", 600, 12, 4, 7.0)
    assert ts[0] == 600 and ts[-1] == 4 and len(ts) == 12
    targets = np.linspace(sigma[600] ** (1 / 7), sigma[4] ** (1 / 7), 12) ** 7
    for t, target in zip(ts, targets):
        assert sigma[max(t - 1, 0)] - 1e-12 <= target <= sigma[min(t + 1, 999)] + 1e-12
    far = grid(abar, "edm", 640, 12, 0, 1e4)
    assert np.abs(np.array(far) - np.array(solver_timesteps(make_schedule(), 640, 12, "logSNR"))).max() <= 1
    assert grid(abar, "time_power", 400, 9, 0, 1.0) == solver_timesteps(make_schedule(), 400, 9, "time_uniform")
    assert grid(abar, "time_power", 400, 3, 4, 2.0) == (400, round(((20 + 2) / 2) ** 2), 4)
    with pytest.raises(ValueError, match="repeats"):
        grid(abar, "time_power", 600, 12, 0, 3.0)

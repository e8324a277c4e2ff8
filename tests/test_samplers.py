"""Sampler loops with closed-form dummy models against float64 loops written here: DDIM (eta 0
and > 0), DDPM with learned variance over a respaced list, DPM-Solver++(2M) against k-diffusion's
sigma-form algorithm, DPM-Solver++(3M) and UniPC against exponential integrators whose weights are
integrals of interpolating polynomials taken by quadrature, exact recovery of a constant x_0,
per-image noise, and IIDM's image-to-image start reproduced from the official loop's index rules.
Accuracy against the exact ODE solution: tests/test_oracle.py."""

import math

import numpy as np
import pytest

import jittor as jt

from ldm.respace import iidm_stage, respace, solver_timesteps, spaced_stage
from ldm.samplers import (PerImageNoise, ddim_sample, ddim_step, ddpm_sample, ddpm_step,
                          dpm_solver_pp_2m, dpm_solver_pp_3m, img2img, img2img_start, unipc)
from ldm.schedule import ScheduleConfig, make_schedule

B, C, H, W = 2, 3, 8, 12
SHAPE = (B, C, H, W)
A_EPS, B_EPS, C_V = 0.4, 2e-4, 0.6
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # linear schedule, from its definition


@pytest.fixture(scope="module")
def sched():
    return make_schedule(ScheduleConfig())


def _rand(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _eps_np(x, t):
    return A_EPS * x + B_EPS * t


def _v_np(x):
    return np.tanh(C_V * x)


def dummy_model(learned_variance=False):
    """eps = a x_t + b t (and v = tanh(c x_t)): closed form, per element, per sample."""
    def model_fn(x_t, t):
        eps = A_EPS * x_t + B_EPS * t.float32().reshape(-1, 1, 1, 1)
        if learned_variance:
            return jt.concat([eps, jt.tanh(C_V * x_t)], dim=1)
        return eps
    return model_fn


def _noise_np(seeds):
    """The numpy twin of PerImageNoise: one PCG64 generator per image."""
    gens = [np.random.default_rng(s) for s in seeds]
    return lambda: np.stack([g.standard_normal((C, H, W), dtype=np.float32) for g in gens])


def _ddim_np(x, ts, eta=0.0, draw=None):
    x = x.astype(np.float64)
    for i, t in enumerate(ts):
        ab = ABAR[t]
        ab_prev = ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = _eps_np(x, t)
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * draw()
    return x


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_loop_matches_float64(jt, sched, eta):
    ts = [999, 700, 420, 133, 0]
    x = _rand(0)
    got = ddim_sample(dummy_model(learned_variance=True), sched, jt.array(x), ts, eta=eta,
                      noise_fn=PerImageNoise([11, 12])).numpy()
    expected = _ddim_np(x, ts, eta, _noise_np([11, 12]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_ddpm_learned_variance_matches_float64(jt, sched):
    """Respaced process over 600 -> 300 -> 0 -> clean: beta' = 1 - abar_t / abar_prev, posterior
    of the spaced chain, log variance between log beta' and the (clipped) posterior log variance."""
    ts = [600, 300, 0]
    x = _rand(1)
    got = ddpm_sample(dummy_model(learned_variance=True), sched, jt.array(x), ts,
                      noise_fn=PerImageNoise([3, 4])).numpy()
    draw = _noise_np([3, 4])
    ab_list = [ABAR[t] for t in ts]
    prev = ab_list[1:] + [1.0]
    post_var = [(1 - ab / p) * (1 - p) / (1 - ab) for ab, p in zip(ab_list, prev)]
    xn = x.astype(np.float64)
    for i, t in enumerate(ts):
        ab, ab_prev = ab_list[i], prev[i]
        beta = 1 - ab / ab_prev
        eps = _eps_np(xn, t)
        x0 = (xn - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        mean = (beta * np.sqrt(ab_prev) * x0 + (1 - ab_prev) * np.sqrt(1 - beta) * xn) / (1 - ab)
        # The last spaced step has posterior variance 0; its log is clipped to the next step's.
        min_log = np.log(post_var[i] if i + 1 < len(ts) else post_var[i - 1])
        frac = (_v_np(xn) + 1) / 2
        log_var = frac * np.log(beta) + (1 - frac) * min_log
        xn = mean + (np.exp(0.5 * log_var) * draw() if i + 1 < len(ts) else 0.0)
    np.testing.assert_allclose(got, xn, rtol=1e-4, atol=1e-4)


def test_single_steps_match_float64(jt, sched):
    """One DDPM step on the training schedule (beta_t, posterior at t) and one DDIM step, with the
    same explicit noise as numpy."""
    betas = np.linspace(1e-4, 0.02, 1000)
    x, z = _rand(20), _rand(21)
    t = 400
    out = dummy_model(learned_variance=True)(jt.array(x), jt.full((B,), t, dtype="int32"))
    got = ddpm_step(sched, out, jt.array(x), t, jt.array(z)).numpy()
    xn = x.astype(np.float64)
    ab, ab_prev, beta = ABAR[t], ABAR[t - 1], betas[t]
    x0 = (xn - np.sqrt(1 - ab) * _eps_np(xn, t)) / np.sqrt(ab)
    mean = (beta * np.sqrt(ab_prev) * x0 + (1 - ab_prev) * np.sqrt(1 - beta) * xn) / (1 - ab)
    frac = (_v_np(xn) + 1) / 2
    log_var = frac * np.log(beta) + (1 - frac) * np.log(beta * (1 - ab_prev) / (1 - ab))
    np.testing.assert_allclose(got, mean + np.exp(0.5 * log_var) * z, rtol=1e-4, atol=1e-4)
    got = ddim_step(sched, out, jt.array(x), t, 250, eta=0.5, noise=jt.array(z)).numpy()
    ab_prev = ABAR[250]
    eps = _eps_np(xn, t)
    sigma = 0.5 * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    expected = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs noise"):
        ddpm_step(sched, out, jt.array(x), t, None)


def _dpmpp_2m_sigma_form(x_vp, ts):
    """k-diffusion's sample_dpmpp_2m in its own (variance-exploding) variables:
    x = x_vp / alpha, sigma = sqrt((1 - abar) / abar), t = -log sigma, the final sigma 0."""
    sigmas = [math.sqrt((1 - ABAR[t]) / ABAR[t]) for t in ts] + [0.0]

    def t_fn(sigma):
        return math.inf if sigma == 0 else -math.log(sigma)

    x = x_vp.astype(np.float64) / math.sqrt(ABAR[ts[0]])
    old = None
    for i, step in enumerate(ts):
        xv = x * math.sqrt(ABAR[step])                      # the network sees the VP input
        denoised = (xv - math.sqrt(1 - ABAR[step]) * _eps_np(xv, step)) / math.sqrt(ABAR[step])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old = denoised
    return x


def test_dpm_solver_pp_2m_matches_k_diffusion_form(jt, sched):
    ts = list(solver_timesteps(sched, 999, 8, "time_uniform"))
    x = _rand(2)
    got = dpm_solver_pp_2m(dummy_model(learned_variance=True), sched, jt.array(x), ts).numpy()
    np.testing.assert_allclose(got, _dpmpp_2m_sigma_form(x, ts), rtol=1e-4, atol=1e-4)
    # Grid of one timestep: x0 of the single evaluation.
    one = dpm_solver_pp_2m(dummy_model(), sched, jt.array(x), [500]).numpy()
    x0 = (x - math.sqrt(1 - ABAR[500]) * _eps_np(x, 500)) / math.sqrt(ABAR[500])
    np.testing.assert_allclose(one, x0, rtol=1e-4, atol=1e-4)


def _vp(t):
    return math.sqrt(ABAR[t]), math.sqrt(1 - ABAR[t]), 0.5 * math.log(ABAR[t] / (1 - ABAR[t]))


def _integral_weights(nodes, h):
    """int_0^h e^{tau - h} L_j(tau) dtau for the Lagrange basis L_j on ``nodes`` (tau values), by
    40-point Gauss-Legendre quadrature: the exponential integrator's weight of each evaluation
    when the data prediction is replaced by its interpolating polynomial."""
    u, w = np.polynomial.legendre.leggauss(40)
    tau = 0.5 * h * (u + 1)
    weights = []
    for j, node in enumerate(nodes):
        basis = np.prod([(tau - other) / (node - other) for k, other in enumerate(nodes) if k != j], axis=0)
        weights.append(0.5 * h * np.sum(w * np.exp(tau - h) * basis))
    return weights


def _x0_np(x, t):
    return (x - np.sqrt(1 - ABAR[t]) * _eps_np(x, t)) / np.sqrt(ABAR[t])


def _dpmpp_3m_np(x, ts):
    """First step DDIM, second DPM-Solver++(2M) (Lu et al. Alg. 2), then the quadratic through the
    last three data predictions integrated exactly; the last visited step returns its x0."""
    x = x.astype(np.float64)
    x0s, lams = [], []
    for i, t in enumerate(ts):
        a, s, lam = _vp(t)
        x0s.append(_x0_np(x, t))
        lams.append(lam)
        if i + 1 == len(ts):
            return x0s[-1]
        a_next, s_next, lam_next = _vp(ts[i + 1])
        h = lam_next - lam
        if i == 0:
            step = -math.expm1(-h) * x0s[-1]
        elif i == 1:
            r = (lam - lams[-2]) / h
            step = -math.expm1(-h) * ((1 + 0.5 / r) * x0s[-1] - (0.5 / r) * x0s[-2])
        else:
            weights = _integral_weights([lams[-1 - k] - lam for k in range(3)], h)
            step = sum(w * x0s[-1 - k] for k, w in enumerate(weights))
        x = (s_next / s) * x + a_next * step


def _unipc_np(x, ts, order):
    """UniPC with B(h) = e^{-h} - 1, written from its order conditions: one divided difference
    takes the weight 1/2 (predictor UniP-2, corrector UniC-1); with more, the weights are those of
    the interpolating polynomial (they make the step exact for polynomial data predictions, which
    is what the linear system of the paper asks), here by quadrature."""
    x = x.astype(np.float64)
    x0s, lams = [], []

    def update(x_from, i, nodes_back, x0_new=None):
        """From visited i to i+1 using x0 at i, i-1, .., i-nodes_back+1 (and x0_new at i+1)."""
        a, s, lam = _vp(ts[i])
        a1, s1, lam1 = _vp(ts[i + 1])
        h = lam1 - lam
        b_h = math.expm1(-h)
        values = [x0s[i - k] for k in range(nodes_back)] + ([x0_new] if x0_new is not None else [])
        taus = [lams[i - k] - lam for k in range(nodes_back)] + ([h] if x0_new is not None else [])
        if len(values) == 1:
            combo = -b_h * values[0]
        elif len(values) == 2:
            r = taus[1] / h
            combo = -b_h * (values[0] + 0.5 * (values[1] - values[0]) / r)
        else:
            combo = sum(w * v for w, v in zip(_integral_weights(taus, h), values))
        return (s1 / s) * x_from + a1 * combo

    used, x_from = 1, None
    for i, t in enumerate(ts):
        x0 = _x0_np(x, t)
        if i + 1 == len(ts):
            return x0
        lams.append(_vp(t)[2])
        if i > 0:
            x = update(x_from, i - 1, used, x0_new=x0)
        x0s.append(x0)
        used = min(order, i + 1)
        x_from = x
        x = update(x, i, used)


@pytest.mark.parametrize("spacing", ["logSNR", "time_uniform"])
def test_dpm_solver_pp_3m_and_unipc_match_float64(jt, sched, spacing):
    ts = list(solver_timesteps(sched, 900, 9, spacing))
    x = _rand(3)
    model = dummy_model(learned_variance=True)
    got = dpm_solver_pp_3m(model, sched, jt.array(x), ts).numpy()
    np.testing.assert_allclose(got, _dpmpp_3m_np(x, ts), rtol=1e-4, atol=1e-4)
    for order in (1, 2, 3):
        got = unipc(model, sched, jt.array(x), ts, order=order).numpy()
        np.testing.assert_allclose(got, _unipc_np(x, ts, order), rtol=1e-4, atol=1e-4)
    # 3M's first two steps are DDIM and DPM-Solver++(2M)
    np.testing.assert_allclose(dpm_solver_pp_3m(model, sched, jt.array(x), ts[:3]).numpy(),
                               _dpmpp_2m_sigma_form(x, ts[:3]), rtol=1e-4, atol=1e-4)


def test_constant_x0_is_recovered_exactly(jt, sched):
    """If the network's x_0 prediction is a fixed tensor c at every (x_t, t), DDIM (eta 0) and
    DPM-Solver++ end exactly at c from any start."""
    c = np.random.default_rng(5).uniform(-1, 1, SHAPE).astype(np.float32)
    table = jt.array(ABAR.astype(np.float32))
    c_var = jt.array(c)

    def model_fn(x_t, t):
        ab = table[t].reshape(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * c_var) / (1 - ab).sqrt()

    x = jt.array(_rand(6))
    for result in (ddim_sample(model_fn, sched, x, list(range(980, -1, -20))),
                   dpm_solver_pp_2m(model_fn, sched, x, solver_timesteps(sched, 999, 15, "time_uniform")),
                   dpm_solver_pp_2m(model_fn, sched, x, solver_timesteps(sched, 999, 12, "logSNR")),
                   dpm_solver_pp_3m(model_fn, sched, x, solver_timesteps(sched, 999, 12, "logSNR")),
                   unipc(model_fn, sched, x, solver_timesteps(sched, 999, 12, "trailing")),
                   unipc(model_fn, sched, x, solver_timesteps(sched, 999, 7, "logSNR"), order=3)):
        np.testing.assert_allclose(result.numpy(), c, atol=1e-4)


def test_per_image_noise_ignores_batch_mates(jt, sched):
    first = PerImageNoise([5, 7])(SHAPE).numpy()
    second = PerImageNoise([5, 9])(SHAPE).numpy()
    np.testing.assert_array_equal(first[0], second[0])
    assert np.abs(first[1] - second[1]).max() > 0.1
    x = jt.array(_rand(7))
    ts = [800, 400, 0]
    a = ddim_sample(dummy_model(), sched, x, ts, eta=1.0, noise_fn=PerImageNoise([5, 7])).numpy()
    b = ddim_sample(dummy_model(), sched, x, ts, eta=1.0, noise_fn=PerImageNoise([5, 9])).numpy()
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[1] - b[1]).max() > 1e-3
    with pytest.raises(ValueError, match="2 seeds"):
        PerImageNoise([1, 2])((3, C, H, W))


def test_iidm_img2img_matches_official_loop(jt, sched):
    """Official IIDM round with ddim50, start_t = 20: ``SpacedDiffusion.q_sample`` at spaced index
    20, then ``ddim_sample`` at spaced indices 19..0 with the spaced abar / abar_prev, the network
    called with ``timestep_map[k]`` (written here from guided-diffusion's respace.py)."""
    use = list(range(0, 1000, 20))
    ab_sp = ABAR[use]
    x0, noise = _rand(8), _rand(9)
    x = np.sqrt(ab_sp[20]) * x0.astype(np.float64) + np.sqrt(1 - ab_sp[20]) * noise
    for k in range(19, -1, -1):
        ab, ab_prev = ab_sp[k], (ab_sp[k - 1] if k > 0 else 1.0)
        eps = _eps_np(x, use[k])
        pred = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        x = np.sqrt(ab_prev) * pred + np.sqrt(1 - ab_prev) * eps

    seen = []
    inner = dummy_model(learned_variance=True)

    def recording(x_t, t):
        seen.append(int(t.numpy()[0]))
        return inner(x_t, t)

    stage = iidm_stage("ddim50", 20)
    got = img2img(ddim_sample, recording, sched, jt.array(x0), stage, jt.array(noise)).numpy()
    assert seen == list(range(380, -1, -20))
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
    start = img2img_start(sched, jt.array(x0), stage.start_level, noise).numpy()
    np.testing.assert_allclose(start, np.sqrt(ABAR[400]) * x0 + np.sqrt(1 - ABAR[400]) * noise,
                               rtol=1e-5, atol=1e-5)
    seen.clear()
    img2img(ddim_sample, recording, sched, jt.array(x0), spaced_stage("ddim50", 20), jt.array(noise))
    assert seen == list(range(400, -1, -20))


def test_sampler_input_errors(jt, sched):
    x = jt.array(_rand(10))
    spaced = respace(sched, range(0, 1000, 20))
    with pytest.raises(ValueError, match="training schedule"):
        ddim_sample(dummy_model(), spaced, x, [40, 20, 0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpm_solver_pp_2m(dummy_model(), sched, x, [20, 40])
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(dummy_model(), sched, x, [20, 0], eta=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        ddpm_sample(dummy_model(), sched, x, [20])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ddim_sample(dummy_model(), sched, x, [1000, 0])
    with pytest.raises(ValueError, match="training schedule"):
        dpm_solver_pp_3m(dummy_model(), spaced, x, [40, 20, 0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        unipc(dummy_model(), sched, x, [20, 20])
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        unipc(dummy_model(), sched, x, [20, 0], order=4)

"""Forward process, posterior, p_mean_variance and the hybrid loss against float64 numpy formulas
written here, plus the gradient routing of the loss (vb reaches the variance channels only)."""

import math

import numpy as np
import pytest

import jittor as jt

from ldm.diffusion import (model_timesteps, p_mean_variance, predict_eps_from_xstart,
                           predict_xstart_from_eps, q_posterior_mean_variance, q_sample)
from ldm.losses import training_losses
from ldm.respace import respace
from ldm.schedule import ScheduleConfig, make_schedule

B, C, H, W = 2, 3, 8, 12
SHAPE = (B, C, H, W)


@pytest.fixture(scope="module")
def sched():
    return make_schedule(ScheduleConfig())


def _rand(seed, shape=SHAPE, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def _abar(t):
    """abar_t of the linear 1e-4..0.02, T = 1000 schedule, from its definition."""
    betas = np.linspace(1e-4, 0.02, 1000)
    return float(np.prod(1.0 - betas[: t + 1]))


def _col(values):
    return np.asarray(values, dtype=np.float64).reshape(-1, 1, 1, 1)


def _posterior_np(x0, xt, ts):
    """Float64 posterior q(x_{t-1}|x_t,x_0) per sample, from Ho et al. eq. 7."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.array([_abar(t) for t in ts])
    ab_prev = np.array([_abar(t - 1) if t > 0 else 1.0 for t in ts])
    b = betas[list(ts)]
    var = b * (1 - ab_prev) / (1 - ab)
    var_clipped = np.array([v if t > 0 else betas[1] * (1 - _abar(0)) / (1 - _abar(1))
                            for v, t in zip(var, ts)])
    mean = (_col(b * np.sqrt(ab_prev) / (1 - ab)) * x0
            + _col((1 - ab_prev) * np.sqrt(1 - b) / (1 - ab)) * xt)
    return mean, var, np.log(var_clipped)


def _pmv_np(out, xt, ts):
    """Float64 learned-range p(x_{t-1}|x_t): mean, log variance, x0 prediction."""
    betas = np.linspace(1e-4, 0.02, 1000)
    eps, v = out[:, :C].astype(np.float64), out[:, C:].astype(np.float64)
    ab = _col([_abar(t) for t in ts])
    x0 = (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    mean, _, min_log = _posterior_np(x0, xt, ts)
    frac = (v + 1) / 2
    log_var = frac * _col(np.log(betas[list(ts)])) + (1 - frac) * _col(min_log)
    return mean, log_var, x0


def test_q_sample_closed_form(jt, sched):
    x0, noise = _rand(0), _rand(1)
    for t in (0, 437, 999):
        got = q_sample(sched, jt.array(x0), t, jt.array(noise)).numpy()
        ab = _abar(t)
        np.testing.assert_allclose(got, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise,
                                   rtol=1e-5, atol=1e-6)
    ts = [3, 815]
    got = q_sample(sched, jt.array(x0), jt.array(np.array(ts, np.int32)), jt.array(noise)).numpy()
    ab = _col([_abar(t) for t in ts])
    np.testing.assert_allclose(got, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        q_sample(sched, jt.array(x0), 1000, jt.array(noise))
    with pytest.raises(ValueError, match="same shape"):
        q_sample(sched, jt.array(x0), 5, jt.array(noise[:1]))


def test_q_sample_moments_empirical(jt, sched):
    """Over 256 noise draws per element: mean sqrt(abar) x0 and variance 1 - abar."""
    jt.set_global_seed(3)
    x0 = np.broadcast_to(_rand(2, (1, C, H, W)), (256, C, H, W)).copy()
    t = 300
    xt = q_sample(sched, jt.array(x0), t, jt.randn(x0.shape)).numpy().astype(np.float64)
    ab = _abar(t)
    resid = xt - math.sqrt(ab) * x0
    n = resid.size
    assert abs(resid.mean()) < 4 * math.sqrt((1 - ab) / n)
    assert abs(resid.var() / (1 - ab) - 1) < 4 * math.sqrt(2 / n)
    per_element_mean = xt.mean(axis=0)
    assert np.abs(per_element_mean - math.sqrt(ab) * x0[0]).max() < 5 * math.sqrt((1 - ab) / 256)


def test_posterior_mean_variance(jt, sched):
    x0, xt = _rand(4), _rand(5)
    ts = [0, 537]
    mean, var, log_var = q_posterior_mean_variance(
        sched, jt.array(x0), jt.array(xt), jt.array(np.array(ts, np.int32)))
    e_mean, e_var, e_log = _posterior_np(x0.astype(np.float64), xt.astype(np.float64), ts)
    np.testing.assert_allclose(mean.numpy(), e_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.numpy().ravel(), e_var, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(log_var.numpy().ravel(), e_log, rtol=1e-5)
    # Shared int timestep: coefficients are Python floats.
    mean, var, log_var = q_posterior_mean_variance(sched, jt.array(x0), jt.array(xt), 537)
    e_mean, e_var, e_log = _posterior_np(x0.astype(np.float64), xt.astype(np.float64), [537, 537])
    assert isinstance(var, float) and abs(var - e_var[0]) < 1e-12 and abs(log_var - e_log[0]) < 1e-9
    np.testing.assert_allclose(mean.numpy(), e_mean, rtol=1e-5, atol=1e-6)


def test_eps_xstart_conversions(jt, sched):
    xt, eps = _rand(6), _rand(7)
    ts = [10, 900]
    t = jt.array(np.array(ts, np.int32))
    x0 = predict_xstart_from_eps(sched, jt.array(xt), t, jt.array(eps))
    ab = _col([_abar(s) for s in ts])
    expected = (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    np.testing.assert_allclose(x0.numpy(), expected, rtol=1e-5, atol=1e-5)
    back = predict_eps_from_xstart(sched, jt.array(xt), t, x0).numpy()
    np.testing.assert_allclose(back, eps, rtol=1e-4, atol=1e-4)


def test_p_mean_variance_learned_range(jt, sched):
    xt = _rand(8)
    out = np.concatenate([_rand(9), np.tanh(_rand(10))], axis=1)
    for ts, t in (([0, 700], jt.array(np.array([0, 700], np.int32))), ([250, 250], 250)):
        res = p_mean_variance(sched, jt.array(out), jt.array(xt), t)
        e_mean, e_log, e_x0 = _pmv_np(out, xt.astype(np.float64), ts)
        np.testing.assert_allclose(res.pred_xstart.numpy(), e_x0, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(res.mean.numpy(), e_mean, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(res.log_variance.numpy(), e_log, rtol=1e-5)
        np.testing.assert_allclose(res.variance.numpy(), np.exp(e_log), rtol=1e-5)
    clipped = p_mean_variance(sched, jt.array(out), jt.array(xt), 999, clip_denoised=True)
    assert np.abs(clipped.pred_xstart.numpy()).max() <= 1.0


def test_p_mean_variance_fixed(jt, sched):
    xt, eps = _rand(11), _rand(12)
    betas = np.linspace(1e-4, 0.02, 1000)
    t = 1
    large = p_mean_variance(sched, jt.array(eps), jt.array(xt), t, fixed_variance="large")
    small = p_mean_variance(sched, jt.array(eps), jt.array(xt), t, fixed_variance="small")
    assert abs(large.variance - betas[1]) < 1e-15
    post1 = betas[1] * (1 - _abar(0)) / (1 - _abar(1))
    assert abs(small.variance - post1) < 1e-12
    # t = 0 uses the posterior variance at t = 1 for "large" (a better decoder likelihood).
    assert abs(p_mean_variance(sched, jt.array(eps), jt.array(xt), 0).variance - post1) < 1e-12
    with pytest.raises(ValueError, match="channels"):
        p_mean_variance(sched, jt.array(eps[:, :2]), jt.array(xt), 5)


def _approx_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _losses_np(x0, noise, ts, a, b, c):
    """Independent float64 hybrid loss of guided-diffusion (LossType.MSE, learned range)."""
    ab = _col([_abar(t) for t in ts])
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    eps = a * xt + b * _col(ts)
    v = np.tanh(c * xt)
    mse = ((noise - eps) ** 2).reshape(B, -1).mean(1)
    mean, log_var, _ = _pmv_np(np.concatenate([eps, v], 1), xt, ts)
    true_mean, _, true_log = _posterior_np(x0, xt, ts)
    kl = 0.5 * (-1 + log_var - _col(true_log) + np.exp(_col(true_log) - log_var)
                + (true_mean - mean) ** 2 * np.exp(-log_var))
    kl = kl.reshape(B, -1).mean(1) / np.log(2)
    inv = np.exp(-0.5 * log_var)
    cdf_plus = _approx_cdf(inv * (x0 - mean + 1 / 255))
    cdf_min = _approx_cdf(inv * (x0 - mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                             np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    nll = -logp.reshape(B, -1).mean(1) / np.log(2)
    vb = np.where(np.array(ts) == 0, nll, kl)
    return mse, vb


def _dummy_model(a, b, c):
    def model_fn(x_t, t):
        eps = a * x_t + b * t.float32().reshape(-1, 1, 1, 1)
        return jt.concat([eps, jt.tanh(c * x_t)], dim=1)
    return model_fn


@pytest.mark.parametrize("ts", [[0, 421], [999, 1]])
def test_training_losses_match_numpy(jt, sched, ts):
    # x_0 in [-1, 1] with exact edge values, so all three decoder-likelihood branches are used.
    x0 = np.clip(_rand(13, scale=0.8), -1, 1)
    x0[:, 0, 0, :4] = -1.0
    x0[:, 1, 0, :4] = 1.0
    noise = _rand(14)
    a, b, c = 0.3, 1e-3, 0.7
    got = training_losses(sched, _dummy_model(a, b, c), jt.array(x0),
                          jt.array(np.array(ts, np.int32)), jt.array(noise))
    mse, vb = _losses_np(x0.astype(np.float64), noise.astype(np.float64), ts, a, b, c)
    np.testing.assert_allclose(got["mse"].numpy(), mse, rtol=1e-5)
    np.testing.assert_allclose(got["vb"].numpy(), vb, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got["loss"].numpy(), mse + vb, rtol=2e-4, atol=1e-6)


def test_training_losses_fixed_variance_and_rescale(jt, sched):
    x0, noise = _rand(15), _rand(16)
    t = jt.array(np.array([5, 400], np.int32))
    fixed = training_losses(sched, lambda x_t, t_: 0.5 * x_t, jt.array(x0), t, jt.array(noise))
    assert set(fixed) == {"mse", "loss"}
    # LossType.RESCALED_MSE multiplies vb by T/1000: 0.5 at T = 500, and 1 at T = 1000.
    sched500 = make_schedule(ScheduleConfig(num_timesteps=500))
    model = _dummy_model(0.3, 1e-3, 0.7)
    plain = training_losses(sched500, model, jt.array(x0), t, jt.array(noise))
    rescaled = training_losses(sched500, model, jt.array(x0), t, jt.array(noise),
                               loss_type="rescaled_mse")
    np.testing.assert_allclose(rescaled["vb"].numpy(), 0.5 * plain["vb"].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        training_losses(sched500, model, jt.array(x0), jt.array(np.array([5, 500], np.int32)),
                        jt.array(noise))
    with pytest.raises(ValueError, match="one timestep per sample"):
        training_losses(sched, model, jt.array(x0), 5, jt.array(noise))


def test_vb_gradient_reaches_variance_only(jt, sched):
    """guided-diffusion's frozen_out: the bound trains v, never eps."""
    w_eps = jt.array(np.array([0.3], np.float32))
    w_v = jt.array(np.array([0.7], np.float32))

    def model_fn(x_t, t):
        return jt.concat([w_eps * x_t, jt.tanh(w_v * x_t)], dim=1)

    x0, noise = _rand(17, scale=0.5), _rand(18)
    terms = training_losses(sched, model_fn, jt.array(x0), jt.array(np.array([0, 350], np.int32)),
                            jt.array(noise))
    g_vb_eps, g_vb_v = jt.grad(terms["vb"].sum(), [w_eps, w_v])
    g_mse_eps, g_mse_v = jt.grad(terms["mse"].sum(), [w_eps, w_v])
    g_loss_eps = jt.grad(terms["loss"].sum(), w_eps)
    assert g_vb_eps.numpy()[0] == 0.0 and abs(g_vb_v.numpy()[0]) > 1e-6
    assert g_mse_v.numpy()[0] == 0.0 and abs(g_mse_eps.numpy()[0]) > 1e-6
    np.testing.assert_allclose(g_loss_eps.numpy(), g_mse_eps.numpy(), rtol=1e-6)


def test_model_timesteps_map(jt, sched):
    assert model_timesteps(sched, 7, B).numpy().tolist() == [7, 7]
    spaced = respace(sched, range(0, 1000, 20))
    assert model_timesteps(spaced, 3, B).numpy().tolist() == [60, 60]
    got = model_timesteps(spaced, jt.array(np.array([0, 49], np.int32)), B)
    assert got.dtype == "int32" and got.numpy().tolist() == [0, 980]

"""Shared layers against float64 numpy references."""

import numpy as np
import pytest


def numpy_group_norm(x, groups, weight, bias, eps):
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_group_norm_two_pass_matches_float64(jt, offset):
    from models.layers import GroupNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 6, 5)) + offset).astype(np.float32)
    norm = GroupNorm(4, 8, eps=1e-6)
    weight, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    norm.weight.update(jt.array(weight))
    norm.bias.update(jt.array(bias))
    got = norm(jt.array(x)).numpy()
    expected = numpy_group_norm(x, 4, weight, bias, 1e-6)
    # The offset itself is only representable to ~1e-5 in float32; a one-pass variance errs ~3e-2.
    np.testing.assert_allclose(got, expected, atol=2e-4 if offset else 2e-5)


def test_group_norm_gradient_matches_finite_differences(jt):
    from models.layers import group_norm

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 3, 3))
    probe = rng.standard_normal((1, 4, 3, 3))

    def objective(values):
        return float((numpy_group_norm(values, 2, np.ones(4), np.zeros(4), 1e-5) * probe).sum())

    xv = jt.array(x.astype(np.float32))
    loss = (group_norm(xv, 2, eps=1e-5) * jt.array(probe.astype(np.float32))).sum()
    grad = jt.grad(loss, xv).numpy()
    expected = np.zeros_like(x)
    h = 1e-6
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = h
        expected[index] = (objective(x + step) - objective(x - step)) / (2 * h)
    np.testing.assert_allclose(grad, expected, atol=1e-4)


def test_silu(jt):
    from models.layers import silu

    x = np.linspace(-6, 6, 25).astype(np.float32)
    np.testing.assert_allclose(silu(jt.array(x)).numpy(), x / (1 + np.exp(-x.astype(np.float64))), atol=1e-6)

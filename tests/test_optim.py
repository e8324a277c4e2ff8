"""The fused Adam/AdamW + EMA step (training/optim.py) against Jittor's own optimizers, a float64
numpy AdamW and EMA, and a save/resume round trip through training/state.py."""

import numpy as np
import pytest

# Twenty tensors, mixed shapes; small, so shapes compile once.
SHAPES = [(5, 3), (7,), (4, 4, 3), (1,), (2, 3, 2)] * 4
LR, BETAS, EPS, WD, DECAY = 1e-2, (0.9, 0.99), 1e-8, 0.1, 0.9


def _data(steps=3, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    return init, grads


def _step(jt, optimizer, grads, n, **kw):
    optimizer.param_groups[0]["grads"] = [jt.array(g) for g in grads]
    optimizer.n_step = n
    optimizer.step(**kw)


def numpy_adamw_ema(init, grads, lr, betas, eps, wd, decay):
    """AdamW (Loshchilov & Hutter; Jittor's placement of eps: sqrt(v_hat) + eps) and the EMA of the
    weights after each step, in float64."""
    b0, b1 = betas
    p = [x.astype(np.float64) for x in init]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    e = [x.copy() for x in p]
    for n, gs in enumerate(grads, start=1):
        for k, g in enumerate(gs):
            g = g.astype(np.float64)
            m[k] = b0 * m[k] + (1 - b0) * g
            v[k] = b1 * v[k] + (1 - b1) * g * g
            m_hat, v_hat = m[k] / (1 - b0 ** n), v[k] / (1 - b1 ** n)
            p[k] = p[k] * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
            e[k] = decay * e[k] + (1 - decay) * p[k]
    return p, m, v, e


@pytest.mark.parametrize("parallel_min", [0, 1 << 30])
def test_fused_adamw_matches_jittor_adamw(jt, monkeypatch, parallel_min):
    import training.optim as optim

    monkeypatch.setattr(optim, "PARALLEL_MIN_ELEMENTS", parallel_min)   # threaded and one-thread paths
    monkeypatch.setattr(optim, "CHUNK", 8)                              # three ops, the last one short
    init, grads = _data()
    ref_params, fused_params = [jt.array(x) for x in init], [jt.array(x) for x in init]
    ref = jt.optim.AdamW(ref_params, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    fused = optim.FusedAdamW(fused_params, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    for n, gs in enumerate(grads, start=1):
        _step(jt, ref, gs, n)
        _step(jt, fused, gs, n)
    for a, b in zip(ref_params, fused_params):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)
    for key in ("m", "values"):
        for a, b in zip(ref.param_groups[0][key], fused.param_groups[0][key]):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=2e-7)  # an ulp or two


def test_fused_adam_matches_jittor_adam_with_l2(jt):
    from training.optim import FusedAdam

    init, grads = _data(seed=1)
    ref_params, fused_params = [jt.array(x) for x in init], [jt.array(x) for x in init]
    ref = jt.optim.Adam(ref_params, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    fused = FusedAdam(fused_params, LR, eps=EPS, betas=BETAS, weight_decay=WD, decoupled=False)
    for n, gs in enumerate(grads, start=1):
        _step(jt, ref, gs, n)
        _step(jt, fused, gs, n)
    for a, b in zip(ref_params, fused_params):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)


def test_fused_adamw_and_ema_match_float64_numpy(jt):
    from training.optim import FusedAdamW

    init, grads = _data(steps=4, seed=2)
    params = [jt.array(x) for x in init]
    ema = [jt.array(x) for x in init]
    opt = FusedAdamW(params, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    for n, gs in enumerate(grads, start=1):
        _step(jt, opt, gs, n, ema=ema, ema_decay=DECAY)
    p, m, v, e = numpy_adamw_ema(init, grads, LR, BETAS, EPS, WD, DECAY)
    for k in range(len(SHAPES)):
        np.testing.assert_allclose(params[k].numpy(), p[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ema[k].numpy(), e[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.param_groups[0]["m"][k].numpy(), m[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(opt.param_groups[0]["values"][k].numpy(), v[k], rtol=1e-5, atol=1e-8)


def test_state_saves_and_resumes_bit_exactly_and_reads_jittor_adamw_state(jt):
    from training.optim import FusedAdamW
    from training.state import adam_state, load_adam_state
    from weights.checkpoint import WeightsError

    init, grads = _data(steps=4, seed=3)
    names = [f"w{k}" for k in range(len(SHAPES))]
    straight = [jt.array(x) for x in init]
    opt = FusedAdamW(straight, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    for n, gs in enumerate(grads, start=1):
        _step(jt, opt, gs, n)

    # Two steps with Jittor's own AdamW (the optimizer of older checkpoints), saved as numpy ...
    first = [jt.array(x) for x in init]
    old = jt.optim.AdamW(first, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    for n, gs in enumerate(grads[:2], start=1):
        _step(jt, old, gs, n)
    saved = {k: v.numpy().copy() for k, v in adam_state(old, names).items()}
    weights = [p.numpy().copy() for p in first]
    # ... and two fused steps after loading them.
    resumed = [jt.array(w) for w in weights]
    fused = FusedAdamW(resumed, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    load_adam_state(fused, names, saved, 2, "test")
    assert fused.n_step == 2
    for n, gs in enumerate(grads[2:], start=3):
        _step(jt, fused, gs, n)
    for a, b in zip(straight, resumed):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)

    # Fused to fused: a save and load in the middle changes nothing, to the bit.
    again = [jt.array(x) for x in init]
    opt_a = FusedAdamW(again, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    for n, gs in enumerate(grads[:2], start=1):
        _step(jt, opt_a, gs, n)
    saved = {k: v.numpy().copy() for k, v in adam_state(opt_a, names).items()}
    restart = [jt.array(p.numpy().copy()) for p in again]
    opt_b = FusedAdamW(restart, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    load_adam_state(opt_b, names, saved, 2, "test")
    for n, gs in enumerate(grads[2:], start=3):
        _step(jt, opt_a, gs, n)
        _step(jt, opt_b, gs, n)
    for a, b in zip(again, restart):
        np.testing.assert_array_equal(b.numpy(), a.numpy())

    broken = dict(saved)
    broken["m/w0"] = np.zeros((2, 2), np.float32)
    with pytest.raises(WeightsError, match="m/w0"):
        load_adam_state(opt_b, names, broken, 2, "test")


def test_non_float32_is_refused(jt):
    from training.optim import FusedAdamW

    p = jt.array(np.ones(3, np.float16))
    opt = FusedAdamW([p], LR)
    with pytest.raises(TypeError, match="float32"):
        _step(jt, opt, [np.ones(3, np.float16)], 1)


@pytest.mark.cuda
def test_fused_adamw_and_ema_on_cuda_match_float64_numpy(jt):
    from training.optim import FusedAdamW

    init, grads = _data(steps=4, seed=4)
    params = [jt.array(x) for x in init]
    ema = [jt.array(x) for x in init]
    opt = FusedAdamW(params, LR, eps=EPS, betas=BETAS, weight_decay=WD)
    for n, gs in enumerate(grads, start=1):
        _step(jt, opt, gs, n, ema=ema, ema_decay=DECAY)
    p, _, _, e = numpy_adamw_ema(init, grads, LR, BETAS, EPS, WD, DECAY)
    for k in range(len(SHAPES)):
        np.testing.assert_allclose(params[k].numpy(), p[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ema[k].numpy(), e[k], rtol=1e-5, atol=1e-6)


def test_a_finite_loss_with_non_finite_gradients_is_not_stepped(jt):
    """sqrt at 0 has an infinite slope: the loss sqrt(w - 1) at w = (1, 2) is finite, its gradient
    (inf, 0.5) is not.
    finite_gradients says so, discard_gradients leaves the weights and the step count as they were,
    and a finite loss afterwards steps normally."""
    from jittor import nn

    from training.optim import discard_gradients, finite_gradients

    w = jt.array(np.array([1.0, 2.0], np.float32))
    optimizer = nn.Adam([w], lr=0.1)
    assert float(jt.sqrt(w - 1.0).sum().item()) == 1.0
    assert finite_gradients(optimizer, jt.sqrt(w - 1.0).sum()) is False
    discard_gradients(optimizer)
    assert optimizer.n_step == 0
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert finite_gradients(optimizer, (w * w).sum()) is True
    optimizer.step()
    assert optimizer.n_step == 1 and (w.numpy() < [1.0, 2.0]).all()

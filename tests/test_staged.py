"""Gradient checkpointing (models/staged.py): the staged pass gives the loss and every
parameter's gradient of plain autodiff through the U-Net, within float32 rounding."""

import numpy as np
import pytest

B, H, W = 2, 16, 24


def randomised_unet(jt):
    """Tiny U-Net whose zero-initialised convolutions (each residual branch's last one, the
    attention projections, the output) are made random, so every parameter gets a gradient."""
    from models import UNetModel, unet_preset

    jt.set_global_seed(0)
    unet = UNetModel(unet_preset("tiny"))
    rng = np.random.default_rng(1)
    for name, p in unet.named_parameters():
        if not np.any(p.numpy()):
            p.update(jt.array(0.1 * rng.standard_normal(p.shape).astype(np.float32)))
    return unet


def test_staged_pass_matches_plain_autodiff(jt):
    from ldm import make_schedule
    from ldm.losses import training_losses
    from models.staged import StagedPass

    unet = randomised_unet(jt)
    unet.train()
    schedule = make_schedule()
    rng = np.random.default_rng(0)
    x0 = jt.array(rng.standard_normal((B, 3, H, W)).astype(np.float32))
    noise = jt.array(rng.standard_normal((B, 3, H, W)).astype(np.float32))
    t = jt.array(np.array([3, 870], np.int32))
    labels = rng.integers(0, 29, (B, H, W))
    mask = jt.array(np.eye(29, dtype=np.float32)[labels].transpose(0, 3, 1, 2))
    params = [p for p in unet.parameters() if not p.is_stop_grad()]

    plain = training_losses(schedule, lambda x, s: unet(x, s, mask), x0, t, noise)
    plain_grads = [g.numpy() for g in jt.grad(plain["loss"].mean(), params)]

    staged = StagedPass(unet, mask)
    terms = training_losses(schedule, staged.forward, x0, t, noise)
    by_id = staged.backward(jt.grad(terms["loss"].mean(), staged.output))
    assert set(by_id) == {id(p) for p in params}
    for name in ("loss", "mse", "vb"):
        np.testing.assert_allclose(terms[name].numpy(), plain[name].numpy(), rtol=1e-5, atol=1e-7)
    names = [n for n, p in unet.named_parameters() if not p.is_stop_grad()]
    for name, p, expected in zip(names, params, plain_grads):
        scale = np.abs(expected).max() + 1e-12
        np.testing.assert_allclose(by_id[id(p)].numpy() / scale, expected / scale, rtol=0, atol=2e-5, err_msg=name)
    assert sum(float(np.abs(g).sum()) > 0 for g in plain_grads) == len(plain_grads)   # none trivially zero
    with pytest.raises(RuntimeError, match="needs a forward first"):
        staged.backward(jt.zeros((B, 6, H, W)))

"""Classifier-free guidance: scale 1 is the masked model, the batched 2B pass equals two separate
passes mixed by the formula (eps only; variance from the masked pass); mask dropout frequency."""

import math

import numpy as np
import pytest

import jittor as jt

from ldm.guidance import classifier_free_guidance, drop_masks, mix_guidance, null_mask_like

B, C, K, H, W = 2, 3, 5, 8, 12


def _rand(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mask(seed):
    labels = np.random.default_rng(seed).integers(0, K, size=(B, H, W))
    return np.eye(K, dtype=np.float32)[labels].transpose(0, 3, 1, 2)


class RecordingUNet:
    """unet(x_t, t, mask) with a closed form that depends on all three, per sample; records the
    batch size of each call."""

    def __init__(self, learned_variance=True):
        self.learned_variance = learned_variance
        self.batches = []

    def __call__(self, x_t, t, mask):
        self.batches.append(x_t.shape[0])
        weight = 1.0 + mask.sum(dim=1, keepdims=True) + 0.5 * mask[:, 1:2]
        eps = 0.5 * x_t * weight + 1e-3 * t.float32().reshape(-1, 1, 1, 1)
        if not self.learned_variance:
            return eps
        return jt.concat([eps, jt.tanh(x_t + mask[:, :C])], dim=1)


def _unet_np(x, t, mask, learned_variance=True):
    weight = 1.0 + mask.sum(axis=1, keepdims=True) + 0.5 * mask[:, 1:2]
    eps = 0.5 * x * weight + 1e-3 * np.asarray(t, np.float64).reshape(-1, 1, 1, 1)
    if not learned_variance:
        return eps
    return np.concatenate([eps, np.tanh(x + mask[:, :C])], axis=1)


def test_scale_one_is_the_masked_model(jt):
    x, mask = _rand(0, (B, C, H, W)), _mask(1)
    t = jt.array(np.array([500, 500], np.int32))
    unet = RecordingUNet()
    plain = unet(jt.array(x), t, jt.array(mask)).numpy()
    unet.batches.clear()
    guided = classifier_free_guidance(unet, jt.array(mask), 1.0)(jt.array(x), t).numpy()
    np.testing.assert_array_equal(guided, plain)
    assert unet.batches == [B]
    # The mixing formula itself at s = 1 returns the masked output.
    null_out = unet(jt.array(x), t, jt.array(np.zeros_like(mask)))
    mixed = mix_guidance(jt.array(plain), null_out, 1.0, C).numpy()
    np.testing.assert_allclose(mixed, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("learned_variance", [True, False])
def test_batched_pass_equals_two_passes(jt, learned_variance):
    x, mask = _rand(2, (B, C, H, W)), _mask(3)
    t = np.array([250, 250], np.int32)
    scale = 3.5
    unet = RecordingUNet(learned_variance)
    guided = classifier_free_guidance(unet, jt.array(mask), scale)(jt.array(x), jt.array(t)).numpy()
    assert unet.batches == [2 * B]  # one network call on the doubled batch
    separate_mask = unet(jt.array(x), jt.array(t), jt.array(mask)).numpy()
    separate_null = unet(jt.array(x), jt.array(t), jt.array(np.zeros_like(mask))).numpy()
    eps = separate_null[:, :C] + scale * (separate_mask[:, :C] - separate_null[:, :C])
    expected = np.concatenate([eps, separate_mask[:, C:]], axis=1)
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5)
    # And against the closed form in float64.
    m_np = _unet_np(x.astype(np.float64), t, mask, learned_variance)
    n_np = _unet_np(x.astype(np.float64), t, np.zeros_like(mask), learned_variance)
    eps_np = n_np[:, :C] + scale * (m_np[:, :C] - n_np[:, :C])
    np.testing.assert_allclose(guided[:, :C], eps_np, rtol=1e-5, atol=1e-5)
    if learned_variance:
        np.testing.assert_allclose(guided[:, C:], m_np[:, C:], rtol=1e-5, atol=1e-5)


def test_null_mask_and_bad_masks(jt):
    mask = _mask(4)
    assert not null_mask_like(mask).any() and null_mask_like(mask).shape == mask.shape
    assert null_mask_like(jt.array(mask)).numpy().sum() == 0.0
    with pytest.raises(ValueError, match="num_classes"):
        classifier_free_guidance(RecordingUNet(), jt.array(mask[0]), 2.0)
    guided = classifier_free_guidance(RecordingUNet(), jt.array(mask), 2.0)
    with pytest.raises(ValueError, match="batch"):
        guided(jt.array(_rand(5, (1, C, H, W))), jt.array(np.array([3], np.int32)))


def test_drop_masks_frequency_and_whole_masks():
    n, p = 4000, 0.2
    labels = np.random.default_rng(6).integers(0, K, size=(n, 4, 4))
    mask = np.eye(K, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    dropped = drop_masks(mask, p, np.random.default_rng(7))
    per_sample = dropped.reshape(n, -1).sum(axis=1)
    # Each mask is either intact (one 1 per pixel) or entirely the null mask.
    assert set(np.unique(per_sample)) <= {0.0, 16.0}
    kept = per_sample == 16.0
    np.testing.assert_array_equal(dropped[kept], mask[kept])
    rate = 1.0 - kept.mean()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    # Seeded: the same generator state drops the same samples.
    np.testing.assert_array_equal(drop_masks(mask, p, np.random.default_rng(7)), dropped)
    assert drop_masks(mask, 0.0, np.random.default_rng(8)).sum() == mask.sum()
    assert drop_masks(mask, 1.0, np.random.default_rng(8)).sum() == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_masks(mask, 1.5, np.random.default_rng(8))


def test_drop_masks_on_jittor(jt):
    mask = _mask(9)
    rng_state = np.random.default_rng(10)
    expected_keep = np.random.default_rng(10).random(B) >= 0.5
    got = drop_masks(jt.array(mask), 0.5, rng_state).numpy()
    for i in range(B):
        np.testing.assert_array_equal(got[i], mask[i] if expected_keep[i] else 0.0)

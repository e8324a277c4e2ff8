"""LPIPS-AlexNet (SDM's diversity score) against a float64 numpy computation on random weights."""

import numpy as np
import pytest

import jittor_env  # noqa: F401

from scoring.lpips_alex import ALEX_CONVS, CHANNELS, LPIPSAlex, load_lpips_alex, mean_pairwise_lpips, to_input
from weights.checkpoint import WeightsError, load_weights, write_safetensors


def conv_np(x, w, b, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w)
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def maxpool_np(x):
    n, c, h, w = x.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    return np.stack([np.stack([x[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(2, 3)) for j in range(ow)], -1)
                     for i in range(oh)], -2)


def lpips_np(state, x, y):
    """Independent float64 LPIPS-AlexNet: the formula of the module docstring."""
    shift = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def maps(z):
        h = (z - shift) / scale
        out = []
        for k, (index, (_, _, _, stride, pad)) in enumerate(ALEX_CONVS.items()):
            h = np.maximum(conv_np(h, state[f"features.{k}.weight"], state[f"features.{k}.bias"], stride, pad), 0)
            out.append(h)
            if index in (0, 3):
                h = maxpool_np(h)
        return out

    total = 0.0
    for k, (fx, fy) in enumerate(zip(maps(x), maps(y))):
        nx = fx / np.sqrt((fx ** 2).sum(1, keepdims=True) + 1e-10)
        ny = fy / np.sqrt((fy ** 2).sum(1, keepdims=True) + 1e-10)
        total += np.einsum("nchw,c->nhw", (nx - ny) ** 2, state[f"heads.{k}.weight"].reshape(-1)).mean()
    return total


def random_state(rng):
    state = {}
    for k, (i, o, size, _, _) in enumerate(ALEX_CONVS.values()):
        state[f"features.{k}.weight"] = rng.normal(0, np.sqrt(2.0 / (i * size * size)), (o, i, size, size))
        state[f"features.{k}.bias"] = rng.normal(0, 0.1, o)
    for k, c in enumerate(CHANNELS):
        state[f"heads.{k}.weight"] = rng.uniform(0, 0.1, (1, c, 1, 1))
    return state


def test_lpips_alex_matches_float64_numpy():
    rng = np.random.default_rng(0)
    state = random_state(rng)
    model = LPIPSAlex()
    load_weights(model, {k: v.astype(np.float32) for k, v in state.items()})
    images = rng.integers(0, 256, size=(4, 64, 64, 3)).astype(np.uint8)
    x = images[:2].astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1
    y = images[2:].astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1
    expected = lpips_np(state, x, y)
    got = float(model(to_input(images[:2]), to_input(images[2:])).item())
    assert got == pytest.approx(expected, rel=1e-4)
    assert float(model(to_input(images[:1]), to_input(images[:1])).item()) == 0.0
    pairs = [lpips_np(state, a, b) for a, b in ((x[:1], x[1:]), (x[:1], y[:1]), (x[1:], y[:1]))]
    diversity = mean_pairwise_lpips(model, [images[0], images[1], images[2]])
    assert diversity == pytest.approx(np.mean(pairs), rel=1e-4)


def test_weights_from_torchvision_and_stargan_names(tmp_path):
    rng = np.random.default_rng(1)
    state = {k: v.astype(np.float32) for k, v in random_state(rng).items()}
    order = list(ALEX_CONVS)
    alex = {f"features.{order[k]}.{p}": state[f"features.{k}.{p}"] for k in range(5) for p in ("weight", "bias")}
    alex["classifier.1.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(tmp_path / "alex.safetensors", alex, {})
    write_safetensors(tmp_path / "heads.safetensors",
                      {f"lpips_weights.{k}.main.1.weight": state[f"heads.{k}.weight"] for k in range(5)}, {})
    model = load_lpips_alex(tmp_path / "alex.safetensors", tmp_path / "heads.safetensors")
    assert np.array_equal(model.features[2].weight.numpy(), state["features.2.weight"])
    assert np.array_equal(model.heads[4].weight.numpy(), state["heads.4.weight"])
    with pytest.raises(WeightsError, match="no LPIPS heads"):
        load_lpips_alex(tmp_path / "alex.safetensors", tmp_path / "alex.safetensors")

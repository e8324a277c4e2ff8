"""The SDM U-Net against independent float64 numpy forwards and SDM's parameter table.

Numpy references are written here from the equations and SDM's ``guided_diffusion/unet.py``;
they share no code with ``models/``. Tiny widths, batch 2, non-square 16x24 and 8x12 latents.
"""

import hashlib
import json

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

HEIGHT, WIDTH = 16, 24


# ---------------------------------------------------------------- float64 numpy references

def np_conv2d(x, weight, bias=None, stride=1):
    """PyTorch Conv2d with padding k // 2 (the U-Net's 3x3 and 1x1 convolutions)."""
    k = weight.shape[-1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.einsum("bchwij,ocij->bohw", windows, weight, optimize=True)
    return y if bias is None else y + bias[None, :, None, None]


def np_group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    y = ((g - g.mean(2, keepdims=True)) / np.sqrt(g.var(2, keepdims=True) + eps)).reshape(x.shape)
    if weight is not None:
        shape = (1, c) + (1,) * (x.ndim - 2)
        y = y * weight.reshape(shape) + bias.reshape(shape)
    return y


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def exact_nearest_rows(in_size, out_size):
    """floor(dst * in / out) in exact integer arithmetic (equals PyTorch's float32 rule for every
    size pair used below; see test_nearest_indices_follow_pytorch)."""
    return (np.arange(out_size) * in_size) // out_size


def np_resize_nearest(x, height, width):
    return x[:, :, exact_nearest_rows(x.shape[2], height)][:, :, :, exact_nearest_rows(x.shape[3], width)]


def np_up2(x):
    return x.repeat(2, axis=2).repeat(2, axis=3)


def np_down2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def np_timestep_embedding(t, dim):
    """guided-diffusion's embedding; the reference forms t * freqs in float32, so we do too."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half).astype(np.float32)
    args = (np.asarray(t, np.float32)[:, None] * freqs[None]).astype(np.float64)
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    return np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=1) if dim % 2 else emb


def np_spade(x, mask, p, groups):
    """SPADE: GN(x) * (1 + gamma(mask)) + beta(mask), mask resized nearest to x."""
    normalized = np_group_norm(x, groups)
    m = np_resize_nearest(mask, x.shape[2], x.shape[3])
    actv = np.maximum(np_conv2d(m, p["mlp_shared.0.weight"], p["mlp_shared.0.bias"]), 0.0)
    gamma = np_conv2d(actv, p["mlp_gamma.weight"], p["mlp_gamma.bias"])
    beta = np_conv2d(actv, p["mlp_beta.weight"], p["mlp_beta.bias"])
    return normalized * (1.0 + gamma) + beta


def _resample(h, x, up, down):
    if up:
        return np_up2(h), np_up2(x)
    if down:
        return np_down2(h), np_down2(x)
    return h, x


def _skip(x, p):
    if "skip_connection.weight" in p:
        return np_conv2d(x, p["skip_connection.weight"], p["skip_connection.bias"])
    return x


def np_resblock(x, emb, p, groups, scale_shift, up=False, down=False):
    h = np_silu(np_group_norm(x, groups, p["in_layers.0.weight"], p["in_layers.0.bias"]))
    h, x = _resample(h, x, up, down)
    h = np_conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"])
    e = np_linear(np_silu(emb), p, "emb_layers.1")[:, :, None, None]
    c = h.shape[1]
    if scale_shift:
        h = np_group_norm(h, groups, p["out_layers.0.weight"], p["out_layers.0.bias"]) * (1 + e[:, :c]) + e[:, c:]
    else:
        h = np_group_norm(h + e, groups, p["out_layers.0.weight"], p["out_layers.0.bias"])
    h = np_conv2d(np_silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"])
    return _skip(x, p) + h


def np_sdm_resblock(x, emb, mask, p, groups, scale_shift, up=False):
    h = np_silu(np_spade(x, mask, sub(p, "in_norm."), groups))
    h, x = _resample(h, x, up, False)
    h = np_conv2d(h, p["in_layers.1.weight"], p["in_layers.1.bias"])
    e = np_linear(np_silu(emb), p, "emb_layers.1")[:, :, None, None]
    c = h.shape[1]
    if scale_shift:
        h = np_spade(h, mask, sub(p, "out_norm."), groups) * (1 + e[:, :c]) + e[:, c:]
    else:
        h = np_spade(h + e, mask, sub(p, "out_norm."), groups)
    h = np_conv2d(np_silu(h), p["out_layers.2.weight"], p["out_layers.2.bias"])
    return _skip(x, p) + h


def np_attention(x, p, heads, groups, legacy=True):
    """x + proj_out(attention(qkv(GN(x)))); legacy: heads split before q/k/v."""
    b, c, height, width = x.shape
    flat = x.reshape(b, c, -1)
    n = np_group_norm(flat, groups, p["norm.weight"], p["norm.bias"])
    qkv = np.einsum("oc,bct->bot", p["qkv.weight"][:, :, 0], n) + p["qkv.bias"][None, :, None]
    ch = c // heads
    if legacy:
        q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, -1), 3, axis=1)
    else:
        q, k, v = (part.reshape(b * heads, ch, -1) for part in np.split(qkv, 3, axis=1))
    logits = np.einsum("bct,bcs->bts", q, k) / np.sqrt(ch)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
    out = np.einsum("oc,bct->bot", p["proj_out.weight"][:, :, 0], a) + p["proj_out.bias"][None, :, None]
    return (flat + out).reshape(x.shape)


def sub(p, prefix):
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def np_unet(p, cfg, x, t, mask):
    """SDM's UNetModel forward (resblock_updown variant), walking its constructor's loops."""
    g, ss, nrb = cfg.norm_groups, cfg.use_scale_shift_norm, cfg.num_res_blocks
    mc = cfg.model_channels
    heads = lambda ch: ch // cfg.num_head_channels  # noqa: E731
    emb = np_timestep_embedding(t, mc)
    emb = np_linear(np_silu(np_linear(emb, p, "time_embed.0")), p, "time_embed.2")
    h = np_conv2d(x, p["input_blocks.0.0.weight"], p["input_blocks.0.0.bias"])
    skips, index, ds = [h], 1, 1
    for level in range(len(cfg.channel_mult)):
        for _ in range(nrb):
            h = np_resblock(h, emb, sub(p, f"input_blocks.{index}.0."), g, ss)
            if ds in cfg.attention_resolutions:
                h = np_attention(h, sub(p, f"input_blocks.{index}.1."), heads(h.shape[1]), g)
            skips.append(h)
            index += 1
        if level != len(cfg.channel_mult) - 1:
            h = np_resblock(h, emb, sub(p, f"input_blocks.{index}.0."), g, ss, down=True)
            skips.append(h)
            index, ds = index + 1, ds * 2
    h = np_sdm_resblock(h, emb, mask, sub(p, "middle_block.0."), g, ss)
    h = np_attention(h, sub(p, "middle_block.1."), heads(h.shape[1]), g)
    h = np_sdm_resblock(h, emb, mask, sub(p, "middle_block.2."), g, ss)
    index = 0
    for level in reversed(range(len(cfg.channel_mult))):
        for i in range(nrb + 1):
            h = np.concatenate([h, skips.pop()], axis=1)
            h = np_sdm_resblock(h, emb, mask, sub(p, f"output_blocks.{index}.0."), g, ss)
            j = 1
            if ds in cfg.attention_resolutions:
                h = np_attention(h, sub(p, f"output_blocks.{index}.{j}."), heads(h.shape[1]), g)
                j += 1
            if level and i == nrb:
                h = np_sdm_resblock(h, emb, mask, sub(p, f"output_blocks.{index}.{j}."), g, ss, up=True)
                ds //= 2
            index += 1
    h = np_silu(np_group_norm(h, g, p["out.0.weight"], p["out.0.bias"]))
    return np_conv2d(h, p["out.2.weight"], p["out.2.bias"])


# ---------------------------------------------------------------- helpers

def random_state(module, seed):
    """Random weights for every array of ``module`` (zero-initialised ones included): group-norm
    scales near 1, other weights ~ 0.5 / sqrt(fan_in), biases ~ 0.1."""
    from weights.checkpoint import module_shapes

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in sorted(module_shapes(module).items()):
        if len(shape) == 1 and name.endswith(".weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) * 0.5 / np.sqrt(np.prod(shape[1:]))
        state[name] = value.astype(np.float32)
    return state


def randomize(module, seed):
    from weights.checkpoint import load_weights

    state = random_state(module, seed)
    load_weights(module, state)
    return {k: v.astype(np.float64) for k, v in state.items()}


def one_hot_mask(rng, batch, classes, height, width):
    labels = rng.integers(0, classes, size=(batch, height, width))
    return np.eye(classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def tiny(jt):
    from models import unet_preset

    return unet_preset("tiny")


# ---------------------------------------------------------------- timestep embedding, resizing

@pytest.mark.parametrize("dim", [16, 33])
def test_timestep_embedding_matches_formula(jt, dim):
    from models.blocks import timestep_embedding

    t = np.array([0, 1, 17, 500, 999])
    got = timestep_embedding(jt.array(t), dim).numpy()
    assert got.shape == (5, dim) and got.dtype == np.float32
    # Against the exact float64 formula: float32 arguments t * f err by up to ~999 * 6e-8.
    half = dim // 2
    args = t[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / half)[None]
    exact = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((5, 1))] if dim % 2 else []), axis=1)
    np.testing.assert_allclose(got, exact, atol=1e-4)
    # Against the reference's own float32 arguments: float32 precision.
    np.testing.assert_allclose(got, np_timestep_embedding(t, dim), atol=2e-6)


def test_nearest_indices_follow_pytorch(jt):
    from models.blocks import nearest_indices

    # Every level of the iidm latent (96x128) and of the tests: exact floor(dst * in / out).
    for in_size in (6, 8, 12, 16, 24, 32, 48, 64, 96, 128):
        for out_size in (in_size // 2, in_size // 4, in_size // 8, in_size, 5, 7, 3):
            if out_size >= 1:
                np.testing.assert_array_equal(nearest_indices(in_size, out_size),
                                              exact_nearest_rows(in_size, out_size))
    np.testing.assert_array_equal(nearest_indices(5, 10), np.arange(10) // 2)
    # Where float32 and exact arithmetic disagree PyTorch follows float32: F.interpolate of
    # 2 -> 82 samples index 0 at positions 38..41 (checked with PyTorch 2.13); exact gives 1 at 41.
    np.testing.assert_array_equal(nearest_indices(2, 82)[38:44], [0, 0, 0, 0, 1, 1])
    assert exact_nearest_rows(2, 82)[41] == 1


@pytest.mark.parametrize("in_size, out_size", [
    ((96, 128), (48, 64)), ((96, 128), (24, 32)), ((96, 128), (12, 16)), ((96, 128), (6, 8)),
    ((16, 24), (8, 12)), ((8, 12), (5, 7)), ((6, 8), (13, 17)), ((2, 82), (3, 82))])
def test_resize_nearest_matches_numpy_gather(jt, in_size, out_size):
    """Also guards the numpy 2 trap: numpy arrays passed into Jittor must not be corrupted."""
    from models.blocks import nearest_indices, resize_nearest

    x = np.random.default_rng(0).standard_normal((2, 3) + in_size).astype(np.float32)
    got = resize_nearest(jt.array(x), *out_size).numpy()
    rows, cols = nearest_indices(in_size[0], out_size[0]), nearest_indices(in_size[1], out_size[1])
    np.testing.assert_array_equal(got, x[:, :, rows][:, :, :, cols])


# ---------------------------------------------------------------- blocks

def test_spade_group_norm_matches_numpy(jt):
    from models.blocks import SPADEGroupNorm

    rng = np.random.default_rng(1)
    spade = SPADEGroupNorm(8, 5, num_groups=4, hidden_channels=6)
    p = randomize(spade, 2)
    x = (rng.standard_normal((2, 8, 8, 12)) * 2.0 + 3.0).astype(np.float32)
    mask = one_hot_mask(rng, 2, 5, 16, 24)
    got = spade(jt.array(x), jt.array(mask)).numpy()
    expected = np_spade(x.astype(np.float64), mask.astype(np.float64), p, 4)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_attention_block_matches_numpy_legacy_order(jt):
    from models.blocks import AttentionBlock

    rng = np.random.default_rng(3)
    block = AttentionBlock(16, num_head_channels=8, num_groups=4)
    assert block.num_heads == 2
    p = randomize(block, 4)
    x = rng.standard_normal((2, 16, 4, 6)).astype(np.float32)
    got = block(jt.array(x)).numpy()
    expected = np_attention(x.astype(np.float64), p, 2, 4, legacy=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    # The head layout matters: the newer q/k/v-first order gives a different result.
    other = np_attention(x.astype(np.float64), p, 2, 4, legacy=False)
    assert np.abs(other - expected).max() > 1e-2


@pytest.mark.parametrize("scale_shift, out_channels, down", [(True, 16, False), (False, 8, True)])
def test_resblock_matches_numpy(jt, scale_shift, out_channels, down):
    from models.blocks import ResBlock

    rng = np.random.default_rng(5)
    block = ResBlock(8, 12, 0.0, out_channels=out_channels, use_scale_shift_norm=scale_shift,
                     down=down, num_groups=4)
    p = randomize(block, 6)
    assert ("skip_connection.weight" in p) == (out_channels != 8)
    x = (rng.standard_normal((2, 8, 8, 12)) + 1.0).astype(np.float32)
    emb = rng.standard_normal((2, 12)).astype(np.float32)
    got = block(jt.array(x), jt.array(emb)).numpy()
    expected = np_resblock(x.astype(np.float64), emb.astype(np.float64), p, 4, scale_shift, down=down)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_sdm_resblock_matches_numpy(jt):
    from models.blocks import SDMResBlock

    rng = np.random.default_rng(7)
    block = SDMResBlock(16, 12, 0.0, 5, out_channels=16, use_scale_shift_norm=True, up=True,
                        num_groups=4, spade_hidden_channels=6)
    p = randomize(block, 8)
    x = rng.standard_normal((2, 16, 4, 6)).astype(np.float32)
    emb = rng.standard_normal((2, 12)).astype(np.float32)
    mask = one_hot_mask(rng, 2, 5, 8, 12)
    got = block(jt.array(x), jt.array(emb), jt.array(mask)).numpy()
    assert got.shape == (2, 16, 8, 12)
    expected = np_sdm_resblock(x.astype(np.float64), emb.astype(np.float64),
                               mask.astype(np.float64), p, 4, True, up=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- the U-Net

def test_unet_matches_numpy_forward(jt, tiny):
    from models import UNetModel

    rng = np.random.default_rng(9)
    model = UNetModel(tiny)
    p = randomize(model, 10)
    x = rng.standard_normal((2, 3, HEIGHT, WIDTH)).astype(np.float32)
    t = np.array([7, 999])
    mask = one_hot_mask(rng, 2, 29, HEIGHT, WIDTH)
    mask[1] = 0.0  # the null mask
    got = model(jt.array(x), jt.array(t), jt.array(mask)).numpy()
    expected = np_unet(p, tiny, x.astype(np.float64), t, mask.astype(np.float64))
    assert got.shape == (2, 6, HEIGHT, WIDTH)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("height, width", [(HEIGHT, WIDTH), (8, 12)])
def test_fresh_unet_outputs_zero_until_the_output_conv_changes(jt, tiny, height, width):
    from models import UNetModel

    rng = np.random.default_rng(11)
    model = UNetModel(tiny)
    x = jt.array(rng.standard_normal((2, 3, height, width)).astype(np.float32))
    t = jt.array(np.array([0, 500]))
    mask = jt.array(one_hot_mask(rng, 2, 29, height, width))
    out = model(x, t, mask).numpy()
    assert out.shape == (2, 2 * tiny.in_channels, height, width)
    assert np.all(out == 0.0)  # out.2 is zero-initialised (guided-diffusion's zero_module)
    weight = model.state_dict()["out.2.weight"]
    weight.update(jt.array(rng.standard_normal(weight.shape).astype(np.float32) * 0.1))
    out = model(x, t, mask).numpy()
    assert np.isfinite(out).all() and np.abs(out).min(axis=(2, 3)).max() > 0.0


def test_mask_changes_the_output_and_the_null_mask_runs(jt, tiny):
    from models import UNetModel

    rng = np.random.default_rng(12)
    model = UNetModel(tiny)
    randomize(model, 13)
    x = jt.array(rng.standard_normal((2, 3, HEIGHT, WIDTH)).astype(np.float32))
    t = jt.array(np.array([5, 5]))
    with_mask = model(x, t, jt.array(one_hot_mask(rng, 2, 29, HEIGHT, WIDTH))).numpy()
    null = model(x, t, jt.zeros((2, 29, HEIGHT, WIDTH))).numpy()
    assert np.isfinite(null).all()
    assert np.abs(with_mask - null).max() > 1e-3


def test_checkpoint_round_trip_rebuilds_an_identical_unet(jt, tiny, tmp_path):
    from weights.checkpoint import module_arrays, read_checkpoint, save_checkpoint
    from models import UNetConfig, UNetModel, load_unet_state_dict
    from models.unet import PRESET_DIFFUSION

    rng = np.random.default_rng(14)
    model = UNetModel(tiny)
    randomize(model, 15)
    path = tmp_path / "unet.safetensors"
    save_checkpoint(path, module_arrays(model), kind="unet",
                    config={"network": tiny.to_dict(), "diffusion": PRESET_DIFFUSION["iidm"]})
    arrays, info = read_checkpoint(path)
    config = UNetConfig.from_dict(info["config"]["network"])
    assert config == tiny
    rebuilt = UNetModel(config)
    load_unet_state_dict(rebuilt, arrays, str(path))
    x = jt.array(rng.standard_normal((2, 3, 8, 12)).astype(np.float32))
    t = jt.array(np.array([1, 998]))
    mask = jt.array(one_hot_mask(rng, 2, 29, 8, 12))
    np.testing.assert_array_equal(rebuilt(x, t, mask).numpy(), model(x, t, mask).numpy())


def test_wrong_class_count_names_the_weights(jt):
    from weights.checkpoint import WeightsError, module_shapes
    from models import UNetModel, load_unet_state_dict, unet_preset

    model = UNetModel(unet_preset("iidm"))  # parameters are lazy: nothing is allocated here
    other = module_shapes(UNetModel(unet_preset("iidm", num_classes=35)))
    state = {name: np.broadcast_to(np.float32(0.0), shape) for name, shape in other.items()}
    with pytest.raises(WeightsError) as error:
        load_unet_state_dict(model, state, "sdm.pt")
    message = str(error.value)
    assert "sdm.pt" in message
    assert "middle_block.0.in_norm.mlp_shared.0.weight: expected (128, 29, 3, 3), file has (128, 35, 3, 3)" in message
    assert "missing" not in message and "unexpected" not in message


# sha256 of the sorted "name:d0,d1,..." lines of SDM's own UNetModel (guided_diffusion/unet.py of
# WeilunWang/semantic-diffusion-model, PyTorch 2.13) built with the IIDM arguments: in 3, out 6,
# 256 channels, mult (1,1,2,3,4), 2 res blocks, attention ds (4,8,16), 64 channels per head,
# 29 classes, scale-shift norm, resblock up/down. 660 arrays, 501,540,358 parameters.
SDM_IIDM_TABLE_SHA256 = "65e340b4fc0efff74230a85332c1623cd8098d9fa9a374b3c0dcc9490144e065"


def test_iidm_preset_has_sdm_names_and_shapes(jt):
    from weights.checkpoint import module_shapes
    from models import UNetModel, count_parameters, unet_preset

    model = UNetModel(unet_preset("iidm"))
    shapes = module_shapes(model)
    assert len(shapes) == 660
    assert count_parameters(model) == 501_540_358
    expected = {
        "time_embed.0.weight": (1024, 256),
        "time_embed.2.weight": (1024, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (256,),
        "input_blocks.1.0.emb_layers.1.weight": (512, 1024),
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.7.1.qkv.weight": (1536, 512, 1),
        "middle_block.0.in_norm.mlp_shared.0.weight": (128, 29, 3, 3),
        "middle_block.0.in_norm.mlp_gamma.weight": (1024, 128, 3, 3),
        "middle_block.0.out_norm.mlp_beta.weight": (1024, 128, 3, 3),
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.1.proj_out.weight": (1024, 1024, 1),
        "output_blocks.2.0.in_norm.mlp_gamma.weight": (1792, 128, 3, 3),
        "output_blocks.2.2.in_layers.1.weight": (1024, 1024, 3, 3),
        "output_blocks.5.1.qkv.weight": (2304, 768, 1),
        "output_blocks.14.0.out_layers.2.weight": (256, 256, 3, 3),
        "out.0.weight": (256,),
        "out.2.weight": (6, 256, 3, 3),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    table = "\n".join(f"{name}:{','.join(map(str, shape))}" for name, shape in sorted(shapes.items()))
    assert hashlib.sha256(table.encode()).hexdigest() == SDM_IIDM_TABLE_SHA256


def test_config_round_trip_and_validation(jt, tiny):
    from models import UNetConfig, UNetModel, unet_preset

    data = json.loads(json.dumps(tiny.to_dict()))
    assert UNetConfig.from_dict(data) == tiny
    assert tiny.out_channels == 6 and unet_preset("tiny", learn_sigma=False).out_channels == 3
    with pytest.raises(ValueError, match="unknown field"):
        UNetConfig.from_dict({**data, "image_size": 64})
    with pytest.raises(ValueError, match="norm_groups"):
        unet_preset("tiny", norm_groups=32)
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet_preset("huge")
    model = UNetModel(tiny)
    x, t = jt.zeros((2, 3, 9, 12)), jt.array(np.array([0, 1]))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x, t, jt.zeros((2, 29, 9, 12)))
    with pytest.raises(ValueError, match=r"mask must be \[B, num_classes, H, W\]"):
        model(jt.zeros((2, 3, 8, 12)), t, jt.zeros((2, 28, 8, 12)))


@pytest.mark.slow
def test_unet_gradient_matches_numpy_directional_derivative(jt, tiny):
    """Backward: <d loss / d x_t, v> against a central difference of the float64 numpy forward."""
    from models import UNetModel

    rng = np.random.default_rng(16)
    model = UNetModel(tiny)
    p = randomize(model, 17)
    x = rng.standard_normal((2, 3, 8, 12))
    t = np.array([30, 600])
    mask = one_hot_mask(rng, 2, 29, 8, 12).astype(np.float64)
    probe = rng.standard_normal((2, 6, 8, 12))
    direction = rng.standard_normal(x.shape)
    xv = jt.array(x.astype(np.float32))
    loss = (model(xv, jt.array(t), jt.array(mask.astype(np.float32))) * jt.array(probe.astype(np.float32))).sum()
    got = float((jt.grad(loss, xv).numpy().astype(np.float64) * direction).sum())

    def np_loss(values):
        return float((np_unet(p, tiny, values, t, mask) * probe).sum())

    h = 1e-4
    expected = (np_loss(x + h * direction) - np_loss(x - h * direction)) / (2 * h)
    assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected))


@pytest.mark.cuda
def test_fp16_torso_stays_close_to_fp32(jt, tiny):
    """use_fp16 (CUDA): float16 torso, float32 time embedding, norms and output convolution."""
    from weights.checkpoint import load_weights, module_arrays
    from models import UNetModel, unet_preset

    rng = np.random.default_rng(18)
    full = UNetModel(tiny)
    state = random_state(full, 19)
    load_weights(full, state)
    half = UNetModel(unet_preset("tiny", use_fp16=True))
    load_weights(half, state)
    arrays = module_arrays(half)
    assert arrays["input_blocks.0.0.weight"].dtype == np.float16
    assert arrays["time_embed.0.weight"].dtype == arrays["out.2.weight"].dtype == np.float32
    x = jt.array(rng.standard_normal((2, 3, HEIGHT, WIDTH)).astype(np.float32))
    t = jt.array(np.array([3, 700]))
    mask = jt.array(one_hot_mask(rng, 2, 29, HEIGHT, WIDTH))
    reference, fast = full(x, t, mask).numpy(), half(x, t, mask).numpy()
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, atol=3e-2 * np.abs(reference).max())

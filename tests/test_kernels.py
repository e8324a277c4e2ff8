"""The CPU kernels of ``models/kernels.py`` against float64 numpy references, and their selection.

References are written here from the equations: forwards in float64 numpy, gradients by central
differences of those float64 forwards (independent of the kernels' hand-written backwards).
Inputs include a large mean (+100: a one-pass variance errs ~3e-2 there), odd sizes and batch 1.
``PARALLEL_MIN_ELEMENTS`` is set to 0 so the small tensors take the multi-threaded path.
"""

import numpy as np
import pytest

# ------------------------------------------------------------------ float64 numpy references


def np_group_norm_act(x, groups, weight=None, bias=None, gamma=None, beta=None, scale=None,
                      shift=None, silu=False, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    z = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        z = z * weight.reshape(per_channel) + bias.reshape(per_channel)
    if gamma is not None:
        z = z * (1 + gamma) + beta
    if scale is not None:
        z = z * (1 + scale) + shift
    return z / (1 + np.exp(-z)) if silu else z


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_attention_legacy(qkv, heads):
    b, width, length = qkv.shape
    c = width // (3 * heads)
    per_head = qkv.reshape(b * heads, 3 * c, length)
    q, k, v = per_head[:, :c], per_head[:, c:2 * c], per_head[:, 2 * c:]
    logits = np.einsum("hct,hcs->hts", q, k) / np.sqrt(c)
    w = np.exp(logits - logits.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    return np.einsum("hts,hcs->hct", w, v).reshape(b, heads * c, length)


def np_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation as PyTorch's conv2d: a sum over kernel taps of strided input windows."""
    n, c, h, w = x.shape
    o, c_per_group, kh, kw = weight.shape
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (h + 2 * ph - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w + 2 * pw - dilation * (kw - 1) - 1) // stride + 1
    y = np.zeros((n, o, out_h, out_w))
    o_per_group = o // groups
    for g in range(groups):
        inputs = padded[:, g * c_per_group:(g + 1) * c_per_group]
        for i in range(kh):
            for j in range(kw):
                window = inputs[:, :, i * dilation:i * dilation + stride * (out_h - 1) + 1:stride,
                                j * dilation:j * dilation + stride * (out_w - 1) + 1:stride]
                taps = weight[g * o_per_group:(g + 1) * o_per_group, :, i, j]
                y[:, g * o_per_group:(g + 1) * o_per_group] += np.einsum("nchw,oc->nohw", window, taps)
    return y if bias is None else y + bias.reshape(1, o, 1, 1)


def numeric_gradients(fn, arrays, probe, step=1e-6):
    """d sum(fn(*arrays) * probe) / d array for every array, by central differences in float64."""
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(*array.shape):
            values = [a.copy() for a in arrays]
            values[index][position] += step
            plus = (fn(*values) * probe).sum()
            values[index][position] -= 2 * step
            minus = (fn(*values) * probe).sum()
            grad[position] = (plus - minus) / (2 * step)
        grads.append(grad)
    return grads


def assert_close_scaled(got, expected, tol, what):
    """|got - expected| <= tol * max|expected| (gradients of different sizes share one bound)."""
    scale = max(float(np.abs(expected).max()), 1e-3)
    error = float(np.abs(got - expected).max())
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} x {scale:.3g}"


@pytest.fixture
def threaded(monkeypatch):
    from models import kernels

    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 0)
    return kernels


# ------------------------------------------------------------------ group norm (fused)

# The variants the U-Net uses: GroupNorm; GroupNorm32 + SiLU; ResBlock's out norm with the
# timestep FiLM; SPADE + SiLU; SPADE + FiLM + SiLU (SDMResBlock's out norm); and no affine.
VARIANTS = {
    "affine": dict(affine=True),
    "affine_silu": dict(affine=True, silu=True),
    "affine_film_silu": dict(affine=True, film=True, silu=True),
    "spade_silu": dict(spade=True, silu=True),
    "spade_film_silu": dict(spade=True, film=True, silu=True),
    "plain": dict(),
}


def group_norm_case(rng, shape, variant, offset):
    """float32 inputs (x with mean ``offset``) and their roles for one variant."""
    n, c = shape[:2]
    spec = VARIANTS[variant]
    x = rng.standard_normal(shape) * 1.5 + offset
    named = {"x": x}
    if spec.get("affine"):
        named["weight"], named["bias"] = 1 + 0.5 * rng.standard_normal(c), rng.standard_normal(c)
    if spec.get("spade"):
        named["gamma"], named["beta"] = 0.5 * rng.standard_normal(shape), rng.standard_normal(shape)
    if spec.get("film"):
        film = (n, c) + (1,) * (len(shape) - 2)
        named["scale"], named["shift"] = 0.5 * rng.standard_normal(film), rng.standard_normal(film)
    return {k: v.astype(np.float32) for k, v in named.items()}, bool(spec.get("silu"))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape, groups, offset", [((2, 6, 5, 7), 3, 100.0), ((1, 4, 3, 5), 2, 0.0)],
                         ids=["batch2_mean100", "batch1"])
def test_group_norm_act_matches_float64(jt, threaded, variant, shape, groups, offset):
    rng = np.random.default_rng([list(VARIANTS).index(variant), shape[0]])
    named, silu = group_norm_case(rng, shape, variant, offset)
    names = list(named)

    def reference(*arrays):
        return np_group_norm_act(arrays[0], groups, silu=silu, **dict(zip(names[1:], arrays[1:])))

    inputs = {k: jt.array(v) for k, v in named.items()}
    y = threaded.group_norm_act(inputs["x"], groups, inputs.get("weight"), inputs.get("bias"),
                                gamma=inputs.get("gamma"), beta=inputs.get("beta"),
                                scale=inputs.get("scale"), shift=inputs.get("shift"), silu=silu)
    arrays64 = [v.astype(np.float64) for v in named.values()]
    # At mean 100 the float32 mean the kernel subtracts is itself rounded by up to ~4e-6.
    np.testing.assert_allclose(y.numpy(), reference(*arrays64), rtol=0, atol=2e-5)

    probe = rng.standard_normal(shape)
    loss = (y * jt.array(probe.astype(np.float32))).sum()
    grads = jt.grad(loss, [inputs[k] for k in names])
    expected = numeric_gradients(reference, arrays64, probe)
    for name, got, want in zip(names, grads, expected):
        assert got.shape == list(named[name].shape)
        assert_close_scaled(got.numpy(), want, 2e-5, f"d/d{name}")


@pytest.mark.parametrize("variant", ["affine", "spade_film_silu"])
@pytest.mark.parametrize("shape", [(2, 4, 33, 37), (1, 8, 96, 129)], ids=["2442", "49536"])
def test_group_norm_act_many_blocks_mean100(jt, threaded, variant, shape):
    """Groups of 2442 elements (nine blocks of the kernel's float32 partial sums and a ragged
    tail) and of 49536 (the iidm U-Net's largest have 98304), at mean 100 and standard deviation
    1.5, forward against float64. Summing a whole group in float32 fails the second."""
    rng = np.random.default_rng(8)
    named, silu = group_norm_case(rng, shape, variant, 100.0)
    inputs = {k: jt.array(v) for k, v in named.items()}
    y = threaded.group_norm_act(inputs["x"], 2, inputs.get("weight"), inputs.get("bias"),
                                gamma=inputs.get("gamma"), beta=inputs.get("beta"),
                                scale=inputs.get("scale"), shift=inputs.get("shift"), silu=silu)
    arrays64 = {k: v.astype(np.float64) for k, v in named.items()}
    x64 = arrays64.pop("x")
    expected = np_group_norm_act(x64, 2, silu=silu, **arrays64)
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=2e-5)
    if variant == "affine":  # the backward's block sums, against the closed-form gradient
        probe = rng.standard_normal(shape)
        grads = jt.grad((y * jt.array(probe.astype(np.float32))).sum(),
                        [inputs["x"], inputs["weight"], inputs["bias"]])
        n, c = shape[:2]
        groups = x64.reshape(n, 2, -1)
        xh = ((groups - groups.mean(2, keepdims=True))
              / np.sqrt(groups.var(2, keepdims=True) + 1e-5)).reshape(shape)
        gxh = (probe * arrays64["weight"].reshape(1, c, 1, 1)).reshape(n, 2, -1)
        xh_g = xh.reshape(n, 2, -1)
        rstd = 1 / np.sqrt(groups.var(2, keepdims=True) + 1e-5)
        dx = rstd * (gxh - gxh.mean(2, keepdims=True) - xh_g * (gxh * xh_g).mean(2, keepdims=True))
        expected_grads = [dx.reshape(shape), (probe * xh).sum((0, 2, 3)), probe.sum((0, 2, 3))]
        for name, got, want in zip(("x", "weight", "bias"), grads, expected_grads):
            assert_close_scaled(got.numpy(), want, 2e-5, f"d/d{name}")


def test_group_norm_act_rejects_bad_shapes(jt):
    from models import kernels

    x = jt.zeros((2, 6, 3, 3))
    with pytest.raises(ValueError, match="not divisible into 4 groups"):
        kernels.group_norm_act(x, 4)
    with pytest.raises(ValueError, match=r"gamma must be shaped like x \[2, 6, 3, 3\]"):
        kernels.group_norm_act(x, 3, gamma=jt.zeros((2, 6, 1, 1)), beta=jt.zeros((2, 6, 1, 1)))
    with pytest.raises(ValueError, match=r"scale must be \[N, C\] = \[2, 6\]"):
        kernels.group_norm_act(x, 3, scale=jt.zeros((2, 6, 3, 3)), shift=jt.zeros((2, 6, 3, 3)))
    with pytest.raises(ValueError, match="weight and bias together"):
        kernels.group_norm_act(x, 3, jt.ones((6,)))


# ------------------------------------------------------------------ SiLU and attention


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_silu_matches_float64(jt, threaded, offset):
    rng = np.random.default_rng(3)
    # Odd size; values out to +-30 check that exp(-x) over- and underflow is harmless.
    x = (rng.standard_normal((1, 5, 7, 3)) * 10 + offset).astype(np.float32)
    x.flat[:2] = [-30.0, 30.0]
    xv = jt.array(x)
    y = threaded.silu(xv)
    np.testing.assert_allclose(y.numpy(), np_silu(x.astype(np.float64)), rtol=1e-6, atol=1e-6)
    probe = rng.standard_normal(x.shape)
    grad = jt.grad((y * jt.array(probe.astype(np.float32))).sum(), xv).numpy()
    expected = numeric_gradients(np_silu, [x.astype(np.float64)], probe)[0]
    assert_close_scaled(grad, expected, 1e-5, "d silu / dx")


@pytest.mark.parametrize("batch, heads, key_offset", [(2, 2, 0.0), (1, 1, 20.0)],
                         ids=["heads_in_parallel", "rows_in_parallel_key_mean20"])
def test_attention_matches_float64(jt, threaded, batch, heads, key_offset):
    if not threaded.has_sgemm():
        pytest.skip("Jittor's oneDNN ops are not loaded (use_mkl=0)")
    rng = np.random.default_rng(4)
    channels, length = 3, 7  # odd head width and sequence length
    qkv = rng.standard_normal((batch, heads, 3, channels, length))
    # A key mean shifts each row of logits by a constant (up to ~50 here): harmless to the
    # softmax only if it subtracts the row maximum before exp.
    qkv[:, :, 1] += key_offset
    qkv = qkv.reshape(batch, heads * 3 * channels, length).astype(np.float32)
    qkv_v = jt.array(qkv)
    out = threaded.qkv_attention_legacy(qkv_v, heads)
    reference = lambda a: np_attention_legacy(a, heads)  # noqa: E731
    assert_close_scaled(out.numpy(), reference(qkv.astype(np.float64)), 1e-5, "attention")
    probe = rng.standard_normal(out.shape)
    grad = jt.grad((out * jt.array(probe.astype(np.float32))).sum(), qkv_v).numpy()
    expected = numeric_gradients(reference, [qkv.astype(np.float64)], probe)[0]
    assert_close_scaled(grad, expected, 5e-5, "d attention / d qkv")


# ------------------------------------------------------------------ convolution

# (x shape, out channels, kernel, stride, padding, dilation, groups, bias): the U-Net's 3x3 and
# stride-2 3x3 convolutions (channel counts that are multiples of 16 take the nChw16c layout,
# others oneDNN's choice), its 1x1 skip and attention convolutions (the sgemm path), and
# geometries that take oneDNN's general path (1x1 with stride or padding, dilation, groups).
CONV_CASES = {
    "3x3": ((2, 5, 6, 7), 4, 3, 1, 1, 1, 1, True),
    "3x3_c16": ((2, 16, 5, 6), 32, 3, 1, 1, 1, 1, True),
    "3x3_stride2_odd": ((1, 3, 7, 9), 5, 3, 2, 1, 1, 1, False),
    "3x3_stride2_c16": ((1, 16, 7, 6), 16, 3, 2, 1, 1, 1, True),
    "1x1": ((2, 6, 5, 4), 3, 1, 1, 0, 1, 1, True),
    "1x1_nobias": ((1, 4, 3, 5), 6, 1, 1, 0, 1, 1, False),
    "1x1_stride2_pad1": ((1, 4, 5, 6), 3, 1, 2, 1, 1, 1, True),
    "3x3_dilation2_groups2": ((2, 4, 7, 6), 6, 3, 1, 2, 2, 2, True),
    # the autoencoder's downsampling, its discriminator, Inception's factorised convolutions
    "3x3_stride2_pad0": ((1, 4, 7, 8), 4, 3, 2, 0, 1, 1, True),
    "4x4_stride2": ((2, 3, 8, 7), 5, 4, 2, 1, 1, 1, False),
    "1x7_pad0_3": ((1, 4, 5, 9), 3, (1, 7), 1, (0, 3), 1, 1, True),
    "7x1_pad3_0": ((1, 4, 9, 5), 3, (7, 1), 1, (3, 0), 1, 1, False),
}


def conv_case(rng, name):
    shape, out_channels, k, stride, padding, dilation, groups, with_bias = CONV_CASES[name]
    x = rng.standard_normal(shape)
    kh, kw = (k, k) if isinstance(k, int) else k
    weight = rng.standard_normal((out_channels, shape[1] // groups, kh, kw)) / np.sqrt(shape[1] * kh * kw)
    bias = rng.standard_normal(out_channels) if with_bias else None
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_matches_float64_and_jittor(jt, name):
    """Forward and d sum(conv * probe) / d (x, weight, bias) against float64 numpy (gradients by
    central differences) and against ``jt.nn.conv2d`` and its gradients."""
    from jittor import nn

    from models import kernels

    if not kernels.conv2d_available():
        pytest.skip("Jittor's oneDNN ops or headers are missing (use_mkl=0)")
    rng = np.random.default_rng(8)
    x, weight, bias, geometry = conv_case(rng, name)
    arrays = [a for a in (x, weight, bias) if a is not None]
    values = [jt.array(a.astype(np.float32)) for a in arrays]
    bias_v = values[2] if bias is not None else None
    y = kernels.conv2d(values[0], values[1], bias_v, **geometry)

    def reference(*a):
        return np_conv2d(a[0], a[1], a[2] if len(a) > 2 else None, **geometry)

    expected = reference(*arrays)
    assert y.shape == list(expected.shape)
    assert_close_scaled(y.numpy(), expected, 1e-5, "conv2d")
    probe = rng.standard_normal(expected.shape)
    probe_v = jt.array(probe.astype(np.float32))
    grads = jt.grad((y * probe_v).sum(), values)
    y_jt = nn.conv2d(values[0], values[1], bias_v, **geometry)
    grads_jt = jt.grad((y_jt * probe_v).sum(), values)
    np.testing.assert_allclose(y.numpy(), y_jt.numpy(), rtol=1e-5, atol=1e-5)
    for what, got, numeric, theirs in zip(("x", "weight", "bias"), grads,
                                          numeric_gradients(reference, arrays, probe), grads_jt):
        assert_close_scaled(got.numpy(), numeric, 2e-5, f"d conv2d / d {what}")
        assert_close_scaled(got.numpy(), theirs.numpy(), 1e-5, f"d conv2d / d {what} vs jt.nn.conv2d")


@pytest.mark.parametrize("channels", [3, 16], ids=["onednn_layout", "nChw16c"])
def test_conv2d_cache_follows_shape_changes(jt, channels):
    """The op keeps one oneDNN plan per geometry and shares growing scratch buffers between
    plans: alternating shapes (smaller after larger, and back) still give the right results."""
    from models import kernels

    if not kernels.conv2d_available():
        pytest.skip("Jittor's oneDNN ops or headers are missing (use_mkl=0)")
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((channels, channels, 3, 3)) / (3 * channels)
    bias = rng.standard_normal(channels)
    weight_v, bias_v = jt.array(weight.astype(np.float32)), jt.array(bias.astype(np.float32))
    shapes = [(1, channels, 6, 5), (2, channels, 11, 9), (1, channels, 6, 5), (2, channels, 4, 4),
              (2, channels, 11, 9)]
    for shape, stride in zip(shapes, (1, 1, 2, 1, 2)):
        x = rng.standard_normal(shape)
        with jt.no_grad():
            y = kernels.conv2d(jt.array(x.astype(np.float32)), weight_v, bias_v, stride=stride, padding=1)
        assert_close_scaled(y.numpy(), np_conv2d(x, weight, bias, stride=stride, padding=1), 1e-5,
                            f"conv2d {shape} stride {stride}")


def test_conv2d_rejects_bad_shapes(jt):
    from models import kernels

    x = jt.zeros((1, 4, 5, 5))
    with pytest.raises(ValueError, match="do not match"):
        kernels.conv2d(x, jt.zeros((3, 3, 3, 3)))
    with pytest.raises(ValueError, match="bias must be"):
        kernels.conv2d(x, jt.zeros((3, 4, 3, 3)), jt.zeros((4,)))


# ------------------------------------------------------------------ the header's exp and plumbing


def test_fast_exp_matches_float64(jt):
    """``iidm::fast_exp`` (every kernel's exp) against float64 exp over float32's whole normal
    range, and its documented saturation outside it."""
    from models import kernels

    inside = np.concatenate([np.linspace(-87.3, 88.3, 100003), np.linspace(-1, 1, 1001),
                             [0.0, 1e-30, -1e-30, np.log(2.0), -np.log(2.0)]]).astype(np.float32)
    outside = np.array([-1000.0, -88.0, 88.8, 1000.0], dtype=np.float32)
    src = "for (long i = 0; i < in0->num; i++) out0_p[i] = iidm::fast_exp(in0_p[i]);"
    got = jt.code((inside.size + outside.size,), "float32", [jt.array(np.concatenate([inside, outside]))],
                  cpu_header=kernels._header(), cpu_src=src).numpy()
    expected = np.exp(inside.astype(np.float64))
    np.testing.assert_allclose(got[:inside.size], expected, rtol=1.5e-7, atol=0)
    low, high = got[inside.size:][[0, 1]], got[inside.size:][[2, 3]]
    assert np.all((low >= 0) & (low < 1.3e-38)) and np.all((high > 2e38) & np.isfinite(high))


def test_serial_path_equals_threaded_path(jt, monkeypatch):
    """Below PARALLEL_MIN_ELEMENTS the kernels run on one thread (a separate code path: GCC
    compiles an OpenMP loop with a false ``if`` clause differently); the results agree."""
    from models import kernels

    rng = np.random.default_rng(6)
    x = jt.array(rng.standard_normal((2, 8, 5, 7)).astype(np.float32))
    weight, bias = jt.array(rng.standard_normal(8).astype(np.float32)), jt.array(np.ones(8, np.float32))
    results = []
    for threshold in (0, 10 ** 9):
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", threshold)
        y = kernels.group_norm_act(x, 4, weight, bias, silu=True)
        s = kernels.silu(x)
        results.append([v.numpy() for v in [y, s] + jt.grad((y * s).sum(), [x, weight])])
    for threaded, serial in zip(*results):
        np.testing.assert_allclose(serial, threaded, rtol=1e-6, atol=1e-6)


def test_no_grad_path_equals_function_path(jt):
    """Under ``jt.no_grad`` the ops skip the ``jt.Function`` (nothing to record); same values."""
    from models import kernels

    rng = np.random.default_rng(7)
    x = jt.array(rng.standard_normal((2, 6, 4, 3)).astype(np.float32))
    gamma, beta = (jt.array(rng.standard_normal((2, 6, 4, 3)).astype(np.float32)) for _ in range(2))
    scale, shift = (jt.array(rng.standard_normal((2, 6, 1, 1)).astype(np.float32)) for _ in range(2))

    def run():
        y = kernels.group_norm_act(x, 3, gamma=gamma, beta=beta, scale=scale, shift=shift, silu=True)
        return y.numpy(), kernels.silu(x).numpy()

    with_grad = run()
    with jt.no_grad():
        without = run()
    for a, b in zip(with_grad, without):
        np.testing.assert_array_equal(a, b)


def test_header_text_names_the_kernels_file_and_its_content():
    """Jittor names compiled kernels by their source text; the header line carries the file's
    content hash so that an edited cpu_kernels.h is compiled anew."""
    import hashlib

    from models import kernels

    text = kernels._header()
    assert str(kernels.KERNELS_HEADER.resolve()) in text
    assert hashlib.sha1(kernels.KERNELS_HEADER.read_bytes()).hexdigest()[:16] in text
    assert "IIDM_WITH_SGEMM" in kernels._header(with_sgemm=True) and "IIDM_WITH_SGEMM" not in text


def test_conv_header_and_flags_name_the_file_and_onednn_headers():
    """The convolution op includes cpu_conv.h by path and content hash, and gets the oneDNN
    include folder through a ``FLAGS:`` compile option (``jt.code`` has no include path of its own)."""
    import hashlib
    from pathlib import Path

    from models import kernels

    if not kernels.conv2d_available():
        pytest.skip("Jittor's oneDNN ops or headers are missing (use_mkl=0)")
    text = kernels._conv_header()
    assert str(kernels.CONV_HEADER.resolve()) in text
    assert hashlib.sha1(kernels.CONV_HEADER.read_bytes()).hexdigest()[:16] in text
    (flag,) = kernels._conv_options()
    assert flag.startswith("FLAGS:")
    folder = flag.split("-I", 1)[1].strip()
    assert (Path(folder) / "oneapi" / "dnnl" / "dnnl.hpp").is_file()


# ------------------------------------------------------------------ selection and the U-Net


def test_layers_route_through_kernels_on_cpu_only_when_enabled(jt, monkeypatch):
    from models import kernels, layers

    if jt.flags.use_cuda:
        pytest.skip("the kernels are CPU-only; on CUDA the plain ops always run")
    calls = []
    real = kernels.group_norm_act
    monkeypatch.setattr(kernels, "group_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = jt.array(np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3))
    monkeypatch.delenv(layers.KERNELS_ENV, raising=False)
    assert layers.kernels_enabled()
    on = layers.group_norm(x, 2).numpy()
    assert calls == [1]
    with layers.use_kernels(False):
        off = layers.group_norm(x, 2).numpy()
    assert calls == [1]
    monkeypatch.setenv(layers.KERNELS_ENV, "0")
    assert not layers.kernels_enabled()
    layers.group_norm(x, 2)
    assert calls == [1]
    with layers.use_kernels(True):
        layers.group_norm(x.float16(), 2)  # float16 takes the reference path (graph only: lazy)
    assert calls == [1]
    np.testing.assert_allclose(on, off, rtol=0, atol=1e-6)


def test_conv2d_layer_routes_through_kernel_on_cpu_only_when_enabled(jt, monkeypatch):
    from models import kernels, layers

    if jt.flags.use_cuda or not kernels.conv2d_available():
        pytest.skip("the convolution kernel is CPU-only and needs Jittor's oneDNN ops")
    calls = []
    real = kernels.conv2d
    monkeypatch.setattr(kernels, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv(layers.KERNELS_ENV, raising=False)
    conv = layers.Conv2d(3, 4, 3, padding=1)
    x = jt.array(np.linspace(-1, 1, 2 * 3 * 5 * 6, dtype=np.float32).reshape(2, 3, 5, 6))
    on = conv(x).numpy()
    assert calls == [1]
    with layers.use_kernels(False):
        off = conv(x).numpy()
    monkeypatch.setenv(layers.KERNELS_ENV, "0")
    conv(x)
    assert calls == [1]
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)


def test_unet_with_kernels_equals_reference_path(jt):
    """The tiny U-Net's output and parameter gradients with kernels on and off (same weights)."""
    from models import UNetModel, unet_preset
    from models.layers import use_kernels

    if jt.flags.use_cuda:
        pytest.skip("the kernels are CPU-only")
    jt.set_global_seed(0)
    config = unet_preset("tiny")
    model = UNetModel(config)
    rng = np.random.default_rng(5)
    for p in model.parameters():  # zero-initialised layers would hide half the network
        p.update(jt.array((0.2 * rng.standard_normal(p.shape)).astype(np.float32)))
    height, width = 8, 12
    x = jt.array(rng.standard_normal((2, config.in_channels, height, width)).astype(np.float32))
    t = jt.array(np.array([3, 917]))
    labels = rng.integers(0, config.num_classes, size=(2, height, width))
    mask = jt.array(np.eye(config.num_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy())
    probe = jt.array(rng.standard_normal((2, config.out_channels, height, width)).astype(np.float32))
    params = model.parameters()
    results = {}
    for enabled in (True, False):
        with use_kernels(enabled):
            out = model(x, t, mask)
            grads = jt.grad((out * probe).sum(), params)
            results[enabled] = (out.numpy(), [g.numpy() for g in grads])
    (out_on, grads_on), (out_off, grads_off) = results[True], results[False]
    assert np.abs(out_off).max() > 0.1  # not a trivially zero network
    assert_close_scaled(out_on, out_off, 1e-5, "U-Net output")
    for p, g_on, g_off in zip(params, grads_on, grads_off):
        assert_close_scaled(g_on, g_off, 2e-5, f"d/d{p.name()}")

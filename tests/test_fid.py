"""FID: the Frechet distance against closed forms and an independent float64 route, the FID
Inception's special operations and blocks against numpy references, its parameter names against
torchvision's Inception3 layout, loading, caching, and a full forward at 299x299."""

import os

import numpy as np
import pytest
from PIL import Image

from weights.checkpoint import WeightsError, module_shapes


# ------------------------------------------------------------------------------ Frechet distance
def random_spd(rng, dim):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_diagonal_closed_form():
    from scoring.fid import frechet_distance

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    var1, var2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_covariances_closed_form():
    from scoring.fid import frechet_distance

    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.2, 2.0, 6), rng.uniform(0.2, 2.0, 6)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a) + np.sum(b) - 2 * np.sum(np.sqrt(a * b))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_case_against_symmetric_eigendecomposition():
    from scoring.fid import frechet_distance

    rng = np.random.default_rng(2)
    dim = 8
    sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix: use eigh twice.
    w, v = np.linalg.eigh(sigma1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_singular_statistics_is_near_zero():
    from scoring.fid import frechet_distance

    rng = np.random.default_rng(3)
    features = rng.standard_normal((4, 10))        # 4 samples in 10 dims: rank-3 covariance
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    value = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(value) and abs(value) < 1e-4


def test_frechet_distance_refuses_a_large_imaginary_component_and_mismatched_shapes():
    from scoring.fid import frechet_distance

    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------- statistics and cache
def write_images(folder, count, height=12, width=16, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def colour_features(batch):
    """A small deterministic feature map: per-channel means, stds and a product term (D = 7)."""
    flat = batch.reshape(batch.shape[0], 3, -1).astype(np.float64)
    return np.concatenate([flat.mean(2), flat.std(2), (flat[:, 0] * flat[:, 2]).mean(1, keepdims=True)], 1)


def test_fid_of_a_set_against_itself_is_zero_whatever_the_batching(tmp_path):
    from scoring.fid import activation_statistics, frechet_distance

    paths = write_images(tmp_path / "imgs", 12)
    mu1, sigma1 = activation_statistics(paths, colour_features, batch_size=5)
    mu2, sigma2 = activation_statistics(paths, colour_features, batch_size=12)
    np.testing.assert_allclose(mu1, mu2, atol=1e-12)
    assert abs(frechet_distance(mu1, sigma1, mu2, sigma2)) < 1e-8
    images = np.stack([np.asarray(Image.open(p), np.float64).transpose(2, 0, 1) / 255 for p in paths])
    np.testing.assert_allclose(sigma1, np.cov(colour_features(images), rowvar=False), rtol=1e-5, atol=1e-12)


def test_training_statistics_are_cached_by_image_list_and_weights(tmp_path):
    from scoring.fid import cached_statistics

    paths = write_images(tmp_path / "imgs", 6)
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return colour_features(batch)

    first = cached_statistics(paths, counting, "weights-a", tmp_path / "cache")
    assert not first.from_cache and first.path.is_file() and sum(calls) == 6
    again = cached_statistics(list(reversed(paths)), counting, "weights-a", tmp_path / "cache")
    assert again.from_cache and again.path == first.path and sum(calls) == 6
    np.testing.assert_array_equal(again.sigma, first.sigma)
    other_weights = cached_statistics(paths, counting, "weights-b", tmp_path / "cache")
    assert not other_weights.from_cache and other_weights.path != first.path
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))   # a touched image
    touched = cached_statistics(paths, counting, "weights-a", tmp_path / "cache")
    assert not touched.from_cache and touched.path != first.path
    fewer = cached_statistics(paths[:-1], counting, "weights-a", tmp_path / "cache")
    assert not fewer.from_cache and fewer.path not in (first.path, touched.path)


# --------------------------------------------------------------------- network operations
def windows(x, fill):
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=fill)
    height, width = x.shape[2:]
    return np.stack([padded[:, :, i:i + height, j:j + width] for i in range(3) for j in range(3)])


def test_avg_pool_excludes_padding_and_max_pool_never_picks_it(jt):
    from scoring.fid import avg_pool_3x3_same_exclude_pad, max_pool_3x3_same

    x = np.random.default_rng(4).standard_normal((2, 3, 5, 6)).astype(np.float32) - 2.0
    got_avg = avg_pool_3x3_same_exclude_pad(jt.array(x)).numpy()
    got_max = max_pool_3x3_same(jt.array(x)).numpy()
    np.testing.assert_allclose(got_avg, np.nanmean(windows(x, np.nan), 0), atol=1e-6)
    np.testing.assert_allclose(got_max, np.nanmax(windows(x, np.nan), 0), atol=0)


def bilinear_reference(x, out_height, out_width):
    """PyTorch's bilinear rule, align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped
    below at 0; the upper neighbour is clamped to the last row/column."""
    def taps(size_in, size_out):
        src = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, src - low
    y0, y1, wy = taps(x.shape[2], out_height)
    x0, x1, wx = taps(x.shape[3], out_width)
    x = x.astype(np.float64)
    rows = x[:, :, y0] * (1 - wy)[:, None] + x[:, :, y1] * wy[:, None]
    return rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx


@pytest.mark.parametrize("size_in,size_out", [((7, 9), (4, 5)), ((5, 6), (11, 13))])
def test_resize_is_pytorch_bilinear_without_align_corners(jt, size_in, size_out):
    from scoring.fid import resize_bilinear

    x = np.random.default_rng(5).random((2, 3, *size_in)).astype(np.float32)
    got = resize_bilinear(jt.array(x), *size_out).numpy()
    np.testing.assert_allclose(got, bilinear_reference(x, *size_out), atol=2e-6)


# ------------------------------------------------------------------- names, shapes, loading
def expected_inception_shapes():
    """torchvision Inception3's BasicConv2d layers (conv without bias + BatchNorm), written out
    from its constructor: name -> shape."""
    shapes = {}

    def conv(name, cin, cout, kh, kw=None):
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kh if kw is None else kw)
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{part}"] = (cout,)

    conv("Conv2d_1a_3x3", 3, 32, 3)
    conv("Conv2d_2a_3x3", 32, 32, 3)
    conv("Conv2d_2b_3x3", 32, 64, 3)
    conv("Conv2d_3b_1x1", 64, 80, 1)
    conv("Conv2d_4a_3x3", 80, 192, 3)
    for block, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        conv(f"{block}.branch1x1", cin, 64, 1)
        conv(f"{block}.branch5x5_1", cin, 48, 1)
        conv(f"{block}.branch5x5_2", 48, 64, 5)
        conv(f"{block}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{block}.branch3x3dbl_2", 64, 96, 3)
        conv(f"{block}.branch3x3dbl_3", 96, 96, 3)
        conv(f"{block}.branch_pool", cin, pool, 1)
    conv("Mixed_6a.branch3x3", 288, 384, 3)
    conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for block, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        conv(f"{block}.branch1x1", 768, 192, 1)
        conv(f"{block}.branch7x7_1", 768, c7, 1)
        conv(f"{block}.branch7x7_2", c7, c7, 1, 7)
        conv(f"{block}.branch7x7_3", c7, 192, 7, 1)
        conv(f"{block}.branch7x7dbl_1", 768, c7, 1)
        conv(f"{block}.branch7x7dbl_2", c7, c7, 7, 1)
        conv(f"{block}.branch7x7dbl_3", c7, c7, 1, 7)
        conv(f"{block}.branch7x7dbl_4", c7, c7, 7, 1)
        conv(f"{block}.branch7x7dbl_5", c7, 192, 1, 7)
        conv(f"{block}.branch_pool", 768, 192, 1)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1)
    conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
    conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for block, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        conv(f"{block}.branch1x1", cin, 320, 1)
        conv(f"{block}.branch3x3_1", cin, 384, 1)
        conv(f"{block}.branch3x3_2a", 384, 384, 1, 3)
        conv(f"{block}.branch3x3_2b", 384, 384, 3, 1)
        conv(f"{block}.branch3x3dbl_1", cin, 448, 1)
        conv(f"{block}.branch3x3dbl_2", 448, 384, 3)
        conv(f"{block}.branch3x3dbl_3a", 384, 384, 1, 3)
        conv(f"{block}.branch3x3dbl_3b", 384, 384, 3, 1)
        conv(f"{block}.branch_pool", cin, 192, 1)
    return shapes


def random_weights(shapes, seed=0, var_range=(0.001, 2.0)):
    """Weights with fan-in scaling and BatchNorm statistics away from (0, 1), so eps and the
    running statistics matter (the default variances as low as 0.001 would blow activations up
    through the whole network: use ``var_range`` near 1 there)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes.items():
        if name.endswith("conv.weight"):
            arrays[name] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif name.endswith("running_var"):
            arrays[name] = rng.uniform(*var_range, shape)
        elif name.endswith("bn.weight"):
            arrays[name] = rng.uniform(0.5, 1.5, shape)
        else:
            arrays[name] = rng.standard_normal(shape) * 0.1
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def test_parameter_names_and_shapes_are_torchvisions(jt):
    from scoring.fid import FIDInceptionV3

    assert module_shapes(FIDInceptionV3()) == expected_inception_shapes()


def test_loading_drops_the_classifier_and_counters_and_checks_the_rest(jt, tmp_path):
    from safetensors.numpy import save_file

    from scoring.fid import inception_from_arrays, load_inception

    weights = random_weights(expected_inception_shapes())
    extra = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32),
             "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)}
    save_file({**weights, **extra}, str(tmp_path / "inception.safetensors"))
    model = load_inception(tmp_path / "inception.safetensors")
    np.testing.assert_array_equal(model.Mixed_7c.branch_pool.bn.running_var.numpy(),
                                  weights["Mixed_7c.branch_pool.bn.running_var"])
    missing = dict(weights)
    del missing["Mixed_6e.branch7x7dbl_4.conv.weight"]
    with pytest.raises(WeightsError, match="Mixed_6e.branch7x7dbl_4.conv.weight"):
        inception_from_arrays(missing)
    wrong = {**weights, "Mixed_5b.branch_pool.conv.weight": np.zeros((64, 192, 1, 1), np.float32)}
    with pytest.raises(WeightsError, match="Mixed_5b.branch_pool.conv.weight"):
        inception_from_arrays(wrong)


# ------------------------------------------------------------- blocks against numpy float64
def np_conv(x, weight, stride=(1, 1), padding=(0, 0)):
    x = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out_channels, _, kh, kw = weight.shape
    height = (x.shape[2] - kh) // stride[0] + 1
    width = (x.shape[3] - kw) // stride[1] + 1
    out = np.zeros((x.shape[0], out_channels, height, width))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride[0] * (height - 1) + 1:stride[0], j:j + stride[1] * (width - 1) + 1:stride[1]]
            out += np.einsum("bchw,oc->bohw", patch, weight[:, :, i, j].astype(np.float64))
    return out


def np_basic(x, weights, name, padding=(0, 0)):
    y = np_conv(x, weights[f"{name}.conv.weight"], padding=padding)
    bn = {part: weights[f"{name}.bn.{part}"].astype(np.float64)[:, None, None]
          for part in ("weight", "bias", "running_mean", "running_var")}
    y = (y - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
    return np.maximum(y, 0)


def block_weights(module, seed):
    return random_weights({k: v for k, v in module_shapes(module).items()}, seed)


def test_fid_inception_a_block_matches_numpy(jt):
    from weights.checkpoint import load_weights
    from scoring.fid import FIDInceptionA

    block = FIDInceptionA(8, pool_features=4)
    weights = block_weights(block, 6)
    load_weights(block, weights)
    block.eval()
    x = np.random.default_rng(7).standard_normal((2, 8, 5, 6)).astype(np.float32)
    got = block(jt.array(x)).numpy()
    x64 = x.astype(np.float64)
    expected = np.concatenate([
        np_basic(x64, weights, "branch1x1"),
        np_basic(np_basic(x64, weights, "branch5x5_1"), weights, "branch5x5_2", (2, 2)),
        np_basic(np_basic(np_basic(x64, weights, "branch3x3dbl_1"), weights, "branch3x3dbl_2", (1, 1)),
                 weights, "branch3x3dbl_3", (1, 1)),
        np_basic(np.nanmean(windows(x, np.nan), 0), weights, "branch_pool"),
    ], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_fid_inception_e_block_with_max_pool_matches_numpy(jt):
    from weights.checkpoint import load_weights
    from scoring.fid import FIDInceptionE

    block = FIDInceptionE(8, pool="max")
    weights = block_weights(block, 8)
    load_weights(block, weights)
    block.eval()
    x = np.random.default_rng(9).standard_normal((2, 8, 4, 5)).astype(np.float32) - 1.0
    got = block(jt.array(x)).numpy()
    x64 = x.astype(np.float64)
    b3 = np_basic(x64, weights, "branch3x3_1")
    dbl = np_basic(np_basic(x64, weights, "branch3x3dbl_1"), weights, "branch3x3dbl_2", (1, 1))
    expected = np.concatenate([
        np_basic(x64, weights, "branch1x1"),
        np_basic(b3, weights, "branch3x3_2a", (0, 1)), np_basic(b3, weights, "branch3x3_2b", (1, 0)),
        np_basic(dbl, weights, "branch3x3dbl_3a", (0, 1)), np_basic(dbl, weights, "branch3x3dbl_3b", (1, 0)),
        np_basic(np.nanmax(windows(x, np.nan), 0), weights, "branch_pool"),
    ], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- whole network
def test_inception_forward_at_299_is_batch_independent_and_self_fid_is_zero(jt, tmp_path):
    from scoring.fid import (FEATURE_DIM, activation_statistics, frechet_distance, inception_features,
                           inception_from_arrays)

    model = inception_from_arrays(random_weights(expected_inception_shapes(), seed=10, var_range=(0.5, 2.0)))
    features = inception_features(model)
    paths = write_images(tmp_path / "imgs", 4, height=24, width=32)
    batch = np.stack([np.asarray(Image.open(p), np.float32).transpose(2, 0, 1) / 255 for p in paths])
    pair = features(batch[:2])                                   # batch 2, resized to 299x299
    assert pair.shape == (2, FEATURE_DIM) and np.isfinite(pair).all() and (pair >= 0).all()
    assert pair.std() > 0
    np.testing.assert_allclose(features(batch[1:2])[0], pair[1], rtol=1e-4, atol=1e-6)
    mu, sigma = activation_statistics(paths, features, batch_size=2)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3 * np.trace(sigma)

"""Frechet Inception Distance with pytorch-fid's InceptionV3 (the TensorFlow FID network) in Jittor.

FID (Heusel et al. 2017) between two image sets is the Frechet distance between Gaussians fitted
to their Inception pool3 features:

    d^2 = |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

The network is pytorch-fid's ``fid_inception_v3`` (mseitzer/pytorch-fid, ``inception.py``), which
is torchvision's Inception3 patched to match TensorFlow's FID graph:

* every convolution is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU;
* the 3x3 average pools inside Mixed_5b..5d, 6b..6e and 7b ("FIDInceptionA/C/E_1") do not count
  the zero padding (TensorFlow's behaviour, ``count_include_pad=False``);
* Mixed_7c ("FIDInceptionE_2") max-pools instead of average-pooling in its pool branch;
* the input, RGB in [0, 1] [B, 3, H, W], is resized to 299x299 (bilinear, align_corners=False,
  no antialiasing) and scaled to [-1, 1];
* the output is the 2048-d global average of Mixed_7c ("pool3").

Parameter names are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``
...), so ``pt_inception-2015-12-05-6726825d.pth`` loads by name through the safe reader
``weights.foreign.read_weights``; its ``fc.*`` (the 1008-way classifier, unused for pool3) and
any ``num_batches_tracked`` counters are left out, everything else is checked name by name.

Images are read like pytorch-fid reads them (PIL, converted to RGB, /255). Statistics are float64
(``np.cov`` of the features). The training-set statistics are cached in an ``.npz`` keyed by a hash
of the sorted image list (names, sizes, modification times) and of the weight file's content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import linalg

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt
from jittor import nn

from datasets import load_image
from datasets.io import atomic_write
from models.layers import Conv2d
from weights.checkpoint import load_weights

log = logging.getLogger("iidm.fid")

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Names in the pytorch-fid file that pool3 features do not use.
UNUSED_PREFIXES = ("fc.",)
UNUSED_SUFFIXES = ("num_batches_tracked",)
STATS_VERSION = "pytorch-fid-inception-v3/pool3/bilinear299/v1"
EPS_OFFSET = 1e-6


# ------------------------------------------------------------------------------------ network
def avg_pool_3x3_same_exclude_pad(x: jt.Var) -> jt.Var:
    """3x3 average pool, stride 1, padding 1, averaging only the in-image taps
    (``F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)``). [B, C, H, W] -> same shape.

    Written out because Jittor's AvgPool2d ignores ``count_include_pad`` when ceil_mode is off."""
    batch, channels, height, width = x.shape
    taps = x.reindex([batch, channels, height, width, 3, 3],
                     ["i0", "i1", "i2+i4-1", "i3+i5-1"], overflow_value=0)
    total = taps.sum([4, 5])
    rows = np.minimum(np.arange(height) + 1, height - 1) - np.maximum(np.arange(height) - 1, 0) + 1
    cols = np.minimum(np.arange(width) + 1, width - 1) - np.maximum(np.arange(width) - 1, 0) + 1
    count = np.outer(rows, cols).astype(np.float32)
    return total / jt.array(count).stop_grad().reshape(1, 1, height, width)


def max_pool_3x3_same(x: jt.Var) -> jt.Var:
    """3x3 max pool, stride 1, padding 1 (padding never wins). [B, C, H, W] -> same shape."""
    batch, channels, height, width = x.shape
    taps = x.reindex([batch, channels, height, width, 3, 3],
                     ["i0", "i1", "i2+i4-1", "i3+i5-1"], overflow_value=-np.inf)
    return taps.max([4, 5])


def max_pool_3x3_stride2(x: jt.Var) -> jt.Var:
    """3x3 max pool, stride 2, no padding (torchvision's MaxPool2d(3, 2))."""
    return nn.max_pool2d(x, kernel_size=3, stride=2)


def resize_bilinear(x: jt.Var, height: int, width: int) -> jt.Var:
    """Bilinear resize, align_corners=False, no antialiasing (PyTorch's ``F.interpolate``):
    source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0. [B, C, H, W] -> [B, C, height, width]."""
    if tuple(x.shape[2:]) == (height, width):
        return x
    return nn.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm(out_channels, eps=1e-3)

    def execute(self, x):
        return nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
    """Mixed_5b..5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def execute(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_3x3_same_exclude_pad(x))
        return jt.concat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def execute(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jt.concat([self.branch3x3(x), branch3x3dbl, max_pool_3x3_stride2(x)], dim=1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (1x7 then 7x1) and avgpool(no pad count)-1x1."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def execute(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool_3x3_same_exclude_pad(x))
        return jt.concat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def execute(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return jt.concat([branch3x3, branch7x7x3, max_pool_3x3_stride2(x)], dim=1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``, FIDInceptionE_1, padding not counted) and Mixed_7c
    (``pool="max"``, FIDInceptionE_2): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self._pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def execute(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = jt.concat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = jt.concat([self.branch3x3dbl_3a(branch3x3dbl),
                                  self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        pooled = avg_pool_3x3_same_exclude_pad(x) if self._pool == "avg" else max_pool_3x3_same(x)
        return jt.concat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 up to pool3. ``execute``: RGB in [0, 1] [B, 3, H, W] -> [B, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def execute(self, images):
        x = resize_bilinear(images, INCEPTION_SIZE, INCEPTION_SIZE)
        x = 2 * x - 1                                     # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_3x3_stride2(x)                       # 147 -> 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool_3x3_stride2(x)                       # 71 -> 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(dims=[2, 3])                        # pool3: [B, 2048]


def select_inception_weights(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Drop the names pool3 does not use (``fc.*``, ``*.num_batches_tracked``); returns (kept, dropped)."""
    kept, dropped = {}, []
    for name, value in arrays.items():
        if name.startswith(UNUSED_PREFIXES) or name.endswith(UNUSED_SUFFIXES):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, sorted(dropped)


def inception_from_arrays(arrays: Mapping[str, np.ndarray], source: str = "weights") -> FIDInceptionV3:
    """Build the network in eval mode and load ``arrays`` (name -> array, pytorch-fid names) strictly."""
    model = FIDInceptionV3()
    kept, dropped = select_inception_weights(arrays)
    if dropped:
        log.info("%s: left out %d name(s) pool3 does not use (%s)", source, len(dropped),
                 ", ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else ""))
    load_weights(model, kept, source)
    model.eval()
    return model


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """Load pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the same weights in any format
    ``weights.foreign.read_weights`` reads) without torch and without unpickling code."""
    from weights.foreign import read_weights

    arrays, info = read_weights(path)
    for line in info.describe():
        log.info("%s: %s", path, line)
    return inception_from_arrays(arrays, str(path))


# ------------------------------------------------------------------------------- statistics
FeatureFn = Callable[[np.ndarray], np.ndarray]   # float32 [B, 3, H, W] in [0, 1] -> [B, D]


def inception_features(model: FIDInceptionV3) -> FeatureFn:
    """Wrap the network as a function of a numpy batch (RGB in [0, 1], [B, 3, H, W]) -> float64 [B, 2048]."""
    def features(batch: np.ndarray) -> np.ndarray:
        with jt.no_grad():
            out = model(jt.array(np.ascontiguousarray(batch, dtype=np.float32)))
            return out.numpy().astype(np.float64)
    return features


def _batches(paths: Sequence[Path], batch_size: int) -> Iterable[np.ndarray]:
    """Images as pytorch-fid reads them (PIL -> RGB, /255), [B, 3, H, W] float32; a batch holds
    images of one size only (a size change starts a new batch)."""
    batch: list[np.ndarray] = []
    for path in paths:
        image = load_image(path).astype(np.float32).transpose(2, 0, 1) / 255.0
        if batch and (len(batch) == batch_size or batch[0].shape != image.shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and unbiased covariance Sigma [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2 images for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def activation_statistics(paths: Sequence[Path], feature_fn: FeatureFn, batch_size: int = 50,
                          progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mu, Sigma of the features of the images at ``paths``."""
    if len(paths) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(paths)}")
    chunks, done = [], 0
    for batch in _batches(paths, batch_size):
        chunks.append(np.asarray(feature_fn(batch), dtype=np.float64))
        done += len(batch)
        if progress is not None:
            progress(done, len(paths))
    return feature_statistics(np.concatenate(chunks))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = EPS_OFFSET) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64 (pytorch-fid's
    ``calculate_frechet_distance``): when the square root of S1 S2 is not finite (singular product)
    ``eps`` is added to both diagonals; a complex root is accepted only if the imaginary parts
    of its diagonal are below 1e-3, and its real part is used."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    # With fewer images than feature dimensions the covariances are singular: scipy warns, and
    # pytorch-fid silences it (disp=False, deprecated in scipy 1.16).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------------ caching
def statistics_key(paths: Sequence[Path], weights_id: str) -> str:
    """Hash of the sorted image list (name, byte size, mtime in ns), the weights' identity and the
    feature definition: any added, removed, replaced or touched image gives a new key."""
    entries = []
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        entries.append([path.name, stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"images": entries, "weights": weights_id, "features": STATS_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CachedStatistics:
    mu: np.ndarray
    sigma: np.ndarray
    path: Path
    from_cache: bool


def _atomic_savez(path: Path, **arrays) -> None:
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def cached_statistics(paths: Sequence[Path], feature_fn: FeatureFn, weights_id: str,
                      cache_dir: str | os.PathLike, batch_size: int = 50,
                      progress: Callable[[int, int], None] | None = None) -> CachedStatistics:
    """Statistics of ``paths`` from ``cache_dir/fid_stats_<key>.npz`` when present and matching,
    else computed and written there (atomically)."""
    key = statistics_key(paths, weights_id)
    path = Path(cache_dir) / f"fid_stats_{key[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return CachedStatistics(f["mu"], f["sigma"], path, True)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("%s: unreadable FID statistics cache (%s); recomputing", path, exc)
    mu, sigma = activation_statistics(paths, feature_fn, batch_size, progress)
    _atomic_savez(path, mu=mu, sigma=sigma, key=np.array(key), n_images=np.array(len(paths)))
    return CachedStatistics(mu, sigma, path, False)

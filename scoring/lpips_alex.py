"""LPIPS-AlexNet as SDM's diversity score computes it (the StarGAN v2 evaluation code SDM reuses),
and the diversity itself: the mean pairwise LPIPS among the samples of one mask.

For image batches x, y [B, 3, H, W] in [-1, 1]:

    s(x) = (x - shift) / scale          shift = (-.030, -.088, -.188), scale = (.458, .448, .450)
    f_k  = the k-th ReLU output of torchvision's AlexNet ``features`` on s(.), k = 0..4
           (channels 64, 192, 384, 256, 256)
    n(f) = f / sqrt(sum_c f^2 + 1e-10)
    d    = sum_k mean_{b,h,w}( w_k . (n(f_k(x)) - n(f_k(y)))^2 )     one number for the batch pair

Weights are the user's files (nothing can be downloaded here): torchvision's AlexNet state dict
(``alexnet-owt-7be5be79.pth``, names ``features.N.weight``) and the linear heads, either
StarGAN v2's ``lpips_weights.ckpt`` (``lpips_weights.K.main.1.weight``) or the lpips package's
``weights/v0.1/alex.pth`` (``linK.model.1.weight``), [1, C_K, 1, 1] each. Without them there is
no LPIPS: a network with other weights computes another number.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Sequence

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from models.layers import Conv2d
from weights.checkpoint import WeightsError, load_weights
from weights.foreign import read_weights

CHANNELS = (64, 192, 384, 256, 256)
# torchvision alexnet.features: index -> (in, out, kernel, stride, padding); a ReLU follows each
# convolution, 3x3 stride-2 max pooling after the first, second and fifth.
ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
              10: (256, 256, 3, 1, 1)}
POOL_AFTER = (0, 3)   # the pool after conv 10 comes after the last feature map and is not needed
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

_ALEX = re.compile(r"(?:^|\.)features\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"(?:lpips_weights\.|lin)(\d)\.(?:main|model)\.1\.weight$")


class LPIPSAlex(nn.Module):
    """The distance above: ``execute(x, y)`` -> scalar Var."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleList([Conv2d(i, o, k, stride=s, padding=p)
                                       for i, o, k, s, p in ALEX_CONVS.values()])
        self.heads = nn.ModuleList([Conv2d(c, 1, 1, bias=False) for c in CHANNELS])
        self._shift = jt.array(np.array(SHIFT, np.float32).reshape(1, 3, 1, 1)).stop_grad()
        self._scale = jt.array(np.array(SCALE, np.float32).reshape(1, 3, 1, 1)).stop_grad()

    def feature_maps(self, x: jt.Var) -> list[jt.Var]:
        h = (x - self._shift) / self._scale
        maps = []
        for index, conv in zip(ALEX_CONVS, self.features):
            h = nn.relu(conv(h))
            maps.append(h)
            if index in POOL_AFTER:
                h = nn.pool(h, 3, "maximum", stride=2)
        return maps

    def execute(self, x: jt.Var, y: jt.Var) -> jt.Var:
        total = 0.0
        for fx, fy, head in zip(self.feature_maps(x), self.feature_maps(y), self.heads):
            nx = fx / jt.sqrt((fx * fx).sum(dim=1, keepdims=True) + EPS)
            ny = fy / jt.sqrt((fy * fy).sum(dim=1, keepdims=True) + EPS)
            total = total + head((nx - ny) ** 2).mean()
        return total


def lpips_alex_state(alexnet_path: str | os.PathLike, heads_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Name -> array of every weight, gathered from the two files (module docstring)."""
    state: dict[str, np.ndarray] = {}
    order = list(ALEX_CONVS)
    arrays, _ = read_weights(alexnet_path)
    for name, value in arrays.items():
        match = _ALEX.search(name)
        if match and int(match.group(1)) in ALEX_CONVS:
            state[f"features.{order.index(int(match.group(1)))}.{match.group(2)}"] = value
    if not state:
        raise WeightsError(f"{alexnet_path}: no AlexNet weights found (expected torchvision's features.N.weight)")
    arrays, _ = read_weights(heads_path)
    heads = {f"heads.{m.group(1)}.weight": v for n, v in arrays.items() if (m := _HEAD.search(n))}
    if not heads:
        raise WeightsError(f"{heads_path}: no LPIPS heads found (expected lpips_weights.K.main.1.weight or "
                           "linK.model.1.weight)")
    return {**state, **heads}


def load_lpips_alex(alexnet_path: str | os.PathLike, heads_path: str | os.PathLike) -> LPIPSAlex:
    """LPIPS-AlexNet with every name and shape checked; eval mode."""
    model = LPIPSAlex()
    load_weights(model, lpips_alex_state(alexnet_path, heads_path), source=f"{alexnet_path} + {heads_path}")
    return model.eval()


def to_input(images: np.ndarray) -> jt.Var:
    """RGB uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    return jt.array(np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)


def mean_pairwise_lpips(model: LPIPSAlex, samples: Sequence[np.ndarray]) -> float:
    """Diversity of one mask's samples (each RGB uint8 [H, W, 3]): the mean LPIPS over all pairs."""
    if len(samples) < 2:
        raise ValueError("diversity needs at least 2 samples of the mask")
    values = []
    with jt.no_grad():
        for a, b in itertools.combinations(range(len(samples)), 2):
            values.append(float(model(to_input(samples[a][None]), to_input(samples[b][None])).item()))
    return float(np.mean(values))

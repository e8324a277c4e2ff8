"""LPIPS-VGG perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"; richzhang/PerceptualSimilarity, as stripped down in
taming/modules/losses/lpips.py), with weights loaded from files the user supplies:

* the VGG16 backbone: torchvision's ``vgg16`` state dict (``vgg16-397923af.pth``, names
  ``features.N.weight``; the classifier is not used), or taming's layout ``net.sliceK.N.weight``;
* the linear heads: the lpips package's ``weights/v0.1/vgg.pth`` (names ``linK.model.1.weight``,
  [1, C_K, 1, 1]), which is also taming's ``vgg.pth``. A LDM/taming training checkpoint holds
  both under ``loss.perceptual_loss.`` and can be given for either file.

For images x, y [B, 3, H, W] in [-1, 1]:

    s(x) = (x - shift) / scale                          shift = (-.030, -.088, -.188), scale = (.458, .448, .450)
    f_k  = relu{1_2, 2_2, 3_3, 4_3, 5_3} of VGG16(s(.)) k = 0..4, channels 64, 128, 256, 512, 512
    n(f) = f / (sqrt(sum_c f^2) + 1e-10)
    d    = sum_k mean_hw( w_k . (n(f_k(x)) - n(f_k(y)))^2 )   -> [B, 1, 1, 1]
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from models.layers import Conv2d
from weights.checkpoint import WeightsError, load_weights
from weights.foreign import read_weights

log = logging.getLogger("iidm.autoencoder")

CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16.features: index -> (in, out) of each 3x3 convolution; a ReLU follows each,
# max pooling sits at 4, 9, 16, 23. LPIPS cuts the features after the ReLUs at 3, 8, 15, 22, 29.
VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
               14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
               26: (512, 512), 28: (512, 512)}
VGG16_POOLS = (4, 9, 16, 23)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class MaxPool2x2(nn.Module):
    """2x2 max pooling with stride 2, flooring odd sizes (torch's MaxPool2d(2, 2)); Jittor's Pool
    refuses inputs no larger than the kernel (a 2x2 map), which small images reach at relu5."""

    def execute(self, x: jt.Var) -> jt.Var:
        n, c, h, w = x.shape
        x = x[:, :, : h // 2 * 2, : w // 2 * 2]
        return x.reshape(n, c, h // 2, 2, w // 2, 2).max(dims=(3, 5))


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` up to relu5_3, as five slices named by the original indices."""

    def __init__(self):
        for k, (start, stop) in enumerate(SLICES, start=1):
            block = nn.Sequential()
            for i in range(start, stop):
                if i in VGG16_CONVS:
                    block.add_module(str(i), Conv2d(*VGG16_CONVS[i], 3, stride=1, padding=1))
                elif i in VGG16_POOLS:
                    block.add_module(str(i), MaxPool2x2())
                else:
                    block.add_module(str(i), nn.ReLU())
            setattr(self, f"slice{k}", block)

    def execute(self, x: jt.Var) -> list[jt.Var]:
        features = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            features.append(x)
        return features


class NetLinLayer(nn.Module):
    """Dropout (inactive: LPIPS is always evaluated) then a 1x1 convolution C -> 1 without bias."""

    def __init__(self, channels: int):
        self.model = nn.Sequential(nn.Dropout(0.5), Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))


def _normalise(x: jt.Var, eps: float = 1e-10) -> jt.Var:
    return x / (jt.sqrt((x * x).sum(dim=1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """d(x, y) [B, 1, 1, 1]; build it with ``load_lpips`` (random weights are meaningless)."""

    def __init__(self):
        self._shift = jt.array(np.array(SHIFT, np.float32).reshape(1, 3, 1, 1)).stop_grad()
        self._scale = jt.array(np.array(SCALE, np.float32).reshape(1, 3, 1, 1)).stop_grad()
        self.net = VGG16Features()
        for k, channels in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(channels))

    def execute(self, x: jt.Var, y: jt.Var) -> jt.Var:
        fx = self.net((x - self._shift) / self._scale)
        fy = self.net((y - self._shift) / self._scale)
        total = None
        for k in range(len(CHANNELS)):
            diff = (_normalise(fx[k]) - _normalise(fy[k])) ** 2
            term = getattr(self, f"lin{k}").model(diff).mean(dims=(2, 3), keepdims=True)
            total = term if total is None else total + term
        return total


_VGG_TORCHVISION = re.compile(r"(?:^|\.)features\.(\d+)\.(weight|bias)$")
_VGG_TAMING = re.compile(r"(?:^|\.)net\.slice([1-5])\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"(?:^|\.)lin([0-4])\.model\.([01])\.weight$")


def _slice_of(index: int) -> int:
    return next(k for k, (start, stop) in enumerate(SLICES, start=1) if start <= index < stop)


def lpips_state_from_files(vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Name -> array of every LPIPS weight, gathered from the two files (see the module docstring)."""
    state: dict[str, np.ndarray] = {}
    vgg, _ = read_weights(vgg_path)
    for name, value in vgg.items():
        match = _VGG_TORCHVISION.search(name)
        if match and int(match.group(1)) in VGG16_CONVS:
            index = int(match.group(1))
            state[f"net.slice{_slice_of(index)}.{index}.{match.group(2)}"] = value
            continue
        match = _VGG_TAMING.search(name)
        if match and int(match.group(2)) in VGG16_CONVS:
            state[f"net.slice{match.group(1)}.{match.group(2)}.{match.group(3)}"] = value
    if not state:
        raise WeightsError(f"{vgg_path}: no VGG16 weights found (expected torchvision's features.N.weight "
                           "or taming's net.sliceK.N.weight)")
    heads, _ = read_weights(heads_path)
    found = 0
    for name, value in heads.items():
        match = _HEAD.search(name)
        if match:
            state[f"lin{match.group(1)}.model.1.weight"] = value
            found += 1
    if not found:
        raise WeightsError(f"{heads_path}: no LPIPS heads found (expected lin0.model.1.weight ... "
                           "lin4.model.1.weight, as in the lpips package's vgg.pth)")
    return state


def load_lpips(vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> LPIPS:
    """LPIPS-VGG with weights from the user's files, every name and shape checked; frozen (eval)."""
    model = LPIPS()
    load_weights(model, lpips_state_from_files(vgg_path, heads_path), source=f"{vgg_path} + {heads_path}")
    log.info("LPIPS-VGG loaded from %s and %s", vgg_path, heads_path)
    return model.eval()

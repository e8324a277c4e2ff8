"""Small layers shared by the U-Net and the autoencoder.

Jittor's ``nn.GroupNorm`` computes the variance as E[x^2] - E[x]^2, which loses float32
precision when the mean is large (error 3e-2 at input mean 100, DESIGN §7); the reference
implementations (PyTorch) subtract the mean first. ``group_norm`` here is two-pass, so both agree
to float32 precision. This module is the single place that faster kernels replace later.
"""

from __future__ import annotations

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn


def group_norm(x: jt.Var, num_groups: int, weight: jt.Var | None = None,
               bias: jt.Var | None = None, eps: float = 1e-5) -> jt.Var:
    """Group normalisation of x [N, C, *spatial] with a two-pass variance:
    y = (x - mean_g) / sqrt(mean_g((x - mean_g)^2) + eps) * weight_c + bias_c."""
    shape = x.shape
    n, channels = shape[0], shape[1]
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels are not divisible into {num_groups} groups")
    grouped = x.reshape((n, num_groups, -1))
    centred = grouped - grouped.mean(dim=2, keepdims=True)
    variance = (centred * centred).mean(dim=2, keepdims=True)
    y = (centred / jt.sqrt(variance + eps)).reshape(shape)
    if weight is not None:
        broadcast = (1, channels) + (1,) * (len(shape) - 2)
        y = y * weight.reshape(broadcast)
        if bias is not None:
            y = y + bias.reshape(broadcast)
    return y


class GroupNorm(nn.Module):
    """``nn.GroupNorm`` with the two-pass variance; parameters ``weight`` and ``bias`` as in PyTorch."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self.weight = jt.ones((num_channels,))
            self.bias = jt.zeros((num_channels,))

    def execute(self, x: jt.Var) -> jt.Var:
        if self.affine:
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm(x, self.num_groups, eps=self.eps)


def silu(x: jt.Var) -> jt.Var:
    """SiLU / swish: x * sigmoid(x)."""
    return x * jt.sigmoid(x)


class SiLU(nn.Module):
    def execute(self, x: jt.Var) -> jt.Var:
        return silu(x)

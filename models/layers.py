"""Small layers shared by the U-Net and the autoencoder, and the choice between two paths for each.

Jittor's ``nn.GroupNorm`` computes the variance as E[x^2] - E[x]^2, which loses float32
precision when the mean is large (error 3e-2 at input mean 100); the reference
implementations (PyTorch) subtract the mean first. ``group_norm`` here is two-pass, so both agree
to float32 precision.

Two paths compute the same functions:

* the reference path: plain Jittor ops (``*_reference``), used on CUDA, for float16, and whenever
  the kernels are switched off;
* the CPU kernels of ``models/kernels.py`` (C++ with OpenMP; Jittor's own CPU kernels run on one
  core; the convolution keeps what oneDNN builds between calls), used automatically for float32
  tensors when CUDA is off. ``IIDM_KERNELS=0`` in the
  environment, or ``with use_kernels(False):``, selects the reference path on the CPU too.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from models import kernels

KERNELS_ENV = "IIDM_KERNELS"
_kernel_override: list[bool] = []


def kernels_enabled() -> bool:
    """True when the CPU kernels replace the plain ops: CUDA is off and neither ``IIDM_KERNELS=0``
    nor an enclosing ``use_kernels(False)`` says otherwise."""
    if jt.flags.use_cuda:
        return False
    if _kernel_override:
        return _kernel_override[-1]
    return os.environ.get(KERNELS_ENV, "1").strip() != "0"


@contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Switch the CPU kernels on or off inside the block (they stay off on CUDA). Graphs are
    built lazily but the choice is made when each op is called, i.e. inside the block."""
    _kernel_override.append(bool(enabled))
    try:
        yield
    finally:
        _kernel_override.pop()


def _kernel_applies(*tensors: jt.Var | None) -> bool:
    return kernels_enabled() and all(t is None or t.dtype == "float32" for t in tensors)


def group_norm_reference(x: jt.Var, num_groups: int, weight: jt.Var | None = None,
                         bias: jt.Var | None = None, eps: float = 1e-5) -> jt.Var:
    """``group_norm`` in plain Jittor ops (the reference path)."""
    shape = x.shape
    n, channels = shape[0], shape[1]
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


def group_norm(x: jt.Var, num_groups: int, weight: jt.Var | None = None,
               bias: jt.Var | None = None, eps: float = 1e-5) -> jt.Var:
    """Group normalisation of x [N, C, *spatial] with a two-pass variance:
    y = (x - mean_g) / sqrt(mean_g((x - mean_g)^2) + eps) * weight_c + bias_c."""
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels are not divisible into {num_groups} groups")
    if weight is not None and bias is not None and _kernel_applies(x, weight, bias):
        return kernels.group_norm_act(x, num_groups, weight, bias, eps)
    if weight is None and bias is None and _kernel_applies(x):
        return kernels.group_norm_act(x, num_groups, eps=eps)
    return group_norm_reference(x, num_groups, weight, bias, eps)


def silu_reference(x: jt.Var) -> jt.Var:
    """``silu`` in plain Jittor ops (the reference path)."""
    return x * jt.sigmoid(x)


def silu(x: jt.Var) -> jt.Var:
    """SiLU / swish: x * sigmoid(x)."""
    # Below the kernel's threading size Jittor's own element-wise op is as fast, and it can fuse
    # with its neighbours (the U-Net's small ones are on the timestep embedding).
    if _kernel_applies(x) and x.numel() >= kernels.PARALLEL_MIN_ELEMENTS:
        return kernels.silu(x)
    return silu_reference(x)


def group_norm_act(x: jt.Var, num_groups: int, weight: jt.Var | None = None,
                   bias: jt.Var | None = None, eps: float = 1e-5, *, gamma: jt.Var | None = None,
                   beta: jt.Var | None = None, scale: jt.Var | None = None,
                   shift: jt.Var | None = None, silu: bool = False) -> jt.Var:
    """A group norm and what follows it in the U-Net, as one op:

        z = group_norm(x, num_groups, weight, bias, eps)   computed in float32 and cast back to
                                                            x's dtype (guided-diffusion's GroupNorm32)
        z = z * (1 + gamma) + beta      SPADE modulation; gamma, beta [N, C, *spatial] like x
        z = z * (1 + scale) + shift     timestep FiLM; scale, shift [N, C, 1, 1]
        y = silu(z)                     when ``silu``

    Each optional pair applies only when given (weight with bias, gamma with beta, scale with
    shift). The reference path runs these steps as written, in x's dtype after the norm.
    """
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"group_norm_act: {channels} channels are not divisible into {num_groups} groups")
    if _kernel_applies(x, weight, bias, gamma, beta, scale, shift):
        return kernels.group_norm_act(x, num_groups, weight, bias, eps, gamma=gamma, beta=beta,
                                      scale=scale, shift=shift, silu=silu)
    if x.dtype == "float32":
        y = group_norm_reference(x, num_groups, weight, bias, eps)
    else:
        y = group_norm_reference(x.float32(), num_groups, weight, bias, eps).cast(x.dtype)
    if gamma is not None:
        y = y * (1 + gamma) + beta
    if scale is not None:
        y = y * (1 + scale) + shift
    return silu_reference(y) if silu else y


def qkv_attention_legacy_reference(qkv: jt.Var, num_heads: int) -> jt.Var:
    """``qkv_attention_legacy`` in plain Jittor ops: batched matmuls (the reference path, and the
    CUDA path)."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    qkv = qkv.reshape((bs * num_heads, 3 * ch, length))
    q, k, v = qkv[:, :ch], qkv[:, ch:2 * ch], qkv[:, 2 * ch:]
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    weight = nn.bmm((q * scale).transpose((0, 2, 1)), k * scale)  # [B*H, T, S]
    weight = nn.softmax(weight.float32(), dim=-1).cast(qkv.dtype)
    out = nn.bmm(v, weight.transpose((0, 2, 1)))  # [B*H, c, T]
    return out.reshape((bs, num_heads * ch, length))


def qkv_attention_legacy(qkv: jt.Var, num_heads: int) -> jt.Var:
    """Multi-head self-attention with guided-diffusion's legacy layout (heads split before q/k/v).

    qkv [B, H * 3 * c, T] -> per head (B*H, 3c, T) -> q, k, v (B*H, c, T);
    w = softmax_s((q / c^(1/4))^T (k / c^(1/4))) computed in float32; out_t = sum_s w_ts v_s
    -> [B, H * c, T]. (Vaswani et al. 2017; scaling split between q and k as in the reference.)
    On the CPU the kernel runs oneDNN's sgemm per head and a multi-threaded softmax.
    """
    bs, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv_attention_legacy: width {width} is not 3 x {num_heads} heads x c")
    if _kernel_applies(qkv) and kernels.has_sgemm():
        return kernels.qkv_attention_legacy(qkv, num_heads)
    return qkv_attention_legacy_reference(qkv, num_heads)


def conv2d(x: jt.Var, weight: jt.Var, bias: jt.Var | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> jt.Var:
    """2-D convolution as ``jt.nn.conv2d`` (the reference path, and the CUDA path: cuDNN). On the
    CPU the kernel path is ``kernels.conv2d``: oneDNN as in Jittor's own convolution op, with the
    primitive cached per geometry, the bias added inside the convolution, and 1x1 convolutions
    as sgemm on NCHW; its gradients are Jittor's oneDNN convolution-backward ops."""
    if _kernel_applies(x, weight, bias) and kernels.conv2d_available():
        return kernels.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return nn.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and initialisation) that runs through ``conv2d`` above."""

    def execute(self, x: jt.Var) -> jt.Var:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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


class SiLU(nn.Module):
    def execute(self, x: jt.Var) -> jt.Var:
        return silu(x)

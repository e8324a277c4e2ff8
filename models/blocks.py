"""Building blocks of the SDM U-Net: timestep embedding, residual blocks, SPADE, attention.

Follows guided-diffusion (Dhariwal & Nichol 2021, ``guided_diffusion/unet.py`` and ``nn.py``) as
modified by SDM (Wang et al. 2022, "Semantic Image Synthesis via Diffusion Models"): the encoder
uses plain ``ResBlock``s, the middle and the decoder use ``SDMResBlock``s whose two group norms
are SPADE norms driven by the one-hot mask. Module and parameter names are SDM's, so SDM ``.pt``
and IIDM ``.pkl`` weights load by name. Differences that do not change results: Jittor's
``execute`` instead of ``forward``; blocks are called ``(x, emb, mask)`` (SDM: ``(x, cond, emb)``);
gradient checkpointing is a pass over whole blocks outside them (``models/staged.py``) instead of
guided-diffusion's per-block ``checkpoint`` flag.

Shapes: ``x`` [B, C, H, W]; ``emb`` [B, 4 * model_channels]; ``mask`` [B, num_classes, H0, W0] at
the latent resolution (each SPADE norm resizes it to its own level, nearest).
"""

from __future__ import annotations

import math

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from models.layers import Conv2d, GroupNorm, SiLU, conv2d, group_norm_act, qkv_attention_legacy

# SPADE's hidden width (SDM and NVlabs/SPADE: nhidden = 128).
SPADE_HIDDEN_CHANNELS = 128
GROUP_NORM_EPS = 1e-5  # PyTorch's nn.GroupNorm default, used by GroupNorm32 and SPADEGroupNorm


def timestep_embedding(t: jt.Var, dim: int, max_period: float = 10000.0) -> jt.Var:
    """Sinusoidal timestep embedding of guided-diffusion (``nn.timestep_embedding``).

    freqs_i = exp(-ln(max_period) * i / half), i = 0..half-1, half = dim // 2;
    args = t[:, None] * freqs[None]; embedding = [cos(args), sin(args)] (cosines first),
    padded with one zero column when ``dim`` is odd. t: [B] (integer or float) -> [B, dim] float32.
    The frequencies are rounded to float32 and the products t * freqs taken in float32, as the
    reference does (so at t ~ 1000 the arguments carry ~6e-5 of float32 rounding there too).
    """
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half).astype(np.float32)
    args = t.float32().reshape((-1, 1)) * jt.array(freqs).reshape((1, half))
    embedding = jt.concat([jt.cos(args), jt.sin(args)], dim=1)
    if dim % 2:
        embedding = jt.concat([embedding, jt.zeros_like(embedding[:, :1])], dim=1)
    return embedding


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output position for PyTorch's ``interpolate(mode="nearest")``.

    ATen (UpSample.h, ``nearest_idx``): identity when the sizes agree, ``dst >> 1`` when the
    output is exactly twice the input, else ``min(floor(dst * scale), in - 1)`` with
    ``scale = float(in) / out`` and the product taken in float32.
    """
    dst = np.arange(out_size)
    if out_size == in_size:
        return dst
    if out_size == 2 * in_size:
        return dst >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_nearest(x: jt.Var, height: int, width: int) -> jt.Var:
    """Nearest resize of x [B, C, h, w] to [B, C, height, width] with PyTorch's index rule."""
    n, c, h, w = x.shape
    if (h, w) == (height, width):
        return x
    rows = jt.array(nearest_indices(h, height).astype(np.int32))
    cols = jt.array(nearest_indices(w, width).astype(np.int32))
    return x.reindex([n, c, height, width], ["i0", "i1", "@e0(i2)", "@e1(i3)"], extras=[rows, cols])


def upsample_nearest2x(x: jt.Var) -> jt.Var:
    """``F.interpolate(x, scale_factor=2, mode="nearest")``: every pixel repeated 2x2."""
    n, c, h, w = x.shape
    return x.reindex([n, c, 2 * h, 2 * w], ["i0", "i1", "i2/2", "i3/2"])


def downsample_avg2x(x: jt.Var) -> jt.Var:
    """``AvgPool2d(kernel_size=2, stride=2)``: mean of each 2x2 block (a trailing odd row or
    column is dropped, as PyTorch does)."""
    n, c, h, w = x.shape
    x = x[:, :, : h - h % 2, : w - w % 2]
    return x.reshape((n, c, h // 2, 2, w // 2, 2)).mean(dims=(3, 5))


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (guided-diffusion's ``zero_module``) and return it."""
    for p in module.parameters():
        p.assign(jt.zeros(p.shape, p.dtype))
    return module


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> Conv2d:
    return Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class PointwiseConv1d(nn.Module):
    """``nn.Conv1d(in, out, 1)`` of PyTorch (weight [out, in, 1], bias [out]) on x [B, in, T].

    Run as a 1x1 2-D convolution so the CPU uses oneDNN and CUDA uses cuDNN.
    """

    def __init__(self, in_channels: int, out_channels: int):
        self.in_channels, self.out_channels = in_channels, out_channels
        bound = 1.0 / math.sqrt(in_channels)  # PyTorch's default (kaiming_uniform(a=sqrt(5)))
        self.weight = jt.init.uniform((out_channels, in_channels, 1), "float32", -bound, bound)
        self.bias = jt.init.uniform((out_channels,), "float32", -bound, bound)

    def execute(self, x: jt.Var) -> jt.Var:
        b, c, length = x.shape
        weight = self.weight.reshape((self.out_channels, self.in_channels, 1, 1))
        y = conv2d(x.reshape((b, c, length, 1)), weight, self.bias)
        return y.reshape((b, self.out_channels, length))


class GroupNorm32(GroupNorm):
    """guided-diffusion's ``GroupNorm32``: affine group norm computed in float32, cast back.

    ``norm(x, scale=, shift=, silu=)`` also applies what follows the norm in the blocks,
    silu(norm(x) * (1 + scale) + shift), as one op (``models.layers.group_norm_act``; one fused
    kernel on the CPU).
    """

    def __init__(self, num_groups: int, num_channels: int):
        super().__init__(num_groups, num_channels, eps=GROUP_NORM_EPS, affine=True)

    def execute(self, x: jt.Var, scale: jt.Var | None = None, shift: jt.Var | None = None,
                silu: bool = False) -> jt.Var:
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps,
                              scale=scale, shift=shift, silu=silu)


class TimestepBlock(nn.Module):
    """A block called as ``block(x, emb)``."""


class MaskBlock(nn.Module):
    """A block called as ``block(x, emb, mask)``."""


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` (and ``mask``) to the children that take them."""

    def execute(self, x: jt.Var, emb: jt.Var, mask: jt.Var) -> jt.Var:
        for layer in self:
            if isinstance(layer, MaskBlock):
                x = layer(x, emb, mask)
            elif isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 convolution (``conv``) when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv3x3(channels, self.out_channels)

    def execute(self, x: jt.Var) -> jt.Var:
        x = upsample_nearest2x(x)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (``op``) when ``use_conv``, else 2x2 average."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = conv3x3(channels, self.out_channels, stride=2)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without convolution keeps the channel count "
                             f"({channels}), got out_channels={out_channels}")

    def execute(self, x: jt.Var) -> jt.Var:
        return self.op(x) if self.use_conv else downsample_avg2x(x)


class SPADEGroupNorm(nn.Module):
    """SPADE with a parameter-free group norm (SDM's ``SPADEGroupNorm``; Park et al. 2019).

    Two steps: (1) normalise x [B, C, H, W] with a group norm that has no affine parameters;
    (2) predict a per-pixel scale and shift from the mask, resized nearest to (H, W):
    a = ReLU(conv3x3(mask)) with ``hidden`` channels (``mlp_shared``), gamma = conv3x3(a)
    (``mlp_gamma``), beta = conv3x3(a) (``mlp_beta``); return norm(x) * (1 + gamma) + beta.
    ``spade(x, mask, scale=, shift=, silu=)`` continues with the block's timestep FiLM and
    SiLU, silu(spade(x, mask) * (1 + scale) + shift), in the same fused op.
    """

    def __init__(self, norm_channels: int, mask_channels: int, num_groups: int = 32,
                 hidden_channels: int = SPADE_HIDDEN_CHANNELS):
        if norm_channels % num_groups:
            raise ValueError(f"SPADEGroupNorm: {norm_channels} channels are not divisible into "
                             f"{num_groups} groups")
        self.num_groups = num_groups
        self.mlp_shared = nn.Sequential(conv3x3(mask_channels, hidden_channels), nn.ReLU())
        self.mlp_gamma = conv3x3(hidden_channels, norm_channels)
        self.mlp_beta = conv3x3(hidden_channels, norm_channels)

    def execute(self, x: jt.Var, mask: jt.Var, scale: jt.Var | None = None,
                shift: jt.Var | None = None, silu: bool = False) -> jt.Var:
        mask = resize_nearest(mask, x.shape[2], x.shape[3])
        actv = self.mlp_shared(mask)
        return group_norm_act(x, self.num_groups, eps=GROUP_NORM_EPS, gamma=self.mlp_gamma(actv),
                              beta=self.mlp_beta(actv), scale=scale, shift=shift, silu=silu)


def _film(emb_out: jt.Var, out_channels: int) -> tuple[jt.Var, jt.Var]:
    """Split the [B, 2C] timestep projection into (scale, shift), each [B, C, 1, 1] (th.chunk order)."""
    return emb_out[:, :out_channels, None, None], emb_out[:, out_channels:, None, None]


class ResBlock(TimestepBlock):
    """guided-diffusion's residual block (encoder; no mask).

    h = conv3x3(SiLU(GN(x)))                            ``in_layers`` (resampled between SiLU and
                                                        conv when ``up``/``down``; x too)
    scale-shift: h = GN(h) * (1 + scale) + shift         (scale, shift) = Linear(SiLU(emb))
    else:        h = GN(h + Linear(SiLU(emb)))
    h = conv3x3(Dropout(SiLU(h)))  (zero-initialised)   ``out_layers``
    return skip(x) + h             skip = identity, or a 1x1 convolution when channels change
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: int | None = None, use_scale_shift_norm: bool = False,
                 up: bool = False, down: bool = False, num_groups: int = 32):
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(num_groups, channels), SiLU(), conv3x3(channels, self.out_channels))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(num_groups, self.out_channels), SiLU(), nn.Dropout(p=dropout),
            zero_module(conv3x3(self.out_channels, self.out_channels)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, self.out_channels, 1)

    def execute(self, x: jt.Var, emb: jt.Var) -> jt.Var:
        # The norms apply the SiLU that follows them (in_layers[1], out_layers[1]) fused.
        norm, conv = self.in_layers[0], self.in_layers[2]
        h = norm(x, silu=True)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).cast(h.dtype)
        out_norm = self.out_layers[0]
        if self.use_scale_shift_norm:
            scale, shift = _film(emb_out, self.out_channels)
            h = out_norm(h, scale=scale, shift=shift, silu=True)
        else:
            h = out_norm(h + emb_out[:, :, None, None], silu=True)
        for layer in list(self.out_layers)[2:]:
            h = layer(h)
        return self.skip_connection(x) + h


class SDMResBlock(MaskBlock):
    """SDM's residual block (middle and decoder): ``ResBlock`` with both group norms replaced
    by SPADE norms of the mask.

    h = conv3x3(SiLU(SPADE_in(x, mask)))                ``in_norm``, ``in_layers``
    scale-shift: h = SPADE_out(h, mask) * (1 + scale) + shift   (timestep FiLM after SPADE)
    else:        h = SPADE_out(h + Linear(SiLU(emb)), mask)
    h = conv3x3(Dropout(SiLU(h)))  (zero-initialised)   ``out_norm``, ``out_layers``
    return skip(x) + h
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, mask_channels: int,
                 out_channels: int | None = None, use_scale_shift_norm: bool = False,
                 up: bool = False, down: bool = False, num_groups: int = 32,
                 spade_hidden_channels: int = SPADE_HIDDEN_CHANNELS):
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = SPADEGroupNorm(channels, mask_channels, num_groups, spade_hidden_channels)
        self.in_layers = nn.Sequential(SiLU(), conv3x3(channels, self.out_channels))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_norm = SPADEGroupNorm(self.out_channels, mask_channels, num_groups,
                                       spade_hidden_channels)
        self.out_layers = nn.Sequential(
            SiLU(), nn.Dropout(p=dropout),
            zero_module(conv3x3(self.out_channels, self.out_channels)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, self.out_channels, 1)

    def execute(self, x: jt.Var, emb: jt.Var, mask: jt.Var) -> jt.Var:
        # The SPADE norms apply the SiLU that follows them (in_layers[0], out_layers[0]) fused.
        h = self.in_norm(x, mask, silu=True)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[1](h)
        emb_out = self.emb_layers(emb).cast(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = _film(emb_out, self.out_channels)
            h = self.out_norm(h, mask, scale=scale, shift=shift, silu=True)
        else:
            h = self.out_norm(h + emb_out[:, :, None, None], mask, silu=True)
        for layer in list(self.out_layers)[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head self-attention with guided-diffusion's legacy layout (heads split before q/k/v).

    qkv [B, H * 3 * c, T] -> per head (B*H, 3c, T) -> q, k, v (B*H, c, T);
    w = softmax_s((q / c^(1/4))^T (k / c^(1/4))) computed in float32; out_t = sum_s w_ts v_s
    -> [B, H * c, T]. (Vaswani et al. 2017; scaling split between q and k as in the reference.)
    Computed by ``models.layers.qkv_attention_legacy`` (a oneDNN-backed kernel on the CPU).
    """

    def __init__(self, n_heads: int):
        self.n_heads = n_heads

    def execute(self, qkv: jt.Var) -> jt.Var:
        return qkv_attention_legacy(qkv, self.n_heads)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: x + proj_out(attention(qkv(GN(x)))).

    ``proj_out`` is zero-initialised. Heads: ``channels // num_head_channels`` when
    ``num_head_channels`` is not -1, else ``num_heads``.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 num_groups: int = 32):
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"AttentionBlock: {channels} channels are not divisible by "
                                 f"num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = PointwiseConv1d(channels, 3 * channels)
        self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(PointwiseConv1d(channels, channels))

    def execute(self, x: jt.Var) -> jt.Var:
        b, c, height, width = x.shape
        flat = x.reshape((b, c, height * width))
        h = self.proj_out(self.attention(self.qkv(self.norm(flat))))
        return (flat + h).reshape((b, c, height, width))

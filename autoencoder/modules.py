"""Encoder and decoder of the LDM / taming autoencoders (ldm/modules/diffusionmodules/model.py).

The module tree and parameter names are the reference's, so its checkpoints load by name:
``conv_in``, ``down.L.block.B.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``down.L.attn.B``,
``down.L.downsample.conv``, ``mid.{block_1,attn_1,block_2}``, ``up.L.block.B``, ``up.L.upsample.conv``,
``norm_out``, ``conv_out``. Level L counts from the full resolution in both networks (the decoder
builds its levels from the bottom up and stores them in resolution order, as the reference does).

Normalisation is GroupNorm(num_groups, C, eps=1e-6) with the two-pass variance of
``models.layers``; the nonlinearity is swish (SiLU). There is no timestep embedding here
(the reference's ``temb_ch`` is 0 for the autoencoder).
"""

from __future__ import annotations

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from models.layers import Conv2d, GroupNorm, qkv_attention_legacy, silu


def normalize(channels: int, num_groups: int = 32) -> GroupNorm:
    return GroupNorm(num_groups, channels, eps=1e-6)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (out[i, j] = in[i // 2, j // 2]), then a 3x3 convolution."""

    def __init__(self, in_channels: int, with_conv: bool):
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, stride=1, padding=1)

    def execute(self, x: jt.Var) -> jt.Var:
        b, c, h, w = x.shape
        x = x.reindex([b, c, 2 * h, 2 * w], ["i0", "i1", "i2/2", "i3/2"])
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """3x3 convolution with stride 2 after padding one zero row and column at the bottom and right
    (the reference's asymmetric padding), or 2x2 average pooling without the convolution."""

    def __init__(self, in_channels: int, with_conv: bool):
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def execute(self, x: jt.Var) -> jt.Var:
        if self.with_conv:
            return self.conv(nn.pad(x, (0, 1, 0, 1)))
        return nn.pool(x, 2, "mean", stride=2)


class ResnetBlock(nn.Module):
    """x + conv2(dropout(swish(norm2(conv1(swish(norm1(x))))))), with a 1x1 (or 3x3) shortcut
    convolution when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, num_groups: int = 32):
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = normalize(in_channels, num_groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
            else:
                self.nin_shortcut = Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def execute(self, x: jt.Var) -> jt.Var:
        h = self.conv1(silu(self.norm1(x)))
        h = silu(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-convolution q, k, v, proj_out:
    out = x + proj_out(v softmax(q^T k / sqrt(C))^T), all per image."""

    def __init__(self, in_channels: int, num_groups: int = 32):
        self.in_channels = in_channels
        self.norm = normalize(in_channels, num_groups)
        self.q = Conv2d(in_channels, in_channels, 1)
        self.k = Conv2d(in_channels, in_channels, 1)
        self.v = Conv2d(in_channels, in_channels, 1)
        self.proj_out = Conv2d(in_channels, in_channels, 1)

    def execute(self, x: jt.Var) -> jt.Var:
        h = self.norm(x)
        b, c, height, width = x.shape
        n = height * width
        q = self.q(h).reshape(b, c, n)
        k = self.k(h).reshape(b, c, n)
        v = self.v(h).reshape(b, c, n)
        # one head: softmax((q / c^(1/4))^T (k / c^(1/4))) = softmax(q^T k / sqrt(c)), the same weights
        out = qkv_attention_legacy(jt.concat([q, k, v], dim=1), 1)
        return x + self.proj_out(out.reshape(b, c, height, width))


def _level() -> nn.Module:
    return nn.Module()


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> latent [B, z_channels (x2 if double_z), H / f, W / f] with
    f = 2^(len(ch_mult) - 1). Attention after the residual blocks of levels whose resolution
    (counted from ``resolution``) is in ``attn_resolutions``, and always in the middle."""

    def __init__(self, *, ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions=(),
                 dropout: float = 0.0, resamp_with_conv: bool = True, in_channels: int, resolution: int,
                 z_channels: int, double_z: bool = True, num_groups: int = 32, **ignored):
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = Conv2d(in_channels, ch, 3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        current = resolution
        levels = []
        for i_level in range(self.num_resolutions):
            blocks, attns = [], []
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, num_groups=num_groups))
                block_in = block_out
                if current in attn_resolutions:
                    attns.append(AttnBlock(block_in, num_groups))
            level = _level()
            level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                current //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = _level()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, num_groups=num_groups)
        self.mid.attn_1 = AttnBlock(block_in, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, num_groups=num_groups)
        self.norm_out = normalize(block_in, num_groups)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def execute(self, x: jt.Var) -> jt.Var:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h * f, w * f]; num_res_blocks + 1 residual
    blocks per level, as in the reference."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions=(), dropout: float = 0.0, resamp_with_conv: bool = True,
                 resolution: int, z_channels: int, num_groups: int = 32, **ignored):
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        current = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, stride=1, padding=1)
        self.mid = _level()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, num_groups=num_groups)
        self.mid.attn_1 = AttnBlock(block_in, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, num_groups=num_groups)
        levels = [None] * self.num_resolutions
        for i_level in reversed(range(self.num_resolutions)):
            blocks, attns = [], []
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, num_groups=num_groups))
                block_in = block_out
                if current in attn_resolutions:
                    attns.append(AttnBlock(block_in, num_groups))
            level = _level()
            level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                current *= 2
            levels[i_level] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in, num_groups)
        self.conv_out = Conv2d(block_in, out_ch, 3, stride=1, padding=1)

    def execute(self, z: jt.Var) -> jt.Var:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(silu(self.norm_out(h)))

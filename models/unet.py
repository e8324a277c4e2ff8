"""The SDM U-Net (Wang et al. 2022) with the configuration and presets of this project.

Call: ``unet(x_t, t, mask)``
    x_t   [B, in_channels, H, W] float32 noisy latent; H and W divisible by 2**(levels - 1)
    t     [B] integer timesteps of the training schedule, in [0, T)
    mask  [B, num_classes, H, W] float32 one-hot semantic mask; all zeros is the null mask of
          classifier-free guidance
    ->    [B, out_channels, H, W] float32: eps, followed by the variance interpolation v
          (Improved DDPM's learned range) when ``learn_sigma`` (out_channels = 2 * in_channels).

Structure (guided-diffusion's ``UNetModel`` with SDM's conditioning): ``time_embed`` (MLP on the
sinusoidal embedding, width 4 * model_channels); ``input_blocks`` (a 3x3 convolution, then per
level ``num_res_blocks`` ``ResBlock``s, attention where the downsample factor is in
``attention_resolutions``, and a downsampling block between levels); ``middle_block``
(SDMResBlock, attention, SDMResBlock); ``output_blocks`` (per level, deepest first,
``num_res_blocks + 1`` SDMResBlocks on [h, skip] concatenations, attention, an upsampling block);
``out`` (GN, SiLU, zero-initialised 3x3 convolution). Parameter names equal SDM's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from weights.checkpoint import Checkpoint, WeightsError, config_from_dict, load_checkpoint, load_weights
from models.blocks import (
    SPADE_HIDDEN_CHANNELS,
    AttentionBlock,
    Downsample,
    GroupNorm32,
    PointwiseConv1d,
    ResBlock,
    SDMResBlock,
    TimestepEmbedSequential,
    Upsample,
    conv3x3,
    timestep_embedding,
    zero_module,
)
from models.layers import SiLU


@dataclass(frozen=True)
class UNetConfig:
    """Constructor arguments of SDM's ``UNetModel`` (same names and meaning), plus:

    num_classes           channels of the one-hot mask (SDM's name; SDM adds 1 for its instance
                          edge map, IIDM uses none: 29 for the landscape classes).
    learn_sigma           output 2 * in_channels channels (eps and the variance interpolation v);
                          SDM's ``out_channels`` follows from it (see ``out_channels``).
    norm_groups           groups of every group norm (SDM: 32); smaller for tiny widths.
    spade_hidden_channels hidden width of the SPADE convolutions (SDM: 128).
    use_fp16              run the torso in float16 (CUDA only; as SDM's ``convert_to_fp16``).

    ``attention_resolutions`` are downsample factors (1 = the input resolution). SDM options not
    offered: ``dims`` (2 only), ``use_checkpoint`` (``models/staged.py`` recomputes whole blocks instead),
    ``use_new_attention_order`` (the released SDM and IIDM weights use the legacy order),
    ``image_size`` (the network does not need it).
    """

    in_channels: int = 3
    model_channels: int = 256
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 8, 16)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 1, 2, 3, 4)
    conv_resample: bool = True
    num_classes: int = 29
    num_heads: int = 1
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    learn_sigma: bool = True
    norm_groups: int = 32
    spade_hidden_channels: int = SPADE_HIDDEN_CHANNELS
    use_fp16: bool = False

    def __post_init__(self):
        for name in ("in_channels", "model_channels", "num_res_blocks", "num_classes",
                     "norm_groups", "spade_hidden_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if not self.channel_mult:
            raise ValueError("UNetConfig.channel_mult must name at least one level")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        for width in self.level_channels:
            if width < 1 or width % self.norm_groups:
                raise ValueError(f"UNetConfig: level width {width} (model_channels x channel_mult) "
                                 f"is not a positive multiple of norm_groups={self.norm_groups}")
        attention_widths = [self.level_channels[i] for i in range(len(self.channel_mult))
                            if 2 ** i in self.attention_resolutions] + [self.level_channels[-1]]
        if self.num_head_channels != -1:
            bad = [w for w in attention_widths if w % self.num_head_channels]
            if self.num_head_channels < 1 or bad:
                raise ValueError(f"UNetConfig.num_head_channels={self.num_head_channels} does not "
                                 f"divide the attention widths {sorted(set(attention_widths))}")
        else:
            upsample = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
            for name, heads in (("num_heads", self.num_heads), ("num_heads_upsample", upsample)):
                if heads < 1 or any(w % heads for w in attention_widths):
                    raise ValueError(f"UNetConfig.{name}={heads} does not divide the attention "
                                     f"widths {sorted(set(attention_widths))}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channel width of each level: int(mult * model_channels)."""
        return tuple(int(mult * self.model_channels) for mult in self.channel_mult)

    @property
    def out_channels(self) -> int:
        """SDM's ``out_channels``: 2 * in_channels with learned sigma, else in_channels."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists for tuples) for checkpoint metadata."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        return config_from_dict(cls, data)


# Presets. "iidm" is the IIDM landscape model (the official image_train.py defaults:
# latent 3x96x128, attention at 24x32, 12x16, 6x8). "demo" trains on a 2-core CPU for 3x24x32
# latents. "tiny" is for tests (any H, W divisible by 2).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "iidm": dict(in_channels=3, model_channels=256, num_res_blocks=2,
                 attention_resolutions=(4, 8, 16), dropout=0.0, channel_mult=(1, 1, 2, 3, 4),
                 num_classes=29, num_heads=4, num_head_channels=64, use_scale_shift_norm=True,
                 resblock_updown=True, learn_sigma=True),
    "demo": dict(in_channels=3, model_channels=32, num_res_blocks=1, attention_resolutions=(4,),
                 dropout=0.0, channel_mult=(1, 2, 2), num_classes=29, num_head_channels=32,
                 use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                 norm_groups=8, spade_hidden_channels=32),
    # A pixel-space SDM for 32x32 photos on a CPU (checkpoints/sdm_demo).
    "sdm-demo": dict(in_channels=3, model_channels=32, num_res_blocks=1, attention_resolutions=(4,),
                     dropout=0.0, channel_mult=(1, 2, 2), num_classes=29, num_head_channels=32,
                     use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                     norm_groups=8, spade_hidden_channels=32),
    "tiny": dict(in_channels=3, model_channels=16, num_res_blocks=1, attention_resolutions=(2,),
                 dropout=0.0, channel_mult=(1, 2), num_classes=29, num_head_channels=8,
                 use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                 norm_groups=4, spade_hidden_channels=16),
}

# How the published models of a preset were trained to diffuse (a checkpoint records its own; these
# fill in what a converted upstream file does not say). IIDM: linear betas over 1000 steps on the
# VQ-f4 latents unscaled.
LINEAR_1000 = {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
PRESET_DIFFUSION: dict[str, dict[str, Any]] = {
    "iidm": {"schedule": LINEAR_1000, "space": "latent", "latent_scale": 1.0},
}

# SDM's published pixel-space models (its scripts: 256 channels, channel_mult (1, 1, 2, 2, 4, 4) for
# 256-pixel images, attention at 32, 16 and 8 pixels, 64 channels per head, learned sigma); the
# mask has the dataset's classes plus the instance edge channel, except ADE20K (no_instance).
_SDM_256 = dict(in_channels=3, model_channels=256, num_res_blocks=2, attention_resolutions=(8, 16, 32),
                dropout=0.0, channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4, num_head_channels=64,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
for _name, _channels in (("cityscapes", 36), ("ade20k", 151), ("celeba", 20), ("coco", 184)):
    UNET_PRESETS[f"sdm-{_name}"] = dict(_SDM_256, num_classes=_channels)
    PRESET_DIFFUSION[f"sdm-{_name}"] = {"schedule": LINEAR_1000, "space": "pixel"}
PRESET_DIFFUSION["sdm-demo"] = {"schedule": LINEAR_1000, "space": "pixel"}


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """The named preset (``iidm``, ``demo``, ``tiny``) with optional field overrides."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
    return UNetConfig(**{**UNET_PRESETS[name], **overrides})


class UNetModel(nn.Module):
    """SDM's U-Net; see the module docstring for the call and the structure.

    Jittor modules start with dropout off: call ``model.train()`` before training when
    ``dropout > 0`` and ``model.eval()`` before sampling (no effect when dropout is 0, as in IIDM).
    """

    def __init__(self, config: UNetConfig):
        self.config = config
        c = config
        self.model_channels = c.model_channels
        time_embed_dim = 4 * c.model_channels
        num_heads_upsample = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        groups = c.norm_groups

        def encoder_block(channels, out_channels, down=False):
            return ResBlock(channels, time_embed_dim, c.dropout, out_channels=out_channels,
                            use_scale_shift_norm=c.use_scale_shift_norm, down=down,
                            num_groups=groups)

        def spade_block(channels, out_channels, up=False):
            return SDMResBlock(channels, time_embed_dim, c.dropout, c.num_classes,
                               out_channels=out_channels,
                               use_scale_shift_norm=c.use_scale_shift_norm, up=up,
                               num_groups=groups, spade_hidden_channels=c.spade_hidden_channels)

        def attention(channels, heads):
            return AttentionBlock(channels, num_heads=heads, num_head_channels=c.num_head_channels,
                                  num_groups=groups)

        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, time_embed_dim), SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim))

        ch = input_ch = c.level_channels[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv3x3(c.in_channels, ch))])
        input_block_chans = [ch]
        ds = 1
        for level, width in enumerate(c.level_channels):
            for _ in range(c.num_res_blocks):
                layers = [encoder_block(ch, width)]
                ch = width
                if ds in c.attention_resolutions:
                    layers.append(attention(ch, c.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                down = (encoder_block(ch, ch, down=True) if c.resblock_updown
                        else Downsample(ch, c.conv_resample, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            spade_block(ch, ch), attention(ch, c.num_heads), spade_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, width in list(enumerate(c.level_channels))[::-1]:
            for i in range(c.num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [spade_block(ch + skip_ch, width)]
                ch = width
                if ds in c.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == c.num_res_blocks:
                    layers.append(spade_block(ch, ch, up=True) if c.resblock_updown
                                  else Upsample(ch, c.conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), SiLU(), zero_module(conv3x3(input_ch, c.out_channels)))
        self._torso_dtype = "float32"
        if c.use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Store the torso's convolution weights in float16 and run the torso in float16, as
        SDM's ``convert_to_fp16`` (time_embed, norms, the timestep projections and ``out`` stay
        float32; group norms compute in float32). Meant for CUDA."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv2d, PointwiseConv1d)):
                    module.weight.assign(module.weight.float16())
                    if module.bias is not None:
                        module.bias.assign(module.bias.float16())
        self._torso_dtype = "float16"

    def _check_inputs(self, x_t: jt.Var, t: jt.Var, mask: jt.Var) -> None:
        c = self.config
        if len(x_t.shape) != 4 or x_t.shape[1] != c.in_channels:
            raise ValueError(f"unet: x_t must be [B, {c.in_channels}, H, W], got {list(x_t.shape)}")
        b, _, height, width = x_t.shape
        f = c.downsample_factor
        if height % f or width % f:
            raise ValueError(f"unet: height and width must be multiples of {f} for "
                             f"{len(c.channel_mult)} levels, got height={height}, width={width}")
        if list(t.shape) != [b]:
            raise ValueError(f"unet: t must be [B] = [{b}] timesteps, got {list(t.shape)}")
        if list(mask.shape) != [b, c.num_classes, height, width]:
            raise ValueError(f"unet: mask must be [B, num_classes, H, W] = "
                             f"{[b, c.num_classes, height, width]}, got {list(mask.shape)}")

    def execute(self, x_t: jt.Var, t: jt.Var, mask: jt.Var) -> jt.Var:
        """x_t [B, C, H, W], t [B] integer timesteps, mask [B, num_classes, H, W] -> [B, out, H, W]."""
        x_t, t, mask = (jt.array(v) if isinstance(v, np.ndarray) else v for v in (x_t, t, mask))
        self._check_inputs(x_t, t, mask)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = x_t.cast(self._torso_dtype)
        mask = mask.cast(self._torso_dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, mask)
            skips.append(h)
        h = self.middle_block(h, emb, mask)
        for module in self.output_blocks:
            h = module(jt.concat([h, skips.pop()], dim=1), emb, mask)
        return self.out(h.cast(x_t.dtype))


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (no value is computed: Jittor knows shapes lazily)."""
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


def load_unet_state_dict(model: UNetModel, state: Mapping[str, Any], source: str = "weights") -> None:
    """Load SDM-named weights (name -> numpy array) after checking every name and shape.

    Names are SDM's already, so nothing is renamed; a mismatch (e.g. a mask with another class
    count) raises ``weights.checkpoint.WeightsError`` naming each offending weight and both shapes.
    """
    load_weights(model, state, source)


def load_unet(source: "str | os.PathLike | Checkpoint", which: str = "ema") -> tuple[UNetModel, Checkpoint]:
    """Build a U-Net from a "unet" checkpoint (a path or a ``Checkpoint`` already read, e.g. an
    average) and load its weights strictly: (model in eval mode, the checkpoint). The checkpoint's
    ``diffusion`` (schedule, space, latent scale) says how to sample from it."""
    checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source, "unet")
    if checkpoint.kind != "unet":
        raise WeightsError(f"{checkpoint.path}: a {checkpoint.kind!r} checkpoint, expected 'unet'")
    model = UNetModel(checkpoint.network_config(UNetConfig))
    load_unet_state_dict(model, checkpoint.weights(which), checkpoint.path)
    return model.eval(), checkpoint

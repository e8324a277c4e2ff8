"""The VQ autoencoder (LDM's VQModelInterface / taming's VQModel): encoder, quant_conv, quantizer,
post_quant_conv, decoder, with the reference's parameter names.

    encode(image)  -> h = quant_conv(encoder(image))                 the pre-quantisation latent
    quantize(h)    -> (z_q, indices, codebook_loss)                  nearest codebook entries
    decode(h)      -> decoder(post_quant_conv(quantize(h)[0]))       quantizes first, as LDM and IIDM do

Images are float32 [B, 3, H, W] in [-1, 1], H and W multiples of the downsampling factor
f = 2^(len(ch_mult) - 1) (4 for vq-f4); latents are float32 [B, embed_dim, H / f, W / f]. There is
no latent scaling for VQ models (LDM's scale_factor is 1 for them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from autoencoder.modules import Decoder, Encoder
from autoencoder.quantize import VectorQuantizer
from models.layers import Conv2d
from weights.checkpoint import config_from_dict, load_checkpoint, load_weights, module_vars, save_checkpoint

KIND = "vqmodel"
TRAINING_PREFIX = "train/"  # version-1 training files kept their state beside the weights under this prefix


@dataclass(frozen=True)
class VQConfig:
    """Architecture of the VQ autoencoder; the defaults are LDM's vq-f4
    (models/first_stage_models/vq-f4/config.yaml)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    resamp_with_conv: bool = True
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256        # only decides where attn_resolutions apply
    z_channels: int = 3
    double_z: bool = False
    embed_dim: int = 3
    n_embed: int = 8192
    beta: float = 0.25
    legacy: bool = True          # taming's VectorQuantizer2 loss weighting (see quantize.py)
    num_groups: int = 32         # GroupNorm groups; 32 in the reference

    def __post_init__(self):
        for name in ("ch_mult", "attn_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(f"VQConfig: channel widths {sorted(set(bad))} are not divisible by "
                             f"num_groups={self.num_groups}")
        if self.double_z:
            raise ValueError("VQConfig: double_z=True is for KL autoencoders; a VQ model needs double_z=False")

    @property
    def factor(self) -> int:
        """Downsampling factor per side."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VQConfig":
        return config_from_dict(cls, values)


PRESETS: dict[str, dict[str, Any]] = {
    "vq-f4": {},
    # Small enough for CPU experiments on 96x128 images.
    "small": {"ch": 32, "ch_mult": (1, 2, 4), "num_res_blocks": 1, "n_embed": 1024, "num_groups": 8},
    # Tests: widths 8 and 16, a 64-entry codebook.
    "tiny": {"ch": 8, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "n_embed": 64, "num_groups": 4},
}


def vq_config(preset: str = "vq-f4", **overrides) -> VQConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return VQConfig(**{**PRESETS[preset], **overrides})


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        self.config = config
        ddconfig = {k: getattr(config, k) for k in (
            "ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
            "in_channels", "resolution", "z_channels", "double_z", "num_groups")}
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, beta=config.beta, legacy=config.legacy)
        self.quant_conv = Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = Conv2d(config.embed_dim, config.z_channels, 1)

    def _check_image(self, image: jt.Var) -> None:
        c, f = self.config.in_channels, self.config.factor
        if image.ndim != 4 or image.shape[1] != c:
            raise ValueError(f"VQModel.encode: expected images [B, {c}, H, W], got {tuple(image.shape)}")
        height, width = image.shape[2], image.shape[3]
        if height % f or width % f:
            raise ValueError(f"VQModel.encode: height and width must be multiples of {f}, "
                             f"got height={height}, width={width}")

    def encode(self, image: jt.Var) -> jt.Var:
        """Image [B, 3, H, W] in [-1, 1] -> pre-quantisation latent [B, embed_dim, H / f, W / f]."""
        self._check_image(image)
        return self.quant_conv(self.encoder(image))

    def decode_quantized(self, z_q: jt.Var) -> jt.Var:
        """Already-quantized latent -> image (LDM's decode with force_not_quantize=True)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, latent: jt.Var) -> jt.Var:
        """Latent [B, embed_dim, h, w] -> image [B, 3, h * f, w * f]; quantizes to the nearest codes first."""
        z_q, _, _ = self.quantize(latent)
        return self.decode_quantized(z_q)

    def decode_code(self, indices: jt.Var) -> jt.Var:
        """Code indices [B, h, w] -> image."""
        return self.decode_quantized(self.quantize.embed_code(indices))

    def execute(self, image: jt.Var) -> tuple[jt.Var, jt.Var, jt.Var]:
        """Training pass: (reconstruction [B, 3, H, W], codebook loss, code indices [B, h, w])."""
        z_q, indices, codebook_loss = self.quantize(self.encode(image))
        return self.decode_quantized(z_q), codebook_loss, indices

    def last_layer(self) -> jt.Var:
        """The decoder's last weight, where the GAN's adaptive weight compares gradient norms."""
        return self.decoder.conv_out.weight


def save_vqmodel(model: VQModel, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
    """Write the weights and config as this project's checkpoint (kind "vqmodel")."""
    save_checkpoint(path, module_vars(model), kind=KIND, config={"network": model.config.to_dict()}, extra=extra)


def load_vqmodel(path: str | os.PathLike, which: str = "model") -> VQModel:
    """Build the model from the config stored in a "vqmodel" checkpoint and load its weights
    (strict: every name and shape checked). From a training checkpoint, ``which`` set of weights
    ("model", or "ema" when the run kept one); training state is left out. The model is returned
    in evaluation mode (parameters frozen); call ``.train()`` to train it."""
    checkpoint = load_checkpoint(path, KIND)
    model = VQModel(checkpoint.network_config(VQConfig))
    weights = {k: v for k, v in checkpoint.weights(which).items() if not k.startswith(TRAINING_PREFIX)}
    load_weights(model, weights, source=str(path))
    return model.eval()

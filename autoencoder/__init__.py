"""The VQ-f4 autoencoder (taming / LDM layout): encoder, decoder, quantizer and training losses.

    from autoencoder import VQModel, vq_config, load_vqmodel

The names below are imported on first use, so ``import autoencoder`` alone does not import Jittor
(entry points call ``jittor_env.setup`` first).
"""

_EXPORTS = {
    "VQModel": "autoencoder.vqmodel", "VQConfig": "autoencoder.vqmodel", "vq_config": "autoencoder.vqmodel",
    "PRESETS": "autoencoder.vqmodel", "load_vqmodel": "autoencoder.vqmodel", "save_vqmodel": "autoencoder.vqmodel",
    "VectorQuantizer": "autoencoder.quantize", "LossConfig": "autoencoder.losses",
    "VQLPIPSWithDiscriminator": "autoencoder.losses", "LPIPS": "autoencoder.lpips", "load_lpips": "autoencoder.lpips",
    "NLayerDiscriminator": "autoencoder.discriminator", "AutoencoderTrainConfig": "autoencoder.training",
    "train_autoencoder": "autoencoder.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autoencoder' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

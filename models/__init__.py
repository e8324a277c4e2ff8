"""Networks: the SDM U-Net and its blocks (SPADE, residual, attention, timestep embedding)."""

from models.unet import (
    UNET_PRESETS,
    UNetConfig,
    UNetModel,
    count_parameters,
    load_unet,
    load_unet_state_dict,
    unet_preset,
)

__all__ = ["UNET_PRESETS", "UNetConfig", "UNetModel", "count_parameters", "load_unet", "load_unet_state_dict",
           "unet_preset"]

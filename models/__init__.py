"""Networks: the SDM U-Net and its blocks (SPADE, residual, attention, timestep embedding)."""

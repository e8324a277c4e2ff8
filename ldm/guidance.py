"""Classifier-free guidance for mask-conditioned networks (Ho & Salimans 2022; SDM's use of it).

The *null mask* is the all-zeros mask: a one-hot mask always has one 1 per pixel, so zeros cannot
be confused with any label map. Training replaces a sample's whole mask by the null mask with
probability p (``drop_masks``; SDM and IIDM fine-tune / train with p = 0.2), so the same network
also learns the unconditional eps. At sampling both are mixed (``classifier_free_guidance``):

    eps = eps(x_t, t, null) + s * (eps(x_t, t, mask) - eps(x_t, t, null))

Only eps is mixed; the learned variance channels come from the masked pass (as SDM and IIDM do).
Both drop-out and the null mask live here so they cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt

from .diffusion import ModelFn

# unet(x_t [B, C, H, W] float32, t [B] int32, mask [B, K, H, W] float32) -> [B, C or 2C, H, W]
MaskedNet = Callable[[jt.Var, jt.Var, jt.Var], jt.Var]


def null_mask_like(mask):
    """The null (unconditional) mask: zeros shaped and typed like ``mask`` (Var or numpy)."""
    if isinstance(mask, jt.Var):
        return jt.zeros(mask.shape, dtype=mask.dtype)
    return np.zeros_like(mask)


def drop_masks(mask, p: float, rng: np.random.Generator):
    """Replace each sample's whole mask [B, K, H, W] by the null mask with probability ``p``.

    One uniform draw per sample from ``rng`` (a numpy Generator, so the training loop can save
    and restore its state); the sample is dropped when the draw is below p. Returns the same type
    as ``mask`` (Jittor Var or numpy array).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask drop probability must be in [0, 1], got {p}")
    if len(mask.shape) != 4:
        raise ValueError(f"mask must be [B, num_classes, H, W], got shape {tuple(mask.shape)}")
    keep = (rng.random(mask.shape[0]) >= p).astype(np.float32).reshape(-1, 1, 1, 1)
    if isinstance(mask, jt.Var):
        return mask * jt.array(keep).astype(mask.dtype)
    return mask * keep.astype(mask.dtype)


def mix_guidance(out_mask: jt.Var, out_null: jt.Var, scale: float, channels: int) -> jt.Var:
    """eps_null + s (eps_mask - eps_null) on the first ``channels`` channels; the rest (learned
    variance) from ``out_mask``."""
    eps = out_null[:, :channels] + scale * (out_mask[:, :channels] - out_null[:, :channels])
    if out_mask.shape[1] == channels:
        return eps
    return jt.concat([eps, out_mask[:, channels:]], dim=1)


def classifier_free_guidance(unet: MaskedNet, mask: jt.Var, scale: float) -> ModelFn:
    """A ``model_fn(x_t, t)`` for the samplers: the guided output of ``unet`` under ``mask``.

    The masked and the null-mask passes run as one batch of 2B (x_t and t repeated, mask then
    zeros, concatenated along the batch), so each step is one network call. At scale 1 the
    guidance is the masked output itself and only the masked pass runs. Any scale is applied by
    the formula; note that SDM's and IIDM's code skip guidance altogether whenever s <= 1.
    """
    scale = float(scale)
    if len(mask.shape) != 4:
        raise ValueError(f"mask must be [B, num_classes, H, W], got shape {tuple(mask.shape)}")
    null = null_mask_like(mask)

    if scale == 1.0:
        def masked_fn(x_t: jt.Var, t: jt.Var) -> jt.Var:
            return unet(x_t, t, mask)
        return masked_fn

    both_masks = jt.concat([mask, null], dim=0)

    def guided_fn(x_t: jt.Var, t: jt.Var) -> jt.Var:
        batch, channels = x_t.shape[0], x_t.shape[1]
        if batch != mask.shape[0]:
            raise ValueError(f"x_t has batch {batch} but the mask has {mask.shape[0]}")
        out = unet(jt.concat([x_t, x_t], dim=0), jt.concat([t, t], dim=0), both_masks)
        return mix_guidance(out[:batch], out[batch:], scale, channels)

    return guided_fn

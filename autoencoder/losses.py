"""Training losses of the VQ autoencoder, with taming's VQLPIPSWithDiscriminator semantics
(taming/modules/losses/vqperceptual.py; Esser et al. 2021, "Taming Transformers", eq. 4-7).

Generator (autoencoder) step, for inputs x and reconstructions x_r [B, 3, H, W]:

    nll     = mean|x - x_r| + perceptual_weight * mean_B LPIPS(x, x_r)    (L1 alone without LPIPS weights)
    g_loss  = -mean D(x_r)
    lambda  = disc_weight * clamp(||grad_L nll|| / (||grad_L g_loss|| + 1e-4), 0, 1e4), detached
              (L = the decoder's last layer weight: the adaptive weight, eq. 7)
    factor  = disc_factor once step >= disc_start, else 0
    loss    = nll + lambda * factor * g_loss + codebook_weight * codebook_loss

Discriminator step (hinge):  factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_r))).

Before ``disc_start`` the reference still runs the discriminator to log g_loss and lambda; they
are multiplied by 0 there, so this code skips them and logs 0 (the gradients are the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from autoencoder.discriminator import NLayerDiscriminator


@dataclass(frozen=True)
class LossConfig:
    """Defaults: LDM's vq-f4 training config (disc_start 0, disc_weight 0.75, codebook_weight 1)
    and taming's (perceptual_weight 1, disc_factor 1, 3 layers, ndf 64, hinge)."""

    disc_start: int = 0
    disc_weight: float = 0.75
    disc_factor: float = 1.0
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_num_layers: int = 3
    disc_ndf: int = 64
    disc_in_channels: int = 3
    disc_loss: str = "hinge"

    def __post_init__(self):
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"LossConfig: disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")


def hinge_d_loss(logits_real: jt.Var, logits_fake: jt.Var) -> jt.Var:
    return 0.5 * (nn.relu(1.0 - logits_real).mean() + nn.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: jt.Var, logits_fake: jt.Var) -> jt.Var:
    return 0.5 * (nn.softplus(-logits_real).mean() + nn.softplus(logits_fake).mean())


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before."""
    return value if step < threshold else weight


def adaptive_weight(nll_loss: jt.Var, g_loss: jt.Var, last_layer: jt.Var, disc_weight: float) -> jt.Var:
    """disc_weight * clamp(||d nll / d L|| / (||d g_loss / d L|| + 1e-4), 0, 1e4), detached (eq. 7)."""
    nll_grad = jt.grad(nll_loss, last_layer, retain_graph=True)
    g_grad = jt.grad(g_loss, last_layer, retain_graph=True)
    ratio = jt.sqrt((nll_grad * nll_grad).sum()) / (jt.sqrt((g_grad * g_grad).sum()) + 1e-4)
    return ratio.clamp(0.0, 1e4).detach() * disc_weight


class VQLPIPSWithDiscriminator(nn.Module):
    """Holds the discriminator (``discriminator.main.N``, as in taming's ``loss.`` subtree) and the
    optional, frozen LPIPS network (``perceptual_loss``; None to train without it)."""

    def __init__(self, config: LossConfig, perceptual_loss=None):
        self.config = config
        self.discriminator = NLayerDiscriminator(config.disc_in_channels, config.disc_ndf, config.disc_num_layers)
        self.perceptual_loss = perceptual_loss
        self._d_loss = hinge_d_loss if config.disc_loss == "hinge" else vanilla_d_loss

    def disc_factor(self, step: int) -> float:
        return adopt_weight(self.config.disc_factor, step, threshold=self.config.disc_start)

    def generator_loss(self, codebook_loss: jt.Var, inputs: jt.Var, reconstructions: jt.Var, step: int,
                       last_layer: jt.Var) -> tuple[jt.Var, dict[str, jt.Var | float]]:
        """(loss, terms to log) of the autoencoder step; see the module docstring."""
        c = self.config
        l1 = (inputs - reconstructions).abs().mean()
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions).mean()
            nll = l1 + c.perceptual_weight * p_loss
        else:
            p_loss, nll = 0.0, l1
        factor = self.disc_factor(step)
        loss = nll + c.codebook_weight * codebook_loss
        g_loss = d_weight = 0.0
        if factor > 0:
            g_loss = -self.discriminator(reconstructions).mean()
            d_weight = adaptive_weight(nll, g_loss, last_layer, c.disc_weight)
            loss = loss + d_weight * factor * g_loss
        terms = {"total_loss": loss, "l1_loss": l1, "p_loss": p_loss, "rec_loss": nll,
                 "quant_loss": codebook_loss, "g_loss": g_loss, "d_weight": d_weight, "disc_factor": factor}
        return loss, terms

    def discriminator_loss(self, inputs: jt.Var, reconstructions: jt.Var,
                           step: int) -> tuple[jt.Var, dict[str, jt.Var | float]]:
        """(loss, terms to log) of the discriminator step; both images are detached here."""
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = self.disc_factor(step) * self._d_loss(logits_real, logits_fake)
        return loss, {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}

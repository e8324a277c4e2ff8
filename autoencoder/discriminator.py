"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as taming-transformers uses it:
taming/modules/discriminator/model.py), with taming's initialisation and BatchNorm.

    main = [Conv(in, ndf, 4, s2, p1), LeakyReLU(0.2),
            (Conv(., ndf * min(2^n, 8), 4, s2, p1, no bias), BatchNorm, LeakyReLU(0.2))  n = 1..n_layers-1,
            Conv(., ndf * min(2^n_layers, 8), 4, s1, p1, no bias), BatchNorm, LeakyReLU(0.2),
            Conv(., 1, 4, s1, p1)]

It maps an image [B, 3, H, W] to a map of real/fake logits [B, 1, h, w] (one per overlapping patch).
"""

from __future__ import annotations

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from models.layers import Conv2d


class BatchNorm2d(nn.Module):
    """PyTorch's BatchNorm2d: in training, y = (x - mean_B) / sqrt(var_B + eps) * weight + bias with
    the biased batch variance (computed two-pass, mean first), and running averages updated with
    the unbiased variance; in evaluation the running averages are used. Jittor's own BatchNorm
    uses E[x^2] - E[x]^2 and the biased variance for its running average."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = jt.ones((num_features,))
        self.bias = jt.zeros((num_features,))
        self.running_mean = jt.zeros((num_features,)).stop_grad()
        self.running_var = jt.ones((num_features,)).stop_grad()

    def execute(self, x: jt.Var) -> jt.Var:
        c = self.num_features
        if getattr(self, "is_train", True):
            mean = x.mean(dims=(0, 2, 3), keepdims=True)
            centred = x - mean
            var = (centred * centred).mean(dims=(0, 2, 3), keepdims=True)
            count = x.shape[0] * x.shape[2] * x.shape[3]
            unbiased = var.reshape(c) * (count / max(count - 1, 1))
            m = self.momentum
            self.running_mean.update((1 - m) * self.running_mean + m * mean.reshape(c).detach())
            self.running_var.update((1 - m) * self.running_var + m * unbiased.detach())
            normalised = centred / jt.sqrt(var + self.eps)
        else:
            normalised = (x - self.running_mean.reshape(1, c, 1, 1)) / jt.sqrt(
                self.running_var.reshape(1, c, 1, 1) + self.eps)
        return normalised * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)


class NLayerDiscriminator(nn.Module):
    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        layers = [Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            previous, mult = mult, min(2 ** n, 8)
            layers += [Conv2d(ndf * previous, ndf * mult, 4, stride=2, padding=1, bias=False),
                       BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        previous, mult = mult, min(2 ** n_layers, 8)
        layers += [Conv2d(ndf * previous, ndf * mult, 4, stride=1, padding=1, bias=False),
                   BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2),
                   Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.n_layers = n_layers
        weights_init(self)

    def execute(self, x: jt.Var) -> jt.Var:
        smallest = 3 * 2 ** self.n_layers  # n stride-2 convolutions, then two that each remove a pixel
        if min(x.shape[2], x.shape[3]) < smallest:
            raise ValueError(f"NLayerDiscriminator: images of {x.shape[2]}x{x.shape[3]} (HxW) are too small for "
                             f"{self.n_layers} layers; both sides must be at least {smallest}")
        return self.main(x)


def weights_init(discriminator: NLayerDiscriminator) -> None:
    """taming's weights_init: convolution weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0.
    Convolution biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as Jittor's."""
    for layer in discriminator.main:
        if isinstance(layer, nn.Conv2d):
            layer.weight.update(jt.init.gauss(layer.weight.shape, "float32", 0.0, 0.02))
        elif isinstance(layer, BatchNorm2d):
            layer.weight.update(jt.init.gauss(layer.weight.shape, "float32", 1.0, 0.02))
            layer.bias.update(jt.zeros(layer.bias.shape))

"""Vector quantisation with taming's VectorQuantizer2 semantics (van den Oord et al. 2017, VQ-VAE;
taming-transformers/taming/modules/vqvae/quantize.py).

Each latent vector z (one per position, ``embed_dim`` channels) is replaced by its nearest codebook
entry e_k, k = argmin_j ||z - e_j||^2 (computed as ||z||^2 + ||e_j||^2 - 2 z.e_j, as the reference
does). The codebook loss is

    legacy=True  (the reference's default):  mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    legacy=False (the paper's weighting):     beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)

(sg = stop-gradient). Both have the value (1 + beta) * mean((z_q - z)^2); they differ in which
side the beta scales: with ``legacy`` the encoder is pulled with weight 1 and the codebook with
beta, which the reference kept by mistake "for backwards compatibility". The output is passed
straight through: z + sg[z_q - z], whose gradient with respect to z is the identity.
"""

from __future__ import annotations

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn


class VectorQuantizer(nn.Module):
    """Codebook ``embedding.weight`` [n_embed, embed_dim], initialised U(-1/n_embed, 1/n_embed)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight = jt.init.uniform((n_embed, embed_dim), "float32", -1.0 / n_embed, 1.0 / n_embed)

    def nearest_codes(self, z: jt.Var) -> jt.Var:
        """Code index [B, H, W] (int32) of the nearest entry to each vector of z [B, embed_dim, H, W]."""
        b, c, h, w = z.shape
        flat = z.detach().transpose(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight.detach()
        distances = ((flat * flat).sum(1, keepdims=True) + (codebook * codebook).sum(1).reshape(1, -1)
                     - 2.0 * jt.matmul(flat, codebook.transpose(1, 0)))
        indices, _ = jt.argmin(distances, dim=1)
        return indices.reshape(b, h, w)

    def embed_code(self, indices: jt.Var) -> jt.Var:
        """Codebook entries of indices [B, H, W] as a latent [B, embed_dim, H, W]."""
        b, h, w = indices.shape
        return self.embedding.weight[indices.reshape(-1)].reshape(b, h, w, self.embed_dim).transpose(0, 3, 1, 2)

    def execute(self, z: jt.Var) -> tuple[jt.Var, jt.Var, jt.Var]:
        """z [B, embed_dim, H, W] -> (z_q straight-through [B, embed_dim, H, W], indices [B, H, W],
        codebook loss (scalar))."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer: expected a latent [B, {self.embed_dim}, H, W], got {tuple(z.shape)}")
        indices = self.nearest_codes(z)
        z_q = self.embed_code(indices)
        commitment = ((z_q.detach() - z) ** 2).mean()
        codebook = ((z_q - z.detach()) ** 2).mean()
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = self.beta * commitment + codebook
        return z + (z_q - z).detach(), indices, loss

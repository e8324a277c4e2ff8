"""Latent diffusion: noise schedule, losses, guidance, samplers, EMA, checkpoints, training loop
and inference stages. Receives networks as arguments; imports no network class."""

"""Exponential moving average of the network weights (guided-diffusion's ``update_ema``).

    ema <- decay * ema + (1 - decay) * param            after every optimizer step

After n updates from ema_0 with parameters p_1..p_n:
ema_n = decay^n ema_0 + (1 - decay) sum_k decay^(n-k) p_k. The averages are Jittor Vars on the
training device (GPU memory on CUDA), updated lazily with the optimizer step, so nothing is
copied to the CPU except when a checkpoint is written.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt


class EMA:
    """Moving averages of the named trainable parameters of a module."""

    def __init__(self, named_params: list[tuple[str, jt.Var]], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, _ in named_params]
        self._params = [p for _, p in named_params]
        # A copy, not a view: clone() + stop_grad keeps the averages out of every gradient graph.
        self.averages = [p.clone().stop_grad() for p in self._params]
        jt.sync(self.averages)

    def update(self) -> None:
        """One EMA step (lazy: it runs with the next sync, e.g. the training step's)."""
        d = self.decay
        for average, p in zip(self.averages, self._params):
            average.update(d * average + (1.0 - d) * p.detach())

    def vars(self) -> list[jt.Var]:
        return list(self.averages)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> numpy copy of each average (the only place they leave the device)."""
        return {name: average.numpy().copy() for name, average in zip(self.names, self.averages)}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], source: str = "EMA") -> None:
        missing = [n for n in self.names if n not in arrays]
        unexpected = sorted(set(arrays) - set(self.names))
        if missing or unexpected:
            raise ValueError(f"{source}: EMA names do not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, average in zip(self.names, self.averages):
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(average.shape):
                raise ValueError(f"{source}: EMA {name} has shape {value.shape}, the model {tuple(average.shape)}")
            average.update(jt.array(value.astype(np.float32)).stop_grad())
        jt.sync(self.averages)

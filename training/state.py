"""The state of a training beside its weights: which arrays are trained and which are running
statistics, optimizer state in and out of checkpoints, and image conversion for sample grids.

Jittor's ``Adam``/``AdamW`` and ``training.optim.FusedAdam`` (which the training loops use) keep
their moments in ``param_groups[0]["m"]`` and ``["values"]`` and the bias-correction count in
``n_step``; this module is the one place that reads and writes them,
as named arrays ``m/NAME`` and ``v/NAME`` (Jittor Vars, fetched one at a time when saved).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from weights.checkpoint import WeightsError


def trainable(module) -> list[tuple[str, Any]]:
    """The (name, Var) pairs of a module that training updates (Jittor lists stop-grad Vars too)."""
    return [(name, var) for name, var in module.named_parameters() if not var.is_stop_grad()]


def buffers(module) -> list[Any]:
    """The Vars of a module that its forward pass updates but no optimizer does (BatchNorm's
    running mean and variance)."""
    return [var for _, var in module.named_parameters() if var.is_stop_grad()]


def restore_buffers(saved: Sequence[tuple[Any, np.ndarray]]) -> None:
    """Put back (Var, value) pairs taken before a step whose update was not taken."""
    import jittor as jt

    for var, value in saved:
        var.update(jt.array(value))
    if saved:
        jt.sync([var for var, _ in saved])


def adam_state(optimizer, names: Sequence[str]) -> dict[str, Any]:
    """The moments of a Jittor Adam/AdamW over parameters ``names`` (in the optimizer's order)."""
    group = optimizer.param_groups[0]
    out = {f"m/{n}": m for n, m in zip(names, group["m"])}
    out.update({f"v/{n}": v for n, v in zip(names, group["values"])})
    return out


def load_adam_state(optimizer, names: Sequence[str], arrays: Mapping[str, np.ndarray], n_step: int,
                    source: str) -> None:
    """Restore ``adam_state`` arrays and the update count ``n_step``; every array checked."""
    import jittor as jt

    group = optimizer.param_groups[0]
    for kind, states in (("m", group["m"]), ("v", group["values"])):
        for name, state in zip(names, states):
            key = f"{kind}/{name}"
            if key not in arrays or tuple(arrays[key].shape) != tuple(state.shape):
                raise WeightsError(f"{source}: optimizer state {key} is missing or has the wrong shape")
            state.update(jt.array(np.asarray(arrays[key], dtype=np.float32)).stop_grad())
    optimizer.n_step = int(n_step)
    jt.sync(list(group["m"]) + list(group["values"]))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded)."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def save_grid(path, rows: Sequence[np.ndarray]) -> None:
    """A sample-grid PNG: each row uint8 [B, H, W, 3] (its images side by side), rows stacked."""
    from datasets.io import save_image

    save_image(path, np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0))

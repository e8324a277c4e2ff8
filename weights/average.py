"""Weighted parameter average of N checkpoints ("model ensemble", as IIDM's submission did).

    avg[name] = sum_i c_i * w_i[name]  with  c_i = coefficient_i / sum_j coefficient_j

computed in float64 (as w_0 + sum_i c_i (w_i - w_0), so identical inputs come back unchanged)
and cast back to the arrays' dtype: the widest of the inputs' when they are stored at different
float precisions (a float16 release averaged with a float32 snapshot gives float32). Equal
coefficients by default. Every input must be this project's checkpoint of the same network: same
kind, same config, same names and shapes, floats where the others have floats (any difference
is an error naming the key and the files).
Integer arrays (counters, indices) are not averaged: they must be equal in every input and are
copied. A training checkpoint contributes its EMA weights (``--weights ema``, default) or its
raw weights (``--weights model``). The output is a weights checkpoint of the network's kind,
whose ``extra`` records the sources and their coefficients.

    python -m tools.average_checkpoints A.safetensors B.safetensors --out AVG.safetensors
    python -m tools.average_checkpoints A B C --coefficients 1 1 2 --weights model --out AVG
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


from weights.checkpoint import WEIGHT_SETS, WeightsError, load_checkpoint


def normalized_coefficients(count: int, coefficients: Sequence[float] | None = None) -> list[float]:
    """``count`` non-negative coefficients scaled to sum to 1 (equal ones when not given)."""
    if count < 1:
        raise ValueError("averaging needs at least one checkpoint")
    if coefficients is None:
        return [1.0 / count] * count
    values = [float(c) for c in coefficients]
    if len(values) != count:
        raise ValueError(f"{count} checkpoint(s) but {len(values)} coefficient(s); give one per checkpoint")
    if any(not np.isfinite(c) or c < 0 for c in values) or sum(values) <= 0:
        raise ValueError(f"coefficients must be finite, non-negative and not all zero, got {values}")
    total = sum(values)
    return [c / total for c in values]


def average_arrays(states: Sequence[Mapping[str, np.ndarray]], coefficients: Sequence[float] | None = None,
                   sources: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The weighted average of name -> array mappings with identical names, shapes and dtypes (or
    float dtypes of different widths: the result takes the widest)."""
    sources = list(sources) if sources is not None else [f"input {i}" for i in range(len(states))]
    factors = normalized_coefficients(len(states), coefficients)
    first, first_source = states[0], sources[0]
    for state, source in zip(states[1:], sources[1:]):
        missing = sorted(set(first) - set(state))
        extra = sorted(set(state) - set(first))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
            if extra:
                parts.append(f"has extra {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
            raise WeightsError(f"{source} does not have the same weights as {first_source}: "
                               + "; ".join(parts))
        for name in first:
            a, b = np.asarray(first[name]), np.asarray(state[name])
            if a.shape != b.shape:
                raise WeightsError(f"{name}: shape {a.shape} in {first_source} but {b.shape} in {source}")
            if a.dtype != b.dtype and not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)):
                raise WeightsError(f"{name}: dtype {a.dtype} in {first_source} but {b.dtype} in {source}")
    averaged = {}
    for name in first:
        values = [np.asarray(state[name]) for state in states]
        dtype = np.result_type(*values)
        if np.issubdtype(dtype, np.floating):
            # w_0 + sum c_i (w_i - w_0) equals sum c_i w_i (the c_i sum to 1) and returns
            # identical inputs bit for bit, float64 ones included.
            base = values[0].astype(np.float64)
            total = base + sum(f * (v.astype(np.float64) - base) for f, v in zip(factors[1:], values[1:]))
            averaged[name] = np.asarray(total).astype(dtype)
        else:
            for value, source in zip(values[1:], sources[1:]):
                if not np.array_equal(values[0], value):
                    raise WeightsError(f"{name}: {dtype} array differs between {first_source} and "
                                       f"{source}; integer arrays are not averaged and must be equal")
            averaged[name] = values[0].copy()
    return averaged


def average_checkpoints(paths: Sequence[str | os.PathLike], coefficients: Sequence[float] | None = None,
                        which: str = "ema") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and average checkpoints of one network: (arrays, info) with info's kind (the
    network's, e.g. "unet" for "unet-train" inputs), config and extra (the sources and their
    normalized coefficients under "averaged_from"). One path returns its weights unchanged."""
    if which not in WEIGHT_SETS:
        raise ValueError(f"which must be one of {WEIGHT_SETS}, got {which!r}")
    paths = [Path(p) for p in paths]
    factors = normalized_coefficients(len(paths), coefficients)
    states, kinds, configs, records = [], [], [], []
    for path in paths:
        checkpoint = load_checkpoint(path)
        states.append(checkpoint.weights(which))
        kinds.append(checkpoint.kind)
        # What defines the network and how it samples; a run's own options (steps, paths) may differ.
        configs.append({key: checkpoint.config[key] for key in ("network", "diffusion") if key in checkpoint.config})
        records.append({"path": str(path), "kind": checkpoint.file_kind,
                        "weights": which if checkpoint.training else "weights",
                        **({"step": checkpoint.step} if checkpoint.step is not None else {})})
    for path, kind, config in zip(paths[1:], kinds[1:], configs[1:]):
        if kind != kinds[0]:
            raise WeightsError(f"{path} holds a {kind!r} network but {paths[0]} a {kinds[0]!r} one")
        if config != configs[0]:
            differ = sorted(f"{section}.{k}" for section in set(config) | set(configs[0])
                            for k in set(config.get(section, {})) | set(configs[0].get(section, {}))
                            if config.get(section, {}).get(k) != configs[0].get(section, {}).get(k))
            raise WeightsError(f"{path} and {paths[0]} have different configs (they differ in "
                               f"{', '.join(differ) or 'their sections'}); only checkpoints of one network "
                               "can be averaged")
    averaged = average_arrays(states, factors, [str(p) for p in paths])
    for record, factor in zip(records, factors):
        record["coefficient"] = factor
    extra = {"averaged_from": records} if len(paths) > 1 else {"source": records[0]}
    return averaged, {"kind": kinds[0], "config": configs[0], "extra": extra}

"""Weighted parameter average of N checkpoints ("model ensemble", as IIDM's submission did).

    avg[name] = sum_i c_i * w_i[name]  with  c_i = coefficient_i / sum_j coefficient_j

computed in float64 (as w_0 + sum_i c_i (w_i - w_0), so identical inputs come back unchanged)
and cast back to each array's own dtype. Equal coefficients by default.
Every input must be this project's checkpoint of the same network: same kind, same config,
same names, shapes and dtypes (any difference is an error naming the key and the files).
Integer arrays (counters, indices) are not averaged: they must be equal in every input and are
copied. A training checkpoint contributes its EMA weights (``--weights ema``, default) or its
raw weights (``--weights model``). The output is a weights checkpoint of the network's kind,
whose ``extra`` records the sources and their coefficients.

    python tools/average_checkpoints.py A.safetensors B.safetensors --out AVG.safetensors
    python tools/average_checkpoints.py A B C --coefficients 1 1 2 --weights model --out AVG
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import WEIGHT_SETS, WeightsError, read_checkpoint, save_checkpoint, weights_of  # noqa: E402


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
    """The weighted average of name -> array mappings with identical names, shapes and dtypes."""
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
            if a.dtype != b.dtype:
                raise WeightsError(f"{name}: dtype {a.dtype} in {first_source} but {b.dtype} in {source}")
    averaged = {}
    for name in first:
        values = [np.asarray(state[name]) for state in states]
        dtype = values[0].dtype
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
        arrays, info = read_checkpoint(path)
        weights, kind = weights_of(arrays, info, which)
        trained = str(info["kind"]).endswith("-train")
        states.append(weights)
        kinds.append(kind)
        configs.append(info["config"])
        records.append({"path": str(path), "kind": info["kind"], "weights": which if trained else "weights",
                        **({"step": info["extra"]["step"]} if "step" in info["extra"] else {})})
    for path, kind, config in zip(paths[1:], kinds[1:], configs[1:]):
        if kind != kinds[0]:
            raise WeightsError(f"{path} holds a {kind!r} network but {paths[0]} a {kinds[0]!r} one")
        if config != configs[0]:
            differ = sorted(k for k in set(config) | set(configs[0]) if config.get(k) != configs[0].get(k))
            raise WeightsError(f"{path} and {paths[0]} have different configs (they differ in "
                               f"{', '.join(differ)}); only checkpoints of one network can be averaged")
    averaged = average_arrays(states, factors, [str(p) for p in paths])
    for record, factor in zip(records, factors):
        record["coefficient"] = factor
    extra = {"averaged_from": records} if len(paths) > 1 else {"source": records[0]}
    return averaged, {"kind": kinds[0], "config": configs[0], "extra": extra}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints to average (2 or more)")
    parser.add_argument("--out", type=Path, required=True, help="the averaged weights checkpoint to write")
    parser.add_argument("--coefficients", nargs="+", type=float,
                        help="one per checkpoint, normalized to sum to 1 (default: equal)")
    parser.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                        help="which weights of a training checkpoint to average (default ema)")
    args = parser.parse_args(argv)
    if len(args.checkpoints) < 2:
        parser.error("give at least two checkpoints to average")
    try:
        arrays, info = average_checkpoints(args.checkpoints, args.coefficients, args.weights)
    except (WeightsError, ValueError) as exc:
        print(f"average_checkpoints: {exc}", file=sys.stderr)
        return 1
    save_checkpoint(args.out, arrays, kind=info["kind"], config=info["config"], extra=info["extra"])
    shown = ", ".join(f"{Path(r['path']).name} x {r['coefficient']:.4g}" for r in info["extra"]["averaged_from"])
    print(f"wrote {args.out}: {len(arrays)} {info['kind']} weights averaged from {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

    python -m tools.average_checkpoints A.safetensors B.safetensors --out AVG.safetensors
    python -m tools.average_checkpoints A B C --coefficients 1 1 2 --weights model --out AVG
"""

from __future__ import annotations

import sys
from pathlib import Path

import cli
from weights.average import average_checkpoints
from weights.checkpoint import WEIGHT_SETS, WeightsError, save_checkpoint


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints to average (2 or more)")
    parser.add_argument("--output_path", type=Path, required=True, help="the averaged weights checkpoint to write")
    parser.alias("--out", "--output_path")
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
    save_checkpoint(args.output_path, arrays, kind=info["kind"], config=info["config"], extra=info["extra"])
    shown = ", ".join(f"{Path(r['path']).name} x {r['coefficient']:.4g}" for r in info["extra"]["averaged_from"])
    print(f"wrote {args.output_path}: {len(arrays)} {info['kind']} weights averaged from {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

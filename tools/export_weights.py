"""Export the weights of a training run as a weights checkpoint (what infer.py, the scorer and the
converter read), with the network's config and, for U-Nets, the schedule and latent scale.

    python -m tools.export_weights RUN_DIR/checkpoints/last.safetensors unet.safetensors [--weights ema|model]
        [--dtype float16]

infer.py also reads training checkpoints directly (``--ckpt RUN/checkpoints/last.safetensors
--weights ema``); an export is smaller (no optimizer state) and can be stored in float16.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cli
from weights.checkpoint import WEIGHT_SETS, WeightsError


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (RUN_DIR/checkpoints/*.safetensors)")
    parser.add_argument("output_path", type=Path, help="the weights checkpoint to write")
    parser.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                        help="the moving average (default) or the raw weights")
    parser.add_argument("--dtype", choices=("float32", "float16"), help="store float weights in this type "
                                                                         "(loading casts them back)")
    args = parser.parse_args(argv)
    from training.loop import export_weights

    try:
        export_weights(args.checkpoint, args.output_path, args.weights, args.dtype)
    except (WeightsError, OSError) as exc:
        print(f"export_weights: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_path} ({args.weights} weights of {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

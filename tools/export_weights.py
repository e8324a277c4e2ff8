"""Export the weights of a training run as a weights checkpoint (what infer.py, the scorer and the
converter read), with the network's config and, for U-Nets, the schedule and latent scale.

    python -m tools.export_weights RUN_DIR/checkpoints/last.safetensors unet.safetensors [--weights ema|model]
        [--dtype float16] [--schedule linear:1000] [--latent_scale S]

infer.py also reads training checkpoints directly (``--ckpt RUN/checkpoints/last.safetensors
--weights ema``); an export is smaller (no optimizer state) and can be stored in float16.

A U-Net run written by an earlier version of this project may lack its latent scale (or schedule);
``--latent_scale`` and ``--schedule`` supply what the run does not record, and are refused where
the run records another value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cli
from weights.checkpoint import WEIGHT_SETS, WeightsError
from weights.convert import parse_schedule


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (RUN_DIR/checkpoints/*.safetensors)")
    parser.add_argument("output_path", type=Path, help="the weights checkpoint to write")
    parser.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                        help="the moving average (default) or the raw weights")
    parser.add_argument("--dtype", choices=("float32", "float16"), help="store float weights in this type "
                                                                         "(loading casts them back)")
    parser.add_argument("--schedule", help="U-Net run that does not record its noise schedule: the one it was "
                                           "trained with, KIND:T[:BETA_START:BETA_END] (e.g. linear:1000)")
    parser.add_argument("--latent_scale", type=float,
                        help="U-Net run that does not record its latent scale: the factor its latents were "
                             "multiplied by in training (train.py ldm --latent_scale; 1 for runs from before "
                             "checkpoints recorded it)")
    args = parser.parse_args(argv)
    from training.loop import export_weights

    try:
        schedule = parse_schedule(args.schedule) if args.schedule is not None else None
        export_weights(args.checkpoint, args.output_path, args.weights, args.dtype, schedule=schedule,
                       latent_scale=args.latent_scale)
    except (WeightsError, OSError) as exc:
        print(f"export_weights: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_path} ({args.weights} weights of {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

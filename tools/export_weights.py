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
from typing import Any

import cli
from weights.checkpoint import WEIGHT_SETS, WeightsError, load_checkpoint, save_checkpoint


def with_diffusion(diffusion: dict[str, Any] | None, schedule: dict[str, Any] | None,
                   latent_scale: float | None, source: str) -> dict[str, Any]:
    """A run's recorded diffusion settings with the missing ones taken from the options; an option
    that contradicts what the run records is an error, never an override."""
    filled = dict(diffusion or {"space": "latent"})   # only version-1 runs (latent U-Nets) lack the section
    for field, given in (("schedule", schedule), ("latent_scale", latent_scale)):
        if given is None:
            continue
        if field in filled and filled[field] != given:
            raise WeightsError(f"{source}: the run records {field} {filled[field]!r}; --{field} {given!r} "
                               "would contradict it (leave the option out)")
        filled[field] = given
    return filled


def export(checkpoint: Path, out: Path, which: str, dtype: str | None, schedule: dict[str, Any] | None,
           latent_scale: float | None) -> None:
    """training.loop.export_weights, with the diffusion settings an older run lacks supplied."""
    source = load_checkpoint(checkpoint)
    if not source.training:
        raise WeightsError(f"{checkpoint}: already a weights checkpoint (kind {source.kind!r})")
    if source.kind != "unet":
        raise WeightsError(f"{checkpoint}: --schedule and --latent_scale are for U-Net runs, this is a "
                           f"{source.kind!r} run")
    weights = source.weights(which)
    if dtype is not None:
        weights = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    config = {key: source.config[key] for key in ("network", "dataset", "size") if key in source.config}
    config["diffusion"] = with_diffusion(source.config.get("diffusion"), schedule, latent_scale, str(checkpoint))
    extra = {"source": str(checkpoint), "weights": which, "step": source.step}
    save_checkpoint(out, weights, kind=source.kind, config=config, extra=extra)


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
        if args.schedule is None and args.latent_scale is None:
            export_weights(args.checkpoint, args.output_path, args.weights, args.dtype)
        else:
            from weights.convert import parse_schedule

            schedule = parse_schedule(args.schedule) if args.schedule is not None else None
            export(args.checkpoint, args.output_path, args.weights, args.dtype, schedule, args.latent_scale)
    except (WeightsError, OSError) as exc:
        print(f"export_weights: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_path} ({args.weights} weights of {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

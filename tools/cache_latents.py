"""Encode a training root into the latent store the LDM trains from (once, before training).

    python -m tools.cache_latents --data TRAIN_ROOT --vq VQ.safetensors --output_path STORE [--height 384 --width 512]

Every photo of TRAIN_ROOT/imgs and its left-right flip go through the autoencoder's encoder (the
pre-quantisation latent, as LDM and IIDM train on); the label map and its flip are resized
(nearest) to the latent size. The layout is described in ``ldm/latents.py``.

Idempotent: run again on a complete store made with the same settings, it does nothing. It
refuses to add to a store made with other settings (other images, another autoencoder file,
another size): choose another --output_path. Interrupted, it resumes from the last finished chunk: the
arrays are flushed before the item count is advanced (atomically), so the count never claims
unwritten data.
"""

from __future__ import annotations

import logging
import os
import sys

import cli
import jittor_env
from datasets import DataError
from datasets.landscape import CHALLENGE_HEIGHT, CHALLENGE_WIDTH
from ldm.latent_cache import cache_latents
from ldm.latents import StoreError
from weights.checkpoint import WeightsError


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="training root holding imgs/ and labels/")
    parser.add_argument("--vq", required=True, help="the autoencoder checkpoint (kind 'vqmodel')")
    parser.add_argument("--output_path", required=True, help="store folder (created; resumed if unfinished)")
    parser.alias("--out", "--output_path")
    parser.add_argument("--height", type=int, default=CHALLENGE_HEIGHT, help="photo height before encoding")
    parser.add_argument("--width", type=int, default=CHALLENGE_WIDTH, help="photo width before encoding")
    parser.add_argument("--batch_size", type=int, default=8, help="photos per encoder call (x2 with the flips)")
    jittor_env.add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("height", "width", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("data", "vq"):
        if not os.path.exists(getattr(args, name)):
            parser.error(f"--{name} {getattr(args, name)}: not found")
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    try:
        result = cache_latents(args.data, args.vq, args.output_path, args.height, args.width, args.batch_size)
    except (StoreError, WeightsError, DataError, OSError, ValueError) as exc:
        print(f"cache_latents: {exc}", file=sys.stderr)
        return 1
    print(f"cache_latents: {result['store']} holds {result['count']} items "
          f"({result['encoded']} encoded in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

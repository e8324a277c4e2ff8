"""Train the autoencoder or the latent diffusion model on your own images and label maps.

    python train.py autoencoder --data TRAIN_ROOT ...
    python train.py ldm --latents STORE --preset iidm|demo ...
"""

from __future__ import annotations

import argparse
import logging
import sys

import jittor_env

STAGES = ("autoencoder", "ldm")
NOT_YET = 2  # exit status: the requested training stage does not exist yet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES, help="what to train")
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    print(f"train.py: training the {args.stage} is not available yet in this release; "
          "nothing was trained.", file=sys.stderr)
    return NOT_YET


if __name__ == "__main__":
    sys.exit(main())

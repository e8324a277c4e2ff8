"""Convert weights from PyTorch / Lightning / Jittor files into this project's checkpoint
(safetensors + config), checking every name and shape against the network built from the config.

    python -m tools.convert_weights model.ckpt vq-f4.safetensors --config vq-f4/config.yaml
    python -m tools.convert_weights ema_0.9999_best.pt sdm.safetensors --config configs/sdm/ade20k.flags
    python -m tools.convert_weights average-176k-266k.pkl unet.safetensors --config configs/iidm.flags --preset iidm

Reads SDM's ``.pt`` state dicts (model or EMA), IIDM's Jittor ``.pkl``, LDM / taming Lightning
checkpoints (``state_dict``; the training-only ``loss.*`` weights are left out and reported),
plain torch state dicts and this project's own checkpoints; nothing in the input is executed
(weights/foreign.py). Weights under a prefix (``first_stage_model.`` in a whole LDM checkpoint)
are found by themselves, or name it with ``--prefix``. The kind of network is told by the names
(``input_blocks.0.0.weight``: a U-Net; ``encoder.conv_in.weight``: an autoencoder) unless
``--kind`` says it.

The architecture comes from ``--config`` (the upstream configuration the weights were trained
with: LDM / taming YAML, SDM's or IIDM's model arguments as JSON or as the ``--flag value`` list of
their scripts, or this project's JSON layout; weights/upstream.py), from ``--preset``, or from the
input itself when it is one of this project's checkpoints. Some of it no weight shape reveals.
Upstream code fixes the norm groups (and SDM's and IIDM's SPADE width), so a preset of this project
that departs from them (``tiny``, ``demo``, ``small``) cannot describe a foreign file. The split of
a U-Net's attention channels into heads is an argument of SDM's and IIDM's code that their files
(weights only) do not record, so a foreign U-Net needs ``--config``: a preset alone, or nothing, is
refused. ``--preset`` with ``--config`` (or with the input's own config) must agree on every field.
Missing, unexpected and mis-shaped weights are listed in plain words and nothing is written.

Arrays are read, cast and written one at a time, so converting holds about one array besides the
output being written. Exit status: 0 written, 1 refused (the reason on stderr).
"""

from __future__ import annotations

import logging
import sys

import cli
import jittor_env
from weights.checkpoint import WeightsError
from weights.convert import KINDS, Refusal, convert
from weights.upstream import UpstreamConfigError


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("input", help="weights to read (.ckpt, .pt, .pth, .pkl, .safetensors)")
    parser.add_argument("output", help="checkpoint to write (.safetensors)")
    parser.add_argument("--kind", choices=sorted(KINDS),
                        help="network the weights are for (default: told by the weight names)")
    parser.add_argument("--config", help="the architecture the weights were trained with: an LDM / taming YAML, "
                                         "SDM's or IIDM's model arguments (JSON or --flag list), or this project's "
                                         "JSON config")
    parser.add_argument("--preset", help="architecture preset (default: the input's own config when it is one of "
                                         "this project's checkpoints, else --config, else vq-f4 for an autoencoder; "
                                         "a foreign U-Net needs --config, since its head layout is not in its file)")
    parser.add_argument("--prefix", help="name prefix of the weights inside the file (default: found by itself)")
    parser.add_argument("--ignore", action="append", default=[], metavar="PREFIX",
                        help="leave out weights whose names start with PREFIX (repeatable)")
    parser.add_argument("--dtype", choices=("float32", "float16"),
                        help="store the floating-point weights in this type (default: the network's, float32); "
                             "loading casts them back to the network's type")
    parser.add_argument("--strict", action="store_true",
                        help="refuse the file if its pickle names any class outside the whitelist, even in "
                             "sections that hold no weights (Lightning callbacks)")
    parser.add_argument("--schedule", help="U-Net: the noise schedule it was trained with, KIND:T[:BETA_START:BETA_END] "
                                           "(e.g. linear:1000; default: the input's own or --config's)")
    parser.add_argument("--space", choices=("latent", "pixel"),
                        help="U-Net: what it denoises, autoencoder latents (IIDM) or pixels (SDM) (default: the "
                             "input's own or --config's)")
    parser.add_argument("--latent_scale", type=float,
                        help="U-Net: the factor its latents were multiplied by in training (LDM's scale_factor; "
                             "IIDM: 1; default: the input's own or --config's)")
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    try:
        return convert(args)
    except (Refusal, WeightsError, UpstreamConfigError) as exc:
        print(f"convert_weights: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

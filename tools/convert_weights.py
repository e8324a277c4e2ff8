"""Convert weights from PyTorch / Lightning / Jittor files into this project's checkpoint
(safetensors + config), checking every name and shape against the network built from the config.

    python -m tools.convert_weights --kind vqmodel --preset vq-f4 model.ckpt vq-f4.safetensors
    python -m tools.convert_weights --kind unet --preset iidm ema_0.9999_100000.pt unet.safetensors

Reads SDM's ``.pt`` state dicts (model or EMA), IIDM's Jittor ``.pkl``, LDM / taming Lightning checkpoints (``state_dict``; the training-only ``loss.*`` weights are
left out and reported), plain torch state dicts, IIDM's Jittor ``.pkl`` and this project's own
checkpoints; nothing in the input is executed (weights/foreign.py). Weights under a prefix
(``first_stage_model.`` in a whole LDM checkpoint) are found by themselves, or name it with
``--prefix``. Missing, unexpected and mis-shaped weights are listed in plain words and nothing is
written. Exit status: 0 written, 1 the weights do not fit or cannot be read.

Adding a kind: one ``Kind`` entry in KINDS: how to build the config from a preset
name or a stored dict, how to build the network, and where its names sit in foreign files.
"""

from __future__ import annotations

import sys
from pathlib import Path


import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

import jittor_env
from weights.checkpoint import WeightsError, check_diffusion, save_checkpoint
from weights.foreign import Selection, find_prefix, read_weights, select_weights


@dataclass(frozen=True)
class Kind:
    """How to convert one kind of network. The builders import Jittor code lazily (after setup)."""

    presets: Callable[[], list[str]]
    default_preset: str
    config_from_preset: Callable[[str], Any]               # -> config with .to_dict()
    config_from_dict: Callable[[Mapping[str, Any]], Any]
    build_network: Callable[[Any], Any]                    # config -> Jittor module
    map_names: Callable[[Mapping[str, np.ndarray], str | None, tuple[str, ...]], Selection]
    drop: tuple[str, ...]                                  # training-only name prefixes, always left out


def prefix_mapping(anchor: str, candidates: tuple[str, ...]):
    """Name mapping for networks whose foreign names equal ours up to a prefix: ``anchor`` is a
    weight every such file has; ``candidates`` are the prefixes tried first."""
    def map_names(arrays, prefix, drop):
        if prefix is None:
            prefix = find_prefix([n for n in arrays if not n.startswith(drop)], anchor, candidates)
        return select_weights(arrays, prefix=prefix, drop=drop)
    return map_names


def _vq(name: str):
    import autoencoder.vqmodel as vqmodel
    return getattr(vqmodel, name)


def _unet(name: str):
    import models.unet as unet
    return getattr(unet, name)


KINDS: dict[str, Kind] = {
    "vqmodel": Kind(
        presets=lambda: list(_vq("PRESETS")),
        default_preset="vq-f4",
        config_from_preset=lambda preset: _vq("vq_config")(preset),
        config_from_dict=lambda values: _vq("VQConfig").from_dict(values["network"]),
        build_network=lambda config: _vq("VQModel")(config),
        map_names=prefix_mapping("encoder.conv_in.weight", ("", "first_stage_model.")),
        drop=("loss.", "train/"),
    ),
    # SDM / IIDM U-Net: SDM's .pt is a plain state dict with these names; a wrapped one
    # ("model.", "module.", LDM's "model.diffusion_model.") is found by its first convolution.
    "unet": Kind(
        presets=lambda: list(_unet("UNET_PRESETS")),
        default_preset="iidm",
        config_from_preset=lambda preset: _unet("unet_preset")(preset),
        config_from_dict=lambda values: _unet("UNetConfig").from_dict(values["network"]),
        build_network=lambda config: _unet("UNetModel")(config),
        map_names=prefix_mapping("input_blocks.0.0.weight",
                                 ("", "model.diffusion_model.", "model.", "module.")),
        drop=(),
    ),
}


def _shape(value) -> tuple[int, ...]:
    return tuple(np.shape(value))


def _listed(lines: list[str], limit: int) -> list[str]:
    return lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def report_fit(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray],
               limit: int = 20) -> list[str]:
    """Plain-words lines for the missing, unexpected and mis-shaped weights, up to ``limit`` names
    each (empty when everything fits)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(n for n in set(expected) & set(weights) if tuple(expected[n]) != _shape(weights[n]))
    lines = []
    if missing:
        lines.append(f"The file lacks {len(missing)} weight(s) the network needs:")
        lines += _listed([f"  {n} {tuple(expected[n])}" for n in missing], limit)
    if unexpected:
        lines.append(f"The file has {len(unexpected)} weight(s) the network does not have "
                     "(--ignore PREFIX leaves them out; --prefix picks the part of the file to use):")
        lines += _listed([f"  {n} {_shape(weights[n])}" for n in unexpected], limit)
    if mismatched:
        lines.append(f"{len(mismatched)} weight(s) have another shape than the network's (is --preset right?):")
        lines += _listed([f"  {n}: the network has {tuple(expected[n])}, the file {_shape(weights[n])}"
                          for n in mismatched], limit)
    return lines


def parse_schedule(text: str) -> dict[str, Any]:
    """--schedule KIND:T[:BETA_START:BETA_END], e.g. linear:1000 (beta 1e-4 .. 0.02)."""
    parts = text.split(":")
    try:
        kind, steps = parts[0], int(parts[1])
        betas = [float(v) for v in parts[2:]] or [1e-4, 0.02]
    except (IndexError, ValueError):
        raise WeightsError(f"--schedule must be KIND:T[:BETA_START:BETA_END], e.g. linear:1000, got {text!r}") from None
    if kind not in ("linear", "cosine") or steps < 1 or len(betas) != 2:
        raise WeightsError(f"--schedule must be linear or cosine with T >= 1 and two betas, got {text!r}")
    return {"kind": kind, "num_timesteps": steps, "beta_start": betas[0], "beta_end": betas[1]}


def unet_diffusion(args, stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """A U-Net's diffusion settings: the options given, else the input's own (one of this project's
    checkpoints), else the preset's published ones; never a silent default."""
    from models.unet import PRESET_DIFFUSION

    base = None
    if stored is not None and isinstance(stored.get("config", {}).get("diffusion"), Mapping):
        base = dict(stored["config"]["diffusion"])
    elif args.preset in PRESET_DIFFUSION:
        base = dict(PRESET_DIFFUSION[args.preset])
    diffusion = dict(base or {})
    if args.schedule is not None:
        diffusion["schedule"] = parse_schedule(args.schedule)
    if args.latent_scale is not None:
        diffusion["latent_scale"] = args.latent_scale
    diffusion.setdefault("space", "latent")
    missing = [flag for flag, key in (("--schedule", "schedule"), ("--latent_scale", "latent_scale"))
               if key not in diffusion]
    if missing:
        raise WeightsError(f"the U-Net's diffusion settings are unknown: give {' and '.join(missing)} "
                           "(IIDM and SDM: --schedule linear:1000; IIDM's VQ-f4 latents: --latent_scale 1)")
    return check_diffusion(diffusion, "the converted U-Net")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="weights to read (.ckpt, .pt, .pth, .pkl, .safetensors)")
    parser.add_argument("output", help="checkpoint to write (.safetensors)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="vqmodel", help="network the weights are for")
    parser.add_argument("--preset", help="architecture preset (default: the input's own config when it is "
                                         "one of this project's checkpoints, else the kind's reference preset)")
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
                                           "(e.g. linear:1000; default: the input's own or the preset's)")
    parser.add_argument("--latent_scale", type=float,
                        help="U-Net: the factor its latents were multiplied by in training (LDM's scale_factor; "
                             "IIDM: 1; default: the input's own or the preset's)")
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    kind = KINDS[args.kind]
    if args.preset is not None and args.preset not in kind.presets():
        print(f"convert_weights: unknown {args.kind} preset {args.preset!r}; choose one of "
              f"{', '.join(kind.presets())}", file=sys.stderr)
        return 1
    try:
        arrays, info = read_weights(args.input, strict=args.strict)
    except WeightsError as exc:
        print(f"convert_weights: {exc}", file=sys.stderr)
        return 1
    stored = info.checkpoint
    if stored is not None and stored.get("kind") not in (args.kind, ""):
        print(f"convert_weights: {args.input} is a {stored['kind']!r} checkpoint, not {args.kind!r}", file=sys.stderr)
        return 1
    if args.preset is not None:
        config, described = kind.config_from_preset(args.preset), f"preset {args.preset}"
    elif stored is not None and stored.get("config"):
        config, described = kind.config_from_dict(stored["config"]), "the input's own config"
    else:
        config, described = kind.config_from_preset(kind.default_preset), f"preset {kind.default_preset}"

    selection = kind.map_names(arrays, args.prefix, kind.drop + tuple(args.ignore))
    where = f"; weights under '{selection.prefix}'" if selection.prefix else ""
    print(f"{args.input}: {info.format} ({info.layout}), {len(arrays)} arrays{where}")
    for line in info.describe() + selection.describe():
        print("  " + line)
    sys.stdout.flush()
    network = kind.build_network(config)
    state = network.state_dict()
    expected = {name: tuple(var.shape) for name, var in state.items()}
    problems = report_fit(expected, selection.weights)
    if problems:
        print(f"convert_weights: the weights do not fit the {args.kind} network ({described}); "
              "nothing was written.", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 1
    out = {name: np.asarray(selection.weights[name]).astype(
               args.dtype if args.dtype and str(var.dtype).startswith("float") else str(var.dtype))
           for name, var in state.items()}
    extra = {"converted_from": Path(args.input).name, "source_format": info.format, "source_layout": info.layout}
    if args.dtype:
        extra["stored_dtype"] = args.dtype
    if info.values:
        extra["source_values"] = info.values
    checkpoint_config = {"network": config.to_dict()}
    if args.kind == "unet":
        try:
            checkpoint_config["diffusion"] = unet_diffusion(args, stored)
        except WeightsError as exc:
            print(f"convert_weights: {exc}", file=sys.stderr)
            return 1
    save_checkpoint(args.output, out, kind=args.kind, config=checkpoint_config, extra=extra)
    print(f"wrote {args.output}: {len(out)} weights checked against the {args.kind} network ({described})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Converting weights from PyTorch / Lightning / Jittor files into this project's checkpoint
(safetensors + config), checking every name and shape against the network built from the config:
the library behind ``python -m tools.convert_weights`` (its docstring and docs/converting.md say
what it accepts and refuses).

* ``resolve_kind``: which network the weights are for (``--kind``, the config, the file's own
  metadata, else the names);
* ``choose_network``: which architecture (the input's own config, ``--config`` read by
  weights/upstream.py, ``--preset``; they must agree), refusing a preset that cannot describe a
  file written by upstream code;
* ``unet_diffusion``: a U-Net's schedule, space and latent scale, never a silent default;
* ``report_fit``: the missing, unexpected and mis-shaped weights in plain words;
* ``convert``: all of it, then the output written one array at a time.

The functions take the converter's parsed options (``args``: input, config, preset, schedule,
space, latent_scale, ...). Unlike the rest of this package, the ``Kind`` entries build networks to
learn their shapes: they import autoencoder/ and models/ when called, never at import.

Adding a kind: one ``Kind`` entry in KINDS.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from weights.checkpoint import WeightsError, check_diffusion, config_from_dict, save_checkpoint
from weights.foreign import Selection, open_weights, select_weights
from weights.upstream import UPSTREAM_NAMES, UpstreamConfig, deviations, disagreements, read_config


@dataclass(frozen=True)
class Kind:
    """How to convert one kind of network. The builders import Jittor code lazily (after setup)."""

    description: str
    presets: Callable[[], list[str]]
    default_preset: str
    config_from_preset: Callable[[str], Any]               # -> config with .to_dict()
    config_class: Callable[[], type]
    build_network: Callable[[Any], Any]                    # config -> Jittor module
    anchor: str                                            # a weight every file of this kind has
    prefixes: tuple[str, ...]                              # where it sits in foreign files, tried first
    drop: tuple[str, ...]                                  # training-only name prefixes, always left out


def _vq(name: str):
    import autoencoder.vqmodel as vqmodel
    return getattr(vqmodel, name)


def _unet(name: str):
    import models.unet as unet
    return getattr(unet, name)


KINDS: dict[str, Kind] = {
    "vqmodel": Kind(
        description="autoencoder",
        presets=lambda: list(_vq("PRESETS")),
        default_preset="vq-f4",
        config_from_preset=lambda preset: _vq("vq_config")(preset),
        config_class=lambda: _vq("VQConfig"),
        build_network=lambda config: _vq("VQModel")(config),
        anchor="encoder.conv_in.weight",
        prefixes=("", "first_stage_model."),
        drop=("loss.", "train/"),
    ),
    # SDM / IIDM U-Net: SDM's .pt is a plain state dict with these names; a wrapped one
    # ("model.", "module.", LDM's "model.diffusion_model.") is found by its first convolution.
    "unet": Kind(
        description="U-Net",
        presets=lambda: list(_unet("UNET_PRESETS")),
        default_preset="iidm",
        config_from_preset=lambda preset: _unet("unet_preset")(preset),
        config_class=lambda: _unet("UNetConfig"),
        build_network=lambda config: _unet("UNetModel")(config),
        anchor="input_blocks.0.0.weight",
        prefixes=("", "model.diffusion_model.", "model.", "module."),
        drop=(),
    ),
}


class Refusal(Exception):
    """The conversion cannot go on; the message says why in plain words."""


# ------------------------------------------------------------------------------ which network
def anchor_prefix(names: list[str], kind: Kind, prefix: str | None = None) -> str | None:
    """The prefix under which the kind's anchor weight appears (``prefix`` when given), or None."""
    if prefix is not None:
        return prefix if prefix + kind.anchor in names else None
    present = set(names)
    for candidate in kind.prefixes:
        if candidate + kind.anchor in present:
            return candidate
    hits = sorted(name[: -len(kind.anchor)] for name in names if name.endswith("." + kind.anchor))
    return hits[0] if len(hits) == 1 else None


def resolve_kind(names: list[str], given: str | None, from_config: str | None, from_file: str | None,
                 prefix: str | None = None) -> tuple[str, str]:
    """The kind of network to convert and how it was found: what --kind, --config and the file's
    own metadata say (they must agree), else what the names look like."""
    claims = {what: kind for what, kind in (("--kind", given), ("--config", from_config),
                                             ("the input's metadata", from_file)) if kind}
    if from_file and from_file not in KINDS:
        raise Refusal(f"the input is a {from_file!r} checkpoint; the converter takes weights checkpoints of "
                      f"the kinds {', '.join(sorted(KINDS))}")
    if len(set(claims.values())) > 1:
        raise Refusal("the kind of network is given twice, differently: "
                      + ", ".join(f"{what} says {kind}" for what, kind in claims.items()))
    seen = {name: found for name, kind in KINDS.items()
            if (found := anchor_prefix(names, kind, prefix)) is not None}

    def looks(name: str) -> str:
        return f"{KINDS[name].anchor}" + (f" under '{seen[name]}'" if seen[name] else "")

    if claims:
        what, kind = next(iter(claims.items()))
        if kind not in seen and seen:
            other = sorted(seen)[0]
            raise Refusal(f"{what} says {kind}, but the names look like a {KINDS[other].description} "
                          f"({looks(other)}, no {KINDS[kind].anchor}): use --kind {other}")
        return kind, f"from {what}"
    if len(seen) == 1:
        kind = next(iter(seen))
        return kind, f"told by its names ({looks(kind)})"
    if seen:
        raise Refusal("the file holds more than one network (" + "; ".join(
            f"a {KINDS[k].description}: {looks(k)}" for k in sorted(seen)) + "): choose one with --kind")
    raise Refusal("cannot tell which network the weights are for (no " + " or ".join(
        f"{kind.anchor} ({kind.description})" for kind in KINDS.values()) + "); give --kind, and --prefix if "
        "the names carry one")


# ------------------------------------------------------------------------------ which architecture
def choose_network(kind_name: str, args, upstream: UpstreamConfig | None,
                   stored: Mapping[str, Any] | None) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
    """(network config, where it came from, diffusion settings it brings). A stored config (this
    project's checkpoint) wins; --preset and --config must agree with it and with each other; a
    preset alone may describe a foreign autoencoder only if it keeps what upstream code fixes, and
    never a foreign U-Net (``head_layout_unknown``)."""
    kind = KINDS[kind_name]

    def complete(network: Mapping[str, Any], source: str, hint: str = "") -> dict[str, Any]:
        return config_from_dict(kind.config_class(), network, complete=True, source=source, hint=hint).to_dict()

    preset = kind.config_from_preset(args.preset).to_dict() if args.preset else None
    stated = []
    if stored is not None and isinstance(stored.get("config", {}).get("network"), Mapping):
        own = dict(stored["config"]["network"])
        given = upstream.network if upstream is not None else preset
        if given is not None:   # an older file may lack fields: --config / --preset supply them
            own = {**{k: v for k, v in given.items() if k not in own}, **own}
        stated.append(("the input's own config", complete(
            own, args.input, hint="give the architecture with --config FILE (or --preset NAME) to fill them in")))
    if preset is not None:
        stated.append((f"--preset {args.preset}", preset))
    if upstream is not None:
        stated.append((f"--config {args.config}", complete(upstream.network, f"--config {args.config}")))
    for (first, a), (second, b) in zip(stated, stated[1:]):
        differ = disagreements(kind_name, a, b)
        if differ:
            raise Refusal(f"{first} and {second} describe different networks: " + "; ".join(differ))
    if stated and stated[0][0] == "the input's own config":
        diffusion = stored["config"].get("diffusion")
        return stated[0][1], "the input's own config", dict(diffusion) if isinstance(diffusion, Mapping) else None
    if upstream is not None:
        return stated[-1][1], f"--config {args.config}: {upstream.origin}", upstream.diffusion
    name = args.preset or kind.default_preset
    network = preset if preset is not None else kind.config_from_preset(name).to_dict()
    departs = deviations(kind_name, network)
    if departs:
        raise Refusal(f"preset {name} is this project's own {kind.description} ({', '.join(departs)}); a file "
                      f"written by {UPSTREAM_NAMES[kind_name]} code cannot have it, and its weights would fit the "
                      "shapes yet compute something else. Describe the file's architecture with --config FILE "
                      "(the upstream YAML or flags it was trained with, or this project's JSON config)")
    if kind_name == "unet":
        raise Refusal(head_layout_unknown(name, network, given=args.preset is not None))
    return network, f"preset {name}", None


def head_layout_unknown(name: str, network: Mapping[str, Any], given: bool) -> str:
    """Why a preset alone cannot describe a U-Net written by SDM's or IIDM's code: the split of
    attention channels into heads leaves no trace in the weight shapes and their files (SDM's .pt,
    IIDM's .pkl) hold weights only, so the preset's split would be a guess."""
    per_head = network["num_head_channels"]
    split = f"{per_head} channels per head" if per_head != -1 else f"{network['num_heads']} heads per block"
    described = f"preset {name}" if given else f"with neither --config nor --preset, the default preset {name}"
    return (f"{described} would fix the U-Net's attention head layout ({split}), but the weight shapes do not "
            "show how its attention channels are split into heads (num_heads, num_head_channels, "
            f"num_heads_upsample) and {UPSTREAM_NAMES['unet']} files record no model arguments (SDM's .pt and "
            "IIDM's .pkl hold weights only); loaded with another split than the one it was trained with, it would "
            "compute something else without a complaint. Give the arguments it was built with: --config FILE "
            "(SDM's model flags, e.g. configs/sdm/ade20k.flags for its published ADE20K model; IIDM's "
            "image_sample.py arguments, as JSON or flags: docs/converting.md); --preset may be given beside "
            "--config, and must then agree with it")


# ------------------------------------------------------------------------------ diffusion settings
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


def unet_diffusion(args, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """A U-Net's diffusion settings: the options given over those of the input's own config or of
    --config (a preset brings none); never a silent default."""
    diffusion = dict(base or {})
    if args.schedule is not None:
        diffusion["schedule"] = parse_schedule(args.schedule)
    if args.space is not None:
        diffusion["space"] = args.space
    if args.latent_scale is not None:
        if diffusion.get("space") == "pixel":
            raise WeightsError("--latent_scale: this U-Net diffuses pixels (space 'pixel', as SDM's do); "
                               "give --space latent if it was trained on autoencoder latents")
        diffusion["latent_scale"] = args.latent_scale
        diffusion.setdefault("space", "latent")
    if diffusion.get("space") == "pixel":
        diffusion.pop("latent_scale", None)
    missing = [] if "schedule" in diffusion else ["--schedule"]
    if "space" not in diffusion:
        missing.append("--space (latent with --latent_scale, or pixel)")
    elif diffusion["space"] == "latent" and "latent_scale" not in diffusion:
        missing.append("--latent_scale")
    if missing:
        raise WeightsError(f"the U-Net's diffusion settings are unknown: give {' and '.join(missing)} "
                           "(IIDM and SDM: --schedule linear:1000; IIDM's VQ-f4 latents: --latent_scale 1; "
                           "SDM: --space pixel)")
    return check_diffusion(diffusion, "the converted U-Net")


# ------------------------------------------------------------------------------ fit and output
def _shape(value) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", np.shape(value)))


def _listed(lines: list[str], limit: int) -> list[str]:
    return lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def report_fit(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, Any],
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
        lines.append(f"{len(mismatched)} weight(s) have another shape than the network's (is --config right?):")
        lines += _listed([f"  {n}: the network has {tuple(expected[n])}, the file {_shape(weights[n])}"
                          for n in mismatched], limit)
    return lines


class StoredArray:
    """A weight as it will be written: read from the input only when the writer asks for it, then
    cast to the stored type, so the output is produced one array at a time."""

    def __init__(self, value, dtype: str):
        self.value, self.dtype, self.shape = value, np.dtype(dtype), _shape(value)

    def numpy(self) -> np.ndarray:
        return np.asarray(self.value).astype(self.dtype, copy=False)


def convert(args) -> int:
    """Convert ``args.input`` into ``args.output`` as the converter's options say, printing what was
    found; 0 once written. Raises Refusal, WeightsError or UpstreamConfigError, and writes nothing
    then."""
    upstream = read_config(args.config) if args.config else None
    arrays, info = open_weights(args.input, strict=args.strict)
    stored = info.checkpoint
    names = sorted(arrays)
    kind_name, how = resolve_kind([n for n in names if not n.startswith(("loss.", "train/"))], args.kind,
                                  upstream.kind if upstream else None,
                                  stored.get("kind") if stored else None, args.prefix)
    kind = KINDS[kind_name]
    if args.preset is not None and args.preset not in kind.presets():
        raise Refusal(f"unknown {kind_name} preset {args.preset!r}; choose one of {', '.join(kind.presets())}")
    network, described, diffusion_base = choose_network(kind_name, args, upstream, stored)
    config = kind.config_class().from_dict(network)

    prefix = args.prefix if args.prefix is not None else anchor_prefix(
        [n for n in names if not n.startswith(kind.drop)], kind)
    selection: Selection = select_weights(arrays, prefix=prefix or "", drop=kind.drop + tuple(args.ignore))
    where = f"; weights under '{selection.prefix}'" if selection.prefix else ""
    print(f"{args.input}: {info.format} ({info.layout}), {len(arrays)} arrays{where}; "
          f"a {kind_name} ({how}); architecture from {described}")
    for line in info.describe() + selection.describe() + (upstream.notes if upstream else []):
        print("  " + line)
    sys.stdout.flush()

    network_module = kind.build_network(config)     # shapes only: Jittor computes no value here
    state = network_module.state_dict()
    expected = {name: tuple(var.shape) for name, var in state.items()}
    problems = report_fit(expected, selection.weights)
    if problems:
        raise Refusal(f"the weights do not fit the {kind_name} network ({described}); nothing was written.\n"
                      + "\n".join(problems))
    checkpoint_config = {"network": config.to_dict()}
    if kind_name == "unet":
        checkpoint_config["diffusion"] = unet_diffusion(args, diffusion_base)
    out = {name: StoredArray(selection.weights[name],
                             args.dtype if args.dtype and str(var.dtype).startswith("float") else str(var.dtype))
           for name, var in state.items()}
    extra = {"converted_from": Path(args.input).name, "source_format": info.format, "source_layout": info.layout,
             "architecture_from": described}
    if args.dtype:
        extra["stored_dtype"] = args.dtype
    if info.values:
        extra["source_values"] = info.values
    save_checkpoint(args.output, out, kind=kind_name, config=checkpoint_config, extra=extra)
    print(f"wrote {args.output}: {len(out)} weights checked against the {kind_name} network ({described})")
    return 0

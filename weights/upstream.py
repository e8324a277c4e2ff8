"""The configurations published with upstream checkpoints, translated into this project's config
dicts (plain data: no network is built here).

Three sources, recognised by content:

* LDM / taming YAML (``model.params``): an autoencoder's ``ddconfig``, ``embed_dim`` and
  ``n_embed``, from a first-stage config (``models/first_stage_models/vq-f4/config.yaml``, taming's
  ``configs/*_vqgan.yaml``, IIDM's ``config/config-jittor.yaml``) or a whole model whose autoencoder
  sits under ``model.params.first_stage_config.params`` (LDM's ``models/ldm/*/config.yaml``).
  Missing ``ddconfig`` keys take the reference Encoder's defaults (``ch_mult`` (1, 2, 4, 8),
  ``dropout`` 0, ``resamp_with_conv`` true, ``double_z`` true); keys the reference ignores are
  ignored here too and reported.
* SDM's ``create_model_and_diffusion`` arguments: a JSON object, or the ``--flag value`` list of
  SDM's shell scripts (``scripts/ade20k.sh``). Missing ones take ``model_and_diffusion_defaults()``.
  As in ``create_model``: ``attention_resolutions`` are image sizes, turned into downsample factors
  ``image_size // res``; an empty ``channel_mult`` is chosen by image size; the mask has
  ``num_classes + 1`` channels unless ``no_instance`` (the instance edge map).
* IIDM's arguments: the same keys (its ``image_train.py`` / ``image_sample.py`` defaults), with
  ``image_size`` the latent's (width, height) pair, e.g. (128, 96); IIDM turns attention sizes into
  factors with the width, ``image_size[0] // res``. A pair, or one of IIDM's own keys
  (``latent_scale``, ``ae_config``, ``ae_ckpt``), marks a latent model; SDM's diffuse pixels.
* This project's own layout: a JSON object ``{"network": {every field}, "diffusion": {...}}``,
  for weights trained elsewhere with this project's architecture.

Upstream code fixes what a config cannot change and weight shapes cannot reveal: SDM's and IIDM's
group norms have 32 groups and their SPADE convolutions 128 hidden channels; taming's and LDM's
autoencoders use 32 groups; attention splits heads before q, k, v (guided-diffusion's legacy
order). A translated config states these values, and ``deviations`` names the fields of any other
config that contradict them: such a config cannot describe a file written by upstream code.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# What upstream code fixes (see the module docstring).
UPSTREAM_FIXED: dict[str, dict[str, Any]] = {
    "unet": {"norm_groups": 32, "spade_hidden_channels": 128},
    "vqmodel": {"num_groups": 32},
}
UPSTREAM_NAMES = {"unet": "SDM / IIDM", "vqmodel": "taming / LDM"}

# guided-diffusion's linear betas at T = 1000 (stretched by 1000 / T for other T, as the
# project's schedule does from these same two numbers).
BETA_START, BETA_END = 1e-4, 0.02

# SDM's model_and_diffusion_defaults() (guided_diffusion/script_util.py); IIDM's are the same.
SDM_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_classes": 151, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "",
    "dropout": 0.0, "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True,
    "resblock_updown": False, "use_fp16": False, "use_new_attention_order": False, "no_instance": False,
    "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": False, "rescale_learned_sigmas": False,
}
# Flags of SDM's and IIDM's training and sampling scripts that do not change the network or its
# training schedule (data, optimisation, logging, sampling, file paths): accepted and left out.
SCRIPT_FLAGS = {
    "data_dir", "dataset_mode", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size",
    "microbatch", "ema_rate", "drop_rate", "log_interval", "save_interval", "resume_checkpoint",
    "fp16_scale_growth", "is_train", "clip_denoised", "num_samples", "use_ddim", "model_path", "results_path",
    "s", "input_path", "img_path", "output_path", "start_t", "resume_image",
}
IIDM_ONLY = {"latent_scale", "ae_config", "ae_ckpt"}
# SDM's create_model: channel_mult by image size when the flag is empty; IIDM adds its latent sizes.
SDM_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
IIDM_CHANNEL_MULT = {(512, 384): (0.5, 1, 1, 2, 2, 4, 4), (128, 96): (1, 1, 2, 3, 4)}

# taming's / LDM's Encoder and Decoder keyword defaults (modules/diffusionmodules/model.py).
DDCONFIG_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")
DDCONFIG_DEFAULTS: dict[str, Any] = {"ch_mult": (1, 2, 4, 8), "dropout": 0.0, "resamp_with_conv": True,
                                     "double_z": True}
# Decoder / LDM options whose reference values this project's autoencoder implements.
DDCONFIG_FIXED: dict[str, Any] = {"give_pre_end": False, "tanh_out": False, "use_linear_attn": False,
                                  "attn_type": "vanilla"}
VQ_CLASSES = ("VQModel", "VQModelInterface")   # last component of the YAML "target"


class UpstreamConfigError(ValueError):
    """A configuration file that cannot be read or describes a network this project cannot run."""


@dataclass
class UpstreamConfig:
    """A configuration translated into this project's terms.

    kind       "unet" or "vqmodel"
    origin     what the file was read as, in words
    network    every field of the network's config (``UNetConfig`` / ``VQConfig`` names)
    diffusion  a U-Net's {"schedule", "space"[, "latent_scale"]}; None when the file says nothing
    upstream   whether upstream code built the network (so ``UPSTREAM_FIXED`` holds for it)
    notes      plain-words lines: what was left out or assumed, and why
    """

    kind: str
    origin: str
    network: dict[str, Any]
    diffusion: dict[str, Any] | None = None
    upstream: bool = True
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ rules
def deviations(kind: str, network: Mapping[str, Any]) -> list[str]:
    """The fields of ``network`` that contradict what upstream code fixes, in words ("" when none)."""
    return [f"{name}={network.get(name)!r} (upstream code: {value!r})"
            for name, value in UPSTREAM_FIXED.get(kind, {}).items() if network.get(name) != value]


def attention_heads(network: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(part, level, heads) of every attention block of an SDM U-Net config: the head layout that
    ``num_heads``, ``num_heads_upsample`` and ``num_head_channels`` produce together (guided-
    diffusion: a fixed width per head when ``num_head_channels`` is not -1, else a fixed count)."""
    widths = [int(mult * network["model_channels"]) for mult in network["channel_mult"]]
    per_head = network["num_head_channels"]
    upsample = network["num_heads"] if network["num_heads_upsample"] == -1 else network["num_heads_upsample"]

    def heads(width: int, count: int) -> int:
        return width // per_head if per_head != -1 else count

    layout = []
    for level, width in enumerate(widths):
        if 2 ** level in network["attention_resolutions"]:
            layout += [("input", level, heads(width, network["num_heads"]))] * network["num_res_blocks"]
            layout += [("output", level, heads(width, upsample))] * (network["num_res_blocks"] + 1)
    layout.append(("middle", len(widths) - 1, heads(widths[-1], network["num_heads"])))
    return sorted(layout)


def _comparable(kind: str, network: Mapping[str, Any]) -> dict[str, Any]:
    """A network config with equivalent spellings made equal: attention factors as a set, the
    three head fields as the head layout they produce."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in network.items()}
    if kind == "unet":
        out["attention_resolutions"] = sorted(set(network["attention_resolutions"]))
        out["attention heads"] = attention_heads(network)
        for name in ("num_heads", "num_heads_upsample", "num_head_channels"):
            out.pop(name)
    if kind == "vqmodel" and not network.get("attn_resolutions"):
        out.pop("resolution", None)   # it only decides where attention goes
    return out


def disagreements(kind: str, first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    """The fields on which two network configs build different networks, as "name: a vs b"."""
    a, b = _comparable(kind, first), _comparable(kind, second)
    return [f"{name}: {a.get(name)!r} vs {b.get(name)!r}" for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


# ------------------------------------------------------------------------------ reading
def read_config(path: str | Path) -> UpstreamConfig:
    """Read a configuration file of any of the supported kinds (module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UpstreamConfigError(f"{path}: cannot read the configuration ({exc})") from None
    try:
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise UpstreamConfigError(f"not valid JSON ({exc})") from None
            if not isinstance(data, dict):
                raise UpstreamConfigError("expected a JSON object")
            if "network" in data:
                return project_config(data)
            return sdm_config(data, origin="SDM/IIDM arguments (JSON)")
        data = _yaml(text)
        if isinstance(data, Mapping):
            return ldm_config(data)
        if "--" in text:
            return sdm_config(parse_flags(text), origin="SDM/IIDM flags")
        raise UpstreamConfigError("expected an LDM / taming YAML config, a JSON object or a list of SDM --flags")
    except UpstreamConfigError as exc:
        raise UpstreamConfigError(f"{path}: {exc}") from None


def _yaml(text: str) -> Any:
    """The YAML document in ``text``, or None when it is not YAML (a flag list may not be)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def parse_flags(text: str) -> dict[str, str]:
    """``--name value`` pairs as SDM's shell scripts pass them (line continuations, comments and
    whatever precedes the first ``--flag``, e.g. ``mpiexec -n 8 python image_train.py``, are
    skipped); ``--name=value`` too. A flag repeated with another value is an error."""
    try:
        tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as exc:
        raise UpstreamConfigError(f"cannot split the flags ({exc})") from None
    first = next((i for i, token in enumerate(tokens) if token.startswith("--")), len(tokens))
    tokens, flags, i = tokens[first:], {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("-") or token in ("-", "--"):
            raise UpstreamConfigError(f"expected a --flag, found {token!r} (give the flags of one command)")
        name, sep, value = token.lstrip("-").partition("=")
        if not sep:
            if i + 1 >= len(tokens):
                raise UpstreamConfigError(f"--{name} has no value")
            value, i = tokens[i + 1], i + 1
        if name in flags and flags[name] != value:
            raise UpstreamConfigError(f"--{name} is given twice, as {flags[name]!r} and {value!r}")
        flags[name] = value
        i += 1
    if not flags:
        raise UpstreamConfigError("no --flag found")
    return flags


# ------------------------------------------------------------------------------ SDM / IIDM
def _bool(name: str, value: Any) -> bool:
    """SDM's str2bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise UpstreamConfigError(f"{name} must be a boolean (True/False), got {value!r}")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise UpstreamConfigError(f"{name} must be an integer, got {value!r}")
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise UpstreamConfigError(f"{name} must be an integer, got {value!r}") from None


def _float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UpstreamConfigError(f"{name} must be a number, got {value!r}") from None


def _int_list(name: str, value: Any) -> list[int]:
    """A comma-separated string (as the flags give it; spaces allowed, as IIDM writes '32, 16, 8')
    or a JSON list, of integers."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise UpstreamConfigError(f"{name} must be a comma-separated list of integers, got {value!r}")
    return [_int(name, item.strip() if isinstance(item, str) else item) for item in items]


def _image_size(value: Any) -> int | tuple[int, int]:
    """SDM: one integer; IIDM: the latent's (width, height), as a list or "W,H"."""
    if isinstance(value, str) and "," in value or isinstance(value, (list, tuple)):
        pair = _int_list("image_size", value)
        if len(pair) != 2:
            raise UpstreamConfigError(f"image_size must be one integer (SDM) or a (width, height) pair (IIDM), "
                                      f"got {value!r}")
        return tuple(pair)
    return _int("image_size", value)


def _sdm_diffusion_checks(a: Mapping[str, Any]) -> tuple[int, str]:
    """Refuses the SDM options this project cannot reproduce; returns (diffusion steps, schedule kind)."""
    if not _bool("class_cond", a["class_cond"]):
        raise UpstreamConfigError("class_cond is False: SDM's U-Net is then built without mask channels "
                                  "(num_classes=None), which its SPADE blocks cannot take; semantic models "
                                  "are trained with --class_cond True")
    if _bool("use_new_attention_order", a["use_new_attention_order"]):
        raise UpstreamConfigError("use_new_attention_order is True: this project's attention splits heads "
                                  "before q, k, v (guided-diffusion's legacy order, used by SDM's and IIDM's "
                                  "released models); the other order computes something else with the same weights")
    if _bool("predict_xstart", a["predict_xstart"]):
        raise UpstreamConfigError("predict_xstart is True: the network predicts x_0, while this project's "
                                  "samplers read its output as the noise eps")
    steps = _int("diffusion_steps", a["diffusion_steps"])
    if _bool("rescale_timesteps", a["rescale_timesteps"]) and steps != 1000:
        raise UpstreamConfigError(f"rescale_timesteps is True with diffusion_steps={steps}: the network was "
                                  "called with t * 1000 / T, this project calls it with t")
    kind = a["noise_schedule"]
    if kind not in ("linear", "cosine"):
        raise UpstreamConfigError(f"noise_schedule must be linear or cosine (guided-diffusion's), got {kind!r}")
    return steps, kind


def _sdm_channel_mult(a: Mapping[str, Any], image_size) -> tuple[int, ...]:
    """``channel_mult`` as given, or, when empty, the one the reference picks by image size."""
    if a["channel_mult"] in ("", None, []):
        table = IIDM_CHANNEL_MULT if isinstance(image_size, tuple) else SDM_CHANNEL_MULT
        if image_size not in table:
            raise UpstreamConfigError(f"unsupported image size: {image_size} (with an empty channel_mult the "
                                      f"reference picks it by image size, for {sorted(table)} only)")
        return table[image_size]
    return tuple(_int_list("channel_mult", a["channel_mult"]))


def sdm_config(arguments: Mapping[str, Any], origin: str = "SDM/IIDM arguments") -> UpstreamConfig:
    """The U-Net and diffusion settings that SDM's (or IIDM's) ``create_model_and_diffusion``
    builds from these arguments, the others taking ``model_and_diffusion_defaults()``."""
    unknown = sorted(set(arguments) - set(SDM_DEFAULTS) - SCRIPT_FLAGS - IIDM_ONLY)
    if unknown:
        raise UpstreamConfigError(f"unknown SDM/IIDM option(s) {', '.join(unknown)} (a typo would silently "
                                  f"change the network); known: {', '.join(sorted(SDM_DEFAULTS))}")
    a = {**SDM_DEFAULTS, **arguments}
    notes = []
    not_network = SCRIPT_FLAGS | {"use_checkpoint", "timestep_respacing", "use_kl", "rescale_learned_sigmas",
                                  "ae_config", "ae_ckpt"}
    ignored = sorted(set(arguments) & not_network)
    if ignored:
        notes.append("left out (data, training, sampling or memory options, not the network): " + ", ".join(ignored))

    image_size = _image_size(a["image_size"])
    iidm = isinstance(image_size, tuple) or bool(set(arguments) & IIDM_ONLY)
    steps, kind = _sdm_diffusion_checks(a)
    channel_mult = _sdm_channel_mult(a, image_size)
    width = image_size[0] if isinstance(image_size, tuple) else image_size
    sizes = _int_list("attention_resolutions", a["attention_resolutions"])
    if any(res <= 0 for res in sizes):
        raise UpstreamConfigError(f"attention_resolutions must be positive, got {a['attention_resolutions']!r}")
    factors = [width // res for res in sizes]
    num_classes = _int("num_classes", a["num_classes"])
    no_instance = _bool("no_instance", a["no_instance"])
    if not no_instance:
        notes.append(f"mask channels: {num_classes} classes + 1 instance edge map (no_instance is False)")
    if _bool("use_fp16", a["use_fp16"]):
        notes.append("use_fp16 was a training choice (the saved weights are float32 master copies); "
                     "the converted network runs in float32")
    network = {
        "in_channels": 3,
        "model_channels": _int("num_channels", a["num_channels"]),
        "num_res_blocks": _int("num_res_blocks", a["num_res_blocks"]),
        "attention_resolutions": sorted(set(factors)),
        "dropout": _float("dropout", a["dropout"]),
        "channel_mult": list(channel_mult),
        "conv_resample": True,
        "num_classes": num_classes + (0 if no_instance else 1),
        "num_heads": _int("num_heads", a["num_heads"]),
        "num_head_channels": _int("num_head_channels", a["num_head_channels"]),
        "num_heads_upsample": _int("num_heads_upsample", a["num_heads_upsample"]),
        "use_scale_shift_norm": _bool("use_scale_shift_norm", a["use_scale_shift_norm"]),
        "resblock_updown": _bool("resblock_updown", a["resblock_updown"]),
        "learn_sigma": _bool("learn_sigma", a["learn_sigma"]),
        **UPSTREAM_FIXED["unet"],
        "use_fp16": False,
    }
    schedule = {"kind": kind, "num_timesteps": steps, "beta_start": BETA_START, "beta_end": BETA_END}
    if iidm:
        diffusion = {"schedule": schedule, "space": "latent"}
        if not _bool("latent_scale", a.get("latent_scale", False)):
            diffusion["latent_scale"] = 1.0   # IIDM trains on the VQ-f4 latents unscaled
        else:
            notes.append("latent_scale is True: IIDM scaled its latents by 1 / std of its first batch, a "
                         "number its checkpoints do not record; give it with --latent_scale")
        origin = origin.replace("SDM/IIDM", "IIDM")
    else:
        diffusion = {"schedule": schedule, "space": "pixel"}
        origin = origin.replace("SDM/IIDM", "SDM")
    return UpstreamConfig("unet", origin, network, diffusion, True, notes)


# ------------------------------------------------------------------------------ LDM / taming
def ldm_config(data: Any) -> UpstreamConfig:
    """The autoencoder of an LDM / taming YAML config (first-stage or whole model)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise UpstreamConfigError("expected an LDM / taming YAML config (a 'model' section), a JSON object or "
                                  "a list of SDM --flags")
    model = data["model"]
    params = model.get("params") or {}
    target, where = str(model.get("target", "")), "model"
    if isinstance(params.get("first_stage_config"), Mapping):
        stage = params["first_stage_config"]
        target, where = str(stage.get("target", "")), "model.params.first_stage_config"
        params = stage.get("params") or {}
    if not isinstance(params, Mapping):
        raise UpstreamConfigError(f"{where}.params must be a mapping")
    name = target.rsplit(".", 1)[-1]
    if name not in VQ_CLASSES:
        what = ("a KL autoencoder (this project's autoencoder is a VQ model)" if "KL" in name
                else "not a VQ autoencoder")
        raise UpstreamConfigError(f"{where}.target is {target or 'missing'}: {what}; expected one of "
                                  f"{', '.join(VQ_CLASSES)} (LDM's U-Net is not the SDM U-Net this project runs)")
    ddconfig = params.get("ddconfig")
    if not isinstance(ddconfig, Mapping):
        raise UpstreamConfigError(f"{where}.params has no ddconfig")
    missing = [key for key in ("embed_dim", "n_embed") if key not in params]
    missing += [f"ddconfig.{key}" for key in DDCONFIG_REQUIRED if key not in ddconfig]
    if missing:
        raise UpstreamConfigError(f"{where}.params lacks {', '.join(missing)} (the reference has no default)")
    if params.get("remap") is not None:
        raise UpstreamConfigError("remap is set: the quantizer's index remapping is not supported")
    for key, value in DDCONFIG_FIXED.items():
        if key in ddconfig and ddconfig[key] != value:
            raise UpstreamConfigError(f"ddconfig.{key}={ddconfig[key]!r}: this project's autoencoder implements "
                                      f"{key}={value!r} only")
    dd = {**DDCONFIG_DEFAULTS, **ddconfig}
    known = set(DDCONFIG_REQUIRED) | set(DDCONFIG_DEFAULTS) | set(DDCONFIG_FIXED)
    notes = []
    if set(ddconfig) - known:
        notes.append("ignored ddconfig key(s), as the reference Encoder/Decoder ignore them: "
                     + ", ".join(sorted(set(ddconfig) - known)))
    if params.get("use_ema"):
        notes.append("use_ema: the file also holds EMA copies (model_ema.*); --ignore model_ema. leaves them out")
    network = {
        "ch": _int("ch", dd["ch"]),
        "ch_mult": _int_list("ch_mult", dd["ch_mult"]),
        "num_res_blocks": _int("num_res_blocks", dd["num_res_blocks"]),
        "attn_resolutions": _int_list("attn_resolutions", dd["attn_resolutions"] or []),
        "dropout": _float("dropout", dd["dropout"]),
        "resamp_with_conv": _bool("resamp_with_conv", dd["resamp_with_conv"]),
        "in_channels": _int("in_channels", dd["in_channels"]),
        "out_ch": _int("out_ch", dd["out_ch"]),
        "resolution": _int("resolution", dd["resolution"]),
        "z_channels": _int("z_channels", dd["z_channels"]),
        "double_z": _bool("double_z", dd["double_z"]),
        "embed_dim": _int("embed_dim", params["embed_dim"]),
        "n_embed": _int("n_embed", params["n_embed"]),
        "beta": 0.25,      # fixed by LDM's and taming's VQModel
        "legacy": True,    # VectorQuantizer2's default, which they keep
        **UPSTREAM_FIXED["vqmodel"],
    }
    origin = f"LDM/taming YAML ({where}: {name})"
    return UpstreamConfig("vqmodel", origin, network, None, True, notes)


# ------------------------------------------------------------------------------ this project
def project_config(data: Mapping[str, Any]) -> UpstreamConfig:
    """This project's own layout, {"network": {...}, "diffusion": {...}} (a checkpoint's config):
    the network's kind is told by its fields."""
    network = data.get("network")
    if not isinstance(network, Mapping):
        raise UpstreamConfigError("'network' must be a JSON object of the network's fields")
    if "model_channels" in network:
        kind = "unet"
    elif "n_embed" in network:
        kind = "vqmodel"
    else:
        raise UpstreamConfigError("cannot tell the network: a U-Net config has model_channels, an autoencoder's "
                                  "n_embed")
    unknown = sorted(set(data) - {"network", "diffusion"})
    if unknown:
        raise UpstreamConfigError(f"unknown section(s) {', '.join(unknown)}; expected network and diffusion")
    diffusion = data.get("diffusion")
    if diffusion is not None and not isinstance(diffusion, Mapping):
        raise UpstreamConfigError("'diffusion' must be a JSON object")
    return UpstreamConfig(kind, "this project's config (JSON)", dict(network),
                          dict(diffusion) if diffusion is not None else None, upstream=False)

"""Self-describing checkpoints (safetensors + JSON config) and strict, shape-checked weight loading.

A checkpoint file holds named arrays and, as safetensors metadata (strings only):

    format      "iidm-jittor"
    version     CHECKPOINT_VERSION
    kind        the network, e.g. "unet", "vqmodel", "segmenter"; "<network>-train" for a run
    config      JSON, the schema below
    extra       JSON, anything else (training step, where the weights came from, ...)

The config (version 2) is one layout for every kind:

    {"network":   {every constructor field of the network, defaults included},
     "diffusion": {"schedule": {"kind", "num_timesteps", "beta_start", "beta_end"},   (U-Nets only)
                   "space": "latent" | "pixel",
                   "latent_scale": s}                                   (space "latent" only)
     ...}                                                  (a training run adds its own sections)

so a model is rebuilt from the file alone, and a field the computation needs is never filled in
by a default: reading a network config with a missing field, or a U-Net without its diffusion
settings, is an error naming the field and the converter option that sets it. Files written by
version 1 of this format (a flat network config, {"unet", "schedule", "latent_scale"} from an
export, or {"unet", "train", ...} from a training run) are migrated on read; where version 1 did
not record something (a converted U-Net's schedule and latent scale), the error says how to
re-export.

Two layouts share the format. A *weights* checkpoint (kind "unet", "vqmodel", ...) names its
arrays exactly as the network's parameters. A *training* checkpoint (kind "unet-train", ...)
prefixes them: ``model/NAME`` (raw weights), ``ema/NAME`` (exponential moving average),
``optim/...`` (optimizer state); ``Checkpoint.weights`` extracts either set as plain names.

Writing streams the file: the header first, then each array's bytes one at a time, into a
temporary file renamed at the end, so saving holds at most one array's copy besides the caller's
(values may be numpy arrays or Jittor Vars, fetched one by one). Jittor's ``load_state_dict``
never raises and skips missing keys silently; ``load_weights`` compares key sets and shapes first
and reports every difference in plain words.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datasets.io import atomic_write

FORMAT_NAME = "iidm-jittor"
CHECKPOINT_VERSION = 2
TRAIN_SUFFIX = "-train"
WEIGHT_SETS = ("ema", "model")
SPACES = ("latent", "pixel")
SCHEDULE_FIELDS = ("kind", "num_timesteps", "beta_start", "beta_end")
DIFFUSION_KINDS = ("unet",)   # network kinds whose checkpoints carry a "diffusion" section
CONVERT_HINT = "python -m tools.convert_weights"


class WeightsError(ValueError):
    """Weights that do not fit: missing or unexpected names, wrong shapes, unreadable files."""


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------ strict loading
def check_state_dict(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any],
                     source: str = "weights") -> None:
    """Raise WeightsError unless ``state`` has exactly the names and shapes of ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{name}: expected {tuple(expected[name])}, file has {tuple(np.shape(state[name]))}"
                  for name in sorted(set(expected) & set(state))
                  if tuple(expected[name]) != tuple(np.shape(state[name]))]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched, 6)}")
    if missing:
        problems.append(f"{len(missing)} missing weight(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s): {_listing(unexpected)}")
    if problems:
        raise WeightsError(f"{source} does not fit the network: " + "; ".join(problems))


def module_shapes(module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every saved array (parameters and buffers) of a Jittor module."""
    return {name: tuple(var.shape) for name, var in module.state_dict().items()}


def load_weights(module, state: Mapping[str, Any], source: str = "weights") -> None:
    """Copy ``state`` (name -> numpy array) into a Jittor module after checking every name and shape."""
    import jittor as jt

    check_state_dict(module_shapes(module), state, source)
    loaded = []
    for name, var in module.state_dict().items():
        value = np.asarray(state[name]).astype(str(var.dtype), copy=False)
        var.update(jt.array(np.ascontiguousarray(value)))
        loaded.append(var)
    # Executed now: an unexecuted array op fused into a later kernel has failed to compile in Jittor 1.3.11.
    jt.sync(loaded)


def module_arrays(module) -> dict[str, np.ndarray]:
    """Name -> numpy copy of every saved array of a Jittor module."""
    return {name: var.numpy() for name, var in module.state_dict().items()}


def module_vars(module) -> dict[str, Any]:
    """Name -> Jittor Var of every saved array of a module: ``save_checkpoint`` fetches them one at
    a time, so saving a network does not first copy all of it."""
    return dict(module.state_dict())


# ------------------------------------------------------------------------------ config schema
def config_from_dict(cls, values: Mapping[str, Any], *, complete: bool = False, source: str = "config",
                     hint: str = ""):
    """``cls(**values)`` for a config dataclass, refusing unknown fields by name (a config from
    another version or another network) instead of a TypeError. ``complete``: every field must be
    given (a config read from a checkpoint, which must not fall back on today's defaults);
    ``hint`` says which option sets a missing one."""
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, Mapping):
        raise WeightsError(f"{source}: {cls.__name__} must be a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise WeightsError(f"{source}: {cls.__name__} has unknown field(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
    if complete:
        missing = [name for name in known if name not in values]
        if missing:
            raise WeightsError(f"{source}: the {cls.__name__} lacks the field(s) {', '.join(missing)}, which "
                               f"the computation depends on{'; ' + hint if hint else ''}")
    try:
        return cls(**dict(values))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{source}: bad {cls.__name__}: {exc}") from None


def diffusion_fix(training: bool = False, path: str = "IN") -> str:
    """How to give a U-Net checkpoint the diffusion settings it lacks: a weights file is converted
    again with the options that set them, a training run's weights are exported with them."""
    if training:
        return (f"export its weights with `python -m tools.export_weights {path} OUT.safetensors --schedule "
                "linear:1000 --latent_scale S`, giving what the run was trained with (a run of this project's "
                "`train.py ldm` written before its checkpoints recorded the latent scale did not scale its "
                "latents: --latent_scale 1)")
    return (f"re-export the weights with `{CONVERT_HINT} {path} OUT.safetensors --kind unet --schedule "
            "linear:1000 --latent_scale S` (IIDM and SDM: linear over 1000 steps; IIDM's latent scale is 1)")


def check_diffusion(diffusion: Any, source: str, fix: str | None = None) -> dict[str, Any]:
    """The "diffusion" section of a U-Net checkpoint, checked: schedule fields, space and (for a
    latent model) a finite latent scale > 0. A missing or bad entry names the field and ``fix``
    (default: the converter options that set it)."""
    fix = fix or diffusion_fix()
    if not isinstance(diffusion, Mapping):
        raise WeightsError(f"{source}: the checkpoint does not record its diffusion settings (schedule, "
                           f"latent scale); {fix}")
    schedule = diffusion.get("schedule")
    if not isinstance(schedule, Mapping):
        raise WeightsError(f"{source}: the checkpoint lacks diffusion.schedule (the noise schedule it was "
                           f"trained with, set by --schedule); {fix}")
    missing = [name for name in SCHEDULE_FIELDS if name not in schedule]
    unknown = sorted(set(schedule) - set(SCHEDULE_FIELDS))
    if missing or unknown:
        raise WeightsError(f"{source}: diffusion.schedule lacks {missing} / has unknown {unknown} "
                           f"(expected exactly {list(SCHEDULE_FIELDS)}); {fix}")
    space = diffusion.get("space")
    if space not in SPACES:
        raise WeightsError(f"{source}: diffusion.space must be one of {SPACES}, got {space!r}; {fix}")
    out = {"schedule": dict(schedule), "space": space}
    if space == "latent":
        if "latent_scale" not in diffusion:
            raise WeightsError(f"{source}: the checkpoint lacks diffusion.latent_scale (the factor its latents "
                               f"were multiplied by in training, set by --latent_scale); {fix}")
        scale = diffusion["latent_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise WeightsError(f"{source}: diffusion.latent_scale must be a finite number > 0, got {scale!r}; "
                               f"{fix}")
        out["latent_scale"] = float(scale)
    return out


def diffusion_section(schedule: Mapping[str, Any], space: str = "latent",
                      latent_scale: float | None = 1.0) -> dict[str, Any]:
    """A checked "diffusion" section from a schedule config (as a dict) and the latent scale."""
    section = {"schedule": dict(schedule), "space": space}
    if space == "latent":
        section["latent_scale"] = latent_scale
    return check_diffusion(section, "diffusion settings")


def _migrate_v1(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 config in the version-2 layout: only what version 1 recorded, nothing filled in.
    Version 1 knew latent U-Nets only (space "latent"); its runs and exports from before the latent
    scale was recorded lack it (and a converted U-Net lacks its schedule too), so their
    ``Checkpoint.diffusion`` names the missing field and how to supply it."""
    config = dict(config)

    def diffusion(source: Mapping[str, Any]) -> dict[str, Any]:
        return {"space": "latent", **{k: source[k] for k in ("schedule", "latent_scale") if k in source}}

    if kind.endswith(TRAIN_SUFFIX) and isinstance(config.get("unet"), Mapping):
        train = dict(config.get("train") or {})
        out = {k: v for k, v in config.items() if k != "unet"}
        out["network"] = config["unet"]
        if "schedule" in train or "latent_scale" in train:
            out["diffusion"] = diffusion(train)
        return out
    if isinstance(config.get("unet"), Mapping):        # export of a training run
        out = {"network": config["unet"]}
        if "schedule" in config or "latent_scale" in config:
            out["diffusion"] = diffusion(config)
        return out
    return {"network": {k: v for k, v in config.items() if k not in ("schedule", "latent_scale")}}


# ------------------------------------------------------------------------------ writing
_DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                "uint8": "U8", "bool": "BOOL"}


def _dtype_name(value) -> str:
    name = str(getattr(value, "dtype", np.asarray(value).dtype))
    if name not in _DTYPE_CODES:
        raise WeightsError(f"cannot store arrays of type {name} (supported: {', '.join(_DTYPE_CODES)})")
    return name


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "numpy") and not isinstance(value, np.generic):
        return value.numpy()
    return np.asarray(value)


def metadata_of(kind: str, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "version": str(CHECKPOINT_VERSION),
        "kind": kind,
        "config": json.dumps(dict(config), sort_keys=True, allow_nan=False),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, allow_nan=False),
    }


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file tensor by tensor, atomically: the header (8-byte little-endian
    length, JSON with every tensor's dtype, shape and byte range, padded to 8 bytes), then each
    tensor's bytes in the header's order. Values are numpy arrays or objects with ``.numpy()``
    (Jittor Vars), converted one at a time."""
    entries, offset = {}, 0
    names = sorted(arrays)
    for name in names:
        value = arrays[name]
        shape = [int(d) for d in getattr(value, "shape", np.shape(value))]
        dtype = _dtype_name(value)
        size = math.prod(shape) * np.dtype(dtype).itemsize
        entries[name] = {"dtype": _DTYPE_CODES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name in names:
            array = np.ascontiguousarray(_as_numpy(arrays[name]))
            expected = entries[name]
            if list(array.shape) != expected["shape"] or _DTYPE_CODES.get(str(array.dtype)) != expected["dtype"]:
                raise WeightsError(f"{path}: array {name} changed while being written "
                                   f"({array.dtype} {array.shape}, announced {expected['dtype']} {expected['shape']})")
            f.write(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
            del array


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, Any], kind: str,
                    config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Write arrays + config (the version-2 layout: "network", and "diffusion" for U-Nets) as
    safetensors, streamed and atomic."""
    network_kind = kind[: -len(TRAIN_SUFFIX)] if kind.endswith(TRAIN_SUFFIX) else kind
    if not isinstance(config.get("network"), Mapping):
        raise WeightsError(f"{path}: a checkpoint config needs a 'network' section, got keys {sorted(config)}")
    if network_kind in DIFFUSION_KINDS:
        check_diffusion(config.get("diffusion"), str(path))
    write_safetensors(path, arrays, metadata_of(kind, config, extra))


# ------------------------------------------------------------------------------ reading
_FOREIGN_MAGIC = ((b"PK\x03\x04", "a PyTorch (zip) file"), (b"\x80", "a pickle (PyTorch legacy or Jittor .pkl)"))


def _foreign_hint(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return (f"; it is {what}: convert it first with `{CONVERT_HINT} {path} OUT.safetensors "
                    "--config FILE`, the configuration it was trained with (docs/converting.md)")
    return ""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read: ``kind`` is the network ("unet", "vqmodel", ...), ``training`` whether
    the file is a training run's (prefixed arrays); ``config`` is the version-2 layout."""

    path: str
    kind: str
    training: bool
    version: int
    config: dict[str, Any]
    extra: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def file_kind(self) -> str:
        return self.kind + (TRAIN_SUFFIX if self.training else "")

    @property
    def network(self) -> dict[str, Any]:
        network = self.config.get("network")
        if not isinstance(network, Mapping):
            raise WeightsError(f"{self.path}: the checkpoint config has no network section")
        return dict(network)

    def network_config(self, cls):
        """The network's config dataclass, every field required (none taken from defaults)."""
        return config_from_dict(cls, self.network, complete=True, source=self.path,
                                hint=f"re-export it with `{CONVERT_HINT} --config FILE` (or --preset NAME)")

    @property
    def diffusion(self) -> dict[str, Any]:
        """The checked diffusion settings (U-Nets): schedule, space, latent scale. A missing one
        (an older file's) names the field and the command that supplies it."""
        return check_diffusion(self.config.get("diffusion"), self.path, diffusion_fix(self.training, self.path))

    @property
    def step(self) -> int | None:
        step = self.extra.get("step")
        return int(step) if isinstance(step, (int, float)) else None

    def weights(self, which: str = "ema") -> dict[str, np.ndarray]:
        """Plain network weights: the arrays of a weights checkpoint, or the ``which`` set ("ema"
        or "model") of a training checkpoint."""
        weights, _ = weights_of(self.arrays, {"kind": self.file_kind}, which, self.path)
        return weights


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint`` (any version): (arrays, {kind, version,
    config, extra}) with the config in the version-2 layout."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc}){_foreign_hint(path)}") from None
    return arrays, checkpoint_info(path, metadata)


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """``read_checkpoint``'s {kind, version, config, extra} without reading any array."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc}){_foreign_hint(Path(path))}") from None
    return checkpoint_info(path, metadata)


def checkpoint_info(path: str | os.PathLike, metadata: Mapping[str, str]) -> dict[str, Any]:
    """{kind, version, config, extra} from a checkpoint's safetensors metadata, the config in the
    version-2 layout (readers that fetch the arrays themselves, one at a time, start here)."""
    if metadata.get("format") != FORMAT_NAME:
        raise WeightsError(f"{path}: a safetensors file without this project's metadata; convert it with "
                           f"`{CONVERT_HINT} {path} OUT.safetensors --config FILE`, the configuration it was "
                           "trained with (docs/converting.md)")
    try:
        version = int(metadata.get("version", "0"))
        config = json.loads(metadata.get("config", "{}"))
        extra = json.loads(metadata.get("extra", "{}"))
    except ValueError as exc:
        raise WeightsError(f"{path}: unreadable checkpoint metadata ({exc})") from None
    if version > CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: checkpoint format version {version} is newer than this "
                           f"code's ({CHECKPOINT_VERSION}); update the code")
    kind = metadata.get("kind", "")
    if version < 2:
        config = _migrate_v1(kind, config)
    return {"kind": kind, "version": version, "config": config, "extra": extra}


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, *, header_only: bool = False) -> Checkpoint:
    """Read a checkpoint; with ``kind``, refuse one of another network (weights or training file).
    ``header_only``: read no array (kind, config and extra only; ``Checkpoint.arrays`` is empty)."""
    if not header_only:
        arrays, info = read_checkpoint(path)
    else:
        if not Path(path).is_file():
            raise WeightsError(f"{path}: checkpoint not found")
        arrays, info = {}, read_checkpoint_info(path)
    file_kind = str(info["kind"])
    training = file_kind.endswith(TRAIN_SUFFIX)
    network_kind = file_kind[: -len(TRAIN_SUFFIX)] if training else file_kind
    if kind is not None and network_kind != kind:
        raise WeightsError(f"{path}: a {network_kind!r} checkpoint, expected {kind!r}")
    return Checkpoint(str(path), network_kind, training, int(info["version"]), dict(info["config"]),
                      dict(info["extra"]), arrays)


def weights_of(arrays: Mapping[str, np.ndarray], info: Mapping[str, Any],
               which: str = "ema", source: str = "checkpoint") -> tuple[dict[str, np.ndarray], str]:
    """Plain network weights from a checkpoint and the network kind: the arrays themselves for
    a weights checkpoint, the ``which`` set ("ema" or "model") of a training checkpoint."""
    kind = str(info.get("kind", ""))
    if not kind.endswith(TRAIN_SUFFIX):
        return dict(arrays), kind
    if which not in WEIGHT_SETS:
        raise ValueError(f"weights_of: which must be one of {WEIGHT_SETS}, got {which!r}")
    prefix = f"{which}/"
    weights = {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
    if not weights:
        raise WeightsError(f"{source}: training checkpoint of kind {kind!r} holds no {which!r} weights")
    return weights, kind[: -len(TRAIN_SUFFIX)]


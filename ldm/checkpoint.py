"""Self-describing checkpoints (safetensors + JSON config) and strict, shape-checked weight loading.

A checkpoint file holds named float arrays and, as safetensors metadata (strings only):

    format      "iidm-jittor"
    version     CHECKPOINT_VERSION
    kind        what the weights are for, e.g. "unet", "vqmodel"
    config      the full configuration of the network, as JSON
    extra       anything else as JSON (training step, ...)

so a model is rebuilt from the file alone.

Two layouts share the format. A *weights* checkpoint (kind "unet", "vqmodel", ...) names its
arrays exactly as the network's parameters. A *training* checkpoint (kind "unet-train", ...)
prefixes them: ``model/NAME`` (raw weights), ``ema/NAME`` (exponential moving average),
``optim/...`` (optimizer state); ``weights_of`` extracts either set as plain names. Jittor's ``load_state_dict`` never raises and skips
missing keys silently; ``load_weights`` compares key sets and shapes first and reports every
difference in plain words.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datasets.io import atomic_write

FORMAT_NAME = "iidm-jittor"
CHECKPOINT_VERSION = 1


class WeightsError(ValueError):
    """Weights that do not fit: missing or unexpected names, wrong shapes, unreadable files."""


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


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
    for name, var in module.state_dict().items():
        value = np.asarray(state[name]).astype(str(var.dtype), copy=False)
        var.update(jt.array(np.ascontiguousarray(value)))


def module_arrays(module) -> dict[str, np.ndarray]:
    """Name -> numpy copy of every saved array of a Jittor module."""
    return {name: var.numpy() for name, var in module.state_dict().items()}


def config_from_dict(cls, values: Mapping[str, Any]):
    """``cls(**values)`` for a config dataclass read from a checkpoint or a file, refusing unknown
    fields by name (a config from another version or another network) instead of a TypeError."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**dict(values))


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], kind: str,
                    config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Write arrays + config atomically as safetensors (temporary file, then rename)."""
    from safetensors.numpy import save

    path = Path(path)
    metadata = {
        "format": FORMAT_NAME,
        "version": str(CHECKPOINT_VERSION),
        "kind": kind,
        "config": json.dumps(dict(config), sort_keys=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``: (arrays, {kind, version, config, extra})."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise WeightsError(f"{path}: safetensors file without this project's metadata; convert it "
                           "with tools/convert_weights.py")
    version = int(metadata.get("version", "0"))
    if version > CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: checkpoint format version {version} is newer than this "
                           f"code's ({CHECKPOINT_VERSION}); update the code")
    info = {
        "kind": metadata.get("kind", ""),
        "version": version,
        "config": json.loads(metadata.get("config", "{}")),
        "extra": json.loads(metadata.get("extra", "{}")),
    }
    return arrays, info



TRAIN_SUFFIX = "-train"
WEIGHT_SETS = ("ema", "model")


def weights_of(arrays: Mapping[str, np.ndarray], info: Mapping[str, Any],
               which: str = "ema") -> tuple[dict[str, np.ndarray], str]:
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
        raise WeightsError(f"training checkpoint of kind {kind!r} holds no {which!r} weights")
    return weights, kind[: -len(TRAIN_SUFFIX)]

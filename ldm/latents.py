"""The cached latent store that the LDM trains from (written by ``ldm.latent_cache``, whose command is
``python -m tools.cache_latents``).

A store is a folder:

    manifest.json   what was encoded and how: the autoencoder (path, sha256 of the file, config),
                    the image size, the latent shape, the source root and the item names
    latents.npy     float32 [N, 2, C, h, w]: view 0 is the photo's latent, view 1 its left-right flip's
    labels.npy      uint8   [N, 2, h, w]:    the label map resized (nearest) to h x w, and its flip
    progress.json   {"done": k}: items [0, k) are written; the store is complete when k == N

Both arrays are ``.npy`` files opened memory-mapped, so a store larger than memory trains fine.
This module reads with numpy only (no Jittor), so data code and tools can use it cheaply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datasets.io import atomic_write

FORMAT_NAME = "iidm-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LATENTS = "latents.npy"
LABELS = "labels.npy"
VIEWS = ("original", "hflip")


class StoreError(ValueError):
    """A latent store that is missing, incomplete, or does not fit the request."""


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a crash leaves the old file or the new one."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(dict(data), indent=2, sort_keys=True) + "\n")


def read_manifest(store: str | os.PathLike) -> dict[str, Any]:
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{store}: not a latent store (no {MANIFEST}); build one with "
                         "python -m tools.cache_latents --data TRAIN_ROOT --vq VQ.safetensors --output_path STORE")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path}: not a latent store manifest (format {manifest.get('format')!r})")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {manifest['version']} is newer than this code's "
                         f"({FORMAT_VERSION})")
    return manifest


def items_done(store: str | os.PathLike) -> int:
    """How many items (each with both views) are written; 0 for a store that was only begun."""
    path = Path(store) / PROGRESS
    return int(json.loads(path.read_text())["done"]) if path.is_file() else 0


class LatentStore:
    """Read access to a complete store: ``latents`` [N, 2, C, h, w] and ``labels`` [N, 2, h, w],
    both memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        count = int(self.manifest["count"])
        done = items_done(self.path)
        if done != count:
            raise StoreError(f"{self.path}: incomplete store ({done} of {count} items encoded); run "
                             "`python -m tools.cache_latents` again with the same options to finish it")
        self.latents = np.load(self.path / LATENTS, mmap_mode="r")
        self.labels = np.load(self.path / LABELS, mmap_mode="r")
        shape = self.manifest["latent"]
        expected = (count, len(VIEWS), shape["channels"], shape["height"], shape["width"])
        if self.latents.shape != expected or self.labels.shape != expected[:2] + expected[3:]:
            raise StoreError(f"{self.path}: arrays of shape {self.latents.shape} and {self.labels.shape} do "
                             f"not match the manifest's {expected}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent."""
        return tuple(int(v) for v in self.latents.shape[2:])

    def batch(self, indices: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items ``indices`` in views ``views`` (0 original, 1 flipped), both int [B]:
        (latents float32 [B, C, h, w], labels uint8 [B, h, w])."""
        indices = np.asarray(indices, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        latents = np.stack([self.latents[i, v] for i, v in zip(indices, views)]).astype(np.float32)
        labels = np.stack([self.labels[i, v] for i, v in zip(indices, views)]).astype(np.uint8)
        finite = np.isfinite(latents.reshape(len(latents), -1)).all(axis=1)
        if not finite.all():
            j = int(np.argmin(finite))
            index, view = int(indices[j]), int(views[j])
            raise StoreError(f"{self.path / LATENTS}: the latent of item {index} ({self.item_name(index)!r}, view "
                             f"{VIEWS[view]}) is not finite; rebuild the store with python -m tools.cache_latents")
        return latents, labels

    def item_name(self, index: int) -> str:
        """The photo an item was encoded from (its name without suffix)."""
        names = self.manifest.get("names") or []
        return names[index] if 0 <= index < len(names) else f"#{index}"

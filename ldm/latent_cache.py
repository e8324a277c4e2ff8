"""Encode a training root into the latent store the LDM trains from (``python -m tools.cache_latents``
is the command; the layout is described in ``ldm/latents.py``).

Every photo of TRAIN_ROOT/imgs and its left-right flip go through the autoencoder's encoder (the
pre-quantisation latent, as LDM and IIDM train on); the label map and its flip are resized
(nearest) to the latent size.

Idempotent: run again on a complete store made with the same settings, ``cache_latents`` does
nothing. It refuses to add to a store made with other settings (other images, another autoencoder
file, another size). Interrupted, it resumes from the last finished chunk: the arrays are flushed
before the item count is advanced (atomically), so the count never claims unwritten data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from datasets import TrainingSet, resize_label
from datasets.io import sha256_of
from datasets.landscape import CHALLENGE_HEIGHT, CHALLENGE_WIDTH
from ldm.latents import (FORMAT_NAME, FORMAT_VERSION, LABELS, LATENTS, MANIFEST, PROGRESS, VIEWS, StoreError,
                         items_done, read_manifest, write_json_atomic)
from weights.checkpoint import WeightsError, read_checkpoint

log = logging.getLogger("iidm.cache_latents")

# The fields that must agree before a run may continue or reuse an existing store.
SETTINGS = ("autoencoder_sha256", "image", "latent", "names")


def build_manifest(data_root: Path, dataset: TrainingSet, vq_path: Path, vq_info: dict[str, Any],
                   height: int, width: int) -> dict[str, Any]:
    config = vq_info["config"]["network"]
    factor = 2 ** (len(config["ch_mult"]) - 1)
    for name, size in (("height", height), ("width", width)):
        if size % factor:
            raise StoreError(f"--{name} {size} is not a multiple of the autoencoder's downsampling factor {factor}")
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "autoencoder": {"path": str(vq_path.resolve()), "config": config},
        "autoencoder_sha256": sha256_of(vq_path),
        "image": {"height": height, "width": width},
        "latent": {"channels": int(config["embed_dim"]), "height": height // factor, "width": width // factor},
        "sources": {"root": str(data_root.resolve())},
        "names": list(dataset.names),
        "count": len(dataset),
        "views": list(VIEWS),
        "files": {"latents": LATENTS, "labels": LABELS},
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in SETTINGS:
        if old.get(key) == new.get(key):
            continue
        if key == "names":
            added = sorted(set(new["names"]) - set(old.get("names", [])))
            removed = sorted(set(old.get("names", [])) - set(new["names"]))
            out.append(f"images ({len(added)} added, {len(removed)} removed"
                       + (f", e.g. {(added or removed)[0]}" if added or removed else ", order changed") + ")")
        else:
            out.append(f"{key} ({old.get(key)} in the store, {new.get(key)} requested)")
    return out


def _open_arrays(store: Path, manifest: dict[str, Any], create: bool):
    shape = manifest["latent"]
    count = manifest["count"]
    mode = "w+" if create else "r+"
    latents = np.lib.format.open_memmap(
        store / LATENTS, mode=mode, dtype=np.float32,
        shape=(count, len(VIEWS), shape["channels"], shape["height"], shape["width"]) if create else None)
    labels = np.lib.format.open_memmap(
        store / LABELS, mode=mode, dtype=np.uint8,
        shape=(count, len(VIEWS), shape["height"], shape["width"]) if create else None)
    return latents, labels


def _check_finite(z: np.ndarray, n: int, batch_size: int, start: int, dataset: TrainingSet, store: Path) -> None:
    """Refuse a chunk whose latents (rows [0, n) originals, [batch_size, batch_size + n) flips) are
    not all finite, naming the photo: nothing of the chunk is written, the store stays resumable."""
    for j in range(n):
        for view, row in ((VIEWS[0], j), (VIEWS[1], batch_size + j)):
            if not np.isfinite(z[row]).all():
                raise StoreError(f"{dataset.image_paths[start + j]}: the autoencoder gives a non-finite latent "
                                 f"(item {start + j}, {dataset.names[start + j]!r}, view {view}); {store} keeps "
                                 f"the {start} item(s) before it")


def cache_latents(data_root: str | os.PathLike, vq_path: str | os.PathLike, out: str | os.PathLike,
                  height: int = CHALLENGE_HEIGHT, width: int = CHALLENGE_WIDTH, batch_size: int = 8,
                  progress: bool = True) -> dict[str, Any]:
    """Build or finish the store ``out``; returns {"count", "encoded" (this run), "store"}."""
    import jittor as jt
    from tqdm import tqdm

    from autoencoder.vqmodel import load_vqmodel

    data_root, vq_path, store = Path(data_root), Path(vq_path), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, vq_info = read_checkpoint(vq_path)
    if vq_info["kind"] != "vqmodel":
        raise WeightsError(f"{vq_path}: a {vq_info['kind']!r} checkpoint, expected 'vqmodel'")
    dataset = TrainingSet(data_root, height, width)
    manifest = build_manifest(data_root, dataset, vq_path, vq_info, height, width)

    create = not (store / MANIFEST).exists()
    if create:
        if (store / LATENTS).exists() or (store / LABELS).exists():
            raise StoreError(f"{store}: holds latent arrays but no {MANIFEST}; refusing to overwrite them")
        store.mkdir(parents=True, exist_ok=True)
        write_json_atomic(store / PROGRESS, {"done": 0})
        latents, labels = _open_arrays(store, manifest, create=True)
        write_json_atomic(store / MANIFEST, manifest)
    else:
        differences = _differences(read_manifest(store), manifest)
        if differences:
            raise StoreError(f"{store}: the store was made with other settings: {'; '.join(differences)}. "
                             "It is not appended to or overwritten; choose another --output_path")
        latents, labels = _open_arrays(store, manifest, create=False)

    count, done = manifest["count"], items_done(store)
    if done >= count:
        log.info("%s: complete (%d items); nothing to do", store, count)
        return {"count": count, "encoded": 0, "store": str(store)}
    if done:
        log.info("%s: resuming after %d of %d items", store, done, count)
    model = load_vqmodel(vq_path)
    latent_h, latent_w = manifest["latent"]["height"], manifest["latent"]["width"]
    encoded = 0
    with jt.no_grad(), tqdm(total=count, initial=done, desc="cache latents", disable=not progress) as bar:
        for start in range(done, count, batch_size):
            stop = min(start + batch_size, count)
            samples = [dataset[i] for i in range(start, stop)]
            images = np.stack([s.image for s in samples])
            # Pad the last chunk to the full batch: one batch shape, one set of compiled kernels.
            padded = np.concatenate([images, np.repeat(images[-1:], batch_size - len(samples), axis=0)])
            both = np.concatenate([padded, padded[:, :, ::-1]])      # originals, then their flips
            x = jt.array(both.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
            z = model.encode(x).numpy()
            n = len(samples)
            _check_finite(z, n, batch_size, start, dataset, store)
            latents[start:stop, 0] = z[:n]
            latents[start:stop, 1] = z[batch_size:batch_size + n]
            for j, sample in enumerate(samples):
                label = resize_label(sample.label, latent_h, latent_w)
                labels[start + j, 0] = label
                labels[start + j, 1] = label[:, ::-1]
            latents.flush()
            labels.flush()
            write_json_atomic(store / PROGRESS, {"done": stop})
            encoded += n
            bar.update(n)
    return {"count": count, "encoded": encoded, "store": str(store)}

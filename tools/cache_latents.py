"""Encode a training root into the latent store the LDM trains from (once, before training).

    python -m tools.cache_latents --data TRAIN_ROOT --vq VQ.safetensors --out STORE [--height 384 --width 512]

Every photo of TRAIN_ROOT/imgs and its left-right flip go through the autoencoder's encoder (the
pre-quantisation latent, as LDM and IIDM train on); the label map and its flip are resized
(nearest) to the latent size. The layout is described in ``ldm/latents.py``.

Idempotent: run again on a complete store made with the same settings, it does nothing. It
refuses to add to a store made with other settings (other images, another autoencoder file,
another size): choose another --out. Interrupted, it resumes from the last finished chunk: the
arrays are flushed before the item count is advanced (atomically), so the count never claims
unwritten data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


import cli
import jittor_env
from datasets import DataError, TrainingSet, resize_label
from datasets.landscape import CHALLENGE_HEIGHT, CHALLENGE_WIDTH
from weights.checkpoint import WeightsError, read_checkpoint
from ldm.latents import (FORMAT_NAME, FORMAT_VERSION, LABELS, LATENTS, MANIFEST, PROGRESS, VIEWS,
                         StoreError, items_done, read_manifest, write_json_atomic)

log = logging.getLogger("iidm.cache_latents")

# The fields that must agree before a run may continue or reuse an existing store.
SETTINGS = ("autoencoder_sha256", "image", "latent", "names")


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
                             "It is not appended to or overwritten; choose another --out")
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

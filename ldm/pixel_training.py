"""Pixel-space training of SDM (Wang et al. 2022): the U-Net diffuses photos in [-1, 1] directly,
under the one-hot label plus, for datasets with instances, the instance edge channel.

Same task as the latent one (``ldm.training.LDMTask``: hybrid loss, AdamW, EMA, resume, the
non-finite guard, the shared skeleton), with the batch drawn from photos instead of a latent
store. SDM trains in two phases:

    pretrain   lr 1e-4 (CelebAMask-HQ: 2e-5), mask dropout 0
    fine-tune  lr 2e-5, mask dropout 0.2 (the whole mask, edge channel included, zeroed per sample),
               starting from the pretrained weights

``train.py sdm --phase pretrain|finetune`` sets those two options (``PHASES``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)

from datasets.classes import colorize
from datasets.sdm import SDMFolder, sdm_mask
from datasets.sdm import random_crop as crop_view
from training.loop import batch_indices, run, step_rng
from training.state import save_grid, to_uint8
from weights.checkpoint import diffusion_section
from .guidance import drop_masks
from .training import Batch, LDMTask, TrainConfig

log = logging.getLogger("iidm.ldm.pixel")

# SDM's two phases (its training scripts): options a phase sets unless given explicitly.
PHASES: dict[str, dict[str, float]] = {
    "pretrain": {"lr": 1e-4, "mask_dropout": 0.0},
    "finetune": {"lr": 2e-5, "mask_dropout": 0.2},
}


class PixelStore:
    """Training items of an ``SDMFolder``: photos as float32 [-1, 1] and their masks.

    Without ``random_crop`` an item is the folder's photo at the folder's size, in two views (0 as
    stored, 1 mirrored left-right); with it (square sizes only) each draw is SDM's random crop of
    the full-size photo, then the view. Masks are built per batch from the label (and instance)
    maps; items are read once and kept in memory while ``cache_bytes`` allows."""

    def __init__(self, folder: SDMFolder, random_crop: bool = False, cache_bytes: int = 8 << 30):
        if random_crop and folder.height != folder.width:
            raise ValueError(f"random crops are square (SDM crops only its square datasets); the size is "
                             f"{folder.height}x{folder.width}")
        self.folder = folder
        self.random_crop = random_crop
        self.path = folder.root
        self.manifest = {"dataset": folder.dataset.name}
        self.cache_bytes = cache_bytes
        self._cached = 0
        self._items: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.folder)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3, self.folder.height, self.folder.width)

    def _item(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(photo uint8, label int64, instance int64 or None): full size for crops, else the folder's."""
        if index in self._items:
            return self._items[index]
        full = self.random_crop
        label, instance = self.folder.label(index, full)
        item = (self.folder.photo(index, full), label, instance)
        size = sum(a.nbytes for a in {id(a): a for a in item if a is not None}.values())   # CelebA: instance is label
        if self._cached + size <= self.cache_bytes:
            self._items[index] = item
            self._cached += size
        return item

    def batch(self, indices: np.ndarray, views: np.ndarray, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(photos float32 [B, 3, H, W] in [-1, 1], masks float32 [B, K, H, W], labels int64 [B, H, W]);
        ``rng`` draws the random crops (required with ``random_crop``)."""
        if self.random_crop and rng is None:
            raise ValueError("random crops need a generator")
        images, masks, labels = [], [], []
        for index, view in zip(np.asarray(indices), np.asarray(views)):
            image, label, instance = self._item(int(index))
            if self.random_crop:
                image, label, instance = crop_view(image, label, instance, self.folder.height, rng)
            if view:
                image, label = image[:, ::-1], label[:, ::-1]
                instance = None if instance is None else instance[:, ::-1]
            images.append(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
            masks.append(sdm_mask(label, instance, self.folder.dataset))
            labels.append(label)
        return np.stack(images), np.stack(masks), np.stack(labels)


# Salt of the crop draws: a generator of their own, so runs without crops draw exactly as before.
CROP_SALT = 7


def draw_pixel_batch(store: PixelStore, config: TrainConfig, step: int) -> Batch:
    """Step ``step``'s batch, every draw from generators seeded by (seed, step): items, views,
    t uniform on [0, T), noise, the per-sample mask dropout, and (their own) the random crops."""
    rng = step_rng(config.seed, step)
    b = config.batch_size
    indices = batch_indices(config.seed, step, b, len(store))
    views = rng.integers(0, 2, size=b) if config.flip else np.zeros(b, dtype=np.int64)
    crops = step_rng(config.seed, step, CROP_SALT) if store.random_crop else None
    images, masks, labels = store.batch(indices, views, crops)
    t = rng.integers(0, config.schedule.num_timesteps, size=b).astype(np.int32)
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    dropped = drop_masks(masks, config.mask_dropout, rng)
    kept = dropped.reshape(b, -1).any(axis=1)
    return Batch(images, dropped, labels, t, noise, kept)


class PixelTask(LDMTask):
    """``LDMTask`` on photos: pixel-space diffusion, masks with the dataset's edge channel."""

    name = "sdm"

    def __init__(self, unet, store: PixelStore, config: TrainConfig):
        if config.latent_scale != 1.0:
            raise ValueError("pixel-space training has no latent scale")
        channels = store.folder.dataset.mask_channels
        if unet.config.num_classes != channels:
            raise ValueError(f"the network takes {unet.config.num_classes} mask channels, the "
                             f"{store.folder.dataset.name} masks have {channels}")
        super().__init__(unet, store, config, decode=lambda x: x)

    def draw(self, step: int) -> Batch:
        return draw_pixel_batch(self.store, self.cfg, step)

    def config(self) -> dict[str, Any]:
        folder = self.store.folder
        return {"network": self.unet.config.to_dict(),
                "diffusion": diffusion_section(dataclasses.asdict(self.cfg.schedule), "pixel"),
                "train": self.cfg.to_dict(), "data": str(folder.root), "dataset": folder.dataset.name,
                "size": {"height": folder.height, "width": folder.width}, "random_crop": self.store.random_crop}

    def write_samples(self, path: Path, step: int) -> None:
        """A PNG grid: masks (landscape colours, else the label scaled to grey), the photos, and
        DDIM samples (``sample_steps`` steps, no guidance) under those masks."""
        config, store = self.cfg, self.store
        count = min(config.sample_count, len(store))
        # The same items (and crops) at every step, so the grids compare.
        images, masks, labels = store.batch(np.arange(count), np.zeros(count, dtype=np.int64),
                                            step_rng(config.seed, 0, CROP_SALT))
        sample = self.sample_ddim(masks, images.shape, clip_denoised=True)
        save_grid(path, [label_picture(labels, store.folder.dataset), to_uint8(images), to_uint8(sample.numpy())])


def label_picture(labels: np.ndarray, dataset) -> np.ndarray:
    """Label maps [B, H, W] as RGB uint8: the landscape palette, else grey levels by class."""
    if dataset.name == "landscape":
        return np.stack([np.asarray(colorize(label.astype(np.uint8))) for label in labels])
    grey = (labels * (255 // max(dataset.num_classes - 1, 1))).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def train(unet, folder: SDMFolder, out_dir: str | os.PathLike, config: TrainConfig, *, resume: bool = False,
          random_crop: bool = False, progress: bool = True, step_hook: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``unet`` on the photos of ``folder`` until ``config.max_steps`` (the shared skeleton:
    checkpoints, exact resume); returns {"step", "updates", "bad_steps", "checkpoint", "first", "last"}."""
    task = PixelTask(unet, PixelStore(folder, random_crop), config)
    log.info("SDM training on %d %s photos of %dx%d (%s), batch %d, lr %.3g, mask dropout %.2f, to step %d",
             len(folder), folder.dataset.name, folder.height, folder.width,
             "random crops" if random_crop else "resized", config.batch_size, config.lr, config.mask_dropout,
             config.max_steps)
    unet.train()
    result = run(task, out_dir, config.loop(), resume=resume, progress=progress, step_hook=step_hook)
    return {"step": result.step, "updates": task.updates, "bad_steps": result.bad_steps,
            "checkpoint": result.checkpoint, "first": result.first, "last": result.last}

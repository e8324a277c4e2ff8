"""The generation API: the networks loaded once, and IIDM's rounds run on batches of label maps
and style references.

    from synthesis import Generator
    generator = Generator(["unet.safetensors"], "vq.safetensors")        # several U-Nets: averaged
    rounds = generator.rounds("fast")                                     # or "iidm", "fastest", ...
    images = generator.generate(labels, references, seeds=[1, 2], rounds=rounds)[-1]

``labels`` are uint8 [B, H, W] class maps and ``references`` RGB uint8 [B, H, W, 3] photos at the
generation size (a multiple of ``generator.multiple``); the result is each round's RGB uint8
[B, H, W, 3]. Everything the pipeline needs comes from the checkpoints: the U-Net's architecture,
its noise schedule and latent scale (LDM's scale_factor), and the autoencoder.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from datasets import NUM_CLASSES, one_hot
from datasets.transforms import resize_label
from weights.average import average_checkpoints
from weights.checkpoint import CHECKPOINT_VERSION, WEIGHT_SETS, Checkpoint, WeightsError

log = logging.getLogger("iidm.synthesis")

Path = str | os.PathLike


class Generator:
    """The U-Net (weights averaged over ``checkpoints``), the autoencoder and the schedule."""

    def __init__(self, checkpoints: Sequence[Path], vq_path: Path, which: str = "ema"):
        import jittor as jt

        from autoencoder.vqmodel import load_vqmodel
        from ldm.schedule import ScheduleConfig, make_schedule
        from models import load_unet

        if which not in WEIGHT_SETS:
            raise ValueError(f"which must be one of {WEIGHT_SETS}, got {which!r}")
        if not checkpoints:
            raise ValueError("Generator needs at least one U-Net checkpoint")
        self.jt = jt
        self.sources = [str(p) for p in checkpoints]
        source = ", ".join(self.sources)
        arrays, info = average_checkpoints(checkpoints, which=which)
        if info["kind"] != "unet":
            raise WeightsError(f"{checkpoints[0]}: a {info['kind']!r} checkpoint, expected a U-Net ('unet')")
        averaged = Checkpoint(source, "unet", False, CHECKPOINT_VERSION, info["config"], info["extra"], arrays)
        diffusion = averaged.diffusion
        if diffusion["space"] != "latent":
            raise WeightsError(f"{source}: a pixel-space U-Net; IIDM generates in the autoencoder's latent space")
        latent_scale = diffusion["latent_scale"]
        schedule = make_schedule(ScheduleConfig(**diffusion["schedule"]))
        unet, _ = load_unet(averaged)
        vq = load_vqmodel(vq_path)
        config = unet.config
        if config.num_classes != NUM_CLASSES:
            raise WeightsError(f"{checkpoints[0]}: the U-Net takes {config.num_classes} mask channels, "
                               f"the landscape data has {NUM_CLASSES} classes")
        if config.in_channels != vq.config.embed_dim:
            raise WeightsError(f"{checkpoints[0]} takes {config.in_channels}-channel latents but "
                               f"{vq_path} makes {vq.config.embed_dim}-channel ones")
        self._hold(unet, vq, schedule, latent_scale)
        self.vq_path = str(vq_path)

    @classmethod
    def from_networks(cls, unet, vq, schedule, latent_scale: float = 1.0) -> Generator:
        """A generator around networks already built (benchmarks, tests): ``unet(x_t, t, mask)``, a
        U-Net or a stand-in function, and ``vq``, an autoencoder (``encode``, ``decode``,
        ``config.factor``). Nothing is read from a file or checked against the landscape data."""
        import jittor as jt

        generator = cls.__new__(cls)
        generator.jt = jt
        generator.sources = []
        generator.vq_path = None
        generator._hold(unet, vq, schedule, latent_scale)
        return generator

    def _hold(self, unet, vq, schedule, latent_scale: float) -> None:
        self.unet, self.vq, self.schedule, self.latent_scale = unet, vq, schedule, latent_scale
        self.factor = vq.config.factor
        # A stand-in function (tests) puts no constraint of its own on the latent's size.
        config = getattr(unet, "config", None)
        self.multiple = self.factor * (config.downsample_factor if config is not None else 1)

    # ----------------------------------------------------------------------------- the stages
    def encode(self, images: np.ndarray):
        """RGB uint8 [B, H, W, 3] -> latent [B, C, H/f, W/f] (pixels mapped to [-1, 1]), times the
        checkpoint's latent scale."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        with self.jt.no_grad():
            latent = self.vq.encode(self.jt.array(x))
            return latent if self.latent_scale == 1.0 else latent * self.latent_scale

    def decode(self, latent) -> np.ndarray:
        """Latent -> RGB uint8 [B, H, W, 3]: (x + 1) * 127.5 clipped and truncated to uint8, as
        guided-diffusion's and LDM's sampling scripts convert."""
        with self.jt.no_grad():
            if self.latent_scale != 1.0:
                latent = latent / self.latent_scale
            image = self.vq.decode(latent).numpy()
        return np.clip((image + 1.0) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def masks(self, labels: np.ndarray) -> np.ndarray:
        """Label maps uint8 [B, H, W] -> one-hot float32 [B, 29, H/f, W/f] (nearest downsampling)."""
        height, width = labels.shape[1] // self.factor, labels.shape[2] // self.factor
        return np.stack([one_hot(resize_label(label, height, width)) for label in labels])

    def size_problem(self, height: int, width: int) -> str | None:
        """Why (height, width) cannot be generated, or None."""
        if height % self.multiple or width % self.multiple:
            return (f"size {height}x{width} (height x width) is not a multiple of {self.multiple}, "
                    "which this model needs")
        return None

    # ----------------------------------------------------------------------------- the rounds
    def rounds(self, preset: str, steps=None):
        """The rounds of a named pipeline preset for this model's schedule (``ldm.pipeline``)."""
        from ldm import pipeline

        return pipeline.preset_rounds(preset, self.schedule, steps)

    def generate(self, labels: np.ndarray, references: np.ndarray, seeds: Sequence[int], rounds,
                 on_round: Callable[[int, np.ndarray, float], None] | None = None,
                 on_step: Callable[[], None] | None = None) -> list[np.ndarray]:
        """Run ``rounds`` on one batch: labels uint8 [B, H, W], references RGB uint8 [B, H, W, 3],
        one seed per image (``ldm.pipeline.image_seed``). Returns each round's images;
        ``on_round(index, images, seconds)`` is called after each round, ``on_step()`` at each
        U-Net call (one per sampler step: the guided pair runs as one batch)."""
        from ldm import pipeline
        from synthesis.color_transfer import color_transfer

        labels = np.asarray(labels)
        if labels.ndim != 3 or labels.dtype != np.uint8:
            raise ValueError(f"labels must be uint8 [B, H, W], got {labels.dtype} {labels.shape}")
        problem = self.size_problem(*labels.shape[1:])
        if problem:
            raise ValueError(problem)
        started = [time.perf_counter()]

        def timed(index: int, images: np.ndarray) -> None:
            now = time.perf_counter()
            if on_round is not None:
                on_round(index, images, now - started[0])
            started[0] = now

        unet = self.unet if on_step is None else _announced(self.unet, on_step)
        return pipeline.run_rounds(rounds, self.schedule, unet=unet, encode=self.encode, decode=self.decode,
                                   color_transfer=color_transfer, masks=self.masks(labels),
                                   references=references, seeds=seeds, on_round=timed)


def _announced(unet, on_step: Callable[[], None]):
    """``unet`` calling ``on_step()`` before each evaluation."""

    def call(x_t, t, mask):
        on_step()
        return unet(x_t, t, mask)

    return call

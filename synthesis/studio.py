"""One-image generation for an interactive front end (``app.py``): a ``Generator`` loaded once,
the style references of a training folder, and a call that turns a label map and a reference
into the output and its rounds, reporting progress at every sampler step.

    studio = Studio.load([unet], vq, img_root, size=(96, 128))
    picture = studio.generate(label, studio.reference("00001.jpg"), Settings("fast", seed=3),
                              progress=lambda round_index, rounds, step, steps: ...)

Sizes are treated as ``infer.py --mask ... --size HEIGHTxWIDTH`` treats them: the label map is
resized (nearest) and the reference (bicubic) to the generation size, and the output is resized
back to the label map's size. The image's noise comes from (seed, ``NAME``), as for a mask file
``NAME.png`` in ``infer.py``, so ``Picture.command`` reproduces an output from the saved label map.
Calls are serialised (one generation at a time); the networks are not re-entrant.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from datasets import DataError, load_image, validate_label
from datasets.io import IMAGE_SUFFIXES
from datasets.landscape import find_image_folder
from datasets.transforms import resize_image, resize_label

log = logging.getLogger("iidm.studio")

NAME = "canvas"  # the image's name for its seed, and the stem of the files it is saved as
# progress(round_index, num_rounds, step, steps_in_round), step counting from 1
Progress = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class Settings:
    """What a user chooses: the pipeline preset, the seed, and optionally one guidance scale for
    every round (None keeps the preset's) and solver steps (None keeps the preset's)."""

    preset: str = "fast"
    seed: int = 0
    guidance: float | None = None
    steps: int | tuple[int, ...] | None = None


@dataclass(frozen=True)
class Picture:
    """A generation: the output and each round's image (RGB uint8 at the label map's size), the
    label map used, notes on what was resized, the time taken and the equivalent command."""

    output: np.ndarray
    rounds: list[np.ndarray]
    label: np.ndarray
    notes: list[str]
    seconds: float
    command: str | None


class Studio:
    """The networks, the references folder and the generation size (height, width)."""

    def __init__(self, generator, img_root: str | os.PathLike | None, size: tuple[int, int],
                 model_args: Sequence[str] = ()):
        problem = generator.size_problem(*size)
        if problem:
            raise ValueError(problem)
        self.generator = generator
        self.height, self.width = size
        self.folder = find_image_folder(img_root) if img_root is not None else None
        self.model_args = list(model_args)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, checkpoints: Sequence[str | os.PathLike], vq_path: str | os.PathLike,
             img_root: str | os.PathLike | None, size: tuple[int, int], which: str = "ema",
             model_args: Sequence[str] = ()) -> "Studio":
        from synthesis.generator import Generator

        return cls(Generator(checkpoints, vq_path, which), img_root, size, model_args)

    # ------------------------------------------------------------------------------ references
    def reference_names(self) -> list[str]:
        """The photos of the references folder, sorted."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))

    def reference_path(self, name: str) -> Path:
        """The file of a listed reference; a name that is not listed (another folder, ``..``) is refused."""
        if name not in self.reference_names():
            raise DataError(f"{name!r}: not a photo of the references folder {self.folder}")
        return self.folder / name

    def reference(self, name: str) -> np.ndarray:
        """A listed reference photo, RGB uint8 [H, W, 3]."""
        return load_image(self.reference_path(name))

    # ------------------------------------------------------------------------------ generation
    def rounds(self, settings: Settings):
        """The preset's rounds, with ``settings.guidance`` in every round when given."""
        rounds = self.generator.rounds(settings.preset, settings.steps)
        if settings.guidance is None:
            return rounds
        if not settings.guidance >= 1.0:
            raise ValueError(f"the guidance scale must be >= 1 (1: no guidance), got {settings.guidance}")
        return tuple(dataclasses.replace(r, guidance_scale=float(settings.guidance)) for r in rounds)

    def generate(self, label: np.ndarray, reference: np.ndarray, settings: Settings,
                 progress: Progress | None = None, reference_file: str | None = None) -> Picture:
        """Generate from a label map uint8 [H, W] and a reference RGB uint8 [h, w, 3] (any sizes).
        ``reference_file`` names the reference in ``Picture.command``."""
        from ldm.pipeline import image_seed

        label = validate_label(np.asarray(label), "label map")
        if label.ndim != 2 or label.dtype != np.uint8:
            raise DataError(f"label map: expected uint8 [H, W] class indices, got {label.dtype} {label.shape}")
        reference = np.asarray(reference)
        if reference.dtype != np.uint8 or reference.ndim != 3 or reference.shape[2] != 3:
            raise DataError(f"reference: expected RGB uint8 [H, W, 3], got {reference.dtype} {reference.shape}")
        rounds = self.rounds(settings)
        notes = []
        size = (self.height, self.width)
        if label.shape != size:
            notes.append(f"label map {label.shape[0]}x{label.shape[1]} generated at {self.height}x{self.width} "
                         "(height x width; nearest) and the output resized back")
        if reference.shape[:2] != size:
            notes.append(f"reference {reference.shape[0]}x{reference.shape[1]} resized to "
                         f"{self.height}x{self.width} (bicubic)")
        small_label = resize_label(label, *size)[None]
        small_reference = resize_image(reference, *size)[None]
        steps = [r.stage.num_steps for r in rounds]
        state = {"round": 0, "step": 0}

        def on_step() -> None:
            state["step"] += 1
            if progress is not None:
                index = state["round"]
                progress(index, len(rounds), min(state["step"], steps[index]), steps[index])

        def on_round(index: int, images: np.ndarray, seconds: float) -> None:
            log.info("round %d: %.1f s", index, seconds)
            state["round"], state["step"] = min(index + 1, len(rounds) - 1), 0

        with self._lock:
            started = time.perf_counter()
            outputs = self.generator.generate(small_label, small_reference, [image_seed(settings.seed, NAME)],
                                              rounds, on_round=on_round, on_step=on_step)
            seconds = time.perf_counter() - started
        images = [resize_image(images[0], *label.shape) for images in outputs]
        return Picture(images[-1], images, label, notes, seconds, self.command(settings, reference_file))

    def command(self, settings: Settings, reference_file: str | None) -> str | None:
        """The ``infer.py`` call that makes the same output from the saved label map (``NAME.png``),
        or None when the settings have no command-line equivalent (a guidance override)."""
        if settings.guidance is not None:
            return None
        args = ["python", "infer.py", "--mask", f"{NAME}.png", "--ref", reference_file or "REFERENCE",
                "--output_path", f"{NAME}.jpg", "--preset", settings.preset, "--seed", str(settings.seed),
                "--size", f"{self.height}x{self.width}"]
        if settings.steps is not None:
            steps = settings.steps if isinstance(settings.steps, tuple) else (settings.steps,)
            args += ["--steps", ",".join(str(s) for s in steps)]
        return shlex.join(args + self.model_args)

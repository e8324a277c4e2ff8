"""Batch generation of a test folder: jobs, MPI shards, loading, and outputs written atomically.

Each mask becomes a ``Job`` (its output ``OUT/MASK.jpg``); jobs whose output exists are skipped
by the caller, so a killed run restarts where it stopped. ``generate_jobs`` loads each job's files
(a bad label, a missing or unreadable reference, a size the model cannot take becomes a failure
naming the file, and the others go on), groups images of one size into batches, runs the rounds
and writes each output atomically. Each image's noise comes from (seed, its name), so its output
does not depend on the batch size, the order or the number of processes. A full disk stops the
run (the remaining jobs are reported as not generated) instead of failing image after image.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from datasets import NUM_CLASSES, DataError, load_image, load_label, save_image
from datasets.landscape import test_entries
from datasets.transforms import resize_image, resize_label

log = logging.getLogger("iidm.synthesis")

QUALITY = {"iidm": 75}  # the official submission wrote PIL's default JPEG quality; others 95
DEFAULT_QUALITY = 95


def output_quality(preset: str) -> int:
    """The JPEG quality of a pipeline preset's outputs (``QUALITY``, else ``DEFAULT_QUALITY``)."""
    return QUALITY.get(preset, DEFAULT_QUALITY)


@dataclass(frozen=True)
class Job:
    """One image to generate: its name (the mask's basename), files and output path; ``error``
    is set when the job is known to fail before any work (e.g. no reference given)."""

    name: str
    mask_path: Path
    reference_path: Path | None
    output: Path
    error: str | None = None


def list_jobs(mask_dir: Path, img_root: Path, output_dir: Path, mapping_file: Path | None = None) -> list[Job]:
    """Every ``MASK.png`` of ``mask_dir``, sorted by name, with its reference from the mapping.

    A missing mapping file or masks folder is an error for the whole run; a mask without a
    reference entry, or whose reference is absent or outside the reference folder, becomes a
    failed job."""
    return [Job(entry.name, entry.mask_path, entry.reference_path, Path(output_dir) / f"{entry.name}.jpg",
                entry.problem)
            for entry in test_entries(mask_dir, img_root, mapping_file)]


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of process ``rank`` out of ``world_size``: those with index % world_size == rank,
    so the shards of all ranks cover every item exactly once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"HEIGHTxWIDTH" -> (height, width)."""
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HEIGHTxWIDTH, e.g. 384x512, got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"--size must be positive, got {text!r}")
    return height, width


@dataclass(frozen=True)
class Item:
    """A loaded job: label uint8 [h, w] and reference uint8 [h, w, 3] at the generation size,
    and the mask's own (height, width) for the output."""

    job: Job
    label: np.ndarray
    reference: np.ndarray
    out_height: int
    out_width: int


def load_item(job: Job, size: tuple[int, int] | None, size_problem: Callable[[int, int], str | None]) -> Item:
    """Read and check one job's files; DataError names the file and what was expected."""
    if job.error:
        raise DataError(job.error)
    label = load_label(job.mask_path, NUM_CLASSES)
    out_height, out_width = label.shape
    height, width = size or (out_height, out_width)
    problem = size_problem(height, width)
    if problem:
        hint = "" if size else "; pass --size HEIGHTxWIDTH to generate at another size"
        raise DataError(f"{job.mask_path}: {problem}{hint}")
    label = resize_label(label, height, width)
    reference = load_image(job.reference_path)
    if reference.shape[:2] != (height, width):
        log.info("%s: reference %dx%d resized to %dx%d (height x width)", job.reference_path,
                 *reference.shape[:2], height, width)
        reference = resize_image(reference, height, width)
    return Item(job, label, reference, out_height, out_width)


@dataclass
class BatchReport:
    """What a batch run did: images written, skipped (already present), failures (name, message)
    and time spent generating."""

    done: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stopped: str | None = None   # why the run stopped early (a full disk)

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.done / self.seconds if self.seconds > 0 else 0.0


def _save(item: Item, image: np.ndarray, path: Path, quality: int) -> None:
    if image.shape[:2] != (item.out_height, item.out_width):
        image = resize_image(image, item.out_height, item.out_width)
    save_image(path, image, quality=quality)


class DiskFull(OSError):
    pass


def generate_jobs(jobs: Sequence[Job], generator, rounds, *, batch_size: int, seed: int, quality: int,
                  size: tuple[int, int] | None = None, save_rounds: bool = False,
                  show_progress: bool = True) -> BatchReport:
    """Generate ``jobs`` with ``generator`` (a ``synthesis.Generator``) in batches of images of one
    size; failures are collected, not raised. Logs each round's time and each batch's rate."""
    from tqdm import tqdm

    from ldm.pipeline import image_seed
    from synthesis.gallery import round_path

    report = BatchReport()
    start = time.perf_counter()
    buckets: dict[tuple[int, int], list[Item]] = {}
    progress = tqdm(total=len(jobs), unit="img", desc="infer", disable=not show_progress)

    def write(item: Item, image: np.ndarray, path: Path) -> None:
        try:
            _save(item, image, path, quality)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(exc.errno, f"{path}: the disk is full ({exc.strerror})") from None
            raise

    def run(batch: list[Item]) -> None:
        names = [item.job.name for item in batch]
        batch_start = time.perf_counter()

        def on_round(index: int, images: np.ndarray, seconds: float) -> None:
            log.info("round %d: %.1f s for %d image(s) of %dx%d", index, seconds, len(batch), *images.shape[1:3])
            if save_rounds:
                for item, image in zip(batch, images):
                    write(item, image, round_path(item.job.output.parent, item.job.output.stem, index))

        written = 0
        try:
            outputs = generator.generate(np.stack([i.label for i in batch]), np.stack([i.reference for i in batch]),
                                         [image_seed(seed, name) for name in names], rounds, on_round=on_round)
            for item, image in zip(batch, outputs[-1]):
                try:
                    write(item, image, item.job.output)
                    report.done += 1
                except DiskFull:
                    raise
                except OSError as exc:
                    report.failures.append((item.job.name, f"{item.job.output}: cannot be written ({exc})"))
                written += 1
        except DiskFull:
            report.failures.extend((name, "not generated: the disk is full") for name in names[written:])
            raise
        except (ValueError, RuntimeError, OSError) as exc:
            report.failures.extend((name, f"generation failed: {exc}") for name in names)
            outputs = None
        seconds = time.perf_counter() - batch_start
        if outputs:
            log.info("batch of %d: %.1f s (%.1f images per minute)", len(batch), seconds, 60.0 * len(batch) / seconds)
        progress.update(len(batch))

    pending = list(jobs)
    try:
        while pending:
            job = pending.pop(0)
            try:
                item = load_item(job, size, generator.size_problem)
            except (DataError, OSError) as exc:
                report.failures.append((job.name, str(exc)))
                progress.update(1)
                continue
            bucket = buckets.setdefault(item.label.shape, [])
            bucket.append(item)
            if len(bucket) == batch_size:
                run(buckets.pop(item.label.shape))
        for shape in list(buckets):
            run(buckets.pop(shape))
    except DiskFull as exc:
        left = [item.job.name for bucket in buckets.values() for item in bucket] + [job.name for job in pending]
        report.stopped = f"{exc.strerror}; stopped with {len(left)} image(s) not generated"
        report.failures.extend((name, "not generated: the disk is full") for name in left)
    finally:
        progress.close()
    report.seconds = time.perf_counter() - start
    return report

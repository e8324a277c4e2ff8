"""Reading and writing the challenge's files: RGB photos (JPEG) and 8-bit grey label maps (PNG).

Readers validate and name the file in every error; writers are atomic (temporary file in the
same folder, then rename) so a killed run never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.classes import NUM_CLASSES
from datasets.labels import DataError, validate_label

log = logging.getLogger("iidm.datasets")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("L", "P")  # 8-bit grey; palette PNGs store the class index as the pixel value


def open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({exc})") from None
    return image


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Photo -> RGB uint8 [H, W, 3]. Greyscale and other modes are converted, with a log line."""
    path = Path(path)
    image = open_image(path)
    if image.mode != "RGB":
        kind = "greyscale" if image.mode in ("L", "LA", "1", "I", "I;16", "F") else image.mode
        log.info("%s: %s photo converted to RGB", path, kind)
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def load_label(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Label map -> uint8 [H, W] of class indices, validated to lie in 0..num_classes-1."""
    path = Path(path)
    image = open_image(path)
    if image.mode not in LABEL_MODES:
        raise DataError(
            f"{path}: a label map must be an 8-bit greyscale PNG (mode L) holding class indices "
            f"0..{num_classes - 1}, got mode {image.mode}")
    label = np.asarray(image, dtype=np.uint8).copy()
    return validate_label(label, source=str(path), num_classes=num_classes)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Write ``path`` through a temporary file beside it: on success the file is flushed, synced
    and renamed onto ``path``, so readers (and a crash) see the old file or the new one, never a
    part; on an error the temporary file is removed and ``path`` is left as it was.

        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # A failed write (a full disk) names no file: name the one being written.
            raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from exc
        raise


TEMPORARIES = ".*.tmp"    # atomic_write's temporary files: .NAME.XXXXXXXX.tmp


def temporaries_of(name: str) -> str:
    """The glob of ``atomic_write``'s temporary files for a file called ``name``."""
    return f".{glob.escape(name)}.*.tmp"


def remove_stale_temporaries(folder: str | os.PathLike, older_than: float | None = None,
                             pattern: str = TEMPORARIES) -> int:
    """Delete the files matching ``pattern`` (by default every temporary file of ``atomic_write``)
    that writes killed midway left in ``folder``; returns how many. With ``older_than`` (a
    ``time.time()`` value) only files last modified before it go, so the writes under way in other
    processes of the same run (MPI ranks that started at that time) keep theirs."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for path in folder.glob(pattern):
        try:
            if older_than is not None and path.stat().st_mtime >= older_than:
                continue
            path.unlink()
            removed += 1
        except OSError:      # gone already (another process removed it) or not ours to remove
            pass
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted write", folder, removed)
    return removed


def _atomic_save(image: Image.Image, path: Path, **params) -> None:
    with atomic_write(path) as f:
        image.save(f, format=params.pop("format"), **params)


def save_image(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> None:
    """Write an RGB uint8 [H, W, 3] photo atomically; JPEG (``quality``) or PNG by suffix."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path}: expected an RGB uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    params = {"quality": quality} if fmt == "JPEG" else {}
    _atomic_save(Image.fromarray(image, "RGB"), path, format=fmt, **params)


def save_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a label map [H, W] of class indices atomically as an 8-bit greyscale PNG."""
    path = Path(path)
    label = validate_label(np.asarray(label), source=str(path), num_classes=256)
    if label.ndim != 2:
        raise ValueError(f"{path}: expected a label map [H, W], got shape {label.shape}")
    _atomic_save(Image.fromarray(label.astype(np.uint8), "L"), path, format="PNG")


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content, read in chunks (a weights file is not held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

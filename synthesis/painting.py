"""Painted and uploaded label maps: colours to classes, the palette and the checks an upload gets.

A painted canvas is an RGBA picture in the class palette (``datasets.PALETTE``). Brush edges are
anti-aliased and an uploaded picture may use any colours, so every pixel is snapped to the class
whose palette colour is nearest (Euclidean distance in RGB), and the caller is told how many were
off the palette. Erased pixels (alpha below half) become the class "other": the eraser paints
"other". An uploaded file is either a label map (8-bit grey or palette PNG holding class indices
0..28, read as ``infer.py`` reads masks) or a colour picture of one (snapped); anything larger than
``MAX_PIXELS`` is refused before it is decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets import CLASS_INDEX, NUM_CLASSES, PALETTE, DataError, colorize

OTHER = CLASS_INDEX["other"]
MAX_PIXELS = 4096 * 4096  # larger uploads are refused (a label map is at most a few megapixels)
OPAQUE = 128              # alpha at or above this is paint; below it, erased


@dataclass(frozen=True)
class Snapped:
    """A label map uint8 [H, W] read from colours, and how many pixels needed help: ``off_palette``
    had a colour no class has (snapped to the nearest), ``erased`` were transparent ("other")."""

    label: np.ndarray
    off_palette: int = 0
    erased: int = 0

    def note(self) -> str:
        """One line for the user, empty when every pixel was a palette colour."""
        total = self.label.size
        parts = []
        if self.off_palette:
            parts.append(f"{_share(self.off_palette, total)} of the pixels were off the class palette "
                         "and were snapped to the nearest class colour")
        if self.erased:
            parts.append(f"{_share(self.erased, total)} were erased or transparent and became \"other\"")
        return "; ".join(parts)


def _share(count: int, total: int) -> str:
    percent = 100.0 * count / total
    shown = f"{percent:.1f}%" if percent >= 0.1 else "<0.1%"
    return f"{count} ({shown})"


def snap_to_palette(image: np.ndarray) -> Snapped:
    """RGB or RGBA uint8 [H, W, 3|4] (or grey [H, W]) -> the nearest class of every pixel.

    Each distinct colour is matched once (squared RGB distance to the 29 palette colours; ties go
    to the lower class index); pixels with alpha < 128 are "other"."""
    image = _rgba(image)
    rgb = image[..., :3]
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed.ravel(), return_inverse=True)
    unique_rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1)
    distance = ((unique_rgb[:, None, :] - PALETTE[None, :, :].astype(np.int64)) ** 2).sum(axis=2)
    nearest = distance.argmin(axis=1).astype(np.uint8)
    exact = distance.min(axis=1) == 0
    label = nearest[inverse].reshape(packed.shape)
    off = ~exact[inverse].reshape(packed.shape)
    erased = image[..., 3] < OPAQUE
    label[erased] = OTHER
    return Snapped(label, int((off & ~erased).sum()), int(erased.sum()))


def flatten(background: np.ndarray | None, layers: list[np.ndarray], composite: np.ndarray | None = None
            ) -> np.ndarray | None:
    """What an image editor shows: its ``composite`` when it sent one, else the RGBA ``layers``
    (in order) over the ``background`` with the "over" operator, as uint8 RGBA [H, W, 4].
    None when there is nothing at all."""
    if composite is not None:
        return _rgba(composite)
    pictures = [_rgba(p) for p in ([background] if background is not None else []) + list(layers)]
    if not pictures:
        return None
    height, width = pictures[0].shape[:2]
    colour = np.zeros((height, width, 3))
    alpha = np.zeros((height, width, 1))
    for picture in pictures:
        if picture.shape[:2] != (height, width):
            raise ValueError(f"a layer of {picture.shape[1]}x{picture.shape[0]} pixels on a canvas of "
                             f"{width}x{height}")
        a = picture[..., 3:] / 255.0
        out_alpha = a + alpha * (1.0 - a)
        colour = np.where(out_alpha > 0, (picture[..., :3] * a + colour * alpha * (1.0 - a))
                          / np.maximum(out_alpha, 1e-12), 0.0)
        alpha = out_alpha
    return np.concatenate([np.round(colour), np.round(alpha * 255.0)], axis=2).astype(np.uint8)


def _rgba(picture: np.ndarray) -> np.ndarray:
    """A uint8 grey [H, W], RGB or RGBA picture as RGBA [H, W, 4] (opaque where it had no alpha)."""
    picture = np.asarray(picture)
    if picture.dtype != np.uint8:
        raise ValueError(f"expected a uint8 picture, got {picture.dtype}")
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    if picture.ndim != 3 or picture.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB or RGBA picture [H, W, 3|4], got shape {picture.shape}")
    if picture.shape[2] == 3:
        picture = np.concatenate([picture, np.full(picture.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return picture


def check_pixels(height: int, width: int, source: str) -> None:
    """Refuse a picture larger than ``MAX_PIXELS``."""
    if height * width > MAX_PIXELS:
        raise DataError(f"{source}: {width}x{height} pixels is too large (at most {MAX_PIXELS // 1_000_000} "
                        "megapixels); resize it first")


def read_label_upload(path: str | os.PathLike, name: str | None = None) -> Snapped:
    """An uploaded label map: class indices (8-bit grey or palette PNG, values 0..28) are taken as
    they are; any other picture (RGB, or grey with values above 28) is snapped to the palette.
    ``name`` is how the file is called in messages (an upload's own name, not its temporary path)."""
    path = Path(path)
    source = name or path.name
    try:
        with Image.open(path) as image:
            check_pixels(image.height, image.width, source)
            image.load()
            mode = image.mode
            if mode in ("L", "P"):
                values = np.asarray(image, dtype=np.uint8).copy()
                if values.max(initial=0) < NUM_CLASSES:
                    return Snapped(values)
                image = image.convert("RGBA" if mode == "P" and "transparency" in image.info else "RGB")
            elif mode not in ("RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in mode else "RGB")
            pixels = np.asarray(image, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{source}: cannot be read as an image ({exc})") from None
    return snap_to_palette(pixels)


def read_photo_upload(image: np.ndarray, source: str = "uploaded photo") -> np.ndarray:
    """An uploaded style reference (as the browser sent it) -> RGB uint8 [H, W, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"{source}: expected an 8-bit picture, got {image.dtype}")
    check_pixels(image.shape[0], image.shape[1], source)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DataError(f"{source}: expected an RGB picture, got shape {image.shape}")
    if image.shape[2] == 4:  # composite over white, as a viewer shows a transparent picture
        alpha = image[..., 3:].astype(np.float32) / 255.0
        return np.round(image[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return image


def painted_picture(label: np.ndarray) -> np.ndarray:
    """A label map as an opaque RGBA picture in the palette (what the canvas starts from)."""
    return _rgba(colorize(label))


def replace_class(label: np.ndarray, where: int, by: int) -> np.ndarray:
    """The fill tool: every pixel of class ``where`` becomes class ``by`` (a new array)."""
    for value in (where, by):
        if not 0 <= value < NUM_CLASSES:
            raise ValueError(f"a class index must be in 0..{NUM_CLASSES - 1}, got {value}")
    filled = np.array(label, dtype=np.uint8, copy=True)
    filled[filled == where] = by
    return filled


def starter_label(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random landscape layout to start painting from (``datasets.synthetic.make_label``)."""
    from datasets.synthetic import make_label

    return make_label(np.random.default_rng([seed, 1]), height, width)


def palette_hex(index: int) -> str:
    """The palette colour of class ``index`` as #rrggbb."""
    r, g, b = (int(v) for v in PALETTE[index])
    return f"#{r:02x}{g:02x}{b:02x}"


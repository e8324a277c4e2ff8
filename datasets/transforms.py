"""Paired transforms: whatever is done to a photo is done to its label map, pixel for pixel.

Photos are resized bicubic and label maps nearest (a label value is a class, never averaged),
both with PIL as SDM's data loader does. Sizes are always (height, width) by name.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [height, width, 3], bicubic."""
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), resample=Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Label map uint8 [H, W] -> [height, width], nearest."""
    if label.shape[:2] == (height, width):
        return label
    resized = Image.fromarray(label).resize((width, height), resample=Image.NEAREST)
    return np.asarray(resized, dtype=label.dtype).copy()


def resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Resize a photo (bicubic) and its label map (nearest) to the same (height, width)."""
    return resize_image(image, height, width), resize_label(label, height, width)


def hflip_pair(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a photo and its label map left-right together."""
    return image[:, ::-1].copy(), label[:, ::-1].copy()

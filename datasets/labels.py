"""Label maps: validation and the one-hot mask the networks consume."""

from __future__ import annotations

import numpy as np

from datasets.classes import NUM_CLASSES


class DataError(ValueError):
    """Bad input data: the message names the file and what was expected."""


def validate_label(label: np.ndarray, source: str = "label", num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Check an integer label map [..., H, W] holds only class indices 0..num_classes-1.

    Raises DataError naming ``source``, every offending value and its pixel count.
    """
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{source}: label map must hold integer class indices, got dtype {label.dtype}")
    if label.ndim < 2:
        raise DataError(f"{source}: label map must be [H, W], got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        values, counts = np.unique(label, return_counts=True)
        bad = [(int(v), int(c)) for v, c in zip(values, counts) if v < 0 or v >= num_classes]
        listed = ", ".join(f"value {v} ({c} pixels)" for v, c in bad[:10])
        more = f" and {len(bad) - 10} more values" if len(bad) > 10 else ""
        raise DataError(
            f"{source}: label values must be class indices 0..{num_classes - 1}; found {listed}{more}")
    return label


def one_hot(label: np.ndarray, num_classes: int = NUM_CLASSES, dtype=np.float32) -> np.ndarray:
    """Integer label map [..., H, W] -> one-hot mask [..., num_classes, H, W].

    This is the only place a label becomes a mask. An all-zero mask is the null (unconditional)
    mask of classifier-free guidance, which no label can produce.
    """
    label = validate_label(label, num_classes=num_classes)
    classes = np.arange(num_classes, dtype=label.dtype).reshape(num_classes, 1, 1)
    return (label[..., None, :, :] == classes).astype(dtype)


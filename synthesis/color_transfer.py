"""Reinhard colour transfer in OpenCV's uint8 Lab, exactly as the official IIDM code does it.

Between refinement rounds IIDM maps each generated image's colour statistics onto its style
reference's (Reinhard et al. 2001, "Color Transfer between Images"): per channel of the uint8
Lab image (OpenCV's 8-bit Lab: L scaled to 0..255, a and b offset by 128),

    out = round((src - mean_src) * std_ref / std_src + mean_ref), clipped to 0..255

with the whole-image means and standard deviations (cv2.meanStdDev, population std) rounded
to 2 decimals first, as the official code does. A channel with std 0 (after rounding) maps to
the reference's mean instead of dividing by zero.

    python -m tools.color_transfer --results OUT --input_path MASKS --img_path TRAIN_ROOT --output_path OUT2
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datasets import DataError, TestSet, load_image, save_image



def lab_statistics(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of a uint8 Lab image [H, W, 3], rounded to 2 decimals."""
    mean, std = cv2.meanStdDev(lab)
    return np.around(mean.reshape(3), 2), np.around(std.reshape(3), 2)


def color_transfer(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map the colours of ``source`` toward ``reference``: both RGB uint8 [H, W, 3] (sizes may
    differ); returns RGB uint8 of the source's size."""
    for name, image in (("source", source), ("reference", reference)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"color_transfer: {name} must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
    source_lab = cv2.cvtColor(source, cv2.COLOR_RGB2LAB)
    reference_lab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB)
    source_mean, source_std = lab_statistics(source_lab)
    reference_mean, reference_std = lab_statistics(reference_lab)
    safe_std = np.where(source_std > 0, source_std, 1.0)
    gain = np.where(source_std > 0, reference_std / safe_std, 0.0)
    out = (source_lab.astype(np.float64) - source_mean) * gain + reference_mean
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)


def transfer_folder(results: Path, mask_dir: Path, img_root: Path, output: Path) -> int:
    """Colour-transfer every ``results/NAME.jpg`` toward the reference its mask names; returns
    the number of images written. A missing result is an error naming it."""
    test_set = TestSet(mask_dir, img_root)
    missing = [f"{name}.jpg" for name in test_set.names if not (results / f"{name}.jpg").is_file()]
    if missing:
        raise DataError(f"{results}: results not found: {', '.join(missing[:10])}"
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    for index, name in enumerate(test_set.names):
        item = test_set[index]
        save_image(output / f"{name}.jpg", color_transfer(load_image(results / f"{name}.jpg"), item.reference))
    return len(test_set)

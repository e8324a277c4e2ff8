"""SDM's evaluation (Wang et al. 2022, sec. 4): FID (scoring/fid.py), mIoU of a segmenter's
prediction on the samples against the input labels, and diversity, the mean pairwise distance
among the samples of one mask (LPIPS in the paper: scoring/lpips_alex.py; the mean absolute
pixel difference here needs no weights and is reported beside it, never instead of it).

mIoU: one confusion matrix C over all pixels of all images (rows: label, columns: prediction),
IoU_c = C_cc / (sum_j C_cj + sum_i C_ic - C_cc) for every class c with a non-empty union, mIoU
their mean; pixels of the ``ignore`` class (a dataset's "other" / "unlabeled") are left out.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


def confusion_matrix(predicted: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore: int | None = None) -> np.ndarray:
    """int64 [K, K] counts of (label, prediction) pairs; shapes must agree."""
    predicted, label = np.asarray(predicted, np.int64), np.asarray(label, np.int64)
    if predicted.shape != label.shape:
        raise ValueError(f"prediction {predicted.shape} and label {label.shape} differ in shape")
    keep = (label >= 0) & (label < num_classes) & (predicted >= 0) & (predicted < num_classes)
    if ignore is not None:
        keep &= label != ignore
    index = label[keep] * num_classes + predicted[keep]
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU over classes with a non-empty union, IoU per class with NaN where the union is empty)."""
    confusion = np.asarray(confusion, np.float64)
    hit = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hit
    iou = np.full(len(hit), np.nan)
    present = union > 0
    iou[present] = hit[present] / union[present]
    return (float(np.mean(iou[present])) if present.any() else float("nan")), iou


def pixel_diversity(samples: Sequence[np.ndarray]) -> float:
    """Mean over sample pairs of the mean absolute difference, in 0..255 (uint8 RGB [H, W, 3] each)."""
    if len(samples) < 2:
        raise ValueError("diversity needs at least 2 samples of the mask")
    return float(np.mean([np.abs(samples[a].astype(np.float64) - samples[b].astype(np.float64)).mean()
                          for a, b in itertools.combinations(range(len(samples)), 2)]))

"""Style similarity S: colour-histogram correlation between a generated image and its reference.

The challenge defines S as the mean over test images of

    S_image = (corr(RGB_out, RGB_ref) + corr(HSV_out, HSV_ref)) / 2

where corr is OpenCV's HISTCMP_CORREL (Pearson correlation of the bin counts) and the two
histograms are computed on images read as OpenCV reads them (``cv2.imread``: BGR uint8):

* joint colour histogram: each channel quantised to 16 levels (value // 16), one bin per
  (B, G, R) triple: index B*256 + G*16 + R, 4096 bins;
* HSV histogram: OpenCV's 8-bit HSV (H = degrees / 2 in 0..179, S and V in 0..255); hue in
  degrees binned (315,20] (20,40] (40,75] (75,155] (155,190] (190,270] (270,295] (295,315] -> 0..7,
  S and V each in 3 bins split at 51 and 178 (20% and 70% of 255), index 9H + 3S + V, 72 bins.

Two modes:

``challenge`` (default) reproduces the organisers' circulating script bit for bit. It does the
index arithmetic in uint8, the images' dtype, which changes the result three ways:

1. ``B * 16 * 16`` wraps to 0 modulo 256, so blue drops out: the "joint" histogram is a G x R
   histogram in bins 0..255 of 4096 (the other 3840 bins are always 0 but still enter the
   correlation's means);
2. ``h = 2 * h`` wraps: hues of 256..358 degrees (OpenCV H >= 128) become 0..102 and land in
   bins 0..3, and bins 6 and 7 ((270,295], (295,315]) can never be hit;
3. ``cv2.calcHist([g], [0], None, [72], [0, 71])``: the range [0, 71) leaves out the value 71
   (the last bin: hue 7, S and V high), which would not be counted at all. After (2) hue bin 7
   cannot occur, so this changes nothing in the script as it stands; it is kept all the same.

``corrected`` does the intended computation: 4096 joint bins over (B, G, R), hue in degrees
without wrap-around, and all 72 HSV values counted.

The script is the one circulating among participants of the third Jittor AI Challenge (landscape
track): ``get_rgb_hist`` / ``getHsvHist`` / ``hist_score_api``, averaged per image as here. It is
reproduced from its text, not imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MODES = ("challenge", "corrected")
DEFAULT_MODE = "challenge"
RGB_LEVELS = 16
RGB_BINS = RGB_LEVELS ** 3            # 4096
HSV_BINS = 72                         # 8 hue x 3 saturation x 3 value
# Upper edges (degrees, inclusive) of hue bins 1..7; bin 0 is (315, 360) and [0, 20].
HUE_UPPER_EDGES = (20, 40, 75, 155, 190, 270, 295, 315)
SV_SPLITS = (51, 178)                 # S, V <= 51 -> 0, <= 178 -> 1, else 2


class ImageReadError(ValueError):
    """An image that OpenCV cannot read."""


def read_bgr(path: str | os.PathLike) -> np.ndarray:
    """Read an image exactly as the challenge script does: ``cv2.imread`` (BGR uint8 [H, W, 3];
    greyscale files are expanded to three equal channels)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"{path}: OpenCV cannot read it as an image")
    return image


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"style similarity mode must be one of {MODES}, got {mode!r}")


def _check_bgr(image: np.ndarray, what: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise ValueError(f"{what}: expected a BGR uint8 [H, W, 3] array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")


def rgb_histogram(bgr: np.ndarray, mode: str = DEFAULT_MODE) -> np.ndarray:
    """Joint colour histogram of a BGR uint8 image: float32 [4096, 1] of pixel counts."""
    _check_mode(mode)
    _check_bgr(bgr)
    if mode == "corrected":
        hist = cv2.calcHist([bgr], [0, 1, 2], None, [RGB_LEVELS] * 3, [0, 256] * 3)
        return np.ascontiguousarray(hist.reshape(RGB_BINS, 1))
    step = np.uint8(256 // RGB_LEVELS)
    levels = np.uint8(RGB_LEVELS)
    b, g, r = bgr[..., 0] // step, bgr[..., 1] // step, bgr[..., 2] // step
    # uint8 arithmetic as in the script: b * 16 * 16 is b * 256 mod 256 = 0 (blue drops out);
    # g * 16 + r <= 255 does not wrap.
    index = b * levels * levels + g * levels + r
    return cv2.calcHist([index], [0], None, [RGB_BINS], [0, RGB_BINS])


def _hue_bins(hue_degrees: np.ndarray) -> np.ndarray:
    """Hue in degrees -> bin 0..7 for (315,20] (20,40] ... (295,315]; other values -> 0."""
    bins = np.zeros(hue_degrees.shape, np.uint8)
    for k in range(1, len(HUE_UPPER_EDGES)):
        low, high = HUE_UPPER_EDGES[k - 1], HUE_UPPER_EDGES[k]
        bins[(hue_degrees > low) & (hue_degrees <= high)] = k
    return bins


def _three_bins(values: np.ndarray) -> np.ndarray:
    low, high = SV_SPLITS
    return ((values > low).astype(np.uint8) + (values > high).astype(np.uint8)).astype(np.uint8)


def hsv_histogram(bgr: np.ndarray, mode: str = DEFAULT_MODE) -> np.ndarray:
    """Quantised HSV histogram of a BGR uint8 image: float32 [72, 1] of pixel counts."""
    _check_mode(mode)
    _check_bgr(bgr)
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    if mode == "challenge":
        # uint8 as in the script: 2 * H wraps for H >= 128 (256 degrees and more).
        hue = (hsv[..., 0] * np.uint8(2)).astype(np.int32)
    else:
        hue = hsv[..., 0].astype(np.int32) * 2  # degrees 0..358
    index = 9 * _hue_bins(hue) + 3 * _three_bins(hsv[..., 1]) + _three_bins(hsv[..., 2])
    index = index.astype(np.uint8)
    upper = HSV_BINS - 1 if mode == "challenge" else HSV_BINS  # the script's range [0, 71)
    return cv2.calcHist([index], [0], None, [HSV_BINS], [0, upper])


def correlation(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
    """OpenCV HISTCMP_CORREL: Pearson correlation of two histograms (1.0 when either is flat)."""
    return float(cv2.compareHist(hist_a, hist_b, cv2.HISTCMP_CORREL))


@dataclass(frozen=True)
class StyleScore:
    """Per-image style similarity as fractions in [-1, 1] (multiply by 100 for percent)."""

    rgb: float
    hsv: float

    @property
    def value(self) -> float:
        return 0.5 * (self.rgb + self.hsv)


def style_similarity(output_bgr: np.ndarray, reference_bgr: np.ndarray,
                     mode: str = DEFAULT_MODE) -> StyleScore:
    """S of one generated image against its reference (both BGR uint8; sizes may differ)."""
    _check_bgr(output_bgr, "generated image")
    _check_bgr(reference_bgr, "reference image")
    return StyleScore(
        rgb=correlation(rgb_histogram(reference_bgr, mode), rgb_histogram(output_bgr, mode)),
        hsv=correlation(hsv_histogram(reference_bgr, mode), hsv_histogram(output_bgr, mode)),
    )

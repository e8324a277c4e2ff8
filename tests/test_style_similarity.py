"""Style similarity S: both histogram modes against a direct numpy computation written here (bin
indices by hand, np.bincount, float64 Pearson correlation), on tiny images."""

import cv2
import numpy as np
import pytest

from scoring.style_similarity import (HSV_BINS, RGB_BINS, ImageReadError, hsv_histogram, read_bgr,
                                    rgb_histogram, style_similarity)


def pearson(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def expected_rgb_hist(bgr, mode):
    q = bgr.astype(np.int64) // 16
    b, g, r = q[..., 0], q[..., 1], q[..., 2]
    index = (b * 256 + g * 16 + r) if mode == "corrected" else (b * 256 + g * 16 + r) % 256
    return np.bincount(index.ravel(), minlength=4096)


def expected_hsv_hist(bgr, mode):
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.int64)
    degrees = 2 * hsv[..., 0]
    if mode == "challenge":
        degrees = degrees % 256
    hue = np.zeros_like(degrees)
    for k, (low, high) in enumerate([(20, 40), (40, 75), (75, 155), (155, 190), (190, 270),
                                     (270, 295), (295, 315)], start=1):
        hue[(degrees > low) & (degrees <= high)] = k
    sat = (hsv[..., 1] > 51).astype(np.int64) + (hsv[..., 1] > 178)
    val = (hsv[..., 2] > 51).astype(np.int64) + (hsv[..., 2] > 178)
    index = (9 * hue + 3 * sat + val).ravel()
    if mode == "challenge":
        index = index[index < 71]       # the script's range [0, 71) never counts the value 71
    return np.bincount(index, minlength=72)


def random_bgr(seed, height=6, width=7):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["challenge", "corrected"])
def test_histograms_match_a_direct_numpy_computation(mode):
    for seed in range(5):
        image = random_bgr(seed)
        rgb = rgb_histogram(image, mode)
        hsv = hsv_histogram(image, mode)
        assert rgb.shape == (RGB_BINS, 1) and hsv.shape == (HSV_BINS, 1)
        np.testing.assert_array_equal(rgb[:, 0], expected_rgb_hist(image, mode))
        np.testing.assert_array_equal(hsv[:, 0], expected_hsv_hist(image, mode))


@pytest.mark.parametrize("mode", ["challenge", "corrected"])
def test_style_similarity_is_the_mean_of_two_pearson_correlations(mode):
    output, reference = random_bgr(10, 5, 9), random_bgr(11, 8, 4)    # sizes may differ
    score = style_similarity(output, reference, mode)
    rgb = pearson(expected_rgb_hist(reference, mode), expected_rgb_hist(output, mode))
    hsv = pearson(expected_hsv_hist(reference, mode), expected_hsv_hist(output, mode))
    assert score.rgb == pytest.approx(rgb, abs=1e-9)
    assert score.hsv == pytest.approx(hsv, abs=1e-9)
    assert score.value == pytest.approx((rgb + hsv) / 2, abs=1e-9)


def test_blue_drops_out_of_the_challenge_rgb_histogram_only():
    reference = random_bgr(3)
    output = reference.copy()
    output[..., 0] = 255 - output[..., 0]               # change blue only
    challenge = style_similarity(output, reference, "challenge")
    corrected = style_similarity(output, reference, "corrected")
    assert challenge.rgb == pytest.approx(1.0, abs=1e-12)
    assert corrected.rgb == pytest.approx(pearson(expected_rgb_hist(reference, "corrected"),
                                                  expected_rgb_hist(output, "corrected")), abs=1e-9)
    assert corrected.rgb < 0.5


def test_hue_wrap_and_dropped_last_bin_in_challenge_mode():
    # A pure magenta-ish hue of 300 degrees (OpenCV H = 150) with high S and V: its intended bin
    # is 9*7 + 3*2 + 2 = 71, the value the challenge's range [0, 71) drops; after the uint8 wrap
    # (300 -> 44 degrees) the challenge puts it in hue bin 2 instead.
    hsv = np.full((4, 4, 3), (150, 250, 250), np.uint8)
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    hue = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[0, 0, 0]
    assert 2 * int(hue) > 295
    corrected = hsv_histogram(bgr, "corrected")[:, 0]
    challenge = hsv_histogram(bgr, "challenge")[:, 0]
    assert corrected[71] == 16 and corrected.sum() == 16
    wrapped_bin = 9 * 2 + 3 * 2 + 2
    assert (2 * int(hue)) % 256 in range(41, 76)
    assert challenge[wrapped_bin] == 16 and challenge.sum() == 16
    np.testing.assert_array_equal(challenge, expected_hsv_hist(bgr, "challenge"))
    assert style_similarity(bgr, random_bgr(5), "challenge") != style_similarity(bgr, random_bgr(5), "corrected")


def test_read_bgr_reads_as_opencv_and_names_bad_files(tmp_path):
    image = random_bgr(4)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(read_bgr(tmp_path / "a.png"), image)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_bgr(tmp_path / "bad.jpg")
    with pytest.raises(ImageReadError, match="missing.jpg"):
        read_bgr(tmp_path / "missing.jpg")


def test_bad_mode_and_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="mode"):
        rgb_histogram(random_bgr(0), "intended")
    with pytest.raises(ValueError, match="BGR uint8"):
        style_similarity(random_bgr(0).astype(np.float32), random_bgr(1))

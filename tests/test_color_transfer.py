"""Reinhard colour transfer against an independent per-pixel float64 computation."""

import json

import cv2
import numpy as np
import pytest

from datasets import load_image, save_image, save_label
from synthesis.color_transfer import color_transfer
from tools.color_transfer import main


def reference_transfer(source, reference):
    """Per-pixel loop with numpy statistics (not cv2.meanStdDev), Python's round()."""
    s = cv2.cvtColor(source, cv2.COLOR_RGB2LAB).astype(np.float64)
    r = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float64)
    out = np.zeros(s.shape, np.uint8)
    for k in range(3):
        s_mean, s_std = round(s[..., k].mean(), 2), round(s[..., k].std(), 2)
        r_mean, r_std = round(r[..., k].mean(), 2), round(r[..., k].std(), 2)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                x = (s[i, j, k] - s_mean) * (r_std / s_std) + r_mean if s_std else r_mean
                out[i, j, k] = min(255, max(0, round(x)))
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)


def test_matches_independent_computation():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    reference = (rng.integers(0, 120, (5, 7, 3)) + np.array([100, 30, 0])).astype(np.uint8)
    np.testing.assert_array_equal(color_transfer(source, reference), reference_transfer(source, reference))


def test_output_takes_the_reference_statistics():
    rng = np.random.default_rng(1)
    source = np.clip(rng.normal(90, 20, (32, 48, 3)), 0, 255).astype(np.uint8)
    reference = np.clip(rng.normal([200, 120, 60], 12, (24, 40, 3)), 0, 255).astype(np.uint8)
    out_lab = cv2.cvtColor(color_transfer(source, reference), cv2.COLOR_RGB2LAB).astype(np.float64)
    ref_lab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float64)
    np.testing.assert_allclose(out_lab.mean(axis=(0, 1)), ref_lab.mean(axis=(0, 1)), atol=1.5)
    np.testing.assert_allclose(out_lab.std(axis=(0, 1)), ref_lab.std(axis=(0, 1)), atol=1.5)


def test_equal_images_come_back_as_their_lab_round_trip():
    """Transferring an image onto itself changes nothing but OpenCV's uint8 RGB -> Lab -> RGB."""
    image = np.random.default_rng(3).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    round_trip = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2LAB), cv2.COLOR_LAB2RGB)
    np.testing.assert_array_equal(color_transfer(image, image), round_trip)


def test_constant_source_takes_the_reference_mean():
    source = np.full((4, 4, 3), 77, np.uint8)
    reference = np.random.default_rng(2).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    out = color_transfer(source, reference)
    assert (out == out[0, 0]).all()
    assert np.array_equal(out, reference_transfer(source, reference))


def test_bad_input():
    with pytest.raises(ValueError, match="source must be RGB uint8"):
        color_transfer(np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8))


def smooth_image(rng, height=12, width=16):
    """A smooth photo, so JPEG compression changes it little."""
    coarse = rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def test_folder_cli(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for name in ("r1", "r2"):
        save_image(tmp_path / "train" / "imgs" / f"{name}.jpg", smooth_image(rng))
        save_label(tmp_path / "train" / "labels" / f"{name}.png", np.zeros((12, 16), np.uint8))
    for mask in ("a", "b"):
        save_label(tmp_path / "masks" / f"{mask}.png", np.zeros((12, 16), np.uint8))
        save_image(tmp_path / "out" / f"{mask}.jpg", smooth_image(rng))
    (tmp_path / "masks" / "label_to_img.json").write_text(json.dumps({"a.png": "r1.jpg", "b.png": "r2.jpg"}))
    args = ["--results", str(tmp_path / "out"), "--input_path", str(tmp_path / "masks"),
            "--img_path", str(tmp_path / "train"), "--output", str(tmp_path / "ct")]
    assert main(args) == 0
    expected = color_transfer(load_image(tmp_path / "out" / "b.jpg"), load_image(tmp_path / "train" / "imgs" / "r2.jpg"))
    save_image(tmp_path / "expected.jpg", expected)  # the same JPEG encoding as the CLI's
    np.testing.assert_array_equal(load_image(tmp_path / "ct" / "b.jpg"), load_image(tmp_path / "expected.jpg"))
    (tmp_path / "out" / "a.jpg").unlink()
    assert main(args) == 1
    assert "results not found: a.jpg" in capsys.readouterr().err

"""Label validation, one-hot masks, paired transforms, photo loading and the two folder layouts."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from datasets import (CLASS_NAMES, NUM_CLASSES, DataError, TestSet, TrainingSet, hflip_pair,
                      load_image, load_label, one_hot, resize_pair, save_image, save_label)


def test_class_list_matches_challenge_order():
    assert NUM_CLASSES == 29
    assert CLASS_NAMES[:3] == ("mountain", "sky", "water")
    assert CLASS_NAMES[12] == "grass" and CLASS_NAMES[20] == "lake" and CLASS_NAMES[28] == "other"


# ---- labels -------------------------------------------------------------------------------------

def test_out_of_range_label_names_file_value_and_count(tmp_path):
    label = np.zeros((6, 8), np.uint8)
    label[0, :3] = 31
    label[5, 7] = 200
    path = tmp_path / "bad.png"
    Image.fromarray(label, "L").save(path)
    with pytest.raises(DataError) as err:
        load_label(path)
    message = str(err.value)
    assert str(path) in message
    assert "value 31 (3 pixels)" in message and "value 200 (1 pixels)" in message
    assert "0..28" in message


def test_label_of_wrong_mode_is_refused(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8), "RGB").save(path)
    with pytest.raises(DataError, match="8-bit greyscale.*mode RGB"):
        load_label(path)


def test_corrupt_and_missing_files_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match="corrupt.png: cannot be read"):
        load_label(corrupt)
    with pytest.raises(DataError, match="nothere.jpg: file not found"):
        load_image(tmp_path / "nothere.jpg")


def test_label_round_trip(tmp_path):
    label = np.random.default_rng(0).integers(0, NUM_CLASSES, (5, 7)).astype(np.uint8)
    save_label(tmp_path / "l.png", label)
    np.testing.assert_array_equal(load_label(tmp_path / "l.png"), label)
    assert Image.open(tmp_path / "l.png").mode == "L"


def test_one_hot_against_loop():
    rng = np.random.default_rng(1)
    label = rng.integers(0, NUM_CLASSES, (2, 5, 7)).astype(np.uint8)
    mask = one_hot(label)
    assert mask.shape == (2, NUM_CLASSES, 5, 7) and mask.dtype == np.float32
    expected = np.zeros((2, NUM_CLASSES, 5, 7), np.float32)
    for b in range(2):
        for i in range(5):
            for j in range(7):
                expected[b, label[b, i, j], i, j] = 1.0
    np.testing.assert_array_equal(mask, expected)
    assert one_hot(label[0]).shape == (NUM_CLASSES, 5, 7)
    np.testing.assert_array_equal(mask.sum(axis=1), 1.0)


def test_one_hot_rejects_out_of_range():
    with pytest.raises(DataError, match="value 29"):
        one_hot(np.array([[0, 29]], np.uint8))
    with pytest.raises(DataError, match="integer"):
        one_hot(np.zeros((2, 2), np.float32))


# ---- transforms ---------------------------------------------------------------------------------

def _striped_pair(height, width):
    """A photo whose colour encodes its label, so alignment can be checked after transforms."""
    label = (np.arange(width)[None, :] // 8 % NUM_CLASSES).repeat(height, 0).astype(np.uint8)
    label[: height // 2] = (label[: height // 2] + 7) % NUM_CLASSES
    image = np.stack([label * 8, 255 - label * 8, np.full_like(label, 100)], -1).astype(np.uint8)
    return image, label


def test_resize_pair_keeps_alignment():
    image, label = _striped_pair(24, 32)
    big_image, big_label = resize_pair(image, label, height=48, width=64)
    assert big_image.shape == (48, 64, 3) and big_label.shape == (48, 64)
    # Nearest upscaling by 2 repeats each label pixel into a 2x2 block.
    np.testing.assert_array_equal(big_label, label.repeat(2, 0).repeat(2, 1))
    # Away from class edges (bicubic reaches 2 source = 4 destination pixels) the photo keeps
    # the colour of its label.
    windows = np.lib.stride_tricks.sliding_window_view(big_label, (9, 9))
    interior = (windows.min(axis=(2, 3)) == windows.max(axis=(2, 3)))
    centre_label = big_label[4:-4, 4:-4][interior].astype(int)
    colour = big_image[4:-4, 4:-4, 0][interior].astype(int)
    assert interior.sum() > 100
    np.testing.assert_allclose(colour, centre_label * 8, atol=1)


def test_resize_label_never_invents_classes():
    rng = np.random.default_rng(2)
    label = rng.choice([1, 5, 12], size=(17, 23)).astype(np.uint8)
    image = np.zeros((17, 23, 3), np.uint8)
    _, small = resize_pair(image, label, height=7, width=9)
    assert set(np.unique(small)) <= {1, 5, 12}
    # PIL nearest samples the source pixel under each destination pixel centre.
    rows = np.floor((np.arange(7) + 0.5) * 17 / 7).astype(int)
    cols = np.floor((np.arange(9) + 0.5) * 23 / 9).astype(int)
    np.testing.assert_array_equal(small, label[rows][:, cols])


def test_hflip_pair():
    image, label = _striped_pair(6, 10)
    flipped_image, flipped_label = hflip_pair(image, label)
    np.testing.assert_array_equal(flipped_label[:, 0], label[:, -1])
    np.testing.assert_array_equal(flipped_image[:, 0], image[:, -1])
    np.testing.assert_array_equal(flipped_image[..., 0] // 8, flipped_label)


# ---- photos -------------------------------------------------------------------------------------

def test_greyscale_photo_converted_with_log(tmp_path, caplog):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, "L").save(tmp_path / "grey.jpg", quality=100)
    with caplog.at_level(logging.INFO, logger="iidm.datasets"):
        image = load_image(tmp_path / "grey.jpg")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert "grey.jpg: greyscale photo converted to RGB" in caplog.text


def test_save_image_is_atomic_and_validates(tmp_path):
    image = np.full((4, 6, 3), 200, np.uint8)
    save_image(tmp_path / "out.jpg", image)
    assert [p.name for p in tmp_path.iterdir()] == ["out.jpg"]
    assert Image.open(tmp_path / "out.jpg").size == (6, 4)
    with pytest.raises(ValueError, match="RGB uint8"):
        save_image(tmp_path / "bad.jpg", image[..., 0])
    assert not (tmp_path / "bad.jpg").exists()


# ---- folder layouts ------------------------------------------------------------------------------

def _write_training_root(root, names, height=12, width=16):
    rng = np.random.default_rng(3)
    for name in names:
        label = rng.integers(0, NUM_CLASSES, (height, width)).astype(np.uint8)
        save_label(root / "labels" / f"{name}.png", label)
        save_image(root / "imgs" / f"{name}.jpg", rng.integers(0, 255, (height, width, 3)).astype(np.uint8))


def test_training_set_pairs_and_resizes(tmp_path, caplog):
    _write_training_root(tmp_path, ["a", "b"])
    # A greyscale photo of another size and its label, also of another size.
    Image.fromarray(np.zeros((24, 20), np.uint8), "L").save(tmp_path / "imgs" / "c.jpg")
    save_label(tmp_path / "labels" / "c.png", np.ones((24, 20), np.uint8))
    data = TrainingSet(tmp_path, height=12, width=16)
    assert len(data) == 3 and data.names == ["a", "b", "c"]
    with caplog.at_level(logging.INFO, logger="iidm.datasets"):
        sample = data[2]
    assert sample.image.shape == (12, 16, 3) and sample.label.shape == (12, 16)
    assert (sample.label == 1).all()
    assert "greyscale" in caplog.text and "resized to 12x16" in caplog.text


def test_training_set_file_without_partner(tmp_path):
    _write_training_root(tmp_path, ["a", "b"])
    (tmp_path / "labels" / "b.png").unlink()
    save_label(tmp_path / "labels" / "z.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError) as err:
        TrainingSet(tmp_path)
    assert "photos without a label map" in str(err.value) and "b.jpg" in str(err.value)
    assert "label maps without a photo" in str(err.value) and "z.png" in str(err.value)


def test_training_set_missing_folder(tmp_path):
    with pytest.raises(DataError, match="imgs: folder not found"):
        TrainingSet(tmp_path)


def _write_test_input(tmp_path, mapping):
    _write_training_root(tmp_path / "train", ["r1", "r2"], height=24, width=32)
    masks = tmp_path / "masks"
    for mask in ("m1.png", "m2.png"):
        save_label(masks / mask, np.full((12, 16), 5, np.uint8))
    (masks / "label_to_img.json").write_text(json.dumps(mapping))
    return masks, tmp_path / "train"


def test_test_set_reads_mask_and_reference(tmp_path):
    masks, train = _write_test_input(tmp_path, {"m1.png": "r1.jpg", "m2.png": "r2.jpg"})
    data = TestSet(masks, train)
    assert len(data) == 2
    item = data[1]
    assert item.name == "m2" and item.reference_name == "r2.jpg"
    assert item.label.shape == (12, 16) and item.reference.shape == (12, 16, 3)
    # The imgs/ folder itself is accepted as well as the training root.
    assert len(TestSet(masks, train / "imgs")) == 2


def test_test_set_missing_key(tmp_path):
    masks, train = _write_test_input(tmp_path, {"m1.png": "r1.jpg"})
    with pytest.raises(DataError, match=r"label_to_img.json: no reference given for m2.png"):
        TestSet(masks, train)


def test_test_set_missing_reference(tmp_path):
    masks, train = _write_test_input(tmp_path, {"m1.png": "r1.jpg", "m2.png": "gone.jpg"})
    with pytest.raises(DataError, match=r"reference photos not found: gone.jpg \(for m2.png\)"):
        TestSet(masks, train)


def test_test_set_bad_mapping_file(tmp_path):
    masks, train = _write_test_input(tmp_path, {})
    (masks / "label_to_img.json").write_text("{not json")
    with pytest.raises(DataError, match="label_to_img.json: not valid JSON"):
        TestSet(masks, train)
    (masks / "label_to_img.json").unlink()
    with pytest.raises(DataError, match="label_to_img.json: not found"):
        TestSet(masks, train)


def test_atomic_write_keeps_the_old_file_on_error_and_leaves_no_temporary(tmp_path):
    from datasets.io import atomic_write

    path = tmp_path / "sub" / "file.json"
    with atomic_write(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask     # not mkstemp's 0600
    with atomic_write(path, "wb") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_references_outside_the_reference_folder_are_refused(tmp_path):
    """A mapping entry may only name a file inside the reference folder: ``../x.jpg`` or an absolute
    path would read a photo from elsewhere, even when that file exists."""
    from datasets.landscape import test_entries

    masks, train = _write_test_input(tmp_path, {"m1.png": "../outside.jpg", "m2.png": str(tmp_path / "abs.jpg")})
    for name in ("outside.jpg", "abs.jpg"):
        (tmp_path / name).write_bytes((train / "imgs" / "r1.jpg").read_bytes())
    (train / "outside.jpg").write_bytes((train / "imgs" / "r1.jpg").read_bytes())
    entries = test_entries(masks, train)
    assert [e.name for e in entries] == ["m1", "m2"]
    assert "'../outside.jpg' of m1.png is not a file name inside" in entries[0].problem
    assert "abs.jpg' of m2.png is not a file name inside" in entries[1].problem
    with pytest.raises(DataError, match=r"reference photos not found: \.\./outside\.jpg \(for m1\.png\)"):
        TestSet(masks, train)

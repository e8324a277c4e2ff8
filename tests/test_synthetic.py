"""Tests of the procedural landscape generator (datasets/synthetic.py): determinism, class coverage,
shapes at many sizes, style information and the challenge file layout."""

import json

import numpy as np
import pytest
from PIL import Image

from datasets.classes import CLASS_INDEX, NUM_CLASSES
from datasets.synthetic import (SCENE_CLASSES, STYLES, contact_sheet, main, make_label, make_scene,
                                render_photo, write_dataset)

rng = lambda *key: np.random.default_rng(list(key))


def test_same_seed_same_arrays_and_different_seed_differs():
    a_img, a_lab, a_style = make_scene(rng(0, 1), height=24, width=32)
    b_img, b_lab, b_style = make_scene(rng(0, 1), height=24, width=32)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and a_style == b_style
    c_img, c_lab, _ = make_scene(rng(1, 1), height=24, width=32)
    assert not np.array_equal(a_img, c_img) or not np.array_equal(a_lab, c_lab)
    label = make_label(rng(3), height=24, width=32)
    assert np.array_equal(render_photo(label, "noon", rng(4)), render_photo(label, "noon", rng(4)))
    assert not np.array_equal(render_photo(label, "noon", rng(4)), render_photo(label, "noon", rng(5)))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset_is_byte_identical_and_image_i_does_not_depend_on_n(tmp_path):
    write_dataset(tmp_path / "a", 4, height=24, width=32, seed=7)
    write_dataset(tmp_path / "b", 4, height=24, width=32, seed=7)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    write_dataset(tmp_path / "c", 6, height=24, width=32, seed=7)
    small, big = _files(tmp_path / "a"), _files(tmp_path / "c")
    for name in ("00000", "00001", "00002", "00003"):
        assert small[f"train/imgs/{name}.jpg"] == big[f"train/imgs/{name}.jpg"]
        assert small[f"train/labels/{name}.png"] == big[f"train/labels/{name}.png"]
    write_dataset(tmp_path / "d", 4, height=24, width=32, seed=8)
    assert _files(tmp_path / "d")["train/labels/00000.png"] != small["train/labels/00000.png"]


def test_class_coverage_and_sky_on_top():
    labels = [make_label(rng(0, i), height=48, width=64) for i in range(40)]
    seen = set()
    for label in labels:
        assert label.dtype == np.uint8 and label.min() >= 0 and label.max() < NUM_CLASSES
        assert len(np.unique(label)) >= 2
        seen |= set(np.unique(label).tolist())
    assert {CLASS_INDEX[c] for c in SCENE_CLASSES} <= seen
    assert seen <= {CLASS_INDEX[c] for c in SCENE_CLASSES}
    sky_on_top = sum((label[0] == CLASS_INDEX["sky"]).mean() > 0.5 for label in labels)
    assert sky_on_top >= 0.8 * len(labels)


@pytest.mark.parametrize("height,width", [(8, 8), (12, 16), (24, 32), (40, 16), (17, 23), (384, 512)])
def test_shapes_and_dtypes(height, width):
    styles = STYLES if height * width < 10_000 else ("sunset",)
    for style in styles:
        image, label, got = make_scene(rng(height, width), height=height, width=width, style=style)
        assert got == style
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert label.shape == (height, width) and label.dtype == np.uint8 and label.max() < NUM_CLASSES


def test_random_style_is_one_of_styles():
    assert {make_scene(rng(0, i), height=12, width=16)[2] for i in range(30)} <= set(STYLES)
    assert {"noon", "sunset", "overcast", "night"} <= set(STYLES)


def test_style_carries_information_the_mask_does_not():
    label = make_label(rng(11), height=96, width=128)
    kept = label.copy()
    means = {s: render_photo(label, s, rng(12)).reshape(-1, 3).mean(0) for s in ("noon", "night", "sunset")}
    assert np.array_equal(label, kept)
    for a, b in (("noon", "night"), ("noon", "sunset"), ("sunset", "night")):
        assert np.linalg.norm(means[a] - means[b]) > 30, (a, b, means[a], means[b])


def test_unknown_style_raises():
    label = make_label(rng(0), height=12, width=16)
    with pytest.raises(ValueError, match="noon"):
        render_photo(label, "vaporwave", rng(0))
    with pytest.raises(ValueError):
        make_scene(rng(0), height=12, width=16, style="Noon")


def test_dataset_layout(tmp_path):
    out = tmp_path / "synth"
    summary = write_dataset(out, 6, height=24, width=32, seed=3, n_test=2)
    assert summary["n_train"] == 6 and summary["n_test"] == 2
    assert abs(sum(summary["class_freq"].values()) - 1) < 1e-3
    train_imgs = sorted(p.stem for p in (out / "train/imgs").glob("*.jpg"))
    train_labels = sorted(p.stem for p in (out / "train/labels").glob("*.png"))
    assert train_imgs == train_labels == [f"{i:05d}" for i in range(6)]
    test_masks = sorted(p.name for p in (out / "test/labels").glob("*.png"))
    assert test_masks == ["00006.png", "00007.png"]
    assert sorted(p.stem for p in (out / "test/imgs").glob("*.jpg")) == ["00006", "00007"]
    for folder in ("train", "test"):
        for p in (out / folder / "labels").glob("*.png"):
            with Image.open(p) as im:
                assert im.mode == "L" and im.size == (32, 24)   # PIL sizes are (width, height)
                assert np.asarray(im).max() < NUM_CLASSES
        for p in (out / folder / "imgs").glob("*.jpg"):
            with Image.open(p) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 24)
    pairs = json.loads((out / "test/labels/label_to_img.json").read_text())
    assert sorted(pairs) == test_masks
    assert all((out / "train/imgs" / ref).is_file() for ref in pairs.values())
    styles = json.loads((out / "styles.json").read_text())
    assert sorted(styles) == [f"{i:05d}.jpg" for i in range(8)] and set(styles.values()) <= set(STYLES)
    for mask, ref in pairs.items():   # a test ground truth is rendered in its reference's style
        assert styles[mask.replace(".png", ".jpg")] == styles[ref]

    with pytest.raises(ValueError, match="synth"):
        write_dataset(out, 6, height=24, width=32, seed=3)
    write_dataset(out, 3, height=24, width=32, seed=3, overwrite=True)
    assert len(list((out / "train/imgs").glob("*.jpg"))) == 3
    assert len(list((out / "test/labels").glob("*.png"))) == 1   # default n_test = max(1, n // 10)


def test_cli_and_contact_sheet(tmp_path, capsys):
    main(["--out", str(tmp_path / "d"), "--n", "3", "--height", "16", "--width", "20",
          "--sheet", str(tmp_path / "s.png")])
    assert capsys.readouterr().out.count("\n") == 1
    assert (tmp_path / "d/train/imgs/00002.jpg").is_file()
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[0] > 3 * 2 * 20 and im.size[1] > 5 * 16
    contact_sheet(tmp_path / "t.png", seed=1, rows=1, cols=2, height=12, width=16)
    assert (tmp_path / "t.png").is_file()
    with pytest.raises(SystemExit):
        main([])

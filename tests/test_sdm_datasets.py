"""SDM's dataset conventions, instance edges and folder readers on hand-built tiny arrays."""

import numpy as np
import pytest
from PIL import Image

from datasets.labels import DataError
from datasets.sdm import (SDM_DATASETS, SDMFolder, instance_edges, label_mask, read_instance, read_label,
                          sdm_dataset, sdm_mask)


def edges_by_loops(ids):
    """Independent definition: a pixel is an edge when any 4-neighbour inside the map differs."""
    h, w = ids.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and ids[yy, xx] != ids[y, x]:
                    out[y, x] = 1
    return out


def test_instance_edges_match_the_neighbour_definition():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=(6, 7))
    assert np.array_equal(instance_edges(ids), edges_by_loops(ids))
    assert instance_edges(np.full((4, 5), 9)).sum() == 0


def test_instance_edges_by_hand():
    ids = np.array([[1, 1, 2],
                    [1, 1, 2],
                    [3, 3, 3]])
    expected = np.array([[0, 1, 1],
                         [1, 1, 1],
                         [1, 1, 1]], dtype=np.float32)
    assert np.array_equal(instance_edges(ids), expected)
    batched = instance_edges(np.stack([ids, ids]))
    assert batched.shape == (2, 3, 3) and np.array_equal(batched[1], expected)


def test_conventions():
    ade = sdm_dataset("ade20k")
    assert np.array_equal(ade.to_class(np.array([[0, 1, 150]], np.uint8)), [[150, 0, 149]])
    coco = sdm_dataset("coco")
    assert np.array_equal(coco.to_class(np.array([[0, 181, 255]], np.uint8)), [[0, 181, 182]])
    assert [(d.num_classes, d.mask_channels) for d in (SDM_DATASETS[n] for n in
            ("cityscapes", "ade20k", "celeba", "coco"))] == [(35, 36), (151, 151), (19, 20), (183, 184)]
    assert (SDM_DATASETS["cityscapes"].height, SDM_DATASETS["cityscapes"].width) == (256, 512)
    with pytest.raises(ValueError, match="unknown SDM dataset"):
        sdm_dataset("voc")


def test_mask_has_one_hot_then_edges():
    label = np.array([[0, 1], [1, 18]])
    mask = sdm_mask(label, label, sdm_dataset("celeba"))
    assert mask.shape == (20, 2, 2)
    assert mask[0, 0, 0] == 1 and mask[18, 1, 1] == 1 and mask[:19].sum() == 4
    assert np.array_equal(mask[19], edges_by_loops(label))
    with pytest.raises(ValueError, match="instance map"):
        sdm_mask(label, None, sdm_dataset("celeba"))
    assert sdm_mask(np.array([[0, 150]]), None, sdm_dataset("ade20k")).shape == (151, 1, 2)


def test_instance_read_as_sdm_clips_above_255(tmp_path):
    ids = np.array([[26001, 26002], [7, 7]], dtype=np.uint16)
    Image.fromarray(ids).save(tmp_path / "inst.png")
    assert np.array_equal(read_instance(tmp_path / "inst.png"), [[255, 255], [7, 7]])
    assert np.array_equal(read_instance(tmp_path / "inst.png", bits=32), ids)


def test_bad_label_names_file_and_value(tmp_path):
    Image.fromarray(np.array([[0, 200]], np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a\.png.*celeba.*value 200"):
        read_label(tmp_path / "a.png", sdm_dataset("celeba"))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png.*mode RGB"):
        read_label(tmp_path / "rgb.png", sdm_dataset("celeba"))


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cityscapes_folder(tmp_path):
    img = np.zeros((4, 8, 3), np.uint8)
    lab = np.full((4, 8), 7, np.uint8)
    lab[:, 4:] = 26
    inst = np.full((4, 8), 7, np.uint16)
    inst[:, 4:] = 26000
    for city, name in (("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")):
        _save(tmp_path / "leftImg8bit/val" / city / f"{name}_leftImg8bit.png", img)
        _save(tmp_path / "gtFine/val" / city / f"{name}_gtFine_labelIds.png", lab)
        _save(tmp_path / "gtFine/val" / city / f"{name}_gtFine_instanceIds.png", inst)
    folder = SDMFolder("cityscapes", tmp_path, "val", height=4, width=8)
    assert folder.names == ["aachen/aachen_000000_000019", "bonn/bonn_000001_000019"]
    sample = folder[0]
    assert sample.mask.shape == (36, 4, 8)
    assert sample.mask[7, 0, 0] == 1 and sample.mask[26, 0, 7] == 1
    assert np.array_equal(sample.mask[35], edges_by_loops(np.where(lab == 26, 255, 7)))
    (tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_instanceIds.png").unlink()
    with pytest.raises(DataError, match="bonn_000001_000019_leftImg8bit.png"):
        SDMFolder("cityscapes", tmp_path, "val")


def test_ade20k_folder_and_errors(tmp_path):
    _save(tmp_path / "images/validation/a.jpg", np.zeros((6, 6, 3), np.uint8))
    _save(tmp_path / "annotations/validation/a.png", np.array([[0, 1, 150]] * 3, np.uint8))
    folder = SDMFolder("ade20k", tmp_path, "val", height=3, width=3)
    sample = folder[0]
    assert sample.image.shape == (3, 3, 3) and np.array_equal(sample.label[0], [150, 0, 149])
    assert sample.mask.shape == (151, 3, 3)
    _save(tmp_path / "annotations/validation/b.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match="label map without a photo: b.png"):
        SDMFolder("ade20k", tmp_path, "val")
    with pytest.raises(DataError, match="folder not found"):
        SDMFolder("coco", tmp_path, "val")


def test_single_label_map_celeba_edges_from_label(tmp_path):
    lab = np.zeros((4, 4), np.uint8)
    lab[1:3, 1:3] = 5
    _save(tmp_path / "m.png", lab)
    label, mask = label_mask(tmp_path / "m.png", "celeba", height=4, width=4)
    assert mask.shape == (20, 4, 4) and np.array_equal(mask[19], edges_by_loops(lab))


# ------------------------------------------------------------------------------ SDM's resizing
def test_reduce_photo_halves_with_2x2_means_while_both_sides_allow():
    from datasets.sdm import reduce_photo

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    halved = np.asarray(reduce_photo(Image.fromarray(photo), 24, 32))
    means = photo.astype(np.float64).reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
    assert halved.shape == (24, 32, 3)
    error = np.abs(halved - means)
    assert error.max() <= 1 and error.mean() < 0.6              # PIL's fixed-point filter, rounded
    # twice when both sides still reach twice the target, never when one side falls short
    assert np.asarray(reduce_photo(Image.fromarray(photo), 12, 16)).shape == (12, 16, 3)
    assert np.asarray(reduce_photo(Image.fromarray(photo[:47]), 24, 32)).shape == (47, 64, 3)
    assert np.asarray(reduce_photo(Image.fromarray(photo), 13, 16)).shape == (24, 32, 3)


def _ramps(height, width):
    """A photo whose red channel is a linear ramp across the columns, the column index as label
    and the row index as instance map: a crop tells where it came from and at what scale."""
    columns = np.broadcast_to(np.arange(width), (height, width))
    photo = np.zeros((height, width, 3), np.uint8)
    photo[..., 0] = np.round(columns * 255 / (width - 1))
    photo[..., 1] = 100
    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    return photo, columns.astype(np.int64).copy(), rows.astype(np.int64).copy()


@pytest.mark.parametrize("height,width", [(40, 60), (200, 300)])
def test_random_crop_window_scale_and_alignment(height, width):
    from datasets.sdm import random_crop

    size = 16
    photo, label, instance = _ramps(height, width)
    scales = []
    for seed in range(40):
        image, lab, inst = random_crop(photo, label, instance, size, np.random.default_rng(seed))
        assert image.shape == (size, size, 3) and lab.shape == inst.shape == (size, size)
        assert image.dtype == np.uint8 and lab.dtype == np.int64
        # one window of a nearest resize: columns and rows never go back, the label is the same along a column
        assert (np.diff(lab[0]) >= 0).all() and (np.diff(inst[:, 0]) >= 0).all()
        assert (lab == lab[0]).all() and (inst == inst[:, :1]).all()
        # the short side (rows here) was scaled to a length in [S, ceil(1.25 S)]: source rows per pixel
        rows_per_pixel = (inst[-1, 0] - inst[0, 0]) / (size - 1)
        short = height / rows_per_pixel
        assert size - 1.5 <= short <= np.ceil(1.25 * size) + 1.5, short
        scales.append(short)
        # the photo lies under its label: the red ramp at the column the label names
        # (a window shifted by one pixel would be off by a whole pixel's worth of source columns)
        step = 255 / (width - 1)
        columns_per_pixel = (lab[0, -1] - lab[0, 0]) / (size - 1)
        error = np.abs(image[size // 2, 2:-2, 0] - lab[0, 2:-2] * step)
        assert error.max() <= 0.45 * columns_per_pixel * step + 2, (error.max(), columns_per_pixel * step)
    assert min(scales) < size + 2 and max(scales) > 1.25 * size - 2   # the range is drawn, both ends


def test_random_crop_is_fixed_by_its_generator():
    from datasets.sdm import random_crop

    photo, label, instance = _ramps(40, 60)
    first = random_crop(photo, label, None, 16, np.random.default_rng(3))
    again = random_crop(photo, label, None, 16, np.random.default_rng(3))
    other = random_crop(photo, label, None, 16, np.random.default_rng(4))
    assert first[2] is None
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not all(np.array_equal(a, b) for a, b in zip(first[:2], other[:2]))
    # edges from the label map itself (CelebAMask-HQ): the instance crop is the label crop
    _, lab, inst = random_crop(photo, label, label, 16, np.random.default_rng(3))
    np.testing.assert_array_equal(lab, first[1])
    np.testing.assert_array_equal(inst, lab)

"""mIoU and pixel diversity against hand counts."""

import numpy as np
import pytest

from scoring.sdm_metrics import confusion_matrix, mean_iou, pixel_diversity


def test_miou_by_hand():
    label = np.array([[0, 0, 1, 1],
                      [2, 2, 2, 3]])
    pred = np.array([[0, 1, 1, 1],
                     [2, 2, 0, 3]])
    # class 0: hit 1, union |{(0,0),(0,1),(1,2)}| = 3; class 1: hit 2, union 3; class 2: hit 2, union 3;
    # class 3: hit 1, union 1
    miou, iou = mean_iou(confusion_matrix(pred, label, 5))
    assert iou[:4] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0]) and np.isnan(iou[4])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 2 / 3 + 1) / 4)
    # ignoring class 3 removes its pixel everywhere
    miou_ignored, iou_ignored = mean_iou(confusion_matrix(pred, label, 5, ignore=3))
    assert np.isnan(iou_ignored[3]) and miou_ignored == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


def test_confusion_sums_over_images():
    a = confusion_matrix(np.array([[0, 1]]), np.array([[0, 0]]), 2)
    b = confusion_matrix(np.array([[1, 1]]), np.array([[1, 0]]), 2)
    assert np.array_equal(a + b, [[1, 2], [0, 1]])
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)


def test_pixel_diversity():
    zero, ten, thirty = (np.full((2, 2, 3), v, np.uint8) for v in (0, 10, 30))
    assert pixel_diversity([zero, ten, thirty]) == pytest.approx((10 + 30 + 20) / 3)
    with pytest.raises(ValueError):
        pixel_diversity([zero])

"""Data: the 29 classes, label validation and one-hot masks, paired transforms, the challenge's
training and test layouts, and a synthetic landscape generator. Numpy only, no network code."""

from datasets.classes import CLASS_INDEX, CLASS_NAMES, NUM_CLASSES, PALETTE, colorize
from datasets.io import load_image, load_label, save_image, save_label
from datasets.labels import DataError, one_hot, validate_label
from datasets.landscape import Sample, TestItem, TestSet, TrainingSet
from datasets.transforms import hflip_pair, resize_image, resize_label, resize_pair

__all__ = [
    "CLASS_INDEX", "CLASS_NAMES", "NUM_CLASSES", "PALETTE", "colorize",
    "load_image", "load_label", "save_image", "save_label",
    "DataError", "one_hot", "validate_label",
    "Sample", "TestItem", "TestSet", "TrainingSet",
    "hflip_pair", "resize_image", "resize_label", "resize_pair",
]

"""The challenge's two folder layouts, read as numpy.

Training root::

    ROOT/imgs/NAME.jpg      RGB photo (512x384 in the challenge)
    ROOT/labels/NAME.png    8-bit grey label map, class indices 0..28, same basename

Test input::

    MASKS/NAME.png              label maps to synthesise
    MASKS/label_to_img.json     {"NAME.png": "REF.jpg", ...}: the style reference of each mask,
                                a photo in the training imgs/ folder
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.classes import NUM_CLASSES
from datasets.io import IMAGE_SUFFIXES, load_image, load_label
from datasets.labels import DataError
from datasets.transforms import resize_image, resize_label

log = logging.getLogger("iidm.datasets")

CHALLENGE_HEIGHT = 384
CHALLENGE_WIDTH = 512
MAPPING_FILE = "label_to_img.json"


def _list_stems(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in files:
                raise DataError(f"{folder}: two files share the basename {path.stem!r} "
                                f"({files[path.stem].name}, {path.name})")
            files[path.stem] = path
    return files


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class Sample:
    """One training pair: photo uint8 [H, W, 3] and label map uint8 [H, W]."""

    name: str
    image: np.ndarray
    label: np.ndarray


class TrainingSet:
    """Photos and label maps under ``ROOT/imgs`` and ``ROOT/labels``, paired by basename.

    Every sample comes out at (height, width): a photo or label of another size is resized
    (bicubic / nearest) with a log line, a greyscale photo is converted to RGB with a log line.
    A photo without its label map, or a label map without its photo, is an error.
    """

    def __init__(self, root: str | os.PathLike, height: int = CHALLENGE_HEIGHT,
                 width: int = CHALLENGE_WIDTH, num_classes: int = NUM_CLASSES):
        self.root = Path(root)
        self.height, self.width, self.num_classes = height, width, num_classes
        images = _list_stems(self.root / "imgs", IMAGE_SUFFIXES)
        labels = _list_stems(self.root / "labels", (".png",))
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        problems = []
        if no_label:
            problems.append(f"photos without a label map in {self.root / 'labels'}: "
                            f"{_listing([images[n].name for n in no_label])}")
        if no_image:
            problems.append(f"label maps without a photo in {self.root / 'imgs'}: "
                            f"{_listing([labels[n].name for n in no_image])}")
        if problems:
            raise DataError(f"{self.root}: " + "; ".join(problems))
        if not images:
            raise DataError(f"{self.root}: no photos found in imgs/ (expected NAME.jpg files)")
        self.names = sorted(images)
        self.image_paths = [images[n] for n in self.names]
        self.label_paths = [labels[n] for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        image = load_image(self.image_paths[index])
        label = load_label(self.label_paths[index], self.num_classes)
        image = _fit(image, self.height, self.width, self.image_paths[index], resize_image)
        label = _fit(label, self.height, self.width, self.label_paths[index], resize_label)
        return Sample(self.names[index], image, label)


def _fit(array: np.ndarray, height: int, width: int, path: Path, resize) -> np.ndarray:
    if array.shape[:2] != (height, width):
        log.info("%s: size %dx%d (HxW) resized to %dx%d", path, *array.shape[:2], height, width)
        array = resize(array, height, width)
    return array


@dataclass(frozen=True)
class TestItem:
    """One mask to synthesise: its label map and the style reference photo, both at the mask's size."""

    name: str
    label: np.ndarray
    reference: np.ndarray
    reference_name: str


def find_image_folder(img_root: str | os.PathLike) -> Path:
    """The folder holding the reference photos: ``ROOT/imgs`` when it exists, else ``ROOT``."""
    root = Path(img_root)
    return root / "imgs" if (root / "imgs").is_dir() else root


class TestSet:
    """Label maps in ``mask_dir`` with their style references named by ``label_to_img.json``.

    All masks, keys and reference files are checked when the set is built, so a missing key
    or a missing reference is reported (by name) before any work starts.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, mask_dir: str | os.PathLike, img_root: str | os.PathLike,
                 num_classes: int = NUM_CLASSES, mapping_file: str | os.PathLike | None = None):
        self.mask_dir = Path(mask_dir)
        self.image_dir = find_image_folder(img_root)
        self.num_classes = num_classes
        entries = test_entries(self.mask_dir, img_root, mapping_file)
        self.mapping_path = Path(mapping_file) if mapping_file else self.mask_dir / MAPPING_FILE
        no_key = [e.mask_path.name for e in entries if e.reference_path is None]
        if no_key:
            raise DataError(f"{self.mapping_path}: no reference given for {_listing(no_key)}")
        problems = [f"{e.reference} (for {e.mask_path.name})" for e in entries if e.problem]
        if problems:
            raise DataError(f"{self.image_dir}: reference photos not found: {_listing(problems)}")
        self.names = [e.name for e in entries]
        self.mask_paths = [e.mask_path for e in entries]
        self.reference_paths = [e.reference_path for e in entries]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> TestItem:
        label = load_label(self.mask_paths[index], self.num_classes)
        reference_path = self.reference_paths[index]
        reference = load_image(reference_path)
        height, width = label.shape
        reference = _fit(reference, height, width, reference_path, resize_image)
        return TestItem(self.names[index], label, reference, reference_path.name)


@dataclass(frozen=True)
class TestEntry:
    """One mask of a test folder, before anything is read: its reference photo's path (None when
    the mapping names none) and ``problem``, a message naming the file, when it cannot be used."""

    __test__ = False

    name: str
    mask_path: Path
    reference: str | None          # as the mapping names it
    reference_path: Path | None
    problem: str | None = None


def test_entries(mask_dir: str | os.PathLike, img_root: str | os.PathLike,
                 mapping_file: str | os.PathLike | None = None) -> list[TestEntry]:
    """Every ``MASK.png`` of ``mask_dir`` (sorted by name) with its reference from the mapping.

    A missing masks folder, mapping file or reference folder is an error for the whole set; a mask
    without an entry, with a reference outside the reference folder (``../x.jpg``, an absolute
    path) or whose reference file is absent is an entry with a ``problem``, so a caller can go on
    with the others."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: masks folder not found")
    mapping_path = Path(mapping_file) if mapping_file else mask_dir / MAPPING_FILE
    mapping = read_mapping(mapping_path)
    image_dir = find_image_folder(img_root)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: reference photo folder not found")
    masks = _list_stems(mask_dir, (".png",))
    if not masks:
        raise DataError(f"{mask_dir}: no label maps (NAME.png) found")
    entries = []
    for name, mask_path in masks.items():
        if mask_path.name not in mapping:
            entries.append(TestEntry(name, mask_path, None, None,
                                     f"{mapping_path}: no reference given for {mask_path.name}"))
            continue
        reference = mapping[mask_path.name]
        path = image_dir / reference
        problem = None
        if Path(reference).is_absolute() or ".." in Path(reference).parts:
            problem = (f"{mapping_path}: the reference {reference!r} of {mask_path.name} is not a file name "
                       f"inside {image_dir}")
        elif not path.is_file():
            problem = f"{path}: reference photo not found (for {mask_path.name})"
        entries.append(TestEntry(name, mask_path, reference, path, problem))
    return entries


def read_mapping(path: str | os.PathLike) -> dict[str, str]:
    """``label_to_img.json``: {"MASK.png": "REFERENCE.jpg", ...}, checked to be that."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected a JSON object mapping \"MASK.png\" "
                        f"to \"REFERENCE.jpg\")") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise DataError(f"{path}: expected a JSON object mapping \"MASK.png\" to \"REFERENCE.jpg\"")
    return mapping

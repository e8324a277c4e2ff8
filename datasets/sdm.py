"""The four datasets of SDM (Wang et al. 2022): label conventions, folder layouts, instance edges.

Each dataset maps its stored label PNG to class indices 0..K-1 and, for three of them, adds one
channel to the mask: the instance edge map (1 where a pixel's instance id differs from one of its
4 neighbours, computed on both sides of every difference; ``instance_edges``).

============  ==========================================  =======  ====  =================
dataset       stored label -> class index                 classes  edge  size (H x W)
============  ==========================================  =======  ====  =================
cityscapes    ``*_gtFine_labelIds.png`` as is (0..33)     35       yes   256 x 512
ade20k        value - 1; 0 ("other", stored 0) -> 150     151      no    256 x 256
celeba        as is (0..18); edges from the label map     19       yes   256 x 256
coco          as is (0..181); 255 ("unlabeled") -> 182     183      yes   256 x 256
landscape     as is (0..28, 28 = "other")                 29       no    64 x 64 (demo)
============  ==========================================  =======  ====  =================

Instance maps are read as SDM's reader reads them: converted to 8-bit grey by PIL, which clips
every value above 255 to 255. Cityscapes stores thing instances as ``class * 1000 + n``: after
the clip all of them share the id 255, so SDM's edges separate a car from the road but not two
touching cars. The released checkpoints were trained on those edges, so ``instance_bits=8``
(SDM's) is the default; ``instance_bits=32`` keeps the full ids.

Folder layouts (``split`` is ``train`` or ``val``)::

    cityscapes  ROOT/leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png
                ROOT/gtFine/{train,val}/CITY/NAME_gtFine_labelIds.png, NAME_gtFine_instanceIds.png
    ade20k      ROOT/images/{training,validation}/NAME.jpg
                ROOT/annotations/{training,validation}/NAME.png
    celeba      ROOT/{train,test}/images/NAME.jpg, ROOT/{train,test}/labels/NAME.png
    coco        ROOT/{train,val}_img/NAME.jpg, ROOT/{train,val}_label/NAME.png, ROOT/{train,val}_inst/NAME.png
    landscape   ROOT/imgs/NAME.jpg, ROOT/labels/NAME.png (the challenge's; both splits read ROOT)

Samples come out at the dataset's size as SDM's loader makes them: photos halved with a box
filter while both sides are at least twice the target's, then resized bicubic; label and instance
maps resized nearest from their full size. ``random_crop`` is SDM's training view of its square
datasets (ADE20K, CelebAMask-HQ, COCO-Stuff): the short side scaled to a random length in
[S, ceil(1.25 S)] the same way, then a random S x S window (Cityscapes is only resized).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from datasets.io import open_image, load_image
from datasets.labels import DataError, one_hot, validate_label
from datasets.transforms import resize_image, resize_label

log = logging.getLogger("iidm.datasets")

# ------------------------------------------------------------------------------ conventions
def _identity(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.int64)


def _ade20k(stored: np.ndarray) -> np.ndarray:
    """ADE20K stores 0 for "other" and 1..150 for the classes: class = stored - 1, other -> 150."""
    label = stored.astype(np.int64) - 1
    label[label < 0] = 150
    return label


def _coco(stored: np.ndarray) -> np.ndarray:
    """COCO-Stuff stores 0..181 and 255 for "unlabeled", which becomes class 182."""
    label = stored.astype(np.int64)
    label[label == 255] = 182
    return label


@dataclass(frozen=True)
class SDMDataset:
    """The conventions of one of SDM's datasets.

    num_classes  one-hot channels of the label (SDM's ``--num_classes``)
    edges        whether the mask carries the instance edge channel (not ``--no_instance``)
    height, width  SDM's sample size
    other        the class index of "other" / "unlabeled" (None when the dataset has none)
    to_class     stored 8-bit label values -> class indices (int64)
    """

    name: str
    num_classes: int
    edges: bool
    height: int
    width: int
    other: int | None
    to_class: Callable[[np.ndarray], np.ndarray]

    @property
    def mask_channels(self) -> int:
        """Channels of the network's mask: the classes, plus 1 for the edge map."""
        return self.num_classes + int(self.edges)


SDM_DATASETS: dict[str, SDMDataset] = {
    "cityscapes": SDMDataset("cityscapes", 35, True, 256, 512, None, _identity),
    "ade20k": SDMDataset("ade20k", 151, False, 256, 256, 150, _ade20k),
    "celeba": SDMDataset("celeba", 19, True, 256, 256, None, _identity),
    "coco": SDMDataset("coco", 183, True, 256, 256, 182, _coco),
    # The challenge's landscapes (synthetic or real) in the same terms: 29 classes, 28 "other".
    "landscape": SDMDataset("landscape", 29, False, 64, 64, 28, _identity),
}


def sdm_dataset(name: str) -> SDMDataset:
    if name not in SDM_DATASETS:
        raise ValueError(f"unknown SDM dataset {name!r}; choose one of {sorted(SDM_DATASETS)}")
    return SDM_DATASETS[name]


def instance_edges(instance: np.ndarray) -> np.ndarray:
    """Instance edge map: float32 [..., H, W], 1 at every pixel whose id differs from its left,
    right, upper or lower neighbour (both pixels of a differing pair are marked), else 0."""
    ids = np.asarray(instance)
    if ids.ndim < 2:
        raise ValueError(f"instance map must be [..., H, W], got shape {ids.shape}")
    edge = np.zeros(ids.shape, dtype=bool)
    horizontal = ids[..., :, 1:] != ids[..., :, :-1]
    vertical = ids[..., 1:, :] != ids[..., :-1, :]
    edge[..., :, 1:] |= horizontal
    edge[..., :, :-1] |= horizontal
    edge[..., 1:, :] |= vertical
    edge[..., :-1, :] |= vertical
    return edge.astype(np.float32)


def sdm_mask(label: np.ndarray, instance: np.ndarray | None, dataset: SDMDataset) -> np.ndarray:
    """The network's mask [..., K(+1), H, W]: the one-hot label, then the edge channel when the
    dataset has one (``instance`` required then; SDM's CelebAMask-HQ passes the label map)."""
    mask = one_hot(label, dataset.num_classes)
    if not dataset.edges:
        return mask
    if instance is None:
        raise ValueError(f"{dataset.name}: the mask needs an instance map for its edge channel")
    if np.shape(instance) != np.shape(label):
        raise ValueError(f"instance map shape {np.shape(instance)} differs from the label's {np.shape(label)}")
    return np.concatenate([mask, instance_edges(instance)[..., None, :, :]], axis=-3)


# ------------------------------------------------------------------------------ reading files
def read_stored_label(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit label PNG (mode L or P) as stored, uint8 [H, W]."""
    path = Path(path)
    image = open_image(path)
    if image.mode not in ("L", "P"):
        raise DataError(f"{path}: a label map must be an 8-bit greyscale or palette PNG holding "
                        f"class values, got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8).copy()


def read_label(path: str | os.PathLike, dataset: SDMDataset) -> np.ndarray:
    """A stored label map -> class indices int64 [H, W], validated against the dataset."""
    label = dataset.to_class(read_stored_label(path))
    return validate_label(label, source=f"{path} ({dataset.name} label)", num_classes=dataset.num_classes)


def read_instance(path: str | os.PathLike, bits: int = 8) -> np.ndarray:
    """An instance map as int64 [H, W]; ``bits=8`` reads it as SDM does (PIL's 8-bit grey
    conversion: values above 255 become 255), ``bits=32`` keeps the stored ids."""
    if bits not in (8, 32):
        raise ValueError(f"instance bits must be 8 (SDM's reader) or 32, got {bits}")
    path = Path(path)
    image = open_image(path)
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"{path}: an instance map must be a greyscale integer PNG, got mode {image.mode}")
    if bits == 8:
        return np.asarray(image.convert("L"), dtype=np.int64)
    return np.asarray(image, dtype=np.int64)


# ------------------------------------------------------------------------------ layouts
def _files(folder: Path, suffixes: tuple[str, ...], recursive: bool) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def _pair(images: dict[str, Path], others: dict[str, Path], what: str, folder: Path) -> list[Path]:
    missing = sorted(set(images) - set(others))
    extra = sorted(set(others) - set(images))
    problems = []
    if missing:
        problems.append(f"photos without {what}: {', '.join(images[n].name for n in missing[:10])}"
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if extra:
        problems.append(f"{what} without a photo: {', '.join(others[n].name for n in extra[:10])}"
                        + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    if problems:
        raise DataError(f"{folder}: " + "; ".join(problems))
    return [others[n] for n in sorted(images)]


def _by_key(paths: list[Path], suffix: str, folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        if not p.name.endswith(suffix):
            continue
        key = str(p.relative_to(folder))[: -len(suffix)]
        out[key] = p
    return out


SPLITS = ("train", "val")


def layout(dataset: SDMDataset, root: str | os.PathLike, split: str = "val"
           ) -> tuple[list[str], list[Path], list[Path], list[Path] | None]:
    """(names, photo paths, label paths, instance paths or None) of a split, paired and checked."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    photos = (".jpg", ".jpeg", ".png")
    if dataset.name == "cityscapes":
        img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        images = _by_key(_files(img_dir, (".png",), True), "_leftImg8bit.png", img_dir)
        gt = _files(gt_dir, (".png",), True)
        labels = _pair(images, _by_key(gt, "_gtFine_labelIds.png", gt_dir), "a *_gtFine_labelIds.png", gt_dir)
        instances = _pair(images, _by_key(gt, "_gtFine_instanceIds.png", gt_dir), "a *_gtFine_instanceIds.png",
                          gt_dir)
    else:
        if dataset.name == "ade20k":
            sub = "training" if split == "train" else "validation"
            img_dir, lab_dir, inst_dir = root / "images" / sub, root / "annotations" / sub, None
        elif dataset.name == "landscape":
            img_dir, lab_dir, inst_dir = root / "imgs", root / "labels", None
        elif dataset.name == "celeba":
            sub = "train" if split == "train" else "test"
            img_dir, lab_dir, inst_dir = root / sub / "images", root / sub / "labels", None
        else:
            img_dir, lab_dir, inst_dir = root / f"{split}_img", root / f"{split}_label", root / f"{split}_inst"
        images = {p.stem: p for p in _files(img_dir, photos, False)}
        labels = _pair(images, {p.stem: p for p in _files(lab_dir, (".png",), False)}, "a label map", lab_dir)
        instances = None
        if inst_dir is not None:
            instances = _pair(images, {p.stem: p for p in _files(inst_dir, (".png",), False)}, "an instance map",
                              inst_dir)
        elif dataset.edges:
            instances = labels   # CelebAMask-HQ: SDM takes the edges of the label map itself
    if not images:
        raise DataError(f"{root}: no photos found for the {dataset.name} {split} split")
    names = sorted(images)
    return names, [images[n] for n in names], labels, instances


# ------------------------------------------------------------------------------ SDM's resizing
def reduce_photo(image: Image.Image, height: int, width: int) -> Image.Image:
    """SDM's downsampling before its bicubic resize: halve with a box filter (sides floored) while
    both sides are at least twice the target's (for a square target: the short side at least 2 S)."""
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    return image


def resize_photo(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A photo uint8 [H, W, 3] to (height, width) as SDM's loader: box halvings, then bicubic."""
    if image.shape[:2] == (height, width):
        return image
    return resize_image(np.asarray(reduce_photo(Image.fromarray(image), height, width)), height, width)


def random_crop(image: np.ndarray, label: np.ndarray, instance: np.ndarray | None, size: int,
                rng: np.random.Generator, min_fraction: float = 0.8, max_fraction: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """SDM's training view of a square dataset: the photo's short side scaled to a random integer
    length in [ceil(size / max_fraction), ceil(size / min_fraction)] (box halvings, then bicubic, the
    long side rounded), the label and instance maps resized nearest from their full size to the
    same shape, then one random ``size`` x ``size`` window of all three."""
    short = int(rng.integers(math.ceil(size / max_fraction), math.ceil(size / min_fraction) + 1))
    photo = reduce_photo(Image.fromarray(image), short, short)
    scale = short / min(photo.size)
    width, height = (round(side * scale) for side in photo.size)
    photo = np.asarray(photo.resize((width, height), resample=Image.BICUBIC), dtype=np.uint8)
    shared = instance is label   # a dataset whose edges come from the label map itself
    label = _resize_ids(label, height, width)
    if instance is not None:
        instance = label if shared else _resize_ids(instance, height, width)
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    label = label[window].copy()
    if instance is not None:
        instance = label if shared else instance[window].copy()
    return photo[window].copy(), label, instance


@dataclass(frozen=True)
class SDMSample:
    """One item: photo uint8 [H, W, 3], label int64 [H, W], mask float32 [K(+1), H, W]."""

    name: str
    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray


class SDMFolder:
    """A split of one of SDM's datasets in its standard layout, at the dataset's (or a given) size."""

    def __init__(self, dataset: str | SDMDataset, root: str | os.PathLike, split: str = "val",
                 height: int | None = None, width: int | None = None, instance_bits: int = 8):
        self.dataset = dataset if isinstance(dataset, SDMDataset) else sdm_dataset(dataset)
        self.height = height or self.dataset.height
        self.width = width or self.dataset.width
        self.instance_bits = instance_bits
        self.root, self.split = Path(root), split
        self.names, self.image_paths, self.label_paths, self.instance_paths = layout(self.dataset, root, split)

    def __len__(self) -> int:
        return len(self.names)

    def label(self, index: int, full: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(label int64, instance map int64 or None) at the folder's size (``full``: as stored)."""
        stored = read_label(self.label_paths[index], self.dataset)
        instance = None
        if self.dataset.edges:
            path = self.instance_paths[index]
            instance = stored if path == self.label_paths[index] else read_instance(path, self.instance_bits)
        if full:
            return stored, instance
        label = resize_label(stored.astype(np.uint8), self.height, self.width).astype(np.int64)
        if instance is not None:
            instance = label if instance is stored else _resize_ids(instance, self.height, self.width)
        return label, instance

    def photo(self, index: int, full: bool = False) -> np.ndarray:
        """The photo uint8 [H, W, 3] at the folder's size (``full``: as stored)."""
        image = load_image(self.image_paths[index])
        if not full and image.shape[:2] != (self.height, self.width):
            log.debug("%s: size %dx%d (HxW) resized to %dx%d", self.image_paths[index], *image.shape[:2],
                      self.height, self.width)
            image = resize_photo(image, self.height, self.width)
        return image

    def __getitem__(self, index: int) -> SDMSample:
        label, instance = self.label(index)
        return SDMSample(self.names[index], self.photo(index), label, sdm_mask(label, instance, self.dataset))


def _resize_ids(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize of an integer id map of any range (PIL, as the label maps)."""
    if ids.shape == (height, width):
        return ids
    image = Image.fromarray(ids.astype(np.int32), mode="I").resize((width, height), resample=Image.NEAREST)
    return np.asarray(image, dtype=np.int64)


def label_mask(path: str | os.PathLike, dataset: str | SDMDataset, instance_path: str | os.PathLike | None = None,
               height: int | None = None, width: int | None = None, instance_bits: int = 8
               ) -> tuple[np.ndarray, np.ndarray]:
    """A single label map (and its instance map) -> (label int64 [H, W], mask [K(+1), H, W]).
    Without an instance map, a dataset with edges takes them from the label map (as CelebAMask-HQ)."""
    ds = dataset if isinstance(dataset, SDMDataset) else sdm_dataset(dataset)
    height, width = height or ds.height, width or ds.width
    label = resize_label(read_label(path, ds).astype(np.uint8), height, width).astype(np.int64)
    instance = None
    if ds.edges:
        instance = label if instance_path is None else _resize_ids(read_instance(instance_path, instance_bits),
                                                                     height, width)
    return label, sdm_mask(label, instance, ds)

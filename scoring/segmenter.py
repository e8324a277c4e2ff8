"""A compact encoder-decoder segmenter for the mask accuracy M, trainable on the training set.

The challenge measures M with a SegFormer whose weights the organisers did not publish, and no
SegFormer weights can be fetched offline here; a SegFormer trained from scratch would need far more
data and compute than a CPU user has. So the plug-in segmenter is a small fully convolutional
U-Net-style encoder-decoder that trains on a CPU in minutes at small sizes and on a GPU at the
challenge's 384x512:

    encoder level 0:   2 x (3x3 conv -> BatchNorm -> ReLU) at full resolution, widths[0] channels
    encoder level k:   3x3 conv stride 2 -> BN -> ReLU, then 3x3 conv -> BN -> ReLU, widths[k]
    decoder level k:   nearest upsample to the skip's size, concatenate the skip (widths[k-1]),
                       2 x (3x3 conv -> BN -> ReLU) down to widths[k-1]
    head:              1x1 conv to num_classes logits

With the default five levels the deepest features are 1/16 of the input (24x32 at 384x512), which
gives the context needed to tell sky from sea or lake. Any input size works (stride-2 convolutions
round up; the decoder upsamples to each skip's exact size). Input: RGB uint8 mapped to [-1, 1].

M for one image is the pixel accuracy of the argmax prediction against its label map, the output
being resized (bicubic) to the size the segmenter was trained at and the prediction resized back
(nearest) to the label map's size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt
from jittor import nn

from datasets import NUM_CLASSES, resize_image, resize_label
from models.layers import Conv2d
from weights.checkpoint import WeightsError, config_from_dict, load_checkpoint, load_weights

CHECKPOINT_KIND = "segmenter"


@dataclass(frozen=True)
class SegmenterConfig:
    """Network shape and the (height, width) it is trained and run at."""

    widths: tuple[int, ...] = (32, 64, 128, 256, 256)
    num_classes: int = NUM_CLASSES
    height: int = 384
    width: int = 512

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) < 1 or min(self.widths) < 1:
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths}")
        if self.num_classes < 2 or self.height < 1 or self.width < 1:
            raise ValueError(f"need num_classes >= 2 and a positive size, got {self}")

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict) -> "SegmenterConfig":
        return config_from_dict(cls, data, source="segmenter config")


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm(out_channels)

    def execute(self, x):
        return nn.relu(self.bn(self.conv(x)))


class Segmenter(nn.Module):
    """``execute``: images [B, 3, H, W] in [-1, 1] -> class logits [B, num_classes, H, W]."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        widths = config.widths
        self.encoder = nn.ModuleList()
        for level, width in enumerate(widths):
            first = ConvBNReLU(3 if level == 0 else widths[level - 1], width, stride=1 if level == 0 else 2)
            self.encoder.append(nn.Sequential(first, ConvBNReLU(width, width)))
        self.decoder = nn.ModuleList()
        for level in range(len(widths) - 1, 0, -1):
            self.decoder.append(nn.Sequential(ConvBNReLU(widths[level] + widths[level - 1], widths[level - 1]),
                                              ConvBNReLU(widths[level - 1], widths[level - 1])))
        self.head = Conv2d(widths[0], config.num_classes, 1)

    def execute(self, x):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for stage in self.decoder:
            skip = skips.pop()
            x = nn.interpolate(x, size=tuple(skip.shape[2:]), mode="nearest")
            x = stage(jt.concat([x, skip], dim=1))
        return self.head(x)


def to_input(images: np.ndarray) -> jt.Var:
    """RGB uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected RGB uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return jt.array(np.ascontiguousarray(x))


def predict_labels(model: Segmenter, images: np.ndarray) -> np.ndarray:
    """Argmax class per pixel: RGB uint8 [B, H, W, 3] (already at the model's size) -> uint8 [B, H, W]."""
    with jt.no_grad():
        logits = model(to_input(images))
        return np.argmax(logits.numpy(), axis=1).astype(np.uint8)


def pixel_accuracy(predicted: np.ndarray, label: np.ndarray) -> float:
    """Fraction of pixels where the predicted class equals the label map's (shapes must agree)."""
    if predicted.shape != label.shape:
        raise ValueError(f"prediction {predicted.shape} and label map {label.shape} differ in size")
    return float(np.mean(predicted == label))


def mask_accuracy(model: Segmenter, image: np.ndarray, label: np.ndarray) -> float:
    """M of one generated image: RGB uint8 [H', W', 3] against its label map uint8 [H, W]."""
    config = model.config
    resized = resize_image(image, config.height, config.width)
    predicted = predict_labels(model, resized[None])[0]
    predicted = resize_label(predicted, *label.shape)
    return pixel_accuracy(predicted, label)


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """Rebuild a segmenter from a checkpoint written by ``python train.py segmenter`` (a run's training
    checkpoint or an exported one); eval mode."""
    checkpoint = load_checkpoint(path)
    if checkpoint.kind != CHECKPOINT_KIND:
        raise WeightsError(f"{path}: a {checkpoint.kind!r} checkpoint, expected a {CHECKPOINT_KIND!r} "
                           "checkpoint written by `python train.py segmenter`")
    model = Segmenter(checkpoint.network_config(SegmenterConfig))
    load_weights(model, checkpoint.weights("model"), str(path))
    model.eval()
    return model

"""Aesthetic score A: a NIMA model (Talebi & Milanfar 2018, "NIMA: Neural Image Assessment").

NIMA predicts the distribution of human ratings 1..10 of a photo: a CNN backbone, dropout, a
linear layer to 10 logits and a softmax. The score is the distribution's mean

    mean_score = sum_{i=1..10} i * p_i          (in [1, 10])

The challenge reports A in percent; its aesthetic model is not public. We report
A = 10 * mean_score, which puts the paper's A of 47-51 % at NIMA means of 4.7-5.1, where NIMA
models trained on AVA place ordinary photographs. This scaling is our reading, not the organisers'.

One architecture is implemented: the VGG16 NIMA of the widely used PyTorch implementation
(yunxiaoshi/Neural-IMage-Assessment): ``features`` = torchvision's VGG16 convolutions (3x3 conv +
ReLU, 2x2 max pool after each stage), ``classifier`` = Dropout(0.75), Linear(512*7*7, 10), softmax;
the parameter names are the same (``features.0.weight`` ... ``classifier.1.weight``), so its
published state dict loads by name. Input: the shorter side resized to 256 (bilinear), the central
224x224 crop (that implementation crops at random; a centre crop keeps scores deterministic),
RGB in [0, 1], optionally normalised with ImageNet's mean and std (``input_norm``). Smaller
configurations (fewer channels, a smaller crop) serve tests and quick experiments.

Weights: a checkpoint of this project (kind "aesthetic", config inside), or any state dict with
the default VGG16 configuration's names that ``weights.foreign.read_weights`` can read.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt
from jittor import nn

from models.layers import Conv2d
from weights.checkpoint import FORMAT_NAME, WeightsError, config_from_dict, load_weights

CHECKPOINT_KIND = "aesthetic"
INPUT_NORMS = ("unit", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class NimaConfig:
    """VGG-style backbone: ``stage_channels[k]`` channels for ``convs_per_stage[k]`` 3x3 convs, then a
    2x2 max pool; defaults are VGG16. ``image_size`` is the square crop, ``resize_to`` the shorter
    side before cropping."""

    stage_channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    convs_per_stage: tuple[int, ...] = (2, 2, 3, 3, 3)
    image_size: int = 224
    resize_to: int = 256
    num_bins: int = 10
    dropout: float = 0.75
    input_norm: str = "unit"

    def __post_init__(self):
        object.__setattr__(self, "stage_channels", tuple(int(c) for c in self.stage_channels))
        object.__setattr__(self, "convs_per_stage", tuple(int(n) for n in self.convs_per_stage))
        if len(self.stage_channels) != len(self.convs_per_stage) or not self.stage_channels:
            raise ValueError("stage_channels and convs_per_stage must be non-empty and of equal length")
        if self.image_size % 2 ** len(self.stage_channels) or self.resize_to < self.image_size:
            raise ValueError(f"image_size must be divisible by 2**stages and resize_to >= image_size, "
                             f"got {self.image_size}, {self.resize_to}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")

    @property
    def feature_size(self) -> int:
        side = self.image_size // 2 ** len(self.stage_channels)
        return self.stage_channels[-1] * side * side

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data, "stage_channels": list(self.stage_channels), "convs_per_stage": list(self.convs_per_stage)}

    @classmethod
    def from_dict(cls, data: dict) -> "NimaConfig":
        return config_from_dict(cls, data, source="aesthetic config")


class NIMA(nn.Module):
    """``execute``: preprocessed images [B, 3, S, S] -> rating distribution [B, num_bins] (softmax)."""

    def __init__(self, config: NimaConfig = NimaConfig()):
        super().__init__()
        self.config = config
        layers, channels = [], 3
        for width, count in zip(config.stage_channels, config.convs_per_stage):
            for _ in range(count):
                layers += [Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_size, config.num_bins))

    def execute(self, x):
        features = self.features(x).reshape(x.shape[0], -1)
        return nn.softmax(self.classifier(features), dim=1)


def preprocess(image: np.ndarray, config: NimaConfig) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, S, S]: shorter side to ``resize_to`` (bilinear), centre
    crop ``image_size``, /255, optional ImageNet normalisation."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    # torchvision's Resize(int) and CenterCrop rounding rules.
    if width <= height:
        new_width, new_height = config.resize_to, int(config.resize_to * height / width)
    else:
        new_width, new_height = int(config.resize_to * width / height), config.resize_to
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))
    top = int(round((new_height - config.image_size) / 2.0))
    left = int(round((new_width - config.image_size) / 2.0))
    crop = resized[top:top + config.image_size, left:left + config.image_size]
    x = crop.astype(np.float32).transpose(2, 0, 1) / 255.0
    if config.input_norm == "imagenet":
        x = (x - np.array(IMAGENET_MEAN, np.float32)[:, None, None]) / np.array(IMAGENET_STD, np.float32)[:, None, None]
    return x


def mean_score(probabilities: np.ndarray) -> np.ndarray:
    """sum_i i * p_i over bins i = 1..K: [..., K] -> [...]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities @ np.arange(1, probabilities.shape[-1] + 1, dtype=np.float64)


def aesthetic_percent(model: NIMA, images: list[np.ndarray]) -> np.ndarray:
    """A in percent (10 x NIMA mean score) of RGB uint8 images: float64 [N]."""
    batch = np.stack([preprocess(image, model.config) for image in images])
    with jt.no_grad():
        probabilities = model(jt.array(batch)).numpy()
    return 10.0 * mean_score(probabilities)


def load_aesthetic(path: str | os.PathLike) -> NIMA:
    """A NIMA from this project's checkpoint (its config inside) or, for any other weight file,
    the default VGG16 configuration with the weights checked name by name. Eval mode."""
    from weights.foreign import read_weights

    arrays, info = read_weights(path)
    checkpoint = info.checkpoint if info.format == "iidm-safetensors" else None
    if checkpoint is not None:
        if checkpoint["kind"] != CHECKPOINT_KIND:
            raise WeightsError(f"{path}: a {checkpoint['kind']!r} checkpoint, expected {CHECKPOINT_KIND!r}")
        config = config_from_dict(NimaConfig, checkpoint["config"].get("network", {}), complete=True,
                                  source=str(path))
    else:
        config = NimaConfig()
    model = NIMA(config)
    load_weights(model, arrays, f"{path} (read as {FORMAT_NAME if checkpoint else info.format})")
    model.eval()
    return model

"""The 29 landscape classes of the Jittor AI Challenge, in label order, and a display palette."""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "mountain", "sky", "water", "sea", "rock", "tree", "earth", "hill", "river", "sand",
    "land", "building", "grass", "plant", "person", "boat", "waterfall", "wall", "pier", "path",
    "lake", "bridge", "field", "road", "railing", "fence", "ship", "house", "other",
)
NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

# Display colours (RGB) for drawing label maps; chosen to be told apart, with natural hues for
# the common classes (sky blue, tree green, water blue...). For display only, never for training.
PALETTE = np.array([
    (120, 94, 60),    # mountain
    (135, 195, 235),  # sky
    (40, 110, 200),   # water
    (10, 60, 150),    # sea
    (128, 128, 128),  # rock
    (30, 120, 40),    # tree
    (150, 110, 70),   # earth
    (160, 180, 80),   # hill
    (70, 170, 220),   # river
    (235, 215, 150),  # sand
    (190, 150, 100),  # land
    (200, 60, 60),    # building
    (110, 200, 80),   # grass
    (60, 160, 120),   # plant
    (255, 100, 200),  # person
    (250, 160, 30),   # boat
    (200, 240, 255),  # waterfall
    (170, 90, 140),   # wall
    (140, 70, 20),    # pier
    (220, 190, 200),  # path
    (0, 150, 170),    # lake
    (110, 60, 170),   # bridge
    (220, 220, 60),   # field
    (70, 70, 90),     # road
    (250, 110, 80),   # railing
    (180, 130, 255),  # fence
    (255, 230, 0),    # ship
    (230, 120, 120),  # house
    (0, 0, 0),        # other
], dtype=np.uint8)

assert PALETTE.shape == (NUM_CLASSES, 3)


def colorize(label: np.ndarray) -> np.ndarray:
    """Label map [H, W] of class indices -> RGB uint8 [H, W, 3] in the display palette."""
    return PALETTE[np.asarray(label)]

"""Procedural landscapes: label maps drawn from a few of the 29 classes, and photo-like renderings
of them in a named style (noon, sunset, night...). Deterministic from a seed, numpy + cv2 only.

It is the test fixture, the demo data and the benchmark for small CPU-trained models, which learn
"mask + style reference photo -> photo": the style (sky, light, haze, foliage, snow) and a small
per-image palette jitter are carried by the photo only, never by the mask.

Scene classes (SCENE_CLASSES): sky, mountain, hill, sea, lake, water, river, grass, tree, sand,
rock, earth, field, plant, path, waterfall. Image i of a dataset uses np.random.default_rng([seed, i]).

    python -m datasets.synthetic --out DIR --n 200 --height 96 --width 128 --seed 0 [--sheet PNG]
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import cli
from datasets.classes import CLASS_INDEX, CLASS_NAMES, NUM_CLASSES, colorize

SCENE_CLASSES: tuple[str, ...] = ("sky", "mountain", "hill", "sea", "lake", "water", "river", "grass",
                                  "tree", "sand", "rock", "earth", "field", "plant", "path", "waterfall")
(SKY, MOUNTAIN, HILL, SEA, LAKE, WATER, RIVER, GRASS,
 TREE, SAND, ROCK, EARTH, FIELD, PLANT, PATH, WATERFALL) = (CLASS_INDEX[c] for c in SCENE_CLASSES)
GROUND = (GRASS, FIELD, EARTH, SAND, PATH)
LAND = GROUND + (HILL,)                       # where trees and bushes may stand
WATERS = (SEA, LAKE, WATER, RIVER)


# ---------------------------------------------------------------------------------------------- noise
def _noise(rng, height: int, width: int, cells: float, octaves: int = 3, aspect: float = 1.0) -> np.ndarray:
    """Fractal value noise [H, W] float32 with zero mean and unit std. `cells` features across the
    width at the coarsest octave, so the pattern scales with the image; aspect > 1 makes features
    wider than tall (clouds, ripples), < 1 taller than wide (gullies, falling water)."""
    out = np.zeros((height, width), np.float32)
    for o in range(octaves):
        gw = int(min(width, cells * 2 ** o)) + 2
        gh = int(min(height, cells * 2 ** o * height / width * aspect)) + 2
        grid = rng.standard_normal((gh, gw), dtype=np.float32)
        out += 0.5 ** o * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return (out - out.mean()) / (out.std() + 1e-6)


def _smooth1d(rng, width: int, knots: int) -> np.ndarray:
    """A smooth random curve [W] in 0..1 with about `knots` bumps (rolling hills, shorelines)."""
    curve = cv2.resize(rng.standard_normal((1, knots + 2)), (width, 1), interpolation=cv2.INTER_CUBIC)[0]
    return (curve - curve.min()) / (np.ptp(curve) + 1e-6)


def _ridge(rng, width: int, roughness: float = 0.55, levels: int = 9) -> np.ndarray:
    """1-D midpoint-displacement ridgeline [W] in 0..1. The depth is fixed, so a ridge has the same
    shape relative to the frame at every image size."""
    n = 2 ** levels
    pts = np.zeros(n + 1)
    pts[[0, -1]] = rng.uniform(-1, 1, 2)
    step, scale = n, 1.0
    while step > 1:
        pts[step // 2::step] = 0.5 * (pts[:-1:step] + pts[step::step]) + rng.uniform(-scale, scale, n // step)
        step, scale = step // 2, scale * roughness
    prof = np.interp(np.linspace(0, n, width), np.arange(n + 1), pts)
    return (prof - prof.min()) / (np.ptp(prof) + 1e-6)


# --------------------------------------------------------------------------------------- label maps
def _winding(rng, yc, xc, y0: float, height: int, width: int, near_width: float) -> np.ndarray:
    """Mask of a strip winding from row y0 (far, narrow) to the bottom edge (near, wide): river, path."""
    t = np.clip((yc - y0) / max(height - y0, 1e-3), 0, 1)
    x0, x1 = width * rng.uniform(0.25, 0.75, 2)
    swing = width * rng.uniform(0.05, 0.2)
    centre = x0 + (x1 - x0) * t + swing * np.sin(rng.uniform(2, 7) * t + rng.uniform(0, 6.3)) * t
    return (yc >= y0) & (np.abs(xc - centre) < width * near_width * (0.03 + t ** 1.3) / 2)


def _draw_tree(lab, x: float, y: float, size: float, conical: bool, rng) -> None:
    """Draw one tree standing at (x, y) in pixels, `size` pixels tall, with subpixel precision."""
    def pts(*xy):
        return np.round(np.array(xy, np.float64).reshape(-1, 2) * 16).astype(np.int32)
    w, trunk_top = max(size * 0.04, 0.3), y - 0.45 * size
    cv2.fillPoly(lab, [pts(x - w, y, x + w, y, x + w, trunk_top, x - w, trunk_top)], TREE, cv2.LINE_8, 4)
    if conical:   # a fir: stacked triangles, widest at the bottom
        for k in range(3):
            top, bot, half = y - size * (1 - 0.22 * k), y - size * (0.5 - 0.15 * k), size * (0.14 + 0.05 * k)
            cv2.fillPoly(lab, [pts(x, top, x + half, bot, x - half, bot)], TREE, cv2.LINE_8, 4)
        return
    r = 0.36 * size   # a broadleaf: a few overlapping disks make a blobby crown
    for dx, dy, dr in [(0, 0, 1)] + [tuple(rng.uniform((-.5, -.2, .5), (.5, .5, .75))) for _ in range(3)]:
        c = pts(x + dx * r, y - size + r + dy * r)[0]
        cv2.circle(lab, (int(c[0]), int(c[1])), int(round(dr * r * 16)), TREE, -1, cv2.LINE_8, 4)


def make_label(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random landscape label map: uint8 [height, width] with values in SCENE_CLASSES (0..28).

    Painter's order, far to near: sky, mountain ranges (fractal ridgelines), ground, rolling hills,
    a water body (sea at the horizon, a lake, or a winding river), path, waterfall, then trees,
    bushes and rocks sized by their distance below the horizon."""
    H, W = height, width
    yc, xc = (np.arange(H) + 0.5)[:, None], (np.arange(W) + 0.5)[None, :]
    lab = np.full((H, W), SKY, np.uint8)
    horizon = H * rng.uniform(0.36, 0.62)
    water = rng.choice(["sea", "lake", "river", "none"], p=[0.3, 0.25, 0.25, 0.2])
    _mountains(lab, rng, yc, horizon, water)
    _ground(lab, rng, yc, horizon, water)
    _waters(lab, rng, yc, xc, horizon, water)
    _objects(lab, rng, horizon)
    return lab


def _mountains(lab, rng, yc, horizon: float, water: str) -> None:
    """Zero to two ranges with fractal ridgelines, the second nearer and lower; by the sea a
    distant coast may sink into it."""
    H, W = lab.shape
    for r in range(rng.choice([0, 1, 2], p=[0.15, 0.5, 0.35])):
        prof = 0.2 + 0.8 * _ridge(rng, W, rng.uniform(0.45, 0.62))
        if water == "sea" and rng.random() < 0.6:
            ramp = np.clip((np.linspace(0, 1, W) - rng.uniform(0.1, 0.6)) / 0.3, 0, 1)
            prof *= (ramp if rng.random() < 0.5 else ramp[::-1]) ** 0.7
        top = horizon - H * rng.uniform(0.1, 0.28) * (1 - 0.4 * r) * prof
        lab[(yc >= top) & (yc < horizon)] = MOUNTAIN


def _ground(lab, rng, yc, horizon: float, water: str) -> None:
    """The ground below the horizon: a sea to a wavy, tilted shore with a beach below, or far and
    near ground (two kinds) with rolling hills."""
    H, W = lab.shape
    near = float(H - (H - horizon) * rng.uniform(0.15, 0.6))   # far/near ground boundary
    border = near + H * 0.04 * (_smooth1d(rng, W, 3) - 0.5)
    if water == "sea":
        shore = horizon + (H - horizon) * rng.uniform(0.2, 0.6)
        shore = shore + H * (0.03 * _smooth1d(rng, W, 4) + rng.uniform(-0.1, 0.1) * np.linspace(-1, 1, W))
        lab[int(np.ceil(horizon - 0.5)):] = rng.choice([SAND, SAND, GRASS, ROCK, EARTH])
        lab[(yc >= horizon) & (yc < np.maximum(shore, horizon + 1))] = SEA
        return
    far_g = rng.choice([GRASS, GRASS, FIELD, EARTH, SAND])
    lab[int(np.ceil(horizon - 0.5)):] = far_g
    if rng.random() < 0.5:
        lab[yc >= border] = rng.choice([g for g in (GRASS, FIELD, EARTH, SAND) if g != far_g])
    for k in range(rng.choice([0, 1, 2], p=[0.3, 0.4, 0.3])):   # rolling hills on the ground
        height_k = H * rng.uniform(0.03, 0.14) / (1 + k)
        top = horizon - height_k * (0.3 + 0.7 * _smooth1d(rng, W, rng.integers(1, 5)))
        base = horizon + (H - horizon) * rng.uniform(0.02, 0.25) + H * 0.02 * _smooth1d(rng, W, 3)
        lab[(yc >= top) & (yc < base)] = HILL


def _waters(lab, rng, yc, xc, horizon: float, water: str) -> None:
    """A lake (sometimes fed by a waterfall down the face behind it) or a winding river; a path;
    a forest edge along the horizon."""
    H, W = lab.shape
    if water == "lake":
        cy, cx = horizon + (H - horizon) * rng.uniform(0.08, 0.5), W * rng.uniform(0.2, 0.8)
        ry, rx = (H - horizon) * rng.uniform(0.08, 0.25), W * rng.uniform(0.2, 0.6)
        d = ((xc - cx) / rx) ** 2 + ((yc - cy) / ry) ** 2 + 0.25 * _noise(rng, H, W, 3)
        lab[(d < 1) & (yc >= horizon)] = LAKE if rng.random() < 0.7 else WATER
        if rng.random() < 0.35:
            wx, ww = cx + rx * rng.uniform(-0.5, 0.5), W * rng.uniform(0.003, 0.01) + 0.5
            top = horizon - H * rng.uniform(0.03, 0.15)   # narrow, widening as it falls
            fall = (np.abs(xc - wx) < ww * (1 + 2 * (yc - top) / H)) & (yc > top)
            lab[fall & np.isin(lab, (MOUNTAIN, HILL))] = WATERFALL
    elif water == "river":
        y0 = horizon + (H - horizon) * rng.uniform(0, 0.2)
        lab[_winding(rng, yc, xc, y0, H, W, rng.uniform(0.3, 0.7))] = RIVER if rng.random() < 0.8 else WATER
    if water != "river" and rng.random() < 0.3:
        y0 = horizon + (H - horizon) * rng.uniform(0.1, 0.5)
        lab[_winding(rng, yc, xc, y0, H, W, rng.uniform(0.15, 0.35)) & np.isin(lab, GROUND)] = PATH
    if water != "sea" and rng.random() < 0.5:
        a, b = sorted(W * rng.uniform(-0.3, 1.3, 2))
        bumps = H * rng.uniform(0.015, 0.05) * (0.4 + 0.6 * _smooth1d(rng, W, max(4, W // 6)))
        band = (yc >= horizon - bumps) & (yc < horizon + H * 0.01) & (xc > a) & (xc < b)
        lab[band & ~np.isin(lab, WATERS)] = TREE


def _objects(lab, rng, horizon: float) -> None:
    """Clusters of trees, rocks (on land or in shallow water) and bushes, sized by their distance
    below the horizon and drawn far to near."""
    H, W = lab.shape
    depth = lambda y: float(np.clip((y - horizon) / max(H - horizon, 1e-3), 0, 1))   # 0 far .. 1 near
    objects = []   # (base row, kind, x, size, conical)
    land = np.flatnonzero(np.isin(lab, LAND))
    for _ in range(rng.integers(0, 5) if land.size else 0):
        cy, cx = divmod(int(rng.choice(land)), W)
        conical, spread = rng.random() < 0.4, H * (0.03 + 0.4 * depth(cy) ** 1.3) * rng.uniform(0.4, 1.0)
        for _ in range(rng.integers(1, 8)):
            x, y = cx + 0.5 + spread * rng.normal(0, 1.2), cy + 0.5 + spread * rng.normal(0, 0.15)
            if 0 <= x < W and 0 <= y < H and lab[int(y), int(x)] in LAND:
                size = H * (0.03 + 0.4 * depth(y) ** 1.3) * rng.uniform(0.7, 1.3)
                objects.append((y, "tree", x, size, conical))
    for _ in range(rng.integers(0, 8)):
        y, x = H - (H - horizon) * rng.uniform(0, 1) ** 1.5, W * rng.uniform(0, 1)
        kind = "rock" if rng.random() < 0.6 else "plant"
        if y < H and lab[int(y), int(x)] in (LAND + WATERS if kind == "rock" else LAND):
            objects.append((y, kind, x, H * (0.01 + 0.1 * depth(y)) * rng.uniform(0.6, 1.4), False))
    for y, kind, x, size, conical in sorted(objects, key=lambda o: o[0]):
        if kind == "tree":
            _draw_tree(lab, x, y, size, conical, rng)
        else:
            ang = np.sort(rng.uniform(0, 2 * np.pi, 8))
            rad = size * rng.uniform(0.7, 1.2, 8)
            py = np.minimum(y - 0.4 * size + 0.6 * rad * np.sin(ang), y)   # flat underside
            poly = np.stack([x + rad * np.cos(ang), py], 1)
            value = ROCK if kind == "rock" else PLANT
            cv2.fillPoly(lab, [np.round(poly * 16).astype(np.int32)], value, cv2.LINE_8, 4)


# ------------------------------------------------------------------------------------------- styles
GREEN = ((0.13, 0.30, 0.11), (0.18, 0.34, 0.12), (0.10, 0.24, 0.12))


@dataclass(frozen=True)
class Style:
    """Light and palette of one style; colours are RGB in 0..1."""
    sky_top: tuple            # sky colour at the top of the frame
    sky_horizon: tuple        # ... and at the horizon; also the haze colour
    light: tuple              # colour x brightness of the light falling on the land
    sun: tuple                # sun (or moon) disc and glow colour
    sun_height: float         # disc height as a fraction of the sky above the horizon; < 0 hides it
    glow: float               # strength of the halo around the disc
    clouds: float             # cloud cover 0..1
    cloud: tuple              # lit cloud colour
    haze: float               # aerial perspective: far land fades towards sky_horizon
    contrast: float
    saturation: float
    shadow: float             # strength of relief shading and cast shadows
    foliage: tuple = GREEN    # tree colours, blended per clump
    grass: tuple = (1.0, 1.0, 1.0)   # multiplier on grass, hill and field
    snow: float = 0.0         # snow on mountains, land and trees
    stars: bool = False
    disc: float = 0.03        # disc radius, fraction of image height
    sun_x: float = 0.5        # set per image by the palette jitter


STYLE_TABLE: dict[str, Style] = {
    "noon": Style((0.20, 0.42, 0.82), (0.68, 0.80, 0.94), (1.05, 1.03, 0.97), (1.0, 1.0, 0.95), 1.1, 0.2,
                  0.35, (0.97, 0.97, 0.98), 0.35, 1.05, 1.1, 0.5),
    "sunset": Style((0.22, 0.18, 0.42), (1.0, 0.55, 0.25), (0.80, 0.50, 0.34), (1.0, 0.82, 0.5), 0.1, 1.0,
                    0.4, (0.95, 0.48, 0.38), 0.45, 1.15, 1.05, 0.7, grass=(1.05, 0.9, 0.7)),
    "overcast": Style((0.58, 0.60, 0.63), (0.78, 0.79, 0.80), (0.72, 0.74, 0.76), (1, 1, 1), -1, 0.0,
                      0.9, (0.70, 0.71, 0.74), 0.5, 0.85, 0.65, 0.1),
    "night": Style((0.01, 0.02, 0.07), (0.07, 0.10, 0.22), (0.28, 0.34, 0.52), (0.95, 0.95, 1.0), 0.55, 0.3,
                   0.15, (0.12, 0.13, 0.20), 0.25, 1.0, 0.6, 0.3, stars=True, disc=0.02),
    "dawn": Style((0.45, 0.55, 0.80), (1.0, 0.78, 0.70), (0.90, 0.76, 0.70), (1.0, 0.9, 0.75), 0.12, 0.6,
                  0.25, (1.0, 0.76, 0.76), 0.6, 0.95, 0.95, 0.5),
    "autumn": Style((0.28, 0.48, 0.80), (0.85, 0.82, 0.72), (1.05, 0.95, 0.82), (1.0, 0.95, 0.85), 0.7, 0.25,
                    0.3, (0.96, 0.95, 0.92), 0.35, 1.05, 1.1, 0.5,
                    foliage=((0.6, 0.3, 0.08), (0.7, 0.52, 0.14), (0.48, 0.16, 0.07), (0.22, 0.28, 0.1)),
                    grass=(1.35, 1.0, 0.65)),
    "winter": Style((0.52, 0.66, 0.85), (0.88, 0.90, 0.93), (0.95, 0.98, 1.05), (1.0, 1.0, 0.97), 0.3, 0.2,
                    0.4, (0.92, 0.93, 0.96), 0.4, 1.0, 0.75, 0.35,
                    foliage=((0.08, 0.17, 0.12), (0.12, 0.2, 0.14)), snow=0.85),
    "misty": Style((0.70, 0.74, 0.76), (0.86, 0.88, 0.88), (0.85, 0.87, 0.88), (1, 1, 1), -1, 0.0,
                   0.6, (0.82, 0.84, 0.85), 0.85, 0.75, 0.6, 0.1),
}
STYLES: tuple[str, ...] = tuple(STYLE_TABLE)

# Daylight albedo (RGB) and texture amplitudes (low-frequency, flat mid, fine noise) per class; classes
# the generator never draws render as neutral grey, so any 0..28 label map can be rendered.
ALBEDO = np.tile(np.float32([0.5, 0.5, 0.5, 0.1, 0.1, 0.1]), (NUM_CLASSES, 1))
for _name, _row in {
    "mountain": (0.46, 0.44, 0.44, 0.12, 0.1, 0.06), "hill": (0.34, 0.48, 0.22, 0.1, 0.12, 0.06),
    "grass": (0.32, 0.52, 0.18, 0.1, 0.15, 0.1), "field": (0.78, 0.68, 0.35, 0.06, 0.1, 0.06),
    "earth": (0.50, 0.37, 0.25, 0.1, 0.18, 0.12), "sand": (0.88, 0.80, 0.60, 0.04, 0.05, 0.04),
    "rock": (0.48, 0.46, 0.44, 0.1, 0.12, 0.12), "tree": (0.13, 0.30, 0.11, 0, 0, 0),
    "plant": (0.22, 0.42, 0.16, 0.1, 0.15, 0.2), "path": (0.66, 0.58, 0.46, 0.06, 0.1, 0.08),
    "sea": (0.04, 0.20, 0.36, 0, 0, 0), "lake": (0.07, 0.28, 0.32, 0, 0, 0),
    "water": (0.10, 0.26, 0.30, 0, 0, 0), "river": (0.14, 0.32, 0.36, 0, 0, 0),
    "waterfall": (0.85, 0.90, 0.95, 0, 0, 0), "sky": (0, 0, 0, 0, 0, 0),
}.items():
    ALBEDO[CLASS_INDEX[_name]] = _row


def _jitter(style: Style, rng) -> tuple[Style, np.ndarray]:
    """The per-image look: the style's colours and every class's albedo jittered a few percent, and
    a random sun position, so that no two images share exact colours."""
    j = lambda c, s=0.06: tuple(np.clip(np.asarray(c) * np.exp(rng.normal(0, s, 3)), 0, 1.2))
    look = replace(style, sky_top=j(style.sky_top), sky_horizon=j(style.sky_horizon),
                   light=j(style.light, 0.04), cloud=j(style.cloud),
                   clouds=float(np.clip(style.clouds + rng.uniform(-0.15, 0.15), 0, 1)),
                   sun_x=float(rng.uniform(0.1, 0.9)), sun_height=style.sun_height * rng.uniform(0.8, 1.2),
                   foliage=tuple(j(c, 0.08) for c in style.foliage),
                   snow=style.snow or (0.25 if rng.random() < 0.3 else 0.0))   # sometimes snow caps only
    albedo = ALBEDO[:, :3] * np.exp(rng.normal(0, 0.07, (NUM_CLASSES, 3))).astype(np.float32)
    if rng.random() < 0.4:
        albedo[FIELD] = (0.45, 0.6, 0.25)   # green crops instead of ripe ones
    return look, albedo


# ---------------------------------------------------------------------------------------- rendering
def _horizon(label: np.ndarray) -> float:
    """Horizon row estimated from the mask: the lowest sky/mountain pixel of any column."""
    far = np.isin(label, (SKY, MOUNTAIN, WATERFALL))
    cols = far.any(0)
    return float((label.shape[0] - np.argmax(far[::-1], 0))[cols].max()) if cols.any() else 0.0


def _relief(height_field: np.ndarray, light: tuple[float, float]) -> np.ndarray:
    """Lambert-like shading [H, W] in -1..1 of a height field lit from direction `light` (x, y)."""
    gx, gy = (cv2.Sobel(height_field.astype(np.float32), cv2.CV_32F, dx, 1 - dx, ksize=3) for dx in (1, 0))
    shade = gx * light[0] + gy * light[1]
    return np.clip(shade / (shade.std() + 1e-6), -2, 2) / 2


@dataclass
class _Canvas:
    """What the rendering stages share: the label map, the per-image look, the horizon, pixel
    coordinates, the base noise fields and the light."""

    label: np.ndarray
    st: Style
    albedo: np.ndarray
    horizon: float
    yc: np.ndarray
    xc: np.ndarray
    depth: np.ndarray         # 0 at the horizon, 1 at the bottom
    low: np.ndarray
    mid: np.ndarray
    fine: np.ndarray
    leaf: np.ndarray          # leafy clumps in crowns
    sun: np.ndarray           # (x, y) of the disc
    light_dir: tuple

    def is_(self, *classes) -> np.ndarray:
        return np.isin(self.label, classes)


def render_photo(label: np.ndarray, style: str, rng: np.random.Generator,
                 look: int | None = None) -> np.ndarray:
    """Render a label map uint8 [H, W] as an RGB photo uint8 [H, W, 3] in one of STYLES.

    Textures and clouds come from `rng`; the palette jitter and sun position come from
    np.random.default_rng(look) when `look` is given (so two masks can share one exact look, as a
    test image shares its reference's), else from `rng`. Stages, back to front: sky, land colour,
    light, water, photo finish."""
    if style not in STYLE_TABLE:
        raise ValueError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    label = np.asarray(label)
    H, W = label.shape
    st, albedo = _jitter(STYLE_TABLE[style], np.random.default_rng(look) if look is not None else rng)
    horizon = _horizon(label)
    yc, xc = (np.arange(H, dtype=np.float32) + 0.5)[:, None], (np.arange(W, dtype=np.float32) + 0.5)[None, :]
    depth = np.clip((yc - horizon) / max(H - horizon, 1.0), 0, 1)
    low, mid, fine = _noise(rng, H, W, 3), _noise(rng, H, W, 12), _noise(rng, H, W, 128, 1)
    leaf = _noise(rng, H, W, 64, 2)
    sun = np.float32([st.sun_x * W, horizon * (1 - st.sun_height)])
    light_dir = (-1.0 if st.sun_x > 0.5 else 1.0, 0.6)                      # light comes from the sun's side
    c = _Canvas(label, st, albedo, horizon, yc, xc, depth, low, mid, fine, leaf, sun, light_dir)
    sky = _sky(c, rng)
    surf, mtn, rise, gully = _land_colour(c, rng)
    img = np.where(c.is_(SKY)[..., None], sky, _lit(c, surf, mtn, rise, gully, sky))
    img = _water(c, rng, img, sky)
    return _finish(c, rng, img)


def _sky(c: _Canvas, rng) -> np.ndarray:
    """Vertical gradient, sun or moon glow, clouds (flattened noise), stars."""
    st, (H, W) = c.st, c.label.shape
    t = np.clip(c.yc / max(c.horizon, 1.0), 0, 1)[..., None] ** 1.3
    img = np.broadcast_to(np.float32(st.sky_top) * (1 - t) + np.float32(st.sky_horizon) * t, (H, W, 3)).copy()
    dist = np.hypot(c.xc - c.sun[0], c.yc - c.sun[1]) / H
    cloud_n = _noise(rng, H, W, 3, 6, aspect=3.0)
    dens = np.clip((cloud_n - 1.6 + 2.8 * st.clouds) / 0.5, 0, 1) * np.clip(1.4 - t[..., 0], 0, 1)
    cloud = np.float32(st.cloud) * (0.85 + 0.1 * c.mid - 0.075 * np.clip(cloud_n, 0, 2))[..., None]
    img = img * (1 - dens[..., None]) + cloud * dens[..., None]
    if st.stars:
        stars = (rng.random((H, W)) < 0.004) * rng.uniform(0.3, 1.0, (H, W))
        img += (stars * (1 - dens) * (1 - t[..., 0]))[..., None].astype(np.float32)
    if st.sun_height > 0:
        halo = st.glow * (0.6 * np.exp(-dist / 0.25) + 0.4 * np.exp(-dist / 0.05))
        disc = np.clip((st.disc - dist) * H / 1.5 + 0.5, 0, 1) * (1 - 0.8 * dens)
        img += np.float32(st.sun) * (halo * (1 - 0.5 * dens) + disc)[..., None]
    return img


def _land_colour(c: _Canvas, rng):
    """Jittered albedo x (1 + textures; ground texture lies flat), foliage colour per tree clump,
    field furrows converging on the horizon, forested mountain feet, snow above a snowline.
    Returns (surface colour, mountain mask, rise of each row up the mountains, gully noise)."""
    st, label, (H, W) = c.st, c.label, c.label.shape
    yc, xc, horizon = c.yc, c.xc, c.horizon
    amp = ALBEDO[:, 3:]
    flat = _noise(rng, H, W, 8, 3, aspect=3.0)
    surf = c.albedo[label] * (1 + amp[label, 0] * c.low + amp[label, 1] * flat + amp[label, 2] * c.fine)[..., None]
    surf[c.is_(GRASS, HILL, FIELD, PLANT)] *= np.float32(st.grass)
    pick = np.clip((_noise(rng, H, W, 4) + 1.5) / 3, 0, 1) * (len(st.foliage) - 1)   # blend along the palette
    k = pick.astype(int)
    f, fol = (pick - k)[..., None], np.float32(st.foliage + st.foliage[-1:])
    tree = c.is_(TREE)
    surf[tree] = ((fol[k] * (1 - f) + fol[k + 1] * f) * (1 + 0.1 * c.mid + 0.25 * c.leaf)[..., None])[tree]
    angle = np.arctan2(xc - W * (0.3 + 0.4 * st.sun_x), np.maximum(yc - horizon, 0.5) * 3)
    surf[c.is_(FIELD)] *= (1 + 0.08 * np.sin(angle * 50))[..., None][c.is_(FIELD)]
    mtn = c.is_(MOUNTAIN)
    crest = np.argmax(mtn, 0).astype(np.float32)[None, :]                 # top row of mountain per column
    peak = crest[0][mtn.any(0)].min() if mtn.any() else horizon
    rise = np.clip((horizon - yc) / max(horizon - peak, 1.0), 0, 1)        # 0 at the foot .. 1 at the peak
    gully = _noise(rng, H, W, 6, 4, aspect=0.35)
    forest = np.clip((0.45 - rise) * 4 + 0.5 * c.low, 0, 1) * (1 - st.snow)
    forest = 0.7 * forest[..., None]
    surf[mtn] = (surf * (1 - forest) + np.float32([0.15, 0.24, 0.12]) * forest)[mtn]
    snowline = 1.0 - st.snow * 0.9 + 0.12 * gully + 0.05 * c.mid            # in units of `rise`
    snowy = (mtn & (rise > snowline) & (horizon - peak > 0.1 * H)) | (st.snow > 0.5) & (
        c.is_(*LAND) | c.is_(ROCK) & (c.low + c.fine > 0.3) | tree & (c.leaf > 1.4))
    surf[snowy] = np.float32([0.92, 0.94, 0.98]) * (0.97 + 0.03 * c.fine[snowy, None])
    return surf, mtn, rise, gully


def _lit(c: _Canvas, surf: np.ndarray, mtn: np.ndarray, rise: np.ndarray, gully: np.ndarray,
         sky: np.ndarray) -> np.ndarray:
    """Relief of the mountains (gullies) and of round objects (blurred masks, inside them only),
    cast shadows of trees, aerial perspective towards the horizon colour."""
    st, (H, W), light_dir = c.st, c.label.shape, c.light_dir
    objects = c.is_(TREE, ROCK, PLANT).astype(np.float32)
    s = max(H / 60, 0.7)
    shade = 0.5 * _relief(gully + 0.5 * c.low + 3 * rise, light_dir) * mtn
    shade += _relief(cv2.GaussianBlur(objects, (0, 0), s) + 0.05 * c.leaf, light_dir) * objects
    hills = c.is_(HILL).astype(np.float32)
    shade += 0.4 * _relief(cv2.GaussianBlur(hills, (0, 0), 4 * s) + 0.2 * c.low, light_dir) * hills
    reach = H * (0.01 + 0.06 * (1 - np.clip(st.sun_height, 0, 1)))   # low sun, long shadows
    shift = np.float32([[1, 0, -light_dir[0] * reach], [0, 1, H * 0.01]])
    cast = cv2.GaussianBlur(cv2.warpAffine(c.is_(TREE).astype(np.float32), shift, (W, H)), (0, 0), s) * c.is_(*LAND)
    shade = (1 + st.shadow * 0.8 * shade) * (1 - 0.6 * st.shadow * cast)
    lit = surf * np.float32(st.light) * shade[..., None]
    haze = st.haze * np.where(mtn | c.is_(WATERFALL), 0.5 + 0.4 * np.clip(c.yc / max(c.horizon, 1), 0, 1) ** 4,
                              np.where(c.is_(HILL), 0.4, 0.8 * (1 - c.depth) ** 3))
    return lit * (1 - haze[..., None]) + np.float32(st.sky_horizon) * haze[..., None]


def _water(c: _Canvas, rng, img: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """Water mirrors what stands above its near edge; ripples and sun glitter break the mirror."""
    st, label, (H, W) = c.st, c.label, c.label.shape
    yc, xc, depth = c.yc, c.xc, c.depth
    wet = c.is_(*WATERS)
    if wet.any():
        starts = wet & ~np.vstack([np.zeros((1, W), bool), wet[:-1]])
        axis = np.maximum.accumulate(np.where(starts, np.arange(H)[:, None], 0), 0)   # top row of each run
        ripple = _noise(rng, H, W, 16, 3, aspect=8.0)
        src_y = np.clip(2 * axis - yc - 1, 0, H - 1).astype(int)
        src_x = np.clip(xc + ripple * W * 0.004 * (1 + 3 * depth), 0, W - 1).astype(int)
        sky_y = np.clip(2 * c.horizon - yc, 0, H - 1).astype(int)   # flat banks mirror no height: show the sky
        mirror = np.where(np.isin(label[src_y, src_x], GROUND + WATERS)[..., None], sky[sky_y, src_x],
                          img[src_y, src_x])
        fresnel = (0.75 - 0.45 * depth)[..., None]
        water = c.albedo[label] * np.float32(st.light) * (1 + 0.25 * ripple[..., None])
        water = mirror * fresnel * (1 + 0.1 * ripple[..., None]) + water * (1 - fresnel)
        if st.sun_height > 0:
            path = np.exp(-((xc - c.sun[0]) / (W * (0.03 + 0.1 * depth))) ** 2)   # widening towards us
            glitter = np.clip(ripple + c.fine - 0.8, 0, None) * path
            water += np.float32(st.sun) * (0.5 * st.glow * glitter)[..., None]
        to_land = cv2.distanceTransform((~c.is_(*LAND, ROCK)).astype(np.uint8), cv2.DIST_L2, 3)
        foam = c.is_(SEA) & (depth > 0.05) & (to_land < H * 0.012)
        water[foam] = water[foam] * 0.4 + 0.6 * np.float32(st.light) * 0.9
        img[wet] = water[wet]
    fall = c.is_(WATERFALL)
    img[fall] *= (0.85 + 0.15 * _noise(rng, H, W, 20, 2, aspect=0.1))[fall, None]
    return img


def _finish(c: _Canvas, rng, img: np.ndarray) -> np.ndarray:
    """Soft class borders, grading, vignette, grain; float RGB in 0..1 -> uint8."""
    st, label, (H, W) = c.st, c.label, c.label.shape
    edges = np.zeros((H, W), np.float32)
    edges[1:] += label[1:] != label[:-1]
    edges[:, 1:] += label[:, 1:] != label[:, :-1]
    soft = max(0.6, H / 300)
    w = np.clip(cv2.GaussianBlur(edges, (0, 0), soft) * 2.5, 0, 1)[..., None]
    img = img + (cv2.GaussianBlur(img, (0, 0), soft) - img) * w
    lum = img.mean(2, keepdims=True)
    img = lum + (img - lum) * st.saturation
    img = img.mean() + (img - img.mean()) * st.contrast
    img *= (1 - 0.25 * (((c.xc - W / 2) / W) ** 2 + ((c.yc - H / 2) / H) ** 2))[..., None]
    img += rng.normal(0, 0.012, (H, W, 1)).astype(np.float32)   # luminance grain
    img += rng.normal(0, 0.004, (H, W, 3)).astype(np.float32)   # and a little chroma grain
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _scene(rng, height: int, width: int, style: str | None):
    label = make_label(rng, height, width)
    style = STYLES[rng.integers(len(STYLES))] if style is None else style
    look = int(rng.integers(2 ** 62))
    return render_photo(label, style, rng, look=look), label, style, look


def make_scene(rng: np.random.Generator, height: int, width: int, style: str | None = None):
    """A random scene: (image uint8 [H, W, 3], label uint8 [H, W], style name); a random style if None."""
    return _scene(rng, height, width, style)[:3]


# ------------------------------------------------------------------------------------------ outputs
def write_dataset(out_dir, n: int, height: int, width: int, seed: int = 0, n_test: int | None = None,
                  overwrite: bool = False) -> dict:
    """Write the challenge layout: train/imgs/NAME.jpg, train/labels/NAME.png, test/labels/NAME.png,
    test/imgs/NAME.jpg (ground truth in the style and look of its reference),
    test/labels/label_to_img.json (beside the masks, as the challenge ships it)
    (test mask -> training reference image) and styles.json (every image name -> style).

    Image NAME = f"{i:05d}" uses np.random.default_rng([seed, i]); test names continue after the n
    training ones. With overwrite=True existing train/ and test/ folders are deleted first."""
    out = Path(out_dir)
    n_test = max(1, n // 10) if n_test is None else n_test
    if n < 1 or n_test < 0:
        raise ValueError(f"need n >= 1 and n_test >= 0, got n={n}, n_test={n_test}")
    for sub in ("train", "test"):
        if (out / sub).exists():
            if not overwrite:
                raise ValueError(f"{out} already contains a '{sub}' folder; "
                                 "pass overwrite=True (--overwrite) to replace it")
            shutil.rmtree(out / sub)
    for sub in ("train/imgs", "train/labels", "test/imgs", "test/labels"):
        (out / sub).mkdir(parents=True)
    styles, looks, pairs = {}, [], {}
    counts = np.zeros(NUM_CLASSES, np.int64)
    for i in range(n + n_test):
        name, rng = f"{i:05d}", np.random.default_rng([seed, i])
        if i < n:
            image, label, style, look = _scene(rng, height, width, None)
            looks.append(look)
            split = "train"
            counts += np.bincount(label.ravel(), minlength=NUM_CLASSES)
        else:
            label = make_label(rng, height, width)
            ref = int(rng.integers(n))
            style = styles[f"{ref:05d}.jpg"]
            image = render_photo(label, style, rng, look=looks[ref])
            pairs[f"{name}.png"], split = f"{ref:05d}.jpg", "test"
        styles[f"{name}.jpg"] = style
        Image.fromarray(image, "RGB").save(out / split / "imgs" / f"{name}.jpg", quality=95)
        Image.fromarray(label, "L").save(out / split / "labels" / f"{name}.png")
    (out / "test" / "labels" / "label_to_img.json").write_text(json.dumps(pairs, indent=1) + "\n")
    (out / "styles.json").write_text(json.dumps(styles, indent=1) + "\n")
    freq = counts / counts.sum()
    return {"out_dir": str(out), "n_train": n, "n_test": n_test, "height": height, "width": width,
            "seed": seed,
            "styles": {s: list(styles.values())[:n].count(s) for s in STYLES},
            "class_freq": {CLASS_NAMES[c]: round(float(freq[c]), 4) for c in np.flatnonzero(freq)}}


def contact_sheet(out_path, seed: int = 0, rows: int = 4, cols: int = 3, height: int = 96,
                  width: int = 128) -> None:
    """Write a PNG grid of rows x cols (mask | photo) pairs cycling through the styles, the style
    written under each pair, plus a last row with one mask rendered in 2*cols-1 styles."""
    gap, text_h = max(2, width // 40), max(12, height // 7)
    pair_w = 2 * width + gap
    sheet = np.full(((rows + 1) * (height + text_h) + gap, cols * pair_w + (cols + 1) * gap, 3), 24, np.uint8)
    font = 0.3 * max(1.0, height / 96)

    def put(image, text, row, slot):   # slot k: k-th image position of the row, pairs gap-separated
        x = gap + (slot // 2) * (pair_w + gap) + (slot % 2) * (width + gap)
        y = gap + row * (height + text_h)
        sheet[y:y + height, x:x + width] = image
        cv2.putText(sheet, text, (x + 2, y + height + text_h - 4), cv2.FONT_HERSHEY_SIMPLEX, font,
                    (220, 220, 220), 1, cv2.LINE_AA)

    for k in range(rows * cols):
        style = STYLES[k % len(STYLES)]
        image, label, _ = make_scene(np.random.default_rng([seed, k]), height, width, style)
        put(colorize(label), "", k // cols, 2 * (k % cols))
        put(image, style, k // cols, 2 * (k % cols) + 1)
    rng = np.random.default_rng([seed, 99991])
    label = make_label(rng, height, width)
    put(colorize(label), "same mask:", rows, 0)
    for s, style in enumerate(STYLES[:2 * cols - 1]):
        put(render_photo(label, style, np.random.default_rng([seed, 99991, s])), style, rows, s + 1)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    # 256 colours keep a 4x3 sheet near 120 KB (small enough to commit) instead of ~430 KB.
    Image.fromarray(sheet).quantize(256, method=Image.Quantize.MEDIANCUT).save(out_path, optimize=True)


def main(argv=None) -> None:
    p = cli.ArgumentParser(description="Write a synthetic landscape dataset and/or a contact sheet.")
    p.add_argument("--output_path", help="dataset folder (gets train/, test/, styles.json)")
    p.add_argument("--n", type=int, default=200, help="number of training images")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_test", type=int, default=None, help="number of test masks (default n // 10)")
    p.add_argument("--overwrite", action="store_true", help="replace existing train/ and test/ folders")
    p.add_argument("--sheet", help="also (or only) write a contact sheet PNG here")
    p.alias("--out", "--output_path")
    a = p.parse_args(argv)
    if a.output_path is None and a.sheet is None:
        p.error("give --output_path DIR and/or --sheet PNG")
    done = []
    if a.output_path is not None:
        s = write_dataset(a.output_path, a.n, height=a.height, width=a.width, seed=a.seed, n_test=a.n_test,
                          overwrite=a.overwrite)
        done.append(f"wrote {s['n_train']} train + {s['n_test']} test images of {a.height}x{a.width} "
                    f"to {a.output_path}, styles {s['styles']}")
    if a.sheet is not None:
        contact_sheet(a.sheet, seed=a.seed, height=a.height, width=a.width)
        done.append(f"contact sheet {a.sheet}")
    print("; ".join(done))


if __name__ == "__main__":
    main()

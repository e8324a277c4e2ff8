"""Pixel-space SDM sampling: N samples per mask, classifier-free guidance as one batched network
call, SDM's 1000-step ancestral sampler with learned variance or the project's fast solvers.

    eps = eps(x_t, t, null) + s (eps(x_t, t, mask) - eps(x_t, t, null))   (eps only; the variance
                                                                           from the masked pass)
    x_{t-1} = mu(x_t, x0(eps) clipped to [-1, 1]) + exp(log Sigma / 2) z  (Improved DDPM, learned range)

Sample k of mask NAME takes its noise from a generator seeded by (seed, "NAME#k") alone, so an
output is the same whatever the batch it lands in, and a resumed run writes what an uninterrupted
one would have.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

from datasets.classes import colorize
from datasets.io import atomic_write, save_image
from datasets.sdm import SDMDataset
from ldm.guidance import classifier_free_guidance
from ldm.pipeline import image_seed
from ldm.respace import solver_timesteps, space_timesteps
from ldm.samplers import PerImageNoise, ddim_sample, ddpm_sample, dpm_solver_pp_2m, unipc
from ldm.schedule import Schedule
from training.state import to_uint8

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "unipc")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++2m": 25, "unipc": 25}


@dataclass(frozen=True)
class SDMModel:
    """A published SDM configuration: the dataset, the U-Net preset, the upstream flags file the
    converter reads, and the guidance scale of SDM's sampling scripts."""

    dataset: str
    preset: str
    flags: str
    guidance: float


REPO = Path(__file__).resolve().parent.parent
SDM_MODELS: dict[str, SDMModel] = {
    name: SDMModel(name, f"sdm-{name}", f"configs/sdm/{name}.flags", scale)
    for name, scale in (("cityscapes", 2.0), ("ade20k", 1.5), ("celeba", 1.5), ("coco", 1.5))
}
DEMO_GUIDANCE = 1.5
DEMO_CHECKPOINT = REPO / "checkpoints" / "sdm_demo" / "unet.safetensors"


def default_guidance(dataset: str) -> float:
    return SDM_MODELS[dataset].guidance if dataset in SDM_MODELS else DEMO_GUIDANCE


def sample_timesteps(schedule: Schedule, sampler: str, steps: int) -> list[int]:
    """The training timesteps a sampler visits from pure noise, descending: ``ddpm``/``ddim`` as
    guided-diffusion's ``timestep_respacing="N"`` keeps them (all T at N = T, SDM's default);
    the multistep solvers uniform in log-SNR."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    top = schedule.num_timesteps
    if not 1 <= steps <= top:
        raise ValueError(f"steps must be in [1, {top}], got {steps}")
    if sampler in ("ddpm", "ddim"):
        return sorted(space_timesteps(top, [steps]), reverse=True)
    return list(solver_timesteps(schedule, top - 1, steps))


def sample_masks(unet, schedule: Schedule, masks: np.ndarray, names: Sequence[str], *, scale: float,
                 sampler: str = "ddpm", steps: int = 1000, seed: int = 0) -> np.ndarray:
    """One sample per mask: masks float32 [B, K, H, W], names [B] ("NAME#k", the noise key) ->
    RGB uint8 [B, H, W, 3]. ``unet(x_t, t, mask)`` predicts eps (and v)."""
    masks = np.asarray(masks, dtype=np.float32)
    noise = PerImageNoise([image_seed(seed, name) for name in names])
    mask = jt.array(masks)
    model_fn = classifier_free_guidance(unet, mask, scale)
    x = noise((masks.shape[0], 3) + masks.shape[2:])
    ts = sample_timesteps(schedule, sampler, steps)
    with jt.no_grad():
        if sampler == "ddpm":
            out = ddpm_sample(model_fn, schedule, x, ts, noise_fn=noise, clip_denoised=True)
        elif sampler == "ddim":
            out = ddim_sample(model_fn, schedule, x, ts, clip_denoised=True)
        elif sampler == "dpm++2m":
            out = dpm_solver_pp_2m(model_fn, schedule, x, ts, clip_denoised=True)
        else:
            out = unipc(model_fn, schedule, x, ts, clip_denoised=True)
    return to_uint8(out.numpy())


def output_path(folder: Path, name: str, k: int) -> Path:
    """Where sample ``k`` of mask ``name`` goes ("/" in Cityscapes names becomes "__")."""
    return Path(folder) / f"{name.replace('/', '__')}_{k}.png"


RUN_FILE = "sdm.json"


def label_path(folder: Path, name: str) -> Path:
    """Where the class-index label map of mask ``name`` is kept beside its samples."""
    return Path(folder) / "labels" / f"{name.replace('/', '__')}.png"


def label_picture(label: np.ndarray, dataset: SDMDataset) -> np.ndarray:
    """A label map [H, W] as RGB uint8: the landscape palette, else a fixed random colour per class."""
    if dataset.name == "landscape":
        return np.asarray(colorize(label.astype(np.uint8)))
    colours = np.random.default_rng(0).integers(0, 256, size=(dataset.num_classes, 3)).astype(np.uint8)
    return colours[np.asarray(label, dtype=np.int64)]


def contact_sheet(labels: Sequence[np.ndarray], samples: Sequence[Sequence[np.ndarray]], dataset: SDMDataset,
                  gap: int = 2) -> np.ndarray:
    """One row per mask: the coloured label, then its samples; white gaps. RGB uint8."""
    rows = []
    for label, images in zip(labels, samples):
        tiles = [label_picture(label, dataset)] + list(images)
        h, w = tiles[0].shape[:2]
        row = np.full((h, len(tiles) * (w + gap) - gap, 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            row[:, i * (w + gap): i * (w + gap) + w] = tile
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.full((sum(r.shape[0] + gap for r in rows) - gap, width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        sheet[y:y + r.shape[0], :r.shape[1]] = r
        y += r.shape[0] + gap
    return sheet


def write_gallery(folder: Path, names: Sequence[str], labels: Sequence[np.ndarray], num_samples: int,
                  dataset: SDMDataset, title: str) -> Path:
    """``folder/gallery.html``: per mask its coloured label and its samples (links relative, so the
    folder can be moved); the coloured labels go to ``folder/gallery/``."""
    folder = Path(folder)
    lines = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>body{{background:#202124;color:#e8eaed;"
             "font-family:sans-serif}img{height:128px;margin:2px;image-rendering:pixelated}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<table>"]
    for name, label in zip(names, labels):
        mask_png = folder / "gallery" / f"{name.replace('/', '__')}_mask.png"
        save_image(mask_png, label_picture(label, dataset))
        cells = [f'<img src="gallery/{html.escape(mask_png.name)}" alt="mask {html.escape(name)}">']
        for k in range(num_samples):
            path = output_path(folder, name, k)
            cells.append(f'<img src="{html.escape(path.name)}" alt="sample {k}">' if path.is_file()
                         else f"<span>sample {k}: not generated</span>")
        lines.append(f"<tr><td>{html.escape(name)}</td><td>{''.join(cells)}</td></tr>")
    lines += ["</table></body></html>", ""]
    page = folder / "gallery.html"
    with atomic_write(page, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return page

"""An HTML page to look at generated landscapes: one row per mask,

    reference | mask in the class palette, with a legend of its classes | output | rounds (when kept)

Image paths in the page are relative to it, so the folder can be moved or copied whole. The
coloured masks are written as PNGs into ``gallery/`` beside the page.

    python -m tools.gallery --results OUT --input_path MASKS --img_path TRAIN_ROOT  (or write_gallery from code)
"""

from __future__ import annotations

import html
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np

from datasets import CLASS_NAMES, PALETTE, DataError, colorize, load_label, save_image
from datasets.io import atomic_write
from datasets.landscape import test_entries

log = logging.getLogger("iidm.gallery")

PAGE = "gallery.html"
MASK_FOLDER = "gallery"
ROUNDS_FOLDER = "rounds"
DISPLAY_HEIGHT = 160  # pixels; rounds at half that


def round_path(results: Path, name: str, index: int) -> Path:
    """Where ``infer.py --save_rounds`` keeps round ``index`` of image ``name``."""
    return Path(results) / ROUNDS_FOLDER / f"{name}_round{index}.jpg"


def find_rounds(results: Path, name: str) -> list[Path]:
    """The kept round images of ``name``, in round order."""
    folder = Path(results) / ROUNDS_FOLDER
    pattern = re.compile(re.escape(name) + r"_round(\d+)\.jpg$")
    found = [(int(m.group(1)), p) for p in folder.glob(f"{name}_round*.jpg")
             if (m := pattern.match(p.name))] if folder.is_dir() else []
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class GalleryRow:
    """One mask: its name, label map uint8 [H, W], reference photo path, output path, rounds."""

    name: str
    label: np.ndarray
    reference: Path
    output: Path
    rounds: Sequence[Path] = field(default_factory=tuple)


def _src(path: Path, page_dir: Path) -> str:
    return quote(Path(os.path.relpath(Path(path).resolve(), page_dir.resolve())).as_posix())


def _img(path: Path, page_dir: Path, alt: str) -> str:
    if not Path(path).is_file():
        return f'<div class="missing">{html.escape(alt)}: not generated</div>'
    return f'<img src="{_src(path, page_dir)}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


def legend_html(label: np.ndarray) -> str:
    """The classes present in a label map, most frequent first: palette swatch, name, share of
    the pixels (an HTML list styled by ``LEGEND_STYLE``)."""
    counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
    items = []
    for index in np.argsort(-counts, kind="stable"):
        if counts[index] == 0:
            break
        r, g, b = (int(v) for v in PALETTE[index])
        share = 100.0 * counts[index] / label.size
        shown = f"{share:.0f}%" if share >= 0.5 else "&lt;1%"
        items.append(f'<li><span class="swatch" style="background:rgb({r},{g},{b})"></span>'
                     f'{html.escape(CLASS_NAMES[index])} <small>{shown}</small></li>')
    return '<ul class="legend">' + "".join(items) + "</ul>"


LEGEND_STYLE = """\
.legend { list-style: none; margin: 0; padding: 0; font-size: 11px; line-height: 15px; white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px;
          vertical-align: -1px; border: 1px solid #5f6368; }
"""

STYLE = f"""
body {{ font-family: sans-serif; background: #202124; color: #e8eaed; margin: 16px; }}
table {{ border-collapse: collapse; }}
th {{ text-align: left; font-weight: normal; color: #9aa0a6; padding: 4px 8px; }}
td {{ vertical-align: top; padding: 4px 8px; }}
td.name {{ font-family: monospace; white-space: nowrap; }}
img {{ height: {DISPLAY_HEIGHT}px; display: block; }}
.mask {{ display: flex; gap: 6px; }}
.mask img {{ image-rendering: pixelated; }}
{LEGEND_STYLE}.rounds {{ display: flex; gap: 4px; }}
.rounds figure {{ margin: 0; }}
.rounds img {{ height: {DISPLAY_HEIGHT // 2}px; }}
figcaption {{ font-size: 11px; color: #9aa0a6; }}
.missing {{ height: {DISPLAY_HEIGHT}px; color: #f28b82; }}
small {{ color: #9aa0a6; }}
"""


def write_gallery(page: Path, rows: Sequence[GalleryRow], title: str = "IIDM results") -> Path:
    """Write the page at ``page`` (and its coloured masks in ``gallery/`` beside it); returns it."""
    page = Path(page)
    page_dir = page.parent
    page_dir.mkdir(parents=True, exist_ok=True)
    with_rounds = any(row.rounds for row in rows)
    header = ["name", "reference", "mask", "output"] + (["rounds"] if with_rounds else [])
    lines = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<table>",
             "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for row in rows:
        mask_png = page_dir / MASK_FOLDER / f"{row.name}_mask.png"
        save_image(mask_png, colorize(row.label))
        cells = [f'<td class="name">{html.escape(row.name)}</td>',
                 f"<td>{_img(row.reference, page_dir, 'reference ' + row.reference.name)}</td>",
                 f'<td><div class="mask">{_img(mask_png, page_dir, "mask " + row.name)}'
                 f"{legend_html(row.label)}</div></td>",
                 f"<td>{_img(row.output, page_dir, 'output ' + row.name)}</td>"]
        if with_rounds:
            images = "".join(f"<figure>{_img(p, page_dir, f'round {k} of {row.name}')}"
                             f"<figcaption>round {k}</figcaption></figure>" for k, p in enumerate(row.rounds))
            cells.append(f'<td><div class="rounds">{images}</div></td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</table>", "</body></html>", ""]
    with atomic_write(page, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return page


def gallery_rows(results: Path, mask_dir: Path, img_root: Path, mapping_file: Path | None = None
                 ) -> list[GalleryRow]:
    """Rows for every mask in ``mask_dir`` whose output exists in ``results``."""
    rows = []
    for entry in test_entries(mask_dir, img_root, mapping_file):
        output = Path(results) / f"{entry.name}.jpg"
        if not output.is_file() or entry.reference_path is None:
            continue
        try:
            label = load_label(entry.mask_path)
        except DataError as exc:
            log.warning("gallery: %s left out (%s)", entry.mask_path.name, exc)
            continue
        rows.append(GalleryRow(entry.name, label, entry.reference_path, output,
                               tuple(find_rounds(results, entry.name))))
    return rows

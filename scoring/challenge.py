"""The third Jittor AI Challenge's score of generated images: mask accuracy M, aesthetic score A,
FID, style similarity S and the total T (the IIDM paper's Eq. 8; the challenge's formula):

    T = M/100 * [0.2*A + 0.3*(S*0.5 + 50) + 0.5*(100 - FID)]      (all in percent, FID capped at 100)

``score_results`` scores a folder of results ``NAME.jpg`` against a test split's masks and the
references they name; ``gather_results`` checks beforehand, with no model, that every result
exists and decodes in full at its mask's size. A metric whose network is not given is skipped,
and T is then not computed. ``python -m tools.score`` is the command around this module; its
help describes the layout, the models and the output files (``write_csv``, ``write_json``,
``table_lines``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DataError, TestSet, load_label
from datasets.io import IMAGE_SUFFIXES, atomic_write, sha256_of
from datasets.landscape import find_image_folder
from scoring.style_similarity import DEFAULT_MODE, MODES, read_bgr, style_similarity

log = logging.getLogger("iidm.score")

METRICS = ("M", "A", "FID", "S")
FID_CAP = 100.0
CSV_COLUMNS = ("name", "reference", "S_rgb", "S_hsv", "S", "pixel_accuracy", "aesthetic")


# ------------------------------------------------------------------------------------- total
def score_terms(M=None, A=None, FID=None, S=None) -> dict[str, float]:
    """The bracket's terms of T for the metrics given (percent): 0.2*A, 0.3*(S*0.5 + 50),
    0.5*(100 - min(FID, 100)); and the factor M/100."""
    terms = {}
    if A is not None:
        terms["0.2*A"] = 0.2 * A
    if S is not None:
        terms["0.3*(S*0.5+50)"] = 0.3 * (S * 0.5 + 50.0)
    if FID is not None:
        terms["0.5*(100-FID)"] = 0.5 * (100.0 - min(FID, FID_CAP))
    if M is not None:
        terms["M/100"] = M / 100.0
    return terms


def total_score(M: float, A: float, FID: float, S: float) -> float:
    """T = M/100 * [0.2*A + 0.3*(S*0.5 + 50) + 0.5*(100 - FID)], FID capped at 100 (all percent)."""
    for name, value in (("M", M), ("A", A), ("FID", FID), ("S", S)):
        if value is None or not math.isfinite(value):
            raise ValueError(f"T needs all four metrics; {name} is {value}")
    return M / 100.0 * (0.2 * A + 0.3 * (S * 0.5 + 50.0) + 0.5 * (100.0 - min(FID, FID_CAP)))


def total_lines(metrics: dict[str, float | None]) -> list[str]:
    """Lines that state T, or say plainly that it is not computed, which metrics are missing, and
    the terms that are available."""
    missing = [name for name in METRICS if metrics.get(name) is None]
    if not missing:
        lines = [f"T: {total_score(*(metrics[name] for name in METRICS)):.2f}"]
        if metrics["FID"] > FID_CAP:
            lines.append(f"   (FID {metrics['FID']:.2f} counted as {FID_CAP:.0f} in T)")
        return lines
    terms = score_terms(**{name: metrics.get(name) for name in METRICS})
    lines = [f"T: not computed ({', '.join(missing)} skipped)"]
    if terms:
        lines.append("   available terms: " + ", ".join(f"{k} = {v:.2f}" for k, v in terms.items()))
    return lines


# ------------------------------------------------------------------------------------ scoring
@dataclass
class ImageScore:
    """One result image; S values, pixel accuracy and aesthetic in percent (None: skipped)."""

    name: str
    reference: str
    s_rgb: float
    s_hsv: float
    s: float
    pixel_accuracy: float | None = None
    aesthetic: float | None = None

    def row(self) -> list[str]:
        def fmt(value):
            return "" if value is None else f"{value:.4f}"
        return [self.name, self.reference, fmt(self.s_rgb), fmt(self.s_hsv), fmt(self.s),
                fmt(self.pixel_accuracy), fmt(self.aesthetic)]


@dataclass
class Report:
    images: list[ImageScore]
    metrics: dict[str, float | None]
    skipped: dict[str, str]
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        metrics = dict(self.metrics)
        metrics["T"] = (total_score(*(metrics[n] for n in METRICS))
                        if all(metrics.get(n) is not None for n in METRICS) else None)
        return {"metrics": metrics, "skipped": self.skipped, **self.details,
                "terms": score_terms(**{n: self.metrics.get(n) for n in METRICS})}


def _mean(values):
    return float(sum(values) / len(values))


class BadResults(DataError):
    """Result images that cannot be scored; ``bad`` lists (name, path, problem)."""

    def __init__(self, results: Path, bad: list[tuple[str, Path, str]]):
        lines = "\n".join(f"  {path}: {problem}" for _, path, problem in bad)
        super().__init__(f"{results}: {len(bad)} result(s) cannot be scored (fix or regenerate them, or pass "
                         f"--skip_bad to score the others):\n{lines}")
        self.bad = bad


def result_problem(path: Path, height: int, width: int) -> str | None:
    """Why the result image ``path`` cannot be scored, or None: it must decode in full (every
    byte of the image data present) to a ``width`` x ``height`` picture."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if ImageFile.LOAD_TRUNCATED_IMAGES:     # set by some library: it would fill a cut image with grey
        return "cannot check: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process"
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
    except UnidentifiedImageError:
        return "not an image file"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot be decoded in full ({exc})"
    if size != (width, height):
        return f"{size[1]}x{size[0]} (height x width), but its mask is {height}x{width}"
    return None


def find_bad_results(paths: list[Path], mask_paths: list[Path]) -> list[tuple[str, Path, str]]:
    """(name, path, problem) of every result that does not decode in full to its mask's size."""
    from PIL import Image

    bad = []
    for path, mask_path in zip(paths, mask_paths):
        with Image.open(mask_path) as mask:
            width, height = mask.size
        problem = result_problem(path, height, width)
        if problem:
            bad.append((path.stem, path, problem))
    return bad


@dataclass
class ScoringInput:
    """The test set, each mask's result file, and the results that cannot be scored."""

    test_set: TestSet
    paths: list[Path]
    bad: list[tuple[str, Path, str]]


def gather_results(results: Path, mask_dir: Path, img_root: Path, mapping_file: Path | None = None) -> ScoringInput:
    """Read the test set, find every result and decode each in full (no model is needed)."""
    test_set = TestSet(mask_dir, img_root, mapping_file=mapping_file)
    paths = _result_paths(Path(results), test_set.names)
    return ScoringInput(test_set, paths, find_bad_results(paths, test_set.mask_paths))


def _result_paths(results: Path, names: list[str]) -> list[Path]:
    paths = [results / f"{name}.jpg" for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{results}: {len(missing)} of {len(paths)} results not found: {shown} "
                        "(every mask needs its NAME.jpg)")
    return paths


def training_images(img_root: Path) -> list[Path]:
    """All photos of the training root's imgs/ (or of the folder itself), sorted."""
    folder = find_image_folder(img_root)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise DataError(f"{folder}: no training photos found for FID")
    return paths


def score_results(results: Path, mask_dir: Path, img_root: Path, style_mode: str = DEFAULT_MODE,
                  segmenter=None, aesthetic=None, inception=None, inception_path: Path | None = None,
                  fid_cache: Path | None = None, batch_size: int = 50, log_every: int = 100,
                  mapping_file: Path | None = None, skip_bad: bool = False,
                  gathered: ScoringInput | None = None) -> Report:
    """Score every ``results/NAME.jpg`` against its mask and reference. ``segmenter``, ``aesthetic``
    and ``inception`` are loaded networks or None (skipped). Bad results (``result_problem``)
    raise ``BadResults``, or with ``skip_bad`` are left out and listed in the summary.
    ``gathered`` is ``gather_results``'s answer when the caller has it already."""
    gathered = gathered or gather_results(Path(results), mask_dir, img_root, mapping_file)
    if gathered.bad and not skip_bad:
        raise BadResults(Path(results), gathered.bad)
    bad_names = {name for name, _, _ in gathered.bad}
    if len(bad_names) == len(gathered.paths):
        raise BadResults(Path(results), gathered.bad)
    for name, path, problem in gathered.bad:
        log.warning("%s: not scored: %s", path, problem)
    test_set = gathered.test_set
    keep = [i for i, name in enumerate(test_set.names) if name not in bad_names]
    paths = [gathered.paths[i] for i in keep]
    other_mode = next(m for m in MODES if m != style_mode)
    if segmenter is not None:
        from scoring.segmenter import mask_accuracy
    if aesthetic is not None:
        from scoring.aesthetic import aesthetic_percent
    images, other = [], []
    start = time.time()
    for count, (index, path) in enumerate(zip(keep, paths)):
        name, mask_path = test_set.names[index], test_set.mask_paths[index]
        reference_name = test_set.reference_paths[index].name
        output = read_bgr(path)
        # The reference as the script reads it: cv2.imread, at its own size.
        reference = read_bgr(test_set.reference_paths[index])
        s = style_similarity(output, reference, style_mode)
        other.append(style_similarity(output, reference, other_mode))
        score = ImageScore(name, reference_name, 100 * s.rgb, 100 * s.hsv, 100 * s.value)
        rgb = output[..., ::-1]
        if segmenter is not None:
            label = load_label(mask_path, test_set.num_classes)
            score.pixel_accuracy = 100 * mask_accuracy(segmenter, rgb.copy(), label)
        if aesthetic is not None:
            score.aesthetic = float(aesthetic_percent(aesthetic, [rgb.copy()])[0])
        images.append(score)
        if (count + 1) % log_every == 0:
            log.info("scored %d/%d images (%.0f s)", count + 1, len(paths), time.time() - start)

    metrics: dict[str, float | None] = {name: None for name in METRICS}
    skipped: dict[str, str] = {}
    metrics["S"] = _mean([i.s for i in images])
    details = {
        "images": len(images),
        "bad_results": [{"name": name, "file": str(path), "problem": problem} for name, path, problem in gathered.bad],
        "results": str(results), "input_path": str(mask_dir), "img_path": str(img_root),
        "style_similarity": {
            "mode": style_mode, "S": metrics["S"],
            "S_rgb": _mean([i.s_rgb for i in images]), "S_hsv": _mean([i.s_hsv for i in images]),
            other_mode: {"S": 100 * _mean([o.value for o in other]),
                         "S_rgb": 100 * _mean([o.rgb for o in other]),
                         "S_hsv": 100 * _mean([o.hsv for o in other])},
        },
        "models": {"segmenter": None, "aesthetic": None, "inception": None},
    }
    if segmenter is not None:
        metrics["M"] = _mean([i.pixel_accuracy for i in images])
    else:
        skipped["M"] = "no segmenter given (--segmenter)"
    if aesthetic is not None:
        metrics["A"] = _mean([i.aesthetic for i in images])
    else:
        skipped["A"] = "no aesthetic model given (--aesthetic)"
    if inception is None:
        skipped["FID"] = "no Inception weights given (--inception)"
    elif len(paths) < 2:
        skipped["FID"] = f"FID needs at least 2 results, got {len(paths)}"
    else:
        metrics["FID"], details["fid"] = _fid(paths, img_root, inception, inception_path, fid_cache, batch_size)
    return Report(images, metrics, skipped, details)


def network_digest(module) -> str:
    """sha256 over a network's arrays (names, shapes, bytes, in name order): the identity of
    weights given in memory, so two networks never share cached statistics."""
    import hashlib

    import numpy as np

    from weights.checkpoint import module_arrays

    digest = hashlib.sha256()
    for name, value in sorted(module_arrays(module).items()):
        digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _fid(paths, img_root, inception, inception_path, fid_cache, batch_size):
    from scoring import fid

    feature_fn = fid.inception_features(inception)
    train_paths = training_images(img_root)
    weights_id = sha256_of(inception_path) if inception_path else network_digest(inception)
    cache_dir = Path(fid_cache) if fid_cache else default_fid_cache()

    def progress(what):
        def report(done, total):
            if done == total or done % (batch_size * 20) < batch_size:
                log.info("FID features of %s: %d/%d", what, done, total)
        return report

    train = fid.cached_statistics(train_paths, feature_fn, weights_id, cache_dir, batch_size,
                                  progress("training photos"))
    log.info("training statistics %s %s", "read from" if train.from_cache else "written to", train.path)
    mu, sigma = fid.activation_statistics(paths, feature_fn, batch_size, progress("results"))
    value = fid.frechet_distance(mu, sigma, train.mu, train.sigma)
    return value, {"results": len(paths), "training_images": len(train_paths),
                   "training_statistics": str(train.path), "statistics_from_cache": train.from_cache,
                   "capped_at_100_in_T": value > FID_CAP}


def default_fid_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iidm-jittor" / "fid"


# ------------------------------------------------------------------------------------ output
def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_csv(path: Path, images: list[ImageScore]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for image in images:
        writer.writerow(image.row())
    _atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, summary: dict) -> None:
    _atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def table_lines(report: Report) -> list[str]:
    """The printed summary: one line per metric, then T (or why not)."""
    style = report.details["style_similarity"]
    notes = {
        "M": "mask accuracy, plug-in segmenter (%)",
        "A": "aesthetic score, 10 x NIMA mean (%)",
        "FID": "against the training photos",
        "S": f"style similarity, {style['mode']} mode (%)",
    }
    bad = report.details.get("bad_results", [])
    lines = [f"{report.details['images']} images" + (f" ({len(bad)} bad result(s) not scored: "
                                                       f"{', '.join(b['name'] for b in bad)})" if bad else ""),
             f"{'metric':<6} {'value':>8}  note"]
    for name in METRICS:
        value = report.metrics.get(name)
        shown = f"{value:8.2f}" if value is not None else f"{'skipped':>8}"
        note = notes[name] if value is not None else report.skipped.get(name, "")
        lines.append(f"{name:<6} {shown}  {note}")
    lines.append(f"{'':<6} {'':>8}  S_rgb {style['S_rgb']:.2f}, S_hsv {style['S_hsv']:.2f}")
    return lines + total_lines(report.metrics)

"""SDM's evaluation of a ``sample_sdm.py`` output folder, as the SDM paper scores its samples: FID,
mIoU through a segmenter plug-in, and diversity (the mean pairwise LPIPS among the samples of one
mask; the pixel-difference analogue needs no weights). ``python -m tools.score_sdm`` is its command;
its help describes the folder and each metric.

Call it after ``jittor_env.setup()``: the metrics' networks load Jittor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SampledRun:
    """A ``sample_sdm.py`` output folder as its ``sdm.json`` describes it: the masks' names, the
    dataset (``datasets.sdm``) and the samples per mask."""

    folder: Path
    names: list[str]
    dataset: Any
    count: int

    @classmethod
    def read(cls, folder: str | Path) -> SampledRun:
        from datasets.sdm import sdm_dataset
        from synthesis.sdm import RUN_FILE

        path = Path(folder) / RUN_FILE
        try:
            run = json.loads(path.read_text())
            dataset, count = sdm_dataset(run["dataset"]), int(run["num_samples"])
            return cls(Path(folder), list(run["names"]), dataset, count)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a sample_sdm.py run description ({exc!r})") from None


def score_sdm_results(sampled: SampledRun, real: str | Path | None = None, inception: str | Path | None = None,
                      segmenter: str | Path | None = None, lpips_alex: str | Path | None = None,
                      lpips_heads: str | Path | None = None) -> dict:
    """The scores of a sampled folder (``NAME_k.png`` samples, ``labels/NAME.png``): pixel diversity
    always (two samples per mask or more), LPIPS diversity with ``lpips_alex`` and ``lpips_heads``,
    mIoU with ``segmenter``, FID with ``real`` photos and ``inception`` weights; a metric left out
    is named under "skipped" with why. Missing samples raise ``DataError``."""
    from PIL import Image

    from datasets import DataError
    from datasets.io import IMAGE_SUFFIXES, load_image
    from datasets.transforms import resize_image, resize_label
    from scoring.sdm_metrics import confusion_matrix, mean_iou, pixel_diversity
    from synthesis.sdm import label_path, output_path
    from weights.checkpoint import WeightsError

    for name, given, partner, needed in (("inception", inception, "real", real),
                                         ("lpips_alex", lpips_alex, "lpips_heads", lpips_heads)):
        if (given is None) != (needed is None):
            raise ValueError(f"{name} and {partner} go together: give both or neither")
    results, names, dataset, count = sampled.folder, sampled.names, sampled.dataset, sampled.count
    scores: dict = {"results": str(results), "dataset": dataset.name, "masks": len(names),
                    "samples_per_mask": count, "skipped": {}}
    samples = []
    for name in names:
        paths = [output_path(results, name, k) for k in range(count)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{results}: samples missing for {name}: {', '.join(missing)} (run sample_sdm.py "
                            "again with the same options to finish)")
        samples.append([load_image(p) for p in paths])
    labels = [np.asarray(Image.open(label_path(results, n)), np.int64) for n in names]
    if count >= 2:
        scores["pixel_diversity"] = float(np.mean([pixel_diversity(s) for s in samples]))
    else:
        scores["skipped"]["diversity"] = "one sample per mask"
    if lpips_alex and count >= 2:
        from scoring.lpips_alex import load_lpips_alex, mean_pairwise_lpips

        model = load_lpips_alex(lpips_alex, lpips_heads)
        scores["lpips_diversity"] = float(np.mean([mean_pairwise_lpips(model, s) for s in samples]))
    elif count >= 2:
        scores["skipped"]["lpips_diversity"] = "no LPIPS weights (--lpips_alex, --lpips_heads)"
    if segmenter:
        from scoring.segmenter import load_segmenter, predict_labels

        network = load_segmenter(segmenter)
        config = network.config
        if config.num_classes != dataset.num_classes:
            raise WeightsError(f"{segmenter}: segments {config.num_classes} classes, {dataset.name} has "
                               f"{dataset.num_classes}")
        confusion = np.zeros((dataset.num_classes,) * 2, np.int64)
        for images, label in zip(samples, labels):
            predicted = predict_labels(network, resize_image(images[0], config.height, config.width)[None])[0]
            predicted = resize_label(predicted, *label.shape)
            confusion += confusion_matrix(predicted, label, dataset.num_classes, ignore=dataset.other)
        scores["miou"] = mean_iou(confusion)[0]
    else:
        scores["skipped"]["miou"] = "no segmenter (--segmenter)"
    if inception:
        from scoring.fid import activation_statistics, frechet_distance, inception_features, load_inception

        real_paths = sorted(p for p in Path(real).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        features = inception_features(load_inception(inception))
        mu_real, sigma_real = activation_statistics(real_paths, features)
        mu_fake, sigma_fake = activation_statistics([output_path(results, n, 0) for n in names], features)
        scores["fid"] = frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    else:
        scores["skipped"]["fid"] = "no --real photos and --inception weights"
    return scores

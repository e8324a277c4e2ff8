"""Score SDM samples as the SDM paper does: FID, mIoU through a segmenter plug-in, and diversity
(the mean pairwise LPIPS among the samples of one mask).

    python -m tools.score_sdm --results OUT [--real PHOTOS --inception pt_inception-2015-12-05-6726825d.pth]
        [--segmenter SEG.safetensors] [--lpips_alex alexnet-owt-7be5be79.pth --lpips_heads lpips_weights.ckpt]
        [--json FILE]

OUT is a ``sample_sdm.py`` output folder: ``NAME_k.png`` samples, ``labels/NAME.png`` class-index
label maps and ``sdm.json`` (dataset, samples per mask).

* FID (scoring/fid.py): sample 0 of every mask against the photos of ``--real`` (e.g. the
  dataset's validation photos), with pytorch-fid's Inception weights.
* mIoU (scoring/sdm_metrics.py): a segmenter written by ``python train.py segmenter`` for the
  dataset's classes, on sample 0 of every mask against its label; the dataset's "other" class
  is left out. The paper's segmenters (DRN-D-105, UperNet101, a U-Net, DeepLabV2) are not
  reproduced: mIoU through another segmenter measures the same thing on another scale.
* LPIPS diversity (scoring/lpips_alex.py): mean pairwise LPIPS-AlexNet among the samples of each
  mask, averaged over masks. It needs the published AlexNet and LPIPS weights.
* Pixel diversity: the same pairwise mean with the absolute pixel difference (0..255); needs no
  weights, always reported, and is not LPIPS.

A metric whose weights are not given is reported as skipped. Scores go to stdout and, atomically,
to the JSON file (default OUT/scores.json). Exit status 0, 1 on bad input, 2 on bad options.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import cli
import jittor_env


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    jittor_env.add_arguments(parser)
    parser.add_argument("--results", required=True, help="sample_sdm.py output folder")
    parser.add_argument("--real", help="folder of real photos for FID")
    parser.add_argument("--inception", help="pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--segmenter", help="segmenter checkpoint (train.py segmenter) for mIoU")
    parser.add_argument("--lpips_alex", help="torchvision AlexNet weights (alexnet-owt-7be5be79.pth)")
    parser.add_argument("--lpips_heads", help="LPIPS heads: StarGAN v2's lpips_weights.ckpt or lpips' alex.pth")
    parser.add_argument("--json", help="summary file (default RESULTS/scores.json)")
    return parser


def check_options(parser, args) -> None:
    for name in ("results", "real", "inception", "segmenter", "lpips_alex", "lpips_heads"):
        path = getattr(args, name)
        if path and not os.path.exists(path):
            parser.error(f"--{name} {path}: not found")
    if (args.real is None) != (args.inception is None):
        parser.error("FID needs both --real PHOTOS and --inception WEIGHTS")
    if (args.lpips_alex is None) != (args.lpips_heads is None):
        parser.error("LPIPS needs both --lpips_alex and --lpips_heads")
    if not (Path(args.results) / "sdm.json").is_file():
        parser.error(f"--results {args.results}: no sdm.json (not a sample_sdm.py output folder)")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    check_options(parser, args)
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    from datasets import DataError
    from datasets.io import atomic_write
    from scoring.sdm_evaluation import SampledRun, score_sdm_results
    from weights.checkpoint import WeightsError

    try:
        sampled = SampledRun.read(args.results)
        scores = score_sdm_results(sampled, args.real, args.inception, args.segmenter, args.lpips_alex,
                                   args.lpips_heads)
    except (ValueError, OSError, DataError, WeightsError) as exc:
        print(f"score_sdm: {exc}", file=sys.stderr)
        return 1
    with atomic_write(Path(args.json) if args.json else sampled.folder / "scores.json", "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=1)
    for key in ("fid", "miou", "lpips_diversity", "pixel_diversity"):
        if key in scores:
            print(f"{key:16s} {scores[key]:.4f}")
    for key, why in scores["skipped"].items():
        print(f"{key:16s} skipped: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

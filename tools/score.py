"""Score generated images the challenge's way: mask accuracy M, aesthetic score A, FID, style
similarity S and the total T (the IIDM paper's Eq. 8; the third Jittor AI Challenge's formula):

    T = M/100 * [0.2*A + 0.3*(S*0.5 + 50) + 0.5*(100 - FID)]      (all in percent, FID capped at 100)

    python -m tools.score --results OUT --input_path MASKS --img_path TRAIN_ROOT \
        [--segmenter CKPT] [--aesthetic CKPT] [--inception pt_inception-2015-12-05-6726825d.pth] \
        [--style_mode challenge|corrected] [--csv FILE] [--json FILE] [--skip_bad]
    python -m tools.score total --M 94.15 --A 50.43 --FID 30.75 --S 63.76

Layout: ``MASKS/NAME.png`` with ``MASKS/label_to_img.json`` (or ``--mapping FILE``) naming each
mask's reference ``REF.jpg`` in ``TRAIN_ROOT/imgs``; results ``OUT/NAME.jpg``. Every mask must have its result: a
missing one is an error that names it, before anything is scored.

Every result is decoded in full before any model loads (OpenCV's reader returns a truncated JPEG
partly grey, without an error): an empty file, one that is not an image, a truncated one, or one
whose size is not its mask's is bad. By default bad results stop the run with an error listing
them all (exit 1); ``--skip_bad`` scores the others and lists the bad ones in the JSON summary
(``bad_results``), so a partial score is never mistaken for a whole one.

* S (scoring/style_similarity.py) needs no model. ``--style_mode challenge`` (default) reproduces the
  organisers' script, uint8 quirks included; ``corrected`` computes what it meant to. Both are in
  the JSON summary.
* M needs a segmenter trained by `python train.py segmenter`; A a NIMA checkpoint (scoring/aesthetic.py);
  FID pytorch-fid's Inception weights (scoring/fid.py), against all photos of ``TRAIN_ROOT/imgs``,
  whose statistics are cached (``--fid_cache``). The organisers' SegFormer and aesthetic model are
  not public, so M and A from plug-in models estimate the challenge's, they do not reproduce them.
* A metric whose model is not given is reported as skipped, and T is then not computed: the
  available terms are printed instead.

Outputs: a per-image CSV (name, reference, S_rgb, S_hsv, S, pixel_accuracy, aesthetic; percent,
empty when skipped), a JSON summary (metrics, modes, skipped metrics and why, model files), and a
table on stdout. Both files are written atomically (default: beside the results).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import cli
import jittor_env
from datasets import DataError
from scoring.challenge import (METRICS, BadResults, default_fid_cache, gather_results, score_results, table_lines,
                               total_lines, write_csv, write_json)
from scoring.style_similarity import DEFAULT_MODE, MODES, ImageReadError


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True, help="folder of generated NAME.jpg")
    parser.add_argument("--input_path", type=Path, required=True, help="masks folder with label_to_img.json")
    parser.add_argument("--img_path", type=Path, required=True, help="training root (imgs/ holds the references)")
    parser.add_argument("--mapping", type=Path,
                        help="mask -> reference JSON (default INPUT_PATH/label_to_img.json)")
    parser.add_argument("--segmenter", type=Path, help="segmenter checkpoint (python train.py segmenter: RUN_DIR/checkpoints/last.safetensors) for M")
    parser.add_argument("--aesthetic", type=Path, help="NIMA checkpoint for A (scoring/aesthetic.py)")
    parser.add_argument("--inception", type=Path,
                        help="pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth) for FID")
    parser.add_argument("--style_mode", choices=MODES, default=DEFAULT_MODE,
                        help="challenge: the organisers' script with its uint8 quirks; "
                             "corrected: the intended histograms")
    parser.add_argument("--fid_cache", type=Path,
                        help=f"folder for cached training statistics (default {default_fid_cache()})")
    parser.add_argument("--batch_size", type=int, default=50, help="images per Inception batch")
    parser.add_argument("--csv", type=Path, help="per-image CSV (default RESULTS/scores.csv)")
    parser.add_argument("--json", type=Path, help="JSON summary (default RESULTS/scores.json)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="score the results that decode in full at their mask's size and list the others "
                             "in the JSON summary (default: stop with an error listing them)")
    jittor_env.add_arguments(parser)
    return parser


def check_options(parser: cli.ArgumentParser, args) -> None:
    """Every check that needs no image and no model; a bad option ends the run with exit 2."""
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    for flag in ("results", "input_path", "img_path", "mapping", "segmenter", "aesthetic", "inception"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            parser.error(f"--{flag} {path}: not found")
    if not args.results.is_dir():
        parser.error(f"--results {args.results}: not a folder")


def build_total_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="score.py total", description="T from given metrics (percent).")
    for name in METRICS:
        parser.add_argument(f"--{name}", type=float,
                            help=f"{name} in percent" + (" (capped at 100 in T)" if name == "FID" else ""))
    return parser


def main_total(argv) -> int:
    args = build_total_parser().parse_args(argv)
    metrics = {name: getattr(args, name) for name in METRICS}
    for name in METRICS:
        print(f"{name:<4} {metrics[name]:8.2f}" if metrics[name] is not None else f"{name:<4} {'not given':>9}")
    for line in total_lines(metrics):
        print(line)
    return 0


def _load_models(args):
    """Load the networks given on the command line (Jittor is set up only when one is needed)."""
    models = {"segmenter": None, "aesthetic": None, "inception": None}
    if not (args.segmenter or args.aesthetic or args.inception):
        return models
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    if args.segmenter:
        from scoring.segmenter import load_segmenter
        models["segmenter"] = load_segmenter(args.segmenter)
    if args.aesthetic:
        from scoring.aesthetic import load_aesthetic
        models["aesthetic"] = load_aesthetic(args.aesthetic)
    if args.inception:
        from scoring.fid import load_inception
        models["inception"] = load_inception(args.inception)
    return models


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["total"]:
        return main_total(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from weights.checkpoint import WeightsError

    try:
        gathered = gather_results(args.results, args.input_path, args.img_path, args.mapping)
        if gathered.bad and not args.skip_bad:
            raise BadResults(args.results, gathered.bad)
        models = _load_models(args)
        report = score_results(args.results, args.input_path, args.img_path, args.style_mode,
                               segmenter=models["segmenter"], aesthetic=models["aesthetic"],
                               inception=models["inception"], inception_path=args.inception,
                               fid_cache=args.fid_cache, batch_size=args.batch_size,
                               mapping_file=args.mapping, skip_bad=args.skip_bad, gathered=gathered)
    except (DataError, ImageReadError, WeightsError, ValueError) as exc:
        print(f"score: {exc}", file=sys.stderr)
        return 1
    report.details["models"] = {name: (str(getattr(args, name)) if getattr(args, name) else None)
                                for name in ("segmenter", "aesthetic", "inception")}
    csv_path = args.csv or args.results / "scores.csv"
    json_path = args.json or args.results / "scores.json"
    write_csv(csv_path, report.images)
    write_json(json_path, report.summary())
    for line in table_lines(report):
        print(line)
    print(f"per-image scores: {csv_path}\nsummary: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

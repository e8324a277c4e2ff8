"""The IIDM paper's Table 2 ablation on any model and test set, scored with tools/score.py.

    python -m bench.ablation --ckpt unet.safetensors --vq vq.safetensors \
        --input_path data/synthetic/test/labels --img_path data/synthetic/train --output_path outputs/ablation \
        [--average a.safetensors --average b.safetensors] [--segmenter seg.safetensors] \
        [--ground_truth data/synthetic/test/imgs] [--steps 12] [--limit 16] [--with_fastest] [--with_iidm]

Rows, each adding one of the paper's steps to the row before:

    pure-noise         one round from N(0, I) at T - 1 (SDM's sampling, here with the few-step
                       solver), guidance 3.5
    img2img            one round from the encoded reference noised to t = 600, guidance 3.5
    + refinement       two more rounds from the previous output at t = 640 and t = 400, guidance 3.7
    + colour transfer  the previous output is colour-transferred toward the reference before each
                       refinement round (the full recipe)
    + averaged ckpts   the same with the --ckpt and --average checkpoints averaged (when given)
    fastest            the full recipe with the `fastest` preset's rounds, 30 U-Net passes (with
                       --with_fastest)
    iidm (DDIM)        the official recipe itself, 1280 U-Net passes (with --with_iidm)

All rows but the last two run the `fast` preset's rounds (ldm.pipeline.fast_rounds: DPM-Solver++(3M),
3M and UniPC-2 over 12, 12 and 6 logSNR steps down to t = 4; --steps sets one step count for
every round), and the pure-noise round runs round 0's solver, steps and grid from T - 1, so the
rows differ only in what the paper ablates. Every image keeps its own seed across rows. Outputs
are written under OUT/ROW/ and kept (a rerun skips what exists), the table is printed in Markdown
and written to OUT/ablation.json. With --ground_truth (the synthetic generator writes each test
mask rendered in its reference's style to test/imgs), the mean absolute pixel difference to it,
the PSNR and the SSIM (scikit-image's structural_similarity over the RGB channels, data range
255) are reported too, and a first row scores the ground truth itself, as the best a model can do.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

import cli
import jittor_env


def row_rounds(schedule, steps: int | None = None) -> dict:
    """Round lists of the ablation rows, keyed by row name: the ``fast`` preset's rounds (``steps``
    per round, None: the preset's own), and for the pure-noise row its round 0 (solver, steps,
    grid spacing and end) started from noise at T - 1."""
    from ldm import pipeline
    from ldm.respace import solver_stage

    fast = pipeline.fast_rounds(schedule, steps)
    first = fast[0]
    stage = solver_stage(schedule, schedule.num_timesteps - 1, first.stage.num_steps,
                         pipeline.SOLVER_PRESETS["fast"].spacing, end_level=first.stage.timesteps[-1])
    noise = pipeline.Round(stage, first.sampler, first.guidance_scale, start="noise")
    plain_refinement = (fast[0],) + tuple(dataclasses.replace(r, color_transfer=False) for r in fast[1:])
    return {"pure-noise": (noise,), "img2img": fast[:1], "+ refinement": plain_refinement,
            "+ colour transfer": fast}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def pixel_errors(results: Path, ground_truth: Path, names: list[str]) -> tuple[float, float | None, float]:
    """Mean absolute difference (0-255), mean PSNR (dB, over images that differ at all; None when
    none does) and mean SSIM (scikit-image's structural_similarity with its default 7x7 uniform
    window, over the RGB channels, data range 255) of results against ground truth."""
    from skimage.metrics import structural_similarity

    from datasets import load_image
    from datasets.transforms import resize_image

    mae, psnr, ssim = [], [], []
    for name in names:
        ours = load_image(results / f"{name}.jpg").astype(np.float64)
        truth = load_image(ground_truth / f"{name}.jpg")
        if truth.shape != ours.shape:
            truth = resize_image(truth, *ours.shape[:2])
        truth = truth.astype(np.float64)
        diff = ours - truth
        mae.append(np.abs(diff).mean())
        mse = (diff ** 2).mean()
        psnr.append(10 * np.log10(255.0 ** 2 / mse) if mse > 0 else None)
        ssim.append(structural_similarity(ours, truth, channel_axis=-1, data_range=255))
    finite = [p for p in psnr if p is not None]
    return float(np.mean(mae)), (float(np.mean(finite)) if finite else None), float(np.mean(ssim))


def copy_masks(jobs, input_path: Path, masks: Path) -> Path:
    """The chosen masks and their mapping in a folder of their own, so the scorer sees only them."""
    masks.mkdir(parents=True, exist_ok=True)
    for stale in masks.glob("*.png"):   # from an earlier run with another --limit
        stale.unlink()
    mapping = json.loads((input_path / "label_to_img.json").read_text())
    for job in jobs:
        (masks / job.mask_path.name).write_bytes(job.mask_path.read_bytes())
    chosen = {f"{job.name}.png": mapping[f"{job.name}.png"] for job in jobs}
    (masks / "label_to_img.json").write_text(json.dumps(chosen, indent=1))
    return masks


def print_table(table: list[dict], with_ground_truth: bool) -> None:
    """The rows as a Markdown table (SSIM to 3 decimals, the other figures to 2)."""
    columns = ["row", "unet_passes", "S", "S_corrected", "M"] + (["MAE", "PSNR", "SSIM"] if with_ground_truth else [])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in table:
        cells = [row["row"]] + ["-" if row.get(c) is None else (f"{row[c]:.{3 if c == 'SSIM' else 2}f}"
                                                                 if isinstance(row[c], float) else str(row[c]))
                                for c in columns[1:]]
        print("| " + " | ".join(cells) + " |")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="U-Net checkpoint")
    parser.add_argument("--average", type=Path, action="append", default=[],
                        help="more checkpoints to average with --ckpt for the last row (repeatable)")
    parser.add_argument("--vq", type=Path, required=True, help="autoencoder checkpoint")
    parser.add_argument("--input_path", type=Path, required=True, help="masks folder with label_to_img.json")
    parser.add_argument("--img_path", type=Path, required=True, help="training root holding the references")
    parser.add_argument("--output_path", type=Path, required=True, help="folder for the rows' outputs and ablation.json")
    parser.add_argument("--segmenter", type=Path, help="segmenter checkpoint for the mask accuracy M")
    parser.add_argument("--ground_truth", type=Path, help="folder of NAME.jpg ground truths (synthetic test/imgs)")
    parser.add_argument("--steps", type=int,
                        help="solver steps for every round (default: the fast preset's 12, 12 and 6)")
    parser.add_argument("--limit", type=int, help="use the first N masks only")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with_fastest", action="store_true",
                        help="also run the full recipe with the fastest preset (30 U-Net passes per image)")
    parser.add_argument("--with_iidm", action="store_true",
                        help="also run the official recipe (DDIM, 1280 U-Net passes per image)")
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)

    from ldm import pipeline
    from scoring.challenge import score_results
    from scoring.segmenter import load_segmenter
    from synthesis import Generator
    from synthesis.batch import generate_jobs, list_jobs

    generator = Generator([args.ckpt], args.vq)
    rows = row_rounds(generator.schedule, args.steps)
    plans = [(name, generator, rounds) for name, rounds in rows.items()]
    if args.average:
        plans.append(("+ averaged ckpts", Generator([args.ckpt, *args.average], args.vq), rows["+ colour transfer"]))
    if args.with_fastest:
        plans.append(("fastest", generator, pipeline.fastest_rounds(generator.schedule)))
    if args.with_iidm:
        plans.append(("iidm (DDIM)", generator, pipeline.iidm_rounds(generator.schedule.num_timesteps)))
    segmenter = load_segmenter(args.segmenter) if args.segmenter else None

    jobs = list_jobs(args.input_path, args.img_path, args.output_path / "_unused")
    jobs = jobs[: args.limit] if args.limit else jobs
    names = [job.name for job in jobs]
    masks = copy_masks(jobs, args.input_path, args.output_path / "masks")

    table = []

    def score(name: str, folder: Path, passes: int | None, seconds: float | None) -> None:
        report = score_results(folder, masks, args.img_path, segmenter=segmenter, log_every=10 ** 9)
        summary = report.summary()
        row = {"row": name, "unet_passes": passes, "seconds_per_image": seconds,
               "S": summary["metrics"]["S"], "S_corrected": summary["style_similarity"]["corrected"]["S"],
               "M": summary["metrics"]["M"]}
        if args.ground_truth:
            row["MAE"], row["PSNR"], row["SSIM"] = pixel_errors(folder, args.ground_truth, names)
        table.append(row)
        print(json.dumps(row), flush=True)

    if args.ground_truth:
        score("ground truth", args.ground_truth, None, None)
    for name, row_generator, rounds in plans:
        folder = args.output_path / slug(name)
        todo = [dataclasses.replace(job, output=folder / f"{job.name}.jpg") for job in jobs]
        todo = [job for job in todo if not job.output.is_file()]
        started = time.perf_counter()
        report = generate_jobs(todo, row_generator, rounds, batch_size=args.batch_size, seed=args.seed, quality=95,
                               show_progress=False)
        if report.failures:
            print(f"{name}: {len(report.failures)} failed: {report.failures[:3]}", file=sys.stderr)
            return 1
        seconds = (time.perf_counter() - started) / len(todo) if todo else None
        score(name, folder, pipeline.unet_passes(rounds), seconds)

    summary = {"rows": table, "steps": [r.stage.num_steps for r in rows["+ colour transfer"]], "masks": names,
               "ckpt": str(args.ckpt), "average": [str(p) for p in args.average]}
    (args.output_path / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(table, with_ground_truth=bool(args.ground_truth))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate landscapes from label maps and style references (IIDM inference).

    python infer.py                                    # the embedded default: demo model, synthetic masks, fast preset
    python infer.py --input_path MASKS --img_path TRAIN_ROOT --output_path OUT \\
        --ckpt A.safetensors [--ckpt B.safetensors] --vq VQ.safetensors [--preset iidm|fast|...]
    python infer.py --mask m.png --ref r.jpg --output_path o.jpg --ckpt A.safetensors --vq VQ.safetensors
    mpirun -np 4 python infer.py --input_path MASKS ...  # each rank takes every 4th mask

MASKS holds the label PNGs and label_to_img.json (or give --mapping); each output is
OUT/MASK.jpg at the mask's resolution, written atomically. Outputs already present are skipped
(--overwrite redoes them). An image that fails (bad label, missing or unreadable reference, a
size the model cannot take) is reported at the end with a non-zero exit; the others are still
produced. Several --ckpt are averaged on load. The rounds are ldm/pipeline.py's presets; each
image's noise comes from (--seed, its name), so it comes out the same whatever the batch size,
the order or the number of processes. Every option is checked before a model is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import cli
import jittor_env
from datasets import DataError
from datasets.io import remove_stale_temporaries, temporaries_of
from datasets.landscape import MAPPING_FILE
from synthesis.batch import BatchReport, Job, generate_jobs, list_jobs, output_quality, parse_size, shard
from synthesis.demo import DEMO_CHECKPOINT, DEMO_OUTPUT, DEMO_VQ, prepare_demo
from synthesis.gallery import ROUNDS_FOLDER
from synthesis.model_files import NO_MODEL  # noqa: F401 (an exit status, for callers)
from synthesis.model_files import FAILED, Stop, model_file_problem, model_files
from weights.checkpoint import WEIGHT_SETS, WeightsError

log = logging.getLogger("iidm.infer")

USAGE = 2     # exit status: bad options (argparse's); FAILED and NO_MODEL come with Stop
PROBE = ".write-test"   # the writability probe, OUTPUT/.write-test.PID


def build_parser() -> cli.ArgumentParser:
    from ldm.pipeline import PRESETS

    parser = cli.ArgumentParser(description=__doc__)
    batch = parser.add_argument_group("batch generation")
    batch.add_argument("--input_path", type=Path, help="folder of label PNGs with label_to_img.json")
    batch.add_argument("--img_path", type=Path, help="training root (or its imgs/ folder) holding the references")
    batch.add_argument("--output_path", type=Path,
                       help=f"folder for the generated MASK.jpg files (default for the demo: {DEMO_OUTPUT}); "
                            "with --mask, the output image itself")
    batch.add_argument("--mapping", type=Path, help=f"mask -> reference JSON (default INPUT_PATH/{MAPPING_FILE})")
    batch.add_argument("--overwrite", action="store_true", help="regenerate outputs that already exist")
    batch.add_argument("--gallery", action="store_true",
                       help="also write OUTPUT_PATH/gallery.html (the demo always does)")
    quick = parser.add_argument_group("one image")
    quick.add_argument("--mask", type=Path, help="one label PNG (written to --output_path, replaced if present)")
    quick.add_argument("--ref", type=Path, help="its style reference photo")
    model = parser.add_argument_group("model and pipeline")
    model.add_argument("--ckpt", type=Path, action="append", default=[],
                       help="U-Net checkpoint; give it several times to average them")
    model.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                       help="which weights of a training checkpoint to use (default ema)")
    model.add_argument("--vq", type=Path,
                       help="autoencoder checkpoint (default: vq.safetensors beside the first --ckpt)")
    model.add_argument("--preset", choices=PRESETS,
                       help="iidm (default): the official recipe, 1280 U-Net passes per image; fast (the demo's "
                            "default): solvers reaching its oracle accuracy at 60 passes; fastest: 30 passes, "
                            "less accurate; pure-noise: the ablation starting from noise (see ldm/pipeline.py)")
    model.add_argument("--steps", help="solver steps per round for the solver presets: N for every round, or "
                                       "N0,N1,N2 one per round")
    model.add_argument("--size", help="generate at HEIGHTxWIDTH (masks resized nearest, outputs resized "
                                      "back to each mask's size); default: each mask's own size")
    model.add_argument("--batch_size", type=int, default=4, help="images per batch (default 4)")
    model.add_argument("--seed", type=int, default=0, help="base seed; image seeds derive from it and the names")
    model.add_argument("--quality", type=int, help="JPEG quality of the outputs (default 75 for --preset iidm, "
                                                   "as the official submission; 95 otherwise)")
    model.add_argument("--save_rounds", action="store_true",
                       help="also keep each round's image as OUT/rounds/NAME_roundK.jpg")
    jittor_env.add_arguments(parser)
    parser.alias("--out", "--output_path")
    return parser


def parse_steps(text: str | None):
    """--steps: None, N, or N0,N1,... (one per round)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--steps must be a positive integer or a comma-separated list of them, "
                         f"got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"--steps must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 else values


def check_options(parser: cli.ArgumentParser, args) -> None:
    """Every check that needs no file and no model; a bad option ends the run with exit 2."""
    from ldm import pipeline
    from ldm.schedule import ScheduleConfig, make_schedule

    quick = args.mask is not None or args.ref is not None
    if quick and not (args.mask and args.ref and args.output_path):
        parser.error("one-image use needs all of --mask, --ref and --output_path (the image to write)")
    if quick and args.input_path:
        parser.error("give either --input_path (a folder) or --mask/--ref (one image), not both")
    if quick:
        for flag in ("img_path", "mapping", "gallery", "overwrite"):
            if getattr(args, flag):
                parser.error(f"--{flag} applies to a folder of masks (--input_path), not to one image (--mask)")
    if args.input_path is not None and args.img_path is None:
        parser.error("--input_path needs --img_path (the training root holding the references)")
    if args.input_path is not None and args.output_path is None:
        parser.error("--input_path needs --output_path")
    if args.input_path is None and not quick:
        for flag in ("img_path", "mapping"):
            if getattr(args, flag):
                parser.error(f"--{flag} needs --input_path (the masks folder)")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    try:
        args.size = parse_size(args.size)
        args.steps = parse_steps(args.steps)
        # The rounds for a standard schedule: a preset that takes no steps, or steps for the
        # wrong number of rounds, is refused here rather than after loading the models.
        pipeline.preset_rounds(args.preset, make_schedule(ScheduleConfig()), args.steps)
    except ValueError as exc:
        parser.error(str(exc))
    for path in (args.mask, args.ref, args.input_path, args.img_path, args.mapping):
        if path is not None and not path.exists():
            parser.error(f"{path}: not found")
    problem = model_file_problem(args.ckpt, args.vq)
    if problem:
        parser.error(problem)
    for flag, path in (("input_path", args.input_path), ("img_path", args.img_path)):
        if path is not None and not path.is_dir():
            parser.error(f"--{flag} {path}: a file, expected a folder")
    for flag, path in (("mask", args.mask), ("ref", args.ref), ("mapping", args.mapping)):
        if path is not None and not path.is_file():
            parser.error(f"--{flag} {path}: not a file")


def check_size(parser: cli.ArgumentParser, args, checkpoint: Path, vq_path: Path) -> None:
    """--size against the models' architectures, read from the files' headers (exit 2 before any
    network is built): it must be a multiple of what the autoencoder and the U-Net downsample by."""
    if args.size is None:
        return
    from autoencoder.vqmodel import VQConfig
    from models import UNetConfig
    from weights.checkpoint import WeightsError, load_checkpoint

    try:
        vq = load_checkpoint(vq_path, "vqmodel", header_only=True).network_config(VQConfig)
        unet = load_checkpoint(checkpoint, "unet", header_only=True).network_config(UNetConfig)
    except WeightsError:
        return        # reported with the models' loading, one line naming the file
    multiple = vq.factor * unet.downsample_factor
    height, width = args.size
    if height % multiple or width % multiple:
        parser.error(f"--size {height}x{width}: not a multiple of {multiple}, which these models need "
                     f"(the autoencoder downsamples by {vq.factor}, the U-Net by {unet.downsample_factor})")


def writable(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (created if needed), or None. The probe file is
    named after the process, so MPI ranks probing one folder at once do not remove each other's,
    and is no temporary file (``.*.tmp``), so no rank's sweep of stale temporaries takes it."""
    probe = folder / f"{PROBE}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        return f"{folder}: cannot write there ({exc.strerror or exc})"
    return None


def plan_jobs(args, quick: bool, demo: bool, rank: int, world_size: int, started: float):
    """(this rank's jobs, (masks folder, training root, mapping) or None for one image, output folder);
    the output folder is checked to be writable, and rank 0 removes the temporary files and probes
    that a killed run left there (those older than ``started``, the time this run began)."""
    output_dir = args.output_path or DEMO_OUTPUT
    try:
        if quick:
            jobs, source = [Job(args.mask.stem, args.mask, args.ref, args.output_path)], None
            problem = writable(args.output_path.parent)
        else:
            if demo and world_size > 1:
                raise DataError("the demo runs in one process; run it without mpirun")
            source = prepare_demo(output_dir) if demo else (args.input_path, args.img_path, args.mapping)
            jobs = shard(list_jobs(*source[:2], output_dir, source[2]), rank, world_size)
            problem = writable(output_dir)
        if problem:
            raise DataError(problem)
        if quick:     # a folder of the user's: only this output's own temporaries
            remove_stale_temporaries(args.output_path.parent, started, temporaries_of(args.output_path.name))
        elif rank == 0:
            for where in (output_dir, output_dir / ROUNDS_FOLDER):
                remove_stale_temporaries(where, started)
            remove_stale_temporaries(output_dir, started, f"{PROBE}.*")
    except DataError as exc:
        raise Stop(f"infer.py: {exc}") from None
    return jobs, source, output_dir


def generate(args, pending: list[Job], checkpoints: list[Path], vq_path: Path, rank: int) -> tuple[BatchReport, int]:
    """Load the models and generate ``pending``: (the report, U-Net passes per image)."""
    from ldm.pipeline import unet_passes
    from synthesis.generator import Generator

    try:
        started = time.perf_counter()
        generator = Generator(checkpoints, vq_path, args.weights)
        rounds = generator.rounds(args.preset, args.steps)
    except (WeightsError, ValueError) as exc:
        raise Stop(f"infer.py: {exc}") from None
    passes = unet_passes(rounds)
    log.info("models loaded in %.1f s (%s; %s); preset %s: %d rounds, %d U-Net passes per image",
             time.perf_counter() - started, ", ".join(str(p) for p in checkpoints), vq_path,
             args.preset, len(rounds), passes)
    quality = args.quality or output_quality(args.preset)
    report = generate_jobs(pending, generator, rounds, batch_size=args.batch_size, seed=args.seed,
                           quality=quality, size=args.size, save_rounds=args.save_rounds, show_progress=rank == 0)
    return report, passes


def summarize(report: BatchReport, passes: int, where: str) -> int:
    per_image = report.seconds / report.done if report.done else 0.0
    print(f"{where}infer.py: {report.done} images in {report.seconds:.1f} s ({per_image:.2f} s per image, "
          f"{report.images_per_minute:.1f} per minute), {passes} U-Net passes per image; {report.skipped} already "
          f"present, {len(report.failures)} failed")
    if report.stopped:
        print(f"{where}infer.py: {report.stopped}", file=sys.stderr)
    if report.failures:
        print(f"{where}infer.py: {len(report.failures)} image(s) failed:", file=sys.stderr)
        for name, message in report.failures:
            print(f"  {name}: {message}", file=sys.stderr)
        return FAILED
    return 0


def main(argv=None) -> int:
    started = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    quick = args.mask is not None or args.ref is not None
    demo = not quick and args.input_path is None
    args.preset = args.preset or ("fast" if demo else "iidm")
    check_options(parser, args)
    try:
        checkpoints, vq_path = model_files(args.ckpt, args.vq, DEMO_CHECKPOINT, DEMO_VQ)
        jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
        check_size(parser, args, checkpoints[0], vq_path)
        rank, world_size = (jt.rank, jt.world_size) if jt.in_mpi else (0, 1)
        jobs, source, output_dir = plan_jobs(args, quick, demo, rank, world_size, started)
        pending = jobs if quick or args.overwrite else [j for j in jobs if not j.output.is_file()]
        report, passes = BatchReport(), 0
        if pending:
            report, passes = generate(args, pending, checkpoints, vq_path, rank)
        report.skipped = len(jobs) - len(pending)
    except Stop as stop:
        print(stop, file=sys.stderr)
        return stop.status
    status = summarize(report, passes, f"[rank {rank}/{world_size}] " if world_size > 1 else "")
    if (demo or args.gallery) and source is not None and rank == 0:
        from synthesis.gallery import PAGE, gallery_rows, write_gallery

        # Under mpirun this shows what is finished when rank 0 is; python -m tools.gallery redoes it later.
        rows = gallery_rows(output_dir, *source)
        if rows:
            print(f"gallery: {write_gallery(output_dir / PAGE, rows)}")
    return status


if __name__ == "__main__":
    sys.exit(main())

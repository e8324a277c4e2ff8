"""Generate landscapes from label maps and style references (IIDM inference).

    python infer.py                                    # the embedded default: demo model, synthetic masks, fast preset
    python infer.py --input_path MASKS --img_path TRAIN_ROOT --output_path OUT \\
        --ckpt A.safetensors [--ckpt B.safetensors] --vq VQ.safetensors [--preset iidm|fast|pure-noise]
    python infer.py --mask m.png --ref r.jpg --out o.jpg --ckpt A.safetensors --vq VQ.safetensors
    mpirun -np 4 python infer.py --input_path MASKS ...  # each rank takes every 4th mask

MASKS holds the label PNGs and label_to_img.json (or give --mapping); each output is
OUT/MASK.jpg at the mask's resolution, written atomically. Outputs already present are skipped
(--overwrite redoes them). An image that fails (bad label, missing or unreadable reference, a
size the model cannot take) is reported at the end with a non-zero exit; the others are still
produced. Several --ckpt are averaged on load (tools/average_checkpoints.py). The pipeline rounds
are ldm/pipeline.py's presets; each image's noise comes from (--seed, its name), so it comes out
the same whatever the batch size, the order or the number of processes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import jittor_env
from datasets import NUM_CLASSES, DataError, load_image, load_label, one_hot, save_image
from datasets.landscape import MAPPING_FILE, _read_mapping, find_image_folder
from datasets.transforms import resize_image, resize_label
from weights.checkpoint import CHECKPOINT_VERSION, WEIGHT_SETS, Checkpoint, WeightsError
from ldm.schedule import ScheduleConfig
from weights.average import average_checkpoints

log = logging.getLogger("iidm.infer")

REPO = Path(__file__).resolve().parent
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "unet.safetensors"
DEMO_VQ = REPO / "checkpoints" / "demo" / "vq.safetensors"
DEMO_OUTPUT = REPO / "outputs" / "demo"
DEMO_HEIGHT, DEMO_WIDTH, DEMO_MASKS, DEMO_PHOTOS = 96, 128, 4, 6
NO_MODEL = 2  # exit status: nothing was generated because no model is available
FAILED = 1    # exit status: bad arguments or files, or some images failed
PRESETS = ("iidm", "fast", "pure-noise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch = parser.add_argument_group("batch generation")
    batch.add_argument("--input_path", type=Path, help="folder of label PNGs with label_to_img.json")
    batch.add_argument("--img_path", type=Path, help="training root (or its imgs/ folder) holding the references")
    batch.add_argument("--output_path", type=Path,
                       help=f"folder for the generated MASK.jpg files (default for the demo: {DEMO_OUTPUT})")
    batch.add_argument("--mapping", type=Path, help=f"mask -> reference JSON (default INPUT_PATH/{MAPPING_FILE})")
    batch.add_argument("--overwrite", action="store_true", help="regenerate outputs that already exist")
    batch.add_argument("--gallery", action="store_true", help="also write OUTPUT_PATH/gallery.html (the demo always does)")
    quick = parser.add_argument_group("one image")
    quick.add_argument("--mask", type=Path, help="one label PNG")
    quick.add_argument("--ref", type=Path, help="its style reference photo")
    quick.add_argument("--out", type=Path, help="the output image to write (replaced if present)")
    model = parser.add_argument_group("model and pipeline")
    model.add_argument("--ckpt", type=Path, action="append", default=[],
                       help="U-Net checkpoint; give it several times to average them")
    model.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                       help="which weights of a training checkpoint to use (default ema)")
    model.add_argument("--vq", type=Path, help="autoencoder checkpoint (default: vq.safetensors beside the first --ckpt)")
    model.add_argument("--preset", choices=PRESETS,
                       help="iidm (default): the official recipe (1280 U-Net passes per image); fast: "
                            "DPM-Solver++ (120; the demo's default); pure-noise: the ablation starting from noise")
    model.add_argument("--steps", type=int, help="solver steps per round (fast preset only; default 20)")
    model.add_argument("--size", help="generate at HEIGHTxWIDTH (masks resized nearest, outputs resized "
                                      "back to each mask's size); default: each mask's own size")
    model.add_argument("--batch_size", type=int, default=4, help="images per batch (default 4)")
    model.add_argument("--seed", type=int, default=0, help="base seed; image seeds derive from it and the names")
    model.add_argument("--quality", type=int, default=95, help="JPEG quality of the outputs (default 95)")
    model.add_argument("--save-rounds", dest="save_rounds", action="store_true",
                       help="also keep each round's image as OUT/rounds/NAME_roundK.jpg")
    jittor_env.add_arguments(parser)
    return parser


# ------------------------------------------------------------------------------------ jobs (numpy)
@dataclass(frozen=True)
class Job:
    """One image to generate: its name (the mask's basename), files and output path; ``error``
    is set when the job is known to fail before any work (e.g. no reference given)."""

    name: str
    mask_path: Path
    reference_path: Path | None
    output: Path
    error: str | None = None


def list_jobs(mask_dir: Path, img_root: Path, output_dir: Path, mapping_file: Path | None = None) -> list[Job]:
    """Every ``MASK.png`` of ``mask_dir``, sorted by name, with its reference from the mapping.

    A missing mapping file or masks folder is an error for the whole run; a mask without a
    reference entry, or whose reference file is absent, becomes a failed job.
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: masks folder not found")
    mapping_path = Path(mapping_file) if mapping_file else mask_dir / MAPPING_FILE
    mapping = _read_mapping(mapping_path)
    image_dir = find_image_folder(img_root)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: reference photo folder not found")
    masks = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
    if not masks:
        raise DataError(f"{mask_dir}: no label maps (NAME.png) found")
    jobs = []
    for mask_path in masks:
        output = Path(output_dir) / f"{mask_path.stem}.jpg"
        if mask_path.name not in mapping:
            jobs.append(Job(mask_path.stem, mask_path, None, output,
                            f"{mapping_path}: no reference given for {mask_path.name}"))
            continue
        reference = image_dir / mapping[mask_path.name]
        error = None if reference.is_file() else f"{reference}: reference photo not found (for {mask_path.name})"
        jobs.append(Job(mask_path.stem, mask_path, reference, output, error))
    return jobs


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of process ``rank`` out of ``world_size``: those with index % world_size == rank,
    so the shards of all ranks cover every item exactly once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"HEIGHTxWIDTH" -> (height, width)."""
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HEIGHTxWIDTH, e.g. 384x512, got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"--size must be positive, got {text!r}")
    return height, width


@dataclass(frozen=True)
class Item:
    """A loaded job: label uint8 [h, w] and reference uint8 [h, w, 3] at the generation size,
    and the mask's own (height, width) for the output."""

    job: Job
    label: np.ndarray
    reference: np.ndarray
    out_height: int
    out_width: int


def load_item(job: Job, size: tuple[int, int] | None, multiple: int) -> Item:
    """Read and check one job's files; DataError names the file and what was expected."""
    if job.error:
        raise DataError(job.error)
    label = load_label(job.mask_path, NUM_CLASSES)
    out_height, out_width = label.shape
    height, width = size or (out_height, out_width)
    if height % multiple or width % multiple:
        raise DataError(f"{job.mask_path}: size {out_height}x{out_width} (height x width) is not a "
                        f"multiple of {multiple}, which this model needs; pass --size HEIGHTxWIDTH "
                        "to generate at another size")
    label = resize_label(label, height, width)
    reference = load_image(job.reference_path)
    if reference.shape[:2] != (height, width):
        log.info("%s: reference %dx%d resized to %dx%d (height x width)", job.reference_path,
                 *reference.shape[:2], height, width)
        reference = resize_image(reference, height, width)
    return Item(job, label, reference, out_height, out_width)


# ------------------------------------------------------------------------------- models (Jittor)
class Models:
    """The U-Net (averaged weights), the autoencoder and the schedule, loaded once."""

    def __init__(self, checkpoints: Sequence[Path], vq_path: Path, which: str = "ema"):
        import jittor as jt

        from autoencoder.vqmodel import load_vqmodel
        from ldm.schedule import make_schedule
        from models import load_unet

        self.jt = jt
        arrays, info = average_checkpoints(checkpoints, which=which)
        source = ", ".join(str(p) for p in checkpoints)
        if info["kind"] != "unet":
            raise WeightsError(f"{checkpoints[0]}: a {info['kind']!r} checkpoint, expected a U-Net ('unet')")
        averaged = Checkpoint(source, "unet", False, CHECKPOINT_VERSION, info["config"], info["extra"], arrays)
        diffusion = averaged.diffusion
        if diffusion["space"] != "latent":
            raise WeightsError(f"{source}: a pixel-space U-Net; this pipeline generates in the autoencoder's latent space")
        self.latent_scale = diffusion["latent_scale"]
        self.unet, _ = load_unet(averaged)
        config = self.unet.config
        self.schedule = make_schedule(ScheduleConfig(**diffusion["schedule"]))
        self.vq = load_vqmodel(vq_path)
        if config.num_classes != NUM_CLASSES:
            raise WeightsError(f"{checkpoints[0]}: the U-Net takes {config.num_classes} mask channels, "
                               f"the data has {NUM_CLASSES} classes")
        if config.in_channels != self.vq.config.embed_dim:
            raise WeightsError(f"{checkpoints[0]} takes {config.in_channels}-channel latents but "
                               f"{vq_path} makes {self.vq.config.embed_dim}-channel ones")
        self.factor = self.vq.config.factor
        self.multiple = self.factor * config.downsample_factor

    def encode(self, images: np.ndarray):
        """RGB uint8 [B, H, W, 3] -> latent [B, C, H/f, W/f] (pixels mapped to [-1, 1]), times the
        checkpoint's latent scale (LDM's scale_factor)."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        with self.jt.no_grad():
            latent = self.vq.encode(self.jt.array(x))
            return latent if self.latent_scale == 1.0 else latent * self.latent_scale

    def decode(self, latent) -> np.ndarray:
        """Latent -> RGB uint8 [B, H, W, 3]: (x + 1) * 127.5 clipped and truncated to uint8, as
        guided-diffusion's and LDM's sampling scripts convert."""
        with self.jt.no_grad():
            if self.latent_scale != 1.0:
                latent = latent / self.latent_scale
            image = self.vq.decode(latent).numpy()
        return np.clip((image + 1.0) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def mask(self, labels: np.ndarray) -> np.ndarray:
        """Label maps uint8 [B, H, W] -> one-hot float32 [B, 29, H/f, W/f] (nearest downsampling)."""
        height, width = labels.shape[1] // self.factor, labels.shape[2] // self.factor
        return np.stack([one_hot(resize_label(label, height, width)) for label in labels])


# ---------------------------------------------------------------------------------- generation
@dataclass
class Report:
    done: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: list | None = None

    def __post_init__(self):
        self.failures = [] if self.failures is None else self.failures


def generate(jobs: Sequence[Job], models: Models, rounds, *, batch_size: int, seed: int, quality: int,
             size: tuple[int, int] | None, save_rounds: bool, show_progress: bool = True) -> Report:
    """Generate ``jobs`` in batches of images of one size; failures are collected, not raised."""
    from tqdm import tqdm

    from ldm import pipeline
    from synthesis.color_transfer import color_transfer
    from synthesis.gallery import round_path

    report = Report()
    start = time.perf_counter()
    buckets: dict[tuple[int, int], list[Item]] = {}
    progress = tqdm(total=len(jobs), unit="img", desc="infer", disable=not show_progress)

    def run(batch: list[Item]) -> None:
        names = [item.job.name for item in batch]

        def keep_round(index: int, images: np.ndarray) -> None:
            if save_rounds:
                for item, image in zip(batch, images):
                    _save(item, image, round_path(item.job.output.parent, item.job.output.stem, index), quality)

        try:
            outputs = pipeline.run_rounds(
                rounds, models.schedule, unet=models.unet, encode=models.encode, decode=models.decode,
                color_transfer=color_transfer, masks=models.mask(np.stack([i.label for i in batch])),
                references=np.stack([i.reference for i in batch]),
                seeds=[pipeline.image_seed(seed, name) for name in names], on_round=keep_round)
        except (ValueError, RuntimeError, OSError) as exc:
            report.failures.extend((name, f"generation failed: {exc}") for name in names)
            outputs = None
        for item, image in zip(batch, outputs[-1] if outputs else []):
            try:
                _save(item, image, item.job.output, quality)
                report.done += 1
            except OSError as exc:
                report.failures.append((item.job.name, f"{item.job.output}: cannot be written ({exc})"))
        progress.update(len(batch))

    for job in jobs:
        try:
            item = load_item(job, size, models.multiple)
        except (DataError, OSError) as exc:
            report.failures.append((job.name, str(exc)))
            progress.update(1)
            continue
        bucket = buckets.setdefault(item.label.shape, [])
        bucket.append(item)
        if len(bucket) == batch_size:
            run(buckets.pop(item.label.shape))
    for bucket in buckets.values():
        run(bucket)
    progress.close()
    report.seconds = time.perf_counter() - start
    return report


def _save(item: Item, image: np.ndarray, path: Path, quality: int) -> None:
    if image.shape[:2] != (item.out_height, item.out_width):
        image = resize_image(image, item.out_height, item.out_width)
    save_image(path, image, quality=quality)


# ------------------------------------------------------------------------------------- the demo
def prepare_demo(output: Path) -> tuple[Path, Path, Path]:
    """Synthetic masks and references under OUTPUT/inputs (written once, then reused):
    (masks folder, training root, mapping file)."""
    from datasets.synthetic import write_dataset

    inputs = output / "inputs"
    mapping = inputs / "test" / "labels" / MAPPING_FILE
    if not mapping.is_file():
        write_dataset(inputs, DEMO_PHOTOS, DEMO_HEIGHT, DEMO_WIDTH, seed=0, n_test=DEMO_MASKS, overwrite=True)
    return inputs / "test" / "labels", inputs / "train", mapping


def no_model_message() -> str:
    return ("infer.py: no model is available yet: the embedded default needs the demo model\n"
            f"  {DEMO_CHECKPOINT}\n  {DEMO_VQ}\n"
            "which the training issue ships. Nothing was generated. Give your own with\n"
            "--ckpt UNET.safetensors --vq VQ.safetensors, or make data to train one:\n"
            "python -m datasets.synthetic --out data/synthetic --n 200")


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    quick = args.mask is not None or args.ref is not None or args.out is not None
    if quick and not (args.mask and args.ref and args.out):
        parser.error("one-image use needs all of --mask, --ref and --out")
    if quick and args.input_path:
        parser.error("give either --input_path (a folder) or --mask/--ref/--out (one image), not both")
    demo = not quick and args.input_path is None
    if args.input_path is not None and args.img_path is None:
        parser.error("--input_path needs --img_path (the training root holding the references)")
    args.preset = args.preset or ("fast" if demo else "iidm")
    if args.steps is not None and args.preset != "fast":
        parser.error(f"--steps applies to the fast preset only; {args.preset!r} is a fixed recipe")
    if args.batch_size < 1 or not 1 <= args.quality <= 100:
        parser.error("--batch_size must be >= 1 and --quality in 1..100")
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        parser.error(str(exc))

    checkpoints = list(args.ckpt)
    if not checkpoints:
        if not (DEMO_CHECKPOINT.is_file() and DEMO_VQ.is_file()):
            print(no_model_message(), file=sys.stderr)
            return NO_MODEL
        checkpoints, args.vq = [DEMO_CHECKPOINT], args.vq or DEMO_VQ
    vq_path = args.vq or checkpoints[0].parent / "vq.safetensors"
    missing = [str(p) for p in [*checkpoints, vq_path] if not Path(p).is_file()]
    if missing:
        hint = "" if args.vq else " (give the autoencoder with --vq)"
        print(f"infer.py: checkpoint not found: {', '.join(missing)}{hint}", file=sys.stderr)
        return FAILED

    jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    from ldm import pipeline

    rank, world_size = (jt.rank, jt.world_size) if jt.in_mpi else (0, 1)
    try:
        output_dir = args.output_path or (DEMO_OUTPUT if demo else None)
        if quick:
            jobs = [Job(args.mask.stem, args.mask, args.ref, args.out)]
        else:
            if output_dir is None:
                parser.error("--input_path needs --output_path")
            if demo:
                if world_size > 1:
                    raise DataError("the demo runs in one process; run it without mpirun")
                mask_dir, img_root, mapping = prepare_demo(output_dir)
            else:
                mask_dir, img_root, mapping = args.input_path, args.img_path, args.mapping
            jobs = shard(list_jobs(mask_dir, img_root, output_dir, mapping), rank, world_size)
        pending = jobs if quick or args.overwrite else [j for j in jobs if not j.output.is_file()]
        skipped = len(jobs) - len(pending)
        models = None
        if pending:
            started = time.perf_counter()
            models = Models(checkpoints, vq_path, args.weights)
            rounds = pipeline.preset_rounds(args.preset, models.schedule, args.steps)
            log.info("models loaded in %.1f s (%s; %s); preset %s: %d rounds, %d U-Net passes per image",
                     time.perf_counter() - started, ", ".join(str(p) for p in checkpoints), vq_path,
                     args.preset, len(rounds), pipeline.unet_passes(rounds))
    except (DataError, WeightsError, ValueError) as exc:
        print(f"infer.py: {exc}", file=sys.stderr)
        return FAILED

    report = Report(skipped=skipped)
    passes = 0
    if pending:
        report = generate(pending, models, rounds, batch_size=args.batch_size, seed=args.seed,
                          quality=args.quality, size=size, save_rounds=args.save_rounds,
                          show_progress=rank == 0)
        report.skipped = skipped
        passes = pipeline.unet_passes(rounds)
    where = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    per_image = report.seconds / report.done if report.done else 0.0
    print(f"{where}infer.py: {report.done} images in {report.seconds:.1f} s ({per_image:.2f} s per image), "
          f"{passes} U-Net passes per image; {report.skipped} already present, {len(report.failures)} failed")
    if (demo or args.gallery) and not quick and rank == 0:
        from synthesis.gallery import PAGE, gallery_rows, write_gallery

        # Under mpirun this shows what is finished when rank 0 is; tools/gallery.py redoes it later.
        rows = gallery_rows(output_dir, mask_dir, img_root, mapping)
        if rows:
            print(f"gallery: {write_gallery(output_dir / PAGE, rows)}")
    if report.failures:
        print(f"{where}infer.py: {len(report.failures)} image(s) failed:", file=sys.stderr)
        for name, message in report.failures:
            print(f"  {name}: {message}", file=sys.stderr)
        return FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

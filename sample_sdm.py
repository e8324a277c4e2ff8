"""Sample a pixel-space SDM (Wang et al. 2022, "Semantic Image Synthesis via Diffusion Models").

    python sample_sdm.py                                    # the shipped demo model on synthetic masks
    python sample_sdm.py --ckpt sdm-ade20k.safetensors --data ADE_ROOT --split val --output_path OUT
    python sample_sdm.py --ckpt sdm-celeba.safetensors --label mask.png --num_samples 8 --output_path OUT
    python sample_sdm.py ... --sampler dpm++2m --steps 25  # a fast solver instead of 1000 DDPM steps

Models: a ``unet`` checkpoint of this project in pixel space: the demo, a run of ``train.py sdm``,
or SDM's released ``.pt`` converted once with its flags (configs/sdm/*.flags)::

    python -m tools.convert_weights ema_0.9999_best.pt sdm-ade20k.safetensors --config configs/sdm/ade20k.flags

Masks: ``--data ROOT`` (the dataset's standard layout, ``--split``), ``--label PNG`` (one stored
label map, with ``--instance PNG`` for the edge channel; without it the edges come from the
label map), or neither: synthetic landscapes for a landscape model. The dataset (label
conventions, edge channel, size) comes from ``--dataset`` or the checkpoint's own record.

Default sampling is SDM's: ancestral DDPM over all 1000 steps with the learned variance, x0
clipped to [-1, 1], classifier-free guidance at the scale of SDM's scripts (Cityscapes 2.0,
the others 1.5) in one batched network call. Output: ``OUT/NAME_k.png`` for sample k of each
mask (written atomically; present ones are skipped, so an interrupted run resumes),
``OUT/labels/NAME.png`` (the class-index label maps sampled, for scoring), ``OUT/sdm.json`` (the
run's settings), ``OUT/gallery.html`` and ``OUT/sheet.png`` (masks and their samples). Score with
``python -m tools.score_sdm --results OUT``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import cli
import jittor_env

FAILED = 1
DATASETS = ("cityscapes", "ade20k", "celeba", "coco", "landscape")
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "unipc")
DEMO_MASKS = 4


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    jittor_env.add_arguments(parser)
    parser.add_argument("--ckpt", dest="model",
                        help="pixel-space U-Net checkpoint (default checkpoints/sdm_demo/unet.safetensors)")
    parser.alias("--model", "--ckpt")
    parser.add_argument("--dataset", choices=DATASETS, help="label conventions (default: the checkpoint's)")
    parser.add_argument("--data", help="dataset root in its standard layout")
    parser.add_argument("--split", choices=("train", "val"), help="split of --data (default val)")
    parser.add_argument("--label", help="one stored label map to sample")
    parser.add_argument("--instance", help="its instance map (edge channel; default: edges of the label map)")
    parser.add_argument("--output_path", help="output folder (default outputs/sdm_demo)")
    parser.add_argument("--num_samples", type=int, default=4, help="samples per mask (default 4)")
    parser.add_argument("--limit", type=int, help="only the first N masks")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale s (default: SDM's for "
                                                       "the dataset, 2.0 Cityscapes, 1.5 otherwise)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="default ddpm (SDM's)")
    parser.add_argument("--steps", type=int, help="network evaluations (default ddpm 1000, ddim 50, "
                                                  "dpm++2m and unipc 25)")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per network call (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--height", type=int, help="sample height (default: the dataset's / the model's)")
    parser.add_argument("--width", type=int, help="sample width")
    parser.alias("--out", "--output_path")
    return parser


def check_options(parser, args) -> None:
    for name in ("num_samples", "batch_size", "limit", "steps", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.data and args.label:
        parser.error("give --data (a dataset) or --label (one map), not both")
    if args.instance and not args.label:
        parser.error("--instance goes with --label")
    if args.split and not args.data:
        parser.error("--split goes with --data")
    for name in ("model", "data", "label", "instance"):
        path = getattr(args, name)
        if path and not os.path.exists(path):
            parser.error(f"--{name} {path}: not found")
    if args.model and Path(args.model).suffix in (".pt", ".pth", ".pkl"):
        parser.error(f"--ckpt {args.model}: convert upstream weights first, e.g. python -m tools.convert_weights "
                     f"{args.model} sdm.safetensors --config configs/sdm/ade20k.flags")


def masks_to_sample(args, dataset, height: int, width: int):
    """(names, labels int64 [H, W] list, masks float32 [K, H, W] list)."""
    from datasets.sdm import SDMFolder, label_mask, sdm_mask

    if args.label:
        label, mask = label_mask(args.label, dataset, args.instance, height, width)
        return [Path(args.label).stem], [label], [mask]
    if args.data:
        folder = SDMFolder(dataset, args.data, args.split or "val", height, width)
        count = min(len(folder), args.limit or len(folder))
        names, labels, masks = [], [], []
        for i in range(count):
            label, instance = folder.label(i)
            names.append(folder.names[i])
            labels.append(label)
            masks.append(sdm_mask(label, instance, dataset))
        return names, labels, masks
    if dataset.name != "landscape":
        raise ValueError(f"a {dataset.name} model needs masks: give --data ROOT or --label PNG")
    import numpy as np

    from datasets.synthetic import make_label

    count = args.limit or DEMO_MASKS
    labels = [make_label(np.random.default_rng([args.seed, 1000 + i]), height, width).astype(np.int64)
              for i in range(count)]
    return ([f"synthetic{i:02d}" for i in range(count)], labels, [sdm_mask(l, None, dataset) for l in labels])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    check_options(parser, args)
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    import numpy as np

    from datasets import DataError
    from datasets.sdm import sdm_dataset
    from ldm.schedule import ScheduleConfig, make_schedule
    from models import load_unet
    from synthesis.sdm import DEFAULT_STEPS, DEMO_CHECKPOINT, RUN_FILE, contact_sheet, default_guidance, \
        label_path, output_path, sample_masks, write_gallery
    from weights.checkpoint import WeightsError
    from datasets.io import atomic_write, load_image, save_image, save_label

    log = logging.getLogger("iidm.sdm")
    model_path = Path(args.model) if args.model else DEMO_CHECKPOINT
    if not model_path.is_file():
        print(f"sample_sdm.py: {model_path}: model not found (the demo ships in checkpoints/sdm_demo; is the "
              "clone complete?)", file=sys.stderr)
        return FAILED
    out = Path(args.output_path or Path(__file__).resolve().parent / "outputs" / "sdm_demo")
    try:
        unet, checkpoint = load_unet(model_path)
        diffusion = checkpoint.diffusion
        if diffusion["space"] != "pixel":
            raise WeightsError(f"{model_path}: a {diffusion['space']}-space U-Net; SDM diffuses pixels "
                               "(use infer.py for latent models)")
        name = args.dataset or checkpoint.config.get("dataset")
        if name is None:
            raise WeightsError(f"{model_path}: the checkpoint does not say its dataset; give --dataset")
        dataset = sdm_dataset(name)
        if unet.config.num_classes != dataset.mask_channels:
            raise WeightsError(f"{model_path}: the network takes {unet.config.num_classes} mask channels, "
                               f"{dataset.name} masks have {dataset.mask_channels}")
        size = checkpoint.config.get("size") or {}
        height = args.height or size.get("height") or dataset.height
        width = args.width or size.get("width") or dataset.width
        names, labels, masks = masks_to_sample(args, dataset, height, width)
    except (ValueError, OSError, WeightsError, DataError) as exc:
        print(f"sample_sdm.py: {exc}", file=sys.stderr)
        return FAILED
    schedule = make_schedule(ScheduleConfig(**diffusion["schedule"]))
    scale = default_guidance(dataset.name) if args.guidance is None else args.guidance
    steps = args.steps or DEFAULT_STEPS[args.sampler]
    jobs = [(i, k) for i in range(len(names)) for k in range(args.num_samples)
            if not output_path(out, names[i], k).is_file()]
    log.info("%s: %d masks x %d samples of %dx%d (%d to do), %s %d steps, guidance %.2f", model_path,
             len(names), args.num_samples, height, width, len(jobs), args.sampler, steps, scale)
    out.mkdir(parents=True, exist_ok=True)
    for name, label in zip(names, labels):
        path = label_path(out, name)
        if not path.is_file():
            save_label(path, label.astype(np.uint8))
    with atomic_write(out / RUN_FILE, "w", encoding="utf-8") as f:
        json.dump({"model": str(model_path), "dataset": dataset.name, "sampler": args.sampler, "steps": steps,
                   "guidance": scale, "num_samples": args.num_samples, "seed": args.seed,
                   "height": height, "width": width, "names": names}, f, indent=1)
    for start in range(0, len(jobs), args.batch_size):
        part = jobs[start:start + args.batch_size]
        images = sample_masks(unet, schedule, np.stack([masks[i] for i, _ in part]),
                              [f"{names[i]}#{k}" for i, k in part], scale=scale, sampler=args.sampler,
                              steps=steps, seed=args.seed)
        for (i, k), image in zip(part, images):
            save_image(output_path(out, names[i], k), image)
        log.info("%d / %d samples written", min(start + len(part), len(jobs)), len(jobs))
    write_gallery(out, names, labels, args.num_samples, dataset, f"SDM samples ({model_path.name})")
    shown = min(len(names), 8)
    sheet = contact_sheet(labels[:shown], [[load_image(output_path(out, names[i], k)) for k in
                                            range(args.num_samples)] for i in range(shown)], dataset)
    save_image(out / "sheet.png", sheet)
    print(f"sample_sdm.py: {len(names)} masks x {args.num_samples} samples in {out} ({len(jobs)} new); "
          f"gallery {out / 'gallery.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

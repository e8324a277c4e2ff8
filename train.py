"""Train the autoencoder, the latent diffusion U-Net, or the segmenter that scores mask accuracy.

    python train.py autoencoder --data TRAIN_ROOT --output_path RUN_DIR [--preset vq-f4|small|tiny] ...
    python train.py ldm --latents STORE --output_path RUN_DIR [--preset iidm|demo|tiny] ...
    python train.py ldm --latents STORE --init unet.safetensors --output_path RUN_DIR ...   # fine-tune
    python train.py sdm --data ROOT --dataset ade20k --phase pretrain --output_path RUN_DIR [--preset sdm-ade20k]
    python train.py sdm --data ROOT --dataset ade20k --phase finetune --init RUN_DIR/checkpoints/last.safetensors ...
    python train.py segmenter --data TRAIN_ROOT --output_path RUN_DIR [--widths 32,64,128,256,256] ...
    python train.py STAGE --output_path RUN_DIR --resume [--max_steps N ...]   # continue a run

Every stage writes RUN_DIR/options.json, log.jsonl (one strict-JSON record per step), samples/ and
checkpoints/ (last.safetensors, written atomically and kept only once the next step proves it
finite; step_NNNNNNN.safetensors every --keep_every steps). --resume continues exactly where the
run stopped, with its stored options except those given again; --seed fixes the initial weights
and every random draw. The autoencoder stage trains the VQ-f4 autoencoder (L1 + LPIPS + PatchGAN +
codebook loss) on TRAIN_ROOT/imgs; without --lpips_vgg/--lpips_heads it leaves out the perceptual
term and says so. The ldm stage trains the U-Net on a latent store written by
``python -m tools.cache_latents`` (docs/training.md); under ``mpirun -np N`` the batch is split
across the N ranks and only rank 0 writes. The segmenter stage trains the plug-in segmenter that
``python -m tools.score --segmenter RUN_DIR/checkpoints/last.safetensors`` uses for M.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import cli
import jittor_env

STAGES = ("autoencoder", "ldm", "sdm", "segmenter")
SDM_DATASET_NAMES = ("cityscapes", "ade20k", "celeba", "coco", "landscape")
USAGE = 2    # exit status: bad or missing options
FAILED = 1   # exit status: the run could not start or stopped


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=STAGES, help="what to train")
    jittor_env.add_arguments(parser)
    common = parser.add_argument_group("every stage")
    common.add_argument("--output_path", help="run folder (options, log, samples, checkpoints)")
    common.add_argument("--resume", action="store_true",
                        help="continue the run in --output_path from its newest good checkpoint, with its "
                             "stored options except those given again (those that would change the network, its "
                             "latent scale or the data view are refused)")
    common.add_argument("--preset", help="architecture (autoencoder: vq-f4 (default), small, tiny; ldm: iidm "
                                         "(default), demo, tiny); on --resume the run's own")
    common.add_argument("--batch_size", type=int, help="autoencoder default 8; ldm 5 (global); segmenter 8")
    common.add_argument("--lr", type=float, help="autoencoder default 4.5e-6 x batch size (LDM's rule); ldm 1e-4; "
                                                "segmenter 1e-3")
    common.add_argument("--max_steps", type=int, help="train until this step, counted across resumes")
    common.add_argument("--save_every", type=int, help="write the checkpoint every N steps")
    common.add_argument("--sample_every", type=int, help="write sample images every N steps (0: never)")
    common.add_argument("--keep_every", type=int, help="also keep the weights (and EMA) every N steps as "
                                                       "checkpoints/step_NNNNNNN.safetensors, e.g. to average two "
                                                       "of them as IIDM's submission did (default 0: only last)")
    common.add_argument("--max_bad_steps", type=int, help="bad steps (non-finite, or loss spikes) in a row that stop the "
                                                           "run; half of the last 4x this many also stop it (default 10)")
    common.add_argument("--seed", type=int, help="fixes the initial weights and every random draw (default 0)")
    init = parser.add_argument_group("autoencoder and ldm")
    init.add_argument("--init", help="start a new run from this checkpoint's weights: for the autoencoder a vqmodel "
                                     "with the --preset's architecture (e.g. converted vq-f4 weights); for ldm a "
                                     "U-Net whose architecture, schedule and latent scale the run takes over (e.g. "
                                     "converted IIDM weights or checkpoints/demo/unet.safetensors; a training "
                                     "checkpoint gives its EMA weights)")
    data = parser.add_argument_group("autoencoder and segmenter")
    data.add_argument("--data", help="training root holding imgs/ and labels/")
    data.add_argument("--height", type=int, help="training image height (default 384)")
    data.add_argument("--width", type=int, help="training image width (default 512)")
    ae = parser.add_argument_group("autoencoder")
    ae.add_argument("--disc_start", type=int, help="step from which the discriminator is used (default 0, as "
                                                   "LDM's vq-f4 config)")
    ae.add_argument("--lpips_vgg", help="torchvision VGG16 weights (vgg16-397923af.pth) for the LPIPS term")
    ae.add_argument("--lpips_heads", help="LPIPS linear heads (the lpips package's weights/v0.1/vgg.pth)")
    ae.add_argument("--codebook_restart", type=int, help="every N steps (and at step 0), set codes no position "
                                                         "chose since the last restart to encoder outputs of the "
                                                         "batch (default 0: off, as taming)")
    ldm = parser.add_argument_group("ldm (see docs/training.md)")
    ldm.add_argument("--latents", help="latent store written by `python -m tools.cache_latents`")
    ldm.add_argument("--mask_dropout", type=float, help="probability of training a sample with the null mask "
                                                        "(default 0.2; SDM: 0, then fine-tune at 0.2 with lr 2e-5)")
    ldm.add_argument("--ema_decay", type=float, help="default 0.9999")
    ldm.add_argument("--latent_scale", help="diffuse latent x this (LDM's scale_factor; default 1, as IIDM's "
                                            "VQ-f4); 'auto': 1 / the store's latent standard deviation")
    ldm.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step (default 1)")
    ldm.add_argument("--fp16", action="store_true", help="float16 torso with fp32 master weights (CUDA only)")
    ldm.add_argument("--grad_checkpoint", action="store_true",
                     help="recompute each U-Net block in the backward pass, one block at a time: much "
                          "lower peak memory for about one more forward per step (docs/training.md)")
    ldm.add_argument("--vq", help="autoencoder that decodes the sample images (default: the store's, when its "
                                  "checksum still matches)")
    sdm = parser.add_argument_group("sdm (pixel-space SDM; also takes --init, --mask_dropout, --ema_decay, "
                                    "--grad_accum, --fp16, --data, --height, --width)")
    sdm.add_argument("--dataset", help="label conventions and folder layout: cityscapes, ade20k, celeba, coco, "
                                       "landscape (default landscape)")
    sdm.add_argument("--split", choices=("train", "val"), help="which split of --data to train on (default train)")
    sdm.add_argument("--phase", choices=("pretrain", "finetune"),
                     help="SDM's two phases: pretrain (lr 1e-4, mask dropout 0) or finetune (lr 2e-5, mask "
                          "dropout 0.2, normally with --init the pretrained weights); --lr / --mask_dropout "
                          "override (default pretrain)")
    sdm.add_argument("--random_crop", choices=("on", "off"),
                     help="SDM's training view of its square datasets: the short side scaled to a random "
                          "length in [S, 1.25 S], then a random S x S window; off: every photo resized to "
                          "the size (default on for ade20k, celeba and coco, off for cityscapes and "
                          "landscape, as SDM)")
    seg = parser.add_argument_group("segmenter")
    seg.add_argument("--widths", help="channel widths of the segmenter's levels (default 32,64,128,256,256)")
    parser.alias("--out", "--output_path")
    return parser


STAGE_OPTIONS = {
    "autoencoder": {"data", "height", "width", "disc_start", "lpips_vgg", "lpips_heads", "init", "codebook_restart"},
    "ldm": {"init", "latents", "mask_dropout", "ema_decay", "latent_scale", "grad_accum", "fp16", "grad_checkpoint", "vq"},
    "segmenter": {"data", "height", "width", "widths"},
    "sdm": {"data", "height", "width", "init", "mask_dropout", "ema_decay", "grad_accum", "fp16", "dataset",
            "split", "phase", "random_crop"},
}
COMMON = ("batch_size", "lr", "max_steps", "save_every", "sample_every", "keep_every", "max_bad_steps", "seed")


def check_options(parser: cli.ArgumentParser, args) -> None:
    """Options of another stage, missing paths and bad values end the run (exit 2) before anything loads."""
    given = {name for name in set().union(*STAGE_OPTIONS.values()) if getattr(args, name) not in (None, False)}
    if args.dataset is not None and args.dataset not in SDM_DATASET_NAMES:
        parser.error(f"--dataset must be one of {', '.join(SDM_DATASET_NAMES)}, got {args.dataset!r}")
    foreign = sorted(given - STAGE_OPTIONS[args.stage])
    if foreign:
        parser.error(f"{', '.join('--' + n for n in foreign)}: not an option of the {args.stage} stage")
    if not args.output_path:
        parser.error("every stage needs --output_path RUN_DIR")
    if os.path.exists(args.output_path) and not os.path.isdir(args.output_path):
        parser.error(f"--output_path {args.output_path}: a file, not a run folder")
    if args.widths is not None:
        try:
            widths = [int(w) for w in args.widths.split(",")]
        except ValueError:
            widths = []
        if not widths or min(widths) < 1:
            parser.error(f"--widths must be comma-separated integers >= 1, got {args.widths!r}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not args.resume:
        needed = {"autoencoder": "data", "ldm": "latents", "segmenter": "data", "sdm": "data"}[args.stage]
        if not getattr(args, needed):
            parser.error(f"the {args.stage} stage needs --{needed}")
    for name in ("batch_size", "max_steps", "max_bad_steps", "height", "width", "grad_accum"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    for name in ("save_every", "sample_every", "keep_every", "disc_start", "codebook_restart"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            parser.error(f"--{name} must be >= 0, got {value}")
    if args.resume and args.init:
        parser.error("--init starts a new run from given weights; --resume continues the run in --output_path")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if (args.lpips_vgg is None) != (args.lpips_heads is None):
        parser.error("LPIPS needs both weight files: --lpips_vgg (VGG16) and --lpips_heads (linear heads)")
    for name in ("data", "latents", "init", "lpips_vgg", "lpips_heads", "vq"):
        path = getattr(args, name, None)
        if path and not os.path.exists(path):
            parser.error(f"--{name} {path}: not found")
    if args.stage == "segmenter":
        for name, why in (("preset", "its architecture is --widths"), ("sample_every", "it writes no samples")):
            if getattr(args, name) is not None:
                parser.error(f"--{name}: not an option of the segmenter stage ({why})")
    if args.stage == "sdm" and not args.resume:
        _, height, width, _ = sdm_new_run(args)
        if sdm_random_crop(args) and height != width:
            parser.error(f"--random_crop on takes square sizes (SDM crops only its square datasets); the size is "
                         f"{height}x{width}")
    if args.mask_dropout is not None and not 0.0 <= args.mask_dropout <= 1.0:
        parser.error(f"--mask_dropout must be in [0, 1], got {args.mask_dropout}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.latent_scale is not None and (args.resume or args.init):
        parser.error(f"--latent_scale cannot change {'when resuming' if args.resume else 'with --init'}: the network "
                     "learnt its scale, which the run keeps")
    if args.latent_scale is not None and args.latent_scale != "auto":
        try:
            value = float(args.latent_scale)
        except ValueError:
            parser.error(f"--latent_scale must be a number or 'auto', got {args.latent_scale!r}")
        if not (value > 0 and value != float("inf")):
            parser.error(f"--latent_scale must be a finite number > 0, got {args.latent_scale}")


def sdm_new_run(args) -> tuple[str, int, int, str]:
    """(dataset, height, width, preset) of a new sdm run: the options, else the dataset's own
    size and SDM's preset for it (the small sdm-demo for the landscape set)."""
    from datasets.sdm import sdm_dataset

    dataset = args.dataset or "landscape"
    conventions = sdm_dataset(dataset)
    preset = args.preset or ("sdm-demo" if dataset == "landscape" else f"sdm-{dataset}")
    return dataset, args.height or conventions.height, args.width or conventions.width, preset


def sdm_random_crop(args) -> bool:
    """Whether a new sdm run crops: --random_crop, else SDM's choice for the dataset."""
    if args.random_crop is not None:
        return args.random_crop == "on"
    return (args.dataset or "landscape") in ("ade20k", "celeba", "coco")


def check_with_jittor(parser: cli.ArgumentParser, args, jt) -> None:
    """The checks that need the model code (presets) or the device, still before anything loads."""
    if args.preset is not None and args.stage == "ldm":
        from models.unet import UNET_PRESETS
        latent = [name for name in UNET_PRESETS if not name.startswith("sdm")]   # sdm-*: the sdm stage's
        if args.preset not in latent:
            parser.error(f"--preset {args.preset}: not a latent U-Net preset; choose one of {', '.join(latent)}")
    if args.preset is not None and args.stage == "sdm":
        from models.unet import UNET_PRESETS
        if args.preset not in UNET_PRESETS:
            parser.error(f"--preset {args.preset}: not a U-Net preset; choose one of {', '.join(UNET_PRESETS)}")
    if args.preset is not None and args.stage == "autoencoder":
        from autoencoder.vqmodel import PRESETS
        if args.preset not in PRESETS:
            parser.error(f"--preset {args.preset}: not an autoencoder preset; choose one of {', '.join(PRESETS)}")
    if args.fp16 and not jt.flags.use_cuda:
        parser.error("--fp16 needs CUDA (on the CPU float16 is hundreds of times slower); leave it out")
    from weights.checkpoint import WeightsError

    try:
        if args.init:
            check_init(args)
        stored = check_resume(args) if args.resume else None
        if stored is not None or not args.resume:       # nothing to resume: the stage says so
            check_sizes(args, stored, jt.world_size if jt.in_mpi else 1)
    except (ValueError, WeightsError) as exc:
        parser.error(str(exc))
    except KeyError as exc:
        parser.error(f"{args.output_path}: its checkpoint's configuration lacks {exc}; the run was written by an "
                     "older version, start a new run from its weights")


def check_sizes(args, stored: dict | None, world: int) -> None:
    """Sizes the networks cannot take and batches that do not split, with the run's own values
    where the options leave them out (``stored``: a resumed run's configuration)."""
    train = (stored or {}).get("train", {})
    if args.stage in ("ldm", "sdm"):
        batch = args.batch_size or train.get("batch_size", 5)
        accum = args.grad_accum or train.get("grad_accum", 1)
        if batch % (accum * world):
            raise ValueError(f"--batch_size {batch} does not split into --grad_accum {accum} micro-batches x "
                             f"{world} MPI rank(s)")
    if args.stage == "autoencoder" and stored is None:
        from autoencoder.vqmodel import vq_config

        factor = vq_config(args.preset or "vq-f4").factor
        for name, value in (("height", args.height or 384), ("width", args.width or 512)):
            if value % factor:
                raise ValueError(f"--{name} {value} is not a multiple of the autoencoder's downsampling factor "
                                 f"{factor}")
    if args.stage == "sdm" and stored is None and not args.init:
        from models import unet_preset

        _, height, width, preset = sdm_new_run(args)
        factor = unet_preset(preset).downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value % factor:
                raise ValueError(f"--{name} {value} is not a multiple of {factor}, which the {preset} U-Net needs")


RUN_KIND = {"autoencoder": "vqmodel", "ldm": "unet", "sdm": "unet", "segmenter": "segmenter"}
RUN_SECTIONS = {"autoencoder": ("network", "loss", "train"), "ldm": ("network", "diffusion", "train", "latents"),
                "sdm": ("network", "diffusion", "train", "data", "dataset", "size"), "segmenter": ("network", "train", "data")}


def check_init(args) -> None:
    """The --init checkpoint's header agrees with the run: its kind (and diffusion space) and, when
    --preset is given too, its network."""
    from weights.checkpoint import load_checkpoint

    if args.stage == "autoencoder":
        from autoencoder.vqmodel import VQConfig, vq_config

        start = load_checkpoint(args.init, "vqmodel", header_only=True)
        if start.network_config(VQConfig) != vq_config(args.preset or "vq-f4"):
            raise ValueError(f"--init {args.init} holds another autoencoder than --preset {args.preset or 'vq-f4'}; "
                             "give the preset it was trained with")
    else:
        init_network(args, "latent" if args.stage == "ldm" else "pixel")


def check_resume(args) -> dict | None:
    """A resumed run keeps its network, data view and latent scale: options that would change
    them are refused, never ignored. A run that cannot be read is left to the stage to report."""
    from training.loop import stored_run
    from weights.checkpoint import WeightsError

    try:
        source, stored = stored_run(args.output_path, RUN_KIND[args.stage], RUN_SECTIONS[args.stage])
    except (OSError, WeightsError):
        return None
    network = stored["network"]
    if args.fp16 and not network.get("use_fp16", False):
        raise ValueError(f"--fp16: {source} trains in float32; a resumed run keeps its precision")
    if args.stage == "ldm" and args.latents:
        check_same_autoencoder(args.latents, stored, source)
    if args.preset is not None:
        if args.stage == "autoencoder":
            from autoencoder.vqmodel import vq_config

            preset = vq_config(args.preset).to_dict()
        else:
            from models import unet_preset

            preset = unet_preset(args.preset, use_fp16=bool(network.get("use_fp16", False))).to_dict()
        if preset != network:
            raise ValueError(f"--preset {args.preset}: {source} trains another network; a resumed run keeps its "
                             "own, leave --preset out")
    kept = {}
    if args.stage == "segmenter":
        kept = {"widths": (args.widths and tuple(int(w) for w in args.widths.split(",")), tuple(network["widths"])),
                "height": (args.height, network["height"]), "width": (args.width, network["width"])}
    elif args.stage == "autoencoder":
        kept = {"height": (args.height, stored["train"]["height"]), "width": (args.width, stored["train"]["width"])}
    elif args.stage == "sdm":
        crop = bool(stored.get("random_crop", False))    # absent: written before crops existed
        kept = {"dataset": (args.dataset, stored["dataset"]), "height": (args.height, stored["size"]["height"]),
                "width": (args.width, stored["size"]["width"]),
                "random_crop": (args.random_crop, "on" if crop else "off")}
    for name, (given, value) in kept.items():
        if given is not None and given != value:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ValueError(f"--{name} {getattr(args, name)}: {source} was trained with --{name} {shown}; a "
                             f"resumed run keeps it, leave --{name} out")
    return stored


def check_same_autoencoder(latents: str, stored: dict, source) -> None:
    """A resumed U-Net run may read its store from another place, never latents of another
    autoencoder: the network learnt that autoencoder's latent space."""
    from ldm.latents import StoreError, read_manifest

    try:
        manifest = read_manifest(Path(latents))
    except (StoreError, OSError, ValueError):
        return    # not a store: the stage says so
    recorded, given = stored.get("latents_autoencoder_sha256"), manifest.get("autoencoder_sha256")
    if recorded and given != recorded:
        raise ValueError(f"--latents {latents}: encoded by another autoencoder than the one {source} trains on "
                         f"(sha256 {str(given)[:12]}..., the run's {recorded[:12]}...); a resumed run keeps its "
                         "latent space")


def given_options(args, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def autoencoder_stage(args) -> str:
    from dataclasses import replace

    from autoencoder.losses import LossConfig
    from autoencoder.training import AutoencoderTrainConfig, stored_configs, train_autoencoder
    from autoencoder.vqmodel import vq_config

    if args.resume:
        model_config, loss_config, train_config = stored_configs(args.output_path)
        if train_config.lr is None and args.lr is None and args.batch_size not in (None, train_config.batch_size):
            # The default rate scales with the batch size; a resumed run keeps the rate it trained with.
            logging.getLogger("iidm").info("keeping the run's learning rate %.3g (give --lr to change it)",
                                           train_config.learning_rate)
            train_config = replace(train_config, lr=train_config.learning_rate)
    else:
        model_config, loss_config, train_config = vq_config(args.preset or "vq-f4"), LossConfig(), AutoencoderTrainConfig()
    if args.disc_start is not None:
        loss_config = replace(loss_config, disc_start=args.disc_start)
    train_config = replace(train_config, **given_options(args, COMMON + ("height", "width", "codebook_restart")))
    result = train_autoencoder(args.data, args.output_path, model_config, loss_config, train_config,
                               lpips_vgg=args.lpips_vgg, lpips_heads=args.lpips_heads, resume=args.resume,
                               init=args.init)
    return f"autoencoder trained to step {result['step']}; checkpoint {result['checkpoint']}"


def sample_decoder(store, vq_path: str | None):
    """latent -> image for the sample images: ``vq_path``, else the autoencoder that made the store
    while its file still has the recorded checksum; None (no samples) when neither is usable."""
    from autoencoder.vqmodel import load_vqmodel
    from datasets.io import sha256_of

    recorded = store.manifest.get("autoencoder", {}).get("path")
    path = vq_path or recorded
    if path is None or (vq_path is None and not (os.path.isfile(path) and
                                                   sha256_of(path) == store.manifest.get("autoencoder_sha256"))):
        logging.getLogger("iidm").warning("no sample images: the store's autoencoder %s is missing or changed; "
                                          "pass --vq", recorded)
        return None
    return load_vqmodel(path).decode


def latent_scale_option(text: str, store) -> float:
    """--latent_scale: a number, or 'auto' = 1 / the store's latent standard deviation."""
    from ldm.training import latent_std

    if text == "auto":
        std = latent_std(store)
        if not std > 0:
            raise ValueError(f"--latent_scale auto: the latents in {store.path} have standard deviation {std}")
        logging.getLogger("iidm").info("latent scale 1/%.6f = %.6f (the store's standard deviation)", std, 1 / std)
        return 1.0 / std
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--latent_scale must be a number or 'auto', got {text!r}") from None


def init_network(args, space: str):
    """The network config fixed by the --init checkpoint of a new ldm ("latent") or sdm ("pixel")
    run, from the file's header; refused when it is the other kind of diffusion model or another
    network than --preset."""
    from dataclasses import replace

    from models import UNetConfig, unet_preset
    from weights.checkpoint import load_checkpoint

    start = load_checkpoint(args.init, "unet", header_only=True)
    if start.diffusion["space"] != space:
        raise ValueError(f"--init {args.init}: a {start.diffusion['space']}-space U-Net, not a {space}-space one "
                         f"(the {args.stage} stage)")
    unet_config = replace(start.network_config(UNetConfig), use_fp16=args.fp16)
    if args.preset and unet_preset(args.preset, use_fp16=args.fp16) != unet_config:
        raise ValueError(f"--init {args.init} holds another network than --preset {args.preset}; leave "
                         "--preset out (the run takes the checkpoint's architecture)")
    return unet_config


def init_checkpoint(args, space: str):
    """The --init checkpoint of a new ldm or sdm run (arrays read) and the network config it fixes."""
    from weights.checkpoint import load_checkpoint

    unet_config = init_network(args, space)
    return load_checkpoint(args.init, "unet"), unet_config


def seeded_unet(unet_config, seed: int, init: str | None = None, start=None, note: str = ""):
    """The U-Net to train: built and initialised after seeding (so --seed fixes its initial weights),
    then given the EMA weights of the --init checkpoint ``start`` when there is one."""
    from models import UNetModel
    from training.loop import materialize, seed_everything
    from weights.checkpoint import load_weights

    seed_everything(seed)
    unet = UNetModel(unet_config)
    materialize(unet)
    if init:
        load_weights(unet, start.weights("ema"), init)
        logging.getLogger("iidm").info("starting from the weights of %s%s", init, note)
    return unet


def unet_report(kind: str, result: dict) -> str:
    return (f"{kind} trained to step {result['step']} ({result['updates']} updates, {result['bad_steps']} skipped); "
            f"checkpoint {result['checkpoint']}")


def ldm_stage(args) -> str:
    from dataclasses import replace

    from ldm.latents import LatentStore
    from ldm.training import TrainConfig, stored_config, train
    from models import UNetConfig, unet_preset
    from weights.checkpoint import config_from_dict

    if args.resume:
        unet_values, config, stored_latents = stored_config(args.output_path)
        unet_config = config_from_dict(UNetConfig, unet_values, complete=True, source=f"{args.output_path} (network)")
    elif args.init:
        start, unet_config = init_checkpoint(args, "latent")
        config, stored_latents = TrainConfig(schedule=start.diffusion["schedule"],
                                             latent_scale=start.diffusion["latent_scale"]), None
    else:
        unet_config = unet_preset(args.preset or "iidm", use_fp16=args.fp16)
        config, stored_latents = TrainConfig(), None
    store = LatentStore(args.latents or stored_latents)
    given = given_options(args, COMMON + ("mask_dropout", "ema_decay", "grad_accum"))
    given.update({flag: True for flag in ("fp16", "grad_checkpoint") if getattr(args, flag)})
    if args.latent_scale is not None:
        given["latent_scale"] = latent_scale_option(args.latent_scale, store)
    config = replace(config, **given)
    decode = sample_decoder(store, args.vq) if config.sample_every else None
    unet = seeded_unet(unet_config, config.seed, args.init, start if args.init else None,
                       f" (latent scale {config.latent_scale:.6g})")
    return unet_report("LDM", train(unet, store, args.output_path, config, decode=decode, resume=args.resume))


def sdm_stage(args) -> str:
    from dataclasses import replace

    from datasets.sdm import SDMFolder
    from ldm.pixel_training import PHASES, train
    from ldm.training import TrainConfig, stored_train_config
    from models import UNetConfig, unet_preset
    from training.loop import stored_run, stored_section

    if args.resume:
        source, stored = stored_run(args.output_path, "unet", RUN_SECTIONS["sdm"])
        unet_config = stored_section(UNetConfig, stored, "network", source)
        config, data = stored_train_config(stored, source), stored["data"]
        dataset, size = stored["dataset"], stored["size"]
        height, width, data = size["height"], size["width"], args.data or data
        random_crop = bool(stored.get("random_crop", False))   # absent: written before crops existed
    else:
        dataset, height, width, preset = sdm_new_run(args)
        data, random_crop = args.data, sdm_random_crop(args)
        if args.init:
            start, unet_config = init_checkpoint(args, "pixel")
            config = TrainConfig(schedule=start.diffusion["schedule"])
        else:
            unet_config = unet_preset(preset, use_fp16=args.fp16)
            config = TrainConfig()
        config = replace(config, **PHASES[args.phase or "pretrain"])
    given = given_options(args, COMMON + ("mask_dropout", "ema_decay", "grad_accum"))
    given.update({flag: True for flag in ("fp16",) if getattr(args, flag)})
    if args.resume and args.phase:
        given = {**PHASES[args.phase], **given}
    config = replace(config, **given)
    folder = SDMFolder(dataset, data, args.split or "train", height=height, width=width)
    unet = seeded_unet(unet_config, config.seed, args.init, start if args.init else None)
    return unet_report("SDM", train(unet, folder, args.output_path, config, resume=args.resume,
                                    random_crop=random_crop))


def segmenter_stage(args) -> str:
    from dataclasses import replace

    from datasets import TrainingSet
    from scoring.segmenter import SegmenterConfig
    from scoring.segmenter_training import SegmenterTask, SegmenterTrainConfig
    from training.loop import run, seed_everything, stored_run, stored_section

    if args.resume:
        source, stored = stored_run(args.output_path, "segmenter", RUN_SECTIONS["segmenter"])
        net_config = stored_section(SegmenterConfig, stored, "network", source)
        cfg, data = stored_section(SegmenterTrainConfig, stored, "train", source), args.data or stored["data"]
        if args.max_steps not in (None, cfg.max_steps):
            logging.getLogger("iidm").warning(
                "--max_steps %d: the learning rate's cosine runs over --max_steps, so from here on it follows the "
                "cosine to step %d, not the run's %d: not the run a start with --max_steps %d would have made",
                args.max_steps, args.max_steps, cfg.max_steps, args.max_steps)
    else:
        widths = tuple(int(w) for w in (args.widths or "32,64,128,256,256").split(","))
        net_config = SegmenterConfig(widths=widths, height=args.height or 384, width=args.width or 512)
        cfg, data = SegmenterTrainConfig(), args.data
    cfg = replace(cfg, **given_options(args, ("batch_size", "lr", "max_steps", "save_every", "keep_every",
                                              "max_bad_steps", "seed")))
    dataset = TrainingSet(data, net_config.height, net_config.width)
    seed_everything(cfg.seed)
    task = SegmenterTask(dataset, net_config, cfg, str(data))
    result = run(task, args.output_path, cfg.loop(), resume=args.resume)
    return (f"segmenter trained to step {result.step} (batch pixel accuracy "
            f"{result.last['batch_pixel_accuracy'] if result.last else float('nan'):.4f}); checkpoint {result.checkpoint}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    check_options(parser, args)
    jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    check_with_jittor(parser, args, jt)
    from datasets import DataError
    from ldm.latents import StoreError
    from training.logs import LogError
    from training.loop import TrainingStopped
    from weights.checkpoint import WeightsError

    stage = {"autoencoder": autoencoder_stage, "ldm": ldm_stage, "sdm": sdm_stage,
             "segmenter": segmenter_stage}[args.stage]
    try:
        message = stage(args)
    except (ValueError, OSError, WeightsError, StoreError, DataError, LogError, TrainingStopped) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return FAILED
    from training.loop import is_writer

    if is_writer():   # every rank trained the same model; one reports it
        print(f"train.py: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

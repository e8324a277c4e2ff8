"""Train the autoencoder or the latent diffusion model on your own images and label maps.

    python train.py autoencoder --data TRAIN_ROOT --out RUN_DIR [--preset vq-f4|small|tiny] ...
    python train.py ldm --latents STORE --preset iidm|demo ...

The autoencoder stage trains the VQ-f4 autoencoder (L1 + LPIPS + PatchGAN + codebook loss) on the
photos of TRAIN_ROOT/imgs; RUN_DIR receives log.jsonl, samples/ and checkpoints/last.safetensors
(see autoencoder/training.py). Without --lpips_vgg/--lpips_heads it trains without the perceptual
term and says so.

The ldm stage trains the U-Net on a latent store written by `python -m tools.cache_latents`; RUN_DIR receives
log.jsonl, samples/ and checkpoints/ (see ldm/training.py and docs/training.md). Under
``mpirun -np N`` the batch is split across the N ranks and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jittor_env

STAGES = ("autoencoder", "ldm")
USAGE = 2    # exit status: missing options
NOT_YET = USAGE  # kept for callers of the earlier release, where the ldm stage did not exist


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES, help="what to train")
    jittor_env.add_arguments(parser)
    ae = parser.add_argument_group("autoencoder")
    ae.add_argument("--data", help="training root holding imgs/ and labels/")
    ae.add_argument("--out", help="run folder (log, samples, checkpoints)")
    ae.add_argument("--preset", help="architecture: vq-f4 (default; LDM's), small or tiny; on --resume the "
                                     "checkpoint's own")
    ae.add_argument("--height", type=int, help="training image height (default 384)")
    ae.add_argument("--width", type=int, help="training image width (default 512)")
    ae.add_argument("--batch_size", type=int, help="default 8")
    ae.add_argument("--lr", type=float, help="learning rate of both Adams (default: 4.5e-6 x batch size, LDM's rule)")
    ae.add_argument("--max_steps", type=int, help="train until this step, counted across resumes (default 100000)")
    ae.add_argument("--disc_start", type=int, help="step from which the discriminator is used (default 0, as "
                                                   "LDM's vq-f4 config)")
    ae.add_argument("--lpips_vgg", help="torchvision VGG16 weights (vgg16-397923af.pth) for the LPIPS term")
    ae.add_argument("--lpips_heads", help="LPIPS linear heads (the lpips package's weights/v0.1/vgg.pth)")
    ae.add_argument("--init", help="start from this vqmodel checkpoint (e.g. converted vq-f4 weights)")
    ae.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint, with its stored options "
                         "except those given again")
    ae.add_argument("--sample_every", type=int, help="save reconstructions every N steps (default 1000)")
    ae.add_argument("--save_every", type=int, help="write the checkpoint every N steps (default 1000)")
    ae.add_argument("--seed", type=int, help="default 0")
    ae.add_argument("--codebook_restart", type=int, help="every N steps (and at step 0), set codes no position "
                                                         "chose since the last restart to encoder outputs of the "
                                                         "batch (default 0: off, as taming)")
    ldm = parser.add_argument_group(
        "ldm", "also uses --out, --preset (U-Net: iidm (default), demo or tiny), --batch_size (global, default 5), "
               "--lr (default 1e-4), --max_steps, --save_every, --sample_every (default 5000), --seed, --resume; "
               "see docs/training.md")
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
    return parser


def train_autoencoder_stage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.data or not args.out:
        parser.error("the autoencoder stage needs --data TRAIN_ROOT and --out RUN_DIR")
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    from dataclasses import replace

    from autoencoder.losses import LossConfig
    from autoencoder.training import TrainConfig, stored_configs, train_autoencoder
    from autoencoder.vqmodel import vq_config
    from datasets import DataError
    from weights.checkpoint import WeightsError

    try:
        if args.resume:
            model_config, loss_config, train_config = stored_configs(args.out)
        else:
            model_config, loss_config, train_config = vq_config("vq-f4"), LossConfig(), TrainConfig()
        if args.preset:
            model_config = vq_config(args.preset)
        if args.disc_start is not None:
            loss_config = replace(loss_config, disc_start=args.disc_start)
        given = {name: getattr(args, name) for name in ("height", "width", "batch_size", "lr", "max_steps",
                                                        "sample_every", "save_every", "seed", "codebook_restart")
                 if getattr(args, name) is not None}
        train_config = replace(train_config, **given)
        result = train_autoencoder(args.data, args.out, model_config, loss_config, train_config,
                                   lpips_vgg=args.lpips_vgg, lpips_heads=args.lpips_heads, resume=args.resume,
                                   init=args.init)
    except (ValueError, OSError, WeightsError, DataError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    print(f"train.py: autoencoder trained to step {result['step']}; checkpoint {result['checkpoint']}")
    return 0


def sample_decoder(store, vq_path: str | None):
    """latent -> image for the sample images: ``vq_path``, else the autoencoder that made the store
    while its file still has the recorded checksum; None (no samples) when neither is usable."""
    from autoencoder.vqmodel import load_vqmodel
    from tools.cache_latents import sha256_of

    recorded = store.manifest.get("autoencoder", {}).get("path")
    path = vq_path or recorded
    if path is None or (vq_path is None and not (os.path.isfile(path) and
                                                   sha256_of(path) == store.manifest.get("autoencoder_sha256"))):
        logging.getLogger("iidm").warning("no sample images: the store's autoencoder %s is missing or changed; "
                                          "pass --vq", recorded)
        return None
    model = load_vqmodel(path)
    return model.decode


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


def train_ldm_stage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.latents or not args.out:
        print("train.py: the ldm stage needs --latents STORE and --out RUN_DIR", file=sys.stderr)
        return USAGE
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    from dataclasses import replace

    from weights.checkpoint import WeightsError
    from ldm.latents import LatentStore, StoreError
    from ldm.training import TrainConfig, TrainingStopped, stored_config, train
    from models import UNetConfig, UNetModel, unet_preset

    try:
        store = LatentStore(args.latents)
        if args.resume:
            unet_values, config, _ = stored_config(args.out)
            unet_config = UNetConfig.from_dict(unet_values)
            if args.preset and unet_preset(args.preset, use_fp16=unet_config.use_fp16) != unet_config:
                raise ValueError(f"{args.out} trains another network than --preset {args.preset}; leave it out")
        else:
            unet_config = unet_preset(args.preset or "iidm", use_fp16=args.fp16)
            config = TrainConfig()
        given = {name: getattr(args, name) for name in ("batch_size", "lr", "max_steps", "save_every",
                                                        "sample_every", "seed", "mask_dropout", "ema_decay",
                                                        "grad_accum") if getattr(args, name) is not None}
        given.update({flag: True for flag in ("fp16", "grad_checkpoint") if getattr(args, flag)})
        if args.latent_scale is not None:
            if args.resume:
                raise ValueError("--latent_scale cannot change when resuming: the network learnt that scale")
            given["latent_scale"] = latent_scale_option(args.latent_scale, store)
        config = replace(config, **given)
        decode = sample_decoder(store, args.vq) if config.sample_every else None
        result = train(UNetModel(unet_config), store, args.out, config, decode=decode, resume=args.resume)
    except (ValueError, OSError, WeightsError, StoreError, TrainingStopped) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    print(f"train.py: LDM trained to step {result['step']} ({result['updates']} updates, "
          f"{result['bad_steps']} skipped); checkpoint {result['checkpoint']}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.stage == "autoencoder":
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return train_autoencoder_stage(parser, args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return train_ldm_stage(parser, args)


if __name__ == "__main__":
    sys.exit(main())

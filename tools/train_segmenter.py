"""Train the plug-in segmenter (scoring/segmenter.py) on a training root, for the mask accuracy M.

    python -m tools.train_segmenter TRAIN_ROOT --out segmenter.safetensors \
        [--height 384 --width 512 --steps 5000 --batch_size 8 --lr 1e-3 --widths 32,64,128,256,256]

Samples are drawn at random (with a left-right flip half of the time), the loss is the per-pixel
cross-entropy, the optimizer AdamW with a cosine decay of the learning rate to 0. The checkpoint
(kind "segmenter", config inside) is what ``tools/score.py --segmenter`` loads.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


import jittor_env

log = logging.getLogger("iidm.train_segmenter")


def sample_batch(dataset, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random samples, each flipped left-right with probability 1/2: (images uint8 [B, H, W, 3],
    labels uint8 [B, H, W])."""
    images, labels = [], []
    for index in rng.integers(len(dataset), size=batch_size):
        sample = dataset[int(index)]
        image, label = sample.image, sample.label
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def train_segmenter(dataset, config, steps: int, batch_size: int = 8, lr: float = 1e-3,
                    weight_decay: float = 1e-4, seed: int = 0, log_every: int = 50,
                    on_log: Callable[[int, float, float], None] | None = None):
    """Train a new segmenter on ``dataset`` (a ``datasets.TrainingSet`` at config's size) and
    return it in eval mode with the history [(step, loss, batch pixel accuracy)] of logged steps."""
    import jittor as jt
    from jittor import nn

    from scoring.segmenter import Segmenter, to_input

    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    jt.set_global_seed(seed)
    rng = np.random.default_rng(seed)
    model = Segmenter(config)
    model.train()
    optimizer = nn.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for step in range(1, steps + 1):
        optimizer.lr = lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        images, labels = sample_batch(dataset, rng, batch_size)
        logits = model(to_input(images))
        loss = nn.cross_entropy_loss(logits, jt.array(labels.astype(np.int32)))
        logged = step % log_every == 0 or step == steps
        if logged:  # read the logits before the step updates the weights they depend on
            accuracy = float(np.mean(np.argmax(logits.numpy(), axis=1) == labels))
        optimizer.step(loss)
        if logged:
            history.append((step, loss.item(), accuracy))
            if on_log is not None:
                on_log(*history[-1])
        jt.sync_all()
    model.eval()
    return model, history


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_root", type=Path, help="training root with imgs/ and labels/")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--height", type=int, default=384, help="training (and scoring) height")
    parser.add_argument("--width", type=int, default=512, help="training (and scoring) width")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--widths", default="32,64,128,256,256",
                        help="channels per level, comma-separated (one level per entry)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=50)
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        print(f"train_segmenter: --widths must be comma-separated integers, got {args.widths!r}", file=sys.stderr)
        return 2
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    from datasets import DataError, TrainingSet
    from weights.checkpoint import module_arrays, save_checkpoint
    from scoring.segmenter import CHECKPOINT_KIND, SegmenterConfig

    try:
        config = SegmenterConfig(widths=widths, height=args.height, width=args.width)
        dataset = TrainingSet(args.train_root, args.height, args.width)
    except (DataError, ValueError) as exc:
        print(f"train_segmenter: {exc}", file=sys.stderr)
        return 1
    log.info("training on %d images at %dx%d (HxW), widths %s, %d steps of batch %d",
             len(dataset), args.height, args.width, widths, args.steps, args.batch_size)
    start = time.time()

    def report(step, loss, accuracy):
        log.info("step %d/%d  loss %.4f  batch pixel accuracy %.4f  (%.0f s)",
                 step, args.steps, loss, accuracy, time.time() - start)

    model, history = train_segmenter(dataset, config, args.steps, args.batch_size, args.lr,
                                     seed=args.seed, log_every=args.log_every, on_log=report)
    step, loss, accuracy = history[-1]
    save_checkpoint(args.out, module_arrays(model), CHECKPOINT_KIND, {"network": config.to_dict()},
                    extra={"step": step, "loss": loss, "train_batch_pixel_accuracy": accuracy,
                           "train_root": str(args.train_root), "images": len(dataset),
                           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed})
    print(f"train_segmenter: wrote {args.out} (step {step}, batch pixel accuracy {accuracy:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training the plug-in segmenter (``scoring.segmenter``) on a training root, for the mask
accuracy M, as a task of the shared training skeleton (``training.loop``).

Each step draws a batch of the per-epoch permutation of the training set (``batch_indices``),
flips each sample left-right with probability 1/2 (from ``step_rng(seed, step)``), and takes one
AdamW step on the per-pixel cross-entropy, the learning rate decaying to 0 on a cosine over
``max_steps``. Checkpoints are kind "segmenter-train" (``model/``, ``optim/``);
``scoring.segmenter.load_segmenter`` and ``python -m tools.score --segmenter`` read them directly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt
from jittor import nn

from scoring.segmenter import CHECKPOINT_KIND, Segmenter, SegmenterConfig, to_input
from training.loop import NON_FINITE, LoopConfig, Task, batch_indices, materialize, step_rng
from training.optim import discard_gradients, finite_gradients
from training.state import adam_state, load_adam_state, trainable
from weights.checkpoint import load_weights


@dataclass(frozen=True)
class SegmenterTrainConfig:
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_steps: int = 5000
    save_every: int = 1000
    keep_every: int = 0
    max_bad_steps: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 1 or self.lr <= 0:
            raise ValueError(f"need batch_size >= 1, max_steps >= 1 and lr > 0, got {self}")

    def loop(self) -> LoopConfig:
        return LoopConfig(self.max_steps, self.save_every, 0, self.keep_every, self.max_bad_steps, self.seed)


def draw_batch(dataset: Sequence, cfg: SegmenterTrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [B, H, W, 3], labels uint8 [B, H, W]) of step ``step``, each flipped left-right
    with probability 1/2."""
    indices = batch_indices(cfg.seed, step, cfg.batch_size, len(dataset))
    flips = step_rng(cfg.seed, step).random(cfg.batch_size) < 0.5
    images, labels = [], []
    for index, flip in zip(indices, flips):
        sample = dataset[int(index)]
        image, label = sample.image, sample.label
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


class SegmenterTask(Task):
    kind = CHECKPOINT_KIND
    name = "segmenter"

    def __init__(self, dataset: Sequence, config: SegmenterConfig, cfg: SegmenterTrainConfig, data_name: str = ""):
        self.dataset, self.net_config, self.cfg, self.data_name = dataset, config, cfg, data_name
        self.model = Segmenter(config)
        materialize(self.model)
        self.model.train()
        named = trainable(self.model)
        self.names = [n for n, _ in named]
        self.optimizer = nn.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def config(self) -> dict[str, Any]:
        return {"network": self.net_config.to_dict(), "train": dataclasses.asdict(self.cfg), "data": self.data_name}

    def state(self) -> dict[str, Any]:
        out = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"optim/{k}": v for k, v in adam_state(self.optimizer, self.names).items()})
        return out

    def counters(self) -> dict[str, Any]:
        return {"updates": self.optimizer.n_step}

    def load(self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any], source: str) -> None:
        load_weights(self.model, {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}, source)
        load_adam_state(self.optimizer, self.names, {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")},
                        counters["updates"], source)

    def step(self, step: int, update: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        self.optimizer.lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.max_steps))
        images, labels = draw_batch(self.dataset, cfg, step)
        logits = self.model(to_input(images))
        loss = nn.cross_entropy_loss(logits, jt.array(labels.astype(np.int32)))
        jt.sync([loss, logits])
        value = float(loss.item())
        accuracy = float(np.mean(np.argmax(logits.numpy(), axis=1) == labels))
        values = {"loss": value, "batch_pixel_accuracy": accuracy, "lr": self.optimizer.lr}
        if not np.isfinite(value):
            values["skipped"] = NON_FINITE
        elif update:
            if finite_gradients(self.optimizer, loss):   # a finite loss can still have non-finite gradients
                self.optimizer.step()
                jt.sync_all()
            else:
                discard_gradients(self.optimizer)
                values["skipped"] = NON_FINITE
        return values

    def progress(self, values: Mapping[str, Any]) -> dict[str, str]:
        return {"loss": f"{values['loss']:.4f}", "acc": f"{values['batch_pixel_accuracy']:.3f}"}

    def modules(self) -> list:
        return [self.model]

    def write_samples(self, path: Path, step: int) -> None:
        return None

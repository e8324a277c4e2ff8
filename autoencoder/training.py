"""Training loop of the VQ autoencoder (LDM / taming's two-optimizer recipe) on your own photos.

Each step: the autoencoder step (losses.py: L1 + LPIPS + adaptive-weight GAN + codebook loss) with
its Adam, then, from ``disc_start`` on, the discriminator step (hinge) with its own Adam, both with
betas (0.5, 0.9) as in LDM. The discriminator sees the reconstructions of this step's forward
pass (the reference's Lightning loop runs the autoencoder forward a second time after its update;
reusing it saves a third of the compute). Learning rate: LDM scales its base rate 4.5e-6 by the
batch size (and GPU count); ``AutoencoderTrainConfig.lr`` None means 4.5e-6 x batch_size.

Data: ``datasets.TrainingSet`` photos at (height, width) -> float32 [B, 3, H, W] in [-1, 1], flipped
left-right with probability 1/2. The batches are a pure function of (seed, step): a fresh permutation
of the images per epoch, ``np.random.default_rng([seed, epoch])``, and flips from
``default_rng([seed, step, 1])``, so the random state of the data is (seed, step) and a resumed run
sees the batches an uninterrupted one would.

Codebook restarts (``codebook_restart`` N > 0; off by default, as in taming): at every step that is
a multiple of N (step 0 included), before the forward pass, each code no position chose since the
previous restart is set to an encoder output (pre-quantisation latent vector) drawn at random from
this step's batch. At step 0 no code has been chosen yet, so this initialises the whole codebook
from data. taming's U(-1/n, 1/n) initialisation with a small network and a short run collapses to a
few dozen codes (22 of 1024 measured here after 400 steps) and blurry, palette-less reconstructions;
restarting dead codes (Zeghidour et al. 2021, SoundStream; Dhariwal et al. 2020, Jukebox) keeps the
codebook in use. The usage counts are saved with the checkpoint, so a resumed run restarts the same
codes an uninterrupted one would.

The run is a task of the shared training skeleton (``training.loop``): RUN_DIR gets options.json,
log.jsonl (every loss term and the adaptive weight), samples/step_NNNNNNN.png (inputs on top,
reconstructions below) and checkpoints/ (kind "vqmodel-train": ``model/`` weights, loadable by
``load_vqmodel``; ``disc/`` the discriminator; ``optim/ae/``, ``optim/disc/`` both Adams' moments;
``code_usage``), kept only once the next step proves them finite.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

from autoencoder.losses import LossConfig, VQLPIPSWithDiscriminator
from autoencoder.lpips import load_lpips
from autoencoder.vqmodel import KIND, TRAINING_PREFIX, VQConfig, VQModel, vq_config
from datasets import TrainingSet
from training.loop import (NON_FINITE, LoopConfig, Task, batch_indices, materialize, run, seed_everything, step_rng,
                           stored_run, stored_section)
from training.optim import FusedAdam, discard_gradients, finite_gradients
from training.state import adam_state, load_adam_state, save_grid, to_uint8, trainable
from weights.checkpoint import WeightsError, load_checkpoint, load_weights

log = logging.getLogger("iidm.autoencoder")

BASE_LR = 4.5e-6   # LDM's vq-f4 base_learning_rate, multiplied by the batch size
BETAS = (0.5, 0.9)
USAGE_KEY = "code_usage"   # int64 [n_embed]: choices of each code since the last restart


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    height: int = 384
    width: int = 512
    batch_size: int = 8
    lr: float | None = None       # None: BASE_LR * batch_size
    max_steps: int = 100_000      # total steps, counted across resumes
    sample_every: int = 1000
    save_every: int = 1000
    keep_every: int = 0           # also keep the weights every N steps
    max_bad_steps: int = 10       # bad steps (non-finite, loss spikes) in a row that stop the run
    seed: int = 0
    flip: bool = True
    codebook_restart: int = 0     # N > 0: every N steps, re-seed unused codes from encoder outputs

    def __post_init__(self):
        if self.codebook_restart < 0:
            raise ValueError(f"codebook_restart must be >= 0, got {self.codebook_restart}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else BASE_LR * self.batch_size

    def loop(self) -> LoopConfig:
        return LoopConfig(self.max_steps, self.save_every, self.sample_every, self.keep_every,
                          self.max_bad_steps, self.seed)


# ------------------------------------------------------------------------------------ data
def load_batch(dataset: Sequence, indices: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """uint8 photos [H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], flipped left-right where asked."""
    images = []
    for index, flip in zip(indices, flips):
        item = dataset[int(index)]
        image = np.asarray(getattr(item, "image", item))
        if flip:
            image = image[:, ::-1]
        images.append(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
    return np.stack(images)


def save_samples(path: Path, inputs: np.ndarray, reconstructions: np.ndarray, count: int = 4) -> None:
    """PNG grid: inputs on top, reconstructions below, up to ``count`` images side by side."""
    save_grid(path, [to_uint8(inputs[:count]), to_uint8(reconstructions[:count])])


def restart_dead_codes(model: VQModel, x: jt.Var, usage: np.ndarray, rng: np.random.Generator) -> int:
    """Set every code with ``usage == 0`` to an encoder output of the images ``x`` chosen at random
    (without replacement while there are enough vectors); returns how many codes were replaced."""
    dead = np.flatnonzero(usage == 0)
    if dead.size == 0:
        return 0
    with jt.no_grad():
        z = model.encode(x).numpy()
    vectors = z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
    chosen = rng.choice(len(vectors), size=dead.size, replace=dead.size > len(vectors))
    codebook = model.quantize.embedding.weight
    values = codebook.numpy()
    values[dead] = vectors[chosen]
    codebook.update(jt.array(values))
    return int(dead.size)


# ------------------------------------------------------------------------------ the task
class AutoencoderTask(Task):
    """The VQ model, the loss with its discriminator, two Adams and the codebook usage counts."""

    kind = KIND
    name = "autoencoder"
    # Never negative (the generator's GAN term may be): reconstruction (L1 + LPIPS), codebook and the
    # discriminator's hinge loss. A learning rate far too large shows first in the last two.
    watched_losses = ("rec_loss", "quant_loss", "disc_loss")

    def __init__(self, dataset: Sequence, model_config: VQConfig, loss_config: LossConfig, cfg: AutoencoderTrainConfig,
                 perceptual=None, data_name: str = ""):
        self.dataset, self.model_config, self.loss_config, self.cfg = dataset, model_config, loss_config, cfg
        self.data_name = data_name
        self.model = VQModel(model_config)
        self.loss = VQLPIPSWithDiscriminator(loss_config, perceptual)
        materialize(self.model)
        materialize(self.loss.discriminator)
        ae_named, disc_named = trainable(self.model), trainable(self.loss.discriminator)
        self.ae_names, self.disc_names = [n for n, _ in ae_named], [n for n, _ in disc_named]
        lr = cfg.learning_rate
        # Adam (not AdamW, as taming), fused: a few kernels per step for all tensors.
        self.opt_ae = FusedAdam([v for _, v in ae_named], lr, betas=BETAS, decoupled=False)
        self.opt_disc = FusedAdam([v for _, v in disc_named], lr, betas=BETAS, decoupled=False)
        self.usage = np.zeros(model_config.n_embed, dtype=np.int64) if cfg.codebook_restart else None
        self.model.train()
        self.loss.discriminator.train()
        self._last_batch: tuple[np.ndarray, jt.Var] | None = None

    def config(self) -> dict[str, Any]:
        return {"network": self.model_config.to_dict(), "loss": dataclasses.asdict(self.loss_config),
                "train": dataclasses.asdict(self.cfg), "learning_rate": self.cfg.learning_rate,
                "perceptual": self.loss.perceptual_loss is not None, "data": self.data_name}

    def state(self) -> dict[str, Any]:
        out = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"disc/{k}": v for k, v in self.loss.discriminator.state_dict().items()})
        out.update({f"optim/ae/{k}": v for k, v in adam_state(self.opt_ae, self.ae_names).items()})
        out.update({f"optim/disc/{k}": v for k, v in adam_state(self.opt_disc, self.disc_names).items()})
        if self.usage is not None:
            out[USAGE_KEY] = self.usage.copy()
        return out

    def counters(self) -> dict[str, Any]:
        return {"opt_ae_steps": self.opt_ae.n_step, "opt_disc_steps": self.opt_disc.n_step}

    def load(self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any], source: str) -> None:
        def under(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        load_weights(self.model, under("model/"), source)
        load_weights(self.loss.discriminator, under("disc/"), source)
        load_adam_state(self.opt_ae, self.ae_names, under("optim/ae/"), counters["opt_ae_steps"], source)
        load_adam_state(self.opt_disc, self.disc_names, under("optim/disc/"), counters["opt_disc_steps"], source)
        if self.usage is not None and USAGE_KEY in arrays:
            if arrays[USAGE_KEY].shape != self.usage.shape:
                raise WeightsError(f"{source}: {USAGE_KEY} has shape {arrays[USAGE_KEY].shape}, "
                                   f"expected {self.usage.shape}")
            self.usage[:] = arrays[USAGE_KEY]

    def step(self, step: int, update: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        indices = batch_indices(cfg.seed, step, cfg.batch_size, len(self.dataset))
        flips = step_rng(cfg.seed, step, 1).random(cfg.batch_size) < 0.5
        x_np = load_batch(self.dataset, indices, flips & cfg.flip)
        x = jt.array(x_np)
        restarted = before_restart = None
        if update and self.usage is not None and step % cfg.codebook_restart == 0:
            before_restart = (self.model.quantize.embedding.weight.numpy().copy(), self.usage.copy())
            restarted = restart_dead_codes(self.model, x, self.usage, step_rng(cfg.seed, step, 2))
            self.usage[:] = 0
        reconstructions, codebook_loss, codes = self.model(x)
        g_total, terms = self.loss.generator_loss(codebook_loss, x, reconstructions, step, self.model.last_layer())
        if not update:
            values = _values(terms)
            return values if np.isfinite(values["total_loss"]) else {**values, "skipped": NON_FINITE}
        # Both networks' losses and gradients are checked before either is updated: a skipped step
        # changes no weight, the autoencoder's included.
        updated, optimizers = finite_gradients(self.opt_ae, g_total), [self.opt_ae]
        if updated and self.loss.disc_factor(step) > 0:
            d_total, d_terms = self.loss.discriminator_loss(x, reconstructions, step)
            updated, optimizers = finite_gradients(self.opt_disc, d_total), optimizers + [self.opt_disc]
            terms.update(d_terms)
        for optimizer in optimizers:
            if updated:
                optimizer.step()
            else:
                discard_gradients(optimizer)
        values = _values(terms, [reconstructions] + ([codes] if self.usage is not None else []))
        if not updated:
            if before_restart is not None:   # the restart belonged to the step that is not taken
                self.model.quantize.embedding.weight.update(jt.array(before_restart[0]))
                self.usage[:] = before_restart[1]
            values["skipped"] = NON_FINITE
            return values
        if self.usage is not None:
            self.usage += np.bincount(codes.numpy().reshape(-1), minlength=len(self.usage))
            values["codes_used"] = float(np.count_nonzero(self.usage))
            if restarted is not None:
                values["codes_restarted"] = float(restarted)
        self._last_batch = (x_np, reconstructions)
        return values

    def write_samples(self, path: Path, step: int) -> None:
        if self._last_batch is not None:
            inputs, reconstructions = self._last_batch
            save_samples(path, inputs, reconstructions.numpy())

    def progress(self, values: Mapping[str, Any]) -> dict[str, str]:
        return {k: f"{values[k]:.4f}" for k in ("l1_loss", "p_loss", "g_loss") if k in values}

    def modules(self) -> list:
        return [self.model, self.loss.discriminator]


def _values(terms: dict[str, Any], also: Sequence[jt.Var] = ()) -> dict[str, float]:
    """Run this step's graph once (one sync) and read the scalar terms."""
    jt.sync([v for v in terms.values() if isinstance(v, jt.Var)] + list(also))
    return {k: float(v.item()) if isinstance(v, jt.Var) else float(v) for k, v in terms.items()}


# ------------------------------------------------------------------------------ entry points
def stored_configs(out_dir: str | os.PathLike) -> tuple[VQConfig, LossConfig, AutoencoderTrainConfig]:
    """The model, loss and training configs stored in a run's checkpoint (to resume with the same
    options without repeating them), every field required."""
    path, config = stored_run(out_dir, KIND, ("network", "loss", "train"))
    return (stored_section(VQConfig, config, "network", path), stored_section(LossConfig, config, "loss", path),
            stored_section(AutoencoderTrainConfig, config, "train", path))


def train_autoencoder(data: str | os.PathLike | Sequence, out_dir: str | os.PathLike,
                      model_config: VQConfig | None = None, loss_config: LossConfig = LossConfig(),
                      train_config: AutoencoderTrainConfig = AutoencoderTrainConfig(), *, lpips_vgg: str | None = None,
                      lpips_heads: str | None = None, resume: bool = False, init: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) until ``train_config.max_steps``; returns the final step, the
    checkpoint path and the first and last logged terms of this run.

    ``data``: a training root (imgs/ + labels/) or a sequence of uint8 [H, W, 3] photos (or items
    with ``.image``); on resume, None reuses the run's own root. ``init``: a "vqmodel" checkpoint
    to start from (fine-tuning). Without LPIPS weight files the perceptual term is left out, with
    one warning."""
    if resume and model_config is None:
        model_config = stored_configs(out_dir)[0]
    if resume and data is None:
        data = stored_run(out_dir, KIND)[1]["data"]
    model_config = model_config or vq_config("vq-f4")
    if (lpips_vgg is None) != (lpips_heads is None):
        raise ValueError("LPIPS needs both weight files: --lpips_vgg (VGG16) and --lpips_heads (linear heads)")
    cfg = train_config
    for name in ("height", "width"):
        if getattr(cfg, name) % model_config.factor:
            raise ValueError(f"{name}={getattr(cfg, name)} is not a multiple of the autoencoder's factor "
                             f"{model_config.factor}")
    dataset = TrainingSet(data, cfg.height, cfg.width) if isinstance(data, (str, os.PathLike)) else data
    if len(dataset) == 0:
        raise ValueError("no training images")
    perceptual = None
    if lpips_vgg is not None:
        perceptual = load_lpips(lpips_vgg, lpips_heads)
    else:
        log.warning("training without the perceptual (LPIPS) term: no weight files given "
                    "(--lpips_vgg VGG16 .pth and --lpips_heads lpips vgg.pth)")
    seed_everything(cfg.seed)
    data_name = str(data) if isinstance(data, (str, os.PathLike)) else f"{len(dataset)} images"
    task = AutoencoderTask(dataset, model_config, loss_config, cfg, perceptual, data_name)
    if resume:
        stored = stored_configs(out_dir)[0]
        if stored != model_config:
            raise WeightsError(f"{out_dir}: the checkpoint's model config {stored.to_dict()} differs from the "
                               f"requested {model_config.to_dict()}; resume with the same --preset")
    elif init is not None:
        checkpoint = load_checkpoint(init, KIND)
        if checkpoint.network_config(VQConfig) != model_config:
            raise WeightsError(f"{init}: not a vqmodel checkpoint with the model config being trained")
        weights = {k: v for k, v in checkpoint.weights("model").items() if not k.startswith(TRAINING_PREFIX)}
        load_weights(task.model, weights, str(init))
    log.info("training the autoencoder on %d images at %dx%d (HxW), batch %d, lr %.3g, to step %d",
             len(dataset), cfg.height, cfg.width, cfg.batch_size, cfg.learning_rate, cfg.max_steps)
    result = run(task, out_dir, cfg.loop(), resume=resume, progress=progress)
    return {"step": result.step, "checkpoint": result.checkpoint, "first": result.first, "last": result.last}

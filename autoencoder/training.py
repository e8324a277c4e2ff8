"""Training loop of the VQ autoencoder (LDM / taming's two-optimizer recipe) on your own photos.

Each step: the autoencoder step (losses.py: L1 + LPIPS + adaptive-weight GAN + codebook loss) with
its Adam, then, from ``disc_start`` on, the discriminator step (hinge) with its own Adam, both with
betas (0.5, 0.9) as in LDM. The discriminator sees the reconstructions of this step's forward
pass (the reference's Lightning loop runs the autoencoder forward a second time after its update;
reusing it saves a third of the compute). Learning rate: LDM scales its base rate 4.5e-6 by the
batch size (and GPU count); ``TrainConfig.lr`` None means 4.5e-6 x batch_size.

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

RUN_DIR layout:

    options.json                  the effective configuration of the last start
    log.jsonl                     one JSON line per step: every loss term and the adaptive weight
    samples/step_NNNNNNN.png      inputs (top row) and reconstructions (bottom row)
    checkpoints/last.safetensors  weights (loadable by load_vqmodel) + training state under "train/"
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

from autoencoder.losses import LossConfig, VQLPIPSWithDiscriminator
from autoencoder.lpips import load_lpips
from autoencoder.vqmodel import KIND, TRAINING_PREFIX, VQConfig, VQModel, vq_config
from datasets import TrainingSet, save_image
from weights.checkpoint import WeightsError, load_weights, module_arrays, read_checkpoint, save_checkpoint

log = logging.getLogger("iidm.autoencoder")

BASE_LR = 4.5e-6   # LDM's vq-f4 base_learning_rate, multiplied by the batch size
BETAS = (0.5, 0.9)
CHECKPOINT = Path("checkpoints") / "last.safetensors"
DISC_PREFIX = TRAINING_PREFIX + "discriminator."
USAGE_KEY = TRAINING_PREFIX + "code_usage"   # int64 [n_embed]: choices of each code since the last restart


@dataclass(frozen=True)
class TrainConfig:
    height: int = 384
    width: int = 512
    batch_size: int = 8
    lr: float | None = None       # None: BASE_LR * batch_size
    max_steps: int = 100_000      # total steps, counted across resumes
    sample_every: int = 1000
    save_every: int = 1000
    seed: int = 0
    flip: bool = True
    codebook_restart: int = 0     # N > 0: every N steps, re-seed unused codes from encoder outputs

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else BASE_LR * self.batch_size


# ------------------------------------------------------------------------------------ data
def batch_indices(seed: int, step: int, batch_size: int, count: int) -> np.ndarray:
    """Images of batch ``step``: positions [step*B, (step+1)*B) of the stream of per-epoch permutations."""
    permutations: dict[int, np.ndarray] = {}
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(count)
        out.append(permutations[epoch][offset])
    return np.array(out, dtype=np.int64)


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


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def save_samples(path: Path, inputs: np.ndarray, reconstructions: np.ndarray, count: int = 4) -> None:
    """PNG grid: inputs on top, reconstructions below, up to ``count`` images side by side."""
    top = np.concatenate(list(_to_uint8(inputs[:count])), axis=1)
    bottom = np.concatenate(list(_to_uint8(reconstructions[:count])), axis=1)
    save_image(path, np.concatenate([top, bottom], axis=0))


# ------------------------------------------------------------------------------ checkpoints
def _trainable(module) -> list[tuple[str, jt.Var]]:
    return [(name, var) for name, var in module.named_parameters() if not var.is_stop_grad()]


def _optimizer_arrays(tag: str, optimizer, names: list[str]) -> dict[str, np.ndarray]:
    group = optimizer.param_groups[0]
    arrays = {}
    for name, m, v in zip(names, group["m"], group["values"]):
        arrays[f"{TRAINING_PREFIX}{tag}.m.{name}"] = m.numpy()
        arrays[f"{TRAINING_PREFIX}{tag}.v.{name}"] = v.numpy()
    return arrays


def _restore_optimizer(tag: str, optimizer, names: list[str], arrays: dict, n_step: int, source: str) -> None:
    group = optimizer.param_groups[0]
    for kind, states in (("m", group["m"]), ("v", group["values"])):
        for name, state in zip(names, states):
            key = f"{TRAINING_PREFIX}{tag}.{kind}.{name}"
            if key not in arrays or tuple(arrays[key].shape) != tuple(state.shape):
                raise WeightsError(f"{source}: optimizer state {key} is missing or has the wrong shape")
            state.update(jt.array(arrays[key]).stop_grad())
    optimizer.n_step = n_step


@dataclass
class _State:
    model: VQModel
    loss: VQLPIPSWithDiscriminator
    opt_ae: Any
    opt_disc: Any
    ae_names: list[str]
    disc_names: list[str]
    usage: np.ndarray | None = None


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


def _save(path: Path, state: _State, step: int, model_config: VQConfig, loss_config: LossConfig,
          train_config: TrainConfig) -> None:
    arrays = module_arrays(state.model)
    arrays.update({DISC_PREFIX + k: v for k, v in module_arrays(state.loss.discriminator).items()})
    arrays.update(_optimizer_arrays("opt_ae", state.opt_ae, state.ae_names))
    arrays.update(_optimizer_arrays("opt_disc", state.opt_disc, state.disc_names))
    if state.usage is not None:
        arrays[USAGE_KEY] = state.usage.copy()
    training = {"step": step, "seed": train_config.seed, "opt_ae_steps": state.opt_ae.n_step,
                "opt_disc_steps": state.opt_disc.n_step, "loss": dataclasses.asdict(loss_config),
                "train": dataclasses.asdict(train_config)}
    save_checkpoint(path, arrays, kind=KIND, config={"network": model_config.to_dict()},
                    extra={"step": step, "training": training})


def _restore(path: Path, state: _State, model_config: VQConfig) -> int:
    arrays, info = read_checkpoint(path)
    training = info["extra"].get("training")
    if info["kind"] != KIND or training is None:
        raise WeightsError(f"{path}: not an autoencoder training checkpoint")
    if info["config"]["network"] != model_config.to_dict():
        raise WeightsError(f"{path}: the checkpoint's model config {info['config']['network']} differs from the requested "
                           f"{model_config.to_dict()}; resume with the same --preset")
    load_weights(state.model, {k: v for k, v in arrays.items() if not k.startswith(TRAINING_PREFIX)}, str(path))
    load_weights(state.loss.discriminator,
                 {k[len(DISC_PREFIX):]: v for k, v in arrays.items() if k.startswith(DISC_PREFIX)}, str(path))
    _restore_optimizer("opt_ae", state.opt_ae, state.ae_names, arrays, training["opt_ae_steps"], str(path))
    _restore_optimizer("opt_disc", state.opt_disc, state.disc_names, arrays, training["opt_disc_steps"], str(path))
    if state.usage is not None and USAGE_KEY in arrays:
        if arrays[USAGE_KEY].shape != state.usage.shape:
            raise WeightsError(f"{path}: {USAGE_KEY} has shape {arrays[USAGE_KEY].shape}, expected {state.usage.shape}")
        state.usage[:] = arrays[USAGE_KEY]
    return int(training["step"])


def stored_configs(out_dir: str | os.PathLike) -> tuple[VQConfig, LossConfig, TrainConfig]:
    """The model, loss and training configs stored in a run's checkpoint (to resume with the same
    options without repeating them)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume")
    _, info = read_checkpoint(path)
    training = info["extra"].get("training")
    if info["kind"] != KIND or training is None:
        raise WeightsError(f"{path}: not an autoencoder training checkpoint")
    return (VQConfig.from_dict(info["config"]["network"]), LossConfig(**training["loss"]), TrainConfig(**training["train"]))


# ------------------------------------------------------------------------------------ loop
def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step``: a run stopped between checkpoints logged steps it will redo."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def _values(terms: dict[str, Any], also: Sequence[jt.Var] = ()) -> dict[str, float]:
    """Run this step's graph once (one sync) and read the scalar terms."""
    jt.sync([v for v in terms.values() if isinstance(v, jt.Var)] + list(also))
    return {k: float(v.item()) if isinstance(v, jt.Var) else float(v) for k, v in terms.items()}


def train_autoencoder(data: str | os.PathLike | Sequence, out_dir: str | os.PathLike,
                      model_config: VQConfig | None = None, loss_config: LossConfig = LossConfig(),
                      train_config: TrainConfig = TrainConfig(), *, lpips_vgg: str | None = None,
                      lpips_heads: str | None = None, resume: bool = False, init: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) until ``train_config.max_steps``; returns the final step, the
    checkpoint path and the first and last logged terms of this run.

    ``data``: a training root (imgs/ + labels/) or a sequence of uint8 [H, W, 3] photos (or items
    with ``.image``). ``init``: a "vqmodel" checkpoint to start from (fine-tuning). Without LPIPS
    weight files the perceptual term is left out, with one warning."""
    out = Path(out_dir)
    checkpoint = out / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: nothing to resume")
    if not resume and checkpoint.exists():
        raise FileExistsError(f"{out} already holds a training run ({checkpoint}); pass --resume to continue "
                              "it or choose another output folder")
    if resume and model_config is None:
        model_config = stored_configs(out)[0]
    model_config = model_config or vq_config("vq-f4")
    if (lpips_vgg is None) != (lpips_heads is None):
        raise ValueError("LPIPS needs both weight files: --lpips_vgg (VGG16) and --lpips_heads (linear heads)")
    cfg = train_config
    for name in ("height", "width"):
        if getattr(cfg, name) % model_config.factor:
            raise ValueError(f"{name}={getattr(cfg, name)} is not a multiple of the autoencoder's factor "
                             f"{model_config.factor}")

    jt.set_global_seed(cfg.seed)
    model = VQModel(model_config)
    perceptual = None
    if lpips_vgg is not None:
        perceptual = load_lpips(lpips_vgg, lpips_heads)
    else:
        log.warning("training without the perceptual (LPIPS) term: no weight files given "
                    "(--lpips_vgg VGG16 .pth and --lpips_heads lpips vgg.pth)")
    loss = VQLPIPSWithDiscriminator(loss_config, perceptual)
    ae_named, disc_named = _trainable(model), _trainable(loss.discriminator)
    lr = cfg.learning_rate
    state = _State(model, loss,
                   jt.optim.Adam([v for _, v in ae_named], lr, betas=BETAS),
                   jt.optim.Adam([v for _, v in disc_named], lr, betas=BETAS),
                   [n for n, _ in ae_named], [n for n, _ in disc_named])
    if cfg.codebook_restart < 0:
        raise ValueError(f"codebook_restart must be >= 0, got {cfg.codebook_restart}")
    if cfg.codebook_restart:
        state.usage = np.zeros(model_config.n_embed, dtype=np.int64)
    step = 0
    if resume:
        step = _restore(checkpoint, state, model_config)
        jt.set_global_seed(cfg.seed + step)
        _truncate_log(out / "log.jsonl", step)
        log.info("resumed %s at step %d", checkpoint, step)
    elif init is not None:
        arrays, info = read_checkpoint(init)
        if info["kind"] != KIND or VQConfig.from_dict(info["config"]["network"]) != model_config:
            raise WeightsError(f"{init}: not a vqmodel checkpoint with the model config being trained")
        load_weights(model, {k: v for k, v in arrays.items() if not k.startswith(TRAINING_PREFIX)}, str(init))

    dataset = TrainingSet(data, cfg.height, cfg.width) if isinstance(data, (str, os.PathLike)) else data
    if len(dataset) == 0:
        raise ValueError("no training images")
    out.mkdir(parents=True, exist_ok=True)
    options = {"model": model_config.to_dict(), "loss": dataclasses.asdict(loss_config),
               "train": dataclasses.asdict(cfg), "learning_rate": lr, "perceptual": perceptual is not None,
               "data": str(data) if isinstance(data, (str, os.PathLike)) else f"{len(dataset)} images"}
    (out / "options.json").write_text(json.dumps(options, indent=2) + "\n")
    log.info("training the autoencoder on %d images at %dx%d (HxW), batch %d, lr %.3g, to step %d",
             len(dataset), cfg.height, cfg.width, cfg.batch_size, lr, cfg.max_steps)

    model.train()
    loss.discriminator.train()
    first = last = None
    with open(out / "log.jsonl", "a") as log_file, \
            tqdm(total=cfg.max_steps, initial=step, desc="autoencoder", disable=not progress) as bar:
        while step < cfg.max_steps:
            indices = batch_indices(cfg.seed, step, cfg.batch_size, len(dataset))
            flips = np.random.default_rng([cfg.seed, step, 1]).random(cfg.batch_size) < 0.5
            x_np = load_batch(dataset, indices, flips & cfg.flip)
            x = jt.array(x_np)
            restarted = None
            if state.usage is not None and step % cfg.codebook_restart == 0:
                restarted = restart_dead_codes(model, x, state.usage, np.random.default_rng([cfg.seed, step, 2]))
                state.usage[:] = 0
            reconstructions, codebook_loss, indices = model(x)
            g_total, terms = loss.generator_loss(codebook_loss, x, reconstructions, step, model.last_layer())
            state.opt_ae.step(g_total)
            if loss.disc_factor(step) > 0:
                d_total, d_terms = loss.discriminator_loss(x, reconstructions, step)
                state.opt_disc.step(d_total)
                terms.update(d_terms)
            sample = cfg.sample_every > 0 and (step + 1) % cfg.sample_every == 0
            values = _values(terms, ([reconstructions] if sample else []) + ([indices] if state.usage is not None else []))
            if state.usage is not None:
                state.usage += np.bincount(indices.numpy().reshape(-1), minlength=len(state.usage))
                values["codes_used"] = float(np.count_nonzero(state.usage))
                if restarted is not None:
                    values["codes_restarted"] = float(restarted)
            step += 1
            if sample:
                save_samples(out / "samples" / f"step_{step:07d}.png", x_np, reconstructions.numpy())
            last = {"step": step, **values}
            first = first or last
            log_file.write(json.dumps(last) + "\n")
            log_file.flush()
            bar.update(1)
            bar.set_postfix(l1=f"{values['l1_loss']:.4f}", p=f"{values['p_loss']:.4f}",
                            g=f"{values['g_loss']:.3f}", d_w=f"{values['d_weight']:.3g}")
            if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.max_steps:
                _save(checkpoint, state, step, model_config, loss_config, cfg)
    return {"step": step, "checkpoint": str(checkpoint), "first": first, "last": last}

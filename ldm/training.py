"""Training the latent diffusion U-Net on a cached latent store (guided-diffusion's TrainLoop, as
SDM and IIDM use it, made resumable).

One optimizer step at ``step`` (all randomness drawn from ``numpy.random.default_rng([seed, step])``,
so a resumed run draws exactly what an uninterrupted one would):

    items   the batch of positions [step*B, (step+1)*B) of per-epoch permutations of the store
    views   original or left-right flip, each with probability 1/2 (the store holds both)
    t       uniform on {0, ..., T-1}                          (guided-diffusion's UniformSampler)
    noise   standard normal, [B, C, h, w]
    mask    one-hot label, replaced by the null (all-zero) mask with probability p (SDM's drop_rate)
    loss    the hybrid loss L_simple + L_vb (Improved DDPM eq. 16; ``ldm.losses.training_losses``)
    update  AdamW (decoupled weight decay, 0 as in guided-diffusion), then the EMA of the weights

SDM's two phases: train with ``mask_dropout=0``, then fine-tune with ``lr=2e-5, mask_dropout=0.2``
(``--resume`` with those options, or a new run started from the weights). IIDM trains with 0.2.

The batch size is global: with gradient accumulation it is split into ``grad_accum`` micro-batches,
and under MPI (``mpirun -np N``) each micro-batch is split across the N ranks, whose gradients are
averaged; every rank draws the same numbers and keeps the same step counter; only rank 0 writes.

A step whose loss or gradient is not finite changes nothing (no update, no EMA step, Adam's step
count unchanged) and is counted; ``max_bad_steps`` of them in a row stop the run with an error.
Checkpoints (``RUN_DIR/checkpoints/last.safetensors``, kind "<net>-train") hold the weights
(``model/``), the EMA (``ema/``), AdamW's moments (``optim/m/``, ``optim/v/``), the step, Adam's
update count, the RNG states and the full config; they are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

from datasets import NUM_CLASSES, colorize, one_hot, save_image
from weights.checkpoint import WeightsError, config_from_dict, diffusion_section, read_checkpoint, save_checkpoint
from .ema import EMA
from .guidance import drop_masks
from .latents import LatentStore
from .losses import training_losses
from .samplers import ddim_sample
from .schedule import ScheduleConfig, make_schedule

log = logging.getLogger("iidm.ldm.training")

CHECKPOINT = Path("checkpoints") / "last.safetensors"
LOG_FILE = "log.jsonl"
TRAIN_KIND_SUFFIX = "-train"
TERMS = ("loss", "mse", "vb")


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row)."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of the LDM training loop. Defaults: IIDM's (batch 5 per GPU, lr 1e-4, EMA 0.9999,
    mask dropout 0.2) for one process."""

    batch_size: int = 5             # global: split over grad_accum micro-batches and MPI ranks
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    mask_dropout: float = 0.2
    ema_decay: float = 0.9999
    max_steps: int = 100_000        # counted across resumes, skipped steps included
    save_every: int = 5000
    sample_every: int = 5000
    sample_count: int = 4
    sample_steps: int = 50          # DDIM steps of the sample images
    seed: int = 0
    max_bad_steps: int = 10         # non-finite steps in a row that stop the run
    flip: bool = True               # draw flipped views from the store
    loss_type: str = "mse"          # SDM/IIDM: plain MSE + unscaled L_vb
    fp16: bool = False              # CUDA only: float16 torso, fp32 master weights, loss scaling
    initial_lg_loss_scale: float = 20.0
    fp16_scale_growth: float = 1e-3
    grad_checkpoint: bool = False   # recompute each U-Net block in the backward (models/staged.py)
    latent_scale: float = 1.0       # LDM's scale_factor: diffuse latent * scale (IIDM's VQ-f4: 1.0)
    schedule: ScheduleConfig = ScheduleConfig()

    def __post_init__(self):
        if isinstance(self.schedule, Mapping):
            object.__setattr__(self, "schedule", ScheduleConfig(**self.schedule))
        for name in ("batch_size", "grad_accum", "max_bad_steps", "sample_count", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.save_every < 0 or self.sample_every < 0:
            raise ValueError("TrainConfig: max_steps, save_every and sample_every must be >= 0")
        if not 0.0 <= self.mask_dropout <= 1.0:
            raise ValueError(f"TrainConfig.mask_dropout must be in [0, 1], got {self.mask_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not (np.isfinite(self.latent_scale) and self.latent_scale > 0):
            raise ValueError(f"TrainConfig.latent_scale must be a finite number > 0, got {self.latent_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, values)


# ------------------------------------------------------------------------------------ data
def batch_indices(seed: int, step: int, batch_size: int, count: int) -> np.ndarray:
    """Items of batch ``step``: positions [step*B, (step+1)*B) of the stream of per-epoch
    permutations of range(count), so every item is seen once per epoch, resumably."""
    out = np.empty(batch_size, dtype=np.int64)
    permutations: dict[int, np.ndarray] = {}
    for j, position in enumerate(range(step * batch_size, (step + 1) * batch_size)):
        epoch, offset = divmod(position, count)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch, 7]).permutation(count)
        out[j] = permutations[epoch][offset]
    return out


@dataclass
class Batch:
    """One optimizer step's global batch, numpy: latents [B, C, h, w], masks [B, K, h, w] (after
    dropout), labels [B, h, w], t [B] int32, noise [B, C, h, w], kept [B] bool (mask not dropped)."""

    latents: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    t: np.ndarray
    noise: np.ndarray
    kept: np.ndarray


def draw_batch(store: LatentStore, config: TrainConfig, step: int, num_classes: int = NUM_CLASSES) -> Batch:
    """Everything random about step ``step``, from one generator seeded by (seed, step)."""
    rng = np.random.default_rng([config.seed, step])
    b = config.batch_size
    indices = batch_indices(config.seed, step, b, len(store))
    views = rng.integers(0, 2, size=b) if config.flip else np.zeros(b, dtype=np.int64)
    latents, labels = store.batch(indices, views)
    if config.latent_scale != 1.0:
        latents = (latents * np.float32(config.latent_scale)).astype(np.float32)
    t = rng.integers(0, config.schedule.num_timesteps, size=b).astype(np.int32)
    noise = rng.standard_normal(latents.shape, dtype=np.float32)
    masks = one_hot(labels, num_classes)
    dropped = drop_masks(masks, config.mask_dropout, rng)
    kept = dropped.reshape(b, -1).any(axis=1)
    return Batch(latents, dropped, labels, t, noise, kept)


# ------------------------------------------------------------------------------ the loop state
def trainable(module) -> list[tuple[str, jt.Var]]:
    return [(name, p) for name, p in module.named_parameters() if not p.is_stop_grad()]


class _Trainer:
    """The mutable state of a run: network, fp32 master weights, AdamW, EMA, counters."""

    def __init__(self, unet, config: TrainConfig):
        self.unet, self.config = unet, config
        named = trainable(unet)
        if not named:
            raise ValueError("the network has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if jt.in_mpi:
            # Every rank starts from rank 0's weights (Jittor seeds each rank differently).
            for p in self.params:
                p.assign(p.mpi_broadcast(0))
            jt.sync(self.params)
        # fp16 keeps float32 master copies for AdamW; in float32 the parameters are their own masters.
        self.masters = [p if p.dtype == "float32" else p.float32().clone().stop_grad() for p in self.params]
        self.optimizer = jt.optim.AdamW(self.masters, config.lr, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=config.weight_decay)
        self.ema = EMA(list(zip(self.names, self.masters)), config.ema_decay)
        self.step = 0             # optimizer steps attempted (skipped ones included)
        self.updates = 0          # optimizer steps applied (Adam's bias-correction count)
        self.bad_steps = 0        # non-finite steps, total
        self.bad_in_a_row = 0
        self.lg_loss_scale = config.initial_lg_loss_scale if config.fp16 else 0.0

    # -------------------------------------------------------------- checkpoint state
    def arrays(self) -> dict[str, np.ndarray]:
        group = self.optimizer.param_groups[0]
        out = {f"model/{n}": p.numpy() for n, p in zip(self.names, self.masters)}
        out.update({f"model/{n}": v for n, v in _frozen_arrays(self.unet, set(self.names)).items()})
        out.update({f"ema/{n}": v for n, v in self.ema.state_dict().items()})
        out.update({f"optim/m/{n}": m.numpy() for n, m in zip(self.names, group["m"])})
        out.update({f"optim/v/{n}": v.numpy() for n, v in zip(self.names, group["values"])})
        return out

    def counters(self) -> dict[str, Any]:
        return {"step": self.step, "updates": self.updates, "bad_steps": self.bad_steps,
                "bad_in_a_row": self.bad_in_a_row, "lg_loss_scale": self.lg_loss_scale}

    def load(self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any], source: str) -> None:
        group = self.optimizer.param_groups[0]
        expected = {f"{prefix}/{n}" for prefix in ("model", "ema", "optim/m", "optim/v") for n in self.names}
        missing = sorted(expected - set(arrays))
        if missing:
            raise WeightsError(f"{source}: training checkpoint lacks {len(missing)} arrays, e.g. {missing[:3]}")
        for n, p, master, m, v in zip(self.names, self.params, self.masters, group["m"], group["values"]):
            for key, var in ((f"model/{n}", master), (f"optim/m/{n}", m), (f"optim/v/{n}", v)):
                value = arrays[key]
                if tuple(value.shape) != tuple(var.shape):
                    raise WeightsError(f"{source}: {key} has shape {value.shape}, the model {tuple(var.shape)}")
                var.update(jt.array(value.astype(np.float32)))
            if master is not p:
                p.update(master.cast(p.dtype))
        frozen = _frozen_arrays(self.unet, set(self.names))
        if frozen:
            state = {n: arrays[f"model/{n}"] for n in frozen if f"model/{n}" in arrays}
            self.unet.load_parameters(state)
        self.ema.load_state_dict({n: arrays[f"ema/{n}"] for n in self.names}, source)
        self.step = int(counters["step"])
        self.updates = int(counters["updates"])
        self.bad_steps = int(counters.get("bad_steps", 0))
        self.bad_in_a_row = int(counters.get("bad_in_a_row", 0))
        self.lg_loss_scale = float(counters.get("lg_loss_scale", self.lg_loss_scale))
        self.optimizer.n_step = self.updates
        jt.sync(self.params + self.masters + group["m"] + group["values"])


def _frozen_arrays(module, trainable_names: set[str]) -> dict[str, np.ndarray]:
    """Saved arrays that are not trained (buffers), so the checkpoint holds the whole network."""
    return {n: v.numpy() for n, v in module.state_dict().items() if n not in trainable_names}


# ------------------------------------------------------------------------------ RNG states
def _rng_states(config: TrainConfig, step: int) -> dict[str, Any]:
    """Global RNG states, saved for code outside the loop (the loop itself draws from per-step
    generators, and reseeds Jittor per step, so it needs none of them to resume exactly)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "numpy_global": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "jittor_seed": _jittor_seed(config, step),
        "per_step": "numpy.random.default_rng([seed, step]); jittor reseeded per step",
    }


def _restore_rng_states(states: Mapping[str, Any]) -> None:
    if "numpy_global" in states:
        name, keys, pos, has_gauss, cached = states["numpy_global"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))


def _jittor_seed(config: TrainConfig, step: int) -> int:
    """Jittor's seed for step ``step`` (dropout inside the network, if any); the same on all ranks."""
    return (config.seed * 1_000_003 + step) % (2 ** 31 - 1)


# ------------------------------------------------------------------------------ one step
def _step(trainer: _Trainer, schedule, batch: Batch) -> dict[str, Any]:
    """Forward/backward over the micro-batches of ``batch`` and, if all is finite, one update.
    Returns the logged values (means over this rank's share of the batch)."""
    cfg = trainer.config
    world = jt.world_size if jt.in_mpi else 1
    rank = jt.rank if jt.in_mpi else 0
    micro = cfg.batch_size // (cfg.grad_accum * world)
    scale = 2.0 ** trainer.lg_loss_scale if cfg.fp16 else 1.0
    grads: list[jt.Var] | None = None
    per_sample = {k: [] for k in TERMS}
    t_seen = []
    for k in range(cfg.grad_accum):
        start = (k * world + rank) * micro
        part = slice(start, start + micro)
        x_start = jt.array(batch.latents[part])
        mask = jt.array(batch.masks[part])
        t = jt.array(batch.t[part])
        noise = jt.array(batch.noise[part])
        if cfg.grad_checkpoint:
            from models.staged import StagedPass

            staged = StagedPass(trainer.unet, mask)
            terms = training_losses(schedule, staged.forward, x_start, t, noise, loss_type=cfg.loss_type)
            loss = terms["loss"].mean() * (scale / cfg.grad_accum)
            by_id = staged.backward(jt.grad(loss, staged.output))
            micro_grads = [by_id[id(p)] for p in trainer.params]
        else:
            terms = training_losses(schedule, lambda x_t, t_model: trainer.unet(x_t, t_model, mask), x_start, t,
                                    noise, loss_type=cfg.loss_type)
            loss = terms["loss"].mean() * (scale / cfg.grad_accum)
            micro_grads = jt.grad(loss, trainer.params)
        micro_grads = [g.float32() if g.dtype != "float32" else g for g in micro_grads]
        grads = micro_grads if grads is None else [a + g for a, g in zip(grads, micro_grads)]
        jt.sync([*terms.values(), *grads])
        for name in TERMS:
            if name in terms:
                per_sample[name].append(terms[name].numpy())
        t_seen.append(batch.t[part])
    if jt.in_mpi:
        grads = [g.mpi_all_reduce("mean") for g in grads]
    if scale != 1.0:
        grads = [g / scale for g in grads]
    sq = sum((g * g).sum() for g in grads)
    local_loss = float(np.mean(np.concatenate(per_sample["loss"])))
    loss_var = jt.array(np.array([local_loss], dtype=np.float32))
    if jt.in_mpi:
        loss_var = loss_var.mpi_all_reduce("mean")
    jt.sync([sq, loss_var, *grads])
    grad_norm = math.sqrt(float(sq.item())) if np.isfinite(sq.item()) else float("inf")
    global_loss = float(loss_var.item())

    values: dict[str, Any] = {}
    for name, chunks in per_sample.items():
        if chunks:
            samples = np.concatenate(chunks)
            values[name] = float(samples.mean())
            quartile = np.concatenate(t_seen) * 4 // cfg.schedule.num_timesteps
            for q in range(4):
                if (quartile == q).any():
                    values[f"{name}_q{q}"] = float(samples[quartile == q].mean())
    values["grad_norm"] = grad_norm

    finite_loss = math.isfinite(global_loss)
    if cfg.fp16 and finite_loss and not math.isfinite(grad_norm):
        # Loss-scale overflow (guided-diffusion's MixedPrecisionTrainer): halve the scale, skip.
        trainer.lg_loss_scale -= 1.0
        values.update(skipped="fp16_overflow", lg_loss_scale=trainer.lg_loss_scale)
        return values
    if not (finite_loss and math.isfinite(grad_norm)):
        trainer.bad_steps += 1
        trainer.bad_in_a_row += 1
        values["skipped"] = "non_finite"
        return values

    group = trainer.optimizer.param_groups[0]
    group["grads"] = [g.stop_grad() for g in grads]
    trainer.optimizer.n_step = trainer.updates + 1
    trainer.optimizer.step()
    trainer.updates += 1
    for p, master in zip(trainer.params, trainer.masters):
        if master is not p:
            p.update(master.cast(p.dtype))
    trainer.ema.update()
    jt.sync(trainer.masters + trainer.ema.vars() + group["m"] + group["values"])
    trainer.bad_in_a_row = 0
    if cfg.fp16:
        trainer.lg_loss_scale += cfg.fp16_scale_growth
        values["lg_loss_scale"] = trainer.lg_loss_scale
    return values


# ------------------------------------------------------------------------------ samples
def _to_uint8(images: np.ndarray) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_samples(path: Path, unet, schedule, store: LatentStore, config: TrainConfig,
                  decode: Callable[[jt.Var], jt.Var]) -> None:
    """A PNG grid: the first items' masks (colourised), their decoded latents, and DDIM samples
    (``sample_steps`` steps, eta 0, no guidance) from noise under those masks, with the training weights."""
    count = min(config.sample_count, len(store))
    latents, labels = store.batch(np.arange(count), np.zeros(count, dtype=np.int64))
    mask = jt.array(one_hot(labels, NUM_CLASSES))
    noise = jt.array(np.random.default_rng([config.seed, 99]).standard_normal(latents.shape, dtype=np.float32))
    stride = max(1, schedule.num_timesteps // config.sample_steps)
    timesteps = list(range(schedule.num_timesteps - 1, -1, -stride))
    with jt.no_grad():
        sample = ddim_sample(lambda x_t, t: unet(x_t, t, mask), schedule, noise, timesteps)
        images = _to_uint8(decode(sample / config.latent_scale).numpy())
        reference = _to_uint8(decode(jt.array(latents)).numpy())
    height, width = images.shape[1:3]
    masks = [np.asarray(colorize(label)) for label in labels]
    masks = [m if m.shape[:2] == (height, width) else np.kron(m, np.ones((height // m.shape[0], width // m.shape[1], 1),
                                                                         dtype=np.uint8)) for m in masks]
    rows = [np.concatenate(masks, axis=1), np.concatenate(list(reference), axis=1),
            np.concatenate(list(images), axis=1)]
    save_image(path, np.concatenate(rows, axis=0))


# ------------------------------------------------------------------------------ the loop
def read_training_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, info = read_checkpoint(path)
    if not str(info["kind"]).endswith(TRAIN_KIND_SUFFIX) or "training" not in info["extra"]:
        raise WeightsError(f"{path}: not an LDM training checkpoint (kind {info['kind']!r})")
    return arrays, info


def stored_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], TrainConfig, str]:
    """(network config, training config, latent store path) of the run in ``run_dir``."""
    _, info = read_training_checkpoint(Path(run_dir) / CHECKPOINT)
    config = info["config"]
    return dict(config["network"]), TrainConfig.from_dict(config["train"]), str(config["latents"])


def _is_writer() -> bool:
    return not jt.in_mpi or jt.rank == 0


def train(unet, latents: str | os.PathLike | LatentStore, out_dir: str | os.PathLike,
          config: TrainConfig = TrainConfig(), *, net_kind: str = "unet",
          decode: Callable[[jt.Var], jt.Var] | None = None, resume: bool = False,
          progress: bool = True, step_hook: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``unet`` (called as ``unet(x_t, t, mask)``, with a ``config.to_dict()``) on the latent
    store until ``config.max_steps``; returns {"step", "updates", "bad_steps", "checkpoint", "first", "last"}.

    ``decode(latent) -> image in [-1, 1]`` enables the sample images (``RUN_DIR/samples``).
    ``resume``: continue from ``RUN_DIR/checkpoints/last.safetensors`` (same network config).
    Raises ``TrainingStopped`` after ``max_bad_steps`` non-finite steps in a row.
    """
    out = Path(out_dir)
    checkpoint = out / CHECKPOINT
    store = latents if isinstance(latents, LatentStore) else LatentStore(latents)
    world = jt.world_size if jt.in_mpi else 1
    if config.batch_size % (config.grad_accum * world):
        raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum ({config.grad_accum}) "
                         f"x MPI ranks ({world})")
    if config.fp16 and not jt.flags.use_cuda:
        raise ValueError("fp16 mixed precision needs CUDA (on the CPU float16 is hundreds of times slower)")
    if config.fp16 != bool(getattr(unet.config, "use_fp16", False)):
        raise ValueError(f"fp16={config.fp16} but the network was built with use_fp16="
                         f"{getattr(unet.config, 'use_fp16', False)}; build it with the same setting")
    if resume and not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: nothing to resume")
    if not resume and checkpoint.exists():
        raise FileExistsError(f"{out} already holds a training run ({checkpoint}); pass --resume to continue "
                              "it or choose another output folder")
    c, h, w = store.latent_shape
    if getattr(unet.config, "in_channels", c) != c:
        raise ValueError(f"the network takes {unet.config.in_channels} latent channels, the store holds {c}")

    if config.grad_checkpoint:
        from models.staged import check_staged

        check_staged(unet)
    schedule = make_schedule(config.schedule)
    trainer = _Trainer(unet, config)
    unet_config = unet.config.to_dict()
    if resume:
        arrays, info = read_training_checkpoint(checkpoint)
        if info["config"].get("network") != unet_config:
            raise WeightsError(f"{checkpoint}: the run's network config differs from the one given; resume "
                               "with the same preset and options")
        trainer.load(arrays, info["extra"]["training"], str(checkpoint))
        _restore_rng_states(info["extra"].get("rng", {}))
        log.info("resumed %s at step %d (%d updates)", checkpoint, trainer.step, trainer.updates)
    run_config = {"network": unet_config,
                  "diffusion": diffusion_section(dataclasses.asdict(config.schedule), "latent", config.latent_scale),
                  "train": config.to_dict(), "latents": str(store.path),
                  "latents_autoencoder_sha256": store.manifest.get("autoencoder_sha256"),
                  "net_kind": net_kind}

    def save() -> None:
        if not _is_writer():
            return
        extra = {"training": trainer.counters(), "rng": _rng_states(config, trainer.step), "step": trainer.step}
        save_checkpoint(checkpoint, trainer.arrays(), kind=net_kind + TRAIN_KIND_SUFFIX, config=run_config,
                        extra=extra)

    if _is_writer():
        out.mkdir(parents=True, exist_ok=True)
        (out / "options.json").write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
    log.info("training on %d items of %dx%dx%d latents, batch %d (%d micro-batches, %d ranks), lr %.3g, "
             "mask dropout %.2f, EMA %.4g, to step %d", len(store), c, h, w, config.batch_size,
             config.grad_accum, world, config.lr, config.mask_dropout, config.ema_decay, config.max_steps)

    from tqdm import tqdm

    unet.train()
    first = last = None
    log_file = open(out / LOG_FILE, "a") if _is_writer() else None
    try:
        with tqdm(total=config.max_steps, initial=trainer.step, desc="ldm",
                  disable=not (progress and _is_writer())) as bar:
            while trainer.step < config.max_steps:
                started = time.perf_counter()
                jt.set_seed(_jittor_seed(config, trainer.step))
                batch = draw_batch(store, config, trainer.step)
                values = _step(trainer, schedule, batch)
                trainer.step += 1
                record = {"step": trainer.step, **values, "updates": trainer.updates,
                          "bad_steps": trainer.bad_steps, "mask_kept": float(batch.kept.mean()),
                          "seconds": round(time.perf_counter() - started, 4)}
                last = record
                first = first or record
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if step_hook is not None:
                    step_hook(trainer.step, record)
                bar.update(1)
                bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                mse=f"{values.get('mse', float('nan')):.4f}", skipped=trainer.bad_steps)
                if trainer.bad_in_a_row >= config.max_bad_steps:
                    raise TrainingStopped(
                        f"stopped at step {trainer.step}: {trainer.bad_in_a_row} steps in a row had a non-finite "
                        f"loss or gradient (last loss {values.get('loss')}); the last good checkpoint is "
                        f"{checkpoint}. Lower --lr, check the latent store, or resume from that checkpoint")
                if config.save_every and trainer.step % config.save_every == 0:
                    save()
                if (decode is not None and config.sample_every and trainer.step % config.sample_every == 0
                        and _is_writer()):
                    unet.eval()
                    write_samples(out / "samples" / f"step_{trainer.step:07d}.png", unet, schedule, store,
                                  config, decode)
                    unet.train()
        if not config.save_every or trainer.step % config.save_every or first is None:
            save()
    finally:
        if log_file is not None:
            log_file.close()
    return {"step": trainer.step, "updates": trainer.updates, "bad_steps": trainer.bad_steps,
            "checkpoint": str(checkpoint), "first": first, "last": last}


def export_ema(checkpoint: str | os.PathLike, out: str | os.PathLike, which: str = "ema",
               dtype: str = "float32") -> None:
    """Write the ``which`` weights ("ema" or "model") of a training checkpoint as a weights
    checkpoint of the network's kind (e.g. "unet"), with the network config."""
    from weights.checkpoint import weights_of

    arrays, info = read_training_checkpoint(checkpoint)
    weights, kind = weights_of(arrays, info, which)
    weights = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    extra = {"source": str(checkpoint), "weights": which, "step": info["extra"].get("step")}
    config = {"network": info["config"]["network"], "diffusion": info["config"]["diffusion"]}
    save_checkpoint(out, weights, kind=kind, config=config, extra=extra)


def latent_std(store: LatentStore) -> float:
    """Standard deviation of every latent value in the store (both views), in float64: LDM's
    ``scale_by_std`` sets scale_factor = 1 / this (it measures one batch; this measures all)."""
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(store), 256):
        indices = np.arange(start, min(start + 256, len(store)))
        for view in (0, 1):
            latents, _ = store.batch(indices, np.full(len(indices), view, dtype=np.int64))
            values = latents.astype(np.float64)
            total, total_sq, count = total + values.sum(), total_sq + (values ** 2).sum(), count + values.size
    mean = total / count
    return float(np.sqrt(max(total_sq / count - mean ** 2, 0.0)))

"""Training the latent diffusion U-Net on a cached latent store (guided-diffusion's TrainLoop, as
SDM and IIDM use it), as a task of the shared training skeleton (``training.loop``: checkpoints,
resume, the non-finite guard, logs, samples).

One optimizer step at ``step`` (all randomness drawn from ``training.loop.step_rng(seed, step)``,
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

Checkpoints (kind "unet-train") hold the weights (``model/``), the EMA (``ema/``), AdamW's moments
(``optim/m/``, ``optim/v/``), Adam's update count, the fp16 loss scale and the full config:
{"network", "diffusion" (schedule, latent scale), "train", "latents"}.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

from datasets import NUM_CLASSES, colorize, one_hot
from training.loop import (NON_FINITE, LoopConfig, Task, TrainingStopped, batch_indices, run, step_rng,
                           stored_run, stored_section)
from training.optim import FusedAdamW
from training.state import adam_state, load_adam_state, save_grid, to_uint8, trainable
from weights.checkpoint import WeightsError, check_diffusion, config_from_dict, diffusion_fix, diffusion_section
from .ema import EMA
from .guidance import drop_masks
from .latents import LatentStore
from .losses import training_losses
from .samplers import ddim_sample
from .schedule import ScheduleConfig, make_schedule

log = logging.getLogger("iidm.ldm.training")

TERMS = ("loss", "mse", "vb")
__all__ = ["TrainConfig", "TrainingStopped", "train", "draw_batch", "batch_indices", "latent_std", "stored_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Options of the LDM training. Defaults: IIDM's (batch 5 per GPU, lr 1e-4, EMA 0.9999,
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
    keep_every: int = 0             # also keep the weights and EMA every N steps (for averaging)
    sample_count: int = 4
    sample_steps: int = 50          # DDIM steps of the sample images
    seed: int = 0
    max_bad_steps: int = 10         # bad steps (non-finite, loss spikes) in a row that stop the run
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
        if min(self.max_steps, self.save_every, self.sample_every, self.keep_every) < 0:
            raise ValueError("TrainConfig: max_steps, save_every, sample_every and keep_every must be >= 0")
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

    def loop(self) -> LoopConfig:
        return LoopConfig(self.max_steps, self.save_every, self.sample_every, self.keep_every,
                          self.max_bad_steps, self.seed)


# ------------------------------------------------------------------------------------ data
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
    rng = step_rng(config.seed, step)
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


# ------------------------------------------------------------------------------ the task
class LDMTask(Task):
    """The U-Net, its fp32 master weights, AdamW, EMA and the fp16 loss scale, on a latent store."""

    name = "ldm"
    watched_losses = ("mse",)     # the noise-prediction MSE: the hybrid loss's L_vb term is noisier near t = 0

    def __init__(self, unet, store: LatentStore, config: TrainConfig, *, net_kind: str = "unet",
                 decode: Callable[[jt.Var], jt.Var] | None = None):
        self.kind = net_kind
        self.unet, self.store, self.cfg, self.decode = unet, store, config, decode
        world = jt.world_size if jt.in_mpi else 1
        if config.batch_size % (config.grad_accum * world):
            raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum ({config.grad_accum}) "
                             f"x MPI ranks ({world})")
        if config.fp16 and not jt.flags.use_cuda:
            raise ValueError("fp16 mixed precision needs CUDA (on the CPU float16 is hundreds of times slower)")
        if config.fp16 != bool(getattr(unet.config, "use_fp16", False)):
            raise ValueError(f"fp16={config.fp16} but the network was built with use_fp16="
                             f"{getattr(unet.config, 'use_fp16', False)}; build it with the same setting")
        c = store.latent_shape[0]
        if getattr(unet.config, "in_channels", c) != c:
            raise ValueError(f"the network takes {unet.config.in_channels} latent channels, the store holds {c}")
        if config.grad_checkpoint:
            from models.staged import check_staged

            check_staged(unet)
        self.schedule = make_schedule(config.schedule)
        named = trainable(unet)
        if not named:
            raise ValueError("the network has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if jt.in_mpi:
            # Every rank starts from rank 0's weights, whatever its own seed.
            for p in self.params:
                p.assign(p.mpi_broadcast(0))
            jt.sync(self.params)
        # fp16 keeps float32 master copies for AdamW; in float32 the parameters are their own masters.
        self.masters = [p if p.dtype == "float32" else p.float32().clone().stop_grad() for p in self.params]
        self.optimizer = FusedAdamW(self.masters, config.lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=config.weight_decay)
        self.ema = EMA(list(zip(self.names, self.masters)), config.ema_decay)
        self.updates = 0          # optimizer steps applied (Adam's bias-correction count)
        self.lg_loss_scale = config.initial_lg_loss_scale if config.fp16 else 0.0

    # ------------------------------------------------------------------ checkpoint state
    def config(self) -> dict[str, Any]:
        return {"network": self.unet.config.to_dict(),
                "diffusion": diffusion_section(dataclasses.asdict(self.cfg.schedule), "latent", self.cfg.latent_scale),
                "train": self.cfg.to_dict(), "latents": str(self.store.path),
                "latents_autoencoder_sha256": self.store.manifest.get("autoencoder_sha256")}

    def _frozen(self) -> dict[str, jt.Var]:
        """Saved arrays that are not trained (buffers), so the checkpoint holds the whole network."""
        trained = set(self.names)
        return {n: v for n, v in self.unet.state_dict().items() if n not in trained}

    def state(self) -> dict[str, Any]:
        out = {f"model/{n}": p for n, p in zip(self.names, self.masters)}
        out.update({f"model/{n}": v for n, v in self._frozen().items()})
        out.update({f"ema/{n}": v for n, v in zip(self.ema.names, self.ema.vars())})
        out.update({f"optim/{k}": v for k, v in adam_state(self.optimizer, self.names).items()})
        return out

    def counters(self) -> dict[str, Any]:
        return {"updates": self.updates, "lg_loss_scale": self.lg_loss_scale}

    def load(self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any], source: str) -> None:
        missing = sorted({f"{prefix}/{n}" for prefix in ("model", "ema") for n in self.names} - set(arrays))
        if missing:
            raise WeightsError(f"{source}: training checkpoint lacks {len(missing)} arrays, e.g. {missing[:3]}")
        for n, p, master in zip(self.names, self.params, self.masters):
            value = arrays[f"model/{n}"]
            if tuple(value.shape) != tuple(master.shape):
                raise WeightsError(f"{source}: model/{n} has shape {value.shape}, the model {tuple(master.shape)}")
            master.update(jt.array(value.astype(np.float32)))
            if master is not p:
                p.update(master.cast(p.dtype))
        frozen = self._frozen()
        if frozen:
            self.unet.load_parameters({n: arrays[f"model/{n}"] for n in frozen if f"model/{n}" in arrays})
        self.ema.load_state_dict({n: arrays[f"ema/{n}"] for n in self.names}, source)
        self.updates = int(counters["updates"])
        load_adam_state(self.optimizer, self.names, {k[len("optim/"):]: v for k, v in arrays.items()
                                                      if k.startswith("optim/")}, self.updates, source)
        self.lg_loss_scale = float(counters.get("lg_loss_scale", self.lg_loss_scale))
        jt.sync(self.params + self.masters)

    # ------------------------------------------------------------------ one step
    def draw(self, step: int) -> Batch:
        """Everything random about step ``step`` (``draw_batch``; the pixel task draws its own)."""
        return draw_batch(self.store, self.cfg, step)

    def step(self, step: int, update: bool = True) -> dict[str, Any]:
        """Forward/backward over the micro-batches of step ``step``'s batch and, if all is finite
        (and ``update``), one update. Returns the logged values (means over the global batch)."""
        cfg = self.cfg
        batch = self.draw(step)
        scale = 2.0 ** self.lg_loss_scale if cfg.fp16 else 1.0
        grads, values, loss = self._gradients(batch, scale)
        values["mask_kept"] = float(batch.kept.mean())
        if cfg.fp16 and math.isfinite(loss) and not math.isfinite(values["grad_norm"]):
            # Loss-scale overflow (guided-diffusion's MixedPrecisionTrainer): halve the scale, skip.
            if update:
                self.lg_loss_scale -= 1.0
            values.update(skipped="fp16_overflow", lg_loss_scale=self.lg_loss_scale)
        elif not (math.isfinite(loss) and math.isfinite(values["grad_norm"])):
            values["skipped"] = NON_FINITE
        elif update:
            self._update(grads)
            if cfg.fp16:
                self.lg_loss_scale += cfg.fp16_scale_growth
                values["lg_loss_scale"] = self.lg_loss_scale
            values["updates"] = self.updates
        return values

    def _gradients(self, batch: Batch, scale: float) -> tuple[list[jt.Var], dict[str, Any], float]:
        """The gradient of the mean loss over the global batch (micro-batches summed, MPI ranks
        averaged, loss scale removed), the logged terms (overall and by quarter of [0, T)) with the
        gradient norm, and the global mean loss."""
        cfg = self.cfg
        world = jt.world_size if jt.in_mpi else 1
        rank = jt.rank if jt.in_mpi else 0
        micro = cfg.batch_size // (cfg.grad_accum * world)
        grads: list[jt.Var] | None = None
        # Each term per sample of the global batch: this rank fills its own positions, the other
        # ranks' are summed in below, so every rank logs (and decides on) the same global values.
        per_sample: dict[str, np.ndarray] = {}
        for k in range(cfg.grad_accum):
            start = (k * world + rank) * micro
            part = slice(start, start + micro)
            terms, micro_grads = self._micro_batch(batch, part, scale)
            grads = micro_grads if grads is None else [a + g for a, g in zip(grads, micro_grads)]
            jt.sync([*terms.values(), *grads])
            for name in TERMS:
                if name in terms:
                    per_sample.setdefault(name, np.zeros(cfg.batch_size, np.float64))[part] = terms[name].numpy()
        if jt.in_mpi:
            grads = [g.mpi_all_reduce("mean") for g in grads]
            names = list(per_sample)
            gathered = jt.array(np.stack([per_sample[n] for n in names]).astype(np.float32)).mpi_all_reduce("add")
            per_sample = dict(zip(names, gathered.numpy().astype(np.float64)))
        if scale != 1.0:
            grads = [g / scale for g in grads]
        sq = sum((g * g).sum() for g in grads)
        jt.sync([sq, *grads])
        values: dict[str, Any] = {}
        quartile = batch.t[:cfg.batch_size] * 4 // cfg.schedule.num_timesteps
        for name, samples in per_sample.items():
            values[name] = float(samples.mean())
            for q in range(4):
                if (quartile == q).any():
                    values[f"{name}_q{q}"] = float(samples[quartile == q].mean())
        values["grad_norm"] = math.sqrt(float(sq.item())) if np.isfinite(sq.item()) else float("inf")
        return grads, values, values["loss"]

    def _micro_batch(self, batch: Batch, part: slice, scale: float) -> tuple[dict[str, jt.Var], list[jt.Var]]:
        """The loss terms [b] and the float32 gradients of one micro-batch's scaled mean loss."""
        cfg = self.cfg
        x_start, mask = jt.array(batch.latents[part]), jt.array(batch.masks[part])
        t, noise = jt.array(batch.t[part]), jt.array(batch.noise[part])
        if cfg.grad_checkpoint:
            from models.staged import StagedPass

            staged = StagedPass(self.unet, mask)
            terms = training_losses(self.schedule, staged.forward, x_start, t, noise, loss_type=cfg.loss_type)
            loss = terms["loss"].mean() * (scale / cfg.grad_accum)
            by_id = staged.backward(jt.grad(loss, staged.output))
            grads = [by_id[id(p)] for p in self.params]
        else:
            terms = training_losses(self.schedule, lambda x_t, t_model: self.unet(x_t, t_model, mask), x_start,
                                    t, noise, loss_type=cfg.loss_type)
            loss = terms["loss"].mean() * (scale / cfg.grad_accum)
            grads = jt.grad(loss, self.params)
        return terms, [g.float32() if g.dtype != "float32" else g for g in grads]

    def _update(self, grads: list[jt.Var]) -> None:
        """AdamW on the float32 masters and the EMA of the new masters (fused: a few kernels for
        all tensors), then the masters copied back to float16 parameters."""
        moments = self.optimizer.step_gradients(grads, ema=self.ema.vars(), ema_decay=self.ema.decay)
        self.updates += 1
        for p, master in zip(self.params, self.masters):
            if master is not p:
                p.update(master.cast(p.dtype))
        jt.sync(self.masters + self.ema.vars() + moments)

    def progress(self, values: Mapping[str, Any]) -> dict[str, str]:
        return {"loss": f"{values.get('loss', float('nan')):.4f}", "mse": f"{values.get('mse', float('nan')):.4f}"}

    # ------------------------------------------------------------------ samples
    def write_samples(self, path: Path, step: int) -> None:
        """A PNG grid: the first items' masks (colourised), their decoded latents, and DDIM samples
        from noise under those masks (``sample_ddim``)."""
        if self.decode is None:
            return
        config, store = self.cfg, self.store
        count = min(config.sample_count, len(store))
        latents, labels = store.batch(np.arange(count), np.zeros(count, dtype=np.int64))
        sample = self.sample_ddim(one_hot(labels, NUM_CLASSES), latents.shape)
        with jt.no_grad():
            images = to_uint8(self.decode(sample / config.latent_scale).numpy())
            reference = to_uint8(self.decode(jt.array(latents)).numpy())
        height, width = images.shape[1:3]
        masks = [np.asarray(colorize(label)) for label in labels]
        masks = [m if m.shape[:2] == (height, width) else
                 np.kron(m, np.ones((height // m.shape[0], width // m.shape[1], 1), dtype=np.uint8)) for m in masks]
        save_grid(path, [np.stack(masks), reference, images])

    def sample_ddim(self, masks: np.ndarray, shape: tuple[int, ...], clip_denoised: bool = False) -> jt.Var:
        """DDIM samples of the sample grids (``sample_steps`` steps, eta 0, no guidance) with the
        training weights, under ``masks``, from the same noise at every step so the grids compare."""
        config, unet = self.cfg, self.unet
        noise = jt.array(step_rng(config.seed, 0, 99).standard_normal(shape, dtype=np.float32))
        stride = max(1, self.schedule.num_timesteps // config.sample_steps)
        timesteps = list(range(self.schedule.num_timesteps - 1, -1, -stride))
        mask = jt.array(masks)
        unet.eval()
        with jt.no_grad():
            sample = ddim_sample(lambda x_t, t: unet(x_t, t, mask), self.schedule, noise, timesteps,
                                 clip_denoised=clip_denoised)
        unet.train()
        return sample


# ------------------------------------------------------------------------------ entry points
def stored_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], TrainConfig, str]:
    """(network config, training config, latent store path) of the run in ``run_dir``."""
    path, config = stored_run(run_dir, "unet", ("network", "diffusion", "train", "latents"))
    return dict(config["network"]), stored_train_config(config, path), str(config["latents"])


def stored_train_config(config: Mapping[str, Any], source: str | os.PathLike) -> TrainConfig:
    """A stored run's TrainConfig, every field required, with the schedule and latent scale of its
    diffusion section: the ones the network learnt, which a resumed run keeps."""
    diffusion = check_diffusion(config.get("diffusion"), str(source), diffusion_fix(True, str(source)))
    train = {**config["train"], "schedule": diffusion["schedule"]}
    if "latent_scale" in diffusion:
        train["latent_scale"] = diffusion["latent_scale"]
    return stored_section(TrainConfig, {**config, "train": train}, "train", source)


def train(unet, latents: str | os.PathLike | LatentStore, out_dir: str | os.PathLike,
          config: TrainConfig = TrainConfig(), *, net_kind: str = "unet",
          decode: Callable[[jt.Var], jt.Var] | None = None, resume: bool = False,
          progress: bool = True, step_hook: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``unet`` (called as ``unet(x_t, t, mask)``, with a ``config.to_dict()``) on the latent
    store until ``config.max_steps``; returns {"step", "updates", "bad_steps", "checkpoint", "first", "last"}.

    ``decode(latent) -> image in [-1, 1]`` enables the sample images (``RUN_DIR/samples``).
    ``resume``: continue the run in ``out_dir`` (same network config).
    Raises ``TrainingStopped`` when the guard stops the run (``training.loop``).
    """
    store = latents if isinstance(latents, LatentStore) else LatentStore(latents)
    task = LDMTask(unet, store, config, net_kind=net_kind, decode=decode)
    if resume:
        network, _, _ = stored_config(out_dir)
        if network != unet.config.to_dict():
            raise WeightsError(f"{out_dir}: the run's network config differs from the one given; resume "
                               "with the same preset and options")
    c, h, w = store.latent_shape
    log.info("training on %d items of %dx%dx%d latents, batch %d (%d micro-batches, %d ranks), lr %.3g, "
             "mask dropout %.2f, EMA %.4g, to step %d", len(store), c, h, w, config.batch_size,
             config.grad_accum, jt.world_size if jt.in_mpi else 1, config.lr, config.mask_dropout,
             config.ema_decay, config.max_steps)
    unet.train()
    result = run(task, out_dir, config.loop(), resume=resume, progress=progress, step_hook=step_hook)
    return {"step": result.step, "updates": task.updates, "bad_steps": result.bad_steps,
            "checkpoint": result.checkpoint, "first": result.first, "last": result.last}


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

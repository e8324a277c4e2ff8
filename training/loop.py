"""The training skeleton shared by the autoencoder, the latent diffusion U-Net and the segmenter.

A ``Task`` knows its network, data and losses; ``run`` does everything else, the same way for
all of them:

    RUN_DIR/options.json                      the effective configuration of the last start
    RUN_DIR/log.jsonl                         one strict-JSON record per step (training/logs.py)
    RUN_DIR/samples/step_NNNNNNN.png          the task's sample images, every ``sample_every`` steps
    RUN_DIR/checkpoints/last.safetensors      the newest checkpoint known to be good
    RUN_DIR/checkpoints/candidate.safetensors a newer one, until it has proven itself
    RUN_DIR/checkpoints/step_NNNNNNN.safetensors  weights kept every ``keep_every`` steps

Data order and randomness. A task draws everything random about step ``s`` from generators seeded
by (seed, s) (``step_rng``, ``batch_indices``), and ``run`` reseeds Jittor per step, so a resumed
run draws exactly what an uninterrupted one would and its checkpoints are bit-identical.

Checkpoints. Every ``save_every`` steps the whole training state (weights, EMA, optimizer moments,
counters, the task's own state) is written, atomically and tensor by tensor, as
``candidate.safetensors``. A checkpoint is only known to be good once the step after it, which
starts from its weights, had a finite loss and gradient: then the candidate replaces
``last.safetensors``. So a step that wrecks the weights (finite loss, then NaN from the next step
on) never overwrites the good checkpoint. At the end of a run the last candidate is checked the
same way with a probe step that does not update. ``--resume`` continues from the candidate when
it is newer than ``last`` (a run killed between a save and the next step), else from ``last``.

The non-finite guard. A step whose loss or gradient is not finite changes nothing (no update, no
EMA step, the optimizer's count unchanged) and is logged with ``"skipped": "non_finite"``;
``max_bad_steps`` of them in a row stop the run: the candidate (which may hold the weights that
diverged) is set aside as ``diverged.safetensors``, and the error names ``last.safetensors`` and
its step, from which ``--resume`` with a lower learning rate continues, or says that no good
checkpoint exists yet. Under MPI every rank runs the steps and makes the same decisions (losses
and gradients are averaged across ranks); only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from datasets.io import atomic_write, remove_stale_temporaries
from training.logs import LOG_FILE, JsonLog, repair_log
from weights.checkpoint import TRAIN_SUFFIX, WeightsError, load_checkpoint, read_checkpoint_info, save_checkpoint

log = logging.getLogger("iidm.training")

CHECKPOINTS = "checkpoints"
LAST = "last.safetensors"
CANDIDATE = "candidate.safetensors"
DIVERGED = "diverged.safetensors"
OPTIONS = "options.json"
NON_FINITE = "non_finite"


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row)."""


# ------------------------------------------------------------------------------ randomness
def jittor_seed(seed: int, *salt: int) -> int:
    """A Jittor seed in [2, 2^31 - 1) from the user's seed (and a salt such as the step). Jittor's
    CPU generator gives the same stream for seeds 0 and 1, so user seeds are hashed, not passed on."""
    digest = hashlib.sha256(":".join(str(int(v)) for v in (seed, *salt)).encode()).digest()
    return 2 + int.from_bytes(digest[:8], "big") % (2 ** 31 - 3)


def seed_everything(seed: int) -> None:
    """Seed Jittor, numpy's and Python's global generators from ``seed`` (the same on every MPI
    rank), so networks built next get the same initial weights in every run with this seed."""
    import random

    import jittor as jt

    value = jittor_seed(seed)
    jt.set_global_seed(value, different_seed_for_mpi=False)
    random.seed(value)
    np.random.seed(value % (2 ** 32))


def materialize(module) -> None:
    """Compute a freshly built module's initial weights now, one array at a time in name order:
    Jittor draws them lazily, in the order they are first executed, so without this the values
    would depend on what the caller happens to execute first."""
    import jittor as jt

    for _, var in sorted(module.state_dict().items()):
        jt.sync([var])


def step_rng(seed: int, step: int, *salt: int) -> np.random.Generator:
    """The generator of everything random about step ``step`` (salts separate independent draws)."""
    return np.random.default_rng([int(seed), int(step), *salt])


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


# ------------------------------------------------------------------------------ the contract
@dataclass(frozen=True)
class LoopConfig:
    """What the skeleton does around the task's steps."""

    max_steps: int
    save_every: int = 1000
    sample_every: int = 0
    keep_every: int = 0           # also keep the weights (and EMA) every N steps as step_NNNNNNN.safetensors
    max_bad_steps: int = 10       # non-finite steps in a row that stop the run
    seed: int = 0

    def __post_init__(self):
        for name in ("max_steps", "save_every", "sample_every", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")


class Task:
    """One training: subclasses set ``kind`` (the network's checkpoint kind, e.g. "unet") and
    ``name``, and fill in the methods. Arrays returned for checkpoints are named with prefixes
    (``model/``, ``ema/``, ``optim/``, ...); values may be Jittor Vars (fetched one at a time)."""

    kind: str = ""
    name: str = "train"

    def config(self) -> dict[str, Any]:
        """The run's configuration as plain data: {"network": ..., "train": ..., ...}."""
        raise NotImplementedError

    def step(self, step: int, update: bool = True) -> dict[str, Any]:
        """Optimizer step number ``step`` (0-based): draw its data from (seed, step), compute the
        loss and gradient, and update unless ``update`` is False or they are not finite. Returns
        the values to log; ``"skipped"`` names why nothing was updated (``NON_FINITE``, or a
        task-specific reason that is not a failure, e.g. an fp16 loss-scale overflow)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Every array of the training state (for the checkpoint)."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """The task's counters (plain data) saved beside the arrays."""
        return {}

    def load(self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any], source: str) -> None:
        """Restore the training state written by ``state`` and ``counters``."""
        raise NotImplementedError

    def kept_weights(self) -> dict[str, Any]:
        """The arrays of a ``keep_every`` snapshot (weights and EMA, no optimizer state)."""
        return {name: value for name, value in self.state().items() if name.startswith(("model/", "ema/"))}

    def write_samples(self, path: Path, step: int) -> None:
        """Sample images at ``path`` (PNG); the default writes none."""

    def progress(self, values: Mapping[str, Any]) -> dict[str, str]:
        """A few values for the progress bar."""
        return {}


@dataclass
class RunResult:
    step: int
    bad_steps: int
    checkpoint: str
    first: dict[str, Any] | None
    last: dict[str, Any] | None


# ------------------------------------------------------------------------------ the run
def is_writer() -> bool:
    """True in a single process and in rank 0 of an MPI run: the one that writes and reports."""
    import jittor as jt

    return not jt.in_mpi or jt.rank == 0


def checkpoint_to_resume(out: Path) -> Path | None:
    """The newest usable checkpoint of a run: the candidate when it is newer than last, else last."""
    folder = out / CHECKPOINTS
    best, best_step = None, -1
    for name in (LAST, CANDIDATE):
        path = folder / name
        if path.is_file():
            try:
                step = load_header_step(path)
            except WeightsError as exc:
                log.warning("%s is not readable (%s); not resuming from it", path, exc)
                continue
            if step > best_step:
                best, best_step = path, step
    return best


def load_header_step(path: Path) -> int:
    """The step recorded in a training checkpoint's metadata (the arrays are not read)."""
    return int(read_checkpoint_info(path)["extra"].get("step", -1))


class _Run:
    """The state of one ``run``: the step, the guard's counters, which checkpoint is good and which
    awaits its proof, and the files of the run folder."""

    def __init__(self, task: Task, out: Path, loop: LoopConfig):
        self.task, self.out, self.loop = task, out, loop
        self.folder = out / CHECKPOINTS
        self.last, self.candidate = self.folder / LAST, self.folder / CANDIDATE
        self.writer = is_writer()
        self.step = 0
        self.counters = {"bad_steps": 0, "bad_in_a_row": 0}
        self.good_step: int | None = None    # the step of last.safetensors
        self.pending: int | None = None      # the step of the candidate awaiting its proof

    def resume(self) -> None:
        source = checkpoint_to_resume(self.out)
        if source is None:
            raise FileNotFoundError(f"{self.last}: nothing to resume (no checkpoint in {self.folder})")
        checkpoint = load_checkpoint(source)
        task = self.task
        if checkpoint.file_kind != task.kind + TRAIN_SUFFIX or "training" not in checkpoint.extra:
            raise WeightsError(f"{source}: not a {task.kind} training checkpoint of this version "
                               f"(kind {checkpoint.file_kind!r}); start a new run")
        saved = checkpoint.extra["training"]
        task.load(checkpoint.arrays, saved.get("task", {}), str(source))
        self.step = int(checkpoint.extra["step"])
        self.counters.update({k: int(saved.get(k, 0)) for k in self.counters})
        if source == self.candidate:
            self.pending = self.step
            self.good_step = load_header_step(self.last) if self.last.is_file() else None
        else:
            self.good_step = self.step
        log.info("resumed %s at step %d", source, self.step)

    def prepare_folder(self) -> None:
        """Stale temporaries out, the log made to agree with the step, the options written."""
        if not self.writer:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for where in (self.out, self.folder, self.out / "samples"):
            remove_stale_temporaries(where)
        repair_log(self.out / LOG_FILE, self.step)
        with atomic_write(self.out / OPTIONS, "w", encoding="utf-8") as f:
            json.dump({"run": self.task.config(), "loop": self.loop.__dict__}, f, indent=2, sort_keys=True)
            f.write("\n")

    def save(self, path: Path, arrays: Mapping[str, Any]) -> None:
        if self.writer:
            extra = {"step": self.step, "training": {**self.counters, "task": self.task.counters()}}
            save_checkpoint(path, arrays, kind=self.task.kind + TRAIN_SUFFIX, config=self.task.config(), extra=extra)

    def promote(self) -> None:
        """The candidate proved finite: it becomes last.safetensors."""
        if self.writer and self.candidate.is_file():
            os.replace(self.candidate, self.last)
        self.good_step, self.pending = self.pending, None

    def stop(self, why: str) -> TrainingStopped:
        """Set the unproven candidate aside and say where to resume from."""
        if self.writer and self.candidate.is_file():
            os.replace(self.candidate, self.folder / DIVERGED)
        where = (f"the last good checkpoint is {self.last} (step {self.good_step}): resume it with a lower --lr"
                 if self.good_step is not None and self.last.is_file() else
                 "no good checkpoint exists yet: start again with a lower --lr")
        return TrainingStopped(f"stopped at step {self.step}: {why}; {where}")

    def train_step(self) -> dict[str, Any]:
        """One step of the task, counted by the guard; returns the log record."""
        import jittor as jt

        started = time.perf_counter()
        jt.set_seed(jittor_seed(self.loop.seed, self.step, 1))
        values = self.task.step(self.step)
        self.step += 1
        skipped = values.get("skipped")
        if skipped == NON_FINITE:
            self.counters["bad_steps"] += 1
            self.counters["bad_in_a_row"] += 1
        elif skipped is None:
            self.counters["bad_in_a_row"] = 0
            if self.pending is not None:
                self.promote()
        return {"step": self.step, **values, "bad_steps": self.counters["bad_steps"],
                "seconds": round(time.perf_counter() - started, 4)}

    def check_guard(self, record: Mapping[str, Any]) -> None:
        if self.counters["bad_in_a_row"] >= self.loop.max_bad_steps:
            raise self.stop(f"{self.counters['bad_in_a_row']} steps in a row had a non-finite loss or gradient "
                            f"(last loss {record.get('loss')})")

    def after_step(self) -> None:
        """The kept weights, the samples and the candidate due at this step, in that order: a run
        resumes after the candidate's step, so a kill between two of these writes must find the
        candidate missing (the step is redone and its files written again, identical), never a
        candidate without the snapshot or samples of its step."""
        step, loop = self.step, self.loop
        if loop.keep_every and step % loop.keep_every == 0:
            self.save(self.folder / f"step_{step:07d}.safetensors", self.task.kept_weights())
        if loop.sample_every and step % loop.sample_every == 0 and self.writer:
            self.task.write_samples(self.out / "samples" / f"step_{step:07d}.png", step)
        if loop.save_every and step % loop.save_every == 0:
            self.save(self.candidate, self.task.state())
            self.pending = step

    def finish(self) -> None:
        """Save the final state unless it is saved, and prove it with a probe step: nothing trains
        from the final weights, so a step that does not update checks them."""
        import jittor as jt

        if self.pending != self.step and self.good_step != self.step:
            self.save(self.candidate, self.task.state())
            self.pending = self.step
        if self.pending is not None:
            jt.set_seed(jittor_seed(self.loop.seed, self.step, 1))
            if self.task.step(self.step, update=False).get("skipped") == NON_FINITE:
                raise self.stop("the final weights give a non-finite loss or gradient")
            self.promote()


def run(task: Task, out_dir: str | os.PathLike, loop: LoopConfig, *, resume: bool = False,
        progress: bool = True, step_hook: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train ``task`` until ``loop.max_steps`` (see the module docstring)."""
    from tqdm import tqdm

    state = _Run(task, Path(out_dir), loop)
    if not resume and (state.last.exists() or state.candidate.exists()):
        raise FileExistsError(f"{state.out} already holds a training run ({state.folder}); pass --resume to "
                              "continue it or choose another output folder")
    if resume:
        state.resume()
    state.prepare_folder()
    first = last_record = None
    with JsonLog(state.out / LOG_FILE if state.writer else None) as records, \
            tqdm(total=loop.max_steps, initial=state.step, desc=task.name,
                 disable=not (progress and state.writer)) as bar:
        while state.step < loop.max_steps:
            record = state.train_step()
            records.write(record)
            first, last_record = first or record, record
            if step_hook is not None:
                step_hook(state.step, record)
            bar.update(1)
            bar.set_postfix(task.progress(record), skipped=state.counters["bad_steps"])
            state.check_guard(record)
            state.after_step()
        state.finish()
    return RunResult(state.step, state.counters["bad_steps"], str(state.last), first, last_record)


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike, which: str = "ema",
                   dtype: str | None = None) -> None:
    """Write the ``which`` weights ("ema" or "model") of a training checkpoint as a weights
    checkpoint of the network's kind (e.g. "unet"), with its network and diffusion config (and an SDM run's dataset and size)."""
    source = load_checkpoint(checkpoint)
    if not source.training:
        raise WeightsError(f"{checkpoint}: already a weights checkpoint (kind {source.kind!r})")
    weights = source.weights(which)
    if dtype is not None:
        weights = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    config = {key: source.config[key] for key in ("network", "diffusion", "dataset", "size")
              if key in source.config}
    extra = {"source": str(checkpoint), "weights": which, "step": source.step}
    save_checkpoint(out, weights, kind=source.kind, config=config, extra=extra)

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
EMA step, the optimizer's count unchanged, BatchNorm running statistics restored) and is logged
with ``"skipped": "non_finite"``. A finite loss is not proof enough: a learning rate far too large
gives finite losses of 1e9 between NaN steps. So a step where one of the watched losses
(``Task.watched_losses``) exceeds ``spike_factor`` times the largest of its values over the last
``SPIKE_WINDOW`` good steps (``EARLY_SPIKE_FACTOR`` times more while fewer than
``SPIKE_MIN_HISTORY`` are behind it) is a spike, logged with ``"suspect": "loss_spike"``: it proves no candidate, and when it is the first step from a
candidate's weights it refutes that candidate (set aside as ``diverged.safetensors``). Bad steps
(non-finite or spikes) stop the run when ``max_bad_steps`` come in a row, or when they make half
of the last ``4 * max_bad_steps`` steps: the candidate (which may hold the weights that diverged) is
set aside as ``diverged.safetensors``, and the error names ``last.safetensors`` and its step, from
which ``--resume`` with a lower learning rate continues, or says that no good checkpoint exists
yet. Under MPI every rank runs the steps and makes the same decisions (losses and gradients are
averaged across ranks); only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from datasets.io import atomic_write, remove_stale_temporaries
from training.logs import LOG_FILE, JsonLog, repair_log
from training.state import buffers, restore_buffers
from weights.checkpoint import (TRAIN_SUFFIX, WeightsError, config_from_dict, load_checkpoint, read_checkpoint_info,
                                save_checkpoint)

log = logging.getLogger("iidm.training")

CHECKPOINTS = "checkpoints"
LAST = "last.safetensors"
CANDIDATE = "candidate.safetensors"
DIVERGED = "diverged.safetensors"
OPTIONS = "options.json"
NON_FINITE = "non_finite"
LOSS_SPIKE = "loss_spike"
SPIKE_WINDOW = 20        # good steps whose largest loss a new loss is compared with
SPIKE_MIN_HISTORY = 3    # good steps behind a loss for the full test
EARLY_SPIKE_FACTOR = 100  # with only 1 or 2 good steps behind it, a loss is a spike at 100x spike_factor


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
    max_bad_steps: int = 10       # bad steps (non-finite or loss spikes) in a row that stop the run
    seed: int = 0
    spike_factor: float = 10.0    # a loss above this x the largest of recent good steps' is a spike (0: no test)

    def __post_init__(self):
        for name in ("max_steps", "save_every", "sample_every", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if not (self.spike_factor == 0 or self.spike_factor > 1):
            raise ValueError(f"spike_factor must be 0 (no test) or > 1, got {self.spike_factor}")

    @property
    def bad_window(self) -> int:
        """The steps over which half being bad stops the run."""
        return 4 * self.max_bad_steps


class Task:
    """One training: subclasses set ``kind`` (the network's checkpoint kind, e.g. "unet") and
    ``name``, and fill in the methods. Arrays returned for checkpoints are named with prefixes
    (``model/``, ``ema/``, ``optim/``, ...); values may be Jittor Vars (fetched one at a time)."""

    kind: str = ""
    name: str = "train"
    watched_losses: tuple[str, ...] = ("loss",)    # logged losses, never negative, that the spike test watches

    def config(self) -> dict[str, Any]:
        """The run's configuration as plain data: {"network": ..., "train": ..., ...}."""
        raise NotImplementedError

    def step(self, step: int, update: bool = True) -> dict[str, Any]:
        """Optimizer step number ``step`` (0-based): draw its data from (seed, step), compute the
        loss and gradient, and update unless ``update`` is False or they are not finite. Returns
        the values to log; ``"skipped"`` names why nothing was updated (``NON_FINITE``, or a
        task-specific reason that is not a failure, e.g. an fp16 loss-scale overflow)."""
        raise NotImplementedError

    def checked_step(self, step: int, update: bool = True) -> dict[str, Any]:
        """``step``, with the running statistics of ``modules()`` put back when it updated nothing
        (skipped, or ``update`` False): their forward pass changed them."""
        saved = [(var, var.numpy().copy()) for module in self.modules() for var in buffers(module)]
        values = self.step(step, update=update)
        if values.get("skipped") is not None or not update:
            restore_buffers(saved)
        return values

    def state(self) -> dict[str, Any]:
        """Every array of the training state (for the checkpoint)."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """The task's counters (plain data) saved beside the arrays."""
        return {}

    def load(self, arrays: Mapping[str, np.ndarray], counters: Mapping[str, Any], source: str) -> None:
        """Restore the training state written by ``state`` and ``counters``."""
        raise NotImplementedError

    def proof_values(self, values: Mapping[str, Any]) -> dict[str, float]:
        """The finite values among ``watched_losses`` in a step's logged ``values``."""
        out = {}
        for name in self.watched_losses:
            value = values.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[name] = float(value)
        return out

    def modules(self) -> list:
        """The task's networks: the running statistics (BatchNorm's) a skipped step must not change."""
        return []

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


def stored_run(run_dir: str | os.PathLike, kind: str, sections: tuple[str, ...] = ("network", "train")
               ) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, configuration) of the run in ``run_dir``, as its newest checkpoint records it
    (read from the file's header, no array loaded); refuses another network's run, or one whose
    checkpoint lacks ``sections`` (a run of another stage or an older version)."""
    path = checkpoint_to_resume(Path(run_dir))
    if path is None:
        raise FileNotFoundError(f"{Path(run_dir) / CHECKPOINTS}: nothing to resume")
    info = read_checkpoint_info(path)
    missing = [name for name in sections if name not in info["config"]]
    if info["kind"] != kind + TRAIN_SUFFIX or missing:
        lacks = f", without {', '.join(missing)}" if missing else ""
        raise WeightsError(f"{path}: not a {kind} training checkpoint of this stage and version (kind "
                           f"{info['kind']!r}{lacks}); start a new run")
    return path, dict(info["config"])


def stored_section(cls, config: Mapping[str, Any], section: str, source: str | os.PathLike):
    """The ``cls`` dataclass of a stored run's ``config[section]``, every field required: a resumed
    run must not fall back on today's defaults for what its checkpoint does not say."""
    return config_from_dict(cls, config[section], complete=True, source=f"{source} ({section})",
                            hint="the run was written by an older version; start a new run from its weights")


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
        # The guard's state, saved with every checkpoint: counts, the proof values of the last good
        # steps (the spike test's reference) and whether each of the last steps was bad.
        self.counters: dict[str, Any] = {"bad_steps": 0, "bad_in_a_row": 0, "spikes": 0, "history": {}, "recent": []}
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
        for key in ("bad_steps", "bad_in_a_row", "spikes"):
            self.counters[key] = int(saved.get(key, 0))
        history = saved.get("history", {})
        self.counters["history"] = ({str(k): [float(v) for v in vs] for k, vs in history.items()}
                                    if isinstance(history, Mapping) else {})
        self.counters["recent"] = [int(v) for v in saved.get("recent", [])]
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
            counters = json.loads(json.dumps(self.counters))     # a copy, as saved
            extra = {"step": self.step, "training": {**counters, "task": self.task.counters()}}
            save_checkpoint(path, arrays, kind=self.task.kind + TRAIN_SUFFIX, config=self.task.config(), extra=extra)

    def promote(self) -> None:
        """The candidate proved finite: it becomes last.safetensors."""
        if self.writer and self.candidate.is_file():
            os.replace(self.candidate, self.last)
        self.good_step, self.pending = self.pending, None

    def set_aside(self) -> None:
        """The unproven candidate becomes diverged.safetensors (never resumed from)."""
        if self.writer and self.candidate.is_file():
            os.replace(self.candidate, self.folder / DIVERGED)
        self.pending = None

    def stop(self, why: str) -> TrainingStopped:
        """Set the unproven candidate aside and say where to resume from."""
        self.set_aside()
        where = (f"the last good checkpoint is {self.last} (step {self.good_step}): resume it with a lower --lr"
                 if self.good_step is not None and self.last.is_file() else
                 "no good checkpoint exists yet: start again with a lower --lr")
        return TrainingStopped(f"stopped at step {self.step}: {why}; {where}")

    def task_step(self, update: bool = True) -> dict[str, Any]:
        """The task's step at ``self.step``, seeded (``Task.checked_step``)."""
        import jittor as jt

        jt.set_seed(jittor_seed(self.loop.seed, self.step, 1))
        return self.task.checked_step(self.step, update)

    def spike(self, losses: Mapping[str, float]) -> tuple[str, float] | None:
        """(loss, ratio) of the watched loss furthest above ``spike_factor`` times its largest value
        over the recent good steps, or None."""
        if not self.loop.spike_factor:
            return None
        worst = None
        for name, value in losses.items():
            history = self.counters["history"].get(name, [])
            if not history or max(history) <= 0:
                continue
            # The first steps of a run (or of a resume without history) vary most, a codebook
            # initialised from data most of all: they are held to a far larger factor.
            factor = self.loop.spike_factor * (1 if len(history) >= SPIKE_MIN_HISTORY else EARLY_SPIKE_FACTOR)
            ratio = value / max(history)
            if ratio > factor and (worst is None or ratio > worst[1]):
                worst = (name, ratio)
        return worst

    def judge(self, values: dict[str, Any]) -> dict[str, Any]:
        """Count a step with the guard: a non-finite step or a loss spike is bad; a good step
        proves the pending candidate, a spike from the candidate's weights refutes it. Returns the
        values to log (a spike marked ``suspect``, with the loss and its ratio)."""
        skipped, counters = values.get("skipped"), self.counters
        if skipped is not None and skipped != NON_FINITE:
            return values          # skipped for a reason that is not a failure (an fp16 overflow)
        losses = self.task.proof_values(values)
        spike = self.spike(losses) if skipped is None else None
        bad = skipped == NON_FINITE or spike is not None
        if skipped == NON_FINITE:
            counters["bad_steps"] += 1
        elif spike is not None:
            name, ratio = spike
            counters["spikes"] += 1
            values = {**values, "suspect": LOSS_SPIKE, "spiking": name, "loss_ratio": round(ratio, 3)}
            if self.pending is not None:
                log.warning("step %d: %s is %.3g times its largest value over the last good steps; the checkpoint "
                            "of step %d is set aside as %s", self.step, name, ratio, self.pending, DIVERGED)
                self.set_aside()
        else:
            for name, value in losses.items():
                counters["history"][name] = (counters["history"].get(name, []) + [value])[-SPIKE_WINDOW:]
            if self.pending is not None:
                self.promote()
        counters["bad_in_a_row"] = counters["bad_in_a_row"] + 1 if bad else 0
        counters["recent"] = (counters["recent"] + [int(bad)])[-self.loop.bad_window:]
        return values

    def train_step(self) -> dict[str, Any]:
        """One step of the task, counted by the guard; returns the log record."""
        started = time.perf_counter()
        values = self.task_step()
        self.step += 1
        values = self.judge(values)
        return {"step": self.step, **values, "bad_steps": self.counters["bad_steps"],
                "seconds": round(time.perf_counter() - started, 4)}

    def check_guard(self, record: Mapping[str, Any]) -> None:
        in_a_row, recent = self.counters["bad_in_a_row"], self.counters["recent"]
        if in_a_row >= self.loop.max_bad_steps:
            why = f"{in_a_row} steps in a row"
        elif sum(recent) >= self.loop.bad_window // 2:
            why = f"{sum(recent)} of the last {len(recent)} steps"
        else:
            return
        last = ", ".join(f"{name} {record[name]}" for name in self.task.watched_losses if name in record)
        raise self.stop(f"{why} had a non-finite loss or gradient or a loss spike (last {last})")

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
        if self.pending != self.step and self.good_step != self.step:
            self.save(self.candidate, self.task.state())
            self.pending = self.step
        if self.pending is not None:
            values = self.task_step(update=False)
            if values.get("skipped") == NON_FINITE:
                raise self.stop("the final weights give a non-finite loss or gradient")
            spike = self.spike(self.task.proof_values(values))
            if spike is not None:
                raise self.stop(f"the final weights give a {spike[0]} {spike[1]:.3g} times its largest value over the "
                                "last good steps")
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
                   dtype: str | None = None, *, schedule: Mapping[str, Any] | None = None,
                   latent_scale: float | None = None) -> None:
    """Write the ``which`` weights ("ema" or "model") of a training checkpoint as a weights
    checkpoint of the network's kind (e.g. "unet"), with its network and diffusion config (and an SDM run's dataset and size).

    A U-Net run written by an earlier version of this project may lack its schedule or latent
    scale: ``schedule`` (a dict as weights.convert.parse_schedule returns) and ``latent_scale``
    supply what the run does not record; one that contradicts what the run records is an error,
    never an override."""
    source = load_checkpoint(checkpoint)
    if not source.training:
        raise WeightsError(f"{checkpoint}: already a weights checkpoint (kind {source.kind!r})")
    given = {field: value for field, value in (("schedule", schedule), ("latent_scale", latent_scale))
             if value is not None}
    if given and source.kind != "unet":
        raise WeightsError(f"{checkpoint}: --schedule and --latent_scale are for U-Net runs, this is a "
                           f"{source.kind!r} run")
    weights = source.weights(which)
    if dtype is not None:
        weights = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in weights.items()}
    config = {key: source.config[key] for key in ("network", "diffusion", "dataset", "size")
              if key in source.config}
    if given:
        # only version-1 runs (latent U-Nets) lack the section
        diffusion = config["diffusion"] = dict(config.get("diffusion") or {"space": "latent"})
        if latent_scale is not None and diffusion.get("space") != "latent":
            raise WeightsError(f"{checkpoint}: a {diffusion.get('space')}-space U-Net run has no latent scale; leave "
                               "--latent_scale out")
        for field, value in given.items():
            if field in diffusion and diffusion[field] != value:
                raise WeightsError(f"{checkpoint}: the run records {field} {diffusion[field]!r}; --{field} {value!r} "
                                   "would contradict it (leave the option out)")
            diffusion[field] = value
    extra = {"source": str(checkpoint), "weights": which, "step": source.step}
    save_checkpoint(out, weights, kind=source.kind, config=config, extra=extra)

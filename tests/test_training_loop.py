"""The training skeleton: the guard that keeps the last good checkpoint, logs that survive a kill,
resume from the newest checkpoint, weight snapshots, seeds, and the stop message; first on a toy
numpy task (fast, exact), then through ``train.py`` on the tiny presets."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from training.logs import LogError, read_log, repair_log
from training.loop import (CANDIDATE, DIVERGED, LAST, LOSS_SPIKE, NON_FINITE, LoopConfig, Task, TrainingStopped, jittor_seed,
                           run, step_rng)
from weights.checkpoint import load_checkpoint


class Toy(Task):
    """Gradient descent on 0.5 |w - target|^2 in numpy; steps in ``poison`` produce a NaN loss, and a
    step in ``wreck`` is finite but leaves NaN weights behind (as a too-large learning rate does)."""

    kind = "toy"
    name = "toy"

    def __init__(self, lr=0.25, poison=(), wreck=(), seed=0, explode=(), outlier=()):
        self.w = np.zeros(4, np.float32)
        self.target = step_rng(seed, 0, 5).standard_normal(4).astype(np.float32)
        self.lr, self.poison, self.wreck, self.seed = lr, set(poison), set(wreck), seed
        self.explode, self.outlier = set(explode), set(outlier)
        self.updates = 0

    def config(self):
        return {"network": {"size": 4}, "train": {"lr": self.lr}}

    def step(self, step, update=True):
        noise = step_rng(self.seed, step).standard_normal(4).astype(np.float32) * 0.01
        grad = self.w - self.target + noise
        loss = float(0.5 * np.sum(grad ** 2))
        if step in self.poison:
            loss = float("nan")
        if step in self.outlier:
            loss *= 1000.0          # a batch far harder than the others; the weights are fine
        if not np.isfinite(loss):
            return {"loss": loss, "skipped": NON_FINITE}
        if update:
            self.w = self.w - self.lr * grad
            if step in self.wreck:
                self.w = np.full(4, np.nan, np.float32)
            if step in self.explode:
                self.w = self.w * 1e6   # finite but wrecked, as a learning rate far too large leaves them
            self.updates += 1
        return {"loss": loss}

    def state(self):
        return {"model/w": self.w.copy(), "ema/w": self.w.copy()}

    def counters(self):
        return {"updates": self.updates}

    def load(self, arrays, counters, source):
        self.w = arrays["model/w"].copy()
        self.updates = counters["updates"]


def loop(**options):
    values = dict(max_steps=6, save_every=2, max_bad_steps=3)
    values.update(options)
    return LoopConfig(**values)


def ckpt(run_dir, name=LAST):
    return load_checkpoint(Path(run_dir) / "checkpoints" / name)


# ------------------------------------------------------------------------------ the guard
def test_a_step_that_wrecks_the_weights_never_replaces_the_good_checkpoint(jt, tmp_path):
    run(Toy(), tmp_path, loop(max_steps=4, save_every=2), progress=False)
    assert ckpt(tmp_path).step == 4
    # Resumed with a wrecking step 4 (the 5th): its loss is finite, every later step is NaN.
    with pytest.raises(TrainingStopped) as stopped:
        run(Toy(wreck={4}, poison=range(5, 100)), tmp_path, loop(max_steps=20, save_every=1), resume=True,
            progress=False)
    message = str(stopped.value)
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / LAST} (step 4)" in message
    assert "stopped at step 8: 3 steps in a row" in message
    good = ckpt(tmp_path)
    assert good.step == 4 and np.isfinite(good.arrays["model/w"]).all()
    assert (tmp_path / "checkpoints" / DIVERGED).is_file() and not (tmp_path / "checkpoints" / CANDIDATE).exists()
    # Resuming the good checkpoint trains on without a non-finite step.
    result = run(Toy(), tmp_path, loop(max_steps=8), resume=True, progress=False)
    assert result.step == 8 and ckpt(tmp_path).step == 8
    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r.get("skipped") is None for r in records)


def test_finite_but_wrecked_weights_never_replace_the_good_checkpoint(jt, tmp_path):
    """Step 4 leaves finite but huge weights; the steps after it alternate NaN with finite losses a
    million times too large. No finite step from those weights may prove them: the spikes count as
    bad steps, refute the candidates, and the run stops naming the checkpoint of step 4."""
    run(Toy(), tmp_path, loop(max_steps=4, save_every=2), progress=False)
    seen = []
    with pytest.raises(TrainingStopped) as stopped:
        run(Toy(explode={4}, poison=range(5, 100, 2)), tmp_path, loop(max_steps=20, save_every=1), resume=True,
            progress=False, step_hook=lambda step, record: seen.append(record))
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / LAST} (step 4)" in str(stopped.value)
    assert "stopped at step 8: 3 steps in a row had a non-finite loss or gradient or a loss spike" in str(stopped.value)
    assert [r.get("skipped") or r.get("suspect") for r in seen] == [None, NON_FINITE, LOSS_SPIKE, NON_FINITE]
    assert seen[2]["loss_ratio"] > 1e6
    good = ckpt(tmp_path)
    assert good.step == 4 and np.abs(good.arrays["model/w"]).max() < 10
    assert not (tmp_path / "checkpoints" / CANDIDATE).exists()
    result = run(Toy(), tmp_path, loop(max_steps=10), resume=True, progress=False)
    assert result.step == 10 and result.bad_steps == 0


def test_half_of_the_recent_steps_bad_stops_the_run(jt, tmp_path):
    """Every other step NaN never makes max_bad_steps in a row; half of the last 4 x max_bad_steps
    steps bad stops the run all the same."""
    with pytest.raises(TrainingStopped, match=r"stopped at step 12: 6 of the last 12 steps had a non-finite"):
        run(Toy(poison=range(1, 100, 2)), tmp_path, loop(max_steps=40, save_every=2), progress=False)
    assert ckpt(tmp_path).step == 10


def test_one_outlier_loss_delays_a_checkpoint_but_does_not_stop_the_run(jt, tmp_path):
    """A single loss 1000 times the median is a spike: the candidate it would have proven is set
    aside (diverged.safetensors), the next one is proven as usual, and the run finishes."""
    seen = []
    result = run(Toy(outlier={6}), tmp_path, loop(max_steps=10, save_every=2), progress=False,
                 step_hook=lambda step, record: seen.append(record))
    assert result.step == 10 and ckpt(tmp_path).step == 10 and result.bad_steps == 0
    assert [r["step"] for r in seen if r.get("suspect") == LOSS_SPIKE] == [7]
    assert (tmp_path / "checkpoints" / DIVERGED).is_file()
    assert ckpt(tmp_path).extra["training"]["spikes"] == 1
    # With the test off nothing is set aside.
    result = run(Toy(outlier={6}), tmp_path / "off", loop(max_steps=10, save_every=2, spike_factor=0), progress=False)
    assert not (tmp_path / "off" / "checkpoints" / DIVERGED).exists()


def test_heavy_tailed_healthy_losses_raise_no_alarm(jt, tmp_path):
    """Per-batch losses of a healthy diffusion run are heavy-tailed (a batch of small timesteps
    costs many times the median). Log-normal losses (sigma 1: 10x the median about once in a
    hundred steps) over 400 steps: none may count as a spike, no candidate is set aside."""
    class Noisy(Toy):
        def step(self, step, update=True):
            values = super().step(step, update)
            return {**values, "loss": float(np.exp(step_rng(9, step).standard_normal()))}

    seen = []
    result = run(Noisy(), tmp_path, loop(max_steps=400, save_every=5), progress=False,
                 step_hook=lambda step, record: seen.append(record))
    assert result.step == 400 and ckpt(tmp_path).step == 400
    losses = np.array([r["loss"] for r in seen])
    assert (losses > 10 * np.median(losses)).sum() >= 2          # the tail is there
    assert not [r["step"] for r in seen if r.get("suspect")]
    assert not (tmp_path / "checkpoints" / DIVERGED).exists()


def test_the_first_steps_are_tested_with_a_wider_margin(jt, tmp_path):
    """With one or two good steps behind it a loss is a spike only at 100x the factor (1000x): a
    first update that wrecks the weights is caught at step 2, while a rise of a few hundred times,
    as a codebook initialised from data gives at step 2, is not."""
    with pytest.raises(TrainingStopped, match="no good checkpoint exists yet"):
        run(Toy(explode={0}), tmp_path / "wrecked", loop(max_steps=20, save_every=1), progress=False)
    seen = []
    result = run(Toy(outlier={1}), tmp_path / "rise", loop(max_steps=6, save_every=1), progress=False,
                 step_hook=lambda step, record: seen.append(record))
    assert result.step == 6 and not [r for r in seen if r.get("suspect")]


def test_no_good_checkpoint_yet_is_said_plainly(jt, tmp_path):
    with pytest.raises(TrainingStopped, match="no good checkpoint exists yet: start again with a lower --lr"):
        run(Toy(poison=range(0, 100)), tmp_path, loop(), progress=False)
    assert not (tmp_path / "checkpoints" / LAST).exists()


def test_the_stop_message_never_names_a_checkpoint_that_is_not_there(jt, tmp_path):
    """Resumed from an unproven candidate while last.safetensors is gone: when the run then
    diverges, no good checkpoint exists, and the message says so instead of naming last."""
    class Killed(Exception):
        pass

    class KilledInStep5(Toy):
        def step(self, step, update=True):
            if step == 4:
                raise Killed
            return super().step(step, update)

    with pytest.raises(Killed):
        run(KilledInStep5(), tmp_path, loop(max_steps=6), progress=False)
    (tmp_path / "checkpoints" / LAST).unlink()
    with pytest.raises(TrainingStopped) as stopped:
        run(Toy(poison=range(4, 100)), tmp_path, loop(max_steps=10), resume=True, progress=False)
    assert "no good checkpoint exists yet" in str(stopped.value) and LAST not in str(stopped.value)


def test_final_weights_are_checked_before_they_become_last(jt, tmp_path):
    with pytest.raises(TrainingStopped, match="final weights give a non-finite loss"):
        run(Toy(wreck={5}, poison=range(6, 10)), tmp_path, loop(max_steps=6, save_every=0), progress=False)
    assert not (tmp_path / "checkpoints" / LAST).exists()


def test_skipped_steps_change_nothing_and_a_finite_step_proves_the_candidate(jt, tmp_path):
    seen = []
    result = run(Toy(poison={2, 3}), tmp_path, loop(max_steps=6, save_every=2), progress=False,
                 step_hook=lambda step, record: seen.append(record))
    assert result.bad_steps == 2 and ckpt(tmp_path).step == 6
    assert [r.get("skipped") for r in seen] == [None, None, NON_FINITE, NON_FINITE, None, None]
    assert ckpt(tmp_path).extra["training"]["task"]["updates"] == 4


def test_resume_takes_an_unproven_candidate_newer_than_last(jt, tmp_path):
    straight = tmp_path / "straight"
    run(Toy(), straight, loop(max_steps=6), progress=False)

    class Killed(Exception):
        pass

    class KilledInStep5(Toy):
        def step(self, step, update=True):
            if step == 4:
                raise Killed    # step 4's candidate was written; the 5th step, which would prove it, dies
            return super().step(step, update)

    split = tmp_path / "split"
    with pytest.raises(Killed):
        run(KilledInStep5(), split, loop(max_steps=6), progress=False)
    assert ckpt(split).step == 2 and ckpt(split, CANDIDATE).step == 4
    run(Toy(), split, loop(max_steps=6), resume=True, progress=False)
    np.testing.assert_array_equal(ckpt(split).arrays["model/w"], ckpt(straight).arrays["model/w"])
    assert [r["step"] for r in read_log(split / "log.jsonl")] == list(range(1, 7))


def test_keep_every_writes_weight_snapshots_that_average(jt, tmp_path):
    from weights.average import average_checkpoints

    run(Toy(), tmp_path, loop(max_steps=6, keep_every=3), progress=False)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [LAST, "step_0000003.safetensors", "step_0000006.safetensors"]
    a, b = ckpt(tmp_path, "step_0000003.safetensors"), ckpt(tmp_path, "step_0000006.safetensors")
    assert set(a.arrays) == {"model/w", "ema/w"} and a.step == 3
    averaged, info = average_checkpoints([folder / "step_0000003.safetensors", folder / "step_0000006.safetensors"])
    np.testing.assert_allclose(averaged["w"], 0.5 * (a.arrays["ema/w"] + b.arrays["ema/w"]), rtol=1e-6)
    assert [r["step"] for r in info["extra"]["averaged_from"]] == [3, 6]


def test_stale_temporaries_are_removed_on_start(jt, tmp_path):
    run(Toy(), tmp_path, loop(max_steps=2), progress=False)
    stale = tmp_path / "checkpoints" / ".last.safetensors.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    run(Toy(), tmp_path, loop(max_steps=4), resume=True, progress=False)
    assert not stale.exists()


def test_only_temporaries_older_than_the_run_are_removed(tmp_path):
    import time

    from datasets.io import remove_stale_temporaries

    old, new, kept = tmp_path / ".a.jpg.x1.tmp", tmp_path / ".b.jpg.x2.tmp", tmp_path / "c.jpg"
    for path in (old, new, kept):
        path.write_bytes(b"x")
    now = time.time()
    os.utime(old, (now - 60, now - 60))
    assert remove_stale_temporaries(tmp_path, older_than=now - 1) == 1     # a live write of another rank stays
    assert not old.exists() and new.exists() and kept.exists()
    assert remove_stale_temporaries(tmp_path) == 1 and not new.exists() and kept.exists()
    assert remove_stale_temporaries(tmp_path / "absent") == 0


class Killed(BaseException):
    """Stands for a kill -9 in the middle of the run's writes."""


class Sampled(Toy):
    """Writes a file per sample step and is killed once while writing the samples of ``kill_at``."""

    def __init__(self, kill_at=None, **kwargs):
        super().__init__(**kwargs)
        self.kill_at = kill_at

    def write_samples(self, path, step):
        if step == self.kill_at:
            self.kill_at = None
            raise Killed()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(step))


def test_a_kill_while_sampling_cannot_leave_a_candidate_without_its_samples(jt, tmp_path):
    """The samples and kept weights of a step are written before its candidate: killed while
    sampling step 4, the run resumes from step 2 and writes step 4's samples and snapshot."""
    options = dict(max_steps=6, save_every=2, sample_every=2, keep_every=2)
    task = Sampled(kill_at=4)
    with pytest.raises(Killed):
        run(task, tmp_path, loop(**options), progress=False)
    assert ckpt(tmp_path).step == 2 and not (tmp_path / "checkpoints" / CANDIDATE).exists()
    run(Sampled(), tmp_path, loop(**options), resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"step_000000{s}.png" for s in (2, 4, 6)]
    assert (tmp_path / "checkpoints" / "step_0000004.safetensors").is_file()
    straight = tmp_path / "straight"
    run(Sampled(), straight, loop(**options), progress=False)
    for name in (LAST, "step_0000004.safetensors"):
        assert (tmp_path / "checkpoints" / name).read_bytes() == (straight / "checkpoints" / name).read_bytes()


def test_options_are_written_atomically(jt, tmp_path, monkeypatch):
    import datasets.io

    run(Toy(), tmp_path, loop(max_steps=2), progress=False)
    before = (tmp_path / "options.json").read_text()

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(datasets.io.os, "fsync", broken)
    with pytest.raises(OSError, match="options.json"):
        run(Toy(), tmp_path, loop(max_steps=4), resume=True, progress=False)
    assert (tmp_path / "options.json").read_text() == before and not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_names_the_file(jt, tmp_path, monkeypatch):
    import errno

    import datasets.io

    real_fsync = os.fsync

    def full(fd):    # the disk fills up while the candidate is written
        if CANDIDATE in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(datasets.io.os, "fsync", full)
    with pytest.raises(OSError, match=rf"{tmp_path / 'checkpoints' / CANDIDATE}: No space left on device"):
        run(Toy(), tmp_path, loop(max_steps=2), progress=False)
    monkeypatch.setattr(datasets.io.os, "fsync", real_fsync)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_a_full_disk_while_logging_names_the_log(jt, tmp_path):
    (tmp_path / "log.jsonl").symlink_to("/dev/full")      # every write to it fails with ENOSPC
    with pytest.raises(OSError, match=rf"{tmp_path / 'log.jsonl'}: No space left on device"):
        run(Toy(), tmp_path, loop(max_steps=2), progress=False)


# ------------------------------------------------------------------------------ logs
def test_log_records_are_strict_json_with_null_for_non_finite(jt, tmp_path):
    run(Toy(poison={1}), tmp_path, loop(max_steps=3), progress=False)
    text = (tmp_path / "log.jsonl").read_text()
    assert "NaN" not in text
    second = read_log(tmp_path / "log.jsonl")[1]
    assert second["loss"] is None and second["skipped"] == NON_FINITE


def test_resume_drops_a_partial_line_and_records_past_the_checkpoint(jt, tmp_path, caplog):
    import logging

    run(Toy(), tmp_path, loop(max_steps=4, save_every=4), progress=False)
    with open(tmp_path / "log.jsonl", "a") as f:         # a run killed after logging steps 5-6 and mid-line
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
        f.write('{"step": 7, "lo')
    caplog.set_level(logging.WARNING, logger="iidm")
    run(Toy(), tmp_path, loop(max_steps=6, save_every=2), resume=True, progress=False)
    assert any("dropped 3 record(s) past step 4" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 7))


def test_a_log_broken_before_its_last_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(LogError, match=rf"{path}: line 2 is not a JSON record"):
        repair_log(path, 5)
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert repair_log(path, 5) == 0 and path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ------------------------------------------------------------------------------ seeds
def test_jittor_seeds_differ_for_every_user_seed():
    seeds = [jittor_seed(s) for s in range(1000)]
    assert len(set(seeds)) == 1000 and min(seeds) >= 2

"""kill -9 at random moments: ``train.py ldm``, ``train.py autoencoder`` and ``infer.py`` are
killed again and again (at least 20 times each, anywhere: while importing, training, writing a
checkpoint, a log line, a sample or an output) and restarted as a user would (``--resume`` once a
checkpoint exists); the run that finally completes must leave exactly the files of a run that was
never interrupted, byte for byte, logs that parse as strict JSON with one record per step, and no
temporary file. Slow (minutes): run with ``-m slow``."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from test_training import write_store

REPO = Path(__file__).resolve().parents[1]
KILLS = 20                 # at least this many kills of each program
MAX_KILLS_PER_RUN = 12     # then the run is let finish (every restart would otherwise die too early)
MIN_KILLS_OF_A_KIND = 3    # kills inside a write, and kills of a resumed run, that a test must make
MAX_ROUNDS = 30            # rounds run to get there before the test gives up

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def default_sigchld():
    """Jittor, once it has run anything in this process (another test of the session), handles
    SIGCHLD by ending the process when a child dies of SIGKILL: here the kills are meant. Its
    handler is installed from C, so Python reports the default and the default is put back."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)


def launch(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "IIDM_FORCE_CPU": "1"})


def finish(args) -> float:
    """Run to the end; returns the wall time in seconds."""
    started = time.monotonic()
    proc = launch(args)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return time.monotonic() - started


def temporaries(folder: Path) -> list[Path]:
    return list(folder.rglob(".*.tmp")) if folder.is_dir() else []


def wait_for_writes(proc, folder: Path, count: int) -> None:
    """Return once the ``count``-th write of this life is in progress under ``folder`` (its
    temporary file shows), or ``proc`` ended."""
    seen: set[str] = set()
    while proc.poll() is None:
        seen.update(path.name for path in temporaries(folder))
        if len(seen) >= count:
            return
        time.sleep(0.0002)


@dataclass
class Kills:
    total: int = 0
    mid_write: int = 0      # kills that left a write unfinished (its temporary file behind)
    resumed: int = 0        # kills of a life that had resumed from a checkpoint (or found outputs)


def kill_until_done(first, restart, rng, longest, watch: Path, kills: Kills, writes: int) -> None:
    """Run ``first`` (then ``restart()``'s command after each kill) until one life finishes. Each
    life is killed after a random delay in [0.2, ``longest``] s, or (one life in two) in the middle
    of its k-th write under ``watch``, k uniform in 1..``writes``: the moment the atomic writes
    exist for, spread over the run whatever the machine's speed."""
    args, lives = first, 0
    while True:
        proc = launch(args)
        resumed = args is not first
        if lives >= MAX_KILLS_PER_RUN:
            proc.wait(timeout=900)
        elif rng.random() < 0.5:
            wait_for_writes(proc, watch, int(rng.integers(1, writes + 1)))
        else:
            try:
                proc.wait(timeout=float(rng.uniform(0.2, longest)))
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            lives += 1
            kills.total += 1
            kills.mid_write += bool(temporaries(watch))
            kills.resumed += resumed
            args = restart()
            continue
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        return


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_training_runs_agree(straight: Path, killed: Path):
    from training.logs import read_log

    a, b = files(straight), files(killed)
    assert not [n for n in b if n.endswith(".tmp")], "temporary files left behind"
    logs = {name: read_log(folder / "log.jsonl") for name, folder in (("straight", straight), ("killed", killed))}
    assert [r["step"] for r in logs["killed"]] == [r["step"] for r in logs["straight"]]
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in logs["killed"]]
    assert drop_time == [{k: v for k, v in r.items() if k != "seconds"} for r in logs["straight"]]
    a.pop("log.jsonl"), b.pop("log.jsonl")
    assert sorted(b) == sorted(a)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files that differ from the uninterrupted run: {different}"


def kill_training(tmp_path, common, seed) -> Kills:
    """Uninterrupted run, then rounds of killed runs (each checked against it) until KILLS kills."""
    straight = tmp_path / "straight"
    longest = 1.2 * finish(common + ["--output_path", str(straight)])
    rng = np.random.default_rng(seed)
    kills, round_ = Kills(), 0
    while not enough(kills) and round_ < MAX_ROUNDS:
        out = tmp_path / f"killed{round_}"
        args = common + ["--output_path", str(out)]

        def restart():
            folder = out / "checkpoints"
            started = (folder / "last.safetensors").exists() or (folder / "candidate.safetensors").exists()
            return args + ["--resume"] if started else args

        kill_until_done(args, restart, rng, longest, out / "checkpoints", kills, writes=6)
        check_training_runs_agree(straight, out)
        shutil.rmtree(out)
        round_ += 1
    print(f"{kills} over {round_} rounds, the uninterrupted run {longest / 1.2:.1f} s")
    return kills


def enough(kills: Kills) -> bool:
    """The kills are random, so rounds go on until they include enough of each kind."""
    return (kills.total >= KILLS and kills.mid_write >= MIN_KILLS_OF_A_KIND
            and kills.resumed >= MIN_KILLS_OF_A_KIND)


def check_kills(kills: Kills) -> None:
    assert kills.total >= KILLS
    assert kills.mid_write >= MIN_KILLS_OF_A_KIND, f"too few kills landed in a write: {kills}"
    assert kills.resumed >= MIN_KILLS_OF_A_KIND, f"too few kills of resumed runs: {kills}"


def test_kill_train_ldm(tmp_path):
    store = write_store(tmp_path / "store")
    common = ["train.py", "ldm", "--latents", str(store), "--preset", "tiny", "--batch_size", "2", "--lr", "1e-3",
              "--max_steps", "8", "--save_every", "2", "--keep_every", "4", "--sample_every", "0", "--seed", "3",
              "--cpu"]
    check_kills(kill_training(tmp_path, common, seed=1))


def test_kill_train_autoencoder(tmp_path):
    from datasets.synthetic import write_dataset

    write_dataset(tmp_path / "data", 4, 24, 32, seed=0, n_test=1)
    common = ["train.py", "autoencoder", "--data", str(tmp_path / "data" / "train"), "--preset", "tiny",
              "--height", "24", "--width", "32", "--batch_size", "2", "--lr", "1e-3", "--disc_start", "2",
              "--max_steps", "8", "--save_every", "2", "--keep_every", "4", "--sample_every", "4", "--seed", "3",
              "--cpu"]
    check_kills(kill_training(tmp_path, common, seed=2))


MODELS_SCRIPT = """
import sys
from pathlib import Path

import numpy as np

import jittor_env

jt = jittor_env.setup(force_cpu=True)
from autoencoder.vqmodel import VQModel, save_vqmodel, vq_config
from models import UNetModel, unet_preset
from models.unet import PRESET_DIFFUSION
from weights.checkpoint import module_arrays, save_checkpoint

folder = Path(sys.argv[1])
jt.set_global_seed(0)
config = unet_preset("tiny")
arrays = module_arrays(UNetModel(config))
rng = np.random.default_rng(0)
# the zero-initialised last layer made random, so the network's output is not zero
arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("out.") else v
          for k, v in arrays.items()}
save_checkpoint(folder / "unet.safetensors", arrays, kind="unet",
                config={"network": config.to_dict(), "diffusion": PRESET_DIFFUSION["iidm"]})
save_vqmodel(VQModel(vq_config("tiny")), folder / "vq.safetensors")
"""


def test_kill_infer(tmp_path):
    # Jittor is kept out of this process: it takes SIGCHLD, and a killed child would end the test.
    from datasets.synthetic import write_dataset

    finish(["-c", MODELS_SCRIPT, str(tmp_path)])
    write_dataset(tmp_path / "data", 3, 16, 24, seed=0, n_test=8)
    common = ["infer.py", "--input_path", str(tmp_path / "data" / "test" / "labels"),
              "--img_path", str(tmp_path / "data" / "train"), "--ckpt", str(tmp_path / "unet.safetensors"),
              "--vq", str(tmp_path / "vq.safetensors"), "--preset", "fast", "--steps", "2", "--batch_size", "1",
              "--save_rounds", "--cpu"]
    straight = tmp_path / "straight"
    longest = 1.2 * finish(common + ["--output_path", str(straight)])
    expected = files(straight)
    assert len([n for n in expected if n.endswith(".jpg") and "/" not in n]) == 8
    rng = np.random.default_rng(3)
    kills, round_ = Kills(), 0
    while not enough(kills) and round_ < MAX_ROUNDS:
        out = tmp_path / f"killed{round_}"
        args = common + ["--output_path", str(out)]
        kill_until_done(args, lambda: [*args], rng, longest, out, kills, writes=16)
        got = files(out)
        assert not [n for n in got if n.endswith(".tmp")], "temporary files left behind"
        assert sorted(got) == sorted(expected)
        assert not [n for n in expected if got[n] != expected[n]], "outputs differ from the uninterrupted run"
        shutil.rmtree(out)
        round_ += 1
    print(f"{kills} over {round_} rounds, the uninterrupted run {longest / 1.2:.1f} s")
    check_kills(kills)

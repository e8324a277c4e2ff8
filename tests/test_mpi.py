"""Two MPI ranks for real (``mpirun -np 2``, OpenMPI), on the CPU with tiny models:

* ``train.py ldm``: ``--batch_size`` is the global batch; the ranks split it and average their
  gradients, so two ranks of 2 samples each (``--batch_size 4``) train the same weights as one
  process at twice a rank's batch (4), the log holds the whole batch's mean loss, and only rank 0
  writes;
* ``infer.py``: each rank generates its share of the masks, and the outputs are those of one
  process.

Skipped only when ``mpirun`` is absent (Debian: ``apt-get install openmpi-bin libopenmpi-dev``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_training import read, write_store

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 16, 24  # the tiny VQ (f = 4) times the tiny U-Net (2 levels): multiples of 8

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="needs OpenMPI's mpirun (apt-get install openmpi-bin libopenmpi-dev)")


def mpirun(args, timeout=600):
    """Run ``mpirun -np 2 python ARGS`` from the repository root; returns the completed process."""
    command = ["mpirun", "-np", "2", "--oversubscribe", sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k != "use_mpi"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_two_ranks_train_like_one_process_with_the_whole_batch(jt, tmp_path):
    import train as train_cli

    store = write_store(tmp_path / "store")
    common = ["ldm", "--latents", str(store), "--preset", "tiny", "--batch_size", "4", "--max_steps", "2",
              "--save_every", "2", "--sample_every", "0", "--mask_dropout", "0", "--lr", "1e-3", "--cpu"]
    done = mpirun(["train.py", *common, "--output_path", str(tmp_path / "two")])
    assert "2 ranks" in done.stdout + done.stderr
    assert done.stdout.count("trained to step") == 1, done.stdout     # one rank reports the run
    assert train_cli.main(common + ["--output_path", str(tmp_path / "one")]) == 0

    two_log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    one_log = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two_log] == [1, 2]          # one writer, not two
    assert [r.get("updates") for r in two_log] == [1, 2]   # both steps applied an update
    for a, b in zip(two_log, one_log):                      # the mean loss over the same global batch
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    two, info = read(tmp_path / "two" / "checkpoints" / "last.safetensors")
    one, _ = read(tmp_path / "one" / "checkpoints" / "last.safetensors")
    assert info["extra"]["step"] == 2 and set(two) == set(one)
    for name in one:
        if name.startswith("model/"):
            np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)


def write_models(folder: Path, jt):
    """Tiny random U-Net and VQ checkpoints (the U-Net's last layer made non-zero)."""
    from autoencoder.vqmodel import VQModel, save_vqmodel, vq_config
    from models import UNetModel, unet_preset
    from models.unet import PRESET_DIFFUSION
    from weights.checkpoint import module_arrays, save_checkpoint

    jt.set_global_seed(0)
    config = unet_preset("tiny")
    rng = np.random.default_rng(0)
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("out.") else v
              for k, v in module_arrays(UNetModel(config)).items()}
    save_checkpoint(folder / "unet.safetensors", arrays, kind="unet",
                    config={"network": config.to_dict(), "diffusion": PRESET_DIFFUSION["iidm"]})
    save_vqmodel(VQModel(vq_config("tiny")), folder / "vq.safetensors")
    return folder / "unet.safetensors", folder / "vq.safetensors"


def test_two_ranks_generate_their_shares_as_one_process_would(jt, tmp_path):
    import infer
    from datasets.synthetic import write_dataset

    unet, vq = write_models(tmp_path, jt)
    write_dataset(tmp_path / "data", 3, HEIGHT, WIDTH, seed=0, n_test=3)
    common = ["--input_path", str(tmp_path / "data" / "test" / "labels"), "--img_path", str(tmp_path / "data" / "train"),
              "--ckpt", str(unet), "--vq", str(vq), "--cpu", "--preset", "fast", "--steps", "2", "--batch_size", "2"]
    done = mpirun(["infer.py", *common, "--output_path", str(tmp_path / "two")])
    text = done.stdout + done.stderr
    assert "[rank 0/2]" in text and "[rank 1/2]" in text
    assert infer.main(common + ["--output_path", str(tmp_path / "one")]) == 0

    names = ["00003.jpg", "00004.jpg", "00005.jpg"]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.jpg")) == names
    assert sorted(p.name for p in (tmp_path / "one").glob("*.jpg")) == names
    for name in names:
        with Image.open(tmp_path / "two" / name) as a, Image.open(tmp_path / "one" / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

"""The CUDA path against the CPU on the same weights (``python -m pytest -m cuda``; skipped,
with the reason, where Jittor would not use a GPU).

* the 501.5 M-parameter ``iidm`` U-Net and the ``vq-f4`` autoencoder: one forward on CUDA equals
  the CPU's (oneDNN) on the same random weights and inputs, at a reduced latent (48x64, the
  architecture unchanged);
* one ``train.py ldm`` step in float32 on CUDA gives the CPU's loss, gradient norm and weights;
* ``--fp16`` trains: its first loss is the float32 loss of the same batch, its updates are finite
  and its loss scale is logged.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_training import read, write_store

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]


def on_cpu(jt, fn):
    """``fn()`` evaluated with Jittor's CPU backend (the variables stay shared)."""
    with jt.flag_scope(use_cuda=0):
        return fn()


def relative_error(got, expected):
    return float(np.abs(got.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-12))


def test_iidm_unet_forward_cuda_equals_cpu(jt):
    from models import UNetModel, unet_preset

    assert jt.flags.use_cuda == 1
    jt.set_global_seed(0)
    unet = UNetModel(unet_preset("iidm"))
    unet.eval()
    rng = np.random.default_rng(0)
    for p in unet.parameters():                  # the zero-initialised layers made random
        if not np.abs(p.numpy()).any():
            p.update(jt.array(0.02 * rng.standard_normal(p.shape).astype(np.float32)))
    height, width = 48, 64
    x = rng.standard_normal((2, 3, height, width)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    labels = rng.integers(0, 29, (2, height, width))
    mask = np.eye(29, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    mask[1] = 0.0                                # the null mask of classifier-free guidance

    def forward():
        with jt.no_grad():
            return unet(jt.array(x), jt.array(t), jt.array(mask)).numpy()

    gpu = forward()
    cpu = on_cpu(jt, forward).astype(np.float64)
    assert gpu.shape == (2, 6, height, width) and np.isfinite(gpu).all()
    assert np.abs(cpu).max() > 1e-3               # a real output, not zeros on both sides
    assert relative_error(gpu, cpu) < 1e-3


def test_vq_f4_encode_decode_cuda_equals_cpu(jt):
    from autoencoder.vqmodel import VQModel, vq_config

    jt.set_global_seed(0)
    vq = VQModel(vq_config("vq-f4"))
    vq.eval()
    image = np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 96)).astype(np.float32)

    def encode():
        with jt.no_grad():
            return vq.encode(jt.array(image)).numpy()

    latent_gpu, latent_cpu = encode(), on_cpu(jt, encode).astype(np.float64)
    assert latent_gpu.shape == (2, 3, 16, 24)
    assert relative_error(latent_gpu, latent_cpu) < 1e-4

    def decode():
        with jt.no_grad():
            # The quantizer picks the nearest code: decode one latent on both backends.
            return vq.decode(jt.array(latent_cpu.astype(np.float32))).numpy()

    decoded_gpu, decoded_cpu = decode(), on_cpu(jt, decode).astype(np.float64)
    assert decoded_gpu.shape == image.shape
    assert relative_error(decoded_gpu, decoded_cpu) < 1e-4


def train_args(store, out, steps):
    return ["ldm", "--latents", str(store), "--preset", "tiny", "--batch_size", "2", "--max_steps", str(steps),
            "--save_every", str(steps), "--sample_every", "0", "--output_path", str(out)]


def log_of(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One float32 step of the tiny preset on the CPU, in a process of its own."""
    root = tmp_path_factory.mktemp("cuda_training")
    store = write_store(root / "store")
    done = subprocess.run([sys.executable, "train.py", *train_args(store, root / "cpu", 1), "--cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "IIDM_FORCE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return store, root / "cpu"


def test_one_fp32_training_step_cuda_equals_cpu(jt, cpu_run, tmp_path):
    import train as train_cli

    store, cpu = cpu_run
    assert train_cli.main(train_args(store, tmp_path / "cuda", 1)) == 0
    (a,), (b,) = log_of(tmp_path / "cuda"), log_of(cpu)
    assert a.get("skipped") is None and a["updates"] == 1
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3)
    gpu_weights, _ = read(tmp_path / "cuda" / "checkpoints" / "last.safetensors")
    cpu_weights, _ = read(cpu / "checkpoints" / "last.safetensors")
    for name in cpu_weights:
        if name.startswith("model/"):
            # Adam's first step moves each weight by about lr * sign(gradient): 1e-4.
            np.testing.assert_allclose(gpu_weights[name], cpu_weights[name], atol=2.5e-4, err_msg=name)


def test_fp16_training_steps_are_finite_and_match_fp32(jt, cpu_run, tmp_path):
    import train as train_cli

    store, cpu = cpu_run
    assert train_cli.main(train_args(store, tmp_path / "fp16", 4) + ["--fp16"]) == 0
    records = log_of(tmp_path / "fp16")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose(records[0]["loss"], log_of(cpu)[0]["loss"], rtol=2e-2)
    applied = [r for r in records if r.get("skipped") is None]
    assert applied, "every fp16 step overflowed"
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and "lg_loss_scale" in r for r in applied)
    weights, info = read(tmp_path / "fp16" / "checkpoints" / "last.safetensors")
    assert info["config"]["train"]["fp16"] is True
    assert all(np.isfinite(v).all() for k, v in weights.items() if k.startswith("model/"))

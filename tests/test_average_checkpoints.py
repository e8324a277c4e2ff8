"""Checkpoint averaging: exact weighted means computed here in float64, dtypes kept, training
checkpoints' EMA or raw weights, and every mismatch named."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weights.checkpoint import WeightsError, read_checkpoint, save_checkpoint
from tools.average_checkpoints import main
from weights.average import average_arrays, average_checkpoints

REPO = Path(__file__).resolve().parents[1]
DIFFUSION = {"schedule": {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
             "space": "latent", "latent_scale": 1.0}
CONFIG = {"network": {"in_channels": 3, "model_channels": 8}, "diffusion": DIFFUSION}


def arrays(seed):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "b.bias": rng.standard_normal(5).astype(np.float16),
            "c.double": rng.standard_normal((2, 2)),
            "steps": np.array([7, 8], np.int64)}


def mean64(values, factors):
    return sum(f * v.astype(np.float64) for f, v in zip(factors, values))


def write(path, state, kind="unet", config=CONFIG, extra=None):
    save_checkpoint(path, state, kind=kind, config=config, extra=extra or {})
    return path


def test_two_checkpoints_average_to_the_exact_mean(tmp_path):
    a, b = arrays(0), arrays(1)
    out = tmp_path / "avg.safetensors"
    assert main([str(write(tmp_path / "a.safetensors", a)), str(write(tmp_path / "b.safetensors", b)),
                 "--out", str(out)]) == 0
    avg, info = read_checkpoint(out)
    assert info["kind"] == "unet" and info["config"] == CONFIG
    for name in ("a.weight", "b.bias"):
        assert avg[name].dtype == a[name].dtype
        np.testing.assert_array_equal(avg[name], mean64([a[name], b[name]], [0.5, 0.5]).astype(a[name].dtype))
    # float64 weights: the float64 arithmetic is exact only to its own rounding
    assert avg["c.double"].dtype == np.float64
    np.testing.assert_allclose(avg["c.double"], (a["c.double"] + b["c.double"]) / 2, rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(avg["steps"], a["steps"])
    assert avg["steps"].dtype == np.int64
    sources = info["extra"]["averaged_from"]
    assert [Path(s["path"]).name for s in sources] == ["a.safetensors", "b.safetensors"]
    assert [s["coefficient"] for s in sources] == [0.5, 0.5]


def test_coefficients_and_identical_inputs():
    a, b, c = arrays(2), arrays(3), arrays(4)
    avg = average_arrays([a, b, c], [1, 3, 0])
    for name in ("a.weight", "b.bias"):
        np.testing.assert_array_equal(avg[name], mean64([a[name], b[name]], [0.25, 0.75]).astype(a[name].dtype))
    np.testing.assert_allclose(avg["c.double"], 0.25 * a["c.double"] + 0.75 * b["c.double"], rtol=1e-15, atol=1e-15)
    same = average_arrays([a, a, a])
    for name in a:
        np.testing.assert_array_equal(same[name], a[name])
    with pytest.raises(ValueError, match="3 checkpoint\\(s\\) but 2 coefficient"):
        average_arrays([a, b, c], [1, 2])
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        average_arrays([a, b], [0, 0])


def test_training_checkpoints_ema_or_model(tmp_path):
    ema, raw = arrays(5), arrays(6)
    train = {**{f"ema/{k}": v for k, v in ema.items()}, **{f"model/{k}": v for k, v in raw.items()},
             "optim/m.a.weight": np.zeros((4, 3), np.float32)}
    a = write(tmp_path / "a.safetensors", train, kind="unet-train", extra={"step": 100})
    b = write(tmp_path / "b.safetensors", arrays(7))
    for which, source in (("ema", ema), ("model", raw)):
        avg, info = average_checkpoints([a, b], which=which)
        assert info["kind"] == "unet" and set(avg) == set(ema)
        np.testing.assert_array_equal(
            avg["a.weight"], mean64([source["a.weight"], arrays(7)["a.weight"]], [0.5, 0.5]).astype(np.float32))
        assert info["extra"]["averaged_from"][0] == {"path": str(a), "kind": "unet-train", "weights": which,
                                                     "step": 100, "coefficient": 0.5}
    out = tmp_path / "avg.safetensors"
    assert main([str(a), str(b), "--weights", "model", "--coefficients", "3", "1", "--out", str(out)]) == 0
    avg, info = read_checkpoint(out)
    np.testing.assert_allclose(
        avg["c.double"], mean64([raw["c.double"], arrays(7)["c.double"]], [0.75, 0.25]), rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(
        avg["a.weight"], mean64([raw["a.weight"], arrays(7)["a.weight"]], [0.75, 0.25]).astype(np.float32))
    assert [s["coefficient"] for s in info["extra"]["averaged_from"]] == [0.75, 0.25]


def test_mismatches_name_the_key(tmp_path, capsys):
    a = arrays(0)
    bad_shape = {**a, "a.weight": np.zeros((3, 4), np.float32)}
    with pytest.raises(WeightsError, match=r"a.weight: shape \(4, 3\) in x but \(3, 4\) in y"):
        average_arrays([a, bad_shape], sources=["x", "y"])
    missing = {k: v for k, v in a.items() if k != "b.bias"}
    with pytest.raises(WeightsError, match="y does not have the same weights as x: lacks b.bias"):
        average_arrays([a, missing], sources=["x", "y"])
    with pytest.raises(WeightsError, match="has extra z.extra"):
        average_arrays([a, {**a, "z.extra": np.zeros(1)}], sources=["x", "y"])
    with pytest.raises(WeightsError, match="c.double: dtype float64 in x but int64 in y"):
        average_arrays([a, {**a, "c.double": a["c.double"].astype(np.int64)}], sources=["x", "y"])
    with pytest.raises(WeightsError, match="steps: int64 array differs"):
        average_arrays([a, {**a, "steps": np.array([1, 2], np.int64)}], sources=["x", "y"])
    # the command line names the key and the files, and exits non-zero
    p = write(tmp_path / "p.safetensors", a)
    q = write(tmp_path / "q.safetensors", bad_shape)
    assert main([str(p), str(q), "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "a.weight" in err and "q.safetensors" in err
    assert not (tmp_path / "o.safetensors").exists()
    r = write(tmp_path / "r.safetensors", a, config={**CONFIG, "network": {"in_channels": 3, "model_channels": 16}})
    with pytest.raises(WeightsError, match="differ in network.model_channels"):
        average_checkpoints([p, r])
    s = write(tmp_path / "s.safetensors", a, kind="vqmodel")
    with pytest.raises(WeightsError, match="holds a 'vqmodel' network"):
        average_checkpoints([p, s])


def test_runs_as_a_script(tmp_path):
    a = write(tmp_path / "a.safetensors", arrays(0))
    b = write(tmp_path / "b.safetensors", arrays(1))
    out = tmp_path / "c.safetensors"
    done = subprocess.run([sys.executable, "-m", "tools.average_checkpoints", str(a), str(b), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "a.safetensors x 0.5" in done.stdout
    avg, _ = read_checkpoint(out)
    np.testing.assert_array_equal(
        avg["a.weight"], mean64([arrays(0)["a.weight"], arrays(1)["a.weight"]], [0.5, 0.5]).astype(np.float32))


def test_float_precisions_mix_into_the_widest():
    """A float16 release averaged with a float32 snapshot: float32, each input's exact value
    weighted (the float16 values widen exactly), computed independently here in float64."""
    rng = np.random.default_rng(7)
    half = rng.standard_normal((5, 4)).astype(np.float16)
    single = rng.standard_normal((5, 4)).astype(np.float32)
    avg = average_arrays([{"w": half}, {"w": single}], [1, 3])["w"]
    assert avg.dtype == np.float32
    expected = 0.25 * half.astype(np.float64) + 0.75 * single.astype(np.float64)
    np.testing.assert_allclose(avg, expected.astype(np.float32), rtol=0, atol=1e-6)

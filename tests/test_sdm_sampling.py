"""SDM presets against its flags, the guided learned-variance step against SDM's formulas in
float64 numpy, and sample_sdm.py end to end on a tiny pixel-space network."""

import json

import numpy as np
import pytest

import jittor_env
from ldm.diffusion import p_mean_variance
from ldm.guidance import classifier_free_guidance
from ldm.samplers import ddpm_step
from ldm.schedule import ScheduleConfig, make_schedule

jt = jittor_env.setup(force_cpu=True)


@pytest.mark.parametrize("name", ["cityscapes", "ade20k", "celeba", "coco"])
def test_presets_equal_sdm_flags(name):
    from models import unet_preset
    from synthesis.sdm import REPO, SDM_MODELS
    from weights.upstream import disagreements, read_config

    model = SDM_MODELS[name]
    config = read_config(REPO / model.flags)
    assert disagreements("unet", config.network, unet_preset(model.preset).to_dict()) == []
    assert config.diffusion["space"] == "pixel"
    assert model.guidance == {"cityscapes": 2.0}.get(name, 1.5)


def sdm_step_numpy(out_mask, out_null, x, t, s, noise):
    """SDM's guided p_sample at timestep t of linear T=1000, float64: eps mixed on the image
    channels, learned-range variance from the masked pass, x0 clipped to [-1, 1]."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    c = x.shape[1]
    eps = out_null[:, :c] + s * (out_mask[:, :c] - out_null[:, :c])
    frac = (out_mask[:, c:] + 1) / 2
    log_var = frac * np.log(betas[t]) + (1 - frac) * post_log[t]
    x0 = np.clip(np.sqrt(1 / abar[t]) * x - np.sqrt(1 / abar[t] - 1) * eps, -1, 1)
    mean = (betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t]) * x0
            + (1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - abar[t]) * x)
    return mean + np.exp(0.5 * log_var) * noise


def test_guided_learned_variance_step_matches_sdm_formulas():
    rng = np.random.default_rng(0)
    b, c, h, w, k = 2, 3, 4, 4, 5
    weights = rng.normal(0, 0.5, (2 * c, c + k))

    def unet(x_t, t, mask):
        """Closed-form stand-in: a fixed linear map of [x_t, mask] per pixel, tanh on the v half."""
        z = jt.concat([x_t, mask], dim=1)
        out = jt.array(weights.astype(np.float32)).reshape(1, 2 * c, c + k, 1, 1) * z.unsqueeze(1)
        out = out.sum(dim=2)
        return jt.concat([out[:, :c], jt.tanh(out[:, c:])], dim=1)

    def unet_np(x, mask):
        out = np.einsum("oi,bihw->bohw", weights, np.concatenate([x, mask], 1))
        return np.concatenate([out[:, :c], np.tanh(out[:, c:])], 1)

    x = rng.normal(size=(b, c, h, w))
    mask = (rng.random((b, k, h, w)) < 0.3).astype(np.float64)
    noise = rng.normal(size=(b, c, h, w))
    schedule = make_schedule(ScheduleConfig())
    for t, s in ((500, 1.5), (3, 2.0), (800, 1.0)):
        model_fn = classifier_free_guidance(unet, jt.array(mask.astype(np.float32)), s)
        x_var = jt.array(x.astype(np.float32))
        out = model_fn(x_var, jt.full((b,), t, dtype="int32"))
        got = ddpm_step(schedule, out, x_var, t, jt.array(noise.astype(np.float32)), clip_denoised=True).numpy()
        expected = sdm_step_numpy(unet_np(x, mask), unet_np(x, np.zeros_like(mask)), x, t, s, noise)
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
        pmv = p_mean_variance(schedule, out, x_var, t, clip_denoised=True)
        assert pmv.log_variance.shape == [b, c, h, w]


@pytest.fixture(scope="module")
def tiny_sdm(tmp_path_factory):
    from models import UNetModel, unet_preset
    from weights.checkpoint import module_arrays, save_checkpoint

    folder = tmp_path_factory.mktemp("sdm")
    jt.set_global_seed(0)
    config = unet_preset("tiny")
    rng = np.random.default_rng(0)
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype) if k.startswith("out.") else v
              for k, v in module_arrays(UNetModel(config)).items()}
    path = folder / "unet.safetensors"
    save_checkpoint(path, arrays, kind="unet",
                    config={"network": config.to_dict(), "dataset": "landscape", "size": {"height": 8, "width": 8},
                            "diffusion": {"schedule": {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                                       "beta_end": 0.02}, "space": "pixel"}})
    return path


def test_sample_sdm_writes_resumes_and_ignores_batching(tiny_sdm, tmp_path):
    import sample_sdm
    from datasets.io import load_image

    common = ["--ckpt", str(tiny_sdm), "--sampler", "ddim", "--steps", "3", "--num_samples", "2", "--limit", "2",
              "--cpu"]
    assert sample_sdm.main(common + ["--output_path", str(tmp_path / "a"), "--batch_size", "4"]) == 0
    assert sample_sdm.main(common + ["--output_path", str(tmp_path / "b"), "--batch_size", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == ["sheet.png", "synthetic00_0.png", "synthetic00_1.png", "synthetic01_0.png", "synthetic01_1.png"]
    for name in names[1:]:
        np.testing.assert_array_equal(load_image(tmp_path / "a" / name), load_image(tmp_path / "b" / name))
    assert not np.array_equal(load_image(tmp_path / "a" / names[1]), load_image(tmp_path / "a" / names[2]))
    run = json.loads((tmp_path / "a" / "sdm.json").read_text())
    assert run["dataset"] == "landscape" and run["guidance"] == 1.5 and (run["height"], run["width"]) == (8, 8)
    (tmp_path / "a" / "synthetic01_1.png").unlink()
    stamp = (tmp_path / "a" / "synthetic00_0.png").stat().st_mtime_ns
    assert sample_sdm.main(common + ["--output_path", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "synthetic00_0.png").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(load_image(tmp_path / "a" / "synthetic01_1.png"),
                                  load_image(tmp_path / "b" / "synthetic01_1.png"))


def test_sample_sdm_options_fail_before_loading(tmp_path, capsys):
    import sample_sdm

    for argv, message in ((["--num_samples", "0"], "--num_samples must be >= 1"),
                          (["--data", str(tmp_path), "--label", str(tmp_path)], "not both"),
                          (["--model", str(tmp_path / "none.safetensors")], "not found")):
        with pytest.raises(SystemExit) as exit_info:
            sample_sdm.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sampler_timesteps():
    from synthesis.sdm import sample_timesteps

    schedule = make_schedule(ScheduleConfig())
    assert sample_timesteps(schedule, "ddpm", 1000) == list(range(999, -1, -1))
    assert sample_timesteps(schedule, "ddim", 4) == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_timesteps(schedule, "euler", 10)


def test_shipped_demo_samples(tmp_path):
    """The embedded default: the shipped checkpoint, synthetic masks, nothing else given."""
    import sample_sdm
    from datasets.io import load_image
    from synthesis.sdm import DEMO_CHECKPOINT

    assert DEMO_CHECKPOINT.is_file() and DEMO_CHECKPOINT.stat().st_size < 10 * 2 ** 20
    out = tmp_path / "demo"
    assert sample_sdm.main(["--sampler", "ddim", "--steps", "3", "--num_samples", "2", "--limit", "1",
                            "--output_path", str(out), "--cpu"]) == 0
    images = [load_image(out / f"synthetic00_{k}.png") for k in range(2)]
    assert images[0].shape == (32, 32, 3) and images[0].std() > 0
    assert not np.array_equal(images[0], images[1])


def test_score_sdm_on_sampled_folder(tiny_sdm, tmp_path):
    import sample_sdm
    from datasets.io import load_image
    from tools import score_sdm

    out = tmp_path / "run"
    assert sample_sdm.main(["--ckpt", str(tiny_sdm), "--sampler", "ddim", "--steps", "3", "--num_samples", "3",
                            "--limit", "2", "--output_path", str(out), "--cpu"]) == 0
    assert score_sdm.main(["--results", str(out), "--cpu"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    expected = []
    for name in ("synthetic00", "synthetic01"):
        images = [load_image(out / f"{name}_{k}.png").astype(np.float64) for k in range(3)]
        expected.append(np.mean([np.abs(images[a] - images[b]).mean() for a, b in ((0, 1), (0, 2), (1, 2))]))
    assert scores["pixel_diversity"] == pytest.approx(np.mean(expected))
    assert set(scores["skipped"]) == {"lpips_diversity", "miou", "fid"}
    (out / "synthetic01_2.png").unlink()
    assert score_sdm.main(["--results", str(out), "--cpu"]) == 1
    # A cut run description is one line and exit 1, not a traceback; the library takes metric
    # weights in their pairs as the command does.
    from scoring.sdm_evaluation import SampledRun, score_sdm_results

    sampled = SampledRun.read(out)
    with pytest.raises(ValueError, match="inception and real go together"):
        score_sdm_results(sampled, inception=out / "weights.pth")
    with pytest.raises(ValueError, match="lpips_alex and lpips_heads go together"):
        score_sdm_results(sampled, lpips_alex=out / "alex.pth")
    (out / "sdm.json").write_text((out / "sdm.json").read_text()[:20])
    assert score_sdm.main(["--results", str(out), "--cpu"]) == 1

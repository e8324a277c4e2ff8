"""bench/ablation.py without a model: its rows differ only in what the IIDM paper ablates, and its
pixel errors against ground truth (MAE, PSNR, SSIM) match computations written here."""

import numpy as np
import pytest
from PIL import Image

from bench.ablation import pixel_errors, row_rounds
from datasets import load_image
from ldm.pipeline import fast_rounds
from ldm.schedule import make_schedule


@pytest.fixture(scope="module")
def sched():
    return make_schedule()


def test_rows_use_the_fast_preset(sched):
    rows = row_rounds(sched)
    fast = fast_rounds(sched)
    assert rows["+ colour transfer"] == fast
    assert rows["img2img"] == fast[:1]
    assert rows["+ refinement"][0] == fast[0]
    for plain, full in zip(rows["+ refinement"][1:], fast[1:]):
        assert not plain.color_transfer and full.color_transfer
        assert (plain.stage, plain.sampler, plain.guidance_scale, plain.start) == \
            (full.stage, full.sampler, full.guidance_scale, full.start)
    (noise,) = rows["pure-noise"]
    assert noise.start == "noise" and noise.stage.start_level == 999
    # round 0's solver, steps, guidance and grid (logSNR, same end), from T - 1
    assert (noise.sampler, noise.stage.num_steps, noise.guidance_scale) == \
        (fast[0].sampler, fast[0].stage.num_steps, fast[0].guidance_scale)
    assert noise.stage.timesteps[0] == 999 and noise.stage.timesteps[-1] == fast[0].stage.timesteps[-1] == 4
    assert [r.stage.num_steps for r in row_rounds(sched, 5)["+ colour transfer"]] == [5, 5, 5]
    assert row_rounds(sched, 5)["pure-noise"][0].stage.num_steps == 5


def _ssim_channel(a, b, window=7, data_range=255.0):
    """Wang et al. 2004 SSIM with a uniform window, sample (co)variances, mean over the windows
    that fit inside the image."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    wa = np.lib.stride_tricks.sliding_window_view(a, (window, window)).reshape(-1, window * window)
    wb = np.lib.stride_tricks.sliding_window_view(b, (window, window)).reshape(-1, window * window)
    ma, mb = wa.mean(1), wb.mean(1)
    va, vb = wa.var(1, ddof=1), wb.var(1, ddof=1)
    cov = ((wa - ma[:, None]) * (wb - mb[:, None])).sum(1) / (window * window - 1)
    return np.mean((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))


def test_pixel_errors(tmp_path):
    rng = np.random.default_rng(0)
    names = ["a", "b"]
    for folder in ("ours", "truth"):
        (tmp_path / folder).mkdir()
    for name in names:
        truth = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        ours = np.clip(truth.astype(int) + rng.integers(-40, 41, truth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(truth).save(tmp_path / "truth" / f"{name}.jpg", quality=95)
        Image.fromarray(ours).save(tmp_path / "ours" / f"{name}.jpg", quality=95)
    mae, psnr, ssim = pixel_errors(tmp_path / "ours", tmp_path / "truth", names)
    expected = {"mae": [], "psnr": [], "ssim": []}
    for name in names:
        ours = load_image(tmp_path / "ours" / f"{name}.jpg").astype(np.float64)
        truth = load_image(tmp_path / "truth" / f"{name}.jpg").astype(np.float64)
        expected["mae"].append(np.abs(ours - truth).mean())
        expected["psnr"].append(10 * np.log10(255.0 ** 2 / ((ours - truth) ** 2).mean()))
        expected["ssim"].append(np.mean([_ssim_channel(ours[..., c], truth[..., c]) for c in range(3)]))
    assert mae == pytest.approx(np.mean(expected["mae"]), rel=1e-12)
    assert psnr == pytest.approx(np.mean(expected["psnr"]), rel=1e-12)
    assert ssim == pytest.approx(np.mean(expected["ssim"]), rel=1e-9)
    assert 0.0 < ssim < 0.99
    same = pixel_errors(tmp_path / "truth", tmp_path / "truth", names)
    assert same == (0.0, None, pytest.approx(1.0))

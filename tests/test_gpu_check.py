"""bench/gpu_check.sh --dry_run: the GPU check's every step on the CPU at tiny sizes (device line,
pytest -m cuda, training ramps, generation rates), and the JSON and markdown rows it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--dry_run", "--output_path", str(out),
                           "--budget_s", "900"], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def close(a, b, rel=1e-3, abs_=1e-3):
    return abs(a - b) <= rel * abs(b) + abs_


def test_the_dry_run_reaches_every_step(dry_run):
    stdout, report, _ = dry_run
    assert report["dry_run"] is True and report["device"]["device"] == "cpu"
    assert "device: cpu" in stdout and "gpu_check: done" in stdout
    assert report["device"]["jittor"].startswith("JITTOR_READY device=cpu")
    assert report["tests"]["status"] == "skipped" and "skipped" in report["tests"]["summary"]
    assert set(report["training"]) == {"fp32", "fp32 grad_checkpoint", "fp16", "fp16 grad_checkpoint"}
    assert report["training"]["fp16"]["status"] == "skipped: fp16 needs CUDA"


def test_training_rows_are_consistent(dry_run):
    _, report, _ = dry_run
    for mode in ("fp32", "fp32 grad_checkpoint"):
        rows = report["training"][mode]["rows"]
        ok = [r for r in rows if r["status"] == "ok"]
        assert ok and ok[0]["batch"] == 2 and not report["training"][mode]["problem"]
        for r in ok:
            assert r["seconds"] > 0 and close(r["samples_per_s"], r["batch"] / r["seconds"])
            assert r["memory_kind"] == "peak RSS" and r["memory_bytes"] > 2 ** 20
            assert r["loss"] > 0 and r["skipped"] is None
        assert report["training"][mode]["largest_batch_whole_device"] == max(r["batch"] for r in ok)
        assert report["training"][mode]["largest_batch_24GB"] == max(r["batch"] for r in ok)   # tiny: far below
        (b1, m1), (b2, m2) = [(r["batch"], r["memory_bytes"]) for r in ok[:2]]
        estimated = report["training"][mode]["largest_batch_24GB_estimated"]
        if m2 > m1:   # the line through two points: memory = m1 + (b - b1) (m2 - m1) / (b2 - b1)
            assert abs(estimated - (b1 + (23.5 * 2 ** 30 - m1) * (b2 - b1) / (m2 - m1))) <= 1
        else:
            assert estimated is None


def test_generation_rows_are_consistent(dry_run):
    _, report, _ = dry_run
    (row,) = report["inference"]["rows"]
    assert row["status"] == "ok" and row["batch"] == 2
    parts = 3 * (row["encode_seconds"] + row["decode_seconds"]) + 2 * row["color_transfer_seconds"]
    # iidm: 300 + 320 + 20 guided steps; fast: 12 + 12 + 6 (one guided call each). The per-call
    # figures carry six decimals: 640 x 5e-7 plus the projection's own rounding stays under 0.01.
    assert close(row["iidm_projected_seconds"], 640 * row["guided_call_seconds"] + parts, abs_=0.01)
    assert close(row["fast_projected_seconds"], 30 * row["guided_call_seconds"] + parts, abs_=0.01)
    assert row["fast_measured_seconds"] > 0
    assert close(row["fast_images_per_s"], 2 / row["fast_measured_seconds"], abs_=1e-4)
    assert close(row["iidm_images_per_s"], 2 / row["iidm_projected_seconds"], abs_=1e-4)
    for name in ("fast", "iidm"):
        assert close(row[f"{name}_1000_images_hours"], 1000 / row[f"{name}_images_per_s"] / 3600, rel=1e-2)


def test_markdown_rows(dry_run):
    _, _, md = dry_run
    lines = md.splitlines()
    assert lines[0].startswith("Machine: CPU")
    training = [line for line in lines if line.startswith("| tiny 8x12 |")]
    assert any("| fp32 | 2 |" in line for line in training)
    assert any("| fp32 grad_checkpoint | 2 |" in line for line in training)
    assert any("| fp16 | - | skipped: fp16 needs CUDA |" in line for line in training)
    generation = [line for line in lines if line.startswith(("| fast | 16x24 | 2 |", "| iidm | 16x24 | 2 |"))]
    assert len(generation) == 2 and "measured" in generation[0] and "projected" in generation[1]
    assert all(line.count("|") == 9 for line in training) and all(line.count("|") == 8 for line in generation)


def test_without_a_gpu_the_real_run_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--output_path", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "IIDM_FORCE_CPU": "1"})
    assert done.returncode == 1
    assert "no usable GPU" in done.stderr and "--dry_run" in done.stderr
    assert "error" in json.loads((tmp_path / "gpu_check.json").read_text())["device"]

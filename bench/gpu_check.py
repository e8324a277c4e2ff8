"""The GPU check: everything a person with one NVIDIA GPU runs after the README's set-up
(``bench/gpu_check.sh`` wraps this), in under 8 minutes on one H100/H200-class GPU.

    bench/gpu_check.sh                          # or: python -m bench.gpu_check
    bench/gpu_check.sh --dry_run                # the CPU at tiny sizes (CI): every step up to the device
    python -m bench.gpu_check --budget_s 900    # more time for the batch ramps

Steps, each bounded by its share of ``--budget_s`` (what a deadline cuts is reported as such):

1. the device line (GPUs, driver, nvcc) and what would stop Jittor's CUDA JIT, as what to set;
   a first CUDA operation (a convolution against numpy);
2. ``pytest -m cuda`` (the U-Net and VQ forward CUDA against CPU, training steps fp32 and fp16);
3. the ``iidm`` U-Net training step (the real ``ldm.training`` step: hybrid loss, AdamW, EMA) in
   fp32 and fp16, plain and with ``--grad_checkpoint``, at increasing batch until the GPU runs
   out of memory: seconds per step, samples per second, the device memory the process holds,
   and the largest batch within 24 GB (23.5 GiB usable; measured, and from the straight line
   through the measured memory) and within the whole GPU;
4. generation at 512x384 with the ``iidm`` U-Net and the ``vq-f4`` autoencoder (random weights)
   at batch 1, 4 and 16: the ``fast`` preset run whole, and the per-call costs from which the
   ``iidm`` preset's time (1280 U-Net passes per image) is projected; images per second and the
   time for 1000 test images.

Writes OUTPUT/gpu_check.json and OUTPUT/gpu_check.md (rows for docs/benchmarks.md). Each
measurement runs in a process of its own, so an out-of-memory error ends only its ramp. The first
run on a machine also compiles Jittor's CUDA kernels for every shape it meets (cached in
~/.cache/jittor); what the budget cuts short is marked ``deadline`` or ``timed out``, and a second
run, or a larger ``--budget_s``, completes it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cli
import jittor_env

REPO = Path(__file__).resolve().parents[1]

GiB = 2 ** 30
CARD_24GB = 23.5 * GiB      # what a 24 GB card leaves to one process (display and driver take the rest)
FULL = {"preset": "iidm", "vq": "vq-f4", "latent": (96, 128), "image": (384, 512),
        "train_batches": (1, 2, 4, 8, 16, 32, 64, 128), "infer_batches": (1, 4, 16),
        "precisions": ("fp32", "fp16")}
DRY = {"preset": "tiny", "vq": "tiny", "latent": (8, 12), "image": (16, 24),
       "train_batches": (2, 4), "infer_batches": (2,), "precisions": ("fp32", "fp16")}
RESULT = "RESULT "


# ------------------------------------------------------------------------------ device memory
def device_memory_used() -> int | None:
    """Bytes of GPU 0 in use (total - free), read through the primary context the CUDA runtime
    (Jittor) uses, so no context is created; None when the driver cannot say."""
    try:
        driver = ctypes.CDLL(jittor_env.CUDA_DRIVER)
        context, device = ctypes.c_void_p(), ctypes.c_int(0)
        if driver.cuDeviceGet(ctypes.byref(device), 0) or driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
            return None
        try:
            driver.cuCtxPushCurrent_v2(context)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            status = driver.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
            driver.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            driver.cuDevicePrimaryCtxRelease_v2(device)
        return None if status else total.value - free.value
    except (OSError, AttributeError):
        return None


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "outofmemory" in text or "cudaerrormemoryallocation" in text \
        or "memory allocation" in text or isinstance(exc, MemoryError)


# ------------------------------------------------------------------------------ workers
def write_random_store(path: Path, count: int, channels: int, height: int, width: int) -> Path:
    """A complete latent store of random latents and label maps (29 classes)."""
    from ldm.latents import FORMAT_NAME, FORMAT_VERSION, write_json_atomic

    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    np.save(path / "latents.npy", rng.standard_normal((count, 2, channels, height, width)).astype(np.float32))
    np.save(path / "labels.npy", rng.integers(0, 29, (count, 2, height, width)).astype(np.uint8))
    write_json_atomic(path / "progress.json", {"done": count})
    write_json_atomic(path / "manifest.json", {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "count": count, "names": [str(i) for i in range(count)],
        "latent": {"channels": channels, "height": height, "width": width},
        "image": {"height": 4 * height, "width": 4 * width}, "autoencoder_sha256": "random",
        "views": ["original", "hflip"]})
    return path


def emit(record: dict) -> None:
    print(RESULT + json.dumps(record), flush=True)


def train_worker(args) -> None:
    """Ramp the batch of one (precision, checkpointing) mode until out of memory or the deadline."""
    jt = jittor_env.setup(force_cpu=args.cpu)
    from dataclasses import replace

    from ldm.latents import LatentStore
    from ldm.training import LDMTask, TrainConfig
    from models import UNetModel, unet_preset

    fp16 = args.precision == "fp16"
    height, width = args.latent
    jt.set_global_seed(0)
    unet = UNetModel(replace(unet_preset(args.preset), use_fp16=fp16))
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        store = LatentStore(write_random_store(Path(folder) / "store", max(batches), unet.config.in_channels,
                                               height, width))
        last_seconds, previous = 0.0, 1
        for batch in batches:
            # The next step must fit before the deadline (steps grow about linearly with the batch).
            if last_seconds and time.time() + 4 * last_seconds * batch / previous > args.deadline:
                emit({"batch": batch, "status": "deadline"})
                return
            config = TrainConfig(batch_size=batch, lr=1e-4, max_steps=4, save_every=0, sample_every=0,
                                 fp16=fp16, grad_checkpoint=args.grad_checkpoint)
            task = None
            try:
                task = LDMTask(unet, store, config)
                started = time.perf_counter()
                first = task.step(1)          # compiles the kernels for this shape,
                task.step(2)                  # and those of the optimizer once it has state
                jt.sync_all(True)
                compile_seconds = time.perf_counter() - started
                times = []
                for step in (3, 4):
                    started = time.perf_counter()
                    values = task.step(step)
                    jt.sync_all(True)
                    times.append(time.perf_counter() - started)
                memory = device_memory_used() if jt.flags.use_cuda else peak_rss()
                seconds = statistics.median(times)
                emit({"batch": batch, "status": "ok", "seconds": round(seconds, 6),
                      "first_two_steps_seconds": round(compile_seconds, 2), "samples_per_s": round(batch / seconds, 3),
                      "memory_bytes": memory, "memory_kind": "device used" if jt.flags.use_cuda else "peak RSS",
                      "loss": values.get("loss"), "first_loss": first.get("loss"),
                      "skipped": values.get("skipped")})
                last_seconds, previous = seconds, batch
            except Exception as exc:  # an out-of-memory error ends the ramp; others are reported
                emit({"batch": batch, "status": "oom" if is_out_of_memory(exc) else "error",
                      "message": f"{type(exc).__name__}: {str(exc)[:400]}"})
                return
            finally:
                del task
                try:
                    jt.sync_all(True)
                    jt.gc()
                except Exception:  # after an out-of-memory error this may fail again; the ramp ends anyway
                    pass


def best_time(jt, fn, repeat: int = 2) -> float:
    """The shortest of ``repeat`` timed calls of ``fn`` after one untimed call (which compiles)."""
    fn()
    jt.sync_all(True)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        jt.sync_all(True)
        times.append(time.perf_counter() - started)
    return min(times)


def generation_costs(jt, unet, masks: np.ndarray, references: np.ndarray, x, encode, decode) -> dict:
    """Seconds of one guided U-Net call at ``x``, one encode, one decode and the colour transfers
    of a batch, and from them each preset's projected time (3 rounds: an encode and a decode each,
    a colour transfer before rounds 1 and 2)."""
    from ldm.guidance import classifier_free_guidance
    from synthesis.color_transfer import color_transfer

    with jt.no_grad():
        t = jt.array(np.full(len(masks), 500, np.int32))
        guided = classifier_free_guidance(unet, jt.array(masks), 3.5)
        call = best_time(jt, lambda: guided(x, t).sync())
    enc = best_time(jt, lambda: encode(references).sync())
    latent = encode(references)
    dec = best_time(jt, lambda: decode(latent))
    transfer = best_time(jt, lambda: [color_transfer(r, r[::-1]) for r in references])
    # Six decimals: the projections multiply the per-call time by up to 640, so a coarser
    # rounding would keep the JSON from reproducing its own projected rows.
    return {"guided_call_seconds": round(call, 6), "encode_seconds": round(enc, 6), "decode_seconds": round(dec, 6),
            "color_transfer_seconds": round(transfer, 6)}


def infer_worker(args) -> None:
    """Per batch: the fast preset run whole (timed), and the costs of one guided U-Net call, one
    encode, one decode and one colour transfer, from which any preset's time is projected."""
    jt = jittor_env.setup(force_cpu=args.cpu)
    from autoencoder.vqmodel import VQModel, vq_config
    from datasets import one_hot
    from ldm import pipeline
    from ldm.schedule import ScheduleConfig, make_schedule
    from models import UNetModel, unet_preset
    from models.unet import PRESET_DIFFUSION
    from synthesis.color_transfer import color_transfer
    from synthesis.generator import Generator

    height, width = args.image
    jt.set_global_seed(0)
    unet = UNetModel(unet_preset(args.preset))
    vq = VQModel(vq_config(args.vq))
    unet.eval()
    vq.eval()
    schedule = make_schedule(ScheduleConfig(**PRESET_DIFFUSION["iidm"]["schedule"]))
    generator = Generator.from_networks(unet, vq, schedule)
    encode, decode = generator.encode, generator.decode
    factor = generator.factor
    rng = np.random.default_rng(0)

    passes = {name: pipeline.unet_passes(pipeline.preset_rounds(name, schedule)) for name in ("fast", "iidm")}
    for batch in [int(b) for b in args.batches.split(",")]:
        if time.time() > args.deadline:
            emit({"batch": batch, "status": "deadline"})
            return
        labels = rng.integers(0, 29, (batch, height // factor, width // factor)).astype(np.uint8)
        masks = np.stack([one_hot(label) for label in labels])
        references = rng.integers(0, 256, (batch, height, width, 3)).astype(np.uint8)
        try:
            x = jt.array(rng.standard_normal((batch, unet.config.in_channels, height // factor,
                                              width // factor)).astype(np.float32))
            costs = generation_costs(jt, unet, masks, references, x, encode, decode)
            record = {"batch": batch, "status": "ok", **costs}
            call, enc, dec, transfer = (costs[k] for k in ("guided_call_seconds", "encode_seconds", "decode_seconds",
                                                           "color_transfer_seconds"))
            for name, count in passes.items():
                record[f"{name}_projected_seconds"] = round(count // 2 * call + 3 * (enc + dec) + 2 * transfer, 3)
            if time.time() + 2 * record["fast_projected_seconds"] < args.deadline:
                seeds = [pipeline.image_seed(0, str(i)) for i in range(batch)]

                def run(rounds):
                    return pipeline.run_rounds(rounds, schedule, unet=unet, encode=encode, decode=decode,
                                               color_transfer=color_transfer, masks=masks,
                                               references=references, seeds=seeds)[-1]

                # The same samplers at 2 steps per round compile the kernels the timed run uses.
                run(pipeline.preset_rounds("fast", schedule, 2))
                started = time.perf_counter()
                images = run(pipeline.preset_rounds("fast", schedule))
                record["fast_measured_seconds"] = round(time.perf_counter() - started, 3)
                assert images.shape == references.shape
            record["memory_bytes"] = device_memory_used() if jt.flags.use_cuda else peak_rss()
            emit(record)
        except Exception as exc:
            emit({"batch": batch, "status": "oom" if is_out_of_memory(exc) else "error",
                  "message": f"{type(exc).__name__}: {str(exc)[:400]}"})
            return


# ------------------------------------------------------------------------------ the driver
def run_worker(kind: str, options: list[str], deadline: float, cpu: bool) -> tuple[list[dict], str]:
    """One worker process; its RESULT records and, if it failed, the tail of its output."""
    command = [sys.executable, "-m", "bench.gpu_check", "--worker", kind, "--deadline", str(deadline), *options]
    command += ["--cpu"] if cpu else []
    env = {**os.environ, "IIDM_FORCE_CPU": "1"} if cpu else dict(os.environ)
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=max(30.0, deadline - time.time() + 60))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return [json.loads(line[len(RESULT):]) for line in out.splitlines() if line.startswith(RESULT)], "timed out"
    records = [json.loads(line[len(RESULT):]) for line in done.stdout.splitlines() if line.startswith(RESULT)]
    problem = "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"
    return records, problem


def batch_within(rows: list[dict], limit: float) -> int | None:
    """The largest batch whose memory, on the straight line through the measured (batch, memory)
    points (least squares), stays within ``limit``; None with fewer than two points."""
    points = [(r["batch"], r["memory_bytes"]) for r in rows if r.get("memory_bytes") is not None]
    if len({b for b, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit(*np.array(points, dtype=np.float64).T, 1)
    if slope <= 0:
        return None
    return max(0, int((limit - intercept) // slope))


def fmt_gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.1f} GiB"


def device_section(dry_run: bool) -> dict:
    """Import Jittor on the device, print the device line and run one convolution against numpy."""
    choice = jittor_env.choose_device(force_cpu=dry_run)
    line, problems = jittor_env.cuda_report(choice)
    info = {"device": choice.name, "reason": choice.reason, "cuda": line, "problems": problems,
            "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    print(f"device: {choice.name} ({choice.reason}); {line}", flush=True)
    for problem in problems:
        print(f"  CUDA problem: {problem}", flush=True)
    if not dry_run and not choice.use_cuda:
        info["error"] = (f"no usable GPU ({choice.reason}); run with --dry_run to check the script on the CPU, "
                         "or fix the above (nvcc_path, the driver)")
        return info
    done = subprocess.run([sys.executable, "-m", "jittor_env", *(["--cpu"] if dry_run else [])], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    ready = [line for line in done.stdout.splitlines() if line.startswith(jittor_env.READY_MARKER)]
    if done.returncode or not ready:
        hint = " / ".join(problems) or (f"rerun with {jittor_env.VERBOSE_ENV}=1 for Jittor's compiler output; "
                                        "nvcc_path selects the CUDA toolkit")
        info["error"] = f"Jittor's first CUDA operation failed: {done.stderr.strip()[-1200:]}\nwhat to set: {hint}"
        return info
    info["jittor"] = ready[0]
    print(ready[0], flush=True)
    return info


def tests_section(deadline: float, dry_run: bool) -> dict:
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"]
    # On the CPU every cuda test skips: collecting one file shows that without importing the suite.
    command += ["tests/test_cuda.py"] if dry_run else []
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=max(60.0, deadline - time.time()))
        tail = done.stdout.strip().splitlines()[-1:] or [""]
        status = {0: "passed", 5: "none collected"}.get(done.returncode, "failed")
        if done.returncode == 0 and "passed" not in tail[0]:
            status = "skipped"
        if done.returncode not in (0, 5):
            print(done.stdout[-4000:], flush=True)
        result = {"status": status, "summary": tail[0], "returncode": done.returncode}
    except subprocess.TimeoutExpired:
        result = {"status": "timed out", "summary": "", "returncode": None}
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"pytest -m cuda: {result['status']} ({result['summary']}) in {result['seconds']} s", flush=True)
    return result


def training_section(sizes: dict, dry_run: bool, deadline: float) -> dict:
    modes = [(precision, checkpoint) for precision in sizes["precisions"] for checkpoint in (False, True)]
    order = [f"{p}{' grad_checkpoint' if c else ''}" for p, c in modes]
    out = {}
    for precision, checkpoint in modes:
        if precision == "fp16" and dry_run:
            out[f"{precision}{' grad_checkpoint' if checkpoint else ''}"] = {"status": "skipped: fp16 needs CUDA",
                                                                             "rows": []}
    modes = [(p, c) for p, c in modes if f"{p}{' grad_checkpoint' if c else ''}" not in out]
    for index, (precision, checkpoint) in enumerate(modes):
        name = f"{precision}{' grad_checkpoint' if checkpoint else ''}"
        share = time.time() + (deadline - time.time()) / (len(modes) - index)
        options = ["--preset", sizes["preset"], "--precision", precision,
                   "--latent", f"{sizes['latent'][0]}x{sizes['latent'][1]}",
                   "--batches", ",".join(map(str, sizes["train_batches"]))]
        options += ["--grad_checkpoint"] if checkpoint else []
        rows, problem = run_worker("train", options, share, dry_run)
        fitted = [r for r in rows if r["status"] == "ok"]
        out[name] = {
            "rows": rows, "problem": problem,
            "largest_batch_whole_device": max((r["batch"] for r in fitted), default=None),
            "whole_device_limit": "next batch out of memory" if any(r["status"] == "oom" for r in rows) else
                                  "limit not reached: deadline or end of the list",
            "largest_batch_24GB": max((r["batch"] for r in fitted if r["memory_bytes"] is not None and r["memory_bytes"] <= CARD_24GB),
                                      default=None),
            "largest_batch_24GB_estimated": batch_within(fitted, CARD_24GB)}
        for r in rows:
            extra = (f"{r['seconds']:.3f} s/step, {r['samples_per_s']:.2f} samples/s, {fmt_gib(r['memory_bytes'])} "
                     f"({r['memory_kind']})") if r["status"] == "ok" else r.get("message", "")
            print(f"train {sizes['preset']} {name} batch {r['batch']}: {r['status']} {extra}", flush=True)
        if problem:
            print(f"train {name}: worker {problem}", flush=True)
    return {name: out[name] for name in order}


def inference_section(sizes: dict, dry_run: bool, deadline: float) -> dict:
    options = ["--preset", sizes["preset"], "--vq", sizes["vq"], "--image", f"{sizes['image'][0]}x{sizes['image'][1]}",
               "--batches", ",".join(map(str, sizes["infer_batches"]))]
    rows, problem = run_worker("infer", options, deadline, dry_run)
    for r in rows:
        if r["status"] != "ok":
            print(f"generate batch {r['batch']}: {r['status']} {r.get('message', '')}", flush=True)
            continue
        for name in ("fast", "iidm"):
            seconds = r.get(f"{name}_measured_seconds") or r[f"{name}_projected_seconds"]
            r[f"{name}_images_per_s"] = round(r["batch"] / seconds, 4)
            r[f"{name}_1000_images_hours"] = round(1000 / r[f"{name}_images_per_s"] / 3600, 3)
            how = "measured" if r.get(f"{name}_measured_seconds") else "projected"
            print(f"generate {name} {sizes['image'][0]}x{sizes['image'][1]} batch {r['batch']}: "
                  f"{r[f'{name}_images_per_s']:.4f} images/s ({how}); 1000 test images in "
                  f"{r[f'{name}_1000_images_hours']:.2f} h", flush=True)
    if problem:
        print(f"generate: worker {problem}", flush=True)
    return {"rows": rows, "problem": problem}


def markdown(report: dict) -> str:
    device = report["device"]
    machine = device["cuda"] if device["device"] == "cuda" else f"CPU ({device['cpu_count']} cores, dry run)"
    sizes = report["sizes"]
    lines = [f"Machine: {machine}; Jittor: {device.get('jittor', '-')}; `pytest -m cuda`: "
             f"{report['tests']['status']} ({report['tests']['summary']}).", "",
             "| preset | mode | batch | s/step | samples/s | memory | largest batch in 24 GB | largest batch on the device |",
             "|---|---|---|---|---|---|---|---|"]
    for name, mode in report["training"].items():
        for r in mode["rows"]:
            if r["status"] == "ok":
                lines.append(f"| {sizes['preset']} {sizes['latent'][0]}x{sizes['latent'][1]} | {name} | {r['batch']} | "
                             f"{r['seconds']:.3f} | {r['samples_per_s']:.2f} | {fmt_gib(r['memory_bytes'])} | "
                             f"{mode['largest_batch_24GB']} (line: {mode['largest_batch_24GB_estimated']}) | "
                             f"{mode['largest_batch_whole_device']} "
                             f"({mode['whole_device_limit']}) |")
            else:
                lines.append(f"| {sizes['preset']} {sizes['latent'][0]}x{sizes['latent'][1]} | {name} | {r['batch']} | "
                             f"{r['status']} | | | | |")
        if not mode["rows"]:
            lines.append(f"| {sizes['preset']} {sizes['latent'][0]}x{sizes['latent'][1]} | {name} | - | "
                         f"{mode.get('status') or mode.get('problem')} | | | | |")
    lines += ["", "| preset | image (HxW) | batch | guided U-Net call s | images/s | 1000 test images | how |",
              "|---|---|---|---|---|---|---|"]
    for r in report["inference"]["rows"]:
        if r["status"] != "ok":
            lines.append(f"| - | - | {r['batch']} | {r['status']} | | | |")
            continue
        for name in ("fast", "iidm"):
            how = "measured" if r.get(f"{name}_measured_seconds") else "projected from the per-call costs"
            lines.append(f"| {name} | {sizes['image'][0]}x{sizes['image'][1]} | {r['batch']} | "
                         f"{r['guided_call_seconds']:.3f} | {r[f'{name}_images_per_s']:.4f} | "
                         f"{r[f'{name}_1000_images_hours']:.2f} h | {how} |")
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--dry_run", action="store_true",
                        help="the CPU at tiny sizes: checks the script up to the device (CI)")
    parser.add_argument("--output_path", type=Path, default=REPO / "outputs" / "gpu_check",
                        help="folder for gpu_check.json and gpu_check.md (default outputs/gpu_check)")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="seconds for the measurements (default 420); the ramps stop at their share")
    parser.add_argument("--skip_tests", action="store_true", help="do not run pytest -m cuda")
    parser.add_argument("--worker", choices=("train", "infer"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--vq", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--grad_checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--latent", type=parse_size, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=parse_size, help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget_s must be positive, got {args.budget_s}")
    if args.worker:
        (train_worker if args.worker == "train" else infer_worker)(args)
        return 0

    start = time.time()
    sizes = DRY if args.dry_run else FULL
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run, "budget_s": args.budget_s,
              "sizes": sizes, "device": device_section(args.dry_run)}
    if "error" not in report["device"]:
        # Shares of the budget: tests 30 %, training ramps 40 %, generation the rest.
        if args.skip_tests:
            report["tests"] = {"status": "skipped (--skip_tests)", "summary": ""}
        else:
            report["tests"] = tests_section(start + 0.30 * args.budget_s, args.dry_run)
        report["training"] = training_section(sizes, args.dry_run, start + 0.70 * args.budget_s)
        report["inference"] = inference_section(sizes, args.dry_run, start + args.budget_s)
    report["seconds"] = round(time.time() - start, 1)
    args.output_path.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.output_path / "gpu_check.json", args.output_path / "gpu_check.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(json_path)
    if "error" in report["device"]:
        print(f"gpu_check: {report['device']['error']}", file=sys.stderr)
        return 1
    rows = markdown(report)
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(rows)
    tmp.replace(md_path)
    print("\nrows for docs/benchmarks.md:\n" + rows)
    failed = report["tests"]["status"] not in ("passed", "skipped", "none collected", "skipped (--skip_tests)") or any(
        r["status"] == "error" for mode in report["training"].values() for r in mode["rows"]) or any(
        r["status"] == "error" for r in report["inference"]["rows"])
    print(f"gpu_check: {'FAILED' if failed else 'done'} in {report['seconds']:.0f} s; wrote {json_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

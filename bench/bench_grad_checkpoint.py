"""Peak memory and time of one U-Net training step, plain and with gradient checkpointing.

    python -m bench.bench_grad_checkpoint                                  # demo, 96x128, batch 4
    python -m bench.bench_grad_checkpoint --preset iidm --height 24 --width 32 --batch_size 1 --cpu
    python -m bench.bench_grad_checkpoint --preset iidm --batch_size 4     # on a GPU machine

On the GPU when one is usable, as every entry point (``--cpu``: on the CPU; ``--cuda``, the
spelling of earlier versions, is still accepted and changes nothing).

Each mode runs in a fresh process (so one cannot profit from the other's allocations): a few
steps of the hybrid loss and the gradients of every parameter, as the training loop computes them
(``ldm.training._step`` without the optimizer). Printed per mode: Jittor's peak allocated memory
(``jt.get_max_memory_info``, with ``profile_memory_enable``; device memory on CUDA), the process's
peak resident memory growth during the last step (CPU), the seconds of the last step, the loss
and the sum of squared gradients (which must agree between the modes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cli
import jittor_env

REPO = Path(__file__).resolve().parents[1]


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(args) -> None:
    os.environ["profile_memory_enable"] = "1"
    jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    import numpy as np

    from ldm import make_schedule
    from ldm.losses import training_losses
    from models import UNetModel, unet_preset
    from models.staged import StagedPass

    jt.set_global_seed(0)
    unet = UNetModel(unet_preset(args.preset))
    unet.train()
    params = [p for p in unet.parameters() if not p.is_stop_grad()]
    schedule = make_schedule()
    rng = np.random.default_rng(0)
    shape = (args.batch, unet.config.in_channels, args.height, args.width)
    x0 = jt.array(rng.standard_normal(shape).astype(np.float32))
    noise = jt.array(rng.standard_normal(shape).astype(np.float32))
    t = jt.array(rng.integers(0, 1000, args.batch).astype(np.int32))
    labels = rng.integers(0, unet.config.num_classes, (args.batch, args.height, args.width))
    mask = jt.array(np.eye(unet.config.num_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2))
    record = {}
    for step in range(args.steps):
        jt.sync_all(True)
        jt.gc()
        if not jt.flags.use_cuda:
            open("/proc/self/clear_refs", "w").write("5")   # reset the peak RSS
        before = _status_mib("VmRSS")
        started = time.perf_counter()
        if args.mode == "checkpoint":
            staged = StagedPass(unet, mask)
            terms = training_losses(schedule, staged.forward, x0, t, noise)
            loss = terms["loss"].mean()
            by_id = staged.backward(jt.grad(loss, staged.output))
            grads = [by_id[id(p)] for p in params]
        else:
            terms = training_losses(schedule, lambda x, s: unet(x, s, mask), x0, t, noise)
            loss = terms["loss"].mean()
            grads = jt.grad(loss, params)
        jt.sync([loss] + list(grads))
        jt.sync_all(True)
        seconds = time.perf_counter() - started
        peak_var = int(jt.get_max_memory_info().split("[!@#div1!@#]")[0]) / 2 ** 20
        record = {"preset": args.preset, "mode": args.mode, "batch": args.batch, "height": args.height,
                  "width": args.width, "device": "cuda" if jt.flags.use_cuda else "cpu",
                  "jittor_peak_MiB": round(peak_var, 1),
                  "rss_peak_growth_MiB": None if jt.flags.use_cuda else round(_status_mib("VmHWM") - before, 1),
                  "seconds": round(seconds, 3), "loss": float(loss.item()),
                  "grad_sq": float(sum(float((g * g).sum().item()) for g in grads))}
        del terms, loss, grads
    print("RESULT " + json.dumps(record), flush=True)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch_size", dest="batch", type=int, default=4)
    parser.alias("--batch", "--batch_size")
    parser.add_argument("--steps", type=int, default=2, help="steps per mode; the last one is reported")
    jittor_env.add_arguments(parser)
    parser.add_argument("--cuda", dest="cpu", action="store_false", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("plain", "checkpoint"), help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode:
        worker(args)
        return 0
    rows = []
    for mode in ("plain", "checkpoint"):
        command = [sys.executable, "-m", "bench.bench_grad_checkpoint", "--mode", mode, "--preset", args.preset, "--height", str(args.height),
                   "--width", str(args.width), "--batch_size", str(args.batch), "--steps", str(args.steps)]
        command += (["--cpu"] if args.cpu else []) + (["--verbose"] if args.verbose else [])
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    plain, ckpt = rows
    print(f"\n{args.preset} {args.batch}x{args.height}x{args.width} on {plain['device']}: Jittor peak "
          f"{plain['jittor_peak_MiB']:.0f} -> {ckpt['jittor_peak_MiB']:.0f} MiB "
          f"({ckpt['jittor_peak_MiB'] / plain['jittor_peak_MiB']:.2f}x), step time "
          f"{ckpt['seconds'] / plain['seconds']:.2f}x; loss {plain['loss']:.6g} vs {ckpt['loss']:.6g}, "
          f"sum of squared gradients {plain['grad_sq']:.6g} vs {ckpt['grad_sq']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

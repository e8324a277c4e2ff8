"""U-Net benchmark: time per step, achieved GFLOP/s and peak memory for the U-Net presets.

    python -m bench.bench_unet                                   # tiny and demo, batch 1 and 4
    python -m bench.bench_unet --presets iidm --batches 1 --forward_only
    python -m bench.bench_unet --precisions fp32,fp16            # on a CUDA machine
    IIDM_KERNELS=0 python -m bench.bench_unet                    # CPU: plain Jittor ops, no kernels

FLOPs are 2 per multiply-add of every convolution, linear layer and attention matmul, counted
from the shapes the model actually sees in one forward (norms, activations and additions are not
counted); a training step (forward + backward to every parameter) is counted as 3 forwards.
Each configuration runs in a process of its own, so its peak memory is its own: the peak resident
set size on the CPU, the peak of Jittor's allocator on CUDA. The first steps of a configuration
compile kernels and are not timed (--warmup).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import cli
import jittor_env  # noqa: F401  (must precede jittor)
from bench.bench_ops import module_command

REPO = Path(__file__).resolve().parents[1]

# Latent size per preset: (height, width).
LATENT_SIZES = {"tiny": (16, 24), "demo": (24, 32), "iidm": (96, 128)}


@contextmanager
def count_flops():
    """Count the FLOPs of the convolutions, linear layers and attention matmuls called inside."""
    from jittor import nn

    from models.blocks import PointwiseConv1d, QKVAttentionLegacy
    from models.layers import Conv2d

    total = [0]

    def conv2d_of(cls):  # nn.Conv2d and its subclass layers.Conv2d (which has its own execute)
        def conv2d(self, x):
            y = original[cls](self, x)
            kh, kw = self.kernel_size
            total[0] += 2 * math.prod(y.shape) * (self.in_channels // self.groups) * kh * kw
            return y
        return conv2d

    def linear(self, x):
        y = original[nn.Linear](self, x)
        total[0] += 2 * math.prod(y.shape) * self.in_features
        return y

    def pointwise(self, x):
        y = original[PointwiseConv1d](self, x)
        total[0] += 2 * math.prod(y.shape) * self.in_channels
        return y

    def attention(self, qkv):
        y = original[QKVAttentionLegacy](self, qkv)
        batch, width, length = y.shape  # q^T k and w v: 2 matmuls of B*H x T x T x c
        total[0] += 2 * 2 * batch * width * length * length
        return y

    wrappers = {nn.Conv2d: conv2d_of(nn.Conv2d), Conv2d: conv2d_of(Conv2d), nn.Linear: linear, PointwiseConv1d: pointwise,
                QKVAttentionLegacy: attention}
    original = {cls: cls.execute for cls in wrappers}
    try:
        for cls, wrapper in wrappers.items():
            cls.execute = wrapper
        yield total
    finally:
        for cls, method in original.items():
            cls.execute = method


def cuda_peak_bytes(jt) -> int:
    """Peak bytes of Jittor's allocator since profiling was switched on (its report starts with it)."""
    report = jt.get_max_memory_info()
    return int(report.split("[", 1)[0])


def run_single(spec: dict) -> dict:
    """Measure one configuration in this process; returns the figures as a dict."""
    jt = jittor_env.setup(force_cpu=not spec["cuda"])
    from models import UNetModel, count_parameters, unet_preset

    config = unet_preset(spec["preset"], use_fp16=spec["precision"] == "fp16")
    height, width = spec["height"], spec["width"]
    batch = spec["batch"]
    model = UNetModel(config)
    rng = np.random.default_rng(0)
    x = jt.array(rng.standard_normal((batch, config.in_channels, height, width)).astype(np.float32))
    t = jt.array(rng.integers(0, 1000, size=batch))
    labels = rng.integers(0, config.num_classes, size=(batch, height, width))
    mask = jt.array(np.eye(config.num_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy())
    target = jt.array(rng.standard_normal((batch, config.out_channels, height, width)).astype(np.float32))
    params = model.parameters()
    with count_flops() as flops:
        model(x, t, mask)  # builds the lazy graph only; nothing is computed
    forward_flops = flops[0]
    jt.sync_all(True)
    jt.gc()

    def forward():
        with jt.no_grad():
            model(x, t, mask).sync()

    def train_step():
        loss = ((model(x, t, mask) - target) ** 2).mean()
        jt.sync(jt.grad(loss, params))

    result = dict(spec, parameters=count_parameters(model), forward_gflop=forward_flops / 1e9)
    modes = [("forward", forward, 1)] + ([] if spec["forward_only"] else [("train", train_step, 3)])
    for name, step, flop_factor in modes:
        for _ in range(spec["warmup"]):
            step()
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            step()
            jt.sync_all(True)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        result[f"{name}_s"] = seconds
        result[f"{name}_min_s"] = min(times)
        result[f"{name}_gflops"] = flop_factor * forward_flops / 1e9 / seconds
    if spec["cuda"]:
        jt.flags.profile_memory_enable = 1
        for _, step, _ in modes:
            step()
        jt.sync_all(True)
        result["peak_mib"] = cuda_peak_bytes(jt) / 2 ** 20
        result["peak_kind"] = "jittor allocator (CUDA)"
    else:
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_kind"] = "process RSS"
    result["device"] = "cuda" if jt.flags.use_cuda else "cpu"
    return result


def machine_line(cuda: bool) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    line = f"{cpu}, {os.cpu_count()} logical cores"
    if cuda:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            line += f"; GPU: {gpu or 'unknown'}"
        except (OSError, subprocess.SubprocessError):
            line += "; GPU: unknown"
    return line


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,demo", help="comma-separated: tiny, demo, iidm")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--precisions", default="fp32", help="fp32 and/or fp16 (fp16 needs CUDA)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per mode (median and minimum reported; GFLOP/s from the median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel compilation)")
    parser.add_argument("--forward_only", action="store_true", help="skip the training step")
    parser.add_argument("--height", type=int, help="latent height (default: the preset's)")
    parser.add_argument("--width", type=int, help="latent width (default: the preset's)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    jittor_env.add_arguments(parser)
    args = parser.parse_args(argv)

    if args.single:
        print("RESULT " + json.dumps(run_single(json.loads(args.single))), flush=True)
        return 0

    cuda = jittor_env.choose_device(force_cpu=args.cpu).use_cuda
    precisions = args.precisions.split(",")
    if "fp16" in precisions and not cuda:
        print("fp16 skipped: it needs CUDA (on the CPU Jittor's float16 is ~700x slower)", file=sys.stderr)
        precisions = [p for p in precisions if p != "fp16"]
    print(f"machine: {machine_line(cuda)}; device: {'cuda' if cuda else 'cpu'}")
    header = (f"{'preset':6} {'prec':4} {'batch':>5} {'HxW':>7} {'params':>8} {'GFLOP':>8} "
              f"{'fwd s':>8} {'(min)':>8} {'GFLOP/s':>8} {'train s':>8} {'(min)':>8} {'GFLOP/s':>8} "
              f"{'peak MiB':>9}")
    print(header)
    results, failed = [], 0
    for preset in args.presets.split(","):
        height, width = args.height or LATENT_SIZES[preset][0], args.width or LATENT_SIZES[preset][1]
        for precision in precisions:
            for batch in (int(b) for b in args.batches.split(",")):
                spec = dict(preset=preset, precision=precision, batch=batch, height=height,
                            width=width, steps=args.steps, warmup=args.warmup,
                            forward_only=args.forward_only, cuda=cuda)
                proc = subprocess.run(module_command(sys.executable, "bench.bench_unet", "--single", json.dumps(spec),
                                                     *(["--cpu"] if args.cpu else [])),
                                      capture_output=True, text=True, cwd=REPO)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    failed += 1
                    print(f"{preset} {precision} batch {batch}: failed\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(lines[-1][len("RESULT "):])
                results.append(r)
                train = (f"{r['train_s']:8.4f} {r['train_min_s']:8.4f} {r['train_gflops']:8.2f}"
                         if "train_s" in r else f"{'-':>8} {'-':>8} {'-':>8}")
                print(f"{preset:6} {precision:4} {batch:5d} {height:>3}x{width:<3} "
                      f"{r['parameters'] / 1e6:7.2f}M {r['forward_gflop']:8.2f} "
                      f"{r['forward_s']:8.4f} {r['forward_min_s']:8.4f} {r['forward_gflops']:8.2f} {train} "
                      f"{r['peak_mib']:9.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

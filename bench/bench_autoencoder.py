"""Benchmark (not a test): VQ-f4 encode + decode throughput at 512x384 (height 384, width 512).

    python -m bench.bench_autoencoder [--preset vq-f4] [--height 384 --width 512] [--batch_size 1]
                                      [--repeats 3] [--warmup 1] [--cpu]

One iteration = encode, then decode (which quantizes first), synchronised, without gradients.
The weights are random: the work done does not depend on them. Prints images per second on the
CPU and, when a GPU is usable, on CUDA; with ``--cpu``, as every entry point, on the CPU only.
(``--device all|cpu|cuda``, the option of earlier versions, is still accepted.)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

import cli
import jittor_env


def run(jt, model, image: np.ndarray, iterations: int, warmup: int) -> tuple[float, list[float]]:
    x = jt.array(image)
    times = []
    with jt.no_grad():
        for i in range(warmup + iterations):
            start = time.perf_counter()
            out = model.decode(model.encode(x))
            out.sync()
            jt.sync_all(True)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return image.shape[0] * len(times) / sum(times), times


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="vq-f4")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", dest="iterations", type=int, default=3)
    parser.alias("--iterations", "--repeats")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help=argparse.SUPPRESS)
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    jt = jittor_env.setup(force_cpu=args.cpu or args.device == "cpu", verbose=args.verbose)
    from autoencoder.vqmodel import VQModel, vq_config

    cuda = bool(jt.flags.use_cuda)
    devices = {"all": ["cpu"] + (["cuda"] if cuda else []), "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    if "cuda" in devices and not cuda:
        print("bench_autoencoder: no usable GPU; nothing measured on CUDA", file=sys.stderr)
        return 1
    jt.set_global_seed(0)
    model = VQModel(vq_config(args.preset)).eval()
    image = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, 3, args.height, args.width)).astype(np.float32)
    print(f"VQ autoencoder {args.preset}, encode + decode, {args.height}x{args.width} (HxW), batch {args.batch_size}, "
          f"{args.iterations} iterations after {args.warmup} warm-up; jittor {jt.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    for device in devices:
        jt.flags.use_cuda = 1 if device == "cuda" else 0
        rate, times = run(jt, model, image, args.iterations, args.warmup)
        print(f"{device}: {rate:.3f} images/s ({', '.join(f'{t:.2f}' for t in times)} s per iteration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak resident memory of a U-Net forward without gradients, Jittor against PyTorch (CPU).

    python -m bench.bench_memory --torch_python ~/.venvs/torch/bin/python --sdm_path /tmp/sdm
    python -m bench.bench_memory --variants "default;use_sfrl_allocator=0"     # Jittor only

The ``iidm`` preset with model_channels 128 at a 48x64 latent, batch 2 (``--size``, ``--batch``).
Each measurement runs in a fresh process: build the model (random weights) and the inputs, run
``--steps`` forwards under no_grad, and report the resident set (VmRSS) after the model is built
and synced, and the peak (VmHWM) over the forwards alone (the mark is reset just before them
through ``/proc/self/clear_refs``), with the seconds of the last forward. For Jittor also the peak
of its live variables (``jt.get_max_memory_info`` with ``profile_memory_enable``) and what its
allocator holds after the forwards. PyTorch runs SDM's own ``UNetModel`` (built as
``bench.bench_ops.sdm_unet``) in ``--torch_python`` (never a dependency of this project).

A Jittor variant is a list of ``NAME=VALUE`` settings separated by commas, ``;`` between variants:
names of ``jt.flags`` are set after import, other names (``IIDM_*``) in the environment.
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

REPO = Path(__file__).resolve().parents[1]
SIZES = {"m128": ({"model_channels": 128}, (48, 64)), "m64": ({"model_channels": 64}, (32, 48)),
         "demo": (None, (24, 32))}


def status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def inputs(np, config: dict, batch: int, height: int, width: int) -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, config["num_classes"], size=(batch, height, width))
    return dict(x=rng.standard_normal((batch, config["in_channels"], height, width)).astype(np.float32),
                t=rng.integers(0, 1000, size=batch).astype(np.int64),
                mask=np.eye(config["num_classes"], dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy())


def jittor_worker(spec: dict) -> dict:
    settings = spec["settings"]
    for name, value in settings.items():
        if not name.isidentifier() or name.startswith("IIDM_"):
            os.environ[name] = value
    os.environ["profile_memory_enable"] = "1"
    import jittor_env

    jt = jittor_env.setup(force_cpu=True)
    import numpy as np

    from models import UNetModel, unet_preset

    for name, value in settings.items():
        if hasattr(jt.flags, name):
            setattr(jt.flags, name, type(getattr(jt.flags, name))(value))
    overrides, (height, width) = SIZES[spec["size"]]
    config = unet_preset("iidm" if overrides else spec["size"], **(overrides or {}))
    model = UNetModel(config)
    data = inputs(np, config.to_dict(), spec["batch"], height, width)
    x, t, mask = (jt.array(data[k]) for k in ("x", "t", "mask"))
    jt.sync_all(True)
    jt.gc()
    built, build_peak = status_mib("VmRSS"), status_mib("VmHWM")
    reset_peak()
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        with jt.no_grad():
            out = model(x, t, mask)
            if spec["chain"]:  # a sampler's step: the next input depends on this output
                x = x - 0.01 * out[:, :x.shape[1]]
                x.sync()
            else:
                out.sync()
        seconds = time.perf_counter() - started
    peak = status_mib("VmHWM")
    live_peak = int(jt.get_max_memory_info().split("[!@#div1!@#]")[0]) / 2 ** 20
    return dict(framework="jittor", built_MiB=built, build_peak_MiB=build_peak, peak_MiB=peak, seconds=seconds,
                live_peak_MiB=live_peak, after_MiB=status_mib("VmRSS"),
                parameters=sum(int(np.prod(p.shape)) for p in model.parameters()))


def torch_worker(spec: dict) -> dict:
    import numpy as np
    import torch

    from bench.bench_ops import sdm_unet

    torch.set_num_threads(spec["threads"])
    model = sdm_unet(spec["config"]).eval()
    height, width = spec["height"], spec["width"]
    data = inputs(np, spec["config"], spec["batch"], height, width)
    x, t, mask = (torch.from_numpy(data[k]) for k in ("x", "t", "mask"))
    built, build_peak = status_mib("VmRSS"), status_mib("VmHWM")
    reset_peak()
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        with torch.no_grad():
            out = model(x, t, mask)
            if spec["chain"]:
                x = x - 0.01 * out[:, :x.shape[1]]
        seconds = time.perf_counter() - started
    return dict(framework="torch " + torch.__version__, built_MiB=built, build_peak_MiB=build_peak,
                peak_MiB=status_mib("VmHWM"),
                seconds=seconds, after_MiB=status_mib("VmRSS"),
                parameters=sum(p.numel() for p in model.parameters()))


def run(python: str, spec: dict, threads: int) -> dict:
    from bench.bench_ops import module_command, worker_env

    done = subprocess.run(module_command(python, "bench.bench_memory", "--worker", json.dumps(spec)),
                          capture_output=True, text=True, env=worker_env(threads, spec.get("sdm_path")), cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def parse_variants(text: str) -> list[dict]:
    variants = []
    for part in text.split(";"):
        settings = {}
        for item in filter(None, (s.strip() for s in part.split(","))):
            if item == "default":
                continue
            name, _, value = item.partition("=")
            settings[name.strip()] = value.strip()
        variants.append(settings)
    return variants


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch_python", help="python of a separate environment with torch (CPU)")
    parser.add_argument("--sdm_path", help="folder holding SDM's guided_diffusion/")
    parser.add_argument("--size", default="m128", choices=sorted(SIZES))
    parser.add_argument("--batch_size", dest="batch", type=int, default=2)
    parser.alias("--batch", "--batch_size")
    parser.add_argument("--steps", type=int, default=2, help="forwards per process (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chain", action="store_true",
                        help="feed each forward x - 0.01 * output of the last (as a sampler's steps)")
    parser.add_argument("--variants", default="default", help="Jittor settings to compare (see above)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        result = torch_worker(spec) if spec["framework"] == "torch" else jittor_worker(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.torch_python and not args.sdm_path:
        parser.error("--sdm_path is needed with --torch_python")

    rows = []
    for settings in parse_variants(args.variants):
        spec = dict(framework="jittor", size=args.size, batch=args.batch, steps=args.steps, settings=settings,
                    chain=args.chain)
        load = os.getloadavg()[0]
        rows.append(dict(run(sys.executable, spec, args.threads), variant=",".join(
            f"{k}={v}" for k, v in settings.items()) or "default", load=load))
        print(json.dumps(rows[-1]), flush=True)
    if args.torch_python:
        import jittor_env  # noqa: F401
        from models import unet_preset

        overrides, (height, width) = SIZES[args.size]
        config = unet_preset("iidm" if overrides else args.size, **(overrides or {})).to_dict()
        spec = dict(framework="torch", config=config, height=height, width=width, batch=args.batch,
                    steps=args.steps, threads=args.threads, sdm_path=args.sdm_path, chain=args.chain)
        load = os.getloadavg()[0]
        rows.append(dict(run(args.torch_python, spec, args.threads), variant="", load=load))
        print(json.dumps(rows[-1]), flush=True)

    torch_peak = next((r["peak_MiB"] for r in rows if r["framework"].startswith("torch")), None)
    print(f"\n{args.size} batch {args.batch}, {args.steps} no_grad forwards{' (chained)' if args.chain else ''}, "
          f"{args.threads} threads")
    print(f"{'framework':14} {'variant':36} {'build peak':>10} {'built MiB':>9} {'peak MiB':>9} {'growth':>7} "
          f"{'/torch':>6} {'live peak':>9} {'s/fwd':>6} {'load':>5}")
    for r in rows:
        versus = f"{r['peak_MiB'] / torch_peak:6.2f}" if torch_peak else f"{'-':>6}"
        live = f"{r['live_peak_MiB']:9.0f}" if "live_peak_MiB" in r else f"{'-':>9}"
        print(f"{r['framework']:14} {r['variant']:36} {r['build_peak_MiB']:10.0f} {r['built_MiB']:9.0f} {r['peak_MiB']:9.0f} "
              f"{r['peak_MiB'] - r['built_MiB']:7.0f} {versus} {live} {r['seconds']:6.2f} {r['load']:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

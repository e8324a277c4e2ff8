"""Full training step (optimizer and EMA included) and sampling step against PyTorch.

    python -m bench.bench_train_step --torch_python ~/.venvs/torch/bin/python --sdm_path /tmp/sdm
    python -m bench.bench_train_step --sizes tiny,demo --batches 2,4 --repeats 5 ...
    python -m bench.bench_train_step --optimizer jittor ...     # Jittor's own AdamW + per-tensor EMA

A training step is forward, MSE loss against a fixed target, gradients of every parameter, one
AdamW update (lr 1e-4, weight decay 0.01) and the EMA (decay 0.9999) of the weights. Jittor runs the
project's U-Net with ``training.optim.FusedAdamW`` and the EMA fused into its kernels (or, with
``--optimizer jittor``, ``jt.optim.AdamW`` and ``ldm.ema.EMA.update``). PyTorch runs SDM's own
``UNetModel`` (``guided_diffusion/`` of WeilunWang/semantic-diffusion-model at ``--sdm_path``, built
as ``bench.bench_ops.sdm_unet`` does, loading the Jittor model's weights by name, strict) with
``torch.optim.AdamW(foreach=True)`` (the multi-tensor path) and the EMA as ``torch._foreach_lerp_``.
A sampling step is one forward without gradients.

Sizes: ``tiny`` and ``demo`` are the presets at their latent sizes; ``m64`` and ``m128`` are the
``iidm`` preset with model_channels 64 at 32x48 (its five levels need sides divisible by 16) and 128 at
48x64. Times are medians over ``--repeats`` rounds after ``--warmup`` steps; each round runs Jittor
then PyTorch (so load changes hit both). The PyTorch half runs in a subprocess of
``--torch_python`` (torch is never a dependency of this project) with the same thread count. On a
CUDA machine Jittor runs on the GPU, and PyTorch too when its build sees one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cli

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name: (preset, overrides, (height, width))
    "tiny": ("tiny", {}, (16, 24)),
    "demo": ("demo", {}, (24, 32)),
    "m64": ("iidm", {"model_channels": 64}, (32, 48)),    # 5 levels: sides multiples of 16
    "m128": ("iidm", {"model_channels": 128}, (48, 64)),
}
LR, WEIGHT_DECAY, EMA_DECAY = 1e-4, 0.01, 0.9999


def jittor_steps(jt, size: str, batch: int, optimizer: str, exchange: Path):
    """({mode: step}, parameter count, spec for the PyTorch side)."""
    from ldm.ema import EMA
    from models import UNetModel, unet_preset
    from training.optim import FusedAdamW

    preset, overrides, (height, width) = SIZES[size]
    config = unet_preset(preset, **overrides)
    model = UNetModel(config)
    rng = np.random.default_rng(1)
    for p in model.parameters():
        if not np.any(p.numpy()):   # zero-initialised output layers: randomise so outputs compare
            p.update(jt.array((0.05 * rng.standard_normal(p.shape)).astype(np.float32)))
    data = dict(x=rng.standard_normal((batch, config.in_channels, height, width)).astype(np.float32),
                t=rng.integers(0, 1000, size=batch).astype(np.int64),
                mask=np.eye(config.num_classes, dtype=np.float32)[
                    rng.integers(0, config.num_classes, size=(batch, height, width))].transpose(0, 3, 1, 2).copy(),
                target=rng.standard_normal((batch, config.out_channels, height, width)).astype(np.float32))
    path = exchange / f"{size}_{batch}.npz"
    np.savez(path, **data, **{"param:" + k: v.numpy() for k, v in model.state_dict().items()})
    named = [(n, p) for n, p in model.named_parameters() if not p.is_stop_grad()]
    params = [p for _, p in named]
    ema = EMA(named, EMA_DECAY)
    if optimizer == "fused":
        opt = FusedAdamW(params, LR, weight_decay=WEIGHT_DECAY)
    else:
        opt = jt.optim.AdamW(params, LR, weight_decay=WEIGHT_DECAY)
    x, t, mask, target = (jt.array(data[k]) for k in ("x", "t", "mask", "target"))

    def train():
        loss = ((model(x, t, mask) - target) ** 2).mean()
        opt.param_groups[0]["grads"] = [g.stop_grad() for g in jt.grad(loss, params)]
        opt.n_step += 1
        if optimizer == "fused":
            opt.step(ema=ema.vars(), ema_decay=ema.decay)
        else:
            opt.step()
            ema.update()
        jt.sync(params + ema.vars() + opt.param_groups[0]["m"] + opt.param_groups[0]["values"])

    def sample():
        with jt.no_grad():
            model(x, t, mask).sync()

    spec = dict(config=config.to_dict(), exchange=str(path))
    return {"train": train, "sample": sample}, sum(p.numel() for p in params), spec


# ----------------------------------------------------------------------------------- PyTorch
def torch_worker(threads: int) -> None:
    """Runs in --torch_python; answers one JSON command per line with one RESULT line."""
    import torch

    from bench.bench_ops import sdm_unet

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("BENCH_TORCH_CUDA") == "1" else "cpu"
    steps = {}

    def answer(**values):
        print("RESULT " + json.dumps(values), flush=True)

    answer(version=torch.__version__, threads=torch.get_num_threads(), device=device)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "build":
            data = np.load(command["spec"]["exchange"])
            model = sdm_unet(command["spec"]["config"]).to(device)
            model.load_state_dict({k[6:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("param:")},
                                  strict=True)
            x, t, mask, target = (torch.from_numpy(data[k]).to(device) for k in ("x", "t", "mask", "target"))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
            ema = [p.detach().clone() for p in params]

            def sync():
                if device == "cuda":
                    torch.cuda.synchronize()

            def train(model=model, x=x, t=t, mask=mask, target=target, opt=opt, ema=ema, params=params):
                opt.zero_grad(set_to_none=True)
                ((model(x, t, mask) - target) ** 2).mean().backward()
                opt.step()
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - EMA_DECAY)
                sync()

            def sample(model=model, x=x, t=t, mask=mask):
                with torch.no_grad():
                    model(x, t, mask)
                sync()
            steps[command["id"]] = {"train": train, "sample": sample}
            answer(ok=True)
        elif command["cmd"] == "run":
            fn, times = steps[command["id"]][command["mode"]], []
            for _ in range(command["n"]):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            answer(times=times)
        elif command["cmd"] == "drop":
            steps.pop(command["id"], None)
            answer(ok=True)
        else:
            return


def start_torch_worker(python: str, threads: int, sdm_path: str, cuda: bool):
    """This script's PyTorch half (``--torch_worker``) in ``python`` with ``threads`` threads."""
    from bench.bench_ops import WorkerProcess, module_command, worker_env

    return WorkerProcess(module_command(python, "bench.bench_train_step", "--torch_worker", str(threads)),
                         worker_env(threads, sdm_path, BENCH_TORCH_CUDA="1" if cuda else "0"))


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,demo,m64,m128")
    parser.add_argument("--batches", default="2,4")
    parser.add_argument("--modes", default="train,sample")
    parser.add_argument("--optimizer", choices=("fused", "jittor"), default="fused")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--torch_python", dest="torch_python")
    parser.add_argument("--sdm_path", dest="sdm_path")
    parser.add_argument("--torch_worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        torch_worker(args.torch_worker)
        return 0
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    bad = [s for s in sizes if s not in SIZES] + [m for m in modes if m not in ("train", "sample")]
    if bad:
        parser.error(f"unknown size or mode {bad}; sizes {sorted(SIZES)}, modes train, sample")
    if bool(args.torch_python) != bool(args.sdm_path):
        parser.error("--torch_python and --sdm_path go together")

    import jittor_env

    jt = jittor_env.setup()
    worker = start_torch_worker(args.torch_python, args.threads, args.sdm_path, bool(jt.flags.use_cuda)) \
        if args.torch_python else None
    print(f"# Jittor {jt.__version__} ({'CUDA' if jt.flags.use_cuda else 'CPU'}), optimizer {args.optimizer}; "
          f"PyTorch {worker.info if worker else '-'}; {args.threads} threads; {os.uname().nodename}; "
          f"{os.cpu_count()} CPUs", flush=True)
    print("| size | params (M) | mode | batch | Jittor s | PyTorch s | Jittor/PyTorch | load avg |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as exchange:
        for size in sizes:
            for batch in batches:
                steps, count, spec = jittor_steps(jt, size, batch, args.optimizer, Path(exchange))
                key = f"{size}_{batch}"
                if worker:
                    worker.ask(cmd="build", id=key, spec=spec)
                for mode in modes:
                    load = os.getloadavg()[0]
                    for _ in range(args.warmup):
                        steps[mode]()
                    if worker:
                        worker.ask(cmd="run", id=key, mode=mode, n=args.warmup)
                    mine, theirs = [], []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        steps[mode]()
                        mine.append(time.perf_counter() - start)
                        if worker:
                            theirs += worker.ask(cmd="run", id=key, mode=mode, n=1)["times"]
                    a = statistics.median(mine)
                    b = statistics.median(theirs) if theirs else float("nan")
                    load = (load + os.getloadavg()[0]) / 2
                    rows.append(dict(size=size, params=count, mode=mode, batch=batch, jittor=a, torch=b, load=load))
                    print(f"| {size} | {count / 1e6:.1f} | {mode} | {batch} | {a:.4f} | {b:.4f} | {a / b:.2f} | "
                          f"{load:.1f} |", flush=True)
                if worker:
                    worker.ask(cmd="drop", id=key)
                del steps
    if worker:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

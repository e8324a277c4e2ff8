"""CPU kernels against Jittor's plain ops and PyTorch: per-op times and full U-Net steps.

    python -m bench.bench_ops                                        # Jittor: kernels vs reference
    python -m bench.bench_ops --torch_python /tmp/torchenv/bin/python --sdm_path /tmp/sdm
    python -m bench.bench_ops --ops_only --repeats 30 --json ops.json

Ops (group norm with 32 groups and its fused forms, SiLU, legacy attention, 3x3 and 1x1
convolutions, and, for context, a 1024^3 matmul, which is oneDNN in both frameworks) are timed forward
and forward+backward at U-Net shapes: Jittor's reference path (plain ops), the kernels of
``models/kernels.py``, and PyTorch's built-in ops. Forward+backward is d sum(op(...) * probe)
with respect to every input, written the same way in both frameworks.

U-Net steps for the presets (``tiny``, ``demo``): a training step (forward, MSE loss, gradients
of every parameter; no optimizer) and a sampling step (one forward without gradients). PyTorch
runs SDM's own ``UNetModel`` (``guided_diffusion/`` of WeilunWang/semantic-diffusion-model, at
``--sdm_path``; not part of this repository) built with the preset's widths; it loads the Jittor
model's weights (the parameter names are SDM's) and its output is checked against Jittor's before
anything is timed. FLOPs count 2 per multiply-add of convolutions, linear layers and attention
matmuls (``bench_unet.count_flops``); a training step counts as 3 forwards.

The PyTorch half runs in a subprocess with ``--torch_python`` (a separate environment holding
torch; never a dependency of this project), with the same thread count (OMP_NUM_THREADS and
``torch.set_num_threads``). Times are medians (and minima) over ``--repeats`` rounds after
warm-up; each round runs Jittor's paths and PyTorch in turn, an op as a burst of back-to-back
calls (``time_rounds``). The 1-minute load average is printed with each part (this script's own
two threads count about 2), since other jobs on the machine inflate medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cli

ROOT = Path(__file__).resolve().parents[1]
LATENT_SIZES = {"tiny": (16, 24), "demo": (24, 32), "iidm": (96, 128)}
GROUPS = 32
NORM_SHAPES = [(4, 64, 24, 32), (1, 256, 96, 128)]
ATTENTION_SHAPES = [(1, 8, 64, 768), (1, 12, 64, 192), (4, 2, 32, 48)]  # batch, heads, c, T
CONV_SHAPES = [(4, 64, 24, 32), (1, 128, 48, 64)]


def op_cases() -> list[dict]:
    cases = []
    for shape in NORM_SHAPES:
        for op in ("group_norm", "group_norm_silu", "spade_film_silu", "silu"):
            cases.append(dict(op=op, shape=shape))
    for shape in ATTENTION_SHAPES:
        cases.append(dict(op="attention", shape=shape))
    for shape in CONV_SHAPES:
        cases.append(dict(op="conv3x3", shape=shape))
        cases.append(dict(op="conv1x1", shape=shape))
    cases.append(dict(op="matmul", shape=(1024, 1024, 1024)))
    return cases


def case_label(case: dict) -> str:
    shape = "x".join(str(d) for d in case["shape"])
    if case["op"] == "attention":
        b, h, c, t = case["shape"]
        shape = f"B{b} H{h} c{c} T{t}"
    return f"{case['op']} {shape}"


def op_flops(case: dict) -> float:
    if case["op"] == "matmul":
        m, k, n = case["shape"]
        return 2.0 * m * k * n
    if case["op"] in ("conv3x3", "conv1x1"):
        b, c, h, w = case["shape"]
        return 2.0 * b * c * h * w * c * (9 if case["op"] == "conv3x3" else 1)
    if case["op"] == "attention":
        b, heads, c, t = case["shape"]
        return 4.0 * b * heads * c * t * t
    return 0.0


def op_inputs(case: dict, rng) -> dict[str, np.ndarray]:
    """float32 inputs of one op case (the same recipe on both sides)."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    op, shape = case["op"], case["shape"]
    if op == "matmul":
        m, k, n = shape
        return {"a": normal(m, k), "b": normal(k, n)}
    if op == "attention":
        b, heads, c, t = shape
        return {"qkv": normal(b, 3 * heads * c, t)}
    if op in ("conv3x3", "conv1x1"):
        c, k = shape[1], 3 if op == "conv3x3" else 1
        return {"x": normal(*shape), "weight": normal(c, c, k, k) * 0.05, "bias": normal(c)}
    inputs = {"x": normal(*shape)}
    if op in ("group_norm", "group_norm_silu"):
        inputs.update(weight=1 + 0.1 * normal(shape[1]), bias=normal(shape[1]))
    if op == "spade_film_silu":
        inputs.update(gamma=0.1 * normal(*shape), beta=normal(*shape),
                      scale=0.1 * normal(shape[0], shape[1], 1, 1), shift=normal(shape[0], shape[1], 1, 1))
    return inputs


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def load_average() -> float:
    return os.getloadavg()[0]


def timed(fn):
    """A runner: runs ``fn`` ``calls`` times back to back and returns the seconds of each call."""
    def run(calls: int) -> list[float]:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    return run


def time_rounds(runners: dict, repeats: int, warmup: int, calls: int, pause: float) -> dict:
    """Median and minimum seconds per call of each runner. Each round gives every runner in turn
    a burst of ``calls`` back-to-back calls (so Jittor's paths and PyTorch see the same load) and
    keeps the burst's median: the steady state of an op inside a network. The first call after
    a rest pays for waking the OpenMP threads, which on this kind of machine (a VM) took
    milliseconds with GNU OpenMP's default wait policy; ``pause`` seconds of rest before each
    burst let the previous runner's spinning threads (PyTorch's, in its own process) go idle."""
    for run in runners.values():
        run(warmup)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            time.sleep(pause)
            times[name].append(statistics.median(run(calls)))
    return {name: summarize(values) for name, values in times.items()}


# ----------------------------------------------------------------------------------- Jittor


def jittor_op(jt, case: dict, inputs: dict):
    """(forward function of the Jittor Vars, names of the inputs to differentiate)."""
    from models import layers

    op = case["op"]
    if op == "matmul":
        return (lambda v: jt.matmul(v["a"], v["b"])), ["a", "b"]
    if op in ("conv3x3", "conv1x1"):
        padding = 1 if op == "conv3x3" else 0
        return (lambda v: layers.conv2d(v["x"], v["weight"], v["bias"], padding=padding)), \
            ["x", "weight", "bias"]
    if op == "attention":
        heads = case["shape"][1]
        return (lambda v: layers.qkv_attention_legacy(v["qkv"], heads)), ["qkv"]
    if op == "silu":
        return (lambda v: layers.silu(v["x"])), ["x"]
    if op == "group_norm":
        return (lambda v: layers.group_norm(v["x"], GROUPS, v["weight"], v["bias"])), list(inputs)
    if op == "group_norm_silu":
        return (lambda v: layers.group_norm_act(v["x"], GROUPS, v["weight"], v["bias"], silu=True)), \
            list(inputs)
    return (lambda v: layers.group_norm_act(v["x"], GROUPS, gamma=v["gamma"], beta=v["beta"],
                                            scale=v["scale"], shift=v["shift"], silu=True)), list(inputs)


def jittor_op_steps(jt, case: dict) -> dict:
    """{mode: {path: step}} for one op case; matmul has one path (no kernel of ours)."""
    from models.layers import use_kernels

    rng = np.random.default_rng(0)
    arrays = op_inputs(case, rng)
    values = {k: jt.array(v) for k, v in arrays.items()}
    fn, wrt = jittor_op(jt, case, arrays)
    with jt.no_grad():
        probe = jt.array(rng.standard_normal(fn(values).shape).astype(np.float32))

    def step(enabled: bool, backward: bool):
        def run():
            with use_kernels(enabled):
                if backward:
                    # The output is synced too: Jittor would skip a forward whose result no
                    # gradient needs (matmul, convolution, SiLU), while PyTorch computes it.
                    y = fn(values)
                    jt.sync([y] + jt.grad((y * probe).sum(), [values[k] for k in wrt]))
                else:
                    with jt.no_grad():
                        fn(values).sync()
        return run

    paths = ({"kernels": True} if case["op"] == "matmul"
             else {"reference": False, "kernels": True})
    return {mode: {path: step(enabled, backward) for path, enabled in paths.items()}
            for mode, backward in (("fwd", False), ("fwd+bwd", True))}


def random_unet(jt, preset: str, batch: int):
    """A preset U-Net whose zero-initialised layers are randomised (so outputs can be compared)
    and fixed inputs (x, t, mask, target) for a batch."""
    from models import UNetModel, unet_preset

    config = unet_preset(preset)
    model = UNetModel(config)
    rng = np.random.default_rng(1)
    for p in model.parameters():
        if not np.any(p.numpy()):
            p.update(jt.array((0.05 * rng.standard_normal(p.shape)).astype(np.float32)))
    height, width = LATENT_SIZES[preset]
    x = rng.standard_normal((batch, config.in_channels, height, width)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch).astype(np.int64)
    labels = rng.integers(0, config.num_classes, size=(batch, height, width))
    mask = np.eye(config.num_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy()
    target = rng.standard_normal((batch, config.out_channels, height, width)).astype(np.float32)
    return model, config, dict(x=x, t=t, mask=mask, target=target)


def jittor_unet_steps(jt, preset: str, mode: str, batch: int, exchange: Path):
    """({path: step}, GFLOP of one step, the spec the PyTorch side needs to build the same net)."""
    from bench.bench_unet import count_flops
    from models.layers import use_kernels

    model, config, data = random_unet(jt, preset, batch)
    x, t, mask, target = (jt.array(data[k]) for k in ("x", "t", "mask", "target"))
    params = model.parameters()
    with count_flops() as flops:
        model(x, t, mask)
    with jt.no_grad():
        output = model(x, t, mask).numpy()
    path = exchange / f"{preset}_{mode}_{batch}.npz"
    np.savez(path, output=output, **data, **{"param:" + k: v.numpy() for k, v in model.state_dict().items()})

    def step(enabled: bool):
        def train():
            with use_kernels(enabled):
                loss = ((model(x, t, mask) - target) ** 2).mean()
                jt.sync(jt.grad(loss, params))

        def sample():
            with use_kernels(enabled), jt.no_grad():
                model(x, t, mask).sync()
        return train if mode == "train" else sample

    gflop = flops[0] / 1e9 * (3 if mode == "train" else 1)
    spec = dict(preset=preset, mode=mode, batch=batch, config=config.to_dict(), exchange=str(path))
    return {"reference": step(False), "kernels": step(True)}, gflop, spec


# ----------------------------------------------------------------------------------- PyTorch
# The worker runs in the --torch_python interpreter and imports none of the Jittor code. It
# answers one JSON command per line on stdin with one "RESULT {...}" line on stdout.


def torch_op(torch, case: dict):
    import torch.nn.functional as F

    op = case["op"]
    if op == "matmul":
        return lambda v: v["a"] @ v["b"]
    if op in ("conv3x3", "conv1x1"):
        padding = 1 if op == "conv3x3" else 0
        return lambda v: F.conv2d(v["x"], v["weight"], v["bias"], padding=padding)
    if op == "silu":
        return lambda v: F.silu(v["x"])
    if op == "group_norm":
        return lambda v: F.group_norm(v["x"], GROUPS, v["weight"], v["bias"])
    if op == "group_norm_silu":
        return lambda v: F.silu(F.group_norm(v["x"], GROUPS, v["weight"], v["bias"]))
    if op == "spade_film_silu":
        return lambda v: F.silu((F.group_norm(v["x"], GROUPS) * (1 + v["gamma"]) + v["beta"])
                                * (1 + v["scale"]) + v["shift"])
    heads = case["shape"][1]

    def attention(v):  # guided-diffusion's QKVAttentionLegacy.forward
        qkv = v["qkv"]
        bs, width, length = qkv.shape
        ch = width // (3 * heads)
        q, k, val = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / ch ** 0.25
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, val).reshape(bs, -1, length)
    return attention


def torch_op_steps(torch, case: dict) -> dict:
    rng = np.random.default_rng(0)
    values = {k: torch.from_numpy(v) for k, v in op_inputs(case, rng).items()}
    fn = torch_op(torch, case)
    with torch.no_grad():
        probe = torch.from_numpy(rng.standard_normal(tuple(fn(values).shape)).astype(np.float32))
    leaves = {k: v.clone().requires_grad_(True) for k, v in values.items()}

    def forward():
        with torch.no_grad():
            fn(values)

    def backward():
        for v in leaves.values():
            v.grad = None
        (fn(leaves) * probe).sum().backward()
    return {"fwd": forward, "fwd+bwd": backward}


def worker_env(threads: int, sdm_path: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's worker process: ``threads`` threads, and SDM's source
    folder (``--sdm_path``, which holds ``guided_diffusion/``) importable through PYTHONPATH."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
    if sdm_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(Path(sdm_path).resolve()), env.get("PYTHONPATH"))))
    return env


def module_command(python: str, module: str, *args: str) -> list[str]:
    """``python -m module args``: run from the repository root (``cwd=ROOT``), so the project
    imports the standard way in any interpreter, PyTorch's venv included."""
    return [python, "-m", module, *args]


def sdm_unet(config: dict):
    """SDM's UNetModel with this project's preset widths: SDM fixes 32 groups and a SPADE hidden
    width of 128, so ``normalization`` and ``SPADEGroupNorm`` are rebuilt with the preset's.
    SDM's source comes from PYTHONPATH (``worker_env``)."""
    try:
        import guided_diffusion.nn as gnn
        import guided_diffusion.unet as gunet
    except ImportError as exc:
        raise SystemExit(f"cannot import SDM's guided_diffusion ({exc}): give --sdm_path, the folder of "
                         "SDM's repository that holds guided_diffusion/") from None
    from torch import nn

    groups, hidden = config["norm_groups"], config["spade_hidden_channels"]
    original_spade = gunet.__dict__.setdefault("_original_spade", gunet.SPADEGroupNorm)

    class SPADEGroupNorm(original_spade):
        def __init__(self, norm_nc, label_nc, eps=1e-5):
            nn.Module.__init__(self)
            self.norm = nn.GroupNorm(groups, norm_nc, affine=False)
            self.eps = eps
            self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
            self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
            self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    gunet.normalization = lambda channels: gnn.GroupNorm32(groups, channels)
    gunet.SPADEGroupNorm = SPADEGroupNorm
    return gunet.UNetModel(
        image_size=64, in_channels=config["in_channels"], model_channels=config["model_channels"],
        out_channels=config["in_channels"] * (2 if config["learn_sigma"] else 1),
        num_res_blocks=config["num_res_blocks"], attention_resolutions=tuple(config["attention_resolutions"]),
        dropout=config["dropout"], channel_mult=tuple(config["channel_mult"]),
        conv_resample=config["conv_resample"],
        num_classes=config["num_classes"], num_heads=config["num_heads"],
        num_head_channels=config["num_head_channels"], num_heads_upsample=config["num_heads_upsample"],
        use_scale_shift_norm=config["use_scale_shift_norm"], resblock_updown=config["resblock_updown"])


def torch_unet_steps(torch, spec: dict):
    """({mode: step}, relative difference of SDM's output from the Jittor model's, same weights)."""
    data = np.load(spec["exchange"])
    model = sdm_unet(spec["config"])
    state = {k[len("param:"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("param:")}
    model.load_state_dict(state, strict=True)
    x, t, mask, target = (torch.from_numpy(data[k]) for k in ("x", "t", "mask", "target"))
    with torch.no_grad():
        output = model(x, t, mask).numpy()
    expected = data["output"]
    difference = float(np.abs(output - expected).max() / max(float(np.abs(expected).max()), 1e-12))

    def train():
        model.zero_grad(set_to_none=True)
        ((model(x, t, mask) - target) ** 2).mean().backward()

    def sample():
        with torch.no_grad():
            model(x, t, mask)
    return {"train": train, "sample": sample}, difference


def torch_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    steps = {}

    def answer(**values):
        print("RESULT " + json.dumps(values), flush=True)

    answer(version=torch.__version__, threads=torch.get_num_threads())
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "op":
            steps[command["id"]] = torch_op_steps(torch, command["case"])
            answer(ok=True)
        elif command["cmd"] == "unet":
            steps[command["id"]], difference = torch_unet_steps(torch, command["spec"])
            answer(ok=True, relative_difference=difference)
        elif command["cmd"] == "run":
            answer(times=timed(steps[command["id"]][command["mode"]])(command["n"]))
        else:
            return


class WorkerProcess:
    """A benchmark's other half in a subprocess (another interpreter, e.g. PyTorch's venv) that
    answers one JSON command per line with a ``RESULT {json}`` line; its first answer is ``info``."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"the PyTorch worker stopped (exit code {self.proc.wait()}); see its stderr above")

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


class TorchWorker(WorkerProcess):
    """The PyTorch half, in a subprocess of ``python`` with ``threads`` threads."""

    def __init__(self, python: str, threads: int, sdm_path: str | None):
        super().__init__(module_command(python, "bench.bench_ops", "--torch_worker", str(threads)),
                         worker_env(threads, sdm_path))
        self.next_id = 0

    def op(self, case: dict) -> dict:
        """{mode: runner} for an op case."""
        key, self.next_id = self.next_id, self.next_id + 1
        self.ask(cmd="op", id=key, case=case)
        return {mode: self._runner(key, mode) for mode in ("fwd", "fwd+bwd")}

    def unet(self, spec: dict):
        key, self.next_id = self.next_id, self.next_id + 1
        got = self.ask(cmd="unet", id=key, spec=spec)
        return self._runner(key, spec["mode"]), got["relative_difference"]

    def _runner(self, key: int, mode: str):
        return lambda calls: self.ask(cmd="run", id=key, mode=mode, n=calls)["times"]


def run_all(args, cases: list[dict], unet_specs: list, exchange: Path) -> tuple[list, list, dict | None]:
    import jittor_env

    jt = jittor_env.setup(force_cpu=True)
    worker = TorchWorker(args.torch_python, args.threads, args.sdm_path) if args.torch_python else None
    op_rows, unet_rows = [], []
    try:
        for case in cases:
            jittor_steps = jittor_op_steps(jt, case)
            torch_steps = worker.op(case) if worker else {}
            load = load_average()
            for mode, paths in jittor_steps.items():
                runners = {path: timed(step) for path, step in paths.items()}
                if worker:
                    runners["torch"] = torch_steps[mode]
                got = time_rounds(runners, args.repeats, args.warmup, args.calls, args.pause)
                op_rows.append(dict(case=case, label=case_label(case), mode=mode, times=got,
                                    load=[load, load_average()]))
            print(f"  {case_label(case)} (load {load:.1f})", file=sys.stderr, flush=True)
        for preset, mode, batch in unet_specs:
            paths, gflop, spec = jittor_unet_steps(jt, preset, mode, batch, exchange)
            runners = {path: timed(step) for path, step in paths.items()}
            difference = None
            if worker:
                runners["torch"], difference = worker.unet(spec)
            load = load_average()
            got = time_rounds(runners, args.unet_repeats, args.warmup, 1, args.pause)
            unet_rows.append(dict(preset=preset, mode=mode, batch=batch, gflop=gflop, times=got,
                                  relative_difference=difference, load=[load, load_average()]))
            print(f"  U-Net {preset} {mode} batch {batch} (load {load:.1f})", file=sys.stderr, flush=True)
    finally:
        if worker:
            worker.close()
    return op_rows, unet_rows, worker.info if worker else None


# ----------------------------------------------------------------------------------- report


def ms(summary: dict | None) -> str:
    return f"{summary['median_s'] * 1e3:9.2f}" if summary else f"{'-':>9}"


def ratio(a: dict | None, b: dict | None, key: str = "median_s") -> str:
    return f"{a[key] / b[key]:.2f}" if a and b else "-"


def report(op_rows: list, unet_rows: list, matmul_peak: float) -> None:
    print("\nOps: median ms; ratios of medians (of minima in brackets); ref = Jittor's plain ops, "
          "kern = Jittor with models/kernels.py, torch = PyTorch's built-in ops")
    print(f"{'op':30} {'mode':8} {'ref':>9} {'kern':>9} {'torch':>9} {'kern/ref':>8} {'kern/torch':>17}"
          f" {'GFLOP/s':>8} {'load':>9}")
    for r in op_rows:
        t = r["times"]
        ref, kern, torch_t = t.get("reference"), t["kernels"], t.get("torch")
        flops = op_flops(r["case"]) * (3 if r["mode"] == "fwd+bwd" else 1)
        rate = f"{flops / kern['median_s'] / 1e9:8.1f}" if flops else f"{'':8}"
        both = f"{ratio(kern, torch_t)} ({ratio(kern, torch_t, 'min_s')})" if torch_t else "-"
        print(f"{r['label']:30} {r['mode']:8} {ms(ref)} {ms(kern)} {ms(torch_t)} {ratio(kern, ref):>8} "
              f"{both:>17} {rate} {r['load'][0]:4.1f}-{r['load'][1]:<4.1f}")
    print(f"\nU-Net steps: median s; GFLOP/s of the median, and % of the 1024^3 matmul peak "
          f"({matmul_peak:.0f} GFLOP/s: its fastest run); same out = SDM's output vs Jittor's, relative")
    print(f"{'preset':6} {'mode':6} {'batch':>5} {'GFLOP':>6} {'ref':>7} {'kern':>7} {'torch':>7} {'kern/ref':>8} "
          f"{'kern/torch':>17} {'GF/s kern':>13} {'GF/s torch':>13} {'same out':>8} {'load':>9}")
    for r in unet_rows:
        t = r["times"]
        ref, kern, torch_t = t["reference"], t["kernels"], t.get("torch")

        def rate(summary):
            if not summary:
                return f"{'-':>13}"
            gflops = r["gflop"] / summary["median_s"]
            if matmul_peak != matmul_peak:  # no matmul timed (--ops without matmul)
                return f"{gflops:13.1f}"
            return f"{gflops:6.1f} ({100 * gflops / matmul_peak:3.0f}%)"
        both = f"{ratio(kern, torch_t)} ({ratio(kern, torch_t, 'min_s')})" if torch_t else "-"
        torch_s = f"{torch_t['median_s']:7.3f}" if torch_t else f"{'-':>7}"
        same = f"{r['relative_difference']:8.1e}" if r["relative_difference"] is not None else f"{'-':>8}"
        print(f"{r['preset']:6} {r['mode']:6} {r['batch']:5d} {r['gflop']:6.2f} {ref['median_s']:7.3f} "
              f"{kern['median_s']:7.3f} {torch_s} {ratio(kern, ref):>8} {both:>17} {rate(kern)} {rate(torch_t)} "
              f"{same} {r['load'][0]:4.1f}-{r['load'][1]:<4.1f}")


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch_python", help="python of a separate environment with torch (CPU)")
    parser.add_argument("--sdm_path", help="folder holding SDM's guided_diffusion/ (for the PyTorch U-Net)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both frameworks (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per op (default 20)")
    parser.add_argument("--unet_repeats", type=int, default=10, help="timed rounds per U-Net step (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation)")
    parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per op timing (default 10)")
    parser.add_argument("--pause", type=float, default=0.02,
                        help="seconds of rest before each timed burst (default 0.02; see time_rounds)")
    parser.add_argument("--presets", default="tiny,demo", help="U-Net presets (default tiny,demo)")
    parser.add_argument("--train_batch", type=int, default=4)
    parser.add_argument("--sample_batch", type=int, default=4)
    parser.add_argument("--ops", help="comma-separated op names to keep (default: all)")
    parser.add_argument("--ops_only", action="store_true", help="skip the U-Net steps")
    parser.add_argument("--unet_only", action="store_true", help="skip the ops")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--torch_worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.torch_worker:
        torch_worker(args.torch_worker)
        return 0
    if args.torch_python and not args.ops_only and not args.sdm_path:
        parser.error("--sdm_path is needed for the PyTorch U-Net (or pass --ops_only)")
    # Jittor's kernels and oneDNN read the OpenMP thread count when they start.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    wanted = args.ops.split(",") if args.ops else None
    cases = [] if args.unet_only else [c for c in op_cases() if wanted is None or c["op"] in wanted]
    unet_specs = [] if args.ops_only else [
        (preset, mode, args.train_batch if mode == "train" else args.sample_batch)
        for preset in args.presets.split(",") for mode in ("train", "sample")]
    with tempfile.TemporaryDirectory() as tmp:
        op_rows, unet_rows, torch_info = run_all(args, cases, unet_specs, Path(tmp))
    # The peak is the best 1024^3 matmul either framework managed (its fastest run).
    peak = [r for r in op_rows if r["case"]["op"] == "matmul" and r["mode"] == "fwd"]
    matmul_peak = (op_flops(peak[0]["case"]) / min(t["min_s"] for t in peak[0]["times"].values()) / 1e9
                   if peak else float("nan"))
    from bench.bench_unet import machine_line

    print(f"machine: {machine_line(False)}; {args.threads} threads; load average now {load_average():.1f}")
    if torch_info:
        print(f"torch {torch_info['version']} ({torch_info['threads']} threads)")
    report(op_rows, unet_rows, matmul_peak)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(ops=op_rows, unet=unet_rows, matmul_peak_gflops=matmul_peak,
                                                   torch=torch_info, threads=args.threads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

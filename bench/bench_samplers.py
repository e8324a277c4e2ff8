"""Sampler cost and accuracy: U-Net passes per image of every pipeline preset against its error on
the analytic oracle (bench/oracle.py), the measurements the solver presets were chosen from (with
ldm.samplers; the variants it does not carry: bench/solver_variants.py), and the wall time per
step of each sampler around a tiny stand-in network.

    python -m bench.bench_samplers [--selection] [--skip_accuracy] [--skip_timing]
                                   [--batch_size 2] [--height 96] [--width 128] [--steps 20] [--cpu]

Passes count per image: with classifier-free guidance each step evaluates the network on the
masked and the null mask (one batched call of 2B, i.e. 2 passes per image). Accuracy: each round
of a preset runs on its own from the oracle's data noised to the round's level (1024 points, float64)
and its error is the largest |result - exact ODE solution|; the oracle has no mask, guidance or
colour transfer, so it measures the solver and its grid alone. The timing uses a two-convolution
network, so it measures the samplers' own per-step work (coefficients, tensor arithmetic, one
sync) plus a small fixed network cost that is reported separately.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np


import cli
import jittor_env

SOLVERS = ("dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc")


def pass_counts() -> list[tuple[str, list[int], list[str], int]]:
    """(preset, steps per round, sampler per round, U-Net passes per image) rows."""
    from ldm import pipeline
    from ldm.schedule import make_schedule

    schedule = make_schedule()
    rows = []
    for name in pipeline.PRESETS:
        rounds = pipeline.preset_rounds(name, schedule)
        rows.append((name, [r.stage.num_steps for r in rounds], [r.sampler for r in rounds],
                     pipeline.unet_passes(rounds)))
    return rows


def preset_accuracy(schedule, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """{preset: {data set: [error of each round]}} on the oracle."""
    from bench.oracle import DATA, rounds_errors
    from ldm import pipeline

    return {name: {data_name: rounds_errors(pipeline.preset_rounds(name, schedule), data, schedule, seed)
                   for data_name, data in DATA.items()}
            for name in pipeline.PRESETS}


def end_table(schedule, official: dict[str, list[float]], ends=(0, 1, 2, 3, 4, 5, 6, 8, 10),
              seed: int = 0) -> dict[int, list[float]]:
    """{end level: [largest error / official round's error over the data sets, per round]} of the
    ``fast`` preset's solvers and steps on logSNR grids that stop at each end level."""
    import dataclasses

    from bench.oracle import DATA, rounds_errors
    from ldm.pipeline import SOLVER_PRESETS, solver_rounds

    table = {}
    for end in ends:
        rounds = solver_rounds(schedule, dataclasses.replace(SOLVER_PRESETS["fast"], end_level=end))
        errors = {name: rounds_errors(rounds, data, schedule, seed) for name, data in DATA.items()}
        table[end] = [max(errors[name][i] / official[name][i] for name in DATA) for i in range(len(rounds))]
    return table


def selection_table(schedule, official: dict[str, list[float]], steps=range(4, 17), end_level: int = 4,
                    seed: int = 0) -> dict[tuple[int, str, int], float]:
    """{(round, sampler, steps): largest error / official round's error over the data sets}, each
    solver on logSNR grids from the round's level to ``end_level``: the table the solver presets
    were read from."""
    from bench.oracle import DATA, round_error
    from ldm.pipeline import IIDM_LEVELS_SCALES
    from ldm.respace import solver_timesteps
    from ldm.samplers import SAMPLERS

    table = {}
    for index, (level, _) in enumerate(IIDM_LEVELS_SCALES):
        for sampler in SOLVERS:
            for n in steps:
                ts = solver_timesteps(schedule, level, n, "logSNR", end_level)
                table[index, sampler, n] = max(
                    round_error(data, schedule, SAMPLERS[sampler], level, ts, seed) / official[name][index]
                    for name, data in DATA.items())
    return table


def grid_errors(schedule, steps=(10, 20), levels=(600, 640, 400)) -> dict[tuple, float]:
    """{(data set, steps, level, spacing): error} of DPM-Solver++(2M) on each solver spacing."""
    from bench.oracle import DATA, round_error
    from ldm.respace import SOLVER_SPACINGS, solver_timesteps
    from ldm.samplers import dpm_solver_pp_2m

    return {(name, n, level, spacing): round_error(data, schedule, dpm_solver_pp_2m, level,
                                                   solver_timesteps(schedule, level, n, spacing))
            for name, data in DATA.items() for n in steps for level in levels
            for spacing in SOLVER_SPACINGS}


def order_errors(schedule, steps=(20, 40, 80), start: int = 999, end: int = 199) -> dict[str, list[float]]:
    """{sampler: [error at each step count]} on the mixture over time-uniform grids from ``start``
    to ``end``, against the x0 prediction at ``end`` of the exact ODE solution."""
    import jittor as jt

    from bench.oracle import MIXTURE, SHAPE, jittor_model_fn
    from ldm.samplers import ddim_sample, dpm_solver_pp_2m, dpm_solver_pp_3m, unipc

    abar = schedule.alphas_cumprod
    x = MIXTURE.noised(abar[start], SHAPE, seed=1)
    reference = MIXTURE.x0_prediction(MIXTURE.flow(x, abar[start], abar[end], rk4_steps=1000), abar[end])
    model = jittor_model_fn(MIXTURE, schedule)
    samplers = {"ddim": ddim_sample, "dpm_solver_pp_2m": dpm_solver_pp_2m,
                "dpm_solver_pp_3m": dpm_solver_pp_3m, "unipc order 1": lambda *a: unipc(*a, order=1),
                "unipc order 2": unipc, "unipc order 3": lambda *a: unipc(*a, order=3)}
    return {name: [float(np.abs(sampler(model, schedule, jt.array(x, dtype="float64"),
                                        [int(v) for v in np.linspace(start, end, n + 1)]).numpy()
                                - reference).max()) for n in steps]
            for name, sampler in samplers.items()}


def _tiny_network(jt, channels: int, num_classes: int, width: int = 8):
    nn = jt.nn

    class TinyNet(nn.Module):
        """Stand-in for the U-Net: unet(x_t, t, mask) -> [B, 2C, H, W]."""

        def __init__(self):
            super().__init__()
            self.conv_in = nn.Conv2d(channels + num_classes, width, 3, padding=1)
            self.time = nn.Linear(1, width)
            self.conv_out = nn.Conv2d(width, 2 * channels, 3, padding=1)

        def execute(self, x_t, t, mask):
            h = self.conv_in(jt.concat([x_t, mask], dim=1))
            h = h + self.time(t.float32().reshape(-1, 1) / 1000.0).reshape(-1, width, 1, 1)
            return self.conv_out(h * jt.sigmoid(h))

    return TinyNet()


def time_samplers(jt, batch: int, height: int, width: int, steps: int, num_classes: int = 29,
                  channels: int = 3, repeats: int = 5) -> dict[str, float]:
    """Seconds per step of each sampler (guided, batched) and per bare network call on 2B."""
    from ldm.guidance import classifier_free_guidance
    from ldm.respace import solver_timesteps
    from ldm.samplers import PerImageNoise, ddim_sample, ddpm_sample, dpm_solver_pp_2m, dpm_solver_pp_3m, unipc
    from ldm.schedule import make_schedule

    schedule = make_schedule()
    net = _tiny_network(jt, channels, num_classes)
    net.eval()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, size=(batch, height, width))
    mask = jt.array(np.eye(num_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2))
    x = jt.array(rng.standard_normal((batch, channels, height, width)).astype(np.float32))
    model_fn = classifier_free_guidance(net, mask, 3.5)
    timesteps = solver_timesteps(schedule, 600, steps)
    runs = {
        "ddim (eta 0)": lambda: ddim_sample(model_fn, schedule, x, timesteps),
        "ddpm (learned variance)": lambda: ddpm_sample(model_fn, schedule, x, timesteps,
                                                       noise_fn=PerImageNoise(range(batch))),
        "dpm_solver_pp_2m": lambda: dpm_solver_pp_2m(model_fn, schedule, x, timesteps),
        "dpm_solver_pp_3m": lambda: dpm_solver_pp_3m(model_fn, schedule, x, timesteps),
        "unipc (order 2)": lambda: unipc(model_fn, schedule, x, timesteps),
    }
    x2 = jt.concat([x, x])
    t2 = jt.full((2 * batch,), 300, dtype="int32")
    m2 = jt.concat([mask, mask])

    def bare_calls():
        with jt.no_grad():
            for _ in range(steps):
                out = net(x2, t2, m2)
                out.sync()
        return out

    runs = {"network call on 2B": bare_calls, **runs}
    results = {}
    for name, run in runs.items():
        run().sync()  # compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run().sync()
            best = min(best, (time.perf_counter() - start) / steps)
        results[name] = best
    return results


def print_accuracy(selection: bool) -> None:
    from bench.oracle import DATA, SHAPE
    from ldm import pipeline
    from ldm.schedule import make_schedule

    schedule = make_schedule()
    points = int(np.prod(SHAPE))
    print(f"\nOracle error per round (largest |result - exact ODE solution| over {points} points; "
          "in brackets: / the official round's)")
    accuracy = preset_accuracy(schedule)
    official = accuracy["iidm"]
    passes = {name: p for name, _, _, p in pass_counts()}
    official_levels = [r.stage.start_level for r in pipeline.preset_rounds("iidm", schedule)]
    for name, per_data in accuracy.items():
        levels = [r.stage.start_level for r in pipeline.preset_rounds(name, schedule)]
        for data_name, errors in per_data.items():
            # a ratio only where the round starts from the official round's level
            cells = "  ".join(f"{e:.4f} ({e / t:.2f})" if level == official_level else f"{e:.4f} (t={level})"
                              for e, t, level, official_level in zip(errors, official[data_name], levels,
                                                                     official_levels))
            print(f"  {name:10s} {passes[name]:5d} passes  {data_name:8s}  {cells}")
    print("\nData: " + "; ".join(f"{k} {v!r}" for k, v in DATA.items()))

    print("\nGrids, DPM-Solver++(2M):")
    grids = grid_errors(schedule)
    for name, n, level in dict.fromkeys(key[:3] for key in grids):
        print(f"  {name:8s} {n:2d} calls from t = {level}: "
              + "  ".join(f"{key[3]} {grids[key]:.4f}" for key in grids if key[:3] == (name, n, level)))

    print("\nConvergence on the mixture, time-uniform grids 999 -> 199 (20, 40, 80 steps):")
    for name, errors in order_errors(schedule).items():
        orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        print(f"  {name:17s} " + "  ".join(f"{e:.2e}" for e in errors)
              + "   orders " + "  ".join(f"{o:.2f}" for o in orders))

    print("\nThe fast preset's solvers and steps on logSNR grids stopping at t = end (largest error / "
          "official round's error over both data sets):")
    for end, ratios in end_table(schedule, official).items():
        print(f"  end {end:2d}  " + "  ".join(f"{r:.2f}" for r in ratios))

    if selection:
        for end in (0, 4):
            print(f"\nLargest error / official round's error over both data sets, logSNR grids to t = {end}, "
                  "steps 4..16:")
            table = selection_table(schedule, official, end_level=end)
            for index in range(3):
                print(f"  round {index}")
                for sampler in SOLVERS:
                    print(f"    {sampler:17s} " + " ".join(f"{table[index, sampler, n]:6.2f}"
                                                         for n in range(4, 17)))


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", dest="batch", type=int, default=2, help="images per batch (default 2)")
    parser.alias("--batch", "--batch_size")
    parser.add_argument("--height", type=int, default=96, help="latent height (default 96)")
    parser.add_argument("--width", type=int, default=128, help="latent width (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run (default 20)")
    parser.add_argument("--selection", action="store_true",
                        help="also print every solver's error at 4..16 steps per round (about a minute)")
    parser.add_argument("--skip_accuracy", action="store_true", help="skip the oracle measurements")
    parser.add_argument("--skip_timing", action="store_true", help="skip the wall-time measurement")
    jittor_env.add_arguments(parser)
    args = parser.parse_args(argv)

    print("U-Net passes per image (classifier-free guidance: 2 per step)")
    for name, steps, samplers, passes in pass_counts():
        print(f"  {passes:5d}  {name}: steps {steps}, {', '.join(dict.fromkeys(samplers))}")
    if args.skip_accuracy and args.skip_timing:
        return 0
    jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    if not args.skip_accuracy:
        print_accuracy(args.selection)
    if args.skip_timing:
        return 0

    device = "cuda" if jt.flags.use_cuda else "cpu"
    results = time_samplers(jt, args.batch, args.height, args.width, args.steps)
    net_time = results.pop("network call on 2B")
    print(f"\nWall time per step, batch {args.batch}, latent 3x{args.height}x{args.width}, "
          f"guided (one call on {2 * args.batch}), tiny stand-in network, {device}:")
    print(f"  {1e3 * net_time:8.2f} ms  network call alone")
    for name, seconds in results.items():
        extra = 1e3 * (seconds - net_time)
        print(f"  {1e3 * seconds:8.2f} ms  {name} (sampler + guidance work {extra:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

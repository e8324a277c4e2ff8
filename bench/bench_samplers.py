"""Sampler cost: network passes per image for the official IIDM recipe and for DPM-Solver++(2M),
and the wall time per step of each sampler around a tiny stand-in network.

    python -m bench.bench_samplers [--batch 2] [--height 96] [--width 128] [--steps 20] [--cpu]

Passes count per image: with classifier-free guidance each step evaluates the network on the
masked and the null mask (one batched call of 2B, i.e. 2 passes per image). The timing uses a
two-convolution network, so it measures the samplers' own per-step work (coefficients, tensor
arithmetic, one sync) plus a small fixed network cost that is reported separately.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


import jittor_env

OFFICIAL_RECIPE = (("ddim500", 300), ("ddim500", 320), ("ddim50", 20))


def pass_counts(solver_steps=(10, 15, 20, 25, 30)) -> list[tuple[str, list[int], int]]:
    """(setting, steps per round, network passes per image with guidance) rows."""
    from ldm.respace import iidm_stage

    rounds = [iidm_stage(spacing, start) for spacing, start in OFFICIAL_RECIPE]
    levels = [r.start_level for r in rounds]
    rows = [("official IIDM: DDIM eta 0, " + " / ".join(f"{s} from {i}" for s, i in OFFICIAL_RECIPE),
             [r.num_steps for r in rounds], 2 * sum(r.num_steps for r in rounds))]
    for n in solver_steps:
        steps = [min(n, level + 1) for level in levels]
        rows.append((f"DPM-Solver++(2M), {n} steps per round from levels {levels}", steps,
                     2 * sum(steps)))
    return rows


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
    from ldm.samplers import PerImageNoise, ddim_sample, ddpm_sample, dpm_solver_pp_2m
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--height", type=int, default=96, help="latent height (default 96)")
    parser.add_argument("--width", type=int, default=128, help="latent width (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run (default 20)")
    parser.add_argument("--skip-timing", action="store_true", help="print the pass counts only")
    jittor_env.add_arguments(parser)
    args = parser.parse_args(argv)

    print("Network passes per image (classifier-free guidance: 2 per step)")
    for setting, steps, passes in pass_counts():
        print(f"  {passes:5d}  {setting}: steps {steps}")
    if args.skip_timing:
        return 0

    jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
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

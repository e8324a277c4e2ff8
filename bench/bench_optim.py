"""The optimizer step alone: Jittor's AdamW plus the per-tensor EMA against the fused step.

    python -m bench.bench_optim --presets demo,tiny --repeats 15

Over a preset U-Net's parameters with fixed random gradients, one step is an AdamW update (lr 1e-4,
weight decay 0.01) and the EMA (decay 0.9999), synced. The two are timed in alternation, round by
round, so load changes hit both; medians and minima in milliseconds, with the 1-minute load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import cli


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,demo")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    import jittor_env

    jt = jittor_env.setup()
    from ldm.ema import EMA
    from models import UNET_PRESETS, UNetModel, unet_preset
    from training.optim import FusedAdamW

    presets = args.presets.split(",")
    if any(p not in UNET_PRESETS for p in presets):
        parser.error(f"unknown preset in {presets}; choose from {sorted(UNET_PRESETS)}")
    print("| preset | tensors | params (M) | Jittor AdamW + EMA ms (min) | fused ms (min) | ratio | load avg |")
    print("|---|---|---|---|---|---|---|")
    for preset in presets:
        named = [(n, p) for n, p in UNetModel(unet_preset(preset)).named_parameters() if not p.is_stop_grad()]
        params = [p for _, p in named]
        grads = [jt.randn(p.shape) * 0.01 for p in params]
        jt.sync(grads)
        ema = EMA(named, 0.9999)
        plain = jt.optim.AdamW(params, 1e-4, weight_decay=0.01)
        fused = FusedAdamW(params, 1e-4, weight_decay=0.01)

        def step(opt, is_fused):
            opt.param_groups[0]["grads"] = list(grads)
            opt.n_step += 1
            if is_fused:
                opt.step(ema=ema.vars(), ema_decay=ema.decay)
            else:
                opt.step()
                ema.update()
            jt.sync(params + ema.vars() + opt.param_groups[0]["m"] + opt.param_groups[0]["values"])

        times = {False: [], True: []}
        load = os.getloadavg()[0]
        for round_ in range(args.warmup + args.repeats):
            for is_fused, opt in ((False, plain), (True, fused)):
                start = time.perf_counter()
                step(opt, is_fused)
                if round_ >= args.warmup:
                    times[is_fused].append(time.perf_counter() - start)
        a, b = (1e3 * statistics.median(times[k]) for k in (False, True))
        print(f"| {preset} | {len(params)} | {sum(p.numel() for p in params) / 1e6:.2f} | {a:.1f} "
              f"({1e3 * min(times[False]):.1f}) | {b:.1f} ({1e3 * min(times[True]):.1f}) | {b / a:.2f} | "
              f"{(load + os.getloadavg()[0]) / 2:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

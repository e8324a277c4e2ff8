"""Peak memory of writing a training checkpoint (weights, EMA and both Adam moments of a U-Net).

    python -m bench.bench_save                          # the iidm U-Net: about 7.5 GiB written to /tmp
    python -m bench.bench_save --preset demo --out /tmp/x.safetensors --values numpy

The arrays are built with the names, shapes and dtype of an LDM training checkpoint
(``model/``, ``ema/``, ``optim/m/``, ``optim/v/`` for every parameter of the preset's U-Net) and
held in memory as Jittor Vars, as the training loop holds them (``--values numpy``: numpy arrays).
The process's peak-RSS mark is reset (``/proc/self/clear_refs``), the checkpoint is written with
``weights.checkpoint.save_checkpoint``, and the growth of the peak over the resident size before
the write is printed beside the largest tensor, the file size and the time. The file is deleted
afterwards. Free disk and memory are checked first; the script refuses to start without enough.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import cli

MIB = 1024.0 ** 2
PREFIXES = ("model", "ema", "optim/m", "optim/v")


def status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def available_mib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> bool:
    """Set VmHWM back to the current resident size (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def unet_shapes(jt, preset: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the preset's U-Net; Jittor creates parameters lazily, so the
    shapes are known without computing (or holding) the weights."""
    from models import UNetModel, unet_preset

    model = UNetModel(unet_preset(preset))
    shapes = {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}
    del model
    jt.gc()
    return shapes


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="iidm", help="U-Net preset (default iidm)")
    parser.add_argument("--output_path", type=Path, default=Path("/tmp/bench_save.safetensors"),
                        help="where to write the checkpoint (deleted afterwards)")
    parser.add_argument("--values", choices=("jittor", "numpy"), default="jittor",
                        help="hold the state as Jittor Vars (as training does) or numpy arrays")
    parser.alias("--out", "--output_path")
    args = parser.parse_args(argv)

    import jittor_env

    jt = jittor_env.setup(force_cpu=True)
    import numpy as np

    from models import unet_preset
    from models.unet import PRESET_DIFFUSION
    from weights.checkpoint import TRAIN_SUFFIX, save_checkpoint

    config = {"network": unet_preset(args.preset).to_dict(), "diffusion": PRESET_DIFFUSION["iidm"]}
    shapes = unet_shapes(jt, args.preset)
    sizes = {name: 4 * math.prod(shape) for name, shape in shapes.items()}
    total = len(PREFIXES) * sum(sizes.values())
    largest = max(sizes, key=sizes.get)
    args.output_path.parent.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(args.output_path.parent).free
    if free_disk < total + 2 ** 30:
        print(f"bench_save: {args.output_path.parent} has {free_disk / 2 ** 30:.1f} GiB free, the checkpoint needs "
              f"{total / 2 ** 30:.1f} GiB + 1 GiB", file=sys.stderr)
        return 1
    if available_mib() * MIB < total + 2 * 2 ** 30:
        print(f"bench_save: {available_mib() / 1024:.1f} GiB of memory available, the arrays need "
              f"{total / 2 ** 30:.1f} GiB + 2 GiB", file=sys.stderr)
        return 1

    print(f"{args.preset} U-Net: {len(shapes)} parameter arrays, {sum(sizes.values()) / 4:,.0f} parameters; "
          f"checkpoint {len(PREFIXES)} x {sum(sizes.values()) / MIB:.0f} MiB = {total / MIB:.0f} MiB "
          f"({total / 2 ** 30:.2f} GiB); largest tensor {largest} {shapes[largest]} {sizes[largest] / MIB:.1f} MiB")
    arrays = {}
    for index, prefix in enumerate(PREFIXES):
        for name, shape in shapes.items():
            if args.values == "numpy":
                arrays[f"{prefix}/{name}"] = np.full(shape, index + 1, np.float32)
            else:
                var = jt.full(shape, float(index + 1), "float32")
                jt.sync([var])
                arrays[f"{prefix}/{name}"] = var
    resident = status_mib("VmRSS:")
    if not reset_peak():
        print("bench_save: cannot reset the peak-RSS mark (/proc/self/clear_refs); the growth printed "
              "is over the peak reached while building the arrays", file=sys.stderr)
    before = status_mib("VmHWM:")
    start = time.perf_counter()
    try:
        save_checkpoint(args.output_path, arrays, kind="unet" + TRAIN_SUFFIX, config=config, extra={"step": 0})
        seconds = time.perf_counter() - start
        written = args.output_path.stat().st_size
    finally:
        if args.output_path.exists():
            args.output_path.unlink()
    peak = status_mib("VmHWM:")
    print(f"values held as {args.values}: resident {resident:.0f} MiB before saving")
    print(f"saving: {written / MIB:.0f} MiB in {seconds:.1f} s ({written / MIB / seconds:.0f} MiB/s); "
          f"peak RSS {before:.0f} -> {peak:.0f} MiB: growth {peak - before:.1f} MiB "
          f"(largest tensor {sizes[largest] / MIB:.1f} MiB); file deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())

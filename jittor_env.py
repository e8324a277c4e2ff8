"""Prepare Jittor's environment; import this module before anything imports ``jittor``.

Jittor reads its configuration from environment variables once, at import time, and on the
machines we run on its defaults are harmful:

* ``nvcc`` may be on disk without a GPU or a CUDA driver; Jittor then builds for CUDA and
  ``import jittor`` crashes. A usable GPU is detected by loading the driver (``libcuda.so.1``),
  calling ``cuInit(0)`` and ``cuDeviceGetCount`` (> 0). Without one, ``nvcc_path`` is set to the
  empty string and the CUDA-only externals (cutlass, nccl, cutt) are switched off.
* cutlass is downloaded at first use, even on GPU machines: always off.
* ``FIX_TORCH_ERROR`` makes Jittor import torch when it can: off.
* MPI is only wanted under ``mpirun``: ``use_mpi=0`` otherwise.
* Compile chatter is hidden with ``log_silent=1`` during the import (unless verbose), and
  switched back on right after, because the same switch also hides warnings.

oneDNN for the CPU comes from the ``jittor-offline`` package, so nothing is downloaded.

Usage (entry points and tests do this first)::

    import jittor_env
    jt = jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)

Importing this module alone already writes the environment variables (auto-detected device,
``IIDM_FORCE_CPU`` and ``IIDM_VERBOSE`` honoured), so library code that does
``import jittor_env`` before ``import jittor`` is safe on its own; ``setup`` additionally imports
Jittor, turns CUDA on when chosen and logs the device in one line.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, MutableMapping

log = logging.getLogger("iidm")

FORCE_CPU_ENV = "IIDM_FORCE_CPU"
VERBOSE_ENV = "IIDM_VERBOSE"
CUDA_DRIVER = "libcuda.so.1"
# Places Jittor itself looks for nvcc after the PATH (jittor/compiler.py).
NVCC_FALLBACKS = ("/usr/local/cuda/bin/nvcc", "/usr/bin/nvcc", "/opt/cuda/bin/nvcc")


@dataclass(frozen=True)
class DeviceChoice:
    """The device Jittor will use, and why."""

    use_cuda: bool
    reason: str
    gpu_count: int = 0
    nvcc_path: str = ""

    @property
    def name(self) -> str:
        return "cuda" if self.use_cuda else "cpu"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def cuda_device_count(load_library: Callable[[str], object] = ctypes.CDLL) -> tuple[int, str]:
    """Number of CUDA devices the driver reports, and a reason when it is 0.

    Only the driver API can say whether a GPU is usable: ``nvcc`` or ``libcudart`` on disk
    prove nothing. ``load_library`` is injectable so tests can fake the driver.
    """
    try:
        driver = load_library(CUDA_DRIVER)
    except OSError:
        return 0, f"no CUDA driver: {CUDA_DRIVER} cannot be loaded"
    try:
        status = driver.cuInit(0)
        if status != 0:
            return 0, f"CUDA driver present but cuInit(0) failed with error {status}"
        count = ctypes.c_int(0)
        status = driver.cuDeviceGetCount(ctypes.byref(count))
        if status != 0:
            return 0, f"CUDA driver present but cuDeviceGetCount failed with error {status}"
    except AttributeError as exc:
        return 0, f"{CUDA_DRIVER} lacks the driver API ({exc})"
    if count.value <= 0:
        return 0, "CUDA driver present but it reports no device"
    return count.value, f"{count.value} CUDA device(s) found"


def find_nvcc(environ: MutableMapping[str, str] = os.environ) -> str:
    """The nvcc Jittor would use: ``$nvcc_path`` when set, else PATH, else the usual places."""
    if environ.get("nvcc_path"):
        return environ["nvcc_path"]
    found = shutil.which("nvcc", path=environ.get("PATH"))
    if found:
        return found
    for candidate in NVCC_FALLBACKS:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return ""


def choose_device(
    force_cpu: bool = False,
    environ: MutableMapping[str, str] = os.environ,
    load_library: Callable[[str], object] = ctypes.CDLL,
) -> DeviceChoice:
    """CUDA when a driver reports a device and nvcc exists to compile kernels; else the CPU."""
    if force_cpu or _truthy(environ.get(FORCE_CPU_ENV)):
        how = "--cpu" if force_cpu else f"{FORCE_CPU_ENV}=1"
        return DeviceChoice(False, f"forced by {how}")
    count, reason = cuda_device_count(load_library)
    if count == 0:
        return DeviceChoice(False, reason)
    nvcc = find_nvcc(environ)
    if not nvcc:
        return DeviceChoice(
            False, f"{reason} but no nvcc to compile kernels (install the CUDA toolkit "
            "or set nvcc_path)", gpu_count=count)
    return DeviceChoice(True, reason, gpu_count=count, nvcc_path=nvcc)


def configure_environ(
    choice: DeviceChoice, verbose: bool = False, environ: MutableMapping[str, str] = os.environ
) -> None:
    """Write the variables Jittor reads at import time for ``choice``."""
    environ["FIX_TORCH_ERROR"] = "0"
    environ["use_cutlass"] = "0"
    if not choice.use_cuda:
        environ["nvcc_path"] = ""
        environ["use_nccl"] = "0"
        environ["use_cutt"] = "0"
    else:
        environ["nvcc_path"] = choice.nvcc_path
    if "OMPI_COMM_WORLD_SIZE" not in environ:
        environ["use_mpi"] = "0"
    if verbose:
        environ.pop("log_silent", None)
    else:
        environ["log_silent"] = "1"


_state: dict = {"choice": None, "verbose": False}


def configure(force_cpu: bool = False, verbose: bool | None = None) -> DeviceChoice:
    """Choose the device and write the environment, unless Jittor is already imported."""
    if verbose is None:
        verbose = _truthy(os.environ.get(VERBOSE_ENV))
    force_cpu = force_cpu or _truthy(os.environ.get(FORCE_CPU_ENV))
    if "jittor" in sys.modules:
        current = _state["choice"]
        if current is None or (force_cpu and current.use_cuda):
            raise RuntimeError(
                "jittor was imported before jittor_env configured it; import jittor_env "
                "(and call jittor_env.setup) before anything imports jittor")
        return current
    choice = choose_device(force_cpu=force_cpu)
    configure_environ(choice, verbose=verbose)
    _state.update(choice=choice, verbose=verbose)
    return choice


def setup(force_cpu: bool = False, verbose: bool | None = None):
    """Configure, import Jittor, turn CUDA on when chosen, log the device once; return ``jittor``."""
    first = "jittor" not in sys.modules
    choice = configure(force_cpu=force_cpu, verbose=verbose)
    import jittor as jt
    import jittor_utils

    if first:
        # log_silent also hides warnings and errors (failed parameter loads among them).
        jt.flags.log_silent = 0
        jittor_utils.LOG.log_silent = 0
        os.environ.pop("log_silent", None)
        jt.flags.use_cuda = 1 if choice.use_cuda else 0
        log.info("device: %s (%s); jittor %s", choice.name, choice.reason, jt.__version__)
    return jt


def add_arguments(parser) -> None:
    """Add ``--cpu`` and ``--verbose`` to an argparse parser (every entry point has them)."""
    parser.add_argument("--cpu", action="store_true",
                        help=f"run on the CPU even when a GPU is usable (or set {FORCE_CPU_ENV}=1)")
    parser.add_argument("--verbose", action="store_true",
                        help=f"show Jittor's compiler output (or set {VERBOSE_ENV}=1)")


READY_MARKER = "JITTOR_READY"


def main(argv=None) -> int:
    """``python -m jittor_env``: import Jittor (compiling its core on first use), check one
    numpy round trip and one convolution against numpy, and print the ready marker."""
    import argparse

    import numpy as np

    parser = argparse.ArgumentParser(description=main.__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    jt = setup(force_cpu=args.cpu, verbose=args.verbose)
    x = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7) / 10.0 - 5.0
    w = np.linspace(-1.0, 1.0, 4 * 3, dtype=np.float32).reshape(4, 3, 1, 1)
    got = jt.nn.conv2d(jt.array(x), jt.array(w)).numpy()
    expected = np.einsum("oi,bihw->bohw", w[:, :, 0, 0].astype(np.float64), x.astype(np.float64))
    error = float(np.abs(got - expected).max())
    if not error < 1e-4:
        print(f"jittor_env: a 1x1 convolution differs from numpy by {error:.3g}; "
              "is numpy >= 2 installed? (requirements.txt pins numpy<2)", file=sys.stderr)
        return 1
    print(f"{READY_MARKER} device={'cuda' if jt.flags.use_cuda else 'cpu'} "
          f"jittor={jt.__version__} numpy={np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif "jittor" not in sys.modules:
    # Importing the module makes the environment safe at once; setup() may refine it later.
    configure()

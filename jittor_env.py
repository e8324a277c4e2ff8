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

On CUDA, ``setup`` first checks what would stop Jittor's JIT (``cuda_problems``: a CUDA 13
toolkit, an nvcc too old for the GPU generation, a driver older than the toolkit, cuDNN 8 missing,
more MPI ranks than GPUs, NCCL to download) and logs each with what to set; if the import still
fails, the error repeats them. Under ``mpirun`` a system NCCL is handed to Jittor when present.

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
import re
import shutil
import subprocess
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
        if "OMPI_COMM_WORLD_SIZE" in environ and environ.get("use_nccl", "1") != "0" \
                and not environ.get("nccl_lib_path"):
            # A system NCCL saves Jittor from downloading and building its own under mpirun.
            found = system_nccl()
            if found:
                environ.setdefault("nccl_include_path", found[0])
                environ["nccl_lib_path"] = found[1]
    if "OMPI_COMM_WORLD_SIZE" not in environ:
        environ["use_mpi"] = "0"
    if verbose:
        environ.pop("log_silent", None)
    else:
        environ["log_silent"] = "1"


# ------------------------------------------------------------------------------ CUDA checks
# The oldest nvcc that can compile for a compute capability (major, minor); newer GPUs than the
# table need at least its last entry.
NVCC_FOR_CAPABILITY = (((7, 0), (9, 0)), ((8, 0), (11, 0)), ((8, 6), (11, 1)), ((8, 9), (11, 8)),
                       ((9, 0), (11, 8)), ((10, 0), (12, 8)))
JITTOR_CUDA = "~/.cache/jittor/jtcuda/cuda12.2_cudnn8_linux/bin/nvcc"  # what jittor_utils.install_cuda installs
# Jittor 1.3.11 loads these by their unversioned names (cuDNN 8's development files); cuDNN 9 renamed them.
CUDNN_LIBRARIES = ("libcudnn.so", "libcudnn_ops_infer.so", "libcudnn_cnn_train.so")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib")


@dataclass(frozen=True)
class GPU:
    """One device as the driver reports it."""

    name: str
    capability: tuple[int, int]
    memory_bytes: int


def nvcc_version(nvcc: str, run: Callable = subprocess.run) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("release 12.4, V12.4.131"), None if it fails."""
    try:
        text = run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def gpu_facts(load_library: Callable[[str], object] = ctypes.CDLL) -> tuple[tuple[int, int] | None, list[GPU]]:
    """The CUDA version the driver supports and each device's name, compute capability and
    memory, from the driver API (empty when there is no usable driver)."""
    try:
        driver = load_library(CUDA_DRIVER)
        if driver.cuInit(0) != 0:
            return None, []
        version = ctypes.c_int(0)
        driver.cuDriverGetVersion(ctypes.byref(version))
        count = ctypes.c_int(0)
        driver.cuDeviceGetCount(ctypes.byref(count))
        gpus = []
        for index in range(count.value):
            device = ctypes.c_int(0)
            driver.cuDeviceGet(ctypes.byref(device), index)
            name = ctypes.create_string_buffer(256)
            driver.cuDeviceGetName(name, 256, device)
            major, minor, memory = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_size_t(0)
            driver.cuDeviceGetAttribute(ctypes.byref(major), 75, device)   # COMPUTE_CAPABILITY_MAJOR
            driver.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)   # COMPUTE_CAPABILITY_MINOR
            driver.cuDeviceTotalMem_v2(ctypes.byref(memory), device)
            gpus.append(GPU(name.value.decode(errors="replace"), (major.value, minor.value), memory.value))
    except (OSError, AttributeError):
        return None, []
    return (version.value // 1000, version.value % 1000 // 10), gpus


def _version(v) -> str:
    return ".".join(map(str, v))


def _find_file(dirs, name: str) -> str:
    for folder in dirs:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return ""


def cuda_problems(nvcc: str, nvcc_ver: tuple[int, int] | None, driver_ver: tuple[int, int] | None,
                  gpus: list[GPU], environ: MutableMapping[str, str] = os.environ,
                  find_file: Callable[[tuple, str], str] = _find_file) -> list[str]:
    """What would stop Jittor's CUDA JIT on this machine, each as one line saying what to set.

    Checked: the toolkit's version (Jittor 1.3.11 predates CUDA 13), the oldest nvcc each GPU
    generation needs (sm_90 needs 11.8, sm_100 and newer 12.8), a driver older than the toolkit,
    cuDNN 8 where Jittor looks for it, and under mpirun the GPUs per rank and NCCL."""
    problems = []
    fix_toolkit = (f"install a CUDA 12.x toolkit (>= 12.8 for sm_100 and newer) with cuDNN 8 and set "
                   f"nvcc_path to its nvcc, or run `python -m jittor_utils.install_cuda` (downloads CUDA 12.2 "
                   f"with cuDNN 8) and set nvcc_path={JITTOR_CUDA}")
    if nvcc and nvcc_ver is None:
        problems.append(f"{nvcc} --version does not say its release: {fix_toolkit}")
    if nvcc_ver and nvcc_ver[0] >= 13:
        problems.append(f"{nvcc} is CUDA {_version(nvcc_ver)}; Jittor 1.3.11 supports CUDA toolkits up to 12.x: "
                        f"{fix_toolkit}")
    for gpu in gpus:
        needed = [nv for cap, nv in NVCC_FOR_CAPABILITY if gpu.capability >= cap][-1:] or [(9, 0)]
        if nvcc_ver and nvcc_ver < needed[0]:
            problems.append(f"{gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]}) needs nvcc "
                            f"{_version(needed[0])} or newer, {nvcc} is {_version(nvcc_ver)}: {fix_toolkit}")
    if driver_ver and nvcc_ver and driver_ver < nvcc_ver:
        problems.append(f"the driver supports CUDA up to {_version(driver_ver)} but {nvcc} is "
                        f"{_version(nvcc_ver)}, whose kernels it cannot load: update the NVIDIA driver, or set "
                        f"nvcc_path to a toolkit <= {_version(driver_ver)}")
    if nvcc:
        roots = dict.fromkeys(os.path.dirname(os.path.dirname(p)) for p in (os.path.abspath(nvcc), os.path.realpath(nvcc)))
        dirs = (os.path.dirname(nvcc), *(os.path.join(root, sub) for root in roots
                                         for sub in ("lib64", os.path.join("targets", "x86_64-linux", "lib"))),
                *LIBRARY_DIRS)
        missing = [name for name in CUDNN_LIBRARIES if not find_file(dirs, name)]
        if missing:
            problems.append(f"cuDNN 8 not found ({', '.join(missing)} missing in {', '.join(dirs)}); Jittor 1.3.11 "
                            f"loads cuDNN 8's libraries by these names (cuDNN 9 renamed them): install cuDNN 8.9's "
                            f"development files for your CUDA there, or {fix_toolkit.split(', or ', 1)[1]}")
    if "OMPI_COMM_WORLD_SIZE" in environ and gpus:
        local = int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", environ["OMPI_COMM_WORLD_SIZE"]))
        if local > len(gpus):
            problems.append(f"{local} MPI ranks on this machine share {len(gpus)} GPU(s): start one rank per GPU "
                            f"(mpirun -np {len(gpus)} per machine, e.g. --map-by ppr:{len(gpus)}:node over a hostfile)")
        if environ.get("use_nccl", "1") != "0" and not environ.get("nccl_lib_path"):
            cached = os.path.expanduser("~/.cache/jittor/nccl/nccl-2.8.4-1/build/lib/libnccl.so")
            if not os.path.isfile(cached):
                problems.append("under mpirun Jittor downloads NCCL 2.8.4 from GitHub and builds it; without network, "
                                "install NCCL (Debian/Ubuntu: libnccl2 libnccl-dev) and set "
                                "nccl_include_path=/usr/include nccl_lib_path=/usr/lib/x86_64-linux-gnu")
    return problems


def system_nccl(find_file: Callable[[tuple, str], str] = _find_file) -> tuple[str, str] | None:
    """(include folder, library folder) of a system NCCL (libnccl-dev), or None."""
    header = find_file(("/usr/include", "/usr/local/include"), "nccl.h")
    library = find_file(LIBRARY_DIRS, "libnccl.so")
    return (os.path.dirname(header), os.path.dirname(library)) if header and library else None


def cuda_report(choice: DeviceChoice) -> tuple[str, list[str]]:
    """One line describing the CUDA setup (GPUs, driver, nvcc) and the problems found."""
    driver_ver, gpus = gpu_facts()
    nvcc = choice.nvcc_path or find_nvcc()
    nvcc_ver = nvcc_version(nvcc) if nvcc else None
    described = "; ".join(f"{g.name} sm_{g.capability[0]}{g.capability[1]} {g.memory_bytes / 2 ** 30:.1f} GiB"
                          for g in gpus) or "no GPU"
    line = (f"{described}; driver CUDA {_version(driver_ver) if driver_ver else '-'}; "
            f"nvcc {nvcc or '-'} {_version(nvcc_ver) if nvcc_ver else ''}".rstrip())
    return line, cuda_problems(nvcc, nvcc_ver, driver_ver, gpus) if gpus else []


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
    if first and choice.use_cuda:
        _, problems = cuda_report(choice)
        for problem in problems:
            log.warning("CUDA: %s", problem)
    try:
        import jittor as jt
        import jittor_utils
    except BaseException as exc:
        if not (first and choice.use_cuda) or isinstance(exc, KeyboardInterrupt):
            raise
        raise RuntimeError(
            f"Jittor failed to set up CUDA ({type(exc).__name__}: {exc}); "
            + (" / ".join(problems) if problems else f"rerun with {VERBOSE_ENV}=1 to see its compiler output")
            + f"; or run on the CPU with {FORCE_CPU_ENV}=1 (--cpu)") from exc

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

"""Environment preparation: device detection with a faked driver, the variables Jittor reads,
a real import on this machine (nvcc on PATH, no GPU), and the numpy<2 round-trip trap."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jittor_env

REPO = Path(__file__).resolve().parents[1]


class FakeDriver:
    """Stands in for libcuda.so.1: cuInit and cuDeviceGetCount with chosen results."""

    def __init__(self, count=1, init_status=0, count_status=0):
        self.count, self.init_status, self.count_status = count, init_status, count_status
        self.calls = []

    def cuInit(self, flags):
        self.calls.append(("cuInit", flags))
        return self.init_status

    def cuDeviceGetCount(self, pointer):
        self.calls.append(("cuDeviceGetCount",))
        pointer._obj.value = self.count
        return self.count_status


def loader_for(driver):
    def load(name):
        assert name == "libcuda.so.1"
        if driver is None:
            raise OSError(f"{name}: cannot open shared object file")
        return driver
    return load


@pytest.fixture
def fake_nvcc(tmp_path):
    """An executable named nvcc on a PATH of its own, which records if it is ever run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\ntouch {tmp_path / 'nvcc_was_run'}\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    return nvcc


def test_driver_absent_means_cpu(fake_nvcc):
    choice = jittor_env.choose_device(environ={"PATH": str(fake_nvcc.parent)},
                                      load_library=loader_for(None))
    assert not choice.use_cuda and choice.name == "cpu"
    assert "libcuda.so.1" in choice.reason


def test_driver_present_with_devices_means_cuda(fake_nvcc):
    driver = FakeDriver(count=2)
    choice = jittor_env.choose_device(environ={"PATH": str(fake_nvcc.parent)},
                                      load_library=loader_for(driver))
    assert choice.use_cuda and choice.gpu_count == 2 and choice.nvcc_path == str(fake_nvcc)
    assert driver.calls == [("cuInit", 0), ("cuDeviceGetCount",)]


@pytest.mark.parametrize("driver, words", [
    (FakeDriver(count=0), "no device"),
    (FakeDriver(init_status=100), "cuInit(0) failed with error 100"),
    (FakeDriver(count_status=3), "cuDeviceGetCount failed"),
])
def test_driver_without_usable_device_means_cpu(driver, words, fake_nvcc):
    choice = jittor_env.choose_device(environ={"PATH": str(fake_nvcc.parent)},
                                      load_library=loader_for(driver))
    assert not choice.use_cuda and words in choice.reason


def test_gpu_without_nvcc_falls_back_to_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(jittor_env, "NVCC_FALLBACKS", ())
    choice = jittor_env.choose_device(environ={"PATH": str(tmp_path)},
                                      load_library=loader_for(FakeDriver(count=1)))
    assert not choice.use_cuda and "no nvcc" in choice.reason


def test_force_cpu_by_flag_and_environment():
    driver = FakeDriver(count=4)
    by_flag = jittor_env.choose_device(force_cpu=True, environ={}, load_library=loader_for(driver))
    by_env = jittor_env.choose_device(environ={"IIDM_FORCE_CPU": "1"}, load_library=loader_for(driver))
    assert not by_flag.use_cuda and "--cpu" in by_flag.reason
    assert not by_env.use_cuda and "IIDM_FORCE_CPU" in by_env.reason
    assert driver.calls == []


def test_cpu_environment_switches_off_cuda_and_downloads():
    environ = {"nvcc_path": "/usr/local/bin/nvcc"}
    jittor_env.configure_environ(jittor_env.DeviceChoice(False, "test"), environ=environ)
    assert environ["nvcc_path"] == ""
    for name in ("use_cutlass", "use_nccl", "use_cutt", "use_mpi", "FIX_TORCH_ERROR"):
        assert environ[name] == "0", name
    assert environ["log_silent"] == "1"


def test_cuda_environment_keeps_nvcc_and_drops_cutlass():
    environ = {"OMPI_COMM_WORLD_SIZE": "2"}
    choice = jittor_env.DeviceChoice(True, "test", gpu_count=1, nvcc_path="/opt/cuda/bin/nvcc")
    jittor_env.configure_environ(choice, verbose=True, environ=environ)
    assert environ["nvcc_path"] == "/opt/cuda/bin/nvcc" and environ["use_cutlass"] == "0"
    assert "use_nccl" not in environ and "use_mpi" not in environ  # MPI stays on under mpirun
    assert "log_silent" not in environ


def test_real_import_with_nvcc_on_path_and_no_gpu(fake_nvcc, tmp_path):
    """The crash this module exists for: nvcc on PATH, no usable GPU, `import jittor`."""
    script = textwrap.dedent("""
        import logging, os, sys
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        import jittor_env
        jittor_env.cuda_device_count = lambda load_library=None: (0, "driver faked absent")
        jt = jittor_env.setup()
        assert os.environ["nvcc_path"] == "", os.environ["nvcc_path"]
        assert jt.flags.use_cuda == 0
        print("MARKER", float((jt.ones((2, 3)) * 2).sum().item()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("IIDM_FORCE_CPU", "nvcc_path", "log_silent")}
    env["PATH"] = f"{fake_nvcc.parent}:{env['PATH']}"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MARKER 12.0" in result.stdout
    device_lines = [line for line in result.stderr.splitlines() if "device:" in line]
    assert device_lines == ["iidm: device: cpu (driver faked absent); jittor 1.3.11.0"]
    assert "[i " not in result.stderr, "Jittor's import chatter was not silenced"
    assert not (tmp_path / "nvcc_was_run").exists()


def test_warm_up_command_prints_marker():
    result = subprocess.run([sys.executable, "-m", "jittor_env", "--cpu"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(jittor_env.READY_MARKER + " device=cpu")


# ---- the numpy<2 trap: arrays from numpy must survive Jittor ops -----------------------

def test_numpy_is_below_2():
    assert int(np.__version__.split(".")[0]) < 2, "Jittor 1.3.11 corrupts arrays from numpy>=2"


@pytest.mark.parametrize("src, dst", [((1, 8), (1, 3)), ((1, 8), (1, 5)), ((1, 8), (1, 16)),
                                      ((6, 8), (3, 4)), ((6, 8), (24, 32)), ((7, 9), (5, 6))])
def test_nearest_resize_round_trip_matches_numpy_index_rule(jt, src, dst):
    """floor(dst_index * in / out) is PyTorch's interpolate(mode="nearest") rule."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3) + src).astype(np.float32)
    got = jt.nn.interpolate(jt.array(x), size=dst, mode="nearest").numpy()
    rows = np.floor(np.arange(dst[0]) * src[0] / dst[0]).astype(int)
    cols = np.floor(np.arange(dst[1]) * src[1] / dst[1]).astype(int)
    np.testing.assert_array_equal(got, x[:, :, rows][:, :, :, cols])


def test_gather_round_trip(jt):
    x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    index = np.array([4, 0, 2, 2], dtype=np.int32)
    np.testing.assert_array_equal(jt.array(x)[jt.array(index)].numpy(), x[index])
    np.testing.assert_array_equal(jt.array(x).numpy(), x)


@pytest.mark.cuda
def test_cuda_is_used_when_a_gpu_is_usable(jt):
    assert jittor_env.choose_device().use_cuda and jt.flags.use_cuda == 1
    x = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    np.testing.assert_allclose((jt.array(x) @ jt.array(x)).numpy(), x.astype(np.float64) @ x, atol=1e-3)


# ------------------------------------------------------------------------------ CUDA set-up checks
H100 = jittor_env.GPU("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2 ** 30)


def all_cudnn(dirs, name):
    return f"{dirs[0]}/{name}"


def no_file(dirs, name):
    return ""


def test_a_good_cuda_12_setup_has_no_problem():
    assert jittor_env.cuda_problems("/usr/local/cuda/bin/nvcc", (12, 4), (12, 6), [H100], environ={},
                                    find_file=all_cudnn) == []


@pytest.mark.parametrize("nvcc_ver, driver_ver, gpu, words", [
    ((13, 0), (13, 0), H100, ["CUDA 13.0", "up to 12.x", "nvcc_path="]),
    ((11, 7), (12, 2), H100, ["sm_90", "needs nvcc 11.8 or newer", "nvcc_path"]),
    ((12, 4), (12, 4), jittor_env.GPU("B200", (10, 0), 1), ["sm_100", "needs nvcc 12.8"]),
    ((12, 4), (12, 2), H100, ["driver supports CUDA up to 12.2", "toolkit <= 12.2"]),
])
def test_cuda_problems_say_what_to_set(nvcc_ver, driver_ver, gpu, words):
    problems = jittor_env.cuda_problems("/opt/cuda/bin/nvcc", nvcc_ver, driver_ver, [gpu], environ={},
                                        find_file=all_cudnn)
    assert len(problems) == 1, problems
    assert all(word in problems[0] for word in words), problems[0]


def test_missing_cudnn_8_is_named_with_the_places_searched():
    (problem,) = jittor_env.cuda_problems("/opt/cuda/bin/nvcc", (12, 4), (12, 4), [H100], environ={},
                                          find_file=no_file)
    assert "cuDNN 8 not found" in problem and "libcudnn_cnn_train.so" in problem and "/opt/cuda/lib64" in problem
    assert "jittor_utils.install_cuda" in problem


def test_mpi_ranks_beyond_the_gpus_and_nccl_download_are_reported(monkeypatch):
    monkeypatch.setattr(jittor_env.os.path, "expanduser", lambda path: "/nonexistent/libnccl.so")
    environ = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    problems = jittor_env.cuda_problems("/opt/cuda/bin/nvcc", (12, 4), (12, 4), [H100, H100], environ=environ,
                                        find_file=all_cudnn)
    assert any("4 MPI ranks on this machine share 2 GPU(s)" in p and "mpirun -np 2" in p for p in problems)
    assert any("NCCL" in p and "nccl_lib_path=" in p and "use_nccl" not in p for p in problems)
    quiet = jittor_env.cuda_problems("/opt/cuda/bin/nvcc", (12, 4), (12, 4), [H100, H100],
                                     environ={**environ, "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "use_nccl": "0"},
                                     find_file=all_cudnn)
    assert quiet == []


def test_nvcc_version_is_read_from_nvcc(fake_nvcc):
    assert jittor_env.nvcc_version(str(fake_nvcc)) == (12, 4)
    assert jittor_env.nvcc_version("/nonexistent/nvcc") is None


def test_gpu_facts_from_a_faked_driver():
    class Driver(FakeDriver):
        def cuDriverGetVersion(self, pointer):
            pointer._obj.value = 12040
            return 0

        def cuDeviceGet(self, pointer, index):
            pointer._obj.value = index
            return 0

        def cuDeviceGetName(self, buffer, size, device):
            buffer.value = b"NVIDIA H200"
            return 0

        def cuDeviceGetAttribute(self, pointer, attribute, device):
            pointer._obj.value = {75: 9, 76: 0}[attribute]
            return 0

        def cuDeviceTotalMem_v2(self, pointer, device):
            pointer._obj.value = 141 * 2 ** 30
            return 0

    driver_version, gpus = jittor_env.gpu_facts(loader_for(Driver(count=1)))
    assert driver_version == (12, 4)
    assert gpus == [jittor_env.GPU("NVIDIA H200", (9, 0), 141 * 2 ** 30)]
    assert jittor_env.gpu_facts(loader_for(None)) == (None, [])


def test_a_system_nccl_is_used_under_mpirun_on_cuda(monkeypatch):
    monkeypatch.setattr(jittor_env, "system_nccl", lambda: ("/usr/include", "/usr/lib/x86_64-linux-gnu"))
    choice = jittor_env.DeviceChoice(True, "test", gpu_count=2, nvcc_path="/opt/cuda/bin/nvcc")
    environ = {"OMPI_COMM_WORLD_SIZE": "2"}
    jittor_env.configure_environ(choice, environ=environ)
    assert environ["nccl_include_path"] == "/usr/include"
    assert environ["nccl_lib_path"] == "/usr/lib/x86_64-linux-gnu"
    for outside in ({}, {"OMPI_COMM_WORLD_SIZE": "2", "use_nccl": "0"}):   # no mpirun, or NCCL switched off
        jittor_env.configure_environ(choice, environ=outside)
        assert "nccl_lib_path" not in outside


def test_system_nccl_needs_both_header_and_library():
    def finder(files):
        return lambda dirs, name: next((f"{d}/{name}" for d in dirs if f"{d}/{name}" in files), "")

    both = {"/usr/include/nccl.h", "/usr/lib/x86_64-linux-gnu/libnccl.so"}
    assert jittor_env.system_nccl(finder(both)) == ("/usr/include", "/usr/lib/x86_64-linux-gnu")
    assert jittor_env.system_nccl(finder({"/usr/include/nccl.h"})) is None

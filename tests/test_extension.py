"""The compiled extension: built by setup.py (CUDA part whenever a toolkit and a CUDA torch exist) and by CMake."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import denseclip_fast as dcf
from denseclip_fast import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toolkit() -> str | None:
    """The CUDA toolkit setup.py would use, or None."""
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_extension.CUDA_HOME):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    return None


def test_extension_loads_and_reports_its_build():
    assert ops.extension_available()
    info = ops.build_info()
    assert info["version"] == dcf.__version__
    cuda_expected = torch.version.cuda is not None and _toolkit() is not None and os.environ.get("DENSECLIP_FAST_CUDA") != "0"
    assert (info["cuda"] is not None) == cuda_expected, info
    if info["cuda"] is not None:
        assert info["cuda"]["archs"], info  # compiled for at least one GPU architecture


def test_setup_decides_the_cuda_build():
    wanted = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="not_main")["cuda_build_wanted"]
    assert wanted("13.0", "/usr/local/cuda", None)
    assert not wanted(None, "/usr/local/cuda", None)  # CPU-only torch: CPU-only build, no error
    assert not wanted("13.0", None, None)  # no toolkit: CPU-only build, no error
    assert not wanted("13.0", "/usr/local/cuda", "0")
    with pytest.raises(SystemExit, match="torch is a CPU-only build"):
        wanted(None, None, "1")
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        wanted("13.0", "/x", "yes")


def _nvrtc() -> str | None:
    import glob

    try:
        import nvidia  # type: ignore[import-not-found]  # torch's CUDA runtime wheels
    except ImportError:
        return None

    for base in nvidia.__path__:
        found = sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
        if found:
            return found[0]
    return None


def _run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_cmake_builds_the_library_for_cpp_consumers(tmp_path):
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split()[2]
    if tuple(int(v) for v in version.split(".")[:2]) < (3, 26):
        pytest.skip(f"cmake {version} is too old for torch's CMake config (>= 3.26; make setup installs one)")
    args = [cmake, "-S", ROOT, "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja"):
        args += ["-G", "Ninja"]
    toolkit = _toolkit()
    # The CUDA sources are compiled by setup.py already (see the test above); compiling them a second time here
    # costs CI minutes, so CMake's CUDA path runs where DENSECLIP_FAST_CMAKE_CUDA=1 (benchmarks/gpu_check.sh).
    with_cuda = torch.version.cuda is not None and toolkit is not None and os.environ.get("DENSECLIP_FAST_CMAKE_CUDA") == "1"
    if torch.version.cuda is not None:
        if toolkit is None:
            pytest.skip("a CUDA build of torch needs a CUDA toolkit for find_package(Torch)")
        # TorchConfig needs the toolkit even for CPU code; nvrtc ships with torch's pip packages, not the toolkit
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}", f"-DCMAKE_CUDA_COMPILER={toolkit}/bin/nvcc"]
        if _nvrtc():
            args.append(f"-DCUDA_nvrtc_LIBRARY={_nvrtc()}")
    args.append(f"-DDENSECLIP_FAST_CUDA={'ON' if with_cuda else 'OFF'}")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"}
    _run(args, env)
    _run([cmake, "--build", str(tmp_path), "-j", "2"], env)
    info = json.loads(_run([str(tmp_path / "denseclip_fast_info")], env))
    assert info["version"] == dcf.__version__
    assert (info["cuda"] is not None) == with_cuda

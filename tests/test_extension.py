"""The compiled extension: built by setup.py (CUDA part whenever a toolkit and a CUDA torch exist) and by CMake."""

from __future__ import annotations

import json
import os
import runpy

import pytest
import torch

import denseclip_fast as dcf
from denseclip_fast import ops

from .conftest import ROOT, cuda_toolkit


def test_extension_loads_and_reports_its_build():
    assert ops.extension_available()
    info = ops.build_info()
    assert info["version"] == dcf.__version__
    cuda_expected = (
        torch.version.cuda is not None and cuda_toolkit() is not None and os.environ.get("DENSECLIP_FAST_CUDA") != "0"
    )
    assert (info["cuda"] is not None) == cuda_expected, info
    if info["cuda"] is not None:
        archs = info["cuda"]["archs"]  # compiled for at least one GPU architecture, as 10 * major + minor
        assert archs and all(30 <= arch < 200 for arch in archs), info
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            assert archs == [90], info  # setup.py's default without a GPU: sm_90


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


def test_setup_refuses_to_build_against_a_torch_the_package_refuses():
    check = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="not_main")["_check_torch"]
    check(torch.__version__)
    with pytest.raises(SystemExit, match=r"^cannot build denseclip_fast: denseclip_fast needs torch >= \S+, and this "
                                         r"environment has torch 2\.4\.1\+cu121: upgrade it"):  # fmt: skip
        check("2.4.1+cu121")


def test_setup_names_the_setuptools_upgrade_the_license_field_needs():
    check = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="not_main")["check_setuptools"]
    for accepted in ("77.0.0", "81.0.0", "84.2.1", "100.1"):
        check(accepted)
    with pytest.raises(SystemExit, match=r"needs setuptools >= 77, this environment has 69\.5\.1; run `pip install "
                                         r"-U 'setuptools>=77'`"):  # fmt: skip
        check("69.5.1")


@pytest.mark.slow
def test_cmake_builds_the_library_for_cpp_consumers(cmake_build):
    info = json.loads(cmake_build.run("denseclip_fast_info"))
    assert info["version"] == dcf.__version__
    assert (info["cuda"] is not None) == cmake_build.with_cuda

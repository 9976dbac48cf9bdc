"""Builds the operator extension ``denseclip_fast._C`` from csrc/.

C++ sources always; CUDA sources (csrc/cuda/*.cu) when torch is a CUDA build and a CUDA toolkit is found, otherwise
a CPU-only build with no error. Environment:
  DENSECLIP_FAST_CUDA=0|1   force the CUDA part off (0) or demand it (1: no toolkit is then an error)
  CUDA_HOME                 the toolkit (default: torch's guess, or /usr/local/cuda when that has bin/nvcc)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default: the visible GPU's, else "9.0")
"""

from __future__ import annotations

import glob
import os
import re

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_SETUPTOOLS = 77  # pyproject.toml's SPDX license expression (PEP 639); older releases reject the field


def check_setuptools(version: str) -> None:
    """SystemExit naming the upgrade for a setuptools older than MIN_SETUPTOOLS: under ``pip install
    --no-build-isolation`` (how the extension builds against the installed torch) pip uses the environment's
    setuptools, not pyproject.toml's build requirement, and an old one fails on the license field with a schema
    error that does not say so."""
    major = re.match(r"\d+", version)
    if major is not None and int(major.group()) < MIN_SETUPTOOLS:
        raise SystemExit(f"cannot build denseclip_fast: it needs setuptools >= {MIN_SETUPTOOLS}, this environment has "
                         f"{version}; run `pip install -U 'setuptools>={MIN_SETUPTOOLS}'`")


def _version() -> str:
    with open(os.path.join(ROOT, "denseclip_fast", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _default_cuda_home() -> None:
    # torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes it guess /usr/local,
    # which has no lib64/libcudart. Prefer the real toolkit when the user did not choose one.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = os.path.realpath("/usr/local/cuda")


def cuda_build_wanted(torch_cuda: str | None, cuda_home: str | None, flag: str | None) -> bool:
    """Whether to compile csrc/cuda. ``flag`` is DENSECLIP_FAST_CUDA; '1' with no toolkit is an error."""
    if flag not in (None, "", "0", "1"):
        raise SystemExit(f"DENSECLIP_FAST_CUDA must be 0 or 1, got {flag!r}")
    available = torch_cuda is not None and cuda_home is not None
    if flag == "1" and not available:
        why = "torch is a CPU-only build" if torch_cuda is None else "no CUDA toolkit (set CUDA_HOME)"
        raise SystemExit(f"DENSECLIP_FAST_CUDA=1 but the CUDA part cannot be built: {why}")
    return available and flag != "0"


def _check_torch(version: str) -> None:
    """SystemExit with the package's own message (denseclip_fast/requirements.py, read by path: the package itself
    imports torch and would refuse it the same way) for a torch the package would refuse at import, before a build
    against it."""
    import runpy

    check = runpy.run_path(os.path.join(ROOT, "denseclip_fast", "requirements.py"))["check_torch_version"]
    try:
        check(version)
    except ImportError as exc:
        raise SystemExit(f"cannot build denseclip_fast: {exc}") from None


def _extensions() -> tuple[list, dict]:
    _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    _check_torch(torch.__version__)

    with_cuda = cuda_build_wanted(torch.version.cuda, cpp_extension.CUDA_HOME, os.environ.get("DENSECLIP_FAST_CUDA"))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    defines = [("DENSECLIP_FAST_VERSION", f'"{_version()}"')]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (C++20 for torch >= 2.10)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        defines.append(("DENSECLIP_FAST_WITH_CUDA", None))
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        ext = cpp_extension.CUDAExtension(
            "denseclip_fast._C",
            sources,
            define_macros=defines,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "denseclip_fast._C", sources, define_macros=defines, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    print(f"denseclip_fast: building _C with CUDA={'yes' if with_cuda else 'no'} from {len(sources)} sources")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    check_setuptools(setuptools.__version__)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

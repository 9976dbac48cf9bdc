"""Loading the compiled extension ``denseclip_fast._C`` (C++ always, CUDA when it was built with a toolkit)."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import torch

_UNSET = object()
_load_error: Any = _UNSET  # memoised by hand: torch.compile traces through plain globals without warnings
_build_info_json: str | None = None


def _load() -> str | None:
    """Import the extension once; returns None on success, else why it is unavailable."""
    global _load_error
    if _load_error is _UNSET:
        try:
            # importing registers the operators; the compiled module has no stub, hence the ignore
            from .. import _C  # type: ignore[attr-defined]  # noqa: F401

            _load_error = None
        except ImportError as exc:
            _load_error = f"denseclip_fast._C could not be imported ({exc}); rebuild it with `make setup`"
    return _load_error


def extension_available() -> bool:
    """True when the compiled operator library is importable."""
    return _load() is None


def build_info() -> dict[str, Any]:
    """How the extension was built: ``{'version', 'openmp', 'cuda': None | {'runtime', 'archs'}}``; ``archs`` are the
    GPU architectures of its CUDA kernels as 10 * major + minor (90 for sm_90, an H100/H200).

    Raises RuntimeError (with the reason) when the extension is not built.
    """
    global _build_info_json
    error = _load()
    if error is not None:
        raise RuntimeError(error)
    if _build_info_json is None:  # asked once: a call inside a non-strict torch.export would be a node of its graph
        _build_info_json = str(torch.ops.denseclip_fast.build_info())
    info = json.loads(_build_info_json)  # a new dict each call: callers may change theirs
    if info["cuda"] is not None:  # nvcc's __CUDA_ARCH_LIST__ counts in tens (900 for sm_90)
        info["cuda"]["archs"] = [arch // 10 for arch in info["cuda"]["archs"]]
    return info


def extension_module() -> ModuleType | None:
    """The imported module ``denseclip_fast._C``, or None where it is not built (its functions besides the
    operators: :mod:`denseclip_fast.checkpoints.crc`)."""
    if _load() is not None:
        return None
    from .. import _C  # type: ignore[attr-defined]  # the compiled module has no stub

    return _C

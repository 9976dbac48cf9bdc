"""Loading the compiled extension ``denseclip_fast._C`` (C++ always, CUDA when it was built with a toolkit)."""

from __future__ import annotations

import functools
import json
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    """Import the extension once; returns None on success, else why it is unavailable."""
    try:
        from .. import _C  # noqa: F401  (importing registers the operators)
    except ImportError as exc:
        return f"denseclip_fast._C could not be imported ({exc}); rebuild it with `make setup`"
    return None


def extension_available() -> bool:
    """True when the compiled operator library is importable."""
    return _load() is None


def build_info() -> dict[str, Any]:
    """How the extension was built: ``{'version', 'openmp', 'cuda': None | {'runtime', 'archs'}}``.

    Raises RuntimeError (with the reason) when the extension is not built.
    """
    error = _load()
    if error is not None:
        raise RuntimeError(error)
    return json.loads(torch.ops.denseclip_fast.build_info())

"""Which implementation runs an operator.

Backends: ``cuda`` (CUDA C++ kernels of the extension), ``triton`` (Triton kernels), ``cpu`` (C++ CPU kernels of the
extension), ``reference`` (plain PyTorch, denseclip_fast/ops/reference.py). ``auto`` (the default) takes, for CUDA
tensors, triton when it is installed and supports the GPU (sm_80+), dtype and shape, else cuda, else reference;
for CPU tensors, cpu when the extension is built, else reference.

``DENSECLIP_FAST_BACKEND=<name>`` or the ``backend=`` argument of an operator forces one; a forced backend that
cannot run the call raises BackendUnavailable (a RuntimeError) saying why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .extension import build_info, extension_available

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "DENSECLIP_FAST_BACKEND"
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_MIN_ARCH = 80  # Ampere: what the Triton kernels are compiled and sized for (ops/triton/aot.py)
CUDA_MAX_HEAD_DIM = 128  # csrc/cuda/attention.cu kMaxD
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, which the Triton attention's launches give batch x heads


_memo: dict[Any, Any] = {}  # read and written only by the functions marked constant_while_tracing below

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def constant_while_tracing(fn: _Fn) -> _Fn:
    """``torch.compiler.assume_constant_result``: torch.compile (Dynamo) and torch.export call ``fn`` while they
    trace, with constant arguments, and take its answer as a constant of the graph. The marking by hand, as torch
    does it (tests/test_ops.py checks that they agree): torch's decorator imports torch._dynamo, a second at import
    time of every command, and is untyped."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_while_tracing  # as _asked
def _cuda_kernels_built() -> bool:
    if "cuda" not in _memo:
        _memo["cuda"] = extension_available() and build_info()["cuda"] is not None
    return _memo["cuda"]


def _query(what: str, index: int) -> Any:
    """The answer to ``what`` about CUDA device ``index``: "cc" its compute capability as an integer (90 = Hopper),
    "smem" its shared memory per block in bytes (the opt-in maximum), "arch" why the extension's CUDA kernels cannot
    run on it (built for other architectures) or None."""
    if what == "cc":
        major, minor = torch.cuda.get_device_capability(index)
        return 10 * major + minor
    if what == "smem":
        # read by name: torch's _CudaDeviceProperties stub has this field from 2.15 on, and torch 2.11 to 2.14 have
        # it at runtime only (an ignore comment for the older stubs fails mypy with the newer)
        return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin"))
    built, arch = build_info()["cuda"]["archs"], _device_arch(torch.device("cuda", index))
    if arch is None:  # a trace without a GPU (see _asked): no answer to keep
        raise RuntimeError("no CUDA device to ask")
    if runs_cubin_of(built, arch):
        return None
    return (f"the extension's CUDA kernels were built for {', '.join(f'sm_{a}' for a in built)} and this GPU is "
            f"sm_{arch} (rebuild with TORCH_CUDA_ARCH_LIST={arch // 10}.{arch % 10})")  # fmt: skip


@constant_while_tracing
def _asked(what: str, index: int) -> Any:
    """_query(what, index), memoised per (what, device); ``index`` -1 is the current device. torch.compile and
    torch.export call this while they trace and take the answer as a constant (constant_while_tracing), so that a
    compiled or exported model chooses its backend and sizes its kernels for the GPU it is traced on, also when no
    eager call asked first. None, not memoised, where there is no GPU to ask (fake CUDA tensors traced on a machine
    without one); on a machine with a GPU a failing query raises."""
    try:
        index = torch.cuda.current_device() if index < 0 else index
        key = (what, index)
        if key not in _memo:
            _memo[key] = _query(what, index)
    except (RuntimeError, AssertionError):  # torch without CUDA raises AssertionError, no driver RuntimeError
        if not torch.cuda.is_available():
            return None
        raise
    return _memo[key]


def _index(device: torch.device) -> int:
    return -1 if device.index is None else device.index


def _device_arch(device: torch.device) -> int | None:
    """The GPU's compute capability as an integer (90 = Hopper), memoised per device (see _asked)."""
    return _asked("cc", _index(device))


def shared_memory_per_block(device: torch.device) -> int | None:
    """The GPU's shared memory per block in bytes (the opt-in maximum), memoised per device; None for CPU tensors
    (Triton's interpreter)."""
    return _asked("smem", _index(device)) if device.type == "cuda" else None


def gpu_arch(device: torch.device) -> int | None:
    """The GPU's compute capability as an integer (90 = Hopper), memoised; None for CPU tensors (the interpreter)."""
    return _device_arch(device) if device.type == "cuda" else None


def runs_cubin_of(built: list[int], arch: int) -> bool:
    """Whether a GPU of compute capability ``arch`` runs the machine code of a build for ``built`` (10 * major +
    minor): a cubin for sm_XY runs on sm_XZ with Z >= Y (CUDA's binary compatibility: an sm_80 build runs on an
    sm_86 or sm_89 GPU), never across major versions."""
    return any(b // 10 == arch // 10 and b <= arch for b in built)


def _cuda_arch_mismatch(device: torch.device) -> str | None:
    """Why the extension's CUDA kernels cannot run on this GPU (built for other architectures), else None; so the
    user reads it here instead of "no kernel image is available" inside a kernel. Memoised per device (_asked)."""
    return _asked("arch", _index(device))


def query_device(device: torch.device) -> None:
    """Ask now, eagerly, what the backends decide by for this GPU (its architecture, its shared memory, whether the
    extension's kernels were built for it). A trace asks by itself (_asked); this makes a query's failure (a device
    index that does not exist) an eager error before a long export rather than one inside its trace."""
    if device.type != "cuda":
        return
    _device_arch(device)
    shared_memory_per_block(device)
    if _cuda_kernels_built():
        _cuda_arch_mismatch(device)


@constant_while_tracing  # as _cuda_kernels_built: no write to _memo in a trace (Dynamo would replay its writes
def triton_available() -> str | None:  # over the dict, dropping what _asked kept meanwhile)
    """None when the Triton kernels can be used (importing them registers their operators), else why not."""
    if "triton" not in _memo:
        try:
            from . import triton as _kernels

            _memo["triton"] = _kernels.UNAVAILABLE
        except ImportError as exc:
            _memo["triton"] = f"triton could not be imported ({exc})"
    return _memo["triton"]


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(
    backend: str, op: str, device: torch.device, dtype: torch.dtype, head_dim: int = 0
) -> str | None:
    """None when ``backend`` can run ``op`` on tensors of this device and dtype, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, these are on {device}"
        return None if extension_available() else "the extension denseclip_fast._C is not built (run make setup)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, these are on {device}"
        if not extension_available():
            return "the extension denseclip_fast._C is not built (run make setup)"
        if not _cuda_kernels_built():
            return "the extension was built without CUDA (no toolkit at build time)"
        mismatch = _cuda_arch_mismatch(device)
        if mismatch is not None:
            return mismatch
        if op == "context_attention" and head_dim > CUDA_MAX_HEAD_DIM:
            return f"the CUDA attention kernel supports head dims up to {CUDA_MAX_HEAD_DIM}, got {head_dim}"
        return None
    if backend == "triton":
        why = triton_available()
        if why is not None:
            return why
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreting()):
            return f"Triton kernels run CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), these are on {device}"
        arch = _device_arch(device) if device.type == "cuda" else None
        if arch is not None and arch < TRITON_MIN_ARCH:
            return f"the Triton kernels need sm_{TRITON_MIN_ARCH}+ (bfloat16 tensor cores), this GPU is sm_{arch}"
        if dtype == torch.float64:
            return "the Triton kernels support float32, float16 and bfloat16, not float64"
        if op == "context_attention" and head_dim not in TRITON_HEAD_DIMS:
            return f"the Triton attention kernel supports head dims {TRITON_HEAD_DIMS}, got {head_dim}"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")


class BackendUnavailable(RuntimeError):
    """A forced backend (``backend=`` or DENSECLIP_FAST_BACKEND) that cannot run the call; the message says why."""


def resolve(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None, head_dim: int = 0) -> str:
    """The backend that runs this call (see the module docstring)."""
    source = "backend=" if backend is not None else f"{ENV_VAR}="
    requested = backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")  # unset or empty: auto
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"{source}{requested!r} is not a backend; choose one of {BACKENDS} or 'auto'")
    if requested != "auto":
        why = unavailable_reason(requested, op, device, dtype, head_dim)
        if why is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} (from {source.rstrip('=')}) cannot run this call: "
                                     f"{why}")  # fmt: skip
        return requested
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    return next(b for b in order if unavailable_reason(b, op, device, dtype, head_dim) is None)

"""What the Triton launchers share."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids. Not ``triton.cdiv``: a JIT-callable object there, about 2 us of host
    time a call, and a launch takes several."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as ``triton.next_power_of_2`` but a plain function (see cdiv)."""
    if isinstance(n, int):
        return 1 << (n - 1).bit_length()
    n -= 1  # a symbolic size while torch.compile traces: the bit operations it supports
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def class_blocks(classes: int, width: int, max_block_c: int, tile: int) -> tuple[int, int]:
    """(classes, columns) of a program's tile in the kernels that take a block of classes at a time over a block of
    output columns (labels.py, resized_cross_entropy.py): up to ``max_block_c`` classes (a power of two, fewer where
    there are fewer), columns to fill ``tile`` values (at most the next power of two of ``width``)."""
    block_c = min(next_power_of_2(classes), max_block_c)
    return block_c, max(1, min(next_power_of_2(width), tile // block_c))


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take float32 operands with IEEE products: for float32 inputs (TF32 would cost ~1e-3
    relative error), and for bfloat16 under Triton's interpreter, which mis-multiplies bfloat16."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def launch(kernel: Any) -> Any:
    """``wrap_triton(kernel)``, so that torch.compile, torch.export and AOTInductor see the kernel inside a
    ``triton_op``. torch <= 2.11's wrap_triton rejects the functions of Triton's interpreter (newer torch takes
    them); there, and only under the interpreter, the kernel is launched as it is. While torch.profiler records an
    eager call, each launch is also a profiler event of its own (:func:`profiled`)."""
    from torch.library import wrap_triton

    try:
        launcher = wrap_triton(kernel)
    except RuntimeError:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise
        launcher = kernel
    return profiled(launcher, kernel)


def profiled(launcher: Any, kernel: Any = None) -> Any:
    """``launcher`` (``kernel``'s, or a kernel itself: ``profiled(kernel)[grid](...)`` at the launches that are
    no ``triton_op``'s) as it is, or while torch.profiler records an eager call, a :class:`_Profiled` wrapper:
    one flag read otherwise (the compile check first, so that a traced call never reads the flag)."""
    if not torch.compiler.is_compiling() and torch.autograd.profiler._is_profiler_enabled:
        return _Profiled(launcher, launcher if kernel is None else kernel)
    return launcher


class _Profiled:
    """A launcher whose launches are each a ``triton::<kernel name>`` event in torch.profiler's trace: a
    RecordFunction of the default scope, to which the profiler links the kernels launched inside it (as it links
    an ATen operator's) and whose Python stack it records, so that a profile by call site places the kernels the
    engine launches itself (benchmarks/common.py). Only while a profiler runs: launch() returns the plain launcher
    otherwise, at the cost of one flag read."""

    def __init__(self, launcher: Any, kernel: Any) -> None:
        self.launcher = launcher
        self.name = "triton::" + str(getattr(getattr(kernel, "fn", kernel), "__name__", "kernel"))

    def __getitem__(self, grid: Any) -> Any:
        run = self.launcher[grid]

        def launched(*args: Any, **kwargs: Any) -> Any:
            with torch._C._profiler._RecordFunctionFast(self.name):
                return run(*args, **kwargs)

        return launched


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Make t's GPU the current device for the launches in this block: Triton launches on the current device, not on
    its arguments' (the C++ operators take a CUDAGuard), so a model on cuda:1 called while cuda:0 is current would
    hand cuda:1 pointers to a kernel on cuda:0. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

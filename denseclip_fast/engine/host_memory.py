"""Host memory that a process keeps for reuse: glibc's malloc told not to hand large blocks back to the system.

A CPU forward allocates its large tensors afresh on every call (a 2048x1536 photo's float32 logits for 150 classes
are 1.9 GB; a 512x512 image's 157 MB, the activations on top). glibc serves each allocation past its mmap threshold
(128 KiB, rising to at most 32 MiB) with a mapping of its own and unmaps it when the tensor is freed, so that every
call touches every page of its tensors anew: one page fault per 4 KiB page, on a VM a large share of the call
(benchmarks/results/predict_cpu_2threads_amx_retain.md against predict_cpu_2threads_amx_default.md). With
``M_MMAP_MAX`` 0 (no mappings: large blocks come from the heap) and a trim threshold of 2 GiB (the heap's free top
is returned to the system only past that), freed memory stays in the process and the next call reuses it.

The cost: between calls the process holds on to what its largest call used (its peak resident size, which itself does
not grow), and the setting is process-wide. So it is a choice: ``denseclip-fast`` makes it for its own process when it
runs on a CPU, a program embedding the engine calls :func:`retain_freed_memory` (or starts with the environment
variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``, glibc's names for the same settings). Nothing is
changed where the user has already chosen: one of those variables or a ``glibc.malloc`` tunable set, or another
allocator preloaded (jemalloc, tcmalloc, mimalloc keep freed memory themselves).
"""

from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the most it can keep at the heap's top, 2 GiB
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # what it would set
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_retained = False


def allocator_chosen(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """What in ``environ`` says that the user chose the allocator's behaviour (a glibc malloc variable or tunable,
    or a preloaded allocator), or None."""
    chosen = [name for name in MALLOC_VARIABLES if name in environ]
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in PRELOADED_ALLOCATORS):
        chosen.append(f"LD_PRELOAD={preload}")
    return ", ".join(chosen) or None


def glibc() -> bool:
    """Whether this process runs on GNU libc (Linux's usual C library; not musl, macOS or Windows)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name: not glibc
        return False


def retain_freed_memory() -> bool:
    """Keep the memory this process frees for its next allocations instead of returning it to the system (module
    docstring: fewer page faults per CPU call; the peak resident size is kept). Process-wide, and once: later calls
    change nothing. Returns whether the setting is in effect: False off Linux's glibc, and where
    :func:`allocator_chosen` finds the user's own choice."""
    global _retained
    with _lock:
        if _retained:
            return True
        if not glibc() or allocator_chosen() is not None:
            return False
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            return False
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # the trim threshold first: should M_MMAP_MAX be refused, the process is only slower to return its heap
        _retained = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, 0))
        return _retained


def describe() -> str:
    """This process's large-allocation policy, in words, for benchmark records: "retained" (retain_freed_memory is
    in effect), "chosen: ..." (allocator_chosen), "glibc default" or "not glibc"."""
    if _retained:
        return "retained"
    chosen = allocator_chosen()
    if chosen is not None:
        return f"chosen: {chosen}"
    return "glibc default" if glibc() else "not glibc"

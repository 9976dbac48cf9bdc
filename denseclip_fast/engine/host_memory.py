"""Host memory that a process keeps for reuse: glibc's malloc told not to hand large blocks back to the system.

A CPU forward allocates its large tensors afresh on every call (a 512x512 image's float32 logits for 150 classes are
157 MB, the activations on top). glibc serves each allocation past its mmap threshold (128 KiB, rising to at most
32 MiB) with a mapping of its own and unmaps it when the tensor is freed, so that every call touches every page of
its tensors anew: one page fault per 4 KiB page, on a VM a large share of the call
(benchmarks/results/predict_cpu_2threads_amx_retain.md against predict_cpu_2threads_amx_default.md). With
``M_MMAP_MAX`` 0 (no mappings: large blocks come from the heap) and a trim threshold of 2 GiB, freed memory stays in
the process and the next call reuses it.

Its limits, each seen here:

* the heap's free top is given back once it reaches 2 GiB (mallopt takes an int), so a call that frees 2 GiB or more
  at once (a photo's full-size logits) faults its pages in again, as by default;
* only the main thread's allocations are kept: a thread's own pool (arena) still maps any block past 64 MiB;
* the heap is not compacted: a freed block too small for a later, larger request stays resident beside the new
  one, so a sequence of ever larger GB-sized tensors holds more than its peak (tensors of 1.5, 1.9 and 2.1 GiB,
  made and freed one at a time, each size twice in turn, left 7.9 GB resident here). Where every allocation is
  bounded, as in ``denseclip-fast segment``, whose network input the test scale bounds and whose labels go a chunk
  of classes at a time, it stays near the peak;
* the setting is process-wide, and the memory stays with the process between calls.

So it is a choice: ``denseclip-fast segment`` makes it for its own process when it runs on a CPU; a program
embedding the engine may call :func:`retain_freed_memory` (or start with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647``, glibc's names for the same settings), or preload an allocator that keeps freed
memory with bounds of its own (jemalloc, tcmalloc). Nothing is changed where the user has already chosen: one of
those variables or the matching ``glibc.malloc`` tunables set, or an allocator preloaded.
"""

from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the most it can keep at the heap's top, 2 GiB
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # what it would set
TUNABLES = ("mmap_max", "mmap_threshold", "trim_threshold")  # GLIBC_TUNABLES=glibc.malloc.<name>=...: the same

_lock = threading.Lock()
_retained = False


def allocator_chosen(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """What in ``environ`` says that the user chose how large blocks are kept (one of MALLOC_VARIABLES or its
    ``glibc.malloc`` tunable, or a preloaded allocator: a library named ``*malloc*``, as jemalloc, tcmalloc,
    mimalloc, tbbmalloc), or None."""
    chosen = [name for name in MALLOC_VARIABLES if name in environ]
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(f"glibc.malloc.{name}" in tunables for name in TUNABLES):
        chosen.append("GLIBC_TUNABLES")
    preload = environ.get("LD_PRELOAD", "")
    if "malloc" in preload:
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

"""CRC-32 of a checkpoint's bytes: zlib's function, the same values, 3-5x faster where the extension computes it.

The native files record a CRC-32 per tensor (native.py), checked at every load and computed at every save, and the
torch zip files one per entry (io.py): zlib 1.2's CRC (Python's ``zlib.crc32``) took 0.12 s of a warm 0.28 s load of
RN50 on the CI's 2 threads (a probe). The extension computes it by carry-less multiplication (csrc/cpu/crc32.cpp):
on one thread of that Xeon 6.5 GB/s against zlib's 2.0 over 256 MiB, 24 against 4.7 over 1 MiB in the cache
(benchmarks/results/crc_cpu_2threads.md; the loads it shortens: checkpoint_read_cpu_2threads_43d2829.md,
startup_cpu_2threads_43d2829.md). :func:`crc32` takes it where the extension is built and the processor has PCLMULQDQ
(``_C.CRC32_CLMUL``), zlib's otherwise, or with ``DENSECLIP_FAST_CRC32=zlib`` in the environment (read at each call).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

from ..ops.extension import extension_module

VARIABLE = "DENSECLIP_FAST_CRC32"


def implementation() -> Callable[..., int]:
    """The function :func:`crc32` calls now: ``_C.crc32`` or ``zlib.crc32``."""
    if os.environ.get(VARIABLE, "") == "zlib":
        return zlib.crc32
    module = extension_module()
    if module is None or not getattr(module, "CRC32_CLMUL", 0):  # an extension built before it had crc32: 0 too
        return zlib.crc32
    return module.crc32


def crc32(data: Any, value: int = 0) -> int:
    """``zlib.crc32(data, value)``: the CRC-32 of a bytes-like object (contiguous), continued from ``value``. Releases
    the GIL from 5 KiB on, as zlib's does, so threads can share a checkpoint's tensors."""
    return implementation()(data, value)

"""engine.host_memory: glibc keeps freed memory for reuse, where the user has not chosen otherwise (the command line's
use of it: test_cli)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from denseclip_fast.engine import host_memory

from .conftest import ROOT

glibc_only = pytest.mark.skipif(not host_memory.glibc(), reason="glibc's malloc (Linux)")

# a fresh process: a 256 MiB tensor made and freed; prints what retain_freed_memory returned, the bytes glibc
# mapped for it, and the bytes of its heap still held after it was freed (mallinfo2, glibc >= 2.33)
PROBE = """
import ctypes, sys, torch
from denseclip_fast.engine.host_memory import retain_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                               "fordblks keepcost").split()]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no mallinfo2"); sys.exit(0)
libc.mallinfo2.restype = Info
retained = retain_freed_memory() if sys.argv[1] == "retain" else None
before = libc.mallinfo2().hblkhd
t = torch.ones(64 * 2**20)
mapped = libc.mallinfo2().hblkhd - before
del t
print(retained, mapped, libc.mallinfo2().arena)
"""


def probe(mode: str, **env: str) -> tuple[str, int, int]:
    # without the settings of the environment the tests run in (a CI that preloads jemalloc, a tunable)
    drop = {*host_memory.MALLOC_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD"}
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                            env={**environ, **env}, check=True)  # fmt: skip
    if result.stdout.strip() == "no mallinfo2":
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    retained, mapped, heap = result.stdout.split()
    return retained, int(mapped), int(heap)


@glibc_only
def test_freed_memory_is_kept_in_the_heap_for_reuse():
    size = 256 * 2**20
    retained, mapped, heap = probe("retain")
    assert retained == "True"
    assert mapped == 0 and heap >= size, (mapped, heap)  # from the heap, and still held once freed
    untouched, mapped, heap = probe("default")  # glibc's default: a mapping of its own, unmapped when freed
    assert untouched == "None" and mapped >= size and heap < size, (mapped, heap)


@glibc_only
def test_the_users_malloc_settings_are_left_alone():
    retained, mapped, heap = probe("retain", MALLOC_TRIM_THRESHOLD_="131072")
    assert retained == "False" and mapped >= 256 * 2**20


def test_allocator_chosen_names_what_the_user_set():
    assert host_memory.allocator_chosen({}) is None
    unrelated = {"MALLOC_ARENA_MAX": "2", "LD_PRELOAD": "libasan.so", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.allocator_chosen(unrelated) is None
    assert host_memory.allocator_chosen({"MALLOC_MMAP_MAX_": "0"}) == "MALLOC_MMAP_MAX_"
    chosen = host_memory.allocator_chosen({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=0",
                                           "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})  # fmt: skip
    assert chosen == "GLIBC_TUNABLES, LD_PRELOAD=/usr/lib/libjemalloc.so.2"
    for preload in ("libtcmalloc_minimal.so.4", "libmimalloc.so", "libtbbmalloc_proxy.so.2"):
        assert host_memory.allocator_chosen({"LD_PRELOAD": preload}) == f"LD_PRELOAD={preload}"


TWICE = """
from denseclip_fast.engine import host_memory
print(host_memory.describe(), host_memory.retain_freed_memory(), host_memory.retain_freed_memory(),
      host_memory.describe(), sep="|")
"""


@glibc_only
def test_retaining_stays_in_effect_and_is_described():
    """retain_freed_memory's second call says the setting is in effect (it is, once: process-wide), and describe
    says which policy a process runs under. Mutants: the second call returning False, describe never 'retained'."""
    drop = {*host_memory.MALLOC_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD"}
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    for env, expected in (({}, "glibc default|True|True|retained"),
                          ({"MALLOC_MMAP_MAX_": "0"}, "chosen: MALLOC_MMAP_MAX_|False|False|chosen: MALLOC_MMAP_MAX_")):
        result = subprocess.run([sys.executable, "-c", TWICE], cwd=ROOT, capture_output=True, text=True,
                                env={**environ, **env}, check=True)  # fmt: skip
        assert result.stdout.strip() == expected, env


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="Linux's GNU libc")  # fmt: skip
def test_glibc_is_recognised_where_python_runs_on_it():
    """The tests above skip where glibc() is False: on GNU libc itself it must be True (a wrong prefix for
    CS_GNU_LIBC_VERSION, 'glibc 2.35', turned retain_freed_memory off and skipped them without a word)."""
    assert host_memory.glibc()

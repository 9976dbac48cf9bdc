"""The checkpoints' CRC-32 (denseclip_fast/checkpoints/crc.py, csrc/cpu/crc32.cpp) against zlib's."""

from __future__ import annotations

import random
import types
import zlib

import numpy as np
import pytest
import torch

from denseclip_fast.checkpoints import crc
from denseclip_fast.checkpoints.native import balanced_groups, tensor_crc32s
from denseclip_fast.ops.extension import extension_module

_C = extension_module()
needs_extension = pytest.mark.skipif(_C is None or not hasattr(_C, "crc32"), reason="the extension is not built")


@needs_extension
def test_the_extensions_crc32_is_zlibs_at_every_length_alignment_and_start():
    """Every length to 300 bytes (the table below 64, the 64-byte folds, the 16-byte folds, the tail), each at the
    16 alignments of a 16-byte load, continued from 0, from all ones and from a value of another CRC; and longer
    buffers past the prefetch distance and the GIL's threshold, an odd length among them."""
    rng = random.Random(0)
    data = rng.randbytes(300 + 16)
    for length in range(301):
        for offset in range(16):
            piece = memoryview(data)[offset : offset + length]
            for value in (0, 0xFFFFFFFF, zlib.crc32(b"before")):
                assert _C.crc32(piece, value) == zlib.crc32(piece, value), (length, offset, value)
    for length in (4095, 5 * 1024, 65537, (1 << 20) + 3, (3 << 20) + 64):
        big = rng.randbytes(length)
        assert _C.crc32(big) == zlib.crc32(big), length
        assert _C.crc32(big[length // 3 :], _C.crc32(big[: length // 3])) == zlib.crc32(big), length  # continued


@needs_extension
def test_the_extensions_crc32_takes_what_zlibs_takes():
    """Bytes, a bytearray, a memoryview and a tensor's bytes through numpy, as zlib.crc32 takes them; a value of more
    than 32 bits taken modulo 2**32 as zlib takes it; what zlib refuses (text, a non-contiguous view, no argument),
    refused with the same exception."""
    t = torch.randn(1000)
    for data in (b"abc" * 50, bytearray(b"xyz" * 70), memoryview(b"q" * 99), t.view(torch.uint8).numpy().data):
        assert _C.crc32(data) == zlib.crc32(data)
    assert _C.crc32(b"abc", 2**32 + 5) == zlib.crc32(b"abc", 2**32 + 5)
    strided = np.arange(200, dtype=np.uint8)[::2].data
    for bad in (("text",), (strided,), (), (b"a", 1, 2), (b"a", "1")):
        with pytest.raises(Exception) as ours:
            _C.crc32(*bad)
        with pytest.raises(Exception) as zlibs:
            zlib.crc32(*bad)
        assert type(ours.value) is type(zlibs.value), (bad, ours.value, zlibs.value)


@needs_extension
def test_the_extension_folds_where_the_processor_multiplies_without_carries():
    """On an x86-64 processor that lists pclmulqdq (the CI's), the extension takes the folding path: were its
    detection or its build guard to fail, every CRC would quietly come from the table (or zlib) and the tests above
    would pass on the slow path."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or "pclmulqdq" not in flags:
        pytest.skip("not an x86-64 processor with PCLMULQDQ")
    assert _C.CRC32_CLMUL == 1


def test_crc32_is_the_extensions_where_it_folds_and_zlibs_otherwise(monkeypatch):
    """crc.crc32 calls the extension's CRC where the processor has carry-less multiplication, zlib's where the
    variable asks for it, where the extension is not built, and where it was built before it had the CRC."""
    monkeypatch.delenv(crc.VARIABLE, raising=False)
    if _C is not None and getattr(_C, "CRC32_CLMUL", 0):
        assert crc.implementation() is _C.crc32
    monkeypatch.setenv(crc.VARIABLE, "zlib")
    assert crc.implementation() is zlib.crc32
    monkeypatch.delenv(crc.VARIABLE)
    monkeypatch.setattr(crc, "extension_module", lambda: None)
    assert crc.implementation() is zlib.crc32
    monkeypatch.setattr(crc, "extension_module", lambda: object())  # an older build: no CRC32_CLMUL
    assert crc.implementation() is zlib.crc32
    assert crc.crc32(b"denseclip", 7) == zlib.crc32(b"denseclip", 7)
    built = types.SimpleNamespace(crc32=lambda data, value=0: 0, CRC32_CLMUL=0)  # the table's path: zlib's is faster
    monkeypatch.setattr(crc, "extension_module", lambda: built)
    assert crc.implementation() is zlib.crc32
    assert crc.VARIABLE == "DENSECLIP_FAST_CRC32"  # the documented name (README)


def test_the_variable_is_read_at_each_call(monkeypatch):
    """DENSECLIP_FAST_CRC32 set after crc32 has run still takes effect (the choice is not kept from a first call)."""
    monkeypatch.delenv(crc.VARIABLE, raising=False)
    calls = []
    fake = types.SimpleNamespace(crc32=lambda data, value=0: calls.append("extension") or zlib.crc32(data, value),
                                 CRC32_CLMUL=1)  # fmt: skip
    spy = types.SimpleNamespace(crc32=lambda data, value=0: calls.append("zlib") or zlib.crc32(data, value))
    monkeypatch.setattr(crc, "extension_module", lambda: fake)
    monkeypatch.setattr(crc, "zlib", spy)
    assert crc.crc32(b"abc") == zlib.crc32(b"abc")
    monkeypatch.setenv("DENSECLIP_FAST_CRC32", "zlib")
    assert crc.crc32(b"abc") == zlib.crc32(b"abc")
    monkeypatch.delenv("DENSECLIP_FAST_CRC32")
    assert crc.crc32(b"abc") == zlib.crc32(b"abc")
    assert calls == ["extension", "zlib", "extension"]


@pytest.mark.parametrize("variable", ["", "zlib"])
def test_tensor_crc32s_are_zlibs_on_any_number_of_threads(monkeypatch, variable):
    """Each tensor's CRC-32 is zlib's of its bytes whatever the thread count (groups of unequal sizes, more threads
    than tensors, one thread), an empty tensor's among them."""
    monkeypatch.setenv(crc.VARIABLE, variable)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate((0, 1, 17, 300, 5000, 70000, 9))}
    tensors["half"] = torch.randn(3, 33, generator=gen).half()
    expected = {n: f"{zlib.crc32(t.view(torch.uint8).numpy().data):08x}" for n, t in tensors.items()}
    for threads in (1, 2, 3, 20):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert tensor_crc32s(tensors) == expected


def test_balanced_groups_hold_every_name_once_in_groups_of_about_equal_size():
    rng = random.Random(1)
    names = [f"n{i}" for i in range(200)]
    sizes = [rng.choice((0, 1, 10, 1000, 10**6)) * rng.randint(1, 9) for _ in names]
    size_of = dict(zip(names, sizes))
    for count in (1, 2, 3, 7, 250):
        groups = balanced_groups(names, sizes, count)
        assert len(groups) == count
        assert sorted(n for g in groups for n in g) == sorted(names)
        loads = [sum(size_of[n] for n in g) for g in groups]
        if count <= len(names):
            assert max(loads) - min(loads) <= max(sizes)  # the greedy bound: never past the largest item
    assert balanced_groups(["a", "b", "c"], [1, 5, 3], 2) == [["b"], ["c", "a"]]

"""pickle_shape: a pickle's nesting, the objects it reaches and its memo indices, measured from its opcodes before any
unpickler is given it (checkpoints/pickle_shape.py). The files that reach it through load_checkpoint are
test_checkpoints.py's."""

from __future__ import annotations

import io
import pickle
import struct

import pytest
import torch

from denseclip_fast.checkpoints import pickle_shape
from denseclip_fast.checkpoints.pickle_shape import MAX_DEPTH, PickleShapeError, check_pickle, check_pickle_bytes


def _nested(levels: int) -> object:
    """``levels`` one-element tuples around an int: a pickle depth of levels + 1 (the int is 1)."""
    value: object = 1
    for _ in range(levels):
        value = (value,)
    return value


def _doubled(levels: int) -> tuple:
    """A tuple holding the previous one twice, ``levels`` times: 2**levels paths to its innermost string, which a
    pickle writes once (its memo) and CPython's hash, repr and == walk each time."""
    value: tuple = ("leaf",)
    for _ in range(levels):
        value = (value, value)
    return value


@pytest.mark.parametrize("protocol", range(6))
def test_plain_data_of_every_protocol_passes(protocol):
    """Lists, dicts and sets of many items (protocol 0 adds each with an APPEND or SETITEM opcode of its own: they
    add to the container, they do not nest it), shared strings and memo indices past 65535."""
    data = {"items": list(range(3000)), "names": [f"name{i}" for i in range(70000)], "set": set(range(100)),
            "nested": _nested(20), "shared": ["same"] * 1000, "bytes": b"x" * 1000, "float": 0.5}  # fmt: skip
    check_pickle_bytes(pickle.dumps(data, protocol=protocol))


def test_a_torch_state_with_its_optimiser_passes():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": {"iter": 3}}, buf,
               _use_new_zipfile_serialization=False)  # fmt: skip
    data = buf.getvalue()
    stream = io.BytesIO(data)
    for _ in range(5):  # torch.save's legacy format: five pickles, then the storages' bytes
        check_pickle(stream, len(data) - stream.tell())
    assert 0 < stream.tell() < len(data) - 4 * 4 * 3 * 3 * 3  # the conv weight's bytes, at least, follow


def test_nesting_past_max_depth_is_refused():
    check_pickle_bytes(pickle.dumps(_nested(MAX_DEPTH - 1), protocol=2))  # depth MAX_DEPTH
    with pytest.raises(PickleShapeError, match=f"^nests containers more than {MAX_DEPTH} deep$"):
        check_pickle_bytes(pickle.dumps(_nested(MAX_DEPTH), protocol=2))
    # 300000 levels in 300 KB (a dict key that crashed torch.load: its hash overflowed the C stack)
    deep = b"\x80\x02K\x01" + b"\x85" * 300000 + b"."
    with pytest.raises(PickleShapeError, match="more than 512 deep"):
        check_pickle_bytes(deep)


def test_objects_reached_through_the_memo_are_counted_each_time(monkeypatch):
    """A doubled tuple is a few opcodes a level; the objects it reaches double with each. Past max(MIN_OBJECTS,
    OBJECTS_PER_OPCODE x opcodes) it is refused (MIN_OBJECTS lowered here: 2**20 in the package)."""
    with pytest.raises(PickleShapeError, match=r"^would build more than 1048576 objects \(a shared one counted"):
        check_pickle_bytes(pickle.dumps(_doubled(40), protocol=2))  # 2**40 leaves in 300 bytes: hashed for hours
    monkeypatch.setattr(pickle_shape, "MIN_OBJECTS", 2000)
    check_pickle_bytes(pickle.dumps(_doubled(9), protocol=2))  # 3 x 2**9 - 1 objects = 1535
    with pytest.raises(PickleShapeError, match="more than 2000 objects"):
        check_pickle_bytes(pickle.dumps(_doubled(10), protocol=2))  # 3071
    check_pickle_bytes(pickle.dumps(list(range(5000)), protocol=2))  # 5001 objects from 5000+ opcodes: under 8 each


def test_a_memo_index_past_the_opcodes_read_is_refused():
    """CPython's unpickler makes its memo an array as long as the largest index: 2**27 cost 2 GiB."""
    with pytest.raises(PickleShapeError, match=r"^stores memo index 134217728 after 3 opcodes"):
        check_pickle_bytes(b"\x80\x02Nr" + struct.pack("<I", 2**27) + b".")
    check_pickle_bytes(b"\x80\x02Nq\x02.")  # index 2 after 3 opcodes: what a pickler may write
    with pytest.raises(PickleShapeError, match=r"^is malformed: it reads memo index 5, never stored$"):
        check_pickle_bytes(b"\x80\x02Nq\x00h\x05.")


def test_truncated_and_malformed_pickles():
    data = pickle.dumps({"a": [1, 2, 3], "b": "text"}, protocol=2)
    for cut in (len(data) - 1, len(data) // 2, 3):
        with pytest.raises(PickleShapeError, match="^ends early") as err:
            check_pickle_bytes(data[:cut])
        assert err.value.truncated
    with pytest.raises(PickleShapeError, match=r"^is malformed \(") as err:  # an opcode that does not exist
        check_pickle_bytes(b"\x80\x02\xff.")
    assert not err.value.truncated
    with pytest.raises(PickleShapeError, match="^is malformed: an opcode takes more than the stack holds$"):
        check_pickle_bytes(b"\x80\x02s.")  # SETITEM on an empty stack
    with pytest.raises(PickleShapeError, match="^is malformed: an opcode takes more than the stack holds$"):
        check_pickle_bytes(b"\x80\x02t.")  # TUPLE without a mark


def test_a_stream_is_read_one_pickle_at_a_time_within_its_size(monkeypatch):
    first, second = pickle.dumps([1, 2], protocol=2), pickle.dumps("two", protocol=2)
    stream = io.BytesIO(first + second + b"raw storage bytes")
    check_pickle(stream, len(stream.getvalue()))
    assert stream.tell() == len(first)
    check_pickle(stream, len(stream.getvalue()) - stream.tell())
    assert stream.tell() == len(first) + len(second)
    # a BINBYTES8 declaring 2**62 bytes: refused from its declared length, never read (nor allocated)
    huge = b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"xx."
    with pytest.raises(PickleShapeError, match=r"^ends early: an opcode declares 4611686018427387904 bytes where 3 "):
        check_pickle(io.BytesIO(huge), len(huge))
    monkeypatch.setattr(pickle_shape, "MAX_LINE", 64)
    long_line = b"cbuiltins\n" + b"x" * 100 + b"\n."  # protocol 0's GLOBAL: two lines of text
    with pytest.raises(PickleShapeError, match="a text opcode's argument is not one line of at most 64 bytes"):
        check_pickle(io.BytesIO(long_line), len(long_line))

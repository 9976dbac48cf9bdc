"""What a pickle would build, measured from its opcodes before any unpickler runs it.

torch.load's weights-only unpickler refuses every global outside its allowlist, so a crafted file runs no code; but
what it builds from plain tuples, lists and dicts is still the file's to choose, and CPython walks such objects
recursively or path by path (hash, repr, ==). A file of a few bytes can stand for an object far larger than itself:
each memo reference (GET) repeats a whole sub-object, so 40 doublings of one tuple are 2**40 leaves. Found by a
fuzz of the readers: a dict key nested 300,000 tuples deep crashed the process (the tuple's hash overflowed the C
stack inside torch.load), one doubled 40 times hashed for hours, and one doubled 25 times (a 1.4 KB file) took 3 GiB
to print in an error message; a memo index of 2**27 (a 261-byte TorchScript archive) made CPython's unpickler
allocate 2 GiB for its memo.

:func:`check_pickle` reads one pickle's opcodes with :mod:`pickletools` (no object is made) and follows the stack
the unpickler would have, each entry reduced to two numbers: how deep its containers nest and how many objects it
reaches, a shared one counted each time it is reached. It refuses (:class:`PickleShapeError`) a pickle nested more
than MAX_DEPTH deep, one reaching more than max(MIN_OBJECTS, OBJECTS_PER_OPCODE x its opcodes so far) objects (a
file can then stand for no more than a few times its own size), a memo index past the opcodes read so far (an
unpickler's memo is an array that long) and a malformed one. A saved state dict nests under 10 deep and reaches
fewer objects than it has opcodes. The cost: each opcode read once more, in Python (an RN50 DenseCLIP checkpoint's
pickle has 22,000; not yet timed by a committed benchmark).
"""

from __future__ import annotations

import io
import pickletools
from collections.abc import Callable
from typing import BinaryIO, cast

MAX_DEPTH = 512  # containers within containers: a state dict with its optimiser state under 10, CLIP archives 20
MIN_OBJECTS = 1 << 20  # objects reached, at least; OBJECTS_PER_OPCODE per opcode read past that
OBJECTS_PER_OPCODE = 8
MAX_LINE = 1 << 20  # a text opcode's argument (protocol 0's GLOBAL, INT, UNICODE ...): one line

# opcodes that add to the object below them on the stack (list.append, dict.__setitem__, set.add, __setstate__)
# instead of making a new one
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


class PickleShapeError(ValueError):
    """A pickle that no unpickler should be given: the reason, one line, which reads after "its pickle ".
    ``truncated``: the data ended before the pickle did."""

    def __init__(self, reason: str, truncated: bool = False) -> None:
        super().__init__(reason)
        self.truncated = truncated


class _Node:
    """A stack entry: the depth of its containers and the objects it reaches (itself included)."""

    __slots__ = ("depth", "count")

    def __init__(self, depth: int, count: int) -> None:
        self.depth, self.count = depth, count


class _Lines:
    """A binary stream whose reads may not ask for more bytes than remain, nor lines longer than MAX_LINE:
    pickletools reads an opcode's declared length at once (a BINBYTES8 may declare 2**62)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            raise PickleShapeError(f"ends early: an opcode declares {n} bytes where {self.left} remain", True)
        data = self.stream.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.stream.readline(min(MAX_LINE, self.left))
        self.left -= len(line)
        if line[-1:] != b"\n":
            raise PickleShapeError(f"is malformed: a text opcode's argument is not one line of at most {MAX_LINE} "
                                   "bytes", self.left == 0)  # fmt: skip
        return line

    def ended(self) -> bool:
        return self.left == 0


def _effect(op: pickletools.OpcodeInfo) -> tuple[int, int, int, bool]:
    """An opcode's stack effect: whether it takes the entries above the last mark (1, else 0), how many entries it
    takes besides (below that mark, or from the top), how many it pushes, and whether it adds what it takes to the
    entry below them (_IN_PLACE) instead of pushing new ones."""
    before = op.stack_before
    if pickletools.markobject in before:
        return 1, before.index(pickletools.markobject), len(op.stack_after), op.name in _IN_PLACE
    return 0, len(before), len(op.stack_after), op.name in _IN_PLACE


_EFFECTS = {op.name: _effect(op) for op in pickletools.opcodes}


def check_pickle(stream: BinaryIO, size: int) -> None:
    """Reads one pickle from ``stream`` (up to its STOP; ``size``: the bytes left in the stream) and raises
    PickleShapeError unless what it builds is of a reasonable shape (see the module). The stream is left after the
    STOP, where the next pickle of a file that holds several (torch.save's legacy format) begins."""
    lines = _Lines(stream, size)
    _check(lines, lines.ended)


def check_pickle_bytes(data: bytes | bytearray) -> None:
    """:func:`check_pickle` on a whole pickle held in memory (whose reads cannot ask for more than it holds)."""
    stream = io.BytesIO(data)
    _check(stream, lambda: stream.tell() >= len(data))


def _check(stream: BinaryIO | _Lines, ended: Callable[[], bool]) -> None:
    """check_pickle's work; ``ended()``: whether the stream has no byte left (a failure there is a truncation)."""
    stack: list[_Node] = []
    marks: list[int] = []
    memo: dict[int, _Node] = {}
    try:
        # genops calls read(n) and readline() alone, which _Lines has
        for ops, (op, arg, _) in enumerate(pickletools.genops(cast(BinaryIO, stream)), start=1):
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
            elif name in _PUT or name == "MEMOIZE":
                index = len(memo) if name == "MEMOIZE" else arg
                if not isinstance(index, int) or not 0 <= index <= ops:
                    raise PickleShapeError(f"stores memo index {index} after {ops} opcodes (an unpickler's memo is an "
                                           "array that long)")  # fmt: skip
                memo[index] = stack[-1]
            elif name in _GET:
                if arg not in memo:
                    raise PickleShapeError(f"is malformed: it reads memo index {arg}, never stored")
                stack.append(memo[arg])
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                del stack[marks.pop() :]
            else:
                _apply(_EFFECTS[name], stack, marks, max(MIN_OBJECTS, OBJECTS_PER_OPCODE * ops))
    except PickleShapeError:
        raise
    except IndexError:  # an opcode taking more than the stack holds, or a mark that was never set
        raise PickleShapeError("is malformed: an opcode takes more than the stack holds") from None
    except Exception as exc:  # pickletools: an unknown opcode, an argument cut short, no STOP ...
        detail = " ".join(str(exc).split())[:200]
        if ended():
            raise PickleShapeError(f"ends early ({detail})", True) from None
        raise PickleShapeError(f"is malformed ({detail})") from None


def _apply(effect: tuple[int, int, int, bool], stack: list[_Node], marks: list[int], limit: int) -> None:
    """An opcode's effect (:func:`_effect`) on the stack: pops what it takes and pushes what it makes, or adds what
    it takes to the entry below (in place), whose depth and count grow."""
    marked, taken, pushed, in_place = effect
    start = marks.pop() if marked else len(stack)
    start -= taken
    if start < 0:
        raise IndexError
    if in_place:  # the target stays below what it takes, which is popped
        target = stack[start]
        start += 1
        depth, count = target.depth, target.count
    else:
        depth = count = 1
    for node in stack[start:]:
        if node.depth >= depth:
            depth = node.depth + 1
        count += node.count
    del stack[start:]
    if in_place:
        target.depth, target.count = depth, count
    elif pushed:
        stack.extend([_Node(depth, count) for _ in range(pushed)])
    else:  # STOP: the object is made, nothing holds it
        return
    if depth > MAX_DEPTH:
        raise PickleShapeError(f"nests containers more than {MAX_DEPTH} deep")
    if count > limit:
        raise PickleShapeError(f"would build more than {limit} objects (a shared one counted each time it is "
                               "reached)")  # fmt: skip

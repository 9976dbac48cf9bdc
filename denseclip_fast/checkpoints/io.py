"""Reading weight files without ever executing code from them.

* torch files (zip or legacy pickle) go through ``torch.load(weights_only=True)``: tensors, plain containers and
  numpy arrays/scalars (mmcv's ``meta`` may hold them) only; a zip file's entries are checked against their CRC-32s
  (torch.load does not check them) while torch.load reads it, its result kept only if they pass.
* TorchScript archives (OpenAI's CLIP ``.pt`` files) are read by :class:`_TorchScriptUnpickler`, which rebuilds
  tensors from the archive's storages and turns every scripted module into a plain record. No TorchScript code,
  no ``__setstate__`` of the archive and no global outside a short allowlist is ever run.
* safetensors files are read with the safetensors library (no pickle at all).

What a small crafted file can make the reader allocate is bounded too: zip entries must be stored uncompressed (as
torch.save and torch.jit.save write them: no zip bombs), no tensor may have more elements than its storage (an
expanded view) nor tensors sharing storages add up to much more than the file holds, no allowlisted function copies
what the pickle hands it (its memo can pass one long list to thousands of calls), and naming a TorchScript archive's
tensors is capped in depth, entries and characters.

Every failure is a :class:`CheckpointError` whose message is one line: the file and the reason. Running out of
memory on a valid file is a MemoryError naming the file, not "not a valid checkpoint".
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import pickle
import re
import reprlib
import stat
import struct
import sys
import threading
import uuid
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .crc import crc32
from .pickle_shape import PickleShapeError, check_pickle, check_pickle_bytes


class CheckpointError(ValueError):
    """A weight file that cannot be used; ``str(err)`` is ``'<path>: <reason>'`` on one line."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its message and attributes: the default, ``cls(message)``, failed to unpickle (no ``reason``)
        where an error crosses processes (a multiprocessing pool's worker that loads a checkpoint: its pool hung)."""
        return _unpickled, (type(self), self.args, dict(self.__dict__))


def _unpickled(cls: type[CheckpointError], args: tuple[Any, ...], state: dict[str, Any]) -> CheckpointError:
    error = cls.__new__(cls, *args)  # BaseException.__new__ keeps the args; __init__ is not called again
    error.__dict__.update(state)
    return error


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at a checkpoint's path: a CheckpointError (its one line, a ValueError) that a caller's ``except
    FileNotFoundError`` or ``except OSError`` catches too, as for any other file that is not there (errno ENOENT)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, "no such file")
        self.errno = errno.ENOENT  # filename stays None: OSError's str would then replace the one line

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path,)


@dataclass
class WeightFile:
    """What a file holds. ``kind``: 'torch' (``obj`` is what torch.load returned), 'torchscript' or 'safetensors'
    (``tensors`` is a flat name -> tensor dict, ``metadata`` the safetensors header metadata)."""

    kind: str
    obj: Any = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    owned: bool = False  # every tensor in memory torch allocated for it alone (a model may keep it: load_weights)


def check_not_a_training_state(obj: Any, path: str) -> None:
    """CheckpointError for what torch.load read from train's iter_N.state.pt (no model: the iteration, optimizer and
    random state), naming the weights file saved beside it; a file given for a model (load_checkpoint, --init)."""
    if isinstance(obj, Mapping) and {"iteration", "optimizer", "rng"} <= set(obj):
        weights = path.removesuffix(".state.pt") + ".safetensors" if path.endswith(".state.pt") else "its .safetensors"
        raise CheckpointError(path, f"a training state (iteration, optimizer, random state), not a model: the model "
                                    f"is the weights file saved beside it, {weights}")  # fmt: skip


PARTIAL_SUFFIX = ".partial"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers
# Limits on what a file may make the reader do, far above any real checkpoint (an OpenAI CLIP archive nests ~10 deep,
# holds a few thousand entries and names of ~60 characters), so that a small crafted file cannot take gigabytes.
MAX_NESTING = 256  # containers inside containers in a TorchScript archive
MAX_ENTRIES = 1_000_000  # container entries visited while naming a TorchScript archive's tensors
MAX_NAME_CHARS = 16_000_000  # characters of all the dotted names (and their prefixes) built for those tensors
# Tensors sharing storages (tied weights, slices) may add up to more bytes than the file holds, but not without bound:
# at most twice the storages' bytes plus this.
SHARED_VIEW_SLACK = 16 * 2**20


def _mode_for(path: str) -> int:
    """Permission bits for a file written at ``path``: those of the file there, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and back (a moment in which another
    thread's new file would get the wrong mode, hence not first)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike[str], durable: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` to write to (``.NAME.<unique>.partial``). When the block succeeds the file
    replaces ``path`` in one step (``os.replace``), so a reader or a killed process sees the old file or the new one,
    never half of one; with ``durable`` it is flushed to disk first (fsync, the directory entry too), so that a power
    loss does not either. When the block fails the temporary file is removed and ``path`` is left as it was. A
    process killed while writing leaves its ``.partial`` file behind (the trainer removes those from its work dir
    when it starts).

    As ``open(path, "w")`` would: a symlink at ``path`` is kept and its target replaced; something there that is not
    a regular file (/dev/null, a FIFO) is written to itself, in place (replacing it would put a file in its stead);
    the new file gets the replaced file's permissions, else those the umask allows (safetensors writes owner-only
    files, which other users of a shared machine could not load). Unlike open(): the folder must be writable (the
    temporary file is made there), a hard link's other names keep the old contents, and the owner is the writer."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        yield path
        return
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
        if durable:
            with contextlib.suppress(OSError):  # a directory cannot be opened for fsync everywhere
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike[str], what: str, durable: bool = True) -> Iterator[str]:
    """:func:`replaced_atomically` for a file the user named: its folder is made, and an OSError of the block or of
    the replacement is raised again naming ``path`` and ``what`` (e.g. "the ONNX graph"): the original names the
    temporary file, which is gone, or no file at all (a full disk is a bare "[Errno 28] No space left on device"),
    its errno and so its type (PermissionError ...) kept."""
    path = os.fspath(path)
    try:
        with made_folder(os.path.dirname(os.path.abspath(path))), replaced_atomically(path, durable) as partial:
            yield partial
    except OSError as exc:
        reason = f"cannot write {what}: {exc.strerror or exc}"
        if exc.errno is None:
            raise OSError(f"{path}: {reason}") from None
        raise OSError(exc.errno, reason, path) from None


@contextlib.contextmanager
def made_folder(folder: str) -> Iterator[None]:
    """``os.makedirs(folder)`` for the block; when the block fails (or is interrupted), the folders it made are
    removed again, deepest first, up to the first that holds something: a write that failed left them, empty."""
    made: list[str] = []
    missing = os.path.abspath(folder)
    while not os.path.lexists(missing) and os.path.dirname(missing) != missing:
        made.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in made:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError:
                break
        raise


def path_argument(value: Any, name: str = "path") -> str:
    """``value`` (a str or an os.PathLike naming a str path) as a str, or ValueError naming the argument ``name``,
    the accepted types and what came (bytes, None or a number would otherwise fail inside os or be echoed as b'...')."""
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a non-empty str or os.PathLike, got {type(value).__name__}: {value!r}")
    return path


# a training run's model files, iter_N.safetensors (train/loop.py writes and prunes them; N is group 1)
SAVED_MODEL = re.compile(r"iter_([0-9]+)\.safetensors")


def _a_directory(path: str) -> str:
    """What a directory given as a checkpoint is; for a training work dir, its newest model file, by iteration."""
    try:
        saved = [(int(m.group(1)), name) for name in os.listdir(path) if (m := SAVED_MODEL.fullmatch(name))]
    except OSError:
        saved = []
    if not saved:
        return "a directory, not a checkpoint file"
    return (f"a directory, not a checkpoint file; this training work dir's newest checkpoint is "
            f"{os.path.join(path, max(saved)[1])}")  # fmt: skip


def read_weight_file(path: str | os.PathLike[str]) -> WeightFile:
    """Open a checkpoint of any supported format, safely. Raises CheckpointError (ValueError for a ``path`` that
    is not a str or os.PathLike)."""
    path = path_argument(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, _a_directory(path) if os.path.isdir(path) else "not a file")
    with _opened(path) as (opened, size, head):
        return _read_opened(opened, path, size, head)


@contextlib.contextmanager
def _opened(path: str) -> Iterator[tuple[str, int, bytes]]:
    """The file at ``path`` opened once for all the checkpoint's readers: a path that names this open file (Linux's
    /proc/self/fd/N; elsewhere ``path`` itself), its size and its first 32 bytes, the file open until the block
    ends. Each reader opening the path itself (zipfile's directory, the CRC-32 thread, the pickle check, torch.load,
    the safetensors library) could read another file where one was renamed over ``path`` meanwhile (a training run
    replacing its checkpoint): the checks passed on one file and the other was loaded. Opened without blocking (a
    FIFO put at ``path`` meanwhile is refused, not waited on)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:  # removed since read_weight_file looked
        raise CheckpointNotFoundError(path) from None
    with open(descriptor, "rb") as f:  # closes the descriptor
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):  # replaced since read_weight_file looked
            raise CheckpointError(path, "not a file")
        if info.st_size == 0:
            raise CheckpointError(path, "the file is empty")
        opened = f"/proc/self/fd/{descriptor}"
        yield (opened if os.path.exists(opened) else path), info.st_size, f.read(32)


def _read_opened(opened: str, path: str, size: int, head: bytes) -> WeightFile:
    """read_weight_file's reading of the file open as ``opened`` (:func:`_opened`), of ``size`` bytes beginning with
    ``head``, by its format; ``path`` (the caller's) names it in messages."""
    if head[:4] == b"PK\x03\x04":
        entries = _zip_entries(opened, path)
        _check_names_once(entries or [], path)
        if entries is not None and any("/data/aotinductor/" in f"/{e.filename}" for e in entries):
            raise CheckpointError(path, "this is an AOTInductor package (export --format aoti, to_aoti), not a "
                                        "checkpoint: run it with denseclip_fast.export.load_aoti or the C++ runner, or "
                                        "give the checkpoint it was exported from")  # fmt: skip
        if entries is not None and _is_torchscript(entries):
            return WeightFile("torchscript", tensors=_read_torchscript(opened, path, size))
        for entry in entries or ():  # torch.save writes every entry stored; torch.load would inflate any other
            _check_stored(entry, path, size)
        if entries is None:  # not readable as a zip file: torch.load names the damage
            return WeightFile("torch", obj=_checked_views(_torch_load(opened, path, size), path), owned=True)
        return WeightFile("torch", obj=_checked_views(_load_zip(opened, path, entries, size), path), owned=True)
    # safetensors: an 8-byte little-endian header length, then the JSON header. Tested before the pickle marker: the
    # length's first byte is 0x80 for one header length in 32 (they are multiples of 8), and torch.save's legacy
    # files, which begin with 0x80, never have "{" at byte 8 (their magic number's bytes are there)
    if len(head) >= 9 and head[8:9] == b"{":
        header = struct.unpack("<Q", head[:8])[0]
        if 8 + header <= size:
            return _read_safetensors(opened, path)
        if header <= SAFETENSORS_MAX_HEADER:
            raise CheckpointError(path, f"truncated or corrupt safetensors file: its header should be {header} bytes "
                                        f"but the file has {size} bytes in all")  # fmt: skip
    if head[:1] == b"\x80":  # a pickle protocol marker: torch.save's legacy format, whose magic number comes first
        if LEGACY_MAGIC not in head:
            raise CheckpointError(path, "not a torch checkpoint: a plain pickle (pickle.dump), which torch.save does "
                                        "not write; it is not unpickled (that could run code): re-save its tensors "
                                        "with torch.save or safetensors in a trusted environment",
                                  ) from None  # fmt: skip
        with open(opened, "rb") as f:
            for _ in range(LEGACY_PICKLES):
                _check_pickle(path, lambda: check_pickle(f, size - f.tell()))
        return WeightFile("torch", obj=_checked_views(_torch_load(opened, path, size), path), owned=True)
    if head[:1] == b"\x08" and head[2:3] == b"\x12" or path.lower().endswith(".onnx"):  # ModelProto's ir_version,
        # then its producer_name: what every ONNX exporter writes first
        raise CheckpointError(
            path, "this looks like an ONNX graph (export --format onnx), not a checkpoint: run it with ONNX Runtime "
            "or TensorRT, or give the checkpoint it was exported from"
        )
    raise CheckpointError(
        path, f"not a checkpoint: unrecognised format (first bytes {head[:8]!r}); expected a torch .pth/.pt file, "
        "a TorchScript archive or a .safetensors file"
    )


def _numpy_safe_globals() -> list[Any]:
    """numpy arrays and scalars, which mmcv's ``meta`` may hold: rebuilt from their data, no code involved. Named as
    numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) write them."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    items: list[Any] = [np.ndarray, np.dtype]
    for package in ("numpy.core", "numpy._core"):
        items += [(multiarray._reconstruct, f"{package}.multiarray._reconstruct"),
                  (multiarray.scalar, f"{package}.multiarray.scalar")]  # fmt: skip
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64)
    items += [type(np.dtype(kind)) for kind in kinds]
    return items


# the magic number torch.save's legacy (pre-zip) format pickles first (a LONG1 of 10 little-endian bytes: byte 4 of
# a protocol 2 file, byte 13 of a framed protocol 4 or 5 one); a pickle without it is not a torch file
LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
FRAME = pickle.FRAME[0]  # protocol 4's framing opcode (149), which torch's weights-only unpickler does not take
# the pickles a legacy file begins with: the magic number, the format's version, sys_info, the object, its storages'
# keys (the storages' bytes follow them)
LEGACY_PICKLES = 5


# one torch.load at a time in the process: torch's safe_globals adds the numpy globals to a process-wide set and
# removes them on exit, and catch_warnings saves and restores the process-wide filters. Two threads loading at once
# took the numpy globals away from each other mid-load (a checkpoint whose meta holds numpy values was refused as
# "not a valid checkpoint") and left the filter below in place for good (the second exit restored the first's)
_TORCH_LOAD_LOCK = threading.Lock()


def _torch_load(opened: str, path: str, size: int) -> Any:
    """torch.load(weights_only=True) of the file ``opened`` names, its failures a CheckpointError naming ``path``."""
    try:
        with _TORCH_LOAD_LOCK, torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            # its advice to file an issue for a pickle protocol past 2; what fails is said below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(opened, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not found and f"Unsupported operand {FRAME}" in str(exc):
            raise CheckpointError(
                path, "not readable safely: a torch file written with pickle protocol 4 or later (torch.save's "
                "pickle_protocol), whose framing torch's safe loader does not read; if you trust the file, re-save "
                "it with torch.save's default protocol in a trusted environment"
            ) from None
        if not found:  # torch's message advises weights_only=False: only its own reason is kept
            inner = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(exc), re.DOTALL)
            detail = f" ({excerpt(inner.group(1))})" if inner else ""
            raise CheckpointError(
                path, f"not a valid checkpoint: it holds objects other than tensors and plain containers, or its "
                f"pickle is malformed{detail}"
            ) from None  # fmt: skip
        raise CheckpointError(
            path,
            f"refused: loading it would execute code (it references {found.group(1)}); only tensors and plain "
            "containers are read. If you trust the file, re-save its state_dict with torch.save in a trusted "
            "environment.",
        ) from None
    except Exception as exc:  # any failure decoding an untrusted file (a crafted pickle: TypeError, IndexError ...)
        if (oom := _out_of_memory(exc, path, size)) is not None:
            raise oom from None
        message = str(exc).split(".")[0] if str(exc) else type(exc).__name__
        if isinstance(exc, EOFError) or "central directory" in message or "failed reading" in message:
            reason = "truncated or corrupt (the archive ends early or its index is damaged)"
        else:
            reason = (f"not a valid checkpoint: it could not be read as a torch file ({type(exc).__name__}: "
                      f"{excerpt(message)})")  # fmt: skip
        raise CheckpointError(path, reason) from None


_OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: a MemoryError, or torch's allocators failing (a RuntimeError:
    "DefaultCPUAllocator: can't allocate memory", torch.OutOfMemoryError's "CUDA out of memory")."""
    allocator = isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OUT_OF_MEMORY)
    return isinstance(exc, MemoryError) or allocator


def _out_of_memory(exc: BaseException, path: str, size: int) -> Exception | None:
    """When ``exc`` is running out of memory (a MemoryError, or torch's allocator failing: a RuntimeError
    "DefaultCPUAllocator: can't allocate memory"): a MemoryError naming the file, as that says nothing about the
    file and must not read as "not a valid checkpoint"; but a CheckpointError when a single allocation was larger
    than the whole file, which no valid file asks for (a legacy torch file declares its storages' sizes). Else
    None."""
    if not out_of_memory(exc):
        return None
    asked = re.search(r"allocate (\d+) bytes", str(exc))
    if asked and int(asked.group(1)) > size:
        return CheckpointError(path, f"not a valid checkpoint: reading it asks for {asked.group(1)} bytes of memory at "
                                     f"once, more than the whole file ({size} bytes)")  # fmt: skip
    return MemoryError(f"{path}: not enough memory to read it ({excerpt(exc) or type(exc).__name__})")


def _zip_entries(opened: str, path: str) -> list[zipfile.ZipInfo] | None:
    """The entries of the zip file ``opened`` names, or None when it cannot be opened as one (torch.load then reports
    the damage); ``path`` names it in messages."""
    try:
        with zipfile.ZipFile(opened) as z:
            return z.infolist()
    except (zipfile.BadZipFile, OSError):
        return None
    except UnicodeDecodeError:  # an entry flagged UTF-8 (as torch.save writes them) whose name is not
        raise CheckpointError(path, "truncated or corrupt: its zip index holds an entry name that is not UTF-8 text, "
                                    "as torch.save writes them") from None  # fmt: skip
    except NotImplementedError as exc:  # "zip file version 20.0": an entry needing a version zipfile lacks
        raise CheckpointError(path, f"truncated or corrupt: its zip index asks for what torch.save never writes "
                                    f"({excerpt(exc)})") from None  # fmt: skip


def _check_names_once(entries: list[zipfile.ZipInfo], path: str) -> None:
    """CheckpointError for a zip archive that holds an entry name twice: torch.save never writes one, and its
    readers disagree on which copy counts (torch.load reads the first, Python's zipfile the last), so that one file
    could hold two sets of weights, each passing its CRC-32."""
    seen: set[str] = set()
    for entry in entries:
        if entry.filename in seen:
            raise CheckpointError(path, f"refused: its zip archive holds the entry {excerpt(repr(entry.filename))} "
                                        "twice, which torch.save never writes (which copy counts depends on the "
                                        "reader)")  # fmt: skip
        seen.add(entry.filename)


def _check_pickle(path: str, check: Callable[[], None]) -> None:
    """Runs ``check`` (pickle_shape's, on one of the file's pickles) and turns its PickleShapeError into a
    CheckpointError: the pickle is read by no unpickler unless its shape is sound."""
    try:
        check()
    except PickleShapeError as exc:
        kind = "truncated or corrupt" if exc.truncated else "not a valid checkpoint"
        raise CheckpointError(path, f"{kind}: its pickle {exc}") from None


def _load_zip(opened: str, path: str, entries: list[zipfile.ZipInfo], size: int) -> Any:
    """torch.load of a torch zip file once its pickles passed :func:`_check_zip_pickles`, with every entry's CRC-32
    checked (:func:`_check_crcs`) in a thread of its own meanwhile: the CRC and the file reads release the GIL,
    so the check (a pass over the whole file, more than torch.load's time for RN50) runs beside the pickle check
    and torch.load instead of before them (benchmarks/results/checkpoint_read_*.md). What torch.load returned is
    handed on only once the CRCs passed; a failing CRC is the error whatever else failed (it names the damage
    best). Where no thread can start (at interpreter shutdown) the check runs first, alone."""
    try:
        pool = ThreadPoolExecutor(1, thread_name_prefix="denseclip_fast-zip-crc32")
        crcs = pool.submit(_check_crcs, opened, path, entries)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        _check_crcs(opened, path, entries)
        _check_zip_pickles(opened, path, entries)
        return _torch_load(opened, path, size)
    with pool:
        try:
            _check_zip_pickles(opened, path, entries)
            loaded = _torch_load(opened, path, size)
        except Exception:
            damage = crcs.exception()
            if isinstance(damage, CheckpointError):
                raise damage from None
            raise
        crcs.result()
    return loaded


def _check_zip_pickles(opened: str, path: str, entries: list[zipfile.ZipInfo]) -> None:
    """:func:`_check_pickle` on every ``data.pkl`` of a torch zip file (the archive's object; torch.load reads the
    one under its top folder), read as stored (:func:`_stored_bytes`; their CRC-32s are :func:`_check_crcs`'s)."""
    pickled = [e for e in entries if e.filename.endswith("/data.pkl") and e.filename.count("/") == 1]
    try:
        with open(opened, "rb", buffering=0) as f:
            pickles = [_stored_bytes(f, entry) for entry in pickled]
    except (OSError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:  # never handed to torch unread
        raise CheckpointError(path, f"truncated or corrupt: its zip archive could not be read ({type(exc).__name__}: "
                                    f"{excerpt(exc)})") from None  # fmt: skip
    for data in pickles:
        _check_pickle(path, lambda: check_pickle_bytes(data))


def _check_stored(entry: zipfile.ZipInfo, path: str, size: int) -> None:
    """CheckpointError unless ``entry`` is stored uncompressed (its two sizes equal), not encrypted, and declares no
    more bytes than the whole file has: torch.save and torch.jit.save write their records so, and inflating a
    compressed one could make gigabytes out of a few kilobytes (a zip bomb)."""
    if entry.flag_bits & 0x1:
        raise CheckpointError(path, f"refused: its zip entry {entry.filename!r} is encrypted, which torch.save and "
                                    "torch.jit.save never do")  # fmt: skip
    if entry.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(path, f"refused: its zip entry {entry.filename!r} is compressed, which torch.save and "
                                    "torch.jit.save never do (a compressed entry may inflate to any size)")  # fmt: skip
    if max(entry.file_size, entry.compress_size) > size:
        raise CheckpointError(path, f"truncated or corrupt: its zip entry {entry.filename!r} declares "
                                    f"{entry.file_size} bytes but the file has {size} bytes in all")  # fmt: skip
    if entry.compress_size != entry.file_size:
        raise CheckpointError(path, f"truncated or corrupt: its zip entry {entry.filename!r} is stored, yet declares "
                                    f"{entry.file_size} bytes held in {entry.compress_size}")  # fmt: skip


ZIP_CHUNK = 1 << 20  # bytes of an entry :func:`_check_crcs` reads at a time (their CRC taken while in the cache)
_LOCAL_HEADER = struct.Struct("<4s2xH18xHH")  # a zip local header's signature, flags, name and extra lengths


def _check_crcs(opened: str, path: str, entries: list[zipfile.ZipInfo]) -> None:
    """CheckpointError naming the first entry of a torch zip file whose bytes fail the CRC-32 the archive stores for
    it, or whose local header is not the one the archive's directory describes: torch.load does not check them, so
    damage inside a tensor's data (a failing disk, a copy that went wrong) loaded as wrong weights. One read of the
    file (:func:`_first_failing_entry`); damage that makes it unreadable is left to torch.load to report. A file
    whose every entry records 0, as torch.save writes them after ``torch.serialization.set_crc32_options(False)``,
    holds no checksums and is not checked (it was refused as damaged)."""
    if all(entry.CRC == 0 for entry in entries):
        return
    try:
        failing = _first_failing_entry(opened, entries)
    except (OSError, EOFError):  # torch.load reports the damage
        return
    except UnicodeDecodeError:  # a local header's name flagged UTF-8 that is not
        raise CheckpointError(path, "truncated or corrupt: one of its zip entries is named in bytes that are not "
                                    "UTF-8 text, as torch.save writes them") from None  # fmt: skip
    if failing is not None:
        name, problem = failing
        raise CheckpointError(path, f"corrupt: its entry {name!r} {problem} (the file was damaged after it was "
                                    "written); copy or download it again")  # fmt: skip


def _first_failing_entry(opened: str, entries: list[zipfile.ZipInfo]) -> tuple[str, str] | None:
    """The first of ``entries`` (stored and not encrypted, as _check_stored made sure) of the zip file ``opened``
    names that fails zipfile's testzip, and what fails: its local header (:func:`_data_offset`) or its CRC-32; None
    where all pass. Read here ZIP_CHUNK bytes at a time into one buffer, the CRC taken by :func:`crc.crc32`
    (testzip's zlib CRC took 149 ms of RN50's 235 ms read_weight_file, beside torch.load, on the CI's 2 threads:
    benchmarks/results/checkpoint_read_cpu_2threads.md). An entry cut short raises EOFError."""
    buffer = memoryview(bytearray(ZIP_CHUNK))
    with open(opened, "rb", buffering=0) as f:
        for entry in entries:
            try:
                f.seek(_data_offset(f, entry))
            except _LocalHeaderError as exc:
                return entry.filename, str(exc)
            value, left = 0, entry.compress_size
            while left:
                count = f.readinto(buffer[: min(left, ZIP_CHUNK)])
                if not count:
                    raise EOFError
                value = crc32(buffer[:count], value)
                left -= count
            if value != entry.CRC:
                return entry.filename, "fails the CRC-32 check the archive stores for it"
    return None


class _LocalHeaderError(zipfile.BadZipFile):
    """An entry's local header is not the one the archive's directory describes (the message says how)."""


def _data_offset(f: Any, entry: zipfile.ZipInfo) -> int:
    """Where the data of ``entry`` begins in the open zip file ``f``, once its local header checks as zipfile's
    open checks it: a local header at the directory's offset (_LocalHeaderError otherwise), naming the directory's
    entry, decoded as its flags say (UnicodeDecodeError where a name flagged UTF-8 is not; _LocalHeaderError for
    another name)."""
    f.seek(entry.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise _LocalHeaderError("has no local header where the archive's directory puts it")
    _, flags, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if f.read(name_length).decode("utf-8" if flags & 0x800 else "cp437") != entry.orig_filename:
        raise _LocalHeaderError("has a local header that names another entry")
    return int(entry.header_offset) + _LOCAL_HEADER.size + name_length + extra_length


def _stored_bytes(f: Any, entry: zipfile.ZipInfo) -> bytes:
    """The bytes of a stored ``entry`` of the open zip file ``f`` (:func:`_data_offset`; EOFError where the file
    ends first). Their CRC-32 unchecked: that is :func:`_check_crcs`'s, which also knows a file without them."""
    f.seek(_data_offset(f, entry))
    data = f.read(entry.compress_size)
    if len(data) < entry.compress_size:
        raise EOFError(f"entry {entry.filename!r} ends after {len(data)} of its {entry.compress_size} bytes")
    return bytes(data)


def _checked_views(obj: Any, path: str) -> Any:
    """``obj`` (what torch.load returned) once every tensor in it passed :func:`_check_views`."""
    found: list[tuple[Any, torch.Tensor]] = []
    seen: set[int] = set()
    stack: list[tuple[Any, Any]] = [(None, obj)]
    while stack:  # every container once (the pickle may share them), without recursion
        key, item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append((key, item))
        elif isinstance(item, (dict, list, tuple, set, frozenset)) and id(item) not in seen:
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend((k, k) for k in item)
                stack.extend(item.items())
            else:
                stack.extend((key, v) for v in item)
    _check_views(found, path)
    return obj


def _check_views(tensors: list[tuple[Any, torch.Tensor]], path: str) -> None:
    """CheckpointError unless every (key, tensor) is a dense CPU tensor with no more elements than its storage holds
    (a saved weight never has more; an expanded or overlapping view of a few bytes may have billions, which a copy
    or the model built from its shape would allocate), and the distinct tensors together take at most twice the
    bytes of the storages they view (plus SHARED_VIEW_SLACK)."""
    distinct = {id(t): (key, t) for key, t in tensors}
    storages: dict[int, int] = {}
    total = 0
    for key, t in distinct.values():
        if t.layout != torch.strided or t.device.type != "cpu":
            raise CheckpointError(path, f"refused: {_where(key)} is a {t.layout} tensor on {t.device}; only dense CPU "
                                        "tensors are read")  # fmt: skip
        storage = t.untyped_storage()
        nbytes = t.numel() * t.element_size()
        if nbytes > storage.nbytes():
            raise CheckpointError(
                path, f"refused: {_where(key)} has shape {tuple(t.shape)} ({t.numel()} elements) but its storage holds "
                f"{storage.nbytes() // t.element_size()}: an expanded or overlapping view, which no saved weight is"
            )  # fmt: skip
        storages[storage.data_ptr()] = storage.nbytes()
        total += nbytes
    held = sum(storages.values())
    if total > 2 * held + SHARED_VIEW_SLACK:
        raise CheckpointError(path, f"refused: its tensors view the same storages over and over ({total} bytes of "
                                    f"tensors over {held} bytes of data)")  # fmt: skip


def _where(key: Any) -> str:
    """The tensor under ``key``, for a message: the key's repr, shortened (:func:`short_repr`)."""
    return f"the tensor under {excerpt(short_repr(key), 80)}" if key is not None else "a tensor"


def _read_safetensors(opened: str, path: str) -> WeightFile:
    """The library reads the header and the metadata, io the tensors (:func:`_read_safetensors_data`), both from
    the file ``opened`` names (:func:`_opened`: on Linux the one open file, so that a file replaced meanwhile cannot
    give the old file's metadata with the new file's tensors); ``path`` names it in messages."""
    from safetensors import safe_open

    if opened == path:  # no /proc/self/fd: the library opens the path itself
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # a name of bytes that are not UTF-8: safetensors takes only UTF-8 paths
            raise CheckpointError(path, "the safetensors library opens only UTF-8 file names; rename the "
                                        "file") from None  # fmt: skip
    try:
        with safe_open(opened, framework="pt", device="cpu") as f:  # the header checked by the library first
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            read = _read_safetensors_data(opened, names, path)
            tensors = read if read is not None else {name: f.get_tensor(name) for name in names}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError variants
        raise CheckpointError(path, f"corrupt or truncated safetensors file ({exc})") from None
    return WeightFile("safetensors", tensors=tensors, metadata=metadata, owned=read is not None)


# safetensors' dtype names -> torch's (those this torch has)
SAFETENSORS_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                       ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
                       ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
                       ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)
}  # fmt: skip


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: an object, or ValueError for a name it holds twice."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError("a name appears twice in an object")
    return dict(pairs)


def _read_safetensors_data(opened: str, names: list[str], path: str) -> dict[str, torch.Tensor] | None:
    """The tensors ``names`` of a safetensors file whose header the library has checked, each read straight from
    the file into memory torch allocates for it, as torch.load's are: a model may keep such tensors, where the
    library's start anywhere on 8 bytes and were copied (a second pass over the weights, and their memory twice at
    once). None (the library then reads them) on a big-endian machine or for a dtype not in SAFETENSORS_DTYPES. The
    header's entries are checked again before any is read: no name twice, offsets inside the data, sizes that agree
    with the shapes (the library checked that the entries do not overlap, so that they come to the file's data in
    all). The tensors are read in the file's order (:class:`_FileCopies`)."""
    if sys.byteorder != "little":  # safetensors stores little-endian bytes
        return None
    with open(opened, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        try:
            header = json.loads(f.read(length), object_pairs_hook=_unique_keys)
        except ValueError as exc:  # (the library read it: a name twice, which it may have taken otherwise)
            raise CheckpointError(path, f"corrupt safetensors header ({exc})") from None
        size = os.fstat(f.fileno()).st_size
        data = size - 8 - length
        entries = [header.get(name) if isinstance(header, dict) else None for name in names]
        infos = [info for info in entries if isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES]
        if len(infos) < len(names):
            return None
        plan = []
        for name, info in zip(names, infos):
            shape, offsets = info.get("shape"), info.get("data_offsets")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if (not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape)
                    or not isinstance(offsets, list) or len(offsets) != 2
                    or not all(type(n) is int for n in offsets) or not 0 <= offsets[0] <= offsets[1] <= data
                    or math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]):  # fmt: skip
                raise CheckpointError(path, f"corrupt safetensors header: the entry of {excerpt(repr(name), 80)} "
                                            f"({excerpt(info)}) does not fit its {data} bytes of data")  # fmt: skip
            plan.append((8 + length + offsets[0], name, dtype, shape))
        tensors = {}
        with _FileCopies(f.fileno(), size) as copies:
            for offset, name, dtype, shape in sorted(plan, key=lambda entry: entry[0]):
                tensor = torch.empty(shape, dtype=dtype)
                if tensor.numel():
                    copies.copy(offset, tensor.reshape(-1).view(torch.uint8))
                tensors[name] = tensor
    return {name: tensors[name] for name in names}


DROP_EVERY = 8 << 20  # bytes of copied pages _FileCopies gives back at a time


class _FileCopies:
    """Copies of a file's bytes into tensors from one private mapping of the whole file, asked in the file's order
    (offsets that never go back): the pages behind the copies are given back to the kernel as it goes (madvise's
    DONTNEED, DROP_EVERY bytes at a time, where the platform has it), so that the process never holds the whole file
    mapped besides the weights. Faster than a mapping a tensor (its setting up and tearing down, 624 times for RN50)
    and than read() into the fresh tensors; numbers in the README (Checkpoints). The mapping is private and writable,
    as torch.frombuffer takes without a warning (it warns, once a process, of a read-only buffer, and a copy through
    numpy took longer): where the kernel counts commitments strictly (vm.overcommit_memory=2) the file's size counts
    against the limit while it is mapped."""

    def __init__(self, descriptor: int, size: int) -> None:
        self._mapping = mmap.mmap(descriptor, size, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._mapping, dtype=torch.uint8)
        self._dropped = 0  # the mapping's bytes below this were given back
        self._drop = hasattr(self._mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED")

    def __enter__(self) -> _FileCopies:
        return self

    def __exit__(self, *exc: object) -> None:
        # no view of the mapping may outlive it: torch.frombuffer holds no buffer export, so close() would not refuse
        del self._bytes
        self._mapping.close()

    def copy(self, offset: int, into: torch.Tensor) -> None:
        """``into`` (uint8, not empty) filled with the file's bytes from ``offset`` on."""
        end = offset + into.numel()
        into.copy_(self._bytes[offset:end])
        end -= end % mmap.PAGESIZE  # the pages wholly below the copy's end
        if self._drop and end - self._dropped >= DROP_EVERY:
            self._mapping.madvise(mmap.MADV_DONTNEED, self._dropped, end - self._dropped)
            self._dropped = end


# ---------------------------------------------------------------------------------------------- TorchScript


def _is_torchscript(entries: list[zipfile.ZipInfo]) -> bool:
    return any(e.filename.endswith("/constants.pkl") or "/code/" in e.filename for e in entries)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptRecord:
    """Stands in for any scripted class of the archive: keeps its pickled state, runs none of its code."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    if not (isinstance(storage, torch.Tensor) and isinstance(offset, int) and isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list)) and all(isinstance(n, int) for n in (*size, *stride))):  # fmt: skip
        raise pickle.UnpicklingError("a tensor rebuilt from arguments that are not (storage, offset, size, stride)")
    if math.prod(size) > storage.numel():  # as_strided checks the bounds, not the count (zero strides ...)
        raise pickle.UnpicklingError(
            f"a tensor of shape {excerpt(tuple(size), 80)} views a storage of {storage.numel()} elements: an "
            "expanded or overlapping view, which no saved weight is"
        )
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


class _Allowed:
    """An allowlisted function as the archive's pickle sees it: callable, and without state that a BUILD opcode
    could set (on the function itself, BUILD could change its ``__defaults__`` for the rest of the process)."""

    __slots__ = ("_function",)
    _function: Any

    def __init__(self, function: Any) -> None:
        object.__setattr__(self, "_function", function)

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"the archive sets attribute {name!r} of an allowlisted function")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("the archive sets the state of an allowlisted function")


def _first(value: Any, *_: Any) -> Any:
    return value


def _as_list(items: Any, *_: Any) -> list[Any] | tuple[Any, ...]:
    """torch.jit._pickle.build_*list: the list itself, as torch's own returns it. Never a copy: the pickle may pass
    the same long list (from its memo) to thousands of calls."""
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError(f"a TorchScript list built from a {type(items).__name__}")
    return items


def _empty_ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    """collections.OrderedDict as the archives call it (with no argument, for a tensor's backward hooks); with an
    argument it would copy a mapping the pickle may pass again and again."""
    if args:
        raise pickle.UnpicklingError("collections.OrderedDict called with arguments")
    return OrderedDict()


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Allowed(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_first),
    ("collections", "OrderedDict"): _Allowed(_empty_ordered_dict),
    ("torch.jit._pickle", "restore_type_tag"): _Allowed(_first),
    ("torch.jit._pickle", "build_intlist"): _Allowed(_as_list),
    ("torch.jit._pickle", "build_doublelist"): _Allowed(_as_list),
    ("torch.jit._pickle", "build_boollist"): _Allowed(_as_list),
    ("torch.jit._pickle", "build_tensorlist"): _Allowed(_as_list),
}


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str, size: int) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path, self.size = archive, prefix, path, size
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptRecord
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(self.path, f"refused: the TorchScript archive references {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(self.path, f"unsupported TorchScript storage reference {excerpt(short_repr(pid))}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(self.path, f"unsupported storage type in TorchScript archive: {dtype!r}")
        if key not in self.storages:
            raw = _read_entry_into(self.archive, f"{self.prefix}data/{key}", self.path, self.size)
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _read_entry(archive: zipfile.ZipFile, name: str, path: str, size: int) -> bytes:
    entry = archive.getinfo(name)
    _check_stored(entry, path, size)
    return archive.read(entry)


def _read_entry_into(archive: zipfile.ZipFile, name: str, path: str, size: int, chunk: int = 1 << 20) -> bytearray:
    """The entry's bytes in a bytearray of its declared size, filled chunk by chunk (no second copy of a large
    weight); the last read checks the entry's CRC. A short entry is zipfile.BadZipFile (reported as corrupt)."""
    entry = archive.getinfo(name)
    _check_stored(entry, path, size)
    out = bytearray(entry.file_size)
    view, done = memoryview(out), 0
    with archive.open(entry) as stream:
        while done < len(out):
            data = stream.read(min(chunk, len(out) - done))
            if not data:
                raise zipfile.BadZipFile(f"entry {name!r} ends after {done} of its {len(out)} bytes")
            view[done : done + len(data)] = data
            done += len(data)
        if stream.read(1):  # zipfile stops at the declared size; reading to the end checks the CRC
            raise zipfile.BadZipFile(f"entry {name!r} holds more than its {len(out)} bytes")
    return out


def _flatten(root: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensors under ``root`` by dotted name, following records and dicts in order (depth first). Without
    recursion, and within MAX_NESTING levels, MAX_ENTRIES entries and MAX_NAME_CHARS characters of names (a
    CheckpointError past them): a crafted archive may nest deeper than Python's recursion limit, build names whose
    total length grows with the square of the depth, or share containers so that the paths to them multiply. A
    container shared by several parents (tied submodules) gets every name; one inside itself (a cycle) is skipped.
    Entries under keys other than str, int, float or bool are skipped."""
    out: dict[str, torch.Tensor] = {}

    def contents(obj: Any) -> dict[Any, Any] | None:
        obj = obj.state if isinstance(obj, _ScriptRecord) else obj
        return obj if isinstance(obj, dict) else None

    top = contents(root)
    if top is None:
        return out
    entries, chars = len(top), 0
    on_path = {id(top)}  # the containers being read, from the root down: one of them again is a cycle
    stack: list[tuple[str, dict[Any, Any], Iterator[tuple[Any, Any]]]] = [("", top, iter(top.items()))]
    while stack:
        prefix, current, pending = stack[-1]
        for key, value in pending:
            if not isinstance(key, (str, int, float)):
                continue
            child = None
            if not isinstance(value, torch.Tensor):
                child = contents(value)
                if child is None or id(child) in on_path:  # not a container, or a cycle
                    continue
            text = str(key)
            chars += len(prefix) + len(text) + 1  # counted before the name is built
            if chars > MAX_NAME_CHARS:
                raise CheckpointError(path, f"refused: the TorchScript archive's names add up to more than "
                                            f"{MAX_NAME_CHARS} characters")  # fmt: skip
            name = prefix + text
            if child is None:
                out[name] = value
                continue
            if len(stack) >= MAX_NESTING:
                raise CheckpointError(path, f"refused: the TorchScript archive nests containers more than "
                                            f"{MAX_NESTING} deep")  # fmt: skip
            entries += len(child)
            if entries > MAX_ENTRIES:
                raise CheckpointError(path, f"refused: the TorchScript archive has more than {MAX_ENTRIES} entries to "
                                            "read (containers shared along many paths?)")  # fmt: skip
            on_path.add(id(child))
            stack.append((name + ".", child, iter(child.items())))
            break
        else:
            stack.pop()
            on_path.discard(id(current))
    return out


def _read_torchscript(opened: str, path: str, size: int) -> dict[str, torch.Tensor]:
    """The tensors of the TorchScript archive ``opened`` names (:class:`_TorchScriptUnpickler`), by dotted name;
    ``path`` names it in messages."""
    try:
        with zipfile.ZipFile(opened) as archive:
            data_pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if not data_pkl:
                raise CheckpointError(path, "TorchScript archive without data.pkl")
            prefix = data_pkl[0][: -len("data.pkl")]
            byteorder = f"{prefix}byteorder"
            if byteorder in archive.namelist() and _read_entry(archive, byteorder, path, size).strip() != b"little":
                raise CheckpointError(path, "big-endian TorchScript archives are not supported")
            data = _read_entry(archive, data_pkl[0], path, size)
            _check_pickle(path, lambda: check_pickle_bytes(data))
            tensors = _flatten(_TorchScriptUnpickler(data, archive, prefix, path, size).load(), path)
        if not tensors:
            raise CheckpointError(path, "the TorchScript archive holds no tensors")
        _check_views(list(tensors.items()), path)
        return _own_storages(tensors)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise CheckpointError(path, f"truncated or corrupt TorchScript archive ({excerpt(exc)})") from None
    except Exception as exc:  # any other failure decoding the untrusted pickle: wrong argument types, a BUILD on an
        # object without state, a bad storage reference, absurd sizes ... (no code of the file runs in any case)
        if (oom := _out_of_memory(exc, path, size)) is not None:
            raise oom from None
        raise CheckpointError(
            path, f"not a valid checkpoint: its TorchScript archive could not be decoded ({type(exc).__name__}: "
            f"{excerpt(exc)})"
        ) from None  # fmt: skip


def covers_its_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous and spans its storage exactly, from its first byte to its last: no view of a
    larger storage (which would keep the rest of it alive) and no strided one."""
    spanned = t.numel() * t.element_size() == t.untyped_storage().nbytes()
    return bool(t.storage_offset() == 0 and t.is_contiguous() and spanned)


def _own_storages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with no two distinct tensors sharing memory: a tensor that is the only one on its storage and
    covers it exactly (CLIP's weights: one storage each) is kept as it is, any other view is copied, so the peak stays
    near the file's size instead of twice it. A tensor found under several names (tied weights) stays one tensor."""
    users: dict[int, set[int]] = {}
    for t in tensors.values():
        users.setdefault(t.untyped_storage().data_ptr(), set()).add(id(t))
    owned: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if id(t) in owned:
            continue
        alone = len(users[t.untyped_storage().data_ptr()]) == 1
        owned[id(t)] = t if covers_its_storage(t) and alone else t.clone()
    return {name: owned[id(t)] for name, t in tensors.items()}


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 120, 120
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 8


def short_repr(value: Any) -> str:
    """``repr(value)`` with a crafted file's nesting and lengths cut short (reprlib: 3 levels, 8 items a container,
    120 characters a string): a key nested 5000 tuples deep, or 25 doublings of a tuple that a 1.4 KB pickle
    shares (2**25 leaves), is not written out whole."""
    return _SHORT.repr(value)


def excerpt(value: Any, limit: int = 200) -> str:
    """``str(value)`` on one line, cut to ``limit`` characters (a crafted file's error may quote anything); a
    container as :func:`short_repr` writes it."""
    text = short_repr(value) if isinstance(value, (tuple, list, dict, set, frozenset)) else str(value)
    text = " ".join(text[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""AOTInductor: a compiled ``.pt2`` package of the engine's forward, for Python and for C++ without Python.

    to_aoti(model_or_segmenter, "rn50.pt2", image_size=512)    torch.export + aoti_compile_and_package
    pkg = load_aoti("rn50.pt2"); logits = pkg(x)                  x: CLIP-normalised (B, 3, H, W), B <= max_batch

The package computes what ``Segmenter`` computes per forward (BatchNorm folded, the vocabulary's class embeddings
baked in, the engine's device and dtype, the logits resized in float32 and returned so) at one image size and any
batch up to ``max_batch``. The fused operators
are inside: on CUDA the Triton kernels (``torch.library.triton_op``) are compiled into the package; the C++ and
CUDA C++ operators are called through PyTorch's dispatcher, so the process that runs the package must have loaded
them (``import denseclip_fast`` in Python; link ``libdenseclip_fast_ops`` in C++, see examples/cpp/segment.cpp).
Facts the C++ runner needs (image size, mean/std, class names, device, dtype) are stored as package metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import numbers
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__, ops
from ..checkpoints.io import excerpt, path_argument
from ..config import DenseCLIPConfig
from ..engine import Segmenter
from ..engine.segmenter import no_tf32
from ..model import DenseCLIP
from ..ops.backends import MAX_GRID_Y
from ..preprocess import CLIP_MEAN, CLIP_STD
from ..validation import check_device, not_a_file
from .graphs import (
    EXPORT_LOCK,
    TRACE_BATCH,
    ImageGraph,
    check_image_size,
    default_window_stride,
    output_path,
    random_input,
    write_file,
)

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
PACKAGE_SUFFIX = ".pt2"  # what aoti_compile_and_package writes: a zip archive
DEFAULT_MAX_BATCH = 64
MAX_BATCH = 65536  # a sanity bound (1e22 compiled, and was written into the metadata the C++ runner reads as int64)


def to_aoti(
    model_or_segmenter: DenseCLIP | Segmenter,
    path: str | os.PathLike[str],
    *,
    image_size: int | Sequence[int] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    stride: int | Sequence[int] | None = None,
) -> Path:
    """Compile the engine's forward into an AOTInductor package at ``path`` (``.pt2``); returns the path. The file
    is replaced in one step: a failed write (a full disk ...) leaves the file at ``path`` as it was and raises an
    OSError naming ``path``.

    Args:
        model_or_segmenter: a Segmenter (its prepared model, device, dtype and vocabulary are used) or a DenseCLIP
            model (prepared here as a Segmenter would be, on ``device`` in ``dtype``).
        image_size: H and W (int or (H, W)); default the Segmenter's sliding-window crop (for a DenseCLIP model
            the architecture's: 512, 640 for ViT-B/16).
        max_batch: the largest batch the package accepts.
        device, dtype: for a DenseCLIP model only (default: CUDA when available, else CPU; bfloat16 on CUDA,
            float32 on CPU).
        stride: the sliding window's stride, recorded in the package with the test scale for runners that slide
            the package over an image (examples/cpp/segment.cpp) as the official test pipeline does, the package's
            image size being the window; default the Segmenter's stride when image_size is its crop, else two
            thirds of each side (the official 341 of 512, 426 of 640).
    """
    path = output_path(path)  # before the Segmenter's preparation and the compilation
    if path.suffix != PACKAGE_SUFFIX:
        raise ValueError(
            f"path must end in {PACKAGE_SUFFIX} (AOTInductor packages are {PACKAGE_SUFFIX} archives), got {str(path)!r}"
        )
    if isinstance(model_or_segmenter, Segmenter):
        if device is not None or dtype is not None:
            raise ValueError("device and dtype come from the Segmenter; pass a DenseCLIP model to choose them")
        seg = model_or_segmenter
    elif isinstance(model_or_segmenter, DenseCLIP):
        device = check_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                               else "cpu")  # fmt: skip
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        seg = Segmenter(model_or_segmenter, device=device, dtype=dtype, cuda_graphs=False)
    else:
        raise ValueError(
            f"model_or_segmenter must be a DenseCLIP model or a Segmenter, got {type(model_or_segmenter).__name__}"
        )
    ops.backends.query_device(seg.device)  # a bad device fails here, not deep in the trace below
    if isinstance(max_batch, numbers.Integral) and not isinstance(max_batch, bool):
        max_batch = int(max_batch)  # a numpy integer: a plain int, as the image size's
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not TRACE_BATCH <= max_batch <= MAX_BATCH:
        raise ValueError(
            f"max_batch must be an int >= {TRACE_BATCH} and <= {MAX_BATCH}, got {max_batch!r} (a package takes any "
            "batch from 1 to "
            f"max_batch; torch.export traces the batch as dynamic from {TRACE_BATCH}: for batch 1, "
            f"max_batch={TRACE_BATCH})"
        )
    check_grid(max_batch, seg.model.config, seg.device)
    # default: the Segmenter's window (a DenseCLIP model's Segmenter has the model's), so that the package slides as
    # the Segmenter it was made from
    size = check_image_size(seg.model, seg.crop if image_size is None else image_size)
    window_stride = _window_stride(stride, size, seg)
    # the vocabulary's embeddings and names read together, under the Segmenter's lock: a set_classes in another
    # thread during the export (seconds to minutes) gave a package computing the old vocabulary whose metadata named
    # the new one
    with seg._lock:
        text, class_names = seg._text.clone(), seg.class_names
    module = ImageGraph(seg.model, text, float32_logits=True).eval()
    example = random_input((TRACE_BATCH, 3, *size), seg.dtype, seg.device).contiguous(memory_format=_layout(seg.device))
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with EXPORT_LOCK, torch.no_grad(), seg._math():
        program = torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})
    metadata = {
        "denseclip_fast.version": __version__,
        "denseclip_fast.arch": seg.model.config.arch,
        "denseclip_fast.image_size": json.dumps(list(size)),
        "denseclip_fast.max_batch": str(max_batch),
        "denseclip_fast.test_scale": json.dumps(list(seg.model.config.test_scale)),
        "denseclip_fast.slide_stride": json.dumps(list(window_stride)),
        "denseclip_fast.device": seg.device.type,
        "denseclip_fast.dtype": DTYPE_NAMES[seg.dtype],
        "denseclip_fast.mean": json.dumps(CLIP_MEAN),
        "denseclip_fast.std": json.dumps(CLIP_STD),
        "denseclip_fast.class_names": json.dumps(class_names, ensure_ascii=False),
    }
    # Packaged in memory, then written by write_file (replaced atomically): torch's zip writer, given a path, writes
    # it in place, and when a write fails (a full disk) its destructor, finishing the archive, fails again and
    # aborts the process (std::terminate), the file there left half written. Into a buffer it cannot fail so, and
    # the write to disk is Python's: an OSError naming the path, the previous package kept. The buffer holds the
    # package once (about the weights), as torch's writer holds each file it adds.
    package = io.BytesIO()
    if seg.device.type == "cpu":
        import_cpp_extension_quietly()
    with EXPORT_LOCK, seg._math():
        torch._inductor.aoti_compile_and_package(
            program, package_path=package, inductor_configs={"aot_inductor.metadata": metadata}
        )
    if not zipfile.is_zipfile(package):  # a torch that took the buffer but wrote elsewhere: said, not written
        raise RuntimeError(f"{path}: aoti_compile_and_package left no package in the buffer it was given")
    with package.getbuffer() as data:
        write_file(path, data, "the AOTInductor package")
    return path


def _layout(device: torch.device) -> torch.memory_format:
    """The memory format a package's input is traced in, and made before each call (the compiled code trusts the
    traced strides): channels_last on CUDA, NCHW on CPU (examples/cpp/segment.cpp follows the same rule)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def import_cpp_extension_quietly() -> None:
    """Import torch.utils.cpp_extension (Inductor's compiler driver) without its import-time warning "No CUDA
    runtime is found, using CUDA_HOME=..." (on a machine with a CUDA toolkit and no GPU), which a CPU package's
    export printed among its own lines though it concerns no CUDA build; the logger's level is restored."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(saved)


def check_grid(max_batch: int, config: DenseCLIPConfig, device: torch.device) -> None:
    """A CUDA package's largest batch times the attention heads fits the fused attention's grid axis (eager calls
    split a larger one into launches, a package cannot); the CPU operators have no such limit."""
    heads = max(config.vision.heads, config.decoder.heads)
    if device.type == "cuda" and max_batch * heads > MAX_GRID_Y:
        raise ValueError(
            f"max_batch must be <= {MAX_GRID_Y // heads} for this architecture on CUDA, got {max_batch} (the fused "
            f"attention runs images x {heads} heads on one grid axis of at most {MAX_GRID_Y} rows, which a package "
            "cannot split as eager calls do)"
        )


def _window_stride(stride: int | Sequence[int] | None, size: tuple[int, int], seg: Segmenter) -> tuple[int, int]:
    """The slide stride recorded in a package whose image size is ``size`` (see to_aoti)."""
    if stride is None:
        return default_window_stride(size, seg.crop, seg.stride)
    items = list(stride) if isinstance(stride, Sequence) else [stride, stride]
    # ints of any kind (a numpy shape's), as plain ints; not bools
    pair = [int(v) for v in items if isinstance(v, numbers.Integral) and not isinstance(v, bool)]
    if len(items) != 2 or len(pair) != 2 or not all(1 <= v <= c for v, c in zip(pair, size)):
        raise ValueError(f"stride must be an int or (int, int) between 1 and the image size {size}, got {stride!r}")
    return pair[0], pair[1]


def _compiled_metadata(path: str) -> dict[str, Any] | None:
    """The metadata compiled into the package at ``path`` (its ``data/aotinductor/model/*_metadata.json``), read from
    the archive without extracting it; {} for a compiled model without it; None when ``path`` holds no compiled
    model (not a zip archive, or another zip: a torch.save file (.pth), an ONNX Runtime bundle ...). torch's loader
    extracts the whole package into a temporary directory first, and leaves that behind when the load then fails:
    what can be refused from the archive is refused before it runs."""
    from torch.export.pt2_archive.constants import AOTINDUCTOR_DIR

    model_dir = f"/{AOTINDUCTOR_DIR}model/"
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if model_dir in f"/{name}"]
            for name in names:
                if name.endswith("_metadata.json"):
                    meta = json.loads(archive.read(name))
                    return meta if isinstance(meta, dict) else {}
    except (OSError, zipfile.BadZipFile, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return {} if names else None


def _check_loadable(path: str, device_index: int) -> None:
    """Refuse, from the archive's metadata, what torch's loader would refuse only after extracting it."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an AOTInductor package (a .pt2 zip archive written by to_aoti)")
    meta = _compiled_metadata(path)
    if meta is None:
        raise ValueError(
            f"{path} is not an AOTInductor package (a .pt2 zip archive written by to_aoti): it holds no compiled "
            "model (data/aotinductor/model/)"
        )
    if "denseclip_fast.image_size" not in meta:
        raise ValueError(f"{path} is not a denseclip_fast package (no denseclip_fast metadata)")
    device = str(meta.get("AOTI_DEVICE_KEY", meta.get("denseclip_fast.device", "")))
    if device == "cpu" and device_index >= 0:
        raise ValueError(f"{path} is a CPU package; device_index={device_index} applies to CUDA packages only")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{path} is a CUDA package and this process has no CUDA device (torch.cuda.is_available() is "
                "False): write a CPU package (to_aoti of a CPU model or Segmenter) to run it here"
            )
        if device_index >= torch.cuda.device_count():
            raise ValueError(
                f"device_index {device_index} is out of range: this process sees {torch.cuda.device_count()} CUDA "
                "device(s)"
            )


def _extracted_copies() -> set[str]:
    """The folders where torch's loader may extract a package: every folder in $TMPDIR, Python's temp folder and
    /tmp (torch 2.14 makes aotinductor_* in $TMPDIR, 2.11 a mkdtemp folder of six random characters in /tmp, which
    the GPU machine's rehearsal found left behind). Which of them are this package's copies, only their contents
    tell (:func:`_remove_new_copies`)."""
    roots = {os.path.realpath(root) for root in (os.environ.get("TMPDIR"), tempfile.gettempdir(), "/tmp") if root}
    found: set[str] = set()
    for root in roots:
        with contextlib.suppress(OSError):
            found.update(entry.path for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False))
    return found


def _mapped_files() -> set[str]:
    """The files that some process (this one included) has mapped into its memory, from /proc/*/maps (Linux; a
    process whose maps this one may not read is skipped; empty where there is no /proc): a loaded package's compiled
    library is among them while it runs."""
    mapped: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError), open(os.path.join(entry.path, "maps"), encoding="utf-8",
                                                    errors="surrogateescape") as maps:  # fmt: skip
                for line in maps:
                    fields = line.rstrip("\n").split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith("/"):
                        mapped.add(fields[5].removesuffix(" (deleted)"))
    return mapped


def _remove_new_copies(path: str, before: set[str]) -> None:
    """torch's loader leaves its extracted copy of a package it failed to load (the compiled library and its weights,
    a folder per try, two per load with torch 2.14): remove those made since ``before`` that hold this package's
    library and that no process runs (maps one of their files: :func:`_mapped_files`). Another package's extraction
    (another load in this or another process) holds another library's name (a hash of its code) and is left alone;
    so is a load of this package that succeeded meanwhile, in this process or another, whose copy the loader may
    still read (a CUDA package's kernels). A load still under way is waited for by the caller
    (:func:`_package_lock`)."""
    with zipfile.ZipFile(path) as archive:
        libraries = [name for name in archive.namelist() if name.endswith(".so")]
    new = [copy for copy in _extracted_copies() - before
           if any(os.path.isfile(os.path.join(copy, name)) for name in libraries)]  # fmt: skip
    if not new:
        return
    in_use = {os.path.realpath(os.path.dirname(file)) for file in _mapped_files()}
    for copy in new:
        real = os.path.realpath(copy)
        if not any(folder == real or folder.startswith(real + os.sep) for folder in in_use):
            shutil.rmtree(copy, ignore_errors=True)


LOCK_WAIT_S = 300.0  # how long a failed load's clean-up waits for the other loads of its package to end


@contextlib.contextmanager
def _package_lock(path: str, exclusive: bool) -> Iterator[None]:
    """An advisory lock (flock) on the package file while torch's loader runs (shared: loads run together) or while
    a failed load removes what it left (exclusive: it waits until every other load_aoti of the same package, in any
    process or thread, has ended, so that none of their copies is taken for a leftover while it is extracted; each
    is then mapped, or failed and removed by its own load). An exclusive wait longer than LOCK_WAIT_S, or a file
    system without flock (or Windows), goes on unlocked: the mapped-files check still keeps loaded copies."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        descriptor = -1
    if descriptor < 0:  # (the body runs outside the except clause: its errors are not chained to this one)
        yield
        return
    try:
        if not exclusive:
            with contextlib.suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_SH)
        else:
            deadline = time.monotonic() + LOCK_WAIT_S
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.05)
                except OSError:
                    break
        yield
    finally:
        os.close(descriptor)  # and the lock with it


class AOTIPackage:
    """A loaded AOTInductor package: ``pkg(x)`` -> float32 logits (B, K, H, W) on its device (the package's dtype is
    the one it computes in; as the Segmenter, it resizes the head's logits in float32)."""

    def __init__(self, path: str | os.PathLike[str], device_index: int = -1) -> None:
        from .. import ops  # noqa: F401  (registers the C++ operators the package calls)

        path = path_argument(path)
        if not os.path.isfile(path):
            raise ValueError(f"path {path!r} {not_a_file(path)}; expected an AOTInductor package (.pt2)")
        given = device_index
        if isinstance(device_index, numbers.Integral) and not isinstance(device_index, bool):
            device_index = int(device_index)  # a numpy integer: the int torch's loader takes
        if type(device_index) is not int or device_index < -1:
            raise ValueError(
                f"device_index must be -1 (the package's own device) or a CUDA device index >= 0, got {given!r}"
            )
        self.path = path
        _check_loadable(path, device_index)
        import_cpp_extension_quietly()  # the loader imports it: its CUDA_HOME line printed on every CPU load
        # torch 2.10's loader calls torch._inductor.codecache without importing it (AttributeError in a process that
        # has exported nothing); later releases import it there
        import torch._inductor.codecache  # noqa: F401
        extracted = _extracted_copies()
        try:
            with _package_lock(path, exclusive=False):
                self._compiled = torch._inductor.aoti_load_package(path, device_index=device_index)
        except BaseException as exc:  # a corrupt or foreign library
            with _package_lock(path, exclusive=True):
                _remove_new_copies(path, extracted)
            if not isinstance(exc, RuntimeError):
                raise
            reason = excerpt(str(exc).strip().split("\n", 1)[0], 160)  # torch's lists the archive's files below it
            raise ValueError(f"{path}: the AOTInductor package could not be loaded: {reason}") from exc
        meta = self._compiled.get_metadata()
        self.metadata = {
            k.removeprefix("denseclip_fast."): v for k, v in meta.items() if k.startswith("denseclip_fast.")
        }
        self.image_size: tuple[int, int] = tuple(json.loads(self.metadata["image_size"]))
        self.max_batch = int(self.metadata["max_batch"])
        self.class_names: list[str] = json.loads(self.metadata["class_names"])
        self.dtype: torch.dtype = getattr(torch, self.metadata["dtype"])
        self.device = torch.device(self.metadata["device"] if device_index < 0 else f"cuda:{device_index}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, *self.image_size):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {got}")
        if not x.is_floating_point():
            raise ValueError(
                f"x must be a CLIP-normalised floating-point tensor, got dtype {x.dtype} "
                "(uint8 images go through denseclip_fast.preprocess first)"
            )
        if not 1 <= x.shape[0] <= self.max_batch:
            raise ValueError(f"the batch must be 1..{self.max_batch} for this package, got {x.shape[0]}")
        layout = _layout(self.device)
        # the compiled code trusts the traced strides: a view (a crop, an expanded batch) must be made dense first
        x = x.to(self.device, self.dtype).contiguous(memory_format=layout)
        # float32 packages compute in IEEE float32, as the Segmenter (C++ callers: at::globalContext()
        # .setAllowTF32CuDNN(false) and .setAllowTF32CuBLAS(false))
        with no_tf32(self.device.type == "cuda" and self.dtype == torch.float32):
            out: Any = self._compiled(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int64 labels: the logits' argmax (through max, as the Segmenter's labels: the same ties and
        NaNs, in half the time on a CPU)."""
        return self(x).max(dim=1).indices


def load_aoti(path: str | os.PathLike[str], device_index: int = -1) -> AOTIPackage:
    """Load a package written by :func:`to_aoti` (``device_index`` picks the GPU of a CUDA package)."""
    return AOTIPackage(path, device_index)

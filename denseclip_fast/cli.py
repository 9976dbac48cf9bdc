"""The ``denseclip-fast`` command.

    denseclip-fast info CHECKPOINT [--json]       (or info --checkpoint CHECKPOINT)
    denseclip-fast segment --checkpoint C [--classes "a,b,c"] [--open-vocab] [--mode slide|whole] [--device cpu|cuda]
                           [--dtype float32|bfloat16|float16] [--io-threads N] [--keep-going] IMAGE|DIR... --out DIR
    denseclip-fast export --checkpoint C --format onnx|tensorrt|aoti --out PATH [--graph image|image_with_text|text]
                          [--image-size 512 | 512x1024] [--dtype ...] [--max-batch N] [--verify] [--classes "a,b"]

    denseclip-fast train [CONFIG.yaml] [--arch A] [--data DIR] [--layout ade20k|generic] [--init CLIP|DENSECLIP|none]
                         [--iters N] [--batch-size N] [--accum N] [--crop N] [--lr X] [--seed N] [--device D]
                         [--work-dir DIR]
    denseclip-fast eval --checkpoint C --data DIR --layout L [--mode whole|slide] [--scales 0.5,1.0] [--flip]

segment runs the engine (denseclip_fast.Segmenter): the official test pipeline on the chosen device. export writes
an ONNX graph, a TensorRT engine (needs the tensorrt package) or an AOTInductor package (denseclip_fast.export).

Errors the user can fix (a bad file, a wrong class list) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import typing
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoints import CheckpointError, ClassCountError
from .checkpoints.io import excerpt, made_folder, out_of_memory, written_atomically
from .export.onnx import ONNXExportUnavailable
from .export.tensorrt import TensorRTUnavailable
from .ops.backends import BackendUnavailable

if TYPE_CHECKING:
    import torch

    from .engine import Segmenter


def _parse_classes(text: str, distinct: bool = False) -> list[str]:
    """--classes as names, checked before the checkpoint is loaded: non-empty, and with ``distinct`` (open
    vocabulary, where a name is all that tells two classes apart) different, as the engine requires."""
    from .model.text import check_class_names, check_distinct_tokens

    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--classes must be a comma-separated list of non-empty names, got {text!r}")
    try:
        check_class_names(names, distinct=distinct)
        if distinct:
            check_distinct_tokens(names)  # "Cat" and "cat" too, as the engine refuses them
    except ValueError as exc:
        raise ValueError(f"--classes: {exc}") from None
    return names


def _classes_for(model: Any, names: list[str], count_hint: str | None) -> list[str]:
    """--classes' ``names`` checked against the checkpoint before any work: every name within the text encoder's
    BPE tokens, and, unless ``count_hint`` is None (any number of names), exactly the checkpoint's K names,
    ``count_hint`` saying what to do otherwise on the command line."""
    from .model.text import tokenize_class_names

    try:
        tokenize_class_names(names, model.config.text.class_token_length)
    except ValueError as exc:
        raise ValueError(f"--classes: {exc}") from None
    if count_hint is not None and len(names) != model.num_classes:
        raise ValueError(f"--classes needs exactly {model.num_classes} names (the checkpoint's head has "
                         f"{model.num_classes} outputs), got {len(names)}; {count_hint}")  # fmt: skip
    return names


UNNAMED = "class"  # what a file that names no classes calls them where their names play no part


def _load_model(path: str, unnamed: str, renamed: bool = False, hint: str = "--classes names them") -> tuple[Any, bool]:
    """load_checkpoint(path) for a command, and whether the file names its classes. A file that names none (a bare
    state dict whose head has other than ADE20K's 150 outputs), or names that disagree with its head, is loaded with
    its K classes called UNNAMED when ``unnamed`` is "" (info; --classes names them next; open-vocabulary scoring,
    where the head's names play no part); else the error says to give their names with --classes, ``unnamed`` saying
    why they are needed. A file with 150 unnamed outputs gets ADE20K's names with a warning (an
    AssumedADE20KClasses, which the caller's filters may silence) saying ``hint``, or none when ``renamed``
    (--classes gave the names, or they play no part)."""
    from . import load_checkpoint
    from .checkpoints import AssumedADE20KClasses, MismatchedClassNamesError, UnnamedClassesError

    try:
        with warnings.catch_warnings(record=True) as caught:  # recorded as the caller's filters say
            model = load_checkpoint(path)
        for w in caught:
            if not issubclass(w.category, AssumedADE20KClasses):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif not renamed:
                warnings.warn(f"{path}: no class names in the file (meta['CLASSES']); assuming the 150 ADE20K "
                              f"classes ({hint})", AssumedADE20KClasses, stacklevel=1)  # fmt: skip
        return model, True
    except UnnamedClassesError as exc:  # or names that disagree with the head (MismatchedClassNamesError)
        if unnamed:
            what = ("the file names no classes" if not isinstance(exc, MismatchedClassNamesError) else
                    f"the file's {exc.names} class names disagree with its head")  # fmt: skip
            raise ValueError(f"{path}: {what}; its head has {exc.outputs} outputs: give their {exc.outputs} names "
                             f"with --classes ({unnamed})") from None  # fmt: skip
        return load_checkpoint(path, class_names=[UNNAMED] * exc.outputs), False


def _info_checkpoint(positional: str | None, option: str | None) -> str:
    """info's checkpoint, given as CHECKPOINT or as --checkpoint (the other commands' spelling), once."""
    if positional is not None and option is not None:
        raise ValueError(f"info takes one checkpoint, as CHECKPOINT or --checkpoint, got both ({positional!r} and "
                         f"--checkpoint {option!r})")  # fmt: skip
    if positional is None and option is None:
        raise ValueError("info needs the checkpoint to describe: denseclip-fast info CHECKPOINT (or --checkpoint "
                         "CHECKPOINT)")  # fmt: skip
    return typing.cast(str, positional if option is None else option)


def cmd_info(args: argparse.Namespace) -> int:
    model, named = _load_model(args.checkpoint, "", hint="segment and export name them with --classes")
    counts = model.parameter_counts()
    info = {
        "checkpoint": args.checkpoint,
        "arch": model.config.arch,
        "num_classes": model.num_classes,
        "classes": model.class_names if named else None,
        "parameters": counts["total"],
        "parameters_without_text_encoder": counts["without_text_encoder"],
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    # a name with a control character (a newline) quoted, so that it cannot break the listing's line
    shown = ", ".join(n if n.isprintable() else repr(n) for n in model.class_names[:10])
    shown += " ..." if model.num_classes > 10 else ""
    shown = shown if named else "(the file names none that fit its head)"
    print(f"checkpoint   {args.checkpoint}")
    print(f"arch         {model.config.arch}")
    print(f"classes      {model.num_classes}: {shown}")
    print(f"parameters   {counts['total']:,} ({counts['without_text_encoder']:,} without the text encoder)")
    print(f"slide        crop {model.config.slide_crop}, stride {model.config.slide_stride}")
    return 0


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}  # fmt: skip


def _device(args: argparse.Namespace) -> str:
    """--device, checked (a CPU or a CUDA GPU that is present: validation.check_device); default CUDA when
    available."""
    import torch

    from .validation import check_device

    if args.device is not None:
        return str(check_device(args.device, "--device"))
    return "cuda" if torch.cuda.is_available() else "cpu"


def _retain_on_cpu(args: argparse.Namespace, device: str) -> None:
    """segment, in the console script's own process, on a CPU: the memory each image's forward frees is kept for the
    next (engine.host_memory; its allocations are bounded by the test scale and the labels' chunks, so the process
    stays near its peak). Not where main is called as a function: the setting would outlive the call in the
    caller's process."""
    import torch

    if args.own_process and torch.device(device).type == "cpu":
        from .engine.host_memory import retain_freed_memory

        retain_freed_memory()


def _dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the options' spelling."""
    return str(dtype).removeprefix("torch.")


def _dtype(args: argparse.Namespace, device: str | None) -> torch.dtype:
    """--dtype as a torch dtype, checked against ``device`` (the engine's) before any work: float16 needs CUDA.
    Default bfloat16 on CUDA, float32 otherwise. ``device`` None: the dtype of export's ONNX graph, float32 (the
    default) or float16."""
    import torch

    name = DTYPE_NAMES[args.dtype] if args.dtype else None
    if device is None:
        if name == "bfloat16":
            raise ValueError(f"--dtype {args.dtype} is not an ONNX graph dtype: --format {args.format} takes --dtype "
                             "float32 or float16 (for bfloat16 TensorRT layers: --format tensorrt --bf16, which "
                             "builds from the float32 graph)")  # fmt: skip
        return getattr(torch, name or "float32")
    if name == "float16" and not device.startswith("cuda"):
        given = f"got --device {args.device}" if args.device is not None else "and this machine has no CUDA GPU"
        raise ValueError(f"--dtype {args.dtype} needs --device cuda, {given}; on the CPU use --dtype float32 or "
                         "bfloat16")  # fmt: skip
    return getattr(torch, name or ("bfloat16" if device.startswith("cuda") else "float32"))


MAX_IO_THREADS = 32  # segment's images read ahead, each held decoded until the engine takes it


def _output_stems(files: Sequence[str]) -> list[str]:
    """NAME of each file's NAME_labels.png and NAME_overlay.png; two files with one NAME are refused before any
    work (one would overwrite the other's results), also where the NAMEs differ in case only (A.JPG and a.png: one
    file on macOS's and Windows' file systems)."""
    seen: dict[str, str] = {}
    stems = []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        key = stem.casefold()
        if key in seen and os.path.realpath(seen[key]) == os.path.realpath(path):
            raise ValueError(f"{path} is given twice")
        if key in seen:
            other = os.path.splitext(os.path.basename(seen[key]))[0]
            names = f"{stem}_labels.png" if other == stem else f"{other}_labels.png and {stem}_labels.png (one file "\
                "where case is ignored)"  # fmt: skip
            raise ValueError(f"{seen[key]} and {path} would both write {names}; rename one or segment them in "
                             "separate runs")  # fmt: skip
        seen[key] = path
        stems.append(stem)
    return stems


def _check_apart(out: str, given: Sequence[str], files: Sequence[str], stems: Sequence[str]) -> None:
    """Refuse an --out that is an input folder (the next run over it would take NAME_labels.png and
    NAME_overlay.png for images, and their results for more) or results that would overwrite an input image."""
    where = os.path.realpath(out)
    for path in given:
        if os.path.isdir(path) and os.path.realpath(path) == where:
            raise ValueError(f"--out {out} is the input folder {path}: a later run over it would segment the "
                             "results (NAME_labels.png, NAME_overlay.png) as images; write them to another "
                             "folder")  # fmt: skip
    inputs = {os.path.realpath(f): f for f in files}
    for stem in stems:
        for kind in ("labels", "overlay"):
            result = os.path.join(out, f"{stem}_{kind}.png")
            taken = inputs.get(os.path.realpath(result))
            if taken is not None:
                raise ValueError(f"the result {result} would overwrite the input image {taken}; choose another --out")


def _write_results(out: str, stem: str, image: Any, labels: Any, palette: Any, wide: bool) -> None:
    """NAME_labels.png (class indices: 8-bit grey, 16-bit when ``wide``: past 256 classes) and NAME_overlay.png."""
    import numpy as np
    from PIL import Image

    from .visualize import overlay

    label_image = Image.fromarray(labels.astype(np.uint16 if wide else np.uint8))
    _write_whole(os.path.join(out, f"{stem}_labels.png"), lambda path: label_image.save(path, format="PNG"),
                 "the label map")
    picture = Image.fromarray(overlay(image, labels, palette))
    _write_whole(os.path.join(out, f"{stem}_overlay.png"), lambda path: picture.save(path, format="PNG"),
                 "the overlay")


def _write_whole(path: str, write: Callable[[str], object], what: str) -> None:
    """``write(temporary path)`` beside ``path``, then renamed over it (checkpoints.io.written_atomically, not synced
    to disk: results a rerun remakes): a command killed (or a disk full) while it writes never leaves a truncated
    file under the final name, and a file being replaced is whole until then. An OSError names ``path``."""
    with written_atomically(path, what, durable=False) as partial:
        write(partial)


def cmd_segment(args: argparse.Namespace) -> int:
    from . import Segmenter
    from .preprocess import image_files
    from .validation import check_writable_dir
    from .visualize import default_palette

    if args.io_threads is not None and not 1 <= args.io_threads <= MAX_IO_THREADS:
        raise ValueError(f"--io-threads must be >= 1 and <= {MAX_IO_THREADS}, got {args.io_threads} (each thread's "
                         "image is read ahead and held decoded: a thousand photos would be gigabytes)")  # fmt: skip
    files = image_files(args.images)
    stems = _output_stems(files)
    _check_apart(args.out, args.images, files, stems)
    check_writable_dir(args.out, "--out")
    device = _device(args)
    # on a CPU the engine itself keeps every core busy: one worker overlaps the I/O without contending for them
    workers = args.io_threads or (min(4, os.cpu_count() or 1) if device.startswith("cuda") else 1)
    dtype = _dtype(args, device)
    if args.open_vocab and args.classes is None:
        raise ValueError("--open-vocab needs --classes")
    if args.open_vocab and args.mode not in (None, "whole"):  # refused rather than ignored, as export's options
        raise ValueError(f"--mode applies to the trained head's labels; --open-vocab scores the whole image with the "
                         f"pixel-text map, got --mode {args.mode}")  # fmt: skip
    given = _parse_classes(args.classes, distinct=args.open_vocab) if args.classes is not None else None
    if given is not None and len(given) > 65536:  # the label PNGs would wrap the indices past 16 bits
        raise ValueError(f"--classes: {len(given)} names; NAME_labels.png holds class indices in 16 bits, so at most "
                         "65536 names")  # fmt: skip
    why = "" if given is not None else "the labels and overlays are the trained head's"
    model = _load_model(args.checkpoint, why, renamed=given is not None)[0]
    names = None
    if given is not None:
        if args.open_vocab:
            names = _classes_for(model, given, None)
        else:
            model.set_classes(_classes_for(model, given, "add --open-vocab to score any number of names with the "
                                                         "pixel-text map instead of the trained head"))  # fmt: skip
    _retain_on_cpu(args, device)
    seg = Segmenter(model, device=device, dtype=dtype, mode=args.mode or "slide")
    k = len(names) if names is not None else model.num_classes
    palette = model.palette if (model.palette is not None and names is None) else default_palette(k)
    del model  # the Segmenter has its own copy: the loaded weights are not held while every image is segmented
    # a run that wrote nothing leaves no empty --out behind: an interrupted one, nor one whose every image was skipped
    try:
        with made_folder(args.out):
            skipped = _segment_files(args, seg, files, stems, names, palette, k, workers)
            if len(skipped) == len(files):
                raise _NothingWritten  # made_folder removes the folders it made
    except _NothingWritten:
        print(f"wrote nothing: skipped all {len(files)} images, which could not be segmented (--keep-going; named "
              "above)")  # fmt: skip
        return 1
    if skipped:
        print(f"wrote {2 * (len(files) - len(skipped))} files to {args.out}; skipped {len(skipped)} of {len(files)} "
              f"images that could not be segmented (--keep-going; named above)")  # fmt: skip
        return 1
    print(f"wrote {2 * len(files)} files to {args.out}")
    return 0


class _NothingWritten(Exception):
    """segment --keep-going skipped every image: the --out folders the run made are removed."""


def _segment_files(args: argparse.Namespace, seg: Segmenter, files: list[str], stems: list[str],
                   names: list[str] | None, palette: Any, k: int, workers: int) -> list[str]:  # fmt: skip
    """The labels and overlay of every file, written to ``args.out`` as they come. An image that cannot be read or
    segmented at the test scale (a ValueError naming it) ends the run, or with ``args.keep_going`` is said on stderr
    and skipped; returns the skipped files."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from PIL import Image
    from tqdm import tqdm

    from .model.denseclip import check_test_image_size
    from .preprocess import load_image

    # Decoding the next images and encoding the PNGs of the previous ones (Pillow and NumPy release the GIL) run in
    # worker threads while the engine segments the current one; at most `workers` of each are in flight.
    with warnings.catch_warnings():
        # Pillow's warning for an image past PIL.Image.MAX_IMAGE_PIXELS does not name the file (nor could a filter
        # of the worker threads' warnings tell which): _warn_if_huge says it, naming it
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        pool = ThreadPoolExecutor(max_workers=workers)
        loads = deque(pool.submit(load_image, path) for path in files[:workers])
        writes: deque[Future[None]] = deque()
        skipped: list[str] = []
        try:
            for i, stem in enumerate(progress := tqdm(stems, desc="segment", unit="img", disable=len(files) < 2)):
                load = loads.popleft()
                if i + workers < len(files):
                    loads.append(pool.submit(load_image, files[i + workers]))
                try:
                    image = load.result()
                    _warn_if_huge(files[i], image.shape[:2])
                    check_test_image_size(image.shape[:2], seg.model.config.test_scale, files[i])  # named by its file
                except ValueError as exc:
                    if not args.keep_going:
                        raise
                    skipped.append(files[i])
                    progress.write(f"denseclip-fast: warning: skipped {exc}", file=sys.stderr)
                    continue
                labels = seg.predict(image, names)[0].cpu().numpy()  # names None: the trained head's classes
                writes.append(pool.submit(_write_results, args.out, stem, image, labels, palette, k > 256))
                if len(writes) > workers:
                    writes.popleft().result()
            while writes:
                writes.popleft().result()
            return skipped
        finally:  # after an error too, every image segmented so far is saved; the images read ahead are dropped
            for load in loads:
                load.cancel()
            pool.shutdown(wait=True)


def _warn_if_huge(path: str, size: tuple[int, int]) -> None:
    """Pillow's decompression-bomb warning (an image past PIL.Image.MAX_IMAGE_PIXELS, up to twice which Pillow reads
    it), naming the file."""
    from PIL import Image

    pixels, limit = size[0] * size[1], Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > limit:
        warnings.warn(f"{path}: {pixels} pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit}): segmented as a "
                      "trusted image (Pillow refuses past twice the limit)", stacklevel=2)  # fmt: skip


def _parse_size(text: str) -> tuple[int, int]:
    from .config import MAX_EXPORT_SIDE, MIN_IMAGE_SIDE

    parts = text.lower().split("x")
    # isdecimal, not isdigit: int() refuses digits such as "²"
    if len(parts) not in (1, 2) or not all(p.strip().isdecimal() for p in parts):
        raise ValueError(f"--image-size must be N or HxW (e.g. 512 or 512x1024), got {text!r}")
    sizes = [int(p) for p in parts]
    if min(sizes) < MIN_IMAGE_SIDE or max(sizes) > MAX_EXPORT_SIDE:
        raise ValueError(f"--image-size must be {MIN_IMAGE_SIDE} to {MAX_EXPORT_SIDE} on each side, got {text!r}")
    return (sizes[0], sizes[-1])


def _parse_batch(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdecimal() for p in parts):
        raise ValueError(f"--trt-batch must be MIN,OPT,MAX (e.g. 1,1,16), got {text!r}")
    low, opt, high = (int(p) for p in parts)
    if not 1 <= low <= opt <= high:  # before the export, not after it (the ONNX graph written, the build refused)
        raise ValueError(f"--trt-batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return low, opt, high


# --verify's bound on the relative error of the graph in ONNX Runtime against the float32 model (as the export tests)
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def _verify_onnx(path: str, model: object, graph: str) -> float:
    """Relative error of the ONNX graph in ONNX Runtime against the float32 PyTorch model on a random input."""
    import json as _json

    import onnxruntime as ort
    import torch

    from .export import graph_file, read_metadata
    from .export.graphs import random_input
    from .model.text import tokenize_class_names

    meta = read_metadata(path)
    dtype = getattr(torch, meta["dtype"])
    session = ort.InferenceSession(graph_file(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        if graph == "text":
            names = model.class_names  # type: ignore[attr-defined]
            tokens = tokenize_class_names(names, int(meta["class_token_length"]))
            expected = model.text_features(names)  # type: ignore[attr-defined]
            out = session.run(None, {"class_tokens": tokens.numpy()})[0]
        else:
            x = random_input((2, 3, *_json.loads(meta["image_size"])), torch.float32, "cpu")
            expected = model(x)  # type: ignore[operator]
            feed = {"image": x.to(dtype).numpy()}
            if graph == "image_with_text":
                feed["class_embeddings"] = model.class_embeddings().to(dtype).numpy()  # type: ignore[attr-defined]
            out = session.run(None, feed)[0]
    out_t = torch.from_numpy(out).double()
    return ((out_t - expected.double()).norm() / expected.double().norm()).item()


def _check_export_options(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """export's options that do not apply to --format or --graph are refused, not ignored, and its numbers are
    checked against the exporters' limits, in the options' words, before the checkpoint is loaded."""
    import torch

    from .export.aoti import MAX_BATCH, PACKAGE_SUFFIX
    from .export.graphs import TRACE_BATCH
    from .export.onnx import OPSETS

    fmt = args.format
    if fmt == "aoti" and args.graph != "image":
        raise ValueError("--format aoti compiles the image graph only (--graph image)")
    for flag in ("fp16", "bf16"):  # unused by the other formats: refused, not ignored
        if getattr(args, flag) and fmt != "tensorrt":
            raise ValueError(f"--{flag} applies to --format tensorrt (the engine's layer precisions); --format "
                             f"{fmt} takes --dtype")  # fmt: skip
    if fmt == "aoti":
        for given, option, what in ((args.verify, "--verify", "runs the ONNX graph in ONNX Runtime against PyTorch"),
                                    (args.opset is not None, "--opset", "the ONNX graph's opset")):  # fmt: skip
            if given:
                raise ValueError(f"{option} applies to --format onnx and tensorrt ({what}); --format aoti writes no "
                                 "ONNX graph")  # fmt: skip
    else:
        if args.max_batch is not None:
            takes = "--trt-batch MIN,OPT,MAX" if fmt == "tensorrt" else "any batch (the ONNX graph's is dynamic)"
            raise ValueError(f"--max-batch applies to --format aoti (the package's largest batch); --format {fmt} "
                             f"takes {takes}")  # fmt: skip
        if args.device is not None:
            raise ValueError(f"--device applies to --format aoti (the package's device); --format {fmt} exports the "
                             "ONNX graph on the CPU")  # fmt: skip
    if args.trt_batch is not None and fmt != "tensorrt":
        takes = "--max-batch" if fmt == "aoti" else "any batch (the ONNX graph's is dynamic)"
        raise ValueError(f"--trt-batch applies to --format tensorrt (the engine's batch profile); --format {fmt} "
                         f"takes {takes}")  # fmt: skip
    if args.image_size is not None and args.graph == "text":
        raise ValueError("--image-size applies to the image graphs (--graph image or image_with_text); --graph text "
                         "maps class tokens to class embeddings")  # fmt: skip
    if args.bf16 and dtype == torch.float16:  # --format tensorrt (checked above)
        raise ValueError(f"--bf16 applies to a float32 graph (--dtype float32, the default): a --dtype {args.dtype} "
                         "graph is built strongly typed, in the precisions it was exported with")  # fmt: skip
    if fmt == "aoti" and Path(args.out).suffix != PACKAGE_SUFFIX:  # to_aoti's own test (".pt2" alone has none)
        raise ValueError(f"--out must end in {PACKAGE_SUFFIX} for --format aoti (AOTInductor packages are "
                         f"{PACKAGE_SUFFIX} archives), got {args.out!r}")  # fmt: skip
    if args.max_batch is not None and not TRACE_BATCH <= args.max_batch <= MAX_BATCH:
        raise ValueError(f"--max-batch must be >= {TRACE_BATCH} and <= {MAX_BATCH}, got {args.max_batch} (a package "
                         f"takes any batch from 1 to --max-batch; torch.export traces the batch as dynamic from "
                         f"{TRACE_BATCH}: for batch 1, --max-batch {TRACE_BATCH})")  # fmt: skip
    if args.opset is not None and args.opset not in OPSETS:
        raise ValueError(f"--opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {args.opset}")


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import export
    from .export.aoti import DEFAULT_MAX_BATCH
    from .export.onnx import DEFAULT_OPSET
    from .validation import check_not_an_input, check_writable_file

    size = _parse_size(args.image_size) if args.image_size is not None else None  # "": refused, not the default
    check_writable_file(args.out, "--out", create_parents=True)
    check_not_an_input(args.out, "--out", {"--checkpoint": args.checkpoint})
    # the package's device; for the ONNX formats a --device given is refused by _check_export_options (not checked
    # first, which would advise another --device)
    device = _device(args) if args.format == "aoti" else None
    dtype = _dtype(args, device)
    _check_export_options(args, dtype)
    max_batch = DEFAULT_MAX_BATCH if args.max_batch is None else args.max_batch
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    names = _parse_classes(args.classes) if args.classes is not None else None
    batch = None if args.trt_batch is None else _parse_batch(args.trt_batch)  # None: the graph's default
    if args.format != "aoti":  # before any work, and before TensorRT's check, whose advice (--format onnx) needs it
        export.onnx.check_onnx_export(runtime=args.verify)
    if args.format == "tensorrt":
        export.tensorrt._tensorrt()  # say so before any work when TensorRT is missing
        if args.out.endswith(".onnx"):
            raise ValueError("--out is the engine file for --format tensorrt (e.g. model.engine); the ONNX graph is "
                             "written next to it with the .onnx suffix")  # fmt: skip
        graph = os.path.splitext(args.out)[0] + ".onnx"
        check_writable_file(graph, "--out's ONNX graph", create_parents=True)
        check_not_an_input(graph, "--out's ONNX graph", {"--checkpoint": args.checkpoint})
    model = _load_model(args.checkpoint, "" if names is not None else "the exported graphs carry them",
                        renamed=names is not None)[0]  # fmt: skip
    if names is not None:
        model.set_classes(_classes_for(model, names, "the exported graphs keep the trained head (segment "
                                                     "--open-vocab scores any number of names)"))  # fmt: skip
    out = args.out
    if args.format == "aoti":
        path = export.to_aoti(model, out, image_size=size, max_batch=max_batch, device=device, dtype=dtype)
        print(f"wrote {path} (AOTInductor, {device}, {_dtype_name(dtype)}, batch 1..{max_batch})")
        return 0
    onnx_path = out if args.format == "onnx" else os.path.splitext(out)[0] + ".onnx"
    path = export.to_onnx(model, onnx_path, graph=args.graph, image_size=size, dtype=dtype, opset=opset,
                          check_tensorrt=False)  # fmt: skip
    problems = export.tensorrt_problems(path)
    check = "all nodes supported" if not problems else f"{len(problems)} problem(s): " + "; ".join(problems[:5])
    print(f"wrote {path} ({args.graph} graph, {_dtype_name(dtype)}, opset {opset}); TensorRT operator check: {check}")
    if args.verify:
        err = _verify_onnx(str(path), model, args.graph)
        print(f"ONNX Runtime vs PyTorch (float32): relative error {err:.2e}")
        tolerance = VERIFY_TOLERANCE[_dtype_name(dtype)]
        if not err <= tolerance:  # NaN too
            raise ValueError(f"--verify: the graph's output is off by a relative error of {err:.2e}, more than the "
                             f"{tolerance:.0e} a {_dtype_name(dtype)} graph stays within: {path} does "
                             "not compute what the checkpoint does (a bug: please report it)")  # fmt: skip
    if args.format == "tensorrt":
        engine = export.build_tensorrt_engine(path, out, fp16=args.fp16 or dtype == torch.float16, bf16=args.bf16,
                                              batch=batch)  # fmt: skip
        print(f"wrote {engine} (TensorRT engine)")
    return 0


TRAIN_OPTIONS = {  # command-line option -> (TrainConfig field, type)
    "arch": str, "data": str, "layout": str, "init": str, "iters": int, "batch_size": int, "accum": int, "crop": int,
    "lr": float, "seed": int, "device": str, "work_dir": str, "num_workers": int, "checkpoint_interval": int,
    "eval_interval": int, "log_interval": int, "amp": str, "ignore_index": int, "clip_activation": str,
    "grad_checkpointing": bool, "sync_bn": bool, "warmup_iters": int,
}  # fmt: skip
IGNORE_HELP = "label value of ignored pixels (default 255; with 256+ classes in 16-bit labels, e.g. 65535)"


def _resumed_runs_config(args: argparse.Namespace) -> str | None:
    """For a --resume without a CONFIG: the config.json of the run it continues (--work-dir's, else the folder of
    the --resume state's, else the default work dir's for --resume auto), which the options given override; None
    when there is none and --data is given (the options say the rest). Without --data either, a ValueError says
    where no run was found (a mistyped --work-dir was told that data must name a directory)."""
    from .train import TrainConfig

    folders = [args.work_dir] if args.work_dir else []
    if args.resume != "auto":
        folders.append(os.path.dirname(os.path.abspath(args.resume)))
    elif not args.work_dir:
        folders.append(TrainConfig().work_dir)
    for folder in folders:
        path = os.path.join(folder, "config.json")
        if os.path.isfile(path):
            return path
    if args.data is None:
        where = " or ".join(repr(f) for f in folders)
        raise ValueError(f"--resume {args.resume}: no run's config.json in {where} (a run writes it into its work "
                         "dir when it starts): give the run's --work-dir, or its CONFIG file, or --data and the "
                         "other settings")  # fmt: skip
    return None


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ARCH_ALIASES
    from .train import TrainConfig, train, train_preset
    from .train.launch import launch_environment
    from .validation import check_device

    if args.device is not None:  # "" would be the config's "default device"; on the command line it is a mistake
        # a config printed for another machine may name its GPU (the spelling is still checked)
        check_device(args.device, "--device", present=not args.print_config)
    if args.config == "":  # an unset shell variable: not "no CONFIG", which would train the default recipe instead
        raise ValueError("CONFIG must name a training config file (YAML or JSON), got ''")
    if args.resume == "":  # as train()'s resume="" a fresh run; here an unset shell variable
        raise ValueError("--resume takes 'auto' or a training state file (iter_N.state.pt), got ''")
    for given, option, what in ((args.data, "--data", "the data set directory"), (args.work_dir, "--work-dir",
                                                                                 "a directory")):  # fmt: skip
        if given == "":  # the config's words (data, work_dir) named no option given on the command line
            raise ValueError(f"{option} must name {what}, got ''")
    source = args.config or (_resumed_runs_config(args) if args.resume is not None else None)
    if source:
        cfg = TrainConfig.load(source)
    else:
        cfg = train_preset(args.arch) if args.arch in ARCH_ALIASES else TrainConfig()
    for name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.print_config:
        # what train runs first (it fills the sizes the run would use): a config it would refuse is not printed,
        # but one without --data is (a template to fill in); torchrun's variables are checked as train checks them
        launch_environment()
        cfg.validate(template=True)
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.init == "none" and args.resume is None and launch_environment()[0] == 0:  # once, on rank 0
        # a config train would refuse is said in its one line alone, not after this warning (checked on a copy:
        # train validates its own, which fills the sizes left to the architecture)
        dataclasses.replace(cfg).validate()
        warnings.warn("training from random weights (init: none): DenseCLIP fine-tunes CLIP, so a real run starts "
                      "from CLIP weights (--init PATH)", stacklevel=1)  # fmt: skip
    result = train(cfg, resume=args.resume)
    evaluation = result.get("eval")
    if evaluation:
        from .train.evaluate import summary

        print(f"{summary(evaluation)}  (work dir {cfg.work_dir})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from . import load_checkpoint
    from .train import SegmentationData, evaluate
    from .train.data import class_list_source
    from .train.evaluate import check_scales, results_json, summary
    from .validation import check_ignore_index, check_not_an_input, check_not_in_folder, check_writable_file

    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, e.g. 0.5,0.75,1.0, got {args.scales!r}") from None
    check_ignore_index(args.ignore_index, "--ignore-index")
    device = _device(args)
    if args.data == "":  # the data set's reader named no option
        raise ValueError("--data must name the data set directory, got ''")
    if args.out == "":  # an unset shell variable, refused before the checkpoint is read (the other checks follow it)
        raise ValueError("--out must name a file, got ''")
    data = SegmentationData(args.data, args.layout, "val", ignore_index=args.ignore_index)
    # the data set's names replace the checkpoint's saved wording, as the official test takes its config's names
    names = data.class_names
    source = class_list_source(args.data, args.layout, len(names))
    try:
        model = load_checkpoint(args.checkpoint, class_names=names)
    except ClassCountError as exc:
        raise ValueError(f"{source} has {exc.given} names but the checkpoint {args.checkpoint} has {exc.outputs} "
                         "classes (its head's outputs); eval needs a data set of the checkpoint's classes, in its "
                         "order") from None  # fmt: skip
    except CheckpointError:
        raise
    except ValueError as exc:  # a name the checkpoint's text encoder cannot take
        raise ValueError(f"{source}: {exc}") from None
    check_scales(scales, model.config.test_scale, "--scales")
    # checked once the checkpoint was found (an empty --out was refused above)
    given = args.out is not None
    out = args.out if given else os.path.splitext(args.checkpoint)[0] + "_eval.json"
    check_writable_file(out, "--out" if given else "--out (default: CHECKPOINT_eval.json)", create_parents=False)
    check_not_an_input(out, "--out", {"--checkpoint": args.checkpoint})
    check_not_in_folder(out, "--out", args.data, "the data set --data")
    model.to(device)
    dtype = torch.bfloat16 if args.bf16 else None  # float32 by default, as the official test
    evaluation = evaluate(model, data, mode=args.mode, scales=scales, flip=args.flip, dtype=dtype, progress=True)
    result: dict[str, Any] = {**evaluation, "checkpoint": args.checkpoint}

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(results_json(result))

    _write_whole(out, write, "the evaluation results")
    if math.isnan(result["aAcc"]):
        print(f"denseclip-fast eval: the {len(data)} image(s) have no labelled pixel (every label is the ignore index "
              f"{args.ignore_index}): no metric is defined, they are written as null", file=sys.stderr)  # fmt: skip
    print(f"{summary(result)}  ({result['images']} images, {args.mode}; written to {out})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown option, a missing argument, an invalid choice) are one line, as
    the commands' own, with where to read the options instead of the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if commands and message.endswith("required: command"):  # no command given
            message = f"a command is needed: one of {', '.join(commands[0].choices)}"
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's, but an option the command does not know is refused by the command's parser: argparse's
        top-level one pointed at `denseclip-fast --help`, which lists the commands, not their options."""
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            name = str(getattr(parsed, "command", None))
            command = commands[0].choices.get(name) if commands else None
            after = argv[argv.index(name) + 1 :] if name in argv else []
            owner = command if command is not None and all(e in after for e in extras) else self
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    import torch

    from . import __version__
    from .export.aoti import DEFAULT_MAX_BATCH
    from .export.onnx import DEFAULT_OPSET, OPSETS
    from .export.tensorrt import DEFAULT_BATCH

    parser = _Parser(prog="denseclip-fast", description="DenseCLIP semantic segmentation")
    parser.add_argument("--version", action="version",
                        version=f"denseclip-fast {__version__} (torch {torch.__version__})")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="architecture, classes and parameter counts of a checkpoint")
    info.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                      help="the weight file to describe (a DenseCLIP checkpoint: official, or this package's)")
    info.add_argument("--checkpoint", dest="checkpoint_option", metavar="CHECKPOINT",
                      help="the same, named as segment, export and eval take it")  # fmt: skip
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    seg = sub.add_parser("segment", help="segment images; writes NAME_labels.png and NAME_overlay.png")
    seg.add_argument("--checkpoint", required=True)
    seg.add_argument("--classes", help='comma-separated names replacing the checkpoint\'s, e.g. "sky,road,tree"')
    seg.add_argument("--open-vocab", action="store_true",
                     help="score --classes (any number) with the pixel-text map, not the trained head")  # fmt: skip
    seg.add_argument("--mode", choices=("slide", "whole"),
                     help="inference of the trained head's labels: sliding windows (default) or the whole image; "
                          "--open-vocab scores the whole image (whole, or no --mode)")  # fmt: skip
    seg.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    seg.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                     help="default: bfloat16 on CUDA, float32 on CPU (bfloat16 is faster on a CPU with AMX)")
    seg.add_argument("--out", required=True, help="output directory")
    seg.add_argument("--io-threads", type=int,
                     help="threads decoding images and writing PNGs while the engine runs, 1 to 32 (default: 1 on CPU, "
                          "where the engine uses every core; up to 4 with a GPU)")  # fmt: skip
    seg.add_argument("--keep-going", action="store_true",
                     help="skip an image that cannot be read or segmented (named on stderr) instead of stopping; "
                          "the exit status is then 1")  # fmt: skip
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or directories of them (not recursive)")
    seg.set_defaults(func=cmd_segment)

    exp = sub.add_parser("export", help="write an ONNX graph, a TensorRT engine or an AOTInductor package")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--format", choices=("onnx", "tensorrt", "aoti"), required=True)
    exp.add_argument("--out", required=True, help="the file to write (.onnx, .engine, .pt2)")
    exp.add_argument("--graph", choices=("image", "image_with_text", "text"), default="image",
                     help="image: vocabulary baked in; image_with_text: class embeddings as an input; text: "
                          "class tokens -> class embeddings")  # fmt: skip
    exp.add_argument("--image-size", help="image graphs: N or HxW (default: the sliding-window crop, 512 or 640)")
    exp.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                     help="onnx/tensorrt: float32 (default) or float16; aoti: default bfloat16 on CUDA, float32 on CPU")
    exp.add_argument("--classes", help="comma-separated names replacing the checkpoint's (same count)")
    exp.add_argument("--max-batch", type=int,
                     help=f"aoti: largest batch the package accepts (default {DEFAULT_MAX_BATCH})")  # fmt: skip
    exp.add_argument("--opset", type=int, help=f"onnx/tensorrt: ONNX opset, {OPSETS.start}..{OPSETS.stop - 1} "
                                               f"(default {DEFAULT_OPSET})")  # fmt: skip
    exp.add_argument("--verify", action="store_true",
                     help="onnx/tensorrt: run the ONNX graph in ONNX Runtime against PyTorch")  # fmt: skip
    exp.add_argument("--device", help="aoti: cpu or cuda (default: cuda when available)")
    exp.add_argument("--trt-batch", help="tensorrt: MIN,OPT,MAX batch of the profile (default "
                                         f"{','.join(map(str, DEFAULT_BATCH))}; for --graph text, the class count: "
                                         "1,K,max(K,16) for the K classes exported)")  # fmt: skip
    exp.add_argument("--fp16", action="store_true", help="tensorrt: allow float16 layers")
    exp.add_argument("--bf16", action="store_true", help="tensorrt: allow bfloat16 layers (of a float32 graph)")
    exp.set_defaults(func=cmd_export)

    tr = sub.add_parser(
        "train", help="fine-tune DenseCLIP (options override the config file or the arch's preset)",
        description="Fine-tune DenseCLIP. The options override CONFIG (or, with --resume, the run's config.json), else "
                    "the --arch preset (the official recipe); the defaults said below are the presets'.",
    )  # fmt: skip
    tr.add_argument("config", nargs="?",
                    help="YAML or JSON file of TrainConfig fields ('preset: RN50' starts from one)")  # fmt: skip
    tr.add_argument("--arch", help="RN50, RN101, ViT-B/16 (the official recipe), or an architecture JSON file")
    tr.add_argument("--data", help="the data set directory")
    tr.add_argument("--layout", choices=("ade20k", "generic"))
    tr.add_argument("--init", help="CLIP weights (OpenAI .pt, state dict, open_clip) to start from, a DenseCLIP "
                                   "checkpoint of the same architecture (its weights; its classifier too where its "
                                   "classes are the data set's), or 'none' (the default without a config: random "
                                   "weights, for tests; DenseCLIP fine-tunes CLIP)")  # fmt: skip
    tr.add_argument("--clip-activation", dest="clip_activation", choices=("quick_gelu", "gelu"),
                    help="the activation the --init weights were trained with: quick_gelu (OpenAI CLIP, the "
                         "presets' default) or gelu (most other open_clip weights, e.g. LAION's)")  # fmt: skip
    tr.add_argument("--iters", type=int, help="iterations (steps) of the run (default 80000)")
    tr.add_argument("--batch-size", dest="batch_size", type=int, help="global batch per step (default 32)")
    tr.add_argument("--accum", type=int, help="micro-batches per step (gradient accumulation; default 1)")
    tr.add_argument("--crop", type=int, help="training crop side (default: the architecture's, 512; 640 for ViT-B/16)")
    tr.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4; the backbone x0.1)")
    tr.add_argument("--warmup-iters", dest="warmup_iters", type=int,
                    help="linear warm-up iterations (default 1500, the recipe's; 0 for none)")  # fmt: skip
    tr.add_argument("--seed", type=int, help="default 0")
    tr.add_argument("--device")
    tr.add_argument("--work-dir", dest="work_dir", help="default work_dirs/denseclip")
    tr.add_argument("--num-workers", dest="num_workers", type=int,
                    help="DataLoader workers per process (default: 4, or the process's share of the CPUs it may use, "
                         "among torchrun's processes on the machine, where fewer)")  # fmt: skip
    tr.add_argument("--checkpoint-interval", dest="checkpoint_interval", type=int, help="default 8000")
    tr.add_argument("--eval-interval", dest="eval_interval", type=int,
                    help="default 0: validation at the end only")  # fmt: skip
    tr.add_argument("--log-interval", dest="log_interval", type=int, help="metrics.csv rows every N steps (default 50)")
    tr.add_argument("--amp", choices=("bf16", "fp16", "none"), help="autocast dtype (default bf16; none: float32)")
    tr.add_argument("--ignore-index", dest="ignore_index", type=int, help=IGNORE_HELP)
    tr.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                    help="recompute activations in the backward (less memory); --no-... turns a config's off")
    tr.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                    help="SyncBatchNorm across processes (torchrun); --no-sync-bn turns a config's off")
    tr.add_argument("--resume",
                    help="'auto' (the work dir's latest checkpoint) or an iter_N.state.pt file; without CONFIG the "
                         "run's settings are read from its config.json (the work dir's), options override "
                         "them")  # fmt: skip
    tr.add_argument("--print-config", action="store_true",
                    help="check the resolved configuration as train would (--data may be left out), print it "
                         "as JSON and exit")  # fmt: skip
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval", help="mIoU and aAcc of a checkpoint on a data set's validation split",
        description="mIoU and aAcc of a checkpoint on a data set's validation split. The model is loaded with the "
                    "data set's class names (its classes.txt, or the 150 ADE20K names for --layout ade20k) in place "
                    "of the checkpoint's saved ones, as the official test uses its config's names: the checkpoint's "
                    "head must have that many outputs, in the data set's class order.",
    )  # fmt: skip
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="the data set directory; its class list names the classes")
    ev.add_argument("--layout", choices=("ade20k", "generic"), required=True)
    ev.add_argument("--mode", choices=("whole", "slide"), default="slide", help="default: slide")
    ev.add_argument("--scales", default="1.0",
                    help="comma-separated ratios of the test scale (multi-scale; default 1.0)")  # fmt: skip
    ev.add_argument("--flip", action="store_true", help="also evaluate the flipped image")
    ev.add_argument("--ignore-index", dest="ignore_index", type=int, default=255, help=IGNORE_HELP)
    ev.add_argument("--device")
    ev.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default: float32, as the official test)")
    ev.add_argument("--out", help="JSON file (default: CHECKPOINT_eval.json)")
    ev.set_defaults(func=cmd_eval)
    return parser


def _os_error(exc: OSError) -> str:
    """An OSError as one line naming its path(s): 'PATH: No such file or directory'."""
    if exc.filename is None:
        return str(exc)
    paths = [exc.filename] if exc.filename2 is None else [exc.filename, exc.filename2]
    names = " -> ".join(os.fsdecode(p) if isinstance(p, (str, bytes)) else str(p) for p in paths)
    return f"{names}: {exc.strerror or exc}"


STDOUT = "standard output"  # the file name of an OSError from writing to it


class _NamedStdout:
    """sys.stdout, whose failed writes (a full disk, /dev/full) are OSErrors naming it: main's message said only
    '[Errno 28] No space left on device'."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except OSError as exc:
            exc.filename = exc.filename or STDOUT
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            exc.filename = exc.filename or STDOUT
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None, die_by_signal: bool = False, own_process: bool = False) -> int:
    """Run the command ``argv``; errors the user can fix (bad arguments and files, a file system refusing a path,
    a training run whose loss or weights stop being finite) print one line and return 2. Ctrl-C and SIGTERM print
    one line and return 130 / 143, or with ``die_by_signal`` (the console script) end the process by that signal,
    as an uncaught Ctrl-C does: a shell loop over the command stops on Ctrl-C only when the command died of SIGINT,
    and a supervisor tells a stop (killed by SIGTERM) from a failure (exit 143). ``own_process`` (the console
    script): the process is the command's, whose process-wide settings it may choose (_retain_on_cpu)."""
    args = build_parser().parse_args(argv)
    args.own_process = own_process
    saved_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # not Python's file:line and source line under each warning
    restore_signals = _sigterm_interrupts()
    interrupted: int | None = None  # the signal
    saved_stdout = sys.stdout
    if saved_stdout is not None:  # None: started with standard output closed (print writes nothing)
        sys.stdout = _NamedStdout(saved_stdout)
    try:
        if args.command == "info":
            args.checkpoint = _info_checkpoint(args.checkpoint, args.checkpoint_option)
        if getattr(args, "checkpoint", None) == "":  # load_checkpoint's message named its own argument, "path"
            option = "CHECKPOINT" if args.command == "info" and args.checkpoint_option is None else "--checkpoint"
            raise ValueError(f"{option} must name a weight file, got ''")
        code = int(args.func(args))
        if sys.stdout is not None:  # flushed here, where a failing write is reported, not at the interpreter's exit
            sys.stdout.flush()
        return code
    except (CheckpointError, ValueError, TensorRTUnavailable, ONNXExportUnavailable, FloatingPointError,
            BackendUnavailable) as exc:  # fmt: skip
        message = str(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a scheduler's): one line, not a traceback
        interrupted = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    except BrokenPipeError:  # the reader of stdout went away (info --json | head -1): quietly, as a C tool dies
        with contextlib.suppress(OSError, ValueError):  # no second error when the interpreter flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        interrupted = signal.SIGPIPE
    except MemoryError as exc:  # e.g. a weight file too large for this machine (its reader names the file)
        message = str(exc) or "out of memory"
    except RuntimeError as exc:  # torch's allocators: "can't allocate memory", "CUDA out of memory"
        if _worker_terminated(exc):  # a SIGTERM to the process group: a worker's end was handled before it
            interrupted = signal.SIGTERM
        elif not out_of_memory(exc):
            raise
        else:
            message = f"out of memory: {excerpt(exc)}"
    except OSError as exc:  # FileNotFoundError, PermissionError, IsADirectoryError, a full disk ...
        message = _os_error(exc)
        if exc.filename == STDOUT:  # what it still buffers would fail again at the interpreter's exit
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        sys.stdout = saved_stdout
        warnings.formatwarning = saved_format
        restore_signals(dying=die_by_signal and interrupted is not None)
    if interrupted in (signal.SIGTERM, signal.SIGINT):
        train = args.command == "train"
        hint = " (--resume auto continues it from its last checkpoint, if it saved one)" if train else ""
        print(f"denseclip-fast: {'terminated' if interrupted == signal.SIGTERM else 'interrupted'}{hint}",
              file=sys.stderr)  # fmt: skip
    if interrupted is not None:  # the exception and the frames it held (open files, loaders) are gone now
        if die_by_signal and sys.platform != "win32":
            _die_by(interrupted)
        return 128 + interrupted  # as a shell reports a process so killed (or where the signal cannot kill)
    print(f"denseclip-fast: error: {message}", file=sys.stderr)
    return 2


def _die_by(sig: int) -> None:
    """End the process by ``sig`` as CPython ends on an uncaught Ctrl-C: the output flushed and the atexit handlers
    run first (multiprocessing's, for one), then the signal with its default action. Returns where it does not
    kill (PID 1 in a container ignores it)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe
            stream.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def run() -> None:
    """The ``denseclip-fast`` console script: :func:`main`, whose interrupts end the process by their signal."""
    sys.exit(main(die_by_signal=True, own_process=True))


def _ignore_signal(signum: int, frame: Any) -> None:
    """A Python signal handler that does nothing."""


def _worker_terminated(exc: RuntimeError) -> bool:
    """Whether ``exc`` is torch's DataLoader SIGCHLD handler saying that a worker was ended by SIGTERM: with a
    SIGTERM to the process group (Slurm's scancel, systemd's stop), a worker's end can be handled first, during the
    first lines of the SIGTERM handler or before the SIGTERM reaches this process."""
    name = re.escape(signal.strsignal(signal.SIGTERM) or "Terminated")
    pattern = rf"DataLoader worker \(pid\(?s?\)? [\d, ]+\) is killed by signal: {name}\."
    return re.match(pattern, str(exc)) is not None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so that the command unwinds (files closed, partial files
    removed) and prints one line."""


def _sigterm_interrupts() -> Callable[..., None]:
    """Make SIGTERM raise Terminated while a command runs; returns what restores the previous handlers (with
    ``dying=True``, for a process about to end by a signal, SIGCHLD's stays one that does nothing). Not in a
    thread other than the main one (signals cannot be handled there), not over a SIGTERM handler set outside Python
    or one that ignores it (as Python leaves an ignored SIGINT), and not in a process torchrun started: its agent
    ends the ranks with SIGTERM, and a rank blocked in a C++ collective would never run a Python handler (it would
    wait for the SIGKILL 30 s later)."""
    previous = signal.getsignal(signal.SIGTERM)
    if (threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN)
            or "TORCHELASTIC_RUN_ID" in os.environ):  # fmt: skip
        return lambda dying=False: None
    saved_sigchld: list[Any] = []

    def terminate(signum: int, frame: Any) -> None:
        try:
            if hasattr(signal, "SIGCHLD") and not saved_sigchld:
                # a SIGTERM to the process group ends the DataLoader workers too, and torch's SIGCHLD handler would
                # raise 'DataLoader worker (pid N) is killed by signal' over this one line as they go. A Python
                # handler that does nothing, not SIG_DFL: a SIGCHLD already pending when this runs (both arrive
                # during one C call, and CPython runs SIGTERM's handler first) is then an OSError 'Signal 17 ignored
                # due to race condition' instead
                saved_sigchld.append(signal.signal(signal.SIGCHLD, _ignore_signal))
        finally:  # a worker's end arriving during these lines runs torch's handler here, first: Terminated all the same
            raise Terminated()

    signal.signal(signal.SIGTERM, terminate)

    def restore(dying: bool = False) -> None:
        signal.signal(signal.SIGTERM, previous)
        if dying and hasattr(signal, "SIGCHLD"):  # workers still ending must not raise over the line said
            signal.signal(signal.SIGCHLD, _ignore_signal)
        elif saved_sigchld and saved_sigchld[0] is not None:
            signal.signal(signal.SIGCHLD, saved_sigchld[0])

    return restore


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"denseclip-fast: warning: {message}\n"


if __name__ == "__main__":
    run()

"""ONNX export (torch.onnx's dynamo exporter) with the fused operators as standard ONNX operators.

    to_onnx(model, "rn50.onnx")                              image (B,3,512,512) -> logits, vocabulary baked in
    to_onnx(model, "rn50_t.onnx", graph="image_with_text")   (image, class_embeddings (K, D)) -> logits
    to_onnx(model, "text.onnx", graph="text")                class_tokens (K, 5) int64 -> class_embeddings (K, D)

The batch (the class count for the text graph) is dynamic; H and W are fixed at export. Inputs and outputs are in
the graph's dtype (float32 or float16); the image is CLIP-normalised RGB (``denseclip_fast.preprocess.normalize``);
class tokens come from ``denseclip_fast.model.text.tokenize_class_names``. Every graph carries its facts (arch,
class names, size, dtype, mean/std of RGB pixels on the 0-255 scale) as ONNX metadata properties under
``denseclip_fast.*``, and is checked against TensorRT's supported-operator list (:mod:`.tensorrt`) as it is
written.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import numbers
import os
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoints.io import path_argument, written_atomically
from ..model import DenseCLIP
from ..preprocess import CLIP_MEAN, CLIP_STD
from ..requirements import dotted, release_below
from ..validation import as_bool, given_dtype, not_a_file
from .graphs import EXPORT_LOCK, build_graph, check_image_size, default_window_stride, example_inputs, output_path

ONNX_DTYPES = (torch.float32, torch.float16)
DEFAULT_OPSET = 18
OPSETS = range(18, 21)  # the translations use opset-18 forms (axes as inputs); TensorRT 10's parser reads up to 20
NAMES = {
    "image": (["image"], ["logits"]),
    "image_with_text": (["image", "class_embeddings"], ["logits"]),
    "text": (["class_tokens"], ["class_embeddings"]),
}
# Weights above this go to a file beside the graph, as torch.onnx's ONNXProgram.save puts them (a protobuf message
# holds 2 GiB at most, the graph included). The released architectures are far below it (ViT-B/16: about 0.5 GB in
# float32); a custom configuration may not be.
EXTERNAL_DATA_THRESHOLD = 1536 * 2**20


MIN_ONNXSCRIPT = (0, 7)  # pyproject.toml's export extra: 0.6.0 failed the export tests, 0.7.0 passed them
EXPORT_EXTRA = "pip install 'denseclip_fast[export]' (onnx >= 1.17, onnxscript >= 0.7, onnxruntime >= 1.20)"


class ONNXExportUnavailable(ImportError):
    """onnx or onnxscript (with export --verify, onnxruntime) is missing or does not import, or onnxscript is older
    than MIN_ONNXSCRIPT."""


def check_onnx_export(versions: dict[str, str | None] | None = None, *, runtime: bool = False) -> None:
    """ONNXExportUnavailable naming what is missing, too old or broken, and what to install, where torch.onnx cannot
    export: an older onnxscript fails inside it with its own pass errors, a missing one with a bare
    ModuleNotFoundError. Only onnxscript's version is compared (onnx and onnxruntime older than the extra's floors
    were not tried, so they are not refused); ``runtime`` adds onnxruntime, which export --verify runs the graph in.

    ``versions``: {"onnx": ..., "onnxscript": ...[, "onnxruntime": ...]} as installed (None: not installed, "":
    importable but of unknown version, which is accepted). Default: this environment's, each module then imported
    too (it is about to be), so that an installed one that does not import (a missing shared library, a mismatched
    dependency) is named here rather than after the export."""
    probe = versions is None
    if versions is None:
        versions = {name: _installed(name) for name in ("onnx", "onnxscript", "onnxruntime")[: 3 if runtime else 2]}
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        raise ONNXExportUnavailable(f"{_who_needs(missing)} {' and '.join(missing)}, not installed here: "
                                    f"{EXPORT_EXTRA}")  # fmt: skip
    if release_below(versions.get("onnxscript") or "", MIN_ONNXSCRIPT):
        raise ONNXExportUnavailable(f"ONNX export needs onnxscript >= {dotted(MIN_ONNXSCRIPT)}, and this environment "
                                    f"has {versions['onnxscript']}: {EXPORT_EXTRA}")  # fmt: skip
    for name in versions if probe else ():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            version = versions[name] or "version unknown"
            raise ONNXExportUnavailable(f"{_who_needs([name])} {name}, which is installed ({version}) but does not "
                                        f"import: {exc}; reinstall it: {EXPORT_EXTRA}") from exc  # fmt: skip


def _who_needs(names: list[str]) -> str:
    """The subject of a message about ``names``: onnxruntime is for export --verify only."""
    verify, export = "onnxruntime" in names, any(name != "onnxruntime" for name in names)
    return "ONNX export and --verify need" if verify and export else "--verify needs" if verify else "ONNX export needs"


def _installed(module: str) -> str | None:
    """The version of the distribution named as ``module`` (onnx, onnxscript, onnxruntime); "" for a module that
    imports without one (a source checkout on PYTHONPATH), None where there is none."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "" if importlib.util.find_spec(module) is not None else None


class _ExporterNotes(logging.Filter):
    """Drops onnxscript's "Skipping constant folding for op LayerNormalization with multiple outputs." (a warning,
    printed twice by every export: the decoder's LayerNorm of the class embeddings, constants in an image graph,
    left to run with the graph as the exported program has it; nothing the user can act on), and torch 2.10's
    "Missing annotation for parameter 'input' from (input, rois, ...)" (four warnings of every export, about
    onnxscript's translations of torchvision's roi_align and roi_pool, which the exporter's registry reads whatever
    the graph holds; later torch releases log them at debug level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOTES)


_NOTES = ("Skipping constant folding for op ", "Missing annotation for parameter ")
_NOTED_LOGGERS = ("onnxscript.optimizer._constant_folding", "torch.onnx._internal.exporter._schemas")


@contextlib.contextmanager
def _without_exporter_notes() -> Iterator[None]:
    """The exporter without its notes of what concerns no graph of ours (:class:`_ExporterNotes`)."""
    loggers, notes = [logging.getLogger(name) for name in _NOTED_LOGGERS], _ExporterNotes()
    for logger in loggers:
        logger.addFilter(notes)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notes)


def to_onnx(
    model: DenseCLIP,
    path: str | os.PathLike[str],
    *,
    graph: str = "image",
    image_size: int | Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET,
    check_tensorrt: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file at ``path``; returns the path. The file is replaced in one step: a failed
    write (a full disk ...) leaves the file at ``path`` as it was and raises an OSError naming ``path``. Weights above
    EXTERNAL_DATA_THRESHOLD (custom architectures only) go to ``NAME.<unique>.data`` beside it (see save_onnx).
    Exports take turns in the process (EXPORT_LOCK); while torch.onnx.export runs, ``sys.stdout`` is a buffer that
    is discarded (its progress lines), so another thread's prints meanwhile are lost too.

    Args:
        model: a DenseCLIP model (left untouched: a prepared copy is exported, BatchNorm folded).
        graph: ``"image"`` (class embeddings of the current vocabulary baked in), ``"image_with_text"`` (class
            embeddings (K, D) as a second input: reword the vocabulary without re-exporting; K is fixed, the
            model's class count, as the score map's K channels feed the FPN and the head has K outputs) or
            ``"text"``.
        image_size: H and W of the image graphs (int or (H, W)); default the sliding-window crop (512, 640 for
            ViT-B/16), the size the network sees in the official slide inference.
        dtype: torch.float32 or torch.float16 (the fused operators and the CLIP LayerNorms compute in float32).
        opset: ONNX opset, 18 to 20.
        check_tensorrt: warn (``UserWarning``) about any node outside TensorRT's supported-operator list.
    """
    if dtype not in ONNX_DTYPES:
        hint = " (for bfloat16, build a TensorRT engine with bf16=True from the float32 graph)"
        bf16 = dtype in (torch.bfloat16, "bfloat16", "bf16")
        raise ValueError(f"dtype must be torch.float32 or torch.float16 for ONNX, got "
                         f"{given_dtype(dtype, ONNX_DTYPES)}{hint if bf16 else ''}")  # fmt: skip
    check_tensorrt = as_bool("check_tensorrt", check_tensorrt)
    # an int: 18.0 is "in" the range, and the exporter given it failed, and failed every later export of the process
    if not isinstance(opset, numbers.Integral) or isinstance(opset, bool) or opset not in OPSETS:
        raise ValueError(f"opset must be an int in {OPSETS.start}..{OPSETS.stop - 1}, got {opset!r}")
    opset = int(opset)
    if graph == "text" and image_size is not None:  # else accepted and ignored
        raise ValueError(f"image_size applies to the image graphs ('image', 'image_with_text'); the text graph maps "
                         f"class tokens to class embeddings, got image_size={image_size!r}")  # fmt: skip
    check_onnx_export()
    path = output_path(path)
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: its weights would go beside it, in /dev
        raise ValueError(f"path {str(path)!r} is not a regular file: an ONNX graph is written as a file (its weights "
                         "to a file beside it when large) and read back to check it")  # fmt: skip
    device = torch.device("cpu")
    module, prepared = build_graph(model, graph, dtype, device)
    size = check_image_size(prepared, image_size)
    args = example_inputs(graph, prepared, size, dtype, device)
    input_names, output_names = NAMES[graph]
    batch = torch.export.Dim("classes" if graph == "text" else "batch", min=1)  # unbounded in the ONNX file
    dynamic: dict[str, dict[int, torch.export.Dim] | None] = (
        {"class_tokens": {0: batch}} if graph == "text" else {"image": {0: batch}}
    )
    if graph == "image_with_text":
        dynamic["class_embeddings"] = None

    from .onnx_ops import translation_table

    with EXPORT_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _without_exporter_notes():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            module, args, dynamo=True, custom_translation_table=translation_table(), opset_version=opset,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic, verbose=False,
        )  # fmt: skip
    assert program is not None  # None only from the legacy exporter (dynamo=False)
    metadata = {
        "version": __version__,
        "graph": graph,
        "arch": prepared.config.arch,
        "dtype": str(dtype).removeprefix("torch."),
        "class_names": json.dumps(prepared.class_names),
        "embed_dim": str(prepared.config.embed_dim),
        "config": json.dumps(prepared.config.to_dict()),
    }
    if graph == "text":
        metadata["class_token_length"] = str(prepared.config.text.class_token_length)
    else:
        config = prepared.config
        stride = default_window_stride(size, config.slide_crop, config.slide_stride)
        metadata |= {"image_size": json.dumps(list(size)), "mean": json.dumps(CLIP_MEAN), "std": json.dumps(CLIP_STD),
                     "test_scale": json.dumps(list(config.test_scale)), "slide_stride": json.dumps(list(stride))}
    exported_opset = program.model.opset_imports.get("", None)
    if exported_opset != opset:
        raise ValueError(f"the exporter wrote opset {exported_opset}, not the requested {opset}")
    program.model.metadata_props.update({f"denseclip_fast.{k}": v for k, v in metadata.items()})
    save_onnx(program.model, path)
    if check_tensorrt:
        from .tensorrt import tensorrt_problems

        problems = tensorrt_problems(path)
        if problems:
            warnings.warn(
                f"{path}: {len(problems)} node(s) outside TensorRT's ONNX operator list: " + "; ".join(problems[:10]),
                stacklevel=2,
            )
    return path


def save_onnx(model: Any, path: Path) -> None:
    """Write the ONNX graph ``model`` (an onnx_ir Model, as torch.onnx.export makes it) to ``path``, so that a
    failure (a full disk ...) leaves the file at ``path``, and the weights file it refers to, as they were: an
    OSError naming ``path`` (checkpoints.io.replaced_atomically).

    Weights larger than EXTERNAL_DATA_THRESHOLD go to a file beside the graph, which refers to it by name. The name
    is a new one each time (``NAME.<unique>.data``): the previous graph keeps its own weights file until the new
    graph replaces it, in one step, and that file is then removed. (ONNXProgram.save would rewrite ``NAME.data``
    under the previous graph, and its graph, written under a temporary name, would refer to a temporary name.) A
    symlink at ``path`` is kept: the graph it points to is replaced, with its weights files beside it (ONNX looks for
    them beside the path it is given: such a graph is read by its target's path)."""
    from onnxscript import ir

    # a symlink's target is what is replaced (replaced_atomically): its weights files are beside it, named after it
    target = Path(os.path.realpath(path))
    previous = _data_files(target)
    data = f"{target.name}.{uuid.uuid4().hex[:8]}.data" if _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD else None
    try:
        with written_atomically(path, "the ONNX graph") as partial:
            # the weights go to ``data`` beside ``partial``, hence beside ``target``; format: not guessed from the
            # temporary file's suffix
            ir.save(model, partial, format="protobuf", external_data=data)
    except BaseException:
        if data is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(target.parent / data)
        raise
    for name in previous:  # the replaced graph's weights, which no graph refers to now
        try:
            os.remove(target.parent / name)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the new graph is in place: an orphan left is said, not an error
            warnings.warn(f"{target.parent / name}: the replaced graph's weights file could not be removed "
                          f"({exc.strerror or exc})", stacklevel=3)  # fmt: skip


def _weight_bytes(model: Any) -> int:
    """The bytes of the initializers of an onnx_ir Model, its subgraphs' included."""
    values = [v.const_value for graph in model.graphs() for v in graph.initializers.values()]
    return sum(value.nbytes for value in values if value is not None)


def _data_files(path: Path) -> set[str]:
    """The names of the weights files beside ``path`` that the ONNX graph at ``path`` refers to and that are named
    after it (``NAME.data``, as ONNXProgram.save names them, and ``NAME.<unique>.data``, as save_onnx does): those
    that replacing the graph leaves to no graph. Other names may be shared with other graphs: not listed. The graph
    is read only when such a file is there (reading a graph can take seconds)."""
    prefix = f"{path.name}."
    with contextlib.suppress(OSError):
        named = {n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(".data")}
        if named and path.is_file():
            try:
                graph = load_onnx(path).graph
            except ValueError:  # not an ONNX graph: it refers to nothing
                return set()
            return {location for t in _initializers(graph) if (location := _location(t)) in named}
    return set()


def _initializers(graph: Any) -> Iterator[Any]:
    """The initializers (onnx.TensorProto) of an onnx.GraphProto and of its nodes' subgraphs (If, Loop, Scan)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _initializers(sub)


def _location(tensor: Any) -> str | None:
    """The file an externally stored onnx.TensorProto's data is in (relative to its graph), else None."""
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), None)


def graph_file(path: str | os.PathLike[str]) -> str:
    """The path to open the ONNX graph at ``path`` by, with its weights: its target's, where ``path`` is a symbolic
    link. ONNX Runtime, TensorRT's parser and ``onnx.load`` look for a graph's external weights file beside the path
    they are given, and ``to_onnx`` through a symlink writes the graph and its weights file where the link points.
    ValueError naming ``path`` for what is no path (path_argument)."""
    return os.path.realpath(path_argument(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``denseclip_fast.*`` metadata of an exported ONNX file (without the prefix)."""
    model = load_onnx(path)
    prefix = "denseclip_fast."
    return {p.key.removeprefix(prefix): p.value for p in model.metadata_props if p.key.startswith(prefix)}


def load_onnx(path: str | os.PathLike[str], name: str = "path") -> Any:
    """The ``onnx.ModelProto`` in the file ``path``, without external data; ValueError naming ``name`` and the path
    for a file that is not an ONNX model (protobuf raises a bare DecodeError for most, and reads an empty file, or
    bytes that happen to parse, as a model without a graph or an IR version)."""
    import onnx
    from google.protobuf.message import DecodeError

    text = path_argument(path, name)
    if not os.path.isfile(text):
        raise ValueError(f"{name} {text!r} {not_a_file(text)}; expected an ONNX file")
    try:
        model = onnx.load(text, load_external_data=False)
    except DecodeError:
        model = None
    if model is None or not model.ir_version or not model.HasField("graph"):
        raise ValueError(f"{name} {text!r} is not an ONNX model (not a serialized onnx.ModelProto)")
    return model

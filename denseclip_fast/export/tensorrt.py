"""TensorRT: the supported-operator check of exported ONNX graphs, and the engine builder.

``tensorrt_onnx_ops.json`` is TensorRT's ONNX-parser operator table (onnx-tensorrt's docs/operators.md, source and
release recorded in the file): per operator whether it is supported, its data types and its restrictions.
:func:`tensorrt_problems` checks every node of a graph against it: the domain (no custom domains, which would need
plugins), the operator, the data type of its main input, the opset range, the Resize modes, and the inputs the table
requires to be initializers (``axes`` of reductions, Slice, Squeeze, Unsqueeze ...).

:func:`build_tensorrt_engine` builds a serialized engine with the TensorRT Python API (an optional dependency).
TensorRT cannot be installed on the machines this project is developed and tested on: the builder is written against
the TensorRT 10 API and has not been run; the ONNX graphs it consumes are verified (operator list, ONNX Runtime).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoints.io import path_argument
from ..validation import as_bool, finite_real, not_a_file, plain_scalar
from .graphs import output_path, write_file
from .onnx import graph_file, load_onnx, read_metadata

TABLE = Path(__file__).with_name("tensorrt_onnx_ops.json")

# ONNX TensorProto element types -> the type names of the table
ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
              9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 16: "BF16", 17: "FP8", 18: "FP8",
              19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4"}  # fmt: skip
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
DEFAULT_BATCH = (1, 1, 16)  # (min, opt, max) of the optimisation profile


class TensorRTUnavailable(RuntimeError):
    """The ``tensorrt`` Python package is not installed."""


@functools.lru_cache(maxsize=1)
def supported_operators() -> dict[str, Any]:
    """The table: ``{"source", "source_release", "opset_range", "operators": {name: {...}}}``."""
    with open(TABLE, encoding="utf-8") as f:
        return json.load(f)


def _must_be_initializers(op_type: str, restriction: str, opset: int) -> list[int]:
    """Input positions that the restriction text requires to be initializers (by the ONNX schema's input names)."""
    import onnx

    names = [
        name
        for sentence in restriction.split(". ")
        if re.search(r" must be (an initializer|initializers|a constant)", sentence)
        for name in re.findall(r"`(\w+)`", sentence.split(" must be ")[0])
    ]
    if not names:
        return []
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return []
    inputs = [i.name for i in schema.inputs]
    return [inputs.index(n) for n in names if n in inputs]


def tensorrt_problems(model: Any) -> list[str]:
    """Every reason TensorRT's ONNX parser (per the table) would reject the graph; empty when it is all supported.

    ``model``: an ``onnx.ModelProto`` or a path (ValueError if its file is not an ONNX model). Types come from ONNX
    shape inference.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model, "model")
    table = supported_operators()
    low, high = table["opset_range"]
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not low <= opset <= high:
        problems.append(f"opset {opset} is outside TensorRT's range {low}..{high}")
        opset = high
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except onnx.shape_inference.InferenceError:  # e.g. a custom-domain node without a schema: types stay unknown
        graph = model.graph
    _check_graph(graph, table, opset, problems, {}, set())
    return problems


def _check_graph(
    graph: Any,
    table: dict[str, Any],
    opset: int,
    problems: list[str],
    outer_types: dict[str, int],
    outer_constants: set[str],
) -> None:
    """Check every node of ``graph`` (and of the subgraphs of If/Loop/Scan nodes) against the table."""
    import onnx

    types = dict(outer_types)
    types |= {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}
    constants = set(outer_constants) | {t.name for t in graph.initializer}
    for node in graph.node:  # topological order: constants propagate through Identity
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input and node.input[0] in constants):
            constants.update(node.output)
    for node in graph.node:
        where = f"{node.op_type} node {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where} is in the custom domain {node.domain!r} (TensorRT would need a plugin)")
            continue
        entry = table["operators"].get(node.op_type)
        if entry is None or not entry["supported"]:
            problems.append(f"{where}: {node.op_type} is not supported by TensorRT's ONNX parser")
            continue
        for attribute in node.attribute:  # If/Loop/Scan bodies
            if attribute.type == onnx.AttributeProto.GRAPH:
                _check_graph(attribute.g, table, opset, problems, types, constants)
        if node.op_type == "Constant":
            kind = next(iter(a.name for a in node.attribute), "")
            if kind in ("sparse_value", "value_string", "value_strings"):
                problems.append(f"{where}: attribute {kind} is unsupported")
            continue
        data = node.input[0] if node.input else ""
        dtype = ONNX_TYPES.get(types.get(data, 0))
        if node.op_type == "ConstantOfShape":  # the table's types are those of the value, the input is a shape
            dtype = None
        if data and dtype is not None and entry["types"] and dtype not in entry["types"]:
            problems.append(f"{where}: input type {dtype} is not one of {entry['types']}")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), 0)
            if ONNX_TYPES.get(to) not in entry["types"]:
                problems.append(f"{where}: cast to {ONNX_TYPES.get(to, to)} is not one of {entry['types']}")
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            problems.append(f"{where}: only the first output (Y) is supported")
        for position in _must_be_initializers(node.op_type, entry.get("restrictions", ""), opset):
            if position < len(node.input) and node.input[position] and node.input[position] not in constants:
                problems.append(f"{where}: input {position} ({node.input[position]!r}) must be an initializer")
        if node.op_type == "Resize":
            attrs = {a.name: (a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i) for a in node.attribute}
            if attrs.get("mode", "nearest") not in RESIZE_MODES:
                problems.append(f"{where}: mode {attrs['mode']!r} is not one of {sorted(RESIZE_MODES)}")
            coords = attrs.get("coordinate_transformation_mode", "half_pixel")
            if coords not in RESIZE_COORDINATES:
                problems.append(f"{where}: coordinate_transformation_mode {coords!r} is unsupported")
            if attrs.get("antialias", 0):
                problems.append(f"{where}: antialiasing is unsupported")
            if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
                problems.append(f"{where}: keep_aspect_ratio_policy must be 'stretch'")


def _tensorrt() -> Any:
    import importlib.util

    try:
        import tensorrt
    except ImportError as exc:
        if importlib.util.find_spec("tensorrt") is not None:  # there, but it does not import (a missing libnvinfer)
            raise TensorRTUnavailable(
                f"TensorRT is installed but does not import ({type(exc).__name__}: {exc}): check that its libraries "
                "(libnvinfer) match the installed tensorrt package and can be found"
            ) from None
        raise TensorRTUnavailable(
            "TensorRT is not installed: `pip install tensorrt` (NVIDIA's index) on a machine with an NVIDIA GPU; "
            "without it, export the ONNX graph (denseclip-fast export --format onnx) and build the engine with "
            "trtexec where TensorRT is"
        ) from None
    return tensorrt


def default_batch(graph: str, classes: int) -> tuple[int, int, int]:
    """The (min, opt, max) profile a build gets when none is given: DEFAULT_BATCH for the image graphs, and for the
    text graph (whose first dimension is the class count) one tuned for the ``classes`` of the exported vocabulary,
    up to at least 16 (DEFAULT_BATCH stopped a 150-class checkpoint's own vocabulary at 16)."""
    classes = max(classes, 1)
    return DEFAULT_BATCH if graph != "text" else (1, classes, max(classes, DEFAULT_BATCH[2]))


def check_batch(batch: Any, name: str = "batch") -> tuple[int, int, int]:
    """``batch`` as (min, opt, max) ints with 1 <= min <= opt <= max (numpy integers too, as the other exporters'
    arguments: a numpy array's elements); ValueError naming ``name`` otherwise."""
    try:
        given = tuple(map(plain_scalar, batch))
    except TypeError:  # an int, ...
        given = ()
    values = tuple(b for b in given if isinstance(b, int) and not isinstance(b, bool))
    if len(values) != 3 or len(given) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"{name} must be (min, opt, max) ints with 1 <= min <= opt <= max, got {batch!r}")
    return values[0], values[1], values[2]


def float32_layers(network: Any, trt: Any) -> list[Any]:
    """The layers of a weakly typed network (a float32 graph built with the fp16 / bf16 flags) to pin to float32:
    reductions, softmax and normalisations, and the elementwise layers whose outputs a reduction takes (the square
    that onnx-tensorrt makes of an L2 norm's ReduceL2: in float16 it overflows for an element past 256). Not the
    attention's q k^T MatMul before a softmax (float16 past a logit of 65504; pinning it would put every transformer
    layer's attention product in float32): a float16 graph, built strongly typed, computes the fused operators'
    products in float32 as it was exported."""
    kept = {getattr(trt.LayerType, n) for n in ("REDUCE", "SOFTMAX", "NORMALIZATION") if hasattr(trt.LayerType, n)}
    floats = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {}  # output tensor name -> its layer
    for layer in layers:
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    pinned: dict[int, Any] = {}
    for layer in layers:
        if layer.type not in kept or layer.get_output(0).dtype not in floats:
            continue
        pinned[id(layer)] = layer
        if layer.type == trt.LayerType.REDUCE:
            for j in range(layer.num_inputs):
                tensor = layer.get_input(j)
                source = producer.get(tensor.name) if tensor is not None else None
                if source is not None and source.type == trt.LayerType.ELEMENTWISE and tensor.dtype in floats:
                    pinned[id(source)] = source
    return [layer for layer in layers if id(layer) in pinned]  # in the network's order


def build_tensorrt_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    fp16: bool = False,
    *,
    bf16: bool = False,
    batch: Sequence[int] | None = None,
    workspace_gib: float | None = None,
) -> Path:
    """Build a serialized TensorRT engine from an exported ONNX graph; returns ``engine_path``.

    Precision: a float16 graph (``to_onnx(dtype=torch.float16)``) is built strongly typed: TensorRT keeps the graph's
    types, so the fused operators' normalisations and softmax stay in float32 as exported (``fp16``/``bf16`` are then
    ignored). A float32 graph is built in float32, or with the ``fp16``/``bf16`` flags (TensorRT picks per layer)
    with the layers of :func:`float32_layers` held in float32 (a float16 sum of 1024 squared features overflows).

    Args:
        fp16, bf16: for a float32 graph, allow float16 / bfloat16 layers (default: neither, as the CLI's
            ``--format tensorrt`` without ``--fp16``: the engine computes what the float32 graph does).
        batch: (min, opt, max) of the dynamic first dimension (the batch, or the class count of the text graph):
            one optimisation profile covers it; the engine is tuned for ``opt``. Default: DEFAULT_BATCH, (1, 1, 16),
            for the image graphs; (1, K, max(K, 16)) for the text graph of a K-class vocabulary.
        workspace_gib: a limit on TensorRT's scratch memory (default: TensorRT's).
    Raises:
        TensorRTUnavailable without the ``tensorrt`` package; ValueError for bad arguments or a graph TensorRT's
        parser rejects (its errors listed); OSError naming ``engine_path`` when the engine cannot be written (a
        full disk ...: the file there is kept as it was).
    """
    onnx_path = Path(path_argument(onnx_path, "onnx_path"))
    fp16, bf16 = as_bool("fp16", fp16), as_bool("bf16", bf16)
    if not onnx_path.is_file():
        raise ValueError(f"onnx_path {str(onnx_path)!r} {not_a_file(str(onnx_path))}; expected an ONNX file")
    engine_path = output_path(engine_path, "engine_path")
    if batch is not None:
        batch = check_batch(batch)
    if workspace_gib is not None:  # a numpy number is the number (a numpy bool stays refused)
        workspace = finite_real(workspace_gib)
        if workspace is None or workspace <= 0:
            raise ValueError(f"workspace_gib must be a positive number of GiB (or None: TensorRT's), got "
                             f"{workspace_gib!r}")  # fmt: skip
        workspace_gib = workspace
    if engine_path.resolve() == onnx_path.resolve():
        raise ValueError("engine_path must differ from onnx_path")
    trt = _tensorrt()
    metadata = read_metadata(onnx_path)
    if batch is None:
        batch = default_batch(metadata.get("graph", "image"), len(json.loads(metadata.get("class_names", "[]"))))
    half_graph = metadata.get("dtype") == "float16"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0  # TensorRT 10: explicit batch is the only mode
    if half_graph:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(graph_file(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ValueError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    if not half_graph and (fp16 or bf16):
        for wanted, name in ((fp16, "FP16"), (bf16, "BF16")):
            if wanted:
                if not hasattr(trt.BuilderFlag, name):
                    raise ValueError(
                        f"this TensorRT has no BuilderFlag.{name} (weakly typed networks were removed): export a "
                        "float16 graph (to_onnx(dtype=torch.float16)) and build it strongly typed"
                    )
                config.set_flag(getattr(trt.BuilderFlag, name))
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for layer in float32_layers(network, trt):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ValueError(f"input {tensor.name!r} has dynamic dimensions beyond the first: {shape}")
        if shape[0] < 0:
            low, opt, high = ([b, *shape[1:]] for b in batch)
            profile.set_shape(tensor.name, low, opt, high)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    # replaced atomically: a failed write (a full disk) keeps the previous engine, an OSError naming engine_path.
    # The IHostMemory is written through its buffer, not copied to bytes first (engines run to gigabytes)
    write_file(engine_path, memoryview(serialized), "the TensorRT engine")
    return engine_path

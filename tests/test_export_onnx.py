"""ONNX export: graphs run in ONNX Runtime and equal the PyTorch model; every node is in TensorRT's operator list."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import sys
import threading
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from denseclip_fast import ADE20K_CLASSES, DenseCLIP, Segmenter  # noqa: E402
from denseclip_fast.export import (  # noqa: E402
    graph_file,
    read_metadata,
    supported_operators,
    tensorrt_problems,
    to_onnx,
)
from denseclip_fast.export import onnx as onnx_export  # noqa: E402
from denseclip_fast.export.graphs import check_image_size, default_window_stride  # noqa: E402
from denseclip_fast.export.onnx import save_onnx  # noqa: E402
from denseclip_fast.export.tensorrt import TensorRTUnavailable, build_tensorrt_engine  # noqa: E402
from denseclip_fast.model.text import tokenize_class_names  # noqa: E402

from .conftest import NAMES, randomized, rel_err, tiny_config  # noqa: E402

SIZE = (64, 96)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _logits(session: ort.InferenceSession, x: torch.Tensor, dtype: torch.dtype, text: torch.Tensor | None = None):
    feed = {"image": x.to(dtype).numpy()}
    if text is not None:
        feed["class_embeddings"] = text.to(dtype).numpy()
    return torch.from_numpy(session.run(None, feed)[0])


@pytest.fixture(scope="module")
def tiny() -> DenseCLIP:
    return randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, dtype",
    [("RN50", torch.float32), ("RN101", torch.float32), ("ViT-B/16", torch.float32), ("ViT-B/16", torch.float16)],
)
def test_released_architectures_match_pytorch_in_onnxruntime(arch, dtype, tmp_path):
    """The full-size architectures (random weights, a small input): float32 <= 1e-4, float16 <= 2e-2 relative
    error against the float32 PyTorch model, at batch 1 and 3 (the batch is dynamic), TensorRT-clean. (float16
    ResNets: test_float16_graph_and_dynamic_batch, on a tiny one, to keep CI short.)"""
    model = randomized(DenseCLIP.from_arch(arch)).eval()
    path = to_onnx(model, tmp_path / "m.onnx", image_size=64, dtype=dtype)
    assert tensorrt_problems(path) == []
    session = _session(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
        out = _logits(session, x, dtype)
        assert out.shape == expected.shape and out.dtype == dtype
        assert rel_err(out, expected) <= (1e-4 if dtype == torch.float32 else 2e-2), (batch, rel_err(out, expected))


@pytest.mark.parametrize("kind, activation", [("resnet", "quick_gelu"), ("vit", "quick_gelu"), ("vit", "gelu")])
def test_vocabulary_as_an_input(kind, activation, tmp_path):
    """image_with_text takes another wording's class embeddings (K, D) (the model's K classes: the score map's K
    channels feed the FPN): a reworded model's logits, no re-export.
    (A ViT with GELU, as from most open_clip weights: the activation exports too.)"""
    model = randomized(DenseCLIP(tiny_config(kind).replace(activation=activation), NAMES)).eval()
    path = to_onnx(model, tmp_path / "t.onnx", graph="image_with_text", image_size=SIZE)
    assert [i.name for i in _session(path).get_inputs()] == ["image", "class_embeddings"]
    assert tensorrt_problems(path) == []
    session = _session(path)
    x = torch.randn(2, 3, *SIZE)
    new_names = ["sky", "dog", "tree", "road"]
    with torch.no_grad():
        text = model.text_features(new_names)
        model.set_classes(new_names)
        expected = model(x)
    assert rel_err(_logits(session, x, torch.float32, text), expected) <= 1e-4
    # the input's K is the model's: the graph declares it, and ONNX Runtime refuses another
    assert session.get_inputs()[1].shape == [len(NAMES), text.shape[1]]
    with pytest.raises(Exception, match="class_embeddings"):
        _logits(session, x, torch.float32, torch.cat([text, text[:2]]))


def test_float16_graph_and_dynamic_batch(tiny, tmp_path):
    path = to_onnx(tiny, tmp_path / "h.onnx", image_size=SIZE, dtype=torch.float16)
    session = _session(path)
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert session.get_inputs()[0].shape[1:] == [3, *SIZE] and not isinstance(session.get_inputs()[0].shape[0], int)
    for batch in (1, 3):
        x = torch.randn(batch, 3, *SIZE)
        with torch.no_grad():
            expected = tiny(x)
        assert rel_err(_logits(session, x, torch.float16), expected) <= 2e-2
    meta = read_metadata(path)
    assert meta["dtype"] == "float16" and json.loads(meta["image_size"]) == list(SIZE)
    assert json.loads(meta["class_names"]) == NAMES and meta["graph"] == "image"


def test_the_official_slide_pipeline_around_an_image_graph_from_its_metadata(tmp_path):
    """README's recipe for the official test pipeline around an image graph, from the graph's metadata alone
    (test_scale, image_size, slide_stride, mean / std): keep-ratio resize of a uint8 image, CLIP normalisation, the
    sliding windows, logits resized back, equal to the Segmenter's slide mode. test_scale and slide_stride were only
    inside the config entry; a graph of another size records two thirds of it as its stride (as to_aoti)."""
    import torch.nn.functional as F

    from denseclip_fast import Segmenter
    from denseclip_fast.model.slide import slide_inference
    from denseclip_fast.preprocess import resize_keep_ratio

    from .conftest import text_dependent_model

    model = text_dependent_model("resnet")
    meta = read_metadata(to_onnx(model, tmp_path / "m.onnx"))
    crop, stride = model.config.slide_crop, model.config.slide_stride
    assert json.loads(meta["test_scale"]) == list(model.config.test_scale)
    assert json.loads(meta["image_size"]) == [crop, crop] and json.loads(meta["slide_stride"]) == [stride, stride]
    session = _session(tmp_path / "m.onnx")
    image = np.random.default_rng(0).integers(0, 256, size=(97, 131, 3), dtype=np.uint8)
    mean, std = (torch.tensor(json.loads(meta[k])).view(1, 3, 1, 1) for k in ("mean", "std"))
    resized = resize_keep_ratio(torch.from_numpy(image).permute(2, 0, 1)[None], json.loads(meta["test_scale"]))
    x = (resized.float() - mean) / std
    windows = slide_inference(lambda w: _logits(session, w, torch.float32), x, json.loads(meta["image_size"]),
                              json.loads(meta["slide_stride"]))  # fmt: skip
    logits = F.interpolate(windows, size=image.shape[:2], mode="bilinear", align_corners=False)
    expected = Segmenter(model, device="cpu", dtype=torch.float32, mode="slide").logits(image)
    assert rel_err(logits, expected.reshape(logits.shape)) <= 1e-5
    assert default_window_stride((96, 48), crop, stride) == (64, 32)  # another graph size: two thirds of it


def test_fused_operators_become_standard_onnx(tiny, tmp_path, caplog):
    """No custom-domain node: the score/concat/attention translations are ReduceL2, MatMul, Softmax ...; the export
    says nothing (onnxscript's two notes of a LayerNormalization it leaves unfolded are dropped, and torch 2.10's
    four of onnxscript's unannotated translations of torchvision's ops)."""
    with caplog.at_level(logging.WARNING):
        model = onnx.load(str(to_onnx(tiny, tmp_path / "m.onnx", image_size=SIZE)))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    for name in ("onnxscript.optimizer._constant_folding", "torch.onnx._internal.exporter._schemas"):
        assert logging.getLogger(name).filters == []  # removed after the export
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    op_types = {node.op_type for node in model.graph.node}
    assert {"ReduceL2", "MatMul", "Softmax", "Concat"} <= op_types
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_opset_20(tiny, tmp_path):
    path = to_onnx(tiny, tmp_path / "m20.onnx", graph="text", opset=20)
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 20
    assert tensorrt_problems(model) == []
    tokens = tokenize_class_names(["sky"], 5)
    out = torch.from_numpy(_session(path).run(None, {"class_tokens": tokens.numpy()})[0])
    with torch.no_grad():
        assert rel_err(out, tiny.text_features(["sky"])) <= 1e-5


def test_the_tensorrt_check_switch_takes_a_numpy_bool(tiny, tmp_path, monkeypatch):
    """check_tensorrt=np.False_ (a numpy bool, which was refused) skips the check, np.True_ runs it."""
    from denseclip_fast.export import tensorrt

    checked: list[object] = []
    monkeypatch.setattr(tensorrt, "tensorrt_problems", lambda path: checked.append(path) or [])
    to_onnx(tiny, tmp_path / "unchecked.onnx", graph="text", check_tensorrt=np.False_)
    assert checked == []
    to_onnx(tiny, tmp_path / "checked.onnx", graph="text", check_tensorrt=np.True_)
    assert len(checked) == 1


def test_text_graph_equals_set_classes(tiny, tmp_path):
    """The text graph maps class tokens to exactly what set_classes gives the model, for any number of names."""
    path = to_onnx(tiny, tmp_path / "text.onnx", graph="text")
    assert tensorrt_problems(path) == []
    session = _session(path)
    meta = read_metadata(path)
    for names in (["sky", "a dog", "tree", "car", "road"], ["person"], list(ADE20K_CLASSES[:70])):
        tokens = tokenize_class_names(names, int(meta["class_token_length"]))
        out = torch.from_numpy(session.run(None, {"class_tokens": tokens.numpy()})[0])
        assert out.shape == (len(names), tiny.config.embed_dim)
        with torch.no_grad():
            assert rel_err(out, tiny.text_features(names)) <= 1e-5
    reworded = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    reworded.set_classes(["sky", "dog", "tree", "road"])
    tokens = tokenize_class_names(reworded.class_names, 5)
    with torch.no_grad():
        expected = reworded.class_embeddings()
    out = torch.from_numpy(session.run(None, {"class_tokens": tokens.numpy()})[0])
    assert rel_err(out, expected) <= 1e-5


def test_text_graph_computes_the_shared_start_once(tiny, tmp_path):
    """The exported text graph lays the prompts out as the shared start's P rows plus (L - 1) rows per class (the
    shapes ONNX records for the transformer's activations), never a (K, L + n_ctx) prompt per class."""
    model = onnx.load(str(to_onnx(tiny, tmp_path / "text.onnx", graph="text")))
    text = tiny.config.text
    p, s = 1 + text.n_ctx, text.class_token_length - 1
    shapes = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info]
    rows = f"{s}*classes + {p}"
    assert [rows, 4 * text.width] in shapes  # an MLP's hidden activations, P + K * S rows
    assert ["classes", text.context_length, text.width] not in shapes  # no whole prompt


# ------------------------------------------------------------------------------------------------ TensorRT list


def test_operator_table_has_its_source():
    table = supported_operators()
    assert "onnx-tensorrt" in table["source"] and table["opset_range"] == [9, 20]
    ops = table["operators"]
    assert ops["LayerNormalization"]["supported"] and not ops["Unique"]["supported"]
    assert "FP16" in ops["MatMul"]["types"]


def _graph(nodes, inputs, outputs, initializers=(), opset=18):
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def _tensor(name: str, elem=onnx.TensorProto.FLOAT, shape=(1, 3, 8, 8)):
    return onnx.helper.make_tensor_value_info(name, elem, list(shape))


def _relu_graph():
    return _graph([onnx.helper.make_node("Relu", ["x"], ["y"])], [_tensor("x")], [_tensor("y")])


def test_tensorrt_check_finds_what_the_parser_rejects():
    h = onnx.helper
    fine = _graph([h.make_node("Relu", ["x"], ["y"])], [_tensor("x")], [_tensor("y")])
    assert tensorrt_problems(fine) == []
    cases = {
        "custom domain": _graph([h.make_node("pixel_text_score", ["x"], ["y"], domain="denseclip_fast")],
                                [_tensor("x")], [_tensor("y")]),  # no schema: shape inference fails, types unknown
        "not supported": _graph([h.make_node("BitShift", ["x", "x"], ["y"], direction="LEFT")],
                                [_tensor("x", onnx.TensorProto.UINT8)], [_tensor("y", onnx.TensorProto.UINT8)]),
        "mode 'cubic'": _graph(
            [h.make_node("Resize", ["x", "", "s"], ["y"], mode="cubic")], [_tensor("x")], [_tensor("y")],
            [onnx.numpy_helper.from_array(np.ones(4, np.float32), "s")]),
        "must be an initializer": _graph(
            [h.make_node("ReduceL2", ["x", "axes"], ["y"])],
            [_tensor("x"), _tensor("axes", onnx.TensorProto.INT64, (1,))], [_tensor("y")]),
        "cast to DOUBLE": _graph([h.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.DOUBLE)], [_tensor("x")],
                                 [_tensor("y", onnx.TensorProto.DOUBLE)]),
        "opset 21": _graph([h.make_node("Relu", ["x"], ["y"])], [_tensor("x")], [_tensor("y")], opset=21),
    }  # fmt: skip
    for expected, model in cases.items():
        problems = tensorrt_problems(model)
        assert len(problems) == 1 and expected in problems[0], (expected, problems)
    more = {
        "input type UINT64": _graph([h.make_node("Add", ["x", "x"], ["y"])], [_tensor("x", onnx.TensorProto.UINT64)],
                                    [_tensor("y", onnx.TensorProto.UINT64)]),
        "only the first output": _graph(
            [h.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=-1)], [_tensor("x")],
            [_tensor("y")], [onnx.numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("s", "b")]),
        "BitShift is not supported": _graph(
            [h.make_node("If", ["c"], ["y"],
                         then_branch=onnx.helper.make_graph(
                             [h.make_node("BitShift", ["u", "u"], ["z"], direction="LEFT")],
                             "then", [], [_tensor("z", onnx.TensorProto.UINT8)]),
                         else_branch=onnx.helper.make_graph([h.make_node("Identity", ["u"], ["z"])], "else", [],
                                                            [_tensor("z", onnx.TensorProto.UINT8)]))],
            [_tensor("c", onnx.TensorProto.BOOL, ()), _tensor("u", onnx.TensorProto.UINT8)],
            [_tensor("y", onnx.TensorProto.UINT8)]),  # inside a subgraph
    }  # fmt: skip
    for expected, model in more.items():
        problems = tensorrt_problems(model)
        assert any(expected in p for p in problems), (expected, problems)
    fine_too = _graph(
        [h.make_node("Constant", [], ["axes0"], value=onnx.numpy_helper.from_array(np.array([1], np.int64))),
         h.make_node("Identity", ["axes0"], ["axes"]), h.make_node("ReduceL2", ["x", "axes"], ["r"]),
         h.make_node("Shape", ["x"], ["shape"]), h.make_node("ConstantOfShape", ["shape"], ["y"])],
        [_tensor("x")], [_tensor("y"), _tensor("r")],
    )  # fmt: skip
    assert tensorrt_problems(fine_too) == []  # axes through Identity(Constant); ConstantOfShape takes an INT64 shape
    constant_axes = _graph(
        [h.make_node("ReduceL2", ["x", "axes"], ["y"])],
        [_tensor("x")],
        [_tensor("y")],
        [onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    assert tensorrt_problems(constant_axes) == []


# ------------------------------------------------------------------------------------------------ bad requests


def test_unsupported_export_requests_say_what_is_wrong(tiny, tmp_path):
    with pytest.raises(ValueError, match="graph must be one of"):
        to_onnx(tiny, tmp_path / "x.onnx", graph="video")
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float16 for ONNX, got torch.bfloat16"):
        to_onnx(tiny, tmp_path / "x.onnx", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"got the string 'float16' \(pass torch.float16\)$"):  # no bfloat16 hint
        to_onnx(tiny, tmp_path / "x.onnx", dtype="float16")
    with pytest.raises(ValueError, match=r"got the string 'bfloat16' \(for bfloat16, build a TensorRT engine"):
        to_onnx(tiny, tmp_path / "x.onnx", dtype="bfloat16")  # no "pass torch.bfloat16": it is refused too
    with pytest.raises(ValueError, match="check_tensorrt must be True or False, got 'no'"):  # "no" was true
        to_onnx(tiny, tmp_path / "x.onnx", check_tensorrt="no")  # type: ignore[arg-type]
    for opset in (17, 18.0, True, "18"):  # 18.0 passed the range check and broke the exporter for the process
        with pytest.raises(ValueError, match=f"opset must be an int in 18..20, got {opset!r}"):
            to_onnx(tiny, tmp_path / "x.onnx", opset=opset)
    with pytest.raises(ValueError, match=r"image_size must be 32 to 8192 on each side, got \(16, 16\)"):
        to_onnx(tiny, tmp_path / "x.onnx", image_size=16)
    with pytest.raises(ValueError, match=r"image_size must be 32 to 8192 on each side, got \(64, 99999999\)"):
        to_onnx(tiny, tmp_path / "x.onnx", image_size=(64, 99999999))
    with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\)"):
        to_onnx(tiny, tmp_path / "x.onnx", image_size=(64, 64, 3))
    with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\) ints, got \(True, 64\)"):
        to_onnx(tiny, tmp_path / "x.onnx", image_size=(True, 64))
    for unordered in ({48, 64}, {48: 64}):  # which would be H, which W? (a set was taken in its own order)
        with pytest.raises(ValueError, match=re.escape(f"image_size must be an int or (H, W) ints, got {unordered!r}")):
            to_onnx(tiny, tmp_path / "x.onnx", image_size=unordered)  # type: ignore[arg-type]
    # NumPy's ints (an image's shape[:2]) are ints: as plain ints, not refused as "not ints"
    assert check_image_size(tiny, np.array([40, 56])[::-1]) == check_image_size(tiny, (56, 40)) == (56, 40)
    assert type(check_image_size(tiny, np.int64(48))[0]) is int
    with pytest.raises(ValueError, match="model must be a denseclip_fast.DenseCLIP"):
        to_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")  # type: ignore[arg-type]
    # a Segmenter (to_aoti takes one) is named with what to_onnx takes instead
    with pytest.raises(ValueError, match=re.escape("got Segmenter: pass the DenseCLIP model it was built from")):
        to_onnx(Segmenter(tiny, device="cpu", dtype=torch.float32), tmp_path / "x.onnx")  # type: ignore[arg-type]


def test_output_paths_are_checked_before_the_trace(tiny, tmp_path, monkeypatch):
    """A path where no file can be written (a directory, a parent that is a file) is a ValueError naming the
    argument before the trace (seconds to minutes), not an OSError after it."""

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before the path was checked")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"path {str(tmp_path / 'dir')!r} is a directory; expected the path of the"):
        to_onnx(tiny, tmp_path / "dir")
    with pytest.raises(ValueError, match=f"x.onnx': {str(tmp_path / 'file')!r} is not a directory"):
        to_onnx(tiny, tmp_path / "file" / "x.onnx")
    with pytest.raises(ValueError, match="path must be a non-empty str or os.PathLike, got NoneType"):
        to_onnx(tiny, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"engine_path {str(tmp_path / 'dir')!r} is a directory"):
        build_tensorrt_engine(tmp_path / "file", tmp_path / "dir")  # said before TensorRT is looked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def _full_disk(monkeypatch) -> None:
    """The disk fills up while a graph is written: onnx.save (which onnx_ir's save, torch's too, ends with, after
    any weights file) writes half of the graph and raises ENOSPC, as a write to a full disk does."""

    def save(proto, path, *args, **kwargs):
        data = proto.SerializeToString()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save", save)


def test_a_failed_write_keeps_the_previous_graph(tiny, tmp_path, monkeypatch):
    """A full disk while to_onnx writes: the graph at the path is kept as it was, no partial file is left and the
    error names the path. (It was written in place: the previous graph was left truncated, and the error was a bare
    "[Errno 28] No space left on device".)"""
    from denseclip_fast.cli import _os_error

    path = tmp_path / "prev.onnx"
    onnx.save(_relu_graph(), path)
    before = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        to_onnx(tiny, path, image_size=SIZE)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert _os_error(info.value) == f"{path}: cannot write the ONNX graph: No space left on device"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["prev.onnx"]


def _weighted(value: float):
    """A small onnx_ir model whose one initializer (512 bytes, all ``value``) is above onnx_ir's 256-byte threshold
    for external data."""
    from onnxscript import ir

    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.full((1, 128), value, dtype=np.float32), "w")
    proto = _graph([h.make_node("Add", ["x", "w"], ["y"])], [_tensor("x", shape=(1, 128))],
                   [_tensor("y", shape=(1, 128))], [weight])  # fmt: skip
    return ir.serde.deserialize_model(proto)


def _weight_read(path) -> float:
    """The initializer's value as the graph at ``path`` refers to it (from its weights file, if it has one)."""
    (weight,) = onnx.load(str(path)).graph.initializer
    return float(onnx.numpy_helper.to_array(weight)[0, 0])


def test_weights_beside_the_graph_are_replaced_with_it(tmp_path, monkeypatch):
    """Weights above EXTERNAL_DATA_THRESHOLD (1.5 GiB: custom architectures) go to a file beside the graph, named
    anew each time, so that the graph there keeps its own weights until the new graph replaces it: a failed write
    leaves both as they were; a successful one removes the replaced graph's weights file (also ONNXProgram.save's
    NAME.data), never a file named otherwise, which other graphs may share."""
    from onnxscript import ir

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    path = tmp_path / "m.onnx"

    def data_files() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".data"))

    save_onnx(_weighted(1.0), path)
    (first,) = data_files()
    assert first.startswith("m.onnx.") and _weight_read(path) == 1.0
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].external_data[0].value == first
    save_onnx(_weighted(2.0), path)
    (second,) = data_files()
    assert second != first and _weight_read(path) == 2.0
    with monkeypatch.context() as patch:
        _full_disk(patch)
        with pytest.raises(OSError, match="cannot write the ONNX graph: No space left on device"):
            save_onnx(_weighted(3.0), path)
    assert data_files() == [second] and _weight_read(path) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", second]
    # a graph whose weights ONNXProgram.save wrote (NAME.data), then one sharing a file named otherwise
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 2**40)
    for location, kept in (("m.onnx.data", []), ("shared.data", ["shared.data"])):
        for name in data_files():
            os.remove(tmp_path / name)
        proto = ir.serde.serialize_model(_weighted(3.0))
        onnx.save(proto, str(path), save_as_external_data=True, location=location, size_threshold=0)
        assert data_files() == [location] and _weight_read(path) == 3.0
        save_onnx(_weighted(4.0), path)  # below the threshold: one file
        assert data_files() == kept and _weight_read(path) == 4.0


def test_a_symlinked_graph_has_its_weights_beside_its_target(tmp_path, monkeypatch):
    """Through a symlink the graph it points to is replaced: the weights file goes beside that graph, and the replaced
    graph's weights file there is removed, also after a failed write (they were looked for beside the link). ONNX
    looks for weights files beside the path it is given: such a graph is read by its target's path."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    (tmp_path / "models").mkdir()
    (tmp_path / "links").mkdir()
    target, link = tmp_path / "models" / "m.onnx", tmp_path / "links" / "current.onnx"

    def files(folder: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / folder).iterdir())

    save_onnx(_weighted(1.0), target)
    os.symlink(target, link)
    for value in (2.0, 3.0):
        save_onnx(_weighted(value), link)
        assert link.is_symlink() and _weight_read(target) == value
        assert files("links") == ["current.onnx"] and len(files("models")) == 2
    with monkeypatch.context() as patch:
        _full_disk(patch)
        with pytest.raises(OSError, match="cannot write the ONNX graph") as failure:
            save_onnx(_weighted(4.0), link)
    assert failure.value.filename == str(link)  # the path as given
    assert files("links") == ["current.onnx"] and len(files("models")) == 2 and _weight_read(target) == 3.0
    with pytest.raises(Exception, match=r"\.data"):  # by the link's path the weights file is looked for in links/
        _weight_read(link)
    assert graph_file(link) == str(target) and _weight_read(graph_file(link)) == 3.0
    assert graph_file(target) == str(target)
    with pytest.raises(ValueError, match=r"^path must be a non-empty str or os.PathLike, got NoneType: None$"):
        graph_file(None)


def test_to_onnx_checks_onnxscript_before_any_work(monkeypatch, tmp_path):
    """(check_onnx_export itself: tests/test_packaging.py, which runs without the export extra)"""
    monkeypatch.setattr(onnx_export, "_installed", lambda name: "0.6.2" if name == "onnxscript" else "1.23.1")
    with pytest.raises(ImportError, match=re.escape("needs onnxscript >= 0.7, and this environment has 0.6.2: pip")):
        to_onnx(DenseCLIP(tiny_config(), NAMES), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_files_that_are_not_onnx_models_are_named(tmp_path):
    """protobuf reads most other files as a bare DecodeError, and an empty one as an empty model."""
    (tmp_path / "notes.txt").write_text("some text, not a graph")
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("notes.txt", "empty.onnx"):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=f"model {path!r} is not an ONNX model"):
            tensorrt_problems(path)
        with pytest.raises(ValueError, match=f"path {path!r} is not an ONNX model"):
            read_metadata(path)
    # a folder or a missing file: was a bare IsADirectoryError / FileNotFoundError
    with pytest.raises(ValueError, match=f"path {str(tmp_path)!r} is not a regular file; expected an ONNX file"):
        read_metadata(tmp_path)
    missing = str(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match=f"model {missing!r} does not exist; expected an ONNX file"):
        tensorrt_problems(missing)


def test_tensorrt_builder_without_tensorrt(tmp_path):
    pytest.importorskip("denseclip_fast")
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    onnx_file = tmp_path / "m.onnx"
    onnx.save(_relu_graph(), onnx_file)
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_tensorrt_engine(onnx_file, tmp_path / "m.engine")
    with pytest.raises(ValueError, match="onnx_path '.*missing.onnx' does not exist; expected an ONNX file"):
        build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "m.engine")
    with pytest.raises(ValueError, match="onnx_path '.*' is not a regular file; expected an ONNX file"):
        build_tensorrt_engine(tmp_path, tmp_path / "m.engine")
    with pytest.raises(ValueError, match="batch must be"):
        build_tensorrt_engine(onnx_file, tmp_path / "m.engine", batch=(4, 1, 8))


def _stand_in_tensorrt(monkeypatch, inputs=()):
    """A tensorrt module whose network has ``inputs`` ((name, shape) pairs) and whose builder returns bytes."""
    trt = mock.MagicMock()
    network = trt.Builder.return_value.create_network.return_value
    network.num_layers, network.num_inputs = 0, len(inputs)
    tensors = [mock.Mock(shape=shape) for _, shape in inputs]
    for tensor, (name, _) in zip(tensors, inputs):
        tensor.name = name  # (Mock's own name argument names the mock)
    network.get_input.side_effect = tensors
    trt.Builder.return_value.build_serialized_network.return_value = b"engine"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_the_text_graphs_default_profile_covers_its_vocabulary(tmp_path, monkeypatch):
    """The text graph's dynamic dimension is the class count: the default profile (1, 1, 16) stopped an engine built
    for a 150-class checkpoint at 16 of its own names. It is (1, K, max(K, 16)) now; the image graphs keep
    (1, 1, 16), and a profile given is checked (type and order) before TensorRT is looked for."""
    graph = _relu_graph()
    for kind, classes, expected in (("text", 150, (1, 150, 150)), ("text", 4, (1, 4, 16)), ("image", 150, (1, 1, 16))):
        graph.metadata_props.clear()
        onnx.helper.set_model_props(graph, {"denseclip_fast.graph": kind,
                                            "denseclip_fast.class_names": json.dumps(["c"] * classes)})  # fmt: skip
        onnx.save(graph, tmp_path / "m.onnx")
        shape = [-1, 5] if kind == "text" else [-1, 3, 64, 64]
        trt = _stand_in_tensorrt(monkeypatch, [("x", shape)])
        build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
        profile = trt.Builder.return_value.create_optimization_profile.return_value
        profile.set_shape.assert_called_once_with("x", *([b, *shape[1:]] for b in expected))
    for batch in (5, (4, 1, 8), (1.0, 2, 3), (1, 2), (0, 1, 1)):
        with pytest.raises(ValueError, match=rf"^batch must be \(min, opt, max\) ints .*got {re.escape(repr(batch))}$"):
            build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", batch=batch)
    for workspace in (-1, 0, float("nan"), "2", True, np.bool_(True), np.float64("inf")):
        with pytest.raises(ValueError, match=r"^workspace_gib must be a positive number of GiB"):
            build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", workspace_gib=workspace)
    # the paths and switches are checked as the other exporters' (None was a TypeError, '' read as the folder '.',
    # fp16="no" turned float16 on)
    for path in (None, b"m.onnx", 3, ""):
        with pytest.raises(ValueError, match=r"^onnx_path must be a non-empty str or os.PathLike, got "):
            build_tensorrt_engine(path, tmp_path / "m.engine")  # type: ignore[arg-type]
    for switch in ("fp16", "bf16"):
        with pytest.raises(ValueError, match=rf"^{switch} must be True or False, got 'no'$"):
            build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", **{switch: "no"})  # type: ignore[arg-type]
        trt = _stand_in_tensorrt(monkeypatch, [("x", [-1, 3, 64, 64])])  # a numpy bool is the bool it stands for
        build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", **{switch: np.True_})
        config = trt.Builder.return_value.create_builder_config.return_value
        config.set_flag.assert_any_call(getattr(trt.BuilderFlag, switch.upper()))


def test_a_weakly_typed_build_pins_the_reductions_and_the_squares_they_take(tmp_path, monkeypatch):
    """A float32 graph built with fp16: reductions, softmax and normalisations are pinned to float32, and so is the
    elementwise square that onnx-tensorrt makes of a ReduceL2 (x * x -> Reduce SUM -> sqrt), which overflowed
    float16 past 256 (a review's finding: the score became 0). Other layers, and integer reductions, are left to
    TensorRT. A stand-in network: TensorRT cannot be installed here."""
    from types import SimpleNamespace

    trt = _stand_in_tensorrt(monkeypatch)
    kinds = SimpleNamespace(ELEMENTWISE="elementwise", REDUCE="reduce", SOFTMAX="softmax", UNARY="unary",
                            NORMALIZATION="normalization", MATRIX_MULTIPLY="matmul", SHUFFLE="shuffle")  # fmt: skip
    trt.LayerType, trt.float32, trt.float16, trt.int32, trt.bfloat16 = kinds, "f32", "f16", "i32", "bf16"

    class Layer:
        def __init__(self, kind, inputs, dtype="f32"):
            self.type, self.inputs = kind, inputs
            self.outputs = [SimpleNamespace(name=f"t{len(layers)}", dtype=dtype)]
            self.num_inputs, self.num_outputs, self.precision, self.set_to = len(inputs), 1, None, {}

        def get_input(self, j):
            return self.inputs[j]

        def get_output(self, j):
            return self.outputs[j]

        def set_output_type(self, j, dtype):
            self.set_to[j] = dtype

    x = SimpleNamespace(name="image", dtype="f32")
    layers = []
    for kind, inputs, dtype in (("elementwise", [x, x], "f32"), ("reduce", [0], "f32"), ("unary", [1], "f32"),
                                ("matmul", [x, x], "f32"), ("elementwise", [3], "f32"), ("softmax", [4], "f32"),
                                ("elementwise", [2, 5], "f32"), ("normalization", [6], "f32"),
                                ("shuffle", [x], "i32"), ("reduce", [8], "i32")):  # fmt: skip
        layers.append(Layer(kind, [t if not isinstance(t, int) else layers[t].outputs[0] for t in inputs], dtype))
    network = trt.Builder.return_value.create_network.return_value
    network.num_layers, network.get_layer.side_effect = len(layers), lambda i: layers[i]
    onnx.save(_relu_graph(), tmp_path / "m.onnx")
    build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", fp16=True)
    pinned = [i for i, layer in enumerate(layers) if layer.precision == "f32"]
    assert pinned == [0, 1, 5, 7]  # the square, its reduction, the softmax, the normalisation
    assert all(layers[i].set_to == {0: "f32"} for i in pinned)
    assert all(layer.set_to == {} for i, layer in enumerate(layers) if i not in pinned)
    config = trt.Builder.return_value.create_builder_config.return_value
    config.set_flag.assert_any_call(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    config.set_flag.assert_any_call(trt.BuilderFlag.FP16)
    config.reset_mock()
    for layer in layers:
        layer.precision, layer.set_to = None, {}
    build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine")  # by default, as the CLI: float32 layers
    config.set_flag.assert_not_called()
    assert all(layer.precision is None and layer.set_to == {} for layer in layers)


def test_a_tensorrt_that_does_not_import_is_not_called_missing(tmp_path, monkeypatch):
    """An installed tensorrt whose libraries do not load (libnvinfer missing or of another version) was reported as
    'TensorRT is not installed: pip install tensorrt'; the import's own error is said now."""
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    onnx.save(_relu_graph(), tmp_path / "m.onnx")
    message = (r"^TensorRT is installed but does not import \(ImportError: libnvinfer.so.10: cannot open shared "
               r"object file\): check that its libraries")  # fmt: skip
    with pytest.raises(TensorRTUnavailable, match=message):
        build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


def test_onnx_export_arguments_it_cannot_use_are_refused(tiny, tmp_path):
    """image_size with the text graph was accepted and ignored (a bad one refused, for an option that does nothing);
    a float image_size was a bare TypeError; a path ending in a separator was written as a file of the folder's name
    ("new/" as "new", "m.onnx/" over m.onnx); a device or FIFO at the path put the weights file beside it, in /dev,
    and failed reading the graph back."""
    with pytest.raises(ValueError, match=r"^image_size applies to the image graphs .*got image_size=\(64, 96\)$"):
        to_onnx(tiny, tmp_path / "t.onnx", graph="text", image_size=(64, 96))
    with pytest.raises(ValueError, match=r"^image_size must be an int or \(H, W\) ints, got 64.0$"):
        to_onnx(tiny, tmp_path / "m.onnx", image_size=64.0)
    (tmp_path / "m.onnx").write_bytes(b"kept")
    for out in ("new/", "m.onnx/"):
        with pytest.raises(ValueError, match=rf"^path '.*{re.escape(out)}' ends in a path separator"):
            to_onnx(tiny, f"{tmp_path}/{out}", graph="text")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # were the FIFO not refused, writing it would wait for a reader forever: one opens it after 60 s, so that the
    # write fails (a broken pipe) and the test with it, where it hung
    unblock = threading.Timer(60, lambda: os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)))
    unblock.start()
    try:
        with pytest.raises(ValueError, match=r"^path '.*fifo' is not a regular file: an ONNX graph is written as a "):
            to_onnx(tiny, fifo, graph="text")
    finally:
        unblock.cancel()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "m.onnx"]
    # an image graph's trace input leaves the caller's random numbers as they were (torch.randn drew from them)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    to_onnx(tiny, tmp_path / "image.onnx", image_size=64)
    assert torch.equal(torch.get_rng_state(), state)
    assert (tmp_path / "m.onnx").read_bytes() == b"kept"


class _FullDisk(io.FileIO):
    """A file on a disk that fills up: a write stores half of its bytes, then raises ENOSPC."""

    def write(self, data) -> int:
        super().write(bytes(data)[: len(bytes(data)) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_engine_write_keeps_the_previous_engine(tmp_path, monkeypatch):
    """build_tensorrt_engine writes the engine through export.graphs.write_file (replaced atomically): a full disk
    keeps the engine at the path as it was and names the path. (It wrote in place with Path.write_bytes.) TensorRT
    cannot be installed here: a stand-in module whose builder returns a fake serialized engine (bytes; TensorRT's
    IHostMemory is a buffer too)."""
    from denseclip_fast.export import graphs

    trt = _stand_in_tensorrt(monkeypatch)
    trt.Builder.return_value.build_serialized_network.return_value = b"serialized engine " * 100
    graph, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    onnx.save(_relu_graph(), graph)
    engine.write_bytes(b"the previous engine")
    with monkeypatch.context() as patch:
        patch.setattr(graphs, "open", _FullDisk, raising=False)
        with pytest.raises(OSError) as info:
            build_tensorrt_engine(graph, engine)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(engine)
    assert "cannot write the TensorRT engine: No space left on device" in str(info.value)
    assert engine.read_bytes() == b"the previous engine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.onnx"]
    assert build_tensorrt_engine(graph, engine) == engine  # the disk has room again
    assert engine.read_bytes() == b"serialized engine " * 100


def test_the_triton_operators_translate_to_standard_onnx():
    """A graph traced with the Triton backend (forced, or the default on a GPU) holds the Triton operators, whose
    score forms also return the pixel norms (for their backward): the translation gives the same standard nodes and
    values as for the C++ operators, the norms left out of the graph."""
    from denseclip_fast import ops
    from denseclip_fast.export.onnx_ops import translation_table

    if ops.backends.triton_available() is not None:
        pytest.skip(ops.backends.triton_available())

    class Scores(torch.nn.Module):
        def forward(self, feature, visual, text):
            return (ops.score_concat(feature, visual, text, 2.0, backend="triton"),
                    ops.pixel_text_score(visual, text, 0.5, backend="triton"))  # fmt: skip

    args = (torch.randn(2, 3, 5, 7), torch.randn(2, 16, 5, 7), torch.randn(6, 16))
    program = torch.onnx.export(Scores().eval(), args, dynamo=True, custom_translation_table=translation_table(),
                                opset_version=18)  # fmt: skip
    graph = program.model_proto
    assert {node.op_type for node in graph.graph.node} <= set(supported_operators()["operators"])
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert len(graph.graph.output) == 2  # the norms are not outputs
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {i.name: a.numpy() for i, a in zip(graph.graph.input, args)})
    with torch.no_grad():
        expected = (ops.score_concat(*args, 2.0, backend="reference"),
                    ops.pixel_text_score(*args[1:], 0.5, backend="reference"))  # fmt: skip
    for actual, wanted in zip(outputs, expected):
        assert rel_err(torch.from_numpy(actual), wanted) < 1e-6


def test_float16_graphs_compute_the_fused_operators_in_float32():
    """A float16 graph's fused operators compute in float32, as the kernels do: 1024 channels of about 10 sum to
    1e5 squares, and queries and keys of about 32 over 64 channels have products near 65536, past float16's 65504.
    The scores and the attention come out finite and as the float64 reference says, to float16's precision."""
    from denseclip_fast import ops
    from denseclip_fast.export.onnx_ops import translation_table

    backend = "cpu" if ops.extension_available() else "triton"
    if backend == "triton" and ops.backends.triton_available() is not None:
        pytest.skip("neither the C++ extension nor Triton: no fused operator to trace")

    class Fused(torch.nn.Module):
        def forward(self, visual, text, q, k, v):
            return (ops.pixel_text_score(visual, text, 3.0, backend=backend),
                    ops.context_attention(q, k, v, backend=backend))  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    visual = 10 * torch.randn(2, 1024, 3, 5, generator=gen, dtype=torch.float64)
    text = 10 * torch.randn(7, 1024, generator=gen, dtype=torch.float64)
    q, k = (32 + torch.randn(1, 2, n, 64, generator=gen, dtype=torch.float64) for n in (5, 9))
    v = torch.randn(1, 2, 9, 64, generator=gen, dtype=torch.float64)
    args = tuple(a.half() for a in (visual, text, q, k, v))
    assert torch.isinf((visual.half().float() ** 2).sum(1).half()).all()  # the sums float16 cannot hold
    assert torch.isinf((q.half().float() @ k.half().float().transpose(2, 3)).half()).any()
    program = torch.onnx.export(Fused().eval(), args, dynamo=True, custom_translation_table=translation_table(),
                                opset_version=18)  # fmt: skip
    graph = program.model_proto
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, attended = session.run(None, {i.name: a.numpy() for i, a in zip(graph.graph.input, args)})
    assert scores.dtype == attended.dtype == np.float16
    rounded = [a.double() for a in args]  # the float16 inputs, exactly
    expected = (ops.reference.pixel_text_score(*rounded[:2], 3.0),
                torch.nn.functional.scaled_dot_product_attention(*rounded[2:]))  # fmt: skip
    for actual, wanted in zip((scores, attended), expected):
        actual = torch.from_numpy(actual)
        assert torch.isfinite(actual).all() and rel_err(actual, wanted) < 2e-3, rel_err(actual, wanted)


def test_exports_in_two_threads_take_turns_and_leave_stdout_as_it_was(tiny, tmp_path, monkeypatch):
    """to_onnx swaps sys.stdout (and the warnings filters) while torch.onnx.export runs, process-wide. Two exports in
    two threads left them swapped for good: the first to end restored the real stdout, the last restored the
    first's buffer, and every later print of the process went into it. They take turns now (export.graphs's
    EXPORT_LOCK). The exporter here is a stand-in that fails, after the first waits for the second to come in."""
    import threading

    entered = [threading.Event(), threading.Event()]
    release_second = threading.Event()
    calls: list[int] = []

    def exporter(*args, **kwargs):
        n = len(calls)
        calls.append(n)
        entered[n].set()
        if n == 0:  # the second comes in meanwhile unless the exports take turns
            entered[1].wait(timeout=1.0)
        else:  # ends after the first has
            release_second.wait(timeout=5.0)
        raise RuntimeError("stand-in exporter")

    monkeypatch.setattr(torch.onnx, "export", exporter)
    stdout, filters = sys.stdout, list(warnings.filters)
    errors: list[BaseException] = []

    def export(name: str) -> None:
        try:
            to_onnx(tiny, tmp_path / name, image_size=SIZE)
        except RuntimeError as exc:
            errors.append(exc)

    first = threading.Thread(target=export, args=("a.onnx",))
    first.start()
    assert entered[0].wait(timeout=60)
    second = threading.Thread(target=export, args=("b.onnx",))
    second.start()
    first.join(timeout=60)
    release_second.set()
    second.join(timeout=60)
    assert [str(e) for e in errors] == ["stand-in exporter"] * 2
    assert sys.stdout is stdout and warnings.filters == filters


def _stand_in_exporter(monkeypatch, opset: int = 18, say: str = "") -> list[dict]:
    """torch.onnx.export replaced by one that prints ``say`` (as the exporter's progress lines) and returns a program
    whose model is a small onnx_ir graph (_weighted) claiming ``opset``; the keyword arguments of each call are
    returned in the list."""
    calls: list[dict] = []

    def export(module, args, **kwargs):
        calls.append(kwargs)
        if say:
            print(say)
        model = _weighted(1.0)
        model.opset_imports[""] = opset
        return SimpleNamespace(model=model)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def test_a_bf16_dtype_string_gets_the_bfloat16_hint(tiny, tmp_path):
    """'bf16' (the CLI's spelling, which to_onnx's check lists with 'bfloat16') gets the same TensorRT advice."""
    with pytest.raises(ValueError, match=r"got the string 'bf16' \(for bfloat16, build a TensorRT engine with bf16="):
        to_onnx(tiny, tmp_path / "x.onnx", dtype="bf16")


def test_any_image_size_given_with_the_text_graph_is_refused(tiny, tmp_path):
    """image_size=0 or () with the text graph is an image_size given (only None is none), refused as (64, 96) is."""
    for size in (0, ()):
        message = rf"^image_size applies to the image graphs .*got image_size={re.escape(repr(size))}$"
        with pytest.raises(ValueError, match=message):
            to_onnx(tiny, tmp_path / "t.onnx", graph="text", image_size=size)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_of_another_opset_than_requested_is_refused_and_not_written(tiny, tmp_path, monkeypatch):
    _stand_in_exporter(monkeypatch, opset=19)
    with pytest.raises(ValueError, match=r"^the exporter wrote opset 19, not the requested 18$"):
        to_onnx(tiny, tmp_path / "m.onnx", graph="text")
    assert list(tmp_path.iterdir()) == []


def test_the_exporters_progress_lines_are_not_printed(tiny, tmp_path, monkeypatch, capsys):
    calls = _stand_in_exporter(monkeypatch, say="[torch.onnx] Obtain model graph ... done")
    to_onnx(tiny, tmp_path / "m.onnx", graph="text", check_tensorrt=False)
    assert len(calls) == 1 and capsys.readouterr().out == ""
    print("after the export")  # stdout is the real one again
    assert capsys.readouterr().out == "after the export\n"


def test_nodes_outside_tensorrts_list_are_warned_about_ten_at_most(tiny, tmp_path, monkeypatch):
    from denseclip_fast.export import tensorrt as tensorrt_export

    _stand_in_exporter(monkeypatch)
    problems = [f"problem {i}" for i in range(12)]
    monkeypatch.setattr(tensorrt_export, "tensorrt_problems", lambda path: problems)
    path = tmp_path / "m.onnx"
    listed = "; ".join(problems[:10])
    with pytest.warns(UserWarning, match=re.escape(f"{path}: 12 node(s) outside TensorRT's ONNX operator list: "
                                                   f"{listed}") + "$"):  # fmt: skip
        to_onnx(tiny, path, graph="text")
    assert path.is_file()


def test_a_float16_text_graph_names_its_input_and_output_and_is_a_text_graph(tiny, tmp_path):
    """The text graph in float16: its input and output are named as the README says (class_tokens ->
    class_embeddings), its output is float16 and equals the model's embeddings to float16's precision, and its
    metadata says it is a text graph (build_tensorrt_engine's default profile reads it) of embed_dim columns."""
    path = to_onnx(tiny, tmp_path / "text16.onnx", graph="text", dtype=torch.float16)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["class_tokens"]
    assert [o.name for o in session.get_outputs()] == ["class_embeddings"]
    assert session.get_outputs()[0].type == "tensor(float16)"
    meta = read_metadata(path)
    assert meta["graph"] == "text" and meta["dtype"] == "float16"
    assert meta["embed_dim"] == str(tiny.config.embed_dim) == "48"
    assert meta["class_token_length"] == str(tiny.config.text.class_token_length)
    assert "image_size" not in meta and "slide_stride" not in meta
    names = ["sky", "a dog", "tree"]
    tokens = tokenize_class_names(names, int(meta["class_token_length"]))
    (out,) = session.run(None, {"class_tokens": tokens.numpy()})
    assert out.dtype == np.float16 and out.shape == (3, 48)
    with torch.no_grad():
        assert rel_err(torch.from_numpy(out).float(), tiny.text_features(names)) <= 2e-2


def test_an_image_graph_names_its_output_logits(tiny, tmp_path):
    path = to_onnx(tiny, tmp_path / "small.onnx", image_size=32, check_tensorrt=False)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    meta = read_metadata(path)
    assert meta["graph"] == "image" and meta["embed_dim"] == "48" and json.loads(meta["image_size"]) == [32, 32]


def test_weights_of_exactly_the_threshold_stay_in_the_graph(tmp_path, monkeypatch):
    """EXTERNAL_DATA_THRESHOLD is the most weights a graph holds itself: 512 bytes at 512 stay inside, at 511 go to
    a file beside it."""
    path = tmp_path / "m.onnx"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 512)
    save_onnx(_weighted(1.0), path)
    assert os.listdir(tmp_path) == ["m.onnx"] and _weight_read(path) == 1.0
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 511)
    save_onnx(_weighted(2.0), path)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".data")]) == 1 and _weight_read(path) == 2.0


def test_a_replaced_weights_file_that_cannot_be_removed_is_warned_about(tmp_path, monkeypatch):
    """The new graph is in place when the replaced graph's weights file is removed: a file that cannot be removed is
    a warning naming it (the graph written), one already gone is nothing to say."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    path = tmp_path / "m.onnx"
    save_onnx(_weighted(1.0), path)
    (first,) = [n for n in os.listdir(tmp_path) if n.endswith(".data")]
    remove = os.remove

    def refused(name, *args, **kwargs):  # the replaced graph's file only (onnx_ir removes its own files too)
        if os.path.basename(name) == first:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        return remove(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "remove", refused)
        with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / first}: the replaced graph's weights file could "
                                                       "not be removed (Permission denied)")):  # fmt: skip
            save_onnx(_weighted(2.0), path)
    assert _weight_read(path) == 2.0 and first in os.listdir(tmp_path)  # the orphan left, as said
    (second,) = [n for n in os.listdir(tmp_path) if n.endswith(".data") and n != first]

    def gone(name, *args, **kwargs):
        if os.path.basename(name) == second:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(name))
        return remove(name, *args, **kwargs)

    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("error")
        patch.setattr(os, "remove", gone)
        save_onnx(_weighted(3.0), path)  # the weights file another process removed meanwhile: no warning
    assert _weight_read(path) == 3.0 and second in os.listdir(tmp_path)  # (the stand-in removed nothing)


def test_a_file_that_is_not_an_onnx_graph_is_replaced_and_the_files_beside_it_kept(tmp_path):
    """A non-graph at the path refers to no weights file: it is replaced, and a NAME.<x>.data beside it (not the
    replaced file's, then) is left alone."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"some text, not a graph")
    (tmp_path / "m.onnx.0123abcd.data").write_bytes(b"another graph's weights")
    save_onnx(_weighted(1.0), path)
    assert _weight_read(path) == 1.0
    assert (tmp_path / "m.onnx.0123abcd.data").read_bytes() == b"another graph's weights"


def test_metadata_is_read_through_a_link_without_the_weights_and_only_denseclip_fasts(tmp_path, monkeypatch):
    """read_metadata reads the graph alone (its weights file, beside the link's target, is not looked for beside
    the link) and returns the denseclip_fast.* properties only, without their prefix."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    (tmp_path / "models").mkdir()
    model = _weighted(1.0)
    model.metadata_props.update({"denseclip_fast.graph": "text", "producer_note": "not ours"})
    save_onnx(model, tmp_path / "models" / "m.onnx")
    os.symlink(tmp_path / "models" / "m.onnx", tmp_path / "link.onnx")
    assert read_metadata(tmp_path / "link.onnx") == {"graph": "text"}


def test_a_protobuf_without_an_ir_version_is_not_an_onnx_model(tmp_path):
    """Bytes that parse as a ModelProto with a graph but no IR version (no ONNX writer makes one) are refused too."""
    proto = onnx.ModelProto()
    proto.graph.name = "g"
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"m.onnx' is not an ONNX model \(not a serialized onnx.ModelProto\)$"):
        read_metadata(tmp_path / "m.onnx")


def test_image_size_bounds_are_inclusive(tiny):
    """32 (MIN_IMAGE_SIDE) and 8192 (MAX_EXPORT_SIDE) are sizes a graph may have; one less and one more are not."""
    assert check_image_size(tiny, 32) == (32, 32)
    assert check_image_size(tiny, (32, 8192)) == (32, 8192) and check_image_size(tiny, (8192, 32)) == (8192, 32)
    for bad in ((31, 64), (64, 31), (8193, 64), (64, 8193)):
        with pytest.raises(ValueError, match=re.escape(f"image_size must be 32 to 8192 on each side, got {bad}")):
            check_image_size(tiny, bad)


def test_a_graph_one_side_of_which_is_the_crop_records_two_thirds_strides():
    """The model's stride is for its crop x crop window only: a 512 x 640 graph of a 512-crop model records two
    thirds of each side (the official 341 of 512, 426 of 640), as to_aoti."""
    assert default_window_stride((512, 640), 512, 300) == (341, 426)
    assert default_window_stride((640, 512), 512, 300) == (426, 341)
    assert default_window_stride((512, 512), 512, 300) == (300, 300)


def test_tensorrt_check_reads_types_attributes_and_opsets_it_was_given():
    """Each rule of the check on a one-node graph: a float16 input is FP16 (in the tables' types), an initializer's
    type is known (a UINT64 weight), constants TensorRT cannot hold, Resize's attributes beyond its mode, omitted
    optional inputs and outputs, and a graph past the table's opsets, which is checked at the highest opset the
    table knows (ReduceL2's axes an input there: still one that must be an initializer)."""
    h = onnx.helper
    half = onnx.TensorProto.FLOAT16
    relu = _graph([h.make_node("Relu", ["x"], ["y"])], [_tensor("x", half)], [_tensor("y", half)])
    assert tensorrt_problems(relu) == []
    uint64 = onnx.numpy_helper.from_array(np.ones((1, 3, 8, 8), np.uint64), "w")
    problems = tensorrt_problems(_graph([h.make_node("Add", ["w", "w"], ["y"])], [],
                                        [_tensor("y", onnx.TensorProto.UINT64)], [uint64]))  # fmt: skip
    assert len(problems) == 1 and "input type UINT64 is not one of" in problems[0], problems
    sparse = h.make_sparse_tensor(onnx.numpy_helper.from_array(np.ones(1, np.float32), "v"),
                                  onnx.numpy_helper.from_array(np.zeros(1, np.int64), "i"), [4])  # fmt: skip
    for attribute, value in (("sparse_value", sparse), ("value_strings", [b"a", b"b"])):
        graph = _graph([h.make_node("Constant", [], ["c"], **{attribute: value})], [], [_tensor("c", shape=(4,))])
        assert tensorrt_problems(graph) == [f"Constant node '': attribute {attribute} is unsupported"]
    scales = [onnx.numpy_helper.from_array(np.ones(4, np.float32), "s")]
    for attrs, says in ((dict(coordinate_transformation_mode="tf_crop_and_resize"), "coordinate_transformation_mode"),
                        (dict(antialias=1), "antialiasing is unsupported"),
                        (dict(keep_aspect_ratio_policy="not_larger"), "keep_aspect_ratio_policy must be 'stretch'"),
                        (dict(coordinate_transformation_mode="asymmetric"), None)):  # fmt: skip
        graph = _graph([h.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest", **attrs)], [_tensor("x")],
                       [_tensor("y")], scales)  # fmt: skip
        problems = tensorrt_problems(graph)
        assert (problems == []) if says is None else (len(problems) == 1 and says in problems[0]), (attrs, problems)
    no_axes = _graph([h.make_node("ReduceL2", ["x", ""], ["y"])], [_tensor("x")], [_tensor("y", shape=())])
    assert tensorrt_problems(no_axes) == []  # an omitted optional input is no input to hold constant
    norm = _graph([h.make_node("LayerNormalization", ["x", "s"], ["y", "", ""], axis=-1)], [_tensor("x")],
                  [_tensor("y")], [onnx.numpy_helper.from_array(np.ones(8, np.float32), "s")])  # fmt: skip
    assert tensorrt_problems(norm) == []  # optional outputs named "" are not asked for
    late = _graph([h.make_node("ReduceL2", ["x", "axes"], ["y"])],
                  [_tensor("x"), _tensor("axes", onnx.TensorProto.INT64, (1,))], [_tensor("y")], opset=21)
    problems = tensorrt_problems(late)
    assert len(problems) == 2 and "opset 21 is outside TensorRT's range 9..20" in problems[0], problems
    assert "input 1 ('axes') must be an initializer" in problems[1]


def test_tensorrt_profiles_that_are_not_what_they_look_like():
    """default_batch for a graph without class names (0 classes) is still a valid profile (min <= opt); a bool is
    not a batch size, though True == 1."""
    from denseclip_fast.export.tensorrt import check_batch, default_batch

    assert default_batch("text", 0) == (1, 1, 16) == check_batch(default_batch("text", 0))
    assert default_batch("image", 0) == (1, 1, 16)
    for batch in ((1, True, 2), (True, True, True), (1, 1, False)):
        with pytest.raises(ValueError, match=r"^batch must be \(min, opt, max\) ints"):
            check_batch(batch)
    assert check_batch([1, 2, 3]) == (1, 2, 3)
    # numpy integers are ints, as the other exporters' arguments take them (a profile computed with numpy)
    for given in (np.array([1, 4, 8]), (np.int64(1), 4, np.int32(8))):
        batch = check_batch(given)
        assert batch == (1, 4, 8) and all(type(b) is int for b in batch), batch
    for batch in ((np.bool_(True), 1, 2), (1, np.float64(2), 3), np.array([1.0, 2.0, 3.0])):
        with pytest.raises(ValueError, match=r"^batch must be \(min, opt, max\) ints"):
            check_batch(batch)


def _engine_graph(tmp_path, dtype: str = "float32"):
    graph = _relu_graph()
    onnx.helper.set_model_props(graph, {"denseclip_fast.graph": "image", "denseclip_fast.dtype": dtype})
    onnx.save(graph, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


def test_a_float16_graph_is_built_strongly_typed_without_the_precision_flags(tmp_path, monkeypatch):
    """A float16 graph's network is created STRONGLY_TYPED, and --fp16/--bf16 (which the CLI passes for it) set no
    builder flag and pin no layer: TensorRT keeps the graph's types. A float32 graph is created without the flag."""
    graph = _engine_graph(tmp_path, "float16")
    trt = _stand_in_tensorrt(monkeypatch, [("image", [-1, 3, 64, 64])])
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 3
    network = trt.Builder.return_value.create_network.return_value
    network.num_layers = 1
    network.get_layer.side_effect = AssertionError("a layer looked at for pinning")
    build_tensorrt_engine(graph, tmp_path / "m.engine", fp16=True, bf16=True)
    trt.Builder.return_value.create_network.assert_called_once_with(1 << 3)
    trt.Builder.return_value.create_builder_config.return_value.set_flag.assert_not_called()
    graph = _engine_graph(tmp_path, "float32")
    trt = _stand_in_tensorrt(monkeypatch, [("image", [-1, 3, 64, 64])])
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 3
    build_tensorrt_engine(graph, tmp_path / "m.engine")
    trt.Builder.return_value.create_network.assert_called_once_with(0)


def test_the_engine_builder_passes_what_tensorrt_needs_and_says_what_it_refused(tmp_path, monkeypatch):
    """The parser reads the link's target (the weights file is beside it); the workspace is in GiB; a static input
    adds no profile (TensorRT refuses an empty one), a dynamic one exactly one; dimensions dynamic beyond the batch,
    a build that returns None and a TensorRT without the FP16 flag are errors, no engine written; the engine path
    may not be the graph's, a link to it included."""
    (tmp_path / "models").mkdir()
    target = _engine_graph(tmp_path / "models")
    link = tmp_path / "link.onnx"
    os.symlink(target, link)
    engine = tmp_path / "m.engine"
    trt = _stand_in_tensorrt(monkeypatch, [("image", [-1, 3, 64, 64])])
    build_tensorrt_engine(link, engine, workspace_gib=np.float32(1.5))  # a numpy number is the number
    builder = trt.Builder.return_value
    trt.OnnxParser.return_value.parse_from_file.assert_called_once_with(str(target))
    config = builder.create_builder_config.return_value
    config.set_memory_pool_limit.assert_called_once_with(trt.MemoryPoolType.WORKSPACE, 3 * 2**29)
    config.add_optimization_profile.assert_called_once_with(builder.create_optimization_profile.return_value)
    trt = _stand_in_tensorrt(monkeypatch, [("image", [2, 3, 64, 64])])
    build_tensorrt_engine(target, engine)
    trt.Builder.return_value.create_builder_config.return_value.add_optimization_profile.assert_not_called()
    engine.unlink()
    _stand_in_tensorrt(monkeypatch, [("image", [-1, 3, -1, 64])])
    with pytest.raises(ValueError, match=r"^input 'image' has dynamic dimensions beyond the first: \[-1, 3, -1, 64\]$"):
        build_tensorrt_engine(target, engine)
    trt = _stand_in_tensorrt(monkeypatch, [("image", [-1, 3, 64, 64])])
    trt.Builder.return_value.build_serialized_network.return_value = None
    with pytest.raises(ValueError, match=r"^TensorRT could not build an engine from .*m.onnx \(see its log above\)$"):
        build_tensorrt_engine(target, engine)
    trt = _stand_in_tensorrt(monkeypatch, [("image", [-1, 3, 64, 64])])
    trt.BuilderFlag = SimpleNamespace(BF16="bf16", OBEY_PRECISION_CONSTRAINTS="obey")  # no FP16 (TensorRT 11?)
    with pytest.raises(ValueError, match=r"^this TensorRT has no BuilderFlag.FP16 \(weakly typed networks were"):
        build_tensorrt_engine(target, engine, fp16=True)
    assert not engine.exists()
    for same in (target, link):
        with pytest.raises(ValueError, match="^engine_path must differ from onnx_path$"):
            build_tensorrt_engine(target, same)
    assert [node.op_type for node in onnx.load(str(target)).graph.node] == ["Relu"]  # the graph as it was


def test_the_score_translation_clamps_small_norms_as_the_reference_does():
    """pixel_text_score divides by max(|v|, eps) (F.normalize's rule, ops/reference.py): a pixel whose features have
    a norm of eps / 2 is scaled up to a unit vector, not divided by |v| + eps (a third of the way there)."""
    from denseclip_fast import ops
    from denseclip_fast.export.onnx_ops import translation_table
    from denseclip_fast.ops.reference import NORM_EPS

    class Score(torch.nn.Module):
        def forward(self, visual, text):
            return ops.pixel_text_score(visual, text)

    visual = torch.randn(1, 8, 2, 3)
    visual[0, :, 0, 0] = 0
    visual[0, 0, 0, 0] = NORM_EPS / 2  # |v| = eps / 2
    text = torch.randn(5, 8)
    program = torch.onnx.export(Score().eval(), (visual, text), dynamo=True,
                                custom_translation_table=translation_table(), opset_version=18)  # fmt: skip
    graph = program.model_proto
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"visual": visual.numpy(), "text": text.numpy()})
    expected = ops.reference.pixel_text_score(visual.double(), text.double())
    # the small pixel's scores: half its unit vector's (v / eps), i.e. text[:, 0] / (2 |t|)
    assert torch.allclose(expected[0, :, 0, 0], (text[:, 0] / text.norm(dim=1) / 2).double(), atol=1e-6)
    assert rel_err(torch.from_numpy(out), expected) < 1e-5


def _branching(value: float):
    """An onnx.ModelProto whose only weights (512 bytes, all ``value``) are in a subgraph: an If node's branch."""
    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.full((1, 128), value, dtype=np.float32), "w")
    branch = h.make_graph([h.make_node("Identity", ["w"], ["z"])], "then", [], [_tensor("z", shape=(1, 128))],
                          initializer=[weight])  # fmt: skip
    other = h.make_graph([h.make_node("Identity", ["x"], ["z"])], "else", [], [_tensor("z", shape=(1, 128))])
    return _graph([h.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                  [_tensor("c", onnx.TensorProto.BOOL, ()), _tensor("x", shape=(1, 128))],
                  [_tensor("y", shape=(1, 128))])  # fmt: skip


def test_weights_inside_subgraphs_count_and_their_files_are_replaced_too(tmp_path, monkeypatch):
    """Weights in If/Loop/Scan bodies count towards EXTERNAL_DATA_THRESHOLD, and the replaced graph's weights file
    that only a subgraph refers to is removed with it."""
    from onnxscript import ir

    path = tmp_path / "m.onnx"
    onnx.save(_branching(1.0), str(path), save_as_external_data=True, location="m.onnx.old.data", size_threshold=0)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.old.data"]  # (onnx wrote the branch's weights there)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 511)
    save_onnx(ir.serde.deserialize_model(_branching(2.0)), path)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == "m.onnx" and names[1].endswith(".data") and names[1] != "m.onnx.old.data"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 2**40)
    save_onnx(ir.serde.deserialize_model(_branching(3.0)), path)
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_the_attention_translation_refuses_a_symbolic_head_dimension():
    """The softmax scale 1/sqrt(D) is a constant of the graph: a head dimension the exporter knows only by name is
    refused with what to do, before any node is made."""
    from onnxscript import ir

    from denseclip_fast.export.onnx_ops import context_attention

    for last in (ir.SymbolicDim("d"), None):
        q = ir.Value(name="q", shape=ir.Shape([1, 2, 5, last]))
        with pytest.raises(ValueError, match=r"^context_attention exports with a static head dimension, got q of"):
            context_attention(q, q, q)

"""Deployment: ONNX (for TensorRT and ONNX Runtime), TensorRT engines, AOTInductor packages.

    to_onnx(model, path, graph="image" | "image_with_text" | "text", image_size=None, dtype=torch.float32)
    graph_file(onnx_path)                              the path to open a graph by (a symlink's target, weights beside)
    tensorrt_problems(onnx_path)                       [] when every node is in TensorRT's ONNX operator list
    build_tensorrt_engine(onnx_path, engine_path, fp16=False, batch=None)    needs the tensorrt package
    to_aoti(model_or_segmenter, path, image_size=None)  a .pt2 package; load_aoti(path) runs it from Python

The onnx/onnxscript packages are needed for ONNX export (``pip install denseclip_fast[export]``); they are imported
when used.
"""

from .aoti import AOTIPackage, load_aoti, to_aoti
from .graphs import GRAPHS
from .onnx import ONNXExportUnavailable, check_onnx_export, graph_file, read_metadata, to_onnx
from .tensorrt import TensorRTUnavailable, build_tensorrt_engine, supported_operators, tensorrt_problems

__all__ = [
    "GRAPHS",
    "AOTIPackage",
    "ONNXExportUnavailable",
    "TensorRTUnavailable",
    "build_tensorrt_engine",
    "check_onnx_export",
    "graph_file",
    "load_aoti",
    "read_metadata",
    "supported_operators",
    "tensorrt_problems",
    "to_aoti",
    "to_onnx",
]

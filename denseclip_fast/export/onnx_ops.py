"""ONNX translations of denseclip_fast's fused operators, in standard ONNX operators only (opset 18).

torch.onnx's dynamo exporter calls these (``custom_translation_table``) for every ``torch.ops.denseclip_fast.*``
node, whatever backend produced it (C++, CUDA or Triton), so that TensorRT's ONNX parser and ONNX Runtime run the
graph without plugins. Each follows ``ops/reference.py`` and, as the kernels do, computes in float32 whatever the
graph's dtype (a float16 sum of 1024 squares overflows), casting the result back:

    pixel_text_score(v, t, s)    s * <v / max(|v|, eps), t / max(|t|, eps)> over C          -> (B, K, H, W)
    score_concat(f, v, t, s)     Concat([f, pixel_text_score(v, t, s)], axis=1)
    (the Triton operators also return the pixel norms |v|, the backward's, unused in a graph)
    context_attention(q, k, v)   Softmax(q k^T / sqrt(D)) v, and the row log-sum-exp (the backward's, unused here)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import opset18 as op

from ..ops.reference import NORM_EPS as EPS  # F.normalize's

FLOAT = 1  # onnx.TensorProto.FLOAT
# The type-var ignores below: onnxscript types op.Cast's result as a union of ONNX tensor types (its ``to`` is an
# int), and the constrained type variables of ReduceL2, MatMul and Transpose take one of those types, not a union


def _axes(*axes: int) -> Any:
    return op.Constant(value_ints=list(axes))


def _scalar(value: float) -> Any:
    return op.Constant(value_float=value)


def _l2_normalize(x: Any, axis: int) -> Any:
    norm = op.ReduceL2(x, _axes(axis), keepdims=1)
    return op.Div(x, op.Max(norm, _scalar(EPS)))


def pixel_text_score(visual: Any, text: Any, scale: float = 1.0) -> Any:
    v = _l2_normalize(op.Cast(visual, to=FLOAT), 1)  # (B, C, H, W)
    t = _l2_normalize(op.Cast(text, to=FLOAT), -1)  # (K, C) or (B, K, C)
    flat = op.Reshape(v, op.Concat(op.Shape(v, start=0, end=2), _axes(-1), axis=0))  # (B, C, HW)
    score = op.MatMul(t, flat)  # (B, K, HW), (K, C) broadcast over the batch
    out_shape = op.Concat(op.Shape(v, start=0, end=1), op.Shape(t, start=-2, end=-1), op.Shape(v, start=2, end=4),
                          axis=0)  # fmt: skip
    score = op.Reshape(score, out_shape)
    if scale != 1.0:
        score = op.Mul(score, _scalar(float(scale)))
    return op.CastLike(score, visual)


def score_concat(feature: Any, visual: Any, text: Any, scale: float = 1.0) -> Any:
    return op.Concat(feature, pixel_text_score(visual, text, scale), axis=1)


def _pixel_norms(visual: Any) -> Any:
    return op.ReduceL2(op.Cast(visual, to=FLOAT), _axes(1), keepdims=0)  # type: ignore[type-var]  # (B, H, W)


def pixel_text_score_with_norm(visual: Any, text: Any, scale: float = 1.0) -> tuple[Any, Any]:
    return pixel_text_score(visual, text, scale), _pixel_norms(visual)


def score_concat_with_norm(feature: Any, visual: Any, text: Any, scale: float = 1.0) -> tuple[Any, Any]:
    return score_concat(feature, visual, text, scale), _pixel_norms(visual)


def context_attention(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    head_dim = q.shape[-1] if q.shape is not None else None
    if not isinstance(head_dim, int):
        raise ValueError(f"context_attention exports with a static head dimension, got q of shape {q.shape}")
    qf, kf, vf = (op.Cast(t, to=FLOAT) for t in (q, k, v))
    # logits (B, h, Lq, Lk)
    logits = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), _scalar(head_dim**-0.5))  # type: ignore[type-var]
    out = op.MatMul(op.Softmax(logits, axis=-1), vf)
    lse = op.ReduceLogSumExp(logits, _axes(-1), keepdims=0)
    return op.CastLike(out, q), lse


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``{torch operator overload: translation}`` for every denseclip_fast operator that can appear in a graph."""
    from .. import ops
    from ..ops.library import returns_norm

    lib = torch.ops.denseclip_fast
    table: dict[Callable[..., Any], Callable[..., Any]] = {}
    suffixes = [""] if ops.extension_available() else []
    if ops.backends.triton_available() is None:
        suffixes.append("_triton")
    for suffix in suffixes:
        with_norm = returns_norm(suffix)
        score, concat = pixel_text_score, score_concat
        if with_norm:
            score, concat = pixel_text_score_with_norm, score_concat_with_norm
        table[getattr(lib, f"pixel_text_score{suffix}").default] = score
        table[getattr(lib, f"score_concat{suffix}").default] = concat
        table[getattr(lib, f"context_attention{suffix}").default] = context_attention
    return table

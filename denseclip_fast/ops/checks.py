"""Argument checks of the operators, shared by the Python wrappers (``denseclip_fast.ops``), the Triton operators
(``torch.ops.denseclip_fast.*_triton``, which callers may use directly and exported graphs contain) and the fake
kernels (so that tracing with wrong shapes fails as running would). Each raises ValueError naming the argument,
what it must be and what it is; the C++ operators check the same in csrc/registration.cpp (RuntimeError).
"""

from __future__ import annotations

import math
import numbers

import torch

from .backends import TRITON_HEAD_DIMS


def describe(x: object) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    """A float tensor of the operators' dtypes, dense (strided: a sparse or nested one met 'Could not run ... with
    arguments from the SparseCPU backend'; meta and fake tensors are dense, as tracing makes them)."""
    if t.dtype not in FLOAT_DTYPES:  # not the float8 types either
        raise ValueError(f"{name} must be a float32, float64, float16 or bfloat16 tensor, got dtype {t.dtype}")
    if t.layout != torch.strided or t.is_nested:
        what = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise ValueError(f"{name} must be a dense (strided) tensor, got {what} (.to_dense() makes one)")


def check_scale(scale: object) -> float:
    """The score's scale as a float: a finite real number. A tensor is refused, not read with float(): a learned
    scale would silently get no gradient (and a graph break under torch.compile); multiply the result instead."""
    if isinstance(scale, torch.Tensor):
        raise ValueError(
            "scale must be a Python number, got a tensor: the operators take a constant scale (no gradient); for a "
            "learned or tensor scale, multiply the result of scale=1 by it"
        )
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a real number, got {type(scale).__name__} {scale!r}")
    try:
        value = float(scale)
    except OverflowError:  # an int past float's range
        value = math.inf
    # comparisons, not math.isfinite: torch.compile traces a float argument whose value changes between calls as a
    # symbolic float, which comparisons take (as guards) and math.isfinite does not
    if value != value or abs(value) == math.inf:
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_score_inputs(visual: torch.Tensor, text: torch.Tensor) -> None:
    """visual (B, C, H, W) and text (K, C) or (B, K, C), K >= 1, of one float dtype and device."""
    if not isinstance(visual, torch.Tensor) or visual.dim() != 4:
        raise ValueError(f"visual must be a (B, C, H, W) tensor, got {describe(visual)}")
    if not isinstance(text, torch.Tensor) or text.dim() not in (2, 3):
        raise ValueError(f"text must be a (K, C) or (B, K, C) tensor, got {describe(text)}")
    check_float("visual", visual)
    check_float("text", text)
    if visual.dtype != text.dtype:
        raise ValueError(f"visual and text must have the same dtype, got {visual.dtype} and {text.dtype}")
    if visual.device != text.device:
        raise ValueError(f"visual and text must be on the same device, got {visual.device} and {text.device}")
    if text.shape[-1] != visual.shape[1]:
        raise ValueError(
            f"text has C={text.shape[-1]} channels but visual has C={visual.shape[1]} "
            f"(shapes {tuple(text.shape)} and {tuple(visual.shape)})"
        )
    if text.shape[-2] == 0:
        raise ValueError("text must hold at least one class embedding (K >= 1), got K=0")
    if text.dim() == 3 and text.shape[0] != visual.shape[0]:
        raise ValueError(f"per-batch text has B={text.shape[0]} but visual has B={visual.shape[0]}")


def check_concat_feature(feature: torch.Tensor, visual: torch.Tensor) -> None:
    """score_concat's feature: (B, C_feat, H, W) with visual's B, H, W, dtype and device."""
    if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
        raise ValueError(f"feature must be a (B, C_feat, H, W) tensor, got {describe(feature)}")
    check_float("feature", feature)
    if (feature.shape[0], *feature.shape[2:]) != (visual.shape[0], *visual.shape[2:]):
        raise ValueError(f"feature {tuple(feature.shape)} and visual {tuple(visual.shape)} must agree in B, H and W")
    if feature.dtype != visual.dtype or feature.device != visual.device:
        raise ValueError(
            f"feature must match visual's dtype and device ({visual.dtype}, {visual.device}), "
            f"got {feature.dtype} on {feature.device}"
        )


def check_like(
    t: object, shape: tuple[int, ...] | torch.Size, like: torch.Tensor, name: str, dtype: torch.dtype | None = None,
    what: str = "the forward's output",
) -> None:
    """A tensor a backward is handed (the forward's outputs, the gradient): ``shape``, ``like``'s device and
    ``dtype`` (default ``like``'s)."""
    dtype = like.dtype if dtype is None else dtype
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else describe(t)
        raise ValueError(f"{name} must be {what}, shape {tuple(shape)}, got {got}")
    if t.dtype != dtype or t.device != like.device:
        raise ValueError(f"{name} must be {what}, {dtype} on {like.device}, got {t.dtype} on {t.device}")


def check_score_backward_inputs(
    grad: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, score_map: torch.Tensor | None,
    norm: torch.Tensor | None,
) -> None:  # fmt: skip
    """pixel_text_score_backward's: the forward's inputs, grad (and the forward's map) (B, K, H, W) in visual's
    dtype and device, norm (B, H, W) in float32 (float64 for float64 visual)."""
    check_score_inputs(visual, text)
    b, _, h, w = visual.shape
    scores = (b, text.shape[-2], h, w)
    check_like(grad, scores, visual, "grad", what="the gradient of the (B, K, H, W) score")
    if score_map is not None:
        check_like(score_map, scores, visual, "score_map")
    if norm is not None:
        check_like(norm, (b, h, w), visual, "norm", torch.float64 if visual.dtype == torch.float64 else torch.float32)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, heads, Lq, D), k and v (B, heads, Lk, D), Lk >= 1, D >= 1, of one float dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, heads, L, D) tensor, got {describe(t)}")
        check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, heads and D")
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one token (Lk >= 1), got Lk=0")
    if q.shape[3] == 0:
        raise ValueError("the head dim D must be >= 1, got 0")


def check_attention_backward_inputs(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """context_attention_backward's: the forward's inputs, grad_out and out like q, lse (B, heads, Lq) float32
    (float64 for float64 q)."""
    check_attention_inputs(q, k, v)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if (not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype
                or t.device != q.device):  # fmt: skip
            raise ValueError(f"{name} must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got {describe(t)} "
                             f"{getattr(t, 'dtype', '')} on {getattr(t, 'device', '')}")  # fmt: skip
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:3] or lse.dtype != dtype or lse.device != q.device:
        raise ValueError(f"lse must be (B, heads, Lq) = {tuple(q.shape[:3])} {dtype} on {q.device} (the forward's "
                         f"log-sum-exp), got {describe(lse)} {getattr(lse, 'dtype', '')}")  # fmt: skip


def check_triton(op: str, t: torch.Tensor, head_dim: int = 0) -> None:
    """ValueError for what the Triton kernels do not take (float64; head dims other than the attention kernel's),
    for their operators called directly (torch.ops.denseclip_fast.<op>_triton): an interpreter error or a compiler
    message about block sizes would not say which argument is wrong. (The device is Triton's to refuse.)"""
    if t.dtype == torch.float64:
        raise ValueError(f"{op}_triton: the Triton kernels take float32, float16 and bfloat16, not float64")
    if op == "context_attention" and head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"{op}_triton: the Triton attention kernel takes head dims {TRITON_HEAD_DIMS}, "
                         f"got D={head_dim}")  # fmt: skip

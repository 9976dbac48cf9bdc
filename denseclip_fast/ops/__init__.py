"""denseclip_fast's operators: what DenseCLIP computes between the image encoder and the FPN, fused.

    pixel_text_score(visual, text, scale=1.0)          cosine score map (B, K, H, W)
    score_concat(feature, visual, text, scale=1.0)     cat([feature, score map], dim=1), without the intermediate
    context_attention(q, k, v)                         scaled_dot_product_attention without mask, flash-style

Each runs on one backend (``cuda``, ``triton``, ``cpu``, ``reference``; see :mod:`.backends`), chosen per call
from the device, the dtype and ``DENSECLIP_FAST_BACKEND`` or the ``backend=`` argument. All are differentiable. The
C++/CUDA and Triton implementations are ``torch.ops.denseclip_fast.*`` operators (with fake kernels and autograd),
so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them. ``reference.py`` is the specification.
Their autograd is reverse mode (backward kernels): under forward-mode AD (``torch.autograd.forward_ad``) and inside
``torch.func`` transforms (``jvp``, ``grad``, ``vmap``, ``jacrev`` ...) a call runs the reference, whichever backend
was asked for, since torch gave the fused operators' outputs no tangent there (silently zero) and refused them in
``torch.func``.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

from . import backends, reference
from .checks import check_attention_inputs, check_concat_feature, check_scale, check_score_inputs
from .extension import build_info, extension_available

if extension_available():
    from . import library  # noqa: F401  (fake kernels and autograd of the C++ operators)

__all__ = [
    "backends",
    "build_info",
    "context_attention",
    "extension_available",
    "pixel_text_score",
    "reference",
    "score_concat",
]


def eager_inference(*tensors: torch.Tensor) -> bool:
    """Whether a Triton call may launch its kernels without going through its ``torch.library`` operator (whose
    dispatch costs tens of microseconds of host time, more than the kernel at the model's shapes): no gradient to
    record, plain tensors, and nothing tracing or intercepting (torch.compile, torch.export, fake tensors, dispatch
    modes such as FlopCounterMode). The kernels and results are the same either way."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) is torch.Tensor for t in tensors)


def differentiated_by_transform(*tensors: torch.Tensor) -> bool:
    """Whether this call is inside a ``torch.func`` transform, or under forward-mode AD with a tangent on one of
    ``tensors``: then the reference computes it (see the module's docstring). Never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _triton_kernels():
    from . import triton as kernels  # imported by backends.resolve before any Triton call

    return kernels


def _in_score_layout(out: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The reference's result in the layout every other backend gives (score_memory_format: channels_last when
    visual is): torch.cat and einsum choose their own (an NCHW map where a channels_last feature met NCHW scores)."""
    from .library import score_memory_format

    return out.contiguous(memory_format=score_memory_format(visual))


def pixel_text_score(
    visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0, *, backend: str | None = None
) -> torch.Tensor:
    """Cosine score map, times ``scale``.

    Args:
        visual: (B, C, H, W) float32/float64/float16/bfloat16, contiguous or channels_last.
        text: (K, C) shared by the batch or (B, K, C), same dtype and device.
        scale: multiplies the cosine (1 for DenseCLIP's score map, 1/tau for its auxiliary logits).
    Returns:
        (B, K, H, W) in visual's dtype, channels_last when visual is. Both inputs are L2-normalised as
        ``F.normalize`` (eps 1e-12) does; accumulation in float32 (float64 for float64).
    """
    check_score_inputs(visual, text)
    scale = check_scale(scale)
    chosen = backends.resolve("pixel_text_score", visual.device, visual.dtype, backend)
    if differentiated_by_transform(visual, text):  # (vmap cannot say a layout: the reference's as it comes)
        return reference.pixel_text_score(visual, text, scale)
    if chosen == "reference":
        return _in_score_layout(reference.pixel_text_score(visual, text, scale), visual)
    if chosen == "triton":
        if eager_inference(visual, text):
            return _triton_kernels().score_forward(visual, text, scale)[0]
        return torch.ops.denseclip_fast.pixel_text_score_triton(visual, text, scale)[0]
    return torch.ops.denseclip_fast.pixel_text_score(visual, text, scale)[0]


def score_concat(
    feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0, *, backend: str | None = None
) -> torch.Tensor:
    """``torch.cat([feature, pixel_text_score(visual, text, scale)], dim=1)``: (B, C_feat + K, H, W), the score
    channels written straight into the output. ``feature`` is (B, C_feat, H, W) with visual's B, H, W and dtype."""
    check_score_inputs(visual, text)
    check_concat_feature(feature, visual)
    scale = check_scale(scale)
    chosen = backends.resolve("score_concat", visual.device, visual.dtype, backend)
    if differentiated_by_transform(feature, visual, text):
        return reference.score_concat(feature, visual, text, scale)
    if chosen == "reference":
        return _in_score_layout(reference.score_concat(feature, visual, text, scale), visual)
    if chosen == "triton":
        if eager_inference(feature, visual, text):
            return _triton_kernels().concat_forward(feature, visual, text, scale)[0]
        return torch.ops.denseclip_fast.score_concat_triton(feature, visual, text, scale)[0]
    return torch.ops.denseclip_fast.score_concat(feature, visual, text, scale)[0]


def context_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout, scale 1/sqrt(D)), flash-style: online
    softmax, no Lq x Lk score matrix in memory.

    q: (B, heads, Lq, D); k, v: (B, heads, Lk, D), Lk >= 1. Returns (B, heads, Lq, D) in q's dtype (on the
    Triton backend's eager inference path, with no gradient to record, laid out as (B, Lq, heads, D) in memory, so
    that merging the heads after it is a view; the Triton kernel also reads q, k and v of any strides whose last
    one is 1 without a copy).
    """
    check_attention_inputs(q, k, v)
    chosen = backends.resolve("context_attention", q.device, q.dtype, backend, head_dim=q.shape[-1])
    if chosen == "reference" or differentiated_by_transform(q, k, v):
        return reference.attention(q, k, v)
    if chosen == "triton":
        if eager_inference(q, k, v):  # written heads-last: the model's transpose-and-reshape after it is a view
            return _triton_kernels().attention_forward(q, k, v, heads_last=True)[0]
        return torch.ops.denseclip_fast.context_attention_triton(q, k, v)[0]
    return torch.ops.denseclip_fast.context_attention(q, k, v)[0]

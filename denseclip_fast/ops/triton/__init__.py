"""The Triton backend: ``torch.ops.denseclip_fast.<op>_triton`` operators built with ``torch.library.triton_op``,
so that torch.compile, torch.export and AOTInductor see (and can compile) the kernels themselves.

Kernels: score.py (pixel_text_score forward/backward, score_concat) and attention.py (flash attention forward and
backward). They take float32 (IEEE products), float16 and bfloat16 (tensor cores, float32 accumulation).
On machines without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported); there bfloat16 products are computed in float32 because the interpreter mis-multiplies bfloat16.
"""

from __future__ import annotations

UNAVAILABLE: str | None = None
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    UNAVAILABLE = "triton is not installed"

if UNAVAILABLE is None:
    import torch
    from torch.library import triton_op

    from ..checks import (
        check_attention_backward_inputs,
        check_attention_inputs,
        check_concat_feature,
        check_score_inputs,
        check_triton,
    )
    from ..library import empty_score, lse_dtype, register_autograd, register_fakes, register_flop_formulas
    from . import attention, score
    from .common import on_device

    # The forwards as plain functions: the bodies of the operators below, and what ops.pixel_text_score & co. call
    # directly in eager inference (no gradient to record, nothing tracing), skipping the operator's dispatch. The
    # operators check their arguments first (the wrappers have already: the kernels index memory by the shapes).
    # The score forms also return the pixel norms |v| ((B, H, W) float32, as the attention returns its log-sum-exp):
    # autograd saves them, so that the backward reads the visual map once.
    def score_forward(visual: torch.Tensor, text: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, norm = empty_score(visual, text.shape[-2]), score.empty_norm(visual)
        with on_device(visual):
            score.score_forward_into(out, norm, visual, text, scale)
        return out, norm

    def concat_forward(
        feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cf = feature.shape[1]
        out, norm = empty_score(visual, cf + text.shape[-2]), score.empty_norm(visual)
        out[:, :cf].copy_(feature)
        with on_device(visual):
            score.score_forward_into(out[:, cf:], norm, visual, text, scale)
        return out, norm

    def attention_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert lse_dtype(q) == torch.float32, "the Triton kernels do not take float64"
        with on_device(q):
            return attention.attention_forward(q, k, v, heads_last)

    @triton_op("denseclip_fast::pixel_text_score_triton", mutates_args=())
    def pixel_text_score_triton(
        visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_score_inputs(visual, text)
        check_triton("pixel_text_score", visual)
        return score_forward(visual, text, scale)

    @triton_op("denseclip_fast::pixel_text_score_backward_triton", mutates_args=())
    def pixel_text_score_backward_triton(
        grad: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float,
        score_map: torch.Tensor | None = None, norm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        check_score_inputs(visual, text)  # grad, score_map and norm: score.score_backward checks them
        check_triton("pixel_text_score", visual)
        with on_device(visual):
            return score.score_backward(grad, visual, text, scale, score_map, norm)

    @triton_op("denseclip_fast::score_concat_triton", mutates_args=())
    def score_concat_triton(
        feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_score_inputs(visual, text)
        check_concat_feature(feature, visual)
        check_triton("score_concat", visual)
        return concat_forward(feature, visual, text, scale)

    @triton_op("denseclip_fast::context_attention_triton", mutates_args=())
    def context_attention_triton(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_attention_inputs(q, k, v)
        check_triton("context_attention", q, head_dim=q.shape[-1])
        return attention_forward(q, k, v)

    @triton_op("denseclip_fast::context_attention_backward_triton", mutates_args=())
    def context_attention_backward_triton(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        check_attention_backward_inputs(grad_out, q, k, v, out, lse)
        check_triton("context_attention", q, head_dim=q.shape[-1])
        with on_device(q):
            return attention.attention_backward(grad_out, q, k, v, out, lse)

    register_fakes(suffix="_triton")
    register_autograd(suffix="_triton")
    register_flop_formulas(suffix="_triton")

"""The training loss's per-pixel cross-entropy of channels_last logits, by the Triton kernels on a GPU
(ops/triton/cross_entropy.py: one pass over the logits forward and one backward, where PyTorch's log_softmax + NLL
make five over a 2.5 GB matrix at RN50 512x512 batch 16), else PyTorch's F.cross_entropy.

The kernels apply to a float32 (pixels, classes) view with contiguous rows on CUDA that autograd records, nothing
else recording or transforming the call, Triton importable and ``DENSECLIP_FAST_TRITON_LOSS`` not 0 (read at each
call). A label that is neither a class nor the ignore index gives that pixel a NaN loss there (the run stops on it),
where PyTorch's CUDA kernel stops the process with a device assertion.
"""

from __future__ import annotations

import os
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..model.layers import untraced_tensors
from ..ops import backends

DEVICE_TYPES = ("cuda",)  # where the kernels run (tests add "cpu": Triton's interpreter)


def _kernels() -> Any:
    from ..ops.triton import cross_entropy

    return cross_entropy


def usable(rows: torch.Tensor) -> bool:
    """Whether the cross-entropy of ``rows`` may take the Triton kernels (module docstring)."""
    if not (torch.is_grad_enabled() and rows.requires_grad and untraced_tensors(torch.float32, DEVICE_TYPES, rows)):
        return False
    if rows.dim() != 2 or rows.stride(1) != 1 or os.environ.get("DENSECLIP_FAST_TRITON_LOSS", "1") == "0":
        return False
    return backends.triton_available() is None


class _RowsCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
        loss, lse = _kernels().cross_entropy_rows(rows, label, ignore_index)
        ctx.save_for_backward(rows, label, lse)
        ctx.ignore_index = ignore_index
        return typing.cast(torch.Tensor, loss)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rows, label, lse = ctx.saved_tensors
        return _kernels().cross_entropy_rows_backward(grad, rows, label, lse, ctx.ignore_index), None, None


def pixel_cross_entropy(rows: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``F.cross_entropy(rows, label, ignore_index=ignore_index, reduction="none")`` of a (pixels, classes) matrix
    and its (pixels,) labels: by the Triton kernels where :func:`usable`."""
    if usable(rows) and label.dtype == torch.int64 and label.shape == rows.shape[:1]:
        return typing.cast(torch.Tensor, _RowsCrossEntropy.apply(rows, label.contiguous(), ignore_index))
    return F.cross_entropy(rows, label, ignore_index=ignore_index, reduction="none")

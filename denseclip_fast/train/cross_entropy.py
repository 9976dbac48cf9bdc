"""The training loss's per-pixel cross-entropy of channels_last logits, by the Triton kernels on a GPU
(ops/triton/cross_entropy.py: one pass over the logits forward and one backward, where PyTorch's log_softmax + NLL
make five over a 2.5 GB matrix at RN50 512x512 batch 16), else PyTorch's F.cross_entropy; and the cross-entropy of
logits upsampled to the label with the resize fused in (:func:`resized_cross_entropy`, ops/triton/
resized_cross_entropy.py: the label-size logits and their gradient never in memory).

The kernels apply to a float32 (pixels, classes) view with contiguous rows (the fused ones: float32 (N, K, h, w) logits,
any strides) on CUDA that autograd records, nothing else recording or transforming the call, Triton importable and
``DENSECLIP_FAST_TRITON_LOSS`` not 0 (read at each call; the fused ones also need the resize kernels,
``DENSECLIP_FAST_TRITON_RESAMPLE`` not 0, and ``DENSECLIP_FAST_FUSED_LOSS`` not 0: at 0 the loss takes the resize and
the rows' kernels one after the other, benchmarks/bench_train.py's trainer-bf16-unfused-loss). A label that is neither a
class nor the ignore index gives that pixel a NaN loss there (the run stops on it), where PyTorch's CUDA kernel stops
the process with a device assertion. The kernels' backward is differentiable once: a second-order gradient
(``create_graph=True``, a gradient penalty) sees their gradient as a constant; ``DENSECLIP_FAST_TRITON_LOSS=0`` takes
PyTorch's, which differentiate twice.
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


def _fused_kernels() -> Any:
    from ..ops.triton import resized_cross_entropy

    return resized_cross_entropy


def _recorded_float32(x: torch.Tensor) -> bool:
    """A float32 tensor on a device of the kernels whose call autograd records, and nothing else records or
    transforms; the loss kernels switched on, Triton importable."""
    if not (torch.is_grad_enabled() and x.requires_grad and untraced_tensors(torch.float32, DEVICE_TYPES, x)):
        return False
    return os.environ.get("DENSECLIP_FAST_TRITON_LOSS", "1") != "0" and backends.triton_available() is None


def usable(rows: torch.Tensor) -> bool:
    """Whether the cross-entropy of ``rows`` may take the Triton kernels (module docstring)."""
    return rows.dim() == 2 and rows.stride(1) == 1 and _recorded_float32(rows)


def fused_usable(logits: torch.Tensor, label: torch.Tensor) -> bool:
    """Whether the cross-entropy of ``logits`` (N, K, h, w) upsampled to ``label`` (N, H, W) may take the fused
    kernels (module docstring)."""
    if logits.dim() != 4 or logits.shape[1] < 1 or label.dim() != 3 or label.dtype != torch.int64:
        return False
    if label.shape[0] != logits.shape[0] or label.device != logits.device:
        return False
    switches = ("DENSECLIP_FAST_TRITON_RESAMPLE", "DENSECLIP_FAST_FUSED_LOSS")
    return all(os.environ.get(name, "1") != "0" for name in switches) and _recorded_float32(logits)


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


class _ResizedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
        loss, lse = _fused_kernels().resized_cross_entropy(logits, label, ignore_index)
        ctx.save_for_backward(logits, label, lse)
        ctx.ignore_index = ignore_index
        return typing.cast(torch.Tensor, loss)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, label, lse = ctx.saved_tensors
        kernels = _fused_kernels()
        return kernels.resized_cross_entropy_backward(grad, logits, label, lse, ctx.ignore_index), None, None


def resized_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Per label pixel (N, H, W), ``F.cross_entropy(F.interpolate(logits, label.shape[1:], mode="bilinear",
    align_corners=False), label, ignore_index=ignore_index, reduction="none")`` by the fused kernels where
    :func:`fused_usable`; None where not (the caller resizes, then takes :func:`pixel_cross_entropy`)."""
    if not fused_usable(logits, label):
        return None
    return typing.cast(torch.Tensor, _ResizedCrossEntropy.apply(logits, label, ignore_index))

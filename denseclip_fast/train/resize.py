"""The training loss's resize of logits to the label: bilinear, align_corners=False (mmseg's ``resize``, which the
official loss applies to the decode head's logits and to the score map), whose backward is two matrix products.

The forward is ``F.interpolate`` itself. Its gradient is the transpose of that linear map: with L_h (H_out x H_in)
and L_w (W_out x W_in) the per-axis interpolation weights, out = L_h x L_w^T per map, so grad_x = L_h^T G L_w,
computed as one GEMM over every map (G L_w) and one batched product (L_h^T (G L_w)). On an H200 (RN50 512x512,
batch 16, 150 classes; benchmarks/results/h200_2026-12-04/train_rn50_b16.md) ATen's backward of the two NCHW
float32 resizes took 311 of a training step's 402 ms of GPU time (atomic adds of each output pixel into its
input's gradient: 1024 of them per score-map pixel at 32x). The products are about 200 GFLOP at that shape (float32,
as torch's matmul precision setting says). The weights come from ``F.interpolate`` of an identity matrix
(mode="linear", the same source positions per axis as "bilinear"), so they are ATen's, for any sizes.

On a GPU the forward is the engine's Triton resize (ops/triton/resample.py, engine/cuda_resample.py: the same
arithmetic, in the input's dtype and layout) where it applies: ATen's NHWC float32 kernel took about 13 ms of the
trainer's 96 ms step of GPU time for the two resizes (benchmarks/results/h200_2026-12-04b/train_rn50_b16.md),
writing 2.5 GB each at that shape. So is the backward (resample.bilinear_backward: each input pixel gathers the
dozen output columns, then rows, its weights reached): the products above are dense, 128 multiply-adds an output
pixel where two weights are not zero (a non-tensor-core float32 GEMM took 3.4 ms of the trainer's step on the H200,
h200_2026-12-04c), and a channels_last gradient (the loss's) was copied to NCHW for them first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..engine import cuda_resample
from ..ops import differentiated_by_transform


def interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in): row j the weights F.interpolate(mode="linear", align_corners=False) gives output j from the
    n_in input positions (two non-zeros at most)."""
    eye = torch.eye(n_in, device=device, dtype=dtype)[None]  # (1, n_in channels, n_in positions)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].t()


def product_gradient(grad: torch.Tensor, in_size: tuple[int, int], layout: torch.memory_format) -> torch.Tensor:
    """The resize's gradient with respect to its (N, C, *in_size) input as the two products of the module docstring,
    in the gradient's dtype, in ``layout``: the path of any device and dtype (float64 included)."""
    h_in, w_in = in_size
    h_out, w_out = grad.shape[-2:]
    with torch.autocast(grad.device.type, enabled=False):  # the products in the gradient's dtype
        rows = interpolation_matrix(h_in, h_out, grad.device, grad.dtype)  # (h_out, h_in)
        cols = interpolation_matrix(w_in, w_out, grad.device, grad.dtype)  # (w_out, w_in)
        maps = grad.reshape(-1, h_out, w_out)
        partial = (maps.reshape(-1, w_out) @ cols).view(-1, h_out, w_in)  # G L_w: one GEMM
        out = torch.matmul(rows.t(), partial)  # L_h^T (G L_w): (N, h_in, w_in)
    out = out.view(*grad.shape[:-2], h_in, w_in)
    return out.contiguous(memory_format=layout) if out.dim() == 4 else out


class _BilinearResize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        ctx.in_size = tuple(x.shape[-2:])
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return cuda_resample.resize(x, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        if grad.dim() == 4 and cuda_resample.usable(grad):  # the Triton gather, reading grad in its layout
            return cuda_resample.resized_gradient(grad, ctx.in_size, layout), None
        return product_gradient(grad, ctx.in_size, layout), None


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of a (N, C, H, W) tensor, with the backward
    of the module docstring."""
    if x.dim() != 4:
        raise ValueError(f"resize_to takes a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise ValueError(f"resize_to's size must be (height, width), two positive ints, got {tuple(size)!r}")
    size = (int(size[0]), int(size[1]))
    if not (x.requires_grad and torch.is_grad_enabled()):
        return cuda_resample.resize(x, size)
    if differentiated_by_transform(x):  # torch.func and forward-mode AD: F.interpolate's own derivatives (the
        # autograd Function below defines no setup_context, which those transforms need)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    result: torch.Tensor = _BilinearResize.apply(x, size)
    return result

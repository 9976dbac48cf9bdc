"""A residual sum and the LayerNorm after it in one Triton pass: the CUDA engine's context decoder
(engine/decoder_norms.py), where each pre-norm block's residual sum is followed by the next block's LayerNorm.

    s = x + y                       rounded to the dtype, as ATen's addition (x may have batch 1: broadcast)
    out = (s - mean) * rstd * weight + bias,  rstd = rsqrt(var + eps)

over the last dim, mean and biased variance of the rounded sum in float32, out rounded once: ATen's
``F.layer_norm(x + y)`` within float32 rounding (ATen's mean and variance are Welford's; here two passes over the
row, held in registers). Both s (the residual stream) and out (the next GEMM's input) are written.

Why: at RN50 batch 1 on an H200 each decoder residual sum took about 2.1 us and each LayerNorm 2.9 us, launches
apart, 14 and 13 of them (benchmarks/results/h200_2026-12-04c/e2e_rn50_whole.md's profile); in the decoder 8 sums are
each followed by a LayerNorm: 8 launches fewer, and one read of each sum. Not yet timed on a GPU: bench_e2e's
``engine-bf16-aten-add-ln`` contestant switches it off.

One program per BLOCK_R rows of the (rows, W) problem, the whole row in registers (W up to MAX_WIDTH).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2, on_device, profiled
from .resample import _wide
from .score import _index

MAX_WIDTH = 8192  # widest row a program holds in registers
TILE = 2048  # elements a program holds (rows x padded width)
WARPS = 4


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, ROWS, L, W,
    s_xb, s_xl, s_yb, s_yl, eps,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    col_mask = cols < W
    mask = (rows < ROWS)[:, None] & col_mask[None, :]
    rows = _index(rows, WIDE)
    batch = rows // L
    position = rows - batch * L
    x = tl.load(x_ptr + (batch * s_xb + position * s_xl)[:, None] + cols[None, :], mask=mask, other=0.0)
    y = tl.load(y_ptr + (batch * s_yb + position * s_yl)[:, None] + cols[None, :], mask=mask, other=0.0)
    s = (x.to(tl.float32) + y.to(tl.float32)).to(sum_ptr.dtype.element_ty)  # ATen's sum, rounded once
    out_offsets = (rows * W)[:, None] + cols[None, :]
    tl.store(sum_ptr + out_offsets, s, mask=mask)
    v = s.to(tl.float32)
    mean = tl.sum(v, axis=1) / W
    centred = tl.where(mask, v - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / W + eps)
    weight = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def blocks(width: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W) of a row width: the padded row, and rows to fill TILE elements (at least one)."""
    block_w = next_power_of_2(width)
    return max(1, TILE // block_w), block_w


def problem(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    """What the kernel does not take in these inputs, naming the argument (None: it takes them)."""
    if y.dim() != 3 or y.stride(-1) != 1 or y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (f"y must be a (B, L, W) float32/float16/bfloat16 tensor with a unit last stride, got {y.dtype} of "
                f"shape {tuple(y.shape)} and strides {y.stride()}")  # fmt: skip
    b, length, width = y.shape
    if (x.dim() != 3 or x.shape[0] not in (1, b) or tuple(x.shape[1:]) != (length, width) or x.stride(-1) != 1
            or x.dtype != y.dtype or x.device != y.device):  # fmt: skip
        return (f"x must be ({b} or 1, {length}, {width}) {y.dtype} on {y.device} with a unit last stride, as y, got "
                f"{x.dtype} of shape {tuple(x.shape)} and strides {x.stride()} on {x.device}")  # fmt: skip
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (width,) or not t.is_contiguous() or not t.is_floating_point() or t.device != y.device:
            return (f"{name} must be a contiguous floating-point ({width},) tensor on {y.device}, got "
                    f"{'a contiguous' if t.is_contiguous() else 'a non-contiguous'} {t.dtype} tensor of shape "
                    f"{tuple(t.shape)} on {t.device}")  # fmt: skip
    if not 1 <= width <= MAX_WIDTH:
        return f"rows of 1 to {MAX_WIDTH} elements, got {width}"
    return None


def add_layer_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, F.layer_norm(x + y, (W,), weight, bias, eps)) for y (B, L, W) and x (B or 1, L, W) of y's dtype,
    each with a unit last stride; both results new contiguous (B, L, W) tensors in y's dtype (module docstring)."""
    refused = problem(x, y, weight, bias)
    if refused is not None:
        raise ValueError(f"add_layer_norm: {refused}")
    b, length, width = y.shape
    total = torch.empty((b, length, width), dtype=y.dtype, device=y.device)
    out = torch.empty_like(total)
    rows = b * length
    if rows == 0:
        return total, out
    block_r, block_w = blocks(width)
    s_xb = 0 if x.shape[0] == 1 else x.stride(0)
    wide = _wide(x, y, total)
    with on_device(y):
        profiled(_add_layer_norm_kernel)[(cdiv(rows, block_r),)](
            x, y, weight, bias, total, out, rows, length, width, s_xb, x.stride(1), y.stride(0), y.stride(1),
            float(eps), BLOCK_R=block_r, BLOCK_W=block_w, WIDE=wide, num_warps=WARPS,
        )  # fmt: skip
    return total, out

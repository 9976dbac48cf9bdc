"""Triton kernels of the engine's and the trainer's resamplings on a GPU: the bilinear resize (``F.interpolate(x,
size, mode="bilinear", align_corners=False)``) and its gradient, the s x s average pooling (``nn.AvgPool2d(s)``) and
its gradient, the FPN's top-down step (a map plus a coarser one resized by nearest interpolation, added in
place) and the Semantic FPN head's sum (a map plus a coarser one resized bilinearly, added in place); any float
dtype and layout in, the output's dtype and layout the caller's.

Why: ATen's kernels, on an H200 (RN50 512x512, bfloat16, batch 1; benchmarks/results/h200_2026-12-04b/
e2e_rn50_whole.md's profile): the logits' resize to the image (150 float32 planes of 512x512 written, 157 MB: 33 us
at 4.8 TB/s) took 169 us, after a float32 copy of the head's output; the Semantic FPN's six 2x upsamplings of NHWC
bfloat16 maps (about 14 MB written in all) took 149 us; the ResNet's eight 2x2 average poolings 96 us; the FPN's
three nearest upsamplings 38 us, and their sums more. At batch 16 these took 7.3 of the 13.9 ms of GPU time.

Bilinear: one program per (image, ROWS output rows), block of channels and block of output columns (a
:class:`Tiling`); the tile's pixels along the output's unit stride (columns of an NCHW output, channels of an NHWC
one). The arithmetic is ATen's CUDA kernels': scale = in / out (float32), source = max(scale (dst + 0.5) - 0.5,
0), index = its floor, the next one clamped to the last, weights l1 = source - index and l0 = 1 - l1, value = lh0
(lw0 x00 + lw1 x01) + lh1 (lw0 x10 + lw1 x11) in float32, rounded once to the output's dtype. Compilers may contract
those products into FMAs in other places than nvcc did for ATen: float32 results can differ from ATen's in the last
bits. Every output element is a function of its four inputs alone, so that a plane comes out the same whatever else
is resized with it.

Top-down step: finer + coarser[min(floor(dst * scale), size - 1)] (ATen's nearest source index, scale = in / out in
float32), summed in float32 and rounded once, as ATen's nearest resize followed by its addition: bit for bit.

Head sum (:func:`add_bilinear_`): finer + the bilinear resize of coarser to finer's size, the resize computed as
the bilinear kernel computes it (the same helpers) and rounded to finer's dtype as it stores it, then summed in
float32 and rounded once: ``finer + bilinear(coarser, size)`` (ATen's addition) bit for bit, in one pass that
writes no resized map (the head's three levels each wrote one, at RN50 512x512 bfloat16 a (B, 256, 128, 128) map
of 8 MiB a batch item, and read it back in an addition launch of their own: 48 MiB of traffic at batch 1 that the
fused step does not move). Not yet timed on a GPU. (Triton's sm_90 compile makes the 16-bit sum one add.bf16 /
add.f16 of the two rounded values: the exact sum rounded once, which the float32 sum rounded again equals. Triton's
interpreter rounds float32 to bfloat16 by truncation, in the resize and in the sum alike.)

Average pooling (kernel = stride = s, no padding, floor of the sizes): the window summed in float32 in ATen's order
(row by row, left to right), divided by s * s (IEEE division, as ATen's), rounded once: ATen's result bit for bit.
Its gradient: each input pixel its window's output gradient / (s * s), zero where no window covers it: ATen's.

Gradients are gathers, one program per output tile, never atomic additions: the same result every run. The
bilinear gradient (the transpose of the resize, weights recomputed as the forward computes them) in two passes, the
width into a float32 map then the height, each input index summing the few output indices its weights reached
(about 2 / scale of them); ATen's backward (atomic additions) within float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ..backends import MAX_GRID_Y
from .common import cdiv, next_power_of_2, on_device, profiled
from .score import _index

WIDE_FROM = 2**31  # element offsets from here on are computed in int64
TILE = 2048  # elements a program computes (channels x columns)
ROWS = 1  # output rows a bilinear program computes
WARPS = 8  # 8 elements a thread (4 warps: 16, which spills registers in the generic top-down step on sm_90)


@triton.jit
def _tile(C, H_out, W_out, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's output tile: image n, output row oh, its channels and columns, and which of them exist."""
    row = tl.program_id(0)
    n = row // H_out
    oh = row - n * H_out
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (offs_c[:, None] < C) & (offs_w[None, :] < W_out)
    return n, oh, offs_c, offs_w, mask


@triton.jit
def _source(o, scale, size):
    """ATen's area_pixel_compute_source_index along one axis for destination indices o of a resize from ``size``
    indices: the lower and upper source indices (the upper clamped to the last) and their weights l0, l1."""
    src = tl.maximum(scale * (o.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)
    i1 = i0 + (i0 < size - 1).to(tl.int32)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _interpolate(top, bottom, left, right, mask, lh0, lh1, lw0, lw1):
    """The bilinear value from the four source pixels at top/bottom row pointers + left/right column offsets, in
    float32, in ATen's order: lh0 (lw0 x00 + lw1 x01) + lh1 (lw0 x10 + lw1 x11), each sum one fused multiply-add of
    its first product (what the compiler had made of the plain expression in the resize kernel). Written out: left
    to the compiler, the same expression contracted the other product in some elements of the fused label kernel's
    tile (labels.py; seen in its sm_90 PTX), whose values must equal the resize's. The interpreter rounds each
    product (no FMA)."""
    x00 = tl.load(top + left, mask=mask, other=0.0).to(tl.float32)
    x01 = tl.load(top + right, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(bottom + left, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(bottom + right, mask=mask, other=0.0).to(tl.float32)
    return tl.fma(lh0, tl.fma(lw0, x00, lw1 * x01), lh1 * tl.fma(lw0, x10, lw1 * x11))


@triton.jit
def _output_row(H_in, W_in, H_out, W_out, scale_h, scale_w, BLOCK_W: tl.constexpr, WIDE: tl.constexpr):
    """For a program over one output row (program axis 0: image x row) and a block of its columns (axis 1): image
    n, row oh, the columns o_w and which of them exist, and their source taps (:func:`_source`): rows h0, h1 with
    weights lh0, lh1, columns w0, w1 with lw0, lw1; indices int64 where WIDE."""
    row = tl.program_id(0)
    n = row // H_out
    oh = row - n * H_out
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    h0, h1, lh0, lh1 = _source(oh, scale_h, H_in)
    w0, w1, lw0, lw1 = _source(offs_w, scale_w, W_in)
    n, oh, h0, h1 = _index(n, WIDE), _index(oh, WIDE), _index(h0, WIDE), _index(h1, WIDE)
    return n, oh, _index(offs_w, WIDE), offs_w < W_out, h0, h1, lh0, lh1, _index(w0, WIDE), _index(w1, WIDE), lw0, lw1


@triton.jit
def _bilinear_kernel(
    x_ptr, out_ptr, C, H_in, W_in, H_out, W_out,
    s_xn, s_xc, s_xh, s_xw, s_on, s_oc, s_oh, s_ow,
    scale_h, scale_w,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # this program's tile: image n, ROWS consecutive output rows (oh), a block of channels and one of columns
    row_blocks = tl.cdiv(H_out, ROWS)
    n = tl.program_id(0) // row_blocks
    oh = (tl.program_id(0) - n * row_blocks) * ROWS + tl.arange(0, ROWS)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (oh[:, None, None] < H_out) & (offs_c[None, :, None] < C) & (offs_w[None, None, :] < W_out)
    h0, h1, lh0, lh1 = _source(oh, scale_h, H_in)
    w0, w1, lw0, lw1 = _source(offs_w, scale_w, W_in)
    n, oh, h0, h1 = _index(n, WIDE), _index(oh, WIDE), _index(h0, WIDE), _index(h1, WIDE)
    c_idx, w0, w1, o_w = _index(offs_c, WIDE), _index(w0, WIDE), _index(w1, WIDE), _index(offs_w, WIDE)
    base = x_ptr + n * s_xn + c_idx[None, :, None] * s_xc
    top, bottom = base + h0[:, None, None] * s_xh, base + h1[:, None, None] * s_xh
    value = _interpolate(top, bottom, w0[None, None, :] * s_xw, w1[None, None, :] * s_xw, mask,
                         lh0[:, None, None], lh1[:, None, None], lw0[None, None, :], lw1[None, None, :])  # fmt: skip
    out = out_ptr + n * s_on + c_idx[None, :, None] * s_oc + oh[:, None, None] * s_oh + o_w[None, None, :] * s_ow
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight(o, j, A, scale):
    """The weight bilinear resizing gives source index j (of A) in destination index o, per axis: the forward's
    source index and weights (:func:`_source`), l0 where j is the lower index, l1 where the upper (both at the last
    index, whose upper one is clamped to it)."""
    x0, x1, l0, l1 = _source(o, scale, A)
    return tl.where(x0 == j, l0, 0.0) + tl.where(x1 == j, l1, 0.0)


@triton.jit
def _first_tap(j, inv_scale):
    """The first destination index that may take source index j: two below the first whose source position reaches
    j - 1 (the float32 rounding of its inverse covered), at least 0."""
    return tl.maximum(tl.floor((j.to(tl.float32) - 0.5) * inv_scale - 0.5).to(tl.int32) - 1, 0)


@triton.jit
def _and_scalar(mask, cond):
    """``mask & cond`` for a scalar comparison ``cond``, as a select: Triton 3.9's interpreter keeps a scalar
    comparison in int32, which ``&`` spreads into the mask (its tl.load then refuses it: "mask has unsupported
    dtype"); compiled, either is one instruction on the mask."""
    return tl.where(cond, mask, False)


@triton.jit
def _bilinear_grad_w_kernel(
    g_ptr, out_ptr, C, R, A, B,
    s_gn, s_gc, s_gr, s_gw, s_on, s_oc, s_or, s_ow,
    scale, inv_scale, TAPS,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """The width pass of the resize's gradient: out (N, C, R, A) = g (N, C, R, B) summed over its B columns with the
    weights that gave them from the A source columns; TAPS destination columns a source column at most."""
    n, r, offs_c, offs_j, mask = _tile(C, R, A, BLOCK_C, BLOCK_W)
    lo = _first_tap(offs_j, inv_scale)
    n, r, c_idx, j_idx = _index(n, WIDE), _index(r, WIDE), _index(offs_c, WIDE), _index(offs_j, WIDE)
    row = g_ptr + n * s_gn + c_idx[:, None] * s_gc + r * s_gr
    acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    for t in range(TAPS):
        o = lo + t
        w = _weight(o, offs_j, A, scale)[None, :]
        g = tl.load(row + _index(o, WIDE)[None, :] * s_gw, mask=mask & (o < B)[None, :], other=0.0)
        acc += w * g.to(tl.float32)
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + r * s_or + j_idx[None, :] * s_ow
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bilinear_grad_h_kernel(
    g_ptr, out_ptr, C, A, B, W,
    s_gn, s_gc, s_gh, s_gw, s_on, s_oc, s_oh, s_ow,
    scale, inv_scale, TAPS,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """The height pass: out (N, C, A, W) = g (N, C, B, W) summed over its B rows with the weights that gave them from
    the A source rows; one source row a program, its rows read whole along the map's unit stride."""
    n, i, offs_c, offs_w, mask = _tile(C, A, W, BLOCK_C, BLOCK_W)
    lo = _first_tap(i, inv_scale)
    n, c_idx, w_idx = _index(n, WIDE), _index(offs_c, WIDE), _index(offs_w, WIDE)
    tile = g_ptr + n * s_gn + c_idx[:, None] * s_gc + w_idx[None, :] * s_gw
    acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    for t in range(TAPS):
        o = lo + t
        g = tl.load(tile + _index(o, WIDE) * s_gh, mask=_and_scalar(mask, o < B), other=0.0)
        acc += _weight(o, i, A, scale) * g.to(tl.float32)
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + _index(i, WIDE) * s_oh + w_idx[None, :] * s_ow
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _avg_pool_kernel(
    x_ptr, out_ptr, C, H_out, W_out,
    s_xn, s_xc, s_xh, s_xw, s_on, s_oc, s_oh, s_ow,
    S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    n, oh, offs_c, offs_w, mask = _tile(C, H_out, W_out, BLOCK_C, BLOCK_W)
    n, oh, c_idx, o_w = _index(n, WIDE), _index(oh, WIDE), _index(offs_c, WIDE), _index(offs_w, WIDE)
    base = x_ptr + n * s_xn + c_idx[:, None] * s_xc + (oh * S) * s_xh + (o_w[None, :] * S) * s_xw
    total = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    for i in tl.static_range(S):
        for j in tl.static_range(S):
            total += tl.load(base + i * s_xh + j * s_xw, mask=mask, other=0.0).to(tl.float32)
    value = tl.math.div_rn(total, S * S * 1.0)  # IEEE division, as ATen's (Triton's '/' is div.full: 2 ulp)
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + oh * s_oh + o_w[None, :] * s_ow
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _avg_pool_backward_kernel(
    g_ptr, out_ptr, C, H_in, W_in, H_out, W_out,
    s_gn, s_gc, s_gh, s_gw, s_on, s_oc, s_oh, s_ow,
    S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """The input's gradient, one (image, input row) a program: each pixel its window's output gradient / (S x S),
    zero past the last whole window (the rows and columns the floored output leaves out)."""
    n, h, offs_c, offs_w, mask = _tile(C, H_in, W_in, BLOCK_C, BLOCK_W)
    ph, pw = h // S, offs_w // S
    inside = _and_scalar(mask & (pw[None, :] < W_out), ph < H_out)
    n, h, ph, pw = _index(n, WIDE), _index(h, WIDE), _index(ph, WIDE), _index(pw, WIDE)
    c_idx, i_w = _index(offs_c, WIDE), _index(offs_w, WIDE)
    g = tl.load(g_ptr + n * s_gn + c_idx[:, None] * s_gc + ph * s_gh + pw[None, :] * s_gw, mask=inside, other=0.0)
    value = tl.math.div_rn(g.to(tl.float32), S * S * 1.0)
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + h * s_oh + i_w[None, :] * s_ow
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_nearest_kernel(
    a_ptr, b_ptr, out_ptr, C, H_in, W_in, H_out, W_out,
    s_an, s_ac, s_ah, s_aw, s_bn, s_bc, s_bh, s_bw, s_on, s_oc, s_oh, s_ow,
    scale_h, scale_w,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    n, oh, offs_c, offs_w, mask = _tile(C, H_out, W_out, BLOCK_C, BLOCK_W)
    # ATen's nearest_neighbor_compute_source_index: min(floor(dst * scale), size - 1)
    ih = tl.minimum(tl.floor(oh.to(tl.float32) * scale_h).to(tl.int32), H_in - 1)
    iw = tl.minimum(tl.floor(offs_w.to(tl.float32) * scale_w).to(tl.int32), W_in - 1)
    n, oh, ih, iw = _index(n, WIDE), _index(oh, WIDE), _index(ih, WIDE), _index(iw, WIDE)
    c_idx, o_w = _index(offs_c, WIDE), _index(offs_w, WIDE)
    a = tl.load(a_ptr + n * s_an + c_idx[:, None] * s_ac + oh * s_ah + o_w[None, :] * s_aw, mask=mask, other=0.0)
    b = tl.load(b_ptr + n * s_bn + c_idx[:, None] * s_bc + ih * s_bh + iw[None, :] * s_bw, mask=mask, other=0.0)
    value = a.to(tl.float32) + b.to(tl.float32)
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + oh * s_oh + o_w[None, :] * s_ow
    tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_bilinear_kernel(
    x_ptr, out_ptr, C, H_in, W_in, H_out, W_out,
    s_xn, s_xc, s_xh, s_xw, s_on, s_oc, s_oh, s_ow,
    scale_h, scale_w,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """out += x resized bilinearly to out's size, in place: the resize as _bilinear_kernel computes it (the same
    taps, weights and fused multiply-adds), rounded to out's dtype as it stores it, then the sum in float32 rounded
    once, as ATen's addition of the two maps."""
    n, oh, offs_c, offs_w, mask = _tile(C, H_out, W_out, BLOCK_C, BLOCK_W)
    h0, h1, lh0, lh1 = _source(oh, scale_h, H_in)
    w0, w1, lw0, lw1 = _source(offs_w, scale_w, W_in)
    n, oh, h0, h1 = _index(n, WIDE), _index(oh, WIDE), _index(h0, WIDE), _index(h1, WIDE)
    c_idx, w0, w1, o_w = _index(offs_c, WIDE), _index(w0, WIDE), _index(w1, WIDE), _index(offs_w, WIDE)
    base = x_ptr + n * s_xn + c_idx[:, None] * s_xc
    up = _interpolate(base + h0 * s_xh, base + h1 * s_xh, w0[None, :] * s_xw, w1[None, :] * s_xw, mask, lh0, lh1,
                      lw0[None, :], lw1[None, :])  # fmt: skip
    dtype = out_ptr.dtype.element_ty
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + oh * s_oh + o_w[None, :] * s_ow
    value = tl.load(out, mask=mask, other=0.0).to(tl.float32) + up.to(dtype).to(tl.float32)
    tl.store(out, value.to(dtype), mask=mask)


def _last_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def blocks(channels: int, width: int, channel_stride: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_W) for an output of ``channels`` and ``width`` columns whose channel stride is given: a unit
    channel stride (NHWC) puts up to 256 channels along the tile's fast axis, else (NCHW) up to 256 columns; the
    other axis fills TILE elements."""
    if channel_stride == 1 and channels > 1:
        block_c = min(next_power_of_2(channels), 256)
        return block_c, max(1, min(next_power_of_2(width), TILE // block_c))
    block_w = min(next_power_of_2(width), 256)
    return max(1, min(next_power_of_2(channels), TILE // block_w)), block_w


def _check_4d(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a (N, C, H, W) floating-point tensor, got {t.dtype} of shape "
                             f"{tuple(t.shape)}")  # fmt: skip


def _check_window(name: str, s: int) -> None:
    if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        raise ValueError(f"{name}: s must be a positive int, got {s!r}")


def _input_size(name: str, size: Sequence[int]) -> tuple[int, int, int, int]:
    """A gradient's input size (N, C, H, W) as four ints; a ValueError naming ``name`` for anything else."""
    if len(size) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size):
        raise ValueError(f"{name}: size must be the input's (N, C, H, W), four ints >= 0, got {tuple(size)!r}")
    n, c, h, w = size
    return n, c, h, w


def _grid(out: torch.Tensor, block_c: int, block_w: int, rows: int = 1) -> tuple[int, int, int]:
    n, c, h, w = out.shape
    grid = (n * cdiv(h, rows), cdiv(c, block_c), cdiv(w, block_w))
    if grid[1] > MAX_GRID_Y or grid[2] > MAX_GRID_Y:
        raise ValueError(f"resample: an output of {c} channels and {w} columns is past the launch grid's limit")
    return grid


def _scale(size_in: int, size_out: int) -> float:
    """ATen's scale of a resize given by sizes: in / out divided in float32."""
    return float(np.float32(size_in) / np.float32(size_out))


def _nhwc(x: torch.Tensor) -> bool:
    """Whether x's strides are NHWC ones (not a map whose two layouts are the same memory: one channel or pixel)."""
    if x.shape[1] == 1 or x.shape[2] * x.shape[3] == 1:
        return False
    return x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels give an output for input x: channels_last where x has NHWC strides, else NCHW."""
    return torch.channels_last if _nhwc(x) else torch.contiguous_format


class Tiling(NamedTuple):
    """How a bilinear launch splits its output: output rows, channels and columns a program computes, and its warps
    (:func:`tiling`'s choice unless a caller, such as benchmarks/bench_resample.py's sweep, gives one)."""

    rows: int
    block_c: int
    block_w: int
    warps: int


def tiling(out: torch.Tensor) -> Tiling:
    """The bilinear launch's tiling of ``out`` (N, C, h, w): ROWS output rows a program, :func:`blocks`, WARPS."""
    return Tiling(ROWS, *blocks(out.shape[1], out.shape[3], out.stride(1)), WARPS)


def _plan(name: str, out: torch.Tensor, src: torch.Tensor, same_dtype: bool) -> bool:
    """Whether a kernel that writes ``out`` (N, C, h, w) from ``src`` (N, C, H, W) has anything to launch (False:
    out is empty); a ValueError naming ``name`` where they do not fit."""
    _check_4d(name, out, src)
    if out.shape[:2] != src.shape[:2] or src.device != out.device or (same_dtype and src.dtype != out.dtype):
        raise ValueError(f"{name}: {tuple(src.shape)} {src.dtype} on {src.device} does not fit {tuple(out.shape)} "
                         f"{out.dtype} on {out.device} (same N, C{', dtype' if same_dtype else ''} and device "
                         "expected)")  # fmt: skip
    if out.numel() == 0:
        return False
    if src.numel() == 0:
        raise ValueError(f"{name}: an empty map {tuple(src.shape)} has nothing to give {tuple(out.shape)}")
    return True


def _wide(*tensors: torch.Tensor) -> bool:
    return max(_last_offset(t) for t in tensors) >= WIDE_FROM


def _check_tiling(name: str, t: NamedTuple) -> None:
    """A launch's tiling (a NamedTuple of ints: Tiling, labels.LabelTiling) holds powers of two; a ValueError naming
    ``name`` and the fields else."""
    if not all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in t):
        raise ValueError(f"{name}: tiling must hold powers of two ({', '.join(t._fields)}), got {t}")


def _check_size(name: str, size: Sequence[int]) -> None:
    """An output size (height, width) of two positive ints; a ValueError naming ``name`` else."""
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise ValueError(f"{name}: size must be (height, width), two positive ints, got {tuple(size)!r}")


def bilinear_into(out: torch.Tensor, x: torch.Tensor, tile: Tiling | None = None) -> torch.Tensor:
    """``out`` (N, C, h, w), any strides and float dtype, = x (N, C, H, W) resized to (h, w) bilinearly with
    align_corners=False, as ``F.interpolate(x, size=(h, w))``; returns ``out``. ``tile``: the launch's
    :class:`Tiling` (:func:`tiling`'s when None), which changes the speed, not a value."""
    if not _plan("bilinear_into", out, x, same_dtype=False):
        return out
    t = tiling(out) if tile is None else tile
    _check_tiling("bilinear_into", t)
    (_, c, h_in, w_in), (h_out, w_out) = x.shape, out.shape[2:]
    with on_device(x):
        profiled(_bilinear_kernel)[_grid(out, t.block_c, t.block_w, t.rows)](
            x, out, c, h_in, w_in, h_out, w_out, *x.stride(), *out.stride(), _scale(h_in, h_out),
            _scale(w_in, w_out), ROWS=t.rows, BLOCK_C=t.block_c, BLOCK_W=t.block_w, WIDE=_wide(x, out),
            num_warps=t.warps,
        )  # fmt: skip
    return out


def bilinear(x: torch.Tensor, size: Sequence[int], dtype: torch.dtype | None = None,
             memory_format: torch.memory_format | None = None) -> torch.Tensor:  # fmt: skip
    """x (N, C, H, W) resized to ``size`` (h, w) as ``F.interpolate(x, size, mode="bilinear",
    align_corners=False)``, in ``dtype`` (x's if None) and ``memory_format`` (x's own layout if None: channels_last
    where x has NHWC strides)."""
    _check_4d("bilinear", x)
    _check_size("bilinear", size)
    if memory_format is None:
        memory_format = layout_of(x)
    out = torch.empty((x.shape[0], x.shape[1], size[0], size[1]), dtype=dtype or x.dtype, device=x.device,
                      memory_format=memory_format)  # fmt: skip
    return bilinear_into(out, x)


def _taps(size_in: int, size_out: int) -> tuple[float, float, int]:
    """(scale, inverse scale, taps) of one axis of the resize's gradient: the destination indices whose source
    positions lie within one index of a source index j are at most floor(2 / scale) + 1, from at most two below
    _first_tap's start, plus one for rounding."""
    scale = _scale(size_in, size_out)
    return scale, size_out / size_in, int(2.0 / scale) + 4


def bilinear_backward(grad: torch.Tensor, size: Sequence[int],
                      memory_format: torch.memory_format = torch.contiguous_format,
                      dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """The gradient with respect to x (N, C, H, W = ``size``) of ``bilinear(x, (h, w))`` given ``grad`` (N, C, h, w),
    the output's: each source pixel gathers the output pixels its weights reached (no atomics: the same result
    every run), a width pass into a float32 (N, C, h, W) map, then a height pass; in ``dtype`` (grad's if None),
    in ``memory_format``. ATen's backward within float32 rounding (its atomic additions add in another order)."""
    _check_4d("bilinear_backward", grad)
    n, c, h_in, w_in = _input_size("bilinear_backward", size)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"bilinear_backward: dtype must be a floating-point dtype, got {dtype}")
    if grad.shape[:2] != (n, c) or min(h_in, w_in) < 1:
        raise ValueError(f"bilinear_backward: grad {tuple(grad.shape)} is not the gradient of a resize of "
                         f"{(n, c, h_in, w_in)}")  # fmt: skip
    h_out, w_out = grad.shape[2:]
    out = torch.empty((n, c, h_in, w_in), dtype=dtype or grad.dtype, device=grad.device, memory_format=memory_format)
    if out.numel() == 0 or grad.numel() == 0:
        return out.zero_()
    narrow = torch.empty((n, c, h_out, w_in), dtype=torch.float32, device=grad.device, memory_format=layout_of(grad))
    with on_device(grad):
        scale, inv, taps = _taps(w_in, w_out)
        block_c, block_w = blocks(c, w_in, narrow.stride(1))
        profiled(_bilinear_grad_w_kernel)[_grid(narrow, block_c, block_w)](
            grad, narrow, c, h_out, w_in, w_out, *grad.stride(), *narrow.stride(), scale, inv, taps,
            BLOCK_C=block_c, BLOCK_W=block_w, WIDE=_wide(grad, narrow), num_warps=WARPS,
        )  # fmt: skip
    return height_pass(narrow, out)


def height_pass(narrow: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The height pass of a resize's gradient: ``out`` (N, C, A, W) = ``narrow`` (N, C, B, W), the width pass's
    float32 map (rows of the resize's output, columns of its input), summed over its B rows with the weights that
    gave them from the A source rows; returns ``out`` (any strides and float dtype)."""
    _check_4d("height_pass", narrow, out)
    if (narrow.dtype != torch.float32 or narrow.device != out.device or narrow.shape[:2] != out.shape[:2]
            or narrow.shape[3] != out.shape[3] or min(narrow.shape[2], out.shape[2]) < 1):  # fmt: skip
        raise ValueError(f"height_pass: narrow must be a float32 (N, C, B, W) map on out's device with B >= 1 and "
                         f"out (N, C, A, W) with A >= 1, got {narrow.dtype} {tuple(narrow.shape)} on {narrow.device} "
                         f"and {tuple(out.shape)} on {out.device}")  # fmt: skip
    (_, c, h_out, w_in), h_in = narrow.shape, out.shape[2]
    with on_device(narrow):
        scale, inv, taps = _taps(h_in, h_out)
        block_c, block_w = blocks(c, w_in, out.stride(1))
        profiled(_bilinear_grad_h_kernel)[_grid(out, block_c, block_w)](
            narrow, out, c, h_in, h_out, w_in, *narrow.stride(), *out.stride(), scale, inv, taps,
            BLOCK_C=block_c, BLOCK_W=block_w, WIDE=_wide(narrow, out), num_warps=WARPS,
        )  # fmt: skip
    return out


def avg_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """``F.avg_pool2d(x, s)`` (kernel = stride = s, no padding) of x (N, C, H, W), in x's dtype and layout."""
    _check_4d("avg_pool", x)
    _check_window("avg_pool", s)
    n, c, h, w = x.shape
    if h < s or w < s:
        raise ValueError(f"avg_pool: a {h}x{w} map is smaller than the {s}x{s} window")
    out = torch.empty((n, c, h // s, w // s), dtype=x.dtype, device=x.device, memory_format=layout_of(x))
    if out.numel() == 0:
        return out
    block_c, block_w = blocks(c, w // s, out.stride(1))
    with on_device(x):
        profiled(_avg_pool_kernel)[_grid(out, block_c, block_w)](
            x, out, c, h // s, w // s, *x.stride(), *out.stride(), S=s, BLOCK_C=block_c, BLOCK_W=block_w,
            WIDE=_wide(x, out), num_warps=WARPS,
        )  # fmt: skip
    return out


def avg_pool_backward(grad: torch.Tensor, size: Sequence[int], s: int,
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:  # fmt: skip
    """The gradient of ``avg_pool(x, s)`` with respect to x, of ``size`` (N, C, H, W), given ``grad``, the output's
    (N, C, H // s, W // s): ATen's avg_pool2d_backward, in grad's dtype, in ``memory_format``."""
    _check_4d("avg_pool_backward", grad)
    _check_window("avg_pool_backward", s)
    n, c, h, w = _input_size("avg_pool_backward", size)
    if grad.shape != (n, c, h // s, w // s):
        raise ValueError(f"avg_pool_backward: grad {tuple(grad.shape)} is not the gradient of a {s}x{s} pooling of "
                         f"{(n, c, h, w)} (expected {(n, c, h // s, w // s)})")  # fmt: skip
    out = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    block_c, block_w = blocks(c, w, out.stride(1))
    with on_device(grad):
        profiled(_avg_pool_backward_kernel)[_grid(out, block_c, block_w)](
            grad, out, c, h, w, h // s, w // s, *grad.stride(), *out.stride(), S=s, BLOCK_C=block_c,
            BLOCK_W=block_w, WIDE=_wide(grad, out), num_warps=WARPS,
        )  # fmt: skip
    return out


def add_nearest_(finer: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
    """``finer += F.interpolate(coarser, size=finer.shape[2:], mode="nearest")`` in place (one pass: the sum in
    float32, rounded once, as ATen's addition), for maps of one dtype and device; returns ``finer``."""
    return _add_resized_("add_nearest_", _add_nearest_kernel, finer, coarser, (finer, coarser, finer))


def add_bilinear_(finer: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
    """``finer += bilinear(coarser, finer.shape[2:])`` in place (one pass, no resized map written): the resize
    rounded to finer's dtype, as :func:`bilinear` returns it, then the sum in float32 rounded once, as ATen's
    addition of the two; for maps of one dtype and device, any strides, but ``finer`` must hold each element once
    and share no memory with ``coarser`` (an expanded or aliased map would be written under its own reads: the
    engine's head asks TritonSemanticFPNHead.fusable first); returns ``finer``."""
    return _add_resized_("add_bilinear_", _add_bilinear_kernel, finer, coarser, (coarser, finer))


def _add_resized_(name: str, kernel: Any, finer: torch.Tensor, coarser: torch.Tensor,
                  maps: tuple[torch.Tensor, ...]) -> torch.Tensor:  # fmt: skip
    """The launch of an in-place sum of ``finer`` and ``coarser`` resized to its size: ``kernel`` given ``maps``
    (its pointers, in its order), the sizes, each map's strides and the two axes' scales."""
    if not _plan(name, finer, coarser, same_dtype=True):
        return finer
    block_c, block_w = blocks(finer.shape[1], finer.shape[3], finer.stride(1))
    (_, c, h_in, w_in), (h_out, w_out) = coarser.shape, finer.shape[2:]
    with on_device(finer):
        profiled(kernel)[_grid(finer, block_c, block_w)](
            *maps, c, h_in, w_in, h_out, w_out, *(s for t in maps for s in t.stride()), _scale(h_in, h_out),
            _scale(w_in, w_out), BLOCK_C=block_c, BLOCK_W=block_w, WIDE=_wide(finer, coarser), num_warps=WARPS,
        )  # fmt: skip
    return finer

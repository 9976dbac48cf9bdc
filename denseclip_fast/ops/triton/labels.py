"""The Triton kernel of predict's last step on a GPU: the class scores resized bilinearly to the image and their
argmax over the classes, in one pass (engine.segmenter.labels, through engine.cuda_resample.resize_argmax_).

Why: resize-then-argmax writes every class's float32 plane at the image's size and reads it back. For RN50 at
512x512 with 150 classes that is 157 MB written (the resize took 169 us in ATen on an H200; the Triton resize's
launches about as long: benchmarks/results/h200_2026-12-04c/e2e_rn50_whole.md) and 157 MB read by the max over the
classes, to produce 2 MB of labels. Here each program takes one output row of an image and a block of its columns,
makes the resized values of a block of classes at a time in registers (from the score map's four taps, which stay
in the caches: the whole map is 4.9 MB at batch 1) and keeps the running best class; nothing of image size but
the labels (and the best values, for a caller that offers the classes in chunks) is written.

Values: each resized value is resample.py's bilinear kernel's (the same jit helpers :func:`resample._source` and
:func:`resample._interpolate`, whose fused multiply-adds are written out: left to the compiler, some elements of this
kernel's tile had contracted the other product of a sum), so the labels equal the argmax of the logits the engine's
resize gives, pixel for pixel. Argmax as ``torch.max``: the first class of a tie,
a NaN beats every number and the first NaN stays (:func:`_better`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backends import MAX_GRID_Y
from .common import cdiv, class_blocks, on_device, profiled
from .resample import _check_4d, _check_size, _check_tiling, _index, _interpolate, _output_row, _scale, _wide

BLOCK_C = 32  # classes a program resizes at a time
TILE = 2048  # values a program holds at a time (classes x columns)
WARPS = 8
# the running index before any class: every class index is below it, so a class wins a tie with it
NONE: tl.constexpr = tl.constexpr(2**31 - 1)


@triton.jit
def _better(a, ia, b, ib):
    """The better of two (value, class) candidates, elementwise, as torch.max picks: the larger value; a NaN beats a
    number; of equal values (or two NaNs) the lower class."""
    a_nan = a != a
    b_nan = b != b
    take_a = (a > b) | (a_nan & ~b_nan) | (((a == b) | (a_nan & b_nan)) & (ia < ib))
    return tl.where(take_a, a, b), tl.where(take_a, ia, ib)


@triton.jit
def _bilinear_argmax_kernel(
    x_ptr, best_ptr, index_ptr, C, H_in, W_in, H_out, W_out,
    s_xn, s_xc, s_xh, s_xw, s_bn, s_bh, s_bw, s_in, s_ih, s_iw,
    scale_h, scale_w, first,
    START: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    n, oh, o_w, inside, h0, h1, lh0, lh1, w0, w1, lw0, lw1 = _output_row(H_in, W_in, H_out, W_out, scale_h, scale_w,
                                                                         BLOCK_W, WIDE)  # fmt: skip
    left, right = w0[None, :] * s_xw, w1[None, :] * s_xw
    lw0, lw1 = lw0[None, :], lw1[None, :]
    best_at = best_ptr + n * s_bn + oh * s_bh + o_w * s_bw
    index_at = index_ptr + n * s_in + oh * s_ih + o_w * s_iw
    if START:  # nothing offered yet: every class beats this (NONE loses every tie)
        best = tl.full((BLOCK_W,), float("-inf"), tl.float32)
        index = tl.full((BLOCK_W,), NONE, tl.int32)
    else:
        best = tl.load(best_at, mask=inside, other=float("-inf"))
        index = tl.load(index_at, mask=inside, other=NONE).to(tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & inside[None, :]
        base = x_ptr + n * s_xn + _index(offs_c, WIDE)[:, None] * s_xc
        value = _interpolate(base + h0 * s_xh, base + h1 * s_xh, left, right, mask, lh0, lh1, lw0, lw1)
        # classes past the last: -inf of index NONE, so they lose to any class (first + their offset, which could
        # wrap past int32 for a first near the limit, is never used)
        value = tl.where(mask, value, float("-inf"))
        classes = tl.where(offs_c < C, first + offs_c, NONE)
        # the block's best: its first NaN if it has one, else the first class of its largest value (three plain
        # reductions: a tl.reduce of (value, class) pairs through _better took 5x longer under the interpreter)
        nan = value != value
        has_nan = tl.max(nan.to(tl.int32), 0) > 0
        top = tl.max(value, 0)
        pick = tl.where(has_nan[None, :], nan, value == top[None, :])
        block_index = tl.min(tl.where(pick, classes[:, None], NONE), 0)
        best, index = _better(tl.where(has_nan, float("nan"), top), block_index, best, index)
    tl.store(best_at, best, mask=inside)
    tl.store(index_at, index.to(index_ptr.dtype.element_ty), mask=inside)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors' bytes overlap."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class LabelTiling(NamedTuple):
    """How the fused kernel splits its work: classes resized at a time, output columns a program, warps
    (:func:`label_tiling`'s choice unless a caller, such as benchmarks/bench_resample.py's sweep, gives one)."""

    block_c: int
    block_w: int
    warps: int


def label_tiling(classes: int, width: int) -> LabelTiling:
    """BLOCK_C classes at a time (fewer if there are fewer), columns to fill TILE values, WARPS warps."""
    return LabelTiling(*class_blocks(classes, width, BLOCK_C, TILE), WARPS)


def bilinear_argmax_(x: torch.Tensor, best: torch.Tensor, index: torch.Tensor, first: int,
                     tile: LabelTiling | None = None) -> None:  # fmt: skip
    """Offer the classes of ``x`` (N, K, h, w), any float dtype and strides, resized bilinearly (align_corners=False,
    as ``F.interpolate``, values as :func:`resample.bilinear_into` makes them in float32) to the size of ``best``, to
    the running argmax ``best`` (N, H, W) float32 / ``index`` (N, H, W) int64 as classes first .. first + K - 1, in
    place: a class replaces the best so far where its value is larger, or NaN after a number (the first class of a
    tie, and the first NaN, stay). ``first`` 0 starts the argmax: best and index are written, not read. ``tile``:
    the launch's :class:`LabelTiling` (:func:`label_tiling`'s when None), which changes the speed, not a value."""
    _check_4d("bilinear_argmax_", x)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ValueError(f"bilinear_argmax_: first must be an int >= 0, got {first!r}")
    n, k, h_in, w_in = x.shape
    if best.dtype != torch.float32 or index.dtype != torch.int64 or best.shape != index.shape or best.dim() != 3:
        raise ValueError(f"bilinear_argmax_: best and index must be (N, H, W) float32 and int64 of one shape, got "
                         f"{best.dtype} {tuple(best.shape)} and {index.dtype} {tuple(index.shape)}")  # fmt: skip
    if best.shape[0] != n or best.device != x.device or index.device != x.device:
        raise ValueError(f"bilinear_argmax_: scores {tuple(x.shape)} on {x.device} do not fit best "
                         f"{tuple(best.shape)} on {best.device} and index on {index.device} (same N and device "
                         "expected)")  # fmt: skip
    if not (best.is_contiguous() and index.is_contiguous()):
        raise ValueError("bilinear_argmax_: best and index must be contiguous (N, H, W) tensors (an expanded or "
                         "strided one would have pixels share an element)")  # fmt: skip
    if best.numel() and _overlap(best, index):
        raise ValueError("bilinear_argmax_: best and index share memory")
    if first + k >= NONE.value:
        raise ValueError(f"bilinear_argmax_: classes {first}..{first + k - 1} pass the kernel's int32 class index")
    h_out, w_out = best.shape[1:]
    if best.numel() == 0:
        return
    if x.numel() == 0:
        raise ValueError(f"bilinear_argmax_: scores {tuple(x.shape)} have nothing to offer (K, h and w >= 1 "
                         "expected)")  # fmt: skip
    t = label_tiling(k, w_out) if tile is None else tile
    _check_tiling("bilinear_argmax_", t)
    grid = (n * h_out, cdiv(w_out, t.block_w))
    if grid[1] > MAX_GRID_Y:
        raise ValueError(f"bilinear_argmax_: an output of {w_out} columns is past the launch grid's limit")
    with on_device(x):
        profiled(_bilinear_argmax_kernel)[grid](
            x, best, index, k, h_in, w_in, h_out, w_out, *x.stride(), *best.stride(), *index.stride(),
            _scale(h_in, h_out), _scale(w_in, w_out), first, START=first == 0, BLOCK_C=t.block_c,
            BLOCK_W=t.block_w, WIDE=_wide(x, best, index), num_warps=t.warps,
        )  # fmt: skip


def bilinear_argmax(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """int64 (N, H, W) labels: the argmax over the classes of ``x`` (N, K, h, w) resized to ``size`` (H, W), as
    ``resample.bilinear(x, size, torch.float32).max(dim=1).indices`` gives them, without the resized scores."""
    _check_4d("bilinear_argmax", x)
    _check_size("bilinear_argmax", size)
    best = torch.empty((x.shape[0], *size), dtype=torch.float32, device=x.device)
    index = torch.empty((x.shape[0], *size), dtype=torch.int64, device=x.device)
    bilinear_argmax_(x, best, index, 0)
    return index

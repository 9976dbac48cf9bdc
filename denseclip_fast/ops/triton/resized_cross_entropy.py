"""Triton kernels of the training loss's cross-entropy of logits resized to the label, with the resize fused in:
``F.cross_entropy(F.interpolate(x, label_size, mode="bilinear", align_corners=False), label, reduction="none")``
and its gradient with respect to x, without the label-size logits ever in memory.

Why: the official loss upsamples the head's logits (and the aux score map) 4x to the label before its cross-entropy.
At RN50 512x512 batch 16 with 150 classes the upsampled logits are a float32 matrix of 2.5 GB, written by the
resize, read by the loss forward, again by its backward, which writes their gradient (2.5 GB more), read by the
resize's backward: on an H200 the trainer's resizes and losses took about a fifth of its step
(benchmarks/results/h200_2026-12-04c/train_rn50_b16.md), and the two matrices a quarter of its 18 GB peak.

Forward, one program per (image, label row) and block of label columns: each block of classes' upsampled values made
in registers from the four taps of x (resample.py's jit helpers, so the values are the resize kernel's), an online
log-sum-exp over the blocks, the label's own value made the same way; it writes the loss and the log-sum-exp of each
label pixel (what the backward needs: 8 bytes a pixel, not 600).

Backward, the resize's gradient in two gather passes as resample.bilinear_backward's, the first fused with the loss's
gradient: the width pass makes, for one label row, each x column's gradient g (softmax - onehot) of every label
column its weights reach (the upsampled values made again from x, exp'd against the saved log-sum-exp) and sums
them into a float32 (N, K, label rows, x columns) map, a quarter of the label-size matrix at 4x; the height pass is
resample.height_pass. Each label pixel's values are made about three times (resample._taps' bound of columns a source
column gathers, at 4x 12 where 8 carry a weight): arithmetic from cached taps instead of 5 GB of traffic.

float32 throughout; exp and log are the GPU's fast ones (ex2, lg2), and the log-sum-exp adds its classes in blocks
(BLOCK_C at a time, rescaled online), so the loss is PyTorch's within float32 rounding, not bit for bit. A label that
is neither a class nor the ignore index gives that pixel a NaN loss (train/cross_entropy.py's rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, class_blocks, on_device, profiled
from .cross_entropy import LOG2E
from .resample import (
    _check_4d,
    _first_tap,
    _index,
    _interpolate,
    _output_row,
    _scale,
    _source,
    _taps,
    _weight,
    _wide,
    height_pass,
    layout_of,
)

BLOCK_C = 32  # classes a program makes at a time
TILE = 2048  # values a program holds at a time (classes x columns)
WARPS = 8


@triton.jit
def _resized_ce_fwd_kernel(
    x_ptr, label_ptr, loss_ptr, lse_ptr, C, H_in, W_in, H_out, W_out,
    s_xn, s_xc, s_xh, s_xw, s_ln, s_lh, s_lw,
    scale_h, scale_w, ignore_index,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    n, oh, o_w, inside, h0, h1, lh0, lh1, w0, w1, lw0, lw1 = _output_row(H_in, W_in, H_out, W_out, scale_h, scale_w,
                                                                         BLOCK_W, WIDE)  # fmt: skip
    running_max = tl.full((BLOCK_W,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_W,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & inside[None, :]
        base = x_ptr + n * s_xn + _index(offs_c, WIDE)[:, None] * s_xc
        z = _interpolate(base + h0 * s_xh, base + h1 * s_xh, w0[None, :] * s_xw, w1[None, :] * s_xw, mask,
                         lh0, lh1, lw0[None, :], lw1[None, :])  # fmt: skip
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # every value -inf so far: nothing to rescale
        running_sum = running_sum * tl.exp2((running_max - safe) * LOG2E) + tl.sum(
            tl.exp2((z - safe[None, :]) * LOG2E), axis=0
        )
        running_max = new_max
    # a NaN among the logits: the maxima skip it, the sum carries it (NaN == 0 is false), so lse and the loss
    # are NaN, as PyTorch's (a guard of running_sum > 0 had turned a NaN sum into 1: a finite, wrong loss)
    lse = running_max + tl.log2(tl.where(running_sum == 0, 1.0, running_sum)) / LOG2E
    label = tl.load(label_ptr + n * s_ln + oh * s_lh + o_w * s_lw, mask=inside, other=ignore_index)
    valid = (label >= 0) & (label < C)
    base = x_ptr + n * s_xn + _index(tl.where(valid, label, 0), WIDE) * s_xc  # the label's class, per column
    picked = _interpolate(base + h0 * s_xh, base + h1 * s_xh, w0 * s_xw, w1 * s_xw, inside & valid,
                          lh0, lh1, lw0, lw1)  # fmt: skip
    loss = tl.where(label == ignore_index, 0.0, tl.where(valid, lse - picked, float("nan")))
    pixel = (n * H_out + oh) * W_out + o_w  # loss and lse: contiguous (N, H, W)
    tl.store(loss_ptr + pixel, loss, mask=inside)
    tl.store(lse_ptr + pixel, lse, mask=inside)


@triton.jit
def _resized_ce_grad_w_kernel(
    x_ptr, label_ptr, lse_ptr, g_ptr, out_ptr, C, H_in, W_in, H_out, W_out,
    s_xn, s_xc, s_xh, s_xw, s_ln, s_lh, s_lw, s_on, s_oc, s_oh, s_ow,
    scale_h, scale_w, inv_scale_w, TAPS, ignore_index,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """out (N, C, H_out, W_in) = the loss's gradient with respect to the label-size logits (g (softmax - onehot),
    0 at an ignored pixel), made from x, summed over the label columns of each x column with the resize's weights;
    one label row a program, a block of classes and one of x columns."""
    row = tl.program_id(0)
    n = row // H_out
    oh = row - n * H_out
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    in_c, in_j = offs_c < C, offs_j < W_in
    h0, h1, lh0, lh1 = _source(oh, scale_h, H_in)
    lo = _first_tap(offs_j, inv_scale_w)
    n, oh, h0, h1 = _index(n, WIDE), _index(oh, WIDE), _index(h0, WIDE), _index(h1, WIDE)
    c_idx = _index(offs_c, WIDE)
    base = x_ptr + n * s_xn + c_idx[:, None] * s_xc
    top, bottom = base + h0 * s_xh, base + h1 * s_xh
    acc = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
    for t in range(TAPS):
        o = lo + t  # the label column each x column takes its t-th tap from
        ok = in_j & (o < W_out)
        weight = _weight(o, offs_j, W_in, scale_w)
        w0, w1, lw0, lw1 = _source(o, scale_w, W_in)
        o_idx = _index(o, WIDE)
        label = tl.load(label_ptr + n * s_ln + oh * s_lh + o_idx * s_lw, mask=ok, other=ignore_index)
        pixel = (n * H_out + oh) * W_out + o_idx
        lse = tl.load(lse_ptr + pixel, mask=ok, other=0.0)
        g = tl.where(ok & (label != ignore_index), tl.load(g_ptr + pixel, mask=ok, other=0.0), 0.0)
        mask = in_c[:, None] & ok[None, :]
        z = _interpolate(top, bottom, _index(w0, WIDE)[None, :] * s_xw, _index(w1, WIDE)[None, :] * s_xw, mask,
                         lh0, lh1, lw0[None, :], lw1[None, :])  # fmt: skip
        p = tl.exp2((z - lse[None, :]) * LOG2E)
        onehot = tl.where(offs_c[:, None] == label[None, :], 1.0, 0.0)
        acc += tl.where(mask, (weight * g)[None, :] * (p - onehot), 0.0)
    out = out_ptr + n * s_on + c_idx[:, None] * s_oc + oh * s_oh + _index(offs_j, WIDE)[None, :] * s_ow
    tl.store(out, acc, mask=in_c[:, None] & in_j[None, :])


def _blocks(classes: int, width: int) -> tuple[int, int]:
    return class_blocks(classes, width, BLOCK_C, TILE)


def _check(name: str, x: torch.Tensor, label: torch.Tensor) -> None:
    _check_4d(name, x)
    if x.dtype != torch.float32:
        raise ValueError(f"{name}: x must be float32 logits (N, K, h, w), got {x.dtype}")
    if label.dim() != 3 or label.dtype != torch.int64 or label.shape[0] != x.shape[0] or label.device != x.device:
        raise ValueError(f"{name}: label must be int64 (N, H, W) with N = {x.shape[0]} on {x.device}, got "
                         f"{label.dtype} of shape {tuple(label.shape)} on {label.device}")  # fmt: skip
    if x.shape[1] < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"{name}: x {tuple(x.shape)} has no class or no pixel to resize")


def resized_cross_entropy(x: torch.Tensor, label: torch.Tensor,
                          ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, lse), float32 (N, H, W) each: per label pixel ``F.cross_entropy(F.interpolate(x, (H, W),
    mode="bilinear", align_corners=False), label, ignore_index=..., reduction="none")`` and the log-sum-exp of its
    upsampled logits; x (N, K, h, w) float32 (any strides), label int64 (N, H, W)."""
    _check("resized_cross_entropy", x, label)
    n, k, h_in, w_in = x.shape
    h_out, w_out = label.shape[1:]
    loss = torch.empty((n, h_out, w_out), dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss)
    if loss.numel() == 0:
        return loss, lse
    block_c, block_w = _blocks(k, w_out)
    with on_device(x):
        profiled(_resized_ce_fwd_kernel)[(n * h_out, cdiv(w_out, block_w))](
            x, label, loss, lse, k, h_in, w_in, h_out, w_out, *x.stride(), *label.stride(),
            _scale(h_in, h_out), _scale(w_in, w_out), ignore_index, BLOCK_C=block_c, BLOCK_W=block_w,
            WIDE=_wide(x, label, loss),
            num_warps=WARPS,
        )  # fmt: skip
    return loss, lse


def resized_cross_entropy_backward(grad: torch.Tensor, x: torch.Tensor, label: torch.Tensor, lse: torch.Tensor,
                                   ignore_index: int) -> torch.Tensor:  # fmt: skip
    """The gradient of :func:`resized_cross_entropy`'s loss with respect to x given ``grad`` (N, H, W), the loss's,
    and its saved ``lse``: float32, x's shape, in x's layout (channels_last where x is)."""
    _check("resized_cross_entropy_backward", x, label)
    for name, t in (("grad", grad), ("lse", lse)):
        if t.shape != label.shape or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"resized_cross_entropy_backward: {name} must be a float {tuple(label.shape)} tensor on "
                             f"{x.device}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")  # fmt: skip
    n, k, h_in, w_in = x.shape
    h_out, w_out = label.shape[1:]
    layout = layout_of(x)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=layout)
    if label.numel() == 0:
        return out.zero_()
    grad, lse = grad.float().contiguous(), lse.float().contiguous()
    narrow = torch.empty((n, k, h_out, w_in), dtype=torch.float32, device=x.device, memory_format=layout)
    scale, inv, taps = _taps(w_in, w_out)
    block_c, block_j = _blocks(k, w_in)
    with on_device(x):
        profiled(_resized_ce_grad_w_kernel)[(n * h_out, cdiv(k, block_c), cdiv(w_in, block_j))](
            x, label, lse, grad, narrow, k, h_in, w_in, h_out, w_out, *x.stride(), *label.stride(),
            *narrow.stride(), _scale(h_in, h_out), scale, inv, taps, ignore_index, BLOCK_C=block_c,
            BLOCK_J=block_j, WIDE=_wide(x, label, narrow, lse, grad), num_warps=WARPS,
        )  # fmt: skip
    return height_pass(narrow, out)

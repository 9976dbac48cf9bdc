"""Triton kernels of the training loss's per-pixel cross-entropy over a (pixels, classes) matrix of float32 logits
(the label-size logits of a channels_last map, each pixel's classes contiguous): forward and backward, each one
pass over the logits.

Why: PyTorch's F.cross_entropy is a log_softmax that writes the log-probabilities (saved for its backward) and an
NLL that picks one of each row; its backward writes a zero-filled matrix, scatters into it, and reads it and the
log-probabilities to write the gradient: five passes over a matrix of 2.5 GB at RN50 512x512 batch 16 with 150
classes, two of them writes the kernels below do not make. The forward here reads the logits once and writes a
loss and a log-sum-exp a row; the backward reads them once and writes the gradient.

Forward, one program per BLOCK_M rows: the row's maximum and sum of exponentials over the classes in blocks of
BLOCK_K (online: each block rescales the running sum), lse = max + log(sum); loss = lse - logit[label], 0 where the
label is ignore_index, NaN where the label is neither a class nor ignore_index (no silent answer for a label the
data loader let through; PyTorch's CUDA kernel stops the process with a device assertion). Backward: g * (exp(logit
- lse) - [k == label]) from the saved lse, 0 in an ignored row. float32 throughout, as PyTorch's (the trainer
computes its losses in float32); exp and log are the GPU's fast ones (ex2, lg2: within a few units in the last place
of PyTorch's), not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2, on_device, profiled

# rows a program, classes a step (a row's classes in one step up to 256: ADE20K's 150), warps: 8 values a thread,
# 64 registers in the forward and 32 in the backward on sm_90 (ptxas; 16 rows took 128 and 164: fewer programs an SM)
BLOCK_M = 8
MAX_BLOCK_K = 256
WARPS = 8
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E), log(x) = log2(x) / LOG2E


@triton.jit
def _rows(M, s_m, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows (int64 offsets: a matrix past 2**31 elements is the common case) and the class offsets."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows.to(tl.int64) * s_m, tl.arange(0, BLOCK_K), rows < M


@triton.jit
def _ce_fwd_kernel(
    x_ptr, label_ptr, loss_ptr, lse_ptr, M, K, s_m, ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, base, cols, row_ok = _rows(M, s_m, BLOCK_M, BLOCK_K)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + base[:, None] + k[None, :], mask=mask, other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row of -inf so far: nothing to rescale
        running_sum = running_sum * tl.exp2((running_max - safe) * LOG2E) + tl.sum(
            tl.exp2((x - safe[:, None]) * LOG2E), axis=1
        )
        running_max = new_max
    # (a row of no class, or every logit -inf: lse -inf, as logsumexp; not log2(0), which the interpreter warns of)
    # a NaN among the logits: the maxima skip it, the sum carries it (NaN == 0 is false), so lse and the loss
    # are NaN, as PyTorch's (a guard of running_sum > 0 had turned a NaN sum into 1: a finite, wrong loss)
    lse = running_max + tl.log2(tl.where(running_sum == 0, 1.0, running_sum)) / LOG2E
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    valid = (label >= 0) & (label < K)
    picked = tl.load(x_ptr + base + tl.where(valid, label, 0), mask=row_ok & valid, other=0.0)
    loss = tl.where(label == ignore_index, 0.0, tl.where(valid, lse - picked, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _ce_bwd_kernel(
    g_ptr, x_ptr, label_ptr, lse_ptr, out_ptr, M, K, s_m, s_om, ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows, base, cols, row_ok = _rows(M, s_m, BLOCK_M, BLOCK_K)
    out_base = rows.to(tl.int64) * s_om
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    g = tl.where(label == ignore_index, 0.0, g)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + base[:, None] + k[None, :], mask=mask, other=0.0)
        p = tl.exp2((x - lse[:, None]) * LOG2E)
        grad = g[:, None] * (p - tl.where(k[None, :] == label[:, None], 1.0, 0.0))
        tl.store(out_ptr + out_base[:, None] + k[None, :], grad, mask=mask)


def _block_k(k: int) -> int:
    return min(next_power_of_2(max(k, 1)), MAX_BLOCK_K)


def _check(rows: torch.Tensor, label: torch.Tensor) -> None:
    if rows.dim() != 2 or rows.dtype != torch.float32 or rows.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows: rows must be a float32 (pixels, classes) matrix with contiguous rows, "
                         f"got {rows.dtype} of shape {tuple(rows.shape)} and strides {rows.stride()}")  # fmt: skip
    if label.shape != rows.shape[:1] or label.dtype != torch.int64 or label.device != rows.device:
        raise ValueError(f"cross_entropy_rows: label must be int64 of shape ({rows.shape[0]},) on {rows.device}, got "
                         f"{label.dtype} of shape {tuple(label.shape)} on {label.device}")  # fmt: skip


def cross_entropy_rows(rows: torch.Tensor, label: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse): each row's ``F.cross_entropy(rows, label, ignore_index=..., reduction="none")`` and log-sum-exp
    (float32, shape (M,)); ``label`` int64 (M,) contiguous."""
    _check(rows, label)
    m, k = rows.shape
    loss = torch.empty(m, dtype=torch.float32, device=rows.device)
    lse = torch.empty(m, dtype=torch.float32, device=rows.device)
    if m == 0:
        return loss, lse
    with on_device(rows):
        profiled(_ce_fwd_kernel)[(cdiv(m, BLOCK_M),)](
            rows, label.contiguous(), loss, lse, m, k, rows.stride(0), ignore_index,
            BLOCK_M=BLOCK_M, BLOCK_K=_block_k(k), num_warps=WARPS,
        )  # fmt: skip
    return loss, lse


def cross_entropy_rows_backward(grad: torch.Tensor, rows: torch.Tensor, label: torch.Tensor, lse: torch.Tensor,
                                ignore_index: int) -> torch.Tensor:  # fmt: skip
    """The gradient of :func:`cross_entropy_rows`'s loss with respect to ``rows`` given ``grad`` (M,), the loss's;
    a float32 (M, K) matrix with contiguous rows."""
    _check(rows, label)
    for name, t in (("grad", grad), ("lse", lse)):
        if t.shape != rows.shape[:1] or not t.is_floating_point() or t.device != rows.device:
            raise ValueError(f"cross_entropy_rows_backward: {name} must be a float ({rows.shape[0]},) tensor on "
                             f"{rows.device}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")  # fmt: skip
    m, k = rows.shape
    out = torch.empty((m, k), dtype=torch.float32, device=rows.device)
    if m == 0 or k == 0:
        return out
    with on_device(rows):
        profiled(_ce_bwd_kernel)[(cdiv(m, BLOCK_M),)](
            grad.float().contiguous(), rows, label.contiguous(), lse, out, m, k, rows.stride(0), out.stride(0),
            ignore_index, BLOCK_M=BLOCK_M, BLOCK_K=_block_k(k), num_warps=WARPS,
        )  # fmt: skip
    return out

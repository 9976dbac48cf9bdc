"""Triton kernels of context_attention: flash attention forward and backward, no mask, scale 1/sqrt(D).

Forward, one program per (batch * head, block of BLOCK_M queries): the query tile stays in registers while the
keys and values stream through in BLOCK_N blocks; scores on the tensor cores, online softmax in base 2 (running
max m and sum l, the accumulator rescaled by 2^(m_old - m_new)), then O = acc / l and the natural log-sum-exp
L = (m + log2 l) ln 2 for the backward. Memory: q, k, v read once per query block, O written once; the
Lq x Lk score matrix never exists. FLOPs 4 B H Lq Lk D.

Backward: delta_i = <dO_i, O_i> (a small kernel), then one program per key block accumulates dK and dV over all
query blocks, and one program per query block accumulates dQ over all key blocks, both recomputing
P = exp(S - L) from the saved L (the FlashAttention-2 split, no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backends import MAX_GRID_Y, TRITON_HEAD_DIMS, gpu_arch, shared_memory_per_block
from .common import cdiv, dot_in_f32, launch, next_power_of_2

HEAD_DIMS = TRITON_HEAD_DIMS  # what the kernels are compiled for (aot.py) and tested at

LOG2E = 1.4426950408889634


@triton.jit
def _rows(bh, offs, L, D: tl.constexpr):
    """Flat offsets of rows offs of one (batch, head) of a contiguous (B*H, L, D) tensor. Computed apart from any
    load: torch.compile's analysis of user kernels counts a tensor as written when a store goes through offsets a
    helper returned together with a load of it (and would clone q, k, v, dO and lse before each backward)."""
    return bh * L * D + offs[:, None] * D + tl.arange(0, D)[None, :]


@triton.jit
def _key_block(k_ptr, v_ptr, bh, offs_n, Lk, D: tl.constexpr):
    """Rows offs_n of K and V of one (batch, head), zeros past Lk."""
    rows = _rows(bh, offs_n, Lk, D)
    mask = offs_n[:, None] < Lk
    return tl.load(k_ptr + rows, mask=mask, other=0.0), tl.load(v_ptr + rows, mask=mask, other=0.0)


@triton.jit
def _query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, offs_m, Lq, D: tl.constexpr):
    """Rows offs_m of Q and dO of one (batch, head) with their log-sum-exp and delta, zeros past Lq."""
    rows = _rows(bh, offs_m, Lq, D)
    mask = offs_m < Lq
    q = tl.load(q_ptr + rows, mask=mask[:, None], other=0.0)
    do = tl.load(do_ptr + rows, mask=mask[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=mask, other=0.0)
    return q, do, lse, delta


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    Lq, Lk, H, qk_scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """q, k, v, o (B, H, L, D) of any (batch, head, row) element strides, D contiguous (a projection's (B, L, H, D)
    output seen as (B, H, L, D), or an output written so); lse (B*H, Lq) float32. qk_scale = log2(e) / sqrt(D)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh - b * H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < Lq
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=mask_m[:, None],
                other=0.0)  # fmt: skip
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None])  # fmt: skip
    tl.store(lse_ptr + bh * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, Lq, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask = offs_m[:, None] < Lq
    ptr = bh * Lq * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(o_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    Lq, Lk, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Lk
    k, v = _key_block(k_ptr, v_ptr, bh, offs_n, Lk, D)
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Lq
        q, do, lse, delta = _query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, offs_m, Lq, D)
        s_t = _mm(k, tl.trans(q), DOT_F32) * sm_scale  # (BLOCK_N, BLOCK_M): S^T
        p_t = tl.exp(s_t - lse[None, :])
        p_t = tl.where(mask_m[None, :] & mask_n[:, None], p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, DOT_F32)
        dp_t = _mm(v, tl.trans(do), DOT_F32)  # (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :]) * sm_scale
        dk += _mm(ds_t.to(q.dtype), q, DOT_F32)
    kv_rows = _rows(bh, offs_n, Lk, D)
    tl.store(dk_ptr + kv_rows, dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None])
    tl.store(dv_ptr + kv_rows, dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    Lq, Lk, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Lq
    q, do, lse, delta = _query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, offs_m, Lq, D)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        k, v = _key_block(k_ptr, v_ptr, bh, offs_n, Lk, D)
        s = _mm(q, tl.trans(k), DOT_F32) * sm_scale
        p = tl.where(mask_n[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), DOT_F32)
        ds = p * (dp - delta[:, None]) * sm_scale
        dq += _mm(ds.to(k.dtype), k, DOT_F32)
    tl.store(dq_ptr + _rows(bh, offs_m, Lq, D), dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None])


KINDS = ("fwd", "dkdv", "dq")
SMEM_SHARE = 0.95  # of a GPU's shared memory per block that a float32 kernel's estimate may take


def smem_estimate(kind: str, d: int, block_m: int, block_n: int) -> int:
    """Shared memory in bytes of the float32 kernel ``kind`` at these blocks: an upper bound fitted to Triton
    3.6-3.8's compiled kernels (the same for sm_80 to sm_90; at most 6% above them; tests/test_triton_aot.py
    compiles and checks it). IEEE float32 dots stage float32 operand tiles in shared memory: ~4.25 words per
    element of the two tiles the loop streams (K and V in fwd and dq, Q and dO in dkdv), one or two words per
    element of the tile(s) held for the whole program, one per element of the score block. The 16-bit kernels
    take at most 58 KB at the blocks _blocks chooses, which every GPU Triton supports (sm_80+) has."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    loop, held = (block_m, block_n) if kind == "dkdv" else (block_n, block_m)
    return int(4 * (4.25 * d * loop + (1 if kind == "fwd" else 2) * d * held + block_m * block_n))


F32_BLOCK_M = {"fwd": 64, "dq": 32, "dkdv": 32}  # float32 kernels (FMA dots): query rows per block ...
F32_BLOCK_N = 32  # ... and keys (16 for dkdv at D=128: with 32, as the JIT compiles it, 16 B spilled on sm_90); at
# F32 warps no register spills (ptxas, sm_90, Triton 3.6 and 3.8), where 64 x 64 spilled up to 32 KB (dq at 64
# queries, as the JIT compiles it, 20 B with Triton 3.6)


def num_warps(kind: str, f32: bool, d: int = 64) -> int:
    """Warps per program of kernel ``kind``: 8 for the backward kernels, every float32 kernel and the forward at
    D=128 (at 4 their registers spilled, ptxas sm_90: 20 B for the 16-bit dkdv at D=64, 48 B for the forward at
    D=128 with Triton 3.6, kilobytes in float32), 4 for the other 16-bit forwards."""
    return 8 if f32 or kind != "fwd" or d > 64 else 4


def _blocks(
    lq: int, d: int, kind: str = "fwd", f32: bool = False, smem: int | None = None, arch: int | None = None
) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of kernel ``kind``: 64 queries (fewer when there are fewer), 64 keys (32 at D=128); in
    float32, F32_BLOCK_M queries and F32_BLOCK_N keys (16 and 16 for dkdv at D=128, 16 keys for dq there and for a
    dq of 16 queries: with 32 keys its generic compile spilled 8 B, at 4 warps with Triton 3.6, at 8 with 3.8), so
    that the registers do not spill (ptxas on sm_90 with Triton 3.6 and 3.8, as the JIT compiles the model's launches).
    Before Hopper (``arch`` < 90; None: the interpreter, sized as sm_90) the registers hold more of the products
    (no wgmma): the 16-bit dkdv takes 32 keys, and the float32 forward and dq at D=128 32 queries.
    A float32 kernel whose estimate passes SMEM_SHARE of ``smem`` halves the block its loop streams, then the other,
    down to 16: the fp32 forward at D=128 needs ~108 KB, more than the 99 KB of sm_86/sm_89 GPUs (dq there, at 32 x
    16, ~68 KB)."""
    block_m = 64 if lq > 32 else max(16, next_power_of_2(lq))
    block_n = 64 if d <= 64 else 32
    if f32:
        block_m = min(block_m, 16 if kind == "dkdv" and d > 64 else F32_BLOCK_M[kind])
        narrow = kind in ("dkdv", "dq") and d > 64 or kind == "dq" and block_m <= 16
        block_n = 16 if narrow else F32_BLOCK_N
    if arch is not None and arch < 90:
        if not f32 and kind == "dkdv":
            block_m, block_n = (min(block_m, 32), 32) if d > 64 else (block_m, 32)
        elif f32 and d > 64 and kind != "dkdv":
            block_m = min(block_m, 32)
    if f32 and smem is not None:
        while smem_estimate(kind, d, block_m, block_n) > SMEM_SHARE * smem and max(block_m, block_n) > 16:
            streamed_m = kind == "dkdv"
            if (block_m if streamed_m else block_n) > 16:
                block_m, block_n = (block_m // 2, block_n) if streamed_m else (block_m, block_n // 2)
            else:
                block_m, block_n = (block_m, block_n // 2) if streamed_m else (block_m // 2, block_n)
    return block_m, block_n


def _bh_slices(bh: int | torch.SymInt) -> list[slice]:
    """Pieces of the batch x heads axis that fit one launch's grid (one piece, all of it, in every realistic call:
    65535 is 2047 images through the 32-head attention pool of RN50). A symbolic size (AOTInductor compiling the
    operator for a dynamic batch) is one piece: range() over it specialised the package to the traced batch (2),
    which then returned a batch-2 result for any batch; to_aoti keeps its max_batch within the grid instead."""
    if not isinstance(bh, int):
        return [slice(0, bh)]
    return [slice(start, min(start + MAX_GRID_Y, bh)) for start in range(0, bh, MAX_GRID_Y)]


MAX_ROW_ELEMENTS = 2**31 - 1  # L x D of one (batch, head): the kernels' row offsets (offs * D) are int32


def check_lengths(lq: int, lk: int, d: int) -> None:
    """ValueError when a sequence's L x D would overflow the kernels' int32 row offsets (16.7M tokens at D=128;
    the operator's range is 65536 keys)."""
    if max(lq, lk) * d > MAX_ROW_ELEMENTS:
        raise ValueError(f"context_attention (triton): sequences of {max(lq, lk)} tokens x head dim {d} pass the "
                         f"kernels' int32 offsets ({MAX_ROW_ELEMENTS} elements a head); the cuda or reference backend "
                         "takes them")  # fmt: skip


def _rows_dense(t: torch.Tensor) -> bool:
    """Whether the forward kernel can read t (B, H, L, D) as it is: D contiguous (stride 1, or D == 1), and its row
    offsets within one (batch, head), (L - 1) x its row stride + D - 1, within the kernel's int32 (a strided view
    such as a packed q/k/v projection's, row stride 3 H D, passes it long before L x D does; a contiguous copy's row
    stride is D, which check_lengths bounds)."""
    return (t.shape[-1] == 1 or t.stride(-1) == 1) and _rows_fit(t.shape[2], t.stride(2), t.shape[3])


def _rows_fit(length: int, row_stride: int, d: int) -> bool:
    """Whether rows 0 .. length - 1 of ``row_stride`` elements apart, D elements each, have int32 offsets."""
    return (length - 1) * abs(row_stride) + d - 1 <= MAX_ROW_ELEMENTS


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q, k, v (B, H, L, D). The kernel reads each as it is where its rows are dense (a projection's
    (B, L, H, D) output viewed as (B, H, L, D): no copy), else a contiguous copy. ``heads_last``: out is written as
    a (B, Lq, H, D) tensor seen as (B, H, Lq, D), so that ``out.transpose(1, 2).reshape(B, Lq, H * D)`` is a view
    (the model's next step; the engine's eager calls); else out is contiguous (the operator's, as its fake)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    check_lengths(lq, lk, d)
    pieces = _bh_slices(b * h)
    if len(pieces) > 1:  # views of (B*H, L, D) per launch: every tensor contiguous then
        q, k, v, heads_last = q.contiguous(), k.contiguous(), v.contiguous(), False
    q, k, v = (t if _rows_dense(t) else t.contiguous() for t in (q, k, v))
    if heads_last and not _rows_fit(lq, h * d, d):  # heads-last rows are H x D apart: contiguous then
        heads_last = False
    if heads_last:
        out = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    f32 = dot_in_f32(q.dtype)
    block_m, block_n = _blocks(lq, d, "fwd", f32, shared_memory_per_block(q.device), gpu_arch(q.device))
    for p in pieces:  # views of (B*H, 1, L, D) only when the grid needs more than one launch
        qp, kp, vp, op = (t.flatten(0, 1)[p].unsqueeze(1) if len(pieces) > 1 else t for t in (q, k, v, out))
        lp = lse.flatten(0, 1)[p] if len(pieces) > 1 else lse
        launch(_attn_fwd_kernel)[(cdiv(lq, block_m), p.stop - p.start)](
            qp, kp, vp, op, lp, lq, lk, qp.shape[1], LOG2E / math.sqrt(d), *_bhl_strides(qp), *_bhl_strides(kp),
            *_bhl_strides(vp), *_bhl_strides(op), D=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=f32,
            num_warps=num_warps("fwd", f32, d),
        )  # fmt: skip
    return out, lse


def _bhl_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) element strides of t (B, H, L, D)."""
    return t.stride(0), t.stride(1), t.stride(2)


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    check_lengths(lq, lk, d)
    if q.numel() == 0:  # the fake kernel's layouts (k and v need not be empty)
        fmt = torch.contiguous_format
        return (torch.zeros_like(q, memory_format=fmt), torch.zeros_like(k, memory_format=fmt),
                torch.zeros_like(v, memory_format=fmt))  # fmt: skip
    q, k, v, out, do = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), grad_out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    f32 = dot_in_f32(q.dtype)
    smem, arch = shared_memory_per_block(q.device), gpu_arch(q.device)
    m_kv, n_kv = _blocks(lq, d, "dkdv", f32, smem, arch)
    m_q, n_q = _blocks(lq, d, "dq", f32, smem, arch)
    scale = 1.0 / math.sqrt(d)
    pieces = _bh_slices(b * h)
    for p in pieces:  # views of (B*H, L, D) only when the grid needs more than one launch
        qp, kp, vp, op, dop, lp, dp, dqp, dkp, dvp = (
            t.flatten(0, 1)[p] if len(pieces) > 1 else t for t in (q, k, v, out, do, lse, delta, dq, dk, dv)
        )
        n = p.stop - p.start
        launch(_attn_bwd_delta_kernel)[(cdiv(lq, m_q), n)](op, dop, dp, lq, D=d, BLOCK_M=m_q)
        launch(_attn_bwd_dkdv_kernel)[(cdiv(lk, n_kv), n)](
            qp, kp, vp, dop, lp, dp, dkp, dvp, lq, lk, scale, D=d, BLOCK_M=m_kv, BLOCK_N=n_kv, DOT_F32=f32,
            num_warps=num_warps("dkdv", f32, d),
        )
        launch(_attn_bwd_dq_kernel)[(cdiv(lq, m_q), n)](
            qp, kp, vp, dop, lp, dp, dqp, lq, lk, scale, D=d, BLOCK_M=m_q, BLOCK_N=n_q, DOT_F32=f32,
            num_warps=num_warps("dq", f32, d),
        )
    return dq, dk, dv

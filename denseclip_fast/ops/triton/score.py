"""Triton kernels of pixel_text_score (forward, backward) and score_concat.

Forward, one program per (batch, block of BLOCK_P pixels, block of BLOCK_K classes). Loop over C in BLOCK_C
chunks: load the visual tile (BLOCK_C x BLOCK_P) and the text tile (BLOCK_K x BLOCK_C), accumulate their product
on the tensor cores (float32 accumulator) together with the squared norms of both; at the end divide by
max(norm, eps) on both sides and multiply by scale. s = <t, v> / (max|t| max|v|) equals F.normalize on both sides
followed by the dot product. Memory traffic: visual is read once when BLOCK_K >= K (one class block), the text
(K x C, small) once per program from L2 (each tile twice, see the kernel), the output written once: bytes =
|visual| + |out| (+ L2-resident text). Two alternatives for 16-bit maps, chosen by the batch's pixels (ROWS_FROM,
TEXT_NORMS_FROM; neither yet timed on a GPU, so off): the text norms from a launch of their own (_text_norm_kernel)
spare each program the second load of its text tiles; _score_fwd_rows_kernel, the transposed product with those
norms, reads each visual tile once too (ROWS_TAIL_K, off: with its classes as a block and a smaller tail, fewer
padded columns of products). A third, for grids of too few programs (SPLIT_C_PER_SM, off too):
_score_fwd_split_kernel splits the channels over programs, the last of a tile's programs summing their partials.
FLOPs = 2 B K C H W. Strides are arguments, so NCHW and NHWC visual (and any strided output view, which is how
score_concat writes into its concatenated buffer) use the same kernel.

The forward also writes |v| per pixel ((B, H, W) float32, B x P x 4 bytes: as the attention's log-sum-exp, for the
backward; the operators return it and autograd saves it with the score map S).

Backward, five launches: (1) the text normalised, t^ and |t| (float32, K x C: small); (2) per pixel, the radial term
r = <v^, g^> / |v| from <v^, g^> = sum_k G S (0 where |v| < eps, as F.normalize's clamp); (3) the visual kernel, one
pass over the visual map: one program per (block of channels, range of pixel tiles, image) computes on each tile
g^ = scale * T^^T G on the tensor cores and writes dv = (g^ - v r) / max(|v|, eps) -- with |v| saved, nothing
needs all the channels of a pixel, so the channels split across programs -- and, up to FUSED_MAX_K classes, the
text half on the same tiles: scale x the sum over its pixels of G v^^T (v^ = v / max(|v|, eps), each element in
[-1, 1], so that no float16 operand overflows), a (K, BLOCK_C) float32 partial per program; (4) the partials summed
(over the splits, and over the batch when the text is shared: then one program row walks the whole batch); (5) the
text normalisation's Jacobian on the K x C result. Past FUSED_MAX_K classes (4) is a batched GEMM of G with the
normalised map, made an image at a time (cuBLAS; the visual map read twice). Traffic: the visual map read once and
dv written once, G and S read once from memory (G once more per channel block, from L2), partials of K x C floats
per split. FLOPs: g^ and the text half, twice the forward's.
A direct call without the forward's outputs runs the forward first.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ..backends import MAX_GRID_Y
from ..checks import check_like
from ..library import _image_strides_are, empty_score, memory_format_of, score_memory_format
from ..reference import NORM_EPS
from .common import cdiv, dot_in_f32, launch, next_power_of_2

# Images per launch: the kernels' grids give the batch their second or third axis, which CUDA caps at 65535 (an
# operator call with more, e.g. (N, C, 1, 1) region embeddings, runs in pieces of this many images).
MAX_BATCH = MAX_GRID_Y

EPS = NORM_EPS  # F.normalize's, a kernel argument


@triton.jit
def _index(offs, WIDE: tl.constexpr):
    """Element indices as int64 where a tensor's offsets within one image pass 2**31 (int32 otherwise: cheaper)."""
    if WIDE:  # one return statement: Triton 3.6 rejects returns of different types even under a constexpr if
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _clamp_min(x, eps):
    """max(x, eps) with NaN kept, as torch's clamp_min (compiled tl.maximum is PTX max.f32, which drops NaN: a NaN
    pixel's 1 / max(|v|, eps) would become 1e12 and its gradient finite)."""
    return tl.maximum(x, eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _visual_offsets(b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp):
    """Element offsets and mask of the (BLOCK_C, BLOCK_P) tile of image b in a tensor with visual's strides. Kept
    apart from any pointer: torch.compile's analysis of user kernels counts a tensor as written when a store goes
    through offsets a helper returned together with a load of it (and would clone visual before each backward)."""
    return b * s_vb + offs_c[:, None] * s_vc + offs_p[None, :] * s_vp, (offs_c[:, None] < C) & (offs_p[None, :] < P)


@triton.jit
def _forward_program(P, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    """The forwards' program: (class block, image, its pixels and their mask, its classes and their mask), from its
    grid position (pixel block, class block, image)."""
    return _program_of(tl.program_id(1), P, K, BLOCK_P, BLOCK_K, WIDE)


@triton.jit
def _program_of(pid_k, P, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    """_forward_program's tuple for class block ``pid_k`` (the split forward's grid row holds its splits too)."""
    offs_p = _index(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), WIDE)
    offs_k = _index(pid_k * BLOCK_K + tl.arange(0, BLOCK_K), WIDE)
    return pid_k, tl.program_id(2).to(tl.int64), offs_p, offs_p < P, offs_k, offs_k < K


@triton.jit
def _score_fwd_kernel(
    v_ptr, t_ptr, out_ptr, n_ptr, tn_ptr,
    C, P, K,
    s_vb, s_vc, s_vp,
    s_tb, s_tk, s_tc, s_nb,
    s_ob, s_ok, s_op,
    scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    TEXT_NORMS: tl.constexpr,
):  # fmt: skip
    """TEXT_NORMS: |t| read from tn_ptr (float32, element b * s_nb + k: _text_norm_kernel's, launched before) instead
    of summed here from a second load of every text tile (see below), which halves the text's traffic from L2: per
    program K x C elements, against BLOCK_P x C of the visual map. Otherwise tn_ptr is not read."""
    pid_k, b, offs_p, mask_p, offs_k, mask_k = _forward_program(P, K, BLOCK_P, BLOCK_K, WIDE)
    acc, v_sq, t_sq = _products(v_ptr, t_ptr, b, offs_p, offs_k, mask_k, 0, C, C, P, s_vb, s_vc, s_vp, s_tb, s_tk,
                                s_tc, BLOCK_P, BLOCK_K, BLOCK_C, DOT_F32, WIDE, TEXT_NORMS)  # fmt: skip
    _store_scores(acc, v_sq, t_sq, out_ptr, n_ptr, tn_ptr, b, pid_k, P, s_nb, s_ob, s_ok, s_op, offs_p, mask_p, offs_k,
                  mask_k, scale, eps, TEXT_NORMS)  # fmt: skip


@triton.jit
def _products(
    v_ptr, t_ptr, b, offs_p, offs_k, mask_k, c_begin, c_end, C, P, s_vb, s_vc, s_vp, s_tb, s_tk, s_tc,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    TEXT_NORMS: tl.constexpr,
):  # fmt: skip
    """Over channels c_begin .. c_end (BLOCK_C at a time; C, all of them, bounds the masks): the (BLOCK_K, BLOCK_P)
    float32 products of the program's classes and pixels, the pixels' squared sums and (not under TEXT_NORMS) the
    classes'."""
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    v_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    t_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_C):
        offs_c = _index(c0 + tl.arange(0, BLOCK_C), WIDE)
        mask_c = offs_c < C
        v_offs, v_mask = _visual_offsets(b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp)
        t_offs = b * s_tb + offs_k[:, None] * s_tk + offs_c[None, :] * s_tc
        t_mask = mask_k[:, None] & mask_c[None, :]
        v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
        t = tl.load(t_ptr + t_offs, mask=t_mask, other=0.0)
        # 16-bit: the norms from loads of their own, not from the dot's tiles. Triton's software pipelining on Hopper
        # (3.6 to 3.8) gives a loaded tile that feeds an asynchronous wgmma and other code (here the squared
        # sums) one shared-memory buffer too few: the next tiles' asynchronous copies go into the buffer the
        # still-running wgmma reads (in the TTGIR: 2 buffers with 2 tiles in flight, the wait at pendings = 1;
        # triton-lang/triton#6691). On an H200 that made 16-bit NCHW scores 3-14% wrong. A second load of the
        # same elements, with a cache modifier so that it is not merged with the first (.cg: L2, where the first
        # load brought them), leaves the dot's tiles to the dot: 3 buffers. Read from L2 twice, from memory once.
        # (aot.wgmma_operand_races finds the pattern in the compiled kernels, in CI.) Float32 products are FMAs on
        # registers, no wgmma: their tiles serve both (a second load spilled 104 B of registers at 150 classes).
        # TEXT_NORMS: no second load of the text tile (the norms come from tn_ptr).
        if DOT_F32:
            vf = v.to(tl.float32)
            tf = t.to(tl.float32)
        else:
            vf = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            if not TEXT_NORMS:
                tf = tl.load(t_ptr + t_offs, mask=t_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        v_sq += tl.sum(vf * vf, axis=0)
        if not TEXT_NORMS:
            t_sq += tl.sum(tf * tf, axis=1)
        if DOT_F32:
            acc = tl.dot(tf, vf, acc, input_precision="ieee")
        else:
            acc = tl.dot(t, v, acc)
    return acc, v_sq, t_sq


@triton.jit
def _store_scores(
    acc, v_sq, t_sq, out_ptr, n_ptr, tn_ptr, b, pid_k, P, s_nb, s_ob, s_ok, s_op, offs_p, mask_p, offs_k, mask_k,
    scale, eps, TEXT_NORMS: tl.constexpr,
):  # fmt: skip
    """The scores from a (BLOCK_K, BLOCK_P) tile of products and the squared sums over all channels (|v| written too,
    see _inverse_norms)."""
    inv_v, inv_t = _inverse_norms(v_sq, t_sq, n_ptr, tn_ptr, b, pid_k, P, s_nb, offs_p, mask_p, offs_k, mask_k, eps,
                                  TEXT_NORMS)  # fmt: skip
    out = acc * (inv_t * scale)[:, None] * inv_v[None, :]
    tl.store(
        out_ptr + b * s_ob + offs_k[:, None] * s_ok + offs_p[None, :] * s_op,
        out.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_p[None, :],
    )  # fmt: skip


@triton.jit
def _inverse_norms(
    v_sq, t_sq, n_ptr, tn_ptr, b, pid_k, P, s_nb, offs_p, mask_p, offs_k, mask_k, eps, TEXT_NORMS: tl.constexpr
):  # fmt: skip
    """The forwards' 1 / max(|v|, eps) per pixel and 1 / max(|t|, eps) per class, from the summed squares (|t| read
    from tn_ptr instead under TEXT_NORMS); |v| written to n_ptr, the backward's (B, P) float32, by the programs of
    the first class block only."""
    norm = tl.sqrt(v_sq)
    if pid_k == 0:
        tl.store(n_ptr + b * P + offs_p, norm, mask=mask_p)
    if TEXT_NORMS:
        t_norm = tl.load(tn_ptr + b * s_nb + offs_k, mask=mask_k, other=1.0)
    else:
        t_norm = tl.sqrt(t_sq)
    return 1.0 / _clamp_min(norm, eps), 1.0 / _clamp_min(t_norm, eps)


FINISH_K = tl.constexpr(32)  # the split forward's last program sums and writes this many classes at a time


@triton.jit
def _score_fwd_split_kernel(
    v_ptr, t_ptr, out_ptr, n_ptr, tn_ptr, part_ptr, count_ptr,
    C, P, K, splits, per_split,
    s_vb, s_vc, s_vp,
    s_tb, s_tk, s_tc, s_nb,
    s_ob, s_ok, s_op,
    scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    TEXT_NORMS: tl.constexpr,
):  # fmt: skip
    """_score_fwd_kernel's scores with the channels split ``splits`` ways (Split-C: more programs where the pixels
    alone give too few for the GPU, each walking per_split channels, a multiple of BLOCK_C, instead of all C). Grid
    (pixel blocks, class blocks x splits, images): program (p, k * splits + s) takes channels s * per_split ...
    Each program writes its (BLOCK_K, BLOCK_P) float32 products and its squared sums to its slot of part_ptr
    (SLOT floats: products, pixels' squares, classes' squares), then counts itself in count_ptr, one int32 per
    (image, class block, pixel block), zero before the launch. The tile's last program to count sums the slots in
    split order (the same sum whichever arrives last) and writes the scores and |v| as _score_fwd_kernel does.
    Ordering: a CTA barrier after the slot's stores, then one thread's acq_rel atomic (the release covers the CTA's
    stores, as CUTLASS's semaphore), and the slots read from L2 (.cg) after the acquire."""
    pid_k, b, offs_p, mask_p, offs_k, mask_k = _program_of(tl.program_id(1) // splits, P, K, BLOCK_P, BLOCK_K, WIDE)
    pid_p, split = tl.program_id(0), tl.program_id(1) % splits
    c_begin = split * per_split
    acc, v_sq, t_sq = _products(v_ptr, t_ptr, b, offs_p, offs_k, mask_k, c_begin, tl.minimum(c_begin + per_split, C),
                                C, P, s_vb, s_vc, s_vp, s_tb, s_tk, s_tc, BLOCK_P, BLOCK_K, BLOCK_C, DOT_F32, WIDE,
                                TEXT_NORMS)  # fmt: skip
    tile = (b * (tl.num_programs(1) // splits) + pid_k) * tl.num_programs(0) + pid_p
    slot_size: tl.constexpr = BLOCK_K * BLOCK_P + BLOCK_P + BLOCK_K
    rows = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_P)
    tile_offs = rows[:, None] * BLOCK_P + cols[None, :]
    slots = part_ptr + tile * splits * slot_size
    slot = slots + split * slot_size
    tl.store(slot + tile_offs, acc, mask=mask_k[:, None])  # past K nothing: those rows are never read
    tl.store(slot + BLOCK_K * BLOCK_P + cols, v_sq)
    if not TEXT_NORMS:
        tl.store(slot + BLOCK_K * BLOCK_P + BLOCK_P + rows, t_sq)
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == splits - 1:
        v_all = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for s in range(0, splits):
            v_all += tl.load(slots + s * slot_size + BLOCK_K * BLOCK_P + cols, cache_modifier=".cg")
        # the classes FINISH_K at a time (the whole tile's sum beside the loaded slot spilled registers on sm_90)
        for k0 in range(0, tl.minimum(BLOCK_K, K - pid_k * BLOCK_K), FINISH_K):
            sub = k0 + tl.arange(0, FINISH_K)
            offs_sub = _index(pid_k * BLOCK_K + sub, WIDE)
            mask_sub = offs_sub < K
            sums = tl.zeros((FINISH_K, BLOCK_P), dtype=tl.float32)
            t_all = tl.zeros((FINISH_K,), dtype=tl.float32)
            for s in range(0, splits):
                part = slots + s * slot_size
                sums += tl.load(part + sub[:, None] * BLOCK_P + cols[None, :], mask=mask_sub[:, None], other=0.0,
                               cache_modifier=".cg")  # fmt: skip
                if not TEXT_NORMS:
                    t_all += tl.load(part + BLOCK_K * BLOCK_P + BLOCK_P + sub, mask=mask_sub, other=0.0,
                                    cache_modifier=".cg")  # fmt: skip
            # (|v| written again by each class step: the same values)
            _store_scores(sums, v_all, t_all, out_ptr, n_ptr, tn_ptr, b, pid_k, P, s_nb, s_ob, s_ok, s_op, offs_p,
                          mask_p, offs_sub, mask_sub, scale, eps, TEXT_NORMS)  # fmt: skip


@triton.jit
def _score_fwd_rows_kernel(
    v_ptr, t_ptr, out_ptr, n_ptr, tn_ptr,
    C, P, K,
    s_vb, s_vc, s_vp,
    s_tb, s_tk, s_tc, s_nb,
    s_ob, s_ok, s_op,
    scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    TEXT_NORMS: tl.constexpr, BLOCK_K2: tl.constexpr,
):  # fmt: skip
    """_score_fwd_kernel's scores (same arguments, same grid; TEXT_NORMS must be set) as the transposed product:
    pixels are the rows, V^T T^T, a (BLOCK_P, BLOCK_K) accumulator. The visual tile is the first operand, which a
    Hopper wgmma may take from registers: made from the loaded tile by an exact operation (+ 0.0, which no compiler
    pass folds away: -0.0 becomes +0.0, the same in every product), it is read from shared memory into registers
    once, synchronously, for both the squared norms and the product, so no second load is needed
    (aot.wgmma_operand_races: no race in the TTGIR). The text tile, the second operand, is read by the wgmma from
    shared memory and by nothing else: its norms come from tn_ptr (_text_norm_kernel). Per BLOCK_C channels a program
    reads BLOCK_P x BLOCK_C visual and K x BLOCK_C text elements from L2 once each (_score_fwd_kernel: each twice).
    For 16-bit maps (float32 products are FMAs on registers, where _score_fwd_kernel loads each tile once too; the
    interpreter's bfloat16 takes them).
    BLOCK_K2 > 0 (ROWS_TAIL_K; one class block, K <= BLOCK_K + BLOCK_K2): the classes past BLOCK_K in a second, smaller
    block with an accumulator and text tile of its own, the visual operand shared: 150 classes as 128 + 32 columns of
    products instead of 256, 171 as 128 + 64. (Compiled for sm_90, the two wgmmas then overlap the next channel step,
    one group in flight where the one-block kernel waits for all: the register operand is rewritten only after the
    wait that retires it. aot.wgmma_operand_races checks shared-memory operands only; ptxas guards the registers.)"""
    tl.static_assert(TEXT_NORMS, "the rows kernel reads the text norms")
    pid_k, b, offs_p, mask_p, offs_k, mask_k = _forward_program(P, K, BLOCK_P, BLOCK_K, WIDE)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    v_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    if BLOCK_K2 > 0:
        offs_k2 = _index(BLOCK_K + tl.arange(0, BLOCK_K2), WIDE)
        mask_k2 = offs_k2 < K
        acc2 = tl.zeros((BLOCK_P, BLOCK_K2), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = _index(c0 + tl.arange(0, BLOCK_C), WIDE)
        mask_c = offs_c < C
        v = tl.load(v_ptr + b * s_vb + offs_p[:, None] * s_vp + offs_c[None, :] * s_vc,
                    mask=mask_p[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        t = tl.load(t_ptr + b * s_tb + offs_c[:, None] * s_tc + offs_k[None, :] * s_tk,
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_C, BLOCK_K): T^T  # fmt: skip
        vf = v.to(tl.float32)
        v_sq += tl.sum(vf * vf, axis=1)
        if DOT_F32:
            acc = tl.dot(vf, t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot((vf + 0.0).to(v.dtype), t, acc)
        if BLOCK_K2 > 0:
            t2 = tl.load(t_ptr + b * s_tb + offs_c[:, None] * s_tc + offs_k2[None, :] * s_tk,
                         mask=mask_c[:, None] & mask_k2[None, :], other=0.0)  # fmt: skip
            if DOT_F32:
                acc2 = tl.dot(vf, t2.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot((vf + 0.0).to(v.dtype), t2, acc2)
    inv_v, inv_t = _inverse_norms(v_sq, None, n_ptr, tn_ptr, b, pid_k, P, s_nb, offs_p, mask_p, offs_k, mask_k, eps,
                                  True)  # the text's squares: none, its norms read  # fmt: skip
    _store_rows(out_ptr, acc, inv_v, inv_t, scale, b, offs_p, mask_p, offs_k, mask_k, s_ob, s_ok, s_op)
    if BLOCK_K2 > 0:
        inv_t2 = 1.0 / _clamp_min(tl.load(tn_ptr + b * s_nb + offs_k2, mask=mask_k2, other=1.0), eps)
        _store_rows(out_ptr, acc2, inv_v, inv_t2, scale, b, offs_p, mask_p, offs_k2, mask_k2, s_ob, s_ok, s_op)


@triton.jit
def _store_rows(out_ptr, acc, inv_v, inv_t, scale, b, offs_p, mask_p, offs_k, mask_k, s_ob, s_ok, s_op):
    """The rows kernel's scores from a (pixels, classes) tile of products and the inverse norms."""
    out = acc * (inv_t * scale)[None, :] * inv_v[:, None]
    tl.store(
        out_ptr + b * s_ob + offs_p[:, None] * s_op + offs_k[None, :] * s_ok,
        out.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_k[None, :],
    )  # fmt: skip


@triton.jit
def _grad_hat_tile(
    that_ptr, g_ptr, b, offs_c, mask_c, offs_p, mask_p, K,
    s_tb, s_tk, s_tc, s_gb, s_gk, s_gp, scale,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """g^ = scale * T^^T G on a (BLOCK_C, BLOCK_P) tile, summing over the classes in blocks of BLOCK_K. 16-bit
    gradients meet the normalised text rounded to their dtype on the 16-bit tensor cores (float32 accumulation, as
    the forward); float32 ones (and bfloat16 under the interpreter) multiply in IEEE float32."""
    gh = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = _index(k0 + tl.arange(0, BLOCK_K), WIDE)
        mask_k = offs_k < K
        tt = tl.load(
            that_ptr + b * s_tb + offs_k[None, :] * s_tk + offs_c[:, None] * s_tc,
            mask=mask_c[:, None] & mask_k[None, :], other=0.0,
        )  # (BLOCK_C, BLOCK_K) float32  # fmt: skip
        g = tl.load(
            g_ptr + b * s_gb + offs_k[:, None] * s_gk + offs_p[None, :] * s_gp,
            mask=mask_k[:, None] & mask_p[None, :], other=0.0,
        )  # (BLOCK_K, BLOCK_P)  # fmt: skip
        if DOT_F32:
            gh = tl.dot(tt, g.to(tl.float32), gh, input_precision="ieee")
        else:
            gh = tl.dot(tt.to(g.dtype), g, gh)
    return gh * scale


@triton.jit
def _score_bwd_pixel_kernel(
    g_ptr, s_ptr, n_ptr, r_ptr,
    P, K,
    s_gb, s_gk, s_gp,
    s_sb, s_sk, s_sp,
    eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """One program per (block of pixels, image): the radial term r = <v^, g^> / |v| (0 where |v| < eps, as
    F.normalize's clamp), with <v^, g^> = sum_k G S from the forward's output S = scale <t^, v^> and |v| from the
    forward (n_ptr, (B, P) float32)."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = _index(pid_p * BLOCK_P + tl.arange(0, BLOCK_P), WIDE)
    mask_p = offs_p < P
    norm = tl.load(n_ptr + b * P + offs_p, mask=mask_p, other=1.0)
    inv = 1.0 / _clamp_min(norm, eps)
    g_dot_s = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = _index(k0 + tl.arange(0, BLOCK_K), WIDE)
        mask = (offs_k[:, None] < K) & mask_p[None, :]
        g = tl.load(g_ptr + b * s_gb + offs_k[:, None] * s_gk + offs_p[None, :] * s_gp, mask=mask, other=0.0)
        s = tl.load(s_ptr + b * s_sb + offs_k[:, None] * s_sk + offs_p[None, :] * s_sp, mask=mask, other=0.0)
        g_dot_s += tl.sum(g.to(tl.float32) * s.to(tl.float32), axis=0)
    tl.store(r_ptr + b * P + offs_p, tl.where(norm >= eps, g_dot_s * inv, 0.0), mask=mask_p)


@triton.jit
def _score_bwd_kernel(
    v_ptr, that_ptr, g_ptr, n_ptr, r_ptr, gv_ptr, gt_ptr,
    C, P, K, n_tiles, work, per_split,
    s_vb, s_vc, s_vp,
    s_tb, s_tk, s_tc,
    s_gb, s_gk, s_gp,
    scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    FUSE_TEXT: tl.constexpr,
):  # fmt: skip
    """grad_visual, in one pass over the visual map: one program per (block of BLOCK_C channels, split, image of
    the grid) walks the pixel tiles w = split * per_split ... (up to ``work``; tile w is pixels (w % n_tiles) *
    BLOCK_P ... of image pid_b + w // n_tiles: the grid has one image per program row, or a single row walking the
    whole batch when the text is shared). Per tile: g^ = scale * T^^T G on the tensor cores and dv = (g^ - v r) /
    max(|v|, eps) with |v| from the forward and r from _score_bwd_pixel_kernel: no reduction over the channels, so
    the channels split across programs.
    FUSE_TEXT (all classes in one block, BLOCK_K >= K): the text half on the same tiles, scale x the sum over the
    program's pixels of G v^^T (v^ = v / max(|v|, eps), F.normalize's, each element in [-1, 1]), a (K, BLOCK_C)
    float32 partial written to gt_ptr at row (pid_b * splits + split); the launcher sums the partials. (G * scale /
    |v| as an operand instead overflowed float16 past 65504, at |v| < 1.5e-5 or a scale of 100 at |v| ~ 1e-3, and
    lost digits below its normal range: the text gradient was up to 70% off.) Else the launcher computes the text
    half (a GEMM)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = _index(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), WIDE)
    mask_c = offs_c < C
    if FUSE_TEXT:
        offs_k = _index(tl.arange(0, BLOCK_K), WIDE)
        mask_k = offs_k < K
        tt = tl.load(
            that_ptr + pid_b * s_tb + offs_k[None, :] * s_tk + offs_c[:, None] * s_tc,
            mask=mask_c[:, None] & mask_k[None, :], other=0.0,
        )  # (BLOCK_C, BLOCK_K) float32, for every tile: the text is per image of the grid or shared  # fmt: skip
        if not DOT_F32:
            tt = tt.to(g_ptr.dtype.element_ty)
        acc_t = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    begin = split * per_split
    end = tl.minimum(begin + per_split, work)
    for w in range(begin, end):
        b = pid_b + w // n_tiles
        offs_p = _index((w % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P), WIDE)
        mask_p = offs_p < P
        norm = tl.load(n_ptr + b * P + offs_p, mask=mask_p, other=1.0)
        inv = 1.0 / _clamp_min(norm, eps)
        radial = tl.load(r_ptr + b * P + offs_p, mask=mask_p, other=0.0)
        ptr, mask = _visual_offsets(b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp)
        v = tl.load(v_ptr + ptr, mask=mask, other=0.0)
        if FUSE_TEXT:
            g = tl.load(
                g_ptr + b * s_gb + offs_k[:, None] * s_gk + offs_p[None, :] * s_gp,
                mask=mask_k[:, None] & mask_p[None, :], other=0.0,
            )  # (BLOCK_K, BLOCK_P)  # fmt: skip
            if DOT_F32:
                gh = tl.dot(tt, g.to(tl.float32), input_precision="ieee") * scale
            else:
                gh = tl.dot(tt, g) * scale
        else:
            gh = _grad_hat_tile(that_ptr, g_ptr, b, offs_c, mask_c, offs_p, mask_p, K, s_tb, s_tk, s_tc, s_gb, s_gk,
                                s_gp, scale, BLOCK_P, BLOCK_K, BLOCK_C, DOT_F32, WIDE)  # fmt: skip
        gv = (gh - v.to(tl.float32) * radial[None, :]) * inv[None, :]
        tl.store(gv_ptr + ptr, gv.to(gv_ptr.dtype.element_ty), mask=mask)
        if FUSE_TEXT:  # after dv (gh no longer live): the text half on the same tile
            v_hat = v.to(tl.float32) * inv[None, :]  # zeros past P (v 0 there)
            if DOT_F32:
                acc_t = tl.dot(g.to(tl.float32), tl.trans(v_hat), acc_t, input_precision="ieee")
            else:
                acc_t = tl.dot(g, tl.trans(v_hat.to(v.dtype)), acc_t)
    if FUSE_TEXT:
        row = pid_b * tl.num_programs(1) + split
        tl.store(gt_ptr + (row * K + offs_k[:, None]) * C + offs_c[None, :], acc_t * scale,
                 mask=mask_k[:, None] & mask_c[None, :])  # fmt: skip


@triton.jit
def _row_tile(base, mask_r, c0, C, BLOCK_C: tl.constexpr):
    """Element offsets and mask of columns c0 .. c0 + BLOCK_C of the rows at ``base`` (row * C) of a dense (R, C)
    tensor, masked past the rows (mask_r) and past C."""
    cols = c0 + tl.arange(0, BLOCK_C)
    return base[:, None] + cols[None, :], mask_r[:, None] & (cols[None, :] < C)


@triton.jit
def _row_norms(t_ptr, base, mask_r, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """|t| of the BLOCK_R rows at ``base`` (row * C) of the dense (R, C) text. It returns the norms only: offsets a
    helper returned together with a load of t would make torch.compile count t as written (_visual_offsets)."""
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _row_tile(base, mask_r, c0, C, BLOCK_C)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sq += tl.sum(t * t, axis=1)
    return tl.sqrt(sq)


@triton.jit
def _text_norm_kernel(t_ptr, norm_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """|t| of the rows of the dense (R, C) text, float32: the forward's, where it does not sum them itself."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    norm = _row_norms(t_ptr, rows.to(tl.int64) * C, mask_r, C, BLOCK_R, BLOCK_C)
    tl.store(norm_ptr + rows, norm, mask=mask_r)


@triton.jit
def _text_normalize_kernel(t_ptr, that_ptr, norm_ptr, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of the dense (R, C) text: t^ = t / max(|t|, eps) in float32, and |t|."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    base = rows.to(tl.int64) * C
    norm = _row_norms(t_ptr, base, mask_r, C, BLOCK_R, BLOCK_C)
    inv = 1.0 / _clamp_min(norm, eps)
    tl.store(norm_ptr + rows, norm, mask=mask_r)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _row_tile(base, mask_r, c0, C, BLOCK_C)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(that_ptr + offs, t * inv[:, None], mask=mask)


@triton.jit
def _text_grad_kernel(gt_ptr, that_ptr, norm_ptr, out_ptr, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_text (R, C) in out's dtype from g^_t (R, C) float32, the gradient with respect to t^: the Jacobian of the
    normalisation, (g^_t - t^ <t^, g^_t>) / |t| where |t| >= eps, g^_t / eps below (F.normalize's clamp)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    base = rows.to(tl.int64) * C
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _row_tile(base, mask_r, c0, C, BLOCK_C)
        g = tl.load(gt_ptr + offs, mask=mask, other=0.0)
        dot += tl.sum(g * tl.load(that_ptr + offs, mask=mask, other=0.0), axis=1)
    norm = tl.load(norm_ptr + rows, mask=mask_r, other=1.0)
    radial = tl.where(norm >= eps, dot, 0.0)
    inv = 1.0 / _clamp_min(norm, eps)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _row_tile(base, mask_r, c0, C, BLOCK_C)
        g = tl.load(gt_ptr + offs, mask=mask, other=0.0)
        t_hat = tl.load(that_ptr + offs, mask=mask, other=0.0)
        grad = (g - t_hat * radial[:, None]) * inv[:, None]
        tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


TEXT_BLOCKS = {"BLOCK_R": 4, "BLOCK_C": 256}  # the text kernels' blocks (also aot.py's): K / 4 programs


def _dense_strides(shape: Sequence[int], layout: torch.memory_format) -> tuple[int, int, int]:
    """The (image, channel, pixel) element strides of a (B, C, H, W) tensor contiguous in ``layout``. They come from
    the shape: a contiguous tensor may carry any stride on a size-1 dimension, so stride(3) is no pixel stride when
    W == 1."""
    _, c, h, w = shape
    return (h * w * c, 1, c) if layout == torch.channels_last else (c * h * w, h * w, 1)


def _flat_visual(visual: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """visual made NCHW- or NHWC-contiguous (its score layout), and its (b, c, pixel) element strides."""
    layout = score_memory_format(visual)
    return visual.contiguous(memory_format=layout), *_dense_strides(visual.shape, layout)


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(image, channel, 1) element strides of a (B, K, H, W) tensor whose H x W pixels are contiguous (NCHW, or a
    channel slice of it, as score_concat's gradient), else None. NHWC gradients are copied rather than read in
    place: with the pixels K elements apart, the tile loads of G (re-read for every 32 channels) would be scalar."""
    _, _, h, w = t.shape
    if (w == 1 or t.stride(3) == 1) and (h == 1 or t.stride(2) == w):
        return t.stride(0), t.stride(1), 1
    return None


def _text_strides(text: torch.Tensor) -> tuple[int, int, int]:
    return (text.stride(0), text.stride(1), text.stride(2)) if text.dim() == 3 else (0, text.stride(0), text.stride(1))


WIDE_FROM = 2**31  # int32 indexing reaches offsets below this


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether an element offset within one image (the dimensions after the first, the batch; all of a 2-D tensor,
    the text shared by the batch) of any of these tensors reaches WIDE_FROM, so that the kernel must index in int64:
    C x H x W > 2**31 within one image (a 2048x2048 map of more than 512 channels), never the model's own maps. The
    batch offset is always int64."""
    sizes = tuple((tuple(t.shape), t.stride()) for t in tensors)
    try:
        return _wide_cached(sizes)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) do not hash
        return _wide_of(*sizes)


@functools.lru_cache(maxsize=1024)
def _wide_cached(sizes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]) -> bool:
    return _wide_of(*sizes)


def _wide_of(*sizes: tuple[Sequence[Any], Sequence[Any]]) -> bool:
    """:func:`_wide` from (shape, stride) pairs."""
    per_image = (((1, *shape), (0, *stride)) if len(shape) == 2 else (shape, stride) for shape, stride in sizes)
    return any(sum((n - 1) * st for n, st in zip(shape[1:], stride[1:])) >= WIDE_FROM for shape, stride in per_image)


def _blocks(k: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_C, num_warps) of the forward for k classes; fp32: float32 products (DOT_F32). Past
    128 classes a block has 8 warps (with 4, its (256 x BLOCK_P) float32 accumulator spilled registers), and the
    float32 products take 16 channels a step at 8 warps (32 spilled on sm_80): no spill on sm_80, sm_86, sm_90."""
    block_k = min(256, max(16, next_power_of_2(k)))
    if fp32:
        return 64, block_k, 16, 8
    return 64, block_k, 32, (8 if block_k > 128 else 4)


def rows_class_blocks(k: int, tail: bool) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_K2) of the rows kernel for k classes: _blocks' power of two and no second block; with ``tail``
    (ROWS_TAIL_K), where half that power of two and a smaller one cover k in fewer columns, those two (150 classes:
    128 + 32 instead of 256; 171: 128 + 64; 100: 128, as 64 + 64 would be no fewer)."""
    block_k = _blocks(k)[1]
    if tail and k <= 256:
        rest = max(16, next_power_of_2(k - block_k // 2))
        if block_k // 2 + rest < block_k:
            return block_k // 2, rest
    return block_k, 0


def _rows_blocks(k: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_C, num_warps) of _score_fwd_rows_kernel: ROWS_BLOCKS, with _blocks' class block
    (16-bit maps only on a GPU; ``fp32``, float32 products, is bfloat16 under Triton's interpreter)."""
    return ROWS_BLOCKS[0], _blocks(k, fp32)[1], ROWS_BLOCKS[1], ROWS_BLOCKS[2]


def empty_norm(visual: torch.Tensor) -> torch.Tensor:
    """The (B, H, W) float32 pixel norms |v| that the forward writes for the backward."""
    b, _, h, w = visual.shape
    return torch.empty((b, h, w), dtype=torch.float32, device=visual.device)


# The forward's plan for 16-bit maps, by the pixels of the batch (B x H x W); float32 maps always take the default
# (FMA products on registers: each tile is loaded once there already). Neither choice is timed on a GPU yet: both
# thresholds are None (never) until benchmarks/tune_score.py's "rows" and "norms" variants have been measured.
# - TEXT_NORMS_FROM: the text norms |t| from a small launch of _text_norm_kernel before the forward (K rows of C: a
#   few microseconds) instead of summed by every program from a second (L2) load of each text tile. Each program
#   reads K x C text elements against BLOCK_P x C of the visual map: at the kernels issue's large shape (171 classes,
#   64 pixels a block) the text is most of the forward's L2 traffic.
# - ROWS_FROM: _score_fwd_rows_kernel (pixels as the product's rows, ROWS_BLOCKS: each visual tile read from L2 once,
#   not twice), always with the text norms' launch.
ROWS_FROM: int | None = None
TEXT_NORMS_FROM: int | None = None
ROWS_BLOCKS = (128, 16, 8)  # BLOCK_P, BLOCK_C, warps of the rows kernel (no spill on sm_90, Triton 3.6 and 3.8)
# - ROWS_TAIL_K: the rows kernel's classes as two blocks, a power of two and a smaller tail (rows_class_blocks), where
#   they cover K in fewer columns of products than one power of two: at the kernels issue's large shape (171 classes)
#   192 columns instead of 256, a quarter fewer tensor-core products (at 150, 160 instead of 256). Off until
#   tune_score's "rows tail" variants have timed it.
ROWS_TAIL_K = False
# - SPLIT_C_PER_SM (any dtype; not with the rows kernel): where the default kernel's grid would have at most half
#   this many programs per SM (at SPLIT_BLOCK_P pixels a program; channel_splits), _score_fwd_split_kernel splits the
#   channels, up to MAX_SPLITS ways (at least one BLOCK_C step each), so that the grid comes near that many programs
#   (not that many at once per SM: the generic 16-bit split compiles take 252 registers a thread at 8 warps, one
#   program per SM; as the JIT specialises the model's maps, 103-138, two). At the kernels issue's RN50/ADE shape
#   (B16 C1024 16x16 K150: 64 programs, each walking 1024 channels in 32 dependent steps) the default took 37.5 us in
#   a CUDA graph where the target is 15 (h200_2026-12-04b); the engine's batch-1 call (4 programs) 25.7 us; that too
#   few programs are the cause is our reading, not a measurement. Costs: a zeroed counter per tile (one fill launch)
#   and K x BLOCK_P float32 products per split and tile through L2. None (never) until benchmarks/tune_score.py's
#   "split-C" variants have been measured.
SPLIT_C_PER_SM: int | None = None
MAX_SPLITS = 8
# The split kernel's pixels a program: 32, half the default's, for registers (sm_90, generic arguments: at 64 its
# products beside the last program's sums spilled 20-144 B; at 32 nothing, in any dtype or class block)
SPLIT_BLOCK_P = 32


@contextlib.contextmanager
def forward_plan(
    rows_from: int | None, norms_from: int | None, split_c_per_sm: int | None = None
) -> Iterator[None]:  # fmt: skip
    """ROWS_FROM, TEXT_NORMS_FROM and SPLIT_C_PER_SM set so for the length of the block, and put back after (the
    benchmarks' A/Bs of the forward's plans)."""
    global ROWS_FROM, TEXT_NORMS_FROM, SPLIT_C_PER_SM
    pixels, programs = "a number of pixels (an int >= 0)", "programs per SM (an int >= 1)"
    for name, value, least, what in (("rows_from", rows_from, 0, pixels), ("norms_from", norms_from, 0, pixels),
                                     ("split_c_per_sm", split_c_per_sm, 1, programs)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise ValueError(f"{name} must be None or {what}, got {value!r}")
    saved = ROWS_FROM, TEXT_NORMS_FROM, SPLIT_C_PER_SM
    ROWS_FROM, TEXT_NORMS_FROM, SPLIT_C_PER_SM = rows_from, norms_from, split_c_per_sm
    try:
        yield
    finally:
        ROWS_FROM, TEXT_NORMS_FROM, SPLIT_C_PER_SM = saved


def channel_splits(programs: int, steps: int, sms: int, per_sm: int | None, max_splits: int) -> tuple[int, int]:
    """(splits, BLOCK_C steps per split) of the channels' ``steps`` for a grid of ``programs`` on ``sms`` SMs: one
    split (all steps) where per_sm is None, where fewer than 2 steps leave nothing to split, or where 2 splits would
    pass per_sm programs per SM (a grid with more than half of them is not split); otherwise as many splits as bring
    it nearest that without passing it, at most max_splits and steps (no split without a step)."""
    if per_sm is None or steps < 2 or programs * 2 > per_sm * sms:
        return 1, steps
    per_split = cdiv(steps, max(1, min(max_splits, steps, per_sm * sms // programs)))
    return cdiv(steps, per_split), per_split


class _ForwardLaunch(NamedTuple):
    """What score_forward_into launches for given sizes, strides and dtype (everything but the pointers)."""

    layout: torch.memory_format  # visual's, made contiguous in it unless as_is
    visual_strides: tuple[int, int, int]  # (image, channel, pixel) element strides once it is
    grid: tuple[int, int, int]
    constexprs: dict[str, Any]
    warps: int
    rows: bool  # _score_fwd_rows_kernel (ROWS_FROM)
    splits: int = 1  # >1: _score_fwd_split_kernel (SPLIT_C_PER_SM), grid axis 1 class blocks x splits
    per_split: int = 0  # its channels per split (a multiple of BLOCK_C)
    as_is: bool = False  # visual read as it is: each image dense in layout, a batch stride of its own (_batch_stride)

    @property
    def slot(self) -> int:
        """Floats of a split program's slot in the partials (products, pixels' and classes' squares)."""
        p, k = self.constexprs["BLOCK_P"], self.constexprs["BLOCK_K"]
        return k * p + p + k

    @property
    def text_norms(self) -> bool:
        """|t| from _text_norm_kernel (TEXT_NORMS_FROM, and with the rows kernel)."""
        return bool(self.constexprs["TEXT_NORMS"])


@functools.lru_cache(maxsize=1024)
def _forward_launch(
    v_shape: tuple[int, ...], v_stride: tuple[int, ...], t_shape: tuple[int, ...], o_shape: tuple[int, ...],
    o_stride: tuple[int, ...], dtype: torch.dtype, rows_from: int | None = None, norms_from: int | None = None,
    split: tuple[int, int, int] | None = None, tail: bool = False,
) -> _ForwardLaunch:  # fmt: skip
    """The launch for these sizes and strides, computed once (a few microseconds of Python per call otherwise);
    rows_from and norms_from: ROWS_FROM and TEXT_NORMS_FROM, split: (SPLIT_C_PER_SM, MAX_SPLITS, the GPU's SMs) or
    None (never), tail: ROWS_TAIL_K, all part of the key so that a change of them is seen."""
    b, c, h, w = v_shape
    k, p = t_shape[-2], h * w
    layout = memory_format_of(v_shape, v_stride)
    v_strides = _dense_strides(v_shape, layout)
    batch_stride = _batch_stride(v_shape, v_stride, v_strides)
    if batch_stride is not None:
        v_strides = (batch_stride, v_strides[1], v_strides[2])
    t_stride = (k * c, c, 1) if len(t_shape) == 3 else (c, 1)  # text.contiguous()
    dot_f32 = dot_in_f32(dtype)
    sixteen_bit = dtype != torch.float32
    rows = sixteen_bit and rows_from is not None and b * p >= rows_from
    norms = rows or (sixteen_bit and norms_from is not None and b * p >= norms_from)
    block_p, block_k, block_c, warps = (_rows_blocks if rows else _blocks)(k, dot_f32)
    splits, steps = 1, cdiv(c, block_c)
    if split is not None and not rows:
        per_sm, max_splits, sms = split
        programs = cdiv(p, SPLIT_BLOCK_P) * cdiv(k, block_k) * b
        splits, per_split = channel_splits(programs, steps, sms, per_sm, max_splits)
        if splits > 1:
            block_p, steps = SPLIT_BLOCK_P, per_split
    wide = _wide_of((v_shape, (v_strides[0], v_strides[1], v_strides[2] * w, v_strides[2])), (t_shape, t_stride),
                    (o_shape, o_stride))  # fmt: skip
    block_k2 = 0
    if rows:
        block_k, block_k2 = rows_class_blocks(k, tail)
    grid = (cdiv(p, block_p), cdiv(k, block_k + block_k2) * splits, b)
    constexprs = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dot_f32, "WIDE": wide,
                  "TEXT_NORMS": norms, **({"BLOCK_K2": block_k2} if rows else {})}  # fmt: skip
    return _ForwardLaunch(layout, v_strides, grid, constexprs, warps, rows, splits, steps * block_c,
                          batch_stride is not None)  # fmt: skip


def _batch_stride(v_shape: tuple[int, ...], v_stride: tuple[int, ...], dense: tuple[int, int, int]) -> int | None:
    """The batch stride of a visual map the forward reads as it is: each image dense in its layout (``dense``: the
    (image, channel, pixel) strides of a contiguous one) and the images apart by at least one image's elements, as a
    view of a wider buffer holds them (the engine's local embedding map, a view of the attention pool's tokens
    (B, 1 + HW, C) past their first row, whose batch stride is (1 + HW) C: a copy of it had been made for every
    batch of more than one image). None for a map that must be made contiguous first (a batch of one needs no
    batch stride of its own: a contiguous() of it is no copy)."""
    b, c, h, w = v_shape
    if b < 2 or v_stride[0] < dense[0]:
        return None
    # the channel, row and column strides of a dense image
    return v_stride[0] if _image_strides_are(v_shape, v_stride, (dense[1], dense[2] * w, dense[2])) else None


def text_norms(t: torch.Tensor) -> torch.Tensor:
    """|t| of the rows of the contiguous (.., K, C) text, float32 of its leading shape: _text_norm_kernel's launch,
    where the forward's plan reads the norms (TEXT_NORMS)."""
    if t.dim() < 2 or not t.is_contiguous():
        raise ValueError(f"text must be a contiguous (.., K, C) tensor, got shape {tuple(t.shape)} with strides "
                         f"{t.stride()}")  # fmt: skip
    norms = torch.empty(t.shape[:-1], dtype=torch.float32, device=t.device)
    rows = norms.numel()
    launch(_text_norm_kernel)[(cdiv(rows, TEXT_BLOCKS["BLOCK_R"]),)](t, norms, rows, t.shape[-1], **TEXT_BLOCKS)
    return norms


def _batch_pieces(b: int | torch.SymInt) -> list[slice]:
    """The batch in pieces of at most MAX_BATCH images (one piece in every realistic call). A symbolic batch
    (torch.compile or AOTInductor tracing a dynamic batch) is one piece, as the attention's (a range over it would
    specialise the trace to the batch traced)."""
    if not isinstance(b, int):
        return [slice(0, b)]
    return [slice(start, min(start + MAX_BATCH, b)) for start in range(0, b, MAX_BATCH)] or [slice(0, 0)]


# Device types whose 16-bit NCHW maps the kernels take through a channels_last copy (visual copied to NHWC, the
# kernels on it, the results copied back to NCHW). None now. On an H200 (Triton 3.6.0, first GPU session:
# benchmarks/results/h200_2026-12-04/tests_gpu_*.log) the forward on NCHW 16-bit maps whose channel stride H x W is
# a multiple of 16 was 3-14% off at 150 and 171 classes: the pipelining race _score_fwd_kernel's comment describes.
# With the kernel fixed, benchmarks/triton_nchw_probe.py found every layout, class block, warp count and stage count
# right and bit-repeatable there (benchmarks/results/h200_2026-12-04b/triton_nchw_probe_NVIDIA_H200.md). Kept as a
# switch for a GPU that a later probe finds wrong.
NHWC_ONLY_16BIT: tuple[str, ...] = ()


def _via_nhwc(visual: torch.Tensor) -> bool:
    """Whether the kernels take this 16-bit NCHW ``visual`` as an NHWC copy (NHWC_ONLY_16BIT). Not a map whose two
    layouts are the same memory (one channel, or one pixel)."""
    if visual.device.type not in NHWC_ONLY_16BIT or visual.dtype not in (torch.float16, torch.bfloat16):
        return False
    _, c, h, w = visual.shape
    return c > 1 and h * w > 1 and score_memory_format(visual) == torch.contiguous_format


def _tile_counts(tiles: int, device: torch.device) -> torch.Tensor:
    """The split forward's arrival counters, one int32 per tile, zero (a test presets them)."""
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def score_forward_into(
    out: torch.Tensor, norm: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float
) -> None:
    """Write the scores into ``out``, a (B, K, H, W) tensor or view with out.stride(2) == W * out.stride(3), and
    the pixel norms |v| into ``norm`` (dense (B, H, W) float32, :func:`empty_norm`)."""
    if out.numel() == 0:
        if norm.numel():  # no class (K = 0, which ops.* refuse; the operators take it): the norms all the same
            norm.copy_(torch.linalg.vector_norm(visual.float(), dim=1))
        return
    pieces = _batch_pieces(visual.shape[0])
    if len(pieces) > 1:
        for i in pieces:
            score_forward_into(out[i], norm[i], visual[i], text if text.dim() == 2 else text[i], scale)
        return
    if _via_nhwc(visual):
        nhwc = visual.contiguous(memory_format=torch.channels_last)
        scores = empty_score(nhwc, out.shape[1])  # NHWC too
        score_forward_into(scores, norm, nhwc, text, scale)
        out.copy_(scores)
        return
    split = None if SPLIT_C_PER_SM is None else (SPLIT_C_PER_SM, MAX_SPLITS, _sm_count(visual.device))
    key = (tuple(visual.shape), visual.stride(), tuple(text.shape), tuple(out.shape), out.stride(), visual.dtype,
           ROWS_FROM, TEXT_NORMS_FROM, split, ROWS_TAIL_K)  # fmt: skip
    try:
        plan = _forward_launch(*key)
    except TypeError:  # symbolic sizes (torch.compile tracing with dynamic shapes) do not hash
        plan = _forward_launch.__wrapped__(*key)
    v = visual if plan.as_is else visual.contiguous(memory_format=plan.layout)
    t = text.contiguous()
    b, c, h, w = v.shape
    k = t.shape[-2]
    t_norm, s_nb = norm, 0  # not read without TEXT_NORMS
    if plan.text_norms:
        t_norm, s_nb = text_norms(t), (k if t.dim() == 3 else 0)
    strides = (*plan.visual_strides, *_text_strides(t), s_nb, out.stride(0), out.stride(1), out.stride(3))
    if plan.splits > 1:
        tiles = plan.grid[0] * plan.grid[2] * (plan.grid[1] // plan.splits)
        partials = torch.empty(tiles * plan.splits * plan.slot, dtype=torch.float32, device=v.device)
        counts = _tile_counts(tiles, v.device)
        launch(_score_fwd_split_kernel)[plan.grid](
            v, t, out, norm, t_norm, partials, counts, c, h * w, k, plan.splits, plan.per_split, *strides,
            float(scale), EPS, **plan.constexprs, num_warps=plan.warps,
        )  # fmt: skip
        return
    launch(_score_fwd_rows_kernel if plan.rows else _score_fwd_kernel)[plan.grid](
        v, t, out, norm, t_norm, c, h * w, k, *strides, float(scale), EPS, **plan.constexprs, num_warps=plan.warps,
    )  # fmt: skip


def _normalized_map(v: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(B, P, C) v^ = v / max(|v|, eps) in v's dtype (each element in [-1, 1]: no float16 overflow), from the
    forward's norms; made an image at a time, so that the float32 product is one image's."""
    b, c, h, w = v.shape
    out = torch.empty((b, h * w, c), dtype=v.dtype, device=v.device)
    inv = 1.0 / norm.view(b, 1, h, w).clamp_min(EPS)
    for i in range(b):
        out[i] = (v[i].float() * inv[i]).flatten(1).transpose(0, 1)
    return out


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) in float32. From 16-bit CUDA tensors cuBLAS writes float32 itself (bmm's out_dtype, CUDA
    only), so a float16 sum over many pixels cannot overflow before the cast, as in csrc/cuda/score.cu; elsewhere
    (Triton's interpreter on the CPU) the product is rounded to the input dtype first."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b).float()


def _score_map(score: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The forward's (B, K, H, W) output as the kernels read it, with (batch, class, pixel) element strides: in place
    whenever its pixels are evenly spaced (NCHW, NHWC, and score_concat's channel slice of either; it is read once,
    so NHWC costs no scalar re-reads as G's would), else copied."""
    _, _, h, w = score.shape
    if not (h == 1 or w == 1 or score.stride(2) == w * score.stride(3)):
        score = score.contiguous()
    return score, (score.stride(0), score.stride(1), score.stride(3) if w > 1 else score.stride(2))


# The backward's visual kernel: (BLOCK_P, BLOCK_C) by class block (BLOCK_K) when it also computes the text half
# (up to FUSED_MAX_K classes; the (BLOCK_K, BLOCK_C) float32 partial lives in registers), for 16-bit and for float32
# inputs (FMA products, larger tiles in shared memory), and the unfused kernel's. All at BWD_WARPS warps: chosen so
# that ptxas spills no register on sm_90 (Triton 3.6 and 3.8; on sm_80 and sm_86 with 3.8) and the shared memory
# fits sm_86's 99 KB (tests/test_triton_aot.py checks both, with generic int32 arguments and as Triton's JIT
# specialises the launches: unit strides constexpr, aligned pointers); the per-pixel kernel's PIXEL_BLOCKS (pixels,
# classes a step) likewise. The split of the pixels: PROGRAMS_PER_SM programs per SM, each at least
# MIN_PIXELS_PER_SPLIT pixels long (each split writes a K x C float32 partial). Tuning knobs chosen without a GPU
# but FUSED_BLOCKS_NHWC (measured on an H200). (The text half as G v^ (v / |v|, a second operand) made Triton 3.6
# spill at 129-256 classes: 160 B in 16 bit at 64 channels, 24 B in float32 at 32, and 8 B in float32 at 33-64
# classes with 32 pixels; hence 32, 16 and 16 there. As the JIT compiles it, float32 at up to 32 classes spilled
# 4 B on sm_90 with 32 pixels (NCHW; 17-32 classes with Triton 3.8, 1-16 with 3.6): 16.)
FUSED_MAX_K = 256
FUSED_BLOCKS = {
    False: {16: (64, 64), 32: (64, 64), 64: (32, 64), 128: (16, 64), 256: (16, 32)},
    True: {16: (16, 32), 32: (16, 32), 64: (16, 32), 128: (16, 16), 256: (16, 16)},
}
# 16-bit NHWC maps whose channels and pixels are multiples of 16 (the JIT then marks their strides divisible: the
# model's maps on a GPU): measured on an H200 (benchmarks/results/h200_2026-12-04/tune_score_NVIDIA_H200.md, B32
# C1024 128x128 K171, bfloat16) 16 pixels x 128 channels took 2.72 ms (shared text) and 2.84 ms (per-image) where
# the table's (16, 32) took 11.96 and 9.08. ptxas: no spill as the JIT compiles it there (Triton 3.6 and 3.8, sm_90);
# with generic arguments it spilled 1.7 KB, hence only for such maps.
FUSED_BLOCKS_NHWC = {256: (16, 128)}
UNFUSED_BLOCKS = (64, 64, 32)  # BLOCK_P, BLOCK_K (a loop over the classes), BLOCK_C
PIXEL_BLOCKS = (64, 32)  # BLOCK_P, BLOCK_K (at most) of _score_bwd_pixel_kernel, 4 warps
BWD_WARPS = 8
PROGRAMS_PER_SM = 2
MIN_PIXELS_PER_SPLIT = 256
INTERPRETER_SMS = 4  # what "SM" means under Triton's interpreter (tests vary it to exercise the splits)


def bwd_blocks(k: int, fp32: bool, wide: bool = False, aligned_nhwc: bool = False) -> tuple[int, int, int, bool]:
    """(BLOCK_P, BLOCK_K, BLOCK_C, FUSE_TEXT) of the backward's visual kernel for k classes; fp32: float32 inputs
    (DOT_F32); wide: int64 indexing (its 64-channel blocks past 128 classes spilled with Triton 3.6: 32);
    aligned_nhwc: an NHWC map of channels and pixels in multiples of 16 (FUSED_BLOCKS_NHWC)."""
    if k <= FUSED_MAX_K:
        block_k = max(16, next_power_of_2(k))
        block_p, block_c = FUSED_BLOCKS[fp32][block_k]
        if aligned_nhwc and not (fp32 or wide) and block_k in FUSED_BLOCKS_NHWC:
            block_p, block_c = FUSED_BLOCKS_NHWC[block_k]
        return block_p, block_k, (min(block_c, 32) if wide and block_k > 128 else block_c), True
    block_p, block_k, block_c = UNFUSED_BLOCKS
    return block_p, block_k, block_c, False


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def _splits(work: int, block_p: int, programs_per_split: int, sms: int, fused: bool) -> int:
    """How many ranges of pixel tiles (of block_p pixels) the visual kernel's grid splits ``work`` tiles into on a
    GPU of ``sms`` multiprocessors (:func:`_sm_count`). Unfused, every tile is a program (no partial to write), up
    to the grid's 65535; fused, enough splits to fill the GPU, each at least MIN_PIXELS_PER_SPLIT pixels long."""
    if not fused:
        return min(work, 65535)
    wanted = cdiv(PROGRAMS_PER_SM * sms, programs_per_split)
    return max(1, min(wanted, work * block_p // MIN_PIXELS_PER_SPLIT, 65535))


def _visual_grid(
    b: int, p: int, c: int, block_p: int, block_c: int, fused: bool, shared: bool, sms: int
) -> tuple[int, int, int, int, int]:
    """(n_tiles, c_blocks, grid_b, work, splits) of the visual kernel's launch, its grid (c_blocks, splits, grid_b):
    fused with the text shared, one program row walks the whole batch (grid_b 1, work the batch's tiles); otherwise
    a row per image, each over its own n_tiles."""
    n_tiles = cdiv(p, block_p)
    c_blocks = cdiv(c, block_c)
    grid_b = 1 if fused and shared else b
    work = n_tiles * (b if grid_b == 1 else 1)
    return n_tiles, c_blocks, grid_b, work, _splits(work, block_p, c_blocks * grid_b, sms, fused)


def score_backward(
    grad: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    scale: float,
    score: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_visual, grad_text). ``score`` and ``norm``: the forward's two outputs, which autograd saves (the
    score map S and the pixel norms |v|); a direct call without them runs the forward first.

    Launches: the text normalised (t^, |t|); per pixel, r = sum_k G S / |v|; the visual kernel, one pass over the
    visual map writing dv and (up to FUSED_MAX_K classes) the text half's partial sums; their sum (past FUSED_MAX_K
    classes, a GEMM of G and the normalised map instead); the text normalisation's Jacobian."""
    b, _, h, w = visual.shape
    check_like(grad, (b, text.shape[-2], h, w), visual, "grad", what="the gradient of the (B, K, H, W) score")
    if visual.numel() == 0:  # the fake kernel's layouts
        return (torch.zeros_like(visual, memory_format=score_memory_format(visual)),
                torch.zeros_like(text, memory_format=torch.contiguous_format))  # fmt: skip
    if score is not None:
        check_like(score, grad.shape, grad, "score")
    if norm is not None:
        check_like(norm, (b, h, w), visual, "norm", torch.float32)
        norm = norm.contiguous()
    pieces = _batch_pieces(b)
    if len(pieces) > 1:
        shared = text.dim() == 2
        parts = [score_backward(grad[i], visual[i], text if shared else text[i], scale,
                                None if score is None else score[i], None if norm is None else norm[i])
                 for i in pieces]  # fmt: skip
        grad_visual = torch.cat([gv for gv, _ in parts]).contiguous(memory_format=score_memory_format(visual))
        texts = [gt for _, gt in parts]
        return grad_visual, (torch.stack(texts).float().sum(0).to(text.dtype) if shared else torch.cat(texts))
    if _via_nhwc(visual):  # the forward's NCHW map and its norms are read as they are
        nhwc = visual.contiguous(memory_format=torch.channels_last)
        grad_visual, grad_text = score_backward(grad, nhwc, text, scale, score, norm)
        return grad_visual.contiguous(), grad_text
    if score is None or norm is None:
        s_out, n_out = empty_score(visual, text.shape[-2]), empty_norm(visual)
        score_forward_into(s_out, n_out, visual, text, scale)
        score = s_out if score is None else score
        norm = n_out if norm is None else norm
    v, s_vb, s_vc, s_vp = _flat_visual(visual)
    b, c, h, w = v.shape
    p = h * w
    t = text.contiguous()
    k = t.shape[-2]
    shared = text.dim() == 2
    rows = t.numel() // c if c else 0
    t_hat = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    t_norm = torch.empty(t.shape[:-1], dtype=torch.float32, device=t.device)
    text_grid = (cdiv(rows, TEXT_BLOCKS["BLOCK_R"]),)
    launch(_text_normalize_kernel)[text_grid](t, t_hat, t_norm, rows, c, EPS, **TEXT_BLOCKS)
    g, g_strides = grad, _pixel_strides(grad)  # score_concat's (NCHW) channel slice is read in place
    if g_strides is None:
        g = grad.contiguous()
        g_strides = (g.stride(0), g.stride(1), 1)
    score, s_strides = _score_map(score)
    dot_f32 = dot_in_f32(v.dtype)
    wide = _wide(v, t_hat, g, score)
    aligned_nhwc = s_vc == 1 and c > 1 and c % 16 == 0 and p % 16 == 0 and g_strides[1] % 16 == 0
    block_p, block_k, block_c, fused = bwd_blocks(k, dot_f32, wide, aligned_nhwc)
    radial = torch.empty((b, p), dtype=torch.float32, device=v.device)
    pixel_block_p, pixel_block_k = PIXEL_BLOCKS[0], min(PIXEL_BLOCKS[1], max(16, next_power_of_2(k)))
    launch(_score_bwd_pixel_kernel)[(cdiv(p, pixel_block_p), b)](
        g, score, norm, radial, p, k, *g_strides, *s_strides, EPS,
        BLOCK_P=pixel_block_p, BLOCK_K=pixel_block_k, WIDE=wide,
    )  # fmt: skip
    n_tiles, c_blocks, grid_b, work, splits = _visual_grid(b, p, c, block_p, block_c, fused, shared,
                                                           _sm_count(v.device))  # fmt: skip
    partial = torch.empty((grid_b * splits, k, c) if fused else (0,), dtype=torch.float32, device=v.device)
    grad_visual = torch.empty_like(v)  # dense in v's layout, written with v's element strides
    launch(_score_bwd_kernel)[(c_blocks, splits, grid_b)](
        v, t_hat, g, norm, radial, grad_visual, partial, c, p, k, n_tiles, work, cdiv(work, splits),
        s_vb, s_vc, s_vp, *_text_strides(t_hat), *g_strides, float(scale), EPS,
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_C=block_c, DOT_F32=dot_f32, WIDE=wide, FUSE_TEXT=fused,
        num_warps=BWD_WARPS,
    )  # fmt: skip
    if fused:  # d/d t^ = the partials summed: over everything for shared text, per image otherwise
        if shared:
            gt_hat = partial.sum(0)
        else:
            gt_hat = partial if splits == 1 else partial.view(b, splits, k, c).sum(1)
    else:  # scale * sum_p G[b,k,p] v^[b,:,p], a batched matmul on the normalised map (float32 accumulation)
        gt_hat = _bmm_float32(g.reshape(b, k, p), _normalized_map(v, norm)) * scale  # (B, K, C)
        if shared:
            gt_hat = gt_hat.sum(0)  # one reduction over the whole GPU (a per-row sum in a kernel would run on K / 4)
    grad_text = torch.empty_like(t)
    launch(_text_grad_kernel)[text_grid](gt_hat.contiguous(), t_hat, t_norm, grad_text, rows, c, EPS, **TEXT_BLOCKS)
    return grad_visual, grad_text

"""Triton kernels of pixel_text_score (forward, backward) and score_concat.

Forward, one program per (batch, block of BLOCK_P pixels, block of BLOCK_K classes). Loop over C in BLOCK_C
chunks: load the visual tile (BLOCK_C x BLOCK_P) and the text tile (BLOCK_K x BLOCK_C), accumulate their product
on the tensor cores (float32 accumulator) together with the squared norms of both; at the end divide by
max(norm, eps) on both sides and multiply by scale. s = <t, v> / (max|t| max|v|) equals F.normalize on both sides
followed by the dot product. Memory traffic: visual is read once when BLOCK_K >= K (one class block), the text
(K x C, small) once per program from L2, the output written once: bytes = |visual| + |out| (+ L2-resident text).
FLOPs = 2 B K C H W. Strides are arguments, so NCHW and NHWC visual (and any strided output view, which is how
score_concat writes into its concatenated buffer) use the same kernel.

Backward, four launches (five for text shared by the batch): (1) the text normalised, t^ and |t| (float32, K x C:
small); (2) one program per (batch, block of pixels): a first pass over C accumulates |v|^2; a pass over the classes
writes G * scale / |v| for the text half (K x P per image, in the input dtype) and sums <v^, g^> = sum_k G S from the
forward's output S, which autograd saves (without it, the first pass also computes g^ = scale * T^^T G to get <v, g^>);
a second pass over C computes g^ (tensor cores, in the input dtype: 16-bit operands for 16-bit inputs) and writes dv =
(g^ - v^ <v^, g^>) / |v| (or g^ / eps below eps); (3) the gradient with respect to t^, a batched GEMM of that scaled G
with the raw visual (cuBLAS, float32 output), summed over the batch by ATen when the text is shared; (4) the text
normalisation's Jacobian on the K x C result. Traffic: visual read three times (the second pass of (2) from L2 while a
block's tile stays there, then by the GEMM), dv written once, G read twice and written once scaled, S read once; no pass
of elementwise torch operations. FLOPs: g^ once and the GEMM, twice the forward's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..library import score_memory_format
from .common import dot_in_f32, launch

EPS = 1e-12


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
def _visual_tile(v_ptr, b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp):
    """The (BLOCK_C, BLOCK_P) visual tile of image b, zeros past C and P."""
    ptr, mask = _visual_offsets(b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp)
    return tl.load(v_ptr + ptr, mask=mask, other=0.0)


@triton.jit
def _score_fwd_kernel(
    v_ptr, t_ptr, out_ptr,
    C, P, K,
    s_vb, s_vc, s_vp,
    s_tb, s_tk, s_tc,
    s_ob, s_ok, s_op,
    scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = _index(pid_p * BLOCK_P + tl.arange(0, BLOCK_P), WIDE)
    offs_k = _index(pid_k * BLOCK_K + tl.arange(0, BLOCK_K), WIDE)
    mask_p = offs_p < P
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    v_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    t_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = _index(c0 + tl.arange(0, BLOCK_C), WIDE)
        mask_c = offs_c < C
        v = _visual_tile(v_ptr, b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp)
        t = tl.load(
            t_ptr + b * s_tb + offs_k[:, None] * s_tk + offs_c[None, :] * s_tc,
            mask=mask_k[:, None] & mask_c[None, :], other=0.0,
        )  # fmt: skip
        vf = v.to(tl.float32)
        tf = t.to(tl.float32)
        v_sq += tl.sum(vf * vf, axis=0)
        t_sq += tl.sum(tf * tf, axis=1)
        if DOT_F32:
            acc = tl.dot(tf, vf, acc, input_precision="ieee")
        else:
            acc = tl.dot(t, v, acc)
    inv_v = 1.0 / _clamp_min(tl.sqrt(v_sq), eps)
    inv_t = 1.0 / _clamp_min(tl.sqrt(t_sq), eps)
    out = acc * (inv_t * scale)[:, None] * inv_v[None, :]
    tl.store(
        out_ptr + b * s_ob + offs_k[:, None] * s_ok + offs_p[None, :] * s_op,
        out.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_p[None, :],
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
def _score_bwd_visual_kernel(
    v_ptr, that_ptr, g_ptr, s_ptr, gv_ptr, gs_ptr,
    C, P, K,
    s_vb, s_vc, s_vp,
    s_tb, s_tk, s_tc,
    s_gb, s_gk, s_gp,
    s_sb, s_sk, s_sp,
    scale, eps, limit,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, WIDE: tl.constexpr,
    HAS_SCORE: tl.constexpr,
):  # fmt: skip
    """grad_visual (same strides as visual) and, for the text half, G * scale / max(|v|, eps) as a dense (B, K, P)
    tensor in visual's dtype, clamped to +-limit (the dtype's largest value: a zero pixel's 1 / eps = 1e12 would
    overflow float16 and make inf * 0 = NaN in the GEMM; clamped, its term is exactly 0). that = normalised text.
    HAS_SCORE: s_ptr is the forward's output S = scale <v^, t^>, so <v^, g^> = sum_k G S comes from the class loop
    and the first pass over C only accumulates |v|^2 (no product with the text); else the first pass computes g^
    too (s_ptr unused)."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = _index(pid_p * BLOCK_P + tl.arange(0, BLOCK_P), WIDE)
    mask_p = offs_p < P
    v_sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    v_dot_g = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = _index(c0 + tl.arange(0, BLOCK_C), WIDE)
        mask_c = offs_c < C
        v = _visual_tile(v_ptr, b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp)
        v = v.to(tl.float32)
        v_sq += tl.sum(v * v, axis=0)
        if not HAS_SCORE:
            gh = _grad_hat_tile(that_ptr, g_ptr, b, offs_c, mask_c, offs_p, mask_p, K, s_tb, s_tk, s_tc, s_gb, s_gk,
                                s_gp, scale, BLOCK_P, BLOCK_K, BLOCK_C, DOT_F32, WIDE)  # fmt: skip
            v_dot_g += tl.sum(v * gh, axis=0)
    norm = tl.sqrt(v_sq)
    inv = 1.0 / _clamp_min(norm, eps)
    g_dot_s = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = _index(k0 + tl.arange(0, BLOCK_K), WIDE)
        mask = (offs_k[:, None] < K) & mask_p[None, :]
        g = tl.load(g_ptr + b * s_gb + offs_k[:, None] * s_gk + offs_p[None, :] * s_gp, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if HAS_SCORE:
            s = tl.load(s_ptr + b * s_sb + offs_k[:, None] * s_sk + offs_p[None, :] * s_sp, mask=mask, other=0.0)
            g_dot_s += tl.sum(g * s.to(tl.float32), axis=0)
        gs = g * (inv * scale)[None, :]
        gs = tl.where(gs > limit, limit, tl.where(gs < -limit, -limit, gs))  # NaN stays NaN, as torch.clamp
        tl.store(gs_ptr + b * K * P + offs_k[:, None] * P + offs_p[None, :], gs.to(gs_ptr.dtype.element_ty), mask=mask)
    # <v^, g^> / |v| where the projection applies: sum_k G S = <v^, g^> with the forward's S, else <v, g^> / |v|
    if HAS_SCORE:
        radial = tl.where(norm >= eps, g_dot_s * inv, 0.0)
    else:
        radial = tl.where(norm >= eps, v_dot_g * inv * inv, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = _index(c0 + tl.arange(0, BLOCK_C), WIDE)
        mask_c = offs_c < C
        ptr, mask = _visual_offsets(b, offs_c, offs_p, C, P, s_vb, s_vc, s_vp)
        v = tl.load(v_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        gh = _grad_hat_tile(that_ptr, g_ptr, b, offs_c, mask_c, offs_p, mask_p, K, s_tb, s_tk, s_tc, s_gb, s_gk,
                            s_gp, scale, BLOCK_P, BLOCK_K, BLOCK_C, DOT_F32, WIDE)  # fmt: skip
        gv = (gh - v * radial[None, :]) * inv[None, :]
        tl.store(gv_ptr + ptr, gv.to(gv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_tile(base, mask_r, c0, C, BLOCK_C: tl.constexpr):
    """Element offsets and mask of columns c0 .. c0 + BLOCK_C of the rows at ``base`` (row * C) of a dense (R, C)
    tensor, masked past the rows (mask_r) and past C."""
    cols = c0 + tl.arange(0, BLOCK_C)
    return base[:, None] + cols[None, :], mask_r[:, None] & (cols[None, :] < C)


@triton.jit
def _text_normalize_kernel(t_ptr, that_ptr, norm_ptr, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of the dense (R, C) text: t^ = t / max(|t|, eps) in float32, and |t|."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    base = rows.to(tl.int64) * C
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs, mask = _row_tile(base, mask_r, c0, C, BLOCK_C)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sq += tl.sum(t * t, axis=1)
    norm = tl.sqrt(sq)
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


def _flat_visual(visual: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """visual made NCHW- or NHWC-contiguous, and its (b, c, pixel) element strides. The strides come from the
    shape: a contiguous tensor may carry any stride on a size-1 dimension, so stride(3) is no pixel stride when
    W == 1."""
    b, c, h, w = visual.shape
    if score_memory_format(visual) == torch.channels_last:
        return visual.contiguous(memory_format=torch.channels_last), h * w * c, 1, c
    return visual.contiguous(), c * h * w, h * w, 1


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
    per_image = (t[None] if t.dim() == 2 else t for t in tensors)
    return any(sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= WIDE_FROM for t in per_image)


def _blocks(k: int) -> tuple[int, int, int]:
    block_k = min(256, max(16, triton.next_power_of_2(k)))
    block_p = 64 if block_k <= 128 else 32
    return block_p, block_k, 32


def score_forward_into(out: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float) -> None:
    """Write the scores into ``out``, a (B, K, H, W) tensor or view with out.stride(2) == W * out.stride(3)."""
    if out.numel() == 0:
        return
    v, s_vb, s_vc, s_vp = _flat_visual(visual)
    t = text.contiguous()
    b, c, h, w = v.shape
    k, p = t.shape[-2], h * w
    block_p, block_k, block_c = _blocks(k)
    grid = (triton.cdiv(p, block_p), triton.cdiv(k, block_k), b)
    launch(_score_fwd_kernel)[grid](
        v, t, out, c, p, k, s_vb, s_vc, s_vp, *_text_strides(t), out.stride(0), out.stride(1), out.stride(3),
        float(scale), EPS, BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_C=block_c, DOT_F32=dot_in_f32(v.dtype),
        WIDE=_wide(v, t, out),
    )  # fmt: skip


_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(a, b, out_dtype): cuBLAS writing float32


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) in float32. From 16-bit CUDA tensors cuBLAS writes float32 itself (bmm's out_dtype, CUDA
    only), so a float16 sum over many pixels cannot overflow before the cast, as in csrc/cuda/score.cu; elsewhere
    (Triton's interpreter on the CPU, a torch without the overload) the product is rounded to the input dtype
    first."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _BMM_OUT_DTYPE:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b).float()


def _score_map(score: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The forward's (B, K, H, W) output as the visual kernel reads it, with (batch, class, pixel) element strides:
    in place whenever its pixels are evenly spaced (NCHW, NHWC, and score_concat's channel slice of either; it is
    read once, so NHWC costs no scalar re-reads as G's would), else copied."""
    if score.shape != like.shape:
        raise ValueError(f"score must be the forward's output, shape {tuple(like.shape)}, got {tuple(score.shape)}")
    if score.dtype != like.dtype or score.device != like.device:
        raise ValueError(f"score must be the forward's output, {like.dtype} on {like.device}, got {score.dtype} on "
                         f"{score.device}")  # fmt: skip
    _, _, h, w = score.shape
    if not (h == 1 or w == 1 or score.stride(2) == w * score.stride(3)):
        score = score.contiguous()
    return score, (score.stride(0), score.stride(1), score.stride(3) if w > 1 else score.stride(2))


def score_backward(
    grad: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float, score: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_visual, grad_text) in four launches (five for text shared by the batch): the text normalised (t^, |t|),
    the visual kernel (grad_visual and G * scale / |v| for the text half), one batched GEMM on the raw map (cuBLAS),
    (the sum over the batch,) and the text normalisation's Jacobian. ``score``: the forward's output, which autograd
    saves; with it the visual kernel's first pass skips its product with the text (a third of the backward's
    FLOPs)."""
    if visual.numel() == 0:
        return torch.zeros_like(visual), torch.zeros_like(text)
    v, s_vb, s_vc, s_vp = _flat_visual(visual)
    b, c, h, w = v.shape
    p = h * w
    t = text.contiguous()
    k = t.shape[-2]
    rows = t.numel() // c if c else 0
    t_hat = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    t_norm = torch.empty(t.shape[:-1], dtype=torch.float32, device=t.device)
    text_grid = (triton.cdiv(rows, TEXT_BLOCKS["BLOCK_R"]),)
    launch(_text_normalize_kernel)[text_grid](t, t_hat, t_norm, rows, c, EPS, **TEXT_BLOCKS)
    g, g_strides = grad, _pixel_strides(grad)  # score_concat's (NCHW) channel slice is read in place
    if g_strides is None:
        g = grad.contiguous()
        g_strides = (g.stride(0), g.stride(1), 1)
    s, s_strides = _score_map(score, grad) if score is not None else (g, (0, 0, 0))  # (unread without a score)
    grad_visual = torch.empty_like(v)  # dense in v's layout, written with v's element strides
    g_scaled = torch.empty((b, k, p), dtype=v.dtype, device=v.device)
    block_p, block_k = 32, min(64, max(16, triton.next_power_of_2(k)))
    launch(_score_bwd_visual_kernel)[(triton.cdiv(p, block_p), b)](
        v, t_hat, g, s, grad_visual, g_scaled, c, p, k, s_vb, s_vc, s_vp, *_text_strides(t_hat),
        *g_strides, *s_strides, float(scale), EPS, torch.finfo(v.dtype).max,
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_C=32, DOT_F32=dot_in_f32(v.dtype),
        WIDE=_wide(v, t_hat, g, g_scaled, s), HAS_SCORE=score is not None,
    )  # fmt: skip
    # d/d t^: scale * sum_p G[b,k,p] v[b,:,p] / |v_p|, a batched matmul on the raw visual (float32 accumulation
    # and, on CUDA, output)
    gt_hat = _bmm_float32(g_scaled, v.flatten(2).transpose(1, 2))  # (B, K, C)
    if text.dim() == 2:
        gt_hat = gt_hat.sum(0)  # one reduction over the whole GPU (a per-row sum in the kernel would run on K / 4)
    grad_text = torch.empty_like(t)
    launch(_text_grad_kernel)[text_grid](gt_hat, t_hat, t_norm, grad_text, rows, c, EPS, **TEXT_BLOCKS)
    return grad_visual, grad_text

"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

``python -m denseclip_fast.ops.triton.aot [--arch 90 86 80] [--workers N]`` compiles each kernel, for each dtype
and the block sizes the launchers choose, to PTX and a cubin for those architectures (in parallel processes), and
reads its registers from ptxas, so that a kernel that does not build, that needs more shared memory than the GPU
has, or that spills registers on sm_90 fails CI on a machine with no GPU. Each kernel twice: generic (every int an
i32 of unknown value) and as Triton's JIT compiles the model's launches (jit_specialize: unit strides constexpr,
aligned pointers and ints divisible by 16 marked so), which is what runs and differs in registers, spills and shared
memory. It must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import attention, resample, score

# Shared memory per block (opt-in maximum, bytes) by compute capability: A100, RTX 30xx/A10, Jetson Orin, RTX 40xx/L4,
# H100/H200, B200, RTX 50xx. An arch whose float32 attention blocks equal sm_90's compiles nothing more.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                 120: 101376}  # fmt: skip


# label, kernel, signature, constexprs, compile options, attributes ({(argument index,): [["tt.divisibility", 16]]})
Spec = tuple[str, Any, dict[str, str], dict[Any, Any], dict[str, Any], dict[tuple[int, ...], list[list[Any]]]]


def _signature(
    fn: Any, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]
) -> dict[str, str]:
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(pointers)
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


DIVISIBILITY = 16  # what Triton's JIT tells the compiler of an aligned pointer or of an int it divides
_DIVISIBLE = [["tt.divisibility", DIVISIBILITY]]


def jit_specialize(
    fn: Any, args: dict[str, Any], constexprs: dict[str, Any]
) -> tuple[dict[str, str], dict[Any, Any], dict[tuple[int, ...], list[list[Any]]]]:
    """(signature, constexprs, attributes) of kernel ``fn`` as Triton's JIT builds them when a launcher passes
    ``args`` (every argument not in ``constexprs``: a tensor as its pointer type, "*bf16", taken 16-byte aligned, as
    every tensor the launchers pass is; an int; a float). The rules of triton/runtime/jit.py (native_specialize_impl,
    the backend's get_int_specialization, get_tensor_specialization and parse_attr; Triton 3.6 to 3.8): an int equal
    to 1 becomes a constexpr (a unit stride: NCHW's pixel stride, the channel stride of NHWC, the last stride of
    contiguous text and gradients), an int divisible by 16 and an aligned pointer get tt.divisibility=16, an int
    past int32 is i64, a float fp32. With all ints i32 and no attributes (the generic specs) ptxas sees other code:
    registers, spills and shared memory differ."""
    sig: dict[str, str] = {}
    const: dict[Any, Any] = dict(constexprs)
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):  # a tensor
            sig[name] = value
            attrs[(i,)] = _DIVISIBLE
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name] = "constexpr"
            const[name] = 1
        else:
            sig[name] = "i32" if -(2**31) <= value < 2**31 else ("i64" if value < 2**63 else "u64")
            if value % DIVISIBILITY == 0:
                attrs[(i,)] = _DIVISIBLE
    return sig, const, attrs


def _score(
    dt: str, k: int, wide: bool = False, text_norms: bool = False, rows: bool = False, split: bool = False,
    tail: bool = False,
) -> Spec:  # fmt: skip
    """The forward at the blocks the launcher chooses for k classes; text_norms: |t| read, not summed (TEXT_NORMS);
    rows: the transposed kernel (_score_fwd_rows_kernel, which reads them), both for 16-bit maps only, with ``tail``
    its classes as a block and a tail (ROWS_TAIL_K); split: the channels split (_score_fwd_split_kernel,
    SPLIT_C_PER_SM), any dtype, with or without text_norms."""
    block_p, block_k, block_c, warps = (score._rows_blocks if rows else score._blocks)(k, dt == "fp32")
    if split:
        block_p = score.SPLIT_BLOCK_P
    const = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dt == "fp32", "WIDE": wide,
             "TEXT_NORMS": text_norms or rows}  # fmt: skip
    if rows:
        const["BLOCK_K"], const["BLOCK_K2"] = score.rows_class_blocks(k, tail)
    ptrs = {"v_ptr": f"*{dt}", "t_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n_ptr": "*fp32", "tn_ptr": "*fp32"}
    fn = score._score_fwd_rows_kernel if rows else score._score_fwd_kernel
    if split:
        fn, ptrs = score._score_fwd_split_kernel, {**ptrs, "part_ptr": "*fp32", "count_ptr": "*i32"}
    plan = f" rows{' tail' if tail else ''}" if rows else " split" if split else ""
    label = f"score_fwd {dt} K={k}{' int64' if wide else ''}{plan}{' norms' if text_norms and not rows else ''}"
    return label, fn, _signature(fn, ptrs, ("scale", "eps"), const), const, {"num_warps": warps}, {}


def _score_backward(dt: str, k: int = 150, wide: bool = False, aligned_nhwc: bool = False) -> Spec:
    """The visual kernel of the score backward, with the blocks and warps score_backward launches."""
    block_p, block_k, block_c, fused = score.bwd_blocks(k, dt == "fp32", wide, aligned_nhwc)
    const = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dt == "fp32", "WIDE": wide,
             "FUSE_TEXT": fused}  # fmt: skip
    ptrs = {"v_ptr": f"*{dt}", "that_ptr": "*fp32", "g_ptr": f"*{dt}", "n_ptr": "*fp32", "r_ptr": "*fp32",
            "gv_ptr": f"*{dt}", "gt_ptr": "*fp32"}  # fmt: skip
    fn = score._score_bwd_kernel
    label = f"score_bwd {dt} K={k}{' int64' if wide else ''}"
    return label, fn, _signature(fn, ptrs, ("scale", "eps"), const), const, {"num_warps": score.BWD_WARPS}, {}


def _score_backward_pixels(dt: str) -> Spec:
    const = {"BLOCK_P": score.PIXEL_BLOCKS[0], "BLOCK_K": score.PIXEL_BLOCKS[1], "WIDE": False}
    ptrs = {"g_ptr": f"*{dt}", "s_ptr": f"*{dt}", "n_ptr": "*fp32", "r_ptr": "*fp32"}
    fn = score._score_bwd_pixel_kernel
    return f"score_bwd_pixels {dt}", fn, _signature(fn, ptrs, ("eps",), const), const, {}, {}


def _score_text(dt: str, which: str) -> Spec:
    """The text kernels: the norms alone ("norm", the forward's under TEXT_NORMS_FROM), and the backward's
    normalisation ("normalize") and its Jacobian ("grad")."""
    const = dict(score.TEXT_BLOCKS)
    if which == "norm":
        fn, ptrs = score._text_norm_kernel, {"t_ptr": f"*{dt}", "norm_ptr": "*fp32"}
    elif which == "normalize":
        fn, ptrs = score._text_normalize_kernel, {"t_ptr": f"*{dt}", "that_ptr": "*fp32", "norm_ptr": "*fp32"}
    else:
        fn = score._text_grad_kernel
        ptrs = {"gt_ptr": "*fp32", "that_ptr": "*fp32", "norm_ptr": "*fp32", "out_ptr": f"*{dt}"}
    floats = ("eps",) if "eps" in fn.arg_names else ()
    return f"score_text_{which} {dt}", fn, _signature(fn, ptrs, floats, const), const, {}, {}


def _attention(dt: str, d: int, which: str, arch: int = 90, lq: int = 150) -> Spec:
    """An attention kernel with the blocks its launcher chooses for ``lq`` queries (64 a block from 33 on; 16 or 32
    for fewer: a decoder's self-attention over a small vocabulary)."""
    kind = "dq" if which == "delta" else which  # the delta kernel takes dq's query block
    block_m, block_n = attention._blocks(lq, d, kind, dt == "fp32", SHARED_MEMORY[arch], arch)
    fn = {"fwd": attention._attn_fwd_kernel, "delta": attention._attn_bwd_delta_kernel,
          "dkdv": attention._attn_bwd_dkdv_kernel, "dq": attention._attn_bwd_dq_kernel}[which]  # fmt: skip
    if which == "delta":
        const: dict[str, Any] = {"D": d, "BLOCK_M": block_m}
    else:
        const = {"D": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_F32": dt == "fp32"}
    ptrs = {name: f"*{dt}" for name in fn.arg_names if name.endswith("_ptr")}
    ptrs.update({name: "*fp32" for name in ("lse_ptr", "delta_ptr") if name in fn.arg_names})
    floats = tuple(name for name in ("qk_scale", "sm_scale") if name in fn.arg_names)
    options = {} if which == "delta" else {"num_warps": attention.num_warps(which, dt == "fp32", d)}
    label = f"attn_{which} {dt} D={d}{'' if lq > 32 else f' BLOCK_M={block_m}'}"
    return label, fn, _signature(fn, ptrs, floats, const), const, options, {}


# The launches the JIT compiles for the model (jit_specialize): RN50/RN101's 1024 channels (ViT-B-16's 512
# specialises the same), a 40 x 40 map (640 x 640 images at stride 16; 16 x 16, 32 x 32 and 32 x 64 too: every
# length a multiple of 16), the classes of each class block (none a multiple of 16: ADE20K's 150, Cityscapes' 19),
# the text shared by a batch of 2, the visual map NCHW or NHWC (score_memory_format), an H200's 132 SMs for the
# backward's splits. Attention on contiguous (B*H, L, D) tensors: the decoder's cross-attention (150 text queries,
# 1 + 40 x 40 keys: neither length a multiple of 16), and lengths that are (256).
MODEL_C, MODEL_HW, MODEL_BATCH, MODEL_SMS = 1024, (40, 40), 2, 132
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ATTENTION_LENGTHS = ((150, 1601), (256, 256))  # (Lq, Lk)
SMALL_QUERIES = (10, 19)  # a decoder over 10 or 19 classes (Cityscapes): query blocks of 16 and 32 (where the
# kernel's block is not smaller anyway, e.g. float32 dq's 32: those compiles are the 150 queries', dropped as such)
# The split forward's (splits, channels per split) at the model's 1024 channels: 4 x 256, the kernels issue's RN50
# shape (128 programs of 32 pixels) at 4 per SM on 132 SMs (2 per SM: 2 x 512; the engine's batch-1 call, 8 x 128:
# the JIT specialises them all alike)
SCORE_SPLIT = (4, 256)
TAIL_CLASSES = (150, 171, 40)  # the rows kernel's tails: 128 + 32, 128 + 64 (the kernels issue's large shape), 32 + 16
SCORE_CLASSES = (10, 19, 59, 100, 300)  # with 150 every class block of the forward (16, 32, 64, 128, 256; 300:
# several blocks) and of the backward (its fused kernel's and the unfused)


def _strides(c: int, layout: str) -> tuple[int, int, int]:
    """(image, channel, pixel) element strides of a dense (B, c, *MODEL_HW) tensor in ``layout``."""
    return score._dense_strides((MODEL_BATCH, c, *MODEL_HW), LAYOUTS[layout])


def _jit_score(
    dt: str, k: int, layout: str, text_norms: bool = False, rows: bool = False, split: bool = False, tail: bool = False
) -> Spec:  # fmt: skip
    """score_forward_into's launch for the model's map in ``layout``, writing its own output in that layout
    (score_concat's slice of the concatenated map specialises the same); split: the channels split as SCORE_SPLIT."""
    label, fn, _, const, options, _ = _score(dt, k, text_norms=text_norms, rows=rows, split=split, tail=tail)
    (h, w), c = MODEL_HW, MODEL_C
    s_ob, s_ok, s_op = _strides(k, layout)
    args = {"v_ptr": f"*{dt}", "t_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n_ptr": "*fp32", "tn_ptr": "*fp32", "C": c,
            "P": h * w, "K": k, **dict(zip(("s_vb", "s_vc", "s_vp"), _strides(c, layout))), "s_tb": 0, "s_tk": c,
            "s_tc": 1, "s_nb": 0, "s_ob": s_ob, "s_ok": s_ok, "s_op": s_op, "scale": 1.0, "eps": score.EPS}  # fmt: skip
    if split:
        args.update({"part_ptr": "*fp32", "count_ptr": "*i32", "splits": SCORE_SPLIT[0], "per_split": SCORE_SPLIT[1]})
    sig, const, attrs = jit_specialize(fn, args, const)
    return f"{label} jit-{layout}", fn, sig, const, options, attrs


def _jit_score_backward(dt: str, k: int, layout: str) -> Spec:
    """score_backward's launch of the visual kernel for the model's map in ``layout`` (G NCHW-contiguous; its
    channels and pixels multiples of 16, so that an NHWC map takes FUSED_BLOCKS_NHWC)."""
    label, fn, _, const, options, _ = _score_backward(dt, k, aligned_nhwc=layout == "nhwc")
    (h, w), c, b = MODEL_HW, MODEL_C, MODEL_BATCH
    p, block_p, fused = h * w, const["BLOCK_P"], const["FUSE_TEXT"]
    n_tiles, _, _, work, splits = score._visual_grid(b, p, c, block_p, const["BLOCK_C"], fused, True, MODEL_SMS)
    args = {"v_ptr": f"*{dt}", "that_ptr": "*fp32", "g_ptr": f"*{dt}", "n_ptr": "*fp32", "r_ptr": "*fp32",
            "gv_ptr": f"*{dt}", "gt_ptr": "*fp32", "C": c, "P": p, "K": k, "n_tiles": n_tiles, "work": work,
            "per_split": score.cdiv(work, splits), **dict(zip(("s_vb", "s_vc", "s_vp"), _strides(c, layout))),
            "s_tb": 0, "s_tk": c, "s_tc": 1, **dict(zip(("s_gb", "s_gk", "s_gp"), _strides(k, "nchw"))),
            "scale": 1.0, "eps": score.EPS}  # fmt: skip
    sig, const, attrs = jit_specialize(fn, args, const)
    return f"{label} jit-{layout}", fn, sig, const, options, attrs


def _jit_score_backward_pixels(dt: str, layout: str, k: int = 150) -> Spec:
    """score_backward's launch of the per-pixel kernel, G NCHW-contiguous and the score map S in ``layout``."""
    label, fn, _, const, options, _ = _score_backward_pixels(dt)
    args = {"g_ptr": f"*{dt}", "s_ptr": f"*{dt}", "n_ptr": "*fp32", "r_ptr": "*fp32", "P": MODEL_HW[0] * MODEL_HW[1],
            "K": k, **dict(zip(("s_gb", "s_gk", "s_gp"), _strides(k, "nchw"))),
            **dict(zip(("s_sb", "s_sk", "s_sp"), _strides(k, layout))), "eps": score.EPS}  # fmt: skip
    sig, const, attrs = jit_specialize(fn, args, const)
    return f"{label} jit-{layout}", fn, sig, const, options, attrs


def _jit_score_text(dt: str, which: str, k: int = 150) -> Spec:
    """The launch of a text kernel on the shared (k, MODEL_C) text."""
    label, fn, sig, const, options, _ = _score_text(dt, which)
    args: dict[str, Any] = {name: sig[name] for name in fn.arg_names if name.endswith("_ptr")}
    args.update({"R": k, "C": MODEL_C, **({"eps": score.EPS} if "eps" in fn.arg_names else {})})
    sig, const, attrs = jit_specialize(fn, args, const)
    return f"{label} jit", fn, sig, const, options, attrs


def _jit_attention(dt: str, d: int, which: str, lq: int, lk: int, arch: int = 90) -> Spec:
    """attention_forward's or attention_backward's launch for lq queries and lk keys: the backward's on contiguous
    (B*H, L, D) tensors, the forward's as the model's eager calls launch it (q, k, v the (B, L, H, D) outputs of
    their projections, out written heads-last alike; the decoder's 4 heads)."""
    label, fn, sig, const, options, _ = _attention(dt, d, which, arch, lq)
    args: dict[str, Any] = {name: sig[name] for name in fn.arg_names if name.endswith("_ptr")}
    args.update({"Lq": lq, "Lk": lk, "qk_scale": 0.18, "sm_scale": 0.125})
    if which == "fwd":
        heads = 4
        for t, length in (("q", lq), ("k", lk), ("v", lk), ("o", lq)):
            args.update({f"s_{t}b": length * heads * d, f"s_{t}h": d, f"s_{t}l": heads * d})
        args["H"] = heads
    sig, const, attrs = jit_specialize(fn, {name: args[name] for name in fn.arg_names if name not in const}, const)
    return f"{label} jit-L{lq}x{lk}", fn, sig, const, options, attrs


# The resampling kernels' launches in a CUDA engine (RN50 512x512): (kernel, input dtype, output dtype, input layout,
# output layout, channels, input side, output side)
RESAMPLES = (("bilinear", "bf16", "fp32", "nhwc", "nchw", 150, 128, 512),  # the logits to the image
             ("bilinear", "fp32", "fp32", "nhwc", "nchw", 150, 128, 512),
             ("bilinear", "bf16", "bf16", "nhwc", "nhwc", 128, 16, 32),  # the FPN's 2x upsampling
             ("bilinear", "fp32", "fp32", "nhwc", "nhwc", 128, 16, 32),
             ("avg_pool", "bf16", "bf16", "nhwc", "nhwc", 256, 128, 64),  # the ResNet's 2x2 poolings
             ("avg_pool", "fp32", "fp32", "nhwc", "nhwc", 256, 128, 64),
             ("avg_pool_backward", "bf16", "bf16", "nhwc", "nhwc", 256, 64, 128),  # the trainer's poolings
             ("avg_pool_backward", "fp32", "fp32", "nhwc", "nhwc", 256, 64, 128),
             ("add_nearest", "bf16", "bf16", "nhwc", "nhwc", 256, 64, 128),  # the FPN's top-down step
             ("add_nearest", "fp32", "fp32", "nhwc", "nhwc", 256, 64, 128),
             ("add_bilinear", "bf16", "bf16", "nhwc", "nhwc", 256, 64, 128),  # the FPN head's sum (head_channels)
             ("add_bilinear", "fp32", "fp32", "nhwc", "nhwc", 256, 64, 128))  # fmt: skip


def _resample(which: str, dt: str, out_dt: str, layout: str, out_layout: str, c: int, side: int, out_side: int,
              jit: bool) -> Spec:  # fmt: skip
    """A resampling kernel with the blocks its launcher chooses: generic (jit False) or as the JIT specialises the
    launch on dense (1, c, side, side) maps in these layouts."""
    x_strides = score._dense_strides((1, c, side, side), LAYOUTS[layout])
    o_strides = score._dense_strides((1, c, out_side, out_side), LAYOUTS[out_layout])
    block_c, block_w = resample.blocks(c, out_side, o_strides[1])
    const: dict[str, Any] = {"BLOCK_C": block_c, "BLOCK_W": block_w, "WIDE": False}
    fn: Any = {"bilinear": resample._bilinear_kernel, "avg_pool": resample._avg_pool_kernel,
               "avg_pool_backward": resample._avg_pool_backward_kernel,
               "add_nearest": resample._add_nearest_kernel,
               "add_bilinear": resample._add_bilinear_kernel}[which]  # fmt: skip
    pooling = which.startswith("avg_pool")
    floats: tuple[str, ...] = () if pooling else ("scale_h", "scale_w")
    if pooling:  # the window: the ratio of the sides (the backward's input is the pooled gradient)
        const["S"] = max(side, out_side) // min(side, out_side)
    if which == "bilinear":
        const["ROWS"] = resample.ROWS
    ptrs = {"x_ptr": f"*{dt}", "out_ptr": f"*{out_dt}"}
    if which == "avg_pool_backward":
        ptrs = {"g_ptr": f"*{dt}", "out_ptr": f"*{out_dt}"}
    if which == "add_nearest":  # the finer map (a), the coarser (b, the input here), the sum into a
        ptrs = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{out_dt}"}
    # (add_bilinear: x the coarser map, out the finer one, read and written in place)
    label = f"{which} {dt}->{out_dt} {layout}->{out_layout} C={c}"
    if not jit:
        return label, fn, _signature(fn, ptrs, floats, const), const, {"num_warps": resample.WARPS}, {}

    def nchw_strides(strides: tuple[int, int, int], width: int) -> tuple[int, int, int, int]:
        (s_b, s_c, s_p) = strides  # pixel stride -> (row, column) strides of a square map
        return s_b, s_c, s_p * width, s_p

    # (the pooling's gradient writes the full map from the pooled one: its H_in is the output side here)
    full, pooled = (out_side, side) if which == "avg_pool_backward" else (side, out_side)
    args: dict[str, Any] = {**ptrs, "C": c, "H_in": full, "W_in": full, "H_out": pooled, "W_out": pooled,
                            "scale_h": 0.25, "scale_w": 0.25}  # fmt: skip
    args.update(zip(("s_xn", "s_xc", "s_xh", "s_xw"), nchw_strides(x_strides, side)))
    args.update(zip(("s_bn", "s_bc", "s_bh", "s_bw"), nchw_strides(x_strides, side)))
    args.update(zip(("s_gn", "s_gc", "s_gh", "s_gw"), nchw_strides(x_strides, side)))
    args.update(zip(("s_on", "s_oc", "s_oh", "s_ow"), nchw_strides(o_strides, out_side)))
    args.update(zip(("s_an", "s_ac", "s_ah", "s_aw"), nchw_strides(o_strides, out_side)))
    sig, const, attrs = jit_specialize(fn, {k: v for k, v in args.items() if k in fn.arg_names}, const)
    return f"{label} jit", fn, sig, const, {"num_warps": resample.WARPS}, attrs


# The training loss's resize gradient (RN50 512x512: 150 float32 planes of 512x512 to 128x128, NHWC): the width
# pass (into float32) and the height pass, in float32 and bfloat16
RESIZE_GRADIENTS = (("w", "fp32"), ("h", "fp32"), ("w", "bf16"), ("h", "bf16"))


def _resize_gradient(which: str, dt: str, jit: bool, c: int = 150, side: int = 128, out_side: int = 512) -> Spec:
    """A pass of resample.bilinear_backward with the blocks it chooses, on NHWC maps: generic or JIT-like."""
    fn: Any = resample._bilinear_grad_w_kernel if which == "w" else resample._bilinear_grad_h_kernel
    block_c, block_w = resample.blocks(c, side, 1)  # an NHWC output: its channels along the tile
    const: dict[str, Any] = {"BLOCK_C": block_c, "BLOCK_W": block_w, "WIDE": False}
    g_dt, out_dt = (dt, "fp32") if which == "w" else ("fp32", dt)
    ptrs = {"g_ptr": f"*{g_dt}", "out_ptr": f"*{out_dt}"}
    label = f"bilinear_grad_{which} {g_dt}->{out_dt} nhwc C={c}"
    if not jit:
        return label, fn, _signature(fn, ptrs, ("scale", "inv_scale"), const), const, {"num_warps": resample.WARPS}, {}
    g_w = out_side if which == "w" else side  # the columns of each pass's input
    g_h = out_side  # and its rows (the width pass keeps the destination's rows)
    o_w, o_h = side, (out_side if which == "w" else side)
    args: dict[str, Any] = {**ptrs, "C": c, "R": out_side, "A": side, "B": out_side, "W": side, "scale": 0.25,
                            "inv_scale": 4.0, "TAPS": 12,
                            "s_gn": c * g_h * g_w, "s_gc": 1, "s_gr": g_w * c, "s_gh": g_w * c, "s_gw": c,
                            "s_on": c * o_h * o_w, "s_oc": 1, "s_or": o_w * c, "s_oh": o_w * c, "s_ow": c}  # fmt: skip
    sig, const, attrs = jit_specialize(fn, {k: v for k, v in args.items() if k in fn.arg_names}, const)
    return f"{label} jit", fn, sig, const, {"num_warps": resample.WARPS}, attrs


def _cross_entropy(which: str, jit: bool, k: int = 150) -> Spec:
    """The training loss's cross-entropy kernel (forward or backward) on a (pixels, k) float32 matrix."""
    from . import cross_entropy

    fn: Any = cross_entropy._ce_fwd_kernel if which == "fwd" else cross_entropy._ce_bwd_kernel
    const: dict[str, Any] = {"BLOCK_M": cross_entropy.BLOCK_M, "BLOCK_K": cross_entropy._block_k(k)}
    ptrs = {name: ("*i64" if name == "label_ptr" else "*fp32") for name in fn.arg_names if name.endswith("_ptr")}
    options = {"num_warps": cross_entropy.WARPS}
    label = f"cross_entropy_{which} fp32 K={k}"
    if not jit:
        return label, fn, _signature(fn, ptrs, (), const), const, options, {}
    args: dict[str, Any] = {**ptrs, "M": 16 * 512 * 512, "K": k, "s_m": k, "s_om": k, "ignore_index": 255}
    sig, const, attrs = jit_specialize(fn, {name: args[name] for name in fn.arg_names if name not in const}, const)
    return f"{label} jit", fn, sig, const, options, attrs


def _add_layer_norm(dt: str, jit: bool, width: int = 256, rows: int = 150) -> Spec:
    """The CUDA engine decoder's residual sum + LayerNorm (layer_norm.py) at its width, for ``rows`` class queries
    (RN50 batch 1: 150; the prefix's x broadcast over the batch)."""
    from . import layer_norm

    fn: Any = layer_norm._add_layer_norm_kernel
    block_r, block_w = layer_norm.blocks(width)
    const: dict[str, Any] = {"BLOCK_R": block_r, "BLOCK_W": block_w, "WIDE": False}
    ptrs = {name: f"*{dt}" for name in fn.arg_names if name.endswith("_ptr")}
    options = {"num_warps": layer_norm.WARPS}
    label = f"add_layer_norm {dt} W={width}"
    if not jit:
        return label, fn, _signature(fn, ptrs, ("eps",), const), const, options, {}
    args: dict[str, Any] = {**ptrs, "ROWS": rows, "L": rows, "W": width, "s_xb": 0, "s_xl": width,
                            "s_yb": rows * width, "s_yl": width, "eps": 1e-5}  # fmt: skip
    sig, const, attrs = jit_specialize(fn, {name: args[name] for name in fn.arg_names if name not in const}, const)
    return f"{label} jit", fn, sig, const, options, attrs


# predict's fused resize and argmax (RN50 512x512: 150 classes of 128x128 to 512x512): from the head's NHWC map in
# the engine's dtypes, and from a float32 NCHW map (a uint8 image's second resize, after the first in memory)
LABELS = (("bf16", "nhwc"), ("fp16", "nhwc"), ("fp32", "nhwc"), ("fp32", "nchw"))


def _labels(dt: str, layout: str, jit: bool, start: bool, k: int = 150, side: int = 128, out_side: int = 512) -> Spec:
    """labels.bilinear_argmax_'s kernel with the tiling it chooses: generic or JIT-like (dense maps, one call for all
    classes when ``start``, a later chunk's call otherwise)."""
    from . import labels

    fn: Any = labels._bilinear_argmax_kernel
    tile = labels.label_tiling(k, out_side)
    const: dict[str, Any] = {"START": start, "BLOCK_C": tile.block_c, "BLOCK_W": tile.block_w, "WIDE": False}
    ptrs = {"x_ptr": f"*{dt}", "best_ptr": "*fp32", "index_ptr": "*i64"}
    options = {"num_warps": tile.warps}
    label = f"bilinear_argmax {dt} {layout} C={k}{' start' if start else ''}"
    if not jit:
        return label, fn, _signature(fn, ptrs, ("scale_h", "scale_w"), const), const, options, {}
    s_n, s_c, s_p = score._dense_strides((1, k, side, side), LAYOUTS[layout])
    plane = out_side * out_side
    args: dict[str, Any] = {**ptrs, "C": k, "H_in": side, "W_in": side, "H_out": out_side, "W_out": out_side,
                            "s_xn": s_n, "s_xc": s_c, "s_xh": s_p * side, "s_xw": s_p, "s_bn": plane,
                            "s_bh": out_side, "s_bw": 1, "s_in": plane, "s_ih": out_side, "s_iw": 1,
                            "scale_h": 0.25, "scale_w": 0.25, "first": 0 if start else 64}  # fmt: skip
    sig, const, attrs = jit_specialize(fn, {name: args[name] for name in fn.arg_names if name not in const}, const)
    return f"{label} jit", fn, sig, const, options, attrs


def _resized_cross_entropy(which: str, jit: bool, k: int = 150, side: int = 128, out_side: int = 512) -> Spec:
    """The training loss's fused resize and cross-entropy (forward, or its gradient's width pass) at RN50 512x512:
    float32 channels_last logits of 128x128, int64 labels of 512x512."""
    from . import resized_cross_entropy as rce

    fn: Any = rce._resized_ce_fwd_kernel if which == "fwd" else rce._resized_ce_grad_w_kernel
    block_c, block_w = rce._blocks(k, out_side if which == "fwd" else side)
    const: dict[str, Any] = {"BLOCK_C": block_c, "BLOCK_W" if which == "fwd" else "BLOCK_J": block_w, "WIDE": False}
    ptrs = {name: ("*i64" if name == "label_ptr" else "*fp32") for name in fn.arg_names if name.endswith("_ptr")}
    floats = ("scale_h", "scale_w") if which == "fwd" else ("scale_h", "scale_w", "inv_scale_w")
    options = {"num_warps": rce.WARPS}
    label = f"resized_ce_{which} fp32 nhwc C={k}"
    if not jit:
        return label, fn, _signature(fn, ptrs, floats, const), const, options, {}
    plane = out_side * out_side
    args: dict[str, Any] = {**ptrs, "C": k, "H_in": side, "W_in": side, "H_out": out_side, "W_out": out_side,
                            "s_xn": k * side * side, "s_xc": 1, "s_xh": side * k, "s_xw": k, "s_ln": plane,
                            "s_lh": out_side, "s_lw": 1, "s_on": k * out_side * side, "s_oc": 1, "s_oh": side * k,
                            "s_ow": k, "scale_h": 0.25, "scale_w": 0.25, "inv_scale_w": 4.0, "TAPS": 12,
                            "ignore_index": 255}  # fmt: skip
    sig, const, attrs = jit_specialize(fn, {name: args[name] for name in fn.arg_names if name not in const}, const)
    return f"{label} jit", fn, sig, const, options, attrs


def _score_specializations(arch: int) -> Iterator[Spec]:
    """Every score kernel at every block size its launchers choose (the same on every GPU); float16, which compiles
    as bfloat16, only for sm_90."""
    dtypes = ("bf16", "fp16", "fp32") if arch == 90 else ("bf16", "fp32")
    for dt in dtypes:
        yield _score(dt, 150)
    for dt in dtypes[:-1]:  # the 16-bit maps' other plans: the text norms' launch, the rows kernel
        yield _score(dt, 150, text_norms=True)
        yield _score(dt, 150, rows=True)
        yield _score_text(dt, "norm")
    for k in SCORE_CLASSES:  # the other class blocks
        yield _score("bf16", k)
        yield _score("bf16", k, text_norms=True)
        yield _score("bf16", k, rows=True)
        yield _score("fp32", k)
    for dt in dtypes:  # the channels split, in every dtype, with and without the text norms' launch
        yield _score(dt, 150, split=True)
        yield _score(dt, 150, text_norms=True, split=True)
    for k in SCORE_CLASSES:
        yield _score("bf16", k, split=True)
        yield _score("fp32", k, split=True)
    for text_norms, rows in ((False, False), (True, False), (False, True)):  # int64 indexing (images past 2**31
        yield _score("bf16", 150, wide=True, text_norms=text_norms, rows=rows)  # elements), in each plan
    yield _score("bf16", 150, wide=True, split=True)
    for k in TAIL_CLASSES:  # the rows kernel's classes as a block and a tail (ROWS_TAIL_K)
        yield _score("bf16", k, rows=True, tail=True)
    yield _score("fp16", 150, rows=True, tail=True)
    yield _score("bf16", 150, wide=True, rows=True, tail=True)
    yield _score_backward("bf16", wide=True)
    for k in SCORE_CLASSES:
        yield _score_backward("bf16", k)
        yield _score_backward("fp32", k)
    for dt in dtypes:
        yield _score_backward(dt)
        yield _score_backward_pixels(dt)
        yield _score_text(dt, "normalize")
        yield _score_text(dt, "grad")


def _attention_kernels(arch: int) -> Iterator[tuple[str, int, str]]:
    """(dtype, head dim, kernel) of every attention compile for sm_<arch>: for sm_90 every kernel in each dtype at the
    decoder's head dim, bfloat16 and float32 at every head dim; for other GPUs bfloat16 and float32 at every head
    dim (float16 compiles as bfloat16)."""
    if arch != 90:
        for dt in ("bf16", "fp32"):
            for d in attention.HEAD_DIMS:
                for which in attention.KINDS:
                    yield dt, d, which
        return
    for dt in ("bf16", "fp16", "fp32"):
        yield dt, 64, "fwd"
    for dt in ("bf16", "fp32"):
        for which in ("delta", "dkdv", "dq"):
            yield dt, 64, which
    for d in attention.HEAD_DIMS:
        if d != 64:
            yield "bf16", d, "fwd"
    yield "bf16", 128, "dkdv"
    yield "bf16", 128, "dq"
    for d in attention.HEAD_DIMS:
        if d != 64:
            for which in attention.KINDS:
                yield "fp32", d, which


def _jit_specializations(arch: int) -> Iterator[Spec]:
    """What Triton's JIT compiles at the launches (jit_specialize): every score kernel at every class block the
    generic specs cover, the visual map NCHW and NHWC, and every attention kernel of the generic specs at the
    lengths of ATTENTION_LENGTHS."""
    dtypes = ("bf16", "fp16", "fp32") if arch == 90 else ("bf16", "fp32")
    for dt in dtypes:
        for layout in LAYOUTS:
            for k in (*SCORE_CLASSES, 150) if dt != "fp16" else (150,):
                yield _jit_score(dt, k, layout)
                yield _jit_score_backward(dt, k, layout)
            yield _jit_score_backward_pixels(dt, layout)
            yield _jit_score(dt, 150, layout, split=True)
            if dt == "bf16":
                for k in TAIL_CLASSES:
                    yield _jit_score(dt, k, layout, rows=True, tail=True)
            if dt != "fp32":
                yield _jit_score(dt, 150, layout, text_norms=True)
                yield _jit_score(dt, 150, layout, rows=True)
        if dt != "fp32":
            yield _jit_score_text(dt, "norm")
        yield _jit_score_text(dt, "normalize")
        yield _jit_score_text(dt, "grad")
    for dt, d, which in _attention_kernels(arch):
        for lq, lk in ATTENTION_LENGTHS:
            yield _jit_attention(dt, d, which, lq, lk, arch)
    for dt, d, which in _small_query_kernels(arch):
        for lq in SMALL_QUERIES:
            yield _jit_attention(dt, d, which, lq, 1601, arch)


def _small_query_kernels(arch: int) -> Iterator[tuple[str, int, str]]:
    """(dtype, head dim, kernel) compiled also at the query blocks of SMALL_QUERIES: on sm_90 every kernel in
    bfloat16 and float32 at the decoder's head dim (other GPUs' blocks for so few queries are sm_90's or smaller)."""
    if arch == 90:
        for dt in ("bf16", "fp32"):
            for which in ("fwd", "delta", "dkdv", "dq"):
                yield dt, 64, which


def specializations(arch: int = 90) -> Iterator[Spec]:
    """_specializations without repeats: a spec compiling what an earlier one compiles (same kernel, signature,
    constexprs, options and attributes; e.g. a float32 dq at 19 queries takes the block of 150) is left out."""
    seen = set()
    for spec in _specializations(arch):
        _, fn, sig, const, options, attrs = spec
        key = (fn, *(tuple(sorted((str(k), repr(v)) for k, v in d.items())) for d in (sig, const, options, attrs)))
        if key not in seen:
            seen.add(key)
            yield spec


def _specializations(arch: int) -> Iterator[Spec]:
    """Spec tuples (label, kernel, signature, constexprs, compile options, attributes). Generic: every int argument
    i32, nothing known of its value or of a pointer's alignment. Every score kernel at every block size its
    launchers choose (the same on every GPU; float16 only for sm_90), every attention kernel of _attention_kernels
    at the blocks chosen for this GPU (its shared memory, smaller blocks before Hopper). Then the same kernels as
    the JIT compiles them for the model's launches (_jit_specializations, labelled "jit-..."): unit strides
    constexpr, aligned pointers and ints divisible by 16 marked so, which changes registers, spills and shared
    memory."""
    yield from _score_specializations(arch)
    for dt, d, which in _attention_kernels(arch):
        yield _attention(dt, d, which, arch)
    for dt, d, which in _small_query_kernels(arch):
        for lq in SMALL_QUERIES:
            yield _attention(dt, d, which, arch, lq)
    yield from _jit_specializations(arch)
    for jit in (False, True):
        for resampling in RESAMPLES:
            yield _resample(*resampling, jit=jit)
        for which, dt in RESIZE_GRADIENTS:
            yield _resize_gradient(which, dt, jit)
        for which in ("fwd", "bwd"):
            yield _cross_entropy(which, jit)
            yield _resized_cross_entropy(which, jit)
        for dt, layout in LABELS:
            for start in (True, False):
                yield _labels(dt, layout, jit, start)
        for dt in ("bf16", "fp16", "fp32"):
            yield _add_layer_norm(dt, jit)


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton compiles with (else one on PATH), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(arch).path)
    except (ImportError, AttributeError, RuntimeError):  # older Triton: no get_ptxas
        return shutil.which("ptxas")


def registers(ptx: str, arch: int) -> tuple[int, int] | None:
    """(registers per thread, bytes of spill stores) of a kernel's PTX as ``ptxas -v`` reports them, or None where no
    ptxas is found. Triton's compile runs ptxas too, but keeps these numbers only once a GPU loads the cubin."""
    ptxas = _ptxas(arch)
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if ptxas is None or target is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={target.group(1)}", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True)  # fmt: skip
    used = re.search(r"Used (\d+) registers", result.stderr)
    spilled = re.search(r"(\d+) bytes spill stores", result.stderr)
    return (int(used.group(1)) if used else 0), (int(spilled.group(1)) if spilled else 0)


# TTGIR operations that view a shared-memory buffer without moving to another pipeline slot: a load through one of
# them reads the same tile (memdesc_index, which selects a slot, is not one)
_SAME_TILE_VIEWS = re.compile(r"(%[\w.]+) = ttg\.memdesc_(?:trans|reinterpret|subslice|subview)\b[^%]*(%[\w.]+)")


def wgmma_operand_races(ttgir: str) -> list[str]:
    """The shared-memory operands of an asynchronous wgmma that other code also reads while the wgmma may still run:
    in the TTGIR, a ``warp_group_dot_wait`` that leaves work pending (pendings > 0) over an operand that a
    ``ttg.local_load`` reads too, directly or through a view of the same tile (_SAME_TILE_VIEWS). Triton's software
    pipelining (3.6 to 3.8, Hopper) gives such a tile one buffer too few, so the next tiles' asynchronous copies
    overwrite it under the running wgmma (triton-lang/triton#6691): the score forward's dot tiles, also read for the
    norms, made 16-bit scores 3-14% wrong on an H200. Returns the operands' names (none in a kernel without the
    race)."""
    view_of = {view: base for view, base in _SAME_TILE_VIEWS.findall(ttgir)}

    def tile(name: str) -> str:
        seen = set()
        while name in view_of and name not in seen:
            seen.add(name)
            name = view_of[name]
        return name

    loaded = {tile(name) for name in re.findall(r"ttg\.local_load (%[\w.]+)", ttgir)}
    races = []
    for wait in re.finditer(r"ttng\.warp_group_dot_wait ([^{]*)\{pendings = (\d+)", ttgir):
        if int(wait.group(2)) > 0:
            races += [name for name in re.findall(r"%[\w.]+", wait.group(1)) if tile(name) in loaded]
    return races


def compile_one(arch: int, index: int) -> str:
    """Compile specialization ``index`` of ``specializations(arch)`` for sm_<arch>; one line saying what it took
    (with ptxas's registers and spill stores where a ptxas is found). Raises when the kernel does not build, needs
    more shared memory than the GPU has, or (float32 attention) more than attention.smem_estimate, from which the
    launchers choose their blocks, reads a wgmma operand while the wgmma may still run (:func:`wgmma_operand_races`),
    or (sm_90, the GPU they are tuned for) spills registers; other GPUs' spills are
    reported (with Triton 3.8 none in the generic specs on sm_80 and sm_86, 4 to 16 B in a few JIT-like ones;
    Triton 3.6 spills some 16-bit backward blocks on sm_80)."""
    label, fn, sig, const, options, attrs = list(specializations(arch))[index]
    start = time.perf_counter()
    kernel = triton.compile(triton.compiler.ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)  # fmt: skip
    if not kernel.asm.get("cubin"):
        raise RuntimeError(f"{label}: no cubin produced")
    shared = kernel.metadata.shared
    where = f"{label} (BLOCK_M={const.get('BLOCK_M')}, BLOCK_N={const.get('BLOCK_N')}) on sm_{arch}"
    if shared > SHARED_MEMORY[arch]:
        raise RuntimeError(f"{where}: {shared} B of shared memory, the GPU has {SHARED_MEMORY[arch]} B")
    kind = label.split()[0].removeprefix("attn_")
    if const.get("DOT_F32") and kind in attention.KINDS:
        bound = attention.smem_estimate(kind, const["D"], const["BLOCK_M"], const["BLOCK_N"])
        if shared > bound:
            raise RuntimeError(f"{where}: {shared} B of shared memory, above attention.smem_estimate ({bound} B)")
    races = wgmma_operand_races(kernel.asm["ttgir"])  # (a KeyError, not a silent pass, without the TTGIR)
    if races:
        raise RuntimeError(f"{where}: wgmma operands {', '.join(races)} also read while the wgmma runs (a "
                           "pipelining race: aot.wgmma_operand_races)")  # fmt: skip
    regs = registers(kernel.asm["ptx"], arch)
    if regs is not None and regs[1] and arch == 90:
        raise RuntimeError(f"{where}: spills {regs[1]} B of registers ({options or 'default options'})")
    used = "" if regs is None else f", {regs[0]} registers, {regs[1]} B spilled"
    return f"sm_{arch} {label}: {1e3 * (time.perf_counter() - start):.0f} ms, {shared} B shared{used}"


def compile_all(archs: list[int], workers: int | None = None) -> list[str]:
    """:func:`compile_one` for every specialization of every arch, in ``workers`` processes (default: one per
    CPU; the compiles are independent and each takes a core for up to a few seconds). Raises on the first failure."""
    jobs = [(arch, index) for arch in archs for index in range(len(list(specializations(arch))))]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_one(arch, index) for arch, index in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, *zip(*jobs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_MEMORY),
                        help="compute capabilities as integers (90 = Hopper: every kernel in every dtype; others: "
                             "bfloat16 and float32, at the blocks chosen for that GPU)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    for line in compile_all(args.arch, args.workers):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

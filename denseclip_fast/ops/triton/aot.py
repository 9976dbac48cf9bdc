"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

``python -m denseclip_fast.ops.triton.aot [--arch 90 86 80]`` compiles each kernel, for each dtype and the block
sizes the launchers choose, to PTX and a cubin for those architectures, so that a kernel that does not build, or
that needs more shared memory than the GPU has, fails CI on a machine with no GPU. It must run without
``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

from . import attention, score

# Shared memory per block (opt-in maximum, bytes) by compute capability: A100, RTX 30xx/A10, Jetson Orin, RTX 40xx/L4,
# H100/H200, B200, RTX 50xx. An arch whose float32 attention blocks equal sm_90's compiles nothing more.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                 120: 101376}  # fmt: skip


def _signature(
    fn: Any, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]
) -> dict[str, str]:
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(pointers)
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _score(dt: str, k: int, wide: bool = False) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    block_p, block_k, block_c = score._blocks(k)
    const = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dt == "fp32", "WIDE": wide}
    ptrs = {"v_ptr": f"*{dt}", "t_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
    fn = score._score_fwd_kernel
    label = f"score_fwd {dt} K={k}{' int64' if wide else ''}"
    return label, fn, _signature(fn, ptrs, ("scale", "eps"), const), const


def _score_backward(
    dt: str, wide: bool = False, has_score: bool = True
) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    const = {"BLOCK_P": 32, "BLOCK_K": 64, "BLOCK_C": 32, "DOT_F32": dt == "fp32", "WIDE": wide,
             "HAS_SCORE": has_score}  # fmt: skip
    ptrs = {"v_ptr": f"*{dt}", "that_ptr": "*fp32", "g_ptr": f"*{dt}", "s_ptr": f"*{dt}", "gv_ptr": f"*{dt}",
            "gs_ptr": f"*{dt}"}  # fmt: skip
    fn = score._score_bwd_visual_kernel
    label = f"score_bwd_visual {dt}{' int64' if wide else ''}{'' if has_score else ' without score'}"
    return label, fn, _signature(fn, ptrs, ("scale", "eps", "limit"), const), const


def _score_text(dt: str, which: str) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    """The text kernels of the score backward: normalisation ("normalize") and its Jacobian ("grad")."""
    const = dict(score.TEXT_BLOCKS)
    if which == "normalize":
        fn, ptrs = score._text_normalize_kernel, {"t_ptr": f"*{dt}", "that_ptr": "*fp32", "norm_ptr": "*fp32"}
    else:
        fn = score._text_grad_kernel
        ptrs = {"gt_ptr": "*fp32", "that_ptr": "*fp32", "norm_ptr": "*fp32", "out_ptr": f"*{dt}"}
    return f"score_text_{which} {dt}", fn, _signature(fn, ptrs, ("eps",), const), const


def _attention(dt: str, d: int, which: str, arch: int = 90) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    kind = "dq" if which == "delta" else which  # the delta kernel takes dq's query block
    block_m, block_n = attention._blocks(150, d, kind, dt == "fp32", SHARED_MEMORY[arch])
    fn = {"fwd": attention._attn_fwd_kernel, "delta": attention._attn_bwd_delta_kernel,
          "dkdv": attention._attn_bwd_dkdv_kernel, "dq": attention._attn_bwd_dq_kernel}[which]  # fmt: skip
    if which == "delta":
        const: dict[str, Any] = {"D": d, "BLOCK_M": block_m}
    else:
        const = {"D": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_F32": dt == "fp32"}
    ptrs = {name: f"*{dt}" for name in fn.arg_names if name.endswith("_ptr")}
    ptrs.update({name: "*fp32" for name in ("lse_ptr", "delta_ptr") if name in fn.arg_names})
    floats = tuple(name for name in ("qk_scale", "sm_scale") if name in fn.arg_names)
    return f"attn_{which} {dt} D={d}", fn, _signature(fn, ptrs, floats, const), const


def specializations(arch: int = 90) -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """(label, kernel, signature, constexprs). For sm_90: every kernel, in each dtype at the decoder's shapes,
    bfloat16 at every block size the launchers choose (K up to and past one class block, every head dim), float32
    attention at every head dim. For other GPUs: the float32 attention kernels whose blocks, chosen for that GPU's
    shared memory, differ from sm_90's (their shared memory does not depend on the architecture: FMA dots)."""
    if arch != 90:
        for d in attention.HEAD_DIMS:
            for which in attention.KINDS:
                here, on_h200 = (attention._blocks(150, d, which, True, SHARED_MEMORY[a]) for a in (arch, 90))
                if here != on_h200:
                    yield _attention("fp32", d, which, arch)
        return
    for dt in ("bf16", "fp16", "fp32"):
        yield _score(dt, 150)
        yield _attention(dt, 64, "fwd")
    yield _score("bf16", 100)  # a smaller class block, wider pixel block
    yield _score("bf16", 150, wide=True)  # int64 indexing (images past 2**31 elements)
    yield _score_backward("bf16", wide=True)
    yield _score_backward("bf16", has_score=False)  # a direct call of the backward operator without the output
    for dt in ("bf16", "fp16", "fp32"):
        yield _score_backward(dt)
        yield _score_text(dt, "normalize")
        yield _score_text(dt, "grad")
    for dt in ("bf16", "fp32"):
        for which in ("delta", "dkdv", "dq"):
            yield _attention(dt, 64, which)
    for d in attention.HEAD_DIMS:
        if d != 64:
            yield _attention("bf16", d, "fwd")
    yield _attention("bf16", 128, "dkdv")
    yield _attention("bf16", 128, "dq")
    for d in attention.HEAD_DIMS:
        if d != 64:
            for which in attention.KINDS:
                yield _attention("fp32", d, which)


def compile_all(arch: int = 90) -> list[str]:
    """Compile every specialization for sm_<arch>; returns one line per kernel. Raises on the first failure: a
    kernel that does not build, that needs more shared memory than the GPU has, or (float32 attention) more than
    attention.smem_estimate, from which the launchers choose their blocks."""
    target = GPUTarget("cuda", arch, 32)
    lines = []
    for label, fn, sig, const in specializations(arch):
        start = time.perf_counter()
        kernel = triton.compile(triton.compiler.ASTSource(fn, sig, const), target=target)
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
        lines.append(f"{label}: {1e3 * (time.perf_counter() - start):.0f} ms, {shared} B shared")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_MEMORY),
                        help="compute capabilities as integers (90 = Hopper: every kernel; others: the float32 "
                             "attention kernels, whose blocks depend on the shared memory)")  # fmt: skip
    args = parser.parse_args(argv)
    for arch in args.arch:
        for line in compile_all(arch):
            print(f"sm_{arch} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

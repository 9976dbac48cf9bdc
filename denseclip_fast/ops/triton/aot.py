"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

``python -m denseclip_fast.ops.triton.aot [--arch 90]`` compiles each kernel, for each dtype and the block sizes the
launchers choose, to PTX and a cubin for that architecture, so that a kernel that does not build fails CI on a
machine with no GPU. It must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
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

def _signature(fn: Any, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(pointers)
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _score(dt: str, k: int) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    block_p, block_k, block_c = score._blocks(k)
    const = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dt == "fp32"}
    ptrs = {"v_ptr": f"*{dt}", "t_ptr": f"*{dt}", "out_ptr": f"*{dt}"}
    fn = score._score_fwd_kernel
    return f"score_fwd {dt} K={k}", fn, _signature(fn, ptrs, ("scale", "eps"), const), const


def _score_backward(dt: str) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    const = {"BLOCK_P": 32, "BLOCK_K": 64, "BLOCK_C": 32, "DOT_F32": dt == "fp32"}
    ptrs = {"v_ptr": f"*{dt}", "that_ptr": "*fp32", "g_ptr": f"*{dt}", "gv_ptr": f"*{dt}", "inv_ptr": "*fp32"}
    fn = score._score_bwd_visual_kernel
    return f"score_bwd_visual {dt}", fn, _signature(fn, ptrs, ("scale", "eps"), const), const


def _attention(dt: str, d: int, which: str) -> tuple[str, Any, dict[str, str], dict[str, Any]]:
    block_m, block_n = attention._blocks(150, 257, d)
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


def specializations() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """(label, kernel, signature, constexprs): every kernel, in each dtype at the decoder's shapes, bfloat16 at
    every block size the launchers choose (K up to and past one class block, every head dim)."""
    for dt in ("bf16", "fp16", "fp32"):
        yield _score(dt, 150)
        yield _attention(dt, 64, "fwd")
    yield _score("bf16", 100)  # a smaller class block, wider pixel block
    for dt in ("bf16", "fp32"):
        yield _score_backward(dt)
        for which in ("delta", "dkdv", "dq"):
            yield _attention(dt, 64, which)
    for d in attention.HEAD_DIMS:
        if d != 64:
            yield _attention("bf16", d, "fwd")
    yield _attention("bf16", 128, "dkdv")
    yield _attention("bf16", 128, "dq")


def compile_all(arch: int = 90) -> list[str]:
    """Compile every specialization for sm_<arch>; returns one line per kernel, raises on the first failure."""
    target = GPUTarget("cuda", arch, 32)
    lines = []
    for label, fn, sig, const in specializations():
        start = time.perf_counter()
        kernel = triton.compile(triton.compiler.ASTSource(fn, sig, const), target=target)
        if not kernel.asm.get("cubin"):
            raise RuntimeError(f"{label}: no cubin produced")
        lines.append(f"{label}: {1e3 * (time.perf_counter() - start):.0f} ms, {kernel.metadata.shared} B shared")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = Hopper)")
    args = parser.parse_args(argv)
    for line in compile_all(args.arch):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

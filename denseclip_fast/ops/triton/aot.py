"""Ahead-of-time compilation of every Triton kernel for a GPU target, without a GPU.

``python -m denseclip_fast.ops.triton.aot [--arch 90 86 80] [--workers N]`` compiles each kernel, for each dtype
and the block sizes the launchers choose, to PTX and a cubin for those architectures (in parallel processes), and
reads its registers from ptxas, so that a kernel that does not build, that needs more shared memory than the GPU
has, or that spills registers on sm_90 fails CI on a machine with no GPU. It must run without ``TRITON_INTERPRET``
(the interpreter replaces the kernels).
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

import triton
from triton.backends.compiler import GPUTarget

from . import attention, score

# Shared memory per block (opt-in maximum, bytes) by compute capability: A100, RTX 30xx/A10, Jetson Orin, RTX 40xx/L4,
# H100/H200, B200, RTX 50xx. An arch whose float32 attention blocks equal sm_90's compiles nothing more.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                 120: 101376}  # fmt: skip


Spec = tuple[str, Any, dict[str, str], dict[str, Any], dict[str, Any]]  # label, kernel, signature, constexprs, options


def _signature(
    fn: Any, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]
) -> dict[str, str]:
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(pointers)
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _score(dt: str, k: int, wide: bool = False) -> Spec:
    block_p, block_k, block_c, warps = score._blocks(k, dt == "fp32")
    const = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dt == "fp32", "WIDE": wide}
    ptrs = {"v_ptr": f"*{dt}", "t_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n_ptr": "*fp32"}
    fn = score._score_fwd_kernel
    label = f"score_fwd {dt} K={k}{' int64' if wide else ''}"
    return label, fn, _signature(fn, ptrs, ("scale", "eps"), const), const, {"num_warps": warps}


def _score_backward(dt: str, k: int = 150, wide: bool = False) -> Spec:
    """The visual kernel of the score backward, with the blocks and warps score_backward launches."""
    block_p, block_k, block_c, fused = score.bwd_blocks(k, dt == "fp32", wide)
    const = {"BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_C": block_c, "DOT_F32": dt == "fp32", "WIDE": wide,
             "FUSE_TEXT": fused}  # fmt: skip
    ptrs = {"v_ptr": f"*{dt}", "that_ptr": "*fp32", "g_ptr": f"*{dt}", "n_ptr": "*fp32", "r_ptr": "*fp32",
            "gv_ptr": f"*{dt}", "gt_ptr": "*fp32"}  # fmt: skip
    fn = score._score_bwd_kernel
    label = f"score_bwd {dt} K={k}{' int64' if wide else ''}"
    return label, fn, _signature(fn, ptrs, ("scale", "eps"), const), const, {"num_warps": score.BWD_WARPS}


def _score_backward_pixels(dt: str) -> Spec:
    const = {"BLOCK_P": score.PIXEL_BLOCKS[0], "BLOCK_K": score.PIXEL_BLOCKS[1], "WIDE": False}
    ptrs = {"g_ptr": f"*{dt}", "s_ptr": f"*{dt}", "n_ptr": "*fp32", "r_ptr": "*fp32"}
    fn = score._score_bwd_pixel_kernel
    return f"score_bwd_pixels {dt}", fn, _signature(fn, ptrs, ("eps",), const), const, {}


def _score_text(dt: str, which: str) -> Spec:
    """The text kernels of the score backward: normalisation ("normalize") and its Jacobian ("grad")."""
    const = dict(score.TEXT_BLOCKS)
    if which == "normalize":
        fn, ptrs = score._text_normalize_kernel, {"t_ptr": f"*{dt}", "that_ptr": "*fp32", "norm_ptr": "*fp32"}
    else:
        fn = score._text_grad_kernel
        ptrs = {"gt_ptr": "*fp32", "that_ptr": "*fp32", "norm_ptr": "*fp32", "out_ptr": f"*{dt}"}
    return f"score_text_{which} {dt}", fn, _signature(fn, ptrs, ("eps",), const), const, {}


def _attention(dt: str, d: int, which: str, arch: int = 90) -> Spec:
    kind = "dq" if which == "delta" else which  # the delta kernel takes dq's query block
    block_m, block_n = attention._blocks(150, d, kind, dt == "fp32", SHARED_MEMORY[arch], arch)
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
    return f"attn_{which} {dt} D={d}", fn, _signature(fn, ptrs, floats, const), const, options


def _score_specializations(arch: int) -> Iterator[Spec]:
    """Every score kernel at every block size its launchers choose (the same on every GPU); float16, which compiles
    as bfloat16, only for sm_90."""
    dtypes = ("bf16", "fp16", "fp32") if arch == 90 else ("bf16", "fp32")
    for dt in dtypes:
        yield _score(dt, 150)
    for k in (19, 100, 300):  # the other class blocks (32, 128; 256 and several blocks)
        yield _score("bf16", k)
        yield _score("fp32", k)
    yield _score("bf16", 150, wide=True)  # int64 indexing (images past 2**31 elements)
    yield _score_backward("bf16", wide=True)
    for k in (10, 19, 59, 100, 300):  # every class block of the fused kernel (16 ... 256) and the unfused kernel
        yield _score_backward("bf16", k)
        yield _score_backward("fp32", k)
    for dt in dtypes:
        yield _score_backward(dt)
        yield _score_backward_pixels(dt)
        yield _score_text(dt, "normalize")
        yield _score_text(dt, "grad")


def specializations(arch: int = 90) -> Iterator[Spec]:
    """Spec tuples (label, kernel, signature, constexprs, compile options). Every score kernel at every block size
    its launchers choose (the same on every GPU; float16 only for sm_90). For sm_90: every attention kernel in each
    dtype at the decoder's head dim, bfloat16 and float32 at every head dim. For other GPUs: bfloat16 and float32
    attention at every head dim, with the blocks chosen for that GPU (its shared memory, smaller blocks before
    Hopper)."""
    yield from _score_specializations(arch)
    if arch != 90:  # every attention kernel at the blocks chosen for this GPU (16-bit: float16 compiles as bfloat16)
        for dt in ("bf16", "fp32"):
            for d in attention.HEAD_DIMS:
                for which in attention.KINDS:
                    yield _attention(dt, d, which, arch)
        return
    for dt in ("bf16", "fp16", "fp32"):
        yield _attention(dt, 64, "fwd")
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


def compile_one(arch: int, index: int) -> str:
    """Compile specialization ``index`` of ``specializations(arch)`` for sm_<arch>; one line saying what it took
    (with ptxas's registers and spill stores where a ptxas is found). Raises when the kernel does not build, needs
    more shared memory than the GPU has, or (float32 attention) more than attention.smem_estimate, from which the
    launchers choose their blocks, or (sm_90, the GPU they are tuned for) spills registers; other GPUs' spills are
    reported (with Triton 3.8 there are none on sm_80 and sm_86; Triton 3.6 spills some 16-bit backward blocks on
    sm_80)."""
    label, fn, sig, const, options = list(specializations(arch))[index]
    start = time.perf_counter()
    kernel = triton.compile(triton.compiler.ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
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

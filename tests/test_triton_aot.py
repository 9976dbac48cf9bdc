"""Every Triton kernel compiles ahead of time for Hopper (sm_90), and the float32 attention kernels for sm_80 and
sm_86 at the (smaller) blocks the launchers choose for those GPUs' shared memory, no GPU needed. The compile step
raises when a kernel needs more shared memory than the GPU has, or more than the estimate the blocks come from, or
when ptxas reports spilled registers on sm_90 (the others' are reported).

Runs in a subprocess without TRITON_INTERPRET: the interpreter replaces kernels at decoration time.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_fit_smaller_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "denseclip_fast.ops.triton.aot", "--arch", "90", "86", "80"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    labels = {tuple(line.split(":")[0].split()[:2]) for line in lines}
    for kernel in ("score_fwd", "score_bwd", "score_bwd_pixels", "attn_fwd", "attn_delta", "attn_dkdv", "attn_dq",
                   "bilinear", "avg_pool", "add_nearest", "add_bilinear", "bilinear_argmax", "resized_ce_fwd",
                   "resized_ce_bwd", "add_layer_norm"):  # fmt: skip
        assert ("sm_90", kernel) in labels, lines
    # ptxas (Triton's own) reported every kernel's registers, and none spills on sm_90 (compile_all raises if one
    # does): the blocks and warps the launchers choose are spill-free there
    assert all(" registers, " in line for line in lines), lines
    assert all(" 0 B spilled" in line for line in lines if line.startswith("sm_90")), lines
    # also as Triton's JIT compiles the launches (unit strides constexpr, aligned pointers and ints divisible by 16)
    jit = {tuple(line.split(":")[0].split()[:2]) for line in lines if " jit" in line.split(":")[0]}
    for kernel in ("score_fwd", "score_bwd", "score_bwd_pixels", "attn_fwd", "attn_delta", "attn_dkdv", "attn_dq",
                   "bilinear", "avg_pool", "add_nearest", "add_bilinear", "bilinear_argmax", "resized_ce_fwd",
                   "resized_ce_bwd", "add_layer_norm"):  # fmt: skip
        assert ("sm_90", kernel) in jit, lines
    assert {("sm_86", kernel) for kernel in ("score_fwd", "score_bwd", "attn_fwd", "attn_dkdv", "attn_dq")} <= jit
    # the score forward's other plans too: the text norms' launch, the rows kernel (and with a tail), the split
    for plan in ("norms", "rows", "rows tail", "split"):
        assert any(line.startswith(f"sm_90 score_fwd bf16 K=150 {plan} jit-") for line in lines), plan
    # the blocks that differ from sm_90's: float32 forward at D=128 on sm_86 (99 KB), compiled there at them
    from denseclip_fast.ops.triton import attention

    assert attention._blocks(150, 128, "fwd", True, 101376, 86) != attention._blocks(150, 128, "fwd", True, 232448, 90)
    assert {("sm_86", "attn_fwd"), ("sm_86", "attn_dq")} <= labels


def test_wgmma_operand_race_is_found_in_the_ttgir():
    """aot.wgmma_operand_races on the lines that matter of two compiled score forwards (Triton 3.6, sm_90): the one
    that was wrong on an H200 (its dot's shared tiles also read into registers while the wgmma ran: pendings = 1)
    and one that was right (the same reads, but the wait completes the wgmma first: pendings = 0)."""
    from denseclip_fast.ops.triton import aot

    loads = ("%v_139 = ttg.local_load %v_138 token %v_137 : !ttg.memdesc<32x64xbf16, #shared, #smem, mutable>\n"
             "%t_141 = ttg.local_load %t_140 token %v_137 : !ttg.memdesc<256x32xbf16, #shared1, #smem, mutable>\n"
             "%acc_148 = ttng.warp_group_dot %t_140, %v_138, %acc {inputPrecision = 0 : i32, isAsync = true}\n")
    wait = "%acc_149:3 = ttng.warp_group_dot_wait %acc_148, %t_140, %v_138 {pendings = {n} : i32} : tensor<256x64>\n"
    assert aot.wgmma_operand_races(loads + wait.replace("{n}", "1")) == ["%t_140", "%v_138"]
    assert aot.wgmma_operand_races(loads + wait.replace("{n}", "0")) == []
    unread = wait.replace("{n}", "1")  # the operands read by nothing else: the fixed forward's
    assert aot.wgmma_operand_races(loads.replace("local_load %v_138", "local_load %v_99").replace(
        "local_load %t_140", "local_load %t_98") + unread) == []
    # a load through a transposed view of the same tile is the same race; one of another pipeline slot is not
    through_view = ("%v_150 = ttg.memdesc_trans %v_138 {order = array<i32: 1, 0>} : !ttg.memdesc<32x64xbf16>\n"
                    "%v_151 = ttg.local_load %v_150 : !ttg.memdesc<64x32xbf16> -> tensor<64x32xbf16>\n"
                    "%v_152 = ttg.memdesc_index %v_49[%c1] : !ttg.memdesc<2x32x64xbf16>\n"
                    "%v_153 = ttg.local_load %v_152 : !ttg.memdesc<32x64xbf16> -> tensor<32x64xbf16>\n")
    dot = "%acc_148 = ttng.warp_group_dot %t_140, %v_138, %acc {inputPrecision = 0 : i32, isAsync = true}\n"
    assert aot.wgmma_operand_races(through_view + dot + unread) == ["%v_138"]
    assert aot.wgmma_operand_races(through_view.split("%v_152")[0].replace("%v_138", "%v_137") + dot + unread) == []


# Compares aot.jit_specialize with what Triton's JIT binds for the same launch arguments (tensors as CPU tensors).
_JIT_RULES = """
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import create_function_from_signature

from denseclip_fast.ops.triton import aot

backend = CUDABackend(GPUTarget("cuda", 90, 32))
dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
calls = []
jit_specialize = aot.jit_specialize
aot.jit_specialize = lambda fn, args, const: calls.append((fn, args, const)) or jit_specialize(fn, args, const)
specs = [aot._jit_score("bf16", 150, "nhwc"), aot._jit_score_backward("fp32", 150, "nchw"),
         aot._jit_score_backward("bf16", 300, "nhwc"), aot._jit_score_backward_pixels("fp16", "nhwc"),
         aot._jit_score_text("bf16", "grad"), aot._jit_attention("fp32", 64, "dkdv", 150, 1601)]
for (label, _, sig, const, options, attrs), (fn, args, constexprs) in zip(specs, calls):
    real = {name: torch.empty(8, dtype=dtypes[a[1:]]) if isinstance(a, str) else a for name, a in args.items()}
    bound, specialization, opts = create_function_from_signature(fn.signature, fn.params, backend)(
        **real, **constexprs, **options)
    _, jit_sig, jit_const, jit_attrs = fn._pack_args(backend, {**constexprs, **options}, bound, specialization, opts)
    assert jit_sig == sig, (label, jit_sig, sig)
    assert {fn.arg_names[i]: v for (i,), v in jit_const.items()} == const, (label, jit_const, const)
    assert {k: v for k, v in jit_attrs.items() if v} == attrs, (label, jit_attrs, attrs)
    print(label, "as the JIT")
"""


def test_aot_specializes_as_triton_jit():
    """aot.jit_specialize builds the signature, constexprs and attributes that Triton's JIT builds at a launch with
    the same arguments (an int equal to 1 a constexpr, tt.divisibility=16 on aligned pointers and multiples of 16)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _JIT_RULES], capture_output=True, text=True, env=env)
    if result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(("ImportError", "AttributeError")):
        pytest.skip("this Triton binds launch arguments otherwise (no create_function_from_signature or _pack_args)")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" as the JIT") == 6, result.stdout


_SPLIT_PTX = """
import triton
from triton.backends.compiler import GPUTarget
from denseclip_fast.ops.triton import aot
(spec,) = [spec for spec in aot.specializations(90) if spec[0] == "score_fwd bf16 K=150 split jit-nhwc"]
label, fn, sig, const, options, attrs = spec
source = triton.compiler.ASTSource(fn, sig, const, attrs)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
"""


def test_split_score_forward_orders_its_partials_before_counting():
    """The split forward's hand-off between programs, in its sm_90 PTX (as the JIT compiles the model's launch): every
    store of a program's partials comes before a CTA barrier, the barrier before one atomic count with acquire-release
    semantics at GPU scope, and the last arrival reads the partials after it from L2 (ld.global.cg), so that the
    partials of programs on other SMs are seen (the pattern of CUTLASS's semaphore)."""
    import re

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SPLIT_PTX], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    atoms = [i for i, line in enumerate(lines) if re.search(r"\batom\.|\bred\.", line)]
    assert len(atoms) == 1 and "atom.global.gpu.acq_rel.add" in lines[atoms[0]], [lines[i] for i in atoms]
    before = lines[: atoms[0]]
    last_store = max(i for i, line in enumerate(before) if "st.global" in line)
    last_barrier = max(i for i, line in enumerate(before) if line.startswith("bar.sync"))
    assert last_store < last_barrier
    assert any("ld.global.cg" in line for line in lines[atoms[0]:])


def test_torch_compile_never_copies_an_operator_input():
    """torch.compile decides from a Triton kernel's TTIR which of its tensors it writes, and clones those first. A
    store through offsets that a helper returned together with a load made it count q, k, v, dO, lse (attention
    backward) and the whole visual map (score backward) as written: a copy of each on every compiled backward.
    tests/triton_inputs_untouched.py traces every Triton operator with AOTAutograd on a stand-in sm_90 driver."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_inputs_untouched.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env)
    if result.returncode != 0 and "set_active" in result.stderr:
        pytest.skip("this Triton has no driver.set_active for the stand-in driver")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for kernel in ("_score_fwd_kernel", "_score_fwd_rows_kernel", "_score_fwd_split_kernel", "_text_norm_kernel",
                   "_score_bwd_kernel",
                   "_score_bwd_pixel_kernel", "_text_normalize_kernel", "_text_grad_kernel", "_attn_fwd_kernel",
                   "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):  # fmt: skip
        assert any(f" {kernel} clones " in line for line in lines), (kernel, lines)
    assert not [line for line in lines if line.startswith("INPUT CLONED")], lines

"""Tuning sweep of the Triton score kernels (a benchmark for a GPU session, not part of `make bench`).

    python benchmarks/tune_score.py [--out benchmarks/results] [--tag NAME] [--quick] [--directions forward backward]

The blocks in ops/triton/score.py were chosen without a GPU, from ptxas (no register spills) and a byte count. This
times, at the kernels issue's score shapes and the engine's batch-1 RN50 call in bfloat16 (shared text as in
bench_ops, and per-image text as in the model), the forward at several (BLOCK_P, BLOCK_C, warps) and the backward
(autograd, as bench_ops times it) at several fused-kernel (BLOCK_P, BLOCK_C), warps and pixel splits, each variant's
scores and gradients compared with the default's. Writes JSON and markdown (fastest first per shape); a default
changes only with a committed result.
On a CPU (Triton's interpreter) --quick runs one tiny shape as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_ops import _graph_time  # noqa: E402
from benchmarks.common import Results, failure, rel_err, triton_device  # noqa: E402
from benchmarks.common import environment as common_environment  # noqa: E402

# (B, C, H, W, K): the kernels issue's large and RN50/ADE score shapes, and the engine's RN50 call at batch 1 (256
# pixels: 4 programs at 64 pixels a block, 16 at 16; 25.7 us of the engine's batch-1 profile, h200_2026-12-04c); the
# quick one for a CPU
SHAPES = [(32, 1024, 128, 128, 171), (16, 1024, 16, 16, 150), (1, 1024, 16, 16, 150)]
QUICK_SHAPES = [(2, 64, 8, 8, 19)]
# Variants besides the defaults (K > 128 in 16 bit: forward (64, 32, 8), backward BLOCK_P 16 and BLOCK_C 32, as
# score.bwd_blocks gives them; the sweep times the defaults themselves too):
# (128, 16, 8): the large shape's 128-pixel block without the 120 B that (128, 32, 8) spills on sm_90 (ptxas, generic
# arguments); (16, 64, 8) and (32, 64, 8): more programs for the RN50 shape (64 at batch 16 with 64 pixels a block,
# each walking all 1024 channels: 37.5 us in a CUDA graph where the target is 15, h200_2026-12-04b)
FORWARD = [(32, 32, 8), (64, 64, 8), (128, 32, 8), (128, 16, 8), (64, 16, 8), (64, 32, 4), (16, 64, 8), (32, 64, 8),
           (16, 32, 4)]  # fmt: skip  (BLOCK_P, BLOCK_C, warps)
# The forward with the text norms from a launch of their own (score.TEXT_NORMS_FROM = 0: each program reads its text
# tiles once, not twice): at the default blocks, and at 128 pixels (64 and 32 channels a step), which spill nothing
# on sm_90 that way (ptxas, as the JIT compiles them: 228-238 registers; without the norms (128, 32) spilled).
NORMS_FORWARD = [(64, 32, 8), (128, 32, 8), (128, 64, 8), (64, 64, 8)]  # (BLOCK_P, BLOCK_C, warps)
# The transposed forward (_score_fwd_rows_kernel, score.ROWS_FROM = 0: pixels as the product's rows, each visual tile
# read once; always with the text norms' launch): (BLOCK_P, BLOCK_C, warps). score.ROWS_BLOCKS, (128, 16, 8), spills
# nothing on sm_90 in any specialisation (Triton 3.6 and 3.8); (128, 32, 8) nothing as the JIT compiles aligned maps.
# For the RN50 shape (64 programs at 64 pixels, each walking 1024 channels): 64 and 128 channels a step, 4x fewer
# steps (aligned maps: no spill, 115 and 230 KB of shared memory).
ROWS_FORWARD = [(128, 16, 8), (128, 32, 8), (64, 32, 8), (64, 64, 8), (64, 128, 8)]
# The rows kernel with its classes as a block and a tail (score.ROWS_TAIL_K: 171 classes as 128 + 64 columns of
# products, 150 as 128 + 32, instead of 256): (BLOCK_P, BLOCK_C, warps). Not timed where the classes take no tail.
ROWS_TAIL_FORWARD = [(128, 16, 8), (128, 32, 8), (64, 64, 8)]
# The channels split (_score_fwd_split_kernel, score.SPLIT_C_PER_SM: where the grid at score.SPLIT_BLOCK_P pixels a
# program has at most half that many per SM, up to score.MAX_SPLITS splits): (programs per SM, most splits). At the
# RN50 shape's 128 programs (32 pixels) on 132 SMs: 2, 4 and 8 splits of 16, 8 and 4 steps; at batch 1's 8: 8 or 16
# splits. Past 2 per SM the programs run in waves (the split kernel's registers allow 1-2 per SM at 8 warps).
# Where a variant would not split (the large shape has programs enough) it launches the default: not timed again.
SPLIT_FORWARD = [(2, 8), (4, 8), (8, 8), (8, 16)]
BACKWARD = [(32, 64, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2), (16, 64, 8, 1),
            (16, 64, 8, 4)]  # fmt: skip  (BLOCK_P, BLOCK_C, warps, programs per SM) of the fused kernel


@contextlib.contextmanager
def forward_blocks(
    block_p: int, block_c: int, warps: int, text_norms: bool = False, rows: bool = False, tail: bool = False
) -> Iterator[None]:  # fmt: skip
    """The forward launched with these blocks (the class block as the launcher chooses it); text_norms: with the
    text norms from a launch of their own (score.TEXT_NORMS_FROM = 0); rows: the transposed kernel
    (score.ROWS_FROM = 0, these blocks as score.ROWS_BLOCKS), with ``tail`` its classes as a block and a tail
    (score.ROWS_TAIL_K)."""
    from denseclip_fast.ops.triton import score

    saved = score._blocks, score.ROWS_BLOCKS, score.ROWS_TAIL_K
    score.ROWS_TAIL_K = tail
    if rows:
        score.ROWS_BLOCKS = (block_p, block_c, warps)
    else:
        score._blocks = lambda k, fp32=False: (block_p, saved[0](k, fp32)[1], block_c, warps)
    score._forward_launch.cache_clear()  # launches are planned once per shape: plan them again
    try:
        with score.forward_plan(0 if rows else None, 0 if text_norms else None):
            yield
    finally:
        score._blocks, score.ROWS_BLOCKS, score.ROWS_TAIL_K = saved
        score._forward_launch.cache_clear()


@contextlib.contextmanager
def forward_split(per_sm: int, max_splits: int) -> Iterator[None]:
    """The forward with the channels split where the grid has fewer than ``per_sm`` programs per SM, at most
    ``max_splits`` ways (score.SPLIT_C_PER_SM, score.MAX_SPLITS)."""
    from denseclip_fast.ops.triton import score

    saved = score.MAX_SPLITS
    score.MAX_SPLITS = max_splits
    try:
        with score.forward_plan(None, None, per_sm):
            yield
    finally:
        score.MAX_SPLITS = saved


@contextlib.contextmanager
def backward_blocks(k: int, block_p: int, block_c: int, warps: int, per_sm: int) -> Iterator[None]:
    """The fused backward launched with these blocks for k classes, these warps and programs per SM."""
    from denseclip_fast.ops.triton import score
    from denseclip_fast.ops.triton.common import dot_in_f32

    f32 = dot_in_f32(torch.bfloat16)  # the float32 blocks under Triton's interpreter (bfloat16 products in float32)
    _, block_k, _, fused = score.bwd_blocks(k, f32)
    if not fused:
        raise ValueError(f"K={k} is past the fused kernel's {score.FUSED_MAX_K} classes")
    blocks = score.FUSED_BLOCKS[f32]
    saved = blocks[block_k], score.BWD_WARPS, score.PROGRAMS_PER_SM, dict(score.FUSED_BLOCKS_NHWC)
    blocks[block_k], score.BWD_WARPS, score.PROGRAMS_PER_SM = (block_p, block_c), warps, per_sm
    score.FUSED_BLOCKS_NHWC.clear()  # the variant's blocks for NHWC maps too
    try:
        yield
    finally:
        blocks[block_k], score.BWD_WARPS, score.PROGRAMS_PER_SM = saved[:3]
        score.FUSED_BLOCKS_NHWC.update(saved[3])


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    if device.type == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    else:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times), max(times)


def splits(shape: tuple[int, ...], per_sm: int, max_splits: int, device: torch.device) -> int:
    """How many ways the split variant (per_sm, max_splits) splits the channels of a bfloat16 ``shape`` (B, C, H, W,
    K) on ``device`` (1: not at all)."""
    from denseclip_fast.ops.triton import score
    from denseclip_fast.ops.triton.common import dot_in_f32

    b, c, h, w, k = shape
    _, block_k, block_c, _ = score._blocks(k, dot_in_f32(torch.bfloat16))
    programs = score.cdiv(h * w, score.SPLIT_BLOCK_P) * score.cdiv(k, block_k) * b
    return score.channel_splits(programs, score.cdiv(c, block_c), score._sm_count(device), per_sm, max_splits)[0]


def same_as_without(context: functools.partial, shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether a split variant would not split ``shape``, or a tail variant's classes take no tail."""
    from denseclip_fast.ops.triton import score

    if context.func is forward_split:
        return splits(shape, context.args[0], context.args[1], device) == 1
    return bool(context.func is forward_blocks and context.args[5:6] == (True,)
                and not score.rows_class_blocks(shape[-1], True)[1])  # fmt: skip


def variants(k: int) -> list[tuple[str, str, Callable[[], contextlib.AbstractContextManager[Any]]]]:
    """(direction, label, context) for each variant, the default of each direction first."""
    out: list[tuple[str, str, Callable[[], contextlib.AbstractContextManager[Any]]]] = [
        ("forward", "default", contextlib.nullcontext), ("backward", "default", contextlib.nullcontext)]  # fmt: skip
    for bp, bc, w in FORWARD:
        out.append(("forward", f"P{bp} C{bc} w{w}", functools.partial(forward_blocks, bp, bc, w)))
    for bp, bc, w in NORMS_FORWARD:
        out.append(("forward", f"norms P{bp} C{bc} w{w}", functools.partial(forward_blocks, bp, bc, w, True)))
    for bp, bc, w in ROWS_FORWARD:
        out.append(("forward", f"rows P{bp} C{bc} w{w}", functools.partial(forward_blocks, bp, bc, w, True, True)))
    for bp, bc, w in ROWS_TAIL_FORWARD:
        out.append(("forward", f"rows tail P{bp} C{bc} w{w}", functools.partial(forward_blocks, bp, bc, w, True, True,
                                                                                 True)))  # fmt: skip
    for per_sm, max_splits in SPLIT_FORWARD:
        out.append(("forward", f"split-C {per_sm}/SM x{max_splits}", functools.partial(forward_split, per_sm,
                                                                                         max_splits)))  # fmt: skip
    for bp, bc, w, per_sm in BACKWARD:
        out.append(("backward", f"P{bp} C{bc} w{w} {per_sm}/SM",
                    functools.partial(backward_blocks, k, bp, bc, w, per_sm)))  # fmt: skip
    return out


def run_shape(
    shape: tuple[int, ...], batched_text: bool, device: torch.device, results: Results,
    directions: tuple[str, ...] = ("forward", "backward"),
) -> None:  # fmt: skip
    from denseclip_fast import ops

    b, c, h, w, k = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    visual = torch.randn(b, c, h, w, generator=gen).to(device, torch.bfloat16)
    visual = visual.contiguous(memory_format=torch.channels_last).requires_grad_()
    text = torch.randn(*((b,) if batched_text else ()), k, c, generator=gen).to(device, torch.bfloat16)
    text.requires_grad_()
    grad = torch.randn(b, k, h, w, generator=gen).to(device, torch.bfloat16)
    label = f"B{b} C{c} {h}x{w} K{k} {'per-image' if batched_text else 'shared'} text"

    def forward() -> torch.Tensor:
        return ops.pixel_text_score(visual, text, backend="triton")

    expected: dict[str, Any] = {}
    for direction, name, context in variants(k):
        if direction not in directions:
            continue
        if isinstance(context, functools.partial) and same_as_without(context, shape, device):
            print(f"{label}: {name} launches what it does without its switch here (no split, no tail), not timed",
                  flush=True)  # fmt: skip
            continue
        row: dict[str, Any] = {"shape": label, "direction": direction, "variant": name}
        try:
            with context():
                out = forward()
                if direction == "forward":
                    row["median_ms"], row["min_ms"], row["max_ms"] = _time(forward, device)
                    row["graph_ms"] = _graph_time(forward, device)
                    result: tuple[torch.Tensor, ...] = (out,)
                else:
                    result = torch.autograd.grad(out, (visual, text), grad, retain_graph=True)
                    row["median_ms"], row["min_ms"], row["max_ms"] = _time(
                        lambda: torch.autograd.grad(out, (visual, text), grad, retain_graph=True), device
                    )
            if name == "default":
                expected[direction] = result
            row["rel_err_vs_default"] = max(rel_err(a, e) for a, e in zip(result, expected[direction]))
        except Exception as exc:  # a variant that fails (resources, compile) is reported, the sweep goes on
            row["error"] = failure(exc)
        print(row, flush=True)
        results.add(row)


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Score kernel tuning sweep: {env['device']}", "",
             f"torch {env['torch']}, triton {env.get('triton')}; bfloat16; times in ms (median, min-max, by "
             "triton.testing.do_bench); graph: the forward captured in a CUDA graph and replayed (no host time: "
             "what the engine pays; sorted by it where there is one); the error is the largest relative error of the "
             "variant's results against the default's.", ""]  # fmt: skip
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for direction in ("forward", "backward"):
            group = [r for r in rows if r["shape"] == shape and r["direction"] == direction]
            if not group:
                continue
            lines += [f"## {shape}, {direction}", "", "| variant | graph | median | min-max | error |",
                      "| --- | --- | --- | --- | --- |"]  # fmt: skip

            def key(r: dict) -> float:
                return r.get("graph_ms") or r.get("median_ms", float("inf"))

            for r in sorted(group, key=key):
                if "error" in r:
                    lines.append(f"| {r['variant']} | failed: {r['error']} | | | |")
                else:
                    graph = f"{r['graph_ms']:.4f}" if r.get("graph_ms") is not None else "-"
                    lines.append(f"| {r['variant']} | {graph} | {r['median_ms']:.4f} | "
                                 f"{r['min_ms']:.4f}-{r['max_ms']:.4f} | {r['rel_err_vs_default']:.1e} |")  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--quick", action="store_true", help="one tiny shape, shared text (the default without a GPU)")
    parser.add_argument("--directions", nargs="+", choices=("forward", "backward"), default=["forward", "backward"],
                        help="the passes to sweep (default both)")  # fmt: skip
    args = parser.parse_args(argv)
    device = triton_device("tune_score")
    if device is None:
        return 1
    quick = args.quick or device.type != "cuda"
    results = Results(args.out, "tune_score", args.tag, common_environment(device), {"args": vars(args)}, markdown)
    for shape in QUICK_SHAPES if quick else SHAPES:
        for batched_text in (False,) if quick else (False, True):
            run_shape(shape, batched_text, device, results, tuple(args.directions))
    print(f"wrote {results.save()}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

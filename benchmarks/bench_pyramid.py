"""A ViT engine's pyramid adapters, op by op: PyTorch's GroupNorm and transposed convolutions against the 16-bit CUDA
engine's rewrites (engine/cuda_group_norm.py, engine/cuda_convt.py), at ViT-B/16's shapes at 640x640 (the 40x40
token map of 768 channels; batch 1 and 16).

    python benchmarks/bench_pyramid.py [--out benchmarks/results] [--tag NAME] [--batches 1 16]

Cases: GroupNorm(1, 768) of the NCHW token map (ATen's, one thread block an image for the statistics; the whole-map
statistics); the 2x2 transposed convolutions of fpn1 and fpn2 (40x40 -> 80x80) and fpn1's second (80x80 ->
160x160), from an NCHW input (the GroupNorm's output on CUDA) and a channels_last one (the GELU's), by cuDNN (ATen's
convolution, then its bias pass) and as the GEMM; fpn1 whole (GroupNorm, transposed convolution with the BatchNorm
folded into it, GELU, transposed convolution) as the model's modules and as the engine's. Each timed with
triton.testing.do_bench (L2 flushed) and as a CUDA-graph replay ('graph ms', the engine's way), with the bytes it
must move (inputs and weights read once, output written once), the rate that makes at the graph time and, for the
convolutions, the FLOP rate. ViT-B/16 at batch 1 took 8.07 ms on the H200 (benchmarks/results/h200_2026-12-04/
e2e_others.md), several times what its FLOPs need, and was never profiled: this says what these steps take. On a
CPU: channels and sides / 8, the rewrites' device lists given the CPU so that their code runs, a smoke run (no
timing worth reading).
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch import nn  # noqa: E402

from benchmarks.bench_ops import _time, contestant_table, op_parser, time_contestants  # noqa: E402
from benchmarks.common import Results  # noqa: E402
from benchmarks.common import environment as common_environment  # noqa: E402
from denseclip_fast.engine import cuda_convt, cuda_group_norm  # noqa: E402
from denseclip_fast.engine.cuda_convt import CudaGemmConvTranspose2d  # noqa: E402
from denseclip_fast.engine.cuda_group_norm import WholeMapGroupNorm  # noqa: E402

NHWC = torch.channels_last
Case = tuple[str, str, int, float, dict[str, Callable[[], object]]]  # case, shape, bytes, FLOPs, contestants


def call(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: module(x)


def cases(batch: int, device: torch.device, small: bool) -> list[Case]:
    """The cases at ``batch`` (``small``: channels and sides / 8), bfloat16, weights channels_last as a CUDA engine's,
    on ``device``."""
    s = 8 if small else 1
    width, side = 768 // s, 40 // s
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, torch.bfloat16)

    def transposed() -> nn.ConvTranspose2d:
        conv = nn.ConvTranspose2d(width, width, 2, stride=2).to(device, torch.bfloat16)
        with torch.no_grad():
            conv.weight.copy_(rand(*conv.weight.shape, scale=width**-0.5))
            typing.cast(torch.Tensor, conv.bias).copy_(rand(width))
        return conv.to(memory_format=NHWC).requires_grad_(False)

    norm = nn.GroupNorm(1, width).to(device, torch.bfloat16).requires_grad_(False)
    tokens = rand(batch, width, side, side, scale=2.0) + 1  # NCHW, as the token map on CUDA
    whole = WholeMapGroupNorm.of(norm)
    out: list[Case] = [
        ("GroupNorm(1, C)", f"B{batch} C{width} {side}x{side} bf16 NCHW", tokens.numel() * 2 * 2, 0.0,
         {"aten": lambda: norm(tokens), "whole-map statistics (cuda_group_norm)": lambda: whole(tokens)}),
    ]  # fmt: skip
    for name, rows in (("40x40 -> 80x80 (fpn1's first, fpn2)", side), ("80x80 -> 160x160 (fpn1's second)", 2 * side)):
        conv = transposed()
        gemm = CudaGemmConvTranspose2d(conv)
        nchw = rand(batch, width, rows, rows)
        nhwc = nchw.contiguous(memory_format=NHWC)
        moved = nchw.numel() * 2 * 5 + conv.weight.numel() * 2  # the input, 4x its size written, the weight
        flops = 2.0 * nchw.numel() * 4 * width
        out.append((f"ConvTranspose2d 2x2, {name}", f"B{batch} C{width} {rows}x{rows} bf16", moved, flops,
                    {"cudnn, NCHW input": call(conv, nchw), "cudnn, channels_last input": call(conv, nhwc),
                     "GEMM, NCHW input (cuda_convt)": call(gemm, nchw),
                     "GEMM, channels_last input (cuda_convt)": call(gemm, nhwc)}))  # fmt: skip
    first, second = transposed(), transposed()
    model_fpn1 = nn.Sequential(norm, first, nn.GELU(), second)
    engine_fpn1 = nn.Sequential(whole, CudaGemmConvTranspose2d(first), nn.GELU(), CudaGemmConvTranspose2d(second))
    moved = tokens.numel() * 2 * (2 + 5 + 8 + 20) + 2 * first.weight.numel() * 2  # each step's reads and writes
    flops = 2.0 * tokens.numel() * 4 * width * 5  # the first at 40x40, the second at 80x80 (4x the pixels)
    out.append(("fpn1 (GroupNorm, transposed conv, GELU, transposed conv)", f"B{batch} C{width} {side}x{side} bf16",
                moved, flops,
                {"the model's modules": lambda: model_fpn1(tokens),
                 "the engine's (cuda_group_norm, cuda_convt)": lambda: engine_fpn1(tokens)}))  # fmt: skip
    return out


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# A ViT engine's pyramid adapters, op by op: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}. Median ms by triton.testing.do_bench (L2 flushed); "
             "graph ms: the call captured in a CUDA graph and replayed; TB/s: the bytes the case must move (inputs "
             "and weights read once, output written once) over the graph time; TFLOP/s: the transposed "
             "convolutions' multiply-adds (x2) over it (the plain time on a CPU: a smoke run, channels and sides / "
             "8).", "", *contestant_table(rows, flops=True)]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = op_parser(__doc__).parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu:  # the smoke run goes through the rewrites' code, as a GPU's would
        cuda_convt.GEMM_CONVT_DEVICES = ("cuda", "cpu")
        cuda_group_norm.GROUP_NORM_DEVICES = ("cuda", "cpu")
    batches = args.batches or ([1, 16] if gpu else [1])
    results = Results(args.out, "pyramid", args.tag, common_environment(device), {"args": vars(args)}, markdown)
    with torch.no_grad():
        for batch in batches:
            for case, shape, moved, flops, contestants in cases(batch, device, small=not gpu):
                row = {"case": case, "shape": shape, "bytes": moved, "flops": flops}
                time_contestants(results, row, contestants, device, _time)
    print(markdown(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine's Triton resamplings (ops/triton/resample.py) against the ATen operators they replace, one by one, at
the shapes of an RN50 512x512 engine (batch 1 and 16).

    python benchmarks/bench_resample.py [--out benchmarks/results] [--tag NAME] [--batches 1 16] [--no-sweep]

Cases: the logits' resize to the image (150 bfloat16 NHWC planes of 128x128 -> float32 NCHW 512x512; ATen: the
float32 NCHW copy the engine made first, then the resize of every plane; Triton: straight from the NHWC map, and
from an NCHW copy of it, which tells whether the kernel's gathers across the NHWC map are what it waits on; into a
preallocated buffer, as the engine's graph does, with the default tiling and (on a GPU) 35 others: rows a program,
blocks, warps; from an NHWC map whose channels are padded to 16, which tells whether the pixels' 300-byte stride,
known 4-byte aligned only, costs the loads their width; from an NCHW map made beforehand, which tells what a
classifier writing NCHW planes would save; and the write floor, the output filled), the FPN
head's 2x upsampling (128 channels, 64x64 -> 128x128 NHWC bfloat16), a bottleneck's 2x2 average pooling (256
channels, 128x128 NHWC), the FPN's top-down step (256 channels, 64x64 nearest-upsampled and added into 128x128),
the FPN head's sum of a level (its last 2x upsampling, 256 channels of 64x64, added into the 128x128 sum: ATen's
upsampling then addition, the Triton upsampling then ATen's addition as the engine had it, the fused in-place
kernel; not yet timed on a GPU),
the training loss's resize gradient (150 float32 NHWC planes of 512x512 back to 128x128: ATen's autograd, the
two products train/resize.py had on a GPU, the Triton gather it has now), and the loss's cross-entropy of those
logits, forward and backward (ATen on the 4-D map as the loss had it, ATen on the (pixels, classes) view, the Triton
kernels), the whole loss of the head's logits (the resize to the label and the cross-entropy, forward and
backward: ATen, the Triton kernels one after the other as the trainer had them, the fused kernels, whose bytes are
the floor: the logits read twice and their gradient written, the label read twice, a loss and a log-sum-exp a pixel
written and read), and predict's labels (the resize then the max over the classes, against the fused kernel at its
default tiling and, on a GPU, 23 others).
Each timed with triton.testing.do_bench (L2 flushed) and as a CUDA-graph replay ('graph ms', the engine's way), with
the bytes it must move (inputs read once, output written once) and the rate that makes at the graph time. On the
H200 (benchmarks/results/h200_2026-12-04c/e2e_rn50_whole.md) the Triton bilinear kernel's 7 launches took 203 us at
batch 1, where ATen's logits resize alone had taken 169 us: this benchmark says which launch that was. On a CPU:
tiny shapes under Triton's interpreter, a smoke run (no timing worth reading).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

if not torch.cuda.is_available():  # the kernels on CPU tensors: Triton's interpreter, chosen before triton's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_ops import _time, contestant_table, op_parser, time_contestants  # noqa: E402
from benchmarks.common import Results  # noqa: E402
from benchmarks.common import environment as common_environment  # noqa: E402
from denseclip_fast.ops.triton import labels, resample  # noqa: E402
from denseclip_fast.train.cross_entropy import _ResizedCrossEntropy, _RowsCrossEntropy  # noqa: E402
from denseclip_fast.train.resize import _BilinearResize, product_gradient  # noqa: E402

NHWC = torch.channels_last


def next_multiple(n: int, m: int) -> int:
    return -(-n // m) * m


def tilings(sweep: bool) -> list[resample.Tiling]:
    """The bilinear tilings the logits case times besides the default: output rows a program (1, 2, 4), its
    (channels, columns) block of 2048 elements or 4096 (8 x 256 the default for an NCHW output), 4 or 8 warps;
    without ``sweep`` two of them (a smoke run)."""
    if not sweep:
        return [resample.Tiling(2, 8, 32, 4), resample.Tiling(4, 4, 64, 8)]
    blocks = ((8, 256), (16, 128), (32, 64), (4, 512), (16, 256), (32, 128))
    return [resample.Tiling(rows, c, w, warps) for rows in (1, 2, 4) for c, w in blocks for warps in (4, 8)]


def label(tile: resample.Tiling) -> str:
    return f"{tile.rows} row{'s' if tile.rows > 1 else ''} x {tile.block_c} ch x {tile.block_w} col, {tile.warps} warps"


def label_tilings(sweep: bool) -> list[labels.LabelTiling]:
    """The fused label kernel's tilings the labels case times besides the default: classes a block (8 to 64) x
    columns for 1024, 2048 or 4096 values, 4 or 8 warps; without ``sweep`` two of them (a smoke run)."""
    if not sweep:
        return [labels.LabelTiling(8, 64, 4), labels.LabelTiling(16, 32, 8)]
    return [labels.LabelTiling(c, tile // c, warps) for c in (8, 16, 32, 64) for tile in (1024, 2048, 4096)
            for warps in (4, 8)]  # fmt: skip


def cases(batch: int, device: torch.device, small: bool,
          sweep: bool = False) -> list[tuple[str, str, int, dict[str, Callable[[], object]]]]:  # fmt: skip
    """(case, shape, bytes moved, {contestant: call}) at ``batch`` (``small``: every side / 8, channels / 8; ``sweep``:
    the logits case with every tiling of :func:`tilings`)."""
    s = 8 if small else 1
    k, c_up, c_pool, side = 150 // s, 128 // s, 256 // s, 128 // s
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16).contiguous(memory_format=NHWC)

    logits = rand(batch, k, side, side)
    image = (4 * side, 4 * side)
    # the same map in an NHWC buffer of channels padded to a multiple of 16 (pixel rows 16-byte aligned)
    padded = torch.empty(batch, next_multiple(k, 16), side, side, device=device, dtype=torch.bfloat16,
                         memory_format=NHWC)[:, :k].copy_(logits)  # fmt: skip
    logits_out = torch.empty(batch, k, *image, device=device)
    logits_nchw = logits.contiguous()  # as a classifier GEMM could write it: the planes whole

    def aten_logits() -> torch.Tensor:
        planes = logits.to(torch.float32, memory_format=torch.contiguous_format).view(batch * k, 1, side, side)
        return F.interpolate(planes, size=image, mode="bilinear", align_corners=False)

    def into(x: torch.Tensor, tile: resample.Tiling | None = None) -> Callable[[], torch.Tensor]:
        return lambda: resample.bilinear_into(logits_out, x, tile)

    default = resample.tiling(logits_out)
    logits_contestants: dict[str, Callable[[], object]] = {
        "aten (float32 copy, then resize)": aten_logits,
        "triton": lambda: resample.bilinear(logits, image, dtype=torch.float32, memory_format=torch.contiguous_format),
        "triton from an NCHW copy": lambda: resample.bilinear(logits.contiguous(), image, dtype=torch.float32,
                                                              memory_format=torch.contiguous_format),
        "triton into a buffer": into(logits),
        "triton into a buffer, channels padded to 16": into(padded),
        "triton into a buffer, from an NCHW map (made before)": into(logits_nchw),
        "write floor (the output filled)": lambda: logits_out.fill_(1.0),
    }  # fmt: skip
    for tile in tilings(sweep):
        if tile != default:
            logits_contestants[f"triton into a buffer, {label(tile)}"] = into(logits, tile)

    # predict's labels: the resize into a buffer and the max over the classes, against the fused kernel (best values
    # and labels written: what labels() allocates)
    best = torch.empty(batch, *image, device=device)
    index = torch.empty(batch, *image, device=device, dtype=torch.int64)

    def fused(tile: labels.LabelTiling | None = None) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            labels.bilinear_argmax_(logits, best, index, 0, tile)
            return index

        return call

    label_contestants: dict[str, Callable[[], object]] = {
        "triton resize into a buffer, then max over the classes": lambda: into(logits)().max(dim=1).indices,
        "triton fused (ops/triton/labels.py)": fused(),
    }
    default_labels = labels.label_tiling(k, image[1])
    for label_tile in label_tilings(sweep):
        if label_tile != default_labels:
            label_contestants[f"triton fused, {label_tile.block_c} classes x {label_tile.block_w} col, "
                              f"{label_tile.warps} warps"] = fused(label_tile)  # fmt: skip

    # the training loss's resize gradient: float32 NHWC gradients of the 4x upsampled logits, to the head's map
    upsampled_grad = torch.randn(batch, k, *image, generator=g).to(device).contiguous(memory_format=NHWC)
    source = torch.randn(batch, k, side, side, generator=g).to(device).contiguous(memory_format=NHWC)
    source.requires_grad_()
    upsampled = F.interpolate(source, size=image, mode="bilinear", align_corners=False)

    def aten_gradient() -> torch.Tensor:
        return torch.autograd.grad(upsampled, source, upsampled_grad, retain_graph=True)[0]

    # the training loss's cross-entropy of the label-size logits (channels_last float32), forward and backward
    ce_logits = upsampled_grad.detach().clone().requires_grad_()
    ce_label = torch.randint(0, k, (batch, *image), generator=g).to(device)

    def ce_gradient(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: torch.autograd.grad(loss_of(ce_logits).mean(), ce_logits)[0]

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(-1, k)

    # the whole loss of the head's logits: resized to the label, the cross-entropy, forward and backward
    def loss_gradient(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: torch.autograd.grad(loss_of(source).mean(), source)[0]

    level = rand(batch, c_up, side // 2, side // 2)
    pooled = rand(batch, c_pool, side, side)
    finer, coarser = rand(batch, c_pool, side, side), rand(batch, c_pool, side // 2, side // 2)
    # the FPN head's sum (head_channels 256, as c_pool) and a level's last upsampling
    head_sum, head_level = rand(batch, c_pool, side, side), rand(batch, c_pool, side // 2, side // 2)
    return [
        ("logits resize", f"B{batch} K{k} {side}x{side} bf16 NHWC -> {image[0]}x{image[1]} fp32 NCHW",
         logits.numel() * 2 + logits_out.numel() * 4, logits_contestants),
        ("predict's labels (resize, argmax)", f"B{batch} K{k} {side}x{side} bf16 NHWC -> {image[0]}x{image[1]} int64",
         logits.numel() * 2 + best.numel() * 4 + index.numel() * 8, label_contestants),
        ("loss resize gradient", f"B{batch} K{k} {image[0]}x{image[1]} -> {side}x{side} fp32 NHWC",
         (upsampled_grad.numel() + source.numel()) * 4,
         {"aten (autograd of F.interpolate)": aten_gradient,
          "products (train/resize.py on a CPU: an NCHW copy, then two GEMMs)":
              lambda: product_gradient(upsampled_grad, (side, side), NHWC),
          "triton (gather: width pass, height pass)":
              lambda: resample.bilinear_backward(upsampled_grad, source.shape, NHWC)}),
        ("loss cross-entropy, forward and backward", f"B{batch} K{k} {image[0]}x{image[1]} fp32 NHWC",
         ce_logits.numel() * 4 * 3,
         {"aten, the 4-D map (an NCHW copy, the spatial softmax)":
              ce_gradient(lambda x: F.cross_entropy(x, ce_label, ignore_index=255, reduction="none")),
          "aten, the (pixels, classes) view":
              ce_gradient(lambda x: F.cross_entropy(rows_of(x), ce_label.reshape(-1), ignore_index=255,
                                                    reduction="none")),
          "triton (train/cross_entropy.py's kernels)":
              ce_gradient(lambda x: _RowsCrossEntropy.apply(rows_of(x), ce_label.reshape(-1), 255))}),
        ("loss resize and cross-entropy, forward and backward",
         f"B{batch} K{k} {side}x{side} -> {image[0]}x{image[1]} fp32 NHWC",
         source.numel() * 4 * 3 + ce_label.numel() * 32,
         {"aten (F.interpolate, F.cross_entropy of the 4-D map)":
              loss_gradient(lambda x: F.cross_entropy(F.interpolate(x, size=image, mode="bilinear",
                                                                    align_corners=False), ce_label, ignore_index=255,
                                                      reduction="none")),
          "triton unfused (resize, the rows' cross-entropy, resize gradient: the trainer before)":
              loss_gradient(lambda x: _RowsCrossEntropy.apply(rows_of(_BilinearResize.apply(x, image)),
                                                              ce_label.reshape(-1), 255)),
          "triton fused (ops/triton/resized_cross_entropy.py)":
              loss_gradient(lambda x: _ResizedCrossEntropy.apply(x, ce_label, 255))}),
        ("FPN 2x upsampling", f"B{batch} C{c_up} {side // 2}x{side // 2} -> {side}x{side} bf16 NHWC",
         level.numel() * 2 * 5,
         {"aten": lambda: F.interpolate(level, size=(side, side), mode="bilinear", align_corners=False),
          "triton": lambda: resample.bilinear(level, (side, side))}),
        ("average pooling 2x2", f"B{batch} C{c_pool} {side}x{side} bf16 NHWC", pooled.numel() * 2 * 5 // 4,
         {"aten": lambda: F.avg_pool2d(pooled, 2), "triton": lambda: resample.avg_pool(pooled, 2)}),
        ("FPN top-down step", f"B{batch} C{c_pool} {side // 2}x{side // 2} into {side}x{side} bf16 NHWC",
         finer.numel() * 2 * 2 + coarser.numel() * 2,
         {"aten (nearest, then add)": lambda: finer + F.interpolate(coarser, size=(side, side), mode="nearest"),
          "triton (in place)": lambda: resample.add_nearest_(finer, coarser)}),
        ("FPN head sum", f"B{batch} C{c_pool} {side // 2}x{side // 2} bilinear into {side}x{side} bf16 NHWC",
         head_sum.numel() * 2 * 2 + head_level.numel() * 2,
         {"aten (upsample, then add)": lambda: head_sum + F.interpolate(head_level, size=(side, side),
                                                                        mode="bilinear", align_corners=False),
          "triton upsample, then aten add": lambda: head_sum + resample.bilinear(head_level, (side, side)),
          "triton fused (in place)": lambda: resample.add_bilinear_(head_sum, head_level)}),
    ]  # fmt: skip


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# The engine's resamplings, Triton against ATen: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}. Median ms by triton.testing.do_bench (L2 flushed); "
             "graph ms: the call captured in a CUDA graph and replayed; TB/s: the bytes the case must move (inputs "
             "read once, output written once) over the graph time (the plain time on a CPU, where the kernels run "
             "under Triton's interpreter: a smoke run).", "", *contestant_table(rows)]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = op_parser(__doc__)
    parser.add_argument("--no-sweep", action="store_true", help="on a GPU, time the logits resize with the default "
                        "tiling and two others only (36 tilings otherwise)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batches = args.batches or ([1, 16] if gpu else [1])
    results = Results(args.out, "resample", args.tag, common_environment(device), {"args": vars(args)}, markdown)
    for batch in batches:
        for case, shape, moved, contestants in cases(batch, device, small=not gpu, sweep=gpu and not args.no_sweep):
            time_contestants(results, {"case": case, "shape": shape, "bytes": moved}, contestants, device, _time)
    print(markdown(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

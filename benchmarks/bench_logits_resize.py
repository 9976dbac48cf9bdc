"""The logits' resizes on a CPU: F.interpolate per class plane against the extension's kernel (a benchmark).

    python benchmarks/bench_logits_resize.py                    # 512x512, an ADE20K image, a photo; 5 rounds
    python benchmarks/bench_logits_resize.py --retain-memory    # freed host memory kept for reuse

What ``Segmenter.logits`` does on a CPU after the network: the head's (B, K, h/4, w/4) float32 scores resized
bilinearly to the network input's size and then (uint8 images) to the image's own (engine.segmenter.resized_through).
Contestants, on the same random scores: ``aten``, each resize by F.interpolate of the (B*K, 1, h, w) planes in turn
(what resized_through did before the kernel; a resize to the same size skipped), and ``kernel``, the extension's
bilinear kernel (engine/cpu_labels.resize, the same values bit for bit: checked every round), all the resizes in
one pass that writes only the last size's planes. Cases (K 150): ``512``, scores 128x128 to 512x512 (a 512x512
normalised batch); ``ade``, 128x171 to 512x683 (ADE20K's 683x512 images, which the test scale leaves as they are);
``photo``, 128x171 to 512x683 then to 1536x2048 (a 2048x1536 photo: the test scale fits it to 683x512). The
contestants take turns, the first round untimed. Writes JSON and markdown (logits_resize_<tag>.*).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    Results,
    environment,
    take_turns,
    turn_arguments,
    turn_cells,
    turn_device,
    turn_fields,
    turn_versions,
)
from denseclip_fast.engine import cpu_labels, host_memory  # noqa: E402

Sizes = tuple[tuple[int, int], ...]
CASES: dict[str, tuple[tuple[int, int], Sizes]] = {
    "512": ((128, 128), ((512, 512),)),
    "ade": ((128, 171), ((512, 683),)),
    "photo": ((128, 171), ((512, 683), (1536, 2048))),
}
CONTESTANTS = ("aten", "kernel")


def aten(scores: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """Each resize by F.interpolate of the class planes as images of their own, in turn."""
    n, k = scores.shape[:2]
    for height, width in sizes:
        if tuple(scores.shape[2:]) != (height, width):
            planes = scores.reshape(n * k, 1, *scores.shape[2:])
            scores = F.interpolate(planes, size=(height, width), mode="bilinear", align_corners=False)
            scores = scores.view(n, k, height, width)
    return scores


def kernel(scores: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    return cpu_labels.resize(scores, sizes)


def run_case(case: str, classes: int, batch: int, repeats: int) -> dict:
    (h, w), sizes = CASES[case]
    scores = torch.randn(batch, classes, h, w, generator=torch.Generator().manual_seed(0))
    if not cpu_labels.resize_usable(scores, sizes):
        raise SystemExit(f"the extension's resize kernel does not serve {case} here (cpu_labels.resize_usable)")

    def check(out: dict[str, torch.Tensor]) -> None:
        if not torch.equal(out["kernel"], out["aten"]):
            raise AssertionError(f"the kernel's resize differs from F.interpolate's ({case})")

    calls = {"aten": functools.partial(aten, scores, sizes), "kernel": functools.partial(kernel, scores, sizes)}
    times, _ = take_turns(calls, repeats, torch.device("cpu"), check)
    return {"case": case, "scores": [batch, classes, h, w], "sizes": [list(s) for s in sizes], "repeats": repeats,
            **turn_fields(times)}  # fmt: skip


def table(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# The logits' resizes on a CPU: F.interpolate per plane vs the extension's kernel ({env['date']})",
        "",
        f"{env['device']} ({env['threads']} CPU threads); {turn_versions(env)}; commit {env['commit']}; host memory "
        f"{env.get('host_memory', 'glibc default')}. Random float32 scores, bilinear resizes to each size in turn; "
        "the kernel's values equal F.interpolate's in every round. Medians (min) in ms.",
        "",
        "| case | scores | sizes | aten | kernel | aten / kernel |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sizes = " -> ".join(f"{h}x{w}" for h, w in r["sizes"])
        ratio = r["aten_median_ms"] / r["kernel_median_ms"]
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['scores']))} | {sizes} | {turn_cells(r, CONTESTANTS)} | "
                     f"{ratio:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--retain-memory", action="store_true",
                        help="keep freed host memory for reuse (denseclip_fast.engine.host_memory)")  # fmt: skip
    turn_arguments(parser, repeats=5, device_help="cpu (the kernel is the CPU's)")
    args = parser.parse_args(argv)
    if args.classes < 1 or args.batch < 1:
        parser.error(f"--classes and --batch must be >= 1, got {args.classes}, {args.batch}")
    if turn_device(parser, args).type != "cpu":
        parser.error(f"--device must be cpu (the extension's resize kernel is a CPU kernel), got {args.device}")
    if args.retain_memory and not host_memory.retain_freed_memory():
        parser.error(f"--retain-memory: not in effect here ({host_memory.describe()})")
    env = environment(torch.device("cpu"))
    results = Results(args.out, "logits_resize", args.tag, env, {"args": vars(args)}, table)
    for case in args.cases:
        results.add(run_case(case, args.classes, args.batch, args.repeats))
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

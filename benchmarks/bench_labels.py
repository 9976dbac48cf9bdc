"""predict's label maps from the network's scores: the Segmenter's labels() against the argmax it equals (a benchmark).

    python benchmarks/bench_labels.py                              # CPU, 512x512 and a 3-megapixel photo, 5 rounds
    python benchmarks/bench_labels.py --device cuda --repeats 50

What ``Segmenter.predict`` does after the network: the (B, K, h, w) scores resized bilinearly to the image's own
size and their argmax over the K classes (denseclip_fast.engine.segmenter.labels). Contestants, on the same random
scores: ``argmax``, ``resized(scores, size).argmax(dim=1)`` (what labels equals, and what it computed whenever the
full-size scores fitted its 256 MiB chunk); ``chunks_fresh``, labels before commit 3b78993 (chunks of at most
256 MiB, each resized into new memory, the best so far kept in new tensors); ``unfused``, labels before the fused
kernel (as of af29102: chunks resized into one buffer, 16 MiB ones on a CPU, the best kept in place); ``labels``, the
engine's now (the resize and the argmax in one pass: on a CPU the extension's kernel, engine/cpu_labels.py; on a GPU
the Triton kernel, ops/triton/labels.py). Shapes: a 512x512 image (scores 128x128,
the stride-4 output of a 512x512 input) and a 2048x1536 photo, its scores (171x128, as of the 683x512 input the
test scale fits it to) resized straight to its size: the second of predict's two resizes, the first left out
(bench_predict.py times the whole way). K 150. Every contestant's labels must equal argmax's; the contestants take
turns, the first round untimed. Writes JSON and markdown (labels_<tag>.*).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import torch

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
from denseclip_fast.engine.segmenter import labels, resized  # noqa: E402

CHUNK_BEFORE = 1 << 26  # values: the chunk labels used before
CASES = {"512": ((128, 128), (512, 512)), "photo": ((128, 171), (1536, 2048))}


def argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return resized(scores, size).argmax(dim=1)


def chunks_fresh(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """labels as it was: a chunk of classes at a time (at most CHUNK_BEFORE values), each into new memory."""
    n, k = scores.shape[:2]
    step = max(1, CHUNK_BEFORE // max(1, n * size[0] * size[1]))
    if step >= k:
        return argmax(scores, size)
    best, index = resized(scores[:, :step], size).max(dim=1)
    for first in range(step, k, step):
        values, i = resized(scores[:, first : first + step], size).max(dim=1)
        better = (values > best) | (values.isnan() & ~best.isnan())
        best = torch.where(better, values, best)
        index = torch.where(better, i + first, index)
    return index


def unfused(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """labels as of af29102, before the fused kernel: chunks resized into reused buffers, then their max."""
    return labels(scores, size, fused=False)


CONTESTANTS: dict[str, Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]] = {
    "argmax": argmax, "chunks_fresh": chunks_fresh, "unfused": unfused, "labels": labels,
}  # fmt: skip


def run_case(case: str, classes: int, batch: int, device: torch.device, repeats: int) -> dict:
    (h, w), size = CASES[case]
    scores = torch.randn(batch, classes, h, w, generator=torch.Generator().manual_seed(0)).to(device)

    def check(out: dict[str, torch.Tensor]) -> None:
        for name, labels_ in out.items():
            if not torch.equal(labels_, out["argmax"]):
                raise AssertionError(f"{name}'s labels differ from the argmax's ({case})")

    calls = {name: functools.partial(fn, scores, size) for name, fn in CONTESTANTS.items()}
    times, _ = take_turns(calls, repeats, device, check)
    return {"case": case, "scores": [batch, classes, h, w], "size": list(size), "repeats": repeats,
            **turn_fields(times)}  # fmt: skip


def table(env: dict, rows: list[dict]) -> str:
    versions = turn_versions(env)
    lines = [
        f"# Label maps from scores: labels() vs the argmax ({env['date']})",
        "",
        f"{env['device']} ({env['threads']} CPU threads); {versions}; commit {env['commit']}. Random scores, bilinear "
        "resize to the size, argmax over the classes; every contestant's labels equal argmax's. argmax: "
        "resized().argmax; chunks_fresh: labels before 3b78993; unfused: labels before the fused kernel (resized "
        "chunks in reused buffers, then their max); labels: the engine's now (on a CPU the resize and the argmax in "
        "one pass, engine/cpu_labels.py). Medians (min) in ms.",
        "",
        "| case | scores | size | argmax | chunks_fresh | unfused | labels | unfused / labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = turn_cells(r, list(CONTESTANTS))
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['scores']))} | {r['size'][0]}x{r['size'][1]} | {cells} | "
                     f"{r['unfused_median_ms'] / r['labels_median_ms']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1)
    turn_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.classes < 1 or args.batch < 1:
        parser.error(f"--classes and --batch must be >= 1, got {args.classes}, {args.batch}")
    device = turn_device(parser, args)
    results = Results(args.out, "labels", args.tag, environment(device), {"args": vars(args)}, table)
    for case in args.cases:
        results.add(run_case(case, args.classes, args.batch, device, args.repeats))
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

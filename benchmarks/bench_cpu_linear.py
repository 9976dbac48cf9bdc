"""The CPU engine's linear layers, oneDNN against the BLAS, in one process (a benchmark).

    python benchmarks/bench_cpu_linear.py                       # RN50 and ViT-B/16 at 224, 2 repeats
    python benchmarks/bench_cpu_linear.py --size 512 --repeats 5
    python benchmarks/bench_cpu_linear.py --dtype bfloat16 --archs ViT-B/16 --size 640 --tag ...

The CPU Segmenter computes its linear layers with oneDNN (denseclip_fast/engine/cpu_linear.py). This times, per
architecture, what a user waits for with each library: building a Segmenter (``--dtype``, float32 by default; 150
ADE20K classes: the copy, the BatchNorm folding and the text encoder for the vocabulary), ``set_classes`` with the
150 names reversed (the text encoder alone: the same one in RN50 and ViT-B/16, and in a bfloat16 engine, whose text
encoder computes in float32), and ``logits`` of one random image (the image path). "blas" is the same code with the
oneDNN probe answering no: every layer takes F.linear, as the engine did before commits 59e7a9a (image path) and
3667aec (text encoder); in a bfloat16 engine, that is its image path before commit 0439a7d (F.linear, and QuickGELU
as three passes instead of oneDNN's SiLU post-op). The two paths take turns, which one goes first alternating from
round to round, so that the machine's drift reaches both alike. Random weights. Writes JSON and markdown
(cpu_linear_<tag>.*).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import cast

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import Results, arch_name, environment  # noqa: E402
from benchmarks.official import randomize_  # noqa: E402
from denseclip_fast.engine import cpu_linear  # noqa: E402

PATHS = ("blas", "onednn")


@contextlib.contextmanager
def linear_path(name: str) -> Iterator[None]:
    """Every linear layer through F.linear ("blas": the probe answers no, at construction and at each call) or
    through oneDNN where the engine takes it ("onednn")."""
    if name == "onednn":
        yield
        return
    probe = cpu_linear.onednn_linear_usable
    cpu_linear.onednn_linear_usable = lambda: False  # type: ignore[assignment]
    try:
        yield
    finally:
        cpu_linear.onednn_linear_usable = probe


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def build(arch: str, names: list[str]) -> dcf.DenseCLIP:
    torch.manual_seed(0)
    return randomize_(dcf.DenseCLIP.from_arch(arch, names)).eval()


def run_arch(arch: str, size: int, repeats: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    names = list(dcf.ADE20K_CLASSES[:150])
    model = build(arch, names)
    image = torch.randn(1, 3, size, size)
    engines: dict[str, dcf.Segmenter] = {}
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(repeats + 1):  # the first round warms up, untimed
        for path in PATHS if i % 2 else PATHS[::-1]:
            with linear_path(path):
                build_ms = _timed(lambda: engines.__setitem__(path, dcf.Segmenter(model, device="cpu",
                                                                                  dtype=dtype)))  # fmt: skip
                seg = engines[path]
                # in the untimed round the build has run the text encoder (set_classes' work) already
                vocab_ms = _timed(lambda: seg.set_classes(names[::-1])) if i else 0.0
                image_ms = _timed(lambda: seg.logits(image))
            if i:
                for what, ms in (("Segmenter(...)", build_ms), ("set_classes(150)", vocab_ms), ("logits", image_ms)):
                    times.setdefault((what, path), []).append(ms)
    with linear_path("blas"):
        reference = cast(torch.Tensor, engines["blas"].logits(image))  # a float batch in: one tensor out
    error = float((cast(torch.Tensor, engines["onednn"].logits(image)) - reference).norm() / reference.norm())
    rows = []
    for (what, path), samples in times.items():
        rows.append({"arch": arch, "dtype": str(dtype).removeprefix("torch."), "size": size, "what": what,
                     "path": path, "median_ms": statistics.median(samples), "min_ms": min(samples),
                     "repeats": len(samples),
                     "rel_error_vs_blas": error if what == "logits" and path == "onednn" else None})  # fmt: skip
    return rows


def table(env: dict, rows: list[dict]) -> str:
    dtypes = ", ".join(dict.fromkeys(r.get("dtype", "float32") for r in rows))
    lines = [
        f"# CPU engine: oneDNN vs BLAS linear layers ({env['date']})",
        "",
        f"CPU: {env['device']} ({env['threads']} threads); torch {env['torch']}; {dtypes}, 150 classes, random "
        "weights, batch 1, square images. blas: every linear layer through F.linear (the engine before commits "
        "59e7a9a and 3667aec; a bfloat16 engine's image path and QuickGELU before 0439a7d); onednn: the engine as "
        "shipped. The paths take turns, which goes first alternating by "
        "round. set_classes runs the text encoder alone, the same in both architectures. Error: relative L2 of the "
        "onednn logits against blas.",
        "",
        "| arch | size | call | blas median ms | onednn median ms | onednn / blas | blas min | onednn min | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["arch"], r["size"], r["what"], r["path"]): r for r in rows}
    for arch, size, what in dict.fromkeys((r["arch"], r["size"], r["what"]) for r in rows):
        blas, onednn = by_key.get((arch, size, what, "blas")), by_key.get((arch, size, what, "onednn"))
        if blas is None or onednn is None:
            continue
        error = onednn["rel_error_vs_blas"]
        lines.append(
            f"| {arch} | {size} | {what} | {blas['median_ms']:.1f} | {onednn['median_ms']:.1f} | "
            f"{onednn['median_ms'] / blas['median_ms']:.2f} | {blas['min_ms']:.1f} | {onednn['min_ms']:.1f} | "
            f"{'' if error is None else f'{error:.1e}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS, default=["RN50", "ViT-B/16"])
    parser.add_argument("--size", type=int, default=224, help="square image side (default 224)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one untimed (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the engine's dtype")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not cpu_linear.onednn_linear_usable():
        print("oneDNN's linear operator is not usable in this PyTorch: the engine uses the BLAS; nothing to compare")
        return 0
    results = Results(args.out, "cpu_linear", args.tag, environment(torch.device("cpu")), {"args": vars(args)}, table)
    for arch in args.archs:
        for row in run_arch(arch, args.size, args.repeats, getattr(torch, args.dtype)):
            results.add(row)
        print(f"{arch}: done", flush=True)
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

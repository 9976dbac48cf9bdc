"""Host time of the operators' Python paths, with the Triton kernel launches stubbed out (a benchmark).

    python benchmarks/bench_host.py [--out benchmarks/results] [--tag NAME]

At the model's shapes a score kernel runs for microseconds, so an eager call's host time (argument checks, the
torch.library dispatch, the launcher's Python, autograd's wrapper) decides what an eager benchmark measures. This
times those paths with ``launch`` in ops/triton/score.py replaced by a no-op, so that only host work is left:
the eager score call (ops.pixel_text_score on the Triton backend), the same through its torch.library operator,
the backward's launcher (score_backward) alone and through its operator, and autograd.grad through the Triton
operator and through the C++ one (beside the C++ backward operator alone). Tiny tensors on a CPU (Triton's
interpreter; real CPU work kept small), the RN50/ADE score shape on a GPU. Writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Results, failure, sync, triton_device  # noqa: E402
from benchmarks.common import environment as common_environment  # noqa: E402

CPU_SHAPE = (2, 64, 4, 4, 19)  # B, C, H, W, K
GPU_SHAPE = (16, 1024, 16, 16, 150)  # the kernels issue's RN50/ADE score shape


class _NoLaunch:
    """Stands in for ``launch(kernel)``: ``[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


SECONDS = 0.5  # of timing per path (at least 5 batches of 100 calls)


def host_us(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(median, min) microseconds a call over batches of 100 calls, for about SECONDS."""
    for _ in range(20):
        fn()
    sync(device)
    per_call: list[float] = []
    deadline = time.perf_counter() + SECONDS
    while len(per_call) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(100):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - start) * 1e4)
    return statistics.median(per_call), min(per_call)


def cases(device: torch.device) -> list[tuple[str, Callable[[], object]]]:
    from denseclip_fast import ops
    from denseclip_fast.ops.triton import score

    b, c, h, w, k = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    gen = torch.Generator().manual_seed(0)
    visual = torch.randn(b, c, h, w, generator=gen).to(device, torch.bfloat16)
    visual = visual.contiguous(memory_format=torch.channels_last)
    text = torch.randn(k, c, generator=gen).to(device, torch.bfloat16)
    grad = torch.randn(b, k, h, w, generator=gen).to(device, torch.bfloat16)
    score_map = torch.randn(b, k, h, w, generator=gen).to(device, torch.bfloat16)
    norm = torch.rand(b, h, w, generator=gen).to(device) + 0.5
    lib = torch.ops.denseclip_fast
    v_leaf, t_leaf = visual.detach().requires_grad_(), text.detach().requires_grad_()
    out_triton = ops.pixel_text_score(v_leaf, t_leaf, backend="triton")
    out = [
        ("pixel_text_score, eager (Triton)", lambda: ops.pixel_text_score(visual, text, backend="triton")),
        ("pixel_text_score_triton operator", lambda: lib.pixel_text_score_triton(visual, text, 1.0)),
        ("score_backward launcher alone", lambda: score.score_backward(grad, visual, text, 1.0, score_map, norm)),
        ("pixel_text_score_backward_triton operator",
         lambda: lib.pixel_text_score_backward_triton(grad, visual, text, 1.0, score_map, norm)),
        ("autograd.grad through the Triton operator",
         lambda: torch.autograd.grad(out_triton, (v_leaf, t_leaf), grad, retain_graph=True)),
    ]  # fmt: skip
    if ops.extension_available() and device.type == "cpu":  # the C++ CPU operator: real (tiny) work, for scale
        v32, t32, g32 = (x.float() for x in (visual, text, grad))
        v32_leaf, t32_leaf = v32.detach().requires_grad_(), t32.detach().requires_grad_()
        out_cpp = ops.pixel_text_score(v32_leaf, t32_leaf, backend="cpu")
        out += [
            ("C++ backward operator alone (CPU, float32)", lambda: lib.pixel_text_score_backward(g32, v32, t32, 1.0)),
            ("autograd.grad through the C++ operator (CPU, float32)",
             lambda: torch.autograd.grad(out_cpp, (v32_leaf, t32_leaf), g32, retain_graph=True)),
        ]  # fmt: skip
    return out


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Host time of the operators' Python paths: {env['device']}", "",
             f"torch {env['torch']}, triton {env.get('triton')}; Triton kernel launches stubbed out; shape "
             f"{rows[0]['shape'] if rows else ''}; microseconds a call.", "",
             "| path | median | min |", "| --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['path']} | {r['median_us']:.1f} | {r['min_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    device = triton_device("bench_host")
    if device is None:
        return 1
    gpu = device.type == "cuda"
    from denseclip_fast.ops.triton import score

    b, c, h, w, k = GPU_SHAPE if gpu else CPU_SHAPE
    shape = f"B{b} C{c} {h}x{w} K{k} bfloat16"
    results = Results(args.out, "host", args.tag, common_environment(device), {"args": vars(args)}, markdown)
    real_launch = score.launch
    score.launch = lambda kernel: _NoLaunch()
    try:
        for path, fn in cases(device):
            row: dict[str, Any] = {"path": path, "shape": shape}
            try:
                row["median_us"], row["min_us"] = host_us(fn, device)
            except Exception as exc:  # a path this version lacks is reported, the others measured
                row["error"] = failure(exc)
            print(row, flush=True)
            results.add(row)
    finally:
        score.launch = real_launch
    print(f"wrote {results.save()}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

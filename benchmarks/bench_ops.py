"""Operator benchmark: each fused operator, forward and backward, per backend, against eager PyTorch and
torch.compile of the reference (for the score, in the official code's words: F.normalize, the same values).

    python benchmarks/bench_ops.py [--out benchmarks/results] [--dtype bf16] [--quick] [--compile yes|no|only]

On a GPU: the shapes of the issue (score at RN50/ADE, ViT-B and a large map; score_concat at RN50's and ViT-B's
concatenated level; the context decoder's attention at K150 x N257 and K150 x N1601), timed with
triton.testing.do_bench (L2 flushed between runs). On a CPU (or with --quick) small shapes and the CPU contestants,
as a smoke run. Prints a table and writes JSON and markdown with the
device name, torch and triton versions. Roofline: bytes moved / 4.8 TB/s and FLOPs / the dtype's compute peak (H200:
790 TFLOP/s for bf16/fp16, the kernels issue's figure; 67 TFLOP/s for float32, whose kernels compute in IEEE float32
without tensor cores); "floor" is the larger of the two, "of floor" is floor / measured. score_concat's eager
baseline runs twice: on NCHW inputs, the official model's layout (the official row), and on the channels_last inputs
the fused backends get (where torch.cat also transposes the score map). The targets say which fused backend the
engine's automatic choice resolves per operator and dtype (ops.backends.resolve) and judge that one, with the best
fused backend beside it.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Results, failure, math_settings, targets_markdown  # noqa: E402
from benchmarks.common import environment as common_environment  # noqa: E402
from denseclip_fast import ops  # noqa: E402
from denseclip_fast.ops import reference  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e bandwidth (NVIDIA's H200 datasheet: 4.8 TB/s)
# Compute peaks, dense, by the dtype a kernel computes in. bf16/fp16: the kernels issue's "FLOPs / 790 TFLOP/s" for
# the H200's tensor cores (below NVIDIA's H200 SXM datasheet, 1,979 TFLOP/s with sparsity, ~989 dense, so a
# compute-bound "of floor" reads higher than against the datasheet). float32: 67 TFLOP/s, the H200 SXM's FP32 rate
# without tensor cores (NVIDIA's datasheet; TF32 tensor cores would be 989 with sparsity), since the float32 kernels
# and the baselines they are compared with compute in IEEE float32 (matmuls' default; no TF32).
PEAK_FLOPS_16BIT = 790e12
PEAK_FLOPS_FP32 = 67e12
PEAK_FLOPS = {"bfloat16": PEAK_FLOPS_16BIT, "float16": PEAK_FLOPS_16BIT, "float32": PEAK_FLOPS_FP32}
# score_concat's eager baselines: the official model's layout, and the fused backends' (see bench_concat)
CONCAT_OFFICIAL = "eager torch.cat (official, NCHW)"
CONCAT_CHANNELS_LAST = "eager torch.cat (channels_last)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    direction: str
    contestant: str
    median_ms: float
    min_ms: float
    max_ms: float
    bytes: float
    flops: float
    engine_backend: str | None = None  # what the engine's automatic choice runs for this operator and dtype
    graph_ms: float | None = None  # forward on a GPU: the median of CUDA-graph replays of one call (see _graph_time)

    @property
    def floor_ms(self) -> float:
        """The roofline floor: bytes at HBM bandwidth or FLOPs at the dtype's compute peak, whichever is longer."""
        return 1e3 * max(self.bytes / HBM_BYTES_PER_S, self.flops / PEAK_FLOPS[self.dtype])

    def summary(self) -> dict:
        d = asdict(self)
        s = self.median_ms / 1e3
        d.update(
            floor_ms=self.floor_ms,
            fraction_of_floor=self.floor_ms / self.median_ms,
            achieved_tb_per_s=self.bytes / s / 1e12,
            achieved_tflop_per_s=self.flops / s / 1e12,
        )
        return d


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    if device.type == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="all")
        return statistics.median(times), min(times), max(times)
    fn()
    times = []
    deadline = time.perf_counter() + 1.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times), max(times)


def _graph_time(fn: Callable[[], object], device: torch.device) -> float | None:
    """The median device time of one ``fn()`` captured in a CUDA graph and replayed (do_bench, L2 flushed before each
    replay): the kernels' time with no host work in it, as the engine's graph replays run them. On the H200 the
    plain do_bench times of the Triton operators at small shapes (0.36-0.45 ms for a 16x16 map,
    benchmarks/results/h200_2026-12-04) were far above their kernels' time in the engine's profile: host time the
    flush did not hide. None on a CPU."""
    if device.type != "cuda":
        return None
    import triton.testing

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises before a capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="all")
    return statistics.median(times)


Timer = Callable[[Callable[[], object], torch.device], tuple[float, float, float]]  # _time's signature


def op_parser(description: str | None) -> argparse.ArgumentParser:
    """The op-by-op benchmarks' command line (bench_resample, bench_pyramid): --batches, --out, --tag."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke, or the GPU's name)")
    return parser


def contestant_table(rows: list[dict], flops: bool = False) -> list[str]:
    """The op-by-op benchmarks' table of :func:`time_contestants`' rows: median and graph ms, TB/s (the row's bytes
    over the graph time, the median without one) and its share of HBM_BYTES_PER_S; with ``flops`` also TFLOP/s (the
    row's flops, "-" where 0) and its share of PEAK_FLOPS_16BIT; a failed contestant's error."""
    extra = " TFLOP/s | of 790 |" if flops else ""
    lines = [f"| case | shape | contestant | median ms | graph ms | TB/s | of 4.8 TB/s |{extra}",
             "| --- " * (9 if flops else 7) + "|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['shape']} | {r['contestant']} | failed: {r['error']} | | |"
                         + (" | | |" if flops else " |"))  # fmt: skip
            continue
        t = (r["graph_ms"] if r["graph_ms"] is not None else r["median_ms"]) * 1e-3
        rate = r["bytes"] / t
        graph = f"{r['graph_ms']:.4f}" if r["graph_ms"] is not None else "-"
        line = (f"| {r['case']} | {r['shape']} | {r['contestant']} | {r['median_ms']:.4f} | {graph} | "
                f"{rate / 1e12:.2f} | {rate / HBM_BYTES_PER_S:.0%} |")  # fmt: skip
        if flops:
            rate_f = r["flops"] / t
            line += f" {rate_f / 1e12:.1f} | {rate_f / PEAK_FLOPS_16BIT:.1%} |" if r["flops"] else " - | - |"
        lines.append(line)
    return lines


def time_contestants(results: Results, row: dict, contestants: dict[str, Callable[[], object]], device: torch.device,
                     timer: Timer) -> None:  # fmt: skip
    """A row per contestant (``row``'s fields, its name, and its median/min/max ms by ``timer`` and graph ms by
    :func:`_graph_time`) added to ``results`` and printed; a contestant that fails has its error in its row, and the
    others still run (bench_resample's and bench_pyramid's op-by-op cases)."""
    for name, fn in contestants.items():
        one = {**row, "contestant": name}
        try:
            median, low, high = timer(fn, device)
            one.update(median_ms=median, min_ms=low, max_ms=high, graph_ms=_graph_time(fn, device))
        except Exception as exc:  # reported; the other rows still run
            one["error"] = failure(exc)
        results.add(one)
        print(one, flush=True)


# The Triton score forward's other plans for 16-bit maps (ops/triton/score.py: (ROWS_FROM, TEXT_NORMS_FROM,
# SPLIT_C_PER_SM), the first two here from the first pixel on; the rows kernel always with the text norms' launch; the
# channels split where the grid has at most 2 programs per SM, towards 4), timed forward only (the backward is the
# triton row's) on a GPU, until one is adopted (tune_score.py checks their results); not judged by the targets
TRITON_PLANS = {"triton text norms": (None, 0, None), "triton rows": (0, None, None), "triton split-C": (None, None, 4)}


def _triton_plan(
    fn: Callable, rows_from: int | None, norms_from: int | None, split_c_per_sm: int | None = None
) -> Callable:  # fmt: skip
    """``fn`` (the triton backend's pixel_text_score) with the forward planned so; forward only (``forward_only``)."""
    from denseclip_fast.ops.triton import score

    def run(*args: torch.Tensor) -> torch.Tensor:
        with score.forward_plan(rows_from, norms_from, split_c_per_sm):
            return fn(*args)

    run.forward_only = True  # type: ignore[attr-defined]
    return run


def official_score(visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The official code's score, F.normalize of both sides and their products: the eager and torch.compile
    baselines. reference.pixel_text_score has its values, with a normalisation whose gradient at a norm of exactly
    eps does not depend on the torch (a few small operations more), which is not the official code's cost."""
    return reference.normalized_score(F.normalize(visual, dim=1), F.normalize(text, dim=-1), scale)


def official_concat(feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """The official model's torch.cat of a pyramid level and its score map (the baselines of score_concat)."""
    return torch.cat([feature, official_score(visual, text, scale)], dim=1)


def _contestants(op: str, device: torch.device, dtype: torch.dtype, head_dim: int = 0,
                 compile_mode: str = "yes") -> dict[str, Callable]:  # fmt: skip
    """name -> function with the operator's signature: the fused backends first, torch.compile (slow to build)
    last, so that a run stopped by a time budget has measured what matters most. ``compile_mode``: "yes" (every
    contestant), "no" (no torch.compile), "only" (the eager baselines and torch.compile)."""
    op_name = {"score": "pixel_text_score", "concat": "score_concat", "attention": "context_attention"}[op]
    fused: Callable[[str], Callable]  # backend -> the fused operator on it
    compiled_ref: Callable
    if op == "score":
        fused = lambda backend: lambda v, t: ops.pixel_text_score(v, t, backend=backend)  # noqa: E731
        baselines: dict[str, Callable] = {"eager": official_score}
        compiled_ref = official_score
    elif op == "concat":
        fused = lambda backend: lambda f, v, t: ops.score_concat(f, v, t, backend=backend)  # noqa: E731
        # the same function: bench_concat gives the official one NCHW inputs
        baselines = {CONCAT_OFFICIAL: official_concat, CONCAT_CHANNELS_LAST: official_concat}
        compiled_ref = official_concat
    else:
        fused = lambda backend: lambda q, k, v: ops.context_attention(q, k, v, backend=backend)  # noqa: E731
        baselines = {"eager einsum (official)": reference.attention,
                     "sdpa": torch.nn.functional.scaled_dot_product_attention}  # fmt: skip
        compiled_ref = reference.attention
    runnable = [b for b in ("triton", "cuda", "cpu")
                if ops.backends.unavailable_reason(b, op_name, device, dtype, head_dim) is None]  # fmt: skip
    fns = {backend: fused(backend) for backend in runnable if compile_mode != "only"}
    if op == "score" and "triton" in fns and device.type == "cuda" and dtype != torch.float32:
        fns |= {name: _triton_plan(fns["triton"], *plan) for name, plan in TRITON_PLANS.items()}
    fns |= baselines
    if compile_mode != "no" and (device.type == "cuda" or os.environ.get("BENCH_COMPILE") == "1"):
        # default mode: no CUDA graphs, so _timed's forward output stays valid through its timed backward calls.
        # Dynamo's cache of the reference function is shared by every case (keyed on its code): reset, so that
        # the cases do not add up to its recompile limit (8), past which it would run eagerly under this label
        torch._dynamo.reset()
        fns["torch.compile(reference)"] = torch.compile(compiled_ref, dynamic=False)
    return fns


def engine_backend(op: str, device: torch.device, dtype: torch.dtype, head_dim: int = 0) -> str | None:
    """The backend the engine runs ``op`` on here: ops' automatic choice (or DENSECLIP_FAST_BACKEND's), which the
    model's calls take; None if that cannot run (a forced backend that is unavailable)."""
    try:
        return ops.backends.resolve(op, device, dtype, head_dim=head_dim)
    except (RuntimeError, ValueError):
        return None


def _timed(op: str, shape: str, dtype: torch.dtype, inputs: tuple[torch.Tensor, ...], device: torch.device,
           backward: bool, forward_cost: tuple[float, float], backward_cost: tuple[float, float],
           inputs_for: dict[str, tuple[torch.Tensor, ...]] | None = None,
           head_dim: int = 0) -> Callable[[str, Callable], list[Row]]:  # fmt: skip
    """``one(name, fn)`` for _each_contestant: ``fn(*inputs)`` timed (``inputs_for[name]`` instead where given: a
    baseline in another memory layout), then (with ``backward``) the gradients to every input; the costs are each
    pass's (bytes, FLOPs). Every row records the engine's backend for the operator (:func:`engine_backend`)."""
    label = str(dtype)[6:]
    engine = engine_backend(op, device, dtype, head_dim)

    def one(name: str, fn: Callable) -> list[Row]:
        args = (inputs_for or {}).get(name, inputs)
        fn(*args)
        t = _time(lambda: fn(*args), device)
        try:
            graph = _graph_time(lambda: fn(*args), device)
        except Exception as exc:  # a contestant that cannot be captured keeps its plain timing
            NOT_MEASURED.append({"what": f"{name} on {shape} in a CUDA graph", "error": failure(exc)})
            graph = None
        rows = [Row(op, shape, label, "forward", name, *t, *forward_cost, engine, graph)]
        if backward and not getattr(fn, "forward_only", False):
            try:
                leaves = tuple(x.detach().requires_grad_() for x in args)
                out = fn(*leaves)
                grad = torch.randn_like(out)
                t = _time(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), device)
                rows.append(Row(op, shape, label, "backward", name, *t, *backward_cost, engine))
            except Exception as exc:  # the backward alone is not measured: the forward's row stands
                NOT_MEASURED.append({"what": f"{name} backward on {shape}", "error": failure(exc)})
                print(f"  backward of {name} on {shape} not measured: {failure(exc)}", flush=True)
        return rows

    return one


def bench_score(b: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, device: torch.device, backward: bool,
                compile_mode: str = "yes"):  # fmt: skip
    visual = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    text = torch.randn(k, c, device=device, dtype=dtype)
    s, p = dtype.itemsize, h * w
    fwd_bytes, fwd_flops = (b * c * p + k * c + b * k * p) * s, 2.0 * b * k * c * p
    bwd_bytes = (2 * b * c * p + b * k * p + 2 * k * c) * s  # read visual and grad, write grad_visual
    shape = f"B{b} C{c} {h}x{w} K{k}"
    one = _timed("pixel_text_score", shape, dtype, (visual, text), device, backward, (fwd_bytes, fwd_flops),
                 (bwd_bytes, 2 * fwd_flops))  # fmt: skip
    return _each_contestant(_contestants("score", device, dtype, compile_mode=compile_mode), one, shape)


def bench_concat(b: int, cf: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, device: torch.device,
                 backward: bool, compile_mode: str = "yes"):  # fmt: skip
    """score_concat, the form the model runs: the FPN level's feature (B, cf, H, W) and the score channels in one
    (B, cf + K, H, W) buffer, against the official torch.cat of the feature and the score map. The fused backends
    get channels_last inputs (the engine's layout); the official baseline NCHW ones, as the official model has them
    (on channels_last inputs torch.cat makes its NCHW score map channels_last with a transposing copy the official
    model never pays: that is the second eager row)."""
    feature = torch.randn(b, cf, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    visual = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    text = torch.randn(k, c, device=device, dtype=dtype)
    nchw = (feature.contiguous(), visual.contiguous(), text)
    s, p = dtype.itemsize, h * w
    # read feature, visual and text, write the concatenated buffer
    fwd_bytes, fwd_flops = (2 * b * cf * p + b * c * p + k * c + b * k * p) * s, 2.0 * b * k * c * p
    # the score part as pixel_text_score's backward; the feature's gradient is a view of grad
    bwd_bytes = (2 * b * c * p + b * k * p + 2 * k * c) * s
    shape = f"B{b} Cf{cf} C{c} {h}x{w} K{k}"
    one = _timed("score_concat", shape, dtype, (feature, visual, text), device, backward, (fwd_bytes, fwd_flops),
                 (bwd_bytes, 2 * fwd_flops), {CONCAT_OFFICIAL: nchw})  # fmt: skip
    return _each_contestant(_contestants("concat", device, dtype, compile_mode=compile_mode), one, shape)


def bench_attention(b: int, heads: int, lq: int, lk: int, d: int, dtype: torch.dtype, device: torch.device,
                    backward: bool, compile_mode: str = "yes"):  # fmt: skip
    q = torch.randn(b, heads, lq, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, heads, lk, d, device=device, dtype=dtype) for _ in range(2))
    s = dtype.itemsize
    fwd_bytes, fwd_flops = b * heads * (2 * lq + 2 * lk) * d * s, 4.0 * b * heads * lq * lk * d
    bwd_bytes = b * heads * (4 * lq + 4 * lk) * d * s
    shape = f"B{b} H{heads} K{lq} x N{lk} D{d}"
    one = _timed("context_attention", shape, dtype, (q, k, v), device, backward, (fwd_bytes, fwd_flops),
                 (bwd_bytes, 2.5 * fwd_flops), head_dim=d)  # fmt: skip
    return _each_contestant(_contestants("attention", device, dtype, d, compile_mode), one, shape)


# what a run could not measure, in its results (JSON and markdown) as well as on stdout: {"what", "error"}
NOT_MEASURED: list[dict[str, str]] = []


def _each_contestant(fns: dict[str, Callable], one: Callable[[str, Callable], list[Row]], shape: str) -> list[Row]:
    """``one(name, fn)`` for every contestant; one that cannot run this case is reported and skipped."""
    rows = []
    for name, fn in fns.items():
        try:
            rows += one(name, fn)
        except Exception as exc:
            NOT_MEASURED.append({"what": f"{name} on {shape}", "error": failure(exc)})
            print(f"  skipped {name} on {shape}: {failure(exc)}", flush=True)
    return rows


def environment(device: torch.device) -> dict:
    env = common_environment(device) | math_settings()  # the float32 baselines' matmuls: IEEE unless TF32 is set
    env["extension"] = ops.build_info() if ops.extension_available() else None
    return env


def markdown(env: dict, rows: list[dict]) -> str:
    if env["gpu"]:
        how = ("triton.testing.do_bench: each call's device time between CUDA events, the L2 cache flushed (a 256 MB "
               "write) before each, so a launch overhead shorter than that write is hidden: small shapes' times are "
               "their kernels' (as in the engine's CUDA-graph replays), not a host-bound loop's. 'graph ms': the "
               "forward captured in a CUDA graph, the median of its replays timed so (no host work at all; the "
               "forward targets are judged on it where measured). Floor = max(bytes / 4.8 TB/s, FLOPs / the "
               "dtype's peak: 790 TFLOP/s for bf16/fp16, 67 TFLOP/s for float32 (IEEE, no tensor cores)), the "
               "H200's; 'of floor' = floor / median.")  # fmt: skip
    else:
        how = (f"CPU run ({env['threads']} threads): median of perf_counter loops. The bandwidth, FLOP-rate "
               "and floor columns refer to an H200 and mean nothing here.")  # fmt: skip
    lines = [
        f"# Operator benchmark: {env['device']}",
        "",
        f"{env['date']}, torch {env['torch']}, triton {env['triton']}. {how}",
        "",
        "| op | shape | dtype | pass | contestant | median ms | min ms | max ms | graph ms | TB/s | TFLOP/s "
        "| of floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        graph = "-" if r.get("graph_ms") is None else f"{r['graph_ms']:.4f}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['direction']} | {r['contestant']} | "
            f"{r['median_ms']:.4f} | {r['min_ms']:.4f} | {r['max_ms']:.4f} | {graph} | {r['achieved_tb_per_s']:.2f} | "
            f"{r['achieved_tflop_per_s']:.1f} | {100 * r['fraction_of_floor']:.0f}% |"
        )
    if NOT_MEASURED:
        lines += ["", "Not measured: " + "; ".join(f"{m['what']} ({m['error'][:160]})" for m in NOT_MEASURED) + "."]
    choices = engine_choices(rows)
    if choices:
        listed = "; ".join(f"{op} {dtype}: {backend}" for (op, dtype), backend in choices.items())
        lines += ["", f"The engine's backend (ops' automatic choice on this machine): {listed}."]
    return "\n".join(lines) + "\n" + (targets_markdown(targets(rows), env["device"]) if env["gpu"] else "")


FUSED = ("cuda", "triton")  # not TRITON_PLANS: off until adopted, their rows are reported, not judged


def engine_choices(rows: list[dict]) -> dict[tuple[str, str], str]:
    """(op, dtype) -> the backend the engine resolves there, from the rows (None where it could not resolve)."""
    return {(r["op"], r["dtype"]): r.get("engine_backend") or "none" for r in rows if "engine_backend" in r}


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The kernels issue's H200 targets against this run's rows, judged on the fused backend the engine resolves
    (a row's engine_backend) with the best fused backend shown beside it; on the best fused backend where the
    engine's choice was not measured."""

    def ms(r: dict) -> float:
        """A row's time for the targets: its CUDA-graph replay where measured (forward on a GPU), else its median."""
        return r["graph_ms"] if r.get("graph_ms") is not None else r["median_ms"]

    def pick(op: str, shape: str, direction: str, names: tuple[str, ...], dtype: str = "bfloat16") -> dict | None:
        found = [r for r in rows if (r["op"], r["shape"], r["dtype"], r["direction"]) == (op, shape, dtype, direction)
                 and r["contestant"] in names]  # fmt: skip
        return min(found, key=ms, default=None)

    def said(r: dict) -> str:
        return f"{ms(r) * 1e3:.1f} us" + (" in a CUDA graph" if r.get("graph_ms") is not None else "")

    def judged(op: str, shape: str, direction: str = "forward", dtype: str = "bfloat16") -> tuple[dict | None, str]:
        """The row the target is judged on and how to say what was measured."""
        best = pick(op, shape, direction, FUSED, dtype)
        choice = next((r.get("engine_backend") for r in rows if (r["op"], r["shape"], r["dtype"]) == (op, shape, dtype)
                       and r.get("engine_backend")), None)  # fmt: skip
        engine = pick(op, shape, direction, (choice,), dtype) if choice else None
        if engine is not None:
            text = f"{said(engine)} ({engine['contestant']}, the engine's choice)"
            if best is not None and best is not engine:
                text += f"; best fused {said(best)} ({best['contestant']})"
            return engine, text
        if best is None:
            return None, "-"
        unmeasured = f"; the engine's choice, {choice}, not measured" if choice else ""
        return best, f"{said(best)} ({best['contestant']}, best fused{unmeasured})"

    def at_most(label: str, op: str, shape: str, bound_ms: float) -> tuple[str, str, bool | None]:
        r, text = judged(op, shape)
        return label, text, None if r is None else ms(r) <= bound_ms

    checks = [
        at_most("score B32 C1024 128x128 K171 bf16 forward <= 0.33 ms", "pixel_text_score", "B32 C1024 128x128 K171",
                0.33),
        at_most("score B16 C1024 16x16 K150 bf16 forward <= 15 us", "pixel_text_score", "B16 C1024 16x16 K150",
                0.015),
    ]  # fmt: skip
    for shape in sorted({r["shape"] for r in rows if r["op"] == "context_attention"}):
        (fused, text), sdpa = judged("context_attention", shape), pick("context_attention", shape, "forward", ("sdpa",))
        if fused is None or sdpa is None:
            checks.append((f"attention {shape} forward faster than SDPA", "-", None))
            continue
        measured = f"{text} vs SDPA {said(sdpa)}"
        checks.append((f"attention {shape} forward faster than SDPA", measured, ms(fused) < ms(sdpa)))
    for bwd in (r for r in rows if r["direction"] == "backward" and r["contestant"] in FUSED):
        fwd = pick(bwd["op"], bwd["shape"], "forward", (bwd["contestant"],), bwd["dtype"])
        if fwd is not None:
            ratio = bwd["median_ms"] / fwd["median_ms"]
            # how close each pass came to its own roofline floor says which one to look at when the ratio misses
            floors = f"forward {fwd['fraction_of_floor']:.0%}, backward {bwd['fraction_of_floor']:.0%} of floor"
            mine = "; the engine's choice" if bwd.get("engine_backend") == bwd["contestant"] else ""
            checks.append((f"{bwd['op']} {bwd['shape']} {bwd['dtype']} {bwd['contestant']}: backward <= 2.5x forward",
                           f"{ratio:.2f}x ({floors}{mine})", ratio <= 2.5))  # fmt: skip
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("quick", "full"),
                        help="quick: small shapes (the default on the CPU); full: the issue's shapes (the default on "
                             "a GPU)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--max-batch", type=int, help="cap every shape's batch (for full shapes on a CPU)")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--compile", choices=("yes", "no", "only"), default="yes",
                        help="torch.compile of the reference (GPU; minutes to build): with the others (yes), left out "
                             "(no), or only it and the eager baselines (only)")  # fmt: skip
    parser.add_argument("--tag", help="file name tag (default: the GPU's name, or cpu_smoke)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = DTYPES[dtype_name]
    quick = args.quick or args.size == "quick" or (args.size is None and device.type == "cpu")
    if quick:
        score_shapes = [(2, 256, 16, 16, 150)]
        concat_shapes = [(2, 64, 256, 16, 16, 150)]
        attention_shapes = [(2, 4, 150, 257, 64)]
    else:
        score_shapes = [(16, 1024, 16, 16, 150), (8, 512, 40, 40, 150), (32, 1024, 128, 128, 171)]
        # the model's: RN50's stride-32 level (2048 channels) and ViT-B/16's (768) with their score maps
        concat_shapes = [(16, 2048, 1024, 16, 16, 150), (8, 768, 512, 40, 40, 150)]
        attention_shapes = [(16, 4, 150, 257, 64), (8, 4, 150, 1601, 64)]
    if args.max_batch is not None:
        if args.max_batch < 1:
            parser.error(f"--max-batch must be >= 1, got {args.max_batch}")
        score_shapes, concat_shapes, attention_shapes = (
            [(min(s[0], args.max_batch), *s[1:]) for s in shapes]
            for shapes in (score_shapes, concat_shapes, attention_shapes)
        )
    backward = not args.no_backward
    cases: list[tuple[str, Callable[[], list[Row]]]] = []
    shape: tuple[int, ...]  # (B, C, H, W, K) and the like: each operator's own length
    for shape in score_shapes:
        cases.append((f"pixel_text_score {shape} {dtype_name}",
                      functools.partial(bench_score, *shape, dtype, device, backward, args.compile)))  # fmt: skip
    for shape in concat_shapes:
        cases.append((f"score_concat {shape} {dtype_name}",
                      functools.partial(bench_concat, *shape, dtype, device, backward, args.compile)))  # fmt: skip
    for shape in attention_shapes:
        cases.append((f"context_attention {shape} {dtype_name}",
                      functools.partial(bench_attention, *shape, dtype, device, backward, args.compile)))  # fmt: skip
    if not quick and dtype != torch.float32:  # the targets' cases first, this one last
        large = (min(32, args.max_batch or 32), 1024, 128, 128, 171)
        cases.append((f"pixel_text_score {large} fp32",
                      lambda: bench_score(*large, torch.float32, device, False, args.compile)))  # fmt: skip
    results = Results(args.out, "ops", args.tag, environment(device), {"args": vars(args),
                                                                         "not_measured": NOT_MEASURED}, markdown)
    for label, case in cases:  # results are rewritten after every case: a run cut short keeps what it measured
        print(label, flush=True)
        try:
            for row in case():
                results.add(row.summary())
        except Exception as exc:  # one case that fails (out of memory, a compile error) must not hide the others
            NOT_MEASURED.append({"what": label, "error": failure(exc)})
            print(f"  failed: {failure(exc)}", flush=True)
        results.save()  # what this case could not measure, too
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

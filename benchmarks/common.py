"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Date, versions and the machine, recorded with every result."""
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "gpu": device.type == "cuda",
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "threads": torch.get_num_threads()}  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def triton_device(script: str) -> torch.device | None:
    """The device of a benchmark of the Triton kernels themselves: the GPU, else the CPU under Triton's interpreter
    (switched on here, before the kernels are imported). None, after printing why, when Triton cannot run."""
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from denseclip_fast import ops

    why = ops.backends.triton_available()
    if why is not None:
        print(f"{script}: {why}")
        return None
    return torch.device("cuda" if gpu else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def measure(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int, device: torch.device, grad: bool = False
) -> dict:
    """The first call's time, then p50/p90/p99 (nearest rank) of ``repeats`` timed calls after one warm-up, the peak
    CUDA memory from the first call on (a captured graph's replays allocate nothing: its activations were allocated
    at the capture, in the first call or the warm-up), and the first call's output as float32 on the CPU
    (``logits``). Under ``torch.no_grad`` unless ``grad`` (a training step)."""
    with torch.set_grad_enabled(grad):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn(x)
        sync(device)
        first = time.perf_counter() - start
        fn(x)
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn(x)
            sync(device)
            times.append(time.perf_counter() - start)
    times.sort()
    q = lambda f: times[max(0, math.ceil(f * len(times)) - 1)]  # noqa: E731  nearest rank
    return {
        "first_call_s": first,
        "p50_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * q(0.9),
        "p99_ms": 1e3 * q(0.99),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "logits": out.float().cpu(),
    }


def profile_kernels(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, device: torch.device, calls: int = 3, top: int = 15,
    grad: bool = False,
) -> dict:
    """Where the time of one call goes, by kernel: torch.profiler over ``calls`` calls (after one untimed call).
    On CUDA the GPU kernels (and copies) by their device time, on a CPU the operators by their self CPU time; per
    call, the ``top`` largest and the rest summed. Returns {"unit", "total_us", "kernels": [{name, count, us,
    share}]} (per call); an empty list when the profiler saw no kernel (e.g. a CUDA graph whose replays it does not
    trace)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.set_grad_enabled(grad):
        fn(x)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn(x)
            sync(device)
    times: list[tuple[str, int, float]] = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            device_us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0.0) if device_us is None else device_us
        else:
            us = e.self_cpu_time_total
        if us > 0:
            times.append((e.key, e.count, us))
    times.sort(key=lambda t: -t[2])
    total = sum(us for _, _, us in times)
    kernels = [{"name": name[:120], "count": count / calls, "us": us / calls, "share": us / total}
               for name, count, us in times[:top]]  # fmt: skip
    rest = times[top:]
    if rest:
        us = sum(t[2] for t in rest)
        kernels.append({"name": f"({len(rest)} others)", "count": sum(t[1] for t in rest) / calls, "us": us / calls,
                        "share": us / total})  # fmt: skip
    return {"unit": "GPU kernel time" if cuda else "CPU self time", "total_us": total / calls, "kernels": kernels}


def profile_markdown(title: str, profile: dict) -> str:
    """A "where the time goes" table of :func:`profile_kernels`'s result."""
    lines = ["", f"### {title}", ""]
    if not profile["kernels"]:
        return "\n".join([*lines, "The profiler recorded no kernels (a CUDA graph replay is not traced here).", ""])
    lines += [f"{profile['unit']}, per call: {profile['total_us']:.0f} us.", "",
              "| kernel / operator | per call | us | share |", "| --- | --- | --- | --- |"]  # fmt: skip
    for k in profile["kernels"]:
        name = k["name"].replace("|", "/")
        lines.append(f"| `{name}` | {k['count']:g} | {k['us']:.1f} | {100 * k['share']:.1f}% |")
    return "\n".join(lines) + "\n"


def free_gpu_memory(device: torch.device) -> None:
    """Give back what the previous contestant held before the next one is measured: a Segmenter lives in a
    reference cycle (its graph cache holds its bound forward), so only a garbage collection frees it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(exc: BaseException) -> str:
    """One line for a contestant that failed: reported in the results, never fatal to the others."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


class Results:
    """The rows of one benchmark run, rewritten (JSON and markdown, through ``write_results``) after every row, so
    a run cut short by a time limit still leaves everything it measured. ``render(env, rows)`` makes the markdown."""

    def __init__(self, out_dir: str, prefix: str, tag: str | None, env: dict, meta: dict,
                 render: Callable[[dict, list[dict]], str]) -> None:  # fmt: skip
        self.out_dir, self.prefix, self.tag, self.env, self.meta, self.render = out_dir, prefix, tag, env, meta, render
        self.rows: list[dict] = []
        self.stem = ""

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> str:
        self.stem = write_results(self.out_dir, self.prefix, self.tag, self.env, {**self.meta, "rows": self.rows},
                                  self.render(self.env, self.rows))  # fmt: skip
        return self.stem


def write_results(out_dir: str, prefix: str, tag: str | None, env: dict, data: dict, text: str) -> str:
    """``<prefix>_<tag>.json`` ({"environment": env, **data}) and ``.md`` (``text``) in ``out_dir``; the tag defaults
    to ``cpu_smoke`` on a CPU and to the GPU's name. Returns the path without the suffix (for further files)."""
    os.makedirs(out_dir, exist_ok=True)
    tag = tag or (env["device"].replace(" ", "_") if env["gpu"] else "cpu_smoke")
    stem = os.path.join(out_dir, f"{prefix}_{tag}")
    with open(f"{stem}.json", "w") as f:
        json.dump({"environment": env, **data}, f, indent=2)
    with open(f"{stem}.md", "w") as f:
        f.write(text)
    return stem


def targets_markdown(checks: list[tuple[str, str, bool | None]]) -> str:
    """A "Targets" section: (target, what was measured, met?) per line; None = not measured in this run."""
    if not checks:
        return ""
    lines = ["", "## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for target, measured, ok in checks:
        lines.append(f"| {target} | {measured} | {'not measured' if ok is None else 'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"

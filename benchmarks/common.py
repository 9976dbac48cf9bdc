"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# The CPU's instruction sets that decide which float32 and bfloat16 kernels oneDNN and ATen run: a bfloat16 engine on
# a VM's Xeon with AMX took a third of the float32 one's time, on another VM's Xeon (its flags not recorded) twice
# as long (results/e2e_cpu_2threads_bf16_amx.md, e2e_cpu_2threads_bf16.md). Recorded with every result.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features() -> list[str] | None:
    """Which of CPU_FEATURES /proc/cpuinfo's flags list, in that order; None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return [feature for feature in CPU_FEATURES if feature in flags]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_hash() -> str:
    """sha256 (first 16 hex digits) of what a result depends on: setup.py, csrc/, denseclip_fast/ and benchmarks/
    (their .py, C++ and CUDA files), so that a result ties to the code that made it where the machine has no git
    history (the GPU machine gets a copy of the checkout): recompute it at a commit to match."""
    digest = hashlib.sha256()
    files = [os.path.join(ROOT, "setup.py")]
    for top in ("csrc", "denseclip_fast", "benchmarks"):
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            files += [os.path.join(folder, n) for n in names if n.endswith((".py", ".cpp", ".h", ".cu", ".cuh"))]
    for path in sorted(files, key=lambda p: os.path.relpath(p, ROOT)):
        digest.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ from it), or None without git history."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# Environment variables that can change a result's speed or numbers (this library's switches, the thread pools',
# allocators' and math libraries' settings, the GPU stack's): each one set is recorded with the results
# (environment_variables). A name holding one of SECRET_WORDS is left out, whatever its prefix.
TUNING_VARIABLES = ("DENSECLIP_FAST_", "OMP_", "KMP_", "GOMP_", "MKL_", "DNNL_", "ONEDNN_", "THP_MEM_ALLOC_ENABLE",
                    "PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "CUDA_", "CUBLAS", "CUDNN_",
                    "NVIDIA_TF32_OVERRIDE", "LD_PRELOAD", "MALLOC_", "JE_MALLOC_CONF")  # fmt: skip
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def environment_variables() -> dict[str, str]:
    """The variables set in this process whose names start with one of TUNING_VARIABLES, sorted by name: a run
    with ``OMP_NUM_THREADS=1`` or ``THP_MEM_ALLOC_ENABLE=1`` says so in its results."""
    return {name: value for name, value in sorted(os.environ.items())
            if name.startswith(TUNING_VARIABLES) and not any(w in name.upper() for w in SECRET_WORDS)}  # fmt: skip


def environment_variables_markdown(env: Mapping[str, Any]) -> str:
    """A closing sentence naming the variables a run had set (``environment_variables``), or "" where none was."""
    variables = env.get("environment_variables") or {}
    if not variables:
        return ""
    return "Environment variables set for this run: " + ", ".join(f"`{k}={v}`" for k, v in variables.items()) + "."


def environment(device: torch.device) -> dict:
    """Date and time, versions, the code (code_hash, git_commit) and the machine, recorded with every result. A
    GPU's multiprocessor count and memory tell a MIG slice or another variant from the full GPU its name says; the
    CPU's instruction sets (cpu_features) tell apart CPUs that share a name (a VM's "Intel(R) Xeon(R) Processor");
    host_memory says whether freed host memory is kept for reuse (engine.host_memory: fewer page faults a call);
    environment_variables, the settings given through the environment (TUNING_VARIABLES)."""
    from denseclip_fast.engine import host_memory

    now = datetime.datetime.now(datetime.timezone.utc)
    env = {"date": now.date().isoformat(), "time_utc": now.strftime("%H:%M:%S"), "torch": torch.__version__,
           "python": platform.python_version(), "gpu": device.type == "cuda",
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "threads": torch.get_num_threads(), "cpu_features": cpu_features(), "code": code_hash(),
           "commit": git_commit(), "host_memory": host_memory.describe(),
           "environment_variables": environment_variables()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_properties"] = {"multiprocessors": props.multi_processor_count,
                                 "memory_gib": round(props.total_memory / 2**30, 1),
                                 "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def host_rss_gib() -> dict[str, float | None]:
    """This process's resident memory now and at its peak so far, GiB (Linux: /proc/self/statm and getrusage; None
    where unknown): what keeping freed memory (engine.host_memory) costs shows in the first, between calls."""
    now = peak = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    with contextlib.suppress(ImportError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"rss_gib": now, "peak_rss_gib": peak}


def _cpu_ticks() -> tuple[int, int, int] | None:
    """The machine's CPU time so far, from /proc/stat's first line: (busy ticks, all ticks, CPUs); None where there
    is no such file (not Linux) or it reads otherwise. Idle and iowait are idle; guest time is inside user's."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = lines[0].split()
        if fields[0] == "cpu" and len(fields) >= 5:
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            cpus = sum(1 for line in lines if re.match(r"cpu\d+ ", line))
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks), cpus
    return None


class OtherLoad:
    """How busy other processes kept the machine's CPUs between ``start()`` and ``cores()``: the machine's busy CPU
    time (/proc/stat) less this process's own (``time.process_time``: all its threads), per second of wall time, in
    cores. A host-bound contestant (its launches) runs slower beside another process's work: this says whether its
    row was timed on a quiet machine. None where /proc/stat is missing; /proc/stat counts in ticks (1/100 s), so a
    window of a few seconds reads within about 0.1 core."""

    def start(self) -> OtherLoad:
        self._ticks, self._own, self._wall = _cpu_ticks(), time.process_time(), time.perf_counter()
        return self

    def cores(self) -> float | None:
        ticks, own, wall = _cpu_ticks(), time.process_time() - self._own, time.perf_counter() - self._wall
        if ticks is None or self._ticks is None or wall <= 0:
            return None
        busy, total = ticks[0] - self._ticks[0], ticks[1] - self._ticks[1]
        if total <= 0:
            return None
        return max(busy / total * ticks[2] - own / wall, 0.0)


OTHER_LOAD_NOTABLE = 0.5  # cores: from here a results table names the row (other_load_note)


def other_load_note(rows: Sequence[Mapping[str, Any]], label: Callable[[Mapping[str, Any]], str]) -> str:
    """A sentence for a results table: the most CPU cores other processes kept busy while one of ``rows`` was timed
    (measure's other_cpu_cores), and each row (``label``) where they reached OTHER_LOAD_NOTABLE; "" where no row
    knows it."""
    loads = [(r["other_cpu_cores"], label(r)) for r in rows if r.get("other_cpu_cores") is not None]
    if not loads:
        return ""
    busy = [f"{name} {cores:.1f}" for cores, name in loads if cores >= OTHER_LOAD_NOTABLE]
    text = (f"Other processes kept at most {max(cores for cores, _ in loads):.1f} CPU cores busy while a row was timed "
            "(other_cpu_cores in the JSON)")  # fmt: skip
    if not busy:
        return text + "."
    return text + ": " + "; ".join(busy) + " (a row bound by its launches on the host runs slower beside them)."


def tf32_settings() -> dict[str, str]:
    """What float32 convolutions (cuDNN) and matrix multiplications (cuBLAS) compute in on CUDA under the process's
    current settings: {"cudnn_conv": "tf32" | "ieee", "cuda_matmul": "tf32" | "ieee"} (PyTorch's defaults: TF32
    convolutions, IEEE matmuls). Read from the fp32_precision settings: once a program has used them, reading the
    legacy allow_tf32 flags can raise (see denseclip_fast.engine.segmenter._tf32_settings); an operator's "none"
    takes its backend's setting, then the generic torch.backends.fp32_precision, and "none" throughout is IEEE."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    generic = torch.backends.fp32_precision  # type: ignore[attr-defined]

    def effective(*levels: object) -> str:
        value = next((v for v in map(str, levels) if v != "none"), "ieee")
        return "tf32" if value == "tf32" else "ieee"

    conv = effective(cudnn.conv.fp32_precision, cudnn.fp32_precision, generic)  # type: ignore[attr-defined]
    return {"cudnn_conv": conv, "cuda_matmul": effective(matmul.fp32_precision, generic)}


def math_settings() -> dict:
    """The process-wide settings that change what a float32 CUDA contestant computes or which algorithms cuDNN
    picks, for a benchmark's environment block: {"tf32": :func:`tf32_settings`, "cudnn_benchmark": bool}. Read when
    the run starts: contestants that switch TF32 off (denseclip_fast's float32 engine) do so only inside their
    calls."""
    return {"tf32": tf32_settings(), "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def tf32_label(settings: dict[str, str]) -> str:
    """"TF32 convolutions" and the like, for a float32 contestant at the given :func:`tf32_settings`."""
    conv, matmul = settings["cudnn_conv"], settings["cuda_matmul"]
    if conv == matmul:
        return f"{conv.upper()} convolutions and matmuls"
    return f"{conv.upper()} convolutions, {matmul.upper()} matmuls"


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


@contextlib.contextmanager
def environment_variable(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` in os.environ while the block runs (left as it is for None), then as it was
    (removed if it was not set)."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def turn_fields(times: Mapping[str, list[float]]) -> dict[str, float]:
    """``<name>_median_ms`` and ``<name>_min_ms`` of take_turns' times, for a result row."""
    fields = {}
    for name, ms in times.items():
        fields[f"{name}_median_ms"] = statistics.median(ms)
        fields[f"{name}_min_ms"] = min(ms)
    return fields


def turn_cells(row: Mapping[str, float], names: Sequence[str]) -> str:
    """Markdown cells "median (min)" of turn_fields' ``names`` in ``row``, joined by " | "."""
    return " | ".join(f"{row[f'{name}_median_ms']:.1f} ({row[f'{name}_min_ms']:.1f})" for name in names)


def turn_versions(env: Mapping[str, Any]) -> str:
    """"torch X", with ", triton Y" on a GPU (where its kernels ran), for a turn-taking benchmark's table."""
    return f"torch {env['torch']}" + (f", triton {env['triton']}" if env.get("gpu") else "")


def arch_name(text: str) -> str:
    """An ``--arch``/``--archs`` value (argparse's ``type``): a released architecture by its name or an alias of it
    (``ViT-B-16``, as its config file and open_clip spell it) as its name (``ViT-B/16``); other text as it is, for
    argparse's ``choices`` to name what is accepted."""
    from denseclip_fast.config import ARCH_ALIASES, canonical_arch

    return canonical_arch(text) if text in ARCH_ALIASES else text


def turn_arguments(parser: argparse.ArgumentParser, repeats: int, device_help: str = "cpu or cuda") -> None:
    """--device (default cpu), --repeats (timed rounds of take_turns, default ``repeats``), --out and --tag."""
    parser.add_argument("--device", default="cpu", help=device_help)
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed rounds after one untimed (default {repeats})")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke, or the GPU's name)")


def turn_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The --device of turn_arguments, after --repeats is checked (parser.error otherwise, as for a CUDA device
    without a GPU)."""
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    return device


def take_turns(
    calls: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:  # fmt: skip
    """Time each of ``calls`` (no arguments) in rounds: one untimed round, then ``repeats`` timed ones, every call
    once a round, the order reversed from round to round (so that none always runs after the same one). Returns
    each call's times in milliseconds and the last round's outputs; ``check(outputs)`` runs after every round (a
    round's outputs compared, before the next round replaces them)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for i in range(repeats + 1):
        for name in names if i % 2 else names[::-1]:
            outputs.pop(name, None)  # the last round's output freed first: not held while the call runs again
            sync(device)
            start = time.perf_counter()
            outputs[name] = calls[name]()
            sync(device)
            if i:
                times[name].append((time.perf_counter() - start) * 1e3)
        if check is not None:
            check(outputs)
    return times, outputs


REL_ERR_CHUNK = 1 << 24  # elements cast to float64 at a time by rel_err


def rel_err(a: torch.Tensor, b: torch.Tensor, chunk: int = REL_ERR_CHUNK) -> float:
    """||a - b|| / ||b|| in float64, of tensors of one shape (broadcasting would compare what the contestants do not
    compute alike: a ValueError). Summed ``chunk`` elements at a time, so that comparing batch-16 logits (2.5 GB in
    float32 at 150 classes x 512 x 512, 3.9 GB at 640 x 640) makes a few 128 MiB float64 temporaries, not three
    whole-size float64 copies; inf when only ``b`` is zero, nan when both are."""
    if a.shape != b.shape:
        raise ValueError(f"the outputs compared differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.reshape(-1), b.reshape(-1)
    diff = norm = 0.0
    for start in range(0, a.numel(), chunk):
        x, y = a[start : start + chunk].double(), b[start : start + chunk].double()
        diff += (x - y).square().sum().item()
        norm += y.square().sum().item()
    if norm == 0.0:
        return math.nan if diff == 0.0 else math.inf
    return math.sqrt(diff) / math.sqrt(norm)


# Timed calls when the caller gives no count (a GPU run): as many as fill BUDGET_S, at least MIN_REPEATS and at most
# MAX_REPEATS, so that a 1 ms call gets the 100+ samples a p99 needs and a 100 ms call does not take minutes.
BUDGET_S = 2.5
MIN_REPEATS = 20
MAX_REPEATS = 2000


def nearest_rank(times: list[float], q: float) -> float | None:
    """The ``q`` quantile of the sorted ``times`` by nearest rank; None when that rank is the last (too few samples
    for the quantile: with fewer than 100 samples a "p99" is the maximum, with fewer than 10 a "p90")."""
    rank = max(1, math.ceil(q * len(times)))
    return None if rank >= len(times) else times[rank - 1]


def tail_cell(row: dict, key: str, digits: int = 2) -> str:
    """A markdown cell for ``row[key]`` (a "p90_ms"/"p99_ms" of :func:`measure`): the value, or "max X" where too few
    calls were timed for that percentile (its value is None and the row's maximum is shown instead)."""
    value = row.get(key)
    if value is not None:
        return f"{value:.{digits}f}"
    return f"max {row['max_ms']:.{digits}f}" if row.get("max_ms") is not None else "-"


def measure(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int | None, device: torch.device,
    grad: bool = False, budget_s: float = BUDGET_S, min_repeats: int = MIN_REPEATS, max_repeats: int = MAX_REPEATS,
) -> dict:  # fmt: skip
    """Time ``fn(x)``: the first call's time, then after one untimed warm-up call the timed calls: ``repeats`` of
    them, or with ``repeats`` None as many as fill ``budget_s`` seconds (at least ``min_repeats``, at most
    ``max_repeats``). Returns first_call_s; p50_ms, p90_ms, p99_ms by nearest rank (p90/p99 None when too few calls
    were timed for them: see :func:`nearest_rank`), max_ms and samples (the number of timed calls); host_p50_ms, the
    median time until a call returned, before the wait for the device (near p50_ms: the call is bound by the host,
    its launches; on a CPU the same as p50_ms); peak_memory_gib and first_calls_peak_memory_gib; other_cpu_cores,
    how many CPU cores other processes kept busy while the calls were timed (:class:`OtherLoad`; None where
    unknown); and ``logits``, the first call's output as float32 on the CPU. Under ``torch.no_grad`` unless
    ``grad`` (a training step).

    The first output is copied to the CPU right after the first call, before any other call, and not kept: a
    function compiled with CUDA graphs (torch.compile's "reduce-overhead"/"max-autotune", an engine's captured
    graph) may overwrite or free an earlier call's output in a later call, and holding it would also add its memory
    to the timed calls'. The copy is made in the output's own dtype and cast on the CPU (no GPU allocation).

    peak_memory_gib (CUDA only, GiB): the allocator's peak over the timed calls: everything the GPU holds when they
    start (the contestant's weights, the input batch, captured graphs' pools, optimiser state, and whatever else
    the caller left there: keep other contestants off the GPU) plus what a call allocates (activations, outputs; a
    captured graph's replay allocates nothing). first_calls_peak_memory_gib: the peak over the first call and the
    warm-up call before them, which compilation, autotuning, cuDNN's algorithm search and CUDA-graph capture raise:
    a one-off cost, reported beside the steady one."""
    with torch.set_grad_enabled(grad):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn(x)
        sync(device)
        first = time.perf_counter() - start
        logits = out.detach().to("cpu", copy=True).float()  # a copy (also on a CPU) before the next call
        del out
        fn(x)
        first_peak = None
        if device.type == "cuda":
            sync(device)
            first_peak = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)  # from here: what the GPU holds, and a call's own
        times: list[float] = []

        def more() -> bool:
            if repeats is not None:
                return len(times) < repeats
            return len(times) < min_repeats or (sum(times) < budget_s and len(times) < max_repeats)

        host: list[float] = []  # until the call returned, before the wait for the device
        load = OtherLoad().start()
        while more():
            sync(device)
            start = time.perf_counter()
            fn(x)
            host.append(time.perf_counter() - start)
            sync(device)
            times.append(time.perf_counter() - start)
        other_cores = load.cores()
    times.sort()
    ms = lambda t: None if t is None else 1e3 * t  # noqa: E731
    return {
        "first_call_s": first,
        "p50_ms": 1e3 * statistics.median(times),
        "host_p50_ms": 1e3 * statistics.median(host),
        "p90_ms": ms(nearest_rank(times, 0.9)),
        "p99_ms": ms(nearest_rank(times, 0.99)),
        "max_ms": 1e3 * times[-1],
        "samples": len(times),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_calls_peak_memory_gib": first_peak,
        "other_cpu_cores": other_cores,
        "logits": logits,
    }


# a Python frame in a profiler event's stack ("path/file.py(123): function"), and a builtin's ("<built-in method
# contiguous of Tensor object at 0x7f...>", whose address changes per tensor)
_PY_FRAME = re.compile(r"^(?P<file>.+\.py)\((?P<line>\d+)\): (?P<function>.+)$")
_BUILTIN = re.compile(r"^<built-in (?:method|function) (?P<name>\S+)(?: of (?P<owner>[^>]*?) object at 0x[0-9a-f]+)?>$")
SITE_PACKAGES = ("denseclip_fast/", "benchmarks/official/")
OPERATOR_PACKAGE = "denseclip_fast/ops/"  # the fused operators' wrappers and launchers: who called them says more
LAUNCHER = "denseclip_fast/ops/triton/common.py"  # launch()'s wrapper, the frame every profiled Triton launch is in


def call_site(stack: Sequence[str]) -> str | None:
    """Where, in this project's code, a profiled operator was called from: the innermost frame of ``stack`` (a
    profiler event's, innermost first) in one of SITE_PACKAGES, as "path/file.py:line function", the path from the
    package on, with the builtin through which the call left Python ("Tensor.contiguous", "cat") where the stack
    has one above it. A frame in the fused operators' code (OPERATOR_PACKAGE) comes after the innermost frame outside
    it that called them ("model/decoder.py:62 attend > ops/triton/attention.py:290 attention_forward"). None where
    the stack has no such frame."""
    builtin = inner = None
    for frame in stack:
        called = _BUILTIN.match(frame)
        if called is not None:
            if builtin is None:  # a Tensor method as such; a function of torch's or of an extension by its name
                owner = called.group("owner")
                builtin = f"Tensor.{called.group('name')}" if owner == "Tensor" else called.group("name")
            continue
        python = _PY_FRAME.match(frame)
        if python is None:
            continue
        path = python.group("file").replace("\\", "/")  # a Windows path's separators as the packages' names
        at = max(path.rfind(package) for package in SITE_PACKAGES)
        if at < 0 or path.endswith(LAUNCHER):
            continue  # not the project's code, or the Triton launch's own plumbing
        site = f"{path[at:]}:{python.group('line')} {python.group('function')}"
        innermost = inner is None
        if innermost:
            inner = f"{site} ({builtin})" if builtin else site
        if OPERATOR_PACKAGE not in path[at:]:
            return inner if innermost else f"{site} > {inner}"
    return inner


def _self_us(event: Any, cuda: bool) -> float:
    """A profiler event's own time in us: on CUDA its device time (the kernels it launched itself, or a kernel's
    own; ``self_cuda_time_total`` on a torch without ``self_device_time_total``), else its self CPU time."""
    if not cuda:
        return float(event.self_cpu_time_total)
    device_us = getattr(event, "self_device_time_total", None)
    return float(getattr(event, "self_cuda_time_total", 0.0) if device_us is None else device_us)


UNLAUNCHED = "(no operator: kernels the profiler linked to no operator or launch event)"


def _by_call_site(events: Iterable[Any], cuda: bool, calls: int, top: int, total_us: float, kernels_per_call: float
                  ) -> list[dict]:  # fmt: skip
    """Per call site (:func:`call_site`) and operator, the kernels' device time (CUDA: the kernels each operator
    launched itself, with the longest one's name) or the operators' self CPU time, per call, the ``top`` largest,
    each with its share of ``total_us`` (the profile's total per call). The engine's own Triton launches are
    "triton::<kernel>" events of their own while a profiler records (ops/triton/common.launch); on CUDA a kernel
    launched outside any operator or such event is linked to none and has no stack here: those kernels are one row
    (UNLAUNCHED: ``total_us`` less what the events launched; ``kernels_per_call`` less their count)."""
    from torch.autograd import DeviceType

    sites: dict[tuple[str, str], dict] = {}
    attributed = launched = 0.0
    for e in events:
        if (e.device_type != DeviceType.CPU or getattr(e, "is_python_function", False) or _PY_FRAME.match(e.name)
                or e.name.startswith("<built-in")):  # fmt: skip
            continue  # the kernels themselves (counted with the operator that launched them), Python's own frames
        us = _self_us(e, cuda)
        if us <= 0:
            continue
        attributed += us / calls
        site = call_site(getattr(e, "stack", None) or []) or "(outside this project's code)"
        entry = sites.setdefault((site, e.name), {"site": site, "operator": e.name, "count": 0.0, "us": 0.0})
        entry["count"] += 1 / calls
        entry["us"] += us / calls
        kernels = [k for k in getattr(e, "kernels", []) or [] if getattr(k, "duration", 0) > 0]
        launched += len(kernels) / calls
        for k in kernels:
            if k.duration > entry.get("kernel_us", 0.0):
                entry["kernel"], entry["kernel_us"] = k.name[:80], float(k.duration)
    rows = list(sites.values())
    if cuda and total_us - attributed > 1e-3 * total_us:
        rows.append({"site": UNLAUNCHED, "operator": "-", "count": max(0.0, kernels_per_call - launched),
                     "us": total_us - attributed})  # fmt: skip
    ranked = sorted(rows, key=lambda entry: -entry["us"])[:top]
    for entry in ranked:
        entry.pop("kernel_us", None)
        entry["share"] = entry["us"] / total_us if total_us > 0 else 0.0
    return ranked


def profile_kernels(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, device: torch.device, calls: int = 3, top: int = 15,
    grad: bool = False, sites: int = 0,
) -> dict:
    """Where the time of one call goes, by kernel: torch.profiler over ``calls`` calls (after one untimed call).
    On CUDA the GPU kernels (and copies) by their device time, on a CPU the operators by their self CPU time; per
    call, the ``top`` largest and the rest summed. Returns {"unit", "total_us", "kernels": [{name, count, us,
    share}], "every_kernel": the same for every kernel, none summed (for the JSON: the long tail of small launches
    is where a fused engine's time hides)} (per call); empty lists when the profiler saw no kernel (e.g. a CUDA graph
    whose replays it does not trace). With ``sites``, also "sites": the ``sites`` largest (call site, operator)
    pairs by their kernels' time (:func:`_by_call_site`: which line of the model launches the copies, say), from
    the Python stacks the profiler then records (verbose: torch 2.11 records none without it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    verbose = torch._C._profiler._ExperimentalConfig(verbose=True) if sites else None
    with torch.set_grad_enabled(grad):
        fn(x)
        sync(device)
        with profile(activities=activities, with_stack=bool(sites), experimental_config=verbose) as prof:
            for _ in range(calls):
                fn(x)
            sync(device)
    times: list[tuple[str, int, float]] = []
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = _self_us(e, cuda)
        if us > 0:
            times.append((e.key, e.count, us))
    times.sort(key=lambda t: -t[2])
    total = sum(us for _, _, us in times)
    every = [{"name": name[:120], "count": count / calls, "us": us / calls, "share": us / total}
             for name, count, us in times]  # fmt: skip
    kernels = every[:top]
    rest = times[top:]
    if rest:
        us = sum(t[2] for t in rest)
        kernels.append({"name": f"({len(rest)} others)", "count": sum(t[1] for t in rest) / calls, "us": us / calls,
                        "share": us / total})  # fmt: skip
    result: dict[str, Any] = {"unit": "GPU kernel time" if cuda else "CPU self time", "total_us": total / calls,
                              "kernels": kernels, "every_kernel": every}  # fmt: skip
    if sites:
        result["sites"] = _by_call_site(prof.events(), cuda, calls, sites, total / calls,
                                        sum(count for _, count, _ in times) / calls)  # fmt: skip
    return result


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
    if profile.get("sites"):
        lines += ["", f"By call site: the {len(profile['sites'])} largest (where in the code, operator)"
                  f"{', the longest kernel it launched' if profile['unit'].startswith('GPU') else ''}.", "",
                  "| call site | operator | per call | us | share |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for k in profile["sites"]:
            op = k["operator"] + (f" -> {k['kernel']}" if "kernel" in k else "")
            lines.append(f"| `{k['site'].replace('|', '/')}` | `{op.replace('|', '/')}` | {k['count']:g} | "
                         f"{k['us']:.1f} | {100 * k['share']:.1f}% |")  # fmt: skip
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
    """``<prefix>_<tag>.json`` ({"environment": env, **data}) and ``.md`` (``text``, then a sentence naming the
    environment variables the run had set, where it had any) in ``out_dir``; the tag defaults
    to ``cpu_smoke`` on a CPU and to the GPU's name. Each file is replaced whole (:func:`atomic_write`), so a run
    stopped while writing leaves the previous version. Returns the path without the suffix (for further files)."""
    os.makedirs(out_dir, exist_ok=True)
    tag = tag or (env["device"].replace(" ", "_") if env["gpu"] else "cpu_smoke")
    stem = os.path.join(out_dir, f"{prefix}_{tag}")
    atomic_write(f"{stem}.json", lambda f: json.dump({"environment": env, **data}, f, indent=2))
    note = environment_variables_markdown(env)
    if note:  # after the results, as their last paragraph
        text = text.rstrip("\n") + "\n\n" + note + "\n"
    atomic_write(f"{stem}.md", lambda f: f.write(text))
    return stem


def atomic_write(path: str, write: Callable[[Any], object], binary: bool = False) -> None:
    """``write(file)`` into a temporary file beside ``path``, then renamed over it (os.replace, atomic on POSIX): a
    reader, or a run interrupted mid-write (a time budget's SIGINT), sees the old file or the new one, never half of
    one. The temporary file is removed if ``write`` fails."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's files are owner-only; a result file is as open() would make it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


TARGET_GPU = "H200"  # the issues' targets and DESIGN.md's anchor timings are an NVIDIA H200's


def targets_markdown(checks: list[tuple[str, str, bool | None]], gpu: str) -> str:
    """A "Targets" section: (target, what was measured, met?) per line; None = not measured in this run. gpu: the
    device's name (environment()'s "device"); on a GPU other than an H200 (the device tool's plain first call may start
    an H100) the section says that its verdicts are that GPU's, not the H200's the targets name."""
    if not checks:
        return ""
    lines = ["", "## Targets", ""]
    if TARGET_GPU not in gpu:
        lines += [f"The targets are set for an NVIDIA {TARGET_GPU}; this run's GPU is {gpu}, so 'met' says how it did "
                  f"against them, not whether the {TARGET_GPU}'s targets are met.", ""]  # fmt: skip
    lines += ["| target | measured | met |", "| --- | --- | --- |"]
    for target, measured, ok in checks:
        lines.append(f"| {target} | {measured} | {'not measured' if ok is None else 'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"

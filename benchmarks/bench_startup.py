"""What a user waits for before the first segmentation, in fresh processes (a benchmark).

    python benchmarks/bench_startup.py                                    # RN50 on the CPU, 224x224, 3 processes
    python benchmarks/bench_startup.py --archs RN50 ViT-B/16 --formats pth safetensors --repeats 5

A program that segments with denseclip_fast (the ``denseclip-fast segment`` command, a service starting up) pays, once
per process: Python and ``import torch``, ``import denseclip_fast``, ``load_checkpoint`` (the file read and checked,
the class names tokenised, the model built and filled), building the ``Segmenter`` (a copy of the model, BatchNorm
folded, the class embeddings computed by the text encoder) and the first ``logits`` call. This writes a random-weight
checkpoint per architecture and format (``pth``: an official mmcv-style file, the format of the released weights;
``safetensors``: the project's own), then starts one fresh Python process per repeat and format, one after another,
each timing those stages with the wall clock and reading its peak resident memory after each; the table gives
each stage's median over the processes, and the peak memory once the checkpoint is loaded and at the end. The child
processes run in float32 on the CPU (the CLI's default there) or, with ``--device cuda``, in bfloat16 on the GPU.
Writes JSON and markdown (startup_<tag>.*).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import ROOT, Results, arch_name, environment  # noqa: E402
from benchmarks.official import randomize_, save_mmcv_checkpoint  # noqa: E402

STAGES = ("python + import torch", "import denseclip_fast", "load_checkpoint", "Segmenter(...)", "first logits")
PEAKS = ("load_checkpoint", "first logits")  # the stages after which the table gives the peak resident memory

# The child process: argv[1] is a JSON object (root, path, device, dtype, size). It prints one JSON object, the wall
# clock (time.time()) at the end of each stage and the process's peak resident memory so far (MiB; ru_maxrss, in
# KiB on Linux); the parent knows when it started the process.
CHILD = """
import json, resource, sys, time
args = json.loads(sys.argv[1])
stamps, peaks = [], []
def stage_done():
    stamps.append(time.time())
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
import torch
stage_done()
sys.path.insert(0, args["root"])
import denseclip_fast as dcf
stage_done()
model = dcf.load_checkpoint(args["path"])
stage_done()
seg = dcf.Segmenter(model, device=args["device"], dtype=getattr(torch, args["dtype"]))
stage_done()
image = torch.randn(1, 3, args["size"], args["size"], generator=torch.Generator().manual_seed(0))
logits = seg.logits(image)
if args["device"].startswith("cuda"):
    torch.cuda.synchronize()
stage_done()
print(json.dumps({"stamps": stamps, "peaks_mib": peaks, "module": dcf.__file__}))
"""


def build(arch: str) -> dcf.DenseCLIP:
    """A random-weight model of ``arch`` with the 150 ADE20K classes."""
    torch.manual_seed(0)
    return randomize_(dcf.DenseCLIP.from_arch(arch))


def write_checkpoints(arch: str, formats: list[str], folder: str) -> dict[str, str]:
    """build(arch) saved in each of ``formats``."""
    model = build(arch)
    paths = {}
    for fmt in formats:
        path = os.path.join(folder, f"{arch.replace('/', '-')}.{fmt}")
        if fmt == "safetensors":
            model.save(path)
        else:  # what mmcv's save_checkpoint writes for the released weights
            save_mmcv_checkpoint(model, path, model.class_names)
        paths[fmt] = path
    return paths


def child_run(path: str, device: str, dtype: str, size: int) -> tuple[list[float], float, list[float]]:
    """One fresh process through the stages: the seconds each took, the process's whole wall time, and its peak
    resident memory (MiB) at the end of each stage."""
    args = {"root": ROOT, "path": path, "device": device, "dtype": dtype, "size": size}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    end = time.time()
    if proc.returncode:
        raise RuntimeError(f"the child process failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["module"].startswith(ROOT):
        raise RuntimeError(f"the child imported denseclip_fast from {report['module']}, not from {ROOT}")
    stamps = [start, *report["stamps"]]
    return [b - a for a, b in zip(stamps, stamps[1:])], end - start, report["peaks_mib"]


def table(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# Start-up: a fresh process to its first segmentation ({env['date']})",
        "",
        f"{env['device']} ({env['threads']} threads); torch {env['torch']}; commit {env['commit']}. Random weights, "
        "150 ADE20K classes, one image. Seconds, median over fresh processes run one after another (their count in "
        "the last column); each stage ends where the next begins, and the time to the first logits is the median of "
        "the processes' sums. `pth`: an official mmcv-style checkpoint (the released weights' format); "
        "`safetensors`: the project's own. Peak MiB: the process's peak resident memory (ru_maxrss) once "
        "load_checkpoint returned, and at the end; medians.",
        "",
        "| arch | file | device, dtype | image | " + " | ".join(STAGES) + " | to first logits | peak MiB after "
        "load_checkpoint | peak MiB at the end | processes |",
        "|---|---|---|---|" + "---|" * (len(STAGES) + 4),
    ]
    for r in rows:
        cells = " | ".join(f"{r['stages_s'][stage]:.2f}" for stage in STAGES)
        peaks = " | ".join(f"{r['peak_mib'][stage]:.0f}" if "peak_mib" in r else "-" for stage in PEAKS)
        lines.append(f"| {r['arch']} | {r['format']} | {r['device']}, {r['dtype']} | {r['size']}x{r['size']} | "
                     f"{cells} | {r['total_s']:.2f} | {peaks} | {r['processes']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS, default=["RN50"])
    parser.add_argument("--formats", nargs="+", choices=("pth", "safetensors"), default=["pth"])
    parser.add_argument("--device", default="cpu", help="the child processes' device (default cpu)")
    parser.add_argument("--size", type=int, default=224, help="square image side (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per architecture and format")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke, or the GPU's name)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.size < 32:
        parser.error(f"--size must be >= 32 (the image encoder's stride), got {args.size}")
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    results = Results(args.out, "startup", args.tag, environment(device), {"args": vars(args)}, table)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as folder:
        for arch in args.archs:
            paths = write_checkpoints(arch, args.formats, folder)
            for fmt, path in paths.items():
                runs = [child_run(path, args.device, dtype, args.size) for _ in range(args.repeats)]
                stages = {stage: statistics.median(run[0][i] for run in runs) for i, stage in enumerate(STAGES)}
                results.add({"arch": arch, "format": fmt, "device": args.device, "dtype": dtype, "size": args.size,
                             "processes": len(runs), "stages_s": stages,
                             "total_s": statistics.median(sum(run[0]) for run in runs),
                             "process_wall_s": [run[1] for run in runs],
                             "samples_s": [dict(zip(STAGES, run[0])) for run in runs],
                             "peak_mib": {stage: statistics.median(run[2][STAGES.index(stage)] for run in runs)
                                          for stage in PEAKS},
                             "samples_peak_mib": [dict(zip(STAGES, run[2])) for run in runs]})  # fmt: skip
                print(f"{arch} {fmt}: {results.rows[-1]['total_s']:.2f} s to the first logits", flush=True)
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

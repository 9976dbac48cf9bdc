"""Deployment artefacts against the engine, same weights and inputs.

    python benchmarks/bench_export.py                  # CPU part always; the GPU part too when CUDA is available
    python benchmarks/bench_export.py --parts cpu --archs RN50 --size 512 --batches 1 4

CPU part (ONNX Runtime's CPU provider, all graph optimisations, default threads):
  torch-eager         the DenseCLIP model, float32, PyTorch eager on the CPU
  engine-cpu          denseclip_fast.Segmenter on the CPU, float32 (BatchNorm folded, C++ operators)
  onnxruntime         the float32 ONNX image graph (denseclip_fast.export.to_onnx) in ONNX Runtime
GPU part:
  engine-bf16         Segmenter on CUDA, bfloat16, CUDA graphs
  aoti-bf16           the AOTInductor package of that Segmenter (denseclip_fast.export.to_aoti), from Python
Per row: p50/p90/p99 latency by nearest rank (with a GPU as many timed calls as fill 2.5 s, 20 to 2000; 3 without;
p90/p99 read "max" where too few calls were timed for them), images/s, the first call's time, the relative error of
the logits against the float32 model (torch-eager on the CPU), the peak CUDA memory of the GPU rows (the engine's
rows are measured before the package is loaded, the package's after the Segmenter is dropped), and for the artefacts
the export/compile time. cuDNN benchmark mode is on for the GPU part (as bench_e2e); the environment block records
it and the TF32 settings. Writes JSON and markdown to benchmarks/results/ (export_<tag>.*) with the machine and
versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import cast

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BUDGET_S,
    MAX_REPEATS,
    MIN_REPEATS,
    Results,
    arch_name,
    environment,
    failure,
    free_gpu_memory,
    math_settings,
    measure,
    other_load_note,
    rel_err,
    tail_cell,
)
from benchmarks.official import randomize_, weigh_score_channels_  # noqa: E402


def build(arch: str, classes: int) -> dcf.DenseCLIP:
    torch.manual_seed(0)
    model = randomize_(dcf.DenseCLIP.from_arch(arch, list(dcf.ADE20K_CLASSES[:classes]))).eval()
    weigh_score_channels_(model)  # so that the exported graphs' error vs fp32 sees the text path too
    return model


def _row(arch: str, batch: int, size: int, name: str, r: dict, reference: torch.Tensor | None, **extra: object) -> dict:
    logits = r.pop("logits")
    return dict(arch=arch, batch=batch, size=size, contestant=name, **r,
                images_per_s=batch / (r["p50_ms"] / 1e3),
                rel_error_vs_fp32=rel_err(logits, reference) if reference is not None else None, **extra)  # fmt: skip


def cpu_part(args: argparse.Namespace, workdir: str, results: Results) -> None:
    import onnxruntime as ort

    from denseclip_fast.export import to_onnx

    cpu = torch.device("cpu")
    for arch in args.archs:
        model = build(arch, args.classes)
        start = time.perf_counter()
        path = to_onnx(model, os.path.join(workdir, "model.onnx"), image_size=args.size)
        export_s = time.perf_counter() - start
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        seg = dcf.Segmenter(model, device="cpu", dtype=torch.float32, mode="whole")

        def onnxruntime(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

        seg_logits = cast(Callable[[torch.Tensor], torch.Tensor], seg.logits)  # a float batch in: one tensor out
        contestants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "torch-eager": model, "engine-cpu": seg_logits, "onnxruntime": onnxruntime,
        }  # fmt: skip
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            reference = None
            for name, fn in contestants.items():
                r = measure(fn, x, args.repeats, cpu)
                if name == "torch-eager":
                    reference = r["logits"]
                extra = {"export_s": export_s} if name == "onnxruntime" else {}
                results.add(_row(arch, batch, args.size, name, r, reference, **extra))
                print(f"{arch} b{batch} {name}: p50 {results.rows[-1]['p50_ms']:.1f} ms", flush=True)
        os.remove(path)


def gpu_part(args: argparse.Namespace, workdir: str, results: Results) -> None:
    """The engine's rows, then (the Segmenter dropped) the package's: each row's peak memory is its contestant's own.
    The package is timed alone, its output as it returns it (full-size logits in bfloat16, where the engine returns
    float32: its resize runs in float32); measure casts its copy of the first output to float32 for the error
    column."""
    from denseclip_fast.export import load_aoti, to_aoti

    device = torch.device("cuda")
    for arch in args.archs:
        model = build(arch, args.classes)
        inputs = []
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            with torch.no_grad():
                inputs.append((batch, x, model(x)))
        seg = dcf.Segmenter(model, device=device, dtype=torch.bfloat16, mode="whole")
        seg_logits = cast(Callable[[torch.Tensor], torch.Tensor], seg.logits)  # a float batch in: one tensor out
        start = time.perf_counter()
        path = to_aoti(seg, os.path.join(workdir, "model.pt2"), image_size=args.size, max_batch=max(2, *args.batches))
        compile_s = time.perf_counter() - start
        engine_ms = {}
        for batch, x, reference in inputs:
            xd = x.to(device, torch.bfloat16, memory_format=torch.channels_last)
            results.add(_row(arch, batch, args.size, "engine-bf16", measure(seg_logits, xd, args.repeats, device),
                             reference))  # fmt: skip
            engine_ms[batch] = results.rows[-1]["p50_ms"]
        del seg, seg_logits
        free_gpu_memory(device)
        pkg = load_aoti(path)
        for batch, x, reference in inputs:
            xd = x.to(device, torch.bfloat16, memory_format=torch.channels_last)
            r = measure(pkg, xd, args.repeats, device)
            results.add(_row(arch, batch, args.size, "aoti-bf16", r, reference, compile_s=compile_s))
            print(f"{arch} b{batch}: engine {engine_ms[batch]:.2f} ms, aoti {results.rows[-1]['p50_ms']:.2f} ms",
                  flush=True)  # fmt: skip
        del pkg
        free_gpu_memory(device)


def table(env: dict, rows: list[dict]) -> str:
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", "triton", "onnxruntime", "onnx"))
    lines = [
        f"# Deployment artefacts vs the engine ({env['date']})",
        "",
        f"CPU: {env['cpu']} ({env['threads']} threads); GPU: {env['gpu_name'] or 'none'}; {versions}.",
        "Random weights, 150 classes, whole image, square inputs. Error: relative L2 of the logits against the float32"
        " model in PyTorch eager on the CPU. p90: nearest rank over the timed calls, \"max\" where too few."
        + (f" GPU part with cuDNN benchmark mode {'on' if env.get('cudnn_benchmark') else 'off'}." if env["gpu_name"]
           else ""),  # fmt: skip
        "",
        "| arch | size | batch | contestant | p50 ms | p90 ms | images/s | first call s | export/compile s "
        "| rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | | | {r['contestant']} | failed: {r['error'][:100]} | | | | | |")
            continue
        made = r.get("export_s", r.get("compile_s"))
        err = r["rel_error_vs_fp32"]
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['batch']} | {r['contestant']} | {r['p50_ms']:.2f} "
            f"| {tail_cell(r, 'p90_ms')} "
            f"| {r['images_per_s']:.1f} | {r['first_call_s']:.2f} | {'' if made is None else f'{made:.0f}'} "
            f"| {'' if err is None else f'{err:.1e}'} |"
        )
    load = other_load_note(rows, lambda r: f"{r['contestant']} {r['arch']} batch {r['batch']}")
    if load:
        lines += ["", load]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("cpu", "gpu"))
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--size", type=int, help="square input side (default 512 with a GPU, 256 without)")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, help="timed calls per row (default with a GPU: as many as fill "
                        f"{BUDGET_S:g} s, {MIN_REPEATS} to {MAX_REPEATS}; 3 without)")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke, or the GPU's name)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.parts = args.parts or (["cpu", "gpu"] if gpu else ["cpu"])
    if "gpu" in args.parts and not gpu:
        parser.error("--parts gpu needs a CUDA GPU")
    args.archs = args.archs or ["RN50"]
    args.batches = args.batches or ([1, 16] if gpu else [1])
    args.size = args.size or (512 if gpu else 256)
    if args.repeats is None and not gpu:  # a GPU run times as many calls as fill common.BUDGET_S
        args.repeats = 3
    import onnx
    import onnxruntime

    if "gpu" in args.parts:  # as bench_e2e: cuDNN picks its convolution algorithms by timing them (mmseg's default)
        torch.backends.cudnn.benchmark = True
    env = environment(torch.device("cuda" if gpu else "cpu")) | math_settings()
    env |= {"cpu": environment(torch.device("cpu"))["device"], "gpu_name": env["device"] if gpu else None,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}  # fmt: skip
    results = Results(args.out, "export", args.tag, env, {"args": vars(args)}, table)
    with tempfile.TemporaryDirectory() as workdir:
        for part, run_part in (("cpu", cpu_part), ("gpu", gpu_part)):
            if part not in args.parts:
                continue
            try:
                run_part(args, workdir, results)
            except Exception as exc:  # the other part still runs; the failure is in the results
                print(f"{part} part failed: {failure(exc)}", flush=True)
                results.add({"arch": ",".join(args.archs), "contestant": f"{part} part", "error": failure(exc)})
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

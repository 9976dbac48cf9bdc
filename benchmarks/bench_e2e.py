"""End-to-end DenseCLIP inference: the official pipeline against the engine, side by side, same weights and inputs.

    python benchmarks/bench_e2e.py                       # GPU: the issue's grid; CPU: a small smoke grid
    python benchmarks/bench_e2e.py --archs RN50 --batches 1 16 --modes whole --contestants official engine-bf16

Contestants (random weights, BN statistics and gamma randomised so every stage matters):
  official            benchmarks/official (the official model code without mmseg): text encoder every call, float32
                      at PyTorch's defaults, as users of the official code run it (on CUDA: TF32 cuDNN convolutions,
                      IEEE matmuls; the engine's float32 is IEEE throughout, so engine-fp32's speedup is conservative)
  official-bf16       the same under bf16 autocast
  compile-ro          torch.compile(official, mode="reduce-overhead", dynamic=False) under bf16 autocast: plain
                      reduce-overhead (CUDA graphs), without inductor freezing, as the design's anchor table defines it
  compile-ma          torch.compile(official, mode="max-autotune", dynamic=False) under bf16 autocast, no freezing
                      (opt in: long compile; CUDA graphs too)
                      Both with the class prompts' token ids moved to the GPU once (upstream keeps them on the CPU and
                      copies them every call: a CPU tensor in the graph makes inductor skip its CUDA graphs); their
                      rows record cudagraph_skips, inductor's counter of skipped CUDA-graph runs (0: none skipped)
  engine-fp32         denseclip_fast.Segmenter, float32 in IEEE (TF32 off inside its calls), CUDA graphs on CUDA
  engine-bf16         the same in bfloat16
  engine-bf16-plain-conv  the same with PyTorch's convolutions (DENSECLIP_FAST_CUDNN_FUSION=0 at its construction
                      and calls: no cuDNN-fused bias and ReLU, engine/cuda_conv.py), for the difference they make
  engine-bf16-aten-resample  engine-bf16 with ATen's bilinear resizes and average poolings
                      (DENSECLIP_FAST_TRITON_RESAMPLE=0 at its construction and calls: engine/cuda_resample.py)
  engine-bf16-separate-qkv  engine-bf16 with the attentions' q, k and v projections as separate GEMMs
                      (DENSECLIP_FAST_FUSED_QKV=0 at its construction and calls: engine/projections.py)
  engine-bf16-aten-add-ln  engine-bf16 with the context decoder's residual sums and LayerNorms as ATen's kernels
                      (DENSECLIP_FAST_TRITON_ADD_LN=0 at its construction and calls: engine/decoder_norms.py)
  engine-bf16-fp32-ln  engine-bf16 with ViT's CLIP LayerNorms as the model computes them (float32 copies around a
                      float32 LayerNorm: DENSECLIP_FAST_NATIVE_LN=0 at its construction and calls: engine/rewrite.py);
                      not run on a ResNet, whose image path has none
  engine-bf16-quick-gelu  engine-bf16 with ViT's MLPs as the model computes them (QuickGELU's three kernels, not
                      F.silu with the scale in the weights: DENSECLIP_FAST_SILU_MLP=0 at its construction and calls:
                      engine/rewrite.py silu_mlps); not run on a ResNet
  engine-bf16-cudnn-convt  engine-bf16 with ViT's pyramid transposed convolutions as PyTorch's (cuDNN and a bias
                      pass, not one GEMM each: DENSECLIP_FAST_GEMM_CONVT=0 at its construction and calls:
                      engine/cuda_convt.py); not run on a ResNet
  engine-bf16-aten-group-norm  engine-bf16 with ViT's pyramid GroupNorms as ATen's (a thread block an image for
                      the statistics: DENSECLIP_FAST_GROUP_NORM=0 at its construction and calls:
                      engine/cuda_group_norm.py); not run on a ResNet
On CUDA, cuDNN benchmark mode is on for every contestant (mmseg's default runtime has cudnn_benchmark=True, so
upstream's test runs with it); the environment block records it and the TF32 settings, each row its precision.
Each torch.compile contestant starts from torch._dynamo.reset() and compiles for static shapes (dynamic=False): a
second batch size is compiled afresh, not recompiled with a symbolic batch dimension.
Per contestant: p50/p90/p99 latency by nearest rank (on a GPU as many timed calls as fill 2.5 s, 20 to 2000; "max"
where too few for the percentile), images/s, peak memory in GiB (the contestant's own over the timed calls: its
weights, the input batch, captured graphs and what a call allocates; beside it the first two calls', which compile,
autotune and capture; the official model is moved off the GPU while the engine runs), the first call's time
(compile or capture included; beside it the contestant's construction, build_s: a Segmenter's weight rewrites and
class embeddings), the relative error of the logits against `official` run once in strict float32 (TF32
off), and the image path's FLOP rate: FLOPs of one image-dependent forward (counted once with
torch.utils.flop_counter) per p50, as a fraction of 790 TFLOP/s (the engine issue's H200 bf16 dense figure). The
text encoder is not in that count: the official contestants run it on every call too (its FLOPs per call are in
their rows, text_encoder_flops), the engine once per vocabulary. Writes JSON, markdown and a PNG bar chart to
benchmarks/results/.
--profile CONTESTANT... (default on a GPU: engine-bf16) adds where the time goes, by GPU kernel (torch.profiler), for
those contestants; an engine is also profiled with its CUDA graphs off, whose kernels the profiler always sees, and
that profile also lists the kernels' time by the line of the model or engine that launched them. The
profiles are taken after every row is measured (the profiler's hooks may slow what runs after it), each contestant
built again.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
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
    atomic_write,
    environment,
    environment_variable,
    failure,
    free_gpu_memory,
    math_settings,
    measure,
    other_load_note,
    profile_kernels,
    profile_markdown,
    rel_err,
    sync,
    tail_cell,
    targets_markdown,
    tf32_label,
)
from benchmarks.official import OfficialDenseCLIP, official_config, randomize_, weigh_score_channels_  # noqa: E402
from denseclip_fast.engine.segmenter import Mode, no_tf32  # noqa: E402

PEAK_FLOPS = 790e12  # the engine issue's H200 bf16 dense tensor-core figure: a fixed yardstick for every row
# The engine first and the slow compiles last, so that a run stopped by a time budget has measured what matters most.
ALL = ("engine-bf16", "engine-fp32", "official", "official-bf16", "compile-ro", "compile-ma", "engine-bf16-plain-conv",
       "engine-bf16-aten-resample", "engine-bf16-separate-qkv", "engine-bf16-aten-add-ln", "engine-bf16-fp32-ln",
       "engine-bf16-quick-gelu", "engine-bf16-cudnn-convt", "engine-bf16-aten-group-norm")
# engine-bf16 with one of its GPU rewrites switched off, by the environment variable that does so: (name, value)
SWITCHED_OFF = {"engine-bf16-plain-conv": ("DENSECLIP_FAST_CUDNN_FUSION", "0"),
                "engine-bf16-aten-resample": ("DENSECLIP_FAST_TRITON_RESAMPLE", "0"),
                "engine-bf16-separate-qkv": ("DENSECLIP_FAST_FUSED_QKV", "0"),
                "engine-bf16-aten-add-ln": ("DENSECLIP_FAST_TRITON_ADD_LN", "0"),
                "engine-bf16-fp32-ln": ("DENSECLIP_FAST_NATIVE_LN", "0"),
                "engine-bf16-quick-gelu": ("DENSECLIP_FAST_SILU_MLP", "0"),
                "engine-bf16-cudnn-convt": ("DENSECLIP_FAST_GEMM_CONVT", "0"),
                "engine-bf16-aten-group-norm": ("DENSECLIP_FAST_GROUP_NORM", "0")}
# those whose rewrite only a ViT's image path has: on a ResNet they are engine-bf16 again, and are not run
VIT_ONLY = ("engine-bf16-fp32-ln", "engine-bf16-quick-gelu", "engine-bf16-cudnn-convt", "engine-bf16-aten-group-norm")


def build(arch: str, classes: int, device: torch.device) -> tuple[dcf.DenseCLIP, OfficialDenseCLIP]:
    names = list(dcf.ADE20K_CLASSES[:classes])
    torch.manual_seed(0)
    official = randomize_(OfficialDenseCLIP(official_config(arch), names)).eval()
    weigh_score_channels_(official)  # so that the logits' error vs the official model sees the text path too
    model = dcf.DenseCLIP.from_arch(arch, names).eval()
    model.load_state_dict(official.state_dict())
    return model, official  # both on the CPU: run() puts the official model on the device only while it is measured


def runs_on(name: str, config: dcf.DenseCLIPConfig) -> bool:
    """Whether contestant ``name`` is run on a model of ``config``: not one of VIT_ONLY on a ResNet (the same engine
    as engine-bf16 there, nothing to compare)."""
    return name not in VIT_ONLY or config.vision.kind == "vit"


def runs_official(name: str) -> bool:
    """Whether a contestant runs the official model's own weights (which must then be on the device)."""
    return name.startswith(("official", "compile"))


def precision(name: str, device: torch.device, tf32: dict[str, str]) -> str:
    """What a contestant computes in, for its row; ``tf32``: the run's :func:`benchmarks.common.tf32_settings`."""
    if name == "official":
        return f"fp32, PyTorch defaults: {tf32_label(tf32)}" if device.type == "cuda" else "fp32"
    if name == "engine-fp32":
        return "fp32, IEEE (TF32 off)"
    if name == "engine-bf16":
        return "bf16"
    if name == "engine-bf16-plain-conv":
        return "bf16, PyTorch's convolutions"
    if name == "engine-bf16-aten-resample":
        return "bf16, ATen's resizes and poolings"
    if name == "engine-bf16-separate-qkv":
        return "bf16, separate q/k/v GEMMs"
    if name == "engine-bf16-aten-add-ln":
        return "bf16, ATen's decoder sums and LayerNorms"
    if name == "engine-bf16-fp32-ln":
        return "bf16, CLIP LayerNorms through float32 copies"
    if name == "engine-bf16-quick-gelu":
        return "bf16, QuickGELU's three kernels in the MLPs"
    if name == "engine-bf16-cudnn-convt":
        return "bf16, PyTorch's transposed convolutions"
    if name == "engine-bf16-aten-group-norm":
        return "bf16, ATen's GroupNorms"
    if name == "compile-ro":
        return "bf16 autocast, reduce-overhead (CUDA graphs), no freezing"
    if name == "compile-ma":
        return "bf16 autocast, max-autotune, no freezing"
    return "bf16 autocast"


def contestant(name: str, model: dcf.DenseCLIP, official: OfficialDenseCLIP, device: torch.device, mode: Mode,
               crop: int, stride: int, graphs: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    def run_official(net: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        if mode == "whole":
            return net
        return lambda x: official.slide_inference(x, crop, stride)

    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    # the token ids: on the CPU as upstream's tokenize leaves them (official.to() does not move a plain attribute),
    # on the device for the compiled contestants (see the module docstring)
    official.texts = official.texts.to(device if name.startswith("compile") else "cpu")
    if name == "official":
        return run_official(official)
    if name == "official-bf16":
        fn = run_official(official)

        def bf16(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return fn(x)

        return bf16
    if name in ("compile-ro", "compile-ma"):
        target = official.encode_decode if mode == "whole" else (lambda x: official.slide_inference(x, crop, stride))
        # dynamo's cache is per code object: without a reset, the second batch size would be recompiled with a
        # symbolic batch dimension (a weaker baseline); static shapes, as bench_ops' torch.compile
        torch._dynamo.reset()
        compiled = torch.compile(target, mode="reduce-overhead" if name == "compile-ro" else "max-autotune",
                                 dynamic=False)  # fmt: skip

        def compiled_bf16(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return compiled(x)

        return compiled_bf16
    dtype = torch.float32 if name == "engine-fp32" else torch.bfloat16
    # a switch of SWITCHED_OFF is set while the Segmenter is built (DENSECLIP_FAST_CUDNN_FUSION is read then) and
    # while it is called (DENSECLIP_FAST_TRITON_RESAMPLE is read at each call: the capture, the resize after the
    # replay); capture at the first call, so that the reported first-call time includes the capture
    variable, value = SWITCHED_OFF.get(name, ("DENSECLIP_FAST_CUDNN_FUSION", None))
    with environment_variable(variable, value):
        seg = dcf.Segmenter(model, device=device, dtype=dtype, mode=mode, crop=crop, stride=stride,
                            capture_after=1, cuda_graphs=graphs)  # fmt: skip
    if value is None:
        return cast(Callable[[torch.Tensor], torch.Tensor], seg.logits)  # a float batch in: one tensor out

    def switched_off(x: torch.Tensor) -> torch.Tensor:
        with environment_variable(variable, value):
            return cast(torch.Tensor, seg.logits(x))

    return switched_off


def count_flops(model: dcf.DenseCLIP, x: torch.Tensor, mode: str, crop: int, stride: int) -> float:
    """FLOPs of one image-dependent forward (the class embeddings are computed before counting; the context
    decoder's start from them, which the eval model runs once a call and the engine once per vocabulary, is counted:
    about 0.2 GFLOP at RN50's 150 classes, of 133 per image), on the reference
    backend: FlopCounterMode sees the C++ operators through their registered formulas (equal to the reference's
    count, tests/test_ops.py) but not inside Triton operators, which it traces into their kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    from denseclip_fast.ops.backends import ENV_VAR

    model = model.to(x.device)
    try:
        with torch.no_grad(), environment_variable(ENV_VAR, "reference"):
            model.class_embeddings()
            with FlopCounterMode(display=False) as counter:
                model(x) if mode == "whole" else model.slide_inference(x, crop, stride)
    finally:
        model.cpu()
    return float(counter.get_total_flops())


def text_encoder_flops(official: OfficialDenseCLIP, device: torch.device) -> float:
    """FLOPs of one run of the official text encoder (the K class prompts with the learned contexts), which the
    official model repeats in every encode_decode (so once per window in slide mode); counted on ``device``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        official.text_encoder(official.texts.to(device), official.contexts)
    return float(counter.get_total_flops())


def windows(height: int, width: int, crop: int, stride: int) -> int:
    """How many windows the official slide_inference runs on an image of this size."""
    grids = lambda side: max(side - crop + stride - 1, 0) // stride + 1  # noqa: E731
    return grids(height) * grids(width)


def official_fp32(official: OfficialDenseCLIP, x: torch.Tensor, mode: str, crop: int, stride: int) -> torch.Tensor:
    """The fidelity reference: the official forward in strict float32 (cuDNN's TF32 convolutions, on by default in
    PyTorch and so in the timed `official` contestant, cost ~1e-3 relative error), on the CPU."""
    with torch.no_grad(), no_tf32(x.device.type == "cuda"):
        out = official(x) if mode == "whole" else official.slide_inference(x, crop, stride)
    return out.float().cpu()


def run(args: argparse.Namespace, device: torch.device, results: Results) -> None:
    tf32 = results.env["tf32"]
    profiled: list[tuple[dict, str, Mode, tuple[int, ...], str]] = []  # (row, arch, mode, shape, contestant)
    for arch in args.archs:
        model, official = build(arch, args.classes, device)
        cfg = model.config
        size = args.size or (640 if arch == "ViT-B/16" else 512)
        text_flops = text_encoder_flops(official.to(device), device)
        for mode in args.modes:
            for batch in args.batches:
                shape = (
                    (batch, 3, size, size) if mode == "whole" else (batch, 3, args.slide_height, 4 * args.slide_height)
                )
                # the architecture's windows (640/426 for ViT-B/16), clamped to the image as mmseg's: on a 512-high
                # image ViT-B/16 runs 512x640 windows
                crop, stride = cfg.slide_crop, cfg.slide_stride
                x = torch.randn(shape, device=device)
                flops = count_flops(model, x, mode, crop, stride)
                reference = official_fp32(official.to(device), x, mode, crop, stride)
                calls = 1 if mode == "whole" else windows(shape[2], shape[3], crop, stride)
                for name in args.contestants:
                    if not runs_on(name, cfg):
                        continue
                    print(f"{arch} {mode} {tuple(shape)} {name} ...", flush=True)
                    # each row's peak memory is its contestant's own: the official weights are on the device only
                    # while a contestant that runs them is measured
                    official.to(device if runs_official(name) else "cpu")
                    free_gpu_memory(device)  # the previous contestant's (a Segmenter is freed only by a collection)
                    row = {"arch": arch, "mode": mode, "shape": list(shape), "contestant": name,
                           "precision": precision(name, device, tf32)}  # fmt: skip
                    try:
                        r = measure_contestant(name, args, model, official, device, mode, crop, stride, x)
                        # logits of another shape (other classes, another size) are not the task's: a failure
                        error = rel_err(r.pop("logits"), reference)
                    except Exception as exc:  # report and go on: one failing contestant must not hide the rest
                        print(f"  failed: {failure(exc)}", flush=True)
                        results.add({**row, "error": failure(exc)})
                        continue
                    finally:
                        release(device)
                    r.update(row, image_path_flops=flops, images_per_s=batch / (r["p50_ms"] / 1e3),
                             rel_error_vs_official=error)  # fmt: skip
                    r["image_path_fraction_of_peak"] = flops / (r["p50_ms"] / 1e3) / PEAK_FLOPS
                    if runs_official(name):
                        r["text_encoder_flops"] = text_flops * calls
                    results.add(r)
                    bar_chart(results.rows, f"{results.stem}.png")
                    if name in args.profile:
                        profiled.append((r, arch, mode, tuple(shape), name))
        del model, official
    profile_after_measuring(args, profiled, device, results)


def profile_after_measuring(args: argparse.Namespace, profiled: list[tuple[dict, str, Mode, tuple[int, ...], str]],
                            device: torch.device, results: Results) -> None:  # fmt: skip
    """Where the time goes, for the rows of the contestants asked for, once every row is measured: torch.profiler
    (CUPTI on a GPU) may leave its hooks behind and slow the launches of whatever is timed after it. Each contestant is
    built again (an engine runs the same kernels; a compiled one compiles again) on an input of the row's shape."""
    for arch in dict.fromkeys(entry[1] for entry in profiled):
        model, official = build(arch, args.classes, device)
        crop, stride = model.config.slide_crop, model.config.slide_stride
        for row, _, mode, shape, name in (entry for entry in profiled if entry[1] == arch):
            print(f"{arch} {mode} {shape} {name}: profiling ...", flush=True)
            official.to(device if runs_official(name) else "cpu")
            try:
                x = torch.randn(shape, device=device)
                fn = contestant(name, model, official, device, mode, crop, stride)
                row.update(where_the_time_goes(name, fn, model, official, device, mode, crop, stride, x))
            except Exception as exc:  # the measurement stands without its profile
                row["profile_error"] = failure(exc)
            finally:
                release(device)
            results.save()
        del model, official


def measure_contestant(name: str, args: argparse.Namespace, model: dcf.DenseCLIP, official: OfficialDenseCLIP,
                       device: torch.device, mode: Mode, crop: int, stride: int, x: torch.Tensor) -> dict:  # fmt: skip
    """common.measure of one contestant, built here (build_s: how long that took) and dropped on return (its
    profile, if asked for, is taken after every measurement: profile_after_measuring)."""
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    # the contestant's construction, a one-off cost beside its first call: a Segmenter rewrites its copy of the
    # weights, computes the class embeddings and probes cuDNN here (torch.compile is lazy: its compile is in the
    # first call)
    sync(device)
    start = time.perf_counter()
    fn = contestant(name, model, official, device, mode, crop, stride)
    sync(device)
    build_s = time.perf_counter() - start
    row = measure(fn, x, args.repeats, device)
    row["build_s"] = build_s
    if name.startswith("compile") and device.type == "cuda":  # a compile without its CUDA graphs says so
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    engine = getattr(fn, "__self__", None)
    if isinstance(engine, dcf.Segmenter) and device.type == "cuda":  # a failed capture warns and runs eagerly
        row["cuda_graphs_captured"] = engine.captured_graphs
    return row


def release(device: torch.device) -> None:
    """Free what the contestant just measured held: torch.compile's compiled code and CUDA graph trees (their
    memory pool) go with torch._dynamo.reset(), a Segmenter with a garbage collection."""
    torch._dynamo.reset()
    free_gpu_memory(device)


# Kernels listed by name in the graphs-off profile of an engine (the rest summed): at batch 1 a third of the GPU
# time was in "41 others" behind the top 15 (h200_2026-12-04c), too many small kernels to say which launches to fuse
PROFILE_TOP_NO_GRAPHS = 60
# ... and by the line of the model or engine that launched them (common.profile_kernels' sites): 29 copy kernels of
# 68 us were in that profile, from no line it could name
PROFILE_SITES = 40


def where_the_time_goes(name: str, fn: Callable[[torch.Tensor], torch.Tensor], model: dcf.DenseCLIP,
                        official: OfficialDenseCLIP, device: torch.device, mode: Mode, crop: int, stride: int,
                        x: torch.Tensor) -> dict:  # fmt: skip
    """{"profile": ``fn`` (the contestant, built again after the measurements) by kernel}, and
    for an engine on CUDA {"profile_no_graphs": the same engine with its CUDA graphs off} (the kernels are the same;
    a graph replay may not be traced kernel by kernel), its PROFILE_TOP_NO_GRAPHS largest kernels listed; an
    engine's profile that shows its kernels (CUDA: graphs off; a CPU: the one) also by call site (PROFILE_SITES)."""
    engine, cuda = name.startswith("engine"), device.type == "cuda"
    out = {"profile": profile_kernels(fn, x, device, sites=PROFILE_SITES if engine and not cuda else 0)}
    if engine and cuda:
        out["profile_no_graphs"] = profile_kernels(
            contestant(name, model, official, device, mode, crop, stride, graphs=False), x, device,
            top=PROFILE_TOP_NO_GRAPHS, sites=PROFILE_SITES,
        )
    free_gpu_memory(device)
    return out


def profiles_markdown(rows: list[dict]) -> str:
    """The "where the time goes" tables of the profiled rows."""
    parts = []
    for r in rows:
        what = f"{r.get('contestant')}, {r.get('arch')} {r.get('mode')} {'x'.join(map(str, r.get('shape', [])))}"
        if "profile" in r:
            parts.append(profile_markdown(f"Where the time goes: {what}", r["profile"]))
        if "profile_no_graphs" in r:
            parts.append(profile_markdown(f"Where the time goes: {what}, CUDA graphs off", r["profile_no_graphs"]))
        if "profile_error" in r:
            parts.append(f"\n{what}: profiling failed: {r['profile_error']}\n")
    return ("\n## Profiles\n" + "".join(parts)) if parts else ""


def graphs_note(row: dict) -> str:
    """What the precision cell adds when a contestant meant to replay CUDA graphs ran (partly) without them."""
    if row.get("cudagraph_skips"):
        return f"; CUDA graphs skipped (cudagraph_skips={row['cudagraph_skips']})"
    if row.get("cuda_graphs_captured") == 0:
        return "; no CUDA graph captured (ran eagerly)"
    return ""


def table(env: dict, rows: list[dict], classes: int) -> str:
    if env["gpu"]:
        note = ("Image-path FLOP rate = FLOPs of one image-dependent forward (the text encoder, which the official "
                "contestants also run every call, not counted: see text_encoder_flops in the JSON) / p50, against "
                "the H200's 790 TFLOP/s (bf16 dense, the engine issue's figure).")  # fmt: skip
    else:
        note = "A CPU smoke run: the image-path FLOP-rate column refers to an H200 and means nothing here."
    settings = ""
    if env["gpu"] and "tf32" in env:
        settings = (f" cuDNN benchmark mode {'on' if env.get('cudnn_benchmark') else 'off'}; float32 settings of the "
                    f"run (the official contestant's): {tf32_label(env['tf32'])}.")  # fmt: skip
    features = "" if env["gpu"] or not env.get("cpu_features") else f" ({', '.join(env['cpu_features'])})"
    lines = [f"# End-to-end benchmark: {env['device']}{features}", "",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, {env['threads']} CPU threads. "
             f"Random weights, K = {classes} ADE20K names.{settings} {note}", "",
             "p90/p99: nearest rank over the timed calls (calls); \"max\" where too few calls for that percentile. "
             "Host ms: the median time until a call returned, before the wait for the GPU (near p50: the call is "
             "bound by its launches on the host). "
             "Peak GiB: the contestant's own over the timed calls (its weights, the input batch, captured graphs, "
             "and what a call allocates); in brackets over the first two calls, which also compile, autotune, "
             "search cuDNN's algorithms and capture. First call s: compile or capture included; \"+N build\": "
             "the contestant's construction before it (a Segmenter's weight rewrites and class embeddings; "
             "torch.compile compiles in its first call).", "",
             "| arch | mode | input | contestant | precision | p50 ms | host ms | p90 ms | p99 ms | calls | img/s "
             "| first call s | peak GiB | rel. error | image path, of 790 TFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        head = f"| {r['arch']} | {r['mode']} | {shape} | {r['contestant']} | {r.get('precision', '')}{graphs_note(r)} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | | | | | |")
            continue
        mem = (f"{r['peak_memory_gib']:.2f} ({r['first_calls_peak_memory_gib']:.2f})"
               if r["peak_memory_gib"] is not None else "-")  # fmt: skip
        err = f"{r['rel_error_vs_official']:.1e}" if r["rel_error_vs_official"] is not None else "-"
        host = f"{r['host_p50_ms']:.2f}" if r.get("host_p50_ms") is not None else "-"
        first = f"{r['first_call_s']:.1f}" + (f" (+{r['build_s']:.1f} build)" if r.get("build_s") is not None else "")
        lines.append(f"{head} {r['p50_ms']:.2f} | {host} | {tail_cell(r, 'p90_ms')} | {tail_cell(r, 'p99_ms')} | "
                     f"{r.get('samples', '')} | {r['images_per_s']:.1f} | {first} | {mem} | {err} | "
                     f"{100 * r['image_path_fraction_of_peak']:.2f}% |")  # fmt: skip
    load = other_load_note(rows, lambda r: f"{r['contestant']} {'x'.join(str(s) for s in r['shape'])}")
    if load:
        lines += ["", load]
    targets_part = targets_markdown(targets(rows), env["device"]) if env["gpu"] else ""
    return "\n".join(lines) + "\n" + targets_part + profiles_markdown(rows)


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The engine issue's H200 targets (RN50, 512x512 whole, 150 classes) and fidelity bounds against this run."""

    def find(contestant: str, batch: int) -> dict | None:
        return next((r for r in rows if "error" not in r and (r["arch"], r["mode"], r["shape"], r["contestant"])
                     == ("RN50", "whole", [batch, 3, 512, 512], contestant)), None)  # fmt: skip

    b1, b16 = find("engine-bf16", 1), find("engine-bf16", 16)
    checks: list[tuple[str, str, bool | None]] = [
        ("RN50 512x512 batch 1, engine-bf16: p50 <= 1.0 ms",
         "-" if b1 is None else f"{b1['p50_ms']:.3f} ms", None if b1 is None else b1["p50_ms"] <= 1.0),
        ("RN50 512x512 batch 16, engine-bf16: >= 3000 images/s",
         "-" if b16 is None else f"{b16['images_per_s']:.0f} images/s",
         None if b16 is None else b16["images_per_s"] >= 3000),
    ]  # fmt: skip
    for contestant, bound in (("engine-fp32", 1e-4), ("engine-bf16", 2e-2)):
        errors = [r["rel_error_vs_official"] for r in rows
                  if r.get("contestant") == contestant and r.get("rel_error_vs_official") is not None]  # fmt: skip
        failed = sum(1 for r in rows if r.get("contestant") == contestant and "error" in r)
        # NaN (NaN logits) first: max() keeps the first of values it cannot order, so a NaN after a number was lost
        worst = next((e for e in errors if math.isnan(e)), max(errors, default=None))
        measured = "-" if worst is None else f"worst {worst:.1e} over {len(errors)}"
        if failed:  # a configuration the contestant failed in has no logits within the bound
            measured = f"{'' if worst is None else measured + '; '}{failed} failed"
        checks.append((f"{contestant} logits within {bound:g} of official (every configuration)", measured,
                       False if failed else None if worst is None else worst <= bound))  # fmt: skip
    return checks


def bar_chart(rows: list[dict], path: str) -> None:
    """Images/s per contestant and configuration, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    rows = [r for r in rows if "error" not in r]
    if not rows:
        return
    width, bar_h, pad, label_w = 1100, 22, 6, 420
    img = Image.new("RGB", (width, 40 + len(rows) * (bar_h + pad)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "images/s (p50), longer is better", fill="black")
    top = max(r["images_per_s"] for r in rows)
    colors = {"official": (150, 150, 150), "official-bf16": (110, 110, 110), "compile-ro": (230, 150, 40),
              "compile-ma": (200, 110, 20), "engine-fp32": (60, 130, 220), "engine-bf16": (20, 80, 180),
              "engine-bf16-plain-conv": (90, 140, 200), "engine-bf16-aten-resample": (120, 160, 210),
              "engine-bf16-separate-qkv": (150, 180, 220), "engine-bf16-aten-add-ln": (170, 195, 225),
              "engine-bf16-fp32-ln": (185, 205, 230), "engine-bf16-quick-gelu": (195, 212, 235),
              "engine-bf16-cudnn-convt": (205, 220, 240), "engine-bf16-aten-group-norm": (215, 228, 244)}  # fmt: skip
    for i, r in enumerate(rows):
        y = 40 + i * (bar_h + pad)
        label = f"{r['arch']} {r['mode']} {'x'.join(map(str, r['shape']))} {r['contestant']}"
        draw.text((10, y + 5), label, fill="black")
        length = max(1, int((width - label_w - 90) * r["images_per_s"] / top))
        draw.rectangle([label_w, y, label_w + length, y + bar_h], fill=colors.get(r["contestant"], (0, 0, 0)))
        draw.text((label_w + length + 6, y + 5), f"{r['images_per_s']:.1f}", fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"), binary=True)  # a run stopped mid-write keeps the last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--modes", nargs="+", choices=("whole", "slide"))
    parser.add_argument("--contestants", nargs="+", choices=ALL)
    parser.add_argument("--size", type=int, help="whole-image side (default 512, 640 for ViT-B/16)")
    parser.add_argument("--slide-height", type=int, default=512, help="slide images are H x 4H")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, help="timed calls per contestant (default on a GPU: as many as fill "
                        f"{BUDGET_S:g} s, {MIN_REPEATS} to {MAX_REPEATS}; 3 on a CPU)")  # fmt: skip
    parser.add_argument("--profile", nargs="*", choices=ALL, help="contestants to profile by kernel (GPU default: "
                        "engine-bf16; none on a CPU)")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: the device)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.archs = args.archs or (["RN50", "RN101", "ViT-B/16"] if gpu else ["RN50"])
    args.batches = args.batches or ([1, 16] if gpu else [1])
    args.modes = args.modes or (["whole", "slide"] if gpu else ["whole"])
    args.contestants = args.contestants or (
        [c for c in ALL if c != "compile-ma"] if gpu else ["official", "engine-fp32"]
    )
    if args.repeats is None and not gpu:  # a GPU run times as many calls as fill common.BUDGET_S
        args.repeats = 3
    args.profile = args.profile if args.profile is not None else (["engine-bf16"] if gpu else [])
    if not gpu:
        args.size = args.size or 256
        args.slide_height = min(args.slide_height, 256)
    if gpu:  # mmseg's default runtime (cudnn_benchmark=True), under which upstream's test runs: for every contestant
        torch.backends.cudnn.benchmark = True
    env = environment(device) | math_settings()  # TF32 as the official contestant runs (PyTorch's defaults)
    results = Results(args.out, "e2e", args.tag, env, {"args": vars(args)},
                      lambda env, rows: table(env, rows, args.classes))  # fmt: skip
    run(args, device, results)
    print(results.render(results.env, results.rows))
    bar_chart(results.rows, f"{results.save()}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

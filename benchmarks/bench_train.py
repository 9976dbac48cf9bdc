"""One DenseCLIP training step: the official style against this trainer, same architecture, batch and loss.

    python benchmarks/bench_train.py                  # GPU: RN50 512x512 batch 16; CPU: a small smoke run
    python benchmarks/bench_train.py --arch RN50 --batch 16 --size 512 --contestants official-fp32 trainer-bf16

Contestants (random weights; loss = CE(head) + 0.4 CE(score / tau), AdamW step included):
  official-fp32     benchmarks/official (the official model code), float32 eager, the text encoder recomputed and
                    differentiated every step (the official lr_mult=0 keeps its gradients and optimiser state),
                    einsum + torch.cat for the score map
  trainer-fp32      denseclip_fast.train's step: fused operators (their backward kernels), frozen text encoder,
                    channels_last images and weights on CUDA
  trainer-bf16      the same under bf16 autocast (the trainer's default)
  trainer-bf16-ckpt the same with gradient checkpointing (memory for speed)
  trainer-bf16-aten trainer-bf16 with PyTorch's poolings, upsamplings, loss resizes and cross-entropy
                    (DENSECLIP_FAST_TRITON_RESAMPLE=0 and DENSECLIP_FAST_TRITON_LOSS=0 around each step): what the
                    trainer's Triton kernels gain, in one run
  trainer-bf16-unfused-loss trainer-bf16 with the loss's resizes and cross-entropies as separate Triton kernels
                    (DENSECLIP_FAST_FUSED_LOSS=0 around each step): what the fused resize + cross-entropy gains
cuDNN benchmark mode is on for every contestant (mmseg's runtime default, and the trainer's). The float32 contestants
both run at PyTorch's TF32 defaults (on CUDA: TF32 convolutions, IEEE matmuls), recorded in the environment block.
Without --steps a GPU run times as many steps as fill 3 s (10 to 200); the JSON's p90_ms is None with fewer than 10.
Per contestant: images/s, ms per step (median), peak memory of the timed steps (and of the first two, which create
the optimiser state and search cuDNN's algorithms). --profile CONTESTANT... (default on a GPU: official-fp32 and
trainer-bf16) adds where a step's time goes, by GPU kernel (torch.profiler), once every contestant is timed (a
run cut short has the ratio). Writes JSON and markdown to benchmarks/results/ (train_<tag>.*) with the machine and
versions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Results,
    arch_name,
    environment,
    failure,
    free_gpu_memory,
    math_settings,
    measure,
    other_load_note,
    profile_kernels,
    profile_markdown,
    targets_markdown,
    tf32_label,
)
from benchmarks.official import OfficialDenseCLIP, official_config, randomize_  # noqa: E402
from denseclip_fast.train import TrainConfig  # noqa: E402
from denseclip_fast.train.optim import make_optimizer, segmentation_loss  # noqa: E402
from denseclip_fast.train.step import TrainStep, memory_format, prepare_model  # noqa: E402

ALL = ("trainer-bf16", "official-fp32", "trainer-bf16-aten", "trainer-bf16-unfused-loss", "trainer-fp32",
       "trainer-bf16-ckpt")  # fmt: skip  (the target's pair first)


def official_step(arch: str, names: list[str], cfg: TrainConfig, device: torch.device) -> Callable:
    torch.manual_seed(0)
    model = randomize_(OfficialDenseCLIP(official_config(arch), names)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(x: torch.Tensor, label: torch.Tensor) -> float:
        _, levels, score = model.after_extract_feat(model.backbone(x))
        out = model.decode_head(model.neck(levels))
        out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        loss = segmentation_loss(out, score / 0.07, label, cfg)["loss"]  # the official tau
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainer_step(
    arch: str, names: list[str], cfg: TrainConfig, device: torch.device, bf16: bool, ckpt: bool
) -> Callable:
    torch.manual_seed(0)
    cfg = replace(cfg, grad_checkpointing=ckpt)
    model = prepare_model(randomize_(dcf.DenseCLIP.from_arch(arch, names)), cfg, device)  # as the trainer does
    layout = memory_format(cfg, device)
    module = TrainStep(model)
    optimizer = make_optimizer(model, cfg, device)  # as the trainer: fused AdamW on CUDA

    def step(x: torch.Tensor, label: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, aux = module(x.contiguous(memory_format=layout))  # the trainer's batches arrive so
        loss = segmentation_loss(logits, aux, label, cfg)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def switched_off(step: Callable, *variables: str) -> Callable:
    """``step`` with the environment switches ``variables`` (read at each call) set to 0 while it runs."""

    def off(x: torch.Tensor, label: torch.Tensor) -> float:
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update({name: "0" for name in variables})
        try:
            return cast(float, step(x, label))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return off


# Timed steps when --steps is not given on a GPU: as many as fill STEPS_BUDGET_S, MIN_STEPS to MAX_STEPS.
STEPS_BUDGET_S, MIN_STEPS, MAX_STEPS = 3.0, 10, 200


def timed(step: Callable, x: torch.Tensor, label: torch.Tensor, steps: int | None, device: torch.device) -> dict:
    """common.measure of one step (the first call and one warm-up untimed: allocator, autotuning, optimiser state);
    ``steps`` timed steps, or with None as many as fill STEPS_BUDGET_S (MIN_STEPS to MAX_STEPS). p90_ms is None
    with fewer than 10 timed steps (it would be their maximum)."""
    r = measure(lambda t: torch.tensor(step(t, label)), x, steps, device, grad=True, budget_s=STEPS_BUDGET_S,
                min_repeats=MIN_STEPS, max_repeats=MAX_STEPS)  # fmt: skip
    return {"ms_per_step": r["p50_ms"], "p90_ms": r["p90_ms"], "max_ms": r["max_ms"], "timed_steps": r["samples"],
            "images_per_s": x.shape[0] / (r["p50_ms"] / 1e3), "first_call_s": r["first_call_s"],
            "first_loss": r["logits"].item(), "peak_memory_gib": r["peak_memory_gib"],
            "first_calls_peak_memory_gib": r["first_calls_peak_memory_gib"],
            "other_cpu_cores": r["other_cpu_cores"]}  # fmt: skip


def table(env: dict, rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"# One training step, {args.arch} {args.size}x{args.size}, batch {args.batch} ({env['date']})",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}. Random weights, {args.classes} classes, "
        "AdamW step included; median of the timed steps after 2 warm-up steps."
        + (f" float32 at {tf32_label(env['tf32'])}; cuDNN benchmark mode "
           f"{'on' if env.get('cudnn_benchmark') else 'off'}." if env["gpu"] and "tf32" in env else ""),  # fmt: skip
        "",
        "Peak memory: GiB over the timed steps (weights, optimiser state, a step's activations); in brackets over "
        "the first two steps, which also create the optimiser state and run cuDNN's algorithm search, autotuning "
        "and compilation.",
        "",
        "| contestant | ms / step | images/s | peak memory GiB | x official |",
        "|---|---|---|---|---|",
    ]
    base = next((r["images_per_s"] for r in rows if r["contestant"] == "official-fp32" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contestant']} | failed: {r['error'][:100]} | | | |")
            continue
        first = r["first_calls_peak_memory_gib"]
        mem = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} ({first:.1f})"
        speedup = "" if base is None else f"{r['images_per_s'] / base:.2f}"
        lines.append(f"| {r['contestant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | {mem} | {speedup} |")
    load = other_load_note(rows, lambda r: r["contestant"])
    if load:
        lines += ["", load]
    profiles = "".join(profile_markdown(f"Where the time goes: {r['contestant']}", r["profile"])
                       for r in rows if "profile" in r)  # fmt: skip
    targets_part = targets_markdown(targets(rows), env["device"]) if env["gpu"] else ""
    return "\n".join(lines) + "\n" + targets_part + ("\n## Profiles\n" + profiles if profiles else "")


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The training issue's target: the trainer's bf16 step at least 3x the official-style step's images/s."""
    ips = {r["contestant"]: r["images_per_s"] for r in rows if "error" not in r}
    if "official-fp32" not in ips or "trainer-bf16" not in ips:
        return [("trainer-bf16 >= 3x official-fp32 images/s", "-", None)]
    ratio = ips["trainer-bf16"] / ips["official-fp32"]
    return [("trainer-bf16 >= 3x official-fp32 images/s", f"{ratio:.2f}x", ratio >= 3.0)]


def profile_step(row: dict, step: Callable, x: torch.Tensor, label: torch.Tensor, device: torch.device) -> None:
    """Where ``step``'s time goes, into ``row`` (the step and its model dropped on return)."""
    row["profile"] = profile_kernels(lambda t: step(t, label), x, device, calls=2, grad=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="RN50", type=arch_name, choices=dcf.config.ARCHS)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--steps", type=int, help="timed steps per contestant (default on a GPU: as many as fill "
                        f"{STEPS_BUDGET_S:g} s, {MIN_STEPS} to {MAX_STEPS}; 1 on a CPU)")  # fmt: skip
    parser.add_argument("--contestants", nargs="+", choices=ALL)
    parser.add_argument("--profile", nargs="*", choices=ALL, help="contestants to profile by kernel")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke, or the GPU's name)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (16 if gpu else 2)
    args.size = args.size or (512 if gpu else 128)
    if args.steps is None and not gpu:  # a GPU run times as many steps as fill STEPS_BUDGET_S
        args.steps = 1
    args.contestants = args.contestants or (list(ALL) if gpu else ["official-fp32", "trainer-fp32"])
    args.profile = args.profile if args.profile is not None else (["official-fp32", "trainer-bf16"] if gpu else [])
    names = list(dcf.ADE20K_CLASSES[: args.classes])
    cfg = TrainConfig()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    label = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    env = environment(device) | math_settings()  # the float32 steps (official and trainer) run at these TF32 settings
    results = Results(args.out, "train", args.tag, env, {"args": vars(args)},
                      lambda env, rows: table(env, rows, args))  # fmt: skip

    def build(name: str) -> Callable:
        if name == "official-fp32":
            return official_step(args.arch, names, cfg, device)
        step = trainer_step(args.arch, names, cfg, device, bf16="bf16" in name, ckpt=name.endswith("ckpt"))
        if name.endswith("-aten"):
            return switched_off(step, "DENSECLIP_FAST_TRITON_RESAMPLE", "DENSECLIP_FAST_TRITON_LOSS")
        if name.endswith("-unfused-loss"):
            return switched_off(step, "DENSECLIP_FAST_FUSED_LOSS")
        return step

    # every contestant timed first, the profiles after: a run stopped by its time budget has the target's pair
    # measured (the first GPU runs lost the official step behind the trainer's profile), and torch.profiler's
    # hooks cannot slow a step timed after them
    for name in args.contestants:
        try:
            results.add({"contestant": name, **timed(build(name), x, label, args.steps, device)})
            print(f"{name}: {results.rows[-1]['ms_per_step']:.1f} ms/step", flush=True)
        except Exception as exc:  # reported in the results; the other contestants still run
            print(f"{name} failed: {failure(exc)}", flush=True)
            results.add({"contestant": name, "error": failure(exc)})
        free_gpu_memory(device)  # the step (and its model) dropped on return from timed
    for row in results.rows:
        if row["contestant"] not in args.profile or "error" in row:
            continue
        print(f"{row['contestant']}: profiling ...", flush=True)
        try:
            profile_step(row, build(row["contestant"]), x, label, device)
        except Exception as exc:  # the measurement stands without its profile
            row["profile_error"] = failure(exc)
        free_gpu_memory(device)
        results.save()
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

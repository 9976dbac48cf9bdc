"""Images in, logits or label maps out: Segmenter.logits and .predict end to end on uint8 images (a benchmark).

    python benchmarks/bench_predict.py                                   # CPU, RN50, float32 and bfloat16
    python benchmarks/bench_predict.py --device cuda --repeats 50        # bfloat16

bench_e2e.py times the network on normalised batches; this times what the command line and most callers run: uint8
RGB images through the official test pipeline (keep-ratio resize to the test scale, CLIP normalisation), the
network, the logits' resize to the network's input and then to the image's own size, and for predict the argmax.
Inputs: ``ade`` a 683x512 image (ADE20K's usual size, which the test scale (2048, 512) leaves as it is), ``photo`` a
2048x1536 one (resized to 683x512 and back), ``float`` a normalised 512x512 batch. Batch 1, random weights and
pixels, 150 classes, whole mode (``--modes slide``: the official test mode, 512 crops at stride 341, too);
logits and predict take turns after one untimed round. Every predict's labels
must equal the argmax of the same round's logits. Writes JSON and markdown (predict_<tag>.*).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Results,
    arch_name,
    environment,
    host_rss_gib,
    take_turns,
    turn_arguments,
    turn_cells,
    turn_device,
    turn_fields,
    turn_versions,
)
from benchmarks.official import randomize_  # noqa: E402
from denseclip_fast.engine import host_memory  # noqa: E402

INPUTS = {"ade": (512, 683), "photo": (1536, 2048), "float": (512, 512)}
CALLS = ("logits", "predict")


def make_input(name: str) -> np.ndarray | torch.Tensor:
    height, width = INPUTS[name]
    if name == "float":
        return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    return np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def run_case(seg: dcf.Segmenter, arch: str, dtype: str, name: str, repeats: int) -> dict:
    image = make_input(name)

    def check(out: dict[str, torch.Tensor]) -> None:
        if not torch.equal(out["predict"], out["logits"].argmax(dim=1)):
            raise AssertionError(f"{arch} {dtype} {name}: predict's labels differ from the logits' argmax")

    calls = {call: functools.partial(getattr(seg, call), image) for call in CALLS}
    times, _ = take_turns(calls, repeats, seg.device, check)
    return {"arch": arch, "dtype": dtype, "mode": seg.mode, "input": name, "size": list(INPUTS[name]),
            "repeats": repeats, **turn_fields(times), **host_rss_gib()}  # fmt: skip


def table(env: dict, rows: list[dict]) -> str:
    versions = turn_versions(env)
    lines = [
        f"# Segmenter end to end on images: logits and predict ({env['date']})",
        "",
        f"{env['device']} ({env['threads']} CPU threads); {versions}; commit {env['commit']}; host memory "
        f"{env.get('host_memory', 'glibc default')}. Random weights, 150 "
        "classes, batch 1; uint8 images through the official test pipeline (ade: 683x512, which the ResNets' test "
        "scale (2048, 512) leaves as it is and ViT-B/16's (2048, 640) resizes to 854x640; photo: 2048x1536) or a "
        "normalised float batch (float: 512x512). Medians (min) in ms; "
        "predict's labels equal the logits' argmax in every round. RSS: the process's resident memory after the "
        "row, and its peak so far (GiB).",
        "",
        "| arch | dtype | mode | input | size | logits | predict | RSS (peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = turn_cells(r, CALLS)
        now, peak = (("?" if r.get(k) is None else f"{r[k]:.2f}") for k in ("rss_gib", "peak_rss_gib"))
        rss = f"{now} ({peak})"
        lines.append(f"| {r['arch']} | {r['dtype']} | {r.get('mode', 'whole')} | {r['input']} | "
                     f"{r['size'][1]}x{r['size'][0]} | {cells} | {rss} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS, default=["RN50"])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
                        help="default: float32 and bfloat16 on a CPU, bfloat16 on a GPU")  # fmt: skip
    parser.add_argument("--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS))
    parser.add_argument("--modes", nargs="+", choices=("whole", "slide"), default=["whole"])
    parser.add_argument("--retain-memory", action="store_true",
                        help="keep freed host memory for reuse (denseclip_fast.engine.host_memory; what "
                             "denseclip-fast segment does on a CPU): fewer page faults per call")  # fmt: skip
    turn_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.retain_memory and not host_memory.retain_freed_memory():
        parser.error(f"--retain-memory: not in effect here ({host_memory.describe()})")
    device = turn_device(parser, args)
    dtypes = args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    if "float16" in dtypes and device.type != "cuda":
        parser.error("--dtypes float16 needs --device cuda (the engine computes float16 on CUDA only)")
    results = Results(args.out, "predict", args.tag, environment(device), {"args": vars(args)}, table)
    for arch in args.archs:
        torch.manual_seed(0)
        model = randomize_(dcf.DenseCLIP.from_arch(arch)).eval()
        for dtype in dtypes:
            for mode in args.modes:
                seg = dcf.Segmenter(model, device=device, dtype=getattr(torch, dtype), mode=mode)
                for name in args.inputs:
                    results.add(run_case(seg, arch, dtype, name, args.repeats))
                    r = results.rows[-1]
                    print(f"{arch} {dtype} {mode} {name}: logits {r['logits_median_ms']:.1f} ms, predict "
                          f"{r['predict_median_ms']:.1f} ms", flush=True)  # fmt: skip
                del seg
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

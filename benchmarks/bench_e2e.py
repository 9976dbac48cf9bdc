"""End-to-end timing of DenseCLIP inference.

At this stage it times the plain model (random weights, eval mode, text embeddings cached after the first call) at
one size on the machine's default device and prints one line; ``--json PATH`` also writes the numbers with the
machine, torch and device names. The engine and the official-pipeline contestants join later.

    python benchmarks/bench_e2e.py [--arch RN50] [--size 512] [--classes 150] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import cpu_name  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(arch: str, size: int, classes: int, batch: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    names = list(dcf.ADE20K_CLASSES[:classes]) if classes <= 150 else [f"class {i}" for i in range(classes)]
    model = dcf.DenseCLIP.from_arch(arch, names).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        model(x)  # includes the text encoder, whose output is then cached
        _sync(device)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return {
        "arch": arch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": batch,
        "size": size,
        "classes": classes,
        "first_call_ms": first * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "repeats": repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="RN50", choices=dcf.config.ARCHS)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    r = time_model(args.arch, args.size, args.classes, args.batch, args.repeats, torch.device(args.device))
    print(
        f"{r['arch']} {r['device']} ({r['device_name']}, {r['threads']} threads) fp32 eager, "
        f"{r['batch']}x3x{r['size']}x{r['size']}, K={r['classes']}, whole image: "
        f"median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms over {r['repeats']} runs "
        f"(first call with the text encoder {r['first_call_ms']:.1f} ms), torch {r['torch']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

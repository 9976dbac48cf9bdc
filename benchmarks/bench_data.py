"""The training data pipeline's throughput: can the DataLoader feed the training step?

    python benchmarks/bench_data.py                   # workers 1, 2, 4, ... up to the CPU count
    python benchmarks/bench_data.py --workers 4 8 --images 64

A synthetic data set in the generic layout (ADE20K-like 512x683 JPEG images, 150-class PNG labels of blocky
regions, written to a temporary directory) goes through ``SegmentationData`` and the official augmentation
(keep-ratio resize x[0.5, 2], crop 512 with cat_max_ratio, flip, photometric distortion, normalisation) as the
trainer runs it. Reported: the per-sample time in one process, split into reading (decode) and augmenting, and the
samples/s of a DataLoader (batch 16, as the trainer's) per worker count. A training run is data-bound when its step
consumes more images/s (bench_train.py) than its loader makes. Writes JSON and markdown to benchmarks/results/
(data_<tag>.*; the tag defaults to cpu_smoke, so name a GPU machine's run with --tag).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Results, environment  # noqa: E402
from denseclip_fast.train import SegmentationData, TrainConfig  # noqa: E402
from denseclip_fast.train.data import TrainSampler  # noqa: E402


def make_dataset(root: str, images: int, size: tuple[int, int], classes: int) -> None:
    """``images`` JPEGs (noise over smooth colour regions) with labels of 32x32-pixel blocks of random classes."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    h, w = size
    for i in range(images):
        blocks = rng.integers(0, classes, size=(-(-h // 32), -(-w // 32)))
        label = np.kron(blocks, np.ones((32, 32), dtype=np.int64))[:h, :w].astype(np.uint8)
        colours = rng.integers(0, 256, size=(classes, 3))
        image = np.clip(colours[label] + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "images", f"img_{i:04d}.jpg"), quality=90)
        Image.fromarray(label).save(os.path.join(root, "labels", f"img_{i:04d}.png"))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(f"class {k}" for k in range(classes)) + "\n")


def per_sample(data: SegmentationData, count: int) -> dict:
    """Median ms of reading (decode image and label) and of the whole item (read + augmentation), one process."""
    read, whole = [], []
    for position in range(count):
        index = position % len(data)
        tic = time.perf_counter()
        data.read(index)
        read.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        data[(index, position)]
        whole.append(time.perf_counter() - tic)
    read_ms, whole_ms = 1e3 * statistics.median(read), 1e3 * statistics.median(whole)
    return {"read_ms": read_ms, "augment_ms": whole_ms - read_ms, "sample_ms": whole_ms}


def loader_rate(data: SegmentationData, workers: int, batch: int, batches: int) -> dict:
    """Samples/s of the trainer's DataLoader in its steady state: the batches its workers start on together at
    start-up (2 each, the prefetch) are taken untimed, then at least 2 per worker are timed, each one made while
    the clock runs."""
    loader = DataLoader(data, batch_size=batch, sampler=TrainSampler(len(data), seed=0), num_workers=workers,
                        persistent_workers=workers > 0)  # fmt: skip
    it = iter(loader)
    for _ in range(max(1, 2 * workers)):
        next(it)
    timed = max(batches, 2 * workers)
    tic = time.perf_counter()
    for _ in range(timed):
        next(it)
    seconds = time.perf_counter() - tic
    del it, loader
    return {"workers": workers, "batches": timed, "samples_per_s": batch * timed / seconds}


def table(env: dict, meta: dict, rows: list[dict]) -> str:
    args = meta["args"]
    lines = [
        f"# Training data pipeline, {args['height']}x{args['width']} JPEGs, crop {args['crop']} ({env['date']})",
        "",
        f"{env['device']} ({os.cpu_count()} CPUs); torch {env['torch']}, numpy {np.__version__}. The official "
        "augmentation through SegmentationData, as the trainer runs it.",
        "",
    ]
    single = next((r for r in rows if "sample_ms" in r), None)
    if single:
        lines += [f"One process: {single['sample_ms']:.1f} ms a sample ({single['read_ms']:.1f} ms reading, "
                  f"{single['augment_ms']:.1f} ms augmenting; median of {args['samples']}).", ""]  # fmt: skip
    lines += ["| DataLoader workers | samples/s |", "|---|---|"]
    lines += [f"| {r['workers']} | {r['samples_per_s']:.1f} |" for r in rows if "workers" in r]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic images (default 32)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=683)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--samples", type=int, default=24, help="samples timed in one process (default 24)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4,
                        help="batches timed per worker count (default 4; at least 2 per worker)")  # fmt: skip
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1, 2, 4, ... up to the CPUs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", help="file name tag (default: cpu_smoke)")
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))  # this process's CPUs: in a container os.cpu_count() may be the host's
    args.workers = args.workers or [n for n in (1, 2, 4, 8, 16, 32) if n <= cpus]
    meta = {"args": vars(args)}
    env = environment(torch.device("cpu"))  # a CPU benchmark wherever it runs: the machine is the CPU
    results = Results(args.out, "data", args.tag, env, meta, lambda env, rows: table(env, meta, rows))
    cfg = TrainConfig(crop=args.crop)
    with tempfile.TemporaryDirectory() as root:
        make_dataset(root, args.images, (args.height, args.width), 150)
        data = SegmentationData(root, "generic", "train", cfg)
        results.add(per_sample(data, args.samples))
        print(f"one process: {results.rows[-1]['sample_ms']:.1f} ms a sample", flush=True)
        for workers in args.workers:
            results.add(loader_rate(data, workers, args.batch, args.batches))
            print(f"{workers} workers: {results.rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

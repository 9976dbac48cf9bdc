"""What reading a torch checkpoint safely costs, stage by stage (a benchmark of the CPU, in one process).

    python benchmarks/bench_checkpoint_read.py                              # RN50, official .pth (zip), 5 rounds
    python benchmarks/bench_checkpoint_read.py --archs RN50 ViT-B/16 --formats zip legacy --repeats 7

``load_checkpoint`` reads a torch file (``checkpoints.io.read_weight_file``) in stages before and after
``torch.load(weights_only=True)`` itself: for a zip file (what torch.save writes since torch 1.6, the released
weights' format) its index (each entry stored, no name twice), the CRC-32 of every entry (torch.load checks none),
the shape of its pickle (``checkpoints.pickle_shape``: nesting, object count and memo indices measured from the
opcodes before any unpickler reads them), then torch.load, then the tensors' views checked against their storages
(read_weight_file checks the CRC-32s in a thread of its own meanwhile: its whole time is less than the stages'
sum); for the legacy format (torch.save's ``_use_new_zipfile_serialization=False``) the pickle check of its five
pickles, torch.load and the views. This writes a random-weight checkpoint per architecture and format (mmcv's layout:
``{'meta', 'state_dict'}``), then times each stage, the whole ``read_weight_file``, the whole ``load_checkpoint``
(the model built and filled too) and, for comparison, a bare ``torch.load(path, weights_only=True)``, taking turns
(``common.take_turns``: one untimed round, then ``--repeats`` rounds, each call once a round). The files were just
written: they are read from the page cache, not the disk. Writes JSON and markdown (checkpoint_read_<tag>.*).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.bench_startup import build  # noqa: E402
from benchmarks.common import Results, arch_name, environment, take_turns, turn_arguments, turn_fields  # noqa: E402
from benchmarks.official import save_mmcv_checkpoint  # noqa: E402
from denseclip_fast.checkpoints import io  # noqa: E402

FORMATS = ("zip", "legacy")
# (stage, formats it is a part of), in the order read_weight_file runs them
STAGES = (
    ("zip index", ("zip",)),
    ("CRC-32", ("zip",)),
    ("pickle check", ("zip", "legacy")),
    ("torch.load", ("zip", "legacy")),
    ("views check", ("zip", "legacy")),
)
WHOLE = ("read_weight_file", "load_checkpoint", "bare torch.load")


def write_checkpoint(arch: str, fmt: str, folder: str) -> str:
    """bench_startup's build(arch) saved as mmcv's save_checkpoint lays it out, in ``fmt`` (zip: torch.save's
    default; legacy: its format before torch 1.6)."""
    model = build(arch)
    path = os.path.join(folder, f"{arch.replace('/', '-')}_{fmt}.pth")
    save_mmcv_checkpoint(model, path, model.class_names, legacy=fmt == "legacy")
    return path


def zip_index(path: str, size: int) -> None:
    """read_weight_file's checks of a zip file's index: its entries read, no name twice, each stored."""
    entries = io._zip_entries(path, path)
    if entries is None:
        raise RuntimeError(f"{path} is not a zip file")
    io._check_names_once(entries, path)
    for entry in entries:
        io._check_stored(entry, path, size)


def legacy_pickles(path: str, size: int) -> None:
    """read_weight_file's pickle check of a legacy file (its five pickles, one after another)."""
    with open(path, "rb") as f:
        for _ in range(io.LEGACY_PICKLES):
            io._check_pickle(path, lambda: io.check_pickle(f, size - f.tell()))


def stage_calls(path: str, fmt: str) -> dict[str, Callable[[], Any]]:
    """The calls timed for one file: its format's stages, then the wholes."""
    size = os.path.getsize(path)
    loaded = io._torch_load(path, path, size)  # the views check's input, loaded once
    calls: dict[str, Callable[[], Any]] = {}
    if fmt == "zip":
        entries = io._zip_entries(path, path) or []
        calls["zip index"] = lambda: zip_index(path, size)
        calls["CRC-32"] = lambda: io._check_crcs(path, path, entries)
        calls["pickle check"] = lambda: io._check_zip_pickles(path, path, entries)
    else:
        calls["pickle check"] = lambda: legacy_pickles(path, size)
    calls["torch.load"] = lambda: io._torch_load(path, path, size)
    calls["views check"] = lambda: io._checked_views(loaded, path)
    calls["read_weight_file"] = lambda: io.read_weight_file(path)
    calls["load_checkpoint"] = lambda: dcf.load_checkpoint(path)
    calls["bare torch.load"] = lambda: torch.load(path, map_location="cpu", weights_only=True)
    return calls


def table(env: dict, rows: list[dict]) -> str:
    names = [stage for stage, _ in STAGES] + list(WHOLE)
    lines = [
        f"# Reading a torch checkpoint safely, stage by stage ({env['date']})",
        "",
        f"{env['device']} ({env['threads']} threads); torch {env['torch']}, Python {env['python']}; commit "
        f"{env['commit']}. Random weights in mmcv's layout, 150 ADE20K class names. Milliseconds: median (min) over "
        "the timed rounds (take_turns: each call once a round, after one untimed round); files in the page cache. "
        "The stages are read_weight_file's, in its order; `load_checkpoint` also builds and fills the model; `bare "
        "torch.load` is `torch.load(path, weights_only=True)` alone. `zip`: torch.save's format (the released "
        "weights'); `legacy`: torch.save's format before torch 1.6.",
        "",
        "| arch | file | MB | " + " | ".join(names) + " | rounds |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for r in rows:
        cells = [f"{r[f'{n}_median_ms']:.1f} ({r[f'{n}_min_ms']:.1f})" if f"{n}_median_ms" in r else "-" for n in names]
        lines.append(f"| {r['arch']} | {r['format']} | {r['mb']:.0f} | {' | '.join(cells)} | {r['rounds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS, default=["RN50"])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=["zip"])
    turn_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device != "cpu":
        parser.error(f"--device: reading a checkpoint is the CPU's work; only cpu is timed, got {args.device!r}")
    results = Results(args.out, "checkpoint_read", args.tag, environment(torch.device("cpu")), {"args": vars(args)},
                      table)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_read_") as folder:
        for arch in args.archs:
            for fmt in args.formats:
                path = write_checkpoint(arch, fmt, folder)
                times, _ = take_turns(stage_calls(path, fmt), args.repeats, torch.device("cpu"))
                results.add({"arch": arch, "format": fmt, "mb": os.path.getsize(path) / 1e6, "rounds": args.repeats,
                             **turn_fields(times), "samples_ms": times})  # fmt: skip
                row = results.rows[-1]
                print(f"{arch} {fmt}: pickle check {row['pickle check_median_ms']:.1f} ms, torch.load "
                      f"{row['torch.load_median_ms']:.1f} ms, read_weight_file {row['read_weight_file_median_ms']:.1f} "
                      "ms", flush=True)  # fmt: skip
                os.remove(path)
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

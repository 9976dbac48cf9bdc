"""CRC-32 throughput: the extension's carry-less multiplication against zlib's (a benchmark of one CPU thread).

    python benchmarks/bench_crc.py                                   # 4 KiB, 1 MiB and 256 MiB buffers, 5 rounds
    python benchmarks/bench_crc.py --sizes 1048576 --repeats 9

The checkpoints' CRC-32s (``denseclip_fast/checkpoints/crc.py``: each tensor of a native file at every save and
load, each entry of a torch zip file at every load) are zlib's values, computed by ``denseclip_fast._C.crc32``
(``csrc/cpu/crc32.cpp``) where the extension is built and the processor has PCLMULQDQ. This times it against
``zlib.crc32`` on buffers of random bytes (the largest bigger than the caches, as a checkpoint's weights are; the
smaller ones stay in them between calls), in turns (``common.take_turns``: one untimed round, then ``--repeats``
rounds, each call once a round) in the calling thread, a timed call checksumming a small buffer as many times as
make 64 MiB (Python's call costs ~0.1 us of each); the two results are compared in every round. GB/s from the
median time. Writes JSON and markdown (crc_<tag>.*).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Results, environment, take_turns, turn_arguments, turn_fields  # noqa: E402
from denseclip_fast.ops.extension import extension_module  # noqa: E402

SIZES = (4 << 10, 1 << 20, 256 << 20)  # bytes
PER_CALL = 64 << 20  # bytes a timed call checksums at least: a small buffer is checksummed again and again
CONTESTANTS = ("zlib", "extension")


def table(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# CRC-32: the extension's carry-less multiplication against zlib's ({env['date']})",
        "",
        f"{env['device']}, one thread; torch {env['torch']}, Python {env['python']}, zlib "
        f"{rows[0]['zlib_version'] if rows else '?'}; commit {env['commit']}. Random bytes; GB/s from the median "
        "time (in brackets, from the shortest) over the timed rounds (take_turns); the two CRCs compared every round.",
        "",
        "| bytes | calls a timing | zlib GB/s | extension GB/s | extension / zlib | carry-less mult. | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        z, e = r["zlib_gbs"], r["extension_gbs"]
        lines.append(f"| {r['bytes']} | {r['calls_a_round']} | {z:.2f} ({r['zlib_best_gbs']:.2f}) | {e:.2f} "
                     f"({r['extension_best_gbs']:.2f}) | {e / z:.2f}x | {'yes' if r['clmul'] else 'no'} | "
                     f"{r['rounds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="buffer sizes in bytes")
    turn_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if any(size < 1 for size in args.sizes):
        parser.error(f"--sizes must be >= 1 byte each, got {args.sizes}")
    if args.device != "cpu":
        parser.error(f"--device: a CRC is the CPU's work; only cpu is timed, got {args.device!r}")
    module = extension_module()
    if module is None or not hasattr(module, "crc32"):
        parser.error("the extension denseclip_fast._C (with crc32) is not built: run make setup")
    results = Results(args.out, "crc", args.tag, environment(torch.device("cpu")), {"args": vars(args)}, table)
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().data
        count = max(1, PER_CALL // size)
        calls = {"zlib": lambda data=data, count=count: [zlib.crc32(data) for _ in range(count)][-1],
                 "extension": lambda data=data, count=count: [module.crc32(data) for _ in range(count)][-1]}

        def same(outputs: dict) -> None:
            if outputs["zlib"] != outputs["extension"]:
                raise AssertionError(f"the CRC-32s of {size} bytes differ: {outputs}")

        times, _ = take_turns(calls, args.repeats, torch.device("cpu"), same)
        fields = turn_fields(times)
        row = {"bytes": size, "calls_a_round": count, "rounds": args.repeats,
               "clmul": bool(getattr(module, "CRC32_CLMUL", 0)), "zlib_version": zlib.ZLIB_RUNTIME_VERSION,
               **fields, "samples_ms": times}  # fmt: skip
        for name in CONTESTANTS:
            row[f"{name}_gbs"] = size * count / fields[f"{name}_median_ms"] / 1e6
            row[f"{name}_best_gbs"] = size * count / fields[f"{name}_min_ms"] / 1e6
        results.add(row)
        print(f"{size} bytes: zlib {row['zlib_gbs']:.2f} GB/s, extension {row['extension_gbs']:.2f} GB/s", flush=True)
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a run is launched: torchrun's environment checked, the process group and device of each process, and the
process-wide cuDNN setting a run holds while it runs."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from .config import TrainConfig


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set for the run and restored after it (a process-wide flag)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def launch_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0) where unset. Each must
    be a non-negative integer, WORLD_SIZE at least 1 and RANK below it, and RANK comes with WORLD_SIZE: a ValueError
    names the variable and its value otherwise. Unchecked, RANK=1 alone ran a whole run as a non-zero rank, which
    saves nothing, and RANK >= WORLD_SIZE or WORLD_SIZE=0 failed deep in the sampler or the batch split."""
    values: dict[str, int] = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = environ.get(name)
        if text is None:
            continue
        if not (text.strip().isascii() and text.strip().isdigit()):  # int() would also take "+1", "1_0", "١"
            raise ValueError(f"environment variable {name}={text!r} must be a non-negative integer (set by torchrun; "
                             "unset it for a run in one process)")  # fmt: skip
        values[name] = int(text)
    if values.get("WORLD_SIZE") == 0:
        raise ValueError("environment variable WORLD_SIZE='0' must be at least 1 (the number of processes)")
    if "RANK" in values and "WORLD_SIZE" not in values:
        raise ValueError(f"environment variable RANK={environ['RANK']!r} is set but WORLD_SIZE is not: set both (as "
                         "torchrun does) or neither (a run in one process)")  # fmt: skip
    world = values.get("WORLD_SIZE", 1)
    if world > 1 and "RANK" not in values:
        raise ValueError(f"environment variable WORLD_SIZE={environ['WORLD_SIZE']!r} is set but RANK is not: set both "
                         "(as torchrun does) or neither (a run in one process)")  # fmt: skip
    rank = values.get("RANK", 0)
    if rank >= world:
        raise ValueError(f"environment variable RANK={environ['RANK']!r} must be below WORLD_SIZE="
                         f"{environ['WORLD_SIZE']!r} (ranks are 0..WORLD_SIZE-1)")  # fmt: skip
    return rank, world, values.get("LOCAL_RANK", 0)


@contextlib.contextmanager
def distributed(cfg: TrainConfig) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world, device); a process group when launched by torchrun (WORLD_SIZE > 1)."""
    rank, world, local = launch_environment()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    finished = False
    try:
        yield rank, world, device
        finished = True
    finally:
        if started:
            if finished:  # every rank done with its collectives before the group goes (after a failure it would hang)
                dist.barrier()
            gc.collect()  # DDP's reducer, kept by reference cycles, is freed while its process group still exists
            dist.destroy_process_group()

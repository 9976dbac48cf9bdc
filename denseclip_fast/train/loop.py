"""The training loop: one process or many (torchrun), gradient accumulation, bf16 autocast, checkpoints, resume.

    from denseclip_fast.train import TrainConfig, train
    train(TrainConfig(arch="RN50", data="ADEChallengeData2016", init="RN50.pt", batch_size=32, accum=4))

Per iteration: ``accum`` micro-batches of batch_size / (world * accum) images per process; their losses are
averaged (DDP averages over processes, gradient synchronisation only on the last micro-batch); AdamW steps once.
The model runs through the fused operators (their backward kernels) exactly as in inference; the text encoder is
frozen but runs every step, since the learned contexts go through it.

Work dir: ``iter_<N>.safetensors`` (the model in the project's format: ``denseclip_fast.load_checkpoint`` reads it),
``iter_<N>.state.pt`` (optimiser, scaler, iteration, random state; tensors and plain data only, read with
``weights_only=True``), ``latest.json``, ``metrics.csv`` (iter, loss, loss_decode, loss_aux, lr, images_per_s,
seconds), ``eval.csv`` and ``config.json``; TensorBoard events when the ``tensorboard`` package is installed;
``.lock``, which a run holds (flock) while it runs, so that a second run in the same work dir is refused.
Checkpoint files and ``latest.json`` are written to a temporary name and renamed, so a run killed while saving
leaves ``latest.json`` pointing at the previous, complete checkpoint.
Resuming (``resume="auto"`` or a ``.state.pt`` path) restores the model, optimiser, schedule, scaler, iteration,
random state and the position in the data stream, so it ends where an uninterrupted run ends. The optimiser's
settings and the schedule are this run's config's: a changed lr, weight decay, backbone lr multiplier or schedule
field applies from the iteration resumed at (said on stderr).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import gc
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoints import ClassCountError, load_checkpoint
from ..checkpoints.io import PARTIAL_SUFFIX, CheckpointError, read_weight_file, replaced_atomically
from ..checkpoints.native import is_native, native_contents
from ..config import DenseCLIPConfig
from ..model import DenseCLIP
from .config import TrainConfig
from .data import SegmentationData, TrainSampler
from .evaluate import check_image_sizes, evaluate, results_json
from .optim import freeze_text_encoder, make_optimizer, segmentation_loss, set_learning_rates, short_run_warning

LOSSES = ("loss", "loss_decode", "loss_aux")
METRIC_COLUMNS = ["iter", *LOSSES, "lr", "images_per_s", "seconds"]


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The layout of a run's images and convolution weights: channels_last where cfg.channels_last says (None: on
    CUDA), else NCHW."""
    nhwc = device.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def prepare_model(model: DenseCLIP, cfg: TrainConfig, device: torch.device) -> DenseCLIP:
    """The model as a run trains it: text encoder frozen, on ``device``, in train mode, channels_last weights where
    the run uses them (the parameters keep their names and values), gradient checkpointing if asked."""
    freeze_text_encoder(model)
    model.to(device).train()
    if memory_format(cfg, device) == torch.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    return model


class TrainStep(nn.Module):
    """What DDP wraps: images -> (head logits at the head's resolution, 1/4 of the input; score map / tau). The loss
    upsamples both to the label in float32, as mmseg's ``force_fp32`` losses do: under bf16 autocast an upsampling
    inside the model would round the full-size logits to bfloat16 first."""

    def __init__(self, model: DenseCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        feats = model.extract(x)
        logits, score = model.logits_and_score(feats, model.context_prompt(feats, model.class_embeddings()), None)
        return logits, score / model.config.tau


@contextlib.contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """The running statistics of module's BatchNorms left as they are (momentum 0, the batch count restored): the
    recomputation of a checkpointed block in the backward pass runs it in training mode a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:  # saved from the buffer, so the BatchNorm has one
                assert m.num_batches_tracked is not None
                m.num_batches_tracked.copy_(count)


def _checkpointed(forward: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    contexts = lambda: (contextlib.nullcontext(), _batchnorm_statistics_kept(module))  # noqa: E731
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def enable_gradient_checkpointing(model: DenseCLIP) -> int:
    """Recompute the activations of every backbone stage / transformer block in the backward pass (the parameter
    names do not change). Returns how many modules were wrapped."""
    blocks: list[nn.Module] = []
    backbone = model.backbone
    if hasattr(backbone, "layer1"):
        blocks += [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    if hasattr(backbone, "transformer"):
        transformer: Any = backbone.transformer  # the ViT backbone's (backbone is typed as a plain nn.Module)
        blocks += list(transformer.resblocks)
    blocks += list(model.text_encoder.transformer.resblocks)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward, block)
    return len(blocks)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
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
def _batchnorm_advice(cfg: TrainConfig, images: int, world: int) -> Iterator[None]:
    """BatchNorm's error for a layer that sees one value per channel (a crop that leaves one pixel at the network's
    1/32 level, with one image per step) as a ValueError that names the options to change."""
    try:
        yield
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise ValueError(
            f"crop {cfg.crop} leaves one pixel at the network's 1/32 level, where BatchNorm sees {images} image(s) "
            f"per step (batch_size {cfg.batch_size} over {world} process(es) x accum {cfg.accum}): one value per "
            "channel, which it cannot normalise; use --crop 64 or more, or more images per step"
        ) from None


@contextlib.contextmanager
def _distributed(cfg: TrainConfig) -> Iterator[tuple[int, int, torch.device]]:
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


LOCK_FILE = ".lock"  # in the work dir, holding the PID of the run that holds it


@contextlib.contextmanager
def work_dir_lock(work_dir: str) -> Iterator[Callable[[int], None] | None]:
    """An exclusive ``flock`` on ``work_dir``/.lock for as long as the context lasts, the file holding this
    process's PID: two runs in one work dir at once interleaved metrics.csv, overwrote each other's checkpoints and
    deleted each other's ``.partial`` files. ValueError naming the work dir and the holder's PID when another run
    holds it. The kernel drops the lock when its process ends, however it ends, so a killed run leaves no stale lock;
    the file stays (removing it would let a third run lock a new file while the second still holds the removed one).
    No locking on Windows (no fcntl), nor, with a warning, on a file system that refuses flock.

    Yields the ``worker_init_fn`` for DataLoaders made meanwhile (None when nothing is locked): the flock belongs to
    the open file, which forked workers share, so a run killed outright (SIGKILL, the OOM killer) kept its work dir
    locked until its workers noticed, 5 s later; each worker closes its copy as it starts."""
    if sys.platform == "win32":
        yield None
        return
    import fcntl

    path = os.path.join(work_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()  # empty while the holder is writing it
            pid = f" (PID {holder})" if holder.isdigit() else ""
            raise ValueError(f"work dir {work_dir!r} is in use by another run{pid}: wait for it to end, or start this "
                             "run in another --work-dir") from None  # fmt: skip
        except OSError as exc:  # e.g. ENOLCK, EOPNOTSUPP: some network and FUSE file systems
            warnings.warn(f"cannot lock {path} ({exc.strerror or exc}): nothing keeps another run from using this "
                          "work dir at the same time", stacklevel=3)  # fmt: skip
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield functools.partial(_close_copy, fd, os.fstat(fd)) if locked else None
        finally:
            if locked:
                os.ftruncate(fd, 0)  # no PID of a run that has ended
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: forked DataLoader workers share this descriptor
    finally:
        os.close(fd)


def _close_copy(fd: int, opened: os.stat_result, worker_id: int) -> None:
    """A DataLoader worker's copy of the work-dir lock's descriptor, closed; only if ``fd`` is that file here (a
    worker started by spawn or forkserver inherits no descriptors: the number may be another file's)."""
    with contextlib.suppress(OSError):
        here = os.fstat(fd)
        if (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino):
            os.close(fd)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)`` for the saved moments and step counts, keeping this optimizer's group
    settings, which load_state_dict would take from the saved groups: its hyperparameters (``initial_lr``,
    ``weight_decay``, ...: this run's config, as the schedule's other fields are; the saved ones would be applied
    while every log showed the config's) and its implementation choices (``fused``, ``foreach``, ...: a state saved
    on a CPU, or before the fused AdamW, would turn the CUDA run's fused optimizer off). ValueError saying how when
    the saved groups hold other parameters than this optimizer's (load_state_dict's own error names neither group
    nor parameter)."""
    difference = _group_difference(saved["param_groups"], optimizer.param_groups)
    if difference:
        raise ValueError(f"its optimizer state does not fit this run's parameters: {difference}")
    groups = [{**group, **{k: v for k, v in own.items() if k != "params"}}
              for group, own in zip(saved["param_groups"], optimizer.param_groups)]  # fmt: skip
    optimizer.load_state_dict({**saved, "param_groups": groups})


def _group_difference(saved: list[dict[str, Any]], mine: list[dict[str, Any]]) -> str:
    """How saved parameter groups differ from this optimizer's in what they hold ("" when they do not): the number
    of groups, of parameters in a group, or their names (param_groups' ``names``, where both have them)."""
    if len(saved) != len(mine):
        return f"{len(saved)} parameter groups were saved, this run has {len(mine)}"
    for i, (theirs, own) in enumerate(zip(saved, mine)):
        names, own_names = theirs.get("names"), own.get("names")
        sizes = (f"parameter group {i} was saved with {len(theirs['params'])} parameters, this run's has "
                 f"{len(own['params'])}")  # fmt: skip
        if names is not None and own_names is not None and names != own_names:
            only = [n for n in names if n not in own_names] or [n for n in own_names if n not in names]
            return f"{sizes} ({f'e.g. {only[0]} is in only one of them' if only else 'in another order'})"
        if len(theirs["params"]) != len(own["params"]):
            return sizes
    return ""


def _saved_contents(weights: str) -> tuple[DenseCLIPConfig, list[str]] | None:
    """The architecture and class names in the metadata of a model file written by train (its tensors are not
    read); None when the file cannot be opened as safetensors or is not in this project's format: loading it says
    why."""
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception:  # missing, truncated, another format: load_checkpoint names the file and the reason
        return None
    return native_contents(metadata, weights)[:2] if is_native(metadata) else None


def _check_class_names(path: str, saved: list[str], mine: list[str], data: str, rank: int) -> None:
    """A resume whose data set names a class with a name the saved run gave another position is refused (classes
    in another order, with or without renames): the head's outputs and the labels would swap meanings. Other
    renames (a prompt reworded) go on, said on stderr: the outputs keep their positions, and the text encoder
    embeds the new names."""
    if saved == mine:
        return
    known = set(saved)
    moved = next((i for i, (a, b) in enumerate(zip(saved, mine)) if a != b and b in known), None)
    if moved is not None:
        raise ValueError(
            f"{path} was saved by a run whose classes are in another order than this data set's ({data}): class "
            f"{moved} was {saved[moved]!r} and is {mine[moved]!r}, the saved run's class {saved.index(mine[moved])}; "
            "the head's outputs and the labels would swap meanings: resume with the saved run's classes.txt order, "
            "or start this run in a new --work-dir"
        )
    if rank == 0:
        renamed = [f"{i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(saved, mine)) if a != b]
        listed = ", ".join(renamed[:5]) + (f", ... ({len(renamed)} in all)" if len(renamed) > 5 else "")
        print(f"denseclip-fast train: resuming from {path} with class names other than the saved run's ({listed}): "
              "each output keeps its position, and the new names are embedded from now on", file=sys.stderr)


def _architecture_difference(saved: DenseCLIPConfig, mine: DenseCLIPConfig, limit: int = 3) -> tuple[str, str]:
    """The fields in which two architectures differ, as ("fpn_channels 16", "fpn_channels 32"); at most ``limit``."""
    a, b = _flat(saved.to_dict()), _flat(mine.to_dict())
    keys = [k for k in a if a[k] != b.get(k)] + [k for k in b if k not in a]
    more = ", ..." if len(keys) > limit else ""
    listed = [", ".join(f"{k} {d.get(k)!r}" for k in keys[:limit]) + more for d in (a, b)]
    return listed[0], listed[1]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# what a resumed run takes from its own config though the saved run had other values (said on stderr): the
# optimizer's settings and the schedule, from the iteration it resumes at (e.g. a lower lr after a non-finite loss)
RESUME_FOLLOWS = ("lr", "weight_decay", "backbone_lr_mult", "iters", "warmup_iters", "warmup_ratio", "min_lr",
                  "poly_power")  # fmt: skip
SCHEDULE = ("lr", "iters", "warmup_iters", "warmup_ratio", "min_lr", "poly_power")  # of those, learning_rate's
RESUME_FILE = "a training state file: the iter_N.state.pt that train writes beside each iter_N.safetensors"
STATE_ENTRIES: dict[str, type] = {"iteration": int, "optimizer": dict, "scaler": dict, "rng": list, "config": str}


def read_train_state(path: str) -> dict[str, Any]:
    """What an ``iter_N.state.pt`` holds, read as every weight file is (tensors and plain data only, no code run),
    its entries checked. Anything else (another kind of file, a damaged or crafted one) is a CheckpointError naming
    the file and what a resume file is; never torch's advice to load it with weights_only=False."""
    try:
        wf = read_weight_file(path)
    except CheckpointError as exc:
        raise CheckpointError(path, f"cannot resume from it ({exc.reason}); --resume takes {RESUME_FILE}") from None
    if wf.kind != "torch":
        found = "a .safetensors model file" if wf.kind == "safetensors" else "a TorchScript archive"
        raise CheckpointError(path, f"cannot resume from it: it is {found}; --resume takes {RESUME_FILE}")
    state = wf.obj
    if not isinstance(state, dict):
        raise CheckpointError(path, f"cannot resume from it: it holds a {type(state).__name__}; --resume takes "
                                    f"{RESUME_FILE}")  # fmt: skip
    bad = [f"{key} ({kind.__name__})" for key, kind in STATE_ENTRIES.items()
           if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]  # fmt: skip
    if not bad and not isinstance(_json_or_none(state["config"]), dict):
        bad.append("config (a JSON object)")
    if not bad and not all(isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor) for r in state["rng"]):
        bad.append("rng (a list of {'cpu': tensor, ...})")
    if bad:
        raise CheckpointError(path, f"cannot resume from it: missing or malformed entries {', '.join(bad)}; "
                                    f"--resume takes {RESUME_FILE}")  # fmt: skip
    return state


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def next_batch(batches: Iterator[Any]) -> Any:
    """The next batch; a data error raised in a DataLoader worker comes back as the worker's own one-line message
    (which names the file), not as the worker's traceback."""
    try:
        return next(batches)
    except ValueError as exc:
        text = str(exc)
        if "DataLoader worker" not in text:
            raise
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        raise ValueError(last.removeprefix("ValueError: ")) from None


def _weights_beside(state: str) -> str:
    """The iter_N.safetensors (path or name) that train writes beside the training state iter_N.state.pt."""
    return state.removesuffix(".state.pt") + ".safetensors"


def _iteration(name: str) -> int:
    """N of a work dir's ``iter_N.*`` file name (-1 when N is not a number)."""
    number = name.removeprefix("iter_").split(".", 1)[0]
    return int(number) if number.isdigit() else -1


def build_model(cfg: TrainConfig, class_names: list[str]) -> DenseCLIP:
    torch.manual_seed(cfg.seed)
    model = DenseCLIP(cfg.model_config(), class_names)
    if cfg.init != "none":
        from ..checkpoints.clip import init_from_clip

        init_from_clip(model, cfg.init)
    return model


class Trainer:
    """Holds one run's state; :meth:`run` trains to ``cfg.iters``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        cfg = dataclasses.replace(cfg)  # validate() fills the sizes left to the architecture: in a copy, so that the
        # caller's config keeps following its arch (a sweep that changes arch and trains again)
        self.sizes_left_to_arch = [name for name in ("crop", "img_scale") if getattr(cfg, name) is None]
        cfg.validate()
        self.cfg = cfg
        self.resume = resume
        self._state: dict[str, Any] | None = None  # the resume file, read once
        self._changed: dict[str, str] = {}  # RESUME_FOLLOWS settings that differ from the saved run's: what to say

    # ------------------------------------------------------------------ files

    def _path(self, name: str) -> str:
        return os.path.join(self.cfg.work_dir, name)

    def _find_resume(self) -> str | None:
        if self.resume in (None, "", "none"):
            return None
        if self.resume == "auto":
            latest = self._path("latest.json")
            if not os.path.isfile(latest):
                return None
            try:
                with open(latest, encoding="utf-8") as f:
                    found = os.path.join(self.cfg.work_dir, json.load(f)["state"])
            except (ValueError, KeyError, TypeError) as exc:  # not JSON, no "state", not a file name
                raise ValueError(f"--resume auto: {latest} is damaged ({type(exc).__name__}: {exc}); resume from an "
                                 "iter_N.state.pt of the work dir with --resume FILE") from None  # fmt: skip
            if not os.path.isfile(found):
                raise ValueError(f"--resume auto: {latest} names {found}, which does not exist (deleted?); resume "
                                 "from another iter_N.state.pt of the work dir with --resume FILE")  # fmt: skip
            return found
        if os.path.isdir(self.resume):  # not "does not exist": it does, as a directory
            raise ValueError(f"resume file {self.resume!r} is a directory: --resume takes {RESUME_FILE}, or 'auto'")
        if not os.path.isfile(self.resume):
            raise ValueError(f"resume file {self.resume!r} does not exist")
        return self.resume

    def _holds_checkpoints(self) -> bool:
        """Whether the work dir holds a run's checkpoints: a latest.json, or an iter_N.safetensors."""
        if not os.path.isdir(self.cfg.work_dir):
            return False
        names = os.listdir(self.cfg.work_dir)
        return "latest.json" in names or any(n.startswith("iter_") and n.endswith(".safetensors") for n in names)

    def _refuse_another_runs_state(self, path: str) -> None:
        """--resume FILE of another work dir goes on with that run here: into a work dir without checkpoints (a run
        continued elsewhere, e.g. with more iterations) it may; into one holding a run's checkpoints it is refused,
        as a fresh run there is: that run's logs would be cut at FILE's iteration and its later checkpoints, newer
        by iteration, would prune this run's as soon as it saved (latest.json then naming a deleted file)."""
        folder = os.path.dirname(os.path.abspath(path))
        if not self._holds_checkpoints() or os.path.samefile(folder, self.cfg.work_dir):
            return
        raise ValueError(
            f"--resume {path} is a state of another work dir ({folder}), and work_dir {self.cfg.work_dir!r} holds "
            f"another run's checkpoints, which resuming there would overwrite and prune: resume with --work-dir "
            f"{folder}, or in a new --work-dir"
        )

    def _refuse_used_work_dir(self) -> None:
        """A run that does not resume starts in a work dir without checkpoints: it would mix its metrics with theirs,
        and pruning to max_checkpoints (by iteration) would delete its own newest ones. The refusal says what can be
        done with them: continue their run with --resume auto (latest.json), or with --resume FILE naming the newest
        state beside its weights when there is no latest.json (a run killed during its first save, a deleted file),
        or, when no iter_N.state.pt has its iter_N.safetensors beside it, that none can be resumed (--resume auto
        says the same): advising --resume auto there sent the user round in a circle."""
        if not self._holds_checkpoints():
            return
        names = os.listdir(self.cfg.work_dir)
        files = sorted((n for n in names if n.startswith("iter_") and n.endswith((".safetensors", ".state.pt"))),
                       key=lambda n: (_iteration(n), n))  # fmt: skip
        latest = "latest.json" in names
        states = [n for n in files if n.endswith(".state.pt") and _weights_beside(n) in files]
        work, listed = self.cfg.work_dir, ", ".join(files[:8]) + (", ..." if len(files) > 8 else "")
        if self.resume == "auto":  # _find_resume found no latest.json
            advice = (f"name the newest state explicitly with --resume {self._path(states[-1])}, or start"
                      if states else "none is an iter_N.state.pt beside its iter_N.safetensors, so none can be "
                      "resumed: start")  # fmt: skip
            raise ValueError(
                f"--resume auto: work_dir {work!r} has no latest.json, so no resumable state was found, but it holds "
                f"checkpoint files ({listed}): {advice} this run in a new --work-dir (or delete those files)"
            )
        if latest:
            raise ValueError(
                f"work_dir {work!r} already holds checkpoints ({listed + ', ' if files else ''}latest.json): continue "
                "their run with --resume auto, or start this run in a new --work-dir (or delete those files)"
            )
        if states:
            raise ValueError(
                f"work_dir {work!r} already holds checkpoints ({listed}) but no latest.json: continue their run with "
                f"--resume {self._path(states[-1])}, or start this run in a new --work-dir (or delete those files)"
            )
        raise ValueError(
            f"work_dir {work!r} holds checkpoint files that cannot be resumed ({listed}: no iter_N.state.pt beside an "
            "iter_N.safetensors, as a run stopped during its first save leaves): delete them (a model file may be "
            "worth keeping elsewhere), or start this run in a new --work-dir"
        )

    def _eval_files(self, which: Callable[[int], bool]) -> list[str]:
        """The work dir's eval_iter_N.json files whose N ``which`` takes."""
        names = [(re.fullmatch(r"eval_iter_(\d+)\.json", n), n) for n in os.listdir(self.cfg.work_dir)]
        return sorted(n for match, n in names if match and which(int(match[1])))

    def _start_logs_over(self) -> None:
        """Move the logs that a run without checkpoints left (metrics.csv, eval.csv, eval_iter_N.json, TensorBoard
        events, and the config.json they were made with) into ``previous_logs_<n>/`` of the work dir, saying so on
        stderr in one line: _refuse_used_work_dir lets a fresh run start in such a work dir (there is nothing to
        resume), whose metrics.csv then went 1, 2, 3, 1, 2, ... and TensorBoard drew both runs' curves over each
        other. Moved, not removed: they may be a finished run's whose checkpoints were deleted to save space."""
        old = [n for n in ("metrics.csv", "eval.csv") if os.path.isfile(self._path(n))]
        old += self._eval_files(lambda iteration: True)
        events = self._path("tensorboard")
        if os.path.isdir(events):
            old += [os.path.join("tensorboard", n) for n in sorted(os.listdir(events))
                    if n.startswith("events.out.tfevents.")]  # fmt: skip
        if not old:
            return
        if os.path.isfile(self._path("config.json")):  # the settings those logs were made with
            old.append("config.json")
        number = 1
        while os.path.exists(self._path(f"previous_logs_{number}")):
            number += 1
        aside = f"previous_logs_{number}"
        for name in old:
            os.makedirs(os.path.dirname(self._path(os.path.join(aside, name))), exist_ok=True)
            # shutil.move: tensorboard/ may be a link to another file system, where os.replace cannot go
            shutil.move(self._path(name), self._path(os.path.join(aside, name)))
        shown = ", ".join(old[:4]) + (f" and {len(old) - 4} more" if len(old) > 4 else "")
        print(f"denseclip-fast train: work dir {self.cfg.work_dir!r} held logs but no checkpoint (a run stopped before "
              f"its first save, or checkpoints deleted): moved {shown} to {aside}/; this run starts the logs over",
              file=sys.stderr)  # fmt: skip

    def _keep_rows_until(self, name: str, iteration: int) -> None:
        """Drop the rows of a resumed run's CSV file logged after the checkpoint it resumes from (the interrupted
        run wrote them; this run logs those iterations again)."""
        path = self._path(name)
        if not os.path.isfile(path):
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames or [], [r for r in reader if int(r["iter"]) <= iteration]
        with replaced_atomically(path) as partial, open(partial, "w", newline="", encoding="utf-8") as f:
            out = csv.DictWriter(f, fieldnames=columns)
            out.writeheader()
            out.writerows(rows)

    @staticmethod
    def _rng_states(world: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Every process's random state (dropout, drop path), gathered: [rank 0's, rank 1's, ...]."""
        mine = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(device)
        if world == 1:
            return [mine]
        states: list[Any] = [None] * world
        dist.all_gather_object(states, mine)
        return states

    def _save(
        self, model: DenseCLIP, optimizer: torch.optim.Optimizer, scaler: Any, iteration: int,
        rng: list[dict[str, torch.Tensor]],
    ) -> None:  # fmt: skip
        name = f"iter_{iteration}"
        model.save(self._path(f"{name}.safetensors"))
        state = {
            "iteration": iteration,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "config": json.dumps(self.cfg.to_dict()),
        }
        with replaced_atomically(self._path(f"{name}.state.pt")) as partial:
            torch.save(state, partial)
        with replaced_atomically(self._path("latest.json")) as partial, open(partial, "w", encoding="utf-8") as f:
            json.dump({"iteration": iteration, "model": f"{name}.safetensors", "state": f"{name}.state.pt"}, f)
        kept = sorted((int(n[5:-12]) for n in os.listdir(self.cfg.work_dir)
                       if n.startswith("iter_") and n.endswith(".safetensors")))  # fmt: skip
        for old in kept[: -self.cfg.max_checkpoints] if self.cfg.max_checkpoints > 0 else []:
            for suffix in (".safetensors", ".state.pt"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self._path(f"iter_{old}{suffix}"))

    def _load(
        self, path: str, model: DenseCLIP, optimizer: torch.optim.Optimizer, scaler: Any, rank: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        state = self._state if self._state is not None else read_train_state(path)
        weights = _weights_beside(path)
        try:
            loaded = load_checkpoint(weights, class_names=model.class_names)
        except ClassCountError as exc:
            raise ValueError(
                f"{path} was saved by a run with {exc.outputs} classes, this one's data set ({self.cfg.data}) has "
                f"{exc.given}: resume with the saved run's data set, or start this run in a new --work-dir"
            ) from None
        saved = _saved_contents(weights)
        if saved is not None:
            _check_class_names(path, saved[1], list(model.class_names), self.cfg.data, rank)
        model.load_state_dict(loaded.state_dict())
        try:
            load_optimizer_state(optimizer, state["optimizer"])
        except ValueError as exc:  # what _check_settings cannot see, e.g. a state older than norm_decay
            raise CheckpointError(path, f"cannot resume from it: {exc}") from None
        if state["scaler"] or not scaler.is_enabled():  # a run saved without fp16 has no scale: this one starts one
            scaler.load_state_dict(state["scaler"])
        if rank >= len(state["rng"]):
            raise ValueError(
                f"{path} was saved by {len(state['rng'])} process(es); resuming with more would not reproduce the "
                "run (start the others from it with a fresh work dir, or resume with the same number)"
            )
        mine = state["rng"][rank]
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], device)
        return int(state["iteration"])

    # ------------------------------------------------------------------ the run

    def _keep_saved_sizes(self, path: str) -> None:
        """A resumed run goes on at the crop and image scale it was saved with where this config leaves them to the
        architecture: the saved run may have been configured otherwise (an older version filled them differently,
        a config file named a preset of another arch). Sizes given explicitly stay as given."""
        self._state = read_train_state(path)
        saved = json.loads(self._state["config"])
        kept = {name: saved[name] for name in self.sizes_left_to_arch if saved.get(name) is not None}
        if kept:
            self.cfg = dataclasses.replace(self.cfg, **kept)  # __post_init__: a JSON list becomes the tuple
            self.cfg.validate()

    def _check_settings(self, path: str) -> None:
        """A resume whose settings the saved state cannot go on with is refused naming the file, the saved and the
        given value and what to do, before any work: another batch size (the data order resumes by images seen),
        another architecture (the saved weights are its shapes and function) or norm_decay (it decides which
        parameters share an optimizer group). The RESUME_FOLLOWS settings that differ are noted, to be said."""
        assert self._state is not None
        saved, cfg = json.loads(self._state["config"]), self.cfg
        if saved.get("batch_size") != cfg.batch_size:
            raise ValueError(
                f"{path} was saved by a run with batch_size {saved.get('batch_size')}, this one has "
                f"{cfg.batch_size}: the data order resumes by images seen, so resume with --batch-size "
                f"{saved.get('batch_size')} (accum may differ)"
            )
        weights = _weights_beside(path)
        contents, mine = _saved_contents(weights), cfg.model_config()
        arch = contents[0] if contents is not None else None
        if arch is not None and arch != mine:
            theirs, ours = _architecture_difference(arch, mine)
            raise ValueError(
                f"{path} was saved by a run with arch {saved.get('arch')!r} ({theirs}), this one has {cfg.arch!r} "
                f"({ours}): its weights ({os.path.basename(weights)}) and optimizer state are that architecture's; "
                "resume with the saved run's --arch (and --clip-activation), or start this run in a new --work-dir"
            )
        if "norm_decay" in saved and saved["norm_decay"] != cfg.norm_decay:  # older states: the group check in _load
            raise ValueError(
                f"{path} was saved by a run with norm_decay {saved['norm_decay']!r}, this one has "
                f"{cfg.norm_decay!r}: it decides which parameters share an optimizer group, so the saved optimizer "
                f"state fits only the saved one; resume with norm_decay {saved['norm_decay']!r}, or start this run "
                "in a new --work-dir"
            )
        self._changed = {name: f"{name} {getattr(cfg, name)!r} (the saved run had {saved[name]!r})"
                         for name in RESUME_FOLLOWS if name in saved and saved[name] != getattr(cfg, name)}  # fmt: skip

    def run(self) -> dict[str, Any]:
        rank = launch_environment()[0]  # checked before any other work (_distributed reads it again)
        resume_path = self._find_resume()
        if resume_path is None:
            self._refuse_used_work_dir()
        else:
            if self.resume != "auto":
                self._refuse_another_runs_state(resume_path)
            self._keep_saved_sizes(resume_path)
            self._check_settings(resume_path)
            finished = self._already_finished(resume_path, rank)
            if finished is not None:
                return finished
        cfg = self.cfg
        short = short_run_warning(cfg) if resume_path is None or self._schedule_changed() else None
        if short is not None and rank == 0:  # said when the run starts, again on resuming only if its schedule changed
            print(f"warning: {short}", file=sys.stderr)
        with (
            _distributed(cfg) as (rank, world, device),
            _cudnn_benchmark(cfg.cudnn_benchmark),
            contextlib.ExitStack() as held,  # the work dir's lock, released however the run ends
        ):
            return self._run(rank, world, device, resume_path, held)

    def _schedule_changed(self) -> bool:
        """Whether this run's learning-rate schedule differs from the resumed state's run (_check_settings's)."""
        return any(name in self._changed for name in SCHEDULE)

    def _already_finished(self, path: str, rank: int) -> dict[str, Any] | None:
        """What resuming from ``path`` returns when its run has reached cfg.iters and has its final evaluation
        (eval_iter_N.json in the work dir): that evaluation, with one line on stderr saying that the run is complete;
        nothing is trained or written (it said nothing and exited 0, and a smaller iters rewrote config.json as if
        the run had been shortened). None when there is training or the final evaluation left. A cfg.iters below
        the saved iteration is a ValueError: a run cannot go back to fewer iterations."""
        assert self._state is not None
        saved, iters = int(self._state["iteration"]), self.cfg.iters
        if saved > iters:
            raise ValueError(
                f"{path} is at iteration {saved}, past this run's iters {iters}: a run cannot go back; resume with "
                f"iters {saved} or more (--iters), or evaluate {_weights_beside(path)} with eval"
            )
        evaluation = self._saved_evaluation(saved) if saved == iters else None
        if evaluation is None:
            return None
        if rank == 0:
            print(f"denseclip-fast train: the run in work dir {self.cfg.work_dir!r} is already complete at iteration "
                  f"{saved} ({path}; its final evaluation is eval_iter_{saved}.json): nothing to train; give iters "
                  f"above {saved} (--iters) to train on", file=sys.stderr)  # fmt: skip
        return {"iterations": saved, "last": {}, "eval": evaluation if rank == 0 else None}

    def _saved_evaluation(self, iteration: int) -> dict[str, Any] | None:
        """The work dir's eval_iter_<iteration>.json; None when it is missing or unreadable (then it is run again)."""
        try:
            with open(self._path(f"eval_iter_{iteration}.json"), encoding="utf-8") as f:
                evaluation = json.load(f)
        except (OSError, ValueError):
            return None
        return evaluation if isinstance(evaluation, dict) and "mIoU" in evaluation else None

    def _run(
        self, rank: int, world: int, device: torch.device, resume_path: str | None, held: contextlib.ExitStack
    ) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.batch_size % (world * cfg.accum):
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by processes x accum = {world} x {cfg.accum}"
            )
        micro = cfg.batch_size // (world * cfg.accum)
        bn_images = micro * world if cfg.sync_bn and world > 1 else micro
        data = SegmentationData(cfg.data, cfg.layout, "train", cfg)
        # the evaluation's images (their headers), now rather than after the training; every process stops alike
        val = SegmentationData(cfg.data, cfg.layout, "val", ignore_index=cfg.ignore_index)  # kept for _evaluate
        check_image_sizes(val, cfg.model_config().test_scale, (1.0,))
        data.check_label_sizes()  # as check_image_sizes does for val: now, not in a DataLoader worker hours in
        model = prepare_model(build_model(cfg, data.class_names), cfg, device)
        layout = memory_format(cfg, device)
        optimizer = make_optimizer(model, cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        start = self._load(resume_path, model, optimizer, scaler, rank, device) if resume_path else 0
        complete = start == cfg.iters  # resumed at its end (_already_finished): only the final evaluation is left
        worker_init: Callable[[int], None] | None = None
        if rank == 0:  # only once the resume is accepted: a refused one leaves the work dir as it was
            os.makedirs(cfg.work_dir, exist_ok=True)
            worker_init = held.enter_context(work_dir_lock(cfg.work_dir))  # before anything is written or removed
            if not resume_path:  # again, locked: a run that held the work dir meanwhile may have saved checkpoints
                self._refuse_used_work_dir()
            elif self.resume == "auto" and (now := self._find_resume()) != resume_path:  # or moved latest.json on
                raise ValueError(
                    f"--resume auto: work dir {cfg.work_dir!r} moved on while this run started (latest.json named "
                    f"{resume_path}, now {now}: another run?); nothing was written, start it again"
                )
            for name in os.listdir(cfg.work_dir):  # left by a run killed while it saved (replaced_atomically)
                if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                    os.remove(self._path(name))
            if not resume_path:  # before config.json is written: the old run's goes with its logs
                self._start_logs_over()
            if not complete:  # the saved run's settings stay in it
                with open(self._path("config.json"), "w", encoding="utf-8") as f:
                    json.dump(cfg.to_dict(absolute_paths=True), f, indent=2)
        if not resume_path:
            torch.manual_seed(cfg.seed + rank)  # dropout masks: distinct per process, reproducible
        elif rank == 0:
            self._keep_rows_until("metrics.csv", start)
            self._keep_rows_until("eval.csv", start - 1 if complete else start)  # a final row without its JSON
            for name in self._eval_files(lambda iteration: iteration > start):  # of weights that were never saved
                os.remove(self._path(name))
            if complete:
                print(f"denseclip-fast train: the run in work dir {cfg.work_dir!r} is already trained to iteration "
                      f"{start} ({resume_path}) but its final evaluation is missing: running it",
                      file=sys.stderr)  # fmt: skip
            elif self._changed:
                changed = ", ".join(self._changed.values())
                print(f"denseclip-fast train: resuming from {resume_path} with {changed}: the optimizer and the "
                      f"schedule go on with these values from iteration {start}",
                      file=sys.stderr)  # fmt: skip

        if rank == 0 and bn_images < cfg.batch_size and not complete:
            print(f"denseclip-fast train: BatchNorm statistics come from {bn_images} image(s) (the official recipe "
                  f"synchronises them over its batch of 32 on 8 GPUs; --sync-bn does so under torchrun)",
                  file=sys.stderr)  # fmt: skip
        step_module: nn.Module = TrainStep(model)
        if world > 1:
            if cfg.sync_bn:
                step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
            ids = [device.index] if device.type == "cuda" else None
            step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
        sampler = TrainSampler(len(data), cfg.seed, rank, world, start=start * micro * cfg.accum)
        # its own generator: creating the loader must not draw from the global RNG (a resumed run creates it at
        # a different point of the run than an uninterrupted one)
        loader = DataLoader(data, batch_size=micro, sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                            generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=worker_init)  # fmt: skip
        batches = iter(loader)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
                                  enabled=cfg.amp != "none")  # fmt: skip
        writer = self._tensorboard(start) if rank == 0 else None
        progress = None
        if rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", dynamic_ncols=True)
            # closed however the run ends: an error (a truncated image, a bad label) was printed glued to the bar's
            # line, and the bar printed again after it when it was collected
            held.callback(progress.close)
        metrics_file = self._path("metrics.csv")
        last: dict[str, float] = {}
        tic = time.perf_counter()
        for it in range(start, cfg.iters):
            lr = set_learning_rates(optimizer, it, cfg)
            sums = torch.zeros(len(LOSSES), dtype=torch.float64, device=device)  # read at logging iterations only
            for m in range(cfg.accum):
                images, labels = next_batch(batches)
                images = images.to(device, non_blocking=True, memory_format=layout)
                labels = labels.to(device, non_blocking=True)
                sync = m == cfg.accum - 1 or world == 1
                context = step_module.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
                with context:
                    with autocast, _batchnorm_advice(cfg, bn_images, world):
                        logits, aux = step_module(images)
                    losses = segmentation_loss(logits, aux, labels, cfg)
                    scaler.scale(losses["loss"] / cfg.accum).backward()
                sums += torch.stack([losses[k].detach() for k in LOSSES]).double() / cfg.accum
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = it + 1
            # the losses are read (a host sync) only when logged or saved, so the host queues the next iteration
            log_now = done % cfg.log_interval == 0 or done == cfg.iters or done == start + 1
            save_now = done % cfg.checkpoint_interval == 0 or done == cfg.iters
            values: list[float] = []
            if log_now or save_now:
                if world > 1:  # log the global mean, not this process's
                    dist.all_reduce(sums)
                    sums /= world
                values = sums.tolist()
                if cfg.amp != "fp16":  # fp16: the scaler skips such steps by design
                    self._check_finite(values, done)
            if rank == 0:
                assert progress is not None
                progress.update(1)
                if log_now:
                    totals = dict(zip(LOSSES, values))
                    progress.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.2e}")
                    seconds = time.perf_counter() - tic
                    row = {"iter": done, **totals, "lr": lr, "images_per_s": cfg.batch_size * (done - start) / seconds,
                           "seconds": seconds}  # fmt: skip
                    self._append_csv(metrics_file, METRIC_COLUMNS, row)
                    if writer is not None:
                        for k in ("loss", "loss_decode", "loss_aux", "lr"):
                            writer.add_scalar(f"train/{k}", row[k], done)
                    last = totals
            if save_now:  # every run ends with one: its final weights are checked too
                self._check_weights_finite(model, done)
                rng = self._rng_states(world, device)
                if rank == 0:
                    self._save(model, optimizer, scaler, done, rng)
                if world > 1:
                    dist.barrier()
            if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.iters:
                self._evaluate(model, val, rank, world, done, writer)
        if progress is not None:
            progress.close()
        result: dict[str, Any] = {"iterations": cfg.iters, "last": last}
        result["eval"] = self._evaluate(model, val, rank, world, cfg.iters, writer)
        if writer is not None:
            writer.close()
        return result

    @staticmethod
    def _check_finite(values: list[float], iteration: int) -> None:
        """FloatingPointError when this iteration's losses (the same on every process) are NaN or infinite: the
        step has already put the non-finite gradients into the weights, so no checkpoint is written from them."""
        if all(map(math.isfinite, values)):
            return
        raise FloatingPointError(
            f"the loss is not finite at iteration {iteration} ({', '.join(f'{k} {v}' for k, v in zip(LOSSES, values))})"
            ": the weights are no longer usable and were not saved; resume from the last checkpoint "
            "(--resume auto) with a lower learning rate (--lr), or check the data"
        )

    @staticmethod
    def _check_weights_finite(model: DenseCLIP, iteration: int) -> None:
        """FloatingPointError when a trained parameter or a floating buffer (BatchNorm statistics) holds NaN or an
        infinity after ``iteration``, as an update too large for the weights' dtype leaves them though the loss
        before it was finite; called before every checkpoint, so that none is written from such weights. The
        verdict is agreed by all processes (without SyncBN each has its own BatchNorm statistics): all of them stop,
        none is left waiting in a collective the others never reach."""
        tensors: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).all().to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            return
        bad = [n for n, t in tensors if not bool(torch.isfinite(t).all())]
        where = f"{len(bad)} tensor(s), e.g. {bad[0]}" if bad else "in another process"
        raise FloatingPointError(
            f"the weights are not finite after iteration {iteration} ({where}): they were not saved; resume from "
            "the last checkpoint (--resume auto) with a lower learning rate (--lr)"
        )

    def _evaluate(
        self, model: DenseCLIP, val: SegmentationData, rank: int, world: int, iteration: int, writer: Any
    ) -> dict[str, Any] | None:
        """mIoU/aAcc on the val split in float32 (as the official test), the images shared by the processes, each
        with rank 0's buffers: the saved model's. (Without SyncBatchNorm each process's BatchNorm statistics have
        moved with its own last batch since DDP copied rank 0's before that forward.)"""
        if world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        result = evaluate(model, val, mode=self.cfg.eval_mode, rank=rank, world=world, progress=True)
        if rank == 0:
            row = {"iter": iteration, "mIoU": result["mIoU"], "aAcc": result["aAcc"], "mAcc": result["mAcc"]}
            self._append_csv(self._path("eval.csv"), list(row), row)
            with open(self._path(f"eval_iter_{iteration}.json"), "w", encoding="utf-8") as f:
                f.write(results_json(result))
            if writer is not None:
                for k in ("mIoU", "aAcc"):
                    writer.add_scalar(f"val/{k}", row[k], iteration)
        return result if rank == 0 else None

    @staticmethod
    def _append_csv(path: str, columns: list[str], row: dict[str, Any]) -> None:
        new = not os.path.isfile(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            out = csv.DictWriter(f, fieldnames=columns)
            if new:
                out.writeheader()
            out.writerow(row)

    def _tensorboard(self, start: int) -> Any:
        """A SummaryWriter; a resumed run first purges the events the interrupted run logged after ``start``."""
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional, but the user asked for its events
            warnings.warn("tensorboard=True but the tensorboard package is not installed: metrics go to metrics.csv "
                          "only (pip install tensorboard, or set tensorboard false)", stacklevel=2)  # fmt: skip
            return None
        # steps are iterations done: the resumed run logs start + 1 first
        return SummaryWriter(self._path("tensorboard"), purge_step=start + 1 if start else None)


def train(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train with ``cfg`` (see :class:`TrainConfig`); ``resume``: None, "auto" (the work dir's latest) or a
    ``iter_<N>.state.pt`` path. Returns the last losses and the final evaluation.

    Resuming a run that has already reached ``cfg.iters`` trains nothing: it says so on stderr in one line and
    returns the run's final evaluation (eval_iter_N.json), or runs that evaluation where the run stopped before it;
    config.json is left as the run wrote it. A ``cfg.iters`` below the saved iteration is a ValueError (a run cannot
    go back; a smaller ``iters`` is not taken to mean "stop here"): resume with as many iterations or more, or
    evaluate the checkpoint with ``eval``."""
    return Trainer(cfg, resume).run()

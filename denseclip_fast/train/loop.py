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
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoints import ClassCountError, load_checkpoint
from ..checkpoints.io import PARTIAL_SUFFIX, SAVED_MODEL, CheckpointError, replaced_atomically
from ..model import DenseCLIP
from ..model.text import tokenize_class_names
from .config import TrainConfig
from .data import SegmentationData, TrainSampler, class_list_source, shared_split_note
from .evaluate import HEADLINE, Evaluation, check_image_sizes, evaluate, results_from_json, results_json
from .launch import cudnn_benchmark, distributed, launch_environment
from .optim import make_optimizer, segmentation_loss, set_learning_rates, short_run_warning
from .state import (
    RESUME_FILE,
    RESUME_FOLLOWS,
    SCHEDULE,
    architecture_difference,
    check_class_names,
    iteration_of,
    load_optimizer_state,
    read_train_state,
    saved_contents,
    weights_beside,
)
from .step import TrainStep, batchnorm_advice, batchnorm_images, batchnorm_note, memory_format, prepare_model
from .workdir import work_dir_lock

LOSSES = ("loss", "loss_decode", "loss_aux")


class TrainResult(TypedDict):
    """What train returns: the iteration the run reached, the losses last logged (LOSSES' names; empty when no
    iteration was logged in this process, as on resuming a complete run) and the final evaluation (None on the
    processes but rank 0)."""

    iterations: int
    last: dict[str, float]
    eval: Evaluation | None
METRIC_COLUMNS = ["iter", *LOSSES, "lr", "images_per_s", "seconds"]
NO_RESUME = (None, "", "none")  # the resume values of a fresh run


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


def build_model(cfg: TrainConfig, class_names: list[str], say: Callable[[str], None] | None = None,
                init: bool = True) -> DenseCLIP:  # fmt: skip
    """The run's model: freshly initialised (``cfg.seed``), then, with ``init``, ``cfg.init``'s weights: CLIP's
    (backbone and text encoder), or a DenseCLIP checkpoint's (every weight but the classes' where they are other
    ones: checkpoints/transfer.py, whose notes go to ``say``). A resumed run passes ``init=False``: its checkpoint
    replaces every weight, so the file is not read (nor needed)."""
    torch.manual_seed(cfg.seed)
    model = DenseCLIP(cfg.model_config(), class_names)
    if init and cfg.init != "none":
        from ..checkpoints.clip import DenseCLIPCheckpointGiven, NotCLIPWeights, init_from_clip
        from ..checkpoints.io import read_weight_file
        from ..checkpoints.transfer import init_from_denseclip

        weights = read_weight_file(cfg.init)  # once: which kind it is shows in its tensors
        try:
            init_from_clip(model, cfg.init, weights)
            denseclip = False
        except DenseCLIPCheckpointGiven:
            denseclip = True  # loaded below, out of the except clause (whose frames would keep their locals alive)
        except NotCLIPWeights as exc:  # nor a DenseCLIP checkpoint: 'not CLIP weights' alone hides the other kind
            raise CheckpointError(exc.path, "--init takes CLIP weights or a DenseCLIP checkpoint; "
                                            + exc.reason) from None  # fmt: skip
        if denseclip:
            for note in init_from_denseclip(model, cfg.init, weights):
                if say is not None:
                    say(f"--init {cfg.init}: {note}")
    return model


class Trainer:
    """Holds one run's state; :meth:`run` trains to ``cfg.iters``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        cfg = dataclasses.replace(cfg)  # validate() fills the sizes left to the architecture: in a copy, so that the
        # caller's config keeps following its arch (a sweep that changes arch and trains again)
        self.sizes_left_to_arch = [name for name in ("crop", "img_scale") if getattr(cfg, name) is None]
        cfg.validate(init_file=resume in NO_RESUME)  # a resumed run's init file: run() checks it if needed
        self.cfg = cfg
        self.resume = resume
        self._state: dict[str, Any] | None = None  # the resume file, read once
        self._changed: dict[str, str] = {}  # RESUME_FOLLOWS settings that differ from the saved run's: what to say

    # ------------------------------------------------------------------ files

    def _path(self, name: str) -> str:
        return os.path.join(self.cfg.work_dir, name)

    def _find_resume(self) -> str | None:
        if self.resume in NO_RESUME:
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
                       key=lambda n: (iteration_of(n), n))  # fmt: skip
        latest = "latest.json" in names
        states = [n for n in files if n.endswith(".state.pt") and weights_beside(n) in files]
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
            for name in sorted(os.listdir(events)):
                if not name.startswith("events.out.tfevents."):
                    continue
                if _holds_events(os.path.join(events, name)):
                    old.append(os.path.join("tensorboard", name))
                else:  # a run that failed before its first logged step (its config.json is replaced below)
                    os.remove(os.path.join(events, name))
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
        # this run's checkpoints alone: a file of another name (a copy kept as iter_8000_best.safetensors) is the
        # user's, neither pruned nor read as a number (int() of "8000_best" ended the run at its next save); and
        # those up to this iteration: a run resumed from an earlier state of its work dir finds the first run's
        # later ones there (newer by number: pruned by number, the checkpoint just written went, and latest.json
        # named a deleted state); they are left, and replaced as this run reaches their iterations
        saved = (int(m.group(1)) for m in map(SAVED_MODEL.fullmatch, os.listdir(self.cfg.work_dir)) if m)
        kept = sorted(n for n in saved if n <= iteration)
        for old in kept[: -self.cfg.max_checkpoints] if self.cfg.max_checkpoints > 0 else []:
            for suffix in (".safetensors", ".state.pt"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self._path(f"iter_{old}{suffix}"))

    def _load(
        self, path: str, model: DenseCLIP, optimizer: torch.optim.Optimizer, scaler: Any, rank: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        state = self._state if self._state is not None else read_train_state(path)
        weights = weights_beside(path)
        try:
            loaded = load_checkpoint(weights, class_names=model.class_names)
        except ClassCountError as exc:
            raise ValueError(
                f"{path} was saved by a run with {exc.outputs} classes, this one's data set ({self.cfg.data}) has "
                f"{exc.given}: resume with the saved run's data set, or start this run in a new --work-dir"
            ) from None
        saved = saved_contents(weights)
        if saved is not None:
            check_class_names(path, saved[1], list(model.class_names), self.cfg.data, rank)
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
            self.cfg.validate(init_file=False)

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
        weights = weights_beside(path)
        contents, mine = saved_contents(weights), cfg.model_config()
        arch = contents[0] if contents is not None else None
        if arch is not None and arch != mine:
            theirs, ours = architecture_difference(arch, mine)
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

    def run(self) -> TrainResult:
        rank = launch_environment()[0]  # checked before any other work (distributed reads it again)
        resume_path = self._find_resume()
        if resume_path is None:
            self.cfg.check_init()  # a fresh run (also --resume auto without a checkpoint) starts from the file
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
        with (
            distributed(cfg) as (rank, world, device),
            cudnn_benchmark(cfg.cudnn_benchmark),
            contextlib.ExitStack() as held,  # the work dir's lock, released however the run ends
        ):
            return self._run(rank, world, device, resume_path, held)

    def _schedule_changed(self) -> bool:
        """Whether this run's learning-rate schedule differs from the resumed state's run (_check_settings's)."""
        return any(name in self._changed for name in SCHEDULE)

    def _already_finished(self, path: str, rank: int) -> TrainResult | None:
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
                f"iters {saved} or more (--iters), or evaluate {weights_beside(path)} with eval"
            )
        evaluation = self._saved_evaluation(saved) if saved == iters else None
        if evaluation is None:
            return None
        if rank == 0:
            unused = self._settings_unlike_the_run()
            unused_note = f"; the settings given that differ from the run's ({', '.join(unused)}) are not used" \
                if unused else ""  # fmt: skip
            print(f"denseclip-fast train: the run in work dir {self.cfg.work_dir!r} is already complete at iteration "
                  f"{saved} ({path}; its final evaluation is eval_iter_{saved}.json): nothing to train; give iters "
                  f"above {saved} (--iters) to train on{unused_note}", file=sys.stderr)  # fmt: skip
        return {"iterations": saved, "last": {}, "eval": evaluation if rank == 0 else None}

    def _settings_unlike_the_run(self) -> list[str]:
        """The fields of this config (but iters and work_dir) that differ from the work dir's config.json, the
        run's: what a complete run does not use (--data of another data set said nothing, and the run's old
        evaluation was printed as if of it). Empty when config.json cannot be read."""
        try:
            with open(self._path("config.json"), encoding="utf-8") as f:
                run = json.load(f)
        except (OSError, ValueError):
            return []
        if not isinstance(run, dict):
            return []
        given = json.loads(json.dumps(self.cfg.to_dict(absolute_paths=True)))  # tuples as JSON lists
        return [name for name, value in given.items()
                if name not in ("iters", "work_dir") and name in run and run[name] != value]

    def _saved_evaluation(self, iteration: int) -> Evaluation | None:
        """The work dir's eval_iter_<iteration>.json; None when it is missing or unreadable (then it is run again).
        A headline metric the split does not define, written as null, is NaN again, as evaluate returned it."""
        try:
            with open(self._path(f"eval_iter_{iteration}.json"), encoding="utf-8") as f:
                return results_from_json(f.read())
        except (OSError, ValueError):  # (a file that is not UTF-8: a ValueError)
            return None

    def _run(
        self, rank: int, world: int, device: torch.device, resume_path: str | None, held: contextlib.ExitStack
    ) -> TrainResult:
        """Checks, the model and the work dir, then cfg.iters iterations from the resumed one (or 0): each one step
        of the optimiser over ``accum`` micro-batches, logged, saved and evaluated at their intervals; then the
        final evaluation."""
        cfg = self.cfg
        micro = self._micro_batch(world, device)
        bn_images = batchnorm_images(cfg, world)
        data, val = self._datasets()
        # said when the run starts, again on resuming only if its schedule changed; after the checks above, so that
        # a run they refuse says its one error alone
        short = short_run_warning(cfg) if resume_path is None or self._schedule_changed() else None
        if short is not None and rank == 0:
            print(f"denseclip-fast train: warning: {short}", file=sys.stderr)
        say = (lambda note: print(f"denseclip-fast train: {note}", file=sys.stderr)) if rank == 0 else None
        model = prepare_model(build_model(cfg, data.class_names, say, init=resume_path is None), cfg, device)
        layout = memory_format(cfg, device)
        optimizer = make_optimizer(model, cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        start = self._load(resume_path, model, optimizer, scaler, rank, device) if resume_path else 0
        complete = start == cfg.iters  # resumed at its end (_already_finished): only the final evaluation is left
        # only once the resume is accepted: a refused one leaves the work dir as it was
        worker_init = self._claim_work_dir(resume_path, complete, held) if rank == 0 else None
        if not resume_path:
            torch.manual_seed(cfg.seed + rank)  # dropout masks: distinct per process, reproducible
        elif rank == 0:
            self._trim_logs_for_resume(resume_path, start, complete)
        if rank == 0 and not complete:
            for note in (batchnorm_note(cfg, world), shared_split_note(cfg.data, cfg.layout)):
                if note:
                    print(f"denseclip-fast train: {note}", file=sys.stderr)
        step_module = self._step_module(model, world, device)
        batches = iter(self._loader(data, micro, start, rank, world, device, worker_init))
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
                                  enabled=cfg.amp != "none")  # fmt: skip
        writer = self._tensorboard(start) if rank == 0 else None
        progress = self._progress_bar(start, held) if rank == 0 else None
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
                    with autocast, batchnorm_advice(cfg, bn_images, world):
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
            values = self._read_losses(sums, world, done) if log_now or save_now else []
            if progress is not None:  # rank 0
                progress.update(1)
                if log_now:
                    last = dict(zip(LOSSES, values))
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
                    seconds = time.perf_counter() - tic
                    row = {"iter": done, **last, "lr": lr, "images_per_s": cfg.batch_size * (done - start) / seconds,
                           "seconds": seconds}  # fmt: skip
                    self._append_csv(metrics_file, METRIC_COLUMNS, row)
                    if writer is not None:
                        for k in ("loss", "loss_decode", "loss_aux", "lr"):
                            writer.add_scalar(f"train/{k}", row[k], done)
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
        result: TrainResult = {"iterations": cfg.iters, "last": last,
                               "eval": self._evaluate(model, val, rank, world, cfg.iters, writer)}  # fmt: skip
        if writer is not None:
            writer.close()
        return result

    # ------------------------------------------------------------------ a run's parts, in _run's order

    def _micro_batch(self, world: int, device: torch.device) -> int:
        """The images of one micro-batch per process, batch_size / (world x accum), once the batch and the
        BatchNorm option fit the processes."""
        cfg = self.cfg
        if cfg.batch_size % (world * cfg.accum):
            raise ValueError(
                f"batch_size (--batch-size) {cfg.batch_size} must be divisible by processes x accum (--accum) = "
                f"{world} x {cfg.accum}"
            )
        if cfg.sync_bn and world > 1 and device.type != "cuda":  # else torch's own error, once the work dir is written
            raise ValueError(f"sync_bn (--sync-bn) synchronises BatchNorm across CUDA processes: PyTorch's "
                             f"SyncBatchNorm does not run on device {device}; leave it off (each process keeps its "
                             "own statistics)")  # fmt: skip
        return cfg.batch_size // (world * cfg.accum)

    def _datasets(self) -> tuple[SegmentationData, SegmentationData]:
        """The training and evaluation splits, checked before any training: the class names the text encoder
        takes, the evaluation images' sizes at the test scale and the training labels' sizes."""
        cfg = self.cfg
        data = SegmentationData(cfg.data, cfg.layout, "train", cfg)
        try:  # the names the text encoder takes, said with their file (DenseCLIP's own error named none)
            tokenize_class_names(data.class_names, cfg.model_config().text.class_token_length)
        except ValueError as exc:
            raise ValueError(f"{class_list_source(cfg.data, cfg.layout, len(data.class_names))}: {exc}") from None
        # the evaluation's images (their headers), now rather than after the training; every process stops alike
        val = SegmentationData(cfg.data, cfg.layout, "val", ignore_index=cfg.ignore_index)  # kept for _evaluate
        check_image_sizes(val, cfg.model_config().test_scale, (1.0,))
        data.check_label_sizes()  # as check_image_sizes does for val: now, not in a DataLoader worker hours in
        return data, val

    def _claim_work_dir(
        self, resume_path: str | None, complete: bool, held: contextlib.ExitStack
    ) -> Callable[[int], None] | None:
        """Rank 0: the work dir made and locked for the run (the lock held by ``held``; the returned function
        makes DataLoader workers close their copies of it, None where nothing is locked), a fresh run's refused
        where checkpoints came meanwhile, --resume auto's where latest.json moved on, files of a save that was
        killed removed, a fresh run's old logs set aside and config.json written (not for a complete run: the
        saved settings stay)."""
        cfg = self.cfg
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
        return worker_init

    def _trim_logs_for_resume(self, resume_path: str, start: int, complete: bool) -> None:
        """Rank 0 of a resumed run: the logs cut back to the iteration resumed at (rows and evaluations of weights
        that were never saved removed), and what the run goes on with said."""
        self._keep_rows_until("metrics.csv", start)
        self._keep_rows_until("eval.csv", start - 1 if complete else start)  # a final row without its JSON
        for name in self._eval_files(lambda iteration: iteration > start):  # of weights that were never saved
            os.remove(self._path(name))
        if complete:
            print(f"denseclip-fast train: the run in work dir {self.cfg.work_dir!r} is already trained to iteration "
                  f"{start} ({resume_path}) but its final evaluation is missing: running it",
                  file=sys.stderr)  # fmt: skip
        elif self._changed:
            changed = ", ".join(self._changed.values())
            print(f"denseclip-fast train: resuming from {resume_path} with {changed}: the optimizer and the "
                  f"schedule go on with these values from iteration {start}",
                  file=sys.stderr)  # fmt: skip

    def _step_module(self, model: DenseCLIP, world: int, device: torch.device) -> nn.Module:
        """The module a micro-batch goes through: TrainStep (the forward with the loss's inputs), in
        DistributedDataParallel across processes (its BatchNorms synchronised with sync_bn)."""
        step_module: nn.Module = TrainStep(model)
        if world > 1:
            if self.cfg.sync_bn:
                step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
            ids = [device.index] if device.type == "cuda" else None
            step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
        return step_module

    def _loader(
        self, data: SegmentationData, micro: int, start: int, rank: int, world: int, device: torch.device,
        worker_init: Callable[[int], None] | None,
    ) -> DataLoader:  # fmt: skip
        """This process's micro-batches from the iteration resumed at (TrainSampler: the data order of an
        uninterrupted run)."""
        cfg = self.cfg
        sampler = TrainSampler(len(data), cfg.seed, rank, world, start=start * micro * cfg.accum)
        # its own generator: creating the loader must not draw from the global RNG (a resumed run creates it at
        # a different point of the run than an uninterrupted one)
        workers = cfg.workers()
        return DataLoader(data, batch_size=micro, sampler=sampler, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=worker_init)  # fmt: skip

    def _progress_bar(self, start: int, held: contextlib.ExitStack) -> Any:
        """Rank 0's tqdm bar over the iterations, closed by ``held`` however the run ends."""
        from tqdm import tqdm

        progress = tqdm(total=self.cfg.iters, initial=start, desc="train", unit="it", dynamic_ncols=True)
        # closed however the run ends: an error (a truncated image, a bad label) was printed glued to the bar's
        # line, and the bar printed again after it when it was collected
        held.callback(progress.close)
        return progress

    def _read_losses(self, sums: torch.Tensor, world: int, iteration: int) -> list[float]:
        """This iteration's losses (LOSSES' order) on the host, averaged over the processes; checked finite (but
        with fp16's scaler, which skips such steps by design)."""
        if world > 1:  # log the global mean, not this process's
            dist.all_reduce(sums)
            sums /= world
        values: list[float] = sums.tolist()
        if self.cfg.amp != "fp16":
            self._check_finite(values, iteration)
        return values

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
    ) -> Evaluation | None:
        """mIoU/aAcc on the val split in float32 (as the official test), the images shared by the processes, each
        with rank 0's buffers: the saved model's. (Without SyncBatchNorm each process's BatchNorm statistics have
        moved with its own last batch since DDP copied rank 0's before that forward.)"""
        if world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        result = evaluate(model, val, mode=self.cfg.eval_mode, rank=rank, world=world, progress=True)
        if rank == 0:
            row: dict[str, float] = {"iter": iteration, **{k: result[k] for k in HEADLINE}}
            self._append_csv(self._path("eval.csv"), list(row), row)
            with open(self._path(f"eval_iter_{iteration}.json"), "w", encoding="utf-8") as f:
                f.write(results_json(result))
            if writer is not None:
                for k in HEADLINE:
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


def _holds_events(path: str) -> bool:
    """Whether a TensorBoard events file holds more than the record every new file starts with (its version): a
    TFRecord file is records of an 8-byte length, a 4-byte CRC, the data and a 4-byte CRC. An unreadable or
    malformed file counts as holding events (it is kept)."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(8), os.fstat(f.fileno()).st_size
    except OSError:
        return True
    return size > 0 and (len(head) < 8 or size != 16 + int.from_bytes(head, "little"))


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train with ``cfg`` (see :class:`TrainConfig`); ``resume``: None, "auto" (the work dir's latest) or a
    ``iter_<N>.state.pt`` path. Returns a TrainResult: the iteration reached, the last losses logged and the final
    evaluation.

    Resuming a run that has already reached ``cfg.iters`` trains nothing: it says so on stderr in one line and
    returns the run's final evaluation (eval_iter_N.json), or runs that evaluation where the run stopped before it;
    config.json is left as the run wrote it. A ``cfg.iters`` below the saved iteration is a ValueError (a run cannot
    go back; a smaller ``iters`` is not taken to mean "stop here"): resume with as many iterations or more, or
    evaluate the checkpoint with ``eval``."""
    return Trainer(cfg, resume).run()

"""A run's saved training state (``iter_N.state.pt`` beside ``iter_N.safetensors``): read and checked, and what a
resume compares with this run (parameter groups, class names, architecture)."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from ..checkpoints.io import CheckpointError, read_weight_file
from ..checkpoints.native import is_native, native_contents
from ..config import DenseCLIPConfig


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


def saved_contents(weights: str) -> tuple[DenseCLIPConfig, list[str]] | None:
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


def check_class_names(path: str, saved: list[str], mine: list[str], data: str, rank: int) -> None:
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


def architecture_difference(saved: DenseCLIPConfig, mine: DenseCLIPConfig, limit: int = 3) -> tuple[str, str]:
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


def weights_beside(state: str) -> str:
    """The iter_N.safetensors (path or name) that train writes beside the training state iter_N.state.pt."""
    return state.removesuffix(".state.pt") + ".safetensors"


def iteration_of(name: str) -> int:
    """N of a work dir's ``iter_N.*`` file name (-1 when N is not a number)."""
    number = name.removeprefix("iter_").split(".", 1)[0]
    return int(number) if number.isdigit() else -1

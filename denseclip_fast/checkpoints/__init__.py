"""Checkpoint loading and saving.

``load_checkpoint`` reads released official DenseCLIP files (mmcv ``.pth``) and denseclip_fast's own
``.safetensors`` files; ``clip.py`` reads CLIP weights (OpenAI TorchScript archives, plain state dicts, open_clip
checkpoints) to initialise a model for training. Nothing is ever unpickled with code execution (see ``io.py``).
"""

from __future__ import annotations

import os
import reprlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import torch

from ..class_names import ADE20K_CLASSES
from ..validation import as_bool
from ..visualize import rgb_triples
from .io import (
    CheckpointError,
    CheckpointNotFoundError,
    WeightFile,
    check_not_a_training_state,
    covers_its_storage,
    path_argument,
    read_weight_file,
)
from .native import check_crcs, is_native, native_contents
from .official import check_arch, infer_config, key_listing, load_state_strict, state_problems

if TYPE_CHECKING:
    from ..config import DenseCLIPConfig
    from ..model import DenseCLIP

__all__ = [
    "AssumedADE20KClasses",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ClassCountError",
    "MismatchedClassNamesError",
    "UnnamedClassesError",
    "load_checkpoint",
]


class ClassCountError(ValueError):
    """``class_names`` of another length than the checkpoint's head has outputs (``given`` names, ``outputs``); a
    ValueError the command line rewords for where its names came from."""

    def __init__(self, given: int, outputs: int) -> None:
        self.given, self.outputs = given, outputs
        super().__init__(f"class_names has {given} names but the checkpoint's head has {outputs} outputs")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.given, self.outputs)


class AssumedADE20KClasses(UserWarning):
    """A file that names no classes, whose head has 150 outputs, was given ADE20K's 150 names (class_names=None)."""


class UnnamedClassesError(CheckpointError):
    """A file that names no classes, whose head has ``outputs`` of them (other than ADE20K's 150): load_checkpoint
    needs ``class_names``."""

    def __init__(self, path: str, outputs: int) -> None:
        self.outputs = outputs
        super().__init__(path, f"the file names no classes and its head has {outputs} outputs: pass class_names=[...]")


class MismatchedClassNamesError(UnnamedClassesError):
    """A file whose class names (``names`` of them) disagree with its head's ``outputs``: as a file that names none,
    load_checkpoint needs ``class_names``."""

    def __init__(self, path: str, names: int, outputs: int) -> None:
        self.names, self.outputs = names, outputs
        CheckpointError.__init__(self, path, f"the file's class names ({names}) disagree with its head ({outputs} "
                                             f"outputs); pass class_names=[...] with {outputs} names")  # fmt: skip


def load_checkpoint(
    path: str | os.PathLike[str], arch: str | None = None, class_names: Sequence[str] | None = None, *,
    verify: bool = True,
) -> DenseCLIP:  # fmt: skip
    """Load a DenseCLIP model: eval mode, CPU, float32.

    Args:
        path: an official DenseCLIP checkpoint (``{'meta', 'state_dict'}`` or a bare state dict, ``.pth``) or a file
            written by ``DenseCLIP.save`` (``.safetensors``).
        arch: ``'RN50'``, ``'RN101'`` or ``'ViT-B/16'`` to insist on; detected from the tensors when None.
        class_names: the K class names; default: the file's own (``meta['CLASSES']`` or the saved vocabulary),
            else the 150 ADE20K classes when K is 150.
        verify: check the tensors of a file written by ``DenseCLIP.save`` against the CRC-32s it records (about
            0.2 s for RN50's 456 MB on 2 threads, a third of the load). False skips that for files you trust; the
            metadata's CRC-32 and everything else are still checked.

    Raises:
        CheckpointError: unreadable, unsafe or inconsistent file (the message names the file and the reason);
            UnnamedClassesError when the file names no classes and ``class_names`` is None (unless K is 150);
            CheckpointNotFoundError, a FileNotFoundError too, when there is no file at ``path``.
        ValueError: ``path`` not a str or os.PathLike; ``class_names`` not a list of strings, of the wrong length
            (ClassCountError) or with a name longer than 3 BPE tokens; ``verify`` not a bool.
    """
    path = path_argument(path)
    verify = as_bool("verify", verify)
    if class_names is not None:
        class_names = _class_names_argument(class_names)
    return load_weights(read_weight_file(path), path, arch, class_names, verify)


def load_weights(wf: WeightFile, path: str, arch: str | None, class_names: list[str] | None,
                 verify: bool = True, *, warn_assumed: bool = True) -> DenseCLIP:  # fmt: skip
    """:func:`load_checkpoint` of a file already read (``wf``, read from ``path``) with checked arguments: a caller
    that reads a file to tell what it is (train's --init) loads it without reading it again. ``wf`` is not changed,
    but the model may hold its tensors themselves (no copy: :func:`_assignable`), so that changing the model's
    weights in place changes them too. ``warn_assumed`` False: no AssumedADE20KClasses warning (for a caller that
    compares the names itself; without a catch_warnings, whose filters are the process's, not the thread's)."""
    file_names: list[str] | None  # None only when class_names are given
    if wf.kind == "safetensors" and is_native(wf.metadata):
        check_crcs(wf.metadata, wf.tensors, path, verify)  # first: damage explains any error the metadata would give
        config, file_names, palette = native_contents(wf.metadata, path)
        check_arch(config, arch, path)
        sd: Mapping[str, torch.Tensor] = wf.tensors
    else:
        sd, meta = _official_state(wf, path)
        config, k = infer_config(sd, path)
        check_arch(config, arch, path)
        palette = meta.get("PALETTE")
        file_names = _official_names(meta, k, path, warn_assumed) if class_names is None else None
    names = list(class_names) if class_names is not None else file_names
    assert names is not None
    head = sd.get("decode_head.conv_seg.weight")
    k = head.shape[0] if head is not None and head.dim() > 0 else len(names)  # else: load_state_strict reports it
    if len(names) != k and class_names is not None:
        raise ClassCountError(len(names), k)
    if len(names) != k:
        raise MismatchedClassNamesError(path, len(names), k)
    try:
        skeleton, sd = _model_skeleton(config, names, sd, path)
    except ValueError as exc:  # the tokenizer's checks (a name with no tokens, or too many)
        if class_names is not None or isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, f"the file's class names cannot be used: {exc}") from None
    # The skeleton takes the file's tensors themselves (load_state_strict assigns them, converted or copied only
    # where they cannot be its own: _assignable): no random initialisation for the file to overwrite, no second copy
    # of the weights. Every parameter and persistent buffer is in the file (load_state_strict refuses a missing
    # key); the one non-persistent buffer, the class tokens, still on the meta device, gets memory here and is made
    # again from the names. Not to_empty(): its empty_like of a meta tensor runs a Python decomposition whose first
    # use imports sympy (a fresh process's start-up, as layers.init_ says of normal_).
    model = skeleton
    load_state_strict(model, _assignable(sd, model.state_dict(), keep=wf.owned), path, assign=True)
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype))
    model.set_classes(names)
    model.palette = _palette(palette, k, path)
    return model.eval()


ALIGNMENT = 64  # bytes: c10's CPU allocator's alignment (gAlignment), the start of every tensor torch allocates


def _assignable(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], keep: bool
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The file's tensors ``sd`` as a model whose state dict is ``expected`` may own them (load_state_dict's assign),
    each in the model's dtype (converted as load_state_dict's copy_ would). With ``keep`` (WeightFile.owned: memory
    torch allocated for each tensor, as torch.load's and io's own safetensors reads), a tensor that is contiguous,
    alone on its storage, covering it exactly and aligned as torch's CPU allocator aligns its memory (ALIGNMENT
    bytes) is kept as it is: the file's memory becomes the model's. Any other is copied: a view of a larger
    storage, one storage under several keys or several tensors (no two weights share memory, and none keeps more of
    the file alive than itself), and every tensor without ``keep`` (the safetensors library's: they start anywhere
    on 8 bytes, and a few of them kept, the aligned ones, held the heap below them, so that glibc gave none of the
    freed rest back: a native RN50 file's process peaked at 2052 MiB by its first logits instead of 1619,
    benchmarks/results/startup_cpu_2threads_75ded4c.md against ..._before_66db1dc.md)."""
    users: dict[int, int] = {}
    for t in sd.values():
        if t.numel():
            users[t.untyped_storage().data_ptr()] = users.get(t.untyped_storage().data_ptr(), 0) + 1
    owned, copied = {}, []
    for key, t in sd.items():
        target = expected[key].dtype if key in expected else t.dtype
        alone = t.numel() == 0 or users[t.untyped_storage().data_ptr()] == 1
        aligned = t.data_ptr() % ALIGNMENT == 0
        if keep and t.dtype == target and covers_its_storage(t) and alone and aligned:
            owned[key] = t
        else:
            owned[key] = torch.empty(t.shape, dtype=target)
            copied.append(key)
    # every copy's memory taken before any is filled, as the model's was when load_state_dict copied into it
    for key in copied:
        owned[key].copy_(sd[key])
    return owned


MAX_BLOCKS = 512  # residual / transformer blocks of all the stacks; the released models have 27 to 48
MAX_EXTRA_ELEMENTS = 2**24  # elements of the model that the file does not hold (the class tokens: K x name length)


def _model_skeleton(
    config: DenseCLIPConfig, names: list[str], sd: Mapping[str, torch.Tensor], path: str
) -> tuple[DenseCLIP, Mapping[str, torch.Tensor]]:
    """The model that ``config`` describes, built on the meta device (no memory for weights, no initialisation), once
    checked to hold exactly the file's tensors, and those tensors with any BatchNorm ``num_batches_tracked`` counter
    the file lacks as 0 (converters and pruned state dicts drop the integer buffers; PyTorch itself so fills a
    pre-1.0 checkpoint's: with a momentum, as every BatchNorm here has, the counter changes no output); else
    CheckpointError naming the file. Sizes read from a file (a text
    width of 2**17 in a native file's config, a huge expanded tensor in an official one) must not allocate gigabytes,
    or fail with a raw RuntimeError, before the mismatch is reported. The block count is bounded first: a meta model
    still takes ~0.1 MB and ~1 ms a block. ValueError from the tokenizer for class names it refuses."""
    from ..model import DenseCLIP
    from ..model.layers import MetaInitsSkipped

    blocks = sum(config.vision.layers) + config.text.layers + config.decoder.layers
    if blocks > MAX_BLOCKS:
        raise CheckpointError(
            path, f"the architecture has {blocks} blocks (vision.layers {list(config.vision.layers)}, text.layers "
            f"{config.text.layers}, decoder.layers {config.decoder.layers}); more than the {MAX_BLOCKS} read (the "
            "released models have 27 to 48)"
        )  # fmt: skip
    with torch.device("meta"), MetaInitsSkipped():  # (torch 2.10's meta uniform_ imports sympy: see the class)
        skeleton = DenseCLIP(config, names)
    expected = skeleton.state_dict()
    counters = [k for k in expected if k.endswith(".num_batches_tracked") and k not in sd]
    if counters:
        sd = {**sd, **{k: torch.zeros((), dtype=torch.long) for k in counters}}
    problems = state_problems(expected, sd)
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    extra = sum(t.numel() for t in (*skeleton.parameters(), *skeleton.buffers())) - sum(t.numel() for t in sd.values())
    if extra > MAX_EXTRA_ELEMENTS:
        raise CheckpointError(path, f"the model it describes has {extra} elements besides the file's tensors (more "
                                    f"than {MAX_EXTRA_ELEMENTS}: {len(names)} class names of "
                                    f"{config.text.class_token_length} tokens?)")  # fmt: skip
    return skeleton, sd


def _class_names_argument(class_names: Any) -> list[str]:
    """``class_names`` as a list, or ValueError naming the argument: a string would be taken as its characters, a
    set in an arbitrary order."""
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Iterable):
        raise ValueError(f"class_names must be a list of strings, got {type(class_names).__name__}: "
                         f"{reprlib.repr(class_names)}")  # fmt: skip
    if isinstance(class_names, (AbstractSet, Mapping)):  # a set's order is arbitrary: names on the wrong outputs
        raise ValueError(f"class_names must be in the order of the head's outputs (a list or tuple), got "
                         f"{type(class_names).__name__}")  # fmt: skip
    names = list(class_names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"class_names[{i}] must be a string, got {type(name).__name__}: {reprlib.repr(name)}")
    return [str(name) for name in names]  # a numpy array's np.str_ values: the plain strings (repr 'cat', not np.str_)


# CLIP weights given where a DenseCLIP checkpoint goes (segment, export, info, eval): the command line's way from them
FROM_CLIP_CLI = ", or on the command line fine-tune DenseCLIP from them: denseclip-fast train --init PATH"


def _official_state(wf: WeightFile, path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if wf.kind == "torchscript":
        raise CheckpointError(
            path, "this is a TorchScript archive (CLIP weights?), not a DenseCLIP checkpoint; "
            f"use DenseCLIP.from_clip(path, arch, class_names) to initialise a model from CLIP weights{FROM_CLIP_CLI}"
        )  # fmt: skip
    obj = wf.tensors if wf.kind == "safetensors" else wf.obj
    meta: Any = None  # anything but a mapping is no meta; never tested for truth (a tensor or an array raises)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        meta = obj.get("meta")
        obj = obj["state_dict"]
    check_not_a_training_state(obj, path)
    if not isinstance(obj, Mapping) or not obj:
        found = f"an empty {type(obj).__name__}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(path, f"not a checkpoint: expected a state dict or {{'state_dict': ...}}, found {found}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "visual.conv1.weight" in sd or "token_embedding.weight" in sd:
        raise CheckpointError(
            path, "these are CLIP weights, not a DenseCLIP checkpoint; use DenseCLIP.from_clip(path, arch, "
            f"class_names){FROM_CLIP_CLI}"
        )  # fmt: skip
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(path, f"state dict entries that are not tensors: {key_listing(not_tensors)}")
    return sd, dict(meta) if isinstance(meta, Mapping) else {}


def _official_names(meta: Mapping[str, Any], k: int, path: str, warn_assumed: bool = True) -> list[str]:
    classes = meta.get("CLASSES")
    if classes is not None:
        # a list or tuple (mmcv writes a tuple): a 0-d array or tensor is Iterable too, but iterating it fails
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise CheckpointError(path, f"meta['CLASSES'] is not a list of strings, got {type(classes).__name__}")
        return list(classes)
    if k == len(ADE20K_CLASSES):
        if not warn_assumed:
            return list(ADE20K_CLASSES)
        warnings.warn(
            f"{path}: no class names in the file (meta['CLASSES']); assuming the 150 ADE20K classes. "
            "Pass class_names=[...] to choose.",
            AssumedADE20KClasses,
            stacklevel=3,
        )
        return list(ADE20K_CLASSES)
    raise UnnamedClassesError(path, k)


def _palette(palette: Any, k: int, path: str) -> list[tuple[int, int, int]] | None:
    """A usable palette (K RGB triples of integers 0..255) or None; a malformed one (wrong count, floats, values
    out of range, infinities, anything else) is dropped with a warning."""
    if palette is None:
        return None
    colors = rgb_triples(palette)
    if colors is None or len(colors) != k:
        warnings.warn(f"{path}: ignoring the palette in the file: it is not {k} RGB triples of integers in 0..255",
                      stacklevel=3)  # fmt: skip
        return None
    return colors

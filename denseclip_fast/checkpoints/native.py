"""denseclip_fast's own checkpoint format: one ``.safetensors`` file.

The tensors are the model's state dict under the official names; the safetensors header metadata holds
``format = "denseclip_fast"``, ``format_version``, ``config`` (the architecture as JSON, see DenseCLIPConfig),
``class_names`` (JSON list), optionally ``palette`` (JSON list of RGB triples), and ``crc32``: a JSON object of
CRC-32s (zlib's, 8 lowercase hex digits) giving each tensor's name the CRC of its bytes as the file stores them, and
``"__metadata__"`` (a name safetensors reserves) the CRC of the other metadata entries: for each key in sorted order,
the UTF-8 bytes of the key, a NUL, the value, a NUL. safetensors records no checksum, so without them a bit flipped
inside a tensor (a failing disk, a copy that went wrong) loaded as a wrong weight, and one in a class name as another
name. Files written before the CRCs were added (2026-12-04) have none and load unchecked. Any safetensors reader can
list the tensors and read the JSON; nothing in the file is executable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from ..config import DenseCLIPConfig
from .crc import crc32
from .io import CheckpointError, excerpt, path_argument, replaced_atomically, short_repr
from .official import key_listing

if TYPE_CHECKING:
    from ..model import DenseCLIP

FORMAT = "denseclip_fast"
FORMAT_VERSION = "1"
CRC_KEY = "crc32"
METADATA_ENTRY = "__metadata__"  # the record's entry for the metadata: safetensors reserves the name for its own
_HEX8 = re.compile(r"[0-9a-f]{8}")


OTHER_FORMATS = {  # suffixes of formats that a saved model is not in, and what they say it is
    ".pth": "torch.save's pickle", ".pt": "torch.save's pickle", ".bin": "torch.save's pickle",
    ".ckpt": "a training checkpoint", ".pkl": "a pickle", ".pt2": "an AOTInductor package", ".onnx": "an ONNX graph",
    ".engine": "a TensorRT engine", ".plan": "a TensorRT engine",
}  # fmt: skip


def save_native(model: DenseCLIP, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` (replaced atomically). CheckpointError naming the path when it cannot be written:
    a missing or unwritable directory, a directory at ``path``, a failed write (the old file is then kept). The
    model's CPU tensors are written as they are, not copied first: one that another thread changes during the save
    (an optimiser step) leaves a file whose bytes fail their CRCs, which load_checkpoint refuses."""
    from safetensors import SafetensorError
    from safetensors.torch import save, save_file

    path = path_argument(path)
    if path.endswith((os.sep, "/")):  # realpath drops it: "new/" was written as a file "new"
        raise CheckpointError(path, "cannot save: the path ends in a separator, as a directory's; name the file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in OTHER_FORMATS:  # the file would claim a format it is not in: torch.load of a .pth one fails
        raise CheckpointError(path, f"cannot save: the file is written in safetensors (denseclip_fast's format), not "
                                    f"as {OTHER_FORMATS[suffix]}, which the suffix {suffix} says; name it "
                                    f"{os.path.splitext(os.path.basename(path))[0]}.safetensors")  # fmt: skip
    state = model.state_dict()
    if any(v.is_meta for v in state.values()):  # no data to write: torch's NotImplementedError from the copy
        raise CheckpointError(path, "cannot save: the model is on the meta device (shapes without data); load or "
                                    "initialise its weights first")  # fmt: skip
    reparametrized = reparametrized_weights(model)
    if reparametrized:  # their parts (weight_orig and weight_mask, parametrizations.weight.original0 ...) are no
        # DenseCLIP's keys: the file was written, and load_checkpoint refused it (missing and unexpected keys)
        raise CheckpointError(path, f"cannot save: weights of the model are pruned or parametrized "
                                    f"({key_listing(reparametrized, 5)}): the state dict holds their parts, not the "
                                    "weights, and load_checkpoint would refuse the file; make them plain first "
                                    "(torch.nn.utils.prune.remove(module, name), torch.nn.utils.parametrize."
                                    "remove_parametrizations(module, name), torch.nn.utils.remove_weight_norm)")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "class_names": json.dumps(model.class_names),
    }
    if model.palette is not None:
        metadata["palette"] = json.dumps([list(c) for c in model.palette])
    crcs = dict(sorted(tensor_crc32s(tensors).items()))
    metadata[CRC_KEY] = json.dumps({METADATA_ENTRY: metadata_crc32(metadata), **crcs})
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CheckpointError(path, f"cannot save: directory {parent} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(path, "cannot save: it is a directory (give a file name, e.g. model.safetensors)")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(path, f"cannot save: directory {parent} is not writable")
    try:
        with replaced_atomically(path) as partial:
            if partial == path:  # not a regular file (/dev/null, a FIFO): written in place, where save_file would
                with open(partial, "wb") as f:  # write a file of its own and rename it over the path
                    f.write(save(tensors, metadata=metadata))
            else:
                save_file(tensors, partial, metadata=metadata)
    except (OSError, SafetensorError) as exc:  # e.g. a full disk, or permissions os.access cannot see
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(path, f"cannot save: {reason}") from None


def reparametrized_weights(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s weights that PyTorch computes from others at every forward: torch.nn.utils.parametrize's
    parametrizations, torch.nn.utils.prune's masks and the older weight_norm and spectral_norm hooks."""
    from torch.nn.utils import parametrize

    found = []
    for prefix, module in model.named_modules():
        names = list(module.parametrizations) if parametrize.is_parametrized(module) else []
        names += [name for name, _ in weight_hooks(module)]
        found += [f"{prefix}.{name}" if prefix else name for name in names]
    return found


def weight_hooks(module: torch.nn.Module) -> list[tuple[str, Any]]:
    """(weight name, hook) of each forward pre-hook of ``module`` itself that recomputes one of its weights from
    others at every forward: torch.nn.utils.prune's masks and the older weight_norm and spectral_norm (parametrize's
    parametrizations are ``module.parametrizations``)."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = module._forward_pre_hooks.values()
    return [(hook._tensor_name if isinstance(hook, prune.BasePruningMethod) else hook.name, hook) for hook in hooks
            if isinstance(hook, (prune.BasePruningMethod, WeightNorm, SpectralNorm))]  # fmt: skip


def metadata_crc32(metadata: Mapping[str, str]) -> str:
    """The CRC-32 of the metadata entries other than the record itself (the module's docstring says how)."""
    crc = 0
    for key in sorted(metadata):
        if key != CRC_KEY:
            crc = crc32(f"{key}\0{metadata[key]}\0".encode(), crc)
    return f"{crc:08x}"


def tensor_crc32s(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Name -> CRC-32 (zlib's, 8 lowercase hex digits) of each tensor's bytes, as safetensors stores them (contiguous
    CPU tensors; :func:`crc.crc32`). The tensors are shared among ``torch.get_num_threads()`` threads, the CRC
    releasing the GIL, in groups of about equal bytes, one a thread (:func:`balanced_groups`): with a task a tensor,
    the 624 tensors of RN50 took 45-52 ms on the CI's 2 threads, one thread alone 40, the groups 28-32 (probes).
    One at a time where no thread can start (at interpreter shutdown)."""
    names = list(tensors)

    def crcs(group: list[str]) -> list[str]:
        return [f"{crc32(tensors[n].reshape(-1).view(torch.uint8).numpy().data):08x}" for n in group]

    workers = min(torch.get_num_threads(), len(names))
    if workers > 1:
        groups = balanced_groups(names, [tensors[n].nbytes for n in names], workers)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="denseclip_fast-crc32") as pool:
                found = list(pool.map(crcs, groups))
            return {n: crc for group, values in zip(groups, found) for n, crc in zip(group, values)}
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown" (an atexit handler, a
            pass  # thread outliving the main one): computed below, where an error of crcs itself is raised again
    return dict(zip(names, crcs(names)))


def balanced_groups(names: list[str], sizes: list[int], count: int) -> list[list[str]]:
    """``names`` in ``count`` groups whose ``sizes`` sum about alike: the largest first, each to the group with the
    least so far."""
    groups: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for size, name in sorted(zip(sizes, names), key=lambda pair: -pair[0]):
        least = loads.index(min(loads))
        groups[least].append(name)
        loads[least] += size
    return groups


def check_crcs(
    metadata: dict[str, str], tensors: Mapping[str, torch.Tensor], path: str, check_tensors: bool = True
) -> None:  # fmt: skip
    """CheckpointError when a native file's metadata or (with ``check_tensors``) tensors fail the CRC-32s its
    ``crc32`` record holds (naming the tensors), or when the record is damaged (not a JSON object of 8-hex-digit
    strings with the metadata's entry). A file without the record (written before it existed) is not checked.
    Tensors the record does not name, and names it has that the file lacks, are left to load_state_strict's missing
    and unexpected keys."""
    if CRC_KEY not in metadata:
        return
    recorded = _json(metadata, CRC_KEY, path)
    if (
        not isinstance(recorded, dict)
        or METADATA_ENTRY not in recorded
        or not all(isinstance(v, str) and _HEX8.fullmatch(v) for v in recorded.values())
    ):
        raise CheckpointError(path, f"damaged denseclip_fast metadata: {CRC_KEY!r} should be a JSON object of "
                                    f"8-hex-digit CRC-32s, {METADATA_ENTRY!r} among them, got "
                                    f"{excerpt(metadata[CRC_KEY], 80)}")  # fmt: skip
    advice = f"copy or download it again (a file that another tool edited: remove its {CRC_KEY!r} metadata entry)"
    if metadata_crc32(metadata) != recorded[METADATA_ENTRY]:
        raise CheckpointError(path, "corrupt: its metadata (architecture, class names, palette) fails the CRC-32 "
                                    f"recorded in the file: it was damaged after it was saved; {advice}")  # fmt: skip
    if not check_tensors:
        return
    found = tensor_crc32s({n: t for n, t in tensors.items() if n in recorded})
    bad = sorted(n for n in found if found[n] != recorded[n])
    if bad:
        raise CheckpointError(path, f"corrupt: {len(bad)} tensor(s) fail the CRC-32 recorded in the file "
                                    f"({key_listing(bad, 5)}): "
                                    "its bytes are not those saved (damaged since, or changed by another thread "
                                    f"while saved); {advice}")  # fmt: skip


def is_native(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def native_contents(metadata: dict[str, str], path: str) -> tuple[DenseCLIPConfig, list[str], Any]:
    """(config, class names, palette or None) from a native file's metadata. The config and the names are checked
    (CheckpointError naming the file, the key and what is wrong); the palette is load_checkpoint's to check."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"denseclip_fast format version {version!r} is not supported (expected 1)")
    raw_config = _json(metadata, "config", path)
    try:
        config = DenseCLIPConfig.from_dict(raw_config)
    except ValueError as exc:
        raise CheckpointError(path, f"invalid architecture in the metadata 'config': {exc}") from None
    names = _json(metadata, "class_names", path)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(path, "the metadata 'class_names' must be a non-empty JSON list of strings, got "
                                    f"{excerpt(short_repr(names), 80)}")  # fmt: skip
    palette = _json(metadata, "palette", path) if "palette" in metadata else None
    return config, names, palette


def _json(metadata: dict[str, str], key: str, path: str) -> Any:
    if key not in metadata:
        raise CheckpointError(path, f"damaged denseclip_fast metadata: no {key!r} entry")
    try:
        return json.loads(metadata[key])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; RecursionError: absurd nesting
        raise CheckpointError(path, f"damaged denseclip_fast metadata: {key!r} is not valid JSON ({exc})") from None

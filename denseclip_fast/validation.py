"""Checks of user-given devices and output paths, shared by the command line and the trainer: each raises a
ValueError that names the argument (``name``: an option such as ``--device`` or a config field such as
``device``), says what it expects and what it got, before any work starts."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch

DEVICE_EXAMPLES = "'cpu', 'cuda' or 'cuda:N'"


IGNORE = 255  # the data sets' "no class" label value (ADE20K's reduced 0, a generic layout's unlabelled pixels)
MAX_LABEL = 65535  # the largest value of a (16-bit) label PNG


def check_ignore_index(value: object, name: str = "ignore_index") -> int:
    """``value`` if it is a label PNG value, 0..65535 (255 in 8-bit labels; e.g. 65535 in 16-bit ones with 256
    classes or more); ValueError naming ``name`` otherwise (a value no label holds would silently ignore nothing)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= int(value) <= MAX_LABEL:
        raise ValueError(f"{name} must be a label value in 0..{MAX_LABEL} (255 for 8-bit labels, e.g. 65535 for "
                         f"16-bit ones), got {value!r}")  # fmt: skip
    return int(value)


def finite_real(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (an int, a float or a numpy scalar; not a bool), else
    None. An int past float's range is not finite (float() would raise OverflowError, math.isfinite too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        result = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a plain int or float (not a bool, not a numpy scalar), finite: what a config file or a
    keyword argument gives for a number field."""
    return isinstance(value, (int, float)) and finite_real(value) is not None


def check_int(
    name: str, value: object, minimum: int = 1, why: str = "", maximum: int | None = None, why_most: str = ""
) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum`` and, given a ``maximum``,
    at most that; ``why`` and ``why_most`` follow the bounds in the messages."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}{why_most}, got {value!r}")


def plain_scalar(value: object) -> object:
    """``value`` as the Python scalar it stands for where it is a numpy bool, integer or float (a number computed
    with numpy: ``np.float32(1e-4)``, a size from an array), else ``value`` itself: what the checks take and what JSON
    writes (``json.dumps(np.int64(3))`` raises, ``np.bool_`` is no bool). Other numpy scalars (complex, strings,
    dates) are left to the checks, which refuse them."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def plain_value(value: object) -> object:
    """:func:`plain_scalar` of ``value``, or of each element of a tuple (any kind: a named tuple, a torch.Size; made
    a plain tuple) or a list: a config field's value as JSON holds it (DenseCLIPConfig's, TrainConfig's)."""
    if isinstance(value, tuple):
        return tuple(map(plain_scalar, value))
    if isinstance(value, list):
        return list(map(plain_scalar, value))
    return plain_scalar(value)


def check_bool(name: str, value: object) -> None:
    """ValueError naming ``name`` unless ``value`` is True or False (a string such as "no" would be true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def as_bool(name: str, value: object) -> bool:
    """:func:`check_bool` for an argument of the Python API, where a numpy bool (``np.True_``, an element of a mask)
    is a bool too: ``value`` as a plain bool. An int (1) or a string ("no") is still refused."""
    value = plain_scalar(value) if isinstance(value, np.bool_) else value
    check_bool(name, value)
    assert isinstance(value, bool)
    return value


def as_int(
    name: str, value: object, minimum: int = 1, why: str = "", maximum: int | None = None, why_most: str = ""
) -> int:
    """:func:`check_int` for an argument of the Python API, where a numpy integer (a size computed with numpy) is
    an int too: ``value`` as a plain int. Config fields stay plain ints (check_int): they are written as JSON."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    check_int(name, value, minimum, why, maximum, why_most)
    assert isinstance(value, int)
    return value


def given_dtype(dtype: object, allowed: Sequence[torch.dtype]) -> str:
    """A wrong ``dtype`` argument as an error message shows it: a string (the command line's names) is said to be
    one ("float32" printed bare read as one of the allowed values), with the torch.dtype to pass when it names one
    of ``allowed``."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype, None)
        return f"the string {dtype!r}" + (f" (pass torch.{dtype})" if named in allowed else "")
    return str(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)


def check_device(text: str | torch.device, name: str = "device", present: bool = True) -> torch.device:
    """The torch device ``text`` names (a str or a torch.device), if this machine can run on it: the CPU, or a CUDA
    GPU that is present. ValueError naming ``name`` for an empty string, a string torch does not parse ("gpu"),
    another device type ("meta", "mps": the engine and the trainer run on CPUs and CUDA GPUs), or (unless
    ``present`` is False: a device named for another machine) a GPU that is not there."""
    if isinstance(text, torch.device):
        device = text
    elif not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must be a device such as {DEVICE_EXAMPLES}, got {text!r}")
    else:
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(f"{name} must be a device such as {DEVICE_EXAMPLES}, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be a CPU or CUDA device such as {DEVICE_EXAMPLES}, got {text!r}")
    if device.type == "cpu" and device.index not in (None, 0):  # torch parses "cpu:7" and runs on the CPU
        raise ValueError(f"{name} {text!r}: the CPU is one device, 'cpu' (the engine uses its cores together)")
    if device.type == "cuda" and present:
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {text!r} but no CUDA GPU is available; use {name} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} is {text!r} but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}")
    return device


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest ancestor that exists (what makedirs would create the rest under)."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def check_writable_dir(path: str, name: str) -> None:
    """ValueError naming ``name`` unless ``path`` is a directory this process can write in, or one that makedirs
    can create (its nearest existing ancestor is a writable directory)."""
    if not path:
        raise ValueError(f"{name} must name a directory, got {path!r}")
    if os.path.islink(path) and not os.path.exists(path):  # said "exists and is not a directory"
        raise ValueError(f"{name} {path!r} is a symbolic link to {os.readlink(path)!r}, which cannot be reached "
                         "(missing, or a loop): create the folder it points to, or name another")  # fmt: skip
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} exists and is not a directory")
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise ValueError(f"{name} {path!r} cannot be created: {base!r} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path!r}: no permission to write in {base!r}")


def check_not_an_input(path: str, name: str, inputs: dict[str, str]) -> None:
    """ValueError naming ``name`` when the file to write at ``path`` is one of ``inputs`` (argument name -> path):
    the same path, through a link, or a hard link to it. Writing there would replace the input."""
    for what, given in inputs.items():
        same = os.path.realpath(path) == os.path.realpath(given)
        if not same and os.path.exists(path) and os.path.exists(given):
            same = os.path.samefile(path, given)
        if same:
            raise ValueError(f"{name} {path!r} is the {what} file {given!r}: writing it would replace that file; "
                             "choose another path")  # fmt: skip


def not_a_file(path: str) -> str:
    """What is wrong with ``path``, which is not a regular file: "does not exist", or, when something is there (a
    directory, a FIFO, a broken link's name), "is not a regular file"."""
    return "does not exist" if not os.path.lexists(path) else "is not a regular file"


def check_not_in_folder(path: str, name: str, folder: str, folder_name: str) -> None:
    """ValueError naming ``name`` when ``path`` is an existing file inside ``folder`` (an input folder, such as a
    data set, named ``folder_name``), through links too: writing it would replace one of that folder's files (the
    next run over the folder reads what was written)."""
    if not os.path.lexists(path):
        return
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if real != root and os.path.commonpath([real, root]) == root:
        raise ValueError(f"{name} {path!r} is a file of {folder_name} {folder!r}: writing it would replace it; "
                         "choose another path")  # fmt: skip


def check_writable_file(path: str, name: str, create_parents: bool) -> None:
    """ValueError naming ``name`` unless a file can be written at ``path``: not a directory, and in a writable
    directory (one that exists, or, with ``create_parents``, one that makedirs can create); for a symbolic link, the
    directory of its target (checkpoints.io.replaced_atomically writes there, keeping the link)."""
    if not path:
        raise ValueError(f"{name} must name a file, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a directory; expected the path of the file to write")
    if path.endswith((os.sep, "/")):  # abspath (and Path) drop the separator: "new/" was written as a file "new"
        raise ValueError(f"{name} {path!r} ends in a path separator, as a directory's path; expected the path of the "
                         "file to write")  # fmt: skip
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{name} {path!r}: no permission to overwrite it")
    shown, folder = repr(path), os.path.dirname(os.path.abspath(path))
    if os.path.islink(path):  # the file is written where the link points (the link is kept), in a folder not made
        target = os.path.realpath(path)
        shown, folder, create_parents = f"{path!r} (a link to {target!r})", os.path.dirname(target), False
    base = _existing_ancestor(folder) if create_parents else folder
    if not os.path.isdir(base):
        what = f"the directory {base!r} does not exist" if not os.path.lexists(base) else f"{base!r} is not a directory"
        raise ValueError(f"{name} {shown}: {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {shown}: no permission to write in {base!r}")

"""The training configuration: one dataclass, presets for the official ADE20K recipes, YAML/JSON files.

The official recipe (DenseCLIP's ``configs/denseclip_fpn_*_512x512_80k.py``): AdamW, lr 1e-4, weight decay 1e-4,
backbone lr x0.1, no weight decay on normalisation layers, poly schedule (power 0.9, min lr 1e-6) after 1500 linear
warm-up iterations (warm-up ratio 1e-6), 80k iterations, global batch 32, crop 512 (640 for ViT-B/16); loss:
cross-entropy of the head + 0.4 x cross-entropy of score / tau (the identity head), ignore index 255.
Where the official code differs from what it claims, this trainer does what it claims: the text encoder is truly
frozen (no gradient, no optimiser state; the official lr_mult 0 under a poly schedule with min_lr still moved it),
BatchNorm is plain unless SyncBatchNorm is asked for, anomaly detection is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import (
    ACTIVATIONS,
    ARCH_ALIASES,
    ARCHS,
    MIN_IMAGE_SIDE,
    DenseCLIPConfig,
    canonical_arch,
    meant_arch,
    preset,
)
from ..validation import (
    check_bool,
    check_device,
    check_ignore_index,
    check_int,
    check_writable_dir,
    is_finite_number,
    not_a_file,
    plain_value,
)
from .data import not_a_directory

LAYOUTS = ("ade20k", "generic")
MAX_SEED = 2**32 - 1
# sanity bounds, checked before any work: a crop of 1e22 pixels ended in a traceback from torch.zeros in a training
# step, a batch of 1e22 images in itertools' message; 8192 is the largest side evaluation resizes to
MAX_CROP = 8192
MAX_BATCH = 65536
# DataLoader worker processes per training process: 10**6 started processes until the machine gave out
MAX_WORKERS = 256
# values in a YAML config counted with its aliases expanded: a few lines of aliases of aliases hold 1e9 of them,
# which printing the config or writing config.json would spell out until memory ran out
MAX_CONFIG_VALUES = 100_000
# number fields: (name, lowest, highest, whether the lowest is excluded), finite; learning rates above 1 are refused
# (AdamW's first step moves a weight by about lr x 10: larger ones overflow float32 weights)
NUMBER_RANGES: tuple[tuple[str, float, float, bool], ...] = (
    ("lr", 0, 1, True), ("min_lr", 0, 1, False), ("weight_decay", 0, math.inf, False),
    ("backbone_lr_mult", 0, math.inf, False), ("warmup_ratio", 0, 1, False),
    ("poly_power", 0, math.inf, False), ("aux_weight", 0, math.inf, False),
    ("cat_max_ratio", 0, 1, True),
)  # fmt: skip


def default_num_workers() -> int:
    """The DataLoader workers of a run that leaves ``num_workers`` unset: 4, or this process's share of the CPUs it
    may run on where that is fewer: the CPUs divided by the processes torchrun started on this machine
    (``LOCAL_WORLD_SIZE``), at least 1 (4 workers on a 2-core machine made PyTorch warn that they may slow the run or
    freeze it; 8 processes of 4 workers each on 16 CPUs were 32 workers). A process that torchrun bound to fewer CPUs
    than its own (``--numa-binding``) has its share already: its CPUs are not divided again."""
    try:
        own = os.sched_getaffinity(0)
        cpus = len(own)
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        own, cpus = None, os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdecimal() and int(local) > 0 else 1  # not "²", a digit int() refuses
    if processes > 1 and own is not None:
        try:  # torchrun, the parent, runs on every CPU its processes share
            bound = own < os.sched_getaffinity(os.getppid())
        except OSError:  # the parent is gone
            bound = False
        processes = 1 if bound else processes
    return max(1, min(4, cpus // processes))


@dataclass(kw_only=True)
class TrainConfig:
    """Every knob of a training run. ``arch`` is a released architecture or a path to an architecture JSON file
    (``DenseCLIPConfig.to_dict()``); ``init`` is CLIP weights for ``DenseCLIP.from_clip``, a DenseCLIP
    checkpoint (checkpoints/transfer.py) or ``"none"``; ``extra``
    is free-form notes, not a knob."""

    arch: str = "RN50"
    data: str = ""
    layout: str = "ade20k"
    init: str = "none"
    # the CLIP transformers' MLP activation (DenseCLIPConfig.activation), "" for the architecture's (presets:
    # "quick_gelu", OpenAI CLIP's); "gelu" for open_clip weights trained with GELU (most non-OpenAI ones)
    clip_activation: str = ""
    work_dir: str = "work_dirs/denseclip"
    iters: int = 80_000
    batch_size: int = 32  # global: per step, over all processes and accumulation micro-steps
    accum: int = 1
    crop: int | None = None  # None: the architecture's slide window (512; 640 for ViT-B/16), see apply_arch_defaults
    lr: float = 1e-4
    weight_decay: float = 1e-4
    norm_decay: str = "all"  # no weight decay on: "all" normalisation layers, or "official" (mmcv's name matching)
    backbone_lr_mult: float = 0.1
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    min_lr: float = 1e-6
    aux_weight: float = 0.4  # the identity head's cross-entropy of score / tau
    ignore_index: int = 255  # the label value of ignored pixels; >= the class count (16-bit labels: e.g. 65535)
    img_scale: tuple[int, int] | None = None  # None: the architecture's test scale ((2048, 512); ViT-B/16 (2048, 640))
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # 1: no check
    seed: int = 0
    device: str = ""  # "cpu", "cuda", "cuda:N"; "": cuda when available
    amp: str = "bf16"  # autocast: "bf16", "fp16" (with a gradient scaler) or "none" (float32)
    grad_checkpointing: bool = False
    channels_last: bool | None = None  # images and weights in NHWC; None: on CUDA (cuDNN's tensor-core layout) only
    sync_bn: bool = False
    cudnn_benchmark: bool = True  # cuDNN times its convolution algorithms once per shape (mmseg's runtime default)
    num_workers: int | None = None  # DataLoader workers per process; None: default_num_workers() where the run is
    checkpoint_interval: int = 8000
    eval_interval: int = 0  # 0: evaluate only at the end
    log_interval: int = 50
    eval_mode: str = "slide"
    max_checkpoints: int = 3  # the newest kept; 0: all
    tensorboard: bool = True
    # free-form notes kept with the run (config.json, each state's config; what a YAML comment cannot be), never
    # read by the trainer: a knob is a field above, and an unknown one is refused
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # a list (YAML's, JSON's) is the tuple it stands for; anything else: validate
        if isinstance(self.img_scale, list):
            self.img_scale = tuple(self.img_scale)
        if isinstance(self.ratio_range, list):
            self.ratio_range = tuple(self.ratio_range)

    def workers(self) -> int:
        """The DataLoader workers a process of the run starts: ``num_workers``, or, left None, this machine's
        :func:`default_num_workers`."""
        return default_num_workers() if self.num_workers is None else self.num_workers

    def apply_arch_defaults(self) -> None:
        """Fill ``crop`` and ``img_scale`` left None with the architecture's slide window and test scale, which the
        official recipes train at: 512 and (2048, 512) for the ResNets, 640 and (2048, 640) for ViT-B/16. They are
        filled when a run starts (:meth:`validate`), so that an ``arch`` set after the config was made (``--arch``
        over a config file) brings its own sizes; a size that was given stays."""
        if self.crop is None or self.img_scale is None:
            arch = self.model_config()
            if self.crop is None:
                self.crop = arch.slide_crop
            if self.img_scale is None:
                self.img_scale = (arch.test_scale[0], arch.test_scale[1])

    def validate(self, template: bool = False, init_file: bool = True) -> None:
        """ValueError naming the field for anything a run cannot start with; fills the architecture's defaults
        first (:meth:`apply_arch_defaults`). ``template`` (``train --print-config``: a config to print, perhaps to
        run elsewhere) lets ``data`` be unset and checks no more of this machine than what is given exists: a
        ``data`` given must be a directory, but a CUDA ``device`` need not be present here and ``work_dir`` need not
        be writable here. ``init_file`` False leaves the ``init`` file unchecked (:meth:`check_init`): a resumed run
        takes every weight from its checkpoint, and the file it started from may have moved since. A numpy number
        or bool in a field (or in a pair: img_scale, ratio_range), a value computed with numpy in a sweep, is
        stored as the Python int, float or bool it stands for (config.json holds those), then checked as one."""
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, plain_value(getattr(self, spec.name)))
        for name in ("arch", "data", "init", "work_dir"):  # a pathlib.Path is a path: kept as the str it stands for
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            if not isinstance(getattr(self, name), str):
                hint = " ('none' for random weights)" if name == "init" and value is None else ""
                raise ValueError(f"{name} must be a str (or a path), got {type(value).__name__}: {value!r}{hint}")
        for name in ("grad_checkpointing", "sync_bn", "cudnn_benchmark", "tensorboard"):
            check_bool(name, getattr(self, name))  # "false" would be true
        if not isinstance(self.device, str):  # 0 or None would be "": cuda when available
            raise ValueError(f"device must be a str ('cpu', 'cuda', 'cuda:N'; '' for cuda when available), got "
                             f"{self.device!r}")  # fmt: skip
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra (notes saved in config.json) must be a mapping, got {self.extra!r}")
        for name, example in (("img_scale", "(2048, 512)"), ("ratio_range", "(0.5, 2.0)")):
            value = getattr(self, name)
            if not (isinstance(value, tuple) or (value is None and name == "img_scale")):
                raise ValueError(f"{name} must be a pair such as {example}, got {value!r}")
        self.apply_arch_defaults()
        assert self.crop is not None and self.img_scale is not None
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not self.data and not template:
            raise ValueError("data must name the dataset directory (--data DIR)")
        if self.data and not os.path.isdir(self.data):
            raise ValueError(f"data directory {self.data!r} {not_a_directory(self.data)}")
        if init_file:
            self.check_init()
        for name in ("iters", "batch_size", "accum", "checkpoint_interval", "log_interval"):
            check_int(name, getattr(self, name), maximum=MAX_BATCH if name == "batch_size" else None)
        check_int("crop", self.crop, MIN_IMAGE_SIDE, " (the stride-32 level keeps a pixel)", MAX_CROP)
        for name in ("eval_interval", "num_workers", "max_checkpoints", "warmup_iters"):
            if name != "num_workers" or self.num_workers is not None:  # None: the machine's default
                check_int(name, getattr(self, name), 0, maximum=MAX_WORKERS if name == "num_workers" else None)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in 0..{MAX_SEED}, got {self.seed!r}")
        self.ignore_index = check_ignore_index(self.ignore_index)  # an integer of another kind: the int JSON holds
        for name, low, high, low_excluded in NUMBER_RANGES:
            value = getattr(self, name)
            if not is_finite_number(value) or not (low < value if low_excluded else low <= value) or value > high:
                limits = f"{'>' if low_excluded else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
                raise ValueError(f"{name} must be a finite number {limits}, got {value!r}")
        for name in ("backbone_lr_mult", "weight_decay"):  # the backbone's learning rate; AdamW's decay factor >= 0
            if self.lr * getattr(self, name) > 1:
                raise ValueError(f"{name} x lr must be <= 1, got {getattr(self, name)!r} x {self.lr!r}")
        if len(self.img_scale) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_CROP
                                               for v in self.img_scale):  # fmt: skip
            raise ValueError(f"img_scale must be two positive ints (long side, short side) of at most {MAX_CROP}, got "
                             f"{self.img_scale!r}")  # fmt: skip
        low, high = self.ratio_range if len(self.ratio_range) == 2 else (None, None)
        if not (is_finite_number(low) and is_finite_number(high) and 0 < low <= high):
            raise ValueError(f"ratio_range must be two finite numbers 0 < low <= high, got {self.ratio_range!r}")
        if int(min(self.img_scale) * low) < 1:
            raise ValueError(f"ratio_range's low end {low} scales img_scale {self.img_scale} below a pixel")
        if self.device:  # "": cuda when available
            check_device(self.device, "device", present=not template)
        if not template:
            check_writable_dir(self.work_dir, "work_dir")
        elif not self.work_dir:  # a template's may be another machine's, but never none
            raise ValueError("work_dir must name a directory, got ''")
        if self.batch_size % self.accum:
            raise ValueError(f"batch_size (--batch-size) {self.batch_size} must be divisible by accum (--accum) "
                             f"{self.accum}")  # fmt: skip
        if self.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"amp must be 'bf16', 'fp16' or 'none', got {self.amp!r}")
        if self.norm_decay not in ("all", "official"):
            raise ValueError(f"norm_decay must be 'all' or 'official', got {self.norm_decay!r}")
        if not (self.channels_last is None or isinstance(self.channels_last, bool)):  # not 1
            raise ValueError(f"channels_last must be true, false or null (on CUDA only), got {self.channels_last!r}")
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}")
        try:  # it is written to config.json and into every state (YAML reads 2024-01-01 as a date)
            json.dumps(self.extra, allow_nan=False)  # NaN and Infinity are not JSON: other readers refuse them
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra (notes saved in config.json) must hold JSON values (strings, finite numbers, "
                             f"true/false, null, lists, mappings; quote a YAML date): {exc}") from None  # fmt: skip
        self.model_config()
        # a run's resume reads its config back from config.json: what from_dict would refuse there, refused now
        TrainConfig.from_dict(json.loads(json.dumps(self.to_dict())))

    def check_init(self) -> None:
        """ValueError unless ``init`` is 'none' or an existing file (as ``data``: a path given must be there)."""
        if self.init != "none" and not os.path.isfile(self.init):
            what = not_a_file(self.init) if self.init else "is empty"
            raise ValueError(f"init (--init) must be CLIP weights, a DenseCLIP checkpoint or 'none'; {self.init!r} "
                             f"{what}")  # fmt: skip

    def model_config(self) -> DenseCLIPConfig:
        if self.arch in ARCH_ALIASES:
            config = preset(canonical_arch(self.arch))
        elif os.path.isfile(self.arch):
            try:
                with open(self.arch, encoding="utf-8") as f:
                    data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("config"), dict) and "checkpoint" in data:
                    raise ValueError("this is denseclip-fast info --json's output: the architecture is its \"config\" "
                                     "object; save that object alone as the architecture file")  # fmt: skip
                config = DenseCLIPConfig.from_dict(data)
            except ValueError as exc:  # not JSON (JSONDecodeError, UnicodeDecodeError), or not an architecture
                raise ValueError(f"arch (--arch) file {self.arch}: {exc}") from None
        elif _looks_like_a_path(self.arch):  # a mistyped file path, not a mistyped name
            raise ValueError(f"arch (--arch) architecture file {self.arch!r} {not_a_file(self.arch)} (arch is one of "
                             f"{list(ARCHS)} or an architecture JSON file)")  # fmt: skip
        else:
            raise ValueError(f"arch (--arch) must be one of {list(ARCHS)} or an architecture JSON file, got "
                             f"{self.arch!r}{meant_arch(self.arch)}")  # fmt: skip
        if self.clip_activation:
            if self.clip_activation not in ACTIVATIONS:
                raise ValueError(f"clip_activation must be one of {ACTIVATIONS} (or '' for the architecture's), "
                                 f"got {self.clip_activation!r}")  # fmt: skip
            config = config.replace(activation=self.clip_activation)
        return config

    def to_dict(self, absolute_paths: bool = False) -> dict[str, Any]:
        """The fields; with ``absolute_paths`` the paths among them (data, init, work_dir, an architecture file) made
        absolute, as a run's config.json keeps them, so that a resume from another directory finds them."""
        fields = dataclasses.asdict(self)
        if absolute_paths:
            for name in ("data", "work_dir"):
                fields[name] = os.path.abspath(fields[name]) if fields[name] else fields[name]
            if fields["init"] not in ("", "none"):
                fields["init"] = os.path.abspath(fields["init"])
            if fields["arch"] not in ARCH_ALIASES and os.path.isfile(fields["arch"]):
                fields["arch"] = os.path.abspath(fields["arch"])
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Fields by name, each converted to its declared type where that loses nothing: YAML reads ``1e-4`` (no
        dot) as a string and ``lr: 1`` as an int, which become floats; anything else of the wrong type is a
        ValueError naming the field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(_unknown_keys(unknown, sorted(known)))
        hints = typing.get_type_hints(cls)
        return cls(**{name: _typed(name, hints[name], value) for name, value in data.items()})

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        """A YAML (.yaml/.yml) or JSON file of TrainConfig fields; ``preset: RN50`` starts from a preset.
        ValueError naming the file when it is missing, not a regular file, unreadable or not valid YAML/JSON
        (YAML tags that would build Python objects are refused: the file is read with ``yaml.safe_load``)."""
        if not os.path.isfile(path):
            raise ValueError(f"training config {path!r} {not_a_file(path)}")
        try:
            with open(path, encoding="utf-8") as f:
                data = _read_yaml(path, f) if path.lower().endswith((".yaml", ".yml")) else json.load(f)
        except OSError as exc:
            raise ValueError(f"training config {path!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"training config {path!r} is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"training config {path!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config must be a mapping of fields, got {type(data).__name__}")
        try:
            base = train_preset(data.pop("preset")).to_dict() if "preset" in data else {}
        except ValueError as exc:
            raise ValueError(f"training config {path!r}: preset: {exc}") from None
        return cls.from_dict({**base, **data})


def _unknown_keys(unknown: list[Any], known: list[str]) -> str:
    """The message for config keys that are no field: each with the field it is closest to, if one is close (iter:
    did you mean 'iters'?); the known fields listed when a key has none (``train --print-config`` prints them all)."""
    guesses = {key: difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else [] for key in unknown}
    meant = [f"{guess[0]!r} for {key!r}" if len(unknown) > 1 else repr(guess[0]) for key, guess in guesses.items()
             if guess]  # fmt: skip
    if all(guesses.values()):
        return (f"unknown training config keys {unknown}: did you mean {', '.join(meant)}? (train --print-config "
                "prints every key)")  # fmt: skip
    hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
    return f"unknown training config keys {unknown}{hint}; known: {known}"


def _looks_like_a_path(arch: str) -> bool:
    """Whether an ``arch`` that is neither a released architecture nor a file was meant as a file: it ends with
    .json, starts as a path does (/, ./, ../, ~) or its folder exists ("ViT-B/32" is a mistyped name, its "/" no
    path separator)."""
    folder = os.path.dirname(arch)
    return (arch.lower().endswith(".json") or arch.startswith(("/", "./", "../", "~", os.sep))
            or (bool(folder) and os.path.isdir(folder)))  # fmt: skip


def _read_yaml(path: str, stream: typing.TextIO) -> Any:
    """The document of a YAML file (None empty: {}), read as ``yaml.safe_load`` reads it; ValueError naming the file
    and the line for a syntax error, a tag that would build a Python object, or a key given twice."""
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load's, refusing a key given twice in a mapping (which took the last value without a word)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:  # as written: before merge keys (<<: *base) bring theirs in
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            key_node.start_mark)  # fmt: skip
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        data = yaml.load(stream, Loader=Loader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"training config {path!r} is not valid YAML: {problem}{where}") from None
    if _more_values_than(data, MAX_CONFIG_VALUES):  # aliases share what they repeat until it is copied or printed
        raise ValueError(f"training config {path!r} holds more than {MAX_CONFIG_VALUES} values once its YAML aliases "
                         f"are expanded (aliases of aliases multiply)")  # fmt: skip
    return data


def _more_values_than(data: Any, limit: int) -> bool:
    """Whether ``data`` (lists and mappings of scalars, maybe one object many times) holds more than ``limit``
    values counted as printing it would meet them; it stops counting there."""
    pending, count = [data], 0
    while pending:
        value = pending.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
    return False


def _typed(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the field ``name`` of type ``hint`` (TrainConfig's kinds: int, float, str, bool, ``X | None``,
    ``tuple[X, ...]`` of fixed length, dict), or ValueError naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_typed(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        raise ValueError(f"{name} must be a list of {len(args)} values, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        try:
            return _typed(name, kind, value)
        except ValueError as exc:
            raise ValueError(f"{exc}".replace(", got", " or null, got", 1)) from None
    if hint is float:
        if isinstance(value, bool):  # (True is no learning rate of 1.0, as it is no iteration count of 1)
            raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        with contextlib.suppress(ValueError, TypeError):
            return float(value)  # "1e-4": YAML 1.1 floats need a dot
        raise ValueError(f"{name} must be a number, got {value!r}")
    if hint in (int, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{name} must be {'an' if hint is int else 'a'} {hint.__name__}, got {value!r}")
    return value


def train_preset(arch: str) -> TrainConfig:
    """The official ADE20K recipe for ``arch``: the defaults. Its crop and image scale are left to the architecture
    (filled when the run starts: RN50, RN101 crop 512, scale 2048x512; ViT-B/16 crop 640, scale 2048x640), so that
    they follow an ``arch`` changed later (``preset: RN50`` in a file, ``--arch ViT-B/16`` on the command line)."""
    return TrainConfig(arch=canonical_arch(arch))

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
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ACTIVATIONS, ARCHS, DenseCLIPConfig, canonical_arch, preset

LAYOUTS = ("ade20k", "generic")


@dataclass
class TrainConfig:
    """Every knob of a training run. ``arch`` is a released architecture or a path to an architecture JSON file
    (``DenseCLIPConfig.to_dict()``); ``init`` is CLIP weights for ``DenseCLIP.from_clip`` or ``"none"``."""

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
    crop: int = 512
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
    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    seed: int = 0
    device: str = ""  # default: cuda when available
    amp: str = "bf16"  # autocast: "bf16", "fp16" (with a gradient scaler) or "none" (float32)
    grad_checkpointing: bool = False
    channels_last: bool | None = None  # images and weights in NHWC; None: on CUDA (cuDNN's tensor-core layout) only
    sync_bn: bool = False
    cudnn_benchmark: bool = True  # cuDNN times its convolution algorithms once per shape (mmseg's runtime default)
    num_workers: int = 4
    checkpoint_interval: int = 8000
    eval_interval: int = 0  # 0: evaluate only at the end
    log_interval: int = 50
    eval_mode: str = "slide"
    max_checkpoints: int = 3
    tensorboard: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.img_scale = tuple(self.img_scale)  # type: ignore[assignment]
        self.ratio_range = tuple(self.ratio_range)  # type: ignore[assignment]

    def validate(self) -> None:
        """ValueError naming the field for anything a run cannot start with."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not self.data:
            raise ValueError("data must name the dataset directory (--data DIR)")
        if not os.path.isdir(self.data):
            raise ValueError(f"data directory {self.data!r} does not exist")
        for name in ("iters", "batch_size", "accum", "crop", "checkpoint_interval", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_interval", "num_workers", "max_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.device:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be a torch device such as 'cuda', 'cuda:1' or 'cpu' (or '' for cuda "
                                 f"when available), got {self.device!r}") from None  # fmt: skip
        if self.batch_size % self.accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by accum {self.accum}")
        if self.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"amp must be 'bf16', 'fp16' or 'none', got {self.amp!r}")
        if self.norm_decay not in ("all", "official"):
            raise ValueError(f"norm_decay must be 'all' or 'official', got {self.norm_decay!r}")
        if self.channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be true, false or null (on CUDA only), got {self.channels_last!r}")
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        self.model_config()

    def model_config(self) -> DenseCLIPConfig:
        if self.arch in ARCHS or self.arch in ("ViT-B-16",):
            config = preset(canonical_arch(self.arch))
        elif os.path.isfile(self.arch):
            try:
                with open(self.arch, encoding="utf-8") as f:
                    config = DenseCLIPConfig.from_dict(json.load(f))
            except ValueError as exc:  # not JSON (JSONDecodeError, UnicodeDecodeError), or not an architecture
                raise ValueError(f"arch file {self.arch}: {exc}") from None
        else:
            raise ValueError(f"arch must be one of {list(ARCHS)} or an architecture JSON file, got {self.arch!r}")
        if self.clip_activation:
            if self.clip_activation not in ACTIVATIONS:
                raise ValueError(f"clip_activation must be one of {ACTIVATIONS} (or '' for the architecture's), "
                                 f"got {self.clip_activation!r}")  # fmt: skip
            config = config.replace(activation=self.clip_activation)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Fields by name, each converted to its declared type where that loses nothing: YAML reads ``1e-4`` (no
        dot) as a string and ``lr: 1`` as an int, which become floats; anything else of the wrong type is a
        ValueError naming the field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _typed(name, hints[name], value) for name, value in data.items()})

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        """A YAML (.yaml/.yml) or JSON file of TrainConfig fields; ``preset: RN50`` starts from a preset."""
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(f) or {}
            else:
                data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config must be a mapping of fields, got {type(data).__name__}")
        base = train_preset(data.pop("preset")).to_dict() if "preset" in data else {}
        return cls.from_dict({**base, **data})


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
    if hint is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        with contextlib.suppress(ValueError, TypeError):
            return float(value)  # "1e-4": YAML 1.1 floats need a dot
        raise ValueError(f"{name} must be a number, got {value!r}")
    if hint in (int, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{name} must be {'an' if hint is int else 'a'} {hint.__name__}, got {value!r}")
    return value


def train_preset(arch: str) -> TrainConfig:
    """The official ADE20K recipe for ``arch`` (RN50, RN101: crop 512; ViT-B/16: crop 640, scale 2048x640)."""
    arch = canonical_arch(arch)
    if arch == "ViT-B/16":
        return TrainConfig(arch=arch, crop=640, img_scale=(2048, 640))
    return TrainConfig(arch=arch)

"""Architecture configuration of a DenseCLIP model, as data.

One frozen dataclass tree describes everything needed to build a model; the three released architectures are JSON
files in ``denseclip_fast/configs/``. The class vocabulary is not part of the architecture: it lives on the model
(``DenseCLIP.class_names``) and only its length K fixes the shapes of the score channels and the classifier.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from .validation import check_int, is_finite_number, plain_value

ARCH_ALIASES = {"RN50": "RN50", "RN101": "RN101", "ViT-B/16": "ViT-B-16", "ViT-B-16": "ViT-B-16"}
ARCHS = ("RN50", "RN101", "ViT-B/16")
CUSTOM_ARCH = "custom"  # the arch of any configuration that is not one of the released ones
ACTIVATIONS = ("quick_gelu", "gelu")
CLIP_VOCAB_SIZE = 49408  # CLIP's BPE vocabulary: the tokenizer's ids run to 49407 (EOT)
MIN_IMAGE_SIDE = 32  # the stride-32 level must keep at least one pixel
# an exported graph's fixed image size, at most: its output alone (150 float32 score maps of 8192 x 8192) is 40 GB
MAX_EXPORT_SIDE = 8192
# every int of a configuration (widths, depths, heads, lengths, sizes), at most: a sanity bound, far above any CLIP's
# (embed_dim 10**30 ended in torch's "Overflow when unpacking long" building the model)
MAX_CONFIG_INT = 2**20


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """CLIP image encoder. ``kind='resnet'``: ModifiedResNet with the dense attention pool; ``'vit'``: ViT with
    the 4-level pyramid adapters.

    ``layers``: blocks per stage (ResNet) or one entry, the transformer depth (ViT). ``width``: stem width (ResNet,
    64 for RN50) or token width (ViT, 768). ``heads``: heads of the attention pool (ResNet; the official code fixes
    32) or of each ViT block. ``input_resolution``: the resolution the stored positional grid was made for
    (grid = resolution // 32 for ResNets, // patch_size for ViT).
    """

    kind: Literal["resnet", "vit"]
    layers: tuple[int, ...]
    width: int
    heads: int
    input_resolution: int
    patch_size: int = 0
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    drop_path_rate: float = 0.0
    # The official ViT adds class_embedding to the class token and again to its positional embedding.
    double_class_embedding: bool = True

    def __post_init__(self) -> None:
        _plain_fields(self)
        if self.kind not in ("resnet", "vit"):
            raise ValueError(f"vision.kind must be 'resnet' or 'vit', got {self.kind!r}")
        _set_tuple(self, "layers", _int_tuple("vision.layers", self.layers, 4 if self.kind == "resnet" else 1))
        _set_tuple(self, "out_indices", _int_tuple("vision.out_indices", self.out_indices, 4, minimum=0))
        _check_size("vision.width", self.width)
        _check_size("vision.heads", self.heads)
        _check_size("vision.input_resolution", self.input_resolution)
        _check_size("vision.patch_size", self.patch_size, minimum=0)
        _check_number("vision.drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        if not isinstance(self.double_class_embedding, bool):
            raise ValueError(
                f"vision.double_class_embedding must be true or false, got {self.double_class_embedding!r}"
            )
        if self.kind == "resnet":
            if self.width % 2:
                raise ValueError(f"vision.width must be even for a ResNet (its stem halves it), got {self.width}")
            if self.width * 32 % self.heads:
                raise ValueError(f"vision.heads {self.heads} must divide the attention pool's width (vision.width x 32 "
                                 f"= {self.width * 32})")  # fmt: skip
        else:
            if self.patch_size != 16:
                raise ValueError(
                    f"vision.patch_size must be 16 for a ViT (the official pyramid), got {self.patch_size}"
                )
            if self.width % self.heads:
                raise ValueError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")
            depth, taps = self.layers[0], self.out_indices
            if list(taps) != sorted(set(taps)) or taps[-1] >= depth:
                raise ValueError(f"vision.out_indices must be 4 increasing block indices below vision.layers[0] = "
                                 f"{depth}, got {list(taps)}")  # fmt: skip
        if self.grid < 1:
            stride = 32 if self.kind == "resnet" else self.patch_size
            raise ValueError(f"vision.input_resolution must be at least {stride} (one grid cell), got "
                             f"{self.input_resolution}")  # fmt: skip

    @property
    def grid(self) -> int:
        stride = 32 if self.kind == "resnet" else self.patch_size
        return self.input_resolution // stride

    @property
    def level_channels(self) -> tuple[int, int, int, int]:
        """Channels of the four pyramid levels (strides 4, 8, 16, 32) before the score map is concatenated."""
        if self.kind == "resnet":
            return (self.width * 4, self.width * 8, self.width * 16, self.width * 32)
        return (self.width,) * 4


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """CLIP text transformer with CoOp-style learned contexts: ``context_length`` positions =
    SOT + ``n_ctx`` learned vectors + the class tokens + EOT (+ padding)."""

    context_length: int = 13
    n_ctx: int = 8
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12

    def __post_init__(self) -> None:
        _plain_fields(self)
        _check_size("text.context_length", self.context_length)
        _check_size("text.n_ctx", self.n_ctx, minimum=0)
        _check_size("text.vocab_size", self.vocab_size, minimum=CLIP_VOCAB_SIZE, why=" (the tokenizer's vocabulary)")
        _check_size("text.width", self.width)
        _check_size("text.heads", self.heads)
        _check_size("text.layers", self.layers)
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")
        if self.class_token_length < 3:
            raise ValueError(
                f"text.context_length - text.n_ctx must be >= 3 (SOT, one name token, EOT), "
                f"got {self.context_length} - {self.n_ctx}"
            )

    @property
    def class_token_length(self) -> int:
        """Length of the tokenised class name, SOT and EOT included (the official ``context_length=5``)."""
        return self.context_length - self.n_ctx


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Context decoder (post-model prompting)."""

    width: int = 256
    heads: int = 4
    layers: int = 3
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _plain_fields(self)
        _check_size("decoder.width", self.width)
        _check_size("decoder.heads", self.heads)
        _check_size("decoder.layers", self.layers)
        _check_number("decoder.dropout", self.dropout, 0.0, 1.0)
        if self.width % self.heads:
            raise ValueError(f"decoder.width {self.width} is not divisible by decoder.heads {self.heads}")


@dataclass(frozen=True, kw_only=True)
class DenseCLIPConfig:
    """Everything that fixes the shapes and the function of a DenseCLIP model, except the class names."""

    arch: str
    embed_dim: int
    vision: VisionConfig
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fpn_channels: int = 256
    head_channels: int = 256
    head_dropout: float = 0.1
    score_concat_index: int = 3
    tau: float = 0.07
    slide_crop: int = 512
    slide_stride: int = 341
    test_scale: tuple[int, int] = (2048, 512)
    # The MLP activation of the CLIP transformers (the text encoder's and the ViT's blocks): OpenAI CLIP's QuickGELU,
    # x * sigmoid(1.702 x), which DenseCLIP and its released checkpoints use, or "gelu" (exact, erf), which most
    # open_clip weights not from OpenAI were trained with (open_clip's model names without "-quickgelu").
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"

    def __post_init__(self) -> None:
        """Every field checked (type and range), so that a bad configuration is a ValueError naming the field and
        the value here, not a TypeError or a division by zero inside the model, or a model that loads and computes
        nonsense. The sub-configurations check themselves when built. A numpy number is kept as the Python one it
        stands for (:func:`_plain_fields`)."""
        _plain_fields(self)
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"arch must be a non-empty name ({', '.join(ARCHS)}, {CUSTOM_ARCH!r} or your own), "
                             f"got {self.arch!r}")  # fmt: skip
        for name, sub_cls in (("vision", VisionConfig), ("text", TextConfig), ("decoder", DecoderConfig)):
            if not isinstance(getattr(self, name), sub_cls):
                raise ValueError(f"{name} must be a {sub_cls.__name__}, got {type(getattr(self, name)).__name__}")
        kind = "vit" if ARCH_ALIASES.get(self.arch) == "ViT-B-16" else "resnet"
        if self.arch in ARCH_ALIASES and self.vision.kind != kind:  # a released name; any other is a free label
            raise ValueError(f"arch {self.arch!r} has vision.kind {kind!r}, got {self.vision.kind!r}")
        _check_size("embed_dim", self.embed_dim)
        _check_size("fpn_channels", self.fpn_channels)
        _check_size("head_channels", self.head_channels)
        _check_number("head_dropout", self.head_dropout, 0.0, 1.0)
        _check_size("score_concat_index", self.score_concat_index, minimum=0)
        if self.score_concat_index > 3:
            raise ValueError(f"score_concat_index must be in 0..3, got {self.score_concat_index}")
        _check_number("tau", self.tau, 0.0, math.inf, low_open=True, high_open=True)
        _check_size("slide_crop", self.slide_crop, minimum=MIN_IMAGE_SIDE, why=" (the stride-32 level keeps a pixel)")
        _check_size("slide_stride", self.slide_stride)
        if self.slide_stride > self.slide_crop:
            raise ValueError(f"slide_stride must not exceed slide_crop {self.slide_crop} (the windows would leave "
                             f"pixels out), got {self.slide_stride}")  # fmt: skip
        scale = _int_tuple("test_scale", self.test_scale, 2, MIN_IMAGE_SIDE, " (an image's short side keeps a pixel "
                           "at stride 32)")  # fmt: skip
        _set_tuple(self, "test_scale", scale)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenseCLIPConfig:
        """Inverse of :meth:`to_dict`; unknown keys, missing required ones (``arch``, ``embed_dim``, ``vision``
        and the vision section's own) and bad values are a ValueError naming the field, so a typo never passes
        silently. A key with a default may be left out and takes it, a whole ``text`` or ``decoder`` section
        included (the official text encoder and context decoder)."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        sub = {"vision": VisionConfig, "text": TextConfig, "decoder": DecoderConfig}
        for name, sub_cls in sub.items():
            if name in data:
                data[name] = _build(sub_cls, data[name], name)
        return _build(cls, data, "config")

    def replace(self, **changes: Any) -> DenseCLIPConfig:
        return dataclasses.replace(self, **changes)


def _check_number(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number (not a bool) in the interval given."""
    is_number = is_finite_number(value)
    above = is_number and (value > low if low_open else value >= low)
    below = is_number and (value < high if high_open else value <= high)
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _check_size(name: str, value: object, minimum: int = 1, why: str = "") -> None:
    """:func:`check_int`, and at most MAX_CONFIG_INT."""
    check_int(name, value, minimum, why, MAX_CONFIG_INT, " (a sanity bound)")


def _int_tuple(name: str, value: Any, length: int, minimum: int = 1, why: str = "") -> tuple[int, ...]:
    """``value`` (a tuple or list of ``length`` ints >= ``minimum``, at most MAX_CONFIG_INT) as a tuple, or
    ValueError naming ``name``."""
    ok = isinstance(value, (tuple, list)) and len(value) == length
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        ints = "1 int" if length == 1 else f"{length} ints"
        raise ValueError(f"{name} must be a list of {ints} >= {minimum}{why}, got {value!r}")
    if max(value) > MAX_CONFIG_INT:
        raise ValueError(f"{name} must hold ints of at most {MAX_CONFIG_INT} (a sanity bound), got {value!r}")
    return tuple(value)


def _plain_fields(config: Any) -> None:
    """Each field of the frozen dataclass ``config`` that holds a numpy bool, integer or float (a size or rate
    computed with numpy), or a tuple or list holding them, stored as the Python values they stand for
    (validation.plain_value): the checks then take them, the configuration compares equal to one written with
    plain numbers, and to_dict gives what JSON holds (a checkpoint's config; json.dumps refuses np.int64)."""
    for spec in dataclasses.fields(config):
        object.__setattr__(config, spec.name, plain_value(getattr(config, spec.name)))


def _set_tuple(obj: Any, name: str, value: tuple[int, ...]) -> None:
    """Store a list given for a tuple field as the tuple (the dataclasses are frozen), so configs compare equal."""
    object.__setattr__(obj, name, value)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    required = [name for name, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{where}: missing keys {missing} (required: {required})")
    kwargs = {}
    for key, value in data.items():
        # JSON has no tuples: restore them for the tuple-typed fields so configs compare equal.
        if isinstance(value, list) and "tuple" in str(known[key].type):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _arch_key(name: str) -> str:
    """A name as it is compared for :func:`meant_arch`: lower case, without separators, 'resnet' as 'rn'."""
    key = "".join(c for c in name.lower() if c.isalnum())
    return "rn" + key[len("resnet"):] if key.startswith("resnet") else key


def meant_arch(arch: object) -> str:
    """For an error message: " (did you mean 'RN50'?)" when ``arch`` names a released architecture but for letter
    case and separators ('rn50', 'ResNet-50', 'vit_b_16'), else ""."""
    if not isinstance(arch, str):
        return ""
    meant = [name for name in ARCHS if _arch_key(name) == _arch_key(arch)]
    return f" (did you mean {meant[0]!r}?)" if meant else ""


def canonical_arch(arch: str) -> str:
    """``'ViT-B-16'`` -> ``'ViT-B/16'``; raises ValueError for an unknown name."""
    if not isinstance(arch, str) or arch not in ARCH_ALIASES:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}{meant_arch(arch)}")
    return "ViT-B/16" if ARCH_ALIASES[arch] == "ViT-B-16" else arch


def preset(arch: str) -> DenseCLIPConfig:
    """The configuration of a released architecture: ``'RN50'``, ``'RN101'`` or ``'ViT-B/16'``."""
    canonical_arch(arch)
    text = resources.files("denseclip_fast.configs").joinpath(f"{ARCH_ALIASES[arch]}.json").read_text()
    return DenseCLIPConfig.from_dict(json.loads(text))

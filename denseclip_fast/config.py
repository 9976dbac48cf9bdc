"""Architecture configuration of a DenseCLIP model, as data.

One frozen dataclass tree describes everything needed to build a model; the three released architectures are JSON
files in ``denseclip_fast/configs/``. The class vocabulary is not part of the architecture: it lives on the model
(``DenseCLIP.class_names``) and only its length K fixes the shapes of the score channels and the classifier.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

ARCH_ALIASES = {"RN50": "RN50", "RN101": "RN101", "ViT-B/16": "ViT-B-16", "ViT-B-16": "ViT-B-16"}
ARCHS = ("RN50", "RN101", "ViT-B/16")
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer with CoOp-style learned contexts: ``context_length`` positions =
    SOT + ``n_ctx`` learned vectors + the class tokens + EOT (+ padding)."""

    context_length: int = 13
    n_ctx: int = 8
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12

    @property
    def class_token_length(self) -> int:
        """Length of the tokenised class name, SOT and EOT included (the official ``context_length=5``)."""
        return self.context_length - self.n_ctx

    @property
    def max_name_tokens(self) -> int:
        return self.class_token_length - 2


@dataclass(frozen=True)
class DecoderConfig:
    """Context decoder (post-model prompting)."""

    width: int = 256
    heads: int = 4
    layers: int = 3
    dropout: float = 0.1


@dataclass(frozen=True)
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
        if self.vision.kind not in ("resnet", "vit"):
            raise ValueError(f"vision.kind must be 'resnet' or 'vit', got {self.vision.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0 <= self.score_concat_index <= 3:
            raise ValueError(f"score_concat_index must be in 0..3, got {self.score_concat_index}")
        if self.text.class_token_length < 3:
            raise ValueError(
                f"text.context_length - text.n_ctx must be >= 3 (SOT, one name token, EOT), "
                f"got {self.text.context_length} - {self.text.n_ctx}"
            )
        if self.decoder.width % self.decoder.heads:
            raise ValueError(
                f"decoder.width {self.decoder.width} is not divisible by decoder.heads {self.decoder.heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenseCLIPConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, so a typo never passes silently."""
        data = dict(data)
        sub = {"vision": VisionConfig, "text": TextConfig, "decoder": DecoderConfig}
        for name, sub_cls in sub.items():
            if name in data:
                data[name] = _build(sub_cls, data[name], name)
        return _build(cls, data, "config")

    def replace(self, **changes: Any) -> DenseCLIPConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        # JSON has no tuples: restore them for the tuple-typed fields so configs compare equal.
        if isinstance(value, list) and "tuple" in str(known[key].type):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def canonical_arch(arch: str) -> str:
    """``'ViT-B-16'`` -> ``'ViT-B/16'``; raises ValueError for an unknown name."""
    if arch not in ARCH_ALIASES:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    return "ViT-B/16" if ARCH_ALIASES[arch] == "ViT-B-16" else arch


def preset(arch: str) -> DenseCLIPConfig:
    """The configuration of a released architecture: ``'RN50'``, ``'RN101'`` or ``'ViT-B/16'``."""
    canonical_arch(arch)
    text = resources.files("denseclip_fast.configs").joinpath(f"{ARCH_ALIASES[arch]}.json").read_text()
    return DenseCLIPConfig.from_dict(json.loads(text))

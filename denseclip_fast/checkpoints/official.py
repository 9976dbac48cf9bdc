"""Official DenseCLIP state dicts: detecting the architecture from the tensors and loading every one of them.

An official segmentation checkpoint is an mmcv file ``{'meta': {'CLASSES', 'PALETTE', ...}, 'state_dict': {...}}``
whose keys are ``backbone.*``, ``text_encoder.*``, ``context_decoder.*``, ``neck.*``, ``decode_head.*``,
``contexts`` and ``gamma``; our module tree uses the same names, so loading is a strict ``load_state_dict`` once the
architecture is known. What the tensors cannot tell (head counts, ViT tap blocks, drop-path rate, sliding-window
defaults) follows the official configs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..config import (
    CLIP_VOCAB_SIZE,
    DecoderConfig,
    DenseCLIPConfig,
    TextConfig,
    VisionConfig,
    canonical_arch,
    preset,
)
from .io import CheckpointError

REQUIRED_KEYS = (
    "contexts",
    "gamma",
    "backbone.conv1.weight",
    "text_encoder.token_embedding.weight",
    "text_encoder.positional_embedding",
    "text_encoder.text_projection",
    "context_decoder.text_proj.1.weight",
    "neck.lateral_convs.0.conv.weight",
    "decode_head.conv_seg.weight",
)
# The rank (and the shape, in words) of every tensor the architecture is read from: a tensor of another rank is a
# CheckpointError naming it, not an IndexError or an unpacking error while the sizes are read.
EXPECTED_SHAPES = {
    "contexts": (3, "(1, n_ctx, text width)"),
    "gamma": (1, "(embed_dim,)"),
    "backbone.conv1.weight": (4, "(channels, 3, kernel, kernel)"),
    "backbone.class_embedding": (1, "(width,)"),
    "backbone.positional_embedding": (2, "(1 + grid * grid, width)"),
    "backbone.attnpool.positional_embedding": (2, "(1 + grid * grid, width * 32)"),
    "text_encoder.token_embedding.weight": (2, f"({CLIP_VOCAB_SIZE} or more, text width)"),
    "text_encoder.positional_embedding": (2, "(context_length, text width)"),
    "text_encoder.text_projection": (2, "(text width, embed_dim)"),
    "context_decoder.text_proj.1.weight": (2, "(decoder width, embed_dim)"),
    "decode_head.conv_seg.weight": (4, "(K, head_channels, 1, 1)"),
    **{f"neck.lateral_convs.{i}.conv.weight": (4, "(fpn_channels, in_channels, 1, 1)") for i in range(4)},
}
OFFICIAL_DECODER_HEADS = 4  # ContextDecoder transformer_heads in every official config
OFFICIAL_RESNET_POOL_HEADS = 32  # hard-coded in CLIPResNetWithAttention


def square_grid(rows: int) -> int:
    """The side g of a positional embedding's grid when it has ``rows`` = 1 + g * g rows (the class token and the
    grid), g >= 1; else 0."""
    grid = math.isqrt(max(rows - 1, 0))
    return grid if grid > 0 and grid * grid == rows - 1 else 0


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def _vision_config(sd: Mapping[str, torch.Tensor]) -> VisionConfig:
    if "backbone.class_embedding" in sd:
        width = sd["backbone.class_embedding"].shape[0]
        patch = sd["backbone.conv1.weight"].shape[-1]
        grid = math.isqrt(sd["backbone.positional_embedding"].shape[0] - 1)
        depth = _count(sd, r"backbone\.transformer\.resblocks\.(\d+)\.")
        return VisionConfig(
            kind="vit", layers=(depth,), width=width, heads=width // 64, input_resolution=grid * patch,
            patch_size=patch,
        )  # fmt: skip
    layers = tuple(_count(sd, rf"backbone\.layer{i}\.(\d+)\.") for i in range(1, 5))
    width = sd["backbone.conv1.weight"].shape[0] * 2
    grid = math.isqrt(sd["backbone.attnpool.positional_embedding"].shape[0] - 1)
    return VisionConfig(
        kind="resnet", layers=layers, width=width, heads=OFFICIAL_RESNET_POOL_HEADS, input_resolution=grid * 32
    )


def infer_config(sd: Mapping[str, torch.Tensor], path: str) -> tuple[DenseCLIPConfig, int]:
    """The architecture and the number of classes K of an official-layout state dict. CheckpointError when the
    tensors do not describe a valid one."""
    try:
        return _infer_config(sd, path)
    except ValueError as exc:  # DenseCLIPConfig's checks: sizes the tensors imply that no model can have
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, f"the tensors describe an invalid architecture: {exc}") from None


TEXT_SIDE = ("contexts", "gamma", "text_encoder.", "context_decoder.")  # what DenseCLIP adds to CLIP + FPN
DETECTION_HEADS = ("bbox_head.", "rpn_head.", "roi_head.")  # mmdet's RetinaNet and Mask R-CNN


def _other_model_hint(sd: Mapping[str, torch.Tensor]) -> str:
    """For the official repository's other models, what the state dict likely is and why it does not load ("" for
    anything else): a detector (its detection/ code: RetinaNet's bbox_head, Mask R-CNN's rpn_head and roi_head,
    no decode head), or a segmentation model without DenseCLIP's text side (a CLIP backbone, an FPN neck and a
    decode head, no contexts, gamma, text encoder or context decoder: the CLIP + FPN baselines, configs
    fpn_clipres50, fpn_clipres101, fpn_clipvit-b)."""
    keys = list(sd)
    if not any(k.startswith("decode_head.") for k in keys) and any(k.startswith(DETECTION_HEADS) for k in keys):
        return ("; it holds a detection head (bbox_head, rpn_head or roi_head) and no decode head: a detector, such "
                "as the official DenseCLIP RetinaNet and Mask R-CNN models (detection/ configs), which "
                "denseclip_fast does not run (it runs the Semantic FPN segmentation models)")  # fmt: skip
    if any(k.startswith(TEXT_SIDE) for k in keys):
        return ""
    if not all(any(k.startswith(part) for k in keys) for part in ("backbone.", "neck.", "decode_head.")):
        return ""
    return ("; it holds a backbone, an FPN neck and a decode head but no text side (contexts, gamma, text_encoder, "
            "context_decoder): a segmentation model without pixel-text matching, such as the official CLIP + FPN "
            "baselines (fpn_clip* configs), which is not a DenseCLIP model and which denseclip_fast does not run")


def _infer_config(sd: Mapping[str, torch.Tensor], path: str) -> tuple[DenseCLIPConfig, int]:
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if "backbone.class_embedding" in sd:  # a ViT
        if "backbone.positional_embedding" not in sd:
            missing.append("backbone.positional_embedding")
    elif "backbone.attnpool.positional_embedding" not in sd:
        missing.append("backbone.attnpool.positional_embedding or backbone.class_embedding")
    if missing:
        raise CheckpointError(path, f"not a DenseCLIP state dict: missing {', '.join(missing)}{_other_model_hint(sd)}")
    _check_shapes(sd, path)
    embed_dim = sd["gamma"].shape[0]
    pos = sd["text_encoder.positional_embedding"]
    text_width = pos.shape[1]
    text = TextConfig(
        context_length=pos.shape[0],
        n_ctx=sd["contexts"].shape[1],
        vocab_size=sd["text_encoder.token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=_count(sd, r"text_encoder\.transformer\.resblocks\.(\d+)\."),
    )
    decoder = DecoderConfig(
        width=sd["context_decoder.text_proj.1.weight"].shape[0],
        heads=OFFICIAL_DECODER_HEADS,
        layers=_count(sd, r"context_decoder\.decoder\.(\d+)\."),
    )
    vision = _vision_config(sd)
    k, head_channels = sd["decode_head.conv_seg.weight"].shape[:2]
    lateral_in = [sd.get(f"neck.lateral_convs.{i}.conv.weight", torch.empty(0, 0)).shape[1] for i in range(4)]
    concat = [i for i in range(4) if lateral_in[i] == vision.level_channels[i] + k]
    if len(concat) != 1:
        raise CheckpointError(
            path,
            f"cannot tell which level takes the {k} score channels: FPN lateral inputs {lateral_in}, "
            f"backbone levels {list(vision.level_channels)}",
        )
    base = preset("ViT-B/16" if vision.kind == "vit" else "RN50")
    candidate = DenseCLIPConfig(
        arch="custom",
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        decoder=decoder,
        fpn_channels=sd["neck.lateral_convs.0.conv.weight"].shape[0],
        head_channels=head_channels,
        score_concat_index=concat[0],
        slide_crop=base.slide_crop,
        slide_stride=base.slide_stride,
        test_scale=base.test_scale,
    )
    return _match_preset(candidate), k


def _check_shapes(sd: Mapping[str, torch.Tensor], path: str) -> None:
    """CheckpointError naming the key, the shape expected and the shape found for a tensor whose sizes cannot give
    an architecture: a wrong rank, a positional embedding that is not 1 + a square grid, a vocabulary smaller than
    the tokenizer's (the first forward would index past it), a head with no classes."""

    def refuse(key: str, expected: str, why: str = "") -> None:
        raise CheckpointError(path, f"{key} has shape {tuple(sd[key].shape)}, expected {expected}{why}")

    for key, (rank, expected) in EXPECTED_SHAPES.items():
        if key in sd and sd[key].dim() != rank:
            refuse(key, expected)
    for key in ("backbone.positional_embedding", "backbone.attnpool.positional_embedding"):
        if key in sd and not square_grid(sd[key].shape[0]):
            refuse(key, EXPECTED_SHAPES[key][1], " (e.g. 257 rows: 1 + 16 * 16)")
    if sd["text_encoder.token_embedding.weight"].shape[0] < CLIP_VOCAB_SIZE:
        refuse("text_encoder.token_embedding.weight", EXPECTED_SHAPES["text_encoder.token_embedding.weight"][1],
               f": the tokenizer's ids go up to {CLIP_VOCAB_SIZE - 1}")  # fmt: skip
    if sd["decode_head.conv_seg.weight"].shape[0] == 0:
        refuse("decode_head.conv_seg.weight", EXPECTED_SHAPES["decode_head.conv_seg.weight"][1], " with K >= 1")


def _shape_fields(cfg: DenseCLIPConfig) -> tuple[object, ...]:
    v = cfg.vision
    return (cfg.embed_dim, v.kind, v.layers, v.width, v.input_resolution, v.patch_size, cfg.text, cfg.decoder.width,
            cfg.decoder.layers, cfg.fpn_channels, cfg.head_channels, cfg.score_concat_index)  # fmt: skip


def _match_preset(cfg: DenseCLIPConfig) -> DenseCLIPConfig:
    """Return the released preset whose tensors have these shapes, else ``cfg`` (arch 'custom')."""
    for arch in ("RN50", "RN101", "ViT-B/16"):
        known = preset(arch)
        if _shape_fields(known) == _shape_fields(cfg):
            return known
    return cfg


def check_arch(config: DenseCLIPConfig, arch: str | None, path: str) -> None:
    if arch is not None and canonical_arch(arch) != config.arch:
        raise CheckpointError(path, f"arch={arch!r} was requested but the checkpoint holds {config.arch!r}")


def key_listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


# Floating-point dtypes without a conversion to float32 (copy_ has no kernel: load_state_dict would fail on them)
PACKED_FLOATS = tuple(d for d in (getattr(torch, "float4_e2m1fn_x2", None),) if d is not None)


INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                  torch.uint32, torch.uint64)  # fmt: skip


def _real_number(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers or real numbers that copy_ converts (not complex, packed or bit-typed)."""
    return t.dtype in INTEGER_DTYPES or (t.is_floating_point() and t.dtype not in PACKED_FLOATS)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t`` (floating point): its minimum and maximum in one read (aminmax propagates NaN,
    and an infinity is one of them), where ``isfinite(t).all()`` also writes and reads a boolean tensor as large."""
    if t.numel() == 0:
        return True  # aminmax refuses an empty tensor
    if t.element_size() < 2:  # float8: aminmax has no kernel for it; float32 holds each of its values
        t = t.to(torch.float32)
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def state_problems(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    label: str = "",
    optional: str = "",
    values: bool = True,
) -> list[str]:
    """What keeps ``given`` from loading into a module whose state dict is ``expected``: missing keys (except those
    starting with ``optional``), unexpected keys and shape mismatches, and with ``values`` what load_state_dict
    would cast or copy without a word: integer, boolean or complex tensors for floating-point weights, and NaN or
    infinite values; each as one readable phrase. ``label`` is prepended to the key names in the messages."""
    missing = sorted(k for k in expected if k not in given and not (optional and k.startswith(optional)))
    unexpected = sorted(k for k in given if k not in expected)
    shared = [(k, v, expected[k]) for k, v in given.items() if k in expected]
    mismatched = [f"{label}{k}: checkpoint {tuple(v.shape)} vs model {tuple(e.shape)}"
                  for k, v, e in shared if tuple(v.shape) != tuple(e.shape)]  # fmt: skip
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {key_listing([label + k for k in missing])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {key_listing([label + k for k in unexpected])}")
    if mismatched:
        problems.append(f"shape mismatch ({len(mismatched)}): {key_listing(mismatched, 10)}")
    if not values:
        return problems
    kinds = [f"{label}{k}: checkpoint {v.dtype} vs model {e.dtype}"
             for k, v, e in shared if e.is_floating_point() and not v.is_floating_point()]  # fmt: skip
    if kinds:
        problems.append(f"not floating point ({len(kinds)}): {key_listing(kinds, 10)}")
    # an integer buffer (BatchNorm's num_batches_tracked) from a complex tensor (its imaginary part dropped with a
    # warning) or from one of the dtypes copy_ has no kernel for (torch's multi-line error from load_state_dict)
    counts = [f"{label}{k}: checkpoint {v.dtype} vs model {e.dtype}" for k, v, e in shared
              if not e.is_floating_point() and not _real_number(v)]  # fmt: skip
    if counts:
        problems.append(f"not an integer or real number ({len(counts)}): {key_listing(counts, 10)}")
    packed = [f"{label}{k}: {v.dtype}" for k, v, e in shared if e.is_floating_point() and v.dtype in PACKED_FLOATS]
    if packed:
        problems.append(f"packed floating point, not convertible to float32 ({len(packed)}): {key_listing(packed, 10)}")
    readable = [(k, v) for k, v, _ in shared if v.is_floating_point() and v.dtype not in PACKED_FLOATS]
    broken = [label + k for k, v in readable if not v.is_meta and not all_finite(v)]
    if broken:
        problems.append(f"NaN or infinite values ({len(broken)}): {key_listing(broken)}")
    return problems


def load_state_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str, assign: bool = False) -> None:
    """Load every tensor of ``sd`` into ``model`` (``assign``: the tensors themselves become the model's, as
    load_state_dict's ``assign``): any missing or unexpected key, or any shape mismatch, is a CheckpointError that
    lists them. The values are not checked again (load_checkpoint's _model_skeleton did)."""
    problems = state_problems(model.state_dict(), sd, values=False)
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    model.load_state_dict(dict(sd), strict=True, assign=assign)

"""Initialising DenseCLIP's backbone and text encoder from CLIP weights, as the official ``init_weights`` do.

Accepted files: OpenAI's TorchScript archives (``RN50.pt`` ...), plain CLIP state dicts (``torch.save`` or
``.safetensors``) and open_clip checkpoints (``{'state_dict': ...}``, ``module.`` prefixes). CLIP's keys are
``visual.*`` for the image tower and ``transformer.*``, ``token_embedding.weight``, ``positional_embedding``,
``ln_final.*``, ``text_projection`` for the text tower.

* ``visual.*`` -> ``backbone.*``. The positional grid is resized bilinearly (align_corners=False) from CLIP's
  (7x7 for RN at 224, 14x14 for ViT-B/16) to the model's (16x16 for 512 inputs, 40x40 for 640).
* text keys -> ``text_encoder.*``; the positional embedding is truncated from 77 to the 13 positions used.
* Everything else (contexts, gamma, decoder, neck, head, the ViT pyramid adapters) keeps its fresh initialisation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..model.resnet import resize_positional_grid
from .io import CheckpointError, WeightFile, check_not_a_training_state, read_weight_file
from .native import is_native
from .official import key_listing, square_grid, state_problems

if TYPE_CHECKING:
    from ..model import DenseCLIP

TEXT_PREFIXES = ("transformer.", "token_embedding.", "ln_final.")
TEXT_KEYS = ("positional_embedding", "text_projection")
IGNORED = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


class DenseCLIPCheckpointGiven(CheckpointError):
    """A DenseCLIP checkpoint where CLIP weights were asked for (checkpoints/transfer.py starts a run from one)."""


class NotCLIPWeights(CheckpointError):
    """A file that holds neither CLIP weights nor a DenseCLIP checkpoint (train --init says that it takes either)."""


def read_clip_state_dict(path: str | os.PathLike[str], weights: WeightFile | None = None) -> dict[str, torch.Tensor]:
    """CLIP weights from any supported file as a flat ``{name: tensor}`` dict with CLIP's key names; ``weights``:
    the file already read (read_weight_file(path)), not read again."""
    path = os.fspath(path)
    wf = read_weight_file(path) if weights is None else weights
    obj = wf.obj if wf.kind == "torch" else wf.tensors
    check_not_a_training_state(obj, path)  # train --init takes a run's weights, not its iter_N.state.pt
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise NotCLIPWeights(path, f"not CLIP weights: expected a state dict, found {type(obj).__name__}")
    # attn_mask: the causal mask, stored as an attribute or buffer by CLIP implementations; not a weight.
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor) and not str(k).endswith("attn_mask")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        if is_native(wf.metadata or {}) or any(k.startswith(("backbone.", "text_encoder.")) for k in sd):
            raise DenseCLIPCheckpointGiven(path, "this is a DenseCLIP checkpoint, not CLIP weights (OpenAI .pt, "
                                                 "open_clip); a training run starts from one with --init (to go on "
                                                 "with a run instead, resume it: --resume)")  # fmt: skip
        missing = " or ".join(repr(k) for k in ("visual.conv1.weight", "token_embedding.weight") if k not in sd)
        raise NotCLIPWeights(path, f"not CLIP weights: no {missing} (a CLIP state dict holds both the image and the "
                                   "text encoder)")  # fmt: skip
    return sd


def _grid(pos: torch.Tensor, key: str, path: str) -> int:
    """The side of the square grid of a (1 + grid * grid, width) positional embedding, or CheckpointError."""
    grid = square_grid(pos.shape[0]) if pos.dim() == 2 else 0
    if not grid:
        raise CheckpointError(path, f"{key} has shape {tuple(pos.shape)}, expected (1 + grid * grid, width)")
    return grid


def _backbone_state(model: DenseCLIP, sd: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    pos_key = "attnpool.positional_embedding" if model.config.vision.kind == "resnet" else "positional_embedding"
    if pos_key in visual:
        pos = visual[pos_key].float()
        new_grid = model.config.vision.grid
        old_grid = _grid(pos, "visual." + pos_key, path)
        if old_grid != new_grid:
            visual[pos_key] = resize_positional_grid(pos, old_grid, (new_grid, new_grid))
    return visual


def _text_state(model: DenseCLIP, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    text = {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIXES) or k in TEXT_KEYS}
    if "positional_embedding" in text and text["positional_embedding"].dim() > 0:  # else: a shape mismatch reported
        text["positional_embedding"] = text["positional_embedding"][: model.config.text.context_length]
    return text


def _load_part(part: torch.nn.Module, state: dict[str, torch.Tensor], label: str, path: str, optional: str) -> None:
    """Load ``state`` into ``part``: every key of ``part`` except those starting with ``optional`` must be given,
    every given key must exist, shapes must match."""
    problems = state_problems(part.state_dict(), state, label, optional)
    if problems:
        raise CheckpointError(path, "these CLIP weights do not fit the architecture: " + "; ".join(problems))
    part.load_state_dict(state, strict=False)


def init_from_clip(model: DenseCLIP, path: str | os.PathLike[str], weights: WeightFile | None = None) -> None:
    """Copy CLIP weights into ``model.backbone`` and ``model.text_encoder`` (in place); ``weights``: the file already
    read, as read_clip_state_dict takes it."""
    path = os.fspath(path)
    sd = read_clip_state_dict(path, weights)
    visual_keys = ("visual.",)
    others = sorted(k for k in sd if not k.startswith(visual_keys + TEXT_PREFIXES) and k not in TEXT_KEYS + IGNORED)
    if others:
        raise CheckpointError(path, f"unrecognised keys in CLIP weights: {key_listing(others)}")
    optional_vision = "fpn" if model.config.vision.kind == "vit" else ""
    _load_part(model.backbone, _backbone_state(model, sd, path), "visual.", path, optional_vision)
    _load_part(model.text_encoder, _text_state(model, sd), "", path, "")

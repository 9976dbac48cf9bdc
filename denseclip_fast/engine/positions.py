"""An engine's positional embeddings, made once per grid size instead of on every call.

The ResNet's attention pool and ViT's token embedding add a positional embedding whose spatial part is the stored
grid bilinearly resized to the input's grid (model/resnet.py ``resize_positional_grid``); ViT also adds its class
embedding to the first row. For a given grid size and dtype that is a constant of the weights: a Segmenter's
private model, whose weights never change (engine.rewrite.refuse_loading), keeps it. Per call that saves the
resize, a concatenation and, for ViT, the class row's sum and a second concatenation: 2 kernel launches at RN50's
attention pool, 4 at ViT's embedding (per CUDA graph replay too: a graph captured after the warm-up reads the kept
tensor). The values are the module's own, computed by the same operations: bit for bit the same logits.

Kept: at most ``MAX_SIZES`` sizes, never dropped while the Segmenter lives, because a captured CUDA graph reads the
kept tensor at its address (a dropped and reused one would be read as garbage by the graph). Sizes past that are
computed on each call, as before. Not kept (computed, as the model does) where the call is traced or transformed
(:func:`~denseclip_fast.model.layers.intercepted`: an export would bake a constant), where a gradient could flow to
the embedding, or while a CUDA graph is being captured (the capture runs no kernel: the tensor would hold nothing
until a replay; the warm-up before a capture keeps it instead).
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from ..model.layers import intercepted
from ..model.resnet import DenseAttentionPool
from ..model.vit import CLIPViTBackbone
from .projections import FusedAttentionPool

MAX_SIZES = 16
Key = tuple[tuple[int, int], torch.dtype, torch.device]


class _KeptPositions:
    """The module's ``positions(size, dtype)``, kept per (size, dtype, device) as the module docstring says, in
    ``kept_positions`` (a plain dict attribute: copied with the module by deepcopy and pickling, not moved by
    ``.to()``, hence the device in the key)."""

    kept_positions: dict[Key, torch.Tensor]
    positional_embedding: nn.Parameter

    def _may_keep(self) -> bool:
        if len(self.kept_positions) >= MAX_SIZES:
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters(recurse=False)):  # type: ignore[attr-defined]
            return False
        return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def positions(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        if intercepted():
            return super().positions(size, dtype)  # type: ignore[misc]
        key = ((int(size[0]), int(size[1])), dtype, self.positional_embedding.device)
        kept = self.kept_positions.get(key)
        if kept is not None:
            return kept
        value: torch.Tensor = super().positions(size, dtype)  # type: ignore[misc]
        if self._may_keep():
            self.kept_positions[key] = value
        return value


class KeptPositionsPool(_KeptPositions, DenseAttentionPool):
    pass


class KeptPositionsFusedPool(_KeptPositions, FusedAttentionPool):
    pass


class KeptPositionsViT(_KeptPositions, CLIPViTBackbone):
    pass


KEPT = {DenseAttentionPool: KeptPositionsPool, FusedAttentionPool: KeptPositionsFusedPool,
        CLIPViTBackbone: KeptPositionsViT}  # fmt: skip


def keep_positions(model: nn.Module) -> int:
    """Make each attention pool and ViT backbone of ``model`` (a Segmenter's private copy, after the rewrites that
    replace modules) keep its positional embeddings per size, in place: the same module, its class swapped for the
    subclass above (its parameters, state dict keys and other methods unchanged). Returns how many (a second call:
    none more)."""
    count = 0
    for module in model.modules():
        kept = KEPT.get(type(module))
        if kept is not None:
            module.__class__ = kept
            typing.cast(_KeptPositions, module).kept_positions = {}
            count += 1
    return count

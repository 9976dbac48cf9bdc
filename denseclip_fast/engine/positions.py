"""An engine's positional embeddings, made once per grid size instead of on every call.

The ResNet's attention pool and ViT's token embedding add a positional embedding whose spatial part is the stored
grid bilinearly resized to the input's grid (model/resnet.py ``resize_positional_grid``); ViT also adds its class
embedding to the first row. For a given grid size and dtype that is a constant of the weights: a Segmenter's
private model, whose weights never change (engine.rewrite.refuse_loading), keeps it. Per call that saves the
resize, a concatenation and, for ViT, the class row's sum and a second concatenation: 2 kernel launches at RN50's
attention pool, 4 at ViT's embedding (per CUDA graph replay too: a graph captured after an eager call or the
warm-up reads the kept tensor). The values are the module's own, computed by the same operations: bit for bit the
same logits.

Kept: at most ``MAX_SIZES`` entries, never dropped while the Segmenter lives, because a captured CUDA graph reads
the kept tensor at its address (a dropped and reused one would be read as garbage by the graph). Sizes past that
are computed on each call, as before. Neither kept nor read (computed, as the model does) where the call is traced
or transformed (:func:`~denseclip_fast.model.layers.intercepted`: an export would bake a constant) or where a
gradient could flow to the module's parameters; not kept while a CUDA graph is being captured (the capture runs no
kernel: the tensor would hold nothing until a replay; the eager calls and the warm-up before a capture keep it).
"""

from __future__ import annotations

import typing
import weakref
from typing import Any

import torch
from torch import nn

from ..model.layers import intercepted
from ..model.resnet import DenseAttentionPool
from ..model.vit import CLIPViTBackbone
from .projections import FusedAttentionPool

MAX_SIZES = 16  # entries (a size in a dtype, on a device, of the weights as they are) kept at most
Key = tuple[tuple[int, int], torch.dtype, torch.device, tuple[tuple[int, int], ...]]


class _KeptPositions:
    """The module's ``positions(size, dtype)``, kept as the module docstring says in ``kept_positions`` (a plain
    dict attribute, not moved by ``.to()`` and emptied in a deepcopy or a pickle: a copy keeps its own), per size,
    dtype, device and state of the module's own parameters (each one's address and in-place version: weights
    changed in place or moved by ``.to()`` are made anew, never read from what the old ones made), with weak
    references to those parameters: a tensor swapped in (``torch.func.functional_call``) that took a freed one's
    address at version 0 is another tensor, whose positions are made, not read (as DenseCLIP's class-embedding
    cache checks its tensors)."""

    kept_positions: dict[Key, tuple[tuple[weakref.ref[torch.Tensor], ...], torch.Tensor]]
    positional_embedding: nn.Parameter

    def _weights(self) -> tuple[list[torch.Tensor], tuple[tuple[int, int], ...]] | None:
        """The module's own parameters and their state now (each one's address and version); None where one needs
        a gradient that could flow (grad mode on): made on each call then, neither kept nor read."""
        params = list(self.parameters(recurse=False))  # type: ignore[attr-defined]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        try:
            return params, tuple((p.data_ptr(), p._version) for p in params)
        except RuntimeError:  # inference tensors (a model built under inference_mode) have no version counter
            return None

    def positions(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        weights = None if intercepted() else self._weights()
        if weights is None:
            return super().positions(size, dtype)  # type: ignore[misc]
        params, state = weights
        key = ((int(size[0]), int(size[1])), dtype, self.positional_embedding.device, state)
        kept = self.kept_positions.get(key)
        if kept is not None:
            if all(ref() is p for ref, p in zip(kept[0], params)):
                return kept[1]
            # another tensor at a kept one's address: made, not kept (the kept entry stays, since a captured graph
            # may read its tensor)
            return super().positions(size, dtype)  # type: ignore[misc]
        value: torch.Tensor = super().positions(size, dtype)  # type: ignore[misc]
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if len(self.kept_positions) < MAX_SIZES and not capturing:
            self.kept_positions[key] = (tuple(weakref.ref(p) for p in params), value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        """deepcopy and pickle: the module's state with nothing kept (a copy's weights may change apart from ours)."""
        state: dict[str, Any] = nn.Module.__getstate__(typing.cast(nn.Module, self))
        return {**state, "kept_positions": {}}


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
        if isinstance(module, _KeptPositions):  # swapped now, or by an earlier Segmenter: starts with nothing kept
            module.kept_positions = {}
            count += kept is not None
    return count

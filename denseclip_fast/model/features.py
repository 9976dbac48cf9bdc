"""What an image encoder hands to the rest of DenseCLIP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageFeatures:
    """levels: four maps at strides 4, 8, 16, 32 (B, C_i, H/s, W/s); global_feat: (B, D) the pooled/class token
    in the joint embedding space; local_feat: (B, D, h, w) the dense embedding map z (stride 32 for ResNets,
    16 for ViT); tokens: (B, 1 + h*w, D), [g; z] as one tensor where the encoder made g and z as its views (both of
    this package's encoders: :meth:`from_tokens`), else None. Frozen, so that tokens cannot fall out of step with
    the views."""

    levels: list[torch.Tensor]
    global_feat: torch.Tensor
    local_feat: torch.Tensor
    tokens: torch.Tensor | None = None

    @classmethod
    def from_tokens(cls, levels: list[torch.Tensor], tokens: torch.Tensor, size: Sequence[int]) -> ImageFeatures:
        """The features of an encoder whose output tokens (B, 1 + h*w, D) are the global token then the pixels of
        the (h, w) = ``size`` map row by row: g = tokens[:, 0] and z (B, D, h, w) are views of them (z with
        channels-last strides)."""
        local = tokens[:, 1:].unflatten(1, (int(size[0]), int(size[1]))).permute(0, 3, 1, 2)
        return cls(levels=levels, global_feat=tokens[:, 0], local_feat=local, tokens=tokens)

    def visual_context(self) -> torch.Tensor:
        """[g; z] as (B, 1 + h*w, D) tokens, the context decoder's memory (the official model's concatenation of
        the global embedding and the flattened map): the encoder's ``tokens`` where it has them, no copy; else the
        concatenation."""
        if self.tokens is not None:
            return self.tokens
        g, z = self.global_feat, self.local_feat
        return torch.cat([g.unsqueeze(1), z.flatten(2).transpose(1, 2)], dim=1)

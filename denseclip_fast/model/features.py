"""What an image encoder hands to the rest of DenseCLIP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageFeatures:
    """levels: four maps at strides 4, 8, 16, 32 (B, C_i, H/s, W/s); global_feat: (B, D) the pooled/class token
    in the joint embedding space; local_feat: (B, D, h, w) the dense embedding map z (stride 32 for ResNets,
    16 for ViT).

    tokens: (B, 1 + h*w, D), [g; z] as one tensor of which g and z are views, set only by :meth:`from_tokens` (both
    of this package's encoders), else None. Not an argument of the constructor, so ``dataclasses.replace`` drops it
    (features with another g or z never keep the tokens they no longer are views of), and frozen."""

    levels: list[torch.Tensor]
    global_feat: torch.Tensor
    local_feat: torch.Tensor
    tokens: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_tokens(cls, levels: list[torch.Tensor], tokens: torch.Tensor, size: Sequence[int]) -> ImageFeatures:
        """The features of an encoder whose output tokens (B, 1 + h*w, D) are the global token then the pixels of
        the (h, w) = ``size`` map row by row: g = tokens[:, 0] and z (B, D, h, w) are views of them (z with
        channels-last strides)."""
        h, w = int(size[0]), int(size[1])
        if tokens.dim() != 3 or tokens.shape[1] != 1 + h * w:
            raise ValueError(f"tokens must be (B, 1 + h*w, D) = (B, {1 + h * w}, D) for a map of size {(h, w)}, got "
                             f"shape {tuple(tokens.shape)}")  # fmt: skip
        local = tokens[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2)
        features = cls(levels=levels, global_feat=tokens[:, 0], local_feat=local)
        object.__setattr__(features, "tokens", tokens)
        return features

    def visual_context(self) -> torch.Tensor:
        """[g; z] as (B, 1 + h*w, D) tokens, the context decoder's memory (the official model's concatenation of
        the global embedding and the flattened map). The encoder's ``tokens`` as they are (no copy) where it has them
        and no gradient flows through them; else the concatenation, so that autograd sees the decoder read g and z
        as the official model's does (a gradient taken with respect to global_feat or local_feat includes the
        decoder's share)."""
        tokens = self.tokens
        if tokens is not None and not (torch.is_grad_enabled() and tokens.requires_grad):
            return tokens
        g, z = self.global_feat, self.local_feat
        return torch.cat([g.unsqueeze(1), z.flatten(2).transpose(1, 2)], dim=1)

"""What an image encoder hands to the rest of DenseCLIP."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """levels: four maps at strides 4, 8, 16, 32 (B, C_i, H/s, W/s); global_feat: (B, D) the pooled/class token
    in the joint embedding space; local_feat: (B, D, h, w) the dense embedding map z (stride 32 for ResNets,
    16 for ViT)."""

    levels: list[torch.Tensor]
    global_feat: torch.Tensor
    local_feat: torch.Tensor

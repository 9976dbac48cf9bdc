"""CLIP ModifiedResNet image encoder with the dense attention pool (DenseCLIP ``CLIPResNetWithAttention``).

Stem: three 3x3 convs (stride 2 on the first) with BN+ReLU, then a 2x2 average pool. Bottlenecks are anti-aliased:
a strided block average-pools after its 3x3 conv, and its shortcut average-pools before a 1x1 conv. Stages give
C2..C5 at strides 4/8/16/32 with 4w, 8w, 16w, 32w channels (w = 64 for RN50/RN101).

The attention pool is CLIP's, applied densely: tokens = [mean of C5; every C5 pixel] + positional embedding (the
stored grid bilinearly resized to the actual h x w, align_corners=False), then multi-head attention of every token
over all 1 + hw tokens with the q/k/v/c projections (through the fused ``ops.context_attention``). Token 0 is the
global embedding g (B, D); tokens 1.. form the local embedding map z (B, D, h, w); both are views of the output
tokens, which the context decoder reads as they are (ImageFeatures.visual_context).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import VisionConfig
from .features import ImageFeatures
from .layers import init_, split_heads


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        if out.dtype != identity.dtype:  # the sum in the promoted dtype (under autocast, say), as out + identity
            return self.relu(out + identity)
        # in place, as torchvision's Bottleneck: no new block-sized tensor per block (the conv and BatchNorm before
        # keep their inputs for backward, not their outputs)
        out += identity
        return self.relu(out)


def resize_positional_grid(pos: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize the spatial part of a positional embedding.

    pos: (1 + grid*grid, C), row 0 the class/global position. Returns (1 + h*w, C) for ``size = (h, w)``, the
    spatial rows resized as the official code does (NCHW bilinear, align_corners=False).
    """
    h, w = size
    c = pos.shape[1]
    spatial = pos[1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], spatial.reshape(c, h * w).t()], dim=0)


class DenseAttentionPool(nn.Module):
    """CLIP's QKV attention pool kept dense: returns the pooled token and every pixel token."""

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"attention pool width {embed_dim} is not divisible by heads {heads}")
        self.grid = grid
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, embed_dim))
        init_(nn.init.normal_, self.positional_embedding, std=embed_dim**-0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def positions(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The (1 + h*w, C) positional embedding of a C5 map of ``size`` (h, w), in ``dtype``: the same for every
        input of that size (a Segmenter keeps it per size: engine/positions.py)."""
        return resize_positional_grid(self.positional_embedding, self.grid, size).to(dtype)

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) tokens -> q, k, v, each (B, heads, N, C / heads)."""
        (q,) = split_heads(self.q_proj(tokens), self.heads)
        (k,) = split_heads(self.k_proj(tokens), self.heads)
        (v,) = split_heads(self.v_proj(tokens), self.heads)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: C5 (B, C, h, w) -> the output tokens (B, 1 + h*w, D): the global one, then every pixel's, row by row
        (ImageFeatures.from_tokens makes g and z their views)."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positions((h, w), tokens.dtype)
        q, k, v = self.project(tokens)
        out = ops.context_attention(q, k, v).transpose(1, 2).reshape(b, tokens.shape[1], c)
        return self.c_proj(out)  # (B, 1 + hw, D)


class CLIPResNetBackbone(nn.Module):
    """ModifiedResNet trunk + dense attention pool; ``forward`` returns :class:`ImageFeatures`."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        if cfg.kind != "resnet" or len(cfg.layers) != 4:
            raise ValueError(f"CLIPResNetBackbone needs kind='resnet' and 4 stages, got {cfg.kind!r} {cfg.layers}")
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = DenseAttentionPool(cfg.grid, width * 32, cfg.heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        x = self.stem(x.to(self.conv1.weight.dtype))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return ImageFeatures.from_tokens([c2, c3, c4, c5], self.attnpool(c5), c5.shape[-2:])

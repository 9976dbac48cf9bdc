"""CLIP ViT image encoder with DenseCLIP's 4-level pyramid (``CLIPVisionTransformer``, patch 16).

Tokens: patch conv, then a class token, then the positional embedding (spatial part bilinearly resized to the
actual grid). **The official code adds ``class_embedding`` twice to the class token** (once as the token, once
added to its positional embedding); ``VisionConfig.double_class_embedding`` (default True) reproduces that, which
released DenseCLIP checkpoints were trained with.

The token maps after blocks ``out_indices`` (3, 5, 7, 11) become the pyramid: fpn1 (GN, ConvT 2x, BN, GELU,
ConvT 2x) stride 4, fpn2 (GN, ConvT 2x) stride 8, fpn3 (GN) stride 16, fpn4 (GN, MaxPool 2) stride 32. The last
tokens go through ``ln_post`` and ``proj``: token 0 is the global embedding, the others the local map at stride 16.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .features import ImageFeatures
from .layers import LayerNormFp32, Transformer, init_
from .resnet import resize_positional_grid


def _pyramid(width: int) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    fpn1 = nn.Sequential(
        nn.GroupNorm(1, width),
        nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        nn.BatchNorm2d(width),  # SyncBatchNorm in the official training code; identical at inference
        nn.GELU(),
        nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
    )
    fpn2 = nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, kernel_size=2, stride=2))
    fpn3 = nn.GroupNorm(1, width)
    fpn4 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(kernel_size=2, stride=2))
    return fpn1, fpn2, fpn3, fpn4


class CLIPViTBackbone(nn.Module):
    """CLIP ViT trunk + pyramid adapters + dense projection; ``forward`` returns :class:`ImageFeatures`.
    ``activation``: of the blocks' MLPs (see layers.clip_activation). ``pyramid_channels_last``: the token maps the
    pyramid adapters take are channels_last instead of NCHW (the official code's); the CPU engine's copy sets it
    (engine.rewrite.channels_last_pyramid), the same values in another order. A bool: torch.save cannot write a
    memory format."""

    pyramid_channels_last: bool = False

    def __init__(self, cfg: VisionConfig, output_dim: int, activation: str = "quick_gelu") -> None:
        super().__init__()
        if cfg.kind != "vit" or len(cfg.layers) != 1:
            raise ValueError(f"CLIPViTBackbone needs kind='vit' and layers=(depth,), got {cfg.kind!r} {cfg.layers}")
        if cfg.patch_size != 16:
            raise ValueError(f"only patch_size=16 has the official pyramid, got {cfg.patch_size}")
        depth, width = cfg.layers[0], cfg.width
        if len(cfg.out_indices) != 4 or not all(0 <= i < depth for i in cfg.out_indices):
            raise ValueError(f"out_indices must be 4 block indices below {depth}, got {cfg.out_indices}")
        self.grid = cfg.grid
        self.out_indices = tuple(cfg.out_indices)
        self.double_class_embedding = cfg.double_class_embedding
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid**2 + 1, width))
        self.ln_pre = LayerNormFp32(width)
        # drop path per token position, shared by the batch: the official blocks run on (L, B, D) tokens and timm's
        # drop_path draws its mask along the first dimension (segmentation/denseclip/models.py), so that is what
        # the released ViT-B/16 models were trained with
        self.transformer = Transformer(
            width, depth, cfg.heads, drop_path_rate=cfg.drop_path_rate, drop_path_dim=1, activation=activation
        )
        self.ln_post = LayerNormFp32(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            init_(nn.init.normal_, p, std=scale)
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = _pyramid(width)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Image (B, 3, H, W) -> tokens (B, 1 + h*w, width) after ln_pre, and the grid (h, w)."""
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1)
        return self.ln_pre(x + self.positions((h, w), x.dtype)), h, w

    def positions(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The (1 + h*w, width) positional embedding of a token grid of ``size`` (h, w), in ``dtype``, the class
        embedding added to its first row where ``double_class_embedding``: the same for every input of that size (a
        Segmenter keeps it per size: engine/positions.py)."""
        pos = resize_positional_grid(self.positional_embedding.to(dtype), self.grid, size)
        if self.double_class_embedding:
            pos = torch.cat([pos[:1] + self.class_embedding.to(dtype), pos[1:]], dim=0)
        return pos

    def _token_map(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, D) tokens -> a (B, D, h, w) copy, NCHW or channels_last (``pyramid_channels_last``). channels_last
        is made as a contiguous (B, h, w, D) copy, permuted: its strides are then those of a channels_last tensor in
        every dimension, where ``.contiguous(memory_format=torch.channels_last)`` would give back a view at batch 1
        whose batch stride (free for a dimension of size 1) can make GroupNorm and ConvTranspose2d take it, and return
        it, as NCHW."""
        b = tokens.shape[0]
        if self.pyramid_channels_last:
            return tokens.reshape(b, h, w, -1).clone(memory_format=torch.contiguous_format).permute(0, 3, 1, 2)
        return tokens.transpose(1, 2).reshape(b, -1, h, w).contiguous()

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        x, h, w = self.embed(x)
        maps = []
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x)
            if i in self.out_indices:
                maps.append(self._token_map(x[:, 1:], h, w))
        levels = [fpn(m) for fpn, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]
        return ImageFeatures.from_tokens(levels, self.ln_post(x) @ self.proj, (h, w))

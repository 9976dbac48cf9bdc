"""Neck and head: mmseg's FPN and Semantic FPN head (``FPNHead``), with their state-dict names.

FPN: a 1x1 lateral conv per level (with bias), top-down path adding the coarser lateral upsampled by nearest
interpolation to the finer level's size, then a 3x3 output conv per level; no norm, no activation.

Semantic FPN head: per level, n = max(1, log2(stride / 4)) blocks of conv3x3-BN-ReLU, each followed by 2x bilinear
upsampling (align_corners=False, output size int(2 * input)) when the level's stride is above 4; the levels are
summed (each resized bilinearly to the stride-4 size), then dropout and a 1x1 classifier to K channels.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_


class ConvModule(nn.Module):
    """conv (+ BN) (+ ReLU) with mmcv's attribute names ``conv`` and ``bn``. The conv has a bias iff there is no BN."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: bool, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = nn.ReLU(inplace=True) if relu else None
        init_(nn.init.kaiming_normal_, self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class FPN(nn.Module):
    """``forward(levels) -> levels``: four maps in, four ``out_channels`` maps out at the same sizes."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(
            [ConvModule(c, out_channels, 1, norm=False, relu=False) for c in in_channels]
        )
        self.fpn_convs = nn.ModuleList(
            [ConvModule(out_channels, out_channels, 3, norm=False, relu=False) for _ in in_channels]
        )

    def lateral_channels_last(self, level: int) -> bool:
        """Whether the lateral conv of ``level`` has a channels_last weight (input channels innermost; read from the
        strides, since a 1x1 kernel's sizes fit both layouts). PyTorch runs a convolution channels_last when its
        weight or its input is."""
        weight = typing.cast(ConvModule, self.lateral_convs[level]).conv.weight
        return weight.stride(1) == 1 and weight.stride(-1) != 1

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(levels) != len(self.lateral_convs):
            raise ValueError(f"FPN expects {len(self.lateral_convs)} levels, got {len(levels)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = self.add_upsampled(laterals[i - 1], laterals[i])
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]

    def add_upsampled(self, finer: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        """The top-down step: ``finer`` + ``coarser`` resized to its size by nearest interpolation (a new tensor; the
        CUDA engine's override adds in place, into the lateral conv's fresh output)."""
        return finer + F.interpolate(coarser, size=finer.shape[2:], mode="nearest")


class Upsample2x(nn.Module):
    """mmseg's ``Upsample(scale_factor=2, mode='bilinear')``: resize to exactly int(2 * size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)


def _head_length(stride: int, base: int) -> int:
    return max(1, (stride // base).bit_length() - 1)


class SemanticFPNHead(nn.Module):
    """``forward(levels) -> logits (B, K, H/4, W/4)`` for pyramid levels at strides 4, 8, 16, 32."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
        strides: Sequence[int] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            blocks: list[nn.Module] = []
            for k in range(_head_length(stride, strides[0])):
                blocks.append(ConvModule(in_channels if k == 0 else channels, channels, 3, norm=True, relu=True))
                if stride != strides[0]:
                    blocks.append(Upsample2x())
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        # PyTorch's default initialisation, not mmseg's N(0, 0.01): the official training script never calls the
        # segmentor's init_weights (segmentation/train_denseclip.py initialises the backbone and text encoder only)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](levels[0])
        for head, x in zip(self.scale_heads[1:], levels[1:]):
            y = head(x)
            # mmseg resizes every scale head's output to the stride-4 size; when it has that size already (sides
            # divisible by 32) the bilinear resize is the identity (weights 1 and 0), so it is skipped: the same
            # sums for finite maps without a copy of the map per level (ATen's CPU resize turned an inf into NaN,
            # its CUDA resize copies)
            if y.shape[2:] != out.shape[2:]:
                y = F.interpolate(y, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.conv_seg(self.dropout(out))

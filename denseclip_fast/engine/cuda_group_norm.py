"""A 16-bit CUDA engine's ``GroupNorm(1, C)`` (a ViT pyramid adapter's first step) with its statistics reduced over
the whole GPU.

ATen's CUDA GroupNorm reduces each (sample, group) in one thread block (RowwiseMomentsCUDAKernel, N * G blocks: a
Welford update, with its division, per value). With one group that is one block per image for the whole map: in
ViT-B/16 at 640x640, 40 x 40 x 768 = 1.2 million values, on one of the H200's 132 multiprocessors, four times a call
(fpn1 to fpn4); at batch 1 the rest of the GPU waits. Here the same statistics come from ATen's general reductions,
which spread a long row over many blocks: ``torch.var_mean`` of a float32 copy of each image's values (biased
variance, as GroupNorm's), then the normalisation and the affine map as ``F.batch_norm`` in inference form on the
(1, N * C, H, W) view of the batch, each (image, channel) a channel with its image's mean and variance and its
channel's weight and bias (float32 statistics and parameters: computed in float32 and rounded once, as ATen's
GroupNorm computes). The results are ATen's within rounding, not bit for bit: the float32 statistics' sums differ in
order, and so an element's last place now and then (on a CPU at ViT-B/16's size, a few hundred of 2.5 million, about
as many of them off float64's as ATen's).

Not yet timed on a GPU: about nine small launches (the float32 copy, var_mean, the per-(image, channel) statistics,
the float32 weight and bias repeated per image) and the batch norm's pass, against one launch whose block works
through the map alone. bench_e2e's
``engine-bf16-aten-group-norm`` (DENSECLIP_FAST_GROUP_NORM=0) is the same engine without it, in gpu_check's ViT run.

Where it applies (:func:`swap_group_norms`): the backbone of a Segmenter's private copy on a device of
GROUP_NORM_DEVICES in float16 or bfloat16 (ViT's pyramid; a ResNet has no GroupNorm), not with
``DENSECLIP_FAST_GROUP_NORM=0`` (read when the Segmenter is built). A call that needs gradients or that something
records, autocast, another dtype or device, an input that is not NCHW-contiguous (the view needs it; the pyramid's
token maps are NCHW on CUDA), an image of one value (GroupNorm's error) or an eps that is not positive (which
F.batch_norm refuses in torch 2.11) takes ``nn.GroupNorm``'s own computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DenseCLIP
from ..model.layers import plain_tensors
from .rewrite import HALF_DTYPES, half_rewrite_wanted, replace_children

GROUP_NORM_DEVICES: tuple[str, ...] = ("cuda",)  # where the statistics are reduced so (tests add "cpu")


class WholeMapGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm(1, C)`` (its parameters, the same tensors) with the statistics of :func:`var_mean` and the
    affine map of ``F.batch_norm`` (module docstring) where :meth:`takes`, else ``nn.GroupNorm``'s."""

    @classmethod
    def of(cls, norm: nn.GroupNorm) -> WholeMapGroupNorm:
        """``norm`` (one group, with its affine parameters) as this class, over the same parameters."""
        if type(norm) is not nn.GroupNorm or norm.num_groups != 1 or not norm.affine:
            raise ValueError(f"WholeMapGroupNorm takes an nn.GroupNorm of one group with an affine map, got {norm!r}")
        whole = cls(1, norm.num_channels, norm.eps, affine=True, device="meta")
        whole.weight, whole.bias = norm.weight, norm.bias
        return whole

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` takes the whole-GPU statistics: plain tensors (no gradient needed, nothing
        recording the call) of the parameters' 16-bit dtype on a device of GROUP_NORM_DEVICES, outside autocast, a
        positive eps, and a non-empty NCHW-contiguous batch of ``num_channels`` channels, more than one value an
        image."""
        dtype = self.weight.dtype
        # plain_tensors first: it asks whether anything records the call before any shape is read (a tracer)
        if dtype not in HALF_DTYPES or not plain_tensors(dtype, GROUP_NORM_DEVICES, x, self.weight, self.bias):
            return False
        if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu") or not self.eps > 0:
            return False
        return (x.dim() >= 3 and x.shape[1] == self.num_channels and x.numel() > 0 and x[0].numel() > 1
                and x.is_contiguous())  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes(x):
            return super().forward(x)
        n, c = x.shape[:2]
        var, mean = torch.var_mean(x.view(n, -1).float(), dim=1, correction=0)
        y = F.batch_norm(x.view(1, n * c, -1), mean.repeat_interleave(c), var.repeat_interleave(c),
                         self.weight.float().repeat(n), self.bias.float().repeat(n), False, 0.0, self.eps)  # fmt: skip
        return y.view_as(x)


def group_norms_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Segmenter on ``device`` in ``dtype`` swaps them (:func:`swap_group_norms`): a device of
    GROUP_NORM_DEVICES, a 16-bit dtype, and not ``DENSECLIP_FAST_GROUP_NORM=0`` (read when it is built)."""
    return half_rewrite_wanted(device, dtype, GROUP_NORM_DEVICES, "DENSECLIP_FAST_GROUP_NORM")


def swap_group_norms(model: DenseCLIP) -> int:
    """Each ``nn.GroupNorm`` of one group with an affine map in ``model``'s backbone (a ViT's pyramid adapters) as a
    :class:`WholeMapGroupNorm` on the same parameters, in place; returns how many (a second call, or a ResNet:
    none)."""

    def whole(child: nn.Module) -> nn.Module | None:
        if type(child) is nn.GroupNorm and child.num_groups == 1 and child.affine:
            return WholeMapGroupNorm.of(child)
        return None

    return replace_children(model.backbone, whole)

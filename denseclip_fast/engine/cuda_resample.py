"""A CUDA engine's bilinear resizes, average poolings, FPN top-down steps and Semantic FPN head sums through Triton
kernels (ops/triton/resample.py).

ATen's kernels for these took 452 us of the 1573 us of GPU time of an RN50 512x512 bfloat16 engine at batch 1 on an
H200, and 7.3 of 13.9 ms at batch 16 (benchmarks/results/h200_2026-12-04b/e2e_rn50_whole.md): the logits' resize to
the image 169 us (after a float32 copy of the head's output), the Semantic FPN head's 2x upsamplings 149 us, the
ResNet's average poolings 96 us, the FPN's nearest upsamplings 38 us (and the sums after them).

Where it applies: a Segmenter on a GPU swaps its private model's ``FPN`` (the neck), ``SemanticFPNHead`` (the head: each
level's last 2x upsampling added into the levels' sum in place, one pass that writes no upsampled map; not yet timed on
a GPU), ``Upsample2x`` (the FPN head's scale heads) and ``nn.AvgPool2d(s)`` modules (the ResNet stem's, each strided
bottleneck's and its shortcut's) for the modules below (:func:`swap_resamplings`), resizes its logits
(engine.segmenter.resized) with :func:`resize_planes`, and makes predict's labels with :func:`resize_argmax_` (the last
resize and the argmax in one pass: ops/triton/labels.py). The trainer (train.step.prepare_model, on CUDA) swaps the
poolings and the upsamplings (``trainable_only``), which run forward and backward through the kernels where autograd
records them (:func:`trainable`: the autograd Functions below), and train/resize.py takes :func:`resize` and
:func:`resized_gradient` for the loss. A call that something records (torch.compile, torch.export, a dispatch mode, a
functorch transform), a tensor that is not a plain CUDA one, Triton missing, or ``DENSECLIP_FAST_TRITON_RESAMPLE=0``
take PyTorch's ``F.interpolate``, ``F.avg_pool2d`` and addition, as the model computes them (so do the FPN's and the
head's in-place steps where autograd records them). Results follow autocast as F.interpolate's do
(:func:`resized_dtype`). The pooling and the top-down step equal ATen's bit for bit; the bilinear resize may differ from
it in the last bits of float32 (where the compilers contract its products into FMAs differently), its gradient in the
order of its sums; the head's fused sum equals the Triton resize followed by ATen's addition bit for bit.
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..model.heads import FPN, SemanticFPNHead, Upsample2x
from ..model.layers import plain_tensors, untraced_tensors
from ..ops import backends

DEVICE_TYPES = ("cuda",)  # where the kernels run (tests add "cpu": Triton's interpreter)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels() -> Any:
    from ..ops.triton import resample

    return resample


def enabled() -> bool:
    """Triton importable and the kernels not switched off (``DENSECLIP_FAST_TRITON_RESAMPLE=0``). Asked only for a
    tensor the kernels could take: importing the Triton backend at ``import denseclip_fast`` would import torch's
    compiler (torch.library.triton_op: seconds of a fresh process, tests/test_packaging.py)."""
    return os.environ.get("DENSECLIP_FAST_TRITON_RESAMPLE", "1") != "0" and backends.triton_available() is None


def usable(x: torch.Tensor) -> bool:
    """Whether a resampling of ``x`` may take the Triton kernels (module docstring); a CPU tensor is refused before
    anything imports Triton."""
    return x.dtype in DTYPES and plain_tensors(x.dtype, DEVICE_TYPES, x) and enabled()


class TritonUpsample2x(Upsample2x):
    """mmseg's ``Upsample(scale_factor=2, mode='bilinear')`` (resize to exactly twice the size) by the Triton
    kernels (:func:`resize`; where autograd records the call, :func:`trainable`, forward and backward), in the dtype
    F.interpolate gives (autocast's float32 included) and the input's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (2 * x.shape[-2], 2 * x.shape[-1])
        if x.dim() == 4 and x.numel() > 0 and trainable(x):
            return typing.cast(torch.Tensor, _Resize.apply(x, size, resized_dtype(x)))
        return resize(x, size)


def trainable(x: torch.Tensor) -> bool:
    """Whether a resampling of ``x`` that autograd records may take the Triton kernels forward and backward: x needs
    a gradient, nothing else records or transforms the call (intercepted: torch.compile, a dispatch mode, forward-mode
    AD), x is a plain CUDA tensor of a float dtype, and the kernels are on."""
    return (torch.is_grad_enabled() and x.requires_grad and x.dtype in DTYPES
            and untraced_tensors(x.dtype, DEVICE_TYPES, x) and enabled())  # fmt: skip


class _AvgPool(torch.autograd.Function):
    """The Triton average pooling with the Triton backward (ATen's NHWC backward took 4.75 ms of an RN50 training
    step's 88 ms of GPU time at batch 16 on an H200, benchmarks/results/h200_2026-12-04c/train_rn50_b16.md: about
    ten times the bytes it moves at the HBM's rate). Keeps x's size and layout for the backward, not x; once
    differentiable (PyTorch's once_differentiable: a second derivative through backward() or autograd.grad raises,
    autograd.grad(allow_unused=True) gives None, as for any such function)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: int) -> torch.Tensor:
        ctx.s, ctx.size = s, tuple(x.shape)
        ctx.memory_format = _kernels().layout_of(x)
        return typing.cast(torch.Tensor, _kernels().avg_pool(x, s))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _kernels().avg_pool_backward(grad, ctx.size, ctx.s, ctx.memory_format), None


class _Resize(torch.autograd.Function):
    """The Triton bilinear resize with the Triton backward (resample.bilinear_backward), its result in ``dtype``
    (F.interpolate's under autocast: float32), its gradient in x's dtype and layout; once differentiable."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        ctx.shape, ctx.dtype = tuple(x.shape), x.dtype
        ctx.memory_format = _kernels().layout_of(x)
        return typing.cast(torch.Tensor, _kernels().bilinear(x, size, dtype=dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _kernels().bilinear_backward(grad, ctx.shape, ctx.memory_format, ctx.dtype), None, None


class TritonAvgPool2d(nn.Module):
    """``nn.AvgPool2d(s)`` (kernel = stride = s, no padding, floor sizes) by the Triton kernel where :func:`usable`
    (and the map has a window), in the input's dtype and layout; where autograd records the call
    (:func:`trainable`), the Triton kernels forward and backward."""

    def __init__(self, s: int) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[-2] >= self.s and x.shape[-1] >= self.s:
            if usable(x):
                return _kernels().avg_pool(x, self.s)
            if trainable(x):
                return typing.cast(torch.Tensor, _AvgPool.apply(x, self.s))
        return F.avg_pool2d(x, self.s)

    def extra_repr(self) -> str:
        return f"kernel_size={self.s}, stride={self.s} (Triton)"


class TritonFPN(FPN):
    """An FPN over the same convolutions whose top-down step adds the coarser lateral, resized by nearest
    interpolation, into the finer lateral in place (one Triton pass, the lateral being its conv's fresh output)
    where :func:`usable`; else the model's step."""

    def __init__(self, fpn: FPN) -> None:
        nn.Module.__init__(self)  # not FPN's: the convolutions are fpn's own
        self.lateral_convs, self.fpn_convs = fpn.lateral_convs, fpn.fpn_convs

    def add_upsampled(self, finer: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        if (finer.dim() == 4 and coarser.dim() == 4 and finer.dtype == coarser.dtype and usable(finer)
                and usable(coarser) and coarser.numel() > 0 and resized_dtype(coarser) == coarser.dtype):  # fmt: skip
            # (under autocast the model's resize is float32, and so its sum: not the in-place step)
            return _kernels().add_nearest_(finer, coarser)
        return super().add_upsampled(finer, coarser)


class TritonSemanticFPNHead(SemanticFPNHead):
    """A Semantic FPN head over the same modules whose levels after the first add their scale head's last 2x
    upsampling into the running sum in place, one Triton pass that writes no upsampled map
    (resample.add_bilinear_: the resize rounded to the sum's dtype, then the sum rounded once, as the model's
    ``out + y`` of the Triton resize), where :meth:`fusable`; else the model's step: the upsampling, its resize to
    the sum's size where that differs, the new sum. It runs each scale head's blocks itself (hooks on a scale head's
    Sequential do not fire) and writes into the first scale head's output (a hook keeping it would see it change):
    a private inference model's head, as the Segmenter's."""

    def __init__(self, head: SemanticFPNHead) -> None:
        nn.Module.__init__(self)  # not SemanticFPNHead's: the modules are head's own
        self.scale_heads, self.dropout, self.conv_seg = head.scale_heads, head.dropout, head.conv_seg

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](levels[0])
        for head, x in zip(self.scale_heads[1:], levels[1:]):
            blocks = list(head) if isinstance(head, nn.Sequential) else [head]
            if blocks and type(blocks[-1]) in (Upsample2x, TritonUpsample2x):
                small = x
                for block in blocks[:-1]:
                    small = block(small)
                if self.fusable(out, small, levels):
                    _kernels().add_bilinear_(out, small)
                    continue
                y = blocks[-1](small)  # (head(x), the model's y)
            else:
                y = head(x)
            if y.shape[2:] != out.shape[2:]:  # the model's step (SemanticFPNHead.forward)
                y = F.interpolate(y, size=out.shape[2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.conv_seg(self.dropout(out))

    @staticmethod
    def fusable(out: torch.Tensor, small: torch.Tensor, levels: Sequence[torch.Tensor]) -> bool:
        """Whether ``small``'s 2x upsampling may be added into ``out`` in place: both maps ones the kernels take
        (:func:`usable`: no gradient recorded, nothing tracing the call), of one dtype that autocast leaves to the
        resize (under CUDA autocast the model's resize and sum are float32), the upsampling of out's size, and out a
        map of the head's own (a conv's fresh output or an earlier sum): dense, NCHW or NHWC (no element stored
        twice, as in a broadcast view), sharing no memory with the levels or ``small`` (a first scale head that
        returned its input, or a view of it, keeps the model's new sum)."""
        if not (out.dim() == 4 and small.dim() == 4 and small.numel() > 0 and out.dtype == small.dtype
                and out.shape[:2] == small.shape[:2] and out.shape[2:] == (2 * small.shape[2], 2 * small.shape[3])
                and usable(out) and usable(small) and resized_dtype(small) == small.dtype
                and (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last))):  # fmt: skip
            return False
        memory = out.untyped_storage().data_ptr()
        return all(t.untyped_storage().data_ptr() != memory for t in (*levels, small))


def _plain_pool(module: nn.Module) -> int | None:
    """s when ``module`` is exactly ``nn.AvgPool2d(s)`` (kernel = stride = s, no padding, floor sizes), else None."""
    if type(module) is not nn.AvgPool2d:
        return None
    k, stride, pad = (_single(v) for v in (module.kernel_size, module.stride, module.padding))
    if k is None or stride != k or pad != 0 or module.ceil_mode or module.divisor_override is not None:
        return None
    return k


def _single(value: Any) -> int | None:
    """An int, or a tuple of equal ints, as that int; else None."""
    if isinstance(value, int):
        return value
    values = set(value)
    return int(values.pop()) if len(values) == 1 else None


def swap_resamplings(model: nn.Module, trainable_only: bool = False) -> int:
    """Replace ``model``'s ``FPN``, ``SemanticFPNHead``, ``Upsample2x`` and plain ``nn.AvgPool2d(s)`` modules with
    the Triton ones (an ``nn.AvgPool2d(1)``, a copy, with ``nn.Identity``), in place; returns how many (a second
    call: none). ``trainable_only``: the average poolings and the upsamplings alone (the trainer's: the FPN's and
    the head's in-place steps have no backward)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            s = _plain_pool(child)
            if trainable_only and type(child) in (FPN, SemanticFPNHead):
                continue
            if type(child) is Upsample2x:
                setattr(parent, name, TritonUpsample2x())
            elif type(child) is FPN:
                setattr(parent, name, TritonFPN(child))
            elif type(child) is SemanticFPNHead:
                setattr(parent, name, TritonSemanticFPNHead(child))
            elif s == 1:  # a copy (CLIP's unstrided shortcuts have one): the map as it is, the same values
                setattr(parent, name, nn.Identity())
            elif s is not None:
                setattr(parent, name, TritonAvgPool2d(s))
            else:
                continue
            count += 1
    return count


def resized_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.interpolate gives x: x's, but under autocast on x's device what autocast's policy for the
    resizes says (CUDA's float32 list holds upsample_bilinear2d and upsample_nearest2d; the CPU's does not)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x.dtype
    return _autocast_resize_dtype(device, x.dtype, torch.get_autocast_dtype(device))


@functools.lru_cache(maxsize=64)
def _autocast_resize_dtype(device: str, dtype: torch.dtype, autocast_dtype: torch.dtype) -> torch.dtype:
    """Asked of autocast once per combination, by a resize of one pixel: its policy, not a copy of it here."""
    with torch.autocast(device, dtype=autocast_dtype):
        probe = torch.zeros((1, 1, 1, 1), dtype=dtype, device=device)
        return F.interpolate(probe, size=(2, 2), mode="bilinear", align_corners=False).dtype


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``: by the Triton kernel where :func:`usable`, in
    the dtype F.interpolate gives (:func:`resized_dtype`) and x's layout (as F.interpolate's), else F.interpolate
    itself."""
    if x.dim() == 4 and usable(x):
        return typing.cast(torch.Tensor, _kernels().bilinear(x, size, dtype=resized_dtype(x)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resized_gradient(grad: torch.Tensor, size: tuple[int, int], memory_format: torch.memory_format) -> torch.Tensor:
    """The gradient with respect to x (size (H, W)) of :func:`resize`'s bilinear resize given ``grad``, the output's,
    by the Triton kernels (the caller has asked :func:`usable` of grad), in ``memory_format``."""
    n, c = grad.shape[:2]
    return typing.cast(torch.Tensor, _kernels().bilinear_backward(grad, (n, c, *size), memory_format))


def planes_usable(scores: torch.Tensor) -> bool:
    """Whether :func:`resize_planes` resizes ``scores`` by the Triton kernel (into a buffer of its own): a non-empty
    (N, C, h, w) map it may take (:func:`usable`)."""
    return scores.dim() == 4 and scores.numel() > 0 and usable(scores)


def resize_planes(scores: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``scores`` (N, C, h, w) resized bilinearly (align_corners=False) to float32 (N, C, H, W) NCHW planes by the
    Triton kernel, reading scores in their own dtype and layout, into ``out`` (N*C*H*W float32 values) when given;
    None (nothing allocated or written) where the kernel does not apply."""
    if not planes_usable(scores):
        return None
    if out is not None and not plain_tensors(torch.float32, DEVICE_TYPES, out):
        return None
    n, c = scores.shape[:2]
    shape = (n, c, int(size[0]), int(size[1]))
    target = torch.empty(shape, dtype=torch.float32, device=scores.device) if out is None else out.view(shape)
    return typing.cast(torch.Tensor, _kernels().bilinear_into(target, scores))


def labels_usable(scores: torch.Tensor) -> bool:
    """Whether predict's last resize and argmax over the classes of ``scores`` (N, K, h, w) may be one pass of the
    fused kernel (:func:`resize_argmax_`): where the resize kernel takes them (:func:`planes_usable`)."""
    return planes_usable(scores)


def resize_argmax_(scores: torch.Tensor, best: torch.Tensor, index: torch.Tensor, first: int) -> None:
    """Offer the classes of ``scores`` (N, K, h, w), any float dtype and layout, resized bilinearly to the (H, W) of
    ``best``, to the running argmax ``best`` (N, H, W) float32 / ``index`` (N, H, W) int64 as classes first ..
    first + K - 1, in place (ops/triton/labels.py; ``first`` 0 starts it): the labels equal the argmax of
    :func:`resize_planes`' planes pixel for pixel, with no plane written."""
    from ..ops.triton import labels

    labels.bilinear_argmax_(scores, best, index, first)

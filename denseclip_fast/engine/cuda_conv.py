"""A 16-bit CUDA engine's folded convolutions with their bias, ReLU and residual sum in one cuDNN call.

ATen runs a convolution with a bias as cuDNN's convolution followed by a broadcast addition of the bias (a kernel of
its own, ATen's generic elementwise one on a channels_last map), and the ReLU after it, and a bottleneck's residual
sum, as more passes over the output. On an H200 (RN50 512x512, bfloat16, batch 1;
benchmarks/results/h200_2026-12-04/e2e_rn50_whole.md's profile) the broadcast additions took 319 us in 71 launches
and the ReLUs 109 us in 58, of the engine's 1953 us of GPU time. ``torch.cudnn_convolution_relu`` and
``torch.cudnn_convolution_add_relu`` (ATen's own operators over cuDNN's fused convolution-bias-activation) compute
relu(conv(x, w) + bias) and relu(conv(x, w) + residual + bias) as one operation.

Where the rewrite applies (:func:`fuse_cudnn_convolutions`): the image path of a Segmenter's private copy of a model
on a GPU in float16 or bfloat16, after its BatchNorms were folded: the ResNet stem's three convolutions and ReLUs,
each bottleneck's (two conv + ReLU, the last conv with the residual sum and ReLU), the Semantic FPN's conv + ReLU
blocks. The parameters stay the same tensors. Float32 engines keep PyTorch's convolutions (their TF32 setting is the
engine's to keep), and so does an engine that lets non-finite images through (``check_finite=False``: a fused ReLU
need not keep NaN).

Not yet run on a GPU: the Segmenter checks the operators once on its GPU and dtype against the plain path
(:func:`cudnn_fusion_problem`: a small convolution with and without a residual, within the dtype's rounding) and
keeps PyTorch's convolutions where they raise or differ; ``DENSECLIP_FAST_CUDNN_FUSION=0`` keeps them always. A call
that needs gradients or that something records (torch.compile, torch.export, a dispatch mode), autocast, cuDNN
switched off, and tensors that are not plain CUDA ones of the weights' dtype take ``F.conv2d`` and the ReLU and sum
in PyTorch, as the model computes them.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DenseCLIP
from ..model.heads import ConvModule
from ..model.layers import plain_tensors
from ..model.resnet import Bottleneck
from .fallback import EngineFallbackWarning
from .rewrite import folded, relu_sites

DTYPES = (torch.float16, torch.bfloat16)
DEVICE_TYPES = ("cuda",)  # where the operators run (tests add "cpu" with stand-ins for them)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the result, as the operator tests'


def plain_cuda_call(dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` (None where there is none) may take cuDNN's fused operators: cuDNN enabled, no
    gradient needed, nothing recording the call, no autocast, and every tensor a plain CUDA one of ``dtype``."""
    if not torch.backends.cudnn.enabled or torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
        return False
    return plain_tensors(dtype, DEVICE_TYPES, *tensors)


LARGEST = 2**31  # elements of a map past which the plain path is taken (ATen splits such convolutions itself)


class CudnnConv2d(nn.Module):
    """A folded ``nn.Conv2d`` (with a bias) and the ReLU after it, optionally with a residual added before the ReLU,
    in one cuDNN call where :func:`plain_cuda_call` allows and the maps are below LARGEST elements, else
    ``F.conv2d``, the sum and ``torch.relu``. A fused call that raises (cuDNN without a plan for a shape the
    Segmenter's check did not try) is reported once as a warning and the module keeps to the plain path."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d or conv.bias is None or conv.padding_mode != "zeros":
            raise ValueError("CudnnConv2d takes a plain nn.Conv2d with a bias and zero padding")
        if isinstance(conv.padding, str):
            raise ValueError("CudnnConv2d takes a numeric padding")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.failed: str | None = None  # why a fused call raised here; the plain path from then on

    def _plain(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return torch.relu(out if residual is None else out + residual)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        fused = self.failed is None and plain_cuda_call(self.weight.dtype, x, self.weight, self.bias, residual)
        if not fused or x.numel() >= LARGEST or x.numel() // self.in_channels * self.out_channels >= LARGEST:
            return self._plain(x, residual)
        try:
            return fused_call(x, self.weight, self.bias, residual, self.stride, self.padding, self.dilation,
                              self.groups)  # fmt: skip
        except RuntimeError as exc:
            self.failed = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"cuDNN's fused convolution failed on a {tuple(x.shape)} input ({self.failed}); this "
                          "convolution runs as PyTorch's from now on", EngineFallbackWarning, stacklevel=2)  # fmt: skip
            return self._plain(x, residual)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}"
                ", bias + ReLU fused")  # fmt: skip


def fused_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
               stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:  # fmt: skip
    """relu(conv(x, weight) + bias (+ residual)) by cuDNN's fused operators, as they are."""
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


class CudnnBottleneck(nn.Module):
    """A ResNet :class:`Bottleneck` whose BatchNorms are folded, over the same modules: conv1 and conv2 with their
    ReLUs, conv3 with the residual sum and the ReLU (the shortcut's convolution stays PyTorch's)."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        if not folded(block.bn1, block.bn2, block.bn3):
            raise ValueError("CudnnBottleneck takes a Bottleneck whose BatchNorms are folded (engine.rewrite)")
        self.conv1, self.bn1 = CudnnConv2d(block.conv1), block.bn1
        self.conv2, self.bn2 = CudnnConv2d(block.conv2), block.bn2
        self.avgpool = block.avgpool
        self.conv3, self.bn3 = CudnnConv2d(block.conv3), block.bn3
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(out, identity)


class GemmConv1x1(nn.Module):
    """A 1x1, stride-1, ungrouped ``nn.Conv2d`` with a bias and no ReLU after it (the ResNet shortcuts', the FPN's
    laterals, the head's classifier) as one cuBLAS GEMM with the bias in its epilogue, where :func:`plain_cuda_call`
    allows and the map is NHWC-contiguous: ``F.linear`` of the (N, H, W, C) view, whose (N, H, W, C_out) result is
    returned as the channels_last map it is. ATen's convolution adds the bias in a kernel of its own (its generic
    broadcast one, 13 of them in an RN50 engine: 71 us of 1573 at batch 1, 967 us of 13.9 ms at batch 16 on an H200,
    benchmarks/results/h200_2026-12-04b), after rounding the product once before the bias. Elsewhere ``F.conv2d``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not gemm_convolution(conv):
            raise ValueError("GemmConv1x1 takes a 1x1, stride-1, unpadded, ungrouped nn.Conv2d with a bias")
        self.weight, self.bias = conv.weight, conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # plain_cuda_call first: it asks whether anything records the call before any shape is read (a tracer)
        if (plain_cuda_call(self.weight.dtype, x, self.weight, self.bias) and x.dim() == 4
                and x.shape[1] == self.in_channels and x.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
            rows = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
            return F.linear(rows, self.weight.reshape(self.out_channels, self.in_channels), self.bias).permute(
                0, 3, 1, 2)  # fmt: skip
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), bias in the GEMM"


def gemm_convolution(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain 1x1, stride-1, unpadded, ungrouped, undilated ``nn.Conv2d`` with a bias."""
    return (type(conv) is nn.Conv2d and conv.bias is not None and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1) and conv.padding in ((0, 0), 0, "valid") and conv.groups == 1
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")  # fmt: skip


def gemm_pointwise_convolutions(model: DenseCLIP) -> int:
    """Rewrite the 1x1 convolutions with a bias that are left in ``model``'s image path (backbone, neck, head) after
    :func:`fuse_cudnn_convolutions` as :class:`GemmConv1x1`, in place; returns how many (a second call: none)."""
    count = 0
    for part in (model.backbone, model.neck, model.decode_head):
        for parent in list(part.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and gemm_convolution(child):
                    setattr(parent, name, GemmConv1x1(child))
                    count += 1
    return count


def fuse_cudnn_convolutions(model: DenseCLIP) -> int:
    """Rewrite ``model``'s image-path convolutions that a ReLU follows (module docstring) in place; returns how many
    convolutions were rewritten (a second call: none). For a folded model (engine.rewrite.fold_batchnorm): a block
    whose BatchNorm is still there is left as it is."""
    count = 0
    for kind, parent, child_name in relu_sites(model):
        if kind == "stem":
            for conv in ("conv1", "conv2", "conv3"):
                setattr(parent, conv, CudnnConv2d(getattr(parent, conv)))
            setattr(parent, "relu", nn.Identity())  # the stem's only: the bottlenecks have their own
            count += 3
        elif kind == "block":
            setattr(parent, child_name, CudnnBottleneck(getattr(parent, child_name)))
            count += 3
        elif isinstance(parent, ConvModule) and type(parent.act) is nn.ReLU and parent.conv.bias is not None:
            setattr(parent, "conv", CudnnConv2d(parent.conv))
            parent.act = None
            count += 1
    return count


# The check's convolutions: (in, out, kernel, stride), the shapes the rewrite meets: the stem's first (3 channels,
# stride 2), a 3x3, a strided 3x3 and a 1x1
CHECKS = ((3, 32, 3, 2), (32, 48, 3, 1), (32, 48, 3, 2), (64, 96, 1, 1))


def cudnn_fusion_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused operators cannot serve an engine on ``device`` in ``dtype`` (None if they can): not a CUDA GPU
    or a 16-bit dtype, cuDNN or the rewrite switched off (``DENSECLIP_FAST_CUDNN_FUSION=0``), or, on small
    convolutions of the shapes the rewrite meets (CHECKS; channels_last, with and without a residual), an error or
    a result off the plain path's by more than the dtype's rounding (TOLERANCE). The operators are called as they
    are (no autocast), on memory that held NaN just before: ATen's convolution + ReLU passes its fresh output to
    cuDNN as a residual scaled by 0, which must not be read."""
    if device.type not in DEVICE_TYPES or dtype not in DTYPES:
        return f"cuDNN's fused convolutions serve float16 and bfloat16 on CUDA, not {dtype} on {device.type}"
    if os.environ.get("DENSECLIP_FAST_CUDNN_FUSION", "1") == "0":
        return "switched off by DENSECLIP_FAST_CUDNN_FUSION=0"
    if not torch.backends.cudnn.enabled:
        return "cuDNN is switched off (torch.backends.cudnn.enabled)"
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype).contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)  # fmt: skip

    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for cin, cout, kernel, stride in CHECKS:
                weight, bias = randn(cout, cin, kernel, kernel) * (cin * kernel * kernel) ** -0.5, randn(cout)
                x = randn(2, cin, 9, 11)
                args = ([stride] * 2, [kernel // 2] * 2, [1, 1], 1)
                plain = F.conv2d(x, weight, bias, *args)
                residual = randn(*plain.shape)
                for res in (None, residual):
                    want = torch.relu(plain if res is None else plain + res)
                    torch.full_like(want, float("nan"))  # freed at once: the next allocation of its size reuses it
                    got = fused_call(x, weight, bias, res, *args)
                    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
                    if not torch.isfinite(err) or err > TOLERANCE[dtype]:
                        what = f"{cin}->{cout} channels, {kernel}x{kernel}, stride {stride}"
                        return f"cuDNN's fused convolution is {float(err):.2g} off the plain one here ({what})"
    except RuntimeError as exc:  # the operator missing in this build, or cuDNN without a plan for it
        return f"cuDNN's fused convolution failed here: {str(exc).strip().splitlines()[0][:200]}"
    return None

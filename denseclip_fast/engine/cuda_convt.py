"""A 16-bit CUDA engine's ViT pyramid transposed convolutions (2x2, stride 2) as one cuBLAS GEMM each.

The pyramid adapters of a ViT backbone upsample its token maps with ``nn.ConvTranspose2d(D, D, 2, stride=2)``: three
of them in ViT-B/16 (fpn1's two, fpn2's), D = 768, from the 40x40 map at 640x640. ATen runs each as cuDNN's
convolution data gradient, then adds the bias in a pass of its own over the output. Such a convolution's kernels
do not overlap: the 2x2 block of the output at each input pixel is that pixel's D channels times the weight, so the
whole convolution is one matrix product of (pixels, D) by (D, 2 * 2 * D) (cpu_conv.GemmConvTranspose2d, the CPU
engine's, makes it in bands of rows for the cache). Here: one GEMM of all the batch's pixels by the weight seen as a
(D, 2 * 2 * D) matrix (a view of the engine's channels_last weight: nothing kept), then one elementwise pass that
adds the bias while it writes each pixel's block into its place of a channels_last output. A channels_last input is
the GEMM's (pixels, D) operand as it is; an NCHW one (the GroupNorm's output on CUDA) is read as each image's
transposed (D, pixels) matrix, a batched GEMM over the images sharing the weight (on CUDA a batch stride of 0, no
copy: the GPU test checks; ATen's CPU matmul copies the shared weight per image). The product is rounded to the dtype
before the bias is added and the sum rounded, as on PyTorch's path (cuDNN's product, then ATen's bias pass); its
sums are cuBLAS's, in their own order. The output is in the layout the FPN's 1x1 laterals take as a GEMM
(cuda_conv.GemmConv1x1).

Not yet timed on a GPU: cuDNN's transposed convolutions have had slow cases (pytorch/pytorch#51933), and ViT-B/16's
H200 latency (8.07 ms at batch 1, benchmarks/results/h200_2026-12-04/e2e_others.md) is several times what its
FLOPs need; this path's GEMM and its pass over the output move the bytes cuDNN's convolution and ATen's bias pass
move. bench_e2e's ``engine-bf16-cudnn-convt`` (DENSECLIP_FAST_GEMM_CONVT=0) is the same engine without it, in
gpu_check's ViT run.

Where it applies (:func:`gemm_transposed_convolutions`): the backbone of a Segmenter's private copy on a device of
GEMM_CONVT_DEVICES in float16 or bfloat16 (a float32 engine keeps PyTorch's), not with ``DENSECLIP_FAST_GEMM_CONVT=0``
(read when the Segmenter is built). A call that needs gradients or that something records (torch.compile,
torch.export, a dispatch mode), autocast, another dtype or device, or an input neither NCHW- nor
channels_last-contiguous takes ``F.conv_transpose2d``, as the model computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DenseCLIP
from ..model.layers import plain_tensors
from .cpu_conv import GemmConvTranspose2d
from .rewrite import HALF_DTYPES, half_rewrite_wanted, replace_children

GEMM_CONVT_DEVICES: tuple[str, ...] = ("cuda",)  # where the GEMM is taken (tests add "cpu")


class CudaGemmConvTranspose2d(GemmConvTranspose2d):
    """A transposed convolution whose kernel is its stride (cpu_conv.GemmConvTranspose2d's conditions), over the same
    parameters, as one matrix product and one pass that adds the bias into a channels_last output (module
    docstring), where :meth:`takes_gemm`; else ``F.conv_transpose2d``."""

    def takes_gemm(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` takes the GEMM: a non-empty 4-D batch of ``in_channels`` channels, NCHW- or
        channels_last-contiguous, and plain tensors (no gradient needed, nothing recording the call) of a 16-bit
        weight's dtype on a device of GEMM_CONVT_DEVICES, outside autocast."""
        dtype = self.weight.dtype
        # plain_tensors first: it asks whether anything records the call before any shape is read (a tracer)
        if dtype not in HALF_DTYPES or not plain_tensors(dtype, GEMM_CONVT_DEVICES, x, self.weight, self.bias):
            return False
        if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
            return False
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.numel() == 0:
            return False
        return x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_gemm(x):
            return F.conv_transpose2d(x, self.weight, self.bias, self.kernel_size)
        matrix = self._made_from_weight(self._matrix)  # (C, kh * kw * O), columns (row in block, column, channel)
        (kh, kw), (n, c, h, w), o = self.kernel_size, x.shape, self.out_channels
        if x.is_contiguous(memory_format=torch.channels_last):
            product = torch.mm(x.permute(0, 2, 3, 1).reshape(n * h * w, c), matrix)  # the (n h w, C) view
        else:  # NCHW: each image's (C, h w) matrix, transposed (cuBLAS reads it so)
            product = torch.matmul(x.view(n, c, h * w).mT, matrix)
        out = torch.empty((n, o, kh * h, kw * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        # out[b, o, kh i + a, kw j + d] = rows[b, i, a, j, d, o] = product[b, i, j, (a, d, o)]
        rows = out.permute(0, 2, 3, 1).view(n, h, kh, w, kw, o)
        blocks = product.view(n, h, w, kh, kw, o).transpose(2, 3)
        if self.bias is None:
            rows.copy_(blocks)
        else:
            torch.add(blocks, self.bias, out=rows)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", one GEMM"


def gemm_transposed_convolutions_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Segmenter on ``device`` in ``dtype`` rewrites them (:func:`gemm_transposed_convolutions`): a device
    of GEMM_CONVT_DEVICES, a 16-bit dtype, and not ``DENSECLIP_FAST_GEMM_CONVT=0`` (read when it is built)."""
    return half_rewrite_wanted(device, dtype, GEMM_CONVT_DEVICES, "DENSECLIP_FAST_GEMM_CONVT")


def gemm_transposed_convolutions(model: DenseCLIP) -> int:
    """Each ``nn.ConvTranspose2d`` of ``model``'s backbone whose kernel is its stride (a ViT's pyramid adapters') as
    a :class:`CudaGemmConvTranspose2d` on the same parameters, in place; returns how many (a second call, or a
    ResNet: none). After the BatchNorms were folded (fpn1's into its first transposed convolution)."""

    def gemm(child: nn.Module) -> nn.Module | None:
        if type(child) is not nn.ConvTranspose2d:
            return None
        try:
            return CudaGemmConvTranspose2d(child)
        except ValueError:  # padding, groups, a kernel other than its stride: PyTorch's
            return None

    return replace_children(model.backbone, gemm)

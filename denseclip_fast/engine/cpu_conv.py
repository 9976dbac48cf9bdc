"""The bfloat16 CPU engine's convolutions through oneDNN, with what follows them as post-ops, on weights packed once.

PyTorch runs a CPU convolution with oneDNN (``aten::mkldnn_convolution``) and then the ReLU, and a bottleneck's
residual sum, as passes of their own over the output; it also reorders the weight into oneDNN's blocked layout at
every call. ``torch.ops.mkldnn._convolution_pointwise`` (what torch.compile's CPU backend calls) takes the ReLU as a
post-op, its ``.binary`` form the residual sum and then the ReLU, and both take a weight packed ahead of time
(``torch._C._nn.mkldnn_reorder_conv2d_weight``). In a bfloat16 engine that saves those passes and the reorders: RN50
on 2 CPU threads of a Xeon with AMX, ``predict`` of a 683x512 image in 144 instead of 184 ms
(benchmarks/results/predict_cpu_2threads_amx_conv.md against predict_cpu_2threads_amx_conv_before_092bd8e.md). In
float32 it was no clear gain: the same rewrite of a float32 engine (bench_predict.py run with float32 added to
DTYPES, predict_cpu_2threads_amx_conv_fp32_fused.md against _fp32_plain.md, one after the other) took 573 instead of
644 ms for that image but 475 instead of 458 ms for a normalised 512x512 batch, so a float32 engine keeps PyTorch's
convolutions.

Where the rewrite applies: the image path of the Segmenter's private copy of a model on a CPU in bfloat16. With
the ReLUs (:func:`fuse_convolutions`): the ResNet stem's three convolutions and ReLUs, each bottleneck's (two conv +
ReLU, the last conv with the residual sum and ReLU, the shortcut's conv), the Semantic FPN's conv + ReLU blocks;
every other convolution (the FPN's, the classifier, a ViT's patch embedding) gains the packed weight alone. A ViT
pyramid's 2x2 transposed convolutions become matrix products (:class:`GemmConvTranspose2d`): oneDNN's bfloat16
transposed convolution ran them at a fraction of its convolutions' rate. The
parameters stay the same tensors (the state dict keeps its keys); the packed copy (as large again as the weights) is
made at the first call and again when a weight changes (:meth:`_WeightCache._made_from_weight` says which changes
it sees). For finite values the results are PyTorch's within bfloat16's rounding (bit for bit for a conv + ReLU in the
cases measured; the residual sum is rounded once instead of twice). oneDNN's ReLU turns NaN into 0: an engine that
lets non-finite images through (``check_finite=False``) keeps its ReLUs and sums as PyTorch's, so NaN spreads as in
the model.

The operators are private to PyTorch: they are probed once (present, bfloat16 supported by this CPU's oneDNN, and
equal to ``F.conv2d`` and its post-ops on a small case). A PyTorch without them, a call that needs gradients or that
something records (torch.compile, torch.export, a dispatch mode, torch.jit.trace, torch.func), autocast, oneDNN
switched off (``torch.backends.mkldnn.flags(enabled=False)``), tensors that are not plain CPU bfloat16 ones, and
residual sums oneDNN would not fuse (or, in PyTorch 2.11, fails on: one output pixel) take ``F.conv2d`` and the
post-ops in PyTorch, as the model computes them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DenseCLIP
from ..model.heads import ConvModule
from ..model.resnet import Bottleneck
from .cpu_linear import plain_cpu_call
from .rewrite import folded, relu_sites

# the dtypes whose convolutions are rewritten: where the fused, packed operator was measured faster (module docstring)
DTYPES = (torch.bfloat16,)


def _convolution() -> Any:
    return torch.ops.mkldnn._convolution_pointwise


def _pack(weight: torch.Tensor, conv: OneDNNConv2d, input_size: list[int]) -> torch.Tensor:
    """``weight`` in oneDNN's layout for ``conv``'s convolution of an input of ``input_size`` (an opaque tensor)."""
    reorder: Any = torch._C._nn.mkldnn_reorder_conv2d_weight  # its stub lacks the input size, which it takes
    return reorder(weight.to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups, input_size)


@torch.no_grad()
def _agrees() -> bool:
    """Whether the packed, fused convolutions agree with F.conv2d and their post-ops computed in float32 on a small
    bfloat16 case (a 3x3 convolution with stride 2, odd sizes, channels_last input), within bfloat16's rounding
    (whatever the caller's autocast)."""
    gen = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:  # whatever the default dtype and device
        return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu").to(torch.bfloat16)

    x, weight, bias = draw(1, 5, 9, 11).contiguous(memory_format=torch.channels_last), draw(6, 5, 3, 3), draw(6)
    conv = OneDNNConv2d(nn.Conv2d(5, 6, 3, stride=2, padding=1, device="cpu", dtype=torch.bfloat16), "relu")
    # outside the calling thread's autocast, which made the float32 product bfloat16 and the answer a no, kept for
    # the process (every bfloat16 engine of every thread on PyTorch's convolutions)
    with torch.autocast("cpu", enabled=False):
        product = F.conv2d(x.float(), weight.float(), bias.float(), stride=2, padding=1)
    residual = draw(*product.shape)
    packed = _pack(weight, conv, list(x.shape))
    args = (bias, conv.padding, conv.stride, conv.dilation, 1)
    outs = (_convolution()(x, packed, *args, "relu", [], ""),
            _convolution().binary(x, residual, packed, *args, "add", None, "relu", [], ""))  # fmt: skip
    expected = (torch.relu(product), torch.relu(product + residual))
    return all(
        out.shape == want.shape and torch.allclose(out.float(), want, rtol=2**-7, atol=1e-2)
        for out, want in zip(outs, expected)
    )


@functools.cache
def onednn_conv_usable() -> bool:
    """Whether this PyTorch has oneDNN's fused convolution and weight packing, this CPU's oneDNN computes bfloat16,
    and the fused convolutions agree with F.conv2d and their post-ops on a small case (probed once)."""
    try:
        return (
            torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and _agrees()
        )
    except Exception:  # an operator missing, renamed or with another signature: PyTorch's convolutions stay
        return False


def _plain_call(x: torch.Tensor, in_channels: int, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a call of ``x`` with ``weight`` and ``others`` (bias, residual: None where there is none) may take a
    rewritten path: cpu_linear.plain_cpu_call (oneDNN switched on, no gradient, nothing recording the call, no
    autocast, plain CPU tensors of the weight's dtype), that dtype one of DTYPES, and ``x`` a non-empty 4-D batch of
    ``in_channels`` channels (else PyTorch's error message or empty result)."""
    if weight.dtype not in DTYPES or not plain_cpu_call(weight.dtype, x, weight, *others):
        return False
    return x.dim() == 4 and x.shape[1] == in_channels and x.numel() > 0


class _WeightCache(nn.Module):
    """A module that computes with a tensor made from its ``weight`` (oneDNN's packed copy, a reordered matrix),
    kept between calls and made again when the weight changes (:meth:`_made_from_weight` says which changes it
    sees). The kept tensor is left out of pickles and copies (an opaque oneDNN tensor does neither): a copy makes its
    own at its first call."""

    weight: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        # (the tensor made, the weight it was made from, a view of that weight's data, the weight's version)
        self._made: tuple[Any, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_made"] = None
        return state

    def _made_from_weight(self, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``make(weight)``, kept, and made again when the weight is another tensor or its data another storage or
        dtype (``weight.data = ...``, ``module.to(...)``: the cache holds the storage it was made from, so a new
        one cannot take its address), or it was changed in place through autograd's view of it (``copy_``,
        ``load_state_dict``: its version counter). An in-place change through ``weight.data`` bumps no counter,
        and an inference tensor keeps none: those are not seen."""
        weight = self.weight
        version = None if weight.is_inference() else weight._version
        made = self._made
        if (
            made is None
            or made[1] is not weight
            or made[2].data_ptr() != weight.data_ptr()
            or made[2].dtype != weight.dtype
            or made[3] != version
        ):
            data = weight.detach()
            made = (make(data), weight, data, version)
            self._made = made
        return made[0]


class OneDNNConv2d(_WeightCache):
    """An ``nn.Conv2d``'s parameters (the same tensors) computed with oneDNN's fused convolution on a packed copy of
    the weight, followed by ``post_op`` ("none" or "relu"); ``forward(x, residual)`` adds ``residual`` (the output's
    shape) before the post-op. Where oneDNN is not taken (module docstring), F.conv2d and the same steps in PyTorch."""

    def __init__(self, conv: nn.Conv2d, post_op: str = "none") -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"OneDNNConv2d takes an nn.Conv2d with numeric zero padding, got {conv!r}")
        if post_op not in ("none", "relu"):
            raise ValueError(f"post_op must be 'none' or 'relu', got {post_op!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.padding = list(conv.padding)
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self.post_op = post_op

    def _output_size(self, x: torch.Tensor) -> tuple[int, ...]:
        sides = (
            (side + 2 * pad - dil * (kernel - 1) - 1) // step + 1
            for side, pad, dil, kernel, step in zip(
                x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        )
        return (x.shape[0], self.out_channels, *sides)

    def _takes_onednn(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if not _plain_call(x, self.in_channels, self.weight, self.bias, residual):
            return False
        out_size = self._output_size(x)
        if min(out_size[2:]) < 1:
            return False  # F.conv2d's message on an input smaller than the kernel
        if residual is not None:
            if tuple(residual.shape) != out_size:
                return False  # PyTorch's broadcasting, or its error message
            # the only residual sums oneDNN fuses; in other cases the operator sums with ATen's add_relu, which
            # fails for bfloat16
            if self.groups != 1 or not x.is_contiguous(memory_format=torch.channels_last):
                return False
            if out_size[2] * out_size[3] == 1:  # one pixel, whose layouts coincide: PyTorch 2.11's operator
                return False  # fails ("could not create a memory"; 2.14's does not), e.g. a 32x32 image's layer4
        return onednn_conv_usable()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self._takes_onednn(x, residual):
            out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            if residual is not None:
                out = out + residual
            return torch.relu(out) if self.post_op == "relu" else out
        packed = self._made_from_weight(lambda weight: _pack(weight, self, list(x.shape)))
        args = (self.bias, self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            return _convolution()(x, packed, *args, self.post_op, [], "")
        unary = None if self.post_op == "none" else self.post_op
        return _convolution().binary(x, residual, packed, *args, "add", None, unary, [], "")

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, bias={self.bias is not None}, post_op={self.post_op}"
        )


class GemmConvTranspose2d(_WeightCache):
    """An ``nn.ConvTranspose2d`` whose kernel equals its stride (no padding, dilation or groups: a ViT pyramid's 2x2
    upsampling), over the same parameters, as matrix products. Its kernels do not overlap: the (kh, kw) block of the
    output at each input pixel is that pixel's C channels times the weight, so the output is (pixels, C) @ (C, kh *
    kw * O) (the weight reordered once, kept as :class:`_WeightCache` says), written into a channels_last output a
    band of input rows at a time (``PIXELS`` pixels a product: the band is still in cache when it is copied into its
    place). Taken for a channels_last bfloat16 input under the conditions of the module docstring; otherwise
    ``F.conv_transpose2d`` as the module computes it. The same sums as oneDNN's transposed convolution, accumulated
    in float32 and rounded once (within an ulp of bfloat16 of it: the products' blocking differs)."""

    PIXELS = 1024

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        kernel = tuple(conv.kernel_size)
        plain = (
            type(conv) is nn.ConvTranspose2d
            and tuple(conv.stride) == kernel
            and not any(conv.padding)
            and not any(conv.output_padding)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
        )
        if not plain:
            raise ValueError(
                "GemmConvTranspose2d takes an nn.ConvTranspose2d whose stride is its kernel size, without padding, "
                f"output padding, dilation or groups, got {conv!r}"
            )
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, kernel
        self.weight = conv.weight  # (C, O, kh, kw)
        self.bias = conv.bias

    @staticmethod
    def _matrix(weight: torch.Tensor) -> torch.Tensor:
        """(C, O, kh, kw) -> (C, kh * kw * O), the columns in the output's order (row in block, column, channel)."""
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        takes = _plain_call(x, self.in_channels, self.weight, self.bias)
        if not (takes and x.is_contiguous(memory_format=torch.channels_last)):
            return F.conv_transpose2d(x, self.weight, self.bias, self.kernel_size)
        matrix = self._made_from_weight(self._matrix)
        (kh, kw), (n, c, h, w), o = self.kernel_size, x.shape, self.out_channels
        bias = None if self.bias is None else self.bias.repeat(kh * kw)
        out = torch.empty((n, o, kh * h, kw * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        # out[b, o, kh i + a, kw j + d] = rows[b, i, a, j, d * O + o] = product[b, i, j, (a, d, o)]
        rows = out.permute(0, 2, 3, 1).view(n, h, kh, w, kw * o)
        pixels = x.permute(0, 2, 3, 1)  # (n, h, w, c), contiguous
        band = max(1, self.PIXELS // w)
        for b in range(n):
            for i in range(0, h, band):
                part = pixels[b, i : i + band].reshape(-1, c)
                product = torch.mm(part, matrix) if bias is None else torch.addmm(bias, part, matrix)
                rows[b, i : i + band].copy_(product.view(-1, w, kh, kw * o).transpose(1, 2))
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.kernel_size}"


class OneDNNBottleneck(nn.Module):
    """A ResNet :class:`Bottleneck` whose BatchNorms are folded, over the same modules (the state dict keeps its
    keys), with its convolutions as :class:`OneDNNConv2d`: conv1 and conv2 with their ReLUs, conv3 with the residual
    sum and the ReLU, the shortcut's conv without a post-op."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        if not folded(block.bn1, block.bn2, block.bn3):
            raise ValueError("OneDNNBottleneck takes a Bottleneck whose BatchNorms are folded (engine.rewrite)")
        self.conv1, self.bn1 = OneDNNConv2d(block.conv1, "relu"), block.bn1
        self.conv2, self.bn2 = OneDNNConv2d(block.conv2, "relu"), block.bn2
        self.avgpool = block.avgpool
        self.conv3, self.bn3 = OneDNNConv2d(block.conv3, "relu"), block.bn3
        self.downsample = block.downsample
        if self.downsample is not None:
            _convolutions_of(self.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(out, identity)


def _convolutions_of(module: nn.Module) -> int:
    """Each plain ``nn.Conv2d`` child of ``module`` (not below it) as a :class:`OneDNNConv2d` without a post-op, and
    each ``nn.ConvTranspose2d`` child whose kernel is its stride as a :class:`GemmConvTranspose2d`: the children
    their constructors take (another kind stays PyTorch's)."""
    count = 0
    for name, child in list(module.named_children()):
        rewrite = {nn.Conv2d: OneDNNConv2d, nn.ConvTranspose2d: GemmConvTranspose2d}.get(type(child))
        if rewrite is not None:
            with contextlib.suppress(ValueError):
                setattr(module, name, rewrite(child))
                count += 1
    return count


def fuse_convolutions(model: DenseCLIP, relu: bool = True) -> int:
    """Rewrite ``model``'s image-path convolutions in place as :class:`OneDNNConv2d` (module docstring) on packed
    weights, and its transposed convolutions whose kernel is their stride as :class:`GemmConvTranspose2d`; with
    ``relu``, the ReLU after them (the ResNet stem's, the bottlenecks', the Semantic FPN's conv + ReLU
    blocks) and a bottleneck's residual sum become their post-ops. oneDNN's ReLU turns NaN into 0 where PyTorch's
    keeps it: ``relu=False`` (the Segmenter's ``check_finite=False``, which lets non-finite images through) keeps
    the ReLUs and sums as passes of their own, so that NaN spreads as in the model. For the Segmenter's private copy
    on a CPU, after the BatchNorms were folded (engine.rewrite.fold_batchnorm; a block whose BatchNorm is still
    there keeps its ReLUs), and only when the image path computes in a dtype of DTYPES and oneDNN's operators are
    usable here. Returns how many convolutions were rewritten (a second call: none)."""
    image_dtype = model.gamma.dtype
    if image_dtype not in DTYPES or not onednn_conv_usable():
        return 0

    def image_path() -> list[nn.Module]:
        return [m for name, m in model.named_modules() if not name.startswith("text_encoder")]

    count = 0
    for kind, parent, child_name in relu_sites(model) if relu else iter(()):
        if kind == "stem":
            for name in ("conv1", "conv2", "conv3"):
                setattr(parent, name, OneDNNConv2d(getattr(parent, name), "relu"))
            setattr(parent, "relu", nn.Identity())  # the stem's only: the bottlenecks have their own
            count += 3
        elif kind == "block":
            block = getattr(parent, child_name)
            setattr(parent, child_name, OneDNNBottleneck(block))
            count += 3 + (block.downsample is not None)
        elif isinstance(parent, ConvModule):
            fused = type(parent.act) is nn.ReLU
            setattr(parent, "conv", OneDNNConv2d(parent.conv, "relu" if fused else "none"))
            if fused:
                parent.act = None
            count += 1
    for parent in image_path():  # the modules now in the model: the other convolutions, without a post-op
        count += _convolutions_of(parent)
    return count

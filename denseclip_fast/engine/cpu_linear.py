"""The CPU engine's linear layers through oneDNN instead of the BLAS GEMM.

PyTorch computes a float32 ``nn.Linear`` on a CPU with its BLAS (MKL in the official wheels); oneDNN, which PyTorch
also ships (``torch.ops.mkldnn._linear_pointwise``, the operator torch.compile's CPU backend calls), was faster on
the AMD CPU measured and takes the plain float32 weight, so no second copy is kept (not measured on an Intel CPU,
where MKL is at its best). The ViT-B/16 image encoder is mostly such GEMMs: on 2 threads of an AMD EPYC (AVX-512)
the engine's ViT-B/16 forward at 512x512 went from 1662 to 1222 ms, eager PyTorch 1638 / 1652 ms in the same runs
(benchmarks/results/export_cpu_2threads_512_b1_before_cfbcab5.md, export_cpu_2threads_512_b1.md); RN50, whose
linear layers are few, stayed within that shared machine's noise. Same float32 arithmetic, another summation order
(about 1e-6 relative).

The operator is private to PyTorch: it is probed once (present, and equal to F.linear on a small case), and a
PyTorch without it, a tensor that is not a plain CPU float32 tensor (a traced one: torch.compile, torch.export), or
a call that needs gradients takes F.linear as before. Only the Segmenter's own copy of the model is rewritten (its
image path; the text encoder runs once per vocabulary), never the exporters' graphs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DenseCLIP
from ..model.layers import MultiheadSelfAttention


@functools.cache
def onednn_linear_usable() -> bool:
    """Whether this PyTorch has oneDNN's linear operator and it agrees with F.linear (probed once)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) for shape in ((3, 5), (4, 5), (4,)))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(y.shape == (3, 4) and torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-6))
    except Exception:  # an operator missing, renamed or with another signature: the BLAS path stays
        return False


def _plain_cpu_float32(t: torch.Tensor | None) -> bool:
    # type(...) is torch.Tensor: not a traced (fake, functional) tensor nor a subclass with its own dispatch
    plain = type(t) in (torch.Tensor, nn.Parameter)
    return t is None or (plain and t.device.type == "cpu" and t.dtype == torch.float32)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x (..., in), weight (out, in), bias (out,)), through oneDNN for plain CPU
    float32 tensors that need no gradient; F.linear otherwise."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if (
        needs_grad
        or x.dim() < 2
        or x.numel() == 0
        or not all(_plain_cpu_float32(t) for t in (x, weight, bias))
        or torch.compiler.is_compiling()
        or not onednn_linear_usable()
    ):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class OneDNNLinear(nn.Module):
    """An ``nn.Linear``'s parameters (the same tensors: nothing is copied, the state dict keeps its keys) computed
    with :func:`onednn_linear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_onednn_linears(model: DenseCLIP) -> int:
    """Compute the linear layers of ``model``'s image path (everything but the text encoder) with oneDNN, in place:
    each ``nn.Linear`` becomes a :class:`OneDNNLinear` over the same parameters and each self-attention's
    in-projection calls :func:`onednn_linear`. Returns how many were rewritten (a second call: none); 0 when
    oneDNN's operator is not usable here (the model is then left as it was)."""
    if not onednn_linear_usable():
        return 0
    text = set(model.text_encoder.modules())
    rewritten = 0
    for module in [m for m in model.modules() if m not in text]:
        if isinstance(module, MultiheadSelfAttention) and module.linear is not onednn_linear:
            module.linear = onednn_linear
            rewritten += 1
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, OneDNNLinear(child))
                rewritten += 1
    return rewritten

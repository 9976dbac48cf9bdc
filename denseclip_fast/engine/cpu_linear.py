"""The CPU engine's linear layers through oneDNN instead of the BLAS GEMM.

PyTorch computes a float32 ``nn.Linear`` on a CPU with its BLAS (MKL in the official wheels). oneDNN, which PyTorch
also ships (``torch.ops.mkldnn._linear_pointwise``, which torch.compile's CPU backend calls in some cases), was the
faster of the two on the AMD CPU measured, and takes the plain float32 weight, so no second copy is kept (on an
Intel Xeon, where MKL is at its best, neither was faster beyond that VM's noise:
results/cpu_linear_cpu_2threads_xeon_512.md). The ViT-B/16 image encoder is mostly such GEMMs: on 2 threads of
an AMD EPYC (AVX-512) the engine's ViT-B/16 forward at 512x512 went from 1662 to 1222 ms, eager PyTorch 1638 / 1652
ms in the same runs (benchmarks/results/export_cpu_2threads_512_b1_before_59e7a9a.md, export_cpu_2threads_512_b1.md);
RN50, whose linear layers are few, stayed within that shared machine's noise. The text encoder (run for each
vocabulary) is such GEMMs too: benchmarks/bench_cpu_linear.py times both libraries in one process, taking turns
(results/cpu_linear_cpu_2threads_512.md and cpu_linear_cpu_smoke.md: set_classes with 150 names in 0.59-0.71x the
time, ViT-B/16 logits in 0.66-0.71x, RN50 logits in 0.91-0.96x). Same float32 arithmetic, another summation order
(about 1e-6 relative).

A bfloat16 ``nn.Linear`` already runs on oneDNN's matrix product through F.linear; the gain of this operator there
is its post-op, which takes a CLIP MLP's QuickGELU (:func:`fuse_quick_gelu`) into the first layer's output pass.

The operator is private to PyTorch: it is probed once (present, and equal to F.linear on a small case; for bfloat16,
this CPU's oneDNN computes it and agrees with float32 sums within bfloat16's rounding). A PyTorch without it, a
tensor that is not a plain CPU float32 tensor (or bfloat16 where that probe fails), mixed dtypes, autocast, a bias
F.linear would broadcast, a call that needs gradients or that something records (torch.compile, torch.export, a
dispatch mode such as FlopCounterMode, torch.jit.trace, torch.func), or oneDNN switched off
(``torch.backends.mkldnn.flags(enabled=False)``) takes F.linear as before. Only the Segmenter's own copy of the model
is rewritten, on a CPU (its image path in the engine's dtype and its text encoder, float32 in any engine; it runs at
construction and for each new vocabulary). An exported graph never holds oneDNN's operator: ``to_aoti`` traces the
Segmenter's model, and so records F.linear and, in a fused MLP, the scaled weights and F.silu (the same function);
the ONNX and TensorRT exporters prepare a copy of their own without the rewrite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import MultiheadSelfAttention, plain_tensors
from .rewrite import fold_quick_gelus


def _operator() -> Any:
    return torch.ops.mkldnn._linear_pointwise


# oneDNN's post-ops the engine uses, each with what computes it after F.linear where oneDNN is not taken
POST_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"none": lambda y: y, "swish": F.silu}


def _agrees(post_op: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's linear with ``post_op`` on ``dtype`` tensors equals F.linear and POST_OPS[post_op] computed
    in float32 on a small case (CPU tensors whatever the default dtype and device, and the caller's autocast),
    within ``dtype``'s rounding;
    raises what a missing or changed operator raises."""
    x, w, b = (torch.linspace(-3, 3, n, dtype=torch.float32, device="cpu").to(dtype) for n in (15, 20, 4))
    x, w = x.view(3, 5), w.view(4, 5)
    y = _operator()(x, w, b, post_op, [], "")
    # outside the calling thread's autocast: under a CPU autocast region F.linear gives bfloat16, and the answer, a
    # no, was kept for the process (a Segmenter built there took F.linear in every engine of every thread)
    with torch.autocast("cpu", enabled=False):
        expected = POST_OPS[post_op](F.linear(x.float(), w.float(), b.float()))
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2**-7, 1e-2)
    return bool(y.shape == (3, 4) and y.dtype == dtype and torch.allclose(y.float(), expected, rtol=rtol, atol=atol))


@functools.cache
def onednn_linear_usable() -> bool:
    """Whether this PyTorch has oneDNN's linear operator and it agrees with F.linear on a small case (probed once)."""
    try:
        return torch.backends.mkldnn.is_available() and _agrees("none")
    except Exception:  # an operator missing, renamed or with another signature: the BLAS path stays
        return False


@functools.cache
def onednn_swish_usable() -> bool:
    """Whether oneDNN's linear operator also takes the "swish" post-op (SiLU) and agrees with F.silu(F.linear) on a
    small case (probed once)."""
    try:
        return onednn_linear_usable() and _agrees("swish")
    except Exception:  # no such post-op in this PyTorch's oneDNN binding
        return False


@functools.cache
def onednn_bfloat16_usable() -> bool:
    """Whether oneDNN's linear operator also computes bfloat16 on this CPU, with and without the "swish" post-op,
    and agrees with F.linear (and F.silu) computed in float32 on a small case within bfloat16's rounding (probed
    once)."""
    try:
        return (
            onednn_swish_usable()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and all(_agrees(post_op, torch.bfloat16) for post_op in POST_OPS)
        )
    except Exception:  # no bfloat16 in this PyTorch's oneDNN binding
        return False


def _usable(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear is taken for ``dtype`` tensors: float32, and bfloat16 where this CPU computes it."""
    if dtype == torch.float32:
        return onednn_linear_usable()
    return dtype == torch.bfloat16 and onednn_bfloat16_usable()


def plain_cpu_call(dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` (None where there is none) may take one of oneDNN's private operators instead of
    PyTorch's own (here and in cpu_conv.py): oneDNN switched on (``torch.backends.mkldnn.flags``), no autocast
    (PyTorch's operator would choose the dtype), and layers.plain_tensors: no gradient needed, nothing recording the
    call, every tensor a plain CPU one of ``dtype``."""
    if not torch.backends.mkldnn.enabled or torch.is_autocast_enabled("cpu"):
        return False
    return plain_tensors(dtype, ("cpu",), *tensors)


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not plain_cpu_call(weight.dtype, x, weight, bias):
        return False
    shapes_fit = x.dim() >= 2 and x.numel() > 0 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
    if not shapes_fit or not (bias is None or (bias.shape == weight.shape[:1] and bias.is_contiguous())):
        return False  # F.linear's broadcasting, or its error message
    return _usable(weight.dtype)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x (..., in), weight (out, in), bias (out,)), through oneDNN for plain CPU
    float32 tensors, or bfloat16 ones where this CPU computes them, that need no gradient, nothing recording the call,
    no autocast, and oneDNN enabled (``torch.backends.mkldnn.flags(enabled=False)`` turns it off); F.linear
    otherwise."""
    return _linear(x, weight, bias, "none")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str) -> torch.Tensor:
    """:func:`onednn_linear` followed by ``post_op`` (POST_OPS: "none", or "swish", SiLU): oneDNN's post-op, or
    POST_OPS[post_op] after F.linear where oneDNN is not taken."""
    if not _takes_onednn(x, weight, bias):
        return POST_OPS[post_op](F.linear(x, weight, bias))
    return _operator()(x.contiguous(), weight, bias, post_op, [], "")


class OneDNNLinear(nn.Module):
    """An ``nn.Linear``'s parameters (the same tensors: nothing is copied, the state dict keeps its keys) computed
    with :func:`onednn_linear`, followed by ``post_op`` ("none"; fuse_quick_gelu sets "swish")."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.post_op = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias, self.post_op)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return text if self.post_op == "none" else f"{text}, post_op={self.post_op}"


# the dtypes whose layers use_onednn_linears rewrites (bfloat16 ones take oneDNN where the CPU computes it)
DTYPES = (torch.float32, torch.bfloat16)


def use_onednn_linears(model: nn.Module) -> int:
    """Compute the float32 and bfloat16 linear layers of ``model`` with oneDNN, in place: each such ``nn.Linear``
    becomes a :class:`OneDNNLinear` over the same parameters and each such self-attention's in-projection calls
    :func:`onednn_linear`. The Segmenter calls it on its float32 copy before the image path is cast (then
    :func:`fuse_quick_gelu`); the layers keep taking oneDNN after a cast to bfloat16, where this CPU computes it
    (``onednn_bfloat16_usable``; F.linear otherwise). Returns how many were rewritten (a second call: none); 0 when
    oneDNN's operator is not usable here (the model is then left as it was)."""
    if not onednn_linear_usable():
        return 0
    rewritten = 0
    for module in list(model.modules()):
        if isinstance(module, MultiheadSelfAttention) and module.linear is not onednn_linear:
            if module.in_proj_weight.dtype in DTYPES:
                module.linear = onednn_linear
                rewritten += 1
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in DTYPES:
                setattr(module, name, OneDNNLinear(child))
                rewritten += 1
    return rewritten


@torch.no_grad()
def fuse_quick_gelu(model: nn.Module) -> int:
    """Each CLIP MLP of ``model`` whose layers run through oneDNN (:func:`use_onednn_linears`) with QuickGELU
    between them and float32 weights, rewritten in place as c_fc' = 1.702 c_fc with oneDNN's SiLU post-op ("swish";
    F.silu where the call does not take oneDNN: gradients, tracing), and c_proj' = c_proj / 1.702
    (QuickGELU(y) = SiLU(1.702 y) / 1.702, the division folded into c_proj's weight): one pass over the 4x-wide
    activations instead of three (the sigmoid, two products). The same function: the scaled weights are rounded
    once (about 1e-7 relative; a bfloat16 engine casts them afterwards, so they are rounded to bfloat16 once too).
    For the Segmenter's private copy only: its parameters change, so weights loaded into it afterwards
    (``load_state_dict``) would have to be scaled alike; build a new Segmenter from the model instead. ViT-B/16
    logits on 2 CPU threads: float32 in 0.90x the time at 854x640, 0.98x at 512x512
    (benchmarks/results/predict_vit_cpu_2threads_amx_fp32.md against its _before_23a465b); bfloat16: see README.
    Returns how many MLPs were rewritten; none where oneDNN's swish post-op is not usable."""
    if not onednn_swish_usable():
        return 0
    folded = fold_quick_gelus(model, OneDNNLinear, nn.Identity)  # the SiLU is c_fc's post-op
    for c_fc in folded:
        c_fc.post_op = "swish"
    return len(folded)


def rewrite_linears(model: nn.Module) -> tuple[int, int]:
    """:func:`use_onednn_linears`, then :func:`fuse_quick_gelu`: what the CPU engine does to its float32 copy of a
    model before it casts the image path. Returns both counts."""
    return use_onednn_linears(model), fuse_quick_gelu(model)

"""A CUDA engine's context decoder with each residual sum and the LayerNorm after it in one Triton pass
(ops/triton/layer_norm.py).

The decoder's layers are pre-norm (model/decoder.py): every residual sum but the first layer's self-attention's
(which the vocabulary's DecoderPrefix holds) is followed by a LayerNorm, the next block's or out_proj's: 8 of them in
the official 3-layer decoder, 8 launches fewer per image batch and one read of each sum fewer. :class:`NormsDecoder`
is the decoder over the same modules whose ``decode`` takes that route; where the kernel does not apply (no Triton,
``DENSECLIP_FAST_TRITON_ADD_LN=0``, autocast on, something recording the call, gradient mode on, a tensor not a
plain CUDA one) it is the model's ``decode``. The sums are ATen's, the LayerNorms within float32 rounding of
ATen's (the kernel's docstring).

Where: a Segmenter on a GPU swaps its private model's ContextDecoder (:func:`swap_decoder`). Not yet timed on a GPU:
benchmarks/bench_e2e.py's ``engine-bf16-aten-add-ln`` contestant is the engine with it off.
"""

from __future__ import annotations

import os
import typing
from typing import Any

import torch
from torch import nn

from ..model.decoder import ContextDecoder, DecoderLayer, DecoderPrefix
from ..model.layers import plain_tensors
from ..ops import backends

DEVICE_TYPES = ("cuda",)  # where the kernel runs (tests add "cpu": Triton's interpreter)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels() -> Any:
    from ..ops.triton import layer_norm

    return layer_norm


def enabled() -> bool:
    """Triton importable and the kernel not switched off (``DENSECLIP_FAST_TRITON_ADD_LN=0``, read at each call:
    a captured CUDA graph keeps what was read at its capture)."""
    return os.environ.get("DENSECLIP_FAST_TRITON_ADD_LN", "1") != "0" and backends.triton_available() is None


def usable(x: torch.Tensor) -> bool:
    """Whether a decode of ``x`` may take the kernel (module docstring): no gradient recorded at all (the kernel has
    no backward, and the decoder's weights or the prefix may want one), a plain tensor of a float dtype on CUDA, no
    autocast, the kernel on; a CPU tensor is refused before anything imports Triton."""
    return (not torch.is_grad_enabled() and x.dtype in DTYPES and plain_tensors(x.dtype, DEVICE_TYPES, x)
            and not torch.is_autocast_enabled(x.device.type) and enabled())  # fmt: skip


def add_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) in one pass where the kernel takes them (x of y's dtype, batch 1 or y's, a LayerNorm
    over y's last dim with a weight and a bias), else as the model computes them."""
    weight, bias = norm.weight, norm.bias
    if (weight is not None and bias is not None and tuple(norm.normalized_shape) == (y.shape[-1],)
            and _kernels().problem(x, y, weight, bias) is None):  # fmt: skip
        total, out = _kernels().add_layer_norm(x, y, weight, bias, norm.eps)
        return total, out
    total = x + y
    return total, norm(total)


class NormsDecoder(ContextDecoder):
    """A ContextDecoder over ``decoder``'s own modules whose :meth:`decode` sums each residual and takes the next
    LayerNorm in one pass where :func:`usable` (module docstring)."""

    def __init__(self, decoder: ContextDecoder) -> None:
        nn.Module.__init__(self)  # not ContextDecoder's: the modules are decoder's own
        self.memory_proj, self.text_proj = decoder.memory_proj, decoder.text_proj
        self.decoder, self.out_proj = decoder.decoder, decoder.out_proj

    def decode(self, prefix: DecoderPrefix, visual: torch.Tensor) -> torch.Tensor:
        if not usable(visual):
            return super().decode(prefix, visual)
        memory = self.memory_proj(visual)
        layers = [typing.cast(DecoderLayer, layer) for layer in self.decoder]
        following = [layer.norm1 for layer in layers[1:]] + [typing.cast(nn.LayerNorm, self.out_proj[0])]
        x, h = add_norm(prefix.x, layers[0].cross_attn.attend(prefix.q, memory), layers[0].norm3)
        for i, (layer, norm) in enumerate(zip(layers, following)):
            if i > 0:
                x, h = add_norm(x, layer.self_attn(h, h), layer.norm2)
                x, h = add_norm(x, layer.cross_attn(h, memory), layer.norm3)
            x, h = add_norm(x, layer.dropout(layer.mlp(h)), norm)
        return typing.cast(torch.Tensor, self.out_proj[1](h))


def swap_decoder(model: nn.Module) -> int:
    """Replace ``model``'s ContextDecoder modules by NormsDecoders over the same modules, in place; returns how many
    (a second call: none)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ContextDecoder:
                setattr(parent, name, NormsDecoder(child))
                count += 1
    return count

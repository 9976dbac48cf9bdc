"""A GPU engine's attention projections in fewer GEMMs: the q, k and v weights of each attention stacked into one
(3C, C) matrix, so that an attention over one sequence projects it in one GEMM and a cross-attention in two.

Where: the context decoder's attentions (per layer a self-attention, whose q, k and v all project the class
queries: 3 GEMMs -> 1, and a cross-attention, whose k and v both project the visual memory: 2 -> 1) and the ResNet's
dense attention pool (q, k and v of the same tokens, with biases: 3 -> 1), in a Segmenter's private copy of a model
on a GPU. At RN50 batch 1 these GEMMs are small (150 or 257 tokens; the decoder's width 256): launches that each
leave most of the H200 idle, 11 of the engine's ~200 (benchmarks/results/h200_2026-12-04c/e2e_rn50_whole.md's
profile: q/k/v as separate GEMMs). The outputs are the same linear maps (each output column the same weights and
inputs; a GEMM of other width may add in another order: float32 rounding); q, k and v are strided views of the one
output, which the Triton attention reads as they are (ops.context_attention: any strides with a unit last one).

``DENSECLIP_FAST_FUSED_QKV=0`` keeps the separate projections (read when the Segmenter is built). Not yet run on a
GPU: its speed is for benchmarks/bench_e2e.py's ``engine-bf16-separate-qkv`` contestant to show.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..model.decoder import Attention
from ..model.layers import split_heads
from ..model.resnet import DenseAttentionPool


def _stacked(*layers: nn.Linear) -> tuple[nn.Parameter, nn.Parameter | None]:
    weights: list[torch.Tensor] = [layer.weight for layer in layers]
    weight = nn.Parameter(torch.cat(weights), requires_grad=False)
    if all(layer.bias is None for layer in layers):
        return weight, None
    biases: list[torch.Tensor] = [layer.bias if layer.bias is not None else torch.zeros_like(layer.weight[:, 0])
                                  for layer in layers]  # fmt: skip
    return weight, nn.Parameter(torch.cat(biases), requires_grad=False)


class FusedAttention(Attention):
    """decoder.Attention with q_proj, k_proj and v_proj stacked in ``qkv_weight`` (3C, C): ``forward(q, kv)`` with
    q and kv the same tensor (self-attention) in one GEMM, else q's and kv's (the stack's last 2C rows) in two
    (:meth:`queries`, :meth:`keys_values`: a DecoderPrefix's queries are the stack's first C rows' too)."""

    def __init__(self, attention: Attention) -> None:
        nn.Module.__init__(self)  # not Attention's: the projections are the stack below
        self.heads = attention.heads
        self.qkv_weight, _ = _stacked(attention.q_proj, attention.k_proj, attention.v_proj)
        self.proj = attention.proj
        self.proj_drop = attention.proj_drop

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        if q is not kv:
            return self.attend(self.queries(q), kv)
        q, k, v = split_heads(F.linear(q, self.qkv_weight), self.heads, 3)
        return self.merge(ops.context_attention(q, k, v))

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv_weight[: x.shape[-1]])

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = split_heads(F.linear(kv, self.qkv_weight[kv.shape[-1] :]), self.heads, 2)
        return k, v


class FusedAttentionPool(DenseAttentionPool):
    """DenseAttentionPool with its q, k and v projections (and biases) stacked: one GEMM for the three."""

    def __init__(self, pool: DenseAttentionPool) -> None:
        nn.Module.__init__(self)
        self.grid, self.heads = pool.grid, pool.heads
        self.positional_embedding = pool.positional_embedding
        self.qkv_weight, self.qkv_bias = _stacked(pool.q_proj, pool.k_proj, pool.v_proj)
        self.c_proj = pool.c_proj

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_heads(F.linear(tokens, self.qkv_weight, self.qkv_bias), self.heads, 3)
        return q, k, v


def enabled() -> bool:
    return os.environ.get("DENSECLIP_FAST_FUSED_QKV", "1") != "0"


def fuse_attention_projections(model: nn.Module) -> int:
    """Replace ``model``'s decoder attentions and ResNet attention pool by the stacked ones above, in place (weights
    copied into the stacks; the model's other parameters untouched); returns how many were replaced. For an
    inference copy: the stacks take no gradient."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Attention:
                setattr(module, name, FusedAttention(child))
            elif type(child) is DenseAttentionPool:
                setattr(module, name, FusedAttentionPool(child))
            else:
                continue
            replaced += 1
    return replaced

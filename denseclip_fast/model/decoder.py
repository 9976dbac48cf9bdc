"""The context decoder (DenseCLIP's post-model prompting, official ``ContextDecoder``).

Queries are the K class embeddings, memory is the visual context [g; z] as (B, 1 + hw, D).
memory_proj = LN(D), Linear(D, W), LN(W); text_proj = LN(D), Linear(D, W); then ``layers`` pre-norm decoder layers

    x += SelfAttn(LN1(x));  x += CrossAttn(LN2(x), memory);  x += MLP(LN3(x))

(q/k/v Linear without bias, output Linear with bias, scale head_dim^-0.5; MLP W-4W-W with exact GELU; dropout in
training), and out_proj = LN(W), Linear(W, D). The model adds ``gamma * decoder(text, visual)`` to the text.
Both attentions run through ``ops.context_attention`` (flash-style, no K x N score matrix).

Its start does not depend on the image: text_proj, the first layer's self-attention block (the class queries
attend to each other) and its cross-attention's query projection see the class embeddings alone.
:meth:`ContextDecoder.prefix` computes that once for a vocabulary (:class:`DecoderPrefix`, batch 1) and
:meth:`ContextDecoder.decode` the rest for a batch of images, the prefix broadcast over it: the model does so out of
training (where dropout would draw other masks per image), the engine once per vocabulary.
"""

from __future__ import annotations

import typing
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from ..config import DecoderConfig
from .layers import init_, split_heads


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (no bias) and a biased output projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q: (B, N, C), kv: (B, M, C) -> (B, N, C)."""
        return self.attend(self.queries(q), kv)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """The projected queries (.., N, C) of tokens x (.., N, C), before their split into heads."""
        return self.q_proj(x)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v (B, heads, M, C / heads) of tokens kv (B, M, C)."""
        (k,) = split_heads(self.k_proj(kv), self.heads)
        (v,) = split_heads(self.v_proj(kv), self.heads)
        return k, v

    def attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Projected queries q (B or 1, N, C) (:meth:`queries`; batch 1: the same for every image) attending to
        tokens kv (B, M, C) -> (B, N, C)."""
        (q,) = split_heads(q.expand(kv.shape[0], -1, -1), self.heads)
        return self.merge(ops.context_attention(q, *self.keys_values(kv)))

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """The attention's output heads (B, heads, N, C / heads) -> the output projection's (B, N, C)."""
        b, _, n, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


class DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(width, heads, dropout)
        self.cross_attn = Attention(width, heads, dropout)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, width * 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(width * 4, width)
        )

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.finish(*self.start(x), memory)

    def start(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the layer computes from its input x (B, K, W) alone: x after the self-attention block, and the
        cross-attention's projected queries."""
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        return x, self.cross_attn.queries(self.norm2(x))

    def finish(self, x: torch.Tensor, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The rest, from :meth:`start`'s x and q (batch B, or 1 for every image) and the memory (B, M, W)."""
        x = x + self.cross_attn.attend(q, memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class DecoderPrefix(NamedTuple):
    """The image-independent start of the decoder for one vocabulary (:meth:`ContextDecoder.prefix`), batch 1: the
    first layer's x after its self-attention block and its cross-attention's projected queries, each (1, K, W)."""

    x: torch.Tensor
    q: torch.Tensor


class ContextDecoder(nn.Module):
    """``forward(text (B, K, D), visual (B, N, D)) -> (B, K, D)``, the update that ``gamma`` scales."""

    def __init__(self, cfg: DecoderConfig, visual_dim: int) -> None:
        super().__init__()
        w = cfg.width
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, w), nn.LayerNorm(w))
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, w))
        self.decoder = nn.ModuleList([DecoderLayer(w, cfg.heads, cfg.dropout) for _ in range(cfg.layers)])
        self.out_proj = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, visual_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            init_(nn.init.trunc_normal_, m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)

    def _first_layer(self) -> DecoderLayer:
        return typing.cast(DecoderLayer, self.decoder[0])

    def _visual_dim(self) -> int:
        """D, the width of the class embeddings and visual tokens (text_proj's LayerNorm's)."""
        return int(typing.cast(nn.LayerNorm, self.text_proj[0]).normalized_shape[0])

    def prefix(self, text: torch.Tensor) -> DecoderPrefix:
        """The start of ``forward`` that sees only the class embeddings ``text`` (K, D): once for a vocabulary
        (DecoderConfig has at least one layer)."""
        if text.dim() != 2 or text.shape[1] != self._visual_dim():
            raise ValueError(f"text must be (K, {self._visual_dim()}) class embeddings, got shape {tuple(text.shape)}")
        return DecoderPrefix(*self._first_layer().start(self.text_proj(text.unsqueeze(0))))

    def decode(self, prefix: DecoderPrefix, visual: torch.Tensor) -> torch.Tensor:
        """``forward(text, visual)`` (B, K, D) for every image of ``visual`` (B, N, D), from the text's
        :meth:`prefix`; the same values where dropout draws nothing (evaluation), within rounding (the prefix's
        GEMMs run at batch 1)."""
        if visual.dim() != 3 or visual.shape[2] != self._visual_dim():
            raise ValueError(f"visual must be (B, N, {self._visual_dim()}) tokens, got shape {tuple(visual.shape)}")
        memory = self.memory_proj(visual)
        x = self._first_layer().finish(prefix.x, prefix.q, memory)
        for layer in self.decoder[1:]:
            x = layer(x, memory)
        return self.out_proj(x)

"""The context decoder (DenseCLIP's post-model prompting, official ``ContextDecoder``).

Queries are the K class embeddings, memory is the visual context [g; z] as (B, 1 + hw, D).
memory_proj = LN(D), Linear(D, W), LN(W); text_proj = LN(D), Linear(D, W); then ``layers`` pre-norm decoder layers

    x += SelfAttn(LN1(x));  x += CrossAttn(LN2(x), memory);  x += MLP(LN3(x))

(q/k/v Linear without bias, output Linear with bias, scale head_dim^-0.5; MLP W-4W-W with exact GELU; dropout in
training), and out_proj = LN(W), Linear(W, D). The model adds ``gamma * decoder(text, visual)`` to the text.
Both attentions run through ``ops.context_attention`` (flash-style, no K x N score matrix).
"""

from __future__ import annotations

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
        b, n, c = q.shape
        (q,) = split_heads(self.q_proj(q), self.heads)
        (k,) = split_heads(self.k_proj(kv), self.heads)
        (v,) = split_heads(self.v_proj(kv), self.heads)
        out = ops.context_attention(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


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
        y = self.norm1(x)
        x = x + self.self_attn(y, y)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


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

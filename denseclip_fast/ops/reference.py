"""The specification of denseclip_fast's operators, in plain PyTorch.

Every fast backend (C++, CUDA, Triton) is tested against these functions. They compute what the official DenseCLIP
code computes, written for clarity, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_text_score(visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cosine similarity between every pixel of ``visual`` and every class embedding, times ``scale``.

    visual: (B, C, H, W); text: (K, C) shared by the batch or (B, K, C). Both are L2-normalised along C the way
    ``F.normalize`` does (x / max(||x||, 1e-12)). Returns (B, K, H, W) in the promoted input dtype.
    """
    v = F.normalize(visual, dim=1, p=2)
    t = F.normalize(text, dim=-1, p=2)
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(visual.shape[0], -1, -1)
    score = torch.einsum("bchw,bkc->bkhw", v, t)
    return score * scale if scale != 1.0 else score


def score_concat(feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``torch.cat([feature, pixel_text_score(visual, text, scale)], dim=1)``, what the official model does to the
    pyramid level that receives the score map."""
    return torch.cat([feature, pixel_text_score(visual, text, scale)], dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, L, d) tensors, as ``F.scaled_dot_product_attention`` without
    mask or dropout."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)

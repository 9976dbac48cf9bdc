"""The specification of denseclip_fast's operators, in plain PyTorch.

Every fast backend (C++, CUDA, Triton) is tested against these functions. They compute what the official DenseCLIP
code computes, written for clarity, not speed.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12  # F.normalize's default eps


def normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``F.normalize(x, dim=dim)``, x / max(||x||, eps), with the gradient it had up to torch 2.13 (and in the
    official code's torch) at a norm of exactly eps: clamp_min's gradient passed its bound there; from torch 2.14 it
    does not (pytorch/pytorch#184572), so F.normalize's gradient at exactly eps depends on the torch installed. The
    values are F.normalize's, bit for bit; the gradients differ only for a vector whose norm is exactly eps."""
    norm = x.norm(2, dim, keepdim=True)  # F.normalize's own calls, so that the values are its own
    return x / torch.where(norm >= NORM_EPS, norm, norm.clamp_min(NORM_EPS))


def pixel_text_score(visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cosine similarity between every pixel of ``visual`` and every class embedding, times ``scale``.

    visual: (B, C, H, W); text: (K, C) shared by the batch or (B, K, C). Both are L2-normalised along C the way
    ``F.normalize`` does (x / max(||x||, 1e-12); :func:`normalize`). Returns (B, K, H, W) in the promoted input
    dtype.
    """
    return normalized_score(normalize(visual, dim=1), normalize(text, dim=-1), scale)


def normalized_score(v: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale`` x the dot products of the pixels of ``v`` (B, C, H, W) and the rows of ``t`` ((K, C) or (B, K, C)),
    both already normalised: :func:`pixel_text_score` after its normalisations."""
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(v.shape[0], -1, -1)
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

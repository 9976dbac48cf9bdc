"""denseclip_fast's operators.

``pixel_text_score`` is what the model calls between the image encoder and the FPN. Today it validates its input
and runs the reference implementation; the fused kernels (C++/CUDA/Triton) plug in behind the same signature.
"""

from __future__ import annotations

import torch

from . import reference
from .extension import build_info, extension_available

__all__ = ["pixel_text_score", "reference", "build_info", "extension_available"]


def pixel_text_score(visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cosine score map: visual (B, C, H, W), text (K, C) or (B, K, C) -> (B, K, H, W) times ``scale``.

    See :func:`denseclip_fast.ops.reference.pixel_text_score` for the exact definition.
    """
    _check_score_inputs(visual, text)
    return reference.pixel_text_score(visual, text, scale)


def _check_score_inputs(visual: torch.Tensor, text: torch.Tensor) -> None:
    if not isinstance(visual, torch.Tensor) or visual.dim() != 4:
        raise ValueError(f"visual must be a (B, C, H, W) tensor, got {_describe(visual)}")
    if not isinstance(text, torch.Tensor) or text.dim() not in (2, 3):
        raise ValueError(f"text must be a (K, C) or (B, K, C) tensor, got {_describe(text)}")
    for name, t in (("visual", visual), ("text", text)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if visual.device != text.device:
        raise ValueError(f"visual and text must be on the same device, got {visual.device} and {text.device}")
    if text.shape[-1] != visual.shape[1]:
        raise ValueError(
            f"text has C={text.shape[-1]} channels but visual has C={visual.shape[1]} (shapes {tuple(text.shape)} "
            f"and {tuple(visual.shape)})"
        )
    if text.shape[-2] == 0:
        raise ValueError("text must hold at least one class embedding (K >= 1), got K=0")
    if text.dim() == 3 and text.shape[0] != visual.shape[0]:
        raise ValueError(f"per-batch text has B={text.shape[0]} but visual has B={visual.shape[0]}")


def _describe(x: object) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__

"""The official test pipeline on the plain model, one uint8 image at a time (what the CLI runs).

image (H, W, 3) uint8 -> keep-ratio resize to fit ``config.test_scale`` -> CLIP normalisation -> whole or sliding-
window logits -> bilinear resize to (H, W). With ``names`` given, the open-vocabulary cosine map of those names
(whole resized image, at the stride of the local embedding map) is used instead of the trained head, and ``mode``
does not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .model import DenseCLIP
from .preprocess import prepare

Mode = Literal["whole", "slide"]


@torch.no_grad()
def image_logits(
    model: DenseCLIP, image: np.ndarray | torch.Tensor, mode: Mode = "slide", names: Sequence[str] | None = None
) -> torch.Tensor:
    """(K, H, W) float32 logits (or cosine scores for ``names``) at the image's own size."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    height, width = torch.as_tensor(image).shape[:2]
    x = prepare(image, model.config.test_scale).to(model.contexts.device, model.contexts.dtype)
    if names is not None:
        out = model.open_vocab_scores(x, names)
    elif mode == "slide":
        out = model.slide_inference(x)
    else:
        out = model(x)
    return F.interpolate(out.float(), size=(height, width), mode="bilinear", align_corners=False)[0]


def image_labels(
    model: DenseCLIP, image: np.ndarray | torch.Tensor, mode: Mode = "slide", names: Sequence[str] | None = None
) -> np.ndarray:
    """(H, W) int64 label map: argmax of :func:`image_logits`."""
    return image_logits(model, image, mode, names).argmax(dim=0).cpu().numpy()

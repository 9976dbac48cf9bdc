"""What the Triton launchers share."""

from __future__ import annotations

import os

import torch


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take float32 operands with IEEE products: for float32 inputs (TF32 would cost ~1e-3
    relative error), and for bfloat16 under Triton's interpreter, which mis-multiplies bfloat16."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")

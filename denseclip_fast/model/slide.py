"""Sliding-window inference, exactly as mmseg 0.x ``slide_inference``.

Windows start every ``stride`` pixels; the last one in each direction is shifted back to end at the image border
(``y1 = max(min(y1 + crop, H) - crop, 0)``), and an image smaller than the crop is one window of the image size.
Every window's logits are added into a (B, K, H, W) sum, and the sum is divided by the number of windows that
cover each pixel. All windows have the same size, so they are evaluated as one batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from ..validation import as_int

Window = tuple[int, int, int, int]  # y1, y2, x1, x2


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])  # a numpy integer (a size computed with numpy) is the int it stands for


def two_thirds_stride(side: int) -> int:
    """The stride of a window of ``side`` pixels given without one: two thirds of it, as the official configs' 341
    of 512 and 426 of 640."""
    return max(1, 2 * side // 3)


def window_sizes(
    crop: int | tuple[int, int], stride: int | tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop, stride) as (height, width) pairs, checked. A stride longer than the crop is refused: the windows
    would skip pixels (mmseg asserts that every pixel is covered; here they would be 0 / 0 = NaN)."""
    (h_crop, w_crop), (h_stride, w_stride) = _pair(crop, "crop"), _pair(stride, "stride")
    if h_stride > h_crop or w_stride > w_crop:
        raise ValueError(f"stride must not exceed crop (the windows would leave pixels out), got stride={stride!r} "
                         f"and crop={crop!r}")  # fmt: skip
    return (h_crop, w_crop), (h_stride, w_stride)


def slide_windows(
    height: int, width: int, crop: int | tuple[int, int], stride: int | tuple[int, int]
) -> list[Window]:
    """The windows mmseg visits, in its order (rows, then columns); crop and stride as window_sizes takes them."""
    (h_crop, w_crop), (h_stride, w_stride) = window_sizes(crop, stride)
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * h_stride + h_crop, height)
            x2 = min(wi * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def slide_inference(
    encode_decode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    crop: int | tuple[int, int],
    stride: int | tuple[int, int],
    windows_per_batch: int | None = None,
) -> torch.Tensor:
    """x: (B, 3, H, W); ``encode_decode`` maps (N, 3, h, w) crops to (N, K, h, w) logits. Returns (B, K, H, W), in
    the logits' dtype, or float32 when they are float16/bfloat16 (the window sums are accumulated in float32).

    ``windows_per_batch`` bounds how many windows (each B crops) go through one ``encode_decode`` call; None runs
    them all at once.
    """
    b, _, height, width = x.shape
    windows = slide_windows(height, width, crop, stride)
    step = len(windows) if windows_per_batch is None else windows_per_batch
    step = as_int("windows_per_batch", step, why=" or None")
    total: torch.Tensor | None = None
    count = x.new_zeros((1, 1, height, width))
    for start in range(0, len(windows), step):
        group = windows[start : start + step]
        crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group], dim=0)
        logits = encode_decode(crops).unflatten(0, (len(group), b))
        if total is None:  # half-precision logits are summed in float32 (and returned so)
            acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
            total = logits.new_zeros((b, logits.shape[2], height, width), dtype=acc)
            count = count.to(acc)
        for (y1, y2, x1, x2), window_logits in zip(group, logits):
            total[:, :, y1:y2, x1:x2] += window_logits
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None
    return total.div_(count)  # in place: the sum is ours, and a second (B, K, H, W) tensor costs its page faults

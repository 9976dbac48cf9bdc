"""Label maps to pictures: palettes, colourised labels, overlays on the input image."""

from __future__ import annotations

import operator
import reprlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .validation import IGNORE, check_ignore_index, finite_real

Palette = Sequence[Sequence[int]]


def rgb_triples(palette: Any) -> list[tuple[int, int, int]] | None:
    """``palette`` as RGB triples of Python ints if it is an iterable of 3-value iterables of integers 0..255 (ints,
    numpy or 0-d tensor integers; no bools, no floats, which int() would truncate), else None."""
    colors = []
    try:
        for rgb in palette:
            values = list(rgb)
            if len(values) != 3 or any(isinstance(v, bool) for v in values):
                return None
            channels = tuple(operator.index(v) for v in values)
            if not all(0 <= v <= 255 for v in channels):
                return None
            colors.append(channels)
    except TypeError:  # not iterable, or a value that is not an integer
        return None
    return colors  # type: ignore[return-value]


def check_palette(palette: Any, num_classes: int, name: str = "palette") -> list[tuple[int, int, int]] | None:
    """``palette`` (None, or one colour per class) as a list of K (r, g, b) tuples of Python ints; ValueError
    naming ``name`` otherwise."""
    if palette is None:
        return None
    colors = rgb_triples(palette)
    if colors is None or len(colors) != num_classes:
        got = f"{len(colors)} colours" if colors is not None else reprlib.repr(palette)
        raise ValueError(f"{name} must be None or {num_classes} (r, g, b) triples of integers in 0..255 (one per "
                         f"class), got {got}")  # fmt: skip
    return colors


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, deterministic colours: evenly spaced hues (golden-ratio steps) at alternating brightness."""
    colors = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        colors.append(_hsv_to_rgb(hue, 0.75, value))
    return colors


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def colorize(labels: np.ndarray, palette: Palette) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 colours. Labels outside the palette raise ValueError."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    lut = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if labels.size and (labels.min() < 0 or labels.max() >= len(lut)):
        raise ValueError(f"labels range {labels.min()}..{labels.max()} exceeds the palette of {len(lut)} colours")
    return lut[labels]


def ignored(labels: np.ndarray, palette: Palette, ignore_index: int | None = IGNORE) -> np.ndarray | None:
    """The (H, W) mask of ``labels`` equal to ``ignore_index`` where that is no class of ``palette`` (a ground-truth
    map's unlabelled pixels), or None when there is none to leave out; ValueError for an ``ignore_index`` that is
    neither None nor a label value."""
    if ignore_index is None:
        return None
    ignore_index = check_ignore_index(ignore_index)
    labels = np.asarray(labels)
    if ignore_index < len(np.asarray(palette).reshape(-1, 3)) or labels.dtype.kind not in "iu":
        return None
    mask = labels == ignore_index
    return mask if mask.any() else None


def overlay(image: np.ndarray, labels: np.ndarray, palette: Palette, alpha: float = 0.5,
            ignore_index: int | None = IGNORE) -> np.ndarray:  # fmt: skip
    """Blend the colourised labels over an (H, W, 3) uint8 image; ``alpha`` is the weight of the colours, a real
    number in [0, 1] (ValueError otherwise). Pixels labelled ``ignore_index`` (255; None: none), when it is no
    class of the palette, are left unpainted: a ground-truth map's unlabelled pixels beside a prediction."""
    weight = finite_real(alpha)
    if weight is None or not 0.0 <= weight <= 1.0:
        raise ValueError(f"alpha must be a real number in [0, 1], got {type(alpha).__name__} {alpha!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:  # a grey (H, W) image broadcast its rows
        # across the colours; an RGBA one, a numpy error naming nothing; a float one was clipped as 0..255 pixels
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    if image.shape[:2] != np.asarray(labels).shape:
        raise ValueError(f"image {image.shape[:2]} and labels {np.asarray(labels).shape} differ in size")
    mask = ignored(labels, palette, ignore_index)
    if mask is not None:
        labels = np.where(mask, 0, labels)
    blended = (1 - weight) * image.astype(np.float32) + weight * colorize(labels, palette).astype(np.float32)
    painted = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    if mask is not None:
        painted[mask] = image[mask]
    return painted

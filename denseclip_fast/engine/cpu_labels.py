"""predict's last resize and its argmax over the classes in one pass on a CPU (the extension's
``denseclip_fast_engine::resize_argmax_``, csrc/cpu/labels.cpp).

The resize-then-argmax way (segmenter.labels) writes every class's plane at the image's size and reads it back:
for a 2048x1536 photo and 150 classes, 472 million float32 values, which took most of predict's time on a CPU.
The fused kernel resizes each source row along the width once, combines two such rows per output row and keeps the
running best class in place, so no plane at the image's size is written.

Its values are ATen's bilinear resize bit for bit (the same products and fused multiply-adds; the kernel's comment
says which), so its labels equal the argmax of the logits, as the resize-then-argmax way's do. That is ATen's
generic kernel, which it uses for a single-channel plane whose output's height + width exceed 128 (smaller ones go
through its channels-vectorised kernel, which rounds otherwise): the fused kernel is used above MIN_SIDES, and only
after :func:`fused_labels_usable` found it equal to F.interpolate on a probe in that range (torch 2.11 and 2.14
with ATen's AVX2 and AVX-512 kernels). A torch whose resize rounds otherwise (ATen's DEFAULT kernels on x86-64,
ATEN_CPU_CAPABILITY=default, have no fused multiply-add), or a build without the extension, keeps the
resize-then-argmax way.

Not covered: ``torch.set_flush_denormal(True)`` sets the calling thread only, so ATen's resize of denormal scores
already depends on how its threads split the work; the kernel splits it otherwise, and its labels may differ from
the argmax of such logits (the unfused way's do not).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# the fused kernel serves outputs whose height + width exceed this (ATen's generic kernel's range starts at 129)
MIN_SIDES = 256

# the probe's (h, w) -> (H, W): upsampled by a fraction and by an integer, downsampled, one axis unchanged, one
# source row or column, one output column; every output's height + width just past MIN_SIDES or far past it
PROBE = (((37, 53), (101, 211)), ((64, 64), (256, 256)), ((300, 301), (256, 149)), ((128, 128), (128, 512)),
         ((1, 7), (97, 160)), ((9, 1), (300, 1)))  # fmt: skip


def _op(name: str) -> object | None:
    try:
        return getattr(torch.ops.denseclip_fast_engine, name)
    except (AttributeError, RuntimeError):  # the extension not built, or built before the kernel existed
        return None


@functools.cache
def fused_labels_usable() -> bool:
    """Whether this build has the fused kernel and its resize equals F.interpolate's (per plane, as the engine
    resizes) bit for bit on the PROBE shapes (random values, an infinity and a NaN among them, whose spread through
    the taps of weight 0 tells one rounding of those from another; probed once, on the CPU whatever torch's default
    device)."""
    resize = _op("resize_bilinear")
    if resize is None or _op("resize_argmax_") is None:
        return False
    generator = torch.Generator().manual_seed(0)
    for (h, w), (height, width) in PROBE:
        scores = torch.randn(1, 3, h, w, generator=generator, device="cpu") * 8
        scores[0, 1, h // 2, w // 2] = float("inf")
        scores[0, 2, h - 1, 0] = float("nan")
        ours = resize(scores, height, width)  # type: ignore[operator]
        theirs = F.interpolate(scores.view(3, 1, h, w), size=(height, width), mode="bilinear", align_corners=False)
        theirs = theirs.view(ours.shape)
        nan = ours.isnan()
        if not torch.equal(nan, theirs.isnan()):
            return False
        if not torch.equal(ours.masked_fill(nan, 0.0), theirs.masked_fill(nan, 0.0)):
            return False
    return True


def fused_labels_apply(height: int, width: int) -> bool:
    """Whether labels resized to (height, width) on a CPU take the fused kernel: large enough and usable."""
    return height + width > MIN_SIDES and fused_labels_usable()


def resize_argmax_(
    scores: torch.Tensor, height: int, width: int, best: torch.Tensor, index: torch.Tensor, first: int
) -> None:
    """Offer the classes of ``scores`` (N, K, h, w) float32 contiguous, resized to (height, width), to the running
    argmax ``best`` (N, H, W) float32 / ``index`` (N, H, W) int64 as classes first .. first + K - 1 (in place): a
    class replaces the best so far when not (value <= best) and the best is not NaN (argmax's ties and NaNs). Start
    with best -inf and index 0."""
    op = _op("resize_argmax_")
    if op is None:
        raise RuntimeError("resize_argmax_: the denseclip_fast extension with the fused label kernel is not loaded")
    op(scores, height, width, best, index, first)  # type: ignore[operator]

"""predict's resizes and its argmax over the classes in one pass on a CPU (the extension's
``denseclip_fast_engine::resize_argmax_``, csrc/cpu/labels.cpp).

The resize-then-argmax way (segmenter.labels) writes every class's plane at each resize's size (the network's
input, then a uint8 image's own) and reads it back: for a 2048x1536 photo and 150 classes, 472 million float32
values at the last one, which took most of predict's time on a CPU. The fused kernel makes the rows of each resize as
the next one needs them (each input row resized along the width once, two such rows combined per output row) and
keeps the running best class in place, so no plane is written at any of the sizes.

Its values are ATen's bilinear resize bit for bit (the same products and fused multiply-adds; the kernel's comment
says which), so its labels equal the argmax of the logits, as the resize-then-argmax way's do. That is ATen's
generic kernel, which it uses for a single-channel plane whose output's height + width exceed 128 (smaller ones go
through its channels-vectorised kernel, which rounds otherwise): the fused kernel takes the resizes to sizes above
MIN_SIDES (those after the last smaller one: :func:`fused_tail`), and only after :func:`fused_labels_usable` found
it equal to F.interpolate on a probe in that range. ATen's source positions, scale * (dst + 0.5) - 0.5, are rounded
once (a fused multiply-add: torch 2.11 to 2.14 on x86-64) or twice (torch 2.15), as its compiler made them; the probe
tries both (:func:`source_fused`), and the kernel then rounds as the installed torch does (it is equal with torch
2.14's and 2.15's AVX2 and AVX-512 kernels; torch 2.11's resize rounds as 2.14's, checked by hand). A torch whose
resize rounds otherwise (ATen's DEFAULT kernels on x86-64, ATEN_CPU_CAPABILITY=default, have no fused multiply-add in
their values), or a build without the extension, keeps the resize-then-argmax way.

Not covered: ``torch.set_flush_denormal(True)`` sets the calling thread only, so ATen's resize of denormal scores
already depends on how its threads split the work; the kernel splits it otherwise, and its labels may differ from
the argmax of such logits (the unfused way's do not).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# the fused kernel serves outputs whose height + width exceed this (ATen's generic kernel's range starts at 129)
MIN_SIDES = 256

# the probe's (h, w) -> resizes: upsampled by a fraction and by an integer, downsampled, one axis unchanged, one
# source row or column, one output column, two resizes in turn; every output's height + width just past MIN_SIDES
# or far past it
PROBE = (((37, 53), ((101, 211),)), ((64, 64), ((256, 256),)), ((300, 301), ((256, 149),)),
         ((128, 128), ((128, 512),)), ((1, 7), ((97, 160),)), ((9, 1), ((300, 1),)),
         ((20, 31), ((129, 200), (300, 257))))  # fmt: skip

# the fused kernel's classes per call: each thread keeps about three rows of every resize's width for each class,
# at most this many float32 values (32 MiB) a thread
ROW_VALUES = 1 << 23


def _op(name: str) -> object | None:
    try:
        return getattr(torch.ops.denseclip_fast_engine, name)
    except (AttributeError, RuntimeError):  # the extension not built, or built before the kernel existed
        return None


def _equals_interpolate(resize: object, fused_source: bool) -> bool:
    """Whether the kernel's resize with that rounding of the source positions equals F.interpolate's (per plane, as
    the engine resizes; in turn for a chain) bit for bit on the PROBE shapes: random values, an infinity and a NaN
    among them, whose spread through the taps of weight 0 tells one rounding of those from another."""
    generator = torch.Generator().manual_seed(0)
    for (h, w), sizes in PROBE:
        scores = torch.randn(1, 3, h, w, generator=generator, device="cpu") * 8
        scores[0, 1, h // 2, w // 2] = float("inf")
        scores[0, 2, h - 1, 0] = float("nan")
        ours = resize(scores, [side for size in sizes for side in size], fused_source)  # type: ignore[operator]
        theirs = scores.view(3, 1, h, w)
        for size in sizes:
            theirs = F.interpolate(theirs, size=size, mode="bilinear", align_corners=False)
        theirs = theirs.view(ours.shape)
        nan = ours.isnan()
        if not torch.equal(nan, theirs.isnan()):
            return False
        if not torch.equal(ours.masked_fill(nan, 0.0), theirs.masked_fill(nan, 0.0)):
            return False
    return True


@functools.cache
def source_fused() -> bool | None:
    """How this torch's CPU resize rounds its source positions, as the probe found: True for once (a fused
    multiply-add), False for twice (the product, then the subtraction), None where the kernel equals F.interpolate
    in neither way or this build lacks it (probed once, on the CPU whatever torch's default device)."""
    resize = _op("resize_bilinear")
    if resize is None or _op("resize_argmax_") is None:
        return None
    for fused in (True, False):
        if _equals_interpolate(resize, fused):
            return fused
    return None


def fused_labels_usable() -> bool:
    """Whether this build has the fused kernel and its resize equals F.interpolate's bit for bit (in one of the two
    roundings of the source positions: :func:`source_fused`)."""
    return source_fused() is not None


def fused_tail(sizes: Sequence[tuple[int, int]]) -> int:
    """How many of the last resizes to ``sizes`` (in turn, on a CPU) the fused kernel takes: those after the last
    one too small for it (height + width at most MIN_SIDES), none where it is not usable."""
    tail = 0
    for height, width in reversed(sizes):
        if height + width <= MIN_SIDES:
            break
        tail += 1
    return tail if tail and fused_labels_usable() else 0


# scores of at most this magnitude stay finite through any bilinear resize (each value a convex combination of
# theirs), far below float32's 3.4e38
TAME = 1e38


def changing(start: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``sizes`` without those equal to the size before them (``start`` before the first): the resizes in turn that
    change a map's size."""
    return [size for before, size in zip((start, *sizes[:-1]), sizes) if tuple(before) != tuple(size)]


def without_repeats(
    scores: torch.Tensor, start: tuple[int, int], sizes: Sequence[tuple[int, int]]
) -> Sequence[tuple[int, int]]:
    """``sizes`` without the resizes to the size before them (``start`` before the first) when all ``scores`` are
    finite and within TAME: those resizes give such values back as they are (ATen's resize to the same size returns
    finite values bit for bit, as segmenter.unchanged_by_resize relies on), so the kernel need not make them; the
    last one stays when all are repeats. Other scores keep every resize (one to the same size turns an infinity into
    NaN)."""
    kept = changing(start, sizes)
    if len(kept) == len(sizes):
        return sizes
    low, high = torch.aminmax(scores)  # NaN passes on: not tame
    if not bool((low >= -TAME) & (high <= TAME)):
        return sizes
    return kept or sizes[-1:]


def classes_per_call(sizes: Sequence[tuple[int, int]]) -> int:
    """The most classes one call of the fused kernel takes for the resizes to ``sizes`` (ROW_VALUES)."""
    return max(1, ROW_VALUES // (3 * sum(width for _, width in sizes)))


def resize_usable(scores: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> bool:
    """Whether :func:`resize` may make the resizes of ``scores`` to ``sizes`` (in turn) in place of F.interpolate:
    a plain float32 CPU tensor (N, K, h, w) in NCHW that no gradient and nothing recording the call needs (an
    exported graph traces F.interpolate), every resize one the kernel serves (fused_tail: all of them, probed), and
    the kernel's rows for all K classes within ROW_VALUES (one call)."""
    from ..model.layers import plain_tensors

    return (
        bool(sizes)
        and plain_tensors(torch.float32, ("cpu",), scores)
        and scores.dim() == 4
        and scores.is_contiguous()
        and min(scores.shape) > 0
        and fused_tail(sizes) == len(sizes)
        and scores.shape[1] <= classes_per_call(sizes)
    )


def resize(scores: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``scores`` (N, K, h, w) float32 contiguous resized bilinearly to each of ``sizes`` in turn, each class plane
    as ATen resizes a single-channel image, bit for bit (where :func:`resize_usable`): one pass of the kernel that
    makes each resize's rows as the next needs them, so that only the last size's planes are written (timed against
    F.interpolate's per-plane resizes by benchmarks/bench_logits_resize.py)."""
    op = _op("resize_bilinear")
    if op is None:
        raise RuntimeError("resize: the denseclip_fast extension with the fused label kernel is not loaded")
    return op(scores, [side for size in sizes for side in size], kernel_rounding())  # type: ignore[operator]


def resize_argmax_(
    scores: torch.Tensor, sizes: Sequence[tuple[int, int]], best: torch.Tensor, index: torch.Tensor, first: int
) -> None:
    """Offer the classes of ``scores`` (N, K, h, w) float32 contiguous, resized to each of ``sizes`` in turn, to the
    running argmax ``best`` (N, H, W) float32 / ``index`` (N, H, W) int64 as classes first .. first + K - 1 (in
    place): a class replaces the best so far when not (value <= best) and the best is not NaN (argmax's ties and
    NaNs). ``first`` 0 starts the argmax: best and index are written, not read."""
    op = _op("resize_argmax_")
    if op is None:
        raise RuntimeError("resize_argmax_: the denseclip_fast extension with the fused label kernel is not loaded")
    op(scores, [side for size in sizes for side in size], kernel_rounding(), best, index, first)  # type: ignore[operator]


def kernel_rounding() -> bool:
    """The kernel's rounding of the source positions: the installed torch's (:func:`source_fused`), once (fused)
    where the probe matched neither (the callers check :func:`fused_labels_usable` first; a direct call then gets the
    rounding of torch 2.11 to 2.14)."""
    fused = source_fused()
    return True if fused is None else fused

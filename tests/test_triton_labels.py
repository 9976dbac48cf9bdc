"""predict's fused resize and argmax on a GPU (ops/triton/labels.py, engine.segmenter.labels through
engine.cuda_resample): under Triton's interpreter on a CPU (CI), on CUDA where there is one. The labels must equal the
argmax of the resize kernel's float32 planes pixel for pixel: ties to the first class, NaN beating numbers."""

from __future__ import annotations

import pytest
import torch

from denseclip_fast.engine import cuda_resample, segmenter
from denseclip_fast.ops.triton import labels, resample

from .conftest import forbid_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter (numpy) warns of a max over a block of NaNs (the kernel then takes its NaN branch) and of an
# infinity times a weight of 0 (NaN, as on a GPU)
pytestmark = [pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")]


def _scores(n: int, k: int, h: int, w: int, dtype: torch.dtype, layout: str, seed: int = 0) -> torch.Tensor:
    """Random class scores with what an argmax must get right: two classes tied everywhere (1 and 2), a NaN, and an
    infinity; in NCHW, NHWC or a class slice of a wider map (no dense layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, h, w, generator=g) * 3
    if k > 2:
        x[:, 2] = x[:, 1]
    x[0, k // 2, h // 2, w // 2] = float("nan")
    x[-1, k - 1, 0, w - 1] = float("inf")
    x = x.to(DEVICE, dtype)
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return torch.cat([x[:, :1], x], dim=1)[:, 1:]
    return x


def _resize_then_argmax(x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    planes = resample.bilinear(x, size, dtype=torch.float32, memory_format=torch.contiguous_format)
    values, index = planes.max(dim=1)
    return values, index


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(("shape", "size"), [((2, 5, 4, 6), (9, 13)), ((1, 37, 3, 3), (5, 4)), ((1, 1, 1, 1), (3, 2)),
                                             ((1, 3, 5, 7), (2, 1)), ((1, 2, 3, 3), (3, 3))])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bilinear_argmax_equals_resize_then_argmax(shape, size, layout, dtype):
    """Up and down, from one pixel, to one column, the same size; one class, more classes than a block (37, 32 a
    block), a tie, a NaN (it wins, and spreads through the taps) and an infinity: the labels and best values of
    resize-then-max, exactly, in one call and in chunks of classes offered in turn."""
    x = _scores(*shape, dtype, layout)
    values, want = _resize_then_argmax(x, size)
    if size[0] >= shape[2] and size[1] >= shape[3]:  # (a downsampling may skip the NaN's pixel)
        assert bool(values.isnan().any()), "the NaN should reach the output"
    assert torch.equal(labels.bilinear_argmax(x, size), want)
    best = torch.empty((shape[0], *size), device=DEVICE)
    index = torch.empty((shape[0], *size), dtype=torch.int64, device=DEVICE)
    for first in range(0, shape[1], 2):
        labels.bilinear_argmax_(x[:, first : first + 2], best, index, first)
    assert torch.equal(index, want)
    assert torch.equal(best.nan_to_num(nan=7.0), values.nan_to_num(nan=7.0))


@pytest.mark.parametrize("tile", [labels.LabelTiling(4, 8, 2), labels.LabelTiling(1, 32, 4),
                                  labels.LabelTiling(64, 2, 1)])  # fmt: skip
def test_bilinear_argmax_tilings_agree(tile, monkeypatch):
    """Fewer classes a block than the map has (ties across blocks), blocks wider than the classes or the columns,
    int64 offsets (WIDE_FROM lowered): the default tiling's labels."""
    x = _scores(2, 11, 4, 5, torch.bfloat16, "nhwc", seed=3)
    want = labels.bilinear_argmax(x, (7, 9))
    best = torch.empty((2, 7, 9), device=DEVICE)
    index = torch.empty((2, 7, 9), dtype=torch.int64, device=DEVICE)
    labels.bilinear_argmax_(x, best, index, 0, tile)
    assert torch.equal(index, want)
    monkeypatch.setattr(resample, "WIDE_FROM", 16)  # (resample._wide decides for the label kernel too)
    assert torch.equal(labels.bilinear_argmax(x, (7, 9)), want)


def test_bilinear_argmax_edge_values():
    """A map of -inf (the interior pixels' values -inf in every class: class 0 wins their tie, not the running
    index's start value; the border's zero weights make NaN, which wins), and NaNs at one pixel in two chunks (the
    first NaN's class stays): resize-then-max's labels and values."""
    x = torch.full((1, 3, 2, 2), float("-inf"), device=DEVICE)
    values, want = _resize_then_argmax(x, (3, 3))
    assert bool((want[values == float("-inf")] == 0).all()) and bool((values == float("-inf")).any())
    assert torch.equal(labels.bilinear_argmax(x, (3, 3)), want)
    x = torch.zeros((1, 5, 2, 2), device=DEVICE)
    x[0, 1, 0, 0] = x[0, 3, 0, 0] = float("nan")
    x[0, 4] = 9.0
    values, want = _resize_then_argmax(x, (2, 2))  # (the same size: each pixel its own value)
    assert int(want[0, 0, 0]) == 1
    best = torch.empty((1, 2, 2), device=DEVICE)
    index = torch.empty((1, 2, 2), dtype=torch.int64, device=DEVICE)
    for first in range(0, 5, 2):
        labels.bilinear_argmax_(x[:, first : first + 2], best, index, first)
    assert torch.equal(index, want) and torch.equal(best.nan_to_num(nan=7.0), values.nan_to_num(nan=7.0))


def test_bilinear_argmax_of_no_images_launches_nothing(monkeypatch):
    """A batch of no images: (0, H, W) labels, as resize-then-max gives them, without a launch (a grid of no programs
    is an error on CUDA); with no images the scores of no classes are no error either."""
    x = _scores(2, 3, 4, 5, torch.float32, "nhwc")[:0]
    want = _resize_then_argmax(x, (7, 9))[1]
    forbid_launches(monkeypatch, labels)
    got = labels.bilinear_argmax(x, (7, 9))
    assert got.shape == want.shape == (0, 7, 9) and got.dtype == want.dtype == torch.int64
    assert labels.bilinear_argmax(x[:, :0], (7, 9)).shape == (0, 7, 9)


def test_bilinear_argmax_rejects_bad_input():
    x = _scores(1, 3, 4, 4, torch.float32, "nchw")
    best = torch.empty((1, 8, 8), device=DEVICE)
    index = torch.empty((1, 8, 8), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"bilinear_argmax_: expected a \(N, C, H, W\) floating-point tensor"):
        labels.bilinear_argmax_(x.long(), best, index, 0)
    with pytest.raises(ValueError, match="first must be an int >= 0, got -1"):
        labels.bilinear_argmax_(x, best, index, -1)
    with pytest.raises(ValueError, match=r"float32 and int64 of one shape, got torch.float32 \(1, 8, 8\) and "
                                         r"torch.int32"):  # fmt: skip
        labels.bilinear_argmax_(x, best, index.int(), 0)
    with pytest.raises(ValueError, match=r"scores \(1, 3, 4, 4\) on .* do not fit best \(2, 8, 8\)"):
        labels.bilinear_argmax_(x, best.expand(2, 8, 8), index.expand(2, 8, 8), 0)
    with pytest.raises(ValueError, match=r"scores \(1, 0, 4, 4\) have nothing to offer"):
        labels.bilinear_argmax_(x[:, :0], best, index, 0)
    with pytest.raises(ValueError, match="best and index must be contiguous"):  # pixels would share elements
        labels.bilinear_argmax_(x, best[:, :1].expand(1, 8, 8), index, 0)
    shared = torch.empty((1, 8, 8), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="best and index share memory"):
        labels.bilinear_argmax_(x, shared.view(-1).view(torch.float32)[:64].view(1, 8, 8), shared, 0)
    with pytest.raises(ValueError, match=r"tiling must hold powers of two .* got LabelTiling\(block_c=3"):
        labels.bilinear_argmax_(x, best, index, 0, labels.LabelTiling(3, 4, 4))
    with pytest.raises(ValueError, match=r"bilinear_argmax: size must be \(height, width\)"):
        labels.bilinear_argmax(x, (8, 0))


def test_labels_takes_the_fused_kernel_where_usable(monkeypatch):
    """segmenter.labels where the Triton kernels serve the scores (the interpreter here): one fused call per chunk of
    classes, reading the scores as they are (bfloat16 NHWC, no float32 copy), for one resize and for two (the first
    in memory); the labels of the unfused way (resize, then max), in one chunk and in chunks of one class."""
    x = _scores(2, 6, 3, 4, torch.bfloat16, "nhwc", seed=5)
    monkeypatch.setattr(cuda_resample, "DEVICE_TYPES", (DEVICE,))
    calls = []
    real = labels.bilinear_argmax_
    monkeypatch.setattr(labels, "bilinear_argmax_", lambda s, *a: calls.append(s) or real(s, *a))
    for chunk in (segmenter.LABEL_CHUNK, 1):  # a bound of 1 value: a class at a time
        monkeypatch.setattr(segmenter, "LABEL_CHUNK", chunk)
        for sizes in (((7, 9),), ((5, 6), (11, 8))):
            calls.clear()
            want = segmenter.labels(x, *sizes, fused=False)
            assert not calls
            got = segmenter.labels(x, *sizes)
            assert torch.equal(got, want), (chunk, sizes)
            assert len(calls) == (1 if chunk > 1 else 6), (chunk, sizes)
            if len(sizes) == 1:  # the scores themselves (views of them, a chunk at a time), not a copy
                assert all(c.dtype == torch.bfloat16 and c.data_ptr() == x[:, i:].data_ptr() for i, c in
                           enumerate(calls) if chunk == 1) and calls[0].dtype == torch.bfloat16  # fmt: skip
    monkeypatch.setenv("DENSECLIP_FAST_TRITON_RESAMPLE", "0")
    calls.clear()
    assert torch.equal(segmenter.labels(x, (7, 9)), segmenter.labels(x, (7, 9), fused=False)) and not calls


def test_a_copying_device_skips_resizes_to_the_same_size(monkeypatch):
    """On a device whose ATen resize to a map's own size is a copy (CUDA's; this CPU stands in for one), a resize
    to the size before it is skipped whatever the values: predict of a uint8 image at the network's size makes its
    labels from the head's map in one fused pass (no planes at the network's size), logits resize once, and both
    equal the single resize's results bit for bit, NaN and infinity included (the Triton resize to the same size
    would have spread NaN to their neighbours)."""
    x = _scores(2, 6, 3, 4, torch.bfloat16, "nhwc", seed=6)  # (a NaN and an infinity among them)
    monkeypatch.setattr(cuda_resample, "DEVICE_TYPES", (DEVICE,))
    monkeypatch.setattr(segmenter, "COPYING_DEVICES", ())  # (on a GPU too: every resize made)
    once_logits, once_labels = segmenter.resized_through(x, (7, 9)), segmenter.labels(x, (7, 9))
    twice = segmenter.resized_through(x, (7, 9), (7, 9))  # the second resize made: more NaN around the infinity
    assert twice.isnan().sum() > once_logits.isnan().sum()
    fused, planes = [], []
    real_fused, real_planes = labels.bilinear_argmax_, resample.bilinear_into
    monkeypatch.setattr(labels, "bilinear_argmax_", lambda s, *a: fused.append(s) or real_fused(s, *a))
    monkeypatch.setattr(resample, "bilinear_into", lambda out, s: planes.append(s) or real_planes(out, s))
    monkeypatch.setattr(segmenter, "COPYING_DEVICES", (DEVICE,))
    for sizes in (((7, 9), (7, 9)), ((3, 4), (7, 9), (7, 9), (7, 9))):
        fused.clear(), planes.clear()
        assert torch.equal(segmenter.labels(x, *sizes), once_labels), sizes
        assert len(fused) == 1 and fused[0].data_ptr() == x.data_ptr() and fused[0].dtype == x.dtype, sizes
        assert not planes, sizes
        fused.clear()
        got = segmenter.resized_through(x, *sizes)
        assert len(planes) == 1 and planes[0] is x and not fused, sizes
        assert torch.equal(got.isnan(), once_logits.isnan()), sizes
        assert torch.equal(got.nan_to_num(), once_logits.nan_to_num()), sizes
    planes.clear()
    same = segmenter.resized_through(x, (3, 4))  # no resize left: the scores as float32 NCHW
    assert not planes and same.dtype == torch.float32 and same.is_contiguous()
    assert torch.equal(same.nan_to_num(), x.float().nan_to_num()) and torch.equal(same.isnan(), x.isnan())
    assert torch.equal(segmenter.labels(x, (3, 4)), x.float().max(dim=1).indices) and not fused
    assert segmenter.unchanged_by_resize(x, (3, 4)) and not segmenter.unchanged_by_resize(x, (3, 5))  # NaN or not
    monkeypatch.setattr(segmenter, "COPYING_DEVICES", ())
    assert not segmenter.unchanged_by_resize(x, (3, 4))  # a CPU's rule: not with a NaN among the scores
    planes.clear()
    segmenter.resized_through(x, (7, 9), (7, 9))
    assert len(planes) == 2  # not a copying device: each resize made


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_labels_on_cuda_equal_the_resize_kernel_argmax(dtype):
    """On a GPU, at the engine's shape (150 classes of 128x128 to 512x512 from the head's NHWC map) and odd ones:
    exactly the argmax of the resize kernel's planes and its best values (both kernels make a value with the same
    written-out FMAs; left to the compiler, the label kernel's sm_90 PTX had contracted the other product in some
    elements of its tile)."""
    for shape, size in (((1, 150, 128, 128), (512, 512)), ((2, 150, 128, 171), (512, 683)),
                        ((3, 7, 13, 11), (29, 5))):  # fmt: skip
        for layout in ("nhwc", "nchw"):
            x = _scores(*shape, dtype, layout, seed=7)
            if shape[1] > 8:  # a tie of classes in other places of a program's tile (1 and 2 share one)
                x[:, 8] = x[:, 0]
            values, want = _resize_then_argmax(x, size)
            best = torch.empty(values.shape, device="cuda")
            index = torch.empty(values.shape, dtype=torch.int64, device="cuda")
            labels.bilinear_argmax_(x, best, index, 0)
            assert torch.equal(index, want), (shape, layout)
            # every value (not only the winners) as the resize kernel makes it: a product contracted otherwise
            # shows here in about a third of the pixels
            assert torch.equal(best.nan_to_num(nan=7.0), values.nan_to_num(nan=7.0)), (shape, layout)

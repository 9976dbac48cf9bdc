"""Sliding windows against mmseg's loop (written out in benchmarks/official), and the averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denseclip_fast.model.slide import slide_inference, slide_windows, two_thirds_stride


def mmseg_windows(h, w, crop, stride):
    out = []
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@pytest.mark.parametrize("h, w", [(512, 2048), (512, 683), (300, 200), (513, 512), (1, 1), (1024, 1365)])
@pytest.mark.parametrize("crop, stride", [(512, 341), (640, 426), (64, 64)])
def test_windows_equal_mmseg_and_cover_everything(h, w, crop, stride):
    windows = slide_windows(h, w, crop, stride)
    assert windows == mmseg_windows(h, w, crop, stride)
    covered = torch.zeros(h, w)
    for y1, y2, x1, x2 in windows:
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


def test_averaging_and_chunking():
    x = torch.randn(2, 3, 40, 70)
    calls = []

    def fake(crops):  # per-pixel logits that depend on the crop position only through the pixel values
        calls.append(crops.shape[0])
        return torch.stack([crops.sum(1), -crops.sum(1)], dim=1)

    out = slide_inference(fake, x, crop=32, stride=20)
    expected = torch.stack([x.sum(1), -x.sum(1)], dim=1)
    assert torch.allclose(out, expected, atol=1e-6)  # each pixel averages identical values
    n_windows = len(slide_windows(40, 70, 32, 20))
    assert calls == [2 * n_windows]
    calls.clear()
    chunked = slide_inference(fake, x, crop=32, stride=20, windows_per_batch=2)
    assert torch.equal(chunked, out) and calls[0] == 4 and sum(calls) == 2 * n_windows
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"windows_per_batch must be an int >= 1 or None, got {bad!r}"):
            slide_inference(fake, x, crop=32, stride=20, windows_per_batch=bad)
    # numpy integers (sizes computed with numpy) are the ints they stand for, as the Segmenter's crop and stride
    # (they were refused: "crop must be a positive int ..., got np.int64(32)")
    calls.clear()
    numpy = slide_inference(fake, x, crop=np.int64(32), stride=(np.int32(20), 20), windows_per_batch=np.int64(2))
    assert torch.equal(numpy, out) and calls[0] == 4 and sum(calls) == 2 * n_windows
    assert slide_windows(40, 70, np.int64(32), np.uint8(20)) == slide_windows(40, 70, 32, 20)


@pytest.mark.parametrize("crop, stride, match", [(0, 10, "crop must be"), (32, (1, 2, 3), "stride must be"),
                                                 (32.5, 10, "crop must be"),
                                                 ((32, 64), (40, 40), r"exceed crop.*\(40, 40\)"),
                                                 ((64, 32), (40, 40), r"exceed crop.*\(40, 40\)")])  # fmt: skip
def test_bad_window_arguments(crop, stride, match):
    with pytest.raises(ValueError, match=match):
        slide_windows(64, 64, crop, stride)


def test_half_precision_windows_are_summed_in_float32():
    """bfloat16 window logits (an engine in bfloat16, autocast) are accumulated and returned in float32: summing
    overlapping windows in bfloat16 would round every partial sum to 8 bits of mantissa."""
    x = torch.zeros(1, 3, 40, 70)
    value = torch.tensor(1 / 3).to(torch.bfloat16)

    def encode_decode(crops: torch.Tensor) -> torch.Tensor:
        return torch.full((crops.shape[0], 2, *crops.shape[2:]), value.item(), dtype=torch.bfloat16)

    out = slide_inference(encode_decode, x, crop=32, stride=7)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, value.float().item()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h, w", [(100, 300), (300, 100), (64, 64), (20, 500)])
@pytest.mark.parametrize("crop, stride", [((64, 96), (40, 60)), ((96, 64), (50, 21)), ((32, 128), (32, 100))])
def test_windows_of_other_height_and_width_equal_mmseg(h, w, crop, stride):
    """A crop and a stride given as (height, width) pairs, as mmseg's test_cfg takes them: rows follow the heights
    and columns the widths, each axis on its own (mmseg's loop, written out per axis here)."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    rows = [(max(min(i * h_stride + h_crop, h) - h_crop, 0), min(i * h_stride + h_crop, h))
            for i in range(max(h - h_crop + h_stride - 1, 0) // h_stride + 1)]  # fmt: skip
    cols = [(max(min(j * w_stride + w_crop, w) - w_crop, 0), min(j * w_stride + w_crop, w))
            for j in range(max(w - w_crop + w_stride - 1, 0) // w_stride + 1)]  # fmt: skip
    assert slide_windows(h, w, crop, stride) == [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]


def test_a_crop_without_a_stride_moves_two_thirds_of_it():
    """The stride of a window given without one is two thirds of its side, rounded down: the official configs' 341
    for a 512 crop and 426 for 640 (the presets' slide_stride), never 0 for the smallest windows."""
    import denseclip_fast as dcf

    for arch in ("RN50", "RN101", "ViT-B/16"):
        config = dcf.preset(arch)
        assert two_thirds_stride(config.slide_crop) == config.slide_stride, arch
    assert [two_thirds_stride(side) for side in (1, 2, 3, 4, 5, 6, 96)] == [1, 1, 2, 2, 3, 4, 64]

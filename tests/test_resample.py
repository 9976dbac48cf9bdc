"""The Triton resampling kernels (ops/triton/resample.py) and the CUDA engine's use of them (engine/cuda_resample.py),
against PyTorch's F.interpolate and F.avg_pool2d: under Triton's interpreter on a CPU (CI), on CUDA where there is
one. The interpreter rounds float32 to bfloat16 by truncation, so bfloat16 results are checked within one unit in
the last place there (bit for bit in tests/test_gpu.py)."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

import denseclip_fast as dcf
from denseclip_fast.engine import cuda_resample
from denseclip_fast.engine.segmenter import resized, resized_through
from denseclip_fast.model.heads import Upsample2x
from denseclip_fast.ops.triton import resample

from .conftest import NAMES, forbid_launches, randomized, rel_err, tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _map(n: int, c: int, h: int, w: int, dtype: torch.dtype, layout: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(DEVICE, dtype)
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a channel slice of a wider NCHW map: no dense layout
        return torch.cat([x, x[:, :1]], dim=1)[:, 1:]
    return x


def _check_rounded(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype) -> None:
    """got (dtype) within a unit in the last place of want64 (float64) rounded to dtype; float32 to 1e-6 relative."""
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want64, rtol=1e-6, atol=1e-6 * float(want64.abs().max()))
        return
    ulp = ULP[dtype] * want64.abs().clamp_min(2.0**-14)
    assert bool(((got.double() - want64).abs() <= ulp).all()), float(((got.double() - want64).abs() / ulp).max())


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 5, 7, 9), (17, 23)), ((1, 3, 16, 16), (64, 64)), ((1, 4, 9, 13), (4, 5)), ((1, 2, 1, 1), (3, 5)),
     ((1, 3, 5, 5), (5, 5)), ((2, 37, 8, 6), (16, 12)), ((1, 2, 6, 7), (1, 1))],
)  # fmt: skip
@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.float32, None), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, None), (torch.float16, None)])  # fmt: skip
def test_bilinear_equals_interpolate(shape, size, layout, dtype, out_dtype):
    """Up and down, by integer and other ratios, from one pixel, to one pixel and to the same size, from NCHW, NHWC
    and strided maps, into the input's dtype or float32, in the input's layout: F.interpolate's values (computed in
    float64 from the same inputs) within the output dtype's rounding."""
    x = _map(*shape, dtype, layout)
    got = resample.bilinear(x, size, dtype=out_dtype)
    want = F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False)
    assert got.shape == want.shape
    _check_rounded(got, want, out_dtype or dtype)
    nhwc = layout == "nhwc" and shape[2] * shape[3] > 1  # as F.interpolate: a one-pixel map counts as NCHW
    assert got.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def test_bilinear_into_takes_any_output_strides_and_int64_offsets(monkeypatch):
    """Into a strided view of a wider buffer (the others untouched), and with int64 offsets (WIDE_FROM lowered so
    that these small maps take that path): the same values."""
    x = _map(2, 6, 5, 7, torch.float32, "nchw")
    buffer = torch.full((2, 9, 11, 13), 7.0, device=DEVICE)
    resample.bilinear_into(buffer[:, 2:8], x)
    want = F.interpolate(x, size=(11, 13), mode="bilinear", align_corners=False)
    torch.testing.assert_close(buffer[:, 2:8], want, rtol=1e-6, atol=1e-6)
    assert bool((buffer[:, :2] == 7).all() and (buffer[:, 8:] == 7).all())
    monkeypatch.setattr(resample, "WIDE_FROM", 16)
    assert torch.equal(resample.bilinear(x, (11, 13)), buffer[:, 2:8].contiguous())


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("tile", [resample.Tiling(2, 4, 16, 4), resample.Tiling(4, 8, 8, 8),
                                  resample.Tiling(8, 2, 32, 2), resample.Tiling(1, 16, 4, 1)])  # fmt: skip
def test_bilinear_tilings_agree_bit_for_bit(tile, layout):
    """Several rows a program (output heights that are not a multiple of them), blocks smaller than the channels and
    columns, other warps: the default tiling's values bit for bit (an output element depends on its inputs alone)."""
    x = _map(2, 11, 5, 7, torch.bfloat16, layout, seed=2)
    out = torch.empty(2, 11, 13, 19, device=DEVICE)  # NCHW float32, the logits' way
    want = resample.bilinear_into(torch.empty_like(out), x)
    assert torch.equal(resample.bilinear_into(out, x, tile), want)
    _check_rounded(want, F.interpolate(x.double(), size=(13, 19), mode="bilinear", align_corners=False), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 5, 7, 9), (17, 23)), ((1, 3, 4, 4), (16, 16)), ((1, 4, 9, 13), (4, 5)), ((1, 2, 1, 1), (3, 5)),
     ((1, 3, 5, 5), (5, 5)), ((1, 2, 6, 7), (1, 1)), ((1, 3, 2, 3), (19, 2))],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bilinear_backward_equals_autograd(shape, size, layout, dtype):
    """Up (4x, the loss's ratio, and others), down, from and to one pixel, the same size, one axis up and the other
    down: the gradient F.interpolate's backward gives (float64 here) within the dtype's rounding, in the layout
    asked for."""
    x = _map(*shape, torch.float64, "nchw").requires_grad_()
    grad = _map(shape[0], shape[1], *size, dtype, layout, seed=8)
    F.interpolate(x, size=size, mode="bilinear", align_corners=False).backward(grad.double())
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    got = resample.bilinear_backward(grad, shape, fmt)
    assert got.shape == shape and got.dtype == dtype and got.is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match=r"bilinear_backward: size must be the input's \(N, C, H, W\)"):
        resample.bilinear_backward(grad, (shape[0], shape[1], 2.5, 3), fmt)
    with pytest.raises(ValueError, match="bilinear_backward: dtype must be a floating-point dtype, got torch.int32"):
        resample.bilinear_backward(grad, shape, fmt, torch.int32)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), x.grad, rtol=1e-5, atol=1e-5 * float(x.grad.abs().max()))
    else:
        _check_rounded(got, x.grad, dtype)


def _pool_in_aten_order(x: torch.Tensor, s: int) -> torch.Tensor:
    """The window summed in float32 row by row, left to right, divided by s * s, rounded once (ATen's kernels)."""
    n, c, h, w = x.shape
    v = x.float()[:, :, : h // s * s, : w // s * s]
    total = torch.zeros(n, c, h // s, w // s, device=x.device)
    for i in range(s):
        for j in range(s):
            total = total + v[:, :, i::s, j::s]
    return (total / (s * s)).to(x.dtype)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(("shape", "s"), [((2, 5, 8, 9), 2), ((1, 16, 8, 8), 2), ((1, 3, 7, 10), 3),
                                          ((2, 33, 5, 4), 2), ((1, 4, 2, 2), 2)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_avg_pool_equals_avg_pool2d(shape, s, layout, dtype):
    """Odd sizes (floored), windows of 2 and 3, NCHW, NHWC and strided maps: ATen's sum in its order, bit for bit
    (bfloat16 within its rounding under the interpreter), and F.avg_pool2d within the dtype's rounding."""
    x = _map(*shape, dtype, layout, seed=1)
    got = resample.avg_pool(x, s)
    exact = _pool_in_aten_order(x, s)
    if dtype == torch.bfloat16 and not x.is_cuda:
        _check_rounded(got, exact.double(), dtype)
    else:
        assert torch.equal(got, exact)
    _check_rounded(got, F.avg_pool2d(x.double(), s), dtype)
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def test_resample_rejects_bad_input():
    x = _map(1, 3, 4, 4, torch.float32, "nchw")
    with pytest.raises(ValueError, match=r"bilinear: expected a \(N, C, H, W\) floating-point tensor"):
        resample.bilinear(x[0], (8, 8))
    with pytest.raises(ValueError, match="avg_pool: expected .* got torch.int64"):
        resample.avg_pool(x.long(), 2)
    with pytest.raises(ValueError, match="smaller than the 5x5 window"):
        resample.avg_pool(x, 5)
    with pytest.raises(ValueError, match="s must be a positive int"):
        resample.avg_pool(x, 0)
    with pytest.raises(ValueError, match="s must be a positive int, got True"):
        resample.avg_pool(x, True)
    for size in ((8,), (8, 0), (8, 2.0), (8, 8, 8)):
        with pytest.raises(ValueError, match=r"bilinear: size must be \(height, width\), two positive ints"):
            resample.bilinear(x, size)
    with pytest.raises(ValueError, match=r"bilinear_into: \(1, 3, 4, 4\) torch.float32 on .* does not fit \(1, 2, "):
        resample.bilinear_into(torch.empty(1, 2, 8, 8, device=DEVICE), x)
    with pytest.raises(ValueError, match=r"height_pass: narrow must be a float32 \(N, C, B, W\) map .* got "
                                         r"torch.float32 \(1, 3, 4, 4\) on .* and \(1, 3, 8, 5\)"):  # fmt: skip
        resample.height_pass(x, torch.empty(1, 3, 8, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"tiling must hold powers of two .* got Tiling\(rows=3"):
        resample.bilinear_into(torch.empty(1, 3, 8, 8, device=DEVICE), x, resample.Tiling(3, 4, 4, 4))
    with pytest.raises(ValueError, match=r"add_nearest_: .* torch.float64 .* \(same N, C, dtype and device expected\)"):
        resample.add_nearest_(x, x.double())
    with pytest.raises(ValueError, match=r"add_nearest_: an empty map \(1, 3, 0, 4\) has nothing to give"):
        resample.add_nearest_(x, x[:, :, :0])


def test_empty_maps_launch_nothing(monkeypatch):
    """A batch of no images or maps of no channels: every kernel returns an empty result of the right shape and dtype
    (ATen's, for no images; ATen refuses no channels) without a launch (a grid of no programs is an error on CUDA)."""
    forbid_launches(monkeypatch, resample)
    for shape in ((0, 3, 4, 6), (2, 0, 4, 6)):
        for layout in ("nchw", "nhwc"):
            x = _map(*shape, torch.float32, layout)
            got, pooled = resample.bilinear(x, (8, 12)), resample.avg_pool(x, 2)
            assert got.shape == (*shape[:2], 8, 12) and pooled.shape == (*shape[:2], 2, 3)
            assert got.dtype == pooled.dtype == torch.float32
            if shape[0] == 0:  # ATen refuses maps of no channels ("Non-empty 4D data tensor expected")
                assert got.shape == F.interpolate(x, size=(8, 12), mode="bilinear", align_corners=False).shape
                assert pooled.shape == F.avg_pool2d(x, 2).shape
            grad = resample.bilinear_backward(got, shape, dtype=torch.float16)
            assert grad.shape == shape and grad.dtype == torch.float16
            assert resample.avg_pool_backward(pooled, shape, 2).shape == shape
            finer = torch.empty_like(got)
            assert resample.add_nearest_(finer, x) is finer and resample.add_bilinear_(finer, x) is finer
            assert resample.bilinear_into(torch.empty_like(got), x).shape == got.shape


def _with_kernels_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_resample, "DEVICE_TYPES", (DEVICE,))


def test_usable_falls_back_where_it_must(monkeypatch):
    """Gradients needed, a recorded call (a dispatch mode), an integer map and the switch take PyTorch's ops."""
    from torch.utils.flop_counter import FlopCounterMode

    _with_kernels_here(monkeypatch)
    x = _map(1, 3, 4, 4, torch.float32, "nchw")
    assert cuda_resample.usable(x)
    assert not cuda_resample.usable(x.clone().requires_grad_())
    assert not cuda_resample.usable(x.long())
    with FlopCounterMode(display=False):
        assert not cuda_resample.usable(x)
    monkeypatch.setenv("DENSECLIP_FAST_TRITON_RESAMPLE", "0")
    assert not cuda_resample.usable(x)
    monkeypatch.setattr(cuda_resample, "DEVICE_TYPES", ("no-such-device",))
    monkeypatch.delenv("DENSECLIP_FAST_TRITON_RESAMPLE")
    assert not cuda_resample.usable(x)


def test_resized_takes_the_kernel_where_usable(monkeypatch):
    """engine.segmenter.resized on a device the kernels serve: float32 NCHW planes from bfloat16 NHWC scores (no
    copy first), into a given buffer too, equal to the plain path's within float32 rounding."""
    scores = _map(2, 5, 6, 7, torch.bfloat16, "nhwc")
    plain = resized(scores, (13, 17))
    _with_kernels_here(monkeypatch)
    calls = []
    real = resample.bilinear_into
    monkeypatch.setattr(resample, "bilinear_into", lambda out, x: calls.append(x) or real(out, x))
    got = resized(scores, (13, 17))
    buffer = torch.empty(2 * 5 * 13 * 17, device=DEVICE)
    into = resized(scores, (13, 17), buffer)
    assert len(calls) == 2 and all(c is scores for c in calls)
    assert got.dtype == torch.float32 and got.is_contiguous() and into.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(into, got)


def test_resized_through_reads_the_scores_as_they_are(monkeypatch):
    """The logits' finish on a device the kernels serve: the first resize reads the head's bfloat16 NHWC map itself
    (no float32 copy made first, which the engine had made before every logits call), a second one the float32
    planes of the first; the same values as resizing a float32 NCHW copy (the bfloat16 values convert exactly) and,
    within float32 rounding, as the plain path; an empty map and no size at all keep the copy."""
    scores = _map(2, 5, 6, 7, torch.bfloat16, "nhwc", seed=10)
    plain = resized_through(scores, (13, 17), (9, 11))
    _with_kernels_here(monkeypatch)
    calls = []
    real = resample.bilinear_into
    monkeypatch.setattr(resample, "bilinear_into", lambda out, x: calls.append(x) or real(out, x))
    got = resized_through(scores, (13, 17), (9, 11))
    assert len(calls) == 2 and calls[0] is scores
    assert calls[1].dtype == torch.float32 and calls[1].shape == (2, 5, 13, 17) and calls[1].is_contiguous()
    assert got.dtype == torch.float32 and got.shape == (2, 5, 9, 11) and got.is_contiguous()
    copied = scores.to(torch.float32, memory_format=torch.contiguous_format)
    assert torch.equal(got, resized_through(copied, (13, 17), (9, 11)))
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    calls.clear()
    same = resized_through(scores)
    assert not calls and same.dtype == torch.float32 and same.is_contiguous() and torch.equal(same, copied)
    empty = resized_through(scores[:0], (13, 17))
    assert not calls and empty.shape == (0, 5, 13, 17) and empty.dtype == torch.float32


def test_swap_resamplings_keeps_the_model_function(monkeypatch):
    """A tiny RN model: the stem's and the strided blocks' average poolings (and their shortcuts'), the unstrided
    shortcut's AvgPool2d(1) (an identity), the FPN head's six 2x upsamplings, the FPN (its three top-down steps)
    and the head (its levels' last upsamplings added in place) swapped; its logits as before (1e-5), through the
    kernels (three of the upsamplings in the head's fused sums); a second swap changes nothing."""
    from denseclip_fast.engine.rewrite import prepare_for_inference

    _with_kernels_here(monkeypatch)
    model = prepare_for_inference(randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval(),
                                  torch.device(DEVICE), torch.float32)  # fmt: skip
    x = torch.randn(1, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    text = model.text_features(NAMES)
    with torch.no_grad():
        want = model.logits_for(x, text, None)
        ups = sum(type(m) is Upsample2x for m in model.modules())
        assert cuda_resample.swap_resamplings(model) == ups + 8 + 2 and ups == 6
        assert isinstance(model.neck, cuda_resample.TritonFPN)
        assert isinstance(model.decode_head, cuda_resample.TritonSemanticFPNHead)
        assert cuda_resample.swap_resamplings(model) == 0
        pools = [m for m in model.modules() if isinstance(m, cuda_resample.TritonAvgPool2d)]
        assert len(pools) == 7 and not any(type(m) is torch.nn.AvgPool2d for m in model.modules())
        calls = []
        real_pool, real_up, real_add = resample.avg_pool, resample.bilinear, resample.add_nearest_
        real_sum = resample.add_bilinear_
        monkeypatch.setattr(resample, "avg_pool", lambda *a: calls.append("pool") or real_pool(*a))
        monkeypatch.setattr(resample, "bilinear", lambda *a, **k: calls.append("up") or real_up(*a, **k))
        monkeypatch.setattr(resample, "add_nearest_", lambda *a: calls.append("add") or real_add(*a))
        monkeypatch.setattr(resample, "add_bilinear_", lambda *a: calls.append("sum") or real_sum(*a))
        got = model.logits_for(x, text, None)
    assert calls.count("pool") == 7 and calls.count("up") == 3 and calls.count("add") == 3
    assert calls.count("sum") == 3
    assert rel_err(got, want) <= 1e-5


def test_upsampling_follows_autocast_and_trains_through_the_kernels(monkeypatch):
    """TritonUpsample2x as F.interpolate under autocast on CUDA (its policy emulated here: a float32 result from a
    bfloat16 map), with and without a gradient: the kernels' result in float32, equal to F.interpolate of the map in
    float32; the gradient in the map's dtype and layout, the Triton backward's; the FPN's in-place step declines
    under that policy (the model's sum is float32 there)."""
    _with_kernels_here(monkeypatch)
    monkeypatch.setattr(cuda_resample, "_autocast_resize_dtype", lambda device, dtype, autocast: torch.float32)
    calls = []
    real = resample.bilinear_backward
    monkeypatch.setattr(resample, "bilinear_backward", lambda *a: calls.append(a[3]) or real(*a))
    up = cuda_resample.TritonUpsample2x()
    x = _map(2, 5, 4, 6, torch.bfloat16, "nhwc", seed=9)
    want = F.interpolate(x.float(), size=(8, 12), mode="bilinear", align_corners=False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with torch.no_grad():
            plain = up(x)
        leaf = x.detach().requires_grad_()
        out = up(leaf)
        finer, coarser = _map(1, 3, 8, 8, torch.bfloat16, "nhwc"), _map(1, 3, 4, 4, torch.bfloat16, "nhwc")
        fpn = cuda_resample.TritonFPN.__new__(cuda_resample.TritonFPN)
        steps = []
        real_step = resample.add_nearest_
        monkeypatch.setattr(resample, "add_nearest_", lambda *a: steps.append(1) or real_step(*a))
        cuda_resample.TritonFPN.add_upsampled(fpn, finer.clone(), coarser)
        assert steps == []  # declined: the model's resize and sum (float32 under that policy)
    with torch.no_grad():
        cuda_resample.TritonFPN.add_upsampled(fpn, finer.clone(), coarser)
    assert steps == [1]  # and taken outside autocast
    assert plain.dtype == out.dtype == torch.float32
    torch.testing.assert_close(plain, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.detach(), want, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = x.float().requires_grad_()
    F.interpolate(ref, size=(8, 12), mode="bilinear", align_corners=False).backward(grad)
    assert calls == [torch.bfloat16] and leaf.grad.dtype == torch.bfloat16
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last)
    _check_rounded(leaf.grad, ref.grad.double(), torch.bfloat16)


def test_a_training_step_through_the_swapped_resamplings(monkeypatch):
    """The trainer's swap (the poolings and the FPN head's upsamplings; the FPN stays the model's) on a tiny RN model
    in training mode: the loss and every parameter's gradient as the unswapped model's (1e-5), the Triton backward
    called once a pooling (7) and once an upsampling (6)."""
    import copy

    _with_kernels_here(monkeypatch)
    model = randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).train()
    swapped = copy.deepcopy(model)
    assert cuda_resample.swap_resamplings(swapped, trainable_only=True) == 14  # and the AvgPool2d(1)
    assert type(swapped.neck) is type(model.neck)
    assert sum(isinstance(m, cuda_resample.TritonUpsample2x) for m in swapped.modules()) == 6
    calls = []
    real, real_up = resample.avg_pool_backward, resample.bilinear_backward
    monkeypatch.setattr(resample, "avg_pool_backward", lambda *a: calls.append("pool") or real(*a))
    monkeypatch.setattr(resample, "bilinear_backward", lambda *a: calls.append("up") or real_up(*a))
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    losses = []
    for net in (model, swapped):
        net.to(DEVICE)
        torch.manual_seed(0)  # the same dropout masks
        feats = net.extract(x)
        logits, score = net.logits_and_score(feats, net.context_prompt(feats, net.class_embeddings()), None)
        loss = logits.square().mean() + score.square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert calls.count("pool") == 7 and calls.count("up") == 6
    assert rel_err(losses[1], losses[0]) <= 1e-5
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    floor = 1e-6 * max(float(g.abs().max()) for g in grads.values())  # (a key bias's gradient is 0 but rounding)
    for name, p in swapped.named_parameters():
        if p.grad is not None or name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=floor, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: ATen's CUDA kernels are the comparison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_equal_aten_on_cuda(dtype):
    """On a GPU, at the engine's shapes (RN50 512x512: the logits 150 x 128x128 to 512x512 in float32 from an NHWC
    map, the FPN's 2x upsampling of 128 channels, the ResNet's 2x2 poolings, the FPN's top-down steps) and odd ones:
    the pooling and the top-down step equal ATen's bit for bit, the head's fused sum the Triton resize followed by
    ATen's addition; the resize ATen's within 2 units in the last place, and equal in most elements."""
    for shape, size, out_dtype in (((1, 150, 128, 128), (512, 512), torch.float32), ((2, 128, 16, 16), (32, 32), None),
                                   ((3, 7, 13, 11), (29, 5), None)):  # fmt: skip
        for layout in ("nchw", "nhwc"):
            x = _map(*shape, dtype, layout)
            got = resample.bilinear(x, size, dtype=out_dtype)
            want = F.interpolate(x, size=size, mode="bilinear", align_corners=False).to(out_dtype or dtype)
            assert got.stride() == want.stride(), (shape, layout)
            ulp = (2.0**-23 if (out_dtype or dtype) == torch.float32 else ULP[out_dtype or dtype]) * 2
            diff = (got.double() - want.double()).abs()
            assert bool((diff <= ulp * want.double().abs().clamp_min(2.0**-14)).all()), (shape, layout)
            assert float((diff == 0).double().mean()) >= 0.9, (shape, layout)
    for shape, size in (((1, 150, 128, 128), (512, 512)), ((2, 7, 13, 11), (29, 5))):  # the loss's resize gradient
        for layout in ("nchw", "nhwc"):
            leaf = _map(*shape, torch.float64, layout).requires_grad_()  # the gradient in float64 by ATen's CUDA
            grad = _map(shape[0], shape[1], *size, dtype, layout, seed=3)
            F.interpolate(leaf, size=size, mode="bilinear", align_corners=False).backward(grad.double())
            got = resample.bilinear_backward(grad, shape, resample.layout_of(leaf))
            assert got.stride() == leaf.grad.stride(), (shape, layout)
            _check_rounded(got, leaf.grad, dtype)  # float32: 1e-6 of the largest; 16-bit: one unit, rounded once
    for shape in ((1, 64, 128, 128), (2, 256, 33, 31), (1, 3, 8, 8)):
        for layout in ("nchw", "nhwc"):
            x = _map(*shape, dtype, layout)
            got, want = resample.avg_pool(x, 2), F.avg_pool2d(x, 2)
            assert got.stride() == want.stride() and torch.equal(got, want), (shape, layout)
            leaf = x.detach().requires_grad_()
            F.avg_pool2d(leaf, 2).backward(want)  # (the pooled map as the gradient: any map of its shape)
            got = resample.avg_pool_backward(want, x.shape, 2, resample.layout_of(x))
            assert got.stride() == leaf.grad.stride() and torch.equal(got, leaf.grad), (shape, layout)
            coarser = _map(shape[0], shape[1], (shape[2] + 1) // 2, (shape[3] + 1) // 2, dtype, layout, seed=4)
            want = x + resample.bilinear(coarser, shape[2:])  # the head's sum: the Triton resize, ATen's addition
            assert torch.equal(resample.add_bilinear_(x.clone(), coarser), want), (shape, layout)
            want = x + F.interpolate(coarser, size=shape[2:], mode="nearest")
            assert torch.equal(resample.add_nearest_(x, coarser), want), (shape, layout)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(("shape", "s"), [((2, 5, 8, 9), 2), ((1, 3, 7, 10), 3), ((2, 33, 5, 4), 2),
                                          ((1, 4, 2, 2), 2)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_avg_pool_backward_equals_aten(shape, s, layout, dtype):
    """Odd sizes (the rows and columns no window covers get zero), windows of 2 and 3, any layout of the output's
    gradient: ATen's avg_pool2d backward, bit for bit where the interpreter rounds as a GPU (bfloat16 within its
    rounding); the result in the layout asked for."""
    x = _map(*shape, dtype, layout, seed=5)
    n, c, h, w = shape
    grad = _map(n, c, h // s, w // s, dtype, layout, seed=6)
    leaf = x.detach().requires_grad_()
    F.avg_pool2d(leaf, s).backward(grad)
    fmt = resample.layout_of(x)
    got = resample.avg_pool_backward(grad, x.shape, s, fmt)
    assert got.shape == x.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=fmt)
    if dtype == torch.bfloat16 and not x.is_cuda:
        _check_rounded(got, leaf.grad.double(), dtype)
    else:
        assert torch.equal(got, leaf.grad)
    with pytest.raises(ValueError, match=r"avg_pool_backward: grad \(.*\) is not the gradient of a"):
        resample.avg_pool_backward(grad[:, 1:], x.shape, s)
    with pytest.raises(ValueError, match=r"avg_pool_backward: s must be a positive int, got 0"):
        resample.avg_pool_backward(grad, x.shape, 0)
    with pytest.raises(ValueError, match=r"avg_pool_backward: size must be the input's \(N, C, H, W\)"):
        resample.avg_pool_backward(grad, x.shape[1:], s)


def test_avg_pool_trains_through_the_kernels(monkeypatch):
    """TritonAvgPool2d where autograd records the call: the Triton forward and backward (each called), the values and
    the gradient of F.avg_pool2d; a second derivative through it raises instead of being silently wrong; under a
    recording mode, or switched off, PyTorch's pooling."""
    from torch.utils.flop_counter import FlopCounterMode

    _with_kernels_here(monkeypatch)
    calls = []
    real_fwd, real_bwd = resample.avg_pool, resample.avg_pool_backward
    monkeypatch.setattr(resample, "avg_pool", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(resample, "avg_pool_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    pool = cuda_resample.TritonAvgPool2d(2)
    x = _map(2, 6, 7, 8, torch.float32, "nhwc", seed=7).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    out = pool(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    F.avg_pool2d(ref, 2).backward(grad)
    assert calls == ["fwd", "bwd"]
    assert torch.equal(out, F.avg_pool2d(ref, 2)) and torch.equal(x.grad, ref.grad)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    out = pool(x)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), x)
    calls.clear()
    with FlopCounterMode(display=False):
        pool(x).sum().backward()
    monkeypatch.setenv("DENSECLIP_FAST_TRITON_RESAMPLE", "0")
    pool(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(("shape", "coarse"), [((2, 6, 8, 10), (4, 5)), ((1, 5, 7, 9), (3, 4)), ((1, 3, 5, 5), (5, 5)),
                                               ((1, 4, 6, 6), (1, 1))])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_nearest_equals_the_fpn_step(shape, coarse, layout, dtype):
    """The FPN's top-down step in place: finer + F.interpolate(coarser, nearest) as ATen computes it (each sum in
    float32, rounded once), bit for bit (bfloat16 within its rounding under the interpreter), at 2x, other ratios,
    the same size and from one pixel; the finer map's memory is the result's."""
    finer = _map(*shape, dtype, layout, seed=2)
    coarser = _map(shape[0], shape[1], *coarse, dtype, layout, seed=3)
    want = (finer.float() + F.interpolate(coarser.float(), size=shape[2:], mode="nearest")).to(dtype)
    ptr = finer.data_ptr()
    got = resample.add_nearest_(finer, coarser)
    assert got is finer and got.data_ptr() == ptr
    if dtype == torch.bfloat16 and not finer.is_cuda:
        _check_rounded(got, want.double(), dtype)
    else:
        assert torch.equal(got, want)


def _added(finer: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """finer + up (one dtype) as ATen adds them, in float32 rounded once; under the interpreter, which rounds float32
    to bfloat16 by truncation, bfloat16 sums truncated as it rounds them."""
    if finer.dtype == torch.bfloat16 and not finer.is_cuda:
        total = finer.float() + up.float()
        return (total.view(torch.int32) & -(2**16)).view(torch.float32).to(torch.bfloat16)  # (exact: no low bits)
    return finer + up


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
@pytest.mark.parametrize(("shape", "coarse"), [((2, 6, 8, 10), (4, 5)), ((1, 5, 9, 13), (5, 7)), ((1, 3, 7, 9), (5, 4)),
                                               ((1, 4, 6, 6), (1, 1)), ((1, 3, 5, 5), (5, 5)),
                                               ((2, 3, 1, 1), (3, 2))])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_bilinear_equals_the_head_sum(shape, coarse, layout, dtype):
    """The Semantic FPN head's sum in place: finer + resample.bilinear(coarser, finer's size) (ATen's addition of the
    resize rounded to the dtype), bit for bit (bfloat16 sums as the interpreter rounds them, and within one unit of
    ATen's), at 2x, odd sizes, non-integer ratios, from one pixel, the same size and down to one pixel; the finer
    map's memory is the result's."""
    finer = _map(*shape, dtype, layout, seed=2)
    coarser = _map(shape[0], shape[1], *coarse, dtype, layout, seed=3)
    up = resample.bilinear(coarser, shape[2:])
    want, aten = _added(finer, up), finer + up
    ptr = finer.data_ptr()
    got = resample.add_bilinear_(finer, coarser)
    assert got is finer and got.data_ptr() == ptr and torch.equal(got, want)
    if dtype == torch.bfloat16 and not finer.is_cuda:
        _check_rounded(got, aten.double(), dtype)  # and within a unit of ATen's rounding


def test_add_bilinear_takes_int64_offsets_and_rejects_bad_input(monkeypatch):
    """With int64 offsets (WIDE_FROM lowered so that these small maps take that path), into a channel slice of a
    wider map (the others untouched): the same sums; maps that do not fit raise ValueErrors that name it."""
    finer = _map(2, 5, 7, 9, torch.float16, "nhwc", seed=4)
    coarser = _map(2, 5, 4, 5, torch.float16, "nhwc", seed=5)
    want = _added(finer, resample.bilinear(coarser, (7, 9)))
    monkeypatch.setattr(resample, "WIDE_FROM", 16)
    wide = []
    real = resample.profiled

    class Launch:  # profiled(kernel)[grid](..., WIDE=...): what the launch was given
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            run = real(self.kernel)[grid]
            return lambda *args, **kwargs: wide.append(kwargs["WIDE"]) or run(*args, **kwargs)

    monkeypatch.setattr(resample, "profiled", Launch)
    assert torch.equal(resample.add_bilinear_(finer.clone(), coarser), want) and wide == [True]
    buffer = torch.full((2, 8, 7, 9), 7.0, device=DEVICE, dtype=torch.float16)
    buffer[:, 2:7] = finer
    resample.add_bilinear_(buffer[:, 2:7], coarser)
    assert torch.equal(buffer[:, 2:7], want) and bool((buffer[:, :2] == 7).all() and (buffer[:, 7:] == 7).all())
    x = _map(1, 3, 4, 4, torch.float32, "nchw")
    with pytest.raises(ValueError, match=r"add_bilinear_: .* torch.float64 .* \(same N, C, dtype and device expect"):
        resample.add_bilinear_(x, x.double())
    with pytest.raises(ValueError, match=r"add_bilinear_: \(1, 2, 2, 2\) .* does not fit \(1, 3, 4, 4\)"):
        resample.add_bilinear_(x, x[:, :2, :2, :2])
    with pytest.raises(ValueError, match=r"add_bilinear_: an empty map \(1, 3, 0, 4\) has nothing to give"):
        resample.add_bilinear_(x, x[:, :, :0])
    with pytest.raises(ValueError, match=r"add_bilinear_: expected a \(N, C, H, W\) floating-point tensor"):
        resample.add_bilinear_(x[0], x)
    with pytest.raises(ValueError, match=r"add_bilinear_: expected .* got torch.int64"):
        resample.add_bilinear_(x.long(), x.long())


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The standalone resizes ("up") and the head's fused sums ("sum") called from now on, in order."""
    calls: list[str] = []
    real_up, real_sum = resample.bilinear, resample.add_bilinear_
    monkeypatch.setattr(resample, "bilinear", lambda *a, **k: calls.append("up") or real_up(*a, **k))
    monkeypatch.setattr(resample, "add_bilinear_", lambda *a: calls.append("sum") or real_sum(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="the interpreter truncates bfloat16 where ATen's sum rounds"))])  # fmt: skip
def test_the_swapped_head_sums_as_the_model_head(monkeypatch, dtype):
    """A tiny RN engine: the swapped head's logits equal, bit for bit, those of the same Triton engine with the
    model's head forward (each level's Triton upsampling written, then ATen's sum); three of the six upsamplings
    become fused sums."""
    from denseclip_fast.engine.rewrite import prepare_for_inference
    from denseclip_fast.model.heads import SemanticFPNHead

    _with_kernels_here(monkeypatch)
    model = prepare_for_inference(randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval(),
                                  torch.device(DEVICE), dtype)  # fmt: skip
    cuda_resample.swap_resamplings(model)
    x = torch.randn(1, 3, 64, 64, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    text = model.text_features(NAMES)
    calls = _counted(monkeypatch)
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(cuda_resample.TritonSemanticFPNHead, "forward", SemanticFPNHead.forward)
            want = model.logits_for(x, text, None)
        assert calls == ["up"] * 6
        calls.clear()
        got = model.logits_for(x, text, None)
    assert calls.count("up") == 3 and calls.count("sum") == 3
    assert got.dtype == want.dtype and torch.equal(got, want)


def _head(first: torch.nn.Module | None = None) -> cuda_resample.TritonSemanticFPNHead:
    """A swapped Semantic FPN head of 4 channels and 3 classes (random BatchNorm statistics), in eval mode; ``first``
    its first scale head where given."""
    from denseclip_fast.model.heads import SemanticFPNHead

    torch.manual_seed(0)
    head = SemanticFPNHead(4, 4, 3).to(DEVICE)
    if first is not None:
        head.scale_heads[0] = first
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    root = torch.nn.ModuleList([head]).eval()
    assert cuda_resample.swap_resamplings(root) == 1 + 6
    return typing.cast(cuda_resample.TritonSemanticFPNHead, root[0])


def _levels(sides: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [_map(2, 4, s, s, dtype, "nhwc", seed=20 + i) for i, s in enumerate(sides)]


def test_the_swapped_head_takes_the_model_step_where_it_must(monkeypatch):
    """The head's fallbacks, each the model's forward over the same modules (equal values): sides whose doubling
    misses the first level's (a 72-pixel image's 18, 9, 5, 3: the first of the three levels fused, the others
    upsampled then resized as the model does), gradients recorded (none fused; the backward runs), CUDA's autocast
    policy (a float32 resize: none fused), a first scale head that returns its input (not written in place: the
    second level's sum is the model's new map, into which the last two levels are then fused; the input
    unchanged)."""
    from denseclip_fast.model.heads import SemanticFPNHead

    _with_kernels_here(monkeypatch)
    head = _head()
    calls = _counted(monkeypatch)
    with torch.no_grad():
        levels = _levels((18, 9, 5, 3))
        want = SemanticFPNHead.forward(head, levels)
        calls.clear()
        assert torch.equal(head(levels), want) and calls == ["sum", "up", "up", "up", "up", "up"]
    calls.clear()
    levels = _levels((16, 8, 4, 2))
    got, want = head(levels), SemanticFPNHead.forward(head, levels)
    assert got.requires_grad and "sum" not in calls and torch.equal(got, want)
    got.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    monkeypatch.setattr(cuda_resample, "_autocast_resize_dtype", lambda device, dtype, autocast: torch.float32)
    calls.clear()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = head(levels), SemanticFPNHead.forward(head, levels)
    assert "sum" not in calls and got.dtype == want.dtype and torch.equal(got, want)
    monkeypatch.undo()
    _with_kernels_here(monkeypatch)
    calls = _counted(monkeypatch)
    same = _head(torch.nn.Identity())
    with torch.no_grad():
        levels = _levels((16, 8, 4, 2))
        first = levels[0].clone()
        got = same(levels)
        assert calls == ["up", "up", "sum", "up", "up", "sum"] and torch.equal(levels[0], first)
        assert torch.equal(got, SemanticFPNHead.forward(same, levels))
        calls.clear()
        assert torch.equal(_head()(levels), SemanticFPNHead.forward(_head(), levels)) and calls.count("sum") == 3


def test_the_head_fuses_only_into_a_map_of_its_own(monkeypatch):
    """TritonSemanticFPNHead.fusable: a dense map of twice small's size, of its dtype, sharing no memory with the
    levels or small; not a broadcast view (an element stored twice), a level or a view of one, another dtype,
    another size."""
    _with_kernels_here(monkeypatch)
    fusable = cuda_resample.TritonSemanticFPNHead.fusable
    levels = _levels((8, 4))
    out, small = _map(2, 4, 8, 8, torch.float32, "nhwc", seed=30), levels[1]
    assert fusable(out, small, levels) and fusable(out.contiguous(), small, levels)
    assert not fusable(out[:, :1, :1, :1].expand(2, 4, 8, 8), small, levels)
    assert not fusable(out[:, :, :1].expand(2, 4, 8, 8), small, levels)
    assert not fusable(levels[0], small, levels) and not fusable(levels[0][:, :, :], small, levels)
    assert not fusable(out, small.double(), levels) and not fusable(out[:, :, :7], small, levels)
    assert not fusable(out, out[:, :, :4, :4], levels)

"""The fused operators against their specification (denseclip_fast/ops/reference.py), on every backend this
machine can run: the C++ CPU kernels, the Triton kernels (under TRITON_INTERPRET=1 without a GPU) and the
reference itself. Comparisons are made against the reference in float64.

Tolerances (relative error, norm of the difference over the norm of the float64 result): float64 1e-10, float32
1e-5, float16 2e-3, bfloat16 2e-2; gradients 2x (attention 4x) that; an absolute floor of one tolerance per element
for results that are exactly zero.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denseclip_fast import ops
from denseclip_fast.ops import reference
from denseclip_fast.ops.library import score_memory_format

from .conftest import spy_launches, spy_score_plans, torch_threads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
BACKEND_DTYPES = [
    ("cpu", torch.float64), ("cpu", torch.float32), ("cpu", torch.float16), ("cpu", torch.bfloat16),
    ("triton", torch.float32), ("triton", torch.float16), ("triton", torch.bfloat16),
    ("reference", torch.float32),
]  # fmt: skip
if DEVICE == "cuda":
    BACKEND_DTYPES = [("cuda" if b == "cpu" else b, d) for b, d in BACKEND_DTYPES]

# (B, C, H, W, K): odd sizes, K=1, H*W=1, B=1, C and K past one block, C below one block
SCORE_SHAPES = [(1, 1, 1, 1, 1), (2, 33, 5, 7, 1), (1, 130, 9, 13, 3), (3, 7, 1, 1, 70), (2, 64, 4, 4, 150),
                (1, 40, 3, 5, 300)]  # fmt: skip
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    """||actual - expected|| <= factor x TOL[dtype] x ||expected||: an error relative to the result. A result that
    is zero but for float64 rounding (the gradient of a 1-channel normalisation, of the keys of a softmax over one
    key) is compared with a floor of one tolerance per element instead: what is left there is rounding noise, whose
    size is the summed terms', not the result's. (A floor for every result let a bfloat16 gradient be several times
    its own size off: keys past the first block with dk = dv = 0 passed.)"""
    actual, expected = actual.double(), expected.double().to(actual.device)  # a CPU float64 result for a GPU's
    err, size = (actual - expected).norm().item(), expected.norm().item()
    floor = expected.numel() ** 0.5
    bound = factor * TOL[dtype] * (floor if size <= 1e-9 * floor else size)
    assert err <= bound, f"relative error {err / max(size, 1e-30):.3g} (bound {bound:.3g})"


def _leaf(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (float64 when asked) that records gradients."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_()


def _visual(b: int, c: int, h: int, w: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view that is neither NCHW- nor NHWC-contiguous
        x = torch.randn(b, c, h, 2 * w + 1, dtype=torch.float64)[..., 1::2]
    return x.to(DEVICE, dtype)


def _text(b: int, k: int, c: int, batched: bool, dtype: torch.dtype) -> torch.Tensor:
    shape = (b, k, c) if batched else (k, c)
    return torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype)


def _score_with_reference(
    visual: torch.Tensor, text: torch.Tensor, scale: float, backend: str, grad: torch.Tensor | None = None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """pixel_text_score of ``backend`` and of the float64 reference, each forward and backward with one gradient
    (random when None; the backend gets it in visual's dtype, its layout kept): (out, visual's and text's
    gradients) for each."""
    v64, t64 = _leaf(visual, torch.float64), _leaf(text, torch.float64)
    expected = reference.pixel_text_score(v64, t64, scale)
    grad = torch.randn_like(expected) if grad is None else grad
    expected.backward(grad.double())
    v, t = _leaf(visual), _leaf(text)
    out = ops.pixel_text_score(v, t, scale, backend=backend)
    out.backward(grad.to(visual.dtype))
    return (out, v.grad, t.grad), (expected, v64.grad, t64.grad)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES)
@pytest.mark.parametrize("batched", [False, True])
def test_pixel_text_score_forward_and_backward(backend, dtype, shape, batched):
    b, c, h, w, k = shape
    layout = LAYOUTS[(sum(shape) + batched) % 3]
    visual, text = _visual(b, c, h, w, layout, dtype), _text(b, k, c, batched, dtype)
    (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 0.5, backend)
    assert out.dtype == dtype and out.shape == (b, k, h, w)
    # every backend keeps visual's layout (the reference backend too, whose einsum chooses its own)
    nhwc = visual.is_contiguous(memory_format=torch.channels_last) and not visual.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    _check_close(out, expected, dtype)
    _check_close(v_grad, v64_grad, dtype, 2)
    _check_close(t_grad, t64_grad, dtype, 2)


@pytest.mark.parametrize("backend, dtype", [(b, d) for b, d in BACKEND_DTYPES if d in (torch.float16, torch.float32)])
@pytest.mark.parametrize("norm, scale, grad_size", [(1e-5, 1.0, 1.0), (1e-3, 100.0, 1.0), (1e3, 1.0, 1e-3)])
@pytest.mark.parametrize("k", [3, 300])  # the text half fused into the visual pass, and the GEMM past 256 classes
def test_score_text_gradient_at_extreme_pixel_norms(backend, dtype, norm, scale, grad_size, k):
    """Pixels of tiny norm (or a large scale) and of large norm with small gradients: Triton's float16 backward
    formed G * scale / |v| in float16, which overflowed past 65504 (clamped: the text gradient 30-70% off) or fell
    below its normal range (1.6% off). The text half uses v / |v| (in [-1, 1]) now."""
    visual = _visual(2, 16, 3, 4, "contiguous", torch.float64)
    visual = visual / visual.norm(dim=1, keepdim=True) * norm
    text = _text(2, k, 16, False, torch.float64)
    grad = torch.randn(2, k, 3, 4, dtype=torch.float64, device=DEVICE) * grad_size
    (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(
        visual.to(dtype), text.to(dtype), scale, backend, grad
    )
    _check_close(t_grad, t64_grad, dtype, 2)
    info, largest = torch.finfo(dtype), v64_grad.abs().max()
    if largest < info.tiny:  # G / |v| below float16's normal range: subnormals, each within one of their steps
        torch.testing.assert_close(v_grad.double(), v64_grad, rtol=0, atol=info.tiny * info.eps)
    elif largest < info.max:  # (G / |v| past float16's range is no float16 gradient)
        _check_close(v_grad, v64_grad, dtype, 2)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_score_concat(backend, dtype, layout):
    visual, text = _visual(2, 24, 5, 6, layout, dtype), _text(2, 7, 24, layout == "strided", dtype)
    feature = torch.randn(2, 9, 5, 6, dtype=torch.float64).to(DEVICE, dtype)
    f64, v64, t64 = (_leaf(x, torch.float64) for x in (feature, visual, text))
    expected = reference.score_concat(f64, v64, t64, 2.0)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    f, v, t = (_leaf(x) for x in (feature, visual, text))
    out = ops.score_concat(f, v, t, 2.0, backend=backend)
    out.backward(grad.to(dtype))
    assert out.shape == (2, 16, 5, 6)
    nhwc = visual.is_contiguous(memory_format=torch.channels_last) and not visual.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)  # visual's
    assert torch.equal(out[:, :9], feature)  # the feature channels are copied, not recomputed
    _check_close(out, expected, dtype)
    for actual, wanted in ((f.grad, f64.grad), (v.grad, v64.grad), (t.grad, t64.grad)):
        _check_close(actual, wanted, dtype, 2)


def test_the_triton_attention_takes_a_symbolic_batch_without_specialising_it():
    """AOTInductor compiles the Triton operator's body for a dynamic batch: range() over the symbolic batch x heads
    specialised the package to the traced batch (Eq(s0*h, 8)), which then returned a batch-2 result for any batch
    (a helper's reproduction with a stand-in operator on the CPU). A symbolic size is one piece, with no guard."""
    pytest.importorskip("triton")
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from denseclip_fast.ops.triton.attention import _bh_slices
    from denseclip_fast.ops.triton.score import _batch_pieces

    env = ShapeEnv()
    b = env.create_symintnode(env.create_symbol(3, ConstantSource("b"), dynamic_dim=DimDynamic.DYNAMIC), hint=3)
    (piece,) = _bh_slices(b * 4)
    assert piece.start == 0 and piece.stop is not None and not env.guards
    (piece,) = _batch_pieces(b)  # the score kernels' batch, likewise
    assert piece.start == 0 and piece.stop is b and not env.guards
    assert _bh_slices(12) == [slice(0, 12)] and len(_bh_slices(70000)) == 2


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES} - {"reference"}))
def test_score_concat_of_a_frozen_visual_and_text_runs_no_score_backward(backend):
    """Only the feature wants a gradient (a frozen backbone and contexts): its gradient is the first channels of
    grad, and the score backward, which cost 14x torch.cat's backward, is not run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    feature = torch.randn(2, 9, 5, 6, device=DEVICE, requires_grad=True)
    visual, text = torch.randn(2, 24, 5, 6, device=DEVICE), torch.randn(7, 24, device=DEVICE)
    out = ops.score_concat(feature, visual, text, 2.0, backend=backend)
    grad = torch.randn_like(out)
    with Calls() as calls:
        out.backward(grad)
    assert torch.equal(feature.grad, grad[:, :9])
    assert not any("score_backward" in name for name in calls.names), calls.names
    text.requires_grad_()  # and with one of them wanting it, the score backward runs
    ops.score_concat(feature, visual, text, 2.0, backend=backend).backward(grad)
    assert text.grad is not None and text.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
@pytest.mark.parametrize("grad_layout", ["channel slice", "channels_last", "padded rows", "W=1 transposed"])
def test_score_backward_takes_any_gradient_layout(backend, grad_layout):
    """The gradient arrives as a channel slice of score_concat's buffer (read in place), in NHWC (the layout of a
    channels_last model's scores), with padded rows, or with W = 1 and a stride on W that is not the pixel stride
    (the last three copied to NCHW first)."""
    w = 1 if grad_layout == "W=1 transposed" else 6
    visual, text = _visual(2, 20, 5, w, "contiguous", torch.float32), _text(2, 7, 20, False, torch.float32)
    if grad_layout == "channel slice":
        grad = torch.randn(2, 10, 5, w, device=DEVICE)[:, 3:]
    elif grad_layout == "W=1 transposed":
        grad = torch.randn(2, 7, 1, 5, device=DEVICE).transpose(2, 3)  # strides (35, 5, 1, 5)
    elif grad_layout == "channels_last":
        grad = torch.randn(2, 7, 5, w, device=DEVICE).contiguous(memory_format=torch.channels_last)
    else:
        grad = torch.randn(2, 7, 5, w + 2, device=DEVICE)[..., :w]  # padded rows: not one pixel stride apart
    # autograd hands the gradient's layout on to the backward as it is
    (_, v_grad, t_grad), (_, v64_grad, t64_grad) = _score_with_reference(visual, text, 2.0, backend, grad)
    _check_close(v_grad, v64_grad, torch.float32, 2)
    _check_close(t_grad, t64_grad, torch.float32, 2)


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_nan_spreads_as_in_the_reference(backend):
    """A NaN in one channel of one pixel makes that pixel's scores and visual gradient NaN, and every text gradient
    (a sum over the pixels), as F.normalize does: the kernels' max(|v|, eps) must keep NaN (compiled tl.maximum and
    fmaxf would not), or the pixel's gradient comes out finite and about 1e12 times too large."""
    visual, text = _visual(2, 6, 3, 3, "contiguous", torch.float32), _text(2, 4, 6, False, torch.float32)
    visual[1, 2, 0, 1] = float("nan")
    for actual, wanted in zip(*_score_with_reference(visual, text, 2.0, backend)):
        assert torch.equal(actual.isnan(), wanted.isnan()), (actual, wanted)
        assert wanted.isnan().any()
        finite = ~wanted.isnan()
        if finite.any():
            _check_close(actual[finite], wanted[finite], torch.float32, 2)


@pytest.mark.parametrize("backend, dtype", [(b, d) for b, d in BACKEND_DTYPES if d in (torch.float32, torch.bfloat16)
                                            and b != "reference"])  # fmt: skip
def test_norms_past_float32s_range(backend, dtype):
    """A pixel or a class whose squared norm overflows float32 (|x| past 1.8e19, its entries finite) scores 0, as the
    reference's F.normalize divides it by an infinite norm: everywhere on the C++ CPU backend, which normalises the
    text first. The Triton and CUDA kernels divide the product <t, v> by the norms after it, so a huge pixel against
    a huge class, whose product overflows too (|t| |v| past 3.4e38), gives inf / inf = NaN there instead: the
    divergence README's Fused operators states (elsewhere their scores are the reference's)."""
    visual, text = _visual(1, 8, 2, 3, "contiguous", dtype), _text(1, 3, 8, False, dtype)
    visual[0, :, 0, 0] *= 1e20  # a huge pixel, its entries finite
    text[1] *= 1e20  # a huge class
    out, expected = ops.pixel_text_score(visual, text, backend=backend), reference.pixel_text_score(visual, text)
    assert (expected[0, :, 0, 0] == 0).all() and (expected[0, 1] == 0).all() and not expected.isnan().any()
    both = torch.zeros_like(out, dtype=torch.bool)
    both[0, 1, 0, 0] = True  # the huge pixel's score against the huge class
    if backend == "cpu":
        assert not out.isnan().any()
    else:
        assert torch.equal(out.isnan(), both), out
    assert (out[(expected == 0) & ~both] == 0).all()  # the huge pixel's and the huge class's other scores
    _check_close(out[~both], expected[~both], dtype)


@pytest.mark.parametrize("backend", sorted({b for b, d in BACKEND_DTYPES if d == torch.float16}))
def test_float16_vectors_whose_norm_passes_float16s_range(backend):
    """A float16 class and a float16 pixel whose entries are finite but whose norms pass float16's largest value
    (65504) score as in the reference, with its gradients: float16 inputs are computed in float32, where those norms
    are finite. A text normalised in float16 before its cast to float32 (in the forward, or in the backward) has an
    infinite norm there: that class scored 0 and reached no pixel's gradient."""
    dtype = torch.float16
    visual, text = _visual(1, 8, 3, 4, "contiguous", dtype), _text(1, 5, 8, False, dtype)
    text[2] = text[2].sign() * 3e4
    visual[0, :, 1, 2] = visual[0, :, 1, 2].sign() * 3e4
    assert text.isfinite().all() and min(text[2].double().norm(), visual[0, :, 1, 2].double().norm()) > 65504
    (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 2.0, backend)
    _check_close(out, expected, dtype)
    _check_close(v_grad, v64_grad, dtype, 2)
    _check_close(t_grad, t64_grad, dtype, 2)


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_zero_vectors(backend):
    """Zero pixels and zero classes score 0, and their gradients follow F.normalize's clamp (g / eps), as do those
    of vectors shorter than eps (no projection: the Jacobian of x / eps)."""
    dtype = torch.float32
    visual = _visual(2, 6, 3, 3, "contiguous", dtype)
    visual[0, :, 1, 1] = 0
    visual[1, :, 2, 0] *= 1e-14
    text = _text(2, 4, 6, False, dtype)
    text[2] = 0
    text[3] *= 1e-14
    grad = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 1.0, backend, grad)
    assert torch.equal(out[0, :, 1, 1], torch.zeros(4, device=DEVICE)) and (out[:, 2] == 0).all()
    _check_close(out, expected, dtype)
    _check_close(v_grad, v64_grad, dtype, 2)
    _check_close(t_grad, t64_grad, dtype, 2)


@pytest.mark.parametrize("backend, dtype", [(b, d) for b, d in BACKEND_DTYPES if d in (torch.float64, torch.float32)])
def test_a_norm_of_exactly_eps(backend, dtype):
    """A pixel and a class whose norm is exactly eps (1e-12 in the input's dtype): the normalisation's gradient
    passes its clamp there (the radial term applies: none along the vector itself), as F.normalize's did up to
    torch 2.13 and in the official code's torch, and as reference.normalize's does whatever the torch; from torch
    2.14 F.normalize gives g / eps there (pytorch/pytorch#184572). The kernels compare in the input's dtype, so the
    reference runs in it too; away from exactly eps reference.normalize is F.normalize, values bit for bit."""
    eps = torch.tensor(1e-12, dtype=dtype).item()
    visual = _visual(1, 3, 2, 2, "contiguous", dtype)
    visual[0, :, 0, 1] = torch.tensor([eps, 0.0, 0.0], dtype=dtype)
    text = _text(1, 2, 3, False, dtype)
    text[1] = torch.tensor([0.0, eps, 0.0], dtype=dtype)
    assert visual[0, :, 0, 1].norm().item() == text[1].norm().item() == eps
    grad = torch.randn(1, 2, 2, 2, dtype=torch.float64).to(DEVICE, dtype)
    got, want = [], []
    for result, fn in ((got, functools.partial(ops.pixel_text_score, backend=backend)),
                       (want, reference.pixel_text_score)):  # fmt: skip
        v, t = _leaf(visual), _leaf(text)
        fn(v, t).backward(grad)
        result += [v.grad, t.grad]
    for g, w in zip(got, want):
        _check_close(g, w, dtype, 2)
    scale = want[0][0, :, 0, 1].abs().max()  # g / eps: about 1e12
    assert got[0][0, 0, 0, 1].abs() <= 1e-5 * scale and got[1][1, 1].abs() <= 1e-5 * scale, (got[0], got[1])
    x = torch.randn(4, 5, dtype=torch.float64)
    x[1] *= 1e-14
    x[2] = 0
    assert torch.equal(reference.normalize(x, -1), F.normalize(x, dim=-1))


@pytest.mark.parametrize("backend, dtype", [(b, d) for b, d in BACKEND_DTYPES if d in (torch.float16, torch.bfloat16)])
def test_zero_pixel_in_16_bit(backend, dtype):
    """A zero pixel's 1 / max(|v|, eps) = 1e12 must not reach the text gradient as inf * 0 = NaN: float16 cannot hold
    G / max(|v|, eps) there (the text half of the kernels' backward scales G by it before a 16-bit GEMM). Its
    own gradient, G^ / eps, overflows float16 as it does in any implementation; the other pixels' are checked."""
    visual = _visual(2, 40, 3, 5, "channels_last", dtype)
    visual[1, :, 2, 3] = 0
    text = _text(2, 7, 40, False, dtype)
    grad = torch.randn(2, 7, 3, 5, dtype=torch.float64, device=DEVICE)
    (_, v_grad, t_grad), (_, v64_grad, t64_grad) = _score_with_reference(visual, text, 2.0, backend, grad)
    assert torch.isfinite(t_grad).all(), t_grad
    _check_close(t_grad, t64_grad, dtype, 2)
    nonzero = torch.ones(2, 1, 3, 5, dtype=torch.bool, device=DEVICE)
    nonzero[1, :, 2, 3] = False
    _check_close(v_grad.where(nonzero, 0), v64_grad.where(nonzero, 0), dtype, 2)


@pytest.mark.parametrize("backend", sorted(dict(BACKEND_DTYPES)))
def test_layout_does_not_depend_on_the_batch_size(backend):
    """The score map of the pool's pixel tokens (a channels_last view with a padded batch stride) is NHWC at every
    batch size, B = 1 included, where a batch stride means nothing: a graph AOTInductor compiled at B = 2 relies on
    the layout it saw there when it runs at B = 1. Values and gradients stay exact."""
    for b in (1, 2):
        tokens = torch.randn(b, 1 + 5 * 3, 6, dtype=torch.float64, device=DEVICE)
        text = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
        tok, t = _leaf(tokens, torch.float32), _leaf(text, torch.float32)
        visual = tok[:, 1:].transpose(1, 2).reshape(b, 6, 5, 3)  # a view, strides (16 * 6, 1, 18, 6)
        tok64, t64 = _leaf(tokens), _leaf(text)
        expected = reference.pixel_text_score(tok64[:, 1:].transpose(1, 2).reshape(b, 6, 5, 3), t64)
        grad = torch.randn_like(expected)
        expected.backward(grad)
        out = ops.pixel_text_score(visual, t, backend=backend)
        out.backward(grad.float())
        assert out.is_contiguous(memory_format=torch.channels_last) and out.stride(1) == 1, (b, out.stride())
        _check_close(out, expected, torch.float32)
        _check_close(tok.grad, tok64.grad, torch.float32, 2)
        _check_close(t.grad, t64.grad, torch.float32, 2)
        feature = torch.randn(b, 2, 5, 3, device=DEVICE)
        merged = ops.score_concat(feature, visual.detach(), t.detach(), backend=backend)
        assert merged.stride(1) == 1, (b, merged.stride())
        _check_close(merged[:, 2:], expected, torch.float32)


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES} - {"triton", "reference"}))
def test_autocast_does_not_reach_inside_the_cpp_operators(backend):
    """Under torch.autocast (bf16 training) the C++ operators compute exactly as without it: autocast must neither
    cast their inputs nor turn their internal float32 GEMMs into bfloat16; the log-sum-exp stays float32."""
    q, k, v = (torch.randn(2, 3, n, 16, device=DEVICE).to(torch.bfloat16) for n in (5, 7, 7))
    visual = torch.randn(2, 24, 5, 6, device=DEVICE).to(torch.bfloat16)
    text = torch.randn(2, 7, 24, device=DEVICE).to(torch.bfloat16)
    results = []
    for enabled in (False, True):
        leaves = [_leaf(t) for t in (q, k, v, visual, text)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled):
            out, lse = torch.ops.denseclip_fast.context_attention(*leaves[:3])
            attn = ops.context_attention(*leaves[:3], backend=backend)
            score = ops.pixel_text_score(leaves[3], leaves[4], 0.5, backend=backend)
        assert lse.dtype == torch.float32
        (attn.float().square().sum() + score.float().square().sum()).backward()
        results.append([out, attn, score, *(t.grad for t in leaves)])
    for without, within in zip(*results):
        assert torch.equal(without, within)


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_size_one_dimensions_with_odd_strides(backend):
    """Contiguous tensors may carry any stride on a size-1 dimension; the kernels must not trust it."""
    nchw = torch.randn(2, 3, 1, 5, device=DEVICE).transpose(2, 3)  # (2, 3, 5, 1), strides (15, 5, 1, 5)
    nhwc = torch.randn(2, 7, 3, device=DEVICE).transpose(1, 2).unsqueeze(-1)  # channels_last (2, 3, 7, 1)
    for visual in (nchw, nhwc):
        text = torch.randn(4, visual.shape[1], device=DEVICE)
        expected = reference.pixel_text_score(visual.double(), text.double())
        _check_close(ops.pixel_text_score(visual, text, backend=backend), expected, torch.float32)
        feature = torch.randn(2, 2, *visual.shape[2:], device=DEVICE)
        _check_close(ops.score_concat(feature, visual, text, backend=backend)[:, 2:], expected, torch.float32)


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_a_one_channel_map_scores_in_nchw(backend):
    """A visual of one channel has NCHW and NHWC strides at once: score_memory_format, the fake kernels' rule, makes
    its outputs NCHW, and the kernels must too (several classes and pixels, so that the two layouts differ). A rule
    that took NHWC strides alone for NHWC wrote them channels_last, not the layout a traced graph expects."""
    visual, text = _visual(2, 1, 3, 4, "contiguous", torch.float32), _text(2, 5, 1, False, torch.float32)
    assert visual.is_contiguous(memory_format=torch.channels_last)
    assert score_memory_format(visual) == torch.contiguous_format
    (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 2.0, backend)
    assert out.is_contiguous()
    _check_close(out, expected, torch.float32)
    _check_close(v_grad, v64_grad, torch.float32, 2)
    _check_close(t_grad, t64_grad, torch.float32, 2)
    feature = torch.randn(2, 3, 3, 4, device=DEVICE)
    assert ops.score_concat(feature, visual, text, 2.0, backend=backend).is_contiguous()


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_empty_batch_and_empty_image(backend):
    for shape in ((0, 4, 3, 3), (2, 4, 0, 3)):
        visual = torch.randn(shape, device=DEVICE, requires_grad=True)
        text = torch.randn(5, 4, device=DEVICE, requires_grad=True)
        out = ops.pixel_text_score(visual, text, backend=backend)
        assert out.shape == (shape[0], 5, *shape[2:])
        out.sum().backward()
        assert visual.grad.shape == visual.shape and torch.equal(text.grad, torch.zeros_like(text))
    q = torch.randn(2, 1, 0, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 1, 3, 16, device=DEVICE, requires_grad=True)
    out = ops.context_attention(q, k, k, backend=backend)
    assert out.shape == (2, 1, 0, 16)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_empty_backward_results_have_the_fake_kernels_layouts():
    """With nothing to differentiate (B = 0), the C++ score backward still returns its results in the layouts its fake
    kernel promises: grad_text contiguous even for a transposed text, grad_visual in visual's memory format."""
    if not ops.extension_available():
        pytest.skip("the C++ extension is not built")
    visual = torch.randn(0, 6, 3, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    text = torch.randn(6, 5, device=DEVICE).t()
    grad = torch.randn(0, 5, 3, 4, device=DEVICE)
    grad_visual, grad_text = torch.ops.denseclip_fast.pixel_text_score_backward(grad, visual, text, 1.0)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = torch.ops.denseclip_fast.pixel_text_score_backward(*(mode.from_tensor(x) for x in (grad, visual, text)),
                                                                   1.0)  # fmt: skip
    assert (grad_visual.stride(), grad_text.stride()) == tuple(f.stride() for f in fakes)
    assert grad_text.is_contiguous() and torch.equal(grad_text, torch.zeros(5, 6, device=DEVICE))


def test_empty_triton_backward_results_have_the_fake_kernels_layouts():
    """The Triton backwards with nothing to differentiate (B = 0; Lq = 0 with keys) return zeros in the layouts
    their fake kernels promise, as the C++ ones: the score's grad_text (5, 6) contiguous for a transposed text,
    grad_visual in visual's score layout; the attention's dq, dk, dv contiguous for a transposed k and v."""
    assert ops.backends.triton_available() is None
    lib = torch.ops.denseclip_fast
    visual = torch.randn(0, 6, 4, 3, device=DEVICE).transpose(2, 3)  # neither NCHW nor NHWC: made NCHW
    text = torch.randn(6, 5, device=DEVICE).t()
    grad = torch.randn(0, 5, 3, 4, device=DEVICE)
    q = torch.randn(1, 2, 0, 16, device=DEVICE)
    k, v = (torch.randn(1, 2, 16, 7, device=DEVICE).transpose(2, 3) for _ in range(2))
    out, lse = torch.empty(1, 2, 0, 16, device=DEVICE), torch.empty(1, 2, 0, device=DEVICE)
    calls = ((lib.pixel_text_score_backward_triton, (grad, visual, text, 1.0)),
             (lib.context_attention_backward_triton, (out, q, k, v, out, lse)))  # fmt: skip
    for op, args in calls:
        real = op(*args)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fakes = op(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args))
        assert [r.stride() for r in real] == [f.stride() for f in fakes], op
        assert all(not r.any() for r in real)


# (B, heads, Lq, Lk, D): one query, one key, odd lengths, several key blocks, every Triton head dim
ATTENTION_SHAPES = [(1, 1, 1, 1, 32), (2, 3, 5, 70, 16), (1, 4, 33, 257, 64), (2, 1, 150, 65, 128), (1, 2, 7, 3, 32),
                     (1, 1, 9, 1100, 32)]  # the last: several key blocks of the CPU and Triton kernels


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> None:
    """context_attention on ``backend``, forward and backward, against SDPA in float64 on the same values."""
    dtype = q.dtype
    q64, k64, v64 = (_leaf(x, torch.float64) for x in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    qa, ka, va = (_leaf(x) for x in (q, k, v))
    out = ops.context_attention(qa, ka, va, backend=backend)
    out.backward(grad.to(dtype))
    assert out.shape == q.shape and out.dtype == dtype
    _check_close(out, expected, dtype)
    for actual, wanted in ((qa.grad, q64.grad), (ka.grad, k64.grad), (va.grad, v64.grad)):
        _check_close(actual, wanted, dtype, 4)


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_context_attention_forward_and_backward(backend, dtype, shape):
    b, h, lq, lk, d = shape
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64).to(DEVICE, dtype) for n in (lq, lk, lk))
    if lq > 1:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, as the decoder's head split makes it
    _check_attention(q, k, v, backend)


RANDOM_BACKENDS = sorted({b for b, _ in BACKEND_DTYPES} - {"reference"})


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_attention_takes_inputs_transposed_in_their_last_two_dimensions(backend):
    """q, k and v whose last dimension is not the contiguous one (views transposed from (B, heads, D, L)): the CPU
    backend's ATen flash kernel assumes unit stride there (a transposed q gave garbage until the operator made such
    inputs contiguous), and so does its backward for `out`, which direct callers may pass in any layout."""
    q, k, v = (torch.randn(2, 3, 16, n, device=DEVICE).transpose(-1, -2) for n in (5, 7, 7))
    assert q.stride(-1) != 1
    _check_attention(q, k, v, backend)
    if backend not in ("cpu", "cuda"):
        return
    out, lse = torch.ops.denseclip_fast.context_attention(q, k, v)
    grad = torch.randn_like(out)
    backward = torch.ops.denseclip_fast.context_attention_backward
    transposed_out = out.transpose(-1, -2).contiguous().transpose(-1, -2)
    for expected, actual in zip(backward(grad, q, k, v, out, lse), backward(grad, q, k, v, transposed_out, lse)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_attention_reads_projection_views_and_writes_heads_last(monkeypatch, dtype):
    """The model's q, k, v: (B, L, heads * D) projections viewed as (B, heads, L, D), the three of one fused
    projection too (row strides 3 x heads x D). The Triton forward reads them as they are (no contiguous copy:
    Tensor.contiguous is not called) and, on the eager inference path, writes the output heads-last, so that the
    model's transpose-and-reshape after it is a view; the values equal the reference's; the operator's output
    (the path that records gradients) stays contiguous; a D-strided input is still copied."""
    b, heads, d, lq, lk = 2, 3, 16, 9, 21
    fused = torch.randn(b, lk, 3, heads, d, device=DEVICE, dtype=dtype)
    q = torch.randn(b, lq, heads * d, device=DEVICE, dtype=dtype).view(b, lq, heads, d).transpose(1, 2)
    k, v = (fused[:, :, i].transpose(1, 2) for i in (1, 2))
    assert k.stride(2) == 3 * heads * d and not k.is_contiguous()
    d_strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # its last stride is not 1
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **kw: copies.append(t.shape) or real(t, *a, **kw))
    with torch.no_grad():
        out = ops.context_attention(q, k, v, backend="triton")
    assert copies == []
    assert out.transpose(1, 2).is_contiguous() and out.transpose(1, 2).reshape(b, lq, heads * d).data_ptr() == (
        out.data_ptr())  # fmt: skip
    expected = reference.attention(q.double(), k.double(), v.double())
    _check_close(out, expected, dtype)
    recorded = ops.context_attention(q.clone().requires_grad_(), k, v, backend="triton")
    assert recorded.is_contiguous()
    _check_close(recorded.detach(), expected, dtype)
    with torch.no_grad():
        ops.context_attention(d_strided, k, v, backend="triton")
    assert len(copies) == 1


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
@pytest.mark.parametrize("where", ["one query element", "a query row", "one key element", "every key",
                                   "one value element", "a query element inf", "a query element -inf",
                                   "one key element inf", "a key dimension -inf", "a key dimension inf"])  # fmt: skip
def test_attention_nan_spreads_as_in_the_reference(backend, where):
    """Non-finite inputs give NaN (and Inf) exactly where softmax(q k^T / sqrt(D)) v and its gradients do: ATen's CPU
    flash kernel, which the cpu backend calls, gave a query row with a NaN (or a head whose keys are all NaN) the
    output 0 and finite gradients, as torch's own CPU scaled_dot_product_attention does, and so it did to a row whose
    scores are all -inf (a key dimension of -inf: the reference's, and the official decoder's, softmax is NaN)."""
    q, k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64) for n in (5, 7, 7))
    target, index, value = {
        "one query element": (q, (1, 0, 3, 2), math.nan), "a query row": (q, (0, 1, 2), math.nan),
        "one key element": (k, (1, 1, 4, 0), math.nan), "every key": (k, (0, 1), math.nan),
        "one value element": (v, (0, 0, 6, 5), math.nan), "a query element inf": (q, (1, 1, 0, 9), math.inf),
        "a query element -inf": (q, (1, 1, 0, 9), -math.inf), "one key element inf": (k, (1, 1, 4, 0), math.inf),
        "a key dimension -inf": (k, (0, 1, slice(None), 3), -math.inf),
        "a key dimension inf": (k, (0, 1, slice(None), 3), math.inf),
    }[where]  # fmt: skip
    target[index] = value
    grad = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    results = {}
    for name in ("reference", backend):
        leaves = [x.to(DEVICE, torch.float32).requires_grad_() for x in (q, k, v)]
        out = ops.context_attention(*leaves, backend=name)
        out.backward(grad.to(DEVICE, torch.float32))
        results[name] = [out] + [x.grad for x in leaves]
    assert not results["reference"][0].isfinite().all()
    for actual, wanted in zip(results[backend], results["reference"]):
        assert torch.equal(actual.isnan(), wanted.isnan()) and torch.equal(actual.isinf(), wanted.isinf()), where
        finite = wanted.isfinite()
        if finite.any():
            _check_close(actual[finite], wanted[finite], torch.float32, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "gapped"])
def test_cpu_attention_finds_a_non_finite_query_element_anywhere(dtype, value, layout):
    """The cpu backend looks for a NaN or an infinity in q and k (by exponent bits, in chunks of 65536 elements over
    the threads; a dense tensor in memory order, as the decoder's transposed views, others copied first) before
    choosing ATen's kernel: one in the very last element of a q of several chunks, in every dtype and layout, still
    makes that query row's output NaN as in the reference (ATen's kernel gives a row of NaN scores, or of -inf ones,
    the output 0)."""
    q, k, v = (torch.randn(1, 2, n, 64, dtype=torch.float64) for n in (600, 9, 9))
    k[..., -1] = 1.0  # the last dimension's scores are q's last element: +-inf or NaN, so the softmax is NaN
    q[0, 1, -1, -1] = value
    q = q.to(dtype)
    if layout == "transposed":  # as the decoder's: (B, L, heads, D) memory viewed as (B, heads, L, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "gapped":  # every other element of a larger tensor: not dense
        q = torch.zeros(*q.shape[:-1], 2 * q.shape[-1], dtype=dtype)[..., ::2].copy_(q)
    k, v = k.to(dtype), v.to(dtype)
    assert q.numel() > 65536 and (layout == "contiguous") == q.is_contiguous()
    assert (layout == "gapped") == (q.stride(-1) == 2)
    out = ops.context_attention(q, k, v, backend="cpu")
    wanted = ops.context_attention(q, k, v, backend="reference")
    assert torch.equal(out.isnan(), wanted.isnan()) and wanted[0, 1, -1].isnan().all()
    finite = wanted.isfinite()
    _check_close(out[finite], wanted[finite], dtype)


@pytest.mark.parametrize("where", ["q", "k"])
def test_cpu_attention_finds_a_non_finite_element_in_the_first_threads_chunk(where):
    """The chunks of the cpu backend's scan for a NaN or an infinity (65536 elements a chunk, at most one a thread)
    are combined, every thread's finding kept: on two threads, a -inf in q's first row, or a key dimension of -inf in
    the first head (both in the first chunk of two), still makes the rows whose scores are all -inf NaN, as in the
    reference (a combine that kept the last thread's finding missed them, and ATen's kernel gave those rows 0)."""
    q, k, v = (torch.randn(1, 2, 520, 64) for _ in range(3))
    if where == "q":
        k[..., -1] = 1.0  # the last dimension's scores are q's last element: -inf for every key of q's first row
        q[0, 0, 0, -1] = -math.inf
    else:
        q[..., 3] = 1.0  # every score of the first head -inf
        k[0, 0, :, 3] = -math.inf
    assert q.numel() == k.numel() > 65536
    with torch_threads(2):
        out = ops.context_attention(q, k, v, backend="cpu")
    wanted = ops.context_attention(q, k, v, backend="reference")
    assert wanted[0, 0, 0].isnan().all() and torch.equal(out.isnan(), wanted.isnan())
    finite = wanted.isfinite()
    _check_close(out[finite], wanted[finite], torch.float32)


def test_cpu_attention_takes_atens_flash_kernel_exactly_for_finite_inputs():
    """The cpu backend's scan for a NaN or an infinity chooses the path: finite q and k (of several chunks, on two
    threads) run ATen's flash kernel, one NaN in k the reference's formulation. A scan that tested the wrong bits,
    finding a non-finite value in every input, computed everything the slow way (the reference's formulation), whose
    values every other test passed."""
    q, k, v = (torch.randn(1, 2, 520, 64) for _ in range(3))
    for value, flash in ((1.0, True), (math.nan, False)):
        k[0, 1, 3, 5] = value
        with torch_threads(2), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.context_attention(q, k, v, backend="cpu")
        names = {event.name for event in prof.events()}
        assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in names) == flash, (value, sorted(names))


def test_triton_attention_refuses_sequences_past_its_int32_offsets():
    """L x D of one head past 2^31 - 1 (16.7M tokens at D=128, far past the operator's 65536 keys) would overflow
    the Triton kernels' int32 row offsets: refused, naming the backends that take it (expanded tensors: no memory)."""
    assert ops.backends.triton_available() is None
    q = torch.zeros(1, 1, 1, 128, device=DEVICE).expand(1, 1, 1, 128)
    k = torch.zeros(1, 1, 1, 128, device=DEVICE).expand(1, 1, 2**24, 128)
    with pytest.raises(ValueError, match="sequences of 16777216 tokens x head dim 128 pass the kernels' int32"):
        ops.context_attention(q, k, k, backend="triton")


@pytest.mark.parametrize("heads_last", [False, True])
def test_triton_attention_row_offsets_of_strided_views_stay_int32(monkeypatch, heads_last):
    """The forward kernel indexes a (batch, head)'s rows as row x row stride in int32. A packed q/k/v projection's
    views have row stride 3 x heads x D, and a heads-last output heads x D: at RN50's attention pool (2048 channels,
    32 heads of 64) 350k tokens pass 2^31 there (the output 1M), while L x D, which check_lengths bounds, is far
    from it. Such views are read (and the output written) as contiguous copies then, whose row stride is D: every
    launch's largest row offset fits int32 (meta tensors: shapes and strides without memory; the launch recorded,
    not run)."""
    from denseclip_fast.ops.triton import attention

    launched: list[tuple[int, ...]] = []

    class Recorder:
        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *args, **kwargs: launched.append(args)

    monkeypatch.setattr(attention, "launch", lambda kernel: Recorder())
    b, length, heads, d = 1, 1_100_000, 32, 64  # the heads-last output past 2^31 too (1M tokens)
    packed = torch.empty((b, length, 3, heads, d), device="meta", dtype=torch.bfloat16)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert (length - 1) * q.stride(2) >= 2**31 > length * d
    attention.attention_forward(q, k, v, heads_last=heads_last)
    (args,) = launched
    lq, lk = args[5], args[6]
    s_ql, s_kl, s_vl, s_ol = args[11], args[14], args[17], args[20]
    for rows, stride in ((lq, s_ql), (lk, s_kl), (lk, s_vl), (lq, s_ol)):
        assert (rows - 1) * stride + d - 1 < 2**31, (rows, stride)
    # views whose rows fit are still read as they are (the model's shapes: no copy)
    launched.clear()
    small = packed[:, :1000]
    q, k, v = small.permute(2, 0, 3, 1, 4).unbind(0)
    attention.attention_forward(q, k, v, heads_last=heads_last)
    assert launched[0][11] == 3 * heads * d and launched[0][20] == (heads * d if heads_last else d)


# The ends of the attention's specified range (any K from 1 to 2048 queries, any N from 1 to 65536 keys, head dims
# 32/64/128): one query over 65536 keys, 2048 queries over one key or three; on a GPU also 2048 x 65536 (on the CPU
# that takes a minute: its kernel is tested there at smaller sizes)
ATTENTION_EXTREMES = [(1, 1, 1, 65536, 32), (1, 2, 2048, 1, 128), (1, 1, 2048, 3, 64)]
if DEVICE == "cuda":
    ATTENTION_EXTREMES += [(1, 1, 2048, 65536, 128), (2, 2, 2048, 65536, 32)]


@pytest.mark.parametrize("backend, dtype", [(DEVICE, torch.float32), (DEVICE, torch.bfloat16),
                                            ("triton", torch.float16)])  # fmt: skip
@pytest.mark.parametrize("shape", ATTENTION_EXTREMES, ids=lambda s: "x".join(map(str, s)))
def test_context_attention_at_the_ends_of_its_range(backend, dtype, shape):
    b, h, lq, lk, d = shape
    if backend == "triton" and DEVICE == "cpu" and lk > 4096:
        pytest.skip("Triton's interpreter takes 20 s over 65536 keys; its key loop is tested at 1100 keys")
    gen = torch.Generator().manual_seed(lq + lk + d)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for n in (lq, lk, lk))
    _check_attention(q, k, v, backend)


@pytest.mark.parametrize("backend", RANDOM_BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_against_the_reference(backend, seed):
    """Shapes, layouts and dtypes drawn at random (seeded, so a failure reproduces): beside the hand-picked cases
    above, sizes nobody chose, for the score, its concatenating form and the attention (k and v non-contiguous
    views too)."""
    rng = torch.Generator().manual_seed(1000 + seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    dtypes = [d for b, d in BACKEND_DTYPES if b == backend]
    for case in range(3):
        dtype = dtypes[draw(0, len(dtypes) - 1)]
        b, c, h, w, k = draw(1, 3), draw(1, 80), draw(1, 9), draw(1, 9), draw(1, 40)
        layout, batched = LAYOUTS[draw(0, 2)], bool(draw(0, 1))
        visual, text = _visual(b, c, h, w, layout, dtype), _text(b, k, c, batched, dtype)
        what = f"case {case}: {dtype} B{b} C{c} {h}x{w} K{k} {layout} {'per-image' if batched else 'shared'} text"
        (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 1.5, backend)
        for actual, wanted, factor in ((out, expected, 1), (v_grad, v64_grad, 2), (t_grad, t64_grad, 2)):
            try:
                _check_close(actual, wanted, dtype, factor)
            except AssertionError as exc:
                raise AssertionError(f"{what}: {exc}") from None
        feature = torch.randn(b, draw(1, 12), h, w).to(DEVICE, dtype)
        concat = ops.score_concat(feature, visual, text, 1.5, backend=backend)
        assert torch.equal(concat[:, feature.shape[1]:], out.detach()), what  # the same kernel, into the buffer
        d = (16, 32, 64, 128)[draw(0, 3)] if backend == "triton" else draw(1, 80)
        heads, lq, lk = draw(1, 4), draw(1, 40), draw(1, 300)
        q = torch.randn(b, lq, heads, d, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)  # the head split
        kv = torch.randn(b, lk, heads, 2 * d, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)
        k_view, v_view = kv[..., :d], kv[..., d:]  # slices of one projection: non-contiguous, offset
        try:
            _check_attention(q, k_view, v_view, backend)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: attention {dtype} B{b} H{heads} {lq}x{lk} D{d}: {exc}") from None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "concat slice", "concat slice channels_last"])
def test_triton_score_backward_with_and_without_the_forward_outputs(layout):
    """The Triton score operators return the pixel norms |v| beside the map, and autograd hands both to the backward
    (score_map: sum_k G S gives <v^, g^>; norm: |v| without a pass over the channels). Called without them (or with
    the map alone), the backward runs the forward itself. All equal the float64 reference, with the map in every
    layout it comes in (NCHW, NHWC, a channel slice of score_concat's buffer in either), on an odd shape with a zero
    pixel; the norms equal |v|; wrong ones are refused."""
    assert ops.backends.triton_available() is None
    lib = torch.ops.denseclip_fast
    visual = _visual(2, 37, 5, 3, "channels_last" if "channels_last" in layout else "contiguous", torch.float32)
    visual[0, :, 1, 2] = 0
    text = _text(2, 19, 37, False, torch.float32)
    if layout.startswith("concat"):
        feature = torch.randn(2, 6, 5, 3, device=DEVICE)
        score_map, norm = lib.score_concat_triton(feature, visual, text, 2.5)
        score_map = score_map[:, 6:]
    else:
        score_map, norm = lib.pixel_text_score_triton(visual, text, 2.5)
    # a few ulp apart: another summation order, and on a GPU Triton's sqrt.approx (correctly rounded: tl.sqrt_rn)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(visual, dim=1), rtol=4e-6, atol=0)
    assert norm.dtype == torch.float32 and norm[0, 1, 2] == 0
    grad = torch.randn(2, 19, 5, 3, device=DEVICE)
    v64, t64 = _leaf(visual, torch.float64), _leaf(text, torch.float64)
    reference.pixel_text_score(v64, t64, 2.5).backward(grad.double())
    backward = lib.pixel_text_score_backward_triton
    for grad_visual, grad_text in (backward(grad, visual, text, 2.5, score_map, norm),
                                   backward(grad, visual, text, 2.5, score_map), backward(grad, visual, text, 2.5)):
        _check_close(grad_visual, v64.grad, torch.float32, 2)
        _check_close(grad_text, t64.grad, torch.float32, 2)
    # a planted error: norms that are not |v| give another (wrong) gradient, so the kernel does read them
    wrong, _ = backward(grad, visual, text, 2.5, score_map, norm * 2)
    assert not torch.allclose(wrong, v64.grad.float(), rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match=r"score must be the forward's output, shape \(2, 19, 5, 3\)"):
        backward(grad, visual, text, 2.5, score_map[:, :4])
    with pytest.raises(ValueError, match=r"score must be the forward's output, torch.float32 on .*, got torch.float64"):
        backward(grad, visual, text, 2.5, score_map.double())
    with pytest.raises(ValueError, match=r"norm must be the forward's output, shape \(2, 5, 3\), got \(2, 15\)"):
        backward(grad, visual, text, 2.5, score_map, norm.flatten(1))
    with pytest.raises(ValueError, match=r"norm must be the forward's output, torch.float32 on .*, got torch.float64"):
        backward(grad, visual, text, 2.5, score_map, norm.double())
    wrong_grad = r"grad must be the gradient of the \(B, K, H, W\) score, shape \(2, 19, 5, 3\), got \(2, 18, 5, 3\)"
    with pytest.raises(ValueError, match=wrong_grad):
        backward(grad[:, 1:], visual, text, 2.5, score_map, norm)
    # no class: refused by the raw operator too, as by ops.* and the C++ operator
    with pytest.raises(ValueError, match="at least one class embedding"):
        lib.pixel_text_score_triton(visual, text[:0], 2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "concat"])
def test_cpp_score_operators_return_the_norms_and_the_backward_takes_them(dtype, layout):
    """The C++ score operators (CPU here; CUDA on a GPU, where bfloat16 autograd takes the one-pass tensor-core
    backward) return |v| beside the map, in float32 (float64 for float64), and their backward reads the norms it is
    given (a planted error changes the gradient) or finds them itself; all equal the float64 reference; wrong
    norms are refused with a message that names them."""
    if not ops.extension_available():
        pytest.skip("the C++ extension is not built")
    lib = torch.ops.denseclip_fast
    visual = _visual(2, 37, 5, 3, "channels_last" if layout == "channels_last" else "contiguous", dtype)
    visual[0, :, 1, 2] = 0
    text = _text(2, 19, 37, False, dtype)
    if layout == "concat":
        feature = torch.randn(2, 6, 5, 3, device=DEVICE, dtype=dtype)
        score_map, norm = lib.score_concat(feature, visual, text, 2.5)
        score_map = score_map[:, 6:]
    else:
        score_map, norm = lib.pixel_text_score(visual, text, 2.5)
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert norm.dtype == norm_dtype and norm.shape == (2, 5, 3) and norm[0, 1, 2] == 0
    # a few ulp apart (another summation order; 1e-6 was marginal for a GPU's)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(visual.to(norm_dtype), dim=1), rtol=4e-6, atol=0)
    grad = torch.randn(2, 19, 5, 3, device=DEVICE, dtype=dtype)
    v64, t64 = _leaf(visual, torch.float64), _leaf(text, torch.float64)
    reference.pixel_text_score(v64, t64, 2.5).backward(grad.double())
    backward = lib.pixel_text_score_backward
    for grad_visual, grad_text in (backward(grad, visual, text, 2.5, score_map, norm),
                                   backward(grad, visual, text, 2.5, None, norm), backward(grad, visual, text, 2.5)):
        _check_close(grad_visual, v64.grad, dtype, 2)
        _check_close(grad_text, t64.grad, dtype, 2)
    wrong, _ = backward(grad, visual, text, 2.5, score_map, norm * 2)
    assert not torch.allclose(wrong.double(), v64.grad, rtol=5e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match=r"norm must be \(B, H, W\) = \(2, 5, 3\) .*, got \[2, 15\]"):
        backward(grad, visual, text, 2.5, score_map, norm.flatten(1))
    other = torch.float32 if dtype == torch.float64 else torch.float64
    with pytest.raises(RuntimeError, match="the forward's pixel norms"):
        backward(grad, visual, text, 2.5, score_map, norm.to(other))


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "concat", "concat channels_last"])
def test_cpu_score_tiles_cover_the_map_on_any_thread_count(threads, dtype, layout):
    """The CPU score forward and backward work in tiles of up to 512 pixels spread over the OpenMP threads (fewer
    pixels a tile when there are more threads): a map of 2 x 1073 pixels (two full tiles and a partial one per image
    at one thread, 128-pixel tiles at eight) gives the float64 reference's scores, norms and gradients, with per-image
    text (the concat cases) and shared text (the others, whose text gradient sums every thread's tiles), with and
    without the forward's norms; the forward also under inference mode, whose output tensors the worker threads
    write into."""
    if not ops.extension_available():
        pytest.skip("the C++ extension is not built")
    lib = torch.ops.denseclip_fast
    visual = torch.randn(2, 40, 37, 29, dtype=torch.float64)
    if "channels_last" in layout:
        visual = visual.contiguous(memory_format=torch.channels_last)
    visual = visual.to(dtype)
    visual[1, :, 36, 28] = 0  # the last pixel of the last (partial) tile
    text = torch.randn((2, 11, 40) if "concat" in layout else (11, 40), dtype=torch.float64).to(dtype)
    feature = torch.randn(2, 3, 37, 29, dtype=dtype)
    grad = torch.randn(2, 11, 37, 29, dtype=dtype)
    v64, t64 = _leaf(visual, torch.float64), _leaf(text, torch.float64)
    expected = reference.pixel_text_score(v64, t64, 3.0)
    expected.backward(grad.double())
    with torch_threads(threads):
        with torch.inference_mode():
            if "concat" in layout:
                out, norm = lib.score_concat(feature, visual, text, 3.0)
                assert torch.equal(out[:, :3], feature)
                out = out[:, 3:]
            else:
                out, norm = lib.pixel_text_score(visual, text, 3.0)
        grads = [lib.pixel_text_score_backward(grad, visual, text, 3.0, None, given) for given in (norm, None)]
    _check_close(out, expected, dtype)
    for grad_visual, grad_text in grads:
        _check_close(grad_visual, v64.grad, dtype, 2)
        _check_close(grad_text, t64.grad, dtype, 2)
        assert grad_visual.is_contiguous(memory_format=torch.channels_last) == ("channels_last" in layout)
    torch.testing.assert_close(norm.double(), torch.linalg.vector_norm(visual.double(), dim=1), rtol=1e-6, atol=0)


def test_cpu_score_backward_gives_the_same_bits_on_every_run():
    """The CPU backward adds its threads' text-gradient sums in the order of their tiles, not in the order the
    threads finish: the same call on the same thread count gives the same bits every time (four threads, four sums,
    whose float32 additions round differently in another order)."""
    if not ops.extension_available():
        pytest.skip("the C++ extension is not built")
    visual, text, grad = torch.randn(2, 40, 16, 16), torch.randn(11, 40), torch.randn(2, 11, 16, 16)
    with torch_threads(4):
        runs = [torch.ops.denseclip_fast.pixel_text_score_backward(grad, visual, text, 3.0) for _ in range(20)]
    for grad_visual, grad_text in runs[1:]:
        assert torch.equal(grad_visual, runs[0][0]) and torch.equal(grad_text, runs[0][1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("text_batched", [False, True])
def test_aten_score_backward_the_cuda_fallback(dtype, layout, text_batched):
    """The CUDA registration's backward falls back to ATen calls (csrc/score_backward.cpp) for float32, for more
    classes than its tensor-core kernels take and on GPUs without them: only a GPU reaches it through the operator,
    so CI calls it through its test hook on CPU tensors. With and without the forward's norms, with a zero pixel, a
    pixel shorter than eps (F.normalize's clamp) and a zero class, it gives the float64 reference's gradients, in
    visual's layout."""
    if not ops.extension_available():
        pytest.skip("the C++ extension is not built")
    visual = _visual(2, 24, 5, 7, layout, dtype)
    visual[1, :, 4, 6] = 0
    visual[0, :, 2, 3] *= 1e-14  # shorter than eps: the Jacobian of v / eps, no projection
    text = _text(2, 9, 24, text_batched, dtype)
    text[..., 3, :] = 0
    grad = torch.randn(2, 9, 5, 7, dtype=dtype, device=DEVICE)
    v64, t64 = _leaf(visual, torch.float64), _leaf(text, torch.float64)
    reference.pixel_text_score(v64, t64, 2.5).backward(grad.double())
    _, norm = torch.ops.denseclip_fast.pixel_text_score(visual, text, 2.5)
    for given in (norm, None):
        grad_visual, grad_text = torch.ops.denseclip_fast_testing.score_backward_aten(
            grad, visual, text, 2.5, None, given
        )
        assert grad_visual.dtype == dtype and grad_text.dtype == dtype
        assert grad_visual.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        _check_close(grad_visual, v64.grad, dtype, 2)
        _check_close(grad_text, t64.grad, dtype, 2)


@pytest.mark.parametrize("text_batched", [False, True])
@pytest.mark.parametrize("sms", [1, 3, 64])
@pytest.mark.parametrize("k", [19, 150])
def test_triton_score_backward_splits_the_pixels(monkeypatch, text_batched, sms, k):
    """The fused backward splits each image's pixel tiles (or, for text shared by the batch, the tiles of the whole
    batch: a split may straddle two images) into ranges, one program row each, and sums their text partials.
    Every split count, including ranges that are empty at the end, gives the reference's gradients."""
    from denseclip_fast.ops.triton import score as triton_score

    monkeypatch.setattr(triton_score, "_sm_count", lambda device: sms)  # on a GPU too (INTERPRETER_SMS: CPU only)
    monkeypatch.setattr(triton_score, "MIN_PIXELS_PER_SPLIT", 1)
    splits = []
    real = triton_score._splits
    monkeypatch.setattr(triton_score, "_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    visual = _visual(3, 70, 9, 7, "channels_last", torch.float32)
    text = _text(3, k, 70, text_batched, torch.float32)
    (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 1.5, "triton")
    _check_close(out, expected, torch.float32)
    _check_close(v_grad, v64_grad, torch.float32, 2)
    _check_close(t_grad, t64_grad, torch.float32, 2)
    # more than one split where the channel blocks x the grid's images are fewer than 2 per SM
    c_blocks = -(-70 // triton_score.bwd_blocks(k, True)[2])  # 3 of 32 channels (19 classes), 5 of 16 (150)
    assert len(splits) == 1 and (splits[0] > 1) == (2 * sms > c_blocks * (3 if text_batched else 1)), splits


def test_triton_eager_inference_skips_the_operator_dispatch_only_when_nothing_needs_it():
    """Without a gradient to record and with nothing tracing, ops.* launch the Triton kernels directly (the custom
    operator's dispatch costs more host time than the kernel at the model's shapes), with the same results; with
    inputs that require grad, or under a dispatch mode (FlopCounterMode), they go through the operator (seen by the
    profiler, which is no dispatch mode)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    assert ops.backends.triton_available() is None
    lib = torch.ops.denseclip_fast
    visual = _visual(2, 33, 4, 5, "channels_last", torch.float32)
    text, feature = _text(2, 7, 33, False, torch.float32), torch.randn(2, 3, 4, 5, device=DEVICE)
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (5, 9, 9))
    inputs = (visual, text, feature, q, k, v)
    expected = (lib.pixel_text_score_triton(visual, text, 2.0)[0],
                lib.score_concat_triton(feature, visual, text, 2.0)[0],
                lib.context_attention_triton(q, k, v)[0])  # fmt: skip
    names = ("pixel_text_score_triton", "score_concat_triton", "context_attention_triton")

    def run(*args):
        vi, ti, fi, qi, ki, vvi = args
        return (ops.pixel_text_score(vi, ti, 2.0, backend="triton"),
                ops.score_concat(fi, vi, ti, 2.0, backend="triton"),
                ops.context_attention(qi, ki, vvi, backend="triton"))  # fmt: skip

    def operators_called(*args, grad_mode=True):
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.set_grad_enabled(grad_mode):
            outs = run(*args)
        for out, want in zip(outs, expected):
            assert torch.equal(out.detach(), want)
        return {name for name in names if any(e.name == f"denseclip_fast::{name}" for e in prof.events())}

    assert operators_called(*inputs) == set()  # eager inference: launched directly
    assert operators_called(*(_leaf(x) for x in inputs), grad_mode=False) == set()
    assert operators_called(*(_leaf(x) for x in inputs)) == set(names)  # autograd needs the operator
    with FlopCounterMode(display=False) as counter:
        assert operators_called(*inputs) == set(names)
    assert counter.get_total_flops() > 0
    assert ops.eager_inference(visual) and not ops.eager_inference(_leaf(visual))
    assert not ops.eager_inference(torch.nn.Parameter(visual, requires_grad=False))  # a subclass: the operator


def test_triton_score_autograd_saves_the_output_itself_and_the_norms():
    """What the Triton score operators keep for the backward: visual, text, the output itself (score_concat's whole
    buffer, which the next layer keeps anyway: no copy) and the (B, H, W) float32 norms; nothing of size B x K x H x W
    besides."""
    assert ops.backends.triton_available() is None
    visual = _leaf(_visual(2, 33, 4, 5, "channels_last", torch.float32))
    text = _leaf(_text(2, 7, 33, True, torch.float32))
    feature = _leaf(torch.randn(2, 3, 4, 5, device=DEVICE))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.score_concat(feature, visual, text, 2.0, backend="triton")
    assert len(saved) == 4, [tuple(t.shape) for t in saved]
    by_shape = {tuple(t.shape): t for t in saved}
    assert by_shape[(2, 33, 4, 5)] is visual and by_shape[(2, 7, 33)] is text
    assert by_shape[(2, 10, 4, 5)].data_ptr() == out.data_ptr()  # the output's own storage
    norm = by_shape[(2, 4, 5)]
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, torch.linalg.vector_norm(visual.detach(), dim=1), rtol=4e-6, atol=1e-6)


def test_the_output_may_change_in_place_only_where_the_backward_does_not_read_it():
    """The Triton backward reads the forward's output (saved by autograd): changing it in place before the backward
    is refused by autograd's version check, never silently wrong. The CPU kernel does not read it, so on a CPU
    the C++ operator's output stays free to change."""
    assert ops.backends.triton_available() is None
    visual, text = _leaf(_visual(1, 8, 3, 3, "contiguous", torch.float32)), _leaf(_text(1, 4, 8, False, torch.float32))
    if DEVICE == "cpu":
        out = ops.pixel_text_score(visual, text, backend="cpu")
        out.relu_()
        out.sum().backward()
        assert visual.grad is not None and text.grad is not None
    out = ops.pixel_text_score(visual, text, backend="triton")
    out.relu_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_triton_attention_splits_a_batch_too_large_for_one_grid(monkeypatch):
    """B x heads beyond CUDA's 65535 grid rows goes through several launches (the limit lowered to 2 here)."""
    from denseclip_fast.ops.triton import attention

    monkeypatch.setattr(attention, "MAX_GRID_Y", 2)
    _check_attention(*(torch.randn(5, 1, n, 16, device=DEVICE) for n in (9, 70, 70)), "triton")


@pytest.mark.parametrize("text_batched", [False, True])
@pytest.mark.parametrize("k", [7, 300])  # the fused backward and the GEMM one (past 256 classes)
def test_triton_score_splits_a_batch_too_large_for_one_grid(monkeypatch, text_batched, k):
    """More images than CUDA's 65535 grid rows (e.g. (N, C, 1, 1) region embeddings) run in pieces (the limit
    lowered to 2 here, 5 images in 3 pieces): the forward and the backward as in one launch, score_concat too, with
    and without the forward's outputs given to the backward."""
    from denseclip_fast.ops.triton import score

    visual = _visual(5, 24, 3, 5, "channels_last", torch.float32)
    text = _text(5, k, 24, text_batched, torch.float32)
    feature = torch.randn(5, 2, 3, 5, device=DEVICE)

    def run():
        v, t, f = _leaf(visual), _leaf(text), _leaf(feature)
        out = ops.score_concat(f, v, t, 1.5, backend="triton")
        out.backward(grad)
        direct = torch.ops.denseclip_fast.pixel_text_score_backward_triton(grad[:, 2:], visual, text, 1.5)
        return out.detach(), f.grad, v.grad, t.grad, *direct

    grad = torch.randn(5, 2 + k, 3, 5, device=DEVICE)
    whole = run()
    launches = []
    real = score.score_forward_into
    monkeypatch.setattr(score, "MAX_BATCH", 2)
    monkeypatch.setattr(score, "score_forward_into", lambda *a: launches.append(a[2].shape[0]) or real(*a))
    pieces = run()
    assert launches.count(2) >= 2 and launches.count(1) >= 1, launches
    for got, want in zip(pieces[:3], whole[:3]):  # the forward, feature and pixel gradients: the same per image
        assert torch.equal(got, want)
    _check_close(pieces[2], pieces[4], torch.float32)  # the direct backward, which runs the forward itself
    for got, want in ((pieces[3], whole[3]), (pieces[5], whole[5]), (pieces[3], pieces[5])):  # summed in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert pieces[2].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_score_takes_16_bit_nchw_maps_through_nhwc_where_asked(monkeypatch, dtype):
    """score.NHWC_ONLY_16BIT (a GPU's device type: the NCHW 16-bit specialisation was wrong on an H200) runs a 16-bit
    NCHW map through an NHWC copy: the kernels see only NHWC strides, the results (forward, score_concat's, both
    gradients) equal the NCHW kernels' and keep NCHW layouts. Float32 maps, NHWC maps and maps of one channel or one
    pixel are taken as they are. Here the CPU (Triton's interpreter) is made such a device."""
    from denseclip_fast.ops.triton import score

    monkeypatch.setattr(score, "NHWC_ONLY_16BIT", ())  # first no device copies (whatever the default)
    visual, text = _visual(2, 24, 4, 8, "contiguous", dtype), _text(2, 150, 24, False, dtype)
    feature = torch.randn(2, 3, 4, 8, device=DEVICE, dtype=dtype)
    grad = torch.randn(2, 3 + 150, 4, 8, device=DEVICE, dtype=dtype)

    def run():
        v, t, f = _leaf(visual), _leaf(text), _leaf(feature)
        out = ops.score_concat(f, v, t, 0.5, backend="triton")
        out.backward(grad)
        direct = torch.ops.denseclip_fast.pixel_text_score_backward_triton(grad[:, 3:], visual, text, 0.5)
        return out.detach(), v.grad, t.grad, *direct

    strides = []
    real = score._forward_launch.__wrapped__

    def spy(*key):
        strides.append(key[1])
        return real(*key)

    monkeypatch.setattr(score, "_forward_launch", spy)
    direct = run()
    assert strides and all(st == visual.stride() for st in strides)
    monkeypatch.setattr(score, "NHWC_ONLY_16BIT", (torch.device(DEVICE).type,))
    strides.clear()
    routed = run()
    nhwc = visual.contiguous(memory_format=torch.channels_last).stride()
    assert strides and all(st == nhwc for st in strides), strides
    for got, want in zip(routed, direct):
        assert got.is_contiguous() and got.dtype == dtype
        _check_close(got, want, dtype)
    assert score._via_nhwc(visual) and not score._via_nhwc(visual.float())
    assert not score._via_nhwc(visual.contiguous(memory_format=torch.channels_last))
    assert not score._via_nhwc(visual[:, :1]) and not score._via_nhwc(visual[:, :, :1, :1])


def test_triton_score_backward_takes_the_nhwc_blocks_for_aligned_nhwc_maps(monkeypatch):
    """16-bit NHWC maps of channels and pixels in multiples of 16, at 129-256 classes, take FUSED_BLOCKS_NHWC's
    blocks (16 pixels x 128 channels, measured on an H200); NCHW, unaligned and float32 maps the table's. The
    gradients equal the reference's either way (float16: tensor-core blocks under the interpreter too)."""
    from denseclip_fast.ops.triton import score

    monkeypatch.setattr(score, "NHWC_ONLY_16BIT", ())  # NCHW maps taken as they are (whatever the default)
    assert score.bwd_blocks(150, False, aligned_nhwc=True) == (16, 256, 128, True)
    assert score.bwd_blocks(150, False) == (16, 256, 32, True)
    assert score.bwd_blocks(150, True, aligned_nhwc=True)[2] == 16  # float32: the table's
    assert score.bwd_blocks(150, False, wide=True, aligned_nhwc=True)[2] == 32  # int64 indexing: the table's
    assert score.bwd_blocks(100, False, aligned_nhwc=True) == score.bwd_blocks(100, False)
    chosen = []
    real = score.bwd_blocks
    monkeypatch.setattr(score, "bwd_blocks", lambda *a: chosen.append(real(*a)) or chosen[-1])
    for layout, (h, w), c in (("channels_last", (4, 4), 32), ("contiguous", (4, 4), 32), ("channels_last", (3, 5), 32),
                              ("channels_last", (4, 4), 24)):  # fmt: skip
        chosen.clear()
        visual, text = _visual(2, c, h, w, layout, torch.float16), _text(2, 150, c, False, torch.float16)
        (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 0.5, "triton")
        aligned = layout == "channels_last" and c % 16 == 0 and (h * w) % 16 == 0
        assert chosen and all(b[2] == (128 if aligned else 32) for b in chosen), (layout, h, w, c, chosen)
        _check_close(v_grad, v64_grad, torch.float16, 2)
        _check_close(t_grad, t64_grad, torch.float16, 2)


def _plan_case(c: int, k: int, layout: str, text_batched: bool) -> tuple[torch.Tensor, ...]:
    """The forward-plan tests' float64 inputs and expectation: 2 images of 9 x 17 = 153 pixels (several pixel blocks
    of every forward kernel), ``c`` channels, ``k`` classes, pixel (1, 2, 3) and text row k // 2 zero; a 3-channel
    feature map for score_concat (layout "concat": visual NCHW); the reference's scores at scale 0.7."""
    b, h, w = 2, 9, 17
    visual = _visual(b, c, h, w, "contiguous" if layout == "concat" else layout, torch.float64)
    visual[1, :, 2, 3] = 0
    text = _text(b, k, c, text_batched, torch.float64)
    text[..., k // 2, :] = 0
    feature = torch.randn(b, 3, h, w, dtype=torch.float64, device=DEVICE)
    return visual, text, feature, reference.pixel_text_score(visual, text, 0.7)


def _plan_forward(case: tuple[torch.Tensor, ...], layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward of a _plan_case in ``dtype`` without gradients, as the plan in force says: (scores, |v|),
    score_concat's score channels for layout "concat"."""
    visual, text, feature, _ = case
    v, t = visual.to(dtype), text.to(dtype)
    with torch.no_grad():
        if layout == "concat":
            out, norm = torch.ops.denseclip_fast.score_concat_triton(feature.to(dtype), v, t, 0.7)
            return out[:, 3:], norm
        return torch.ops.denseclip_fast.pixel_text_score_triton(v, t, 0.7)


def _check_plan(out: torch.Tensor, norm: torch.Tensor, default: tuple[torch.Tensor, torch.Tensor],
                expected: torch.Tensor, dtype: torch.dtype, k: int) -> None:  # fmt: skip
    """A plan's scores and |v| against the reference's and the default launch's; the zero pixel and text row's zero."""
    _check_close(out, expected, dtype)
    torch.testing.assert_close(out, default[0], rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(norm, default[1], rtol=1e-6, atol=0)  # |v|: the same squares
    assert norm[1, 2, 3] == 0 and (out[1, :, 2, 3] == 0).all() and (out[:, k // 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("text_batched", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "concat"])
@pytest.mark.parametrize("k", [1, 21, 300])  # one class, one class block, several (each reads its own norms)
def test_triton_score_forward_plans(monkeypatch, dtype, text_batched, layout, k):
    """The forward's alternatives for 16-bit maps, each from a number of pixels in the batch on
    (score.TEXT_NORMS_FROM: |t| from _text_norm_kernel, launched before the forward, instead of summed by every
    program; score.ROWS_FROM: the transposed kernel, pixels as the product's rows, with those norms): the same scores
    (a zero text row and a zero pixel among them) and norms as the reference and as the default single launch, for
    shared and per-image text and every output layout; one pixel short of a threshold, the default's launch; float32
    maps always the default (each tile loaded once there)."""
    from denseclip_fast.ops.triton import score

    case = _plan_case(37, k, layout, text_batched)
    kernels = spy_launches(monkeypatch, score)

    def forward(rows_from: int | None, norms_from: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(score, "ROWS_FROM", rows_from)  # no cache_clear: the plans' cache key has both
        monkeypatch.setattr(score, "TEXT_NORMS_FROM", norms_from)
        kernels.clear()
        return _plan_forward(case, layout, dtype)

    pixels = 2 * 9 * 17
    sixteen_bit = dtype != torch.float32
    norms, rows = ["_text_norm_kernel", "_score_fwd_kernel"], ["_text_norm_kernel", "_score_fwd_rows_kernel"]
    plans = {  # (ROWS_FROM, TEXT_NORMS_FROM): the kernels launched
        (None, None): ["_score_fwd_kernel"],
        (pixels + 1, pixels + 1): ["_score_fwd_kernel"],
        (None, pixels): norms if sixteen_bit else ["_score_fwd_kernel"],
        (pixels, None): rows if sixteen_bit else ["_score_fwd_kernel"],
        (pixels, 0): rows if sixteen_bit else ["_score_fwd_kernel"],
    }
    results = {}
    for plan, launched in plans.items():
        results[plan] = forward(*plan)
        assert kernels == launched, (plan, kernels)
    default = results[(None, None)]
    assert torch.equal(results[(pixels + 1, pixels + 1)][0], default[0])
    for out, norm in results.values():
        _check_plan(out, norm, default, case[3], dtype, k)


@pytest.mark.parametrize(("dtype", "text_batched", "layout", "k"), [
    (torch.float16, False, "channels_last", 150), (torch.bfloat16, True, "concat", 171),
    (torch.float16, True, "contiguous", 40),
])  # fmt: skip
def test_triton_score_rows_kernel_with_a_tail_class_block(monkeypatch, dtype, text_batched, layout, k):
    """score.ROWS_TAIL_K: the rows kernel's classes as a block and a smaller tail block (rows_class_blocks), one
    program row over all of them: the reference's scores (a zero text row and a zero pixel among them, and a zero
    text row in the tail) and the default launch's |v|, for shared and per-image text and every output layout;
    without the switch, the rows kernel's one power-of-two block."""
    from denseclip_fast.ops.triton import score

    visual, text, feature, _ = _plan_case(37, k, layout, text_batched)
    text[..., k - 1, :] = 0  # in the tail: its text norm clamped as the first block's
    case = visual, text, feature, reference.pixel_text_score(visual, text, 0.7)
    kernels = spy_launches(monkeypatch, score)
    plans = spy_score_plans(monkeypatch)
    default = _plan_forward(case, layout, dtype)
    with score.forward_plan(0, None):
        _plan_forward(case, layout, dtype)
    assert (plans[-1].constexprs["BLOCK_K"], plans[-1].constexprs["BLOCK_K2"]) == (score._blocks(k)[1], 0)
    monkeypatch.setattr(score, "ROWS_TAIL_K", True)  # no cache_clear: the plans' cache key has it
    kernels.clear()
    with score.forward_plan(0, None):
        out, norm = _plan_forward(case, layout, dtype)
    assert kernels == ["_text_norm_kernel", "_score_fwd_rows_kernel"], kernels
    plan = plans[-1]
    blocks = plan.constexprs["BLOCK_K"], plan.constexprs["BLOCK_K2"]
    assert blocks == {150: (128, 32), 171: (128, 64), 40: (32, 16)}[k] and plan.grid[1] == 1, plan
    _check_plan(out, norm, default, case[3], dtype, k)
    assert (out[:, k - 1] == 0).all()
    # the rule: a tail only where it covers k in fewer columns than one power of two, and k fits one block
    assert [score.rows_class_blocks(n, True) for n in (1, 16, 17, 24, 100, 129, 200, 256, 300)] == [
        (16, 0), (16, 0), (32, 0), (32, 0), (128, 0), (128, 16), (256, 0), (256, 0), (256, 0)]  # fmt: skip
    assert score.rows_class_blocks(150, False) == (256, 0)


@pytest.mark.parametrize(("dtype", "text_batched", "layout", "k"), [
    (torch.float32, False, "contiguous", 21), (torch.float16, True, "channels_last", 1),
    (torch.bfloat16, False, "concat", 300), (torch.float16, False, "concat", 21),
    (torch.float32, True, "channels_last", 300),
])  # fmt: skip  (one class, one class block, several; each dtype, text kind and output layout)
def test_triton_score_forward_split_over_channels(monkeypatch, dtype, text_batched, layout, k):
    """score.SPLIT_C_PER_SM: the channels split over programs (_score_fwd_split_kernel; a tile's last program sums
    the partials) as many ways as the steps allow and at most 3 ways (a shorter last split), with and without the text
    norms' launch: the reference's scores (a zero text row and a zero pixel among them) and the default launch's |v|,
    for shared and per-image text and every output layout; without the switch, the default launch."""
    from denseclip_fast.ops.triton import score
    from denseclip_fast.ops.triton.common import dot_in_f32

    c = 100  # several steps of either channel block
    case = _plan_case(c, k, layout, text_batched)
    kernels = spy_launches(monkeypatch, score)
    plans = spy_score_plans(monkeypatch)

    def forward(per_sm: int | None, max_splits: int, norms_from: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(score, "MAX_SPLITS", max_splits)  # no cache_clear: the plans' cache key has it
        kernels.clear()
        with score.forward_plan(None, norms_from, per_sm):
            return _plan_forward(case, layout, dtype)

    default = forward(None, 8, None)
    assert kernels == ["_score_fwd_kernel"] and plans[-1].splits == 1
    block_c = score._blocks(k, dot_in_f32(dtype))[2]
    sixteen_bit = dtype != torch.float32
    for per_sm, max_splits, norms_from in ((64, 8, None), (64, 3, None), (64, 3, 0)):
        out, norm = forward(per_sm, max_splits, norms_from)
        plan = plans[-1]
        launched = ["_score_fwd_split_kernel"]
        if sixteen_bit and norms_from is not None:
            launched.insert(0, "_text_norm_kernel")
        assert kernels == launched, (per_sm, max_splits, norms_from, kernels)
        # every split a whole number of steps and none empty; a step each where the steps allow, else at most 3
        steps = -(-c // block_c)
        assert plan.per_split % block_c == 0 and (plan.splits - 1) * plan.per_split < c <= plan.splits * plan.per_split
        assert plan.splits == steps if steps <= max_splits else 1 < plan.splits <= max_splits, (steps, plan)
        assert plan.constexprs["BLOCK_P"] == score.SPLIT_BLOCK_P and plan.grid[1] == -(-k // plan.constexprs[
            "BLOCK_K"]) * plan.splits  # fmt: skip
        if max_splits == 3:
            assert c % plan.per_split, plan  # a shorter last split
        _check_plan(out, norm, default, case[3], dtype, k)


def test_triton_score_split_forward_only_the_last_arrival_writes(monkeypatch):
    """A tile's scores and |v| are written by its last program to arrive, none other: with every counter preset to
    the number of splits (no arrival is then the last), the split forward writes nothing of its output; with the
    counters at zero, all of it."""
    from denseclip_fast.ops.triton import score

    visual, text = _visual(2, 100, 5, 7, "contiguous", torch.float32), _text(2, 19, 100, True, torch.float32)
    plans = spy_score_plans(monkeypatch)
    real = score._tile_counts
    for preset, written in ((None, True), ("splits", False)):
        if preset:
            monkeypatch.setattr(score, "_tile_counts", lambda tiles, device: real(tiles, device) + plans[-1].splits)
        out = torch.full((2, 19, 5, 7), float("nan"), device=DEVICE)
        norm = torch.full((2, 5, 7), float("nan"), device=DEVICE)
        with score.forward_plan(None, None, 64):
            score.score_forward_into(out, norm, visual, text, 0.5)
        assert plans[-1].splits > 1
        assert (not out.isnan().any() and not norm.isnan().any()) if written else (out.isnan().all()
                                                                                 and norm.isnan().all())  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_score_reads_a_batch_strided_map_as_it_is(monkeypatch, layout):
    """A map whose images are each dense but lie apart by more than one image (the engine's local embedding map: a
    view of the attention pool's tokens past their first row) is read as it is, with its own batch stride, by the
    default, rows and split forwards: the scores and |v| of its contiguous copy, bit for bit, and no copy made (the
    plan says as_is, the kernel gets the view's memory). An overlapping batch stride (an expanded map) is copied."""
    from denseclip_fast.ops.triton import score

    b, c, h, w, k = 3, 40, 5, 7, 19
    tokens = torch.randn(b, 1 + h * w, c, dtype=torch.float64)
    maps = torch.randn(b, c + 2, h, w, dtype=torch.float64)

    def strided(dtype: torch.dtype) -> torch.Tensor:  # made in dtype (a cast of a view makes it dense)
        if layout == "channels_last":  # (B, 1 + HW, C) tokens: each image's pixels NHWC, one token row apart
            return tokens.to(DEVICE, dtype)[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2)
        return maps.to(DEVICE, dtype)[:, 1 : c + 1]  # each image NCHW, two channels' planes apart

    text = _text(b, k, c, False, torch.float32)
    plans, kernels = spy_score_plans(monkeypatch), []
    real = score.launch

    class FirstArguments:  # score.launch(kernel)[grid](visual, ...): the visual map each launch reads
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            run = real(self.kernel)[grid]
            return lambda *args, **kwargs: kernels.append(args[0]) or run(*args, **kwargs)

    monkeypatch.setattr(score, "launch", FirstArguments)
    for dtype, plan in ((torch.float32, (None, None)), (torch.bfloat16, (0, None)), (torch.float32, (None, None, 64))):
        v = strided(dtype)
        assert score_memory_format(v) == (torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        assert not v.is_contiguous(memory_format=score_memory_format(v)) and v.stride(0) > c * h * w
        with score.forward_plan(*plan), torch.no_grad():
            kernels.clear()
            got = torch.ops.denseclip_fast.pixel_text_score_triton(v, text.to(dtype), 0.5)
            assert plans[-1].as_is and plans[-1].visual_strides[0] == v.stride(0), plan
            assert kernels[-1].data_ptr() == v.data_ptr(), plan
            want = torch.ops.denseclip_fast.pixel_text_score_triton(v.contiguous(memory_format=score_memory_format(v)),
                                                                    text.to(dtype), 0.5)  # fmt: skip
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, plan)
    expanded = strided(torch.float32)[:1].expand(b, -1, -1, -1)
    with torch.no_grad():
        got = torch.ops.denseclip_fast.pixel_text_score_triton(expanded, text, 0.5)
    assert not plans[-1].as_is and torch.equal(got[0][0], got[0][2])
    # images that are not dense themselves (rows apart by more than a row, channels by more than a channel): copied
    nchw, nhwc = torch.randn(b, c, h, w + 2, device=DEVICE), torch.randn(b, h, w + 2, c, device=DEVICE)
    for loose in (nchw[..., 1 : w + 1], nhwc[:, :, 1 : w + 1].permute(0, 3, 1, 2)):
        with torch.no_grad():
            got = torch.ops.denseclip_fast.pixel_text_score_triton(loose, text, 0.5)
            want = torch.ops.denseclip_fast.pixel_text_score_triton(loose.contiguous(), text, 0.5)
        assert not plans[-2].as_is and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_triton_score_split_forward_trains_and_splits_only_where_programs_are_few(monkeypatch):
    """Gradients through a split forward are the reference's (the backward reads its scores and |v|); a grid with
    the programs SPLIT_C_PER_SM asks for already is not split; score.channel_splits' rule."""
    from denseclip_fast.ops.triton import score

    visual, text = _visual(1, 100, 5, 7, "channels_last", torch.float32), _text(1, 19, 100, False, torch.float32)
    kernels = spy_launches(monkeypatch, score)
    with score.forward_plan(None, None, 64):
        (out, v_grad, t_grad), (expected, v64_grad, t64_grad) = _score_with_reference(visual, text, 0.5, "triton")
    assert kernels[0] == "_score_fwd_split_kernel", kernels
    _check_close(out, expected, torch.float32)
    _check_close(v_grad, v64_grad, torch.float32, 2)
    _check_close(t_grad, t64_grad, torch.float32, 2)
    # one image per SM, 35 pixels: 2 programs per SM. Asked for 2, no split (2 splits would make 4); for 4, 2 splits
    sms = score._sm_count(visual.device)
    batch = visual.expand(sms, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    for per_sm, launched in ((2, "_score_fwd_kernel"), (4, "_score_fwd_split_kernel")):
        kernels.clear()
        with score.forward_plan(None, None, per_sm), torch.no_grad():
            out, _ = torch.ops.denseclip_fast.pixel_text_score_triton(batch, text, 0.5)
        assert kernels == [launched], (per_sm, kernels)
        _check_close(out[-1:], expected, torch.float32)
    # (programs, steps, SMs, per SM, most splits) -> (splits, steps a split)
    assert score.channel_splits(64, 32, 132, None, 8) == (1, 32)  # off
    assert score.channel_splits(200, 32, 132, 2, 8) == (1, 32)  # 2 x 200 programs would pass 2 a SM
    assert score.channel_splits(128, 32, 132, 2, 8) == (2, 16)  # the RN50/ADE shape at 32 pixels a program
    assert score.channel_splits(8, 32, 132, 2, 8) == (8, 4)  # the engine's batch-1 call: at most 8
    assert score.channel_splits(8, 3, 132, 2, 8) == (3, 1)  # no split without a step
    assert score.channel_splits(8, 7, 132, 2, 3) == (3, 3)  # 3, 3 and 1 steps
    assert score.channel_splits(8, 1, 132, 2, 8) == (1, 1) and score.channel_splits(8, 0, 132, 2, 8) == (1, 0)
    with score.forward_plan(None, None, 64), torch.no_grad():  # no channels: nothing to split, the scores zero
        out, norm = torch.ops.denseclip_fast.pixel_text_score_triton(visual[:, :0], text[:, :0], 0.5)
    assert not out.any() and not norm.any() and out.shape == (1, 19, 5, 7)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"split_c_per_sm must be None or programs per SM .*got {bad!r}"):
            with score.forward_plan(None, None, bad):  # type: ignore[arg-type]
                pass


def test_triton_score_indexes_in_int64_past_int32_offsets(monkeypatch):
    """An image whose element offsets pass int32 is indexed in int64 (decided from shapes and strides, checked here
    on meta tensors); the int64 kernels, forced on a small input, give the same scores and gradients."""
    from denseclip_fast.ops.triton import score

    assert not score._wide(torch.empty(1, 512, 2048, 2048, device="meta"))  # 2**31 elements: offsets up to 2**31-1
    big = torch.empty(1, 513, 2048, 2048, device="meta")
    assert score._wide(big) and score._wide(big.contiguous(memory_format=torch.channels_last))
    assert not score._wide(torch.empty(64, 256, 1024, 1024, device="meta"))  # 2**28 an image, 2**34 in all
    assert score._wide(torch.empty(1, 3, 2**30, device="meta")[:, ::2, :4])  # 8 elements, strides past int32
    monkeypatch.setattr(score, "WIDE_FROM", 1)
    feature, visual = torch.randn(2, 3, 5, 7, dtype=torch.float64), _visual(2, 40, 5, 7, "channels_last", torch.float64)
    text = torch.randn(2, 33, 40, dtype=torch.float64)
    f64, v64, t64 = (_leaf(x) for x in (feature, visual.cpu(), text))
    expected = reference.score_concat(f64, v64, t64, 2.0)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    f, v, t = (_leaf(x.to(DEVICE, torch.float32)) for x in (feature, visual, text))
    out = ops.score_concat(f, v, t, 2.0, backend="triton")
    out.backward(grad.to(DEVICE, torch.float32))
    _check_close(out, expected, torch.float32)
    for actual, wanted in ((f.grad, f64.grad), (v.grad, v64.grad), (t.grad, t64.grad)):
        _check_close(actual, wanted, torch.float32, 2)
    # the other forward plans (the text norms' launch and the rows kernel for 16-bit maps; the channels split), in
    # int64 too
    plans = spy_score_plans(monkeypatch)
    for plan, value in (("TEXT_NORMS_FROM", 0), ("ROWS_FROM", 0), ("SPLIT_C_PER_SM", 64)):
        monkeypatch.setattr(score, plan, value)
        with torch.no_grad():
            out = ops.score_concat(*(x.to(DEVICE, torch.float16) for x in (feature, visual, text)), 2.0,
                                   backend="triton")  # fmt: skip
        _check_close(out, expected, torch.float16)
        monkeypatch.setattr(score, plan, None)
    assert [(p.rows, p.text_norms, p.splits > 1, p.constexprs["WIDE"]) for p in plans] == [
        (False, True, False, True), (True, True, False, True), (False, False, True, True)]  # fmt: skip


def test_triton_score_plan_helpers_name_bad_arguments():
    """score.forward_plan takes None or a pixel count for each threshold and puts the thresholds back after;
    score.text_norms takes a contiguous (.., K, C) text and gives its rows' norms."""
    from denseclip_fast.ops.triton import score

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"norms_from must be None or a number of pixels .*got {bad!r}"):
            with score.forward_plan(None, bad):  # type: ignore[arg-type]
                pass
    with score.forward_plan(5, 0):
        assert (score.ROWS_FROM, score.TEXT_NORMS_FROM) == (5, 0)
    assert (score.ROWS_FROM, score.TEXT_NORMS_FROM) == (None, None)
    text = torch.randn(2, 3, 8, dtype=torch.float64).to(DEVICE, torch.float16)
    torch.testing.assert_close(score.text_norms(text), torch.linalg.vector_norm(text.float(), dim=-1))
    with pytest.raises(ValueError, match=r"text must be a contiguous \(.., K, C\) tensor, got shape \(8, 3\)"):
        score.text_norms(text[0].t())


def test_triton_attention_blocks_fit_the_gpu_shared_memory():
    """float32 attention takes smaller blocks than the 16-bit kernels (registers: tests/test_triton_aot.py checks
    that no kernel spills), and shrinks them further to a GPU's shared memory; the H200 keeps them, and every
    16-bit kernel keeps its blocks on every GPU."""
    from denseclip_fast.ops.triton import attention

    h200, a100, rtx4090 = 232448, 166912, 101376
    for kind in attention.KINDS:
        for d in attention.HEAD_DIMS:
            preferred, f32 = attention._blocks(150, d, kind), attention._blocks(150, d, kind, f32=True)
            assert f32[0] <= preferred[0] and f32[1] <= attention.F32_BLOCK_N <= preferred[1]
            assert attention._blocks(150, d, kind, f32=True, smem=h200) == f32  # no shrinking on the H200
            assert attention._blocks(150, d, kind, f32=False, smem=rtx4090) == preferred
            for smem in (a100, rtx4090, 65536):
                bm, bn = attention._blocks(150, d, kind, f32=True, smem=smem)
                assert attention.smem_estimate(kind, d, bm, bn) <= attention.SMEM_SHARE * smem, (kind, d, smem)
                assert 16 <= bm <= f32[0] and 16 <= bn <= f32[1]
    assert attention._blocks(150, 128, "fwd", f32=True, smem=rtx4090) != attention._blocks(150, 128, "fwd", f32=True)
    assert attention._blocks(150, 128, "dq", f32=True, smem=rtx4090) == attention._blocks(150, 128, "dq", f32=True)
    assert attention._blocks(150, 128, "dq", f32=True) == (32, 16)  # 68 KB: fits every GPU as it is
    assert attention._blocks(5, 64, "fwd") == (16, 64)  # few queries: a smaller query block
    assert [attention.num_warps(kind, False) for kind in attention.KINDS] == [4, 8, 8]
    assert {attention.num_warps(kind, True) for kind in attention.KINDS} == {8}
    assert attention._blocks(10, 64, "dq", f32=True) == (16, 16) and attention._blocks(10, 64, "dq") == (16, 64)
    with pytest.raises(ValueError, match="kind must be one of"):
        attention.smem_estimate("bwd", 64, 64, 64)


@pytest.mark.parametrize("d", [64, 128])
def test_triton_attention_at_the_blocks_of_a_smaller_gpu(monkeypatch, d):
    """float32 forward and backward at the shrunk blocks of a 48 KB GPU (16 to 64 rows, unequal BLOCK_M and BLOCK_N,
    fwd/dkdv/dq each their own) against the reference."""
    from denseclip_fast.ops.triton import attention

    monkeypatch.setattr(attention, "shared_memory_per_block", lambda device: 49152)
    assert any(attention._blocks(40, d, kind, True, 49152) != attention._blocks(40, d, kind, True)
               for kind in attention.KINDS)  # fmt: skip
    _check_attention(*(torch.randn(1, 2, n, d, device=DEVICE) for n in (40, 70, 70)), "triton")


def test_reference_attention_is_sdpa():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    assert torch.allclose(reference.attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                          atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------------------------------------ registration


def test_gradcheck_cpu_kernels_float64():
    backend = "cuda" if DEVICE == "cuda" else "cpu"
    v = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    tb = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    f = torch.randn(2, 2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: ops.pixel_text_score(v, t, 1.5, backend=backend), (v, t))
    assert torch.autograd.gradcheck(lambda v, t: ops.pixel_text_score(v, t, backend=backend), (v, tb))
    assert torch.autograd.gradcheck(lambda f, v, t: ops.score_concat(f, v, t, backend=backend), (f, v, t))
    q, k, vv = (torch.randn(1, 2, n, 8, dtype=torch.float64, device=DEVICE, requires_grad=True) for n in (3, 5, 5))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.context_attention(q, k, v, backend=backend), (q, k, vv))


def test_create_graph_gives_the_first_derivatives_and_a_second_is_an_error():
    """torch.autograd.grad(..., create_graph=True) (gradient penalties, Hessian-vector code) with a text that
    requires grad: the C++ backward kernels ran their ATen calls under autograd, and the out= matrix products failed
    ('functions with out=... arguments don't support automatic differentiation'). Now the first derivatives equal
    those without create_graph, and differentiating them again is an error naming the backward operator (not
    torch's default: a warning and a missing term)."""
    backend = "cuda" if DEVICE == "cuda" else "cpu"
    v = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    q, k, vv = (torch.randn(1, 2, n, 32, device=DEVICE, requires_grad=True) for n in (3, 5, 5))
    cases = ((lambda: ops.pixel_text_score(v, t, 1.5, backend=backend), (v, t), "pixel_text_score_backward"),
             (lambda: ops.context_attention(q, k, vv, backend=backend), (q, k, vv), "context_attention_backward"))
    for forward, inputs, name in cases:  # fmt: skip
        out = forward()
        weight = torch.randn_like(out)
        expected = torch.autograd.grad((out * weight).sum(), inputs)
        grads = torch.autograd.grad((forward() * weight).sum(), inputs, create_graph=True)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=f"derivative for denseclip_fast::{name} is not implemented"):
            sum(g.square().sum() for g in grads).backward()


def _opcheck_cases(suffix: str, dtype: torch.dtype):
    lib = torch.ops.denseclip_fast
    v = torch.randn(2, 6, 3, 4, dtype=dtype, device=DEVICE)
    t = torch.randn(5, 6, dtype=dtype, device=DEVICE)
    f = torch.randn(2, 3, 3, 4, dtype=dtype, device=DEVICE)
    q, k, vv = (torch.randn(1, 2, n, 16, dtype=dtype, device=DEVICE) for n in (3, 5, 5))
    yield getattr(lib, f"pixel_text_score{suffix}").default, (v, t, 1.5)
    yield getattr(lib, f"pixel_text_score{suffix}").default, (v.contiguous(memory_format=torch.channels_last), t, 1.0)
    yield getattr(lib, f"score_concat{suffix}").default, (f, v, t, 1.0)
    yield getattr(lib, f"context_attention{suffix}").default, (q, k, vv)


@pytest.mark.parametrize("suffix, dtype", [("", torch.float64), ("_triton", torch.float32)])
def test_opcheck(suffix, dtype):
    assert ops.backends.triton_available() is None  # also registers the Triton operators
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if suffix == "_triton" and DEVICE == "cpu":
        # AOT dispatch traces the triton_op body into Triton's higher-order op, which the interpreter cannot run on
        # traced storages; the GPU run of this suite checks it.
        utils.remove("test_aot_dispatch_dynamic")
    for op, args in _opcheck_cases(suffix, dtype):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        result = torch.library.opcheck(op, args, test_utils=utils)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_compile_fullgraph_and_export_trace_the_operators():
    def block(feature, visual, text, q, k, v):
        merged = ops.score_concat(feature, visual, text)
        return merged.sum() + ops.context_attention(q, k, v).sum() + ops.pixel_text_score(visual, text, 2.0).sum()

    args = (torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4), torch.randn(5, 8),
            *(torch.randn(1, 2, n, 16) for n in (5, 7, 7)))  # fmt: skip
    args = tuple(a.to(DEVICE) for a in args)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(*args), block(*args), rtol=1e-5)

    class Block(torch.nn.Module):
        def forward(self, *xs):
            return block(*xs)

    graph = torch.export.export(Block(), args).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    suffix = "_triton" if ops.backends.resolve("score_concat", args[0].device, args[0].dtype) == "triton" else ""
    expected = {f"denseclip_fast.{name}{suffix}.default" for name in ops.library.OPS}
    assert expected <= targets, targets


@pytest.mark.slow
def test_compile_fullgraph_takes_a_scale_that_changes_between_calls():
    """torch.compile traces a float argument whose value changed since the last call as a symbolic float, on which
    check_scale's math.isfinite broke the graph (fullgraph: an error; dynamic=True: at the first call)."""
    v, t = torch.randn(1, 4, 2, 3, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    for dynamic in (None, True):
        compiled = torch.compile(lambda v, t, s: ops.pixel_text_score(v, t, s) + ops.score_concat(v, v, t, s)[:, 4:],
                                 fullgraph=True, backend="aot_eager", dynamic=dynamic)  # fmt: skip
        for scale in (0.5, 2.0, 3.0):
            expected = 2 * ops.pixel_text_score(v, t, scale, backend="reference")
            torch.testing.assert_close(compiled(v, t, scale), expected, rtol=1e-5, atol=1e-5)


def test_inductor_compiles_the_cpu_operators():
    def f(visual, text, q, k, v):
        return ops.pixel_text_score(visual.relu(), text) * 2, ops.context_attention(q, k, v) + 1

    args = (torch.randn(2, 8, 4, 4), torch.randn(5, 8), *(torch.randn(1, 2, n, 16) for n in (5, 7, 7)))
    expected = f(*args)
    actual = torch.compile(f, fullgraph=True)(*args)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=1e-5)


# ------------------------------------------------------------------------------------------------ backends


def test_auto_backend_per_device(monkeypatch):
    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    cpu, f32 = torch.device("cpu"), torch.float32
    assert ops.backends.resolve("pixel_text_score", cpu, f32) == "cpu"
    assert ops.backends.resolve("context_attention", cpu, torch.float64, head_dim=24) == "cpu"


def test_forcing_a_backend(monkeypatch):
    visual, text = torch.randn(1, 4, 2, 2), torch.randn(3, 4)
    monkeypatch.setenv("DENSECLIP_FAST_BACKEND", "reference")
    assert torch.equal(ops.pixel_text_score(visual, text), reference.pixel_text_score(visual, text))
    assert ops.backends.resolve("pixel_text_score", visual.device, visual.dtype) == "reference"
    assert ops.backends.resolve("pixel_text_score", visual.device, visual.dtype, backend="cpu") == "cpu"  # kwarg wins
    monkeypatch.setenv("DENSECLIP_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"DENSECLIP_FAST_BACKEND='fastest' is not a backend"):
        ops.pixel_text_score(visual, text)
    monkeypatch.setenv("DENSECLIP_FAST_BACKEND", "")  # set but empty, as `export VAR=` leaves it: auto
    assert ops.backends.resolve("pixel_text_score", visual.device, visual.dtype) == "cpu"


@pytest.mark.skipif(not ops.extension_available() or ops.build_info()["cuda"] is None,
                    reason="needs the extension's CUDA kernels")  # fmt: skip
def test_a_gpu_the_cuda_kernels_were_not_built_for(monkeypatch):
    """An sm_80 GPU with a build for sm_90: the cuda backend says so (and how to rebuild), auto takes another."""
    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(ops.backends, "_memo", {})
    built = ops.build_info()["cuda"]["archs"]
    other = next(a for a in (80, 86, 89, 90, 100) if a not in built)
    monkeypatch.setattr(ops.backends, "_device_arch", lambda device: other)
    gpu = torch.device("cuda", 0)
    why = ops.backends.unavailable_reason("cuda", "pixel_text_score", gpu, torch.float32)
    assert why is not None and f"this GPU is sm_{other}" in why and f"TORCH_CUDA_ARCH_LIST={other // 10}." in why
    with pytest.raises(RuntimeError, match=f"backend 'cuda' .* this GPU is sm_{other}"):
        ops.backends.resolve("pixel_text_score", gpu, torch.float32, backend="cuda")
    assert ops.backends.resolve("context_attention", gpu, torch.float32, head_dim=8) == "reference"
    # while torch.compile traces, the eager call's answer holds
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert f"this GPU is sm_{other}" in ops.backends.unavailable_reason("cuda", "pixel_text_score", gpu, torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(ops.backends, "_memo", {})
    monkeypatch.setattr(ops.backends, "_device_arch", lambda device: built[0])
    assert ops.backends.unavailable_reason("cuda", "pixel_text_score", gpu, torch.float32) is None


def _a_cuda_build_for(monkeypatch, archs, gpu_arch):
    """A machine whose extension has CUDA kernels for ``archs`` and whose GPU is sm_``gpu_arch`` (no GPU needed)."""
    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(ops.backends, "_memo", {})
    monkeypatch.setattr(ops.backends, "build_info", lambda: {"cuda": {"archs": archs}})
    monkeypatch.setattr(ops.backends, "extension_available", lambda: True)
    monkeypatch.setattr(ops.backends, "_device_arch", lambda device: gpu_arch)


@pytest.mark.parametrize("gpu_arch, runs", [(80, True), (86, True), (89, True), (90, False), (75, False), (100, False)])
def test_a_build_runs_on_the_minor_versions_above_it(monkeypatch, gpu_arch, runs):
    """CUDA's binary compatibility: a build for sm_80 runs on sm_86 and sm_89 GPUs (an A10, an L4), not on sm_90 (no
    PTX is relied on) nor on an older GPU; the cuda backend accepts or refuses accordingly."""
    _a_cuda_build_for(monkeypatch, [80], gpu_arch)
    why = ops.backends.unavailable_reason("cuda", "pixel_text_score", torch.device("cuda", 0), torch.float32)
    assert (why is None) == runs, why
    if not runs:
        assert f"built for sm_80 and this GPU is sm_{gpu_arch}" in why


def test_triton_needs_an_ampere_or_newer_gpu(monkeypatch):
    """A Turing GPU (sm_75, a T4): the Triton kernels say why they cannot run it; Ampere and newer can."""
    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(ops.backends, "_memo", {})
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    why = ops.backends.unavailable_reason("triton", "pixel_text_score", gpu, torch.float16)
    assert why is not None and "need sm_80+" in why and "this GPU is sm_75" in why
    with pytest.raises(RuntimeError, match="backend 'triton' .* this GPU is sm_75"):
        ops.backends.resolve("pixel_text_score", gpu, torch.float16, backend="triton")
    # while torch.compile / torch.export trace, the eager call's answer holds (no device query in the trace)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "this GPU is sm_75" in ops.backends.unavailable_reason("triton", "pixel_text_score", gpu, torch.float16)
    assert ops.backends.resolve("pixel_text_score", gpu, torch.float16) != "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(ops.backends, "_memo", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    if ops.backends.triton_available() is None:
        assert ops.backends.unavailable_reason("triton", "pixel_text_score", gpu, torch.float16) is None


def test_device_queries_are_memoised_and_asked_by_traces(monkeypatch):
    """The shared memory per block (the Triton attention's blocks depend on it) and the compute capability are asked
    once per GPU, None for CPU tensors; a trace asks them too (the first call of a process may be a compiled one),
    and where a trace of fake CUDA tensors finds no GPU the answer is None, not kept."""
    from types import SimpleNamespace

    monkeypatch.setattr(ops.backends, "_memo", {})
    asked = []

    def properties(index):
        asked.append(index)
        return SimpleNamespace(shared_memory_per_block_optin=1000 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.backends.shared_memory_per_block(torch.device("cuda", 1)) == 1001 and asked == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    for _ in range(2):
        assert ops.backends.shared_memory_per_block(torch.device("cuda", 1)) == 1001
        assert ops.backends.shared_memory_per_block(torch.device("cuda", 2)) == 1002
    assert asked == [1, 2]
    assert ops.backends.shared_memory_per_block(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert ops.backends.shared_memory_per_block(torch.device("cuda")) == 1002 and asked == [1, 2]

    def failing(index=None):
        raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "get_device_capability", failing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):  # a machine with a GPU: the error as it is
        ops.backends.gpu_arch(torch.device("cuda", 3))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops.backends.gpu_arch(torch.device("cuda", 3)) is None  # none to ask (fake CUDA tensors traced)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    assert ops.backends.gpu_arch(torch.device("cuda", 3)) == 86  # the None was not kept


def test_trace_time_constants_are_marked_as_torch_marks_them():
    """ops.backends marks its device queries for Dynamo by hand (torch's decorator imports torch._dynamo): the
    marking must be the one torch.compiler.assume_constant_result makes, or traces would read them as code."""

    def probe() -> None:
        pass

    marked = torch.compiler.assume_constant_result(probe)
    flags = {name: value for name, value in vars(marked).items()}
    assert flags and all(getattr(ops.backends._asked, name, None) == value for name, value in flags.items())
    for fn in (ops.backends._cuda_kernels_built, ops.backends.triton_available):
        assert all(getattr(fn, name, None) == value for name, value in flags.items())


def test_a_compiled_first_call_chooses_its_backend_for_the_gpu(monkeypatch):
    """torch.compile(fullgraph=True) of code whose first call in the process is the compiled one: the backend choice
    and the Triton attention's blocks come from the GPU, asked while Dynamo traces (a constant in the graph), not
    from the defaults of an H200 (a T4 then chose Triton, an sm_86 GPU took blocks larger than its shared memory)."""
    from types import SimpleNamespace

    from denseclip_fast.ops.triton import attention

    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(ops.backends, "_memo", {})
    capability = {1: (7, 5), 2: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(shared_memory_per_block_optin=101376))  # fmt: skip

    def compiled(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        gpu = torch.device("cuda", index)

        def choice(x: torch.Tensor) -> torch.Tensor:
            triton = ops.backends.resolve("context_attention", gpu, torch.float32, head_dim=128) == "triton"
            smem, arch = ops.backends.shared_memory_per_block(gpu), ops.backends.gpu_arch(gpu)
            block_m, block_n = attention._blocks(256, 128, "fwd", True, smem, arch)
            return x + (1000 if triton else 0) + 10 * block_m + block_n

        torch._dynamo.reset()  # a new trace, not a recompile of choice's code with its closure's int made dynamic
        return torch.compile(choice, fullgraph=True, backend="eager")

    assert compiled(1)(torch.zeros(1)).item() == 10 * 32 + 32  # sm_75: no Triton; sm_86 blocks
    triton = ops.backends.triton_available() is None
    fwd = attention._blocks(256, 128, "fwd", True, 101376, 86)
    assert fwd != attention._blocks(256, 128, "fwd", True)  # the defaults (an H200's), ~108 KB: more than 99 KB
    assert compiled(2)(torch.zeros(1)).item() == (1000 if triton else 0) + 10 * fwd[0] + fwd[1]
    assert ops.backends._memo[("cc", 1)] == 75 and ops.backends._memo[("smem", 2)] == 101376


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_unavailable_backends_say_why():
    visual, text = torch.randn(1, 4, 2, 2), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend 'cuda' .* runs CUDA tensors, these are on cpu"):
        ops.pixel_text_score(visual, text, backend="cuda")
    with pytest.raises(RuntimeError, match="not float64"):
        ops.pixel_text_score(visual.double(), text.double(), backend="triton")
    q = torch.randn(1, 1, 2, 24)
    with pytest.raises(RuntimeError, match=r"head dims \(16, 32, 64, 128\), got 24"):
        ops.context_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="backend='gpu' is not a backend"):
        ops.context_attention(q, q, q, backend="gpu")


# ------------------------------------------------------------------------------------------------ bad input

BAD_SCORE = [
    (torch.randn(2, 3, 4), torch.randn(5, 3), ValueError, r"visual must be a \(B, C, H, W\) tensor"),
    (torch.randn(1, 3, 2, 2), torch.randn(5), ValueError, r"text must be a \(K, C\) or \(B, K, C\)"),
    (torch.randn(1, 3, 2, 2), torch.randn(5, 4), ValueError, "text has C=4 channels but visual has C=3"),
    (torch.randn(1, 3, 2, 2), torch.randn(0, 3), ValueError, "K >= 1"),
    (torch.randn(2, 3, 2, 2), torch.randn(3, 5, 3), ValueError, "per-batch text has B=3 but visual has B=2"),
    (torch.ones(1, 3, 2, 2, dtype=torch.int64), torch.randn(5, 3), ValueError, "visual must be a float32"),
    (torch.randn(1, 3, 2, 2).to(torch.float8_e4m3fn), torch.randn(5, 3).to(torch.float8_e4m3fn), ValueError,
     "visual must be a float32, float64, float16 or bfloat16 tensor, got dtype torch.float8_e4m3fn"),
    (torch.randn(1, 3, 2, 2), torch.randn(5, 3, dtype=torch.float64), ValueError, "same dtype"),
    (torch.randn(1, 3, 2, 2), torch.randn(5, 3, device="meta"), ValueError, "same device"),
]


@pytest.mark.parametrize("visual, text, error, match", BAD_SCORE)
def test_bad_score_inputs(visual, text, error, match):
    with pytest.raises(error, match=match):
        ops.pixel_text_score(visual, text)
    with pytest.raises(error, match=match):
        ops.score_concat(torch.randn(visual.shape[0], 2, *visual.shape[2:]) if visual.dim() == 4 else visual,
                         visual, text)  # fmt: skip


@pytest.mark.parametrize(
    "scale, match",
    [
        (torch.tensor(2.0, requires_grad=True), "scale must be a Python number, got a tensor"),
        (torch.tensor(2.0), "scale must be a Python number, got a tensor"),
        ("2", "scale must be a real number, got str '2'"),
        (None, "scale must be a real number, got NoneType None"),
        (True, "scale must be a real number, got bool True"),
        (1j, "scale must be a real number, got complex"),
        (float("nan"), "scale must be finite, got nan"),
        (-math.inf, "scale must be finite, got -inf"),
        (2**1100, "scale must be finite, got inf"),
    ],
    ids=["tensor_grad", "tensor", "str", "none", "bool", "complex", "nan", "-inf", "huge_int"],
)
def test_bad_scale(scale, match):
    """A scale that float() would have coerced (a tensor, whose gradient would silently be lost; a string) or that
    would make every score NaN/inf is refused on every backend; numpy and integer scales are real numbers."""
    visual, text = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for backend in ("reference", None):
        with pytest.raises(ValueError, match=re.escape(match)):
            ops.pixel_text_score(visual, text, scale, backend=backend)
        with pytest.raises(ValueError, match=re.escape(match)):
            ops.score_concat(visual, visual, text, scale, backend=backend)
    expected = reference.pixel_text_score(visual, text, 2.0)
    for scale in (2, np.float32(2.0), np.int64(2)):
        torch.testing.assert_close(ops.pixel_text_score(visual, text, scale), expected)


def test_bad_concat_feature():
    visual, text = torch.randn(2, 3, 4, 4), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"must agree in B, H and W"):
        ops.score_concat(torch.randn(2, 3, 4, 5), visual, text)
    with pytest.raises(ValueError, match="feature must match visual's dtype"):
        ops.score_concat(torch.randn(2, 3, 4, 4, dtype=torch.float64), visual, text)
    for feature, shown in ((torch.randn(2, 3, 16), "shape (2, 3, 16)"), (None, "NoneType")):
        with pytest.raises(ValueError, match=re.escape("feature must be a (B, C_feat, H, W) tensor, got")) as info:
            ops.score_concat(feature, visual, text)
        assert shown in str(info.value)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 1, 3, 8), (2, 1, 0, 8), (2, 1, 0, 8)), r"Lk >= 1"),
        (((2, 1, 3, 8), (2, 1, 4, 8), (2, 1, 5, 8)), "k and v must have the same shape"),
        (((2, 1, 3, 8), (2, 2, 4, 8), (2, 2, 4, 8)), "must agree in B, heads and D"),
        (((2, 3, 8),) * 3, r"q must be a \(B, heads, L, D\) tensor"),
    ],
)
def test_bad_attention_inputs(shapes, match):
    with pytest.raises(ValueError, match=match):
        ops.context_attention(*(torch.randn(s) for s in shapes))
    with pytest.raises(ValueError, match="q must be a float32"):
        ops.context_attention(torch.ones(1, 1, 2, 4, dtype=torch.int32), *(torch.randn(1, 1, 2, 4) for _ in "kv"))
    with pytest.raises(ValueError, match="q must be a float32, float64, float16 or bfloat16 tensor, got dtype torch.f"):
        ops.context_attention(*(torch.randn(1, 1, 2, 4).to(torch.float8_e5m2) for _ in "qkv"))


def test_attention_inputs_of_mixed_dtypes_or_devices_or_no_head_dim_are_refused_naming_them():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"^q, k and v must have the same dtype, got torch.float32, torch.float64, "
                                         r"torch.float32$"):  # fmt: skip
        ops.context_attention(q, q.double(), q)
    with pytest.raises(ValueError, match=r"^q, k and v must be on the same device, got cpu, cpu, meta$"):
        ops.context_attention(q, q, q.to("meta"))
    empty = torch.randn(1, 2, 3, 0)
    with pytest.raises(ValueError, match=r"^the head dim D must be >= 1, got 0$"):
        ops.context_attention(empty, empty, empty)


def test_sparse_or_nested_inputs_are_refused_naming_them():
    """A sparse or nested tensor met the dispatcher's "Could not run 'denseclip_fast::pixel_text_score' with arguments
    from the 'SparseCPU' backend" (the reference backend: "norm_sparse currently only supports full reductions");
    each is a ValueError naming the argument, on every backend."""
    visual, text, q = torch.randn(2, 8, 5, 6), torch.randn(3, 8), torch.randn(1, 2, 3, 8)
    for backend in (None, "reference"):
        for args, name in (((visual.to_sparse(), text), "visual"), ((visual, text.to_sparse()), "text")):
            for call in (lambda: ops.pixel_text_score(*args, backend=backend),
                         lambda: ops.score_concat(visual, *args, backend=backend)):  # fmt: skip
                with pytest.raises(ValueError, match=f"^{name} must be a dense \\(strided\\) tensor, got layout"):
                    call()
        with pytest.raises(ValueError, match=r"^feature must be a dense \(strided\) tensor, got layout torch.sparse"):
            ops.score_concat(visual.to_sparse(), visual, text, backend=backend)
        nested = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 4, 8)], layout=torch.jagged)
        for i, name in enumerate("qkv"):
            for bad, what in ((q.to_sparse(), "layout torch.sparse_coo"), (nested, "a nested tensor")):
                args = [q, q, q]
                args[i] = bad
                with pytest.raises(ValueError, match=re.escape(f"{name} must be a dense (strided) tensor, got {what}")):
                    ops.context_attention(*args, backend=backend)


def test_the_raw_operators_check_their_inputs_too():
    """torch.ops.denseclip_fast.* called directly (bypassing the Python checks) raise RuntimeError, never crash."""
    lib = torch.ops.denseclip_fast
    with pytest.raises(RuntimeError, match="pixel_text_score: text has C=4 channels but visual has C=3"):
        lib.pixel_text_score(torch.randn(1, 3, 2, 2), torch.randn(5, 4), 1.0)
    with pytest.raises(RuntimeError, match="pixel_text_score: visual must be float32, float64, float16 or bfloat16"):
        lib.pixel_text_score(torch.ones(1, 3, 2, 2, dtype=torch.int64), torch.ones(5, 3, dtype=torch.int64), 1.0)
    with pytest.raises(RuntimeError, match="context_attention: q must be float32, float64, float16 or bfloat16"):
        lib.context_attention(*(torch.randn(1, 1, 2, 4).to(torch.float8_e4m3fn) for _ in "qkv"))
    with pytest.raises(RuntimeError, match="score_concat: feature must be"):
        lib.score_concat(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 2, 2), torch.randn(5, 3), 1.0)
    with pytest.raises(RuntimeError, match="context_attention: k and v must hold at least one token"):
        lib.context_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4))
    with pytest.raises(RuntimeError, match="pixel_text_score_backward: grad must be"):
        lib.pixel_text_score_backward(torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2), torch.randn(5, 3), 1.0)
    grad, visual, text = torch.randn(1, 5, 2, 2), torch.randn(1, 3, 2, 2), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match=r"pixel_text_score_backward: score_map must be \(B, K, H, W\) = \(1, 5"):
        lib.pixel_text_score_backward(grad, visual, text, 1.0, torch.randn(1, 4, 2, 2))
    with pytest.raises(RuntimeError, match="pixel_text_score_backward: score_map must match visual's dtype"):
        lib.pixel_text_score_backward(grad, visual, text, 1.0, torch.randn(1, 5, 2, 2, dtype=torch.float64))
    # the fake kernels check as the kernels do: tracing with wrong shapes fails, not a graph that crashes later
    with pytest.raises(ValueError, match="text has C=4 channels but visual has C=3"):
        lib.pixel_text_score(torch.randn(1, 3, 2, 2, device="meta"), torch.randn(5, 4, device="meta"), 1.0)


@pytest.mark.skipif(ops.backends.triton_available() is not None, reason="needs Triton")
def test_the_triton_operators_check_their_inputs_too():
    """torch.ops.denseclip_fast.*_triton called directly: the kernels index memory by the shapes, so a mismatch is a
    ValueError naming the argument (it read past the text or returned junk), as are what the kernels do not take."""
    lib = torch.ops.denseclip_fast
    dev = DEVICE
    visual, text, grad = torch.randn(3, 3, 2, 2, device=dev), torch.randn(5, 3, device=dev), torch.randn(3, 5, 2, 2)
    cases = [
        (lambda: lib.pixel_text_score_triton(visual, torch.randn(1, 5, 3, device=dev), 1.0),
         "per-batch text has B=1 but visual has B=3"),
        (lambda: lib.pixel_text_score_triton(torch.randn(1, 8, 2, 2, device=dev), text, 1.0),
         "text has C=3 channels but visual has C=8"),
        (lambda: lib.pixel_text_score_triton(visual.int(), text.int(), 1.0), "visual must be a float32"),
        (lambda: lib.pixel_text_score_triton(visual.double(), text.double(), 1.0),
         "pixel_text_score_triton: the Triton kernels take float32, float16 and bfloat16, not float64"),
        (lambda: lib.score_concat_triton(torch.randn(3, 2, 2, 3, device=dev), visual, text, 1.0),
         "must agree in B, H and W"),
        (lambda: lib.pixel_text_score_backward_triton(grad[:, :4].to(dev), visual, text, 1.0),
         r"grad must be the gradient of the \(B, K, H, W\) score, shape \(3, 5, 2, 2\)"),
        (lambda: lib.pixel_text_score_backward_triton(grad.to(dev), visual, text, 1.0, None,
                                                      torch.ones(3, 2, 2, device=dev, dtype=torch.float64)),
         "norm must be"),
        (lambda: lib.context_attention_triton(*(torch.randn(1, 1, n, 32, device=dev) for n in (3, 0, 0))),
         "at least one token"),
        (lambda: lib.context_attention_triton(torch.randn(1, 1, 3, 32, device=dev),
                                              *(torch.randn(1, 1, 4, 16, device=dev) for _ in range(2))),
         "must agree in B, heads and D"),
        (lambda: lib.context_attention_triton(*(torch.randn(1, 1, 4, 24, device=dev) for _ in range(3))),
         "context_attention_triton: the Triton attention kernel takes head dims"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    q = torch.randn(1, 2, 3, 32, device=dev)
    out, lse = lib.context_attention_triton(q, q, q)
    with pytest.raises(ValueError, match="lse must be"):
        lib.context_attention_backward_triton(out, q, q, q, out, lse[:, :1])
    with pytest.raises(ValueError, match="grad_out must match q"):
        lib.context_attention_backward_triton(out[:, :1], q, q, q, out, lse)


def test_flop_counter_counts_the_fused_operators_as_the_reference():
    """FlopCounterMode sees the C++ operators (registered formulas), forward and backward, with the count of the
    reference's aten decomposition; without the formulas a model's count would miss them."""
    from torch.utils.flop_counter import FlopCounterMode

    backend = "cuda" if DEVICE == "cuda" else "cpu"

    def count(name: str) -> tuple[int, int]:
        v, t = (torch.randn(*shape, device=DEVICE, requires_grad=True) for shape in ((2, 24, 5, 7), (3, 24)))
        f = torch.randn(2, 6, 5, 7, device=DEVICE)
        q, k = (torch.randn(1, 2, n, 32, device=DEVICE, requires_grad=True) for n in (5, 9))
        with FlopCounterMode(display=False) as forward:
            s = ops.pixel_text_score(v, t, backend=name)
            c = ops.score_concat(f, v, t, backend=name)
            a = ops.context_attention(q, k, k, backend=name)
        with FlopCounterMode(display=False) as backward:
            (s.sum() + c.sum() + a.sum()).backward()
        return forward.get_total_flops(), backward.get_total_flops()

    fused, ref = count(backend), count("reference")
    score, attention = 2 * 2 * 3 * 24 * 35, 4 * 2 * 5 * 9 * 32
    assert fused[0] == ref[0] == 2 * score + attention
    # backward: two GEMMs per score operator (pixels and text), four products for the attention
    assert fused[1] == ref[1] == 2 * (2 * score) + 2 * attention


def test_flop_formulas_are_registered_when_flop_counter_is_imported_before_or_after_the_package():
    """The formulas go in when torch.utils.flop_counter is imported (ops.library.after_import), not at the package's
    import, which would import Triton through it: in fresh processes, the counter imported after denseclip_fast
    and before it both count the operators."""
    import subprocess
    import sys

    count = ("from torch.utils.flop_counter import FlopCounterMode\n"
             "v, t = torch.randn(2, 24, 5, 7), torch.randn(3, 24)\n"
             "with FlopCounterMode(display=False) as c:\n"
             "    ops.pixel_text_score(v, t, backend='cpu')\n"
             "print(c.get_total_flops(), 'torch.utils.flop_counter' in imported)\n")  # fmt: skip
    package = "from denseclip_fast import ops\nimported = set(sys.modules)\n"
    for first, imported in (("", "False"), (", torch.utils.flop_counter", "True")):
        code = f"import sys, torch{first}\n" + package + count
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == [str(2 * 2 * 3 * 24 * 35), imported]


def test_after_import_runs_its_callback_once_the_module_has_executed(tmp_path, monkeypatch):
    """after_import: the callback runs at once for an imported module, else after the module's code (which sees
    its own loader), once; a spec looked up without an import runs nothing; a module that fails to execute keeps
    the hook for the next try; a failing callback warns and the import goes on."""
    import importlib
    import importlib.util
    import sys

    from denseclip_fast.ops.library import _AfterImport, after_import

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # whatever a failure leaves behind
    seen: list[str] = []
    (tmp_path / "dcf_probe_ok.py").write_text("import sys\nSEEN_LOADER = type(__loader__).__name__\n"
                                              "sys.modules[__name__].EXECUTED = True\n")  # fmt: skip
    after_import("dcf_probe_ok", lambda: seen.append("ok"))
    assert seen == [] and importlib.util.find_spec("dcf_probe_ok") is not None and seen == []
    module = importlib.import_module("dcf_probe_ok")
    assert seen == ["ok"] and module.EXECUTED and module.SEEN_LOADER == "SourceFileLoader"
    assert type(module.__loader__).__name__ == type(module.__spec__.loader).__name__ == "SourceFileLoader"
    assert not any(isinstance(f, _AfterImport) for f in sys.meta_path)
    importlib.reload(module)
    after_import("dcf_probe_ok", lambda: seen.append("now"))
    assert seen == ["ok", "now"]  # once each: at the import, and at once for a module already there

    (tmp_path / "dcf_probe_bad.py").write_text("raise ImportError('not yet')\n")
    after_import("dcf_probe_bad", lambda: seen.append("bad"))
    with pytest.raises(ImportError, match="not yet"):
        importlib.import_module("dcf_probe_bad")
    assert seen == ["ok", "now"] and any(isinstance(f, _AfterImport) for f in sys.meta_path)
    (tmp_path / "dcf_probe_bad.py").write_text("VALUE = 1\n")
    importlib.invalidate_caches()
    sys.modules.pop("dcf_probe_bad", None)
    assert importlib.import_module("dcf_probe_bad").VALUE == 1 and seen == ["ok", "now", "bad"]

    (tmp_path / "dcf_probe_hook_fails.py").write_text("VALUE = 2\n")
    after_import("dcf_probe_hook_fails", lambda: 1 / 0)
    with pytest.warns(RuntimeWarning, match="dcf_probe_hook_fails imported, but its hook failed: ZeroDivisionError"):
        assert importlib.import_module("dcf_probe_hook_fails").VALUE == 2
    assert not any(isinstance(f, _AfterImport) for f in sys.meta_path)
    for name in ("dcf_probe_ok", "dcf_probe_bad", "dcf_probe_hook_fails"):
        sys.modules.pop(name, None)


def _three_ops(backend: str) -> list[tuple[str, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]:
    """(name, f(*inputs) through ``backend``, float32 inputs) of each operator: odd sizes, text shared and per image."""
    visual = _visual(2, 13, 3, 5, "channels_last", torch.float32)
    text, text_b = _text(2, 4, 13, False, torch.float32), _text(2, 4, 13, True, torch.float32)
    feature = torch.randn(2, 3, 3, 5, device=DEVICE)
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE) for n in (3, 7, 7))
    return [
        ("pixel_text_score", lambda a, b: ops.pixel_text_score(a, b, 2.0, backend=backend), (visual, text)),
        ("pixel_text_score", lambda a, b: ops.pixel_text_score(a, b, 2.0, backend=backend), (visual, text_b)),
        ("score_concat", lambda f, a, b: ops.score_concat(f, a, b, 0.5, backend=backend), (feature, visual, text)),
        ("context_attention", lambda a, b, c: ops.context_attention(a, b, c, backend=backend), (q, k, v)),
    ]


@pytest.mark.parametrize("backend", sorted({b for b, _ in BACKEND_DTYPES}))
def test_forward_mode_ad_and_torch_func_transforms_give_the_references_derivatives(backend):
    """The fused operators' autograd is reverse mode: under forward-mode AD torch gave their outputs no tangent
    (zero from torch.func.jvp, None from forward_ad), and torch.func.grad / vjp refused them. There, each call
    runs the reference: tangents, gradients and vmap equal the float64 reference's."""
    import torch.autograd.forward_ad as forward_ad
    import torch.func as tf

    for name, fn, inputs in _three_ops(backend):
        tangents = tuple(torch.randn_like(x) for x in inputs)
        wide = tuple(x.double() for x in inputs)
        ref = getattr(reference, "attention" if name == "context_attention" else name)
        ref_fn = (lambda *a: ref(*a, 0.5)) if name == "score_concat" else (
            (lambda *a: ref(*a, 2.0)) if name == "pixel_text_score" else ref)  # fmt: skip
        _, expected = tf.jvp(ref_fn, wide, tuple(t.double() for t in tangents))
        assert expected.abs().max() > 0.1
        _, tangent = tf.jvp(fn, inputs, tangents)
        _check_close(tangent, expected, torch.float32)
        with forward_ad.dual_level():
            dual = fn(*(forward_ad.make_dual(x, t) for x, t in zip(inputs, tangents)))
            tangent = forward_ad.unpack_dual(dual).tangent
        assert tangent is not None, name
        _check_close(tangent, expected, torch.float32)
        cotangent = torch.randn_like(expected)
        _, pull = tf.vjp(ref_fn, *wide)
        _, pull_fused = tf.vjp(fn, *inputs)
        for got, want in zip(pull_fused(cotangent.float()), pull(cotangent)):
            _check_close(got, want, torch.float32)
        batched = tuple(torch.stack([x, 2 * x]) for x in inputs)
        _check_close(tf.vmap(fn)(*batched)[1], ref_fn(*(2 * x for x in wide)), torch.float32)


def test_calls_outside_transforms_keep_the_fused_operators(monkeypatch):
    """The reference runs under a transform only: not in an open dual level whose inputs carry no tangent, and not
    for plain calls."""
    import torch.autograd.forward_ad as forward_ad

    backend = "cuda" if DEVICE == "cuda" else "cpu"
    called: list[str] = []
    for name in ("pixel_text_score", "score_concat", "attention"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, _name=name: called.append(_name) or _real(*a))
    for _, fn, inputs in _three_ops(backend):
        fn(*inputs)
        fn(*(_leaf(x) for x in inputs)).sum().backward()
        with forward_ad.dual_level():
            fn(*inputs)
    assert called == []
    with forward_ad.dual_level():
        _, fn, inputs = _three_ops(backend)[0]
        fn(forward_ad.make_dual(inputs[0], torch.randn_like(inputs[0])), inputs[1])
    assert called == ["pixel_text_score"]


def test_batched_text_is_checked_against_visuals_batch_and_for_classes():
    """C09, C14, C15: a 5-D visual map, per-batch text of no classes, per-batch text whose K (not B) equals visual's
    B. (These fit BAD_SCORE as three more entries.)"""
    visual = torch.randn(2, 3, 2, 2)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=re.escape("visual must be a (B, C, H, W) tensor, got Tensor of shape "
                                                       "(2, 3, 2, 2, 1)")):  # fmt: skip
            ops.pixel_text_score(visual[..., None], torch.randn(5, 3), backend=backend)
        with pytest.raises(ValueError, match=r"K >= 1"):
            ops.pixel_text_score(visual, torch.randn(2, 0, 3), backend=backend)
        with pytest.raises(ValueError, match="per-batch text has B=3 but visual has B=2"):
            ops.pixel_text_score(visual, torch.randn(3, 2, 3), backend=backend)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_inputs_of_the_strided_layout_are_refused_naming_them():
    """C03: torch.nested.nested_tensor's default layout is torch.strided (the sparse/nested test takes a jagged
    one, whose layout alone is refused): is_nested is what refuses it."""
    nested_map = torch.nested.nested_tensor([torch.randn(3, 2, 2), torch.randn(3, 2, 3)])
    nested_q = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 4, 8)])
    assert nested_map.layout == nested_q.layout == torch.strided
    q = torch.randn(1, 2, 3, 8)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=re.escape("visual must be a dense (strided) tensor, got a nested tensor")):
            ops.pixel_text_score(nested_map, torch.randn(5, 3), backend=backend)
        with pytest.raises(ValueError, match=re.escape("q must be a dense (strided) tensor, got a nested tensor")):
            ops.context_attention(nested_q, q, q, backend=backend)


def test_any_real_scale_is_taken_as_its_float_on_every_backend():
    """I06: the wrappers pass on check_scale's float, not the argument: a fractions.Fraction (a numbers.Real that
    check_scale accepts) met "unsupported operand type(s) for *: 'Tensor' and 'Fraction'" in the reference."""
    from fractions import Fraction


    visual, text = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = reference.pixel_text_score(visual, text, 0.5)
    for backend in ("reference", None):
        torch.testing.assert_close(ops.pixel_text_score(visual, text, Fraction(1, 2), backend=backend), expected)
        concat = ops.score_concat(visual, visual, text, Fraction(1, 2), backend=backend)
        torch.testing.assert_close(concat[:, 3:], expected)


def test_concat_feature_of_another_batch_or_device_is_refused():
    """C16, C17: feature's B is compared (not only H and W), and its device."""
    visual, text = torch.randn(2, 3, 4, 4), torch.randn(5, 3)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=re.escape("feature (1, 3, 4, 4) and visual (2, 3, 4, 4) must agree")):
            ops.score_concat(torch.randn(1, 3, 4, 4), visual, text, backend=backend)
        with pytest.raises(ValueError, match=re.escape("feature must match visual's dtype and device (torch.float32, "
                                                       "cpu), got torch.float32 on meta")):  # fmt: skip
            ops.score_concat(torch.randn(2, 3, 4, 4, device="meta"), visual, text, backend=backend)


def test_attention_values_of_another_head_dim_or_batch_are_refused():
    """C23, C24: v of k's length but another head dim; k and v of another batch than q (SDPA, the reference,
    would broadcast it)."""
    q = torch.randn(2, 1, 3, 8)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=re.escape("k and v must have the same shape, got (2, 1, 4, 8) and "
                                                       "(2, 1, 4, 16)")):  # fmt: skip
            ops.context_attention(q, torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 16), backend=backend)
        kv = torch.randn(1, 1, 4, 8)
        with pytest.raises(ValueError, match=re.escape("q (2, 1, 3, 8) and k (1, 1, 4, 8) must agree in B, heads")):
            ops.context_attention(q, kv, kv, backend=backend)


def test_the_backward_fake_kernels_check_what_they_are_handed():
    """C20, C21, C22, C28, C29: the fake kernels of the C++ backward operators (what torch.compile / torch.export
    trace) refuse a gradient on another device, a score map of the wrong shape, norms of the wrong dtype, an lse or
    grad_out of the wrong length; they take 16-bit inputs' float32 norms."""
    lib = torch.ops.denseclip_fast
    grad, visual, text = torch.randn(1, 5, 2, 2), torch.randn(1, 3, 2, 2), torch.randn(5, 3)
    with pytest.raises(ValueError, match=re.escape("grad must be the gradient of the (B, K, H, W) score, "
                                                   "torch.float32 on cpu, got torch.float32 on meta")):  # fmt: skip
        lib.pixel_text_score_backward(grad.to("meta"), visual, text, 1.0)
    meta = {"device": "meta", "dtype": torch.float16}
    grad, visual, text = torch.empty(1, 5, 2, 2, **meta), torch.empty(1, 3, 2, 2, **meta), torch.empty(5, 3, **meta)
    norm = torch.empty(1, 2, 2, device="meta")  # float32 for 16-bit inputs
    grad_visual, grad_text = lib.pixel_text_score_backward(grad, visual, text, 1.0, grad, norm)
    assert grad_visual.shape == visual.shape and grad_text.shape == text.shape
    with pytest.raises(ValueError, match=re.escape("norm must be the forward's output, torch.float32 on meta, got "
                                                   "torch.float16")):  # fmt: skip
        lib.pixel_text_score_backward(grad, visual, text, 1.0, grad, norm.half())
    with pytest.raises(ValueError, match=re.escape("score_map must be the forward's output, shape (1, 5, 2, 2), got "
                                                   "(1, 4, 2, 2)")):  # fmt: skip
        lib.pixel_text_score_backward(grad, visual, text, 1.0, grad[:, :4], norm)
    q, lse = torch.empty(1, 2, 3, 8, device="meta"), torch.empty(1, 2, 3, device="meta")
    assert [g.shape for g in lib.context_attention_backward(q, q, q, q, q, lse)] == [q.shape] * 3
    with pytest.raises(ValueError, match=re.escape("lse must be (B, heads, Lq) = (1, 2, 3)")):
        lib.context_attention_backward(q, q, q, q, q, lse[..., :1])
    with pytest.raises(ValueError, match=re.escape("grad_out must match q ((1, 2, 3, 8)")):
        lib.context_attention_backward(q[:, :, :1], q, q, q, q, lse)


# fake kernels, autograd and FLOP formulas beyond test_opcheck's cases (float64 / float32, shared text, NCHW or NHWC)


def _fake_kernel_cases():
    """Inputs whose outputs' metadata the fake kernels must get right beyond test_opcheck's cases: 16-bit inputs
    (float32 norms and log-sum-exp), per-batch text with B != K, a size-1 dimension with an odd stride."""
    lib = torch.ops.denseclip_fast
    half = torch.randn(2, 6, 3, 4, dtype=torch.float16)
    yield lib.pixel_text_score.default, (half, torch.randn(5, 6, dtype=torch.float16), 1.0)
    yield lib.score_concat.default, (torch.randn(2, 3, 3, 4, dtype=torch.bfloat16), half.bfloat16(),
                                     torch.randn(5, 6, dtype=torch.bfloat16), 1.0)  # fmt: skip
    q, k = torch.randn(1, 2, 3, 16, dtype=torch.bfloat16), torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    yield lib.context_attention.default, (q, k, k)
    visual, per_batch = torch.randn(2, 6, 3, 4), torch.randn(2, 5, 6)
    yield lib.pixel_text_score.default, (visual, per_batch, 1.0)
    yield lib.score_concat.default, (torch.randn(2, 3, 3, 4), visual, per_batch, 1.0)
    odd = torch.randn(2, 6, 9, 5).contiguous(memory_format=torch.channels_last)[:, :, ::9]  # H = 1, stride 9 W C
    yield lib.pixel_text_score.default, (odd, torch.randn(5, 6), 1.0)


@pytest.mark.skipif(not ops.extension_available(), reason="needs the extension")
def test_the_fake_kernels_give_the_cpu_kernels_metadata():
    """L01, L03, L04, L05: opcheck's fake-tensor comparison (shapes, dtypes, strides of every output) on the
    cases above; each also gives its outputs' layout by score_memory_format's rule."""
    odd = torch.randn(2, 6, 9, 5).contiguous(memory_format=torch.channels_last)[:, :, ::9]
    assert odd.shape == (2, 6, 1, 5) and score_memory_format(odd) == torch.channels_last
    for op, args in _fake_kernel_cases():
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        result = torch.library.opcheck(op, args, test_utils=["test_faketensor", "test_autograd_registration"])
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.skipif(not ops.extension_available(), reason="needs the extension")
def test_the_norms_and_log_sum_exp_the_operators_return_record_no_gradient():
    """L12, L16: the C++ operators' second outputs (the pixel norms, the attention's log-sum-exp) are aids to the
    backward, marked non-differentiable: they do not require grad (a loss on them would silently get a zero
    gradient otherwise)."""
    lib = torch.ops.denseclip_fast
    visual, text = torch.randn(1, 3, 2, 2, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    for out, aid in (lib.pixel_text_score(visual, text, 1.0), lib.score_concat(visual, visual, text, 1.0)):
        assert out.requires_grad and not aid.requires_grad
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    out, lse = lib.context_attention(q, q, q)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.skipif(not ops.extension_available(), reason="needs the extension")
def test_flop_counter_counts_per_batch_text_as_the_reference():
    """L18: with per-batch text (B, K, C), B != K, the score's formula takes K from the text's second-last dimension."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(name: str) -> int:
        v, t = torch.randn(2, 24, 5, 7, requires_grad=True), torch.randn(2, 3, 24, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            ops.pixel_text_score(v, t, backend=name).sum().backward()
            ops.score_concat(torch.randn(2, 6, 5, 7), v, t, backend=name).sum().backward()
        return counter.get_total_flops()

    score = 2 * 2 * 3 * 24 * 35
    assert count("cpu") == count("reference") == 2 * (score + 2 * score)


@pytest.mark.skipif(not ops.extension_available(), reason="needs the extension")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func.jvp's own import
def test_forward_mode_ad_with_a_tangent_on_text_or_feature_alone_runs_the_reference():
    """I10, I11: a tangent on any one input (the text alone, the feature alone) sends the call to the reference,
    not only one on the visual map (torch gave the fused operators' outputs no tangent)."""
    import torch.autograd.forward_ad as forward_ad


    visual, text, feature = torch.randn(1, 4, 2, 3), torch.randn(3, 4), torch.randn(1, 2, 2, 3)
    dt, df = torch.randn_like(text), torch.randn_like(feature)
    _, expected = torch.func.jvp(lambda t: reference.pixel_text_score(visual, t), (text,), (dt,))
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(ops.pixel_text_score(visual, forward_ad.make_dual(text, dt),
                                                              backend="cpu")).tangent  # fmt: skip
        assert tangent is not None
        torch.testing.assert_close(tangent, expected)
        tangent = forward_ad.unpack_dual(ops.score_concat(forward_ad.make_dual(feature, df), visual, text,
                                                          backend="cpu")).tangent  # fmt: skip
        assert tangent is not None
        torch.testing.assert_close(tangent, torch.cat([df, torch.zeros(1, 3, 2, 3)], dim=1))


# backend choice on a machine described by monkeypatching ops.backends (_a_cuda_build_for: no GPU needed)


@pytest.mark.parametrize("gpu_arch, hint", [(75, "7.5"), (90, "9.0"), (120, "12.0")])
def test_the_cuda_arch_message_names_the_gpus_arch_to_rebuild_for(monkeypatch, gpu_arch, hint):
    """B05: the rebuild hint is the GPU's own major.minor (an sm_75 GPU: TORCH_CUDA_ARCH_LIST=7.5, not 7.0)."""
    _a_cuda_build_for(monkeypatch, [80, 86], gpu_arch)
    why = ops.backends.unavailable_reason("cuda", "pixel_text_score", torch.device("cuda", 0), torch.float32)
    assert why == (f"the extension's CUDA kernels were built for sm_80, sm_86 and this GPU is sm_{gpu_arch} "
                   f"(rebuild with TORCH_CUDA_ARCH_LIST={hint})")  # fmt: skip


def test_the_cuda_attention_takes_head_dims_up_to_128(monkeypatch):
    """B12: D = 128 (ViT-L's 64 x 2) is the CUDA attention kernel's largest, accepted; 129 is refused saying so."""
    _a_cuda_build_for(monkeypatch, [90], 90)
    gpu = torch.device("cuda", 0)
    assert ops.backends.unavailable_reason("cuda", "context_attention", gpu, torch.float32, head_dim=128) is None
    why = ops.backends.unavailable_reason("cuda", "context_attention", gpu, torch.float32, head_dim=129)
    assert why == "the CUDA attention kernel supports head dims up to 128, got 129"


@pytest.mark.skipif(ops.backends.triton_available() is not None, reason="needs Triton")
def test_auto_prefers_triton_over_the_cuda_kernels_on_an_ampere_gpu(monkeypatch):
    """B14, B23: on CUDA tensors auto takes Triton first, then the CUDA kernels; sm_80 (an A100) is Triton's
    lowest architecture, not refused."""
    _a_cuda_build_for(monkeypatch, [80], 80)
    gpu = torch.device("cuda", 0)
    assert ops.backends.unavailable_reason("triton", "pixel_text_score", gpu, torch.float16) is None
    assert ops.backends.resolve("pixel_text_score", gpu, torch.float16) == "triton"
    assert ops.backends.resolve("pixel_text_score", gpu, torch.float64) == "cuda"  # float64: Triton refuses it
    assert ops.backends.resolve("context_attention", gpu, torch.float32, head_dim=24) == "cuda"


@pytest.mark.skipif(ops.backends.triton_available() is not None, reason="needs Triton")
def test_triton_runs_cpu_tensors_only_under_its_interpreter(monkeypatch):
    """B10, B18: CPU tensors are Triton's only where TRITON_INTERPRET=1 (not merely where it is unset or not 0);
    tensors of other devices (meta, mps, ...) never."""
    cpu, why = torch.device("cpu"), "Triton kernels run CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    for value in (None, "", "true"):
        if value is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", value)
        assert why in ops.backends.unavailable_reason("triton", "pixel_text_score", cpu, torch.float32), value
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backends.unavailable_reason("triton", "pixel_text_score", cpu, torch.float32) is None
    for device in ("meta", "mps"):
        reason = ops.backends.unavailable_reason("triton", "pixel_text_score", torch.device(device), torch.float32)
        assert reason is not None and f"these are on {device}" in reason


def test_the_cpu_backend_runs_cpu_tensors_only(monkeypatch):
    """B11: the cpu backend refuses tensors of any device but the CPU (an mps or xpu tensor, not only a CUDA one);
    auto gives them the reference."""
    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    for device in ("mps", "meta", "xpu"):
        why = ops.backends.unavailable_reason("cpu", "pixel_text_score", torch.device(device), torch.float32)
        assert why == f"the cpu backend runs CPU tensors, these are on {device}"
        assert ops.backends.resolve("pixel_text_score", torch.device(device), torch.float32) == "reference"


def test_a_forced_backends_error_says_where_it_was_forced(monkeypatch):
    """B22, B27: the error names the setting that forced the backend (backend= or DENSECLIP_FAST_BACKEND); an empty
    backend= is refused as not a backend (only an empty environment variable means auto)."""
    visual, text = torch.randn(1, 4, 2, 2), torch.randn(3, 4)
    monkeypatch.delenv("DENSECLIP_FAST_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match=re.escape("backend 'cuda' (from backend) cannot run this call: the cuda "
                                                     "backend runs CUDA tensors, these are on cpu")):  # fmt: skip
        ops.pixel_text_score(visual, text, backend="cuda")
    monkeypatch.setenv("DENSECLIP_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=re.escape("backend 'cuda' (from DENSECLIP_FAST_BACKEND) cannot run")):
        ops.pixel_text_score(visual, text)
    with pytest.raises(ValueError, match=re.escape("backend='' is not a backend")):
        ops.pixel_text_score(visual, text, backend="")

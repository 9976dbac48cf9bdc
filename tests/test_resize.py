"""The training loss's bilinear resize (denseclip_fast/train/resize.py): F.interpolate's values, and a backward of
matrix products equal to ATen's gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from denseclip_fast.train.resize import interpolation_matrix, resize_to


def _aten(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("in_size", "size"), [((4, 4), (16, 16)), ((5, 7), (33, 18)), ((16, 16), (512, 512)),
                                               ((9, 6), (4, 5)), ((3, 3), (3, 3)), ((1, 5), (7, 1))])  # fmt: skip
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_resize_values_and_gradient_equal_atens(in_size, size, layout):
    """Up, down (odd factors), unchanged and single-row sizes; NCHW and channels_last: the same values as
    F.interpolate, and the same gradient (float64, to rounding), in the input's layout."""
    x = torch.randn(2, 3, *in_size, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, *size, dtype=torch.float64)
    a, b = x.detach().requires_grad_(), x.detach().requires_grad_()
    ours, theirs = resize_to(a, size), _aten(b, size)
    assert torch.equal(ours, theirs)
    ours.backward(grad)
    theirs.backward(grad)
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert a.grad.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                torch.contiguous_format)  # fmt: skip


def test_resize_gradcheck_and_float32():
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_to(t, (7, 4)), (x,))
    y = torch.randn(2, 150, 16, 16)
    a, b = y.clone().requires_grad_(), y.clone().requires_grad_()
    grad = torch.randn(2, 150, 128, 128)
    resize_to(a, (128, 128)).backward(grad)
    _aten(b, (128, 128)).backward(grad)
    assert a.grad is not None and b.grad is not None
    assert (a.grad - b.grad).norm() <= 1e-6 * b.grad.norm()


def test_interpolation_matrix_rows_are_atens_weights():
    m = interpolation_matrix(4, 8, torch.device("cpu"), torch.float64)
    assert m.shape == (8, 4)
    torch.testing.assert_close(m.sum(1), torch.ones(8, dtype=torch.float64))  # each output a convex combination
    assert int((m != 0).sum(1).max()) <= 2
    x = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(m @ x, F.interpolate(x[None, None], size=8, mode="linear", align_corners=False)[0, 0])


def test_resize_without_gradient_and_bad_rank():
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(resize_to(x.requires_grad_(), (6, 6)), _aten(x, (6, 6)))
    with pytest.raises(ValueError, match=r"resize_to takes a \(N, C, H, W\) tensor, got shape \(2, 3, 3\)"):
        resize_to(torch.randn(2, 3, 3), (6, 6))
    for size in ((6,), (6, 0), (6, 2.5), (6, 6, 6)):
        with pytest.raises(ValueError, match=r"resize_to's size must be \(height, width\), two positive ints, got"):
            resize_to(x, size)
    assert resize_to(x, torch.Size([6, 4])).shape == (1, 2, 6, 4)


def test_resize_forward_takes_the_triton_kernel_where_usable(monkeypatch):
    """Where the engine's Triton resize applies (the CPU made such a device: Triton's interpreter), resize_to's
    forward (with and without a gradient to record) is that kernel, in the input's layout, equal to F.interpolate
    within float32 rounding; so is the backward (resample.bilinear_backward), for a gradient in either layout, its
    result in the input's layout."""
    from denseclip_fast.engine import cuda_resample
    from denseclip_fast.ops.triton import resample

    monkeypatch.setattr(cuda_resample, "DEVICE_TYPES", ("cpu",))
    calls = []
    real = resample.bilinear
    monkeypatch.setattr(resample, "bilinear", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(2, 3, 5, 7, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    want = F.interpolate(x, size=(16, 21), mode="bilinear", align_corners=False)
    x.requires_grad_()
    got = resize_to(x, (16, 21))
    assert calls == [(16, 21)] and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
    backward_calls = []
    real_backward = resample.bilinear_backward
    monkeypatch.setattr(resample, "bilinear_backward",
                        lambda *a: backward_calls.append(a[0].stride()) or real_backward(*a))  # fmt: skip
    ref = x.detach().clone().requires_grad_()
    aten = F.interpolate(ref, size=(16, 21), mode="bilinear", align_corners=False)
    for grad in (torch.randn_like(want), torch.randn_like(want).contiguous()):  # channels_last, then NCHW
        x.grad, ref.grad = None, None
        resize_to(x, (16, 21)).backward(grad)
        torch.autograd.backward(aten, grad, retain_graph=True)
        torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert backward_calls == [want.stride(), want.contiguous().stride()]
    with torch.no_grad():
        resize_to(x, (4, 4))
    assert calls == [(16, 21)] * 3 + [(4, 4)]


def test_resize_to_under_torch_func_and_forward_mode():
    """torch.func.grad and forward-mode AD through resize_to take F.interpolate's own derivatives (its autograd
    Function has no setup_context, which the transforms need): autograd's gradient, and the tangent of the resize."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    got = torch.func.grad(lambda t: resize_to(t, (6, 8)).square().sum())(x)
    leaf = x.clone().requires_grad_()
    _aten(leaf, (6, 8)).square().sum().backward()
    torch.testing.assert_close(got, leaf.grad)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = resize_to(fwAD.make_dual(x, tangent).requires_grad_(), (6, 8))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, _aten(tangent, (6, 8)))

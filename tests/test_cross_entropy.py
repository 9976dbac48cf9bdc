"""The training loss's cross-entropy kernels (ops/triton/cross_entropy.py) and their use (train/cross_entropy.py),
against F.cross_entropy in float64: under Triton's interpreter on a CPU (CI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from denseclip_fast.train import cross_entropy as loss_module
from denseclip_fast.train import optim

triton = pytest.importorskip("triton")
from denseclip_fast.ops.triton import cross_entropy  # noqa: E402

from .conftest import forbid_launches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m: int, k: int, ignore: int, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(m, k, generator=g) * scale).to(DEVICE)
    label = torch.randint(0, k, (m,), generator=g)
    label[::5] = ignore
    return rows, label.to(DEVICE)


@pytest.mark.parametrize(("m", "k"), [(37, 150), (5, 1), (16, 7), (9, 300), (1, 256), (33, 257)])
@pytest.mark.parametrize("ignore", [255, -100])
def test_loss_and_gradient_equal_cross_entropy(m, k, ignore):
    """Rows not a multiple of the block, one class, classes in one block and in several (past 256), ignored pixels
    (an index past the classes, and PyTorch's default -100): the per-pixel loss and the gradient of F.cross_entropy
    in float64, to float32 rounding; the saved log-sum-exp is the rows' logsumexp."""
    rows, label = _case(m, k, ignore)
    loss, lse = cross_entropy.cross_entropy_rows(rows, label, ignore)
    r64 = rows.double().requires_grad_()
    want = F.cross_entropy(r64, label, ignore_index=ignore, reduction="none")
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(r64.detach(), 1), rtol=1e-6, atol=1e-5)
    grad = torch.randn(m, dtype=torch.float64).to(DEVICE)
    want.backward(grad)
    got = cross_entropy.cross_entropy_rows_backward(grad.float(), rows, label, lse, ignore)
    torch.testing.assert_close(got.double(), r64.grad, rtol=1e-5, atol=1e-6)
    assert bool((got[label == ignore] == 0).all())


def test_extreme_logits_and_a_label_past_the_classes():
    """Logits of 1e4 (exp would overflow without the running maximum) and -inf (a class ruled out): finite losses
    equal PyTorch's; a label that is neither a class nor the ignore index: NaN, not a number that looks right."""
    rows = torch.tensor([[1e4, 0.0, -1e4], [float("-inf"), 2.0, 1.0], [0.5, 0.5, 0.5]], device=DEVICE)
    label = torch.tensor([1, 1, 7], device=DEVICE)
    loss, _ = cross_entropy.cross_entropy_rows(rows, label, 255)
    want = F.cross_entropy(rows[:2].double(), label[:2], reduction="none")
    torch.testing.assert_close(loss[:2].double(), want, rtol=1e-6, atol=1e-6)
    assert bool(torch.isnan(loss[2]))
    # a NaN among a row's logits: NaN, as PyTorch's (not the loss of the other classes)
    nan_row = torch.tensor([[0.1, float("nan"), 0.7], [0.1, 0.2, 0.7]], device=DEVICE)
    loss, _ = cross_entropy.cross_entropy_rows(nan_row, torch.tensor([2, 2], device=DEVICE), 255)
    assert bool(loss[0].isnan()) and bool(loss[1].isfinite())
    with pytest.raises(ValueError, match=r"label must be int64 of shape \(3,\)"):
        cross_entropy.cross_entropy_rows(rows, label.int(), 255)
    with pytest.raises(ValueError, match="rows must be a float32 .* matrix with contiguous rows"):
        cross_entropy.cross_entropy_rows(rows.t(), label, 255)
    _, lse = cross_entropy.cross_entropy_rows(rows, label, 255)
    with pytest.raises(ValueError, match=r"backward: grad must be a float \(3,\) tensor on .*, got torch.float32 of "
                                         r"shape \(2,\)"):  # fmt: skip
        cross_entropy.cross_entropy_rows_backward(torch.ones(2, device=DEVICE), rows, label, lse, 255)


def test_no_pixels_launch_nothing_and_no_classes_is_pytorchs(monkeypatch):
    """No pixels (an empty batch): empty losses and gradients without a launch (a grid of no programs is an error on
    CUDA), in both kernels; rows of no classes whose pixels are all ignored: PyTorch's zero losses, and a gradient
    of no columns without a launch."""
    from denseclip_fast.ops.triton import resized_cross_entropy as rce

    rows, label = torch.zeros(3, 0, device=DEVICE), torch.full((3,), 255, device=DEVICE)
    loss, lse = cross_entropy.cross_entropy_rows(rows, label, 255)
    assert torch.equal(loss, F.cross_entropy(rows, label, ignore_index=255, reduction="none"))
    forbid_launches(monkeypatch, cross_entropy, rce)
    grad = cross_entropy.cross_entropy_rows_backward(torch.ones(3, device=DEVICE), rows, label, lse, 255)
    assert grad.shape == (3, 0)
    none = torch.zeros(0, 5, device=DEVICE)
    no_label = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    loss, lse = cross_entropy.cross_entropy_rows(none, no_label, 255)
    assert loss.shape == lse.shape == (0,)
    assert cross_entropy.cross_entropy_rows_backward(loss, none, no_label, lse, 255).shape == (0, 5)
    x = torch.randn(0, 4, 3, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    maps = torch.zeros(0, 6, 10, dtype=torch.int64, device=DEVICE)
    loss, lse = rce.resized_cross_entropy(x, maps, 255)
    assert loss.shape == lse.shape == (0, 6, 10)
    grad = rce.resized_cross_entropy_backward(loss, x, maps, lse, 255)
    assert grad.shape == (0, 4, 3, 5) and grad.is_contiguous(memory_format=torch.channels_last)


def test_a_label_equal_to_the_class_count_is_no_class():
    """A label of exactly K (one past the last class: an off-by-one in the data, or a class list one short) is NaN
    in both kernels, as any label past the classes: the tests above use 7 of 3 classes, which a check of
    label <= K also refuses, while label K read the next row's first logit (the rows' kernel) or the next image's
    first class plane, past the last image out of bounds (the fused kernel): a finite, wrong loss."""
    from denseclip_fast.ops.triton import resized_cross_entropy as rce

    rows = torch.randn(4, 3, device=DEVICE)
    loss, _ = cross_entropy.cross_entropy_rows(rows, torch.tensor([0, 3, 2, 3], device=DEVICE), 255)
    assert torch.equal(loss.isnan().cpu(), torch.tensor([False, True, False, True]))
    x = torch.randn(2, 3, 2, 2, device=DEVICE)
    label = torch.zeros(2, 3, 3, dtype=torch.int64, device=DEVICE)
    label[0, 1, 1] = label[1, 2, 0] = 3
    loss, _ = rce.resized_cross_entropy(x, label, 255)
    assert torch.equal(loss.isnan(), label == 3)


def test_the_training_loss_takes_the_kernels_where_usable(monkeypatch):
    """On a device the kernels serve (the CPU made one here: Triton's interpreter), the loss of channels_last logits
    goes through them forward and backward: the loss and the gradient of the NCHW path (PyTorch's); a call without
    a gradient to record, or with DENSECLIP_FAST_TRITON_LOSS=0, is PyTorch's."""
    monkeypatch.setattr(loss_module, "DEVICE_TYPES", (DEVICE,))
    calls = []
    real_fwd, real_bwd = cross_entropy.cross_entropy_rows, cross_entropy.cross_entropy_rows_backward
    monkeypatch.setattr(cross_entropy, "cross_entropy_rows", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(cross_entropy, "cross_entropy_rows_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 5, 7, generator=g).to(DEVICE)
    label = torch.randint(0, 6, (2, 5, 7), generator=g).to(DEVICE)
    label[0, 0] = 255
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.empty_like(logits, memory_format=fmt).copy_(logits).requires_grad_()  # a leaf in that layout
        loss = optim._mean_cross_entropy(x, label, 255)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert calls == ["fwd", "bwd"]  # the channels_last one
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-8)
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)
    calls.clear()
    nhwc = logits.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        optim._mean_cross_entropy(nhwc, label, 255)
    monkeypatch.setenv("DENSECLIP_FAST_TRITON_LOSS", "0")
    optim._mean_cross_entropy(nhwc.clone().requires_grad_(), label, 255).backward()
    assert calls == []


# ---------------------------------------------------------------- the fused resize and cross-entropy of the loss


def _resized_case(n: int, k: int, h: int, w: int, size: tuple[int, int], layout: str, ignore: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, h, w, generator=g) * 3
    label = torch.randint(0, k, (n, *size), generator=g)
    label[:, ::3, ::2] = ignore
    x = x.to(DEVICE)
    return (x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x), label.to(DEVICE)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(("shape", "size"), [((2, 5, 3, 4), (12, 16)), ((1, 37, 3, 5), (7, 9)),
                                             ((1, 1, 2, 2), (5, 3)), ((1, 6, 7, 9), (4, 5)), ((1, 3, 1, 1), (3, 2)),
                                             ((1, 4, 3, 3), (3, 3)), ((1, 3, 2, 7), (3, 9)),
                                             ((1, 3, 3, 9), (2, 7))])  # fmt: skip
@pytest.mark.parametrize("ignore", [255, -100])
def test_resized_loss_and_gradient_equal_interpolate_then_cross_entropy(shape, size, layout, ignore):
    """Up 4x (the loss's ratio) and by other ratios, down, from one pixel, to the same size, widths 7 -> 9 and 9 -> 7
    (where the width pass's tap bound has one spare tap); one class, classes past a block (37, 32 a block); NCHW and
    NHWC logits; ignored pixels (past the classes, and PyTorch's -100): the per-pixel loss, the saved log-sum-exp and
    the gradient of F.cross_entropy(F.interpolate(x)) in float64, to float32 rounding, the gradient in the logits'
    layout."""
    from denseclip_fast.ops.triton import resized_cross_entropy as rce

    x, label = _resized_case(*shape, size, layout, ignore)
    loss, lse = rce.resized_cross_entropy(x, label, ignore)
    x64 = x.double().requires_grad_()
    up = F.interpolate(x64, size=size, mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, label, ignore_index=ignore, reduction="none")
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(up.detach(), 1), rtol=1e-6, atol=1e-5)
    assert bool((loss[label == ignore] == 0).all())
    grad = torch.rand(shape[0], *size, dtype=torch.float64).to(DEVICE)
    want.backward(grad)
    got = rce.resized_cross_entropy_backward(grad.float(), x, label, lse, ignore)
    torch.testing.assert_close(got.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def test_resized_loss_extremes_and_bad_input():
    """Logits of 1e4 (exp overflows without the running maximum): PyTorch's loss; a label that is neither a class
    nor the ignore index: NaN at that pixel alone; bad arguments named."""
    from denseclip_fast.ops.triton import resized_cross_entropy as rce

    x = torch.tensor([[1e4, 0.0], [-1e4, 5.0], [0.5, 0.5]], device=DEVICE).reshape(1, 3, 2, 1).expand(1, 3, 2, 2)
    label = torch.tensor([[[0, 1, 2, 1], [2, 7, 0, 255]]], device=DEVICE)
    loss, lse = rce.resized_cross_entropy(x.contiguous(), label, 255)
    up = F.interpolate(x.double(), size=(2, 4), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, label.clamp_max(2), reduction="none")
    nan = torch.zeros_like(label, dtype=torch.bool)
    nan[0, 1, 1] = True
    assert torch.equal(loss.isnan(), nan)
    torch.testing.assert_close(loss[~nan].double(), torch.where(label == 255, 0.0, want)[~nan], rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="resized_cross_entropy: x must be float32 logits"):
        rce.resized_cross_entropy(x.double(), label, 255)
    with pytest.raises(ValueError, match=r"label must be int64 \(N, H, W\) with N = 1 .* got torch.int32"):
        rce.resized_cross_entropy(x.contiguous(), label.int(), 255)
    with pytest.raises(ValueError, match=r"x \(1, 0, 2, 2\) has no class or no pixel"):
        rce.resized_cross_entropy(x[:, :0].contiguous(), label, 255)
    with pytest.raises(ValueError, match=r"backward: lse must be a float \(1, 2, 4\) tensor"):
        rce.resized_cross_entropy_backward(torch.ones_like(lse), x, label, lse[0], 255)


def test_resized_loss_nan_strided_labels_int64_offsets_and_a_class_ignored(monkeypatch):
    """A -inf logit (its zero weights at the border make NaN, as PyTorch's resize does) and a NaN: NaN losses where
    PyTorch's are, the others equal; a strided label, int64 offsets (resample.WIDE_FROM lowered: both passes) and
    an ignore index that is a class (0: those pixels 0, whatever their label's logit): the float64 loss and gradient."""
    from denseclip_fast.ops.triton import resample
    from denseclip_fast.ops.triton import resized_cross_entropy as rce

    x, label = _resized_case(1, 4, 3, 3, (6, 5), "nhwc", 255, seed=4)
    x[0, 1, 0, 2] = float("-inf")
    x[0, 2, 2, 0] = float("nan")
    loss, _ = rce.resized_cross_entropy(x, label, 255)
    up = F.interpolate(x.double(), size=(6, 5), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, label, ignore_index=255, reduction="none")
    assert bool(want.isnan().any()) and torch.equal(loss.isnan(), want.isnan())
    torch.testing.assert_close(loss[~want.isnan()].double(), want[~want.isnan()], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(resample, "WIDE_FROM", 8)  # resample._wide decides for both passes
    x, label = _resized_case(2, 5, 4, 3, (9, 11), "nchw", 0, seed=5)
    label = label.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, strided
    assert not label.is_contiguous()
    loss, lse = rce.resized_cross_entropy(x, label, 0)
    x64 = x.double().requires_grad_()
    want = F.cross_entropy(F.interpolate(x64, size=(9, 11), mode="bilinear", align_corners=False), label,
                           ignore_index=0, reduction="none")  # fmt: skip
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert bool((loss[label == 0] == 0).all())
    grad = torch.rand(2, 9, 11, dtype=torch.float64).to(DEVICE)
    want.backward(grad)
    got = rce.resized_cross_entropy_backward(grad.float(), x, label, lse, 0)
    torch.testing.assert_close(got.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_the_training_loss_takes_the_fused_kernels_where_usable(monkeypatch):
    """On a device the kernels serve (the CPU made one here), segmentation_loss's two upsampled losses (the head's
    logits and the score map's) go through the fused kernels forward and backward: the losses and the gradients of
    the resize-then-cross-entropy path; logits already at the label's size take the rows' kernels; a call without a
    gradient, or with a switch at 0 (the resamplings', the loss kernels', the fusion's), takes the unfused path."""
    from denseclip_fast.ops.triton import resized_cross_entropy as rce
    from denseclip_fast.train.config import TrainConfig

    monkeypatch.setattr(loss_module, "DEVICE_TYPES", (DEVICE,))
    calls = []
    real_fwd, real_bwd = rce.resized_cross_entropy, rce.resized_cross_entropy_backward
    monkeypatch.setattr(rce, "resized_cross_entropy", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(rce, "resized_cross_entropy_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    cfg = TrainConfig()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 3, 4, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    aux = torch.randn(2, 5, 3, 4, generator=g).to(DEVICE)
    label = torch.randint(0, 5, (2, 12, 16), generator=g).to(DEVICE)
    label[0, :4] = cfg.ignore_index
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("DENSECLIP_FAST_TRITON_RESAMPLE", switch)
        a, b = logits.clone().requires_grad_(), aux.clone().requires_grad_()
        losses = optim.segmentation_loss(a, b, label, cfg)
        losses["loss"].backward()
        results[switch] = ({k: v.detach() for k, v in losses.items()}, a.grad, b.grad)
    assert calls == ["fwd", "fwd", "bwd", "bwd"]  # the switch at 1 only
    (fused, a_fused, b_fused), (plain, a_plain, b_plain) = results["1"], results["0"]
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a_fused, a_plain, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(b_fused, b_plain, rtol=1e-5, atol=1e-8)
    assert a_fused.is_contiguous(memory_format=torch.channels_last) and b_fused.is_contiguous()
    calls.clear()
    monkeypatch.setenv("DENSECLIP_FAST_TRITON_RESAMPLE", "1")
    with torch.no_grad():
        optim.segmentation_loss(logits, aux, label, cfg)
    at_size = torch.randn(2, 5, 12, 16, generator=g).to(DEVICE).requires_grad_()
    optim.segmentation_loss(at_size, aux.clone().requires_grad_(), label, cfg)["loss"].backward()
    assert calls == ["fwd", "bwd"]  # the aux map's alone: the head's logits are at the label's size
    for switch in ("DENSECLIP_FAST_FUSED_LOSS", "DENSECLIP_FAST_TRITON_LOSS"):  # either unfuses the loss
        monkeypatch.setenv(switch, "0")
        calls.clear()
        optim.segmentation_loss(logits.clone().requires_grad_(), aux, label, cfg)["loss"].backward()
        assert calls == [], switch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_loss_on_cuda_at_the_trainers_shape():
    """On a GPU at the trainer's shape (150 classes of 128x128 channels_last float32 logits to 512x512 labels, a
    tenth ignored), batch 2: the fused loss and gradient equal the separate kernels' (resize, rows' cross-entropy,
    resize gradient) and PyTorch's within float32 rounding."""
    from denseclip_fast.train.resize import _BilinearResize

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 150, 128, 128, generator=g) * 4).cuda().contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, 150, (2, 512, 512), generator=g).cuda()
    label[torch.rand(label.shape, generator=g).cuda() < 0.1] = 255
    grads = []
    for way in ("fused", "kernels", "torch"):
        leaf = x.clone().requires_grad_()
        if way == "fused":
            loss = loss_module._ResizedCrossEntropy.apply(leaf, label, 255)
        elif way == "kernels":
            up = _BilinearResize.apply(leaf, (512, 512))
            loss = loss_module._RowsCrossEntropy.apply(up.permute(0, 2, 3, 1).reshape(-1, 150), label.reshape(-1), 255)
        else:
            up = F.interpolate(leaf, size=(512, 512), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up, label, ignore_index=255, reduction="none")
        loss.mean().backward()
        grads.append((loss.reshape(-1).detach(), leaf.grad))
    for other in grads[1:]:
        torch.testing.assert_close(grads[0][0], other[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0][1], other[1], rtol=1e-4, atol=1e-9)

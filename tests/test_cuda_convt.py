"""engine/cuda_convt.py: a 16-bit CUDA engine's ViT pyramid transposed convolutions as one GEMM each. The path is
device-independent PyTorch (a matrix product, an elementwise sum), so these tests run it on the CPU by adding the
CPU to GEMM_CONVT_DEVICES; test_gpu.py runs it on CUDA."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from denseclip_fast import DenseCLIP, Segmenter
from denseclip_fast.engine import cuda_convt, segmenter
from denseclip_fast.engine.cpu_conv import GemmConvTranspose2d
from denseclip_fast.engine.cuda_convt import (
    CudaGemmConvTranspose2d,
    gemm_transposed_convolutions,
    gemm_transposed_convolutions_wanted,
)

from .conftest import (
    NAMES,
    WANTED_16_BIT_CUDA,
    RecordedOps,
    randomized,
    rel_err,
    set_switch,
    tiny_config,
    vit_engine_with,
)


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU listed in GEMM_CONVT_DEVICES, as CUDA is."""
    monkeypatch.setattr(cuda_convt, "GEMM_CONVT_DEVICES", ("cpu",))


def _transposed(cin: int, cout: int, kernel: tuple[int, int], bias: bool = True, dtype=torch.bfloat16,
                channels_last: bool = True) -> nn.ConvTranspose2d:  # fmt: skip
    """A transposed convolution whose stride is its kernel, with random weights (in ``dtype``; its weight
    channels_last as a CUDA engine's, or contiguous)."""
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(cin, cout, kernel, stride=kernel, bias=bias)
    with torch.no_grad():
        if bias:
            conv.bias.normal_()  # larger than the default's, so that a bias left out or misplaced shows
    conv = conv.to(dtype).requires_grad_(False)
    return conv.to(memory_format=torch.channels_last) if channels_last else conv


def _exact(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transposed convolution in float64 with the product rounded to the weights' dtype before the bias, then
    the sum rounded: PyTorch's CUDA path (cuDNN's product, ATen's bias pass) in exact arithmetic."""
    product = F.conv_transpose2d(x.double(), conv.weight.double(), None, conv.kernel_size).to(conv.weight.dtype)
    if conv.bias is None:
        return product
    return (product.double() + conv.bias.double().view(1, -1, 1, 1)).to(conv.weight.dtype)


def _ops(fn) -> list[str]:
    """The names of the operators ``fn()`` runs (torch.profiler, which does not intercept the call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, cout, kernel, bias, channels_last",
    [((1, 24, 5, 7), 24, (2, 2), True, True), ((2, 5, 9, 13), 7, (3, 2), False, True),
     ((3, 4, 5, 11), 6, (1, 1), True, False), ((1, 16, 1, 1), 3, (2, 2), True, True),
     ((2, 8, 10, 3), 8, (2, 2), True, False), ((2, 3, 1, 17), 5, (2, 3), True, True)],
)  # fmt: skip
def test_a_transposed_convolution_as_one_gemm(on_cpu, shape, cout, kernel, bias, channels_last, dtype):
    """NCHW and channels_last inputs, odd sizes and channel counts, kernels other than 2x2, with and without a bias,
    weights channels_last or not: one matrix product and one pass, no convolution; the result channels_last, within
    rounding of the exact product rounded and then the bias added and rounded (cuBLAS's and the CPU's sums may
    differ from float64's by an ulp of the product)."""
    conv = _transposed(shape[1], cout, kernel, bias, dtype, channels_last)
    gemm = CudaGemmConvTranspose2d(conv)
    x = torch.randn(shape).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=layout)
        with torch.no_grad():
            out = gemm(xi)
            ops = _ops(lambda: gemm(xi))  # noqa: B023
        assert not any("convolution" in op for op in ops), ops
        assert "aten::mm" in ops or "aten::bmm" in ops, ops
        assert out.shape == conv(xi).shape and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last)
        exact = _exact(conv, xi)
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # of the dtype, relative
        torch.testing.assert_close(out.double(), exact.double(), rtol=2 * ulp, atol=ulp * float(exact.abs().max()))
        assert rel_err(out, exact) < (4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_product_is_rounded_before_the_bias_is_added(on_cpu, dtype):
    """As PyTorch's CUDA path rounds (cuDNN's product, then ATen's bias pass): the outputs equal the exact product
    rounded, plus the bias, rounded; a single rounding of the exact sum differs in about a sixth of them here (so
    this tells the two apart; the CPU's sums may differ from float64's in an element's last place)."""
    conv = _transposed(48, 24, (2, 2), dtype=dtype)
    x = torch.randn(2, 48, 9, 7).to(dtype)
    with torch.no_grad():
        out = CudaGemmConvTranspose2d(conv)(x)
    product = F.conv_transpose2d(x.double(), conv.weight.double(), None, conv.kernel_size)
    once = (product + conv.bias.double().view(1, -1, 1, 1)).to(dtype)
    assert (out == _exact(conv, x)).double().mean() > 0.99
    assert (out == once).double().mean() < 0.95


def test_an_engines_channels_last_weight_is_used_as_it_is(on_cpu):
    """A channels_last weight (a CUDA engine's) is the GEMM's matrix without a copy (nothing kept beside it); a
    contiguous one is reordered once and made again after an in-place change."""
    conv = _transposed(6, 4, (2, 2))
    gemm = CudaGemmConvTranspose2d(conv)
    x = torch.randn(2, 6, 5, 3).to(torch.bfloat16)
    with torch.no_grad():
        gemm(x)
    assert gemm._made[0].data_ptr() == conv.weight.data_ptr()
    plain = CudaGemmConvTranspose2d(_transposed(6, 4, (2, 2), channels_last=False))
    with torch.no_grad():
        before = plain(x)
        assert plain._made[0].data_ptr() != plain.weight.data_ptr()
        plain.weight.mul_(-1)
        after = plain(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _exact(plain, x), rtol=2**-7, atol=1e-2)


def test_a_transposed_convolution_otherwise_is_pytorchs(on_cpu):
    """A gradient needed, float32, autocast, an input neither NCHW- nor channels_last-contiguous, an empty batch,
    a dispatch mode recording the call, the wrong channel count (PyTorch's message): F.conv_transpose2d as the
    model's."""
    conv = _transposed(6, 4, (2, 2))
    gemm = CudaGemmConvTranspose2d(conv)
    x = torch.randn(2, 6, 5, 3).to(torch.bfloat16)

    def convolves(fn) -> bool:
        return any("convolution" in op for op in _ops(fn))

    with torch.no_grad():
        assert not convolves(lambda: gemm(x))
        strided = torch.randn(2, 6, 5, 6).to(torch.bfloat16)[..., ::2]
        assert convolves(lambda: gemm(strided))
        assert torch.equal(gemm(strided), conv(strided))
        empty = x[:0]
        assert torch.equal(gemm(empty), conv(empty)) and gemm(empty).shape == (0, 4, 10, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert convolves(lambda: gemm(x))
        was = torch.is_autocast_enabled("cuda")
        torch.set_autocast_enabled("cuda", True)  # CUDA's autocast on, as in a CUDA engine's caller
        try:
            assert convolves(lambda: gemm(x))
        finally:
            torch.set_autocast_enabled("cuda", was)
        with pytest.raises(RuntimeError):  # PyTorch's message on a float16 input to bfloat16 weights
            gemm(x.half())
        wide = CudaGemmConvTranspose2d(_transposed(6, 4, (3, 2)))  # its kernel, not 2, as the stride
        assert torch.equal(wide(strided), F.conv_transpose2d(strided, wide.weight, wide.bias, (3, 2)))
        with pytest.raises(RuntimeError, match="channels"):
            gemm(torch.randn(2, 5, 5, 3).to(torch.bfloat16))
        with RecordedOps() as recorded:  # a dispatch mode (what torch.export and torch.compile trace through)
            gemm(x)
        assert any("convolution" in op for op in recorded.names)
    xg = x.clone().requires_grad_(True)
    assert convolves(lambda: gemm(xg))
    trained = CudaGemmConvTranspose2d(_transposed(6, 4, (2, 2)).requires_grad_(True))
    out = trained(x)  # the weight takes a gradient, the input none
    assert out.requires_grad and convolves(lambda: trained(x))
    conv32 = _transposed(6, 4, (2, 2), dtype=torch.float32)
    gemm32 = CudaGemmConvTranspose2d(conv32)
    with torch.no_grad():
        assert convolves(lambda: gemm32(x.float()))


def test_a_tracer_gets_pytorchs_path_without_reading_a_shape(on_cpu):
    """torch.jit.trace records F.conv_transpose2d, and no shape was read before the check that something records
    the call (a shape read under the tracer warns that a tensor became a Python value)."""
    gemm = CudaGemmConvTranspose2d(_transposed(6, 4, (2, 2)))
    x = torch.randn(1, 6, 3, 4).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.trace's deprecation
        with torch.no_grad():
            # (no check_trace: its rerun, untraced, takes the GEMM, whose sums differ from oneDNN's in places)
            traced = torch.jit.trace(gemm, (x,), check_trace=False)
    assert "aten::_convolution" in str(traced.graph) and "aten::mm" not in str(traced.graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), gemm(x), rtol=2**-7, atol=2e-2)


def test_not_on_a_device_not_listed():
    """The CPU is not in GEMM_CONVT_DEVICES by default: PyTorch's convolution there."""
    gemm = CudaGemmConvTranspose2d(_transposed(6, 4, (2, 2)))
    x = torch.randn(1, 6, 3, 3).to(torch.bfloat16)
    with torch.no_grad():
        assert any("convolution" in op for op in _ops(lambda: gemm(x)))


def test_it_copies_and_pickles_without_its_kept_matrix(on_cpu):
    gemm = CudaGemmConvTranspose2d(_transposed(6, 4, (2, 2), channels_last=False))
    x = torch.randn(1, 6, 3, 4).to(torch.bfloat16)
    with torch.no_grad():
        out = gemm(x)
        for other in (copy.deepcopy(gemm), pickle.loads(pickle.dumps(gemm))):
            assert other._made is None
            assert torch.equal(other(x), out)


@pytest.mark.parametrize("kw", [{"stride": 1}, {"padding": 1}, {"groups": 2}])
def test_the_rewrite_leaves_other_transposed_convolutions(kw):
    model = randomized(DenseCLIP(tiny_config("vit"), NAMES)).eval()
    model.backbone.extra = nn.ConvTranspose2d(4, 4, 2, **{"stride": 2, **kw})
    assert gemm_transposed_convolutions(model) == 3  # the pyramid's three, not the extra one
    assert type(model.backbone.extra) is nn.ConvTranspose2d
    assert gemm_transposed_convolutions(model) == 0


def test_a_resnet_has_none():
    model = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    assert gemm_transposed_convolutions(model) == 0


@pytest.mark.parametrize("device, dtype, switch, wanted", WANTED_16_BIT_CUDA)
def test_which_engines_want_it(device, dtype, switch, wanted, monkeypatch):
    set_switch(monkeypatch, "DENSECLIP_FAST_GEMM_CONVT", switch)
    assert gemm_transposed_convolutions_wanted(torch.device(device), dtype) is wanted


@pytest.mark.parametrize("listed, switch, gemm", [(True, None, True), (True, "0", False), (False, None, False)])
def test_a_16_bit_engine_on_a_listed_device_takes_the_gemm(listed, switch, gemm, monkeypatch):
    """A bfloat16 Segmenter of a ViT on a device of GEMM_CONVT_DEVICES (CUDA; the CPU added here) has its pyramid's
    three transposed convolutions as CudaGemmConvTranspose2d (fpn1's first with the BatchNorm folded into it), not
    with DENSECLIP_FAST_GEMM_CONVT=0 or on a device not listed (the CPU engine's own GEMM then); the logits stay
    within bfloat16's tolerance of the float32 model's and close to the engine without it."""
    # the pyramid's maps NCHW, as on CUDA (a CPU engine makes them channels_last): fpn1's first and fpn2's take
    # the NCHW form, fpn1's second the channels_last one (the GELU keeps the first's channels_last output)
    monkeypatch.setattr(segmenter, "channels_last_pyramid", lambda model: False)
    taken = []
    monkeypatch.setattr(CudaGemmConvTranspose2d, "takes_gemm", lambda self, x, takes=CudaGemmConvTranspose2d.takes_gemm:
                        taken.append((takes(self, x), x.is_contiguous())) or taken[-1][0])  # fmt: skip
    model, seg = vit_engine_with(monkeypatch, cuda_convt, "GEMM_CONVT_DEVICES", listed, "DENSECLIP_FAST_GEMM_CONVT",
                                 switch, torch.bfloat16)
    kinds = [type(m) for m in seg.model.backbone.modules() if isinstance(m, (nn.ConvTranspose2d, GemmConvTranspose2d))]
    assert len(kinds) == 3 and all((k is CudaGemmConvTranspose2d) is gemm for k in kinds), kinds
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
    got = seg.logits(x)
    assert rel_err(got, expected) < 2e-2
    assert sorted(taken) == ([(True, False), (True, True), (True, True)] if gemm else [])
    monkeypatch.setattr(cuda_convt, "GEMM_CONVT_DEVICES", ("cuda",))
    other = Segmenter(model, device="cpu", dtype=torch.bfloat16)
    assert rel_err(got, other.logits(x)) < 1e-2

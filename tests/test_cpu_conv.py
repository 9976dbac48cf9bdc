"""The bfloat16 CPU engine's convolutions through oneDNN (denseclip_fast/engine/cpu_conv.py): the convolution with
its ReLU (and a bottleneck's residual sum) as post-ops on a packed weight, the same function as F.conv2d and those
steps within bfloat16's rounding; taken only for plain CPU bfloat16 tensors without gradients, and only in the
image path of the Segmenter's own copy of the model."""

from __future__ import annotations

import copy
import io
import pickle
import platform
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from denseclip_fast import DenseCLIP, Segmenter
from denseclip_fast.engine import cpu_conv
from denseclip_fast.engine.cpu_conv import (
    GemmConvTranspose2d,
    OneDNNBottleneck,
    OneDNNConv2d,
    fuse_convolutions,
    onednn_conv_usable,
)
from denseclip_fast.engine.rewrite import prepare_for_inference
from denseclip_fast.model.resnet import Bottleneck

from .conftest import (
    NAMES,
    probed_under_autocast,
    probed_under_other_defaults,
    probed_with_fakes,
    randomized,
    rel_err,
    tiny_config,
)

needs_onednn = pytest.mark.skipif(not onednn_conv_usable(), reason="no usable oneDNN bfloat16 fused convolution")
FUSED = "mkldnn::_convolution_pointwise"
BF16 = {"rtol": 2**-7, "atol": 2e-2}  # bfloat16's rounding of the result, against float32 arithmetic


def _ops_run(fn) -> set[str]:
    """The names of the operators ``fn()`` runs (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _conv(cin: int, cout: int, kernel: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, **kw)
    with torch.no_grad():
        conv.weight.normal_(0, (cin * kernel * kernel / conv.groups) ** -0.5)
        if conv.bias is not None:
            conv.bias.normal_(0, 0.5)
    return conv.to(dtype).requires_grad_(False)


def _in_float32(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    out = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out = out + residual.float()
    return torch.relu(out) if relu else out


CASES = [  # (input shape, out channels, kernel, Conv2d keywords)
    ((1, 3, 17, 23), 8, 3, {"padding": 1, "stride": 2}),
    ((2, 16, 9, 10), 33, 1, {}),
    ((1, 24, 8, 13), 24, 3, {"padding": 1, "groups": 3, "bias": False}),
    ((3, 5, 12, 7), 6, 3, {"padding": 2, "dilation": 2}),
    ((1, 64, 1, 1), 17, 1, {}),
    ((2, 3, 48, 33), 12, 16, {"stride": 16, "bias": False}),  # a ViT's patch embedding
]


@needs_onednn
@pytest.mark.parametrize("shape, cout, kernel, kw", CASES)
@pytest.mark.parametrize("post_op", ["none", "relu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_equals_the_convolution_and_its_post_op(shape, cout, kernel, kw, post_op, layout):
    conv = _conv(shape[1], cout, kernel, **kw)
    fused = OneDNNConv2d(conv, post_op)
    x = torch.randn(shape).to(torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fused(x)
        assert FUSED in _ops_run(lambda: fused(x))
        plain = conv(x)
        plain = torch.relu(plain) if post_op == "relu" else plain
    assert out.shape == plain.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _in_float32(conv, x, None, post_op == "relu"), **BF16)
    torch.testing.assert_close(out, plain, **BF16)
    if layout == "channels_last":  # the engine's layout stays: the next convolution takes it as it is
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_onednn
@pytest.mark.parametrize("shape, cout, kernel, kw", CASES)
@pytest.mark.parametrize("post_op", ["none", "relu"])
def test_the_residual_sum_before_the_post_op(shape, cout, kernel, kw, post_op):
    kw = {k: v for k, v in kw.items() if k != "groups"}  # grouped: test_residual_sums_onednn_does_not_fuse_...
    conv = _conv(shape[1], cout, kernel, **kw)
    fused = OneDNNConv2d(conv, post_op)
    x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        residual = torch.randn_like(conv(x))
        out = fused(x, residual)
        # one output pixel: PyTorch's sum (test_residual_sums_onednn_does_not_fuse_take_pytorch)
        assert (FUSED in _ops_run(lambda: fused(x, residual))) is (residual[0, 0].numel() > 1)
    assert out.shape == residual.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _in_float32(conv, x, residual, post_op == "relu"), **BF16)


@needs_onednn
@pytest.mark.parametrize("case", ["grouped", "nchw", "one pixel", "one pixel, batch 3"])
def test_residual_sums_onednn_does_not_fuse_take_pytorch(case):
    """oneDNN fuses the sum for an ungrouped convolution of a channels_last input; otherwise its operator sums with
    ATen's add_relu, which fails for bfloat16. Those take PyTorch's convolution and sum, and so does an output of
    one pixel, where PyTorch 2.11's operator failed ("could not create a memory")."""
    conv = _conv(6, 6, 3, padding=1, groups=3 if case == "grouped" else 1)
    fused = OneDNNConv2d(conv, "relu")
    x = torch.randn(1, 6, 8, 13).to(torch.bfloat16)
    if case.startswith("one pixel"):
        x = torch.randn(3 if case.endswith("3") else 1, 6, 1, 1).to(torch.bfloat16)
    if case != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        residual = torch.randn_like(conv(x))
        assert FUSED not in _ops_run(lambda: fused(x, residual))
        assert torch.equal(fused(x, residual), torch.relu(conv(x) + residual))
        assert FUSED in _ops_run(lambda: fused(x))  # without a sum, oneDNN takes either


@needs_onednn
def test_a_residual_pytorch_would_broadcast_takes_pytorch():
    conv = _conv(4, 6, 1)
    fused = OneDNNConv2d(conv, "relu")
    x = torch.randn(2, 4, 5, 7).to(torch.bfloat16)
    residual = torch.randn(1, 6, 1, 1).to(torch.bfloat16)
    with torch.no_grad():
        assert FUSED not in _ops_run(lambda: fused(x, residual))
        assert torch.equal(fused(x, residual), torch.relu(conv(x) + residual))
        with pytest.raises(RuntimeError, match="size of tensor"):
            fused(x, torch.randn(2, 5, 5, 7).to(torch.bfloat16))


@needs_onednn
def test_one_packed_weight_serves_every_input_size():
    """The weight is packed for the first call's input size; later calls with other batch sizes and maps (the
    engine's images differ in size) compute the same as a fresh module would."""
    conv = _conv(32, 48, 3, padding=1)
    fused = OneDNNConv2d(conv, "relu")
    with torch.no_grad():
        for shape in ((1, 32, 16, 22), (3, 32, 41, 9), (2, 32, 1, 1), (1, 32, 16, 22)):
            x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            expected = OneDNNConv2d(conv, "relu")(x)
            assert torch.equal(fused(x), expected), shape
            torch.testing.assert_close(fused(x).float(), _in_float32(conv, x, None, True), **BF16)


@needs_onednn
def test_a_changed_or_replaced_weight_is_packed_again():
    conv = _conv(8, 8, 3, padding=1)
    fused = OneDNNConv2d(conv, "none")
    x = torch.randn(1, 8, 10, 12).to(torch.bfloat16)
    with torch.no_grad():
        before = fused(x)
        fused.weight.mul_(-2)  # in place, as load_state_dict copies
        torch.testing.assert_close(fused(x).float(), _in_float32(conv, x, None, False), **BF16)
        assert not torch.equal(fused(x), before)
        fused.weight = nn.Parameter(torch.zeros_like(conv.weight), requires_grad=False)
        assert torch.equal(fused(x), fused.bias.view(1, -1, 1, 1).expand_as(before))
        fused.bias.zero_()
        assert not fused(x).any()


@needs_onednn
def test_weights_replaced_through_data_or_cast_are_packed_again():
    """``weight.data = ...`` and a module cast (which assigns ``.data``) bump no version counter: the packed copy
    follows the weight's storage and dtype too."""
    conv = _conv(8, 8, 3, padding=1)
    fused = OneDNNConv2d(conv, "relu")
    x = torch.randn(1, 8, 10, 12).to(torch.bfloat16)
    with torch.no_grad():
        fused(x)
        fused.weight.data = -conv.weight.detach().clone()
        torch.testing.assert_close(fused(x), torch.relu(F.conv2d(x, fused.weight, fused.bias, padding=1)), **BF16)
        big = _conv(8, 8, 3, padding=1)
        big.weight.mul_(1e6)  # past float16's range: a round trip through it changes the weight
        fused = OneDNNConv2d(big, "none")
        fused(x)
        fused.half().bfloat16()
        expected = F.conv2d(x, fused.weight, fused.bias, padding=1)
        assert not expected.isfinite().all()
        assert torch.equal(fused(x).isfinite(), expected.isfinite())


@needs_onednn
def test_an_engine_built_under_inference_mode():
    """Inference tensors keep no version counter: the packed weights of an engine built under inference_mode are
    made all the same, and its calls inside and outside inference_mode compute as an engine built outside."""
    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    with torch.inference_mode():
        seg = Segmenter(model, device="cpu", dtype=torch.bfloat16)
    x = torch.randn(1, 3, 64, 64)
    expected = Segmenter(model, device="cpu", dtype=torch.bfloat16).logits(x)
    assert torch.equal(seg.logits(x), expected)
    with torch.inference_mode():
        assert torch.equal(seg.logits(x), expected)


@needs_onednn
def test_nan_through_the_relu():
    """oneDNN's ReLU post-op turns NaN into 0 where torch.relu keeps it: documented, and the reason an engine
    without the finite check keeps its ReLUs as passes of their own (test_without_the_finite_check_nan_spreads)."""
    conv = _conv(4, 6, 1)
    x = torch.randn(1, 4, 3, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[0, :, 1, 2] = float("nan")
    with torch.no_grad():
        assert OneDNNConv2d(conv, "none")(x)[0, :, 1, 2].isnan().all()
        assert torch.relu(conv(x))[0, :, 1, 2].isnan().all()
        assert not OneDNNConv2d(conv, "relu")(x)[0, :, 1, 2].isnan().any()


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_without_the_finite_check_nan_spreads(kind):
    """Segmenter(check_finite=False) lets non-finite images through: its convolutions are packed but the ReLUs and
    sums stay PyTorch's, so NaN pixels give NaN logits where the model gives them."""
    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config(kind), NAMES)).eval()
    seg = Segmenter(model, device="cpu", dtype=torch.bfloat16, check_finite=False)
    convs = [m for m in seg.model.modules() if isinstance(m, OneDNNConv2d)]
    assert bool(convs) is onednn_conv_usable() and all(m.post_op == "none" for m in convs)
    assert not any(isinstance(m, OneDNNBottleneck) for m in seg.model.modules())
    x = torch.randn(1, 3, 64, 64)
    x[..., :16, :16] = float("nan")
    with torch.no_grad():
        expected = model(x).isnan()
    assert expected.any() and torch.equal(seg.logits(x).isnan(), expected)


def test_what_pytorch_refuses_gets_its_message():
    fused = OneDNNConv2d(_conv(4, 6, 3), "relu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        fused(torch.randn(1, 4, 2, 9).to(torch.bfloat16))
    with torch.no_grad(), pytest.raises(RuntimeError, match="expected input.* to have 4 channels"):
        fused(torch.randn(1, 5, 9, 9).to(torch.bfloat16))


@needs_onednn
def test_autocast_takes_pytorchs_convolution():
    fused = OneDNNConv2d(_conv(4, 6, 3, padding=1), "relu")
    x = torch.randn(1, 4, 9, 9).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert FUSED not in _ops_run(lambda: fused(x))
        assert fused(x).dtype == torch.float16


@needs_onednn
def test_copies_and_pickles_after_packing():
    """The packed weight is an opaque oneDNN tensor, which neither deep-copies nor pickles: copies make their own."""
    conv = _conv(8, 5, 1)
    fused = OneDNNConv2d(conv, "relu")
    x = torch.randn(2, 8, 6, 7).to(torch.bfloat16)
    with torch.no_grad():
        out = fused(x)
        for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert torch.equal(other(x), out)
            assert other.weight is not fused.weight and torch.equal(other.weight, fused.weight)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("case", ["float32", "float64", "grad", "no-onednn", "empty"])
def test_everything_else_takes_pytorchs_convolution(case):
    """Other dtypes, a call that needs gradients, oneDNN switched off by PyTorch's own flag and an empty batch give
    exactly F.conv2d and the post-op (with autograd)."""
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(case, torch.bfloat16)
    conv = _conv(6, 7, 3, dtype=dtype, padding=1)
    fused = OneDNNConv2d(conv, "relu")
    x = torch.randn(0 if case == "empty" else 2, 6, 9, 8).to(dtype)
    residual = torch.randn(x.shape[0], 7, 9, 8).to(dtype)
    if case == "grad":
        x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags' note on TF32 for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=case != "no-onednn"):
            assert FUSED not in _ops_run(lambda: fused(x, residual))
            out = fused(x, residual)
            assert torch.equal(out, torch.relu(conv(x) + residual))
    if case == "grad":
        out.float().sum().backward()
        xr = x.detach().clone().requires_grad_(True)
        torch.relu(conv(xr) + residual).float().sum().backward()
        assert x.grad is not None and torch.equal(x.grad, xr.grad)


@needs_onednn
def test_what_records_the_call_sees_the_convolution():
    """FlopCounterMode counts the convolution, make_fx records aten's."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    fused = OneDNNConv2d(_conv(4, 6, 1), "relu")
    x = torch.randn(1, 4, 5, 3).to(torch.bfloat16)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            fused(x)
        assert counter.get_total_flops() == 2 * 4 * 6 * 5 * 3
        graph = make_fx(fused)(x).graph
        assert not any("mkldnn" in str(node.target) for node in graph.nodes)
        assert any("convolution" in str(node.target) for node in graph.nodes)


def test_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="numeric zero padding"):
        OneDNNConv2d(nn.Conv2d(3, 3, 3, padding="same"))
    with pytest.raises(ValueError, match="numeric zero padding"):
        OneDNNConv2d(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="post_op must be 'none' or 'relu', got 'gelu'"):
        OneDNNConv2d(nn.Conv2d(3, 3, 1), "gelu")
    with pytest.raises(ValueError, match="BatchNorms are folded"):
        OneDNNBottleneck(Bottleneck(8, 2))


@pytest.mark.parametrize("stride, inplanes", [(1, 8), (2, 8), (1, 32)])
def test_a_bottleneck_computes_as_before(stride, inplanes):
    """OneDNNBottleneck over a folded Bottleneck's modules: in float32 (PyTorch's convolutions) exactly the block's
    result; in bfloat16 through oneDNN within bfloat16's rounding of the float32 block."""
    from denseclip_fast.engine.rewrite import fold_batchnorm

    torch.manual_seed(0)
    block = randomized(Bottleneck(inplanes, 8, stride)).eval().requires_grad_(False)
    fold_batchnorm(block)
    x = torch.randn(2, inplanes, 12, 10).contiguous(memory_format=torch.channels_last)
    fused = OneDNNBottleneck(block)
    assert fused.state_dict().keys() == block.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(fused(x), block(x))
        expected = block(x)
        low = copy.deepcopy(fused).to(torch.bfloat16)
        out = low(x.to(torch.bfloat16))
        if onednn_conv_usable():
            assert FUSED in _ops_run(lambda: low(x.to(torch.bfloat16)))
    assert rel_err(out, expected) < 2e-2


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not torch.backends.mkldnn.is_available()
    or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="oneDNN's bfloat16 convolution is checked where PyTorch builds it and the CPU computes bfloat16",
)
def test_the_operator_is_usable_here():
    """A PyTorch whose private operators moved or changed would switch the rewrite off silently: it fails here."""
    assert onednn_conv_usable()


def test_the_probe_says_no_for_an_operator_that_fails_or_disagrees(monkeypatch):
    real = cpu_conv._convolution()

    def raises(*args):
        raise TypeError("_convolution_pointwise() got an unexpected argument")

    class Disagrees:
        def __call__(self, *args):
            return real(*args) + 1

        def binary(self, *args):
            return real.binary(*args)

    fakes = [raises, Disagrees()]
    assert probed_with_fakes(onednn_conv_usable, monkeypatch, cpu_conv, "_convolution", fakes) == [False, False]


def test_the_probe_ignores_the_default_dtype_and_device():
    assert probed_under_other_defaults(onednn_conv_usable) is onednn_conv_usable()


def test_the_probe_ignores_a_callers_autocast():
    """Asked first inside a CPU autocast region (a bfloat16 Segmenter built there, in any thread), it said no, and
    that no was kept for the process."""
    assert probed_under_autocast(onednn_conv_usable) is onednn_conv_usable()


def _transposed(cin: int, cout: int, kernel: tuple[int, int], bias: bool = True, dtype=torch.bfloat16, **kw):
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(cin, cout, kernel, stride=kw.pop("stride", kernel), bias=bias, **kw)
    return conv.to(dtype).requires_grad_(False)


def _transposed_in_float32(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv_transpose2d(x.float(), conv.weight.float(), bias, conv.stride)


@pytest.mark.parametrize(
    "shape, cout, kernel, bias",
    [((1, 768, 5, 7), 768, (2, 2), True), ((2, 5, 9, 13), 7, (3, 2), False), ((3, 4, 5, 1200), 6, (1, 1), True),
     ((1, 16, 1, 1), 3, (2, 2), True), ((2, 8, 40, 30), 8, (2, 2), True)],
)  # fmt: skip
def test_a_transposed_convolution_as_matrix_products(shape, cout, kernel, bias):
    """Kernel = stride: (pixels, C) @ (C, kh kw O) written in bands of rows (one row a band past PIXELS pixels, an
    image at a time), equal to F.conv_transpose2d within bfloat16's rounding; NCHW inputs take PyTorch's."""
    conv = _transposed(shape[1], cout, kernel, bias)
    gemm = GemmConvTranspose2d(conv)
    x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = gemm(x)
        ops = _ops_run(lambda: gemm(x))
        assert "aten::mm" in ops or "aten::addmm" in ops
        assert "aten::convolution" not in ops
        nchw = x.contiguous()
        assert torch.equal(gemm(nchw), conv(nchw)) or shape[2:] == (1, 1)  # a 1x1 map is channels_last too
        assert ("aten::convolution" in _ops_run(lambda: gemm(nchw))) is (shape[2:] != (1, 1))
    assert out.shape == conv(x).shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), _transposed_in_float32(conv, x), **BF16)
    torch.testing.assert_close(out, conv(x), **BF16)


def _small_transposed() -> tuple[nn.ConvTranspose2d, GemmConvTranspose2d, torch.Tensor]:
    """A 2x2 transposed convolution, its GemmConvTranspose2d and a channels_last bfloat16 input for it."""
    conv = _transposed(6, 4, (2, 2))
    x = torch.randn(2, 6, 5, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return conv, GemmConvTranspose2d(conv), x


def test_a_transposed_convolution_on_any_default_device_and_empty_batches():
    """The output is made on the input's device, whatever torch's default; an empty batch takes PyTorch's path."""
    conv, gemm, x = _small_transposed()
    with torch.no_grad():
        expected = gemm(x)
        with torch.device("meta"):
            out = gemm(x)
        assert out.device.type == "cpu" and torch.equal(out, expected)
        empty = x[:0]
        assert torch.equal(gemm(empty), conv(empty)) and gemm(empty).shape == (0, 4, 10, 6)


def test_a_transposed_convolution_otherwise_is_pytorchs():
    """Gradients, float32, and a weight changed in place (the reordered copy is made again)."""
    conv, gemm, x = _small_transposed()
    with torch.no_grad():
        before = gemm(x)
        gemm.weight.mul_(-1)
        torch.testing.assert_close(gemm(x).float(), _transposed_in_float32(conv, x), **BF16)
        assert not torch.equal(gemm(x), before)
        copied = copy.deepcopy(gemm)
        assert torch.equal(copied(x), gemm(x))
    xg = x.float().requires_grad_(True)
    conv32 = _transposed(6, 4, (2, 2), dtype=torch.float32)
    gemm32 = GemmConvTranspose2d(conv32)
    out = gemm32(xg)
    assert torch.equal(out, conv32(xg))
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    xb = x.clone().requires_grad_(True)
    assert "aten::convolution" in _ops_run(lambda: gemm(xb))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags' note on TF32 for Intel GPUs
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            assert "aten::convolution" in _ops_run(lambda: gemm(x))


@pytest.mark.parametrize(
    "kw",
    [{"stride": 1}, {"padding": 1}, {"output_padding": 1}, {"groups": 2}, {"dilation": 2}],
)
def test_other_transposed_convolutions_are_refused(kw):
    conv = nn.ConvTranspose2d(4, 4, 2, **{"stride": 2, **kw})
    with pytest.raises(ValueError, match="stride is its kernel size, without padding"):
        GemmConvTranspose2d(conv)
    holder = nn.Sequential(conv)
    assert cpu_conv._convolutions_of(holder) == 0 and holder[0] is conv  # the rewrite leaves it alone


@needs_onednn
def test_a_bfloat16_engine_fuses_its_convolutions_over_the_same_parameters(tiny_model):
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    text = set(seg.model.text_encoder.modules())
    convs = [m for m in seg.model.modules() if isinstance(m, (nn.Conv2d, OneDNNConv2d)) and m not in text]
    resnet = tiny_model.config.vision.kind == "resnet"
    assert convs and all(isinstance(m, OneDNNConv2d) for m in convs)  # the ViT's patch embedding too
    transposed = [m for m in seg.model.modules() if isinstance(m, (nn.ConvTranspose2d, GemmConvTranspose2d))]
    assert len(transposed) == (0 if resnet else 3) and all(isinstance(m, GemmConvTranspose2d) for m in transposed)
    relus = [m for m in seg.model.modules() if isinstance(m, nn.ReLU)]
    assert not relus  # the ReLUs are post-ops (a bottleneck's last one, after the residual sum, conv3's)
    assert any(isinstance(m, OneDNNBottleneck) for m in seg.model.modules()) is resnet
    assert fuse_convolutions(seg.model) == 0  # done once, at construction
    plain = prepare_for_inference(tiny_model, torch.device("cpu"), torch.bfloat16).state_dict()
    state = seg.model.state_dict()
    assert state.keys() == plain.keys()
    # the same values, but for the MLPs (fuse_quick_gelu scales them: test_cpu_linear)
    assert [k for k in plain if ".mlp.c_" not in k and not torch.equal(state[k], plain[k])] == []


@needs_onednn
def test_a_bfloat16_engine_computes_the_same(tiny_model, monkeypatch):
    x = torch.randn(2, 3, 64, 96)
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    assert FUSED in _ops_run(lambda: seg.logits(x))
    fused = seg.logits(x)
    with torch.no_grad():
        expected = tiny_model(x)
    buffer = io.BytesIO()
    torch.save(seg.model, buffer)  # the packed weights are left out, and made again by the copy
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    channels = tiny_model.config.fpn_channels
    shapes = [(2, channels, 16 // s, 24 // s) for s in (1, 2, 4, 8)]
    levels = [torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for shape in shapes]
    with torch.no_grad():
        assert FUSED in _ops_run(lambda: loaded.decode_head(levels))  # its conv + ReLU blocks, in both architectures
        assert torch.equal(loaded.decode_head(levels), seg.model.decode_head(levels))
    monkeypatch.setattr(cpu_conv, "DTYPES", ())
    unfused = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    assert not any(isinstance(m, OneDNNConv2d) for m in unfused.model.modules())
    before = unfused.logits(x)
    # the residual sum is rounded once instead of twice: as close to float32 as the unfused engine
    assert rel_err(fused, expected) < max(1.5 * rel_err(before, expected), 1e-3)
    assert rel_err(fused, before) < 3e-2


@needs_onednn
def test_the_smallest_image_whose_last_stage_is_one_pixel(tiny_model):
    """A 32x40 image: the ResNet's stride-32 stage is one pixel, whose residual sums take PyTorch's (oneDNN's fused
    sum failed there in PyTorch 2.11); the logits as close to float32 as the engine's on larger images."""
    x = torch.randn(2, 3, 32, 40)
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = tiny_model(x)
        if tiny_model.config.vision.kind == "resnet":
            assert tiny_model.backbone(x).levels[-1].shape[-2:] == (1, 1)
    assert rel_err(seg.logits(x), expected) < 3e-2


def test_a_float32_engine_and_an_unusable_onednn_keep_pytorchs_convolutions(tiny_model, monkeypatch):
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.float32)
    assert not any(isinstance(m, OneDNNConv2d) for m in seg.model.modules())
    monkeypatch.setattr(cpu_conv, "onednn_conv_usable", lambda: False)
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    assert not any(isinstance(m, OneDNNConv2d) for m in seg.model.modules())


@needs_onednn
def test_the_engines_exported_graph_keeps_aten_convolutions(tiny_model):
    """to_aoti of a CPU Segmenter traces ImageGraph(seg.model): the graph has aten's convolutions, not oneDNN's
    private operator, and computes the same as the engine within bfloat16's rounding."""
    from denseclip_fast.export.graphs import ImageGraph

    seg = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    module = ImageGraph(seg.model, seg._text.clone()).eval()
    x = torch.randn(1, 3, 64, 64).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)  # as to_aoti
    with torch.no_grad():
        program = torch.export.export(module, (x,))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert not any("mkldnn" in t for t in targets) and any("aten.conv2d" in t for t in targets), targets
        assert rel_err(program.module()(x).float(), module(x).float()) < 3e-2

"""The CUDA engine's cuDNN-fused convolutions (denseclip_fast/engine/cuda_conv.py) on the CPU: the rewrite's structure
and results with stand-ins for cuDNN's operators (ATen's ops in PyTorch, allowed on the CPU here), the fallback to
PyTorch's convolutions, and the check the Segmenter runs before using them. On a GPU, tests/test_gpu.py runs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import denseclip_fast as dcf
from denseclip_fast.engine import cuda_conv
from denseclip_fast.engine.rewrite import prepare_for_inference

from .conftest import NAMES, randomized, tiny_config


def _conv_relu(x, w, b, stride, padding, dilation, groups):
    return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def _conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
    return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)


@pytest.fixture
def stand_ins(monkeypatch):
    """cuDNN's fused operators as ATen's ops, counted, and the CPU taken as a device they run on."""
    calls = {"relu": 0, "add_relu": 0}

    def relu(*a):
        calls["relu"] += 1
        return _conv_relu(*a)

    def add_relu(*a):
        calls["add_relu"] += 1
        return _conv_add_relu(*a)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", add_relu)
    monkeypatch.setattr(cuda_conv, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    return calls


def _prepared(kind: str = "resnet") -> dcf.DenseCLIP:
    model = randomized(dcf.DenseCLIP(tiny_config(kind), NAMES)).eval()
    return prepare_for_inference(model, torch.device("cpu"), torch.float32)


def test_fused_model_equals_the_folded_one(stand_ins):
    """Every conv + ReLU of the image path (stem, bottlenecks with their residual sums, the FPN head's blocks) is
    rewritten; the logits equal the folded model's bit for bit with ATen's ops standing in for cuDNN's, which the
    rewritten modules call (once per convolution and image batch)."""
    plain = _prepared()
    fused = _prepared()
    blocks = sum(type(m).__name__ == "Bottleneck" for m in plain.modules())
    heads = sum(isinstance(m, dcf.model.heads.ConvModule) and isinstance(m.act, nn.ReLU) for m in plain.modules())
    count = cuda_conv.fuse_cudnn_convolutions(fused)
    assert count == 3 + 3 * blocks + heads and blocks > 0 and heads > 0
    assert cuda_conv.fuse_cudnn_convolutions(fused) == 0  # a second call: nothing left
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = plain(x), fused(x)
    assert torch.equal(got, expected)
    assert stand_ins["add_relu"] == blocks and stand_ins["relu"] == 3 + 2 * blocks + heads


def test_fused_modules_take_pytorchs_path_where_the_operators_may_not_run(stand_ins):
    """Gradients needed, autocast, or a call something records (torch.jit.trace): F.conv2d and the ReLU."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fused = cuda_conv.CudnnConv2d(conv)
    x, r = torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        expected = torch.relu(conv(x) + r)
        assert torch.equal(fused(x, r), expected) and stand_ins["add_relu"] == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused(x)
    assert stand_ins == {"relu": 0, "add_relu": 1}
    out = fused(x.requires_grad_(), r)  # gradients: PyTorch's operators, which record them
    assert out.grad_fn is not None and stand_ins == {"relu": 0, "add_relu": 1}
    fused.requires_grad_(False)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x.detach(), check_trace=False)  # no untraced rerun
        assert torch.equal(traced(x.detach()), torch.relu(conv(x.detach()))) and stand_ins["relu"] == 0
    with pytest.raises(ValueError, match="a plain nn.Conv2d with a bias"):
        cuda_conv.CudnnConv2d(nn.Conv2d(4, 6, 3, bias=False))


def test_cudnn_fusion_problem_says_why_not(stand_ins, monkeypatch):
    """The check the Segmenter runs first: a device or dtype the operators do not serve, the switch, and operators
    that raise or compute something else are each named; operators that agree pass."""
    cpu = torch.device("cpu")
    assert cuda_conv.cudnn_fusion_problem(cpu, torch.bfloat16) is None
    assert "not torch.float32" in cuda_conv.cudnn_fusion_problem(cpu, torch.float32)
    monkeypatch.setenv("DENSECLIP_FAST_CUDNN_FUSION", "0")
    assert cuda_conv.cudnn_fusion_problem(cpu, torch.bfloat16) == "switched off by DENSECLIP_FAST_CUDNN_FUSION=0"
    monkeypatch.delenv("DENSECLIP_FAST_CUDNN_FUSION")
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", lambda *a: _conv_add_relu(*a) * 1.1)
    assert cuda_conv.cudnn_fusion_problem(cpu, torch.bfloat16).endswith(
        "off the plain one here (3->32 channels, 3x3, stride 2)")  # the stem's shape comes first
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast: the operators are still called
        assert "off the plain one" in cuda_conv.cudnn_fusion_problem(cpu, torch.bfloat16)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", lambda *a: _conv_add_relu(*a) * float("nan"))
    assert "is nan off the plain one" in cuda_conv.cudnn_fusion_problem(cpu, torch.float16)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert cuda_conv.cudnn_fusion_problem(cpu, torch.float16) == "cuDNN is switched off (torch.backends.cudnn.enabled)"
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)

    def fails(*a):
        raise RuntimeError("CUDNN_BACKEND_API_FAILED\nmore")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", fails)
    assert cuda_conv.cudnn_fusion_problem(cpu, torch.float16) == (
        "cuDNN's fused convolution failed here: CUDNN_BACKEND_API_FAILED")
    monkeypatch.setattr(cuda_conv, "DEVICE_TYPES", ("cuda",))
    assert "on cpu" in cuda_conv.cudnn_fusion_problem(cpu, torch.bfloat16)


def test_a_fused_call_that_raises_or_a_map_too_large_takes_the_plain_path(stand_ins, monkeypatch):
    """A fused call that raises (a shape cuDNN has no plan for) warns once and the module keeps to PyTorch's path;
    maps of LARGEST elements or more (input or output) take it too."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fused = cuda_conv.CudnnConv2d(conv).requires_grad_(False)
    x = torch.randn(1, 4, 5, 5)
    expected = torch.relu(conv(x)).detach()
    monkeypatch.setattr(cuda_conv, "LARGEST", 6 * 25)  # the output's 150 elements
    assert torch.equal(fused(x), expected) and stand_ins["relu"] == 0
    monkeypatch.setattr(cuda_conv, "LARGEST", 2**31)
    calls = []

    def fails(*a):
        calls.append(1)
        raise RuntimeError("GET was unable to find an engine to execute this computation")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", fails)
    with pytest.warns(dcf.EngineFallbackWarning, match=r"failed on a \(1, 4, 5, 5\) input \(GET was unable"):
        assert torch.equal(fused(x), expected)
    assert torch.equal(fused(x), expected) and len(calls) == 1  # not tried again
    assert fused.failed == "GET was unable to find an engine to execute this computation"


def test_a_cpu_segmenter_leaves_its_convolutions_to_the_cpu_rewrite():
    seg = dcf.Segmenter(randomized(dcf.DenseCLIP(tiny_config(), NAMES)).eval(), device="cpu")
    assert seg.cudnn_fusion_problem is None
    with pytest.raises(AttributeError):
        seg.cudnn_fusion_problem = "set"  # type: ignore[misc]  # read-only
    assert not any(isinstance(m, cuda_conv.CudnnConv2d) for m in seg.model.modules())


def test_pointwise_convolutions_become_gemms_with_their_bias(stand_ins, monkeypatch):
    """After the ReLU fusion, the image path's 1x1 convolutions with a bias and no ReLU (each strided or widening
    bottleneck's shortcut, the FPN's laterals, the head's classifier) are rewritten as GEMMs: F.linear on the NHWC
    view (counted), whose result is the channels_last map; the logits equal the folded model's (1e-6: a GEMM's sums
    in another order). NCHW inputs, gradients and tracing take F.conv2d; other convolutions are refused."""
    from denseclip_fast.ops import extension_available

    if not extension_available():
        pytest.skip("needs the C++ extension (make setup): its score/concat gives the NHWC merged level a GPU gives")
    monkeypatch.setenv("DENSECLIP_FAST_BACKEND", "cpu")  # the C++ score/concat: an NHWC merged level, as on a GPU
    plain = _prepared().to(memory_format=torch.channels_last)
    fused = _prepared().to(memory_format=torch.channels_last)
    cuda_conv.fuse_cudnn_convolutions(fused)
    shortcuts = sum(type(m).__name__ == "Bottleneck" and m.downsample is not None for m in plain.modules())
    assert cuda_conv.gemm_pointwise_convolutions(fused) == shortcuts + 4 + 1 and shortcuts == 4
    assert cuda_conv.gemm_pointwise_convolutions(fused) == 0
    linears = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: linears.append(a[0].shape) or real(*a))
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = plain(x), fused(x)
    assert sum(len(s) == 4 for s in linears) == shortcuts + 4 + 1  # the others: the decoder's linears
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-6
    gemm = cuda_conv.GemmConv1x1(nn.Conv2d(4, 6, 1))
    y = torch.randn(1, 4, 5, 7)
    linears.clear()
    with torch.no_grad():
        out = gemm(y.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last) and len(linears) == 1
        torch.testing.assert_close(out, F.conv2d(y, gemm.weight, gemm.bias), rtol=1e-6, atol=1e-6)
        assert torch.equal(gemm(y), F.conv2d(y, gemm.weight, gemm.bias))  # NCHW: the convolution
    assert gemm(y.contiguous(memory_format=torch.channels_last).requires_grad_()).grad_fn is not None
    assert len(linears) == 1
    for conv in (nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 1, stride=2), nn.Conv2d(4, 6, 1, bias=False),
                 nn.Conv2d(4, 6, 1, groups=2)):  # fmt: skip
        with pytest.raises(ValueError, match="GemmConv1x1 takes a 1x1"):
            cuda_conv.GemmConv1x1(conv)

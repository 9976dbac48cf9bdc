"""The residual sum + LayerNorm Triton kernel (ops/triton/layer_norm.py) against PyTorch's addition and F.layer_norm,
and the CUDA engine's decoder that uses it (engine/decoder_norms.py) against the model's: under Triton's interpreter
on a CPU (CI), on CUDA where there is one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import denseclip_fast as dcf
from denseclip_fast.engine import decoder_norms
from denseclip_fast.engine.rewrite import prepare_for_inference
from denseclip_fast.model.decoder import ContextDecoder
from denseclip_fast.ops.triton import layer_norm, resample

from .conftest import NAMES, randomized, rel_err, tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _within(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype, units: float) -> None:
    """got (dtype) within ``units`` units in the last place of want64 (float64); float32 within 1e-5 relative to the
    largest value (the LayerNorm's float32 mean and variance)."""
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=1e-5 * float(want64.abs().max()))
        return
    ulp = units * ULP[dtype] * want64.abs().clamp_min(2.0**-6)
    assert bool(((got.double() - want64).abs() <= ulp).all()), float(((got.double() - want64).abs() / ulp).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("x_batch", "batch", "length", "width"),
    [(1, 1, 1, 1), (1, 3, 7, 48), (2, 2, 5, 256), (1, 2, 150, 33), (3, 3, 2, 300), (1, 1, 4, 1024)],
)
def test_add_layer_norm_equals_the_sum_and_layer_norm(dtype, x_batch, batch, length, width):
    """Odd and power-of-two widths, one element, rows of one and of several programs, x broadcast over the batch:
    the sum is ATen's (bit for bit in float32; within one unit in the last place in 16 bits, which the interpreter
    rounds by truncation), the LayerNorm of that rounded sum within float32 rounding of F.layer_norm's in float64
    (two units in the last place in 16 bits: one of rounding, one of truncation)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(x_batch, length, width, generator=g).to(DEVICE, dtype)
    y = (3 * torch.randn(batch, length, width, generator=g)).to(DEVICE, dtype)
    weight = torch.randn(width, generator=g).to(DEVICE, dtype)
    bias = torch.randn(width, generator=g).to(DEVICE, dtype)
    total, out = layer_norm.add_layer_norm(x, y, weight, bias, 1e-5)
    assert total.shape == out.shape == (batch, length, width) and total.is_contiguous() and out.is_contiguous()
    if dtype == torch.float32:
        assert torch.equal(total, x + y)
    else:
        _within(total, x.double() + y.double(), dtype, 1)
    want = F.layer_norm(total.double(), (width,), weight.double(), bias.double(), 1e-5)
    _within(out, want, dtype, 2)


class _Spy:
    """A stand-in for the kernel that records each launch's WIDE and launches it."""

    def __init__(self, kernel, seen: list) -> None:
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["WIDE"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("wide", [False, True])
def test_add_layer_norm_reads_strided_rows_and_writes_zero_rows(wide, monkeypatch):
    """y a slice of a wider tensor (rows further apart than their width) and x a view with its own strides, with
    int32 offsets and (``wide``: the threshold lowered) int64 ones; an empty batch gives empty results."""
    if wide:
        monkeypatch.setattr(resample, "WIDE_FROM", 1)  # resample._wide decides, as for the other Triton kernels
    g = torch.Generator().manual_seed(1)
    wider = torch.randn(2, 6, 40, generator=g).to(DEVICE)
    y = wider[:, 1:5, 3:35]  # (2, 4, 32), row stride 40, batch stride 240
    x = torch.randn(4, 2, 32, generator=g).to(DEVICE).transpose(0, 1)  # (2, 4, 32), strides (32, 64, 1)
    weight, bias = torch.rand(32, generator=g).to(DEVICE), torch.randn(32, generator=g).to(DEVICE)
    widths = []
    kernel = layer_norm._add_layer_norm_kernel
    monkeypatch.setattr(layer_norm, "_add_layer_norm_kernel", _Spy(kernel, widths))
    total, out = layer_norm.add_layer_norm(x, y, weight, bias, 1e-6)
    assert widths == [wide]
    assert torch.equal(total, x + y)
    torch.testing.assert_close(out, F.layer_norm(x + y, (32,), weight, bias, 1e-6), rtol=1e-5, atol=1e-5)
    constant = torch.full((1, 2, 32), 3.0, device=DEVICE)  # no variance: eps alone sets the scale, bias the value
    total, out = layer_norm.add_layer_norm(constant, constant, weight, bias, 0.25)
    assert torch.equal(total, 2 * constant) and torch.allclose(out, bias.expand_as(out))
    ones = torch.tensor([[[0.0, 2.0]]], device=DEVICE)  # variance 1: out = (+-1) / sqrt(1 + eps)
    _, out = layer_norm.add_layer_norm(ones, torch.zeros_like(ones), weight[:2], torch.zeros(2, device=DEVICE), 3.0)
    torch.testing.assert_close(out[0, 0], torch.stack([-weight[0], weight[1]]) / 2)
    empty = torch.zeros(0, 4, 32, device=DEVICE)
    total, out = layer_norm.add_layer_norm(x[:1], empty, weight, bias, 1e-5)
    assert total.shape == out.shape == (0, 4, 32)


@pytest.mark.parametrize(
    ("x", "y", "weight", "match"),
    [
        ((2, 3, 8), (2, 3), (8,), r"y must be a \(B, L, W\) float32/float16/bfloat16 tensor"),
        ((2, 3, 8), (3, 3, 8), (8,), r"x must be \(3 or 1, 3, 8\)"),
        ((1, 3, 7), (2, 3, 8), (8,), r"x must be \(2 or 1, 3, 8\).*shape \(1, 3, 7\)"),
        ((1, 3, 8), (1, 3, 8), (9,), r"weight must be a contiguous floating-point \(8,\) tensor"),
        ((1, 1, 9000), (1, 1, 9000), (9000,), "rows of 1 to 8192 elements, got 9000"),
    ],
)
def test_add_layer_norm_names_what_it_does_not_take(x, y, weight, match):
    with pytest.raises(ValueError, match=match):
        layer_norm.add_layer_norm(torch.zeros(x), torch.zeros(y), torch.ones(weight), torch.zeros(y[-1:]), 1e-5)
    with pytest.raises(ValueError, match="x must be"):  # another dtype
        layer_norm.add_layer_norm(torch.zeros(1, 2, 4, dtype=torch.float16), torch.zeros(1, 2, 4), torch.ones(4),
                                  torch.zeros(4), 1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="y must be"):  # integers
        layer_norm.add_layer_norm(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, dtype=torch.int32), torch.ones(4),
                                  torch.zeros(4), 1e-5)  # fmt: skip


@pytest.fixture
def on_this_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's kernel route taken on this test's device (on a CPU: Triton's interpreter)."""
    monkeypatch.setattr(decoder_norms, "DEVICE_TYPES", (DEVICE,))


@pytest.mark.parametrize(("kind", "layers"), [("resnet", 1), ("resnet", 3), ("vit", 2)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_engines_decoder_equals_the_models(kind, layers, dtype, tolerance, on_this_device, monkeypatch):
    """An inference copy's ContextDecoder swapped (once) for the NormsDecoder over the same modules: from a
    vocabulary's prefix and a batch of 3 images' visual tokens, the kernel's route gives the model's decode within
    the dtype's rounding, every sum and LayerNorm of the decoder but the first layer's self-attention's through the
    kernel (8 of 9 in the official 3 layers: 2 in the first, 3 in the others); switched off
    (DENSECLIP_FAST_TRITON_ADD_LN=0), or in gradient mode (the kernel has no backward; the weights or the prefix
    may want a gradient), the model's decode exactly."""
    config = tiny_config(kind)
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, layers=layers))
    model = randomized(dcf.DenseCLIP(config, NAMES)).eval()
    prepared = prepare_for_inference(model, torch.device(DEVICE), dtype)
    plain = prepared.context_decoder
    assert decoder_norms.swap_decoder(prepared) == 1 and decoder_norms.swap_decoder(prepared) == 0
    swapped = prepared.context_decoder
    assert isinstance(swapped, decoder_norms.NormsDecoder) and type(plain) is ContextDecoder
    pairs = list(zip(swapped.named_parameters(), plain.named_parameters(), strict=True))
    assert all(a == b and p is q for (a, p), (b, q) in pairs)  # the same modules, not copies
    g = torch.Generator().manual_seed(0)
    d = model.config.embed_dim
    text = torch.randn(len(NAMES), d, generator=g).to(DEVICE, dtype)
    visual = torch.randn(3, 17, d, generator=g).to(DEVICE, dtype)
    calls = []
    kernel = layer_norm.add_layer_norm
    monkeypatch.setattr(layer_norm, "add_layer_norm", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        prefix = plain.prefix(text)
        want = plain.decode(prefix, visual)
        got = swapped.decode(prefix, visual)
        assert len(calls) == 3 * len(plain.decoder) - 1
        assert got.shape == want.shape == (3, len(NAMES), d) and got.dtype == dtype
        assert rel_err(got, want) < tolerance, rel_err(got, want)
        monkeypatch.setenv("DENSECLIP_FAST_TRITON_ADD_LN", "0")
        assert torch.equal(swapped.decode(prefix, visual), want)
    monkeypatch.delenv("DENSECLIP_FAST_TRITON_ADD_LN")
    assert len(calls) == 3 * len(plain.decoder) - 1
    assert torch.equal(swapped.decode(prefix, visual), plain.decode(prefix, visual))  # gradient mode on
    assert len(calls) == 3 * len(plain.decoder) - 1


def test_sums_the_kernel_refuses_are_the_models(on_this_device, monkeypatch):
    """add_norm's way round the kernel (inputs it refuses: layer_norm.problem, e.g. rows past MAX_WIDTH, which no
    tiny decoder reaches) is the model's x + y and the LayerNorm of that sum, exactly: the decode with every sum
    refused equals the model's bit for bit (the LayerNorm of y alone there once passed every test)."""
    model = randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    plain = model.context_decoder
    swapped = decoder_norms.NormsDecoder(plain)
    monkeypatch.setattr(layer_norm, "problem", lambda *a: "refused")
    g = torch.Generator().manual_seed(1)
    d = model.config.embed_dim
    text, visual = torch.randn(len(NAMES), d, generator=g), torch.randn(2, 9, d, generator=g)
    with torch.no_grad():
        prefix = plain.prefix(text)
        assert decoder_norms.usable(visual)
        assert torch.equal(swapped.decode(prefix, visual), plain.decode(prefix, visual))


def test_autocast_and_gradient_mode_take_the_models_decode(on_this_device):
    x = torch.zeros(1, 2, 4, device=DEVICE)
    with torch.no_grad():
        assert decoder_norms.usable(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            assert not decoder_norms.usable(x)
    assert not decoder_norms.usable(x)


def test_a_cpu_tensor_never_imports_the_kernel(monkeypatch):
    """On a CPU (the engine's DEVICE_TYPES are CUDA's) the decoder is the model's, asked before Triton is."""
    monkeypatch.setattr(decoder_norms, "_kernels", lambda: pytest.fail("the kernel module was imported"))
    with torch.no_grad():
        assert not decoder_norms.usable(torch.zeros(1, 2, 4))
    model = dcf.DenseCLIP(tiny_config("resnet"), NAMES).eval()
    decoder_norms.swap_decoder(model)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, len(NAMES), 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the rewrite is a GPU engine's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cuda_segmenter_takes_the_kernel(dtype, monkeypatch):
    """A CUDA Segmenter's decoder is a NormsDecoder whose kernel runs in its forward (eager, then captured and
    replayed); its logits those of an engine with the kernel switched off, within the dtype's rounding."""
    model = randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    calls = []
    kernel = layer_norm.add_layer_norm
    monkeypatch.setattr(layer_norm, "add_layer_norm", lambda *a: calls.append(1) or kernel(*a))
    seg = dcf.Segmenter(model, device="cuda", dtype=dtype, capture_after=1)
    assert isinstance(seg.model.context_decoder, decoder_norms.NormsDecoder)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    got = seg.logits(x)
    assert calls and seg.captured_graphs == 1
    assert torch.equal(seg.logits(x), got)  # the replay
    monkeypatch.setenv("DENSECLIP_FAST_TRITON_ADD_LN", "0")
    plain = dcf.Segmenter(model, device="cuda", dtype=dtype, cuda_graphs=False).logits(x)
    assert rel_err(got, plain) < (1e-5 if dtype == torch.float32 else 2e-2), rel_err(got, plain)

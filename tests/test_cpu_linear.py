"""The CPU engine's linear layers through oneDNN (denseclip_fast/engine/cpu_linear.py): the same function as
F.linear, taken only for plain CPU float32 (and, where the CPU computes it, bfloat16) tensors without gradients, and
only in the Segmenter's own copy of the model."""

from __future__ import annotations

import copy
import platform
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from denseclip_fast import Segmenter
from denseclip_fast.engine import cpu_linear
from denseclip_fast.engine.cpu_linear import OneDNNLinear, onednn_linear, onednn_linear_usable, use_onednn_linears
from denseclip_fast.engine.rewrite import prepare_for_inference
from denseclip_fast.model.layers import MultiheadSelfAttention, QuickGELU
from denseclip_fast.model.vit import CLIPViTBackbone

from .conftest import NAMES, probed_under_autocast, probed_under_other_defaults, probed_with_fakes, rel_err

needs_onednn = pytest.mark.skipif(not onednn_linear_usable(), reason="this PyTorch has no usable oneDNN linear")
needs_bfloat16 = pytest.mark.skipif(
    not cpu_linear.onednn_bfloat16_usable(), reason="this CPU's oneDNN linear computes no bfloat16"
)


def _ops_run(fn) -> set[str]:
    """The names of the operators ``fn()`` runs (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bfloat16)])
@pytest.mark.parametrize(
    "x_shape, out, bias",
    [((1, 1), 1, True), ((7, 13), 5, True), ((3, 65, 33), 70, False), ((2, 3, 4, 17), 9, True), ((257, 64), 192, True)],
)
def test_equals_f_linear_through_onednn(x_shape, out, bias, dtype):
    """float32: F.linear's sums in another order; bfloat16: float32 sums of the bfloat16 values rounded to bfloat16,
    as F.linear: within a bfloat16 rounding (2**-8 relative) and float32 summation errors (bounded by the sums of
    the products' magnitudes) of the exact sums, and within two roundings of F.linear's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g).to(dtype)
    w = torch.randn(out, x_shape[-1], generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    with torch.inference_mode():
        y = onednn_linear(x, w, b)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: onednn_linear(x, w, b))
    assert y.shape == F.linear(x, w, b).shape and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        return
    exact, size = _exact_and_magnitude(x, w, b)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + size * 1e-5).all()
    plain = F.linear(x, w, b).double()
    assert ((y.double() - plain).abs() <= torch.maximum(y.double().abs(), plain.abs()) * 2**-7 + size * 2e-5).all()


def _exact_and_magnitude(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """F.linear of the values in float64, and the sums of the magnitudes of its terms (what bounds a float32
    summation's error)."""
    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.double(), w.double(), None if b is None else b.double())

    return linear(x, w, b), linear(x.abs(), w.abs(), None if b is None else b.abs())


@needs_bfloat16
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bfloat16_swish_is_silu_of_the_sums_within_bfloat16s_rounding(seed):
    """SiLU of the sums, rounded to bfloat16: within a rounding of the result, a rounding of the sums (should oneDNN
    round them before its post-op, as the model's F.linear does) and float32 summation errors."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(shape, generator=g).bfloat16() for shape in ((5, 33, 40), (70, 40), (70,)))
    with torch.inference_mode():
        y = cpu_linear._linear(x, w, b, "swish")
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: cpu_linear._linear(x, w, b, "swish"))
    sums, size = _exact_and_magnitude(x, w, b)
    exact = F.silu(sums)
    slope = torch.sigmoid(sums) * (1 + sums * (1 - torch.sigmoid(sums)))  # SiLU's derivative
    bound = exact.abs() * 2**-8 + (sums.abs() * 2**-8 + size * 1e-5) * slope.abs().clamp(min=0.1) * 1.01
    assert y.dtype == torch.bfloat16 and ((y.double() - exact).abs() <= bound).all()


@needs_onednn
def test_non_contiguous_inputs():
    x = torch.randn(40, 24).t()  # (24, 40), strides (1, 24)
    w, b = torch.randn(8, 40), torch.randn(8)
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(5, 6, 40)[:, ::2]
    torch.testing.assert_close(onednn_linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["float64", "float16", "bfloat16 unusable", "one-dimensional", "empty", "grad"],
)
def test_everything_else_takes_f_linear(case, monkeypatch):
    """Other dtypes (bfloat16 where this CPU's oneDNN does not compute it), a 1-D or empty input, and a call that
    needs gradients give exactly F.linear (with autograd)."""
    x, w, b = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
    if case in ("float64", "float16", "bfloat16 unusable"):
        x, w, b = (t.to(getattr(torch, case.split()[0])) for t in (x, w, b))
        monkeypatch.setattr(cpu_linear, "onednn_bfloat16_usable", lambda: False)
    elif case == "one-dimensional":
        x = x[0]
    elif case == "empty":
        x = x[:0]
    elif case == "grad":
        x.requires_grad_(True)
    y = onednn_linear(x, w, b)
    assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: onednn_linear(x, w, b))
    assert torch.equal(y, F.linear(x, w, b))
    if case == "grad":
        y.sum().backward()
        assert x.grad is not None and torch.equal(x.grad, w.sum(0).expand_as(x))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
    reason="oneDNN's linear operator is checked where PyTorch builds it (x86-64)",
)
def test_the_operator_is_usable_here():
    """A PyTorch whose private operator moved or changed would switch the rewrite off silently: it fails here."""
    assert onednn_linear_usable()


def test_the_probe_says_no_for_an_operator_that_fails_or_disagrees(monkeypatch):
    def raises(*args):
        raise TypeError("_linear_pointwise() got an unexpected argument")

    def disagrees(x, w, b, *args):
        return F.linear(x, w, b) + 1

    fakes = [raises, disagrees]
    assert probed_with_fakes(onednn_linear_usable, monkeypatch, cpu_linear, "_operator", fakes) == [False, False]


def test_the_probe_ignores_the_default_dtype_and_device():
    assert probed_under_other_defaults(onednn_linear_usable) is onednn_linear_usable()


def test_the_probes_ignore_a_callers_autocast():
    """Asked first inside a CPU autocast region (a Segmenter built there, in any thread), the probes said no (the
    float32 F.linear they compare with ran in bfloat16), and that no was kept for the process."""
    for probe in (onednn_linear_usable, cpu_linear.onednn_swish_usable, cpu_linear.onednn_bfloat16_usable):
        answer = probe()
        assert probed_under_autocast(probe) is answer, probe.__name__


@needs_bfloat16  # else it says no anyway
def test_the_bfloat16_probe_says_no_for_an_operator_that_fails_disagrees_or_changes_the_dtype(monkeypatch):
    """Only the bfloat16 answer is asked again (the float32 probes keep their cached yes, asked first)."""
    real = cpu_linear._operator()

    def fails_in_bfloat16(x, *args):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_linear: bf16 path needs the cpu support avx_ne_convert or avx512bw")
        return real(x, *args)

    def disagrees_in_bfloat16(x, w, b, *args):
        return real(x, w, b, *args) + (x.dtype == torch.bfloat16)

    def float32_out(x, w, b, *args):
        return real(x.float(), w.float(), b.float(), *args)

    assert cpu_linear.onednn_swish_usable()  # cached before the fakes
    fakes = [fails_in_bfloat16, disagrees_in_bfloat16, float32_out]
    answers = probed_with_fakes(cpu_linear.onednn_bfloat16_usable, monkeypatch, cpu_linear, "_operator", fakes)
    assert answers == [False, False, False]


@needs_bfloat16  # else it says no anyway
def test_the_bfloat16_probe_says_no_where_onednn_computes_no_bfloat16(monkeypatch):
    cpu_linear.onednn_bfloat16_usable.cache_clear()
    try:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        assert cpu_linear.onednn_bfloat16_usable() is False
    finally:
        cpu_linear.onednn_bfloat16_usable.cache_clear()
        monkeypatch.undo()


def test_the_bfloat16_probe_ignores_the_default_dtype_and_device():
    answer = cpu_linear.onednn_bfloat16_usable()
    assert probed_under_other_defaults(cpu_linear.onednn_bfloat16_usable) is answer


@pytest.mark.parametrize("bias", ["strided", "expanded", "0-d", "(1, 5)", "(1,)"])
def test_biases_f_linear_would_broadcast_take_f_linear(bias):
    """oneDNN reads a bias as a dense (out,) vector: a strided or broadcast one gave wrong sums; these take F.linear."""
    x, w = torch.randn(7, 13), torch.randn(5, 13)
    b = {
        "strided": torch.randn(10)[::2], "expanded": torch.randn(1).expand(5), "0-d": torch.tensor(2.0),
        "(1, 5)": torch.randn(1, 5), "(1,)": torch.randn(1),
    }[bias]  # fmt: skip
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: onednn_linear(x, w, b))
        assert torch.equal(onednn_linear(x, w, b), F.linear(x, w, b))


@needs_bfloat16
@pytest.mark.parametrize("case", ["bfloat16 input, float32 weight", "float32 input, bfloat16 weight", "autocast"])
def test_mixed_dtypes_and_autocast_take_f_linear(case):
    """Mixed dtypes get F.linear's error; under autocast F.linear's own dtype rules hold (a float32 layer computes
    in bfloat16, as F.linear would)."""
    x, w, b = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
    if case == "autocast":
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: onednn_linear(x, w, b))
            y, expected = onednn_linear(x, w, b), F.linear(x, w, b)
        assert y.dtype == expected.dtype == torch.bfloat16 and torch.equal(y, expected)
        return
    if case.startswith("bfloat16"):
        x = x.bfloat16()
    else:
        w, b = w.bfloat16(), b.bfloat16()
    with pytest.raises(RuntimeError) as raised:
        F.linear(x, w, b)
    with pytest.raises(RuntimeError, match=str(raised.value)[:30]):
        onednn_linear(x, w, b)


def test_shape_errors_are_f_linears():
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        onednn_linear(torch.randn(3, 4), torch.randn(5, 6))


@needs_onednn
def test_what_records_the_call_sees_f_linear():
    """FlopCounterMode counts the linear layers, make_fx and torch.jit.trace record aten's linear, and oneDNN switched
    off by PyTorch's own flag is not called."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            onednn_linear(x, w, b)
        assert counter.get_total_flops() == 2 * 6 * 10 * 4
        graph = make_fx(onednn_linear)(x, w, b).graph
        assert not any("mkldnn" in str(node.target) for node in graph.nodes)
        traced = torch.jit.trace(lambda t: onednn_linear(t, w, b), (x,))
        torch.testing.assert_close(traced(x), F.linear(x, w, b))
        with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
            warnings.simplefilter("ignore")  # the flags' note on TF32 for Intel GPUs
            assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: onednn_linear(x, w, b))


def test_forward_mode_ad_sees_f_linear():
    import torch.autograd.forward_ad as fwAD

    x, w, b, dx = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4), torch.randn(6, 10)
    with torch.no_grad():
        _, tangent = torch.func.jvp(lambda t: onednn_linear(t, w, b), (x,), (dx,))
        torch.testing.assert_close(tangent, F.linear(dx, w))
        with fwAD.dual_level():
            out = onednn_linear(fwAD.make_dual(x, dx), w, b)
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, F.linear(dx, w))


@needs_onednn
def test_every_linear_layer_is_rewritten_over_the_same_parameters(tiny_model):
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.float32)
    rewritten = seg.model
    assert not any(type(m) is nn.Linear for m in rewritten.modules())
    assert any(isinstance(m, OneDNNLinear) for m in rewritten.text_encoder.modules())
    attentions = [m for m in rewritten.modules() if isinstance(m, MultiheadSelfAttention)]
    assert attentions and all(m.linear is onednn_linear for m in attentions)
    # the same parameters under the same names: nothing copied, the state dict as without the rewrite, but for the
    # MLPs whose QuickGELU became oneDNN's SiLU post-op (fuse_quick_gelu): c_fc times 1.702, c_proj's weight divided
    plain = prepare_for_inference(tiny_model, torch.device("cpu"), torch.float32).state_dict()
    state = rewritten.state_dict()
    assert state.keys() == plain.keys()
    scaled = {k: plain[k] * 1.702 for k in plain if ".mlp.c_fc." in k}
    scaled |= {k: plain[k] / 1.702 for k in plain if k.endswith(".mlp.c_proj.weight")}
    assert scaled and all(torch.equal(state[k], scaled.get(k, plain[k])) for k in plain)


@needs_onednn
def test_the_vocabulary_and_the_image_go_through_onednn_in_every_dtype(tiny_model):
    """The text encoder computes in float32 in any engine: its layers take oneDNN also in a bfloat16 engine, whose
    image path takes oneDNN's bfloat16 linear where this CPU computes it."""
    for dtype in (torch.float32, torch.bfloat16):
        seg = Segmenter(tiny_model, device="cpu", dtype=dtype)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda seg=seg: seg.set_classes(NAMES[::-1]))
        per_image = _ops_run(lambda seg=seg: seg.logits(torch.randn(1, 3, 64, 64)))
        image_onednn = dtype == torch.float32 or cpu_linear.onednn_bfloat16_usable()
        assert ("mkldnn::_linear_pointwise" in per_image) is image_onednn
        text = set(seg.model.text_encoder.modules())
        image_layers = [m for m in seg.model.modules() if m not in text and isinstance(m, (nn.Linear, OneDNNLinear))]
        assert image_layers and all(isinstance(m, OneDNNLinear) and m.weight.dtype == dtype for m in image_layers)
        plain = prepare_for_inference(tiny_model, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            expected = plain.text_features(NAMES[::-1])
        torch.testing.assert_close(seg.model.text_features(NAMES[::-1]), expected, rtol=1e-5, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("bfloat16_onednn", [True, False])
def test_a_bfloat16_engine_scales_its_mlps_in_float32_and_computes_the_model(tiny_model, monkeypatch, bfloat16_onednn):
    """The QuickGELU MLPs' scaled weights are the float32 ones times 1.702 (c_proj's divided) rounded to bfloat16
    once; the engine's logits are the float32 model's within bfloat16's error, through oneDNN's bfloat16 linear and
    (where this CPU's oneDNN computes no bfloat16) through F.silu(F.linear)."""
    if bfloat16_onednn and not cpu_linear.onednn_bfloat16_usable():
        pytest.skip("this CPU's oneDNN linear computes no bfloat16")
    if not bfloat16_onednn:
        monkeypatch.setattr(cpu_linear, "onednn_bfloat16_usable", lambda: False)
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.bfloat16)
    plain = prepare_for_inference(tiny_model, torch.device("cpu"), torch.float32).state_dict()
    state = seg.model.state_dict()
    image = [k for k in plain if ".mlp.c_" in k and not k.startswith("text_encoder.")]
    assert bool(image) is isinstance(seg.model.backbone, CLIPViTBackbone)  # a ResNet's image path has no MLP
    assert all(state[k].dtype == torch.bfloat16 for k in image)
    for k in image:
        if ".c_fc." in k:
            scaled = plain[k] * 1.702
        else:  # c_proj: its weight divided, its bias as it was
            scaled = plain[k] / 1.702 if k.endswith(".weight") else plain[k]
        assert torch.equal(state[k], scaled.bfloat16()), k
    x = torch.randn(2, 3, 64, 96)
    per_image = _ops_run(lambda: seg.logits(x))
    assert ("mkldnn::_linear_pointwise" in per_image) is bfloat16_onednn
    with torch.no_grad():
        expected = tiny_model(x)
    assert rel_err(seg.logits(x), expected) < 2e-2


@needs_onednn
def test_the_rewritten_model_computes_the_same(tiny_model):
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.float32)
    before = seg.logits(x := torch.randn(1, 3, 64, 96))
    assert use_onednn_linears(seg.model) == 0  # done once, at construction
    with torch.no_grad():
        expected = tiny_model(x)
    assert rel_err(before, expected) < 1e-5
    assert torch.equal(seg.logits(x), before)


@needs_onednn
def test_the_engines_traced_graph_keeps_aten_linear(tiny_model):
    """to_aoti of a CPU float32 Segmenter traces ImageGraph(seg.model) under no_grad, the parameters frozen: the
    graph has aten's linear, not oneDNN's private operator, and computes the same."""
    from denseclip_fast.export.graphs import ImageGraph

    seg = Segmenter(tiny_model, device="cpu", dtype=torch.float32)
    module = ImageGraph(seg.model, seg._text.clone()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert not any("mkldnn" in t for t in targets) and any("linear" in t for t in targets), targets
        assert rel_err(program.module()(x), module(x)) < 1e-5


def test_an_unusable_onednn_leaves_the_model_alone(tiny_model, monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_linear_usable", lambda: False)
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.float32)
    assert not any(isinstance(m, OneDNNLinear) for m in seg.model.modules())
    assert use_onednn_linears(seg.model) == 0


@needs_onednn  # it is usable again afterwards
def test_usable_is_false_without_onednn(monkeypatch):
    onednn_linear_usable.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert onednn_linear_usable() is False
    finally:
        onednn_linear_usable.cache_clear()
        monkeypatch.undo()
    assert onednn_linear_usable() is True


needs_swish = pytest.mark.skipif(not cpu_linear.onednn_swish_usable(), reason="no usable oneDNN swish post-op")


@needs_swish
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_a_fused_quick_gelu_mlp_computes_the_same_through_onednn_and_without(rows):
    """fuse_quick_gelu: c_fc' = 1.702 c_fc with SiLU, c_proj / 1.702 equals the MLP with QuickGELU, through oneDNN
    (no gradients) and through F.silu(F.linear) (an input that needs gradients), which gives them."""
    from denseclip_fast.model.layers import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    fused = copy.deepcopy(block)
    assert use_onednn_linears(fused) == 4 and cpu_linear.fuse_quick_gelu(fused) == 1  # in, out, c_fc, c_proj
    assert type(fused.mlp.c_fc) is OneDNNLinear and fused.mlp.c_fc.post_op == "swish"
    assert type(fused.mlp.gelu) is nn.Identity
    assert cpu_linear.fuse_quick_gelu(fused) == 0  # done once
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        expected = block.mlp(x)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: fused.mlp(x))
        assert rel_err(fused.mlp(x), expected) < 1e-6
    xg = x.clone().requires_grad_()
    out = fused.mlp(xg)
    assert rel_err(out, expected) < 1e-6
    out.sum().backward()
    xr = x.clone().requires_grad_()
    block.mlp(xr).sum().backward()
    assert rel_err(xg.grad, xr.grad) < 1e-5


@needs_swish
def test_quick_gelu_is_fused_where_the_linears_take_onednn(tiny_model, monkeypatch):
    """Every QuickGELU MLP of a float32 or bfloat16 engine is fused; MLPs whose weights are no longer float32
    (scaling would round them twice), GELU MLPs and a PyTorch without the post-op are left alone."""
    count = sum(type(m) is QuickGELU for m in tiny_model.modules())
    for dtype in (torch.float32, torch.bfloat16):
        seg = Segmenter(tiny_model, device="cpu", dtype=dtype)
        assert sum(getattr(m, "post_op", None) == "swish" for m in seg.model.modules()) == count, dtype
    half = copy.deepcopy(tiny_model).bfloat16()
    assert use_onednn_linears(half) > 0 and cpu_linear.fuse_quick_gelu(half) == 0
    monkeypatch.setattr(cpu_linear, "onednn_swish_usable", lambda: False)
    seg = Segmenter(tiny_model, device="cpu", dtype=torch.float32)
    assert not any(getattr(m, "post_op", None) == "swish" for m in seg.model.modules())
    gelu = copy.deepcopy(seg.model)
    for m in gelu.modules():
        if isinstance(m, nn.Sequential) and hasattr(m, "gelu"):
            m.gelu = nn.GELU()
    monkeypatch.undo()
    assert cpu_linear.fuse_quick_gelu(gelu) == 0


def test_the_swish_probe_says_no_without_a_usable_linear(monkeypatch):
    cpu_linear.onednn_swish_usable.cache_clear()
    try:
        monkeypatch.setattr(cpu_linear, "onednn_linear_usable", lambda: False)
        assert cpu_linear.onednn_swish_usable() is False
    finally:
        cpu_linear.onednn_swish_usable.cache_clear()


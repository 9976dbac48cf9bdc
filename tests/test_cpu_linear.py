"""The CPU engine's linear layers through oneDNN (denseclip_fast/engine/cpu_linear.py): the same function as
F.linear, taken only for plain CPU float32 tensors without gradients, and only in the image path of the Segmenter's
own copy of the model."""

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
from denseclip_fast.model.layers import MultiheadSelfAttention

from .conftest import NAMES, probed_under_other_defaults, probed_with_fakes, rel_err

needs_onednn = pytest.mark.skipif(not onednn_linear_usable(), reason="this PyTorch has no usable oneDNN linear")


def _ops_run(fn) -> set[str]:
    """The names of the operators ``fn()`` runs (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@needs_onednn
@pytest.mark.parametrize(
    "x_shape, out, bias",
    [((1, 1), 1, True), ((7, 13), 5, True), ((3, 65, 33), 70, False), ((2, 3, 4, 17), 9, True), ((257, 64), 192, True)],
)
def test_equals_f_linear_through_onednn(x_shape, out, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(out, x_shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    with torch.inference_mode():
        y = onednn_linear(x, w, b)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: onednn_linear(x, w, b))
    assert y.shape == F.linear(x, w, b).shape and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_non_contiguous_inputs():
    x = torch.randn(40, 24).t()  # (24, 40), strides (1, 24)
    w, b = torch.randn(8, 40), torch.randn(8)
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(5, 6, 40)[:, ::2]
    torch.testing.assert_close(onednn_linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16", "one-dimensional", "empty", "grad"],
)
def test_everything_else_takes_f_linear(case):
    """Other dtypes, a 1-D or empty input, and a call that needs gradients give exactly F.linear (with autograd)."""
    x, w, b = torch.randn(6, 10), torch.randn(4, 10), torch.randn(4)
    if case in ("float64", "bfloat16"):
        x, w, b = (t.to(getattr(torch, case)) for t in (x, w, b))
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
def test_the_vocabulary_goes_through_onednn_in_every_dtype(tiny_model):
    """The text encoder computes in float32 in any engine: its layers take oneDNN also in a bfloat16 engine, whose
    image path keeps F.linear (oneDNN's operator is not called per image)."""
    for dtype in (torch.float32, torch.bfloat16):
        seg = Segmenter(tiny_model, device="cpu", dtype=dtype)
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda seg=seg: seg.set_classes(NAMES[::-1]))
        per_image = _ops_run(lambda seg=seg: seg.logits(torch.randn(1, 3, 64, 64)))
        assert ("mkldnn::_linear_pointwise" in per_image) is (dtype == torch.float32)
        text = set(seg.model.text_encoder.modules())
        image_layers = [m for m in seg.model.modules() if m not in text and isinstance(m, (nn.Linear, OneDNNLinear))]
        assert image_layers and all(isinstance(m, OneDNNLinear) is (dtype == torch.float32) for m in image_layers)
        plain = prepare_for_inference(tiny_model, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            expected = plain.text_features(NAMES[::-1])
        torch.testing.assert_close(seg.model.text_features(NAMES[::-1]), expected, rtol=1e-5, atol=1e-6)


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
def test_quick_gelu_is_fused_only_where_the_linears_take_onednn(tiny_model, monkeypatch):
    """A float32 engine fuses every QuickGELU MLP; a bfloat16 one the text encoder's alone (its image path keeps
    F.linear); GELU MLPs and a PyTorch without the post-op are left alone."""
    count = sum(type(m) is cpu_linear.QuickGELU for m in tiny_model.modules())
    for dtype, fused in ((torch.float32, count), (torch.bfloat16, len(tiny_model.text_encoder.transformer.resblocks))):
        seg = Segmenter(tiny_model, device="cpu", dtype=dtype)
        assert sum(getattr(m, "post_op", None) == "swish" for m in seg.model.modules()) == fused, dtype
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


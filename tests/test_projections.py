"""The GPU engine's stacked attention projections (engine/projections.py): the same function as the model's separate
q/k/v layers in fewer GEMMs, on the CPU (the rewrite itself) and in a CUDA Segmenter where there is a GPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import denseclip_fast as dcf
from denseclip_fast.engine import projections
from denseclip_fast.engine.rewrite import prepare_for_inference
from denseclip_fast.model.decoder import Attention
from denseclip_fast.model.resnet import DenseAttentionPool

from .conftest import NAMES, randomized, rel_err, tiny_config


def _linear_calls(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], object]) -> int:
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fn()
    monkeypatch.setattr(F, "linear", real)
    return len(calls)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_stacked_projections_keep_the_function_in_fewer_gemms(kind, monkeypatch):
    """A prepared copy of a tiny model (float32, CPU): every decoder attention and the ResNet's attention pool
    replaced; logits within float32 rounding of the separate layers'; per decoder layer two GEMMs fewer for the
    self-attention and one for the cross-attention, two for the pool; the weights stacked from the model's (q, k, v
    rows in that order) and taking no gradient."""
    model = randomized(dcf.DenseCLIP(tiny_config(kind), NAMES)).eval()
    plain = prepare_for_inference(model, torch.device("cpu"), torch.float32)
    fused = prepare_for_inference(model, torch.device("cpu"), torch.float32)
    layers = len(plain.context_decoder.decoder)
    pools = int(kind == "resnet")
    assert projections.fuse_attention_projections(fused) == 2 * layers + pools
    assert not any(type(m) in (Attention, DenseAttentionPool) for m in fused.modules())
    assert projections.fuse_attention_projections(fused) == 0  # nothing left to replace
    first = plain.context_decoder.decoder[0].self_attn
    stacked = fused.context_decoder.decoder[0].self_attn.qkv_weight
    assert torch.equal(stacked, torch.cat([first.q_proj.weight, first.k_proj.weight, first.v_proj.weight]))
    assert not stacked.requires_grad
    x = torch.randn(2, 3, 64, 64)
    text = plain.text_features(NAMES)
    with torch.no_grad():
        want, got = plain.logits_for(x, text, None), fused.logits_for(x, text, None)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    separate = _linear_calls(monkeypatch, lambda: plain.logits_for(x, text, None))
    stacked_calls = _linear_calls(monkeypatch, lambda: fused.logits_for(x, text, None))
    assert separate - stacked_calls == 3 * layers + 2 * pools, (separate, stacked_calls)


def test_a_cross_attention_of_other_lengths():
    """q and kv of different lengths (the cross-attention's K queries against 1 + hw tokens), batch 2, odd widths of
    heads: the separate layers' output; q is kv as a self-attention's."""
    torch.manual_seed(0)
    attention = Attention(24, 3, 0.0).eval()
    fused = projections.FusedAttention(attention)
    q, kv = torch.randn(2, 5, 24), torch.randn(2, 11, 24)
    with torch.no_grad():
        torch.testing.assert_close(fused(q, kv), attention(q, kv), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused(q, q), attention(q, q), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the rewrite is a GPU engine's")
def test_a_cuda_segmenter_stacks_its_projections(monkeypatch):
    """A CUDA Segmenter (bfloat16) stacks them, and its logits are those of one built with
    DENSECLIP_FAST_FUSED_QKV=0 within bfloat16 rounding."""
    model = randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    seg = dcf.Segmenter(model, device="cuda", dtype=torch.bfloat16)
    assert any(isinstance(m, projections.FusedAttention) for m in seg.model.modules())
    monkeypatch.setenv("DENSECLIP_FAST_FUSED_QKV", "0")
    separate = dcf.Segmenter(model, device="cuda", dtype=torch.bfloat16)
    assert not any(isinstance(m, projections.FusedAttention) for m in separate.model.modules())
    x = torch.randn(2, 3, 64, 96, device="cuda")
    assert rel_err(seg.logits(x), separate.logits(x)) < 2e-2

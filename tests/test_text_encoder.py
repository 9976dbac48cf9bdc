"""The context text encoder's shared start (text.py): SOT and the contexts computed once for all prompts, each class
only up to the vocabulary's last EOT. Checked against every prompt run whole (the official computation), values and
gradients, on prompts of every length, and the cases that must run whole."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from denseclip_fast import DenseCLIP
from denseclip_fast.config import TextConfig
from denseclip_fast.model import text
from denseclip_fast.model.layers import DropPath, LayerNormFp32, MultiheadSelfAttention
from denseclip_fast.model.text import ContextTextEncoder, token_span

from .conftest import NAMES, tiny_config

SOT, EOT = 49406, 49407  # CLIP's: EOT is the vocabulary's largest id
ONE_TOKEN = ["wall", "cat", "bed", "sky"]  # names of one BPE token: span 3, so that 3-token prompts need more


def encoder(heads: int = 2, n_ctx: int = 4, length: int = 7, dtype: torch.dtype = torch.float64) -> tuple:
    """A random encoder of 2 layers (width 32) and its random contexts (1, n_ctx, 32). In float64 its LayerNorms
    compute in float64 (CLIP's compute in float32 whatever the dtype, which would leave float32's rounding in
    every comparison and fail gradcheck)."""
    cfg = TextConfig(context_length=n_ctx + length, n_ctx=n_ctx, width=32, heads=heads, layers=2)
    enc = ContextTextEncoder(cfg, embed_dim=24).to(dtype)
    if dtype == torch.float64:
        for module in list(enc.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LayerNormFp32):
                    plain = nn.LayerNorm(32, dtype=dtype)
                    plain.load_state_dict(child.state_dict())
                    setattr(module, name, plain)
        assert not any(isinstance(m, LayerNormFp32) for m in enc.modules())
    return enc, torch.randn(1, n_ctx, 32, dtype=dtype)


def prompts(name_lengths: list[int], length: int) -> torch.Tensor:
    """(K, length) tokens: SOT, random name ids, EOT, zero padding, as tokenize_class_names lays them out."""
    tokens = torch.zeros(len(name_lengths), length, dtype=torch.long)
    for i, n in enumerate(name_lengths):
        tokens[i, : n + 2] = torch.tensor([SOT, *torch.randint(1, SOT, (n,)).tolist(), EOT])
    return tokens


def whole(enc: ContextTextEncoder, tokens: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    return enc._whole_prompts(tokens, contexts)


def shared_calls(enc: ContextTextEncoder, fn) -> list:
    """Run ``fn()`` and return the ``shared`` argument of every attention call of ``enc``'s blocks (None: the
    whole prompts), seen by forward pre-hooks (which the shared start goes through, as checkpoint wrappers do)."""
    seen: list = []
    hooks = [block.attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("shared")), with_kwargs=True)
             for block in enc.transformer.resblocks]  # fmt: skip
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize(
    "name_lengths, heads, n_ctx",
    [
        ([1], 1, 4),  # K = 1
        ([5], 2, 4),  # one prompt filling the context length: EOT at the last position
        ([1, 1, 1], 4, 1),  # every EOT at position 2: the span is 3 of 7
        ([3, 1, 5, 2, 2, 4, 1], 2, 4),
        ([2] * 9 + [0], 2, 8),  # an empty name: EOT right after SOT (span 2 for it)
    ],
)
def test_shared_start_equals_every_prompt_run_whole(name_lengths, heads, n_ctx):
    torch.manual_seed(sum(name_lengths) + heads)
    enc, contexts = encoder(heads, n_ctx)
    tokens = prompts(name_lengths, length=7)
    assert token_span(tokens) == max(name_lengths) + 2
    expected = whole(enc, tokens, contexts)
    got = enc(tokens, contexts)
    assert got.shape == (len(name_lengths), 24)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # what was computed is the shared path's (the whole path would agree with itself): P = 1 + n_ctx, K prompts
    assert shared_calls(enc, lambda: enc(tokens, contexts)) == [(1 + n_ctx, len(name_lengths))] * 2  # per layer


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_self_attention_is_nn_multihead_attention(causal):
    """The packed in-projection split as nn.MultiheadAttention splits it (q, k, v blocks of rows, then heads within
    each), with several heads: the tiny models' text encoders and ViTs have one head, where a q/k/v split interleaved
    with the heads reads the same rows."""
    torch.manual_seed(0)
    width, heads, length = 24, 4, 6
    ours = MultiheadSelfAttention(width, heads).double()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    torch_mha = nn.MultiheadAttention(width, heads, batch_first=True).double()
    torch_mha.load_state_dict(ours.state_dict())
    x = torch.randn(2, length, width, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64) if causal else None
    expected = torch_mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(ours(x, causal=causal), expected, rtol=1e-12, atol=1e-12)


def test_gradients_equal_those_of_the_whole_prompts():
    torch.manual_seed(1)
    enc, contexts = encoder(heads=2, n_ctx=4)
    contexts.requires_grad_(True)
    tokens = prompts([1, 4, 2, 3, 1], length=7)
    weights = (torch.randn(5, 24, dtype=torch.float64),)

    def grads(fn):
        enc.zero_grad(set_to_none=True)
        contexts.grad = None
        (fn(enc, tokens, contexts) * weights[0]).sum().backward()
        named = {name: p.grad.clone() for name, p in enc.named_parameters() if p.grad is not None}
        return contexts.grad.clone(), named

    shared_ctx, shared = grads(lambda e, t, c: e(t, c))
    whole_ctx, whole_grads = grads(whole)
    torch.testing.assert_close(shared_ctx, whole_ctx, rtol=1e-10, atol=1e-12)
    assert shared.keys() == whole_grads.keys()
    assert {"positional_embedding", "token_embedding.weight", "text_projection"} <= shared.keys()
    for name in shared:
        torch.testing.assert_close(shared[name], whole_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    # the position after the last EOT (token 6, the prompt's 10) receives no gradient, the last EOT's does
    assert shared["positional_embedding"][10].abs().max() == 0 < shared["positional_embedding"][9].abs().max()


def test_gradcheck_through_the_shared_start():
    torch.manual_seed(2)
    enc, contexts = encoder(heads=2, n_ctx=2, length=5)
    enc.requires_grad_(False)
    tokens = prompts([2, 1, 3], length=5)
    contexts.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: enc(tokens, c), (contexts,))


def test_float32_and_bfloat16_autocast_stay_close_to_the_whole_prompts():
    torch.manual_seed(3)
    enc, contexts = encoder(heads=4, n_ctx=8, length=5, dtype=torch.float32)
    tokens = prompts([1, 3, 2, 3, 1, 2], length=5)
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens, contexts), whole(enc, tokens, contexts), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = enc(tokens, contexts), whole(enc, tokens, contexts)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_token_span():
    tokens = prompts([2, 1, 3], length=7)
    assert token_span(tokens) == 5  # the last EOT at position 4
    assert token_span(prompts([5], length=7)) == 7
    different_start = tokens.clone()
    different_start[1, 0] = 5
    assert token_span(different_start) is None
    eot_first = tokens.clone()
    eot_first[2] = 0  # an all-zero row: its argmax (the encoder's EOT) is position 0, inside the shared start
    assert token_span(eot_first) is None
    assert token_span(tokens.to("meta")) is None
    assert token_span(tokens[0]) is None  # not (K, L)
    assert token_span(tokens[:0]) is None


def test_prompts_that_do_not_share_their_start_run_whole():
    torch.manual_seed(4)
    enc, contexts = encoder()
    tokens = prompts([1, 2, 3], length=7)
    tokens[1, 0] = 7
    expected = whole(enc, tokens, contexts)
    assert shared_calls(enc, lambda: torch.testing.assert_close(enc(tokens, contexts), expected, rtol=0, atol=0)) == [
        None, None]  # fmt: skip


def test_a_block_with_drop_path_runs_the_prompts_whole():
    torch.manual_seed(5)
    enc, contexts = encoder()
    tokens = prompts([1, 2], length=7)
    enc.transformer.resblocks[1].drop_path = DropPath(0.0)  # not an Identity: per-prompt rows, not the shared ones
    expected = whole(enc, tokens, contexts)
    assert shared_calls(enc, lambda: torch.testing.assert_close(enc(tokens, contexts), expected, rtol=0, atol=0)) == [
        None, None]  # fmt: skip
    with pytest.raises(ValueError, match="drop path cannot take shared-start rows"):
        enc.transformer(torch.zeros(9, 32, dtype=torch.float64), causal=True, shared=(5, 2))


def test_per_class_contexts_run_whole_as_before():
    """Contexts of one batch per class ((K, n_ctx, W), CoOp's class-specific variant) are expanded per prompt as
    before; another batch size is still refused."""
    torch.manual_seed(8)
    enc, _ = encoder(n_ctx=4)
    tokens = prompts([1, 2, 3], length=7)
    contexts = torch.randn(3, 4, 32, dtype=torch.float64)
    expected = whole(enc, tokens, contexts)
    assert shared_calls(enc, lambda: torch.testing.assert_close(enc(tokens, contexts), expected, rtol=0, atol=0)) == [
        None, None]  # fmt: skip
    with pytest.raises(RuntimeError):
        enc(tokens, contexts[:2])


def test_span_argument_is_checked():
    enc, contexts = encoder(length=7)
    tokens = prompts([1, 2], length=7)
    for span in (1, 8):
        with pytest.raises(ValueError, match=rf"span must be 2 to 7 \(the tokens' length\), got {span}"):
            enc(tokens, contexts, span)
    for span in (3.0, "3", True):
        with pytest.raises(ValueError, match=rf"span must be an int, 2 to 7 \(the tokens' length\), got "
                                             rf"{type(span).__name__} {re.escape(repr(span))}"):  # fmt: skip
            enc(tokens, contexts, span)


def test_devices_outside_shared_start_devices_run_the_prompts_whole(monkeypatch):
    """On a device not in SHARED_START_DEVICES (a GPU: the shared start was the slower path on an H200) the prompts
    run whole, without reading the tokens (no GPU synchronisation), and a given span is still checked. Here the CPU
    is taken out of the list."""
    enc, contexts = encoder(length=7)
    tokens = prompts([1, 2], length=7)
    shared = enc(tokens, contexts, token_span(tokens))
    monkeypatch.setattr(text, "SHARED_START_DEVICES", ())
    monkeypatch.setattr(enc, "_shared_start", lambda *a: pytest.fail("the shared start ran"))
    monkeypatch.setattr(text, "token_span", lambda t: pytest.fail("the tokens were read"))
    whole = enc(tokens, contexts, 3)
    torch.testing.assert_close(whole, enc._whole_prompts(tokens, contexts), rtol=0, atol=0)
    torch.testing.assert_close(whole, shared, rtol=1e-5, atol=1e-6)  # the same embeddings either way
    torch.testing.assert_close(enc(tokens, contexts), whole, rtol=0, atol=0)  # no span: not read either
    with pytest.raises(ValueError, match=r"span must be 2 to 7 \(the tokens' length\), got 9"):
        enc(tokens, contexts, 9)


def test_the_shared_layout_is_checked():
    """Rows that P and K do not lay out (P + K * S, S >= 1), or a shared start without causal attention (the start
    would read the sequences' positions), are ValueErrors naming shared, not a reshape's RuntimeError or a silently
    causal result."""
    enc, _ = encoder()
    x = torch.zeros(10, 32, dtype=torch.float64)
    for shared in ((5, 3), (-1, 1), (4, 0), (9, 2)):
        with pytest.raises(ValueError, match=re.escape(f"shared=(P, K) = {shared} needs (P + K * S, D) rows")):
            enc.transformer(x, causal=True, shared=shared)
    with pytest.raises(ValueError, match=re.escape("needs (P + K * S, D) rows")):
        enc.transformer(x.view(1, 10, 32), causal=True, shared=(5, 1))
    with pytest.raises(ValueError, match="shared .* needs causal=True"):
        enc.transformer(x, causal=False, shared=(5, 1))
    assert enc.transformer(x, causal=True, shared=(5, 1)).shape == (10, 32)


def test_a_traced_call_runs_whole_unless_given_the_span():
    """A dispatch mode (as torch.compile, torch.export and the ONNX exporter trace) cannot read the tokens: the
    prompts run whole, unless the caller passes the span, which DenseCLIP does (read when its names were set). The
    FLOP count shows the work saved."""
    torch.manual_seed(6)
    enc, contexts = encoder(heads=2, n_ctx=8, length=5, dtype=torch.float32)
    tokens = prompts([1, 2, 1, 3, 1, 2, 1, 1], length=5)
    flops = {}
    for name, span in (("traced", None), ("given", token_span(tokens))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            enc(tokens, contexts, span)
        flops[name] = counter.get_total_flops()
    # every prompt whole: 8 prompts of 13 positions; shared: 9 positions once and 4 per prompt (linear layers)
    assert flops["given"] < 0.45 * flops["traced"]


def test_denseclip_passes_the_span_read_when_its_names_were_set(monkeypatch):
    """Training runs the text encoder on every step: its span comes from set_classes, never from a read of the
    tokens (on a GPU, a synchronisation per step)."""
    torch.manual_seed(7)
    model = DenseCLIP(tiny_config("resnet"), NAMES)
    assert model._class_span is not None and model._class_span[2] == token_span(model.class_tokens)
    model.set_classes(list(reversed(NAMES)))
    assert model._class_span[0] is model.class_tokens and model._class_span[2] == token_span(model.class_tokens)
    expected = model.text_encoder._whole_prompts(model.class_tokens, model.contexts)

    def refuse(tokens):
        raise AssertionError("read the tokens")

    monkeypatch.setattr(text, "token_span", refuse)
    model.train()
    got = model.class_embeddings()
    assert got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert model.text_features(["sky", "a road"]).shape == (2, model.config.embed_dim)  # tokenised: span passed


def test_class_tokens_changed_without_set_classes_are_read_again():
    """The span kept with the class tokens is the tensor's: class tokens assigned, edited in place, substituted by
    torch.func.functional_call are read again (once), never encoded with a stale span; a model
    pickled before the span was kept computes it."""
    torch.manual_seed(9)
    model = DenseCLIP(tiny_config("resnet"), ONE_TOKEN).eval()
    enc, length = model.text_encoder, model.config.text.class_token_length
    assert model._class_tokens_span() == 3

    def check(expected_tokens: torch.Tensor) -> None:
        expected = enc._whole_prompts(expected_tokens, model.contexts)
        with torch.no_grad():
            got = model._encode_classes()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    longer = prompts([3] * len(ONE_TOKEN), length)  # every EOT later than the names' (span 5, was 3)
    model.class_tokens = longer.clone()
    check(longer)
    with torch.no_grad():
        model.class_tokens.copy_(prompts([1] * len(ONE_TOKEN), length))  # in place: the version counter moves
    check(model.class_tokens.clone())
    other_start = longer.clone()
    other_start[1, 0] = 5  # prompts that no longer share their start: whole
    model.class_tokens.copy_(other_start)
    check(other_start)
    model.set_classes(ONE_TOKEN)
    substituted = prompts([3] * len(ONE_TOKEN), length)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = torch.func.functional_call(model, {"class_tokens": substituted}, (x,))
        model.class_tokens = substituted
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    model.set_classes(ONE_TOKEN)
    del model._class_span  # as a model pickled before the span was kept
    check(model.class_tokens.clone())


def test_gradient_checkpointing_reaches_the_text_blocks_on_the_shared_start():
    """The trainer's gradient checkpointing wraps each text block's forward: the shared start calls the blocks
    through it (before, it bypassed them and kept every block's activations)."""
    from denseclip_fast.train import step

    torch.manual_seed(10)
    model = DenseCLIP(tiny_config("resnet"), NAMES).train()
    expected = model.class_embeddings()
    step.enable_gradient_checkpointing(model)
    calls: list = []
    original = step._checkpointed

    def counted(forward, module, *args, **kwargs):
        if module in list(model.text_encoder.transformer.resblocks):
            calls.append(kwargs.get("shared"))
        return original(forward, module, *args, **kwargs)

    for block in model.text_encoder.transformer.resblocks:
        block.forward = functools.partial(counted, block.forward.args[0], block)
    got = model.class_embeddings()
    got.sum().backward()
    assert calls == [(1 + model.config.text.n_ctx, len(NAMES))] * model.config.text.layers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert model.contexts.grad is not None and model.contexts.grad.abs().sum() > 0


def test_the_span_follows_the_class_tokens_through_to_and_inference_mode(monkeypatch):
    """model.to (nn.Module._apply) copies the class tokens: their span goes with the copy, unread (a model moved to a
    GPU and compiled at once shares its prompts' start); class tokens made under torch.inference_mode (no version
    counter) and edited there in place are read again."""
    from denseclip_fast.model import denseclip

    torch.manual_seed(11)
    model = DenseCLIP(tiny_config("resnet"), NAMES).eval()
    span = model._class_tokens_span()

    def refuse(tokens):
        raise AssertionError("read the tokens")

    with monkeypatch.context() as patch:
        patch.setattr(denseclip, "token_span", refuse)
        model._apply(lambda t: t.clone())  # as model.to("cuda") does to every tensor
        assert model._class_span is not None and model._class_span[0] is model.class_tokens
        assert model._class_tokens_span() == span
    with torch.inference_mode():
        made = DenseCLIP(tiny_config("resnet"), ONE_TOKEN).eval()
        assert made._class_tokens_span() == 3
        longer = prompts([3] * len(ONE_TOKEN), model.config.text.class_token_length)
        made.class_tokens.copy_(longer)  # an inference tensor: no version counter to see this by
        expected = made.text_encoder._whole_prompts(longer, made.contexts)
        torch.testing.assert_close(made._encode_classes(), expected, rtol=1e-5, atol=1e-6)


def replica(module: torch.nn.Module) -> torch.nn.Module:
    """What nn.DataParallel makes of ``module`` for a second device at every forward (torch/nn/parallel/replicate.py):
    shallow copies of every submodule, whose buffers are new copies (the broadcast), parameters set as attributes."""
    replicas = {}
    for mod in module.modules():
        r = mod._replicate_for_data_parallel()
        for key, buf in mod._buffers.items():
            if buf is not None:
                r._buffers[key] = buf.detach().clone()
        replicas[mod] = r
    for mod, r in replicas.items():
        for name, child in mod._modules.items():
            if child is not None:
                r._modules[name] = replicas[child]
        for name, param in mod._parameters.items():
            if param is not None:
                object.__setattr__(r, name, param)
    return replicas[module]


def test_a_dataparallel_replica_takes_its_modules_span(monkeypatch):
    """A replica's class tokens are a copy of its module's, made at every forward: it takes the module's span
    unread (a read per step and device would synchronise each GPU), and reads its tokens when the module's were
    edited in place since the span was kept."""
    from denseclip_fast.model import denseclip

    torch.manual_seed(12)
    model = DenseCLIP(tiny_config("resnet"), ONE_TOKEN).train()
    reads: list = []
    monkeypatch.setattr(denseclip, "token_span", lambda t: reads.append(1) or token_span(t))
    for _ in range(3):
        assert replica(model)._class_tokens_span() == 3
    assert reads == []
    longer = prompts([3] * len(ONE_TOKEN), model.config.text.class_token_length)
    with torch.no_grad():
        model.class_tokens.copy_(longer)
    copy = replica(model)
    expected = copy.text_encoder._whole_prompts(longer, copy.contexts)
    torch.testing.assert_close(copy.class_embeddings(), expected, rtol=1e-5, atol=1e-6)
    assert copy._class_tokens_span() == 5 and len(reads) == 1

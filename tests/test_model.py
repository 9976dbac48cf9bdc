"""The DenseCLIP module: shapes for every architecture, the vocabulary API, the text cache, input errors."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
import torch

import denseclip_fast as dcf
from denseclip_fast import DenseCLIP

from .conftest import NAMES, randomized, rel_err, tiny_config


@pytest.fixture(scope="module")
def tiny() -> DenseCLIP:
    torch.manual_seed(0)
    model = DenseCLIP(tiny_config("resnet"), NAMES).eval()
    with torch.no_grad():
        model.gamma.fill_(0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch, dim, local_stride", [("RN50", 1024, 32), ("RN101", 512, 32), ("ViT-B/16", 512, 16)])
def test_forward_shapes_released_archs(arch, dim, local_stride):
    model = DenseCLIP.from_arch(arch, ["sky", "road", "tree"]).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model.forward_features(x)
        logits = model(x)
        slide = model.slide_inference(x, crop=64, stride=40)
    h, w = 64 // local_stride, 96 // local_stride
    assert out["global_feat"].shape == (2, dim)
    assert out["local_feat"].shape == (2, dim, h, w)
    assert out["text_embeddings"].shape == (2, 3, dim)
    assert out["score_map"].shape == (2, 3, h, w)
    assert logits.shape == slide.shape == out["logits"].shape == (2, 3, 64, 96)
    assert torch.equal(out["logits"], logits)
    assert torch.isfinite(logits).all()


def test_forward_features_consistency(tiny):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = tiny.forward_features(x)
    assert torch.allclose(out["aux_logits"], out["score_map"] / 0.07)
    assert out["score_map"].abs().max() <= 1 + 1e-5  # cosine similarities
    # the score map is the cosine between the local map and the decoded text embeddings
    z = torch.nn.functional.normalize(out["local_feat"], dim=1)
    t = torch.nn.functional.normalize(out["text_embeddings"], dim=-1)
    assert torch.allclose(out["score_map"], torch.einsum("bchw,bkc->bkhw", z, t), atol=1e-6)


def test_set_classes_equals_rebuilding(tiny):
    new_names = ["sky", "road", "person", "grass"]
    rebuilt = DenseCLIP(tiny.config, new_names).eval()
    rebuilt.load_state_dict(tiny.state_dict())
    x = torch.randn(1, 3, 64, 64)
    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        before = model(x)
        model.set_classes(new_names)
        after = model(x)
        expected = rebuilt(x)
    assert model.class_names == new_names
    assert torch.equal(after, expected)
    assert rel_err(before, after) > 1e-3


def test_set_classes_wrong_count_points_to_open_vocab(tiny):
    with pytest.raises(ValueError, match=r"exactly 4 names.*got 2 names.*open_vocab_scores"):
        tiny.set_classes(["sky", "road"])
    with pytest.raises(ValueError, match="class names must be a sequence of strings, got str"):
        tiny.set_classes("sky")


def test_long_name_is_rejected_with_its_token_count(tiny):
    with pytest.raises(ValueError, match=r"'a very long class name' has 5 BPE tokens; at most 3 fit"):
        tiny.set_classes(["sky", "road", "person", "a very long class name"])
    assert tiny.class_names == NAMES  # unchanged


def test_open_vocab_and_text_features(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores = tiny.open_vocab_scores(x, ["dog", "sky", "road", "grass", "person", "tree", "car"])
        same = tiny.open_vocab_scores(x, tiny.class_names)
        feats = tiny.forward_features(x)
        text = tiny.text_features(tiny.class_names)
    assert scores.shape == (2, 7, 2, 2)
    assert torch.allclose(same, feats["score_map"], atol=1e-6)
    assert torch.allclose(text, tiny.class_embeddings(), atol=1e-6)
    assert tiny.text_features(["dog"]).shape == (1, 48)
    for wrong in ("no", None, 0):  # "no" was true (and refused the names as alike), None and 0 false
        with pytest.raises(ValueError, match=f"^distinct must be True or False, got {wrong!r}$"):
            tiny.text_features(["dog", "Dog"], distinct=wrong)
    with pytest.raises(ValueError, match="has the same BPE tokens as class name 0"):  # np.True_: True
        tiny.text_features(["dog", "Dog"], distinct=np.True_)


def test_a_slide_window_smaller_than_the_network_takes_names_the_crop(tiny):
    """A crop under 32 pixels a side: each window was refused as "x must be at least 32x32", naming the image."""
    for crop in (20, (64, 20)):
        message = rf"^crop must be at least 32 pixels a side .*got {re.escape(repr(crop))}$"
        with pytest.raises(ValueError, match=message):
            tiny.slide_inference(torch.randn(1, 3, 64, 64), crop=crop, stride=10)


@torch.no_grad()
def test_class_embeddings_cached_and_invalidated(tiny):
    model = DenseCLIP(tiny.config, NAMES).eval()
    first = model._class_embeddings()
    assert model._class_embeddings() is first  # cached
    given = model.class_embeddings()
    assert given is not first and torch.equal(given, first)  # the caller's own copy
    given.mul_(0.0)  # so an in-place edit of it (a normalisation) reaches no later forward
    assert model._class_embeddings() is first and not torch.equal(first, given)
    model.contexts.add_(1.0)  # in-place change: the cache must notice
    second = model._class_embeddings()
    assert second is not first and not torch.allclose(first, second)
    model.load_state_dict(tiny.state_dict())
    assert torch.allclose(model.class_embeddings(), tiny.class_embeddings())


@torch.no_grad()
def test_a_new_tensor_at_a_freed_tensors_address_is_not_taken_for_it(tiny):
    """The cache's key read each tensor's address and version: a tensor swapped in (torch.func.functional_call) and
    freed after the call left its address to the allocator, and the next fresh tensor there (version 0, as the
    freed one's) was served the freed one's embeddings: functional_call over candidate contexts gave the previous
    candidate's logits. (from_numpy over one array: an address reuse made certain.) The cache is not pickled."""
    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    x = torch.randn(1, 3, 64, 64)
    memory = model.contexts.numpy().copy()
    first = torch.from_numpy(memory)
    torch.func.functional_call(model, {"contexts": first}, (x,))
    del first
    memory *= 2  # the freed tensor's memory, now another tensor's
    second = torch.from_numpy(memory)
    expected = DenseCLIP(tiny.config, NAMES).eval()
    expected.load_state_dict({**tiny.state_dict(), "contexts": second})
    torch.testing.assert_close(torch.func.functional_call(model, {"contexts": second}, (x,)), expected(x))
    copied = pickle.loads(pickle.dumps(model))
    assert copied._text_cache is None
    torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)


@torch.no_grad()
def test_a_text_encoder_pruned_further_is_not_served_stale_embeddings(tiny):
    """Pruning a text encoder layer further (torch.nn.utils.prune) replaces its mask, a buffer, and keeps its
    weight_orig, the parameter: the cache, keyed on the parameters, served the embeddings of the earlier mask."""
    from torch.nn.utils import prune

    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    layer = model.text_encoder.transformer.resblocks[0].mlp.c_fc
    prune.l1_unstructured(layer, "weight", amount=0.2)
    before = model.class_embeddings()
    prune.l1_unstructured(layer, "weight", amount=0.5)
    after = model.class_embeddings()
    assert not torch.allclose(after, before) and torch.equal(after, _text_path(model))


def test_an_eval_model_passes_gradients_to_the_contexts(tiny):
    """Fine-tuning in eval mode (BatchNorm statistics frozen): the official model's contexts get their gradient.
    Embeddings cached detached (by an inference call before, here) left contexts.grad None, with no word; the
    cache serves only calls that record no gradient, and one of frozen contexts and text encoder."""
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for warm in (False, True):
        model = DenseCLIP(tiny.config, NAMES).eval()
        model.load_state_dict(tiny.state_dict())
        if warm:
            with torch.no_grad():
                model(x)  # fills the cache
        model(x).square().mean().backward()
        assert model.contexts.grad is not None and model.contexts.grad.abs().sum() > 0
        grads.append(model.contexts.grad)
        with torch.no_grad():
            assert not model._class_embeddings().requires_grad
        model.requires_grad_(False)  # frozen: nothing to record, the cache serves the call
        assert model._class_embeddings() is model._class_embeddings()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _text_path(model: DenseCLIP) -> torch.Tensor:
    with torch.no_grad():
        return model.text_encoder(model.class_tokens, model.contexts)


def test_a_fused_optimizers_steps_are_not_missed_by_the_cache(tiny):
    """A fused optimizer's step (AdamW(fused=True), the trainer's on CUDA) changes the weights without bumping
    their version counters: an evaluation between training steps scored every later evaluation with the
    embeddings cached at the first. A switch of mode drops the cache."""
    model = DenseCLIP(tiny.config, NAMES)
    model.load_state_dict(tiny.state_dict())
    optimizer = torch.optim.AdamW([model.contexts], lr=0.1, fused=True)
    model.eval()
    before = model.class_embeddings()
    model.train()
    model(torch.randn(1, 3, 64, 64)).square().mean().backward()
    versions = model.contexts._version
    optimizer.step()
    assert model.contexts._version == versions  # what the cache cannot see (else this test tests nothing)
    model.eval()
    after = model.class_embeddings()
    assert not torch.allclose(after, before) and torch.equal(after, _text_path(model))


def test_embeddings_are_cached_per_autocast_state(tiny):
    """Embeddings cached in a bfloat16 autocast region are not those of a float32 forward after it (which then
    depended on what ran before)."""
    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
            assert model._class_embeddings().dtype == torch.bfloat16
        assert model._class_embeddings().dtype == torch.float32
        assert torch.equal(model.forward_features(x)["text_embeddings"], tiny.forward_features(x)["text_embeddings"])
        meta = model.to("meta")  # a device without autocast: its state is not asked for (that raised)
        assert meta(torch.randn(1, 3, 64, 64, device="meta")).shape == (1, 4, 64, 64)


def test_an_eval_model_compiles_without_graph_breaks(tiny):
    """torch.compile(fullgraph=True) of an eval model: the cache's key reads data pointers, which a compiled graph
    cannot compare; inside one the embeddings are computed, not cached."""
    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)  # the cache filled eagerly first: the compiled call must not read it
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(compiled(x), expected)


def test_a_model_made_under_inference_mode_runs_there(tiny):
    """Weights made under torch.inference_mode are inference tensors, which keep no version counter: the cache's
    key raised 'Inference tensors do not track version counter' on the first forward."""
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = DenseCLIP(tiny.config, NAMES).eval()
        model.load_state_dict(tiny.state_dict())
        torch.testing.assert_close(model(x), tiny(x))
        model.contexts.add_(1.0)  # in place, no version to see it by: the embeddings are not cached
        torch.testing.assert_close(model.class_embeddings(), model.text_features(NAMES))


def test_embeddings_cached_in_inference_mode_serve_a_later_backward(tiny):
    """Embeddings cached under torch.inference_mode are inference tensors; reused outside it, a forward that
    autograd records (a gradient to the input: saliency, attacks) failed with 'Inference tensors cannot be saved
    for backward'. They are recomputed there, and reused while inference mode lasts."""
    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        cached = model._class_embeddings()
        assert model._class_embeddings() is cached
    leaf = x.clone().requires_grad_()
    model(leaf).square().mean().backward()
    fresh = DenseCLIP(tiny.config, NAMES).eval()
    fresh.load_state_dict(tiny.state_dict())
    expected = x.clone().requires_grad_()
    fresh(expected).square().mean().backward()
    torch.testing.assert_close(leaf.grad, expected.grad)
    with torch.no_grad():
        normal = model._class_embeddings()
    assert not normal.is_inference()
    with torch.inference_mode():
        assert model._class_embeddings() is normal  # a normal tensor serves inference mode as it is


def test_training_mode_reaches_the_contexts(tiny):
    model = DenseCLIP(tiny.config, NAMES)
    model.load_state_dict(tiny.state_dict())
    model.train()
    loss = model(torch.randn(2, 3, 64, 64)).square().mean()
    loss.backward()
    assert model.contexts.grad is not None and model.contexts.grad.abs().sum() > 0
    assert model.gamma.grad is not None


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(1, 4, 64, 64), r"shape \(B, 3, H, W\), got \(1, 4, 64, 64\)"),
        (torch.randn(3, 64, 64), r"shape \(B, 3, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point tensor, got dtype torch.uint8"),
        (torch.randn(0, 3, 64, 64), "empty batch"),
        (torch.randn(1, 3, 16, 64), r"at least 32x32 pixels, got \(16, 64\)"),
        (torch.randn(1, 3, 64, 64, device="meta"), "x is on meta but the model is on cpu"),
        ([[1.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_images_get_clear_errors(tiny, x, match):
    with pytest.raises(ValueError, match=match):
        tiny(x)


def test_from_arch_defaults_to_ade20k():
    model = DenseCLIP.from_arch("RN50")
    assert model.class_names == list(dcf.ADE20K_CLASSES)
    assert model.decode_head.conv_seg.out_channels == 150
    assert model.neck.lateral_convs[3].conv.in_channels == 2048 + 150
    with pytest.raises(ValueError, match="arch must be one of"):
        DenseCLIP.from_arch("RN18")
    with pytest.raises(TypeError, match=r"config must be a DenseCLIPConfig, got str: 'RN50'; for a released "
                                        r"architecture by name use DenseCLIP\.from_arch\('RN50', class_names=\.\.\.\)"):
        DenseCLIP("RN50", ["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got NoneType: None; .* DenseCLIP\.from_arch\('RN50', class_names="):
        DenseCLIP(None, ["a"])  # type: ignore[arg-type]


def test_vit_drop_path_is_per_token_as_the_official_code():
    """The official ViT blocks run on (L, B, D) tokens and timm's drop_path draws along the first dimension: a
    dropped branch is dropped for one token position in every image of the batch, and kept tokens are scaled by
    1 / (1 - p). The identity in eval mode."""
    import dataclasses

    config = tiny_config("vit")
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, drop_path_rate=0.5))
    block = DenseCLIP(config, NAMES).backbone.transformer.resblocks[-1]
    drop = block.drop_path
    assert (drop.p, drop.dim) == (0.5, 1)
    x = torch.ones(3, 200, 8)
    drop.train()
    out = drop(x)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # the same tokens in every image
    assert torch.equal(out[0], out[0, :, :1].expand(200, 8))  # whole token vectors
    assert set(out.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled
    drop.eval()
    assert torch.equal(drop(x), x)


def test_conv_seg_keeps_pytorchs_default_initialisation(tiny):
    """As in the official training, which never calls mmseg's init_weights (N(0, 0.01) there): kaiming-uniform
    weights and uniform biases within 1 / sqrt(fan_in)."""
    conv = tiny.decode_head.conv_seg
    bound = conv.in_channels**-0.5
    assert conv.weight.abs().max() <= bound and conv.weight.std() > 0.4 * bound  # uniform: std = bound / sqrt(3)
    assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0


@pytest.mark.parametrize("size", [(8, 12), (7, 10)])
def test_semantic_fpn_head_resizes_only_what_needs_it(size):
    """mmseg resizes every scale head's output to the stride-4 size; the head skips the resize where the sizes
    already agree (the identity) and gives bit for bit the sums of resizing all of them for finite maps, also where
    they differ (stride-4 sides not divisible by 8)."""
    import torch.nn.functional as F

    from denseclip_fast.model.heads import SemanticFPNHead

    torch.manual_seed(0)
    head = SemanticFPNHead(6, 5, 3).eval()
    h, w = size
    levels = [torch.randn(2, 6, -(-h // 2**i), -(-w // 2**i)) for i in range(4)]

    def resize_all(levels: list[torch.Tensor]) -> torch.Tensor:
        out = head.scale_heads[0](levels[0])
        for scale_head, x in zip(head.scale_heads[1:], levels[1:]):
            out = out + F.interpolate(scale_head(x), size=out.shape[2:], mode="bilinear", align_corners=False)
        return head.conv_seg(head.dropout(out))

    with torch.no_grad():
        assert torch.equal(head(levels), resize_all(levels))
        assert head(levels).shape == (2, 3, h, w)


@pytest.mark.parametrize("inplanes, stride", [(16, 1), (8, 1), (8, 2)])  # shortcut: the input, or downsampled
def test_bottleneck_adds_its_shortcut_in_place_with_the_same_results(inplanes, stride):
    """The residual sum is made in place (no block-sized tensor more per block); outputs and every gradient are
    bit for bit those of the out-of-place sum, in training mode (BatchNorm on batch statistics)."""
    import copy

    from denseclip_fast.model.resnet import Bottleneck

    torch.manual_seed(0)
    block = Bottleneck(inplanes, 4, stride).train()
    twin = copy.deepcopy(block)
    x = torch.randn(2, inplanes, 6, 10, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)

    def out_of_place(m: Bottleneck, t: torch.Tensor) -> torch.Tensor:
        out = m.relu(m.bn1(m.conv1(t)))
        out = m.relu(m.bn2(m.conv2(out)))
        out = m.bn3(m.conv3(m.avgpool(out)))
        return torch.relu(out + (t if m.downsample is None else m.downsample(t)))

    y, y_twin = block(x), out_of_place(twin, x_twin)
    assert torch.equal(y, y_twin)
    g = torch.randn_like(y)
    y.backward(g)
    y_twin.backward(g)
    assert torch.equal(x.grad, x_twin.grad)
    for (name, p), p_twin in zip(block.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, p_twin.grad), name


def test_score_concat_level_of_another_dtype():
    """Under CUDA autocast ViT's score level (fpn3, a GroupNorm, which CUDA autocast runs in float32) is float32
    while the local embedding map is bfloat16: the model casts the level to the map's dtype for the fused operator
    (the CPU's autocast keeps GroupNorm in bfloat16, so the level is made float32 by hand here)."""
    model = DenseCLIP(tiny_config("vit"), NAMES).to(torch.bfloat16).eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    feats = model.extract(x)
    levels = list(feats.levels)
    i = model.config.score_concat_index
    levels[i] = levels[i].float()
    text = model.context_prompt(feats, model.class_embeddings())
    logits, _ = model.logits_and_score(dataclasses.replace(feats, levels=levels), text, None)
    expected, _ = model.logits_and_score(feats, text, None)
    assert logits.dtype == torch.bfloat16 and torch.allclose(logits, expected)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_the_decoder_reads_the_encoders_tokens(kind):
    """Both encoders make g and z views of one (B, 1 + h*w, D) token tensor, which the context decoder reads as
    its memory instead of the official concatenation [g; z] (a copy): the same values, row by row of a map that is
    not square, and the same prompted text as from the concatenation."""
    model = randomized(DenseCLIP(tiny_config(kind), NAMES)).eval()
    with torch.no_grad():
        feats = model.extract(torch.randn(2, 3, 64, 96))
    tokens = feats.tokens
    assert tokens is not None and feats.visual_context() is tokens
    b, d, h, w = feats.local_feat.shape
    assert (h, w) != (w, h) and tokens.shape == (b, 1 + h * w, d)
    assert feats.global_feat.data_ptr() == tokens.data_ptr() == feats.local_feat.data_ptr() - d * tokens.itemsize
    concatenated = torch.cat([feats.global_feat.unsqueeze(1), feats.local_feat.flatten(2).transpose(1, 2)], dim=1)
    assert torch.equal(tokens, concatenated)
    assert torch.equal(feats.local_feat, tokens[:, 1:].transpose(1, 2).reshape(b, d, h, w))
    # features made anew (dataclasses.replace: another g or z, here the same ones) do not keep the tokens
    without = dataclasses.replace(feats, local_feat=feats.local_feat)
    made = without.visual_context()
    assert without.tokens is None and made.data_ptr() != tokens.data_ptr() and torch.equal(made, tokens)
    with torch.no_grad():
        text = model.class_embeddings()
        assert torch.equal(model.context_prompt(feats, text), model.context_prompt(without, text))
    with pytest.raises(dataclasses.FrozenInstanceError):
        feats.local_feat = feats.local_feat.clone()  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"tokens must be \(B, 1 \+ h\*w, D\) = \(B, 7, D\) for a map of size "
                                         r"\(2, 3\), got shape \(2, 8, 5\)"):  # fmt: skip
        dcf.model.ImageFeatures.from_tokens([], torch.zeros(2, 8, 5), (2, 3))
    # not an argument: only from_tokens sets it (Python's own refusal: a ValueError before 3.13, a TypeError since)
    with pytest.raises((ValueError, TypeError), match="tokens is declared with init=False"):
        dataclasses.replace(feats, tokens=tokens)


def test_gradients_reach_the_local_map_through_the_decoder():
    """Where a gradient flows, the decoder reads the concatenation of g and z, as the official model's: a gradient
    taken with respect to local_feat or global_feat (a saliency map) includes the decoder's share."""
    model = randomized(DenseCLIP(tiny_config(), NAMES)).eval()
    feats = model.extract(torch.randn(1, 3, 64, 64))
    prompted = model.context_prompt(feats, model.class_embeddings().detach())
    g, z = torch.autograd.grad(prompted.square().sum(), (feats.global_feat, feats.local_feat))
    assert g.abs().sum() > 0 and z.abs().sum() > 0


def test_context_prompt_adds_gamma_times_the_decoders_update():
    """t' = t + gamma * decoder(t, [g; z]) (one addcmul), against the product and the sum written out, in float64
    with a gamma far from its 1e-4 start, for the per-image (training) and the prefix (evaluation) paths."""
    model = randomized(DenseCLIP(tiny_config(), NAMES)).double()
    with torch.no_grad():
        model.gamma.copy_(torch.linspace(-2.0, 3.0, model.gamma.numel(), dtype=torch.float64))
    model.context_decoder.eval()
    feats = model.extract(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    text = model.class_embeddings()
    update = model.context_decoder(text.expand(2, -1, -1), feats.visual_context())
    expected = text + model.gamma * update
    torch.testing.assert_close(model.context_prompt(feats, text), expected, rtol=1e-12, atol=1e-12)
    model.context_decoder.train()
    model.context_decoder.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
    torch.testing.assert_close(model.context_prompt(feats, text), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_gradients_have_their_parameters_layout(kind):
    """DDP's gradient buckets are views in each parameter's layout: a gradient of another layout is copied every
    step (and DDP warns "Grad strides do not match bucket view strides"). The score/concat level, whose feature is
    NCHW in an NCHW model, must not come out channels_last because the dense embedding map z has NHWC strides."""
    model = DenseCLIP(tiny_config(kind), NAMES).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    mismatched = [
        name
        for name, p in model.named_parameters()
        if p.grad is not None and p.dim() == 4 and p.grad.stride() != p.stride()
    ]
    assert mismatched == []


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_score_concat_output_in_the_lateral_convs_layout(kind):
    """The fused level comes out in the layout its lateral conv runs in (channels_last when the conv's weight or the
    feature is), whatever z's: NHWC in a channels_last model even from an NCHW feature (CUDA's GroupNorm, ViT's level
    2, returns NCHW), NHWC from an NHWC feature in an NCHW model (the CPU engine's channels_last images), NCHW from
    an NCHW feature in an NCHW model (training); and the logits do not change. The layout is the fused operators'
    (the reference is torch.cat, whose layout is its own)."""
    if dcf.ops.backends.resolve("score_concat", torch.device("cpu"), torch.float32, None) == "reference":
        pytest.skip("the reference backend's torch.cat chooses its own layout")
    model = DenseCLIP(tiny_config(kind), NAMES).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for weights, level, fused in ((torch.contiguous_format, torch.contiguous_format, torch.contiguous_format),
                                      (torch.contiguous_format, torch.channels_last, torch.channels_last),
                                      (torch.channels_last, torch.contiguous_format, torch.channels_last)):  # fmt: skip
            model.to(memory_format=weights)
            feats = model.extract(x)
            i = model.config.score_concat_index
            feats.levels[i] = feats.levels[i].contiguous(memory_format=level)
            text = model.context_prompt(feats, model.class_embeddings())
            logits, score = model.logits_and_score(feats, text, x.shape[2:])
            channels_innermost = score.stride(1) == 1 and score.stride(-1) != 1  # score: a slice of the level
            assert channels_innermost == (fused == torch.channels_last) and score.shape[1] == len(NAMES)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def _visual_context(feats) -> torch.Tensor:
    """[g; z] (B, 1 + hw, D), the memory the context decoder attends to."""
    return torch.cat([feats.global_feat.unsqueeze(1), feats.local_feat.flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("batch, names", [(1, NAMES[:1]), (3, NAMES)])
def test_the_decoders_text_only_start_runs_once_for_a_batch(kind, batch, names):
    """Out of training, what the context decoder computes from the class embeddings alone (text_proj, the first
    layer's self-attention block and its cross-attention's queries) runs once, at batch 1, for the whole batch; in
    float64 the result is the official decoder's on the text repeated for each image, which training keeps."""
    model = randomized(DenseCLIP(tiny_config(kind), names)).double().eval()
    x = torch.randn(batch, 3, 64, 64, dtype=torch.float64)
    k, width = len(names), model.config.decoder.width
    text_proj: list[tuple[int, ...]] = []
    model.context_decoder.text_proj.register_forward_hook(lambda m, a, out: text_proj.append(tuple(out.shape)))
    with torch.no_grad():
        feats, text = model.extract(x), model.class_embeddings()
        got = model.context_prompt(feats, text)
        assert text_proj == [(1, k, width)]
        repeated = text.unsqueeze(0).expand(batch, -1, -1)
        decoded = model.context_decoder(repeated, _visual_context(feats))
        prefix = model.context_decoder.prefix(text)
        assert tuple(prefix.x.shape) == tuple(prefix.q.shape) == (1, k, width)
    assert got.shape == (batch, k, text.shape[1])
    torch.testing.assert_close(got, repeated + model.gamma * decoded, rtol=1e-12, atol=1e-12)
    assert rel_err(model.gamma * decoded, got - repeated) < 1e-12
    d = text.shape[1]
    with pytest.raises(ValueError, match=rf"text must be \(K, {d}\) class embeddings, got shape \(1, "):
        model.context_decoder.prefix(text.unsqueeze(0))
    with pytest.raises(ValueError, match=rf"text must be \(K, {d}\) class embeddings, got shape \({k}, {d + 1}\)"):
        model.context_decoder.prefix(torch.zeros(k, d + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"visual must be \(B, N, {d}\) tokens, got shape \({batch}, {d}\)"):
        model.context_decoder.decode(prefix, torch.zeros(batch, d, dtype=torch.float64))


def test_training_repeats_the_text_for_each_images_dropout():
    """In training the decoder runs on the text repeated for each image, as the official model's: its dropout draws
    a mask per image, so two equal images get different class embeddings (a start shared by the batch would give
    them the same, as evaluation does)."""
    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).train()
    assert model.config.decoder.dropout > 0
    text_proj: list[tuple[int, ...]] = []
    model.context_decoder.text_proj.register_forward_hook(lambda m, a, out: text_proj.append(tuple(out.shape)))
    x = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)
    feats = model.extract(x)
    out = model.context_prompt(feats, model.class_embeddings())
    assert text_proj == [(2, len(NAMES), model.config.decoder.width)]
    assert rel_err(out[0], out[1]) > 1e-3, rel_err(out[0], out[1])
    model.eval()
    with torch.no_grad():
        out = model.context_prompt(model.extract(x), model.class_embeddings())
    assert rel_err(out[0], out[1]) < 1e-6, rel_err(out[0], out[1])  # the images' float32 rounding apart


def test_an_eval_model_passes_gradients_through_the_decoders_start(tiny):
    """Fine-tuning in eval mode: the decoder's text-only start, run once at batch 1, is on the autograd graph, so
    every decoder parameter (text_proj, the first layer's self-attention and norms, its cross-attention's q_proj)
    gets a gradient, as the per-image decoder's do."""
    model = DenseCLIP(tiny.config, NAMES).eval()
    model.load_state_dict(tiny.state_dict())
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    missing = [name for name, p in model.context_decoder.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_a_training_decoder_in_an_eval_model_draws_its_dropout_per_image():
    """What decides is the decoder's own mode: a model in eval with its decoder training (fine-tuning the decoder
    alone) repeats the text per image, so that each image gets its own dropout mask."""
    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    model.context_decoder.train()
    text_proj: list[tuple[int, ...]] = []
    model.context_decoder.text_proj.register_forward_hook(lambda m, a, out: text_proj.append(tuple(out.shape)))
    x = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model.context_prompt(model.extract(x), model.class_embeddings())
    assert text_proj == [(2, len(NAMES), model.config.decoder.width)]
    assert rel_err(out[0], out[1]) > 1e-3


def test_a_training_decoder_layer_drops_its_mlps_residual():
    """The official layer's last step is x + dropout(mlp(norm3(x))): in training each element of the MLP's update
    is dropped or scaled by 1 / (1 - p), both seen; in eval it is added as it is. The attention's and the MLP's inner
    dropouts are set to 0 here so that the residual's alone draws."""
    from denseclip_fast.model.decoder import DecoderLayer

    torch.manual_seed(0)
    p, width = 0.5, 32
    layer = randomized(DecoderLayer(width, 4, p)).double()
    for module in (layer.self_attn.proj_drop, layer.cross_attn.proj_drop, layer.mlp[2]):
        module.p = 0.0
    x, memory = torch.randn(2, 5, width, dtype=torch.float64), torch.randn(2, 7, width, dtype=torch.float64)
    with torch.no_grad():
        x1, q = layer.start(x)
        before = x1 + layer.cross_attn.attend(q, memory)
        update = layer.mlp(layer.norm3(before))
        layer.train()
        drawn = layer.finish(x1, q, memory) - before
        layer.eval()
        kept = layer.finish(x1, q, memory) - before
    torch.testing.assert_close(kept, update)
    dropped = drawn.abs() < 1e-12
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(drawn[~dropped], update[~dropped] / (1 - p))


def test_a_training_decoder_layer_drops_its_attentions_outputs():
    """The official decoder's attentions are Attention(proj_drop=dropout): in training each element of the
    self-attention's and the cross-attention's output projection is dropped or scaled by 1 / (1 - p), both seen; in
    eval they are as they are. The residual's and the MLP's dropouts are set to 0 here, so that the attentions'
    alone draw (the test above leaves them out: a merge without proj_drop passed every test)."""
    from denseclip_fast.model.decoder import DecoderLayer

    torch.manual_seed(0)
    p, width = 0.5, 32
    layer = randomized(DecoderLayer(width, 4, p)).double()
    layer.dropout.p = layer.mlp[2].p = 0.0
    x, memory = torch.randn(2, 5, width, dtype=torch.float64), torch.randn(2, 7, width, dtype=torch.float64)
    with torch.no_grad():
        y, q = layer.norm1(x), layer.norm2(x)
        updates = []
        for training in (True, False):
            layer.train(training)
            updates.append((layer.start(x)[0] - x, layer.cross_attn(q, memory)))
    for drawn, kept in zip(*updates):
        dropped = drawn.abs() < 1e-12
        assert dropped.any() and (~dropped).any()
        torch.testing.assert_close(drawn[~dropped], kept[~dropped] / (1 - p))
    torch.testing.assert_close(updates[1][0], layer.self_attn(y, y))


def test_the_training_head_drops_whole_channels():
    """mmseg's BaseDecodeHead drops its features with nn.Dropout2d before conv_seg: in training each (image,
    channel) map is zeroed or scaled by 1 / (1 - p) as a whole, not element by element (nn.Dropout, which the
    official-parity tests, in eval, cannot tell apart)."""
    from denseclip_fast.model.heads import SemanticFPNHead

    torch.manual_seed(0)
    head = SemanticFPNHead(8, 16, 3, dropout=0.5).train()
    seen = []
    head.dropout.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    levels = [torch.randn(2, 8, 16 // s, 16 // s) for s in (1, 2, 4, 8)]
    with torch.no_grad():
        head(levels)
    (before, after), = seen
    dropped, kept = ((after == value).flatten(2).all(-1) for value in (0, 2 * before))  # x 2 is exact
    assert (dropped | kept).all()  # each channel map all dropped or all kept (the ReLU's zeros are either)
    assert (dropped & ~kept).any() and (kept & ~dropped).any()


def test_a_prefix_of_another_vocabulary_or_dtype_is_refused(tiny):
    with torch.no_grad():
        feats = tiny.extract(torch.randn(1, 3, 64, 64))
        text = tiny.class_embeddings()
        other = tiny.context_decoder.prefix(text[:2])
        message = f"prefix was made for 2 classes in torch.float32; the text has {len(NAMES)}"
        with pytest.raises(ValueError, match=message):
            tiny.context_prompt(feats, text, other)
        wrong_dtype = tiny.context_decoder.prefix(text)._replace(x=torch.zeros(1, len(NAMES), 32, dtype=torch.float64))
        with pytest.raises(ValueError, match="in torch.float64; .* image features are torch.float32"):
            tiny.context_prompt(feats, text, wrong_dtype)
        prefix = tiny.context_decoder.prefix(text)
        torch.testing.assert_close(tiny.context_prompt(feats, text, prefix), tiny.context_prompt(feats, text))

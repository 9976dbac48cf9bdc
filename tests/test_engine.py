"""The Segmenter engine on CPU: same function as the model, the vocabulary API, the uint8 test pipeline, input
errors, the BatchNorm folding and the CUDA-graph cache logic (with the capture itself replaced on CPU)."""

from __future__ import annotations

import copy
import io
import pickle
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import denseclip_fast as dcf
from denseclip_fast import DenseCLIP, Segmenter
from denseclip_fast.engine import GraphCache, fold_batchnorm, rewrite
from denseclip_fast.engine.cpu_linear import fuse_quick_gelu, use_onednn_linears
from denseclip_fast.engine.segmenter import MAX_VOCABULARIES, FiniteVerdict
from denseclip_fast.preprocess import keep_ratio_size, load_image, normalize
from denseclip_fast.visualize import default_palette

from .conftest import NAMES, RecordedOps, randomized, rel_err, tiny_config, torch_threads, vit_engine_with

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1) * 255
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255


@pytest.fixture(scope="module", params=["resnet", "vit"])
def model(request) -> DenseCLIP:
    torch.manual_seed(0)
    return randomized(DenseCLIP(tiny_config(request.param), NAMES)).eval()


def _engine(model: DenseCLIP, **kw) -> Segmenter:
    kw.setdefault("crop", 64)
    kw.setdefault("stride", 40)
    return Segmenter(model, device="cpu", dtype=kw.pop("dtype", torch.float32), **kw)


def test_fp32_engine_equals_the_model(model):
    x = torch.randn(2, 3, 70, 100)
    with torch.no_grad():
        whole, slide = model(x), model.slide_inference(x, crop=64, stride=40)
    assert rel_err(_engine(model, mode="whole").logits(x), whole) < 1e-4
    assert rel_err(_engine(model, mode="slide").logits(x), slide) < 1e-4


def test_slide_windows_per_batch_bounds_each_forward_and_keeps_the_logits(model):
    """windows_per_batch: a forward takes at most that many windows of the batch (here 2 images x 2 windows of 4);
    the logits are the default's (all windows at once)."""
    x = torch.randn(2, 3, 70, 100)
    expected = _engine(model, mode="slide").logits(x)
    seg = _engine(model, mode="slide", windows_per_batch=3)
    batches: list[int] = []
    forward = seg._graphs.fn
    seg._graphs.fn = lambda crops: batches.append(crops.shape[0]) or forward(crops)
    assert rel_err(seg.logits(x), expected) < 1e-6  # the same windows' sums (a batch size may change the rounding)
    assert batches == [6, 2]  # 4 windows: 3, then 1, each for both images
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="windows_per_batch must be an int >= 1 or None"):
            _engine(model, mode="slide", windows_per_batch=bad)


def test_bf16_engine_is_close(model):
    """Within 2e-2 of the float32 model, on a model whose logits depend on the text path (random weights leave the
    score channels without influence: with the contexts redrawn the logits moved by 1.3e-2, with gamma 0 by 1e-3,
    both within the tolerance); here those changes move them by > 10 x 2e-2, so a bf16 engine that skipped the
    context decoder or mis-embedded the classes fails."""
    from benchmarks.official.model import weigh_score_channels_

    model = copy.deepcopy(model)
    weigh_score_channels_(model, size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for change in (lambda m: m.gamma.zero_(), lambda m: m.contexts.normal_()):
            changed = copy.deepcopy(model)
            change(changed)
            assert rel_err(changed(x), expected) > 0.1
    out = _engine(model, dtype=torch.bfloat16).logits(x)
    assert out.dtype == torch.float32 and rel_err(out, expected) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_layer_norm_is_clips_in_one_pass(dtype, monkeypatch):
    """NativeLayerNorm: for 16-bit tokens and weights one aten.native_layer_norm (no float32 copies) within a unit
    of the last place of LayerNormFp32's float32 computation (equal in most elements), on a device of
    NATIVE_LN_DEVICES (CUDA; the CPU added here); float32, tokens of another dtype than the weights, a device not
    listed (the CPU by default) or autocast take LayerNormFp32's path and equal it."""
    from denseclip_fast.engine import rewrite
    from denseclip_fast.engine.rewrite import NativeLayerNorm
    from denseclip_fast.model.layers import LayerNormFp32

    torch.manual_seed(0)
    clip = LayerNormFp32(96)
    with torch.no_grad():
        clip.weight.normal_(1.0, 0.5), clip.bias.normal_(0.0, 0.2)
    clip = clip.to(dtype)
    native = NativeLayerNorm(96).to(dtype)
    native.load_state_dict(clip.state_dict())
    x = (torch.randn(3, 37, 96) * 4 + 2).to(dtype)
    expected = clip(x)
    assert torch.equal(native(x), expected)  # the CPU is not among the devices by default
    monkeypatch.setattr(rewrite, "NATIVE_LN_DEVICES", ("cpu",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(native(x), expected)  # autocast: the model's path (layer_norm would give float32)
    with torch.no_grad(), RecordedOps() as ops:
        got = native(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, expected)
        return
    assert ops.names == ["native_layer_norm.default"]
    # a unit of the last place, and 1e-5 absolute where w * (x - mean) * rstd and b cancel (the float32 statistics'
    # last bits then show in the bits of a value near 0)
    ulp = torch.finfo(dtype).eps * expected.float().abs() + 1e-5
    assert ((got.float() - expected.float()).abs() <= ulp).all()
    assert (got == expected).float().mean() > 0.9
    other = (torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)
    assert torch.equal(native(x.to(other)), clip(x.to(other)))  # tokens of another dtype: LayerNormFp32's path


@pytest.mark.parametrize("dtype, switch, listed, native", [
    (torch.bfloat16, None, True, True), (torch.bfloat16, "0", True, False), (torch.float32, None, True, False),
    (torch.bfloat16, None, False, False)])  # fmt: skip
def test_a_16_bit_engine_swaps_the_vits_clip_layer_norms(dtype, switch, listed, native, monkeypatch):
    """A 16-bit Segmenter on a device of NATIVE_LN_DEVICES (CUDA; the CPU added here) runs its ViT's ln_pre,
    blocks' ln_1/ln_2 and ln_post as NativeLayerNorm on their own parameters (the text encoder keeps LayerNormFp32,
    and its embeddings stay the model's); not with DENSECLIP_FAST_NATIVE_LN=0, not in float32, not on a device not
    listed (a CPU engine by default). Either way the logits stay within bfloat16's tolerance of the model's, and
    the prepared copy's parameters (the biases that folding BatchNorm made included) take no gradient."""
    from denseclip_fast.engine.rewrite import NativeLayerNorm, native_layer_norms

    model, seg = vit_engine_with(monkeypatch, rewrite, "NATIVE_LN_DEVICES", listed, "DENSECLIP_FAST_NATIVE_LN", switch,
                                 dtype, crop=64, stride=40)
    image = [type(m) for m in seg.model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    layers = len(model.backbone.transformer.resblocks)
    assert image.count(NativeLayerNorm) == (2 * layers + 2 if native else 0)
    assert not any(isinstance(m, NativeLayerNorm) for m in seg.model.text_encoder.modules())
    assert not any(p.requires_grad for p in seg.model.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(seg.logits(x), expected) < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    copy_ = copy.deepcopy(model)
    before = {name: m.weight for name, m in copy_.backbone.named_modules() if type(m) is not NativeLayerNorm
              and isinstance(m, torch.nn.LayerNorm)}  # fmt: skip
    assert native_layer_norms(copy_) == len(before)
    after = dict(copy_.backbone.named_modules())
    assert all(type(after[name]) is NativeLayerNorm and after[name].weight is w for name, w in before.items())


def test_silu_mlps_keep_the_function():
    """rewrite.silu_mlps on a float32 copy: each of the ViT's block MLPs as 1.702 c_fc, SiLU, c_proj / 1.702 (the
    weights scaled in float32), the text encoder's untouched; logits within float32 rounding of the copy's without
    it; nothing more the second time, nothing in 16-bit weights (scaled there, they would be rounded twice)."""
    from denseclip_fast.engine.rewrite import prepare_for_inference, silu_mlps
    from denseclip_fast.model.layers import QuickGELU

    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config("vit"), NAMES)).eval()
    cpu = torch.device("cpu")
    plain = prepare_for_inference(model, cpu, torch.float32)
    rewritten = prepare_for_inference(model, cpu, torch.float32, silu_mlps)
    layers = len(model.backbone.transformer.resblocks)
    blocks = list(zip(plain.backbone.transformer.resblocks, rewritten.backbone.transformer.resblocks))
    assert len(blocks) == layers and all(type(new.mlp.gelu) is torch.nn.SiLU for _, new in blocks)
    for old, new in blocks:
        assert torch.equal(new.mlp.c_fc.weight, old.mlp.c_fc.weight * 1.702)
        assert torch.equal(new.mlp.c_fc.bias, old.mlp.c_fc.bias * 1.702)
        assert torch.equal(new.mlp.c_proj.weight, old.mlp.c_proj.weight / 1.702)
        assert torch.equal(new.mlp.c_proj.bias, old.mlp.c_proj.bias)
    text = [type(m) for m in rewritten.text_encoder.modules() if isinstance(m, (QuickGELU, torch.nn.SiLU))]
    assert text and set(text) == {QuickGELU}
    x = torch.randn(2, 3, 64, 80)
    names = plain.text_features(NAMES)
    with torch.no_grad():
        want, got = plain.logits_for(x, names, None), rewritten.logits_for(x, names, None)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert silu_mlps(rewritten) == 0
    assert silu_mlps(prepare_for_inference(model, cpu, torch.float32).to(torch.bfloat16)) == 0


@pytest.mark.parametrize("dtype, switch, listed, silu", [
    (torch.float32, None, True, True), (torch.bfloat16, None, True, True), (torch.float32, "0", True, False),
    (torch.float32, None, False, False)])  # fmt: skip
def test_an_engine_on_a_silu_device_rewrites_the_vits_mlps(dtype, switch, listed, silu, monkeypatch):
    """A Segmenter on a device of SILU_DEVICES (CUDA; the CPU added here, in place of its oneDNN rewrite) takes
    silu_mlps in float32 before its cast; not with DENSECLIP_FAST_SILU_MLP=0, not on a device not listed (a CPU
    engine by default, which fuses the MLPs with oneDNN instead). The logits stay within the dtype's tolerance of
    the model's."""
    from denseclip_fast.model.layers import QuickGELU

    model, seg = vit_engine_with(monkeypatch, rewrite, "SILU_DEVICES", listed, "DENSECLIP_FAST_SILU_MLP", switch, dtype,
                                 crop=64, stride=40)
    kinds = [type(b.mlp.gelu) for b in seg.model.backbone.transformer.resblocks]
    layers = len(model.backbone.transformer.resblocks)
    assert kinds.count(torch.nn.SiLU) == (layers if silu else 0)
    if silu:  # else the CPU engine's own rewrite (oneDNN's SiLU post-op: the activation an Identity)
        assert not any(isinstance(m, QuickGELU) for m in seg.model.backbone.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(seg.logits(x), expected) < (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_bf16_engine_resizes_its_logits_in_float32(model):
    """The head's bfloat16 logits are cast to float32 before the bilinear resize to the input size (as the official
    model's, and as the AOTInductor packages'); a resize in bfloat16 rounds the full-size logits (3e-3)."""
    seg = _engine(model, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), seg._math():
        small = seg._forward(x.to(torch.bfloat16, memory_format=torch.channels_last))
    assert small.dtype == torch.bfloat16 and small.shape[2:] == (16, 24)
    by_hand = F.interpolate(small.float(), size=(64, 96), mode="bilinear", align_corners=False)
    in_bf16 = F.interpolate(small, size=(64, 96), mode="bilinear", align_corners=False).float()
    out = seg.logits(x)
    torch.testing.assert_close(out, by_hand, rtol=1e-6, atol=1e-6)
    assert rel_err(in_bf16, by_hand) > 1e-3


def test_a_half_precision_model_gets_float32_class_embeddings(model):
    """The engine works in float32 before it casts, whatever the model's dtype: from a bfloat16 model the text
    encoder and contexts stayed bfloat16 (0.65% off the embeddings, 0.1% off the logits of a float32 engine) and
    BatchNorm was folded into bfloat16 weights (rounded twice). The embeddings now equal a float32 model's with the
    same (bfloat16-rounded) weights and its linear layers (and QuickGELUs) through oneDNN as the CPU engine's (the same
    sums), a
    float32 engine's logits are close to the float32 model's; the image path runs in the engine's dtype."""
    half = copy.deepcopy(model).bfloat16()
    rounded = copy.deepcopy(half).float()
    same_math = copy.deepcopy(rounded)  # its linear layers through oneDNN, as the CPU engine's: the same sums
    use_onednn_linears(same_math)
    fuse_quick_gelu(same_math)  # and its MLPs' QuickGELU as their post-op
    x = torch.randn(1, 3, 64, 64)
    for dtype in (torch.float32, torch.bfloat16):
        seg = _engine(half, dtype=dtype, mode="whole")
        assert {p.dtype for p in seg.model.text_encoder.parameters()} == {torch.float32}
        assert seg.model.contexts.dtype == torch.float32
        with torch.no_grad():
            expected = same_math.text_features(seg.class_names).to(dtype)
        torch.testing.assert_close(seg._text, expected, rtol=0, atol=0)
        assert {p.dtype for p in seg.model.backbone.parameters()} == {dtype}
    with torch.no_grad():
        expected = rounded(x)
    assert rel_err(_engine(half, mode="whole").logits(x), expected) < 1e-4


def test_engine_leaves_the_users_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _engine(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_a_segmenter_refuses_pickle_and_copy_saying_what_to_send(model):
    """pickle (multiprocessing, Ray) and deepcopy get a TypeError naming the Segmenter and the alternative, not the
    lock's "cannot pickle '_thread.RLock' object"; the model it was built from pickles and builds an equal one."""
    seg = _engine(model)
    for attempt in (lambda: pickle.dumps(seg), lambda: copy.deepcopy(seg), lambda: copy.copy(seg)):
        with pytest.raises(TypeError, match=r"^a Segmenter cannot be pickled or copied: .* Send the DenseCLIP model"):
            attempt()
    again = _engine(pickle.loads(pickle.dumps(model)))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(again.logits(x), seg.logits(x))


def test_the_engines_model_refuses_weights_saying_where_they_go(model):
    """load_state_dict into the engine's prepared copy (strict or not, on it or on a submodule, after pickling or
    deepcopy) raises a RuntimeError naming the way that works, and leaves the engine as it was: a non-strict load
    of the user's state dict had run silently with unprepared weights (folded BatchNorms missing, CPU MLPs
    unscaled)."""
    seg = _engine(model)
    x = torch.randn(1, 3, 64, 64)
    before = seg.logits(x)
    message = r"^this is a Segmenter's prepared copy .* build a new Segmenter from it$"
    copies = (seg.model, pickle.loads(pickle.dumps(seg.model)), copy.deepcopy(seg.model))
    for target in copies:
        with pytest.raises(RuntimeError, match=message):
            target.load_state_dict(model.state_dict(), strict=False)
        with pytest.raises(RuntimeError, match=message):
            target.load_state_dict(target.state_dict())
        with pytest.raises(RuntimeError, match=message):
            target.backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    assert torch.equal(seg.logits(x), before)
    model.load_state_dict(model.state_dict())  # the user's own model takes weights as before


def test_set_classes_equals_rebuilding(model):
    names = ["sky", "road", "person", "tree"]
    rebuilt = DenseCLIP(model.config, names).eval()
    rebuilt.load_state_dict(model.state_dict())
    seg = _engine(model)
    x = torch.randn(1, 3, 64, 64)
    before = seg.logits(x)
    buffers = [t.data_ptr() for t in (seg._text, *seg._prefix)]
    seg.set_classes(names)
    # the embeddings and the decoder's start from them updated in place: captured graphs keep reading them
    assert [t.data_ptr() for t in (seg._text, *seg._prefix)] == buffers
    assert seg.class_names == names
    assert torch.equal(seg.logits(x), _engine(rebuilt).logits(x))
    assert rel_err(before, seg.logits(x)) > 1e-3


def test_the_decoders_text_only_start_runs_once_per_vocabulary(model):
    """What the context decoder computes from the class embeddings alone (model/decoder.py: text_proj, the first
    layer's self-attention block, its cross-attention's queries) runs when a vocabulary is embedded (construction,
    set_classes, an open vocabulary's first use), never per image; the logits stay the model's."""
    seg = _engine(model)
    starts: list[tuple[int, ...]] = []
    seg.model.context_decoder.text_proj.register_forward_hook(lambda m, a, out: starts.append(tuple(out.shape)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(seg.logits(x), expected) < 1e-4
    seg.logits(x)
    assert starts == []
    names = ["dog", "sky", "road"]
    seg.open_vocab(x, names)
    seg.open_vocab(x, names)
    assert starts == [(1, 3, model.config.decoder.width)]
    seg.set_classes(list(reversed(model.class_names)))
    seg.logits(x)
    assert len(starts) == 2


def test_a_segmenter_built_under_inference_mode_changes_its_classes(model):
    """Built under torch.inference_mode, the embeddings buffer is an inference tensor: set_classes wrote the new
    vocabulary into it and then raised 'Inplace update to inference tensor outside InferenceMode'."""
    names = ["sky", "road", "person", "tree"]
    rebuilt = DenseCLIP(model.config, names).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.inference_mode():
        seg = _engine(model)
    seg.set_classes(names)
    x = torch.randn(1, 3, 64, 64)
    assert seg.class_names == names and torch.equal(seg.logits(x), _engine(rebuilt).logits(x))


@pytest.mark.parametrize("dtype, value", [(torch.float64, -1e39), (torch.float32, 1e20), (torch.float32, 16.5),
                                          (torch.float32, -17.0)])  # fmt: skip
def test_values_past_what_a_normalised_image_holds_are_refused(model, dtype, value):
    """1e39 is finite in a float64 batch but infinite once cast to the engine's float32 (and 7e4 in a float16
    engine's), and 1e20 is finite in float32 but overflows inside the network (a batch of such values: NaN logits,
    predict class 0 everywhere; one such pixel: logits of 1e17): without a word. A float batch is CLIP-normalised,
    so anything past ±16 is refused: a batch of 0..255 pixels that was not normalised too."""
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    x[0, 0, 0, 0], x[0, 2, 1, 1] = 16.0, -16.0  # the largest magnitudes taken
    assert torch.isfinite(_engine(model).logits(x)).all()
    x[0, 1, 5, 7] = value
    with pytest.raises(ValueError, match=r"^images contain NaN or infinite values, or values past ±16: a float "
                                         r"batch is CLIP-normalised .*pass 0..255 pixels as uint8 images"):  # fmt: skip
        _engine(model).logits(x)
    if dtype == torch.float64:
        assert torch.isnan(_engine(model, check_finite=False).logits(x)).any()  # what the check keeps out


def test_a_float_batch_of_pixels_not_normalised_is_refused(model):
    """The commonest mistake: 0..255 pixels as a float tensor, not normalised. It ran, and its logits meant nothing."""
    pixels = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    seg = _engine(model)
    with pytest.raises(ValueError, match="pass 0..255 pixels as uint8 images, which the engine normalises"):
        seg.logits(pixels.permute(0, 3, 1, 2).float())
    assert seg.logits(pixels).shape == (1, len(seg.class_names), 64, 64)  # as uint8
    assert seg.logits(normalize(pixels.permute(0, 3, 1, 2).float())).shape == (1, len(seg.class_names), 64, 64)


def _official_test_pipeline(model: DenseCLIP, image: np.ndarray, mode: str) -> torch.Tensor:
    """The mmseg test pipeline written out with OpenCV and plain torch: keep-ratio resize to fit the test scale
    with mmcv's rounding of the size (cv2.resize, bilinear, uint8 result, as mmcv's imrescale), CLIP normalisation,
    whole or slide, resize back."""
    cv2 = pytest.importorskip("cv2")
    h, w = image.shape[:2]
    long_edge, short_edge = max(model.config.test_scale), min(model.config.test_scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    size = (int(h * factor + 0.5), int(w * factor + 0.5))
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
    x = (x - CLIP_MEAN) / CLIP_STD
    with torch.no_grad():
        out = model(x) if mode == "whole" else model.slide_inference(x, crop=64, stride=40)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_uint8_images_go_through_the_official_test_pipeline(model, mode):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(37, 29, 3), dtype=np.uint8)
    seg = Segmenter(model, device="cpu", dtype=torch.float32, mode=mode, crop=64, stride=40)
    seg.model.config = seg.model.config.replace(test_scale=(256, 64))  # keep the resized images small
    model.config, saved = seg.model.config, model.config
    try:
        out = seg.logits([a, b])  # different sizes: a list, each at its own size
        assert isinstance(out, list) and out[0].shape == (4, 48, 80) and out[1].shape == (4, 37, 29)
        assert rel_err(out[0], _official_test_pipeline(model, a, mode)[0]) < 1e-4
        assert rel_err(out[1], _official_test_pipeline(model, b, mode)[0]) < 1e-4
        batch = seg.logits(torch.from_numpy(np.stack([a, a])))  # one (B, H, W, 3) tensor: one forward
        assert batch.shape == (2, 4, 48, 80) and rel_err(batch[1], out[0]) < 1e-5
        from PIL import Image

        assert rel_err(seg.logits(Image.fromarray(a))[0], out[0]) < 1e-6
    finally:
        model.config = saved


def test_methods_returning_a_list_for_images_of_several_sizes_say_so():
    """logits, predict and open_vocab return a list when uint8 images differ in size; open_vocab's docstring (and
    README's line for it) promised a (B, K', H, W) tensor alone."""
    import inspect

    for name in ("logits", "predict", "open_vocab"):
        method = getattr(Segmenter, name)
        assert "list" in str(inspect.signature(method).return_annotation), name
        assert "a list" in " ".join((method.__doc__ or "").split()), f"Segmenter.{name}'s docstring"


def test_predict_overlay_and_open_vocab(model):
    seg = _engine(model)
    image = np.random.default_rng(1).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
    labels = seg.predict(image)
    assert labels.shape == (1, 40, 52) and labels.dtype == torch.int64 and labels.max() < 4
    picture = seg.overlay(image, labels[0])
    assert picture.shape == (40, 52, 3) and picture.dtype == np.uint8
    x = torch.randn(2, 3, 64, 96)
    scores = seg.open_vocab(x, ["dog", "sky", "road", "grass", "car"])
    assert scores.shape == (2, 5, 64, 96)
    with torch.no_grad():
        expected = model.open_vocab_scores(x, ["dog", "sky", "road", "grass", "car"])
    expected = F.interpolate(expected, size=(64, 96), mode="bilinear", align_corners=False)
    assert rel_err(scores, expected) < 1e-4
    assert seg.open_vocab(x, ["dog", "sky", "road", "grass", "car"]).shape == scores.shape  # cached vocabulary
    # the least recently used vocabulary is dropped first: one used between new ones stays (the oldest went)
    embedded = []
    embed = seg._embed
    seg._embed = lambda names, **kwargs: embedded.append(names) or embed(names, **kwargs)  # type: ignore[method-assign]
    small = x[:1, :, :32, :32]
    for i in range(MAX_VOCABULARIES + 2):
        seg.open_vocab(small, [f"thing {i}"])
        seg.open_vocab(small, ["dog", "sky", "road", "grass", "car"])
    assert embedded == [(f"thing {i}",) for i in range(MAX_VOCABULARIES + 2)]
    # open-vocabulary labels go past the head's 4 classes: overlay takes the names (a palette of that many colours)
    names = ["dog", "sky", "road", "grass", "car", "tree"]
    open_labels = torch.full((40, 52), 5, dtype=torch.int64)
    open_labels[:, :20] = 0
    with pytest.raises(ValueError, match=r"labels go up to 5, past this segmenter's 4 classes: for the labels of "
                                         r"predict\(images, names\), give overlay the same names \(a ground "
                                         r"truth's ignored pixels, 255, are left unpainted\)"):  # fmt: skip
        seg.overlay(image, open_labels)
    # a ground truth: its ignored pixels (255) are left as the image is, the others painted; 254 is no class
    truth = torch.full((40, 52), 255, dtype=torch.int64)
    truth[:, 30:] = 2
    painted = seg.overlay(image, truth, alpha=1.0)
    colours = seg.model.palette or default_palette(4)
    assert (painted[:, :30] == image[:, :30]).all() and (painted[:, 30:] == colours[2]).all()
    assert (seg.overlay(image, truth.numpy().astype(np.uint8), alpha=1.0) == painted).all()
    with pytest.raises(ValueError, match="labels go up to 255, past this segmenter's 4 classes: .* same names$"):
        seg.overlay(image, truth, ignore_index=None)
    truth[0, 0] = 254
    with pytest.raises(ValueError, match="labels go up to 254, past this segmenter's 4 classes"):
        seg.overlay(image, truth)
    colours = default_palette(len(names))
    solid = seg.overlay(image, open_labels, alpha=1.0, names=names)
    assert (solid[:, :20] == colours[0]).all() and (solid[:, 20:] == colours[5]).all()
    with pytest.raises(ValueError, match="labels range 0..5 exceeds the palette of 5 colours"):
        seg.overlay(image, open_labels, names=names[:5])
    with pytest.raises(ValueError, match="class names must be a sequence of strings, got str"):
        seg.overlay(image, open_labels, names="dog")


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_resizes_a_few_classes_at_a_time_and_equals_the_argmax(model, mode, monkeypatch):
    """predict's labels at each uint8 image's own size are made a chunk of classes at a time (a 12-megapixel photo's
    150 full-size score maps took 7.2 GB before the argmax), each chunk through every resize (whole mode: to the
    test scale, then to the image's size; slide: the latter) into buffers of LABEL_CHUNK values in all: equal to
    logits().argmax pixel for pixel (images of two sizes, one chunk per class up to all classes at once; open
    vocabulary too), and no resize of a chunk's holds more; a normalised batch too."""
    from denseclip_fast.engine import segmenter

    seg = _engine(model, mode=mode)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=size, dtype=np.uint8) for size in ((70, 90, 3), (45, 101, 3), (70, 90, 3))]
    names = ["dog", "sky", "road", "grass", "car", "tree", "person"]
    expected = [t.argmax(dim=0) for t in seg.logits(images)]
    expected_vocab = [t.argmax(dim=0) for t in seg.open_vocab(images, names)]
    buffers: list[tuple[int, ...]] = []  # the shapes resized into a chunk's buffer
    storages: set[int] = set()  # the 70x90 images' buffers
    inputs: list[tuple[int, ...]] = []  # the shapes resized from
    resize = segmenter.resized

    def recorded(scores, size, out=None):
        result = resize(scores, size, out)
        if out is not None:
            buffers.append(tuple(result.shape))
            inputs.append(tuple(scores.shape))
            if result.shape[0] == 2:
                storages.add(out.untyped_storage().data_ptr())
        return result

    monkeypatch.setattr(segmenter, "resized", recorded)
    sizes = [(70, 90)] if mode == "slide" else [keep_ratio_size(70, 90, model.config.test_scale), (70, 90)]
    seg.predict(images)
    (network,) = {shape[2:] for shape in inputs if shape[0] == 2 and shape[2:] not in sizes}  # the chain's start
    plane = 2 * (network[0] * network[1] + sum(h * w for h, w in sizes))  # a class of the 70x90 images, every step
    for classes_at_once in (1, 2, 3, 7):
        monkeypatch.setattr(segmenter, "LABEL_CHUNK", classes_at_once * plane)
        buffers.clear()
        storages.clear()
        got = seg.predict(images)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), classes_at_once
        assert [g.shape for g in got] == [(70, 90), (45, 101), (70, 90)] and got[0].dtype == torch.int64
        step = min(classes_at_once, 4)
        assert {b for b in buffers if b[0] == 2} == {(2, c, *size) for size in sizes for c in {step, 4 % step or step}}
        assert len(storages) == len(sizes)  # one buffer per resize, every chunk written into it
        got = seg.predict(images, names)
        assert all(torch.equal(g, e) for g, e in zip(got, expected_vocab)), classes_at_once
    x = torch.randn(1, 3, 64, 80)  # a normalised batch: the argmax at its own size
    assert torch.equal(seg.predict(x), seg.logits(x).argmax(dim=1))
    monkeypatch.setattr(segmenter, "LABEL_CHUNK", 64 * 80)  # one class at a time
    assert torch.equal(seg.predict(x), seg.logits(x).argmax(dim=1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_predict_equals_the_argmax_on_exact_ties_whatever_the_threads(model, threads, fused, monkeypatch):
    """Two classes whose logits are equal (the head's rows 0 and 3 made the same): predict labels every such pixel
    0, as argmax does, with chunks of 3 classes on one thread too (ATen's CPU resize of 3 channels on one thread
    took its channels_last kernel, whose sums differ by 1e-7 from the full resize's: 18% of pixels came out 3);
    through the fused labels kernel (both resizes in it, chunks of 3 classes) and without it."""
    from denseclip_fast.engine import cpu_labels, segmenter

    tied = copy.deepcopy(model)
    with torch.no_grad():
        tied.decode_head.conv_seg.weight[3] = tied.decode_head.conv_seg.weight[0]
        tied.decode_head.conv_seg.bias[3] = tied.decode_head.conv_seg.bias[0]
    seg = _engine(tied, mode="whole")
    image = np.random.default_rng(4).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    with torch_threads(threads):
        logits = seg.logits(image)
        assert torch.equal(logits[:, 3], logits[:, 0])
        expected = logits.argmax(dim=1)
        test_size = keep_ratio_size(200, 300, model.config.test_scale)  # the network's input: (512, 768)
        plane = test_size[0] * test_size[1] // 16 + test_size[0] * test_size[1] + 200 * 300  # its output, 2 resizes
        calls: list[int] = []
        if fused:  # the fused kernel takes both resizes, 3 classes a call
            monkeypatch.setattr(cpu_labels, "ROW_VALUES", 3 * 3 * (test_size[1] + 300))
            kernel = cpu_labels.resize_argmax_
            monkeypatch.setattr(cpu_labels, "resize_argmax_", lambda *a: calls.append(a[-1]) or kernel(*a))
        else:
            monkeypatch.setattr(cpu_labels, "fused_tail", lambda sizes: 0)
            monkeypatch.setattr(segmenter, "LABEL_CHUNK", 3 * plane)  # chunks of 3 classes, the last of 1
        steps = []
        label_step = segmenter.label_step
        monkeypatch.setattr(segmenter, "label_step", lambda *a: steps.append(label_step(*a)) or steps[-1])
        assert torch.equal(seg.predict(image), expected)
        assert steps == ([4] if fused else [3]) and calls == ([0, 3] if fused else [])
    assert (expected == 0).any() and not (expected == 3).any()


def test_label_chunks_hold_enough_classes_within_the_memory_bound():
    """label_step on a CPU: all classes when they fit the cached size, else as many as it holds but at least
    LABEL_CLASSES; on a GPU all; never more than LABEL_CHUNK values nor fewer than one class."""
    from denseclip_fast.engine.segmenter import LABEL_CACHED, LABEL_CHUNK, LABEL_CLASSES, label_step

    assert LABEL_CLASSES * 512 * 512 <= LABEL_CACHED < 150 * 512 * 512 <= LABEL_CHUNK
    assert label_step(1, 150, (64, 64)) == 150 and label_step(1, 7, (512, 512)) == 7
    assert label_step(1, 150, (256, 256)) == LABEL_CACHED // (256 * 256) > LABEL_CLASSES
    assert label_step(1, 150, (512, 512)) == LABEL_CLASSES == label_step(4, 150, (512, 512))
    assert label_step(1, 150, (4000, 3000)) == LABEL_CHUNK // (4000 * 3000) < LABEL_CLASSES
    assert label_step(16, 150, (8000, 8000)) == 1
    assert label_step(1, 150, (512, 512), cpu=False) == 150  # a GPU: one chunk while within LABEL_CHUNK
    assert label_step(1, 150, (4000, 3000), cpu=False) == LABEL_CHUNK // (4000 * 3000)


@pytest.mark.parametrize("threads", [1, 2])
def test_aten_resizes_finite_values_to_their_own_size_unchanged(threads):
    """What unchanged_by_resize relies on: ATen's bilinear resize of (N, 1, H, W) planes to (H, W) returns finite
    values bit for bit (negative zeros and values near the float32 limit too), whatever the shape and threads; an
    infinity comes back NaN (so the skip needs all values finite)."""
    with torch_threads(threads):
        generator = torch.Generator().manual_seed(5)
        for shape in [(1, 1, 1, 1), (3, 1, 1, 7), (4, 1, 37, 129), (2, 1, 64, 683), (6, 1, 3, 1000)]:
            x = torch.randn(shape, generator=generator)
            x.view(-1)[::7] = -0.0
            x.view(-1)[::11] = 3e38
            y = F.interpolate(x, size=shape[2:], mode="bilinear", align_corners=False)
            assert torch.equal(y, x) and torch.equal(y.signbit(), x.signbit()), shape
        x = torch.randn(1, 1, 4, 5, generator=generator)
        x[0, 0, 2, 3] = float("inf")
        y = F.interpolate(x, size=(4, 5), mode="bilinear", align_corners=False)
        assert y[0, 0, 2, 3].isnan() and y.isnan().sum() == 1


def test_a_resize_to_the_same_size_is_skipped_only_where_it_changes_nothing(model, monkeypatch):
    """resized_through and labels skip a resize of CPU scores to their own size when all are finite (a uint8 image
    of the test scale's size: its logits are resized to its own size after the network), with the same result
    as ATen's; with an infinity among them the resize runs and turns it into NaN, as the official model's."""
    from denseclip_fast.engine import cpu_labels, segmenter

    def reference(scores, *sizes):
        out = scores.float()
        for size in sizes:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    small = torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(6))
    for dtype in (torch.float32, torch.bfloat16):
        for sizes in [((36, 44), (36, 44)), ((36, 44), (36, 44), (20, 30)), ((9, 11),)]:
            scores = small.to(dtype)
            expected = reference(scores, *sizes)
            assert torch.equal(segmenter.resized_through(scores, *sizes), expected), (dtype, sizes)
            assert torch.equal(segmenter.labels(scores, *sizes), expected.argmax(dim=1)), (dtype, sizes)
    broken = small.clone()
    broken[1, 2, 4, 5] = float("inf")
    expected = reference(broken, (36, 44), (36, 44))
    assert reference(broken, (36, 44)).isinf().any() and expected.isnan().any()  # spread, then NaN
    torch.testing.assert_close(segmenter.resized_through(broken, (36, 44), (36, 44)), expected, rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip
    assert torch.equal(segmenter.labels(broken, (36, 44), (36, 44)), expected.argmax(dim=1))

    seg = _engine(model)
    short = min(model.config.test_scale)
    size = (short, short * 5 // 4)  # (512, 640), ViT-B/16's (640, 800): the keep-ratio resize leaves it as it is
    assert keep_ratio_size(*size, model.config.test_scale) == size
    image = np.random.default_rng(7).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    sizes: list[tuple[int, int]] = []
    resize = segmenter.resized
    monkeypatch.setattr(segmenter, "resized", lambda scores, s, out=None: sizes.append(s) or resize(scores, s, out))
    kernel = cpu_labels.resize_argmax_  # predict's resizes on a CPU (fused), each size in turn
    monkeypatch.setattr(cpu_labels, "resize_argmax_", lambda *a: sizes.extend(a[1]) or kernel(*a))
    fused = cpu_labels.resize  # the logits' (the extension's kernel, where it serves them)
    monkeypatch.setattr(cpu_labels, "resize", lambda scores, s: sizes.extend(s) or fused(scores, s))
    logits, labels = seg.logits(image), seg.predict(image)
    assert [tuple(s) for s in sizes if s is not None] == [size] * 2  # the network's output's, not again
    assert logits.shape == (1, 4, *size) and torch.equal(labels, logits.argmax(dim=1))
    sizes.clear()
    monkeypatch.setattr(cpu_labels, "fused_tail", lambda sizes: 0)  # resize then reduce: the same sizes
    assert torch.equal(seg.predict(image), labels) and [tuple(s) for s in sizes] == [size]


def test_labels_break_ties_and_nans_as_argmax(monkeypatch):
    """labels (predict's chunked argmax) against argmax on crafted scores: a tie across chunks keeps the first class,
    a NaN wins (the first NaN), whatever the chunk."""
    from denseclip_fast.engine import segmenter

    scores = torch.randn(2, 9, 5, 6)
    scores[:, 6] = scores[:, 2]  # ties in another chunk
    scores[:, 4] = scores[:, 2]
    scores[0, 7, 1, 2] = float("nan")
    scores[1, 3, 0, 0] = scores[1, 8, 0, 0] = float("nan")
    expected = segmenter.resized(scores, (11, 13)).argmax(dim=1)
    for step in (1, 2, 4, 9):
        monkeypatch.setattr(segmenter, "LABEL_CHUNK", step * 2 * 11 * 13)
        assert torch.equal(segmenter.labels(scores, (11, 13)), expected), step


def test_16_bit_pil_images_keep_their_high_byte(model, tmp_path):
    """A 16-bit grey PIL image is read as OpenCV (and load_image) reads the file: its high byte, not clipped to 255
    by Pillow's RGB conversion; also one Pillow opens from a file as a 32-bit integer image (mode "I": a 16-bit PGM
    with Pillow 13, a 16-bit PNG with older Pillows)."""
    seg = _engine(model)
    grey = np.full((40, 44), 40000, np.uint16)
    grey[:, :20] = 2000
    expected = seg.logits(np.repeat((grey >> 8).astype(np.uint8)[:, :, None], 3, axis=2))
    assert torch.equal(seg.logits(Image.fromarray(grey)), expected)
    for mode, data in [("I;16L", grey.astype("<u2")), ("I;16B", grey.astype(">u2")), ("I;16N", grey)]:
        assert torch.equal(seg.logits(Image.frombytes(mode, (44, 40), data.tobytes())), expected), mode
    Image.fromarray(grey).save(tmp_path / "grey16.pgm")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "grey32.tif")  # mode "I" whichever Pillow
    for name in ("grey16.pgm", "grey32.tif"):
        with Image.open(tmp_path / name) as opened:
            assert opened.mode in ("I", "I;16", "I;16B"), (name, opened.mode)
            assert torch.equal(seg.logits(opened), expected), name
        assert torch.equal(seg.logits(load_image(tmp_path / name)), expected), name


def test_threads_take_turns(model, monkeypatch):
    """Threads sharing a Segmenter run its forwards one at a time (the lock: on CUDA the graphs' static buffers are
    shared), each getting its own input's logits. On a CPU the results would agree without the lock too, so the
    forward counts the calls inside it at once (each lingers 20 ms)."""
    seg = _engine(model)
    xs = [torch.randn(1, 3, 64, 64) for _ in range(4)]
    expected = [seg.logits(x) for x in xs]
    inside, most, count = 0, 0, threading.Lock()
    forward = seg.model.logits_for

    def lingering(*args, **kwargs):
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.02)
            return forward(*args, **kwargs)
        finally:
            with count:
                inside -= 1

    monkeypatch.setattr(seg.model, "logits_for", lingering)
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, seg.logits(xs[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(4))
    assert most == 1


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randn(1, 4, 64, 64), r"CLIP-normalised \(B, 3, H, W\), got shape \(1, 4, 64, 64\)"),
        (np.zeros((32, 32, 4), np.uint8), r"uint8 \(H, W, 3\) image, got shape \(32, 32, 4\) dtype uint8"),
        (torch.randn(0, 3, 64, 64), "empty batch"),
        ([], "empty list"),
        (np.zeros((0, 10, 3), np.uint8), "zero-size image"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN or infinite"),
        (np.zeros((32, 32, 3), np.float32), "numpy images must be uint8"),
        ("image.png", "expected an image"),
        (torch.randn(1, 3, 16, 64), r"at least 32x32 pixels, got \(16, 64\)"),
        ([np.zeros((40, 40, 3), np.uint8), np.zeros((4, 1000, 3), np.uint8)],
         r"images\[1\] of \(4, 1000\) pixels is resized to \(8, 2048\)"),
        (torch.randn(1, 3, 64, 64).to(torch.float8_e4m3fn), "float images must be torch.float32, .*got torch.float8"),
        (torch.randn(3, 64, 64, dtype=torch.complex64), r"expected uint8 images .*got dtype torch.complex64"),
        (Image.fromarray(np.full((40, 40), 0.5, np.float32), mode="F"), "images: a floating-point image"),
        # were torch's, numpy's or Pillow's own errors, or named the wrong thing (a bad-input review)
        (torch.randn(1, 3, 64, 64, device="meta"), "images must be a dense .*got a meta tensor"),
        (torch.randn(1, 3, 64, 64).to_sparse(), "images must be a dense .*got layout torch.sparse_coo"),
        ([torch.zeros(40, 40, 3, dtype=torch.uint8, device="meta")], r"images\[0\] must be a dense .*meta tensor"),
        (np.array(3, np.uint8), r"uint8 \(H, W, 3\) image, got shape \(\)"),  # was "(1,)"
        (np.zeros((0, 40, 40, 3), np.uint8), "empty batch"),  # was "empty list"
        (torch.zeros(0, 40, 40, 3, dtype=torch.uint8), r"^images is an empty batch \(B=0\)$"),
        (torch.randn(1, 3, 0, 64), r"^zero-size images \(0, 64\)$"),
        (torch.randn(2, 3, 64, 0), r"^zero-size images \(64, 0\)$"),
        (Image.new("La", (40, 40)), r"images: the PIL image \(mode La\) cannot be read as RGB"),
        # what the image likely is, and how to pass it (a fresh-eyes audit)
        (np.zeros((3, 40, 48), np.uint8), r"^images: expected a uint8 \(H, W, 3\) image, got shape \(3, 40, 48\) "
                                          r"dtype uint8: a \(3, H, W\) image \(torchvision\.io\.read_image's layout\) "
                                          r"goes in as image\.transpose\(1, 2, 0\)$"),
        ([torch.zeros(3, 40, 48, dtype=torch.uint8)],
         r"^images\[0\]: .*dtype torch\.uint8: .* image\.permute\(1, 2, 0\)$"),
        (torch.zeros(2, 3, 40, 48, dtype=torch.uint8), r"^images: expected a uint8 \(B, H, W, 3\) batch, got shape "
                                                       r"\(2, 3, 40, 48\): a \(B, 3, H, W\) one goes in as "
                                                       r"images\.permute\(0, 2, 3, 1\)$"),
        ([torch.randn(3, 40, 48)], r"images\[0\]: .*: float images go in as one CLIP-normalised \(B, 3, H, W\) tensor"),
        (np.zeros((40, 48), np.uint8), r"got shape \(40, 48\) dtype uint8: a grayscale image goes in as RGB"),
        (np.zeros((40, 48, 4), np.uint8), r"dtype uint8: an RGBA image goes in as its RGB channels"),
        (np.zeros((40, 48, 5), np.uint8), r"got shape \(40, 48, 5\) dtype uint8$"),
        # another dtype: how it goes in, judged by its values
        (np.full((40, 48, 3), 0.5), r"^images: numpy images must be uint8 \(H, W, 3\), got dtype float64: a 0\.\.1 "
                                    r"float image goes in as \(image \* 255\)\.round\(\)\.astype\(np\.uint8\)$"),
        ([np.full((40, 48, 3), 200.0, np.float32)], r"^images\[0\]: .*float32: a 0\.\.255 float image goes in as "
                                                   r"image\.round\(\)\.astype\(np\.uint8\)$"),
        (np.full((40, 48, 3), -1.5, np.float32), r"float32: a CLIP-normalised image goes in as one float \(B, 3, H, "
                                                 r"W\) torch tensor"),
        (np.full((40, 48, 3), np.nan, np.float32), r"float32: a CLIP-normalised image"),
        (np.full((40, 48, 3), 300.0), r"got dtype float64$"),
        (np.full((40, 48, 3), 7, np.int64), r"got dtype int64: its values fit 8 bits: image\.astype\(np\.uint8\)$"),
        (np.full((40, 48, 3), 4000, np.uint16), r"uint16: a 16-bit image goes in as its high byte, \(image >> 8\)"),
        (np.full((40, 48, 3), 4000, np.int32), r"got dtype int32$"),
        (np.full((40, 48, 3), True), r"got dtype bool$"),
    ],
)
def test_bad_images(model, images, match):
    with pytest.raises(ValueError, match=match):
        _engine(model).logits(images)


def test_uint8_inputs_keep_their_pixels_in_any_layout_and_group_by_height_and_width():
    """What as_batch makes of uint8 inputs, pixel for pixel: a numpy view with negative strides (OpenCV's BGR image
    reversed to RGB, ``image[:, :, ::-1]``, which torch.from_numpy refuses) or a read-only array is copied, not
    refused or warned of; a PIL image made in memory in 32-bit mode "I" keeps Pillow's values (only one opened from
    a file is 16-bit data, reduced to its high byte); and images are grouped by (height, width), never by one side
    alone (a group is stacked into one batch)."""
    from denseclip_fast.engine.inputs import as_batch

    bgr = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    frozen = bgr.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns of a read-only array (once a process)
        batch = as_batch([bgr[:, :, ::-1], bgr[::-1], frozen])
    assert np.array_equal(batch.raw[0].numpy(), bgr[:, :, ::-1]) and np.array_equal(batch.raw[1].numpy(), bgr[::-1])
    assert np.array_equal(batch.raw[2].numpy(), bgr) and batch.raw[2].data_ptr() != frozen.ctypes.data  # a copy
    grey = Image.fromarray(np.arange(30, dtype=np.int32).reshape(5, 6) * 8)
    assert grey.mode == "I"
    assert np.array_equal(as_batch(grey).raw[0][:, :, 1].numpy(), np.arange(30).reshape(5, 6) * 8)
    sizes = [(40, 44), (40, 50), (30, 44), (40, 44)]
    images = [np.zeros((h, w, 3), np.uint8) for h, w in sizes]
    assert as_batch(images).groups == [[0, 3], [1], [2]]


def test_pil_images_that_cannot_be_decoded_are_named(model, tmp_path):
    """A lazily opened, truncated file and a closed image: Pillow's OSError / ValueError without a name before."""
    path = tmp_path / "cut.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with Image.open(path) as truncated:
        with pytest.raises(ValueError, match=r"^images\[1\]: the PIL image \(mode RGB\) cannot be read as RGB: "):
            _engine(model).logits([Image.new("RGB", (40, 40)), truncated])
    closed = Image.open(path)
    closed.close()
    with pytest.raises(ValueError, match=r"^images: the PIL image \(mode RGB\) cannot be read as RGB: "):
        _engine(model).logits(closed)


def test_a_float_batch_within_0_to_1_is_warned_of(model):
    """Pixels scaled to 0..1 (torchvision's ToTensor) and passed as if CLIP-normalised run, but with a warning that
    names the likely mistake, from every public call that takes a float batch; a CLIP-normalised batch, a constant
    one (warmup's zeros) and any batch with check_finite=False are not warned of."""
    import warnings

    seg = _engine(model)
    unit = torch.rand(1, 3, 64, 64)
    calls = (seg.logits, seg.predict, lambda x: seg.open_vocab(x, ["cat"]), lambda x: seg.predict(x, ["cat", "dog"]))
    for call in calls:
        with pytest.warns(UserWarning, match=r"^images: a float batch within 0\.\.1 \(min .*, max .*\) looks like "
                                             r"pixels scaled to 0\.\.1") as caught:  # fmt: skip
            call(unit)
        assert [w.filename for w in caught] == [__file__]  # the caller's line
    normalised = (unit * 255 - 120) / 60
    below, above = unit.clone(), unit.clone()
    below[0, 1, 2, 3], above[0, 2, 3, 4] = -1e-3, 1.001  # one value past the range: not pixels scaled to 0..1
    quiet = (normalised, torch.zeros(1, 3, 64, 64), below, above)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in quiet:
            seg.logits(x)
        seg.warmup((64, 64), raw=False)
        _engine(model, check_finite=False).logits(unit)


def test_the_finite_check_can_be_turned_off(model):
    """check_finite=False skips the NaN/Inf scan (and its GPU synchronisation): NaN input gives NaN logits."""
    nan = torch.full((1, 3, 64, 64), float("nan"))
    seg = Segmenter(model, device="cpu", dtype=torch.float32, check_finite=False)
    assert torch.isnan(seg.logits(nan)).all()
    assert torch.isnan(seg.open_vocab(nan, ["cat"])).all()


def test_a_gpu_verdict_is_read_after_its_copy_has_arrived():
    """FiniteVerdict: a GPU batch's bounds are read once the event after their copy to the host has passed; bounds
    already on the host are read as they are."""
    from denseclip_fast.engine.segmenter import FiniteVerdict

    log = []

    class Bounds:
        def tolist(self):
            log.append("read")
            return [0.0, float("nan")]

    class Ready:
        def synchronize(self):
            log.append("waited")

    assert not FiniteVerdict(Bounds(), Ready()).finite() and log == ["waited", "read"]  # type: ignore[arg-type]
    assert FiniteVerdict(torch.tensor([-1.0, 2.0]), None).finite()
    assert not FiniteVerdict(torch.tensor([-1.0, 17.0]), None).finite()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_finite_scan_bounds_a_batch_by_its_minimum_and_maximum(dtype):
    """FiniteVerdict.scanned: one reduction's minimum and maximum in one buffer; the verdict takes ±MAX_INPUT
    themselves and refuses anything past them, NaN and infinities, wherever they are (first, last, in between)."""
    from denseclip_fast.engine.segmenter import MAX_INPUT, FiniteVerdict

    x = (torch.rand(2, 3, 7, 9, dtype=torch.float64) * 4 - 2).to(dtype)
    bounds = FiniteVerdict.scanned(x)
    assert bounds.dtype == dtype and bounds.tolist() == [x.min().item(), x.max().item()]
    assert FiniteVerdict(bounds, None).finite()
    for value, finite in [(MAX_INPUT, True), (-MAX_INPUT, True), (16.5, False), (-16.5, False),
                          (float("nan"), False), (float("inf"), False), (float("-inf"), False)]:  # fmt: skip
        for where in (0, x.numel() // 2, x.numel() - 1):
            bad = x.clone()
            bad.view(-1)[where] = value
            assert FiniteVerdict(FiniteVerdict.scanned(bad), None).finite() == finite, (value, where)


def test_bad_vocabularies_and_settings(model):
    seg = _engine(model)
    with pytest.raises(ValueError, match=r"exactly 4 names .* got 0 names; seg\.open_vocab\(images, names\) and "
                                         r"seg\.predict\(images, names\) score any number of names$"):
        seg.set_classes([])
    with pytest.raises(ValueError, match="'a very long class name' has 5 BPE tokens"):
        seg.set_classes(["sky", "road", "tree", "a very long class name"])
    with pytest.raises(ValueError, match="must not be empty"):
        seg.open_vocab(torch.randn(1, 3, 64, 64), [])
    with pytest.raises(ValueError, match="class name 0 must be a string, got list"):
        seg.open_vocab(torch.randn(1, 3, 64, 64), [["cat"]])
    with pytest.raises(ValueError, match="sequence of strings, got str"):
        seg.open_vocab(torch.randn(1, 3, 64, 64), "cat")
    message = "crop must be an int >= 32 (the stride-32 level keeps a pixel), got True"
    with pytest.raises(ValueError, match=re.escape(message)):
        Segmenter(model, device="cpu", crop=True)
    with pytest.raises(ValueError, match="crop must be an int >= 32"):
        Segmenter(model, device="cpu", mode="slide", crop=16, stride=8)
    with pytest.raises(ValueError, match="stride must be an int >= 1, got (np.)?True"):  # np.bool_ is no int
        Segmenter(model, device="cpu", stride=np.bool_(True))
    with pytest.raises(ValueError, match="capture_after must be an int >= 1, got 2.0"):
        Segmenter(model, device="cpu", capture_after=2.0)
    sized = Segmenter(model, device="cpu", mode="slide", crop=np.int64(64), stride=np.int32(40),
                      capture_after=np.int64(1))  # numpy's integers are ints: taken as plain ints  # fmt: skip
    assert (type(sized.crop), type(sized.stride), type(sized._graphs.capture_after)) == (int, int, int)
    sized.warmup((np.int64(64), np.uint16(70)), batch=np.int8(1), raw=np.False_)
    flags = Segmenter(model, device="cpu", cuda_graphs=np.False_, check_finite=np.bool_(False))  # numpy's bools too
    assert flags.check_finite is False and flags._graphs.enabled is False
    for flag in ("cuda_graphs", "check_finite"):
        with pytest.raises(ValueError, match=f"^{flag} must be True or False, got 0$"):  # an int is still no bool
            Segmenter(model, device="cpu", **{flag: 0})
    with pytest.raises(ValueError, match="stride must not exceed crop.*stride=100 and crop=64"):
        Segmenter(model, device="cpu", mode="slide", crop=64, stride=100)
    # a crop without a stride slides by two thirds of it (the architecture's stride was kept: past a smaller crop,
    # refused for a stride not given; barely overlapping a larger one); the architecture's crop keeps its stride
    config = model.config
    assert Segmenter(model, device="cpu").stride == config.slide_stride
    assert Segmenter(model, device="cpu", crop=config.slide_crop).stride == config.slide_stride
    for crop in (32, config.slide_stride - 1, 4 * config.slide_crop):
        assert Segmenter(model, device="cpu", crop=crop).stride == 2 * crop // 3
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        Segmenter(model, device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match=re.escape("got the string 'float32' (pass torch.float32)")):
        Segmenter(model, device="cpu", dtype="float32")  # printed bare, it read as one of the allowed values
    with pytest.raises(ValueError, match=re.escape("got the string 'fp32'")):
        Segmenter(model, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match=re.escape("got the string 'float64'") + "$"):  # nothing to pass instead
        Segmenter(model, device="cpu", dtype="float64")
    with pytest.raises(ValueError, match=re.escape("got torch.float64")):
        Segmenter(model, device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="mode must be 'whole' or 'slide'"):
        Segmenter(model, device="cpu", mode="tiles")
    with pytest.raises(ValueError, match="must be a denseclip_fast.DenseCLIP"):
        Segmenter(torch.nn.Linear(2, 2), device="cpu")
    with pytest.raises(ValueError, match="sequence of strings, got NoneType"):
        seg.set_classes(None)
    with pytest.raises(ValueError, match="sequence of strings, got generator"):
        seg.set_classes(name for name in ["sky", "road", "tree", "car"])
    with pytest.raises(ValueError, match=r"class name 2 \('sky'\) repeats class name 0"):
        seg.open_vocab(torch.randn(1, 3, 64, 64), ["sky", "road", "sky"])
    with pytest.raises(ValueError, match=r"class name 1 \('sky'\) repeats class name 0"):
        model.open_vocab_scores(torch.randn(1, 3, 64, 64), ["sky", "sky"])
    # names that differ as strings but tokenise alike (the BPE lowercases, collapses whitespace) are one class too
    with pytest.raises(ValueError, match=r"class name 2 \('Sky '\) has the same BPE tokens as class name 0 \('sky'\)"):
        seg.open_vocab(torch.randn(1, 3, 64, 64), ["sky", "road", "Sky "])
    with pytest.raises(ValueError, match=r"class name 1 \('SKY'\) has the same BPE tokens as class name 0"):
        model.open_vocab_scores(torch.randn(1, 3, 64, 64), ["sky", "SKY"])
    with pytest.raises(ValueError, match=r"class name 1 \('&'\) .* \('&amp;'\): CLIP's tokenizer unescapes HTML"):
        model.open_vocab_scores(torch.randn(1, 3, 64, 64), ["&amp;", "&"])
    seg.set_classes(["sky", "road", "Sky", "car"])  # a trained head's classes may share a name, or its tokens
    seg.set_classes(["sky", "road", "sky", "car"])
    assert seg.class_names == ["sky", "road", "sky", "car"]
    with pytest.raises(ValueError, match="holds CLIP's start or end-of-text token"):
        seg.open_vocab(torch.randn(1, 3, 64, 64), ["<end_of_text> cat", "<end_of_text> dog"])
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype float64"):
        seg.overlay(np.zeros((4, 6, 3), np.uint8), np.full((4, 6), 1.7))
    image, labels = np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6), np.int64)
    for alpha, shown in (("0.5", "str '0.5'"), (float("nan"), "float nan"), (1.5, "float 1.5"), (True, "bool True")):
        with pytest.raises(ValueError, match=re.escape(f"alpha must be a real number in [0, 1], got {shown}")):
            seg.overlay(image, labels, alpha=alpha)
    assert seg.overlay(image, labels, alpha=np.float32(0.0)).max() == 0  # a numpy number is a real number too
    for images in ([image, image], torch.zeros(1, 3, 4, 6)):  # two images; a CLIP-normalised (float) batch
        with pytest.raises(ValueError, match=re.escape("overlay takes one uint8 (H, W, 3) image")):
            seg.overlay(images, labels)
    for device in ("gpu", "", None, "meta", torch.device("meta")):
        with pytest.raises(ValueError, match=f"device must be a .*such as 'cpu'.*got {re.escape(repr(device))}"):
            Segmenter(model, device=device)
    for name in ("cuda_graphs", "check_finite"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            Segmenter(model, device="cpu", **{name: "no"})
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1, got 'x'"):
        Segmenter(model, device="cpu", max_graphs="x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            Segmenter(model, device="cuda")


def test_batchnorm_folding_keeps_the_function():
    model = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    folded = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        count = fold_batchnorm(model)
        assert count == 3 + 4 * 3 + 4 + 7  # stem, 4 bottlenecks, 4 shortcuts, 1 + 1 + 2 + 3 head blocks
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert rel_err(model(x), expected) < 1e-5
        vit = randomized(DenseCLIP(tiny_config("vit"), NAMES)).eval()
        expected = vit(x)
        assert fold_batchnorm(vit) == 1 + 7  # the ConvTranspose-BN of the pyramid, the head
        assert rel_err(vit(x), expected) < 1e-5
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(folded.train())


def test_a_folded_model_is_not_saved_as_a_checkpoint(tmp_path):
    """A Segmenter's model (BatchNorms folded away) would save a file load_checkpoint cannot read back (missing
    keys): save refuses it, saying what to save instead; the model the Segmenter was built from saves and loads;
    a module folding found nothing in is not marked."""
    model = randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()
    seg = _engine(model)
    with pytest.raises(ValueError, match=r"BatchNorms are folded .* save the model the Segmenter was built from"):
        seg.model.save(tmp_path / "engine.safetensors")
    assert not (tmp_path / "engine.safetensors").exists()
    model.save(tmp_path / "model.safetensors")
    loaded = dcf.load_checkpoint(tmp_path / "model.safetensors")
    assert rel_err(_engine(loaded).logits(x := torch.randn(1, 3, 64, 64)), seg.logits(x)) == 0
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    assert fold_batchnorm(plain) == 0 and not hasattr(plain, "_batchnorm_folded")


@pytest.mark.parametrize("batch", [1, 2])
def test_the_cpu_engines_vit_pyramid_takes_channels_last_maps_and_the_model_keeps_nchw(batch):
    """channels_last_pyramid: the CPU engine's ViT pyramid adapters get channels_last token maps (and give
    channels_last levels), the same function (1e-6 against the NCHW maps, whole and slide); the user's model keeps
    the official NCHW maps; a ResNet model has no such maps."""
    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config("vit"), NAMES)).eval()
    x = torch.randn(batch, 3, 64, 80)
    with torch.no_grad():
        whole, slide = model(x), model.slide_inference(x, crop=64, stride=40)
    for mode, expected in (("whole", whole), ("slide", slide)):
        seg = _engine(model, mode=mode)
        assert seg.model.backbone.pyramid_channels_last is True
        assert rel_err(seg.logits(x), expected) < 1e-6
    assert model.backbone.pyramid_channels_last is False
    buffer = io.BytesIO()  # the engine's model saves with torch.save (a memory format would not)
    torch.save(seg.model, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).backbone.pyramid_channels_last is True
    with torch.no_grad():
        levels = seg.model.backbone(x.contiguous(memory_format=torch.channels_last)).levels
        official = model.backbone(x).levels
    assert all(level.is_contiguous(memory_format=torch.channels_last) for level in levels)
    assert all(level.is_contiguous() for level in official)
    resnet = _engine(randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval())
    assert not hasattr(resnet.model.backbone, "pyramid_channels_last")


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_folding_grouped_and_transposed_convolutions(groups, transposed):
    """fold_batchnorm on any module's conv-BN pairs: a grouped ConvTranspose2d (weight (in, out / groups, k, k))
    raised a size mismatch; with and without bias, an affine-free BatchNorm and its own eps."""
    torch.manual_seed(groups)
    kind = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    for bias, affine in ((False, True), (True, False)):
        conv = kind(8, 12, 3, stride=2, groups=groups, bias=bias)
        bn = torch.nn.BatchNorm2d(12, eps=1e-3, affine=affine)
        randomized(bn)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        net = torch.nn.Sequential(conv, bn).eval()
        x = torch.randn(2, 8, 9, 7)
        with torch.no_grad():
            expected = net(x)
            assert fold_batchnorm(net) == 1 and isinstance(net[1], torch.nn.Identity)
            assert rel_err(net(x), expected) < 1e-5


# ------------------------------------------------------------------------------------------------ graph cache


def static_input_replay(fn, example):
    """A replay as CapturedForward's: the call's input copied into a static input (converted to its dtype and
    layout by the copy), then the function of that input."""
    static = example.clone()
    return lambda x: fn(static.copy_(x))


class FakeCapture:
    """Stands in for a CUDA graph on CPU: records what was captured and replays by calling the function on a static
    input (static_input_replay)."""

    def __init__(self) -> None:
        self.captured: list[tuple[int, ...]] = []

    def __call__(self, fn, example, pool):
        self.captured.append(tuple(example.shape))
        return static_input_replay(fn, example)


def test_graph_cache_captures_each_shape_once_and_evicts():
    calls = []
    fn = lambda x: (calls.append(tuple(x.shape)), x * 2)[1]  # noqa: E731
    capture = FakeCapture()
    cache = GraphCache(fn, enabled=True, capture=capture, max_graphs=2, capture_after=1)
    a, b, c = torch.ones(1, 3), torch.ones(2, 3), torch.ones(3, 3)
    assert torch.equal(cache(a), a * 2) and torch.equal(cache(a), a * 2)
    cache(b)
    assert capture.captured == [(1, 3), (2, 3)] and cache.captures == 2
    cache(a)  # a is now the most recent: c evicts b
    cache(c)
    assert list(cache.graphs) == [((1, 3), torch.float32, torch.device("cpu"), (3, 1)),
                                  ((3, 3), torch.float32, torch.device("cpu"), (3, 1))]  # fmt: skip
    cache(b)
    assert capture.captured[-1] == (2, 3) and cache.captures == 4
    cache(a.t().contiguous().t())  # same shape, other strides: a graph of its own
    assert cache.captures == 5
    disabled = GraphCache(fn, enabled=False, capture=capture)
    disabled(a)
    assert disabled.captures == 0
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        GraphCache(fn, max_graphs=0)
    with pytest.raises(ValueError, match="capture_after must be an int >= 1"):
        GraphCache(fn, capture_after=0)
    for most in (1001, 10**30):  # Segmenter.warmup runs capture_after forwards: 10**30 was a warmup without end
        with pytest.raises(ValueError, match=re.escape(f"capture_after must be at most 1000 (warmup runs that many "
                                                       f"forwards to capture a shape; cuda_graphs=False captures "
                                                       f"none), got {most}")):  # fmt: skip
            GraphCache(fn, capture_after=most)
    assert GraphCache(fn, capture_after=1000).capture_after == 1000


def test_graph_cache_converts_an_input_in_the_copy_to_its_static_input():
    """With a layout (dtype, memory format) the cache keys a call by the converted signature and hands the
    replay x as it is, for the copy into the static input to convert (no converted x made first); an eager call and
    the capture convert it; the values are those of converting first."""
    seen = []
    fn = lambda x: (seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last))), x * 2)[1]  # noqa: E731
    replays = []

    def capture(f, example, pool):
        replay = static_input_replay(f, example)
        return lambda x: replays.append(x) or replay(x)

    cache = GraphCache(fn, enabled=True, capture=capture, capture_after=2)
    layout = (torch.bfloat16, torch.channels_last)
    x = torch.randn(2, 3, 5, 7)
    want = x.to(torch.bfloat16, memory_format=torch.channels_last) * 2
    for _ in range(3):  # eager, captured, replayed
        assert torch.equal(cache(x, layout), want)
    assert seen == [(torch.bfloat16, True)] * 3  # the eager call, then two replays' static input
    assert len(replays) == 2 and all(r is x for r in replays)  # (the capture call replays x too)
    assert list(cache.graphs) == [((2, 3, 5, 7), torch.bfloat16, torch.device("cpu"), torch.channels_last)]
    assert torch.equal(cache(x.contiguous(memory_format=torch.channels_last), layout), want)  # the same graph
    assert len(cache.graphs) == 1 and len(replays) == 3
    off = GraphCache(fn, enabled=False)
    assert torch.equal(off(x, layout), want) and seen[-1] == (torch.bfloat16, True)


def test_graph_cache_captures_a_shape_when_it_comes_back():
    """The default: a shape's first call runs eagerly, its second is captured (and replayed from then on), so sizes
    that never repeat cost no capture; the count of first sightings is bounded."""
    calls = []
    fn = lambda x: (calls.append(tuple(x.shape)), x * 2)[1]  # noqa: E731
    capture = FakeCapture()
    cache = GraphCache(fn, enabled=True, capture=capture, max_graphs=2)
    a, b = torch.ones(1, 3), torch.ones(2, 3)
    assert torch.equal(cache(a), a * 2) and capture.captured == [] and calls == [(1, 3)]
    cache(b)
    assert capture.captured == [] and cache.captures == 0
    cache(a)
    assert capture.captured == [(1, 3)] and cache.captures == 1
    cache(a)
    assert cache.captures == 1 and calls == [(1, 3), (2, 3), (1, 3), (1, 3)]  # replays call fn here (FakeCapture)
    for n in range(3, 30):  # ever-new sizes: eager, never captured, and at most 4 x max_graphs remembered
        cache(torch.ones(n, 3))
    assert cache.captures == 1 and len(cache.sightings) == 8


def test_calls_on_cuda_queue_their_work_after_the_previous_calls(model, monkeypatch):
    """The lock orders the host side only: threads on streams of their own could run two calls on the GPU at once
    (one replay overwriting the static buffers another still reads). Each call's stream waits for an event recorded
    after the previous call's work, and records its own. Stand-ins for the stream and the events on CPU."""
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            log.append((self.name, "waits for", event.recorded_on))

    class Event:
        def __init__(self):
            self.recorded_on = None

        def record(self, stream):
            self.recorded_on = stream.name
            log.append((stream.name, "records"))

    seg = _engine(model)
    seg.device = torch.device("cuda")  # only _turn reads it here
    streams = iter([Stream("first"), Stream("second"), Stream("third")])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: next(streams))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    for _ in range(3):
        with seg._turn():
            log.append("work")
    assert log == ["work", ("first", "records"), ("second", "waits for", "first"), "work", ("second", "records"),
                   ("third", "waits for", "second"), "work", ("third", "records")]  # fmt: skip


def test_a_failed_capture_runs_that_shape_eagerly_and_says_so_once():
    """A capture that raised (out of memory during the capture, an operation a graph cannot hold) raised from the
    engine's call, and was tried again on every later call of that shape. It is said once; the shape runs eagerly."""
    attempts = []

    def failing(fn, example, pool):
        attempts.append(tuple(example.shape))
        if example.shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return lambda x: fn(x)

    cache = GraphCache(lambda x: x * 2, enabled=True, capture=failing, capture_after=1)
    a, b = torch.ones(1, 3), torch.ones(2, 3)
    with pytest.warns(dcf.EngineFallbackWarning, match=r"^capturing a CUDA graph for inputs of shape \(2, 3\) "
                                                     r"\(torch.float32\) failed, so that shape runs eagerly from now "
                                                     r"on: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                                     r"2.00 GiB$"):  # fmt: skip
        assert torch.equal(cache(b), b * 2)
    # a category of its own (a pipeline can make it an error), still a RuntimeWarning for filters written before it
    assert issubclass(dcf.EngineFallbackWarning, RuntimeWarning) and "EngineFallbackWarning" in dcf.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        for _ in range(3):
            assert torch.equal(cache(b), b * 2) and torch.equal(cache(a), a * 2)
    assert attempts == [(2, 3), (1, 3)] and cache.captures == 1
    cache.clear()  # tried again after a clear (memory freed, the model changed)
    with pytest.warns(RuntimeWarning):
        cache(b)
    assert attempts[-1] == (2, 3)


def test_the_graphs_static_output_is_read_before_the_next_replay(model):
    """A captured graph writes every replay into one output buffer, which whole mode's finish reads (the resizes
    after the network): two groups of uint8 images of other sizes but the same network input (so the same graph),
    and normalised batches, give what an engine without graphs gives, and returned logits stay as they were after
    the next call."""

    class Static:  # a capture as a CUDA graph's replay behaves: its output always in one buffer
        def __init__(self, fn, example, pool):
            self.replay, self.out = static_input_replay(fn, example), fn(example).clone()

        def __call__(self, x):
            return self.out.copy_(self.replay(x))

    reference = _engine(model, mode="whole")
    seg = _engine(model, mode="whole")
    seg._graphs = GraphCache(seg._forward, enabled=True, capture=Static, capture_after=1)
    test_scale = model.config.test_scale
    short = min(test_scale)
    sizes = [(short // 5, max(test_scale) - d) for d in (2, 5)]  # fitted to the longer side: one network input
    assert len({keep_ratio_size(h, w, test_scale) for h, w in sizes}) == 1 and sizes[0] != sizes[1]
    rng = np.random.default_rng(8)
    images = [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for size in sizes]  # two groups of one
    for call in ("logits", "predict"):
        got, expected = getattr(seg, call)(images), getattr(reference, call)(images)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), call
    assert seg.captured_graphs == 1  # both groups replayed it
    x = torch.randn(2, 3, 64, 96)
    for call in ("logits", "predict"):
        assert torch.equal(getattr(seg, call)(x), getattr(reference, call)(x)), call
    first = seg.logits(x)
    kept = first.clone()
    seg.logits(torch.randn(2, 3, 64, 96))
    assert torch.equal(first, kept)


def test_segmenter_routes_every_forward_through_the_graph_cache(model):
    seg = _engine(model, mode="slide")
    capture = FakeCapture()
    seg._graphs = GraphCache(seg._forward, enabled=True, capture=capture, capture_after=1)
    x = torch.randn(1, 3, 70, 100)
    first = seg.logits(x)
    assert torch.equal(seg.logits(x), first)
    assert capture.captured == [(4, 3, 64, 64)]  # all 2 x 2 crops of the image in one forward, captured once
    seg.logits(torch.randn(1, 3, 64, 64))
    assert capture.captured[-1] == (1, 3, 64, 64)
    assert seg.captured_graphs == 2
    assert Segmenter(model, device="cpu", dtype=torch.float32).captured_graphs == 0  # no capture on CPU


def test_whole_mode_hands_the_graphs_its_batch_unconverted(model):
    """Whole mode's batch goes to the graph cache as the caller gave it (on the device), with the engine's dtype
    and layout for the copy into the static input to convert to: the replay reads the caller's tensor; the logits
    are those of an engine without graphs."""
    reference = _engine(model, mode="whole")
    seg = _engine(model, mode="whole")
    replays = []

    def capture(fn, example, pool):
        assert example.is_contiguous(memory_format=torch.channels_last) and example.dtype == seg.dtype
        replay = static_input_replay(fn, example)
        return lambda x: replays.append(x) or replay(x)

    seg._graphs = GraphCache(seg._forward, enabled=True, capture=capture, capture_after=1)
    x = torch.randn(2, 3, 64, 96)
    assert torch.equal(seg.logits(x), reference.logits(x)) and torch.equal(seg.logits(x), reference.logits(x))
    assert len(replays) == 2 and all(r is x for r in replays)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_warmup_captures_the_shapes_a_size_will_run(model, mode, monkeypatch):
    """warmup((h, w), batch) leaves captured the graphs that calls with images of that size then replay (raw uint8
    images: the shape after the keep-ratio resize; slide: the batched crops), after capture_after calls."""
    seg = _engine(model, mode=mode)
    eager: list[tuple[int, ...]] = []
    captured: list[tuple[int, ...]] = []
    forward = seg._forward

    def capture(fn, example, pool):
        captured.append(tuple(example.shape))
        return static_input_replay(forward, example)  # a replay: not through the eager path below

    seg._graphs = GraphCache(lambda x: eager.append(tuple(x.shape)) or forward(x), enabled=True, capture=capture,
                             capture_after=3)  # fmt: skip
    from denseclip_fast.engine import segmenter

    sizes = []
    resized = segmenter.resized
    monkeypatch.setattr(segmenter, "resized", lambda scores, size, out=None: sizes.append((size, out is not None))
                        or resized(scores, size, out))  # fmt: skip
    seg.warmup((50, 60), batch=2)  # uint8: resized to fit the tiny config's test scale
    assert len(captured) == 1 and eager == captured * 2  # two eager calls of the shape, then its capture
    # the scores go where predict's go: a chunk of classes at a time, into its buffers (never all the classes'
    # full-size scores: a photo's would take gigabytes), to the network's input size, then to the images'
    resizes = [(tuple(size), into) for size, into in sizes if size is not None]
    if mode == "whole":
        assert resizes == [(eager[0][2:], True), ((50, 60), True)] * 3, (resizes, eager)
    else:  # each batch of windows to the crop (at once, as logits), the accumulated scores to the images' size
        assert resizes[-1] == ((50, 60), True) and all(into for size, into in resizes if size == (50, 60))
    seg.logits(torch.randint(0, 256, (2, 50, 60, 3), dtype=torch.uint8))
    assert len(captured) == 1 and len(eager) == 2  # replayed
    seg.warmup((64, 64), raw=False)
    assert captured[-1] == (1, 3, 64, 64) and len(eager) == 4  # one 64 x 64 window in slide mode
    seg.logits(torch.randn(1, 3, 64, 64))
    assert len(captured) == 2 and len(eager) == 4
    cpu = _engine(model, mode=mode)  # no CUDA graphs (a CPU engine): one call does it
    cpu._graphs.fn = lambda x: eager.append(tuple(x.shape)) or forward(x)
    cpu.warmup((64, 64), raw=False)
    assert len(eager) == 5


def test_warmup_with_names_warms_the_open_vocabulary(model, monkeypatch):
    """warmup(size, names=...) computes and caches that vocabulary's embeddings by one open-vocabulary forward of the
    size (not through the trained head's graphs), so that open_vocab and predict with those names embed nothing."""
    seg = _engine(model)
    trained: list[tuple[int, ...]] = []
    forward = seg._forward
    seg._graphs.fn = lambda x: trained.append(tuple(x.shape)) or forward(x)
    embedded: list[tuple[str, ...]] = []
    embed = seg._embed
    monkeypatch.setattr(seg, "_embed", lambda names, distinct=False: embedded.append(tuple(names)) or
                        embed(names, distinct))  # fmt: skip
    backbone_inputs: list[tuple[int, ...]] = []
    hook = seg.model.backbone.register_forward_pre_hook(lambda _, args: backbone_inputs.append(tuple(args[0].shape)))
    names = ["sky", "road", "a tree"]
    seg.warmup((50, 60), batch=2, names=names)
    assert embedded == [tuple(names)] and trained == []
    assert len(backbone_inputs) == 1 and backbone_inputs[0][0] == 2  # one forward of the batch
    images = torch.randint(0, 256, (2, 50, 60, 3), dtype=torch.uint8)
    scores = seg.open_vocab(images, names)
    seg.predict(images, names)
    assert embedded == [tuple(names)] and scores.shape == (2, 3, 50, 60)
    assert backbone_inputs[1] == backbone_inputs[0]  # the warmed shape is the one the call ran
    hook.remove()
    with pytest.raises(ValueError, match="names"):
        seg.warmup((64, 64), names=[])
    with pytest.raises(ValueError, match="names"):
        seg.warmup((64, 64), names=["sky", "sky"])


def test_warmup_refuses_what_logits_would(model):
    seg = _engine(model)
    for size, match in [((64,), r"size must be \(height, width\)"), ("64x64", "size must be"),
                        ((0, 64), r"size\[0\] \(height\) must be an int >= 1"),
                        ((64, 64.0), r"size\[1\] \(width\) must be an int"),
                        ((1, 4000), "too elongated")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            seg.warmup(size)
    with pytest.raises(ValueError, match="size must be at least"):
        seg.warmup((8, 64), raw=False)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        seg.warmup((64, 64), batch=0)
    with pytest.raises(ValueError, match="raw must be True or False"):
        seg.warmup((64, 64), raw="no")
    seg.warmup(np.array([64, 80]), raw=False)  # an image's shape[:2] from numpy, or a tensor's
    seg.warmup(torch.tensor([64, 80]), raw=False)
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        seg.warmup(np.array([64, 80, 3]))
    # past int64 (torch's "Overflow when unpacking long"), past any storage: named, with torch's reason
    for size, batch in (((64, 80), 10**30), ((10**30, 10**30), 1), ((10**12, 10**12), 1)):
        with pytest.raises(ValueError, match=re.escape(f"size {size} and batch {batch}: a blank batch of that size "
                                                       "cannot be made here (")):  # fmt: skip
            seg.warmup(size, batch, raw=False)


def test_a_model_or_labels_without_values_are_refused(model):
    """A model built on the meta device (weights not loaded) and meta or sparse labels met torch's own errors
    ("Cannot copy out of meta tensor")."""
    with torch.device("meta"):
        empty = DenseCLIP(model.config, model.class_names)
    with pytest.raises(ValueError, match=r"model's weights are on the meta device \(built without values\)"):
        Segmenter(empty, device="cpu", dtype=torch.float32)
    seg, image = _engine(model), np.zeros((8, 10, 3), np.uint8)
    for labels, kind in [(torch.zeros(8, 10, dtype=torch.long, device="meta"), "meta"),
                         (torch.zeros(8, 10, dtype=torch.long).to_sparse(), "sparse")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"labels must be a dense tensor with values, got a {kind} tensor"):
            seg.overlay(image, labels)


def test_a_model_with_nan_or_infinite_weights_is_refused(model):
    """A model whose weights hold NaN (a training run that diverged) gives NaN logits; the bfloat16 CPU engine's
    fused convolutions (oneDNN's ReLU turns NaN into 0) gave finite, meaningless logits from it without a word."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.decode_head.scale_heads[0][0].conv.weight[0, 0, 0, 0] = float("nan")  # a conv a ReLU follows
        x = torch.randn(1, 3, 64, 64) * 0.5
        assert broken(x).isnan().all()  # what the model says
    for dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(ValueError, match=r"^model's weights hold NaN or infinite values \(1 tensors: "
                                             r"decode_head\.scale_heads\.0\.0\.conv\.weight\)"):  # fmt: skip
            Segmenter(broken, device="cpu", dtype=dtype)
    infinite = copy.deepcopy(model)
    with torch.no_grad():
        infinite.contexts[0, 0, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"\(1 tensors: contexts\)"):
        Segmenter(infinite, device="cpu", dtype=torch.bfloat16)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_pruned_and_parametrized_weights_are_folded_as_the_model_computes_them(model):
    """A weight that PyTorch recomputes at every forward (torch.nn.utils.prune's mask, a parametrization such as
    parametrizations.weight_norm or spectral_norm, the older weight_norm and spectral_norm hooks) lost its BatchNorm
    fold: the engine wrote the folded weight into ``conv.weight``, which the module recomputed from the original at
    its next call, the BatchNorm gone (float32 logits 2% off without a word; the bfloat16 engine failed). The user's
    model keeps its reparametrizations (parametrize's own removal would take the property off the class the copy
    shares with it)."""
    from torch.nn.utils import prune, spectral_norm, weight_norm
    from torch.nn.utils.parametrizations import spectral_norm as parametrized_spectral_norm
    from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm

    x = torch.randn(1, 3, 64, 64)
    for reparametrize in (lambda conv: prune.l1_unstructured(conv, "weight", amount=0.3), parametrized_weight_norm,
                          weight_norm, spectral_norm, parametrized_spectral_norm):  # fmt: skip
        changed = copy.deepcopy(model)
        reparametrize(changed.decode_head.scale_heads[0][0].conv)  # a conv its BatchNorm is folded into
        with torch.no_grad():
            expected = changed(x)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            assert rel_err(_engine(changed, mode="whole", dtype=dtype).logits(x), expected) < tolerance
        with torch.no_grad():
            assert torch.equal(changed(x), expected)  # the user's model as it was


class StaticBufferCapture:
    """Like a CUDA graph: every replay writes into the same output buffer."""

    def __call__(self, fn, example, pool):
        out, run = fn(example), static_input_replay(fn, example)

        def replay(x):
            out.copy_(run(x))
            return out

        return replay


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_results_never_alias_a_replayed_buffer(model, mode):
    seg = _engine(model, mode=mode)
    seg._graphs = GraphCache(seg._forward, enabled=True, capture=StaticBufferCapture())
    x, y = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    first = seg.logits(x)
    kept = first.clone()
    second = seg.logits(y)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    with torch.no_grad():
        expected = model(x) if mode == "whole" else model.slide_inference(x, seg.crop, seg.stride)
    assert rel_err(first, expected) < 1e-4


@pytest.mark.slow
def test_released_rn50_engine_equals_model():
    model = DenseCLIP.from_arch("RN50", ["sky", "road", "tree"]).eval()
    randomized(model)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = model(x)
    assert rel_err(Segmenter(model, device="cpu", dtype=torch.float32).logits(x), expected) < 1e-4
    assert dcf.Segmenter is Segmenter


def test_no_tf32_is_process_wide_and_restores_on_the_last_exit():
    """The TF32 switches are process-wide: a block that ends while another (another thread's engine) is still
    inside must not switch TF32 back on; the settings come back when the last one ends. With torch's
    fp32_precision settings in use, the legacy allow_tf32 flags raise when read, so the engine must not read them."""
    from denseclip_fast.engine import segmenter

    saved = segmenter._tf32_settings()
    off = ("ieee", "ieee", "ieee", False)
    try:
        on = ("tf32", "tf32", "tf32", True)
        segmenter._set_tf32(on)  # a user who chose TF32 through the fp32_precision settings
        first, second = segmenter.no_tf32(), segmenter.no_tf32()
        first.__enter__()
        second.__enter__()
        assert segmenter._tf32_settings() == off
        first.__exit__(None, None, None)
        assert segmenter._tf32_settings() == off  # the other block still runs in IEEE float32
        second.__exit__(None, None, None)
        assert segmenter._tf32_settings() == on
        with segmenter.no_tf32(active=False):
            assert segmenter._tf32_settings() == on
    finally:
        segmenter._set_tf32(saved)


def test_no_tf32_leaves_cudnns_legacy_flag_readable():
    """Inside no_tf32, torch's own reads of cuDNN's legacy allow_tf32 flag work: torch.backends.cudnn.flags() (which
    torch.export's tracing enters) raised "cuDNN conv and cuDNN RNN have different TF32 flags" when only the
    convolutions' setting changed (an AOTInductor export of a float32 Segmenter on an H200, inside the GPU tests'
    no_tf32). The settings come back as they were, the legacy flag included."""
    from denseclip_fast.engine import segmenter

    saved = segmenter._tf32_settings()
    try:
        for user in (saved, ("tf32", "tf32", "tf32", True), ("ieee", "ieee", "ieee", False)):
            segmenter._set_tf32(user)  # what torch starts with, a user's TF32, a user's IEEE float32
            with segmenter.no_tf32():
                assert torch.backends.cudnn.allow_tf32 is False
                with torch.backends.cudnn.flags(enabled=False):  # what torch.export enters (it raised)
                    pass
                # torch restores the flag it read, False (resetting both settings to "none": IEEE, as nothing
                # above them asks for TF32): still no TF32 inside the block
                assert torch.backends.cudnn.allow_tf32 is False
                assert torch.backends.cudnn.conv.fp32_precision in ("ieee", "none")
            assert segmenter._tf32_settings() == user
        segmenter._set_tf32(("ieee", "none", "ieee", True))  # a program whose own settings disagree with the flag
        assert segmenter._tf32_settings()[3] is None  # (reading it raises)
        with segmenter.no_tf32():
            assert segmenter._tf32_settings() == ("ieee", "ieee", "ieee", False)
        assert segmenter._tf32_settings() == ("ieee", "none", "ieee", False)  # its settings back, the flag False
    finally:
        segmenter._set_tf32(saved)


def test_results_are_ordinary_tensors(model):
    """What the engine returns can be edited in place and used in autograd, as any tensor: not inference tensors
    (torch.inference_mode's, which refuse both with a RuntimeError outside it)."""
    seg = _engine(model)
    images = torch.randint(0, 256, (1, 40, 56, 3), dtype=torch.uint8)
    logits, labels = seg.logits(images), seg.predict(images)
    scores, open_labels = seg.open_vocab(images, ["cat", "dog"]), seg.predict(images, ["cat", "dog"])
    for out in (logits, labels, scores, open_labels):
        assert isinstance(out, torch.Tensor) and not out.is_inference() and not out.requires_grad
    labels[labels == 0] = 1  # in place
    before = logits.clone()
    logits.add_(1.0)
    weight = torch.ones(1, requires_grad=True)
    (scores * weight).sum().backward()  # saved for backward
    assert weight.grad is not None and torch.allclose(weight.grad, scores.sum().reshape(1))
    assert torch.equal(seg.logits(images), before)  # and the edit reached no buffer the engine reuses


def test_a_segmenter_built_in_a_threads_autocast_region_is_the_one_built_outside(model):
    """The CPU engine's oneDNN probes are asked once for the process, first when a Segmenter is built: built inside
    a thread's CPU autocast region, they said no (the float32 results they compare with came out bfloat16), and that
    engine and every one built after it, in any thread, took PyTorch's linear layers and convolutions instead
    (slower, and other sums: logits 1e-6 off). Each engine here equals the one built before, bit for bit."""
    from denseclip_fast.engine import cpu_conv, cpu_linear

    probes = (cpu_linear.onednn_linear_usable, cpu_linear.onednn_swish_usable, cpu_linear.onednn_bfloat16_usable,
              cpu_conv.onednn_conv_usable)  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    expected = {dtype: _engine(model, dtype=dtype).logits(x) for dtype in (torch.float32, torch.bfloat16)}
    built: dict[torch.dtype, Segmenter] = {}

    def build() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for dtype in expected:
                built[dtype] = _engine(model, dtype=dtype)

    for probe in probes:
        probe.cache_clear()
    try:
        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
        for dtype, logits in expected.items():
            assert torch.equal(built[dtype].logits(x), logits), dtype
            assert torch.equal(_engine(model, dtype=dtype).logits(x), logits), dtype  # built outside, afterwards
    finally:
        for probe in probes:
            probe.cache_clear()


def test_a_callers_autocast_does_not_reach_the_engine(model):
    """The engine computes in its own dtype: called inside the caller's bfloat16 autocast region, a float32 engine
    gives its float32 logits."""
    seg = _engine(model)
    x = torch.randn(1, 3, 64, 64)
    expected = seg.logits(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(seg.logits(x), expected)


def test_graph_cache_forgets_the_least_recently_seen_shapes_first():
    """The sightings of shapes not captured yet are kept least recently seen first (4 x max_graphs of them): a
    shape seen again moves to the end, and a new shape seen while they are full is kept (the oldest goes), so that
    it is captured when it comes back. Mutants: ``sightings.get`` for ``pop`` (a shape seen again kept its old
    place and was forgotten first), ``popitem(last=True)`` (the new shape was forgotten at once)."""
    capture = FakeCapture()
    cache = GraphCache(lambda x: x * 2, enabled=True, capture=capture, max_graphs=1, capture_after=3)  # 4 kept
    a = torch.ones(1, 3)
    cache(a)
    for n in (2, 3, 4):
        cache(torch.ones(n, 3))
    cache(a)  # a seen twice: now the most recent
    cache(torch.ones(5, 3))  # full: the shape of 2 rows goes, not a
    assert [key[0][0] for key in cache.sightings] == [3, 4, 1, 5]
    assert torch.equal(cache(a), a * 2) and capture.captured == [(1, 3)]  # a's third call: captured
    capture = FakeCapture()
    cache = GraphCache(lambda x: x * 2, enabled=True, capture=capture, max_graphs=1, capture_after=2)
    for n in range(1, 6):  # ever-new shapes: the fifth is kept, the first forgotten
        cache(torch.ones(n, 3))
    cache(torch.ones(5, 3))
    assert capture.captured == [(5, 3)]


def test_a_capture_failing_with_any_runtime_error_runs_that_shape_eagerly():
    """Not only out of memory: any RuntimeError of the capture (an operation a graph cannot hold) is said once in an
    EngineFallbackWarning and that shape runs eagerly. Mutant: ``except torch.OutOfMemoryError``."""
    attempts = []

    def failing(fn, example, pool):
        attempts.append(tuple(example.shape))
        raise RuntimeError("operation not permitted when stream is capturing\nmore text")

    cache = GraphCache(lambda x: x * 2, enabled=True, capture=failing, capture_after=1)
    x = torch.ones(2, 3)
    with pytest.warns(dcf.EngineFallbackWarning, match=r"RuntimeError: operation not permitted when stream is "
                                                       r"capturing$"):  # fmt: skip
        assert torch.equal(cache(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache(x), x * 2)
    assert attempts == [(2, 3)] and cache.captures == 0


def test_graph_cache_remembers_the_latest_failed_captures():
    """The shapes whose capture failed are remembered, 4 x max_graphs of them, the oldest forgotten first: none of
    them is tried (and warned of) again. Mutants: a bound of max_graphs, ``failed.popitem(last=True)``."""
    attempts = []

    def failing(fn, example, pool):
        attempts.append(example.shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory")

    cache = GraphCache(lambda x: x * 2, enabled=True, capture=failing, max_graphs=1, capture_after=1)
    with pytest.warns(dcf.EngineFallbackWarning):
        for n in range(1, 6):
            cache(torch.ones(n, 3))
    assert attempts == [1, 2, 3, 4, 5] and [key[0][0] for key in cache.failed] == [2, 3, 4, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the four latest: eager, not tried again
        for n in (2, 3, 4, 5):
            assert torch.equal(cache(torch.ones(n, 3)), torch.ones(n, 3) * 2)
    assert attempts == [1, 2, 3, 4, 5]


def test_graph_cache_clear_drops_the_graphs_and_the_sightings():
    """clear() (after changing what the captured function reads other than in place) drops every graph and every
    count of sightings: a captured shape is captured anew, a shape seen once before counts from nothing. Mutants:
    ``graphs.clear()`` or ``sightings.clear()`` left out."""
    capture = FakeCapture()
    cache = GraphCache(lambda x: x * 2, enabled=True, capture=capture, capture_after=2)
    a, b = torch.ones(1, 3), torch.ones(2, 3)
    cache(a), cache(a), cache(b)  # a captured, b seen once
    cache.clear()
    assert not cache.graphs and not cache.sightings and not cache.failed
    cache(b)
    cache(a)
    assert capture.captured == [(1, 3)]  # both eager: counted from nothing
    cache(a)
    assert capture.captured == [(1, 3), (1, 3)] and cache.captures == 2


def test_open_vocab_keeps_max_vocabularies_embedded(model):
    """open_vocab keeps the embeddings of MAX_VOCABULARIES vocabularies: used again in turn, none is embedded twice.
    Mutant: ``>=`` for ``>`` in the eviction loop (one fewer kept; test_predict_overlay_and_open_vocab's
    alternation of two vocabularies does not see it)."""
    seg = _engine(model)
    embedded = []
    embed = seg._embed
    seg._embed = lambda names, **kwargs: embedded.append(names) or embed(names, **kwargs)  # type: ignore[method-assign]
    x = torch.randn(1, 3, 32, 32)
    vocabularies = [[f"thing {i}"] for i in range(MAX_VOCABULARIES)]
    for names in vocabularies * 2:
        seg.open_vocab(x, names)
    assert embedded == [tuple(names) for names in vocabularies]


def test_a_float_batch_within_0_to_1_holding_0_is_warned_of():
    """Pixels scaled to 0..1 hold 0 wherever a photo is black in a channel (and 1 where it is saturated): such a
    batch is taken for one (0 <= min < max <= 1); a constant one is not. Mutant: ``0 < low`` (torch.rand's batches
    in test_a_float_batch_within_0_to_1_is_warned_of never hold 0 exactly)."""
    for low, high, unit in [(0.0, 1.0, True), (0.0, 0.5, True), (0.25, 1.0, True), (0.0, 0.0, False),
                            (1.0, 1.0, False), (-0.01, 1.0, False), (0.0, 1.01, False)]:  # fmt: skip
        assert FiniteVerdict(torch.tensor([low, high]), None).unit_range() == unit, (low, high)


def test_resized_through_keeps_the_resizes_after_one_that_changes_nothing():
    """resized_through skips a resize of finite scores to their own size, never the resizes after it: scores past
    cpu_labels.TAME (finite, so that the resize to their own size is skippable, but the fused kernel's chain keeps
    every size for them), large enough for the kernel (height + width past MIN_SIDES), resized to their own size and
    then to another. Mutant: ``len(fused) >= 1`` for ``== 1`` (returned the scores at their own size)."""
    from denseclip_fast.engine import cpu_labels, segmenter

    scores = torch.randn(1, 3, 120, 150, generator=torch.Generator().manual_seed(6))
    scores[0, 1, 40, 50] = 2e38  # finite, past TAME
    assert 120 + 150 > cpu_labels.MIN_SIDES and 2e38 > cpu_labels.TAME
    expected = scores
    for size in ((120, 150), (200, 300)):
        expected = F.interpolate(expected, size=size, mode="bilinear", align_corners=False)
    got = segmenter.resized_through(scores, (120, 150), (200, 300))
    assert got.shape == (1, 3, 200, 300) and torch.equal(got, expected)


def test_overlay_refuses_a_label_one_past_the_last_class(model):
    """A label equal to the class count is past the palette: the segmenter's own message names the classes and
    the names overlay takes. Mutant: ``top > len(palette)`` (colorize's bare 'exceeds the palette' instead)."""
    seg = _engine(model)
    image = np.zeros((4, 6, 3), np.uint8)
    labels = np.full((4, 6), model.num_classes, np.int64)
    with pytest.raises(ValueError, match=rf"labels go up to {model.num_classes}, past this segmenter's "
                                         rf"{model.num_classes} classes"):  # fmt: skip
        seg.overlay(image, labels)
    assert seg.overlay(image, labels - 1).shape == (4, 6, 3)


def test_a_model_with_a_parameter_on_the_meta_device_is_refused(model):
    """One weight without values (a partial load onto a meta-built model) is refused as a wholly meta one is.
    Mutant: only the buffers looked at."""
    partial = copy.deepcopy(model)
    conv = partial.decode_head.conv_seg
    conv.weight = torch.nn.Parameter(torch.empty_like(conv.weight, device="meta"))
    with pytest.raises(ValueError, match=r"model's weights are on the meta device"):
        dcf.Segmenter(partial, device="cpu", dtype=torch.float32)


def test_a_bf16_engine_without_the_finite_check_keeps_nan(model):
    """check_finite=False: a bfloat16 CPU engine's ReLUs stay passes of their own, which keep NaN as the model does
    (oneDNN's fused ReLU turns NaN into 0: finite, meaningless logits). Mutant: fuse_convolutions(relu=True)
    whatever check_finite (test_the_finite_check_can_be_turned_off runs a float32 engine, which fuses nothing)."""
    nan = torch.full((1, 3, 64, 64), float("nan"))
    seg = dcf.Segmenter(model, device="cpu", dtype=torch.bfloat16, check_finite=False)
    assert torch.isnan(seg.logits(nan)).all()


def test_a_verdict_handed_on_by_the_batch_check_is_acted_on_by_every_call(model, monkeypatch):
    """On a GPU, _batch hands the finite check's verdict on (FiniteVerdict.sent) and each public method reads it
    once the forward is queued (tests/test_gpu.py checks that on a GPU only). On a CPU: an engine whose _batch hands
    a verdict on, as a GPU engine's does, raises from every public method. Mutant: _trained_head's
    ``self._finite_or_raise(finite)`` left out (CPU batches are refused inside _batch, so no CPU test saw it)."""
    seg = _engine(model, check_finite=False)  # _batch itself refuses nothing
    batch_of = seg._batch
    monkeypatch.setattr(seg, "_batch", lambda images: (batch_of(images)[0],
                                                       FiniteVerdict(FiniteVerdict.scanned(images), None)))  # fmt: skip
    bad = torch.randn(1, 3, 64, 64)
    bad[0, 0, 5, 5] = float("nan")
    for call in (seg.logits, seg.predict, lambda x: seg.open_vocab(x, ["cat"]), lambda x: seg.predict(x, ["cat", "a"])):
        with pytest.raises(ValueError, match="images contain NaN or infinite values"):
            call(bad)

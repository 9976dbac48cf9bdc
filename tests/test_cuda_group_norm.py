"""engine/cuda_group_norm.py: a 16-bit CUDA engine's GroupNorm(1, C) with its statistics from ATen's reductions and
its affine map by batch_norm. Device-independent PyTorch, so these tests run it on the CPU by adding the CPU to
GROUP_NORM_DEVICES; test_gpu.py runs it on CUDA."""

from __future__ import annotations

import copy
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from denseclip_fast import DenseCLIP, Segmenter
from denseclip_fast.engine import cuda_group_norm, segmenter
from denseclip_fast.engine.cuda_group_norm import (
    WholeMapGroupNorm,
    group_norms_wanted,
    swap_group_norms,
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
    """The CPU listed in GROUP_NORM_DEVICES, as CUDA is."""
    monkeypatch.setattr(cuda_group_norm, "GROUP_NORM_DEVICES", ("cpu",))


def _norm(channels: int, dtype=torch.bfloat16, eps: float = 1e-5) -> nn.GroupNorm:
    torch.manual_seed(2)
    norm = nn.GroupNorm(1, channels, eps=eps)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm.to(dtype).requires_grad_(False)


def _ops(fn) -> list[str]:
    """The operators ``fn()`` runs (torch.profiler, which does not intercept the call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 24, 5, 7), (3, 5, 1, 1), (2, 1, 9, 4), (2, 7, 13), (4, 3, 2, 3, 5)])
def test_whole_map_statistics_equal_group_norms(on_cpu, shape, dtype):
    """Batches of 1 to 4, one pixel, one channel, 3-D and 5-D inputs, values offset from zero: no group_norm
    called, the statistics by var_mean, the result within rounding of float64's, in the input's dtype and shape (at
    these sizes ATen's CPU GroupNorm's bit for bit; not in general: the next test)."""
    norm = _norm(shape[1], dtype)
    whole = WholeMapGroupNorm.of(norm)
    x = (torch.randn(shape) * 3 + 2).to(dtype)
    with torch.no_grad():
        out = whole(x)
        ops = _ops(lambda: whole(x))
        expected = norm(x)
    assert "aten::native_group_norm" not in ops and "aten::var_mean" in ops, ops
    assert out.dtype == dtype and out.shape == x.shape
    exact = F.group_norm(x.double(), 1, norm.weight.double(), norm.bias.double(), norm.eps)
    torch.testing.assert_close(out.double(), exact, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=2e-2)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_at_vit_b16s_size_within_rounding_of_group_norm(on_cpu, dtype):
    """The (2, 768, 40, 40) token maps of ViT-B/16 at 640x640: within the dtype's rounding of float64's GroupNorm,
    and about as close to it as ATen's own (the statistics' float32 sums differ in order, so some elements' last
    place differs from ATen's)."""
    norm = _norm(768, dtype)
    x = (torch.randn(2, 768, 40, 40) * 3 + 2).to(dtype)
    with torch.no_grad():
        out, theirs = WholeMapGroupNorm.of(norm)(x), norm(x)
    exact = F.group_norm(x.double(), 1, norm.weight.double(), norm.bias.double(), norm.eps)
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)  # half an ulp of the dtype, relative
    torch.testing.assert_close(out.double(), exact, rtol=4 * ulp, atol=4 * ulp)
    rounded = exact.to(dtype)
    assert (out != rounded).sum() <= 2 * (theirs != rounded).sum() + 100


def test_large_offsets_keep_the_statistics_exact(on_cpu):
    """A map whose mean is far above its spread: float32 statistics of the float32 copy (not a 16-bit mean, nor the
    sum of squares minus the squared mean) keep the normalised values right."""
    norm = _norm(8)
    x = (torch.randn(2, 8, 6, 6) * 0.01 + 300).to(torch.bfloat16)
    whole = WholeMapGroupNorm.of(norm)
    with torch.no_grad():
        out = whole(x)
    exact = F.group_norm(x.double(), 1, norm.weight.double(), norm.bias.double(), norm.eps)
    assert rel_err(out, exact) < 1e-2


def test_it_shares_the_parameters_and_refuses_other_norms():
    norm = _norm(6)
    whole = WholeMapGroupNorm.of(norm)
    assert whole.weight is norm.weight and whole.bias is norm.bias and whole.eps == norm.eps
    assert dict(whole.state_dict()).keys() == dict(norm.state_dict()).keys()
    for other in (nn.GroupNorm(2, 6), nn.GroupNorm(1, 6, affine=False)):
        with pytest.raises(ValueError, match="one group with an affine map"):
            WholeMapGroupNorm.of(other)
        holder = nn.Module()  # a model whose backbone holds it: left as it is
        holder.backbone = nn.Sequential(other)
        assert swap_group_norms(typing.cast(DenseCLIP, holder)) == 0 and holder.backbone[0] is other
    with torch.no_grad():
        x = torch.randn(1, 6, 3, 3).to(torch.bfloat16)
        assert torch.equal(copy.deepcopy(whole)(x), whole(x))


def test_otherwise_it_is_group_norms(on_cpu):
    """A gradient needed (input or weight), float32, autocast (CUDA's or the CPU's), an input not NCHW-contiguous,
    an empty batch, a dispatch mode or tracer recording the call, the wrong channel count (GroupNorm's message):
    nn.GroupNorm's computation."""
    norm = _norm(6)
    whole = WholeMapGroupNorm.of(norm)
    x = torch.randn(2, 6, 5, 3).to(torch.bfloat16)

    def native(fn) -> bool:
        return "aten::native_group_norm" in _ops(fn)

    with torch.no_grad():
        assert not native(lambda: whole(x))
        channels_last = x.contiguous(memory_format=torch.channels_last)
        assert native(lambda: whole(channels_last)) and torch.equal(whole(channels_last), norm(channels_last))
        assert whole(x[:0]).shape == (0, 6, 5, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert native(lambda: whole(x))
        was = torch.is_autocast_enabled("cuda")
        torch.set_autocast_enabled("cuda", True)
        try:
            assert native(lambda: whole(x))
        finally:
            torch.set_autocast_enabled("cuda", was)
        with pytest.raises(RuntimeError, match="weight to be a vector of size equal to the number of channels"):
            whole(torch.randn(2, 4, 5, 3).to(torch.bfloat16))  # GroupNorm's message
        one = WholeMapGroupNorm.of(_norm(1))  # images of one value: GroupNorm's result, or its error
        single = torch.randn(2, 1, 1, 1).to(torch.bfloat16)
        assert native(lambda: one(single)) and torch.equal(one(single), F.group_norm(single, 1, one.weight, one.bias))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            one(single[:1])
        for eps in (0.0, -1e-5):  # F.batch_norm refuses them in torch 2.11; GroupNorm takes them
            flat = WholeMapGroupNorm.of(_norm(6, eps=eps))
            assert native(lambda: flat(x))  # noqa: B023
        with RecordedOps() as recorded:
            whole(x)
        assert "native_group_norm.default" in recorded.names
        with warnings.catch_warnings(record=True) as caught:  # (F.group_norm's own batch check warns)
            warnings.simplefilter("always")
            traced = torch.jit.trace(whole, (x,), check_trace=False)
        assert "group_norm" in str(traced.graph)
        assert not [w for w in caught if w.filename.endswith("cuda_group_norm.py")]  # no shape read before the check
    assert native(lambda: whole(x.clone().requires_grad_(True)))
    trained = WholeMapGroupNorm.of(_norm(6).requires_grad_(True))
    assert trained(x).requires_grad and native(lambda: trained(x))
    with torch.no_grad():
        assert native(lambda: WholeMapGroupNorm.of(_norm(6, torch.float32))(x.float()))


def test_not_on_a_device_not_listed():
    whole = WholeMapGroupNorm.of(_norm(6))
    with torch.no_grad():
        assert "aten::native_group_norm" in _ops(lambda: whole(torch.randn(1, 6, 3, 3).to(torch.bfloat16)))


def test_the_swap_takes_a_vits_four_and_nothing_else():
    vit = randomized(DenseCLIP(tiny_config("vit"), NAMES)).eval()
    vit.backbone.extra = nn.GroupNorm(2, 4)
    assert swap_group_norms(vit) == 4 and type(vit.backbone.fpn3) is WholeMapGroupNorm
    assert type(vit.backbone.extra) is nn.GroupNorm and swap_group_norms(vit) == 0
    assert swap_group_norms(randomized(DenseCLIP(tiny_config("resnet"), NAMES)).eval()) == 0


@pytest.mark.parametrize("device, dtype, switch, wanted", WANTED_16_BIT_CUDA)
def test_which_engines_want_it(device, dtype, switch, wanted, monkeypatch):
    set_switch(monkeypatch, "DENSECLIP_FAST_GROUP_NORM", switch)
    assert group_norms_wanted(torch.device(device), dtype) is wanted


@pytest.mark.parametrize("listed, switch, swapped", [(True, None, True), (True, "0", False), (False, None, False)])
def test_a_16_bit_engine_on_a_listed_device_swaps_them(listed, switch, swapped, monkeypatch):
    """A bfloat16 Segmenter of a ViT on a device of GROUP_NORM_DEVICES (CUDA; the CPU added here) has its pyramid's
    four GroupNorms as WholeMapGroupNorm, not with DENSECLIP_FAST_GROUP_NORM=0 or on a device not listed; the logits
    stay within bfloat16's tolerance of the float32 model's and equal the engine's without them (the same values
    on a CPU)."""
    # the pyramid's maps NCHW, as on CUDA (a CPU engine makes them channels_last, which the swap leaves to ATen)
    monkeypatch.setattr(segmenter, "channels_last_pyramid", lambda model: False)
    taken = []
    monkeypatch.setattr(WholeMapGroupNorm, "takes", lambda self, x, takes=WholeMapGroupNorm.takes: taken.append(
        takes(self, x)) or taken[-1])  # fmt: skip
    model, seg = vit_engine_with(monkeypatch, cuda_group_norm, "GROUP_NORM_DEVICES", listed,
                                 "DENSECLIP_FAST_GROUP_NORM", switch, torch.bfloat16)
    kinds = [type(m) for m in seg.model.backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert len(kinds) == 4 and all((k is WholeMapGroupNorm) is swapped for k in kinds), kinds
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
    got = seg.logits(x)
    assert rel_err(got, expected) < 2e-2
    assert taken == ([True] * 4 if swapped else [])  # each of the four took the whole-map statistics
    monkeypatch.setattr(cuda_group_norm, "GROUP_NORM_DEVICES", ("cuda",))
    assert rel_err(got, Segmenter(model, device="cpu", dtype=torch.bfloat16).logits(x)) < 1e-2

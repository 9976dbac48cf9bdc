"""The engine's positional embeddings kept per input size (engine/positions.py): made once per size, bit for bit the
values the model makes on each call, never kept where a trace, a gradient or a CUDA-graph capture could be fooled."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import denseclip_fast as dcf
from denseclip_fast.engine import positions, projections
from denseclip_fast.engine.rewrite import prepare_for_inference
from denseclip_fast.model import resnet, vit

from .conftest import NAMES, RecordedOps, randomized, tiny_config


def _count_resizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every positional-grid resize the model makes, whichever module makes it."""
    calls: list[int] = []
    real = resnet.resize_positional_grid

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(resnet, "resize_positional_grid", counted)
    monkeypatch.setattr(vit, "resize_positional_grid", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_a_segmenter_makes_each_sizes_positions_once(kind, dtype, monkeypatch):
    """One resize per input size (batch sizes share it; a non-square size of its own), and logits bit for bit those of
    an engine that keeps nothing (MAX_SIZES 0: the model's own computation on every call)."""
    model = randomized(dcf.DenseCLIP(tiny_config(kind), NAMES)).eval()
    seg = dcf.Segmenter(model, device="cpu", dtype=dtype)
    calls = _count_resizes(monkeypatch)
    a, b = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 64)
    first = seg.logits(a)
    assert len(calls) == 1
    again = seg.logits(a)
    seg.logits(a[:1])
    assert len(calls) == 1  # the same size at another batch size: kept
    other = seg.logits(b)
    assert len(calls) == 2
    seg.logits(a)
    assert len(calls) == 2
    kept = [m.kept_positions for m in seg.model.modules() if isinstance(m, positions._KeptPositions)]
    assert len(kept) == 1 and len(kept[0]) == 2
    assert torch.equal(first, again)

    monkeypatch.setattr(positions, "MAX_SIZES", 0)
    plain = dcf.Segmenter(model, device="cpu", dtype=dtype)
    before = len(calls)
    assert torch.equal(plain.logits(a), first) and torch.equal(plain.logits(b), other)
    assert torch.equal(plain.logits(a), first)
    assert len(calls) - before == 3  # made on every call


def test_sizes_past_the_bound_are_made_each_call(monkeypatch):
    """The kept sizes never exceed MAX_SIZES (a graph may read any of them: none is dropped); later sizes are made on
    each call, with the same logits."""
    monkeypatch.setattr(positions, "MAX_SIZES", 2)
    seg = dcf.Segmenter(randomized(dcf.DenseCLIP(tiny_config("vit"), NAMES)).eval(), device="cpu")
    calls = _count_resizes(monkeypatch)
    sizes = [(64, 64), (64, 80), (80, 64)]
    images = {s: torch.randn(1, 3, *s) for s in sizes}
    first = {s: seg.logits(x) for s, x in images.items()}
    assert len(calls) == 3
    again = {s: seg.logits(x) for s, x in images.items()}
    assert len(calls) == 4  # the third size again; the first two kept
    (pool,) = [m for m in seg.model.modules() if isinstance(m, positions._KeptPositions)]
    assert sorted(key[0] for key in pool.kept_positions) == [(4, 4), (4, 5)]
    assert all(torch.equal(first[s], again[s]) for s in sizes)


def _kept_pool() -> torch.nn.Module:
    model = prepare_for_inference(randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval(),
                                  torch.device("cpu"), torch.float32)  # fmt: skip
    assert positions.keep_positions(model) == 1
    return model.backbone.attnpool


def test_nothing_is_kept_where_a_trace_a_gradient_or_a_capture_could_be_fooled(monkeypatch):
    pool = _kept_pool()
    size = (3, 5)
    want = resnet.resize_positional_grid(pool.positional_embedding, pool.grid, size)
    with RecordedOps():  # traced: made, not kept
        assert torch.equal(pool.positions(size, torch.float32), want)
    assert not pool.kept_positions
    pool.requires_grad_(True)
    with torch.enable_grad():  # a gradient could flow to the embedding
        made = pool.positions(size, torch.float32)
    assert made.requires_grad and not pool.kept_positions
    pool.requires_grad_(False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    pool.positions(size, torch.float32)  # a CUDA graph being captured
    assert not pool.kept_positions
    monkeypatch.undo()
    with torch.enable_grad():  # frozen weights: no gradient can flow, kept
        kept = pool.positions(size, torch.float32)
    assert pool.kept_positions and torch.equal(kept, want)
    assert pool.positions(size, torch.float32) is kept
    assert pool.positions(size, torch.float64) is not kept  # another dtype: its own
    with RecordedOps():  # a trace never reads what is kept
        assert pool.positions(size, torch.float32) is not kept
    pool.to("meta")  # moved (the kept tensors stay where they were made): made anew on the new device
    assert pool.positions(size, torch.float32).device.type == "meta"


def test_a_new_weight_at_a_freed_ones_address_is_not_taken_for_it():
    """The key reads each parameter's address and version; a tensor swapped in for a freed one at its address, at
    version 0 too (functional_call's way; from_numpy over one array makes the reuse certain), is another tensor:
    its positions are made, not read from what the freed one made."""
    pool = _kept_pool()
    size = (3, 5)
    memory = pool.positional_embedding.detach().numpy().copy()
    pool.positional_embedding = torch.nn.Parameter(torch.from_numpy(memory), requires_grad=False)
    before = pool.positions(size, torch.float32)
    assert pool.positions(size, torch.float32) is before  # kept
    memory *= 2  # the freed tensor's memory, now another tensor's
    pool.positional_embedding = torch.nn.Parameter(torch.from_numpy(memory), requires_grad=False)
    want = resnet.resize_positional_grid(pool.positional_embedding, pool.grid, size)
    assert torch.equal(pool.positions(size, torch.float32), want) and not torch.equal(before, want)


def test_keep_positions_swaps_each_module_once_and_copies_carry_their_own():
    """The attention pool (plain or with stacked projections) and the ViT backbone become their keeping subclasses,
    once; the state dict is untouched; deepcopy and pickle give a model whose kept tensors are its own."""
    model = prepare_for_inference(randomized(dcf.DenseCLIP(tiny_config("resnet"), NAMES)).eval(),
                                  torch.device("cpu"), torch.float32)  # fmt: skip
    projections.fuse_attention_projections(model)
    state = model.state_dict()
    assert positions.keep_positions(model) == 1
    assert type(model.backbone.attnpool) is positions.KeptPositionsFusedPool
    assert positions.keep_positions(model) == 0
    after = model.state_dict()
    assert list(after) == list(state) and all(after[k] is state[k] or torch.equal(after[k], state[k]) for k in state)
    vit_model = dcf.DenseCLIP(tiny_config("vit"), NAMES)
    vit_keys = list(vit_model.state_dict())
    assert positions.keep_positions(vit_model) == 1 and type(vit_model.backbone) is positions.KeptPositionsViT
    assert list(vit_model.state_dict()) == vit_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.backbone(x).local_feat
    assert len(model.backbone.attnpool.kept_positions) == 1
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        pool = clone.backbone.attnpool
        assert type(pool) is positions.KeptPositionsFusedPool and not pool.kept_positions  # a copy keeps its own
        with torch.no_grad():
            assert torch.equal(clone.backbone(x).local_feat, want)
        assert len(pool.kept_positions) == 1
    torch.save(model, io.BytesIO())  # a whole-module save (pickle) keeps working
    assert len(model.backbone.attnpool.kept_positions) == 1
    assert positions.keep_positions(model) == 0 and not model.backbone.attnpool.kept_positions  # a new engine's


def test_kept_positions_follow_the_weights():
    """Weights changed in place, or moved to another dtype by .to(), are made anew (the new values), never read from
    what the old weights made; with a gradient to flow, nothing kept is read."""
    pool = _kept_pool()
    size = (3, 5)
    first = pool.positions(size, torch.float32)
    assert pool.positions(size, torch.float32) is first
    with torch.no_grad():
        pool.positional_embedding.mul_(2)
    again = pool.positions(size, torch.float32)
    assert torch.equal(again, 2 * first)
    pool.to(torch.float64)
    made = pool.positions(size, torch.float64)
    want = resnet.resize_positional_grid(pool.positional_embedding, pool.grid, size)
    assert made.dtype == torch.float64 and torch.equal(made, want) and torch.allclose(made, 2 * first.double())
    pool.requires_grad_(True)
    with torch.enable_grad():
        assert pool.positions(size, torch.float64).requires_grad  # not the kept, gradient-free tensor


def test_a_vit_with_one_of_its_embeddings_trainable_keeps_nothing():
    """ViT's positions read two of its own parameters (the positional and the class embedding): one of them
    trainable under grad mode is enough for a gradient to flow, so nothing is kept or read and the positions made
    carry the gradient (the pool above has one such parameter, where "any" and "all" of them are the same)."""
    model = randomized(dcf.DenseCLIP(tiny_config("vit"), NAMES)).eval().requires_grad_(False)
    assert positions.keep_positions(model) == 1
    backbone = model.backbone
    size = (3, 5)
    for trainable in (backbone.class_embedding, backbone.positional_embedding):
        trainable.requires_grad_(True)
        with torch.enable_grad():
            made = backbone.positions(size, torch.float32)
        assert made.requires_grad and not backbone.kept_positions
        trainable.requires_grad_(False)


def test_positions_kept_under_inference_mode_serve_later_calls():
    """An inference tensor kept by a call under torch.inference_mode is read (never written) by later calls outside
    it, with gradients enabled by the caller too: the same logits."""
    seg = dcf.Segmenter(randomized(dcf.DenseCLIP(tiny_config("vit"), NAMES)).eval(), device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        first = seg.logits(x)
    (module,) = [m for m in seg.model.modules() if isinstance(m, positions._KeptPositions)]
    assert all(t.is_inference() for _, t in module.kept_positions.values()) and module.kept_positions
    with torch.enable_grad():
        assert torch.equal(seg.logits(x), first)
    assert torch.equal(seg.logits(x), first)


def test_the_positional_grid_is_resized_by_half_pixel_bilinear_interpolation():
    """The official AttentionPool2d's resize, written out: align_corners=False bilinear, edge rows repeated, the
    class row kept. A 3 x 3 grid to 4 x 5 by hand (source coordinate (i + 0.5) * in / out - 0.5, clamped at 0):
    bicubic, nearest or align_corners=True differ here by 0.19 or more (tried), where the model-level parity
    test's margin against bicubic was 1.13e-5 against 1e-5."""

    def weights(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(x), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            m[i, lo] += 1 - (x - lo)
            m[i, hi] += x - lo
        return m

    grid, channels = 3, 2
    pos = torch.randn(1 + grid * grid, channels, dtype=torch.float64)
    got = resnet.resize_positional_grid(pos, grid, (4, 5))
    spatial = pos[1:].reshape(grid, grid, channels)
    want = torch.einsum("ia,jb,abc->ijc", weights(grid, 4), weights(grid, 5), spatial).reshape(20, channels)
    assert got.shape == (21, channels) and torch.equal(got[0], pos[0])
    torch.testing.assert_close(got[1:], want, rtol=0, atol=1e-12)
    rows = weights(grid, 4)
    assert torch.allclose(rows[0], torch.tensor([1.0, 0, 0], dtype=torch.float64))  # clamped at the edge
    assert torch.allclose(rows[1], torch.tensor([0.375, 0.625, 0], dtype=torch.float64))  # x = 0.625

"""predict's fused resize and argmax on a CPU (csrc/cpu/labels.cpp, denseclip_fast.engine.cpu_labels): the resize
bit for bit ATen's, the argmax torch's (ties, NaNs), labels() equal to the argmax of the resized scores whichever way
it takes, and the fallback where the kernel is missing or rounds otherwise."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denseclip_fast.engine import cpu_labels, segmenter

from .conftest import torch_threads

# (N, K, h, w) -> (H, W), all with H + W above cpu_labels.MIN_SIDES: upsampled by fractions, by an integer,
# downsampled, mixed, one axis unchanged, a single source row or column, a single output column
SHAPES = [
    ((1, 3, 128, 171), (512, 683)),
    ((2, 5, 37, 53), (101, 211)),
    ((1, 4, 300, 301), (256, 149)),
    ((1, 2, 128, 128), (128, 512)),
    ((3, 2, 1, 7), (97, 160)),
    ((1, 3, 9, 1), (300, 1)),
    ((1, 2, 64, 640), (200, 77)),
    ((1, 1, 257, 130), (129, 130)),
]


def aten(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    n, k, h, w = scores.shape
    return F.interpolate(scores.reshape(n * k, 1, h, w), size=size, mode="bilinear", align_corners=False).view(
        n, k, *size
    )


def aten_chain(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """ATen's resizes to the flattened (height, width) pairs ``sizes``, in turn (the kernel's signature)."""
    for size in zip(sizes[::2], sizes[1::2]):
        scores = aten(scores, size)
    return scores


def kernel_labels(scores: torch.Tensor, size: tuple[int, int], step: int | None = None) -> tuple[torch.Tensor, ...]:
    n, k = scores.shape[:2]
    best = torch.full((n, *size), float("nan"))  # garbage: the call with first 0 writes them, not reads
    index = torch.full((n, *size), -5, dtype=torch.int64)
    step = step or k
    for first in range(0, k, step):
        cpu_labels.resize_argmax_(scores[:, first : first + step].contiguous(), [size], best, index, first)
    return best, index


def spiked(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random scores with negative zeros, values near the float32 limit, infinities of each sign and NaNs (a row of
    infinities and a column of NaNs too, which a resize reads in one direction at least)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 8
    flat = x.view(-1)
    flat[::13] = -0.0
    flat[5::17] = 3e38
    flat[7::19] = -3e38
    flat[flat.numel() // 2] = float("inf")
    flat[flat.numel() // 3] = float("-inf")
    flat[-1] = float("nan")
    x[0, 0, x.shape[2] // 2, :] = float("inf")
    x[0, 0, :, x.shape[3] // 2] = float("nan")
    return x


def test_the_probe_passes_with_this_torch():
    """The engine takes the fused kernel here, where ATen runs its AVX2 or AVX-512 kernels (whose resize rounds its
    values with fused multiply-adds, as the kernel does, and its source positions in one of the two ways the kernel
    offers); the probe runs once."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"ATen's {torch.backends.cpu.get_cpu_capability()} kernels: another rounding may be theirs")
    assert cpu_labels.fused_labels_usable()
    assert cpu_labels.fused_tail([(129, 128)]) == 1 and cpu_labels.fused_tail([(128, 128)]) == 0
    assert cpu_labels.fused_tail([(300, 300), (100, 100), (200, 300), (512, 683)]) == 2


def source_weights(w: int, width: int, fused: bool) -> np.ndarray:
    """(w, width) float32: the weight of each of a row's w source values in each of its width outputs, as the kernel
    makes them, written out in numpy: the source position scale * (d + 0.5) - 0.5 rounded once (fused) or the product
    first; float64 holds the products of two float32 values exactly, so each float32 rounding below is one rounding
    of the exact value."""
    scale = np.float32(w) / np.float32(width)
    weights = np.zeros((w, width), dtype=np.float32)
    for d in range(width):
        product = np.float64(scale) * np.float64(np.float32(d) + np.float32(0.5))
        src = np.float32(product - 0.5) if fused else np.float32(product) - np.float32(0.5)
        src = max(src, np.float32(0.0))
        i = min(int(np.floor(src)), w - 1)
        l1 = np.float32(min(max(src - np.float32(i), np.float32(0.0)), np.float32(1.0)))
        l0 = np.float32(1.0) - l1
        if i < w - 1:  # fma(1, l0, 0 * l1) and fma(0, l0, 1 * l1): each weight alone
            weights[i, d], weights[i + 1, d] = l0, l1
        else:  # the last source value is both taps: fma(1, l0, 1 * l1)
            weights[i, d] = np.float32(np.float64(l0) + np.float64(l1))
    return weights


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("w", "width"), [(53, 211), (7, 160), (301, 149), (40, 40 * 3)])
def test_the_kernels_source_positions_round_once_or_twice_as_asked(w, width, fused):
    """The kernel's weights (a one-hot source row per class gives each output's two weights as they are) against the
    formula written out, for each rounding of the source positions; upsampled by fractions and by an integer,
    downsampled. On the first two shapes the roundings give other weights, so the kernel is seen to tell them apart."""
    rows = torch.eye(w).view(1, w, 1, w)
    ours = torch.ops.denseclip_fast_engine.resize_bilinear(rows, [1, width], fused).view(w, width)
    assert torch.equal(ours, torch.from_numpy(source_weights(w, width, fused)))
    if (w, width) in ((53, 211), (7, 160)):
        assert not np.array_equal(source_weights(w, width, True), source_weights(w, width, False))


def test_the_probe_finds_the_rounding_that_is_atens():
    """Of the two roundings of the source positions, the probe's is the one whose resize equals F.interpolate on
    a fractional upsampling; the other differs there (torch 2.11 to 2.14 round once on x86-64, 2.15 twice)."""
    fused = cpu_labels.source_fused()
    if fused is None:
        pytest.skip("the kernel equals ATen's resize in neither rounding here (test_the_probe_passes_with_this_torch)")
    scores = torch.randn(2, 3, 37, 53, generator=torch.Generator().manual_seed(11))
    theirs = aten(scores, (101, 211))
    resize = torch.ops.denseclip_fast_engine.resize_bilinear
    assert torch.equal(resize(scores, [101, 211], fused), theirs)
    assert not torch.equal(resize(scores, [101, 211], not fused), theirs)
    assert cpu_labels.kernel_rounding() is fused


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ATen's DEFAULT kernels differ by CPU")
def test_atens_default_kernels_round_otherwise_and_labels_fall_back():
    """With ATEN_CPU_CAPABILITY=default ATen's resize is compiled without fused multiply-adds on x86-64: the probe
    finds it unequal, and labels resize then take the argmax, still equal to it (a fresh process: the variable is
    read when torch starts)."""
    script = (
        "import torch\n"
        "from denseclip_fast.engine import cpu_labels, segmenter\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "assert not cpu_labels.fused_labels_usable()\n"
        "x = torch.randn(1, 6, 20, 30, generator=torch.Generator().manual_seed(0))\n"
        "assert torch.equal(segmenter.labels(x, (200, 300)), segmenter.resized_through(x, (200, 300)).argmax(1))\n"
        "print('fell back')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fell back" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("shape", "size"), SHAPES)
def test_the_kernels_resize_is_atens_bit_for_bit(shape, size, threads):
    """Every value, non-finite ones and their NaNs included, and the sign of zeros, on 1 and 2 threads."""
    with torch_threads(threads):
        scores = spiked(shape, seed=sum(shape) + threads)
        ours = torch.ops.denseclip_fast_engine.resize_bilinear(scores, list(size), cpu_labels.kernel_rounding())
        theirs = aten(scores, size)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(ours.signbit(), theirs.signbit())
        assert theirs.isnan().any()  # the spikes reached the output (an infinity times a weight 0: NaN)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_compiled_variant_resizes_as_aten(isa):
    """The loops compiled for AVX-512, for AVX2 with FMA and for any CPU (std::fma) give the same values, ATen's,
    whichever the dispatch picks on this CPU (a test hook runs each; one this CPU lacks is skipped)."""
    hook = torch.ops.denseclip_fast_testing.resize_bilinear_isa
    for shape, size in SHAPES[:5]:
        scores = spiked(shape, seed=len(isa) + sum(size))
        try:
            ours = hook(scores, list(size), cpu_labels.kernel_rounding(), isa)
        except RuntimeError as exc:
            assert f"no {isa} loops in this build or on this CPU" in str(exc)
            pytest.skip(f"no {isa} loops here")
        torch.testing.assert_close(ours, aten(scores, size), rtol=0, atol=0, equal_nan=True)
    # the AVX-512 width resize's blocks of 16 outputs: source rows shorter than a block, ending inside its 32
    # values, output widths around whole blocks, blocks whose taps lie within 32 values and blocks that gather
    for w, width in [(1, 47), (2, 16), (17, 33), (31, 65), (32, 17), (40, 160), (100, 31), (300, 257), (7, 1)]:
        scores = spiked((1, 2, 3, w), seed=w + width)
        ours = hook(scores, [200, width], cpu_labels.kernel_rounding(), isa)
        torch.testing.assert_close(ours, aten(scores, (200, width)), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="no sse9 loops in this build or on this CPU"):
        hook(scores, [9, 9], True, "sse9")


@pytest.mark.parametrize(
    "sizes",
    [[512, 683, 1536, 2048], [101, 211, 101, 211, 300, 257], [300, 400, 129, 130], [200, 1, 257, 3],
     [140, 130, 140, 130]],
)  # fmt: skip
@pytest.mark.parametrize("threads", [1, 2])
def test_a_chain_of_resizes_is_atens_in_turn_and_its_argmax_the_argmax(sizes, threads):
    """Resizes in turn (the network's input, then the image's own; one to the same size; down after up), the rows of
    each made as the next needs them: ATen's resizes in turn bit for bit, through each compiled variant this CPU
    has, on 1 and 2 threads; and the fused labels their argmax."""
    with torch_threads(threads):
        scores = spiked((2, 3, 37, 53), seed=len(sizes))
        fused = cpu_labels.kernel_rounding()
        ours = torch.ops.denseclip_fast_engine.resize_bilinear(scores, sizes, fused)
        theirs = aten_chain(scores, sizes)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(ours.signbit(), theirs.signbit())
        for isa in ("avx512", "avx2", "generic"):
            try:
                variant = torch.ops.denseclip_fast_testing.resize_bilinear_isa(scores, sizes, fused, isa)
            except RuntimeError:  # not on this CPU: test_each_compiled_variant_resizes_as_aten says which
                continue
            torch.testing.assert_close(variant, theirs, rtol=0, atol=0, equal_nan=True)
        best = torch.empty(2, *sizes[-2:])
        index = torch.empty(2, *sizes[-2:], dtype=torch.int64)
        torch.ops.denseclip_fast_engine.resize_argmax_(scores, sizes, fused, best, index, 0)
        assert torch.equal(index, theirs.argmax(dim=1))


@pytest.mark.parametrize(("shape", "size"), SHAPES)
def test_the_fused_argmax_is_the_argmax_of_the_resize(shape, size):
    """The running best and class equal max and argmax over the resized classes, in one call and in chunks of
    classes; ties (a class repeated, later and earlier) keep the first class, a NaN wins (the first NaN)."""
    n, k, h, w = shape
    scores = torch.randn(n, k + 3, h, w, generator=torch.Generator().manual_seed(k + h))
    scores[:, k + 1] = scores[:, 0]  # a tie with the first class
    scores[:, k + 2] = scores[:, k]
    scores[0, 1, 0, 0] = scores[0, k + 2, 0, 0] = float("nan")
    scores[-1, -1, -1, -1] = float("inf")
    resized = aten(scores, size)
    expected = resized.max(dim=1)
    assert torch.equal(expected.indices, resized.argmax(dim=1))
    for step in (None, 1, 2):
        best, index = kernel_labels(scores, size, step)
        assert torch.equal(index, expected.indices), step
        torch.testing.assert_close(best, expected.values, rtol=0, atol=0, equal_nan=True)


def test_all_minus_infinity_gives_the_first_class():
    scores = torch.full((1, 3, 4, 5), float("-inf"))
    best, index = kernel_labels(scores, (200, 100))
    assert (index == 0).all() and torch.equal(index, aten(scores, (200, 100)).argmax(dim=1))


@pytest.mark.parametrize(
    ("sizes", "chunk"),
    [(((512, 683), (1536, 2048)), None), (((130, 160), (200, 300)), 3), (((40, 50), (300, 301)), 2),
     (((300, 300),), None), (((90, 100), (60, 70)), None)],
)  # fmt: skip
def test_labels_equal_the_argmax_of_the_resized_scores_fused_or_not(sizes, chunk, monkeypatch):
    """segmenter.labels through the fused kernel (the last size large enough) and through resize-then-argmax give
    the argmax of resized_through, in one chunk or several, the scores float32 or bfloat16; a last size too small
    for the kernel takes resize-then-argmax."""
    calls: list[int] = []
    fused = cpu_labels.resize_argmax_
    monkeypatch.setattr(cpu_labels, "resize_argmax_", lambda *a: calls.append(a[-1]) or fused(*a))
    if chunk is not None:
        monkeypatch.setattr(segmenter, "label_step", lambda *a, **kw: chunk)
    generator = torch.Generator().manual_seed(len(sizes))
    for dtype in (torch.float32, torch.bfloat16):
        scores = torch.randn(2, 7, 33, 40, generator=generator).to(dtype)
        scores[:, 5] = scores[:, 1]
        scores[1, 2, 3, 4] = float("nan")
        expected = segmenter.resized_through(scores, *sizes).argmax(dim=1)
        calls.clear()
        assert torch.equal(segmenter.labels(scores, *sizes), expected), dtype
        assert calls == ([] if sum(sizes[-1]) <= cpu_labels.MIN_SIDES else list(range(0, 7, chunk or 7)))
        calls.clear()
        assert torch.equal(segmenter.labels(scores, *sizes, fused=False), expected) and not calls


def test_a_repeated_size_is_left_out_of_the_kernels_chain_only_for_tame_scores(monkeypatch):
    """A resize to the size before it (a uint8 image of the network's input size) gives finite values back: the
    kernel is not given it when every score is finite and within TAME (so are all resized values); an infinity,
    a NaN or a value past TAME keeps it (the resize to the same size turns an infinity into NaN). The labels equal
    the argmax of the resizes in turn either way."""
    given: list[list[tuple[int, int]]] = []
    kernel = cpu_labels.resize_argmax_
    monkeypatch.setattr(cpu_labels, "resize_argmax_", lambda *a: given.append(list(a[1])) or kernel(*a))
    base = torch.randn(1, 3, 30, 40, generator=torch.Generator().manual_seed(8))
    spiked_inf, spiked_nan, huge = base.clone(), base.clone(), base.clone()
    spiked_inf[0, 1, 5, 5] = float("inf")
    spiked_nan[0, 2, 7, 9] = float("nan")
    huge[0, 0, 3, 3] = 2e38
    cases = [(base, ((300, 400), (300, 400)), [(300, 400)]), (base, ((30, 40), (300, 400)), [(300, 400)]),
             (base, ((300, 400), (300, 400), (300, 400)), [(300, 400)]),
             (base, ((300, 400), (200, 100), (200, 100)), [(300, 400), (200, 100)]),
             (spiked_inf, ((300, 400), (300, 400)), [(300, 400), (300, 400)]),
             (spiked_nan, ((300, 400), (300, 400)), [(300, 400), (300, 400)]),
             (huge, ((300, 400), (300, 400)), [(300, 400), (300, 400)])]  # fmt: skip
    for scores, sizes, expected_chain in cases:
        given.clear()
        expected = segmenter.labels(scores, *sizes, fused=False)
        assert torch.equal(expected, aten_chain(scores, [side for size in sizes for side in size]).argmax(dim=1))
        assert torch.equal(segmenter.labels(scores, *sizes), expected), sizes
        assert given == [expected_chain], (sizes, given)
    assert aten_chain(spiked_inf, [300, 400, 300, 400]).isnan().any()  # the kept resize's NaNs


def test_labels_fall_back_where_the_kernel_is_missing_or_rounds_otherwise(monkeypatch):
    """Without the extension's operator, or with one whose resize differs from ATen's in one value on the probe,
    fused_labels_usable is False and labels resize then take the argmax (still the argmax of the resize)."""
    scores = torch.randn(1, 4, 20, 30, generator=torch.Generator().manual_seed(3))
    expected = segmenter.resized_through(scores, (200, 300)).argmax(dim=1)
    used = []
    monkeypatch.setattr(cpu_labels, "resize_argmax_", lambda *a: used.append(a))
    for op in (lambda name: None, lambda name: lambda s, sizes, _: aten_chain(s, sizes).nextafter(torch.tensor(1.0))):
        monkeypatch.setattr(cpu_labels, "_op", op)
        cpu_labels.source_fused.cache_clear()
        try:
            assert not cpu_labels.fused_labels_usable()
            assert torch.equal(segmenter.labels(scores, (200, 300)), expected) and not used
        finally:
            cpu_labels.source_fused.cache_clear()
    monkeypatch.setattr(cpu_labels, "_op", lambda name: lambda s, sizes, _: aten_chain(s, sizes))  # an exact stand-in
    assert cpu_labels.fused_labels_usable() and cpu_labels.source_fused() is True  # the first rounding tried
    cpu_labels.source_fused.cache_clear()


def test_labels_of_cpu_scores_whatever_the_default_device():
    """The fused path's buffers and the probe's values are made on the scores' device (the CPU), not on torch's
    default device (meta here: a CUDA default would fail alike)."""
    scores = torch.randn(1, 4, 20, 30, generator=torch.Generator().manual_seed(4))
    expected = segmenter.resized_through(scores, (200, 300)).argmax(dim=1)
    cpu_labels.source_fused.cache_clear()
    try:
        with torch.device("meta"):
            got = segmenter.labels(scores, (200, 300))
            assert cpu_labels.fused_labels_usable()
    finally:
        cpu_labels.source_fused.cache_clear()
    assert got.device.type == "cpu" and torch.equal(got, expected)


def test_the_probe_sees_a_kernel_that_differs_only_where_a_weight_is_0():
    """A resize equal to ATen's on finite values but not where an infinity meets a weight 0 (its NaN there: an
    infinite value instead) fails the probe: its scores hold an infinity and a NaN."""

    seen: list[int] = []

    def finite_rounding(scores: torch.Tensor, sizes: list[int], fused_source: bool) -> torch.Tensor:
        out = aten_chain(scores, sizes)
        from_infinity = aten_chain(scores.masked_fill(scores.isnan(), 0.0), sizes).isnan()
        seen.append(int(from_infinity.sum()))
        return out.masked_fill(from_infinity, float("inf"))

    original = cpu_labels._op
    cpu_labels.source_fused.cache_clear()
    try:
        cpu_labels._op = lambda name: finite_rounding if name == "resize_bilinear" else original(name)
        assert not cpu_labels.fused_labels_usable()
        # both roundings tried, each up to the first shape with such a tap (equal on the shapes before it)
        tries = [seen[: len(seen) // 2], seen[len(seen) // 2 :]]
        assert tries[0] == tries[1] and tries[0][-1] > 0 and not any(tries[0][:-1]), seen
    finally:
        cpu_labels._op = original
        cpu_labels.source_fused.cache_clear()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(1, 2, 3, 4, dtype=torch.float64), [9, 9]), "scores must be float32, got Double"),
        ((torch.zeros(2, 3, 4), [9, 9]), r"scores must be \(N, K, h, w\), got shape \[2, 3, 4\]"),
        ((torch.zeros(1, 2, 3, 4).transpose(2, 3), [9, 9]), "scores must be contiguous"),
        ((torch.zeros(1, 2, 0, 4), [9, 9]), "scores must have K, h, w >= 1"),
        ((torch.zeros(1, 0, 3, 4), [9, 9]), r"scores must have K, h, w >= 1, got shape \[1, 0, 3, 4\]"),
        ((torch.zeros(1, 2, 3, 4), [9, 9, 0, 9]), r"every height and width must be >= 1, got \[9, 9, 0, 9\]"),
        ((torch.zeros(1, 2, 3, 4), [9, 9, 9]), r"sizes must be one or more \(height, width\) pairs"),
        ((torch.zeros(1, 2, 3, 4), []), r"sizes must be one or more \(height, width\) pairs"),
    ],
)
def test_bad_kernel_inputs_are_refused_by_name(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.denseclip_fast_engine.resize_bilinear(*args, True)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_groups_of_rows_that_read_the_same_input_rows_split_across_threads_and_images(threads):
    """An upsampling's output rows come in groups that read the same two input rows (each class's pair read once per
    group): groups cut by a thread's range (which may start mid-image) and by the end of an image give ATen's values
    and argmax (wide rows, so that the threads get ranges of a few rows)."""
    with torch_threads(threads):
        scores = spiked((3, 2, 5, 300), seed=threads)
        for sizes in ([61, 2000], [37, 900, 61, 2000]):
            theirs = aten_chain(scores, sizes)
            ours = torch.ops.denseclip_fast_engine.resize_bilinear(scores, sizes, cpu_labels.kernel_rounding())
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
            best, index = torch.empty(3, 61, 2000), torch.empty(3, 61, 2000, dtype=torch.int64)
            torch.ops.denseclip_fast_engine.resize_argmax_(scores, sizes, cpu_labels.kernel_rounding(), best, index, 0)
            assert torch.equal(index, theirs.argmax(dim=1))


def test_labels_of_no_class_are_refused():
    """argmax over no class has no answer: labels says so, fused or not (the fused path once returned its buffer's
    uninitialised values)."""
    for fused in (True, False):
        with pytest.raises(ValueError, match=r"labels: scores must be \(N, K, h, w\) with K >= 1, got shape"):
            segmenter.labels(torch.zeros(1, 0, 10, 10), (200, 300), fused=fused)


def test_bad_running_argmax_buffers_are_refused_by_name():
    scores = torch.zeros(2, 3, 4, 5)
    index = torch.zeros(2, 6, 7, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"best must be a contiguous float32 CPU tensor of shape \(2, 6, 7\)"):
        torch.ops.denseclip_fast_engine.resize_argmax_(scores, [6, 7], True, torch.zeros(1, 6, 7), index, 0)
    with pytest.raises(RuntimeError, match=r"index must be a contiguous int64 CPU tensor of best's shape"):
        torch.ops.denseclip_fast_engine.resize_argmax_(scores, [6, 7], True, torch.zeros(2, 6, 7), index.int(), 0)
    with pytest.raises(RuntimeError, match="resize_argmax_: scores must be float32"):
        torch.ops.denseclip_fast_engine.resize_argmax_(scores.double(), [6, 7], True, torch.zeros(2, 6, 7), index, 0)
    with pytest.raises(RuntimeError, match="resize_argmax_: first must be >= 0, got -1"):
        torch.ops.denseclip_fast_engine.resize_argmax_(scores, [6, 7], True, torch.zeros(2, 6, 7), index, -1)


@pytest.mark.parametrize(
    "sizes, kernel_sizes",
    [(((160, 208),), [(160, 208)]), (((160, 208), (300, 333)), [(160, 208), (300, 333)]),
     (((160, 208), (160, 208)), [(160, 208)]), (((50, 60), (160, 208)), [(160, 208)]),
     (((50, 60),), None), (((160, 208), (50, 60)), [(160, 208)])],
)  # fmt: skip
def test_the_logits_resizes_take_the_kernel_with_atens_values(sizes, kernel_sizes, monkeypatch):
    """resized_through (the logits' finish) on a CPU: the resizes after the last one too small for the kernel in one
    pass of it (cpu_labels.resize; a repeated size left out for tame scores), the others by F.interpolate; the
    values ATen's resizes in turn bit for bit, float32 or bfloat16 scores, non-contiguous ones too. Where the last
    size is too small, each resize before it that the kernel serves is a call of its own (resized)."""
    calls: list[list[tuple[int, int]]] = []
    kernel = cpu_labels.resize
    monkeypatch.setattr(cpu_labels, "resize", lambda s, z: calls.append(list(z)) or kernel(s, z))
    generator = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        scores = (torch.randn(2, 6, 40, 52, generator=generator) * 5).to(dtype)
        for x in (scores, scores.transpose(2, 3).contiguous().transpose(2, 3)):
            calls.clear()
            expected = aten_chain(x.float(), [side for size in sizes for side in size])
            assert torch.equal(segmenter.resized_through(x, *sizes), expected), (dtype, sizes)
            assert calls == ([] if kernel_sizes is None else [kernel_sizes])


def test_the_logits_resize_keeps_atens_where_the_kernel_may_not_serve(monkeypatch):
    """F.interpolate's resizes (the same values) where the kernel does not serve the call: classes past one call's
    rows (ROW_VALUES), scores that need a gradient, a call that something records (a dispatch mode), the kernel not
    usable here, a call torch.compile traces; scores already at their one size are given back as they are; and a
    repeated size with an infinity among the scores goes to the kernel (which turns it into NaN as ATen's resize to
    the same size does)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls: list[list[tuple[int, int]]] = []
    kernel = cpu_labels.resize
    monkeypatch.setattr(cpu_labels, "resize", lambda s, z: calls.append(list(z)) or kernel(s, z))
    scores = torch.randn(1, 5, 30, 40, generator=torch.Generator().manual_seed(10))
    expected = aten(scores, (200, 300))
    with monkeypatch.context() as m:
        m.setattr(cpu_labels, "ROW_VALUES", 3 * 300 * 4)  # 4 classes a call: fewer than the 5 here
        assert torch.equal(segmenter.resized_through(scores, (200, 300)), expected) and not calls
    wanting = scores.clone().requires_grad_(True)
    assert torch.equal(segmenter.resized_through(wanting, (200, 300)), expected) and not calls
    with Recording():
        assert torch.equal(segmenter.resized_through(scores, (200, 300)), expected) and not calls
    with monkeypatch.context() as m:
        m.setattr(cpu_labels, "fused_tail", lambda sizes: 0)
        assert torch.equal(segmenter.resized_through(scores, (200, 300)), expected) and not calls
    assert torch.equal(segmenter.resized_through(scores, (200, 300)), expected) and calls == [[(200, 300)]]
    calls.clear()
    own = torch.randn(1, 2, 150, 160, generator=torch.Generator().manual_seed(11))  # slide: a window at its size
    assert segmenter.resized_through(own, (150, 160)) is own and not calls  # given back, not copied
    compiled = torch.compile(lambda t: segmenter.resized_through(t, (200, 300)), fullgraph=True, backend="eager")
    assert torch.equal(compiled(scores), expected) and not calls  # traced: F.interpolate (no probe, no kernel)
    spiked_scores = scores.clone()
    spiked_scores[0, 1, 5, 5] = float("inf")
    calls.clear()
    got = segmenter.resized_through(spiked_scores, (200, 300), (200, 300))
    torch.testing.assert_close(got, aten(aten(spiked_scores, (200, 300)), (200, 300)), rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any() and calls == [[(200, 300), (200, 300)]]

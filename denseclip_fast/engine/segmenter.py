"""The inference engine: a DenseCLIP model prepared once, serving many images.

    seg = Segmenter(model, device="cuda", dtype=torch.bfloat16, mode="slide")
    logits = seg.logits(images)      # (B, K, H, W) float32 at each image's size
    labels = seg.predict(images)     # (B, H, W) int64
    seg.set_classes([...])           # K new names; the text encoder runs here, never per image

What happens once, at construction: a private copy of the model is put in eval mode, its BatchNorms are folded into
the convolutions, it is moved to the device and dtype (channels_last weights on CUDA), and the class embeddings of
the vocabulary are computed in float32 and kept in a buffer, with what the context decoder computes from them alone
(text_proj, the first layer's self-attention block and its cross-attention's queries: model/decoder.py), and the
image encoder's positional embedding is kept for each input size at its first call (positions.py); on a CPU the
linear layers (the image path's in the engine's dtype, the text encoder's in float32) run through oneDNN, with
QuickGELU as a post-op (cpu_linear.py), and a bfloat16 engine's convolutions through oneDNN's fused operator with
their ReLU and residual sum (cpu_conv.py). Images go through in channels_last on every device (cuDNN's and oneDNN's
fastest convolutions; on a 2-core CPU the engine takes 13% / 25% less time than eager PyTorch at batch 1 / 4,
benchmarks/results/export_cpu_2threads_512.md). Per image only the image encoder, the rest of the context decoder,
the fused score/concat operator, the FPN and the head run; on CUDA every (batch, size) is captured once into a CUDA
graph and replayed; the head's logits are resized to the input size (and uint8 images' to their own) after the
replay, in float32, by the finish: logits straight into the returned tensor, predict's labels a chunk of classes at
a time (see labels; the resizes and the argmax in one pass: on a CPU of the extension's kernel, cpu_labels, on a GPU
the last resize of a Triton kernel, ops/triton/labels.py). Slide mode evaluates all crops of a batch as one forward.

Threads: every public method takes one lock, so a Segmenter may be shared by threads, which then take turns; for
parallel inference give each thread (or GPU) its own Segmenter. Processes: send the DenseCLIP model and build a
Segmenter in each, started by spawn or forkserver where the parent has run torch on a CPU (a forked child hangs at
its first parallel CPU kernel, as plain torch does: GNU OpenMP's pool does not survive fork; unless it runs
``torch.set_num_threads(1)`` first).

On a CPU, each call allocates its large tensors afresh and glibc page-faults them in again every time: a program
calling the engine over and over may keep freed memory for reuse (host_memory.retain_freed_memory, process-wide,
with limits said there), as ``denseclip-fast segment`` does.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, NoReturn

import numpy as np
import numpy.typing as npt
import torch

from .. import ops
from ..config import MIN_IMAGE_SIDE
from ..model import DenseCLIP
from ..model.decoder import DecoderPrefix
from ..model.denseclip import check_image_size, check_test_image_size
from ..model.layers import intercepted
from ..model.slide import slide_inference, two_thirds_stride, window_sizes
from ..model.text import check_class_names
from ..preprocess import normalize_keep_ratio
from ..validation import IGNORE, as_bool, as_int, check_device, given_dtype
from ..visualize import default_palette, ignored
from ..visualize import overlay as blend
from . import cpu_labels, cuda_resample, decoder_norms, projections
from .cpu_conv import fuse_convolutions
from .cpu_linear import rewrite_linears
from .cuda_conv import cudnn_fusion_problem, fuse_cudnn_convolutions, gemm_pointwise_convolutions
from .cuda_convt import gemm_transposed_convolutions, gemm_transposed_convolutions_wanted
from .cuda_group_norm import group_norms_wanted, swap_group_norms
from .graphs import GraphCache
from .inputs import Image, ImageBatch, Images, UnnormalizedImagesWarning, as_batch, stacked_for
from .positions import keep_positions
from .rewrite import (
    channels_last_pyramid,
    native_layer_norms,
    native_layer_norms_wanted,
    prepare_for_inference,
    refuse_loading,
    silu_mlps,
    silu_mlps_wanted,
)

Mode = Literal["whole", "slide"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Size = tuple[int, int]
# (N, C, h, w) scores and the (H, W) resizes they still take, in turn -> a result (see Segmenter._each_group)
Finish = Callable[..., torch.Tensor]
# (N, C, h, w) scores of a normalised batch and the resizes they take to its size (none: at its size already)
Pending = tuple[torch.Tensor, tuple[Size, ...]]
# the largest magnitude a float batch may hold (check_finite): far above a CLIP-normalised image's -1.8..2.2 (or an
# ImageNet-normalised one's -2.2..2.7, or a standard normal batch's: past 16 once in 1e57 values) and below what a
# batch of 0..255 pixels not normalised holds (the commonest mistake, which ran and gave confident nonsense), and far
# below every engine dtype's range (float16: 65504)
MAX_INPUT = 16.0

# predict's labels take a chunk of classes at a time whose buffers (its float32 copy and every resize's output
# together, see labels) hold at most this many values (256 MiB of float32): 150 classes of a 12-megapixel photo's
# scores at its size would take 7.2 GB at once
LABEL_CHUNK = 1 << 26
# ... on a CPU in chunks of at most this many values (16 MiB) when they still hold LABEL_CLASSES classes (or all):
# a buffer that small is reused by the C allocator from call to call, a larger one is mapped afresh and its pages
# faulted in (for 150 classes at 512x512, half the time of their resize); each chunk costs passes over the label map
LABEL_CACHED = 1 << 22
LABEL_CLASSES = 16

# open_vocab keeps the class embeddings of this many vocabularies, the least recently used dropped first
MAX_VOCABULARIES = 8


def resized(scores: torch.Tensor, size: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, h, w) scores -> float32 (N, C, H, W) at ``size`` (bilinear, as mmseg's resize), in NCHW (into ``out``,
    of N*C*H*W float32 values, when given); None: as they are. Each class plane is resized as an image of its own
    ((N*C, 1, h, w)), so that it comes out the same however many planes are resized together (see labels): ATen's
    CPU resize of several channels picks its kernel, whose additions differ in order (1e-7), by the channel count and
    the thread count (its channels_last kernel for 3 channels on one thread), and a channels_last input computes a
    chunk's channels in other vector and scalar steps than the whole. On a GPU the Triton kernel
    (cuda_resample.resize_planes) reads the scores as they are (dtype and layout) and writes the float32 planes in one
    pass, each element from its four inputs alone."""
    if size is not None:
        planes = cuda_resample.resize_planes(scores, size, out)
        if planes is not None:
            return planes
    scores = scores.to(torch.float32, memory_format=torch.contiguous_format).contiguous()  # (odd strides too)
    if size is None:
        return scores
    n, c, h, w = scores.shape
    height, width = int(size[0]), int(size[1])
    if out is None and cpu_labels.resize_usable(scores, [(height, width)]):  # the extension's kernel, ATen's values
        return cpu_labels.resize(scores, [(height, width)])
    planes = scores.reshape(n * c, 1, h, w)
    if out is None:
        # F.interpolate, not the out= op below: traced into an exported graph (ImageGraph's float32 logits), the out=
        # op becomes aten.upsample_bilinear2d.default, which Inductor has no lowering for; its fallback is refused
        # with an AssertionError wherever the environment sets CI (GitHub Actions sets CI=true)
        resized_planes = torch.nn.functional.interpolate(planes, size=(height, width), mode="bilinear",
                                                         align_corners=False)  # fmt: skip
        return resized_planes.view(n, c, height, width)
    # F.interpolate(size=...)'s kernel (the scales from the sizes), writing into ``out``
    torch.ops.aten.upsample_bilinear2d.out(planes, [height, width], False, None, None,
                                           out=out.view(n * c, 1, height, width))  # fmt: skip
    return out.view(n, c, height, width)


# devices whose ATen bilinear resize to a map's own size copies it (CUDA's kernel does that first, whatever the
# values): a resize there to the size the scores have is skipped without looking at them (see unchanged_by_resize)
COPYING_DEVICES = ("cuda",)


def unchanged_by_resize(scores: torch.Tensor, size: Size) -> bool:
    """Whether resizing ``scores`` to ``size`` would give them back as they are, bit for bit, so that it can be
    skipped: to their own size, on a device whose ATen resize copies them then (COPYING_DEVICES), or on a CPU when
    all are finite. ATen's CPU bilinear resize to the same size returns finite values unchanged (negative zeros too:
    test_engine checks it) and turns an infinity into NaN; its CUDA resize copies (the Triton kernel, which would
    also turn an infinity's neighbours into NaN and a negative zero into zero, is not launched for it). A photo of
    the test scale's size (ADE20K's 683x512 images at (2048, 512)) is resized to its own size after the network; on
    a CPU that took longer than the resize before it (one reduction, no copy, instead)."""
    if tuple(scores.shape[2:]) != tuple(size):
        return False
    if scores.device.type in COPYING_DEVICES:
        return True
    if scores.device.type != "cpu":
        return False
    low, high = torch.aminmax(scores)  # NaN passes on: not finite
    return bool(low.isfinite() & high.isfinite())


def resized_through(scores: torch.Tensor, *sizes: Size) -> torch.Tensor:
    """A finish (see Segmenter._each_group): ``scores`` resized to each of ``sizes`` in turn, float32 NCHW (as
    they are, in float32 NCHW, with no size; a resize that would change nothing skipped: unchanged_by_resize). Where
    the GPU's Triton kernel takes the first resize (:func:`resized`), it reads the scores in their own dtype and
    layout (the head's bfloat16 NHWC map): no float32 copy of them is made first."""
    pairs = list(_without_copies(scores, [(int(h), int(w)) for h, w in sizes]))
    if pairs and cuda_resample.planes_usable(scores):
        scores, pairs = resized(scores, pairs[0]), pairs[1:]
    scores = resized(scores, None)
    # on a CPU the last resizes that the extension's kernel serves (usually all) in one pass of it (cpu_labels.resize:
    # no planes at the sizes before the last, a uint8 photo's network-size logits among them); ATen's values
    # (asked only untraced: the kernel's probe runs ops a tracer cannot follow)
    tail = cpu_labels.fused_tail(pairs) if scores.device.type == "cpu" and pairs and not intercepted() else 0
    head, rest = pairs[: len(pairs) - tail], pairs[len(pairs) - tail :]
    scores = _resized_in_turn(scores, head)
    if rest:
        fused = cpu_labels.without_repeats(scores, (scores.shape[2], scores.shape[3]), rest)
        if len(fused) == 1 and unchanged_by_resize(scores, fused[0]):
            return scores
        if cpu_labels.resize_usable(scores, fused):
            return cpu_labels.resize(scores, fused)
    return _resized_in_turn(scores, rest)


def _without_copies(scores: torch.Tensor, sizes: Sequence[Size]) -> tuple[Size, ...]:
    """``sizes`` without the resizes to the size before them (the scores' own before the first) where the scores'
    device resizes to the same size by a copy (COPYING_DEVICES): skipped, they change nothing whatever the values,
    and the resize before them (or none) is the last; elsewhere ``sizes`` as they are."""
    if scores.device.type not in COPYING_DEVICES:
        return tuple(sizes)
    return tuple(cpu_labels.changing((scores.shape[2], scores.shape[3]), sizes))


def _resized_in_turn(scores: torch.Tensor, sizes: Sequence[Size]) -> torch.Tensor:
    """float32 NCHW ``scores`` resized to each of ``sizes`` in turn (resized), a resize that would change nothing
    skipped (unchanged_by_resize)."""
    for size in sizes:
        if not unchanged_by_resize(scores, size):
            scores = resized(scores, size)
    return scores


def label_step(batch: int, classes: int, size: Size, cpu: bool = True) -> int:
    """How many classes labels resizes at a time for ``batch`` images whose planes (of all the resizes a class
    goes through) hold ``size[0] * size[1]`` values: on a CPU all when they fit LABEL_CACHED values, else as many
    as LABEL_CACHED holds if that is LABEL_CLASSES or more, else LABEL_CLASSES; on a GPU (whose allocator keeps its
    memory) all; never more than LABEL_CHUNK values (and at least one class)."""
    plane = max(1, batch * size[0] * size[1])
    step = max(LABEL_CACHED // plane, LABEL_CLASSES) if cpu else classes
    return max(1, min(classes, step, LABEL_CHUNK // plane))


def labels(scores: torch.Tensor, *sizes: Size, fused: bool = True) -> torch.Tensor:
    """``resized_through(scores, *sizes).argmax(dim=1)`` (int64 (N, H, W)), equal to it pixel for pixel (the first
    class of a tie; a NaN wins, as in argmax): a chunk of classes (label_step) at a time is copied to float32 NCHW
    (unless it is so already) and goes through the resizes, each step into a buffer of its own reused by every
    chunk, and the best so far is kept in place (no allocation per chunk, and no full-size scores of all classes:
    a photo's would take gigabytes). The buffers, each made when a chunk first needs it, together hold at most
    label_step's bound, but for the resize to the scores' own size that a CPU skips (unchanged_by_resize), whose
    buffer is made only for scores it cannot skip. The per-pixel bookkeeping (best value and class, the chunk's,
    two masks: 26 bytes a pixel) comes on top. Exact because resized treats each class plane alike whatever the
    chunk. Through ATen's max over the classes, which took half the time of its argmax (with the same ties and
    NaNs).

    On a CPU the resizes that the extension's kernel serves (cpu_labels; ``fused``: where it applies), the last ones,
    usually all, and the argmax are one pass of it, the same values bit for bit: it makes their rows as it needs
    them, so that no plane at their sizes is written; a chunk goes through the others (none, usually) in memory. On
    a GPU (``fused``, where the Triton kernels serve the scores: cuda_resample.labels_usable) the last resize and
    the argmax are one pass of the Triton kernel, which reads the scores in their own dtype and layout (no float32
    copy) and makes the resize kernel's values: a normalised batch's labels straight from the head's map."""
    if scores.dim() != 4 or scores.shape[1] == 0:  # argmax over no class has no answer
        raise ValueError(f"labels: scores must be (N, K, h, w) with K >= 1, got shape {tuple(scores.shape)}")
    sizes = _without_copies(scores, tuple((int(h), int(w)) for h, w in sizes))
    if not sizes:
        return resized(scores, None).max(dim=1).indices
    n, k, height, width = scores.shape
    cpu = scores.device.type == "cpu"
    # the Triton kernels (a GPU's; tests serve a CPU's by the interpreter), which read any dtype and layout
    triton_kernels = fused and cuda_resample.labels_usable(scores)
    tail = 1 if triton_kernels else (cpu_labels.fused_tail(sizes) if fused and cpu else 0)
    through, fused_sizes = sizes[: len(sizes) - tail], sizes[len(sizes) - tail :]  # in memory, then fused
    # the float32 copy (none for the Triton kernels), each resize's (from, to); one to the same size, which a CPU
    # skips unless not all are finite, not counted
    plane = (0 if triton_kernels else height * width) + sum(
        h * w for before, (h, w) in zip(((height, width), *through[:-1]), through) if not (cpu and before == (h, w)))
    step = label_step(n, k, (1, plane), cpu)
    if tail and not triton_kernels:
        fused_sizes = tuple(cpu_labels.without_repeats(scores, through[-1] if through else (height, width),
                                                       fused_sizes))  # fmt: skip
        step = min(step, cpu_labels.classes_per_call(fused_sizes))
    buffers: dict[int, torch.Tensor] = {}  # per resize (-1: the float32 copy), made when a chunk first needs it

    def into(j: int, height: int, width: int, planes: int) -> torch.Tensor:
        """``planes`` planes of height x width of buffer ``j`` (one of ``step`` classes' planes)."""
        if j not in buffers:
            buffers[j] = torch.empty(n * step * height * width, dtype=torch.float32, device=scores.device)
        return buffers[j][: planes * height * width]

    def chunk(first: int) -> torch.Tensor:
        part = scores[:, first : first + step]
        # what resized (or the CPU's fused kernel) would copy, into a buffer; the GPU's kernels read it as it is
        if not triton_kernels and (part.dtype != torch.float32 or not part.is_contiguous()):
            part = into(-1, height, width, part.shape[0] * part.shape[1]).view(part.shape).copy_(part)
        for j, (h, w) in enumerate(through):
            if not unchanged_by_resize(part, (h, w)):
                part = resized(part, (h, w), into(j, h, w, part.shape[0] * part.shape[1]))
        return part

    if tail:
        best = torch.empty((n, *sizes[-1]), dtype=torch.float32, device=scores.device)
        index = torch.empty((n, *sizes[-1]), dtype=torch.int64, device=scores.device)
        for first in range(0, k, step):  # the first call starts the argmax (writes best and index)
            if triton_kernels:  # (one resize: fused_sizes is the last size alone)
                cuda_resample.resize_argmax_(chunk(first), best, index, first)
            else:
                cpu_labels.resize_argmax_(chunk(first), fused_sizes, best, index, first)
        return index
    best, index = chunk(0).max(dim=1)
    if step >= k:
        return index
    values, i = torch.empty_like(best), torch.empty_like(index)
    better, known = torch.empty_like(best, dtype=torch.bool), torch.empty_like(best, dtype=torch.bool)
    for first in range(step, k, step):
        torch.max(chunk(first), dim=1, out=(values, i))
        # better: not (values <= best), unless best is NaN: values above best, or a NaN after a number (a tie
        # keeps the earlier class, and the first NaN stays)
        torch.le(values, best, out=better).logical_not_().logical_and_(torch.eq(best, best, out=known))
        torch.where(better, values, best, out=best)
        torch.where(better, i.add_(first), index, out=index)
    return index


_TF32_LOCK = threading.Lock()
_tf32_holders = 0  # code inside no_tf32, in any thread: the settings are restored when the last one leaves
_tf32_saved: tuple[str, str, str, bool | None] = ("", "", "", None)  # read when the first holder enters
# The fp32_precision settings (torch >= 2.9, below the floor in requirements.py) and cuDNN's legacy allow_tf32 flag.
# torch reads that flag itself (torch.backends.cudnn.flags(), which torch.export's tracing enters) and raises unless
# the convolutions' and RNNs' settings agree with it: tf32 with True, ieee or none with False. Setting only the
# convolutions to ieee under the default True made an AOTInductor export on an H200 fail so ("a mix of the legacy and
# new APIs"); hence the flag is set first (setting it resets both to agree with it), then both settings. The flag is
# None where the program's own settings already disagreed (reading it raised): then it is left alone. torch's stubs
# lack torch.backends.cudnn.conv and .rnn (runtime attributes of the cudnn module): hence the ignores below
def _tf32_settings() -> tuple[str, str, str, bool | None]:
    cudnn = torch.backends.cudnn
    try:
        legacy: bool | None = bool(cudnn.allow_tf32)
    except RuntimeError:
        legacy = None
    return cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision, legacy  # type: ignore[attr-defined]


def _set_tf32(settings: tuple[str, str, str, bool | None]) -> None:
    conv, rnn, matmul, legacy = settings
    cudnn = torch.backends.cudnn
    if legacy is not None:
        cudnn.allow_tf32 = legacy
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, rnn  # type: ignore[attr-defined]
    torch.backends.cuda.matmul.fp32_precision = matmul


@contextlib.contextmanager
def no_tf32(active: bool = True) -> Iterator[None]:
    """TF32 off for cuDNN convolutions (and RNNs) and cuBLAS matmuls while ``active`` code runs; the settings
    restored when the last such block in the process ends (they are process-wide: a thread leaving its block must
    not switch TF32 back on under another still inside one). Through the fp32_precision settings and cuDNN's
    legacy flag, kept in agreement (see _tf32_settings)."""
    global _tf32_holders, _tf32_saved
    if not active:
        yield
        return
    with _TF32_LOCK:
        if _tf32_holders == 0:
            _tf32_saved = _tf32_settings()
            _set_tf32(("ieee", "ieee", "ieee", False))
        _tf32_holders += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _tf32_holders -= 1
            if _tf32_holders == 0:
                _set_tf32(_tf32_saved)


class FiniteVerdict(NamedTuple):
    """A float batch's finite check (Segmenter._batch): ``bounds``, its minimum and maximum (NaN where it holds a
    NaN), and for a GPU batch ``ready``, an event recorded on the scan's stream once their copy to pinned host memory
    is queued (:meth:`sent`). Reading the verdict waits for that event, which the scan reaches before the forward
    queued after it: the call returns without waiting for its own forward (the previous call's work on that stream,
    queued before the scan, is waited for), as a plain PyTorch call returns. Reading the GPU bounds themselves would
    wait for the whole stream. The bounds are compared with ±MAX_INPUT on the host: a GPU batch's check is two
    launches (the reduction, the copy), not a comparison, a conjunction and a copy after it."""

    bounds: torch.Tensor  # (2,): the minimum and the maximum, in the batch's dtype
    ready: Any  # torch.cuda.Event, or None where the bounds are on the host already

    @staticmethod
    def scanned(x: torch.Tensor) -> torch.Tensor:
        """``x``'s minimum and maximum in one (2,) tensor on its device: one reduction (aminmax, which passes NaN on)
        written into the two halves of one buffer, so that one copy takes both to the host."""
        bounds = torch.empty(2, dtype=x.dtype, device=x.device)
        torch.aminmax(x, out=(bounds[0], bounds[1]))
        return bounds

    @staticmethod
    def sent(bounds: torch.Tensor) -> FiniteVerdict:
        """The GPU ``bounds`` copied to pinned host memory (asynchronously) and an event after that copy."""
        host = torch.empty(bounds.shape, dtype=bounds.dtype, pin_memory=True)
        host.copy_(bounds, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(bounds.device))
        return FiniteVerdict(host, ready)

    def read(self) -> tuple[float, float]:
        """The batch's minimum and maximum (waiting for their copy where it is one)."""
        if self.ready is not None:
            self.ready.synchronize()
        low, high = self.bounds.tolist()
        return low, high

    def finite(self) -> bool:
        """The verdict: both bounds within ±MAX_INPUT (a NaN is not)."""
        low, high = self.read()
        return bool(low >= -MAX_INPUT and high <= MAX_INPUT)

    def unit_range(self) -> bool:
        """Whether the batch lies within 0..1 and is not constant, as pixels scaled to 0..1 and not CLIP-normalised
        do (torchvision's ToTensor, PIL.Image / 255): a CLIP-normalised photo holds negative values unless every
        pixel is brighter than CLIP's mean in every channel, and values within 0..1 only if also within one std
        above it. (A constant batch, such as warmup's zeros, an image of CLIP's mean colour, is not taken for one.)"""
        low, high = self.read()
        return bool(0 <= low < high <= 1)


class Segmenter:
    """Serve segmentation with a DenseCLIP model.

    Args:
        model: a DenseCLIP model (left untouched: the engine works on a copy).
        device: where to run; "cuda" needs a GPU.
        dtype: float32 (true float32 math: TF32 is switched off inside the engine), float16 or bfloat16 (the
            CLIP LayerNorms still compute in float32). float16 needs CUDA.
        mode: "whole" (one forward per image) or "slide" (mmseg's sliding window, crops batched).
        crop, stride: the sliding window of mode "slide"; default the architecture's (512/341, 640/426 for
            ViT-B/16); a ``crop`` given without ``stride`` slides by two thirds of it (as 341 of 512). Calls in mode
            "whole" do not use them; an AOTInductor package made from the Segmenter (export.to_aoti) takes its
            default image size and slide stride from them, whatever the mode.
        cuda_graphs: capture and replay CUDA graphs per input shape (CUDA only).
        max_graphs: how many input shapes keep a captured graph.
        capture_after: an input shape is captured on its capture_after-th call and replayed from then on; the calls
            before run eagerly (default 2: a stream of ever-new sizes never pays for captures it cannot reuse; 1
            captures at once).
        check_finite: reject float batches holding NaN or infinite values, or values past ±MAX_INPUT (16; a
            CLIP-normalised image lies within -1.8..2.2, a batch of 0..255 pixels that was not normalised reaches
            past it; 1e39 in a float64 batch turned infinite in the cast to float32, 7e4 in float16, and 1e20
            overflowed inside the network, the logits NaN), with a ValueError. A
            batch on the CPU is checked before the forward; a batch on a GPU is scanned on the GPU and its verdict
            (copied to page-locked memory) read after the forward is queued: the call waits for the scan, not for
            its forward (no idle gap before the forward, and the host one call ahead of the GPU at most); a pipeline
            that vouches for its inputs turns it off to keep the CPU further ahead.
        windows_per_batch: slide mode: at most this many windows (each holding one crop per image of the batch) go
            through one forward; None (the default): all of them at once, fastest, with memory growing with the
            window count (a small stride on a large image makes thousands). The logits are the same either way (to
            rounding: a convolution's kernel may depend on the batch size).
    """

    def __init__(
        self,
        model: DenseCLIP,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        mode: Mode = "whole",
        crop: int | None = None,
        stride: int | None = None,
        cuda_graphs: bool = True,
        *,
        max_graphs: int = 16,
        check_finite: bool = True,
        capture_after: int = 2,
        windows_per_batch: int | None = None,
    ) -> None:
        if not isinstance(model, DenseCLIP):
            raise ValueError(f"model must be a denseclip_fast.DenseCLIP, got {type(model).__name__}")
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            raise ValueError("model's weights are on the meta device (built without values): load them first, e.g. "
                             "denseclip_fast.load_checkpoint(path)")  # fmt: skip
        self.device = check_device(device, "device")  # a CPU, or a CUDA GPU that is present
        if self.device.type == "cuda" and self.device.index is None:  # the GPU current now, not at each call
            self.device = torch.device("cuda", torch.cuda.current_device())
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {given_dtype(dtype, DTYPES)}")
        if dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("dtype=torch.float16 needs a CUDA device; use float32 or bfloat16 on CPU")
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        cuda_graphs = as_bool("cuda_graphs", cuda_graphs)
        check_finite = as_bool("check_finite", check_finite)
        self.dtype, self.mode, self.check_finite = dtype, mode, check_finite
        self.crop = as_int("crop", model.config.slide_crop if crop is None else crop, MIN_IMAGE_SIDE,
                           " (the stride-32 level keeps a pixel)")  # fmt: skip
        if stride is None:  # another window without a stride: two thirds of it, as the exporters' default; the
            # architecture's kept a stride that could exceed the crop, or barely overlap
            stride = model.config.slide_stride if self.crop == model.config.slide_crop else two_thirds_stride(self.crop)
        self.stride = as_int("stride", stride)
        window_sizes(self.crop, self.stride)  # a stride past the crop: refused now, not at the first slide call
        self.windows_per_batch = None if windows_per_batch is None else as_int(
            "windows_per_batch", windows_per_batch, why=" or None")  # fmt: skip
        cpu = self.device.type == "cpu"  # linear layers through oneDNN, their QuickGELUs as its SiLU post-op
        # (cpu_linear.py), rewritten in float32: the weights it scales are rounded once, also in a bfloat16 engine;
        # on a GPU the image encoder's QuickGELUs as F.silu, their scale in the weights alike (rewrite.silu_mlps)
        float32_rewrite = silu_mlps if silu_mlps_wanted(self.device) else (rewrite_linears if cpu else None)
        self.model = prepare_for_inference(model, self.device, self.dtype, float32_rewrite)
        if native_layer_norms_wanted(self.device, self.dtype):  # ViT's CLIP LayerNorms in one kernel each
            native_layer_norms(self.model)
        if gemm_transposed_convolutions_wanted(self.device, self.dtype):  # a ViT pyramid's 2x2 transposed
            gemm_transposed_convolutions(self.model)  # convolutions as one GEMM each (cuda_convt.py)
        if group_norms_wanted(self.device, self.dtype):  # its GroupNorm(1, C)s' statistics over the whole GPU
            swap_group_norms(self.model)  # (cuda_group_norm.py)
        if cpu:  # bfloat16 convolutions with their ReLU and residual sum (cpu_conv.py); without the finite check the
            # ReLUs stay passes of their own, which keep NaN as the model does
            fuse_convolutions(self.model, relu=check_finite)
            channels_last_pyramid(self.model)
        # a GPU: 16-bit convolutions with their bias, ReLU and residual sum in one cuDNN call (cuda_conv.py), where
        # that checks out on this GPU; the reason where not (None where they are fused or on a CPU)
        self._cudnn_fusion_problem: str | None = None
        if self.device.type == "cuda":
            self._cudnn_fusion_problem = cudnn_fusion_problem(self.device, self.dtype) if check_finite else (
                "check_finite=False: the ReLUs stay PyTorch's, which keep NaN")  # fmt: skip
            if self._cudnn_fusion_problem is None:
                fuse_cudnn_convolutions(self.model)
                gemm_pointwise_convolutions(self.model)  # the 1x1 ones without a ReLU: cuBLAS, bias in its epilogue
            # the FPN head's 2x upsamplings, the FPN's top-down steps and the ResNet's average poolings by Triton
            # kernels (cuda_resample.py)
            cuda_resample.swap_resamplings(self.model)
            if projections.enabled():  # q/k/v of each attention in one GEMM (projections.py)
                projections.fuse_attention_projections(self.model)
            # the context decoder's residual sums with the LayerNorms after them by a Triton kernel (decoder_norms.py)
            decoder_norms.swap_decoder(self.model)
        # the positional embeddings per input size, made once (positions.py), after the rewrites that replace modules
        keep_positions(self.model)
        refuse_loading(self.model)  # its weights are rewritten: new ones go into a DenseCLIP and a new Segmenter
        self._text = self._embed(self.model.class_names)  # the buffers the graphs read; refreshed in place
        self._prefix = self._decoder_prefix(self._text)
        self._vocabularies: OrderedDict[tuple[str, ...], tuple[torch.Tensor, DecoderPrefix]] = OrderedDict()
        self._lock = threading.RLock()
        self._done: Any = None  # a CUDA event recorded after the last call's GPU work (see _turn)
        self._graphs = GraphCache(self._forward, enabled=cuda_graphs and self.device.type == "cuda",
                                  max_graphs=max_graphs, capture_after=capture_after)  # fmt: skip

    def __repr__(self) -> str:
        """What the engine serves and how, on one line (the prepared model is ``seg.model``)."""
        window = f", crop={self.crop}, stride={self.stride}" if self.mode == "slide" else ""
        graphs = f", cuda_graphs={self._graphs.enabled}" if self.device.type == "cuda" else ""
        return (f"Segmenter(arch={self.model.config.arch!r}, num_classes={self.model.num_classes}, "
                f"device={str(self.device)!r}, dtype={self.dtype}, mode={self.mode!r}{window}{graphs})")  # fmt: skip

    def __reduce__(self) -> NoReturn:
        """Refused with a TypeError that says what to send instead: pickle (multiprocessing, Ray, copy.deepcopy)
        would otherwise fail on the lock with a message naming no Segmenter."""
        raise TypeError("a Segmenter cannot be pickled or copied: it holds device state (a lock; on CUDA its "
                        "captured graphs, their buffers and events). Send the DenseCLIP model it was built from "
                        "(it pickles; or DenseCLIP.save and load_checkpoint) and build a Segmenter in each process")

    # ------------------------------------------------------------------ setup

    def _embed(self, names: Sequence[str], distinct: bool = False) -> torch.Tensor:
        """(K, D) class embeddings of ``names`` computed in float32, returned in the engine's dtype; ``distinct``:
        names that tokenise alike are refused (open vocabulary)."""
        with torch.no_grad(), self._math(always=True):
            return self.model.text_features(names, distinct).to(self.dtype)

    def _decoder_prefix(self, text: torch.Tensor) -> DecoderPrefix:
        """The context decoder's start for class embeddings ``text`` (K, D) in the engine's dtype: what it computes
        from the text alone (model/decoder.py), once per vocabulary, in the engine's arithmetic, not per image."""
        with torch.no_grad(), self._math():
            return self.model.context_decoder.prefix(text)

    def _math(self, always: bool = False) -> contextlib.ExitStack:
        """The engine's own arithmetic, whatever the caller's: float32 means float32 (TF32 off while a float32 engine,
        or with ``always`` any engine, runs on CUDA), and a caller's autocast region does not reach the engine,
        whose dtype is its own (and whose captured graphs would keep whatever autocast did at the capture)."""
        stack = contextlib.ExitStack()
        stack.enter_context(no_tf32((self.dtype == torch.float32 or always) and self.device.type == "cuda"))
        stack.enter_context(torch.autocast(self.device.type, enabled=False))
        return stack

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Entered with the lock held: on CUDA, this call's GPU work is queued after the previous call's, on whatever
        streams the calling threads use (the lock orders the host side only). The graphs' static input and output
        buffers, their shared memory pool and the embeddings buffer are then never used by two calls at once on
        the GPU. An event, not a synchronisation: the host goes on."""
        if self.device.type != "cuda":
            yield
            return
        stream = torch.cuda.current_stream(self.device)
        if self._done is not None:
            stream.wait_event(self._done)
        try:
            yield
        finally:
            done = torch.cuda.Event()
            done.record(stream)
            self._done = done

    # ------------------------------------------------------------------ the forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised (N, 3, h, w) in the engine's dtype -> the head's logits (N, K, h/4, w/4): what the graphs
        capture. The resize to the input size runs after the replay (see _run and _encode_decode)."""
        return self.model.logits_for(x, self._text, None, self._prefix)

    def _encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) -> (N, K, h, w) float32 logits in a new tensor (slide mode's windows; whole mode leaves the
        resize to its finish: see _run). The bilinear resize to the input size runs outside the captured graph,
        from the small logits (read in their dtype and layout by the GPU's Triton kernel, cast to float32 first
        elsewhere: resized): the full-size logits are written once, in float32 (no half-precision full-size copy
        written, read back and converted), they never alias the graph's output buffer (which the next replay
        overwrites), and the resize is in float32 as the official model's."""
        small = self._graphs(x)
        return resized(small, x.shape[2:])

    def _run(self, x: torch.Tensor) -> Pending:
        """Whole or slide logits for a normalised batch on the device, with the resize to its size still to make
        (whole: the head's output, (N, K, h/4, w/4), in the graph's output buffer, to be read before the next
        replay; slide: float32 (N, K, h, w), nothing to make). The graph's buffer never reaches a caller: whole mode
        always has a resize to make (h/4 is not h), which writes a new tensor (unchanged_by_resize skips only a
        resize to the same size). Whole mode hands the batch to the graphs as it is (on the device), to be
        converted to the engine's dtype and layout by the copy into the graph's static input (one copy, where
        converting first and then copying made two)."""
        if self.mode == "slide":
            x = x.to(self.device, self.dtype, memory_format=self._layout())
            return slide_inference(self._encode_decode, x, self.crop, self.stride, self.windows_per_batch), ()
        x = x.to(self.device)
        return self._graphs(x, (self.dtype, self._layout())), ((x.shape[2], x.shape[3]),)

    def _layout(self) -> torch.memory_format:
        return torch.channels_last

    def _prepare_raw(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (H, W, 3) images of one size -> the official test pipeline's normalised batch on the device."""
        x = stacked_for(images, self.device).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return normalize_keep_ratio(x, self.model.config.test_scale)

    def _each_group(
        self, batch: ImageBatch, fn: Callable[[torch.Tensor], Pending], finish: Finish
    ) -> torch.Tensor | list[torch.Tensor]:
        """Apply ``fn(normalised batch) -> (scores (N, C, h, w), resizes to the batch's size)`` per group of
        same-size images, then ``finish(scores, *resizes)``: ``resized_through`` (the scores), or ``labels`` (their
        argmax over C, which never holds all the classes' resized scores). A normalised float batch is finished at
        its own size; uint8 images at each image's own size (one more resize, as mmseg's), in input order: one
        (B, ...) tensor when all sizes agree, else a list of one tensor per image."""
        if batch.normalized is not None:
            scores, pending = fn(batch.normalized)
            return finish(scores, *pending)
        assert batch.raw is not None
        results: list[Any] = [None] * len(batch.raw)
        for group in batch.groups:
            height, width = batch.raw[group[0]].shape[:2]
            scores, pending = fn(self._prepare_raw([batch.raw[i] for i in group]))
            out = finish(scores, *pending, (height, width))
            if group == list(range(len(batch.raw))):  # one group in input order: no split and re-stack
                return out
            for i, o in zip(group, out):
                results[i] = o
        return results  # groups of other sizes: results of other sizes (all of one size were one group, above)

    # ------------------------------------------------------------------ public API

    def _batch(self, images: Images) -> tuple[ImageBatch, FiniteVerdict | None]:
        """``images`` checked (as_batch) and, with check_finite, a float batch scanned for NaN and infinities: a CPU
        batch is refused here, before any work; a GPU batch's verdict is on its way to the host (FiniteVerdict),
        for ``_finite_or_raise`` to read once the forward is queued (no idle round trip before it)."""
        batch = as_batch(images)
        self._check_sizes(batch)
        if not self.check_finite or batch.normalized is None:
            return batch, None
        x = batch.normalized
        with torch.no_grad():
            bounds = FiniteVerdict.scanned(x)
        if x.device.type == "cpu":
            self._finite_or_raise(FiniteVerdict(bounds, None), stacklevel=5)
            return batch, None
        if x.device.type != "cuda":  # another accelerator's bounds: read as they are once the forward is queued
            return batch, FiniteVerdict(bounds, None)
        return batch, FiniteVerdict.sent(bounds)

    def _check_sizes(self, batch: ImageBatch) -> None:
        """Images the network can take: at least MIN_IMAGE_SIDE pixels a side as they enter it (uint8 images
        after the keep-ratio resize to the test scale), so that the stride-32 level keeps a pixel."""
        if batch.normalized is not None:
            check_image_size(tuple(batch.normalized.shape[2:]), "images")
            return
        assert batch.raw is not None
        for i, image in enumerate(batch.raw):
            check_test_image_size(image.shape[:2], self.model.config.test_scale, f"images[{i}]")

    def _finite_or_raise(self, verdict: FiniteVerdict | None, stacklevel: int = 4) -> None:
        """The finite check's verdict: a ValueError for a batch it refuses, a warning for a batch within 0..1
        (``stacklevel``: the caller's call of the public method, through _trained_head or _open_vocab)."""
        if verdict is None:
            return
        if not verdict.finite():
            raise ValueError(f"images contain NaN or infinite values, or values past ±{MAX_INPUT:g}: a float batch "
                             "is CLIP-normalised (0..255 RGB through preprocess.normalize lies within -1.8..2.2); "
                             "pass 0..255 pixels as uint8 images, which the engine normalises, or through "
                             "preprocess.normalize (Segmenter(check_finite=False) turns this check off)")  # fmt: skip
        if verdict.unit_range():
            low, high = verdict.read()
            warnings.warn(f"images: a float batch within 0..1 (min {low:.3g}, max {high:.3g}) looks like pixels "
                          "scaled to 0..1 (torchvision's ToTensor), not CLIP-normalised ones (a photo's hold negative "
                          "values): its results are likely wrong. Pass 0..255 pixels as uint8 images, which the "
                          "engine normalises, or preprocess.normalize(x * 255); Segmenter(check_finite=False) turns "
                          "this check off", UnnormalizedImagesWarning, stacklevel=stacklevel)  # fmt: skip

    def logits(self, images: Images) -> torch.Tensor | list[torch.Tensor]:
        """(B, K, H, W) float32 logits, at the input size for a normalised float batch and at each image's own size
        for uint8 images; a list of (K, H_i, W_i) when uint8 images differ in size.

        ``images`` (as predict and open_vocab take them): uint8 RGB images, each a (H, W, 3) tensor or numpy array
        or a PIL image, a list of them (sizes may differ) or a (B, H, W, 3) batch, which go through the official test
        pipeline; or a float (B, 3, H, W) tensor, taken as CLIP-normalised already (preprocess.normalize)."""
        return self._trained_head(images, resized_through)

    def predict(self, images: Images, names: Sequence[str] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """(B, H, W) int64 label maps (a list when uint8 images differ in size): the argmax of :meth:`logits`, or
        with ``names`` of :meth:`open_vocab`, equal to it pixel for pixel (ties to the first class). The resized
        scores are never held for all classes at once: they are made a chunk of classes at a time (see labels), as
        a photo's full-size scores would take gigabytes (slide mode's windows are accumulated at the network's
        input size for all classes, as logits does)."""
        if names is not None:
            return self._open_vocab(images, names, labels)
        return self._trained_head(images, labels)

    def _trained_head(self, images: Images, finish: Finish) -> torch.Tensor | list[torch.Tensor]:
        """The trained head's logits of ``images``, finished by ``finish`` (see _each_group)."""
        batch, finite = self._batch(images)
        with self._lock, self._turn(), torch.no_grad(), self._math():
            out = self._each_group(batch, self._run, finish)
        self._finite_or_raise(finite)
        return out

    def open_vocab(self, images: Images, names: Sequence[str]) -> torch.Tensor | list[torch.Tensor]:
        """(B, K', H, W) float32 pixel-text cosine scores of any ``names`` (context decoder applied), from the
        whole image's local embedding map, upsampled to the image (a list of (K', H_i, W_i) when uint8 images
        differ in size, as logits). Each vocabulary's embeddings are cached."""
        return self._open_vocab(images, names, resized_through)

    def _open_vocab(self, images: Images, names: Sequence[str], finish: Finish) -> torch.Tensor | list[torch.Tensor]:
        check_class_names(names, distinct=True)  # before the cache key is made of them; tokens checked on a miss
        batch, finite = self._batch(images)
        with self._lock, self._turn(), torch.no_grad(), self._math():
            key = tuple(names)
            cached = self._vocabularies.get(key)
            if cached is None:
                text = self._embed(key, distinct=True)
                cached = self._vocabularies[key] = text, self._decoder_prefix(text)
                while len(self._vocabularies) > MAX_VOCABULARIES:
                    self._vocabularies.popitem(last=False)
            self._vocabularies.move_to_end(key)  # the least recently used goes first (the oldest went, used or not)
            text, prefix = cached

            def scores(x: torch.Tensor) -> Pending:
                x = x.to(self.device, self.dtype, memory_format=self._layout())
                feats = self.model.backbone(x)
                z = feats.local_feat
                s = ops.pixel_text_score(z, self.model.context_prompt(feats, text, prefix).to(z.dtype))
                return s, ((x.shape[2], x.shape[3]),)

            out = self._each_group(batch, scores, finish)
        self._finite_or_raise(finite)
        return out

    def set_classes(self, names: Sequence[str]) -> None:
        """Reword the vocabulary (exactly K names, each at most 3 BPE tokens); the embeddings and the context
        decoder's start from them are recomputed once and written into the buffers the captured graphs read."""
        k = self.model.num_classes
        if isinstance(names, Sequence) and not isinstance(names, str) and len(names) != k:
            raise ValueError(f"set_classes needs exactly {k} names (the head has {k} outputs), got {len(names)} "
                             "names; seg.open_vocab(images, names) and seg.predict(images, names) score any number "
                             "of names")  # fmt: skip
        with self._lock, self._turn():
            self.model.set_classes(names)
            # into the buffer the graphs read; made under torch.inference_mode (a Segmenter built there), it takes
            # in-place writes only in inference mode (it raised after the vocabulary had changed)
            with torch.inference_mode(self._text.is_inference()):
                text = self._embed(self.model.class_names)
                self._text.copy_(text)
                for buffer, value in zip(self._prefix, self._decoder_prefix(text)):
                    buffer.copy_(value)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def overlay(
        self, image: Image, labels: torch.Tensor | np.ndarray, alpha: float = 0.5, names: Sequence[str] | None = None,
        ignore_index: int | None = IGNORE,
    ) -> npt.NDArray[np.uint8]:  # fmt: skip
        """Colour the label map over a uint8 (H, W, 3) image: the trained head's labels in the checkpoint's palette
        (else a generated one); with ``names``, the labels of ``predict(images, names)`` in a generated palette of
        ``len(names)`` colours (the command line's open-vocabulary overlays). A ground-truth map's pixels labelled
        ``ignore_index`` (255; None: none), when that is no class, are left unpainted."""
        img = as_batch(image).raw
        if img is None or len(img) != 1:
            raise ValueError("overlay takes one uint8 (H, W, 3) image")
        if isinstance(labels, torch.Tensor) and (labels.is_meta or labels.layout != torch.strided):
            kind = "meta" if labels.is_meta else "sparse"
            raise ValueError(f"labels must be a dense tensor with values, got a {kind} tensor")
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if names is None:
            palette = self.model.palette or default_palette(self.model.num_classes)
            mask = ignored(labels, palette, ignore_index)  # (colorize refuses non-integer labels, naming them)
            top = (labels if mask is None else labels[~mask]).max(initial=0) if labels.dtype.kind in "iu" else 0
            if top >= len(palette):
                left = "" if ignore_index is None else (f" (a ground truth's ignored pixels, {ignore_index}, are "
                                                        "left unpainted)")  # fmt: skip
                raise ValueError(f"labels go up to {top}, past this segmenter's {len(palette)} classes: for the labels "
                                 f"of predict(images, names), give overlay the same names{left}")  # fmt: skip
        else:
            check_class_names(names)
            palette = default_palette(len(names))
        return blend(img[0].numpy(), labels, palette, alpha, ignore_index)

    def warmup(
        self, size: Sequence[int], batch: int = 1, *, raw: bool = True, names: Sequence[str] | None = None
    ) -> None:
        """Pay now, on a blank batch, what the first calls of logits or predict with images of this size would
        pay: the Triton kernels' compilation for the shapes the network launches, cuDNN's algorithm search and (on
        CUDA with cuda_graphs) the CUDA graph's capture, which needs ``capture_after`` calls of a shape. A server
        calls it for each (size, batch) it will be sent before it takes requests; later calls of that shape replay
        the graph (while at most ``max_graphs`` shapes are kept). With ``names``, the open vocabulary is warmed
        instead: what ``open_vocab(images, names)`` and ``predict(images, names)`` would pay first (the names'
        embeddings, computed once and cached, and the kernels for their class count; it runs eagerly, with no
        graph to capture), one call.

        Args:
            size: (height, width) of the images as they will be passed: uint8 images before the test pipeline's
                keep-ratio resize (``raw=True``), or an already normalised float batch (``raw=False``).
            batch: how many images a call will hold.
            raw: uint8 images (the resize and normalisation run too) or a normalised float batch.
            names: a vocabulary of open_vocab to warm (checked as open_vocab checks it), instead of the trained
                head.
        """
        if isinstance(size, (np.ndarray, torch.Tensor)) and size.ndim == 1:  # e.g. an image's shape[:2] from numpy
            size = size.tolist()
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
            raise ValueError(f"size must be (height, width), got {size!r}")
        height, width = (as_int(name, side) for name, side in zip(("size[0] (height)", "size[1] (width)"), size))
        batch = as_int("batch", batch)
        raw = as_bool("raw", raw)
        if raw:  # host images, as numpy arrays and PIL images come (staged in page-locked memory on CUDA)
            check_test_image_size((height, width), self.model.config.test_scale, "size")
            shape, dtype, device = (batch, height, width, 3), torch.uint8, None
        else:
            check_image_size((height, width), "size")
            shape, dtype, device = (batch, 3, height, width), self.dtype, self.device
        try:
            images = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, TypeError) as exc:  # past memory, or past int64 ("Overflow when unpacking long")
            reason = str(exc).strip().split("\n", 1)[0]
            raise ValueError(f"size {(height, width)} and batch {batch}: a blank batch of that size cannot be made "
                             f"here ({reason})") from exc  # fmt: skip
        # finished as predict finishes: its resizes a chunk of classes at a time (a photo's full-size float32 scores
        # for all classes would take gigabytes, which predict never holds), its buffers' first allocation paid
        if names is not None:
            self._open_vocab(images, names, labels)
            return
        for _ in range(self._graphs.capture_after if self._graphs.enabled else 1):
            self._trained_head(images, labels)

    @property
    def captured_graphs(self) -> int:
        """How many input shapes have been captured into CUDA graphs so far."""
        return self._graphs.captures

    @property
    def cudnn_fusion_problem(self) -> str | None:
        """Why a CUDA engine's convolutions are PyTorch's own rather than cuDNN's fused convolution, bias, ReLU and
        residual sum (engine/cuda_conv.py): its check on this GPU failed or differed, a float32 engine,
        ``check_finite=False`` or ``DENSECLIP_FAST_CUDNN_FUSION=0``; None where they are fused, and on a CPU (whose
        convolutions are oneDNN's: cpu_conv.py)."""
        return self._cudnn_fusion_problem

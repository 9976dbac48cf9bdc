"""The modules that the exporters trace: what a deployed DenseCLIP computes, with nothing Python-side left.

    ImageGraph(model, embeddings)   normalised image (B, 3, H, W) -> logits (B, K, H, W), class embeddings baked in
    ImageGraph(model, None)         (image, class embeddings (K, D)) -> logits: the vocabulary is an input
    TextGraph(model)                class tokens (K, L) int64 -> class embeddings (K, D), through the learned contexts

Both image graphs are the engine's per-forward function (``DenseCLIP.logits_for``: image encoder, context decoder,
fused score/concat, FPN, head), with the resize to the input size inside the graph, on a model prepared as the
engine prepares it (BatchNorm folded, one dtype). The ONNX graphs resize in their dtype and return it; with
``float32_logits`` (the AOTInductor package) the head's logits are resized in float32 and returned so, as the
Segmenter does.
"""

from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..checkpoints.io import path_argument, written_atomically
from ..config import MAX_EXPORT_SIDE, MIN_IMAGE_SIDE
from ..engine.rewrite import prepare_for_inference
from ..model import DenseCLIP
from ..model.slide import two_thirds_stride
from ..validation import check_writable_file

GraphKind = Literal["image", "image_with_text", "text"]
GRAPHS: tuple[str, ...] = ("image", "image_with_text", "text")
# the graphs are traced at this batch size with the batch dimension symbolic: torch.export may specialise a size-1
# dimension into a constant (its 0/1 specialisation; the graph would then reject batch 3). torch 2.14 given the Dim
# did not (a batch-1 trace ran at batch 3), but a trace at 2 is safe in every version
TRACE_BATCH = 2
# One export (its trace and compilation) at a time in the process. to_onnx swaps sys.stdout and the warnings filters
# while torch.onnx.export runs, process-wide: two exports in two threads left them swapped for good (the one ending
# last restored what the other had put there: every later print of the process went into a discarded buffer). Dynamo,
# which traces for torch.export, keeps process-wide state of its own as well.
EXPORT_LOCK = threading.Lock()


class ImageGraph(nn.Module):
    """Normalised images -> logits. ``embeddings`` (K, D) are baked in as a buffer; None makes them an input."""

    class_embeddings: torch.Tensor  # the buffer, registered only when the embeddings are baked in

    def __init__(self, model: DenseCLIP, embeddings: torch.Tensor | None, float32_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.text_input = embeddings is None
        self.float32_logits = float32_logits
        if embeddings is not None:
            self.register_buffer("class_embeddings", embeddings)

    def forward(self, image: torch.Tensor, class_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        text = class_embeddings if self.text_input else self.class_embeddings
        assert text is not None
        if self.float32_logits:  # the Segmenter's: the 1/4-size logits cast to float32, then resized
            from ..engine.segmenter import resized

            return resized(self.model.logits_for(image, text, None), image.shape[2:])
        return self.model.logits_for(image, text, image.shape[2:])


class TextGraph(nn.Module):
    """Class tokens (K, L) from :func:`denseclip_fast.model.text.tokenize_class_names` -> class embeddings (K, D).

    The graph computes the prompts' shared start (SOT and the learned contexts) once and then all L - 1 later
    positions of every class (P + K * (L - 1) rows, not K * (L + n_ctx): ContextTextEncoder's shared start with the
    span fixed at L, since an exported graph cannot read the tokens to shorten it). Exact for tokens as
    tokenize_class_names makes them: every row starts with SOT and ends its name with EOT after it."""

    def __init__(self, model: DenseCLIP, dtype: torch.dtype) -> None:
        super().__init__()
        self.text_encoder = model.text_encoder.to(dtype)
        self.contexts = nn.Parameter(model.contexts.detach().to(dtype), requires_grad=False)

    def forward(self, class_tokens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(class_tokens, self.contexts, span=class_tokens.shape[1])


def check_image_size(model: DenseCLIP, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    """(H, W) of the exported graph: ``image_size`` as an int or (H, W), by default the sliding-window crop (the
    size the network sees in the official slide inference)."""
    if image_size is None:
        return model.config.slide_crop, model.config.slide_crop
    try:  # ints of any kind (a NumPy shape's, e.g.), not bools; not a set's (which would be H and which W?)
        size = (image_size, image_size) if isinstance(image_size, numbers.Integral) else tuple(image_size)  # type: ignore[arg-type]
    except TypeError:  # a float, ...: not iterable
        size = ()
    if isinstance(image_size, (AbstractSet, Mapping)):
        size = ()
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size):
        raise ValueError(f"image_size must be an int or (H, W) ints, got {image_size!r}")
    size = (int(size[0]), int(size[1]))
    if min(size) < MIN_IMAGE_SIDE or max(size) > MAX_EXPORT_SIDE:
        raise ValueError(f"image_size must be {MIN_IMAGE_SIDE} to {MAX_EXPORT_SIDE} on each side, got {size}")
    return size[0], size[1]


def default_window_stride(size: tuple[int, int], crop: int, stride: int) -> tuple[int, int]:
    """The slide stride recorded with a graph or package of ``size`` (H, W): the model's (or Segmenter's) ``stride``
    for its ``crop`` x ``crop`` window, two thirds of the window otherwise (the official configs' 341 of 512)."""
    if size == (crop, crop):
        return stride, stride
    return two_thirds_stride(size[0]), two_thirds_stride(size[1])


def output_path(path: str | os.PathLike[str], name: str = "path") -> Path:
    """``path`` as a Path if an exporter can write its file there: not a directory, in a directory that exists or
    that makedirs can create (validation.check_writable_file); ValueError naming ``name`` otherwise. The exporters
    check it first: their file is written after a trace or a build of seconds to minutes."""
    text = path_argument(path, name)
    check_writable_file(text, name, create_parents=True)
    return Path(text)


def write_file(path: Path, data: bytes | memoryview, what: str) -> None:
    """Write the bytes ``data`` to ``path`` through :func:`written_atomically`."""
    with written_atomically(path, what) as partial, open(partial, "wb") as f:
        f.write(data)


def build_graph(
    model: DenseCLIP, graph: str, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, DenseCLIP]:
    """The module for ``graph`` on a prepared copy of ``model`` (which is returned too)."""
    if not isinstance(model, DenseCLIP):
        from ..engine import Segmenter

        # to_aoti takes a Segmenter, so to_onnx was given one: name the model that the graph is made from
        hint = ": pass the DenseCLIP model it was built from" if isinstance(model, Segmenter) else ""
        raise ValueError(f"model must be a denseclip_fast.DenseCLIP, got {type(model).__name__}{hint}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    prepared = prepare_for_inference(model, device, dtype)
    if graph == "text":
        return TextGraph(prepared, dtype).eval(), prepared
    if graph == "image_with_text":
        return ImageGraph(prepared, None).eval(), prepared
    with torch.no_grad():
        embeddings = prepared.text_features(prepared.class_names).to(dtype)
    return ImageGraph(prepared, embeddings).eval(), prepared


def example_inputs(
    graph: str, prepared: DenseCLIP, size: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes to trace ``graph`` with (batch and class count symbolic)."""
    if graph == "text":
        tokens = prepared.class_tokens.to(device)
        return (tokens.repeat(TRACE_BATCH, 1) if tokens.shape[0] < TRACE_BATCH else tokens,)
    image = random_input((TRACE_BATCH, 3, *size), dtype, device)
    if device.type == "cuda":
        image = image.contiguous(memory_format=torch.channels_last)
    if graph == "image_with_text":
        return image, random_input((prepared.num_classes, prepared.config.embed_dim), dtype, device)
    return (image,)


def random_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Standard normal values of ``shape`` from a generator of their own: an export leaves the caller's random
    numbers (torch.manual_seed's sequence) as they were."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return values.to(device=device, dtype=dtype)

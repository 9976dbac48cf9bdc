"""CUDA-graph capture of a forward function, one graph per input signature.

The first call with a new (shape, dtype, device, layout) warms the function up on a side stream (cuDNN and Triton
pick and compile their kernels there), then captures one call into a CUDA graph that reads a static input buffer
and writes a static output. Later calls with that signature copy their input into the buffer and replay the graph:
one launch instead of hundreds. Graphs share one memory pool; the least recently used are dropped past
``max_graphs``. Tensors the function closes over (weights, the cached class embeddings) are baked into the graphs:
change them only in place (``copy_``), or call :meth:`GraphCache.clear`.

The capture itself needs a GPU; the cache logic takes any ``capture`` callable, which is how it is tested on CPU.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..validation import as_int
from .fallback import EngineFallbackWarning

Forward = Callable[[torch.Tensor], torch.Tensor]
Layout = tuple[torch.dtype, torch.memory_format]  # what a call's input is converted to (GraphCache.__call__)

# One capture at a time in the process, each on its own stream and in thread-local error mode: a capture in the
# default global mode fails (and is invalidated) when any other thread allocates or synchronises meanwhile, and
# torch.cuda.graph's shared default capture stream belongs to whichever GPU was current first.
_CAPTURE_LOCK = threading.Lock()


def signature(x: torch.Tensor, layout: Layout | None = None) -> tuple[Any, ...]:
    """What a captured graph is specific to: x's shape, dtype, device and strides; with ``layout`` (dtype, memory
    format) those of x converted to it, whatever x's own (a graph's static input takes the conversion in its copy)."""
    if layout is None:
        return tuple(x.shape), x.dtype, x.device, x.stride()
    return tuple(x.shape), layout[0], x.device, layout[1]


def converted(x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """x in ``layout``'s dtype and memory format (x itself where it is so already, or without a layout)."""
    return x if layout is None else x.to(dtype=layout[0], memory_format=layout[1])


class CapturedForward:
    """One CUDA graph of ``fn`` for inputs like ``example``."""

    def __init__(self, fn: Forward, example: torch.Tensor, pool: Any = None, warmup: int = 2) -> None:
        self.device = example.device
        with torch.cuda.device(self.device), _CAPTURE_LOCK:  # the example's GPU is current, whichever was before
            # never an inference tensor, also when captured under torch.inference_mode (a warm-up at start-up, say):
            # later calls outside inference mode (another thread's) write it in place, which an inference tensor
            # refuses; a normal tensor takes the copy in and out of inference mode
            with torch.inference_mode(False):
                self.static_input = example.clone()
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(self.static_input)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                self.static_output = fn(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The output buffer, overwritten by the next replay: consume or clone it before calling again. ``x`` is
        copied into the static input, converted to its dtype and layout on the way (one copy)."""
        with torch.cuda.device(self.device):  # replays go to the current stream of the graph's own GPU
            self.static_input.copy_(x)
            self.graph.replay()
        return self.static_output


# capture_after, at most: warmup runs capture_after forwards of a shape (10**30 was accepted: a warmup without end)
MAX_CAPTURE_AFTER = 1000


class GraphCache:
    """``cache(x)`` runs ``fn(x)`` through the graph captured for x's signature, capturing it on the
    ``capture_after``-th call with that signature (the calls before run ``fn`` eagerly).

    Args:
        fn: the forward to capture; it must be capturable (static shapes, no host synchronisation).
        enabled: False runs ``fn`` eagerly (the CPU path, or CUDA graphs switched off).
        capture: builds a replayable object from (fn, example, pool); CapturedForward on a GPU.
        max_graphs: how many signatures keep a graph; the least recently used is dropped beyond.
        capture_after: a capture costs two warm-up forwards, the capture and a device synchronisation; a stream of
            ever-new sizes (keep-ratio resized images in whole mode) would pay that on every call and reuse
            nothing, so a signature is captured once it has come back (2, the default), or at once (1). At most
            MAX_CAPTURE_AFTER: Segmenter.warmup runs that many forwards (for no graphs at all, enabled=False).

    A capture that fails (a RuntimeError: out of memory, an operation a graph cannot hold) is said once in an
    EngineFallbackWarning (a RuntimeWarning), and that signature runs eagerly from then on (until :meth:`clear`): the
    call, and the engine, go on working instead of raising, and of trying again every call.
    """

    def __init__(
        self,
        fn: Forward,
        enabled: bool = True,
        capture: Callable[[Forward, torch.Tensor, Any], Forward] | None = None,
        max_graphs: int = 16,
        capture_after: int = 2,
    ) -> None:
        self.fn = fn
        self.enabled = enabled
        self.capture = capture or (lambda f, x, pool: CapturedForward(f, x, pool))
        self.max_graphs = as_int("max_graphs", max_graphs)
        self.capture_after = as_int("capture_after", capture_after, maximum=MAX_CAPTURE_AFTER,
                                    why_most=" (warmup runs that many forwards to capture a shape; cuda_graphs=False "
                                             "captures none)")  # fmt: skip
        self.graphs: OrderedDict[tuple[Any, ...], Forward] = OrderedDict()
        self.sightings: OrderedDict[tuple[Any, ...], int] = OrderedDict()  # eager calls of signatures not captured
        self.captures = 0
        self.failed: OrderedDict[tuple[Any, ...], None] = OrderedDict()  # signatures whose capture failed: eager
        self._pool: Any = None

    def __call__(self, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """``fn`` of x converted to ``layout`` (dtype, memory format; None: as it is), through the graph captured
        for that signature: a replay copies x into the graph's static input, converting it in the same copy (no
        converted x made first), an eager call converts it."""
        if not self.enabled:
            return self.fn(converted(x, layout))
        key = signature(x, layout)
        graph = self.graphs.get(key)
        if graph is None:
            example = converted(x, layout)
            if key in self.failed:
                return self.fn(example)
            seen = self.sightings.pop(key, 0) + 1
            if seen < self.capture_after:
                self.sightings[key] = seen
                while len(self.sightings) > 4 * self.max_graphs:
                    self.sightings.popitem(last=False)
                return self.fn(example)
            if self._pool is None and x.is_cuda:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                graph = self.capture(self.fn, example, self._pool)
            except RuntimeError as exc:
                self.failed[key] = None
                while len(self.failed) > 4 * self.max_graphs:
                    self.failed.popitem(last=False)
                warnings.warn(
                    f"capturing a CUDA graph for inputs of shape {tuple(x.shape)} ({example.dtype}) failed, so that "
                    f"shape runs eagerly from now on: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
                    EngineFallbackWarning,
                    stacklevel=2,
                )
                return self.fn(example)
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return graph(x)

    def clear(self) -> None:
        """Drop every graph (after changing what the captured function reads other than in place)."""
        self.graphs.clear()
        self.sightings.clear()
        self.failed.clear()

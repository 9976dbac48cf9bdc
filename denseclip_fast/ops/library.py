"""torch.library registrations of the C++ operators (``torch.ops.denseclip_fast.*``, defined in csrc/registration.cpp):
fake (meta) kernels for tracing, and the autograd formulas, whose backward runs the C++ backward operators.

Importing this module loads the extension; it is imported by :mod:`denseclip_fast.ops` when the extension exists.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .checks import (
    check_attention_backward_inputs,
    check_attention_inputs,
    check_concat_feature,
    check_score_backward_inputs,
    check_score_inputs,
)
from .extension import extension_available

OPS = ("pixel_text_score", "score_concat", "context_attention")


def _image_strides_are(shape: Sequence[Any], stride: Sequence[Any], expected: tuple[Any, Any, Any]) -> bool:
    return all(shape[d] == 1 or stride[d] == expected[d - 1] for d in (1, 2, 3))


def memory_format_of(shape: Sequence[Any], stride: Sequence[Any]) -> torch.memory_format:
    """:func:`score_memory_format` from a 4-D tensor's sizes and strides."""
    _, c, h, w = shape
    if _image_strides_are(shape, stride, (1, w * c, c)) and not _image_strides_are(shape, stride, (h * w, w, 1)):
        return torch.channels_last
    return torch.contiguous_format


def score_memory_format(visual: torch.Tensor) -> torch.memory_format:
    """The layout of every (B, *, H, W) output of a score operator: NHWC when each image of visual has channels_last
    strides (and not also NCHW ones), else NCHW. The same rule as csrc/registration.cpp.

    The batch stride is not looked at: a graph that torch.export or AOTInductor compiled at batch B assumes the layout
    it saw, and must get the same layout when it runs at batch 1 (where any tensor's batch stride is arbitrary)."""
    if visual.dim() != 4:
        return torch.contiguous_format
    try:
        return _memory_format_cached(tuple(visual.shape), visual.stride())
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) do not hash
        return memory_format_of(visual.shape, visual.stride())


@functools.lru_cache(maxsize=1024)
def _memory_format_cached(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.memory_format:
    return memory_format_of(shape, stride)  # a few microseconds of Python, once per size and strides


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def empty_score(visual: torch.Tensor, channels: int) -> torch.Tensor:
    """The (B, channels, H, W) output of a score operator, in visual's dtype, device and score layout."""
    b, _, h, w = visual.shape
    return torch.empty(
        (b, channels, h, w), dtype=visual.dtype, device=visual.device, memory_format=score_memory_format(visual)
    )


# ------------------------------------------------------------------------------------------------ fake kernels


def _fake_score(visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    check_score_inputs(visual, text)
    return empty_score(visual, text.shape[-2])


def _fake_norm(visual: torch.Tensor) -> torch.Tensor:
    b, _, h, w = visual.shape
    return visual.new_empty((b, h, w), dtype=lse_dtype(visual))


def _fake_score_with_norm(
    visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_score(visual, text, scale), _fake_norm(visual)


def _fake_score_backward(
    grad: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float, score_map: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    check_score_backward_inputs(grad, visual, text, score_map, norm)
    grad_visual = torch.empty_like(visual, memory_format=score_memory_format(visual))
    return grad_visual, torch.empty_like(text, memory_format=torch.contiguous_format)


def _fake_concat(feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    check_score_inputs(visual, text)
    check_concat_feature(feature, visual)
    return empty_score(visual, feature.shape[1] + text.shape[-2])


def _fake_concat_with_norm(
    feature: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_concat(feature, visual, text, scale), _fake_norm(visual)


def _fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_inputs(q, k, v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=lse_dtype(q))


def _fake_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_attention_backward_inputs(grad_out, q, k, v, out, lse)
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))  # fmt: skip


# ------------------------------------------------------------------------------------------------ autograd


def returns_norm(suffix: str) -> bool:
    """Whether ``denseclip_fast::pixel_text_score<suffix>`` (and score_concat) also return the pixel norms |v|, a
    (B, H, W) float32 tensor (float64 for float64 inputs) for the backward, which then need not find them in a pass
    over the visual map: the C++ and the Triton operators do (a backend without them could return the score alone;
    ``ops.*`` return the score)."""
    return len(getattr(torch.ops.denseclip_fast, f"pixel_text_score{suffix}").default._schema.returns) == 2


def register_autograd(suffix: str = "") -> None:
    """Autograd of ``denseclip_fast::{pixel_text_score, score_concat, context_attention}<suffix>``; the backward
    runs the same backend's backward operators (``..._backward<suffix>``). The score backward gets the
    forward's output (``score_map``, in every backend's schema) where a kernel uses it: the Triton backend's, and
    the C++ operator's on CUDA (its tensor-core kernels; the CPU one computes the term itself and is not given it);
    and the pixel norms the forward returns (:func:`returns_norm`; not differentiable, as the attention's
    log-sum-exp). Saving the output costs nothing where the next layer keeps it anyway (score_concat's
    buffer is the FPN convolution's input), else a (B, K, H, W) tensor; and the output must then not be modified
    in place before the backward (autograd's version check says so)."""
    ops = torch.ops.denseclip_fast
    score_backward = getattr(ops, f"pixel_text_score_backward{suffix}")
    attention_backward = getattr(ops, f"context_attention_backward{suffix}")
    takes_score = any(a.name == "score_map" for a in score_backward.default._schema.arguments)
    with_norm = returns_norm(suffix)

    def wants_map(visual: torch.Tensor) -> bool:
        return takes_score and (suffix == "_triton" or visual.device.type == "cuda")

    def save_score(ctx: Any, visual: torch.Tensor, text: torch.Tensor, output: Any) -> None:
        out, norm = output if with_norm else (output, None)
        if norm is not None:
            ctx.mark_non_differentiable(norm)
        ctx.save_for_backward(visual, text, out if wants_map(visual) else None, norm)

    def run_backward(ctx: Any, grad: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The score backward on grad's (and the saved output's) channels from ``channels`` on."""
        visual, text, out, norm = ctx.saved_tensors
        extra: tuple[Any, ...] = ()
        if takes_score:
            extra = (None if out is None else out[:, channels:],) + ((norm,) if with_norm else ())
        return score_backward(grad[:, channels:], visual, text, ctx.scale, *extra)

    def score_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        visual, text, scale = inputs
        save_score(ctx, visual, text, output)
        ctx.scale = scale

    def score_grads(ctx: Any, grad: torch.Tensor, *_grad_norm: Any) -> tuple[Any, ...]:
        grad_visual, grad_text = run_backward(ctx, grad, 0)
        return grad_visual, grad_text, None

    def concat_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        feature, visual, text, scale = inputs
        save_score(ctx, visual, text, output)
        ctx.scale, ctx.feature_channels = scale, feature.shape[1]

    def concat_grads(ctx: Any, grad: torch.Tensor, *_grad_norm: Any) -> tuple[Any, ...]:
        cf = ctx.feature_channels
        if not any(ctx.needs_input_grad[1:3]):  # the feature alone wants one: no score backward
            return grad[:, :cf], None, None, None
        grad_visual, grad_text = run_backward(ctx, grad, cf)
        return grad[:, :cf], grad_visual, grad_text, None

    def attention_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        q, k, v = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)  # the log-sum-exp is an aid to the backward, not a result

    def attention_grads(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        return attention_backward(grad_out, q, k, v, out, lse)

    lib = torch.library
    lib.register_autograd(f"denseclip_fast::pixel_text_score{suffix}", score_grads, setup_context=score_setup)
    lib.register_autograd(f"denseclip_fast::score_concat{suffix}", concat_grads, setup_context=concat_setup)
    lib.register_autograd(
        f"denseclip_fast::context_attention{suffix}", attention_grads, setup_context=attention_setup
    )


def register_fakes(suffix: str = "") -> None:
    """Fake kernels of ``denseclip_fast::<op><suffix>``: output shapes, dtypes and layouts without computing.
    The Triton operators get them too, so that fake-tensor tracing never launches a kernel (under Triton's
    interpreter a launch on fake tensors fails)."""
    lib = torch.library
    with_norm = returns_norm(suffix)
    lib.register_fake(f"denseclip_fast::pixel_text_score{suffix}", _fake_score_with_norm if with_norm else _fake_score)
    lib.register_fake(f"denseclip_fast::pixel_text_score_backward{suffix}", _fake_score_backward)
    lib.register_fake(f"denseclip_fast::score_concat{suffix}", _fake_concat_with_norm if with_norm else _fake_concat)
    lib.register_fake(f"denseclip_fast::context_attention{suffix}", _fake_attention)
    lib.register_fake(f"denseclip_fast::context_attention_backward{suffix}", _fake_attention_backward)


def _score_flops(visual_shape: Any, text_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    b, c, h, w = visual_shape
    return 2 * b * text_shape[-2] * c * h * w  # the dot products (the normalisations are O(B C H W + K C))


def _concat_flops(feature_shape: Any, visual_shape: Any, text_shape: Any, *args: Any, **kwargs: Any) -> int:
    return _score_flops(visual_shape, text_shape)


def _score_backward_flops(grad_shape: Any, visual_shape: Any, text_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * _score_flops(visual_shape, text_shape)  # grad x text for the pixels, grad^T x visual for the text


def _attention_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    b, h, lq, d = q_shape
    return 4 * b * h * lq * k_shape[2] * d  # Q K^T and P V, as torch counts scaled_dot_product_attention


def _attention_backward_flops(grad_shape: Any, q_shape: Any, k_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * _attention_flops(q_shape, k_shape, None)  # four products, as torch counts SDPA's backward


def register_flop_formulas(suffix: str = "") -> None:
    """FLOP formulas of ``denseclip_fast::<op><suffix>`` for torch.utils.flop_counter.FlopCounterMode (without
    them a model's count would miss the score and the context decoder's attention). Model FLOPs, torch's
    conventions: the backward's recomputation of the attention probabilities is not counted."""
    from torch.utils.flop_counter import register_flop_formula

    ops = torch.ops.denseclip_fast
    for name, formula in (("pixel_text_score", _score_flops), ("score_concat", _concat_flops),
                          ("pixel_text_score_backward", _score_backward_flops), ("context_attention", _attention_flops),
                          ("context_attention_backward", _attention_backward_flops)):  # fmt: skip
        register_flop_formula(getattr(ops, f"{name}{suffix}"))(formula)


# FlopCounterMode's module, which imports Triton (0.12 s of a fresh process on the CI's Xeon, a third of
# ``import denseclip_fast``'s time then), a module a CPU process never needs otherwise
FLOP_COUNTER = "torch.utils.flop_counter"


class _AfterImport(importlib.abc.MetaPathFinder):
    """A post-import hook for one module: first in sys.meta_path, it asks the finders after it for ``name``'s spec
    and wraps that spec's loader (:class:`_HookedLoader`), so that ``callback()`` runs once the module has executed;
    it then leaves sys.meta_path. A spec found but never executed (``importlib.util.find_spec``) changes nothing."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):  # else left alone: no callback
                    spec.loader = _HookedLoader(spec.loader, self)
                return spec
        return None

    def fire(self) -> None:
        """The callback, once (the hook leaves sys.meta_path first); a failing one warns: the import goes on."""
        if self not in sys.meta_path:
            return
        sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as e:  # noqa: BLE001 - the user's import must not fail for it
            warnings.warn(f"denseclip_fast: {self.name} imported, but its hook failed: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)  # fmt: skip


class _HookedLoader(importlib.abc.Loader):
    """``loader``, which executes the module (given its own loader back first: ``__loader__``, ``__spec__.loader``),
    then fires ``hook``; a module that fails to execute leaves the hook in place for the next try."""

    def __init__(self, loader: Any, hook: _AfterImport) -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.hook.fire()


def after_import(name: str, callback: Callable[[], None]) -> None:
    """``callback()`` now if module ``name`` is imported, else right after its import (:class:`_AfterImport`)."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


if extension_available():
    register_fakes()
    register_autograd()
    # FlopCounterMode reads its registry when it is made, after its module's import: the formulas are in by then
    after_import(FLOP_COUNTER, register_flop_formulas)

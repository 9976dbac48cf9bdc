"""CLIP transformer building blocks shared by the text encoder and the ViT image encoder.

Parameter names follow OpenAI CLIP (``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1`` ...) so that CLIP and official
DenseCLIP state dicts load unchanged. Tensors are batch-first (B, L, D); the official code runs the same math in
(L, B, D) through ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import ACTIVATIONS


def init_(init: Callable[..., object], tensor: torch.Tensor, **kwargs: object) -> None:
    """``init(tensor, **kwargs)``, an ``nn.init`` function, except on the meta device, where a model has shapes and no
    values: load_checkpoint builds one there to check a file against it, and PyTorch's meta ``normal_`` (like an
    out-of-place product of a meta tensor and a Python number, which the models' constructors therefore compute in
    place) runs a Python decomposition whose first use imports torch._dynamo, seconds of a fresh process's start (so
    does torch 2.11's meta ``erfinv_``, which ``trunc_normal_`` calls). The models' own random inits go through
    here; the values drawn off the meta device are the same as a direct call's."""
    if not tensor.is_meta:
        init(tensor, **kwargs)


_RANDOM_FILLS = (torch.Tensor.uniform_, torch.Tensor.normal_)


class MetaInitsSkipped(TorchFunctionMode):
    """Within it, meta tensors are not randomly initialised: an ``nn.init`` function or an in-place ``uniform_`` /
    ``normal_`` given one returns it as it is, as :func:`init_` does for the models' own inits. PyTorch's modules
    (nn.Conv2d, nn.Linear, nn.Embedding) draw theirs in their constructors, and torch 2.10's meta ``uniform_`` is a
    Python decomposition whose first use imports sympy (0.3 s of a fresh process; later releases have a C++ meta
    kernel). Tensors on other devices are initialised as usual. A torch function mode: the thread's alone."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")  # nn.init's public in-place functions: uniform_, kaiming_uniform_ ...
        in_place_init = getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and name[0] != "_"
        if func in _RANDOM_FILLS or in_place_init:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init's functions pass theirs by keyword
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def intercepted() -> bool:
    """Something records or transforms the call: torch.compile or torch.export, a dispatch mode (FlopCounterMode,
    make_fx), torch.jit.trace, a torch.func transform, forward-mode AD. Code that picks a path by reading its
    inputs' values or by the kind of tensor they are then takes the plain one."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch.jit.is_tracing()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.forward_ad._current_level >= 0
    )


def plain_tensors(dtype: torch.dtype, device_types: tuple[str, ...], *tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` (None where there is none) may take a fused operator in place of PyTorch's: no
    gradient needed, nothing recording the call (:func:`intercepted`, asked before any shape is read: a tracer is
    not), and every tensor a plain one (not a traced, fake or functional tensor, nor a subclass with its own
    dispatch) of ``dtype`` on a device of ``device_types``. The engines' fused CPU and CUDA operators add their own
    conditions (their library switched on, no autocast)."""
    given = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in given):
        return False
    return untraced_tensors(dtype, device_types, *given)


def untraced_tensors(dtype: torch.dtype, device_types: tuple[str, ...], *tensors: torch.Tensor) -> bool:
    """:func:`plain_tensors` but for the gradient: nothing recording the call and every tensor a plain one of
    ``dtype`` on a device of ``device_types`` (the test of a fused operator with its own backward, which autograd may
    record)."""
    if intercepted():
        return False
    return all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type in device_types and t.dtype == dtype
               for t in tensors)  # fmt: skip


class LayerNormFp32(nn.LayerNorm):
    """CLIP's LayerNorm: computed in float32 whatever the input and weight dtypes, result cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


QUICK_GELU_SCALE = 1.702  # QuickGELU(y) = y * sigmoid(1.702 y) = silu(1.702 y) / 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def clip_activation(name: str) -> nn.Module:
    """The MLP activation of a CLIP block by its config name (``DenseCLIPConfig.activation``)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class DropPath(nn.Module):
    """Stochastic depth: the residual branch dropped with probability p independently along dimension ``dim`` (0:
    per sample), scaled by 1 / (1 - p) where kept; the identity at inference."""

    def __init__(self, p: float, dim: int = 0) -> None:
        super().__init__()
        self.p, self.dim = p, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = [1] * x.ndim
        shape[self.dim] = x.shape[self.dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}"


# (P, K): a causal transformer's input laid out as (P + K * S, D) rows, the first P positions shared by K sequences of
# P + S positions (the text encoder's prompts: SOT and the contexts), then each sequence's S positions of its own.
# Causal attention leaves the shared positions the same in every sequence, so they are computed once; only the
# attention sees the sequences, every other layer works on rows.
SharedStart = tuple[int, int]


def split_heads(t: torch.Tensor, heads: int, parts: int = 1) -> tuple[torch.Tensor, ...]:
    """A projection's (B, L, parts * D) output as ``parts`` views (B, heads, L, D / heads): q, k and v of a packed
    in-projection (parts 3), k and v of a packed pair (2), or one projection's heads (1)."""
    b, n, width = t.shape
    return t.view(b, n, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter layout (packed q/k/v in-projection)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # the in-projection's F.linear; the CPU engine's copy computes it with oneDNN (engine/cpu_linear.py)
        self.linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = F.linear
        init_(nn.init.xavier_uniform_, self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False, shared: SharedStart | None = None) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D); with ``shared`` (causal only) rows laid out as SharedStart says."""
        if shared is not None:
            if not causal:
                raise ValueError("shared (a start shared by the sequences) needs causal=True: otherwise the start "
                                 "reads each sequence's positions and is no longer shared")  # fmt: skip
            return self._shared_start(x, *shared)
        b, n, d = x.shape
        q, k, v = split_heads(self.linear(x, self.in_proj_weight, self.in_proj_bias), self.heads, 3)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def _shared_start(self, x: torch.Tensor, p: int, k: int) -> torch.Tensor:
        """Causal attention over (P + K * S, D) rows (see SharedStart): the start attends causally to itself; a
        sequence's position i of its S attends to the whole start and to its own positions up to i (a boolean mask:
        on CUDA the memory-efficient SDPA kernel, not flash), the start's keys and values shared by the K sequences
        (expanded before the concatenation, not computed per sequence). Running each sequence whole in one causal
        call instead (the start's queries expanded too; commit 92864c4) took longer on 2 CPU threads: training's text
        part 544 ms against 474 ms, 150 embeddings 241 against 230 ms (bench_text.py:
        results/text_encoder_cpu_2threads_causal_92864c4.md against text_encoder_cpu_2threads.md)."""
        if x.dim() != 2 or p < 0 or k < 1 or x.shape[0] - p < k or (x.shape[0] - p) % k:
            raise ValueError(f"shared=(P, K) = ({p}, {k}) needs (P + K * S, D) rows, S >= 1: got x of shape "
                             f"{tuple(x.shape)}")  # fmt: skip
        d = x.shape[-1]
        heads, s = self.heads, (x.shape[0] - p) // k
        qkv = self.linear(x, self.in_proj_weight, self.in_proj_bias)
        q_p, k_p, v_p = split_heads(qkv[:p].view(1, p, 3 * d), heads, 3)
        q_s, k_s, v_s = split_heads(qkv[p:].view(k, s, 3 * d), heads, 3)
        out_p = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True)  # (1, heads, P, d)
        keys = torch.cat([k_p.expand(k, -1, -1, -1), k_s], dim=2)  # (K, heads, P + S, d)
        values = torch.cat([v_p.expand(k, -1, -1, -1), v_s], dim=2)
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=x.device).tril(p)  # position i: keys 0 .. P + i
        out_s = F.scaled_dot_product_attention(q_s, keys, values, attn_mask=allowed)  # (K, heads, S, d)
        out = torch.cat([out_p.transpose(1, 2).reshape(p, d), out_s.transpose(1, 2).reshape(k * s, d)])
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm CLIP block: x += attn(ln_1(x)); x += mlp(ln_2(x)), an MLP of 4x width with QuickGELU (or GELU:
    ``activation``, see clip_activation)."""

    def __init__(
        self, width: int, heads: int, drop_path: float = 0.0, drop_path_dim: int = 0, activation: str = "quick_gelu"
    ) -> None:
        super().__init__()
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_1 = LayerNormFp32(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", clip_activation(activation)),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNormFp32(width)
        self.drop_path = DropPath(drop_path, drop_path_dim) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False, shared: SharedStart | None = None) -> torch.Tensor:
        if shared is not None and not isinstance(self.drop_path, nn.Identity):
            raise ValueError("a block with drop path cannot take shared-start rows: it drops whole sequences")
        x = x + self.drop_path(self.attn(self.ln_1(x), causal=causal, shared=shared))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (``resblocks.i``) on (B, L, D), drop-path rates rising linearly
    to the last, drawn along ``drop_path_dim`` (see DropPath); ``activation`` of the MLPs (see clip_activation)."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        drop_path_rate: float = 0.0,
        drop_path_dim: int = 0,
        activation: str = "quick_gelu",
    ) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, layers, device="cpu").tolist() if layers > 0 else []
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, r, drop_path_dim, activation) for r in rates]
        )

    def forward(self, x: torch.Tensor, causal: bool = False, shared: SharedStart | None = None) -> torch.Tensor:
        """x: (B, L, D), or with ``shared`` (causal only) rows laid out as SharedStart says."""
        for block in self.resblocks:
            x = block(x, causal=causal, shared=shared)
        return x

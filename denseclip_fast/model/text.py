"""Class-name tokenisation and the CoOp-style context text encoder (official ``CLIPTextContextEncoder``).

A class name is tokenised with CLIP's BPE (open_clip's tokenizer and its bundled vocabulary) into
``[SOT, name tokens, EOT, 0 ...]`` of length ``context_length - n_ctx`` (5 for the released models, so a name may
have at most 3 BPE tokens). The encoder input is ``[SOT, ctx_1 .. ctx_n, name tokens, EOT, pad]`` (13 positions),
where the n learned context vectors are shared by all classes. CLIP's causal transformer runs over it, and the
output at the EOT position goes through ``ln_final`` and ``text_projection``. The result depends only on the
weights and the names, never on the image: callers cache it.

The attention is causal, so the first ``1 + n_ctx`` positions (SOT and the contexts, the same in every prompt) hold
the same values in every prompt at every layer, and no position before a prompt's EOT reads one after it. The
encoder therefore computes that shared start once, as one sequence, and for each class only its name's positions up
to the vocabulary's last EOT: 4 of the 13 positions for ADE20K's names, 2 for names of one token. On 2 CPU threads
the 150 ADE20K embeddings took 0.23 s instead of 0.79 s, and the training step's forward and backward to the
contexts 0.47 s instead of 1.35 s (benchmarks/bench_text.py, results/text_encoder_cpu_2threads.md). The same
arithmetic (to rounding: other batch sizes in the matrix products). On a GPU it was the slower path (more and
smaller kernels, host-bound): on an H200 the 150 embeddings took 8.0 ms instead of 5.6 and the training step's text
part 21.5 ms instead of 13.7 (float32; bfloat16 alike; results/h200_2026-12-04/text_encoder_NVIDIA_H200.md), so the
encoder takes it on the devices of SHARED_START_DEVICES only, the CPU, and runs the prompts whole elsewhere. Prompts
that do not share their first token run whole, as does a call that torch.compile, torch.export or a dispatch mode
traces without being given the span (it cannot read the tokens; DenseCLIP gives it, read when its names were set:
see token_span).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..config import TextConfig
from .layers import LayerNormFp32, ResidualAttentionBlock, Transformer, init_, intercepted

SHARED_START_DEVICES: tuple[str, ...] = ("cpu",)  # where the shared start is the faster path (module docstring)


# words whose BPE merges the tokenizer keeps (open_clip's SimpleTokenizer keeps every word it has ever encoded: in a
# service scoring the vocabularies its users send, a cache that grew without bound); a few MiB at most
BPE_CACHE_SIZE = 10_000


class _BoundedBPECache(OrderedDict[str, str]):
    """SimpleTokenizer's ``cache`` (word -> its BPE merges) holding at most BPE_CACHE_SIZE words, the oldest dropped
    first (a dropped word is merged again when it comes back: the same tokens), besides its special tokens, which
    always stay (the tokenizer finds them there and never merges them). The tokenizer reads and writes it as a dict:
    ``in``, ``[]`` and ``[] =``."""

    def __init__(self, special: Mapping[str, str]) -> None:
        super().__init__()
        self.special = dict(special)

    def __contains__(self, word: object) -> bool:
        return word in self.special or super().__contains__(word)

    def __getitem__(self, word: str) -> str:
        return self.special[word] if word in self.special else super().__getitem__(word)

    def __setitem__(self, word: str, merges: str) -> None:
        super().__setitem__(word, merges)
        while len(self) > BPE_CACHE_SIZE:  # (the special tokens are not counted: never in the OrderedDict itself)
            self.popitem(last=False)


# one tokenizer for the process, its word cache shared by every thread that encodes (two Segmenters in two threads):
# the cache's check-then-read (open_clip's ``if word in cache: return cache[word]``) met another thread's eviction
_BPE_LOCK = threading.Lock()


def _encode(name: str) -> list[int]:
    """The BPE tokens of ``name`` from the process's tokenizer, one thread at a time (_BPE_LOCK)."""
    with _BPE_LOCK:
        return list(_bpe().encode(name))


@functools.lru_cache(maxsize=1)
def _bpe() -> Any:
    """open_clip's SimpleTokenizer: CLIP's BPE and the vocabulary bundled with open_clip, made on first use, its
    cache of words bounded (_BoundedBPECache)."""
    tokenizer = _tokenizer_module().SimpleTokenizer()
    if isinstance(getattr(tokenizer, "cache", None), dict):
        tokenizer.cache = _BoundedBPECache(tokenizer.cache)
    return tokenizer


@functools.lru_cache(maxsize=1)
def _tokenizer_module() -> ModuleType:
    """open_clip's tokenizer module. Importing it the usual way first runs open_clip's package ``__init__``, which
    imports its models (timm, torchvision and through them torch._dynamo: seconds of a fresh process's start-up, see
    benchmarks/bench_startup.py), so the module file is run on its own, under a private name. The package import is
    the fallback where it is already imported, or where an open_clip's tokenizer module cannot run alone (a relative
    import). Objects of the private module do not pickle into another process (none of the package's need to)."""
    imported = sys.modules.get("open_clip.tokenizer")
    if imported is not None:
        return imported
    try:
        return _module_from_file("open_clip", "tokenizer.py")
    except ImportError:
        from open_clip import tokenizer

        return tokenizer


def _module_from_file(package: str, file_name: str) -> ModuleType:
    """Run ``file_name`` of the installed ``package`` as a module of its own, a top-level one named
    ``_denseclip_fast_<package>_<name>`` (the package's ``__init__`` not run); ImportError when the package or the file
    is not found, or when the file imports relatively (a top-level module has no package to import from)."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level package's spec: found, not imported
    except ValueError as exc:  # a module in sys.modules without a __spec__ (a stub)
        raise ImportError(f"no spec for package {package}: {exc}") from None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locations[0], file_name) if locations else ""
    if not os.path.isfile(path):
        raise ImportError(f"no {file_name} in package {package}")
    file_spec = importlib.util.spec_from_file_location(f"_denseclip_fast_{package}_{file_name[:-3]}", path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a module")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module  # as an import would (dataclasses and pickle look a class's module up)
    try:
        file_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[file_spec.name]
        raise
    return module


def check_class_names(names: Sequence[str], distinct: bool = False) -> None:
    """ValueError unless ``names`` is a non-empty sequence of strings (not a string itself), naming the first entry
    that is not one (or holds a lone surrogate, which is no text: printing or saving it fails); with ``distinct``
    (open-vocabulary scoring, where a name is all that tells two classes apart: a repeated one is one class scored
    twice, and which of them a pixel's argmax picks is arbitrary) also the first that repeats one. A trained head
    tells its classes apart by its weights, so its names may repeat. (Their tokens are tokenize_class_names' to
    check.)"""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"class names must be a sequence of strings, got {type(names).__name__}")
    if len(names) == 0:
        raise ValueError("class names must not be empty")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"class name {i} must be a string, got {type(name).__name__}: {name!r}")
        if any("\ud800" <= c <= "\udfff" for c in name):  # JSON's "\ud800" escape makes one; UTF-8 cannot hold it
            raise ValueError(f"class name {i} ({name!r}) is not text: it holds a lone surrogate (U+D800 to U+DFFF), "
                             "which no UTF-8 file or terminal can hold")  # fmt: skip
        if distinct and name in seen:
            raise ValueError(f"class name {i} ({name!r}) repeats class name {seen[name]}; class names must differ")
        seen[name] = i


def check_distinct_tokens(names: Sequence[str], encoded: Sequence[Sequence[int]] | None = None) -> None:
    """ValueError naming the first of ``names`` (strings) whose BPE tokens repeat an earlier name's: the BPE
    lowercases and collapses whitespace, so "Cat" and "cat " are one class to the text encoder (open vocabulary,
    where a name is all that tells two classes apart, refuses them as check_class_names refuses repeated strings).
    ``encoded``: the names' BPE tokens when the caller has them (else they are encoded here)."""
    if encoded is None:
        encoded = [_encode(name) for name in names]
    seen: dict[tuple[int, ...], int] = {}
    for i, (name, name_tokens) in enumerate(zip(names, encoded)):
        tokens = tuple(name_tokens)
        if tokens in seen:
            j = seen[tokens]
            raise ValueError(
                f"class name {i} ({name!r}) has the same BPE tokens as class name {j} ({names[j]!r}): CLIP's "
                "tokenizer unescapes HTML (&amp; is &), lowercases and collapses whitespace; class names must differ"
            )
        seen[tokens] = i


def tokenize_class_names(names: Sequence[str], length: int, distinct: bool = False) -> torch.Tensor:
    """Tokenise class names to (K, length) int64: SOT, BPE tokens, EOT, zero padding.

    Raises ValueError naming the offending entry for a non-string, a name with no tokens, a name
    holding CLIP's start or end token (the text "<start_of_text>" / "<end_of_text>", which the BPE keeps as those
    tokens: the encoder would read the name's embedding at the wrong position), or a name longer than
    ``length - 2`` BPE tokens; with ``distinct`` (see check_class_names) also for a name whose tokens repeat an
    earlier name's: the BPE lowercases and collapses whitespace, so "Cat" and "cat " are one class scored twice.
    """
    check_class_names(names, distinct)
    bpe = _bpe()
    out = torch.zeros(len(names), length, dtype=torch.long)
    encoded = []
    for i, name in enumerate(names):
        tokens = _encode(name)
        encoded.append(tokens)
        if not tokens:
            raise ValueError(f"class name {i} ({name!r}) has no tokens")
        if bpe.sot_token_id in tokens or bpe.eot_token_id in tokens:
            raise ValueError(f"class name {i} ({name!r}) holds CLIP's start or end-of-text token")
        if len(tokens) > length - 2:
            raise ValueError(
                f"class name {name!r} has {len(tokens)} BPE tokens; at most {length - 2} fit "
                f"(context length {length} includes SOT and EOT)"
            )
        out[i, : len(tokens) + 2] = torch.tensor([bpe.sot_token_id, *tokens, bpe.eot_token_id])
    if distinct:  # after each name's own checks, which name the offending entry first
        check_distinct_tokens(names, encoded)
    return out


class ContextTextEncoder(nn.Module):
    """CLIP text transformer taking learned context vectors after SOT; ``activation`` of its MLPs (see
    layers.clip_activation)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, activation: str = "quick_gelu") -> None:
        super().__init__()
        self.context_length = cfg.context_length
        # from a tensor, as nn.Embedding(vocab, width) would draw N(0, 1) values (meta: see init_) to be replaced
        self.token_embedding = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.width), freeze=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, activation=activation)
        self.ln_final = LayerNormFp32(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        init_(nn.init.normal_, self.token_embedding.weight, std=0.02)
        init_(nn.init.normal_, self.positional_embedding, std=0.01)
        init_(nn.init.normal_, self.text_projection, std=cfg.width**-0.5)

    def forward(self, tokens: torch.Tensor, contexts: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """tokens: (K, L) int64 class tokens from :func:`tokenize_class_names`; contexts: (1, n_ctx, width); span:
        ``token_span(tokens)`` when the caller has it, read on the host beforehand (otherwise it is read from the
        tokens here: on a GPU, a synchronisation); any other value gives wrong embeddings.

        Returns (K, embed_dim) class embeddings in the joint space.
        """
        k, n_tok = tokens.shape
        n_ctx = contexts.shape[1]
        if n_tok + n_ctx != self.context_length:
            raise ValueError(
                f"tokens ({n_tok}) + contexts ({n_ctx}) must fill the context length {self.context_length}"
            )
        if tokens.device.type not in SHARED_START_DEVICES:  # a GPU: whole (module docstring); no read of the tokens
            if span is not None:
                _check_span(span, n_tok)
            return self._whole_prompts(tokens, contexts)
        if span is None and readable(tokens):
            span = token_span(tokens)
        drop_path = not all(isinstance(b.drop_path, nn.Identity) for b in self._blocks())
        if span is None or contexts.shape[0] != 1 or drop_path:  # per-class contexts (K, n_ctx, W): whole, as before
            return self._whole_prompts(tokens, contexts)
        _check_span(span, n_tok)
        return self._shared_start(tokens, contexts, span)

    def _blocks(self) -> list[ResidualAttentionBlock]:
        return list(self.transformer.resblocks)  # type: ignore[arg-type]

    def _whole_prompts(self, tokens: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """Every prompt through the transformer whole, as the official encoder computes it."""
        k, n_ctx = tokens.shape[0], contexts.shape[1]
        x_tok = self.token_embedding(tokens)  # (K, L, W)
        ctx = contexts.to(x_tok.dtype).expand(k, -1, -1)
        x = torch.cat([x_tok[:, :1], ctx, x_tok[:, 1:]], dim=1) + self.positional_embedding.to(x_tok.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        eot = tokens.argmax(dim=-1) + n_ctx  # EOT has the largest id in CLIP's vocabulary
        return x[torch.arange(k, device=x.device), eot] @ self.text_projection

    def _shared_start(self, tokens: torch.Tensor, contexts: torch.Tensor, span: int) -> torch.Tensor:
        """The prompts' shared start (SOT and the contexts: P positions) computed once, then each class's positions 1
        to span - 1 of its tokens (S per class) attending to it: P + K * S rows through the transformer (see
        layers.SharedStart)."""
        k, n_ctx = tokens.shape[0], contexts.shape[1]
        p, s = 1 + n_ctx, span - 1
        x_tok = self.token_embedding(tokens[:, :span])  # (K, span, W)
        position = self.positional_embedding.to(x_tok.dtype)
        start = torch.cat([x_tok[0, :1], contexts[0].to(x_tok.dtype)]) + position[:p]  # (P, W)
        names = x_tok[:, 1:] + position[p : p + s]  # (K, S, W)
        x = self.transformer(torch.cat([start, names.flatten(0, 1)]), causal=True, shared=(p, k))
        eot = tokens.argmax(dim=-1) - 1  # the EOT's place among the S
        x = x[p:].view(k, s, -1)[torch.arange(k, device=x.device), eot]
        return self.ln_final(x) @ self.text_projection


def _check_span(span: object, n_tok: int) -> None:
    if not isinstance(span, int) or isinstance(span, bool):
        raise ValueError(f"span must be an int, 2 to {n_tok} (the tokens' length), got {type(span).__name__} "
                         f"{span!r}")  # fmt: skip
    if not 2 <= span <= n_tok:
        raise ValueError(f"span must be 2 to {n_tok} (the tokens' length), got {span}")


def readable(tokens: torch.Tensor) -> bool:
    """Whether token_span can read ``tokens``: a plain tensor with values (not meta, not a traced or fake one), in a
    call that nothing records or transforms (layers.intercepted)."""
    return type(tokens) is torch.Tensor and not tokens.is_meta and not intercepted()


def token_span(tokens: torch.Tensor) -> int | None:
    """How many leading positions of the (K, L) class tokens the encoder needs, when it can share the prompts' start:
    every prompt starts with the same token (SOT), so that SOT and the contexts after it are one sequence for all
    classes, and every prompt's EOT (its largest id, where the encoder reads its output) comes after it. Then the
    last EOT's position + 1 (the positions after it cannot change what is read: the attention is causal); None
    otherwise (or for meta tensors), for the encoder to run each prompt whole. Reads the tokens on the host."""
    if tokens.is_meta or tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:  # meta: no values
        return None
    host = tokens.detach().cpu()
    eot = host.argmax(dim=-1)
    if not bool((host[:, 0] == host[0, 0]).all()) or int(eot.min()) < 1:
        return None
    return int(eot.max()) + 1

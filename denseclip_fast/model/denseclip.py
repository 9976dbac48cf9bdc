"""DenseCLIP assembled: image encoder -> context decoder -> pixel-text score -> FPN -> Semantic FPN head.

Data flows one way:

    x (B,3,H,W) -> backbone -> levels C2..C5, global g (B,D), local z (B,D,h,w)
    class embeddings t (K,D) = text_encoder(class tokens, contexts)         [image-independent: cached in eval]
    t' = t + gamma * context_decoder(t, [g; z])                               (B,K,D)
         (out of training the decoder's start, which sees t alone, runs once, not per image: decoder.py)
    s  = cosine(z, t')                                                        (B,K,h,w)
    levels[score_concat_index] = cat(levels[i], s)  -> FPN -> head -> bilinear resize to (H, W)

Submodule and parameter names are the official ones (``backbone``, ``text_encoder``, ``context_decoder``, ``neck``,
``decode_head``, ``contexts``, ``gamma``), so official checkpoints load as they are.
"""

from __future__ import annotations

import reprlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..class_names import ADE20K_CLASSES
from ..config import MIN_IMAGE_SIDE, DenseCLIPConfig, preset
from ..ops.library import memory_format_of
from ..preprocess import keep_ratio_size
from ..validation import as_bool
from ..visualize import check_palette
from .decoder import ContextDecoder, DecoderPrefix
from .features import ImageFeatures
from .heads import FPN, SemanticFPNHead
from .layers import init_
from .resnet import CLIPResNetBackbone
from .slide import slide_inference as _slide_inference
from .slide import window_sizes
from .text import ContextTextEncoder, check_class_names, readable, token_span, tokenize_class_names
from .vit import CLIPViTBackbone

if TYPE_CHECKING:
    from os import PathLike

def check_image_size(size: tuple[int, ...], name: str) -> None:
    """ValueError unless an image of ``size`` (H, W) entering the network has MIN_IMAGE_SIDE pixels a side."""
    if min(size) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name} must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, got {size}")


def check_test_image_size(size: Sequence[int], scale: Sequence[int], name: str) -> None:
    """ValueError naming ``name`` (an image's file, or its place in a batch) unless an image of ``size`` (H, W),
    resized with its aspect ratio to fit the test ``scale`` as the test pipeline does, keeps MIN_IMAGE_SIDE pixels
    a side (keep_ratio_size enlarges small images, so only a too elongated one fails)."""
    resized = keep_ratio_size(int(size[0]), int(size[1]), scale)
    if min(resized) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{name} of {(int(size[0]), int(size[1]))} pixels is resized to {resized} to fit the test scale "
            f"{tuple(scale)}, under the network's {MIN_IMAGE_SIDE} pixels a side (too elongated)"
        )


def build_backbone(config: DenseCLIPConfig) -> nn.Module:
    if config.vision.kind == "resnet":
        return CLIPResNetBackbone(config.vision, config.embed_dim)
    return CLIPViTBackbone(config.vision, config.embed_dim, config.activation)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (in-place operations bump it); None for an inference tensor, which keeps none."""
    return None if tensor.is_inference() else tensor._version


class DenseCLIP(nn.Module):
    """A DenseCLIP segmentor with the semantics of the official ``DenseCLIP`` (mmseg) model.

    Args:
        config: the architecture (see :func:`denseclip_fast.config.preset`).
        class_names: the K class names; K fixes the score channels and the classifier.
    """

    class_tokens: torch.Tensor  # a buffer (register_buffer in __init__), declared for the type checker
    # (class_tokens, its version, text.token_span of it): the span read on the host when the names were set
    _class_span: tuple[torch.Tensor, int | None, int | None] | None

    def __init__(self, config: DenseCLIPConfig, class_names: Sequence[str]) -> None:
        if not isinstance(config, DenseCLIPConfig):  # e.g. an arch name, which from_arch takes
            arch = config if isinstance(config, str) else "RN50"
            raise TypeError(
                f"config must be a DenseCLIPConfig, got {type(config).__name__}: {reprlib.repr(config)}; for a "
                f"released architecture by name use DenseCLIP.from_arch({arch!r}, class_names=...)"
            )
        super().__init__()
        tokens = tokenize_class_names(class_names, config.text.class_token_length)
        k, d = len(class_names), config.embed_dim
        self.config = config
        self._class_names = tuple(class_names)
        self._palette: list[tuple[int, int, int]] | None = None
        self.backbone = build_backbone(config)
        self.text_encoder = ContextTextEncoder(config.text, d, config.activation)
        self.context_decoder = ContextDecoder(config.decoder, d)
        in_channels = list(config.vision.level_channels)
        in_channels[config.score_concat_index] += k
        self.neck = FPN(in_channels, config.fpn_channels)
        self.decode_head = SemanticFPNHead(config.fpn_channels, config.head_channels, k, config.head_dropout)
        self.contexts = nn.Parameter(torch.empty(1, config.text.n_ctx, config.text.width))
        init_(nn.init.trunc_normal_, self.contexts)
        self.gamma = nn.Parameter(torch.full((d,), 1e-4))
        self.register_buffer("class_tokens", tokens, persistent=False)
        self._keep_class_span(token_span(tokens))  # read here, on the host: no GPU synchronisation in a forward
        # (key: autocast state and each tensor's address, version, dtype, device; weak references to the tensors;
        # the embeddings)
        self._text_cache: tuple[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], ...], torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_arch(cls, arch: str, class_names: Sequence[str] | None = None) -> DenseCLIP:
        """A randomly initialised model of a released architecture (``'RN50'``, ``'RN101'``, ``'ViT-B/16'``).

        ``class_names`` defaults to the 150 ADE20K classes the released checkpoints were trained on.
        """
        return cls(preset(arch), ADE20K_CLASSES if class_names is None else class_names)

    @classmethod
    def from_clip(
        cls,
        clip_weights: str | PathLike[str],
        arch: str,
        class_names: Sequence[str],
        activation: Literal["quick_gelu", "gelu"] = "quick_gelu",
    ) -> DenseCLIP:
        """A model for training: backbone and text encoder from CLIP weights (an OpenAI TorchScript archive, a
        plain CLIP state dict or an open_clip checkpoint), everything else freshly initialised.

        ``activation``: the one the CLIP weights were trained with, which no weight file records: "quick_gelu"
        for OpenAI's CLIP (DenseCLIP's), "gelu" for most other open_clip weights (e.g. LAION's; open_clip names the
        QuickGELU ones "...-quickgelu"). The wrong one gives a model that loads but computes another function."""
        from ..checkpoints.clip import init_from_clip
        from ..checkpoints.io import path_argument

        clip_weights = path_argument(clip_weights, "clip_weights")
        model = cls(preset(arch).replace(activation=activation), class_names)
        init_from_clip(model, clip_weights)
        return model

    # ------------------------------------------------------------------ vocabulary

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def palette(self) -> list[tuple[int, int, int]] | None:
        """The classes' overlay colours, K (r, g, b) tuples (a checkpoint's PALETTE), or None (a generated palette is
        used). Set it to None or K triples of integers 0..255 (numpy's too, stored as Python ints, as save writes
        them); anything else is a ValueError naming palette."""
        return self._palette

    @palette.setter
    def palette(self, value: Any) -> None:
        self._palette = check_palette(value, self.num_classes)

    def set_classes(self, names: Sequence[str]) -> None:
        """Reword the vocabulary: exactly K names (the head has K outputs), re-tokenised, cache recomputed."""
        if isinstance(names, Sequence) and not isinstance(names, str) and len(names) != self.num_classes:
            raise ValueError(
                f"set_classes needs exactly {self.num_classes} names (the head has {self.num_classes} outputs), "
                f"got {len(names)} names; use open_vocab_scores(x, names) to score any number of names"
            )
        check_class_names(names)
        tokens = tokenize_class_names(names, self.config.text.class_token_length)
        self.class_tokens = tokens.to(self.class_tokens.device)
        self._keep_class_span(token_span(tokens))
        self._class_names = tuple(names)
        self._text_cache = None

    def text_features(self, names: Sequence[str], distinct: bool = False) -> torch.Tensor:
        """(K', D) class embeddings of any names through the learned contexts (before the context decoder); with
        ``distinct`` (open vocabulary) names that tokenise alike are a ValueError."""
        distinct = as_bool("distinct", distinct)
        tokens = tokenize_class_names(names, self.config.text.class_token_length, distinct)
        return self.text_encoder(tokens.to(self.contexts.device), self.contexts, token_span(tokens))

    def class_embeddings(self) -> torch.Tensor:
        """(K, D) embeddings of the current vocabulary. In eval mode without gradients (``torch.no_grad``,
        ``torch.inference_mode``, or frozen contexts and text encoder) they are computed once and cached until the
        vocabulary, the contexts or the text encoder's weights change; in train mode, and in eval mode where autograd
        would record a gradient to the contexts or the text encoder (fine-tuning with frozen BatchNorm statistics),
        they are computed on every call, as the official model does, so that gradients reach them. What is returned
        is the caller's own (a copy of the cache).

        A change is seen through the tensors themselves (one swapped in, as ``torch.func.functional_call`` does, is
        another, also where it took a freed one's address) and their version counters, which an in-place operation
        on a parameter (an optimiser step, ``load_state_dict``, ``copy_`` under ``no_grad``) bumps, and a switch of mode
        (``train()``/``eval()``) drops the cache: a fused optimizer's step (``AdamW(fused=True)``, the trainer's
        on CUDA) bumps no version counter, nor does an edit through ``.data``; after one in eval mode call
        ``set_classes(model.class_names)``. Embeddings are cached per autocast state (cached under bfloat16
        autocast, they are not those of a float32 forward), and ones cached under ``torch.inference_mode`` are
        recomputed outside it, where autograd may need to save them. A model whose weights were made under
        ``torch.inference_mode`` (inference tensors, which keep no version counter) computes them on every call."""
        embeddings = self._class_embeddings()
        return embeddings if self.training else embeddings.clone()

    def _class_embeddings(self) -> torch.Tensor:
        """:meth:`class_embeddings` without the copy, for the forward, which does not write to it."""
        if self.training or torch.compiler.is_compiling():  # no cache inside a compiled graph (its key reads pointers)
            return self._encode_classes()
        # the text encoder's buffers too: none of its own, but a pruned layer's mask (torch.nn.utils.prune), which
        # pruning it further replaces while its weight_orig stays the same tensor (stale embeddings were served)
        params = [self.contexts, self.class_tokens, *self.text_encoder.parameters(), *self.text_encoder.buffers()]
        if (
            # a cache would be detached: an eval-mode fine-tuning step lost its gradients to the contexts
            (torch.is_grad_enabled() and any(p.requires_grad for p in params))
            or any(p.is_inference() for p in params)  # made under inference_mode: no version counter to key on
        ):
            return self._encode_classes()
        device = self.contexts.device.type
        autocast = None  # a device without autocast (meta): asking it for its state raises
        if torch.amp.is_autocast_available(device):
            autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        key = (autocast, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        cache = self._text_cache
        # the tensors themselves too (weakly, not to keep replaced weights alive): an address and a version are not
        # a tensor's identity, as a new tensor may take a freed one's address at version 0 (a functional_call's)
        if (
            cache is None
            or cache[0] != key
            or any(kept() is not p for kept, p in zip(cache[1], params))
            or (cache[2].is_inference() and not torch.is_inference_mode_enabled())
        ):
            with torch.no_grad():
                embeddings = self._encode_classes()
            cache = self._text_cache = (key, tuple(weakref.ref(p) for p in params), embeddings)
        return cache[2]

    def __getstate__(self) -> dict[str, Any]:
        """deepcopy and pickle: the module's state without the cached class embeddings (whose weak references
        pickle cannot take; a copy computes its own)."""
        return {**super().__getstate__(), "_text_cache": None}

    def _encode_classes(self) -> torch.Tensor:
        return self.text_encoder(self.class_tokens, self.contexts, self._class_tokens_span())

    def _keep_class_span(self, span: int | None) -> None:
        self._class_span = (self.class_tokens, _version(self.class_tokens), span)

    def _span_kept_for(self, tokens: torch.Tensor) -> int | None | bool:
        """The span kept for ``tokens`` (this tensor, unedited since: an inference tensor, which keeps no version
        counter, never counts as unedited), else False."""
        saved = getattr(self, "_class_span", None)  # a model pickled before the span was kept has none
        if saved is None or saved[0] is not tokens or saved[1] is None or saved[1] != _version(tokens):
            return False
        return saved[2]

    def _class_tokens_span(self) -> int | None:
        """``token_span(class_tokens)`` for the text encoder: the one read when the names were set, while the class
        tokens are that tensor (or its copy by ``model.to``, see _apply) unedited. Class tokens replaced or edited in
        place since (an assignment, ``copy_``, ``torch.func.functional_call``) are read again, once (on a GPU, one
        synchronisation); inference tensors, which keep no version counter, at every call (such a model computes
        its class embeddings at every call anyway); an nn.DataParallel replica takes its module's. Inside a
        torch.compile'd graph the span kept for that tensor is used as it is (a compiled graph sees no version
        counter: there change the vocabulary with set_classes, not by editing the class tokens in place), or None
        (every prompt whole) for another tensor; None too for what cannot be read (meta, fake or traced tensors)."""
        tokens = self.class_tokens
        saved = getattr(self, "_class_span", None)  # a model pickled before the span was kept has none
        if torch.compiler.is_compiling():
            return saved[2] if saved is not None and saved[0] is tokens else None
        kept = self._span_kept_for(tokens)
        if kept is not False:
            return kept
        if getattr(self, "_is_replica", False) and saved is not None and saved[0].shape == tokens.shape:
            # an nn.DataParallel replica (made anew at every forward): its class tokens are a copy of the module's,
            # whose span it shares while the module's tokens are unedited (else it reads them, as the module would)
            kept = self._span_kept_for(saved[0])
            if kept is not False:
                return kept
        if not readable(tokens):
            return None
        self._keep_class_span(token_span(tokens))
        return self._class_span[2] if self._class_span is not None else None

    def _apply(self, fn: Any, recurse: bool = True) -> DenseCLIP:
        """nn.Module._apply (``to``, ``cuda``, ``float`` ...), keeping the class tokens' span with their copy: a model
        moved to a GPU and compiled before any eager call still shares its prompts' start (there the span cannot be
        read)."""
        tokens = self.class_tokens
        kept = self._span_kept_for(tokens)
        super()._apply(fn, recurse)
        if kept is not False and self.class_tokens is not tokens:
            self._keep_class_span(kept)
        return self

    def train(self, mode: bool = True) -> DenseCLIP:
        """nn.Module.train; a switch of mode also drops the cached class embeddings (see :meth:`class_embeddings`):
        an evaluation between training steps of a fused optimizer must not reuse embeddings cached before them."""
        self._text_cache = None
        return super().train(mode)

    # ------------------------------------------------------------------ inference

    def extract(self, x: torch.Tensor) -> ImageFeatures:
        """Run the image encoder on CLIP-normalised images (B, 3, H, W)."""
        self._check_images(x)
        return self.backbone(x.to(self.contexts.dtype))

    def context_prompt(
        self, feats: ImageFeatures, text: torch.Tensor, prefix: DecoderPrefix | None = None
    ) -> torch.Tensor:
        """Context-aware prompting: class embeddings (K, D) -> t + gamma * decoder(t, [g; z]), (B, K, D).

        While the decoder trains, it runs on the text repeated for each image, as the official model's (its
        dropout draws a mask per image); else its image-independent start runs once (``prefix``: the decoder's
        :meth:`~ContextDecoder.prefix` of this text in z's dtype, made beforehand; computed here where None).
        The decoder reads [g; z] as the encoder's tokens (ImageFeatures.visual_context: no concatenation where no
        gradient flows through them), and the product and the sum are one ``addcmul`` (one pass, rounded once:
        within an ulp of the official product then sum)."""
        z = feats.local_feat
        visual_context = feats.visual_context()  # (B, 1 + hw, D)
        text = text.to(z.dtype)
        if prefix is None:
            if self.context_decoder.training:
                text = text.unsqueeze(0).expand(z.shape[0], -1, -1)
                return torch.addcmul(text, self.gamma, self.context_decoder(text, visual_context))
            prefix = self.context_decoder.prefix(text)
        elif prefix.x.shape[1] != text.shape[0] or prefix.x.dtype != z.dtype:
            raise ValueError(f"prefix was made for {prefix.x.shape[1]} classes in {prefix.x.dtype}; the text has "
                             f"{text.shape[0]} and the image features are {z.dtype}: make it with "
                             "context_decoder.prefix(text) in the features' dtype")  # fmt: skip
        return torch.addcmul(text, self.gamma, self.context_decoder.decode(prefix, visual_context))

    def logits_and_score(
        self, feats: ImageFeatures, text: torch.Tensor, size: Sequence[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The score map concatenated to its pyramid level (one fused operator), FPN, head, resize to ``size``
        (None: the head's own resolution, 1/4 of the image)."""
        levels = list(feats.levels)
        i = self.config.score_concat_index
        z = feats.local_feat
        # in z's dtype: under CUDA autocast ViT's level 2 (fpn3, a GroupNorm, which autocast runs in float32) is
        # float32 while z is bfloat16, and the fused operator takes one dtype
        feature = levels[i].to(z.dtype)
        # and the output, whose layout the operator takes from z, in the layout its lateral conv runs in: z has NHWC
        # strides (a view of the tokens), so in an NCHW model (training) the conv would get an NHWC input and its
        # weight gradient NHWC strides, which DDP copies into its NCHW bucket every step. channels_last when the
        # conv's weight is (the engine on CUDA: also for ViT's level 2, which CUDA's GroupNorm returns NCHW) or the
        # feature is (the CPU engine's channels_last images), else NCHW. Copying z (D channels) is cheaper than
        # converting the output (C_feat + K channels). memory_format_of, not the memoised score_memory_format,
        # which torch.compile warns about when it traces this
        if self.neck.lateral_channels_last(i):
            layout = torch.channels_last
        else:
            layout = memory_format_of(feature.shape, feature.stride())
        if memory_format_of(z.shape, z.stride()) != layout:
            z = z.contiguous(memory_format=layout)
        merged = ops.score_concat(feature, z, text.to(z.dtype))
        score = merged[:, levels[i].shape[1] :]
        levels[i] = merged
        out = self.decode_head(self.neck(levels))
        if size is None:
            return out, score
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False), score

    def logits_for(
        self, x: torch.Tensor, text: torch.Tensor, size: Sequence[int] | None, prefix: DecoderPrefix | None = None
    ) -> torch.Tensor:
        """Logits of images ``x`` already in the model's dtype and layout (not checked) for class embeddings ``text``
        (K, D) (and their decoder ``prefix``, see context_prompt): image encoder, context prompting, score/concat,
        FPN, head, resize to ``size`` (None: 1/4 of the image). The per-forward function of the engine and of the
        exported graphs."""
        feats = self.backbone(x)
        return self.logits_and_score(feats, self.context_prompt(feats, text, prefix), size)[0]

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the whole-image forward computes: ``global_feat`` (B, D), ``local_feat`` (B, D, h, w),
        ``text_embeddings`` (B, K, D) after the context decoder, ``score_map`` (B, K, h, w) cosine,
        ``aux_logits`` = score_map / tau (the identity head), ``logits`` (B, K, H, W)."""
        feats = self.extract(x)
        text = self.context_prompt(feats, self._class_embeddings())
        logits, score = self.logits_and_score(feats, text, x.shape[2:])
        return {
            "global_feat": feats.global_feat,
            "local_feat": feats.local_feat,
            "text_embeddings": text,
            "score_map": score,
            "aux_logits": score / self.config.tau,
            "logits": logits,
        }

    if TYPE_CHECKING:  # what model(x) returns, for a type checker (nn.Module.__call__ says Any); runs forward

        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image inference: CLIP-normalised x (B, 3, H, W) float -> logits (B, K, H, W)."""
        feats = self.extract(x)
        text = self.context_prompt(feats, self._class_embeddings())
        return self.logits_and_score(feats, text, x.shape[2:])[0]

    def slide_inference(
        self,
        x: torch.Tensor,
        crop: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] | None = None,
        windows_per_batch: int | None = None,
    ) -> torch.Tensor:
        """Sliding-window inference as mmseg's ``slide_inference`` -> logits (B, K, H, W).

        ``crop``/``stride`` default to the architecture's (512/341 for ResNets, 640/426 for ViT-B/16).
        """
        self._check_images(x)
        crop = self.config.slide_crop if crop is None else crop
        stride = self.config.slide_stride if stride is None else stride
        if min(window_sizes(crop, stride)[0]) < MIN_IMAGE_SIDE:  # else each window would be refused as "x"
            raise ValueError(f"crop must be at least {MIN_IMAGE_SIDE} pixels a side (the stride-32 level keeps a "
                             f"pixel), got {crop!r}")  # fmt: skip
        return _slide_inference(self.forward, x, crop, stride, windows_per_batch)

    def open_vocab_scores(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """(B, K', h, w) pixel-text cosine maps for any distinct names, with the context decoder applied."""
        # the names checked (check_class_names, then their tokens) before the image encoder: a refused vocabulary
        # costs nothing
        text = self.text_features(names, distinct=True)
        feats = self.extract(x)
        text = self.context_prompt(feats, text)
        return ops.pixel_text_score(feats.local_feat, text.to(feats.local_feat.dtype))

    # ------------------------------------------------------------------ utilities

    def save(self, path: str | PathLike[str]) -> None:
        """Write the model in denseclip_fast's format: safetensors tensors + the JSON config and class names. A model
        whose BatchNorms were folded into its convolutions (engine.fold_batchnorm: a Segmenter's ``model``, an
        inference copy) is refused with a ValueError: load_checkpoint could not read it back."""
        from ..checkpoints.native import save_native

        if any(getattr(m, "_batchnorm_folded", False) for m in self.modules()):
            raise ValueError("this model's BatchNorms are folded into its convolutions (a Segmenter's inference "
                             "copy, or engine.fold_batchnorm): a checkpoint needs them; save the model the "
                             "Segmenter was built from")  # fmt: skip
        save_native(self, path)

    def parameter_counts(self) -> dict[str, int]:
        """``{'total': ..., 'without_text_encoder': ...}`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        text = sum(p.numel() for p in self.text_encoder.parameters())
        return {"total": total, "without_text_encoder": total - text}

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor (B, 3, H, W), got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"x must be a CLIP-normalised floating-point tensor, got dtype {x.dtype} "
                "(uint8 images go through denseclip_fast.preprocess first)"
            )
        if x.shape[0] == 0:
            raise ValueError("x has an empty batch (B=0)")
        check_image_size(tuple(x.shape[2:]), "x")
        if x.device != self.contexts.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.contexts.device}")

    def extra_repr(self) -> str:
        return f"arch={self.config.arch!r}, num_classes={self.num_classes}"

"""One training step as the trainer runs it: the model prepared for training (text encoder frozen, layout, gradient
checkpointing) and the module DDP wraps, images -> (head logits, score map / tau)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..engine import cuda_resample
from ..model import DenseCLIP
from .config import TrainConfig
from .optim import freeze_text_encoder


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The layout of a run's images and convolution weights: channels_last where cfg.channels_last says (None: on
    CUDA), else NCHW."""
    nhwc = device.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def prepare_model(model: DenseCLIP, cfg: TrainConfig, device: torch.device) -> DenseCLIP:
    """The model as a run trains it: text encoder frozen, on ``device``, in train mode, channels_last weights where
    the run uses them (the parameters keep their names and values), gradient checkpointing if asked; on CUDA the
    ResNet's average poolings and the FPN head's upsamplings by the Triton kernels, forward and backward
    (engine/cuda_resample.py: PyTorch's where they do not apply)."""
    freeze_text_encoder(model)
    model.to(device).train()
    if device.type == "cuda":
        cuda_resample.swap_resamplings(model, trainable_only=True)
    if memory_format(cfg, device) == torch.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    return model


class TrainStep(nn.Module):
    """What DDP wraps: images -> (head logits at the head's resolution, 1/4 of the input; score map / tau). The loss
    upsamples both to the label in float32, as mmseg's ``force_fp32`` losses do: under bf16 autocast an upsampling
    inside the model would round the full-size logits to bfloat16 first."""

    def __init__(self, model: DenseCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        feats = model.extract(x)
        logits, score = model.logits_and_score(feats, model.context_prompt(feats, model.class_embeddings()), None)
        return logits, score / model.config.tau


@contextlib.contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """The running statistics of module's BatchNorms left as they are (momentum 0, the batch count restored): the
    recomputation of a checkpointed block in the backward pass runs it in training mode a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:  # saved from the buffer, so the BatchNorm has one
                assert m.num_batches_tracked is not None
                m.num_batches_tracked.copy_(count)


def _checkpointed(forward: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    contexts = lambda: (contextlib.nullcontext(), _batchnorm_statistics_kept(module))  # noqa: E731
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def enable_gradient_checkpointing(model: DenseCLIP) -> int:
    """Recompute the activations of every backbone stage / transformer block in the backward pass (the parameter
    names do not change). Returns how many modules were wrapped."""
    blocks: list[nn.Module] = []
    backbone = model.backbone
    if hasattr(backbone, "layer1"):
        blocks += [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    if hasattr(backbone, "transformer"):
        transformer: Any = backbone.transformer  # the ViT backbone's (backbone is typed as a plain nn.Module)
        blocks += list(transformer.resblocks)
    blocks += list(model.text_encoder.transformer.resblocks)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward, block)
    return len(blocks)


def batchnorm_images(cfg: TrainConfig, world: int) -> int:
    """How many images a BatchNorm layer's statistics come from in one step of ``world`` processes."""
    micro = cfg.batch_size // (world * cfg.accum)
    return micro * world if cfg.sync_bn and world > 1 else micro


def batchnorm_note(cfg: TrainConfig, world: int) -> str | None:
    """What a run says when its BatchNorm statistics come from fewer images than its batch (the official recipe
    synchronises them over the batch of 32), or when --sync-bn can do nothing (one process); None otherwise."""
    images = batchnorm_images(cfg, world)
    if cfg.sync_bn and world == 1:
        return (f"--sync-bn synchronises BatchNorm across torchrun's processes and does nothing in one process: its "
                f"statistics come from the {images} image(s) of each forward (batch_size {cfg.batch_size} / accum "
                f"{cfg.accum})")  # fmt: skip
    if images >= cfg.batch_size:
        return None
    if cfg.sync_bn:  # across world > 1 processes: accumulation splits each step into forwards
        how = f"here each of accum {cfg.accum} forwards is synchronised across the {world} processes"
    else:
        how = "--sync-bn does so across these processes" if world > 1 else "--sync-bn does so under torchrun"
    return (f"BatchNorm statistics come from {images} image(s) (the official recipe synchronises them over its batch "
            f"of 32 on 8 GPUs; {how})")  # fmt: skip


@contextlib.contextmanager
def batchnorm_advice(cfg: TrainConfig, images: int, world: int) -> Iterator[None]:
    """BatchNorm's error for a layer that sees one value per channel (a crop that leaves one pixel at the network's
    1/32 level, with one image per step) as a ValueError that names the options to change."""
    try:
        yield
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise ValueError(
            f"crop {cfg.crop} leaves one pixel at the network's 1/32 level, where BatchNorm sees {images} image(s) "
            f"per step (batch_size {cfg.batch_size} over {world} process(es) x accum {cfg.accum}): one value per "
            "channel, which it cannot normalise; use --crop 64 or more, or more images per step"
        ) from None

"""Optimiser parameter groups, the poly schedule with linear warm-up, and the training loss.

Parameter groups: the text encoder is frozen (``requires_grad=False``: no gradient, no optimiser state); the
backbone learns at ``backbone_lr_mult`` x lr; normalisation layers (BatchNorm, LayerNorm, GroupNorm weights and
biases) get no weight decay. (mmcv matched the substring "norm" in parameter names after the longer "backbone" key,
which in the official model only reaches the context decoder's norm1..3: ``norm_decay="official"`` reproduces that;
the default exempts every normalisation layer, as the recipe says.)

Schedule (mmcv's PolyLrUpdaterHook with linear warm-up, per group): regular = (base - min_lr) * (1 - it / iters) **
power + min_lr; during the first ``warmup_iters``: regular * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio)).
One difference: a group whose base is under ``min_lr`` decays to its base, not up to ``min_lr`` (the floor is
``min(min_lr, base)``). mmcv raised such a group's rate from its base to ``min_lr``: that is how the official recipe's
lr_mult 0 still moved its "frozen" text encoder, and how ``backbone_lr_mult: 0`` here moved the backbone. Groups
whose base is at least ``min_lr`` (the official recipe's) follow mmcv exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .cross_entropy import pixel_cross_entropy, resized_cross_entropy
from .resize import resize_to

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; on CUDA its fused implementation (a few kernels for all parameters, and
    a GradScaler step without a host sync) instead of the default multi-tensor one; on the CPU the multi-tensor one
    (``foreach``), the same numbers as torch's CPU default, which loops over the parameters with a host read of each
    one's step count (no benchmark of the step is committed)."""
    fused = True if device.type == "cuda" else None
    foreach = True if device.type == "cpu" else None
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused,
                             foreach=foreach)  # fmt: skip


def freeze_text_encoder(model: nn.Module) -> None:
    text_encoder = model.text_encoder
    assert isinstance(text_encoder, nn.Module)
    text_encoder.requires_grad_(False)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: (backbone or not) x (normalisation or not); frozen parameters are left out."""
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            backbone = full.startswith("backbone.")
            if cfg.norm_decay == "official":  # mmcv: custom keys longest first, first match wins; "norm" is a substring
                norm = "norm" in full and not backbone
            else:
                norm = isinstance(module, NORMS)
            key = (backbone, norm)
            if key not in groups:
                mult = cfg.backbone_lr_mult if backbone else 1.0
                groups[key] = {"params": [], "names": [], "lr": cfg.lr * mult, "initial_lr": cfg.lr * mult,
                               "weight_decay": 0.0 if norm else cfg.weight_decay}  # fmt: skip
            groups[key]["params"].append(param)
            groups[key]["names"].append(full)
    return [groups[k] for k in sorted(groups)]


def learning_rate(base: float, iteration: int, cfg: TrainConfig) -> float:
    """The learning rate of a group with initial lr ``base`` at ``iteration`` (0-based)."""
    floor = min(cfg.min_lr, base)  # never above the group's base: lr_mult 0 stays 0 (see the module's docstring)
    regular = (base - floor) * (1 - iteration / cfg.iters) ** cfg.poly_power + floor
    if iteration < cfg.warmup_iters:
        k = (1 - iteration / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


def short_run_warning(cfg: TrainConfig, below: float = 0.5) -> str | None:
    """A warning when the linear warm-up (``cfg.warmup_iters``, 1500 in the presets; ``--warmup-iters``) is
    so long against ``cfg.iters`` that the learning rate never reaches ``below`` x ``lr``: a ``--iters 200`` run on
    a preset peaks at 4% of it, one of 1500 iterations at 27% (80k, the recipe: 98%). None otherwise."""
    # the rate rises during the warm-up and only decays after it: its peak is at or before warmup_iters
    peak = max(learning_rate(cfg.lr, it, cfg) for it in range(min(cfg.iters, cfg.warmup_iters + 1)))
    if peak >= below * cfg.lr:
        return None
    return (f"with warmup_iters {cfg.warmup_iters} and iters {cfg.iters} the learning rate peaks at "
            f"{peak / cfg.lr:.0%} of lr ({peak:.3g}): the linear warm-up meets the poly decay; for a short run set "
            "a shorter warm-up (--warmup-iters N, or warmup_iters in the config file; 0 for none)")  # fmt: skip


def set_learning_rates(optimizer: torch.optim.Optimizer, iteration: int, cfg: TrainConfig) -> float:
    """Apply the schedule for ``iteration``; returns the unscaled (head) learning rate, as the optimizer has it:
    the first group's (param_groups puts the groups outside the backbone first), so that what is logged is what
    the optimizer uses, whatever set its ``initial_lr``."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(group["initial_lr"], iteration, cfg)
    return float(optimizer.param_groups[0]["lr"])


def _mean_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """mmseg 0.x's CrossEntropyLoss: per-pixel loss, ignored pixels 0, mean over *all* pixels. Channels_last logits
    (the trainer's on CUDA) as the (pixels, classes) matrix they are in memory: F.cross_entropy of the 4-D map copies
    it to NCHW first (its softmax takes a contiguous input), and the spatial softmax over dim 1 that follows took 3.7
    ms a loss forward, 2.7 backward, at RN50 512x512 batch 16 on an H200 (2.5 GB of float32 logits;
    benchmarks/results/h200_2026-12-04c/train_rn50_b16.md); the rows' cross-entropy reads them as they are (on CUDA
    by the Triton kernels of train/cross_entropy.py, one pass each way), and the gradient comes back channels_last,
    as the logits."""
    logits = logits.float()
    if _pixel_rows(logits, label):
        rows = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])  # a view: each pixel's classes contiguous
        per_pixel = pixel_cross_entropy(rows, label.reshape(-1), ignore_index)
    else:  # (and a label of another shape gets F.cross_entropy's own error)
        per_pixel = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


def _pixel_rows(logits: torch.Tensor, label: torch.Tensor) -> bool:
    """Whether (N, K, H, W) logits are channels_last (K > 1, not also NCHW) with a label of shape (N, H, W)."""
    if logits.dim() != 4 or label.shape != (logits.shape[0], *logits.shape[2:]) or logits.shape[1] < 2:
        return False
    return logits.stride(1) == 1 and logits.is_contiguous(memory_format=torch.channels_last)


def segmentation_loss(
    logits: torch.Tensor, aux_logits: torch.Tensor, label: torch.Tensor, cfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """``loss = CE(head logits) + aux_weight * CE(score / tau upsampled to the label)``; returns all three."""
    logits, aux_logits = logits.float(), aux_logits.float()  # upsampled and scored in float32 under autocast too
    decode = _mean_resized_cross_entropy(logits, label, cfg.ignore_index)
    identity = _mean_resized_cross_entropy(aux_logits, label, cfg.ignore_index, always_resize=True)
    return {"loss": decode + cfg.aux_weight * identity, "loss_decode": decode, "loss_aux": identity}


def _mean_resized_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int,
                                always_resize: bool = False) -> torch.Tensor:  # fmt: skip
    """:func:`_mean_cross_entropy` of ``logits`` upsampled to the label (unless at its size already, and not
    ``always_resize``): on a GPU by the fused kernels (train/cross_entropy.resized_cross_entropy: the label-size
    logits never in memory), else resize_to (F.interpolate's bilinear resize with a gather or two-product backward,
    resize.py: ATen's took three quarters of a training step on an H200), then the cross-entropy."""
    if not always_resize and logits.shape[-2:] == label.shape[-2:]:
        return _mean_cross_entropy(logits, label, ignore_index)
    per_pixel = resized_cross_entropy(logits, label, ignore_index)
    if per_pixel is not None:
        return per_pixel.mean()
    return _mean_cross_entropy(resize_to(logits, label.shape[-2:]), label, ignore_index)

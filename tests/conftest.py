"""Shared fixtures: tiny architectures (fast on 2 cores), the official-model oracle, comparison helpers.

Tiny configs follow the conventions of the official code that the tensors cannot reveal (32 attention-pool heads
for ResNets, width // 64 heads for CLIP transformers, 4 decoder heads, ViT taps after blocks 3/5/7/11), so that an
official-layout checkpoint of a tiny model is detected as the tiny config it came from.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from denseclip_fast.config import DecoderConfig, DenseCLIPConfig, TextConfig, VisionConfig, preset  # noqa: E402

NAMES = ["wall", "chest of drawers", "cat", "bed "]

TINY_TEXT = TextConfig(context_length=13, n_ctx=8, vocab_size=49408, width=64, heads=1, layers=2)
TINY_DECODER = DecoderConfig(width=32, heads=4, layers=2)


def tiny_config(kind: str = "resnet", input_resolution: int = 64) -> DenseCLIPConfig:
    if kind == "resnet":
        vision = VisionConfig(kind="resnet", layers=(1, 1, 1, 1), width=8, heads=32, input_resolution=input_resolution)
        base = preset("RN50")
    else:
        vision = VisionConfig(
            kind="vit", layers=(12,), width=64, heads=1, input_resolution=input_resolution, patch_size=16
        )
        base = preset("ViT-B/16")
    return DenseCLIPConfig(
        arch="custom",
        embed_dim=48,
        vision=vision,
        text=TINY_TEXT,
        decoder=TINY_DECODER,
        fpn_channels=16,
        head_channels=16,
        score_concat_index=base.score_concat_index,
        slide_crop=base.slide_crop,
        slide_stride=base.slide_stride,
        test_scale=base.test_scale,
    )


def official_cfg(config: DenseCLIPConfig) -> dict[str, Any]:
    """The oracle's (mmseg-style) hyperparameters for one of our configs."""
    v, t, d = config.vision, config.text, config.decoder
    if v.kind == "resnet":
        backbone = dict(type="resnet", layers=list(v.layers), output_dim=config.embed_dim,
                        input_resolution=v.input_resolution, width=v.width)  # fmt: skip
    else:
        backbone = dict(type="vit", patch_size=v.patch_size, width=v.width, output_dim=config.embed_dim,
                        layers=v.layers[0], heads=v.heads, input_resolution=v.input_resolution)  # fmt: skip
    return dict(
        backbone=backbone,
        text_encoder=dict(context_length=t.context_length, embed_dim=config.embed_dim, transformer_width=t.width,
                          transformer_heads=t.heads, transformer_layers=t.layers, vocab_size=t.vocab_size),
        context_decoder=dict(transformer_width=d.width, transformer_heads=d.heads, transformer_layers=d.layers,
                             visual_dim=config.embed_dim, dropout=d.dropout),
        text_dim=config.embed_dim, score_concat_index=config.score_concat_index, fpn_out=config.fpn_channels,
        head_channels=config.head_channels, slide=(config.slide_crop, config.slide_stride),
    )  # fmt: skip


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, the measure the acceptance criteria use."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random well-scaled weights, BN statistics and gamma (see benchmarks.official.randomize_)."""
    from benchmarks.official import randomize_

    return randomize_(model, seed)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)

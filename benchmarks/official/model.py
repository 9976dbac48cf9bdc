"""The official DenseCLIP segmentation model, reproduced without mmcv/mmseg: the oracle of the parity tests and the
"official pipeline" contestant of the benchmarks.

This mirrors, operation for operation, raoyongming/DenseCLIP ``segmentation/denseclip/{models,denseclip}.py`` and
the mmseg 0.x pieces its configs use (``FPN`` neck, ``FPNHead``, ``ConvModule``, ``Upsample``, ``resize``,
``slide_inference``): sequence-first CLIP transformers through ``nn.MultiheadAttention``, the attention pool through
``F.multi_head_attention_forward``, the decoder attention through einsum, the text encoder recomputed on every call,
``torch.cat`` for the score channels. It deliberately shares no code with ``denseclip_fast`` so that the two can be
compared. Module and parameter names equal the official ones, so ``state_dict()`` is an official checkpoint.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # weigh_score_channels_ also takes the package's model: for the annotation only, no code shared
    from denseclip_fast import DenseCLIP

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# ----------------------------------------------------------------------------------------------- configs


def official_config(arch: str) -> dict[str, Any]:
    """The model part of the official configs denseclip_fpn_{res50,res101}_512x512_80k / vit-b_640x640_80k."""
    text = dict(context_length=13, embed_dim=1024, transformer_width=512, transformer_heads=8, transformer_layers=12)
    decoder = dict(transformer_width=256, transformer_heads=4, transformer_layers=3, visual_dim=1024, dropout=0.1)
    if arch == "RN50":
        backbone = dict(type="resnet", layers=[3, 4, 6, 3], output_dim=1024, input_resolution=512, width=64)
        return dict(backbone=backbone, text_encoder=text, context_decoder=decoder, text_dim=1024,
                    score_concat_index=3, fpn_out=256, head_channels=256, slide=(512, 341))  # fmt: skip
    if arch == "RN101":
        backbone = dict(type="resnet", layers=[3, 4, 23, 3], output_dim=512, input_resolution=512, width=64)
        return dict(backbone=backbone, text_encoder={**text, "embed_dim": 512},
                    context_decoder={**decoder, "visual_dim": 512}, text_dim=512, score_concat_index=3,
                    fpn_out=256, head_channels=256, slide=(512, 341))  # fmt: skip
    if arch == "ViT-B/16":
        backbone = dict(type="vit", patch_size=16, width=768, output_dim=512, layers=12, heads=12,
                        input_resolution=640, drop_path_rate=0.1)  # fmt: skip
        return dict(backbone=backbone, text_encoder={**text, "embed_dim": 512},
                    context_decoder={**decoder, "visual_dim": 512}, text_dim=512, score_concat_index=2,
                    fpn_out=256, head_channels=256, slide=(640, 426))  # fmt: skip
    raise ValueError(f"unknown arch {arch!r}")


# ----------------------------------------------------------------------------------------------- ResNet


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class AttentionPool2d(nn.Module):
    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.spacial_dim = spacial_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W).permute(2, 0, 1)  # (HW, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        cls_pos = self.positional_embedding[0:1, :]
        grid = self.positional_embedding[1:].reshape(1, self.spacial_dim, self.spacial_dim, self.embed_dim)
        spatial_pos = F.interpolate(grid.permute(0, 3, 1, 2), size=(H, W), mode="bilinear")
        spatial_pos = spatial_pos.reshape(self.embed_dim, H * W).permute(1, 0)
        x = x + torch.cat([cls_pos, spatial_pos], dim=0)[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False,
        )  # fmt: skip
        x = x.permute(1, 2, 0)
        return x[:, :, 0], x[:, :, 1:].reshape(B, -1, H, W)


class CLIPResNetWithAttention(nn.Module):
    def __init__(self, layers: list[int], output_dim: int, input_resolution: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, 32, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        for _ in range(1, blocks):
            layers.append(Bottleneck(self._inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        x = x.type(self.conv1.weight.dtype)
        for conv, bn in [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]:
            x = self.relu(bn(conv(x)))
        x = self.avgpool(x)
        outs: list[Any] = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        outs.append(list(self.attnpool(x)))
        return tuple(outs)


# ----------------------------------------------------------------------------------------------- CLIP transformer


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        return super().forward(x.type(torch.float32)).type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))  # fmt: skip
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as upstream's ResidualAttentionBlock.attention: the mask is moved to the input's device and dtype once and
        # kept there (an attribute, not a buffer: Module.to leaves it; the next call moves it if it must)
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, out_indices: tuple[int, ...] = (3, 5, 7, 11), **_: Any) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.spatial_size = input_resolution // patch_size
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.out_indices = out_indices
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.fpn1 = nn.Sequential(
            nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.SyncBatchNorm(width), nn.GELU(), nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )  # fmt: skip
        self.fpn2 = nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, kernel_size=2, stride=2))
        self.fpn3 = nn.GroupNorm(1, width)
        self.fpn4 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        x = self.conv1(x)
        B, C, H, W = x.shape
        x = x.reshape(B, C, -1).permute(0, 2, 1)
        zeros = torch.zeros(B, 1, C, dtype=x.dtype, device=x.device)
        x = torch.cat([self.class_embedding.to(x.dtype) + zeros, x], dim=1)
        pos = self.positional_embedding.to(x.dtype)
        cls_pos = pos[0, :] + self.class_embedding.to(x.dtype)  # the class embedding, a second time
        grid = pos[1:].reshape(1, self.spatial_size, self.spatial_size, C).permute(0, 3, 1, 2)
        spatial_pos = F.interpolate(grid, size=(H, W), mode="bilinear").reshape(1, C, H * W).permute(0, 2, 1)
        x = x + torch.cat([cls_pos.reshape(1, 1, C), spatial_pos], dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)
        features: list[Any] = []
        for i, blk in enumerate(self.transformer.resblocks):
            x = blk(x)
            if i in self.out_indices:
                features.append(x.permute(1, 0, 2)[:, 1:, :].permute(0, 2, 1).reshape(B, -1, H, W).contiguous())
        ops = [self.fpn1, self.fpn2, self.fpn3, self.fpn4]
        features = [ops[i](f) for i, f in enumerate(features)]
        x = self.ln_post(x.permute(1, 0, 2)) @ self.proj
        features.append([x[:, 0], x[:, 1:].reshape(B, H, W, -1).permute(0, 3, 1, 2)])
        return tuple(features)


class CLIPTextContextEncoder(nn.Module):
    def __init__(self, context_length: int, embed_dim: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int, vocab_size: int = 49408) -> None:  # fmt: skip
        super().__init__()
        self.context_length = context_length
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, mask)
        self.embed_dim = embed_dim
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, transformer_width) * 0.01)
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.randn(transformer_width, embed_dim) * transformer_width**-0.5)

    def forward(self, text: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x_text = self.token_embedding(text)
        K, N1, C = x_text.shape
        B, N2, C = context.shape
        eos_indx = (text.argmax(dim=-1) + N2).reshape(1, K).expand(B, K).reshape(-1)
        x_text = x_text.reshape(1, K, N1, C).expand(B, K, N1, C)
        context = context.reshape(B, 1, N2, C).expand(B, K, N2, C)
        x = torch.cat([x_text[:, :, 0:1], context, x_text[:, :, 1:]], dim=2).reshape(B * K, N1 + N2, C)
        x = x + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), eos_indx] @ self.text_projection
        return x.reshape(B, K, self.embed_dim)


# ----------------------------------------------------------------------------------------------- context decoder


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, C = q.shape
        B, M, C = k.shape
        q = self.q_proj(q).reshape(B, N, self.num_heads, C // self.num_heads)
        k = self.k_proj(k).reshape(B, M, self.num_heads, C // self.num_heads)
        v = self.v_proj(v).reshape(B, M, self.num_heads, C // self.num_heads)
        attn = (torch.einsum("bnkc,bmkc->bknm", q, k) * self.scale).softmax(dim=-1)
        x = torch.einsum("bknm,bmkc->bnkc", attn, v).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self.cross_attn = Attention(d_model, nhead, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model * 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model * 4, d_model)
        )

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        q = k = v = self.norm1(x)
        x = x + self.self_attn(q, k, v)
        q = self.norm2(x)
        x = x + self.cross_attn(q, mem, mem)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    def __init__(self, transformer_width: int, transformer_heads: int, transformer_layers: int, visual_dim: int,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.memory_proj = nn.Sequential(
            nn.LayerNorm(visual_dim), nn.Linear(visual_dim, transformer_width), nn.LayerNorm(transformer_width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, transformer_width))
        self.decoder = nn.ModuleList(
            [TransformerDecoderLayer(transformer_width, transformer_heads, dropout) for _ in range(transformer_layers)]
        )
        self.out_proj = nn.Sequential(nn.LayerNorm(transformer_width), nn.Linear(transformer_width, visual_dim))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        visual = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, visual)
        return self.out_proj(x)


# ----------------------------------------------------------------------------------------------- mmseg neck/head


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, padding: int = 0, norm: bool = False, act: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=not norm)
        if norm:
            self.bn = nn.SyncBatchNorm(cout)
        self.norm, self.act = norm, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.act else x


def resize(x: torch.Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
           align_corners: bool | None = None) -> torch.Tensor:  # fmt: skip
    if isinstance(size, torch.Size):
        size = tuple(int(s) for s in size)
    return F.interpolate(x, size, scale_factor, mode, align_corners)


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvModule(c, out_channels, 1) for c in in_channels])
        self.fpn_convs = nn.ModuleList([ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels])

    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] += F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return tuple(self.fpn_convs[i](laterals[i]) for i in range(len(laterals)))


class Upsample(nn.Module):
    def __init__(self, scale_factor: float, mode: str, align_corners: bool) -> None:
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = float(scale_factor), mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [int(t * self.scale_factor) for t in x.shape[-2:]]
        return resize(x, size, None, self.mode, self.align_corners)


class FPNHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, num_classes: int,
                 feature_strides: tuple[int, ...] = (4, 8, 16, 32), dropout_ratio: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.feature_strides = feature_strides
        self.scale_heads = nn.ModuleList()
        for i in range(len(feature_strides)):
            head_length = max(1, int(np.log2(feature_strides[i]) - np.log2(feature_strides[0])))
            scale_head: list[nn.Module] = []
            for k in range(head_length):
                cin = in_channels[i] if k == 0 else channels
                scale_head.append(ConvModule(cin, channels, 3, padding=1, norm=True, act=True))
                if feature_strides[i] != feature_strides[0]:
                    scale_head.append(Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*scale_head))
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        output = self.scale_heads[0](x[0])
        for i in range(1, len(self.feature_strides)):
            output = output + resize(self.scale_heads[i](x[i]), size=output.shape[2:], mode="bilinear",
                                     align_corners=False)  # fmt: skip
        return self.conv_seg(self.dropout(output))


# ----------------------------------------------------------------------------------------------- segmentor


class OfficialDenseCLIP(nn.Module):
    """``DenseCLIP`` (the mmseg segmentor) for inference: ``encode_decode``, ``slide_inference``."""

    def __init__(self, cfg: dict[str, Any], class_names: list[str], context_length: int = 5) -> None:
        super().__init__()
        b = dict(cfg["backbone"])
        self.backbone: CLIPResNetWithAttention | CLIPVisionTransformer
        if b.pop("type") == "resnet":
            self.backbone = CLIPResNetWithAttention(**b)
            levels = [b["width"] * m for m in (4, 8, 16, 32)]
        else:
            self.backbone = CLIPVisionTransformer(**b)
            levels = [b["width"]] * 4
        self.text_encoder = CLIPTextContextEncoder(**cfg["text_encoder"])
        self.context_decoder = ContextDecoder(**cfg["context_decoder"])
        self.score_concat_index = cfg["score_concat_index"]
        k = len(class_names)
        levels[self.score_concat_index] += k
        self.neck = FPN(levels, cfg["fpn_out"])
        self.decode_head = FPNHead([cfg["fpn_out"]] * 4, cfg["head_channels"], k)
        self.texts = tokenize(class_names, context_length)
        n_ctx = cfg["text_encoder"]["context_length"] - context_length
        self.contexts = nn.Parameter(torch.randn(1, n_ctx, cfg["text_encoder"]["transformer_width"]))
        nn.init.trunc_normal_(self.contexts)
        self.gamma = nn.Parameter(torch.ones(cfg["text_dim"]) * 1e-4)
        self.slide = cfg["slide"]
        self.num_classes = k

    def after_extract_feat(self, x: tuple[Any, ...]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        x_orig = list(x[0:4])
        global_feat, visual_embeddings = x[4]
        B, C, H, W = visual_embeddings.shape
        visual_context = torch.cat(
            [global_feat.reshape(B, C, 1), visual_embeddings.reshape(B, C, H * W)], dim=2
        ).permute(0, 2, 1)
        text_embeddings = self.text_encoder(self.texts.to(global_feat.device), self.contexts).expand(B, -1, -1)
        text_diff = self.context_decoder(text_embeddings, visual_context)
        text_embeddings = text_embeddings + self.gamma * text_diff
        visual_embeddings = F.normalize(visual_embeddings, dim=1, p=2)
        text = F.normalize(text_embeddings, dim=2, p=2)
        score_map = torch.einsum("bchw,bkc->bkhw", visual_embeddings, text)
        x_orig[self.score_concat_index] = torch.cat([x_orig[self.score_concat_index], score_map], dim=1)
        return text_embeddings, x_orig, score_map

    def forward_score(self, img: torch.Tensor) -> torch.Tensor:
        return self.after_extract_feat(self.backbone(img))[2]

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        x = self.backbone(img)
        _, x_orig, _ = self.after_extract_feat(x)
        out = self.decode_head(list(self.neck(x_orig)))
        return resize(out, size=img.shape[2:], mode="bilinear", align_corners=False)

    forward = encode_decode

    def slide_inference(self, img: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
        h_stride = w_stride = stride
        h_crop = w_crop = crop
        batch_size, _, h_img, w_img = img.size()
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((batch_size, self.num_classes, h_img, w_img))
        count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * h_stride, w_idx * w_stride
                y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop_seg_logit = self.encode_decode(img[:, :, y1:y2, x1:x2])
                preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
                count_mat[:, :, y1:y2, x1:x2] += 1
        assert (count_mat == 0).sum() == 0
        return preds / count_mat


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """The official ``tokenize``: [SOT, BPE, EOT] zero-padded, RuntimeError when too long. open_clip's SimpleTokenizer,
    its module loaded as denseclip_fast loads it (importing open_clip's package, its models, would cost seconds)."""
    from denseclip_fast.model.text import _tokenizer_module

    tok = _tokenizer_module().SimpleTokenizer()
    all_tokens = [[tok.sot_token_id] + tok.encode(t) + [tok.eot_token_id] for t in texts]
    result = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            raise RuntimeError(f"Input {texts[i]} is too long for context length {context_length}")
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


def randomize_(model: ModuleT, seed: int = 0) -> ModuleT:
    """Give every parameter and BN statistic random, well-scaled values.

    Fresh BN statistics are 0/1 and the official gamma of 1e-4 would hide the context decoder below any
    tolerance, so a comparison on freshly built models proves little.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "gamma":
                p.copy_(0.25 + 0.5 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif p.dim() == 1:  # biases, class embedding
                p.copy_(0.1 * randn(p.shape))
            else:
                p.copy_(randn(p.shape) * math.prod(p.shape[1:]) ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def score_channel_gain(level: torch.Tensor, score: torch.Tensor) -> float:
    """The factor on the FPN lateral conv's weights for the K score channels that gives them the same share of the
    conv's output variance as the level's C channels (for weights of one scale: std x sqrt(channels) each)."""
    return (level.std() * level.shape[1] ** 0.5 / (score.std() * score.shape[1] ** 0.5)).item()


@torch.no_grad()
def weigh_score_channels_(model: OfficialDenseCLIP | DenseCLIP, size: int = 224, seed: int = 0) -> float:
    """Make the logits of a randomised model depend on the text path; returns the gain applied.

    Random weights leave the score map (cosines of about 0.03, K channels) without influence next to the feature
    level it is concatenated to (values of about 1, 768-2048 channels): with RN50's widths, changing the class
    embeddings moves the logits by a few 1e-6 of their scale, which no logit tolerance sees (found by
    upstream_parity.py). The FPN lateral conv's weights on the score channels are scaled by
    :func:`score_channel_gain`, measured on one random ``size`` x ``size`` image. Works on the oracle
    (OfficialDenseCLIP) and on ``denseclip_fast.DenseCLIP``, whose lateral convs have the same names."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()  # BN statistics untouched
    if isinstance(model, OfficialDenseCLIP):
        index = model.score_concat_index
        feats = model.backbone(x)
        level, score = feats[index], model.after_extract_feat(feats)[2]
    else:  # denseclip_fast.DenseCLIP
        index = model.config.score_concat_index
        level, score = model.extract(x).levels[index], model.forward_features(x)["score_map"]
    model.train(was_training)
    gain = score_channel_gain(level, score)
    cast(nn.Conv2d, model.neck.lateral_convs[index].conv).weight[:, level.shape[1] :] *= gain
    return gain


def save_mmcv_checkpoint(model: nn.Module, path: str, classes: list[str],
                         palette: list[list[int]] | None = None, legacy: bool = False) -> None:  # fmt: skip
    """Write what mmcv's ``save_checkpoint`` writes: ``{'meta': {...}, 'state_dict': OrderedDict}``. ``model``: an
    OfficialDenseCLIP, or a denseclip_fast DenseCLIP (the same state-dict keys). ``legacy``: in torch.save's format
    before torch 1.6 (no zip archive)."""
    meta: dict[str, Any] = {"mmcv_version": "1.4.0", "time": "Thu Jan  1 00:00:00 2022", "CLASSES": tuple(classes)}
    if palette is not None:
        meta["PALETTE"] = palette
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    torch.save({"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=not legacy)

"""Inference-time rewrites of a DenseCLIP model that keep its function.

* BatchNorm folded into the convolution before it (inference BN is an affine map per channel): the ResNet stem and
  bottlenecks (shortcuts included), the Semantic FPN head's conv-BN-ReLU blocks, and the ViT pyramid's
  ConvTranspose-BN. w' = w * gamma / sqrt(var + eps) along the output channels, b' = (b - mean) * gamma /
  sqrt(var + eps) + beta, computed in float32 before any cast.
* channels_last weights (and inputs), which cuDNN's fastest convolutions use.
* native low-precision weights (the CLIP LayerNorms keep computing in float32).
* for a CUDA Segmenter's 16-bit copy: the image encoder's CLIP LayerNorms as one ATen ``layer_norm`` of the
  16-bit tokens and weights (:func:`native_layer_norms`), which computes in float32 too, instead of float32 copies
  around a float32 one.
* for a CUDA Segmenter's copy: the image encoder's CLIP MLPs with ``F.silu`` in place of QuickGELU, its scale folded
  into the weights (:func:`silu_mlps`): one pass over the 4x-wide activations instead of three.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.native import weight_hooks
from ..checkpoints.official import all_finite, key_listing
from ..model import DenseCLIP
from ..model.heads import ConvModule
from ..model.layers import QUICK_GELU_SCALE, LayerNormFp32, QuickGELU
from ..model.resnet import Bottleneck, CLIPResNetBackbone
from ..model.vit import CLIPViTBackbone


@torch.no_grad()
def fold_bn_into(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode ``bn`` that follows ``conv`` into ``conv``'s weight and bias (in place)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    factor = (bn.weight.float() if bn.affine else torch.ones_like(bn.running_var.float())) / torch.sqrt(
        bn.running_var.float() + bn.eps
    )
    shift = bn.bias.float() if bn.affine else torch.zeros_like(factor)
    if isinstance(conv, nn.ConvTranspose2d):  # (in, out / groups, kh, kw): output channel g * out / groups + j
        grouped = conv.weight.float().unflatten(0, (conv.groups, -1))  # (groups, in / groups, out / groups, kh, kw)
        weight = (grouped * factor.view(conv.groups, 1, -1, 1, 1)).flatten(0, 1)
    else:  # (out, in / groups, kh, kw)
        weight = conv.weight.float() * factor.view(-1, 1, 1, 1)
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(factor)
    bias = (bias - bn.running_mean.float()) * factor + shift
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:  # a gradient as the weight's (a prepared copy's take none)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every conv-BN pair of a DenseCLIP model (in place); returns how many were folded. A model with folded
    pairs is marked (``_batchnorm_folded``): its state dict lacks the BatchNorms a checkpoint has, so DenseCLIP.save
    refuses it."""
    folded = 0
    for module in model.modules():
        pairs: list[tuple[nn.Module, str, str]] = []
        if isinstance(module, (CLIPResNetBackbone, Bottleneck)):
            pairs = [(module, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        elif isinstance(module, ConvModule) and module.bn is not None:
            pairs = [(module, "conv", "bn")]
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            pairs = [
                (module, name, nxt)
                for (name, conv), (nxt, bn) in zip(children, children[1:])
                if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d)
            ]
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            if bn.training:
                raise ValueError(
                    "fold_batchnorm needs the model in eval mode (BatchNorm uses batch statistics in train)"
                )
            fold_bn_into(conv, bn)
            setattr(owner, bn_name, None if isinstance(owner, ConvModule) else nn.Identity())
            folded += 1
    if folded:
        setattr(model, "_batchnorm_folded", True)  # a plain attribute (nn.Module's typing takes no bool)
    return folded


def folded(*modules: nn.Module | None) -> bool:
    """Whether these BatchNorm places were folded away (fold_batchnorm leaves nn.Identity, or None in a ConvModule)."""
    return all(m is None or type(m) is nn.Identity for m in modules)


Site = tuple[Literal["stem", "block", "head"], nn.Module, str]


def relu_sites(model: DenseCLIP) -> Iterator[Site]:
    """Where the image path of a folded ``model`` has plain convolutions that a ReLU may follow, for the engines'
    fused convolutions (cpu_conv.py, cuda_conv.py), listed before the caller rewrites any: ("stem", the ResNet
    backbone, "") for its three conv + ReLU; ("block", a Sequential, the child's name) for each folded Bottleneck;
    ("head", a ConvModule, "") for each BatchNorm-free ConvModule with a plain convolution (its ReLU, if any, in
    ``act``). A block or stem whose BatchNorm is still there is not listed."""
    sites: list[Site] = []
    for name, parent in model.named_modules():
        if name.startswith("text_encoder"):
            continue
        if isinstance(parent, CLIPResNetBackbone):
            stem = (parent.conv1, parent.conv2, parent.conv3)
            if folded(parent.bn1, parent.bn2, parent.bn3) and all(type(c) is nn.Conv2d for c in stem):
                sites.append(("stem", parent, ""))
        elif isinstance(parent, ConvModule) and parent.bn is None and type(parent.conv) is nn.Conv2d:
            sites.append(("head", parent, ""))
        elif isinstance(parent, nn.Sequential):
            sites += [("block", parent, child_name) for child_name, child in parent.named_children()
                      if type(child) is Bottleneck and folded(child.bn1, child.bn2, child.bn3)]  # fmt: skip
    return iter(sites)


def check_finite_weights(model: nn.Module) -> None:
    """ValueError naming the parameters and buffers of ``model`` that hold NaN or infinite values (meta tensors,
    which hold none, are skipped). Such a model's outputs are NaN, but the prepared copy's need not be: its fused
    convolutions' ReLU (oneDNN's in a bfloat16 CPU engine, cuDNN's on a GPU) turns NaN into 0, so that a model whose
    training diverged gave finite, meaningless logits and labels without a word. load_checkpoint refuses such
    files; a model in memory is checked here."""
    broken = [name for name, t in (*model.named_parameters(), *model.named_buffers())
              if t.is_floating_point() and not t.is_meta and not all_finite(t.detach())]  # fmt: skip
    if broken:
        raise ValueError(f"model's weights hold NaN or infinite values ({len(broken)} tensors: "
                         f"{key_listing(broken, 5)}): its outputs would be meaningless (a training run that "
                         "diverged?); load finite weights first")  # fmt: skip


@torch.no_grad()
def bake_reparametrizations(model: nn.Module) -> int:
    """Each weight that PyTorch recomputes from others at every forward made a plain parameter holding its value now
    (in place: for a private copy): torch.nn.utils.parametrize's parametrizations (parametrizations.weight_norm,
    spectral_norm, orthogonal, one's own), torch.nn.utils.prune's masks, and the older hook-based weight_norm and
    spectral_norm. fold_batchnorm writes the folded weight into ``conv.weight``, which such a module recomputed (from
    the original and the mask ...) at its next call: the fold was lost with the BatchNorm gone, and a pruned model's
    float32 engine gave logits 2% off without a word (the bfloat16 CPU engine's convolution rewrite refused the
    module, or failed on a dtype mismatch). Returns how many weights were made plain."""
    from torch.nn.utils import parametrize, prune, remove_spectral_norm, remove_weight_norm
    from torch.nn.utils.weight_norm import WeightNorm

    baked = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            # by hand: parametrize.remove_parametrizations deletes the property from the module's class, which a
            # deep copy shares with the original module, whose weight it would take away
            values = {name: getattr(module, name) for name in module.parametrizations}  # type: ignore[union-attr]
            del module._modules["parametrizations"]
            module.__class__ = module.__class__.__bases__[0]  # the class parametrize derived its own from
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
            baked += len(values)
        for name, hook in weight_hooks(module):  # prune's masks, the hook-based weight_norm and spectral_norm
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, name)
            elif isinstance(hook, WeightNorm):
                remove_weight_norm(module, name)
            else:
                remove_spectral_norm(module, name)
            baked += 1
    return baked


def prepare_for_inference(
    model: DenseCLIP,
    device: torch.device,
    dtype: torch.dtype,
    float32_rewrite: Callable[[DenseCLIP], object] | None = None,
) -> DenseCLIP:
    """A private copy of ``model`` for inference (the engine's and the exporters'): eval, no gradients, BatchNorm
    folded, on ``device``; everything an image goes through in ``dtype`` (channels_last weights on CUDA), the text
    encoder and the contexts kept in float32 for the class embeddings. ``float32_rewrite``: called with the float32
    copy after the folding, before the move and the cast (the CPU engine's oneDNN linears, whose weight scaling is
    then rounded once)."""
    check_finite_weights(model)
    # float32 first, whatever the model's dtype: the folded weights are rounded once, to ``dtype``, and the text
    # encoder computes in float32 (a half-precision model's folded weights were rounded to its dtype, then cast)
    model = copy.deepcopy(model).float().eval().requires_grad_(False)
    bake_reparametrizations(model)  # before the folding, which writes into the weights
    fold_batchnorm(model)
    if float32_rewrite is not None:
        float32_rewrite(model)
    model.to(device)
    for name, child in model.named_children():
        if name != "text_encoder":
            child.to(dtype)
    model.gamma.data = model.gamma.data.to(dtype)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


SILU_DEVICES = ("cuda",)  # where a Segmenter takes silu_mlps (the CPU engine fuses the MLPs with oneDNN instead)


def silu_mlps_wanted(device: torch.device) -> bool:
    """Whether a Segmenter on ``device`` rewrites its image encoder's MLPs (:func:`silu_mlps`): a device of
    SILU_DEVICES, and not ``DENSECLIP_FAST_SILU_MLP=0`` (read when it is built)."""
    return device.type in SILU_DEVICES and os.environ.get("DENSECLIP_FAST_SILU_MLP", "1") != "0"


@torch.no_grad()
def fold_quick_gelus(root: nn.Module, linear: type[nn.Module], activation: Callable[[], nn.Module]) -> list[Any]:
    """Each CLIP MLP under ``root`` (an ``nn.Sequential`` of ``c_fc``, QuickGELU, ``c_proj`` in that order, its
    layers exactly of type ``linear`` with float32 weights) rewritten in place for a SiLU: c_fc' = 1.702 c_fc (its
    bias too), c_proj' = c_proj / 1.702, QuickGELU replaced by ``activation()``: QuickGELU(y) = y sigmoid(1.702 y)
    = SiLU(1.702 y) / 1.702. The scaled weights are rounded once (about 1e-7 relative in float32; a 16-bit engine
    casts them afterwards, rounding them to its dtype once too: 16-bit weights, scaled, would be rounded twice, so
    they are left alone). Returns the rewritten MLPs' c_fc layers (none a second time)."""
    folded = []
    for module in root.modules():
        if not isinstance(module, nn.Sequential) or list(module._modules) != ["c_fc", "gelu", "c_proj"]:
            continue
        c_fc: Any = module.c_fc  # a ``linear`` once checked: its weight, bias and post-op
        c_proj: Any = module.c_proj
        if type(module.gelu) is not QuickGELU or {type(c_fc), type(c_proj)} != {linear}:  # both exactly ``linear``
            continue
        if not c_fc.weight.dtype == c_proj.weight.dtype == torch.float32:
            continue
        c_fc.weight.mul_(QUICK_GELU_SCALE)
        if c_fc.bias is not None:
            c_fc.bias.mul_(QUICK_GELU_SCALE)
        c_proj.weight.div_(QUICK_GELU_SCALE)
        module.gelu = activation()
        folded.append(c_fc)
    return folded


def silu_mlps(model: DenseCLIP) -> int:
    """The image encoder's CLIP MLPs (a ViT's blocks, plain ``nn.Linear`` layers) with ``nn.SiLU`` in place of
    QuickGELU, its scale folded into the weights (:func:`fold_quick_gelus`). ATen's QuickGELU is three elementwise
    kernels (the product by 1.702, the sigmoid, the product), each a pass over the 4x-wide activations (ViT-B/16 at
    640x640: 1601 x 3072 values an image, in each of 12 blocks); F.silu is one, computed in float32 and rounded
    once. The same function. For a Segmenter's private float32 copy, before its cast
    (engine.rewrite.prepare_for_inference's ``float32_rewrite``) on a device of SILU_DEVICES (the CPU engine does the
    same with oneDNN's SiLU post-op: cpu_linear.fuse_quick_gelu). The text encoder keeps its MLPs: the class
    embeddings stay the model's. Returns how many MLPs were rewritten (a second call: none)."""
    return len(fold_quick_gelus(model.backbone, nn.Linear, nn.SiLU))


def _refuse_weights(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "this is a Segmenter's prepared copy of a model (BatchNorm folded into the convolutions; the MLPs' weights "
        "scaled for a SiLU, on a GPU convolutions fused): weights loaded into it would not be "
        "prepared alike, and a non-strict load would run without them silently. Load the weights into a DenseCLIP "
        "(denseclip_fast.load_checkpoint, or DenseCLIP.load_state_dict) and build a new Segmenter from it"
    )


def refuse_loading(model: nn.Module) -> None:
    """Make ``load_state_dict`` on ``model`` or any of its modules raise a RuntimeError that says what to do instead
    (a load_state_dict pre-hook on each module, which pickling and deepcopy keep): the engine's copy holds
    rewritten weights, and a checkpoint's state dict loaded into it with ``strict=False`` ran with unscaled MLP
    weights on a CPU (strict, it failed on the folded BatchNorms' keys, a message that did not say why)."""
    for module in model.modules():
        module.register_load_state_dict_pre_hook(_refuse_weights)


def channels_last_pyramid(model: DenseCLIP) -> bool:
    """A ViT backbone's pyramid adapters (GroupNorm, transposed convolutions) fed channels_last token maps instead of
    NCHW ones (in place; returns whether ``model`` has a ViT backbone): a copy of the tokens either way, and
    oneDNN's channels_last ConvTranspose2d took half the time of its NCHW one on 2 CPU threads. For the CPU engine
    (Segmenter), where it is measured: benchmarks/results/predict_vit_cpu_2threads_amx.md against
    predict_vit_cpu_2threads_amx_before_5b29c29.md (ViT-B/16 logits in 0.72-0.91x the time)."""
    if not isinstance(model.backbone, CLIPViTBackbone):
        return False
    model.backbone.pyramid_channels_last = True
    return True


HALF_DTYPES = (torch.bfloat16, torch.float16)
NATIVE_LN_DEVICES = ("cuda",)  # where NativeLayerNorm takes ATen's 16-bit layer_norm (tests add "cpu")


class NativeLayerNorm(LayerNormFp32):
    """CLIP's float32 LayerNorm where the input and the weights share a 16-bit dtype, on CUDA: ATen's
    ``layer_norm``, whose CUDA kernel computes the statistics (Welford, in float32: T_ACC is float for Half and
    BFloat16) and the affine map in float32 and rounds once, as LayerNormFp32's float32 computation and cast back do,
    in one kernel; LayerNormFp32 launches four more (the tokens to float32, the weight and bias to float32, the
    result back), the tokens' float32 copy written and read. The results differ from LayerNormFp32's only in the
    order of the statistics' float32 sums (the kernel's vector width follows the dtype). Any other input (float32, a
    dtype other than the weights', a CPU tensor, or under autocast, which would return layer_norm's float32) takes
    LayerNormFp32's computation. Not on a CPU: there it changed nothing measurable
    (benchmarks/results/e2e_cpu_2threads_vit_native_ln.md), and ATen's CPU kernel for 16-bit inputs computes the
    statistics another way, less exactly for rows whose mean is large against their spread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (x.dtype in HALF_DTYPES and x.device.type in NATIVE_LN_DEVICES and w is not None and b is not None
                and x.dtype == w.dtype == b.dtype and not torch.is_autocast_enabled(x.device.type)):  # fmt: skip
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        return super().forward(x)


def half_rewrite_wanted(device: torch.device, dtype: torch.dtype, devices: tuple[str, ...], variable: str) -> bool:
    """Whether a Segmenter on ``device`` in ``dtype`` takes one of its 16-bit rewrites: a device of ``devices``, a
    dtype of HALF_DTYPES, and not ``variable=0`` in the environment (read when it is built)."""
    return device.type in devices and dtype in HALF_DTYPES and os.environ.get(variable, "1") != "0"


def replace_children(root: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Each module below ``root`` for which ``replacement`` gives another module, replaced by it in its parent (in
    place, under the same name); returns how many."""
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def native_layer_norms_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Segmenter on ``device`` in ``dtype`` swaps them (:func:`native_layer_norms`): a device of
    NATIVE_LN_DEVICES, a 16-bit dtype, and not ``DENSECLIP_FAST_NATIVE_LN=0`` (read when it is built)."""
    return half_rewrite_wanted(device, dtype, NATIVE_LN_DEVICES, "DENSECLIP_FAST_NATIVE_LN")


def native_layer_norms(model: DenseCLIP) -> int:
    """Swap the image encoder's LayerNormFp32 modules (a ViT's ln_pre, its blocks' ln_1 and ln_2, ln_post) for
    :class:`NativeLayerNorm` on the same parameters, in place; returns how many. For a CUDA Segmenter's copy in a
    16-bit dtype (where they differ: float32 takes LayerNormFp32's path). The text encoder keeps its own (float32,
    and the class embeddings stay the model's). An AOTInductor package made from such a Segmenter traces them
    (Inductor's decomposition of a 16-bit layer_norm computes in float32 too); the ONNX graphs, prepared without a
    Segmenter, keep LayerNormFp32 (a runtime may run a float16 graph's LayerNormalization in float16)."""

    def native(child: nn.Module) -> nn.Module | None:
        if type(child) is not LayerNormFp32:
            return None
        norm = NativeLayerNorm(child.normalized_shape, child.eps, child.elementwise_affine, device="meta")
        norm.weight, norm.bias = child.weight, child.bias
        return norm

    return replace_children(model.backbone, native)

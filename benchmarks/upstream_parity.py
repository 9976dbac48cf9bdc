"""Parity with the upstream DenseCLIP code itself: denseclip_fast against raoyongming/DenseCLIP's segmentation code,
run from a checkout of that repository, same weights, same inputs, float32 on the CPU.

    git clone https://github.com/raoyongming/DenseCLIP /path/to/DenseCLIP
    python benchmarks/upstream_parity.py --upstream /path/to/DenseCLIP                  # RN50, RN101, ViT-B/16
    python benchmarks/upstream_parity.py --upstream /path/to/DenseCLIP --archs RN50 --out /tmp/results

--upstream is the repository root. Nothing of upstream's is copied into this repository: its files are read from the
checkout and executed at run time. Nothing is needed from mmcv or mmseg (which upstream imports: mmseg 0.x, mmcv
1.x); the few pieces of theirs that the code below needs are stubs or stand-ins of ours, listed here.

Upstream's code, run as it is (segmentation/denseclip/):
  models.py       the backbones (CLIPResNetWithAttention, CLIPVisionTransformer), the text encoder
                  (CLIPTextContextEncoder) and the context decoder (ContextDecoder); the only source rewrites are for
                  today's timm (TIMM_REWRITES: ``timm.models.layers`` -> ``timm.layers`` without the unused ``drop``,
                  and three unused ``timm.models`` imports dropped), each required to match exactly once
  denseclip.py    the segmentor DenseCLIP: its __init__ (class names tokenised, contexts, gamma), extract_feat,
                  after_extract_feat, encode_decode, slide_inference, inference (softmax)
  untils.py       its tokenizer, with the BPE vocabulary next to it (needs ftfy and regex)
  configs         segmentation/configs/denseclip_fpn_{res50,res101}_512x512_80k.py, denseclip_fpn_vit-b_640x640_80k.py
                  and their _base_ files: every model argument, the slide crop/stride, the test scale and the image
                  normalisation come from them (merged as mmcv's Config does: load_config below)
Ours:
  - the FPN neck and FPNHead: the stand-ins of benchmarks/official/model.py (the project's reproduction of the
    official model), written from mmseg 0.x's source (necks/fpn.py, decode_heads/fpn_head.py, ConvModule) and
    checked by reading it, not by running it; upstream's configs use them with the arguments checked in build_neck
    and build_head
  - stubs of the mmseg names upstream imports: the registries and builder (prebuilt modules passed through),
    BaseSegmentor (nn.Module with mmseg's with_neck / with_decode_head / with_auxiliary_head), ``resize`` (mmseg's is
    F.interpolate behind a warning), ``add_prefix`` (training only); placeholders for what is imported and unused
  - the mmcv-style preprocessing of the end-to-end check: keep-ratio Resize (mmcv.imrescale: cv2.resize bilinear to
    int(side * scale + 0.5)) and Normalize (mmcv.imnormalize_: BGR -> RGB, cv2.subtract the mean, cv2.multiply by
    1/std) with OpenCV, as the config's test pipeline asks

Per architecture: upstream's DenseCLIP is built from its official config, given random weights (randomize_: BN
statistics too, and gamma 0.25-0.75 instead of 1e-4 so that the context decoder counts; the FPN's weights on the
score-map channels scaled up, weigh_score_channels, so that the logits depend on the text path), saved as mmcv saves a
checkpoint (meta CLASSES/PALETTE + state_dict) in a temporary directory and loaded with denseclip_fast.load_checkpoint.
Then, on random CLIP-normalised inputs: the 4 feature levels, the global and local features, the class embeddings
before and after the context decoder, the score map and the whole-image logits at an odd size; slide-inference logits
with the official crop/stride on an image that takes 4 windows, rescaled to an original size as upstream does; and
the end-to-end uint8 path (--e2e-archs, default: every one of --archs): upstream's slide_inference and inference on
the mmcv-style preprocessed image against Segmenter(model, device="cpu", dtype=torch.float32, mode="slide").logits
and denseclip_fast.train.evaluate.predict_probabilities on the uint8 image. Each comparison reports max |ours -
upstream|, that over max |upstream| (the relative error) and, for class maps, the fraction of pixels whose argmax
agrees; it passes within the tolerances REL_TOL and ARGMAX_TOL. The package's config is also compared with
upstream's where the tensors of a checkpoint cannot tell (crop, stride, test scale, score index, context lengths,
attention heads, ViT tap blocks).

Writes <out>/upstream_parity_<tag>.json and .md (default benchmarks/results/upstream_parity_cpu.*), with the upstream
commit when --upstream is a git checkout. Exit status: 0 when every check is within tolerance, 1 when one is not, 2
when --upstream is not a DenseCLIP checkout or upstream's code cannot be loaded (one line on stderr). About 2 minutes
on 2 CPU cores for the three architectures (RN50 30 s, RN101 30 s, ViT-B/16 70 s), 5 GB of memory at most and up to
0.7 GB of temporary disk (the checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import Results, arch_name, environment  # noqa: E402
from benchmarks.official.model import FPN, FPNHead, randomize_, score_channel_gain  # noqa: E402

# Tolerances, float32 on the CPU. Measured (benchmarks/results/upstream_parity_cpu.md): relative errors of exactly 0
# for the levels, features and text before the decoder (the same operations in the same order); 3e-7 to 2.4e-6 for
# everything after the decoder in the model (text, score map, whole and slide logits); on the engine's uint8 path
# 9e-7 (ViT-B/16), 3.4e-6 (RN50) and 2.1e-5 (RN101; the model itself gives 8e-7 on the same input; before the CPU
# engine's linear layers went through oneDNN: 6e-7, 1.9e-6 and 2.2e-5, and the notes below). RN101's is the
# Segmenter's folded BatchNorm (float32 rounding of a few 1e-6 in the features) times the score channels' gain
# (x4094 for RN101's random weights, x1224 for RN50's): on a 512x512 whole image the engine is within 1.7e-6 of the
# model for RN101 without the gain (as RN50: 1.5e-6) and 5.6e-6 with a gain of 2868. 1e-4 is the engine's own
# float32 tolerance against the model (tests/test_engine.py), leaves a margin of 4.8x over RN101's engine path and
# 29x over everything else, and is far below what a real difference makes: 1% less of the context decoder's output
# in upstream's code moved the text by 7e-3, the score map by 2e-3 and the logits by 8e-4 (after
# weigh_score_channels; a wrong resize, normalisation or attention scale moves more).
REL_TOL = 1e-4
# Probabilities are judged against the logits' tolerance carried through the softmax: a logit error d moves a
# probability by at most d/2 (|dp_k| = p_k |sum_j p_j (dz_k - dz_j)| <= 2 d p_k (1 - p_k)), so the tolerance is
# REL_TOL * max |logits| / 2. Random weights give large logits (up to 240 for RN101), whose float32 error of 5e-3
# moves RN101's probabilities by 1.7e-4: more than 1e-4 of their own scale (1), as it should.
# The argmax agreement is not required to be exactly 1: at a pixel whose two best classes are closer than the float32
# error, either order is right. Such ties are rare but happen (ViT-B/16's slide logits: 2 pixels of 354,000), and
# 1e-4 of the pixels (at most 35 on these sizes) is still far fewer than any real difference flips.
ARGMAX_TOL = 0.9999

PACKAGE = "_upstream_denseclip"  # the name upstream's segmentation/denseclip is loaded under
SOURCES = ("models.py", "denseclip.py", "untils.py", "bpe_simple_vocab_16e6.txt.gz")
CONFIGS = {
    "RN50": "denseclip_fpn_res50_512x512_80k.py",
    "RN101": "denseclip_fpn_res101_512x512_80k.py",
    "ViT-B/16": "denseclip_fpn_vit-b_640x640_80k.py",
}
# Upstream imports timm.models.layers (moved to timm.layers in timm 0.9; its ``drop`` module is gone from the old path
# and unused) and three timm.models classes it never uses.
TIMM_REWRITES = (
    ("from timm.models.layers import drop, drop_path, trunc_normal_",
     "from timm.layers import drop_path, trunc_normal_"),
    ("from timm.models.resnet import ResNet as TimmResNet", ""),
    ("from timm.models.resnet import Bottleneck as TimmBottleneck", ""),
    ("from timm.models.vision_transformer import VisionTransformer", ""),
)
# Input sizes (height, width). Odd whole-image sizes; slide images that take 2x2 windows of the official crop
# (ResNets 512/341, ViT 640/426), rescaled to an original size that is no multiple of anything; the end-to-end image
# becomes 512x713 (ResNets) or 640x891 (ViT) under the test scale: 2 windows.
WHOLE = {"RN50": (227, 291), "RN101": (163, 227), "ViT-B/16": (229, 307)}
SLIDE = {"RN50": (600, 777), "RN101": (600, 777), "ViT-B/16": (700, 900)}
ORIGINAL = {"RN50": (451, 583), "RN101": (451, 583), "ViT-B/16": (523, 677)}
E2E_IMAGE = (301, 419)


class UpstreamError(Exception):
    """--upstream is not a usable DenseCLIP checkout: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------------------------- upstream's code


def check_checkout(root: Path, archs: list[str]) -> None:
    """Raise UpstreamError naming --upstream and what is missing unless root is a DenseCLIP checkout."""
    expected = ("expected the root of a raoyongming/DenseCLIP checkout "
                "(the folder with segmentation/denseclip/models.py)")
    if not root.is_dir():
        raise UpstreamError(f"--upstream {root}: no such directory; {expected}")
    if not (root / "segmentation/denseclip/models.py").is_file():
        below = (root / "denseclip/models.py").is_file() or (root / "models.py").is_file()
        hint = " (it is a folder inside one: give the repository root)" if below else ""
        raise UpstreamError(f"--upstream {root}: {expected}; it has no segmentation/denseclip/models.py{hint}")
    needed = [f"segmentation/denseclip/{name}" for name in SOURCES]
    needed += [f"segmentation/configs/{CONFIGS[arch]}" for arch in archs]
    missing = [path for path in needed if not (root / path).is_file()]
    if missing:
        raise UpstreamError(f"--upstream {root}: {expected}; it lacks {', '.join(missing)}")


class _Registry:
    def register_module(self, *args: Any, **kwargs: Any) -> Any:
        return lambda cls: cls


def _built(module: Any) -> nn.Module:
    """mmseg's builder, for modules built beforehand from the config (build_upstream)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"the stub builder takes built modules, got {type(module).__name__}")
    return module


class _BaseSegmentor(nn.Module):
    """mmseg's BaseSegmentor as far as DenseCLIP's inference uses it: the init_cfg argument and the with_* flags."""

    def __init__(self, init_cfg: Any = None) -> None:
        super().__init__()

    @property
    def with_neck(self) -> bool:
        return getattr(self, "neck", None) is not None

    @property
    def with_decode_head(self) -> bool:
        return getattr(self, "decode_head", None) is not None

    @property
    def with_auxiliary_head(self) -> bool:
        return getattr(self, "auxiliary_head", None) is not None


def _resize(input: torch.Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
            align_corners: bool | None = None, warning: bool = True) -> torch.Tensor:  # fmt: skip
    """mmseg.ops.resize without its warning about align_corners."""
    if isinstance(size, torch.Size):
        size = tuple(int(s) for s in size)
    return F.interpolate(input, size, scale_factor, mode, align_corners)


def _add_prefix(inputs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """mmseg.core.add_prefix (used in training only)."""
    return {f"{prefix}.{name}": value for name, value in inputs.items()}


def _mmseg_stubs() -> dict[str, types.ModuleType]:
    """The mmseg modules upstream's models.py and denseclip.py import, as stubs."""
    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    builder = module("mmseg.models.builder", BACKBONES=_Registry(), SEGMENTORS=_Registry(), HEADS=_Registry(),
                     build_backbone=_built, build_neck=_built, build_head=_built)  # fmt: skip
    mods = [module("mmseg"), module("mmseg.core", add_prefix=_add_prefix),
            module("mmseg.ops", resize=_resize, Upsample=None), module("mmseg.models", builder=builder), builder,
            module("mmseg.models.backbones", ResNet=None, VisionTransformer=None),  # imported, unused
            module("mmseg.models.segmentors"),
            module("mmseg.models.segmentors.base", BaseSegmentor=_BaseSegmentor)]  # fmt: skip
    return {m.__name__: m for m in mods}


@contextlib.contextmanager
def _modules(extra: dict[str, types.ModuleType]) -> Iterator[None]:
    """sys.modules with ``extra`` while upstream's files are imported, as it was afterwards."""
    saved = {name: sys.modules[name] for name in extra if name in sys.modules}
    sys.modules.update(extra)
    try:
        yield
    finally:
        for name in list(sys.modules):
            if name in extra or name.startswith(f"{PACKAGE}."):
                del sys.modules[name]
        sys.modules.update(saved)


def _exec_source(path: Path, name: str, rewrites: tuple[tuple[str, str], ...] = ()) -> types.ModuleType:
    source = path.read_text()
    for old, new in rewrites:
        if source.count(old) != 1:
            raise UpstreamError(f"--upstream: {path} no longer has the line {old!r} exactly once; "
                                "benchmarks/upstream_parity.py's TIMM_REWRITES need updating")  # fmt: skip
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__, module.__package__ = str(path), PACKAGE
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def load_upstream(root: Path) -> types.SimpleNamespace:
    """Upstream's untils.py, models.py and denseclip.py, executed from the checkout (see the module docstring)."""
    folder = root / "segmentation" / "denseclip"
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    try:
        with _modules({**_mmseg_stubs(), PACKAGE: package}):
            untils = _exec_source(folder / "untils.py", f"{PACKAGE}.untils")
            models = _exec_source(folder / "models.py", f"{PACKAGE}.models", TIMM_REWRITES)
            segmentor = _exec_source(folder / "denseclip.py", f"{PACKAGE}.denseclip")
    except ImportError as exc:
        raise UpstreamError(f"--upstream: upstream's code in {folder} needs a module this environment lacks: {exc} "
                            "(upstream's tokenizer needs ftfy and regex, its models timm)") from exc  # fmt: skip
    return types.SimpleNamespace(untils=untils, models=models, denseclip=segmentor)


def upstream_commit(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD's hash, whether upstream's code or configs differ from it) when root is a git checkout, else Nones."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--", "segmentation/denseclip", "segmentation/configs")
    return commit, None if status is None else bool(status)


# ----------------------------------------------------------------------------------------------- upstream's configs


def _merge(child: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """mmcv's Config._merge_a_into_b: dicts merge key by key unless ``_delete_=True``, anything else replaces."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict):
            value = dict(value)
            if not value.pop("_delete_", False) and isinstance(merged.get(key), dict):
                value = _merge(value, merged[key])
        merged[key] = value
    return merged


def load_config(path: Path) -> dict[str, Any]:
    """mmcv's Config.fromfile for upstream's plain-dict configs: the file's variables merged over its _base_ files."""
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    cfg = {k: v for k, v in namespace.items()
           if not k.startswith("__") and not isinstance(v, (types.ModuleType, types.FunctionType))}  # fmt: skip
    bases = cfg.pop("_base_", [])
    base: dict[str, Any] = {}
    for name in [bases] if isinstance(bases, str) else bases:
        part = load_config(path.parent / name)
        if base.keys() & part.keys():
            raise UpstreamError(f"--upstream: {path}: duplicate keys among its _base_ files")
        base.update(part)
    return _merge(cfg, base)


def pipeline_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """The test scale and normalisation of the config's test pipeline, which preprocess() implements."""
    aug = next(t for t in cfg["data"]["test"]["pipeline"] if t["type"] == "MultiScaleFlipAug")
    steps = {t["type"]: t for t in aug["transforms"]}
    if aug.get("flip") or aug.get("img_ratios") or not steps["Resize"].get("keep_ratio"):
        raise UpstreamError("--upstream: the test pipeline is no longer one keep-ratio scale without flip")
    norm = steps["Normalize"]
    return {"img_scale": tuple(aug["img_scale"]), "mean": norm["mean"], "std": norm["std"], "to_rgb": norm["to_rgb"]}


# ----------------------------------------------------------------------------------------------- the models

# Upstream's segmentor (the DenseCLIP nn.Module of its denseclip.py): its classes come from code executed out of the
# checkout at run time (load_upstream), so nothing here knows their attributes' types.
Upstream = Any


class _FPNHead(FPNHead):
    """benchmarks/official's FPNHead with what mmseg's BaseDecodeHead gives DenseCLIP (forward_test, the flags)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg["in_channels"], cfg["channels"], cfg["num_classes"], tuple(cfg["feature_strides"]),
                         cfg["dropout_ratio"])  # fmt: skip
        self.num_classes, self.align_corners = cfg["num_classes"], cfg["align_corners"]

    def forward_test(self, inputs: list[torch.Tensor], img_metas: Any, test_cfg: Any) -> torch.Tensor:
        return self(inputs)


def build_neck(cfg: dict[str, Any]) -> nn.Module:
    if cfg["type"] != "FPN" or cfg["num_outs"] != len(cfg["in_channels"]) or set(cfg) - {
            "type", "in_channels", "out_channels", "num_outs"}:
        raise UpstreamError(f"--upstream: the neck is no longer the plain FPN the stand-in implements: {cfg}")
    return FPN(list(cfg["in_channels"]), cfg["out_channels"])


def build_head(cfg: dict[str, Any]) -> nn.Module:
    plain = cfg["type"] == "FPNHead" and list(cfg["in_index"]) == [0, 1, 2, 3] and not cfg["align_corners"]
    if not plain or cfg["norm_cfg"]["type"] not in ("SyncBN", "BN"):
        raise UpstreamError(f"--upstream: the head is no longer the FPNHead the stand-in implements: {cfg}")
    return _FPNHead(cfg)


def build_upstream(up: types.SimpleNamespace, cfg: dict[str, Any], names: list[str]) -> Upstream:
    """Upstream's DenseCLIP built as mmseg's builder would from the config (identity_head, training only and without
    weights, left out), with random weights, in eval mode."""
    model = dict(cfg["model"])
    model.pop("type")
    model.pop("pretrained", None)  # CLIP weights: random ones instead
    for part in ("backbone", "text_encoder", "context_decoder"):
        kwargs = dict(model[part])
        model[part] = getattr(up.models, kwargs.pop("type"))(**kwargs)
    if model.get("text_head"):
        raise UpstreamError("--upstream: text_head=True gives the head the text embeddings, which the stand-in lacks")
    model["neck"], model["decode_head"] = build_neck(model["neck"]), build_head(model["decode_head"])
    model["test_cfg"] = types.SimpleNamespace(**model["test_cfg"])
    model.update(identity_head=None, train_cfg=None, class_names=names)
    segmentor = up.denseclip.DenseCLIP(**model)
    return randomize_(segmentor, seed=1).eval()


def weigh_score_channels(up: Upstream) -> float:
    """Make the logits depend on the text path. Random weights leave the score map (cosines of about 0.03 in K
    channels) without influence next to the visual channels it is concatenated with (about 1, in 768-2048 channels):
    a 1% change of gamma * decoder(...) in upstream's code moved the RN50 logits by 2e-6 of their scale, which no
    logit tolerance sees. The FPN lateral conv's weights on the K score channels are scaled so that both parts give
    its output the same variance (measured on a random 224x224 image); returns the gain."""
    idx = up.score_concat_index
    outs = up.extract_feat(torch.randn(1, 3, 224, 224))
    _, _, score = up.after_extract_feat(outs)
    visual = outs[idx]
    gain = score_channel_gain(visual, score)
    up.neck.lateral_convs[idx].conv.weight[:, visual.shape[1]:] *= gain
    return gain


def save_checkpoint(segmentor: nn.Module, names: list[str], path: Path) -> None:
    """What mmcv's save_checkpoint writes for an mmseg model: meta with CLASSES and PALETTE, and the state dict."""
    state = OrderedDict((k, v.detach().clone()) for k, v in segmentor.state_dict().items())
    palette = [[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(len(names))]
    torch.save({"meta": {"CLASSES": tuple(names), "PALETTE": palette}, "state_dict": state}, path)


# ----------------------------------------------------------------------------------------------- comparisons


def compare(arch: str, check: str, ours: torch.Tensor, ref: torch.Tensor, argmax: bool = False,
            tol: float = REL_TOL) -> dict[str, Any]:  # fmt: skip
    """One row: max |ours - ref|, max |ref|, their ratio (within ``tol``); the argmax agreement over dim 1 for class
    maps (within ARGMAX_TOL)."""
    row: dict[str, Any] = {"arch": arch, "check": check, "shape": list(ref.shape)}
    if ours.shape != ref.shape:
        return {**row, "error": f"shape {list(ours.shape)} against upstream's {list(ref.shape)}", "ok": False}
    a, b = ours.detach().double(), ref.detach().double()
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    row.update(max_abs_diff=diff, max_abs_ref=scale, rel_error=diff / scale if scale else diff, tolerance=tol)
    row["ok"] = row["rel_error"] <= tol
    if argmax:
        same = a.argmax(1) == b.argmax(1)
        row.update(argmax_agreement=same.double().mean().item(), argmax_disagreeing=int((~same).sum()))
        row["ok"] = row["ok"] and row["argmax_agreement"] >= ARGMAX_TOL
    return row


def compare_config(arch: str, model: dcf.DenseCLIP, up: Upstream, pipeline: dict[str, Any]) -> dict[str, Any]:
    """The package's config against upstream's built segmentor and test pipeline, for the values that the tensors of
    a checkpoint cannot tell."""
    c, backbone = model.config, up.backbone
    vision_heads = backbone.attnpool.num_heads if c.vision.kind == "resnet" else (
        backbone.transformer.resblocks[0].attn.num_heads)
    pairs = {
        "arch": (c.arch, arch),
        "vision.heads": (c.vision.heads, vision_heads),
        "text.heads": (c.text.heads, up.text_encoder.transformer.resblocks[0].attn.num_heads),
        "slide_crop": (c.slide_crop, up.test_cfg.crop_size[0]),
        "slide_stride": (c.slide_stride, up.test_cfg.stride[0]),
        "test_scale": (tuple(c.test_scale), pipeline["img_scale"]),
        "score_concat_index": (c.score_concat_index, up.score_concat_index),
        "text.context_length": (c.text.context_length, up.text_encoder.context_length),
        "class-name tokens": (c.text.context_length - c.text.n_ctx, up.context_length),
        "decoder.layers": (c.decoder.layers, len(up.context_decoder.decoder)),
        "decoder.heads": (c.decoder.heads, up.context_decoder.decoder[0].self_attn.num_heads),
    }
    if c.vision.kind == "vit":
        pairs["vision.out_indices"] = (tuple(c.vision.out_indices), tuple(backbone.out_indices))
    wrong = {k: {"package": v[0], "upstream": v[1]} for k, v in pairs.items() if v[0] != v[1]}
    return {"arch": arch, "check": "package config = upstream's (" + ", ".join(pairs) + ")", "fields": len(pairs),
            "mismatches": wrong, "ok": not wrong}  # fmt: skip


def whole_checks(arch: str, up: Upstream, model: dcf.DenseCLIP) -> list[dict[str, Any]]:
    """Features, class embeddings, score map and logits of one whole image of an odd size."""
    x = torch.randn(1, 3, *WHOLE[arch])
    outs = up.extract_feat(x)
    text, _, score = up.after_extract_feat(outs)
    feats = model.extract(x)
    rows = [compare(arch, f"level {i}", feats.levels[i], outs[i]) for i in range(4)]
    rows += [compare(arch, "global feature", feats.global_feat, outs[4][0]),
             compare(arch, "local feature", feats.local_feat, outs[4][1]),
             compare(arch, "class embeddings before the context decoder", model.class_embeddings(),
                     up.text_encoder(up.texts, up.contexts)[0]),
             compare(arch, "class embeddings after the context decoder",
                     model.context_prompt(feats, model.class_embeddings()), text),
             compare(arch, "score map", model.forward_features(x)["score_map"], score, argmax=True),
             compare(arch, f"whole-image logits {x.shape[2]}x{x.shape[3]}", model(x), up.encode_decode(x, None),
                     argmax=True)]  # fmt: skip
    return rows


def slide_check(arch: str, up: Upstream, model: dcf.DenseCLIP) -> dict[str, Any]:
    """Slide inference with the configs' crop and stride (upstream's test_cfg, the package's own config), logits
    rescaled to an original size."""
    x = torch.randn(1, 3, *SLIDE[arch])
    ori = ORIGINAL[arch]
    ref = up.slide_inference(x, [{"ori_shape": (*ori, 3), "flip": False}], True)
    ours = F.interpolate(model.slide_inference(x), size=ori, mode="bilinear", align_corners=False)
    crop, stride = up.test_cfg.crop_size[0], up.test_cfg.stride[0]
    grid = [max(side - crop + stride - 1, 0) // stride + 1 for side in x.shape[2:]]
    label = f"slide logits {x.shape[2]}x{x.shape[3]}, crop {crop} stride {stride} ({grid[0]}x{grid[1]} windows)"
    return compare(arch, f"{label} -> {ori[0]}x{ori[1]}", ours, ref, argmax=True)


def e2e_image() -> np.ndarray:
    """A BGR uint8 image with structure at several scales (a random 30x42 image upscaled bicubically, plus noise)."""
    import cv2

    rng = np.random.default_rng(3)
    small = (rng.random((30, 42, 3)) * 255).astype(np.uint8)
    image = cv2.resize(small, E2E_IMAGE[::-1], interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


def preprocess(bgr: np.ndarray, pipeline: dict[str, Any]) -> torch.Tensor:
    """mmseg's test pipeline on a BGR uint8 image as mmcv 1.x computes it: Resize(keep_ratio=True) through
    mmcv.imrescale (cv2.resize, bilinear), Normalize through mmcv.imnormalize_, ImageToTensor -> (1, 3, H, W)."""
    import cv2

    h, w = bgr.shape[:2]
    long_edge, short_edge = max(pipeline["img_scale"]), min(pipeline["img_scale"])
    scale = min(long_edge / max(h, w), short_edge / min(h, w))
    size = (int(w * float(scale) + 0.5), int(h * float(scale) + 0.5))
    img = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    # np.float64 of a (1, 3) array is a float64 array (numpy's stubs say a scalar), as mmcv.imnormalize_ makes them
    mean = cast(np.ndarray, np.float64(np.array(pipeline["mean"], dtype=np.float32).reshape(1, -1)))
    stdinv = 1 / cast(np.ndarray, np.float64(np.array(pipeline["std"], dtype=np.float32).reshape(1, -1)))
    if pipeline["to_rgb"]:
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean, img)
    cv2.multiply(img, stdinv, img)
    return torch.from_numpy(img.transpose(2, 0, 1).copy())[None]


def e2e_checks(arch: str, up: Upstream, model: dcf.DenseCLIP, pipeline: dict[str, Any]) -> list[dict[str, Any]]:
    """uint8 image -> logits and probabilities at the image's size: upstream's slide_inference / inference on the
    mmcv-style preprocessed image against the engine and the evaluation's predict_probabilities."""
    from denseclip_fast.train.evaluate import predict_probabilities

    bgr = e2e_image()
    h, w = bgr.shape[:2]
    x = preprocess(bgr, pipeline)
    meta = [{"ori_shape": (h, w, 3), "flip": False}]
    ref_logits = up.slide_inference(x, meta, True)
    ref_probs = up.inference(x, meta, True)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    seg = dcf.Segmenter(model, device="cpu", dtype=torch.float32, mode="slide")
    logits = seg.logits([rgb])
    assert isinstance(logits, torch.Tensor)  # one image: one tensor, not a list
    probs = predict_probabilities(model, rgb, "slide")[None]
    label = f"uint8 {h}x{w} -> {x.shape[2]}x{x.shape[3]}"
    prob_tol = REL_TOL * ref_logits.abs().max().item() / 2 / ref_probs.abs().max().item()  # see REL_TOL
    return [compare(arch, f"end to end, {label}: Segmenter.logits vs slide_inference", logits, ref_logits, True),
            compare(arch, f"end to end, {label}: predict_probabilities vs inference", probs, ref_probs, True,
                    prob_tol)]  # fmt: skip


def check_arch(up_code: types.SimpleNamespace, root: Path, arch: str, e2e: bool,
               workdir: str) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """The rows of one architecture, and the gain weigh_score_channels gave its score channels."""
    names = list(dcf.ADE20K_CLASSES)
    cfg = load_config(root / "segmentation" / "configs" / CONFIGS[arch])
    pipeline = pipeline_values(cfg)
    torch.manual_seed(0)
    up = build_upstream(up_code, cfg, names)
    with torch.no_grad():
        gain = weigh_score_channels(up)
    path = Path(workdir) / "checkpoint.pth"
    save_checkpoint(up, names, path)
    model = dcf.load_checkpoint(path)
    path.unlink()
    rows = [compare_config(arch, model, up, pipeline)]
    with torch.no_grad():
        rows += whole_checks(arch, up, model)
        rows.append(slide_check(arch, up, model))
        if e2e:
            rows += e2e_checks(arch, up, model, pipeline)
    return rows, gain


# ----------------------------------------------------------------------------------------------- results


def _fmt(row: dict[str, Any]) -> str:
    if "fields" in row:
        bad = ", ".join(f"{k}: {v['package']} vs {v['upstream']}" for k, v in row["mismatches"].items())
        return f"| {row['arch']} | {row['check']} | {row['fields']} values | {bad or 'equal'} | | | | | {_ok(row)} |"
    if "error" in row:
        return f"| {row['arch']} | {row['check']} | {row['shape']} | {row['error']} | | | | | NO |"
    agree = ""
    if "argmax_agreement" in row:
        agree = f"{row['argmax_agreement']:.6f} ({row['argmax_disagreeing']} px differ)"
    shape = "x".join(str(s) for s in row["shape"])
    return (f"| {row['arch']} | {row['check']} | {shape} | {row['max_abs_diff']:.2e} | {row['max_abs_ref']:.2e} "
            f"| {row['rel_error']:.2e} | {row['tolerance']:.1e} | {agree} | {_ok(row)} |")  # fmt: skip


def _ok(row: dict[str, Any]) -> str:
    return "yes" if row["ok"] else "NO"


def table(env: dict[str, Any], rows: list[dict[str, Any]], seconds: dict[str, float], gains: dict[str, float]) -> str:
    commit = env.get("upstream_commit")
    source = f"commit `{commit}`" + (" (with local changes)" if env.get("upstream_modified") else "") if commit else (
        "a directory that is not a git checkout (commit unknown)")
    failed = [r for r in rows if not r["ok"]]
    verdict = f"**{len(failed)} of {len(rows)} checks outside tolerance.**" if failed else (
        f"All {len(rows)} checks within tolerance.")
    lines = [
        f"# denseclip_fast against the upstream DenseCLIP code ({env['date']})",
        "",
        f"Upstream: raoyongming/DenseCLIP, {source}: segmentation/denseclip/models.py, denseclip.py and untils.py "
        "executed as they are (timm imports updated), with stand-ins of ours for mmseg's FPN/FPNHead and stubs for "
        "the rest of mmseg; no mmcv/mmseg installed. See benchmarks/upstream_parity.py.",
        f"CPU: {env['device']} ({env['threads']} threads); torch {env['torch']}, timm {env['timm']}, "
        f"opencv {env['opencv']}, Python {env['python']}. Float32.",
        "Random weights (BN statistics too, gamma 0.25-0.75; the FPN's weights on the score channels scaled up so "
        "that the logits depend on the text path: " + ", ".join(f"{a} x{g:.0f}" for a, g in gains.items()) + "), "
        "ADE20K's 150 classes, random CLIP-normalised inputs; the end-to-end rows start from a uint8 image, "
        "preprocessed mmcv-style (cv2) for upstream.",
        "Columns: max \\|ours - upstream\\|, max \\|upstream\\|, their ratio (the relative error) and its tolerance "
        f"({REL_TOL:g}; for probabilities {REL_TOL:g} x max \\|logits\\| / 2, the logits' tolerance through the "
        f"softmax), the fraction of pixels with the same argmax class (tolerance {ARGMAX_TOL:g}).",
        "",
        "| arch | check | shape | max abs diff | max abs upstream | rel. error | tolerance | argmax agreement | ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(_fmt(r) for r in rows),
        "",
        verdict,
        "",
        "Time: " + ", ".join(f"{arch} {s:.0f} s" for arch, s in seconds.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, type=Path, metavar="DIR",
                        help="root of a raoyongming/DenseCLIP checkout (with segmentation/denseclip/models.py)")
    parser.add_argument("--archs", nargs="+", type=arch_name, choices=dcf.config.ARCHS, default=list(dcf.config.ARCHS))
    parser.add_argument("--e2e-archs", nargs="*", type=arch_name, choices=dcf.config.ARCHS, default=None,
                        help="architectures for the end-to-end uint8 check (default: all of --archs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", default="cpu", help="file name tag: <out>/upstream_parity_<tag>.{json,md}")
    args = parser.parse_args(argv)
    e2e = set(args.archs if args.e2e_archs is None else args.e2e_archs)
    root = args.upstream.expanduser().resolve()
    try:
        check_checkout(root, args.archs)
        up_code = load_upstream(root)
    except UpstreamError as exc:
        print(f"upstream_parity.py: error: {exc}", file=sys.stderr)
        return 2
    import cv2
    import timm

    env = environment(torch.device("cpu"))
    commit, modified = upstream_commit(root)
    env |= {"upstream_commit": commit, "upstream_modified": modified, "timm": timm.__version__,
            "opencv": cv2.__version__}  # fmt: skip
    seconds: dict[str, float] = {}
    gains: dict[str, float] = {}
    meta = {"args": {"archs": args.archs, "e2e_archs": [a for a in args.archs if a in e2e]}, "rel_tol": REL_TOL,
            "argmax_tol": ARGMAX_TOL, "seconds": seconds, "score_channel_gain": gains}  # fmt: skip
    results = Results(args.out, "upstream_parity", args.tag, env, meta, lambda e, rows: table(e, rows, seconds, gains))
    with tempfile.TemporaryDirectory() as workdir:
        for arch in args.archs:
            start = time.perf_counter()
            try:
                rows, gains[arch] = check_arch(up_code, root, arch, arch in e2e, workdir)
            except UpstreamError as exc:
                print(f"upstream_parity.py: error: {exc}", file=sys.stderr)
                return 2
            seconds[arch] = time.perf_counter() - start
            for row in rows:
                results.add(row)
            gc.collect()
            bad = sum(not r["ok"] for r in rows)
            print(f"{arch}: {len(rows)} checks, {bad} outside tolerance, {seconds[arch]:.0f} s", flush=True)
    results.save()
    print(results.render(results.env, results.rows))
    print(f"wrote {results.stem}.json and .md")
    return 0 if all(r["ok"] for r in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

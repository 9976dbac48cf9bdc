"""Initialising from CLIP weights: OpenAI-style TorchScript archives, plain state dicts, open_clip checkpoints.

open_clip builds the CLIP models (random weights, offline); its image towers are an independent implementation
that our backbones must reproduce.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from denseclip_fast import CheckpointError, DenseCLIP
from denseclip_fast.checkpoints.clip import init_from_clip, read_clip_state_dict

from .conftest import NAMES, rel_err, tiny_config


def _open_clip(kind: str, image_size: int, quick_gelu: bool = True):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if kind == "resnet":
        vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=image_size, head_width=64)
    else:
        vision = CLIPVisionCfg(layers=12, width=64, head_width=64, patch_size=16, image_size=image_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
    torch.manual_seed(1)
    model = CLIP(48, vision, text, quick_gelu=quick_gelu).eval()  # True: OpenAI CLIP's activation (DenseCLIP's)
    with torch.no_grad():  # non-trivial BN statistics so that the trunk comparison is meaningful
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model


def _save(model, path, fmt):
    sd = model.state_dict()
    if fmt == "plain":
        torch.save(sd, path)
    elif fmt == "open_clip_training":
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(path))
    return path


@pytest.mark.parametrize("fmt", ["plain", "open_clip_training", "safetensors", "torchscript"])
def test_every_clip_file_format_reads_the_same(tmp_path, fmt):
    clip = _open_clip("resnet", 64)
    sd = read_clip_state_dict(_save(clip, tmp_path / "clip.bin", fmt))
    expected = {k: v for k, v in clip.state_dict().items() if not k.endswith("attn_mask")}
    assert set(sd) == set(expected)
    assert all(torch.equal(sd[k], v) for k, v in expected.items())


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_init_copies_resizes_and_truncates(tmp_path, kind):
    clip = _open_clip(kind, 64)
    path = _save(clip, tmp_path / "clip.pt", "torchscript")
    model = DenseCLIP(tiny_config(kind, input_resolution=128), NAMES)  # twice CLIP's grid: pos. embedding resized
    contexts = model.contexts.detach().clone()
    init_from_clip(model, path)
    sd = clip.state_dict()
    assert torch.equal(model.text_encoder.positional_embedding, sd["positional_embedding"][:13])
    assert torch.equal(
        model.text_encoder.transformer.resblocks[1].mlp.c_fc.weight, sd["transformer.resblocks.1.mlp.c_fc.weight"]
    )
    assert torch.equal(model.text_encoder.text_projection, sd["text_projection"])
    assert torch.equal(model.backbone.conv1.weight, sd["visual.conv1.weight"])
    assert torch.equal(model.contexts, contexts)  # DenseCLIP's own parameters keep their initialisation
    key = "attnpool.positional_embedding" if kind == "resnet" else "positional_embedding"
    pos = sd[f"visual.{key}"]
    grid = int((pos.shape[0] - 1) ** 0.5)
    spatial = pos[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(2 * grid, 2 * grid), mode="bilinear", align_corners=False)
    expected = torch.cat([pos[:1], spatial.flatten(2)[0].t()])
    assert torch.allclose(model.backbone.state_dict()[key], expected)


def test_resnet_backbone_matches_open_clip(tmp_path):
    """Our ModifiedResNet trunk and dense attention pool against open_clip's at CLIP's own resolution: token 0 of
    the dense pool is exactly CLIP's pooled image embedding."""
    clip = _open_clip("resnet", 64)
    config = tiny_config("resnet", input_resolution=64)
    # CLIP's pool has width * 32 / 64 heads: 32 for the released RN50/RN101, 4 for this tiny width of 8
    config = config.replace(vision=dataclasses.replace(config.vision, heads=4))
    model = DenseCLIP(config, NAMES).eval()
    init_from_clip(model, _save(clip, tmp_path / "clip.pth", "plain"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)
        v = clip.visual
        c5 = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        pooled = v(x)
    assert rel_err(feats.levels[3], c5) < 1e-6
    assert rel_err(feats.global_feat, pooled) < 1e-5


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_vit_backbone_matches_open_clip_with_single_class_embedding(tmp_path, activation):
    """With the official double class-embedding switched off, our ViT is CLIP's ViT; with it on, it is not. Both
    activations: CLIP trained with GELU (open_clip's quick_gelu=False) needs activation="gelu", and QuickGELU
    weights under GELU are another function."""
    clip = _open_clip("vit", 64, quick_gelu=activation == "quick_gelu")
    path = _save(clip, tmp_path / "clip.pth", "plain")
    config = tiny_config("vit", input_resolution=64)
    model = DenseCLIP(config.replace(activation=activation), NAMES).eval()
    init_from_clip(model, path)
    other = DenseCLIP(config.replace(activation="gelu" if activation == "quick_gelu" else "quick_gelu"), NAMES)
    init_from_clip(other.eval(), path)
    other.backbone.double_class_embedding = False
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        official_style = model.backbone(x).global_feat
        model.backbone.double_class_embedding = False
        single = model.backbone(x).global_feat
        pooled = clip.visual(x)
        wrong_activation = other.backbone(x).global_feat
    assert rel_err(single, pooled) < 1e-5
    assert rel_err(official_style, pooled) > 1e-3
    assert rel_err(wrong_activation, pooled) > 1e-3


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_text_transformer_matches_open_clip(tmp_path, activation):
    """The text encoder's causal transformer equals open_clip's on the first 13 positions, for both activations."""
    clip = _open_clip("resnet", 64, quick_gelu=activation == "quick_gelu")
    model = DenseCLIP(tiny_config("resnet").replace(activation=activation), NAMES).eval()
    init_from_clip(model, _save(clip, tmp_path / "clip.pth", "plain"))
    x = torch.randn(3, 13, 64)
    with torch.no_grad():
        ours = model.text_encoder.transformer(x, causal=True)
        theirs = clip.transformer(x, attn_mask=clip.attn_mask[:13, :13])
    assert rel_err(ours, theirs) < 1e-5


def test_the_clip_activation_reaches_the_model_and_is_checked():
    """from_clip and the training config take the activation (a typo is refused naming it); configs written
    before it existed read as QuickGELU."""
    from denseclip_fast.config import DenseCLIPConfig
    from denseclip_fast.model.layers import QuickGELU
    from denseclip_fast.train import TrainConfig

    with pytest.raises(ValueError, match=r"activation must be one of \('quick_gelu', 'gelu'\), got 'relu'"):
        DenseCLIP.from_clip("no-such-file.pt", "RN50", NAMES, activation="relu")  # type: ignore[arg-type]
    config = tiny_config("vit")
    legacy = config.to_dict()
    del legacy["activation"]
    assert DenseCLIPConfig.from_dict(legacy).activation == "quick_gelu"
    gelu = DenseCLIP(config.replace(activation="gelu"), NAMES)
    blocks = [*gelu.text_encoder.transformer.resblocks, *gelu.backbone.transformer.resblocks]
    assert all(type(b.mlp.gelu) is torch.nn.GELU for b in blocks)
    assert all(type(b.mlp.gelu) is QuickGELU for b in DenseCLIP(config, NAMES).text_encoder.transformer.resblocks)
    assert TrainConfig(arch="RN50", clip_activation="gelu").model_config().activation == "gelu"
    assert TrainConfig(arch="RN50").model_config().activation == "quick_gelu"
    with pytest.raises(ValueError, match="clip_activation must be one of"):
        TrainConfig(arch="RN50", clip_activation="GELU").model_config()


@pytest.mark.slow
def test_from_clip_released_rn50(tmp_path):
    import open_clip

    clip = open_clip.create_model("RN50", pretrained=None).eval()
    path = _save(clip, tmp_path / "RN50.pt", "torchscript")
    model = DenseCLIP.from_clip(path, "RN50", ["sky", "road"])
    assert model.backbone.attnpool.positional_embedding.shape == (16 * 16 + 1, 2048)  # 7x7 -> 16x16
    assert torch.equal(model.backbone.layer3[5].conv2.weight, clip.state_dict()["visual.layer3.5.conv2.weight"])


def test_mismatched_clip_weights_are_refused(tmp_path):
    vit_clip = _save(_open_clip("vit", 64), tmp_path / "vit.pth", "plain")
    with pytest.raises(CheckpointError, match=r"do not fit the architecture: missing keys \(\d+\): visual\."):
        init_from_clip(DenseCLIP(tiny_config("resnet"), NAMES), vit_clip)
    junk = tmp_path / "junk.pth"
    torch.save({"model": torch.zeros(3)}, junk)
    with pytest.raises(CheckpointError, match="not CLIP weights: no 'visual.conv1.weight' or 'token_embedding.weight'"):
        read_clip_state_dict(junk)
    torch.save({"visual.conv1.weight": torch.zeros(1)}, junk)  # the image encoder alone: what is missing is named
    with pytest.raises(CheckpointError, match="not CLIP weights: no 'token_embedding.weight' \\(a CLIP state dict"):
        read_clip_state_dict(junk)
    denseclip = tmp_path / "denseclip.safetensors"  # a DenseCLIP checkpoint given where CLIP weights go (--init)
    DenseCLIP(tiny_config("resnet"), NAMES).save(denseclip)
    torch.save({"state_dict": DenseCLIP(tiny_config("resnet"), NAMES).state_dict()}, tmp_path / "mmcv.pth")
    for path in (denseclip, tmp_path / "mmcv.pth"):
        with pytest.raises(CheckpointError, match="this is a DenseCLIP checkpoint, not CLIP weights"):
            read_clip_state_dict(path)
    sd = _open_clip("resnet", 64).state_dict()
    sd["visual.extra.weight"] = torch.zeros(1)
    torch.save(sd, junk)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): visual.extra.weight"):
        init_from_clip(DenseCLIP(tiny_config("resnet"), NAMES), junk)
    del sd["visual.extra.weight"]
    sd["adapter.weight"] = torch.zeros(1)  # outside visual., the text encoder's keys and the ignored entries
    torch.save(sd, junk)
    with pytest.raises(CheckpointError, match=r"unrecognised keys in CLIP weights: adapter.weight"):
        init_from_clip(DenseCLIP(tiny_config("resnet"), NAMES), junk)
    torch.save([torch.zeros(1)], junk)
    with pytest.raises(CheckpointError, match=r"not CLIP weights: expected a state dict, found list$"):
        read_clip_state_dict(junk)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("clip_size, model_size, dtype", [(64, 128, torch.float16), (128, 64, torch.float32)])
def test_the_positional_grid_is_resized_in_float32_either_way(tmp_path, kind, clip_size, model_size, dtype):
    """CLIP's positional grid is resized to the model's, larger or smaller (a model of a lower input resolution than
    CLIP's), in float32 from the file's values: OpenAI's archives hold float16 weights, and a resize in float16
    rounds every interpolated value to 11 bits before the float32 model holds it. The expected grid is F.interpolate
    of the float32 values (bilinear, align_corners=False)."""
    clip = _open_clip(kind, clip_size).to(dtype)
    path = _save(clip, tmp_path / "clip.pt", "torchscript")
    model = DenseCLIP(tiny_config(kind, input_resolution=model_size), NAMES)
    init_from_clip(model, path)
    sd = clip.state_dict()
    key = "attnpool.positional_embedding" if kind == "resnet" else "positional_embedding"
    pos = sd[f"visual.{key}"].float()
    old, new = int((pos.shape[0] - 1) ** 0.5), model.config.vision.grid
    assert new * clip_size == old * model_size  # resized up, or down
    spatial = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(new, new), mode="bilinear", align_corners=False)
    assert torch.equal(model.backbone.state_dict()[key], torch.cat([pos[:1], spatial.flatten(2)[0].t()]))
    assert torch.equal(model.backbone.conv1.weight, sd["visual.conv1.weight"].float())


def test_clip_entries_that_are_no_weights_are_ignored(tmp_path):
    """What CLIP implementations store beside the weights (the logit scale, SigLIP's logit bias, OpenAI's
    input_resolution, context_length and vocab_size) is skipped, not refused as unrecognised keys."""
    clip = _open_clip("resnet", 64)
    sd = clip.state_dict()
    extras = {"logit_scale": torch.tensor(4.6), "logit_bias": torch.tensor(-10.0), "input_resolution": torch.tensor(64),
              "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}  # fmt: skip
    path = tmp_path / "clip.pth"
    torch.save({**sd, **extras}, path)
    model = DenseCLIP(tiny_config("resnet"), NAMES)
    init_from_clip(model, path)
    assert torch.equal(model.backbone.conv1.weight, sd["visual.conv1.weight"])


def test_a_text_positional_embedding_without_dimensions_is_a_shape_mismatch(tmp_path):
    """A 0-d text positional embedding (a damaged or hand-edited file) is reported as a shape mismatch naming the
    key, not truncated to the context length first (slicing a 0-d tensor is torch's IndexError)."""
    sd = _open_clip("resnet", 64).state_dict()
    sd["positional_embedding"] = torch.tensor(0.5)
    path = tmp_path / "clip.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(1\): positional_embedding: checkpoint \(\) vs model "
                                              r"\(13, 64\)"):  # fmt: skip
        init_from_clip(DenseCLIP(tiny_config("resnet"), NAMES), path)

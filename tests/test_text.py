"""Class-name tokenisation (CLIP BPE through open_clip) and the configuration presets."""

from __future__ import annotations

import pytest
import torch

import denseclip_fast as dcf
from benchmarks.official.model import tokenize as official_tokenize
from denseclip_fast.config import DenseCLIPConfig, canonical_arch, preset
from denseclip_fast.model.text import tokenize_class_names


def test_all_ade20k_names_fit_and_match_the_official_tokenizer():
    names = list(dcf.ADE20K_CLASSES)
    tokens = tokenize_class_names(names, 5)
    assert tokens.shape == (150, 5)
    assert torch.equal(tokens, official_tokenize(names, 5))
    assert (tokens[:, 0] == 49406).all() and (tokens == 49407).sum() == 150  # one SOT and one EOT each
    lengths = (tokens != 0).sum(dim=1) - 2
    assert lengths.min() >= 1 and lengths.max() == 3  # 'chest of drawers' uses all three


def test_padding_and_cleaning():
    tokens = tokenize_class_names(["bed ", "  Bed"], 5)
    assert torch.equal(tokens[0], tokens[1])  # mmseg's trailing space and case do not matter
    assert tokens[0, 3:].tolist() == [0, 0]


@pytest.mark.parametrize(
    "names, match",
    [
        (["sky", "a very long class name"], r"class name 'a very long class name' has 5 BPE tokens; at most 3 fit"),
        ([], "must not be empty"),
        (["sky", ""], r"class name 1 \(''\) has no tokens"),
        (["sky", 3], "class name 1 must be a string, got int"),
        ("sky", "sequence of strings, got str"),
    ],
)
def test_bad_names(names, match):
    with pytest.raises(ValueError, match=match):
        tokenize_class_names(names, 5)


def test_presets_and_config_round_trip():
    for arch in dcf.config.ARCHS:
        cfg = preset(arch)
        assert cfg.arch == arch
        assert DenseCLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("RN50").embed_dim == 1024 and preset("RN101").vision.layers == (3, 4, 23, 3)
    vit = preset("ViT-B-16")
    assert vit.vision.grid == 40 and vit.score_concat_index == 2 and vit.slide_crop == 640
    assert canonical_arch("ViT-B-16") == "ViT-B/16"


def test_config_errors_name_the_problem():
    data = preset("RN50").to_dict()
    data["vision"]["widht"] = 3
    with pytest.raises(ValueError, match=r"vision: unknown keys \['widht'\]"):
        DenseCLIPConfig.from_dict(data)
    with pytest.raises(ValueError, match="score_concat_index must be in 0..3"):
        preset("RN50").replace(score_concat_index=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        preset("ViT-L/14")

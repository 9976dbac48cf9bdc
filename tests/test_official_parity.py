"""denseclip_fast against the official model (benchmarks/official, a transcription of the official code).

Official-layout checkpoints are written by the oracle in mmcv's format, loaded with ``dcf.load_checkpoint``, and
``m(x)``, ``m.slide_inference`` and ``forward_features(x)['score_map']`` are compared with the oracle's
``encode_decode``, ``slide_inference`` and score map on the same input. The acceptance bound is a relative error of
1e-4 in float32; both compute the same function, so the test holds them to 1e-5. Weights, BN statistics and gamma
are randomised so that every stage (the context decoder included) moves the output.
"""

from __future__ import annotations

import pytest
import torch

import denseclip_fast as dcf
from benchmarks.official import OfficialDenseCLIP, official_config, save_mmcv_checkpoint

from .conftest import NAMES, official_cfg, randomized, rel_err, tiny_config

TOL = 1e-5


def _pair(tmp_path, cfg_dict, names, seed=0):
    official = randomized(OfficialDenseCLIP(cfg_dict, names), seed).eval()
    path = tmp_path / "official.pth"
    save_mmcv_checkpoint(official, str(path), names, palette=[[i, 2 * i, 3 * i] for i in range(len(names))])
    return official, dcf.load_checkpoint(path)


def _compare(official, model, x, crop, stride):
    with torch.no_grad():
        whole = rel_err(model(x), official(x))
        score = rel_err(model.forward_features(x)["score_map"], official.forward_score(x))
        slide = rel_err(model.slide_inference(x, crop=crop, stride=stride), official.slide_inference(x, crop, stride))
    return whole, score, slide


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("size", [(64, 64), (97, 131), (160, 72)])
def test_tiny_models_match_official(tmp_path, kind, size):
    official, model = _pair(tmp_path, official_cfg(tiny_config(kind)), NAMES)
    x = torch.randn(2, 3, *size)
    whole, score, slide = _compare(official, model, x, crop=64, stride=43)
    assert whole < TOL and score < TOL and slide < TOL, (whole, score, slide)


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [("RN50", (96, 128)), ("RN101", (64, 96)), ("ViT-B/16", (96, 80))])
def test_released_architectures_match_official(tmp_path, arch, size):
    official, model = _pair(tmp_path, official_config(arch), NAMES)
    assert model.config.arch == arch
    x = torch.randn(1, 3, *size)
    whole, score, slide = _compare(official, model, x, crop=64, stride=48)
    assert whole < TOL and score < TOL and slide < TOL, (whole, score, slide)


def test_comparison_detects_a_wrong_class_embedding(tmp_path):
    """The parity check has teeth: adding ViT's class embedding once instead of twice is caught."""
    official, model = _pair(tmp_path, official_cfg(tiny_config("vit")), NAMES)
    model.backbone.double_class_embedding = False
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model.forward_features(x)["score_map"], official.forward_score(x)) > 1e-3


def test_context_decoder_moves_the_output(tmp_path):
    """With the randomised gamma the decoder matters, so the parity tests above do cover it."""
    official, model = _pair(tmp_path, official_cfg(tiny_config("resnet")), NAMES)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = official(x)
        model.gamma.zero_()
        assert rel_err(model(x), reference) > 1e-3

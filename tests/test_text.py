"""Class-name tokenisation (CLIP BPE through open_clip) and the configuration presets."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import types

import pytest
import torch

import denseclip_fast as dcf
from benchmarks.official.model import tokenize as official_tokenize
from denseclip_fast.config import DenseCLIPConfig, VisionConfig, canonical_arch, preset
from denseclip_fast.model.text import tokenize_class_names

from .conftest import tiny_config


def test_all_ade20k_names_fit_and_match_the_official_tokenizer():
    names = list(dcf.ADE20K_CLASSES)
    tokens = tokenize_class_names(names, 5)
    assert tokens.shape == (150, 5)
    assert torch.equal(tokens, official_tokenize(names, 5))
    assert (tokens[:, 0] == 49406).all() and (tokens == 49407).sum() == 150  # one SOT and one EOT each
    lengths = (tokens != 0).sum(dim=1) - 2
    assert lengths.min() >= 1 and lengths.max() == 3  # 'chest of drawers' uses all three


def test_names_are_tokenised_without_importing_open_clips_package():
    """The tokenizer module is run on its own, not through open_clip's package (whose __init__ imports its models:
    timm, torchvision...): in a fresh process the package stays unimported and the tokens are the official ones."""
    code = (
        "import json, sys, denseclip_fast as dcf\n"
        "from denseclip_fast.model.text import _bpe, tokenize_class_names\n"
        "tokens = tokenize_class_names(list(dcf.ADE20K_CLASSES), 5)\n"
        "print(json.dumps({'tokens': tokens.tolist(), 'module': type(_bpe()).__module__,\n"
        "                  'imported': sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm'))}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"] == "_denseclip_fast_open_clip_tokenizer" and report["imported"] == []
    assert report["tokens"] == official_tokenize(list(dcf.ADE20K_CLASSES), 5).tolist()


def test_the_tokenizer_falls_back_to_open_clips_package(monkeypatch):
    """Where open_clip's tokenizer module cannot run alone (a relative import in some version), the package import
    gives it."""
    from denseclip_fast.model import text

    def relative_import(package: str, file_name: str) -> None:
        raise ImportError("attempted relative import with no known parent package")

    monkeypatch.delitem(sys.modules, "open_clip.tokenizer", raising=False)
    monkeypatch.setattr(text, "_module_from_file", relative_import)
    text._tokenizer_module.cache_clear()
    try:
        module = text._tokenizer_module()
    finally:
        text._tokenizer_module.cache_clear()
    assert module.__name__ == "open_clip.tokenizer"
    assert module.SimpleTokenizer().encode("chest of drawers") == text._bpe().encode("chest of drawers")


def test_a_module_file_runs_without_its_package(tmp_path, monkeypatch):
    """_module_from_file runs one file of a package without the package's __init__, and gives ImportError (leaving no
    half-made module behind) for a file with a relative import (even of a name that denseclip_fast has), a missing
    file and a missing package, or one in sys.modules without a spec."""
    from denseclip_fast.model.text import _module_from_file

    package = tmp_path / "dcf_probe_package"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('the package __init__ ran')\n")
    (package / "alone.py").write_text("VALUE = 41 + 1\n")
    (package / "relative.py").write_text("from . import config\n")  # a name denseclip_fast has too
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _module_from_file("dcf_probe_package", "alone.py").VALUE == 42
    assert "dcf_probe_package" not in sys.modules
    with pytest.raises(ImportError):
        _module_from_file("dcf_probe_package", "relative.py")
    assert "_denseclip_fast_dcf_probe_package_relative" not in sys.modules
    with pytest.raises(ImportError, match="no missing.py in package dcf_probe_package"):
        _module_from_file("dcf_probe_package", "missing.py")
    with pytest.raises(ImportError, match="no tokenizer.py in package dcf_no_such_package"):
        _module_from_file("dcf_no_such_package", "tokenizer.py")
    stub = types.ModuleType("dcf_stub_package")
    stub.__spec__ = None
    monkeypatch.setitem(sys.modules, "dcf_stub_package", stub)
    with pytest.raises(ImportError, match="no spec for package dcf_stub_package"):
        _module_from_file("dcf_stub_package", "tokenizer.py")
    monkeypatch.delitem(sys.modules, "_denseclip_fast_dcf_probe_package_alone")


def test_the_tokenizers_cache_of_words_is_bounded(monkeypatch):
    """open_clip's tokenizer keeps the BPE merges of every word it has encoded: a service scoring its users'
    vocabularies (open_vocab, predict with names) would grow it forever. At most BPE_CACHE_SIZE words are kept, the
    oldest dropped first; the special tokens stay, and a dropped word tokenises as before."""
    from denseclip_fast.model import text

    monkeypatch.setattr(text, "BPE_CACHE_SIZE", 8, raising=False)
    bpe = text._bpe()
    first = tokenize_class_names(["zebra"], 5)
    for i in range(40):  # distinct words, as users' vocabularies bring
        tokenize_class_names(["".join("abcdefghij"[int(d)] for d in f"{i:03d}") + "q"], 5)
    assert len(bpe.cache) <= 8
    assert "zebra" not in bpe.cache  # the oldest went
    assert torch.equal(tokenize_class_names(["zebra"], 5), first)
    with pytest.raises(ValueError, match="start or end-of-text token"):  # still found among the special tokens
        tokenize_class_names(["<start_of_text> cat"], 5)


def test_padding_and_cleaning():
    tokens = tokenize_class_names(["bed ", "  Bed"], 5)
    assert torch.equal(tokens[0], tokens[1])  # mmseg's trailing space and case do not matter
    assert tokens[0, 3:].tolist() == [0, 0]
    # a name of exactly length - 2 tokens fills the row: SOT, its 3 tokens, EOT (CLIP's ids 49406 and 49407)
    assert tokenize_class_names(["chest of drawers"], 5).tolist() == [[49406, 10563, 539, 38975, 49407]]


@pytest.mark.parametrize(
    "names, match",
    [
        (["sky", "a very long class name"], r"class name 'a very long class name' has 5 BPE tokens; at most 3 fit"),
        # one token too many (4 of 3): the boundary; and CLIP's end-of-text token inside a name, as its start one
        (["big red fire truck"], r"class name 'big red fire truck' has 4 BPE tokens; at most 3 fit"),
        (["cat <end_of_text>"], r"class name 0 \('cat <end_of_text>'\) holds CLIP's start or end-of-text token"),
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
    short = {key: value for key, value in preset("RN50").to_dict().items() if key not in ("text", "decoder")}
    assert DenseCLIPConfig.from_dict(short) == preset("RN50")  # a section left out is the default, the official one
    custom = preset("RN50").to_dict()
    custom["decoder"] = {"layers": 1}  # and so is a key left out of a section
    assert DenseCLIPConfig.from_dict(custom).decoder == dataclasses.replace(preset("RN50").decoder, layers=1)


def test_config_errors_name_the_problem():
    data = preset("RN50").to_dict()
    data["vision"]["widht"] = 3
    with pytest.raises(ValueError, match=r"vision: unknown keys \['widht'\]"):
        DenseCLIPConfig.from_dict(data)
    with pytest.raises(ValueError, match="score_concat_index must be in 0..3"):
        preset("RN50").replace(score_concat_index=4)
    with pytest.raises(ValueError, match=r"arch must be one of .*, got 'ViT-L/14'$"):
        preset("ViT-L/14")
    with pytest.raises(ValueError, match=re.escape("got 'vit-b/16' (did you mean 'ViT-B/16'?)")):
        preset("vit-b/16")
    data = preset("RN50").to_dict()
    data["decoder"] = [256, 3]  # a section that is no JSON object
    with pytest.raises(ValueError, match=r"^decoder: expected a JSON object, got list$"):
        DenseCLIPConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"^vision must be a VisionConfig, got dict$"):  # built directly
        dataclasses.replace(preset("RN50"), vision=preset("RN50").vision.__dict__)


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        (None, "arch", 7, r"arch must be a non-empty name \(RN50, .*got 7"),
        (None, "arch", "ViT-B-16", r"arch 'ViT-B-16' has vision.kind 'vit', got 'resnet'"),
        (None, "arch", "ViT-B/16", r"arch 'ViT-B/16' has vision.kind 'vit', got 'resnet'"),
        ("decoder", "heads", 0, r"decoder.heads must be an int >= 1, got 0"),
        ("decoder", "heads", 3, r"decoder.width 256 is not divisible by decoder.heads 3"),
        ("decoder", "dropout", -0.5, r"decoder.dropout must be a number in \[0.0, 1.0\], got -0.5"),
        ("text", "heads", 0, r"text.heads must be an int >= 1, got 0"),
        ("text", "heads", 7, r"text.width 512 is not divisible by text.heads 7"),
        ("text", "vocab_size", 10, r"text.vocab_size must be an int >= 49408 \(the tokenizer's vocabulary\), got 10"),
        ("text", "n_ctx", 11, r"text.context_length - text.n_ctx must be >= 3"),
        ("vision", "layers", 4, r"vision.layers must be a list of 4 ints >= 1, got 4"),
        ("vision", "layers", [3, 4, 6], r"vision.layers must be a list of 4 ints >= 1, got .3, 4, 6."),
        ("vision", "width", "8", r"vision.width must be an int >= 1, got '8'"),
        ("vision", "width", 63, r"vision.width must be even for a ResNet"),
        ("vision", "heads", 3, r"vision.heads 3 must divide the attention pool's width"),
        ("vision", "input_resolution", 16, r"vision.input_resolution must be at least 32 \(one grid cell\), got 16"),
        ("vision", "drop_path_rate", 1.0, r"vision.drop_path_rate must be a number in \[0.0, 1.0\), got 1.0"),
        ("vision", "double_class_embedding", "yes", r"vision.double_class_embedding must be true or false, got 'yes'"),
        ("vision", "kind", "vgg", r"vision.kind must be 'resnet' or 'vit', got 'vgg'"),
        (None, "embed_dim", True, r"embed_dim must be an int >= 1, got True"),
        (None, "embed_dim", 10**30, r"embed_dim must be at most 1048576 \(a sanity bound\), got 10{30}$"),
        ("text", "vocab_size", 2**20 + 1, r"text.vocab_size must be at most 1048576 \(a sanity bound\)"),
        ("decoder", "layers", 2**20 + 1, r"decoder.layers must be at most 1048576"),
        ("vision", "width", 2**21, r"vision.width must be at most 1048576"),
        ("vision", "layers", [3, 4, 2**40, 3], r"vision.layers must hold ints of at most 1048576 \(a sanity bound\)"),
        (None, "test_scale", [2**30, 512], r"test_scale must hold ints of at most 1048576"),
        (None, "fpn_channels", -16, r"fpn_channels must be an int >= 1, got -16"),
        (None, "head_channels", 2.5, r"head_channels must be an int >= 1, got 2.5"),
        (None, "score_concat_index", 3.0, r"score_concat_index must be an int >= 0, got 3.0"),
        (None, "head_dropout", 2.0, r"head_dropout must be a number in \[0.0, 1.0\], got 2.0"),
        (None, "tau", 0, r"tau must be a number in \(0.0, inf\), got 0"),
        (None, "tau", float("nan"), r"tau must be a number in \(0.0, inf\), got nan"),
        (None, "tau", "0.07", r"tau must be a number in \(0.0, inf\), got '0.07'"),
        (None, "tau", 2**1100, r"tau must be a number in \(0.0, inf\), got 1\d+$"),  # past float: no OverflowError
        (None, "slide_crop", 16, r"slide_crop must be an int >= 32 \(the stride-32 level keeps a pixel\), got 16"),
        (None, "slide_stride", 600, r"slide_stride must not exceed slide_crop 512 .*, got 600"),
        (None, "test_scale", "big", r"test_scale must be a list of 2 ints >= 32 .*, got 'big'"),
        (None, "test_scale", [0, 0], r"test_scale must be a list of 2 ints >= 32 .*, got .0, 0."),
        (None, "activation", "relu", r"activation must be one of \('quick_gelu', 'gelu'\), got 'relu'"),
    ],
)
def test_every_config_field_is_checked_naming_field_and_value(section, key, value, match):
    """A bad value is a ValueError naming the field and the value when the config is built (from JSON or
    directly), not a TypeError, a division by zero or a negative dimension inside the model, nor a model that
    builds and computes nonsense (tau 0: infinite logits)."""
    data = preset("RN50").to_dict()
    (data[section] if section else data)[key] = value
    with pytest.raises(ValueError, match=match):
        DenseCLIPConfig.from_dict(data)
    with pytest.raises(ValueError, match=match):
        if section is None:
            dataclasses.replace(preset("RN50"), **{key: value})
        else:
            part = dataclasses.replace(getattr(preset("RN50"), section), **{key: value})
            dataclasses.replace(preset("RN50"), **{section: part})


def test_arch_is_a_free_label_except_the_released_names():
    """Any non-empty arch name is the user's label (configs saved before names were checked, a custom JSON's own
    name); a released name, or its file-name alias, must come with its vision kind."""
    data = tiny_config("resnet").to_dict()
    for name in ("my-tiny-rn", "RN50x4", "custom", "RN50"):
        assert DenseCLIPConfig.from_dict({**data, "arch": name}).arch == name
    vit = tiny_config("vit").to_dict()
    for name in ("ViT-B-16", "ViT-B/16", "my-vit"):
        assert DenseCLIPConfig.from_dict({**vit, "arch": name}).arch == name
    with pytest.raises(ValueError, match="arch 'RN101' has vision.kind 'resnet', got 'vit'"):
        DenseCLIPConfig.from_dict({**vit, "arch": "RN101"})


def test_vit_config_checks():
    vit = preset("ViT-B/16").vision
    with pytest.raises(ValueError, match=r"vision.out_indices must be 4 increasing block indices below "
                                         r"vision.layers\[0\] = 12, got \[3, 3, 7, 11\]"):  # fmt: skip
        dataclasses.replace(vit, out_indices=(3, 3, 7, 11))
    with pytest.raises(ValueError, match=r"got \[3, 5, 7, 12\]"):
        dataclasses.replace(vit, out_indices=(3, 5, 7, 12))
    with pytest.raises(ValueError, match=r"vision.layers must be a list of 1 int >= 1, got \(6, 6\)"):
        dataclasses.replace(vit, layers=(6, 6))
    with pytest.raises(ValueError, match=r"vision.patch_size must be 16 for a ViT"):
        dataclasses.replace(vit, patch_size=14)
    with pytest.raises(ValueError, match=r"vision.width 768 is not divisible by vision.heads 5"):
        dataclasses.replace(vit, heads=5)


def test_legitimate_configs_pass_and_lists_become_tuples():
    for config in (*(preset(a) for a in dcf.config.ARCHS), tiny_config("resnet"), tiny_config("vit")):
        assert DenseCLIPConfig.from_dict(config.to_dict()) == config
    vision = preset("RN50").vision
    as_lists = VisionConfig(kind="resnet", layers=[3, 4, 6, 3], width=64, heads=32, input_resolution=512)
    assert as_lists == vision and isinstance(as_lists.layers, tuple)
    assert preset("RN50").replace(test_scale=[1024, 256]).test_scale == (1024, 256)


def test_config_json_with_missing_or_unknown_keys(tmp_path):
    data = preset("RN50").to_dict()
    del data["embed_dim"], data["vision"]["heads"]
    with pytest.raises(ValueError, match=r"vision: missing keys \['heads'\] \(required: \['kind', 'layers'"):
        DenseCLIPConfig.from_dict(data)
    data["vision"]["heads"] = 32
    with pytest.raises(ValueError, match=r"config: missing keys \['embed_dim'\] \(required: \['arch', 'embed_dim', "):
        DenseCLIPConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"config: expected a JSON object, got list"):
        DenseCLIPConfig.from_dict([["arch", "RN50"]])  # type: ignore[arg-type]
    # the training command's --arch FILE: the file is named
    from denseclip_fast.train import TrainConfig

    path = tmp_path / "arch.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"arch \(--arch\) file {re.escape(str(path))}: config: missing keys "
                                         r"\['embed_dim'\]"):  # fmt: skip
        TrainConfig(arch=str(path)).model_config()
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"arch \(--arch\) file {re.escape(str(path))}: Expecting property name"):
        TrainConfig(arch=str(path)).model_config()


def test_the_tokenizer_encodes_under_its_lock(monkeypatch):
    """Two Segmenters in two threads encode with the process's one tokenizer, whose word cache is bounded: one
    thread's eviction could fall between another's check and read of a word (open_clip's ``if word in cache: return
    cache[word]``), a KeyError (seen here: 1 in 80,000 encodes of 4 threads). Every encode holds _BPE_LOCK."""
    from denseclip_fast.model import text

    bpe = text._bpe()
    real, held = bpe.encode, []

    def encode(name):
        held.append(text._BPE_LOCK.locked())
        return real(name)

    monkeypatch.setattr(bpe, "encode", encode)
    tokenize_class_names(["cat", "dog"], 5, distinct=True)
    text.check_distinct_tokens(["cat", "dog"])
    assert held == [True] * 4


def test_the_lowest_and_highest_values_each_check_names_are_accepted():
    """The bounds are inclusive where the messages say >= / at most: a ViT may tap its first block (index 0), a
    text encoder may learn no context (n_ctx 0: every position after SOT is the class's), windows may tile without
    overlap (slide_stride == slide_crop), and a size list may hold MAX_CONFIG_INT itself."""
    from denseclip_fast.config import TextConfig

    vit = preset("ViT-B/16").vision
    assert dataclasses.replace(vit, out_indices=(0, 1, 2, 3)).out_indices == (0, 1, 2, 3)
    assert TextConfig(n_ctx=0).class_token_length == TextConfig().context_length
    assert preset("RN50").replace(slide_stride=512).slide_stride == 512
    assert preset("RN50").replace(test_scale=(2**20, 512)).test_scale == (2**20, 512)
    with pytest.raises(ValueError, match=r"test_scale must hold ints of at most 1048576"):
        preset("RN50").replace(test_scale=(2**20 + 1, 512))


@pytest.mark.parametrize(
    "key, value, match",
    [("layers", (True, 1, 1, 1), r"vision.layers must be a list of 4 ints >= 1, got \(True, 1, 1, 1\)"),
     ("out_indices", (False, 5, 7, 11), r"vision.out_indices must be a list of 4 ints >= 0, got \(False, 5, 7, 11\)")],
)  # fmt: skip
def test_a_bool_in_a_list_of_ints_is_refused(key, value, match):
    """True is no block count and False no block index (as for the single ints: embed_dim True is refused)."""
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(preset("RN50").vision, **{key: value})


@pytest.mark.parametrize("name, meant", [("ResNet-50", "RN50"), ("resnet101", "RN101"), ("rn50", "RN50"),
                                         ("vit_b_16", "ViT-B/16")])  # fmt: skip
def test_an_arch_spelled_another_way_is_told_the_released_name(name, meant):
    with pytest.raises(ValueError, match=re.escape(f"got {name!r} (did you mean {meant!r}?)")):
        preset(name)

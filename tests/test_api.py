"""The public Python API as a library user meets it: reprs, types a type checker sees, what import leaves alone."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import denseclip_fast as dcf
from denseclip_fast import DenseCLIP, DenseCLIPConfig, Segmenter

from .conftest import NAMES, ROOT, tiny_config


@pytest.fixture(scope="module")
def model() -> DenseCLIP:
    torch.manual_seed(0)
    return DenseCLIP(tiny_config(), NAMES).eval()


def test_a_segmenters_repr_says_what_it_serves_on_one_line(model):
    """Not ``<... Segmenter object at 0x...>``: the architecture, class count, device, dtype and mode (with the
    window in slide mode), as a log line or a debugger shows it."""
    seg = Segmenter(model, device="cpu", dtype=torch.bfloat16, mode="slide", crop=64, stride=40)
    assert repr(seg) == ("Segmenter(arch='custom', num_classes=4, device='cpu', dtype=torch.bfloat16, mode='slide', "
                         "crop=64, stride=40)")  # fmt: skip
    whole = Segmenter(model, device="cpu", dtype=torch.float32)
    assert repr(whole) == "Segmenter(arch='custom', num_classes=4, device='cpu', dtype=torch.float32, mode='whole')"


def test_a_float_batch_of_0_to_1_pixels_warns_in_a_category_a_user_can_filter(model):
    """The Segmenter's warning about a float batch within 0..1 (pixels through ToTensor, not CLIP-normalised) is a
    UserWarning of its own, exported, so that a pipeline can make it an error or silence it by category."""
    seg = Segmenter(model, device="cpu", dtype=torch.float32)
    x = torch.rand(1, 3, 64, 64)
    with pytest.warns(dcf.UnnormalizedImagesWarning, match=r"^images: a float batch within 0\.\.1"):
        seg.logits(x)
    assert issubclass(dcf.UnnormalizedImagesWarning, UserWarning) and "UnnormalizedImagesWarning" in dcf.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error", dcf.UnnormalizedImagesWarning)
        with pytest.raises(dcf.UnnormalizedImagesWarning):
            seg.predict(x)


# Options past those a reader can tell by position: given positionally, a reordering or a new option in between
# would silently give a value to another parameter, so each takes a keyword only.
KEYWORD_ONLY = {
    "Segmenter": (Segmenter.__init__, "max_graphs"),
    "Segmenter.warmup": (Segmenter.warmup, "raw"),
    "evaluate": ("denseclip_fast.train:evaluate", "mode"),
    "build_tensorrt_engine": ("denseclip_fast.export:build_tensorrt_engine", "bf16"),
    "check_onnx_export": ("denseclip_fast.export:check_onnx_export", "runtime"),
    "to_onnx": ("denseclip_fast.export:to_onnx", "graph"),
    "to_aoti": ("denseclip_fast.export:to_aoti", "image_size"),
    "load_checkpoint": (dcf.load_checkpoint, "verify"),
    "pixel_text_score": ("denseclip_fast.ops:pixel_text_score", "backend"),
}


@pytest.mark.parametrize("name", sorted(KEYWORD_ONLY))
def test_options_take_keywords_only(name):
    """From its first option on, every parameter of the function is keyword-only; those before it are not."""
    func, first = KEYWORD_ONLY[name]
    if isinstance(func, str):
        module, attr = func.split(":")
        func = getattr(importlib.import_module(module), attr)
    params = list(inspect.signature(func).parameters.values())
    kinds = {p.name: p.kind for p in params}
    at = [p.name for p in params].index(first)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[at:]), kinds
    assert all(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params[:at]), kinds


@pytest.mark.parametrize("config", ["DenseCLIPConfig", "VisionConfig", "TextConfig", "DecoderConfig", "TrainConfig"])
def test_configs_take_keywords_only(config):
    """A configuration of tens of fields built by position would shift every value at a new field: refused."""
    module = "denseclip_fast.train" if config == "TrainConfig" else "denseclip_fast.config"
    cls = getattr(importlib.import_module(module), config)
    with pytest.raises(TypeError, match="positional"):
        cls("RN50")


def test_numpy_values_inside_a_list_or_a_named_tuple_are_the_python_ones():
    """A config field given as a list (as JSON gives it) or as a named tuple, holding numpy numbers, is stored with
    the Python numbers they stand for, as a plain tuple is (plain_value: a list stays a list, any tuple becomes a
    plain one)."""
    import collections
    import dataclasses
    import json

    import numpy as np

    from denseclip_fast.validation import plain_value

    Size = collections.namedtuple("Size", "long short")
    for given in ([np.int64(3), np.float32(0.5), np.True_], Size(np.int64(2048), np.uint16(512))):
        plain = plain_value(given)
        assert type(plain) is (list if isinstance(given, list) else tuple)
        assert [type(v) for v in plain] == [type(v.item()) for v in given] and list(plain) == [v.item() for v in given]
    base = dcf.preset("RN50")
    for scale in ([np.int64(2048), np.int32(512)], Size(np.int64(2048), np.uint16(512))):
        given = base.replace(test_scale=scale)
        assert given == base and all(type(v) is int for v in given.test_scale)
    vision = dataclasses.replace(base.vision, layers=[np.int64(3), np.int64(4), np.int64(6), np.int64(3)])
    assert vision == base.vision
    assert json.dumps(base.replace(vision=vision).to_dict()) == json.dumps(base.to_dict())


def test_a_numpy_number_is_no_bool():
    """as_bool takes numpy's bools, not its numbers: np.int64(1), like 1, is refused naming the argument."""
    import numpy as np

    from denseclip_fast.validation import as_bool

    for value in (np.int64(1), np.int8(0), np.uint8(1), np.float32(1.0), 1):
        with pytest.raises(ValueError, match=r"^flag must be True or False, got "):
            as_bool("flag", value)
    assert as_bool("flag", np.True_) is True and as_bool("flag", np.bool_(False)) is False


def test_numpy_values_in_a_configuration_are_the_python_ones_they_stand_for():
    """A size or rate computed with numpy was refused ("embed_dim must be an int >= 1, got np.int64(1024)"), or
    kept (an np.float64, which is a float; a numpy bool would have been refused): each is stored as the Python int,
    float or bool it stands for, so the configuration equals one written with plain values and to_dict holds only
    what JSON writes. A numpy bool in an int field, a complex and an array are still refused naming the field."""
    import collections
    import dataclasses
    import json

    import numpy as np

    base = dcf.preset("RN50")
    given = base.replace(
        embed_dim=np.int64(1024), head_dropout=np.float64(0.1), slide_crop=np.int32(512),
        test_scale=(np.int64(2048), np.uint16(512)), tau=np.float32(0.5),
        vision=dataclasses.replace(base.vision, layers=tuple(np.array([3, 4, 6, 3])), drop_path_rate=np.float16(0.5),
                                   double_class_embedding=np.True_),
        text=dataclasses.replace(base.text, n_ctx=np.int8(8)),
        decoder=dataclasses.replace(base.decoder, heads=np.uint32(4)),
    )  # fmt: skip
    assert given == base.replace(tau=0.5, vision=dataclasses.replace(base.vision, drop_path_rate=0.5))

    def leaves(value):
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        return [leaf for v in value for leaf in leaves(v)] if isinstance(value, (tuple, list)) else [value]

    assert {type(leaf) for leaf in leaves(given.to_dict())} == {str, int, float, bool}
    size = collections.namedtuple("Size", "long short")  # a tuple of another kind is the plain tuple too (the
    assert type(base.replace(test_scale=size(2048, 512)).test_scale) is tuple  # conversion rebuilt it: TypeError)
    assert DenseCLIPConfig.from_dict(json.loads(json.dumps(given.to_dict()))) == given
    for change, message in (({"embed_dim": np.True_}, "embed_dim must be an int >= 1, got True"),
                            ({"tau": np.complex64(1)}, "tau must be a number in (0.0, inf), got np.complex64(1+0j)"),
                            ({"test_scale": np.array([512, 512])}, "test_scale must be a list of 2 ints >= 32")):
        with pytest.raises(ValueError, match=re.escape(message)):
            base.replace(**change)


def test_a_segmenter_refuses_its_later_options_by_position(model):
    with pytest.raises(TypeError, match="positional"):
        Segmenter(model, "cpu", torch.float32, "whole", None, None, False, 4)  # type: ignore[misc]
    seg = Segmenter(model, "cpu", torch.float32, "whole", None, None, False, max_graphs=4)  # the order
    assert repr(seg).endswith("mode='whole')")


# A typed user's calls, checked by mypy --strict as a user's code is (the package's own errors not reported, as
# for an installed package): a result typed Any, which --strict refuses to return as a concrete type, fails, and so
# does a line marked ``# type: ignore[...]`` that mypy finds no error on (--strict warns of unused ignores): those
# are the mistakes the annotations must catch.
USER_SNIPPET = '''
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

import denseclip_fast as dcf
from denseclip_fast.train import SegmentationData, TrainConfig, evaluate, train


def logits_of(model: dcf.DenseCLIP, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def labels_of(seg: dcf.Segmenter, image: npt.NDArray[np.uint8], photo: Image.Image) -> torch.Tensor:
    seg.predict([image, photo])
    seg.logits(torch.zeros(1, 3, 64, 64))
    seg.open_vocab((image,), ["cat", "dog"])
    seg.predict("street.jpg")  # type: ignore[arg-type]
    seg.overlay("street.jpg", seg.predict(image)[0])  # type: ignore[arg-type]
    return seg.predict(photo)[0]


def miou(model: dcf.DenseCLIP, data: SegmentationData) -> float:
    result = evaluate(model, data, mode="slide")
    iou: float | None = result["per_class"]["cat"]["IoU"]
    result["miou"]  # type: ignore[typeddict-item]
    return result["mIoU"] + result["images"] + (iou or 0.0)


def trained(cfg: TrainConfig) -> float:
    result = train(cfg)
    result["loss"]  # type: ignore[typeddict-item]
    final = result["eval"]
    return result["last"]["loss"] + result["iterations"] + (final["mIoU"] if final is not None else 0.0)
'''


def test_a_strictly_typed_user_gets_concrete_types(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (requirements.lock pins it)")
    (tmp_path / "user.py").write_text(USER_SNIPPET)
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                             "--cache-dir", os.devnull, str(tmp_path / "user.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

"""Checkpoint loading: official mmcv files, our safetensors format, detection, and every error path."""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zipfile
from unittest import mock

import numpy as np
import pytest
import torch

import denseclip_fast as dcf
from benchmarks.official import OfficialDenseCLIP, save_mmcv_checkpoint
from denseclip_fast import CheckpointError, DenseCLIP
from denseclip_fast.checkpoints import io as checkpoint_io
from denseclip_fast.checkpoints import load_weights
from denseclip_fast.checkpoints.io import CheckpointNotFoundError, read_weight_file
from denseclip_fast.checkpoints.official import infer_config

from .conftest import NAMES, ROOT, RecordedOps, official_cfg, randomized, tiny_config

PWNED = "denseclip_fast_pwned_marker"


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "official.pth"
    model = randomized(OfficialDenseCLIP(official_cfg(tiny_config("resnet")), NAMES)).eval()
    save_mmcv_checkpoint(model, str(path), NAMES, palette=[[10, 20, 30], [40, 50, 60], [70, 80, 90], [1, 2, 3]])
    return path


def _state(path):
    return torch.load(path, weights_only=True)


def _save_state(tmp_path, state_dict, meta=None, name="edited.pth"):
    path = tmp_path / name
    obj = {"state_dict": state_dict} if meta is None else {"meta": meta, "state_dict": state_dict}
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------------------------ official files


def test_official_file_loads_in_eval_mode_with_meta(official_file):
    model = dcf.load_checkpoint(official_file)
    assert isinstance(model, DenseCLIP) and not model.training
    assert model.class_names == NAMES
    assert model.palette == [(10, 20, 30), (40, 50, 60), (70, 80, 90), (1, 2, 3)]
    assert model.config == tiny_config("resnet")
    assert next(model.parameters()).dtype == torch.float32
    sd = _state(official_file)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key  # every tensor was consumed as it is


def test_numpy_values_in_meta_are_read(tmp_path, official_file):
    """mmcv's meta may hold numpy arrays and scalars; they are plain data and must not make the file unreadable."""
    import numpy as np

    sd = _state(official_file)["state_dict"]
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [1, 2, 3]], dtype=np.int64)
    path = _save_state(tmp_path, sd, meta={"CLASSES": tuple(NAMES), "PALETTE": palette, "seed": np.int64(7)})
    assert dcf.load_checkpoint(path).palette == [tuple(map(int, c)) for c in palette]


def test_threads_loading_at_once_keep_the_numpy_globals_and_the_warning_filters(tmp_path, official_file, monkeypatch):
    """load_checkpoint in two threads at once: torch's safe_globals (the numpy globals mmcv's meta needs) and
    catch_warnings change process-wide state, so a load that ended while another was inside torch.load took the
    numpy globals away from it (its file refused as "not a valid checkpoint") and left that load's warning filter
    in place for good. Here the first thread's torch.load waits (up to 1 s) for the second's to start, and the
    second's for the first's load_checkpoint to end: the interleaving that failed, which loads taking turns turn
    into one after the other (each wait then runs out, or was met)."""
    import threading

    sd = _state(official_file)["state_dict"]
    path = _save_state(tmp_path, sd, meta={"CLASSES": tuple(NAMES), "PALETTE": np.arange(12).reshape(4, 3),
                                           "seed": np.int64(7)})  # fmt: skip
    real_load = torch.load
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()

    def load(*args, **kwargs):
        if threading.current_thread() is first:
            first_inside.set()
            second_inside.wait(timeout=1.0)
        else:
            second_inside.set()
            first_done.wait(timeout=1.0)
        return real_load(*args, **kwargs)

    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = dcf.load_checkpoint(path)
        except Exception as exc:  # the test's assertion says which
            results[name] = exc
        finally:
            if name == "first":
                first_done.set()

    monkeypatch.setattr(torch, "load", load)
    filters = list(warnings.filters)
    first, second = threading.Thread(target=run, args=("first",)), threading.Thread(target=run, args=("second",))
    first.start()
    assert first_inside.wait(timeout=30)
    second.start()
    first.join()
    second.join()
    assert all(isinstance(model, DenseCLIP) for model in results.values()) and len(results) == 2, results
    assert results["second"].palette == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    assert warnings.filters == filters


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_meta_that_is_a_tensor_or_an_array_is_ignored(tmp_path, official_file, kind):
    """A meta that is not a dict is ignored, as it always was for a string or a list; one holding several values was
    tested for truth and raised RuntimeError (a tensor) or ValueError (a numpy array) instead."""
    import numpy as np

    sd = _state(official_file)["state_dict"]
    path = _save_state(tmp_path, sd, meta=torch.zeros(2) if kind == "tensor" else np.zeros(2))
    assert dcf.load_checkpoint(path, class_names=NAMES).class_names == NAMES
    with pytest.raises(CheckpointError, match="names no classes and its head has 4 outputs: pass class_names"):
        dcf.load_checkpoint(path)


def test_class_names_argument_overrides_meta(official_file):
    model = dcf.load_checkpoint(official_file, class_names=["a", "b", "c", "d"])
    assert model.class_names == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="class_names has 2 names but the checkpoint's head has 4 outputs"):
        dcf.load_checkpoint(official_file, class_names=["a", "b"])


def test_bare_state_dict_and_ddp_prefix(tmp_path, official_file):
    sd = _state(official_file)["state_dict"]
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, bare)
    with pytest.raises(CheckpointError, match="names no classes and its head has 4 outputs: pass class_names"):
        dcf.load_checkpoint(bare)
    model = dcf.load_checkpoint(bare, class_names=NAMES)
    assert torch.equal(model.gamma, sd["gamma"])


def test_checkpoint_errors_cross_processes(tmp_path, official_file):
    """Every error load_checkpoint raises pickles and unpickles as itself (its class, message and attributes): a
    multiprocessing pool's worker sends its error to the parent so. CheckpointError's default pickling rebuilt it as
    cls(message), which failed (no ``reason``): the parent's result thread died on it and the pool hung."""
    from denseclip_fast.checkpoints import ClassCountError, UnnamedClassesError

    sd = _state(official_file)["state_dict"]
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    cases = [(tmp_path / "nope.pth", {}), (tmp_path / "text.pth", {}), (bare, {}), (bare, {"class_names": ["a"]})]
    raised = []
    for path, kwargs in cases:
        with pytest.raises(ValueError) as caught:
            dcf.load_checkpoint(path, **kwargs)
        raised.append(caught.value)
    kinds = [type(e) for e in raised]
    assert kinds == [CheckpointNotFoundError, CheckpointError, UnnamedClassesError, ClassCountError]
    for error in raised:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and again.args == error.args
        assert vars(again) == vars(error) and getattr(again, "errno", None) == getattr(error, "errno", None)


def test_no_class_names_with_150_outputs_assumes_ade20k(tmp_path):
    official = OfficialDenseCLIP(official_cfg(tiny_config("resnet")), list(dcf.ADE20K_CLASSES))
    path = tmp_path / "ade.pth"
    torch.save(official.state_dict(), path)
    with pytest.warns(UserWarning, match="assuming the 150 ADE20K classes"):
        model = dcf.load_checkpoint(path)
    assert model.class_names == list(dcf.ADE20K_CLASSES)
    # train's --init reads such a file quietly (it compares the names itself), without catch_warnings: its filters
    # are the process's, and two threads' catch_warnings interleaved leave one's filter in place for good
    from denseclip_fast.checkpoints import transfer

    def process_wide(*args, **kwargs):
        raise AssertionError("the process's warning filters changed")

    weights = read_weight_file(path)  # (torch.load's own warning is filtered under io's lock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mock.patch.object(warnings, "catch_warnings", process_wide):
            read, named = transfer._read(str(path), weights)
    assert named and read.class_names == list(dcf.ADE20K_CLASSES) and caught == []


@pytest.mark.parametrize("k", [149, 151])
def test_no_class_names_with_other_than_150_outputs_asks_for_them(tmp_path, k):
    """Only a head of exactly ADE20K's 150 outputs is given ADE20K's names: one of 149 or 151 names no classes, so
    load_checkpoint asks for them (UnnamedClassesError saying so), without the ADE20K warning and without calling
    150 assumed names the file's own."""
    from denseclip_fast.checkpoints import MismatchedClassNamesError, UnnamedClassesError

    sd = DenseCLIP(tiny_config("resnet"), (list(dcf.ADE20K_CLASSES) * 2)[:k]).state_dict()
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnnamedClassesError, match=rf"the file names no classes and its head has {k} outputs: pass "
                                                      r"class_names=\[\.\.\.\]$") as err:  # fmt: skip
            dcf.load_checkpoint(path)
    assert not isinstance(err.value, MismatchedClassNamesError) and err.value.outputs == k


def test_missing_and_unexpected_keys_are_listed(tmp_path, official_file):
    sd = dict(_state(official_file)["state_dict"])
    del sd["decode_head.scale_heads.1.0.bn.running_var"]
    sd["decode_head.extra.weight"] = torch.zeros(1)
    path = _save_state(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        dcf.load_checkpoint(path, class_names=NAMES)
    message = str(err.value)
    assert "missing keys (1): decode_head.scale_heads.1.0.bn.running_var" in message
    assert "unexpected keys (1): decode_head.extra.weight" in message
    assert message.startswith(str(path)) and "\n" not in message


def test_a_file_without_batchnorm_counters_loads_with_them_at_zero(tmp_path, official_file):
    """num_batches_tracked (integer buffers that converters drop) may be missing, every one or some: they load as
    0 and the model computes what the full file's does; any other missing buffer is still refused."""
    state = _state(official_file)
    sd = dict(state["state_dict"])
    counters = [k for k in sd if k.endswith(".num_batches_tracked")]
    assert len(counters) > 10
    full = dcf.load_checkpoint(_save_state(tmp_path, sd, meta=state["meta"], name="full.pth"))
    x = torch.randn(1, 3, 64, 64)
    for dropped in (counters, counters[::3]):
        path = _save_state(tmp_path, {k: v for k, v in sd.items() if k not in dropped}, meta=state["meta"],
                           name="pruned.pth")  # fmt: skip
        model = dcf.load_checkpoint(path)
        loaded = model.state_dict()
        assert all(loaded[k].dtype == torch.long and int(loaded[k]) == 0 for k in dropped)
        assert all(torch.equal(loaded[k], sd[k]) for k in counters if k not in dropped)
        with torch.no_grad():
            assert torch.equal(model(x), full(x))
    del sd[counters[0]], sd["decode_head.scale_heads.1.0.bn.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): decode_head.scale_heads.1.0.bn.running_var$"):
        dcf.load_checkpoint(_save_state(tmp_path, sd, meta=state["meta"], name="no_var.pth"))


def test_shape_mismatch_names_key_and_shapes(tmp_path, official_file):
    sd = dict(_state(official_file)["state_dict"])
    sd["context_decoder.decoder.0.mlp.0.bias"] = torch.zeros(7)
    path = _save_state(tmp_path, sd)
    with pytest.raises(
        CheckpointError, match=r"context_decoder.decoder.0.mlp.0.bias: checkpoint \(7,\) vs model \(128,\)"
    ):
        dcf.load_checkpoint(path, class_names=NAMES)
    # a weight stored transposed (a converter that forgot a .t()): as many elements, another shape; and a stray
    # BatchNorm counter of no module
    key = "text_encoder.text_projection"
    sd = dict(_state(official_file)["state_dict"], **{key: sd[key].t().contiguous()})
    sd["backbone.bn9.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(CheckpointError, match=rf"unexpected keys \(1\): backbone.bn9.num_batches_tracked; shape "
                                              rf"mismatch \(1\): {key}: checkpoint \(48, 64\) vs model \(64, 48\)$"):
        dcf.load_checkpoint(_save_state(tmp_path, sd), class_names=NAMES)


def test_non_tensor_entries_are_refused(tmp_path, official_file):
    sd = dict(_state(official_file)["state_dict"])
    sd["gamma"] = [1.0, 2.0]
    with pytest.raises(CheckpointError, match="not tensors: gamma"):
        dcf.load_checkpoint(_save_state(tmp_path, sd), class_names=NAMES)


@pytest.mark.parametrize(
    "key, tensor, message",
    [
        ("gamma", torch.tensor(1e-4), "gamma has shape (), expected (embed_dim,)"),
        ("contexts", torch.zeros(8), "contexts has shape (8,), expected (1, n_ctx, text width)"),
        ("text_encoder.positional_embedding", torch.zeros(13),
         "text_encoder.positional_embedding has shape (13,), expected (context_length, text width)"),
        ("decode_head.conv_seg.weight", torch.zeros(4),
         "decode_head.conv_seg.weight has shape (4,), expected (K, head_channels, 1, 1)"),
        ("decode_head.conv_seg.weight", torch.zeros(0, 16, 1, 1),
         "decode_head.conv_seg.weight has shape (0, 16, 1, 1), expected (K, head_channels, 1, 1) with K >= 1"),
        ("neck.lateral_convs.2.conv.weight", torch.zeros(16, 32),
         "neck.lateral_convs.2.conv.weight has shape (16, 32), expected (fpn_channels, in_channels, 1, 1)"),
        ("backbone.attnpool.positional_embedding", torch.zeros(0, 256),
         "backbone.attnpool.positional_embedding has shape (0, 256), expected (1 + grid * grid, width * 32) "
         "(e.g. 257 rows: 1 + 16 * 16)"),
        ("backbone.attnpool.positional_embedding", torch.zeros(7, 256), "has shape (7, 256), expected (1 + grid"),
        ("text_encoder.token_embedding.weight", torch.zeros(10, 64),
         "text_encoder.token_embedding.weight has shape (10, 64), expected (49408 or more, text width): the "
         "tokenizer's ids go up to 49407"),
        ("text_encoder.token_embedding.weight", torch.zeros(49407, 64),  # one row short: id 49407 (EOT) missing
         "text_encoder.token_embedding.weight has shape (49407, 64), expected (49408 or more, text width)"),
    ],
)  # fmt: skip
def test_official_tensors_of_the_wrong_shape_are_named(tmp_path, official_file, key, tensor, message):
    """Were IndexError (gamma 0-d, contexts or the text positional embedding 1-D), an unpacking ValueError with no
    context (a 1-D classifier), "isqrt() argument must be nonnegative" (an empty positional embedding), or a model
    that loaded and failed with IndexError at its first forward (a 10-row token embedding)."""
    sd = dict(_state(official_file)["state_dict"])
    sd[key] = tensor
    with pytest.raises(CheckpointError) as err:
        dcf.load_checkpoint(_save_state(tmp_path, sd), class_names=NAMES)
    assert message in str(err.value) and str(err.value).startswith(str(tmp_path))


def test_vit_state_dict_without_positional_embedding(tmp_path):
    sd = DenseCLIP(tiny_config("vit"), NAMES).state_dict()
    del sd["backbone.positional_embedding"]
    with pytest.raises(CheckpointError, match="not a DenseCLIP state dict: missing backbone.positional_embedding"):
        dcf.load_checkpoint(_save_state(tmp_path, sd), class_names=NAMES)


@pytest.mark.parametrize("pos", [torch.zeros(0, 256), torch.zeros(256), torch.zeros(11, 256)])
def test_clip_positional_embedding_that_is_not_a_grid(tmp_path, pos):
    """An empty CLIP positional embedding was "isqrt() argument must be nonnegative", a 1-D one an IndexError."""
    from denseclip_fast.checkpoints.clip import init_from_clip

    path = tmp_path / "clip.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1), "token_embedding.weight": torch.zeros(1),
                "visual.attnpool.positional_embedding": pos}, path)  # fmt: skip
    message = f"visual.attnpool.positional_embedding has shape {tuple(pos.shape)}, expected (1 + grid * grid, width)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        init_from_clip(DenseCLIP(tiny_config("resnet"), NAMES), path)


def test_not_a_denseclip_state_dict(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="not a DenseCLIP state dict: missing contexts, gamma"):
        dcf.load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a state dict .* found list"):
        dcf.load_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"expected a state dict .* found an empty dict$"):
        dcf.load_checkpoint(path)


def test_a_clip_fpn_baseline_is_said_to_be_one(tmp_path):
    """The official repository also released CLIP + FPN baselines (configs fpn_clipres50 and the like): a CLIP
    backbone, an FPN neck and a decode head without DenseCLIP's text side. Their refusal says so, not only which
    keys are missing; a state dict with any part of the text side, or without a neck or head, gets no such hint."""
    sd = DenseCLIP(tiny_config("resnet"), NAMES).state_dict()
    baseline = {k: v for k, v in sd.items() if not k.startswith(("contexts", "gamma", "text_encoder.",
                                                                  "context_decoder."))}  # fmt: skip
    with pytest.raises(CheckpointError, match="not a DenseCLIP state dict: missing contexts, gamma") as err:
        dcf.load_checkpoint(_save_state(tmp_path, baseline), class_names=NAMES)
    assert "no text side" in str(err.value) and "fpn_clip" in str(err.value)
    for kept in ("gamma", "context_decoder.text_proj.1.weight"):  # DenseCLIP's, damaged: the plain list
        with pytest.raises(CheckpointError) as err:
            dcf.load_checkpoint(_save_state(tmp_path, {**baseline, kept: sd[kept]}), class_names=NAMES)
        assert "not a DenseCLIP state dict" in str(err.value) and "fpn_clip" not in str(err.value)
    headless = {k: v for k, v in baseline.items() if not k.startswith("decode_head.")}
    with pytest.raises(CheckpointError) as err:
        dcf.load_checkpoint(_save_state(tmp_path, headless), class_names=NAMES)
    assert "fpn_clip" not in str(err.value) and "RetinaNet" not in str(err.value)


@pytest.mark.parametrize("heads", [("bbox_head",), ("rpn_head", "roi_head")])
def test_a_denseclip_detector_is_said_to_be_one(tmp_path, heads):
    """The official DenseCLIP detectors (RetinaNet: bbox_head; Mask R-CNN: rpn_head and roi_head) share the
    backbone, text encoder, context decoder and neck with the segmentation models but have no decode head: their
    refusal says what they are. A segmentation state dict with a stray head of that name keeps the plain message
    (its decode head is what it is)."""
    sd = DenseCLIP(tiny_config("resnet"), NAMES).state_dict()
    detector = {k: v for k, v in sd.items() if not k.startswith("decode_head.")}
    detector.update({f"{head}.conv.weight": torch.zeros(4, 4, 1, 1) for head in heads})
    with pytest.raises(CheckpointError, match="missing decode_head.conv_seg.weight") as err:
        dcf.load_checkpoint(_save_state(tmp_path, detector), class_names=NAMES)
    assert "a detector" in str(err.value) and "RetinaNet and Mask R-CNN" in str(err.value)
    del sd["gamma"]
    sd.update({f"{head}.conv.weight": torch.zeros(4, 4, 1, 1) for head in heads})
    with pytest.raises(CheckpointError, match="missing gamma") as err:
        dcf.load_checkpoint(_save_state(tmp_path, sd), class_names=NAMES)
    assert "RetinaNet" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["RN50", "RN101", "ViT-B/16"])
def test_architecture_detected_from_tensors(arch):
    sd = DenseCLIP.from_arch(arch).state_dict()
    config, k = infer_config(sd, "x.pth")
    assert config == dcf.preset(arch) and k == 150


def test_detection_of_tiny_vit_and_arch_check(tmp_path):
    sd = DenseCLIP(tiny_config("vit"), NAMES).state_dict()
    config, k = infer_config(sd, "x.pth")
    assert config == tiny_config("vit") and k == len(NAMES)
    path = _save_state(tmp_path, sd, meta={"CLASSES": tuple(NAMES)})
    with pytest.raises(CheckpointError, match=r"arch='RN50' was requested but the checkpoint holds 'custom'"):
        dcf.load_checkpoint(path, arch="RN50")


@pytest.mark.parametrize(
    "section, changes",
    [
        ("text", {"width": 32, "heads": 1}),  # narrower than one 64-wide head: still one head, never 0
        ("text", {"layers": 11}),  # block indices of two digits
        ("decoder", {"layers": 11}),
    ],
)  # fmt: skip
def test_detection_of_sizes_no_preset_has(section, changes):
    """Head and block counts the tensors imply for sizes the released models do not have: a text width under 64
    has one head (``max(1, width // 64)``: 0 heads is no architecture), and stacks of 10 or more blocks count their
    two-digit indices (a block count read as 10 for 11 blocks builds a model that the file's keys do not fit)."""
    config = tiny_config("resnet")
    config = config.replace(**{section: dataclasses.replace(getattr(config, section), **changes)})
    detected, k = infer_config(DenseCLIP(config, NAMES).state_dict(), "x.pth")
    assert detected == config and k == len(NAMES)


def test_a_released_architecture_at_another_resolution_is_custom():
    """RN50's tensors with the attention pool's grid of a 640-pixel input (20 x 20, not the preset's 16 x 16) are a
    custom architecture of that resolution, not the RN50 preset: the preset's 257-row positional embedding would
    refuse the file's 401 rows. (Shapes only: the model is built on the meta device.)"""
    rn50 = dcf.preset("RN50")
    config = rn50.replace(arch="custom", vision=dataclasses.replace(rn50.vision, input_resolution=640))
    sd = _meta_model(config, dcf.ADE20K_CLASSES).state_dict()
    assert sd["backbone.attnpool.positional_embedding"].shape[0] == 1 + 20 * 20
    detected, k = infer_config(sd, "x.pth")
    assert detected.arch == "custom" and detected.vision.input_resolution == 640 and k == 150
    assert detected.vision.layers == rn50.vision.layers and detected.vision.width == rn50.vision.width


def test_arch_requested_by_any_of_its_names():
    """``arch`` is checked by its canonical name: 'ViT-B-16' (open_clip's spelling, which the command line takes) is
    the 'ViT-B/16' a released ViT checkpoint holds, not a mismatch; an unknown name is named as such."""
    from denseclip_fast.checkpoints.official import check_arch

    vit = dcf.preset("ViT-B/16")
    check_arch(vit, "ViT-B-16", "x.pth")
    check_arch(vit, "ViT-B/16", "x.pth")
    check_arch(vit, None, "x.pth")
    with pytest.raises(CheckpointError, match=r"arch='RN50' was requested but the checkpoint holds 'ViT-B/16'"):
        check_arch(vit, "RN50", "x.pth")
    with pytest.raises(ValueError, match=r"arch must be one of .*got 'ViT-L/14'"):
        check_arch(vit, "ViT-L/14", "x.pth")
    for wrong in (["RN50"], {"RN50"}, None, 50):  # a list was "unhashable type: 'list'"
        with pytest.raises(ValueError, match=re.escape(f"arch must be one of {list(dcf.config.ARCHS)}, got {wrong!r}")):
            dcf.preset(wrong)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ own format


def test_native_round_trip(tmp_path, official_file):
    model = dcf.load_checkpoint(official_file)
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = dcf.load_checkpoint(path)
    assert loaded.config == model.config and loaded.class_names == model.class_names
    assert loaded.palette == model.palette
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "denseclip_fast"
        assert set(f.keys()) == set(model.state_dict())
    gelu = dcf.DenseCLIP(tiny_config("vit").replace(activation="gelu"), NAMES)
    gelu.save(tmp_path / "gelu.safetensors")
    assert dcf.load_checkpoint(tmp_path / "gelu.safetensors").config.activation == "gelu"  # kept with the weights
    # a file name of bytes that are not UTF-8 (Linux allows any): safetensors opens only UTF-8 paths, so such a file
    # loaded as "corrupt or truncated"
    odd = tmp_path / os.fsdecode(b"model_\xff.safetensors")
    model.save(odd)
    assert torch.equal(dcf.load_checkpoint(odd)(x), loaded(x))


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_a_loaded_model_holds_the_files_tensors_and_remade_class_tokens(tmp_path, kind):
    """load_checkpoint skips the random initialisation (the model's memory is left uninitialised and every tensor of
    the file copied in) and remakes the class tokens, the one tensor a file does not hold: in both formats every
    parameter and buffer of the loaded model equals the saved one's, on the CPU, in float32, learnable as before;
    and the model has no other non-persistent buffer, which a load would leave as garbage."""
    model = randomized(DenseCLIP(tiny_config(kind), NAMES)).eval()
    native = tmp_path / "model.safetensors"
    model.save(native)
    official = _save_state(tmp_path, model.state_dict(), meta={"CLASSES": tuple(NAMES)})
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    for path in (native, official):
        loaded = dcf.load_checkpoint(path)
        got = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            assert torch.equal(got[name], want) and got[name].dtype == want.dtype, (path.name, name)
            assert got[name].device.type == "cpu" and got[name].requires_grad == want.requires_grad, (path.name, name)
    names = ["sky", "road", "tree", "car"]
    renamed = dcf.load_checkpoint(native, class_names=names)
    assert torch.equal(renamed.class_tokens, DenseCLIP(tiny_config(kind), names).class_tokens)
    transient = set()
    for prefix, module in model.named_modules():
        transient |= {f"{prefix}.{name}".lstrip(".") for name in module._non_persistent_buffers_set}
    assert transient == {"class_tokens"}


def test_a_fresh_process_loads_and_segments_without_torchs_compiler_or_open_clips_models(tmp_path):
    """What start-up costs (benchmarks/bench_startup.py): load_checkpoint builds its skeleton on the meta device,
    where normal_, an out-of-place op with a Python number and to_empty run Python decompositions that import
    torch._dynamo or sympy (seconds of a fresh process), and tokenising through open_clip's package imports its
    models; torch.utils.flop_counter, where the operators' FLOP formulas go, imports Triton (0.12 s), which a CPU
    process does not otherwise need. Loading both formats of both kinds of model, building a Segmenter and segmenting
    an image, a fresh process imports none of them (Triton: none that ``import torch`` had not)."""
    paths = []
    for kind in ("resnet", "vit"):
        model = DenseCLIP(tiny_config(kind), NAMES)
        model.save(tmp_path / f"{kind}.safetensors")
        paths += [str(tmp_path / f"{kind}.safetensors"), str(_save_state(tmp_path, model.state_dict(),
                                                                           {"CLASSES": tuple(NAMES)}, f"{kind}.pth"))]
    code = (
        "import json, sys, torch\n"
        "had = set(sys.modules)\n"
        "import denseclip_fast as dcf\n"
        "for path in sys.argv[1:]:\n"
        "    seg = dcf.Segmenter(dcf.load_checkpoint(path), device='cpu', dtype=torch.float32)\n"
        "    seg.logits(torch.randn(1, 3, 64, 64))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm', 'sympy')\n"
        "                        or m.startswith(('torch._dynamo', 'torch._inductor', 'torch.utils.flop_counter'))\n"
        "                        or m.split('.')[0] == 'triton' and m not in had)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_skeleton_draws_no_random_values_on_the_meta_device_and_elsewhere_the_same_ones():
    """MetaInitsSkipped (load_checkpoint's skeleton): PyTorch's modules' own inits (nn.init's functions, some
    dispatched whole, some calling uniform_ directly) run no random fill on a meta tensor, which with torch 2.10
    imported sympy (the test above); on the CPU the same values as without it."""
    from torch import nn

    from denseclip_fast.model.layers import MetaInitsSkipped

    def modules() -> list[nn.Module]:
        return [nn.Conv2d(3, 4, 3), nn.Linear(4, 5), nn.Embedding(6, 4), nn.MultiheadAttention(8, 2)]

    with RecordedOps() as ops, MetaInitsSkipped(), torch.device("meta"):
        built = modules()
    assert all(p.is_meta for m in built for p in m.parameters())
    assert not [name for name in ops.names if name.startswith(("uniform", "normal"))], ops.names
    torch.manual_seed(0)
    with MetaInitsSkipped():
        drawn = [p.detach().clone() for m in modules() for p in m.parameters()]
    torch.manual_seed(0)
    assert all(torch.equal(a, p) for a, p in zip(drawn, (p for m in modules() for p in m.parameters()), strict=True))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path, suffix):
    """A safetensors file begins with its header's length (8 bytes, little-endian, a multiple of 8): one length in
    32 has 0x80 as its first byte, which was taken for a legacy torch.save pickle. Named .safetensors, torch.load
    then read the bare tensors and load_checkpoint treated the file as an official one (config, class names and
    palette replaced by guesses: a different model, silently); under another name it was 'not a valid checkpoint'."""
    model = DenseCLIP(tiny_config("vit").replace(activation="gelu"), ["sky", "road", "tree", "car"])
    model.palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)]
    for pad in range(0, 264, 8):  # 8 more bytes of header each: every length modulo 256 within 32 saves
        model.set_classes(["sky", "road", "tree" + " " * pad, "car"])
        path = tmp_path / "model.safetensors"
        model.save(path)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 found")
    path = path.rename(path.with_suffix(suffix))  # (save refuses .bin, a pickle's suffix; a file renamed is read)
    loaded = dcf.load_checkpoint(path)
    assert loaded.config == model.config and loaded.config.activation == "gelu"
    assert loaded.class_names == model.class_names and loaded.palette == model.palette


def test_native_file_checks(tmp_path):
    model = DenseCLIP(tiny_config("vit"), ["sky", "road"])
    path = tmp_path / "vit.safetensors"
    model.save(path)
    assert dcf.load_checkpoint(path, class_names=["a", "b"]).class_names == ["a", "b"]
    with pytest.raises(CheckpointError, match="arch='ViT-B/16' was requested but the checkpoint holds 'custom'"):
        dcf.load_checkpoint(path, arch="ViT-B/16")
    with pytest.raises(CheckpointError, match="cannot save: directory .* does not exist"):
        model.save(tmp_path / "missing_dir" / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot save: the model is on the meta device \(shapes without data\)"):
        copy.deepcopy(model).to("meta").save(tmp_path / "meta.safetensors")
    assert not (tmp_path / "meta.safetensors").exists()
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors file"):
        dcf.load_checkpoint(truncated)


def test_palettes_are_checked_when_set_and_numpy_ones_save(tmp_path):
    """model.palette takes None or K (r, g, b) integers 0..255, numpy's too (kept as Python ints, so that save can
    write them as JSON: a numpy array was a TypeError 'Object of type int64 is not JSON serializable' at save);
    anything else is a ValueError naming palette, what it must be and what came."""
    model = DenseCLIP(tiny_config("resnet"), ["sky", "road", "car"])
    model.palette = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 255]], dtype=np.int64)
    assert model.palette == [(1, 2, 3), (4, 5, 6), (7, 8, 255)] and type(model.palette[0][0]) is int
    model.save(tmp_path / "numpy.safetensors")
    assert dcf.load_checkpoint(tmp_path / "numpy.safetensors").palette == [(1, 2, 3), (4, 5, 6), (7, 8, 255)]
    model.palette = [(np.uint8(9), 8, 7), [6, 5, np.int32(4)], (3, 2, 1)]
    assert model.palette == [(9, 8, 7), (6, 5, 4), (3, 2, 1)]
    model.palette = None
    assert model.palette is None
    expected = "palette must be None or 3 (r, g, b) triples of integers in 0..255 (one per class), got "
    for palette, got in (([(1, 2, 3), (4, 5, 6)], "2 colours"),
                         ([(1, 2, 3), (4, 5, 6), (7, 8, 256)], "[(1, 2, 3), (4, 5, 6), (7, 8, 256)]"),
                         ([(1, 2, 3), (4, 5, 6), (7.0, 8, 9)], "[(1, 2, 3), (4, 5, 6), (7.0, 8, 9)]"),
                         ([(1, 2, 3), (4, 5, 6), (True, 8, 9)], "[(1, 2, 3), (4, 5, 6), (True, 8, 9)]"),
                         ([(1, 2), (4, 5), (7, 8)], "[(1, 2), (4, 5), (7, 8)]"), ("red", "'red'")):  # fmt: skip
        with pytest.raises(ValueError) as info:
            model.palette = palette
        assert str(info.value) == expected + got
    assert model.palette is None  # a refused palette leaves the last one


@pytest.fixture(scope="module")
def native_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / "native.safetensors"
    model = DenseCLIP(tiny_config("resnet"), ["sky", "road", "car"])
    model.palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    model.save(path)
    return path


def _native_parts(path):
    """(metadata, tensors) of a safetensors file, read with the safetensors library alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _native_with(tmp_path, native_file, name="edited.safetensors", **changes):
    """A copy of ``native_file`` with metadata entries replaced (each value as written to the header; None: the entry
    removed), its CRC-32 record made to agree with them unless ``crc32`` is among them (a crafted file, which the
    checks must catch)."""
    from safetensors.torch import save_file

    from denseclip_fast.checkpoints.native import metadata_crc32

    meta, sd = _native_parts(native_file)
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    if "crc32" not in changes:
        meta["crc32"] = json.dumps({**json.loads(meta["crc32"]), "__metadata__": metadata_crc32(meta)})
    path = tmp_path / name
    save_file(sd, str(path), metadata=meta)
    return path


def _config_with(native_file, dotted: str, value):
    from safetensors import safe_open

    with safe_open(str(native_file), "pt") as f:
        config = json.loads(f.metadata()["config"])
    *parents, key = dotted.split(".")
    part = config
    for name in parents:
        part = part[name]
    part[key] = value
    return json.dumps(config)


@pytest.mark.parametrize(
    "dotted, value, match",
    [
        ("decoder.heads", 0, "decoder.heads must be an int >= 1, got 0"),
        ("text.heads", 0, "text.heads must be an int >= 1, got 0"),
        ("vision.layers", 4, "vision.layers must be a list of 4 ints >= 1, got 4"),
        ("vision.width", "8", "vision.width must be an int >= 1, got '8'"),
        ("fpn_channels", -16, "fpn_channels must be an int >= 1, got -16"),
        ("score_concat_index", 3.0, "score_concat_index must be an int >= 0, got 3.0"),
        ("head_dropout", 2.0, r"head_dropout must be a number in \[0.0, 1.0\], got 2.0"),
        ("tau", 0, r"tau must be a number in \(0.0, inf\), got 0"),
        ("test_scale", "big", "test_scale must be a list of 2 ints >= 32 .*, got 'big'"),
        ("test_scale", [0, 0], r"test_scale must be a list of 2 ints >= 32 .*, got \(0, 0\)"),
        ("arch", "", r"arch must be a non-empty name \(RN50, RN101, ViT-B/16, 'custom' or your own\), got ''"),
        ("text.vocab_size", 10, "text.vocab_size must be an int >= 49408"),
    ],
)
def test_native_config_metadata_is_validated(tmp_path, native_file, dotted, value, match):
    """A bad value in the saved architecture is a CheckpointError naming the file, the field and the value; before,
    these were ZeroDivisionError, TypeError or RuntimeError deep in the model, or a model that loaded and failed
    (or computed infinities) later."""
    path = _native_with(tmp_path, native_file, config=_config_with(native_file, dotted, value))
    with pytest.raises(CheckpointError, match=f"invalid architecture in the metadata 'config': {match}") as err:
        dcf.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ")


def test_official_tensors_implying_an_invalid_architecture(tmp_path, official_file):
    """No text transformer blocks in the file: before, a text encoder of 0 layers loaded silently."""
    sd = {k: v for k, v in _state(official_file)["state_dict"].items()
          if not k.startswith("text_encoder.transformer.")}  # fmt: skip
    with pytest.raises(CheckpointError, match="the tensors describe an invalid architecture: text.layers must be an "
                                              "int >= 1, got 0"):  # fmt: skip
        dcf.load_checkpoint(_save_state(tmp_path, sd), class_names=NAMES)


@pytest.mark.parametrize("value", ["5", "null", '["sky", 3, "car"]', "[]", '"sky road car"'])
def test_native_class_names_metadata_is_validated(tmp_path, native_file, value):
    """Was a TypeError (len() of an int or None), or a string taken as its characters."""
    path = _native_with(tmp_path, native_file, class_names=value)
    with pytest.raises(CheckpointError, match="the metadata 'class_names' must be a non-empty JSON list of strings, "
                                              "got "):  # fmt: skip
        dcf.load_checkpoint(path)


@pytest.mark.parametrize("key", ["config", "class_names"])
def test_a_native_file_without_an_entry_of_its_metadata_is_named_damaged(tmp_path, native_file, key):
    """A file whose denseclip_fast metadata lacks the config or the class names (its CRC-32 record made to agree:
    a file another tool rewrote) names the file and the entry, not a KeyError."""
    path = _native_with(tmp_path, native_file, "lacking.safetensors", **{key: None})
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: damaged denseclip_fast metadata: no {key!r} entry")):
        dcf.load_checkpoint(path)


@pytest.mark.parametrize(
    "palette",
    ["[[Infinity, 0, 0], [0, 0, 0], [0, 0, 0]]", "[[1.5, 2, 3], [4, 5, 6], [7, 8, 9]]", "[[1, 2, 3], [4, 5, 6]]",
     "[[true, 2, 3], [4, 5, 6], [7, 8, 9]]", '["abc", "def", "ghi"]', "7", "[[1, 2, 3], [4, 5, 6], [7, 8, 256]]"],
)  # fmt: skip
def test_malformed_palettes_are_dropped_with_a_warning(tmp_path, native_file, palette):
    """A palette is cosmetic: a malformed one is dropped, with a warning naming the file. Infinity was an
    OverflowError out of load_checkpoint; 1.5 was silently truncated to 1."""
    path = _native_with(tmp_path, native_file, palette=palette)
    with pytest.warns(UserWarning, match="ignoring the palette in the file: it is not 3 RGB triples of integers"):
        assert dcf.load_checkpoint(path).palette is None
    assert dcf.load_checkpoint(native_file).palette == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]


def test_class_names_stored_in_the_file_that_the_tokenizer_refuses(tmp_path, native_file):
    """Was the tokenizer's ValueError, which names neither the file nor where the names came from."""
    path = _native_with(tmp_path, native_file, class_names='["sky", "", "car"]')
    with pytest.raises(CheckpointError, match=r"the file's class names cannot be used: class name 1 \(''\) has no"):
        dcf.load_checkpoint(path)
    with pytest.raises(ValueError, match=r"^class name 1 \(''\) has no tokens"):
        dcf.load_checkpoint(native_file, class_names=["sky", "", "car"])


def test_class_names_stored_in_the_file_that_disagree_with_its_head(tmp_path, native_file, official_file):
    """The caller passed no class_names: the message is about the file's names, not about a class_names argument."""
    path = _native_with(tmp_path, native_file, class_names='["cat", "dog"]')
    with pytest.raises(CheckpointError) as err:
        dcf.load_checkpoint(path)
    assert str(err.value) == (f"{path}: the file's class names (2) disagree with its head (3 outputs); "
                              "pass class_names=[...] with 3 names")  # fmt: skip
    assert isinstance(err.value, dcf.checkpoints.MismatchedClassNamesError)  # the CLI's --classes names them
    assert (err.value.names, err.value.outputs) == (2, 3)
    assert dcf.load_checkpoint(path, class_names=["cat", "dog", "cow"]).class_names == ["cat", "dog", "cow"]
    official = _save_state(tmp_path, _state(official_file)["state_dict"], meta={"CLASSES": ("cat", "dog")})
    with pytest.raises(CheckpointError, match=r"the file's class names \(2\) disagree with its head \(4 outputs\)"):
        dcf.load_checkpoint(official)
    official = _save_state(tmp_path, _state(official_file)["state_dict"], meta={"CLASSES": 5})
    with pytest.raises(CheckpointError, match=r"meta\['CLASSES'\] is not a list of strings, got int"):
        dcf.load_checkpoint(official)


@pytest.mark.parametrize(
    "class_names, match",
    [
        ("abc", "class_names must be a list of strings, got str: 'abc'"),
        (3, "class_names must be a list of strings, got int: 3"),
        (["sky", None, "car"], "class_names\\[1\\] must be a string, got NoneType: None"),
        ((b"sky", "road", "car"), "class_names\\[0\\] must be a string, got bytes: b'sky'"),
        ({"sky", "road", "car"}, "class_names must be in the order of the head's outputs .*got set"),
        ({"sky": 0, "road": 1, "car": 2}, "class_names must be in the order of the head's outputs .*got dict"),
    ],
)
def test_class_names_argument_is_checked(native_file, class_names, match):
    """A str was run through list(): 'abc' loaded as the classes ['a', 'b', 'c']; a set's order is arbitrary (the
    names would silently land on the wrong outputs) and a dict's meaning is ambiguous."""
    with pytest.raises(ValueError, match=match):
        dcf.load_checkpoint(native_file, class_names=class_names)
    assert dcf.load_checkpoint(native_file, class_names=(n for n in "xyz")).class_names == ["x", "y", "z"]
    # a numpy array's names are the plain strings (they were kept as np.str_, shown as np.str_('x') in messages)
    names = dcf.load_checkpoint(native_file, class_names=np.array(["x", "y", "z"])).class_names
    assert names == ["x", "y", "z"] and all(type(name) is str for name in names)


@pytest.mark.parametrize("path, shown", [(b"/some/file.pth", "bytes: b'/some/file.pth'"), (None, "NoneType: None"),
                                         (3, "int: 3"), ("", "str: ''")])  # fmt: skip
def test_path_argument_is_checked(path, shown):
    """None was a TypeError from os.fspath; bytes a CheckpointError for b'/some/file.pth'."""
    message = f"path must be a non-empty str or os.PathLike, got {shown}"
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        dcf.load_checkpoint(path)
    assert not isinstance(err.value, CheckpointError)
    with pytest.raises(ValueError, match=re.escape(message)):
        DenseCLIP(tiny_config("resnet"), NAMES).save(path)
    with pytest.raises(ValueError, match=re.escape(message.replace("path", "clip_weights"))):
        DenseCLIP.from_clip(path, "RN50", NAMES)


def test_save_errors_name_the_path(tmp_path, monkeypatch):
    """A directory given as the path was an IsADirectoryError about a temporary name, a failed write a raw
    SafetensorError: each is a CheckpointError naming the path (the command line prints it on one line), and a
    failed write keeps the previous file."""
    from safetensors import SafetensorError

    model = DenseCLIP(tiny_config("resnet"), NAMES)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))}: cannot save: it is a directory"):
        model.save(tmp_path)
    target = tmp_path / "model.safetensors"
    model.save(target)
    before = target.read_bytes()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(target))}: cannot save: Error while serializing: "
                                              r"I/O error: No space left on device"):  # fmt: skip
        model.save(target)
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    monkeypatch.undo()
    for given in ("new/", "model.safetensors/"):  # written as a file "new", or over model.safetensors
        with pytest.raises(CheckpointError, match=rf"{re.escape(given)}: cannot save: the path ends in a separator"):
            model.save(f"{tmp_path}/{given}")
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    # a suffix of another format: torch.load of a "model.pth" safetensors file failed
    for name, what in (("model.pth", "torch.save's pickle"), ("m.ONNX", "an ONNX graph"), ("m.pt2", "an AOTInductor")):
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: cannot save: the file is written in "
                                                  rf"safetensors \(denseclip_fast's format\), not as {what}.* name "
                                                  rf"it {name.split('.')[0]}\.safetensors$"):  # fmt: skip
            model.save(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    model.save(tmp_path / "model")  # no suffix, or one of no other format: taken as given
    model.save(tmp_path / "model.st")
    assert sorted(os.listdir(tmp_path)) == ["model", "model.safetensors", "model.st"]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="cannot save: directory .*locked is not writable"):
            model.save(locked / "model.safetensors")


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_model_with_pruned_or_parametrized_weights_is_not_saved(tmp_path):
    """A pruned or parametrized weight's state dict entries are its parts (weight_orig and weight_mask,
    parametrizations.weight.original0 ...): save wrote a file that load_checkpoint then refused (missing and
    unexpected keys). It is refused when saved, saying what to do."""
    from torch.nn.utils import prune, weight_norm
    from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm

    for reparametrize in (lambda conv: prune.l1_unstructured(conv, "weight", amount=0.3),
                          parametrized_weight_norm, weight_norm):  # fmt: skip
        model = DenseCLIP(tiny_config("resnet"), NAMES)
        reparametrize(model.decode_head.scale_heads[0][0].conv)
        target = tmp_path / "model.safetensors"
        with pytest.raises(CheckpointError, match=r"cannot save: weights of the model are pruned or parametrized "
                                                  r"\(decode_head\.scale_heads\.0\.0\.conv\.weight\): .* "
                                                  r"make them plain first"):  # fmt: skip
            model.save(target)
        assert not target.exists()


def test_saved_files_get_the_permissions_open_would_give(tmp_path):
    """safetensors writes owner-only files (0600), so a checkpoint saved on a shared machine could not be loaded by
    the other users of its group: a new file gets 0666 less the umask, a replaced one keeps its mode."""
    from denseclip_fast.checkpoints.io import replaced_atomically

    model = DenseCLIP(tiny_config("resnet"), NAMES)
    umask = os.umask(0o027)
    try:
        model.save(tmp_path / "new.safetensors")
        assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.safetensors"
        kept.write_bytes(b"")
        kept.chmod(0o604)
        model.save(kept)
        assert kept.stat().st_mode & 0o777 == 0o604
        with replaced_atomically(tmp_path / "notes.json") as partial:
            with open(partial, "w") as f:
                f.write("{}")
            os.chmod(partial, 0o600)  # as a library writing through mkstemp leaves it
        assert (tmp_path / "notes.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_files_are_replaced_as_open_would_write_them(tmp_path):
    """replaced_atomically keeps a symlink and replaces its target (os.replace on the link put a file in its stead,
    and the target was never updated), writes a path that is not a regular file in place (replacing /dev/null, as
    root may, would put a file there), and written_atomically names the path and what was written, also for an
    OSError without errno (Pillow's 'encoder error -2': was '[Errno None] None')."""
    from denseclip_fast.checkpoints.io import replaced_atomically, written_atomically

    (tmp_path / "run5.json").write_text("old")
    os.symlink("run5.json", tmp_path / "latest.json")
    with replaced_atomically(tmp_path / "latest.json") as partial:
        with open(partial, "w") as f:
            f.write("new")
    assert os.readlink(tmp_path / "latest.json") == "run5.json" and (tmp_path / "run5.json").read_text() == "new"
    with replaced_atomically(os.devnull) as partial:
        assert partial == os.devnull
        with open(partial, "w") as f:
            f.write("into the void")
    assert not os.path.isfile(os.devnull)
    from denseclip_fast.cli import _os_error  # how the command line prints an OSError

    encoder, full = "encoder error -2 when writing image file", "No space left on device"
    for error, message in ((OSError(encoder), encoder), (OSError(28, full), full)):
        with pytest.raises(OSError) as info:
            with written_atomically(tmp_path / "x.png", "the overlay"):
                raise error
        assert _os_error(info.value) == f"{tmp_path / 'x.png'}: cannot write the overlay: {message}"
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "run5.json"]
    # the folders it made for a write that failed are removed (they stayed, empty), up to one that holds something
    for error in (OSError(28, full), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with written_atomically(tmp_path / "new" / "a" / "b" / "m.onnx", "the ONNX graph"):
                raise error
        assert sorted(os.listdir(tmp_path)) == ["latest.json", "run5.json"]
    with pytest.raises(OSError):
        with written_atomically(tmp_path / "new" / "a" / "m.onnx", "the ONNX graph"):
            (tmp_path / "new" / "kept.txt").write_text("another writer's")
            raise OSError(28, full)
    assert os.listdir(tmp_path / "new") == ["kept.txt"]


def test_a_model_saved_to_a_fifo_is_written_into_it(tmp_path):
    """DenseCLIP.save to a path that is not a regular file (here a FIFO, read by a thread; /dev/null alike) writes
    the checkpoint into it: safetensors' save_file writes a file of its own and renames it over the path, which put
    a regular file in the FIFO's (or, as root, /dev/null's) stead and left the reader waiting."""
    import stat
    import threading

    from safetensors.torch import load

    model = DenseCLIP(tiny_config(), NAMES).eval()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            received.append(f.read())

    reader = threading.Thread(target=read, daemon=True)  # blocks in open() until a writer opens the FIFO
    reader.start()
    model.save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a file"
    reader.join(timeout=30)
    assert received, "nothing was written into the FIFO"
    tensors = load(received[0])
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ unsafe and broken


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def test_pickles_that_run_code_are_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    zipped = tmp_path / "evil.pth"
    torch.save({"state_dict": {"gamma": torch.zeros(2)}, "payload": _Evil()}, zipped)
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps({"state_dict": _Evil()}, protocol=2))
    for path, match in ((zipped, "refused: loading it would execute code"),
                        (raw, "not a torch checkpoint: a plain pickle .* not unpickled")):  # fmt: skip
        with pytest.raises(CheckpointError, match=match) as err:
            dcf.load_checkpoint(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not (tmp_path / PWNED).exists()
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        dcf.load_checkpoint(zipped)


def test_torchscript_archive_with_code_is_never_run(tmp_path, monkeypatch):
    """A TorchScript archive whose data.pkl calls os.system: the restricted reader refuses the global."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil_ts.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__.py", "")
    from denseclip_fast.checkpoints.clip import read_clip_state_dict

    with pytest.raises(CheckpointError, match="refused: the TorchScript archive references posix.system"):
        read_clip_state_dict(path)
    assert not (tmp_path / PWNED).exists()


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()  # the GLOBAL opcode


def _pushed(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)[2:-1]  # the opcodes that push obj, without PROTO and STOP


_NESTED = b"}" + b"X\x01\x00\x00\x00a}" * 20000 + b"s" * 20000  # {'a': {'a': ... 20000 deep}}, no recursion
_CRAFTED = {
    "bad_rebuild_arguments": _global("torch._utils", "_rebuild_tensor_v2") + _pushed(("a", 0, "b", "c")) + b"R",
    "storage_called": _global("torch", "FloatStorage") + _pushed((1,)) + b"R",
    "build_on_a_dtype": _global("torch", "FloatStorage") + _pushed({"x": 1}) + b"b",
    "build_on_an_allowed_function": _global("torch.jit._pickle", "restore_type_tag")
    + _pushed((None, {"__defaults__": (1, 2)})) + b"b",
    "stack_underflow": b"s",
}


@pytest.mark.parametrize("case", sorted(_CRAFTED))
def test_crafted_torchscript_pickles_are_checkpoint_errors(tmp_path, case):
    """The restricted TorchScript reader let TypeError (bad arguments to an allowlisted function, a storage type
    called), AttributeError (BUILD on a dtype) and IndexError out, and a BUILD on an allowlisted function set its
    __defaults__ for the rest of the process. Each is now "not a valid checkpoint", and nothing is changed (an
    opcode taking more than the stack holds is seen before any unpickler runs: pickle_shape)."""
    from denseclip_fast.checkpoints import io as checkpoint_io

    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + _CRAFTED[case] + b".")
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__.py", "")
    reason = "its pickle is malformed" if case == "stack_underflow" else "its TorchScript archive could not be decoded"
    with pytest.raises(CheckpointError, match=f"not a valid checkpoint: {reason}"):
        dcf.load_checkpoint(path)
    assert checkpoint_io._first.__defaults__ is None and checkpoint_io._rebuild_tensor.__defaults__ is None


def _with_data_pkl(buf: io.BytesIO, path, edit):
    """A copy at ``path`` of the torch zip file in ``buf`` whose data.pkl is ``edit(data.pkl's bytes)``."""
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as z:
        for name in src.namelist():
            data = src.read(name)
            z.writestr(name, edit(data) if name.endswith("/data.pkl") else data)
    return path


@pytest.mark.parametrize("case", ["bad_rebuild_arguments", "stack_underflow"])
def test_crafted_torch_pickles_are_checkpoint_errors(tmp_path, case):
    """torch.load(weights_only=True) lets AttributeError and IndexError out of a crafted zip; its UnpicklingError for
    other objects advises weights_only=False, which the message must not repeat."""
    buf = io.BytesIO()
    torch.save({"gamma": torch.zeros(2)}, buf)
    path = _with_data_pkl(buf, tmp_path / "crafted.pth", lambda _: b"\x80\x02" + _CRAFTED[case] + b".")
    reason = "its pickle is malformed" if case == "stack_underflow" else "it could not be read as a torch file"
    with pytest.raises(CheckpointError, match=f"not a valid checkpoint: {reason}"):
        dcf.load_checkpoint(path)
    _with_data_pkl(buf, path, lambda _: b"\x80\x02}" + _pushed({"x": 1}) + b"b.")
    with pytest.raises(CheckpointError, match="not a valid checkpoint: it holds objects other than tensors") as err:
        dcf.load_checkpoint(path)
    assert "weights_only" not in str(err.value)


def test_torchscript_nesting_and_cycles_are_read_without_recursion(tmp_path):
    """20000 nested dicts were a RecursionError in _flatten (and a cycle would have been one too); the nesting is now
    refused past 512 levels before any unpickler runs (pickle_shape; _flatten's own bound, 256 levels of names, is
    test_deep_torchscript_names_are_bounded's), without recursion either."""
    cyclic = b"}q\x00X\x01\x00\x00\x00ah\x00s"  # d = {}; d['a'] = d
    for data, match in ((_NESTED, "not a valid checkpoint: its pickle nests containers more than 512 deep"),
                        (cyclic, "the TorchScript archive holds no tensors")):  # fmt: skip
        path = tmp_path / "nested.pt"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02" + data + b".")
            z.writestr("archive/code/__torch__.py", "")
        with pytest.raises(CheckpointError, match=match):
            dcf.load_checkpoint(path)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "the file is empty"),
        (b"hello, this is text\n", "not a checkpoint: unrecognised format"),
        (b"\x08\n\x12\x07pytorch\x1a\x052.14", r"this looks like an ONNX graph \(export --format onnx\), not a"),
    ],
)
def test_non_checkpoints(tmp_path, content, match):
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        dcf.load_checkpoint(path)
    path = path.rename(tmp_path / "file.onnx")  # an ONNX graph by name, whatever its first bytes say
    with pytest.raises(CheckpointError, match="the file is empty" if not content else "looks like an ONNX graph"):
        dcf.load_checkpoint(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_pickle_is_named_as_such_and_not_unpickled(tmp_path, protocol, monkeypatch):
    """pickle.dump's files (a state dict of tensors, or of anything) were "could not be read as a torch file
    (RuntimeError: Invalid magic number ...)" or said to be torch files of protocol 4; now named as plain pickles,
    refused before any unpickling (torch.load is not reached), where torch.save's legacy files of every protocol
    still load."""
    import pickle

    path = tmp_path / "plain.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(2)}, f, protocol=protocol)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(CheckpointError, match=r": not a torch checkpoint: a plain pickle \(pickle\.dump\), which "
                                              r"torch\.save does not write; it is not unpickled"):  # fmt: skip
        dcf.load_checkpoint(path)
    monkeypatch.undo()
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, pickle_protocol=min(protocol, 2), _use_new_zipfile_serialization=False)
    from denseclip_fast.checkpoints.io import read_weight_file

    assert read_weight_file(legacy).obj["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_torch_file_of_pickle_protocol_4_is_named_as_such(tmp_path, zip_format):
    """torch's safe loader cannot read protocol 4's framing: the file is said to be of that protocol, with what to do
    (it read as holding "objects other than tensors ... or its pickle is malformed (Unsupported operand 149)"), and
    torch's warning asking to file an issue is not passed on."""
    path = tmp_path / "p4.pth"
    torch.save({"w": torch.zeros(2)}, path, pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"written with pickle protocol 4 or later \(torch.save's pickle_pro"):
            dcf.load_checkpoint(path)


def test_safetensors_file_cut_inside_its_header(tmp_path, native_file):
    """Was "not a checkpoint: unrecognised format" (the header length said more bytes than the file has)."""
    data = native_file.read_bytes()
    for size in (9, 60):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=rf"truncated or corrupt safetensors file: its header should be "
                                                  rf"\d+ bytes but the file has {size} bytes in all"):  # fmt: skip
            dcf.load_checkpoint(path)


def test_truncated_files(tmp_path, official_file):
    data = official_file.read_bytes()
    zipped = tmp_path / "truncated.pth"
    zipped.write_bytes(data[: len(data) // 2])
    buf = io.BytesIO()
    torch.save({"gamma": torch.zeros(100)}, buf, _use_new_zipfile_serialization=False)
    legacy = tmp_path / "truncated_legacy.pth"
    legacy.write_bytes(buf.getvalue()[:200])
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            dcf.load_checkpoint(path)
        assert "\n" not in str(err.value)


def test_damage_inside_a_tensor_is_refused_by_the_archives_crc(tmp_path, official_file):
    """torch.load does not check a zip entry's CRC-32: bytes damaged inside a tensor's data loaded as wrong weights.
    The reader checks every entry first and names the damaged one."""
    state = torch.load(official_file, weights_only=True)
    name = "decode_head.conv_seg.weight"
    head = state["state_dict"][name]
    state["state_dict"][name] = torch.arange(1000.0, 1000.0 + head.numel()).reshape(head.shape)
    intact = tmp_path / "intact.pth"
    torch.save(state, intact)
    data = bytearray(intact.read_bytes())
    at = data.find(struct.pack("<4f", 1000.0, 1001.0, 1002.0, 1003.0))
    assert at > 0 and data.find(struct.pack("<4f", 1000.0, 1001.0, 1002.0, 1003.0), at + 1) == -1
    data[at + 4 : at + 8] = struct.pack("<f", 7.0)  # the head's second weight, 1001, now reads 7
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    assert dcf.load_checkpoint(intact).state_dict()[name].flatten()[1] == 1001.0
    with pytest.raises(CheckpointError, match=r"damaged.pth: corrupt: its entry '.*/data/\d+' fails the CRC-32 check"):
        dcf.load_checkpoint(damaged)


def test_a_loaded_model_owns_its_weights_whatever_views_the_file_saved(tmp_path, official_file, monkeypatch):
    """load_checkpoint gives the model the file's tensors themselves where they can be its own (contiguous, alone on
    their storage, covering it and aligned as torch's: no second copy of the weights); views sharing one storage,
    one tensor under two keys, a slice of a larger storage, a transposed tensor and float16 tensors are copied into
    float32 tensors of their own, values kept. A safetensors file's are kept too, unless the library read them."""
    state = _state(official_file)
    sd = state["state_dict"]
    expected = {k: v.clone() for k, v in sd.items()}
    weight, bias = "decode_head.conv_seg.weight", "decode_head.conv_seg.bias"
    joined = torch.cat([sd[weight].flatten(), sd[bias]])  # two keys, one storage
    sd[weight], sd[bias] = joined[: sd[weight].numel()].view(sd[weight].shape), joined[sd[weight].numel() :]
    sliced = "backbone.conv1.weight"  # the head of a larger storage
    sd[sliced] = torch.cat([sd[sliced].flatten(), torch.full((1000,), 7.0)])[: sd[sliced].numel()].view_as(sd[sliced])
    transposed = "contexts"
    sd[transposed] = sd[transposed].transpose(1, 2).contiguous().transpose(1, 2)
    halved = "backbone.conv2.weight"
    sd[halved] = sd[halved].half()
    expected[halved] = sd[halved].float()
    tied, twin = "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.conv3.weight"  # one tensor, two keys
    sd[tied] = sd[twin]
    expected[tied] = expected[twin]
    path = tmp_path / "views.pth"
    torch.save(state, path)
    model = dcf.load_checkpoint(path)
    loaded = model.state_dict()
    assert not sd[transposed].is_contiguous() and sd[weight].untyped_storage().data_ptr() == sd[bias].data_ptr() - (
        sd[weight].nbytes)  # the file holds what was meant
    pointers = set()
    for key, value in expected.items():
        tensor = loaded[key]
        assert torch.equal(tensor, value.float() if value.is_floating_point() else value), key
        assert tensor.dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        storage = tensor.untyped_storage()
        assert tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes, key
        assert tensor.data_ptr() % 64 == 0, key
        assert tensor.numel() == 0 or storage.data_ptr() not in pointers, key
        pointers.add(storage.data_ptr())
    with torch.no_grad():
        model.decode_head.conv_seg.weight.fill_(3.0)
    assert torch.equal(model.decode_head.conv_seg.bias, expected[bias])
    # the file's own tensors where they could be kept: the very memory torch.load gave
    weights = read_weight_file(path)
    kept = load_weights(weights, str(path), None, None).state_dict()
    file_pointers = {t.data_ptr() for t in weights.obj["state_dict"].values()}
    untouched = [k for k in expected if k not in (weight, bias, sliced, transposed, halved, tied, twin)]
    assert untouched and all(kept[k].data_ptr() in file_pointers for k in untouched)
    # a safetensors file's tensors, read straight into memory torch allocates: kept too
    native_path = tmp_path / "native.safetensors"
    model.save(native_path)
    native_weights = read_weight_file(native_path)
    native = load_weights(native_weights, str(native_path), None, None).state_dict()
    assert native_weights.owned and all(torch.equal(t, model.state_dict()[k]) for k, t in native.items())
    assert {t.data_ptr() for t in native.values()} <= {t.data_ptr() for t in native_weights.tensors.values()}
    # read by the safetensors library (a dtype io does not map; here none is), whose tensors start anywhere on 8
    # bytes: every one copied, into memory aligned as torch's
    monkeypatch.setattr(checkpoint_io, "SAFETENSORS_DTYPES", {})
    library_weights = read_weight_file(native_path)
    assert not library_weights.owned and {t.data_ptr() % 64 for t in library_weights.tensors.values()} != {0}
    native = load_weights(library_weights, str(native_path), None, None).state_dict()
    assert all(t.data_ptr() % 64 == 0 and torch.equal(t, model.state_dict()[k]) for k, t in native.items())
    assert not {t.data_ptr() for t in native.values()} & {t.data_ptr() for t in library_weights.tensors.values()}


def test_a_safetensors_header_that_names_a_tensor_twice_is_refused(tmp_path):
    """The safetensors library reads a header that names a tensor twice, keeping one of the entries (here the same
    bytes as float32 or as int32: which is the reader's business); the reader refuses it, naming the file."""
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = b'{"a":' + entry + b',"a":' + entry.replace(b"F32", b"I32") + b"}"  # the same bytes, two meanings
    header += b" " * (-len(header) % 8)
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.5))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # the library reads it
        assert list(f.keys()) == ["a"]
    with pytest.raises(CheckpointError, match=r"twice.safetensors: corrupt safetensors header \(a name appears twice"):
        read_weight_file(path)


def test_a_safetensors_files_tensors_are_read_in_its_order_behind_given_back_pages(tmp_path, monkeypatch):
    """io reads a native file's tensors from one mapping in the order of their bytes (the library's key order is
    another: safetensors sorts by alignment, then name), giving back the pages behind each copy (madvise, here after
    every tensor: the pages from the file's start, each once, up to the last whole page the copies passed); tensors
    spanning pages and sharing them, of every dtype and empty ones, come out as saved, under their own names, in the
    library's key order."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "z.big": torch.randn(3 * mmap.PAGESIZE // 4 + 5, generator=generator),  # over pages, ends inside one
        "a.half": torch.randn(mmap.PAGESIZE, 3, generator=generator).half(),  # after it in the file: 6 more pages
        "m.bf16": torch.randn(1, generator=generator).bfloat16(),
        "b.ints": torch.arange(-5, 6, dtype=torch.int64),
        "k.bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "c.empty": torch.zeros(0, 4),
        "y.small": torch.randn(2, generator=generator),
    }  # fmt: skip
    path = tmp_path / "order.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    offsets = []
    copy = checkpoint_io._FileCopies.copy

    def recorded(self, offset, into):
        offsets.append(offset)
        copy(self, offset, into)

    given_back: list[tuple[int, int]] = []

    class Recording(mmap.mmap):
        def madvise(self, option, start, length):
            given_back.append((start, length))
            return super().madvise(option, start, length)

    monkeypatch.setattr(checkpoint_io._FileCopies, "copy", recorded)
    monkeypatch.setattr(checkpoint_io, "DROP_EVERY", 1)  # every page behind a copy given back at once
    monkeypatch.setattr(mmap, "mmap", Recording)
    weights = read_weight_file(path)
    monkeypatch.undo()
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + length])
    in_file = sorted((k for k in keys if tensors[k].numel()), key=lambda k: header[k]["data_offsets"][0])
    assert in_file != [k for k in keys if tensors[k].numel()]  # the case: the file's order is not the keys'
    assert offsets == [8 + length + header[k]["data_offsets"][0] for k in in_file]  # read in the file's order
    last = 8 + length + max(header[k]["data_offsets"][1] for k in keys)
    assert len(given_back) > 1 and given_back[0][0] == 0
    assert all(start + size == after for (start, size), (after, _) in zip(given_back, given_back[1:]))
    assert sum(size for _, size in given_back) == last - last % mmap.PAGESIZE
    assert weights.owned and list(weights.tensors) == keys
    for key, value in tensors.items():
        assert weights.tensors[key].dtype == value.dtype and torch.equal(weights.tensors[key], value), key


def _raw_safetensors(path, header: dict, data: bytes, pad: bool = True) -> str:
    """A safetensors file written by hand: ``header`` as JSON (padded with spaces to 8 bytes unless ``pad`` is
    False), then ``data``."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8) if pad else b""
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("name", sorted(checkpoint_io.SAFETENSORS_DTYPES))
def test_every_safetensors_dtype_io_reads_comes_out_as_the_library_reads_it(tmp_path, name):
    """Each dtype io maps to torch's, and so reads itself (not through the library), gives the dtype and the bytes
    the safetensors library gives for the same entry. Bytes with their high bit set: a wrong entry of the same item
    size (U16 as int16, BOOL as uint8, I32 as uint32, F64 as int64, the two float8s swapped) read other values
    without a word, and the suite's files held F32, F16, BF16, I64 and U8 only."""
    from safetensors import safe_open

    itemsize = torch.empty(0, dtype=checkpoint_io.SAFETENSORS_DTYPES[name]).element_size()
    if name == "BOOL":
        data = bytes([1, 0, 0, 1, 1, 0])
    else:
        data = bytes(torch.randint(128, 256, (6 * itemsize,), generator=torch.Generator().manual_seed(1)).tolist())
    entry = {"t": {"dtype": name, "shape": [2, 3], "data_offsets": [0, len(data)]}}
    path = _raw_safetensors(tmp_path / "dtype.safetensors", entry, data)
    with safe_open(path, "pt") as f:
        expected = f.get_tensor("t")
    weights = read_weight_file(path)
    assert weights.owned  # read by io
    got = weights.tensors["t"]
    assert got.dtype == expected.dtype and got.shape == expected.shape == (2, 3)
    assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize(
    "entry, data",
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, 4),  # ends past the data (a file cut since)
        ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, 8),  # starts inside, ends past
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}, 8),  # more bytes than its shape holds
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, 4),  # fewer
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}, 4),  # three offsets
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, 4),  # reversed
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, 4),  # a negative size
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, 4),  # a bool for a size
        ({"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}, 4),  # a float offset
        ({"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}, 4),  # no list
    ],
)
def test_a_header_entry_that_does_not_fit_its_data_is_refused_before_any_read(tmp_path, monkeypatch, entry, data):
    """io checks the header's entries again before reading (the library checked the file it opened, which may have
    changed since; a library that checks less): an entry outside the data, or of another size than its shape and
    dtype, is a CheckpointError naming the tensor and the data's size, and nothing is copied. Through
    read_weight_file the library refuses such a header first, so the reader is called directly."""
    path = _raw_safetensors(tmp_path / "bad.safetensors", {"t": entry}, bytes(data))
    copied = []
    copy = checkpoint_io._FileCopies.copy
    monkeypatch.setattr(checkpoint_io._FileCopies, "copy", lambda self, offset, into: copied.append(offset) or copy(
        self, offset, into))  # fmt: skip
    with pytest.raises(CheckpointError, match=rf"bad.safetensors: corrupt safetensors header: the entry of 't' .* "
                                              rf"does not fit its {data} bytes of data"):  # fmt: skip
        checkpoint_io._read_safetensors_data(path, ["t"], path)
    assert copied == []


def test_a_safetensors_header_is_read_whole_padded_or_not(tmp_path):
    """The format pads its JSON header with spaces to 8 bytes, but a header of any length is a header: io reads all
    of it, as the library does (an unpadded one whose JSON is a multiple of 8 long, and one of an odd length)."""
    for extra in range(8):  # a name that makes the JSON a multiple of 8 bytes long
        header = {"t" + "x" * extra: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
        if len(json.dumps(header, separators=(",", ":"))) % 8 == 0:
            break
    path = _raw_safetensors(tmp_path / "unpadded.safetensors", header, struct.pack("<2f", 1.5, -2.0), pad=False)
    weights = read_weight_file(path)
    assert weights.owned and torch.equal(next(iter(weights.tensors.values())), torch.tensor([1.5, -2.0]))
    entry = {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = _raw_safetensors(tmp_path / "odd.safetensors", entry, struct.pack("<f", 3.0), pad=False)
    assert torch.equal(read_weight_file(path).tensors["t"], torch.tensor([3.0]))


def test_pages_are_given_back_once_drop_every_bytes_are_behind_and_the_mapping_is_closed(tmp_path, monkeypatch):
    """With DROP_EVERY one page and tensors of one page each, each copy after the first gives back the page it
    passed (the release comes when DROP_EVERY bytes are behind, not one copy later); the one mapping is closed once
    the tensors are read."""
    from safetensors.torch import save_file

    page = mmap.PAGESIZE
    tensors = {f"t{i}": torch.full((page,), i + 1, dtype=torch.uint8) for i in range(4)}
    path = tmp_path / "pages.safetensors"
    save_file(tensors, str(path))
    given_back, mappings = [], []

    class Recording(mmap.mmap):
        def __init__(self, *args, **kwargs):
            mappings.append(self)

        def madvise(self, option, start, length):
            given_back.append((start, length))
            return super().madvise(option, start, length)

    monkeypatch.setattr(checkpoint_io, "DROP_EVERY", page)
    monkeypatch.setattr(mmap, "mmap", Recording)
    weights = read_weight_file(path)
    monkeypatch.undo()
    assert len(given_back) == 4 and given_back[0][0] == 0
    assert [size for _, size in given_back[1:]] == [page] * 3
    assert len(mappings) == 1 and mappings[0].closed
    assert all(torch.equal(weights.tensors[k], v) for k, v in tensors.items())


def test_a_native_file_replaced_while_it_is_read_gives_one_files_metadata_and_tensors(tmp_path, monkeypatch):
    """The library reads the metadata and io the tensors: a file renamed over the path between the two (a training
    run replacing its checkpoint) gave the old file's metadata (class names, CRC-32s) with the new file's tensors,
    refused as corrupt at best and with verify=False loaded as a mixture. Both now read one open file (Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd: each reader opens the path")
    first, second = DenseCLIP(tiny_config("resnet"), ["sky", "road"]), DenseCLIP(tiny_config("resnet"), ["sea", "sand"])
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    path, newer = tmp_path / "latest.safetensors", tmp_path / "newer.safetensors"
    first.save(path)
    second.save(newer)
    read = checkpoint_io._read_safetensors_data

    def replaced_meanwhile(opened, names, shown):
        if newer.exists():
            os.replace(newer, path)
        return read(opened, names, shown)

    monkeypatch.setattr(checkpoint_io, "_read_safetensors_data", replaced_meanwhile)
    for verify in (True, False):
        model = dcf.load_checkpoint(path, verify=verify)
        expected = first if verify else second  # the second load reads the file now at the path
        assert model.class_names == expected.class_names
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert not newer.exists()


def _torch_file(path, fmt: str, value: float) -> None:
    """A weight file of ``fmt`` ('zip', 'legacy': torch.save's formats; 'torchscript': a torch.jit.save archive)
    whose tensors all hold ``value``."""
    module = _TiedModule()
    with torch.no_grad():
        for t in module.state_dict().values():
            t.fill_(value)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(module).save(str(path))
    else:
        torch.save({"state_dict": module.state_dict()}, path, _use_new_zipfile_serialization=fmt == "zip")


@pytest.mark.parametrize("fmt", ["zip", "legacy", "torchscript"])
def test_a_torch_file_replaced_while_it_is_read_is_read_whole_from_the_first(tmp_path, monkeypatch, fmt):
    """A .pth/.pt file's readers (zipfile's directory, the CRC-32 thread, the pickle check, torch.load, the
    TorchScript reader) each opened the path: a file renamed over it after the first had read (a training run
    replacing its checkpoint) was checked on one file and loaded from the other, refused as corrupt (its directory's
    offsets) or loaded unchecked. Now every reader reads the one file opened first (Linux's /proc/self/fd)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd: each reader opens the path")
    path, newer = tmp_path / "latest.pth", tmp_path / "newer.pth"
    _torch_file(path, fmt, 1.0)
    _torch_file(newer, fmt, 2.0)
    with open(newer, "rb") as f:  # a different file, not the same bytes
        assert f.read() != path.read_bytes()

    def replace_after(function):
        def replaced(*args):
            result = function(*args)
            if newer.exists():
                os.replace(newer, path)
            return result

        return replaced

    # the first reads: the zip directory (zip, TorchScript); the legacy file's first pickle check
    monkeypatch.setattr(checkpoint_io, "_zip_entries", replace_after(checkpoint_io._zip_entries))
    monkeypatch.setattr(checkpoint_io, "check_pickle", replace_after(checkpoint_io.check_pickle))
    read = read_weight_file(path)
    assert not newer.exists(), "the file was not replaced while it was read"
    tensors = read.tensors if fmt == "torchscript" else read.obj["state_dict"]
    assert tensors.keys() >= {"linear.weight", "norm.running_mean"}
    assert all(torch.all(t == 1.0) for t in tensors.values() if t.is_floating_point()), "not the first file's"
    again = read_weight_file(path)  # the file now at the path: the second one
    tensors = again.tensors if fmt == "torchscript" else again.obj["state_dict"]
    assert all(torch.all(t == 2.0) for t in tensors.values() if t.is_floating_point())


def test_a_path_that_stops_being_a_regular_file_before_it_is_opened_is_refused(tmp_path, monkeypatch):
    """read_weight_file looks at the path, then opens it once for every reader: what is there by then is what counts.
    A FIFO put there meanwhile is refused as not a file (it was called empty: its size, 0, was asked of the path),
    and not waited on (a plain open() of a FIFO blocks until a writer comes); a file removed meanwhile is not
    found."""
    fifo, gone = tmp_path / "pipe.pth", tmp_path / "gone.pth"
    os.mkfifo(fifo)
    monkeypatch.setattr(checkpoint_io.os.path, "isfile", lambda p: True)  # as if a regular file had been there
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_weight_file(fifo)
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():
        with open(fifo, "wb"):  # let the reader go
            pass
        pytest.fail("read_weight_file waited on a FIFO for a writer")
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointError), outcome
    assert str(outcome[0]) == f"{fifo}: not a file"
    monkeypatch.setattr(checkpoint_io.os.path, "exists", lambda p: True)
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{gone}: no such file")):
        read_weight_file(gone)


def test_reading_a_native_file_raises_no_read_only_buffer_warning(tmp_path):
    """The mapping is private and writable because torch.frombuffer warns (once a process) of a read-only buffer: a
    fresh process reading a safetensors file through io sees no warning."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"t": torch.arange(10.0)}, str(path))
    code = ("import warnings, torch\nfrom denseclip_fast.checkpoints.io import read_weight_file\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            f"    assert read_weight_file({str(path)!r}).owned\n"
            "print('warnings:', [str(x.message)[:80] for x in w])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warnings: []" in out, out


def _damaged_tensor_file(tmp_path, official_file):
    """A copy of ``official_file`` with one byte of a tensor's data changed (its zip entry's CRC-32 now fails)."""
    data = bytearray(official_file.read_bytes())
    with zipfile.ZipFile(official_file) as z:
        entry = max(z.infolist(), key=lambda e: e.file_size)  # a tensor's storage
        stored = z.read(entry)
    at = data.find(stored)
    assert at > 0
    data[at + 5] ^= 0x40
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    return damaged


def test_the_archives_crcs_are_checked_while_torch_load_reads_it(tmp_path, official_file, monkeypatch):
    """The zip entries' CRC-32s are checked in a thread of their own while the pickle is checked and torch.load reads
    the file (more time than torch.load for RN50 when they came first: benchmarks/results/checkpoint_read_*.md), and
    what torch.load returned is handed on only once they passed. Here the CRC check waits for torch.load to have
    returned: run before it, it would time out; a failing CRC must still refuse the file."""
    from denseclip_fast.checkpoints import io as checkpoint_io

    real_load, real_crcs = checkpoint_io._torch_load, checkpoint_io._check_crcs
    loaded = threading.Event()
    threads = []

    def load_then_tell(opened, path, size):
        result = real_load(opened, path, size)
        loaded.set()
        return result

    def crcs_after_load(opened, path, entries):
        threads.append(threading.current_thread())
        if not loaded.wait(30):
            raise AssertionError("the CRC-32s were checked before torch.load ran, not beside it")
        real_crcs(opened, path, entries)

    monkeypatch.setattr(checkpoint_io, "_torch_load", load_then_tell)
    monkeypatch.setattr(checkpoint_io, "_check_crcs", crcs_after_load)
    assert dcf.load_checkpoint(official_file).class_names == NAMES
    damaged = _damaged_tensor_file(tmp_path, official_file)
    loaded.clear()
    with pytest.raises(CheckpointError, match=r"damaged.pth: corrupt: its entry '.*/data/\d+' fails the CRC-32 check"):
        dcf.load_checkpoint(damaged)
    assert len(threads) == 2 and threading.current_thread() not in threads


def test_a_file_saved_without_crcs_loads_unchecked_and_one_zeroed_crc_is_damage(tmp_path, official_file):
    """torch.save after torch.serialization.set_crc32_options(False) records 0 as every entry's CRC-32: such a file
    has no checksums and loads (unchecked, as a legacy file; it was refused as damaged); one entry's CRC-32 alone
    read as 0 (the others kept) is damage, refused as before."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch writes every CRC-32")
    state = torch.load(official_file, weights_only=True)
    path = tmp_path / "no_crcs.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as z:
        assert {e.CRC for e in z.infolist()} == {0}
    assert dcf.load_checkpoint(path).class_names == NAMES
    intact = tmp_path / "intact.pth"
    torch.save(state, intact)
    for which in ("first", "last"):  # the central headers' first and last: a CRC-32 at byte 16 of each
        data = bytearray(intact.read_bytes())
        at = data.find(b"PK\x01\x02") if which == "first" else data.rfind(b"PK\x01\x02")
        assert struct.unpack("<I", data[at + 16 : at + 20])[0] != 0
        data[at + 16 : at + 20] = bytes(4)
        zeroed = tmp_path / "zeroed.pth"
        zeroed.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=r"zeroed.pth: corrupt: its entry '.*' fails the CRC-32 check"):
            dcf.load_checkpoint(zeroed)


def test_a_damaged_pickle_is_named_by_the_archives_crc(tmp_path):
    """A data.pkl damaged after saving (here cut short by its last byte, the STOP opcode) fails both its CRC-32 and
    the pickle check, which run side by side: the error names the damage (the CRC), whichever finished first."""
    path = tmp_path / "damaged.pth"
    torch.save({"gamma": torch.zeros(2)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    at = data.find(pickled)
    assert at > 0 and pickled.endswith(b".")
    data[at + len(pickled) - 1] = ord("N")  # NONE instead of STOP: the pickle ends without its STOP
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged.pth: corrupt: its entry '.*/data.pkl' fails the CRC-32 check"):
        dcf.load_checkpoint(path)


def _central_record(data: bytes | bytearray, name: str) -> int:
    """Where the zip central directory's record of entry ``name`` begins in ``data``."""
    for match in re.finditer(b"PK\x01\x02", bytes(data)):
        at = match.start()
        (length,) = struct.unpack("<H", data[at + 28 : at + 30])
        if data[at + 46 : at + 46 + length] == name.encode():
            return at
    raise KeyError(name)


def _local_name_changed(path, suffix: str):
    """``path`` rewritten with the last letter of the local header's name of its entry ending in ``suffix`` made X
    (the central directory unchanged); returns that entry's name."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        entry = next(e for e in z.infolist() if e.filename.endswith(suffix))
    at = entry.header_offset + 30 + len(entry.filename) - 1
    assert data[entry.header_offset : entry.header_offset + 4] == b"PK\x03\x04" and data[at] != ord("X")
    data[at] = ord("X")
    path.write_bytes(bytes(data))
    return entry.filename


def test_a_tensor_entry_whose_local_header_names_another_is_refused(tmp_path, official_file):
    """A tensor's entry, not only data.pkl (which the pickle check reads too), is checked against its local header
    by the CRC pass: a file whose tensor entry's local header names another entry is refused, naming the entry; so
    is a file saved without CRC-32s whose data.pkl's local header does (the pickle reader's check, alone there)."""
    damaged = tmp_path / "local.pth"
    damaged.write_bytes(official_file.read_bytes())
    name = _local_name_changed(damaged, "/data/0")
    with pytest.raises(CheckpointError, match=rf"corrupt: its entry '{re.escape(name)}' has a local header that "
                                              "names another entry"):  # fmt: skip
        dcf.load_checkpoint(damaged)
    if not hasattr(torch.serialization, "set_crc32_options"):
        return
    unchecked = tmp_path / "no_crcs.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(torch.load(official_file, weights_only=True), unchecked)
    finally:
        torch.serialization.set_crc32_options(True)
    _local_name_changed(unchecked, "/data.pkl")
    with pytest.raises(CheckpointError, match="names another entry"):
        dcf.load_checkpoint(unchecked)


def test_an_entry_running_past_the_end_of_the_file_is_refused_not_waited_on(tmp_path, official_file):
    """An entry whose declared size (no more than the file's, so not refused up front) runs past the file's end:
    the CRC pass stops at the end (a read of 0 bytes: EOFError, never a loop waiting for more) and the load is
    refused, for a tensor's entry (torch.load's error) and for data.pkl (the pickle reader's). In a child process
    with a time limit: a CRC thread stuck in that loop would also hold the test process at its exit."""
    paths = []
    for suffix in ("/data/0", "/data.pkl"):
        data = bytearray(official_file.read_bytes())
        with zipfile.ZipFile(official_file) as z:
            entry = next(e for e in z.infolist() if e.filename.endswith(suffix))
        record = _central_record(data, entry.filename)
        size = len(data) - entry.header_offset  # from its local header to the file's end: past it from its data
        data[record + 20 : record + 28] = struct.pack("<II", size, size)  # compressed and uncompressed sizes
        path = tmp_path / f"past_end_{len(paths)}.pth"
        path.write_bytes(bytes(data))
        paths.append(str(path))
    script = (
        "import sys, zipfile, denseclip_fast as dcf\n"
        "from denseclip_fast.checkpoints import io\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        io._first_failing_entry(path, zipfile.ZipFile(path).infolist())\n"
        "        print('no EOFError')\n"
        "    except EOFError:\n"
        "        print('EOFError')\n"
        "    try:\n"
        "        dcf.load_checkpoint(path)\n"
        "        print('loaded')\n"
        "    except dcf.CheckpointError as exc:\n"
        "        print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *paths], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == lines[2] == "EOFError", done.stdout
    assert "truncated or corrupt" in lines[1] and "archive ends early" in lines[1], done.stdout
    assert re.search(r"could not be read \(EOFError: entry '.*/data.pkl' ends after \d+ of its \d+ bytes", lines[3])


def test_a_local_header_cut_short_by_the_end_of_the_file_is_named(tmp_path, official_file):
    """A directory record pointing at a local header that the file's end cuts short (here its last 4 bytes, a zip
    comment reading PK\\x03\\x04) names the entry, as testzip does, instead of raising struct.error."""
    path = tmp_path / "cut.pth"
    path.write_bytes(official_file.read_bytes())
    with zipfile.ZipFile(path, "a") as z:
        z.comment = b"PK\x03\x04"
    data = bytearray(path.read_bytes())
    assert data.endswith(b"PK\x03\x04")
    with zipfile.ZipFile(path) as z:
        name = next(e.filename for e in z.infolist() if e.filename.endswith("/data/0"))
    record = _central_record(data, name)
    data[record + 42 : record + 46] = struct.pack("<I", len(data) - 4)  # its local header's offset
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        entries = z.infolist()
    assert checkpoint_io._first_failing_entry(str(path), entries) == (
        name, "has no local header where the archive's directory puts it")
    with pytest.raises(CheckpointError, match=rf"its entry '{re.escape(name)}' has no local header"):
        dcf.load_checkpoint(path)


def test_entry_names_decode_as_testzip_decodes_them(tmp_path):
    """A name without the UTF-8 flag is cp437 (zipfile's reading): such an entry passes as it passes testzip; a
    local header whose UTF-8 flag was cleared (the directory's kept) names another entry for both."""
    plain = tmp_path / "cp437.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/dXta/1", b"x" * 7)
    plain.write_bytes(buf.getvalue().replace(b"dXta", b"d\x84ta"))  # cp437's a-umlaut, no UTF-8 flag
    with zipfile.ZipFile(plain) as z:
        entries = z.infolist()
        assert entries[0].filename == "archive/d\u00e4ta/1" and not entries[0].flag_bits & 0x800
        assert z.testzip() is None
    assert checkpoint_io._first_failing_entry(str(plain), entries) is None
    flagged = tmp_path / "flag.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/d\u00e4t\u00e4/1", b"x" * 7)
    data = bytearray(buf.getvalue())
    assert data[7] & 0x08  # the local header's flags' high byte: 0x800, UTF-8
    data[7] &= ~0x08
    flagged.write_bytes(bytes(data))
    with zipfile.ZipFile(flagged) as z:
        entries = z.infolist()
        assert z.testzip() == "archive/d\u00e4t\u00e4/1"
    assert checkpoint_io._first_failing_entry(str(flagged), entries) == (
        "archive/d\u00e4t\u00e4/1", "has a local header that names another entry")


def test_crc_passes_over_files_at_once_share_no_buffer(tmp_path, monkeypatch):
    """Each _first_failing_entry call reads into a buffer of its own: calls on two files at once in four threads
    (4 KiB chunks, 256 entries' worth of reads each) all find both intact."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(checkpoint_io, "ZIP_CHUNK", 4096)
    paths, entries = [], []
    for seed in range(2):
        path = tmp_path / f"f{seed}.pth"
        torch.save({"w": torch.randn(2**18, generator=torch.Generator().manual_seed(seed))}, path)
        with zipfile.ZipFile(path) as z:
            paths.append(str(path))
            entries.append(z.infolist())
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda i: checkpoint_io._first_failing_entry(paths[i % 2], entries[i % 2]), range(16)))
    assert found == [None] * 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_damage_inside_a_native_files_tensor_is_refused_by_its_crc(tmp_path, dtype, monkeypatch):
    """safetensors stores no checksum: a bit flipped inside a tensor of a native file loaded as a wrong weight.
    DenseCLIP.save records a CRC-32 of the tensors' bytes in the metadata; load_checkpoint checks it."""
    model = DenseCLIP(tiny_config("resnet"), ["sky", "road", "car"]).to(dtype)
    name = "decode_head.conv_seg.weight"
    head = model.state_dict()[name]
    with torch.no_grad():  # values whose bytes occur once in the file
        head.copy_(torch.arange(1000.0, 1000.0 + head.numel()).reshape(head.shape))
    intact = tmp_path / "intact.safetensors"
    model.save(intact)
    data = bytearray(intact.read_bytes())
    pattern = torch.tensor([1000.0, 1001.0, 1002.0, 1003.0], dtype=dtype).view(torch.uint8).numpy().tobytes()
    at = data.find(pattern)
    assert at > 0 and data.find(pattern, at + 1) == -1
    data[at + len(pattern) - 1] ^= 0x01  # one bit of the fourth weight
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    assert torch.equal(dcf.load_checkpoint(intact).state_dict()[name], head)  # bfloat16 holds 1004 for 1003
    with pytest.raises(CheckpointError, match=rf"damaged.safetensors: corrupt: 1 tensor\(s\) fail the CRC-32 "
                                              rf"recorded in the file \({name}\): its bytes are not"):  # fmt: skip
        dcf.load_checkpoint(damaged)
    # verify=False: the tensors unchecked (a file the caller trusts): the damaged weight loads as it is, and the
    # tensors' CRC-32s are not computed at all; the metadata's CRC still is
    from denseclip_fast.checkpoints import native

    computed = []
    real = native.tensor_crc32s
    monkeypatch.setattr(native, "tensor_crc32s", lambda tensors: computed.append(len(tensors)) or real(tensors))
    loaded = dcf.load_checkpoint(damaged, verify=False).state_dict()[name]
    assert not torch.equal(loaded, head) and loaded.flatten()[4:].equal(head.flatten()[4:]) and computed == []
    assert torch.equal(dcf.load_checkpoint(intact, verify=True).state_dict()[name], head) and computed
    computed.clear()
    dcf.load_checkpoint(intact, verify=np.False_)  # a numpy bool is the bool it stands for
    assert computed == []
    meta_damaged = tmp_path / "meta.safetensors"
    meta_damaged.write_bytes(intact.read_bytes().replace(b'\\"road\\"', b'\\"roae\\"'))
    with pytest.raises(CheckpointError, match=r"its metadata \(architecture, class names, palette\) fails"):
        dcf.load_checkpoint(meta_damaged, verify=False)
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match=rf"verify must be True or False, got {re.escape(repr(bad))}"):
            dcf.load_checkpoint(intact, verify=bad)  # type: ignore[arg-type]


def test_every_damaged_tensor_of_a_native_file_is_counted(tmp_path, native_file):
    """Each tensor's CRC-32 is checked, the first in the file's order as the last: a file whose every non-empty
    floating-point tensor changed (the metadata and its record kept) is refused with all of them counted."""
    from safetensors.torch import save_file

    meta, sd = _native_parts(native_file)
    changed = [k for k, v in sd.items() if v.is_floating_point() and v.numel()]
    assert len(changed) > 10
    path = tmp_path / "every.safetensors"
    save_file({k: v + 1 if k in changed else v for k, v in sd.items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"corrupt: {len(changed)} tensor\(s\) fail the CRC-32"):
        dcf.load_checkpoint(path)


def test_a_native_files_crcs_are_the_documented_ones(native_file, monkeypatch):
    """The recorded CRC-32s are zlib's over each tensor's bytes as the file stores them, and over the other metadata
    entries (key NUL value NUL, keys sorted) as native.py's docstring says: computed here from the file's raw bytes,
    as another reader would; one thread or several give the same."""
    import zlib

    from denseclip_fast.checkpoints.native import tensor_crc32s

    data = native_file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    meta = header.pop("__metadata__")
    recorded = json.loads(meta.pop("crc32"))
    body = data[8 + length :]
    expected = {n: f"{zlib.crc32(body[slice(*h['data_offsets'])]):08x}" for n, h in header.items()}
    entries = b"".join(f"{k}\0{meta[k]}\0".encode() for k in sorted(meta))
    assert set(meta) == {"format", "format_version", "config", "class_names", "palette"}
    assert recorded == {**expected, "__metadata__": f"{zlib.crc32(entries):08x}"}
    sd = dcf.load_checkpoint(native_file).state_dict()
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert tensor_crc32s(sd) == expected


def test_damage_in_a_native_files_metadata_is_refused_by_its_crc(tmp_path, native_file):
    """A bit flipped in a class name (which no other check can tell from a name) or in the architecture."""
    data = native_file.read_bytes()
    for old, new in ((b'\\"road\\"', b'\\"roae\\"'), (b'\\"tau\\": 0.07', b'\\"tau\\": 0.06')):
        assert data.count(old) == 1, old
        damaged = tmp_path / "damaged.safetensors"
        damaged.write_bytes(data.replace(old, new))
        with pytest.raises(CheckpointError, match=r"damaged.safetensors: corrupt: its metadata \(architecture, class "
                                                  r"names, palette\) fails the CRC-32 recorded"):  # fmt: skip
            dcf.load_checkpoint(damaged)


@pytest.mark.parametrize("version", ["2", "0", "", "1.0"])
def test_a_native_file_of_another_format_version_is_refused(tmp_path, native_file, version):
    """Only format version "1" is read: a file of a later version may store its tensors or metadata otherwise (read
    as version 1 it could load as another model without an error). Its CRC-32 record agrees (written by a tool of
    that version): the version check itself refuses it."""
    assert dcf.load_checkpoint(_native_with(tmp_path, native_file, name="v1.safetensors", format_version="1"))
    with pytest.raises(CheckpointError, match=rf"denseclip_fast format version {version!r} is not supported "
                                              r"\(expected 1\)"):  # fmt: skip
        dcf.load_checkpoint(_native_with(tmp_path, native_file, format_version=version))


def test_tensors_another_tool_edited_renamed_or_added(tmp_path, native_file):
    """Edited tensors under the old record: refused, naming five of them and counting the rest, with the advice to
    drop the record. A renamed or added tensor is what load_state_strict names (missing and unexpected keys)."""
    from safetensors.torch import save_file

    meta, sd = _native_parts(native_file)
    floats = sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 0)[:7]
    edited = tmp_path / "edited.safetensors"
    save_file({**sd, **{k: sd[k] + 1 for k in floats}}, str(edited), metadata=meta)
    shown = ", ".join(floats[:5])
    with pytest.raises(CheckpointError, match=re.escape(f"corrupt: 7 tensor(s) fail the CRC-32 recorded in the file "
                                                        f"({shown} ... and 2 more)") + ".*remove its 'crc32' metadata"):
        dcf.load_checkpoint(edited)
    head = "decode_head.conv_seg.weight"
    renamed = {("decode_head.conv_seg.weighu" if k == head else k): v for k, v in sd.items()}
    save_file(renamed, str(edited), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {head}; unexpected keys \(1\): {head[:-1]}u"):
        dcf.load_checkpoint(edited)
    save_file({**sd, "extra": torch.zeros(2)}, str(edited), metadata=meta)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra"):
        dcf.load_checkpoint(edited)


def test_a_native_file_without_crcs_loads_and_a_malformed_record_is_refused(tmp_path, native_file):
    """Files written before the CRCs were recorded load unchecked; a record that is not a JSON object of 8 hex
    digits with the metadata's entry is header damage."""
    from safetensors.torch import save_file

    meta, sd = _native_parts(native_file)
    older = tmp_path / "older.safetensors"
    save_file(sd, str(older), metadata={k: v for k, v in meta.items() if k != "crc32"})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dcf.load_checkpoint(older)(x), dcf.load_checkpoint(native_file)(x))
    good = json.loads(meta["crc32"])
    name = sorted(good)[1]
    for bad in ([], {**good, name: "ABCDEF01"}, {**good, name: "1234567"}, {**good, name: 12345678},
                {k: v for k, v in good.items() if k != "__metadata__"}):  # fmt: skip
        expected = r"damaged denseclip_fast metadata: 'crc32' should be a JSON object of 8-hex-digit CRC-32s, "
        with pytest.raises(CheckpointError, match=expected + "'__metadata__' among them, got "):
            dcf.load_checkpoint(_native_with(tmp_path, native_file, crc32=json.dumps(bad)))
    with pytest.raises(CheckpointError, match="damaged denseclip_fast metadata: 'crc32' is not valid JSON"):
        dcf.load_checkpoint(_native_with(tmp_path, native_file, crc32="{"))


def test_save_and_load_at_interpreter_shutdown(tmp_path):
    """At shutdown (an atexit handler) no thread pool takes work: the CRCs are computed one at a time there, a
    native file's and a torch zip file's alike: every tensor's recorded at a save, a damaged entry refused at a
    load."""
    late_pth, damaged = str(tmp_path / "late.pth"), str(tmp_path / "damaged.pth")
    script = f"""
import atexit, torch, zipfile
import denseclip_fast as dcf
from tests.conftest import tiny_config
torch.set_num_threads(2)
def at_exit():
    model = dcf.DenseCLIP(tiny_config("resnet"), ["sky", "road"])
    model.save({str(tmp_path / "late.safetensors")!r})
    print("loaded", dcf.load_checkpoint({str(tmp_path / "late.safetensors")!r}).class_names)
    state = {{"meta": {{"CLASSES": ("sea", "sand")}}, "state_dict": model.state_dict()}}
    torch.save(state, {late_pth!r})
    print("loaded", dcf.load_checkpoint({late_pth!r}).class_names)
    data = bytearray(open({late_pth!r}, "rb").read())
    with zipfile.ZipFile({late_pth!r}) as z:
        stored = z.read(max(z.infolist(), key=lambda e: e.file_size))
    data[data.find(stored) + 5] ^= 0x40
    open({damaged!r}, "wb").write(bytes(data))
    try:
        dcf.load_checkpoint({damaged!r})
        print("loaded the damaged file")
    except dcf.CheckpointError as exc:
        print("refused:", exc)
atexit.register(at_exit)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded ['sky', 'road']" in done.stdout and "loaded ['sea', 'sand']" in done.stdout, done.stderr[-2000:]
    assert "refused:" in done.stdout and "fails the CRC-32 check" in done.stdout, done.stdout
    meta, tensors = _native_parts(tmp_path / "late.safetensors")
    assert set(json.loads(meta["crc32"])) == set(tensors) | {"__metadata__"}


def test_weights_that_load_state_dict_would_cast_or_copy_without_a_word_are_refused(tmp_path, official_file):
    """Integer, boolean or complex tensors where the model has floating-point weights (load_state_dict casts them),
    and NaN or infinite weights (which segment as all one class): a CheckpointError naming the tensors. float16
    weights and a float num_batches_tracked load."""
    state = torch.load(official_file, weights_only=True)
    sd = state["state_dict"]
    head, gamma = "decode_head.conv_seg.weight", "gamma"
    edits = {
        "ints": ({head: sd[head].to(torch.int8)}, rf"not floating point \(1\): {head}: checkpoint torch.int8 vs "
                                                   r"model torch.float32"),
        "bools": ({head: sd[head] > 0, gamma: sd[gamma].to(torch.complex64)}, r"not floating point \(2\): "),
        "nan": ({head: sd[head].clone().index_fill_(0, torch.tensor([1]), float("nan"))},
                rf"NaN or infinite values \(1\): {head}$"),
        "inf": ({gamma: torch.full_like(sd[gamma], float("inf"))}, rf"NaN or infinite values \(1\): {gamma}$"),
    }
    for name, (changes, message) in edits.items():
        path = _save_state(tmp_path, {**sd, **changes}, meta=state["meta"], name=f"{name}.pth")
        with pytest.raises(CheckpointError, match=message):
            dcf.load_checkpoint(path)
    bn = next(k for k in sd if k.endswith("num_batches_tracked"))
    fine = {k: (v.half() if v.is_floating_point() else v.float() if k == bn else v) for k, v in sd.items()}
    model = dcf.load_checkpoint(_save_state(tmp_path, fine, meta=state["meta"], name="fine.pth"))
    assert torch.equal(model.state_dict()[head], sd[head].half().float())
    for dtype in FLOAT8:  # float8 weights load (as float32); aminmax has no float8 kernel
        path = _save_state(tmp_path, {**sd, head: sd[head].to(dtype)}, meta=state["meta"], name="float8.pth")
        assert torch.equal(dcf.load_checkpoint(path).state_dict()[head], sd[head].to(dtype).float())
    if hasattr(torch, "float4_e2m1fn_x2"):  # floating point that torch cannot convert: refused, not a raw error
        packed = torch.empty(sd[gamma].shape, dtype=torch.float4_e2m1fn_x2)
        path = _save_state(tmp_path, {**sd, gamma: packed}, meta=state["meta"], name="float4.pth")
        with pytest.raises(CheckpointError, match=rf"packed floating point, not convertible to float32 \(1\): {gamma}"):
            dcf.load_checkpoint(path)


FLOAT8 = [getattr(torch, name) for name in ("float8_e5m2", "float8_e4m3fn", "float8_e8m0fnu") if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, *FLOAT8])
def test_the_finite_check_of_checkpoint_tensors_finds_every_nan_and_infinity(dtype):
    """all_finite (one aminmax; float8, which aminmax lacks, through float32) finds a NaN or an infinity (where the
    dtype stores it) at the start, in the middle and at the end of a tensor whose length is no multiple of
    a vector width, in a transposed one, in 0-d tensors; an empty tensor (which aminmax refuses) is finite."""
    from denseclip_fast.checkpoints.official import all_finite

    for n in (1, 2, 31, 1027):
        for position in sorted({0, n // 2, n - 1}):
            for value in (float("nan"), float("inf"), float("-inf")):
                t = (torch.rand(n, dtype=torch.float64) + 0.5).to(dtype)  # positive: float8_e8m0fnu has no sign
                assert all_finite(t)
                t[position] = value  # float8_e4m3fn saturates an infinity to 448
                stored = t.to(torch.float64)[position].item()
                assert all_finite(t) == math.isfinite(stored) and (value == value or stored != stored), (n, position)
    square = (torch.rand(33, 17, dtype=torch.float64) + 0.5).to(dtype).t()
    assert all_finite(square)
    square[16, 32] = float("nan")
    assert not all_finite(square)
    assert all_finite(torch.tensor(1.0, dtype=dtype)) and not all_finite(torch.tensor(float("nan"), dtype=dtype))
    assert all_finite(torch.empty(0, 3, dtype=dtype))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: no such file$"):
        dcf.load_checkpoint(tmp_path / "nope.pth")
    # a missing file is also what a caller's ``except FileNotFoundError`` expects (and OSError's errno), its one line
    # kept; a dangling link is one too
    (tmp_path / "link.pth").symlink_to(tmp_path / "gone.pth")
    for missing in ("nope.pth", "link.pth"):
        with pytest.raises(FileNotFoundError) as caught:
            dcf.load_checkpoint(tmp_path / missing)
        assert isinstance(caught.value, CheckpointError) and caught.value.errno == errno.ENOENT
        assert str(caught.value) == f"{tmp_path / missing}: no such file"
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path))}: a directory, not a checkpoint file$"):
        dcf.load_checkpoint(tmp_path)
    # a training work dir: its newest model file is named (by iteration, not by name: iter_900 < iter_1000)
    for name in ("iter_900.safetensors", "iter_1000.safetensors", "iter_1000.state.pt", "iter_5000.json",
                 "latest.json"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "iter_9999.safetensors.tmp").write_bytes(b"")  # a partial write is no checkpoint
    newest = re.escape(os.path.join(str(tmp_path), "iter_1000.safetensors"))
    with pytest.raises(CheckpointError, match=f"a directory, not a checkpoint file; this training work dir's newest "
                                              f"checkpoint is {newest}$"):  # fmt: skip
        dcf.load_checkpoint(tmp_path)


def test_clip_weights_are_pointed_to_from_clip(tmp_path):
    path = tmp_path / "clip.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1), "token_embedding.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="CLIP weights, not a DenseCLIP checkpoint; use DenseCLIP.from_clip"):
        dcf.load_checkpoint(path)
    # the command line's user (segment --checkpoint RN50.pt) was pointed at the Python API alone
    with pytest.raises(CheckpointError, match="on the command line fine-tune DenseCLIP from them: denseclip-fast "
                                              "train --init PATH$"):  # fmt: skip
        dcf.load_checkpoint(path)

    # OpenAI's own CLIP files (RN50.pt, ViT-B-16.pt) are TorchScript archives: named as such, and the same ways out
    archive = tmp_path / "RN50.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 3)).save(str(archive))
    with pytest.raises(CheckpointError, match=re.escape(
        f"{archive}: this is a TorchScript archive (CLIP weights?), not a DenseCLIP checkpoint; use "
        "DenseCLIP.from_clip(path, arch, class_names) to initialise a model from CLIP weights, or on the command "
        "line fine-tune DenseCLIP from them: denseclip-fast train --init PATH")):  # fmt: skip
        dcf.load_checkpoint(archive)


# ------------------------------------------------------------------------------------------------ resource limits
# Small crafted files that made the reader allocate hundreds of megabytes or more. Each is now refused (or read)
# without that: the sizes are such that the old code would have allocated >= 256 MB or failed with a raw error.


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"  # MARK ... TUPLE


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i) + b"0"  # LONG_BINPUT, POP: memo slot i holds the top of the stack


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


def _ts_storage(key: str) -> bytes:
    return _tup(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(1)) + b"Q"


def _ts_arguments(key: str, size, stride, offset: int = 0) -> bytes:
    """The arguments of _rebuild_tensor_v2 as torch.jit.save writes them: (storage, offset, size, stride, False,
    OrderedDict())."""
    hooks = _global("collections", "OrderedDict") + b")R"
    return _tup(_ts_storage(key), _int(offset), _tup(*map(_int, size)), _tup(*map(_int, stride)), b"\x89", hooks)


def _ts_tensor(key: str, size, stride, offset: int = 0) -> bytes:
    return _global("torch._utils", "_rebuild_tensor_v2") + _ts_arguments(key, size, stride, offset) + b"R"


def _ts_archive(path, body: bytes, data: dict[str, bytes] | None = None, compressed: str = ""):
    """A TorchScript archive: data.pkl holding ``body``, data/<key> holding each storage; the entry named
    ``compressed`` deflated."""
    entries = {"archive/data.pkl": b"\x80\x02" + body + b".", "archive/constants.pkl": b"\x80\x02).",
               **{f"archive/data/{k}": v for k, v in (data or {}).items()}}  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        for name, content in entries.items():
            z.writestr(name, content, zipfile.ZIP_DEFLATED if name == compressed else zipfile.ZIP_STORED)
    return path


def _read(path):
    from denseclip_fast.checkpoints.io import read_weight_file

    return read_weight_file(path)


@pytest.mark.parametrize("entry", ["archive/data/0", "archive/data.pkl"])
def test_compressed_zip_entries_are_refused(tmp_path, entry):
    """A deflated entry was inflated by archive.read (then copied): a 408 KB file took ~800 MB. torch.save and
    torch.jit.save store their records uncompressed; here 1 MiB of zeros, deflated to ~1 KB, is refused by name."""
    body = b"}" + _str("w") + _ts_tensor("0", (4,), (1,)) + b"s"
    path = _ts_archive(tmp_path / "zipped.pt", body, {"0": bytes(2**20)}, compressed=entry)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: refused: its zip entry '{entry}' is "
                                              "compressed, which torch.save and torch.jit.save never do"):  # fmt: skip
        _read(path)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2**18)}, buf)
    torch_file = tmp_path / "zipped.pth"
    for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):  # any method but stored
        with zipfile.ZipFile(buf) as src, zipfile.ZipFile(torch_file, "w", method) as z:
            for name in src.namelist():
                z.writestr(name, src.read(name))
        with pytest.raises(CheckpointError, match="refused: its zip entry 'archive/data.pkl' is compressed"):
            _read(torch_file)  # torch.load would inflate it too


def test_zip_entry_declaring_more_bytes_than_the_file_has(tmp_path):
    path = _ts_archive(tmp_path / "sizes.pt", b"}" + _str("w") + _ts_tensor("0", (4,), (1,)) + b"s", {"0": bytes(16)})
    data = bytearray(path.read_bytes())
    record = _central_record(data, "archive/data/0")
    data[record + 24 : record + 28] = struct.pack("<I", 2**31)  # its uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"truncated or corrupt: its zip entry 'archive/data/0' declares "
                                              rf"{2**31} bytes but the file has {len(data)} bytes in all"):  # fmt: skip
        _read(path)


@pytest.mark.parametrize(
    "size, stride",
    [((2**14, 2**14), (0, 0)), ((2**20, 2**20), (0, 0)), ((2**13, 2**13), (1, 1)), ((2**14 + 1,), (1,))],
)
def test_torchscript_views_with_more_elements_than_their_storage_are_refused(tmp_path, size, stride):
    """A 64 KiB storage viewed as (16384, 16384) with zero strides: the copy of every tensor that the reader makes
    allocated 1 GiB (a 751-byte file allocated 768 MB); as (2**20, 2**20), that copy raised a raw RuntimeError (it
    was outside the try). No saved weight has more elements than its storage, whatever the strides."""
    path = _ts_archive(tmp_path / "view.pt", b"}" + _str("w") + _ts_tensor("0", size, stride) + b"s",
                       {"0": bytes(4 * 2**14)})  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"could not be decoded \(UnpicklingError: a tensor of shape "
                                              rf"{re.escape(str(size))} views a storage of 16384 elements: an expanded "
                                              "or overlapping view"):  # fmt: skip
        _read(path)
    assert time.perf_counter() - start < 5


def test_torchscript_views_within_their_storage_are_read_as_copies(tmp_path):
    body = (b"}(" + _str("t") + _ts_tensor("0", (2, 2), (1, 2)) + _str("s") + _ts_tensor("0", (2,), (2,), 1)
            + _str("z") + _ts_tensor("0", (2, 2), (0, 1)) + b"u")  # fmt: skip
    tensors = _read(_ts_archive(tmp_path / "views.pt", body, {"0": struct.pack("<4f", 0, 1, 2, 3)})).tensors
    assert tensors["t"].tolist() == [[0, 2], [1, 3]] and tensors["s"].tolist() == [1, 3]
    assert tensors["z"].tolist() == [[0, 1], [0, 1]]
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == 3  # each its own copy


def test_torchscript_weights_are_read_without_a_second_copy(tmp_path, monkeypatch):
    """Each storage entry was read as bytes, copied into a bytearray, and every tensor cloned: three times a CLIP
    file's size at the peak. Now an entry is read into its bytearray in chunks and a tensor that alone covers its
    storage (CLIP's weights) is kept as read; views that share a storage are still copied."""
    made: list[int] = []
    frombuffer = torch.frombuffer

    def recording(*args, **kwargs):
        t = frombuffer(*args, **kwargs)
        made.append(t.data_ptr())
        return t

    monkeypatch.setattr(torch, "frombuffer", recording)
    big = 2**22  # 16 MiB of float32
    body = (b"}(" + _str("w") + _ts_tensor("0", (big,), (1,)) + _str("a") + _ts_tensor("1", (2,), (1,))
            + _str("b") + _ts_tensor("1", (2,), (1,), 2) + b"u")  # fmt: skip
    data = {"0": struct.pack(f"<{big}f", *range(big)), "1": struct.pack("<4f", 5, 6, 7, 8)}
    path = _ts_archive(tmp_path / "weights.pt", body, data)
    del data
    tracemalloc.start()
    try:
        tensors = _read(path).tensors
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 4 * big, peak  # was 2x (bytes, then the bytearray), before the clone
    assert tensors["w"].data_ptr() in made and tensors["w"][-1].item() == big - 1  # the storage itself, not a copy
    assert tensors["a"].tolist() == [5, 6] and tensors["b"].tolist() == [7, 8]
    assert tensors["a"].data_ptr() not in made and tensors["b"].data_ptr() not in made  # views: copies


def test_torchscript_views_sharing_a_storage_are_bounded_and_tied_tensors_copied_once(tmp_path):
    """1100 views of one 256 KiB storage, each within it: each was copied, 275 MB from a 280 KB file. Views may add
    up to twice the storages' bytes (+16 MiB); one tensor under two names (tied weights) is one copy."""
    views = (_global("torch._utils", "_rebuild_tensor_v2") + _put(0) + _ts_arguments("0", (2**16,), (1,)) + _put(1)
             + b"}(" + b"".join(_str(f"w{i}") + _get(0) + _get(1) + b"R" for i in range(1100)) + b"u")  # fmt: skip
    path = _ts_archive(tmp_path / "views.pt", views, {"0": bytes(2**18)})
    with pytest.raises(CheckpointError, match=r"refused: its tensors view the same storages over and over "
                                              r"\(288358400 bytes of tensors over 262144 bytes of data\)"):  # fmt: skip
        _read(path)
    tied = b"}" + _str("a") + _ts_tensor("0", (4,), (1,)) + b"r\x02\x00\x00\x00s" + _str("b") + _get(2) + b"s"
    tensors = _read(_ts_archive(tmp_path / "tied.pt", tied, {"0": struct.pack("<4f", 0, 1, 2, 3)})).tensors
    assert tensors["a"] is tensors["b"] and tensors["a"].tolist() == [0, 1, 2, 3]


def _expanded():
    return torch.zeros(1, 64).expand(2**22, -1)  # 256 bytes of storage, 1 GiB as a tensor


def _sparse():
    no_values = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    return torch.sparse_coo_tensor(*no_values, (2**22, 64), check_invariants=False)


@pytest.mark.parametrize(
    "tensor, match",
    [
        (_expanded, r"the tensor under 'text_encoder.token_embedding.weight' has shape \(4194304, 64\) \(268435456 "
                    r"elements\) but its storage holds 64: an expanded or overlapping view"),
        (lambda: torch.empty(2**22, 64, device="meta"),
         "the tensor under 'text_encoder.token_embedding.weight' is a torch.strided tensor on meta; only dense CPU "
         "tensors are read"),
        (_sparse, "the tensor under 'text_encoder.token_embedding.weight' is a torch.sparse_coo tensor on cpu"),
    ],
)  # fmt: skip
def test_official_tensors_that_hold_no_data_are_refused(tmp_path, official_file, tensor, match):
    """An official file's shapes give the architecture: a token embedding of 2**22 rows that the file does not hold
    (a zero-stride view of 256 bytes, a meta tensor, an empty sparse one) built a 1 GiB model (or worse) before any
    check. torch.load(weights_only=True) accepts all three."""
    sd = dict(_state(official_file)["state_dict"])
    sd["text_encoder.token_embedding.weight"] = tensor()
    path = _save_state(tmp_path, sd, meta={"CLASSES": NAMES})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load validating the sparse tensor
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: refused: {match}"):
            dcf.load_checkpoint(path)


def test_torch_file_views_sharing_a_storage_are_bounded(tmp_path):
    base = torch.zeros(2**16)
    path = tmp_path / "views.pth"
    torch.save({f"w{i}": base[:] for i in range(1100)}, path)
    with pytest.raises(CheckpointError, match="refused: its tensors view the same storages over and over"):
        _read(path)
    torch.save({"a": base, "b": base[: 2**15], "c": base[2**15 :]}, path)  # tied and sliced: read
    assert set(_read(path).obj) == {"a", "b", "c"}


def test_lists_and_mappings_from_the_memo_are_not_copied(tmp_path):
    """build_intlist called 400 times on one memoized 100000-int list: each call copied it (320 MB of lists from a
    200 KB file; quadratic in the file size). The list is now returned as it is (torch's own build_intlist does
    so); OrderedDict, which copied its argument, may only be called without one, as the archives do. Such a file
    (40 million objects reached from 100000 opcodes) is now refused before it is unpickled (pickle_shape), without
    that memory either."""
    from denseclip_fast.checkpoints.io import _as_list

    items = b"](" + b"K\x07" * 100_000 + b"e" + _put(0)
    build = _global("torch.jit._pickle", "build_intlist") + _put(1)
    calls = b"](" + (_get(1) + _tup(_get(0)) + b"R") * 400 + b"e"
    body = items + build + b"}" + _str("w") + _ts_tensor("0", (1,), (1,)) + b"s" + _str("junk") + calls + b"s"
    path = _ts_archive(tmp_path / "lists.pt", body, {"0": bytes(4)})
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="its pickle would build more than 1048576 objects"):
            _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, peak
    listed = [1, 2]
    assert _as_list(listed) is listed
    with pytest.raises(pickle.UnpicklingError, match="a TorchScript list built from a dict"):
        _as_list({"a": 1})
    copied = b"}" + _str("w") + _ts_tensor("0", (1,), (1,)) + b"s" + _str("o") + _global("collections", "OrderedDict")
    copied += _tup(b"}") + b"Rs"
    with pytest.raises(CheckpointError, match=r"UnpicklingError: collections.OrderedDict called with arguments"):
        _read(_ts_archive(tmp_path / "ordered.pt", copied, {"0": bytes(4)}))


class _TiedModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.tied = self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tied(self.linear(x)[:, :3]))


def test_a_torchscript_archive_without_its_pickle_or_with_a_damaged_tensor_is_named(tmp_path):
    """An archive of TorchScript's layout with no data.pkl, and one whose weight bytes were changed after saving
    (the zip entry's CRC-32 fails), are each a CheckpointError naming the file and the damage."""
    bare = tmp_path / "bare.pt"
    with zipfile.ZipFile(bare, "w") as z:
        z.writestr("archive/constants.pkl", b"\x80\x02).")
    with pytest.raises(CheckpointError, match=re.escape(f"{bare}: TorchScript archive without data.pkl")):
        dcf.load_checkpoint(bare)
    module = torch.nn.Linear(4, 8)
    path = tmp_path / "damaged.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    data = bytearray(path.read_bytes())
    weight = module.weight.detach().numpy().tobytes()
    at = data.find(weight)
    assert at > 0 and data.find(weight, at + 1) < 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: truncated or corrupt TorchScript archive (") +
                                              "Bad CRC-32"):  # fmt: skip
        dcf.load_checkpoint(path)


def test_real_torchscript_archive_with_a_tied_submodule(tmp_path):
    """A torch.jit.save archive passes every limit (its code entries are compressed; the reader never reads them),
    and a submodule under two names keeps both: the `seen` set skipped every container met before, not only cycles."""
    module = _TiedModule()
    path = tmp_path / "tied.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    with zipfile.ZipFile(path) as z:
        assert any(e.compress_type != zipfile.ZIP_STORED for e in z.infolist())
    tensors = _read(path).tensors
    expected = module.state_dict()
    assert set(tensors) == set(expected) and {"linear.weight", "tied.weight"} <= set(tensors)
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    assert tensors["tied.weight"] is tensors["linear.weight"]


class _EveryDtype(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        values = torch.randn(5, 3, generator=generator) * 100
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            self.register_buffer("t_" + str(dtype).split(".")[1], values.to(dtype))
        for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            self.register_buffer("t_" + str(dtype).split(".")[1], values.abs().clamp(max=120).to(dtype))
        self.register_buffer("t_bool", values > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _scripted(module: torch.nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))


def test_torchscript_tensors_of_every_storage_type_keep_their_dtype_and_values(tmp_path):
    """OpenAI's CLIP archives (RN50.pt ...) hold float16 weights: each storage type of the archive is read as its
    own dtype (a float16 storage read as bfloat16 loads every CLIP weight as other numbers, without an error)."""
    module = _EveryDtype()
    path = tmp_path / "dtypes.pt"
    _scripted(module, path)
    tensors = _read(path).tensors
    expected = module.state_dict()
    assert set(tensors) == set(expected) and len(expected) == 10
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype and torch.equal(tensors[name], value), name


def test_a_big_endian_torchscript_archive_is_refused(tmp_path):
    """An archive whose ``byteorder`` record says big-endian holds its tensors' bytes in the other order: read as
    little-endian they are other numbers, so it is refused by name (rewritten here from a real archive, whose record
    says little)."""
    path, big = tmp_path / "little.pt", tmp_path / "big.pt"
    _scripted(_EveryDtype(), path)
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as out:
        records = [e for e in z.infolist() if e.filename.endswith("/byteorder")]
        assert len(records) == 1 and z.read(records[0]).strip() == b"little"
        for entry in z.infolist():
            out.writestr(entry.filename, b"big" if entry in records else z.read(entry))
    assert torch.equal(_read(path).tensors["t_float32"], _EveryDtype().t_float32)
    with pytest.raises(CheckpointError, match="big-endian TorchScript archives are not supported"):
        _read(big)


def _nested(depth: int, key_length: int) -> bytes:
    """depth dicts, each {'t': tensor, KEY: the next one}, KEY a memoized string of key_length characters."""
    body = _ts_tensor("0", (1,), (1,)) + _put(0) + _str("k" * key_length) + _put(1)
    body += (b"}" + _str("t") + _get(0) + b"s" + _get(1)) * depth
    return body + b"}" + b"s" * depth


@pytest.mark.parametrize(
    "depth, key_length, match",
    [
        (400, 50, "archive nests containers more than 256 deep"),
        (200, 2**16, "archive's names add up to more than 16000000 characters"),
    ],
)
def test_deep_torchscript_names_are_bounded(tmp_path, depth, key_length, match):
    """The dotted names grow with the depth, so their total length with its square: 3500 levels of a 50-character
    key were ~300 MB of names from a 70 KB file (depth 8000, 3.7 GB), 200 levels of a 64 Ki-character key 1.3 G
    characters. The nesting (256) and the characters of all names (16 M) are capped. (Past 512 levels the pickle
    itself is refused first: pickle_shape.)"""
    path = _ts_archive(tmp_path / "deep.pt", _nested(depth, key_length), {"0": bytes(4)})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"refused: the TorchScript {match}"):
        _read(path)
    assert time.perf_counter() - start < 5
    assert len(_read(_ts_archive(tmp_path / "ok.pt", _nested(200, 10), {"0": bytes(4)})).tensors) == 200


def _shared_chain(depth: int) -> bytes:
    """depth dicts, each {'a': next, 'b': next} (the same next one): 2**depth paths to the innermost {'w': tensor}."""
    body = b"}" + _str("w") + _ts_tensor("0", (1,), (1,)) + b"s" + _put(0)
    for i in range(depth):
        body += b"}" + _str("a") + _get(i) + b"s" + _str("b") + _get(i) + b"s" + _put(i + 1)
    return body + _get(depth)


def test_containers_shared_along_many_paths_are_bounded(tmp_path, monkeypatch):
    """Every path to a shared container gives a name (tied submodules), so the entries visited are capped: 2**12
    paths here (the cap is lowered to keep the test fast). 2**40 paths are refused before the pickle is read: the
    objects it reaches, a shared one counted each time (pickle_shape)."""
    from denseclip_fast.checkpoints import io as checkpoint_io

    small = _read(_ts_archive(tmp_path / "dag.pt", _shared_chain(3), {"0": bytes(4)})).tensors
    assert sorted(small) == [f"{x}.{y}.{z}.w" for x in "ab" for y in "ab" for z in "ab"]
    monkeypatch.setattr(checkpoint_io, "MAX_ENTRIES", 1000)
    with pytest.raises(CheckpointError, match="has more than 1000 entries to read"):
        _read(_ts_archive(tmp_path / "dag.pt", _shared_chain(12), {"0": bytes(4)}))
    with pytest.raises(CheckpointError, match="its pickle would build more than 1048576 objects"):
        _read(_ts_archive(tmp_path / "dag.pt", _shared_chain(40), {"0": bytes(4)}))


def test_running_out_of_memory_is_not_called_an_invalid_file(tmp_path, official_file, monkeypatch):
    """A MemoryError (or torch's allocator failing) on a valid file read as "not a valid checkpoint"."""
    from denseclip_fast.checkpoints import io as checkpoint_io

    allocator = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 64 bytes. Error code 12 (Cannot allocate memory)")
    for exc in (MemoryError(), allocator):

        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(MemoryError, match=rf"^{re.escape(str(official_file))}: not enough memory to read it"):
            dcf.load_checkpoint(official_file)
        monkeypatch.setattr(checkpoint_io, "_flatten", fail)
        path = _ts_archive(tmp_path / "oom.pt", b"}" + _str("w") + _ts_tensor("0", (1,), (1,)) + b"s", {"0": bytes(4)})
        with pytest.raises(MemoryError, match=rf"^{re.escape(str(path))}: not enough memory to read it"):
            _read(path)


def test_legacy_torch_file_declaring_a_huge_storage(tmp_path):
    """A legacy (non-zip) torch file declares its storages' sizes, which torch.load allocates before reading them:
    an allocation larger than the whole file is the file's fault, not a lack of memory."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    numel = data.index(b"K\x04", data.index(b"cpu"))  # ('storage', FloatStorage, key, 'cpu', 4)
    path = tmp_path / "legacy.pth"
    path.write_bytes(data[:numel] + b"\x8a\x08" + (2**50).to_bytes(8, "little") + data[numel + 2 :])  # LONG1 2**50
    with pytest.raises(CheckpointError, match=rf"not a valid checkpoint: reading it asks for {4 * 2**50} bytes of "
                                              rf"memory at once, more than the whole file \({len(data) + 8} bytes\)"):
        _read(path)


# ---- found by a fuzz of the readers (2,099 damaged and crafted files): each was a raw exception, a crash, a hang or
# gigabytes of memory from a file of a few hundred bytes


def _keyed_file(path, key: bytes, legacy: bool):
    """A torch file {'state_dict': {KEY: tensor}} whose key is the object the pickle opcodes ``key`` push (built as
    bytes: a dict holding such a key would have to hash it first)."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"MARKER": torch.zeros(1)}}, buf, _use_new_zipfile_serialization=not legacy)
    marker = b"X\x06\x00\x00\x00MARKER"  # BINUNICODE 'MARKER'
    if legacy:
        path.write_bytes(buf.getvalue().replace(marker, key))
        return path
    return _with_data_pkl(buf, path, lambda data: data.replace(marker, key))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickles_of_absurd_shape_are_refused_before_torch_reads_them(tmp_path, legacy):
    """A key nested 300,000 tuples deep crashed the process inside torch.load (its hash overflowed the C stack), one
    doubling 40 times (each tuple the one below twice: 2**40 paths) hashed for hours, and 25 times took 3 GiB to
    print in a message. Both formats' pickles are measured first (pickle_shape). Here 600 levels and 20 doublings:
    refused all the same, where torch alone would read them in moments (so that a regression fails, not hangs)."""
    leaf = b"X\x01\x00\x00\x00k"  # BINUNICODE 'k'
    cases = [(leaf + b"\x85" * 600, "its pickle nests containers more than 512 deep"),  # TUPLE1
             (leaf + b"".join(b"q%ch%c\x86" % (i, i) for i in range(3, 23)),  # BINPUT i, BINGET i, TUPLE2
              r"its pickle would build more than 1048576 objects")]
    for key, match in cases:  # fmt: skip
        path = _keyed_file(tmp_path / "crafted.pth", key, legacy)
        assert path.stat().st_size < 20_000
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"crafted.pth: not a valid checkpoint: {match}"):
            dcf.load_checkpoint(path)
        assert time.perf_counter() - start < 5
    (key,) = _read(_keyed_file(tmp_path / "fine.pth", leaf + b"\x85" * 300, legacy)).obj["state_dict"]
    for _ in range(300):  # read (load_checkpoint then wants a name for a key)
        (key,) = key
    assert key == "k"


def test_a_torchscript_memo_index_is_bounded_before_unpickling(tmp_path):
    """CPython's unpickler sizes its memo by the largest index: a 261-byte archive storing index 2**27 took 2 GiB."""
    body = b"N" + b"r" + struct.pack("<I", 2**27)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"its pickle stores memo index 134217728 after 3 opcodes"):
            _read(_ts_archive(tmp_path / "memo.pt", body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak


def test_a_legacy_file_cut_inside_its_pickle_is_called_truncated(tmp_path):
    buf = io.BytesIO()
    torch.save({"state_dict": {f"w{i}": torch.zeros(2) for i in range(20)}}, buf, _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.pth"
    path.write_bytes(buf.getvalue()[:400])
    with pytest.raises(CheckpointError, match=r"cut.pth: truncated or corrupt: its pickle ends early"):
        dcf.load_checkpoint(path)


def _renamed_entry(data: bytes, where: str) -> bytes:
    """A torch zip file whose last central-directory name (or first local-header name) ends in byte 0xFF: not
    UTF-8, though the entry is flagged as UTF-8 (as torch.save writes it)."""
    out = bytearray(data)
    if where == "central":
        at = out.rfind(b"PK\x01\x02")
        length = int.from_bytes(out[at + 28 : at + 30], "little")
        out[at + 46 + length - 1] = 0xFF
    else:
        out[30] = 0xFF  # the first byte of the first local header's name
    return bytes(out)


@pytest.mark.parametrize("where", ["central", "local"])
def test_a_zip_entry_name_that_is_not_utf8_is_a_checkpoint_error(tmp_path, official_file, where):
    """Python's zipfile raised UnicodeDecodeError, a ValueError that load_checkpoint let out and the CLI printed
    without the file's name."""
    path = tmp_path / "renamed.pth"
    path.write_bytes(_renamed_entry(official_file.read_bytes(), where))
    with pytest.raises(CheckpointError, match=r"renamed.pth: truncated or corrupt: .*not UTF-8 text"):
        dcf.load_checkpoint(path)


def test_a_zip_archive_whose_entries_cannot_be_read_is_never_handed_to_torch(tmp_path):
    """The zip64 end record's directory offset off by one: Python's zipfile lists the entries but cannot read them
    (OSError, which leaked); the pickle it could not read is not given to torch.load unmeasured."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, buf)
    data = bytearray(buf.getvalue())
    data[data.rfind(b"PK\x06\x06") + 48] ^= 1  # the low byte of the central directory's offset
    path = tmp_path / "offset.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"offset.pth: truncated or corrupt: its zip archive could not be read "
                                              r"\(OSError: "):  # fmt: skip
        dcf.load_checkpoint(path)


def test_a_zip_entry_held_twice_is_refused(tmp_path, official_file):
    """torch.load read the first of two entries of one name and Python's zipfile the last: one file could hold two
    sets of weights, each passing its CRC-32."""
    path = tmp_path / "twice.pth"
    with zipfile.ZipFile(official_file) as src, zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        names = src.namelist()
        for name in names:
            z.writestr(name, src.read(name))
        z.writestr(names[-1], src.read(names[-1]))
    with pytest.raises(CheckpointError, match=rf"twice.pth: refused: its zip archive holds the entry "
                                              rf"'{re.escape(names[-1])}' twice"):  # fmt: skip
        dcf.load_checkpoint(path)


@pytest.mark.parametrize("classes", [np.array(3), torch.tensor(3)], ids=["ndarray", "tensor"])
def test_class_names_that_are_a_0d_array_are_a_checkpoint_error(tmp_path, official_file, classes):
    """A 0-d array or tensor is Iterable, but iterating it is a TypeError (which load_checkpoint let out)."""
    path = _save_state(tmp_path, _state(official_file)["state_dict"], meta={"CLASSES": classes})
    with pytest.raises(CheckpointError, match=r"meta\['CLASSES'\] is not a list of strings, got "):
        dcf.load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bits8], ids=str)
def test_an_integer_buffer_from_a_tensor_copy_cannot_convert(tmp_path, official_file, dtype):
    """num_batches_tracked (int64) from a complex tensor lost its imaginary part with a warning, from a bit-typed
    one (or packed float4) was torch's multi-line RuntimeError out of load_state_dict."""
    sd = _state(official_file)["state_dict"]
    key = next(k for k in sd if k.endswith("num_batches_tracked"))
    sd[key] = torch.zeros((), dtype=dtype) if dtype.is_complex else torch.zeros((), dtype=torch.uint8).view(dtype)
    with pytest.raises(CheckpointError, match=rf"not an integer or real number \(1\): {re.escape(key)}: checkpoint "
                                              rf"{dtype} vs model torch.int64"):  # fmt: skip
        dcf.load_checkpoint(_save_state(tmp_path, sd, meta={"CLASSES": tuple(NAMES)}))


def test_a_class_name_with_a_lone_surrogate_is_refused(tmp_path, native_file):
    """JSON's "\\ud800" escape makes a string that no UTF-8 file or terminal holds: `info` failed halfway through
    printing it. Names are checked where every model gets them."""
    with pytest.raises(ValueError, match=r"class name 1 \('a\\ud800'\) is not text: it holds a lone surrogate"):
        DenseCLIP(tiny_config("resnet"), ["sky", "a\ud800", "car"])
    path = _native_with(tmp_path, native_file, class_names=json.dumps(["sky", "\ud800", "car"]))
    with pytest.raises(CheckpointError, match=r"the file's class names cannot be used: class name 1 .* lone surrogate"):
        dcf.load_checkpoint(path)


def test_info_quotes_a_class_name_that_would_break_its_line(tmp_path, native_file, capsys):
    from denseclip_fast.cli import main

    path = _native_with(tmp_path, native_file, class_names=json.dumps(["sky", "road\ncar", "car"]))
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("classes")] == ["classes      3: sky, 'road\\ncar', car"]


# ---- sizes read from a file are checked before the model is built


@pytest.mark.parametrize(
    "dotted, value, match",
    [
        ("text.width", 2**17, r"shape mismatch \(30\): contexts: checkpoint \(1, 8, 64\) vs model \(1, 8, 131072\)"),
        ("text.layers", 3000, r"the architecture has 3006 blocks \(vision.layers \[1, 1, 1, 1\], text.layers 3000, "
                              r"decoder.layers 2\); more than the 512 read \(the released models have 27 to 48\)"),
        ("text.layers", 3, r"missing keys \(12\): text_encoder.transformer.resblocks.2.attn.in_proj_bias"),
        ("fpn_channels", 2**20, r"shape mismatch \(\d+\): .* vs model \(1048576, "),
    ],
)  # fmt: skip
def test_native_config_sizes_are_checked_before_building(tmp_path, native_file, dotted, value, match):
    """A text width of 2**17 built a 26 GB token embedding (a raw RuntimeError where memory ran out) before the
    mismatch with the file's tensors was found, 3000 text layers took seconds and gigabytes. The model is now built
    on the meta device and compared with the file first; the number of blocks is bounded before that."""
    path = _native_with(tmp_path, native_file, config=_config_with(native_file, dotted, value))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {match}"):
        dcf.load_checkpoint(path)
    assert time.perf_counter() - start < 5


def _meta_model(config, names):
    with torch.device("meta"):
        return DenseCLIP(config, names)


@pytest.mark.parametrize("arch", ["RN50", "RN101", "ViT-B/16", "tiny-resnet", "tiny-vit"])
def test_meta_build_of_every_architecture(arch):
    """The check before building works for every architecture: the meta model holds no data, and its state dict
    has the real model's names and shapes (compared for the tiny configs here; the presets in the slow test)."""
    from denseclip_fast.checkpoints import _model_skeleton

    config = tiny_config(arch[5:]) if arch.startswith("tiny") else dcf.preset(arch)
    names = NAMES if arch.startswith("tiny") else list(dcf.ADE20K_CLASSES)
    skeleton = _meta_model(config, names)
    sd = skeleton.state_dict()
    assert all(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers()))
    built, given = _model_skeleton(config, names, sd, "x.pth")
    assert built.state_dict().keys() == sd.keys() and given is sd  # nothing filled in
    if arch.startswith("tiny"):
        real = DenseCLIP(config, names).state_dict()
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in real.items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["RN50", "RN101", "ViT-B/16"])
def test_meta_build_of_presets_matches_the_real_model(arch):
    sd = _meta_model(dcf.preset(arch), dcf.ADE20K_CLASSES).state_dict()
    real = DenseCLIP.from_arch(arch).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in real.items()}


def test_model_elements_beyond_the_files_are_bounded(native_file, monkeypatch):
    """What the model holds besides the file's tensors (the class tokens, K x name length, both from the file) is
    bounded too; shown with the bound lowered to 10 elements (the 3 names of 5 tokens here take 15)."""
    from denseclip_fast import checkpoints

    monkeypatch.setattr(checkpoints, "MAX_EXTRA_ELEMENTS", 10)
    with pytest.raises(CheckpointError, match=r"the model it describes has 15 elements besides the file's tensors "
                                              r"\(more than 10: 3 class names of 5 tokens\?\)"):  # fmt: skip
        dcf.load_checkpoint(native_file)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (6, 200, r"its zip index asks for what torch.save never writes \(zip file version 20.0\)"),  # version needed
        (8, 0x1 | 0x800, r"its zip entry '.*' is encrypted, which torch.save and torch.jit.save never do"),  # flags
        (20, None, r"its zip entry '.*' is stored, yet declares \d+ bytes held in \d+"),  # compressed size + 1
    ],
)
def test_a_zip_index_that_torch_save_never_writes_is_a_checkpoint_error(tmp_path, field, value, message):
    """The first central-directory entry of a torch.save file damaged: its version needed to extract past zipfile's
    (NotImplementedError from zipfile, which load_checkpoint let out), its encryption flag (zipfile's RuntimeError,
    asking for a password, from the CRC check), its compressed size one more than its size (a stored entry's two are
    equal)."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, buf)
    data = bytearray(buf.getvalue())
    at = data.find(b"PK\x01\x02") + field
    if value is None:
        data[at : at + 4] = struct.pack("<I", struct.unpack("<I", data[at : at + 4])[0] + 1)
    else:
        data[at : at + (1 if field == 6 else 2)] = value.to_bytes(1 if field == 6 else 2, "little")
    path = tmp_path / "index.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"index.pth: (truncated or corrupt|refused): {message}"):
        dcf.load_checkpoint(path)


def _testzip_outcome(data: bytes) -> tuple[str, ...] | None:
    """What zipfile's testzip makes of a zip archive in ``data``: ("fails", name), ("passes",), ("unreadable",) or
    ("unicode",); None for an archive _first_failing_entry is never given (a directory zipfile cannot read, names
    twice, an entry compressed, encrypted or of two sizes, which _check_stored refuses first) or whose local flags
    zipfile refuses to read (patched data, strong encryption: NotImplementedError, where the CRC check reads them),
    or whose entries overlap (which newer Pythons' zipfile refuses, 3.11.7's not; either way the CRC check fails an
    entry or leaves the file to torch.load)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            if (len({e.filename for e in entries}) < len(entries)
                    or any(e.compress_type != zipfile.ZIP_STORED or e.flag_bits & 0x1 or e.compress_size != e.file_size
                           for e in entries)):  # fmt: skip
                return None
            if _overlapping(data, entries, archive.start_dir):
                return None
            try:
                bad = archive.testzip()
            except NotImplementedError:
                return None
            except (OSError, EOFError):
                return ("unreadable",)
            except UnicodeDecodeError:
                return ("unicode",)
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, ValueError, NotImplementedError):
        return None
    return ("fails", bad) if bad is not None else ("passes",)


def _overlapping(data: bytes, entries: list[zipfile.ZipInfo], start_dir: int) -> bool:
    """Whether an entry's local header and data reach past the next entry's header (in the file's order) or, for
    the last, the central directory: what zipfile.open refuses as "Overlapped entries" since gh-109858."""
    ordered = sorted(entries, key=lambda e: e.header_offset)
    ends = [e.header_offset for e in ordered[1:]] + [start_dir]
    for entry, end in zip(ordered, ends):
        header = data[entry.header_offset : entry.header_offset + 30]
        if entry.header_offset < 0 or len(header) < 30:
            continue
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        if entry.header_offset + 30 + name_length + extra_length + entry.compress_size > end:
            return True
    return False


def test_the_zip_crc_check_agrees_with_zipfiles_testzip_on_every_damaged_byte(tmp_path, monkeypatch):
    """The zip entries' check (_first_failing_entry, its own reading of the local headers and the data, its CRC the
    extension's) passes, fails (naming the same entry) or finds the file unreadable exactly where zipfile's testzip,
    which it replaced, did: every byte of a small archive (three stored entries, one named in UTF-8, one longer than
    the read's chunk, here 64 bytes) changed in turn, and bit 0 and bit 7 of each; then a file torch.save wrote
    (its entries flagged for data descriptors, their local headers padded by extra fields), bits 0 and 4."""
    monkeypatch.setattr(checkpoint_io, "ZIP_CHUNK", 64)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", bytes(range(40)))
        archive.writestr("archive/data/0", os.urandom(300))
        archive.writestr("archive/dätä/1", b"x" * 7)
    saved = io.BytesIO()
    torch.save({"w": torch.arange(30.0), "b": torch.ones(3, dtype=torch.int64)}, saved)
    path = tmp_path / "a.zip"
    seen = set()
    for data, bits in ((buf.getvalue(), (0x01, 0x80)), (saved.getvalue(), (0x01, 0x10))):
        seen |= _damaged_bytes_agree(data, bits, path)
    assert seen == {"fails", "passes", "unicode"}  # every outcome met (no "unreadable": those files overlap)


def _damaged_bytes_agree(data: bytes, bits: tuple[int, ...], path) -> set[str]:
    """Each byte of the zip archive ``data`` changed in turn by each of ``bits``: _first_failing_entry's outcome
    (the file written to ``path``) equals testzip's where testzip gives one; returns the outcomes met."""
    seen = set()
    for at in range(len(data)):
        for bit in bits:
            damaged = bytearray(data)
            damaged[at] ^= bit
            expected = _testzip_outcome(bytes(damaged))
            if expected is None:
                continue
            path.write_bytes(damaged)
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
            try:
                failing = checkpoint_io._first_failing_entry(str(path), entries)
                found = ("fails", failing[0]) if failing is not None else ("passes",)
            except (OSError, EOFError):
                found = ("unreadable",)
            except UnicodeDecodeError:
                found = ("unicode",)
            assert found == expected, (at, bit)
            seen.add(expected[0])
    return seen

"""The denseclip-fast command: info and segment on a checkpoint the test writes."""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseclip_fast import ADE20K_CLASSES, DenseCLIP
from denseclip_fast.cli import main

from .conftest import NAMES, ROOT, tiny_config, with_root_on_path


def _loading_fails(monkeypatch, before: str) -> None:
    """load_checkpoint replaced by a stand-in that raises AssertionError("the checkpoint was loaded before
    BEFORE"): a command that must stop before loading fails the test if it loads, and one that passes its checks is
    stopped there (``pytest.raises(AssertionError, match="the checkpoint was loaded")``)."""
    import denseclip_fast

    def no_load(path, *args, **kwargs):
        raise AssertionError(f"the checkpoint was loaded before {before}")

    monkeypatch.setattr(denseclip_fast, "load_checkpoint", no_load)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    torch.manual_seed(0)
    DenseCLIP(tiny_config("resnet"), NAMES).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in {"a.png": (48, 64), "b.jpg": (37, 51)}.items():
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def test_the_loaders_other_warnings_reach_the_command_line_once(tmp_path, capsys):
    """load_checkpoint's warnings other than the assumed ADE20K names (which the commands word themselves), here a
    palette of the wrong count in an official-format file, are warned again once by the command (which prints them
    as "denseclip-fast: warning: ..."), and the command goes on."""
    path = tmp_path / "palette.pth"
    torch.save({"state_dict": DenseCLIP(tiny_config("resnet"), NAMES).state_dict(),
                "meta": {"CLASSES": NAMES, "PALETTE": [[1, 2, 3]]}}, path)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["info", str(path)]) == 0
    assert [str(w.message) for w in caught] == [f"{path}: ignoring the palette in the file: it is not 4 RGB triples "
                                                "of integers in 0..255"]  # fmt: skip
    assert "classes      4: wall, chest of drawers, cat, bed" in capsys.readouterr().out


def test_info(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "arch         custom" in out and "classes      4: wall, chest of drawers, cat, bed" in out
    counts = DenseCLIP(tiny_config("resnet"), NAMES).parameter_counts()
    assert f"{counts['total']:,}" in out and f"{counts['without_text_encoder']:,} without the text encoder" in out
    assert main(["info", "--json", str(checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == 4 and info["parameters"] == counts["total"]
    assert main(["info", "--checkpoint", str(checkpoint), "--json"]) == 0  # as segment, export and eval name it
    assert json.loads(capsys.readouterr().out) == info
    assert main(["info", str(checkpoint), "--checkpoint", str(checkpoint)]) == 2
    assert capsys.readouterr().err.strip() == (
        "denseclip-fast: error: info takes one checkpoint, as CHECKPOINT or --checkpoint, got both "
        f"({str(checkpoint)!r} and --checkpoint {str(checkpoint)!r})"
    )
    assert main(["info", "--json"]) == 2
    assert "info needs the checkpoint to describe: denseclip-fast info CHECKPOINT" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_segment_writes_labels_and_overlays(checkpoint, images, tmp_path, mode):
    out = tmp_path / "out"
    assert main(["segment", "--checkpoint", str(checkpoint), "--mode", mode, "--out", str(out), *map(str, images)]) == 0
    for path in images:
        stem = os.path.splitext(path.name)[0]
        with Image.open(path) as source, Image.open(out / f"{stem}_overlay.png") as overlay:
            labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
            assert labels.shape == (source.height, source.width) and labels.max() < 4
            assert overlay.size == source.size and overlay.mode == "RGB"


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """(checkpoint path, model): conftest.text_dependent_model, whose labels depend on the text path and differ
    between whole and slide on the small test images."""
    from .conftest import text_dependent_model

    model = text_dependent_model()
    path = tmp_path_factory.mktemp("varied") / "varied.safetensors"
    model.save(path)
    return path, model


def test_segment_labels_are_the_engines(varied, images, tmp_path):
    """The label PNGs are the engine's predict in the mode asked (whole and slide differ here), with --classes'
    names in place of the checkpoint's (they change almost every label)."""
    from denseclip_fast import Segmenter
    from denseclip_fast.preprocess import load_image

    path, model = varied
    written = {}
    for mode, classes in (("whole", None), ("slide", None), ("slide", "sky,road,tree,grass")):
        out = tmp_path / f"{mode}{classes is not None}"
        extra = ["--classes", classes] if classes else []
        assert main(["segment", "--checkpoint", str(path), "--mode", mode, "--out", str(out), *extra,
                     *map(str, images)]) == 0  # fmt: skip
        named = copy.deepcopy(model)
        if classes:
            named.set_classes(classes.split(","))
        seg = Segmenter(named, device="cpu", dtype=torch.float32, mode=mode)
        for image in images:
            labels = np.asarray(Image.open(out / f"{image.stem}_labels.png"))
            assert np.array_equal(labels, seg.predict(load_image(str(image)))[0].numpy()), (mode, classes, image)
            written[mode, classes, image.stem] = labels
    assert any(not np.array_equal(written["whole", None, i.stem], written["slide", None, i.stem]) for i in images)
    assert all(not np.array_equal(written["slide", None, i.stem], written["slide", "sky,road,tree,grass", i.stem])
               for i in images)  # fmt: skip


def test_segment_holds_no_copy_of_the_loaded_model_while_it_segments(checkpoint, images, tmp_path, monkeypatch):
    """segment builds the Segmenter (its own copy of the weights) from the loaded model, then lets the model go: the
    images are segmented with one copy of the weights in memory, not two."""
    from denseclip_fast import cli

    loaded: list[weakref.ref] = []
    real_load, real_segment = cli._load_model, cli._segment_files

    def load(*args, **kwargs):
        result = real_load(*args, **kwargs)
        loaded.append(weakref.ref(result[0]))
        return result

    def segment(*args, **kwargs):
        gc.collect()
        assert loaded and loaded[0]() is None, "the loaded model is alive while the images are segmented"
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(cli, "_load_model", load)
    monkeypatch.setattr(cli, "_segment_files", segment)
    assert main(["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--out", str(tmp_path / "out"),
                 *map(str, images)]) == 0  # fmt: skip
    assert len(os.listdir(tmp_path / "out")) == 2 * len(images)


def test_segment_takes_directories_and_any_io_threads(checkpoint, images, tmp_path):
    folder = images[0].parent
    (folder / "notes.txt").write_text("not an image")  # skipped: no image extension
    base = ["segment", "--checkpoint", str(checkpoint), "--mode", "whole"]
    assert main([*base, "--io-threads", "1", "--out", str(tmp_path / "files"), *map(str, images)]) == 0
    assert main([*base, "--io-threads", "3", "--out", str(tmp_path / "dir"), str(folder)]) == 0
    written = sorted(os.listdir(tmp_path / "files"))
    assert written == ["a_labels.png", "a_overlay.png", "b_labels.png", "b_overlay.png"]
    assert sorted(os.listdir(tmp_path / "dir")) == written
    for name in written:  # each image's results, whichever thread wrote them
        assert (tmp_path / "files" / name).read_bytes() == (tmp_path / "dir" / name).read_bytes()


def test_segment_refuses_bad_image_lists_before_any_work(checkpoint, images, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.jpg").write_bytes(images[0].read_bytes())
    out = tmp_path / "out"
    base = ["segment", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*base, str(images[0]), str(other / "a.jpg")]) == 2
    err = capsys.readouterr().err
    assert f"{images[0]} and {other / 'a.jpg'} would both write a_labels.png" in err and err.count("\n") == 1
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "A.JPG").write_bytes(images[0].read_bytes())  # the same output file where case is ignored
    assert main([*base, str(images[0]), str(upper / "A.JPG")]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: {images[0]} and {upper / 'A.JPG'} would both write "
                                       "a_labels.png and A_labels.png (one file where case is ignored); rename one or "
                                       "segment them in separate runs\n")  # fmt: skip
    again = images[0].parent / ".." / images[0].parent.name / "a.png"  # the same file by another path
    assert main([*base, str(images[0]), str(again)]) == 2
    assert capsys.readouterr().err == f"denseclip-fast: error: {again} is given twice\n"
    assert main([*base, str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such image file or directory" in capsys.readouterr().err
    assert main([*base, ""]) == 2  # an unset shell variable
    assert capsys.readouterr().err == "denseclip-fast: error: '': no such image file or directory\n"
    (tmp_path / "empty").mkdir()
    assert main([*base, str(tmp_path / "empty")]) == 2
    assert "empty: a directory without image files" in capsys.readouterr().err
    if hasattr(os, "mkfifo"):  # reading it would block until a writer comes
        os.mkfifo(tmp_path / "pipe.png")
        assert main([*base, str(tmp_path / "pipe.png")]) == 2
        assert "pipe.png: not a regular file or a directory" in capsys.readouterr().err
    for threads in ("0", "33"):
        assert main([*base, "--io-threads", threads, str(images[0])]) == 2
        assert f"--io-threads must be >= 1 and <= 32, got {threads} (each thread's image" in capsys.readouterr().err
    assert not out.exists()
    # results into the folder of the images: a later run over it would take them for images (4 -> 12 -> 28 files)
    assert main(["segment", "--checkpoint", str(checkpoint), "--out", str(other / "."), str(other)]) == 2
    assert f"--out {other / '.'} is the input folder {other}: a later run" in capsys.readouterr().err
    (other / "b_labels.png").write_bytes(images[0].read_bytes())  # an image the result of b.png would overwrite
    (tmp_path / "b.png").write_bytes(images[0].read_bytes())
    assert main(["segment", "--checkpoint", str(checkpoint), "--out", str(other), str(other / "b_labels.png"),
                 str(tmp_path / "b.png")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"the result {other / 'b_labels.png'} would overwrite the input image {other / 'b_labels.png'}" in err
    assert sorted(os.listdir(other)) == ["a.jpg", "b_labels.png"]


def test_segment_names_an_unreadable_image(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(images[0].read_bytes())
    (folder / "2.png").write_bytes(b"not a png")
    args = ["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--io-threads", "2", "--out",
            str(tmp_path / "out"), str(folder)]  # fmt: skip
    assert main(args) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after the progress bar's line
    assert last.startswith(f"denseclip-fast: error: {folder / '2.png'}: not a readable image")
    assert (tmp_path / "out" / "1_overlay.png").exists()  # the images before it were written
    # a run that wrote nothing removes the --out folders it made (an empty one was left), not one that was there
    out = tmp_path / "new" / "out"
    args = ["segment", "--checkpoint", str(checkpoint), "--out", str(out), str(folder / "2.png")]
    assert main(args) == 2 and "not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    assert main(args) == 2 and out.is_dir()


def test_segment_keep_going_skips_what_cannot_be_segmented(checkpoint, images, tmp_path, capsys):
    """--keep-going: an unreadable image and one too elongated for the test scale are each named on stderr and
    skipped, every other image is written (those after them too), the summary counts them, the exit status is 1;
    without a failure it is 0."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(images[0].read_bytes())
    (folder / "1.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((2, 2000, 3), np.uint8)).save(folder / "3.png")  # 1 pixel high at the test scale
    out = tmp_path / "out"
    args = ["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--io-threads", "2", "--keep-going",
            "--out", str(out), str(folder)]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    warned = [line for line in re.split(r"[\r\n]", captured.err) if line.startswith("denseclip-fast: warning: ")]
    assert len(warned) == 2 and warned[0].startswith(f"denseclip-fast: warning: skipped {folder / '1.png'}: not a "
                                                     "readable image")  # fmt: skip
    assert warned[1].startswith(f"denseclip-fast: warning: skipped {folder / '3.png'} of (2, 2000) pixels")
    assert sorted(os.listdir(out)) == [f"{i}_{kind}.png" for i in (0, 2, 4) for kind in ("labels", "overlay")]
    assert captured.out == (f"wrote 6 files to {out}; skipped 2 of 5 images that could not be segmented "
                            "(--keep-going; named above)\n")  # fmt: skip
    assert main([*args[:-1], str(folder / "0.png")]) == 0  # nothing skipped
    capsys.readouterr()
    # every image skipped: the run wrote nothing, so the --out folders it made are removed, as after an error (it
    # said "wrote 0 files to OUT" and left OUT empty)
    none = tmp_path / "none" / "out"
    assert main([*args[:-2], str(none), str(folder / "1.png"), str(folder / "3.png")]) == 1
    assert not (tmp_path / "none").exists()
    assert capsys.readouterr().out == ("wrote nothing: skipped all 2 images, which could not be segmented "
                                       "(--keep-going; named above)\n")  # fmt: skip


def test_segment_names_an_image_past_pillows_pixel_limit(checkpoint, images, tmp_path, monkeypatch):
    """An image past PIL.Image.MAX_IMAGE_PIXELS (up to twice which Pillow reads it) is segmented with one warning
    naming it, not Pillow's, which names no file; the warnings filter is as it was afterwards."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 64 - 1)  # a.png (48x64) is past it, b.jpg (37x51) not
    args = ["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--io-threads", "2", "--out",
            str(tmp_path / "out"), *map(str, images)]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        assert main(args) == 0
        assert warnings.filters == filters
    said = [str(w.message) for w in caught]
    assert [m for m in said if "pixels" in m] == [
        f"{images[0]}: 3072 pixels, more than PIL.Image.MAX_IMAGE_PIXELS (3071): segmented as a trusted image "
        "(Pillow refuses past twice the limit)"
    ]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_segment_with_classes(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", "--checkpoint", str(checkpoint), "--out", str(out), str(images[0])]
    assert main([*args, "--classes", "sky,road,tree,grass"]) == 0
    assert main([*args, "--classes", "sky,road"]) == 2
    err = capsys.readouterr().err
    assert "exactly 4 names" in err and "--open-vocab" in err
    assert main([*args, "--classes", "sky,road", "--open-vocab"]) == 0
    assert main([*args, "--classes", "sky,road", "--open-vocab", "--mode", "whole"]) == 0  # what it does anyway
    assert np.asarray(Image.open(out / "a_labels.png")).max() < 2  # the two names' labels
    assert main([*args, "--classes", "sky,road,sky,grass"]) == 0  # a trained head's names may repeat
    assert main([*args, "--classes", "sky,,road"]) == 2
    assert "non-empty names" in capsys.readouterr().err
    for extra in ([], ["--open-vocab"]):  # a name too long is about --classes, whether or not --open-vocab is given
        assert main([*args, "--classes", "sky,road,tree,a very long name indeed", *extra]) == 2
        err = capsys.readouterr().err
        assert err == ("denseclip-fast: error: --classes: class name 'a very long name indeed' has 5 BPE tokens; at "
                       "most 3 fit (context length 5 includes SOT and EOT)\n")  # fmt: skip
    # (aoti: an ONNX format would stop earlier where onnxscript is not installed)
    export = ["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--out", str(tmp_path / "m.pt2")]
    assert main([*export, "--classes", "sky,road"]) == 2
    err = capsys.readouterr().err  # says what to do on the command line, not in Python
    assert err.startswith("denseclip-fast: error: --classes needs exactly 4 names (the checkpoint's head has 4 outputs)"
                          ", got 2") and "open_vocab_scores" not in err, err  # fmt: skip
    assert not (tmp_path / "m.pt2").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("denseclip-fast: error: ") and "no such file" in err and err.count("\n") == 1


def test_console_script_is_installed():
    import importlib.metadata

    try:
        importlib.metadata.distribution("denseclip_fast")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH (the GPU check) installs nothing
        pytest.skip("denseclip_fast is not pip-installed in this environment")
    exe = os.path.join(os.path.dirname(sys.executable), "denseclip-fast")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "segment" in result.stdout and "info" in result.stdout


def test_version_and_python_dash_m(capsys):
    """--version prints the package's and torch's versions and exits 0; ``python -m denseclip_fast`` is the command."""
    import torch

    import denseclip_fast

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"denseclip-fast {denseclip_fast.__version__} (torch {torch.__version__})\n"
    result = subprocess.run([sys.executable, "-m", "denseclip_fast", "info"], capture_output=True, text=True,
                            cwd=ROOT, env=with_root_on_path())  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("denseclip-fast: error: info needs the checkpoint to "
                                                               "describe"), result.stderr  # fmt: skip


def test_export_onnx_with_verification(varied, tmp_path, capsys, monkeypatch):
    """On a checkpoint whose outputs depend on the text path (the default initialisation's gamma of 1e-4 left the
    context decoder out of what --verify compares)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "tiny.onnx"
    checkpoint = varied[0]
    args = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--image-size", "64x96",
            "--classes", "sky,dog,tree,road", "--verify"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (image graph, float32, opset 18); TensorRT operator check: all nodes supported" in printed
    err = float(printed.split("relative error ")[1].split()[0])
    assert err <= 1e-4
    from denseclip_fast.export import read_metadata

    meta = read_metadata(out)
    assert json.loads(meta["class_names"]) == ["sky", "dog", "tree", "road"]
    assert json.loads(meta["image_size"]) == [64, 96]
    from denseclip_fast import cli

    for off in (3e-4, float("nan")):  # a graph that does not compute what the model does fails the command
        monkeypatch.setattr(cli, "_verify_onnx", lambda *args, off=off: off)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == (f"denseclip-fast: error: --verify: the graph's output is off by a relative error of {off:.2e}, "
                       f"more than the 1e-04 a float32 graph stays within: {out} does not compute what the checkpoint "
                       "does (a bug: please report it)\n")  # fmt: skip


def test_export_verifies_a_symlinked_graph_with_its_weights_file(checkpoint, tmp_path, capsys, monkeypatch):
    """--out a symlink, the weights in a file of their own (graphs past 1.5 GiB): the graph the link points to is
    replaced with its weights file beside it, and --verify reads it there (ONNX Runtime looks for the weights beside
    the path it is given, so the link's path failed)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from denseclip_fast.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.onnx").write_bytes(b"")
    link = tmp_path / "current.onnx"
    os.symlink(tmp_path / "models" / "tiny.onnx", link)
    args = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(link), "--image-size", "64",
            "--verify"]  # fmt: skip
    assert main(args) == 0
    assert float(capsys.readouterr().out.split("relative error ")[1].split()[0]) <= 1e-4
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["current.onnx", "models"]
    (weights,) = [p.name for p in (tmp_path / "models").iterdir() if p.name.endswith(".data")]
    assert weights.startswith("tiny.onnx.")


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        tensorrt = None
    if tensorrt is None and importlib.util.find_spec("onnxscript"):  # (else that is said first: see the next test)
        args = ["export", "--checkpoint", str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path / "m.engine")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("denseclip-fast: error: TensorRT is not installed") and err.count("\n") == 1
        assert not (tmp_path / "m.onnx").exists()  # said before any work
    args = ["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--graph", "text",
            "--out", str(tmp_path / "t.pt2")]  # fmt: skip
    assert main(args) == 2
    assert "--format aoti compiles the image graph only" in capsys.readouterr().err
    args = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--image-size", "big",
            "--out", str(tmp_path / "x")]  # fmt: skip
    assert main(args) == 2
    assert "--image-size must be N or HxW" in capsys.readouterr().err


def test_export_paths_and_profiles_are_checked_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """--trt-batch 4,1,2 was refused by the TensorRT build, naming "batch", after the ONNX graph had been exported
    and written; --out ending in a separator wrote a file of the folder's name. Both are one line, before work. OPT
    must lie between MIN and MAX too: 2,1,4 and 1,8,4 (a mutation comparing MIN with MAX alone passed the profiles
    with MIN > MAX)."""
    from unittest import mock

    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock())  # TensorRT is looked for first
    trt = ["export", "--checkpoint", str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path / "m.engine")]
    for batch in ("4,1,2", "0,1,1", "2,1,4", "1,8,4"):
        assert main([*trt, "--trt-batch", batch]) == 2
        err = capsys.readouterr().err
        assert err == f"denseclip-fast: error: --trt-batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got " \
                      f"'{batch}'\n", err
    for out in ("new/", "m.onnx/"):
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", f"{tmp_path}/{out}"]) == 2
        assert f"--out '{tmp_path}/{out}' ends in a path separator" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_an_output_that_is_the_checkpoint_is_refused(checkpoint, data, tmp_path, capsys, monkeypatch):
    """export --out (or the ONNX graph beside a TensorRT engine) and eval --out naming the --checkpoint file, itself,
    through a symbolic link or a hard link, replaced the checkpoint with the graph or the JSON and exited 0 (a
    review's finding). Refused in one line, the checkpoint untouched."""
    from unittest import mock

    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock())  # TensorRT is looked for first
    own = tmp_path / "own.onnx"  # a checkpoint may have any name
    shutil.copy(checkpoint, own)
    before = own.read_bytes()
    os.symlink(own, tmp_path / "link")
    os.link(own, tmp_path / "hard")
    export = ["export", "--checkpoint", str(own), "--image-size", "32"]
    cases = [([*export, "--format", "onnx", "--out", str(out)], out, "--out")
             for out in (own, tmp_path / "link", tmp_path / "hard")]  # fmt: skip
    cases.append(([*export, "--format", "tensorrt", "--out", str(tmp_path / "own.engine")], own, "--out's ONNX graph"))
    evaluate = ["eval", "--checkpoint", str(own), "--data", str(data), "--layout", "generic"]
    cases.append(([*evaluate, "--out", str(tmp_path / "link")], tmp_path / "link", "--out"))
    for argv, out, name in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == (f"denseclip-fast: error: {name} {str(out)!r} is the --checkpoint file "
                                           f"{str(own)!r}: writing it would replace that file; choose another "
                                           "path\n")  # fmt: skip
    assert own.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["hard", "link", "own.onnx"]


def test_eval_out_that_is_a_file_of_the_data_set_is_refused(checkpoint, data, tmp_path, capsys):
    """eval --out naming a file of --data (classes.txt, a label, through a link too) replaced it with the JSON, exit
    0, and the next run read the JSON as class names (a review's finding). Refused, the file untouched; a new file
    in the data set's folder is not a data set file and is written."""
    classes = os.path.join(data, "classes.txt")
    before = Path(classes).read_bytes()
    os.symlink(classes, tmp_path / "to_classes")
    evaluate = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic"]
    for out in (classes, str(tmp_path / "to_classes")):
        assert main([*evaluate, "--out", out]) == 2
        assert capsys.readouterr().err == (f"denseclip-fast: error: --out {out!r} is a file of the data set --data "
                                           f"{str(data)!r}: writing it would replace it; choose another path\n")
    assert Path(classes).read_bytes() == before
    from denseclip_fast.validation import check_not_in_folder

    check_not_in_folder(os.path.join(data, "new.json"), "--out", str(data), "the data set --data")  # not there yet


def test_export_without_a_usable_onnxscript_says_what_to_install_before_loading(checkpoint, tmp_path, capsys,
                                                                                 monkeypatch):
    """onnxscript missing or older than 0.7 (whose passes fail inside torch.onnx): one line for the ONNX-based
    formats, before the checkpoint is loaded (and before TensorRT's check: its advice, --format onnx, needs
    onnxscript too); onnxruntime only with --verify; --format aoti needs none of them."""
    from denseclip_fast.export import onnx as onnx_export

    _loading_fails(monkeypatch, "onnxscript was checked")
    for installed, says in (("0.6.2", "and this environment has 0.6.2"), (None, "needs onnxscript, not installed")):
        monkeypatch.setattr(onnx_export, "_installed", lambda name, v=installed: v if name == "onnxscript" else "1.23")
        for fmt, out in (("onnx", "m.onnx"), ("tensorrt", "m.engine")):
            args = ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path / out)]
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith("denseclip-fast: error: ONNX export needs onnxscript") and says in err, err
            assert "pip install 'denseclip_fast[export]'" in err and err.count("\n") == 1
    monkeypatch.setattr(onnx_export, "_installed", lambda name: None if name == "onnxruntime" else "1.0")
    args = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*args, "--verify"]) == 2
    assert capsys.readouterr().err.startswith("denseclip-fast: error: --verify needs onnxruntime, not installed here")
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):  # they are imported by the check
        with pytest.raises(AssertionError, match="the checkpoint was loaded"):  # without --verify: onnxruntime unused
            main(args)
    args = ["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--out", str(tmp_path / "m.pt2")]
    with pytest.raises(AssertionError, match="the checkpoint was loaded"):  # past the check: aoti needs no onnx
        main(args)
    assert os.listdir(tmp_path) == []


def test_option_combinations_are_refused_naming_the_options_before_any_work(checkpoint, images, tmp_path, capsys,
                                                                           monkeypatch):
    """Options that cannot go together are said in the options' words before the checkpoint is loaded: float16
    needs CUDA, ONNX graphs are float32 or float16, --fp16/--bf16 are TensorRT's, aoti compiles the image graph,
    open-vocabulary names must differ (a trained head's may repeat)."""

    _loading_fails(monkeypatch, "the options were checked")
    seg = ["segment", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "seg"), str(images[0])]
    exp = ["export", "--checkpoint", str(checkpoint)]
    cases = [
        ([*seg, "--dtype", "float16", "--device", "cpu"],
         "--dtype float16 needs --device cuda, got --device cpu; on the CPU use --dtype float32 or bfloat16"),
        ([*exp, "--format", "aoti", "--out", str(tmp_path / "m.pt2"), "--dtype", "fp16", "--device", "cpu"],
         "--dtype fp16 needs --device cuda, got --device cpu"),
        ([*exp, "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--dtype", "bfloat16"],
         "--dtype bfloat16 is not an ONNX graph dtype: --format onnx takes --dtype float32 or float16 (for bfloat16 "
         "TensorRT layers: --format tensorrt --bf16, which builds from the float32 graph)"),
        ([*exp, "--format", "tensorrt", "--out", str(tmp_path / "m.engine"), "--dtype", "bf16"],  # before TensorRT
         "--dtype bf16 is not an ONNX graph dtype: --format tensorrt takes --dtype float32 or float16"),
        ([*exp, "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--fp16"],
         "--fp16 applies to --format tensorrt (the engine's layer precisions); --format onnx takes --dtype"),
        ([*exp, "--format", "aoti", "--out", str(tmp_path / "m.pt2"), "--bf16"], "--bf16 applies to --format tensorrt"),
        ([*exp, "--format", "aoti", "--out", str(tmp_path / "m.pt2"), "--graph", "text"],
         "--format aoti compiles the image graph only (--graph image)"),
        ([*exp, "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--classes", "sky,,road"],
         "--classes must be a comma-separated list of non-empty names, got 'sky,,road'"),
        ([*seg, "--open-vocab", "--classes", "cat,dog,cat"],
         "--classes: class name 2 ('cat') repeats class name 0; class names must differ"),
        ([*seg, "--open-vocab", "--classes", "Cat,dog,cat"],  # alike as tokens: refused before loading too
         "--classes: class name 2 ('cat') has the same BPE tokens as class name 0 ('Cat')"),
        ([*seg, "--open-vocab"], "--open-vocab needs --classes"),
        ([*seg, "--open-vocab", "--classes", "sky,road", "--mode", "slide"],  # (--mode whole: what it does, taken)
         "--mode applies to the trained head's labels; --open-vocab scores the whole image with the pixel-text map, "
         "got --mode slide"),
        ([*seg, "--open-vocab", "--classes", ",".join(f"c{i}" for i in range(65537))],  # 16-bit label PNGs
         "--classes: 65537 names; NAME_labels.png holds class indices in 16 bits, so at most 65536 names"),
    ]  # fmt: skip
    onnx, trt, aoti = ([*exp, "--format", f, "--out", str(tmp_path / f"m.{suffix}")]
                       for f, suffix in (("onnx", "onnx"), ("tensorrt", "engine"), ("aoti", "pt2")))  # fmt: skip
    cases += [  # options that do not apply to the format or the graph: refused, not ignored (before TensorRT's check)
        ([*aoti, "--verify"], "--verify applies to --format onnx and tensorrt (runs the ONNX graph in ONNX Runtime "
                              "against PyTorch); --format aoti writes no ONNX graph"),
        ([*aoti, "--opset", "18"], "--opset applies to --format onnx and tensorrt (the ONNX graph's opset); --format "
                                   "aoti writes no ONNX graph"),
        ([*aoti, "--trt-batch", "1,1,4"], "--trt-batch applies to --format tensorrt (the engine's batch profile); "
                                          "--format aoti takes --max-batch"),
        ([*onnx, "--max-batch", "8"], "--max-batch applies to --format aoti (the package's largest batch); --format "
                                      "onnx takes any batch (the ONNX graph's is dynamic)"),
        ([*trt, "--max-batch", "8"], "--max-batch applies to --format aoti (the package's largest batch); --format "
                                     "tensorrt takes --trt-batch MIN,OPT,MAX"),
        ([*onnx, "--trt-batch", "1,1,4"], "--trt-batch applies to --format tensorrt (the engine's batch profile); "
                                          "--format onnx takes any batch"),
        ([*onnx, "--device", "cpu"], "--device applies to --format aoti (the package's device); --format onnx "
                                     "exports the ONNX graph on the CPU"),
        ([*onnx, "--device", "cuda:7"], "--device applies to --format aoti"),  # refused, not checked against the GPUs
        ([*onnx, "--graph", "text", "--image-size", "64"],
         "--image-size applies to the image graphs (--graph image or image_with_text); --graph text maps class "
         "tokens to class embeddings"),
        ([*trt, "--dtype", "fp16", "--bf16"], "--bf16 applies to a float32 graph (--dtype float32, the default): a "
                                              "--dtype fp16 graph is built strongly typed, in the precisions it was "
                                              "exported with"),
    ]  # fmt: skip
    if not torch.cuda.is_available():  # the default device is the CPU
        message = "--dtype float16 needs --device cuda, and this machine has no CUDA GPU; on the CPU use --dtype"
        cases.append(([*seg, "--dtype", "float16"], message))
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"denseclip-fast: error: {message}") and err.count("\n") == 1, (args, err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("device, message", [("gpu", "must be a device such as 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
                                             ("", "must be a device such as 'cpu', 'cuda' or 'cuda:N', got ''"),
                                             ("meta", "must be a CPU or CUDA device"),
                                             ("cuda:99", "is 'cuda:99' but "),
                                             ("cpu:7", "'cpu:7': the CPU is one device, 'cpu'")])  # fmt: skip
def test_bad_devices_are_one_line_naming_the_option(checkpoint, images, tmp_path, capsys, device, message):
    """Every command checks --device the same way before any work: a string torch does not parse, an empty one
    (not "the default"), a device type the engine does not run on, a GPU that is not there."""
    commands = (["segment", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "seg"), str(images[0])],
                ["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path), "--layout", "generic"],
                ["train", "--data", str(tmp_path), "--layout", "generic", "--work-dir", str(tmp_path / "w")],
                ["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--out", str(tmp_path / "m.pt2")])
    for command in commands:
        assert main([*command, "--device", device]) == 2, command
        err = capsys.readouterr().err
        assert err == f"denseclip-fast: error: --device {message}" + err.split(message, 1)[1], command
        assert err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_file_system_and_floating_point_errors_are_one_line(checkpoint, images, tmp_path, capsys, monkeypatch):
    """An OSError (here a result file's path taken by a directory) names its path; a non-finite training run is
    one line too, not a traceback."""
    out = tmp_path / "out"
    (out / "a_labels.png").mkdir(parents=True)
    assert main(["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--out", str(out), str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err == f"denseclip-fast: error: {out / 'a_labels.png'}: cannot write the label map: Is a directory\n"

    def diverge(cfg, resume=None):
        raise FloatingPointError("the loss is not finite at iteration 3")

    monkeypatch.setattr("denseclip_fast.train.train", diverge)
    assert main(["train", "--data", str(tmp_path), "--layout", "generic", "--work-dir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == "denseclip-fast: error: the loss is not finite at iteration 3\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A generic-layout data set of one 40x40 image for the checkpoint's classes."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "labels" / "x.png")
    (root / "classes.txt").write_text("\n".join(NAMES))
    return root


def _copy_data(data, root, classes):
    """The ``data`` fixture's image and label under ``root``, with ``classes`` as its classes.txt."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        (root / sub / "x.png").write_bytes((data / sub / "x.png").read_bytes())
    (root / "classes.txt").write_text("\n".join(classes))
    return root


def test_eval_says_where_its_class_names_come_from(checkpoint, data, tmp_path, capsys):
    """eval loads the checkpoint with the data set's class names: a class list that does not fit the checkpoint is
    named (classes.txt, or the ADE20K layout's list), with what the checkpoint has; repeated names keep one entry
    each in the JSON."""
    base = ["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "e.json")]
    ev = [*base, "--layout", "generic", "--data"]
    five = _copy_data(data, tmp_path / "five", [*NAMES, "dog"])
    assert main([*ev, str(five)]) == 2
    assert capsys.readouterr().err == (
        f"denseclip-fast: error: the data set's class list {five / 'classes.txt'} has 5 names but the checkpoint "
        f"{checkpoint} has 4 classes (its head's outputs); eval needs a data set of the checkpoint's classes, in its "
        "order\n"
    )
    long = _copy_data(data, tmp_path / "long", ["sky", "road", "tree", "a very long name indeed"])
    assert main([*ev, str(long)]) == 2
    assert capsys.readouterr().err == (
        f"denseclip-fast: error: the data set's class list {long / 'classes.txt'}: class name 'a very long name "
        "indeed' has 5 BPE tokens; at most 3 fit (context length 5 includes SOT and EOT)\n"
    )
    ade = tmp_path / "ade"
    for sub, source in (("images", "images"), ("annotations", "labels")):
        (ade / sub / "validation").mkdir(parents=True)
        (ade / sub / "validation" / "x.png").write_bytes((data / source / "x.png").read_bytes())
    assert main([*base, "--layout", "ade20k", "--data", str(ade)]) == 2
    assert capsys.readouterr().err.startswith(
        "denseclip-fast: error: --layout ade20k's class list (the 150 ADE20K classes) has 150 names but the "
        f"checkpoint {checkpoint} has 4 classes"
    )
    assert not (tmp_path / "e.json").exists()
    repeated = _copy_data(data, tmp_path / "repeated", ["wall", "wall", "cat", "bed"])
    assert main([*ev, str(repeated), "--mode", "whole", "--device", "cpu"]) == 0
    per_class = json.loads((tmp_path / "e.json").read_text())["per_class"]
    assert list(per_class) == ["wall [0]", "wall [1]", "cat", "bed"]


def test_output_paths_are_checked_before_any_work(checkpoint, images, data, tmp_path, capsys):
    """An output path that cannot be written (a file where a directory goes, a directory where a file goes, a
    missing parent where none is created) is one line naming the option before any work, not an OSError after it."""
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("gone")  # a dangling link
    seg = ["segment", "--checkpoint", str(checkpoint), str(images[0]), "--out"]
    exp = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out"]
    ev = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic", "--out"]
    tr = ["train", "--data", str(data), "--layout", "generic", "--arch", "RN50", "--work-dir"]
    for args, message in (
        ([*seg, str(tmp_path / "file")], f"--out {str(tmp_path / 'file')!r} exists and is not a directory"),
        ([*seg, str(tmp_path / "file" / "sub")], f"cannot be created: {str(tmp_path / 'file')!r} is not a"),
        ([*exp, str(tmp_path / "dir")], f"--out {str(tmp_path / 'dir')!r} is a directory; expected the path of"),
        ([*ev, str(tmp_path / "dir")], f"--out {str(tmp_path / 'dir')!r} is a directory"),
        ([*ev, str(tmp_path / "missing" / "e.json")], f"the directory {str(tmp_path / 'missing')!r} does not exist"),
        ([*tr, str(tmp_path / "file")], f"work_dir {str(tmp_path / 'file')!r} exists and is not a directory"),
        ([*seg, str(tmp_path / "link")], f"--out {str(tmp_path / 'link')!r} is a symbolic link to 'gone', which "
                                         "cannot be reached"),  # was "exists and is not a directory"
        ([*tr, str(tmp_path / "link")], f"work_dir {str(tmp_path / 'link')!r} is a symbolic link to 'gone'"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("denseclip-fast: error: ") and message in err and err.count("\n") == 1, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["dir", "file", "link"] and os.listdir(tmp_path / "dir") == []


def test_bad_training_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "syntax.yaml").write_text("iters: [1, 2\n")
    (tmp_path / "python.yaml").write_text('iters: !!python/object/apply:os.system ["echo hi"]\n')
    (tmp_path / "broken.json").write_text('{"iters": ')
    for name, message in (("missing.yaml", "missing.yaml' does not exist"),
                          ("dir.yaml", "dir.yaml' is not a regular file"),
                          ("syntax.yaml", "syntax.yaml' is not valid YAML: expected ',' or ']'"),
                          ("python.yaml", "python.yaml' is not valid YAML: could not determine a constructor for the "
                                          "tag 'tag:yaml.org,2002:python/object/apply:os.system' (line 1"),
                          ("broken.json", "broken.json' is not valid JSON")):  # fmt: skip
        assert main(["train", str(tmp_path / name), "--print-config"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("denseclip-fast: error: training config ") and message in err, err
        assert err.count("\n") == 1, err


def test_a_training_setting_refused_is_said_without_the_random_weights_warning_first(tmp_path, capsys):
    """A run without --init warns that it starts from random weights; a setting train refuses (--iters 0) was said
    after that warning, two lines for one mistake, where the command promises the error's one line."""
    (tmp_path / "data").mkdir()
    args = ["train", "--data", str(tmp_path / "data"), "--layout", "generic", "--work-dir", str(tmp_path / "w"),
            "--device", "cpu", "--iters", "0"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 2
    assert capsys.readouterr().err == "denseclip-fast: error: iters must be an int >= 1, got 0\n"
    assert [str(w.message) for w in caught] == []


def test_export_limits_are_said_in_the_options_words_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    """The exporters' limits (a .pt2 package, a batch range traced from 2, ONNX opsets 18..20) are checked by the
    command with the options' names, before the checkpoint is loaded, not by the library after it (which names its
    own arguments: path, max_batch, opset)."""

    _loading_fails(monkeypatch, "the options were checked")
    exp = ["export", "--checkpoint", str(checkpoint), "--format"]
    out, bare = str(tmp_path / "m.onnx"), str(tmp_path / ".pt2")
    for args, message in (
        ([*exp, "aoti", "--out", out], f"--out must end in .pt2 for --format aoti (AOTInductor packages are .pt2 "
                                       f"archives), got {out!r}"),
        ([*exp, "aoti", "--out", str(tmp_path / "m.pt2"), "--max-batch", "1"],
         "--max-batch must be >= 2 and <= 65536, got 1 (a package takes any batch from 1 to --max-batch; "
         "torch.export traces the batch as dynamic from 2: for batch 1, --max-batch 2)"),
        ([*exp, "aoti", "--out", str(tmp_path / "m.pt2"), "--max-batch", "9999999999999999999999"],
         "--max-batch must be >= 2 and <= 65536, got 9999999999999999999999 (a package takes any batch from 1 to "
         "--max-batch; torch.export traces the batch as dynamic from 2: for batch 1, --max-batch 2)"),
        ([*exp, "aoti", "--out", bare], f"--out must end in .pt2 for --format aoti (AOTInductor packages are .pt2 "
                                        f"archives), got {bare!r}"),  # a name that is only the suffix has none
        ([*exp, "onnx", "--out", out, "--opset", "17"], "--opset must be in 18..20, got 17"),
        ([*exp, "tensorrt", "--out", str(tmp_path / "m.engine"), "--opset", "21"], "--opset must be in 18..20, got 21"),
    ):  # fmt: skip
        assert main(args) == 2, args
        assert capsys.readouterr().err == f"denseclip-fast: error: {message}\n", args
    assert os.listdir(tmp_path) == []


def test_bad_numbers_are_one_line_naming_the_option_before_any_work(checkpoint, data, tmp_path, capsys):
    """--scales that no image could be evaluated at (not finite, not positive, or a test scale under the network's
    32 pixels) and sizes int() refuses are refused before the evaluation or the export starts."""
    ev = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic",
          "--out", str(tmp_path / "e.json")]  # fmt: skip
    commas = "--scales must be comma-separated numbers, e.g. 0.5,0.75,1.0"
    for scales, message in (("nan", "--scales must be finite ratios > 0 of the test scale, got nan"),
                            ("1,inf", "--scales must be finite ratios > 0 of the test scale, got inf"),
                            ("0", "--scales must be finite ratios > 0 of the test scale, got 0.0"),
                            ("-1", "--scales must be finite ratios > 0 of the test scale, got -1.0"),
                            ("0.001", "--scales: 0.001 x the test scale (2048, 512) leaves 0 pixels for the short "
                                      "side, under the network's 32; use ratios >= 0.0625"),
                            ("1,x", f"{commas}, got '1,x'"), ("1;2", f"{commas}, got '1;2'")):  # fmt: skip
        assert main([*ev, "--scales", scales]) == 2, scales
        assert capsys.readouterr().err == f"denseclip-fast: error: {message}\n"
    assert main([*ev, "--ignore-index", "-1"]) == 2
    assert capsys.readouterr().err.startswith("denseclip-fast: error: --ignore-index must be a label value in 0..65535")
    exp = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    for size, message in (("\u00b2", "--image-size must be N or HxW"), ("16x64", "--image-size must be 32 to 8192 on "),
                          ("99999999", "--image-size must be 32 to 8192 on each side, got '99999999'")):  # fmt: skip
        assert main([*exp, "--image-size", size]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"denseclip-fast: error: {message}") and err.count("\n") == 1, err
    trt = ["export", "--checkpoint", str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path / "m.engine")]
    assert main([*trt, "--trt-batch", "1,\u00b2,4"]) == 2  # before TensorRT is looked for (not installed here)
    assert capsys.readouterr().err.startswith("denseclip-fast: error: --trt-batch must be MIN,OPT,MAX (e.g. ")
    for command in ([*exp[:-1], ""], [*ev[:-1], ""]):  # an empty --out: export's, and eval's (not its default)
        assert main(command) == 2
        assert capsys.readouterr().err == "denseclip-fast: error: --out must name a file, got ''\n"
    assert main([*exp, "--image-size", ""]) == 2  # exported at the default size before
    assert capsys.readouterr().err == ("denseclip-fast: error: --image-size must be N or HxW (e.g. 512 or "
                                       "512x1024), got ''\n")  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_images_too_elongated_for_the_network_are_named_by_their_file(checkpoint, data, tmp_path, capsys):
    """A 2x300 image is resized to fit the test scale (2048, 512) to 14x2048, under the network's 32 pixels: segment
    and eval name its file (eval before the evaluation starts, from the headers)."""
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((2, 300, 3), np.uint8)).save(thin)
    message = "of (2, 300) pixels is resized to (14, 2048) to fit the test scale (2048, 512), under the network's 32"
    assert main(["segment", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), str(thin)]) == 2
    assert capsys.readouterr().err.startswith(f"denseclip-fast: error: {thin} {message}")
    thin_data = tmp_path / "data"
    for sub in ("images", "labels"):
        (thin_data / sub).mkdir(parents=True)
        (thin_data / sub / "a.png").write_bytes((data / sub / "x.png").read_bytes())
    Image.fromarray(np.zeros((2, 300), np.uint8)).save(thin_data / "labels" / "b.png")
    (thin_data / "images" / "b.png").write_bytes(thin.read_bytes())
    (thin_data / "classes.txt").write_text("\n".join(NAMES))
    out = tmp_path / "e.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(thin_data), "--layout", "generic", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"denseclip-fast: error: {thin_data / 'images' / 'b.png'} {message} pixels a side (too elongated)\n"


def test_warnings_print_as_one_line(tmp_path):
    """A warning (here: a 150-class checkpoint without class names, taken as ADE20K) prints as one
    'denseclip-fast: warning:' line, not Python's file:line header over the source line that raised it."""
    from benchmarks.official import OfficialDenseCLIP

    from .conftest import official_cfg

    path = tmp_path / "ade.pth"
    torch.save(OfficialDenseCLIP(official_cfg(tiny_config("resnet")), list(ADE20K_CLASSES)).state_dict(), path)
    code = "import sys; from denseclip_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "ADE20K" in line]
    assert warning == [f"denseclip-fast: warning: {path}: no class names in the file (meta['CLASSES']); assuming the "
                       "150 ADE20K classes (segment and export name them with --classes)"], result.stderr  # fmt: skip
    assert "warnings.warn(" not in result.stderr
    # a filter on the warning's category silences it, in the command as in the API
    ignore = ("import warnings; from denseclip_fast.checkpoints import AssumedADE20KClasses; "
              "warnings.filterwarnings('ignore', category=AssumedADE20KClasses); ")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", ignore + code, "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "ADE20K" not in result.stderr, result.stderr
    # names given with --classes: nothing assumed, nothing said (the Python API's hint, class_names=, was printed)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    names = ",".join(a + b for a in "bcdfghklmp" for b in "abcdefghijklmnopqrstuvwxyz")[: 150 * 3 - 1]  # 150 names
    for command in (["segment", "--out", str(tmp_path / "out"), str(image)], ["export", "--format", "onnx", "--out",
                                                                              str(tmp_path / "m.onnx")]):  # fmt: skip
        args = [command[0], "--checkpoint", str(path), "--classes", names, *command[1:]]
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert result.returncode == 0 and "ADE20K" not in result.stderr, result.stderr


def test_eval_of_a_split_without_labelled_pixels_writes_valid_json(checkpoint, data, tmp_path, capsys):
    """Every label ignored: no metric is defined. The JSON says null (a bare NaN is not JSON: strict readers refused
    the file) and stderr says why."""
    root = tmp_path / "unlabelled"
    _copy_data(data, root, NAMES)
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(root / "labels" / "x.png")
    out = tmp_path / "e.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--layout", "generic", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "have no labelled pixel (every label is the ignore index 255): no metric is defined" in printed.err
    assert printed.out.startswith("mIoU n/a  aAcc n/a  mAcc n/a  (1 images, ")
    result = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert result["mIoU"] is None and result["aAcc"] is None and result["mAcc"] is None and result["images"] == 1


def test_a_file_that_names_no_classes_takes_them_from_classes(images, tmp_path, capsys):
    """A bare state dict whose head is not ADE20K's names no classes: info says so, --classes names them (segment,
    export), open-vocabulary scoring needs none of them, and without --classes the error says to give them."""
    bare = tmp_path / "bare.pth"
    torch.manual_seed(0)
    torch.save(DenseCLIP(tiny_config("resnet"), NAMES).state_dict(), bare)
    assert main(["info", str(bare)]) == 0
    assert "classes      4: (the file names none that fit its head)" in capsys.readouterr().out
    assert main(["info", "--json", str(bare)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == 4 and info["classes"] is None
    seg = ["segment", "--checkpoint", str(bare), "--device", "cpu", str(images[0])]
    assert main([*seg, "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: {bare}: the file names no classes; its head has 4 "
                                       "outputs: give their 4 names with --classes (the labels and overlays are the "
                                       "trained head's)\n")  # fmt: skip
    assert not (tmp_path / "none").exists()
    assert main([*seg, "--classes", "sky,road,cat,bed", "--out", str(tmp_path / "named")]) == 0
    assert main([*seg, "--classes", "sky,road", "--out", str(tmp_path / "few")]) == 2
    assert "--classes needs exactly 4 names (the checkpoint's head has 4 outputs), got 2" in capsys.readouterr().err
    assert main([*seg, "--open-vocab", "--classes", "sky,road", "--out", str(tmp_path / "open")]) == 0
    assert sorted(os.listdir(tmp_path / "open")) == ["a_labels.png", "a_overlay.png"]
    labels = np.asarray(Image.open(tmp_path / "named" / "a_labels.png"))
    assert labels.shape == (48, 64) and labels.max() < 4
    onnx = ["export", "--checkpoint", str(bare), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main(onnx) == 2
    assert "give their 4 names with --classes (the exported graphs carry them)" in capsys.readouterr().err


def test_an_empty_checkpoint_path_is_named_by_its_option(capsys):
    for args, option in ((["info", ""], "CHECKPOINT"), (["info", "--checkpoint", ""], "--checkpoint"),
                         (["segment", "--checkpoint", "", "--out", "o", "x.png"],
                         "--checkpoint"), (["eval", "--checkpoint", "", "--data", "d", "--layout", "generic"],
                         "--checkpoint")):  # fmt: skip
        assert main(args) == 2
        assert capsys.readouterr().err == f"denseclip-fast: error: {option} must name a weight file, got ''\n"


def _value_options() -> list[tuple[str, str, str | None]]:
    """(command, option or positional, its metavar) of every argument of every command that takes a value."""
    from denseclip_fast.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if action.nargs != 0 and not isinstance(action, argparse._HelpAction):
                found.append((name, action.option_strings[0] if action.option_strings else action.dest,
                              action.metavar))  # fmt: skip
    return found


@pytest.mark.parametrize(("command", "option", "metavar"), _value_options())
def test_every_value_refuses_an_empty_string(command, option, metavar, checkpoint, images, data, tmp_path,
                                             monkeypatch, capsys):  # fmt: skip
    """Every argument of every command that takes a value, found in the parser (so that one added later is tried
    too), given '' (an unset shell variable) with the others valid: one error line that names the argument and
    shows '', exit 2, before any work (the checkpoint never loaded, no training step). Several were taken as
    "not given" (train's CONFIG trained the default recipe)."""
    from denseclip_fast import cli
    from denseclip_fast.train import loop

    _loading_fails(monkeypatch, f"{option} '' was refused")

    def no_work(*args, **kwargs):
        raise AssertionError(f"the command went to work with {option} ''")

    monkeypatch.setattr(cli, "_load_model", no_work)
    monkeypatch.setattr(loop.Trainer, "run", no_work)
    formats = {"--device": "aoti", "--max-batch": "aoti", "--trt-batch": "tensorrt"}
    base = {
        "info": {"checkpoint": [str(checkpoint)]},
        "segment": {"--checkpoint": [str(checkpoint)], "--out": [str(tmp_path / "o")], "images": [str(images[0])]},
        "export": {"--checkpoint": [str(checkpoint)], "--format": [formats.get(option, "onnx")],
                   "--out": [str(tmp_path / ("m.pt2" if formats.get(option) == "aoti" else "m.onnx"))]},
        "train": {"--data": [str(data)], "--init": ["none"], "--work-dir": [str(tmp_path / "w")], "--iters": ["1"]},
        "eval": {"--checkpoint": [str(checkpoint)], "--data": [str(data)], "--layout": ["generic"]},
    }[command]  # fmt: skip
    if option == "checkpoint_option":  # info's --checkpoint (the positional's other spelling) in its place
        base, option = {"--checkpoint": [""]}, "--checkpoint"
    else:
        base[option] = [""]
    argv = [command]
    for key, values in base.items():
        argv += [*([] if key in ("checkpoint", "images", "config") else [key]), *values]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train's "from random weights"
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusals (an int, a choice)
            code = exc.code
    assert code == 2, argv
    err = capsys.readouterr().err
    named = option if option.startswith("--") else (metavar or option)
    assert err.count("\n") == 1 and "''" in err and named.lower() in err.lower(), (argv, err)


def test_a_file_whose_names_disagree_with_its_head_takes_them_from_classes(images, tmp_path, capsys):
    """A file naming 2 classes for a 4-output head: --classes gives the 4 names (segment and export said to pass
    class_names=[...], a Python argument, though eval took the file), open-vocabulary scoring needs none, info shows
    the head's count, and without --classes the error says what is wrong and what to give."""
    mixed = tmp_path / "mixed.pth"
    torch.save({"state_dict": DenseCLIP(tiny_config("resnet"), NAMES).state_dict(), "meta": {"CLASSES": ["a", "b"]}},
               mixed)  # fmt: skip
    assert main(["info", str(mixed)]) == 0
    assert "classes      4: (the file names none that fit its head)" in capsys.readouterr().out
    seg = ["segment", "--checkpoint", str(mixed), "--device", "cpu", str(images[0])]
    assert main([*seg, "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: {mixed}: the file's 2 class names disagree with its "
                                       "head; its head has 4 outputs: give their 4 names with --classes (the labels "
                                       "and overlays are the trained head's)\n")  # fmt: skip
    assert main([*seg, "--classes", "sky,road,cat,bed", "--out", str(tmp_path / "named")]) == 0
    assert main([*seg, "--open-vocab", "--classes", "sky,road", "--out", str(tmp_path / "open")]) == 0
    assert main([*seg, "--classes", "sky,road", "--out", str(tmp_path / "few")]) == 2
    assert "--classes needs exactly 4 names (the checkpoint's head has 4 outputs), got 2" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_command_quietly(checkpoint, monkeypatch, capsys):
    """info --json | head -1: the command dies by SIGPIPE without a word, as a C tool does (it printed "error: [Errno
    32] Broken pipe" and exited 2); main() returns 141 (128 + SIGPIPE)."""
    import signal

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        command = [sys.executable, "-c", "from denseclip_fast.cli import run; run()", "info", "--json", str(checkpoint)]
        done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == -signal.SIGPIPE and done.stderr == "", (done.returncode, done.stderr)
    from denseclip_fast import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_info", broken)  # the parser takes the command's function when it is built
    assert main(["info", str(checkpoint)]) == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="a device whose writes fail")
@pytest.mark.parametrize("command", [["train", "--arch", "RN50", "--print-config"], ["info", "CHECKPOINT"]])
def test_a_failed_write_to_standard_output_is_named(checkpoint, command):
    """A full disk under `> out.json` (here /dev/full): the error said '[Errno 28] No space left on device', naming
    nothing, or, for an output short enough to be written when the interpreter flushed it at exit, nothing at all
    (exit 120). Every failed write to standard output is one line naming it, exit 2."""
    command = [str(checkpoint) if part == "CHECKPOINT" else part for part in command]
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "denseclip_fast.cli", *command], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    assert done.stderr == "denseclip-fast: error: standard output: No space left on device\n"
    assert done.returncode == 2


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["export", "--format", "xyz"], "denseclip-fast export: error: argument --format: invalid choice: 'xyz' "
                                        "(choose from 'onnx', 'tensorrt', 'aoti') (denseclip-fast export --help"),
        (["segment", "x.png"], "denseclip-fast segment: error: the following arguments are required: --checkpoint, "
                               "--out (denseclip-fast segment --help lists the options)"),
        (["train", "--iters", "abc"], "denseclip-fast train: error: argument --iters: invalid int value: 'abc' "),
        (["segment", "--checkpoint", "c", "x.png", "--out", "o", "--modee", "x"],
         "denseclip-fast segment: error: unrecognized arguments: --modee x (denseclip-fast segment --help lists the "
         "options)"),
        (["--bogus", "info", "x"], "denseclip-fast: error: unrecognized arguments: --bogus (denseclip-fast --help"),
        ([], "denseclip-fast: error: a command is needed: one of info, segment, export, train, eval (denseclip-fast "
             "--help lists the options)"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_line(argv, said, capsys):
    """argparse's errors printed its usage block (up to 9 lines) before the message; README promises one line naming
    the option, as the commands' own errors are."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(said) and err.count("\n") == 1, err


def test_a_command_started_with_standard_output_closed_runs(checkpoint):
    """`denseclip-fast info C >&-`: Python's sys.stdout is None and print writes nothing; main's naming of stdout's
    errors must not make that an AttributeError."""
    done = subprocess.run([sys.executable, "-m", "denseclip_fast.cli", "info", str(checkpoint)], stdout=None,
                          stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")


def test_out_of_memory_is_one_line(checkpoint, monkeypatch, capsys):
    """A weight file too large for the machine (its reader raises MemoryError naming it) is one line, exit 2."""
    import denseclip_fast

    def too_big(path, *args, **kwargs):
        raise MemoryError(f"{path}: not enough memory to read it")

    monkeypatch.setattr(denseclip_fast, "load_checkpoint", too_big)
    assert main(["info", str(checkpoint)]) == 2
    assert capsys.readouterr().err == f"denseclip-fast: error: {checkpoint}: not enough memory to read it\n"
    # torch's allocators raise RuntimeErrors (a trace input, an engine's batch): one line too; other ones are bugs
    for raised, shown in (("DefaultCPUAllocator: can't allocate memory: you tried to allocate 24 bytes", True),
                          ("CUDA out of memory. Tried to allocate 2.00 GiB", True), ("shape mismatch", False)):

        def fails(path, *args, raised=raised, **kwargs):
            raise RuntimeError(raised)

        monkeypatch.setattr(denseclip_fast, "load_checkpoint", fails)
        if shown:
            assert main(["info", str(checkpoint)]) == 2
            assert capsys.readouterr().err == f"denseclip-fast: error: out of memory: {raised}\n"
        else:
            with pytest.raises(RuntimeError, match=raised):
                main(["info", str(checkpoint)])


def test_interrupts_and_sigterm_are_one_line(checkpoint, monkeypatch, capsys):
    """Ctrl-C and SIGTERM (a scheduler's) end a command with one line and the exit code a shell gives a process so
    killed (130, 143), not a traceback; a train run is told how to continue. The SIGTERM handler is the command's
    only: the previous one is back afterwards."""
    import signal

    from denseclip_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info", str(checkpoint)]) == 130
    assert capsys.readouterr().err == "denseclip-fast: interrupted\n"
    monkeypatch.setattr("denseclip_fast.train.train", lambda cfg, resume=None: interrupted(None))
    assert main(["train", "--data", str(checkpoint.parent), "--work-dir", str(checkpoint.parent / "w")]) == 130
    assert capsys.readouterr().err == ("denseclip-fast: interrupted (--resume auto continues it from its last "
                                       "checkpoint, if it saved one)\n")  # fmt: skip

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this thread at once
        return 0

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_info", terminated)
    assert main(["info", str(checkpoint)]) == 143
    assert capsys.readouterr().err == "denseclip-fast: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_forced_backend_that_cannot_run_is_one_line(checkpoint, images, tmp_path, capsys, monkeypatch):
    """DENSECLIP_FAST_BACKEND naming a backend this machine cannot run (cuda without a GPU) is one line naming it
    and why (exit 2), not a RuntimeError traceback."""
    monkeypatch.setenv("DENSECLIP_FAST_BACKEND", "cuda" if not torch.cuda.is_available() else "cpu")
    assert main(["segment", "--checkpoint", str(checkpoint), "--out", str(tmp_path), str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("denseclip-fast: error: ") and err.count("\n") == 1
    assert "(from DENSECLIP_FAST_BACKEND) cannot run this call" in err


def test_results_are_written_whole_or_not_at_all(checkpoint, images, data, tmp_path, capsys, monkeypatch):
    """segment's PNGs and eval's JSON are written under a temporary name and renamed: a write that fails midway
    (a full disk; or a kill) leaves the previous file whole and no partial file, and the error names the file
    asked for. Before, a killed segment left truncated PNGs under their final names and a full disk emptied
    eval's JSON."""
    from PIL import Image as PILImage

    out = tmp_path / "out"
    args = ["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--out", str(out), str(images[0])]
    assert main(args) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save = PILImage.Image.save

    def full_disk(self, fp, *a, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", full_disk)
    assert main(args) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: {out / 'a_labels.png'}: cannot write the label map: "
                                       "No space left on device\n")  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing else there: no partial file
    monkeypatch.setattr(PILImage.Image, "save", save)
    (out / "a_labels.png").chmod(0o604)  # a replaced result keeps its mode, as open() would leave it
    assert main(args) == 0
    assert (out / "a_labels.png").stat().st_mode & 0o777 == 0o604
    capsys.readouterr()

    result = tmp_path / "e.json"
    ev = ["eval", "--checkpoint", str(checkpoint), "--out", str(result), "--layout", "generic", "--data", str(data)]
    assert main(ev) == 0
    capsys.readouterr()
    written = result.read_bytes()

    def full_disk_json(result):  # called with the temporary file open (created, empty), as a full disk fails
        raise OSError(28, "No space left on device")

    evaluation = importlib.import_module("denseclip_fast.train.evaluate")  # the module, not the function
    monkeypatch.setattr(evaluation, "results_json", full_disk_json)
    assert main(ev) == 2
    assert capsys.readouterr().err.endswith(f"\ndenseclip-fast: error: {result}: cannot write the evaluation results: "
                                            "No space left on device\n")  # fmt: skip
    assert result.read_bytes() == written and sorted(os.listdir(tmp_path)) == ["e.json", "out"]


def test_training_from_random_weights_is_warned(tmp_path, monkeypatch):
    """init none (the default without a config) trains from random weights, which no real run wants (DenseCLIP
    fine-tunes CLIP): said in a warning; not when resuming (the weights come from the checkpoint)."""
    import warnings

    monkeypatch.setattr("denseclip_fast.train.train", lambda cfg, resume=None: {"iters": 0})
    args = ["train", "--data", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    with pytest.warns(UserWarning, match=r"training from random weights \(init: none\)"):
        main(args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main([*args, "--resume", "auto"])
        monkeypatch.setenv("RANK", "1")  # torchrun's other processes: said once, by rank 0
        monkeypatch.setenv("WORLD_SIZE", "2")
        main(args)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_the_console_script_dies_by_the_signal_that_interrupted_it(tmp_path):
    """The console script ends by the signal itself after its one line, as an uncaught Ctrl-C does, so that a shell
    loop over it stops on Ctrl-C and a supervisor sees a stop (killed by SIGTERM), not exit 130/143; its buffered
    output is flushed and its atexit handlers run first, as CPython's own exit on Ctrl-C does; an ignored SIGTERM
    (inherited SIG_IGN) stays ignored."""
    import signal

    program = """
import atexit, os, signal, sys, time
from denseclip_fast import cli
atexit.register(lambda: print("atexit ran"))
def interrupted(args):
    print("written before")  # buffered: stdout is a pipe here
    raise KeyboardInterrupt
def terminated(args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print("survived")
    return 0
cli.cmd_info = {"int": interrupted, "term": terminated}[sys.argv[1]]
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.argv[1:] = ["info", "checkpoint"]
cli.run()
"""
    for case, ignore, code, err in (("int", "", -signal.SIGINT, "denseclip-fast: interrupted\n"),
                                    ("term", "", -signal.SIGTERM, "denseclip-fast: terminated\n"),
                                    ("term", "ignore", 0, "")):  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        done = subprocess.run([sys.executable, "-c", program, case, ignore or "-"], capture_output=True, text=True,
                              cwd=tmp_path, env=with_root_on_path(env), timeout=120)  # fmt: skip
        assert (done.returncode, done.stderr) == (code, err), (case, ignore, done.stderr)
        assert ("survived" in done.stdout) == (code == 0)
        assert "atexit ran" in done.stdout  # as before it dies: the interpreter's shutdown is not skipped
        assert ("written before" in done.stdout) == (case == "int")  # buffered output flushed first


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
def test_sigterm_to_the_process_group_is_one_line_with_dataloader_workers(tmp_path):
    """SIGTERM to the whole process group (Slurm's scancel, systemd's stop) ends the DataLoader workers too; their
    SIGCHLD arrived with it during a long C call and printed torch's 'DataLoader worker (pid N) is killed by signal'
    traceback, or, with SIGCHLD reset to its default, 'Signal 17 ignored due to race condition', above the one
    line (7 runs in 8 in a review). Now only the line, and death by SIGTERM."""
    import signal

    program = """
import sys, torch
from torch.utils.data import DataLoader
from denseclip_fast import cli
torch.set_num_threads(1)
def busy(args):
    batches = iter(DataLoader(list(range(1000)), batch_size=1, num_workers=2, persistent_workers=True))
    next(batches)
    print("ready", flush=True)
    a = torch.randn(1500, 1500)
    while True:
        a = (a @ a).clamp_(-1, 1)  # long C calls: both signals wait for the interpreter
cli.cmd_info = busy
sys.argv[1:] = ["info", "checkpoint"]
cli.run()
"""
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, cwd=tmp_path,
                               env=with_root_on_path())  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert (process.returncode, err) == (-signal.SIGTERM, "denseclip-fast: terminated\n")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_workers_end_handled_before_the_sigterm_is_the_sigterm(monkeypatch, capsys):
    """With a SIGTERM to the process group, a DataLoader worker's end can reach torch's SIGCHLD handler first: before
    this process's SIGTERM, or during the first lines of its SIGTERM handler, before that replaces torch's. Its
    RuntimeError ended the command with a traceback (exit 1; 1 run in ~40 of the test above on a loaded machine).
    Both are the one line and exit 143 now, and a dying process keeps SIGCHLD quiet. The message is torch's own: a
    worker of a real DataLoader ended by SIGTERM."""
    import signal

    from torch.utils.data import DataLoader

    from denseclip_fast import cli

    loader = iter(DataLoader(list(range(8)), batch_size=1, num_workers=1, persistent_workers=True))
    next(loader)
    with pytest.raises(RuntimeError) as torchs:  # from torch's SIGCHLD handler, or from the same check called here
        # from another process: a worker exits quietly on its parent's SIGTERM (torch's worker handler)
        subprocess.run([sys.executable, "-c", f"import os; os.kill({loader._workers[0].pid}, {signal.SIGTERM})"])
        for _ in range(600):
            time.sleep(0.1)
            torch.utils.data._utils.signal_handling._error_if_any_worker_fails()
    del loader
    assert cli._worker_terminated(torchs.value), str(torchs.value)
    assert not cli._worker_terminated(RuntimeError(str(torchs.value).replace("Terminated", "Killed")))

    def during_the_handler(args):  # torch's handler running at the SIGTERM handler's first line
        real = signal.signal

        def first_torchs(sig, handler):
            if sig == signal.SIGCHLD:
                raise RuntimeError(str(torchs.value))
            return real(sig, handler)

        monkeypatch.setattr(cli.signal, "signal", first_torchs)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception:  # a command's own error handling sees an interrupt go through, not torch's error
            return 0
        finally:
            monkeypatch.setattr(cli.signal, "signal", real)
        return 0

    def before_the_sigterm(args):
        raise RuntimeError(str(torchs.value))

    monkeypatch.setattr(cli, "_die_by", lambda sig: dying.append((sig, signal.getsignal(signal.SIGCHLD))))
    before = signal.getsignal(signal.SIGCHLD)
    for command in (during_the_handler, before_the_sigterm):
        dying: list = []
        monkeypatch.setattr(cli, "cmd_info", command)
        assert cli.main(["info", "checkpoint"]) == 143
        assert capsys.readouterr().err == "denseclip-fast: terminated\n"
        assert signal.getsignal(signal.SIGCHLD) is before  # restored when main returns
        cli.main(["info", "checkpoint"], die_by_signal=True)
        assert dying == [(signal.SIGTERM, cli._ignore_signal)]  # the console script ends quietly
        signal.signal(signal.SIGCHLD, before)
        capsys.readouterr()
    monkeypatch.setattr(cli, "cmd_info", lambda args: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(["info", "checkpoint"])


@pytest.mark.parametrize("own_process", [False, True])
def test_segment_retains_only_in_its_own_process_on_a_cpu(checkpoint, images, tmp_path, monkeypatch, own_process):
    from denseclip_fast import cli
    from denseclip_fast.engine import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    argv = ["segment", "--checkpoint", str(checkpoint), "--device", "cpu", str(images[0]), "--out", str(tmp_path)]
    assert main(argv, own_process=own_process) == 0
    assert calls == ([1] if own_process else [])  # a caller of main() keeps its process's settings
    for device, expected in (("cpu:0", True), ("cuda", False), ("cuda:1", False)):
        calls.clear()
        cli._retain_on_cpu(argparse.Namespace(own_process=own_process), device)
        assert calls == ([1] if own_process and expected else []), device


def test_segment_options_reach_the_engine_and_the_reader_threads(checkpoint, images, tmp_path, monkeypatch):
    """segment's defaults and options each have their effect: without --mode the engine slides (the official test
    pipeline; whole differs on most images), on a CPU in float32; --io-threads sets the reader/writer pool's size,
    up to its documented bound of 32 inclusive. (A mutation left --io-threads unread, the default mode whole, and
    refused 32: the other tests still passed.)"""
    import concurrent.futures

    import denseclip_fast

    engines, pools = [], []
    real_segmenter, real_pool = denseclip_fast.Segmenter, concurrent.futures.ThreadPoolExecutor

    def segmenter(model, **kwargs):
        engines.append((kwargs["mode"], kwargs["dtype"], kwargs["device"]))
        return real_segmenter(model, **kwargs)

    class Pool(real_pool):
        def __init__(self, max_workers=None, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(denseclip_fast, "Segmenter", segmenter)
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Pool)
    base = ["segment", "--checkpoint", str(checkpoint), "--device", "cpu", str(images[0])]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    assert engines == [("slide", torch.float32, "cpu")] and pools == [1]  # one reader on a CPU: the engine's cores
    for threads in ("3", "32"):
        assert main([*base, "--mode", "whole", "--io-threads", threads, "--out", str(tmp_path / threads)]) == 0
    assert engines[1:] == [("whole", torch.float32, "cpu")] * 2 and pools[1:] == [3, 32]


def test_segment_refuses_an_overlay_that_would_overwrite_an_input(checkpoint, images, tmp_path, capsys):
    """Both of an image's results are checked against the inputs, the overlay as the labels: x.png's x_overlay.png
    in --out, itself an input image there, would be replaced by the overlay (a mutation checking the labels only
    replaced it, exit 0)."""
    (tmp_path / "x.png").write_bytes(images[0].read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_overlay.png").write_bytes(images[1].read_bytes())
    before = (out / "x_overlay.png").read_bytes()
    argv = ["segment", "--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "x.png"),
            str(out / "x_overlay.png")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: the result {out / 'x_overlay.png'} would overwrite the "
                                       f"input image {out / 'x_overlay.png'}; choose another --out\n")  # fmt: skip
    assert (out / "x_overlay.png").read_bytes() == before and os.listdir(out) == ["x_overlay.png"]


def test_segment_label_pngs_are_16_bit_past_256_classes(checkpoint, images, tmp_path):
    """NAME_labels.png holds class indices in 8 bits up to 256 classes (0..255) and in 16 bits past them: with 257
    names index 256 written in 8 bits wrapped to class 0 (a mutation moving the bound by one passed the other
    tests)."""
    for count, mode in ((256, "L"), (257, "I;16")):
        out = tmp_path / str(count)
        names = ",".join([a + b for a in "bcdfghklmp" for b in "abcdefghijklmnopqrstuvwxyz"][:count])
        argv = ["segment", "--checkpoint", str(checkpoint), "--device", "cpu", "--open-vocab", "--classes", names,
                "--out", str(out), str(images[1])]  # fmt: skip
        assert main(argv) == 0
        with Image.open(out / "b_labels.png") as labels:
            assert labels.mode == mode, count
            assert np.asarray(labels).max() < count


def test_export_options_reach_the_exporters(checkpoint, tmp_path, capsys, monkeypatch):
    """export passes each option given to the exporter it names: --max-batch, --image-size, --device and --dtype to
    the AOTInductor package; --opset, --dtype, --graph and --image-size to the ONNX graph; --fp16 (implied by
    --dtype float16), --bf16 and --trt-batch to the TensorRT build, which reads the graph written beside the engine.
    The exporters are stand-ins that record their arguments (a mutation dropping --max-batch, --opset, --dtype or
    float16's --fp16 passed the other tests: the defaults were used silently)."""
    from unittest import mock

    from denseclip_fast import export

    calls = []

    def record(name):
        def exporter(*args, **kwargs):
            calls.append((name, [str(a) for a in args[1:]], kwargs))
            return args[1]

        return exporter

    monkeypatch.setattr(export, "to_aoti", record("aoti"))
    monkeypatch.setattr(export, "to_onnx", record("onnx"))
    monkeypatch.setattr(export, "build_tensorrt_engine", lambda *args, **kwargs: calls.append(
        ("tensorrt", [str(a) for a in args], kwargs)) or args[1])  # fmt: skip
    monkeypatch.setattr(export, "tensorrt_problems", lambda path: [])
    monkeypatch.setattr(export.onnx, "check_onnx_export", lambda runtime=False: None)
    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock())  # TensorRT is looked for first
    exp = ["export", "--checkpoint", str(checkpoint), "--format"]
    pt2, onnx, engine = (str(tmp_path / name) for name in ("m.pt2", "m.onnx", "m.engine"))
    assert main([*exp, "aoti", "--out", pt2, "--max-batch", "8", "--image-size", "64x96", "--device", "cpu",
                 "--dtype", "bf16"]) == 0  # fmt: skip
    assert main([*exp, "aoti", "--out", pt2, "--device", "cpu"]) == 0
    assert main([*exp, "onnx", "--out", onnx, "--opset", "19", "--dtype", "fp16", "--graph", "image_with_text",
                 "--image-size", "96"]) == 0  # fmt: skip
    assert main([*exp, "onnx", "--out", onnx]) == 0
    assert main([*exp, "tensorrt", "--out", engine, "--dtype", "float16", "--trt-batch", "1,2,4"]) == 0
    assert main([*exp, "tensorrt", "--out", engine, "--bf16"]) == 0
    capsys.readouterr()
    aoti = [(path, kw) for name, path, kw in calls if name == "aoti"]
    assert aoti == [([pt2], {"image_size": (64, 96), "max_batch": 8, "device": "cpu", "dtype": torch.bfloat16}),
                    ([pt2], {"image_size": None, "max_batch": 64, "device": "cpu", "dtype": torch.float32})]
    onnx_calls = [(path, kw) for name, path, kw in calls if name == "onnx"]
    assert [(path, kw["graph"], kw["image_size"], kw["dtype"], kw["opset"]) for path, kw in onnx_calls] == [
        ([onnx], "image_with_text", (96, 96), torch.float16, 19), ([onnx], "image", None, torch.float32, 18),
        ([str(tmp_path / "m.onnx")], "image", None, torch.float16, 18), ([str(tmp_path / "m.onnx")], "image", None,
                                                                         torch.float32, 18)]  # fmt: skip
    assert [(path, kw) for name, path, kw in calls if name == "tensorrt"] == [
        ([str(tmp_path / "m.onnx"), engine], {"fp16": True, "bf16": False, "batch": (1, 2, 4)}),
        ([str(tmp_path / "m.onnx"), engine], {"fp16": False, "bf16": True, "batch": None})]


def test_export_bounds_are_inclusive(checkpoint, tmp_path, capsys, monkeypatch):
    """The bounds export states are taken, not refused: --image-size 32 to 8192 on each side, --max-batch 2 to
    65536, --opset 18 to 20, --trt-batch with MIN = OPT = MAX (a mutation refusing a bound itself passed the other
    tests, which try values past the bounds only). Checked before loading, which is stopped here."""
    from unittest import mock

    import denseclip_fast

    _loading_fails(monkeypatch, "the test stopped it")
    monkeypatch.setattr(denseclip_fast.export.onnx, "check_onnx_export", lambda runtime=False: None)
    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock())
    exp = ["export", "--checkpoint", str(checkpoint), "--format"]
    aoti, onnx = [*exp, "aoti", "--out", str(tmp_path / "m.pt2")], [*exp, "onnx", "--out", str(tmp_path / "m.onnx")]
    trt = [*exp, "tensorrt", "--out", str(tmp_path / "m.engine")]
    for extra in (["--image-size", "32x8192"], ["--image-size", "8192x32"], ["--max-batch", "2"],
                  ["--max-batch", "65536"]):  # fmt: skip
        with pytest.raises(AssertionError, match="the checkpoint was loaded"):
            main([*aoti, *extra])
    for extra in (["--opset", "18"], ["--opset", "20"], ["--image-size", "32"]):
        with pytest.raises(AssertionError, match="the checkpoint was loaded"):
            main([*onnx, *extra])
    for batch in ("1,1,1", "2,2,2", "1,4,4"):
        with pytest.raises(AssertionError, match="the checkpoint was loaded"):
            main([*trt, "--trt-batch", batch])
    assert capsys.readouterr().err == "" and os.listdir(tmp_path) == []


def test_eval_options_reach_the_evaluation(checkpoint, data, tmp_path, capsys, monkeypatch):
    """eval's defaults and options each have their effect: sliding windows and float32 by default, --mode, --flip,
    --bf16, --scales and --ignore-index passed on (the last to the data set's labels), and the results written to
    CHECKPOINT_eval.json beside the checkpoint without --out. The evaluation is the real one, its arguments recorded
    (a mutation ignoring --flip, --bf16 or --ignore-index, or changing the default mode or file name, passed the
    other tests)."""
    import denseclip_fast.train

    own = tmp_path / "own.safetensors"
    shutil.copy(checkpoint, own)
    seen = []
    real = denseclip_fast.train.evaluate

    def evaluate(model, data, **kwargs):
        seen.append({"ignore_index": data.ignore_index, **{k: kwargs[k] for k in ("mode", "scales", "flip", "dtype")}})
        return real(model, data, **kwargs)

    monkeypatch.setattr(denseclip_fast.train, "evaluate", evaluate)
    ev = ["eval", "--checkpoint", str(own), "--data", str(data), "--layout", "generic", "--device", "cpu"]
    assert main(ev) == 0
    assert json.loads((tmp_path / "own_eval.json").read_text())["checkpoint"] == str(own)
    assert main([*ev, "--mode", "whole", "--flip", "--bf16", "--scales", "0.5,1.0", "--ignore-index", "7",
                 "--out", str(tmp_path / "e.json")]) == 0  # fmt: skip
    capsys.readouterr()
    assert seen == [{"ignore_index": 255, "mode": "slide", "scales": [1.0], "flip": False, "dtype": None},
                    {"ignore_index": 7, "mode": "whole", "scales": [0.5, 1.0], "flip": True, "dtype": torch.bfloat16}]
    assert sorted(os.listdir(tmp_path)) == ["e.json", "own.safetensors", "own_eval.json"]


def test_a_gpu_index_is_checked_against_the_gpus_present(monkeypatch):
    """check_device with N GPUs takes cuda:0..cuda:N-1 and refuses cuda:N, naming the option (a mutation letting
    cuda:N through passed the other tests, which run without a GPU or name cuda:99). The GPUs are faked: two."""
    from denseclip_fast.validation import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1", "--device") == torch.device("cuda:1")
    assert check_device("cuda", "--device") == torch.device("cuda")
    with pytest.raises(ValueError) as refused:
        check_device("cuda:2", "--device")
    assert str(refused.value) == "--device is 'cuda:2' but this machine has 2 CUDA GPU(s): cuda:0..cuda:1"
    assert check_device("cuda:2", "--device", present=False) == torch.device("cuda:2")  # for another machine


def test_an_output_folder_without_write_permission_is_refused_before_any_work(checkpoint, images, data, tmp_path,
                                                                             capsys, monkeypatch):
    """A folder the process may not write in is said before any work, naming the option: segment's --out (to be
    created in it), export's and eval's --out. os.access is faked to refuse one folder (the tests may run as root,
    whom the file system lets write anywhere; a mutation dropping the permission checks passed the other tests)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access

    def access(path, mode, **kwargs):
        return os.path.abspath(path) != str(locked) and real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    for argv, message in (
        (["segment", "--checkpoint", str(checkpoint), "--out", str(locked / "out"), str(images[0])],
         f"--out {str(locked / 'out')!r}: no permission to write in {str(locked)!r}"),
        (["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--out", str(locked / "m.pt2")],
         f"--out {str(locked / 'm.pt2')!r}: no permission to write in {str(locked)!r}"),
        (["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic", "--out",
          str(locked / "e.json")], f"--out {str(locked / 'e.json')!r}: no permission to write in {str(locked)!r}"),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == f"denseclip-fast: error: {message}\n"
    assert os.listdir(locked) == []


def test_more_classes_than_the_head_has_are_said_in_the_commands_words(checkpoint, images, tmp_path, capsys):
    """--classes with more names than the head's outputs is refused as fewer are: naming --classes and what to do on
    the command line (a mutation refusing fewer names only let the library's message through, which tells a Python
    caller to use open_vocab_scores)."""
    five = "sky,road,tree,grass,dog"
    for argv, hint in ((["segment", "--out", str(tmp_path / "out"), str(images[0])], "add --open-vocab"),
                       (["export", "--format", "aoti", "--out", str(tmp_path / "m.pt2")], "segment --open-vocab")):
        assert main([argv[0], "--checkpoint", str(checkpoint), "--classes", five, *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("denseclip-fast: error: --classes needs exactly 4 names (the checkpoint's head has 4 "
                              "outputs), got 5; ") and hint in err and "open_vocab_scores" not in err, err
    assert os.listdir(tmp_path) == []


def test_info_lists_up_to_ten_class_names(tmp_path, capsys):
    """info prints the first ten class names, with ' ...' only when there are more (a mutation adding ' ...' at
    exactly ten passed the other tests, whose checkpoints have 4 classes)."""
    for count in (10, 11):
        path = tmp_path / f"k{count}.safetensors"
        names = [f"c{i}" for i in range(count)]
        DenseCLIP(tiny_config("resnet"), names).save(path)
        assert main(["info", str(path)]) == 0
        shown = ", ".join(names[:10]) + (" ..." if count > 10 else "")
        assert f"classes      {count}: {shown}\n" in capsys.readouterr().out


def test_an_output_link_into_a_missing_folder_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """export --out a symbolic link whose target's folder does not exist: the file is written where the link points
    and that folder is not made (the link is kept), so the command says so before loading, naming the link and its
    target (a mutation letting --out's create-the-parents apply to the target passed the check, and failed after
    the export's work)."""

    _loading_fails(monkeypatch, "--out was checked")
    link = tmp_path / "current.pt2"
    os.symlink(tmp_path / "missing" / "m.pt2", link)
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--out", str(link)]) == 2
    target = tmp_path / "missing" / "m.pt2"
    assert capsys.readouterr().err == (f"denseclip-fast: error: --out {str(link)!r} (a link to {str(target)!r}): the "
                                       f"directory {str(tmp_path / 'missing')!r} does not exist\n")  # fmt: skip
    assert os.listdir(tmp_path) == ["current.pt2"]


def test_eval_out_deep_in_the_data_set_is_refused(checkpoint, data, tmp_path, capsys):
    """eval --out naming a file in a subfolder of --data (a label) is refused as a file at its top is (a mutation
    checking the top folder only replaced the label with the JSON)."""
    label = os.path.join(data, "labels", "x.png")
    before = Path(label).read_bytes()
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic", "--out", label]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: --out {label!r} is a file of the data set --data "
                                       f"{str(data)!r}: writing it would replace it; choose another path\n")
    assert Path(label).read_bytes() == before


def test_classes_names_are_taken_without_the_spaces_around_them(checkpoint, tmp_path, monkeypatch, capsys):
    """--classes "sky, road" names "road", not " road": the spaces after the commas are the list's, not the
    names' (a mutation keeping them passed the other tests: the tokens are alike, but the names the exported graph
    carries had the spaces). The AOTInductor exporter is a stand-in recording the model's names."""
    from denseclip_fast import export

    named = []
    monkeypatch.setattr(export, "to_aoti", lambda model, path, **kwargs: named.append(list(model.class_names)) or path)
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "aoti", "--device", "cpu", "--out",
            str(tmp_path / "m.pt2"), "--classes", " sky, road ,tree ,  grass"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert named == [["sky", "road", "tree", "grass"]]


def test_an_output_file_without_write_permission_is_refused_before_any_work(checkpoint, data, tmp_path, capsys,
                                                                           monkeypatch):
    """An existing --out file the process may not overwrite is said before any work, naming the option (export,
    eval). os.access is faked to refuse the file (the tests may run as root; a mutation dropping the check passed
    the other tests)."""
    for name in ("m.pt2", "e.json"):
        (tmp_path / name).write_text("kept")
    real = os.access

    def access(path, mode, **kwargs):
        refused = os.path.dirname(os.path.abspath(path)) == str(tmp_path) and mode & os.W_OK
        return not refused and real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    for argv, out in ((["export", "--checkpoint", str(checkpoint), "--format", "aoti"], tmp_path / "m.pt2"),
                      (["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic"],
                       tmp_path / "e.json")):  # fmt: skip
        assert main([*argv, "--out", str(out)]) == 2, argv
        assert capsys.readouterr().err == f"denseclip-fast: error: --out {str(out)!r}: no permission to overwrite it\n"
        assert out.read_text() == "kept"


def test_an_os_error_of_two_paths_names_both():
    """An OSError of two paths (a rename across file systems) is said naming both, source -> target (a mutation
    keeping the first passed the other tests, whose errors name one path)."""
    from denseclip_fast.cli import _os_error

    assert _os_error(OSError(18, "Invalid cross-device link", "a.partial", None, "b.onnx")) == \
        "a.partial -> b.onnx: Invalid cross-device link"
    assert _os_error(FileNotFoundError(2, "No such file or directory", "c.pth")) == "c.pth: No such file or directory"


def test_a_resume_state_file_brings_its_runs_config(tmp_path, capsys, monkeypatch):
    """train --resume DIR/iter_N.state.pt without CONFIG or --work-dir reads the run's settings from DIR/config.json,
    the folder of the state (a mutation looking only in --work-dir and the default work dir said that no run was
    found, exit 2)."""
    monkeypatch.chdir(tmp_path)  # the default work dir (work_dirs/denseclip) holds no run
    run = tmp_path / "run"
    run.mkdir()
    assert main(["train", "--arch", "RN50", "--iters", "7", "--work-dir", str(run), "--print-config"]) == 0
    (run / "config.json").write_text(capsys.readouterr().out)
    assert main(["train", "--resume", str(run / "iter_2.state.pt"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["iters"], printed["work_dir"]) == (7, str(run))


def test_segment_results_keep_the_images_name_as_given(checkpoint, images, tmp_path):
    """Photo.PNG's results are Photo_labels.png and Photo_overlay.png: the name's case is kept (it is folded only to
    find two images whose results would collide; a mutation writing the folded name passed the other tests, whose
    images are lower case)."""
    (tmp_path / "Photo.PNG").write_bytes(images[0].read_bytes())
    out = tmp_path / "out"
    assert main(["segment", "--checkpoint", str(checkpoint), "--mode", "whole", "--out", str(out),
                 str(tmp_path / "Photo.PNG")]) == 0  # fmt: skip
    assert sorted(os.listdir(out)) == ["Photo_labels.png", "Photo_overlay.png"]


def test_segment_and_eval_default_to_the_gpu_when_there_is_one(checkpoint, images, data, tmp_path, monkeypatch):
    """Without --device, segment and eval run on CUDA where it is available (segment in bfloat16), the CPU otherwise
    (a mutation always choosing the CPU passed the other tests, which run without a GPU). The GPU is faked and the
    command stopped where it would use it."""
    import denseclip_fast

    class OnTheDevice(Exception):
        pass

    def segmenter(model, **kwargs):
        raise OnTheDevice(kwargs["device"], kwargs["dtype"])

    def to(self, device):
        raise OnTheDevice(device)

    monkeypatch.setattr(denseclip_fast, "Segmenter", segmenter)
    monkeypatch.setattr(DenseCLIP, "to", to)
    seg = ["segment", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), str(images[0])]
    ev = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--layout", "generic", "--out",
          str(tmp_path / "e.json")]  # fmt: skip
    for available, device, dtype in ((True, "cuda", torch.bfloat16), (False, "cpu", torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        with pytest.raises(OnTheDevice) as used:
            main(seg)
        assert used.value.args == (device, dtype)
        with pytest.raises(OnTheDevice) as used:
            main(ev)
        assert used.value.args == (device,)
    assert os.listdir(tmp_path) == []


def test_export_refuses_an_image_size_of_three_sides_and_an_engine_named_onnx(checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    """--image-size 32x64x96 is refused, not read as 32x96; a TensorRT --out ending in .onnx is refused, the ONNX
    graph being written beside the engine under that name (a mutation taking three sides, and one letting the graph
    and the engine share the file, passed the other tests). Before loading."""
    from unittest import mock

    import denseclip_fast

    _loading_fails(monkeypatch, "the options were checked")
    monkeypatch.setattr(denseclip_fast.export.onnx, "check_onnx_export", lambda runtime=False: None)
    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock())
    exp = ["export", "--checkpoint", str(checkpoint), "--format"]
    for argv, message in (
        ([*exp, "onnx", "--out", str(tmp_path / "m.onnx"), "--image-size", "32x64x96"],
         "--image-size must be N or HxW (e.g. 512 or 512x1024), got '32x64x96'"),
        ([*exp, "tensorrt", "--out", str(tmp_path / "m.onnx")],
         "--out is the engine file for --format tensorrt (e.g. model.engine); the ONNX graph is written next to it "
         "with the .onnx suffix"),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == f"denseclip-fast: error: {message}\n"
    assert os.listdir(tmp_path) == []

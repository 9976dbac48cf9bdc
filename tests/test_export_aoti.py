"""AOTInductor: the compiled package equals the model, from Python and from the C++ runner (examples/cpp)."""

from __future__ import annotations

import errno
import glob
import io
import json
import mmap
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denseclip_fast import DenseCLIP, Segmenter
from denseclip_fast.export import load_aoti, to_aoti
from denseclip_fast.export.aoti import AOTIPackage, _extracted_copies, check_grid
from denseclip_fast.model.slide import slide_inference
from denseclip_fast.preprocess import normalize, prepare, resize_bilinear_uint8

from .conftest import randomized, rel_err, tiny_config

SIZE = (64, 96)


CLASSES = ["wall", "café", "cat", "bed "]  # a non-ASCII name travels through the package metadata to C++


TEST_SCALE = (192, 96)  # a small keep-ratio test scale, so that the C++ runner's slide has a few windows


@pytest.fixture(scope="module")
def model() -> DenseCLIP:
    return randomized(DenseCLIP(replace(tiny_config("resnet"), test_scale=TEST_SCALE), CLASSES)).eval()


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    """A folder of the test's own as TMPDIR and Python's temp folder, where torch 2.14's AOTInductor loader extracts
    packages (2.11's goes to /tmp whatever TMPDIR says): the copies a test watches are the test's alone."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setenv("TMPDIR", str(root))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture(scope="module")
def package(model, tmp_path_factory):
    """One CPU package (about 30 s of C++ compilation on 2 cores), shared by the tests below."""
    return to_aoti(model, tmp_path_factory.mktemp("aoti") / "tiny.pt2", image_size=SIZE, max_batch=3, device="cpu")


@pytest.mark.slow
def test_package_equals_the_model_at_every_batch(model, package):
    pkg = load_aoti(package)
    assert pkg.image_size == SIZE and pkg.class_names == CLASSES and pkg.dtype == torch.float32
    assert pkg.metadata["arch"] == "custom" and pkg.max_batch == 3
    for batch in (1, 3):  # traced at 2: neither is the traced size, and 1 is where layouts are ambiguous
        x = torch.randn(batch, 3, *SIZE)
        with torch.no_grad():
            expected = model(x)
        out = pkg(x)
        assert out.shape == expected.shape and rel_err(out, expected) <= 1e-5, (batch, rel_err(out, expected))
        assert torch.equal(pkg.predict(x), out.argmax(dim=1))
    # views are made dense first: the compiled code trusts the traced strides
    big = torch.randn(2, 3, SIZE[0] + 5, SIZE[1] + 7)
    crop = big[:, :, 2 : 2 + SIZE[0], 3 : 3 + SIZE[1]]
    assert torch.equal(pkg(crop), pkg(crop.contiguous()))
    one = torch.randn(1, 3, *SIZE)
    assert torch.equal(pkg(one.expand(3, -1, -1, -1)), pkg(one.repeat(3, 1, 1, 1)))


def test_a_half_precision_package_computes_the_segmenters_float32_logits(model, tmp_path, monkeypatch):
    """What to_aoti compiles for a bfloat16 engine: the head's logits resized in float32, as the Segmenter's, equal
    to them. It resized in bfloat16 (3e-3 off the Segmenter, the logits bfloat16-quantised at full size, and the C++
    runner averaged those over its windows). The module is taken where torch.export gets it; nothing compiles."""
    traced = []

    class Traced(Exception):
        pass

    def export(module, args, **kwargs):
        traced.append(module)
        raise Traced

    monkeypatch.setattr(torch.export, "export", export)
    seg = Segmenter(model, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(Traced):
        to_aoti(seg, tmp_path / "bf16.pt2", image_size=SIZE)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        out = traced[0](x.to(torch.bfloat16, memory_format=torch.channels_last))
    assert out.dtype == torch.float32 and torch.equal(out, seg.logits(x))


@pytest.mark.slow
def test_a_package_given_as_a_checkpoint_is_named(package):
    """A .pt2 where a checkpoint goes (info, segment --checkpoint) is said to be a package, with what to do: it was
    "could not be read as a torch file (RuntimeError: PytorchStreamReader failed locating file data)"."""
    import denseclip_fast as dcf

    with pytest.raises(dcf.CheckpointError, match="this is an AOTInductor package .*, not a checkpoint: run it with"):
        dcf.load_checkpoint(package)


@pytest.mark.slow
def test_package_rejects_what_it_was_not_compiled_for(package, tmp_path):
    pkg = load_aoti(package)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, 64, 96\), got \(1, 3, 64, 64\)"):
        pkg(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="x must be a CLIP-normalised floating-point tensor, got dtype torch.uint8"):
        pkg(torch.zeros(1, 3, *SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="the batch must be 1..3 for this package, got 4"):
        pkg(torch.randn(4, 3, *SIZE))
    with pytest.raises(ValueError, match=r"path '.*missing.pt2' does not exist; expected an AOTInductor package"):
        load_aoti(tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match="path '.*' is not a regular file; expected an AOTInductor package"):
        load_aoti(tmp_path)


def _rewritten(package: Any, path: Any, edit: Callable[[str, bytes], bytes]) -> Any:
    """A copy of ``package`` at ``path`` with each entry's bytes as ``edit(name, data)`` returns them."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, edit(name, src.read(name)))
    return path


def _with_metadata(package: Any, path: Any, **changes: str | None) -> Any:
    """A copy of ``package`` with its compiled-in metadata changed (None: the key removed), for example to name
    another device as a CUDA package's does."""

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("_metadata.json"):
            return data
        meta = json.loads(data)
        assert meta["AOTI_DEVICE_KEY"] == meta["denseclip_fast.device"] == "cpu", meta
        meta.update({key: value for key, value in changes.items() if value is not None})
        for key in [key for key, value in changes.items() if value is None]:
            del meta[key]
        return json.dumps(meta).encode()

    return _rewritten(package, path, edit)


@pytest.mark.slow
def test_what_the_archive_tells_is_refused_before_torchs_loader_runs(package, tmp_path, monkeypatch):
    """torch's loader extracts a package into a temporary directory (TMPDIR's aotinductor_* with torch 2.14, /tmp's
    with 2.11) before it can fail, and leaves that copy (the compiled library and its weights) behind when it does:
    what the archive's metadata tells (a CPU package given a GPU, a CUDA package without CUDA or on a GPU that is not
    there, another zip, another package) is refused before the loader runs."""
    cuda = _with_metadata(package, tmp_path / "cuda.pt2", AOTI_DEVICE_KEY="cuda", **{"denseclip_fast.device": "cuda"})
    foreign = _with_metadata(package, tmp_path / "foreign.pt2", **{"denseclip_fast.image_size": None})
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    loaded: list[str] = []

    def loader(path: str, device_index: int = -1) -> Any:
        loaded.append(path)
        raise AssertionError("torch's loader ran")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", loader)
    with pytest.raises(ValueError, match=r"foreign.pt2 is not a denseclip_fast package \(no denseclip_fast metadata"):
        load_aoti(foreign)
    with pytest.raises(ValueError, match="is a CPU package; device_index=0 applies to CUDA packages only"):
        load_aoti(package, device_index=0)
    with pytest.raises(ValueError, match=r"is not an AOTInductor package .*: it holds no compiled model"):
        load_aoti(tmp_path / "weights.pth")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cuda.pt2 is a CUDA package and this process has no CUDA device"):
            load_aoti(cuda)
    with monkeypatch.context() as gpus:
        gpus.setattr(torch.cuda, "is_available", lambda: True)
        gpus.setattr(torch.cuda, "device_count", lambda: 2)
        with pytest.raises(ValueError, match=r"device_index 2 is out of range: this process sees 2 CUDA device"):
            load_aoti(cuda, device_index=2)
        with pytest.raises(AssertionError, match="torch's loader ran"):  # the control: GPU 1 of 2 gets to it
            load_aoti(cuda, device_index=1)
    for wrong in ("0", True, -2, 1.0, np.int64(-2), np.True_):
        with pytest.raises(ValueError, match=r"device_index must be -1 \(the package's own device\) or a CUDA "):
            load_aoti(package, device_index=wrong)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="torch's loader ran"):  # and so does a good CPU package
        load_aoti(package)
    with pytest.raises(AssertionError, match="torch's loader ran"):  # a numpy integer is the int it stands for
        load_aoti(package, device_index=np.int64(-1))
    assert loaded == [str(cuda), str(package), str(package)]


@pytest.mark.slow
def test_a_package_whose_library_is_damaged_is_named_with_the_loaders_reason(package, tmp_path, monkeypatch, temp_root):
    """The metadata intact but the compiled library's bytes not an ELF file (a damaged copy): torch's loader fails,
    and the error names the package and the loader's first line, as a ValueError. The loader's extracted copies,
    which it leaves behind (two per load with torch 2.14: the library and its weights each time), are removed;
    another package's extraction, which holds another library, and any made before the load are not."""
    tmpdir = temp_root
    libraries: list[str] = []

    def zeroed(name: str, data: bytes) -> bytes:
        if not name.endswith(".so"):
            return data
        libraries.append(name)
        return b"\0" * len(data)

    damaged = _rewritten(package, tmp_path / "damaged.pt2", zeroed)
    assert len(libraries) == 1
    (tmpdir / "aotinductor_before" / libraries[0]).parent.mkdir(parents=True)  # this library, there before the load
    (tmpdir / "aotinductor_before" / libraries[0]).write_bytes(b"\0")
    library = os.path.join("archive", "data", "aotinductor", "model", "other.wrapper.so")
    kept = ["aotinductor_before", "aotinductor_concurrent", "aotinductor_empty"]
    left: list[str] = []
    loader = torch._inductor.aoti_load_package

    def concurrent(*args: Any, **kwargs: Any) -> Any:
        before = _extracted_copies()
        try:
            return loader(*args, **kwargs)
        finally:  # what the loader left (in TMPDIR with torch 2.14, in /tmp with 2.11: the folders load_aoti
            # watches), and what another load (another library) or another program made meanwhile
            made = _extracted_copies() - before
            left.extend(sorted(c for c in made if os.path.isfile(os.path.join(c, libraries[0]))))
            (tmpdir / "aotinductor_concurrent" / library).parent.mkdir(parents=True, exist_ok=True)
            (tmpdir / "aotinductor_concurrent" / library).write_bytes(b"\0")
            (tmpdir / "aotinductor_empty").mkdir(exist_ok=True)

    monkeypatch.setattr(torch._inductor, "aoti_load_package", concurrent)
    for _ in range(2):
        with pytest.raises(ValueError, match=re.escape(f"{damaged}: the AOTInductor package could not be loaded: ")):
            load_aoti(damaged)
        assert sorted(os.listdir(tmpdir)) == kept
    assert len(left) >= 2 and not any(os.path.exists(copy) for copy in left), left  # made, then removed
    assert (tmpdir / "aotinductor_concurrent" / library).read_bytes() == b"\0"


@pytest.mark.slow
def test_a_failed_load_extracted_under_any_name_is_removed(package, monkeypatch, temp_root):
    """torch 2.11's loader extracts into a mkdtemp folder of six random characters in /tmp (2.14: aotinductor_* in
    TMPDIR), which load_aoti, looking for aotinductor_* alone, left behind after a failed load (the GPU machine's
    rehearsal found them). A folder is this package's copy by what it holds, whatever its name; a folder made
    meanwhile that holds no such library stays."""
    tmpdir = temp_root
    made: list[str] = []

    def extracts_then_fails(path: str, *args: Any, **kwargs: Any) -> Any:
        copy = tempfile.mkdtemp(dir=tmpdir)  # 'tmp' and random characters: not aotinductor_*, as 2.11's aren't
        with zipfile.ZipFile(path) as archive:
            archive.extractall(copy)
        made.append(copy)
        os.mkdir(tmpdir / "another_program")
        raise RuntimeError("Error in dlopen: invalid ELF header")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", extracts_then_fails)
    with pytest.raises(ValueError, match="the AOTInductor package could not be loaded: Error in dlopen"):
        load_aoti(package)
    assert len(made) == 1 and not os.path.exists(made[0])
    assert os.listdir(tmpdir) == ["another_program"]


@pytest.mark.slow
def test_a_failed_load_leaves_the_copies_of_loads_of_the_same_package_made_meanwhile(package, monkeypatch, temp_root):
    """Two loads of one package at once (a server's workers starting), one failing while the other is under way:
    the failed one's clean-up waits for the other to end (a shared flock on the package file while loading; without
    it the other's copy, extracted but not yet loaded, was removed as a leftover under it), then leaves every copy
    that a process maps (the other's, from which a CUDA package's kernels are read later); its own copy goes."""
    tmpdir = temp_root
    with zipfile.ZipFile(package) as archive:
        library = next(name for name in archive.namelist() if name.endswith(".so"))
    real = torch._inductor.aoti_load_package
    failing_extracted, loading_extracted = threading.Event(), threading.Event()
    copies: dict[str, str] = {}
    maps: list[mmap.mmap] = []

    def loader(path: str, *args: Any, **kwargs: Any) -> Any:
        name = threading.current_thread().name
        copies[name] = tempfile.mkdtemp(dir=tmpdir)
        with zipfile.ZipFile(path) as archive:
            archive.extractall(copies[name])
        if name == "failing":
            failing_extracted.set()
            assert loading_extracted.wait(60)  # the other's copy made after this load began
            raise RuntimeError("Error in dlopen: out of memory")
        loading_extracted.set()
        time.sleep(1.0)  # the other load fails meanwhile
        with open(os.path.join(copies[name], library), "rb") as f:  # loaded: its library mapped, as dlopen does
            maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return real(path, *args, **kwargs)

    results: dict[str, Any] = {}

    def run() -> None:
        try:
            results[threading.current_thread().name] = load_aoti(package)
        except BaseException as exc:
            results[threading.current_thread().name] = exc

    monkeypatch.setattr(torch._inductor, "aoti_load_package", loader)
    threads = [threading.Thread(target=run, name=name) for name in ("failing", "loading")]
    try:
        threads[0].start()
        assert failing_extracted.wait(60)
        threads[1].start()
        for thread in threads:
            thread.join(120)
        assert isinstance(results["failing"], ValueError), results["failing"]
        assert "could not be loaded: Error in dlopen: out of memory" in str(results["failing"])
        assert type(results["loading"]).__name__ == "AOTIPackage", results["loading"]
        assert not os.path.exists(copies["failing"]) and os.path.isfile(os.path.join(copies["loading"], library))
        assert results["loading"](torch.zeros(1, 3, *SIZE)).shape[1] == len(CLASSES)
    finally:
        for mapped in maps:
            mapped.close()


def test_to_aoti_argument_errors(model, tmp_path):
    seg = Segmenter(model, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="device and dtype come from the Segmenter"):
        to_aoti(seg, tmp_path / "x.pt2", dtype=torch.float32)
    with pytest.raises(ValueError, match="must be a DenseCLIP model or a Segmenter"):
        to_aoti(torch.nn.Linear(2, 2), tmp_path / "x.pt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch must be an int >= 2 and <= 65536, got 1 .*for batch 1, max_batch="):
        to_aoti(seg, tmp_path / "x.pt2", max_batch=1)
    for bad in (10**22, True, 4.0):
        with pytest.raises(ValueError, match=f"max_batch must be an int >= 2 and <= 65536, got {bad!r}"):
            to_aoti(seg, tmp_path / "x.pt2", max_batch=bad)
    heads = max(seg.model.config.vision.heads, seg.model.config.decoder.heads)  # images x heads: one grid axis
    most = 65535 // heads
    message = rf"^max_batch must be <= {most} for this architecture on CUDA, got {most + 1} \(the fused attention"
    with pytest.raises(ValueError, match=message):
        check_grid(most + 1, seg.model.config, torch.device("cuda"))
    check_grid(most, seg.model.config, torch.device("cuda"))
    check_grid(most + 1, seg.model.config, torch.device("cpu"))  # the CPU operators have no grid: was refused

    class Traced(Exception):
        pass

    def export(*args, **kwargs):
        raise Traced

    with mock.patch.object(torch.export, "export", export), pytest.raises(Traced):  # checked, on to the trace
        to_aoti(seg, tmp_path / "x.pt2", max_batch=most + 1)
    # numpy integers are ints, as for image_size (they were refused); the trace's input leaves the caller's random
    # numbers as they were
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with mock.patch.object(torch.export, "export", export), pytest.raises(Traced):
        to_aoti(seg, tmp_path / "x.pt2", max_batch=np.int64(4), image_size=SIZE, stride=(np.int64(32), 40))
    assert torch.equal(torch.get_rng_state(), state)
    link = tmp_path / "link.pt2"  # written where the link points: a folder that is not there is said now, not
    link.symlink_to(tmp_path / "missing" / "x.pt2")  # after the compilation
    with pytest.raises(ValueError, match=rf"^path {re.escape(repr(str(link)))} \(a link to .*missing/x.pt2'\): the "
                                         rf"directory {re.escape(repr(str(tmp_path / 'missing')))} does not exist$"):
        to_aoti(seg, link, image_size=SIZE)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07not a zip")
    with pytest.raises(ValueError, match=r"model.onnx is not an AOTInductor package \(a \.pt2 zip archive"):
        load_aoti(tmp_path / "model.onnx")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")  # a zip archive too, without torch's file listing
    with pytest.raises(ValueError) as info:
        load_aoti(tmp_path / "weights.pth")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'weights.pth'} is not an AOTInductor package (a .pt2 zip archive "
                              "written by to_aoti): ")  # fmt: skip
    assert "\n" not in message and "data.pkl" not in message and len(message) < 300, message
    with pytest.raises(ValueError, match=r"path must end in \.pt2"):
        to_aoti(seg, tmp_path / "x.so", image_size=SIZE)
    (tmp_path / "dir.pt2").mkdir()  # checked before the compilation (a minute), not when the package is written
    with pytest.raises(ValueError, match=f"path {str(tmp_path / 'dir.pt2')!r} is a directory"):
        to_aoti(model, tmp_path / "dir.pt2", device="cpu")
    with pytest.raises(ValueError, match=f"{str(tmp_path / 'model.onnx')!r} is not a directory"):
        to_aoti(seg, tmp_path / "model.onnx" / "x.pt2")
    with pytest.raises(ValueError, match=r"stride must be an int or \(int, int\) between 1 and the image size \(64, 9"):
        to_aoti(seg, tmp_path / "x.pt2", image_size=SIZE, stride=(65, 10))
    with pytest.raises(ValueError, match=r"stride must be an int or \(int, int\) .*got 32.0"):  # was a TypeError
        to_aoti(seg, tmp_path / "x.pt2", image_size=SIZE, stride=32.0)
    for device in ("gpu", ""):  # torch's bare RuntimeError listing 20 device types; "" meant the default
        with pytest.raises(ValueError, match=f"device must be a device such as 'cpu', .*got {device!r}"):
            to_aoti(model, tmp_path / "x.pt2", device=device)
    for path in (None, b"x.pt2"):  # torch's TypeError
        with pytest.raises(ValueError, match="path must be a non-empty str or os.PathLike"):
            load_aoti(path)  # type: ignore[arg-type]


def _stub_compilation(monkeypatch) -> dict[str, Any]:
    """aoti_compile_and_package replaced by a stub that writes a small zip archive where a package would go and
    keeps what it was given (metadata, traced shape) in the dict returned."""
    given: dict[str, Any] = {}

    def compile_stub(program, package_path, inductor_configs):
        given.update(inductor_configs["aot_inductor.metadata"], shape=program.example_inputs[0][0].shape)
        with zipfile.ZipFile(package_path, "w") as archive:
            archive.writestr("package/data/aotinductor/model/model.so", b"compiled code")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_stub)
    return given


def test_a_set_classes_during_the_export_leaves_the_package_one_vocabulary(model, tmp_path, monkeypatch):
    """to_aoti(segmenter) while another thread rewords the Segmenter (set_classes, here while torch.export traces):
    the package bakes in the embeddings of the vocabulary its metadata names. It named the new vocabulary while it
    computed the old one (the names were read after the export). torch.export and the compilation are stubbed."""
    import threading

    seg = Segmenter(model, device="cpu", dtype=torch.float32)
    names, text = seg.class_names, seg._text.clone()
    other = [f"{name} outside" for name in names]
    traced: list[torch.nn.Module] = []

    def export(module, args, **kwargs):
        traced.append(module)
        rewording = threading.Thread(target=seg.set_classes, args=(other,))
        rewording.start()
        rewording.join()
        return mock.Mock(example_inputs=((args[0],), {}))

    given = _stub_compilation(monkeypatch)
    monkeypatch.setattr(torch.export, "export", export)
    to_aoti(seg, tmp_path / "seg.pt2", image_size=SIZE)
    assert seg.class_names == other  # the other thread's call went through
    assert json.loads(given["denseclip_fast.class_names"]) == names
    assert torch.equal(traced[0].class_embeddings, text)


class _FullDisk(io.FileIO):
    """A file on a disk that fills up: a write stores half of its bytes, then raises ENOSPC."""

    def write(self, data) -> int:
        super().write(bytes(data)[: len(bytes(data)) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_keeps_the_previous_package(model, tmp_path, monkeypatch):
    """A full disk while the package is written: the package at the path is kept as it was, no partial file is
    left, and the error names the path. (torch wrote it in place: the process aborted, SIGABRT with a C++ trace, and
    the previous package was left a file that is not a zip archive.) The compilation is stubbed; the write is
    to_aoti's own (export.graphs.write_file, the TensorRT engine's too)."""
    from denseclip_fast.cli import _os_error
    from denseclip_fast.export import graphs

    path = tmp_path / "prev.pt2"
    path.write_bytes(b"the previous package")
    _stub_compilation(monkeypatch)
    monkeypatch.setattr(graphs, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as info:
        to_aoti(model, path, image_size=SIZE, max_batch=2, device="cpu")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert _os_error(info.value) == f"{path}: cannot write the AOTInductor package: No space left on device"
    assert path.read_bytes() == b"the previous package"
    assert [p.name for p in tmp_path.iterdir()] == ["prev.pt2"]
    monkeypatch.delattr(graphs, "open")
    to_aoti(model, path, image_size=SIZE, max_batch=2, device="cpu")  # the disk has room again
    assert zipfile.ZipFile(path).namelist() == ["package/data/aotinductor/model/model.so"]
    assert [p.name for p in tmp_path.iterdir()] == ["prev.pt2"]


def test_a_segmenters_window_is_the_default_package_size(model, tmp_path, monkeypatch):
    """to_aoti(segmenter) without image_size compiles the Segmenter's window (its crop, and its stride in the
    metadata), not the model's default crop (512 here): the package then slides as the Segmenter it was made from.
    The compilation is replaced by a stub that keeps what it was given (torch.export still traces)."""
    given = _stub_compilation(monkeypatch)
    to_aoti(Segmenter(model, device="cpu", dtype=torch.float32, crop=64, stride=40), tmp_path / "seg.pt2")
    assert json.loads(given["denseclip_fast.image_size"]) == [64, 64] and tuple(given["shape"][2:]) == (64, 64)
    assert json.loads(given["denseclip_fast.slide_stride"]) == [40, 40]


def _write_ppm(path, image: np.ndarray) -> None:
    h, w, _ = image.shape
    with open(path, "wb") as f:
        f.write(f"P6\n# a comment\n{w} {h}\n255\n".encode() + image.tobytes())


def _read_pgm(path) -> np.ndarray:
    data = Path(path).read_bytes()
    magic, w, h, maxval, rest = data.split(maxsplit=4)
    assert magic == b"P5" and int(maxval) == 255
    return np.frombuffer(rest, dtype=np.uint8).reshape(int(h), int(w))


def _cpp_segment(cmake_build, package, image: np.ndarray, tmp_path, *mode: str) -> tuple[dict, torch.Tensor, Any]:
    """Run examples/cpp/segment.cpp on ``image``: its JSON summary, logits (1, K, H, W) and label map."""
    _write_ppm(tmp_path / "in.ppm", image)
    out = cmake_build.run("denseclip_fast_segment", str(package), str(tmp_path / "in.ppm"),
                          str(tmp_path / "labels.pgm"), "--logits", str(tmp_path / "logits.f32"), *mode)  # fmt: skip
    logits = torch.from_numpy(np.fromfile(tmp_path / "logits.f32", dtype=np.float32))
    return json.loads(out), logits.view(1, len(CLASSES), *image.shape[:2]), _read_pgm(tmp_path / "labels.pgm")


@pytest.mark.slow
def test_cpp_runner_slides_the_package_like_the_official_pipeline(cmake_build, model, package, tmp_path):
    """examples/cpp/segment.cpp (default --mode slide): keep-ratio resize to the package's test scale, the package
    slid over the image as the window with its stride, logits averaged and resized back: equal to the Python
    pipeline (preprocess.prepare + slide_inference), labels too."""
    image = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    summary, logits, labels = _cpp_segment(cmake_build, package, image, tmp_path)
    assert load_aoti(package).metadata["slide_stride"] == "[42, 64]"  # two thirds of the (64, 96) window
    assert summary["image"] == [50, 70] and summary["mode"] == "slide" and summary["classes"] == len(CLASSES)
    assert summary["resized"] == [96, 134]  # 50x70 scaled by min(192 / 70, 96 / 50): 2x2 windows, 3 + 1 a run
    assert {name for name, _ in summary["top"]} <= set(CLASSES)
    with torch.no_grad():
        expected = slide_inference(model, prepare(image, TEST_SCALE), SIZE, (42, 64))
    expected = F.interpolate(expected, size=(50, 70), mode="bilinear", align_corners=False)
    assert rel_err(logits, expected) <= 1e-5
    assert (labels == expected.argmax(dim=1)[0].numpy()).mean() >= 0.999


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (gpu_check.sh's rest step runs it)")
@pytest.mark.parametrize("dtype, tolerance, agreement", [(torch.bfloat16, 1e-3, 0.99), (torch.float32, 1e-5, 0.999)])
def test_cpp_runner_runs_a_cuda_package(cmake_build, tmp_path, dtype, tolerance, agreement):
    """examples/cpp/segment.cpp on a CUDA package (the Triton kernels compiled into it): its slide equals the same
    package slid from Python (the same windows, batches of 3 + 1, float32 sums). A float32 package runs with TF32
    off in both (libtorch's default, TF32 cuDNN convolutions, would be about 1e-3 off)."""
    from .test_gpu import heads_of_16  # heads of 16 channels: every fused operator on Triton, none on the C++ library

    config = replace(heads_of_16(tiny_config("resnet")), test_scale=TEST_SCALE)
    model = randomized(DenseCLIP(config, CLASSES)).eval()
    package = to_aoti(model, tmp_path / "cuda.pt2", image_size=SIZE, max_batch=3, device="cuda", dtype=dtype)
    image = np.random.default_rng(2).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    summary, logits, labels = _cpp_segment(cmake_build, package, image, tmp_path)
    assert summary["mode"] == "slide" and summary["resized"] == [96, 134]
    pkg = load_aoti(package)
    assert pkg.dtype == dtype and pkg.device.type == "cuda"
    with torch.no_grad():
        expected = slide_inference(pkg, prepare(image, TEST_SCALE).cuda(), SIZE, (42, 64), windows_per_batch=3)
    expected = F.interpolate(expected.float(), size=(50, 70), mode="bilinear", align_corners=False).cpu()
    assert rel_err(logits, expected) <= tolerance
    assert (labels == expected.argmax(dim=1)[0].numpy()).mean() >= agreement


@pytest.mark.slow
def test_cpp_runner_stretch_mode_and_a_too_narrow_image(cmake_build, model, package, tmp_path):
    """--mode stretch resizes the image to the package size (OpenCV's bilinear, as the slide mode); an image that
    the test scale leaves smaller than the window is refused in slide mode with a message that says what to do; a
    file that is not a package gets PyTorch's message without the C++ backtrace."""
    image = np.random.default_rng(1).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    summary, logits, labels = _cpp_segment(cmake_build, package, image, tmp_path, "--mode", "stretch")
    assert summary["mode"] == "stretch" and summary["resized"] == list(SIZE)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = model(normalize(resize_bilinear_uint8(x, SIZE)))
    expected = F.interpolate(expected, size=(50, 70), mode="bilinear", align_corners=False)
    assert rel_err(logits, expected) <= 1e-5
    assert (labels == expected.argmax(dim=1)[0].numpy()).mean() >= 0.999

    _write_ppm(tmp_path / "narrow.ppm", np.zeros((20, 200, 3), np.uint8))  # resized to 19x192: below 64 rows
    runner = str(cmake_build.directory / "denseclip_fast_segment")
    args = [runner, str(package), str(tmp_path / "narrow.ppm"), str(tmp_path / "x.pgm")]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 1
    assert "resized to the test scale is 19x192, smaller than the package's window 64x96" in result.stderr
    assert "use --mode stretch" in result.stderr
    # a file that is no package: PyTorch's error message in one line, without its C++ backtrace
    result = subprocess.run([runner, str(tmp_path / "narrow.ppm"), *args[2:]], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("denseclip_fast_segment: error: ")
    assert "Exception raised from" not in result.stderr and len(result.stderr.splitlines()) <= 2, result.stderr
    # a --device-index that is no number (std::stoi's bare "stoi"), or given for a CPU package; a full disk (a
    # truncated label map and exit 0)
    _write_ppm(tmp_path / "fine.ppm", np.zeros((50, 70, 3), np.uint8))
    fine = [runner, str(package), str(tmp_path / "fine.ppm")]
    for extra, says in (
        ([str(tmp_path / "x.pgm"), "--device-index", "one"], "--device-index must be an integer, got 'one'"),
        ([str(tmp_path / "x.pgm"), "--device-index", "0"], f"--device-index applies to a CUDA package; {package} is "
                                                           "for the CPU"),
        (["/dev/full"], "cannot write /dev/full (a full disk?)"),
        ([str(tmp_path / "x.pgm"), "--logits", "/dev/full"], "cannot write /dev/full (a full disk?)"),
    ):  # fmt: skip
        leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), "aotinductor_*")))
        result = subprocess.run([*fine, *extra], capture_output=True, text=True)
        assert result.stderr == f"denseclip_fast_segment: error: {says}\n" and result.returncode == 1, result.stderr
        # the refused device index left libtorch's extracted copy of the package behind, a temp folder per run
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "aotinductor_*"))) <= leftovers, extra


@pytest.mark.slow
def test_cpp_runner_leaves_no_copy_of_a_package_it_cannot_load(cmake_build, package, tmp_path):
    """libtorch's loader extracts the package into TMPDIR and leaves that copy (its weights, its library) behind when
    the load fails: the runner makes a folder of its own TMPDIR while it runs and removes it at the end, whatever
    happened. (torch 2.11's loader extracts into /tmp, past TMPDIR: its failed loads still leave theirs.)"""

    def zeroed(name: str, data: bytes) -> bytes:
        return b"\0" * len(data) if name.endswith(".so") else data

    damaged = _rewritten(package, tmp_path / "damaged.pt2", zeroed)
    _write_ppm(tmp_path / "in.ppm", np.zeros((64, 96, 3), np.uint8))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    runner = str(cmake_build.directory / "denseclip_fast_segment")
    for pt2, code in ((damaged, 1), (package, 0)):
        result = subprocess.run([runner, str(pt2), str(tmp_path / "in.ppm"), str(tmp_path / "out.pgm")],
                                capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmpdir)})  # fmt: skip
        assert result.returncode == code, result.stderr
        assert os.listdir(tmpdir) == [], pt2
    assert result.stderr == "" and json.loads(result.stdout)["classes"] == len(CLASSES)


@pytest.mark.slow
def test_a_cpu_export_imports_the_compiler_driver_without_its_cuda_warning(package):
    """torch.utils.cpp_extension warns at import on a machine with a CUDA toolkit and no GPU ("No CUDA runtime is
    found"), which every CPU package export printed, and every load; to_aoti and load_aoti import it with that
    logger quiet, its level kept."""
    quiet = ("import logging; from denseclip_fast.export.aoti import import_cpp_extension_quietly as q; q(); "
             "assert logging.getLogger('torch.utils.cpp_extension').level == logging.NOTSET")  # fmt: skip
    loads = f"from denseclip_fast.export import load_aoti; load_aoti({str(package)!r})"
    plain = "import denseclip_fast, torch.utils.cpp_extension"
    said = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            for code in (quiet, loads, plain)]  # fmt: skip
    for run in said[:2]:
        assert run.returncode == 0, run.stderr
        assert "No CUDA runtime" not in run.stderr
    if "No CUDA runtime" not in said[2].stderr:
        pytest.skip("torch says nothing here either (no CUDA toolkit, or a GPU)")


def _fake_package(path, meta: object) -> Any:
    """A zip archive laid out as a package (data/aotinductor/model/) whose compiled metadata is ``meta`` (JSON text
    when a str): what _check_loadable reads before torch's loader runs."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("tiny/data/aotinductor/model/abc.so", b"not a library")
        archive.writestr("tiny/data/aotinductor/model/abc_metadata.json", meta if isinstance(meta, str)
                         else json.dumps(meta))  # fmt: skip
    return path


def test_what_the_archives_metadata_tells_is_refused_without_a_compiled_package(tmp_path):
    """From the metadata alone: a CPU package (AOTI_DEVICE_KEY, the key torch writes) with a device index, a package
    without denseclip_fast's metadata, metadata that is not JSON; and device_index values that are not ints."""
    cpu = _fake_package(tmp_path / "cpu.pt2", {"AOTI_DEVICE_KEY": "cpu", "denseclip_fast.image_size": "[64, 96]"})
    for index in (0, 1, np.int64(0)):
        with pytest.raises(ValueError, match=rf"cpu.pt2 is a CPU package; device_index={index} applies to CUDA"):
            load_aoti(cpu, index)
    for index in (-2, 0.0, "0", True, None):
        with pytest.raises(ValueError, match=r"^device_index must be -1 \(the package's own device\) or a CUDA"):
            load_aoti(cpu, index)  # type: ignore[arg-type]
    foreign = _fake_package(tmp_path / "foreign.pt2", {"AOTI_DEVICE_KEY": "cpu"})
    with pytest.raises(ValueError, match=r"foreign.pt2 is not a denseclip_fast package \(no denseclip_fast metadata"):
        load_aoti(foreign)
    garbled = _fake_package(tmp_path / "garbled.pt2", "{not json")
    with pytest.raises(ValueError, match=r"garbled.pt2 is not an AOTInductor package .*: it holds no compiled model"):
        load_aoti(garbled)


def _package_stand_in(image_size=(4, 6), max_batch=3, out=None) -> tuple[AOTIPackage, list[torch.Tensor]]:
    """An AOTIPackage whose compiled model is a stand-in (a package compiles for about 30 s): it keeps its inputs
    and returns ``out`` (default: logits of 2 classes, x's first two channels, in a list as torch's runner does)."""
    pkg = AOTIPackage.__new__(AOTIPackage)
    pkg.image_size, pkg.max_batch, pkg.dtype, pkg.device = image_size, max_batch, torch.float32, torch.device("cpu")
    given: list[torch.Tensor] = []
    pkg._compiled = lambda x: given.append(x) or [x[:, :2].float() if out is None else out]
    return pkg, given


def test_a_package_takes_batches_up_to_max_batch_of_dense_floating_point_images():
    pkg, given = _package_stand_in()
    assert pkg(torch.zeros(3, 3, 4, 6)).shape == (3, 2, 4, 6)  # max_batch itself
    with pytest.raises(ValueError, match=r"^the batch must be 1..3 for this package, got 4$"):
        pkg(torch.zeros(4, 3, 4, 6))
    with pytest.raises(ValueError, match=r"^x must be a CLIP-normalised floating-point tensor, got dtype torch.uint8"):
        pkg(torch.zeros(1, 3, 4, 6, dtype=torch.uint8))
    view = torch.randn(1, 6, 4, 3).permute(0, 3, 2, 1)  # (1, 3, 4, 6), not contiguous
    pkg(view)
    assert given[-1].is_contiguous() and torch.equal(given[-1], view)
    x = torch.randn(2, 3, 4, 6)
    labels = pkg.predict(x)
    assert labels.shape == (2, 4, 6) and labels.dtype == torch.int64
    assert torch.equal(labels, (x[:, 1] > x[:, 0]).long())  # class 1 where its logit is the larger


def test_to_aoti_bounds_are_inclusive(model, tmp_path):
    """max_batch MAX_BATCH (65536) and a stride equal to the image size are accepted (on to the trace); a stride of 0
    and paths that do not end in .pt2 are not."""
    seg = Segmenter(model, device="cpu", dtype=torch.float32)

    class Traced(Exception):
        pass

    def export(*args, **kwargs):
        raise Traced

    with mock.patch.object(torch.export, "export", export):
        with pytest.raises(Traced):
            to_aoti(seg, tmp_path / "x.pt2", max_batch=65536, image_size=SIZE)
        with pytest.raises(Traced):
            to_aoti(seg, tmp_path / "x.pt2", image_size=SIZE, stride=SIZE)
        for stride in (0, (0, 32), (32, -1)):
            with pytest.raises(ValueError, match=r"^stride must be an int or \(int, int\) between 1 and the image"):
                to_aoti(seg, tmp_path / "x.pt2", image_size=SIZE, stride=stride)
        for name in ("xpt2", "x.pt2.part", "x.PT2x"):
            with pytest.raises(ValueError, match=r"^path must end in \.pt2"):
                to_aoti(seg, tmp_path / name, image_size=SIZE)
    assert os.listdir(tmp_path) == []


def test_a_cpu_model_compiles_in_float32_and_records_its_max_batch(model, tmp_path, monkeypatch):
    """A DenseCLIP model on the CPU without a dtype is compiled in float32 (bfloat16 is the CUDA default), and the
    metadata says the max_batch given (the C++ runner and load_aoti refuse larger batches by it). The compilation is
    stubbed (torch.export still traces)."""
    given = _stub_compilation(monkeypatch)
    to_aoti(model, tmp_path / "m.pt2", image_size=SIZE, max_batch=5, device="cpu")
    assert given["denseclip_fast.dtype"] == "float32" and given["denseclip_fast.device"] == "cpu"
    assert given["denseclip_fast.max_batch"] == "5"


def test_a_compilation_that_leaves_no_package_is_said_and_nothing_written(model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda program, package_path, **kwargs: "x")
    path = tmp_path / "m.pt2"
    with pytest.raises(RuntimeError, match=r"m.pt2: aoti_compile_and_package left no package in the buffer it was"):
        to_aoti(model, path, image_size=SIZE, max_batch=2, device="cpu")
    assert os.listdir(tmp_path) == []


def test_the_grid_bound_takes_a_batch_that_fills_the_grid_axis_exactly():
    """max_batch x heads may be MAX_GRID_Y itself (CUDA's grid y dimension takes up to 65535 blocks): 13107 images x 5
    heads = 65535 fit, one image more does not."""
    from types import SimpleNamespace

    config: Any = SimpleNamespace(vision=SimpleNamespace(heads=5), decoder=SimpleNamespace(heads=3))
    check_grid(13107, config, torch.device("cuda"))
    with pytest.raises(ValueError, match=r"^max_batch must be <= 13107 for this architecture on CUDA, got 13108"):
        check_grid(13108, config, torch.device("cuda"))

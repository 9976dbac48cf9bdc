"""Shared fixtures: tiny architectures (fast on 2 cores), the official-model oracle, comparison helpers.

Tiny configs follow the conventions of the official code that the tensors cannot reveal (32 attention-pool heads
for ResNets, width // 64 heads for CLIP transformers, 4 decoder heads, ViT taps after blocks 3/5/7/11), so that an
official-layout checkpoint of a tiny model is detected as the tiny config it came from.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inductor refuses (AssertionError) to fall back to an ATen kernel for an op that has a decomposition wherever CI
# is set, as GitHub Actions and this project's CI set it: every run of the tests checks the exports under it.
os.environ.setdefault("CI", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from denseclip_fast.config import DecoderConfig, DenseCLIPConfig, TextConfig, VisionConfig, preset  # noqa: E402

NAMES = ["wall", "chest of drawers", "cat", "bed "]

TINY_TEXT = TextConfig(context_length=13, n_ctx=8, vocab_size=49408, width=64, heads=1, layers=2)
TINY_DECODER = DecoderConfig(width=32, heads=4, layers=2)


def tiny_config(kind: str = "resnet", input_resolution: int = 64) -> DenseCLIPConfig:
    if kind == "resnet":
        vision = VisionConfig(kind="resnet", layers=(1, 1, 1, 1), width=8, heads=32, input_resolution=input_resolution)
        base = preset("RN50")
    else:
        vision = VisionConfig(
            kind="vit", layers=(12,), width=64, heads=1, input_resolution=input_resolution, patch_size=16
        )
        base = preset("ViT-B/16")
    return DenseCLIPConfig(
        arch="custom",
        embed_dim=48,
        vision=vision,
        text=TINY_TEXT,
        decoder=TINY_DECODER,
        fpn_channels=16,
        head_channels=16,
        score_concat_index=base.score_concat_index,
        slide_crop=base.slide_crop,
        slide_stride=base.slide_stride,
        test_scale=base.test_scale,
    )


def official_cfg(config: DenseCLIPConfig) -> dict[str, Any]:
    """The oracle's (mmseg-style) hyperparameters for one of our configs."""
    v, t, d = config.vision, config.text, config.decoder
    if v.kind == "resnet":
        backbone = dict(type="resnet", layers=list(v.layers), output_dim=config.embed_dim,
                        input_resolution=v.input_resolution, width=v.width)  # fmt: skip
    else:
        backbone = dict(type="vit", patch_size=v.patch_size, width=v.width, output_dim=config.embed_dim,
                        layers=v.layers[0], heads=v.heads, input_resolution=v.input_resolution)  # fmt: skip
    return dict(
        backbone=backbone,
        text_encoder=dict(context_length=t.context_length, embed_dim=config.embed_dim, transformer_width=t.width,
                          transformer_heads=t.heads, transformer_layers=t.layers, vocab_size=t.vocab_size),
        context_decoder=dict(transformer_width=d.width, transformer_heads=d.heads, transformer_layers=d.layers,
                             visual_dim=config.embed_dim, dropout=d.dropout),
        text_dim=config.embed_dim, score_concat_index=config.score_concat_index, fpn_out=config.fpn_channels,
        head_channels=config.head_channels, slide=(config.slide_crop, config.slide_stride),
    )  # fmt: skip


class RecordedOps(TorchDispatchMode):
    """A dispatch mode that records the name of every ATen operator called under it (``names``) and runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, the measure the acceptance criteria use."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def probed_with_fakes(probe: Any, monkeypatch: pytest.MonkeyPatch, module: Any, getter: str, fakes: list) -> list[bool]:
    """What ``probe`` (a functools.cache'd probe of an operator) answers when ``module.getter()`` returns each of
    ``fakes`` in turn instead of the operator; its cache is cleared around each."""
    answers, real = [], getattr(module, getter)
    for fake in fakes:
        probe.cache_clear()
        monkeypatch.setattr(module, getter, lambda fake=fake: fake)
        answers.append(probe())
    monkeypatch.setattr(module, getter, real)
    probe.cache_clear()
    return answers


def probed_under_other_defaults(probe: Any) -> bool:
    """The answer of ``probe`` (a functools.cache'd probe of an operator) run afresh with float64 as the default
    dtype and the meta device as the default device, which a probe must not depend on; its cache is cleared before
    and after."""
    probe.cache_clear()
    saved = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            return bool(probe())
    finally:
        torch.set_default_dtype(saved)
        probe.cache_clear()


def probed_under_autocast(probe: Any) -> bool:
    """The answer of ``probe`` (a functools.cache'd probe of an operator) run afresh inside a CPU bfloat16 autocast
    region, which a probe must not depend on: its answer is kept for the process, every thread's; its cache is
    cleared before and after."""
    probe.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bool(probe())
    finally:
        probe.cache_clear()


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random well-scaled weights, BN statistics and gamma (see benchmarks.official.randomize_)."""
    from benchmarks.official import randomize_

    return randomize_(model, seed)


def set_switch(monkeypatch: pytest.MonkeyPatch, variable: str, value: str | None) -> None:
    """The environment ``variable`` set to ``value`` for the test (None: unset)."""
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)


def forbid_launches(monkeypatch: pytest.MonkeyPatch, *modules: Any) -> None:
    """Any Triton launch through ``module.profiled`` of ``modules`` fails the test from now on (an empty tensor's
    early return must launch nothing: a grid of no programs is an error on CUDA)."""

    def no_launch(kernel: object) -> object:
        raise AssertionError(f"{kernel} launched for an empty tensor")

    for module in modules:
        monkeypatch.setattr(module, "profiled", no_launch)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, the previous one restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spy_launches(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    """The names of the Triton kernels ``module.launch`` launches from now on, in order (for the test's length)."""
    names: list[str] = []
    real = module.launch
    monkeypatch.setattr(module, "launch", lambda kernel: names.append(kernel.fn.__name__) or real(kernel))
    return names


def spy_score_plans(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The plans the Triton score forward looks up (score._forward_launch) from now on, for the test's length (the
    spy clears the real cache, as the benchmarks' variants do)."""
    from denseclip_fast.ops.triton import score

    plans: list[Any] = []
    real = score._forward_launch

    def spy(*key: Any) -> Any:
        plans.append(real(*key))
        return plans[-1]

    spy.cache_clear = real.cache_clear  # type: ignore[attr-defined]
    monkeypatch.setattr(score, "_forward_launch", spy)
    return plans


# (device type, dtype, switch, wanted) for a 16-bit CUDA rewrite's ``*_wanted(device, dtype)``: CUDA in float16 or
# bfloat16 with the switch unset or "1"; not float32, not with "0", not on a CPU
WANTED_16_BIT_CUDA = [("cuda", torch.bfloat16, None, True), ("cuda", torch.float16, "1", True),
                      ("cuda", torch.float32, None, False), ("cuda", torch.bfloat16, "0", False),
                      ("cpu", torch.bfloat16, None, False)]  # fmt: skip


def vit_engine_with(monkeypatch: pytest.MonkeyPatch, module: Any, devices: str, listed: bool, variable: str,
                    switch: str | None, dtype: torch.dtype, **kw: Any) -> tuple[Any, Any]:  # fmt: skip
    """A tiny ViT and a CPU Segmenter of it (``kw`` its arguments), built with the CPU as ``module``'s ``devices``
    (where ``listed``) and the environment ``variable`` set to ``switch`` (None: unset)."""
    from denseclip_fast import DenseCLIP, Segmenter

    if listed:
        monkeypatch.setattr(module, devices, ("cpu",))
    set_switch(monkeypatch, variable, switch)
    torch.manual_seed(0)
    model = randomized(DenseCLIP(tiny_config("vit"), NAMES)).eval()
    return model, Segmenter(model, device="cpu", dtype=dtype, **kw)


# the learning parts of a DenseCLIP, by parameter-name prefix (the text encoder is frozen)
LEARNING_PARTS = ("contexts", "gamma", "context_decoder.", "backbone.", "neck.", "decode_head.")


def gradients_by_part(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{part: its parameters' gradients flattened into one float64 vector} for each of LEARNING_PARTS, so that a part
    whose gradient goes missing shows (over all gradients at once, the contexts' are a few percent)."""
    named = list(model.named_parameters())
    return {part: torch.cat([p.grad.flatten().double() for n, p in named if n.startswith(part) and p.grad is not None])
            for part in LEARNING_PARTS}  # fmt: skip


def text_dependent_model(kind: str = "resnet") -> torch.nn.Module:
    """A tiny DenseCLIP in eval mode with random well-scaled weights whose outputs depend on the text path (score
    channels weighed as the benchmarks do: with random weights alone the context decoder barely moves the logits),
    with 64-pixel slide windows on a 128 x 64 test scale, so that whole and slide differ on small images."""
    from benchmarks.official import weigh_score_channels_
    from denseclip_fast import DenseCLIP

    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config(kind), test_scale=(128, 64), slide_crop=64, slide_stride=43)
    model = randomized(DenseCLIP(config, NAMES)).eval()
    weigh_score_channels_(model, size=64)
    return model


@pytest.fixture(scope="module", params=["resnet", "vit"])
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """A tiny DenseCLIP of each architecture kind in eval mode, with random well-scaled weights."""
    from denseclip_fast import DenseCLIP

    torch.manual_seed(0)
    return randomized(DenseCLIP(tiny_config(request.param), NAMES)).eval()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------ the CMake build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_root_on_path(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (os.environ's copy by default) with the checkout first on PYTHONPATH and what PYTHONPATH held kept
    after it: the GPU machine's packages (open_clip, ...) are a folder on PYTHONPATH (benchmarks/gpu_check.sh), which
    a child process given PYTHONPATH=ROOT alone could not import."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def cuda_toolkit() -> str | None:
    """The CUDA toolkit setup.py would use, or None."""
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_extension.CUDA_HOME):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    return None


def _nvrtc() -> str | None:
    try:
        import nvidia  # type: ignore[import-not-found]  # torch's CUDA runtime wheels
    except ImportError:
        return None
    for base in nvidia.__path__:
        found = sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
        if found:
            return found[0]
    return None


def run_checked(args: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@dataclass
class CMakeBuild:
    """CMakeLists.txt built once per test session: libdenseclip_fast_ops and the examples/cpp programs."""

    directory: Path
    with_cuda: bool

    def run(self, program: str, *args: str) -> str:
        return run_checked([str(self.directory / program), *args])


@pytest.fixture(scope="session")
def cmake_build(tmp_path_factory: pytest.TempPathFactory) -> CMakeBuild:
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split()[2]
    if tuple(int(v) for v in version.split(".")[:2]) < (3, 26):
        pytest.skip(f"cmake {version} is too old for torch's CMake config (>= 3.26; make setup installs one)")
    build = tmp_path_factory.mktemp("cmake")
    args = [cmake, "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")
    if ninja:
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    toolkit = cuda_toolkit()
    # The CUDA sources are compiled by setup.py already (test_extension.py); compiling them a second time here
    # costs CI minutes, so CMake's CUDA path runs where DENSECLIP_FAST_CMAKE_CUDA=1 (benchmarks/gpu_check.sh).
    wanted = os.environ.get("DENSECLIP_FAST_CMAKE_CUDA") == "1"
    with_cuda = torch.version.cuda is not None and toolkit is not None and wanted
    if torch.version.cuda is not None:
        if toolkit is None:
            pytest.skip("a CUDA build of torch needs a CUDA toolkit for find_package(Torch)")
        # TorchConfig needs the toolkit even for CPU code; nvrtc ships with torch's pip packages, not the toolkit
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}", f"-DCMAKE_CUDA_COMPILER={toolkit}/bin/nvcc"]
        if _nvrtc():
            args.append(f"-DCUDA_nvrtc_LIBRARY={_nvrtc()}")
    args.append(f"-DDENSECLIP_FAST_CUDA={'ON' if with_cuda else 'OFF'}")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"}
    run_checked(args, env)
    run_checked([cmake, "--build", str(build), "-j", str(min(os.cpu_count() or 2, 16))], env)
    return CMakeBuild(build, with_cuda)

"""The oldest PyTorch this package runs on, checked when it is imported.

pyproject.toml asks pip for the same release (a test keeps the two equal), but a torch installed around pip (``pip
install --no-deps``, a conda environment, a source build) reaches the import anyway, and older releases fail far from
the cause: torch 2.4 cannot read checkpoints safely (no ``torch.serialization.safe_globals``) and has no
``torch.library.triton_op``; with torch 2.6 the CPU engine and training run, but ONNX export fails on the dynamic
batch, ``aoti_load_package`` has no ``device_index`` and its Triton (3.2) does not compile a score kernel; torch
2.9's ONNX exporter cannot export a ViT with a dynamic batch. 2.10.0 is the oldest release tried that passes the CPU
test suite (measured on 2026-12-06 with numpy < 2.4, which its Triton 3.6's interpreter needs, after three fixes made
that day; mypy, a development check, fails against its older type stubs: README, "Versions"; the GPU test machine's
2.11 is rerun by ``make test-gpu-torch``).
"""

from __future__ import annotations

import re

MIN_TORCH = (2, 10)


def release_below(version: str, floor: tuple[int, int]) -> bool:
    """Whether ``version``'s major.minor is below ``floor`` (pre-releases and local builds count as their release:
    "2.11.0a0+git...", "2.12.0.dev20260101+cpu"); False for a version that is no release number (a custom build:
    nothing to compare)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) < floor


def dotted(release: tuple[int, int]) -> str:
    return ".".join(map(str, release))


def check_torch_version(version: str) -> None:
    """ImportError naming ``version`` (``torch.__version__``) and the oldest release accepted when it is older
    (:func:`release_below`)."""
    if release_below(version, MIN_TORCH):
        floor = dotted(MIN_TORCH)
        raise ImportError(
            f"denseclip_fast needs torch >= {floor}, and this environment has torch {version}: upgrade it "
            f"(pip install 'torch>={floor}', with the torchvision built for it)"
        )

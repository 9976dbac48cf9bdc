"""The source distribution holds everything a build from it needs: `pip install denseclip_fast-X.tar.gz` compiles the
extension from csrc/ (headers included, which setuptools leaves out unless MANIFEST.in names them) and installs the
package with its data files."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .conftest import ROOT


def _tracked(*paths: str) -> list[str]:
    """git's tracked files (under ``paths``); skips where ROOT is no git checkout of its own (a copied tree, which
    may sit inside another repository)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(ROOT).resolve():
        pytest.skip("needs the git checkout (git ls-files)")
    listed = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_sdist_holds_every_build_input(tmp_path):
    """Built from a copy of the tracked files, so that the checkout's egg-info is left alone."""
    files = _tracked()
    src = tmp_path / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((Path(ROOT) / name).read_bytes())
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("denseclip_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = set(_tracked("csrc", "examples", "denseclip_fast")) | {
        "setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "MANIFEST.in",
    }  # fmt: skip
    assert any(name.endswith(".h") for name in needed) and "denseclip_fast/configs/RN50.json" in needed
    missing = sorted(needed - names)
    assert not missing, f"the sdist lacks {missing}"

"""The code passes ruff with the rules pyproject.toml selects (pyflakes, lines of at most 120 characters, import
order), so that an unused import, an undefined name or an over-long line fails CI rather than review; and the package
and benchmarks/ type-check with mypy as pyproject.toml configures it (a wrong type or a stale ``# type: ignore`` fails
too)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_ruff_check_is_clean():
    if importlib.util.find_spec("ruff") is None:  # the GPU machine's environment lacks it; make setup installs it
        pytest.skip("ruff is not installed (requirements.lock pins it)")
    paths = ["denseclip_fast", "benchmarks", "tests", "setup.py"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *paths], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_is_clean(tmp_path):
    if importlib.util.find_spec("mypy") is None:  # the GPU machine's environment lacks it; make setup installs it
        pytest.skip("mypy is not installed (requirements.lock pins it)")
    # the files and settings are pyproject.toml's [tool.mypy]; the cache goes to tmp_path, not into the checkout
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

"""The source distribution holds everything a build from it needs: `pip install denseclip_fast-X.tar.gz` compiles the
extension from csrc/ (headers included, which setuptools leaves out unless MANIFEST.in names them) and installs the
package with its data files."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from denseclip_fast.export import onnx as onnx_export
from denseclip_fast.export.onnx import ONNXExportUnavailable, check_onnx_export
from denseclip_fast.requirements import MIN_TORCH, check_torch_version

from .conftest import ROOT


def _tracked(*paths: str) -> list[str]:
    """git's tracked files (under ``paths``); skips where ROOT is no git checkout of its own (a copied tree, which
    may sit inside another repository)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(ROOT).resolve():
        pytest.skip("needs the git checkout (git ls-files)")
    listed = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    return listed.stdout.split()


def _tracked_copy(tmp_path: Path) -> Path:
    """A copy of the tracked files, to build from: setuptools' commands rewrite the checkout's egg-info."""
    src = tmp_path / "src"
    for name in _tracked():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((Path(ROOT) / name).read_bytes())
    return src


def test_sdist_holds_every_build_input(tmp_path):
    """Built from a copy of the tracked files, so that the checkout's egg-info is left alone."""
    src = _tracked_copy(tmp_path)
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("denseclip_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        (pkg_info,) = [member for member in tar.getmembers() if member.name.count("/") == 1
                       and member.name.endswith("/PKG-INFO")]  # fmt: skip
        metadata = tar.extractfile(pkg_info).read().decode()  # type: ignore[union-attr]
    # the license travels with the code and is declared where pip and PyPI read it (PEP 639)
    assert "License-Expression: MIT" in metadata.splitlines() and "License-File: LICENSE" in metadata.splitlines()
    needed = set(_tracked("csrc", "examples", "denseclip_fast")) | {
        "setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "MANIFEST.in", "LICENSE",
    }  # fmt: skip
    assert any(name.endswith(".h") for name in needed) and "denseclip_fast/configs/RN50.json" in needed
    assert "denseclip_fast/py.typed" in needed  # PEP 561's marker: without it mypy ignores the package's types
    missing = sorted(needed - names)
    assert not missing, f"the sdist lacks {missing}"


def test_the_installed_package_holds_every_tracked_file_of_it(tmp_path):
    """What pip installs from the sdist or a wheel is build_py's tree (plus the compiled extension): every module
    and data file of denseclip_fast/ (configs/*.json, export/*.json, py.typed) must be in it; a data file the
    package-data table of pyproject.toml does not name is left out, and the package fails where it reads it."""
    tracked = set(_tracked("denseclip_fast"))
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                            cwd=_tracked_copy(tmp_path), capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    built = {path.relative_to(tmp_path / "lib").as_posix() for path in (tmp_path / "lib").rglob("*") if path.is_file()}
    assert "denseclip_fast/configs/RN50.json" in tracked and "denseclip_fast/py.typed" in tracked
    missing = sorted(tracked - built)
    assert not missing, f"an installed package would lack {missing} (pyproject.toml's [tool.setuptools.package-data])"


@pytest.mark.parametrize("version", ["2.10.0", "2.11.0+cu130", "2.10.0a0+git1234abc", "2.12.0.dev20260101+cpu",
                                     "2.14.1+cu130", "3.0.0", "custom-build"])  # fmt: skip
def test_torch_releases_from_the_floor_on_are_accepted(version):
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.9.1+cu128", "2.6.0", "2.4.1+cu121", "1.13.1"])
def test_older_torch_is_refused_at_import_naming_both_versions(version):
    floor = re.escape(".".join(map(str, MIN_TORCH)))
    expected = rf"needs torch >= {floor}, and this environment has torch {re.escape(version)}: upgrade it"
    with pytest.raises(ImportError, match=expected + rf" \(pip install 'torch>={floor}'"):
        check_torch_version(version)


def test_the_import_check_runs_before_anything_else_is_imported():
    """A fresh interpreter whose torch reports 2.9: importing the package fails with the version message, not with
    whatever a newer-torch feature raises further in, and before any other module of the package is imported."""
    code = ("import sys, torch; torch.__version__ = '2.9.0'\n"
            "try:\n    import denseclip_fast\nexcept ImportError as exc:\n    print(exc)\n"
            "print(sorted(m for m in sys.modules if m.startswith('denseclip_fast.')))\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    message, imported = result.stdout.splitlines()
    assert "needs torch >= " in message and "has torch 2.9.0" in message, result
    assert imported == "['denseclip_fast.requirements']", result


def test_importing_the_package_leaves_the_compiler_unimported():
    """`import denseclip_fast` (every command's start) does not import torch._dynamo, a second of its own: the
    backends mark their trace-time constants by hand (ops.backends.constant_while_tracing)."""
    code = "import sys, denseclip_fast\nprint(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result


def test_pyproject_asks_pip_for_the_torch_the_import_check_accepts():
    with open(Path(ROOT) / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    floor = ".".join(map(str, MIN_TORCH))
    assert f"torch>={floor}" in project["project"]["dependencies"]
    assert f"torch>={floor}" in project["build-system"]["requires"]


def test_the_python_classifiers_run_from_the_floor_pyproject_declares():
    """The Python versions the metadata lists (those the suite passed on) are consecutive and start at
    requires-python's lower bound, which mypy's python_version checks the code against."""
    with open(Path(ROOT) / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    project = config["project"]
    floor = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert floor, project["requires-python"]
    minors = [int(c.rsplit(".", 1)[1]) for c in project["classifiers"]
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]  # fmt: skip
    assert minors == list(range(int(floor.group(1)), int(floor.group(1)) + len(minors))) and len(minors) >= 1, minors
    assert config["tool"]["mypy"]["python_version"] == f"3.{floor.group(1)}"


# modules the package imports without declaring their distribution, and why that is right
UNDECLARED = {
    "triton": "ships with the CUDA builds of torch; imported under try (the Triton backend)",
    "protobuf": "onnx's own dependency, used with it (the export extra declares onnx)",
}
# module -> distribution where the module is not installed (the extras, triton with CPU-only torch) or its name
# differs from its distribution's
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch", "google": "protobuf"}


def test_every_third_party_import_is_a_declared_dependency():
    """Every package the code imports (YAML configs need PyYAML, which arrived only through open_clip's
    huggingface_hub) is in pyproject's dependencies or an extra, save the UNDECLARED ones, each with its reason."""
    import ast
    import importlib.metadata

    with open(Path(ROOT) / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    declared = {normal(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}
    modules = set()
    for path in (Path(ROOT) / "denseclip_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = sorted(m for m in modules if m not in sys.stdlib_module_names and m != "denseclip_fast")
    assert {"torch", "numpy", "PIL", "yaml"} <= set(third_party)
    distributions = importlib.metadata.packages_distributions()
    for module in third_party:
        names = distributions.get(module) or [DISTRIBUTIONS.get(module, module)]
        assert any(normal(n) in declared or normal(n) in UNDECLARED for n in names), (module, names)


@pytest.mark.parametrize("versions", [{"onnx": "1.17.0", "onnxscript": "0.7.0"}, {"onnx": "1.23.1", "onnxscript":
                                      "0.10.1"}, {"onnx": "1.23.1", "onnxscript": "1.0.0.dev0"},
                                      {"onnx": "", "onnxscript": "", "onnxruntime": ""}])  # fmt: skip
def test_onnxscript_from_0_7_exports(versions):
    check_onnx_export(versions)


@pytest.mark.parametrize("versions, says", [
    ({"onnx": "1.23.1", "onnxscript": "0.6.2"}, "ONNX export needs onnxscript >= 0.7, and this environment has 0.6.2"),
    ({"onnx": "1.23.1", "onnxscript": None}, "ONNX export needs onnxscript, not installed here"),
    ({"onnx": None, "onnxscript": None}, "ONNX export needs onnx and onnxscript, not installed here"),
    ({"onnx": "1.23.1", "onnxscript": "0.7.2", "onnxruntime": None}, "--verify needs onnxruntime, not installed here"),
    ({"onnx": "1.23.1", "onnxscript": None, "onnxruntime": None},
     "ONNX export and --verify need onnxscript and onnxruntime, not installed here"),
])  # fmt: skip
def test_a_missing_or_old_onnxscript_is_named_with_what_to_install(versions, says):
    with pytest.raises(ONNXExportUnavailable, match="^" + re.escape(says + ": pip install 'denseclip_fast[export]' "
                                                                  "(onnx >= 1.17, onnxscript >= 0.7, onnxruntime >= "
                                                                  "1.20)") + "$"):  # fmt: skip
        check_onnx_export(versions)


def test_an_installed_module_that_does_not_import_is_named(monkeypatch):
    """Installed (metadata found) but broken (a missing shared library): said before the export, not after it."""
    monkeypatch.setattr(onnx_export, "_installed", lambda name: "1.30.0" if name == "onnxruntime" else "")

    def import_module(name):
        if name == "onnxruntime":
            raise ImportError("libonnxruntime_providers_cuda.so: cannot open shared object file")

    monkeypatch.setattr(onnx_export.importlib, "import_module", import_module)
    with pytest.raises(ONNXExportUnavailable, match=re.escape("--verify needs onnxruntime, which is installed "
                                                              "(1.30.0) but does not import: libonnxruntime_providers"
                                                              "_cuda.so: cannot open shared object file; reinstall "
                                                              "it: pip install")):  # fmt: skip
        check_onnx_export(runtime=True)
    check_onnx_export(runtime=False)  # export alone does not need onnxruntime


def test_a_module_without_distribution_metadata_counts_as_installed(monkeypatch):
    """A module importable from a source checkout on PYTHONPATH has no metadata: installed, version unknown."""
    assert onnx_export._installed("pytest") == pytest.__version__
    assert onnx_export._installed("no_such_module_here") is None

    def no_metadata(name: str) -> str:
        raise onnx_export.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(onnx_export.importlib.metadata, "version", no_metadata)
    assert onnx_export._installed("pytest") == ""


def test_versions_given_are_compared_not_imported(monkeypatch):
    """check_onnx_export(versions) judges the versions it is given (those of another environment, a lock file's):
    it imports nothing; only this environment's (versions=None) are imported too."""
    imported: list[str] = []
    monkeypatch.setattr(onnx_export.importlib, "import_module", lambda name: imported.append(name))
    check_onnx_export({"onnx": "1.17.0", "onnxscript": "0.7.0", "onnxruntime": "1.20.0"})
    assert imported == []
    monkeypatch.setattr(onnx_export, "_installed", lambda name: "1.0")
    check_onnx_export(runtime=True)
    assert imported == ["onnx", "onnxscript", "onnxruntime"]

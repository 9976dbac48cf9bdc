"""README's code says what the package has: every function and method its Python blocks call exists and takes the
arguments they pass (names and counts), every field they set exists, and every option its command lines give is
one the subcommand accepts (attributes only read, and instance attributes made in __init__, are not checked). The
blocks name files a test machine lacks (released weights, data sets), so they are read, not run; what they call is
checked against the code."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import denseclip_fast
from denseclip_fast import DenseCLIP, Segmenter, export
from denseclip_fast.cli import build_parser
from denseclip_fast.export import AOTIPackage
from denseclip_fast.train import TrainConfig

from .conftest import NAMES as CLASS_NAMES
from .conftest import randomized, tiny_config

README = Path(__file__).resolve().parent.parent / "README.md"
# what the blocks' names stand for: modules, or the class of the object a name is bound to
NAMES: dict[str, Any] = {"dcf": denseclip_fast, "torch": torch, "export": export, "model": DenseCLIP,
                         "seg": Segmenter, "pkg": AOTIPackage, "cfg": TrainConfig, "np": np,
                         "Image": Image}  # fmt: skip


def _blocks(language: str) -> list[tuple[int, str]]:
    """(first line number, text) of README's fenced blocks in ``language``."""
    found, lines = [], README.read_text(encoding="utf-8").splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            start = number
        elif start is not None and line.strip() == "```":
            found.append((start + 1, "\n".join(lines[start:number - 1])))
            start = None
    return found


def _resolve(node: ast.expr, names: dict[str, Any]) -> tuple[Any, str] | None:
    """(what ``node`` names, its kind): "object" (a module, class or function itself), "instance" (the class of the
    object a name stands for: ``model``) or "method" (a function looked up on such a class, taking the instance
    first); None for what the blocks compute (a call's result, a local such as ``x``, a property's value)."""
    if isinstance(node, ast.Name):
        if node.id not in names:
            return None
        return names[node.id], "object" if node.id in ("dcf", "torch", "export") or node.id not in NAMES else "instance"
    if not isinstance(node, ast.Attribute):
        return None
    owner = _resolve(node.value, names)
    if owner is None or owner[1] == "method":
        return None
    value, kind = owner
    where = f"README line {node.lineno}: {getattr(value, '__name__', value)}"
    if kind == "object":
        assert hasattr(value, node.attr), f"{where} has no attribute {node.attr!r}"
        return getattr(value, node.attr), "object"
    fields = {f.name for f in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else set()
    if node.attr in fields:  # an instance's field (cfg.data): its value is the instance's
        return None
    try:
        raw = inspect.getattr_static(value, node.attr)
    except AttributeError:
        raise AssertionError(f"{where} has no attribute {node.attr!r}") from None
    if inspect.isfunction(raw):
        return raw, "method"
    return (getattr(value, node.attr), "object") if isinstance(raw, (staticmethod, classmethod)) else None


def _check_call(call: ast.Call, names: dict[str, Any], where: str) -> bool:
    """``call`` passes what the function it names takes (positional count, keyword names); whether it was checked
    (False for a call of what the block computed, or of a builtin without a signature)."""
    resolved = _resolve(call.func, names)
    if resolved is None:
        return False
    target, kind = resolved
    if kind == "instance":  # an object called: model(x) runs forward, pkg(x) __call__
        target = target.forward if issubclass(target, torch.nn.Module) else target.__call__
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without one (torch.randn): nothing to check
        return False
    args = [None] * (len(call.args) + (kind != "object"))  # a method, looked up on the class: the instance first
    try:
        signature.bind(*args, **{k.arg: None for k in call.keywords if k.arg is not None})
    except TypeError as exc:
        raise AssertionError(f"{where} line {call.lineno}: {ast.unparse(call)}: {exc}") from None
    return True


def _check_python(code: str, start: int) -> list[str]:
    """Check a Python block that starts at README line ``start``; the calls it could not check (of what the block
    computed, or of builtins without a signature)."""
    tree = ast.parse(code)
    names = dict(NAMES)
    for node in ast.walk(tree):  # the blocks' own imports (from denseclip_fast.train import train, ...)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("denseclip_fast"):
            module = __import__(node.module, fromlist=[a.name for a in node.names])
            for alias in node.names:
                assert hasattr(module, alias.name), f"README line {start + node.lineno - 1}: {node.module} has no " \
                                                    f"{alias.name}"  # fmt: skip
                names[alias.asname or alias.name] = getattr(module, alias.name)
    unchecked = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and not _check_call(node, names, f"README block at line {start}"):
            unchecked.append(ast.unparse(node.func))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):  # cfg.data = ...
            _resolve(node, names)
    return unchecked


@pytest.mark.parametrize("start, code", _blocks("python"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_python_blocks_use_what_the_package_has(start, code):
    # every call is checked but torch's builtins (torch.randn): a block whose objects the check does not know (a
    # model named net) fails here, to be added to NAMES; the Quick start's calls of what it computed (an image read
    # with PIL) are checked by running it (test_the_quick_start_runs)
    unchecked = [f for f in _check_python(code, start) if not f.startswith("torch.")]
    assert unchecked == [] or start == _quick_start()[0]


def _quick_start() -> tuple[int, str]:
    """(first line, text) of the Python block of README's Quick start section."""
    text = README.read_text(encoding="utf-8")
    heading = text.count("\n", 0, text.index("\n## Quick start\n")) + 2
    following = [(n, block) for n, block in _blocks("python") if n > heading]
    assert following, "README has no Python block after its Quick start heading"
    return following[0]


def test_the_quick_start_runs(tmp_path, monkeypatch):
    """README's Quick start Python block, run as written but for its files (a tiny random-weight checkpoint in place
    of the released one, a random photo) and, without a GPU, its device and dtype (the ones its comment names)."""
    start, code = _quick_start()
    checkpoint = "denseclip_fpn_res50_512x512_80k.pth"
    on_gpu = 'device="cuda", dtype=torch.bfloat16'
    assert checkpoint in code and "street.jpg" in code and on_gpu in code and 'no GPU: "cpu", torch.float32' in code
    randomized(DenseCLIP(tiny_config(), CLASS_NAMES)).eval().save(tmp_path / "tiny.safetensors")
    code = code.replace(checkpoint, "tiny.safetensors")
    if not torch.cuda.is_available():
        code = code.replace(on_gpu, 'device="cpu", dtype=torch.float32')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "street.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(code, f"README.md, the block at line {start}", "exec"), scope)
    labels = scope["labels"]
    assert labels.shape == (90, 120) and 0 <= int(labels.min()) and int(labels.max()) < len(CLASS_NAMES)
    with Image.open(tmp_path / "street_overlay.png") as overlay:
        assert overlay.size == (120, 90) and overlay.mode == "RGB"


def test_readme_code_blocks_are_all_read():
    """Every fenced block is one the checks above read (python or bash), so none is skipped for its fence."""
    fences = re.findall(r"^```(\S+)", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert set(fences) == {"python", "bash"} and len(_blocks("python")) >= 4 and len(_blocks("bash")) >= 3


@pytest.mark.parametrize("code, problem", [
    ("model.set_clases(['a'])", "DenseCLIP has no attribute 'set_clases'"),
    ("dcf.segmenter(model)", "has no attribute 'segmenter'"),
    ("seg.warmup((480, 640), batches=1)", "unexpected keyword argument 'batches'"),
    ("logits = model(x, y)", "too many positional arguments"),
    ("export.to_onnx(model)", "missing a required argument: 'path'"),
    ("cfg.nothing = 1", "TrainConfig has no attribute 'nothing'"),
    ("from denseclip_fast.train import trian", "denseclip_fast.train has no trian"),
])  # fmt: skip
def test_the_python_check_finds_what_the_package_lacks(code, problem):
    with pytest.raises(AssertionError, match=re.escape(problem)):
        _check_python(code, 1)
    assert _check_python("net = dcf.load_checkpoint('m.pth')\nnet.set_clases(['a'])", 1) == ["net.set_clases"]


def _options(parser: Any, command: str) -> set[str]:
    subparsers = next(a for a in parser._actions if a.choices and command in a.choices)
    return set(subparsers.choices[command]._option_string_actions)


def _check_commands(block: str, start: int) -> int:
    """Check the denseclip-fast command lines of a bash block at README line ``start``; the options checked."""
    parser, checked = build_parser(), 0
    for line in block.replace("\\\n", " ").splitlines():
        match = re.search(r"(?:^|\s)(?:denseclip-fast|-m denseclip_fast(?:\.cli)?) ([a-z]+)(.*)", line)
        if match is None:
            continue
        command, rest = match.groups()
        known = _options(parser, command)
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest.split("#")[0]):
            assert option in known, f"README bash block at line {start}: {command} takes no {option}"
            checked += 1
    return checked


def test_readme_command_lines_give_options_the_commands_take():
    assert sum(_check_commands(block, start) for start, block in _blocks("bash")) > 20
    text = README.read_text(encoding="utf-8")
    spans = [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(r"`(denseclip-fast [^`]+)`", text)]
    assert sum(_check_commands(span, number) for number, span in spans) >= 4  # commands in the prose
    with pytest.raises(AssertionError, match="segment takes no --outdir"):
        _check_commands("denseclip-fast segment --checkpoint C IMAGE \\\n    --outdir DIR", 1)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_within_it_name_its_headings_and_its_contents_list_every_section():
    text = README.read_text(encoding="utf-8")
    outside = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # a bash comment is no heading
    headings = re.findall(r"^#{1,6} (.+)$", outside, flags=re.MULTILINE)
    anchors = {_slug(h) for h in headings}
    in_page = re.compile(r"\]\(#([^)]*)\)")  # [text](#anchor)
    links = in_page.findall(outside)
    assert links and not [link for link in links if link not in anchors], sorted(set(links) - anchors)
    contents = re.search(r"^\*\*Contents\.\*\*(.*?)\n\n", outside, flags=re.MULTILINE | re.DOTALL)
    assert contents, "README has no **Contents.** paragraph"
    sections = [_slug(h) for h in re.findall(r"^## (.+)$", outside, flags=re.MULTILINE)]
    assert in_page.findall(contents.group(1)) == sections

"""The import rules of docs/design.md, "Layers of the code": dependencies point down only."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lasp"
# subpackage (or top-level module) -> the lasp subpackages it may import (besides itself)
ALLOWED = {
    "distributed": set(),
    "kernels": set(),
    "sp": {"kernels", "distributed"},
    "model": {"kernels"},
    "parallel": {"model", "sp", "kernels", "distributed", "cli"},
    "data": {"sp", "cli", "kernels"},  # kernels.documents: the packed documents the loader reads
    "train": {"data", "parallel", "model", "sp", "kernels", "distributed", "cli"},
    "cli": {"sp"},  # lasp/cli.py: the argument checks every command-line tool shares
}
NO_TORCH_DISTRIBUTED = {"kernels", "model", "data", "cli"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _layer(path: Path) -> str:
    """The subpackage (or top-level module) a file belongs to."""
    return path.relative_to(PKG).with_suffix("").parts[0]


FILES = sorted(p for p in PKG.rglob("*.py") if _layer(p) in ALLOWED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    sub = _layer(path)
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "lasp" and len(parts) > 1:
            assert parts[1] in ALLOWED[sub] | {sub}, f"lasp/{sub} must not import {name}"
        if sub in NO_TORCH_DISTRIBUTED:
            assert not name.startswith("torch.distributed"), f"lasp/{sub} must not use {name}"


def test_there_are_files_to_check():
    assert {_layer(p) for p in FILES} >= {"kernels", "sp", "distributed", "train", "cli"}

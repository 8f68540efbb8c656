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


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """Module of the package at `root` -> the package's modules it imports, at the top or inside a function
    (`from lasp.a import b` counts as lasp.a.b when b is a module, else as lasp.a)."""
    modules = {_module(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                out.update(
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                )
        graph[name] = out - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_seen_through_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import g\n\ndef f():\n    return g()\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from pkg.sub import a\n\n    return a\n")
    (pkg / "c.py").write_text("import pkg.sub.b\n")
    assert import_graph(pkg)["pkg.sub.b"] == {"pkg.sub.a"}
    assert cycles(import_graph(pkg)) == [["pkg.sub.a", "pkg.sub.b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

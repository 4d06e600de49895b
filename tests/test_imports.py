"""The package's import arrows (DESIGN.md "Arrows"): no module imports a module that imports it
back, however long the way round and whether at module level or inside a function; and the
runtime reaches the export toolchain (edgellm.export, onnx, torch) only lazily, inside the
functions that export."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject maps export/ onto edgellm.export).
PACKAGES = {ROOT / "edgellm": "edgellm", ROOT / "export": "edgellm.export"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _run_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run: at module level and inside functions (a lazy import is still
    an arrow: two modules importing each other lazily are one concept in two homes), but not
    those under `if TYPE_CHECKING:`, which never run."""
    found, todo = [], list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: n.lineno)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the package it imports, eagerly or lazily. A package's own
    __init__ is not counted as imported by its submodules (Python runs it first anyway)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _run_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from a import b`: b is a submodule where one exists, else a name in a.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_the_walk_sees_lazy_imports_and_circles_but_not_type_checking_imports():
    a = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nimport y\n"
                  "def f():\n    import z\n")
    assert [getattr(n, "module", None) or n.names[0].name for n in _run_imports(a)] == ["typing", "y", "z"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "edgellm.runtime.runner" in graph["edgellm.model"]  # relative imports resolved
    assert "edgellm.runtime.bundle" in graph["edgellm.export.api"]  # the toolchain's absolute ones


def test_no_import_circles_inside_edgellm_or_its_export_toolchain():
    found = circles(import_graph())
    assert not found, "import circles (modules importing each other, eagerly or lazily): " + "; ".join(
        " <-> ".join(group) for group in found)


# What a board running a bundle imports: the command line, the Python API, every front.
RUNTIME_ENTRY_POINTS = ["edgellm", "edgellm.cli.main", "edgellm.model", "edgellm.service.server",
                        "edgellm.service.http", "edgellm.service.http_openai", "edgellm.service.http_ollama",
                        "edgellm.service.broker", "edgellm.service.client", "edgellm.recipes"]


@pytest.mark.parametrize("module", RUNTIME_ENTRY_POINTS)
def test_the_runtime_imports_the_export_toolchain_only_lazily(module):
    # A fresh interpreter: this one has imported the toolchain for other tests already.
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in sys.modules if m == 'onnx' or m == 'torch' or m == 'edgellm.export'"
            " or m.startswith(('edgellm.export.', 'onnx.', 'torch.')))\n"
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing {module} imported {done.stdout.strip()}"

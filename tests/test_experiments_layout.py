"""The layout of ``samkit.experiments``: no import circle, and no file over the size limit.

The import graph is built from each module's top-level imports (a function's
own imports and those under ``if TYPE_CHECKING:`` run later, or never, so they
cannot make a circle at import time); importing ``a.b.c`` imports the
packages ``a.b`` and ``a`` first, so those count as edges too (but for a
module's own packages, which are being imported when it is).
"""

from __future__ import annotations

import ast
from pathlib import Path

import samkit.experiments

ROOT = Path(samkit.experiments.__file__).parent
PACKAGE = "samkit.experiments"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at module level, also inside
    ``try``/``if``/``with`` blocks, but not under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                test = node.test
                name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
                if name != "TYPE_CHECKING":
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    visit(block)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """``name`` and the packages above it, those of ``samkit.experiments`` only."""
    out = set()
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules and candidate != PACKAGE:
            out.add(candidate)
    return out


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = (
                    (f"{base}.{node.module}" if node.module else base)
                    if node.level
                    else (node.module or "")
                )
                # ``from pkg import name``: the submodule pkg.name when there is one
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            # the packages around ``name`` are being imported already: no edge back to them
            own = _with_parents(name, modules)
            for target in targets:
                graph[name] |= _with_parents(target, modules) - own
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = _import_graph()
    assert f"{PACKAGE}.engine.core" in graph[f"{PACKAGE}.trainer"]
    assert f"{PACKAGE}.engine" in graph[f"{PACKAGE}.trainer"]  # the package runs first
    assert f"{PACKAGE}.configs" in graph[f"{PACKAGE}.settings"]
    # imported inside a function only: no edge
    assert f"{PACKAGE}.tune_parallel" not in graph[f"{PACKAGE}.tune_search"]


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_experiments_has_no_import_circle():
    assert _cycle(_import_graph()) is None, " -> ".join(_cycle(_import_graph()) or [])


def test_every_file_of_experiments_is_under_the_size_limit():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for p in ROOT.rglob("*.py")
    }
    too_long = {f: n for f, n in sizes.items() if n >= MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"

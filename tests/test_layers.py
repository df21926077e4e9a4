"""The package's layering (hf_soups/_layers.py): no upward import, no cycle, every module placed.

Imports are read with `ast`, at module level and inside functions; imports under `if TYPE_CHECKING:` never run
and are exempt. `from hf_soups import NAME` counts as importing the module that defines NAME (the package's
lazy re-exports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hf_soups
from hf_soups._layers import LAYERS, layer_of

PACKAGE = Path(hf_soups.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name relative to hf_soups ("" for the package itself, "core" for core/__init__.py) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _known(name: str) -> str | None:
    """The module of the package that `name` (dotted, relative to hf_soups) is or lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name in MODULES else None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement runs (relative names; "" is the package itself)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [
            n.removeprefix("hf_soups").lstrip(".")
            for n in names
            if n == "hf_soups" or n.startswith("hf_soups.")
        ]
    if node.level:
        is_pkg = MODULES[module].name == "__init__.py"
        base = module.split(".") if module else []
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module == "hf_soups" or (node.module or "").startswith("hf_soups."):
        target = node.module.removeprefix("hf_soups").lstrip(".")
    else:
        return []
    out = []
    for alias in node.names:
        full = f"{target}.{alias.name}" if target else alias.name
        if full in MODULES:  # `from pkg import submodule`
            out.append(full)
        elif target == "" and alias.name in hf_soups._SUBMOD_ATTRS:  # the lazy re-exports
            out.append(hf_soups._SUBMOD_ATTRS[alias.name])
        else:
            out.append(target)
    return out


def _imports(module: str) -> list[tuple[str, int]]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _targets(module, node):
                known = _known(target)
                assert known is not None, f"hf_soups.{module}:{node.lineno} imports unknown hf_soups.{target}"
                if known != module:
                    found.append((known, node.lineno))
        visit(node)

    visit(tree)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    return 0 if module == "" else layer_of(module)  # the package itself only re-exports, lazily


def _name(index: int) -> str:
    return LAYERS[index][0]


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m and layer_of(m) is None]
    assert not unplaced, f"modules missing from hf_soups/_layers.py LAYERS: {unplaced}"


def test_no_upward_import():
    upward = [
        f"hf_soups.{m}:{line} ({_name(_layer(m))}) imports hf_soups.{t} ({_name(_layer(t))})"
        for m, edges in GRAPH.items()
        if m
        for t, line in edges
        if t and _layer(t) > _layer(m)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle():
    assert not _cycles(), f"import cycles: {_cycles()}"


@pytest.mark.parametrize(
    "module, code, expected",
    [
        ("core.engine", "from ..soup import Soup", ["soup"]),
        ("core.engine", "def f():\n    from ..kitchen import Kitchen", ["kitchen"]),
        (
            "core.engine",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..soup import Soup",
            [],
        ),
        ("integrations.callback", "from hf_soups import merge_models, __version__", ["api", ""]),
        ("cli.inspect", "from .. import adapters", ["adapters"]),
    ],
)
def test_the_walker_sees_imports(module, code, expected, monkeypatch, tmp_path):
    """The checks above can fail: the walker finds imports in functions, skips TYPE_CHECKING and follows the
    package's lazy re-exports."""
    path = tmp_path / "m.py"
    path.write_text(code)
    monkeypatch.setitem(MODULES, module, path)
    found = [t for t, _ in _imports(module)]
    assert found == expected
    assert any(_layer(t) > _layer(module) for t in found) == (module == "core.engine" and bool(expected))

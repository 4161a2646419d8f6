"""The layering rules of docs/architecture.md, checked against the code's own imports.

Each rule is one a newcomer would otherwise learn by breaking it: core stands alone,
the three components never import each other, only the HTTP layer of the server speaks
HTTP, no module grows past what one reader holds, and no import circle forms.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_MODULE_LINES = 450

# What each part of the package may import from tufa. The demo drives the programs as
# processes, so it stands on core alone; `tufa demo` is registered by cli/main.py.
ALLOWED_IMPORTS = {
    "tufa.core": {"tufa.core"},
    "tufa.server": {"tufa.core", "tufa.server"},
    "tufa.cli": {"tufa.core", "tufa.cli"},
    "tufa.agent": {"tufa.core", "tufa.agent"},
    "tufa.demo": {"tufa.core", "tufa.demo"},
}

# The server's HTTP layer: the only modules that may import Starlette or the HTTP errors.
HTTP_LAYER = ("tufa.server.api", "tufa.server.app", "tufa.server.main", "tufa.server.auth")
HTTP_MODULES = ("starlette", "tufa.server.errors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path for path in sorted(SRC.rglob("*.py")) if "migrations" not in path.parts
}


def _imports(name: str, *, runtime_only: bool = False) -> Iterator[str]:
    """Every module `name` imports; with `runtime_only`, not those under TYPE_CHECKING."""
    tree = ast.parse(MODULES[name].read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for child in ast.walk(node))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            # `from tufa.cli import keys` imports the module tufa.cli.keys.
            yield from (f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)


def _part_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_modules_are_found() -> None:
    assert {"tufa.core.metadata", "tufa.server.app", "tufa.cli.main", "tufa.agent.main"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_part_imports_only_what_it_stands_on(name: str) -> None:
    if name == "tufa" or name.startswith("tufa.__"):
        return
    allowed = ALLOWED_IMPORTS[_part_of(name)]
    wrong = sorted(
        imported
        for imported in _imports(name)
        if imported.startswith("tufa.")
        and _part_of(imported) not in allowed
        and not (name == "tufa.cli.main" and _part_of(imported) == "tufa.demo")
    )
    assert not wrong, f"{name} may import only {sorted(allowed)}, but imports {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("tufa.server.")))
def test_only_the_http_layer_speaks_http(name: str) -> None:
    if _within(name, (*HTTP_LAYER, "tufa.server.errors")):
        return
    http = sorted(i for i in _imports(name) if _within(i, HTTP_MODULES))
    assert not http, f"{name} is domain code but imports {http}: raise tufa.server.exceptions"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_outgrows_one_reader(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (at most {MAX_MODULE_LINES})"


def test_no_import_circles() -> None:
    graph = {
        name: {i for i in _imports(name, runtime_only=True) if i in MODULES and i != name}
        for name in MODULES
    }
    # A package's __init__ importing its own modules is how Python packages are built.
    for name, imported in graph.items():
        imported -= {i for i in imported if i.startswith(name + ".")}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)

"""The house's rules, checked on the source (issue #16): read with `ast`, nothing imported.

- No import circles between the package's modules. Every import counts: at module level,
  inside functions, and under `if TYPE_CHECKING:` (a circle of type-only imports is still
  two modules that cannot be read apart).
- No hand-written module over `MAX_LINES` lines (generated twins are exempt).
- No module takes another module's private (`_x`) names: what a private module shares
  with its neighbours has a public name there (a documented internal interface).

`KNOWN` lists what the redesign has not reached yet; it only ever shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src" / "tokenhub_stream"
MAX_LINES = 800
#: Written by scripts/unasync.py from their async twins.
GENERATED = {"_sync_client.py", "tools/_loop_sync.py"}

#: Debts the redesign (#16) is paying off; each entry names what is still wrong.
KNOWN: set[str] = set()


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> str:
    path = MODULES[name]
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(importer: str, module: str | None, level: int) -> str | None:
    if level == 0:
        return module if module and module.split(".")[0] == "tokenhub_stream" else None
    base = _package_of(importer)
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{module}" if module else base


def _imports(name: str) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of `name`."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tokenhub_stream"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.module, node.level)
            if target is None:
                continue
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            if submodules:  # `from . import x`: an import of the submodule x
                for sub in submodules:
                    yield f"{target}.{sub}", []
                names = [n for n in names if n not in submodules]
            if names or not submodules:
                yield target, names


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _ in _imports(name):
            # A package's face (`__init__`) that only re-exports is where the import
            # lands; the modules it names are its own edges.
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; a component of two or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_architecture_has_no_import_circles() -> None:
    found: set[str] = set()
    graph = _graph()
    for members in _cycles(graph):
        # One line per edge inside the circle, so a debt is paid edge by edge. A package's
        # face counts like any module: a module that imports its own package's
        # `__init__` (which imports it back) is in a circle too.
        for a in members:
            for b in members:
                if b in graph[a] and a < b:
                    found.add(f"circle: {a} -> {b}")
                elif b in graph[a]:
                    found.add(f"circle: {b} -> {a}")
    new = found - KNOWN
    assert not new, f"new import circles: {sorted(new)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_architecture_module_is_not_oversized(name: str) -> None:
    path = MODULES[name]
    rel = path.relative_to(ROOT).as_posix()
    if rel in GENERATED:
        return
    lines = len(path.read_text().splitlines())
    if f"size: {rel}" in KNOWN:
        return
    assert lines <= MAX_LINES, f"{rel} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_architecture_takes_no_private_names(name: str) -> None:
    taken = [
        f"{target}.{n}"
        for target, names in _imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    debts = {t for t in taken if f"private: {name} <- {t}" in KNOWN}
    assert not set(taken) - debts, f"{name} takes private names: {sorted(set(taken) - debts)}"


def test_architecture_known_debts_are_still_debts() -> None:
    # A debt paid off leaves KNOWN, so the list never hides a new one of the same name.
    graph = _graph()
    circles = {
        f"circle: {a} -> {b}"
        for cycle in _cycles(graph)
        for a in cycle
        for b in cycle
        if a < b and (b in graph[a] or a in graph[b])
    }
    for debt in KNOWN:
        kind, _, what = debt.partition(": ")
        if kind == "circle":
            assert debt in circles, f"{debt!r} is paid off: remove it from KNOWN"
        elif kind == "private":
            importer, _, taken = what.partition(" <- ")
            target, _, name = taken.rpartition(".")
            assert any(t == target and name in names for t, names in _imports(importer)), (
                f"{debt!r} is paid off: remove it from KNOWN"
            )
        elif kind == "size":
            lines = len((ROOT / what).read_text().splitlines()) if (ROOT / what).exists() else 0
            assert lines > MAX_LINES, f"{debt!r} is paid off: remove it from KNOWN"

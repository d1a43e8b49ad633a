"""The package's shape: no import cycles, stages import only downward, no back-imports.

The graph is read from the source with :mod:`ast` (module-level and function-level imports
alike), so a cycle hidden behind a lazy import inside a function still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import inheritune

SRC = Path(inheritune.__file__).parent

# Pipeline order, bottom first: a module may import its own stage or any stage below it.
LAYERS = [
    {"config", "storage", "distributed"},
    {"models"},
    {"data"},
    {"analysis"},
    {"surgery"},
    {"training"},
    {"export"},
    {"recipe", "compare", "presets"},
    {"evaluate"},
    {"cli", "__main__"},
]
RANK = {stage: i for i, stages in enumerate(LAYERS) for stage in stages}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}
PACKAGES = {_module_name(p) for p in SRC.rglob("__init__.py")}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if importer not in PACKAGES:
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, tree: ast.AST) -> set[str]:
    """The package modules `importer` imports; ``from P import m`` of a submodule counts P.m
    (and, through :func:`_edges`, P's __init__ when the importer is outside P)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, node)
            names = {f"{module}.{alias.name}" for alias in node.names}
            found.update(names)
            if not names <= MODULES.keys():  # a name defined in `module` itself, not a submodule
                found.add(module)
    return {name for name in found if name in MODULES}


def _edges(importer: str, target: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a.b/__init__`` first, unless the importer
    is already inside that package (its __init__ is then already running)."""
    out = {target}
    parts = target.split(".")
    for i in range(2, len(parts)):
        package = ".".join(parts[:i])
        if not (importer == package or importer.startswith(package + ".")):
            out.add(package)
    return out - {importer}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*(_edges(name, t) for t in _targets(name, tree)), set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 30 and graph["inheritune.cli"]  # the walk really saw the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_every_stage_is_known():
    stages = {_stage(m) for m in MODULES} - {"__init__"}
    assert stages <= set(RANK), stages - set(RANK)


def test_stages_import_only_downward():
    upward = [
        f"{src} -> {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if _stage(src) != "__init__" and RANK.get(_stage(dst), -1) > RANK[_stage(src)]
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_type_checking_back_imports():
    offenders = [
        str(p.relative_to(SRC)) for p in MODULES.values() if "TYPE_CHECKING" in p.read_text()
    ]
    assert not offenders


def test_subpackages_say_what_they_hold():
    for package in PACKAGES:
        tree = ast.parse(MODULES[package].read_text())
        assert ast.get_docstring(tree), f"{package}/__init__.py has no docstring"


def test_top_level_is_small():
    entries = [p.name for p in SRC.iterdir() if not p.name.startswith("__")]
    assert len(entries) <= 14, sorted(entries)

"""The package's layout, read from its source: which module may import which.

The import graph is built with ``ast`` from every ``landscape/**/*.py``, counting imports at module level and
inside functions alike (a function-level import is still a dependency; it only delays the cycle to run time).
A package's ``__init__`` is a module of its own (``landscape.data``); importing ``landscape.a.b`` is an edge to
``landscape.a.b`` only, since a submodule may always import from its own package while that package is being
initialised.

Rules checked:

- no import cycle between landscape modules;
- no library module imports ``landscape.study``: only ``landscape.cli``, the entry point that runs a study, does;
- ``landscape/curvature/``, the mathematics, imports nothing that knows of runs, files or reports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import landscape

ROOT = Path(landscape.__file__).parent

# What the curvature package must never import: everything that knows of run directories, files and reports.
NOT_FOR_CURVATURE = ("runs", "checkpoints", "io", "config", "analyses", "cli", "study", "summary", "figures",
                     "report")
# The only module allowed to import the study orchestration.
STUDY_IMPORTERS = {"landscape.cli"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: the landscape modules it imports anywhere in its source}`` for every module under ``root``."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    # ``from landscape.data import idx`` imports the submodule; ``import X`` of a name imports X.
                    submodule = f"{source}.{alias.name}"
                    found.add(submodule if submodule in modules else source)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the first module of ``component``, as a path that returns to its start."""
    start = component[0]
    members = set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


# -- the graph builder itself, on a made-up package -------------------------------------------------------------
def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_import_graph_counts_function_level_relative_and_submodule_imports(tmp_path):
    root = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.sub import leaf\n",
        "b.py": "def f():\n    from . import a\n    from .sub.leaf import g\n",
        "sub/__init__.py": "from pkg.sub.leaf import g\n",
        "sub/leaf.py": "import os\ndef g():\n    import pkg.b\n",
    })
    graph = import_graph(root)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.leaf"},
        "pkg.b": {"pkg.a", "pkg.sub.leaf"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.b"},
    }
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.leaf"]]
    assert shortest_cycle(graph, ["pkg.a", "pkg.b", "pkg.sub.leaf"]) == ["pkg.a", "pkg.sub.leaf", "pkg.b", "pkg.a"]


def test_find_cycles_is_empty_for_a_chain_and_finds_a_package_init_in_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"p": {"p.x"}, "p.x": {"q"}, "q": {"p"}}) == [["p", "p.x", "q"]]


# -- the rules, on the package --------------------------------------------------------------------------------
def test_no_import_cycle_between_landscape_modules():
    graph = import_graph()
    cycles = [" -> ".join(shortest_cycle(graph, c)) for c in find_cycles(graph)]
    assert not cycles, "import cycles (module or function level):\n" + "\n".join(cycles)


def test_only_cli_imports_study():
    graph = import_graph()
    importers = {m for m, deps in graph.items() if "landscape.study" in deps}
    assert importers <= STUDY_IMPORTERS, f"landscape.study is imported by {sorted(importers - STUDY_IMPORTERS)}"


def test_curvature_package_exists_and_knows_nothing_of_runs_files_or_reports():
    assert (ROOT / "curvature" / "__init__.py").is_file(), "landscape/curvature/ is missing"
    graph = import_graph()
    forbidden = tuple(f"landscape.{m}" for m in NOT_FOR_CURVATURE)
    reached = {
        (m, d) for m, deps in graph.items() if m == "landscape.curvature" or m.startswith("landscape.curvature.")
        for d in deps if d in forbidden or d.startswith(tuple(f + "." for f in forbidden))
    }
    assert not reached, "curvature imports " + ", ".join(f"{d} (in {m})" for m, d in sorted(reached))


@pytest.mark.parametrize("package", ["data", "importers"])
def test_split_packages_have_no_module_left_behind(package):
    # A package and a module of the same name cannot both exist; the module would be shadowed silently.
    assert (ROOT / package / "__init__.py").is_file()
    assert not (ROOT / f"{package}.py").exists()


def test_every_module_compiles_without_a_warning():
    # an invalid escape in a docstring ('\m' of a math formula) warned every user on import (an error in time)
    import warnings
    from pathlib import Path

    import landscape

    root = Path(landscape.__file__).parent.parent  # the package, and the scripts beside it
    paths = [path for folder in ("landscape", "benchmarks", "examples", "experiments", "tests")
             for path in sorted((root / folder).rglob("*.py"))]
    assert len(paths) > 50
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")

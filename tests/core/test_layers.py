"""The package layers: no module imports from a layer above its own, and no two modules import each other.

Layers, bottom to top (docs/design.md draws them): ``landscape.core``; ``landscape.data``; ``landscape.models``;
``landscape.training`` (the only user of ``optimizers``, besides the CLI); ``landscape.geometry``; ``analyses``;
``landscape.cli``, ``landscape.demo`` and ``landscape.__main__``. ``optimizers`` stands beside them and depends on
torch alone; ``figures`` reads result files and imports nothing of the project but ``landscape.core``, the
(torch-free) task registry and the (torch-free) variant registry ``optimizers.variants``. Imports inside functions
count as much as those at the top of a module: a lazy import is a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("landscape", "optimizers", "analyses", "figures")
LAYERS = (
    ("landscape.core", "landscape"),
    ("landscape.data",),
    ("landscape.models",),
    ("landscape.training",),
    ("landscape.geometry",),
    ("analyses",),
    ("landscape.cli", "landscape.demo", "landscape.__main__"),
)
# Who may import what besides the layer order: optimizers only itself; figures only itself and the core.
ALLOWED_ONLY = {
    "optimizers": ("optimizers",),
    "figures": ("figures", "landscape.core", "landscape.data.tasks", "landscape", "optimizers.variants"),
}
# figures may read the (torch-free) variant registry, and nothing else of optimizers (ALLOWED_ONLY above).
OPTIMIZER_USERS = ("optimizers", "landscape.training", "landscape.cli", "landscape.demo", "analyses", "figures")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (``from a.b import c`` counts a.b.c if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """``name`` is one of ``prefixes`` or inside one; the bare ``landscape`` (its ``__init__``) matches only itself."""
    return any(name == p or (p != "landscape" and name.startswith(p + ".")) for p in prefixes)


def layer_of(name: str) -> int | None:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # the most specific prefix wins: "landscape" (the package's __init__) only matches itself
            if (name == prefix or (name.startswith(prefix + ".") and prefix != "landscape")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (index, len(prefix))
    return None if best is None else best[0]


GRAPH = {name: imports_of(path, project_modules()) for name, path in project_modules().items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in graph.items():
        for target in targets:
            top = name.split(".")[0]
            low, high = layer_of(name), layer_of(target)
            outside = top in ALLOWED_ONLY and not within(target, ALLOWED_ONLY[top])
            optimizer_user = within(target, ("optimizers",)) and not within(name, OPTIMIZER_USERS)
            upward = low is not None and high is not None and high > low
            if outside or optimizer_user or upward:
                bad.append(f"{name} -> {target}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between packages (a module's package; a package's __init__ is the package itself)."""
    modules = project_modules()

    def package(name: str) -> str:
        return name if modules[name].name == "__init__.py" else name.rpartition(".")[0]

    collapsed: dict[str, set[str]] = {}
    for name, targets in graph.items():
        source = package(name)
        collapsed.setdefault(source, set()).update(
            package(t) for t in targets if package(t) != source and not source.startswith(package(t) + ".")
        )
    return collapsed


def test_every_module_has_a_layer():
    unplaced = [name for name in GRAPH if layer_of(name) is None and name.split(".")[0] not in ALLOWED_ONLY]
    assert unplaced == []


def test_no_module_imports_from_a_layer_above():
    assert upward_imports(GRAPH) == []


def test_no_module_cycle():
    assert cycles(GRAPH) == []


def test_no_package_cycle():
    assert cycles(package_graph(GRAPH)) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        (
            {"landscape.core.results": {"landscape.training.loop"}},
            ["landscape.core.results -> landscape.training.loop"],
        ),
        ({"optimizers.sam": {"landscape.core.errors"}}, ["optimizers.sam -> landscape.core.errors"]),
        ({"figures.report": {"landscape.models.runs"}}, ["figures.report -> landscape.models.runs"]),
        ({"landscape.geometry.grids": {"optimizers.sam"}}, ["landscape.geometry.grids -> optimizers.sam"]),
        ({"analyses.sharpness": {"landscape.models.runs", "optimizers.sam"}}, []),
    ],
)
def test_the_checks_catch_what_they_should(graph, expected):
    assert upward_imports(graph) == expected


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

"""The package's imports follow the layers of docs/architecture.md: no cycle, no upward edge.

Every import counts, at module level or inside a function (a deferred import is still a
dependency, and it is how cycles hide).  ``from x import y`` where ``y`` is a submodule counts
as importing ``x.y``; relative imports are resolved.  A bare ``import blip2_internlm`` inside the
package is not an edge: Python imports the package before any of its modules, so that line only
states that the registrations it performs are needed.  The layer table is read from the
"Layers" block of docs/architecture.md, so the document and this spec cannot disagree.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from spec_helpers import REPO

ROOT = "blip2_internlm"
ARCHITECTURE = REPO / "docs" / "architecture.md"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module of the package
    where: str  # file:line of the import


def module_of(path: str) -> tuple[str, bool]:
    """(dotted module name, is a package) of a file path relative to the repository."""
    parts = list(Path(path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def import_edges(files: dict[str, str], root: str = ROOT) -> tuple[list[Edge], list[str]]:
    """The imports between modules of ``root`` in ``files`` ({path: source}), and those that name
    no module of ``root`` (as "file:line: text")."""
    modules = {module_of(path)[0] for path in files}
    edges, unresolved = [], []
    for path, source in sorted(files.items()):
        name, is_package = module_of(path)
        package = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(source, filename=path)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name != root]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).rstrip(".")
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if not (target == root or target.startswith(root + ".")):
                    continue
                where = f"{path}:{node.lineno}"
                if target in modules:
                    edges.append(Edge(name, target, where))
                else:
                    unresolved.append(f"{where}: {name} imports {target}, which is no module of {root}")
    return edges, unresolved


def parse_layers(markdown: str) -> list[tuple[str, list[str]]]:
    """The layer table of docs/architecture.md, bottom layer first: [(layer, [module prefix])].

    The first fenced block after the "## Layers" heading lists the layers top first, one a line:
    the layer's name, then module names relative to the package (``__init__`` is the package itself).
    """
    section = markdown.split("\n## Layers", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    layers = []
    for line in block.splitlines():
        if line.strip():
            layer, *names = line.split()
            layers.append((layer, [ROOT if n == "__init__" else f"{ROOT}.{n}" for n in names]))
    return layers[::-1]


def layer_index(module: str, layers) -> int | None:
    """The layer of the longest name in the table that is ``module`` or a package containing it
    (the root package stands for its ``__init__`` only)."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            inside = prefix != ROOT and module.startswith(prefix + ".")
            if (module == prefix or inside) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def upward_edges(edges: list[Edge], layers) -> list[str]:
    found = []
    for e in edges:
        low, high = layer_index(e.source, layers), layer_index(e.target, layers)
        if low is not None and high is not None and high > low:
            found.append(f"{e.where}: {e.source} ({layers[low][0]}) imports {e.target} ({layers[high][0]})")
    return found


def import_cycles(edges: list[Edge]) -> list[str]:
    """One cycle per strongly connected set of modules, each step with its file:line."""
    graph: dict[str, dict[str, str]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, {}).setdefault(e.target, e.where)
    # Tarjan's strongly connected components, iteratively (the graph can be deep).
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    found = []
    for component in components:
        members = set(component)
        # the shortest cycle through the component's first module (breadth-first)
        first, parents, frontier = component[0], {}, [component[0]]
        while first not in parents:
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, {})):
                    if child in members and child not in parents:
                        parents[child] = node
                        nxt.append(child)
            frontier = nxt
        path, node = [first], parents[first]
        while node != first:
            path.append(node)
            node = parents[node]
        path.append(first)
        path.reverse()
        steps = "; ".join(f"{a} -> {b} ({graph[a][b]})" for a, b in zip(path, path[1:], strict=False))
        inside = [f"    {graph[a][b]}: {a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
        found.append(f"cycle among {len(component)} modules, e.g. {steps}; all their imports of each other:")
        found += inside
    return found


def package_files() -> dict[str, str]:
    return {
        str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in sorted((REPO / ROOT).rglob("*.py"))
    }


@pytest.fixture(scope="module")
def package():
    files = package_files()
    edges, unresolved = import_edges(files)
    return files, edges, unresolved, parse_layers(ARCHITECTURE.read_text(encoding="utf-8"))


# --- the package --------------------------------------------------------------------------------


def test_every_module_of_the_package_has_a_layer(package):
    files, _, _, layers = package
    missing = [path for path in files if layer_index(module_of(path)[0], layers) is None]
    assert not missing, f"modules in no layer of {ARCHITECTURE.name}'s table: {missing}"


def test_every_import_of_the_package_names_one_of_its_modules(package):
    _, _, unresolved, _ = package
    assert not unresolved, "\n".join(unresolved)


def test_no_module_imports_a_higher_layer(package):
    _, edges, _, layers = package
    found = upward_edges(edges, layers)
    assert not found, f"{len(found)} upward imports:\n" + "\n".join(found)


def test_the_package_has_no_import_cycle(package):
    _, edges, _, _ = package
    found = import_cycles(edges)
    assert not found, "\n".join(found)


# --- the checker itself, on planted source ------------------------------------------------------

PLANTED_LAYERS = [("low", ["pkg.low", "pkg.util"]), ("high", ["pkg.high"]), ("package", ["pkg"])]


def planted(**modules: str) -> dict[str, str]:
    files = {"pkg/__init__.py": ""}
    files.update({f"pkg/{name.replace('__', '/')}.py": source for name, source in modules.items()})
    return files


def test_an_upward_import_inside_a_function_is_reported_with_its_line():
    files = planted(low="import os\n\n\ndef f():\n    from pkg import high\n", high="from pkg.low import f\n")
    edges, unresolved = import_edges(files, root="pkg")
    assert not unresolved
    assert upward_edges(edges, PLANTED_LAYERS) == ["pkg/low.py:5: pkg.low (low) imports pkg.high (high)"]


def test_a_relative_import_resolves_to_the_module_it_names():
    files = planted(high="from . import low\nfrom .low import f\n", low="")
    edges, _ = import_edges(files, root="pkg")
    assert {(e.target, e.where) for e in edges} == {("pkg.low", "pkg/high.py:1"), ("pkg.low", "pkg/high.py:2")}
    assert upward_edges(edges, PLANTED_LAYERS) == []


def test_a_downward_import_and_the_bare_package_import_are_allowed():
    files = planted(high="import pkg\nimport pkg.low\n", low="from pkg.util import g\n", util="def g(): ...\n")
    edges, _ = import_edges(files, root="pkg")
    assert upward_edges(edges, PLANTED_LAYERS) == [] and import_cycles(edges) == []


def test_a_cycle_within_one_layer_is_reported_with_each_step():
    files = planted(low="from pkg.util import g\n", util="def g():\n    from pkg.low import f\n")
    edges, _ = import_edges(files, root="pkg")
    assert upward_edges(edges, PLANTED_LAYERS) == []
    cycle, *steps = import_cycles(edges)
    assert "pkg.low -> pkg.util (pkg/low.py:1)" in cycle and "pkg.util -> pkg.low (pkg/util.py:2)" in cycle
    assert steps == ["    pkg/low.py:1: pkg.low -> pkg.util", "    pkg/util.py:2: pkg.util -> pkg.low"]


def test_an_import_of_a_module_that_does_not_exist_is_reported():
    files = planted(high="from pkg.gone import thing\n")
    _, unresolved = import_edges(files, root="pkg")
    assert unresolved == ["pkg/high.py:1: pkg.high imports pkg.gone, which is no module of pkg"]


def test_the_layer_table_is_read_top_first_from_the_architecture_document():
    text = "# A\n\n## Layers\n\n```text\npackage  __init__\ntools    plan bench\nbase     assets\n```\n"
    assert parse_layers(text) == [
        ("base", ["blip2_internlm.assets"]),
        ("tools", ["blip2_internlm.plan", "blip2_internlm.bench"]),
        ("package", ["blip2_internlm"]),
    ]
    layers = parse_layers(text)
    assert layer_index("blip2_internlm.assets", layers) == 0 and layer_index("blip2_internlm.bench.x", layers) == 1
    assert layer_index("blip2_internlm.other", layers) is None

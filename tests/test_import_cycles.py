"""No module of the product imports a module that imports it back.

The graph is read from the source with :mod:`ast`, not by importing anything. An edge
``a -> b`` is any ``import`` or ``from ... import`` in ``a`` that names module ``b`` of
one of the packages below, wherever it stands: at module level, or inside a function
or class (a function-level import is still a dependency; it only runs later, and it is
the usual way to hide a cycle). Imports under ``if TYPE_CHECKING:`` do not count: they
never run, and they are how type hints name a module that would otherwise close a
cycle. ``from a import b`` is an edge to module ``a.b`` when there is one, else to
``a`` (the package's ``__init__``). Parent packages that ``import a.b`` also runs are
not edges: no ``__init__`` here imports its submodules. ``importlib`` calls are not
seen.

A cycle is a strongly connected component of that graph with more than one module.
``KNOWN_CYCLES`` lists the ones still being broken, each with the reason and who is
breaking it; any other cycle fails the test, and so does an entry that no longer
matches a cycle (its owner removes it when the cycle is gone).

``LAYERS`` names the direction the layers promise (a store does not reach the actions
and routes above it; the frame writer does not reach the hub or the gateway), checked
on the same graph, through any chain of imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dropserver", "realtime", "drops", "checkout", "streaming", "loadtest",
            "benchmarks")

# frozenset of the cycle's modules -> why it is still there, and who is breaking it.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Every dotted name an import statement in ``tree`` may load, as candidates:
    ``from a import b`` yields ``a.b`` then ``a``; ``import a.b`` yields ``a.b``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # only the ``else`` part ever runs
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}|{source}"
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (see the module docstring)."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in known}

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            candidates = imported.split("|")
            target = next((c for c in candidates if c in known), None) or resolve(
                candidates[-1])
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[frozenset[str]]:
    """Each strongly connected component of more than one module: modules that all
    reach each other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):  # Tarjan's algorithm, without recursion
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(frozenset(component))
    return components


def shortest_cycle(component: frozenset[str], graph: Mapping[str, set[str]]) -> list[str]:
    """The shortest cycle from the component's first module back to itself, to name
    it (``a -> b -> a``)."""
    first = min(component)
    paths = {first: [first]}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == first:
                    return [*paths[node], first]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    return sorted(component)  # unreachable for a strongly connected component


def _describe(found: list[frozenset[str]], graph: Mapping[str, set[str]]) -> str:
    lines = []
    for component in found:
        cycle = shortest_cycle(component, graph)
        rest = sorted(component - set(cycle))
        lines.append(" -> ".join(cycle) + (f"   (and through it: {', '.join(rest)})"
                                           if rest else ""))
    return "\n".join(lines)


def test_no_import_cycles_but_the_known_ones():
    graph = import_graph(ROOT, PACKAGES)
    found = cycles(graph)
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, (
        "modules that import each other (break the cycle: move the shared part down, "
        "or pass a callable in; do not hide it in a function-level import):\n"
        + _describe(new, graph))
    gone = set(KNOWN_CYCLES) - set(found)
    assert not gone, ("KNOWN_CYCLES lists cycles that are no longer there; remove them: "
                      + "; ".join(", ".join(sorted(c)) for c in gone))


# Module -> modules it must never reach, directly or through others: the direction the
# layers promise. A store is called by the actions and routes above it, never the other
# way; the frame writer and the protocol sit below the hub, the gateway and the ASGI
# entry that use them.
LAYERS: dict[str, tuple[str, ...]] = {
    "drops.store": ("drops.actions", "drops.api", "drops.settlement_api"),
    "drops.settlement_store": ("drops.actions", "drops.api", "drops.settlement_api"),
    "realtime.protocol": ("realtime.connection", "realtime.hub", "realtime.gateway",
                          "realtime.asgi"),
    "realtime.wire": ("realtime.connection", "realtime.hub", "realtime.gateway",
                      "realtime.asgi"),
    "realtime.connection": ("realtime.hub", "realtime.gateway", "realtime.asgi"),
    "realtime.heartbeat": ("realtime.hub", "realtime.gateway", "realtime.asgi"),
    "realtime.hub": ("realtime.gateway", "realtime.asgi"),
}


def reaches(graph: Mapping[str, set[str]], module: str) -> set[str]:
    """Every module ``module`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for child in graph[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_dependencies_point_down():
    graph = import_graph(ROOT, PACKAGES)
    wrong = {module: sorted(reaches(graph, module) & set(above))
             for module, above in LAYERS.items()}
    wrong = {module: above for module, above in wrong.items() if above}
    assert not wrong, f"modules that reach a layer above them: {wrong}"


def test_a_call_up_is_seen(tmp_path):
    root = _tree(tmp_path, {"d/__init__.py": "", "d/actions.py": "from d import store\n",
                            "d/store.py": "def f():\n    from d.helper import g\n",
                            "d/helper.py": "import d.actions\n"})
    graph = import_graph(root, ["d"])
    assert "d.actions" in reaches(graph, "d.store")  # through a function-level import
    assert reaches(graph, "d.actions") >= {"d.store", "d.helper"}


def test_every_product_package_is_read():
    graph = import_graph(ROOT, PACKAGES)
    for package in PACKAGES:
        assert package in graph  # its __init__
    assert {"drops.actions", "drops.store", "realtime.hub",
            "benchmarks.reserve"} <= set(graph)
    assert "drops.store" in graph["drops.actions"]  # a module-level import
    assert "drops.actions" in graph["checkout.reservations_api"]  # a function-level one


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("b_imports_a", "cycle"), [
    ("from pkg import a\n", True),                              # module level
    ("def f():\n    from pkg.a import thing\n", True),          # function level
    ("import pkg.a as a\n", True),
    ("from . import a\n", True),                                # relative
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n", False),
    ("import typing\nif typing.TYPE_CHECKING:\n    from pkg.a import x\n"
     "else:\n    x = None\n", False),
    ("if TYPE_CHECKING:\n    pass\nelse:\n    from pkg import a\n", True),
    ("from pkg import thing_in_init\n", False),                 # pkg/__init__, not a
    ("import os\nfrom redis import asyncio\n", False),          # outside the packages
])
def test_the_graph_sees_what_runs(tmp_path, b_imports_a, cycle):
    root = _tree(tmp_path, {"pkg/__init__.py": "thing_in_init = 1\n",
                            "pkg/a.py": "from pkg import b\n",
                            "pkg/b.py": b_imports_a})
    graph = import_graph(root, ["pkg"])
    assert cycles(graph) == ([frozenset({"pkg.a", "pkg.b"})] if cycle else [])
    if cycle:
        assert shortest_cycle(frozenset({"pkg.a", "pkg.b"}), graph) == [
            "pkg.a", "pkg.b", "pkg.a"]


def test_a_longer_cycle_is_named_in_order(tmp_path):
    root = _tree(tmp_path, {"p/__init__.py": "", "p/x.py": "import p.y\n",
                            "p/y.py": "def f():\n    import p.z\n", "p/z.py": "import p.x\n",
                            "p/w.py": "import p.x\n"})
    graph = import_graph(root, ["p"])
    [found] = cycles(graph)
    assert found == {"p.x", "p.y", "p.z"}  # p.w imports into it but is not part of it
    assert shortest_cycle(found, graph) == ["p.x", "p.y", "p.z", "p.x"]
    assert _describe([found], graph) == "p.x -> p.y -> p.z -> p.x"


def test_a_cycle_is_named_with_every_module_in_it(tmp_path):
    root = _tree(tmp_path, {"q/__init__.py": "", "q/a.py": "import q.b\nimport q.c\n",
                            "q/b.py": "import q.a\n", "q/c.py": "import q.a\n"})
    graph = import_graph(root, ["q"])
    assert _describe(cycles(graph), graph) == "q.a -> q.b -> q.a   (and through it: q.c)"

"""The design, checked: packages import one another without cycles, and models know nothing of Beam."""
from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("models", "transforms", "pipelines", "runners")


def _imports() -> dict[str, set[str]]:
    """Each module of the packages -> the modules of the packages it imports (anywhere in its body)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name} | {
            m for m in found if m.split(".")[0] in ("apache_beam",)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node], path[len(path):] = "open", [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt in graph and nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_circular_imports():
    assert _cycle(_imports()) is None, " -> ".join(_cycle(_imports()))


def test_models_know_nothing_of_beam():
    beam_users = sorted(m for m, deps in _imports().items() if m.startswith("models")
                        and any(d.startswith("apache_beam") for d in deps))
    assert not beam_users

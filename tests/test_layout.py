"""The design, checked: one import namespace, packages that import one another without cycles, and models that
know nothing of Beam."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

PACKAGES = ("models", "transforms", "pipelines", "runners")


def _imports() -> dict[str, set[str]]:
    """Each module of the packages -> the modules of the packages it imports (anywhere in its body)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = "mmfuse." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
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


def test_code_imports_the_packages_under_mmfuse_only():
    """A bare ``models`` or ``transforms`` would collide with any other project's; and one module imported
    under two names is two modules."""
    bare = {}
    for path in [*ROOT.glob("*/**/*.py")]:
        if path.parts[len(ROOT.parts)] in (".venv", ".venv-bench", "demo", "build"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.split(".")[0] in PACKAGES for n in names):
                bare.setdefault(str(path.relative_to(ROOT)), []).extend(names)
    assert not bare


def test_mmfuse_is_the_only_name_installed():
    """Outside the checkout (tests put its root on sys.path), the venv offers mmfuse and nothing else of ours."""
    code = ("import importlib.util as u; print([n for n in ('mmfuse', 'mmfuse.pipelines.nightly', *%r) "
            "if u.find_spec(n)])" % (PACKAGES,))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "['mmfuse', 'mmfuse.pipelines.nightly']"


def test_no_circular_imports():
    assert _cycle(_imports()) is None, " -> ".join(_cycle(_imports()))


def test_models_know_nothing_of_beam():
    beam_users = sorted(m for m, deps in _imports().items() if m.startswith("models")
                        and any(d.startswith("apache_beam") for d in deps))
    assert not beam_users

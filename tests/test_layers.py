"""The package's import graph: no import cycles, and no layer importing a higher one.

Every `import` of a plad_jax module counts, including those inside functions (a deferred import
hides a cycle from Python, not from a reader). Each module belongs to one layer below; a new module
must be placed in one (the test names it), which is the moment to decide what it may depend on.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS = (
    ("core", ("errors", "backend", "sharding", "losses")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("config", ("config", "fetch")),
    ("training", ("training", "generation")),
    ("scoring", ("scoring",)),
    ("methods", ("methods",)),
    ("pipeline", ("pipeline", "launch", "")),
)


def _modules() -> dict[str, str]:
    """'plad_jax.x.y' -> file path, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "plad_jax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules) -> set[str]:
    """The plad_jax modules `module` imports anywhere in its file (`from a import b` counts as
    a.b when b is a module, else as a)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("plad_jax")
        ):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("plad_jax"))
    return {m for m in out if m in modules and m != module}


def _layer(module: str) -> int | None:
    """Index in LAYERS of the longest prefix that names `module` (the package itself is the
    "" entry: its __init__ exports the public API, so it sits on top)."""
    rel = module.removeprefix("plad_jax").removeprefix(".")
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (rel == prefix or (prefix and rel.startswith(prefix + "."))) and len(
                prefix
            ) > best_len:
                best, best_len = index, len(prefix)
    return best


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_every_module_has_a_layer(graph):
    assert [m for m in sorted(graph) if _layer(m) is None] == []


def test_no_layer_imports_a_higher_one(graph):
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
        for m in sorted(graph)
        for d in sorted(graph[m])
        if _layer(d) > _layer(m)
    ]
    assert upward == []


def test_the_checks_catch_what_they_look_for():
    """The cycle finder finds a planted cycle; the layer map puts a lower module under a higher
    one."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert (
        _layer("plad_jax.models.llama")
        < _layer("plad_jax.methods.pairs")
        < _layer("plad_jax.pipeline.runner")
    )
    assert _layer("plad_jax.errors") < _layer("plad_jax.data.tasks")


def test_public_api_resolves_and_import_stays_light():
    """Every name in plad_jax.__all__ resolves; `import plad_jax` alone imports no JAX (the CLI
    initialises JAX's distributed runtime before anything heavy is imported)."""
    code = (
        "import sys, plad_jax; light = 'jax' not in sys.modules; "
        "[getattr(plad_jax, n) for n in plad_jax.__all__]; "
        "print(light, plad_jax.get_method is plad_jax.methods.get, plad_jax.Method.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "plad_jax.methods.base"], out.stderr[-2000:]

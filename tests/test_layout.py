"""The folders show the architecture (README, "Code"): each layer imports only the layers below it
and no module imports itself back through another.

Layers, top to bottom: ``service.cli`` > ``service.api`` > ``service.jobs`` > ``service.store`` >
the shared ``service`` modules (settings, states, logs) > ``dare_client`` (the wire schemas). The
engine (``worker.engine``) imports nothing of the service, and the client distribution imports
nothing of the server. Read statically (every ``import`` statement, also those inside functions),
so a lazy import cannot hide a cycle.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENT_SRC = REPO / "clients" / "python"
ROOTS = {"service": REPO, "worker": REPO, "dare_client": CLIENT_SRC}

# What each service layer may import from the service (besides itself and the shared modules).
LAYERS = {"service.store": set(), "service.jobs": {"service.store"},
          "service.api": {"service.jobs", "service.store"},
          "service.cli": {"service.api", "service.jobs", "service.store"}}
SHARED = {"service", "service.settings", "service.states", "service.logs", "service.schemas"}


def _modules() -> dict[str, Path]:
    out = {}
    for top, root in ROOTS.items():
        for p in sorted((root / top).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of this repository that ``name`` imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # ``from a import b`` is module a.b when that is a module, else a name in a.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # import a.b.c of a package a.b: count a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_layout_is_the_one_the_readme_describes():
    for pkg in ("service.api", "service.jobs", "service.store", "service.cli", "dare_client"):
        assert pkg in MODULES, f"{pkg} is missing"
    flat = [p.name for p in (REPO / "service").glob("*.py")]
    assert sorted(flat) == ["__init__.py", "logs.py", "settings.py", "states.py"], flat


def test_no_service_or_client_module_imports_itself_back():
    # (worker.celery_app <-> worker.tasks is Celery's own pattern, and the engine's lazy report
    # imports are the engine's business; this is about the service's folders.)
    ours = {m: {d for d in deps if d.startswith(("service", "dare_client"))}
            for m, deps in GRAPH.items() if m.startswith(("service", "dare_client"))}
    assert _cycles(ours) == []


def test_the_cycle_check_finds_a_cycle():
    # The checker itself: a two-module loop and a three-module loop are both reported.
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(g)) == [["a", "b"], ["c", "d", "e"]]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = defaultdict(set)
    for mod, deps in GRAPH.items():
        if _layer(mod) != layer:
            continue
        for d in deps:
            if not d.startswith("service"):
                continue
            target = _layer(d)
            if target is None and d not in SHARED or target not in {None, layer} | LAYERS[layer]:
                wrong[mod].add(d)
    assert not wrong, dict(wrong)


def test_the_engine_imports_nothing_of_the_service():
    offenders = {m: sorted(d for d in deps if d.startswith(("service", "dare_client")))
                 for m, deps in GRAPH.items() if m.startswith("worker.engine")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_client_imports_nothing_of_the_server():
    offenders = {m: sorted(d for d in deps if d.startswith(("service", "worker")))
                 for m, deps in GRAPH.items() if m.startswith("dare_client")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_shared_modules_import_no_layer():
    for mod in SHARED - {"service.schemas"}:
        assert not {d for d in GRAPH.get(mod, ()) if _layer(d)}, mod


def test_every_package_folder_is_in_the_distribution():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("service", "worker") for p in (REPO / top).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert "bench" not in {name.split(".")[0] for name in listed}

"""The package's shape (DESIGN.md's architecture): no import cycles, layers that point one way, small functions.

These read the source with ``ast``; nothing is imported, so they run in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "loratune"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """loratune modules that ``name`` imports anywhere (top level or inside a function)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    from .n import g\n    from p import o\n")
    known = {"p", "p.m", "p.n", "p.o"}
    assert imports_of("p.m", pkg / "m.py", known) == {"p.n", "p.o"}


def test_nothing_imports_in_a_cycle() -> None:
    g = graph()
    assert len(g) > 30 and g["loratune.cli.main"], "the walk found the package"
    assert cycles(g) == []


LAYERS = {  # a folder may import only from these (and itself); errors/runtime are shared by all
    "loratune.core": {"loratune.errors"},
    "loratune.tasks": {"loratune.errors", "loratune.runtime", "loratune.core"},
    "loratune.training": {"loratune.errors", "loratune.runtime", "loratune.core", "loratune.tasks"},
    "loratune.infer": {"loratune.errors", "loratune.runtime", "loratune.core", "loratune.tasks", "loratune.training"},
    "loratune.serve": {"loratune.errors", "loratune.runtime", "loratune.core", "loratune.tasks", "loratune.training",
                       "loratune.infer"},
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_point_one_way(layer: str) -> None:
    allowed = LAYERS[layer] | {layer, "loratune"}
    bad = {(m, t) for m, targets in graph().items() if m.startswith(layer + ".") or m == layer
           for t in targets if not any(t == a or t.startswith(a + ".") for a in allowed)}
    assert not bad, f"{layer} imports outside its layer: {sorted(bad)}"


def test_ray_only_in_the_search_driver_and_ray_serve() -> None:
    """Ray (an optional extra) is imported by the search driver and ``loratune serve --ray``'s module alone."""
    users = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                users.add(name)
    assert users == {"loratune.search.driver", "loratune.serve.ray_serve"}


def test_the_web_stack_only_in_serve() -> None:
    """starlette and uvicorn (the optional ``serve`` extra) are imported by ``loratune.serve`` alone, so every
    other command works without them."""
    users = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("starlette", "uvicorn") for n in names):
                users.add(name)
    assert users and all(u.startswith("loratune.serve.") for u in users), users


def test_library_code_never_prints() -> None:
    printing = [f"{name}:{node.lineno}" for name, path in modules().items() if not name.startswith("loratune.cli")
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert printing == []


def test_no_function_over_80_lines() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {node.end_lineno - first + 1} lines")
    assert long == []

"""The package's shape, read from its source (issue 26): no import circle, a small package root,
short functions, branch-kind knowledge kept in ``branches/``, and bottom layers that never import
upwards. Every import counts, lazy ones inside functions too. Reads files only; imports no piip."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "piip"
MAX_ROOT_MODULES = 8
MAX_FUNCTION_LINES = 80
MAX_KIND_CHECKS = 3          # config validation / registration may name kinds; nothing else
# folders (and root modules) from the bottom up: a module may import only its own layer or lower ones
LOWER = {
    "errors": set(), "runtime": set(), "config": {"errors"},
    "ops": {"errors", "runtime"}, "data": {"config", "errors", "runtime"},
    "layers": {"ops", "errors", "runtime"},
    "branches": {"layers", "ops", "config", "errors", "runtime"},
}
_KINDS = r"(vit|convnext|clip|internvit)"
KIND_CHECK = re.compile(rf'kind\s*(?:[!=]=|(?:not\s+)?in)\s*[(\[{{]?[^:]*["\']{_KINDS}["\']'
                        r"|isinstance\([^)]*(ViT|ConvNeXt|CLIP|InternViT)Branch\b")


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and not name.startswith(t + "."):   # a package's own __init__ is not an edge
                    graph[name].add(t)
    return graph


def _circles(graph: dict[str, set[str]], nodes) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


MODS = _modules()
GRAPH = _imports(MODS)


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_import_graph_has_no_circle():
    assert _circles(GRAPH, sorted(MODS)) == []


def test_circle_finder_sees_a_circle():
    """The checker itself: a lazy two-module circle is found."""
    assert _circles(defaultdict(set, {"a": {"b"}, "b": {"a"}, "c": {"a"}}), ["a", "b", "c"]) == [["a", "b"]]


def test_bottom_layers_import_nothing_above_them():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() if _layer(m) in LOWER
              for t in targets if _layer(t) != _layer(m) and _layer(t) not in LOWER[_layer(m)]]
    assert upward == []


def test_package_root_is_small():
    root = sorted(m for m, p in MODS.items() if m.count(".") == 1 and p.name != "__init__.py")
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_function_is_long():
    long = [f"{m}.{node.name} ({node.end_lineno - node.lineno + 1} lines)" for m, p in MODS.items()
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_branch_kinds_are_known_in_branches_only():
    checks = [f"{m}:{i}" for m, p in MODS.items() if _layer(m) != "branches"
              for i, line in enumerate(p.read_text().splitlines(), 1) if KIND_CHECK.search(line)]
    assert len(checks) <= MAX_KIND_CHECKS, checks

"""The import graph of the library and the flows (transferkit.orchestration.codegraph: read from the source with
`ast`, nothing is imported), checked against the layering of docs/architecture.md:

- a module imports only its own subpackage and the subpackages of lower layers (no upward or sideways import
  between subpackages), counting imports inside functions: a lazy import avoids the import-time failure but
  not the tangle;
- no import circle among the modules;
- no module uses another module's `_private` name (`from m import _x` or `m._x`);
- no module is over MAX_MODULE_LINES lines and no function over MAX_FUNCTION_LINES.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from transferkit.orchestration.codegraph import project_files, scan

ROOT = Path(__file__).resolve().parents[1]
MODULES = project_files()
SCANS = {m: scan(m, MODULES) for m in MODULES}
GRAPH: dict[str, set[str]] = {m: s.imported for m, s in SCANS.items()}
PRIVATE: list[str] = [p for s in SCANS.values() for p in s.private]

# docs/architecture.md's layers, lowest first: a subpackage may import its own modules and lower layers only.
# Subpackages on one layer are independent of each other.
LAYERS = [
    ("core",),
    ("data",),
    ("models",),
    ("modelrepo",),
    ("drift", "train", "serve"),
    ("select", "validate", "export", "tools"),
    ("orchestration",),
    ("flows",),
    ("cli",),
]
LAYER = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}


def _package(module: str) -> str:
    """The subpackage a module belongs to; transferkit/__init__.py (the version) sits with core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "core"


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            a, b = _package(m), _package(d)
            if a != b and LAYER[b] >= LAYER[a]:
                bad.append(f"{m} -> {d} ({a}, layer {LAYER[a]}, may not import {b}, layer {LAYER[b]})")
    return bad


def test_the_scan_sees_the_package():
    # a scan that found nothing would pass every check below
    assert {"transferkit.cli.main", "transferkit.data.folder", "transferkit.flows.pipeline"} <= set(MODULES)
    assert "transferkit.drift.detect" in GRAPH["transferkit.cli.stages"]  # a lazy import inside a command
    assert "transferkit.select.rank" in GRAPH["transferkit.flows.select"]
    assert MODULES["transferkit.flows.pipeline"] == ROOT / "flows" / "pipeline.py"


def test_every_subpackage_is_on_a_layer_and_installed():
    pkgs = {_package(m) for m in MODULES}
    assert pkgs == set(LAYER), (
        f"subpackages without a layer: {pkgs - set(LAYER)}; layers without code: {set(LAYER) - pkgs}"
    )
    listed = re.search(r"packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    listed = set(re.findall(r'"([\w.]+)"', listed))
    assert listed == {m for m, f in MODULES.items() if f.name == "__init__.py"}, "pyproject's packages list"


def test_the_layering_holds():
    bad = _violations(GRAPH)
    assert bad == [], "\n".join(bad)


def test_the_layering_check_finds_upward_and_sideways_imports():
    # the checker itself: data -> train is upward, train -> drift sideways, train -> data downward (fine)
    g = {"transferkit.data.folder": {"transferkit.train.fit"}, "transferkit.train.fit": {"transferkit.drift.detect"}}
    g["transferkit.train.search"] = {"transferkit.data.folder", "transferkit.train.fit"}
    assert [v.split(" (")[0] for v in _violations(g)] == [
        "transferkit.data.folder -> transferkit.train.fit",
        "transferkit.train.fit -> transferkit.drift.detect",
    ]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edges_within(comp: list[str]) -> list[str]:
    return [f"{a} -> {b}" for a in comp for b in sorted(GRAPH[a]) if b in comp]


def test_no_import_circles():
    circles = _circles(GRAPH)
    assert circles == [], "\n".join(" / ".join(c) + ": " + ", ".join(_edges_within(c)) for c in circles)


def test_no_module_uses_another_modules_private_names():
    assert PRIVATE == [], "\n".join(PRIVATE)


MAX_MODULE_LINES = 500


def test_no_module_is_longer_than_the_limit():
    long = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_the_circle_finder_finds_a_lazy_circle():
    # the checker itself: a -> b at top level, b -> a inside a function is still a circle
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


# Functions over this many lines are hard to hold in one's head: split them into named steps.
MAX_FUNCTION_LINES = 60


def _long_functions() -> dict[str, int]:
    found = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{module}.{node.name}"] = lines
    return found


def test_no_function_is_longer_than_the_limit():
    long = _long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"

"""The import graph of the library and the flows, read from the source with `ast` (nothing is imported).

Layering: `transferkit` is the library, `flows` composes it, so
- no module of `transferkit` imports `flows` (the two flow commands of the CLI reach their flows by name
  through `transferkit.orchestrate.load_flow`, checked here to name functions that exist),
- no flow imports `transferkit.cli` (the command line sits on top of both),
- there is no import circle among the modules, counting imports inside functions too: a lazy import
  avoids the import-time failure but not the tangle (neither side can be read or tested without the other),
- no module uses another module's `_private` name (`from m import _x` or `m._x`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"transferkit": ROOT / "src" / "transferkit", "flows": ROOT / "flows"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [pkg, *f.relative_to(folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODULES = _modules()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _scan(module: str, path: Path) -> tuple[set[str], list[str]]:
    """(the internal modules MODULE imports anywhere in its file, its uses of other modules' private names)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    imported: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> internal module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    imported.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # from transferkit import zoo
                    imported.add(sub)
                    aliases[a.asname or a.name] = sub
                elif base in MODULES:
                    imported.add(base)
                    if _private(a.name) and base != module:
                        private.append(f"{module} imports {base}.{a.name} (line {node.lineno})")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
            and aliases[node.value.id] != module
        ):
            private.append(f"{module} uses {aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    imported.discard(module)
    return imported, private


GRAPH: dict[str, set[str]] = {}
PRIVATE: list[str] = []
for _m, _p in MODULES.items():
    GRAPH[_m], _priv = _scan(_m, _p)
    PRIVATE += _priv


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
        for w in sorted(graph[v]):
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


def test_the_scan_sees_the_package():
    # a scan that found nothing would pass every check below
    assert {"transferkit.cli", "transferkit.data", "flows.pipeline", "flows.select"} <= set(MODULES)
    assert "transferkit.config" in GRAPH["transferkit.cli"]  # a lazy import inside a command
    assert "transferkit.select" in GRAPH["flows.select"]


def test_the_library_never_imports_flows():
    bad = [
        f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("transferkit") for d in deps if d.startswith("flows")
    ]
    assert bad == [], bad


def test_no_flow_imports_the_command_line():
    bad = [m for m, deps in GRAPH.items() if m.startswith("flows") and "transferkit.cli" in deps]
    assert bad == [], bad


def test_no_import_circles():
    circles = _circles(GRAPH)
    assert circles == [], "\n".join(" / ".join(c) + ": " + ", ".join(_edges_within(c)) for c in circles)


def test_no_module_uses_another_modules_private_names():
    assert PRIVATE == [], "\n".join(PRIVATE)


def test_the_flow_entrypoints_of_the_cli_exist():
    from transferkit.orchestrate import FLOW_ENTRYPOINTS

    for name, entry in FLOW_ENTRYPOINTS.items():
        module, attr = entry.split(":")
        tree = ast.parse(MODULES[module].read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert attr in defined, f"FLOW_ENTRYPOINTS[{name!r}] = {entry!r}: {module} defines no {attr}"


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

"""The project's import graph, read from the source with `ast` (nothing is imported).

One scanner for two readers: `workspace.stage_code` derives each DVC stage's code deps from it, and
tests/test_imports.py checks the layering of docs/architecture.md on it. Imports inside functions count: a
lazy import still runs, so it is both a dependency of the stage and a tie between the two modules.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def project_files() -> dict[str, Path]:
    """Every module of the installed project, dotted name -> source file: the library in src/transferkit and
    the Prefect entry points of flows/ (installed as transferkit.flows)."""
    roots = {"transferkit": Path(__file__).resolve().parents[1]}
    spec = importlib.util.find_spec("transferkit.flows")
    if spec is not None and spec.submodule_search_locations:
        roots["transferkit.flows"] = Path(next(iter(spec.submodule_search_locations))).resolve()
    files: dict[str, Path] = {}
    for pkg, folder in roots.items():
        for f in sorted(folder.rglob("*.py")):
            if pkg == "transferkit" and f.is_relative_to(roots.get("transferkit.flows", folder / "\0")):
                continue
            parts = [*pkg.split("."), *f.relative_to(folder).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def repo_path(path: Path) -> str:
    """A project file as a repository path (src/transferkit/..., flows/...)."""
    parts = path.resolve().parts
    i = len(parts) - 1 - parts[::-1].index("src") if "src" in parts else None
    if i is not None and parts[i + 1 : i + 2] == ("transferkit",):
        return "/".join(parts[i:])
    return "/".join(parts[parts.index("flows") :])


@dataclass
class Scan:
    imported: set[str] = field(default_factory=set)  # project modules the file imports anywhere
    private: list[str] = field(default_factory=list)  # its uses of other modules' _private names


def scan(module: str, files: dict[str, Path]) -> Scan:
    """The project modules MODULE imports (a package's __init__ counts as the package) and its uses of other
    modules' private names (`from m import _x`, `m._x`)."""
    path = files[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    out = Scan()
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in files:
                    out.imported.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .serve import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in files:  # from transferkit.models import zoo
                    out.imported.add(sub)
                    aliases[a.asname or a.name] = sub
                elif base in files:
                    out.imported.add(base)
                    if _private(a.name) and base != module:
                        out.private.append(f"{module} imports {base}.{a.name} (line {node.lineno})")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
            and aliases[node.value.id] != module
        ):
            out.private.append(f"{module} uses {aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    out.imported.discard(module)
    return out


def closure(seeds: list[str], files: dict[str, Path], skip: tuple[str, ...] = ()) -> set[str]:
    """SEEDS and every project module they import, directly or through others; importing a.b.c also runs
    a/__init__ and a/b/__init__. Modules under a SKIP prefix are not followed."""
    seen: set[str] = set()
    todo = list(seeds)
    while todo:
        m = todo.pop()
        if m in seen or any(m == s or m.startswith(s + ".") for s in skip):
            continue
        seen.add(m)
        parents = {m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)}
        todo += sorted((scan(m, files).imported | (parents & files.keys())) - seen)
    return seen

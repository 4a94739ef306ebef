"""One table maps expected errors to exit codes (`transferkit.core.errors.EXIT_CODES`); a bug has none."""

from __future__ import annotations

import ast
from pathlib import Path

from transferkit.core.errors import EXIT_BUSY, EXIT_ERROR, TransferkitError, exit_code

ROOT = Path(__file__).resolve().parents[2]


def test_each_expected_error_has_its_exit_code_and_a_bug_has_none():
    from transferkit.core.config import ConfigError
    from transferkit.orchestration.workspace import WorkspaceBusy, WorkspaceError

    assert exit_code(WorkspaceBusy("held")) == EXIT_BUSY == 75  # EX_TEMPFAIL: try again later
    assert exit_code(WorkspaceError("x")) == exit_code(ConfigError("x")) == EXIT_ERROR
    assert exit_code(FileNotFoundError("x")) == exit_code(TransferkitError("x")) == EXIT_ERROR
    assert exit_code(KeyError("x")) is None and exit_code(ValueError("x")) is None


def test_no_entry_point_chooses_an_exit_code_of_its_own():
    """The CLI and the flows' entry point exit only through the table's names (or 0): a literal code in
    `typer.Exit(...)`, `sys.exit(...)` or `fail(..., N)` is a second table."""
    offenders = []
    for f in [*sorted((ROOT / "src" / "transferkit" / "cli").glob("*.py")), *sorted((ROOT / "flows").glob("*.py"))]:
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            args = node.args[1:] if name == "fail" else node.args
            if name in ("Exit", "exit", "fail") and any(
                isinstance(a, ast.Constant) and isinstance(a.value, int) and a.value != 0 for a in args
            ):
                offenders.append(f"{f.name}:{node.lineno}")
    assert offenders == [], offenders

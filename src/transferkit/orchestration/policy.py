"""The pipeline's decisions, kept apart from Prefect: which errors are worth a retry (transient I/O only), which dvc.yaml stages a run may commit as its own, the table of DVC workspaces this process holds (their lock) keyed by root, how a retrain run resolves its params and run folder, and skip-if-unchanged (the live model was already built from this data, params and code). No prefect import: retry_on_io_error only duck-types Prefect's retry_condition_fn(task, task_run, state) and calls state.result()."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def retry_on_io_error(task, task_run, state) -> bool:
    """Retry condition: only transient I/O errors; a ValueError (bad input, parity, gate) fails at once."""
    import subprocess

    try:
        state.result()
    except (OSError, subprocess.SubprocessError):
        return True
    except BaseException:
        return False
    return False


# DVC workspaces this process holds (transferkit.workspace.Workspace, keyed by root): an open repository
# and its lock are not task parameters, the root is
HELD_WORKSPACES: dict[str, Any] = {}


def reproduced_stages(root: Path, target: str, out: str, repo: str, reference: str | None, p, exact: bool) -> list:
    """The dvc.yaml stages this run reproduces exactly: same command (paths) and the workspace's own
    params.yaml with nothing on top; those are committed, so dvc.lock says what the flow computed."""
    from transferkit.core.config import load_params
    from transferkit.orchestration.workspace import relative_commands

    f = root / "params.yaml"
    if not exact or not f.is_file() or load_params(f).model_dump(mode="json") != p.model_dump(mode="json"):
        return []
    return HELD_WORKSPACES[str(root)].matching_stages(relative_commands(root, target, out, repo, reference))


def resolve_params(params_file: str | None, overrides: dict | None):
    """params.yaml (if present) with dotted flow-parameter overrides on top: {"train.epochs": 3}."""
    from transferkit.core.config import load_params

    path = Path(params_file) if params_file else None
    return load_params(path if path and path.is_file() else None, dict(overrides or {}))


def live_if_unchanged(repo: Path, name: str, target: str, p) -> dict | None:
    """metadata.json of the live version if it was built from this target's content, these params, this code."""
    from transferkit.core.io import git_rev, read_json
    from transferkit.data.folder import DataError, load_with_params
    from transferkit.modelrepo.repository import latest_version

    live = latest_version(repo / name)
    if live is None:
        return None
    meta = read_json(repo / name / str(live) / "metadata.json")
    try:
        ds = load_with_params(target, p)
    except DataError:
        return None  # let the pipeline report it
    code = git_rev(Path(__file__).resolve().parent)
    same = (
        meta.get("data_md5") == ds.md5
        and meta.get("params") == p.model_dump(mode="json")
        and (code is None or meta.get("git_rev") == code)
    )
    return {**meta, "version": live} if same else None


def make_run_folder(out_root: str, md5: str | None, p) -> Path:
    """out_root/<UTC stamp>[-<md5[:8]>], holding the resolved config of this run (a record)."""
    from transferkit.core.config import dump_params

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run = Path(out_root) / (f"{stamp}-{md5[:8]}" if md5 else stamp)
    dump_params(p, run / "params.yaml")
    return run

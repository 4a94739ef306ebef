"""New data: version a dataset folder with DVC and tell the Prefect server, once or whenever it changes.

    transferkit data add data/target                 # dvc add + emit transferkit.dataset.updated (CI/cron)
    transferkit watch data/target --interval 60      # poll; on a content change do the same
    transferkit watch data/target --once             # one poll (exit 0 whether or not it changed)

Change detection hashes file *contents* (relative path + md5 of every non-hidden file), never mtimes:
touching or copying files unchanged raises nothing, editing one byte does. The last seen hash lives in
DVC's git-ignored temp folder (.dvc/tmp/transferkit-watch/<name>.json), so `--once` from cron compares
against the previous run. On first sight of a folder whose .dvc file is up to date, the hash is only
recorded: no event for data that is already versioned.

The event (prefect.events.emit_event) is what the `transferkit-retrain/on-new-data` deployment's trigger waits for:
    event    transferkit.dataset.updated
    resource {"prefect.resource.id": "transferkit.dataset.<name>", "transferkit.md5": <DVC md5>, ...}
    payload  {"md5": <DVC md5 of the folder, e.g. 6f4a...dir>, "content_md5", "path", "dvc_file", "nfiles"}
The md5 is DVC's, the one in <folder>.dvc: `git checkout <rev> <folder>.dvc && dvc checkout` gets exactly
that data back, and exported models record it.

Events need a running server (PREFECT_API_URL); without one, `data add` still versions the folder and says
that no event was sent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from transferkit.core.errors import TransferkitError
from transferkit.core.events import EVENT_DATASET_UPDATED, dataset_resource
from transferkit.core.io import files_md5


class WatchError(TransferkitError, ValueError):
    """A folder that cannot be versioned (missing, outside a DVC repo, dvc add failing); names the path."""


class StaleData(TransferkitError):
    """The dataset's DVC md5 is no longer the one a run was started for (a newer change starts its own run)."""


def content_md5(folder: str | Path) -> tuple[str, int]:
    """(io.files_md5 of every non-hidden file, number of files): the hash a dataset's md5 uses, over all files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WatchError(f"dataset folder does not exist: {folder}")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return files_md5(files, folder), len(files)


def dvc_root(path: Path) -> Path:
    for d in (path.resolve(), *path.resolve().parents):
        if (d / ".dvc").is_dir():
            return d
    raise WatchError(f"{path} is not inside a DVC repository (run `dvc init` in the project first)")


def dvc_executable() -> str:
    """The `dvc` of this interpreter's environment (the one the package depends on), else the one on PATH."""
    exe = Path(sys.executable).parent / "dvc"
    return str(exe) if exe.exists() else (shutil.which("dvc") or "dvc")


def dvc_md5(folder: Path) -> dict[str, Any]:
    """The `outs` entry of <folder>.dvc ({md5, nfiles, size, ...}); WatchError if absent."""
    dvc_file = folder.with_name(folder.name + ".dvc")
    if not dvc_file.is_file():
        raise WatchError(f"{dvc_file} not found: the folder is not tracked by DVC (`transferkit data add {folder}`)")
    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        return {**out, "dvc_file": str(dvc_file)}
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as e:
        raise WatchError(f"{dvc_file}: not a DVC file with an `outs` entry ({e})") from None


def dvc_add(folder: str | Path) -> dict[str, Any]:
    """`dvc add FOLDER` from its repository root; returns the .dvc file's outs entry."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise WatchError(f"dataset folder does not exist: {folder}")
    root = dvc_root(folder)
    p = subprocess.run(
        [dvc_executable(), "add", str(folder.relative_to(root))], cwd=root, capture_output=True, text=True, timeout=3600
    )
    if p.returncode != 0:
        msg = " ".join((p.stderr + p.stdout).split())  # dvc's ERROR line, on one line
        raise WatchError(f"dvc add {folder} failed: {msg[-1500:]}")
    return dvc_md5(folder)


def dvc_up_to_date(folder: Path) -> bool:
    """True if <folder>.dvc exists and `dvc status` finds the workspace matching it."""
    dvc_file = folder.with_name(folder.name + ".dvc")
    if not dvc_file.is_file():
        return False
    p = subprocess.run(
        [dvc_executable(), "status", "--json", str(dvc_file.relative_to(dvc_root(folder)))],
        cwd=dvc_root(folder),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return p.returncode == 0 and json.loads(p.stdout.strip() or "{}") == {}


def emit_dataset_updated(name: str, info: dict[str, Any]) -> str | None:
    """Emit transferkit.dataset.updated for dataset NAME; returns the event id, None if no server is set."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    payload = {k: info[k] for k in ("md5", "content_md5", "path", "dvc_file", "nfiles", "size") if k in info}
    ev = emit_event(
        EVENT_DATASET_UPDATED,
        resource={
            "prefect.resource.id": dataset_resource(name),
            "prefect.resource.name": name,
            "transferkit.md5": str(info["md5"]),
            "transferkit.path": str(info["path"]),
        },
        payload=payload,
    )
    EventsWorker.drain_all(timeout=60)  # a short-lived CLI must not exit before the websocket send
    return str(ev.id) if ev is not None else None


def _state_file(folder: Path, name: str) -> Path:
    return dvc_root(folder) / ".dvc" / "tmp" / "transferkit-watch" / f"{name}.json"


def data_add(
    folder: str | Path, name: str | None = None, emit: bool = True, content: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Version FOLDER with `dvc add`, record its content hash, emit the event. Returns what was done."""
    from transferkit.core.io import write_json

    folder = Path(folder).resolve()
    name = name or folder.name
    cmd5, n = content or content_md5(folder)
    out = dvc_add(folder)
    info = {
        "name": name,
        "path": str(folder),
        "md5": out["md5"],
        "content_md5": cmd5,
        "nfiles": out.get("nfiles", n),
        "size": out.get("size"),
        "dvc_file": out["dvc_file"],
        "resource_id": dataset_resource(name),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(_state_file(folder, name), info)
    info["event_id"] = emit_dataset_updated(name, info) if emit else None
    return info


def watch(
    folder: str | Path,
    name: str | None = None,
    interval: float = 60.0,
    once: bool = False,
    emit: bool = True,
    echo: Callable[[str], Any] = print,
    max_polls: int | None = None,
) -> list[dict]:
    """Poll FOLDER's content hash every INTERVAL seconds; on a change run `data_add`. Returns the changes."""
    from transferkit.core.io import read_json, write_json

    folder = Path(folder).resolve()
    name = name or folder.name
    state = _state_file(folder, name)
    last = None
    if state.is_file():
        try:
            last = read_json(state).get("content_md5")
        except ValueError:
            last = None
    changes: list[dict] = []
    polls = 0
    while True:
        md5, n = content_md5(folder)
        if last is None and dvc_up_to_date(folder):
            # first sight of data DVC already has: remember it, nothing new to announce
            write_json(
                state,
                {
                    "name": name,
                    "path": str(folder),
                    "content_md5": md5,
                    "nfiles": n,
                    **{k: v for k, v in dvc_md5(folder).items() if k in ("md5", "dvc_file")},
                },
            )
            echo(f"watch: {folder} is versioned and unchanged (content md5 {md5}); watching")
        elif md5 != last:
            info = data_add(folder, name, emit=emit, content=(md5, n))
            sent = f"event {info['event_id']}" if info["event_id"] else "no event (PREFECT_API_URL not set)"
            echo(f"watch: {folder} changed: dvc md5 {info['md5']} ({info['nfiles']} files); {sent}")
            changes.append(info)
        elif once:
            echo(f"watch: {folder} unchanged (content md5 {md5})")
        last = md5
        polls += 1
        if once or (max_polls is not None and polls >= max_polls):
            return changes
        time.sleep(interval)

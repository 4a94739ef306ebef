"""Promote and roll back: move REPO/<name>/latest, the pointer every server follows, with an audit trail.

    transferkit promote  --repo models --name digits [--version 3] [--reason "..."]
    transferkit rollback --repo models --name digits

`latest` holds the promoted version number (as text, also valid JSON). Servers watch it (`transferkit
serve` polls it and hot-swaps; Triton reads the `version_policy` in config.pbtxt, rewritten here too).
Rules:
  - only a complete version can be promoted: model.onnx, metadata.json with the contract keys and a
    `parity` record, and model.onnx's sha256 equal to the one in metadata.json. Anything else is refused
    with a message naming the file, and `latest` stays where it was. promote and rollback also run the
    servers' own load checks (warm-up, batch parity, export's reference images through the server's
    preprocessing): a version every server would refuse never becomes `latest`;
  - `--server URL`: wait for each server; one that refuses the version makes promote move `latest` back,
    unless someone moved it since (their move stands; promote says who);
  - every move appends one JSON line to REPO/<name>/promotions.jsonl {time, action, version, previous,
    reason, user}: the history that `rollback` replays;
  - `rollback` returns to the version that was live before the current one (a stack: promote pushes,
    rollback pops, so two rollbacks go back two promotions);
  - the pointer and config.pbtxt are written atomically, under the same lock that `export` holds while
    it numbers and publishes a version, so a promotion never races an export.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transferkit.modelrepo.repository import (
    HISTORY,
    RepositoryError,
    append_history,
    check_version,
    find_model,
    latest_version,
    list_versions,
    live_stack,
    read_history,
    repo_lock,
    write_latest,
    write_triton_config,
)

# A refused promotion is a refused repository operation (unknown model or version, incomplete version, no
# history, a server that refused it): one type, under the name promote's callers know.
PromoteError = RepositoryError


def _move(model_dir: Path, version: int, meta: dict, action: str, reason: str) -> dict[str, Any]:
    """Write latest + config.pbtxt + the history line; the caller holds the repository lock."""
    previous = latest_version(model_dir)
    rec = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "action": action,
        "name": model_dir.name,
        "version": int(version),
        "previous": previous,
        "reason": reason,
        "user": _user(),
        "sha256": meta.get("sha256"),
    }
    write_triton_config(model_dir, version, meta)
    write_latest(model_dir, version)
    append_history(model_dir, rec)
    return rec


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return None


def _server_status(url: str, name: str, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
    """GET <url>/v1/models/<name> of a live `transferkit serve` (stdlib only: promote runs anywhere)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{url.rstrip('/')}/v1/models/{name}", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read(1 << 20))
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read(4096)).get("detail")
        except ValueError:
            detail = e.reason
        raise PromoteError(f"server {url}: {e.code} for model {name} ({detail})") from None
    except (OSError, ValueError) as e:
        raise PromoteError(f"server {url}: cannot ask it about {name} ({type(e).__name__}: {e})") from None


def _last_swap_time(status: dict[str, Any]) -> float:
    return max((float(s.get("time") or 0) for s in status.get("swaps") or []), default=0.0)


def _wait_servers(
    servers: list[str], name: str, version: int, baseline: dict[str, float], timeout: float, token: str | None
) -> tuple[list[dict], list[dict]]:
    """Poll each server until it serves `version` or records a new refusal of it (a swap entry newer than
    `baseline`, its own clock); returns (answers, problems), one dict per server."""
    import time

    deadline = time.monotonic() + timeout
    pending, done, problems = list(servers), [], []
    while pending:
        for url in list(pending):
            try:
                st = _server_status(url, name, token)
            except PromoteError as e:
                st, err = None, str(e)
            if st is not None:
                new = [
                    s
                    for s in st.get("swaps") or []
                    if s.get("to") == version and float(s.get("time") or 0) > baseline[url]
                ]
                if st.get("version") == version:
                    done.append({"server": url, "ok": True, "version": version})
                    pending.remove(url)
                elif new and not new[-1].get("ok"):
                    problems.append(
                        {"server": url, "ok": False, "detail": f"refused version {version}: {new[-1].get('error')}"}
                    )
                    pending.remove(url)
                else:
                    err = f"still serves version {st.get('version')}"
            if url in pending and time.monotonic() >= deadline:
                problems.append({"server": url, "ok": False, "detail": f"{err} after {timeout:g} s"})
                pending.remove(url)
        if pending:
            time.sleep(0.2)
    return done, problems


def _checked_move(
    model_dir: Path,
    version: int | None,
    action: str,
    reason,
    servers: list[str] | None,
    wait: float,
    token: str | None,
    lock: bool,
    check=None,
    load_check: bool = True,
) -> dict[str, Any]:
    """Move `latest` (under the lock), then wait for the live servers; a server that refused the version is an
    error with its reason, and `latest` goes back to where it was (action rollback, reason recorded)."""
    from contextlib import nullcontext

    servers = list(servers or [])
    baseline = {url: _last_swap_time(_server_status(url, model_dir.name, token)) for url in servers}
    with repo_lock(model_dir) if lock else nullcontext():
        v = check() if check else version
        meta = check_version(model_dir, v)
        if load_check:
            _load_check(model_dir, v, action)
        rec = _move(model_dir, v, meta, action, reason() if callable(reason) else reason)
    if not servers:
        return {**rec, "servers": []}
    done, problems = _wait_servers(servers, model_dir.name, v, baseline, wait, token)
    if problems:
        why = "; ".join(f"{p['server']} {p['detail']}" for p in problems)
        refused = [p for p in problems if p["detail"].startswith("refused")]
        if refused and rec["previous"] is not None and rec["previous"] != v:
            with repo_lock(model_dir) if lock else nullcontext():
                moved = _moved_since(model_dir, rec)
                if moved is None:
                    back = check_version(model_dir, rec["previous"])
                    _move(model_dir, rec["previous"], back, "rollback", f"{action} of {v} refused: {why}"[:2000])
            if moved is not None:  # someone else's move since ours is theirs to keep: never undo it
                raise PromoteError(f"{model_dir.name} version {v}: {why}; latest not moved back: {moved}")
            raise PromoteError(f"{model_dir.name} version {v}: {why}; latest moved back to {rec['previous']}")
        raise PromoteError(f"{model_dir.name} version {v}: {why}; latest stays at {v}")
    return {**rec, "servers": done}


def _moved_since(model_dir: Path, rec: dict[str, Any]) -> str | None:
    """None if `latest` is still where `rec` (our move) put it and no move was recorded after it; else who
    moved it since (the caller holds the lock, so nothing moves while it decides)."""
    now, history = latest_version(model_dir), read_history(model_dir)
    last = history[-1] if history else {}
    if now == rec["version"] and last == rec:
        return None
    return (
        f"it was moved since (now {now}; last record: {last.get('action')} of {last.get('version')} by "
        f"{last.get('user')} at {last.get('time')})"
    )


def _load_check(model_dir: Path, version: int, action: str) -> None:
    """The checks every server runs before a version serves (ONNX metadata, graph, warm-up, batch parity,
    export's reference images through the server's preprocessing), run here before `latest` moves: a version
    the servers would refuse never becomes `latest`, so it never enters the history rollback replays."""
    from transferkit.serve.config import ServeConfig
    from transferkit.serve.errors import LoadError
    from transferkit.serve.model import load_version

    try:
        load_version(model_dir, version, ServeConfig(repo=model_dir.parent, threads=1))
    except LoadError as e:
        raise PromoteError(
            f"{model_dir.name} version {version}: {action} refused, a server would not serve it: {e}; "
            f"latest stays at {latest_version(model_dir)}"
        ) from None


def promote(
    repo: Path,
    name: str,
    version: int | None = None,
    reason: str = "",
    *,
    lock: bool = True,
    servers: list[str] | None = None,
    wait: float = 60.0,
    token: str | None = None,
    load_check: bool | None = None,
) -> dict[str, Any]:
    """Point REPO/<name>/latest at `version` (None: the newest) after checking it is complete and that it
    passes the servers' own load checks (`load_check`; default: unless `lock=False`, i.e. export, which
    promotes what it has just built and parity-checked itself).

    Returns the history record (+ "servers": what each live server did). `servers`: base URLs of live
    `transferkit serve` processes to wait for, up to `wait` seconds each: a refusal is a PromoteError with
    the server's reason, after `latest` went back. `lock=False` is for a caller that already holds
    repository.repo_lock (export itself: flock is per open file, so taking it twice in one process would deadlock).
    """
    model_dir = find_model(repo, name)

    def pick() -> int:
        if version is not None:
            return int(version)
        have = list_versions(model_dir)
        if not have:
            raise PromoteError(f"{model_dir}: no versions to promote (run `transferkit export` first)")
        return have[-1]

    check_load = lock if load_check is None else load_check
    return _checked_move(
        model_dir, version, "promote", reason, servers, wait, token, lock, check=pick, load_check=check_load
    )


def promote_unless_newer_live(
    repo: Path, name: str, version: int, reason: str = ""
) -> tuple[str, dict[str, Any] | None]:
    """Make VERSION live unless it already is, and never demote a newer version that went live meanwhile (the
    retrain flow publishes without promoting, records the version in DVC, then comes here). Returns what was done
    and the history record of VERSION's promotion (None when it was left alone)."""
    model_dir = Path(repo) / name
    live = latest_version(model_dir)
    if live == version:
        rec = next((r for r in reversed(read_history(model_dir)) if r["version"] == version), None)
        return "already live (promoted by export)", rec
    if live is None or live < version:
        return f"promoted {live} -> {version}", promote(Path(repo), name, version, reason=reason)
    return f"left alone: newer version {live} is live", None


def rollback(
    repo: Path,
    name: str,
    reason: str = "",
    *,
    servers: list[str] | None = None,
    wait: float = 60.0,
    token: str | None = None,
) -> dict[str, Any]:
    """Return `latest` to the version that was live before the current one, per promotions.jsonl; refused
    (latest stays) if that version fails the servers' load checks: it never served."""
    model_dir = find_model(repo, name)
    state: dict[str, Any] = {}

    def pick() -> int:
        current = latest_version(model_dir)
        stack = live_stack(read_history(model_dir))
        if current is not None and (not stack or stack[-1] != current):
            stack.append(current)  # latest was moved by hand: roll back from where it really is
        if len(stack) < 2:
            raise PromoteError(
                f"{model_dir / HISTORY}: no earlier promoted version to roll back to "
                f"(current: {current}, history: {stack or 'empty'})"
            )
        state["current"] = current
        return stack[-2]

    # the reason names the version rolled back from, known only under the lock
    return _checked_move(
        model_dir,
        None,
        "rollback",
        lambda: reason or f"rollback from {state.get('current')}",
        servers,
        wait,
        token,
        True,
        check=pick,
    )

"""Promote and roll back: move REPO/<name>/latest, the pointer every server follows, with an audit trail.

    transferkit promote  --repo models --name digits [--version 3] [--reason "..."]
    transferkit rollback --repo models --name digits

`latest` holds the promoted version number (as text, also valid JSON). Servers watch it (`transferkit
serve` polls it and hot-swaps; Triton reads the `version_policy` in config.pbtxt, rewritten here too).
Rules:
  - only a complete version can be promoted: model.onnx, metadata.json with the contract keys and a
    `parity` record, and model.onnx's sha256 equal to the one in metadata.json. Anything else is refused
    with a message naming the file, and `latest` stays where it was;
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

from transferkit.export import (
    INT8_FILE,
    MODEL_FILES,
    REFERENCE_FILE,
    REQUIRED_KEYS,
    TRITON_CONFIG,
    _repo_lock,
    check_model_name,
    latest_version,
    list_versions,
    triton_config,
)
from transferkit.io import atomic_write_text, read_json, sha256_file

HISTORY = "promotions.jsonl"


class PromoteError(ValueError):
    """A promotion or rollback that must not happen (unknown model/version, incomplete version, no history)."""


def check_version(model_dir: Path, version: int, *, embedded: bool = True) -> dict[str, Any]:
    """metadata.json of a complete, intact version; PromoteError naming what is wrong otherwise.

    Every file of the version is checked: plain files only (no symlinks, nothing unexpected), each artifact's
    sha256 as metadata.json pins it (model.onnx, model.int8.onnx, reference.npz), and the version's identity
    (name, number) in metadata.json and inside the sha256-pinned ONNX file equal to where it sits.
    `embedded=False` skips reading the ONNX metadata (a caller that reads it itself: serve).
    """
    model_dir = Path(model_dir)
    vdir = model_dir / str(version)
    if vdir.is_symlink() or (vdir.is_dir() and vdir.resolve().parent != model_dir.resolve()):
        raise PromoteError(f"{vdir}: a version must be a folder of its own, not a link to another one")
    if not vdir.is_dir():
        have = list_versions(model_dir)
        raise PromoteError(f"{vdir}: no such version (versions of {model_dir.name}: {have or 'none'})")
    for p in vdir.iterdir():
        if p.is_symlink() or not p.is_file() or p.name not in MODEL_FILES:
            raise PromoteError(
                f"{p}: not a file export writes ({', '.join(MODEL_FILES)}); version {version} was changed after export"
            )
    onnx_path, meta_path = vdir / "model.onnx", vdir / "metadata.json"
    if not onnx_path.is_file():
        raise PromoteError(f"{onnx_path} not found: version {version} is incomplete")
    try:
        meta = read_json(meta_path)
    except (FileNotFoundError, ValueError) as e:
        raise PromoteError(f"version {version} is incomplete: {e}") from None
    if not isinstance(meta, dict):
        raise PromoteError(f"{meta_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise PromoteError(f"{meta_path}: missing keys {missing}")
    for key, want in (("name", model_dir.name), ("version", int(version))):
        got = meta.get(key)
        if got != want or isinstance(got, bool):
            raise PromoteError(
                f"{meta_path}: says {key} {got!r} but sits at {model_dir.name}/{version}: "
                "a version copied or linked under another name or number is refused"
            )
    parity = meta.get("parity")
    if not isinstance(parity, dict) or "max_abs_diff" not in parity:
        raise PromoteError(
            f"{meta_path}: no parity record; only versions that passed export's parity gate can be promoted"
        )
    _check_sha(onnx_path, meta.get("sha256"), "metadata.json's sha256")
    int8 = meta.get("int8")
    if isinstance(int8, dict) and int8.get("kept"):
        _check_sha(vdir / INT8_FILE, int8.get("sha256"), "metadata.json's int8.sha256")
    elif (vdir / INT8_FILE).exists():
        raise PromoteError(
            f"{vdir / INT8_FILE}: metadata.json records no kept int8 model; the file was added after export"
        )
    ref = meta.get("reference")  # export's reference images + torch logits (versions before it have none)
    if ref is not None:
        ref_path = vdir / REFERENCE_FILE
        if not isinstance(ref, dict) or ref.get("file") != REFERENCE_FILE or not ref_path.is_file():
            raise PromoteError(f"{ref_path}: the reference file metadata.json names is missing")
        _check_sha(ref_path, ref.get("sha256"), "metadata.json's reference.sha256")
    if embedded:
        from transferkit.export import read_onnx_metadata

        try:
            inside = read_onnx_metadata(onnx_path)
        except Exception as e:
            raise PromoteError(f"{onnx_path}: not a readable ONNX file ({type(e).__name__})") from None
        for key in ("name", "version"):
            if inside.get(key) != meta.get(key):
                raise PromoteError(
                    f"{onnx_path}: embedded {key} {inside.get(key)!r} differs from metadata.json's {meta.get(key)!r}"
                )
    return meta


def _check_sha(path: Path, want: Any, what: str) -> None:
    if not path.is_file():
        raise PromoteError(f"{path} not found: the version is incomplete")
    digest = sha256_file(path)
    if not isinstance(want, str) or digest != want:
        raise PromoteError(
            f"{path}: sha256 {digest[:16]}... differs from {what} {str(want)[:16]}...; "
            "the file was changed after export"
        )


def read_history(model_dir: Path) -> list[dict[str, Any]]:
    """The promotion records, oldest first (a torn last line from a crash is ignored)."""
    path = Path(model_dir) / HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("version"), int):
            out.append(rec)
    return out


def _stack(history: list[dict[str, Any]]) -> list[int]:
    """Live versions as a stack: promote pushes, rollback pops."""
    stack: list[int] = []
    for rec in history:
        if rec.get("action") == "rollback":
            while stack and stack[-1] != rec["version"]:
                stack.pop()
            if not stack:
                stack.append(rec["version"])
        elif not stack or stack[-1] != rec["version"]:
            stack.append(rec["version"])
    return stack


def _model_dir(repo: Path, name: str) -> Path:
    try:
        check_model_name(name)
    except ValueError as e:
        raise PromoteError(str(e)) from None
    model_dir = Path(repo) / name
    if model_dir.is_symlink():
        raise PromoteError(f"{model_dir}: a model folder must not be a link (it could move another repository)")
    if not model_dir.is_dir():
        have = sorted(p.name for p in Path(repo).iterdir() if p.is_dir()) if Path(repo).is_dir() else []
        raise PromoteError(f"{model_dir}: no such model in repository {repo} (models: {have or 'none'})")
    return model_dir


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
    _write_triton(model_dir, version, meta)
    atomic_write_text(model_dir / "latest", f"{version}\n")
    # One short line in append mode: a reader sees whole lines; a crash loses at most this record.
    with open(model_dir / HISTORY, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def _write_triton(model_dir: Path, version: int, meta: dict) -> None:
    """Keep Triton's version_policy on the promoted version (only where export wrote a config)."""
    if not (model_dir / TRITON_CONFIG).is_file():
        return
    from transferkit.config import ExportParams

    try:
        ep = ExportParams.model_validate((meta.get("params") or {}).get("export") or {})
    except ValueError:
        ep = ExportParams()
    atomic_write_text(
        model_dir / TRITON_CONFIG, triton_config(model_dir.name, version, meta["input_size"], len(meta["classes"]), ep)
    )


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
) -> dict[str, Any]:
    """Move `latest` (under the lock), then wait for the live servers; a server that refused the version is an
    error with its reason, and `latest` goes back to where it was (action rollback, reason recorded)."""
    from contextlib import nullcontext

    servers = list(servers or [])
    baseline = {url: _last_swap_time(_server_status(url, model_dir.name, token)) for url in servers}
    with _repo_lock(model_dir) if lock else nullcontext():
        v = check() if check else version
        meta = check_version(model_dir, v)
        rec = _move(model_dir, v, meta, action, reason() if callable(reason) else reason)
    if not servers:
        return {**rec, "servers": []}
    done, problems = _wait_servers(servers, model_dir.name, v, baseline, wait, token)
    if problems:
        why = "; ".join(f"{p['server']} {p['detail']}" for p in problems)
        refused = [p for p in problems if p["detail"].startswith("refused")]
        if refused and rec["previous"] is not None and rec["previous"] != v:
            with _repo_lock(model_dir) if lock else nullcontext():
                back = check_version(model_dir, rec["previous"])
                _move(model_dir, rec["previous"], back, "rollback", f"{action} of {v} refused: {why}"[:2000])
            raise PromoteError(f"{model_dir.name} version {v}: {why}; latest moved back to {rec['previous']}")
        raise PromoteError(f"{model_dir.name} version {v}: {why}; latest stays at {v}")
    return {**rec, "servers": done}


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
) -> dict[str, Any]:
    """Point REPO/<name>/latest at `version` (None: the newest) after checking it is complete.

    Returns the history record (+ "servers": what each live server did). `servers`: base URLs of live
    `transferkit serve` processes to wait for, up to `wait` seconds each: a refusal is a PromoteError with
    the server's reason, after `latest` went back. `lock=False` is for a caller that already holds
    export._repo_lock (export itself: flock is per open file, so taking it twice in one process would deadlock).
    """
    model_dir = _model_dir(repo, name)

    def pick() -> int:
        if version is not None:
            return int(version)
        have = list_versions(model_dir)
        if not have:
            raise PromoteError(f"{model_dir}: no versions to promote (run `transferkit export` first)")
        return have[-1]

    return _checked_move(model_dir, version, "promote", reason, servers, wait, token, lock, check=pick)


def rollback(
    repo: Path,
    name: str,
    reason: str = "",
    *,
    servers: list[str] | None = None,
    wait: float = 60.0,
    token: str | None = None,
) -> dict[str, Any]:
    """Return `latest` to the version that was live before the current one, per promotions.jsonl."""
    model_dir = _model_dir(repo, name)
    state: dict[str, Any] = {}

    def pick() -> int:
        current = latest_version(model_dir)
        stack = _stack(read_history(model_dir))
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

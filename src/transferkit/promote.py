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
    REFERENCE_FILE,
    REQUIRED_KEYS,
    TRITON_CONFIG,
    _repo_lock,
    latest_version,
    list_versions,
    triton_config,
)
from transferkit.io import atomic_write_text, read_json, sha256_file

HISTORY = "promotions.jsonl"


class PromoteError(ValueError):
    """A promotion or rollback that must not happen (unknown model/version, incomplete version, no history)."""


def check_version(model_dir: Path, version: int) -> dict[str, Any]:
    """metadata.json of a complete, intact version; PromoteError naming what is wrong otherwise."""
    vdir = Path(model_dir) / str(version)
    if not vdir.is_dir():
        have = list_versions(model_dir)
        raise PromoteError(f"{vdir}: no such version (versions of {Path(model_dir).name}: {have or 'none'})")
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
    parity = meta.get("parity")
    if not isinstance(parity, dict) or "max_abs_diff" not in parity:
        raise PromoteError(f"{meta_path}: no parity record; only versions that passed export's parity gate can be promoted")
    digest = sha256_file(onnx_path)
    if digest != meta.get("sha256"):
        raise PromoteError(f"{onnx_path}: sha256 {digest[:16]}... differs from metadata.json's "
                           f"{str(meta.get('sha256'))[:16]}...; the file was changed after export")  # fmt: skip
    ref = meta.get("reference")  # export's reference images + torch logits (versions before it have none)
    if ref is not None:
        ref_path = vdir / REFERENCE_FILE
        if not isinstance(ref, dict) or ref.get("file") != REFERENCE_FILE or not ref_path.is_file():
            raise PromoteError(f"{ref_path}: the reference file metadata.json names is missing")
        if sha256_file(ref_path) != ref.get("sha256"):
            raise PromoteError(f"{ref_path}: sha256 differs from metadata.json's; the file was changed after export")
    return meta


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
    model_dir = Path(repo) / name
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
    atomic_write_text(model_dir / TRITON_CONFIG,
                      triton_config(model_dir.name, version, meta["input_size"], len(meta["classes"]), ep))  # fmt: skip


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return None


def promote(repo: Path, name: str, version: int | None = None, reason: str = "", *, lock: bool = True) -> dict[str, Any]:
    """Point REPO/<name>/latest at `version` (None: the newest) after checking it is complete.

    Returns the history record. `lock=False` is for a caller that already holds export._repo_lock
    (export itself: flock is per open file, so taking it twice in one process would deadlock).
    """
    model_dir = _model_dir(repo, name)

    def go() -> dict[str, Any]:
        v = version
        if v is None:
            have = list_versions(model_dir)
            if not have:
                raise PromoteError(f"{model_dir}: no versions to promote (run `transferkit export` first)")
            v = have[-1]
        meta = check_version(model_dir, int(v))
        return _move(model_dir, int(v), meta, "promote", reason)

    if not lock:
        return go()
    with _repo_lock(model_dir):
        return go()


def rollback(repo: Path, name: str, reason: str = "") -> dict[str, Any]:
    """Return `latest` to the version that was live before the current one, per promotions.jsonl."""
    model_dir = _model_dir(repo, name)
    with _repo_lock(model_dir):
        current = latest_version(model_dir)
        stack = _stack(read_history(model_dir))
        if current is not None and (not stack or stack[-1] != current):
            stack.append(current)  # latest was moved by hand: roll back from where it really is
        if len(stack) < 2:
            raise PromoteError(f"{model_dir / HISTORY}: no earlier promoted version to roll back to "
                               f"(current: {current}, history: {stack or 'empty'})")  # fmt: skip
        target = stack[-2]
        meta = check_version(model_dir, target)
        return _move(model_dir, target, meta, "rollback", reason or f"rollback from {current}")

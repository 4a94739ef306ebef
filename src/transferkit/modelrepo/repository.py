"""The model repository: REPO/<name>/<version>/, the `latest` pointer, its lock, the promotion history.

Layout (Triton's, so Triton and `transferkit serve` read the same tree):

    REPO/<name>/<version>/   model.onnx, metadata.json, model_card.md, reference.npz [, model.int8.onnx]
    REPO/<name>/latest       the live version number as text (also valid JSON), written atomically
    REPO/<name>/config.pbtxt Triton config, version_policy pinned to `latest`
    REPO/<name>/promotions.jsonl  one JSON line per move of `latest` (the history rollback replays)
    REPO/<name>/.lock        flock: numbering + publishing a version and moving `latest` are serialised

Versions count 1, 2, 3, ... per name and appear in one os.rename from a hidden `.export-*` folder, so a
reader never sees half a version. A version is complete when every file in it is one export writes and
each artifact's sha256 equals the one metadata.json pins (check_version): what promote and every server
check before a version goes live.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transferkit.core.errors import TransferkitError
from transferkit.core.io import atomic_write_text, read_json, sha256_file


class RepositoryError(TransferkitError, ValueError):
    """A repository operation that must not happen: bad name, unknown model/version, incomplete version."""


# Keys of the public metadata.json contract; extras may be added.
REQUIRED_KEYS = (
    "classes",
    "input_size",
    "mean",
    "std",
    "opset",
    "sha256",
    "parity",
    "source_model",
    "data_md5",
    "git_rev",
    "params",
)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
REFERENCE_FILE = "reference.npz"  # test images + torch logits: servers replay them before a version serves
INT8_FILE = "model.int8.onnx"
MODEL_FILES = ("model.onnx", "metadata.json", "model_card.md", INT8_FILE, REFERENCE_FILE)  # int8 optional
TRITON_CONFIG = "config.pbtxt"
LATEST = "latest"
HISTORY = "promotions.jsonl"
STAGING_PREFIX = ".export-"

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
_VERSION_RE = re.compile(r"[0-9]+")
_LATEST_RE = re.compile(rb"[0-9]{1,18}\n?")


# --------------------------------------------------------------------------- names


def sanitize_name(raw: str, *, lower: bool = True, sep: str = "_", default: str = "model") -> str:
    """A name safe as a folder and URL part, never empty: runs of other characters become `sep`.

    lower=True: a model name ([a-z0-9_-], lower case, what check_model_name accepts up to its length);
    lower=False: a file-name part that keeps case and dots ([A-Za-z0-9._-]). Leading and trailing
    `.`, `_` and `-` are dropped, so the result is never hidden nor `..`.
    """
    text = str(raw).lower() if lower else str(raw)
    allowed = "a-z0-9_-" if lower else "A-Za-z0-9._-"
    return re.sub(f"[^{allowed}]+", sep, text).strip("._-") or default


def check_model_name(name: str) -> str:
    """A model name as export makes them ([a-z0-9_-], as sanitize_name), never a path; ValueError otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RepositoryError(
            f"model name {str(name)[:80]!r} is not a name: use 1-128 characters of a-z 0-9 _ - "
            "(starting with a letter or digit), never a path"
        )
    return name


def find_model(repo: Path, name: str) -> Path:
    """REPO/<name> of an existing model; RepositoryError for a bad name, a link or an unknown model."""
    check_model_name(name)
    folder = Path(repo) / name
    if folder.is_symlink():
        raise RepositoryError(f"{folder}: a model folder must not be a link (it could move another repository)")
    if not folder.is_dir():
        have = sorted(p.name for p in Path(repo).iterdir() if p.is_dir()) if Path(repo).is_dir() else []
        raise RepositoryError(f"{folder}: no such model in repository {repo} (models: {have or 'none'})")
    return folder


def list_models(repo: Path) -> list[str]:
    """Models with a `latest` pointer (valid or not), by name: only folders export could have made."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    return sorted(
        p.name for p in repo.iterdir() if NAME_RE.fullmatch(p.name) and not p.is_symlink() and (p / LATEST).is_file()
    )


# --------------------------------------------------------------------------- versions and `latest`


def list_versions(model_dir: Path) -> list[int]:
    """Published versions of one model, ascending (hidden temp folders and `latest` are ignored)."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and _VERSION_RE.fullmatch(p.name))


def next_version(model_dir: Path) -> int:
    """The number the next published version gets (call it under repo_lock)."""
    return max(list_versions(model_dir), default=0) + 1


def read_latest(model_dir: Path) -> int | None:
    """The version REPO/<name>/latest points to (None: no pointer yet); ValueError if it holds anything but
    a version number (`1.5`, `true`, ` 2`, ...: strictly ASCII digits and an optional newline)."""
    import stat

    p = Path(model_dir) / LATEST
    try:
        # O_NONBLOCK: a named pipe opens at once instead of waiting for a writer (servers read this on
        # their event loop); then at most 20 bytes, whatever the file's size
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RepositoryError(f"{p}: not a regular file; promote a version to repair it")
        if st.st_size > 20:
            raise RepositoryError(f"{p}: {st.st_size} bytes, not a version number; promote a version to repair it")
        raw = os.read(fd, 21)
    finally:
        os.close(fd)
    if not _LATEST_RE.fullmatch(raw) or int(raw) < 1:
        raise RepositoryError(f"{p}: holds {raw[:20]!r}, not a version number; promote a version to repair it")
    return int(raw)


def latest_version(model_dir: Path) -> int | None:
    """The version REPO/<name>/latest points to, or None if no export has finished yet (or it is unreadable)."""
    try:
        return read_latest(model_dir)
    except (ValueError, OSError):
        return None


def write_latest(model_dir: Path, version: int) -> None:
    """Point `latest` at `version` in one atomic replace (the caller holds repo_lock)."""
    atomic_write_text(Path(model_dir) / LATEST, f"{int(version)}\n")


# --------------------------------------------------------------------------- the lock and staging


@contextmanager
def repo_lock(model_dir: Path) -> Iterator[None]:
    """Serialise numbering + publishing a version and moving `latest` for one model name.

    flock is per open file: a process that holds it must not take it again (it would wait on itself).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the rename still refuses to overwrite a version
        yield
        return
    with open(Path(model_dir) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def hold(folder: Path) -> int | None:
    """A shared flock on an export's temp folder for as long as the export runs (the OS drops it when the
    process dies, however it dies): what tells clean_stale a live export from a killed one. Returns the fd
    to os.close when done (None where there is no flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def clean_stale(model_dir: Path) -> list[str]:
    """Remove what killed exports left in REPO/<name>/: `.export-*` folders no live export holds, and the
    `.*.tmp` files of atomic writes (only ever made under the repository lock, which the caller holds)."""
    import fcntl

    removed = []
    for p in sorted(Path(model_dir).iterdir()):
        if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its export is gone
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def open_staging(model_dir: Path) -> tuple[Path, int | None, list[str]]:
    """A new hidden `.export-*` folder in REPO/<name>/, held (see hold), after clean_stale.

    Made and held under the repository lock, so a cleaner never sees it unheld. Returns (folder, fd of
    the hold, what clean_stale removed).
    """
    with repo_lock(model_dir):
        cleaned = clean_stale(model_dir)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
        fd = hold(staging)
    return staging, fd, cleaned


def publish(staging: Path, model_dir: Path, version: int) -> Path:
    """Make a staged version REPO/<name>/<version> in one rename (the caller holds repo_lock)."""
    leftovers = sorted(p.name for p in Path(staging).iterdir() if p.name not in MODEL_FILES)
    if leftovers:
        raise RepositoryError(f"unexpected files beside model.onnx: {leftovers}")
    final = Path(model_dir) / str(version)
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    os.rename(staging, final)  # refuses to replace a non-empty folder: a version is never overwritten
    return final


# --------------------------------------------------------------------------- history


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


def append_history(model_dir: Path, record: dict[str, Any]) -> None:
    """Append one record (the caller holds repo_lock). One short line in append mode: a reader sees whole
    lines; a crash loses at most this record."""
    with open(Path(model_dir) / HISTORY, "a") as f:
        f.write(json.dumps(record) + "\n")


def live_stack(history: list[dict[str, Any]]) -> list[int]:
    """Live versions as a stack, oldest first: promote pushes, rollback pops."""
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


# --------------------------------------------------------------------------- a complete version


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """metadata_props of an exported file, JSON values decoded (the inverse of export's embedding)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def check_version(model_dir: Path, version: int, *, embedded: bool = True) -> dict[str, Any]:
    """metadata.json of a complete, intact version; RepositoryError naming what is wrong otherwise.

    Every file of the version is checked: plain files only (no symlinks, nothing unexpected), each artifact's
    sha256 as metadata.json pins it (model.onnx, model.int8.onnx, reference.npz), and the version's identity
    (name, number) in metadata.json and inside the sha256-pinned ONNX file equal to where it sits.
    `embedded=False` skips reading the ONNX metadata (a caller that reads it itself: serve).
    """
    model_dir = Path(model_dir)
    vdir = _version_folder(model_dir, version)
    meta = _read_metadata(vdir, version)
    _check_identity(vdir / "metadata.json", meta, model_dir.name, version)
    _check_artifacts(vdir, meta)
    if embedded:
        _check_embedded(vdir / "model.onnx", meta)
    return meta


def _version_folder(model_dir: Path, version: int) -> Path:
    """REPO/<name>/<version>, a real folder holding only files export writes."""
    vdir = model_dir / str(version)
    if vdir.is_symlink() or (vdir.is_dir() and vdir.resolve().parent != model_dir.resolve()):
        raise RepositoryError(f"{vdir}: a version must be a folder of its own, not a link to another one")
    if not vdir.is_dir():
        have = list_versions(model_dir)
        raise RepositoryError(f"{vdir}: no such version (versions of {model_dir.name}: {have or 'none'})")
    for p in vdir.iterdir():
        if p.is_symlink() or not p.is_file() or p.name not in MODEL_FILES:
            raise RepositoryError(
                f"{p}: not a file export writes ({', '.join(MODEL_FILES)}); version {version} was changed after export"
            )
    return vdir


def _read_metadata(vdir: Path, version: int) -> dict[str, Any]:
    onnx_path, meta_path = vdir / "model.onnx", vdir / "metadata.json"
    if not onnx_path.is_file():
        raise RepositoryError(f"{onnx_path} not found: version {version} is incomplete")
    try:
        meta = read_json(meta_path)
    except (FileNotFoundError, ValueError) as e:
        raise RepositoryError(f"version {version} is incomplete: {e}") from None
    if not isinstance(meta, dict):
        raise RepositoryError(f"{meta_path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise RepositoryError(f"{meta_path}: missing keys {missing}")
    return meta


def _check_identity(meta_path: Path, meta: dict, name: str, version: int) -> None:
    for key, want in (("name", name), ("version", int(version))):
        got = meta.get(key)
        if got != want or isinstance(got, bool):
            raise RepositoryError(
                f"{meta_path}: says {key} {got!r} but sits at {name}/{version}: "
                "a version copied or linked under another name or number is refused"
            )
    parity = meta.get("parity")
    if not isinstance(parity, dict) or "max_abs_diff" not in parity:
        raise RepositoryError(
            f"{meta_path}: no parity record; only versions that passed export's parity gate can be promoted"
        )


def _check_artifacts(vdir: Path, meta: dict) -> None:
    """Each artifact's sha256 as metadata.json pins it; an int8 or reference file it does not name is refused."""
    _check_sha(vdir / "model.onnx", meta.get("sha256"), "metadata.json's sha256")
    int8 = meta.get("int8")
    if isinstance(int8, dict) and int8.get("kept"):
        _check_sha(vdir / INT8_FILE, int8.get("sha256"), "metadata.json's int8.sha256")
    elif (vdir / INT8_FILE).exists():
        raise RepositoryError(
            f"{vdir / INT8_FILE}: metadata.json records no kept int8 model; the file was added after export"
        )
    ref = meta.get("reference")  # export's reference images + torch logits (versions before it have none)
    if ref is not None:
        ref_path = vdir / REFERENCE_FILE
        if not isinstance(ref, dict) or ref.get("file") != REFERENCE_FILE or not ref_path.is_file():
            raise RepositoryError(f"{ref_path}: the reference file metadata.json names is missing")
        _check_sha(ref_path, ref.get("sha256"), "metadata.json's reference.sha256")


def _check_embedded(onnx_path: Path, meta: dict) -> None:
    try:
        inside = read_onnx_metadata(onnx_path)
    except Exception as e:
        raise RepositoryError(f"{onnx_path}: not a readable ONNX file ({type(e).__name__})") from None
    for key in ("name", "version"):
        if inside.get(key) != meta.get(key):
            raise RepositoryError(
                f"{onnx_path}: embedded {key} {inside.get(key)!r} differs from metadata.json's {meta.get(key)!r}"
            )


def _check_sha(path: Path, want: Any, what: str) -> None:
    if not path.is_file():
        raise RepositoryError(f"{path} not found: the version is incomplete")
    digest = sha256_file(path)
    if not isinstance(want, str) or digest != want:
        raise RepositoryError(
            f"{path}: sha256 {digest[:16]}... differs from {what} {str(want)[:16]}...; "
            "the file was changed after export"
        )


# --------------------------------------------------------------------------- Triton


def triton_config(name: str, version: int, input_size: list[int], num_classes: int, ep) -> str:
    """config.pbtxt for Triton's onnxruntime backend; dims exclude the batch dim (max_batch_size > 0)."""
    c, h, w = (int(v) for v in input_size)
    return f"""# Triton Inference Server config for REPO/{name}/<version>/model.onnx, written by `transferkit export`.
# Rewritten with every export; version_policy pins the promoted version (REPO/{name}/latest).
name: "{name}"
backend: "onnxruntime"
max_batch_size: {ep.triton_max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {c}, {h}, {w} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {ep.triton_max_queue_delay_us}
}}
version_policy: {{ specific: {{ versions: [ {version} ] }} }}
"""


def write_triton_config(model_dir: Path, version: int, meta: dict, *, create: bool = False) -> None:
    """Pin Triton's version_policy to `version` with the export settings recorded in its metadata.

    create=False (promote) only rewrites a config export wrote; the caller holds repo_lock.
    """
    from transferkit.core.config import ExportParams

    path = Path(model_dir) / TRITON_CONFIG
    if not create and not path.is_file():
        return
    try:
        ep = ExportParams.model_validate((meta.get("params") or {}).get("export") or {})
    except ValueError:
        ep = ExportParams()
    atomic_write_text(path, triton_config(Path(model_dir).name, version, meta["input_size"], len(meta["classes"]), ep))

"""promote / rollback: the `latest` pointer, its audit trail, and the refusal of incomplete versions.

    .venv/bin/pytest -q tests/test_promote.py

Runs on the shared real repository (conftest.model_repo: two real exports, digits/1 and digits/2),
copied per test because every test moves the pointer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import renumber_version

from transferkit.export import latest_version
from transferkit.io import read_json, write_json
from transferkit.promote import HISTORY, PromoteError, promote, read_history, rollback

pytestmark = pytest.mark.slow  # the shared fixture exports two models


@pytest.fixture
def repo(model_repo, tmp_path) -> Path:
    out = tmp_path / "repo"
    shutil.copytree(model_repo, out)
    return out


def _add_version(repo: Path, src: int, dst: int) -> Path:
    """A third complete version: export's files of `src` renumbered `dst` (conftest.renumber_version)."""
    return renumber_version(repo / "digits", src, dst)


def test_export_promotes_through_the_history(repo):
    d = repo / "digits"
    assert latest_version(d) == 2
    hist = read_history(d)
    assert [(h["action"], h["version"], h["previous"]) for h in hist] == [("promote", 1, None), ("promote", 2, 1)]
    assert all(h["reason"].startswith("export of ") and len(h["sha256"]) == 64 for h in hist)
    assert "versions: [ 2 ]" in (d / "config.pbtxt").read_text()


def test_promote_specific_and_newest_and_rollback_stack(repo):
    d = repo / "digits"
    _add_version(repo, 1, 3)
    r = promote(repo, "digits", 1, reason="canary failed on 2")
    assert (r["version"], r["previous"], r["action"]) == (1, 2, "promote") and latest_version(d) == 1
    assert "versions: [ 1 ]" in (d / "config.pbtxt").read_text()  # Triton follows the pointer
    assert promote(repo, "digits")["version"] == 3  # None = newest
    assert rollback(repo, "digits")["version"] == 1  # back past the export history, one step at a time
    assert rollback(repo, "digits")["version"] == 2
    assert rollback(repo, "digits")["version"] == 1
    with pytest.raises(PromoteError, match="no earlier promoted version"):
        rollback(repo, "digits")
    assert latest_version(d) == 1
    lines = (d / HISTORY).read_text().splitlines()
    assert len(lines) == 2 + 2 + 3 and json.loads(lines[-1])["action"] == "rollback"


@pytest.mark.parametrize("damage, match", [
    ("no-onnx", "model.onnx not found"),
    ("no-parity", "no parity record"),
    ("tampered", "sha256"),
    ("bad-json", "not valid JSON"),
    ("no-keys", "missing keys \\['classes'\\]"),
    ("missing", "no such version"),
    ("no-reference", "reference file metadata.json names is missing"),
    ("tampered-reference", "reference.npz: sha256 .* differs"),
])  # fmt: skip
def test_incomplete_or_tampered_versions_are_refused_and_latest_stays(repo, damage, match):
    d = repo / "digits"
    v = _add_version(repo, 1, 3)
    if damage == "no-onnx":
        (v / "model.onnx").unlink()
    elif damage == "no-parity":
        meta = read_json(v / "metadata.json")
        meta["parity"] = None  # the key is there, the record is not
        write_json(v / "metadata.json", meta)
    elif damage == "no-keys":
        meta = read_json(v / "metadata.json")
        del meta["classes"]
        write_json(v / "metadata.json", meta)
    elif damage == "tampered":
        with open(v / "model.onnx", "ab") as f:
            f.write(b"\0")
    elif damage == "bad-json":
        (v / "metadata.json").write_text("{")
    elif damage == "missing":
        shutil.rmtree(v)
    elif damage == "no-reference":
        (v / "reference.npz").unlink()
    elif damage == "tampered-reference":
        with open(v / "reference.npz", "ab") as f:
            f.write(b"\0")
    before = ((d / "latest").read_bytes(), (d / HISTORY).read_bytes(), (d / "config.pbtxt").read_bytes())
    with pytest.raises(PromoteError, match=match):
        promote(repo, "digits", 3)
    assert ((d / "latest").read_bytes(), (d / HISTORY).read_bytes(), (d / "config.pbtxt").read_bytes()) == before


def test_unknown_model_is_named(repo):
    with pytest.raises(PromoteError, match="no such model.*digits"):
        promote(repo, "cats")


def test_cli_promote_and_rollback(repo):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tk = [sys.executable, "-m", "transferkit.cli"]
    r = subprocess.run([*tk, "promote", "--repo", str(repo), "--name", "digits", "--version", "1"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "2 -> 1" in r.stdout and latest_version(repo / "digits") == 1
    r = subprocess.run([*tk, "rollback", "--repo", str(repo), "--name", "digits"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "1 -> 2" in r.stdout
    r = subprocess.run([*tk, "promote", "--repo", str(repo), "--name", "digits", "--version", "9"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "no such version" in r.stderr and "Traceback" not in r.stderr
    assert latest_version(repo / "digits") == 2

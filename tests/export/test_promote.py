"""promote / rollback: the `latest` pointer, its audit trail, and the refusal of incomplete versions.

    .venv/bin/pytest -q tests/export/test_promote.py

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

from transferkit.core.io import read_json, write_json
from transferkit.export.promote import (
    HISTORY,
    PromoteError,
    promote,
    promote_unless_newer_live,
    read_history,
    rollback,
)
from transferkit.modelrepo.repository import latest_version

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


def test_the_flows_promotion_never_demotes(repo):
    """The retrain flow's promotion (after DVC recorded the version): already live is a no-op, an older version
    never replaces a newer live one, a newer one goes live through promote (history, Triton config)."""
    d = repo / "digits"
    n = len(read_history(d))
    action, rec = promote_unless_newer_live(repo, "digits", 2, "retrain")
    assert action.startswith("already live") and rec["version"] == 2 and len(read_history(d)) == n
    action, rec = promote_unless_newer_live(repo, "digits", 1, "retrain")
    assert action == "left alone: newer version 2 is live" and rec is None and latest_version(d) == 2
    _add_version(repo, 1, 3)
    action, rec = promote_unless_newer_live(repo, "digits", 3, "retrain")
    assert action == "promoted 2 -> 3" and rec["version"] == 3 and latest_version(d) == 3
    assert read_history(d)[-1]["reason"] == "retrain" and "versions: [ 3 ]" in (d / "config.pbtxt").read_text()


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


@pytest.mark.parametrize(
    "damage, match",
    [
        ("no-onnx", "model.onnx not found"),
        ("no-parity", "no parity record"),
        ("tampered", "sha256"),
        ("bad-json", "not valid JSON"),
        ("no-keys", "missing keys \\['classes'\\]"),
        ("missing", "no such version"),
        ("no-reference", "reference file metadata.json names is missing"),
        ("tampered-reference", "reference.npz: sha256 .* differs"),
    ],
)
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
    r = subprocess.run(
        [*tk, "promote", "--repo", str(repo), "--name", "digits", "--version", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "2 -> 1" in r.stdout and latest_version(repo / "digits") == 1
    r = subprocess.run(
        [*tk, "rollback", "--repo", str(repo), "--name", "digits"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0 and "1 -> 2" in r.stdout
    r = subprocess.run(
        [*tk, "promote", "--repo", str(repo), "--name", "digits", "--version", "9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1 and "no such version" in r.stderr and "Traceback" not in r.stderr
    assert latest_version(repo / "digits") == 2


def _with_int8(repo: Path, src: int, dst: int) -> Path:
    """Version `dst` with a real int8 model beside model.onnx (onnxruntime static QDQ quantization of the
    exported graph, as export makes it), pinned in metadata.json as export pins a kept int8 file."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    from transferkit.core.io import sha256_file

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    v = renumber_version(repo / "digits", src, dst)
    quantize_static(str(v / "model.onnx"), str(v / "model.int8.onnx"), Reader(), weight_type=QuantType.QInt8)
    meta = read_json(v / "metadata.json")
    meta["int8"] = {"kept": True, "sha256": sha256_file(v / "model.int8.onnx")}
    write_json(v / "metadata.json", meta)
    return v


def _scramble_int8(path: Path) -> None:
    """Permute the int8 weights: still a valid ONNX file of the same size, answering differently."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    n = 0
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 16:
            a = numpy_helper.to_array(t)
            t.CopyFrom(
                numpy_helper.from_array(np.random.default_rng(0).permutation(a.ravel()).reshape(a.shape), t.name)
            )
            n += 1
    assert n
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def test_int8_model_is_verified_by_promote_and_by_the_server_loader(repo, tmp_path):
    """4: model.int8.onnx was never verified: scrambled int8 weights were promoted and served with --int8."""
    from transferkit.serve import LoadError, ServeConfig, load_version

    v = _with_int8(repo, 1, 3)
    assert promote(repo, "digits", 3)["version"] == 3
    cfg = ServeConfig(repo=repo, int8=True, max_batch_size=4)
    assert load_version(repo / "digits", 3, cfg).path.name == "model.int8.onnx"
    _scramble_int8(v / "model.int8.onnx")
    with pytest.raises(PromoteError, match=r"model.int8.onnx: sha256 .* differs from metadata.json's int8.sha256"):
        promote(repo, "digits", 3)
    with pytest.raises(LoadError, match="model.int8.onnx: sha256"):
        load_version(repo / "digits", 3, cfg)
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "promote", "--repo", str(repo), "--name", "digits", "--version", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "int8" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("case", ["symlink", "copy", "extra-file", "unpinned-int8", "edited-number"])
def test_version_identity_is_bound_to_where_it_sits(repo, case):
    """6: a linked or copied version was promoted as 5 while its metadata said 2."""
    d = repo / "digits"
    if case == "symlink":
        (d / "5").symlink_to(d / "2", target_is_directory=True)
        match = "not a link"
    elif case == "copy":
        shutil.copytree(d / "2", d / "5")
        match = "says version 2 but sits at digits/5"
    elif case == "extra-file":
        renumber_version(d, 2, 5)
        (d / "5" / "notes.txt").write_text("hi")
        match = "notes.txt: not a file export writes"
    elif case == "unpinned-int8":
        renumber_version(d, 2, 5)
        shutil.copy(d / "5" / "model.onnx", d / "5" / "model.int8.onnx")
        match = "records no kept int8 model"
    else:  # metadata.json renumbered by hand: the sha256-pinned ONNX file still says 2
        shutil.copytree(d / "2", d / "5")
        meta = read_json(d / "5" / "metadata.json")
        meta["version"] = 5
        write_json(d / "5" / "metadata.json", meta)
        match = "embedded version 2 differs from metadata.json's 5"
    with pytest.raises(PromoteError, match=match):
        promote(repo, "digits", 5)
    assert latest_version(d) == 2


def test_model_names_are_never_paths(repo, tmp_path):
    """6: `promote --name ../otherrepo/target` (or an absolute path) moved another repository's latest."""
    other = tmp_path / "otherrepo"
    shutil.copytree(repo, other)
    before = (other / "digits" / "latest").read_bytes()
    for name in ("../otherrepo/digits", str(other / "digits"), "Digits", "", "a/b", ".."):
        r = subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "promote", "--repo", str(repo), "--name", name, "--version", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and "is not a name" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    assert (other / "digits" / "latest").read_bytes() == before
    (repo / "linked").symlink_to(other / "digits", target_is_directory=True)
    with pytest.raises(PromoteError, match="must not be a link"):
        promote(repo, "linked", 1)
    assert (other / "digits" / "latest").read_bytes() == before


@pytest.mark.parametrize("junk", ["1.5", "true", " 2", "2 ", "0", "-1", "1e0", "", "２"])
def test_latest_is_parsed_strictly(repo, junk):
    from transferkit.modelrepo.repository import read_latest

    d = repo / "digits"
    (d / "latest").write_text(junk)
    with pytest.raises(ValueError, match="not a version number"):
        read_latest(d)
    assert latest_version(d) is None
    assert promote(repo, "digits", 1)["previous"] is None and read_latest(d) == 1


def test_rollback_never_lands_on_a_version_no_server_would_serve(repo):
    """#34 (5): `promote 6` without --server (servers refused 6), `promote 2`, `rollback` made 6 `latest` with
    exit 0 while every server stayed on 2. promote and rollback now run the servers' own load checks."""
    from conftest import bad_reference

    d = repo / "digits"
    bad_reference(d, 1, 6)  # intact files, but its reference images do not replay: every server refuses it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tk = [sys.executable, "-m", "transferkit.cli"]
    r = subprocess.run(
        [*tk, "promote", "--repo", str(repo), "--name", "digits", "--version", "6"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "a server would not serve it" in r.stderr and "differ from export's torch logits" in r.stderr
    assert latest_version(d) == 2 and len(read_history(d)) == 2  # nothing moved, nothing recorded
    # a history written before the check existed: 6 was promoted, then 2 again
    promote(repo, "digits", 6, reason="test: as promote before #34 did", load_check=False)
    promote(repo, "digits", 2)
    r = subprocess.run(
        [*tk, "rollback", "--repo", str(repo), "--name", "digits"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "version 6: rollback refused, a server would not serve it" in r.stderr and "latest stays at 2" in r.stderr
    assert latest_version(d) == 2 and read_history(d)[-1]["version"] == 2

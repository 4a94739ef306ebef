"""The model repository's own contract, on tiny hand-made versions (no training, no export).

.venv/bin/pytest -q tests/modelrepo/test_repository.py
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from transferkit.core.io import sha256_file, write_json
from transferkit.modelrepo.repository import (
    HISTORY,
    INT8_FILE,
    REQUIRED_KEYS,
    TRITON_CONFIG,
    RepositoryError,
    append_history,
    check_model_name,
    check_version,
    clean_stale,
    find_model,
    latest_version,
    list_models,
    list_versions,
    live_stack,
    next_version,
    open_staging,
    publish,
    read_history,
    read_latest,
    repo_lock,
    sanitize_name,
    write_latest,
    write_triton_config,
)


def _tiny_onnx(path: Path, name: str, version: int) -> None:
    """A one-node ONNX file (Identity) carrying the identity export embeds."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for k, v in (("name", name), ("version", version)):
        proto.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save_model(proto, str(path))


def _version(model_dir: Path, version: int, name: str | None = None) -> Path:
    """A complete version as export leaves it (model.onnx + metadata.json pinning its sha256)."""
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True)
    _tiny_onnx(vdir / "model.onnx", name or model_dir.name, version)
    meta = {k: None for k in REQUIRED_KEYS}
    meta.update(
        name=name or model_dir.name,
        version=version,
        classes=["a", "b", "c"],
        input_size=[3, 8, 8],
        parity={"max_abs_diff": 0.0},
        sha256=sha256_file(vdir / "model.onnx"),
        params={"export": {"triton_max_batch_size": 16}},
    )
    write_json(vdir / "metadata.json", meta)
    return vdir


def test_names_are_sanitised_one_way_and_checked():
    assert sanitize_name("My Digits/v2") == "my_digits_v2"
    assert sanitize_name("../..") == "model" and sanitize_name(" a-b_c ") == "a-b_c"
    assert check_model_name(sanitize_name("Ünïcode Name!")) == "n_code_name"
    # lower=False: file-name parts keep case and dots, never hidden
    assert sanitize_name("timm:ResNet18/a.b", lower=False) == "timm_ResNet18_a.b"
    assert sanitize_name(".hidden", lower=False, sep="-", default="data") == "hidden"
    assert sanitize_name("::", lower=False, default="data") == "data"
    for bad in ("../x", "/abs", "UPPER", "", "-lead", "a" * 129, 3):
        with pytest.raises(RepositoryError, match="not a name"):
            check_model_name(bad)


def test_version_numbering_ignores_what_is_not_a_version(tmp_path):
    d = tmp_path / "digits"
    assert list_versions(d) == [] and next_version(d) == 1
    for v in ("1", "3", "10"):
        (d / v).mkdir(parents=True)
    (d / ".export-abc").mkdir()
    (d / "7").write_text("a file, not a version")
    (d / "v2").mkdir()
    assert list_versions(d) == [1, 3, 10] and next_version(d) == 11


def test_latest_pointer_is_replaced_atomically_and_read_strictly(tmp_path):
    d = tmp_path / "digits"
    d.mkdir()
    assert read_latest(d) is None and latest_version(d) is None
    write_latest(d, 1)
    with open(d / "latest") as old:  # a reader that opened the old pointer
        write_latest(d, 2)
        assert old.read() == "1\n"  # a new file replaced it: the reader saw a whole old one, never a torn one
    assert (d / "latest").read_text() == "2\n" and read_latest(d) == 2
    assert [p.name for p in d.iterdir()] == ["latest"]  # no temp file left beside it
    (d / "latest").write_text("2.0")
    with pytest.raises(RepositoryError, match="not a version number"):
        read_latest(d)
    assert latest_version(d) is None


def test_lock_is_exclusive_and_clean_stale_spares_a_held_staging_folder(tmp_path):
    d = tmp_path / "digits"
    d.mkdir()
    with repo_lock(d):
        fd = os.open(d / ".lock", os.O_RDONLY)  # another open file: flock treats it as another holder
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(d / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit
    os.close(fd)

    live, held, cleaned = open_staging(d)
    assert cleaned == [] and live.name.startswith(".export-")
    dead = d / ".export-killed"
    dead.mkdir()
    (d / ".latest.tmp").write_text("torn")
    try:
        with repo_lock(d):
            assert sorted(clean_stale(d)) == [".export-killed", ".latest.tmp"]
        assert live.is_dir() and not dead.exists()
    finally:
        os.close(held)
    with repo_lock(d):
        assert clean_stale(d) == [live.name]  # its export is gone: nothing holds it now
    assert not live.exists()


def test_publish_refuses_strays_and_never_overwrites_a_version(tmp_path):
    d = tmp_path / "digits"
    d.mkdir()
    staging, held, _ = open_staging(d)
    os.close(held)
    (staging / "model.onnx").write_bytes(b"x")
    (staging / "notes.txt").write_text("stray")
    with pytest.raises(RepositoryError, match="unexpected files.*notes.txt"):
        publish(staging, d, 1)
    (staging / "notes.txt").unlink()
    assert publish(staging, d, 1) == d / "1" and oct((d / "1").stat().st_mode & 0o777) == "0o755"
    again, held, _ = open_staging(d)
    os.close(held)
    (again / "model.onnx").write_bytes(b"y")
    with pytest.raises(OSError):
        publish(again, d, 1)
    assert (d / "1" / "model.onnx").read_bytes() == b"x"


def test_complete_version_passes_and_a_tampered_one_is_refused(tmp_path):
    d = tmp_path / "digits"
    vdir = _version(d, 1)
    meta = check_version(d, 1)
    assert meta["name"] == "digits" and meta["version"] == 1
    with pytest.raises(RepositoryError, match="no such version.*versions of digits: \\[1\\]"):
        check_version(d, 2)

    data = bytearray((vdir / "model.onnx").read_bytes())
    data[-1] ^= 1
    (vdir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match=r"model.onnx: sha256 .* differs from metadata.json's sha256"):
        check_version(d, 1, embedded=False)

    v2 = _version(d, 2)
    (v2 / INT8_FILE).write_bytes(b"int8")
    with pytest.raises(RepositoryError, match="records no kept int8 model"):
        check_version(d, 2)
    (v2 / INT8_FILE).unlink()
    (v2 / "extra.bin").write_bytes(b"")
    with pytest.raises(RepositoryError, match="extra.bin: not a file export writes"):
        check_version(d, 2)


def test_a_version_copied_under_another_number_or_name_is_refused(tmp_path):
    d = tmp_path / "digits"
    _version(d, 3, name="digits")
    os.rename(d / "3", d / "4")
    with pytest.raises(RepositoryError, match="says version 3 but sits at digits/4"):
        check_version(d, 4)
    (d / "5").symlink_to(d / "4")
    with pytest.raises(RepositoryError, match="not a link"):
        check_version(d, 5)
    _version(d, 6)
    meta = json.loads((d / "6" / "metadata.json").read_text())
    _tiny_onnx(d / "6" / "model.onnx", "digits", 1)  # embedded identity differs, sha256 re-pinned
    meta["sha256"] = sha256_file(d / "6" / "model.onnx")
    write_json(d / "6" / "metadata.json", meta)
    assert check_version(d, 6, embedded=False)["version"] == 6
    with pytest.raises(RepositoryError, match="embedded version 1 differs"):
        check_version(d, 6)


def test_history_stack_and_models(tmp_path):
    d = tmp_path / "repo" / "digits"
    d.mkdir(parents=True)
    for action, v in (("promote", 1), ("promote", 2), ("promote", 3), ("rollback", 2), ("promote", 4)):
        append_history(d, {"action": action, "version": v})
    with open(d / HISTORY, "a") as f:
        f.write('{"action": "promote", "vers')  # a crash mid-line
    hist = read_history(d)
    assert [h["version"] for h in hist] == [1, 2, 3, 2, 4]
    assert live_stack(hist) == [1, 2, 4]
    assert list_models(tmp_path / "repo") == []  # no pointer yet
    write_latest(d, 4)
    (tmp_path / "repo" / "link").symlink_to(d)
    assert list_models(tmp_path / "repo") == ["digits"]
    assert find_model(tmp_path / "repo", "digits") == d
    with pytest.raises(RepositoryError, match="must not be a link"):
        find_model(tmp_path / "repo", "link")
    with pytest.raises(RepositoryError, match="no such model.*models: \\['digits', 'link'\\]"):
        find_model(tmp_path / "repo", "cats")


def test_triton_config_follows_the_pinned_version(tmp_path):
    d = tmp_path / "digits"
    _version(d, 1)
    meta = check_version(d, 1)
    write_triton_config(d, 1, meta)
    assert not (d / TRITON_CONFIG).exists()  # promote only rewrites a config export wrote
    write_triton_config(d, 1, meta, create=True)
    text = (d / TRITON_CONFIG).read_text()
    assert 'name: "digits"' in text and "dims: [ 3, 8, 8 ]" in text and "dims: [ 3 ]" in text
    assert "max_batch_size: 16" in text and "versions: [ 1 ]" in text
    write_triton_config(d, 7, meta)
    assert "versions: [ 7 ]" in (d / TRITON_CONFIG).read_text()

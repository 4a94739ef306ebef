"""End to end: `transferkit run` drives the Prefect flow on a tiny real slice, like a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ARGS = [
    "--candidates",
    "mobilenetv2_100,scratch:mobilenetv2_100",
    "-q",
    "--set",
    "data.image_size=64",
    "--set",
    "train.epochs=8",
    "--set",
    "train.patience=8",
    "--set",
    "train.search_mode=rule",  # auto = the fixed rule: the search (test_train.py) would add minutes here
    "--set",
    "drift.min_samples=5",
    # flow mechanics, not the gate: raw pixels beat a 6-label probe on tiny digits, so the negative-transfer
    # verdict is recorded as a warning here instead of blocking (tests/validate/test_validate.py tests the gate)
    "--set",
    "validate.require_gain=false",
]


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    # the run's own ephemeral server and database, also when the session's real server (conftest
    # `prefect_server`) has put PREFECT_API_URL in os.environ
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(Path(sys.executable).parent / "transferkit"), "run", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)


@pytest.fixture(scope="module")
def flow_run(tiny_target, tiny_reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    p = _run(
        tmp,
        "--reference",
        str(tiny_reference),
        "--target",
        str(tiny_target),
        "--out",
        str(tmp / "run"),
        "--repo",
        str(tmp / "models"),
        *ARGS,
    )
    return tmp, p


def test_flow_runs_every_stage_and_ships_a_matching_onnx(flow_run, tiny_target):
    tmp, p = flow_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp / "run"
    for f in (
        "params.yaml",
        "drift/drift.json",
        "drift/drift.html",
        "select/ranking.json",
        "train/metrics.json",
        "train/model.safetensors",
        "train/validation.json",
        "train/no_transfer.json",
    ):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    validation = json.loads((run / "train" / "validation.json").read_text())
    assert validation["passed"] is True
    assert validation["transfer_gain"] == pytest.approx(
        metrics["test_accuracy"] - validation["baseline"]["test_accuracy"], abs=1e-6
    )
    if validation["verdict"] != "transfer helps":  # recorded, not blocking with require_gain=false
        assert validation["verdict_message"] in validation["warnings"]
    assert f"; {validation['verdict']}; gate passed" in p.stdout

    version = (tmp / "models" / "digits" / "latest").read_text().strip()
    vdir = tmp / "models" / "digits" / version
    meta = json.loads((vdir / "metadata.json").read_text())
    assert meta["source_model"] == "mobilenetv2_100" and meta["parity"]["max_abs_diff"] <= 1e-4
    # the drift verdict travels train -> metadata -> model card (what a reviewer reads before a deploy)
    drift = json.loads((run / "drift" / "drift.json").read_text())
    assert meta["shift"]["severity"] == drift["severity"] == metrics["shift"]["severity"]
    card = (vdir / "model_card.md").read_text()
    assert f"Domain shift: **{drift['severity']}** (detected: {drift['drift_detected']})" in card
    assert str(run / "drift" / "drift.html") in card

    # independent check: onnxruntime on the real test images agrees with the run's reported accuracy
    import onnxruntime as ort

    from transferkit.data.folder import load_dataset
    from transferkit.data.loader import make_loader
    from transferkit.models import zoo

    ds = load_dataset(tiny_target)
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    loader = make_loader(ds.splits["test"], zoo.eval_transform({**meta, "input_size": meta["input_size"]}), 64)
    correct = n = 0
    for x, y in loader:
        logits = sess.run(None, {"input": x.numpy()})[0]
        correct += int((np.argmax(logits, 1) == y.numpy()).sum())
        n += len(y)
    assert correct / n == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    out = p.stdout
    assert "transferkit run summary" in out and "shift" in out and "selected" in out and str(vdir / "model.onnx") in out


def test_flow_stops_at_a_failed_gate_and_exports_nothing(flow_run, tiny_target, tiny_reference):
    """Also the parallel select path: `select.runner=thread` scores through flows/select.py as a subflow
    (one `score` task per candidate, in the run's Prefect database) and ranks exactly like the first run."""
    import sqlite3

    tmp, _ = flow_run
    p = _run(
        tmp,
        "--reference",
        str(tiny_reference),
        "--target",
        str(tiny_target),
        "--out",
        str(tmp / "run2"),
        "--repo",
        str(tmp / "models2"),
        *ARGS,
        "--set",
        "validate.min_gain=1.0",
        "--set",
        "validate.require_gain=true",
        "--set",
        "select.runner=thread",
    )
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "transfer does not help here" in p.stderr and "nothing exported" in p.stderr
    # a refusal is the run's answer, not a crash: no traceback, and every flow run of it completed
    assert "Traceback" not in p.stdout + p.stderr and "ERROR" not in p.stdout + p.stderr
    assert not list((tmp / "models2").rglob("model.onnx")) if (tmp / "models2").exists() else True
    assert json.loads((tmp / "run2" / "train" / "validation.json").read_text())["passed"] is False

    with sqlite3.connect(tmp / "prefect" / "prefect.db") as db:
        tasks = [n for (n,) in db.execute("SELECT name FROM task_run")]
        flows = {n for (n,) in db.execute("SELECT name FROM flow")}
        states = {s for (s,) in db.execute("SELECT state_type FROM flow_run")}
    assert sum(n.startswith("score-") for n in tasks) == 2 and "select" in flows, (tasks, flows)
    assert states == {"COMPLETED"}, states
    first, second = (json.loads((tmp / r / "select" / "ranking.json").read_text()) for r in ("run", "run2"))
    assert second["selected"] == first["selected"]
    assert [(c["model"], c["logme"]) for c in second["candidates"]] == [
        (c["model"], c["logme"]) for c in first["candidates"]
    ]

"""flows/monitor.py against a real Prefect server: drift on served inputs emits transferkit.drift.detected.

    .venv/bin/pytest -q tests/flows/test_monitor.py

The real `prefect server start` of tests/conftest.py (`prefect_server`, shared with the orchestration
tests); the flow runs in a subprocess pointed at it (no ephemeral server), and the event is read back
through the server's events API. Served inputs: MNIST digits placed where `serve --monitor-dir` keeps its reservoir;
reference: the shared model's training data (sklearn digits), found through metadata.json -> run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from transferkit.flows.monitor import EVENT_DRIFT_DETECTED, drift_event, training_reference

pytestmark = pytest.mark.slow


def test_training_reference_and_event_shape(model_repo, tiny_target):
    assert training_reference(model_repo, "digits") == tiny_target
    ev = drift_event(
        "digits",
        2,
        {
            "drift_detected": True,
            "severity": "severe",
            "method": "m",
            "score": 0.9,
            "threshold": 0.5,
            "n_reference": 10,
            "n_current": 12,
            "views": {"embeddings": {"drifted": True}},
        },
        "r.html",
    )
    assert ev["event"] == EVENT_DRIFT_DETECTED == "transferkit.drift.detected"
    assert ev["resource"]["prefect.resource.id"] == "transferkit.model.digits"
    assert ev["payload"]["severity"] == "severe" and ev["payload"]["views"] == {"embeddings": True}


def test_drift_on_served_inputs_emits_the_event_to_a_real_server(prefect_server, model_repo, tiny_reference, tmp_path):
    from transferkit.orchestration.prefect import prefect_env

    monitor = tmp_path / "monitor"
    few = tmp_path / "few"
    (monitor / "digits" / "images").mkdir(parents=True)
    (few / "digits" / "images").mkdir(parents=True)
    for i, p in enumerate(sorted(tiny_reference.rglob("*.png"))[:40]):  # MNIST served to a digits model
        shutil.copy(p, monitor / "digits" / "images" / f"{i:06d}.png")
        if i < 3:
            shutil.copy(p, few / "digits" / "images" / f"{i:06d}.png")
    params = {"drift": {"min_samples": 5, "max_samples": 60}, "data": {"image_size": 32}}
    script = (
        "import json, sys; from transferkit.flows.monitor import monitor_flow; a = json.loads(sys.argv[1]); "
        "print('RESULT', json.dumps([monitor_flow(monitor_dir=m, **a) for m in a.pop('dirs')]))"
    )
    args = {
        "repo": str(model_repo),
        "name": "digits",
        "out": str(tmp_path / "out"),
        "params": params,
        "dirs": [str(few), str(monitor)],
    }
    env = prefect_env(prefect_server, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    skipped, drifted = json.loads(r.stdout.split("RESULT", 1)[1])
    assert skipped["status"] == "skipped" and skipped["n_current"] == 3 and skipped["event"] is None
    assert drifted["status"] == "drift" and drifted["drift_detected"] is True and drifted["event"]
    assert drifted["n_current"] == 40 and drifted["version"] == 2
    assert (Path(drifted["out"]) / "drift.json").is_file()

    found = []
    deadline = time.time() + 60
    while not found and time.time() < deadline:  # the server persists events asynchronously
        resp = httpx.post(
            f"{prefect_server}/events/filter",
            timeout=10,
            json={
                "filter": {"event": {"name": [EVENT_DRIFT_DETECTED]}, "resource": {"id": ["transferkit.model.digits"]}},
                "limit": 50,
            },
        )
        assert resp.status_code == 200, resp.text
        # this test's events (the server is shared): the skipped run must have emitted nothing
        found = [e for e in resp.json()["events"] if str(e["payload"].get("report", "")).startswith(str(tmp_path))]
        time.sleep(0.5)
    assert len(found) == 1, found
    ev = found[0]
    assert ev["id"] == drifted["event"]
    assert ev["resource"]["prefect.resource.id"] == "transferkit.model.digits"
    assert ev["payload"]["severity"] == drifted["severity"] and ev["payload"]["drift_detected"] is True
    assert ev["payload"]["n_current"] == 40 and ev["payload"]["version"] == 2

"""Orchestration for real: a Prefect server, a process worker, the repo's deployments, DVC-versioned data.

The event test is the user's path end to end: `python -m transferkit.flows.deployments` registers both deployments
on a real `prefect server start` (tests/conftest.py `prefect_server`), a real process worker polls the
pool, `transferkit data add` runs `dvc add` and emits `transferkit.dataset.updated`, and the server's
trigger starts `transferkit-retrain/on-new-data` with the event's md5. What the triggered run executes is
the real pipeline (select -> train -> validate -> export -> promote) on the tiny digits slice at 64 px,
3 epochs, one candidate, no drift/int8 (deployment parameter `overrides`): about a minute on 2 cores.
Then the closed loop: a run of the scheduled `transferkit-monitor/served-drift` deployment finds MNIST in
the serving reservoir of the digits model, emits `transferkit.drift.detected`, and the server's trigger
starts `transferkit-retrain/nightly`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from transferkit.orchestration.prefect import ensure_pool, prefect_env, start_worker, stop

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "tk-test-pool"
MONITOR = {"params": {"drift": {"min_samples": 5, "max_samples": 60}, "data": {"image_size": 32}}}
# flow mechanics, not the gate: the negative-transfer verdict is recorded, not blocking (raw pixels win on tiny digits)
OVERRIDES = {
    "data.image_size": 64,
    "train.epochs": 3,
    "train.patience": 3,
    "train.search_mode": "rule",  # auto = the fixed rule: the search (test_train.py) would add minutes here
    "export.int8": False,
    "export.opset": 17,
    "validate.require_gain": False,
}


def _sh(cmd: list, cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _api(url: str, path: str, body: dict | None = None):
    """One REST call. A 503 (SQLite busy while the worker writes) is retried, as Prefect's own client does."""
    for attempt in range(6):
        req = urllib.request.Request(
            url + path,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
            method="POST" if body is not None else "GET",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503) or attempt == 5:
                raise
            time.sleep(2**attempt)


def _runs(url: str, deployment_id: str, since: datetime | None = None) -> list[dict]:
    """Flow runs of a deployment; with `since`, only those created after it that are due within an hour
    (the cron schedule's future runs are excluded)."""
    runs = _api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC"})
    if since is None:
        return runs
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    return [
        r
        for r in runs
        if datetime.fromisoformat(r["created"]) >= since and datetime.fromisoformat(r["expected_start_time"]) < soon
    ]


def _wait_terminal(
    url: str, deployment_id: str, n: int, timeout: float, log: Path, since: datetime | None = None
) -> list[dict]:
    """Wait until the deployment has N flow runs and all are in a terminal state."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        runs = _runs(url, deployment_id, since)
        if len(runs) >= n and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return sorted(runs, key=lambda r: r["created"])
        time.sleep(2)
    raise AssertionError(
        f"no {n} finished runs after {timeout:.0f} s: {[(r['name'], r['state_type']) for r in runs]}\n"
        f"worker log:\n{log.read_text()[-4000:] if log.exists() else ''}"
    )


def _ws(tmp: Path, target: Path, env: dict) -> Path:
    """A git + DVC project holding the digits slice as `digits/` (not yet `dvc add`ed)."""
    ws = tmp / "ws"
    ws.mkdir()
    _sh(["git", "init", "-q"], ws, env)
    _sh([BIN / "dvc", "init", "-q"], ws, env)
    _sh([BIN / "dvc", "config", "core.analytics", "false"], ws, env)
    shutil.copytree(target, ws / "digits")
    return ws


@pytest.fixture(scope="module")
def deployed(prefect_server, tiny_target, tiny_reference, tmp_path_factory):
    """Deployments registered from the repo's flows/deployments.py, a process worker on their pool."""
    tmp = tmp_path_factory.mktemp("orch")
    env = prefect_env(prefect_server)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    ws = _ws(tmp, tiny_target, env)
    ensure_pool(env, POOL)
    params = {
        "target": str(ws / "digits"),
        "reference": None,
        "out_root": str(ws / "runs"),
        "repo": str(ws / "models"),
        "candidates": ["mobilenetv2_100"],
        "params_file": None,
        "overrides": OVERRIDES,
    }
    monitor = {**MONITOR, "out": str(ws / "runs" / "monitor")}
    _sh(
        [
            sys.executable,
            "-m",
            "flows.deployments",
            "--pool",
            POOL,
            "--dataset",
            ws / "digits",
            "--model",
            "digits",
            "--parameters",
            json.dumps(params),
            "--monitor-dir",
            ws / "monitor",
            "--monitor-parameters",
            json.dumps(monitor),
        ],
        ROOT,
        env,
    )
    log = tmp / "worker.log"
    worker = start_worker(env, POOL, log=log, poll_seconds=2, cwd=ws)
    try:
        yield {"url": prefect_server, "ws": ws, "env": env, "log": log, "reference": tiny_reference}
    finally:
        stop(worker)


def test_cron_schedule_and_triggers_are_registered(deployed):
    url = deployed["url"]
    nightly = _api(url, "/deployments/name/transferkit-retrain/nightly")
    assert nightly["work_pool_name"] == POOL
    crons = [s["schedule"].get("cron") for s in nightly["schedules"] if s["active"]]
    assert crons == ["0 3 * * *"]
    assert nightly["parameters"]["overrides"] == OVERRIDES  # flow parameters reach the deployment

    autos = {a["name"]: a for a in _api(url, "/automations/filter", {})}
    on_data, on_drift = autos["retrain on new digits data"], autos["retrain digits on drift"]
    assert on_data["trigger"]["expect"] == ["transferkit.dataset.updated"]
    assert on_data["trigger"]["match"] == {"prefect.resource.id": "transferkit.dataset.digits"}
    assert on_drift["trigger"]["expect"] == ["transferkit.drift.detected"]
    assert on_drift["trigger"]["match"] == {"prefect.resource.id": "transferkit.model.digits"}
    new_data = _api(url, "/deployments/name/transferkit-retrain/on-new-data")
    assert on_data["actions"][0]["deployment_id"] == new_data["id"]
    assert on_drift["actions"][0]["deployment_id"] == nightly["id"]
    assert "event.payload.md5" in json.dumps(on_data["actions"][0]["parameters"])

    monitor = _api(url, "/deployments/name/transferkit-monitor/served-drift")
    assert monitor["work_pool_name"] == POOL
    assert [s["schedule"].get("cron") for s in monitor["schedules"] if s["active"]] == ["*/30 * * * *"]
    mp = monitor["parameters"]
    assert mp["name"] == "digits" and mp["repo"] == str(deployed["ws"] / "models")
    assert mp["monitor_dir"] == str(deployed["ws"] / "monitor") and mp["params"] == MONITOR["params"]


def test_prefect_ui_shows_the_deployments_in_a_real_browser(deployed, browser):
    """The UI of a server on a port other than 4200 talks to its own API (PREFECT_UI_API_URL)."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(deployed["url"].removesuffix("/api") + "/deployments", timeout=60_000)
    # deployment names, then their flows' names (the UI fetches those with a second request)
    for name in ("nightly", "on-new-data", "served-drift", "transferkit-retrain", "transferkit-monitor"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    assert "Can't connect to Server API" not in page.inner_text("body")


@pytest.mark.slow
def test_new_data_event_triggers_a_retrain_that_ships_a_model_for_that_md5(deployed):
    url, ws, env, log = deployed["url"], deployed["ws"], deployed["env"], deployed["log"]
    dep = _api(url, "/deployments/name/transferkit-retrain/on-new-data")
    assert _runs(url, dep["id"]) == []

    p = _sh([BIN / "transferkit", "data", "add", ws / "digits"], ws, env)
    md5 = yaml.safe_load((ws / "digits.dvc").read_text())["outs"][0]["md5"]
    assert md5 in p.stdout and "event" in p.stdout

    (run,) = _wait_terminal(url, dep["id"], 1, 300, log)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["parameters"]["data_md5"] == md5  # rendered from the event by the server's trigger
    assert "transferkit.dataset.digits" in run["parameters"]["reason"]
    rec = json.loads(next((ws / "runs").glob(f"*-{md5[:8]}/retrain.json")).read_text())
    assert rec["data_md5"] == md5 and rec["flow_run_id"] == run["id"] and rec["skipped"] is False
    assert rec["live"] == rec["version"] == 1
    meta = json.loads((ws / "models" / "digits" / "1" / "metadata.json").read_text())
    assert meta["params"]["train"]["epochs"] == 3  # the flow-parameter overrides were used
    assert (ws / "models" / "digits" / "latest").read_text().strip() == "1"
    (sub,) = _api(url, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    assert sub["state_type"] == "COMPLETED"  # transfer_pipeline ran as a subflow
    arts = _api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"], sub["id"]]}}})
    # no reference: no drift; the workspace is a DVC repository: the version was recorded before promotion
    assert {a["key"] for a in arts} == {"select", "validate", "validate-errors", "export", "dvc", "promote", "timings"}
    link = next(a["data"] for a in arts if a["key"] == "validate-errors")  # "[text](file:///.../errors.html)"
    errors = Path(link.rpartition("](file://")[2].rstrip(")"))
    assert errors.name == "errors.html" and errors.is_file()
    assert "digits v1" in next(a["data"] for a in arts if a["key"] == "promote")

    # the closed loop: MNIST digits in the model server's reservoir (what `serve --monitor-dir` keeps) of a
    # model trained on sklearn digits; one run of the scheduled monitor deployment, on the worker, detects
    # the drift and emits transferkit.drift.detected, and the server's trigger starts the nightly retrain
    images = ws / "monitor" / "digits" / "images"
    images.mkdir(parents=True)
    for i, png in enumerate(sorted(deployed["reference"].rglob("*.png"))[:40]):
        shutil.copy(png, images / f"{i:06d}.png")
    monitor = _api(url, "/deployments/name/transferkit-monitor/served-drift")
    nightly = _api(url, "/deployments/name/transferkit-retrain/nightly")
    since = datetime.now(timezone.utc)
    _api(url, f"/deployments/{monitor['id']}/create_flow_run", {})
    (mon_run,) = _wait_terminal(url, monitor["id"], 1, 240, log, since=since)
    assert mon_run["state_type"] == "COMPLETED", mon_run["state"]
    (report,) = (ws / "runs" / "monitor" / "digits").glob("*/drift.json")
    verdict = json.loads(report.read_text())
    assert verdict["drift_detected"] is True and verdict["n_current"] == 40
    assert Path(verdict["reference"]) == ws / "digits"  # the live model's training data, found via its metadata
    # the live model was built from this very data, params and code, so the drift-started retrain completes
    # without training (skip_unchanged) and says that new labelled data is what it needs
    (drift_run,) = _wait_terminal(url, nightly["id"], 1, 180, log, since=since)
    assert drift_run["state_type"] == "COMPLETED", drift_run["state"]
    assert drift_run["parameters"]["reason"].startswith("drift detected on served inputs of transferkit.model.digits")
    rec = next(
        json.loads(f.read_text())
        for f in (ws / "runs").glob("*/retrain.json")
        if json.loads(f.read_text())["flow_run_id"] == drift_run["id"]
    )
    assert rec["deployment"] == "nightly" and rec["skipped"] is True and rec["version"] == 1
    assert "would rebuild the same model" in rec["skip_reason"] and "data add" in rec["skip_reason"]
    assert rec["data_md5"] == md5 and not (ws / "models" / "digits" / "2").exists()


# --------------------------------------------------------------------------- new-data detection (no server)


def test_content_md5_ignores_mtimes_and_copies_but_sees_one_byte(tiny_target, tmp_path):
    from transferkit.orchestration.watch import content_md5

    a = shutil.copytree(tiny_target, tmp_path / "a")
    md5, n = content_md5(a)
    assert n == sum(1 for p in Path(tiny_target).rglob("*") if p.is_file())
    for p in a.rglob("*"):
        os.utime(p, (1, 1))  # mtimes change, contents do not
    assert content_md5(a)[0] == md5
    b = shutil.copytree(a, tmp_path / "b")
    assert content_md5(b)[0] == md5
    img = sorted(b.rglob("*.png"))[0]
    data = bytearray(img.read_bytes())
    data[-1] ^= 1
    img.write_bytes(bytes(data))
    edited = content_md5(b)[0]
    assert edited != md5
    img.rename(img.with_name("renamed.png"))  # same bytes, another name: another dataset
    assert content_md5(b)[0] not in (md5, edited)


def test_watch_once_versions_changes_only_and_data_add_refuses_a_non_dvc_folder(tiny_target, tmp_path):
    env = {k: v for k, v in prefect_env().items() if k != "PREFECT_API_URL"}  # no server: version only
    env["PATH"] = f"{BIN}:{env['PATH']}"
    ws = _ws(tmp_path, tiny_target, env)
    tk = BIN / "transferkit"

    first = _sh([tk, "watch", "digits", "--once"], ws, env).stdout
    assert " changed: " in first and "no event (PREFECT_API_URL not set)" in first
    md5_1 = yaml.safe_load((ws / "digits.dvc").read_text())["outs"][0]["md5"]
    again = _sh([tk, "watch", "digits", "--once"], ws, env).stdout
    assert " unchanged " in again and " changed: " not in again  # state kept between --once runs

    img = sorted((ws / "digits").rglob("*.png"))[0]
    img.write_bytes(sorted((ws / "digits").rglob("*.png"))[1].read_bytes())  # real content change
    third = _sh([tk, "watch", "digits", "--once"], ws, env).stdout
    md5_2 = yaml.safe_load((ws / "digits.dvc").read_text())["outs"][0]["md5"]
    assert " changed: " in third and md5_2 != md5_1 and md5_2 in third

    plain = tmp_path / "plain"
    shutil.copytree(tiny_target, plain)
    p = _sh([tk, "data", "add", plain], tmp_path, env, ok=False)
    assert p.returncode == 1 and "not inside a DVC repository" in p.stderr and str(plain) in p.stderr
    assert not (tmp_path / "plain.dvc").exists()


def test_io_tasks_retry_on_io_errors_only(prefect_server):
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from transferkit.flows.pipeline import check_data_task, dvc_task, export_task, promote_task

    from transferkit.orchestration.policy import retry_on_io_error as _io_error

    for t in (check_data_task, export_task, promote_task, dvc_task):
        assert t.retries == 3 and t.retry_condition_fn is _io_error, t.name
    calls = {"io": 0, "value": 0}

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=_io_error)
    def flaky_io():
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError("transient: remote busy")
        return "ok"

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=_io_error)
    def bad_input():
        calls["value"] += 1
        raise ValueError("params field 'train.epochs': bad")

    @flow
    def probe():
        return flaky_io(), bad_input(return_state=True)

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        value, state = probe()
        APILogWorker.drain_all(timeout=30)  # send the logs now, not at exit after the server is gone
        EventsWorker.drain_all(timeout=30)
    assert value == "ok" and calls["io"] == 3
    assert state.is_failed() and calls["value"] == 1  # deterministic errors are not retried


def test_image_deployments_in_prefect_yaml_match_the_flows():
    """deploy/prefect/prefect.yaml (Docker/Kubernetes pools) cannot be deployed here (no engine), but what
    `prefect deploy` reads from it can be checked: entrypoints load, parameters are the flows' own."""
    import inspect

    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    doc = yaml.safe_load((ROOT / "deploy" / "prefect" / "prefect.yaml").read_text())
    names = set()
    for d in doc["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        accepted = set(inspect.signature(flow.fn).parameters)
        given = set(d.get("parameters") or {})
        for trig in d.get("triggers") or []:
            given |= set(trig.get("parameters") or {})
        assert given <= accepted, (d["name"], given - accepted)
        for s in d.get("schedules") or []:
            Cron(s["cron"], timezone=s["timezone"])  # raises on a bad expression
        mounts = [v.split(":")[1] for v in d["work_pool"]["job_variables"].get("volumes", [])]
        assert all(m.startswith("/opt/transferkit/") for m in mounts), mounts  # where the pull step runs flows
        if "dataset" in (d.get("parameters") or {}) and mounts:
            assert "/opt/transferkit/data.dvc" in mounts, d["name"]  # check_data reads the DVC record
        names.add((flow.name, d["name"]))
    assert {n for n, _ in names} == {"transferkit-retrain", "transferkit-monitor"}
    assert doc["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/transferkit"


@pytest.mark.slow
def test_transferkit_server_starts_registers_serves_the_ui_and_stops(tmp_path):
    """`transferkit server` (= make server) as a user runs it: server, pool, deployments, worker; a second
    one on the same port is refused with a clear message; SIGTERM stops everything and frees the port."""
    import signal
    import socket

    from transferkit.core.procs import free_port

    port, home, out = free_port(), tmp_path / "home", tmp_path / "server.out"
    env = {k: v for k, v in prefect_env(home=home).items() if k != "PREFECT_API_URL"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    cmd = [str(BIN / "transferkit"), "server", "--port", str(port), "--home", str(home), "--pool", "tk-server-test"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 400
        while "process worker polling" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(1)
        deps = _api(api, "/deployments/filter", {})
        assert {d["name"] for d in deps} == {"nightly", "on-new-data", "served-drift"}
        assert {d["work_pool_name"] for d in deps} == {"tk-server-test"}
        settings = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=30).read())
        assert settings["api_url"] == api  # the UI calls this server, not the default port 4200
        workers = []
        while not workers and time.monotonic() < deadline:  # the worker's first heartbeat
            workers = _api(api, "/work_pools/tk-server-test/workers/filter", {})
            time.sleep(1)
        assert workers, out.read_text()[-3000:]

        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "already in use" in second.stderr, second.stdout + second.stderr
        assert _api(api, "/health") is True  # the first one is untouched
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, out.read_text()[-3000:]
    with socket.socket() as s:  # the server is gone: its port can be listened on again (as uvicorn binds)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()

"""DVC: the repo's dvc.yaml runs every stage with real `dvc` commands, and a second repro is a no-op."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _sh(cmd: list, cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
TK = BIN / "transferkit"


def test_the_repositorys_dvc_yaml_is_the_flows_stage_wiring():
    """dvc.yaml is written from transferkit.orchestration.workspace.pipeline, the table the flow's folders come from:
    `dvc repro` and the Prefect flow cannot drift apart (regenerate with `transferkit dvc-yaml --write dvc.yaml`)."""
    from transferkit.orchestration.workspace import dvc_yaml_text

    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml_text("data/clipart", "runs/dvc", "models")
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in doc["stages"].items():  # each stage lists its own subpackage and the CLI verb of its name
        assert (
            stage["cmd"].startswith(f"transferkit {name} ") and f"src/transferkit/{name}/__init__.py" in stage["deps"]
        )


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_committed_dvc_lock_was_recorded_from_the_code_in_this_tree():
    """Every code file a stage of the committed dvc.lock depends on has the md5 recorded there, and every stage of
    dvc.yaml is in it with the same code deps: a fresh clone's `dvc status` does not start out of date (after a
    stage's code changes, `make demo` or `dvc repro` and commit dvc.lock)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(lock) == set(spec)
    stale = []
    for name, stage in lock.items():
        code = {d["path"]: d["md5"] for d in stage["deps"] if d["path"].startswith(("src/", "flows/"))}
        assert set(code) == {d for d in spec[name]["deps"] if d.startswith(("src/", "flows/"))}, name
        stale += [f"{name}: {p}" for p, md5 in code.items() if _md5(ROOT / p) != md5]
    assert stale == [], f"dvc.lock is older than these files: {stale}"


@pytest.fixture(scope="module")
def dvc_ws(tiny_target, prefect_server, tmp_path_factory):
    """A git + DVC project like the repository (dvc.yaml from the same wiring, for the digits slice; no
    reference, like the repository's clipart pipeline) where `transferkit run` (the demo's clipart command)
    ran the Prefect flow on a real server."""
    from transferkit.orchestration.prefect import prefect_env
    from transferkit.orchestration.workspace import dvc_yaml_text

    tmp = tmp_path_factory.mktemp("dvcws")
    env = prefect_env(prefect_server)
    env.update(PATH=f"{BIN}:{env['PATH']}", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")  # the checkout under test
    ws = tmp / "ws"
    ws.mkdir()
    for code in ("src", "flows"):  # the stages' code deps (select's runner choice is in flows/select.py)
        shutil.copytree(ROOT / code, ws / code, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (ws / "dvc.yaml").write_text(dvc_yaml_text("data/target", "runs/dvc", "models"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["image_size"] = 32
    params["train"].update(epochs=4, patience=4, min_epochs=0)
    params["select"].update(candidates=["mobilenetv2_100"], confirm=0)
    # DVC mechanics, not the gate: raw pixels beat the tiny probe and its train-val gap is large; recorded,
    # not blocking (a refused run is recorded the same way: the stages are committed, nothing is exported)
    params["validate"].update(require_gain=False, max_gap=0.6, no_transfer=["pixels-logreg"])
    params["export"].update(int8=False)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_target, ws / "data" / "target")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "t"],
        [DVC, "init", "-q"],
        [DVC, "config", "core.analytics", "false"],
        [DVC, "remote", "add", "-d", "local", tmp / "remote"],
        [DVC, "add", "-q", "data"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "data and pipeline"],
    ):
        _sh(cmd, ws, env)
    p = _sh(
        [TK, "run", "--target", "data/target", "--out", "runs/dvc", "-q"],
        ws,
        env,
    )
    return {"ws": ws, "env": env, "tmp": tmp, "params": params, "run": p}


def _live(ws: Path) -> tuple[int, dict]:
    v = int((ws / "models" / "target" / "latest").read_text())
    return v, json.loads((ws / "models" / "target" / str(v) / "metadata.json").read_text())


def test_after_the_flow_dvc_status_is_clean_and_the_live_model_is_in_the_cache(dvc_ws):
    ws, env = dvc_ws["ws"], dvc_ws["env"]
    out = dvc_ws["run"].stdout
    assert "stages select, train, validate, export committed" in out, out[-2000:]
    assert json.loads(_sh([DVC, "status", "--json"], ws, env).stdout.strip() or "{}") == {}
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"select", "train", "validate", "export"}
    assert (
        lock["stages"]["validate"]["params"]["params.yaml"]["validate"]["max_gap"]
        == dvc_ws["params"]["validate"]["max_gap"]
    )
    version, meta = _live(ws)
    assert version == 1
    onnx = ws / "models" / "target" / "1" / "model.onnx"
    assert meta["sha256"] == __import__("hashlib").sha256(onnx.read_bytes()).hexdigest()
    for f in (onnx, onnx.with_name("metadata.json"), onnx.with_name("model_card.md"), onnx.parent.parent / "latest"):
        md5 = _md5(f)
        assert (ws / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file(), f  # in DVC's cache
    # the data it was trained on is DVC's data.dvc, and the metadata names that content
    assert meta["data_md5"] and (ws / "data.dvc").is_file()

    again = _sh([DVC, "repro"], ws, env).stdout  # what the flow made is what `dvc repro` would make
    assert "Running stage" not in again and len(list((ws / "models").rglob("model.onnx"))) == 1


def test_editing_a_module_a_stage_imports_makes_dvc_status_report_that_stage(dvc_ws):
    """Stage deps are derived from the imports: the train stage's default linear probe lives in its own
    subpackage (train/probe.py) and its features come from models/embed.py, outside it; editing either must leave
    train stale, and exactly the stages whose code imports the file."""
    from transferkit.orchestration.workspace import stage_code

    ws, env = dvc_ws["ws"], dvc_ws["env"]
    lock_stages = set(yaml.safe_load((ws / "dvc.lock").read_text())["stages"])
    for module in ("train/probe.py", "models/embed.py"):
        dep = f"src/transferkit/{module}"
        assert dep in stage_code("train")
        path = ws / dep
        before = path.read_bytes()
        try:
            path.write_bytes(before + b"\n# an edit DVC must see\n")
            status = json.loads(_sh([DVC, "status", "--json"], ws, env).stdout.strip() or "{}")
        finally:
            path.write_bytes(before)
        stale = {s for s, changes in status.items() if any(dep in c.get("changed deps", {}) for c in changes)}
        assert stale == {s for s in lock_stages if dep in stage_code(s)}, (module, status)
        assert "train" in stale and "drift" not in stale
    assert json.loads(_sh([DVC, "status", "--json"], ws, env).stdout.strip() or "{}") == {}


def test_a_second_run_in_the_same_workspace_is_refused_and_writes_nothing(dvc_ws):
    """While one process holds the workspace (here: the test, as a running flow would), another
    `transferkit run` is refused with a clear message before it writes anything, and `dvc repro` too."""
    from transferkit.orchestration.workspace import Workspace

    ws, env = dvc_ws["ws"], dvc_ws["env"]
    before = (ws / "dvc.lock").read_bytes()
    with Workspace(ws):
        p = _sh([TK, "run", "--target", "data/target", "--out", "runs/second", "-q"], ws, env, ok=False)
        repro = _sh([DVC, "repro"], ws, env, ok=False)
    assert p.returncode == 75, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"the DVC workspace {ws} is in use by another DVC process" in p.stderr and "serialised" in p.stderr
    assert not (ws / "runs" / "second").exists() and (ws / "dvc.lock").read_bytes() == before
    assert repro.returncode != 0 and "Unable to acquire lock" in repro.stderr


def test_dvc_exp_run_flips_the_gate_and_changes_the_exported_opset(dvc_ws):
    ws, env, params = dvc_ws["ws"], dvc_ws["env"], dvc_ws["params"]
    _sh(["git", "add", "-A"], ws, env)
    _sh(["git", "commit", "-qm", "first run"], ws, env)
    first = json.loads((ws / "runs" / "dvc" / "train" / "validation.json").read_text())
    versions = sorted(int(p.name) for p in (ws / "models" / "target").iterdir() if p.name.isdigit())
    assert first["passed"] is True

    # a stricter gap: validate re-runs with it (not with train's params.yaml record) and refuses;
    # the stage records the verdict, export publishes nothing, the experiment completes
    out = _sh([DVC, "exp", "run", "-n", "strict", "-S", "validate.max_gap=0.01"], ws, env).stdout
    assert "Running stage 'validate'" in out and "Running stage 'train'" not in out
    strict = json.loads((ws / "runs" / "dvc" / "train" / "validation.json").read_text())
    assert strict["passed"] is False and strict["thresholds"]["max_gap"] == 0.01
    assert any("overfit" in r or "gap" in r for r in strict["reasons"]), strict["reasons"]
    assert sorted(int(p.name) for p in (ws / "models" / "target").iterdir() if p.name.isdigit()) == versions

    gap = params["validate"]["max_gap"]
    out = _sh([DVC, "exp", "run", "-n", "opset17", "-S", f"validate.max_gap={gap}", "-S", "export.opset=17"], ws, env)
    assert "Running stage 'export'" in out.stdout
    version, meta = _live(ws)
    assert version == versions[-1] + 1 and meta["opset"] == 17 and meta["params"]["export"]["opset"] == 17
    import onnx

    proto = onnx.load(str(ws / "models" / "target" / str(version) / "model.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17

    # the experiments side by side: params and the stage metrics per experiment (README: "Experiments")
    show = json.dumps(json.loads(_sh([DVC, "exp", "show", "--json"], ws, env).stdout))
    assert '"strict"' in show and '"opset17"' in show and "validation.json" in show and "max_gap" in show
    diff = json.loads(_sh([DVC, "exp", "diff", "strict", "opset17", "--json"], ws, env).stdout)
    assert diff["params"]["params.yaml"]["export.opset"] == {"old": 18, "new": 17, "diff": -1}
    assert diff["params"]["params.yaml"]["validate.max_gap"]["old"] == 0.01


def test_a_retrain_that_promotes_a_new_version_is_pushed_and_a_fresh_clone_pulls_its_bytes(dvc_ws, monkeypatch):
    """The deployments' flow (retrain, here started directly on the real server) with push=True: the new
    version is in the cache and on the remote before latest moves; a git clone + `dvc pull` serves exactly it."""
    import hashlib

    from prefect.settings import PREFECT_API_URL, temporary_settings
    from transferkit.flows.pipeline import retrain

    ws, env, tmp = dvc_ws["ws"], dvc_ws["env"], dvc_ws["tmp"]
    before, _ = _live(ws)
    monkeypatch.chdir(ws)  # a worker runs deployments from the workspace root
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        r = retrain(
            target="data/target",
            reference=None,
            dataset="data",
            repo="models",
            out_root="runs/retrain",
            overrides={"train.epochs": 3},
            push=True,
            reason="test",
        )
    assert r["skipped"] is False and r["version"] == r["live"] == before + 1 and r["pushed"] is True
    history = [json.loads(x) for x in (ws / "models" / "target" / "promotions.jsonl").read_text().splitlines()]
    assert history[-1]["version"] == r["version"] and history[-1]["reason"].startswith("retrain ")
    assert json.loads(_sh([DVC, "status", "--json"], ws, env).stdout.strip() or "{}") == {}
    assert "in sync" in _sh([DVC, "status", "-c"], ws, env).stdout  # everything is on the remote

    _sh(["git", "add", "-A"], ws, env)
    _sh(["git", "commit", "-qm", "retrain"], ws, env)
    clone = tmp / "clone"
    _sh(["git", "clone", "-q", ws, clone], tmp, env)
    _sh([DVC, "pull"], clone, env)
    version, meta = _live(clone)
    assert version == r["version"]
    vdir = clone / "models" / "target" / str(version)
    assert hashlib.sha256((vdir / "model.onnx").read_bytes()).hexdigest() == meta["sha256"]
    for f in (ws / "models" / "target" / str(version)).iterdir():  # byte for byte, every file of the version
        assert (vdir / f.name).read_bytes() == f.read_bytes(), f.name


def test_dvc_push_and_pull_through_a_local_s3_compatible_server(tiny_target, tmp_path):
    """The documented S3 remote (deploy/prefect/README.md) against moto's S3 server on loopback: push puts
    DVC's content-addressed objects in the bucket, and a clone with no cache gets the same bytes back."""
    import hashlib
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, **creds, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{k.lower(): v for k, v in creds.items() if "KEY" in k},
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="transferkit")

        ws = tmp_path / "ws"
        shutil.copytree(tiny_target / "train", ws / "data")
        originals = {p.relative_to(ws): hashlib.md5(p.read_bytes()).hexdigest() for p in ws.rglob("*") if p.is_file()}
        dvc = str(bin_dir / "dvc")
        _sh(["git", "init", "-q"], ws, env)
        for cmd in (
            ["init", "-q"],
            ["config", "core.analytics", "false"],
            ["add", "-q", "data"],
            ["remote", "add", "-d", "s3", "s3://transferkit/dvc"],
            ["remote", "modify", "s3", "endpointurl", endpoint],
            ["push"],
        ):
            _sh([dvc, *cmd], ws, env)

        keys = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="transferkit")
            for o in page.get("Contents", [])
        ]
        # content-addressed: one object per distinct file (files/md5/xx/yyyy...) plus the folder's .dir listing
        stored = {k.split("/files/md5/")[1].replace("/", "") for k in keys if "/files/md5/" in k}
        assert set(originals.values()) <= stored
        assert any(k.endswith(".dir") for k in keys)

        shutil.rmtree(ws / "data")
        shutil.rmtree(ws / ".dvc" / "cache")
        _sh([dvc, "pull"], ws, env)
        pulled = {
            p.relative_to(ws): hashlib.md5(p.read_bytes()).hexdigest() for p in (ws / "data").rglob("*") if p.is_file()
        }
        assert pulled == originals
        assert "in sync" in _sh([dvc, "status", "-c"], ws, env).stdout
    finally:
        server.stop()


def test_a_git_ignored_model_repository_is_reported_not_recorded(tmp_path):
    """A run in an ignored folder of a DVC workspace (a scratch dir in a checkout) exported its model and
    then failed with dvc's FileIsGitIgnored traceback; now the ignored path is left unrecorded, the rest not."""
    from transferkit.orchestration.workspace import Workspace

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _sh(["git", "init", "-q"], tmp_path, env)
    _sh([DVC, "init", "-q"], tmp_path, env)
    (tmp_path / ".gitignore").write_text("scratch/\n")
    for d in ("scratch/models", "models"):
        (tmp_path / d / "m" / "1").mkdir(parents=True)
        (tmp_path / d / "m" / "1" / "model.onnx").write_bytes(b"onnx bytes")
    with Workspace(tmp_path) as ws:
        assert ws.record(tmp_path / "scratch" / "models") is None
        assert ws.record(tmp_path / "models") == "models.dvc"
    assert not (tmp_path / "scratch" / "models.dvc").exists()
    assert yaml.safe_load((tmp_path / "models.dvc").read_text())["outs"][0]["path"] == "models"

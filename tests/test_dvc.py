"""DVC: the repo's dvc.yaml runs every stage with real `dvc` commands, and a second repro is a no-op."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_dvc_repro_runs_the_pipeline_and_is_then_up_to_date(tiny_target, tiny_reference, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(ROOT / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["image_size"] = 64
    params["train"].update(epochs=8, patience=8, min_epochs=0)
    params["drift"]["min_samples"] = 5
    params["validate"]["require_gain"] = False  # DVC mechanics: raw pixels beat the tiny probe; recorded, not blocking
    params["select"]["candidates"] = ["mobilenetv2_100", "scratch:mobilenetv2_100"]
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_reference, ws / "data" / "reference")
    shutil.copytree(tiny_target, ws / "data" / "target")

    _sh(["git", "init", "-q"], ws, env)
    _sh([str(bin_dir / "dvc"), "init", "-q"], ws, env)
    _sh([str(bin_dir / "dvc"), "config", "core.analytics", "false"], ws, env)
    _sh([str(bin_dir / "dvc"), "add", "-q", "data"], ws, env)
    _sh([str(bin_dir / "dvc"), "repro"], ws, env)

    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"drift", "select", "train", "validate", "export"}
    onnx = list((ws / "models").rglob("model.onnx"))
    assert len(onnx) == 1
    metrics = json.loads(_sh([str(bin_dir / "dvc"), "metrics", "show", "--json"], ws, env).stdout)
    text = json.dumps(metrics)
    assert "test_accuracy" in text and "drift_detected" in text and "transfer_gain" in text

    plots = _sh([str(bin_dir / "dvc"), "plots", "show", "-o", str(tmp_path / "plots")], ws, env).stdout
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "index.html" in plots and "learning-curve-accuracy" in html and "confusion-test" in html

    # the repo's remote is a folder (.dvc/config); here one outside the workspace: push, then in sync
    _sh([str(bin_dir / "dvc"), "remote", "add", "-d", "local", str(tmp_path / "remote")], ws, env)
    _sh([str(bin_dir / "dvc"), "push"], ws, env)
    assert "in sync" in _sh([str(bin_dir / "dvc"), "status", "-c"], ws, env).stdout
    assert any((tmp_path / "remote").rglob("*"))

    status = _sh([str(bin_dir / "dvc"), "status", "--json"], ws, env).stdout.strip()
    assert json.loads(status or "{}") == {}
    again = _sh([str(bin_dir / "dvc"), "repro"], ws, env).stdout
    assert "didn't change, skipping" in again or "up to date" in again.lower()
    assert "Running stage" not in again
    assert len(list((ws / "models").rglob("model.onnx"))) == 1  # nothing retrained or re-exported

    # a changed param re-runs only what depends on it
    params["validate"]["max_gap"] = 0.99
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    out = _sh([str(bin_dir / "dvc"), "repro"], ws, env).stdout
    assert "Running stage 'validate'" in out and "Running stage 'train'" not in out


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

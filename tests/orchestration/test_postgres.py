"""`transferkit server --database`: a real Prefect server on a throwaway PostgreSQL (initdb on loopback in a temp
folder, pg_trgm created) takes 8 flow runs at once, every one COMPLETED with no lock error; bad URLs are one
line and exit 1. The same workload against SQLite is measured by bench/prefect_db.py (docs/scaling.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from transferkit.core.procs import free_port
from transferkit.orchestration import database
from transferkit.orchestration.prefect import prefect_env, stop, wait_healthy

pytestmark = pytest.mark.skipif(
    not database.available(), reason="PostgreSQL server binaries missing, or root without a postgres user to run them"
)
TK = str(Path(sys.executable).parent / "transferkit")
LOCK_ERRORS = ("database is locked", "OperationalError", "deadlock detected")


@pytest.fixture
def postgres():
    # not under pytest's tmp_path: as root the cluster runs as the `postgres` user, who must reach the folder
    with tempfile.TemporaryDirectory(prefix="tk-pg-") as tmp:
        Path(tmp).chmod(0o711)  # enterable, not listable
        with database.local_cluster(Path(tmp) / "cluster", free_port()) as url:
            yield url


def test_server_on_postgres_completes_eight_concurrent_flow_runs(postgres, tmp_path):
    port = free_port()
    cmd = [TK, "server", "--database", postgres, "--no-deploy", "--port", str(port), "--home", str(tmp_path / "home")]
    srv = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api, 240, srv)
        load = Path(__file__).parents[1] / "prefect_load.py"
        r = subprocess.run(
            [sys.executable, str(load), "8", "4"], env=prefect_env(api), capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        stop(srv)
    assert res["errors"] == []
    assert res["server_states"] == ["COMPLETED"] * 8  # as the server recorded them in PostgreSQL
    log = (tmp_path / ".prefect-logs" / "server.log").read_text()
    assert not [e for e in LOCK_ERRORS if e in log + r.stderr]
    # the server really used PostgreSQL: its tables are there
    import asyncio

    import asyncpg

    async def tables() -> int:
        conn = await asyncpg.connect(postgres)
        try:
            return await conn.fetchval("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
        finally:
            await conn.close()

    assert asyncio.run(tables()) == 8


@pytest.mark.parametrize(
    "url, says",
    [
        (
            "postgresql://prefect:s3cret@127.0.0.1:{port}/prefect",
            "cannot use postgresql+asyncpg://prefect:***@127.0.0.1",
        ),
        ("mysql://prefect:s3cret@db/prefect", "expected a postgresql://"),
    ],
)
def test_server_refuses_a_database_it_cannot_use_in_one_line(url, says, tmp_path):
    r = subprocess.run(
        [TK, "server", "--database", url.format(port=free_port()), "--no-deploy", "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert says in r.stderr and "s3cret" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

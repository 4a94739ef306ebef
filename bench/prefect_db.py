"""Prefect server database benchmark: concurrent flow runs on SQLite (Prefect's default) vs PostgreSQL.

    .venv/bin/python bench/prefect_db.py                    # ~2-4 min on 2 cores
    .venv/bin/python bench/prefect_db.py --procs 4 --runs 8  # 32 flow runs at once

For each backend a real `prefect server start` (orchestrate.PrefectServer; PostgreSQL: a throwaway cluster by
database.local_cluster, the server given PREFECT_API_DATABASE_CONNECTION_URL), then PROCS client processes
started together, each running RUNS flow runs at once of a small flow with TASKS concurrent tasks
(tests/prefect_load.py). Counted: flow runs the server recorded COMPLETED, client errors, and "database is
locked" / OperationalError lines in the server log. Wall seconds are from a shared 2-core machine (under load)
and serve only to compare the two backends within one run.
Writes bench/results/prefect_db.json and bench/results/prefect_db.md (or --name's).
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder heads sys.path: bench/select.py would shadow the stdlib `select`.
sys.path = [p for p in sys.path if p != __file__.rsplit("/", 1)[0]]

import argparse
import json
import os
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LOAD = ROOT / "tests" / "prefect_load.py"
LOCK = ("database is locked", "OperationalError", "deadlock detected")


def measure(backend: str, procs: int, runs: int, tasks: int) -> dict:
    from transferkit.core.procs import free_port
    from transferkit.orchestration import database
    from transferkit.orchestration.prefect import PrefectServer, prefect_env

    with tempfile.TemporaryDirectory(prefix=f"tk-{backend}-") as tmp:
        Path(tmp).chmod(0o711)
        cluster = database.local_cluster(Path(tmp) / "pg", free_port()) if backend == "postgresql" else nullcontext()
        with cluster as url:
            env = {database.ENV: database.check(url)} if url else {}
            log = Path(tmp) / "server.log"
            with PrefectServer(home=Path(tmp) / "home", log=log, env=env) as srv:
                t0 = time.monotonic()
                clients = [
                    subprocess.Popen(
                        [sys.executable, str(LOAD), str(runs), str(tasks)],
                        env=prefect_env(srv.api_url),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(procs)
                ]
                outs = [c.communicate(timeout=600) for c in clients]
                wall = time.monotonic() - t0
            text = log.read_text(errors="replace")
    rows, crashed = [], []
    for (out, err), c in zip(outs, clients):
        try:
            rows.append(json.loads(out.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            crashed.append(err.strip().splitlines()[-1] if err.strip() else f"exit {c.returncode}")
    states = [s for r in rows for s in r["server_states"]]
    return {
        "backend": backend,
        "flow_runs": procs * runs,
        "completed": states.count("COMPLETED"),
        "other_states": sorted(s for s in states if s != "COMPLETED"),
        "client_errors": [e for r in rows for e in r["errors"]] + crashed,
        "server_lock_lines": sum(text.count(k) for k in LOCK),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--name", default="prefect_db", help="results file stem (bench/results/NAME.json/.md)")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = [measure(b, a.procs, a.runs, a.tasks) for b in ("sqlite", "postgresql")]
    res = {"rows": rows, "setup": {**vars(a), "load_avg_1m_at_start": load0, "cores": len(os.sched_getaffinity(0))}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Prefect server database: concurrent flow runs, SQLite vs PostgreSQL",
        "",
        f"{a.procs} client processes x {a.runs} flow runs at once, {a.tasks} tasks each; "
        f"{res['setup']['cores']} cores, load average at start {load0:.1f} (shared machine: wall times under load)",
        "",
        "| backend | flow runs | COMPLETED | client errors | lock lines in server log | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['flow_runs']} | {r['completed']} | {len(r['client_errors'])} | "
            f"{r['server_lock_lines']} | {r['wall_s']} |"
        )
    errs = [f"- {r['backend']}: {e[:200]}" for r in rows for e in r["client_errors"][:3]]
    lines += ["", *(["first client errors:", *errs, ""] if errs else [])]
    (RESULTS / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Start a real `transferkit serve` process and wait until it is ready: for scripts, benchmarks and tests that
need a server on loopback rather than an app object (the same process, flags and readiness a user gets)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from transferkit.core.procs import free_port


def serve_argv(repo: Path, port: int, *args: str) -> list[str]:
    """argv of `transferkit serve` on REPO at loopback PORT, as a user runs it."""
    return [sys.executable, "-m", "transferkit.cli", "serve", "--repo", str(repo), "--port", str(port), *args]


def start(
    repo: Path, log: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> tuple[subprocess.Popen, str]:
    """`transferkit serve --repo REPO ARGS` on a free loopback port, its output in LOG; returns (process, base URL)
    once GET /readyz answers 200. A server that exits or is not ready within TIMEOUT seconds raises
    RuntimeError with the end of its log (and is killed)."""
    import httpx

    port = free_port()
    with open(log, "w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            serve_argv(repo, port, *args), stdout=out, stderr=subprocess.STDOUT, env=env or dict(os.environ)
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout:.0f} s: {Path(log).read_text()[-3000:]}")


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM (a clean uvicorn shutdown), SIGKILL after GRACE seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()

"""A Prefect server and a process worker started from the repo, for scheduled and event-triggered runs.

    transferkit server                      # = make server: UI/API on http://127.0.0.1:4200, Ctrl-C stops all
    transferkit server --port 4300 --no-deploy

`prefect server start` keeps its state in PREFECT_HOME (SQLite `prefect.db` by default; set
PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://... for Postgres, see deploy/prefect/README.md).
The server listens on loopback only unless --host says otherwise. Once it answers /api/health, the
process work pool exists and the deployments of flows/deployments.py are registered, one
`prefect worker start --type process` polls the pool. Event triggers need this real server: the
ephemeral one that `transferkit run` starts has no trigger service.

The same `PrefectServer` runs the tests' session server (tests/conftest.py `prefect_server`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from transferkit.core.procs import free_port

DEFAULT_POOL = "transferkit-process"


# No telemetry; a fresh PREFECT_HOME migrates its SQLite database first, and on 2 busy cores that outlasts
# the ephemeral server's 20 s default startup timeout. A value the user set wins.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def use_prefect_defaults() -> None:
    """PREFECT_DEFAULTS into os.environ where unset, before Prefect is imported in this process."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)


def start_prefect_early():
    """Start the ephemeral Prefect server `transferkit run` will use in a background thread, now; return the
    thread to join before the flow runs (None when a server is configured: PREFECT_API_URL).

    Prefect starts it on the flow's first API call, seconds in which this process would otherwise only wait. Started
    here, it boots while the caller imports the flow's modules (torch, timm, scikit-learn). Prefect keeps one
    instance per process (SubprocessASGIServer is a singleton), so the flow finds it running."""
    import threading

    use_prefect_defaults()
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception:  # the flow's own start then raises it, with Prefect's message
            pass

    thread = threading.Thread(target=start, name="prefect-ephemeral-server", daemon=True)
    thread.start()
    return _Joined(thread)


class _Joined:
    """join() waits for the server thread, then imports what the flow's first tasks need in this thread."""

    def __init__(self, thread):
        self.thread = thread

    def join(self) -> None:
        import sklearn.linear_model  # noqa: F401  (select's first scores)
        import timm  # noqa: F401  (and torch: every stage's first model)

        self.thread.join()


def prefect_env(api_url: str | None = None, home: str | Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for Prefect subprocesses: PREFECT_DEFAULTS under os.environ, optional API/home."""
    # telemetry stays off in the children even where the shell turned it on
    env = {**PREFECT_DEFAULTS, **os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if home:
        env["PREFECT_HOME"] = str(home)
    env.update(extra)
    return env


def _prefect_bin() -> str:
    exe = Path(sys.executable).parent / "prefect"
    return str(exe) if exe.exists() else "prefect"


def wait_healthy(api_url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> float:
    """Poll API_URL/health until it answers 200; returns the seconds waited. Raises with the log tail."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"prefect server exited with code {proc.returncode} before answering:\n{tail}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s:\n{tail}")


def ensure_pool(env: dict[str, str], pool: str = DEFAULT_POOL) -> None:
    """Create the process work pool on env's PREFECT_API_URL if it does not exist (idempotent)."""
    p = subprocess.run(
        [_prefect_bin(), "work-pool", "create", pool, "--type", "process", "--overwrite"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if p.returncode != 0:
        raise RuntimeError(f"could not create work pool {pool!r}: {p.stdout[-1500:]}{p.stderr[-1500:]}")


def start_worker(
    env: dict[str, str],
    pool: str = DEFAULT_POOL,
    log: str | Path | None = None,
    limit: int = 1,
    poll_seconds: float | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen:
    """One process worker on POOL in its own process group (stop it with `stop`). limit=1: SQLite
    serialises writers, so one flow run at a time is the safe default for the bundled database."""
    extra = {"PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds)} if poll_seconds else {}
    out = open(log, "ab") if log else subprocess.DEVNULL
    cmd = [
        _prefect_bin(),
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--limit",
        str(limit),
        "--install-policy",
        "never",
    ]
    return subprocess.Popen(
        cmd, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
    )


def stop(proc: subprocess.Popen | None, grace: float = 20) -> None:
    """SIGTERM the process group (the server forks uvicorn and services), then SIGKILL after `grace`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class PrefectServer:
    """`prefect server start` on HOST:PORT as a child process group; a context manager that stops it.

    `home` is PREFECT_HOME (its SQLite database); None keeps the user's (~/.prefect).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        home: str | Path | None = None,
        log: str | Path | None = None,
        startup_timeout: float = 240,
        env: dict | None = None,
    ):
        self.host, self.port = host, port or free_port(host)
        self.home = Path(home) if home else None
        self.log = Path(log) if log else None
        self.startup_timeout = startup_timeout
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return prefect_env(self.api_url, self.home, **{**self.extra_env, **extra})

    def start(self) -> PrefectServer:
        # a server already on the port would answer the health check and be taken for ours. SO_REUSEADDR as
        # uvicorn binds: connections of a server stopped a moment ago (TIME_WAIT) do not block a restart
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError:
                raise RuntimeError(
                    f"{self.host}:{self.port} is already in use (another Prefect server?): stop it "
                    "or choose another --port"
                ) from None
        if self.home:
            self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        cmd = [_prefect_bin(), "server", "start", "--host", self.host, "--port", str(self.port), "--analytics-off"]
        # the server itself must not talk to another API: drop a PREFECT_API_URL inherited from the shell
        env = {k: v for k, v in self.env().items() if k != "PREFECT_API_URL"}
        # the UI asks /ui-settings where the API is; Prefect derives it from PREFECT_SERVER_API_PORT (4200), not
        # from --port, so on any other port the browser would call 4200. A PREFECT_UI_API_URL the user set wins.
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        env.setdefault("PREFECT_UI_API_URL", f"http://{shown}:{self.port}/api")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.startup_seconds = wait_healthy(self.api_url, self.startup_timeout, self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def ensure_pool(self, pool: str = DEFAULT_POOL) -> None:
        ensure_pool(self.env(), pool)

    def start_worker(self, pool: str = DEFAULT_POOL, **kw) -> subprocess.Popen:
        self.worker = start_worker(self.env(), pool, **kw)
        return self.worker

    def stop(self) -> None:
        stop(self.worker)
        stop(self.proc)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(
    host: str,
    port: int,
    pool: str,
    deploy: bool,
    root: Path,
    home: str | None = None,
    echo=print,
    env: dict[str, str] | None = None,
    limit: int = 1,
) -> None:
    """`transferkit server`: server + pool + deployments + worker until Ctrl-C or one of them exits. `env`: extra
    settings of the server and worker (the database URL: transferkit.orchestration.database); `limit`: the worker's
    concurrent flow runs."""

    def _term(signum, frame):  # `docker stop`/systemd send SIGTERM: stop the children like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    logs = root / ".prefect-logs"
    logs.mkdir(exist_ok=True)
    srv = PrefectServer(host, port, home=home, log=logs / "server.log", env=env)
    echo(f"starting prefect server on {srv.ui_url} (log: {srv.log}) ...")
    with srv:
        echo(f"server up after {srv.startup_seconds:.0f} s; UI {srv.ui_url}, API {srv.api_url}")
        srv.ensure_pool(pool)
        if deploy:
            p = subprocess.run(
                [sys.executable, "-m", "transferkit.flows.deployments", "--pool", pool],
                cwd=root,
                env=srv.env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            if p.returncode != 0:
                raise RuntimeError(f"registering deployments failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
            echo(p.stdout.rstrip())
        srv.start_worker(pool, log=logs / "worker.log", cwd=root, limit=limit)
        echo(f"process worker polling pool {pool!r} (log: {logs / 'worker.log'})")
        echo(f"in another shell: export PREFECT_API_URL={srv.api_url}")
        echo("Ctrl-C stops the worker and the server")
        try:
            while srv.proc.poll() is None and srv.worker.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            echo("stopping ...")
        else:
            which = "server" if srv.proc.poll() is not None else "worker"
            raise RuntimeError(f"the prefect {which} exited; see {logs}")

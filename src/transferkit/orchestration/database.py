"""The Prefect server's database: PostgreSQL for several flow runs at once, SQLite (Prefect's default) for one.

    transferkit server --database postgresql://prefect:PASSWORD@db-host:5432/prefect

Prefect's SQLite backend answers "database is locked" when flow runs write at the same time
(PrefectHQ/prefect #7277, #10188, #17473); PostgreSQL does not. Prefect needs the `pg_trgm` extension and the
asyncpg driver (`postgresql+asyncpg://`): `prefect_url` rewrites a plain postgresql:// URL, `check` connects
once before the server starts and turns every failure into one line (unreachable host, bad credentials,
missing database, pg_trgm neither installed nor installable). The password never appears in a message.

`local_cluster` starts a throwaway PostgreSQL (initdb + postgres on loopback, trust auth) in a folder: the
tests and bench/prefect_db.py use it; PostgreSQL refuses to run as root, so as root it runs as the
`postgres` system user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from transferkit.core.errors import TransferkitError

ENV = "PREFECT_API_DATABASE_CONNECTION_URL"


class DatabaseError(TransferkitError, ValueError):
    """The Prefect database URL cannot work."""


def prefect_url(url: str) -> str:
    """URL with the driver Prefect needs: postgres(ql):// -> postgresql+asyncpg://; sqlite URLs unchanged."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return urlunsplit(("postgresql+asyncpg", *urlsplit(url)[1:]))
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return url
    raise DatabaseError(f"--database {redact(url)}: expected a postgresql:// (or sqlite+aiosqlite://) URL")


def redact(url: str) -> str:
    """URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, *parts[2:]))


def check(url: str, timeout: float = 10) -> str:
    """Connect once and make sure pg_trgm is there (creating it when this user may); returns the Prefect
    URL. SQLite URLs pass unchecked."""
    import asyncio

    url = prefect_url(url)
    if not url.startswith("postgresql"):
        return url
    try:
        asyncio.run(_check(url.replace("postgresql+asyncpg", "postgresql", 1), timeout))
    except DatabaseError:
        raise
    except Exception as e:  # noqa: BLE001 - asyncpg/OS errors of every kind become one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(f"cannot use {redact(url)}: {why}") from None
    return url


async def _check(url: str, timeout: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'"):
            return
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except Exception as e:  # noqa: BLE001
            raise DatabaseError(
                f"{redact(url)}: Prefect needs the pg_trgm extension and this user cannot create it ({e}); "
                "as a superuser run: CREATE EXTENSION pg_trgm;"
            ) from None
    finally:
        await conn.close()


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise DatabaseError(f"PostgreSQL's {name} was not found (Debian: apt-get install postgresql)")
    return str(found)


def available() -> bool:
    """PostgreSQL server binaries (initdb, postgres) on this machine, and as root the `postgres` user to run them."""
    import pwd

    try:
        _bin("initdb"), _bin("postgres")
        if os.geteuid() == 0:
            pwd.getpwnam("postgres")
    except (DatabaseError, KeyError):
        return False
    return True


@contextlib.contextmanager
def local_cluster(folder: Path, port: int, databases: tuple[str, ...] = ("prefect",), timeout: float = 60):
    """A throwaway PostgreSQL on 127.0.0.1:PORT with its data in FOLDER (created; must not exist; as root its
    parents must be open to the postgres user) and each of DATABASES created with pg_trgm; yields the
    postgresql:// URL of the first. Stopped on exit."""
    import asyncio

    folder = Path(folder)
    folder.mkdir(parents=True, mode=0o700)
    as_root = os.geteuid() == 0
    user = "postgres" if as_root else None  # postgres refuses root
    if as_root:
        shutil.chown(folder, "postgres", "postgres")
    data, log = folder / "data", folder / "postgres.log"
    init = [_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    r = subprocess.run(init, user=user, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # e.g. as root, a parent folder the postgres user cannot enter
        raise DatabaseError(f"initdb {data} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    cmd = [_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, user=user, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        asyncio.run(_wait_and_create(admin, databases, timeout, proc))
        yield f"postgresql://postgres@127.0.0.1:{port}/{databases[0]}"
    finally:
        proc.send_signal(signal.SIGINT)  # fast shutdown: roll back open sessions (SIGTERM waits for them)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_and_create(admin: str, databases: tuple[str, ...], timeout: float, proc) -> None:
    import asyncio

    import asyncpg

    t0 = time.monotonic()
    while True:
        try:
            conn = await asyncpg.connect(admin, timeout=5)
            break
        except (OSError, asyncpg.PostgresError):
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise DatabaseError(f"the local PostgreSQL did not start (exit {proc.poll()})") from None
            await asyncio.sleep(0.2)
    try:
        for db in databases:
            await conn.execute(f'CREATE DATABASE "{db}"')
            sub = await asyncpg.connect(admin.rsplit("/", 1)[0] + f"/{db}", timeout=5)
            await sub.execute("CREATE EXTENSION pg_trgm")
            await sub.close()
    finally:
        await conn.close()

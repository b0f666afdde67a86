"""Services for tests only, on top of flows/servers.py: the Prefect server and a worker as
context managers, and a throw-away PostgreSQL cluster (the MLflow server's multi-user backend)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from flows.servers import (HOST, POOL, Service, ServiceError, free_port, launch_prefect_server,
                           launch_prefect_worker, running, sqlalchemy_uri, start)


@contextlib.contextmanager
def prefect_server(port: int | None = None, home: str | Path | None = None, **kwargs) -> Iterator[Service]:
    with running(launch_prefect_server(port, home, **kwargs)) as service:
        yield service


@contextlib.contextmanager
def prefect_worker(pool: str = POOL, api_url: str = f"http://{HOST}:4200/api", **kwargs) -> Iterator[Service]:
    with running(launch_prefect_worker(pool, api_url, **kwargs), grace=5.0) as service:
        yield service


# --------------------------------------------------------------------------- PostgreSQL
def postgres_bin() -> Path | None:
    """The folder of initdb/postgres/createdb (PATH, else Debian's /usr/lib/postgresql/<v>/bin)."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "postgres", "createdb")):
            return folder
    return None


def _as_postgres_user(base: Path) -> tuple[list[str], Callable[[Path], None]]:
    """As root: the command prefix that runs as the `postgres` OS user (initdb refuses root)
    and a chown to that user; otherwise nothing to prefix and nothing to chown."""
    if os.geteuid() != 0:
        return [], lambda path: None
    import pwd

    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root and there is no `postgres` OS user to run PostgreSQL") from None

    def chown(path: Path) -> None:
        os.chown(path, user.pw_uid, user.pw_gid)

    chown(base)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"], chown


@contextlib.contextmanager
def postgres_server(port: int | None = None, *, database: str = "mlflow", log_dir: Path | None = None,
                    timeout: float = 60.0) -> Iterator[tuple[Service, str]]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (password auth over TCP, a fresh random
    password) holding an empty `database`; yields (service, SQLAlchemy URI). Its data folder
    is a temporary one, removed afterwards. As root it runs as the `postgres` OS user
    (initdb refuses root). Raises ServiceError when PostgreSQL is not installed."""
    folder = postgres_bin()
    if folder is None:
        raise ServiceError("PostgreSQL is not installed (no initdb/postgres/createdb on PATH or in /usr/lib/postgresql)")
    base = Path(tempfile.mkdtemp(prefix="blipdiff-pg-"))  # short: unix socket paths are limited to 107 bytes
    try:
        as_user, chown = _as_postgres_user(base)
        password = secrets.token_hex(16)
        pwfile = base / "pw"
        pwfile.write_text(password + "\n")
        chown(pwfile)
        data, sockets = base / "data", base / "s"
        init = subprocess.run([*as_user, folder / "initdb", "-D", data, "-U", "postgres", f"--pwfile={pwfile}",
                               "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"],
                              capture_output=True, text=True, cwd=base)
        if init.returncode != 0:
            raise ServiceError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        sockets.mkdir()
        chown(sockets)
        port = port or free_port()
        cmd = [*as_user, folder / "postgres", "-D", data, "-h", HOST, "-p", str(port), "-k", sockets,
               "-c", "fsync=off"]
        log_dir = Path(log_dir) if log_dir else base

        def ready() -> bool:
            with socket.create_connection((HOST, port), timeout=1):
                pass
            return subprocess.run([folder / "pg_isready", "-h", HOST, "-p", str(port)],
                                  capture_output=True).returncode == 0

        # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for clients to leave)
        service = start("postgres", cmd, url=f"postgresql://{HOST}:{port}", log_dir=log_dir, cwd=base,
                        ready=ready, timeout=timeout, stop_signals=(signal.SIGINT, signal.SIGQUIT))
        with running(service):
            made = subprocess.run([folder / "createdb", "-h", HOST, "-p", str(port), "-U", "postgres", database],
                                  capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password})
            if made.returncode != 0:
                raise ServiceError(f"createdb {database} failed:\n{made.stdout}\n{made.stderr}")
            yield service, sqlalchemy_uri(f"postgresql://postgres:{password}@{HOST}:{port}/{database}")
    finally:
        shutil.rmtree(base, ignore_errors=True)

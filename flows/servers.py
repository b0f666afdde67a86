"""Local services on loopback: the MLflow tracking server, the Prefect server and a Prefect
worker, for `make serve` and for end-to-end tests (tests/helpers/servers.py adds a
throw-away PostgreSQL and context managers for the Prefect server and worker).

    python -m flows.servers up        # Prefect server + pool + deployments + worker, MLflow server

Every service listens on 127.0.0.1 only and runs under flows/supervisor.py: a session of its
own, a log file, a health check to be ready, and a stop that takes every descendant (the
MLflow server's uvicorn workers and job consumers; a Prefect worker's flow runs, in sessions
of their own), then SIGKILL. `Service.leftovers()` lists what survived (nothing, normally).

    with mlflow_server(f"sqlite:///{tmp}/mlflow.db", tmp / "artifacts", log_dir=tmp) as mlflow:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow.url
        ...
    assert mlflow.leftovers() == []
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from flows.supervisor import Service, ServiceError, http_ok, hurry, running, start

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
POOL = "blip-diffusion"  # the Prefect process work pool of this project
BIN = Path(sys.executable).parent  # this venv's mlflow, prefect


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str | None] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # this venv's mlflow, prefect, python
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _default_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="blipdiff-logs-"))


# --------------------------------------------------------------------------- MLflow
def default_store() -> tuple[str, Path]:
    """The sqlite store and artifacts folder stages use without MLFLOW_TRACKING_URI
    (components/core/tracking.py: `mlflow.db` and `mlartifacts/` in the main working tree)."""
    from components.core import tracking

    root = tracking.store_root(REPO)
    return f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts"


def sqlalchemy_uri(uri: str) -> str:
    """`postgresql://...` with the driver installed: SQLAlchemy 2.1 reads a bare `postgresql://`
    as psycopg 3; with only psycopg2 (psycopg2-binary) installed it becomes `postgresql+psycopg2://`."""
    import importlib.util

    if uri.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + uri.removeprefix("postgresql://")
    return uri


def launch_mlflow(backend_uri: str | None = None, artifacts_dir: str | Path | None = None,
                  port: int | None = None, *, log_dir: Path | None = None, workers: int | None = 1,
                  env: dict[str, str] | None = None, timeout: float = 180.0, wait: bool = True) -> Service:
    """`mlflow server` on 127.0.0.1 (started; stop it with `.stop()`). `backend_uri`: any
    SQLAlchemy URI (default: the repository's sqlite store; `postgresql://` gets the installed
    driver, see `sqlalchemy_uri`); `artifacts_dir`: a folder or an
    `s3://...` URI that the server proxies artifacts to (default: the repository's `mlartifacts/`)."""
    default_uri, default_artifacts = default_store()
    backend_uri = sqlalchemy_uri(backend_uri or default_uri)
    artifacts = artifacts_dir or default_artifacts
    if "://" not in str(artifacts):
        artifacts = Path(artifacts).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    cmd = [BIN / "mlflow", "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
           "--host", HOST, "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    return start("mlflow", cmd, url=url, log_dir=log_dir or _default_log_dir(), env=_env(env),
                 ready=(lambda: http_ok(f"{url}/health") == b"OK") if wait else None, timeout=timeout,
                 stop_signals=(signal.SIGTERM, signal.SIGINT))


@contextlib.contextmanager
def mlflow_server(backend_uri: str | None = None, artifacts_dir: str | Path | None = None,
                  port: int | None = None, **kwargs) -> Iterator[Service]:
    """`launch_mlflow` as a context manager: yields the Service (`.url` is the tracking URI)."""
    with running(launch_mlflow(backend_uri, artifacts_dir, port, **kwargs)) as service:
        yield service


# --------------------------------------------------------------------------- Prefect
def _prefect_env(api_url: str | None, home: str | Path | None, env: dict[str, str] | None) -> dict[str, str]:
    extra: dict[str, str | None] = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    if api_url:
        extra["PREFECT_API_URL"] = api_url
    if home:
        extra["PREFECT_HOME"] = str(home)
    return _env(extra)


def launch_prefect_server(port: int | None = None, home: str | Path | None = None, *,
                          log_dir: Path | None = None, env: dict[str, str] | None = None,
                          timeout: float = 180.0, wait: bool = True) -> Service:
    """`prefect server start` on 127.0.0.1; `.url` is the API URL (`.../api`). `home`: its
    PREFECT_HOME (database, profiles); default: the user's (PREFECT_HOME or ~/.prefect)."""
    port = port or free_port()
    api = f"http://{HOST}:{port}/api"
    cmd = [BIN / "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    return start("prefect-server", cmd, url=api, log_dir=log_dir or _default_log_dir(),
                 env=_prefect_env(api, home, env), ready=(lambda: http_ok(f"{api}/health") == b"true") if wait else None,
                 timeout=timeout)


def prefect(args: Sequence[str], api_url: str, *, home: str | Path | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run the `prefect` CLI against `api_url` (no prompts) in `cwd`; output captured. PWD is
    `cwd` too: prefect.yaml's pull step is `{{ $PWD }}`, the folder the deployment runs in."""
    env = {**(env or {}), **({"PWD": str(Path(cwd).resolve())} if cwd else {})}
    return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=_prefect_env(api_url, home, env),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ensure_work_pool(api_url: str, pool: str = POOL, *, home: str | Path | None = None) -> bool:
    """Create the process work pool `pool` unless it exists; True when it was created."""
    if prefect(["work-pool", "inspect", pool], api_url, home=home, timeout=120).returncode == 0:
        return False
    made = prefect(["work-pool", "create", "--type", "process", pool], api_url, home=home, timeout=120)
    if made.returncode != 0 and "already exists" not in made.stdout + made.stderr:  # another one made it
        raise ServiceError(f"prefect work-pool create {pool} failed:\n{made.stdout}\n{made.stderr}")
    return made.returncode == 0


def deploy(api_url: str, root: Path = REPO, *, home: str | Path | None = None,
           log_dir: Path | None = None) -> bool:
    """`prefect --no-prompt deploy --all` in `root` when `root/prefect.yaml` exists (False when
    it does not), after creating the work pools its deployments name (Prefect refuses a
    deployment on a pool that does not exist). A failed deploy raises ServiceError with its output."""
    if not (root / "prefect.yaml").is_file():
        return False
    import yaml

    spec = yaml.safe_load((root / "prefect.yaml").read_text()) or {}
    for pool in sorted({(d.get("work_pool") or {}).get("name") for d in spec.get("deployments") or []} - {None}):
        ensure_work_pool(api_url, pool, home=home)
    done = prefect(["deploy", "--all"], api_url, home=home, cwd=root, timeout=600)
    output = done.stdout + done.stderr
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "prefect-deploy.log").write_text(output)
    if done.returncode != 0:
        raise ServiceError(f"prefect deploy --all in {root} failed (exit {done.returncode}):\n{output[-4000:]}")
    return True


def _worker_online(api_url: str, pool: str, name: str) -> bool:
    workers = json.loads(http_ok(f"{api_url}/work_pools/{pool}/workers/filter", data=b"{}"))
    return any(w["name"] == name and w.get("status") == "ONLINE" for w in workers)


def launch_prefect_worker(pool: str = POOL, api_url: str = f"http://{HOST}:4200/api", *,
                          home: str | Path | None = None, name: str | None = None, log_dir: Path | None = None,
                          cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 120.0,
                          wait: bool = True) -> Service:
    """A process worker of `pool` (created when missing) polling `api_url`; ready when the API
    lists it online. Its flow runs start in `cwd` unless their deployment says otherwise."""
    ensure_work_pool(api_url, pool, home=home)
    name = name or f"{pool}-{os.getpid()}-{secrets.token_hex(3)}"
    cmd = [BIN / "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    # Prefect's worker waits for its flow runs on the first SIGINT (or SIGTERM) and kills
    # itself on the second; flow runs in sessions of their own are stopped with the group.
    return start("prefect-worker", cmd, url=api_url, log_dir=log_dir or _default_log_dir(), cwd=cwd,
                 env=_prefect_env(api_url, home, env), timeout=timeout,
                 ready=(lambda: _worker_online(api_url, pool, name)) if wait else None,
                 stop_signals=(signal.SIGINT, signal.SIGINT))


# --------------------------------------------------------------------------- make serve
def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve_log_dir(log_dir: Path | None) -> Path:
    log_dir = Path(log_dir) if log_dir else REPO / ".serve"
    log_dir.mkdir(parents=True, exist_ok=True)
    if log_dir.parent == REPO and not (log_dir / ".gitignore").exists():
        (log_dir / ".gitignore").write_text("*\n")  # the logs stay out of git
    return log_dir


def _ports_in_use(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                print(f"port {port} on {HOST} is in use (another `make serve`?); choose another with "
                      "--mlflow-port/--prefect-port", file=sys.stderr)
                return True
    return False


def _watch(services: list[Service]) -> int:
    """Until Ctrl-C: 1 as soon as a service exits, with its log tail."""
    while True:
        for service in services:
            if not service.running():
                print(f"{service.name} exited (code {service.process.returncode}); log {service.log}:\n"
                      f"{service.log_tail()}", file=sys.stderr, flush=True)
                return 1
        time.sleep(1)


def _stop_all(services: list[Service]) -> int:
    """Stop the services, last started first; 1 when a process of one survived."""
    signal.signal(signal.SIGINT, hurry)  # a second Ctrl-C: kill at once, never leave a service behind
    signal.signal(signal.SIGTERM, hurry)
    print("\nstopping ...", flush=True)
    code = 0
    for service in reversed(services):
        service.stop(grace=5.0 if service.name == "prefect-worker" else 10.0)
        left = service.leftovers()
        if left:
            print(f"{service.name}: still running: {left}", file=sys.stderr, flush=True)
            code = 1
    print("stopped", flush=True)
    return code


def up(mlflow_port: int = 5000, prefect_port: int = 4200, backend_store_uri: str | None = None,
       artifacts_destination: str | None = None, prefect_home: str | None = None, pool: str = POOL,
       mlflow_workers: int = 2, log_dir: Path | None = None) -> int:
    """Start the Prefect server, the work pool, the deployments (prefect.yaml), a worker and the
    MLflow server; print what a shell needs; run until Ctrl-C, then stop everything."""
    log_dir = _serve_log_dir(log_dir)
    if _ports_in_use(mlflow_port, prefect_port):
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C stops everything even when this process was started with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    services: list[Service] = []
    code = 0
    try:
        print(f"starting the MLflow and Prefect servers on {HOST} (logs in {log_dir}) ...", flush=True)
        mlflow = launch_mlflow(backend_store_uri, artifacts_destination, mlflow_port, log_dir=log_dir,
                               workers=mlflow_workers, wait=False)
        services.append(mlflow)
        server = launch_prefect_server(prefect_port, prefect_home, log_dir=log_dir)
        services.append(server)
        # deploy() creates the pools prefect.yaml names, launch_prefect_worker() the worker's
        if deploy(server.url, REPO, home=prefect_home, log_dir=log_dir):
            print(f"deployed prefect.yaml's deployments (log {log_dir / 'prefect-deploy.log'})", flush=True)
        else:
            print(f"no prefect.yaml in {REPO}: no deployments created", flush=True)
        services.append(launch_prefect_worker(pool, server.url, home=prefect_home, log_dir=log_dir))
        mlflow.wait_ready(lambda: http_ok(f"{mlflow.url}/health") == b"OK", 180)
        ui = server.url.removesuffix("/api")
        print(f"\nPrefect UI   {ui}\nMLflow UI    {mlflow.url}\nworker       pool {pool!r}\n\n"
              f"In your shell:\n  export PREFECT_API_URL={server.url} MLFLOW_TRACKING_URI={mlflow.url}\n\n"
              "Ctrl-C stops everything.", flush=True)
        code = _watch(services)
    except KeyboardInterrupt:
        pass
    except ServiceError as error:
        print(error, file=sys.stderr, flush=True)
        code = 1
    finally:
        left = _stop_all(services)
    return code or left


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.servers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("up", help="start the Prefect server, a worker and the MLflow server on 127.0.0.1 "
                                         "until Ctrl-C")
    cmd.add_argument("--mlflow-port", type=int, default=5000)
    cmd.add_argument("--prefect-port", type=int, default=4200)
    cmd.add_argument("--backend-store-uri", help="MLflow store (default: sqlite:///<repo>/mlflow.db); "
                                                 "e.g. postgresql://user:password@host:5432/mlflow")
    cmd.add_argument("--artifacts-destination", help="MLflow artifacts: a folder or s3://bucket/path "
                                                     "(default: <repo>/mlartifacts)")
    cmd.add_argument("--mlflow-workers", type=int, default=2)
    cmd.add_argument("--prefect-home", help="PREFECT_HOME of the server and worker (default: yours)")
    cmd.add_argument("--pool", default=POOL, help=f"process work pool (default {POOL})")
    cmd.add_argument("--log-dir", type=Path, help="service logs (default: <repo>/.serve)")
    args = parser.parse_args(argv)
    return up(args.mlflow_port, args.prefect_port, args.backend_store_uri, args.artifacts_destination,
              args.prefect_home, args.pool, args.mlflow_workers, args.log_dir)


if __name__ == "__main__":
    sys.exit(main())

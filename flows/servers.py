"""Local services on loopback: the MLflow tracking server, the Prefect server and a Prefect
worker (and a throw-away PostgreSQL for tests), for `make serve` and for end-to-end tests.

    python -m flows.servers up        # Prefect server + pool + deployments + worker, MLflow server

Every service listens on 127.0.0.1 only, runs in a session of its own (`start_new_session`),
writes its output to a log file, is waited on through its health check (a timeout names the
service and shows its log tail) and is stopped by signalling its whole process group (the
MLflow server starts uvicorn workers and job consumers of its own; a Prefect worker starts
flow runs in sessions of their own, which are stopped too), then SIGKILL, then waited on.
`Service.leftovers()` lists what survived (nothing, normally).

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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
POOL = "blip-diffusion"  # the Prefect process work pool of this project
BIN = Path(sys.executable).parent  # this venv's mlflow, prefect


class ServiceError(RuntimeError):
    """A service did not start, or a set-up command failed; the message holds its log tail."""


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # start time in clock ticks since boot: (pid, start) names a process even after pid reuse
    zombie: bool


def _procs() -> dict[int, _Proc]:
    """Every process now, from /proc (Linux)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        out[int(entry)] = _Proc(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]),
                                fields[0] in ("Z", "X"))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def group_processes(pgid: int) -> list[int]:
    """The living processes (zombies excluded) of process group or session `pgid`."""
    return sorted(p.pid for p in _procs().values() if not p.zombie and pgid in (p.pgid, p.sid))


@dataclass
class Service:
    """A started service: its process (leader of its own session and process group), URL and log."""

    name: str
    url: str
    process: subprocess.Popen
    log: Path
    # what stop() sends to the group, in order, waiting `grace` after each, before SIGKILL
    stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    _seen: set[tuple[int, int]] = field(default_factory=set, repr=False)  # (pid, start) ever seen

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "\n".join(text.splitlines()[-lines:])

    def processes(self) -> list[int]:
        """The living processes of the service: its session and group, every descendant (also
        those in sessions of their own, e.g. a worker's flow runs) and every one seen before."""
        procs = _procs()
        mine = {p.pid for p in procs.values() if self.pid in (p.pgid, p.sid)}
        mine |= {pid for pid, start in self._seen if pid in procs and procs[pid].start == start}
        children: dict[int, list[int]] = {}
        for p in procs.values():
            children.setdefault(p.ppid, []).append(p.pid)
        todo = list(mine)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in mine:
                    mine.add(child)
                    todo.append(child)
        me = os.getpid()
        alive = sorted(pid for pid in mine if not procs[pid].zombie and pid != me)
        self._seen |= {(pid, procs[pid].start) for pid in alive}
        return alive

    def leftovers(self) -> list[str]:
        """What survived stop(): "pid cmdline" of every living process of the service (empty when clean)."""
        return [f"{pid} {_cmdline(pid)}" for pid in self.processes()]

    def _signal(self, sig: int) -> None:
        own = os.getpgid(0)
        pgids = set()
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                pgids.add(os.getpgid(pid))
        pgids.add(self.pid)
        for pgid in pgids - {own}:  # never our own group (the caller's)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        if own in pgids:  # a descendant that joined our group: signal it alone
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    if os.getpgid(pid) == own:
                        os.kill(pid, sig)

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.process.poll()  # reap the leader
            if not self.processes():
                return True
            if time.monotonic() > deadline or _hurry:
                return False
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the whole group: each of `stop_signals` then `grace` seconds to exit, then SIGKILL."""
        self.processes()  # remember the descendants before any of them is orphaned
        for sig in self.stop_signals:
            if _hurry:
                break
            self._signal(sig)
            if self._wait_gone(grace):
                break
        if self.processes():
            self._signal(signal.SIGKILL)
            self._wait_gone(5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        """Poll `check` until it is true; a service that exits or times out raises ServiceError."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self.process.returncode} before it was ready "
                                   f"(log {self.log}):\n{self.log_tail()}")
            try:
                if check():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} not ready at {self.url} after {timeout:.0f} s "
                                   f"(log {self.log}):\n{self.log_tail()}")
            time.sleep(0.5)


_hurry = False  # set by a second Ctrl-C in `up`: skip the grace periods, SIGKILL at once


def http_ok(url: str, timeout: float = 3.0, data: bytes | None = None) -> bytes:
    """The body of a 2xx answer to GET (or POST of JSON `data`); raises OSError otherwise."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.read()


def start(name: str, cmd: Sequence[str], *, url: str, log_dir: Path, ready: Callable[[], bool] | None,
          env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 180.0,
          stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Service:
    """Start `cmd` in a session of its own with its output in `log_dir/<name>.log` and wait
    until `ready()` is true (not at all when None; call `Service.wait_ready` later)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        process = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    service = Service(name, url, process, log, stop_signals)
    if ready is not None:
        try:
            service.wait_ready(ready, timeout)
        except BaseException:
            service.stop(grace=5.0)
            raise
    return service


@contextlib.contextmanager
def running(service: Service, grace: float = 10.0) -> Iterator[Service]:
    """Yield the service; stop it (whole group) on the way out, also on errors."""
    try:
        yield service
    finally:
        service.stop(grace)


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


@contextlib.contextmanager
def prefect_server(port: int | None = None, home: str | Path | None = None, **kwargs) -> Iterator[Service]:
    with running(launch_prefect_server(port, home, **kwargs)) as service:
        yield service


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
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="blipdiff-pg-"))  # short: unix socket paths are limited to 107 bytes
    try:
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceError("running as root and there is no `postgres` OS user to run PostgreSQL") from None
            os.chown(base, user.pw_uid, user.pw_gid)
            as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
        password = secrets.token_hex(16)
        pwfile = base / "pw"
        pwfile.write_text(password + "\n")
        if as_user:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        data, sockets = base / "data", base / "s"
        init = subprocess.run([*as_user, folder / "initdb", "-D", data, "-U", "postgres", f"--pwfile={pwfile}",
                               "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"],
                              capture_output=True, text=True, cwd=base)
        if init.returncode != 0:
            raise ServiceError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        sockets.mkdir()
        if as_user:
            os.chown(sockets, user.pw_uid, user.pw_gid)
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


# --------------------------------------------------------------------------- make serve
def up(mlflow_port: int = 5000, prefect_port: int = 4200, backend_store_uri: str | None = None,
       artifacts_destination: str | None = None, prefect_home: str | None = None, pool: str = POOL,
       mlflow_workers: int = 2, log_dir: Path | None = None) -> int:
    """Start the Prefect server, the work pool, the deployments (prefect.yaml), a worker and the
    MLflow server; print what a shell needs; run until Ctrl-C, then stop everything."""
    global _hurry
    log_dir = Path(log_dir) if log_dir else REPO / ".serve"
    log_dir.mkdir(parents=True, exist_ok=True)
    if log_dir.parent == REPO and not (log_dir / ".gitignore").exists():
        (log_dir / ".gitignore").write_text("*\n")  # the logs stay out of git
    for port in (mlflow_port, prefect_port):
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                print(f"port {port} on {HOST} is in use (another `make serve`?); choose another with "
                      "--mlflow-port/--prefect-port", file=sys.stderr)
                return 1

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
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
        while True:
            for service in services:
                if not service.running():
                    print(f"{service.name} exited (code {service.process.returncode}); log {service.log}:\n"
                          f"{service.log_tail()}", file=sys.stderr, flush=True)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except ServiceError as error:
        print(error, file=sys.stderr, flush=True)
        code = 1
    finally:
        def hurry(signum, frame):
            global _hurry
            _hurry = True

        signal.signal(signal.SIGINT, hurry)  # a second Ctrl-C: kill at once, never leave a service behind
        signal.signal(signal.SIGTERM, hurry)
        print("\nstopping ...", flush=True)
        for service in reversed(services):
            service.stop(grace=5.0 if service.name == "prefect-worker" else 10.0)
            left = service.leftovers()
            if left:
                print(f"{service.name}: still running: {left}", file=sys.stderr, flush=True)
                code = 1
        print("stopped", flush=True)
    return code


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

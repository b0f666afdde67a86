"""A local service under supervision: a command started in a session of its own (its
output in a log file), waited on through a health check (a timeout or an early exit names the
service and shows its log tail), and stopped with every descendant: its process group and
session, and every process started under it, also in sessions of their own (an MLflow
server's uvicorn workers and job consumers, a Prefect worker's flow runs). `stop()` sends
the service's stop signals, then SIGKILL, then waits; `Service.leftovers()` lists what
survived (nothing, normally). The processes are found with psutil; a process is named by
its pid and creation time, so a reused pid is never taken for a process seen before."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil


class ServiceError(RuntimeError):
    """A service did not start, or a set-up command failed; the message holds its log tail."""


def _in_group_or_session(pid: int, leader: int) -> bool:
    try:
        return leader in (os.getpgid(pid), os.getsid(pid))
    except OSError:  # gone
        return False


def _alive(process: psutil.Process) -> bool:
    """Still the process it was (`is_running` compares the creation time: no reused pid) and not a zombie."""
    try:
        return process.is_running() and process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()).strip()
    except psutil.Error:
        return "?"


@dataclass
class Service:
    """A started service: its process (leader of its own session and process group), URL and log."""

    name: str
    url: str
    process: subprocess.Popen
    log: Path
    # what stop() sends to the group, in order, waiting `grace` after each, before SIGKILL
    stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    _seen: dict[int, psutil.Process] = field(default_factory=dict, repr=False)  # every process ever seen

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

    def _living(self) -> dict[int, psutil.Process]:
        roots = {p.pid: p for p in psutil.process_iter() if _in_group_or_session(p.pid, self.pid)}
        roots.update((pid, p) for pid, p in self._seen.items() if _alive(p))
        mine = dict(roots)
        for process in roots.values():
            with contextlib.suppress(psutil.Error):
                mine.update((child.pid, child) for child in process.children(recursive=True))
        me = os.getpid()
        alive = {pid: p for pid, p in mine.items() if pid != me and _alive(p)}
        self._seen.update(alive)
        return alive

    def processes(self) -> list[int]:
        """The living processes of the service: its session and group, every descendant (also
        those in sessions of their own, e.g. a worker's flow runs) and every one seen before."""
        return sorted(self._living())

    def leftovers(self) -> list[str]:
        """What survived stop(): "pid cmdline" of every living process of the service (empty when clean)."""
        return [f"{pid} {_cmdline(p)}" for pid, p in sorted(self._living().items())]

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


_hurry = False  # set by hurry(): skip the grace periods, SIGKILL at once


def hurry(signum=None, frame=None) -> None:
    """From now on, stop() skips the grace periods and kills at once (a signal handler: a second Ctrl-C)."""
    global _hurry
    _hurry = True


def http_ok(url: str, timeout: float = 3.0, data: bytes | None = None) -> bytes:
    """The body of a 2xx answer to GET (or POST of JSON `data`); raises OSError otherwise."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.read()


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default (an ignored signal is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
        # A process started with SIGINT ignored (a background job of a script, nohup) passes
        # that on to its children, and a stop by SIGINT would never reach them: reset it.
        process = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                   preexec_fn=_default_sigint)
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

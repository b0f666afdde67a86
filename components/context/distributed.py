"""Where the context stage's shards run: in its own process, or over a Dask cluster.

`params.yaml` `dask:` (components.core.config.DaskConfig) chooses, and never changes the
outputs, so no stage lists it in dvc.yaml:
- `workers: 0` (the default): in the stage's process, shard after shard, no Dask.
- `workers: N`: a `LocalCluster` of N worker processes (`threads_per_worker` threads each),
  on loopback only, without a dashboard, quiet, closed when the stage ends or fails.
- `address: tcp://host:8786` (or the environment variable BLIPDIFF_DASK_ADDRESS): an
  existing scheduler; overrides `workers`. Its workers need blipdiff installed (the same
  code) and the repository's files at the stage's path (a shared filesystem): they read the
  subject images and folder backgrounds there. They write nothing: the PNG bytes, rows and
  stats of each shard come back to the stage, which writes them into its temporary output.

Each shard is `components.context.generation.process_shard`, the same call as in-process;
a worker builds CLIPSeg once per stage run (on its first shard that needs it), not per
shard. Results come back in the stage's order, with at most a few shards per thread in
flight, so the stage's memory does not grow with the dataset. An exception in a worker (a
BlipDiffError included) is raised again in the stage as it is.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from components.context.generation import ContextJob, Segmenters, ShardResult, SubjectImage, process_shard, run_serial
from components.core.config import DaskConfig
from components.core.errors import BlipDiffError

ADDRESS_ENV = "BLIPDIFF_DASK_ADDRESS"
SHARDS_PER_THREAD = 2  # in flight: enough to keep every thread busy, few enough to bound memory

Shards = list[list[SubjectImage]]


@dataclass(frozen=True)
class Executor:
    name: str  # where the shards ran, for the log: "in this process", "on a Dask LocalCluster (...)"
    workers: int  # 0: the stage's own process
    threads: int
    remote: bool  # an existing cluster (dask.address)
    run: Callable[[ContextJob, Shards], Iterator[ShardResult]]  # shard results, in order


def scheduler_address(cfg: DaskConfig) -> str | None:
    return os.environ.get(ADDRESS_ENV) or cfg.address


@contextmanager
def open_executor(cfg: DaskConfig) -> Iterator[Executor]:
    """The executor `cfg` asks for; a cluster started here is closed on the way out."""
    address = scheduler_address(cfg)
    if address is None and cfg.workers == 0:
        yield Executor("in this process", 0, 0, False, run_serial)
        return
    import distributed  # noqa: F401  (first: its import sets its loggers' levels, which _quiet changes)

    with _quiet("distributed"), _cluster(cfg, address) as executor:
        yield executor


@contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Dask's scheduler, nanny and client log every step at INFO through the stage's handlers
    (LocalCluster's silence_logs only reaches Dask's own handlers): keep its errors only."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _cluster(cfg: DaskConfig, address: str | None) -> Iterator[Executor]:
    from distributed import Client, LocalCluster

    if address is not None:
        client = _connect(address, cfg.connect_timeout_s)
        with client:
            workers, threads = len(client.nthreads()), sum(client.nthreads().values())
            yield Executor(f"on the Dask cluster at {address} ({_size(workers, threads)})", workers, threads, True,
                           lambda job, shards: _map(client, job, shards, threads))
        return
    # Loopback only, no dashboard; the scheduler's plain HTTP endpoints (health, metrics) on a
    # free loopback port rather than 8787, which another cluster may hold. Workers stay silent:
    # a shard's exception comes back to the stage, which raises it; their log would repeat it.
    with LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                      host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster, \
            Client(cluster, set_as_default=False) as client:
        threads = cfg.workers * cfg.threads_per_worker
        yield Executor(f"on a Dask LocalCluster ({_size(cfg.workers, threads)})", cfg.workers, threads, False,
                       lambda job, shards: _map(client, job, shards, threads))


def _size(workers: int, threads: int) -> str:
    return f"{workers} worker{'s' * (workers != 1)}, {threads} thread{'s' * (threads != 1)}"


def _connect(address: str, timeout_s: float):
    from distributed import Client

    try:
        client = Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise BlipDiffError(
            f"dask.address {address}: no Dask scheduler answered within {timeout_s:g} s "
            f"({type(exc).__name__}); start one (`dask scheduler`), fix the address "
            f"(or {ADDRESS_ENV}), or set dask.address: null to run locally"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except (OSError, TimeoutError):
        client.close()
        raise BlipDiffError(f"dask.address {address}: the scheduler has no workers after {timeout_s:g} s "
                            "(start some with `dask worker " + address + "`)") from None
    return client


def _map(client, job: ContextJob, shards: Shards, threads: int) -> Iterator[ShardResult]:
    """Each shard's result in the shards' order; pending shards are cancelled if the caller
    stops early (an error) or a shard fails."""
    job_on_workers = client.scatter(job, broadcast=True, hash=False)  # sent once per worker
    window = max(4, SHARDS_PER_THREAD * threads)
    remaining = iter(shards)
    pending: deque = deque()

    def submit(shard: list[SubjectImage]) -> None:
        pending.append(client.submit(_run_shard, job_on_workers, shard, pure=False))

    try:
        for shard in remaining:
            submit(shard)
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()  # re-raises a worker's exception here
            shard = next(remaining, None)
            if shard is not None:
                submit(shard)
            yield result
    finally:
        if pending:
            client.cancel(list(pending))
        client.cancel([job_on_workers])


# In a worker process: its CLIPSeg, built on its first shard of a stage run that needs one.
_WORKER_SEGMENTERS = Segmenters()


def _run_shard(job: ContextJob, shard: list[SubjectImage]) -> ShardResult:
    return process_shard(job, shard, _WORKER_SEGMENTERS.get)

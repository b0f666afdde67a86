"""Dask for blipdiff: a cluster to run on, and work mapped over it in order.

Three users share it: the context stage's shards (components/context/distributed.py),
`blipdiff batch`'s batches (serving/batch.py) and evaluate's subjects
(components/stages/evaluate.py). `open_cluster` starts a `LocalCluster` of worker processes
on loopback only, without a dashboard, quiet, closed on the way out (a `LocalCUDACluster`,
one worker per GPU, where the caller runs on a GPU and dask-cuda is installed), or connects
to an existing scheduler with a clear one-line error when none answers. `map_ordered` sends
each item to the workers with one object every item needs (sent once per worker) and gives
the results back in the items' order, at most a few per thread in flight, so the caller's
memory does not grow with the work. An exception in a worker (a BlipDiffError included) is
raised again in the caller as it is. `params.yaml` `dask:` (DaskConfig) or the environment
variable BLIPDIFF_DASK_ADDRESS choose for the stages; `blipdiff batch` has its own flags.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from components.core.config import DaskConfig
from components.core.errors import BlipDiffError

log = logging.getLogger(__name__)

ADDRESS_ENV = "BLIPDIFF_DASK_ADDRESS"
TASKS_PER_THREAD = 2  # in flight: enough to keep every thread busy, few enough to bound memory
# How a stage's errors name the address and the way back to running locally.
STAGE_SETTING = "dask.address"
STAGE_HINT = f"fix the address (or {ADDRESS_ENV}), or set dask.address: null to run locally"

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


def scheduler_address(cfg: DaskConfig) -> str | None:
    """A stage's scheduler: BLIPDIFF_DASK_ADDRESS, else `dask.address`."""
    return os.environ.get(ADDRESS_ENV) or cfg.address


def address_setting() -> str:
    """What gave a stage's address, for its errors."""
    return ADDRESS_ENV if os.environ.get(ADDRESS_ENV) else STAGE_SETTING


# --------------------------------------------------------------------------- clusters
@dataclass(frozen=True)
class Cluster:
    client: Any  # distributed.Client
    name: str  # for the log: "on a Dask LocalCluster (2 workers, 2 threads)"
    workers: int
    threads: int  # all workers together
    remote: bool  # an existing scheduler (not started here)

    def map(self, fn: Callable[[S, T], R], shared: S, items: Iterable[T]) -> Iterator[R]:
        """`fn(shared, item)` of each item on the workers, in the items' order (`map_ordered`)."""
        return map_ordered(self.client, fn, shared, items, self.threads)


@contextmanager
def open_cluster(address: str | None, workers: int, threads_per_worker: int = 1, connect_timeout_s: float = 30.0,
                 *, setting: str = STAGE_SETTING, hint: str = STAGE_HINT, gpu: bool = False,
                 worker_env: dict[str, str | None] | None = None) -> Iterator[Cluster]:
    """The scheduler at `address` (`setting` and `hint` name it and the way back to running
    locally in the errors), or else a local cluster of `workers` processes, closed on the way
    out. `gpu`: the work runs on a GPU, so a `LocalCUDACluster` (one worker per GPU, at most
    `workers`) where dask-cuda is installed and a GPU is visible. `worker_env`: environment
    variables of a local cluster's workers; None unsets one that Dask's nannies set."""
    import distributed  # noqa: F401  (first: its import sets its loggers' levels, which _quiet changes)

    with _quiet("distributed"), _cluster(address, workers, threads_per_worker, connect_timeout_s, setting, hint,
                                         gpu, worker_env) as cluster:
        yield cluster


@contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Dask's scheduler, nanny and client log every step at INFO through the caller's handlers
    (LocalCluster's silence_logs only reaches Dask's own handlers): keep its errors only."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _cluster(address: str | None, workers: int, threads_per_worker: int, connect_timeout_s: float, setting: str,
             hint: str, gpu: bool, worker_env: dict[str, str | None] | None) -> Iterator[Cluster]:
    from distributed import Client

    if address is not None:
        with _connect(address, connect_timeout_s, setting, hint) as client:
            nthreads = client.nthreads()
            workers, threads = len(nthreads), sum(nthreads.values())
            yield Cluster(client, f"on the Dask cluster at {address} ({_size(workers, threads)})", workers, threads,
                          True)
        return
    # Loopback only, no dashboard; the scheduler's plain HTTP endpoints (health, metrics) on a
    # free loopback port rather than 8787, which another cluster may hold. Workers stay silent:
    # a task's exception comes back to the caller, which raises it; their log would repeat it.
    import dask

    options: dict[str, Any] = {"threads_per_worker": threads_per_worker, "host": "127.0.0.1",
                               "dashboard_address": None, "silence_logs": logging.CRITICAL,
                               "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}
    worker_env = worker_env or {}
    if any(v is not None for v in worker_env.values()):
        options["env"] = {k: v for k, v in worker_env.items() if v is not None}
    # None: a variable the nannies would set (distributed.nanny.pre-spawn-environ) left unset
    unset = {f"distributed.nanny.pre-spawn-environ.{k}": None for k, v in worker_env.items() if v is None}
    gpus = _gpus() if gpu else 0
    with dask.config.set(unset):  # read when the nannies are made
        if gpus:
            from dask_cuda import LocalCUDACluster

            if workers > gpus:
                log.warning("%d Dask workers asked for, %d GPUs: %d workers, one per GPU", workers, gpus, gpus)
            workers, kind = min(workers, gpus), "LocalCUDACluster"
            cluster = LocalCUDACluster(n_workers=workers, **options)
        else:
            from distributed import LocalCluster

            kind = "LocalCluster"
            cluster = LocalCluster(n_workers=workers, processes=True, **options)
    with cluster, Client(cluster, set_as_default=False) as client:
        threads = workers * threads_per_worker
        yield Cluster(client, f"on a Dask {kind} ({_size(workers, threads)})", workers, threads, False)


def _gpus() -> int:
    """The GPUs a LocalCUDACluster would give a worker each: none without dask-cuda."""
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return 0
    import torch

    return torch.cuda.device_count()


def _size(workers: int, threads: int) -> str:
    return f"{workers} worker{'s' * (workers != 1)}, {threads} thread{'s' * (threads != 1)}"


def _connect(address: str, timeout_s: float, setting: str = STAGE_SETTING, hint: str = STAGE_HINT):
    from distributed import Client
    from distributed.comm import parse_address
    from distributed.comm.registry import get_backend

    try:
        get_backend(parse_address(address)[0])  # an unknown scheme
        client = Client(address, timeout=timeout_s, set_as_default=False)
    except ValueError as exc:  # a missing or bad port, an unknown scheme
        raise BlipDiffError(f"{setting} {address}: not a Dask scheduler address ({exc}); give tcp://HOST:PORT") \
            from None
    except (OSError, TimeoutError) as exc:
        raise BlipDiffError(
            f"{setting} {address}: no Dask scheduler answered within {timeout_s:g} s "
            f"({type(exc).__name__}); start one (`dask scheduler`), {hint}"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except (OSError, TimeoutError):
        client.close()
        raise BlipDiffError(f"{setting} {address}: the scheduler has no workers after {timeout_s:g} s "
                            "(start some with `dask worker " + address + "`)") from None
    return client


def map_ordered(client, fn: Callable[[S, T], R], shared: S, items: Iterable[T], threads: int) -> Iterator[R]:
    """`fn(shared, item)` of each item on the workers, the results in the items' order;
    `shared` is sent once to each worker. At most TASKS_PER_THREAD items per thread (at least
    4) are in flight; pending ones are cancelled if the caller stops early (an error) or an
    item fails, whose exception is raised here as it is."""
    shared_on_workers = client.scatter(shared, broadcast=True, hash=False)  # sent once per worker
    window = max(4, TASKS_PER_THREAD * threads)
    remaining = iter(items)
    pending: deque = deque()

    def submit(item: T) -> None:
        pending.append(client.submit(fn, shared_on_workers, item, pure=False))

    try:
        for item in remaining:
            submit(item)
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()  # re-raises a worker's exception here
            item = next(remaining, None)
            if item is not None:
                submit(item)
            yield result
    finally:
        if pending:
            client.cancel(list(pending))
        client.cancel([shared_on_workers])


def torch_worker_env() -> dict[str, str | None]:
    """`worker_env` for a local cluster doing torch work (`blipdiff batch`, evaluate's
    generation): the workers run with this process's torch threads (Dask would give each one):
    on a CPU the thread count can change a result's last bits, so the bytes stay those of an
    in-process run. OMP_NUM_THREADS sets it (e.g. cores / workers, for throughput). And
    without Dask's MALLOC_TRIM_THRESHOLD_: set at all, it turns off glibc's adaptive mmap
    threshold, so every large tensor is a fresh mmap; torch on a CPU ran at half speed with it."""
    import torch

    threads = str(torch.get_num_threads())
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "MALLOC_TRIM_THRESHOLD_": None}

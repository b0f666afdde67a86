"""Where the context stage's shards run: in its own process, or over a Dask cluster
(components/cluster.py).

`params.yaml` `dask:` (components.core.config.DaskConfig) chooses, and
never changes the outputs, so no stage lists it in dvc.yaml:
- `workers: 0` (the default): in the stage's process, shard after shard, no Dask.
- `workers: N`: a `LocalCluster` of N worker processes (`threads_per_worker` threads each).
- `address: tcp://host:8786` (or the environment variable BLIPDIFF_DASK_ADDRESS): an
  existing scheduler; overrides `workers`. Its workers need blipdiff installed (the same
  code) and the repository's files at the stage's path (a shared filesystem): they read the
  subject images and folder backgrounds there. They write nothing: the PNG bytes, rows and
  stats of each shard come back to the stage, which writes them into its temporary output.

Each shard is `components.context.generation.process_shard`, the same call as in-process;
a worker builds CLIPSeg once per stage run (on its first shard that needs it), not per
shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from components.cluster import address_setting, open_cluster, scheduler_address
from components.core.config import DaskConfig

if TYPE_CHECKING:
    from components.context.generation import ContextJob, Segmenters, ShardResult, SubjectImage

    Shards = list[list[SubjectImage]]


# --------------------------------------------------------------------------- the context stage
@dataclass(frozen=True)
class Executor:
    name: str  # where the shards ran, for the log: "in this process", "on a Dask LocalCluster (...)"
    workers: int  # 0: the stage's own process
    threads: int
    remote: bool  # an existing cluster (dask.address)
    run: Callable[[ContextJob, Shards], Iterator[ShardResult]]  # shard results, in order


@contextmanager
def open_executor(cfg: DaskConfig) -> Iterator[Executor]:
    """The executor `cfg` asks for; a cluster started here is closed on the way out."""
    address = scheduler_address(cfg)
    if address is None and cfg.workers == 0:
        from components.context.generation import run_serial

        yield Executor("in this process", 0, 0, False, run_serial)
        return
    with open_cluster(address, cfg.workers, cfg.threads_per_worker, cfg.connect_timeout_s,
                      setting=address_setting()) as cluster:
        yield Executor(cluster.name, cluster.workers, cluster.threads, cluster.remote,
                       lambda job, shards: cluster.map(_run_shard, job, shards))


@cache
def _worker_segmenters() -> Segmenters:
    """In a worker process: its CLIPSeg, built on its first shard of a stage run that needs one."""
    from components.context.generation import Segmenters

    return Segmenters()


def _run_shard(job: ContextJob, shard: list[SubjectImage]) -> ShardResult:
    from components.context.generation import process_shard

    return process_shard(job, shard, _worker_segmenters().get)

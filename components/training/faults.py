"""Fault injection for tests: end a training run after a given step, as a crash would.

Two environment variables, read after every step of `loop.train_loop`:

- `BLIPDIFF_STOP_AFTER_STEP=N`: after step N's checkpoint the run raises a `BlipDiffError`
  (the stage ends with an error; `--resume latest` continues from that checkpoint).
- `BLIPDIFF_KILL_AFTER_STEP=STAGE:N`: after step N of STAGE the process writes a
  checkpoint and kills itself (SIGKILL), as the OOM killer or a preempted machine would:
  no error handling runs. A resumed run starts after it.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from components.core.errors import BlipDiffError

log = logging.getLogger(__name__)

STOP_AFTER_ENV = "BLIPDIFF_STOP_AFTER_STEP"  # "N": raise after step N's checkpoint
KILL_AFTER_ENV = "BLIPDIFF_KILL_AFTER_STEP"  # "STAGE:N": SIGKILL after step N's checkpoint


def stop_after_step() -> int | None:
    return int(os.environ.get(STOP_AFTER_ENV, "0")) or None


def after_step(stage: str, done: int, checkpoint: Callable[[], object], checkpointed: bool) -> None:
    """The faults asked for after step `done` of `stage`. `checkpoint()` writes a checkpoint
    of this step; `checkpointed`: the loop has just written its regular one."""
    stop_after = stop_after_step()
    if done == stop_after and not checkpointed:
        checkpoint()
    if f"{stage}:{done}" == os.environ.get(KILL_AFTER_ENV):
        checkpoint()
        log.warning("step %d: killing this process (%s)", done, KILL_AFTER_ENV)
        os.kill(os.getpid(), signal.SIGKILL)
    if done == stop_after:
        raise BlipDiffError(f"stopped after step {done} ({STOP_AFTER_ENV}); resume with --resume latest")

"""Start a command under `accelerate launch` with two CPU processes, as the tests do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def launch_two(target: list[str], cwd: Path, what: str, timeout: int = 300) -> str:
    """Run `target` (a script and its arguments, or `-m module ...`) in 2 processes; return the
    combined output. Fails the test on a non-zero exit or a hang (every rank is killed).

    On a machine without GPUs, --multi_gpu starts torch.distributed processes that
    accelerate runs as MULTI_CPU (gloo); --cpu alone would start a single process.
    """
    from flows.servers import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session, so that a hang kills every rank, not only the launcher.
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                             "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "--main_process_port", str(free_port()), *target],
                            cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} with 2 processes hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out

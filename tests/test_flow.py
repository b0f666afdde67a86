"""The Prefect flow drives `dvc repro` per stage and nests the stage runs in MLflow."""

import os
import subprocess
import sys

import mlflow
import pytest

from components import tracking

pytestmark = pytest.mark.slow


def _flow(work, env):
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1], proc.stdout + proc.stderr


def test_flow_runs_stages_in_order_under_one_parent_run(checkout, tmp_path):
    work, env = checkout
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}
    result, logs = _flow(work, env)
    assert result == "{'ingest': 'ran', 'context': 'ran'}"
    assert "Task run 'dvc repro context'" in logs and "wrote 24 pairs" in logs

    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pipeline", "ingest", "context"}
    parent_id = runs["pipeline"].info.run_id
    assert runs["ingest"].data.tags["mlflow.parentRunId"] == parent_id
    assert runs["context"].data.tags["mlflow.parentRunId"] == parent_id

    # second run: DVC finds nothing stale, no new stage run in MLflow
    result, _ = _flow(work, env)
    assert result == "{'ingest': 'up to date', 'context': 'up to date'}"
    assert len(client.search_runs([exp.experiment_id])) == 4  # one more parent, no stage runs

"""The Prefect flow drives `dvc repro` per stage and nests the stage runs in MLflow."""

import os
import signal
import subprocess
import sys

import mlflow
import pytest

from components.core import paths, tracking

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
    assert result == ("{'ingest': 'ran', 'context': 'ran', 'pretrain_qformer': 'ran', 'train_subject': 'ran', "
                      "'evaluate': 'ran', 'export': 'ran'}")
    assert "Task run 'dvc repro context'" in logs and "wrote 24 pairs" in logs

    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pipeline", "ingest", "context", "pretrain_qformer", "train_subject", "evaluate",
                         "export"}
    parent_id = runs["pipeline"].info.run_id
    for stage in ("ingest", "context", "pretrain_qformer", "train_subject", "evaluate", "export"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent_id
    # the evaluation names the model run it scored, and the registered version carries its scores
    model_run = runs["train_subject"].info.run_id
    assert runs["evaluate"].data.tags["evaluated_run_id"] == model_run
    version = client.search_model_versions(f"run_id = '{model_run}'")[0]
    assert version.tags["dreambench.run_id"] == runs["evaluate"].info.run_id
    assert float(version.tags["dreambench.zero_shot_dino"]) == pytest.approx(
        runs["evaluate"].data.metrics["zero_shot_dino"], abs=1e-5)

    # second run: DVC finds nothing stale, no new stage run in MLflow
    result, _ = _flow(work, env)
    assert result == ("{'ingest': 'up to date', 'context': 'up to date', 'pretrain_qformer': 'up to date', "
                      "'train_subject': 'up to date', 'evaluate': 'up to date', 'export': 'up to date'}")
    assert len(client.search_runs([exp.experiment_id])) == 8  # one more parent, no stage runs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_deployment_run(checkout, tmp_path):
    """The README's way: a Prefect server, the flow served as a deployment, `prefect deployment run`."""
    import time
    import urllib.request

    work, env = checkout
    port = _free_port()
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    bin_dir = os.path.dirname(sys.executable)
    procs = []
    try:
        procs.append(subprocess.Popen([f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "prefect server did not start in 120 s"
                time.sleep(1)
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.pipeline", "serve"], cwd=work, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        name = "blip-diffusion-pipeline/default"
        while subprocess.run([f"{bin_dir}/prefect", "deployment", "inspect", name], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline + 60, "deployment was not registered"
            time.sleep(2)
        run = subprocess.run([f"{bin_dir}/prefect", "deployment", "run", name, "--watch",
                              "--watch-timeout", "300"], env=env, capture_output=True, text=True, timeout=360)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout + run.stderr
        assert (work / paths.PAIRS_MANIFEST).is_file()
    finally:
        for proc in procs:
            for sig in (signal.SIGINT, signal.SIGKILL):  # serve ignores a plain SIGTERM
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=15)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue

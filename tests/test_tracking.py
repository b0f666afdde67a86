import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow

from components.cli import main
from components.core import paths, tracking

REPO = Path(__file__).resolve().parents[1]


def _runs(uri):
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    return client.search_runs([exp.experiment_id])


def test_stage_run_tags_params_and_nesting(tmp_path, monkeypatch):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(tracking.DEFAULT_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="flow") as parent:
        pass
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.info.run_id)
    params = {"ingest": {"seed": 3, "synthetic": {"num_subjects": 2}}}
    with tracking.stage_run("ingest", params, REPO) as run:
        tracking.log_metrics({"images_written": 7, "flag": True, "name": "x"})
    got = mlflow.get_run(run.info.run_id)
    assert got.info.run_name == "ingest"
    assert got.data.tags["dvc_stage"] == "ingest"
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.tags["params_hash"] == tracking.params_hash(params)
    assert len(got.data.tags["git_commit"]) in (7, 40) or got.data.tags["git_commit"] == "unknown"
    assert got.data.params == {"ingest.seed": "3", "ingest.synthetic.num_subjects": "2"}
    assert got.data.metrics == {"images_written": 7.0}


def test_default_store_is_in_the_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_cli_stage_writes_metrics_json_and_mlflow_run(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    code = main(["ingest", "-S", "ingest.synthetic.num_subjects=2", "-S", "ingest.synthetic.image_size=48"])
    assert code == 0
    metrics = json.loads((tmp_path / paths.metrics_file("ingest")).read_text())
    assert metrics["subjects_written"] == 2
    assert not [k for k in metrics if k.startswith("seconds_")]  # timings: MLflow only
    (run,) = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.metrics["seconds_wall"] > 0
    assert run.data.metrics["images_written"] == metrics["images_written"]
    assert run.data.params["ingest.synthetic.num_subjects"] == "2"
    artifacts = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="samples")
    assert len(artifacts) == 2
    first = (tmp_path / paths.metrics_file("ingest")).read_bytes()
    assert main(["ingest", "-S", "ingest.synthetic.num_subjects=2", "-S", "ingest.synthetic.image_size=48"]) == 0
    assert (tmp_path / paths.metrics_file("ingest")).read_bytes() == first  # same params, same bytes


def test_cli_bad_params_one_line_error_nonzero_exit(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("max_side: 512", "max_sde: 512"))
    proc = subprocess.run(
        [sys.executable, "-m", "components.cli", "ingest", "--params", str(params)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("blipdiff ingest: error: ") and "ingest.max_sde: unknown key" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()

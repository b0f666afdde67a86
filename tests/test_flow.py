"""The Prefect flow over DVC: overrides, failure classification and retries, resume of a killed
training stage, registry promotion. The deployment end to end (servers on loopback) is in
tests/test_deployment.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from components.core import tracking
from components.core.config import load_params
from components.core.errors import STAGE_REPORTS_ENV
from flows import dvc_ops, pipeline

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("overrides", [
    {"train_subject.steps": 300},
    {"ingest.source": "dreambench", "evaluate.subjects": ["dog", "cat2"]},
    {"evaluate.model": "models:/blip-diffusion@champion", "evaluate.resolution": None},
    {"context.normalize_probs": True, "train_subject.learning_rate": 2e-6},
    {"ingest.folder.path": "/data/my photos, 2024"},
])
def test_overrides_reach_params_as_typed_values(overrides):
    params = load_params(REPO / "params.yaml", dvc_ops.override_args(overrides)).model_dump()
    for key, value in overrides.items():
        node = params
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_bad_override_fails_before_dvc_starts():
    with pytest.raises(Exception, match="train_subject"):
        dvc_ops.check_overrides(REPO, {"train_subject.no_such_key": 1})
    with pytest.raises(Exception, match="steps"):
        dvc_ops.check_overrides(REPO, {"train_subject.steps": "many"})


def test_experiment_name_is_a_valid_unique_ref(monkeypatch):
    monkeypatch.setattr(dvc_ops, "experiments", lambda root: {"witty-falcon": "abc"})
    assert pipeline.experiment_name("witty-falcon", REPO) == "witty-falcon-2"
    assert pipeline.experiment_name("a b/c:d", REPO) == "a-b-c-d"


# ------------------------------------------------------------------- failures as data
def _write(folder: Path, stage: str, **report):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.json").write_text(json.dumps({"stage": stage, **report}))


def test_failure_kinds(tmp_path):
    from dvc.exceptions import ReproductionError
    from dvc.lock import LockError

    try:
        try:
            raise LockError("Unable to acquire lock")
        except LockError as inner:
            raise ReproductionError("failed to reproduce 'ingest'") from inner
    except ReproductionError as exc:
        assert dvc_ops._failure(exc, tmp_path / "none") == {
            "kind": dvc_ops.LOCK, "transient": True, "message": "failed to reproduce 'ingest'"}

    failed = tmp_path / "failed"
    _write(failed, "ingest", status="done")
    _write(failed, "context", status="failed", error_type="BlipDiffError", message="no images", transient=False)
    error = dvc_ops._failure(RuntimeError("dvc"), failed)
    assert (error["kind"], error["stage"], error["transient"]) == (dvc_ops.STAGE_FAILED, "context", False)
    assert error["message"] == "context: BlipDiffError: no images"

    lost = tmp_path / "lost"
    _write(lost, "evaluate", status="failed", error_type="ConnectionError", message="refused", transient=True)
    assert dvc_ops._failure(RuntimeError("dvc"), lost)["transient"] is True

    killed = tmp_path / "killed"
    _write(killed, "train_subject", status="running", pid=1)
    error = dvc_ops._failure(RuntimeError("exited with -9"), killed)
    assert (error["kind"], error["stage"], error["transient"]) == (dvc_ops.STAGE_KILLED, "train_subject", True)

    assert dvc_ops._failure(RuntimeError("bad dvc.yaml"), tmp_path / "empty")["kind"] == dvc_ops.DVC_ERROR


def test_stage_reports_its_error(tmp_path):
    """`blipdiff <stage>` writes its report: running, then failed with the error's type."""
    (tmp_path / "params.yaml").write_text("ingest:\n  source: folder\n  folder:\n    path: /no/such/folder\n")
    reports = tmp_path / "reports"
    env = {**os.environ, STAGE_REPORTS_ENV: str(reports)}
    proc = subprocess.run([sys.executable, "-m", "components.cli", "ingest"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    report = json.loads((reports / "ingest.json").read_text())
    assert report["status"] == "failed" and report["error_type"] == "BlipDiffError"
    assert "/no/such/folder" in report["message"] and report["transient"] is False


def test_retry_condition_only_for_transient_failures():
    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert pipeline._retry_transient(None, None, State(pipeline.DvcFailure({"transient": True})))
    assert not pipeline._retry_transient(None, None, State(pipeline.DvcFailure({"transient": False})))
    assert not pipeline._retry_transient(None, None, State(ValueError("a bug")))


# ------------------------------------------------------------------------ MLflow
def test_experiment_opens_as_model_training(tmp_path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment(tracking.experiment_id(tmp_path))
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment created elsewhere without the tag gets it
    client = mlflow.MlflowClient()
    client.delete_experiment_tag(experiment.experiment_id, tracking.EXPERIMENT_KIND_TAG)
    tracking.experiment_id(tmp_path)
    assert client.get_experiment(experiment.experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == \
        "custom_model_development"


def _versions(n: int) -> list[str]:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    client.create_registered_model("blip-diffusion")
    return [client.create_model_version("blip-diffusion", f"file:///tmp/m{i}").version for i in range(n)]


def test_promotion_by_dino_then_clip_t():
    from components.model import registry

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    v1, v2, v3, v4 = _versions(4)
    assert registry.promote_if_better("blip-diffusion", v1, {"dino": 0.5, "clip_t": 0.3}, "p")[
        "promotion.decision"] == "promoted"
    # lower DINO: kept, and both versions say so
    decision = registry.promote_if_better("blip-diffusion", v2, {"dino": 0.4, "clip_t": 0.9}, "p")
    assert decision["promotion.decision"] == "kept" and decision["promotion.compared_with"] == v1
    assert client.get_model_version_by_alias("blip-diffusion", "champion").version == v1
    assert client.get_model_version("blip-diffusion", v1).tags["promotion.last_challenge"].startswith(
        f"defended against version {v2}")
    # same DINO, better CLIP-T: promoted
    assert registry.promote_if_better("blip-diffusion", v3, {"dino": 0.5, "clip_t": 0.31}, "p")[
        "promotion.decision"] == "promoted"
    assert client.get_model_version_by_alias("blip-diffusion", "champion").version == v3
    assert client.get_model_version("blip-diffusion", v1).tags["promotion.last_challenge"] == \
        f"superseded by version {v3}"
    # another evaluation protocol is not comparable: kept, with the reason
    decision = registry.promote_if_better("blip-diffusion", v4, {"dino": 0.9, "clip_t": 0.9}, "other")
    assert decision["promotion.decision"] == "kept" and "protocol" in decision["promotion.reason"]
    assert client.get_model_version_by_alias("blip-diffusion", "champion").version == v3
    # re-evaluating the champion itself
    assert registry.promote_if_better("blip-diffusion", v3, {"dino": 0.5, "clip_t": 0.31}, "p")[
        "promotion.decision"] == "champion"


# ---------------------------------------------------------------- the flow, in-process
def _run_flow(work: Path, env: dict, code: str, timeout: int = 900) -> tuple[dict | None, str]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    logs = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1][len("RESULT "):]) if lines else None), logs


@pytest.mark.slow
def test_killed_training_is_retried_and_resumes_in_an_experiment(checkout, tmp_path):
    """A flow run with an override is a DVC experiment; train_subject killed (SIGKILL) after
    step 2 is retried and resumes from its step-2 checkpoint; the experiment has its metrics;
    the working tree's params are untouched."""
    work, env = checkout
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "BLIPDIFF_RETRY_DELAY_S": "1",
           "BLIPDIFF_KILL_AFTER_STEP": "train_subject:2"}
    params_before = (work / "params.yaml").read_text()
    code = ("import json; from flows.pipeline import pipeline; "
            "print('RESULT ' + json.dumps(pipeline(stages=['train_subject'], "
            "overrides={'train_subject.steps': 4, 'train_subject.checkpoint_every': 10})))")
    result, logs = _run_flow(work, env, code)
    assert result is not None, logs[-4000:]
    assert result["mode"] == "experiment"
    assert result["outcome"]["train_subject"] == "ran"
    assert "killing this process" in logs  # the first attempt died
    assert "attempt 2: training stages resume" in logs
    assert "resumed from" in logs and "at step 2" in logs
    assert logs.count("Running stage 'train_subject'") == 2  # killed once, resumed once
    assert (work / "params.yaml").read_text() == params_before  # --temp: the working tree stays as committed

    name = result["experiment"]
    assert name in dvc_ops.experiments(work)
    metrics = dvc_ops.metrics(work, ["train_subject"], rev=name)["train_subject"]
    assert {"loss_first", "loss_last_mean", "id_accuracy"} <= set(metrics)
    # the curve of the resumed run has every step, 1..4
    curve = subprocess.run(["git", "show", f"{result['rev']}:metrics/train_subject_curve.csv"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert [row.split(",")[0] for row in curve[1:]] == ["1", "2", "3", "4"]

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    assert parent.data.tags["dvc_experiment"] == name
    assert parent.data.params["train_subject.steps"] == "4"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in nested} >= {"train_subject"}
    trained = [r for r in nested if r.info.run_name == "train_subject" and r.info.status == "FINISHED"]
    assert trained and trained[0].data.tags["dvc_experiment"] == name
    assert trained[0].data.tags["prefect_flow_run_id"] == parent.data.tags["prefect_flow_run_id"]
    # the manifest it trained on is an MLflow dataset of the run
    inputs = client.get_run(trained[0].info.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.tags[0].value) for d in inputs] == [("pairs", "training")]


@pytest.mark.slow
def test_stage_error_fails_the_flow_without_retry(checkout, tmp_path):
    work, env = checkout
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "BLIPDIFF_RETRY_DELAY_S": "1"}
    code = ("from flows.pipeline import pipeline; "
            "pipeline(stages=['ingest'], overrides={'ingest.source': 'folder', 'ingest.folder.path': '/no/such'})")
    result, logs = _run_flow(work, env, code, timeout=300)
    assert result is None
    assert "DvcFailure: ingest: BlipDiffError: /no/such: subject folder not found" in logs
    assert logs.count("Running stage 'ingest'") == 1  # a user error is not retried

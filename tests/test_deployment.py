"""End to end on loopback, as a user runs it: a Prefect server, the project's deployments
(`prefect deploy --all` from prefect.yaml), a process-pool worker and an MLflow server, all
started by the test; two `prefect deployment run`s of the pipeline started together (one
`dvc repro`, one with a param override, i.e. a DVC experiment) both complete without
overlapping on the repository, then the evaluate-champion deployment scores the registry's
champion; then the DVC experiment, the MLflow runs, the registry aliases and decisions and the
Prefect artifacts are checked, and every server is stopped with its child processes."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import mlflow
import pytest

from components.core import tracking
from components.core.paths import DREAMBENCH_ENV
from flows import dvc_ops, servers
from tests.helpers.servers import prefect_server, prefect_worker

pytestmark = pytest.mark.slow

FLOW_TIMEOUT_S = 1200


def _post(url: str, body: dict) -> list | dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


def _run_deployment(api: str, home, work, *params: str, deployment: str = "blip-diffusion-pipeline/pipeline") -> str:
    args = ["deployment", "run", deployment]
    for p in params:
        args += ["-p", p]
    done = servers.prefect(args, api, home=home, cwd=work, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    return found.group(1)


def _wait(api: str, flow_run_ids: list[str], services) -> dict[str, dict]:
    deadline = time.monotonic() + FLOW_TIMEOUT_S
    while True:
        runs = {i: _get(f"{api}/flow_runs/{i}") for i in flow_run_ids}
        if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs.values()):
            return runs
        if time.monotonic() > deadline:
            tails = "\n".join(s.log_tail(60) for s in services)
            raise AssertionError(f"flow runs not finished after {FLOW_TIMEOUT_S} s: "
                                 f"{[(r['name'], r['state']['type']) for r in runs.values()]}\n{tails}")
        time.sleep(3)


def test_deployment_runs_end_to_end(checkout, tmp_path):
    work, env = checkout
    home, logs = tmp_path / "prefect-home", tmp_path / "logs"
    start = time.monotonic()
    started = []
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'mlflow-server.db'}", tmp_path / "mlartifacts",
                               log_dir=logs) as ml, \
            prefect_server(home=home, log_dir=logs) as pf:
        started += [ml, pf]
        servers.deploy(pf.url, work, home=home, log_dir=logs)
        deployments = _post(f"{pf.url}/deployments/filter", {})
        assert {d["name"] for d in deployments} == {"pipeline", "evaluate-champion"}
        for d in deployments:  # prefect.yaml's pull step: the flow runs in the folder deployed from
            assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                        {"directory": str(work.resolve())}}], d["pull_steps"]
        # the user's params (no test-only paths): DreamBench from the environment, as offline users give it
        worker_env = {"MLFLOW_TRACKING_URI": ml.url, "BLIPDIFF_RETRY_DELAY_S": "2",
                      DREAMBENCH_ENV: env[DREAMBENCH_ENV]}
        with prefect_worker(api_url=pf.url, home=home, cwd=work, env=worker_env, log_dir=logs) as worker:
            started.append(worker)
            # two runs started together on one repository
            exp_run = _run_deployment(pf.url, home, work, 'overrides={"train_subject.steps": 4}')
            repro_run = _run_deployment(pf.url, home, work)
            runs = _wait(pf.url, [exp_run, repro_run], started)
            for run in runs.values():
                assert run["state"]["type"] == "COMPLETED", (run["state"], worker.log_tail(80))
            artifacts = _post(f"{pf.url}/artifacts/filter",
                              {"artifacts": {"flow_run_id": {"any_": [exp_run]}}})
            # the scheduled deployment, run by hand: the registry's champion on DreamBench
            champion_run = _run_deployment(pf.url, home, work, deployment="blip-diffusion-evaluate/evaluate-champion")
            (champion_state,) = _wait(pf.url, [champion_run], started).values()
            assert champion_state["state"]["type"] == "COMPLETED", (champion_state["state"], worker.log_tail(80))
        elapsed = time.monotonic() - start
        print(f"deployment end to end: {elapsed:.0f} s")

        # the run with an override is a DVC experiment named after the flow run
        name = runs[exp_run]["name"]
        experiments = dvc_ops.experiments(work)
        assert name in experiments, experiments
        metrics = dvc_ops.metrics(work, ["train_subject", "evaluate", "export"], rev=name)
        assert metrics["train_subject"]["loss_first"] > 0
        assert "zero_shot_dino" in metrics["evaluate"] and metrics["export"]["graphs"] == 6  # the four and the ControlNet's pair

        # MLflow: one parent run per flow run; the experiment's has a nested run per stage
        client = mlflow.MlflowClient(ml.url)
        experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
        assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
        all_runs = client.search_runs([experiment.experiment_id])
        parents = {r.data.tags["prefect_flow_run_id"]: r for r in all_runs if r.info.run_name == "pipeline"}
        assert set(parents) == {exp_run, repro_run, champion_run}
        champion_parent = parents.pop(champion_run)
        assert champion_parent.data.params["evaluate.model"] == "models:/blip-diffusion@champion"
        outcomes = {}
        for flow_run_id, run in parents.items():
            folder = tmp_path / run.info.run_id
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="outcome.json",
                                                tracking_uri=ml.url, dst_path=str(folder))
            outcomes[flow_run_id] = json.loads((folder / "outcome.json").read_text())
        parent = parents[exp_run]
        assert parent.data.tags["dvc_experiment"] == name and parent.data.params["train_subject.steps"] == "4"
        assert parent.data.metrics["evaluate.zero_shot_dino"] == pytest.approx(metrics["evaluate"]["zero_shot_dino"])
        # each flow run's nested stage runs are exactly the stages whose command ran in it (DVC
        # skips a stage the other flow run already brought up to date, or restores it from its
        # run cache, and then no stage run is made)
        for flow_run_id, run in parents.items():
            nested = {r.info.run_name for r in all_runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
            executed = {s for s, state in outcomes[flow_run_id]["outcome"].items() if state == "ran"}
            assert nested == executed, (flow_run_id, nested, outcomes[flow_run_id])
            assert all(r.data.tags.get("prefect_flow_run_id") == flow_run_id for r in all_runs
                       if r.data.tags.get("mlflow.parentRunId") == run.info.run_id)
        # the override changed train_subject's params: it and everything after it ran
        assert {"train_subject", "evaluate", "export"} <= set(
            s for s, state in outcomes[exp_run]["outcome"].items() if state == "ran")
        ingest_ran = [fr for fr, o in outcomes.items() if o["outcome"].get("ingest") == "ran"]
        assert ingest_ran, outcomes  # the checkout started with no data: one of the two ran it

        # the repository had one writer at a time: the DVC parts of the two runs do not overlap
        spans = sorted((o["started"], o["finished"], o["waited_s"]) for o in outcomes.values())
        (a0, a1, _), (b0, b1, _) = spans
        assert a1 <= b0, f"the two runs used the repository at the same time: {spans}"
        assert max(s[2] for s in spans) > 0  # the second one waited for the first

        # evaluate-champion: `evaluate` alone (nothing upstream retrained), the champion scored again
        folder = tmp_path / champion_parent.info.run_id
        mlflow.artifacts.download_artifacts(run_id=champion_parent.info.run_id, artifact_path="outcome.json",
                                            tracking_uri=ml.url, dst_path=str(folder))
        assert json.loads((folder / "outcome.json").read_text())["outcome"] == {"evaluate": "ran"}
        nested = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == champion_parent.info.run_id]
        assert [r.info.run_name for r in nested] == ["evaluate"]

        # registry: each pipeline run trained and registered a version; the newest is the
        # candidate; the second was compared with the first under the same protocol
        versions = {v.version: v for v in client.search_model_versions("name='blip-diffusion'")}
        assert set(versions) == {"1", "2"}
        assert client.get_model_version_by_alias("blip-diffusion", "candidate").version == "2"
        champion = client.get_model_version_by_alias("blip-diffusion", "champion")
        assert champion.tags["promotion.decision"] == "champion", champion.tags  # re-evaluated, stays
        assert champion.tags["promotion.reason"] == "re-evaluated the champion"
        assert nested[0].data.tags["evaluated_model_version"] == f"blip-diffusion/{champion.version}"
        first, second = versions["1"].tags, versions["2"].tags
        if champion.version == "2":
            assert first["promotion.last_challenge"] == "superseded by version 2", first
        else:
            assert second["promotion.decision"] == "kept" and second["promotion.compared_with"] == "1", second
            assert first["promotion.last_challenge"].startswith("defended against version 2"), first

        # Prefect artifacts: the metrics table with MLflow links, and the evaluation
        keys = {a["key"] for a in artifacts}
        assert any(k.startswith("pipeline-") for k in keys) and any(k.startswith("evaluation-") for k in keys), keys
        table = next(a for a in artifacts if a["key"].startswith("pipeline-"))["data"]
        assert "## train_subject: ran" in table and f"{ml.url}/#/experiments/" in table
    for service in started:
        assert not service.leftovers(), f"{service.name} left processes behind: {service.leftovers()}"

"""Prefect flows over the DVC pipeline: DVC decides what is stale and versions every output,
Prefect runs it as deployments with retries, logs and artifacts, MLflow nests every stage
run under the flow's run.

- `pipeline(stages, overrides)`: without overrides, `dvc repro [stages]`; with overrides
  ({"train_subject.steps": 300}), a DVC experiment named after the flow run
  (`dvc exp run --temp -S ... -n <flow run name>`), so `dvc exp show` lists every flow run
  that changed a param, with its params and metrics, and the working tree stays as committed.
- `evaluate_champion(model, overrides)`: the `evaluate` stage alone (`dvc exp run -s`, no
  upstream stage is reproduced), against a registered model (default
  `models:/blip-diffusion@champion`), e.g. on a schedule.

DVC runs through its Python API in a child process (flows.dvc_ops: the stages' output streams
into the flow log, and a stage that is killed cannot take the flow run down with it); what ran
and why it failed come back as data. One repository has one writer: the DVC call holds a
Prefect global concurrency limit named after the repository (limit 1), so a second flow run
waits for the first instead of failing on DVC's lock. The DVC task is retried only for
transient failures (DVC's lock held by another process, a stage killed before it could report,
a stage that lost a connection); a retried training stage resumes from its newest checkpoint
made with the same params and data (BLIPDIFF_RESUME=auto). Other failures fail the flow run
with the stage's own error as its message.

Deployments are in prefect.yaml (process work pool `blip-diffusion`); `make serve` starts the
servers and a worker. By hand:

    prefect deployment run 'blip-diffusion-pipeline/pipeline' --watch
    prefect deployment run 'blip-diffusion-pipeline/pipeline' -p overrides='{"train_subject.steps": 300}' --watch
    python -m flows.pipeline [STAGE ...]            # the flow once, in this process
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency

from components.core import tracking
from components.core.paths import CHECKPOINTS_ENV, RESUME_ENV  # checkpoints outside DVC's temporary copy
from flows import dvc_ops, reports

REPO = Path(__file__).resolve().parents[1]
RETRIES = 2
RETRY_DELAY_S = float(os.environ.get("BLIPDIFF_RETRY_DELAY_S", "30"))
REGISTERED_CHAMPION = "models:/blip-diffusion@champion"


def dvc_stages(root: Path = REPO) -> list[str]:
    """Stage names in dvc.yaml order (which is pipeline order)."""
    return dvc_ops.stages(root)


class DvcFailure(RuntimeError):
    """A DVC operation failed; `error` says how (flows.dvc_ops) and whether a retry may help."""

    def __init__(self, error: dict[str, Any]):
        self.error = error
        super().__init__(error.get("message", "DVC failed"))

    @property
    def transient(self) -> bool:
        return bool(self.error.get("transient"))


def _retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: only failures a later attempt can get past."""
    try:
        state.result()
    except DvcFailure as exc:
        return exc.transient
    except Exception:
        return False
    return False


def repo_limit_name(root: Path) -> str:
    """The global concurrency limit of one repository (its resolved path)."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"blipdiff-repo-{digest}"


def ensure_repo_limit(name: str) -> None:
    """Create the limit (1 slot) if it does not exist yet; never change an existing one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another flow run created it meanwhile
                pass


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_transient,
      task_run_name="{label}")
def dvc_task(label: str, mode: str, targets: list[str], overrides: dict[str, Any], name: str | None,
             root: str, env_extra: dict[str, str], single_item: bool = False) -> dict[str, Any]:
    """One DVC operation (flows.dvc_ops in a child process), its output streamed to this log."""
    from prefect.runtime import task_run

    logger = get_run_logger()
    env = {**os.environ, **env_extra, "TQDM_DISABLE": "1"}  # progress bars are for terminals
    # the venv's bin first, so `blipdiff` (the stages' command) resolves to this install
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if task_run.run_count > 1:
        env[RESUME_ENV] = "auto"  # a retried training stage continues from its checkpoint
        logger.info("attempt %d: training stages resume from their newest matching checkpoint", task_run.run_count)
    with tempfile.TemporaryDirectory(prefix="blipdiff-dvc-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "flows.dvc_ops", str(result_file), mode, *targets, "--root", root]
        if mode == "exp":
            cmd += ["--overrides", json.dumps(overrides), "--name", str(name)]
        if single_item:
            cmd.append("--single-item")
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            if line.strip():
                logger.info(line.rstrip())
        code = proc.wait()
        if not result_file.is_file():
            raise DvcFailure({"kind": dvc_ops.STAGE_KILLED, "transient": True,
                              "message": f"the DVC process died without a result (exit {code})"})
        result = json.loads(result_file.read_text())
    if not result["ok"]:
        raise DvcFailure(result["error"])
    return result


@task(retries=3, retry_delay_seconds=5)
def open_parent_run(root: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    """The flow's MLflow run (retried: the tracking server may be restarting)."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(Path(root)))
    client = mlflow.MlflowClient()
    run = client.create_run(tracking.experiment_id(Path(root)), run_name=run_name, tags=tags)
    flat = tracking.flatten(params)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def experiment_name(flow_run_name: str, root: Path) -> str:
    """The DVC experiment's name: the flow run's, made a valid git ref name, unique."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", flow_run_name).strip("-.") or "flow-run"
    taken = set(dvc_ops.experiments(root))
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


@flow(name="blip-diffusion-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, overrides: dict[str, Any] | None = None,
             root: str = str(REPO)) -> dict[str, Any]:
    """Run the DVC pipeline (all stages or `stages` and what they need).

    Args:
        stages: stage names from dvc.yaml (default: all, in pipeline order).
        overrides: params.yaml values for this run, as {"section.key": value}; the run is then a
            DVC experiment named after the flow run (`dvc exp run -S key=value`).
        root: the repository (default: the one this flow's code is in).
    """
    return run_stages(stages, overrides, root)


@flow(name="blip-diffusion-evaluate", log_prints=True)
def evaluate_champion(model: str = REGISTERED_CHAMPION, overrides: dict[str, Any] | None = None,
                      root: str = str(REPO)) -> dict[str, Any]:
    """Evaluate a registered model on DreamBench (stage `evaluate` only), as a DVC experiment.

    Args:
        model: the model to evaluate: models:/NAME@ALIAS, models:/NAME/VERSION or a folder.
        overrides: more params.yaml values, e.g. {"evaluate.subjects": "all"}.
        root: the repository.
    """
    # `evaluate` alone (`dvc exp run -s`): the registered model is scored as it is, and a stale
    # stage before `evaluate` in the working tree is never retrained on the way
    return run_stages(["evaluate"], {"evaluate.model": model, **(overrides or {})}, root, single_item=True)


def run_stages(stages: list[str] | None, overrides: dict[str, Any] | None, root: str,
               single_item: bool = False) -> dict[str, Any]:
    """The body of both flows, in the calling flow run (no subflow: the MLflow parent run, the
    DVC experiment and the artifacts are named after the flow run a user started).
    `single_item`: the stages alone, not the stages they depend on (`dvc repro -s`)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    rootp = Path(root)
    all_stages = dvc_stages(rootp)
    targets = list(stages or [])
    unknown = [s for s in targets if s not in all_stages]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {all_stages}")
    overrides = dict(overrides or {})
    if overrides:
        dvc_ops.check_overrides(rootp, overrides)  # unknown keys or bad values fail here, clearly
    run_name = flow_run.name or "local"
    mode = "exp" if overrides else "repro"
    parent_run_id = _parent_run(rootp, targets, overrides, mode, run_name)
    limit = repo_limit_name(rootp)
    ensure_repo_limit(limit)
    env_extra = {tracking.FLOW_RUN_ENV: str(flow_run.id or ""),
                 CHECKPOINTS_ENV: str(tracking.store_root(rootp) / "models" / ".checkpoints")}
    if parent_run_id:
        env_extra[tracking.PARENT_RUN_ENV] = parent_run_id
    waited = time.monotonic()
    status = "FAILED"
    try:
        with concurrency(limit, occupy=1, strict=True):
            waited = time.monotonic() - waited
            if waited > 1:
                logger.info("waited %.0f s for the repository (another flow run held %s)", waited, limit)
            started = time.time()
            result, outcome, metrics = _drive_dvc(rootp, all_stages, targets, overrides, mode, run_name,
                                                  parent_run_id, env_extra, single_item)
            finished = time.time()
        status = "FINISHED"
    finally:
        if parent_run_id:
            _close_parent(rootp, parent_run_id, status)
    summary = {"mode": "experiment" if mode == "exp" else "repro", "experiment": result.get("experiment"),
               "rev": result["rev"], "outcome": outcome, "started": started, "finished": finished,
               "waited_s": round(waited, 1), "mlflow_run_id": parent_run_id}
    reports.publish(rootp, summary, metrics, parent_run_id, run_name)
    return summary


def _parent_run(rootp: Path, targets: list[str], overrides: dict[str, Any], mode: str, run_name: str) -> str | None:
    """The flow run's MLflow parent run (its params as the stages will read them), or None
    when MLflow cannot be reached."""
    from prefect.runtime import deployment, flow_run

    from components.core.config import load_params

    params = load_params(rootp / "params.yaml", dvc_ops.override_args(overrides)).model_dump()
    tags = {"git_commit": tracking.git_commit(rootp), "git_dirty": tracking.git_dirty(rootp),
            "prefect_flow_run_id": str(flow_run.id or ""), "prefect_flow_run_name": run_name,
            "prefect_deployment": str(deployment.name or ""), "dvc_mode": mode,
            "stages": ",".join(targets) or "all"}
    parent_state = open_parent_run(str(rootp), "pipeline", tags, params, return_state=True)
    parent_run_id = parent_state.result() if parent_state.is_completed() else None
    if parent_run_id is None:
        get_run_logger().warning("MLflow could not be reached: the stage runs are not nested under a flow run")
    return parent_run_id


def _drive_dvc(rootp: Path, all_stages: list[str], targets: list[str], overrides: dict[str, Any], mode: str,
               run_name: str, parent_run_id: str | None, env_extra: dict[str, str], single_item: bool):
    """`dvc repro` or a DVC experiment for the targets; (result, each stage's outcome, metrics)."""
    root = str(rootp)
    if mode == "exp":
        name = experiment_name(run_name, rootp)
        if parent_run_id:
            _set_parent_tag(rootp, parent_run_id, "dvc_experiment", name)
        label = f"dvc exp run -n {name}{' -s' * single_item} " + " ".join(dvc_ops.override_args(overrides))
        result = dvc_task(label, "exp", targets, overrides, name, root, env_extra, single_item)
    else:
        label = f"dvc repro{' -s' * single_item}" + "".join(f" {t}" for t in targets)
        result = dvc_task(label, "repro", targets, {}, None, root, env_extra, single_item)
    # the stages this run covered, in pipeline order: what ran, and what DVC found up to date
    covered = targets or all_stages
    order = [s for s in all_stages if s in covered or s in result["ran"]]
    outcome = {s: ("ran" if s in result["executed"] else
                   "restored from the run cache" if s in result["ran"] else "up to date") for s in order}
    metrics = dvc_ops.metrics(rootp, order, rev=result["rev"] if mode == "exp" else None)
    return result, outcome, metrics


def _set_parent_tag(root: Path, run_id: str, key: str, value: str) -> None:
    import mlflow

    try:
        mlflow.MlflowClient(tracking.tracking_uri(root)).set_tag(run_id, key, value)
    except Exception as exc:  # tracking never fails the flow
        get_run_logger().warning("MLflow: could not tag the flow run (%s)", exc)


def _close_parent(root: Path, run_id: str, status: str) -> None:
    import mlflow

    try:
        mlflow.MlflowClient(tracking.tracking_uri(root)).set_terminated(run_id, status)
    except Exception as exc:
        get_run_logger().warning("MLflow: could not close the flow run (%s)", exc)


if __name__ == "__main__":
    print(json.dumps(pipeline(sys.argv[1:] or None)))

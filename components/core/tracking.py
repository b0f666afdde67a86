"""MLflow tracking shared by every stage: one run per stage execution.

Defaults keep everything inside the repository's main working tree (sqlite `mlflow.db`,
artifacts under `mlartifacts/`, both git-ignored; also for runs in DVC experiments'
temporary copies) so `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows the history
with no server. `MLFLOW_TRACKING_URI` and `MLFLOW_EXPERIMENT_NAME` override them;
`BLIPDIFF_PARENT_RUN_ID` nests the run under a parent run (the Prefect flow sets it for the
`dvc repro` it drives). A tracking store that fails (server down, sqlite locked) never stops
a stage: writes are retried, kept, and written at the end of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from components.core.paths import main_worktree

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "BLIPDIFF_PARENT_RUN_ID"
FLOW_RUN_ENV = "BLIPDIFF_FLOW_RUN_ID"  # the Prefect flow run that drives this stage run (a tag)
DEFAULT_EXPERIMENT = "blip-diffusion"
# MLflow 3's UI opens an experiment without a kind on its GenAI traces overview; a
# model-training experiment opens on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def store_root(root: Path) -> Path:
    """Where the default store lives: the main working tree of the repository (also for a
    stage in a DVC experiment's temporary copy or in a git worktree)."""
    return main_worktree(root)


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root(root) / 'mlflow.db'}"


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params -> dotted keys, as MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty(root: Path) -> str:
    """"true" when tracked files differ from the commit (the run is not that commit's code)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        return "true" if out.strip() else "false"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_input_hashes(root: Path, stage: str) -> dict[str, str]:
    """The DVC hashes of the stage's data inputs, as dvc.lock records them for the stages that
    wrote them: tags `dvc.input.<path>` = md5, so a run names the exact data it read."""
    import yaml

    try:
        deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage].get("deps", [])
        lock = yaml.safe_load((root / "dvc.lock").read_text()).get("stages", {})
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    outs = {out["path"]: out.get("md5", "") for entry in lock.values() for out in entry.get("outs", [])}
    return {f"dvc.input.{dep}": outs[dep] for dep in deps if dep in outs}


def experiment_id(root: Path) -> str:
    """The experiment's id in the current tracking store, created on first use."""
    import mlflow

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifacts = (store_root(root) / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


# --------------------------------------------------------------------------- outages
# A stage never dies of its tracking: every MLflow write is retried; one that still fails is
# kept and written at the end of the stage's run (and a run that could not be opened is
# opened then); what is still unwritten then is reported, and the stage's outputs and
# metrics files are written regardless.
RETRIES = 3
RETRY_WAIT_S = 0.5
RECHECK_S = 30.0  # while writes fail, try again at most this often (training is not slowed)


@dataclass
class _Run:
    client: Any
    run_id: str | None
    pending: list[tuple[str, Callable[[Any, str], None]]] = field(default_factory=list)
    last_failure: float = 0.0
    warned: bool = False


_current: _Run | None = None


def _retry(fn: Callable[[], Any]) -> tuple[bool, Any]:
    wait = RETRY_WAIT_S
    for attempt in range(RETRIES):
        try:
            return True, fn()
        except Exception as exc:  # server down, sqlite locked, timeout, ...
            error = exc
            if attempt < RETRIES - 1:
                time.sleep(wait)
                wait *= 2
    return False, error


def _warn(run: _Run, what: str, error: BaseException) -> None:
    run.last_failure = time.monotonic()
    if not run.warned:
        run.warned = True
        log.warning("MLflow: %s failed after %d tries (%s: %s); the stage goes on and writes its MLflow "
                    "records at the end of the run", what, RETRIES, type(error).__name__, str(error)[:200])


def _flush(run: _Run) -> None:
    while run.pending and run.run_id is not None:
        what, call = run.pending[0]
        ok, error = _retry(lambda: call(run.client, run.run_id))
        if not ok:
            _warn(run, what, error)
            return
        run.pending.pop(0)


def _record(what: str, call: Callable[[Any, str], None]) -> None:
    """Write now (retried), or keep it for later when the store is unreachable."""
    run = _current
    if run is None:
        return  # outside a stage run
    run.pending.append((what, call))
    if run.run_id is not None and (len(run.pending) == 1 or time.monotonic() - run.last_failure > RECHECK_S):
        _flush(run)


@contextmanager
def stage_run(stage: str, params: dict[str, Any], root: Path) -> Iterator[Any]:
    """The MLflow run of one stage execution: its params and tags; yields it (None while the
    store is unreachable). Tracking failures never stop the stage."""
    global _current
    import mlflow  # slow to import: only stages that track pay for it
    from mlflow.entities import Param, RunStatus

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # ours retry (below): a dead server
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")  # must not cost minutes per write
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"git_commit": git_commit(root), "git_dirty": git_dirty(root), "dvc_stage": stage,
            "params_hash": params_hash(params), **dvc_input_hashes(root, stage)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if parent:
        tags["mlflow.parentRunId"] = parent
    flat = [Param(k, str(v)) for k, v in flatten(params).items()]

    def create():
        run = client.create_run(experiment_id(root), run_name=stage, tags=tags)
        for i in range(0, len(flat), 100):
            client.log_batch(run.info.run_id, params=flat[i:i + 100])
        return run

    ok, created = _retry(create)
    run = _Run(client=client, run_id=created.info.run_id if ok else None)
    if ok:
        log.info("MLflow run %s (%s) at %s", run.run_id, stage, uri)
    else:
        _warn(run, f"opening the {stage} run at {uri}", created)
    _current = run
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield created if ok else None
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        _current = None
        if run.run_id is None:
            ok, created = _retry(create)
            run.run_id = created.info.run_id if ok else None
        _flush(run)
        if run.run_id is not None:
            _retry(lambda: client.set_terminated(run.run_id, status))
        if run.pending or run.run_id is None:
            log.warning("MLflow: %d records of the %s run could not be written (%s); the stage's outputs "
                        "and metrics files are written", len(run.pending), stage,
                        ", ".join(sorted({what for what, _ in run.pending})) or "the run itself")


def current_run_id() -> str | None:
    """The id of the stage run in progress, when the store could be reached."""
    return _current.run_id if _current is not None else None


def log_metrics(metrics: dict[str, float]) -> None:
    values = {k: float(v) for k, v in metrics.items() if _is_number(v)}
    _record("metrics", lambda client, run_id: _log_metrics(client, run_id, values, None))


def log_step(metrics: dict[str, float], step: int) -> None:
    """Curves (loss, learning rate, throughput) against the training step (no-op outside a run)."""
    values = {k: float(v) for k, v in metrics.items()}
    _record("step metrics", lambda client, run_id: _log_metrics(client, run_id, values, step))


def log_images(images: dict[str, np.ndarray], folder: str = "samples") -> None:
    """Log a few uint8 HxW(x3) arrays as PNG artifacts of the stage run (no-op outside a run)."""
    for name, image in images.items():
        _record("images", lambda client, run_id, image=image, name=name:
                client.log_image(run_id, image, f"{folder}/{name}.png"))


def _log_metrics(client, run_id: str, values: dict[str, float], step: int | None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def set_tags(tags: dict[str, Any]) -> None:
    """Tags of the run in progress, e.g. where its outputs went (no-op outside a run)."""
    values = {k: str(v) for k, v in tags.items()}
    _record("tags", lambda client, run_id: client.log_batch(run_id, tags=_tags(values)))


def log_artifacts(folder: Path, artifact_path: str | None = None) -> None:
    """Copy a folder's files into the run's artifacts (no-op outside a run)."""
    _record("artifacts", lambda client, run_id: client.log_artifacts(run_id, str(folder), artifact_path))


def _tags(values: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in values.items()]


def log_dataset(frame, name: str, source: Path, context: str) -> None:
    """A table the run read or wrote (a manifest) as an MLflow dataset input: the UI lists it
    with its digest and schema on the run (no-op outside a run)."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_pandas(frame, source=str(source), name=name)
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    _record("datasets", lambda client, run_id: client.log_inputs(run_id, datasets=[entity]))

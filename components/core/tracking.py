"""MLflow tracking shared by every stage: one run per stage execution.

Defaults keep everything inside the repo (sqlite `mlflow.db`, artifacts under
`mlartifacts/`, both git-ignored) so `mlflow ui --backend-store-uri sqlite:///mlflow.db`
shows the history with no server. `MLFLOW_TRACKING_URI` and `MLFLOW_EXPERIMENT_NAME`
override them; `BLIPDIFF_PARENT_RUN_ID` nests the run under a parent run (the Prefect
flow sets it for the `dvc repro` it drives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "BLIPDIFF_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "blip-diffusion"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


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


def experiment_id(root: Path) -> str:
    """The experiment's id in the current tracking store, created on first use."""
    import mlflow

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifacts = (root / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts)


@contextmanager
def stage_run(stage: str, params: dict[str, Any], root: Path) -> Iterator[Any]:
    """Start the MLflow run of one stage execution, log its params and tags, yield it."""
    import mlflow  # slow to import: only stages that track pay for it

    mlflow.set_tracking_uri(tracking_uri(root))
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {
        "git_commit": git_commit(root),
        "dvc_stage": stage,
        "params_hash": params_hash(params),
    }
    with mlflow.start_run(
        experiment_id=experiment_id(root),
        run_name=stage,
        parent_run_id=parent,
        nested=parent is not None,
        tags=tags,
    ) as run:
        mlflow.log_params(flatten(params))
        log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, mlflow.get_tracking_uri())
        yield run


def log_metrics(metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})


def log_step(metrics: dict[str, float], step: int) -> None:
    """Curves (loss, learning rate, throughput) against the training step (no-op outside a run)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_images(images: dict[str, np.ndarray], folder: str = "samples") -> None:
    """Log a few uint8 HxW(x3) arrays as PNG artifacts of the active run (no-op outside a run)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    for name, image in images.items():
        mlflow.log_image(image, f"{folder}/{name}.png")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

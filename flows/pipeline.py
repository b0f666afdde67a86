"""Prefect flow: run the DVC stages in order, each as a retried task, under one MLflow parent run.

DVC decides what is stale (`dvc repro <stage>` runs nothing when inputs are unchanged);
Prefect adds retries, logs and deployments; MLflow nests every stage run under the
flow's run. Serve it as a deployment:

    prefect server start                           # terminal 1
    python -m flows.pipeline serve                 # terminal 2: registers and serves
    prefect deployment run 'blip-diffusion-pipeline/default'          # anywhere
    prefect deployment run 'blip-diffusion-pipeline/default' -p stages='["ingest"]'
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from components.core import tracking

REPO = Path(__file__).resolve().parents[1]


def dvc_stages(root: Path = REPO) -> list[str]:
    """Stage names in dvc.yaml order (which is pipeline order)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


@task(retries=2, retry_delay_seconds=10, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, root: str, parent_run_id: str | None) -> str:
    logger = get_run_logger()
    env = dict(os.environ)
    if parent_run_id:
        env[tracking.PARENT_RUN_ENV] = parent_run_id
    # The venv's bin first, so `dvc` and the stage commands resolve to this install.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TQDM_DISABLE"] = "1"  # progress bars are for terminals, not the flow log
    proc = subprocess.Popen(
        ["dvc", "repro", stage], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"dvc repro {stage} failed (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
    return "ran" if f"Running stage '{stage}'" in "\n".join(lines) else "up to date"


@flow(name="blip-diffusion-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = str(REPO)) -> dict[str, str]:
    """Run `stages` (default: all, in dvc.yaml order); return each stage's outcome."""
    import mlflow

    all_stages = dvc_stages(Path(root))
    stages = stages or all_stages
    unknown = [s for s in stages if s not in all_stages]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {all_stages}")
    mlflow.set_tracking_uri(tracking.tracking_uri(Path(root)))
    experiment_id = tracking.experiment_id(Path(root))
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline",
                          tags={"git_commit": tracking.git_commit(Path(root))}) as parent:
        outcome = {}
        for stage in sorted(stages, key=all_stages.index):
            outcome[stage] = repro_stage(stage, root, parent.info.run_id)
        mlflow.log_dict(outcome, "outcome.json")
    return outcome


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        pipeline.serve(name="default")
    else:
        print(pipeline(sys.argv[1:] or None))

"""What a flow run leaves for its users: Prefect artifacts (each stage's outcome and DVC
metrics with links to its MLflow run; the DreamBench summary with a link to the HTML
report) and the parent MLflow run's summary (each stage's metrics as `<stage>.<name>`,
outcome.json). Tracking never fails the flow: MLflow errors become warnings."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from components.core import tracking


def ui_url(uri: str) -> str:
    """Where the MLflow UI of this tracking store is: the server itself, or what `make serve`
    / `mlflow ui` starts for a local store (MLFLOW_UI_URL overrides it)."""
    if os.environ.get("MLFLOW_UI_URL"):
        return os.environ["MLFLOW_UI_URL"].rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def _stage_runs(root: Path, parent_run_id: str) -> dict[str, Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    runs = client.search_runs([tracking.experiment_id(root)], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"])
    return {run.info.run_name: run for run in runs}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_markdown(title: str, outcome: dict[str, str], metrics: dict[str, dict], links: dict[str, str],
                     header: list[str]) -> str:
    """The artifact: per stage its outcome, its MLflow run and a table of its DVC metrics."""
    lines = [f"# {title}", "", *header, ""]
    for stage, state in outcome.items():
        link = f" · [MLflow run]({links[stage]})" if stage in links else ""
        lines += [f"## {stage}: {state}{link}", ""]
        values = metrics.get(stage) or {}
        if values:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(values.items()) if not isinstance(v, (dict, list))]
        else:
            lines.append("(no metrics)")
        lines.append("")
    return "\n".join(lines)


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60] or "run"


def publish(root: Path, summary: dict, metrics: dict[str, dict], parent_run_id: str | None, run_name: str) -> None:
    """Prefect artifacts (metrics per stage with MLflow links; the evaluation report) and the
    parent MLflow run's summary (each stage's metrics as `<stage>.<name>`, outcome.json)."""
    import mlflow

    logger = get_run_logger()
    uri = tracking.tracking_uri(root)
    base = ui_url(uri)
    links: dict[str, str] = {}
    stage_runs: dict[str, Any] = {}
    try:
        if parent_run_id:
            stage_runs = _stage_runs(root, parent_run_id)
            experiment = tracking.experiment_id(root)
            links = {name: f"{base}/#/experiments/{experiment}/runs/{run.info.run_id}"
                     for name, run in stage_runs.items()}
            client = mlflow.MlflowClient(uri)
            flat = {f"{stage}.{k}": float(v) for stage, values in metrics.items() for k, v in values.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, 0) for k, v in flat.items()]
            for i in range(0, len(items), 500):
                client.log_batch(parent_run_id, metrics=items[i:i + 500])
            client.log_dict(parent_run_id, summary, "outcome.json")
    except Exception as exc:
        logger.warning("MLflow: could not summarise the flow run (%s)", exc)
    header = [f"- mode: **{summary['mode']}**" + (f", DVC experiment `{summary['experiment']}` "
                                                  f"(`dvc exp show`)" if summary["experiment"] else ""),
              f"- revision: `{summary['rev'][:12]}`"]
    if parent_run_id:
        header.append(f"- MLflow: [flow run]({base}/#/experiments/{tracking.experiment_id(root)}/runs/{parent_run_id})")
    key = _artifact_key(f"pipeline-{run_name}")
    create_markdown_artifact(metrics_markdown(f"blip-diffusion pipeline: {run_name}", summary["outcome"], metrics,
                                              links, header), key=key, description="each stage's metrics")
    if "evaluate" in summary["outcome"]:
        _evaluation_artifact(root, summary, metrics.get("evaluate") or {}, stage_runs.get("evaluate"), base, run_name)


def _evaluation_artifact(root: Path, summary: dict, values: dict, run, base: str, run_name: str) -> None:
    """The DreamBench summary as markdown, and links to the full HTML report (an artifact of
    the evaluate MLflow run; in the working tree too when the run was a plain repro)."""
    rows = [(k, v) for k, v in sorted(values.items()) if k.endswith(("_dino", "_clip_i", "_clip_t"))]
    lines = ["# DreamBench evaluation", "", "| score | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows]]
    if run is not None:
        report = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/dreambench/report.html"
        lines += ["", f"Full report (per subject, with images): [report.html in MLflow]({report})"]
        tags = run.data.tags
        if tags.get("promotion_decision"):
            lines += ["", f"Registry: **{tags['promotion_decision']}** — {tags.get('promotion_reason', '')}"]
        create_link_artifact(report, link_text="DreamBench report (MLflow)", key=_artifact_key(f"report-{run_name}"),
                             description="the evaluation's HTML report")
    if summary["mode"] == "repro":
        lines += ["", f"In the working tree: `{root / 'reports/dreambench/report.html'}`"]
    create_markdown_artifact("\n".join(lines), key=_artifact_key(f"evaluation-{run_name}"),
                             description="DreamBench scores of this flow run")

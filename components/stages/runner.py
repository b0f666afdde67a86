"""Runs one DVC stage the way dvc.yaml does (`blipdiff <stage>`): load params.yaml (typed),
open the stage's MLflow run, do the work, write the metrics JSON that dvc.yaml declares,
log what it took.

Every stage module in this package has the same face: `SECTIONS` (the params it reads),
`OUTPUTS` (what it writes, as in dvc.yaml), `PLOTS` where it has curves, `DATASETS` (the
manifests logged as MLflow datasets), `run(params, root,
**options)` returning its metrics and sample images, and optionally `after_run(params, root)`,
called inside its MLflow run (train_subject registers its model there). Stages are found by name, so this module
imports none of them and no stage imports another.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

from components.core import tracking
from components.core.config import load_params
from components.core.io import round_floats, write_json
from components.core.paths import metrics_file
from components.stages import STAGES

log = logging.getLogger("blipdiff")

# Metric name prefixes that go to MLflow only: they differ between machines, or between a
# fresh and a resumed run (`run_`), not with the params and data.
# `diff_` are numerical differences whose last digits come from the CPU's kernels.
MACHINE_DEPENDENT = ("seconds_", "samples_per_s", "peak_memory_mb", "run_", "diff_")


def stage_module(stage: str) -> ModuleType:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"components.stages.{stage}")


def log_datasets(module: ModuleType, root: Path) -> None:
    """The manifests a stage declares in `DATASETS` ((path, context) pairs: what it trained
    on, read or wrote) as MLflow dataset inputs of its run."""
    import pandas as pd

    for rel, context in getattr(module, "DATASETS", ()):
        path = root / rel
        if path.is_file():
            tracking.log_dataset(pd.read_parquet(path), Path(rel).stem, path, context)


def run_stage(stage: str, params_path: Path, overrides: list[str], root: Path, **options) -> dict:
    params = load_params(params_path, overrides)
    module = stage_module(stage)
    stage_params = params.model_dump(include=set(module.SECTIONS))
    start = time.perf_counter()
    if int(os.environ.get("RANK", "0")) != 0:
        # Other processes of a multi-process run (accelerate launch) only train.
        module.run(params, root, **options)
        return {}
    with tracking.stage_run(stage, stage_params, root):
        metrics, samples = module.run(params, root, **options)
        metrics["seconds_wall"] = round(time.perf_counter() - start, 3)
        # Timings, throughput and memory go to MLflow only, and floats are written at a fixed
        # precision (other machines differ in the last bits): the DVC metrics file stays the
        # same bytes for the same params, like every other output.
        stable = round_floats({k: v for k, v in metrics.items() if not k.startswith(MACHINE_DEPENDENT)})
        write_json(stable, root / metrics_file(stage))
        tracking.log_metrics(metrics)
        tracking.log_images(samples)
        log_datasets(module, root)
        if hasattr(module, "after_run"):
            try:
                module.after_run(params, root)
            except Exception as exc:  # tracking never fails a stage whose outputs are written
                log.warning("%s: tracking after the run failed (%s: %s); the stage's outputs are written%s",
                            stage, type(exc).__name__, str(exc)[:300],
                            ": register the model later with `blipdiff register`" if stage == "train_subject" else "")
    log.info("%s done in %.1f s; metrics in %s", stage, metrics["seconds_wall"], metrics_file(stage))
    return metrics

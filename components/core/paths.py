"""Where the stages write, relative to the repository root: defined once, used by the stages,
the Prefect flow and the tests (dvc.yaml's `outs` and `metrics` name the same paths; a test
holds them equal)."""

from __future__ import annotations

import os
from pathlib import Path

# ingest
SUBJECTS_DIR = Path("data/subjects")
SUBJECTS_MANIFEST = Path("data/subjects.parquet")
# context
CONTEXT_DIR = Path("data/context")
PAIRS_MANIFEST = Path("data/pairs.parquet")
# pretrain_qformer
QFORMER_DIR = Path("models/qformer")
# train_subject
BLIP_DIFFUSION_DIR = Path("models/blip_diffusion")
# evaluate (DreamBench)
EVAL_DIR = Path("reports/dreambench")
# export (ONNX graphs, TensorRT engines; the parity report)
EXPORT_DIR = Path("models/onnx")  # ONNX graphs (DVC output)
ENGINES_DIR = Path("models/tensorrt")  # TensorRT engines: per GPU and TensorRT version, not DVC-tracked
EXPORT_REPORT_DIR = Path("reports/export")

# A model in the MLflow registry: models:/NAME@ALIAS or models:/NAME/VERSION
REGISTRY_PREFIX = "models:/"

# Training checkpoints (git- and DVC-ignored), one folder per stage.
CHECKPOINTS_DIR = Path("models/.checkpoints")
METRICS_DIR = Path("metrics")


def metrics_file(stage: str) -> Path:
    """The metrics JSON that dvc.yaml declares for `stage`."""
    return METRICS_DIR / f"{stage}.json"


def curve_file(stage: str) -> Path:
    """A training stage's curve (step, losses, learning rate): its DVC plot."""
    return METRICS_DIR / f"{stage}_curve.csv"


def checkpoint_dir(stage: str) -> Path:
    return CHECKPOINTS_DIR / stage


# The checkpoints' base folder when set: a DVC experiment runs in a temporary copy of the
# repository that is removed when it fails, so the flow keeps checkpoints in the main
# working tree for a retry to resume from.
CHECKPOINTS_ENV = "BLIPDIFF_CHECKPOINTS"
# The training stages' --resume when the option is not given: "auto" (a flow retrying the
# stage: the newest checkpoint of the same params and data, else fresh), "latest" or a folder.
RESUME_ENV = "BLIPDIFF_RESUME"


def checkpoint_root(root: Path, stage: str) -> Path:
    """Where `stage` keeps its training checkpoints for a run in `root`."""
    base = os.environ.get(CHECKPOINTS_ENV)
    return (Path(base) / stage) if base else root / checkpoint_dir(stage)

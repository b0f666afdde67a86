"""Where the stages write, relative to the repository root: defined once, used by the stages,
the Prefect flow and the tests (dvc.yaml's `outs` and `metrics` name the same paths; a test
holds them equal)."""

from __future__ import annotations

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

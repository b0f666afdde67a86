"""Where the stages write, relative to the repository root: defined once, used by the stages,
the Prefect flow and the tests (dvc.yaml's `outs` and `metrics` name the same paths; a test
holds them equal)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# ingest
SUBJECTS_DIR = Path("data/subjects")
SUBJECTS_MANIFEST = Path("data/subjects.parquet")
# context
CONTEXT_DIR = Path("data/context")
PAIRS_MANIFEST = Path("data/pairs.parquet")
# base (the model stages 1 and 2 start from)
BASE_DIR = Path("models/base")
# controlnet (a canny-edge ControlNet for the base model)
CONTROLNET_DIR = Path("models/controlnet")
CONTROLNET_GRID = Path("reports/samples/controlnet.png")  # a DVC image plot: views, edge maps, drawings
# pretrain_qformer
QFORMER_DIR = Path("models/qformer")
# train_subject
BLIP_DIFFUSION_DIR = Path("models/blip_diffusion")
SAMPLES_GRID = Path("reports/samples/grid.png")  # a DVC image plot: each subject's reference, prior, generations
# evaluate (DreamBench)
EVAL_DIR = Path("reports/dreambench")
# export (ONNX graphs, TensorRT engines; the parity report)
EXPORT_DIR = Path("models/onnx")  # ONNX graphs (DVC output)
EXPORT_FILE = "export.json"  # what makes a folder an export folder: its manifest
ENGINES_DIR = Path("models/tensorrt")  # TensorRT engines: per GPU and TensorRT version, not DVC-tracked
EXPORT_REPORT_DIR = Path("reports/export")

OWN_FOLDERS = ("data", "models", "reports", "metrics")  # where the stages write: never a hub owner
# A model in the MLflow registry: models:/NAME@ALIAS or models:/NAME/VERSION
REGISTRY_PREFIX = "models:/"


def local_path(spec: str | Path, root: Path | None = None) -> Path:
    """`spec` as a local path: absolute or ~ as given, else relative to `root` (when given)."""
    path = Path(spec).expanduser()
    return path if root is None or path.is_absolute() else root / path


def is_hub_id(spec: str, root: Path | None = None) -> bool:
    """The one hub-id rule: "owner/name" (exactly one slash, not starting with ".", "/" or
    "~", not in the pipeline's own folders) where neither that path nor its parent is a
    local folder (relative to `root`, else the working directory): `models/blip_diffusion`
    not trained yet is a missing folder, not a hub id."""
    text = str(spec)
    local = local_path(text, root)
    return (text.count("/") == 1 and not text.startswith((".", "/", "~")) and text.split("/")[0] not in OWN_FOLDERS
            and not local.exists() and not local.parent.is_dir())


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


def main_worktree(root: Path) -> Path:
    """The repository's main working tree, also when a stage runs in a DVC experiment's
    temporary copy (`dvc exp run --temp` / `--queue`: DVC sets DVC_ROOT to the parent
    repository) or in a git worktree; else `root`."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        common = Path(out)
        if common.name == ".git":
            return common.parent
    except (OSError, subprocess.CalledProcessError):
        pass
    return root.resolve()


def external_path(value: str | Path, root: Path) -> Path:
    """A path param naming something outside the pipeline's outputs (a dataset, a folder of
    backgrounds): absolute or ~ as given; relative to the main working tree, so it means the
    same in `dvc repro` and in an experiment's temporary copy of the repository."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (main_worktree(root) / path).resolve()


# A local DreamBench copy (the DreamBooth dataset folder) when ingest.dreambench.path is null:
# how tests, CI and offline machines skip the download.
DREAMBENCH_ENV = "BLIPDIFF_DREAMBENCH"

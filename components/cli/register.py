"""`blipdiff register`: register a trained model folder in the MLflow model registry, without
retraining (when the registration at the end of `train_subject` failed, or for any folder
in the released layout).

    blipdiff register                                  # models/blip_diffusion, as blip-diffusion
    blipdiff register --model-dir path/to/checkpoint --name my-model
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from components.core import tracking
from components.core.errors import BlipDiffError
from components.core.paths import BLIP_DIFFUSION_DIR
from components.model import layout, registry

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=BLIP_DIFFUSION_DIR,
                   help=f"a model folder in the released layout (default: {BLIP_DIFFUSION_DIR})")
    p.add_argument("--name", default=registry.REGISTERED_NAME, help="registered model name")


def run(args: argparse.Namespace) -> str:
    import mlflow

    layout.check_folder(args.model_dir)
    root = Path.cwd()
    mlflow.set_tracking_uri(tracking.tracking_uri(root))
    try:
        mlflow.set_experiment(experiment_id=tracking.experiment_id(root))
        version = registry.log_and_register(args.model_dir, None, args.name)
        run_id = mlflow.last_active_run().info.run_id
        mlflow.MlflowClient().set_tag(run_id, "git_commit", tracking.git_commit(root))
    except Exception as exc:
        raise BlipDiffError(f"could not register {args.model_dir} at {mlflow.get_tracking_uri()} "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None
    print(f"registered {args.model_dir} as {args.name} version {version}")
    return version

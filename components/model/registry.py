"""The trained model in the MLflow model registry, as a pyfunc that generates images.

`mlflow.pyfunc.load_model("models:/blip-diffusion/1").predict(df)` takes columns
`subject_image` (a path), `source_subject`, `prompt` and optional `seed`, and returns one
float image (H, W, 3) in [0, 1] per row.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow.pyfunc

log = logging.getLogger(__name__)

REGISTERED_NAME = "blip-diffusion"


class BlipDiffusionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from components.model import layout

        self.model = layout.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        from components.data.images import read_subject_images

        steps = int((params or {}).get("num_inference_steps", 50))
        images = []
        for row in model_input.to_dict("records"):
            refs = read_subject_images([Path(row["subject_image"])])
            embeds = self.model.subject_embeddings(refs, row["source_subject"])
            size = self.model.native_size
            images.append(self.model.generate(embeds, [row["prompt"]], row["source_subject"],
                                              [int(row.get("seed", 0))], num_inference_steps=steps,
                                              height=size, width=size)[0])
        return images


# What the pyfunc imports where it is loaded (components/ travels as code).
REQUIREMENTS = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub", "pillow",
                "numpy", "pandas")
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def pinned_requirements(constraints: Path = CONSTRAINTS) -> list[str]:
    """REQUIREMENTS at the versions of constraints.txt (the project's lock), else as installed."""
    from importlib.metadata import PackageNotFoundError, version

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    locked = {}
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            name, sep, ver = line.split("#")[0].strip().partition("==")
            if sep:
                locked[norm(name)] = ver.strip()
    pins = []
    for name in REQUIREMENTS:
        ver = locked.get(norm(name))
        if ver is None:
            try:
                ver = version(name)
            except PackageNotFoundError:
                pins.append(name)
                continue
        pins.append(f"{name}=={ver}")
    return pins


def log_and_register(checkpoint: Path, run_id: str | None = None, name: str = REGISTERED_NAME) -> str:
    """Log the checkpoint folder as a model of run `run_id` (a new run named "register" when
    None) and register it; return the version."""
    import mlflow

    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BlipDiffusionPyfunc(),
            artifacts={"checkpoint": str(checkpoint)},
            # the whole package, so the pyfunc imports `components.model...` where it is loaded
            code_paths=[str(Path(__file__).resolve().parents[1])],
            pip_requirements=pinned_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    log.info("registered %s version %s (%s)", name, version, info.model_uri)
    return version

"""The trained model in the MLflow model registry, as a pyfunc that generates images.

`mlflow.pyfunc.load_model("models:/blip-diffusion/1").predict(df)` takes columns
`subject_image` (a path), `source_subject`, `prompt` and optional `seed`, and returns one
float image (H, W, 3) in [0, 1] per row.

What a run trained is stored; what it kept frozen is not copied again on every run: when the
base is known (a preset and seed, as `train_subject` registers), the artifact leaves out the
VAE weights and the image encoder inside the Q-Former and records the base with a sha256 of
each frozen part; loading rebuilds them from the base and refuses a base whose weights differ.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow.pyfunc

from components.core.errors import BlipDiffError
from components.core.paths import REGISTRY_PREFIX

log = logging.getLogger(__name__)

REGISTERED_NAME = "blip-diffusion"
BASE_FILE = "base.json"
VISUAL_PREFIX = "visual_encoder."


def _tensor_hash(state: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# The image encoder's last LayerNorm is BLIP-2's `ln_vision`: stage 1 trains it, so a model
# trained from stage 1's Q-Former stores it with the trained parts.
LN_VISION = VISUAL_PREFIX + "post_layernorm."


def _is_frozen_key(key: str) -> bool:
    return key.startswith(VISUAL_PREFIX) and not key.startswith(LN_VISION)


def _frozen_parts(model) -> dict[str, dict]:
    """The parts no training stage changes: the VAE and the Q-Former's image encoder (less
    `ln_vision`)."""
    visual = {VISUAL_PREFIX + k: v for k, v in model.qformer.visual_encoder.state_dict().items()}
    return {"vae": model.vae.state_dict(),
            "qformer.visual_encoder": {k: v for k, v in visual.items() if _is_frozen_key(k)}}


def _donor(base: dict):
    """The model a base.json names: where the frozen parts come from."""
    from components.model.presets import from_base

    return from_base(base)


def trained_parts(checkpoint: Path, out: Path, base: dict) -> bool:
    """A copy of `checkpoint` without its frozen weights, plus base.json naming the base they
    come from and their hashes. False (nothing written) when the base does not rebuild the
    checkpoint's frozen weights exactly: then the whole folder must be stored."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from components.model import layout

    frozen = {k: _tensor_hash(v) for k, v in _frozen_parts(layout.load(checkpoint)).items()}
    if {k: _tensor_hash(v) for k, v in _frozen_parts(_donor(base)).items()} != frozen:
        return False
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for sub in ("qformer", "text_encoder", "unet"):
        for file in (checkpoint / sub).glob("*.safetensors"):
            state = load_file(file)
            if sub == "qformer":
                state = {k: v for k, v in state.items() if not _is_frozen_key(k)}
            save_file(state, out / sub / file.name, metadata={"format": "pt"})
    (out / BASE_FILE).write_text(json.dumps({**base, "frozen_sha256": frozen}, indent=2) + "\n")
    return True


def restore_frozen(artifact: Path, out: Path) -> Path:
    """A full checkpoint folder from a trained-parts artifact and its base."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    base = json.loads((artifact / BASE_FILE).read_text())
    donor = _donor(base)
    frozen = _frozen_parts(donor)
    for name, state in frozen.items():
        if _tensor_hash(state) != base["frozen_sha256"][name]:
            raise BlipDiffError(f"{artifact}: the base {base} gives other {name} weights than the model was "
                                "trained with (another version or seed)")
    shutil.copytree(artifact, out)
    donor.vae.save_pretrained(out / "vae", safe_serialization=True)
    (out / "vae" / "config.json").write_text((artifact / "vae" / "config.json").read_text())
    for file in (out / "qformer").glob("*.safetensors"):
        state = {**load_file(file), **{k: v.contiguous() for k, v in frozen["qformer.visual_encoder"].items()}}
        save_file(state, file, metadata={"format": "pt"})
    return out


class BlipDiffusionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import tempfile

        from components.model import layout

        folder = Path(context.artifacts["checkpoint"])
        if (folder / BASE_FILE).is_file():
            self._tmp = tempfile.TemporaryDirectory()
            folder = restore_frozen(folder, Path(self._tmp.name) / "checkpoint")
        self.model = layout.load(folder)

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


def log_and_register(checkpoint: Path, run_id: str | None = None, name: str = REGISTERED_NAME,
                     base: dict | None = None) -> str:
    """Log the checkpoint folder as a model of run `run_id` (a new run named "register" when
    None) and register it; return the version. With `base` ({"preset", "seed"} or
    {"preset", "checkpoint"}) only the trained parts are stored (see the module doc)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
        artifact = checkpoint
        if base is not None and trained_parts(checkpoint, Path(tmp) / "checkpoint", base):
            artifact = Path(tmp) / "checkpoint"
        elif base is not None:
            log.info("the base %s does not rebuild the frozen weights exactly: storing the whole folder", base)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BlipDiffusionPyfunc(),
            artifacts={"checkpoint": str(artifact)},
            # the whole package, so the pyfunc imports `components.model...` where it is loaded
            code_paths=[str(Path(__file__).resolve().parents[1])],
            pip_requirements=pinned_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    set_candidate(version, name)  # the newest version waits for its evaluation as the candidate
    log.info("registered %s version %s (%s), alias @%s", name, version, info.model_uri, CANDIDATE)
    return version


def registered_checkpoint(uri: str, dst: Path) -> tuple[Path, str]:
    """Download a registered model's checkpoint artifact: (folder, "name version N")."""
    import mlflow
    from mlflow.models import Model

    name_ref = uri[len(REGISTRY_PREFIX):]
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        raise BlipDiffError(f"{uri}: could not get the registered model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300]})") from None
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    artifact = (flavor.get("artifacts") or {}).get("checkpoint")
    if not artifact:
        raise BlipDiffError(f"{uri}: not a BLIP-Diffusion pyfunc (no `checkpoint` artifact)")
    version = _registered_version(name_ref)
    return local / artifact["path"], version


def _registered_version(name_ref: str) -> str:
    """"blip-diffusion version 3" for blip-diffusion@alias or blip-diffusion/3."""
    from mlflow import MlflowClient

    try:
        if "@" in name_ref:
            name, alias = name_ref.split("@", 1)
            return f"{name} version {MlflowClient().get_model_version_by_alias(name, alias).version}"
        name, _, version = name_ref.rpartition("/")
        return f"{name} version {version}"
    except Exception:  # only a description: the download above has already succeeded
        return name_ref


def registered_folder(uri: str, dst: Path) -> tuple[Path, str, str]:
    """A registered model as a full checkpoint folder under `dst` (frozen parts rebuilt from
    its base where the artifact left them out): (folder, hash of the artifact, "name version N")."""
    from components.core.io import folder_hash

    artifact, version = registered_checkpoint(uri, dst / "download")
    digest = folder_hash(artifact)
    if (artifact / BASE_FILE).is_file():
        return restore_frozen(artifact, dst / "checkpoint"), digest, version
    return artifact, digest, version


# ------------------------------------------------------------------ aliases and promotion
# A newly registered version is the `candidate`; `evaluate` makes it the `champion` only when
# its DreamBench scores beat the champion's under the same evaluation protocol: DINO first,
# CLIP-T to break a tie. The decision is recorded on both versions (tags `promotion.*`).
CANDIDATE = "candidate"
CHAMPION = "champion"


def set_candidate(version: str, name: str = REGISTERED_NAME) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)


def resolve_version(uri: str):
    """The ModelVersion that models:/NAME@ALIAS or models:/NAME/VERSION names."""
    from mlflow import MlflowClient

    ref = uri[len(REGISTRY_PREFIX):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.rpartition("/")
        return client.get_model_version(name, version)
    except Exception as exc:
        raise BlipDiffError(f"{uri}: no such registered model version ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote_if_better(name: str, version: str, scores: dict[str, float], protocol: str,
                      evaluate_run: str | None = None) -> dict[str, str]:
    """Compare `version`'s scores ({"dino", "clip_t"}, evaluated under `protocol`, a hash of
    the evaluation settings) with the champion's and move `champion` when they are better.
    Returns the decision (also written as tags on both versions)."""
    import time

    from mlflow import MlflowClient

    client = MlflowClient()
    ours = (scores["dino"], scores["clip_t"])
    champion = _alias_version(client, name, CHAMPION)
    decision = {"promotion.protocol": protocol, "promotion.evaluate_run": str(evaluate_run),
                "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "promotion.dino": f"{ours[0]:.6f}", "promotion.clip_t": f"{ours[1]:.6f}"}
    if champion is None:
        decision.update({"promotion.decision": "promoted", "promotion.reason": "no champion yet"})
    elif str(champion.version) == str(version):
        decision.update({"promotion.decision": "champion", "promotion.reason": "re-evaluated the champion"})
    else:
        decision["promotion.compared_with"] = champion.version
        tags = champion.tags
        theirs_protocol = tags.get("promotion.protocol")
        if theirs_protocol != protocol:
            decision.update({"promotion.decision": "kept",
                             "promotion.reason": f"the champion (version {champion.version}) has no scores under "
                                                 f"this evaluation protocol ({protocol}; its: {theirs_protocol}): "
                                                 "re-evaluate it (deployment evaluate-champion) to compare"})
        else:
            theirs = (float(tags["promotion.dino"]), float(tags["promotion.clip_t"]))
            better = round(ours[0], 6) > round(theirs[0], 6) or (
                round(ours[0], 6) == round(theirs[0], 6) and round(ours[1], 6) > round(theirs[1], 6))
            verdict = (f"DINO {ours[0]:.4f} vs {theirs[0]:.4f}, CLIP-T {ours[1]:.4f} vs {theirs[1]:.4f} "
                       f"(version {champion.version})")
            decision.update({"promotion.decision": "promoted" if better else "kept",
                             "promotion.reason": ("beats the champion: " if better else "does not beat the champion: ")
                             + verdict})
            client.set_model_version_tag(name, champion.version, "promotion.last_challenger", str(version))
            client.set_model_version_tag(name, champion.version, "promotion.last_challenge",
                                         f"superseded by version {version}" if better else
                                         f"defended against version {version}: {verdict}")
    for key, value in decision.items():
        client.set_model_version_tag(name, str(version), key, value)
    if decision["promotion.decision"] == "promoted":
        client.set_registered_model_alias(name, CHAMPION, str(version))
    log.info("%s version %s: %s (%s)", name, version, decision["promotion.decision"], decision["promotion.reason"])
    return decision

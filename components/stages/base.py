"""Stage `base`: the model every later stage starts from, written to `models/base/` in the
released folder layout (vae/, unet/, text_encoder/, tokenizer/, scheduler/, qformer/ with
the image encoder, image_processor/) plus `manifest.json` (where it came from, the sha256 of
every file), so the base is a versioned input like the data: a new base re-runs stages 1
and 2 (dvc.yaml deps).

- tiny (the default): trained here on the ingested train split, seeded, on a CPU in minutes
  (`components.training.base_model`): the autoencoder (PSNR on the held-out views), the
  image encoder (a nearest-centroid probe of its features, trained vs random), the
  text-to-image prior (its loss, and the prior check: each subject drawn from its caption
  alone, the drawings named by the subject classifier, accuracy against chance).
- full presets: the preset's model at a pinned revision (hub, or the HF cache offline), or
  `base.source`, a local model folder. Offline without the files it stops with one line
  naming what to download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from components.core.config import BaseConfig, Params
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import BASE_DIR, SUBJECTS_MANIFEST, local_path
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
from components.model import layout
from components.training import base_model
from components.training.base_model import BaseData

log = logging.getLogger(__name__)

SECTIONS = ("preset", "base")
OUTPUTS = (BASE_DIR,)
DATASETS = ((SUBJECTS_MANIFEST, "training"),)
MANIFEST = "manifest.json"
# The full presets' sources at pinned revisions (base.revision overrides).
HUB_SOURCES = {"blipdiffusion": ("Salesforce/blipdiffusion", "main")}


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = params.base
    if cfg.source:
        return _copy_local(cfg, root), {}
    if params.preset == "tiny":
        return train_tiny(cfg, root)
    return _from_hub(params.preset, cfg, root), {}


# ------------------------------------------------------------------------- tiny
def train_tiny(cfg: BaseConfig, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from components.model.tiny.blip_diffusion import build_tiny

    train, held = base_model.read_data(root)
    torch.manual_seed(cfg.seed)
    model = build_tiny(cfg.seed, image_size=cfg.resolution)
    metrics: dict = {"train_images": len(train), "heldout_images": len(held), "subjects": len(train.subjects)}
    with torch.enable_grad():
        metrics.update(base_model.train_autoencoder(model.vae, train, cfg))
    metrics.update(base_model.calibrate_latents(model.vae, train, cfg.resolution))
    recon_metrics, recon = base_model.reconstruction_metrics(model.vae, held, cfg.resolution)
    metrics.update(recon_metrics)

    vision = model.qformer.visual_encoder
    metrics["image_encoder_probe_random"] = base_model.image_encoder_probe(vision, model.image_processor, train, held)
    with torch.enable_grad():
        metrics.update(base_model.train_image_encoder(model.qformer, model.text_encoder, model.tokenizer,
                                                      model.image_processor, train, cfg))
        metrics.update(base_model.train_prior(model, train, cfg))
    metrics["image_encoder_probe_trained"] = base_model.image_encoder_probe(vision, model.image_processor, train, held)
    check, drawings = prior_check(model, root, cfg)
    metrics.update(check)
    metrics["subject_chance"] = 1.0 / len(train.subjects)
    save(model, root, {"source": "trained here (tiny preset)", "seed": cfg.seed})
    log.info("base: PSNR %.2f dB held out, prior check %.2f (chance %.3f)", metrics["psnr_heldout"],
             metrics["prior_accuracy"], metrics["subject_chance"])
    samples = {"reconstructions": _strip(held, recon), "prior_samples": drawings}
    return metrics, samples


@torch.no_grad()
def prior_check(model, root: Path, cfg: BaseConfig) -> tuple[dict, np.ndarray]:
    """Each training subject drawn from its caption alone (no subject embeddings), in two
    scenes; the subject classifier (fitted on the training views) names each drawing."""
    from scipy.stats import binom

    from components.data.backgrounds import KINDS, scene
    from components.evaluation.subject_classifier import SubjectClassifier

    frame = read_manifest(root / SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    classifier = SubjectClassifier.fit(frame[frame["split"] == "train"], root, size=cfg.resolution)
    first = frame.drop_duplicates("subject_id").set_index("subject_id")
    subjects = classifier.subjects
    n = cfg.check.images_per_subject
    prompts, truth, seeds = [], [], []
    for k, subject in enumerate(subjects):
        subject_caption = first.loc[subject, "caption"]
        for i in range(n):
            prompts.append(f"{subject_caption} {scene(KINDS[i % len(KINDS)])}")
            truth.append(subject)
            seeds.append(cfg.seed * 100_000 + k * 100 + i)
    images = model.generate(None, prompts, "", seeds, guidance_scale=cfg.check.guidance_scale,
                            num_inference_steps=cfg.check.steps, height=cfg.resolution, width=cfg.resolution)
    images = (images * 255).round().astype(np.uint8)
    guesses = classifier.predict(list(images))
    right = int(sum(g == t for g, t in zip(guesses, truth)))
    chance = 1.0 / len(subjects)
    metrics = {"prior_accuracy": right / len(truth), "prior_images": len(truth),
               "prior_p_value": float(binom.sf(right - 1, len(truth), chance)),
               "classifier_real_accuracy": classifier.accuracy(frame[frame["split"] == "test"], root)}
    rows = [np.concatenate(list(images[k * n:(k + 1) * n]), axis=1) for k in range(len(subjects))]
    return metrics, np.concatenate(rows, axis=0)


def _strip(held: BaseData, recon: torch.Tensor, count: int = 8) -> np.ndarray:
    """Originals over reconstructions, `count` held-out views, for MLflow."""
    def row(x: torch.Tensor) -> np.ndarray:
        x = base_model.uint8_images(x[:count])
        return np.concatenate(list(x), axis=1)

    return np.concatenate([row(base_model.resize(held.pixels, recon.shape[-1])), row(recon)], axis=0)


# ------------------------------------------------------------------ full presets
def save(model, root: Path, source: dict) -> None:
    """The layout folder plus its manifest, atomically."""
    with atomic_path(root / BASE_DIR) as tmp:
        layout.save(model, tmp / "model")
        for item in (tmp / "model").iterdir():
            item.rename(tmp / item.name)
        (tmp / "model").rmdir()
        write_manifest(tmp, source)


def write_manifest(folder: Path, source: dict) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        files[path.relative_to(folder).as_posix()] = digest.hexdigest()
    (folder / MANIFEST).write_text(json.dumps({**source, "files": files}, indent=2) + "\n")


def _copy_local(cfg: BaseConfig, root: Path) -> dict:
    folder = local_path(cfg.source, root)
    layout.check_folder(folder)
    with atomic_path(root / BASE_DIR) as tmp:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(MANIFEST))
        write_manifest(tmp, {"source": str(cfg.source)})
    return {"files": len(json.loads((root / BASE_DIR / MANIFEST).read_text())["files"])}


def _from_hub(preset: str, cfg: BaseConfig, root: Path) -> dict:
    """The preset's model at its pinned revision, as a layout folder with its manifest."""
    if preset in HUB_SOURCES:
        from huggingface_hub import snapshot_download

        repo, pinned = HUB_SOURCES[preset]
        revision = cfg.revision or pinned
        try:
            folder = Path(snapshot_download(repo, revision=revision))
        except Exception as exc:  # offline without the cache, unknown revision, ...
            raise BlipDiffError(f"base: {repo}@{revision} is not in the Hugging Face cache and could not be "
                                f"downloaded ({type(exc).__name__}); run `huggingface-cli download {repo} "
                                f"--revision {revision}` where there is network, or set base.source to a "
                                "local copy") from None
        layout.check_folder(folder)
        with atomic_path(root / BASE_DIR) as tmp:
            shutil.copytree(folder, tmp)
            write_manifest(tmp, {"source": repo, "revision": revision, "resolved": folder.name})
    else:  # sd15-blip2: Stable Diffusion v1.5 + the BLIP-2 image encoder, assembled by the preset
        from components.model.presets import from_preset

        try:
            model = from_preset(preset, seed=cfg.seed)
        except (OSError, ValueError) as exc:
            raise BlipDiffError(f"base: the {preset} preset's hub models could not be loaded ({type(exc).__name__}); "
                                "download them where there is network or set base.source to a local model "
                                "folder") from None
        save(model, root, {"source": f"preset {preset}", "seed": cfg.seed})
    return {"files": len(json.loads((root / BASE_DIR / MANIFEST).read_text())["files"])}

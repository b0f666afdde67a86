"""Stage `ingest`: subject images from a source, normalised, checked, de-duplicated.

Writes `data/subjects/` (images/<subject>/NN.png, masks/<subject>/NN.png when the
source knows the alpha) and `data/subjects.parquet` (schema:
components.data.manifests.SUBJECTS_SCHEMA). The sources are `components.data.sources`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from components.core.config import IngestConfig, Params
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import SUBJECTS_DIR, SUBJECTS_MANIFEST, external_path
from components.data import dreambench, images, sources
from components.data.images import alpha_to_uint8, save_png
from components.data.manifests import SUBJECTS_SCHEMA, relpath, write_parquet

log = logging.getLogger(__name__)

SECTIONS = ("ingest",)  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (SUBJECTS_DIR, SUBJECTS_MANIFEST)
DATASETS = ((SUBJECTS_MANIFEST, "output"),)  # MLflow dataset inputs of the run
# Reasons that count towards ingest.max_skipped_fraction: files that could not be read.
# Duplicates, too large images and empty subjects are skipped and reported, not counted.
UNREADABLE = (images.NOT_AN_IMAGE, images.CORRUPT, images.TRUNCATED)


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The stage (`blipdiff ingest`): its metrics and a few sample images."""
    return ingest_subjects(params.ingest, root)


def list_candidates(cfg: IngestConfig, root: Path, skipped: Counter) -> tuple[Iterable, dict[str, dict]]:
    """The source's candidate images, and extra files to write beside them (DreamBench's
    prompt and class lists)."""
    if cfg.source == "synthetic":
        return sources.synthetic_candidates(cfg), {}
    if cfg.source == "dreambench":
        src = dreambench.local_or_download(cfg.dreambench, root)
        info = dreambench.parse_prompts_and_classes(src / dreambench.PROMPTS_FILE)
        log.info("DreamBench at %s: %d subjects in the class list", src, len(info.classes))
        candidates = sources.folder_candidates(src, cfg, info.classes, info.category, skipped)
        prompts = {"object": info.object_prompts, "live": info.live_prompts, "classes": info.classes}
        return candidates, {"dreambench_prompts.json": prompts}
    src = external_path(cfg.folder.path, root)
    classes = sources.read_classes_csv(external_path(cfg.folder.classes_csv, root)) if cfg.folder.classes_csv \
        else None
    return sources.folder_candidates(src, cfg, classes, lambda _: None, skipped), {}


def write_image(cand, image, index: int, tmp_dir: Path) -> dict:
    """One normalised image (and its mask) under `tmp_dir`; its manifest row."""
    name = f"{cand.subject_id}/{index:02d}.png"
    image_path = tmp_dir / "images" / name
    image_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image.rgb, image_path)
    mask_rel = None
    if image.alpha is not None:
        mask_path = tmp_dir / "masks" / name
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        save_png(alpha_to_uint8(image.alpha), mask_path)
        mask_rel = (SUBJECTS_DIR / "masks" / name).as_posix()
    h, w = image.rgb.shape[:2]
    return {"subject_id": cand.subject_id, "class_name": cand.class_name, "category": cand.category,
            "image_path": (SUBJECTS_DIR / "images" / name).as_posix(), "mask_path": mask_rel, "split": "train",
            "content_hash": image.content_hash, "width": w, "height": h, "caption": cand.caption,
            "source_path": cand.source_path, "scene": cand.scene}


def check_skipped(cfg: IngestConfig, skipped: Counter, found: int, written: int) -> float:
    """The unreadable fraction; an error when nothing is usable or too much is unreadable."""
    unreadable = sum(skipped[r] for r in UNREADABLE)
    fraction = unreadable / found if found else 1.0
    if not written:
        raise BlipDiffError(f"ingest ({cfg.source}): no usable image found ({dict(skipped)})")
    if fraction > cfg.max_skipped_fraction:
        counted = ", ".join(f"{r} {skipped[r]}" for r in UNREADABLE if skipped[r])
        other = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items()) if r not in UNREADABLE and n)
        raise BlipDiffError(
            f"ingest: {unreadable} of {found} files unreadable ({counted}; {fraction:.1%}), more than "
            f"ingest.max_skipped_fraction={cfg.max_skipped_fraction}"
            + (f" (also skipped, not counted: {other})" if other else "")
        )
    return fraction


def ingest_subjects(cfg: IngestConfig, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Ingest into `root` (the repo); return the metrics and a few sample images."""
    skipped: Counter = Counter()
    candidates, extra_files = list_candidates(cfg, root, skipped)
    out_dir, manifest = root / SUBJECTS_DIR, root / SUBJECTS_MANIFEST
    rows: list[dict] = []
    hashes: dict[str, str] = {}
    per_subject: Counter = Counter()
    offered: set[str] = set()
    found = 0
    with atomic_path(out_dir) as tmp_dir:
        for cand in tqdm(candidates, desc="ingest", unit="img"):
            found += 1
            offered.add(cand.subject_id)
            try:
                image = cand.load()
            except images.SkipImage as skip:
                skipped[skip.reason] += 1
                log.warning("skipped %s", skip)
                continue
            if image.content_hash in hashes:
                skipped[images.DUPLICATE] += 1
                log.warning("skipped %s: duplicate of %s", cand.source_path, hashes[image.content_hash])
                continue
            hashes[image.content_hash] = cand.source_path
            rows.append(write_image(cand, image, per_subject[cand.subject_id], tmp_dir))
            per_subject[cand.subject_id] += 1
        # A subject whose every file was skipped is empty too.
        for subject in offered - set(per_subject):
            skipped[images.EMPTY_SUBJECT] += 1
            log.warning("skipped subject %s: %s (no usable image)", subject, images.EMPTY_SUBJECT)
        fraction = check_skipped(cfg, skipped, found, len(rows))
        assign_splits(rows, cfg.test_views_per_subject)
        for name, data in extra_files.items():
            (tmp_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        frame = write_parquet(rows, manifest, SUBJECTS_SCHEMA)

    log.info("read %d files, wrote %d images of %d subjects to %s and %s",
             found, len(rows), frame["subject_id"].nunique(), out_dir, relpath(manifest, root))
    metrics = {
        "files_found": found,
        "images_written": len(rows),
        "subjects_written": int(frame["subject_id"].nunique()),
        "images_with_mask": int(frame["mask_path"].notna().sum()),
        "test_images": int((frame["split"] == "test").sum()),
        "skipped_total": int(sum(skipped.values())),
        "unreadable_fraction": round(fraction, 6),
    }
    for reason in (*UNREADABLE, images.TOO_LARGE, images.DUPLICATE, images.EMPTY_SUBJECT):
        metrics[f"skipped_{reason}"] = int(skipped[reason])
    return metrics, sample_images(frame, root)


def assign_splits(rows: list[dict], test_per_subject: int) -> None:
    """The last N images of each subject are held out, if the subject keeps one for training."""
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["subject_id"], []).append(row)
    for subject_rows in by_subject.values():
        if len(subject_rows) > test_per_subject > 0:
            for row in subject_rows[-test_per_subject:]:
                row["split"] = "test"


def sample_images(frame: pd.DataFrame, root: Path, count: int = 4) -> dict[str, np.ndarray]:
    """A few written images (first view of the first subjects) for the MLflow run."""
    firsts = frame.groupby("subject_id", sort=True).head(1).head(count)
    return {row.subject_id: images.read_rgb(root / row.image_path) for row in firsts.itertuples()}

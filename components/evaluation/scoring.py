"""Scoring generated images against real subject images: DINO, CLIP-I, CLIP-T and the oracle.

One path for `evaluate` (DreamBench) and `blipdiff score` (any image folder): a table of
generated images (mode, subject, category, prompt = the CLIP-T text, seed, image path) and
each subject's real images in; per-image scores and the summary out. Features of the real
images are computed once per subject; generated images are read and embedded in batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from components.core.errors import BlipDiffError
from components.evaluation import metrics as M

log = logging.getLogger(__name__)

COLUMNS = ("mode", "subject", "category", "prompt", "seed", "image")


def read_image(path: Path) -> Image.Image:
    """An image as the official evaluation reads it (RGB, no EXIF rotation); OSError if unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise OSError(f"{path}: {exc}") from None


def _features(ev, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    return ev.dino_features(images), ev.clip_image_features(images)


def real_features(ev, real: dict[str, list[Path]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(DINO, CLIP) features of every subject's real images; an unreadable one is an error."""
    out = {}
    for subject, paths in real.items():
        if not paths:
            raise BlipDiffError(f"subject {subject!r} has no real images to score against")
        try:
            images = [read_image(p) for p in paths]
        except OSError as exc:
            raise BlipDiffError(f"real image {exc}") from None
        out[subject] = _features(ev, images)
    return out


def oracle(feats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The real-image row: the metrics between distinct real images of the same subject."""
    per_subject = {}
    for subject, (dino, clip) in sorted(feats.items()):
        d, c = M.oracle_pairs(dino), M.oracle_pairs(clip)
        if d is not None:
            per_subject[subject] = {"dino": d, "clip_i": c, "pairs": len(dino) * (len(dino) - 1)}
    if not per_subject:
        return {"dino": None, "clip_i": None, "pairs": 0, "subjects": 0, "per_subject": {}}
    return {
        "dino": float(np.mean([v["dino"] for v in per_subject.values()])),
        "clip_i": float(np.mean([v["clip_i"] for v in per_subject.values()])),
        "pairs": int(sum(v["pairs"] for v in per_subject.values())),
        "subjects": len(per_subject),
        "per_subject": per_subject,
    }


def score(items: pd.DataFrame, real: dict[str, list[Path]], ev, base: Path,
          batch_size: int = 32) -> tuple[pd.DataFrame, dict, dict]:
    """Score every generated image of `items` (image paths relative to `base`).

    Returns (per_image with dino, clip_i, clip_t; the oracle; counts and speed). An image
    that cannot be read is skipped and counted; a subject not in `real` is an error.
    """
    missing = set(COLUMNS) - set(items.columns)
    if missing:
        raise BlipDiffError(f"scoring: the image table lacks column(s) {', '.join(sorted(missing))}")
    unknown = sorted(set(items["subject"]) - set(real))
    if unknown:
        raise BlipDiffError(f"scoring: no real images for subject(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(real))}")
    start = time.perf_counter()
    feats = real_features(ev, {s: real[s] for s in sorted(set(items["subject"]))})
    real_seconds = time.perf_counter() - start
    rows, skipped = [], []
    start = time.perf_counter()
    records = items.to_dict("records")
    for lo in range(0, len(records), batch_size):
        chunk, images = [], []
        for rec in records[lo:lo + batch_size]:
            try:
                images.append(read_image(base / rec["image"]))
                chunk.append(rec)
            except OSError as exc:
                log.warning("skipped generated image %s", exc)
                skipped.append(str(rec["image"]))
        if not chunk:
            continue
        dino, clip = _features(ev, images)
        text = ev.clip_text_features([rec["prompt"] for rec in chunk])
        clip_t = M.text_alignment(clip, text)
        for i, rec in enumerate(chunk):
            real_dino, real_clip = feats[rec["subject"]]
            rows.append({**rec,
                         "dino": float(M.subject_fidelity(dino[i:i + 1], real_dino)[0]),
                         "clip_i": float(M.subject_fidelity(clip[i:i + 1], real_clip)[0]),
                         "clip_t": float(clip_t[i])})
    gen_seconds = time.perf_counter() - start
    if not rows:
        raise BlipDiffError(f"scoring: none of the {len(records)} generated images could be read")
    per_image = pd.DataFrame(rows, columns=[*items.columns, "dino", "clip_i", "clip_t"])
    n_real = sum(len(v[0]) for v in feats.values())
    stats = {"images_scored": len(rows), "images_skipped": len(skipped), "real_images": n_real,
             "scored_images_per_s": len(rows) / gen_seconds if gen_seconds else 0.0,
             "seconds_real_features": real_seconds, "seconds_scoring": gen_seconds}
    return per_image, oracle(feats), stats


def summary(per_image: pd.DataFrame, oracle_row: dict, evaluators: dict) -> dict:
    """metrics.json: every mode's summary (overall, live/object, per subject, per prompt),
    the oracle and the evaluators."""
    modes = {mode: M.summarize(frame) for mode, frame in per_image.groupby("mode", sort=True)}
    return {"modes": modes, "oracle": oracle_row, "evaluators": evaluators}


def flat_metrics(detail: dict) -> dict:
    """The overall numbers for DVC (`metrics/evaluate.json`): <mode>_<metric>, oracle_<metric>."""
    flat = {}
    for mode, summ in detail["modes"].items():
        for key, value in summ["overall"].items():
            flat[f"{mode}_{key}"] = value
        for cat, values in summ.get("by_category", {}).items():
            for key in ("dino", "clip_i", "clip_t"):
                flat[f"{mode}_{cat}_{key}"] = values[key]
    for key in ("dino", "clip_i"):
        if detail["oracle"].get(key) is not None:
            flat[f"oracle_{key}"] = detail["oracle"][key]
    return flat

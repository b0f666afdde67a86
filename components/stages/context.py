"""Stage `context`: prompted context generation (paper Sec. 4.2.2).

For each subject image: CLIPSeg(image, class text) -> trimap -> closed-form alpha ->
the subject alpha-blended onto K random backgrounds. Each composite is a training input
whose target is the original image. Writes `data/context/` (alpha/, inputs/) and
`data/pairs.parquet` (schema: components.data.manifests.PAIRS_SCHEMA). The per-image work
is `components.context.generation` (CLIPSeg and matting: `components.context`).

The work is sharded by image: one shard = one CLIPSeg batch (`context.clipseg_batch_size`
consecutive images), the same grouping in every run. Shards run in this process by default,
or over a Dask cluster (`dask:` in params.yaml: `workers` for a LocalCluster, `address` for
an existing scheduler; components.context.distributed). The outputs are the same bytes
either way: shards come back in the stage's order and this process alone writes them, into
one temporary folder renamed into place. Dask runs here, inside the stage, with
`dask.distributed`, not as Prefect's Dask task runner in the flow: `dvc repro` and
`blipdiff context` get it without Prefect, DVC still versions one stage with one lock entry,
and the `dask` section is no DVC param of it, so where it ran never makes it stale.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from components.context import matting
from components.context.distributed import open_executor
from components.context.generation import (
    MAX_SAMPLES,
    Backgrounds,
    ContextJob,
    ContextStats,
    ShardResult,
    SubjectImage,
    choose_mask_source,
    make_shards,
)
from components.core.config import Params
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import CONTEXT_DIR, PAIRS_MANIFEST, SUBJECTS_MANIFEST
from components.data.manifests import (
    PAIRS_SCHEMA,
    SUBJECTS_SCHEMA,
    read_manifest,
    write_parquet,
)

log = logging.getLogger(__name__)

SECTIONS = ("preset", "context")  # the params this stage reads (dvc.yaml `params`); `dask` is not one
OUTPUTS = (CONTEXT_DIR, PAIRS_MANIFEST)


def read_subjects(cfg, root: Path) -> list[SubjectImage]:
    """The ingested images, each with where its trimap comes from; errors for a missing
    manifest, image or ground-truth mask."""
    subjects = read_manifest(root / SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    if subjects.empty:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: no subject images (run `blipdiff ingest`)")
    for path in subjects["image_path"]:
        if not (root / path).is_file():
            raise BlipDiffError(f"{SUBJECTS_MANIFEST}: image {path} is missing (re-run ingest)")
    sources = [choose_mask_source(cfg, isinstance(m, str)) for m in subjects["mask_path"]]
    if cfg.mask_source == "ground_truth" and subjects["mask_path"].isna().any():
        n = int(subjects["mask_path"].isna().sum())
        raise BlipDiffError(
            f"context.mask_source=ground_truth, but {n} images have no mask in {SUBJECTS_MANIFEST}; "
            "use 'auto' or 'clipseg'"
        )
    return [
        SubjectImage(index=i, image_path=r.image_path, mask_path=r.mask_path if isinstance(r.mask_path, str) else None,
                     subject_id=r.subject_id, class_name=r.class_name,
                     caption=r.caption if isinstance(r.caption, str) else None, split=r.split, source=source)
        for i, (r, source) in enumerate(zip(subjects.itertuples(index=False), sources))
    ]


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the stage in `root`; return its metrics and a few sample images."""
    cfg = params.context
    images = read_subjects(cfg, root)
    backgrounds = Backgrounds(cfg, root)
    job = ContextJob(cfg, params.preset, root.resolve(), backgrounds, token=uuid.uuid4().hex)
    shards = make_shards(images, cfg.clipseg_batch_size)

    stats = ContextStats()
    rows: list[dict] = []
    samples: dict[str, np.ndarray] = {}
    out_dir = root / CONTEXT_DIR
    start = time.perf_counter()
    with open_executor(params.dask) as executor:
        seconds_start = time.perf_counter() - start
        log.info("context: %d images in %d shards of up to %d, %s",
                 len(images), len(shards), cfg.clipseg_batch_size, executor.name)
        start = time.perf_counter()
        with atomic_path(out_dir) as tmp_dir, tqdm(total=len(images), desc="context", unit="img") as bar, \
                closing(executor.run(job, shards)) as results:
            for shard, result in zip(shards, results):
                _write_shard(result, tmp_dir, rows, stats, samples)
                bar.update(len(shard))
            seconds_shards = time.perf_counter() - start
            if not rows:
                raise BlipDiffError(
                    f"context: every trimap was degenerate ({dict(stats.skipped)}); "
                    "check context.fg_threshold / bg_threshold / erode"
                )
            frame = write_parquet(rows, root / PAIRS_MANIFEST, PAIRS_SCHEMA)

    log.info("read %d images, wrote %d pairs to %s and %s (%d skipped: %s)",
             len(images), len(frame), out_dir, PAIRS_MANIFEST, sum(stats.skipped.values()),
             dict(stats.skipped))
    log.info("context %s: %.1f s, %.2f images/s", executor.name, seconds_shards, len(images) / seconds_shards)
    metrics = context_metrics(cfg, images, frame, stats, backgrounds)
    # Per part: summed over every process that ran shards. These and the executor's keys go to
    # MLflow only (runner.MACHINE_DEPENDENT): the DVC metrics file does not depend on where it ran.
    for name, seconds in sorted(stats.seconds.items()):
        metrics[f"seconds_{name}"] = round(seconds, 4)
    metrics["seconds_shards"] = round(seconds_shards, 4)  # wall time of the per-image work
    metrics["seconds_executor_start"] = round(seconds_start, 4)  # a LocalCluster's start, a connection
    metrics["samples_per_s"] = round(len(images) / seconds_shards, 4)  # images/s
    metrics["run_dask_workers"] = executor.workers  # 0: in the stage's process
    metrics["run_dask_threads"] = executor.threads
    metrics["run_dask_remote"] = int(executor.remote)  # 1: an existing cluster (dask.address)
    metrics["run_clipseg_loads"] = stats.clipseg_loads  # in-process 1; on Dask at most one per worker
    return metrics, samples


def context_metrics(cfg, images: list[SubjectImage], frame, stats: ContextStats, backgrounds: Backgrounds) -> dict:
    """What the stage read, matted, wrote and skipped (the machine-independent metrics)."""
    trimaps = [im.source for im in images]
    metrics: dict[str, float] = {
        "images_read": len(images),
        "images_matted": len(stats.unknown_fractions) - sum(stats.skipped.values()),
        "pairs_written": len(frame),
        "images_skipped": int(sum(stats.skipped.values())),
        "skipped_no_foreground": stats.skipped[matting.NO_FOREGROUND],
        "skipped_no_background": stats.skipped[matting.NO_BACKGROUND],
        "unknown_fraction_mean": float(np.mean(stats.unknown_fractions)),
        "ground_truth_trimaps": trimaps.count("ground_truth"),
        "clipseg_trimaps": trimaps.count("clipseg"),
    }
    if cfg.background_source == "folder":
        metrics["backgrounds_used"] = len(backgrounds.files)
        metrics["backgrounds_skipped"] = int(sum(backgrounds.skipped.values()))
    if stats.sad:
        metrics["alpha_sad_mean"] = float(np.mean(stats.sad))
        metrics["alpha_mse_mean"] = float(np.mean(stats.mse))
    return metrics


def _write_shard(result: ShardResult, tmp_dir: Path, rows: list[dict], stats: ContextStats,
                 samples: dict[str, np.ndarray]) -> None:
    """Write one shard's files into the stage's temporary output; add its rows, stats and samples."""
    for warning in result.warnings:
        log.warning(warning)
    files = dict(result.files)
    for rel, data in result.files:
        path = tmp_dir / Path(rel).relative_to(CONTEXT_DIR)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for name, input_rel, alpha_rel in result.samples:
        if len(samples) < MAX_SAMPLES:
            samples[f"{name}_input"] = _decode(files[input_rel])
            samples[f"{name}_alpha"] = _decode(files[alpha_rel])
    rows.extend(result.rows)
    stats.merge(result.stats)


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)

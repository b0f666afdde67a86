"""Stage `context`: prompted context generation (paper Sec. 4.2.2).

For each subject image: CLIPSeg(image, class text) -> trimap -> closed-form alpha ->
the subject alpha-blended onto K random backgrounds. Each composite is a training input
whose target is the original image. Writes `data/context/` (alpha/, inputs/) and
`data/pairs.parquet` (schema: components.data.manifests.PAIRS_SCHEMA). CLIPSeg and
matting are `components.context`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from components.context import matting
from components.core.config import ContextConfig, Params
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import CONTEXT_DIR, PAIRS_MANIFEST, SUBJECTS_MANIFEST
from components.data.backgrounds import procedural_background
from components.data.images import SkipImage, alpha_to_uint8, load_image, read_alpha, read_rgb, save_png
from components.data.manifests import (
    PAIRS_SCHEMA,
    SUBJECTS_SCHEMA,
    read_manifest,
    write_parquet,
)

log = logging.getLogger(__name__)

SECTIONS = ("preset", "context")  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (CONTEXT_DIR, PAIRS_MANIFEST)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class Backgrounds:
    """The background pool: procedural (by default) or a folder of images, fitted to size.

    Folder images are checked once at the start as ingest checks subject photos: a file
    that cannot be read (not an image, corrupt, truncated) or is too large is skipped,
    logged and counted (`skipped`), so no composite depends on a broken file."""

    MAX_SIDE = 4096  # a background is fitted to the subject image, never larger than this

    def __init__(self, cfg: ContextConfig, root: Path):
        self.seed = cfg.seed
        self.files: list[Path] = []
        self.skipped: Counter = Counter()
        if cfg.background_source == "folder":
            folder = (root / cfg.background_dir).resolve()
            if not folder.is_dir():
                raise BlipDiffError(f"context.background_dir: {folder} not found")
            candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in candidates:
                try:
                    load_image(path, self.MAX_SIDE)
                except SkipImage as skip:
                    self.skipped[skip.reason] += 1
                    log.warning("skipped background %s", skip)
                    continue
                self.files.append(path)
            if not self.files:
                raise BlipDiffError(f"context.background_dir: no readable images in {folder} "
                                    f"({len(candidates)} candidates, skipped: {dict(self.skipped)})")
            self.ids = [p.relative_to(folder).as_posix() for p in self.files]
        else:
            self.ids = [f"procedural-{i:04d}" for i in range(cfg.background_pool_size)]

    def get(self, index: int, height: int, width: int) -> np.ndarray:
        if not self.files:
            return procedural_background(np.random.default_rng([self.seed, index]), height, width)
        image = Image.fromarray(load_image(self.files[index], self.MAX_SIDE).rgb)
        # Cover the target size, then centre-crop: no stretching, no borders.
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        return np.asarray(image.crop((left, top, left + width, top + height)))


@dataclass
class ContextStats:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    skipped: Counter = field(default_factory=Counter)
    unknown_fractions: list[float] = field(default_factory=list)
    sad: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)

    def timed(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - start
        return now


def choose_mask_source(cfg: ContextConfig, has_mask: bool) -> str:
    if cfg.mask_source == "auto":
        return "ground_truth" if has_mask else "clipseg"
    return cfg.mask_source


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the stage in `root`; return its metrics and a few sample images."""
    cfg = params.context
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
    backgrounds = Backgrounds(cfg, root)
    stats = ContextStats()
    segmenter = None
    if "clipseg" in sources:
        from components.context.clipseg import ClipSeg

        t = time.perf_counter()
        segmenter = ClipSeg(params.preset, cfg.clipseg_model, cfg.seed, cfg.device)
        stats.timed("clipseg_load", t)
    normalize = cfg.normalize_probs
    if normalize == "auto":
        normalize = segmenter is not None and segmenter.random_weights

    rows: list[dict] = []
    samples: dict[str, np.ndarray] = {}
    out_dir = root / CONTEXT_DIR
    records = list(subjects.itertuples(index=False))
    with atomic_path(out_dir) as tmp_dir, tqdm(total=len(records), desc="context", unit="img") as bar:
        for start in range(0, len(records), cfg.clipseg_batch_size):
            batch = records[start : start + cfg.clipseg_batch_size]
            batch_sources = sources[start : start + cfg.clipseg_batch_size]
            rgbs = [read_rgb(root / r.image_path) for r in batch]
            probs = _segment(segmenter, rgbs, batch, batch_sources, stats)
            for offset, (record, rgb, prob, source) in enumerate(zip(batch, rgbs, probs, batch_sources)):
                index = start + offset
                truth = read_alpha(root / record.mask_path) if isinstance(record.mask_path, str) else None
                new_rows = _context_pairs(
                    cfg, index, record, rgb, prob, truth, source, backgrounds, stats, tmp_dir, samples, normalize
                )
                rows.extend(new_rows)
                bar.update(1)
        if not rows:
            raise BlipDiffError(
                f"context: every trimap was degenerate ({dict(stats.skipped)}); "
                "check context.fg_threshold / bg_threshold / erode"
            )
        frame = write_parquet(rows, root / PAIRS_MANIFEST, PAIRS_SCHEMA)

    log.info("read %d images, wrote %d pairs to %s and %s (%d skipped: %s)",
             len(records), len(frame), out_dir, PAIRS_MANIFEST, sum(stats.skipped.values()),
             dict(stats.skipped))
    metrics: dict[str, float] = {
        "images_read": len(records),
        "images_matted": len(stats.unknown_fractions) - sum(stats.skipped.values()),
        "pairs_written": len(frame),
        "images_skipped": int(sum(stats.skipped.values())),
        "skipped_no_foreground": stats.skipped[matting.NO_FOREGROUND],
        "skipped_no_background": stats.skipped[matting.NO_BACKGROUND],
        "unknown_fraction_mean": float(np.mean(stats.unknown_fractions)),
        "ground_truth_trimaps": sources.count("ground_truth"),
        "clipseg_trimaps": sources.count("clipseg"),
    }
    if cfg.background_source == "folder":
        metrics["backgrounds_used"] = len(backgrounds.files)
        metrics["backgrounds_skipped"] = int(sum(backgrounds.skipped.values()))
    if stats.sad:
        metrics["alpha_sad_mean"] = float(np.mean(stats.sad))
        metrics["alpha_mse_mean"] = float(np.mean(stats.mse))
    for name, seconds in sorted(stats.seconds.items()):
        metrics[f"seconds_{name}"] = round(seconds, 4)
    return metrics, samples


def _segment(segmenter, rgbs, batch, batch_sources, stats: ContextStats) -> list[np.ndarray | None]:
    """CLIPSeg probability maps for the rows that need one, in one batched call."""
    wanted = [i for i, s in enumerate(batch_sources) if s == "clipseg"]
    probs: list[np.ndarray | None] = [None] * len(batch)
    if wanted:
        t = time.perf_counter()
        maps = segmenter([rgbs[i] for i in wanted], [batch[i].class_name for i in wanted])
        stats.timed("clipseg", t)
        for i, prob in zip(wanted, maps):
            probs[i] = prob
    return probs


def _context_pairs(
    cfg: ContextConfig,
    index: int,
    record,
    rgb: np.ndarray,
    prob: np.ndarray | None,
    truth: np.ndarray | None,
    source: str,
    backgrounds: Backgrounds,
    stats: ContextStats,
    tmp_dir: Path,
    samples: dict[str, np.ndarray],
    normalize: bool,
) -> list[dict]:
    """Trimap, matting and K composites of one image; [] when its trimap is degenerate."""
    t = time.perf_counter()
    if source == "ground_truth":
        trimap = matting.trimap_from_alpha(truth, cfg.gt_band)
    else:
        trimap = matting.trimap_from_probs(
            prob, cfg.fg_threshold, cfg.bg_threshold, cfg.erode, normalize
        )
    stats.unknown_fractions.append(matting.unknown_fraction(trimap))
    reason = matting.degenerate_reason(trimap, cfg.min_region_fraction)
    if reason is not None:
        stats.skipped[reason] += 1
        log.warning("skipped %s: degenerate trimap (%s)", record.image_path, reason)
        return []
    t = stats.timed("trimap", t)
    alpha = matting.estimate_alpha(rgb, trimap, cfg.matting_max_side)
    t = stats.timed("matting", t)
    if truth is not None:
        errors = matting.alpha_errors(alpha, truth, trimap)
        stats.sad.append(errors["sad"])
        stats.mse.append(errors["mse"])
    foreground = matting.estimate_foreground(rgb, alpha)
    t = stats.timed("foreground", t)

    stem = Path(record.image_path).stem
    alpha_rel = CONTEXT_DIR / "alpha" / record.subject_id / f"{stem}.png"
    (tmp_dir / alpha_rel.relative_to(CONTEXT_DIR)).parent.mkdir(parents=True, exist_ok=True)
    alpha_u8 = alpha_to_uint8(alpha)
    save_png(alpha_u8, tmp_dir / alpha_rel.relative_to(CONTEXT_DIR))

    h, w = alpha.shape
    rng = np.random.default_rng([cfg.seed, index])
    picks = rng.choice(len(backgrounds.ids), size=cfg.backgrounds_per_image,
                       replace=cfg.backgrounds_per_image > len(backgrounds.ids))
    rows = []
    for k, bg_index in enumerate(picks):
        composite = matting.blend(foreground, alpha, backgrounds.get(int(bg_index), h, w))
        input_rel = CONTEXT_DIR / "inputs" / record.subject_id / f"{stem}_{k}.png"
        out = tmp_dir / input_rel.relative_to(CONTEXT_DIR)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(composite, out)
        if len(samples) < 8 and k == 0:
            samples[f"{record.subject_id}_{stem}_input"] = composite
            samples[f"{record.subject_id}_{stem}_alpha"] = alpha_u8
        rows.append(
            {
                "pair_id": f"{record.subject_id}/{stem}/{k}",
                "subject_id": record.subject_id,
                "input_path": input_rel.as_posix(),
                "target_path": record.image_path,
                "alpha_path": alpha_rel.as_posix(),
                "subject_text": record.class_name,
                "caption": record.caption if isinstance(record.caption, str) else f"a {record.class_name}",
                "background_id": backgrounds.ids[int(bg_index)],
                "split": record.split,
                "mask_source": source,
            }
        )
    stats.timed("blending", t)
    return rows

"""Prompted context generation of one shard of subject images (paper Sec. 4.2.2).

A shard is one CLIPSeg batch: `context.clipseg_batch_size` consecutive images of the
subjects manifest, the same grouping whichever executor runs it (CLIPSeg on another
grouping may differ in the last bits, and the outputs must be the same bytes).
`process_shard` is the one code path of the per-image work, for the in-process run and for
a Dask worker alike (components.context.distributed): CLIPSeg(image, class text) -> trimap ->
closed-form alpha -> the subject alpha-blended onto K backgrounds. It writes nothing: it
returns the PNG bytes, the manifest rows, the stats and the warnings, and the stage writes
them, in its order, into its one temporary output folder.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from components.context import matting
from components.core.config import ContextConfig
from components.core.errors import BlipDiffError
from components.core.paths import CONTEXT_DIR, external_path
from components.data.backgrounds import procedural_background
from components.data.images import SkipImage, alpha_to_uint8, load_image, read_alpha, read_rgb, save_png

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MAX_SAMPLES = 8  # sample images the stage logs (input and alpha of the first matted images)


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
            folder = external_path(cfg.background_dir, root)
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
    clipseg_loads: int = 0  # CLIPSegs built: one per process that ran a shard needing one

    def timed(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - start
        return now

    def merge(self, other: "ContextStats") -> None:
        """Add a later shard's stats: lists keep the images' order, so means are the serial run's."""
        for name, seconds in other.seconds.items():
            self.seconds[name] += seconds
        self.skipped.update(other.skipped)
        self.unknown_fractions.extend(other.unknown_fractions)
        self.sad.extend(other.sad)
        self.mse.extend(other.mse)
        self.clipseg_loads += other.clipseg_loads


@dataclass(frozen=True)
class SubjectImage:
    """One row of the subjects manifest, as a shard carries it (plain, picklable)."""

    index: int  # position in the manifest: seeds this image's background picks
    image_path: str
    mask_path: str | None
    subject_id: str
    class_name: str
    caption: str | None
    split: str
    source: str  # where its trimap comes from: "clipseg" or "ground_truth"


@dataclass(frozen=True)
class ContextJob:
    """What every shard of one stage run needs; sent once to each Dask worker."""

    cfg: ContextConfig
    preset: str
    root: Path  # absolute: workers read the subject images (and folder backgrounds) from here
    backgrounds: Backgrounds
    token: str  # unique per stage run: a worker's cached CLIPSeg belongs to one run


@dataclass
class ShardResult:
    rows: list[dict] = field(default_factory=list)
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (path in the repository, PNG bytes)
    # (name, input, alpha) of each matted image's first composite: the stage's sample images
    samples: list[tuple[str, str, str]] = field(default_factory=list)
    stats: ContextStats = field(default_factory=ContextStats)
    warnings: list[str] = field(default_factory=list)


def choose_mask_source(cfg: ContextConfig, has_mask: bool) -> str:
    if cfg.mask_source == "auto":
        return "ground_truth" if has_mask else "clipseg"
    return cfg.mask_source


def make_shards(images: list[SubjectImage], batch_size: int) -> list[list[SubjectImage]]:
    return [images[start : start + batch_size] for start in range(0, len(images), batch_size)]


class Segmenters:
    """One CLIPSeg per process and stage run, built on first use: the stage's own process, or
    once on each Dask worker (not once per shard). Thread-safe for threads_per_worker > 1."""

    def __init__(self):
        self._token: str | None = None
        self._segmenter = None
        self._lock = threading.Lock()

    def get(self, job: ContextJob, stats: ContextStats):
        with self._lock:
            if self._token != job.token:
                from components.context.clipseg import ClipSeg

                self._segmenter = None  # free the previous run's model first
                start = time.perf_counter()
                self._segmenter = ClipSeg(job.preset, job.cfg.clipseg_model, job.cfg.seed, job.cfg.device)
                self._token = job.token
                stats.timed("clipseg_load", start)
                stats.clipseg_loads += 1
            return self._segmenter


def run_serial(job: ContextJob, shards: list[list[SubjectImage]]) -> Iterator[ShardResult]:
    """The shards in this process, one after the other (dask.workers: 0)."""
    segmenters = Segmenters()
    for shard in shards:
        yield process_shard(job, shard, segmenters.get)


def process_shard(job: ContextJob, shard: list[SubjectImage],
                  segmenter: Callable[[ContextJob, ContextStats], object]) -> ShardResult:
    """Trimaps, mattes and composites of one shard; `segmenter(job, stats)` gives the CLIPSeg."""
    result = ShardResult()
    rgbs = [read_rgb(_input(job, image.image_path)) for image in shard]
    probs, normalize = _segment(job, shard, rgbs, segmenter, result.stats)
    for image, rgb, prob in zip(shard, rgbs, probs):
        truth = read_alpha(_input(job, image.mask_path)) if image.mask_path is not None else None
        _context_pairs(job, image, rgb, prob, truth, normalize, result)
    return result


def _input(job: ContextJob, relative: str) -> Path:
    path = job.root / relative
    if not path.is_file():
        # The stage checked every input before it started: missing here is most likely a Dask
        # worker that does not see the repository's files at the stage's path.
        raise BlipDiffError(
            f"context: {path} is not readable on host {socket.gethostname()}; on a Dask cluster every "
            f"worker must see the repository at {job.root} (a shared filesystem, the same path)"
        )
    return path


def _segment(job, shard, rgbs, segmenter, stats: ContextStats) -> tuple[list[np.ndarray | None], bool]:
    """CLIPSeg probability maps for the images that need one, in one batched call; and whether
    to rescale them (context.normalize_probs; auto: only a random-weights CLIPSeg's)."""
    wanted = [i for i, image in enumerate(shard) if image.source == "clipseg"]
    probs: list[np.ndarray | None] = [None] * len(shard)
    normalize = job.cfg.normalize_probs
    if wanted:
        model = segmenter(job, stats)
        if normalize == "auto":
            normalize = model.random_weights
        start = time.perf_counter()
        maps = model([rgbs[i] for i in wanted], [shard[i].class_name for i in wanted])
        stats.timed("clipseg", start)
        for i, prob in zip(wanted, maps):
            probs[i] = prob
    return probs, bool(normalize)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    save_png(array, buffer)  # the stage's PNG settings: the same pixels give the same bytes
    return buffer.getvalue()


def _context_pairs(
    job: ContextJob,
    image: SubjectImage,
    rgb: np.ndarray,
    prob: np.ndarray | None,
    truth: np.ndarray | None,
    normalize: bool,
    result: ShardResult,
) -> None:
    """Trimap, matting and K composites of one image; no rows when its trimap is degenerate."""
    cfg, stats = job.cfg, result.stats
    t = time.perf_counter()
    if image.source == "ground_truth":
        trimap = matting.trimap_from_alpha(truth, cfg.gt_band)
    else:
        trimap = matting.trimap_from_probs(prob, cfg.fg_threshold, cfg.bg_threshold, cfg.erode, normalize)
    stats.unknown_fractions.append(matting.unknown_fraction(trimap))
    reason = matting.degenerate_reason(trimap, cfg.min_region_fraction)
    if reason is not None:
        stats.skipped[reason] += 1
        result.warnings.append(f"skipped {image.image_path}: degenerate trimap ({reason})")
        return
    t = stats.timed("trimap", t)
    alpha = matting.estimate_alpha(rgb, trimap, cfg.matting_max_side)
    t = stats.timed("matting", t)
    if truth is not None:
        errors = matting.alpha_errors(alpha, truth, trimap)
        stats.sad.append(errors["sad"])
        stats.mse.append(errors["mse"])
    foreground = matting.estimate_foreground(rgb, alpha)
    t = stats.timed("foreground", t)

    stem = Path(image.image_path).stem
    alpha_rel = (CONTEXT_DIR / "alpha" / image.subject_id / f"{stem}.png").as_posix()
    result.files.append((alpha_rel, _png(alpha_to_uint8(alpha))))

    h, w = alpha.shape
    rng = np.random.default_rng([cfg.seed, image.index])
    picks = rng.choice(len(job.backgrounds.ids), size=cfg.backgrounds_per_image,
                       replace=cfg.backgrounds_per_image > len(job.backgrounds.ids))
    for k, bg_index in enumerate(picks):
        composite = matting.blend(foreground, alpha, job.backgrounds.get(int(bg_index), h, w))
        input_rel = (CONTEXT_DIR / "inputs" / image.subject_id / f"{stem}_{k}.png").as_posix()
        result.files.append((input_rel, _png(composite)))
        if k == 0:
            result.samples.append((f"{image.subject_id}_{stem}", input_rel, alpha_rel))
        result.rows.append(
            {
                "pair_id": f"{image.subject_id}/{stem}/{k}",
                "subject_id": image.subject_id,
                "input_path": input_rel,
                "target_path": image.image_path,
                "alpha_path": alpha_rel,
                "subject_text": image.class_name,
                "caption": image.caption if image.caption is not None else f"a {image.class_name}",
                "background_id": job.backgrounds.ids[int(bg_index)],
                "split": image.split,
                "mask_source": image.source,
            }
        )
    stats.timed("blending", t)

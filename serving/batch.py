"""Batch generation from a manifest, resumable: `blipdiff batch`.

A manifest (CSV, JSONL or parquet) has one row per job: `id` (unique; names the images),
`prompt`, `source_subject`, `subject_images` (a list; in CSV one string, paths separated by
`;`) or `embeddings` (a saved subject embeddings file), and optionally `target_subject`
(default: the source subject), `num_images` (default 1), `seed` (image k uses seed + k) and
sampler settings `steps`, `guidance_scale`, `scheduler`, `negative_prompt`, `height`,
`width` (defaults: the command's flags). Relative paths are relative to the manifest's folder.
ControlNet (the model's own, one): `control_image` (a path), `control_type` (canny|none) and
`controlnet_scale` (defaults: `--control-type`, `--controlnet-scale`; canny thresholds: the
flags); a row without `control_image` is generated without control.

The whole manifest is checked before any model is loaded: a missing required column, an
unknown column, a duplicate or unusable id stop at once with one line. A bad row (empty
prompt, missing class, bad setting such as an unknown control_type; later an unreadable
subject or control image, an unknown class, a missing embeddings file, a control image for a
model without ControlNet) goes to `errors.jsonl` with its error, and the rest goes on.

Batches: the images of all rows, in manifest order, grouped by sampler (size, steps,
guidance, scheduler, negative prompt) and by whether they have a control image (groups in
order of first appearance), and cut into batches of `batch_size` images; the images of a
control batch each have their own condition image and scale. The plan depends on the
manifest and the flags only, never on what is already done, so a batch always holds the same
images (CPU float results can depend on a batch's other images in their last bits). Each
finished batch is journaled in `batches.jsonl` after its images are written (each
atomically: a temporary file, then os.replace). A re-run skips a batch whose journal entry
(same images, same inputs, the control images' content hashes among them, same model and
backend) is there with all its images, and regenerates every other batch whole, so a run
killed mid-batch and re-run gives the bytes of an uninterrupted run.

Outputs: `images/<id>_<k>.png`, `records.parquet` (every input of every image, the control
image with its sha256 and settings included, backend, provider, model hash, seconds of its
batch), `errors.jsonl`, `batches.jsonl`.

Where batches are made: in this process (the default), or over a Dask cluster (`dask`: a
LocalCluster of worker processes, or an existing scheduler; components.cluster).
Either way a batch is made in two parts: `compute_batch` (subject embeddings, control maps,
the generator; the images' PNG bytes, records and error rows, no file written) where it runs,
then `write_batch` here alone, in plan order (the images atomically, then the journal entry),
so the outputs are the same bytes. A worker loads the generator once (`GeneratorSpec`, sent
to it; kept for the next batches and runs), not per batch; the driver loads no model and
plans with the description of a worker's. A worker's exception is raised here as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.core.errors import BlipDiffError, NonFiniteError
from components.core.io import atomic_path
from components.model.blip_diffusion import SCHEDULERS, BlipDiffusion
from components.model.controlnet import CANNY_HIGH, CANNY_LOW, check_control_type

if TYPE_CHECKING:
    from components.core.config import DaskConfig

log = logging.getLogger(__name__)

REQUIRED = ("id", "prompt", "source_subject")
SUBJECT = ("subject_images", "embeddings")  # at least one of these columns; one of them per row
SAMPLER = ("steps", "guidance_scale", "scheduler", "negative_prompt", "height", "width")
CONTROL = ("control_image", "control_type", "controlnet_scale")
OPTIONAL = ("target_subject", "num_images", "seed", *SAMPLER, *CONTROL)
COLUMNS = (*REQUIRED, *SUBJECT, *OPTIONAL)
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}

IMAGES_DIR, RECORDS, ERRORS, JOURNAL = "images", "records.parquet", "errors.jsonl", "batches.jsonl"
CONTROL_MAX_SIDE = 4096  # as `blipdiff generate` reads a control image


# ---------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Sampler:
    steps: int
    guidance_scale: float
    scheduler: str
    negative_prompt: str
    height: int | None  # None: the model's native size
    width: int | None
    prompt_strength: float
    prompt_reps: int


@dataclass(frozen=True)
class ControlDefaults:
    """The flags' defaults of a row's control (`--control-type`, `--canny-low/-high`,
    `--controlnet-scale`)."""

    control_type: str = "canny"
    canny_low: int = CANNY_LOW
    canny_high: int = CANNY_HIGH
    controlnet_scale: float = 1.0


@dataclass(frozen=True)
class ControlInput:
    """A row's control: its condition image and how the ControlNet is given it."""

    image: str  # resolved path
    sha256: str | None  # of the file when the manifest was read; None: missing or unreadable then
    type: str  # canny | none
    canny_low: int | None  # None for type none (unused)
    canny_high: int | None
    scale: float

    def record(self) -> dict:
        return {"control_image": self.image, "control_sha256": self.sha256, "control_type": self.type,
                "canny_low": self.canny_low, "canny_high": self.canny_high, "controlnet_scale": self.scale}


NO_CONTROL = {"control_image": None, "control_sha256": None, "control_type": None, "canny_low": None,
              "canny_high": None, "controlnet_scale": None}


@dataclass(frozen=True)
class Job:
    """One checked manifest row."""

    id: str
    row: int  # 1-based among the manifest's rows
    prompt: str
    source_subject: str
    target_subject: str | None
    subject_images: tuple[str, ...]
    embeddings: str | None
    num_images: int
    seed: int
    sampler: Sampler
    control: ControlInput | None = None


@dataclass(frozen=True)
class Item:
    """One image to make."""

    job: Job
    k: int

    @property
    def seed(self) -> int:
        return self.job.seed + self.k

    @property
    def name(self) -> str:
        return f"{IMAGES_DIR}/{self.job.id}_{self.k}.png"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The manifest's rows as dicts of plain Python values (None for empty)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise BlipDiffError(f"{path}: unknown manifest format; use .csv, .jsonl or .parquet")
    if not path.is_file():
        raise BlipDiffError(f"{path}: manifest not found")
    try:
        if kind == "jsonl":
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise BlipDiffError(f"{path}:{n}: a JSONL row must be an object, got {type(value).__name__}")
                    rows.append(value)
            columns = list(dict.fromkeys(k for r in rows for k in r))
        else:
            import pandas as pd

            frame = (pd.read_csv(path, dtype=str, keep_default_na=False) if kind == "csv"
                     else pd.read_parquet(path))
            columns, rows = [str(c) for c in frame.columns], frame.to_dict("records")
    except BlipDiffError:
        raise
    except Exception as exc:  # unreadable CSV, parquet, JSON
        raise BlipDiffError(f"{path}: not a readable {kind} manifest ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing or not any(c in columns for c in SUBJECT):
        need = missing + ([] if any(c in columns for c in SUBJECT) else ["subject_images or embeddings"])
        raise BlipDiffError(f"{path}: missing required column(s) {', '.join(need)} (has: {', '.join(columns) or 'none'})")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise BlipDiffError(f"{path}: unknown column(s) {', '.join(unknown)}; the columns are {', '.join(COLUMNS)}")
    if not rows:
        raise BlipDiffError(f"{path}: no rows")
    return [{k: _plain(v) for k, v in r.items()} for r in rows]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays to Python; NaN, None and "" (empty CSV cells) to None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(number)


def _float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    items = value.split(";") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _resolve(base: Path, path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def file_sha256(path: str) -> str | None:
    """The file's content hash, None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def check_control(row: dict, base: Path, defaults: ControlDefaults,
                  hashes: dict[str, str | None] | None = None) -> ControlInput | None:
    """A row's control (None: no control_image); ValueError for a bad control setting.
    `hashes` caches the files' content hashes by path."""
    image = row.get("control_image")
    kind = defaults.control_type if row.get("control_type") is None else str(row["control_type"]).strip()
    try:
        check_control_type(kind, "control_type")
    except BlipDiffError as exc:  # a bad row, not a stop
        raise ValueError(str(exc)) from None
    scale = (defaults.controlnet_scale if row.get("controlnet_scale") is None
             else _float(row["controlnet_scale"], "controlnet_scale"))
    if image is None:
        given = [k for k in ("control_type", "controlnet_scale") if row.get(k) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} without control_image: give the control image, or leave "
                             f"{'them' if len(given) > 1 else 'it'} empty")
        return None
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"control_image must be one path, got {image!r}")
    path = _resolve(base, image.strip())
    hashes = {} if hashes is None else hashes
    if path not in hashes:
        hashes[path] = file_sha256(path)
    canny = kind == "canny"
    return ControlInput(image=path, sha256=hashes[path], type=kind, canny_low=defaults.canny_low if canny else None,
                        canny_high=defaults.canny_high if canny else None, scale=scale)


def check_row(row: dict, n: int, base: Path, defaults: Sampler, seed: int,
              control_defaults: ControlDefaults | None = None, hashes: dict | None = None) -> Job:
    """One row as a Job; ValueError naming the problem when it is a bad row."""
    prompt = str(row.get("prompt") or "").strip()
    if not prompt:
        raise ValueError("empty prompt")
    images, embeddings = _paths(row.get("subject_images")), row.get("embeddings")
    if bool(images) == (embeddings is not None):
        raise ValueError("give subject_images or embeddings (one of them)")
    source = str(row.get("source_subject") or "").strip()
    if images and not source:
        raise ValueError("missing class (source_subject) of the subject images")
    num = _int(row["num_images"], "num_images") if row.get("num_images") is not None else 1
    if num < 1:
        raise ValueError(f"num_images must be >= 1, got {num}")
    sampler = {}
    for key in SAMPLER:
        value = row.get(key)
        if value is None:
            sampler[key] = getattr(defaults, key)
        elif key in ("steps", "height", "width"):
            sampler[key] = _int(value, key)
        elif key == "guidance_scale":
            sampler[key] = _float(value, key)
        else:
            sampler[key] = str(value)
    if sampler["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {sampler['steps']}")
    if sampler["scheduler"] not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {sampler['scheduler']!r}; choose one of {', '.join(SCHEDULERS)}")
    for key in ("height", "width"):
        if sampler[key] is not None and (sampler[key] <= 0 or sampler[key] % 8):
            raise ValueError(f"{key} must be a positive multiple of 8, got {sampler[key]}")
    target = str(row.get("target_subject") or "").strip() or None
    control = check_control(row, base, control_defaults or ControlDefaults(), hashes)
    return Job(id=str(row["id"]).strip(), row=n, prompt=prompt, source_subject=source, target_subject=target,
               subject_images=tuple(_resolve(base, p) for p in images),
               embeddings=_resolve(base, str(embeddings)) if embeddings is not None else None, num_images=num,
               seed=_int(row["seed"], "seed") if row.get("seed") is not None else seed,
               sampler=Sampler(**sampler, prompt_strength=defaults.prompt_strength, prompt_reps=defaults.prompt_reps),
               control=control)


def read_manifest(path: Path, defaults: Sampler, seed: int = 0,
                  control_defaults: ControlDefaults | None = None) -> tuple[list[Job], list[dict]]:
    """(the good rows as jobs, the bad rows' errors). Stops with one line at a missing or
    unknown column, a duplicate, empty or unusable id (ids name the image files). Control
    images are hashed here (a missing one is the row's error when its batch runs)."""
    path = Path(path)
    rows = read_rows(path)
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        rid = "" if row.get("id") is None else str(row["id"]).strip()
        if not ID_RE.match(rid):
            raise BlipDiffError(f"{path}: row {n}: id {rid!r} must be letters, digits, '.', '_' or '-' (it names "
                                "the image files)")
        if rid in seen:
            raise BlipDiffError(f"{path}: duplicate id {rid!r} (rows {seen[rid]} and {n})")
        seen[rid] = n
    jobs, errors, hashes = [], [], {}
    for n, row in enumerate(rows, 1):
        try:
            jobs.append(check_row(row, n, path.resolve().parent, defaults, seed, control_defaults, hashes))
        except ValueError as exc:
            errors.append({"id": str(row["id"]).strip(), "row": n, "error": str(exc)})
    return jobs, errors


# ---------------------------------------------------------------------- plan
@dataclass
class Batch:
    index: int
    items: list[Item]
    sampler: Sampler  # sizes resolved
    key: str = ""

    @property
    def controlled(self) -> bool:
        """Its images have control images (a batch's images all have, or none has)."""
        return self.items[0].job.control is not None


def plan(jobs: Iterable[Job], batch_size: int, native_size: int, model_key: str) -> list[Batch]:
    """The batches: images grouped by sampler (sizes resolved) and by whether they have a
    control image, in manifest order, cut into `batch_size` images. Depends only on the jobs
    and flags, not on what is done."""
    groups: dict[tuple[Sampler, bool], list[Item]] = {}
    for job in jobs:
        s = job.sampler
        resolved = Sampler(**{**asdict(s), "height": s.height or native_size, "width": s.width or native_size})
        key = (resolved, job.control is not None)
        groups.setdefault(key, []).extend(Item(job, k) for k in range(job.num_images))
    batches = []
    for (sampler, _), items in groups.items():
        for lo in range(0, len(items), batch_size):
            batch = Batch(len(batches), items[lo:lo + batch_size], sampler)
            batch.key = batch_key(batch, model_key)
            batches.append(batch)
    return batches


def batch_key(batch: Batch, model_key: str) -> str:
    """What makes a batch's images: every input of each image, the sampler, the model and
    backend. A journal entry with another key is stale."""
    items = [[i.job.id, i.k, i.seed, i.job.prompt, i.job.source_subject, i.job.target_subject,
              list(i.job.subject_images), i.job.embeddings] for i in batch.items]
    for item, inputs in zip(batch.items, items):  # (rows without control keep their keys of before)
        if item.job.control is not None:
            inputs.append(asdict(item.job.control))
    text = json.dumps([items, asdict(batch.sampler), model_key], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------- subjects
class Subjects:
    """Subject embeddings per (reference images, class) or embeddings file, computed once and
    kept in memory; errors too (a bad subject is reported for every row that uses it)."""

    def __init__(self, generator, max_image_pixels: int):
        self.generator, self.max_image_pixels = generator, max_image_pixels
        self.cache: dict[tuple, tuple[Any, str] | BlipDiffError] = {}

    def get(self, job: Job):
        """(embeddings (1, Q, D), source class) or raise BlipDiffError."""
        key = ("file", job.embeddings) if job.embeddings else ("images", job.subject_images, job.source_subject)
        if key not in self.cache:
            try:
                self.cache[key] = self._compute(job)
            except BlipDiffError as exc:
                self.cache[key] = exc
        value = self.cache[key]
        if isinstance(value, BlipDiffError):
            raise value
        embeds, source = value
        return embeds, job.source_subject or source

    def _compute(self, job: Job):
        from components.data.images import read_subject_images
        from components.model.embeddings import load_embeddings

        gen = self.generator
        if job.embeddings:
            embeds, meta = load_embeddings(Path(job.embeddings))
            expected = (1, gen.num_query, gen.hidden)
            if tuple(embeds.shape) != expected:
                raise BlipDiffError(f"{job.embeddings}: embeddings of shape {tuple(embeds.shape)} do not fit this "
                                    f"model (expects {expected})")
            source = job.source_subject or meta.get("source_subject", "")
            if not source:
                raise BlipDiffError(f"{job.embeddings}: no source_subject in the row or the file's metadata")
            return embeds.float(), source
        tokenizer = gen.model.qformer_tokenizer
        tokens = tokenizer.tokenize(job.source_subject)
        if not tokens or all(t == tokenizer.unk_token for t in tokens):
            raise BlipDiffError(f"unknown class {job.source_subject!r}: the Q-Former's tokenizer knows none of its words")
        refs = read_subject_images([Path(p) for p in job.subject_images], max_pixels=self.max_image_pixels)
        return gen.subject_embeddings(refs, job.source_subject), job.source_subject


# ---------------------------------------------------------------------- control images
class Controls:
    """Condition maps (HxWx3 uint8, as the ControlNet is given them before the resize) per
    control input; the last `keep` kept in memory, errors all (a bad control image is reported
    for every row that uses it)."""

    def __init__(self, max_image_pixels: int, keep: int = 32):
        from collections import OrderedDict

        self.max_image_pixels, self.keep = max_image_pixels, keep
        self.maps: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.errors: dict[tuple, BlipDiffError] = {}

    def get(self, control: ControlInput, short_side: int) -> np.ndarray:
        """The condition map of a row's control image; a canny map made at `short_side`
        (`controlnet.canny_side` of the output size)."""
        key = (control.image, control.sha256, control.type, control.canny_low, control.canny_high,
               short_side if control.type == "canny" else None)
        if key in self.errors:
            raise self.errors[key]
        if key in self.maps:
            self.maps.move_to_end(key)
            return self.maps[key]
        try:
            value = self._compute(control, short_side)
        except BlipDiffError as exc:
            self.errors[key] = exc
            raise
        self.maps[key] = value
        while len(self.maps) > self.keep:
            self.maps.popitem(last=False)
        return value

    def _compute(self, control: ControlInput, short_side: int) -> np.ndarray:
        from components.data.images import read_subject_images
        from components.model.controlnet import condition_map

        (image,) = read_subject_images([Path(control.image)], max_side=CONTROL_MAX_SIDE,
                                       max_pixels=self.max_image_pixels, what="control image")
        if file_sha256(control.image) != control.sha256:
            raise BlipDiffError(f"control image {control.image} changed after the manifest was read: run again")
        if control.type == "canny":
            return condition_map(image, "canny", control.canny_low, control.canny_high, short_side)
        return condition_map(image, control.type)


def no_controlnet_error(num_controlnets: int) -> str | None:
    """Why a row with a control image cannot run on networks with this many ControlNets."""
    if num_controlnets == 0:
        return ("the model has no ControlNet: give --model a checkpoint in the Salesforce/blipdiffusion-controlnet "
                "layout (a controlnet/ folder), or an export of one, or drop the row's control_image")
    if num_controlnets > 1:
        return (f"the model has {num_controlnets} ControlNets: blipdiff batch drives one (control_image); use a "
                "model with one")
    return None


# ---------------------------------------------------------------------- outputs
def _encode_png(image: np.ndarray) -> bytes:
    """An HxWx3 image in [0, 1] as the PNG bytes the batch writes."""
    from components.data.images import save_png

    buffer = io.BytesIO()
    save_png((image * 255).round().astype("uint8"), buffer)  # fixed settings: the same pixels give the same bytes
    return buffer.getvalue()


def _write_png(png: bytes, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)


def read_journal(out: Path) -> dict[str, dict]:
    """Finished batches by key (a line cut by a kill is ignored)."""
    entries = {}
    path = out / JOURNAL
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return entries


def _append_journal(out: Path, entry: dict) -> None:
    with open(out / JOURNAL, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _done(entry: dict | None, out: Path) -> bool:
    return entry is not None and all((out / r["image"]).is_file() for r in entry["records"])


def _write_records(records: list[dict], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(records)
    for column in ("canny_low", "canny_high"):  # integers, empty for rows without canny
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _write_errors(errors: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in errors))


# ---------------------------------------------------------------------- run
@dataclass
class Summary:
    images: int  # planned
    generated: int  # this run
    skipped: int  # already done (journal)
    failed_rows: int
    seconds: float


def run(manifest: Path, out: Path, load_generator: Callable[[], Any], defaults: Sampler, batch_size: int = 8,
        seed: int = 0, max_image_pixels: int | None = None, progress: bool = True,
        control_defaults: ControlDefaults | None = None, dask: DaskConfig | None = None,
        dask_setting: str = "--dask-address") -> Summary:
    """Generate every image of `manifest` into `out` (see the module doc). `load_generator` is
    called once the manifest has been checked. `dask`: make the batches on the scheduler at
    `dask.address` (`dask_setting` names where it came from in errors), or else on a local
    cluster of `dask.workers` processes; `load_generator` must then be a GeneratorSpec. None
    (or no address and 0 workers): in this process, without Dask."""
    from components.data.images import MAX_PIXELS

    if batch_size < 1:
        raise BlipDiffError(f"--batch-size must be >= 1, got {batch_size}")
    jobs, static_errors = read_manifest(manifest, defaults, seed, control_defaults)  # before loading a model
    log.info("%s: %d rows, %d images; %d bad rows", manifest, len(jobs) + len(static_errors),
             sum(j.num_images for j in jobs), len(static_errors))
    start = time.perf_counter()
    max_image_pixels = max_image_pixels or MAX_PIXELS
    with _makers(load_generator, max_image_pixels, dask, dask_setting) as makers:
        native_size, info = makers.describe()
        if not native_size and any(j.sampler.height is None or j.sampler.width is None for j in jobs):
            raise BlipDiffError("the model does not record its native size: give --height and --width")
        model_key = json.dumps({k: info[k] for k in ("backend", "provider", "model_hash")}, sort_keys=True)
        batches = plan(jobs, batch_size, native_size, model_key)
        out = Path(out)
        (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (out / IMAGES_DIR).glob(".*.tmp"):  # an image cut by a kill
            stale.unlink(missing_ok=True)
        journal = read_journal(out)
        todo = [b for b in batches if not _done(journal.get(b.key), out)]
        total = sum(len(b.items) for b in batches)
        todo_keys = {b.key for b in todo}
        skipped = sum(len(journal[b.key]["records"]) for b in batches if b.key not in todo_keys)
        if skipped:
            log.info("%s: %d of %d images already done (batches.jsonl): %d batches to run", out, skipped, total,
                     len(todo))
        log.info("%d batches to make %s", len(todo), makers.name)
        generated = _make(makers, todo, len(batches), info, out, journal, progress)

    records, errors = [], list(static_errors)
    reported = {(e["id"], e["error"]) for e in errors}
    for batch in batches:
        entry = journal[batch.key]
        records.extend(entry["records"])
        for e in entry["errors"]:
            if (e["id"], e["error"]) not in reported:
                reported.add((e["id"], e["error"]))
                errors.append(e)
    errors.sort(key=lambda e: e["row"])
    _write_records(records, out / RECORDS)
    _write_errors(errors, out / ERRORS)
    seconds = time.perf_counter() - start
    summary = Summary(total, generated, skipped, len({e["id"] for e in errors}), round(seconds, 3))
    log.info("%s: %d images (%d generated, %d already there), %d bad rows (%s), %.1f s", out, len(records),
             generated, skipped, summary.failed_rows, ERRORS, seconds)
    return summary


def _model_text(info: dict) -> str:
    return f"{info['model']} ({info['backend']}, {info['provider']}, model hash {info['model_hash']})"


def _make(makers: _InProcess | _OnDask, todo: list[Batch], planned: int, info: dict, out: Path, journal: dict,
          progress: bool) -> int:
    """Make the batches `todo` and write each, in plan order, journaling it once its images are
    there; the images made."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(b.items) for b in todo), unit="img", desc="batch", dynamic_ncols=True)
    generated = 0
    try:
        with closing(makers.make(todo)) as made:  # closed early (an error): pending batches are cancelled
            for batch, made_batch in zip(todo, made):
                if made_batch.info != info:
                    raise BlipDiffError(
                        f"batch {batch.index} was made with {_model_text(made_batch.info)}, the run was planned "
                        f"with {_model_text(info)}: every Dask worker needs the same model and device")
                journal[batch.key] = write_batch(made_batch, out)
                _append_journal(out, journal[batch.key])
                generated += len(journal[batch.key]["records"])
                if bar is not None:
                    bar.update(len(batch.items))
                    bar.set_postfix(batch=f"{batch.index + 1}/{planned}")
    finally:
        if bar is not None:
            bar.close()
    return generated


# ---------------------------------------------------------------------- one batch
@dataclass
class MadeBatch:
    """A batch made (compute_batch), not written yet: its journal entry and its images' bytes."""

    entry: dict  # key, batch, records, errors: its line in batches.jsonl
    images: list[tuple[str, bytes]]  # (path under the output folder, PNG bytes), one per record
    info: dict  # the generator's describe() where it was made


class Maker:
    """What makes batches in one process: the generator, and one run's subject embeddings and
    condition maps (computed once each, kept for the run's later batches)."""

    def __init__(self, generator, max_image_pixels: int):
        self.generator = generator
        self.info = generator.describe()
        self.subjects = Subjects(generator, max_image_pixels)
        self.controls = Controls(max_image_pixels)

    def describe(self) -> tuple[int, dict]:
        """(the model's native size, 0 if unknown; the generator's description) to plan with."""
        return self.generator.native_size, self.info


def compute_batch(batch: Batch, maker: Maker) -> MadeBatch:
    """Make one batch's images (less those of bad rows): their PNG bytes, records and the
    batch's error rows (a non-finite output: every row of the batch). Writes nothing."""
    import torch

    from components.model.controlnet import Control, canny_side, control_pixels

    gen, info, s = maker.generator, maker.info, batch.sampler
    items, embeds, sources, maps, errors = [], [], [], [], []

    def error(item: Item, message: str) -> None:  # one error row per manifest row
        if not any(e["id"] == item.job.id for e in errors):
            errors.append({"id": item.job.id, "row": item.job.row, "error": message})

    no_controlnet = no_controlnet_error(int(getattr(gen.networks, "num_controlnets", 0) or 0)) \
        if batch.controlled else None
    for item in batch.items:
        try:
            if no_controlnet:
                raise BlipDiffError(no_controlnet)
            e, source = maker.subjects.get(item.job)
            condition = maker.controls.get(item.job.control, canny_side(s.height, s.width)) \
                if item.job.control is not None else None
        except BlipDiffError as exc:
            error(item, str(exc))
            continue
        items.append(item)
        embeds.append(e)
        sources.append(source)
        maps.append(condition)
    records, pngs = [], []
    if items:
        targets = [i.job.target_subject or src for i, src in zip(items, sources)]
        control = None
        if batch.controlled:  # one ControlNet: a condition image and a scale per image
            control = Control([control_pixels(maps, s.height, s.width)], [[i.job.control.scale for i in items]])
        t = time.perf_counter()
        try:
            images = gen.generate(
                torch.cat(embeds), [i.job.prompt for i in items], targets, [i.seed for i in items],
                negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale, num_inference_steps=s.steps,
                height=s.height, width=s.width, scheduler=s.scheduler, prompt_strength=s.prompt_strength,
                prompt_reps=s.prompt_reps, control=control,
            )
        except NonFiniteError as exc:  # no image of this batch is written; each of its rows is an error
            log.error("batch %d: %s", batch.index, exc)
            for item in items:
                error(item, f"batch {batch.index}: {exc}")
            items = []
            images = []
        seconds = time.perf_counter() - t
        for item, source, target, image in zip(items, sources, targets, images):
            pngs.append((item.name, _encode_png(image)))
            job = item.job
            records.append({
                "id": job.id, "k": item.k, "image": item.name, "row": job.row, "seed": item.seed,
                "prompt": job.prompt,
                "built_prompt": BlipDiffusion.build_prompt(job.prompt, target, s.prompt_strength, s.prompt_reps),
                "source_subject": source, "target_subject": target, "subject_images": list(job.subject_images),
                "embeddings": job.embeddings, "num_images": job.num_images, **asdict(s),
                **(job.control.record() if job.control is not None else NO_CONTROL), **info,
                "batch": batch.index, "batch_key": batch.key, "batch_images": len(items),
                "seconds_batch": round(seconds, 4), "seconds_per_image": round(seconds / len(items), 4),
            })
    return MadeBatch({"key": batch.key, "batch": batch.index, "records": records, "errors": errors}, pngs, info)


def write_batch(made: MadeBatch, out: Path) -> dict:
    """Write a made batch's images into `out`, each atomically; its journal entry (to append
    once they are all there)."""
    for name, png in made.images:
        _write_png(png, out / name)
    return made.entry


# ---------------------------------------------------------------------- where batches are made
@dataclass(frozen=True)
class GeneratorSpec:
    """How to load the generator (`serving.generator.Generator.load`'s arguments); calling it
    loads one. Picklable and hashable: a Dask worker is sent it and keeps the generator it
    loads for every batch of that spec."""

    source: str  # a model or export folder, or a registered model models:/NAME@ALIAS
    backend: str = "torch"
    device: str = "auto"
    dtype: str = "auto"
    providers: tuple[str, ...] | None = None
    engine_dir: Path | None = None
    trt_profile: str | None = None
    build_engines: bool = False
    tracking_uri: str | None = None  # the MLflow store of a registered model (set in the loading process)

    @property
    def gpu(self) -> bool:
        """Whether it runs on a GPU where there is one (a local Dask cluster of one worker per GPU)."""
        if self.backend == "torch":
            return self.device != "cpu"
        if self.backend == "onnxruntime":  # default providers: CUDA first where there is a GPU
            return self.providers is None or any(p.startswith(("CUDA", "Tensorrt")) for p in self.providers)
        return True  # tensorrt

    def __call__(self):
        from serving.generator import Generator

        if self.tracking_uri is not None:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        gen = Generator.load(self.source, self.backend, device=self.device, dtype=self.dtype,
                             providers=list(self.providers) if self.providers is not None else None,
                             engine_dir=self.engine_dir, trt_profile=self.trt_profile,
                             build_engines=self.build_engines)
        log.info("model %s on %s (%s)", gen.source, gen.backend, gen.provider)
        return gen


class _InProcess:
    name = "in this process"

    def __init__(self, load_generator: Callable[[], Any], max_image_pixels: int):
        self.load_generator, self.max_image_pixels = load_generator, max_image_pixels
        self.maker: Maker | None = None

    def describe(self) -> tuple[int, dict]:
        self.maker = Maker(self.load_generator(), self.max_image_pixels)
        return self.maker.describe()

    def make(self, batches: list[Batch]) -> Iterator[MadeBatch]:
        for batch in batches:
            yield compute_batch(batch, self.maker)


@dataclass(frozen=True)
class WorkerJob:
    """What every batch of a run needs on a Dask worker; sent once to each."""

    generator: GeneratorSpec
    max_image_pixels: int
    token: str  # unique per run: a worker's subject embeddings and condition maps belong to one run


class _OnDask:
    def __init__(self, cluster, job: WorkerJob):
        self.cluster, self.job, self.name = cluster, job, cluster.name

    def describe(self) -> tuple[int, dict]:
        """From one worker, which loads the generator (and builds TensorRT engines when asked,
        before any other worker needs them)."""
        native_size, info = self.cluster.client.submit(_describe_on_worker, self.job, pure=False).result()
        log.info("model %s on %s (%s), on the workers", info["model"], info["backend"], info["provider"])
        return native_size, info

    def make(self, batches: list[Batch]) -> Iterator[MadeBatch]:
        return self.cluster.map(_batch_on_worker, self.job, batches)


@contextmanager
def _makers(load_generator: Callable[[], Any], max_image_pixels: int, dask: DaskConfig | None,
            dask_setting: str) -> Iterator[_InProcess | _OnDask]:
    if dask is None or (dask.address is None and dask.workers == 0):
        yield _InProcess(load_generator, max_image_pixels)
        return
    if not isinstance(load_generator, GeneratorSpec):
        raise TypeError(f"a Dask run loads its generator from a GeneratorSpec, got {type(load_generator).__name__}")
    from components.cluster import ADDRESS_ENV, open_cluster, torch_worker_env

    hint = (f"unset {ADDRESS_ENV} to run in this process" if dask_setting == ADDRESS_ENV
            else f"fix {dask_setting}, or leave it out to run in this process")
    with open_cluster(dask.address, dask.workers, dask.threads_per_worker, dask.connect_timeout_s,
                      setting=dask_setting, hint=hint, gpu=load_generator.gpu,
                      worker_env=torch_worker_env()) as cluster:
        yield _OnDask(cluster, WorkerJob(load_generator, max_image_pixels, uuid.uuid4().hex))


class _WorkerState:
    """A Dask worker process's maker: the generator of the last spec it was sent (loaded on its
    first batch, kept for later batches and runs), with fresh subject and control caches per
    run. One batch at a time: the worker's threads share one generator."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spec: GeneratorSpec | None = None
        self.generator = None
        self.token: str | None = None
        self.maker: Maker | None = None
        self.loads = 0  # generators this process loaded

    def get(self, job: WorkerJob) -> Maker:
        if self.spec != job.generator:
            self.spec = self.generator = self.maker = None  # the previous model's memory first
            self.generator = job.generator()
            self.spec = job.generator
            self.loads += 1
        if self.token != job.token or self.maker is None:
            self.maker = Maker(self.generator, job.max_image_pixels)
            self.token = job.token
        return self.maker


_WORKER = _WorkerState()


def _describe_on_worker(job: WorkerJob) -> tuple[int, dict]:
    with _WORKER.lock:
        return _WORKER.get(job).describe()


def _batch_on_worker(job: WorkerJob, batch: Batch) -> MadeBatch:
    with _WORKER.lock:
        return compute_batch(batch, _WORKER.get(job))

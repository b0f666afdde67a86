"""Stage `evaluate`: DreamBench with the DreamBooth protocol (DINO, CLIP-I, CLIP-T), as
BLIP-Diffusion reports it.

For each chosen subject, prompt and image index (`components.evaluation.protocol`) the
model generates one image, zero-shot (subject embeddings of the subject's real images) or
fine-tuned (`blipdiff finetune`'s training on those images first), or both. Every image is
scored against all real images of its subject, and against its prompt's text; the oracle
row scores the real images against each other. Writes `reports/dreambench/`: images/ (a
DVC output kept between runs: an image whose key (mode, subject, prompt, seed, model hash,
sampler) is already there is not generated again, so an interrupted run resumes),
per_image.parquet, metrics.json, per_subject.csv (the DVC plot) and report.html.

The benchmark is `evaluate.benchmark`: `dreambench` reads DreamBench from `ingest.dreambench`
(a local folder, or the verified download), whatever the training data was: the original
photos, as the papers score them. `heldout` (`auto` on the tiny preset) lays out the ingested
subjects' held-out views (`data/subjects.parquet`, split test) as a DreamBench folder in a
temporary directory (`components.evaluation.heldout_bench`) and runs the same protocol on it,
downloading nothing.

Where the images are made is `params.yaml` `dask:`, as for the context stage, and never
changes them: in this process (`workers: 0`, no address), or a subject per task on a local
Dask cluster of `workers` processes (their torch threads this process's: the same bytes) or
on the scheduler at `dask.address` / BLIPDIFF_DASK_ADDRESS (its workers need blipdiff, the
model and the benchmark's photos at the same paths; the held-out bench is a temporary folder
of this machine, so a remote cluster suits `benchmark: dreambench`). Each worker loads the
model once per run; this process alone writes the images, in the subjects' order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.core import tracking
from components.core.config import DaskConfig, EvaluateConfig, Params
from components.core.errors import BlipDiffError
from components.core.io import atomic_path, round_floats, write_json
from components.core.paths import EVAL_DIR, REGISTRY_PREFIX, SUBJECTS_MANIFEST
from components.data import dreambench
from components.data.images import read_subject_images, save_png
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
from components.evaluation import heldout_bench, protocol, report, scoring
from components.evaluation.evaluators import Evaluators
from components.model import sources
from components.model.device import placement

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SECTIONS = ("preset", "ingest", "evaluate")
IMAGES_DIR = EVAL_DIR / "images"
PER_IMAGE = EVAL_DIR / "per_image.parquet"
DETAIL = EVAL_DIR / "metrics.json"
REPORT = EVAL_DIR / "report.html"
PER_SUBJECT = EVAL_DIR / "per_subject.csv"
OUTPUTS = (IMAGES_DIR, PER_IMAGE, DETAIL, REPORT)
DATASETS = ((PER_IMAGE, "evaluation"),)  # MLflow dataset inputs: the scored images
PLOTS = (PER_SUBJECT,)
MODES = {"zero_shot": ["zero_shot"], "finetuned": ["finetuned"], "both": ["zero_shot", "finetuned"]}
BENCH_NAMES = {"dreambench": "DreamBench", "heldout": "held-out bench"}


def sampler(cfg: EvaluateConfig) -> dict:
    """Everything besides the model and the seed that decides a generated image."""
    return {"scheduler": cfg.scheduler, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
            "negative_prompt": cfg.negative_prompt, "prompt_strength": cfg.prompt_strength,
            "prompt_reps": cfg.prompt_reps, "resolution": cfg.resolution}


def image_key(mode: str, item: protocol.Item, model_hash: str, cfg: EvaluateConfig,
              references: str | None = None) -> str:
    """`references`: a digest of the subject's real images, where they can change under the same
    subject name (the held-out bench follows the ingested data); DreamBench's photos are fixed."""
    how = {"reference": cfg.reference} if mode == "zero_shot" else {"finetune": cfg.finetune.model_dump()}
    spec = {"mode": mode, "subject": item.subject, "class": item.class_phrase, "context": item.context,
            "seed": item.seed, "model": model_hash, **sampler(cfg), **how}
    if references is not None:
        spec["references"] = references
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def image_path(mode: str, item: protocol.Item, key: str) -> Path:
    return IMAGES_DIR / mode / item.subject / f"p{item.prompt_index:02d}_i{item.image_index}_{key}.png"


def _readable(path: Path) -> bool:
    try:
        scoring.read_image(path)
        return True
    except OSError:
        return False


class Generation:
    """Makes the images a plan asks for, skipping those already written under the same key."""

    def __init__(self, cfg: EvaluateConfig, bench: protocol.Benchmark, source: str, root: Path):
        self.cfg, self.bench, self.source, self.root = cfg, bench, source, root
        self.device, self.dtype = placement(cfg.device, "auto")
        self._base = None

    def model(self, fresh: bool = False):
        from components.model import layout

        if fresh or self._base is None:
            model = layout.load(self.source).to(self.device, self.dtype)
            if fresh:
                return model
            self._base = model
        return self._base

    def references(self, subject: str) -> list[np.ndarray]:
        paths = self.bench.real[subject]
        if self.cfg.reference != "average":
            if self.cfg.reference >= len(paths):
                raise BlipDiffError(f"evaluate.reference={self.cfg.reference}: subject {subject} has "
                                    f"only {len(paths)} images")
            paths = [paths[self.cfg.reference]]
        return read_subject_images(paths)

    def embeddings(self, mode: str, subject: str, class_name: str):
        """(model, subject embeddings) for one subject in one mode."""
        if mode == "zero_shot":
            model = self.model()
            return model, model.subject_embeddings(self.references(subject), class_name)
        from components.training.finetune import FinetuneConfig, finetune

        model = self.model(fresh=True)  # fine-tuning changes the UNet: a copy per subject
        ft = self.cfg.finetune
        result = finetune(model, read_subject_images(self.bench.real[subject]), class_name,
                          FinetuneConfig(steps=ft.steps, batch_size=ft.batch_size,
                                         learning_rate=ft.learning_rate, lora_rank=ft.lora_rank,
                                         seed=self.cfg.seed))
        return model, result.subject_embeds.detach()

    def subject_images(self, job: SubjectJob) -> Iterator[tuple[int, np.ndarray]]:
        """One subject's missing images of one mode: (index in `job.pending`, uint8 image), a
        UNet batch at a time (nothing written here)."""
        cfg, mode, pending = self.cfg, job.mode, job.pending
        start = time.perf_counter()
        model, embeds = self.embeddings(mode, job.subject, pending[0][0].class_name)
        size = cfg.resolution or model.native_size
        groups: dict[str, list[int]] = {}
        for i, (item, _) in enumerate(pending):
            groups.setdefault(item.class_phrase, []).append(i)
        for phrase, group in groups.items():
            for lo in range(0, len(group), cfg.batch_size):
                batch = group[lo:lo + cfg.batch_size]
                made = model.generate(
                    embeds, [pending[i][0].context for i in batch], phrase, [pending[i][0].seed for i in batch],
                    negative_prompt=cfg.negative_prompt, guidance_scale=cfg.guidance_scale,
                    num_inference_steps=cfg.steps, height=size, width=size, scheduler=cfg.scheduler,
                    prompt_strength=cfg.prompt_strength, prompt_reps=cfg.prompt_reps)
                for i, image in zip(batch, made):
                    yield i, (image * 255).round().astype("uint8")
        log.info("%s %s: %d images in %.1f s", mode, job.subject, len(pending), time.perf_counter() - start)

    def run(self, mode: str, todo: list[tuple[protocol.Item, Path]], cluster=None) -> int:
        """Generate the missing images of one mode, subject by subject, here or on `cluster`'s
        workers (a subject per task; this process alone writes, in the subjects' order; here each
        UNet batch is written as it is made, so a killed run keeps it); how many."""
        by_subject: dict[str, list] = {}
        for item, path in todo:
            by_subject.setdefault(item.subject, []).append((item, path))
        jobs = [SubjectJob(mode, subject, pending) for subject, pending in by_subject.items()]
        made = 0
        results = map(self.subject_images, jobs) if cluster is None else \
            cluster.map(_subject_on_worker, WorkerGeneration(self.cfg, self.bench, self.source, self.root), jobs)
        for job, images in zip(jobs, results):
            for i, image in images:
                final = self.root / job.pending[i][1]
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f".{final.name}.tmp")
                save_png(image, tmp)
                os.replace(tmp, final)  # a killed run leaves whole images only
                made += 1
        return made


@dataclass(frozen=True)
class SubjectJob:
    mode: str
    subject: str
    pending: list  # (protocol.Item, path under the repository) of the images to make


@dataclass(frozen=True)
class WorkerGeneration:
    """What a Dask worker needs to make a run's images: the settings, the benchmark (its
    photos at the same paths: a shared filesystem), the model. Sent once per worker."""

    cfg: EvaluateConfig
    bench: protocol.Benchmark
    source: str
    root: Path

    @property
    def key(self) -> str:
        return json.dumps([self.cfg.model_dump(mode="json"), self.source, str(self.root)], sort_keys=True)


_WORKER_GENERATION: dict[str, Generation] = {}  # in a worker: the last run's, its model loaded once


def _subject_on_worker(spec: WorkerGeneration, job: SubjectJob) -> list[tuple[int, np.ndarray]]:
    gen = _WORKER_GENERATION.get(spec.key)
    if gen is None:
        _WORKER_GENERATION.clear()
        gen = _WORKER_GENERATION[spec.key] = Generation(spec.cfg, spec.bench, spec.source, spec.root)
    gen.bench = spec.bench  # this run's (a held-out bench is a new folder per run; the model stays)
    return list(gen.subject_images(job))


@contextlib.contextmanager
def generation_cluster(dask: DaskConfig, device: torch.device) -> Iterator[object | None]:
    """Where evaluate makes its images (`params.yaml` `dask:`, as the context stage): None (in
    this process) without an address and with 0 workers, else a Dask cluster, its local
    workers with this process's torch threads (the same bytes as in-process)."""
    from components.cluster import address_setting, open_cluster, scheduler_address, torch_worker_env

    address = scheduler_address(dask)
    if address is None and dask.workers == 0:
        yield None
        return
    with open_cluster(address, dask.workers, dask.threads_per_worker, dask.connect_timeout_s,
                      setting=address_setting(), gpu=device.type == "cuda", worker_env=torch_worker_env()) as cluster:
        log.info("generating %s", cluster.name)
        yield cluster


def prune(root: Path, keep: set[Path]) -> int:
    """Remove images of earlier plans (other subsets, models or samplers) and temp files."""
    removed = 0
    folder = root / IMAGES_DIR
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_file() and path.relative_to(root) not in keep:
            path.unlink()
            removed += 1
    for path in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def evaluator_ids(cfg: EvaluateConfig, preset: str) -> tuple[str, str, bool]:
    """(DINO source, CLIP source, tiny): `auto` is the preset's: tiny builds small random ones."""
    from components.evaluation.evaluators import CLIP_HUB, DINO_HUB

    dino = cfg.dino_model if cfg.dino_model != "auto" else ("tiny" if preset == "tiny" else DINO_HUB)
    clip = cfg.clip_model if cfg.clip_model != "auto" else ("tiny" if preset == "tiny" else CLIP_HUB)
    if (dino == "tiny") != (clip == "tiny"):
        raise BlipDiffError("evaluate.dino_model and clip_model: both tiny or neither (got "
                            f"{dino!r} and {clip!r})")
    return dino, clip, dino == "tiny"


def generate_images(gen: Generation, items: list[protocol.Item], model_hash: str, root: Path,
                    references: dict[str, str] | None = None, cluster=None):
    """Every planned image of every mode, reusing those already written under the same key;
    the images of other keys are removed. (rows, made, reused, stale, seconds).
    `references`: subject -> digest of its real images, part of the key (the held-out bench).
    `cluster`: a Dask cluster (`generation_cluster`) to make them on."""
    cfg = gen.cfg
    rows, keep, made, reused = [], set(), 0, 0
    start = time.perf_counter()
    for mode in MODES[cfg.mode]:
        todo = []
        for item in items:
            refs = references[item.subject] if references is not None else None
            path = image_path(mode, item, image_key(mode, item, model_hash, cfg, refs))
            keep.add(path)
            rows.append({"mode": mode, "subject": item.subject, "category": item.category,
                         "prompt": item.clip_text, "seed": item.seed,
                         "image": path.relative_to(EVAL_DIR).as_posix(), "prompt_index": item.prompt_index,
                         "image_index": item.image_index, "class_phrase": item.class_phrase,
                         "context": item.context})
            if (root / path).is_file() and _readable(root / path):
                reused += 1
            else:
                todo.append((item, path))
        made += gen.run(mode, todo, cluster)
    gen_seconds = time.perf_counter() - start
    stale = prune(root, keep)
    log.info("generated %d images in %.1f s, reused %d, removed %d stale", made, gen_seconds, reused, stale)
    return rows, made, reused, stale, gen_seconds


@contextlib.contextmanager
def benchmark_folder(params: Params, root: Path, kind: str) -> Iterator[Path]:
    """The benchmark's folder in DreamBench's layout, for the length of the run."""
    if kind == "dreambench":
        # DreamBench's own photos, whatever the training data; a fresh clone without the local copy downloads it
        yield dreambench.local_or_download(params.ingest.dreambench, root, fallback=True)
        return
    manifest = root / SUBJECTS_MANIFEST
    if not manifest.is_file():
        raise BlipDiffError(f"evaluate.benchmark=heldout: {SUBJECTS_MANIFEST} not found; run `dvc repro ingest` "
                            "first, or set evaluate.benchmark=dreambench")
    subjects = read_manifest(manifest, SUBJECTS_SCHEMA)
    with tempfile.TemporaryDirectory(prefix="blipdiff-heldout-") as tmp:
        yield heldout_bench.write(subjects, root, Path(tmp))


def reference_digests(bench: protocol.Benchmark) -> dict[str, str]:
    """subject -> sha256 of its real images' names and bytes (12 hex digits)."""
    out = {}
    for subject, paths in sorted(bench.real.items()):
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        out[subject] = digest.hexdigest()[:12]
    return out


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    kind = params.evaluate.benchmark_for(params.preset)
    with benchmark_folder(params, root, kind) as folder:
        bench = protocol.load(folder, BENCH_NAMES[kind])
        log.info("benchmark: %s (%s), %d subjects", kind, folder if kind == "dreambench" else SUBJECTS_MANIFEST,
                 len(bench.real))
        return run_on(params, root, kind, bench)


def run_on(params: Params, root: Path, kind: str, bench: protocol.Benchmark) -> tuple[dict, dict[str, np.ndarray]]:
    """The protocol on one benchmark (`kind`: dreambench | heldout), loaded from its folder."""
    cfg = params.evaluate
    # The held-out views follow the ingested data: their digests go into the image keys and the settings.
    references = reference_digests(bench) if kind != "dreambench" else None
    subjects = protocol.choose_subjects(bench, cfg.subjects)
    items = protocol.plan(bench, subjects, cfg.prompts_per_subject, cfg.images_per_prompt, cfg.seed)
    dino_id, clip_id, tiny = evaluator_ids(cfg, params.preset)  # bad ids fail before generation
    with sources.resolve(cfg.model, root, "evaluate.model", kinds=("model", "registry", "hub"),
                         hint="run `dvc repro train_subject`, or name a model folder, a registered model "
                              "models:/NAME@ALIAS or a hub id") as source:
        log.info("evaluating %s (%s): %d subjects, %d images per mode, modes %s", source.describe(), source.hash,
                 len(subjects), len(items), MODES[cfg.mode])
        gen = Generation(cfg, bench, source.load_from, root)
        with generation_cluster(params.dask, gen.device) as cluster:
            rows, made, reused, stale, gen_seconds = generate_images(gen, items, source.hash, root, references,
                                                                     cluster)
    model_hash = source.hash

    ev = Evaluators.build(None if tiny else dino_id, None if tiny else clip_id, tiny=tiny,
                          seed=cfg.seed, device=str(gen.device), batch_size=cfg.evaluator_batch_size)
    real = {s: bench.real[s] for s in subjects}
    per_image, oracle_row, stats = scoring.score(pd.DataFrame(rows), real, ev, root / EVAL_DIR,
                                                 cfg.evaluator_batch_size)
    if stats["images_skipped"]:
        raise BlipDiffError(f"evaluate: {stats['images_skipped']} generated images could not be read back")
    detail = round_floats(scoring.summary(per_image, oracle_row, ev.describe()))
    detail["settings"] = {**benchmark_settings(kind, bench, references),
                          **settings(cfg, cfg.model, model_hash, ev, len(subjects), len(items))}
    write_outputs(root, per_image, detail, real)

    metrics = scoring.flat_metrics(detail)
    metrics.update({"subjects": len(subjects), "run_images_generated": made, "run_images_reused": reused,
                    "run_images_stale_removed": stale, "seconds_generation": round(gen_seconds, 3),
                    "seconds_per_image_generated": round(gen_seconds / made, 4) if made else 0.0,
                    "seconds_scoring": round(stats["seconds_scoring"], 3),
                    "samples_per_s_scoring": round(stats["scored_images_per_s"], 2)})
    tracking.set_tags({"model_hash": model_hash, "evaluated_model": source.load_from, "dino_model": dino_id,
                       "clip_model": clip_id, "benchmark": kind})
    return metrics, grids(root, per_image)


def benchmark_settings(kind: str, bench: protocol.Benchmark, references: dict[str, str] | None) -> dict:
    """What the scores were measured on: `benchmark` (dreambench | heldout); for the held-out
    bench also its size and a digest of its images (another ingest is another benchmark)."""
    if kind == "dreambench":
        return {"benchmark": kind}
    views = sum(len(v) for v in bench.real.values())
    digest = hashlib.sha256(json.dumps(references, sort_keys=True).encode()).hexdigest()[:12]
    return {"benchmark": kind,
            "benchmark_data": f"held-out views (split test) of {SUBJECTS_MANIFEST.as_posix()}: "
                              f"{len(bench.real)} subjects, {views} views",
            "benchmark_digest": digest}


def settings(cfg: EvaluateConfig, source: str, model_hash: str, ev, subjects: int, images: int) -> dict:
    return {"model": source, "model_hash": model_hash, "modes": ", ".join(MODES[cfg.mode]),
            "subjects": subjects, "images_per_mode": images, "prompts_per_subject": cfg.prompts_per_subject,
            "images_per_prompt": cfg.images_per_prompt,
            "reference": "all reference images, embeddings averaged" if cfg.reference == "average"
            else f"reference image #{cfg.reference}",
            "seed_rule": f"sha256(subject|prompt index|image index) + {cfg.seed}",
            **sampler(cfg),
            **({f"finetune_{k}": v for k, v in cfg.finetune.model_dump().items()} if cfg.mode != "zero_shot" else {}),
            **ev.describe()}


def protocol_hash(settings: dict) -> str:
    """What makes two evaluations comparable: every setting but the model evaluated. (The
    benchmark counts; `benchmark: dreambench` is left out so that DreamBench's hash is the one
    from before the setting existed, and champions scored then stay comparable.)"""
    return tracking.params_hash({k: v for k, v in settings.items() if k not in ("model", "model_hash")
                                 and not (k == "benchmark" and v == "dreambench")})


def write_outputs(root: Path, per_image: pd.DataFrame, detail: dict, real: dict[str, list[Path]]) -> None:
    out = root / EVAL_DIR
    with atomic_path(root / PER_IMAGE) as tmp:
        per_image.to_parquet(tmp, index=False)
    write_json(detail, root / DETAIL)
    heldout = detail["settings"].get("benchmark") == "heldout"
    bars = [{"mode": mode, "subject": subject, **{k: round(v[k], 4) for k in ("dino", "clip_i", "clip_t")}}
            for mode, summ in detail["modes"].items() for subject, v in summ["per_subject"].items()]
    with atomic_path(root / PER_SUBJECT) as tmp:
        pd.DataFrame(bars).to_csv(tmp, index=False)
    report.write_report(root / REPORT, per_image, detail, real,
                        title="Held-out views evaluation (DreamBench protocol)" if heldout else "DreamBench evaluation",
                        settings=detail["settings"], papers=not heldout)
    log.info("wrote %s (%d images scored)", out, len(per_image))


def grids(root: Path, per_image: pd.DataFrame, limit: int = 8) -> dict[str, np.ndarray]:
    """One image grid per mode and subject (rows: prompts), for the MLflow run (first `limit`)."""
    from components.evaluation.scoring import read_image

    out = {}
    for (mode, subject), frame in list(per_image.groupby(["mode", "subject"], sort=True))[:limit]:
        rows = [[np.asarray(read_image(root / EVAL_DIR / p)) for p in g["image"]]
                for _, g in frame.groupby("prompt_index", sort=True)]
        width = max(len(r) for r in rows)
        h, w = rows[0][0].shape[:2]
        canvas = np.full((h * len(rows), w * width, 3), 255, np.uint8)
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image[:h, :w]
        out[f"grid_{mode}_{subject}"] = canvas
    return out


def after_run(params: Params, root: Path) -> None:
    """Inside the stage's MLflow run: the report as artifacts, and the link to the model's run
    (the train_subject run tagged with the same model hash) and its registered version, whose
    scores decide whether it becomes the registry's champion."""
    import tempfile

    import mlflow

    from components.model import registry

    with tempfile.TemporaryDirectory() as tmp:
        for path in (REPORT, DETAIL, PER_IMAGE, PER_SUBJECT):
            (Path(tmp) / path.name).write_bytes((root / path).read_bytes())
        tracking.log_artifacts(Path(tmp), "dreambench")
    run_id = tracking.current_run_id()
    detail = json.loads((root / DETAIL).read_text())
    model_hash = detail["settings"]["model_hash"]
    client = mlflow.MlflowClient()
    if params.evaluate.model.startswith(REGISTRY_PREFIX):  # a registered version, e.g. the champion
        versions = [registry.resolve_version(params.evaluate.model)]
        model_run = versions[0].run_id
    else:
        found = client.search_runs([tracking.experiment_id(root)],
                                   f"tags.model_hash = '{model_hash}' and tags.dvc_stage = 'train_subject'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            log.info("no train_subject run is tagged with model hash %s: the evaluation is not linked", model_hash)
            return
        model_run = found[0].info.run_id
        versions = client.search_model_versions(f"run_id = '{model_run}'")
    tags = {"evaluated_run_id": model_run}
    flat = scoring.flat_metrics(detail)
    prefix = detail["settings"].get("benchmark", "dreambench")  # dreambench.* or heldout.* scores
    mode = MODES[params.evaluate.mode][0]  # the mode promotion compares (zero-shot when both ran)
    for version in versions:
        tags["evaluated_model_version"] = f"{version.name}/{version.version}"
        for key, value in flat.items():
            client.set_model_version_tag(version.name, version.version, f"{prefix}.{key}", str(value))
        client.set_model_version_tag(version.name, version.version, f"{prefix}.run_id", str(run_id))
        decision = registry.promote_if_better(
            version.name, version.version, {"dino": flat[f"{mode}_dino"], "clip_t": flat[f"{mode}_clip_t"]},
            protocol_hash(detail["settings"]), run_id)
        tags["promotion_decision"] = decision["promotion.decision"]
        tags["promotion_reason"] = decision["promotion.reason"]
    tracking.set_tags(tags)
    log.info("evaluation linked to model run %s %s", model_run, tags.get("evaluated_model_version", ""))

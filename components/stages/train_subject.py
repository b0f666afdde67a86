"""Stage `train_subject`: subject representation learning (BLIP-Diffusion stage 2, paper Sec. 4.2).

The objective (`components/training/subject_objective.py`): the composite of each
training pair gives subject embeddings through the frozen image encoder and the Q-Former;
the original image's VAE latent is the denoising target, the UNet conditioned as `blipdiff
generate` conditions it. Trainable: Q-Former + projection, text encoder, UNet (each
switchable); frozen: image encoder, VAE. The prompt comes from the model's own builder,
"a [class] [caption]" (prompt_text caption) or "a [class]" (neutral).

Samples stream from disk through a DataLoader (`num_workers` workers), batch by batch;
with `cache: true` the VAE latent moments and the image encoder's features of every file
are kept on disk (`cache_dir`), keyed by content and weights hashes
(`components/training/data.py`, `PairDataset`).

Runs under accelerate: `accelerate launch --multi_gpu --num_processes N -m components.cli
train_subject` starts N processes (on a machine without GPUs they train on the CPU, gloo).
Every step draws its batch, noise, timesteps and latent sample from a generator seeded by
(seed, step, micro-batch, process), so a run resumed from a checkpoint ends with the same
weights as an uninterrupted one. Learning checks: the loss on a fixed batch, subject
identification by denoising error on the held-out views, and subject recognition in images
generated from them (a fixed colour-and-shape classifier names the subject drawn). The grid
`reports/samples/grid.png` (a DVC image plot, and an MLflow artifact) shows each subject's
reference view, the base model's prior from its caption and zero-shot drawings in three
contexts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.core import tracking
from components.core.config import Params, TrainSubjectConfig
from components.core.errors import BlipDiffError
from components.core.io import atomic_path, folder_hash
from components.core.paths import (BLIP_DIFFUSION_DIR, PAIRS_MANIFEST, SAMPLES_GRID, checkpoint_dir, checkpoint_root,
                                   curve_file, local_path)
from components.data.backgrounds import BACKGROUND_PHRASES, scene
from components.data.images import save_png
from components.data.manifests import PAIRS_SCHEMA, read_manifest
from components.evaluation.grid import grid_tile, image_grid
from components.evaluation.subject_classifier import SubjectClassifier, subject_classes, subject_rows
from components.model import layout
from components.model.presets import start_model
from components.training import data as streaming
from components.training import loop as training
from components.training.data import PairDataset
from components.training.subject_objective import (Stage2, draw, draw_batched, fixed_batch_loss, generation_accuracy,
                                                    identification_accuracy, latent_shape)

log = logging.getLogger(__name__)

SECTIONS = ("preset", "train_subject")  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (BLIP_DIFFUSION_DIR,)
DATASETS = ((PAIRS_MANIFEST, "training"),)  # MLflow dataset inputs of the run
PLOTS = (curve_file("train_subject"), SAMPLES_GRID)  # the curve; the samples grid (an image plot)
GRID_CONTEXTS = ("stripes", "checker", "rings")  # the grid's zero-shot contexts: "a [class] on a striped background"
PRIOR_CONTEXT = "gradient"  # the base model's prior in the grid: "<subject caption> on a gradient background"
GRID_COLUMNS = ("reference", "prior (base)", *(BACKGROUND_PHRASES[kind] for kind in GRID_CONTEXTS))
CHECKPOINT_DIR = checkpoint_dir("train_subject")


@training.explain_out_of_memory(
    "train_subject", "lower train_subject.batch_size or resolution (gradient_accumulation_steps keeps the "
    "effective batch), or set gradient_checkpointing: true")
def run(params: Params, root: Path, resume: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = params.train_subject
    train_frame, held_frame = read_splits(root)
    ckpt_root = checkpoint_root(root, "train_subject")
    accelerator = training.make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision, "train_subject",
                                            ckpt_root)
    model, train, held_out = build_data(params, root, accelerator, train_frame, held_frame)
    stage2, optimizer, lr_schedule, trainable, ema, noise_scheduler = build_model(model, cfg, accelerator)

    files = sorted(set(train_frame["input_path"]) | set(train_frame["target_path"]))
    fingerprint = training.fingerprint(params, "train_subject", root / PAIRS_MANIFEST, [root / f for f in files],
                                       "context")
    start, curve = training.begin(accelerator, ckpt_root, resume, fingerprint, "train_subject", ema)
    plain = accelerator.unwrap_model(stage2)
    fixed_start = fixed_batch_loss(plain, train, cfg, noise_scheduler)

    losses, seconds = fit(cfg, accelerator, stage2, optimizer, lr_schedule, trainable, ema, noise_scheduler,
                          model, train, start, fingerprint, curve)
    stage2 = None  # the DDP wrapper goes before the process group (training.finish)
    plain.eval()
    if ema is not None:
        ema.copy_to(trainable)

    metrics: dict = {}
    samples: dict[str, np.ndarray] = {}
    if accelerator.is_main_process:
        layout.save(model, root / BLIP_DIFFUSION_DIR)
        training.write_curve(curve, root / curve_file("train_subject"))
        metrics = measure(plain, model, cfg, accelerator, train, held_out, noise_scheduler, fixed_start, losses,
                          seconds, cfg.steps - start, root)
        grid = sample_grid(model, root, train, held_out, captions_of(train_frame), cfg)
        with atomic_path(root / SAMPLES_GRID) as tmp:
            save_png(grid, tmp)
        samples = {"grid": grid}
        log.info("wrote %s and %s; %s", BLIP_DIFFUSION_DIR, SAMPLES_GRID,
                 {k: metrics[k] for k in metrics if k.startswith(("id_", "gen_", "loss"))})
    training.finish(accelerator)
    return metrics, samples


def read_splits(root: Path):
    """The pairs manifest's train rows, and its held-out views of the subjects trained on."""
    frame = read_manifest(root / PAIRS_MANIFEST, PAIRS_SCHEMA)
    if frame.empty:
        raise BlipDiffError(f"{PAIRS_MANIFEST}: no training pairs (run `dvc repro context`)")
    train_frame = frame[frame["split"] == "train"]
    held_frame = frame[frame["split"] == "test"].drop_duplicates("target_path")
    held_frame = held_frame[held_frame["subject_id"].isin(set(train_frame["subject_id"]))]
    if train_frame.empty:
        raise BlipDiffError(f"{PAIRS_MANIFEST}: no pairs in the train split")
    return train_frame, held_frame


def build_data(params: Params, root: Path, accelerator, train_frame, held_frame):
    """The preset's model (seeded; the Q-Former from stage 1 where `qformer` names one) on
    the accelerator's device, and the training and held-out pairs (cached where asked)."""
    cfg = params.train_subject
    torch.manual_seed(cfg.seed)
    model = start_model(params.preset, cfg.base, root, seed=cfg.seed)
    if cfg.qformer:
        model.qformer, model.qformer_tokenizer = layout.load_pretrained_qformer(root / cfg.qformer, model.qformer)
        log.info("subject encoder starts from the pre-trained Q-Former in %s", cfg.qformer)
    model.to(accelerator.device)
    train = PairDataset(model, train_frame, root, cfg.resolution, cfg.prompt_text)
    held_out = PairDataset(model, held_frame, root, cfg.resolution, cfg.prompt_text) if len(held_frame) else None
    if cfg.cache:
        cache_dir = Path(cfg.cache_dir).expanduser()
        cache_dir = cache_dir if cache_dir.is_absolute() else root / cache_dir
        for data in (train, held_out):
            if data is not None:
                data.use_cache(model, cache_dir, cfg.num_workers, accelerator.is_main_process)
                accelerator.wait_for_everyone()
    log.info("%d training pairs of %d subjects, %d held-out views; %d process(es) on %s; %d loader worker(s)%s",
             len(train), len(train.subjects), len(held_frame), accelerator.num_processes, accelerator.device,
             cfg.num_workers, ", cached features" if cfg.cache else "")
    return model, train, held_out


def build_model(model, cfg: TrainSubjectConfig, accelerator):
    """The trained parts as one module, what trains of them, the optimizer and schedule
    (prepared by accelerate), the EMA where asked and the DDPM noise schedule."""
    from diffusers import DDPMScheduler

    model.vae.requires_grad_(False)
    model.qformer.visual_encoder.requires_grad_(False)
    for flag, module in ((cfg.train_qformer, model.qformer), (cfg.train_text_encoder, model.text_encoder),
                         (cfg.train_unet, model.unet)):
        if not flag:
            module.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.text_encoder.gradient_checkpointing_enable()
    stage2 = Stage2(model)
    stage2.train()
    trainable = [p for p in stage2.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_schedule = training.make_schedule("constant", optimizer, accelerator, cfg.warmup_steps, cfg.steps)
    stage2, optimizer, lr_schedule = accelerator.prepare(stage2, optimizer, lr_schedule)
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=cfg.ema_decay)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    return stage2, optimizer, lr_schedule, trainable, ema, noise_scheduler


def fit(cfg: TrainSubjectConfig, accelerator, stage2, optimizer, lr_schedule, trainable: list, ema, noise_scheduler,
        model, train: PairDataset, start: int, fingerprint: dict, curve: list[dict]) -> tuple[list[float], float]:
    """Steps `start`..`cfg.steps`, the pairs streamed from disk; samples to MLflow every
    `sample_every` steps. Returns each step's loss and the seconds spent."""
    shape = latent_shape(model, cfg.resolution)
    sampler = streaming.StepBatchSampler(len(train), cfg.batch_size, cfg.seed, accelerator.process_index, start,
                                         cfg.steps, cfg.gradient_accumulation_steps)
    batches = iter(streaming.make_loader(train, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         seed=cfg.seed + accelerator.process_index))

    def loss_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        rows, drop, noise, t, eps = draw(cfg, step, micro, accelerator.process_index, len(train), shape,
                                         noise_scheduler.config.num_train_timesteps)
        batch = next(batches)
        if not torch.equal(batch["index"], rows):
            raise BlipDiffError(f"train_subject: loader out of step at step {step}.{micro}")
        return {"loss": stage2(batch, drop, noise, t, eps, noise_scheduler)}

    def sample(done: int) -> None:
        if cfg.sample_every and done % cfg.sample_every == 0 and accelerator.is_main_process:
            tracking.log_images(_samples(model, train), folder=f"samples/step-{done:06d}")

    history, seconds = training.train_loop(
        accelerator, stage2, optimizer, lr_schedule, trainable, cfg, stage="train_subject", start=start,
        fingerprint=fingerprint, loss_fn=loss_fn, ema=ema, after_step=sample, curve=curve)
    return [h["loss"] for h in history], seconds


def measure(plain: Stage2, model, cfg: TrainSubjectConfig, accelerator, train: PairDataset,
            held_out: PairDataset | None, noise_scheduler, fixed_start: float, losses: list[float],
            seconds: float, steps_run: int, root: Path) -> dict:
    """The learning checks (fixed-batch loss, held-out identification and generation), time
    and memory."""
    fixed_end = fixed_batch_loss(plain, train, cfg, noise_scheduler)
    metrics = {
        "fixed_batch_loss_start": fixed_start,
        "fixed_batch_loss_end": fixed_end,
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last_mean": float(np.mean(losses[-cfg.log_every:])) if losses else float("nan"),
        **training.throughput_metrics(seconds, steps_run, cfg, accelerator.num_processes),
        "processes": accelerator.num_processes,
        "train_pairs": len(train),
    }
    if held_out is not None:
        metrics.update(identification_accuracy(model, train, held_out, cfg))
        if cfg.gen_images_per_view:
            metrics.update(generation_check(model, root, held_out, cfg))
    return metrics


def generation_check(model, root: Path, held_out: PairDataset, cfg: TrainSubjectConfig) -> dict:
    """`generation_accuracy` with the fixed subject classifier fitted on the ingested
    subjects' training views (`components/evaluation/subject_classifier.py`), at the training
    resolution (on the default profile the tiny base model's native size, 32 px); and the
    classifier's own accuracy on the real held-out views (`gen_classifier_real_accuracy`), the
    sanity number that says its verdicts mean something."""
    start = time.perf_counter()
    size = cfg.resolution
    train_views, real_views = subject_rows(root, "train"), subject_rows(root, "test")
    classifier = SubjectClassifier.fit(train_views, root, size)
    real = classifier.accuracy(real_views, root)
    metrics = generation_accuracy(model, held_out, classifier.predict, subject_classes(train_views), cfg, size)
    metrics["gen_classifier_real_accuracy"] = real
    metrics["seconds_generation_check"] = time.perf_counter() - start
    log.info("generation check: %d of %d images name their subject (chance %.3f, p = %.2g; the classifier on %d "
             "real held-out views: %.2f)", round(metrics["gen_accuracy"] * metrics["gen_images"]),
             metrics["gen_images"], metrics["gen_chance"], metrics["gen_p_value"], len(real_views), real)
    return metrics


def captions_of(frame) -> dict[str, str]:
    """Each subject's first caption in the pairs manifest."""
    first = frame.drop_duplicates("subject_id")
    return {s: c for s, c in zip(first["subject_id"], first["caption"]) if isinstance(c, str) and c.strip()}


def base_priors(root: Path, prompts: list[str], classes: list[str], cfg: TrainSubjectConfig, device) -> list:
    """The base model's (`train_subject.base`, the base stage's `models/base`) plain
    text-to-image drawings of `prompts`, seed `seed`; Nones (grey cells) without one."""
    folder = local_path(cfg.base, root) if cfg.base else None
    if folder is None or not folder.is_dir():
        log.warning("no base model (train_subject.base: %s): the grid's prior column stays empty", cfg.base)
        return [None] * len(prompts)
    base = layout.load(folder).to(device)
    return list(draw_batched(base, None, prompts, classes, [cfg.seed] * len(prompts), cfg, base.native_size))


@torch.no_grad()
def sample_grid(model, root: Path, train: PairDataset, held_out: PairDataset | None, captions: dict[str, str],
                cfg: TrainSubjectConfig) -> np.ndarray:
    """One row per training subject: its reference view (first held-out view, else first
    training view's original; shown at the training resolution), the base model's prior from
    its caption ("... on a gradient background"), and the trained model's zero-shot drawings
    from the reference with the text "a [class] on a <kind> background" for each of
    GRID_CONTEXTS; every cell drawn with seed `seed`, at the training resolution (the base
    model's prior at its native size), shown at 3x (nearest neighbour)."""
    size = cfg.resolution
    refs = []
    for k, subject in enumerate(train.subjects):
        views = [i for i in range(len(held_out)) if held_out.subjects[held_out.subject_index[i]] == subject] \
            if held_out is not None else []
        refs.append(held_out.image(held_out.targets[views[0]]) if views
                    else train.image(train.targets[train.rows_of(k)[0]]))
    classes = train.subject_classes
    n = len(GRID_CONTEXTS)
    embeds = torch.cat([model.subject_embeddings([ref], c) for ref, c in zip(refs, classes)])
    drawn = draw_batched(model, embeds.repeat_interleave(n, 0), [scene(kind) for _ in refs for kind in GRID_CONTEXTS],
                         [c for c in classes for _ in range(n)], [cfg.seed] * (len(refs) * n), cfg, size)
    prompts = [f"{captions.get(s) or f'a {c}'} {scene(PRIOR_CONTEXT)}" for s, c in zip(train.subjects, classes)]
    priors = base_priors(root, prompts, list(classes), cfg, model.device)
    # the reference as the model sees it (bicubic to its size), like the drawings beside it
    shown = [np.asarray(Image.fromarray(ref).resize((size, size), Image.Resampling.BICUBIC)) for ref in refs]
    cells = [[ref, prior, *drawn[k * n:(k + 1) * n]] for k, (ref, prior) in enumerate(zip(shown, priors))]
    return image_grid(cells, list(train.subjects), list(GRID_COLUMNS), tile=grid_tile(size))




def _samples(model, data: PairDataset) -> dict[str, np.ndarray]:
    """One generation per subject, as `blipdiff generate` makes it (first training composite
    as the reference image), for MLflow."""
    out = {}
    with torch.no_grad():
        for k, subject in enumerate(data.subjects[:4]):
            row = data.rows_of(k)[0]
            embeds = model.subject_embeddings([data.image(data.inputs[row])], data.subject_classes[k])
            image = model.generate(embeds, ["on a table"], data.subject_classes[k], [0], num_inference_steps=10,
                                   height=model.native_size, width=model.native_size)
            out[subject] = (image[0] * 255).round().astype(np.uint8)
    return out


def after_run(params: Params, root: Path) -> None:
    """Inside the stage's MLflow run, after its metrics: register the model it wrote, storing
    what it trained (the frozen VAE and image encoder come from the preset when loaded)."""
    from components.model import registry

    run_id = tracking.current_run_id()
    if run_id is None:
        raise BlipDiffError("the tracking store could not be reached")
    # `evaluate` finds this run (and its model version) by the folder's hash
    tracking.set_tags({"model_hash": folder_hash(root / BLIP_DIFFUSION_DIR)})
    base = {"preset": params.preset, "seed": params.train_subject.seed}
    registry.log_and_register(root / BLIP_DIFFUSION_DIR, run_id, base=base)

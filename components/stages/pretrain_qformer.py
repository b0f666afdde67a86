"""Stage `pretrain_qformer`: BLIP-2 stage 1, vision-language representation learning.

BLIP-Diffusion starts from BLIP-2's stage-1 Q-Former. The Q-Former learns BLIP-2's three
objectives on image-caption pairs, ITC, ITM and ITG, the image encoder frozen except its
final LayerNorm (BLIP-2's `ln_vision`): `components/training/qformer_objectives.py`, which
follows LAVIS's `Blip2Qformer.forward` (checked against it on a tiny model:
tests/test_pretrain_qformer.py, fixtures by scripts/golden/make_stage1_golden.py).

Captions come from the manifest's caption column, else from class templates ("a photo of
a dog"); synthetic subjects carry captions built from their colour, shape and texture
(`components/training/data.py`, `CaptionData`).

Images stream from disk through a DataLoader (`num_workers` seeded workers); each step's
rows come from the step's seeded generator, so a resumed run reads the same batches.

Output `models/qformer/`: the Q-Former folder in the released layout (the subject
encoder loads it, and `train_subject` starts from it), plus the pre-training heads in
`heads/` to continue from. Learning check: image-to-text retrieval R@1 by ITC on the
held-out (split "test") images, against the chance of picking the caption at random."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from components.core.config import Params, PretrainQFormerConfig
from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import QFORMER_DIR, SUBJECTS_MANIFEST, checkpoint_dir, checkpoint_root, curve_file
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
from components.model.presets import start_model
from components.training import data as streaming
from components.training import loop as training
from components.training.data import CaptionData, candidate_captions
from components.training.qformer_objectives import Stage1, draw, fixed_batch_losses, retrieval

log = logging.getLogger(__name__)

SECTIONS = ("preset", "pretrain_qformer")  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (QFORMER_DIR,)
DATASETS = ((SUBJECTS_MANIFEST, "training"),)  # MLflow dataset inputs of the run
PLOTS = (curve_file("pretrain_qformer"),)
HEADS_FILE = "heads/pretrain_heads.safetensors"
CHECKPOINT_DIR = checkpoint_dir("pretrain_qformer")


@training.explain_out_of_memory(
    "pretrain_qformer", "lower pretrain_qformer.batch_size (gradient_accumulation_steps keeps the effective "
    "batch, though ITC and ITM then see fewer in-batch negatives)")
def run(params: Params, root: Path, resume: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    cfg = params.pretrain_qformer
    frame, train_frame, held_frame = read_splits(root)
    ckpt_root = checkpoint_root(root, "pretrain_qformer")
    accelerator = training.make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision, "pretrain_qformer",
                                            ckpt_root)
    model, train, held_out, candidates = build_data(params, root, accelerator, frame, train_frame, held_frame)
    stage1, optimizer, lr_schedule, trainable = build_model(model, cfg, accelerator)
    plain = accelerator.unwrap_model(stage1)

    fingerprint = training.fingerprint(params, "pretrain_qformer", root / SUBJECTS_MANIFEST,
                                       [root / p for p in train_frame["image_path"]], "ingest")
    start, curve = training.begin(accelerator, ckpt_root, resume, fingerprint, "pretrain_qformer")
    fixed_start = fixed_batch_losses(plain, train, cfg)
    r1_start = retrieval(plain, held_out, candidates)["itc_r1"] if held_out and not start else None

    seconds = fit(cfg, accelerator, stage1, optimizer, lr_schedule, trainable, train, start, fingerprint, curve)
    stage1 = None  # the DDP wrapper goes before the process group (training.finish)

    metrics: dict = {}
    if accelerator.is_main_process:
        plain.eval()
        fixed_end = fixed_batch_losses(plain, train, cfg)
        save(model, plain, curve, root)
        metrics = measure(plain, cfg, accelerator, train, held_out, candidates, fixed_start, fixed_end, r1_start,
                          seconds, cfg.steps - start)
    training.finish(accelerator)
    return metrics, {}


def read_splits(root: Path):
    """The subjects manifest, its train rows and its held-out (split "test") rows."""
    frame = read_manifest(root / SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    train_frame, held_frame = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    if train_frame.empty:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: no images in the train split (run `dvc repro ingest`)")
    return frame, train_frame, held_frame


def build_data(params: Params, root: Path, accelerator, frame, train_frame, held_frame):
    """The preset's model (seeded), the training and held-out images with their captions,
    and the retrieval check's candidate captions."""
    cfg = params.pretrain_qformer
    torch.manual_seed(cfg.seed)
    model = start_model(params.preset, cfg.base, root, seed=cfg.seed)
    tokenizer = model.qformer_tokenizer
    max_length = min(cfg.max_text_length, model.qformer.config.qformer_config.max_position_embeddings)
    train = CaptionData(train_frame, root, model.image_processor, tokenizer, max_length)
    if len(train.texts) < 2:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: every training image has the same caption "
                            f"({train.texts[0]!r}); ITC and ITM need at least two different ones")
    candidates = candidate_captions(frame, tokenizer, max_length)
    held_out = CaptionData(held_frame, root, model.image_processor, tokenizer, max_length) if len(held_frame) else None
    log.info("%d training images with %d distinct captions, %d held out; %d process(es) on %s",
             len(train), len(train.texts), len(held_frame), accelerator.num_processes, accelerator.device)
    return model, train, held_out, candidates


def build_model(model, cfg: PretrainQFormerConfig, accelerator):
    """The Q-Former with its pre-training heads, what trains of it, the optimizer and the
    schedule, prepared by accelerate."""
    qformer = model.qformer
    qformer.requires_grad_(True)
    qformer.visual_encoder.requires_grad_(False)
    qformer.visual_encoder.post_layernorm.requires_grad_(True)  # BLIP-2's ln_vision
    qformer.proj_layer.requires_grad_(False)  # stage 2's; pre-training does not reach it
    stage1 = Stage1(qformer, cfg.embed_dim, model.qformer_tokenizer.bos_token_id).to(accelerator.device)
    stage1.train()
    qformer.visual_encoder.eval()
    trainable = [p for p in stage1.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_schedule = training.make_schedule("cosine", optimizer, accelerator, cfg.warmup_steps, cfg.steps)
    stage1, optimizer, lr_schedule = accelerator.prepare(stage1, optimizer, lr_schedule)
    return stage1, optimizer, lr_schedule, trainable


def fit(cfg: PretrainQFormerConfig, accelerator, stage1, optimizer, lr_schedule, trainable: list,
        train: CaptionData, start: int, fingerprint: dict, curve: list[dict]) -> float:
    """Steps `start`..`cfg.steps`, the images streamed from disk; returns the seconds spent."""
    plain = accelerator.unwrap_model(stage1)
    sampler = streaming.StepBatchSampler(len(train), cfg.batch_size, cfg.seed, accelerator.process_index, start,
                                         cfg.steps, cfg.gradient_accumulation_steps)
    batches = iter(streaming.make_loader(train, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         seed=cfg.seed + accelerator.process_index))

    def loss_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        pixels, texts, g = draw(cfg, train, step, micro, accelerator.process_index, next(batches))
        return stage1(pixels, texts, train, cfg, g)

    _, seconds = training.train_loop(
        accelerator, stage1, optimizer, lr_schedule, trainable, cfg, stage="pretrain_qformer", start=start,
        fingerprint=fingerprint, loss_fn=loss_fn,
        log_extra=lambda: {"temp": plain.temp.item()}, curve=curve)
    return seconds


def save(model, plain: Stage1, curve: list[dict], root: Path) -> None:
    """The training curve, and the Q-Former folder with its tokenizer and the heads."""
    from safetensors.torch import save_file

    training.write_curve(curve, root / curve_file("pretrain_qformer"))
    with atomic_path(root / QFORMER_DIR) as tmp:
        model.qformer.save_pretrained(tmp, safe_serialization=True)
        model.qformer_tokenizer.save_pretrained(tmp)
        (tmp / HEADS_FILE).parent.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in plain.heads_state_dict().items()}, tmp / HEADS_FILE)


def measure(plain: Stage1, cfg: PretrainQFormerConfig, accelerator, train: CaptionData,
            held_out: CaptionData | None, candidates, fixed_start: dict, fixed_end: dict, r1_start: float | None,
            seconds: float, steps_run: int) -> dict:
    """The learning checks (fixed-batch losses, held-out retrieval R@1), time and memory."""
    metrics = {
        "fixed_batch_loss_start": fixed_start["loss"],
        "fixed_batch_loss_end": fixed_end["loss"],
        **{f"fixed_batch_{k}_end": v for k, v in fixed_end.items() if k != "loss"},
        "temperature": plain.temp.item(),
        **training.throughput_metrics(seconds, steps_run, cfg, accelerator.num_processes),
        "processes": accelerator.num_processes,
        "train_images": len(train),
    }
    if held_out is not None:
        metrics.update(retrieval(plain, held_out, candidates))
        if r1_start is not None:
            metrics["itc_r1_start"] = r1_start
    log.info("wrote %s; %s", QFORMER_DIR, {k: v for k, v in metrics.items() if k.startswith(("itc", "fixed"))})
    return metrics

"""Stage `train_subject`: subject representation learning (BLIP-Diffusion stage 2, paper Sec. 4.2).

Each training pair: the composite (subject alpha-blended on a new background) goes
through the frozen image encoder and the Q-Former to give subject embeddings; the
original image's VAE latent is the denoising target. Text: "[caption], the [class] is
[subject embeddings]"; with probability `subject_prompt_drop` the subject prompt is left
out. Noise-prediction MSE on diffusers' DDPM schedule. Trainable: Q-Former + projection,
text encoder, UNet (each switchable); frozen: image encoder, VAE.

Runs under accelerate: `accelerate launch --multi_gpu --num_processes N -m components.cli
train_subject` starts N processes (on a machine without GPUs they train on the CPU, gloo). Every step draws its batch, noise and timesteps from a generator
seeded by (seed, step, micro-batch, process), so a run resumed from a checkpoint ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.core import tracking
from components.core.config import Params, TrainSubjectConfig
from components.core.errors import BlipDiffError
from components.core.paths import BLIP_DIFFUSION_DIR, PAIRS_MANIFEST, checkpoint_dir, curve_file
from components.data.images import read_listed_rgb
from components.data.manifests import PAIRS_SCHEMA, read_manifest
from components.model import layout
from components.model.presets import from_preset
from components.training import loop as training

log = logging.getLogger(__name__)

SECTIONS = ("preset", "train_subject")  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (BLIP_DIFFUSION_DIR,)
PLOTS = (curve_file("train_subject"),)
CHECKPOINT_DIR = checkpoint_dir("train_subject")


# ----------------------------------------------------------------------------- data
class PairData:
    """All training tensors, precomputed once: the VAE and image encoder are frozen."""

    def __init__(self, model, frame, root: Path, resolution: int, text_mode: str = "caption"):
        self.subjects = sorted(frame["subject_id"].unique())
        self.subject_index = torch.tensor([self.subjects.index(s) for s in frame["subject_id"]])
        classes = dict(zip(frame["subject_id"], frame["subject_text"]))
        self.subject_classes = [classes[s] for s in self.subjects]
        inputs = [read_listed_rgb(root, p, PAIRS_MANIFEST, "context") for p in frame["input_path"]]
        targets = [read_listed_rgb(root, p, PAIRS_MANIFEST, "context") for p in frame["target_path"]]
        self.pixels = model.image_processor(inputs)  # Q-Former input: the composite
        self.latents = model.encode_latents(targets, resolution)  # target: the original
        texts = list(frame["subject_text"])
        q = model.qformer_tokenizer(texts, padding=True, return_tensors="pt")
        self.class_ids, self.class_mask = q.input_ids, q.attention_mask
        num_query = model.qformer.config.num_query_tokens
        max_len = model.text_encoder.config.max_position_embeddings
        captions = list(frame["caption"]) if text_mode == "caption" else ["a photo"] * len(frame)
        classes = texts if text_mode == "caption" else ["object"] * len(frame)
        prompts = [f"{c}, the {t} is" for c, t in zip(captions, classes)]
        tok = model.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len - num_query,
                              return_tensors="pt")
        self.prompt_ids = tok.input_ids
        # The subject embeddings go right before the end token: "..., the dog is [subject]".
        self.ctx_pos = tok.attention_mask.sum(1) - 1
        plain = model.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=max_len, return_tensors="pt")
        self.caption_ids = plain.input_ids

    def __len__(self) -> int:
        return len(self.latents)


# ---------------------------------------------------------------------------- model
class Stage2(torch.nn.Module):
    """The trained parts in one module, so accelerate wraps them (DDP) as one."""

    def __init__(self, model):
        super().__init__()
        self.qformer, self.text_encoder, self.unet = model.qformer, model.text_encoder, model.unet

    def text_embeddings(self, data: PairData, idx, drop, embeds) -> torch.Tensor:
        """Prompt with subject embeddings, or the caption alone where the subject prompt is dropped."""
        out = torch.empty(len(idx), self.text_encoder.config.max_position_embeddings,
                          self.text_encoder.config.hidden_size, device=embeds.device, dtype=embeds.dtype)
        keep = ~drop
        if keep.any():
            out[keep] = self.text_encoder(data.prompt_ids[idx[keep]].to(embeds.device), ctx_embeddings=embeds[keep],
                                          ctx_begin_pos=data.ctx_pos[idx[keep]].tolist()).last_hidden_state
        if drop.any():
            out[drop] = self.text_encoder(data.caption_ids[idx[drop]].to(embeds.device)).last_hidden_state
        return out

    def forward(self, data: PairData, idx, drop, noise, timesteps, noise_scheduler) -> torch.Tensor:
        device = self.unet.device
        embeds = self.qformer(data.pixels[idx].to(device), data.class_ids[idx].to(device),
                              data.class_mask[idx].to(device))
        text = self.text_embeddings(data, idx, drop.to(device), embeds)
        clean = data.latents[idx].to(device)
        noisy = noise_scheduler.add_noise(clean, noise.to(device), timesteps.to(device))
        pred = self.unet(noisy, timesteps.to(device), encoder_hidden_states=text).sample
        return F.mse_loss(pred.float(), noise.to(device).float())


def _draw(cfg: TrainSubjectConfig, step: int, micro: int, rank: int, n: int, latent_shape, num_timesteps: int):
    """Batch indices, subject-prompt drops, noise and timesteps of one micro-batch: a function of its position."""
    g = training.step_generator(cfg.seed, step, micro, rank)
    idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.subject_prompt_drop
    noise = torch.randn((cfg.batch_size, *latent_shape), generator=g)
    timesteps = torch.randint(0, num_timesteps, (cfg.batch_size,), generator=g)
    return idx, drop, noise, timesteps


# ------------------------------------------------------------------- learning check
@torch.no_grad()
def fixed_batch_loss(stage2, data: PairData, cfg: TrainSubjectConfig, noise_scheduler) -> float:
    """Loss on one fixed batch (indices, noise, timesteps): the overfit check compares it over training."""
    was_training = stage2.training
    stage2.eval()
    idx, drop, noise, t = _draw(cfg, -1, 0, 0, len(data), tuple(data.latents.shape[1:]),
                                noise_scheduler.config.num_train_timesteps)
    loss = stage2(data, idx, torch.zeros_like(drop), noise, t, noise_scheduler).item()
    stage2.train(was_training)
    return loss


@torch.no_grad()
def identification_accuracy(model, train: PairData, held_out: PairData, cfg: TrainSubjectConfig) -> dict:
    """Subject identification by denoising error on held-out views (the paper's claim in miniature).

    For each held-out image, the denoising error of its latent is measured under every
    training subject's embeddings (averaged over that subject's training composites), with
    the same noise, timesteps (>= id_min_timestep) and text for every candidate. The image
    counts as identified when its own subject gives the lowest mean error.
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(model.scheduler.config)
    device = model.device
    candidates = []
    for k in range(len(train.subjects)):
        rows = (train.subject_index == k).nonzero().flatten()
        e = model.qformer(train.pixels[rows].to(device), train.class_ids[rows].to(device),
                          train.class_mask[rows].to(device))
        candidates.append(e.mean(0, keepdim=True))
    g = torch.Generator().manual_seed(cfg.seed + 7)
    correct = 0
    for i in range(len(held_out)):
        truth = train.subjects.index(held_out.subjects[int(held_out.subject_index[i])])
        clean = held_out.latents[i : i + 1].expand(cfg.id_draws, -1, -1, -1).to(device)
        noise = torch.randn(clean.shape, generator=g).to(device)
        t = torch.randint(cfg.id_min_timestep, sched.config.num_train_timesteps, (cfg.id_draws,), generator=g).to(device)
        noisy = sched.add_noise(clean, noise, t)
        ids = held_out.prompt_ids[i : i + 1].to(device)
        errors = []
        for e in candidates:
            text = model.text_encoder(ids, ctx_embeddings=e, ctx_begin_pos=[int(held_out.ctx_pos[i])]).last_hidden_state
            pred = model.unet(noisy, t, encoder_hidden_states=text.expand(cfg.id_draws, -1, -1)).sample
            errors.append(F.mse_loss(pred, noise).item())
        correct += int(np.argmin(errors) == truth)
    accuracy = correct / max(len(held_out), 1)
    chance = 1.0 / len(train.subjects)
    return {"id_accuracy": accuracy, "id_chance": chance, "id_images": len(held_out),
            "id_over_chance": accuracy / chance}


# ---------------------------------------------------------------------------- stage
@training.explain_out_of_memory(
    "train_subject", "lower train_subject.batch_size or resolution (gradient_accumulation_steps keeps the "
    "effective batch), or set gradient_checkpointing: true")
def run(params: Params, root: Path, resume: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_constant_schedule_with_warmup

    cfg = params.train_subject
    frame = read_manifest(root / PAIRS_MANIFEST, PAIRS_SCHEMA)
    if frame.empty:
        raise BlipDiffError(f"{PAIRS_MANIFEST}: no training pairs (run `dvc repro context`)")
    train_frame = frame[frame["split"] == "train"]
    held_frame = frame[frame["split"] == "test"].drop_duplicates("target_path")
    held_frame = held_frame[held_frame["subject_id"].isin(set(train_frame["subject_id"]))]
    if train_frame.empty:
        raise BlipDiffError(f"{PAIRS_MANIFEST}: no pairs in the train split")

    accelerator = training.make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision, "train_subject")
    torch.manual_seed(cfg.seed)
    model = from_preset(params.preset, seed=cfg.seed)
    if cfg.qformer:
        model.qformer, model.qformer_tokenizer = layout.load_pretrained_qformer(root / cfg.qformer, model.qformer)
        log.info("subject encoder starts from the pre-trained Q-Former in %s", cfg.qformer)
    model.to(accelerator.device)
    train = PairData(model, train_frame, root, cfg.resolution, cfg.prompt_text)
    held_out = PairData(model, held_frame, root, cfg.resolution, cfg.prompt_text) if len(held_frame) else None
    log.info("read %d training pairs of %d subjects, %d held-out views; %d process(es) on %s",
             len(train), len(train.subjects), len(held_frame), accelerator.num_processes, accelerator.device)

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
    lr_schedule = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    stage2, optimizer, lr_schedule = accelerator.prepare(stage2, optimizer, lr_schedule)
    ema = None
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=cfg.ema_decay)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)

    ckpt_root = root / CHECKPOINT_DIR
    config_hash = training.config_hash(params, "train_subject")
    start, curve = 0, []
    if resume:
        start, curve = training.load_checkpoint(accelerator, ckpt_root, resume, config_hash, "train_subject", ema)

    plain = accelerator.unwrap_model(stage2)
    fixed_start = fixed_batch_loss(plain, train, cfg, noise_scheduler)
    latent_shape = tuple(train.latents.shape[1:])

    def loss_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        idx, drop, noise, t = _draw(cfg, step, micro, accelerator.process_index, len(train), latent_shape,
                                    noise_scheduler.config.num_train_timesteps)
        return {"loss": stage2(train, idx, drop, noise, t, noise_scheduler)}

    def sample(done: int) -> None:
        if cfg.sample_every and done % cfg.sample_every == 0 and accelerator.is_main_process:
            tracking.log_images(_samples(model, train), folder=f"samples/step-{done:06d}")

    history, seconds = training.train_loop(
        accelerator, stage2, optimizer, lr_schedule, trainable, cfg, stage="train_subject", start=start,
        ckpt_root=ckpt_root, config_hash=config_hash, loss_fn=loss_fn, ema=ema, after_step=sample,
        curve=curve)
    losses = [h["loss"] for h in history]

    stage2 = None  # the DDP wrapper goes before the process group (training.finish)
    plain.eval()
    if ema is not None:
        ema.copy_to(trainable)
    metrics: dict = {}
    samples: dict[str, np.ndarray] = {}
    if accelerator.is_main_process:
        layout.save(model, root / BLIP_DIFFUSION_DIR)
        training.write_curve(curve, root / curve_file("train_subject"))
        steps_run = cfg.steps - start
        metrics = {
            "fixed_batch_loss_start": fixed_start,
            "fixed_batch_loss_end": fixed_batch_loss(plain, train, cfg, noise_scheduler),
            "loss_first": losses[0] if losses else float("nan"),
            "loss_last_mean": float(np.mean(losses[-cfg.log_every:])) if losses else float("nan"),
            "seconds_training": round(seconds, 3),
            "seconds_per_step": round(seconds / max(steps_run, 1), 4),
            "samples_per_s": round(steps_run * cfg.batch_size * cfg.gradient_accumulation_steps
                                   * accelerator.num_processes / max(seconds, 1e-9), 3),
            "peak_memory_mb": round(training.peak_memory_mb(), 1),
            "processes": accelerator.num_processes,
            "train_pairs": len(train),
        }
        if held_out is not None:
            metrics.update(identification_accuracy(model, train, held_out, cfg))
        samples = _samples(model, train)
        log.info("wrote %s; %s", BLIP_DIFFUSION_DIR, {k: metrics[k] for k in metrics if k.startswith(("id_", "loss"))})
    training.finish(accelerator)
    return metrics, samples


def _samples(model, data: PairData) -> dict[str, np.ndarray]:
    """One generation per subject (first training composite as reference), for MLflow."""
    out = {}
    with torch.no_grad():
        for k, subject in enumerate(data.subjects[:4]):
            row = int((data.subject_index == k).nonzero()[0])
            embeds = model.qformer(data.pixels[row : row + 1].to(model.device), data.class_ids[row : row + 1].to(model.device),
                                   data.class_mask[row : row + 1].to(model.device))
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
    base = {"preset": params.preset, "seed": params.train_subject.seed}
    registry.log_and_register(root / BLIP_DIFFUSION_DIR, run_id, base=base)

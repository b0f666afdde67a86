"""Stage `train_subject`: subject representation learning (BLIP-Diffusion stage 2, paper Sec. 4.2).

Each training pair: the composite (subject alpha-blended on a new background) goes
through the frozen image encoder and the Q-Former to give subject embeddings; the
original image's VAE latent, sampled afresh each step from the VAE's distribution as the
reference does, is the denoising target. Noise-prediction MSE on diffusers' DDPM
schedule. Trainable: Q-Former + projection, text encoder, UNet (each switchable); frozen:
image encoder, VAE.

Conditioning is the one `blipdiff generate` samples with (LAVIS: `_CTX_BEGIN_POS = 2`):
the prompt comes from the model's own builder, "a [class] [caption]" (prompt_text
caption) or "a [class]" (neutral), and the 16 subject embeddings are spliced in at the
model's `ctx_begin_pos`, right after "a". With probability `subject_prompt_drop` the
embeddings are left out and the same text is encoded alone. The identification check and
the MLflow samples go through the same path.

Samples stream from disk through a DataLoader (`num_workers` workers), batch by batch;
with `cache: true` the VAE latent moments and the image encoder's features of every file
are kept on disk (`cache_dir`), keyed by content and weights hashes.

Runs under accelerate: `accelerate launch --multi_gpu --num_processes N -m components.cli
train_subject` starts N processes (on a machine without GPUs they train on the CPU, gloo).
Every step draws its batch, noise, timesteps and latent sample from a generator seeded by
(seed, step, micro-batch, process), so a run resumed from a checkpoint ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, default_collate

from components.core import tracking
from components.core.config import Params, TrainSubjectConfig
from components.core.errors import BlipDiffError
from components.core.io import folder_hash
from components.core.paths import BLIP_DIFFUSION_DIR, PAIRS_MANIFEST, checkpoint_dir, checkpoint_root, curve_file
from components.data.images import read_listed_rgb
from components.data.manifests import PAIRS_SCHEMA, read_manifest
from components.model import layout
from components.model.blip_diffusion import BlipDiffusion
from components.model.presets import from_preset
from components.training import data as streaming
from components.training import loop as training

log = logging.getLogger(__name__)

SECTIONS = ("preset", "train_subject")  # the params this stage reads (dvc.yaml `params`)
OUTPUTS = (BLIP_DIFFUSION_DIR,)
DATASETS = ((PAIRS_MANIFEST, "training"),)  # MLflow dataset inputs of the run
PLOTS = (curve_file("train_subject"),)
CHECKPOINT_DIR = checkpoint_dir("train_subject")


# ----------------------------------------------------------------------------- data
def training_prompt(model, caption: str | None, class_text: str, text_mode: str) -> str:
    """The text a training sample conditions on: `generate`'s prompt for that class, with the
    caption (caption mode) or nothing (neutral) as the context."""
    context = caption if text_mode == "caption" and isinstance(caption, str) else ""
    return model.build_prompt(context, class_text)


class PairDataset(Dataset):
    """Training pairs read from disk one at a time: the composite for the Q-Former (or its
    cached image-encoder features), the original for the VAE (or its cached latent
    moments), the class text and the built prompt. Holds paths and strings only."""

    def __init__(self, model, frame, root: Path, resolution: int, text_mode: str):
        self.root, self.resolution = root, resolution
        self.processor = model.image_processor
        self.inputs, self.targets = list(frame["input_path"]), list(frame["target_path"])
        self.subjects = sorted(frame["subject_id"].unique())
        self.subject_index = [self.subjects.index(s) for s in frame["subject_id"]]
        classes = dict(zip(frame["subject_id"], frame["subject_text"]))
        self.subject_classes = [classes[s] for s in self.subjects]
        self.class_texts = list(frame["subject_text"])
        self.prompts = [training_prompt(model, c, t, text_mode) for c, t in zip(frame["caption"], self.class_texts)]
        self.features: streaming.FeatureCache | None = None
        self.moments: streaming.FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def image(self, relative: str) -> np.ndarray:
        return read_listed_rgb(self.root, relative, PAIRS_MANIFEST, "context")

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "class_text": self.class_texts[i], "prompt": self.prompts[i]}
        if self.features is not None:
            item["image_embeds"] = self.features.get(self.input_hashes[i])
        else:
            item["pixels"] = self.processor([self.image(self.inputs[i])])[0]
        if self.moments is not None:
            item["moments"] = self.moments.get(self.target_hashes[i])
        else:
            item["target"] = BlipDiffusion.vae_pixels(self.image(self.targets[i]), self.resolution)
        return item

    def batch(self, rows) -> dict:
        return default_collate([self[int(i)] for i in rows])

    def rows_of(self, k: int) -> list[int]:
        return [i for i, s in enumerate(self.subject_index) if s == k]

    def use_cache(self, model, folder: Path, num_workers: int, is_main: bool) -> None:
        """Compute (main process) or find the frozen networks' outputs for every file, then
        read them instead of the images."""
        latent_ns = f"vae-{streaming.module_hash(model.vae)}-{self.resolution}px"
        p = self.processor
        feature_ns = (f"image-{streaming.module_hash(model.qformer.visual_encoder)}-{p.size}-{p.crop_size}-"
                      f"{streaming.params_tag((p.mean, p.std))}")
        self.input_hashes = [streaming.file_sha256(self.root / r) for r in self.inputs]
        self.target_hashes = [streaming.file_sha256(self.root / r) for r in self.targets]
        features = streaming.FeatureCache(folder, feature_ns)
        moments = streaming.FeatureCache(folder, latent_ns)
        if is_main:
            todo = sorted({i for i, h in enumerate(self.input_hashes) if not features.has(h)}
                          | {i for i, h in enumerate(self.target_hashes) if not moments.has(h)})
            if todo:
                log.info("caching image features and latents of %d pairs in %s", len(todo), folder)
            loader = streaming.make_loader(Subset(self, todo), batch_size=32, num_workers=num_workers)
            with torch.no_grad():
                for batch in loader:
                    feats = model.qformer.visual_encoder(batch["pixels"].to(model.device, model.qformer.dtype))
                    mom = model.latent_moments(batch["target"])
                    for j, i in enumerate(batch["index"].tolist()):
                        features.put(self.input_hashes[i], feats[j])
                        moments.put(self.target_hashes[i], mom[j])
        self.features, self.moments = features, moments


# ---------------------------------------------------------------------------- model
class Stage2(torch.nn.Module):
    """The trained parts in one module, so accelerate wraps them (DDP) as one. The bundle (its
    tokenizers, prompt encoder and frozen VAE) is held as a plain attribute."""

    def __init__(self, model):
        super().__init__()
        self.qformer, self.text_encoder, self.unet = model.qformer, model.text_encoder, model.unet
        self.bundle = model

    def subject_embeddings(self, batch: dict) -> torch.Tensor:
        device = self.unet.device
        q = self.bundle.qformer_tokenizer(list(batch["class_text"]), padding=True, return_tensors="pt")
        pixels = batch.get("pixels")
        image_embeds = batch.get("image_embeds")
        return self.qformer(None if pixels is None else pixels.to(device), q.input_ids.to(device),
                            q.attention_mask.to(device),
                            image_embeds=None if image_embeds is None else image_embeds.to(device))

    def text_embeddings(self, prompts: list[str], drop: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """`generate`'s conditioning for each prompt; where the subject prompt is dropped, the
        same text without the subject embeddings."""
        bundle = self.bundle
        out = torch.empty(len(prompts), self.text_encoder.config.max_position_embeddings,
                          self.text_encoder.config.hidden_size, device=embeds.device, dtype=embeds.dtype)
        keep = (~drop).nonzero().flatten().tolist()
        dropped = drop.nonzero().flatten().tolist()
        if keep:
            ids = bundle.prompt_ids([prompts[i] for i in keep], embeds.shape[1])
            out[keep] = bundle.encode_prompt_ids(ids, embeds[keep]).to(out.dtype)
        if dropped:
            ids = bundle.prompt_ids([prompts[i] for i in dropped], 0)
            out[dropped] = self.text_encoder(ids.to(embeds.device)).last_hidden_state.to(out.dtype)
        return out

    def clean_latents(self, batch: dict, eps: torch.Tensor | None) -> torch.Tensor:
        """The targets' latents: a fresh sample of the VAE distribution (eps), or its mode."""
        moments = batch.get("moments")
        if moments is None:
            moments = self.bundle.latent_moments(batch["target"])
        return self.bundle.latents_from_moments(moments.to(self.unet.device), eps)

    def forward(self, batch: dict, drop, noise, timesteps, eps, noise_scheduler) -> torch.Tensor:
        device = self.unet.device
        embeds = self.subject_embeddings(batch)
        text = self.text_embeddings(list(batch["prompt"]), drop, embeds)
        clean = self.clean_latents(batch, eps)
        noise, timesteps = noise.to(device, clean.dtype), timesteps.to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text).sample
        return F.mse_loss(pred.float(), noise.float())


def latent_shape(model, resolution: int) -> tuple[int, int, int]:
    side = resolution // model.vae_scale_factor
    return (model.vae.config.latent_channels, side, side)


def _draw(cfg: TrainSubjectConfig, step: int, micro: int, rank: int, n: int, shape, num_timesteps: int):
    """Rows, subject-prompt drops, noise, timesteps and latent-sample noise of one
    micro-batch: a function of its position (the rows are the sampler's draw)."""
    g = streaming.step_generator(cfg.seed, step, micro, rank)
    rows = streaming.draw_rows(g, n, cfg.batch_size)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.subject_prompt_drop
    noise = torch.randn((cfg.batch_size, *shape), generator=g)
    timesteps = torch.randint(0, num_timesteps, (cfg.batch_size,), generator=g)
    eps = torch.randn((cfg.batch_size, *shape), generator=g)
    return rows, drop, noise, timesteps, eps


# ------------------------------------------------------------------- learning check
@torch.no_grad()
def fixed_batch_loss(stage2, data: PairDataset, cfg: TrainSubjectConfig, noise_scheduler) -> float:
    """Loss on one fixed batch (rows, noise, timesteps, latent sample): the overfit check
    compares it over training."""
    was_training = stage2.training
    stage2.eval()
    rows, drop, noise, t, eps = _draw(cfg, -1, 0, 0, len(data), latent_shape(stage2.bundle, cfg.resolution),
                                      noise_scheduler.config.num_train_timesteps)
    loss = stage2(data.batch(rows), torch.zeros_like(drop), noise, t, eps, noise_scheduler).item()
    stage2.train(was_training)
    return loss


@torch.no_grad()
def identification_accuracy(model, train: PairDataset, held_out: PairDataset, cfg: TrainSubjectConfig) -> dict:
    """Subject identification by denoising error on held-out views (the paper's claim in miniature).

    For each held-out image, the denoising error of its latent (the VAE's mode) is measured
    under every training subject's embeddings (averaged over that subject's training
    composites), with the same noise, timesteps (>= id_min_timestep) and text for every
    candidate: `generate`'s conditioning for the image's class and prompt. The image counts
    as identified when its own subject gives the lowest mean error.
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(model.scheduler.config)
    stage2 = Stage2(model)
    device = model.device
    candidates = []
    for k in range(len(train.subjects)):
        total, count = 0, 0
        for batch in streaming.make_loader(Subset(train, train.rows_of(k)), batch_size=32):
            total = total + stage2.subject_embeddings(batch).sum(0, keepdim=True)
            count += len(batch["index"])
        candidates.append(total / count)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    correct = 0
    for i in range(len(held_out)):
        batch = held_out.batch([i])
        truth = train.subjects.index(held_out.subjects[held_out.subject_index[i]])
        clean = stage2.clean_latents(batch, None).expand(cfg.id_draws, -1, -1, -1)
        noise = torch.randn(clean.shape, generator=g).to(device)
        t = torch.randint(cfg.id_min_timestep, sched.config.num_train_timesteps, (cfg.id_draws,), generator=g).to(device)
        noisy = sched.add_noise(clean, noise, t)
        ids = model.prompt_ids(list(batch["prompt"]), candidates[0].shape[1])
        errors = []
        for e in candidates:
            text = model.encode_prompt_ids(ids, e)
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

    cfg = params.train_subject
    frame = read_manifest(root / PAIRS_MANIFEST, PAIRS_SCHEMA)
    if frame.empty:
        raise BlipDiffError(f"{PAIRS_MANIFEST}: no training pairs (run `dvc repro context`)")
    train_frame = frame[frame["split"] == "train"]
    held_frame = frame[frame["split"] == "test"].drop_duplicates("target_path")
    held_frame = held_frame[held_frame["subject_id"].isin(set(train_frame["subject_id"]))]
    if train_frame.empty:
        raise BlipDiffError(f"{PAIRS_MANIFEST}: no pairs in the train split")

    ckpt_root = checkpoint_root(root, "train_subject")
    accelerator = training.make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision, "train_subject",
                                            ckpt_root)
    torch.manual_seed(cfg.seed)
    model = from_preset(params.preset, seed=cfg.seed)
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

    files = sorted(set(train_frame["input_path"]) | set(train_frame["target_path"]))
    fingerprint = training.fingerprint(params, "train_subject", root / PAIRS_MANIFEST, [root / f for f in files],
                                       "context")
    start, curve = training.begin(accelerator, ckpt_root, resume, fingerprint, "train_subject", ema)

    plain = accelerator.unwrap_model(stage2)
    fixed_start = fixed_batch_loss(plain, train, cfg, noise_scheduler)
    shape = latent_shape(model, cfg.resolution)
    sampler = streaming.StepBatchSampler(len(train), cfg.batch_size, cfg.seed, accelerator.process_index, start,
                                         cfg.steps, cfg.gradient_accumulation_steps)
    batches = iter(streaming.make_loader(train, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         seed=cfg.seed + accelerator.process_index))

    def loss_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        rows, drop, noise, t, eps = _draw(cfg, step, micro, accelerator.process_index, len(train), shape,
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
    losses = [h["loss"] for h in history]
    batches = None

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

"""The subject representation objective (BLIP-Diffusion stage 2, paper Sec. 4.2).

Each training pair: the composite (subject alpha-blended on a new background) goes
through the frozen image encoder and the Q-Former to give subject embeddings; the
original image's VAE latent, sampled afresh each step from the VAE's distribution as the
reference does, is the denoising target. Noise-prediction MSE on diffusers' DDPM
schedule.

Conditioning is the one `blipdiff generate` samples with (LAVIS: `_CTX_BEGIN_POS = 2`):
the prompt (see `data.training_prompt`) with the 16 subject embeddings spliced in at the
model's `ctx_begin_pos`, right after "a". With probability `subject_prompt_drop` the
embeddings are left out and the same text is encoded alone. The identification check goes
through the same path.

Every micro-batch draws its rows, prompt drops, noise, timesteps and latent sample from a
generator seeded by (seed, step, micro-batch, process) (`draw`), so a run resumed from a
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from components.core.config import TrainSubjectConfig
from components.model.conditioning import encode_text, prompt_ids
from components.training import data as streaming
from components.training.data import PairDataset


# ------------------------------------------------------------------------- objective
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
        bundle, keep = self.bundle, ~drop
        ids = prompt_ids(bundle.tokenizer, prompts, bundle.text_length, embeds.shape[1], keep)
        return encode_text(self.text_encoder, ids, embeds, bundle.ctx_begin_pos, keep)

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


def draw(cfg: TrainSubjectConfig, step: int, micro: int, rank: int, n: int, shape, num_timesteps: int):
    """Rows, subject-prompt drops, noise, timesteps and latent-sample noise of one
    micro-batch: a function of its position (the rows are the sampler's draw)."""
    g = streaming.step_generator(cfg.seed, step, micro, rank)
    rows = streaming.draw_rows(g, n, cfg.batch_size)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.subject_prompt_drop
    noise = torch.randn((cfg.batch_size, *shape), generator=g)
    timesteps = torch.randint(0, num_timesteps, (cfg.batch_size,), generator=g)
    eps = torch.randn((cfg.batch_size, *shape), generator=g)
    return rows, drop, noise, timesteps, eps


# ------------------------------------------------------------------- learning checks
@torch.no_grad()
def fixed_batch_loss(stage2, data: PairDataset, cfg: TrainSubjectConfig, noise_scheduler) -> float:
    """Loss on one fixed batch (rows, noise, timesteps, latent sample): the overfit check
    compares it over training."""
    was_training = stage2.training
    stage2.eval()
    rows, drop, noise, t, eps = draw(cfg, -1, 0, 0, len(data), latent_shape(stage2.bundle, cfg.resolution),
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
        ids = prompt_ids(model.tokenizer, list(batch["prompt"]), model.text_length, candidates[0].shape[1])
        errors = []
        for e in candidates:
            text = encode_text(model.text_encoder, ids, e, model.ctx_begin_pos)
            pred = model.unet(noisy, t, encoder_hidden_states=text.expand(cfg.id_draws, -1, -1)).sample
            errors.append(F.mse_loss(pred, noise).item())
        correct += int(np.argmin(errors) == truth)
    accuracy = correct / max(len(held_out), 1)
    chance = 1.0 / len(train.subjects)
    return {"id_accuracy": accuracy, "id_chance": chance, "id_images": len(held_out),
            "id_over_chance": accuracy / chance}

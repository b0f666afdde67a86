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
    # the unit is the held-out image: its draws are averaged into one verdict
    return chance_metrics("id", correct, len(held_out), 1.0 / len(train.subjects))


def chance_metrics(prefix: str, correct: int, total: int, chance: float) -> dict:
    """A learning check's numbers: `<prefix>_accuracy`, `_chance`, `_images` (the trials),
    `_over_chance` and `_p_value`, the probability that a random guesser, right with
    probability `chance` on each of `total` independent trials, gets at least `correct` right
    (binomial: `binom.sf(correct - 1, total, chance)`; 1.0 for 0 right)."""
    from scipy.stats import binom

    accuracy = correct / total if total else 0.0
    p_value = float(binom.sf(correct - 1, total, chance)) if total else 1.0
    return {f"{prefix}_accuracy": accuracy, f"{prefix}_chance": chance, f"{prefix}_images": total,
            f"{prefix}_over_chance": accuracy / chance, f"{prefix}_p_value": min(p_value, 1.0)}


def at_least(correct: int, chances: list[float]) -> float:
    """P(at least `correct` successes) of independent trials with their own success
    probabilities (Poisson binomial; the binomial tail when they are all equal)."""
    dist = np.zeros(len(chances) + 1)
    dist[0] = 1.0
    for p in chances:
        dist[1:] = dist[1:] * (1.0 - p) + dist[:-1] * p
        dist[0] *= 1.0 - p
    return float(min(dist[max(correct, 0):].sum(), 1.0))


def draw_batched(model, embeds: torch.Tensor | None, prompts: list[str], classes: list[str], seeds: list[int],
                 cfg: TrainSubjectConfig, size: int) -> np.ndarray:
    """`model.generate` in calls of at most `gen_batch_size` images (each image depends on its
    seed only, not on the batch), with the generation check's sampler settings and the prompt
    as training builds it (once, `prompt_reps` 1). `embeds` (N, Q, D), or None: no subject,
    each prompt is the whole text. Float images in [0, 1], (N, size, size, 3)."""
    out = []
    for start in range(0, len(prompts), cfg.gen_batch_size):
        part = slice(start, start + cfg.gen_batch_size)
        out.append(model.generate(None if embeds is None else embeds[part], prompts[part], classes[part], seeds[part],
                                  guidance_scale=cfg.gen_guidance_scale, num_inference_steps=cfg.gen_steps,
                                  height=size, width=size, prompt_reps=1))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.float32)


@torch.no_grad()
def generation_accuracy(model, held_out: PairDataset, classify, subject_classes: dict[str, str],
                        cfg: TrainSubjectConfig, size: int) -> dict:
    """Subject recognition in generated images (the paper's claim, zero-shot, in miniature).

    For each held-out view: its subject embeddings (the view itself, with its class text),
    and `gen_images_per_view` images drawn from them with the text "a [class]" (the empty
    prompt; the same text for every subject of the class, so only the embeddings tell them
    apart) and seeds `seed + j` (the same for every view), at `size` px. `classify(images)`
    names a subject for each image (one of `subject_classes`' keys: subject -> class);
    an image counts when it names the view's subject.

    Metrics (`gen_`): accuracy, chance (1 / subjects), images, over_chance and the binomial
    p-value per image (`chance_metrics`); `gen_class_chance`, the chance of a guesser that
    knows the class (1 / subjects of the image's class, averaged) and `gen_class_p_value`
    against it, as the text names the class; `gen_text_only_accuracy`, the same images drawn
    without subject embeddings (what the class word and the seeds alone give).
    """
    per_view = cfg.gen_images_per_view
    views = list(range(len(held_out)))
    truth = [held_out.subjects[held_out.subject_index[i]] for i in views]
    classes = [held_out.class_texts[i] for i in views]
    embeds = torch.cat([model.subject_embeddings([held_out.image(held_out.targets[i])], classes[i]) for i in views])
    index = [i for i in views for _ in range(per_view)]
    seeds = [cfg.seed + j for _ in views for j in range(per_view)]
    targets = [classes[i] for i in index]

    def names(images: np.ndarray) -> list[str]:
        return list(classify(list(images)))

    named = names(draw_batched(model, embeds[index], [""] * len(index), targets, seeds, cfg, size))
    # the same text and seeds without the subject ("a [class]" as the prompt builder writes it):
    # one image per (class, seed), shared by the class's views
    pairs = sorted(set(zip(targets, seeds)))
    shared = names(draw_batched(model, None, [model.build_prompt("", t) for t, _ in pairs], [t for t, _ in pairs],
                                [seed for _, seed in pairs], cfg, size))
    by_pair = dict(zip(pairs, shared))
    text_only = [by_pair[key] for key in zip(targets, seeds)]
    correct = sum(n == truth[i] for n, i in zip(named, index))
    text_correct = sum(n == truth[i] for n, i in zip(text_only, index))
    members = {c: sum(v == c for v in subject_classes.values()) for c in set(subject_classes.values())}
    class_chances = [1.0 / max(members.get(subject_classes.get(truth[i], ""), 1), 1) for i in index]
    metrics = chance_metrics("gen", correct, len(index), 1.0 / len(subject_classes))
    metrics.update({
        "gen_class_chance": float(np.mean(class_chances)) if class_chances else 0.0,
        "gen_class_p_value": at_least(correct, class_chances) if class_chances else 1.0,
        "gen_text_only_accuracy": text_correct / len(index) if index else 0.0,
    })
    return metrics

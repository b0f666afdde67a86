"""The tiny preset's base model, trained here: the miniature of what BLIP-Diffusion starts
from (Stable Diffusion's VAE, UNet and CLIP text encoder, BLIP-2's image encoder).

Three parts, each on the ingested train split, seeded, on a CPU in minutes:

- `train_autoencoder`: the VAE, reconstruction (per-pixel MSE) plus `kl_weight` times the
  per-element KL, then `calibrate_latents`: the per-channel latent mean folded into the
  VAE's biases (exactly: the decoder sees the same latents) and the scaling factor set to
  give unit-variance latents, as SD's 0.18215 does for its VAE.
- `train_image_encoder`: the Q-Former's ViT, CLIP-style (symmetric InfoNCE against the
  text encoder's end-of-text feature; both projections thrown away afterwards), so that the
  frozen image encoder of stages 1 and 2 sees colour and shape as BLIP-2's EVA-CLIP does.
- `train_prior`: the UNet and the text encoder, the denoising loss on (image, caption)
  with `caption_drop` empty captions, so the base draws "a red star-shaped toy with dots on
  a striped background" before stage 2 ever runs (SD's text-to-image pre-training).

Every step's batch, crops and noise come from a generator seeded by (seed, part, step).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.core.config import BaseConfig
from components.core.errors import BlipDiffError
from components.core.paths import SUBJECTS_MANIFEST
from components.data.backgrounds import with_scene
from components.data.images import read_rgb
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest
from components.model.conditioning import encode_text, prompt_ids

log = logging.getLogger(__name__)

PART_AUTOENCODER, PART_IMAGE_ENCODER, PART_PRIOR, PART_LATENT_POOL = 1, 2, 3, 4


@dataclass
class BaseData:
    """Images (N, 3, S, S) in [-1, 1] at the source size, their captions and subject indices."""

    pixels: torch.Tensor
    captions: list[str]
    labels: np.ndarray
    subjects: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def from_arrays(cls, images: list[np.ndarray], captions: list[str], subject_ids: list[str],
                    subjects: list[str]) -> "BaseData":
        pixels = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        index = {s: i for i, s in enumerate(subjects)}
        return cls(pixels, list(captions), np.array([index[s] for s in subject_ids]), list(subjects))


def read_data(root: Path) -> tuple[BaseData, BaseData]:
    """The ingested train split and held-out views: images, captions, subjects (the tiny
    base's and ControlNet's training data)."""
    frame = read_manifest(root / SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    if frame.empty:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: no subjects (run `dvc repro ingest`)")
    if frame["caption"].isna().any():
        missing = sorted(frame.loc[frame["caption"].isna(), "subject_id"].unique())
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: the tiny base's prior needs a caption for every image; "
                            f"none for {', '.join(missing[:5])}")
    subjects = sorted(frame["subject_id"].unique())
    sizes = {(int(w), int(h)) for w, h in zip(frame["width"], frame["height"])}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise BlipDiffError(f"{SUBJECTS_MANIFEST}: the tiny base trains on square images of one size, got {sorted(sizes)[:4]}")

    def part(rows) -> BaseData:
        captions = [with_scene(c, s) for c, s in zip(rows["caption"], rows["scene"])]
        return BaseData.from_arrays([read_rgb(root / p) for p in rows["image_path"]], captions,
                                    list(rows["subject_id"]), subjects)

    train, held = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    if held.empty:
        raise BlipDiffError("base: no held-out views to measure on (set ingest.test_views_per_subject >= 1)")
    return part(train), part(held)


def uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [-1, 1] -> (N, S, S, 3) uint8."""
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _generator(seed: int, part: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, part, step]).generate_state(1)[0]))


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Area-faithful downsizing (bicubic with antialiasing), as `BlipDiffusion.vae_pixels` does."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def augmented_batch(data: BaseData, rows: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """The rows' images, each randomly flipped and cropped to 70-100 % of its side (square),
    resized to `size`."""
    out = []
    side = data.pixels.shape[-1]
    for row in rows.tolist():
        crop = int(round(side * (0.7 + 0.3 * torch.rand((), generator=gen).item())))
        y, x = (torch.randint(0, side - crop + 1, (2,), generator=gen)).tolist()
        image = data.pixels[row:row + 1, :, y:y + crop, x:x + crop]
        if torch.rand((), generator=gen).item() < 0.5:
            image = image.flip(-1)
        out.append(resize(image, size))
    return torch.cat(out)


def _rows(count: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, count, (batch,), generator=gen)


def _cosine(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(parameters: list, steps: int, lr: float, warmup: int, loss_fn, name: str) -> dict:
    """AdamW with warmup + cosine, gradient norm 1; the losses and seconds."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = _cosine(optimizer, warmup, steps)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("training %s: step %d/%d, loss %.4f", name, step + 1, steps, np.mean(losses[-20:]))
    seconds = time.perf_counter() - start
    tail = losses[-max(1, steps // 20):] if losses else [float("nan")]
    return {f"{name}_loss_first": losses[0] if losses else float("nan"), f"{name}_loss_last": float(np.mean(tail)),
            f"seconds_{name}": seconds, f"{name}_steps": steps}


# ------------------------------------------------------------------- autoencoder
def train_autoencoder(vae, data: BaseData, cfg: BaseConfig) -> dict:
    part = cfg.autoencoder
    vae.train().requires_grad_(True)

    def loss_fn(step: int) -> torch.Tensor:
        gen = _generator(cfg.seed, PART_AUTOENCODER, step)
        x = augmented_batch(data, _rows(len(data), cfg.batch_size, gen), cfg.resolution, gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean()
        return F.mse_loss(recon, x) + part.kl_weight * kl

    metrics = _fit(list(vae.parameters()), part.steps, part.learning_rate, 0, loss_fn, "autoencoder")
    vae.eval().requires_grad_(False)
    return metrics


@torch.no_grad()
def calibrate_latents(vae, data: BaseData, size: int) -> dict:
    """Zero-mean, unit-variance latents on the training images: the per-channel mean of the
    posterior's mean is folded into `quant_conv`'s bias (encoder side) and
    `post_quant_conv`'s bias (decoder side, so decode(z) is unchanged for the shifted z);
    the scaling factor is 1 / the remaining standard deviation."""
    channels = vae.config.latent_channels
    mean = torch.cat([vae.encode(resize(chunk, size)).latent_dist.mean for chunk in data.pixels.split(32)])
    shift = mean.mean(dim=(0, 2, 3))
    vae.quant_conv.bias[:channels] -= shift
    weight = vae.post_quant_conv.weight[:, :, 0, 0]
    vae.post_quant_conv.bias += weight @ shift
    std = float((mean - shift[None, :, None, None]).std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 6))
    return {"latent_shift_abs_max": float(shift.abs().max()), "latent_std": std,
            "scaling_factor": round(1.0 / std, 6)}


@torch.no_grad()
def reconstruction_metrics(vae, data: BaseData, size: int) -> tuple[dict, torch.Tensor]:
    """PSNR (dB, images in [0, 1]) and the mean absolute colour error (0-255 RGB units of the
    per-image mean colour) of decode(mode(encode(x))) on `data` at `size`; the reconstructions."""
    x = resize(data.pixels, size)
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(32)]).clamp(-1, 1)
    a, b = (x + 1) / 2, (recon + 1) / 2
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    colour = ((a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs() * 255).mean()
    return {"psnr_heldout": float((10 * torch.log10(1.0 / mse)).mean()),
            "colour_error_heldout": float(colour)}, recon


# ----------------------------------------------------------------- image encoder
def _text_features(text_encoder, tokenizer, captions: list[str], text_length: int) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=text_length,
                    return_tensors="pt").input_ids
    out = text_encoder(ids.to(text_encoder.device))
    return out.pooler_output


def train_image_encoder(qformer, text_encoder, tokenizer, image_processor, data: BaseData, cfg: BaseConfig) -> dict:
    """CLIP-style: one view per subject and step (the captions' subject parts differ), the
    ViT's class token and the text encoder's end-of-text feature projected to a shared
    space; symmetric cross-entropy at a fixed temperature."""
    part = cfg.image_encoder
    vision = qformer.visual_encoder
    width_v = vision.post_layernorm.normalized_shape[0]
    width_t = text_encoder.config.hidden_size
    torch.manual_seed(cfg.seed)
    heads = torch.nn.ModuleList([torch.nn.Linear(width_v, 64), torch.nn.Linear(width_t, 64)])
    vision.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    by_subject = [np.flatnonzero(data.labels == k) for k in range(len(data.subjects))]
    by_subject = [rows for rows in by_subject if len(rows)]
    size = image_processor.size

    def loss_fn(step: int) -> torch.Tensor:
        gen = _generator(cfg.seed, PART_IMAGE_ENCODER, step)
        rows = torch.tensor([int(r[torch.randint(0, len(r), (1,), generator=gen).item()]) for r in by_subject])
        pixels = (augmented_batch(data, rows, size, gen) + 1) / 2  # [0, 1], then the processor's normalisation
        pixels = (pixels - torch.tensor(image_processor.mean)[:, None, None]) / torch.tensor(image_processor.std)[:, None, None]
        image = F.normalize(heads[0](vision(pixels)[:, 0]), dim=-1)
        text = F.normalize(heads[1](_text_features(text_encoder, tokenizer, [data.captions[r] for r in rows.tolist()],
                                                   text_encoder.config.max_position_embeddings)), dim=-1)
        logits = image @ text.T / part.temperature
        target = torch.arange(len(rows))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    metrics = _fit(list(vision.parameters()) + list(text_encoder.parameters()) + list(heads.parameters()),
                   part.steps, part.learning_rate, min(20, part.steps // 10), loss_fn, "image_encoder")
    vision.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return metrics


@torch.no_grad()
def image_encoder_probe(vision, image_processor, train: BaseData, held: BaseData) -> float:
    """How well the image encoder's class token tells subjects apart: nearest subject
    centroid (cosine) of the training views' features, accuracy on the held-out views."""
    def features(data: BaseData) -> torch.Tensor:
        pixels = (resize(data.pixels, image_processor.size) + 1) / 2
        pixels = (pixels - torch.tensor(image_processor.mean)[:, None, None]) / torch.tensor(image_processor.std)[:, None, None]
        return F.normalize(vision(pixels)[:, 0], dim=-1)

    train_f, held_f = features(train), features(held)
    centroids = F.normalize(torch.stack([train_f[torch.from_numpy(train.labels == k)].mean(0)
                                         for k in range(len(train.subjects))]), dim=-1)
    guess = (held_f @ centroids.T).argmax(1).numpy()
    return float((guess == held.labels).mean())


# ------------------------------------------------------------------------- prior
@torch.no_grad()
def latent_pool(vae, data: BaseData, size: int, copies: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of `copies` augmented versions of every image, and each
    version's image row: encoded once, so a prior step samples latents without the encoder."""
    gen = _generator(seed, PART_LATENT_POOL, 0)
    rows = torch.arange(len(data)).repeat(copies)
    moments = []
    for chunk in rows.split(64):
        posterior = vae.encode(augmented_batch(data, chunk, size, gen)).latent_dist
        moments.append(torch.stack([posterior.mean, posterior.std], 1))
    return torch.cat(moments), rows


def train_prior(model, data: BaseData, cfg: BaseConfig) -> dict:
    """The UNet and the text encoder on the denoising loss (epsilon), latents sampled from
    the trained VAE's posterior of augmented images (`latent_pool`), timesteps uniform over
    the training schedule."""
    from diffusers import DDPMScheduler

    part = cfg.prior
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    num_query = model.qformer.config.num_query_tokens
    unet, text_encoder, vae = model.unet, model.text_encoder, model.vae
    moments, image_rows = latent_pool(vae, data, cfg.resolution, part.augmented_copies, cfg.seed)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    scale = vae.config.scaling_factor

    def loss_fn(step: int) -> torch.Tensor:
        gen = _generator(cfg.seed, PART_PRIOR, step)
        pick = _rows(len(moments), cfg.batch_size, gen)
        mean, std = moments[pick].unbind(1)
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scale
        drop = torch.rand(len(pick), generator=gen) < part.caption_drop
        captions = ["" if d else data.captions[r] for r, d in zip(image_rows[pick].tolist(), drop.tolist())]
        ids = prompt_ids(model.tokenizer, captions, model.text_length, num_query, [False] * len(captions))
        hidden = encode_text(text_encoder, ids, None, model.ctx_begin_pos)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(pick),), generator=gen)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        return F.mse_loss(pred, noise)

    metrics = _fit(list(unet.parameters()) + list(text_encoder.parameters()), part.steps, part.learning_rate,
                   part.warmup_steps, loss_fn, "prior")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return metrics

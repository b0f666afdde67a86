"""Subject fine-tuning (paper Sec. 3.3): a few dozen steps on one subject's reference images.

The subject embeddings of the reference images are averaged and kept as a trainable
parameter; the UNet is fine-tuned on the images' own denoising loss (the released code:
AdamW, lr 5e-6, batch 3, 40-120 steps). With `lora_rank > 0` only LoRA adapters on the
UNet's attention projections train (peft), so a fine-tuned subject costs megabytes
instead of a full UNet copy. The result is saved as a fine-tuned subject folder
(`components.model.finetuned`).

Every tensor a step makes is drawn from one CPU generator (the same numbers on any device)
and then moved to the model's device. Inside an MLflow run (`blipdiff finetune` opens one)
each step's loss is logged against the step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.core import tracking
from components.core.errors import BlipDiffError
from components.model import finetuned
from components.model.conditioning import encode_text, prompt_ids

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    steps: int = 40
    batch_size: int = 3
    learning_rate: float = 5e-6
    lora_rank: int = 0  # 0: fine-tune the whole UNet
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BlipDiffError(f"finetune: {name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise BlipDiffError(f"finetune: learning_rate must be > 0, got {self.learning_rate}")
        if self.lora_rank < 0:
            raise BlipDiffError(f"finetune: lora_rank must be >= 0, got {self.lora_rank}")


@dataclass
class FinetuneResult:
    subject_embeds: torch.Tensor
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def reference_latents(model, images: list[np.ndarray], generator: torch.Generator) -> torch.Tensor:
    """VAE latents (sampled, as the reference) of the reference images at the model's native size."""
    return model.encode_latents(images, model.native_size, generator)


def subject_prompt_ids(model, subject: str, num_query: int) -> torch.Tensor:
    """Token ids of the fine-tuning prompt "a {subject}" (room left for the subject embeddings)."""
    return prompt_ids(model.tokenizer, [model.build_prompt("", subject, 1.0, 1).strip()], model.text_length, num_query)


def denoising_loss(model, embeds, ids, noise_scheduler, clean, noise, timesteps) -> torch.Tensor:
    """Noise-prediction MSE of the UNet conditioned on the prompt with the subject embeddings
    (the tensors are moved to the model's device first)."""
    device = model.device
    clean, noise, timesteps = clean.to(device), noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    text = encode_text(model.text_encoder, ids, embeds, model.ctx_begin_pos)
    pred = model.unet(noisy.to(model.unet.dtype), timesteps,
                      encoder_hidden_states=text.expand(clean.shape[0], -1, -1)).sample
    return F.mse_loss(pred.float(), noise.float())


def finetune(model, images: list[np.ndarray], subject: str, cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune `model` in place on one subject; return its learned subject embeddings."""
    from diffusers import DDPMScheduler

    cfg.check()
    if not images:
        raise BlipDiffError("finetune: no reference image given")
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    latents = reference_latents(model, images, gen).float().to(model.device)
    embeds = torch.nn.Parameter(model.subject_embeddings(images, subject).detach().clone().float())

    for module in (model.qformer, model.text_encoder, model.vae):
        module.requires_grad_(False)
    unet = model.unet
    unet.requires_grad_(False)
    if cfg.lora_rank:
        finetuned.add_lora(unet, cfg.lora_rank)  # only the adapters require grad
    else:
        unet.requires_grad_(True)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params}, {"params": [embeds]}], lr=cfg.learning_rate)

    ids = subject_prompt_ids(model, subject, embeds.shape[1])
    result = FinetuneResult(subject_embeds=embeds)
    steps = noise_scheduler.config.num_train_timesteps
    device = model.device
    for step in range(cfg.steps):
        # drawn on the CPU generator (reproducible on any device), then moved to the model's
        pick = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen).to(device)
        clean = latents[pick]
        noise = torch.randn(clean.shape, generator=gen).to(device)
        t = torch.randint(0, steps, (cfg.batch_size,), generator=gen).to(device)
        loss = denoising_loss(model, embeds, ids, noise_scheduler, clean, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        tracking.log_step({"loss": result.losses[-1]}, step)
    unet.eval()
    result.seconds = time.perf_counter() - start
    log.info("fine-tuned %s: %d steps in %.1f s, loss %.4f -> %.4f", subject, cfg.steps, result.seconds,
             result.losses[0], result.losses[-1])
    return result


def summary(result: FinetuneResult) -> dict[str, float]:
    return {"seconds": round(result.seconds, 3), "loss_first": result.losses[0], "loss_last": result.losses[-1]}


def save(model, result: FinetuneResult, cfg: FinetuneConfig, subject: str, out: Path,
         base: dict | None = None) -> None:
    """Write the fine-tuned subject folder (`components.model.finetuned`); `base` is the model
    it started from (`finetuned.describe_base`, taken before fine-tuning)."""
    finetuned.save(model, out, result.subject_embeds, subject, asdict(cfg), summary(result), base)


def samples(model, result: FinetuneResult, subject: str, count: int, steps: int, seed: int = 0,
            size: int | None = None) -> dict[str, np.ndarray]:
    """`count` images of the fine-tuning prompt "a {subject}" from the fine-tuned model (uint8)."""
    if count < 1:
        return {}
    size = size or model.native_size
    images = model.generate(result.subject_embeds.detach(), [""] * count, subject,
                            [seed + i for i in range(count)], num_inference_steps=steps,
                            height=size, width=size, prompt_reps=1)
    return {f"sample_{i}": (image * 255).round().astype("uint8") for i, image in enumerate(images)}

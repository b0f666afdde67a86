"""BLIP-Diffusion: the model bundle and batched zero-shot generation.

The bundle is the released checkpoint's: qformer (subject encoder), text_encoder (context
CLIP text encoder), tokenizer, unet, vae, scheduler, image_processor, plus the Q-Former's
BERT tokenizer. Its folder layout is read and written by `components.model.layout`; the
presets that build or load it are in `components.model.presets`.

Generation follows the reference (diffusers' deprecated BlipDiffusionPipeline) step by
step, but batched: several prompts and several images per prompt go through the UNet in
one batch, and subject embeddings can be computed once and reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from components.core.errors import BlipDiffError
from components.model.processor import ImageProcessorConfig

log = logging.getLogger(__name__)

SCHEDULERS = ("pndm", "ddim", "dpmsolver++")


@dataclass
class BlipDiffusion:
    qformer: "BlipDiffusionQFormer"  # noqa: F821
    text_encoder: "ContextCLIPTextModel"  # noqa: F821
    tokenizer: object  # CLIPTokenizer
    qformer_tokenizer: object  # BertTokenizer
    unet: object  # UNet2DConditionModel
    vae: object  # AutoencoderKL
    scheduler: object  # PNDMScheduler (the released default)
    image_processor: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    ctx_begin_pos: int = 2

    # ---------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size the UNet was configured for (512 for the released model)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "BlipDiffusion":
        for module in (self.qformer, self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype)
            module.eval()
        return self

    # ---------------------------------------------------------------- subject
    @torch.inference_mode()
    def subject_embeddings(self, images: Sequence[Image.Image | np.ndarray], subject: str) -> torch.Tensor:
        """Embeddings of one subject from one or more reference images, averaged: (1, Q, D)."""
        if not images:
            raise BlipDiffError("subject_embeddings: no reference image given")
        pixels = self.image_processor(images).to(self.device, self.qformer.dtype)
        text = self.qformer_tokenizer([subject] * len(images), return_tensors="pt", padding=True)
        embeds = self.qformer(pixels, text.input_ids.to(self.device), text.attention_mask.to(self.device))
        return embeds.mean(dim=0, keepdim=True)

    # ---------------------------------------------------------------- latents
    @staticmethod
    def vae_pixels(image: np.ndarray, resolution: int) -> torch.Tensor:
        """The VAE's input for one RGB image: bicubic resize to `resolution`, scaled to [-1, 1]."""
        pil = Image.fromarray(image).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution of `vae_pixels` batches: (B, 2, C, h, w), mean and std
        (unscaled). A sample is mean + std * eps, times the VAE's scaling factor."""
        out = []
        for chunk in pixels.to(self.device, self.vae.dtype).split(32):
            dist = self.vae.encode(chunk).latent_dist
            out.append(torch.stack([dist.mean, dist.std], 1))
        return torch.cat(out)

    def latents_from_moments(self, moments: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents: the distribution's mode (eps None) or the sample mean + std * eps."""
        mean, std = moments.unbind(1)
        latents = mean if eps is None else mean + std * eps.to(mean.device, mean.dtype)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_latents(self, images: Sequence[np.ndarray], resolution: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of RGB images resized to `resolution`: the distribution's mode, or
        a sample from it when a generator is given."""
        pixels = torch.stack([self.vae_pixels(im, resolution) for im in images])
        moments = self.latent_moments(pixels)
        eps = None if generator is None else torch.randn(moments[:, 0].shape, generator=generator)
        return self.latents_from_moments(moments, eps)

    # ---------------------------------------------------------------- prompts
    @staticmethod
    def build_prompt(prompt: str, target_subject: str, prompt_strength: float = 1.0, prompt_reps: int = 1) -> str:
        """The reference's prompt: "a {subject} {prompt}" repeated (strength x reps) times.

        The one prompt builder of the project: training (stage 2, fine-tuning), the learning
        checks and generation all condition on its text, with the subject embeddings spliced
        in at `ctx_begin_pos` (2: after the start token and "a").
        """
        one = f"a {target_subject} {prompt.strip()}".strip()
        return ", ".join([one] * int(prompt_strength * prompt_reps))

    def prompt_ids(self, prompts: list[str], num_query: int) -> torch.Tensor:
        """Token ids (CPU) of built prompts, padded to the text length less `num_query` (the
        room the subject embeddings take; 0 for a prompt without them)."""
        max_len = self.text_encoder.config.max_position_embeddings - num_query
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len,
                              return_tensors="pt").input_ids

    def encode_prompt_ids(self, ids: torch.Tensor, subject_embeds: torch.Tensor) -> torch.Tensor:
        """Context text embeddings: prompt tokens with the subject embeddings (one per prompt,
        or one shared) spliced in at `ctx_begin_pos`."""
        embeds = subject_embeds.expand(len(ids), -1, -1) if len(subject_embeds) == 1 else subject_embeds
        return self.text_encoder(ids.to(self.device), ctx_embeddings=embeds,
                                 ctx_begin_pos=self.ctx_begin_pos).last_hidden_state

    def encode_prompts(self, prompts: list[str], subject_embeds: torch.Tensor) -> torch.Tensor:
        """Context text embeddings of built prompts (see `build_prompt`)."""
        return self.encode_prompt_ids(self.prompt_ids(prompts, subject_embeds.shape[1]), subject_embeds)

    def encode_negative(self, negative_prompt: str, count: int) -> torch.Tensor:
        """The unconditional branch: the negative prompt alone, without subject embeddings."""
        tokens = self.tokenizer([negative_prompt], padding="max_length", truncation=True,
                                max_length=self.text_encoder.config.max_position_embeddings,
                                return_tensors="pt")
        embeds = self.text_encoder(tokens.input_ids.to(self.device)).last_hidden_state
        return embeds.expand(count, -1, -1)

    def make_scheduler(self, name: str):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

        classes = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
        if name not in classes:
            raise BlipDiffError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
        # A fresh scheduler per call: multistep schedulers keep state between steps.
        return classes[name].from_config(self.scheduler.config, **extra)

    # ---------------------------------------------------------------- sampling
    @torch.inference_mode()
    def generate(
        self,
        subject_embeds: torch.Tensor,
        prompts: list[str],
        target_subject: str,
        seeds: list[int],
        negative_prompt: str = "",
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        height: int = 512,
        width: int = 512,
        scheduler: str = "pndm",
        prompt_strength: float = 1.0,
        prompt_reps: int = 20,
        progress: bool = False,
    ) -> np.ndarray:
        """One image per (prompt, seed) pair: `prompts` and `seeds` have equal length.

        All images go through the UNet in one batch (two with guidance). Returns float
        images in [0, 1], shape (N, H, W, 3).
        """
        if len(prompts) != len(seeds):
            raise BlipDiffError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if height % 8 or width % 8:
            raise BlipDiffError(f"height and width must be multiples of 8, got {height}x{width}")
        if num_inference_steps < 1:
            raise BlipDiffError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        sched = self.make_scheduler(scheduler)
        built = [self.build_prompt(p, target_subject, prompt_strength, prompt_reps) for p in prompts]
        cond = self.encode_prompts(built, subject_embeds.to(self.device, self.text_encoder.dtype))
        guided = guidance_scale > 1.0
        text = torch.cat([self.encode_negative(negative_prompt, len(built)), cond]) if guided else cond

        factor = self.vae_scale_factor
        shape = (1, self.unet.config.in_channels, height // factor, width // factor)
        # One generator per image: an image depends on its seed only, not on the batch.
        latents = torch.cat([
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
            for s in seeds
        ]).to(self.device, self.unet.dtype)
        latents = latents * sched.init_noise_sigma
        sched.set_timesteps(num_inference_steps, device=self.device)
        steps = sched.timesteps
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="denoise", unit="step")
        for t in steps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = sched.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=text.to(self.unet.dtype)).sample
            if guided:
                uncond, cond_noise = noise.chunk(2)
                noise = uncond + guidance_scale * (cond_noise - uncond)
            latents = sched.step(noise, t, latents).prev_sample
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()

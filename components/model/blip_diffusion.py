"""BLIP-Diffusion: the model bundle and batched zero-shot generation.

The bundle is the released checkpoint's: qformer (subject encoder), text_encoder (context
CLIP text encoder), tokenizer, unet, vae, scheduler, image_processor, plus the Q-Former's
BERT tokenizer. Its folder layout is read and written by `components.model.layout`; the
presets that build or load it are in `components.model.presets`.

Generation follows the reference (diffusers' deprecated BlipDiffusionPipeline) step by
step, but batched: several prompts and several images per prompt go through the UNet in
one batch, and subject embeddings can be computed once and reused.

`generate` is the project's one sampling loop, with or without ControlNets
(`components.model.controlnet`). The networks it calls are swappable (`Networks`): by default the bundle's own PyTorch modules (`TorchNetworks`); serving passes
ONNX Runtime sessions or TensorRT engines instead (`serving.backends`). Tokenization, the
scheduler, guidance, the seeded latents and the VAE scaling stay here, whatever runs the
networks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from components.core.errors import BlipDiffError, check_finite
from components.model.conditioning import encode_text, prompt_ids
from components.model.controlnet import Control
from components.model.controlnet import residuals as control_residuals
from components.model.processor import ImageProcessorConfig

log = logging.getLogger(__name__)

SCHEDULERS = ("pndm", "ddim", "dpmsolver++")


class Networks(Protocol):
    """The networks the sampler calls, as one backend runs them, and the sizes it needs
    from them. Tensors in and out are torch tensors on `device`; `dtype` is the latents'.

    - subject_embeds(pixel_values (B,3,S,S), input_ids (B,L), attention_mask (B,L)) -> (B,Q,D)
    - text(input_ids (B,T), subject_embeds (B,Q,D), has_subject (B,) bool) -> (B,T,D): a row
      with a subject was tokenized to T - Q ids (padded to T) and gets the subject embeddings
      spliced in at `ctx_begin_pos`; a row without is the plain text encoder over T ids.
    - unet(sample (B,C,h,w), timestep (the scheduler's 0-d tensor), hidden (B,T,D), residuals)
      -> noise; `residuals` (the ControlNets' summed (down list, mid), or None) are added to
      the UNet's down-block outputs and mid-block output
    - controlnet(k, sample, timestep, hidden, cond (B,3,H,W) in [0, 1]) -> (down list, mid):
      ControlNet k's residuals at scale 1 (`num_controlnets` of them)
    - vae_decode(latents (B,C,h,w), already divided by `scaling_factor`) -> images in [-1, 1]
    """

    device: torch.device
    dtype: torch.dtype
    text_length: int  # T: the text encoder's positions (77)
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    num_controlnets: int

    def subject_embeds(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor: ...

    def text(self, input_ids: torch.Tensor, subject_embeds: torch.Tensor, has_subject: torch.Tensor) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
             residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor: ...

    def controlnet(self, index: int, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
                   cond: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class TorchNetworks:
    """`Networks` on the bundle's own PyTorch modules, on their device and in their dtypes
    (the default of `generate` and `subject_embeddings`)."""

    def __init__(self, model: "BlipDiffusion"):
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.unet.dtype

    @property
    def text_length(self) -> int:
        return self.model.text_length

    @property
    def latent_channels(self) -> int:
        return int(self.model.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return self.model.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return self.model.vae.config.scaling_factor

    @property
    def num_controlnets(self) -> int:
        return len(self.model.controlnets)

    def subject_embeds(self, pixel_values, input_ids, attention_mask):
        return self.model.qformer(pixel_values.to(self.device, self.model.qformer.dtype), input_ids.to(self.device),
                                  attention_mask.to(self.device))

    def text(self, input_ids, subject_embeds, has_subject):
        return encode_text(self.model.text_encoder, input_ids, subject_embeds, self.model.ctx_begin_pos, has_subject)

    def unet(self, sample, timestep, hidden, residuals=None):
        extra = {}
        if residuals is not None:
            extra = {"down_block_additional_residuals": residuals[0], "mid_block_additional_residual": residuals[1]}
        return self.model.unet(sample, timestep, encoder_hidden_states=hidden.to(self.model.unet.dtype), **extra).sample

    def controlnet(self, index, sample, timestep, hidden, cond):
        net = self.model.controlnets[index]
        down, mid = net(sample, timestep, encoder_hidden_states=hidden.to(net.dtype),
                        controlnet_cond=cond.to(net.device, net.dtype), return_dict=False)
        return list(down), mid

    def vae_decode(self, latents):
        return self.model.vae.decode(latents).sample


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
    controlnets: list = field(default_factory=list)  # diffusers ControlNetModels (components.model.controlnet)

    # ---------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def text_length(self) -> int:
        """The text encoder's positions (77): prompt ids and subject embeddings together."""
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size the UNet was configured for (512 for the released model)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "BlipDiffusion":
        for module in (self.qformer, self.text_encoder, self.unet, self.vae, *self.controlnets):
            module.to(device=device, dtype=dtype)
            module.eval()
        return self

    # ---------------------------------------------------------------- subject
    @torch.inference_mode()
    def subject_embeddings(self, images: Sequence[Image.Image | np.ndarray], subject: str,
                           networks: Networks | None = None) -> torch.Tensor:
        """Embeddings of one subject from one or more reference images, averaged: (1, Q, D).
        `networks`: who runs the subject encoder (default: the bundle's Q-Former)."""
        if not images:
            raise BlipDiffError("subject_embeddings: no reference image given")
        nets = TorchNetworks(self) if networks is None else networks
        pixels = self.image_processor(images).to(nets.device)
        text = self.qformer_tokenizer([subject] * len(images), return_tensors="pt", padding=True)
        embeds = nets.subject_embeds(pixels, text.input_ids.to(nets.device), text.attention_mask.to(nets.device))
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
        checks and generation all condition on its text, tokenized and encoded by
        `components.model.conditioning` with the subject embeddings spliced in at
        `ctx_begin_pos` (2: after the start token and "a").
        """
        one = f"a {target_subject} {prompt.strip()}".strip()
        return ", ".join([one] * int(prompt_strength * prompt_reps))

    def make_scheduler(self, name: str):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

        classes = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
        if name not in classes:
            raise BlipDiffError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
        if name == "ddim" and "clip_sample" not in self.scheduler.config:
            # A PNDM config has no clip_sample, and DDIM's default (True) would clip the
            # predicted x0 to [-1, 1], which latents are not (the references' DDIM: False).
            extra["clip_sample"] = False
        # A fresh scheduler per call: multistep schedulers keep state between steps.
        return classes[name].from_config(self.scheduler.config, **extra)

    # ---------------------------------------------------------------- sampling
    @torch.inference_mode()
    def generate(
        self,
        subject_embeds: torch.Tensor | None,
        prompts: list[str],
        target_subject: str | list[str],
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
        networks: Networks | None = None,
        control: Control | None = None,
    ) -> np.ndarray:
        """One image per (prompt, seed) pair: `prompts` and `seeds` have equal length.

        `subject_embeds` is (1, Q, D), shared, or (N, Q, D), one per prompt; `target_subject`
        one class for all prompts or one per prompt. `subject_embeds` None: plain text-to-image
        (the base model's prior, as Stable Diffusion draws): each prompt is the whole text,
        `target_subject` and the prompt builder unused. All images go through the UNet in one
        batch (two with guidance). `networks` runs the networks (default: the bundle's
        PyTorch modules). `control`: condition images and scales for the networks' ControlNets
        (`components.model.controlnet.Control`), which then see the UNet's sample, timestep and
        text embeddings in both guidance branches. Returns float images in [0, 1], shape
        (N, H, W, 3).
        """
        if len(prompts) != len(seeds):
            raise BlipDiffError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        targets = [target_subject] * len(prompts) if isinstance(target_subject, str) else list(target_subject)
        if len(targets) != len(prompts):
            raise BlipDiffError(f"{len(prompts)} prompts but {len(targets)} target subjects")
        if height % 8 or width % 8:
            raise BlipDiffError(f"height and width must be multiples of 8, got {height}x{width}")
        if num_inference_steps < 1:
            raise BlipDiffError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        nets = TorchNetworks(self) if networks is None else networks
        if control is not None:
            control.check(len(prompts), nets.num_controlnets, height, width)
        sched = self.make_scheduler(scheduler)
        if subject_embeds is None:
            built = list(prompts)
        else:
            built = [self.build_prompt(p, t, prompt_strength, prompt_reps) for p, t in zip(prompts, targets)]
        guided = guidance_scale > 1.0
        text = self.text_conditioning(nets, subject_embeds, built, negative_prompt if guided else None)
        latents = self.initial_latents(nets, seeds, height, width) * sched.init_noise_sigma
        sched.set_timesteps(num_inference_steps, device=nets.device)
        residuals = None
        if control is not None:  # per ControlNet: condition images and scales for the UNet batch's rows
            copies = 2 if guided else 1
            cond = [img.to(nets.device, nets.dtype).expand(len(prompts), -1, -1, -1).repeat(copies, 1, 1, 1)
                    for img in control.images]
            scales = control.scale_rows(len(prompts)).repeat(1, copies)
            count = len(sched.timesteps)

            def residuals(i, model_input, t):
                if control.active(i, count):
                    return control_residuals(nets, cond, scales, model_input, t, text)
                return None
        latents = self.denoise(nets, sched, latents, text, guidance_scale, residuals=residuals, progress=progress)
        return self.decode(nets, latents)

    @staticmethod
    def denoise(nets: Networks, sched, latents: torch.Tensor, text: torch.Tensor, guidance_scale: float, *,
                residuals=None, unguided: int = 0, callback=None, progress: bool = False) -> torch.Tensor:
        """The sampling loop over `sched.timesteps` (set by the caller), shared by generation and
        editing (`components.model.editing`). `text` is (N, T, D), or (2N, T, D) with the
        negative branch first when `guidance_scale` > 1. `residuals(i, model_input, t)` gives
        the ControlNets' residuals of UNet call i (or None); the first `unguided` rows take their
        conditional prediction without guidance (editing's source rows on a real photo);
        `callback.begin(i)` runs before UNet call i and `latents = callback.end(i, latents)`
        after its scheduler step. Returns the final latents."""
        guided = guidance_scale > 1.0
        steps = sched.timesteps
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="denoise", unit="step")
        for i, t in enumerate(steps):
            if callback is not None:
                callback.begin(i)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = sched.scale_model_input(model_input, t)
            noise = nets.unet(model_input, t, text, None if residuals is None else residuals(i, model_input, t))
            if guided:
                uncond, cond_noise = noise.chunk(2)
                noise = uncond + guidance_scale * (cond_noise - uncond)
                if unguided:
                    noise[:unguided] = cond_noise[:unguided]
            latents = sched.step(noise, t, latents).prev_sample
            if callback is not None:
                latents = callback.end(i, latents)
        return latents

    @staticmethod
    def decode(nets: Networks, latents: torch.Tensor) -> np.ndarray:
        """Float images in [0, 1], (N, H, W, 3), of scaled latents. NaN or infinity in the
        latents or the decoded images (before they are clamped, which would hide it as black or
        white) raises NonFiniteError."""
        check_finite("the denoising loop (UNet)", latents)
        image = nets.vae_decode(latents / nets.scaling_factor)
        check_finite("the VAE decoder", image)
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()

    def text_conditioning(self, nets: Networks, subject_embeds: torch.Tensor | None, built: list[str],
                          negative_prompt: str | None, has_subject: Sequence[bool] | None = None) -> torch.Tensor:
        """The UNet's text input for built prompts: (N, T, D), or (2N, T, D) with the negative
        prompt's branch first (classifier-free guidance; encoded once, without subject
        embeddings, for all images). `subject_embeds` None: the prompts alone, no subject.
        `has_subject` (one flag per prompt; default: all when `subject_embeds` is given) marks
        the rows that get the subject embeddings (editing mixes rows with and without)."""
        count = len(built)
        flags = [subject_embeds is not None] * count if has_subject is None else [bool(h) for h in has_subject]
        if any(flags) and subject_embeds is None:
            raise BlipDiffError("text_conditioning: rows marked with a subject but no subject embeddings given")
        if subject_embeds is not None:
            num_query, hidden = subject_embeds.shape[1:]
            embeds = subject_embeds.to(nets.device)
            embeds = embeds.expand(count, -1, -1) if len(embeds) == 1 else embeds
        else:
            num_query, hidden = self.qformer.config.num_query_tokens, self.text_encoder.config.hidden_size
            embeds = torch.zeros(count, num_query, hidden, device=nets.device, dtype=nets.dtype)
        cond = nets.text(prompt_ids(self.tokenizer, built, nets.text_length, num_query, flags),
                         embeds, torch.tensor(flags, dtype=torch.bool))
        if negative_prompt is None:
            return cond
        negative = nets.text(prompt_ids(self.tokenizer, [negative_prompt], nets.text_length, num_query, [False]),
                             torch.zeros(1, num_query, hidden, device=nets.device, dtype=embeds.dtype),
                             torch.zeros(1, dtype=torch.bool))
        return torch.cat([negative.expand(count, -1, -1), cond])

    @staticmethod
    def initial_latents(nets: Networks, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Unit-variance starting latents, one CPU generator per image: an image depends on
        its seed only, not on the batch."""
        factor = nets.vae_scale_factor
        shape = (1, nets.latent_channels, height // factor, width // factor)
        latents = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)),
                                         dtype=torch.float32) for s in seeds])
        return latents.to(nets.device, nets.dtype)

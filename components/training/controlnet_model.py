"""The tiny preset's ControlNet, trained here: canny edges of the subject views -> the base
model's UNet, as ControlNet was trained for Stable Diffusion (Zhang et al. 2023: a trainable
copy of the UNet's encoder, zero convolutions, the frozen UNet, the denoising loss, half the
captions dropped so that the edges alone carry the structure).

The edge maps are made as `blipdiff generate --control-type canny` makes them
(`controlnet.condition_map` at `controlnet.canny_side` of the training size, then
`controlnet.control_pixels`), from the source images at their stored size, so what the
ControlNet learns from is what a user gives it. Every step's batch and noise come from a
generator seeded by (seed, step).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from components.core.config import ControlNetConfig
from components.model import controlnet as control
from components.model.conditioning import encode_text, prompt_ids
from components.model.tiny.controlnet import condition_channels
from components.training.base_model import BaseData, _fit, _generator, _rows, resize, uint8_images

PART_CONTROLNET = 5


def condition_images(data: BaseData, size: int, low: int, high: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The ControlNet's inputs for `data`'s images at output size `size`, (N, 3, size, size) in
    [0, 1], and the edge maps they were made from."""
    maps = [control.condition_map(image, "canny", low, high, control.canny_side(size, size))
            for image in uint8_images(data.pixels)]
    return control.control_pixels(maps, size, size), maps


def train_controlnet(model, data: BaseData, cfg: ControlNetConfig, size: int):
    """A ControlNet for `model`'s UNet (frozen, as its VAE and text encoder), trained on the
    denoising loss with the edge maps of `data`'s images; (the ControlNet, metrics)."""
    from diffusers import ControlNetModel, DDPMScheduler

    torch.manual_seed(cfg.seed)
    net = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=condition_channels(
        model.vae_scale_factor))
    conditions, _ = condition_images(data, size, cfg.canny_low, cfg.canny_high)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    num_query = model.qformer.config.num_query_tokens
    for module in (model.unet, model.text_encoder, model.vae):
        module.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = model.vae.encode(resize(data.pixels, size)).latent_dist
        mean, std = posterior.mean, posterior.std
        ids = prompt_ids(model.tokenizer, [*data.captions, ""], model.text_length, num_query, [False] * (len(data) + 1))
        text = encode_text(model.text_encoder, ids, None, model.ctx_begin_pos)  # the captions', then the empty one
    scale = model.vae.config.scaling_factor
    net.train()

    def loss_fn(step: int) -> torch.Tensor:
        gen = _generator(cfg.seed, PART_CONTROLNET, step)
        pick = _rows(len(data), cfg.batch_size, gen)
        latents = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen)) * scale
        drop = torch.rand(len(pick), generator=gen) < cfg.caption_drop
        hidden = torch.where(drop[:, None, None], text[-1:].expand(len(pick), -1, -1), text[pick])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(pick),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        down, mid = net(noisy, t, encoder_hidden_states=hidden, controlnet_cond=conditions[pick], return_dict=False)
        pred = model.unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        return F.mse_loss(pred, noise)

    with torch.enable_grad():
        metrics = _fit(list(net.parameters()), cfg.steps, cfg.learning_rate, cfg.warmup_steps, loss_fn, "controlnet")
    return net.eval().requires_grad_(False), metrics

"""A ControlNet for the tiny preset: diffusers' `ControlNetModel.from_unet` of the tiny UNet,
with a condition embedding that shrinks the condition image as much as the VAE does.

`from_unet` zero-initialises the layers that emit residuals (`controlnet_down_blocks`,
`controlnet_mid_block`) and the condition embedding's last conv, so a fresh ControlNet adds
exactly nothing. `perturb` re-draws them with seeded noise: tests and benchmarks need a
ControlNet that moves the image.
"""

from __future__ import annotations

import math

import torch


def condition_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The condition embedding's channels: one stride-2 stage per factor of 2 of the VAE."""
    stages = int(math.log2(vae_scale_factor))
    return tuple(8 * 2 ** i for i in range(stages + 1))


def zero_initialised(controlnet) -> list[torch.nn.Module]:
    return [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out]


@torch.no_grad()
def perturb(controlnet, seed: int = 0, std: float = 0.1, condition_std: float = 1.0):
    """Re-draw the zero-initialised layers: the residual convs at `std`, the condition
    embedding's last conv at `condition_std` (at 0.1 the condition's features would be ~7x
    smaller than the latents' and another condition image would barely matter)."""
    generator = torch.Generator().manual_seed(seed)
    out = controlnet.controlnet_cond_embedding.conv_out
    for module in zero_initialised(controlnet):
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (condition_std if module is out else std))
    return controlnet


def build_tiny_controlnet(model, seed: int = 0, std: float | None = 0.1):
    """A ControlNet fitting `model` (a BlipDiffusion bundle); `std` None keeps the zero layers."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=condition_channels(
        model.vae_scale_factor))
    return (net if std is None else perturb(net, seed, std)).eval()

"""The tiny preset's BLIP-Diffusion: every network from a small config with seeded random
weights, the same classes as the full-size model, so every code path runs offline on a CPU."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from components.model.blip_diffusion import BlipDiffusion
from components.model.processor import ImageProcessorConfig
from components.model.tiny.tokenizers import clip_tokenizer, tiny_bert_tokenizer


def build_tiny(seed: int = 0, image_size: int = 64) -> BlipDiffusion:
    """Every part from a small config with seeded random weights; tokenizers generated here."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import Blip2Config, CLIPTextConfig

    from components.model.qformer import BlipDiffusionQFormer
    from components.model.text_encoder import ContextCLIPTextModel

    hidden = 32
    tokenizer = clip_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        bert = tiny_bert_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    # BERT's init std 0.02 suits width 768 (about 1/sqrt(width)); at width 32 it would leave
    # every residual branch ~10x too small and the Q-Former's outputs nearly independent of
    # its inputs, so the tiny networks use 1/sqrt(width).
    init_std = round(hidden ** -0.5, 4)
    qformer = BlipDiffusionQFormer(Blip2Config(
        vision_config=dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-5),
        qformer_config=dict(vocab_size=len(bert), hidden_size=hidden, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, encoder_hidden_size=hidden,
                            cross_attention_frequency=1, max_position_embeddings=64, pad_token_id=0),
        num_query_tokens=16, initializer_range=init_std,
    ))
    text_encoder = ContextCLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        # Attention only at the lower resolution: full-resolution attention costs the most.
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=hidden,
        attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=image_size,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    _calibrate_latent_scale(vae, image_size, seed)
    return BlipDiffusion(qformer=qformer, text_encoder=text_encoder, tokenizer=tokenizer,
                         qformer_tokenizer=bert, unet=unet, vae=vae, scheduler=scheduler,
                         image_processor=ImageProcessorConfig(size=32, crop_size=32)).to("cpu")


@torch.no_grad()
def _calibrate_latent_scale(vae, image_size: int, seed: int) -> None:
    """Set the VAE's scaling factor so that latents have unit variance, as SD's 0.18215 does
    for its VAE, and its posterior's width to a trained VAE's. A random VAE's latents are far smaller: with SD's factor the diffusion
    target would drown in the noise and the UNet could ignore its conditioning."""
    from components.data.backgrounds import background_pool

    images = np.stack(background_pool(16, image_size, image_size, seed))
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    # A trained VAE's posterior is narrow (SD's: std about 1% of the latents' spread); a random
    # one's log-variance output is as wide as its mean's, so a latent sampled from it (as
    # training does, per step) would be mostly noise. Give it a constant narrow posterior.
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0.0
    vae.quant_conv.bias[channels:] = 2.0 * float(np.log(0.01 * std))

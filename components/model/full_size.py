"""The full-size architecture of the released checkpoint, as plain configs (no import of the
model stack at module level: scripts/golden reads them in the reference environment) and the
networks built from them."""

from __future__ import annotations

import torch


def full_size_configs() -> dict[str, dict]:
    """The released checkpoint's architecture: CLIP ViT-L/14 (23 layers) + BERT-base Q-Former
    with 16 queries, and Stable Diffusion v1.5's text encoder, UNet and VAE."""
    return {
        "qformer": dict(
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                               num_attention_heads=16, image_size=224, patch_size=14,
                               hidden_act="quick_gelu", layer_norm_eps=1e-5),
            qformer_config=dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12,
                                num_attention_heads=12, intermediate_size=3072,
                                cross_attention_frequency=1, encoder_hidden_size=1024,
                                max_position_embeddings=512),
            num_query_tokens=16,
        ),
        "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                             bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                     attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 512, 512), sample_size=512,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    }


def build_full_size(device: str = "meta") -> dict[str, torch.nn.Module]:
    """The full-size networks with random (or, on the meta device, no) weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Blip2Config, CLIPTextConfig

    from components.model.qformer import BlipDiffusionQFormer
    from components.model.text_encoder import ContextCLIPTextModel

    cfg = full_size_configs()
    with torch.device(device):
        return {
            "qformer": BlipDiffusionQFormer(Blip2Config(**cfg["qformer"])),
            "text_encoder": ContextCLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
        }

"""The tiny preset's CLIPSeg: a small config with seeded random weights (offline; its maps are
not meaningful, but every code path of context generation runs)."""

from __future__ import annotations

import torch

from components.model.tiny.tokenizers import clip_tokenizer

IMAGE_SIZE = 64


def build_clipseg(seed: int):
    """A small CLIPSeg (about 0.1M parameters) with seeded random weights, and its processor."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
    )
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = clip_tokenizer()
    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=32, extract_layers=[0, 1], reduce_dim=16,
        decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(
        do_resize=True, size=size, do_center_crop=False, crop_size=size,
    )
    return model, CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)

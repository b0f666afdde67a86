"""CLIPSeg: the class text prompts a probability map of where the subject is.

Presets: `tiny` builds a small CLIPSeg from a config with seeded random weights (offline;
its maps are not meaningful, but every code path runs); the full presets load
CIDAS/clipseg-rd64-refined, the model the paper's context generation used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.device import resolve_device
from components.errors import BlipDiffError

log = logging.getLogger(__name__)

HUB_ID = "CIDAS/clipseg-rd64-refined"
PRESET_MODELS = {"tiny": None, "blipdiffusion": HUB_ID, "sd15-blip2": HUB_ID}
TINY_IMAGE_SIZE = 64


def build_tiny(seed: int):
    """A small CLIPSeg (about 0.1M parameters) with seeded random weights, and its processor."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    from components.tiny import clip_tokenizer

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
            image_size=TINY_IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=32, extract_layers=[0, 1], reduce_dim=16,
        decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config)
    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(
        do_resize=True, size=size, do_center_crop=False, crop_size=size,
    )
    return model, CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_pretrained(name_or_path: str):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source)
        processor = CLIPSegProcessor.from_pretrained(source)
    except OSError as exc:
        raise BlipDiffError(
            f"CLIPSeg {name_or_path!r} could not be loaded ({exc.__class__.__name__}): a local "
            "directory must hold a save_pretrained folder; a hub id needs network or the HF cache"
        ) from None
    return model, processor


class ClipSeg:
    """Probability maps at image resolution for (image, class text) pairs, batched."""

    def __init__(self, preset: str, name_or_path: str | None, seed: int, device: str = "auto"):
        name = name_or_path or PRESET_MODELS[preset]
        self.name = name or "tiny (random weights)"
        self.device = resolve_device(device)
        model, self.processor = build_tiny(seed) if name is None else load_pretrained(name)
        self.model = model.to(self.device).eval()
        log.info("CLIPSeg: %s on %s", self.name, self.device)

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], texts: list[str]) -> list[np.ndarray]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        logits = self.model(**inputs.to(self.device)).logits
        if logits.ndim == 2:  # a batch of one comes back squeezed
            logits = logits[None]
        probs = torch.sigmoid(logits.float())[:, None]
        maps = []
        for prob, image in zip(probs, images):
            h, w = image.shape[:2]
            up = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)
            maps.append(up[0, 0].cpu().numpy())
        return maps

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

from components.core.errors import BlipDiffError
from components.model.device import resolve_device
from components.model.tiny import clipseg as tiny_clipseg

log = logging.getLogger(__name__)

HUB_ID = "CIDAS/clipseg-rd64-refined"
PRESET_MODELS = {"tiny": None, "blipdiffusion": HUB_ID, "sd15-blip2": HUB_ID}


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
        # Random weights: the maps' scale means nothing (context.normalize_probs: auto rescales them).
        self.random_weights = name is None
        self.device = resolve_device(device)
        model, self.processor = tiny_clipseg.build_clipseg(seed) if name is None else load_pretrained(name)
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

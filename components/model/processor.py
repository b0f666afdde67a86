"""The subject encoder's image preprocessing: the reference BlipImageProcessor's transform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessorConfig:
    """The reference BlipImageProcessor's settings: resize (bicubic), centre crop, normalise."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def to_json(self) -> dict:
        return {
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
            "do_rescale": True, "do_resize": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "image_mean": list(self.mean), "image_std": list(self.std),
            "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
            "resample": 3, "rescale_factor": 1 / 255, "size": {"height": self.size, "width": self.size},
        }

    @classmethod
    def from_json(cls, data: dict) -> "ImageProcessorConfig":
        size = data.get("size", {"height": 224})
        crop = data.get("crop_size", size) if data.get("do_center_crop", True) else size
        return cls(size=int(size["height"]), crop_size=int(crop["height"]),
                   mean=tuple(data.get("image_mean", CLIP_MEAN)), std=tuple(data.get("image_std", CLIP_STD)))

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        batch = []
        for image in images:
            pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
            pil = pil.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
            off = (self.size - self.crop_size) // 2
            pil = pil.crop((off, off, off + self.crop_size, off + self.crop_size))
            arr = np.asarray(pil, dtype=np.float32) / 255.0
            arr = (arr - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
            batch.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
        return torch.stack(batch)

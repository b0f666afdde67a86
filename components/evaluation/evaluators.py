"""The evaluation networks: DINO ViT-S/16 (DINO score) and CLIP ViT-B/32 (CLIP-I, CLIP-T).

As in the DreamBooth paper (Sec. 4.1): the DINO feature is the CLS token of ViT-S/16's last
hidden state, after DINO's own evaluation transform (torchvision's `Resize(256, BICUBIC)`,
`CenterCrop(224)`, `ToTensor`, ImageNet `Normalize`, re-implemented here with PIL, pinned by
a golden fixture made with torchvision); CLIP's are the projected image and text embeddings,
preprocessed by the checkpoint's own image processor and tokenizer (77 tokens).

The `tiny` evaluators are small configs with seeded random weights: every code path runs
offline, but their scores are not the paper's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.core.errors import BlipDiffError
from components.model.device import resolve_device
from components.model.processor import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

DINO_HUB = "facebook/dino-vits16"
CLIP_HUB = "openai/clip-vit-base-patch32"
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)
DINO_RESIZE = 256
DINO_CROP = 224
TEXT_MAX_LENGTH = 77

ImageLike = Image.Image | np.ndarray


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    return image.convert("RGB")


def dino_resize_crop(image: ImageLike) -> Image.Image:
    """torchvision's `Resize(256, BICUBIC)` then `CenterCrop(224)` on a PIL image, step by step:
    the short side to 256, the long side to `int(256 * long / short)`, PIL's bicubic resize
    (no `reducing_gap`, skipped when the size already matches); crop offsets `int(round(d / 2))`."""
    pil = _to_pil(image)
    w, h = pil.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = DINO_RESIZE, int(DINO_RESIZE * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    top = int(round((size[1] - DINO_CROP) / 2.0))
    left = int(round((size[0] - DINO_CROP) / 2.0))
    return pil.crop((left, top, left + DINO_CROP, top + DINO_CROP))


def dino_transform(image: ImageLike) -> torch.Tensor:
    """DINO's evaluation transform: (3, 224, 224) float32, the float32 operations of
    torchvision's `ToTensor` and `Normalize` in their order (/ 255, - mean, / std)."""
    pixels = np.ascontiguousarray(np.asarray(dino_resize_crop(image), dtype=np.uint8).transpose(2, 0, 1))
    mean = np.array(DINO_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(DINO_STD, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy((pixels.astype(np.float32) / np.float32(255) - mean) / std)


def tiny_dino(seed: int = 0):
    """A small ViT (patch 16 at 224 px, width 48, 2 layers) with seeded random weights."""
    from transformers import ViTConfig, ViTModel

    hidden = 48
    torch.manual_seed(seed)
    # The default init std 0.02 suits width 384+; at width 48 the residual branches would be
    # too small for the CLS token to depend on the image (as in the tiny preset: 1/sqrt(width)).
    config = ViTConfig(image_size=DINO_CROP, patch_size=16, hidden_size=hidden, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96, initializer_range=round(hidden ** -0.5, 4))
    return ViTModel(config, add_pooling_layer=False).eval()


def _clip_image_processor():
    """openai/clip-vit-base-patch32's preprocessing (also `CLIPImageProcessor`'s defaults):
    shortest edge to 224 (bicubic), centre crop 224, rescale 1/255, CLIP's mean and std. The
    PIL backend: transformers' original (slow) CLIPImageProcessor, and no torchvision needed."""
    from transformers.models.clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, resample=Image.Resampling.BICUBIC,
        do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )


def tiny_clip(seed: int = 0):
    """A small CLIP (ViT patch 32 at 224 px, width 32, 2 layers each side, projection 32) with
    seeded random weights, the offline character-level tokenizer and CLIP's image processor."""
    from transformers import CLIPConfig, CLIPModel

    from components.model.tiny.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer(TEXT_MAX_LENGTH)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TEXT_MAX_LENGTH,
            # eos != 2: CLIPTextModel pools at the first eos token (the padding is eos as well).
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=224, patch_size=32),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval(), tokenizer, _clip_image_processor()


def _source(name_or_path: str) -> str:
    local = Path(name_or_path).expanduser()
    return str(local) if local.exists() else name_or_path


def _load_error(kind: str, source: str, key: str, exc: Exception) -> BlipDiffError:
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    where = ("a local directory must hold a save_pretrained folder" if Path(source).expanduser().exists()
             else "a hub id needs network or the HF cache")
    return BlipDiffError(f"{kind} evaluator {source!r} could not be loaded ({exc.__class__.__name__}: "
                         f"{reason}); {where}: set {key} to a local directory")


def load_dino(source: str = DINO_HUB):
    """DINO's ViT from a hub id or a local folder, without the pooler (the CLS token is used)."""
    from transformers import ViTModel

    try:
        return ViTModel.from_pretrained(_source(source), add_pooling_layer=False).eval()
    except (OSError, ValueError) as exc:
        raise _load_error("DINO", source, "evaluate.dino_model", exc) from None


def load_clip(source: str = CLIP_HUB):
    """CLIP's model, tokenizer and image processor from a hub id or a local folder."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    path = _source(source)
    try:
        model = CLIPModel.from_pretrained(path).eval()
        tokenizer = CLIPTokenizer.from_pretrained(path)
        processor = CLIPImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise _load_error("CLIP", source, "evaluate.clip_model", exc) from None
    return model, tokenizer, processor


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Evaluators:
    """DINO and CLIP together; features are fp32, on the CPU, not normalised."""

    def __init__(self, dino, clip, names: tuple[str, str], device: str = "cpu", batch_size: int = 32):
        self.device = resolve_device(device)
        self.dino = dino.to(self.device, torch.float32).eval()
        model, self.tokenizer, self.processor = clip
        self.clip = model.to(self.device, torch.float32).eval()
        self.names = names
        self.batch_size = int(batch_size)

    @classmethod
    def build(cls, dino: str | None, clip: str | None, tiny: bool, seed: int = 0, device: str = "cpu",
              batch_size: int = 32) -> Evaluators:
        """The tiny evaluators (ids ignored), or the named ones (default: the paper's hub ids)."""
        if tiny:
            names = (f"tiny(seed={seed})", f"tiny(seed={seed})")
            evaluators = cls(tiny_dino(seed), tiny_clip(seed), names, device, batch_size)
        else:
            names = (dino or DINO_HUB, clip or CLIP_HUB)
            evaluators = cls(load_dino(names[0]), load_clip(names[1]), names, device, batch_size)
        log.info("evaluators: DINO %s, CLIP %s on %s", *names, evaluators.device)
        return evaluators

    def describe(self) -> dict:
        return {"dino_model": self.names[0], "clip_model": self.names[1],
                "dino_transform": "resize256-bicubic/centercrop224/imagenet",
                "clip_transform": "clip-image-processor", "text_max_length": TEXT_MAX_LENGTH,
                "dtype": "float32"}

    def _run(self, items: Sequence, encode, dim: int) -> torch.Tensor:
        with torch.inference_mode():
            feats = [encode(batch).float().cpu() for batch in _batches(items, self.batch_size)]
        return torch.cat(feats) if feats else torch.empty(0, dim)

    def dino_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(N, D): the CLS token of the last hidden state."""
        def encode(batch):
            pixels = torch.stack([dino_transform(image) for image in batch]).to(self.device)
            return self.dino(pixel_values=pixels).last_hidden_state[:, 0]
        return self._run(images, encode, self.dino.config.hidden_size)

    def clip_image_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(N, P): CLIP's projected image embeddings."""
        def encode(batch):
            pixels = self.processor(images=list(batch), return_tensors="pt").pixel_values
            return self.clip.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
        return self._run(images, encode, self.clip.config.projection_dim)

    def clip_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, P): CLIP's projected text embeddings; texts are truncated at 77 tokens."""
        def encode(batch):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, max_length=TEXT_MAX_LENGTH,
                                    return_tensors="pt").to(self.device)
            return self.clip.get_text_features(input_ids=tokens.input_ids,
                                               attention_mask=tokens.attention_mask).pooler_output
        return self._run(texts, encode, self.clip.config.projection_dim)

"""BLIP-Diffusion: the model bundle, its folder layout, presets and batched zero-shot generation.

The bundle is the released checkpoint's: qformer (subject encoder), text_encoder (context
CLIP text encoder), tokenizer, unet, vae, scheduler, image_processor, plus the Q-Former's
BERT tokenizer. `save_pretrained` writes the exact folder layout of
`Salesforce/blipdiffusion` (model_index.json naming the reference classes, so the
reference pipeline can read it too); `load` reads that layout with maintained classes.

Generation follows the reference (diffusers' deprecated BlipDiffusionPipeline) step by
step, but batched: several prompts and several images per prompt go through the UNet in
one batch, and subject embeddings can be computed once and reused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from components.errors import BlipDiffError

log = logging.getLogger(__name__)

HUB_ID = "Salesforce/blipdiffusion"
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BERT_TOKENIZER_ID = "bert-base-uncased"
FOLDERS = ("qformer", "text_encoder", "tokenizer", "unet", "vae", "scheduler", "image_processor")
SCHEDULERS = ("pndm", "ddim", "dpmsolver++")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# model_index.json as the released checkpoint writes it (reference class names).
MODEL_INDEX = {
    "_class_name": "BlipDiffusionPipeline",
    "_diffusers_version": "0.21.0",
    "ctx_begin_pos": 2,
    "image_processor": ["blip_diffusion", "BlipImageProcessor"],
    "mean": list(CLIP_MEAN),
    "qformer": ["blip_diffusion", "Blip2QFormerModel"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "std": list(CLIP_STD),
    "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


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

    # ---------------------------------------------------------------- placement
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size the UNet was configured for (512 for the released model)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "BlipDiffusion":
        for module in (self.qformer, self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype)
            module.eval()
        return self

    # ---------------------------------------------------------------- folders
    def save_pretrained(self, path: str | Path) -> None:
        """Write the released folder layout (safetensors weights)."""
        from components.io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            self.qformer.save_pretrained(tmp / "qformer", safe_serialization=True)
            self.qformer_tokenizer.save_pretrained(tmp / "qformer")
            self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / "image_processor").mkdir()
            (tmp / "image_processor" / "preprocessor_config.json").write_text(
                json.dumps(self.image_processor.to_json(), indent=2) + "\n")
            index = dict(MODEL_INDEX, ctx_begin_pos=self.ctx_begin_pos,
                         mean=list(self.image_processor.mean), std=list(self.image_processor.std))
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    # ---------------------------------------------------------------- subject
    @torch.inference_mode()
    def subject_embeddings(self, images: Sequence[Image.Image | np.ndarray], subject: str) -> torch.Tensor:
        """Embeddings of one subject from one or more reference images, averaged: (1, Q, D)."""
        if not images:
            raise BlipDiffError("subject_embeddings: no reference image given")
        pixels = self.image_processor(images).to(self.device, self.qformer.dtype)
        text = self.qformer_tokenizer([subject] * len(images), return_tensors="pt", padding=True)
        embeds = self.qformer(pixels, text.input_ids.to(self.device), text.attention_mask.to(self.device))
        return embeds.mean(dim=0, keepdim=True)

    # ---------------------------------------------------------------- prompts
    @staticmethod
    def build_prompt(prompt: str, target_subject: str, prompt_strength: float, prompt_reps: int) -> str:
        """The reference's prompt: "a {subject} {prompt}" repeated (strength x reps) times."""
        one = f"a {target_subject} {prompt.strip()}"
        return ", ".join([one] * int(prompt_strength * prompt_reps))

    def encode_prompts(self, prompts: list[str], subject_embeds: torch.Tensor) -> torch.Tensor:
        """Context text embeddings: prompt tokens with the subject embeddings spliced in."""
        max_len = self.text_encoder.config.max_position_embeddings - subject_embeds.shape[1]
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len,
                                return_tensors="pt")
        embeds = subject_embeds.expand(len(prompts), -1, -1)
        return self.text_encoder(tokens.input_ids.to(self.device), ctx_embeddings=embeds,
                                 ctx_begin_pos=self.ctx_begin_pos).last_hidden_state

    def encode_negative(self, negative_prompt: str, count: int) -> torch.Tensor:
        """The unconditional branch: the negative prompt alone, without subject embeddings."""
        tokens = self.tokenizer([negative_prompt], padding="max_length",
                                max_length=self.text_encoder.config.max_position_embeddings,
                                return_tensors="pt")
        embeds = self.text_encoder(tokens.input_ids.to(self.device)).last_hidden_state
        return embeds.expand(count, -1, -1)

    def make_scheduler(self, name: str):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

        classes = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
        if name not in classes:
            raise BlipDiffError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
        # A fresh scheduler per call: multistep schedulers keep state between steps.
        return classes[name].from_config(self.scheduler.config, **extra)

    # ---------------------------------------------------------------- sampling
    @torch.inference_mode()
    def generate(
        self,
        subject_embeds: torch.Tensor,
        prompts: list[str],
        target_subject: str,
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
    ) -> np.ndarray:
        """One image per (prompt, seed) pair: `prompts` and `seeds` have equal length.

        All images go through the UNet in one batch (two with guidance). Returns float
        images in [0, 1], shape (N, H, W, 3).
        """
        if len(prompts) != len(seeds):
            raise BlipDiffError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if height % 8 or width % 8:
            raise BlipDiffError(f"height and width must be multiples of 8, got {height}x{width}")
        if num_inference_steps < 1:
            raise BlipDiffError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        sched = self.make_scheduler(scheduler)
        built = [self.build_prompt(p, target_subject, prompt_strength, prompt_reps) for p in prompts]
        cond = self.encode_prompts(built, subject_embeds.to(self.device, self.text_encoder.dtype))
        guided = guidance_scale > 1.0
        text = torch.cat([self.encode_negative(negative_prompt, len(built)), cond]) if guided else cond

        factor = self.vae_scale_factor
        shape = (1, self.unet.config.in_channels, height // factor, width // factor)
        # One generator per image: an image depends on its seed only, not on the batch.
        latents = torch.cat([
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
            for s in seeds
        ]).to(self.device, self.unet.dtype)
        latents = latents * sched.init_noise_sigma
        sched.set_timesteps(num_inference_steps, device=self.device)
        steps = sched.timesteps
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="denoise", unit="step")
        for t in steps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = sched.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=text.to(self.unet.dtype)).sample
            if guided:
                uncond, cond_noise = noise.chunk(2)
                noise = uncond + guidance_scale * (cond_noise - uncond)
            latents = sched.step(noise, t, latents).prev_sample
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


# -------------------------------------------------------------------- loading
def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise BlipDiffError(f"{path}: checkpoint folder not found")
    missing = [f for f in ("model_index.json", *FOLDERS) if not (path / f).exists()]
    if missing:
        raise BlipDiffError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for sub in ("qformer", "text_encoder", "unet", "vae"):
        if not any((path / sub).glob("*.safetensors")) and not any((path / sub).glob("*.bin")):
            raise BlipDiffError(f"{path / sub}: no weights file (*.safetensors)")


def _load_qformer(folder: Path):
    from safetensors.torch import load_file
    from transformers import Blip2Config

    from components.qformer import BlipDiffusionQFormer, convert_reference_state_dict

    config = Blip2Config.from_pretrained(folder)
    with torch.device("meta"):
        model = BlipDiffusionQFormer(config)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    state = convert_reference_state_dict(state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise BlipDiffError(f"{folder}: weights do not fit the Q-Former (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})")
    return model.eval()


def _load_qformer_tokenizer(folder: Path):
    from transformers import BertTokenizer

    # Our folders carry the Q-Former's tokenizer; the released one uses bert-base-uncased.
    local = any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json"))
    source = str(folder) if local else BERT_TOKENIZER_ID
    tokenizer = BertTokenizer.from_pretrained(source, truncation_side="right")
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def load(path_or_id: str | Path) -> BlipDiffusion:
    """Load the released layout from a local folder, or a hub id (needs network or the HF cache)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from components.text_encoder import ContextCLIPTextModel

    path = Path(path_or_id).expanduser()
    if not path.exists() and "/" in str(path_or_id) and not str(path_or_id).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path_or_id)))
        except Exception as exc:  # offline, unknown id, ...
            raise BlipDiffError(f"{path_or_id}: not a local folder and not downloadable ({exc})") from None
    _check_folder(path)
    index = json.loads((path / "model_index.json").read_text())
    try:
        model = BlipDiffusion(
            qformer=_load_qformer(path / "qformer"),
            qformer_tokenizer=_load_qformer_tokenizer(path / "qformer"),
            text_encoder=ContextCLIPTextModel.from_pretrained(path / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(path / "unet"),
            vae=AutoencoderKL.from_pretrained(path / "vae"),
            scheduler=PNDMScheduler.from_pretrained(path / "scheduler"),
            image_processor=ImageProcessorConfig.from_json(
                # the pipeline's mean/std override the processor's, as in the reference
                {**json.loads((path / "image_processor" / "preprocessor_config.json").read_text()),
                 **{f"image_{k}": index[k] for k in ("mean", "std") if k in index}}),
            ctx_begin_pos=int(index.get("ctx_begin_pos", 2)),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise BlipDiffError(f"{path}: could not load the checkpoint: {exc}") from None
    return model.to("cpu")


# -------------------------------------------------------------------- tiny preset
def tiny_bert_tokenizer(folder: Path):
    """A small WordPiece vocabulary (letters, digits, common words) written to `folder`."""
    from transformers import BertTokenizer

    words = ("a an the of in on with and is dog cat toy ball vase box cup bottle lamp hat "
             "backpack teapot sneaker boot glasses candle clock can bowl plushie stuffed animal "
             "cartoon car robot red blue green yellow purple pink white black orange").split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *[f"##{c}" for c in letters], *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), truncation_side="right")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build_tiny(seed: int = 0, image_size: int = 64) -> BlipDiffusion:
    """Every part from a small config with seeded random weights; tokenizers generated here."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import Blip2Config, CLIPTextConfig

    from components.qformer import BlipDiffusionQFormer
    from components.text_encoder import ContextCLIPTextModel
    from components.tiny import clip_tokenizer

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
    for its VAE. A random VAE's latents are far smaller: with SD's factor the diffusion
    target would drown in the noise and the UNet could ignore its conditioning."""
    from components.backgrounds import background_pool

    images = np.stack(background_pool(16, image_size, image_size, seed))
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))


def from_preset(preset: str, checkpoint: str | None = None, seed: int = 0) -> BlipDiffusion:
    """`checkpoint` (a folder or hub id) wins; otherwise the preset's source."""
    if checkpoint:
        return load(checkpoint)
    if preset == "tiny":
        return build_tiny(seed)
    if preset == "blipdiffusion":
        return load(HUB_ID)
    if preset == "sd15-blip2":
        from components import sd15_blip2

        # Untrained subject encoder: the starting point of pre-training, not a generator yet.
        return sd15_blip2.build(seed=seed)
    raise BlipDiffError(f"unknown preset {preset!r}; choose tiny, blipdiffusion or sd15-blip2")


# -------------------------------------------------------------------- full size
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

    from components.qformer import BlipDiffusionQFormer
    from components.text_encoder import ContextCLIPTextModel

    cfg = full_size_configs()
    with torch.device(device):
        return {
            "qformer": BlipDiffusionQFormer(Blip2Config(**cfg["qformer"])),
            "text_encoder": ContextCLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
        }

"""Subject fine-tuning (paper Sec. 3.3): a few dozen steps on one subject's reference images.

The subject embeddings of the reference images are averaged and kept as a trainable
parameter; the UNet is fine-tuned on the images' own denoising loss (the released code:
AdamW, lr 5e-6, batch 3, 40-120 steps). With `lora_rank > 0` only LoRA adapters on the
UNet's attention projections train (peft), so a fine-tuned subject costs megabytes
instead of a full UNet copy.

Output folder: `subject_embeddings.safetensors` always; then either `unet/` (full
fine-tuning, diffusers layout) or `unet_lora.safetensors` + `lora_config.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.errors import BlipDiffError

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EMBEDDINGS_FILE = "subject_embeddings.safetensors"
LORA_FILE = "unet_lora.safetensors"
LORA_CONFIG = "lora_config.json"


@dataclass
class FinetuneConfig:
    steps: int = 40
    batch_size: int = 3
    learning_rate: float = 5e-6
    lora_rank: int = 0  # 0: fine-tune the whole UNet
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BlipDiffError(f"finetune: {name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise BlipDiffError(f"finetune: learning_rate must be > 0, got {self.learning_rate}")
        if self.lora_rank < 0:
            raise BlipDiffError(f"finetune: lora_rank must be >= 0, got {self.lora_rank}")


@dataclass
class FinetuneResult:
    subject_embeds: torch.Tensor
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def reference_latents(model, images: list[np.ndarray], generator: torch.Generator) -> torch.Tensor:
    """VAE latents (sampled, as the reference) of the reference images at the model's native size."""
    from components.train_subject import encode_latents

    return encode_latents(model, images, model.native_size, generator)


def prompt_ids(model, subject: str, num_query_tokens: int) -> torch.Tensor:
    """Token ids of the fine-tuning prompt "a {subject}" (room left for the subject embeddings)."""
    prompt = model.build_prompt("", subject, 1.0, 1).strip()
    max_len = model.text_encoder.config.max_position_embeddings - num_query_tokens
    return model.tokenizer([prompt], padding="max_length", truncation=True, max_length=max_len,
                           return_tensors="pt").input_ids.to(model.device)


def denoising_loss(model, embeds, ids, noise_scheduler, clean, noise, timesteps) -> torch.Tensor:
    """Noise-prediction MSE of the UNet conditioned on the prompt with the subject embeddings."""
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    text = model.text_encoder(ids, ctx_embeddings=embeds, ctx_begin_pos=model.ctx_begin_pos).last_hidden_state
    pred = model.unet(noisy.to(model.device), timesteps.to(model.device),
                      encoder_hidden_states=text.expand(clean.shape[0], -1, -1)).sample
    return F.mse_loss(pred.float(), noise.to(model.device))


def add_lora(unet, rank: int) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))


def finetune(model, images: list[np.ndarray], subject: str, cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune `model` in place on one subject; return its learned subject embeddings."""
    from diffusers import DDPMScheduler

    cfg.check()
    if not images:
        raise BlipDiffError("finetune: no reference image given")
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    latents = reference_latents(model, images, gen).float()
    embeds = torch.nn.Parameter(model.subject_embeddings(images, subject).detach().clone().float())

    for module in (model.qformer, model.text_encoder, model.vae):
        module.requires_grad_(False)
    unet = model.unet
    unet.requires_grad_(False)
    if cfg.lora_rank:
        add_lora(unet, cfg.lora_rank)  # only the adapters require grad
    else:
        unet.requires_grad_(True)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params}, {"params": [embeds]}], lr=cfg.learning_rate)

    ids = prompt_ids(model, subject, embeds.shape[1])
    result = FinetuneResult(subject_embeds=embeds)
    steps = noise_scheduler.config.num_train_timesteps
    for step in range(cfg.steps):
        pick = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        clean = latents[pick]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, steps, (cfg.batch_size,), generator=gen)
        loss = denoising_loss(model, embeds, ids, noise_scheduler, clean, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
    unet.eval()
    result.seconds = time.perf_counter() - start
    log.info("fine-tuned %s: %d steps in %.1f s, loss %.4f -> %.4f", subject, cfg.steps, result.seconds,
             result.losses[0], result.losses[-1])
    return result


def add_arguments(p) -> None:
    p.add_argument("--subject-image", nargs="+", type=Path, required=True, help="reference images")
    p.add_argument("--subject", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--checkpoint", help="a folder in the released layout, or a hub id")
    p.add_argument("--preset", choices=["tiny", "blipdiffusion", "sd15-blip2"],
                   help="model preset when no --checkpoint (default: params.yaml's, else tiny)")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    p.add_argument("--learning-rate", type=float, default=FinetuneConfig.learning_rate)
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters only (peft)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned subject")


def run(args) -> FinetuneResult:
    from components.blip_diffusion import from_preset
    from components.device import resolve_device
    from components.generate import params_preset, read_subject_images

    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         lora_rank=args.lora_rank, seed=args.seed)
    cfg.check()
    refs = read_subject_images(args.subject_image)
    model = from_preset(args.preset or params_preset(), args.checkpoint, args.seed).to(resolve_device(args.device))
    result = finetune(model, refs, args.subject, cfg)
    save(model, result, cfg, args.subject, args.out)
    log.info("wall time for subject %r: %.1f s (%d steps); saved to %s", args.subject, result.seconds,
             cfg.steps, args.out)
    return result


def save(model, result: FinetuneResult, cfg: FinetuneConfig, subject: str, out: Path) -> None:
    from safetensors.torch import save_file

    from components.generate import save_embeddings
    from components.io import atomic_path

    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_embeddings(tmp / EMBEDDINGS_FILE, result.subject_embeds,
                        {"source_subject": subject, "finetune": json.dumps(asdict(cfg))})
        if cfg.lora_rank:
            from peft.utils import get_peft_model_state_dict

            state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model.unet).items()}
            save_file(state, tmp / LORA_FILE)
            (tmp / LORA_CONFIG).write_text(json.dumps({"rank": cfg.lora_rank, "targets": LORA_TARGETS}) + "\n")
        else:
            model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "finetune.json").write_text(json.dumps(
            {**asdict(cfg), "subject": subject, "seconds": round(result.seconds, 3),
             "loss_first": result.losses[0], "loss_last": result.losses[-1]}, indent=2) + "\n")


def apply(model, folder: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Load a fine-tuned subject into `model` (UNet or LoRA); return its embeddings and their metadata."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from components.generate import load_embeddings

    if not (folder / EMBEDDINGS_FILE).is_file():
        raise BlipDiffError(f"{folder}: not a fine-tuned subject folder (no {EMBEDDINGS_FILE})")
    embeds, meta = load_embeddings(folder / EMBEDDINGS_FILE)
    if (folder / LORA_FILE).is_file():
        from peft.utils import set_peft_model_state_dict

        rank = json.loads((folder / LORA_CONFIG).read_text())["rank"]
        add_lora(model.unet, rank)
        result = set_peft_model_state_dict(model.unet, load_file(folder / LORA_FILE))
        if getattr(result, "unexpected_keys", None):
            raise BlipDiffError(f"{folder / LORA_FILE}: LoRA weights do not fit this UNet")
    elif (folder / "unet").is_dir():
        model.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(model.device, model.dtype).eval()
    else:
        raise BlipDiffError(f"{folder}: has neither unet/ nor {LORA_FILE}")
    return embeds, meta

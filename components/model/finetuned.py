"""A fine-tuned subject's folder (`blipdiff finetune --out DIR`): written after fine-tuning,
applied to a model before generation.

Layout: `subject_embeddings.safetensors` always; then either `unet/` (whole UNet,
diffusers layout) or `unet_lora.safetensors` + `lora_config.json` (LoRA adapters on the
UNet's attention projections, peft); `finetune.json` records the settings and the losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.model.embeddings import load_embeddings, save_embeddings

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EMBEDDINGS_FILE = "subject_embeddings.safetensors"
LORA_FILE = "unet_lora.safetensors"
LORA_CONFIG = "lora_config.json"
SETTINGS_FILE = "finetune.json"


def add_lora(unet, rank: int) -> None:
    """LoRA adapters of `rank` on the UNet's attention projections (only they require grad)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))


def save(model, out: Path, subject_embeds: torch.Tensor, subject: str, settings: dict, summary: dict) -> None:
    """Write the folder atomically. `settings` (with `lora_rank`) are the fine-tuning settings,
    `summary` what came out of it (seconds, losses)."""
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_embeddings(tmp / EMBEDDINGS_FILE, subject_embeds,
                        {"source_subject": subject, "finetune": json.dumps(settings)})
        if settings["lora_rank"]:
            from peft.utils import get_peft_model_state_dict

            state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model.unet).items()}
            save_file(state, tmp / LORA_FILE)
            (tmp / LORA_CONFIG).write_text(json.dumps({"rank": settings["lora_rank"], "targets": LORA_TARGETS}) + "\n")
        else:
            model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / SETTINGS_FILE).write_text(json.dumps({**settings, "subject": subject, **summary}, indent=2) + "\n")


def apply(model, folder: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Load a fine-tuned subject into `model` (UNet or LoRA); return its embeddings and their metadata."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

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

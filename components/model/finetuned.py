"""A fine-tuned subject's folder (`blipdiff finetune --out DIR`): written after fine-tuning,
applied to a model before generation.

Layout: `subject_embeddings.safetensors` always; then either `unet/` (whole UNet,
diffusers layout) or `pytorch_lora_weights.safetensors` (LoRA adapters on the UNet's
attention projections, peft). The LoRA file is written the way diffusers' own training
scripts write it (`StableDiffusionLoraLoaderMixin.save_lora_weights` of
`convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`, keys prefixed `unet.`,
the adapter's `LoraConfig` in the file's metadata), so diffusers loads it as it is:
`unet.load_lora_adapter(folder, prefix="unet")`, or a Stable Diffusion pipeline's
`load_lora_weights(folder)`. `finetune.json` records the settings, the losses and the base
model (below). Folders written before that (`unet_lora.safetensors` + `lora_config.json`,
no base) are still read.

The base: the folder stores only what fine-tuning changed, so it is applied to the model it
was fine-tuned from. `finetune.json`'s `base` names it (`preset` and `seed`, or
`checkpoint`: a local folder's absolute path or a hub id) and holds a sha256 of each part's
weights as built, before fine-tuning (`part_hashes`: every tensor of the part's state dict,
by name, with its dtype and shape). Applying checks the parts the folder relies on (all four
for LoRA, all but the UNet for a whole UNet) and refuses a model whose weights differ.
Hashing reads every weight once: milliseconds for the tiny preset, a few seconds for the
released model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from components.core.errors import BlipDiffError
from components.core.io import atomic_path, state_hash
from components.model.embeddings import load_embeddings, save_embeddings

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EMBEDDINGS_FILE = "subject_embeddings.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_PREFIX = "unet"  # the keys' prefix in that file, as a Stable Diffusion pipeline saves them
ADAPTER = "default"
LEGACY_LORA_FILE = "unet_lora.safetensors"  # folders written before the diffusers format
LEGACY_LORA_CONFIG = "lora_config.json"
SETTINGS_FILE = "finetune.json"
BASE_PARTS = ("qformer", "text_encoder", "unet", "vae")


def add_lora(unet, rank: int) -> None:
    """LoRA adapters of `rank` on the UNet's attention projections (only they require grad)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS), adapter_name=ADAPTER)


# ------------------------------------------------------------------------- base
def part_hashes(model, parts=BASE_PARTS) -> dict[str, str]:
    return {part: state_hash(getattr(model, part).state_dict()) for part in parts}


def describe_base(model, preset: str, checkpoint: str | None, seed: int = 0) -> dict:
    """What `model` was built from (as `from_preset(preset, checkpoint, seed)`), with its
    weights' hashes: call it before fine-tuning changes them."""
    if checkpoint:
        local = Path(checkpoint)
        source = {"checkpoint": str(local.resolve()) if local.exists() else str(checkpoint)}
    else:
        source = {"preset": preset, "seed": int(seed)}
    return {**source, "sha256": part_hashes(model)}


def base_source(base: dict) -> dict:
    """Only where a base comes from (no hashes): what `presets.from_base` needs."""
    return {k: base[k] for k in ("preset", "seed", "checkpoint") if k in base}


def base_name(base: dict) -> str:
    if base.get("checkpoint"):
        return f"checkpoint {base['checkpoint']}"
    return f"preset {base.get('preset')} (seed {base.get('seed', 0)})"


def read_settings(folder: Path) -> dict:
    path = folder / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_base(folder: Path) -> dict | None:
    """The base recorded in the folder; None for folders written before bases were recorded."""
    return read_settings(folder).get("base")


def _is_lora(folder: Path) -> bool:
    return (folder / LORA_FILE).is_file() or (folder / LEGACY_LORA_FILE).is_file()


def check_base(model, folder: Path, current: dict) -> None:
    """Refuse `model` (described by `current`, see `base_source`) when the weights the folder
    relies on differ from its recorded base's. Call it on the model as built, before it is
    moved to another dtype or the folder is applied."""
    recorded = read_base(folder)
    if not recorded or not recorded.get("sha256"):
        log.warning("%s records no base model: not checked that %s is the model it was fine-tuned from",
                    folder, base_name(current))
        return
    needed = [p for p in recorded["sha256"] if p in BASE_PARTS and (p != "unet" or _is_lora(folder))]
    got = part_hashes(model, needed)
    differ = [p for p in needed if got[p] != recorded["sha256"][p]]
    if differ:
        hint = ""
        if base_name(recorded) == base_name(current):
            hint = " (same name, other weights: another version of it?)"
        raise BlipDiffError(
            f"{folder} was fine-tuned from {base_name(recorded)}, but the model given is {base_name(current)}, "
            f"whose {', '.join(differ)} weights differ (sha256){hint}; generate with the base it was fine-tuned from")


# ------------------------------------------------------------------------- folder
def save(model, out: Path, subject_embeds: torch.Tensor, subject: str, settings: dict, summary: dict,
         base: dict | None = None) -> None:
    """Write the folder atomically. `settings` (with `lora_rank`) are the fine-tuning settings,
    `summary` what came out of it (seconds, losses), `base` the model it started from
    (`describe_base`)."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_embeddings(tmp / EMBEDDINGS_FILE, subject_embeds,
                        {"source_subject": subject, "finetune": json.dumps(settings)})
        if settings["lora_rank"]:
            save_lora(model.unet, tmp)
        else:
            model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        record = {**settings, "subject": subject, **summary}
        if base is not None:
            record["base"] = base
        (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def save_lora(unet, folder: Path) -> None:
    """The UNet's LoRA adapters as diffusers' training scripts save them (see the module doc)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    layers = {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=layers, weight_name=LORA_FILE, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict())


def apply(model, folder: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Load a fine-tuned subject into `model` (UNet or LoRA); return its embeddings and their metadata.
    (The base is checked by `check_base`, on the model as built.)"""
    from diffusers import UNet2DConditionModel

    if not (folder / EMBEDDINGS_FILE).is_file():
        raise BlipDiffError(f"{folder}: not a fine-tuned subject folder (no {EMBEDDINGS_FILE})")
    embeds, meta = load_embeddings(folder / EMBEDDINGS_FILE)
    if (folder / LORA_FILE).is_file():
        try:  # diffusers' own loader: the LoraConfig comes from the file's metadata
            model.unet.load_lora_adapter(str(folder), prefix=LORA_PREFIX, adapter_name=ADAPTER,
                                         weight_name=LORA_FILE, local_files_only=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise BlipDiffError(f"{folder / LORA_FILE}: LoRA weights do not fit this UNet ({exc})") from None
        if ADAPTER not in getattr(model.unet, "peft_config", {}):
            raise BlipDiffError(f"{folder / LORA_FILE}: no LoRA weights for the UNet (keys `{LORA_PREFIX}.*`)")
    elif (folder / LEGACY_LORA_FILE).is_file():
        _apply_legacy_lora(model.unet, folder)
    elif (folder / "unet").is_dir():
        model.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(model.device, model.dtype).eval()
    else:
        raise BlipDiffError(f"{folder}: has neither unet/ nor {LORA_FILE}")
    return embeds, meta


def _apply_legacy_lora(unet, folder: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    rank = json.loads((folder / LEGACY_LORA_CONFIG).read_text())["rank"]
    add_lora(unet, rank)
    result = set_peft_model_state_dict(unet, load_file(folder / LEGACY_LORA_FILE), adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise BlipDiffError(f"{folder / LEGACY_LORA_FILE}: LoRA weights do not fit this UNet")

"""The released folder layout of `Salesforce/blipdiffusion`: read and write it.

With a ControlNet, the layout is `Salesforce/blipdiffusion-controlnet`'s: a `controlnet/`
folder (a diffusers `ControlNetModel`) and its entry in model_index.json.

`save` writes the exact layout (model_index.json naming the reference classes, so the
reference pipeline can read it too; safetensors weights); `load` reads it with maintained
classes. The subject encoder's folder (`qformer/`) is also what stage `pretrain_qformer`
writes, so `load_qformer` reads one on its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from components.core.errors import BlipDiffError
from components.core.io import atomic_path
from components.core.paths import is_hub_id
from components.model.blip_diffusion import BlipDiffusion
from components.model.processor import CLIP_MEAN, CLIP_STD, ImageProcessorConfig

log = logging.getLogger(__name__)

BERT_TOKENIZER_ID = "bert-base-uncased"
FOLDERS = ("qformer", "text_encoder", "tokenizer", "unet", "vae", "scheduler", "image_processor")

CONTROLNET = "controlnet"  # Salesforce/blipdiffusion-controlnet's extra folder
CONTROLNET_PIPELINE = "BlipDiffusionControlNetPipeline"

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


# -------------------------------------------------------------------- writing
def save(model: BlipDiffusion, path: str | Path) -> None:
    """Write the released folder layout (safetensors weights), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        model.qformer.save_pretrained(tmp / "qformer", safe_serialization=True)
        model.qformer_tokenizer.save_pretrained(tmp / "qformer")
        model.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        for sub in ("unet", "vae"):  # diffusers records where a model was loaded from: not portable
            drop_load_path(tmp / sub / "config.json")
        model.scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "image_processor").mkdir()
        (tmp / "image_processor" / "preprocessor_config.json").write_text(
            json.dumps(model.image_processor.to_json(), indent=2) + "\n")
        index = dict(MODEL_INDEX, ctx_begin_pos=model.ctx_begin_pos,
                     mean=list(model.image_processor.mean), std=list(model.image_processor.std))
        if len(model.controlnets) > 1:
            raise BlipDiffError(f"{path}: the layout holds one ControlNet, the model has {len(model.controlnets)}")
        if model.controlnets:
            model.controlnets[0].save_pretrained(tmp / CONTROLNET, safe_serialization=True)
            drop_load_path(tmp / CONTROLNET / "config.json")
            index = dict(sorted({**index, "_class_name": CONTROLNET_PIPELINE,
                                 CONTROLNET: ["diffusers", "ControlNetModel"]}.items()))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def drop_load_path(config: Path) -> None:
    """Remove `_name_or_path` (the absolute folder a diffusers model was loaded from) from a
    saved config, so a folder saved from a loaded model is the same bytes on every machine."""
    values = json.loads(config.read_text())
    if values.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------- reading
def check_folder(path: Path) -> None:
    if not path.is_dir():
        raise BlipDiffError(f"{path}: checkpoint folder not found")
    missing = [f for f in ("model_index.json", *FOLDERS) if not (path / f).exists()]
    if missing:
        raise BlipDiffError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for sub in ("qformer", "text_encoder", "unet", "vae"):
        if not any((path / sub).glob("*.safetensors")) and not any((path / sub).glob("*.bin")):
            raise BlipDiffError(f"{path / sub}: no weights file (*.safetensors)")


def load_qformer(folder: Path):
    """The subject encoder of a `qformer/` folder (released keys converted)."""
    from safetensors.torch import load_file
    from transformers import Blip2Config

    from components.model.qformer import (
        BlipDiffusionQFormer,
        convert_reference_state_dict,
    )

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


TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hub_tokenizer(name: str, folder: Path) -> Path:
    """A hub tokenizer from the local cache, else downloaded; offline, one clear error at once
    (transformers would retry for minutes, then hand back a 5-token tokenizer that maps every
    subject word to [UNK])."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=TOKENIZER_FILES, local_files_only=True))
    except Exception:  # not in the cache
        pass
    where = (f"download it while online (`hf download {name} vocab.txt tokenizer_config.json`), put its "
             f"vocab.txt in {folder}, or set `tokenizer` in {folder / 'config.json'} to a local folder")
    if _hub_offline():
        raise BlipDiffError(f"{folder}: the Q-Former's tokenizer {name!r} is not in the local Hugging Face cache "
                            f"and HF_HUB_OFFLINE is set; {where}")
    try:  # one quick request: without network this fails in well under a second, with no retries
        HfApi().model_info(name, timeout=10)
        return Path(snapshot_download(name, allow_patterns=TOKENIZER_FILES))
    except Exception as exc:
        raise BlipDiffError(f"{folder}: the Q-Former's tokenizer {name!r} could not be fetched from the hub "
                            f"({type(exc).__name__}); {where}") from None


def qformer_tokenizer_source(folder: Path) -> Path:
    """Where a `qformer/` folder's tokenizer is, as the reference decides it, made explicit:
    the folder's own tokenizer files; else `qformer/config.json`'s `tokenizer` (a path
    relative to the checkpoint or to the folder, an absolute path, or a hub id); else
    bert-base-uncased, as the released checkpoint."""
    if any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        return folder
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = config.get("tokenizer") or BERT_TOKENIZER_ID
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [folder.parent / path, folder / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise BlipDiffError(f"{folder / 'config.json'}: tokenizer {name!r} not found (looked in "
                            f"{', '.join(str(c) for c in candidates)})")
    return _hub_tokenizer(name, folder)


def load_qformer_tokenizer(folder: Path, vocab_size: int | None = None):
    """The Q-Former's BERT tokenizer, with BLIP-2's [DEC] start token; refused when it has ids
    beyond the Q-Former's word embeddings (`vocab_size` rows). A table larger than the
    tokenizer loads, as the reference pipeline loads it (vocabularies padded to a multiple)."""
    from transformers import BertTokenizer

    source = qformer_tokenizer_source(folder)
    try:
        tokenizer = BertTokenizer.from_pretrained(str(source), truncation_side="right")
    except (OSError, ValueError) as exc:
        raise BlipDiffError(f"{source}: not a BERT tokenizer ({exc})") from None
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise BlipDiffError(f"{source}: the tokenizer has {len(tokenizer)} tokens ([DEC] included) but the "
                            f"Q-Former in {folder} has {vocab_size} word embeddings: ids past the table, not the "
                            "tokenizer it was trained with")
    return tokenizer


def load(path_or_id: str | Path) -> BlipDiffusion:
    """Load the released layout from a local folder, or a hub id (needs network or the HF cache)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from components.model.text_encoder import ContextCLIPTextModel

    path = Path(path_or_id).expanduser()
    if is_hub_id(str(path_or_id)):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path_or_id)))
        except Exception as exc:  # offline, unknown id, ...
            raise BlipDiffError(f"{path_or_id}: not a local folder and not downloadable ({exc})") from None
    check_folder(path)
    index = json.loads((path / "model_index.json").read_text())
    if CONTROLNET in index and not (path / CONTROLNET / "config.json").is_file():
        raise BlipDiffError(f"{path}: model_index.json names a ControlNet but {path / CONTROLNET} has none")
    try:
        qformer = load_qformer(path / "qformer")
        model = BlipDiffusion(
            qformer=qformer,
            qformer_tokenizer=load_qformer_tokenizer(path / "qformer", qformer.config.qformer_config.vocab_size),
            text_encoder=ContextCLIPTextModel.from_pretrained(path / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(path / "unet"),
            vae=AutoencoderKL.from_pretrained(path / "vae"),
            scheduler=PNDMScheduler.from_pretrained(path / "scheduler"),
            image_processor=ImageProcessorConfig.from_json(
                # the pipeline's mean/std override the processor's, as in the reference
                {**json.loads((path / "image_processor" / "preprocessor_config.json").read_text()),
                 # null (the reference's default) means the processor's own values
                 **{f"image_{k}": index[k] for k in ("mean", "std") if index.get(k) is not None}}),
            ctx_begin_pos=int(index.get("ctx_begin_pos", 2)),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise BlipDiffError(f"{path}: could not load the checkpoint: {exc}") from None
    if CONTROLNET in index:
        from components.model import controlnet

        net = controlnet.load_controlnet(path / CONTROLNET)
        controlnet.check_fit(net, model.unet, str(path / CONTROLNET), str(path), model.vae_scale_factor)
        model.controlnets.append(net)
    return model.to("cpu")


def load_pretrained_qformer(folder: Path, like):
    """A pre-trained Q-Former folder (stage `pretrain_qformer`'s output) and its tokenizer,
    checked to fit `like` (the preset's Q-Former)."""
    if not (folder / "config.json").is_file():
        raise BlipDiffError(f"{folder}: no pre-trained Q-Former here (run `dvc repro pretrain_qformer`, "
                            "or set train_subject.qformer: null to start from the preset's)")
    qformer = load_qformer(folder)
    mine, theirs = like.state_dict(), qformer.state_dict()
    wrong = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if wrong:
        raise BlipDiffError(f"{folder}: this Q-Former does not fit the preset's architecture "
                            f"({len(wrong)} tensors differ, e.g. {wrong[0]}); pre-train it with the same preset")
    return qformer, load_qformer_tokenizer(folder, qformer.config.qformer_config.vocab_size)

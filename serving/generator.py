"""One generator over three backends: `Generator.load(source, backend)`.

`source` is
- a model folder in the released layout (`models/blip_diffusion`, `layout.save`'s),
- an export folder (with export.json, `models/onnx`): ONNX Runtime and TensorRT run its
  graphs and take the tokenizers, scheduler and image processor config the export copied
  there, with no PyTorch weights loaded; PyTorch loads the model it was exported from,
- a registered model, `models:/blip-diffusion@champion` or `models:/blip-diffusion/3`
  (MLflow; its checkpoint restored as the registry's pyfunc restores it),
- a hub id (PyTorch).

`subject_embeddings` and `generate` are `BlipDiffusion`'s (same arguments, same meaning),
run with the backend's networks: the sampling loop is the model's, whatever the backend.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from components.core.errors import BlipDiffError
from components.core.paths import EXPORT_FILE
from components.model import sources
from components.model.blip_diffusion import BlipDiffusion, Networks
from serving.backends import BACKENDS, OrtNetworks, TorchNetworks, TrtNetworks, read_export

log = logging.getLogger(__name__)


def _exported_folder(export_dir: Path, source: str, marker: str = "") -> Path | None:
    """The local folder a source in export.json names (relative to the working directory or to
    a folder above the export, as the stage records it) holding `marker` (any folder without
    one), if there is one."""
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(p / path for p in export_dir.resolve().parents)]
    return next((c for c in candidates if ((c / marker).is_file() if marker else c.is_dir())), None)


def _torch_model_of_export(export_dir: Path, meta: dict) -> BlipDiffusion:
    """The model an export was made from, with the ControlNet it was exported with."""
    model = _torch_base_of_export(export_dir, meta)
    control = meta.get("controlnet") or {}
    if control.get("hash") is not None and not model.controlnets:  # added by export.controlnet
        from components.model import controlnet

        spec = str(control["source"])
        found = _exported_folder(export_dir, spec)  # a ControlNet folder or a checkpoint holding one; else a hub id
        controlnet.attach(model, [str(found) if found else spec], str(meta["model"]["source"]))
    return model


def _torch_base_of_export(export_dir: Path, meta: dict) -> BlipDiffusion:
    from components.model import layout, presets

    source = str((meta.get("model") or {}).get("source", ""))
    if source.startswith("preset "):
        return presets.from_preset(source.split(" ", 1)[1])
    folder = _exported_folder(export_dir, source, "model_index.json")
    if folder is not None:
        return layout.load(folder)
    if sources.is_hub_id(source):
        return layout.load(source)
    raise BlipDiffError(f"{export_dir}: the model it was exported from ({source!r}) is not here; give the model "
                        "folder, or use --backend onnxruntime / tensorrt with this export")


def serving_bundle(export_dir: Path, meta: dict) -> BlipDiffusion:
    """A bundle without networks for an export folder: the CLIP and Q-Former tokenizers,
    scheduler and image processor config the export copied (`files` in export.json)."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    from components.model import layout
    from components.model.processor import ImageProcessorConfig

    files = meta.get("files") or {}
    paths = {k: export_dir / files.get(k, d) for k, d in (
        ("tokenizer", "tokenizer"), ("qformer_tokenizer", "qformer_tokenizer"), ("scheduler", "scheduler"),
        ("image_processor", "image_processor/preprocessor_config.json"))}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise BlipDiffError(f"{export_dir}: incomplete export, missing {', '.join(missing)}; export again")
    try:
        return BlipDiffusion(
            qformer=None, text_encoder=None, unet=None, vae=None,  # the backend runs them
            tokenizer=CLIPTokenizer.from_pretrained(paths["tokenizer"]),
            qformer_tokenizer=layout.load_qformer_tokenizer(paths["qformer_tokenizer"]),
            scheduler=PNDMScheduler.from_pretrained(paths["scheduler"]),
            image_processor=ImageProcessorConfig.from_json(json.loads(paths["image_processor"].read_text())),
            ctx_begin_pos=int(meta.get("ctx_begin_pos", 2)),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise BlipDiffError(f"{export_dir}: could not read the export's tokenizers or scheduler: {exc}") from None


@dataclass
class Generator:
    model: BlipDiffusion  # the bundle: torch modules, or (ONNX Runtime, TensorRT) tokenizers and scheduler only
    networks: Networks
    backend: str
    provider: str  # what actually runs: "torch cpu float32", "CPUExecutionProvider", "TensorRT 10.x (...)"
    source: str
    model_hash: str
    native_size: int

    @classmethod
    def load(cls, source: str | Path, backend: str = "torch", device: str = "auto", dtype: str = "auto",
             providers: list[str] | None = None, engine_dir: Path | None = None, trt_profile: str | None = None,
             build_engines: bool = False) -> "Generator":
        """`device`/`dtype` place the PyTorch backend (auto: CUDA and fp16 when there is a GPU);
        for ONNX Runtime, `dtype` picks the graphs (auto: fp16 on CUDA, else fp32)."""
        if backend not in BACKENDS:
            raise BlipDiffError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "torch":
            with sources.resolve(source) as src:  # a registered model's download lives until the model is loaded
                return cls._load_torch(src, device, dtype)
        kind = sources.check(source, "model")
        if kind != "export":
            raise BlipDiffError(f"backend {backend} runs an export folder (with {EXPORT_FILE}, e.g. models/onnx), "
                                f"but {source} is a {'registered model' if kind == 'registry' else kind}: "
                                "export it first (`dvc repro export`), or use --backend torch")
        export_dir = Path(source).expanduser()
        meta = read_export(export_dir)
        if backend == "tensorrt":
            networks = TrtNetworks(export_dir, engine_dir, trt_profile, build=build_engines)
        else:
            if dtype not in ("auto", "fp32", "fp16"):
                raise BlipDiffError(f"backend onnxruntime: dtype {dtype!r}; choose auto, fp32 or fp16")
            networks = OrtNetworks(export_dir, providers, precision=dtype)
        model_hash = str((meta.get("model") or {}).get("hash", ""))
        native = int(meta.get("native_size") or 0)
        return cls(serving_bundle(export_dir, meta), networks, backend, networks.provider, str(source), model_hash,
                   native)

    @classmethod
    def _load_torch(cls, src: sources.Source, device: str, dtype: str) -> "Generator":
        from components.model import layout
        from components.model.device import placement

        dev, dt = placement(device, dtype)
        if src.kind == "export":
            meta = read_export(src.path)
            model, model_hash = _torch_model_of_export(src.path, meta), str(meta["model"]["hash"])
        else:
            model, model_hash = layout.load(src.load_from), src.hash
        model.to(dev, dt)
        return cls(model, TorchNetworks(model), "torch", f"torch {dev.type} {str(dt).replace('torch.', '')}",
                   src.describe(), model_hash, model.native_size)

    # ------------------------------------------------------------------ the model's API
    @property
    def num_query(self) -> int:
        nets = self.networks
        return int(getattr(nets, "num_query", 0) or self.model.qformer.config.num_query_tokens)

    @property
    def hidden(self) -> int:
        nets = self.networks
        return int(getattr(nets, "hidden", 0) or self.model.text_encoder.config.hidden_size)

    def subject_embeddings(self, images: Sequence[np.ndarray], class_name: str) -> torch.Tensor:
        """The subject embeddings of one subject's reference images (averaged): (1, Q, D), CPU fp32."""
        return self.model.subject_embeddings(images, class_name, networks=self.networks).float().cpu()

    def generate(self, subject_embeds: torch.Tensor, prompts: list[str], target_subject: str | list[str],
                 seeds: list[int], **kwargs: Any) -> np.ndarray:
        """`BlipDiffusion.generate` on this backend's networks: float images (N, H, W, 3) in [0, 1]."""
        return self.model.generate(subject_embeds, prompts, target_subject, seeds, networks=self.networks, **kwargs)

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, "provider": self.provider, "model": self.source,
                "model_hash": self.model_hash}

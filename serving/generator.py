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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from components.core.errors import BlipDiffError
from components.core.io import folder_hash
from components.core.paths import REGISTRY_PREFIX
from components.model.blip_diffusion import BlipDiffusion, Networks
from serving.backends import BACKENDS, EXPORT_FILE, OrtNetworks, TorchNetworks, TrtNetworks, read_export

log = logging.getLogger(__name__)



def source_kind(source: str | Path) -> str:
    """"registry", "export", "model" or "hub"; a clear error when it is none of them."""
    text = str(source)
    if text.startswith(REGISTRY_PREFIX):
        return "registry"
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / EXPORT_FILE).is_file():
            return "export"
        if (path / "model_index.json").is_file():
            return "model"
        raise BlipDiffError(f"{path}: neither a model folder (model_index.json) nor an export folder ({EXPORT_FILE})")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.parent.is_dir():
        return "hub"
    raise BlipDiffError(f"{source}: model not found (a model folder, an export folder, models:/NAME@ALIAS or "
                        "models:/NAME/VERSION)")


def load_registered(uri: str, keep: list) -> tuple[BlipDiffusion, str, str]:
    """The registered model, loaded as the registry's pyfunc loads it (its `load_context`:
    frozen parts rebuilt from the recorded base); (model, hash of the artifact, version)."""
    from mlflow.pyfunc import PythonModelContext

    from components.model.registry import BlipDiffusionPyfunc, registered_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="blipdiff-registry-")
    keep.append(tmp)
    checkpoint, version = registered_checkpoint(uri, Path(tmp.name))
    pyfunc = BlipDiffusionPyfunc()
    pyfunc.load_context(PythonModelContext(artifacts={"checkpoint": str(checkpoint)}, model_config=None))
    keep.append(pyfunc)  # it holds the restored folder's temporary directory
    return pyfunc.model, folder_hash(checkpoint), version


def _exported_model_folder(export_dir: Path, source: str) -> Path | None:
    """The local model folder export.json's `model.source` names (relative to the working
    directory or to a folder above the export, as the stage records it), if there is one."""
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(p / path for p in export_dir.resolve().parents)]
    return next((c for c in candidates if (c / "model_index.json").is_file()), None)


def _torch_model_of_export(export_dir: Path, meta: dict) -> BlipDiffusion:
    from components.model import layout, presets

    source = str((meta.get("model") or {}).get("source", ""))
    if source.startswith("preset "):
        return presets.from_preset(source.split(" ", 1)[1])
    folder = _exported_model_folder(export_dir, source)
    if folder is not None:
        return layout.load(folder)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return layout.load(source)  # a hub id
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
    _keep: list = field(default_factory=list, repr=False)  # temporary folders the model lives in

    @classmethod
    def load(cls, source: str | Path, backend: str = "torch", device: str = "auto", dtype: str = "auto",
             providers: list[str] | None = None, engine_dir: Path | None = None, trt_profile: str | None = None,
             build_engines: bool = False) -> "Generator":
        """`device`/`dtype` place the PyTorch backend (auto: CUDA and fp16 when there is a GPU);
        for ONNX Runtime, `dtype` picks the graphs (auto: fp16 on CUDA, else fp32)."""
        if backend not in BACKENDS:
            raise BlipDiffError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        kind = source_kind(source)
        if backend == "torch":
            return cls._load_torch(str(source), kind, device, dtype)
        if kind != "export":
            raise BlipDiffError(f"backend {backend} runs an export folder (with {EXPORT_FILE}, e.g. models/onnx), "
                                f"but {source} is a {'registered model' if kind == 'registry' else kind}: export it "
                                "first (`dvc repro export`), or use --backend torch")
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
    def _load_torch(cls, source: str, kind: str, device: str, dtype: str) -> "Generator":
        from components.model import layout
        from components.model.device import placement

        dev, dt = placement(device, dtype)
        keep: list = []
        if kind == "registry":
            model, model_hash, version = load_registered(source, keep)
            source = f"{source} ({version})"
        elif kind == "export":
            export_dir = Path(source).expanduser()
            meta = read_export(export_dir)
            model, model_hash = _torch_model_of_export(export_dir, meta), str(meta["model"]["hash"])
        elif kind == "model":
            model, model_hash = layout.load(source), folder_hash(Path(source).expanduser())
        else:
            model, model_hash = layout.load(source), source
        model.to(dev, dt)
        return cls(model, TorchNetworks(model), "torch", f"torch {dev.type} {str(dt).replace('torch.', '')}",
                   source, model_hash, model.native_size, keep)

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

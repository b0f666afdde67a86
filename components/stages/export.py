"""Stage `export`: the model as four ONNX graphs (six with a ControlNet), checked against PyTorch with ONNX Runtime;
TensorRT engines where a GPU and TensorRT are there.

Reads `export.model` (default `models/blip_diffusion`, train_subject's output; a hub id, or
null for the preset's model) and writes `models/onnx/`: subject_encoder, text_encoder,
unet and vae_decoder as `<name>.onnx` (weights in `<name>.onnx.data` past 2 GB) and, with
`export.fp16`, `<name>.fp16.onnx`; `export.json` (everything serving needs besides the
graphs: model source and hash, input/output names and dynamic axes, ctx_begin_pos, sizes,
scaling factor, scheduler config) and the tokenizers, scheduler and image processor config,
so an export folder serves on its own. With a ControlNet (the model folder's own
`controlnet/`, or `export.controlnet`), also `controlnet` and `unet_control`
(`components.export.graphs`). The gate: every fp32 graph within its tolerance of
PyTorch fp32 on seeded random inputs at another batch size (`components.export.parity`);
otherwise the stage fails naming the graph and writes nothing. `reports/export/parity.json`
has the numbers of every graph, fp16 ones included (reported, not gated).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from components.core import tracking
from components.core.config import ExportConfig, Params
from components.core.errors import BlipDiffError
from components.core.io import atomic_path, folder_hash, round_floats, write_json
from components.core.paths import ENGINES_DIR, EXPORT_DIR, EXPORT_FILE, EXPORT_REPORT_DIR
from components.export import graphs as export_graphs
from components.export import onnx_export, parity
from components.model import sources

log = logging.getLogger(__name__)

SECTIONS = ("preset", "export")
PARITY = EXPORT_REPORT_DIR / "parity.json"
MANIFEST = EXPORT_DIR / EXPORT_FILE
OUTPUTS = (EXPORT_DIR, PARITY)
# The export folder goes into the MLflow run up to this size; above, export.json only.
ARTIFACT_LIMIT_BYTES = 200 * 1024**2


def model_source(cfg: ExportConfig, preset: str, root: Path) -> tuple[str, str, Path | None]:
    """(what to load, its hash, the local folder if any): a folder hashes by its files, a hub
    id is its own key, null is the preset's model."""
    if cfg.model is None:
        return f"preset {preset}", f"preset:{preset}:seed0", None
    # named as configured (relative to the repository), so export.json stays the same bytes
    with sources.resolve(cfg.model, root, "export.model", kinds=("model", "hub"),
                         hint="run `dvc repro train_subject`, or name a model folder or hub id, or null for the "
                              "preset's model") as source:
        return source.spec, source.hash, source.path


def load_model(cfg: ExportConfig, preset: str, source: str, folder: Path | None):
    from components.model import layout, presets

    if cfg.model is None:
        return presets.from_preset(preset)
    return layout.load(folder or source)


# ------------------------------------------------------------------- TensorRT
def tensorrt_check(cfg: ExportConfig) -> str | None:
    """Before any work: `on` without CUDA or TensorRT fails at once; returns the skip reason."""
    from components.export import tensorrt

    if cfg.tensorrt == "off":
        return "export.tensorrt is off"
    available, reason = tensorrt.tensorrt_status()
    if not available and cfg.tensorrt == "on":
        raise BlipDiffError(f"export.tensorrt: on, but TensorRT engines cannot be built here: {reason}. "
                            "Set export.tensorrt to auto (skip without a GPU) or off")
    return None if available else reason


def tensorrt_engines(cfg: ExportConfig, export_dir: Path, engines_dir: Path, reason: str | None) -> dict:
    """Engines from the written fp16 graphs, in `models/tensorrt/` (per GPU and TensorRT
    version, so not a DVC output); an engine whose sidecar still matches is reused."""
    if reason:
        if cfg.tensorrt != "off":
            log.info("TensorRT engines skipped: %s", reason)
        return {"built": 0, "reused": 0, "skipped": reason}
    if not cfg.fp16:
        raise BlipDiffError("export.tensorrt needs the fp16 graphs: set export.fp16: true")
    from components.export import tensorrt

    engines = tensorrt.build_engines(export_dir, engines_dir, profile=cfg.tensorrt_profile,
                                     workspace_gb=cfg.workspace_gb)
    return {"built": sum(bool(e["built"]) for e in engines), "reused": sum(not e["built"] for e in engines),
            "engines": [str(e["path"]) for e in engines]}


# ------------------------------------------------------------------ serving files
def write_serving_files(model, out: Path) -> dict[str, str]:
    """What serving needs besides the graphs, written from the loaded bundle as the model
    folder has them (`layout.save` writes them the same way): the CLIP tokenizer, the
    Q-Former's tokenizer, the scheduler and the image processor (with the effective mean/std)."""
    model.tokenizer.save_pretrained(out / "tokenizer")
    model.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
    model.scheduler.save_pretrained(out / "scheduler")
    (out / "image_processor").mkdir()
    (out / "image_processor" / "preprocessor_config.json").write_text(
        json.dumps(model.image_processor.to_json(), indent=2) + "\n")
    return {"tokenizer": "tokenizer", "qformer_tokenizer": "qformer_tokenizer", "scheduler": "scheduler",
            "image_processor": "image_processor/preprocessor_config.json"}


def controlnet_source(cfg: ExportConfig, model, source: str, root: Path) -> dict | None:
    """The exported ControlNet ({source, hash}): `export.controlnet` added to the model, or the
    model folder's own; None without one."""
    from components.core.paths import is_hub_id, local_path
    from components.model import controlnet

    if cfg.controlnet is None:
        return {"source": f"{source}/controlnet", "hash": None} if model.controlnets else None
    if model.controlnets:
        raise BlipDiffError(f"export.controlnet: {source} already has a ControlNet (its controlnet/ folder) and an "
                            "export holds one: set export.controlnet: null to export the model's own")
    local = local_path(cfg.controlnet, root)
    if not local.exists() and not is_hub_id(cfg.controlnet, root):
        raise BlipDiffError(f"export.controlnet: {local} not found (run `dvc repro controlnet`, name a ControlNet "
                            "folder or hub id, or null to export without one)")
    controlnet.attach(model, [str(local) if local.exists() else cfg.controlnet], source)
    folder = controlnet.controlnet_folder(local) if local.exists() else None
    return {"source": cfg.controlnet, "hash": folder_hash(folder) if folder else cfg.controlnet}


def manifest(model, cfg: ExportConfig, source: str, model_hash: str, graphs: dict, files: dict,
             control: dict | None = None) -> dict:
    import onnx
    import onnxruntime
    import torch

    dims = export_graphs.Dims.of(model)
    return {
        "model": {"source": source, "hash": model_hash},
        "exporter": onnx_export.EXPORTER, "opset": cfg.opset,
        "versions": {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "graphs": graphs,
        "ctx_begin_pos": dims.ctx_begin_pos, "num_query_tokens": dims.num_query, "hidden_size": dims.hidden,
        "text_length": dims.text_length, "subject_image_size": dims.image_size,
        "latent_channels": dims.latent_channels, "latent_multiple": dims.latent_multiple,
        "residuals": [list(r) for r in dims.residuals], "controlnet": control,
        "vae_scale_factor": dims.vae_scale_factor, "scaling_factor": float(model.vae.config.scaling_factor),
        "native_size": model.native_size,
        "image_processor": model.image_processor.to_json(),
        "scheduler": json.loads(model.scheduler.to_json_string()),
        "files": files,
    }


def parity_report(report: dict, cfg: ExportConfig) -> dict:
    """parity.json: per graph and precision. The differences depend on the CPU's kernels in
    their last digits: 3 significant digits."""
    return round_floats({"parity_batch": cfg.batch + 1, "export_batch": cfg.batch, "seed": cfg.parity_seed,
                         "reference": "PyTorch fp32 on the CPU (the bundle's own modules)",
                         "graphs": report}, digits=3)


def flat_metrics(report: dict) -> dict:
    metrics: dict = {"graphs": len(report)}
    for name, entry in report.items():
        for kind, row in entry.items():
            key = name if kind == "fp32" else f"{name}_fp16"
            metrics[f"{key}_size_mb"] = round(row["size_bytes"] / 1e6, 3)
            if row["max_abs_diff"] is not None and np.isfinite(row["max_abs_diff"]):
                # `diff_`: from the CPU's kernels, so MLflow only (not the DVC metrics file)
                metrics[f"diff_{key}_max_abs"] = float(f"{row['max_abs_diff']:.3g}")
    return metrics


def run(params: Params, root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from components.model.device import resolve_device

    cfg = params.export
    trt_reason = tensorrt_check(cfg)  # `on` without a GPU fails before the work
    device = resolve_device(cfg.device)
    source, model_hash, folder = model_source(cfg, params.preset, root)
    log.info("exporting %s (%s) to ONNX, opset %d, on %s", source, model_hash, cfg.opset, device)
    model = load_model(cfg, params.preset, source, folder)
    control = controlnet_source(cfg, model, source, root)

    start = time.perf_counter()
    with atomic_path(root / EXPORT_DIR) as out:
        graphs = onnx_export.export_all(model, out, cfg.opset, cfg.batch, cfg.fp16, device, cfg.parity_seed)
        seconds_export = time.perf_counter() - start
        report = parity.check_parity(model, out, graphs, batch=cfg.batch + 1, seed=cfg.parity_seed)
        seconds_parity = time.perf_counter() - start - seconds_export
        parity.gate(report)  # raises naming the graph: nothing is written
        files = write_serving_files(model, out)
        write_json(manifest(model, cfg, source, model_hash, graphs, files, control), out / MANIFEST.name)
    write_json(parity_report(report, cfg), root / PARITY)
    trt = tensorrt_engines(cfg, root / EXPORT_DIR, root / ENGINES_DIR, trt_reason)
    log.info("wrote %s (%.1f MB) and %s", EXPORT_DIR, folder_size(root / EXPORT_DIR) / 1e6, PARITY)

    tracking.log_artifacts(root / EXPORT_REPORT_DIR, "export")
    tracking.set_tags({"model_hash": model_hash, "exported_model": source,
                       "export_providers": ",".join(sorted({r["provider"] for e in report.values()
                                                            for r in e.values() if r["provider"]}))})
    metrics = flat_metrics(report)
    metrics.update({"opset": cfg.opset, "parity_batch": cfg.batch + 1, "run_tensorrt_engines_built": trt["built"],
                    "run_tensorrt_engines_reused": trt["reused"],
                    "seconds_export": round(seconds_export, 3), "seconds_parity": round(seconds_parity, 3)})
    return metrics, {}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def after_run(params: Params, root: Path) -> None:
    """Inside the stage's MLflow run: the export folder as artifacts, or export.json alone when
    the folder is large (the graphs are DVC's to keep)."""
    folder = root / EXPORT_DIR
    size = folder_size(folder)
    if size <= ARTIFACT_LIMIT_BYTES:
        tracking.log_artifacts(folder, "export/graphs")
        return
    log.info("export: %s is %.0f MB (> %.0f MB): only export.json goes to MLflow (the graphs are in DVC)",
             EXPORT_DIR, size / 1e6, ARTIFACT_LIMIT_BYTES / 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(folder / MANIFEST.name, Path(tmp) / MANIFEST.name)
        tracking.log_artifacts(Path(tmp), "export/graphs")

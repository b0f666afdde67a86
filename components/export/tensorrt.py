"""TensorRT engines from the exported fp16 ONNX graphs (TensorRT 10.12+ and 11.x).

The networks are strongly typed: the precision comes from the graph (the `*.fp16.onnx` files
compute in fp16 and keep fp32 inputs and outputs), so no precision builder flag is set (TensorRT
11 has none). An engine only runs with the TensorRT version and on the GPU architecture that
built it, so both are in its file name, `unet.trt10.13.0.sm90.static512.plan`, and a JSON
sidecar (`<engine>.json`) records what it was built from: the ONNX files' sha256, the
optimisation profile's shapes, the TensorRT version and the compute capability. A mismatch of
any of them, a missing or truncated engine, or one that fails to deserialise, rebuilds it.

Everything but the TensorRT calls (`_build_one`, `load_engine`) is plain Python, testable
without TensorRT or a GPU; `tensorrt` is imported only when an engine is built or loaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from components.core.errors import BlipDiffError
from components.core.io import atomic_path, file_sha256, write_json
from components.core.paths import EXPORT_FILE
from components.export.graphs import CONTROL_GRAPHS, GRAPHS, SPECS, export_graphs, get_spec

log = logging.getLogger(__name__)

INSTALL_HINT = "tensorrt is not installed (pip install -e '.[gpu]')"
TIMING_CACHE = "timing.cache"

Triple = tuple[int, int, int]
ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


# ---------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """An optimisation profile: square image sides in pixels (min, opt, max; height and width
    each range over them independently), each graph's batch (min, opt, max) and the subject
    encoder's text length."""

    name: str
    image: Triple
    batch: Mapping[str, Triple]
    subject_text: Triple = (1, 8, 32)

    def __post_init__(self):
        triples = {"image": self.image, "subject_text": self.subject_text,
                   **{f"batch of {g}": t for g, t in self.batch.items()}}
        for what, (low, opt, high) in triples.items():
            if not 1 <= low <= opt <= high:
                raise BlipDiffError(f"TensorRT profile {self.name!r}: {what} (min, opt, max) = {(low, opt, high)} "
                                    "must satisfy 1 <= min <= opt <= max")


# each graph's batch (min, opt, max): its spec's `engine_batch`
PROFILES: dict[str, Profile] = {
    "static512": Profile("static512", image=(512, 512, 512), batch={g: s.engine_batch for g, s in SPECS.items()}),
    "dynamic": Profile("dynamic", image=(256, 512, 1024), batch={g: s.engine_batch for g, s in SPECS.items()}),
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes of the exported graphs that a profile does not choose. Defaults: the released
    BLIP-Diffusion (SD 1.5 UNet and VAE, BLIP-2 Q-Former)."""

    latent_factor: int = 8
    num_query: int = 16
    hidden: int = 768
    text_len: int = 77
    subject_image_size: int = 224
    latent_channels: int = 4
    latent_multiple: int = 1  # latent sides must be multiples of it (the UNet's down-sampling)
    residuals: tuple[tuple[int, int], ...] = ()  # the ControlNet graphs' residuals (channels, factor)

    # export.json keys -> fields: the brief's names, then the exporter's Dims names
    EXPORT_KEYS = {
        "latent_factor": "latent_factor", "vae_scale_factor": "latent_factor",
        "num_query_tokens": "num_query", "num_query": "num_query",
        "hidden_size": "hidden", "hidden": "hidden",
        "text_length": "text_len",
        "subject_image_size": "subject_image_size", "image_size": "subject_image_size",
        "latent_channels": "latent_channels",
        "latent_multiple": "latent_multiple",
    }

    @classmethod
    def from_export(cls, meta: Mapping[str, Any] | None, **overrides: int | None) -> "ModelDims":
        """From an export.json dict, its keys at the top or under "dims" (missing ones keep the
        defaults); `overrides` (fields, not None) win."""
        values: dict[str, int] = {}
        for source in (meta or {}, (meta or {}).get("dims") or {}):
            for key, name in cls.EXPORT_KEYS.items():
                if source.get(key) is not None:
                    values[name] = int(source[key])
        values.update({k: int(v) for k, v in overrides.items() if v is not None})
        residuals = tuple(tuple(int(x) for x in r) for r in (meta or {}).get("residuals") or ())
        return cls(**values, residuals=residuals)

    def as_kwargs(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise BlipDiffError(f"unknown TensorRT profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[profile]


def profile_shapes(graph: str, profile: str | Profile = "static512", latent_factor: int = 8, num_query: int = 16,
                   hidden: int = 768, text_len: int = 77, subject_image_size: int = 224,
                   latent_channels: int = 4, latent_multiple: int = 1,
                   residuals: tuple[tuple[int, int], ...] = ()) -> dict[str, ShapeTriple]:
    """Each input of `graph`: its (min, opt, max) shapes under `profile`. The ControlNet graphs
    take the UNet's batch range and need the residual layout (`residuals`)."""
    prof = get_profile(profile)
    if graph in CONTROL_GRAPHS:
        if not residuals:
            raise BlipDiffError(f"graph {graph}: the export has no residual layout (export.json `residuals`); "
                                "export again")
        batch = prof.batch["unet"]
    elif graph in prof.batch and graph in SPECS:
        batch = prof.batch[graph]
    else:
        raise BlipDiffError(f"unknown graph {graph!r}; the graphs are {', '.join(GRAPHS + CONTROL_GRAPHS)}")
    for side in prof.image:
        if side % latent_factor:
            raise BlipDiffError(f"profile {prof.name!r}: image side {side} is not a multiple of the latent "
                                f"factor {latent_factor}")
    lat = tuple(side // latent_factor for side in prof.image)
    templates = get_spec(graph, residuals).input_shapes  # each input's dims: ints, size names, (name, divisor)
    sizes = {"batch": batch, "subject_text": prof.subject_text, "latent_height": lat, "latent_width": lat,
             "image_height": prof.image, "image_width": prof.image,
             "image_size": subject_image_size, "num_query": num_query, "hidden": hidden, "text_length": text_len,
             "latent_channels": latent_channels}
    if any(d in ("latent_height", "latent_width") for t in templates.values() for d in t) and \
            any(side % latent_multiple for side in lat):
        raise BlipDiffError(f"profile {prof.name!r}: latent sides {lat} are not multiples of the UNet's "
                            f"{latent_multiple}")
    def size(d):
        if isinstance(d, str):
            return sizes[d]
        if isinstance(d, tuple):  # (name, k): the size divided by k
            return tuple(v // d[1] for v in sizes[d[0]])
        return d

    named = {name: [size(d) for d in t] for name, t in templates.items()}
    return {name: tuple(tuple(d[i] if isinstance(d, tuple) else d for d in dims) for i in range(3))
            for name, dims in named.items()}


def check_static_dims(graph: str, name: str, network_shape: Sequence[int], shapes: ShapeTriple) -> None:
    """A graph's input dims that are fixed (not -1) must equal the profile's min, opt and max
    there: a mismatch is a wrong ModelDims (hidden size, query tokens...), named here."""
    if len(network_shape) != len(shapes[0]):
        raise BlipDiffError(f"{graph}: input {name!r} has rank {len(network_shape)} in the ONNX graph "
                            f"but {len(shapes[0])} in the profile ({shapes[0]})")
    for axis, dim in enumerate(network_shape):
        if dim >= 0 and any(s[axis] != dim for s in shapes):
            raise BlipDiffError(
                f"{graph}: input {name!r} axis {axis} is fixed to {dim} in the ONNX graph, but the profile asks "
                f"{[s[axis] for s in shapes]} (min, opt, max); check the export's export.json "
                f"(latent_factor, hidden_size, num_query_tokens, text_length, subject_image_size) "
                f"or export with dynamic axes")


# ---------------------------------------------------------------- names and records
def version_tag(trt_version: str) -> str:
    """'10.13.0.35' -> '10.13.0' (the full version is in the sidecar and compared too)."""
    return ".".join(str(trt_version).split(".")[:3])


def sm_tag(cc: tuple[int, int] | Sequence[int] | str) -> str:
    """(9, 0) -> 'sm90', (12, 0) -> 'sm120'; 'sm90' as is."""
    if isinstance(cc, str):
        return cc if cc.startswith("sm") else "sm" + cc.replace(".", "")
    major, minor = cc
    return f"sm{int(major)}{int(minor)}"


def engine_name(graph: str, trt_version: str, compute_capability: tuple[int, int] | str,
                profile: str | Profile) -> str:
    name = profile.name if isinstance(profile, Profile) else profile
    return f"{graph}.trt{version_tag(trt_version)}.{sm_tag(compute_capability)}.{name}.plan"


def sidecar_path(engine_path: Path) -> Path:
    return Path(f"{engine_path}.json")


def onnx_files(export_dir: Path, graph: str, fp16: bool = True) -> list[Path]:
    """The graph's ONNX file (first) and its external data file where there is one."""
    onnx = Path(export_dir) / (f"{graph}.fp16.onnx" if fp16 else f"{graph}.onnx")
    if not onnx.is_file():
        raise BlipDiffError(f"no ONNX graph at {onnx}: run the export stage first")
    data = Path(f"{onnx}.data")
    return [onnx, data] if data.is_file() else [onnx]


def onnx_hashes(onnx_paths: Iterable[Path]) -> dict[str, str]:
    return {Path(p).name: file_sha256(Path(p)) for p in onnx_paths}


def _jsonable_shapes(shapes: Mapping[str, ShapeTriple]) -> dict[str, list[list[int]]]:
    return {name: [list(map(int, s)) for s in triple] for name, triple in sorted(shapes.items())}


def read_sidecar(engine_path: Path) -> dict | None:
    try:
        return json.loads(sidecar_path(engine_path).read_text())
    except (OSError, ValueError):
        return None


def needs_build(engine_path: Path, onnx_paths: Sequence[Path], shapes: Mapping[str, ShapeTriple],
                trt_version: str, cc: tuple[int, int] | str) -> tuple[bool, str]:
    """(True, why) when the engine must be (re)built, (False, 'up to date') when the one on disk
    was built from these ONNX bytes, with this profile, TensorRT version and GPU architecture."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        return True, f"no engine at {engine_path}"
    meta = read_sidecar(engine_path)
    if meta is None:
        return True, f"no readable sidecar {sidecar_path(engine_path).name}"
    if meta.get("engine_size") is not None and meta["engine_size"] != engine_path.stat().st_size:
        return True, f"engine size {engine_path.stat().st_size} differs from the recorded {meta['engine_size']}"
    if str(meta.get("tensorrt_version")) != str(trt_version):
        return True, f"TensorRT version changed: {meta.get('tensorrt_version')} -> {trt_version}"
    if meta.get("compute_capability") != sm_tag(cc):
        return True, f"compute capability changed: {meta.get('compute_capability')} -> {sm_tag(cc)}"
    old, new = meta.get("onnx_sha256") or {}, onnx_hashes(onnx_paths)
    if old != new:
        changed = [f"{name} sha256 {str(old.get(name))[:12]} -> {str(new.get(name))[:12]}"
                   for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        return True, "ONNX changed: " + "; ".join(changed)
    if meta.get("shapes") != _jsonable_shapes(shapes):
        return True, f"profile changed: {meta.get('shapes')} -> {_jsonable_shapes(shapes)}"
    return False, "up to date"


# ---------------------------------------------------------------- TensorRT and the GPU
def _import_trt():
    import tensorrt

    return tensorrt


def device_info() -> dict[str, Any]:
    """The current CUDA device: compute capability (major, minor), name, CUDA version."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"compute_capability": (int(major), int(minor)), "gpu_name": torch.cuda.get_device_name(),
            "cuda_version": torch.version.cuda}


def tensorrt_status() -> tuple[bool, str]:
    """(True, what) when engines can be built and run here; else (False, why not): no GPU
    first (the reason on a CPU machine, installed or not), then the package."""
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU"
    try:
        trt = _import_trt()
    except ImportError:
        return False, INSTALL_HINT
    except Exception as exc:  # a broken install: missing libnvinfer, CUDA libraries...
        return False, f"tensorrt failed to import: {type(exc).__name__}: {exc}"
    info = device_info()
    return True, f"TensorRT {trt.__version__} on {info['gpu_name']} ({sm_tag(info['compute_capability'])})"


def _network_inputs(network) -> dict[str, tuple[int, ...]]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def _parse(trt, builder, logger, onnx_path: Path):
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT 10: strongly typed on request (EXPLICIT_BATCH is deprecated and ignored, not
    # passed); 11: always strongly typed, the flag kept and ignored.
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    # from the file, not its bytes: external data resolves next to it
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["(the parser gave no message)"]
        raise BlipDiffError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
    return network, parser


def _timing_cache_blob(path: Path, trt_version: str, cc: str) -> bytes:
    """The saved timing cache, when it is from this TensorRT version and GPU architecture."""
    try:
        meta = json.loads(sidecar_path(path).read_text())
        if meta.get("tensorrt_version") == trt_version and meta.get("compute_capability") == cc:
            return path.read_bytes()
        log.info("timing cache %s is from TensorRT %s %s: starting a new one", path,
                 meta.get("tensorrt_version"), meta.get("compute_capability"))
    except (OSError, ValueError):
        pass
    return b""


def _set_timing_cache(config, blob: bytes) -> None:
    try:
        cache = config.create_timing_cache(blob)
        if config.set_timing_cache(cache, False):
            return
        log.warning("TensorRT did not accept the saved timing cache: starting a new one")
    except Exception as exc:
        log.warning("could not load the timing cache (%s): starting a new one", exc)
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _build_one(trt, logger, graph: str, onnx_path: Path, shapes: Mapping[str, ShapeTriple], engine_path: Path,
               workspace_bytes: int, timing_path: Path, trt_version: str, cc: str) -> None:
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, onnx_path)  # the parser owns the weights: keep it until built
    inputs = _network_inputs(network)
    missing = sorted(set(inputs) - set(shapes))
    if missing:
        raise BlipDiffError(f"{graph}: the ONNX graph has inputs {missing} that the profile does not shape "
                            f"(profile inputs: {sorted(shapes)})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    _set_timing_cache(config, _timing_cache_blob(timing_path, trt_version, cc))
    profile = builder.create_optimization_profile()
    for name, triple in shapes.items():
        if name not in inputs:  # e.g. an input the exporter folded away
            log.warning("%s: the ONNX graph has no input %r; its profile shapes are skipped", graph, name)
            continue
        check_static_dims(graph, name, inputs[name], triple)
        profile.set_shape(name, *triple)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    del parser
    if plan is None:
        raise BlipDiffError(f"TensorRT failed to build the {graph} engine from {onnx_path} (see its log above)")
    with atomic_path(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(plan)
    with atomic_path(timing_path) as tmp, open(tmp, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    write_json({"tensorrt_version": trt_version, "compute_capability": cc}, sidecar_path(timing_path))


def load_engine(path: Path, logger=None):
    """The deserialised engine (ICudaEngine), or None (the reason logged) when the file is
    missing, not an engine, or from another TensorRT version or GPU: callers rebuild then."""
    trt = _import_trt()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    try:
        data = Path(path).read_bytes()
        engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    except Exception as exc:
        log.warning("engine %s failed to deserialise (%s: %s)", path, type(exc).__name__, exc)
        return None
    if engine is None:
        log.warning("engine %s failed to deserialise (TensorRT returned no engine)", path)
    return engine


# ---------------------------------------------------------------- the stage's entry point
def build_engines(export_dir: Path, out_dir: Path, profile: str | Profile = "static512", workspace_gb: float = 8,
                  graphs: Sequence[str] | None = None, dims: ModelDims | None = None, verify: bool = True,
                  force: bool = False) -> list[dict]:
    """Build (or reuse) one engine per graph (default: every graph of the export, the
    ControlNet pair included when it has one) from `export_dir`'s `<graph>.fp16.onnx` into
    `out_dir`, sharing a timing cache there. `dims` default to the export's export.json (then
    ModelDims' defaults). `verify` deserialises an engine before reusing it. One dict per
    engine: graph, path, built, reason, seconds, size."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    available, why = tensorrt_status()
    if not available:
        raise BlipDiffError(f"cannot build TensorRT engines: {why}")
    prof = get_profile(profile)
    meta_path = export_dir / EXPORT_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if dims is None:
        dims = ModelDims.from_export(meta)
    if graphs is None:
        graphs = export_graphs(meta or {})
    trt = _import_trt()
    info = device_info()
    logger, version, cc = trt.Logger(trt.Logger.WARNING), str(trt.__version__), sm_tag(info["compute_capability"])
    workspace = int(workspace_gb * (1 << 30))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for graph in graphs:
        onnx = onnx_files(export_dir, graph)
        shapes = profile_shapes(graph, prof, **dims.as_kwargs())
        path = out_dir / engine_name(graph, version, cc, prof)
        build, reason = (True, "forced") if force else needs_build(path, onnx, shapes, version, cc)
        if not build and verify and load_engine(path, logger) is None:
            build, reason = True, "the engine on disk failed to deserialise"
        if not build:
            log.info("%s: reusing %s (%s)", graph, path.name, reason)
            results.append({"graph": graph, "path": str(path), "built": False, "reason": reason, "seconds": 0.0,
                            "size": path.stat().st_size})
            continue
        log.info("%s: building %s (%s)", graph, path.name, reason)
        sidecar_path(path).unlink(missing_ok=True)  # no sidecar vouches for a half-replaced engine
        start = time.perf_counter()
        _build_one(trt, logger, graph, onnx[0], shapes, path, workspace, out_dir / TIMING_CACHE,
                   version, cc)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        write_json({
            "graph": graph, "onnx_sha256": onnx_hashes(onnx), "profile": prof.name,
            "shapes": _jsonable_shapes(shapes), "tensorrt_version": version, "compute_capability": cc,
            "gpu_name": info.get("gpu_name"), "cuda_version": info.get("cuda_version"),
            "build_seconds": round(seconds, 3), "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(
                timespec="seconds"), "workspace_bytes": workspace, "engine_size": size,
            "dims": dims.as_kwargs(),
        }, sidecar_path(path))
        log.info("%s: built %s in %.1f s (%.1f MiB)", graph, path.name, seconds, size / 2**20)
        results.append({"graph": graph, "path": str(path), "built": True, "reason": reason,
                        "seconds": round(seconds, 3), "size": size})
    return results


__all__ = [
    "GRAPHS", "PROFILES", "ModelDims", "Profile", "build_engines", "check_static_dims", "engine_name",
    "get_profile", "load_engine", "needs_build", "onnx_files", "profile_shapes", "sm_tag", "tensorrt_status",
]

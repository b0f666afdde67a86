"""Who runs the four networks of the sampler: PyTorch, ONNX Runtime or TensorRT.

Each backend is a `components.model.blip_diffusion.Networks`: `subject_embeds`, `text`,
`unet`, `vae_decode` (and `controlnet` when the export has the ControlNet graphs) on torch
tensors, plus the sizes the sampling loop reads. The loop
itself (tokenization, scheduler, guidance, seeded latents, VAE scaling) is
`BlipDiffusion.generate`, the same for all three.

- `TorchNetworks(model)`: the bundle's own modules (the model's default).
- `OrtNetworks(export_dir)`: the export's ONNX graphs in ONNX Runtime sessions; the fp32
  graphs, or the fp16 ones (fp32 inputs and outputs) when running on CUDA, where inputs and
  outputs stay torch CUDA tensors (IO binding).
- `TrtNetworks(export_dir, engine_dir)`: TensorRT engines built from the fp16 graphs
  (`components.export.tensorrt`), bound to torch CUDA tensors and run on one CUDA stream.
  A call larger than the engine's optimisation profile is split, a smaller one padded.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from components.core.errors import BlipDiffError, check_finite
from components.core.paths import ENGINES_DIR, EXPORT_FILE
from components.export import tensorrt as trtx
from components.export.graphs import CONTROL_GRAPHS, GRAPHS, SPECS, export_graphs, get_spec
from components.model.blip_diffusion import TorchNetworks

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
OUTPUTS = {graph: spec.outputs[0] for graph, spec in SPECS.items()}  # each graph's one output
OUTPUTS["unet_control"] = "noise_pred"

__all__ = ["BACKENDS", "OrtNetworks", "TorchNetworks", "TrtNetworks", "chunks", "output_shape", "read_export",
           "select_engines"]


def read_export(export_dir: Path) -> dict:
    """An export folder's export.json (what `blipdiff export` / the export stage writes)."""
    path = Path(export_dir) / EXPORT_FILE
    if not path.is_file():
        raise BlipDiffError(f"{export_dir}: not an export folder (no {EXPORT_FILE}); run the export stage "
                            "(`dvc repro export`)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise BlipDiffError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("text_length", "latent_channels", "vae_scale_factor", "scaling_factor", "num_query_tokens",
                           "hidden_size") if k not in meta]
    if missing:
        raise BlipDiffError(f"{path}: missing {', '.join(missing)} (an export from an older version? export again)")
    return meta


class _ExportedNetworks:
    """What the ONNX Runtime and TensorRT backends share: the sizes the sampling loop reads
    (from export.json), and the four networks as calls of the exported graphs by their
    input names; a subclass runs a graph in `_outputs(graph, feeds, names)`."""

    def _outputs(self, graph: str, feeds: Mapping[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """The graph's outputs `names`, in order, fp32."""
        raise NotImplementedError

    def output_names(self, graph: str) -> list[str]:
        return list(self.residual_names) if graph == "controlnet" else [OUTPUTS[graph]]

    def _run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """The graph's output; all of them, in order, for the controlnet graph. NaN or
        infinity in an output raises NonFiniteError naming the backend, graph and output."""
        names = self.output_names(graph)
        outs = self._outputs(graph, feeds, names)
        for name, value in zip(names, outs):
            check_finite(f"{self.BACKEND} {graph} ({name})", value)
        return outs if graph == "controlnet" else outs[0]

    def subject_embeds(self, pixel_values, input_ids, attention_mask):
        return self._run("subject_encoder", {"pixel_values": pixel_values, "input_ids": input_ids,
                                             "attention_mask": attention_mask})

    def text(self, input_ids, subject_embeds, has_subject):
        return self._run("text_encoder", {"input_ids": input_ids, "subject_embeds": subject_embeds,
                                          "has_subject": has_subject})

    def unet(self, sample, timestep, hidden, residuals=None):
        feeds = {"sample": sample, "timestep": timestep.reshape(-1).expand(len(sample)), "encoder_hidden_states": hidden}
        if residuals is None:
            return self._run("unet", feeds)
        down, mid = residuals
        return self._run("unet_control", {**feeds, **dict(zip(self.residual_names, [*down, mid]))})

    def controlnet(self, index, sample, timestep, hidden, cond):
        if index >= self.num_controlnets:
            raise BlipDiffError(f"ControlNet {index}: the export has {self.num_controlnets}")
        out = self._run("controlnet", {"sample": sample, "timestep": timestep.reshape(-1).expand(len(sample)),
                                       "encoder_hidden_states": hidden, "controlnet_cond": cond})
        return list(out[:-1]), out[-1]

    def vae_decode(self, latents):
        return self._run("vae_decoder", {"latents": latents})


    def _sizes(self, meta: dict) -> None:
        self.text_length = int(meta["text_length"])
        self.latent_channels = int(meta["latent_channels"])
        self.vae_scale_factor = int(meta["vae_scale_factor"])
        self.scaling_factor = float(meta["scaling_factor"])
        self.num_query = int(meta["num_query_tokens"])
        self.hidden = int(meta["hidden_size"])
        self.graphs = export_graphs(meta)
        self.num_controlnets = int("controlnet" in self.graphs)
        self.residuals = tuple(tuple(r) for r in meta.get("residuals") or ())
        self.residual_names = get_spec("controlnet", self.residuals).outputs if self.num_controlnets else ()


# ------------------------------------------------------------------ ONNX Runtime
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}
_TORCH_TYPES = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.int32: torch.int32,
                np.bool_: torch.bool, np.float64: torch.float64}


# What onnxruntime-gpu 1.31's CUDA provider loads (CUDA 13, cuDNN 9): named when it cannot run.
CUDA_LIBRARIES = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcufft.so.12", "libcurand.so.10",
                  "libcudnn.so.9")


def missing_cuda_libraries(names: tuple[str, ...] = CUDA_LIBRARIES) -> list[str]:
    """The CUDA provider's libraries that the dynamic loader cannot find here."""
    import ctypes

    missing = []
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def default_providers() -> list[str]:
    """CUDA first when torch sees a GPU, else the CPU alone. (ONNX Runtime would fall back to
    the CPU in silence when the CUDA provider cannot load: `OrtNetworks` stops instead.)"""
    if torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtNetworks(_ExportedNetworks):
    """The four graphs of an export folder in ONNX Runtime sessions. Inputs and outputs are
    torch tensors (fp32 graphs, or fp16 graphs that keep fp32 inputs and outputs): on the CPU,
    or on CUDA when the CUDA provider runs and torch has CUDA, bound by address (IO binding).

    `precision`: "fp32", "fp16", or "auto" (fp16 when the CUDA provider runs and the export
    has fp16 graphs), decided from the providers a session actually runs on. onnxruntime-gpu
    lists CUDA even where CUDA or cuDNN cannot load and then builds a CPU session, saying so
    only in its log: when CUDA was asked for (or defaulted to) and is not what runs, this
    stops with one line naming the libraries that are missing. `provider` is what runs."""

    BACKEND = "ONNX Runtime"

    def __init__(self, export_dir: Path, providers: list[str] | None = None, precision: str = "auto",
                 io_binding: bool | None = None):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.meta = read_export(self.export_dir)
        self._sizes(self.meta)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        requested = list(providers or default_providers())
        available = ort.get_available_providers()
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise BlipDiffError(f"ONNX Runtime {ort.__version__} has no {', '.join(unknown)} here "
                                f"(available: {', '.join(available)})")
        if precision not in ("auto", "fp32", "fp16"):
            raise BlipDiffError(f"ONNX Runtime precision {precision!r}: choose auto, fp32 or fp16")
        has_fp16 = all((self.export_dir / f"{g}.fp16.onnx").is_file() for g in self.graphs)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the CPU fallback is checked below, not left to a log line
        active = self._active_providers(ort, options, requested)
        if precision == "auto":
            precision = "fp16" if active[0] == "CUDAExecutionProvider" and has_fp16 else "fp32"
        if precision == "fp16" and not has_fp16:
            raise BlipDiffError(f"{self.export_dir}: no fp16 graphs (<graph>.fp16.onnx); export with export.fp16: true")
        self.precision = precision
        self.sessions = {}
        for graph in self.graphs:
            path = self.export_dir / (f"{graph}.fp16.onnx" if precision == "fp16" else f"{graph}.onnx")
            if not path.is_file():
                raise BlipDiffError(f"{path}: graph not found; export again")
            try:
                self.sessions[graph] = ort.InferenceSession(str(path), options, providers=requested)
            except Exception as exc:
                raise BlipDiffError(f"ONNX Runtime could not load {path}: {str(exc).splitlines()[0][:300]}") from None
        self.provider = self.sessions["unet"].get_providers()[0]
        self._types = {g: {i.name: _ORT_TYPES.get(i.type, np.float32) for i in [*s.get_inputs(), *s.get_outputs()]}
                       for g, s in self.sessions.items()}
        # On CUDA, inputs and outputs stay torch CUDA tensors bound by address (IO binding): no
        # host round trip per step, and the text embeddings, the same every step, are never
        # copied. Needs torch with CUDA; `io_binding=True` binds CPU tensors the same way.
        on_cuda = self.provider == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        if on_cuda and self.io_binding:
            self.device = torch.device("cuda", torch.cuda.current_device())
        log.info("ONNX Runtime %s: %s graphs of %s on %s", ort.__version__, precision, self.export_dir, self.provider)

    def _active_providers(self, ort, options, requested: list[str]) -> list[str]:
        """The providers a session of this export really runs on (a probe of its smallest fp32
        graph); CUDA asked for but not running is an error naming what is missing."""
        probe_path = min((self.export_dir / f"{g}.onnx" for g in self.graphs if (self.export_dir / f"{g}.onnx").is_file()),
                         key=lambda p: p.stat().st_size, default=None)
        if probe_path is None:
            raise BlipDiffError(f"{self.export_dir}: no graphs (<graph>.onnx); export again")
        try:
            active = list(ort.InferenceSession(str(probe_path), options, providers=requested).get_providers())
        except Exception as exc:
            raise BlipDiffError(f"ONNX Runtime could not load {probe_path}: {str(exc).splitlines()[0][:300]}") from None
        if "CUDAExecutionProvider" in requested and "CUDAExecutionProvider" not in active:
            missing = missing_cuda_libraries()
            why = (f"it cannot load {', '.join(missing)}" if missing else
                   "its CUDA libraries load, so see ONNX Runtime's log (driver, GPU visibility)")
            raise BlipDiffError(f"ONNX Runtime {ort.__version__} was asked for CUDAExecutionProvider but would run on "
                                f"{active[0]}: {why}; install the GPU stack (docs/serving.md#dependencies) or pass "
                                "--providers CPUExecutionProvider")
        return active

    def _outputs(self, graph: str, feeds: Mapping[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        return self._run_bound(graph, feeds, names) if self.io_binding else self._run_arrays(graph, feeds, names)

    def _run_arrays(self, graph: str, feeds: Mapping[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        types = self._types[graph]
        arrays = {name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=types[name]) for name, t in feeds.items()}
        return [torch.from_numpy(o).to(torch.float32) for o in self.sessions[graph].run(names, arrays)]

    def _run_bound(self, graph: str, feeds: Mapping[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        """The graph run on torch tensors of `self.device`, bound by address: inputs as they
        are (cast only where the graph's type differs), outputs into tensors made here."""
        session, types = self.sessions[graph], self._types[graph]
        kind, index = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        binding = session.io_binding()
        bound = []  # kept alive until the run ends
        for name, tensor in feeds.items():
            x = tensor.detach().to(self.device, _TORCH_TYPES[types[name]]).contiguous()
            bound.append(x)
            binding.bind_input(name, kind, index, types[name], tuple(x.shape), x.data_ptr())
        shapes = output_shape(graph, {k: tuple(v.shape) for k, v in feeds.items()}, self.num_query, self.hidden,
                              self.text_length, self.vae_scale_factor, residuals=self.residuals)
        outs = [torch.empty(shape, dtype=_TORCH_TYPES[types[name]], device=self.device)
                for name, shape in zip(names, shapes if isinstance(shapes, list) else [shapes])]
        for name, out in zip(names, outs):
            binding.bind_output(name, kind, index, types[name], tuple(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the inputs are written before ORT's stream reads
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [out.to(torch.float32) for out in outs]


# ------------------------------------------------------------------ TensorRT
ENGINE_RE = re.compile(rf"^(?P<graph>{'|'.join(map(re.escape, GRAPHS + CONTROL_GRAPHS))})\.trt(?P<version>\d+(?:\.\d+)*)"
                       r"\.(?P<sm>sm\d+)\.(?P<profile>[A-Za-z0-9_-]+)\.plan$")


def default_engine_dir(export_dir: Path) -> Path:
    """Where the engines of an export are looked for: beside the export folder as the export
    stage writes them (models/onnx -> models/tensorrt), else `<export>/tensorrt/`, else the
    export folder itself."""
    export_dir = Path(export_dir)
    for candidate in (export_dir.parent / ENGINES_DIR.name, export_dir / ENGINES_DIR.name):
        if candidate.is_dir():
            return candidate
    return export_dir


def select_engines(engine_dir: Path, trt_version: str, compute_capability, profile: str | None = None,
                   graphs: tuple[str, ...] = GRAPHS) -> tuple[str, dict[str, Path]]:
    """(profile, {graph: engine file}) for this TensorRT version and GPU architecture
    (`components.export.tensorrt.engine_name`). Without `profile`, the one profile that has
    all four engines; a missing engine, several candidate profiles, or engines built for
    another TensorRT or GPU only are errors naming what is there and how to build."""
    engine_dir = Path(engine_dir)
    version, sm = trtx.version_tag(trt_version), trtx.sm_tag(compute_capability)
    build = (f"build them with `blipdiff batch ... --backend tensorrt --build-engines` or "
             f"components.export.tensorrt.build_engines(export_dir, {engine_dir})")
    found = [m for m in (ENGINE_RE.match(p.name) for p in sorted(engine_dir.glob("*.plan"))) if m] \
        if engine_dir.is_dir() else []
    mine = [m for m in found if m["version"] == version and m["sm"] == sm]
    profiles = sorted({m["profile"] for m in mine})
    if profile is None:
        complete = [p for p in profiles if {m["graph"] for m in mine if m["profile"] == p} >= set(graphs)]
        if len(complete) > 1:
            raise BlipDiffError(f"{engine_dir}: engines for several profiles ({', '.join(complete)}); choose one "
                                "(--trt-profile)")
        if not complete:
            if found and not mine:
                others = sorted({f"TensorRT {m['version']} on {m['sm']}" for m in found})
                raise BlipDiffError(f"{engine_dir}: the engines there were built for {', '.join(others)}, not for "
                                    f"TensorRT {version} on {sm} (an engine runs only where it was built); {build}")
            profile = profiles[0] if len(profiles) == 1 else "static512"
        else:
            profile = complete[0]
    paths = {g: engine_dir / trtx.engine_name(g, trt_version, compute_capability, profile) for g in graphs}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise BlipDiffError(f"{engine_dir}: no TensorRT engine {', '.join(missing)} (TensorRT {version}, {sm}, "
                            f"profile {profile}); {build}")
    return profile, paths


def chunks(batch: int, low: int, high: int) -> list[tuple[int, int, int]]:
    """How a call of `batch` rows runs on an engine whose profile takes `low`..`high` rows:
    (start, stop, rows run) per enqueue; rows past stop - start are padding (copies of the
    last row), dropped from the output. Rows are independent in every graph."""
    if low < 1 or high < low:
        raise BlipDiffError(f"engine batch range {low}..{high} is not a range")
    return [(start, min(start + high, batch), max(min(start + high, batch) - start, low))
            for start in range(0, batch, high)]


def output_shape(graph: str, inputs: Mapping[str, tuple[int, ...]], num_query: int, hidden: int,
                 text_length: int, vae_scale_factor: int, image_channels: int = 3,
                 residuals: tuple[tuple[int, int], ...] = ()) -> tuple[int, ...] | list[tuple[int, ...]]:
    """The output's shape of one graph for given input shapes (the torch buffer TensorRT writes);
    the controlnet graph's residuals: a list of shapes."""
    if graph == "subject_encoder":
        return (inputs["pixel_values"][0], num_query, hidden)
    if graph == "text_encoder":
        return (inputs["input_ids"][0], text_length, hidden)
    if graph in ("unet", "unet_control"):
        return tuple(inputs["sample"])
    if graph == "controlnet":
        b, _, h, w = inputs["sample"]
        return [(b, c, h // f, w // f) for c, f in residuals]
    if graph == "vae_decoder":
        b, _, h, w = inputs["latents"]
        return (b, image_channels, h * vae_scale_factor, w * vae_scale_factor)
    raise BlipDiffError(f"unknown graph {graph!r}; graphs: {', '.join(GRAPHS)}")


def tensorrt_or_error() -> None:
    """A clear error when TensorRT engines cannot run here (no CUDA, TensorRT missing)."""
    available, why = trtx.tensorrt_status()
    if not available:
        raise BlipDiffError(f"backend tensorrt needs a CUDA GPU and TensorRT: {why}; use --backend onnxruntime "
                            "or torch here")


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8}
    for name, value in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = value
    return table[dtype]


ALIGNMENT = 256  # bytes: TensorRT's requirement for every IO tensor address


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh contiguous tensor whose first byte is ALIGNMENT-aligned, whatever the allocator
    guarantees (CUDA's caching allocator: 512 bytes; the CPU one: 64)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % ALIGNMENT
    return raw[offset: offset + nbytes].view(dtype).view(shape)


def device_memory_size(engine) -> int:
    """The activation memory an execution context of `engine` needs (TensorRT 10.1+:
    device_memory_size_v2; earlier: device_memory_size)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


class TrtNetworks(_ExportedNetworks):
    """TensorRT engines of an export (one per graph, one profile), run with torch tensors as
    bindings on one dedicated CUDA stream. Inputs and outputs are fp32 (the fp16 graphs keep
    fp32 at their edges); tensors on `device` (CUDA; tests run the stand-in TensorRT runtime of
    tests/helpers on "cpu").

    As NVIDIA's demo/Diffusion does:
    - the engines run one after another, so their execution contexts share one block of
      activation memory, the largest any engine needs (contexts created USER_MANAGED);
    - every enqueue binds fresh buffers, ALIGNMENT-aligned (a chunk of a larger call is
      copied, never bound as a view into it), and a binding TensorRT refuses is an error:
      `set_tensor_address` returning False keeps the previous address bound, which would
      compute on stale memory in silence;
    - the enqueue runs on the backend's own stream (never the legacy default stream), after
      the stream that made the inputs.
    A call larger than the engine's profile is split into profile-sized chunks; one smaller
    than its minimum is padded with copies of its last row (rows are independent)."""

    BACKEND = "TensorRT"

    def __init__(self, export_dir: Path, engine_dir: Path | None = None, profile: str | None = None,
                 build: bool = False, workspace_gb: float = 8, device: str = "cuda"):
        tensorrt_or_error()
        import tensorrt as trt

        self.export_dir = Path(export_dir)
        self.meta = read_export(self.export_dir)
        self._sizes(self.meta)
        self.engine_dir = Path(engine_dir) if engine_dir else default_engine_dir(self.export_dir)
        if build:
            trtx.build_engines(self.export_dir, self.engine_dir, profile=profile or "static512",
                               workspace_gb=workspace_gb)
        info = trtx.device_info()
        self.profile, paths = select_engines(self.engine_dir, trt.__version__, info["compute_capability"], profile,
                                             self.graphs)
        self.device, self.dtype = torch.device(device), torch.float32
        self.provider = f"TensorRT {trt.__version__} ({self.profile}, {trtx.sm_tag(info['compute_capability'])})"
        self.engines, self.contexts, self.io = {}, {}, {}
        logger = trt.Logger(trt.Logger.WARNING)
        for graph, path in paths.items():
            engine = trtx.load_engine(path, logger)
            if engine is None:
                raise BlipDiffError(f"{path}: the TensorRT engine failed to load (see the log); rebuild it "
                                    "(--build-engines)")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = self.output_names(graph)
            missing = [o for o in outputs if o not in names]
            if missing:
                raise BlipDiffError(f"{path}: no output {', '.join(missing)} (tensors: {names})")
            low, _, high = engine.get_tensor_profile_shape(inputs[0], 0)
            self.io[graph] = {"inputs": {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in inputs},
                              "outputs": [(o, _torch_dtype(trt, engine.get_tensor_dtype(o))) for o in outputs],
                              "batch": (int(low[0]), int(high[0]))}
            self.engines[graph] = engine
        # one activation memory for all contexts: the engines never run at the same time
        self.memory_sizes = {g: device_memory_size(e) for g, e in self.engines.items()}
        self.device_memory = aligned_empty((max(self.memory_sizes.values(), default=0),), torch.uint8, self.device)
        for graph, engine in self.engines.items():
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise BlipDiffError(f"{graph}: TensorRT could not create an execution context (see the log)")
            ptr, size = self.device_memory.data_ptr(), self.memory_sizes[graph]
            if hasattr(context, "set_device_memory"):  # TensorRT 10.1+
                context.set_device_memory(ptr, size)
            else:
                context.device_memory = ptr
            self.contexts[graph] = context
        self.stream = torch.cuda.Stream(self.device)
        log.info("TensorRT engines (%s) from %s; %.1f MiB of shared activation memory (%s)", self.profile,
                 self.engine_dir, self.device_memory.numel() / 2**20,
                 ", ".join(f"{g} {n / 2**20:.1f}" for g, n in self.memory_sizes.items()))

    def _bind(self, graph: str, context, name: str, tensor: torch.Tensor) -> None:
        ptr = tensor.data_ptr()
        if ptr % ALIGNMENT or not context.set_tensor_address(name, ptr):
            raise BlipDiffError(f"{graph}: TensorRT refused the address {ptr:#x} of {name} "
                                f"({tuple(tensor.shape)} {tensor.dtype}; needs {ALIGNMENT}-byte alignment)")

    def _outputs(self, graph: str, feeds: Mapping[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        io, context = self.io[graph], self.contexts[graph]
        batch = len(next(iter(feeds.values())))
        outs = []
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the inputs were made there
        with torch.cuda.stream(self.stream):
            for start, stop, rows in chunks(batch, *io["batch"]):
                part = {}
                for key, tensor in feeds.items():  # a fresh, aligned copy: never a view into the caller's tensor
                    x = aligned_empty((rows, *tensor.shape[1:]), io["inputs"][key], self.device)
                    x[: stop - start].copy_(tensor[start:stop])
                    if rows > stop - start:  # below the profile's minimum: copies of the last row
                        x[stop - start:].copy_(tensor[stop - 1: stop].expand(rows - (stop - start), *tensor.shape[1:]))
                    part[key] = x
                shapes = output_shape(graph, {k: tuple(v.shape) for k, v in part.items()}, self.num_query,
                                      self.hidden, self.text_length, self.vae_scale_factor, residuals=self.residuals)
                shapes = shapes if isinstance(shapes, list) else [shapes]
                buffers = [aligned_empty(shape, dtype, self.device) for shape, (_, dtype) in zip(shapes, io["outputs"])]
                for key, x in part.items():
                    if not context.set_input_shape(key, tuple(x.shape)):
                        low, _, high = self.engines[graph].get_tensor_profile_shape(key, 0)
                        raise BlipDiffError(f"{graph}: input {key} of shape {tuple(x.shape)} is outside the "
                                            f"engine's profile {self.profile} ({tuple(low)} to {tuple(high)}); build "
                                            "engines for this size (--trt-profile dynamic, --build-engines)")
                    self._bind(graph, context, key, x)
                for (name, _), shape, out in zip(io["outputs"], shapes, buffers):
                    got = tuple(context.get_tensor_shape(name))
                    if -1 not in got and got != shape:
                        raise BlipDiffError(f"{graph}: TensorRT gives {name} of shape {got}, expected {shape}")
                    self._bind(graph, context, name, out)
                if not context.execute_async_v3(self.stream.cuda_stream):
                    raise BlipDiffError(f"{graph}: TensorRT execution failed (see the log)")
                # the context's shapes and addresses are rebound by the next chunk: wait for this one
                self.stream.synchronize()
                outs.append([out[: stop - start] for out in buffers])
        return [torch.cat(parts).to(torch.float32) for parts in zip(*outs)]

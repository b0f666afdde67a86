"""A stand-in `tensorrt` module for tests without a GPU: the builder side (network, parser,
profile, config, timing cache) records its calls; the runtime side (engine, execution
context) behaves as TensorRT 10/11's Python API where this project's serving depends on it:

- an engine is what the stand-in builder wrote: its graph, IO tensors with their dtypes, and
  the optimisation profile's (min, opt, max) shapes;
- `set_input_shape` returns False outside the profile (and for an unknown name);
- `set_tensor_address` returns False for an unknown name, a null pointer or one that is not
  256-byte aligned, and then keeps the previous address, as TensorRT does;
- `create_execution_context(USER_MANAGED)` gives a context without activation memory:
  `execute_async_v3` fails until `set_device_memory` (or the `device_memory` property) gave it
  `device_memory_size_v2` bytes, 256-byte aligned;
- `execute_async_v3` checks every input shape and address is set and, on CPU tensors, reads the
  inputs at their addresses and writes a simple row-wise function of them at the output
  addresses (`reference` computes the same on torch tensors), so that chunking, padding and
  the addresses bound are checked by the values that come back. It records the stream.

`OptimizationProfile.set_shape` raises on min > opt or opt > max, as TensorRT's does.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np
import torch

D = 768
ALIGNMENT = 256

# each graph's inputs as the exporter writes them (-1: dynamic axis)
GRAPH_INPUTS = {
    "subject_encoder": {"pixel_values": (-1, 3, 224, 224), "input_ids": (-1, -1), "attention_mask": (-1, -1)},
    "text_encoder": {"input_ids": (-1, 77), "subject_embeds": (-1, 16, D), "has_subject": (-1,)},
    "unet": {"sample": (-1, 4, -1, -1), "timestep": (-1,), "encoder_hidden_states": (-1, 77, D)},
    "vae_decoder": {"latents": (-1, 4, -1, -1)},
}
OUTPUTS = {"subject_encoder": ["subject_embeds"], "text_encoder": ["text_embeds"], "unet": ["noise_pred"],
           "unet_control": ["noise_pred"], "vae_decoder": ["images"]}
INT_INPUTS = {"input_ids": "INT64", "attention_mask": "INT64", "has_subject": "BOOL"}


class Flag(enum.IntEnum):  # TensorRT 10's values
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class Flag11(enum.IntEnum):  # TensorRT 11: strongly typed always; the flag kept (ignored), EXPLICIT_BATCH gone
    STRONGLY_TYPED = 0


def graph_inputs_of(hidden: int = D, num_query: int = 16, text_length: int = 77, image_size: int = 224,
                    residuals: tuple[tuple[int, int], ...] = ()) -> dict[str, dict[str, tuple[int, ...]]]:
    """The graphs' inputs for other model sizes (and the ControlNet pair when `residuals`)."""
    inputs = {
        "subject_encoder": {"pixel_values": (-1, 3, image_size, image_size), "input_ids": (-1, -1),
                            "attention_mask": (-1, -1)},
        "text_encoder": {"input_ids": (-1, text_length), "subject_embeds": (-1, num_query, hidden),
                         "has_subject": (-1,)},
        "unet": {"sample": (-1, 4, -1, -1), "timestep": (-1,), "encoder_hidden_states": (-1, text_length, hidden)},
        "vae_decoder": {"latents": (-1, 4, -1, -1)},
    }
    if residuals:
        names = [f"down_{i}" for i in range(len(residuals) - 1)] + ["mid"]
        inputs["controlnet"] = {**inputs["unet"], "controlnet_cond": (-1, 3, -1, -1)}
        inputs["unet_control"] = {**inputs["unet"], **{n: (-1, c, -1, -1) for n, (c, _) in zip(names, residuals)}}
    return inputs


# ------------------------------------------------------------------ what an engine computes
def reference(graph: str, feeds: dict[str, torch.Tensor], dims: dict) -> list[torch.Tensor]:
    """The stand-in engine's outputs for `feeds` (float32, row-wise: row b depends on the
    inputs' row b only)."""
    f = {k: v.to(torch.float32) for k, v in feeds.items()}
    b = len(next(iter(f.values())))

    def row_mean(x):
        return x.reshape(b, -1).mean(dim=1)

    if graph == "subject_encoder":
        ids = (f["input_ids"] * f["attention_mask"]).sum(dim=1) * 1e-3
        q = torch.arange(dims["num_query"], dtype=torch.float32)[None, :, None] * 0.01
        return [(row_mean(f["pixel_values"]) + ids)[:, None, None] + q + torch.zeros(1, 1, dims["hidden"])]
    if graph == "text_encoder":
        base = f["input_ids"][:, :, None] * 1e-3 + torch.zeros(1, 1, dims["hidden"])
        return [base + (row_mean(f["subject_embeds"]) * f["has_subject"])[:, None, None]]
    if graph in ("unet", "unet_control"):
        out = 0.5 * f["sample"] + (1e-3 * f["timestep"] + row_mean(f["encoder_hidden_states"]))[:, None, None, None]
        if graph == "unet_control":
            names = [n for n in f if n.startswith("down_") or n == "mid"]
            out = out + sum(row_mean(f[n]) for n in names)[:, None, None, None]
        return [out]
    if graph == "controlnet":
        _, _, h, w = f["sample"].shape
        base = row_mean(f["sample"]) + row_mean(f["controlnet_cond"]) + f["timestep"] * 1e-3
        return [(base + k)[:, None, None, None].expand(b, c, h // s, w // s).clone()
                for k, (c, s) in enumerate(dims["residuals"])]
    if graph == "vae_decoder":
        up = torch.nn.functional.interpolate(torch.tanh(f["latents"][:, :3]), scale_factor=dims["vae_scale_factor"])
        return [up]
    raise KeyError(graph)


def output_shapes(graph: str, shapes: dict[str, tuple[int, ...]], dims: dict) -> dict[str, tuple[int, ...]]:
    """What TensorRT's shape inference gives for the outputs of `graph` at these input shapes."""
    feeds = {n: torch.zeros(s, dtype=torch.float32) for n, s in shapes.items()}
    outs = reference(graph, feeds, dims)
    return dict(zip(output_names(graph, dims), (tuple(o.shape) for o in outs)))


def output_names(graph: str, dims: dict) -> list[str]:
    if graph == "controlnet":
        return [f"down_{i}" for i in range(len(dims["residuals"]) - 1)] + ["mid"]
    return OUTPUTS[graph]


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}


def _read(ptr: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    np_dtype = np.dtype(_NP[dtype])
    count = int(np.prod(shape)) if shape else 1
    raw = (ctypes.c_char * (count * np_dtype.itemsize)).from_address(ptr)
    return torch.from_numpy(np.frombuffer(raw, dtype=np_dtype, count=count).reshape(shape).copy())


def _write(ptr: int, value: torch.Tensor, dtype: str) -> None:
    np_dtype = np.dtype(_NP[dtype])
    data = value.detach().cpu().numpy().astype(np_dtype, copy=False).ravel()
    ctypes.memmove(ptr, data.ctypes.data, data.nbytes)


# ------------------------------------------------------------------ the module
def make_fake_trt(version: str = "10.13.0.35", graph_inputs=GRAPH_INPUTS, flags=Flag, dims: dict | None = None,
                  device_memory: dict[str, int] | None = None):
    """TensorRT 10 by default; `make_fake_trt("11.1.0.8", flags=Flag11)` for 11. `dims`: what shape inference and `reference` need (num_query, hidden, vae_scale_factor,
    residuals); `device_memory`: each graph's activation memory in bytes."""
    calls: list[tuple] = []
    fake = types.ModuleType("tensorrt")
    fake.__version__ = version
    fake.calls = calls
    fake.parser_errors = []
    fake.fail_build = False
    fake.dims = {"num_query": 16, "hidden": D, "vae_scale_factor": 8, "residuals": (), **(dims or {})}
    fake.device_memory = {"subject_encoder": 3 << 20, "text_encoder": 2 << 20, "unet": 40 << 20,
                          "vae_decoder": 20 << 20, "controlnet": 30 << 20, "unet_control": 40 << 20,
                          **(device_memory or {})}
    fake.contexts = []  # every execution context created
    fake.NetworkDefinitionCreationFlag = flags
    fake.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    fake.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT", NONE="NONE")
    fake.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64", BOOL="BOOL",
                                          INT8="INT8")
    fake.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE",
                                                                    USER_MANAGED="USER_MANAGED")

    class Logger:
        WARNING, INFO, ERROR = "W", "I", "E"

        def __init__(self, severity=None):
            self.severity = severity

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            assert isinstance(path, str)
            graph = Path(path).name.split(".")[0]
            self.network.inputs = [types.SimpleNamespace(name=n, shape=s) for n, s in graph_inputs[graph].items()]
            self.network.graph = graph
            return not fake.parser_errors

        @property
        def num_errors(self):
            return len(fake.parser_errors)

        def get_error(self, i):
            return fake.parser_errors[i]

    class Cache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+"

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):  # a strongly typed build sets none
            calls.append(("set_flag", flag))

        def create_timing_cache(self, blob):
            calls.append(("create_timing_cache", bytes(blob)))
            return Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            calls.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))
            if not (len(mn) == len(opt) == len(mx)) or any(a > b for a, b in zip(mn, opt)) or \
                    any(a > b for a, b in zip(opt, mx)):
                raise ValueError(f"set_shape({name}): min {tuple(mn)} <= opt {tuple(opt)} <= max {tuple(mx)} "
                                 "does not hold")
            self.shapes[name] = [list(map(int, s)) for s in (mn, opt, mx)]

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            calls.append(("build", network.graph))
            assert len(config.profiles) == 1
            if fake.fail_build:
                return None
            graph = network.graph
            tensors = {i.name: ["INPUT", INT_INPUTS.get(i.name, "FLOAT")] for i in network.inputs}
            tensors.update({o: ["OUTPUT", "FLOAT"] for o in output_names(graph, fake.dims)})
            plan = {"graph": graph, "tensors": tensors, "profile": config.profiles[0].shapes}
            return b"PLAN|" + json.dumps(plan).encode()

    class Engine:
        def __init__(self, plan: dict):
            self.graph, self.tensors, self.profile = plan["graph"], plan["tensors"], plan["profile"]
            self.names = list(self.tensors)

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.tensors[name][0]

        def get_tensor_dtype(self, name):
            return self.tensors[name][1]

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return [tuple(s) for s in self.profile[name]]

        @property
        def device_memory_size_v2(self):
            return fake.device_memory[self.graph]

        def create_execution_context(self, strategy="STATIC"):
            context = Context(self, strategy)
            fake.contexts.append(context)
            calls.append(("create_execution_context", self.graph, strategy))
            return context

    class Context:
        def __init__(self, engine: Engine, strategy: str):
            self.engine, self.strategy = engine, strategy
            self.shapes, self.addresses, self.streams = {}, {}, []
            self.memory = None if strategy == "USER_MANAGED" else (0, engine.device_memory_size_v2)

        def set_device_memory(self, ptr, size):
            if ptr % ALIGNMENT or size < self.engine.device_memory_size_v2:
                raise ValueError(f"set_device_memory: {size} bytes at {ptr:#x}, needs "
                                 f"{self.engine.device_memory_size_v2} bytes, {ALIGNMENT}-byte aligned")
            self.memory = (ptr, size)

        def set_input_shape(self, name, shape):
            if self.engine.tensors.get(name, [None])[0] != "INPUT":
                return False
            low, _, high = self.engine.profile[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if self.engine.tensors[name][0] == "INPUT":
                return self.shapes.get(name, (-1,))
            if set(self.shapes) != {n for n, t in self.engine.tensors.items() if t[0] == "INPUT"}:
                return (-1,)
            return output_shapes(self.engine.graph, self.shapes, fake.dims)[name]

        def set_tensor_address(self, name, ptr):
            if name not in self.engine.tensors or not ptr or ptr % ALIGNMENT:
                return False  # the previous address stays bound
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            calls.append(("execute", self.engine.graph, stream_handle))
            self.streams.append(stream_handle)
            inputs = [n for n, t in self.engine.tensors.items() if t[0] == "INPUT"]
            if self.memory is None or set(inputs) - set(self.shapes) or set(self.engine.tensors) - set(self.addresses):
                return False
            feeds = {n: _read(self.addresses[n], self.shapes[n], self.engine.tensors[n][1]) for n in inputs}
            for name, value in zip(output_names(self.engine.graph, fake.dims),
                                   reference(self.engine.graph, feeds, fake.dims)):
                _write(self.addresses[name], value, self.engine.tensors[name][1])
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            calls.append(("deserialize", data[:12]))
            if not data.startswith(b"PLAN|"):
                return None
            return Engine(json.loads(data[5:]))

    fake.Logger, fake.Builder, fake.OnnxParser, fake.Runtime = Logger, Builder, Parser, Runtime
    return fake


class FakeStream:
    """torch.cuda.Stream for CPU tests: a handle, no-op synchronisation. Handle 0 is the legacy
    default stream (torch.cuda.current_stream() in a fresh process)."""

    _next = 0x7F00

    def __init__(self, device=None, handle: int | None = None):
        if handle is None:
            FakeStream._next += 0x10
            handle = FakeStream._next
        self.cuda_stream = handle
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other.cuda_stream)

    def synchronize(self):
        pass


def patch_cuda(monkeypatch) -> FakeStream:
    """torch.cuda's stream calls as on a GPU, for TensorRT serving on CPU tensors; returns the
    legacy default stream."""
    import contextlib

    default = FakeStream(handle=0)
    state = {"current": default}

    @contextlib.contextmanager
    def stream(s):
        previous, state["current"] = state["current"], s
        try:
            yield
        finally:
            state["current"] = previous

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    return default

"""Exporting the graphs of `graphs.SPECS` to ONNX: `export_all` writes `<name>.onnx` (and
its fp16 twin) per graph into a folder, and returns their descriptions.

The export copies compute attention as their spec's `attention` says: the UNet, VAE and
ControlNet pair through torch's SDPA with a constant scale (Q and K pre-scaled, the pattern
TensorRT fuses), the text and subject encoders with transformers' `eager`; the parity check
(`parity`) compares the graphs with the original modules, as the Python pipeline runs them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from components.core.errors import BlipDiffError
from components.export.files import graph_bytes, save_graph
from components.export.fp16 import convert_fp16
from components.export.graphs import Dims, get_spec, graphs_of, sample_inputs
from components.model.blip_diffusion import BlipDiffusion

log = logging.getLogger(__name__)

OPSETS = (18, 19)
EXPORTER = "torch.onnx.export(dynamo=False)"


def export_attention(module: nn.Module, kind: str) -> nn.Module:
    """The attention an export copy computes (its spec's `attention`): "sdpa", diffusers'
    `AttnProcessor2_0` on a UNet, VAE or ControlNet (exported under `constant_attention_scale`);
    "eager", transformers' `eager` on every config the copy's layers read (sub-configs
    included) and diffusers' `AttnProcessor`."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind not in ("sdpa", "eager"):
        raise BlipDiffError(f"unknown export attention {kind!r}; choose sdpa or eager")
    if hasattr(module, "set_attn_processor"):
        processor = AttnProcessor2_0 if kind == "sdpa" else AttnProcessor
        module.set_attn_processor(processor())
        wrong = sorted({type(p).__name__ for p in module.attn_processors.values()} - {processor.__name__})
        if wrong:
            raise BlipDiffError(f"{type(module).__name__}: attention processors {wrong} left after "
                                f"{processor.__name__}()")
        return module
    if kind == "sdpa":
        raise BlipDiffError(f"{type(module).__name__}: sdpa export attention is for diffusers modules")
    configs = {id(m.config): m.config for m in module.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    for config in configs.values():
        config._attn_implementation = "eager"  # recursive on sub-configs
    wrong = [c._attn_implementation for c in configs.values() if c._attn_implementation != "eager"]
    if wrong:
        raise BlipDiffError(f"{type(module).__name__}: attention implementation {wrong} could not be set to eager")
    return module


@contextlib.contextmanager
def constant_attention_scale() -> Iterator[None]:
    """While exporting: `F.scaled_dot_product_attention` called without `scale` (diffusers'
    AttnProcessor2_0) gets its default, 1/sqrt(head dim), as a number. The exporter then writes
    Q and K each multiplied by a constant sqrt(scale), which TensorRT's multi-head attention
    fusion matches, instead of a scale computed from the query's runtime Shape."""
    sdpa = F.scaled_dot_product_attention

    def with_scale(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if scale is None:
            scale = 1.0 / math.sqrt(int(query.shape[-1]))
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)

    F.scaled_dot_product_attention = with_scale
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def attention_pattern(proto) -> dict:
    """How a graph's attention is laid out for TensorRT: every Softmax; those in the fusable
    pattern (Softmax of a MatMul whose two inputs are each a Mul by a constant, the K side
    through a Transpose, as torch's SDPA export writes Q·Kᵀ pre-scaled); and those with a Cast
    next to them (a Softmax kept in fp32 inside an fp16 graph, which the fusion does not cross)."""
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def scaled(name: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == "Mul" and any(i in constants for i in node.input)

    softmax = [n for n in proto.graph.node if n.op_type == "Softmax"]
    fusable = cast = 0
    for n in softmax:
        matmul = producer.get(n.input[0])
        if matmul is not None and matmul.op_type == "MatMul" and all(scaled(i) for i in matmul.input):
            fusable += 1
        if (producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "Cast") or \
                any(c.op_type == "Cast" for c in consumers.get(n.output[0], [])):
            cast += 1
    return {"softmax": len(softmax), "fusable": fusable, "softmax_with_casts": cast}


def wrapper(name: str, model: BlipDiffusion, dims: Dims) -> nn.Module:
    """The export copy of one graph (the bundle's modules are left as they are)."""
    spec = get_spec(name, dims.residuals)
    return spec.wrapper(export_attention(copy.deepcopy(spec.source(model)), spec.attention), dims).eval()


def _set_output_shapes(proto, shapes: list[list[int | str]]) -> None:
    if len(shapes) != len(proto.graph.output):
        raise BlipDiffError(f"the graph has {len(proto.graph.output)} outputs, its spec {len(shapes)}")
    for output, shape in zip(proto.graph.output, shapes):
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise BlipDiffError(f"{output.name}: the graph's output has rank {len(dims)}, expected {shape}")
        for dim, want in zip(dims, shape):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def export_graph(name: str, model: BlipDiffusion, dims: Dims, folder: Path, opset: int, batch: int,
                 device: torch.device, seed: int = 0) -> dict:
    """Export one graph to `folder/<name>.onnx` (external data when large); its description."""
    import onnx

    if opset not in OPSETS:
        raise BlipDiffError(f"opset {opset}: choose one of {', '.join(map(str, OPSETS))}")
    if batch < 2:
        raise BlipDiffError(f"export batch {batch}: must be >= 2 (a dynamic dim exported at 1 is specialised)")
    spec = get_spec(name, dims.residuals)
    graph = wrapper(name, model, dims).to(device)
    example = sample_inputs(name, model, dims, batch, torch.Generator().manual_seed(seed))
    args = tuple(example[k].to(device) for k in spec.inputs)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=folder) as scratch:
        raw = Path(scratch) / f"{name}.onnx"
        with torch.no_grad(), warnings.catch_warnings(), constant_attention_scale():
            # Python-level checks on traced sizes (e.g. "if input_ids.shape[0] != batch") warn
            # that they are traced as constants; none of them decides the computation, which
            # the parity check verifies at other batch sizes, text lengths and latent sizes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, args, str(raw), dynamo=False, opset_version=opset, input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes,
                              do_constant_folding=True)
        del graph
        weight_bytes = sum(p.stat().st_size for p in Path(scratch).iterdir())
        proto = onnx.load(str(raw))  # external data, if torch wrote any, is read in
        shapes = spec.output_shape(model, dims)
        _set_output_shapes(proto, shapes if len(spec.outputs) > 1 else [shapes])
        external = save_graph(proto, folder / f"{name}.onnx", weight_bytes)
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(folder / f"{name}.onnx"))
    log.info("exported %s (%.1f MB%s) in %.1f s", name, graph_bytes(folder, name) / 1e6,
             ", external data" if external else "", seconds)
    return {"file": f"{name}.onnx", "external_data": f"{name}.onnx.data" if external else None,
            **describe(onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
            "export_batch": batch}


def describe(proto) -> dict:
    """Input and output names, element types and shapes (symbolic names for dynamic dims)."""
    import onnx

    def one(value) -> dict:
        kind = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in kind.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).name,
                "shape": shape}

    return {"inputs": [one(v) for v in proto.graph.input], "outputs": [one(v) for v in proto.graph.output],
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


def export_all(model: BlipDiffusion, folder: Path, opset: int = 18, batch: int = 2, fp16: bool = True,
               device: str | torch.device = "cpu", seed: int = 0, graphs: tuple[str, ...] | None = None) -> dict:
    """Every graph (default: the bundle's, `graphs_of`) into `folder`; {name: description}
    (with `fp16` when converted)."""
    if len(model.controlnets) > 1:
        raise BlipDiffError(f"an export holds one ControlNet; the model has {len(model.controlnets)}")
    graphs = graphs_of(model) if graphs is None else graphs
    folder.mkdir(parents=True, exist_ok=True)
    dims = Dims.of(model)
    device = torch.device(device)
    if device.type != "cpu":
        model.to(device)
    try:
        out = {}
        for name in graphs:
            out[name] = export_graph(name, model, dims, folder, opset, batch, device, seed)
            if fp16:
                spec = get_spec(name, dims.residuals)
                out[name]["fp16"] = convert_fp16(name, folder, spec.fp32_scopes, spec.attention)
    finally:
        if device.type != "cpu":
            model.to("cpu")
    return out

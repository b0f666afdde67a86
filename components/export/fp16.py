"""The fp16 twin of an exported graph, `<name>.fp16.onnx`, for GPUs: weights and compute in
fp16, inputs and outputs kept fp32, and what loses too much in fp16 kept in fp32."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from components.export.files import graph_bytes, save_graph
from components.export.graphs import get_spec

log = logging.getLogger(__name__)

# Kept in fp32 in the fp16 graphs: normalisations (their sums and variances lose too much in
# fp16), on top of ONNX Runtime's default list (ops without fp16 kernels); and the Softmax of
# graphs with eager attention. A graph with "sdpa" attention keeps its Softmax in fp16: its
# scores are pre-scaled (no fp16 overflow of unscaled Q·Kᵀ), and Casts around the Softmax
# would keep TensorRT from fusing the attention. A graph's own fp32 scopes (the UNet's timestep
# embedding) are in its spec (`fp32_scopes`).
FP16_KEEP_FP32 = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")


def kept_fp32_ops(attention: str) -> tuple[str, ...]:
    """The op types an fp16 graph keeps in fp32, for its spec's `attention`."""
    return FP16_KEEP_FP32 + (("Softmax",) if attention == "eager" else ())


def _fp32_island(proto, scopes: tuple[str, ...]) -> list[str]:
    """Names of the nodes under `scopes`, made one fp32 island for the fp16 converter: it
    casts every blocked node's output back to fp16 when it knows the value's type, so the
    types of the values passed only between island nodes are dropped (from shape inference's
    value_info): they stay fp32, and only the island's inputs and outputs are cast."""
    if not scopes:
        return []
    island = [n for n in proto.graph.node if n.name.startswith(scopes)]
    names = {id(n) for n in island}
    produced = {o for n in island for o in n.output}
    used_outside = {i for n in proto.graph.node if id(n) not in names for i in n.input}
    used_outside |= {o.name for o in proto.graph.output}
    internal = produced - used_outside
    kept = [v for v in proto.graph.value_info if v.name not in internal]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return [n.name for n in island]


def convert_fp16(name: str, folder: Path, fp32_scopes: tuple[str, ...] | None = None,
                 attention: str | None = None) -> dict:
    """`<name>.fp16.onnx`: weights and compute in fp16, inputs and outputs kept fp32, the
    normalisations, eager attention's softmax and `fp32_scopes` in fp32 (`fp32_scopes` and
    `attention` default to the spec's; UNet: its timestep embedding, sdpa)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # Its INFO lines list every initializer shared by fp32 and fp16 nodes (it keeps both copies).
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{name}.fp16.", dir=folder) as scratch:
        # Shape inference on the file (in memory it would fail past protobuf's 2 GiB).
        inferred = Path(scratch) / f"{name}.onnx"
        onnx.shape_inference.infer_shapes_path(str(folder / f"{name}.onnx"), str(inferred))
        proto = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
    attention = get_spec(name).attention if attention is None else attention
    blocked_nodes = _fp32_island(proto, get_spec(name).fp32_scopes if fp32_scopes is None else fp32_scopes)
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(kept_fp32_ops(attention)),
                                     node_block_list=blocked_nodes)
    # The converter appends the casts of kept-fp32 inputs at the end: ONNX wants nodes in order.
    sorter = OnnxModel(proto)
    sorter.topological_sort(is_deterministic=True)
    proto = sorter.model
    weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    external = save_graph(proto, folder / f"{name}.fp16.onnx", weight_bytes)
    onnx.checker.check_model(str(folder / f"{name}.fp16.onnx"))
    log.info("converted %s to fp16 (%.1f MB) in %.1f s", name, graph_bytes(folder, name, fp16=True) / 1e6,
             time.perf_counter() - start)
    return {"file": f"{name}.fp16.onnx", "external_data": f"{name}.fp16.onnx.data" if external else None,
            "kept_fp32_ops": sorted(kept_fp32_ops(attention)), "kept_fp32_nodes": len(blocked_nodes)}

"""ONNX graphs of a BLIP-Diffusion bundle, and their parity with PyTorch under ONNX Runtime.

Four graphs, each a small wrapper module exported with `torch.onnx.export(dynamo=False)`,
named inputs and outputs, the batch dynamic everywhere:

- `subject_encoder`: pixel_values (B,3,S,S), input_ids (B,L), attention_mask (B,L) ->
  subject_embeds (B,Q,D): the Q-Former with its image encoder and projection, what
  `BlipDiffusion.subject_embeddings` computes before the mean over reference images. The
  image preprocessing stays in Python (`ImageProcessorConfig`).
- `text_encoder`: input_ids (B,77), subject_embeds (B,Q,D), has_subject (B,) -> text_embeds
  (B,77,D). Both classifier-free-guidance branches in one graph: a row with has_subject
  is the context text encoder with the subject embeddings spliced in at `ctx_begin_pos`
  (`encode_prompts`), a row without is the plain text encoder over all 77 ids
  (`encode_negative`). The splice is a gather with one of two constant index rows.
- `unet`: sample (B,4,h,w), timestep (B,), encoder_hidden_states (B,77,D) -> noise_pred.
- `vae_decoder`: latents (B,4,h,w), already divided by the scaling factor -> images
  (B,3,8h,8w) in [-1, 1], what `vae.decode(...).sample` returns.

The export copies use plain (non-SDPA) attention: transformers' `eager` and diffusers'
`AttnProcessor`; the parity check compares the graphs with the original modules, as the
Python pipeline runs them.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.core.errors import BlipDiffError
from components.model.blip_diffusion import BlipDiffusion

log = logging.getLogger(__name__)

GRAPHS = ("subject_encoder", "text_encoder", "unet", "vae_decoder")
# Gate of the fp32 graphs: ONNX Runtime (CPU provider) against PyTorch fp32, max abs diff.
TOLERANCES = {"subject_encoder": 1e-4, "text_encoder": 1e-4, "unet": 1e-4, "vae_decoder": 3e-4}
OPSETS = (18, 19)
EXPORTER = "torch.onnx.export(dynamo=False)"
# Protobuf cannot hold a message over 2 GiB: larger graphs keep their weights beside them in
# one `<name>.onnx.data` file (the released UNet: 3.4 GB in fp32).
EXTERNAL_DATA_BYTES = 2_000_000_000
# Kept in fp32 in the fp16 graphs: normalisations and softmax (their sums and variances
# lose too much in fp16), on top of ONNX Runtime's default list (ops without fp16 kernels).
FP16_KEEP_FP32 = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax")
# ... and the UNet's sinusoidal timestep embedding: timestep (up to 999) x frequency in fp16
# is off by up to ~0.5 rad, so diffusers computes it in fp32 too.
FP16_KEEP_FP32_SCOPES = {"unet": ("/unet/time_proj/",)}
PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Dims:
    """The sizes a graph's inputs depend on, read from the bundle."""

    image_size: int  # S: the Q-Former's image encoder input
    num_query: int  # Q: subject embeddings per subject
    hidden: int  # D: the text encoder's width (= the subject embeddings')
    text_length: int  # 77: the text encoder's positions
    latent_channels: int
    latent_size: int  # the UNet's configured sample size
    latent_multiple: int  # latent height and width must be multiples of this (the UNet's down/up sampling)
    vae_scale_factor: int
    ctx_begin_pos: int

    @classmethod
    def of(cls, model: BlipDiffusion) -> "Dims":
        unet = model.unet
        return cls(
            image_size=int(model.qformer.config.vision_config.image_size),
            num_query=int(model.qformer.query_tokens.shape[1]),
            hidden=int(model.text_encoder.config.hidden_size),
            text_length=int(model.text_encoder.config.max_position_embeddings),
            latent_channels=int(unet.config.in_channels),
            latent_size=int(unet.config.sample_size),
            latent_multiple=2 ** sum(1 for b in unet.down_blocks if b.downsamplers is not None),
            vae_scale_factor=model.vae_scale_factor,
            ctx_begin_pos=int(model.ctx_begin_pos),
        )


# ---------------------------------------------------------------------- wrappers
class SubjectEncoderGraph(nn.Module):
    def __init__(self, qformer: nn.Module):
        super().__init__()
        self.qformer = qformer

    def forward(self, pixel_values, input_ids, attention_mask):
        return self.qformer(pixel_values, input_ids, attention_mask)


class TextEncoderGraph(nn.Module):
    """The context text encoder with both guidance branches in one graph.

    Token embeddings E (B,L,D) and subject embeddings S (B,Q,D) are concatenated into
    (B,L+Q,D), then each row gathers L of them: with a subject, E[:p] S E[p:L-Q] (the
    prompt was tokenized to L-Q ids, p = ctx_begin_pos); without, E[:L]. Positions, the
    causal mask and the CLIP layers are transformers' modules of the text model.
    """

    def __init__(self, text_encoder: nn.Module, num_query: int, ctx_begin_pos: int):
        super().__init__()
        self.text_model = text_encoder.text_model
        length = text_encoder.config.max_position_embeddings
        p = ctx_begin_pos
        with_subject = [*range(p), *range(length, length + num_query), *range(p, length - num_query)]
        self.register_buffer("with_subject", torch.tensor(with_subject)[None], persistent=False)
        self.register_buffer("without_subject", torch.arange(length)[None], persistent=False)
        self.register_buffer("positions", torch.arange(length)[None], persistent=False)
        # Causal over the whole sequence, subject embeddings included, as ContextCLIPTextModel.
        mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        self.register_buffer("causal_mask", mask[None, None], persistent=False)

    def forward(self, input_ids, subject_embeds, has_subject):
        model = self.text_model
        tokens = model.embeddings.token_embedding(input_ids)
        both = torch.cat([tokens, subject_embeds.to(tokens.dtype)], dim=1)
        index = torch.where(has_subject[:, None], self.with_subject, self.without_subject)
        hidden = both.gather(1, index[:, :, None].expand(-1, -1, both.shape[2]))
        hidden = hidden + model.embeddings.position_embedding(self.positions)
        hidden = model.encoder(inputs_embeds=hidden, attention_mask=self.causal_mask.to(hidden.dtype)).last_hidden_state
        return model.final_layer_norm(hidden)


class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


# ---------------------------------------------------------------- graph inputs
def text_encoder_inputs(tokenizer, prompts: list[str], has_subject: list[bool], text_length: int,
                        num_query: int) -> dict[str, np.ndarray]:
    """`input_ids` and `has_subject` of the text_encoder graph for built prompts (see
    `BlipDiffusion.build_prompt`) and negative prompts, one row each.

    A row with a subject is tokenized as `BlipDiffusion.prompt_ids` does (to text_length -
    num_query ids: the room the subject embeddings take), then padded to text_length (the
    graph never reads those pads); a row without is tokenized to text_length, as
    `encode_negative`. Needs only the CLIP tokenizer, so serving can use it on an export folder.
    """
    if len(prompts) != len(has_subject):
        raise BlipDiffError(f"{len(prompts)} prompts but {len(has_subject)} has_subject flags")
    ids = np.full((len(prompts), text_length), tokenizer.pad_token_id, dtype=np.int64)
    for flag in (True, False):
        rows = [i for i, h in enumerate(has_subject) if bool(h) == flag]
        if not rows:
            continue
        length = text_length - num_query if flag else text_length
        tokens = tokenizer([prompts[i] for i in rows], padding="max_length", truncation=True, max_length=length,
                           return_tensors="np").input_ids
        ids[rows, :length] = tokens
    return {"input_ids": ids, "has_subject": np.asarray(has_subject, dtype=bool)}


CLASS_TEXTS = ("dog", "red backpack", "teapot", "stuffed animal toy")
PROMPTS = ("in the jungle", "on the beach, a photo", "floating in space")


def sample_inputs(name: str, model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                  latent_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Random inputs of one graph at a batch size (and latent size), from a seeded generator."""
    if name == "subject_encoder":
        text = model.qformer_tokenizer([CLASS_TEXTS[i % len(CLASS_TEXTS)] for i in range(batch)],
                                       return_tensors="pt", padding=True)
        return {"pixel_values": torch.randn(batch, 3, dims.image_size, dims.image_size, generator=generator),
                "input_ids": text.input_ids.long(), "attention_mask": text.attention_mask.long()}
    if name == "text_encoder":
        has = [i % 2 == 0 for i in range(batch)]  # conditioned and unconditioned rows mixed
        prompts = [BlipDiffusion.build_prompt(PROMPTS[i % len(PROMPTS)], CLASS_TEXTS[i % len(CLASS_TEXTS)],
                                              prompt_reps=3) if h else "low quality, blurry"
                   for i, h in enumerate(has)]
        arrays = text_encoder_inputs(model.tokenizer, prompts, has, dims.text_length, dims.num_query)
        return {"input_ids": torch.from_numpy(arrays["input_ids"]),
                "subject_embeds": torch.randn(batch, dims.num_query, dims.hidden, generator=generator),
                "has_subject": torch.from_numpy(arrays["has_subject"])}
    h, w = latent_hw or (dims.latent_size, dims.latent_size)
    latents = torch.randn(batch, dims.latent_channels, h, w, generator=generator)
    if name == "unet":
        return {"sample": latents,
                "timestep": torch.randint(0, 1000, (batch,), generator=generator).float(),
                "encoder_hidden_states": torch.randn(batch, dims.text_length, dims.hidden, generator=generator)}
    if name == "vae_decoder":
        return {"latents": latents}
    raise ValueError(f"unknown graph {name!r}; graphs: {', '.join(GRAPHS)}")


# ---------------------------------------------------------------------- export
SPECS = {
    "subject_encoder": (["pixel_values", "input_ids", "attention_mask"], ["subject_embeds"],
                        {"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "text_length"},
                         "attention_mask": {0: "batch", 1: "text_length"}, "subject_embeds": {0: "batch"}}),
    "text_encoder": (["input_ids", "subject_embeds", "has_subject"], ["text_embeds"],
                     {"input_ids": {0: "batch"}, "subject_embeds": {0: "batch"}, "has_subject": {0: "batch"},
                      "text_embeds": {0: "batch"}}),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"],
             {"sample": {0: "batch", 2: "latent_height", 3: "latent_width"}, "timestep": {0: "batch"},
              "encoder_hidden_states": {0: "batch"},
              "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"}}),
    "vae_decoder": (["latents"], ["images"],
                    {"latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
                     "images": {0: "batch", 2: "image_height", 3: "image_width"}}),
}


def output_shape(name: str, model: BlipDiffusion, dims: Dims) -> list[int | str]:
    """The output's shape, dynamic dims by name: written into the graph, whose own shape
    inference leaves some static dims as made-up names (e.g. "LayerNormalizationtext_embeds_dim_1")."""
    return {
        "subject_encoder": ["batch", dims.num_query, int(model.qformer.config.qformer_config.hidden_size)],
        "text_encoder": ["batch", dims.text_length, dims.hidden],
        "unet": ["batch", int(model.unet.config.out_channels), "latent_height", "latent_width"],
        "vae_decoder": ["batch", int(model.vae.config.out_channels), "image_height", "image_width"],
    }[name]


def _set_output_shape(proto, shape: list[int | str]) -> None:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise BlipDiffError(f"{proto.graph.output[0].name}: the graph's output has rank {len(dims)}, expected {shape}")
    for dim, want in zip(dims, shape):
        if isinstance(want, str):
            dim.dim_param = want
        else:
            dim.dim_value = want


def eager_attention(module: nn.Module) -> nn.Module:
    """Plain attention on an export copy: transformers' `eager` on every config the copy's
    layers read (sub-configs included), diffusers' `AttnProcessor` on a UNet or VAE."""
    from diffusers.models.attention_processor import AttnProcessor

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor())
        wrong = sorted({type(p).__name__ for p in module.attn_processors.values()} - {"AttnProcessor"})
        if wrong:
            raise BlipDiffError(f"{type(module).__name__}: attention processors {wrong} left after AttnProcessor()")
        return module
    configs = {id(m.config): m.config for m in module.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    for config in configs.values():
        config._attn_implementation = "eager"  # recursive on sub-configs
    wrong = [c._attn_implementation for c in configs.values() if c._attn_implementation != "eager"]
    if wrong:
        raise BlipDiffError(f"{type(module).__name__}: attention implementation {wrong} could not be set to eager")
    return module


def wrapper(name: str, model: BlipDiffusion, dims: Dims) -> nn.Module:
    """The export copy of one graph (the bundle's modules are left as they are)."""
    if name == "subject_encoder":
        graph = SubjectEncoderGraph(eager_attention(copy.deepcopy(model.qformer)))
    elif name == "text_encoder":
        graph = TextEncoderGraph(eager_attention(copy.deepcopy(model.text_encoder)), dims.num_query,
                                 dims.ctx_begin_pos)
    elif name == "unet":
        graph = UNetGraph(eager_attention(copy.deepcopy(model.unet)))
    elif name == "vae_decoder":
        graph = VaeDecoderGraph(eager_attention(copy.deepcopy(model.vae)))
    else:
        raise ValueError(f"unknown graph {name!r}; graphs: {', '.join(GRAPHS)}")
    return graph.eval()


def graph_files(folder: Path, name: str, fp16: bool = False) -> list[Path]:
    """The files of one graph: the graph and, when it has one, its external data file."""
    stem = f"{name}.fp16" if fp16 else name
    return [p for p in (folder / f"{stem}.onnx", folder / f"{stem}.onnx.data") if p.is_file()]


def graph_bytes(folder: Path, name: str, fp16: bool = False) -> int:
    return sum(p.stat().st_size for p in graph_files(folder, name, fp16))


def _save(proto, path: Path, weight_bytes: int) -> bool:
    """One file, or the graph plus one `<name>.onnx.data` when the weights pass 2 GB."""
    import onnx

    external = weight_bytes > EXTERNAL_DATA_BYTES
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return external


def export_graph(name: str, model: BlipDiffusion, dims: Dims, folder: Path, opset: int, batch: int,
                 device: torch.device, seed: int = 0) -> dict:
    """Export one graph to `folder/<name>.onnx` (external data when large); its description."""
    import onnx

    if opset not in OPSETS:
        raise BlipDiffError(f"opset {opset}: choose one of {', '.join(map(str, OPSETS))}")
    if batch < 2:
        raise BlipDiffError(f"export batch {batch}: must be >= 2 (a dynamic dim exported at 1 is specialised)")
    inputs_names, output_names, dynamic_axes = SPECS[name]
    graph = wrapper(name, model, dims).to(device)
    example = sample_inputs(name, model, dims, batch, torch.Generator().manual_seed(seed))
    args = tuple(example[k].to(device) for k in inputs_names)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=folder) as scratch:
        raw = Path(scratch) / f"{name}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Python-level checks on traced sizes (e.g. "if input_ids.shape[0] != batch") warn
            # that they are traced as constants; none of them decides the computation, which
            # the parity check verifies at other batch sizes, text lengths and latent sizes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, args, str(raw), dynamo=False, opset_version=opset, input_names=inputs_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        del graph
        weight_bytes = sum(p.stat().st_size for p in Path(scratch).iterdir())
        proto = onnx.load(str(raw))  # external data, if torch wrote any, is read in
        _set_output_shape(proto, output_shape(name, model, dims))
        external = _save(proto, folder / f"{name}.onnx", weight_bytes)
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(folder / f"{name}.onnx"))
    log.info("exported %s (%.1f MB%s) in %.1f s", name, graph_bytes(folder, name) / 1e6,
             ", external data" if external else "", seconds)
    return {"file": f"{name}.onnx", "external_data": f"{name}.onnx.data" if external else None,
            **describe(onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
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


def convert_fp16(name: str, folder: Path) -> dict:
    """`<name>.fp16.onnx`: weights and compute in fp16, inputs and outputs kept fp32, the
    normalisations, softmax and (UNet) timestep embedding in fp32."""
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
    blocked_nodes = _fp32_island(proto, FP16_KEEP_FP32_SCOPES.get(name, ()))
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32),
                                     node_block_list=blocked_nodes)
    # The converter appends the casts of kept-fp32 inputs at the end: ONNX wants nodes in order.
    sorter = OnnxModel(proto)
    sorter.topological_sort(is_deterministic=True)
    proto = sorter.model
    weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    external = _save(proto, folder / f"{name}.fp16.onnx", weight_bytes)
    onnx.checker.check_model(str(folder / f"{name}.fp16.onnx"))
    log.info("converted %s to fp16 (%.1f MB) in %.1f s", name, graph_bytes(folder, name, fp16=True) / 1e6,
             time.perf_counter() - start)
    return {"file": f"{name}.fp16.onnx", "external_data": f"{name}.fp16.onnx.data" if external else None,
            "kept_fp32_ops": sorted(FP16_KEEP_FP32), "kept_fp32_nodes": len(blocked_nodes)}


def export_all(model: BlipDiffusion, folder: Path, opset: int = 18, batch: int = 2, fp16: bool = True,
               device: str | torch.device = "cpu", seed: int = 0, graphs: tuple[str, ...] = GRAPHS) -> dict:
    """Every graph into `folder`; {name: description} (with `fp16` when converted)."""
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
                out[name]["fp16"] = convert_fp16(name, folder)
    finally:
        if device.type != "cpu":
            model.to("cpu")
    return out


# ---------------------------------------------------------------------- parity
def session(path: Path, provider: str = PROVIDER):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime-gpu without CUDA libraries: no warning per session
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a check, not a benchmark
    return ort.InferenceSession(str(path), options, providers=[provider])


@torch.no_grad()
def reference(name: str, model: BlipDiffusion, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """PyTorch fp32 on the CPU, the bundle's own modules (as the Python pipeline runs them)."""
    if name == "subject_encoder":
        out = model.qformer(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    elif name == "text_encoder":
        # Independent of the graph's gather: each row through ContextCLIPTextModel as
        # encode_prompts (with subject) or encode_negative (without) runs it.
        ids, embeds, has = inputs["input_ids"], inputs["subject_embeds"], inputs["has_subject"]
        num_query, out = embeds.shape[1], torch.empty(*ids.shape, model.text_encoder.config.hidden_size)
        if has.any():
            out[has] = model.text_encoder(ids[has][:, :ids.shape[1] - num_query], ctx_embeddings=embeds[has],
                                          ctx_begin_pos=model.ctx_begin_pos).last_hidden_state
        if (~has).any():
            out[~has] = model.text_encoder(ids[~has]).last_hidden_state
    elif name == "unet":
        out = model.unet(inputs["sample"], inputs["timestep"],
                         encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    else:
        out = model.vae.decode(inputs["latents"]).sample
    return out.float().numpy()


def compare(name: str, sess, inputs: dict[str, torch.Tensor], expected: np.ndarray) -> dict:
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = sess.run(None, feeds)[0]
    if got.shape != expected.shape:
        raise BlipDiffError(f"{name}: ONNX Runtime gave shape {got.shape}, PyTorch {expected.shape}")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "shapes": {k: list(v.shape) for k, v in inputs.items()}}


def parity_cases(name: str, dims: Dims, batch: int) -> list[tuple[int, tuple[int, int] | None]]:
    """(batch, latent size): the graph at a batch other than the export's; the UNet also at
    another, non-square latent size (dynamic height and width)."""
    cases = [(batch, None)]
    if name == "unet":
        m = dims.latent_multiple
        cases.append((batch, (max(m, dims.latent_size // 2 // m * m), dims.latent_size)))
    return cases


def check_parity(model: BlipDiffusion, folder: Path, graphs: dict, batch: int = 3, seed: int = 0,
                 provider: str = PROVIDER) -> dict:
    """ONNX Runtime against PyTorch fp32 on the same seeded random inputs, per graph (fp16
    graphs too, reported without a gate). Returns the parity report; `gate` judges it."""
    import onnxruntime as ort

    dims = Dims.of(model)
    report = {}
    for i, name in enumerate(graphs):
        cases = parity_cases(name, dims, batch)
        generator = torch.Generator().manual_seed(seed + i)
        inputs = [sample_inputs(name, model, dims, b, generator, hw) for b, hw in cases]
        expected = [reference(name, model, x) for x in inputs]
        entry = {}
        for kind in ("fp32", "fp16"):
            if kind == "fp16" and "fp16" not in graphs[name]:
                continue
            fp16 = kind == "fp16"
            path = folder / f"{name}{'.fp16' if fp16 else ''}.onnx"
            row = {"file": path.name, "size_bytes": graph_bytes(folder, name, fp16), "opset": graphs[name]["opset"],
                   "exporter": EXPORTER, "onnxruntime": ort.__version__,
                   "tolerance": None if fp16 else TOLERANCES[name]}
            try:
                sess = session(path, provider)
                row["provider"] = sess.get_providers()[0]
                runs = [compare(name, sess, x, y) for x, y in zip(inputs, expected)]
            except Exception as exc:  # an op without a kernel for this provider
                if not fp16:
                    raise BlipDiffError(f"{name}: ONNX Runtime could not run {path.name}: {exc}") from None
                row.update(provider=None, runnable=False, max_abs_diff=None, mean_abs_diff=None, passed=None,
                           error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                entry[kind] = row
                continue
            row["max_abs_diff"] = float(np.max([r["max_abs_diff"] for r in runs]))  # NaN stays NaN
            row["mean_abs_diff"] = float(np.mean([r["mean_abs_diff"] for r in runs]))
            row["passed"] = None if fp16 else bool(row["max_abs_diff"] <= TOLERANCES[name])
            row["runnable"] = True
            row["cases"] = runs
            entry[kind] = row
            log.info("parity %s %s on %s: max abs diff %.3g (mean %.3g)%s", name, kind, row["provider"],
                     row["max_abs_diff"], row["mean_abs_diff"],
                     "" if fp16 else f", tolerance {TOLERANCES[name]:g}")
        report[name] = entry
    return report


def gate(report: dict) -> None:
    """Raise naming every fp32 graph whose difference from PyTorch passes its tolerance."""
    bad = [f"{name}: max abs diff {e['fp32']['max_abs_diff']:.3g} > {e['fp32']['tolerance']:g}"
           for name, e in report.items() if not e["fp32"]["passed"]]
    if bad:
        raise BlipDiffError("ONNX graphs differ from PyTorch (ONNX Runtime, CPU): " + "; ".join(bad))


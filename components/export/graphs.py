"""The ONNX graphs of a BLIP-Diffusion bundle: one `GraphSpec` per graph, in `SPECS`.

Four graphs, each a small wrapper module exported with `torch.onnx.export(dynamo=False)`,
named inputs and outputs, the batch dynamic everywhere:

- `subject_encoder`: pixel_values (B,3,S,S), input_ids (B,L), attention_mask (B,L) ->
  subject_embeds (B,Q,D): the Q-Former with its image encoder and projection, what
  `BlipDiffusion.subject_embeddings` computes before the mean over reference images. The
  image preprocessing stays in Python (`ImageProcessorConfig`).
- `text_encoder`: input_ids (B,77), subject_embeds (B,Q,D), has_subject (B,) -> text_embeds
  (B,77,D). Both classifier-free-guidance branches in one graph: a row with has_subject
  is the context text encoder with the subject embeddings spliced in at `ctx_begin_pos`,
  a row without is the plain text encoder over all 77 ids (as `conditioning.encode_text`).
  The splice is a gather with one of two constant index rows.
- `unet`: sample (B,4,h,w), timestep (B,), encoder_hidden_states (B,77,D) -> noise_pred.
- `vae_decoder`: latents (B,4,h,w), already divided by the scaling factor -> images
  (B,3,8h,8w) in [-1, 1], what `vae.decode(...).sample` returns.

With a ControlNet in the bundle, two more (`CONTROL_GRAPHS`, built for the UNet's residual
layout by `control_specs`):

- `controlnet`: sample, timestep, encoder_hidden_states, controlnet_cond (B,3,8h,8w) in
  [0, 1] -> the residuals at scale 1: `down_0`..`down_{n-1}` and `mid` (12 + 1 for SD 1.5).
- `unet_control`: the UNet with the residuals as inputs (`down_*`, `mid`, already scaled and
  summed by the sampler) -> noise_pred. Generation without control runs the plain `unet`.

Adding a graph is adding its spec to `SPECS`: the export (`onnx_export`), the fp16 twins
(`fp16`), the parity check (`parity`), the TensorRT profiles (`tensorrt`) and serving's
output names read everything graph-specific from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from components.model.blip_diffusion import BlipDiffusion
from components.model.conditioning import encode_text, prompt_ids

Inputs = dict[str, torch.Tensor]
LatentHW = tuple[int, int] | None


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
    residuals: tuple[tuple[int, int], ...] = ()  # the UNet's ControlNet residuals: (channels, down factor), mid last

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
            residuals=residual_layout(unet.config),
        )


def residual_layout(config) -> tuple[tuple[int, int], ...]:
    """The residuals a ControlNet adds to a UNet of this config, as (channels, factor the latent
    sides are divided by): conv_in's output, every resnet layer and downsampler of the down
    blocks, then the mid block's (the last entry)."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out, factor = [(channels[0], 1)], 1
    for b, (c, n) in enumerate(zip(channels, layers)):
        out += [(c, factor)] * n
        if b < len(channels) - 1:
            factor *= 2
            out.append((c, factor))
    return (*out, (channels[-1], factor))


# The serving batch: images per UNet batch, the --batch-size default of `blipdiff generate` and
# `blipdiff batch`, and what the TensorRT profiles are tuned to (their opt and max). With
# classifier-free guidance the text encoder and the UNet (and the ControlNet pair) see two rows
# per image, the VAE decoder one. A larger call runs in profile-sized chunks; min 1 lets a
# smaller one (the last batch, guidance 1) run unpadded.
SERVING_BATCH = 8
GUIDED_ROWS = (1, 2 * SERVING_BATCH, 2 * SERVING_BATCH)
SUBJECT_IMAGES = (1, 4, 8)  # the subject encoder's batch: one subject's reference images (DreamBench: 4 to 6)


def residual_names(count: int) -> tuple[str, ...]:
    """`down_0`..`down_{count-2}`, `mid`: the ControlNet graph's outputs, the UNet graph's inputs."""
    return (*(f"down_{i}" for i in range(count - 1)), "mid")


def _one_case(dims: Dims, batch: int) -> list[tuple[int, LatentHW]]:
    return [(batch, None)]


@dataclass(frozen=True)
class GraphSpec:
    """Everything graph-specific about one exported graph.

    - `source`: the bundle's module the graph is exported from; the export wraps a copy of
      it (plain attention) in `wrapper(copy, dims)`, the nn.Module `torch.onnx.export` runs.
    - `sample_inputs(model, dims, batch, generator, latent_hw)`: seeded random inputs (the
      export's example and the parity check's inputs), keyed by input name.
    - `reference(model, inputs)`: what the Python pipeline computes, with the bundle's own
      modules (PyTorch fp32; parity compares the graph with it).
    - `output_shape(model, dims)`: the output's shape (a list of them for a graph with several
      outputs), dynamic dims by name, written into the graph (its own shape inference leaves
      some static dims as made-up names).
    - `parity_cases(dims, batch)`: (batch, latent size or None) the parity check runs.
    - `tolerance`: the gate on the fp32 graph, max abs diff against `reference` under ONNX
      Runtime's CPU provider.
    - `fp32_scopes`: node-name prefixes kept in fp32 in the fp16 graph (`fp16.convert_fp16`).
    - `input_shapes`: each input's dims for TensorRT's optimisation profiles, an int where
      fixed, else a size's name: "batch", "subject_text" (the class text's length),
      "latent_height", "latent_width", "image_height", "image_width", or a `Dims` field
      (image_size, num_query, hidden, text_length, latent_channels); a (name, k) pair is that
      size divided by k (a residual's sides).
    - `engine_batch`: the TensorRT profiles' batch (min, opt, max).
    - `attention`: how the export copy computes attention. "sdpa" (the UNet, VAE and ControlNet
      pair, where attention is most of the cost at 512 px and up): torch's SDPA with a constant
      scale, which exports Q and K each multiplied by sqrt(scale) before the Q·Kᵀ MatMul, then
      Softmax and the second MatMul: the pattern TensorRT fuses into one multi-head attention
      kernel; its Softmax stays fp16 in the fp16 graph (no Casts inside the pattern). "eager"
      (the text and subject encoders: 77 and 32 tokens): transformers' eager attention, the
      Softmax kept in fp32.
    - `fp16_tolerance`: the gate on the fp16 graph (ONNX Runtime against PyTorch fp32), set
      from measured differences with a margin (docs/serving.md#the-parity-gate).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    source: Callable[[BlipDiffusion], nn.Module]
    wrapper: Callable[[nn.Module, Dims], nn.Module]
    sample_inputs: Callable[[BlipDiffusion, Dims, int, torch.Generator, LatentHW], Inputs]
    reference: Callable[[BlipDiffusion, Inputs], torch.Tensor]
    output_shape: Callable[[BlipDiffusion, Dims], list[int | str]]
    tolerance: float
    input_shapes: Mapping[str, tuple[int | str, ...]]
    engine_batch: tuple[int, int, int]
    parity_cases: Callable[[Dims, int], list[tuple[int, LatentHW]]] = _one_case
    fp32_scopes: tuple[str, ...] = ()
    attention: str = "eager"
    fp16_tolerance: float | None = None


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


class ControlNetGraph(nn.Module):
    """A ControlNet at scale 1: its down residuals and mid residual as separate outputs."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, return_dict=False)
        return (*down, mid)


class UNetControlGraph(nn.Module):
    """The UNet with residual inputs: `residuals` are the down residuals, then the mid one."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
                         return_dict=False)[0]


# ---------------------------------------------------------------- graph inputs
def text_encoder_inputs(tokenizer, prompts: list[str], has_subject: list[bool], text_length: int,
                        num_query: int) -> dict[str, np.ndarray]:
    """`input_ids` and `has_subject` of the text_encoder graph for built prompts (see
    `BlipDiffusion.build_prompt`) and negative prompts, one row each: the ids of
    `conditioning.prompt_ids` (the graph never reads a subject row's last num_query pads).
    Needs only the CLIP tokenizer, so serving can use it on an export folder."""
    ids = prompt_ids(tokenizer, prompts, text_length, num_query, has_subject)
    return {"input_ids": ids.numpy(), "has_subject": np.asarray(has_subject, dtype=bool)}


CLASS_TEXTS = ("dog", "red backpack", "teapot", "stuffed animal toy")
PROMPTS = ("in the jungle", "on the beach, a photo", "floating in space")


def _subject_encoder_inputs(model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                            latent_hw: LatentHW = None) -> Inputs:
    text = model.qformer_tokenizer([CLASS_TEXTS[i % len(CLASS_TEXTS)] for i in range(batch)],
                                   return_tensors="pt", padding=True)
    return {"pixel_values": torch.randn(batch, 3, dims.image_size, dims.image_size, generator=generator),
            "input_ids": text.input_ids.long(), "attention_mask": text.attention_mask.long()}


def _text_encoder_inputs(model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                         latent_hw: LatentHW = None) -> Inputs:
    has = [i % 2 == 0 for i in range(batch)]  # conditioned and unconditioned rows mixed
    prompts = [BlipDiffusion.build_prompt(PROMPTS[i % len(PROMPTS)], CLASS_TEXTS[i % len(CLASS_TEXTS)],
                                          prompt_reps=3) if h else "low quality, blurry"
               for i, h in enumerate(has)]
    arrays = text_encoder_inputs(model.tokenizer, prompts, has, dims.text_length, dims.num_query)
    return {"input_ids": torch.from_numpy(arrays["input_ids"]),
            "subject_embeds": torch.randn(batch, dims.num_query, dims.hidden, generator=generator),
            "has_subject": torch.from_numpy(arrays["has_subject"])}


def _latents(dims: Dims, batch: int, generator: torch.Generator, latent_hw: LatentHW) -> torch.Tensor:
    h, w = latent_hw or (dims.latent_size, dims.latent_size)
    return torch.randn(batch, dims.latent_channels, h, w, generator=generator)


def _unet_inputs(model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                 latent_hw: LatentHW = None) -> Inputs:
    return {"sample": _latents(dims, batch, generator, latent_hw),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator).float(),
            "encoder_hidden_states": torch.randn(batch, dims.text_length, dims.hidden, generator=generator)}


def _vae_decoder_inputs(model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                        latent_hw: LatentHW = None) -> Inputs:
    """Latents at the decoder's real scale: the sampler's latents (about unit variance) divided
    by the VAE's scaling factor (SD: 0.18215, so a std of about 5.5), not unit noise: fp16
    overflows and parity show at the scale the decoder really sees."""
    return {"latents": _latents(dims, batch, generator, latent_hw) / float(model.vae.config.scaling_factor)}


def _controlnet_inputs(model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                       latent_hw: LatentHW = None) -> Inputs:
    inputs = _unet_inputs(model, dims, batch, generator, latent_hw)
    _, _, h, w = inputs["sample"].shape
    f = dims.vae_scale_factor
    return {**inputs, "controlnet_cond": torch.rand(batch, 3, h * f, w * f, generator=generator)}


def _unet_control_inputs(model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                         latent_hw: LatentHW = None) -> Inputs:
    inputs = _unet_inputs(model, dims, batch, generator, latent_hw)
    _, _, h, w = inputs["sample"].shape
    for name, (c, f) in zip(residual_names(len(dims.residuals)), dims.residuals):
        inputs[name] = torch.randn(batch, c, h // f, w // f, generator=generator)
    return inputs


def _controlnet_reference(model: BlipDiffusion, x: Inputs) -> list[torch.Tensor]:
    down, mid = model.controlnets[0](x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                                     controlnet_cond=x["controlnet_cond"], return_dict=False)
    return [*down, mid]


def _unet_control_reference(model: BlipDiffusion, x: Inputs) -> torch.Tensor:
    residuals = [v for k, v in x.items() if k.startswith("down_")]
    return model.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                      down_block_additional_residuals=residuals, mid_block_additional_residual=x["mid"]).sample


def _unet_cases(dims: Dims, batch: int) -> list[tuple[int, LatentHW]]:
    """The export's latent size, and another, non-square one (dynamic height and width)."""
    m = dims.latent_multiple
    return [(batch, None), (batch, (max(m, dims.latent_size // 2 // m * m), dims.latent_size))]


# ---------------------------------------------------------------------- the specs
_LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}

SPECS: dict[str, GraphSpec] = {spec.name: spec for spec in (
    GraphSpec(
        name="subject_encoder",
        inputs=("pixel_values", "input_ids", "attention_mask"), outputs=("subject_embeds",),
        dynamic_axes={"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "text_length"},
                      "attention_mask": {0: "batch", 1: "text_length"}, "subject_embeds": {0: "batch"}},
        source=lambda model: model.qformer,
        wrapper=lambda module, dims: SubjectEncoderGraph(module),
        sample_inputs=_subject_encoder_inputs,
        reference=lambda model, x: model.qformer(x["pixel_values"], x["input_ids"], x["attention_mask"]),
        output_shape=lambda model, dims: ["batch", dims.num_query,
                                          int(model.qformer.config.qformer_config.hidden_size)],
        tolerance=1e-4,
        input_shapes={"pixel_values": ("batch", 3, "image_size", "image_size"),
                      "input_ids": ("batch", "subject_text"), "attention_mask": ("batch", "subject_text")},
        engine_batch=SUBJECT_IMAGES,
        fp16_tolerance=2e-2,  # measured 4.6e-3 (default profile), 6.0e-3 (tiny)
    ),
    GraphSpec(
        name="text_encoder",
        inputs=("input_ids", "subject_embeds", "has_subject"), outputs=("text_embeds",),
        dynamic_axes={"input_ids": {0: "batch"}, "subject_embeds": {0: "batch"}, "has_subject": {0: "batch"},
                      "text_embeds": {0: "batch"}},
        source=lambda model: model.text_encoder,
        wrapper=lambda module, dims: TextEncoderGraph(module, dims.num_query, dims.ctx_begin_pos),
        sample_inputs=_text_encoder_inputs,
        # the Python pipeline's path, independent of the graph's gather
        reference=lambda model, x: encode_text(model.text_encoder, x["input_ids"], x["subject_embeds"],
                                               model.ctx_begin_pos, x["has_subject"]),
        output_shape=lambda model, dims: ["batch", dims.text_length, dims.hidden],
        tolerance=1e-4,
        input_shapes={"input_ids": ("batch", "text_length"), "subject_embeds": ("batch", "num_query", "hidden"),
                      "has_subject": ("batch",)},
        engine_batch=GUIDED_ROWS,  # the prompts and the negative prompts (CFG)
        fp16_tolerance=1e-2,  # measured 1.5e-3 (default profile), 2.9e-3 (tiny)
    ),
    GraphSpec(
        name="unet",
        inputs=("sample", "timestep", "encoder_hidden_states"), outputs=("noise_pred",),
        dynamic_axes={"sample": dict(_LATENT_AXES), "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                      "noise_pred": dict(_LATENT_AXES)},
        source=lambda model: model.unet,
        wrapper=lambda module, dims: UNetGraph(module),
        sample_inputs=_unet_inputs,
        reference=lambda model, x: model.unet(x["sample"], x["timestep"],
                                              encoder_hidden_states=x["encoder_hidden_states"]).sample,
        output_shape=lambda model, dims: ["batch", int(model.unet.config.out_channels), "latent_height",
                                          "latent_width"],
        tolerance=1e-4,
        input_shapes={"sample": ("batch", "latent_channels", "latent_height", "latent_width"),
                      "timestep": ("batch",), "encoder_hidden_states": ("batch", "text_length", "hidden")},
        engine_batch=GUIDED_ROWS,  # the CFG-doubled batch
        parity_cases=_unet_cases,
        # The sinusoidal timestep embedding: timestep (up to 999) x frequency in fp16 is off
        # by up to ~0.5 rad, so diffusers computes it in fp32 too.
        fp32_scopes=("/unet/time_proj/",),
        attention="sdpa",
        fp16_tolerance=1e-2,  # measured 2.8e-3 (default profile), 1.9e-3 (tiny)
    ),
    GraphSpec(
        name="vae_decoder",
        inputs=("latents",), outputs=("images",),
        dynamic_axes={"latents": dict(_LATENT_AXES), "images": {0: "batch", 2: "image_height", 3: "image_width"}},
        source=lambda model: model.vae,
        wrapper=lambda module, dims: VaeDecoderGraph(module),
        sample_inputs=_vae_decoder_inputs,
        reference=lambda model, x: model.vae.decode(x["latents"]).sample,
        output_shape=lambda model, dims: ["batch", int(model.vae.config.out_channels), "image_height",
                                          "image_width"],
        tolerance=3e-4,
        input_shapes={"latents": ("batch", "latent_channels", "latent_height", "latent_width")},
        engine_batch=(1, SERVING_BATCH, SERVING_BATCH),
        attention="sdpa",
        fp16_tolerance=1e-2,  # images in [-1, 1]; measured 3.4e-3 (tiny) on latents at the decoder's scale
    ),
)}
GRAPHS = tuple(SPECS)
CONTROL_GRAPHS = ("controlnet", "unet_control")


def _residual_axes(factor: int) -> tuple[str, str]:
    return ("latent_height", "latent_width") if factor == 1 else (f"latent_height_{factor}", f"latent_width_{factor}")


def control_specs(residuals: tuple[tuple[int, int], ...]) -> dict[str, GraphSpec]:
    """The ControlNet graphs' specs for a UNet's residual layout (`Dims.residuals`)."""
    names = residual_names(len(residuals))
    res_axes = {n: {0: "batch", 2: _residual_axes(f)[0], 3: _residual_axes(f)[1]} for n, (c, f) in zip(names, residuals)}
    res_shapes = {n: ("batch", c, ("latent_height", f), ("latent_width", f)) for n, (c, f) in zip(names, residuals)}
    unet_shapes = {"sample": ("batch", "latent_channels", "latent_height", "latent_width"), "timestep": ("batch",),
                   "encoder_hidden_states": ("batch", "text_length", "hidden")}
    unet_axes = {"sample": dict(_LATENT_AXES), "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}}
    return {
        "controlnet": GraphSpec(
            name="controlnet",
            inputs=("sample", "timestep", "encoder_hidden_states", "controlnet_cond"), outputs=names,
            dynamic_axes={**unet_axes, "controlnet_cond": {0: "batch", 2: "image_height", 3: "image_width"},
                          **res_axes},
            source=lambda model: model.controlnets[0],
            wrapper=lambda module, dims: ControlNetGraph(module),
            sample_inputs=_controlnet_inputs,
            reference=_controlnet_reference,
            output_shape=lambda model, dims: [["batch", c, *_residual_axes(f)] for c, f in dims.residuals],
            tolerance=1e-4,
            input_shapes={**unet_shapes, "controlnet_cond": ("batch", 3, "image_height", "image_width")},
            engine_batch=SPECS["unet"].engine_batch,
            parity_cases=_unet_cases,
            fp32_scopes=("/controlnet/time_proj/",),
            attention="sdpa",
            fp16_tolerance=5e-2,  # measured 1.6e-2 (default profile): 13 residuals, the largest of them
        ),
        "unet_control": GraphSpec(
            name="unet_control",
            inputs=("sample", "timestep", "encoder_hidden_states", *names), outputs=("noise_pred",),
            dynamic_axes={**unet_axes, **res_axes, "noise_pred": dict(_LATENT_AXES)},
            source=lambda model: model.unet,
            wrapper=lambda module, dims: UNetControlGraph(module),
            sample_inputs=_unet_control_inputs,
            reference=_unet_control_reference,
            output_shape=SPECS["unet"].output_shape,
            tolerance=SPECS["unet"].tolerance,
            input_shapes={**unet_shapes, **res_shapes},
            engine_batch=SPECS["unet"].engine_batch,
            parity_cases=_unet_cases,
            fp32_scopes=SPECS["unet"].fp32_scopes,
            attention=SPECS["unet"].attention,
            fp16_tolerance=SPECS["unet"].fp16_tolerance,
        ),
    }


def graphs_of(model: BlipDiffusion) -> tuple[str, ...]:
    """The graphs a bundle exports: the four, and the ControlNet pair when it has a ControlNet."""
    return GRAPHS + (CONTROL_GRAPHS if model.controlnets else ())


def export_graphs(meta: dict) -> tuple[str, ...]:
    """The graphs an export has (its export.json `graphs`): the four, and the ControlNet pair
    when it was exported with one."""
    listed = set(meta.get("graphs") or GRAPHS)
    return GRAPHS + (CONTROL_GRAPHS if set(CONTROL_GRAPHS) <= listed else ())


def get_spec(name: str, residuals: tuple[tuple[int, int], ...] = ()) -> GraphSpec:
    """A graph's spec; the ControlNet graphs' for a residual layout (`Dims.residuals`)."""
    if name in SPECS:
        return SPECS[name]
    if name in CONTROL_GRAPHS:
        if not residuals:
            raise ValueError(f"graph {name!r} needs the UNet's residual layout")
        return control_specs(tuple(map(tuple, residuals)))[name]
    raise ValueError(f"unknown graph {name!r}; graphs: {', '.join((*SPECS, *CONTROL_GRAPHS))}")


def sample_inputs(name: str, model: BlipDiffusion, dims: Dims, batch: int, generator: torch.Generator,
                  latent_hw: LatentHW = None) -> Inputs:
    """Random inputs of one graph at a batch size (and latent size), from a seeded generator."""
    return get_spec(name, dims.residuals).sample_inputs(model, dims, batch, generator, latent_hw)

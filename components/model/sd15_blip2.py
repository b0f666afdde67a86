"""The `sd15-blip2` preset: the composition that pre-training starts from (paper Sec. 4.1-4.2).

- text encoder, tokenizer, UNet, VAE and scheduler: Stable Diffusion v1.5;
- image encoder: CLIP ViT-L/14 without its last layer (23 of 24 layers, as the paper);
- Q-Former: BLIP-2's initialisation, BERT-base weights for the self-attention and feed-
  forward layers of both the query and the text branch, cross-attention and query tokens
  fresh (seeded), as BLIP-2 stage 1 begins.

Each source is a hub id or a local folder in its library's `save_pretrained` layout. The
weight conversions are explicit functions, so every source key is used or named as dropped.
"""

from __future__ import annotations

import logging

import torch

from components.core.errors import BlipDiffError

log = logging.getLogger(__name__)

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_VISION_ID = "openai/clip-vit-large-patch14"
BERT_ID = "bert-base-uncased"
NUM_QUERY_TOKENS = 16


def convert_clip_vision(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """CLIPVisionModel weights -> `BlipDiffusionQFormer.visual_encoder.*` (first `num_layers`).

    q/k/v projections are fused into one `qkv`; the key bias is dropped: a bias added to
    every key shifts all of a query's scores equally and cancels in the softmax.
    """
    out = {
        "visual_encoder.embeddings.class_embedding": state["embeddings.class_embedding"].reshape(1, 1, -1),
        "visual_encoder.embeddings.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
        "visual_encoder.embeddings.position_embedding": state["embeddings.position_embedding.weight"][None],
        "visual_encoder.pre_layernorm.weight": state["pre_layrnorm.weight"],
        "visual_encoder.pre_layernorm.bias": state["pre_layrnorm.bias"],
        "visual_encoder.post_layernorm.weight": state["post_layernorm.weight"],
        "visual_encoder.post_layernorm.bias": state["post_layernorm.bias"],
    }
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"visual_encoder.encoder.layers.{i}."
        attn = src + "self_attn."
        out[dst + "self_attn.qkv.weight"] = torch.cat(
            [state[attn + f"{p}_proj.weight"] for p in "qkv"])
        q_bias = state[attn + "q_proj.bias"]
        out[dst + "self_attn.qkv.bias"] = torch.cat(
            [q_bias, torch.zeros_like(q_bias), state[attn + "v_proj.bias"]])
        out[dst + "self_attn.projection.weight"] = state[attn + "out_proj.weight"]
        out[dst + "self_attn.projection.bias"] = state[attn + "out_proj.bias"]
        for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = state[f"{src}{name}.{p}"]
    return out


def convert_bert(state: dict[str, torch.Tensor], num_layers: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """BertModel weights -> the Q-Former's embeddings and self-attention/feed-forward layers.

    The feed-forward weights initialise both branches (text: intermediate/output, queries:
    intermediate_query/output_query), as BLIP-2 does. Token-type embeddings are not used by
    the Q-Former. Rows of the word embeddings past BERT's vocabulary (the added [DEC]
    token) keep their fresh initialisation, so they are not returned.
    """
    words = state["embeddings.word_embeddings.weight"]
    if words.shape[0] > vocab_size:
        raise BlipDiffError(f"BERT vocabulary ({words.shape[0]}) larger than the Q-Former's ({vocab_size})")
    out = {
        "embeddings.position_embeddings.weight": state["embeddings.position_embeddings.weight"],
        "embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for name in ("query", "key", "value"):
                out[f"{dst}attention.attention.{name}.{p}"] = state[f"{src}attention.self.{name}.{p}"]
            out[f"{dst}attention.output.dense.{p}"] = state[f"{src}attention.output.dense.{p}"]
            out[f"{dst}attention.output.LayerNorm.{p}"] = state[f"{src}attention.output.LayerNorm.{p}"]
            for branch in ("", "_query"):
                out[f"{dst}intermediate{branch}.dense.{p}"] = state[f"{src}intermediate.dense.{p}"]
                out[f"{dst}output{branch}.dense.{p}"] = state[f"{src}output.dense.{p}"]
                out[f"{dst}output{branch}.LayerNorm.{p}"] = state[f"{src}output.LayerNorm.{p}"]
    return out


def build(sd15: str = SD15_ID, clip_vision: str = CLIP_VISION_ID, bert: str = BERT_ID, seed: int = 0):
    """Assemble the composition; sources are hub ids or local folders."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import (
        BertModel,
        BertTokenizer,
        Blip2Config,
        CLIPTokenizer,
        CLIPVisionModel,
    )

    from components.model.blip_diffusion import BlipDiffusion
    from components.model.processor import ImageProcessorConfig
    from components.model.qformer import BlipDiffusionQFormer
    from components.model.text_encoder import ContextCLIPTextModel

    try:
        vision = CLIPVisionModel.from_pretrained(clip_vision)
        bert_model = BertModel.from_pretrained(bert, add_pooling_layer=False)
        bert_tokenizer = BertTokenizer.from_pretrained(bert, truncation_side="right")
        text_encoder = ContextCLIPTextModel.from_pretrained(sd15, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(sd15, subfolder="tokenizer")
        unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae")
        scheduler = PNDMScheduler.from_pretrained(sd15, subfolder="scheduler")
    except OSError as exc:
        raise BlipDiffError(f"sd15-blip2: a source could not be loaded (hub ids need network or "
                            f"the HF cache; folders need save_pretrained layouts): {exc}") from None
    bert_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    vcfg, bcfg = vision.config, bert_model.config
    config = Blip2Config(
        vision_config=dict(hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                           num_hidden_layers=vcfg.num_hidden_layers - 1,  # the paper drops the last
                           num_attention_heads=vcfg.num_attention_heads, image_size=vcfg.image_size,
                           patch_size=vcfg.patch_size, hidden_act=vcfg.hidden_act,
                           layer_norm_eps=vcfg.layer_norm_eps),
        qformer_config=dict(vocab_size=len(bert_tokenizer), hidden_size=bcfg.hidden_size,
                            num_hidden_layers=bcfg.num_hidden_layers,
                            num_attention_heads=bcfg.num_attention_heads,
                            intermediate_size=bcfg.intermediate_size, cross_attention_frequency=1,
                            encoder_hidden_size=vcfg.hidden_size,
                            max_position_embeddings=bcfg.max_position_embeddings),
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    if text_encoder.config.hidden_size != bcfg.hidden_size:
        raise BlipDiffError(f"the Q-Former width ({bcfg.hidden_size}) must equal the text encoder's "
                            f"({text_encoder.config.hidden_size}): the subject embeddings go into its input")
    torch.manual_seed(seed)
    qformer = BlipDiffusionQFormer(config)
    state = convert_clip_vision(vision.state_dict(), config.vision_config.num_hidden_layers)
    state.update(convert_bert(bert_model.state_dict(), bcfg.num_hidden_layers, config.qformer_config.vocab_size))
    words = bert_model.state_dict()["embeddings.word_embeddings.weight"]
    with torch.no_grad():
        qformer.embeddings.word_embeddings.weight[: words.shape[0]] = words
    missing, unexpected = qformer.load_state_dict(state, strict=False)
    if unexpected:  # a conversion bug, not a user error
        raise RuntimeError(f"sd15-blip2: converted keys the Q-Former does not have: {unexpected[:5]}")
    log.info("sd15-blip2: %d Q-Former tensors from CLIP/BERT, fresh: %s", len(state),
             sorted({k.split(".")[0] if "crossattention" not in k else "crossattention" for k in missing}))
    size = vcfg.image_size
    return BlipDiffusion(qformer=qformer.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                         qformer_tokenizer=bert_tokenizer, unet=unet, vae=vae, scheduler=scheduler,
                         image_processor=ImageProcessorConfig(size=size, crop_size=size)).to("cpu")

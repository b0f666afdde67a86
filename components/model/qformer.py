"""Subject encoder: the BLIP-2 Q-Former reading a frozen image encoder and the subject's class text.

image -> vision transformer (frozen in training) -> Q-Former (16 query tokens + class text,
cross-attention to the image features) -> projection layer -> 16 subject embeddings in the
CLIP text space. Built on transformers' BLIP-2 blocks (`Blip2Encoder` for the image,
`Blip2QFormerEncoder` for the Q-Former layers); the module tree keeps the key names of the
released `qformer/` folder, and `convert_reference_state_dict` maps that folder's few
differing keys onto it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2Config
from transformers.activations import QuickGELUActivation
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2Encoder,
    Blip2PreTrainedModel,
    Blip2QFormerEncoder,
)


class QFormerTextEmbeddings(nn.Module):
    """Query tokens followed by the class text's word + position embeddings, then LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        embeddings = torch.cat([query_embeds.to(text.dtype), text], dim=1)
        return self.dropout(self.LayerNorm(embeddings))


class VisionEmbeddings(nn.Module):
    """CLIP-style patch embeddings (no conv bias, as in the released image encoder)."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(dtype)
        embeddings = torch.cat([cls, patches], dim=1)
        return embeddings + self.position_embedding[:, : embeddings.shape[1]].to(dtype)


class VisionModel(nn.Module):
    """The image encoder: a ViT with a LayerNorm before and after the transformer layers."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layernorm(self.embeddings(pixel_values))
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        return self.post_layernorm(hidden)


class ProjLayer(nn.Module):
    """Maps Q-Former outputs into the text encoder's space: x + Drop(W2 QuickGELU(W1 LN(x)))."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, drop_p: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.dense1 = nn.Linear(in_dim, hidden_dim)
        self.act_fn = QuickGELUActivation()
        self.dense2 = nn.Linear(hidden_dim, out_dim)
        self.dropout = nn.Dropout(drop_p)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


class BlipDiffusionQFormer(Blip2PreTrainedModel):
    """Subject encoder: (image, class text) -> subject embeddings of shape (B, num_query_tokens, D)."""

    config_class = Blip2Config
    main_input_name = "pixel_values"
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerLayer"]

    def __init__(self, config: Blip2Config):
        # The class text runs through the Q-Former layers too, so they need their text branch.
        config.qformer_config.use_qformer_text_input = True
        super().__init__(config)
        qcfg = config.qformer_config
        self.embeddings = QFormerTextEmbeddings(qcfg)
        self.visual_encoder = VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qcfg.hidden_size))
        self.proj_layer = ProjLayer(qcfg.hidden_size, qcfg.hidden_size, qcfg.hidden_size * 4)
        self.encoder = Blip2QFormerEncoder(qcfg)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, VisionEmbeddings):
            std = self.config.initializer_range
            nn.init.trunc_normal_(module.position_embedding, std=std)
            nn.init.trunc_normal_(module.class_embedding, std=std)
        elif isinstance(module, BlipDiffusionQFormer):
            # Random, as BLIP-2 initialises them: equal query tokens would stay equal in training.
            nn.init.normal_(module.query_tokens, std=self.config.initializer_range)
        else:
            super()._init_weights(module)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`image_embeds`: the image encoder's output for `pixel_values` when already known (it
        is frozen in every training stage, so it can be cached); `pixel_values` may then be None."""
        batch = (pixel_values if image_embeds is None else image_embeds).shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"{batch} images but {input_ids.shape[0]} class texts")
        num_query = self.query_tokens.shape[1]
        queries = self.query_tokens.expand(batch, -1, -1)
        hidden = self.embeddings(input_ids, queries)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([torch.ones(batch, num_query, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        # Additive mask over keys: padding of the class text is never attended to.
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        if image_embeds is None:
            image_embeds = self.visual_encoder(pixel_values)
        out = self.encoder(
            hidden,
            attention_mask=additive,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=None,
            query_length=num_query,
        ).last_hidden_state
        return self.proj_layer(out[:, :num_query])


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released `qformer/` keys (diffusers' deprecated Blip2QFormerModel) -> this module's keys.

    - the image encoder's attention biases were two vectors (`q_bias`, `v_bias`; the key
      projection has none): current transformers holds one `qkv.bias` = [q, 0, v];
    - `embeddings.position_ids` was a saved buffer: positions are recomputed, so it goes.
    Every other key is the same. Raises on a key that fits neither rule, so nothing is
    silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith(("self_attn.q_bias", "self_attn.v_bias")):
            prefix, name = key.rsplit(".", 1)
            pending.setdefault(prefix, {})[name] = value
        elif key == "embeddings.position_ids":
            continue
        else:
            out[key] = value
    for prefix, parts in pending.items():
        if set(parts) != {"q_bias", "v_bias"}:
            raise KeyError(f"{prefix}: found {sorted(parts)}, expected both q_bias and v_bias")
        q, v = parts["q_bias"], parts["v_bias"]
        out[f"{prefix}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out
